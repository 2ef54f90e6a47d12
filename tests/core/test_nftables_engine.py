"""The nftables engine through its Python binding, on the in-memory kernel: canonical layouts
(golden files), shared sets whose number does not grow with the Services, and element diffs."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from kproxy import _core
from kproxy.model import Endpoint, EndpointSlice, Family, PortSpec, Service, ServiceKey, SlicePort
from kproxy.tracker import ChangeSet, merge_slices

GOLDEN = Path(__file__).parent / "golden"
NODE, NODE_IP = "test-node", "192.168.0.2"


def engine(**cfg: object) -> _core.Engine:
    base: dict[str, object] = {
        "family": "IPv4",
        "node_name": NODE,
        "cluster_cidrs": ["10.0.0.0/8"],
        "node_ips": [NODE_IP],
        "backend": "fake",
        "mode": "nftables",
    }
    base.update(cfg)
    return _core.Engine(json.dumps(base))


def svc(name: str = "svc1", ip: str = "172.30.0.41", **kw: object) -> Service:
    fields: dict[str, object] = {
        "key": ServiceKey("ns1", name),
        "ports": (PortSpec("p80", "TCP", 80, 3001),),
        "cluster_ips": (ip,),
        "externally_accessible": True,
    }
    fields.update(kw)
    return Service(**fields)  # type: ignore[arg-type]


def slice_of(name: str, *eps: Endpoint, family: Family = "IPv4") -> ChangeSet:
    key = ServiceKey("ns1", name)
    s = EndpointSlice("ns1", f"{name}-1", key, family, (SlicePort("p80", "TCP", 80),), eps)
    return ChangeSet(endpoints={key: merge_slices([s])})


def ep(ip: str, node: str = NODE) -> Endpoint:
    return Endpoint(ip, node_name=node)


def sets_and_maps(script: str) -> set[str]:
    return set(re.findall(r"^add (?:set|map) ip6? kproxy (\S+)", script, re.M))


SCENARIOS = {
    "nftables-nodeport-3-endpoints": (
        svc(),
        (ep("10.180.0.2"), ep("10.180.0.1"), ep("10.180.0.3", "other")),
    ),
    "nftables-lb-local-affinity-source-ranges": (
        svc(
            external_traffic_policy="Local",
            session_affinity_timeout=10800,
            load_balancer_ips=("5.6.7.8",),
            load_balancer_source_ranges=("203.0.113.0/24", "192.168.0.0/16"),
        ),
        (ep("10.180.0.1"), ep("10.180.0.2", "other")),
    ),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_render_is_deterministic_and_matches_the_golden_file(name: str) -> None:
    service, endpoints = SCENARIOS[name]

    def build() -> str:
        e = engine()
        e.sync(ChangeSet(services={service.key: service}).to_json())
        e.sync(slice_of(service.key.name, *endpoints).to_json())
        return e.render()

    text = build()
    assert text == build()
    golden = GOLDEN / f"{name}.txt"
    if os.environ.get("KPROXY_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


def test_the_number_of_sets_does_not_grow_with_the_services() -> None:
    def render(n: int) -> str:
        e = engine()
        services: dict[ServiceKey, Service | None] = {
            ServiceKey("ns1", f"s{i}"): svc(f"s{i}", f"172.30.{i // 250}.{i % 250 + 1}")
            for i in range(n)
        }
        e.sync(ChangeSet(services=services).to_json())
        for i in range(n):
            e.sync(
                slice_of(
                    f"s{i}", *(ep(f"10.{i // 250}.{i % 250}.{j}") for j in (1, 2, 3))
                ).to_json()
            )
        return e.render()

    small, large = render(3), render(400)
    assert sets_and_maps(small) == sets_and_maps(large)
    # One endpoint pool serves every Service with three endpoints.
    assert {s for s in sets_and_maps(large) if "endpoints-" in s} == {
        "endpoints-3",
        "nodeport-endpoints-3",
    }
    assert large.count("numgen random mod 3 map") == small.count("numgen random mod 3 map") == 6


def test_an_endpoint_change_is_a_handful_of_element_updates() -> None:
    e = engine()
    services: dict[ServiceKey, Service | None] = {
        ServiceKey("ns1", f"s{i}"): svc(
            f"s{i}", f"172.30.0.{i + 1}", ports=(PortSpec("p80", "TCP", 80, 30000 + i),)
        )
        for i in range(50)
    }
    e.sync(ChangeSet(services=services).to_json())
    for i in range(50):
        e.sync(slice_of(f"s{i}", ep(f"10.1.{i}.1"), ep(f"10.1.{i}.2")).to_json())
    r = e.sync(slice_of("s7", ep("10.1.7.1"), ep("10.1.7.9")).to_json())
    assert not r.full and r.transactions == 1
    # One endpoint replaced: its two pool entries (cluster IP, NodePort) and its hairpin entry.
    assert isinstance(m := r.mode, _core.NftablesReport)
    assert (m.elements_deleted, m.elements_added) == (3, 3)
    assert m.chains_written == 0
    t = e.trace(_core.Packet("10.2.0.5", "172.30.0.8", "TCP", 80, "external", [NODE_IP]))
    assert sorted(t.dnat) == ["10.1.7.1:80", "10.1.7.9:80"]


def test_a_pool_left_empty_is_deleted() -> None:
    e = engine()
    key = ServiceKey("ns1", "svc1")
    e.sync(ChangeSet(services={key: svc()}).to_json())
    e.sync(slice_of("svc1", ep("10.1.0.1"), ep("10.1.0.2")).to_json())
    assert "endpoints-2" in e.dump()
    r = e.sync(slice_of("svc1", ep("10.1.0.1")).to_json())
    assert r.transactions == 2  # the change, then the cleanup of what nothing references
    assert "endpoints-2" not in e.dump() and "endpoints-1" in e.dump()


def test_two_services_claiming_one_external_ip_first_wins_then_the_other_takes_over() -> None:
    e = engine()
    a = svc("a", "172.30.0.1", external_ips=("192.168.9.9",))
    b = svc("b", "172.30.0.2", external_ips=("192.168.9.9",))
    e.sync(ChangeSet(services={a.key: a, b.key: b}).to_json())
    e.sync(slice_of("a", ep("10.1.0.1")).to_json())
    e.sync(slice_of("b", ep("10.2.0.1")).to_json())

    def dst() -> list[str]:
        return e.trace(
            _core.Packet("10.9.0.1", "192.168.9.9", "TCP", 80, "external", [NODE_IP])
        ).dnat

    assert dst() == ["10.1.0.1:80"]
    e.sync(ChangeSet(services={a.key: None}).to_json())
    assert dst() == ["10.2.0.1:80"]


def test_ipv6_engine() -> None:
    e = engine(family="IPv6", cluster_cidrs=["fd00:10::/64"], node_ips=["fd00::2"])
    s = svc(cluster_ips=("fd00:30::41",))
    e.sync(ChangeSet(services={s.key: s}).to_json())
    e.sync(slice_of("svc1", ep("fd00:10::5"), ep("fd00:10::6"), family="IPv6").to_json())
    text = e.render()
    assert "add table ip6 kproxy" in text and "ip6 daddr != ::1/128" in text
    t = e.trace(_core.Packet("fd00:99::1", "fd00:30::41", "TCP", 80, "external", ["fd00::2"]))
    assert sorted(t.dnat) == ["[fd00:10::5]:80", "[fd00:10::6]:80"] and t.masquerade


def test_unknown_port_of_a_cluster_ip_is_rejected_and_nodeports_are_not_filtered() -> None:
    e = engine()
    s = svc(health_check_node_port=32000)
    e.sync(ChangeSet(services={s.key: s}).to_json())
    e.sync(slice_of("svc1", ep("10.1.0.1")).to_json())
    t = e.trace(_core.Packet("10.9.0.1", "172.30.0.41", "TCP", 81, "external", [NODE_IP]))
    assert t.dnat == [] and t.verdict == "REJECT"
    # As upstream's nftables mode: no ACCEPT rules for NodePorts or health-check ports.
    assert "32000" not in e.render()
