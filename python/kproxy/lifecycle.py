"""One-shot lifecycle commands (``kproxy cleanup``)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

from kproxy import _core
from kproxy.errors import KproxyError
from kproxy.model import Family

log = logging.getLogger(__name__)

# What kube-proxy's other modes leave on a node: the nftables mode's tables, the ipvs mode's
# dummy interface and ipsets. Cleaning them lets kproxy replace a kube-proxy in any mode.
# kproxy's own nftables tables, and kube-proxy's.
NFT_TABLES = tuple(
    (fam, table) for table in ("kproxy", "kproxy-userspace", "kube-proxy") for fam in ("ip", "ip6")
)
IPVS_INTERFACE = "kube-ipvs0"
# Each family's iptables tool.
IPTABLES_TOOLS: tuple[tuple[Family, str], ...] = (("IPv4", "iptables"), ("IPv6", "ip6tables"))


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str] | None:
    if shutil.which(argv[0]) is None:
        return None
    return subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


def cleanup() -> int:
    """Remove every rule kproxy creates, in every mode. Safe to run twice or on a clean node."""
    return max(_cleanup_iptables(), _cleanup_nftables(), _cleanup_ipvs())


def cleanup_other_modes(mode: str) -> int:
    """Remove what the other modes left on the node (kube-proxy's or kproxy's), as upstream's
    platformCleanup does when it starts: an iptables-based mode removes the nftables tables,
    the nftables mode removes the iptables chains, the ipvs mode's interface and sets, and
    kube-proxy's own nftables table.
    The daemon calls it once its own rules are in place, so traffic never meets neither."""
    if mode in ("iptables", "ipvs"):
        return _cleanup_nftables()
    if mode == "nftables":
        # kube-proxy's own nftables tables too: kproxy's mode writes its table, "kproxy".
        others = tuple(t for t in NFT_TABLES if t[1] != "kproxy")
        return max(_cleanup_iptables(), _cleanup_ipvs(), _cleanup_nftables(others))
    return 0  # userspace: its portals live beside whatever else is there


def hand_back() -> int:
    """Leave the node to kube-proxy, once it runs there: remove what only kproxy creates and
    kube-proxy would not remove or rewrite, never what the two share.

    The shared parts have upstream's names (the iptables and ipvs modes' chains, the ipvs
    mode's interface and sets): kube-proxy rewrites them as it starts. kproxy's own are its
    nftables tables (``kproxy``, ``kproxy-userspace``; kube-proxy's nftables mode writes
    ``kube-proxy`` and knows nothing of them) and the iptables mode's dispatch buckets, which
    are removed only once nothing of kube-proxy's jumps to them."""
    status = _cleanup_nftables(tuple(t for t in NFT_TABLES if t[1] != "kube-proxy"))
    for family, tool in IPTABLES_TOOLS:
        if shutil.which(f"{tool}-restore") is None:
            continue
        try:
            n, blocked = _core.hand_back_iptables(family)
        except KproxyError as e:
            log.error("%s: %s", tool, e)
            status = 1
            continue
        if blocked is not None:
            log.error("%s: nothing removed: %s", tool, blocked)
            status = 1
        else:
            log.info("%s: removed %d of kproxy's own chains", tool, n)
    return status


def _cleanup_iptables() -> int:
    status = 0
    for family, tool in IPTABLES_TOOLS:
        if shutil.which(f"{tool}-restore") is None:
            continue
        try:
            n = _core.cleanup_iptables(family)
            if n:
                log.info("%s: removed %d chains", tool, n)
        except KproxyError as e:
            log.error("%s cleanup failed: %s", tool, e)
            status = 1
    return status


def _cleanup_nftables(tables: tuple[tuple[str, str], ...] = NFT_TABLES) -> int:
    status = 0
    if shutil.which("nft") is not None:
        for fam, table in tables:
            # add-then-delete in one transaction: idempotent, and no listing of a table that
            # may hold a million elements.
            script = f"add table {fam} {table}\ndelete table {fam} {table}\n"
            r = _run(["nft", "-f", "-"], script)
            if r is not None and r.returncode != 0:
                log.error("nft delete table %s %s: %s", fam, table, r.stderr.strip())
                status = 1
    return status


def _cleanup_ipvs() -> int:
    status = 0
    if os.path.exists(f"/sys/class/net/{IPVS_INTERFACE}"):
        # Flush IPVS first (if the module is loaded), then the dummy interface holding the VIPs.
        if os.path.exists("/proc/net/ip_vs"):
            _run(["ipvsadm", "--clear"])
        r = _run(["ip", "link", "del", IPVS_INTERFACE])
        if r is not None and r.returncode != 0:
            log.error("ip link del %s: %s", IPVS_INTERFACE, r.stderr.strip())
            status = 1
    names = _run(["ipset", "list", "-n"])
    if names is not None and names.returncode == 0:
        # Only the ipvs mode's own names: kube-router's sets share the KUBE- prefix.
        ours = set(_core.ipvs_set_names())
        for name in names.stdout.split():
            if name in ours:
                r = _run(["ipset", "destroy", name])
                if r is not None and r.returncode != 0:  # still referenced by someone's rule
                    log.warning("ipset %s kept: %s", name, r.stderr.strip())
    return status
