"""The netfilter proxier (iptables and nftables modes): one Rust engine per IP family, fed the
same change set."""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Sequence

from kproxy import _core, wire
from kproxy.backends.ipvs import DummyInterface, bound_addresses, set_sysctls
from kproxy.config import ProxyConfig, parse_port_range
from kproxy.errors import ApplyError
from kproxy.model import Family, NodeInfo, ipvs_scheduler_of
from kproxy.netinfo import addresses_in, has_net_admin, local_addresses, set_sysctl, sysctl
from kproxy.tracker import ChangeSet

log = logging.getLogger(__name__)


def engine_config(
    cfg: ProxyConfig,
    family: Family,
    node: NodeInfo | None,
    *,
    backend: wire.BackendKind = "kernel",
    local_addrs: Sequence[str] | None = None,
) -> wire.EngineConfig:
    """The configuration of one family's engine: the shared settings and its mode's section."""
    nodeport_ips: list[str] | None = None
    nodeport_addresses = cfg.nodeport_addresses
    if not nodeport_addresses and cfg.mode == "nftables":
        # Upstream's nftables mode answers NodePorts on the node's primary IPs by default.
        version = 4 if family == "IPv4" else 6
        known = node is not None and any(
            ipaddress.ip_address(a).version == version for a in node.addresses
        )
        if known:
            nodeport_addresses = ("primary",)
        else:
            log.info("nftables: the Node has no %s address; NodePorts on every one", family)
    if nodeport_addresses:
        cidrs = tuple(a for a in nodeport_addresses if a != "primary")
        addrs = list(local_addrs) if local_addrs is not None else local_addresses()
        nodeport_ips = addresses_in(cidrs, addrs) if cidrs else []
        if "primary" in nodeport_addresses and node is not None:
            nodeport_ips += [a for a in node.addresses if a not in nodeport_ips]
    liberal = (
        cfg.conntrack_tcp_be_liberal or sysctl("net.netfilter.nf_conntrack_tcp_be_liberal") == "1"
    )
    local_cidrs: list[str] = []
    interface: str | None = None
    mode = cfg.detect_local_mode
    if mode == "ClusterCIDR":
        local_cidrs = list(cfg.cluster_cidrs)
    elif mode == "NodeCIDR":
        local_cidrs = list(node.pod_cidrs) if node is not None else []
        if not local_cidrs:
            log.warning("detect-local-mode NodeCIDR: the Node has no podCIDRs; detection is off")
    elif mode == "BridgeInterface":
        interface = cfg.pod_bridge_interface
    elif mode == "InterfaceNamePrefix":
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
        "mode": cfg.mode,
    }
    if cfg.mode == "iptables":
        # As upstream, the nftables mode has no localhost NodePorts (no route_localnet).
        config["iptables"] = {
            "localhost_nodeports": cfg.localhost_nodeports and localhost_allowed(cfg)
        }
    elif cfg.mode == "ipvs":
        config["ipvs"] = ipvs_engine_config(cfg, local_addrs)
    elif cfg.mode == "userspace":
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
    return config


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


# nf_conntrack_tcp_timeout_established's default: what a timeout of 0 ("leave the kernel's")
# means for the userspace mode's relays.
KERNEL_TCP_ESTABLISHED = 5 * 24 * 3600.0


def listen_addresses(cfg: ProxyConfig, family: Family) -> list[str]:
    if cfg.mode != "userspace":
        return []
    ip = ipaddress.ip_address(cfg.bind_address)
    return [str(ip)] if (ip.version == 4) == (family == "IPv4") else []


def userspace_families(cfg: ProxyConfig) -> list[Family]:
    """The families the userspace mode serves: the one of --bind-address (no kernel tools)."""
    return ["IPv4" if ipaddress.ip_address(cfg.bind_address).version == 4 else "IPv6"]


def localhost_allowed(cfg: ProxyConfig) -> bool:
    """Whether nodePortAddresses admit loopback (unset means every address)."""
    if not cfg.nodeport_addresses:
        return True
    return any(
        a != "primary" and ipaddress.ip_address("127.0.0.1") in ipaddress.ip_network(a)
        for a in cfg.nodeport_addresses
    )


class Proxier:
    """Programs the node through one core engine per IP family, in any mode (`cfg.mode`):
    iptables or nftables rules, or the userspace forwarder's listeners."""

    def __init__(
        self,
        cfg: ProxyConfig,
        families: Sequence[Family],
        node: NodeInfo | None,
        *,
        backend: wire.BackendKind = "kernel",
    ) -> None:
        self.mode = cfg.mode
        # ipvs: kube-ipvs0 and the sysctls are set up after the first sync succeeds, so a
        # kernel without ip_vs is refused before anything of the mode is on the node.
        self.dummy: DummyInterface | None = None
        self._ipvs_node = cfg.mode == "ipvs" and backend == "kernel"
        self._strict_arp = cfg.ipvs_strict_arp
        host_addrs: list[str] | None = None
        if cfg.mode == "ipvs":
            # NodePorts are served on this machine's addresses (kube-ipvs0's excluded), also
            # when only rendering or tracing, so both show what this node would program.
            on_dummy = bound_addresses()
            host_addrs = [a for a in local_addresses() if a not in on_dummy]
        configs = {
            fam: engine_config(cfg, fam, node, backend=backend, local_addrs=host_addrs)
            for fam in families
        }
        self.engines: dict[Family, _core.Engine] = {
            fam: _core.Engine(json.dumps(c)) for fam, c in configs.items()
        }
        v4 = configs["IPv4"].get("iptables") if "IPv4" in configs else None
        if backend == "kernel" and v4 is not None and v4.get("localhost_nodeports"):
            # Without route_localnet the kernel drops 127.0.0.0/8 traffic that is routed
            # elsewhere after DNAT; KUBE-FIREWALL drops the martians this would let in.
            localnet = "net.ipv4.conf.all.route_localnet"
            if sysctl(localnet) == "1":
                pass
            elif set_sysctl(localnet, "1"):
                log.info("set %s=1 for localhost NodePorts", localnet)
            else:
                log.warning("cannot set %s: localhost NodePorts will not work", localnet)

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
                e.family = fam
                failures.append(e)
        if self._ipvs_node and reports and (full or any(r.wrote for r in reports.values())):
            # After the engines: IPVS, its ipsets and rules are in place for each address.
            if self.dummy is None:
                set_sysctls(self._strict_arp)
                self.dummy = DummyInterface()
            want = [a for e in self.engines.values() for a in e.ipvs_addresses()]
            bound, unbound = self.dummy.sync(want)
            if bound or unbound:
                log.info("%s: %d addresses bound, %d unbound", self.dummy.name, bound, unbound)
        if failures:
            raise failures[0]
        return reports

    def close(self) -> None:
        """Release the node handles (the kernel's rules stay, as on SIGTERM)."""
        if self.dummy is not None:
            self.dummy.close()

    def canary_intact(self) -> bool:
        """Whether every family's canary chains still exist (blocking)."""
        try:
            return all(e.canary_intact() for e in self.engines.values())
        except ApplyError as e:
            log.warning("cannot check the canary chains: %s", e)
            return False

    def render(self) -> dict[Family, str]:
        return {fam: e.render() for fam, e in self.engines.items()}
