"""The iptables proxier: one Rust engine per IP family, fed the same change set."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from kproxy import _core
from kproxy.config import ProxyConfig
from kproxy.errors import ApplyError
from kproxy.model import Family, NodeInfo
from kproxy.netinfo import addresses_in, local_addresses, sysctl
from kproxy.tracker import ChangeSet

log = logging.getLogger(__name__)


def engine_config(
    cfg: ProxyConfig,
    family: Family,
    node: NodeInfo | None,
    *,
    backend: str = "kernel",
    local_addrs: Sequence[str] | None = None,
) -> dict[str, object]:
    """The JSON configuration of one family's engine."""
    nodeport_ips: list[str] | None = None
    if cfg.nodeport_addresses:
        cidrs = tuple(a for a in cfg.nodeport_addresses if a != "primary")
        addrs = list(local_addrs) if local_addrs is not None else local_addresses()
        nodeport_ips = addresses_in(cidrs, addrs) if cidrs else []
        if "primary" in cfg.nodeport_addresses and node is not None:
            nodeport_ips += [a for a in node.addresses if a not in nodeport_ips]
    liberal = (
        cfg.conntrack_tcp_be_liberal or sysctl("net.netfilter.nf_conntrack_tcp_be_liberal") == "1"
    )
    return {
        "family": family,
        "node_name": cfg.node_name,
        "cluster_cidrs": list(cfg.cluster_cidrs),
        "masquerade_all": cfg.masquerade_all,
        "masquerade_bit": cfg.masquerade_bit,
        "nodeport_ips": nodeport_ips,
        "conntrack_tcp_be_liberal": liberal,
        "node_ips": list(node.addresses) if node is not None else [],
        "backend": backend,
    }


class IptablesProxier:
    mode = "iptables"

    def __init__(
        self,
        cfg: ProxyConfig,
        families: Sequence[Family],
        node: NodeInfo | None,
        *,
        backend: str = "kernel",
    ) -> None:
        self.engines: dict[Family, _core.Engine] = {
            fam: _core.Engine(json.dumps(engine_config(cfg, fam, node, backend=backend)))
            for fam in families
        }

    def sync(self, changes: ChangeSet, full: bool) -> dict[Family, _core.SyncReport]:
        """Program every family. Blocking (run it in a thread). Raises the first ApplyError
        after every family had its try, so one family's failure never holds the other back."""
        data = changes.to_json()
        reports: dict[Family, _core.SyncReport] = {}
        failures: list[ApplyError] = []
        for fam, engine in self.engines.items():
            try:
                reports[fam] = engine.sync(data, full)
            except ApplyError as e:
                log.error("%s %s sync failed: %s", self.mode, fam, e)
                failures.append(e)
        if failures:
            raise failures[0]
        return reports

    def canary_intact(self) -> bool:
        """Whether every family's canary chains still exist (blocking)."""
        try:
            return all(e.canary_intact() for e in self.engines.values())
        except ApplyError as e:
            log.warning("cannot check the canary chains: %s", e)
            return False

    def render(self) -> dict[Family, str]:
        return {fam: e.render() for fam, e in self.engines.items()}
