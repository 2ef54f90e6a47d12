"""The proxier: one Rust engine per IP family, fed the same change set, in any mode. What is
particular to a mode comes from its :class:`~kproxy.backends.base.ModeBackend`."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kproxy import _core, wire
from kproxy.backends import for_mode
from kproxy.backends.base import ModeBackend
from kproxy.config import ProxyConfig, nodeport_cidrs
from kproxy.errors import ApplyError
from kproxy.model import Family, NodeInfo
from kproxy.netinfo import addresses_in, local_addresses, sysctl
from kproxy.tracker import ChangeSet

if TYPE_CHECKING:
    from kproxy.control import Controller

log = logging.getLogger(__name__)


def engine_config(
    cfg: ProxyConfig,
    family: Family,
    node: NodeInfo | None,
    *,
    backend: wire.BackendKind = "kernel",
    local_addrs: Sequence[str] | None = None,
    mode: ModeBackend | None = None,
) -> wire.EngineConfig:
    """The configuration of one family's engine: the shared settings and its mode's section.
    ``local_addrs``: the node's addresses (None: read them)."""
    mode = mode or for_mode(cfg)
    nodeport_ips: list[str] | None = None
    nodeport_addresses = cfg.nodeport_addresses or mode.default_nodeport_addresses(family, node)
    if nodeport_addresses:
        cidrs = nodeport_cidrs(nodeport_addresses)
        addrs = list(local_addrs) if local_addrs is not None else local_addresses()
        nodeport_ips = addresses_in(cidrs, addrs) if cidrs else []
        if "primary" in nodeport_addresses and node is not None:
            nodeport_ips += [a for a in node.addresses if a not in nodeport_ips]
    liberal = (
        cfg.conntrack_tcp_be_liberal or sysctl("net.netfilter.nf_conntrack_tcp_be_liberal") == "1"
    )
    local_cidrs: list[str] = []
    interface: str | None = None
    detect = cfg.detect_local_mode
    if detect == "ClusterCIDR":
        local_cidrs = list(cfg.cluster_cidrs)
    elif detect == "NodeCIDR":
        local_cidrs = list(node.pod_cidrs) if node is not None else []
        if not local_cidrs:
            log.warning("detect-local-mode NodeCIDR: the Node has no podCIDRs; detection is off")
    elif detect == "BridgeInterface":
        interface = cfg.pod_bridge_interface
    elif detect == "InterfaceNamePrefix":
        interface = cfg.pod_interface_name_prefix + "+"
    config: wire.EngineConfig = {
        "family": family,
        "node_name": cfg.node_name,
        "cluster_cidrs": local_cidrs,
        "local_interface": interface,
        "masquerade_all": cfg.masquerade_all,
        "masquerade_bit": cfg.masquerade_bit,
        "nodeport_ips": nodeport_ips,
        "conntrack_tcp_be_liberal": liberal,
        "node_ips": list(node.addresses) if node is not None else [],
        "backend": backend,
        "mode": mode.name,
    }
    mode.configure(config, family, backend, local_addrs)
    return config


def programmed(
    cfg: ProxyConfig, c: Controller, families: Sequence[Family] = ("IPv4", "IPv6")
) -> Proxier:
    """Engines on their in-memory kernel, programmed with everything ``c`` holds."""
    proxier = Proxier(cfg, families, c.node, backend="fake")
    proxier.sync(c.drain(), True)
    return proxier


class Proxier:
    """Programs the node through one core engine per IP family, in the mode of ``cfg``."""

    def __init__(
        self,
        cfg: ProxyConfig,
        families: Sequence[Family],
        node: NodeInfo | None,
        *,
        backend: wire.BackendKind = "kernel",
        mode: ModeBackend | None = None,
    ) -> None:
        """``mode``: the mode's backend to use (its node state lives there); a new one of
        ``cfg.mode`` when not given."""
        self.mode = cfg.mode
        self.backend = mode or for_mode(cfg)
        self._kernel = backend == "kernel"
        host_addrs = self.backend.host_addresses()
        configs = {
            fam: engine_config(
                cfg, fam, node, backend=backend, local_addrs=host_addrs, mode=self.backend
            )
            for fam in families
        }
        self.engines: dict[Family, _core.Engine] = {
            fam: _core.Engine(json.dumps(c)) for fam, c in configs.items()
        }
        if self._kernel:
            self.backend.prepare_node(configs)

    def sync(
        self, changes: ChangeSet, full: bool, retry_refused: bool = False
    ) -> dict[Family, _core.SyncReport]:
        """Program every family. Blocking (run it in a thread). Raises the first ApplyError
        after every family had its try, so one family's failure never holds the other back.
        ``retry_refused``: try the Services the kernel refused again (periodic syncs)."""
        data = changes.to_json()
        reports: dict[Family, _core.SyncReport] = {}
        failures: list[ApplyError] = []
        for fam, engine in self.engines.items():
            try:
                reports[fam] = engine.sync(data, full, retry_refused)
            except ApplyError as e:
                log.error("%s %s sync failed: %s", self.mode, fam, e)
                failures.append(e)
        if self._kernel:
            self.backend.after_sync(self.engines, reports, full)
        if failures:
            raise failures[0]
        return reports

    def close(self) -> None:
        """Release the node handles (the kernel's rules stay, as on SIGTERM)."""
        self.backend.close()

    def canary_intact(self) -> bool:
        """Whether every family's canary chains still exist (blocking)."""
        try:
            return all(e.canary_intact() for e in self.engines.values())
        except ApplyError as e:
            log.warning("cannot check the canary chains: %s", e)
            return False

    def render(self) -> dict[Family, str]:
        return {fam: e.render() for fam, e in self.engines.items()}
