"""Property (both netfilter modes): for random cluster states, every traced packet reaches
exactly the endpoints its traffic type and policies allow (an independent model of upstream's
rules decides which), and is rejected or dropped exactly when upstream would."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kproxy import _core
from kproxy.model import Endpoint, EndpointSlice, PortSpec, Service, ServiceKey, SlicePort
from kproxy.tracker import ChangeSet, merge_slices

NODE, NODE_IP = "node-a", "192.168.0.2"
POD, OUTSIDE = "10.0.0.2", "203.0.113.2"


@dataclass(frozen=True)
class Case:
    svc: Service
    eps: tuple[Endpoint, ...]


@st.composite
def cases(draw: Any, i: int) -> Case:
    key = ServiceKey("ns", f"s{i}")
    eps = tuple(
        Endpoint(
            f"10.180.{i}.{j + 1}",
            ready=(ready := draw(st.booleans())),
            serving=draw(st.booleans()) or ready,
            terminating=draw(st.booleans()) if not ready else False,
            node_name=draw(st.sampled_from([NODE, "node-b"])),
        )
        for j in range(draw(st.integers(0, 4)))
    )
    svc = Service(
        key,
        (PortSpec("p", "TCP", 80, 30000 + i),),
        cluster_ips=(f"172.30.0.{i + 1}",),
        external_ips=(f"192.168.99.{i + 1}",),
        externally_accessible=True,
        external_traffic_policy=draw(st.sampled_from(["Cluster", "Local"])),
        internal_traffic_policy=draw(st.sampled_from(["Cluster", "Local"])),
    )
    return Case(svc, eps)


def cluster_set(eps: tuple[Endpoint, ...]) -> set[str]:
    ready = {e.ip for e in eps if e.ready}
    return ready or {e.ip for e in eps if e.serving and e.terminating}


def local_set(eps: tuple[Endpoint, ...]) -> set[str]:
    mine = tuple(e for e in eps if e.node_name == NODE)
    ready = {e.ip for e in mine if e.ready}
    return ready or {e.ip for e in mine if e.serving and e.terminating}


def expected(case: Case, external_dst: bool, from_pod: bool) -> tuple[set[str], str | None]:
    """(endpoints, filter verdict) upstream's rules give the first packet."""
    any_usable = bool(cluster_set(case.eps))
    local = case.svc.external_traffic_policy if external_dst else case.svc.internal_traffic_policy
    if external_dst and from_pod:
        local = "Cluster"  # pods short-circuit the external policy
    eps = local_set(case.eps) if local == "Local" else cluster_set(case.eps)
    if eps:
        return eps, None
    return set(), ("REJECT" if not any_usable else "DROP")


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 5).flatmap(lambda n: st.tuples(*[cases(i) for i in range(n)])))
def test_traced_packets_reach_only_allowed_endpoints(
    mode: str, all_cases: tuple[Case, ...]
) -> None:
    cfg = {
        "family": "IPv4",
        "node_name": NODE,
        "cluster_cidrs": ["10.0.0.0/8"],
        "backend": "fake",
        "mode": mode,
    }
    engine = _core.Engine(json.dumps(cfg))
    services: dict[ServiceKey, Service | None] = {c.svc.key: c.svc for c in all_cases}
    endpoints = {
        c.svc.key: merge_slices(
            [
                EndpointSlice(
                    "ns",
                    f"{c.svc.key.name}-1",
                    c.svc.key,
                    "IPv4",
                    (SlicePort("p", "TCP", 8080),),
                    c.eps,
                )
            ]
        )
        for c in all_cases
    }
    engine.sync(ChangeSet(services, endpoints).to_json())
    for i, case in enumerate(all_cases):
        for src, from_pod in ((POD, True), (OUTSIDE, False)):
            for dst, port, external in (
                (f"172.30.0.{i + 1}", 80, False),
                (f"192.168.99.{i + 1}", 80, True),
                (NODE_IP, 30000 + i, True),
            ):
                t = engine.trace(_core.Packet(src, dst, "TCP", port, "external", [NODE_IP]))
                want_eps, want_verdict = expected(case, external, from_pod)
                got = {d.rsplit(":", 1)[0] for d in t.dnat}
                assert got == want_eps, (case, src, dst, t.matched)
                if want_verdict is not None:
                    assert t.verdict == want_verdict, (case, src, dst, t.matched)
