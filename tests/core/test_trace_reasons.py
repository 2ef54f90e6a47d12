"""Why a trace's packet was refused, as each mode's tracer tells it from the rule or map entry
that decided (``_core.Trace.reason``), not from the rule's text: the same cluster, the same
packets, in the three kernel modes."""

from __future__ import annotations

import json

import pytest

from kproxy import _core
from kproxy.model import (
    Endpoint,
    EndpointSlice,
    PortSpec,
    Service,
    ServiceKey,
    SlicePort,
)
from kproxy.tracker import ChangeSet, Merged, merge_slices

NODE, NODE_IP, OUTSIDE = "node-a", "192.168.77.2", "192.168.77.9"
EMPTY, LOCAL, LB = ServiceKey("ns", "empty"), ServiceKey("ns", "local"), ServiceKey("ns", "lb")
WEB = ServiceKey("ns", "web")
LB_IP = "192.168.77.200"


def cluster() -> ChangeSet:
    def port(node_port: int) -> tuple[PortSpec, ...]:
        return (PortSpec("p", "TCP", 80, node_port),)

    services: dict[ServiceKey, Service | None] = {
        EMPTY: Service(EMPTY, port(30080), cluster_ips=("10.96.0.20",)),
        # Local policy, with its one endpoint on another node.
        LOCAL: Service(
            LOCAL,
            port(30081),
            cluster_ips=("10.96.0.21",),
            external_traffic_policy="Local",
            externally_accessible=True,
        ),
        LB: Service(
            LB,
            port(30082),
            cluster_ips=("10.96.0.22",),
            load_balancer_ips=(LB_IP,),
            load_balancer_source_ranges=("10.1.0.0/16",),
            externally_accessible=True,
        ),
        WEB: Service(WEB, port(30083), cluster_ips=("10.96.0.23",)),
    }

    def slices(key: ServiceKey, node: str) -> Merged:
        ports, ep = (SlicePort("p", "TCP", 8080),), Endpoint("10.244.1.5", node_name=node)
        sl = EndpointSlice(key.namespace, f"{key.name}-1", key, "IPv4", ports, (ep,))
        return merge_slices([sl])

    eps = {LOCAL: slices(LOCAL, "node-b"), LB: slices(LB, NODE), WEB: slices(WEB, NODE)}
    return ChangeSet(services, eps)


def engine(mode: str) -> _core.Engine:
    cfg = {"family": "IPv4", "node_name": NODE, "cluster_cidrs": ["10.244.0.0/16"],
           "node_ips": [NODE_IP], "backend": "fake", "mode": mode}  # fmt: skip
    e = _core.Engine(json.dumps(cfg))
    e.sync(cluster().to_json(), True)
    return e


def trace(e: _core.Engine, src: str, dst: str, port: int) -> _core.Trace:
    return e.trace(_core.Packet(src, dst, "TCP", port, "external", [NODE_IP]))


MODES = ["iptables", "nftables", "ipvs"]


@pytest.mark.parametrize("mode", MODES)
def test_a_service_without_endpoints_is_rejected_for_that_reason(mode: str) -> None:
    t = trace(engine(mode), "10.244.4.2", "10.96.0.20", 80)
    assert (t.verdict, t.reason) == ("REJECT", "no-endpoints"), t.matched


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_a_local_policy_without_local_endpoints_drops_outside_traffic(mode: str) -> None:
    t = trace(engine(mode), OUTSIDE, NODE_IP, 30081)
    assert (t.verdict, t.reason) == ("DROP", "no-local-endpoints"), t.matched


@pytest.mark.parametrize("mode", MODES)
def test_a_source_outside_the_ranges_is_dropped_for_that_reason(mode: str) -> None:
    e = engine(mode)
    t = trace(e, OUTSIDE, LB_IP, 80)
    assert (t.verdict, t.reason) == ("DROP", "source-range"), t.matched
    inside = trace(e, "10.1.2.3", LB_IP, 80)
    assert inside.dnat == ["10.244.1.5:8080"] and inside.reason is None, inside.matched


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("nftables", ("REJECT", "no-service-port")),  # cluster-ips-check
        ("ipvs", ("REJECT", "no-service-port")),  # KUBE-IPVS-FILTER
        ("iptables", (None, None)),  # upstream's iptables layout leaves it to the route
    ],
)
def test_another_port_of_a_cluster_ip(mode: str, expected: tuple[str | None, str | None]) -> None:
    t = trace(engine(mode), OUTSIDE, "10.96.0.23", 22)
    assert (t.verdict, t.reason) == expected, t.matched


@pytest.mark.parametrize("mode", MODES)
def test_an_accepted_connection_has_no_reason(mode: str) -> None:
    t = trace(engine(mode), "10.244.4.2", "10.96.0.23", 80)
    assert t.dnat == ["10.244.1.5:8080"] and t.reason is None, t.matched


CIDRS = ChangeSet(service_cidrs=("10.96.0.0/16", "fd00:10:96::/112"))


@pytest.mark.parametrize("mode", MODES)
def test_unallocated_addresses_of_the_service_cidrs(mode: str) -> None:
    """nftables drops what no Service holds inside the ServiceCIDRs (upstream's
    cluster-ips-check); the other modes do not use them, as upstream."""
    e = engine(mode)
    e.sync(CIDRS.to_json(), False)
    never = trace(e, "10.244.4.2", "10.96.0.99", 80)
    wrong_port = trace(e, "10.244.4.2", "10.96.0.23", 22)
    served = trace(e, "10.244.4.2", "10.96.0.23", 80)
    outside = trace(e, "10.244.4.2", "10.97.0.5", 80)
    # The Service goes: its address is unallocated now.
    e.sync(ChangeSet({WEB: None}, {WEB: ()}).to_json(), False)
    freed = trace(e, "10.244.4.2", "10.96.0.23", 80)
    assert served.dnat == ["10.244.1.5:8080"]
    assert (outside.verdict, outside.reason) == (None, None)
    if mode == "nftables":
        assert (never.verdict, never.reason) == ("DROP", "unallocated-cluster-ip")
        assert (wrong_port.verdict, wrong_port.reason) == ("REJECT", "no-service-port")
        assert (freed.verdict, freed.reason) == ("DROP", "unallocated-cluster-ip")
    else:
        assert never.reason is None and freed.reason is None
    # The ServiceCIDR goes: nothing is dropped for it any more.
    e.sync(ChangeSet(service_cidrs=()).to_json(), False)
    assert trace(e, "10.244.4.2", "10.96.0.99", 80).verdict is None
