"""The iptables mode around its engine (``rust/src/iptables/``): localhost NodePorts and
their sysctl, the restore failure counters, and the iptables-save based tools."""

from __future__ import annotations

import functools
import json
import logging
import subprocess
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from kproxy import _core, metrics, netns, rulediff, wire
from kproxy.backends.base import ModeBackend
from kproxy.backends.proxier import engine_config
from kproxy.config import ProxyConfig, admits_loopback
from kproxy.errors import ApplyError, KproxyError
from kproxy.model import Family
from kproxy.netinfo import iptables_families, set_sysctl, sysctl

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from kproxy.control import Controller
    from kproxy.metrics import Metrics

log = logging.getLogger(__name__)

ROUTE_LOCALNET = "net.ipv4.conf.all.route_localnet"


class IptablesMode(ModeBackend):
    name = "iptables"

    def families(self) -> list[Family]:
        return iptables_families()

    def configure(
        self,
        config: wire.EngineConfig,
        family: Family,
        backend: wire.BackendKind,
        host_addrs: Sequence[str] | None,
    ) -> None:
        config["iptables"] = {
            "localhost_nodeports": self.cfg.localhost_nodeports and localhost_allowed(self.cfg)
        }

    def prepare_node(self, configs: Mapping[Family, wire.EngineConfig]) -> None:
        section = configs["IPv4"].get("iptables") if "IPv4" in configs else None
        if section is None or not section.get("localhost_nodeports"):
            return
        # Without route_localnet the kernel drops 127.0.0.0/8 traffic that is routed
        # elsewhere after DNAT; KUBE-FIREWALL drops the martians this would let in.
        if sysctl(ROUTE_LOCALNET) == "1":
            pass
        elif set_sysctl(ROUTE_LOCALNET, "1"):
            log.info("set %s=1 for localhost NodePorts", ROUTE_LOCALNET)
        else:
            log.warning("cannot set %s: localhost NodePorts will not work", ROUTE_LOCALNET)

    def init_node(self) -> None:
        if (
            self.cfg.localhost_nodeports
            and localhost_allowed(self.cfg)
            and sysctl(ROUTE_LOCALNET) != "1"
            and not set_sysctl(ROUTE_LOCALNET, "1")
        ):
            log.warning("cannot set %s: localhost NodePorts will not work", ROUTE_LOCALNET)

    def register_metrics(self, registry: CollectorRegistry) -> None:
        self._engines: Mapping[Family, _core.Engine] = {}
        registry.register(metrics.NfacctCollector(self.nfacct_packets))
        self._durations = metrics.SyncDurations(registry)
        self._restore_failures = metrics.restore_failures(registry)
        self._partial_restore_failures = metrics.counter(
            registry,
            "sync_proxy_rules_iptables_partial_restore_failures",
            "Cumulative iptables partial restore failures",
        )
        labels = ("ip_family", "table")
        self._rules_last = metrics.gauge(
            registry,
            "sync_proxy_rules_iptables_last",
            "Number of iptables rules written in the last sync",
            labels,
        )
        self._rules_total = metrics.gauge(
            registry,
            "sync_proxy_rules_iptables_total",
            "Number of iptables rules owned by kube-proxy",
            labels,
        )

    def watch(self, metrics: Metrics, engines: Mapping[Family, _core.Engine]) -> None:
        self._engines = engines

    def nfacct_packets(self) -> dict[str, int]:
        """Each nfacct counter the engines' rules count into, with its packets (the counters
        are the node's: every family reads the same ones)."""
        out: dict[str, int] = {}
        for fam, engine in self._engines.items():
            try:
                counters = engine.nfacct_counters()
            except ApplyError as e:
                log.debug("%s: cannot read the nfacct counters: %s", fam, e)
                continue
            for name, packets in counters:
                if packets is not None:
                    out[name] = packets
        return out

    def record_sync(self, family: Family, r: _core.SyncReport, seconds: float) -> None:
        self._durations.observe(family, r.full, seconds)
        if isinstance(m := r.mode, _core.IptablesReport):
            for e in m.counter_errors:
                log.warning("%s: nfacct counter not created, its rule counts nothing: %s",
                            family, e)  # fmt: skip
            self._rules_last.labels(ip_family=family, table="nat").set(m.nat_rules)
            self._rules_last.labels(ip_family=family, table="filter").set(m.filter_rules)
            self._rules_total.labels(ip_family=family, table="nat").set(m.nat_rules_total)
            self._rules_total.labels(ip_family=family, table="filter").set(m.filter_rules_total)

    def count_failure(self, e: ApplyError, family: Family, full: bool) -> None:
        self._restore_failures.labels(ip_family=family).inc()
        if not full:
            self._partial_restore_failures.labels(ip_family=family).inc()

    def leftovers_removed(self, r: _core.SyncReport) -> int:
        return r.mode.stale_chains_deleted if isinstance(r.mode, _core.IptablesReport) else 0

    def sync_line(self, r: _core.SyncReport) -> str:
        line = super().sync_line(r)
        if not isinstance(m := r.mode, _core.IptablesReport):
            return line
        return (
            f"{line}; wrote {m.chains_written} chains, {m.nat_rules} nat and "
            f"{m.filter_rules} filter rules"
        )

    def trace_live(self, packet: _core.Packet, family: Family) -> _core.Trace:
        tool = "iptables-save" if family == "IPv4" else "ip6tables-save"
        try:
            rules = subprocess.run(
                [tool], capture_output=True, text=True, check=True, timeout=120
            ).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise KproxyError(f"cannot read the kernel's rules with {tool}: {e}") from None
        return _core.trace_iptables(rules, packet)

    def differences(self, family: Family, c: Controller) -> list[rulediff.Difference]:
        return rulediff.differences(self.desired(family, c), rulediff.save(family))

    def desired(self, family: Family, c: Controller) -> rulediff.Tables:
        """What kproxy would program, as the kernel prints it: programmed into a scratch
        network namespace (connected to nothing) by the real engine, then read back."""
        changes = c.drain()
        engine_cfg = json.dumps(
            engine_config(self.cfg, family, c.node, backend="kernel", mode=self)
        )
        with netns.scratch() as ns, netns.NetnsExecutor(ns) as ex:
            engine = ex.call(functools.partial(_core.Engine, engine_cfg))
            ex.call(functools.partial(engine.sync, changes.to_json(), True), timeout=3600)
            return rulediff.save(family, ns)


def localhost_allowed(cfg: ProxyConfig) -> bool:
    """Whether nodePortAddresses admit loopback (unset means every address)."""
    if not cfg.nodeport_addresses:
        return True
    return admits_loopback(cfg.nodeport_addresses, 4)
