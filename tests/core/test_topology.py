"""Topology-aware routing, upstream's three steps, through the tracer in every kernel mode.

For Cluster-policy traffic, over the ready endpoints: (1) when every one carries node hints
and one names this node, only the endpoints hinted for this node (PreferSameNode); else
(2) when every one carries zone hints and one names this node's zone, only those
(PreferSameZone, and PreferClose, its alias on the API side); else (3) all of them. Partial
hints, hints naming nothing usable, and a node without a zone fall through to the next step.
"""

from __future__ import annotations

from typing import Any

import pytest

from kproxy import api
from tests import k8sobjects as k

NODE, ZONE = "node-a", "z1"
CLUSTER_IP = "10.96.0.10"
# (ip, node, zone) of three endpoints.
EPS = [
    ("10.244.1.2", "node-a", "z1"),
    ("10.244.2.2", "node-b", "z1"),
    ("10.244.3.2", "node-c", "z2"),
]
A, B, C = (f"{ip}:8080" for ip, _, _ in EPS)


def endpoints(
    node_hints: list[list[str] | None], zone_hints: list[list[str] | None], ready: list[bool]
) -> list[k.Obj]:
    out = []
    for (ip, node, zone), nodes, zones, is_ready in zip(
        EPS, node_hints, zone_hints, ready, strict=True
    ):
        e = k.endpoint(ip, node=node, zone=zone, ready=is_ready)
        hints: dict[str, Any] = {}
        if nodes is not None:
            hints["forNodes"] = [{"name": n} for n in nodes]
        if zones is not None:
            hints["forZones"] = [{"name": z} for z in zones]
        if hints:
            e["hints"] = hints
        out.append(e)
    return out


ALL = [True, True, True]
Hints = list[list[str] | None]
CASES: dict[str, tuple[Hints, Hints, list[bool], set[str]]] = {
    "no hints: all": ([None] * 3, [None] * 3, ALL, {A, B, C}),
    "node hints, one for this node: that one": (
        [["node-a"], ["node-b"], ["node-c"]], [["z1"], ["z1"], ["z2"]], ALL, {A}),
    "node hints naming another node for all: falls to the zone": (
        [["node-b"], ["node-b"], ["node-c"]], [["z1"], ["z1"], ["z2"]], ALL, {A, B}),
    "a node hint missing: falls to the zone": (
        [["node-a"], ["node-b"], None], [["z1"], ["z1"], ["z2"]], ALL, {A, B}),
    "zone hints, this zone on two: those two": ([None] * 3, [["z1"], ["z1"], ["z2"]], ALL, {A, B}),
    "zone hints naming no zone of ours: all": (
        [None] * 3, [["z9"], ["z9"], ["z2"]], ALL, {A, B, C}),
    "a zone hint missing: all": ([None] * 3, [["z1"], None, ["z2"]], ALL, {A, B, C}),
    "an unready endpoint's missing hints do not count": (
        [None] * 3, [["z1"], ["z2"], None], [True, True, False], {A}),
    "two hints on one endpoint: it serves both": (
        [None] * 3, [["z2"], ["z2", "z1"], ["z2"]], ALL, {B}),
}  # fmt: skip


@pytest.mark.parametrize("mode", ["iptables", "nftables", "ipvs"])
@pytest.mark.parametrize("case", list(CASES))
def test_three_step_rule(mode: str, case: str) -> None:
    node_hints, zone_hints, ready, want = CASES[case]
    objects = [
        k.node(NODE, addresses=["192.168.1.10"], zone=ZONE),
        k.service("web", CLUSTER_IP, [k.port("http", 80, target=8080)]),
        k.endpoint_slice(
            "web-1", "web", endpoints(node_hints, zone_hints, ready), [k.slice_port("http", 8080)]
        ),
    ]
    cluster = api.Cluster.from_objects(
        objects, node=NODE, mode=mode, cluster_cidrs=["10.244.0.0/16"]
    )
    t = cluster.trace("10.244.9.9", CLUSTER_IP, 80)
    assert set(t.dnat) == want, (case, t.dnat, t.matched)


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_a_node_without_a_zone_ignores_zone_hints(mode: str) -> None:
    objects = [
        k.node(NODE, addresses=["192.168.1.10"]),
        k.service("web", CLUSTER_IP, [k.port("http", 80, target=8080)]),
        k.endpoint_slice(
            "web-1", "web", endpoints([None] * 3, [["z1"], ["z1"], ["z2"]], ALL),
            [k.slice_port("http", 8080)],
        ),
    ]  # fmt: skip
    cluster = api.Cluster.from_objects(objects, node=NODE, mode=mode)
    assert set(cluster.trace("10.244.9.9", CLUSTER_IP, 80).dnat) == {A, B, C}
