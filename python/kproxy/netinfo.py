"""Facts about the node's own network: local addresses, IP families the kernel supports."""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess

from kproxy.model import Family


def local_addresses() -> list[str]:
    """Every address configured on this network namespace's interfaces."""
    try:
        out = subprocess.run(
            ["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    addrs: list[str] = []
    for link in json.loads(out or "[]"):
        for a in link.get("addr_info", []):
            local = a.get("local")
            if isinstance(local, str):
                addrs.append(str(ipaddress.ip_address(local)))
    return addrs


def addresses_in(cidrs: tuple[str, ...], candidates: list[str]) -> list[str]:
    nets = [ipaddress.ip_network(c) for c in cidrs]
    return [a for a in candidates if any(ipaddress.ip_address(a) in n for n in nets)]


def iptables_families() -> list[Family]:
    """The families whose iptables tools work here (upstream runs one proxier per family)."""
    fams: list[Family] = []
    for fam, tool in (("IPv4", "iptables"), ("IPv6", "ip6tables")):
        if shutil.which(f"{tool}-restore") is None:
            continue
        try:
            ok = subprocess.run(
                [tool, "-w", "5", "-t", "nat", "-S", "POSTROUTING"],
                capture_output=True, timeout=15, check=False,
            ).returncode == 0  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            fams.append(fam)  # type: ignore[arg-type]
    return fams


def sysctl(name: str) -> str | None:
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return f.read().strip()
    except OSError:
        return None


def set_sysctl(name: str, value: str) -> bool:
    """Set a sysctl of this network namespace; False (and nothing raised) if it cannot be."""
    try:
        with open("/proc/sys/" + name.replace(".", "/"), "w") as f:
            f.write(value)
    except OSError:
        return False
    return True


CAP_NET_ADMIN = 12


def has_net_admin(status: str | None = None) -> bool:
    """Whether this process may change the network's configuration (CAP_NET_ADMIN in its
    effective set): the userspace mode then also serves Service addresses through redirect
    rules; without it, only its NodePort listeners."""
    if status is None:
        try:
            with open("/proc/self/status") as f:
                status = f.read()
        except OSError:
            return False
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False
