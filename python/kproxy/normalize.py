"""Kubernetes objects (plain dicts, as the API or a manifest gives them) -> model values.

Validation happens here, before anything can reach rule text:

* a problem with the object as a whole (a bad name, a port of 0, an unknown protocol, an
  invalid cluster IP) raises :class:`InvalidObjectError` naming the object and field; the
  caller skips that object and keeps what was programmed for it before;
* a problem with one item of a list (one bad external IP, source range or endpoint address)
  drops that item and is reported in ``Normalized.warnings``; the rest of the object works.

Services that kproxy must ignore (headless, ExternalName) normalize to ``None``.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar, cast

from kproxy.errors import InvalidObjectError
from kproxy.model import (
    IPVS_SCHEDULER_ANNOTATION,
    IPVS_SCHEDULERS,
    Endpoint,
    EndpointSlice,
    Family,
    IpvsScheduler,
    NodeInfo,
    Policy,
    PortSpec,
    Protocol,
    Service,
    ServiceKey,
    SlicePort,
    ipvs_scheduler_of,
    protocol_of,
)

T = TypeVar("T")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ZONE_LABEL = "topology.kubernetes.io/zone"
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
SOURCE_RANGES_ANNOTATION = "service.beta.kubernetes.io/load-balancer-source-ranges"
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"
DEFAULT_AFFINITY_TIMEOUT = 10800
MAX_AFFINITY_TIMEOUT = 86400
# What one Service may ask of every node: its ports times its addresses (cluster IPs,
# externalIPs, load-balancer IPs). Each is a few rules or elements in every mode; a Service of
# 400 ports and 400 externalIPs (70 KB, far under the API's limit) would ask for 160,000 and
# stall every node's syncs for minutes. No sane Service comes near the default.
DEFAULT_MAX_SERVICE_DESTINATIONS = 20_000

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_SERVICE_TYPES = frozenset({"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"})


@dataclass(frozen=True, slots=True)
class Normalized(Generic[T]):
    """A normalized value (``None``: nothing to proxy) and the items dropped on the way."""

    value: T | None
    warnings: tuple[str, ...] = field(default=())


def is_dns_label(s: str) -> bool:
    return len(s) <= 63 and _DNS_LABEL.fullmatch(s) is not None


def is_dns_subdomain(s: str) -> bool:
    return len(s) <= 253 and _DNS_SUBDOMAIN.fullmatch(s) is not None


def canonical_ip(value: object) -> str | None:
    """The canonical text of an IP address, or None if ``value`` is not one."""
    if not isinstance(value, str) or "%" in value:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def canonical_cidr(value: object) -> str | None:
    """The canonical text of a CIDR (host bits allowed, as the API allows), or None."""
    if not isinstance(value, str) or "%" in value or "/" not in value:
        return None
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        return None


def family_of(ip: str) -> Family:
    return "IPv4" if ipaddress.ip_address(ip).version == 4 else "IPv6"


class _Obj:
    """Typed access to one object's fields, raising errors that name the object and field."""

    def __init__(self, kind: str, obj: Mapping[str, Any], *, namespaced: bool = True) -> None:
        if not isinstance(obj, Mapping):
            raise InvalidObjectError(kind, "?", "?", "", "not an object")
        self.kind = kind
        meta = obj.get("metadata")
        self.meta: Mapping[str, Any] = meta if isinstance(meta, Mapping) else {}
        namespace = (self.meta.get("namespace") or "default") if namespaced else ""
        name = self.meta.get("name")
        if not isinstance(namespace, str) or not isinstance(name, str):
            raise InvalidObjectError(kind, str(namespace), str(name), "metadata", "no name")
        self.namespace: str = _shared(namespace)
        self.name: str = name
        self.warnings: list[str] = []

    def fail(self, path: str, message: str) -> InvalidObjectError:
        return InvalidObjectError(self.kind, self.namespace, self.name, path, message)

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(f"{path}: {message}")

    def mapping(self, parent: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
        v = parent.get(key)
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            raise self.fail(path, "must be an object")
        return v

    def seq(self, parent: Mapping[str, Any], key: str, path: str) -> list[Any]:
        v = parent.get(key)
        if v is None:
            return []
        if not isinstance(v, list):
            raise self.fail(path, "must be a list")
        return v

    def string(self, parent: Mapping[str, Any], key: str, path: str, default: str = "") -> str:
        v = parent.get(key, default)
        if v is None:
            return default
        if not isinstance(v, str):
            raise self.fail(path, "must be a string")
        return v

    def port(self, value: object, path: str, *, allow_zero: bool = False) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"{value!r} is not a port number")
        if not (0 if allow_zero else 1) <= value <= 65535:
            raise self.fail(path, f"{value} is not in 1..65535")
        return value

    def protocol(self, parent: Mapping[str, Any], path: str) -> Protocol:
        p = parent.get("protocol") or "TCP"
        # The model's own constant, so every object shares one copy of it.
        proto = protocol_of(p) if isinstance(p, str) else None
        if proto is None:
            raise self.fail(path, f"unknown protocol {p!r}")
        return proto


