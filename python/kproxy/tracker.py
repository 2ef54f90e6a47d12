"""Change trackers: what changed since the last sync, with no-op updates dropped.

A tracker holds the current normalized value of every object and what was last handed to a
sync. ``drain()`` returns only keys whose value now differs from what was handed over, so an
update that changes nothing kproxy uses (a status heartbeat, a label we ignore), or an add
followed by a delete before the next sync, costs nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from kproxy import wire
from kproxy.model import Endpoint, EndpointSlice, NodeInfo, PortEndpoints, Service, ServiceKey

Merged = tuple[PortEndpoints, ...]


@dataclass(frozen=True, slots=True)
class ChangeSet:
    """What one sync hands to the core."""

    services: dict[ServiceKey, Service | None] = field(default_factory=dict)
    endpoints: dict[ServiceKey, Merged] = field(default_factory=dict)
    node: NodeInfo | None = None
    # Every CIDR of the cluster's ServiceCIDR objects, when they changed (None: unchanged).
    service_cidrs: tuple[str, ...] | None = None

    def __bool__(self) -> bool:
        return bool(self.services or self.endpoints or self.node or self.service_cidrs is not None)

    def to_wire(self) -> wire.ChangeSet:
        return {
            "services": [
                {
                    "namespace": k.namespace,
                    "name": k.name,
                    "service": None if v is None else v.to_wire(),
                }
                for k, v in sorted(self.services.items())
            ],
            "endpoints": [
                {"namespace": k.namespace, "name": k.name, "ports": [p.to_wire() for p in v]}
                for k, v in sorted(self.endpoints.items())
            ],
            "node": None if self.node is None else self.node.to_wire(),
            "service_cidrs": None if self.service_cidrs is None else list(self.service_cidrs),
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_wire(), separators=(",", ":")).encode()


class ServiceTracker:
    def __init__(self) -> None:
        self._current: dict[ServiceKey, Service] = {}
        self._handed: dict[ServiceKey, Service] = {}
        self._dirty: set[ServiceKey] = set()

    def update(self, key: ServiceKey, svc: Service | None) -> bool:
        """Record the Service's new value (None: gone). Returns whether a sync is now owed."""
        if svc is None:
            self._current.pop(key, None)
        else:
            self._current[key] = svc
        if self._current.get(key) != self._handed.get(key):
            self._dirty.add(key)
        else:
            self._dirty.discard(key)
        return bool(self._dirty)

    def get(self, key: ServiceKey) -> Service | None:
        return self._current.get(key)

    def keys(self) -> Iterable[ServiceKey]:
        return self._current.keys()

    @property
    def pending(self) -> int:
        return len(self._dirty)

    def drain(self) -> dict[ServiceKey, Service | None]:
        out = {k: self._current.get(k) for k in sorted(self._dirty)}
        for k, v in out.items():
            if v is None:
                self._handed.pop(k, None)
            else:
                self._handed[k] = v
        self._dirty.clear()
        return out

    def resend_all(self) -> None:
        """Forget what was handed over: the next drain carries every Service (and deletions)."""
        self._dirty = set(self._current) | set(self._handed)
        self._handed = {}


def merge_slices(slices: Iterable[EndpointSlice]) -> Merged:
    """Merge a Service's slices into per-port endpoint lists.

    The same address and port twice counts once. That happens briefly while the
    EndpointSlice controller moves an endpoint between slices, and when a pod's IP is given
    to a new pod while the old one is still terminating (upstream #135266, fixed in 1.36): the
    address is the new pod's then, so the old pod's terminating copy must not make it a
    fallback. A ready copy wins, then a copy that is not terminating, then the slice that sorts
    first by name (and the first in it), so the result never depends on event order.
    """
    by_port: dict[tuple[str, str], dict[tuple[str, int], Endpoint]] = {}
    for sl in sorted(slices, key=lambda s: s.name):
        for port in sl.ports:
            eps = by_port.setdefault((port.name, port.protocol), {})
            for ep in sl.endpoints:
                k = (ep.ip, port.port)
                have = eps.get(k)
                if have is None or _precedence(ep) > _precedence(have):
                    eps[k] = ep
    out: list[PortEndpoints] = []
    for (name, protocol), eps in sorted(by_port.items()):
        items = tuple(sorted(((ep, port) for (_, port), ep in eps.items()), key=_ep_order))
        out.append(PortEndpoints(name, protocol, items))  # type: ignore[arg-type]
    return tuple(out)


def _precedence(ep: Endpoint) -> tuple[bool, bool]:
    return (ep.ready, not ep.terminating)


def _ep_order(item: tuple[Endpoint, int]) -> tuple[str, int]:
    return (item[0].ip, item[1])


class EndpointsTracker:
    """Tracks EndpointSlices and hands over merged endpoints per Service."""

    def __init__(self) -> None:
        self._slices: dict[ServiceKey, dict[str, EndpointSlice]] = {}
        self._owner: dict[tuple[str, str], ServiceKey] = {}
        # Services whose endpoints the core holds. Only the keys: the core compares what it is
        # handed with what it holds and ignores updates that change nothing, so keeping every
        # merged endpoint list here as well (tens of MiB in a large cluster) would buy nothing.
        self._handed: set[ServiceKey] = set()
        self._dirty: set[ServiceKey] = set()
        self._triggers: dict[ServiceKey, float] = {}

    def take_triggers(self) -> dict[ServiceKey, float]:
        """The oldest change trigger time per Service since the last call."""
        out, self._triggers = self._triggers, {}
        return out

    def update(self, namespace: str, name: str, sl: EndpointSlice | None) -> bool:
        """Record a slice's new value (None: gone or no longer proxied)."""
        slice_id = (namespace, name)
        if sl is not None and self._slices.get(sl.service, {}).get(name) == sl:
            return bool(self._dirty)  # a no-op update (e.g. only its resourceVersion moved)
        old_owner = self._owner.pop(slice_id, None)
        if old_owner is not None:
            owned = self._slices.get(old_owner, {})
            owned.pop(name, None)
            if not owned:
                self._slices.pop(old_owner, None)
            self._dirty.add(old_owner)
        if sl is not None:
            if sl.trigger_time is not None:
                prev = self._triggers.get(sl.service)
                self._triggers[sl.service] = min(prev or sl.trigger_time, sl.trigger_time)
            self._owner[slice_id] = sl.service
            self._slices.setdefault(sl.service, {})[name] = sl
            self._dirty.add(sl.service)
        return bool(self._dirty)

    def slice_ids(self) -> Iterable[tuple[str, str]]:
        return self._owner.keys()

    @property
    def pending(self) -> int:
        return len(self._dirty)

    def merged(self, key: ServiceKey) -> Merged:
        return merge_slices(self._slices.get(key, {}).values())

    def drain(self) -> dict[ServiceKey, Merged]:
        out: dict[ServiceKey, Merged] = {}
        for key in sorted(self._dirty):
            merged = self.merged(key)
            if merged:
                out[key] = merged
                self._handed.add(key)
            elif key in self._handed:
                out[key] = merged
                self._handed.discard(key)
        self._dirty.clear()
        return out

    def resend_all(self) -> None:
        self._dirty = set(self._slices) | self._handed
        self._handed = set()
