"""The nftables mode around its engine (``rust/src/nftables/``): NodePorts on the node's
primary addresses by default, its failure counters and sync line, and the tools that read
the kernel's table through nft's JSON."""

from __future__ import annotations

import ipaddress
import logging
import shutil
import subprocess
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kproxy import _core, metrics, wire
from kproxy.backends.base import ModeBackend
from kproxy.backends.proxier import programmed
from kproxy.config import admits_loopback
from kproxy.errors import ApplyError, KproxyError
from kproxy.model import Family, NodeInfo
from kproxy.rulediff import Difference, line_differences

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from kproxy.control import Controller

log = logging.getLogger(__name__)

NFT_FAMILIES: tuple[tuple[Family, str], ...] = (("IPv4", "ip"), ("IPv6", "ip6"))


def nft_families() -> list[Family]:
    """The families whose nftables tables nft can list here (no iptables tool is needed)."""
    if shutil.which("nft") is None:
        return []
    out: list[Family] = []
    for family, nft_family in NFT_FAMILIES:
        try:
            ok = subprocess.run(
                ["nft", "list", "tables", nft_family],
                capture_output=True, timeout=15, check=False,
            ).returncode == 0  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            out.append(family)
    return out


LOCALHOST_GATE = "KubeProxyNFTablesLocalhostNodePorts"


class NftablesMode(ModeBackend):
    name = "nftables"
    service_cidrs = True

    def configure(
        self,
        config: wire.EngineConfig,
        family: Family,
        backend: wire.BackendKind,
        host_addrs: Sequence[str] | None,
    ) -> None:
        # KEP-6032: TCP NodePorts on loopback, when nodePortAddresses name it explicitly.
        config["nftables"] = {"localhost_nodeports": self.localhost_nodeports(family)}

    def localhost_nodeports(self, family: Family) -> bool:
        return self.cfg.gate(LOCALHOST_GATE) and admits_loopback(
            self.cfg.nodeport_addresses, 4 if family == "IPv4" else 6
        )

    def start_note(self) -> str | None:
        named = any(admits_loopback(self.cfg.nodeport_addresses, v) for v in (4, 6))
        if named and not self.cfg.gate(LOCALHOST_GATE):
            return (
                f"nodePortAddresses name loopback but {LOCALHOST_GATE} is off: no NodePorts "
                "on loopback"
            )
        if named:
            return (
                "localhost NodePorts: TCP NodePorts with endpoints are served on loopback by a "
                "userspace proxy (UDP and SCTP are not, as upstream)"
            )
        return None

    def families(self) -> list[Family]:
        return nft_families()

    def default_nodeport_addresses(self, family: Family, node: NodeInfo | None) -> tuple[str, ...]:
        # Upstream's nftables mode answers NodePorts on the node's primary IPs by default.
        version = 4 if family == "IPv4" else 6
        if node is not None and any(
            ipaddress.ip_address(a).version == version for a in node.addresses
        ):
            return ("primary",)
        log.info("nftables: the Node has no %s address; NodePorts on every one", family)
        return ()

    def register_metrics(self, registry: CollectorRegistry) -> None:
        self._durations = metrics.SyncDurations(registry)
        self._sync_failures = metrics.counter(
            registry,
            "sync_proxy_rules_nftables_sync_failures",
            "Cumulative nftables sync failures",
        )
        self._cleanup_failures = metrics.counter(
            registry,
            "sync_proxy_rules_nftables_cleanup_failures",
            "Cumulative nftables cleanup failures",
        )
        self._localhost_errors: dict[Family, list[str]] = {}
        if not self.cfg.gate(LOCALHOST_GATE):
            return
        self._localhost_listeners = metrics.gauge(
            registry,
            "nftables_localhost_nodeport_listeners",
            "Localhost NodePort listeners open",
        )
        self._localhost_failures = metrics.counter(
            registry,
            "nftables_localhost_nodeport_listener_creation_failures",
            "Cumulative localhost NodePort listeners that could not be opened",
        )

    def record_sync(self, family: Family, r: _core.SyncReport, seconds: float) -> None:
        self._durations.observe(family, r.full, seconds)
        if not isinstance(m := r.mode, _core.NftablesReport):
            return
        if m.cleanup_failed:
            self._cleanup_failures.labels(ip_family=family).inc()
        if not self.localhost_nodeports(family):
            return
        self._localhost_listeners.labels(ip_family=family).set(m.localhost_listeners)
        if m.localhost_errors:
            self._localhost_failures.labels(ip_family=family).inc(len(m.localhost_errors))
        # Each sync tries the failed listeners again: say so when the failures change only.
        if m.localhost_errors != self._localhost_errors.get(family, []):
            for e in m.localhost_errors:
                log.warning("%s localhost NodePort: %s", family, e)
            self._localhost_errors[family] = list(m.localhost_errors)

    def count_failure(self, e: ApplyError, family: Family, full: bool) -> None:
        self._sync_failures.labels(ip_family=family).inc()

    def leftovers_removed(self, r: _core.SyncReport) -> int:
        return r.mode.stale_chains_deleted if isinstance(r.mode, _core.NftablesReport) else 0

    def sync_line(self, r: _core.SyncReport) -> str:
        line = super().sync_line(r)
        if not isinstance(m := r.mode, _core.NftablesReport):
            return line
        return (
            f"{line}; wrote {m.chains_written} chains, +{m.elements_added} "
            f"-{m.elements_deleted} elements, {m.elements_total} held"
        )

    def render_header(self, family: Family) -> str:
        return f"# nftables rules for {family} (nft -f input)"

    def trace_live(self, packet: _core.Packet, family: Family) -> _core.Trace:
        table = _core.NftTable.live(family)
        if not table.exists:
            raise KproxyError(f"no kproxy nftables table for {family} in this kernel")
        return table.trace(packet)

    def differences(self, family: Family, c: Controller) -> list[Difference]:
        return nft_differences(family, self.desired(family, c), _core.NftTable.live(family).lines())

    def desired(self, family: Family, c: Controller) -> list[str]:
        table = programmed(self.cfg, c, (family,)).engines[family].nft_table()
        return table.lines() if table is not None else []


def nft_differences(family: Family, want: list[str], have: list[str]) -> list[Difference]:
    """Line-wise differences between two ``NftTable.lines()`` listings."""
    table = f"{'ip' if family == 'IPv4' else 'ip6'} kproxy"
    return line_differences(table, want, have, lambda name: name.split(":", 1)[0])
