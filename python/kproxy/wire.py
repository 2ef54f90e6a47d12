"""The JSON the Rust core decodes: generated from its serde types (``rust/src/wire.rs``).

Do not edit: ``KPROXY_WRITE_WIRE=1 cargo test --no-default-features --lib wire`` rewrites this
file, and ``cargo test`` fails when it is stale. mypy checks every caller against these types.
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

# Which kernel interface an engine drives.
BackendKind = Literal["kernel", "fake"]


class ChangeSet(TypedDict):
    """Everything that changed since the previous sync; one per sync, never one per object."""

    endpoints: NotRequired[list[EndpointsChange]]
    # Present when the Node's topology changed (this forces a full sync).
    node: NotRequired[NodeInfo | None]
    # Present when the cluster's ServiceCIDRs changed: the CIDRs of every ServiceCIDR object,
    # of both families (empty: there are none). Traffic to an address inside them that no
    # Service holds is dropped, in the nftables mode (upstream's `cluster-ips-check`).
    service_cidrs: NotRequired[list[str] | None]
    services: NotRequired[list[ServiceChange]]


class Endpoint(TypedDict):
    """One endpoint of one Service port, merged from the Service's EndpointSlices."""

    ip: str
    node_hints: NotRequired[list[str]]
    node_name: NotRequired[str | None]
    port: int
    ready: bool
    serving: bool
    terminating: bool
    zone_hints: NotRequired[list[str]]


class EndpointPort(TypedDict):
    """The endpoints of one (port name, protocol) of a Service."""

    endpoints: list[Endpoint]
    # a DNS label, or empty
    name: NotRequired[str]
    protocol: Protocol


class EndpointsChange(TypedDict):
    """The complete, merged endpoint set of a Service after a change (empty: no endpoints left)."""

    # a DNS label, or empty
    name: str
    # a DNS label, or empty
    namespace: str
    ports: list[EndpointPort]


class EngineConfig(TypedDict):
    """Static configuration of one engine (JSON from Python): the settings every mode reads, and
    the section of the engine's own mode. Python's types for it are generated from this
    definition (`python/kproxy/wire.py`, see `crate::wire`)."""

    backend: NotRequired[BackendKind]
    # Pod CIDRs (ClusterCIDR or NodeCIDR detection); the one of this engine's family is used.
    cluster_cidrs: NotRequired[list[str]]
    conntrack_tcp_be_liberal: NotRequired[bool]
    family: IpFamily
    # The iptables mode's own settings (refused with another mode).
    iptables: NotRequired[IptablesConfig | None]
    # The ipvs mode's own settings (refused with another mode).
    ipvs: NotRequired[IpvsConfig | None]
    # Pod traffic arrives on this interface (BridgeInterface), or on interfaces with this
    # prefix when it ends in `+` (InterfaceNamePrefix). Takes precedence over the CIDRs.
    local_interface: NotRequired[str | None]
    masquerade_all: NotRequired[bool]
    masquerade_bit: NotRequired[int]
    mode: NotRequired[Mode]
    # The nftables mode's own settings (refused with another mode).
    nftables: NotRequired[NftablesConfig | None]
    # The node's own addresses (loadBalancerSourceRanges that contain one also admit traffic
    # from the LB IP itself, as upstream).
    node_ips: NotRequired[list[str]]
    node_name: str
    # `None`: NodePorts on every local address.
    nodeport_ips: NotRequired[list[str] | None]
    # The userspace mode's own settings (refused with another mode).
    userspace: NotRequired[UserspaceConfig | None]


# An IP family; one engine serves one family (dual-stack runs two engines).
IpFamily = Literal["IPv4", "IPv6"]


class IptablesConfig(TypedDict):
    """The iptables mode's section of an [`EngineConfig`]."""

    # NodePorts on 127.0.0.0/8 (IPv4 only; the caller sets route_localnet).
    localhost_nodeports: NotRequired[bool]


