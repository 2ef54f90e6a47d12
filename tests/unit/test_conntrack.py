"""Which UDP flows the conntrack reconciler deletes (upstream's CleanStaleEntries matrix)."""

from __future__ import annotations

import socket
from types import SimpleNamespace
from typing import Any

from kproxy.conntrack import stale, targets
from kproxy.model import Endpoint, EndpointSlice, PortSpec, Service, ServiceKey, SlicePort
from kproxy.tracker import merge_slices

UDP, TCP = socket.IPPROTO_UDP, socket.IPPROTO_TCP
KEY = ServiceKey("ns", "dns")
SVC = Service(
    KEY,
    (PortSpec("dns", "UDP", 53, 30053), PortSpec("tcp", "TCP", 53)),
    cluster_ips=("172.30.0.10",),
    external_ips=("192.168.99.11",),
    load_balancer_ips=("1.2.3.4",),
)
SERVING, NOT_SERVING, TERMINATING = "10.0.0.1", "10.0.0.2", "10.0.0.3"


def flow(dst: str, dport: int, reply_src: str, proto: int = UDP) -> Any:
    orig = SimpleNamespace(saddr="10.9.9.9", daddr=dst, dport=dport, proto=proto)
    reply = SimpleNamespace(saddr=reply_src, daddr="10.9.9.9", dport=5353, proto=proto)
    return SimpleNamespace(tuple_orig=orig, tuple_reply=reply, name=f"{dst}:{dport}<-{reply_src}")


def eps() -> Any:
    e = (
        Endpoint(SERVING),
        Endpoint(NOT_SERVING, ready=False, serving=False),
        Endpoint(TERMINATING, ready=False, serving=True, terminating=True),
    )
    sl = EndpointSlice("ns", "dns-1", KEY, "IPv4", (SlicePort("dns", "UDP", 5353),), e)
    return merge_slices([sl])


def names(flows: list[Any]) -> set[str]:
    return {f.name for f in flows}


def test_flows_to_service_addresses_keep_only_serving_endpoints() -> None:
    t = targets([(KEY, SVC)], {KEY: eps()})
    flows = []
    for dst in ("172.30.0.10", "192.168.99.11", "1.2.3.4"):
        for src in (SERVING, NOT_SERVING, TERMINATING, dst, "10.0.0.99"):
            flows.append(flow(dst, 53, src))
            flows.append(flow(dst, 53, src, TCP))  # TCP is never touched
        flows.append(flow(dst, 54, NOT_SERVING))  # another port: not ours
    got = names(stale(flows, t))
    want = {
        f"{dst}:53<-{src}"
        for dst in ("172.30.0.10", "192.168.99.11", "1.2.3.4")
        # dst itself: a flow that started before any rule existed (never DNATed)
        for src in (NOT_SERVING, dst, "10.0.0.99")
    }
    assert got == want


def test_node_port_flows() -> None:
    t = targets([(KEY, SVC)], {KEY: eps()})
    flows = [flow("192.168.0.2", 30053, s) for s in (SERVING, NOT_SERVING, "192.168.0.2")]
    assert names(stale(flows, t)) == {
        "192.168.0.2:30053<-10.0.0.2",
        "192.168.0.2:30053<-192.168.0.2",
    }


def test_services_without_endpoints_and_deleted_services() -> None:
    t = targets([(KEY, SVC)], {})
    assert names(stale([flow("172.30.0.10", 53, SERVING)], t)) == {"172.30.0.10:53<-10.0.0.1"}
    gone = targets([], {}, deleted=[SVC])
    assert names(stale([flow("172.30.0.10", 53, SERVING), flow("1.2.3.4", 53, SERVING)], gone)) == {
        "172.30.0.10:53<-10.0.0.1",
        "1.2.3.4:53<-10.0.0.1",
    }
    # Flows to anything else stay.
    assert stale([flow("172.30.0.99", 53, "172.30.0.99")], t) == []
