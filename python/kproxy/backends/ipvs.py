"""The ipvs mode around its engine (``rust/src/ipvs/``): the kube-ipvs0 dummy interface that
makes Service addresses local (so IPVS sees their packets), the sysctls the mode needs, its
config section, and the tools that read IPVS, the ipsets and the companion rules.

The engine programs IPVS, the ipsets and the iptables rules; it reports which addresses
kube-ipvs0 must hold, and this module binds and unbinds them with pyroute2.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from collections.abc import Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from kproxy import _core, metrics, netns, rulediff, wire
from kproxy.backends.base import ModeBackend
from kproxy.backends.proxier import programmed
from kproxy.config import ProxyConfig
from kproxy.control import Controller
from kproxy.errors import ApplyError, KproxyError, apply_error
from kproxy.model import Family, ipvs_scheduler_of
from kproxy.netinfo import iptables_families, local_addresses, set_sysctl, sysctl

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
            raise apply_error(
                f"cannot create the {name} interface: {e}",
                op="ipvs dummy interface",
                errno=e.code if isinstance(e, NetlinkError) else None,
            ) from e

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


class IpvsMode(ModeBackend):
    name = "ipvs"

    def __init__(self, cfg: ProxyConfig) -> None:
        super().__init__(cfg)
        # kube-ipvs0 and the sysctls are set up after the first sync succeeds, so a kernel
        # without ip_vs is refused before anything of the mode is on the node.
        self.dummy: DummyInterface | None = None

    def families(self) -> list[Family]:
        return iptables_families()

    def host_addresses(self) -> list[str]:
        # NodePorts are served on this machine's addresses (kube-ipvs0's excluded), also
        # when only rendering or tracing, so both show what this node would program.
        on_dummy = bound_addresses()
        return [a for a in local_addresses() if a not in on_dummy]

    def configure(
        self,
        config: wire.EngineConfig,
        family: Family,
        backend: wire.BackendKind,
        host_addrs: Sequence[str] | None,
    ) -> None:
        config["ipvs"] = ipvs_engine_config(self.cfg, host_addrs)

    def init_node(self) -> None:
        set_sysctls(self.cfg.ipvs_strict_arp)

    def after_sync(
        self,
        engines: Mapping[Family, _core.Engine],
        reports: Mapping[Family, _core.SyncReport],
        full: bool,
    ) -> None:
        if not reports or not (full or any(r.wrote for r in reports.values())):
            return
        # After the engines: IPVS, its ipsets and rules are in place for each address.
        if self.dummy is None:
            set_sysctls(self.cfg.ipvs_strict_arp)
            self.dummy = DummyInterface()
        want = [a for e in engines.values() for a in e.ipvs_addresses()]
        bound, unbound = self.dummy.sync(want)
        if bound or unbound:
            log.info("%s: %d addresses bound, %d unbound", self.dummy.name, bound, unbound)

    def close(self) -> None:
        if self.dummy is not None:
            self.dummy.close()

    def start_note(self) -> str:
        return (
            "the ipvs mode is deprecated upstream (KEP-5495, refused from 1.40); kproxy "
            "keeps it (docs/ipvs.md), and `kproxy doctor` lists what depends on it"
        )

    def register_metrics(self, registry: CollectorRegistry) -> None:
        self._restore_failures = metrics.restore_failures(registry)

    def count_failure(self, e: ApplyError, family: Family, full: bool) -> None:
        # Upstream's ipvs mode counts only its companion rules' restores.
        if e.op.endswith("tables-restore"):
            self._restore_failures.labels(ip_family=family).inc()

    def sync_line(self, r: _core.SyncReport) -> str:
        line = super().sync_line(r)
        if not isinstance(m := r.mode, _core.IpvsReport):
            return line
        rules = "rules rewritten" if m.rules_written else "rules unchanged"
        return f"{line}; {m.operations} IPVS operations, {m.set_members} set members, {rules}"

    def render_header(self, family: Family) -> str:
        return (
            f"# ipvs for {family}: virtual servers (address -> real servers), then the "
            "iptables-restore --noflush input and the ipset restore input"
        )

    def trace_live(self, packet: _core.Packet, family: Family) -> _core.Trace:
        return _core.trace_ipvs_live(packet)

    def differences(self, family: Family, c: Controller) -> list[rulediff.Difference]:
        """Virtual servers and set members compared line by line, and the companion rules as
        the kernel prints them (loaded into a scratch network namespace, connected to
        nothing, then read back) against this node's."""
        engine = programmed(self.cfg, c, (family,)).engines[family]
        lines, rules, sets = engine.ipvs_parts()
        out = rulediff.line_differences("ipvs", lines, _core.ipvs_live_lines(family))
        tool = "iptables-restore" if family == "IPv4" else "ip6tables-restore"
        with netns.scratch() as ns:
            for argv, text in ((["ipset", "restore"], sets), ([tool, "--noflush"], rules)):
                r = subprocess.run(
                    ["ip", "netns", "exec", ns, *argv],
                    input=text, capture_output=True, text=True, timeout=300, check=False,
                )  # fmt: skip
                if r.returncode != 0:
                    raise KproxyError(
                        f"cannot load the wanted rules ({argv[0]}): {r.stderr.strip()}"
                    )
            want = rulediff.save(family, ns)
        return out + rulediff.differences(want, rulediff.save(family))


def ipvs_engine_config(cfg: ProxyConfig, host_addrs: Sequence[str] | None) -> wire.IpvsConfig:
    """The ipvs section of an engine's configuration. `host_addrs`: the node's addresses
    outside kube-ipvs0 (an external IP among them is never bound there, nor fenced)."""
    return {
        "scheduler": ipvs_scheduler_of(cfg.ipvs_scheduler),
        "exclude_cidrs": list(cfg.ipvs_exclude_cidrs),
        "tcp_timeout_s": round(cfg.ipvs_tcp_timeout),
        "tcp_fin_timeout_s": round(cfg.ipvs_tcp_fin_timeout),
        "udp_timeout_s": round(cfg.ipvs_udp_timeout),
        "host_ips": list(host_addrs or ()),
    }
