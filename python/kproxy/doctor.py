"""``kproxy doctor``: what will go wrong on this node, before it does.

Each check reads the node (tools on ``PATH``, ``/proc``, ``/sys``, the rules already in the
kernel, and with ``--manifests`` or an API server the cluster's objects) for the mode about to
run and answers ``ok``, ``warn`` (kproxy runs, with a caveat the
detail names) or ``fail`` (the mode cannot work here as configured). Nothing is changed. The
exit status is 1 when any check fails, so a provisioning script can gate on it.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kproxy import tools, xtables_backend
from kproxy.backends.proxier import programmed
from kproxy.config import ProxyConfig
from kproxy.control import Controller
from kproxy.errors import KproxyError
from kproxy.model import IPVS_SCHEDULER_ANNOTATION
from kproxy.nodesetup import Proc, conntrack_max

OK, WARN, FAIL = "ok", "warn", "fail"
# upstream's nftables mode needs nft 1.0.1 or later (it reads and writes what older ones lack).
NFT_MINIMUM = (1, 0, 1)
# The userspace forwarder's default connection cap and the descriptors each relayed
# connection can hold (two sockets, two pipes; rust/src/forward).
USERSPACE_CONNECTIONS = 16_384
DESCRIPTORS_PER_CONNECTION = 6


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: str  # OK, WARN or FAIL
    detail: str


@dataclass(frozen=True, slots=True)
class Result:
    stdout: str
    returncode: int


def _run(argv: Sequence[str]) -> Result:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Result(str(e), 127)
    return Result(r.stdout + r.stderr, r.returncode)


@dataclass(frozen=True)
class Node:
    """Where the checks look (tests replace the parts they prepare)."""

    proc: Proc = field(default_factory=Proc)
    run: Callable[[Sequence[str]], Result] = _run
    which: Callable[[str], str | None] = shutil.which
    nofile: Callable[[], tuple[int, int]] = lambda: resource.getrlimit(resource.RLIMIT_NOFILE)
    kernel: str = field(default_factory=lambda: os.uname().release)
    cpus: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    writable: Callable[[Path], bool] = lambda p: os.access(p, os.W_OK)


KERNEL_MODES = ("iptables", "nftables", "ipvs")
TOOLS = {
    "iptables": ("iptables-restore", "iptables-save", "ip6tables-restore", "ip"),
    "nftables": ("nft", "ip"),
    "ipvs": ("iptables-restore", "iptables-save", "ipset", "ip"),
    "userspace": (),
}


def check_tools(cfg: ProxyConfig, node: Node) -> Check:
    missing = [t for t in TOOLS[cfg.mode] if node.which(t) is None]
    if missing:
        return Check("tools", FAIL, f"the {cfg.mode} mode runs {', '.join(missing)}: not found")
    if cfg.mode in KERNEL_MODES and node.which("conntrack") is None:
        return Check(
            "tools", WARN, "conntrack not found: stale UDP flows are not cleared after changes"
        )
    return Check("tools", OK, ", ".join(TOOLS[cfg.mode]) or "none needed")


def _version(text: str) -> tuple[int, ...]:
    m = re.search(r"v(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g or 0) for g in m.groups()) if m else ()


def check_nft(cfg: ProxyConfig, node: Node) -> Check:
    r = node.run(["nft", "--version"])
    have = _version(r.stdout)
    text = ".".join(map(str, have)) or "unknown"
    if r.returncode != 0 or have < NFT_MINIMUM:
        need = ".".join(map(str, NFT_MINIMUM))
        return Check("nft", FAIL, f"nft {text}: the nftables mode needs {need} or later")
    listed = node.run(["nft", "list", "ruleset"])
    if listed.returncode != 0:
        # Tables written by a newer nft (another container's, or the host's) can use what this
        # one cannot print: every later listing, and kproxy's own reads, fail the same way.
        first = listed.stdout.strip().splitlines()[:1]
        return Check(
            "nft", FAIL,
            f"nft {text} cannot list this node's ruleset (a newer nft wrote it: version skew "
            f"between the host's nft and this one): {first[0] if first else 'no output'}",
        )  # fmt: skip
    return Check("nft", OK, f"nft {text}")


def _path_backend(node: Node) -> str | None:
    """The backend the ``iptables`` on PATH uses."""
    out = node.run(["iptables", "--version"]).stdout
    if "nf_tables" in out:
        return "nft"
    if "legacy" in out:
        return "legacy"
    return None


def check_iptables_backend(cfg: ProxyConfig, node: Node) -> Check:
    detected = xtables_backend.detect(lambda argv: node.run(argv).stdout)
    forced = os.environ.get(xtables_backend.ENV, "").strip().lower()
    if forced == "auto":
        return Check(
            "iptables-backend", OK, f"{detected.backend}, chosen at start ({detected.reason})"
        )
    used = forced if forced in xtables_backend.BACKENDS else _path_backend(node)
    if used is None:
        return Check("iptables-backend", WARN, "cannot tell which backend `iptables` is")
    if used != detected.backend and "default" not in detected.reason:
        return Check(
            "iptables-backend", FAIL,
            f"kproxy would write iptables-{used} rules, but this node uses "
            f"iptables-{detected.backend} ({detected.reason}): set "
            f"{xtables_backend.ENV}=auto (the image does)",
        )  # fmt: skip
    return Check("iptables-backend", OK, f"iptables-{used} ({detected.reason})")


NETFILTER = "proc/sys/net/netfilter"


def check_conntrack(cfg: ProxyConfig, node: Node) -> Check:
    have = node.proc.read_int(f"{NETFILTER}/nf_conntrack_max")
    if have is None:
        return Check("conntrack", FAIL, "nf_conntrack is not loaded (no nf_conntrack_max)")
    want = conntrack_max(cfg, node.cpus)
    if want and have < want:
        path = node.proc.root / NETFILTER / "nf_conntrack_max"
        if not node.writable(path):
            return Check(
                "conntrack", WARN,
                f"nf_conntrack_max is {have}; kproxy asks {want} and cannot write it here "
                "(it is the host's: set it there, or run kproxy in the host's namespace)",
            )  # fmt: skip
        return Check("conntrack", OK, f"nf_conntrack_max {have}, raised to {want} at start")
    return Check("conntrack", OK, f"nf_conntrack_max {have}")


def check_sysctls(cfg: ProxyConfig, node: Node) -> Check:
    """kproxy writes a few sysctls at start; a read-only /proc/sys (an unprivileged
    container) leaves them as they are."""
    needed = ["proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established"]
    if cfg.mode == "iptables" and cfg.localhost_nodeports:
        needed.append("proc/sys/net/ipv4/conf/all/route_localnet")
    if cfg.mode == "ipvs":
        needed.append("proc/sys/net/ipv4/vs/conntrack")
    ro = [
        p for p in needed if (node.proc.root / p).exists() and not node.writable(node.proc.root / p)
    ]
    if not ro:
        return Check("sysctls", OK, "/proc/sys is writable")
    names = ", ".join(p.removeprefix("proc/sys/").replace("/", ".") for p in ro)
    status = FAIL if "route_localnet" in names or cfg.mode == "ipvs" else WARN
    return Check(
        "sysctls", status,
        f"read-only: {names} (run privileged, or set them with `kube-proxy --init-only` in a "
        "privileged init container)",
    )  # fmt: skip


def check_ipvs(cfg: ProxyConfig, node: Node) -> Check:
    if not (node.proc.root / "proc/net/ip_vs").exists():
        exists = node.run(["modinfo", "-n", "ip_vs"]).returncode == 0
        fix = "load it: modprobe ip_vs" if exists else "this kernel has no ip_vs module"
        return Check("ipvs", FAIL, f"ip_vs is not loaded ({fix})")
    sched = cfg.ipvs_scheduler or "rr"
    module = f"ip_vs_{sched}"
    loaded = (node.proc.root / "sys/module" / module).exists()
    if not loaded and node.run(["modinfo", "-n", module]).returncode != 0:
        return Check("ipvs", FAIL, f"the scheduler {sched!r} needs {module}: not in this kernel")
    return Check("ipvs", OK, f"ip_vs loaded, scheduler {sched}")


def check_other_proxies(cfg: ProxyConfig, node: Node) -> Check:
    """Another Service proxy's rules: kube-proxy's are taken over; another kind fights."""
    found_kube: list[str] = []
    found_other: list[str] = []
    if node.which("iptables") is not None:
        for chain, who in (("KUBE-SERVICES", found_kube), ("CILIUM_PRE_nat", found_other)):
            if node.run(["iptables", "-t", "nat", "-S", chain]).returncode == 0:
                who.append(f"iptables chain {chain}")
    if node.which("nft") is not None:
        for table, who in (("kube-proxy", found_kube), ("cilium", found_other)):
            if node.run(["nft", "list", "table", "ip", table]).returncode == 0:
                who.append(f"nftables table ip {table}")
    if (node.proc.root / "sys/class/net/kube-ipvs0").exists():
        found_kube.append("kube-ipvs0")
    if found_other:
        return Check(
            "other-proxies", WARN,
            f"another Service proxy's rules are here ({', '.join(found_other)}): if it proxies "
            "Services too, the two will disagree; run one",
        )  # fmt: skip
    if found_kube:
        return Check(
            "other-proxies", OK,
            f"kube-proxy's (or kproxy's) rules are here ({', '.join(found_kube)}): kproxy takes "
            "them over (docs/migrating-from-kube-proxy.md)",
        )  # fmt: skip
    return Check("other-proxies", OK, "none")


def check_open_files(cfg: ProxyConfig, node: Node) -> Check:
    soft, hard = node.nofile()
    need = USERSPACE_CONNECTIONS * DESCRIPTORS_PER_CONNECTION
    if hard != resource.RLIM_INFINITY and hard < need:
        most = hard // DESCRIPTORS_PER_CONNECTION
        return Check(
            "open-files", WARN,
            f"the open file limit is {hard}: about {most} relayed connections at most "
            f"(the forwarder's cap is {USERSPACE_CONNECTIONS}; raise LimitNOFILE or ulimit -n)",
        )  # fmt: skip
    return Check("open-files", OK, f"limit {soft}/{hard}")


def _names(keys: Sequence[str], most: int = 5) -> str:
    shown = ", ".join(keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")


def check_deprecations(cfg: ProxyConfig, cluster: Controller) -> Check:
    """What in use depends on what upstream is removing: externalIPs (KEP-5707) and the ipvs
    mode (KEP-5495) with its per-Service schedulers."""
    services = [(k, cluster.services.get(k)) for k in cluster.services.keys()]  # noqa: SIM118
    external = sorted(f"{k.namespace}/{k.name}" for k, s in services if s and s.external_ips)
    sched = sorted(f"{k.namespace}/{k.name}" for k, s in services if s and s.ipvs_scheduler)
    notes = []
    if external:
        notes.append(
            f"{len(external)} Services use externalIPs, deprecated upstream (KEP-5707; the "
            f"AllowServiceExternalIPs gate turns them off): {_names(external)}"
        )
    if cfg.mode == "ipvs":
        notes.append(
            "the ipvs mode is deprecated upstream (KEP-5495; refused from 1.40): kproxy keeps "
            "it (docs/ipvs.md)"
        )
    if sched:
        notes.append(
            f"{len(sched)} Services pick an IPVS scheduler ({IPVS_SCHEDULER_ANNOTATION}), which "
            f"only the ipvs mode honours: {_names(sched)}"
        )
    if not notes:
        return Check("deprecations", OK, f"none in use by {len(services)} Services")
    return Check("deprecations", WARN, "; ".join(notes))


def check_ipset_sizes(cfg: ProxyConfig, cluster: Controller) -> Check:
    """Each ipset against the members this cluster gives it (the ipvs mode's sets are created
    with a fixed maxelem; a set over it refuses the sync)."""
    engine = programmed(cfg, cluster, ("IPv4",)).engines["IPv4"]
    _, _, restore = engine.ipvs_parts()
    maxelem: dict[str, int] = {}
    members: dict[str, int] = {}
    for line in restore.splitlines():
        words = line.split()
        if words[:1] == ["create"] and "maxelem" in words:
            maxelem[words[1]] = int(words[words.index("maxelem") + 1])
        elif words[:1] == ["add"]:
            members[words[1]] = members.get(words[1], 0) + 1
        elif words[:1] == ["flush"] and len(words) > 1:
            members[words[1]] = 0
        elif words[:1] == ["swap"]:  # a full sync fills a scratch set and swaps it in
            a, b = words[1], words[2]
            members[a], members[b] = members.get(b, 0), members.get(a, 0)
            limits = maxelem.pop(a, None), maxelem.pop(b, None)  # bitmap sets have none
            for name, limit in ((a, limits[1]), (b, limits[0])):
                if limit is not None:
                    maxelem[name] = limit
        elif words[:1] == ["destroy"]:
            members.pop(words[1], None)
            maxelem.pop(words[1], None)
    over = [f"{n} ({members[n]} > {maxelem[n]})" for n in sorted(members) if
            n in maxelem and members[n] > maxelem[n]]  # fmt: skip
    if over:
        return Check("ipset-sizes", FAIL, f"over maxelem: {', '.join(over)}")
    largest = max(members.items(), key=lambda kv: kv[1], default=("none", 0))
    return Check("ipset-sizes", OK, f"largest {largest[0]} with {largest[1]} members")


def cluster_checks(
    cfg: ProxyConfig, snapshot: Callable[[ProxyConfig], Controller] | None = None
) -> list[Check]:
    """The checks that need the cluster's objects (from --manifests or the API server)."""
    try:
        cluster = (snapshot or tools.snapshot)(cfg)
    except KproxyError as e:
        return [Check("cluster", FAIL, f"cannot read the cluster's objects: {e}")]
    out = [check_deprecations(cfg, cluster)]
    if cfg.mode == "ipvs":
        out.append(check_ipset_sizes(cfg, cluster))
    return out


