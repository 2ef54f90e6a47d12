"""A typed library API for tooling, on the daemon's own code paths.

    from kproxy import api

    cluster = api.Cluster.from_manifests("examples/manifests", node="kproxy-demo",
                                         cluster_cidrs=["10.244.0.0/16"])
    print(cluster.render()["IPv4"])                  # the iptables-restore input
    t = cluster.trace("10.244.4.2", "10.96.0.10", 80, "TCP")
    print(t.dnat, t.verdict, t.masquerade)

Objects go through the same normalization, change tracking and Rust engine as in the daemon;
nothing touches the kernel (the engines keep their rules in memory). ``diff_live`` compares
what kproxy wants with the rules in this node's kernel (root).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from kproxy import _core, rulediff, tools
from kproxy.backends.proxier import Proxier, programmed
from kproxy.config import ProxyConfig, build
from kproxy.control import Controller
from kproxy.model import Family, Origin, Protocol
from kproxy.sources.manifests import ManifestSource

Packet = _core.Packet
Trace = _core.Trace
Difference = rulediff.Difference

_KINDS = {"Service": "services", "EndpointSlice": "endpointslices", "Node": "nodes"}


class Cluster:
    """A set of Services, EndpointSlices and (optionally) this node's Node object."""

    def __init__(self, config: ProxyConfig, objects: Iterable[Mapping[str, Any]] = ()) -> None:
        self.config = config
        self._objects: dict[str, list[dict[str, Any]]] = {r: [] for r in _KINDS.values()}
        self.add(objects)

    @classmethod
    def from_objects(
        cls,
        objects: Iterable[Mapping[str, Any]],
        *,
        node: str = "node",
        cluster_cidrs: Sequence[str] = (),
        **settings: Any,
    ) -> Cluster:
        """Objects as the API returns them (dicts). ``settings`` are :class:`ProxyConfig`
        fields (``masquerade_all=True``, ``nodeport_addresses=("primary",)``, ...)."""
        cfg = build(
            None, {"hostname_override": node, "cluster_cidrs": tuple(cluster_cidrs), **settings}
        )
        return cls(cfg, objects)

    @classmethod
    def from_manifests(
        cls,
        directory: str,
        *,
        node: str = "node",
        cluster_cidrs: Sequence[str] = (),
        **settings: Any,
    ) -> Cluster:
        """Every Service, EndpointSlice and Node in the YAML/JSON files under ``directory``."""
        c = cls.from_objects((), node=node, cluster_cidrs=cluster_cidrs, **settings)
        ManifestSource(directory, c._replace).load()
        return c

    def add(self, objects: Iterable[Mapping[str, Any]]) -> None:
        for o in objects:
            resource = _KINDS.get(str(o.get("kind")))
            if resource is None:
                raise ValueError(f"unsupported kind {o.get('kind')!r}")
            self._objects[resource].append(dict(o))

    def _replace(self, resource: str, objects: list[dict[str, Any]]) -> None:
        self._objects[resource] = objects

    def controller(self) -> Controller:
        """The daemon's controller, fed with these objects."""
        c = Controller.for_config(self.config)
        for resource, objs in self._objects.items():
            c.replace(resource, objs)
        return c

    def proxier(self, families: Sequence[Family] = ("IPv4", "IPv6")) -> Proxier:
        return programmed(self.config, self.controller(), families)

    def render(self) -> dict[Family, str]:
        """The rules per IP family: ``iptables-restore --noflush`` input, or the ``nft -f``
        transaction in the nftables mode."""
        return self.proxier().render()

    def trace(
        self,
        src: str,
        dst: str,
        port: int,
        protocol: Protocol = "TCP",
        *,
        from_node: bool = False,
        node_ips: Sequence[str] = (),
    ) -> Trace:
        """Where the first packet of a connection from ``src`` to ``dst:port`` goes."""
        family: Family = "IPv6" if ":" in dst else "IPv4"
        c = self.controller()
        p = programmed(self.config, c, (family,))
        ips = list(node_ips) or (list(c.node.addresses) if c.node else [])
        origin: Origin = "local" if from_node else "external"
        return p.engines[family].trace(_core.Packet(src, dst, protocol, port, origin, ips))

    def with_settings(self, **settings: Any) -> Cluster:
        """The same objects under another configuration."""
        c = Cluster(replace(self.config, **settings))
        c._objects = {r: list(v) for r, v in self._objects.items()}
        return c


def diff_live(config: ProxyConfig) -> dict[Family, list[Difference]]:
    """Differences between the rules in this node's kernel and what kproxy wants for the
    cluster ``config`` points at, in ``config.mode`` (needs root)."""
    return {f: tools.live_differences(config, f) for f in tools.FAMILIES}
