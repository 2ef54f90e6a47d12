"""Operator tools: ``kproxy render`` and ``kproxy trace``.

Both use the daemon's own code paths - the same sources, controller and engines - with the
engines on their in-memory kernel, so what they show is exactly what the daemon would program.
``trace --live`` reads the rules actually in this node's kernel instead.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import threading
from typing import Any

from kproxy import _core
from kproxy.backends.iptables import IptablesProxier
from kproxy.config import ProxyConfig
from kproxy.control import Controller
from kproxy.errors import ConfigError, KproxyError
from kproxy.k8s import informer
from kproxy.k8s.client import ClientFactory
from kproxy.model import Family
from kproxy.netinfo import local_addresses
from kproxy.sources.manifests import ManifestSource

FAMILIES: tuple[Family, ...] = ("IPv4", "IPv6")


class _Collect:
    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def replace(self, resource: str, objects: list[dict[str, Any]]) -> None:
        self.controller.replace(resource, objects)

    def event(self, resource: str, kind: str, obj: dict[str, Any]) -> None:
        pass


def snapshot(cfg: ProxyConfig) -> Controller:
    """The cluster state as the daemon would see it right now (listed once, not watched)."""
    c = Controller(cfg.node_name, lambda: None, wait_for_node=False)
    if cfg.manifests is not None:
        ManifestSource(cfg.manifests, c.replace).load()
        return c
    factory = ClientFactory(cfg.kubeconfig, cfg.master)
    sink = _Collect(c)
    for res in (informer.services(), informer.endpoint_slices(), informer.node(cfg.node_name)):
        # One list per resource, through the informer's own list path.
        informer.Informer(res, factory, sink, threading.Event())._list()
    return c


def rendered(cfg: ProxyConfig) -> IptablesProxier:
    c = snapshot(cfg)
    proxier = IptablesProxier(cfg, FAMILIES, c.node, backend="fake")
    proxier.sync(c.drain(), True)
    return proxier


def render_command(cfg: ProxyConfig) -> int:
    for fam, text in rendered(cfg).render().items():
        print(f"# {cfg.mode} rules for {fam} (iptables-restore --noflush input)")
        print(text, end="")
    return 0


def parse_destination(dst: str) -> tuple[str, int, str]:
    """``IP:PORT[/PROTO]`` or ``[IPv6]:PORT[/PROTO]`` -> (ip, port, protocol)."""
    rest, _, proto = dst.partition("/")
    proto = (proto or "TCP").upper()
    if proto not in ("TCP", "UDP", "SCTP"):
        raise ConfigError("DST", f"unknown protocol {proto!r}")
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
    if live:
        tool = "iptables-save" if family == "IPv4" else "ip6tables-save"
        try:
            rules = subprocess.run(
                [tool], capture_output=True, text=True, check=True, timeout=120
            ).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise KproxyError(f"cannot read the kernel's rules with {tool}: {e}") from None
        locals_ = node_ips or local_addresses()
    else:
        c = snapshot(cfg)
        proxier = IptablesProxier(cfg, (family,), c.node, backend="fake")
        proxier.sync(c.drain(), True)
        rules = proxier.engines[family].dump()
        locals_ = node_ips or (list(c.node.addresses) if c.node else local_addresses())
    origin = "local" if from_node else "external"
    t = _core.trace_iptables(rules, src_ip, ip, proto, port, origin, locals_)
    print(explain(t, src_ip, dst, from_node, live))
    return 0


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
    reason = ""
    for m in t.matched:
        if '"' in m and (
            "has no endpoints" in m or "has no local endpoints" in m or "not accepted" in m
        ):
            reason = m.split('"')[1]
    verdict = t.verdict or "no verdict from kproxy's rules (the chains' policies decide)"
    lines.append(f"  verdict:     {verdict}{f' ({reason})' if reason else ''}")
    lines.append("  rules matched:")
    lines += [f"    {m}" for m in t.matched] or ["    (none)"]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: kproxy render | kproxy trace")