def checks(cfg: ProxyConfig, node: Node | None = None) -> list[Check]:
    node = node or Node()
    out = [Check("kernel", OK, node.kernel), check_tools(cfg, node)]
    if cfg.mode in ("iptables", "ipvs"):
        out.append(check_iptables_backend(cfg, node))
    if cfg.mode == "nftables" and node.which("nft") is not None:
        out.append(check_nft(cfg, node))
    if cfg.mode == "ipvs":
        out.append(check_ipvs(cfg, node))
    if cfg.mode in KERNEL_MODES:
        out += [check_conntrack(cfg, node), check_sysctls(cfg, node)]
        out.append(check_other_proxies(cfg, node))
    else:
        out.append(check_open_files(cfg, node))
    if cfg.manifests is not None or cfg.kubeconfig is not None or cfg.master is not None:
        out += cluster_checks(cfg)
    return out


def report(cfg: ProxyConfig, found: list[Check], as_json: bool) -> str:
    ready = all(c.status != FAIL for c in found)
    if as_json:
        doc = {"mode": cfg.mode, "ready": ready, "checks": [asdict(c) for c in found]}
        return json.dumps(doc, indent=2) + "\n"
    width = max(len(c.name) for c in found)
    lines = [f"{c.status:<4}  {c.name:<{width}}  {c.detail}" for c in found]
    verdict = "ready" if ready else "not ready"
    return "\n".join([*lines, f"{cfg.mode} mode: {verdict}"]) + "\n"


def doctor_command(cfg: ProxyConfig, as_json: bool = False, node: Node | None = None) -> int:
    found = checks(cfg, node)
    print(report(cfg, found, as_json), end="")
    return 0 if all(c.status != FAIL for c in found) else 1
