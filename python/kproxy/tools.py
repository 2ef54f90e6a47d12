"""What ``kproxy render``, ``trace`` and ``diff`` (`kproxy.commands`) and the API build on:
the cluster as the daemon would see it, and the rules kproxy would program from it.

They use the daemon's own code paths - the same sources, controller and engines - with the
engines on their in-memory kernel, so what they show is exactly what the daemon would program.
``trace --live`` reads the rules actually in this node's kernel instead.
"""

from __future__ import annotations

import ipaddress
import threading
from typing import Any

from urllib3.exceptions import HTTPError

from kproxy import _core
from kproxy.backends import for_mode
from kproxy.backends.proxier import Proxier, programmed
from kproxy.config import ProxyConfig
from kproxy.control import Controller
from kproxy.errors import ApiConnectionError, ConfigError
from kproxy.k8s import informer
from kproxy.k8s.client import ClientFactory
from kproxy.model import Family, Origin, Protocol, TraceReason, protocol_of
from kproxy.netinfo import local_addresses
from kproxy.rulediff import Difference
from kproxy.sources.manifests import ManifestSource

FAMILIES: tuple[Family, ...] = ("IPv4", "IPv6")


class _Collect:
    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def list_page(self, resource: str, objects: list[dict[str, Any]], first: bool) -> None:
        self.controller.list_page(resource, objects, first)

    def list_done(self, resource: str) -> None:
        self.controller.list_done(resource)

    def event(self, resource: str, kind: str, obj: dict[str, Any]) -> None:
        pass


def snapshot(cfg: ProxyConfig) -> Controller:
    """The cluster state as the daemon would see it right now (listed once, not watched)."""
    c = Controller.for_config(cfg)
    if cfg.manifests is not None:
        ManifestSource(cfg.manifests, c.replace).load()
        return c
    factory = ClientFactory(cfg.kubeconfig, cfg.master)
    factory.check()
    sink = _Collect(c)
    listed = [informer.services(), informer.endpoint_slices(), informer.node(cfg.node_name)]
    if c.watch_service_cidrs:
        listed.append(informer.service_cidrs())
    for res in listed:
        # One list per resource, through the informer's own list path.
        inf = informer.Informer(res, factory, sink, threading.Event())
        try:
            inf._list()
        except (OSError, HTTPError, informer.ApiStatusError, informer.MalformedReply) as e:
            if inf.unserved(e):
                continue  # an optional resource this cluster does not serve us
            server = factory.get().host
            cause = getattr(e, "reason", None) or e
            raise ApiConnectionError(f"API server {server}", f"cannot list: {cause}") from None
    return c


def rendered(cfg: ProxyConfig) -> Proxier:
    return programmed(cfg, snapshot(cfg))


def parse_destination(dst: str) -> tuple[str, int, Protocol]:
    """``IP:PORT[/PROTO]`` or ``[IPv6]:PORT[/PROTO]`` -> (ip, port, protocol)."""
    rest, _, spelled = dst.partition("/")
    proto = protocol_of((spelled or "TCP").upper())
    if proto is None:
        raise ConfigError("DST", f"unknown protocol {spelled!r}")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError("DST", f"{dst!r} is not IP:PORT[/PROTO]")
    host = host.strip("[]")
    try:
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        raise ConfigError("DST", f"{host!r} is not an IP address") from None
    return ip, int(port), proto


def trace_command(
    cfg: ProxyConfig, src: str, dst: str, *, from_node: bool, live: bool, node_ips: list[str]
) -> int:
    ip, port, proto = parse_destination(dst)
    try:
        src_ip = str(ipaddress.ip_address(src))
    except ValueError:
        raise ConfigError("SRC", f"{src!r} is not an IP address") from None
    family: Family = "IPv4" if ipaddress.ip_address(ip).version == 4 else "IPv6"
    if ipaddress.ip_address(src_ip).version != ipaddress.ip_address(ip).version:
        raise ConfigError("SRC", "source and destination are of different IP families")
    origin: Origin = "local" if from_node else "external"
    if live:
        locals_ = node_ips or local_addresses()
    else:
        c = snapshot(cfg)
        locals_ = node_ips or (list(c.node.addresses) if c.node else local_addresses())
    packet = _core.Packet(src_ip, ip, proto, port, origin, locals_)
    if live:
        t = for_mode(cfg).trace_live(packet, family)
    else:
        t = programmed(cfg, c, (family,)).engines[family].trace(packet)
    print(explain(t, src_ip, dst, from_node, live))
    return 0


# What a trace's reason means, for people.
REASONS: dict[TraceReason, str] = {
    "no-endpoints": "the Service has no endpoints",
    "no-local-endpoints": "the Service has no local endpoints (Local traffic policy)",
    "source-range": "the source is not in the Service's loadBalancerSourceRanges",
    "no-service-port": "no Service on this port of the address",
    "unallocated-cluster-ip": "no Service holds this address of the cluster's service CIDRs",
}


def explain(t: _core.Trace, src: str, dst: str, from_node: bool, live: bool) -> str:
    where = "sent by the node itself" if from_node else "arriving from the network"
    lines = [
        f"{src} -> {dst} ({where}; {'kernel rules' if live else 'rules kproxy would program'})"
    ]
    if t.dnat:
        many = " (one per connection, at random)" if len(t.dnat) > 1 else ""
        lines.append(f"  DNAT to:     {', '.join(t.dnat)}{many}")
    else:
        lines.append("  DNAT to:     nothing (no Service matches, or none is usable)")
    lines.append(f"  masquerade:  {'yes' if t.masquerade else 'no'}")
    reason = REASONS.get(t.reason, t.reason) if t.reason else ""
    verdict = t.verdict or "no verdict from kproxy's rules (the chains' policies decide)"
    lines.append(f"  verdict:     {verdict}{f' ({reason})' if reason else ''}")
    lines.append("  rules matched:")
    lines += [f"    {m}" for m in t.matched] or ["    (none)"]
    return "\n".join(lines)


# -- what kproxy diff --live and the API compare -------------------------------------------


def live_differences(cfg: ProxyConfig, family: Family) -> list[Difference]:
    """What this node's kernel holds in ``family`` against what kproxy wants for the cluster
    ``cfg`` points at, in ``cfg.mode`` (root)."""
    mode = for_mode(cfg)
    if not mode.kernel_rules:
        raise ConfigError("--proxy-mode", f"diff reads kernel rules; not {cfg.mode}")
    return mode.differences(family, snapshot(cfg))
