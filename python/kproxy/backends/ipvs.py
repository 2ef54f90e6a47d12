"""The ipvs mode's node setup around the Rust engine: the kube-ipvs0 dummy interface that
makes Service addresses local (so IPVS sees their packets), and the sysctls the mode needs.

The engine programs IPVS, the ipsets and the iptables rules; it reports which addresses
kube-ipvs0 must hold, and this module binds and unbinds them with pyroute2.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from kproxy.errors import ApplyError
from kproxy.netinfo import set_sysctl, sysctl

log = logging.getLogger(__name__)

INTERFACE = "kube-ipvs0"

# What upstream's ipvs mode sets: conntrack for IPVS connections (masquerade needs it);
# connections to removed real servers and stale persistence templates expire at once;
# forwarding on (replies leave through the node).
SYSCTLS = (
    ("net.ipv4.vs.conntrack", "1"),
    ("net.ipv4.vs.expire_nodest_conn", "1"),
    ("net.ipv4.vs.expire_quiescent_template", "1"),
    ("net.ipv4.ip_forward", "1"),
)
# strictARP: the node answers ARP only for addresses on the receiving interface, so the
# Service addresses on kube-ipvs0 are not announced (MetalLB's L2 mode needs this).
STRICT_ARP = (
    ("net.ipv4.conf.all.arp_ignore", "1"),
    ("net.ipv4.conf.all.arp_announce", "2"),
)


def set_sysctls(strict_arp: bool) -> None:
    """Set what the mode needs; a value that cannot be set is logged (the kernel may lack
    it), never fatal: the rest of the node's setup still helps."""
    for name, value in SYSCTLS + (STRICT_ARP if strict_arp else ()):
        if sysctl(name) == value:
            continue
        if set_sysctl(name, value):
            log.info("set %s=%s", name, value)
        else:
            log.warning("cannot set %s=%s", name, value)


def bound_addresses(name: str = INTERFACE) -> set[str]:
    """The addresses on kube-ipvs0 now (none if it does not exist); nothing is created."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return set()
        return _addresses(ipr, found[0])


def _addresses(ipr: IPRoute, index: int) -> set[str]:
    out: set[str] = set()
    for msg in ipr.get_addr(index=index):
        addr = msg.get_attr("IFA_ADDRESS")
        if isinstance(addr, str):
            out.add(str(ipaddress.ip_address(addr)))
    return out


class DummyInterface:
    """kube-ipvs0: created once (down, as upstream: its addresses are local without it
    carrying traffic), its addresses kept equal to what the engines want."""

    def __init__(self, name: str = INTERFACE) -> None:
        self.name = name
        self._ipr = IPRoute()
        try:
            found = self._ipr.link_lookup(ifname=name)
            if not found:
                self._ipr.link("add", ifname=name, kind="dummy")
                found = self._ipr.link_lookup(ifname=name)
            self.index: int = found[0]
        except (NetlinkError, IndexError) as e:
            self._ipr.close()
            raise ApplyError(f"cannot create the {name} interface: {e}", op="ipvs") from e

    def addresses(self) -> set[str]:
        return _addresses(self._ipr, self.index)

    def sync(self, want: Iterable[str]) -> tuple[int, int]:
        """Bind what is missing, unbind what is no longer wanted: (bound, unbound). An
        address that cannot be changed is logged and retried by the next sync."""
        wanted = {str(ipaddress.ip_address(a)) for a in want}
        have = self.addresses()
        bound = unbound = 0
        for addr in sorted(wanted - have):
            if self._change("add", addr):
                bound += 1
        for addr in sorted(have - wanted):
            if self._change("del", addr):
                unbound += 1
        return bound, unbound

    def _change(self, op: str, addr: str) -> bool:
        prefix = 32 if ipaddress.ip_address(addr).version == 4 else 128
        try:
            self._ipr.addr(op, index=self.index, address=addr, prefixlen=prefix)
        except NetlinkError as e:
            log.error("%s: cannot %s %s: %s", self.name, op, addr, e)
            return False
        return True

    def close(self) -> None:
        self._ipr.close()
