"""Normalized, immutable values: what the control loop tracks and hands to the Rust core.

Every value here has passed validation in :mod:`kproxy.normalize`; ``to_wire`` produces the
JSON shape the core decodes (``rust/src/model``; typed by :mod:`kproxy.wire`, generated from
it), which validates names and addresses again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from kproxy import wire

# The core's own types (generated from its serde types): one spelling of each on both sides.
Protocol = wire.Protocol
Family = wire.IpFamily
Policy = wire.TrafficPolicy
IpvsScheduler = wire.IpvsScheduler
Mode = wire.Mode
# Where a traced packet comes from: the network or a pod ("external"), or the node itself.
Origin = Literal["external", "local"]
# Why a trace's packet was dropped or rejected (``_core.Trace.reason``; ``trace::Reason``).
TraceReason = Literal[
    "no-endpoints", "no-local-endpoints", "source-range", "no-service-port",
    "unallocated-cluster-ip",
]  # fmt: skip

PROTOCOLS: tuple[Protocol, ...] = get_args(Protocol)


def protocol_of(name: str) -> Protocol | None:
    """``name`` as a Protocol, or None when it is not one (case matters, as in the API)."""
    return next((p for p in PROTOCOLS if p == name), None)


def ipvs_scheduler_of(name: str) -> IpvsScheduler | None:
    """``name`` as an IPVS scheduler, or None when it is not one."""
    return next((s for s in IPVS_SCHEDULERS if s == name), None)


# The IPVS schedulers upstream accepts for `ipvs.scheduler`; a Service may pick one of them
# for itself with IPVS_SCHEDULER_ANNOTATION (the ipvs mode only, as kube-router offers).
IPVS_SCHEDULERS: tuple[IpvsScheduler, ...] = get_args(IpvsScheduler)
IPVS_SCHEDULER_ANNOTATION = "kproxy.io/ipvs-scheduler"


@dataclass(frozen=True, slots=True, order=True)
class ServiceKey:
    """A Service's identity (an EndpointSlice names its Service the same way)."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class PortSpec:
    """One port of a Service."""

    name: str
    protocol: Protocol
    port: int
    node_port: int = 0

    def to_wire(self) -> wire.PortSpec:
        return {
            "name": self.name,
            "protocol": self.protocol,
            "port": self.port,
            "node_port": self.node_port,
        }


@dataclass(frozen=True, slots=True)
class Service:
    """A Service kproxy proxies (headless and ExternalName Services never become one)."""

    key: ServiceKey
    ports: tuple[PortSpec, ...]
    cluster_ips: tuple[str, ...] = ()
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    externally_accessible: bool = False
    external_traffic_policy: Policy = "Cluster"
    internal_traffic_policy: Policy = "Cluster"
    session_affinity_timeout: int | None = None
    health_check_node_port: int = 0
    # The ipvs mode's scheduler for this Service (IPVS_SCHEDULER_ANNOTATION); None: default.
    ipvs_scheduler: IpvsScheduler | None = None

    def to_wire(self) -> wire.Service:
        return {
            "ipvs_scheduler": self.ipvs_scheduler,
            "cluster_ips": list(self.cluster_ips),
            "external_ips": list(self.external_ips),
            "load_balancer_ips": list(self.load_balancer_ips),
            "load_balancer_source_ranges": list(self.load_balancer_source_ranges),
            "externally_accessible": self.externally_accessible,
            "external_traffic_policy": self.external_traffic_policy,
            "internal_traffic_policy": self.internal_traffic_policy,
            "session_affinity_timeout": self.session_affinity_timeout,
            "health_check_node_port": self.health_check_node_port,
            "ports": [p.to_wire() for p in self.ports],
        }


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address of an EndpointSlice, with its conditions and topology hints."""

    ip: str
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    zone_hints: tuple[str, ...] = ()
    node_hints: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SlicePort:
    """A port an EndpointSlice's endpoints serve."""

    name: str
    protocol: Protocol
    port: int


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    """A normalized EndpointSlice (FQDN slices are never normalized into one)."""

    namespace: str
    name: str
    service: ServiceKey
    family: Family
    ports: tuple[SlicePort, ...]
    endpoints: tuple[Endpoint, ...]
    # endpoints.kubernetes.io/last-change-trigger-time (seconds since the epoch): when the
    # change that produced this slice happened, for the network programming latency metric.
    trigger_time: float | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class PortEndpoints:
    """The merged endpoints of one (port name, protocol) of a Service."""

    name: str
    protocol: Protocol
    # (endpoint, target port) pairs, sorted.
    endpoints: tuple[tuple[Endpoint, int], ...]

    def to_wire(self) -> wire.EndpointPort:
        return {
            "name": self.name,
            "protocol": self.protocol,
            "endpoints": [
                {
                    "ip": ep.ip,
                    "port": port,
                    "ready": ep.ready,
                    "serving": ep.serving,
                    "terminating": ep.terminating,
                    "node_name": ep.node_name,
                    "zone_hints": list(ep.zone_hints),
                    "node_hints": list(ep.node_hints),
                }
                for ep, port in self.endpoints
            ],
        }


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What kproxy uses of its own Node object."""

    name: str
    zone: str | None = None
    pod_cidrs: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    # Being deleted, or tainted for removal by the cluster autoscaler: /healthz fails.
    terminating: bool = False
    labels: tuple[tuple[str, str], ...] = field(default=())

    def to_wire(self) -> wire.NodeInfo:
        return {"zone": self.zone}
