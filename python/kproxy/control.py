"""The controller: objects in, a change set per sync out.

Sources (the API informers or the manifest directory) call ``replace`` with complete sets and
``event`` with single changes. The controller normalizes each object, applies kube-proxy's
skip rules and feeds the trackers. A complete set is diffed against what the controller holds,
so an object that vanished while nobody was watching is deleted.

An object that fails validation is skipped with one log line naming it and the field; the last
valid version of it (if any) stays programmed, so a bad update never takes a working Service
down. Deletions always apply.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kproxy.backends import for_mode
from kproxy.errors import InvalidObjectError
from kproxy.model import NodeInfo, ServiceKey
from kproxy.normalize import (
    DEFAULT_MAX_SERVICE_DESTINATIONS,
    normalize_endpoint_slice,
    normalize_node,
    normalize_service,
    normalize_service_cidr,
)
from kproxy.tracker import ChangeSet, EndpointsTracker, ServiceTracker

if TYPE_CHECKING:
    from kproxy.config import ProxyConfig

# The feature gate (KEP-5707, on by default since 1.36) that lets externalIPs be served.
ALLOW_EXTERNAL_IPS = "AllowServiceExternalIPs"
# ServiceCIDR objects (GA in 1.33): the nftables mode drops traffic to their unallocated
# addresses.
MULTI_CIDR_SERVICE_ALLOCATOR = "MultiCIDRServiceAllocator"

log = logging.getLogger(__name__)

SKIP_LABELS = ("service.kubernetes.io/service-proxy-name", "service.kubernetes.io/headless")
RESOURCES = ("services", "endpointslices", "nodes")


def _ident(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    ns = meta.get("namespace") or "default"
    name = meta.get("name")
    return (str(ns), str(name) if name is not None else "")


def _skipped_by_label(obj: Mapping[str, Any]) -> bool:
    meta = obj.get("metadata")
    labels = meta.get("labels") if isinstance(meta, Mapping) else None
    return isinstance(labels, Mapping) and any(k in labels for k in SKIP_LABELS)


class Controller:
    def __init__(
        self,
        node_name: str,
        on_change: Callable[[str], None] = lambda resource: None,
        *,
        wait_for_node: bool = True,
        on_invalid: Callable[[str], None] = lambda kind: None,
        on_skipped: Callable[[InvalidObjectError], None] = lambda error: None,
        max_service_destinations: int = DEFAULT_MAX_SERVICE_DESTINATIONS,
        allow_external_ips: bool = True,
        external_ip_cidrs: Sequence[str] = (),
        watch_service_cidrs: bool = True,
    ) -> None:
        self.node_name = node_name
        self._max_destinations = max_service_destinations
        self._allow_external_ips = allow_external_ips
        self._external_ip_cidrs = tuple(ipaddress.ip_network(c) for c in external_ip_cidrs)
        self._on_change = on_change
        self._on_invalid = on_invalid
        # Called once per object and distinct error (an Event), as the log line is.
        self._on_skipped = on_skipped
        self.services = ServiceTracker()
        self.endpoints = EndpointsTracker()
        self.node: NodeInfo | None = None
        self._node_dirty = False
        # Each ServiceCIDR object's CIDRs; the union goes to the core when it changes. Only
        # modes that use them read them (watchers ask `watch_service_cidrs`).
        self.watch_service_cidrs = watch_service_cidrs
        self.service_cidrs: dict[str, tuple[str, ...]] = {}
        self._cidrs_dirty = False
        self._synced = {r: False for r in RESOURCES}
        if not wait_for_node:
            self._synced["nodes"] = True
        # Last error logged per object, so a relist does not repeat the same line.
        self._errors: dict[tuple[str, str, str], str] = {}
        # Services told about the externalIPs deprecation (once each, until they drop them).
        self._external_noted: set[tuple[str, str]] = set()
        # Identities seen by the list in progress, per resource.
        self._listed: dict[str, set[Any]] = {}
        self.invalid_objects = 0
        self.warnings = 0

    # -- what sources call -----------------------------------------------------------------

    def replace(self, resource: str, objects: list[dict[str, Any]]) -> None:
        """A complete list at once (manifests, tools)."""
        self.list_page(resource, objects, first=True)
        self.list_done(resource)

    def list_page(self, resource: str, objects: list[dict[str, Any]], first: bool) -> None:
        """Take in one page of a list as it arrives (newer objects are upserted at once)."""
        seen = self._listed.setdefault(resource, set())
        if first:
            seen.clear()
        for o in objects:
            seen.add(_ident(o))
            self._upsert(resource, o)

    def list_done(self, resource: str) -> None:
        """The list is complete: what it did not hold was deleted while we were not watching."""
        present = self._listed.pop(resource, set())
        for ident in self._known(resource) - present:
            self._delete(resource, ident)
        self._synced[resource] = True
        self._on_change(resource)

    def event(self, resource: str, kind: str, obj: dict[str, Any]) -> None:
        if kind == "DELETED":
            self._delete(resource, _ident(obj))
        else:
            self._upsert(resource, obj)
        self._on_change(resource)

    # -- state -------------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        """Whether the first complete lists have arrived (nothing is programmed before)."""
        return all(self._synced.values())

    @property
    def pending(self) -> int:
        return (
            self.services.pending
            + self.endpoints.pending
            + int(self._node_dirty)
            + int(self._cidrs_dirty)
        )

    @classmethod
    def for_config(
        cls,
        cfg: ProxyConfig,
        on_change: Callable[[str], None] = lambda resource: None,
        *,
        wait_for_node: bool = False,
        on_invalid: Callable[[str], None] = lambda kind: None,
        on_skipped: Callable[[InvalidObjectError], None] = lambda error: None,
    ) -> Controller:
        """The controller the daemon runs with ``cfg``'s object limits and gates (the tools
        and the library use it too, so they see what the daemon sees)."""
        return cls(
            cfg.node_name,
            on_change,
            wait_for_node=wait_for_node,
            on_invalid=on_invalid,
            on_skipped=on_skipped,
            max_service_destinations=cfg.max_service_destinations,
            allow_external_ips=cfg.gate(ALLOW_EXTERNAL_IPS),
            external_ip_cidrs=cfg.external_ip_cidrs,
            watch_service_cidrs=for_mode(cfg).service_cidrs
            and cfg.gate(MULTI_CIDR_SERVICE_ALLOCATOR),
        )

    def all_service_cidrs(self) -> tuple[str, ...]:
        """Every CIDR of every ServiceCIDR object, each once, in order."""
        return tuple(sorted({c for cidrs in self.service_cidrs.values() for c in cidrs}))

    def drain(self) -> ChangeSet:
        node = self.node if self._node_dirty else None
        self._node_dirty = False
        cidrs = self.all_service_cidrs() if self._cidrs_dirty else None
        self._cidrs_dirty = False
        return ChangeSet(self.services.drain(), self.endpoints.drain(), node, cidrs)

    def resend_all(self) -> None:
        """After the core lost track (it rejected a change set): send everything again."""
        self.services.resend_all()
        self.endpoints.resend_all()
        self._node_dirty = self.node is not None
        # Even an empty list: the core may hold CIDRs whose last object went meanwhile.
        self._cidrs_dirty = self.watch_service_cidrs

    def _set_service_cidrs(self, name: str, cidrs: tuple[str, ...] | None) -> None:
        if not self.watch_service_cidrs:
            return  # this mode does not use them (a manifests directory may hold some)
        before = self.all_service_cidrs()
        if cidrs is None:
            self.service_cidrs.pop(name, None)
        else:
            self.service_cidrs[name] = cidrs
        if self.all_service_cidrs() != before:
            self._cidrs_dirty = True

    # -- internals ---------------------------------------------------------------------------

    def _known(self, resource: str) -> set[tuple[str, str]]:
        if resource == "services":
            return {(k.namespace, k.name) for k in self.services.keys()}  # noqa: SIM118
        if resource == "endpointslices":
            return set(self.endpoints.slice_ids())
        if resource == "servicecidrs":
            return {("default", name) for name in self.service_cidrs}
        return {("default", self.node.name)} if self.node is not None else set()

    def _delete(self, resource: str, ident: tuple[str, str]) -> None:
        self._errors.pop((resource, *ident), None)
        if resource == "services":
            self._external_noted.discard(ident)
            self.services.update(ServiceKey(*ident), None)
        elif resource == "endpointslices":
            self.endpoints.update(ident[0], ident[1], None)
        elif resource == "servicecidrs":
            self._set_service_cidrs(ident[1], None)
        elif resource == "nodes" and self.node is not None and ident[1] == self.node.name:
            self.node = None

    def _upsert(self, resource: str, obj: dict[str, Any]) -> None:
        ident = _ident(obj)
        if resource in ("services", "endpointslices") and _skipped_by_label(obj):
            self._delete(resource, ident)
            return
        try:
            if resource == "services":
                svc = normalize_service(
                    obj,
                    self._max_destinations,
                    allow_external_ips=self._allow_external_ips,
                    external_ip_cidrs=self._external_ip_cidrs,
                )
                self._report(resource, ident, svc.warnings)
                self._note_external_ips(ident, svc.value is not None and svc.value.external_ips)
                self.services.update(ServiceKey(*ident), svc.value)
            elif resource == "endpointslices":
                sl = normalize_endpoint_slice(obj)
                self._report(resource, ident, sl.warnings)
                self.endpoints.update(ident[0], ident[1], sl.value)
            elif resource == "servicecidrs":
                self._set_service_cidrs(ident[1], normalize_service_cidr(obj))
            elif resource == "nodes":
                node = normalize_node(obj)
                if node.name != self.node_name:
                    return
                if self.node is None or node.zone != self.node.zone:
                    self._node_dirty = True
                self.node = node
        except InvalidObjectError as e:
            self.invalid_objects += 1
            self._on_invalid(e.kind)
            key = (resource, *ident)
            if self._errors.get(key) != str(e):
                self._errors[key] = str(e)
                log.error("skipping invalid object: %s", e)
                self._on_skipped(e)

    def _note_external_ips(self, ident: tuple[str, str], programmed: object) -> None:
        """externalIPs are deprecated (KEP-5707): say so once per Service that has them."""
        if not programmed:
            self._external_noted.discard(ident)
        elif ident not in self._external_noted:
            self._external_noted.add(ident)
            log.warning(
                "Service %s/%s: spec.externalIPs are programmed, but deprecated (KEP-5707): "
                "the %s feature gate turns them off, and upstream plans to stop serving them",
                ident[0], ident[1], ALLOW_EXTERNAL_IPS,
            )  # fmt: skip

    def _report(self, resource: str, ident: tuple[str, str], warnings: tuple[str, ...]) -> None:
        key = (resource, *ident)
        text = "; ".join(warnings)
        if not warnings:
            self._errors.pop(key, None)
            return
        self.warnings += len(warnings)
        if self._errors.get(key) != text:
            self._errors[key] = text
            kind = "Service" if resource == "services" else "EndpointSlice"
            log.warning("%s %s/%s: %s", kind, ident[0], ident[1], text)