def _shared(s: str) -> str:
    """One copy of a string that many objects repeat (namespaces, node and zone names, port
    names, protocols): a large cluster holds hundreds of thousands of references to a few
    hundred of them, and a copy per object would also pin the memory of the raw API page it
    was parsed from."""
    return sys.intern(s)


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _within(ip: str, networks: Sequence[IPNetwork]) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr.version == n.version and addr in n for n in networks)


def _check_names(o: _Obj) -> None:
    if not is_dns_label(o.namespace):
        raise o.fail("metadata.namespace", f"{o.namespace!r} is not a DNS label")


def normalize_service(
    obj: Mapping[str, Any],
    max_destinations: int = DEFAULT_MAX_SERVICE_DESTINATIONS,
    *,
    allow_external_ips: bool = True,
    external_ip_cidrs: Sequence[IPNetwork] = (),
) -> Normalized[Service]:
    """``max_destinations``: the most ports x addresses a Service may have (0: no limit).
    ``allow_external_ips``: the AllowServiceExternalIPs feature gate (KEP-5707); off, a
    Service's externalIPs are not programmed (with a warning). ``external_ip_cidrs``: where
    externalIPs may be (empty: anywhere); one outside them is dropped with a warning."""
    o = _Obj("Service", obj)
    _check_names(o)
    if not is_dns_label(o.name):
        raise o.fail("metadata.name", f"{o.name!r} is not a DNS label")
    spec = o.mapping(obj, "spec", "spec")
    svc_type = o.string(spec, "type", "spec.type", "ClusterIP")
    if svc_type not in _SERVICE_TYPES:
        raise o.fail("spec.type", f"unknown type {svc_type!r}")
    # ExternalName is DNS only; headless Services have no virtual IP to proxy.
    if svc_type == "ExternalName":
        return Normalized(None)
    cluster_ip = o.string(spec, "clusterIP", "spec.clusterIP")
    if cluster_ip in ("", "None"):
        return Normalized(None)
    raw_ips = o.seq(spec, "clusterIPs", "spec.clusterIPs") or [cluster_ip]
    cluster_ips: list[str] = []
    for i, raw in enumerate(raw_ips):
        ip = canonical_ip(raw)
        if ip is None:
            raise o.fail(f"spec.clusterIPs[{i}]", f"{raw!r} is not an IP address")
        cluster_ips.append(ip)

    ports: list[PortSpec] = []
    seen: set[tuple[str, str]] = set()
    uses_node_ports = svc_type in ("NodePort", "LoadBalancer")
    for i, raw in enumerate(o.seq(spec, "ports", "spec.ports")):
        path = f"spec.ports[{i}]"
        if not isinstance(raw, Mapping):
            raise o.fail(path, "must be an object")
        name = o.string(raw, "name", f"{path}.name")
        if name and not is_dns_label(name):
            raise o.fail(f"{path}.name", f"{name!r} is not a DNS label")
        protocol = o.protocol(raw, f"{path}.protocol")
        if (name, protocol) in seen:
            raise o.fail(path, f"duplicate port {name!r}/{protocol}")
        seen.add((name, protocol))
        port = o.port(raw.get("port"), f"{path}.port")
        node_port = o.port(raw.get("nodePort") or 0, f"{path}.nodePort", allow_zero=True)
        ports.append(PortSpec(_shared(name), protocol, port, node_port if uses_node_ports else 0))

    external_ips: list[str] = []
    for i, raw in enumerate(o.seq(spec, "externalIPs", "spec.externalIPs")):
        ip = canonical_ip(raw)
        if ip is None:
            o.warn(f"spec.externalIPs[{i}]", f"{raw!r} is not an IP address; ignored")
        elif external_ip_cidrs and not _within(ip, external_ip_cidrs):
            o.warn(
                f"spec.externalIPs[{i}]",
                f"{ip} is outside the allowed CIDRs (--external-ip-cidrs); not programmed",
            )
        else:
            external_ips.append(ip)
    if external_ips and not allow_external_ips:
        o.warn("spec.externalIPs", "not programmed: the AllowServiceExternalIPs gate is off")
        external_ips = []

    lb_ips: list[str] = []
    if svc_type == "LoadBalancer":
        status = o.mapping(obj, "status", "status")
        lb = o.mapping(status, "loadBalancer", "status.loadBalancer")
        for i, ing in enumerate(o.seq(lb, "ingress", "status.loadBalancer.ingress")):
            path = f"status.loadBalancer.ingress[{i}]"
            if not isinstance(ing, Mapping) or not ing.get("ip"):
                continue  # hostname-only ingress: nothing to program
            # ipMode Proxy: the load balancer delivers to the node, not to the VIP.
            if ing.get("ipMode") == "Proxy":
                continue
            ip = canonical_ip(ing.get("ip"))
            if ip is None:
                o.warn(f"{path}.ip", f"{ing.get('ip')!r} is not an IP address; ignored")
            else:
                lb_ips.append(ip)

    ranges_raw: list[Any] = o.seq(spec, "loadBalancerSourceRanges", "spec.loadBalancerSourceRanges")
    ranges_path = "spec.loadBalancerSourceRanges"
    if not ranges_raw:
        annotations = o.mapping(o.meta, "annotations", "metadata.annotations")
        ann = annotations.get(SOURCE_RANGES_ANNOTATION)
        if isinstance(ann, str) and ann.strip():
            ranges_raw = [r.strip() for r in ann.split(",")]
            ranges_path = f"metadata.annotations[{SOURCE_RANGES_ANNOTATION}]"
    source_ranges: list[str] = []
    for i, raw in enumerate(ranges_raw):
        cidr = canonical_cidr(raw)
        if cidr is None:
            o.warn(f"{ranges_path}[{i}]", f"{raw!r} is not a CIDR; ignored")
        else:
            source_ranges.append(cidr)

    addresses = len(cluster_ips) + len(external_ips) + len(lb_ips)
    if max_destinations and len(ports) * addresses > max_destinations:
        raise o.fail(
            "spec.ports",
            f"{len(ports)} ports x {addresses} addresses = {len(ports) * addresses} "
            f"destinations, over the limit of {max_destinations} per Service "
            "(--max-service-destinations)",
        )

    externally_accessible = uses_node_ports or bool(external_ips)
    etp = _policy(o, spec, "externalTrafficPolicy")
    itp = _policy(o, spec, "internalTrafficPolicy")

    affinity: int | None = None
    if o.string(spec, "sessionAffinity", "spec.sessionAffinity", "None") == "ClientIP":
        cfg = o.mapping(spec, "sessionAffinityConfig", "spec.sessionAffinityConfig")
        client = o.mapping(cfg, "clientIP", "spec.sessionAffinityConfig.clientIP")
        t = client.get("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT)
        if t is None:
            t = DEFAULT_AFFINITY_TIMEOUT
        if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= MAX_AFFINITY_TIMEOUT:
            raise o.fail(
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                f"{t!r} is not in 1..{MAX_AFFINITY_TIMEOUT}",
            )
        affinity = t

    hcnp = 0
    if svc_type == "LoadBalancer" and etp == "Local":
        hcnp = o.port(
            spec.get("healthCheckNodePort") or 0, "spec.healthCheckNodePort", allow_zero=True
        )

    scheduler: IpvsScheduler | None = None
    annotations = o.mapping(o.meta, "annotations", "metadata.annotations")
    wanted = annotations.get(IPVS_SCHEDULER_ANNOTATION)
    if wanted is not None:
        scheduler = ipvs_scheduler_of(wanted.strip()) if isinstance(wanted, str) else None
        if scheduler is None:
            o.warn(
                f"metadata.annotations[{IPVS_SCHEDULER_ANNOTATION}]",
                f"{wanted!r} is not an IPVS scheduler (one of {', '.join(IPVS_SCHEDULERS)});"
                " the default is used",
            )

    svc = Service(
        key=ServiceKey(o.namespace, o.name),
        ports=tuple(ports),
        cluster_ips=tuple(cluster_ips),
        external_ips=tuple(external_ips),
        load_balancer_ips=tuple(lb_ips),
        load_balancer_source_ranges=tuple(source_ranges),
        externally_accessible=externally_accessible,
        external_traffic_policy=etp if externally_accessible else "Cluster",
        internal_traffic_policy=itp,
        session_affinity_timeout=affinity,
        health_check_node_port=hcnp,
        ipvs_scheduler=scheduler,
    )
    return Normalized(svc, tuple(o.warnings))


def _policy(o: _Obj, spec: Mapping[str, Any], key: str) -> Policy:
    v = o.string(spec, key, f"spec.{key}", "Cluster") or "Cluster"
    if v not in ("Cluster", "Local"):
        raise o.fail(f"spec.{key}", f"unknown policy {v!r}")
    return cast(Policy, v)


def normalize_endpoint_slice(obj: Mapping[str, Any]) -> Normalized[EndpointSlice]:
    o = _Obj("EndpointSlice", obj)
    _check_names(o)
    if not is_dns_subdomain(o.name):
        raise o.fail("metadata.name", f"{o.name!r} is not a DNS subdomain")
    address_type = obj.get("addressType")
    if address_type not in ("IPv4", "IPv6"):
        return Normalized(None)  # FQDN slices are not proxied (as upstream)
    labels = o.mapping(o.meta, "labels", "metadata.labels")
    svc_name = labels.get(SERVICE_NAME_LABEL)
    if not isinstance(svc_name, str) or not svc_name:
        return Normalized(None)  # not managed for a Service
    if not is_dns_label(svc_name):
        raise o.fail(f"metadata.labels[{SERVICE_NAME_LABEL}]", f"{svc_name!r} is not a DNS label")
    family = cast(Family, address_type)

    ports: list[SlicePort] = []
    for i, raw in enumerate(o.seq(obj, "ports", "ports")):
        path = f"ports[{i}]"
        if not isinstance(raw, Mapping):
            raise o.fail(path, "must be an object")
        if raw.get("port") is None:
            continue  # upstream ignores ports without a number
        # A bad port drops only that port: the slice's other ports keep serving.
        try:
            name = o.string(raw, "name", f"{path}.name")
            if name and not is_dns_label(name):
                raise o.fail(f"{path}.name", f"{name!r} is not a DNS label")
            protocol = o.protocol(raw, f"{path}.protocol")
            number = o.port(raw["port"], f"{path}.port")
        except InvalidObjectError as e:
            o.warn(e.field, f"{e.message}; port ignored")
            continue
        ports.append(SlicePort(_shared(name), protocol, number))

    endpoints: list[Endpoint] = []
    for i, raw in enumerate(o.seq(obj, "endpoints", "endpoints")):
        path = f"endpoints[{i}]"
        if not isinstance(raw, Mapping):
            o.warn(path, "not an object; ignored")
            continue
        addresses = raw.get("addresses")
        if not isinstance(addresses, list) or not addresses:
            o.warn(f"{path}.addresses", "no address; ignored")
            continue
        ip = canonical_ip(addresses[0])
        if ip is None or family_of(ip) != family:
            o.warn(f"{path}.addresses[0]", f"{addresses[0]!r} is not an {family} address; ignored")
            continue
        cond = raw.get("conditions")
        cond = cond if isinstance(cond, Mapping) else {}
        ready = _flag(cond.get("ready"), True)
        serving = _flag(cond.get("serving"), ready)
        terminating = _flag(cond.get("terminating"), False)
        node_name = raw.get("nodeName")
        zone = raw.get("zone")
        hints = raw.get("hints")
        hints = hints if isinstance(hints, Mapping) else {}
        endpoints.append(
            Endpoint(
                ip=ip,
                ready=ready,
                serving=serving,
                terminating=terminating,
                node_name=_shared(node_name) if isinstance(node_name, str) else None,
                zone=_shared(zone) if isinstance(zone, str) else None,
                zone_hints=_hint_names(hints.get("forZones")),
                node_hints=_hint_names(hints.get("forNodes")),
            )
        )
    annotations = o.mapping(o.meta, "annotations", "metadata.annotations")
    value = EndpointSlice(
        namespace=o.namespace,
        name=o.name,
        service=ServiceKey(o.namespace, svc_name),
        family=family,
        ports=tuple(ports),
        endpoints=tuple(endpoints),
        trigger_time=_timestamp(annotations.get(TRIGGER_TIME_ANNOTATION)),
    )
    return Normalized(value, tuple(o.warnings))


def _timestamp(v: object) -> float | None:
    """An RFC 3339 timestamp in seconds since the epoch (None if absent or unparsable)."""
    if not isinstance(v, str):
        return None
    try:
        t = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t.timestamp() if t.tzinfo is not None else None


def _flag(v: object, default: bool) -> bool:
    return v if isinstance(v, bool) else default


def _hint_names(v: object) -> tuple[str, ...]:
    if not isinstance(v, list):
        return ()
    names = {h["name"] for h in v if isinstance(h, Mapping) and isinstance(h.get("name"), str)}
    return tuple(_shared(n) for n in sorted(names))


# The widest service CIDR kproxy programs: its drop rule sees every new forwarded connection,
# so a ServiceCIDR of 0.0.0.0/0 (or a typo like /1) would cut the node's pods off the world.
MIN_SERVICE_CIDR_PREFIX = {4: 8, 6: 64}


def normalize_service_cidr(obj: Mapping[str, Any]) -> tuple[str, ...]:
    """A ServiceCIDR's ``spec.cidrs``, canonical (networking.k8s.io/v1, KEP-1880)."""
    o = _Obj("ServiceCIDR", obj, namespaced=False)
    spec = o.mapping(obj, "spec", "spec")
    out: list[str] = []
    for i, raw in enumerate(o.seq(spec, "cidrs", "spec.cidrs")):
        cidr = canonical_cidr(raw)
        if cidr is None:
            raise o.fail(f"spec.cidrs[{i}]", f"{raw!r} is not a CIDR")
        net = ipaddress.ip_network(cidr)
        widest = MIN_SERVICE_CIDR_PREFIX[net.version]
        if net.prefixlen < widest:
            raise o.fail(
                f"spec.cidrs[{i}]",
                f"{cidr} is wider than /{widest}: traffic to it would be dropped for every "
                "address no Service holds",
            )
        if cidr not in out:
            out.append(cidr)
    return tuple(out)


def normalize_node(obj: Mapping[str, Any]) -> NodeInfo:
    o = _Obj("Node", obj)
    labels = o.mapping(o.meta, "labels", "metadata.labels")
    spec = o.mapping(obj, "spec", "spec")
    status = o.mapping(obj, "status", "status")
    pod_cidrs = [
        c for c in (canonical_cidr(x) for x in o.seq(spec, "podCIDRs", "spec.podCIDRs")) if c
    ]
    if not pod_cidrs and (c := canonical_cidr(spec.get("podCIDR"))):
        pod_cidrs = [c]
    addresses: list[str] = []
    for a in o.seq(status, "addresses", "status.addresses"):
        if isinstance(a, Mapping) and a.get("type") in ("InternalIP", "ExternalIP"):
            ip = canonical_ip(a.get("address"))
            if ip is not None and ip not in addresses:
                addresses.append(ip)
    taints = o.seq(spec, "taints", "spec.taints")
    terminating = bool(o.meta.get("deletionTimestamp")) or any(
        isinstance(t, Mapping) and t.get("key") == TO_BE_DELETED_TAINT for t in taints
    )
    zone = labels.get(ZONE_LABEL)
    return NodeInfo(
        name=o.name,
        zone=zone if isinstance(zone, str) else None,
        pod_cidrs=tuple(pod_cidrs),
        addresses=tuple(addresses),
        terminating=terminating,
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
    )