class IpvsConfig(TypedDict):
    """The ipvs mode's section of an [`EngineConfig`]."""

    # Virtual servers on these addresses are someone else's (`ipvs.excludeCIDRs`).
    exclude_cidrs: NotRequired[list[str]]
    # The addresses of the node's interfaces (other than kube-ipvs0). An external or LB IP
    # among them is not bound on kube-ipvs0, nor fenced by KUBE-IPVS-FILTER.
    host_ips: NotRequired[list[str]]
    # The scheduler of every virtual server (`ipvs.scheduler`; rr when unset).
    scheduler: NotRequired[IpvsScheduler | None]
    tcp_fin_timeout_s: NotRequired[int]
    # The kernel's IPVS connection timeouts in seconds (0 or unset: unchanged).
    tcp_timeout_s: NotRequired[int]
    udp_timeout_s: NotRequired[int]


# The IPVS schedulers upstream accepts: `ipvs.scheduler`, and a Service's own choice (the
# `kproxy.io/ipvs-scheduler` annotation). The one list of them; Python's is generated.
IpvsScheduler = Literal["rr", "wrr", "lc", "wlc", "lblc", "lblcr", "sh", "dh", "sed", "nq", "mh"]


# How the kernel is programmed.
Mode = Literal["iptables", "nftables", "userspace", "ipvs"]


class NftablesConfig(TypedDict):
    """The nftables mode's section of an [`EngineConfig`]."""

    # TCP NodePorts on the family's loopback address, through a userspace proxy (KEP-6032).
    localhost_nodeports: NotRequired[bool]


class NodeInfo(TypedDict):
    """What this engine needs to know about its own Node."""

    # `topology.kubernetes.io/zone`, used for topology hints.
    zone: NotRequired[str | None]


class PortSpec(TypedDict):
    """One port of a Service as the Service spec declares it."""

    # a DNS label, or empty
    name: NotRequired[str]
    # 0 when the Service has no NodePort for this port.
    node_port: NotRequired[int]
    port: int
    protocol: Protocol


# Transport protocols a Service port can use.
Protocol = Literal["TCP", "UDP", "SCTP"]


class Service(TypedDict):
    """A Service, family-neutral: each engine picks the addresses of its own family."""

    cluster_ips: NotRequired[list[str]]
    external_ips: NotRequired[list[str]]
    external_traffic_policy: NotRequired[TrafficPolicy]
    # Whether the Service can be reached from outside (NodePort, LoadBalancer or externalIPs);
    # upstream only honours `externalTrafficPolicy: Local` for such Services.
    externally_accessible: NotRequired[bool]
    health_check_node_port: NotRequired[int]
    internal_traffic_policy: NotRequired[TrafficPolicy]
    # The ipvs mode's scheduler for this Service (an annotation); `None`: the default.
    ipvs_scheduler: NotRequired[IpvsScheduler | None]
    load_balancer_ips: NotRequired[list[str]]
    load_balancer_source_ranges: NotRequired[list[str]]
    ports: list[PortSpec]
    # `Some(seconds)` for `sessionAffinity: ClientIP`.
    session_affinity_timeout: NotRequired[int | None]


class ServiceChange(TypedDict):
    """A Service added or updated (`service: Some`) or deleted (`None`)."""

    # a DNS label, or empty
    name: str
    # a DNS label, or empty
    namespace: str
    service: NotRequired[Service | None]


# `externalTrafficPolicy` / `internalTrafficPolicy`.
TrafficPolicy = Literal["Cluster", "Local"]


class UserspaceConfig(TypedDict):
    """The userspace mode's section of an [`EngineConfig`]."""

    connect_timeout_ms: NotRequired[int | None]
    # The addresses NodePort listeners bind (`--bind-address`).
    listen_addresses: NotRequired[list[str]]
    max_connections: NotRequired[int | None]
    # Also serve Service addresses through redirect rules (needs NET_ADMIN).
    portals: NotRequired[bool]
    # The ports portal listeners take (`--proxy-port-range`, first and last); unset: the
    # kernel's ephemeral range.
    proxy_port_range: NotRequired[tuple[int, int] | None]
    tcp_idle_timeout_ms: NotRequired[int | None]
    udp_idle_timeout_ms: NotRequired[int | None]
