"""What one mode does around its Rust program: the Python half of ``rust/src/<mode>/``.

Each mode is one subclass in ``backends/<mode>.py``: its section of the engine config, the IP
families it can serve, what it sets up on the node beside the engine, how its failures and
syncs are counted and logged, and how ``render``, ``trace --live`` and ``diff`` read it. The
daemon, the proxier and the tools ask the mode and hold no per-mode branches of their own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

from kproxy import _core, wire
from kproxy.config import ProxyConfig
from kproxy.errors import ApplyError, ConfigError, KproxyError
from kproxy.model import Family, NodeInfo

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from kproxy.control import Controller
    from kproxy.metrics import Metrics
    from kproxy.rulediff import Difference

log = logging.getLogger(__name__)


class ModeBackend:
    """One mode's behaviour around its engines. One instance per proxier (it may hold node
    state, as ipvs's kube-ipvs0 handle)."""

    name: ClassVar[wire.Mode]
    # The kernel modes leave flows in conntrack: the daemon sets conntrack's sysctls and
    # reconciles stale UDP flows after each sync. The userspace mode's connections end at it.
    conntrack: ClassVar[bool] = True
    # Relaying connections costs descriptors (two per connection): raise the open-file limit.
    many_descriptors: ClassVar[bool] = False
    # Programs kernel rules that `trace --live` and `diff` can read back.
    kernel_rules: ClassVar[bool] = True
    # Drops traffic to addresses of the cluster's ServiceCIDRs that no Service holds, so the
    # daemon watches ServiceCIDR objects (upstream: the nftables mode only).
    service_cidrs: ClassVar[bool] = False

    def __init__(self, cfg: ProxyConfig) -> None:
        self.cfg = cfg

    def families(self) -> list[Family]:
        """The IP families this node can serve in this mode (one engine each)."""
        raise NotImplementedError

    def default_nodeport_addresses(self, family: Family, node: NodeInfo | None) -> tuple[str, ...]:
        """nodePortAddresses when none are configured (empty: every local address)."""
        return ()

    def host_addresses(self) -> list[str] | None:
        """The node's addresses the engine config is derived from (None: read them)."""
        return None

    def configure(
        self,
        config: wire.EngineConfig,
        family: Family,
        backend: wire.BackendKind,
        host_addrs: Sequence[str] | None,
    ) -> None:
        """Add this mode's section to one family's engine config."""

    def prepare_node(self, configs: Mapping[Family, wire.EngineConfig]) -> None:
        """Node settings the engines' rules rely on, before the first sync (kernel engines
        only: never for render, trace or dry runs)."""

    def init_node(self) -> None:
        """The mode's own node settings, which the daemon would otherwise make as it runs,
        for ``kube-proxy --init-only``: the daemon's container then needs no privileges for
        them."""

    def after_sync(
        self,
        engines: Mapping[Family, _core.Engine],
        reports: Mapping[Family, _core.SyncReport],
        full: bool,
    ) -> None:
        """Node state that follows each sync, after the engines (kernel engines only)."""

    def close(self) -> None:
        """Release node handles (what is programmed stays, as on SIGTERM)."""

    def start_note(self) -> str | None:
        """A line the daemon logs as it starts in this mode."""
        return None

    def watch(self, metrics: Metrics, engines: Mapping[Family, _core.Engine]) -> None:
        """Register metrics read from the engines on each scrape."""

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Register the metric families only this mode exports (upstream's
        ``RegisterMetrics(mode)``), beside :class:`~kproxy.metrics.Metrics`' common ones."""

    def record_sync(self, family: Family, r: _core.SyncReport, seconds: float) -> None:
        """This mode's metrics after one family's successful sync (``seconds``: the whole
        sync's duration). Called only after :meth:`register_metrics`."""

    def count_failure(self, e: ApplyError, family: Family, full: bool) -> None:
        """Count a refused sync under this mode's metric names."""

    def leftovers_removed(self, r: _core.SyncReport) -> int:
        """Chains an earlier proxy left that this (first) sync removed: a takeover."""
        return 0

    def sync_line(self, r: _core.SyncReport) -> str:
        """What a sync that wrote something did, for the klog V(2) line."""
        return f"{r.service_ports} service ports, {r.endpoints} endpoints"

    def render_header(self, family: Family) -> str:
        """The comment line ``kproxy render`` prints before a family's text."""
        return f"# {self.name} rules for {family} (iptables-restore --noflush input)"

    def trace_live(self, packet: _core.Packet, family: Family) -> _core.Trace:
        """Trace ``packet`` through what this node's kernel holds (root)."""
        raise KproxyError(f"the {self.name} mode has no kernel rules to trace; omit --live")

    def differences(self, family: Family, c: Controller) -> list[Difference]:
        """What this node's kernel holds against what kproxy wants for ``c``'s objects."""
        raise ConfigError("--proxy-mode", f"diff reads kernel rules; not {self.name}")
