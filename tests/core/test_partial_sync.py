"""Partial syncs are an optimization only: any sequence of them leaves the kernel exactly as
one full sync of the final state would (checked on the in-memory kernel, in both netfilter
modes)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kproxy import _core
from kproxy.model import Endpoint, EndpointSlice, PortSpec, Service, ServiceKey, SlicePort
from kproxy.tracker import ChangeSet, merge_slices

NAMES = [ServiceKey("ns", f"s{i}") for i in range(6)]


def engine(mode: str) -> _core.Engine:
    cfg = {
        "family": "IPv4",
        "node_name": "node-a",
        "cluster_cidrs": ["10.0.0.0/8"],
        "backend": "fake",
        "mode": mode,
    }
    return _core.Engine(json.dumps(cfg))


@st.composite
def services(draw: Any, key: ServiceKey) -> Service:
    n_ports = draw(st.integers(1, 2))
    ports = tuple(
        PortSpec(
            f"p{i}",
            draw(st.sampled_from(["TCP", "UDP"])),
            draw(st.sampled_from([80, 443, 53])),
            draw(st.sampled_from([0, 0, 30000 + i, 30100 + i])),
        )
        for i in range(n_ports)
    )
    # Addresses are drawn from a small pool so services share dispatch buckets.
    ip = f"172.30.{draw(st.integers(0, 1))}.{draw(st.sampled_from([1, 17, 33, 2]))}"
    external = draw(st.sampled_from([(), ("192.168.99.11",)]))
    lb = draw(st.sampled_from([(), ("1.2.3.4",)]))
    return Service(
        key,
        ports,
        cluster_ips=(ip,),
        external_ips=external,
        load_balancer_ips=lb,
        load_balancer_source_ranges=draw(st.sampled_from([(), ("203.0.113.0/25",)])),
        externally_accessible=bool(external or lb or any(p.node_port for p in ports)),
        external_traffic_policy=draw(st.sampled_from(["Cluster", "Local"])),
        internal_traffic_policy=draw(st.sampled_from(["Cluster", "Local"])),
        session_affinity_timeout=draw(st.sampled_from([None, 300])),
        health_check_node_port=draw(st.sampled_from([0, 32000])),
    )


@st.composite
def endpoints(draw: Any, key: ServiceKey) -> tuple[Any, ...]:
    eps = tuple(
        Endpoint(
            f"10.180.0.{draw(st.integers(1, 6))}",
            ready=draw(st.booleans()),
            serving=draw(st.booleans()),
            terminating=draw(st.booleans()),
            node_name=draw(st.sampled_from(["node-a", "node-b"])),
        )
        for _ in range(draw(st.integers(0, 3)))
    )
    ports = (SlicePort("p0", "TCP", 8080), SlicePort("p1", "UDP", 5353))
    return merge_slices([EndpointSlice(key.namespace, f"{key.name}-1", key, "IPv4", ports, eps)])


@st.composite
def change_sets(draw: Any) -> ChangeSet:
    svcs: dict[ServiceKey, Service | None] = {}
    eps: dict[ServiceKey, Any] = {}
    for key in draw(st.lists(st.sampled_from(NAMES), max_size=3, unique=True)):
        svcs[key] = draw(st.one_of(st.none(), services(key)))
    for key in draw(st.lists(st.sampled_from(NAMES), max_size=3, unique=True)):
        eps[key] = draw(endpoints(key))
    return ChangeSet(svcs, eps)


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(change_sets(), min_size=1, max_size=8))
def test_partial_syncs_equal_one_full_sync(mode: str, steps: list[ChangeSet]) -> None:
    incremental = engine(mode)
    final_services: dict[ServiceKey, Service | None] = {}
    final_endpoints: dict[ServiceKey, Any] = {}
    for i, cs in enumerate(steps):
        report = incremental.sync(cs.to_json())
        assert report.full == (i == 0)
        final_services.update(cs.services)
        final_endpoints.update(cs.endpoints)
    final = ChangeSet(
        {k: v for k, v in final_services.items() if v is not None},
        {k: v for k, v in final_endpoints.items() if v},
    )
    fresh = engine(mode)
    fresh.sync(final.to_json(), full=True)
    assert incremental.dump() == fresh.dump()
    # And a full resync of the incremental engine changes nothing either.
    incremental.sync(b"{}", full=True)
    assert incremental.dump() == fresh.dump()
