"""The userspace mode around its engine (``rust/src/userspace/``, on the forwarder of
``rust/src/forward/``): the listeners' addresses and timeouts, the forwarder's counters as
metrics, and what the mode cannot be asked (its connections end at kproxy, so there are no
kernel rules to trace or diff, and no conntrack entries of its own)."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from kproxy import _core, wire
from kproxy.backends.base import ModeBackend
from kproxy.config import ProxyConfig, parse_port_range
from kproxy.model import Family
from kproxy.netinfo import has_net_admin

if TYPE_CHECKING:
    from kproxy.metrics import Metrics

log = logging.getLogger(__name__)

# Listener failures logged per sync at most (the rest are counted in one line).
LISTEN_ERRORS_LOGGED = 20

# nf_conntrack_tcp_timeout_established's default: what a timeout of 0 ("leave the kernel's")
# means for the userspace mode's relays.
KERNEL_TCP_ESTABLISHED = 5 * 24 * 3600.0


class UserspaceMode(ModeBackend):
    name = "userspace"
    conntrack = False
    many_descriptors = True
    kernel_rules = False

    def __init__(self, cfg: ProxyConfig) -> None:
        super().__init__(cfg)
        # The listener failures of the last sync, per family (each is logged once).
        self._listen_errors: dict[Family, set[str]] = {}

    def families(self) -> list[Family]:
        """The family of --bind-address (no kernel tools needed)."""
        return ["IPv4" if ipaddress.ip_address(self.cfg.bind_address).version == 4 else "IPv6"]

    def configure(
        self,
        config: wire.EngineConfig,
        family: Family,
        backend: wire.BackendKind,
        host_addrs: Sequence[str] | None,
    ) -> None:
        cfg = self.cfg
        config["userspace"] = {
            # NodePort listeners: --bind-address, when it is of this family...
            "listen_addresses": listen_addresses(cfg, family),
            # ...and, with NET_ADMIN, redirect rules for ClusterIPs, externalIPs and LB IPs.
            "portals": backend == "kernel" and has_net_admin(),
            "tcp_idle_timeout_ms": round(
                (cfg.conntrack_tcp_established_timeout or KERNEL_TCP_ESTABLISHED) * 1000
            ),
            "udp_idle_timeout_ms": max(1, round(cfg.udp_idle_timeout * 1000)),
            "proxy_port_range": parse_port_range("--proxy-port-range", cfg.proxy_port_range),
        }

    def watch(self, metrics: Metrics, engines: Mapping[Family, _core.Engine]) -> None:
        metrics.watch_forwarder(lambda: {fam: e.forward_stats() for fam, e in engines.items()})

    def record_sync(self, family: Family, r: _core.SyncReport, seconds: float) -> None:
        if isinstance(r.mode, _core.UserspaceReport):
            self._log_listen_errors(family, r.mode.listen_errors)

    def _log_listen_errors(self, family: Family, errors: list[str]) -> None:
        """Log each listener failure when it first happens (it is retried every sync, and
        30,000 Services past the descriptor budget would otherwise log 30,000 lines a sync)."""
        seen = self._listen_errors.get(family, set())
        new = [e for e in errors if e not in seen]
        for err in new[:LISTEN_ERRORS_LOGGED]:
            log.error("%s (the other Services are unaffected; retried next sync)", err)
        if len(new) > LISTEN_ERRORS_LOGGED:
            log.error("... and %d more listeners could not be opened (%d in all)",
                      len(new) - LISTEN_ERRORS_LOGGED, len(errors))  # fmt: skip
        self._listen_errors[family] = set(errors)

    def sync_line(self, r: _core.SyncReport) -> str:
        line = super().sync_line(r)
        if not isinstance(m := r.mode, _core.UserspaceReport):
            return line
        return f"{line}; {m.opened + m.changed} listeners opened or re-pointed, {m.closed} closed"

    def render_header(self, family: Family) -> str:
        return f"# userspace listeners for {family} (protocol, address -> endpoints)"


def listen_addresses(cfg: ProxyConfig, family: Family) -> list[str]:
    """The NodePort listeners' addresses in ``family``: --bind-address, when it is of it."""
    ip = ipaddress.ip_address(cfg.bind_address)
    return [str(ip)] if (ip.version == 4) == (family == "IPv4") else []
