"""Topology-aware routing with real packets, one step of upstream's rule at a time: the same
Service's EndpointSlice hinted for this node, then for its zone, then not at all, and the
connections a pod opens through the ClusterIP go where each step says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests import k8sobjects as k
from tests.privileged.harness import ECHO_IP, NODE, TCP_PORT, echo_service, proxy_lab

pytestmark = pytest.mark.privileged

# (ip, node, zone) of the lab's three pods; the node is in zone z1.
PODS = [("10.244.1.2", NODE, "z1"), ("10.244.2.2", "node-b", "z1"), ("10.244.3.2", "node-c", "z2")]


def hinted(nodes: list[str] | None, zones: list[str] | None) -> k.Obj:
    eps = []
    for i, (ip, node, zone) in enumerate(PODS):
        e = k.endpoint(ip, node=node, zone=zone)
        hints: dict[str, Any] = {}
        if nodes is not None:
            hints["forNodes"] = [{"name": nodes[i]}]
        if zones is not None:
            hints["forZones"] = [{"name": zones[i]}]
        if hints:
            e["hints"] = hints
        eps.append(e)
    ports = [k.slice_port("tcp", TCP_PORT, "TCP"), k.slice_port("udp", 8081, "UDP")]
    return k.endpoint_slice("echo-1", "echo", eps, ports)


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_each_step_of_the_topology_rule_with_real_connections(tmp_path: Path, mode: str) -> None:
    steps = [
        ("same node", hinted([NODE, "node-b", "node-c"], ["z1", "z1", "z2"]), {"pod1"}),
        ("same zone", hinted(None, ["z1", "z1", "z2"]), {"pod1", "pod2"}),
        ("no hints", hinted(None, None), {"pod1", "pod2", "pod3"}),
    ]
    with proxy_lab(tmp_path, [echo_service(), steps[0][1]], mode=mode) as lab:
        lab.put(k.node(NODE, addresses=[lab.lab.node_ip], zone="z1"))
        lab.start_daemon()
        lab.wait_synced()
        client = lab.lab.pod("client")
        for i, (step, eps, want) in enumerate(steps):
            if i:
                lab.put(eps)
            ips = {PODS[int(name[-1]) - 1][0] for name in want}

            def programmed(ips: set[str] = ips) -> bool:
                return {t.split(":")[0] for t in lab.dnat_targets()} == ips

            lab.wait(programmed, 15, f"the {step} step's rules")
            results = client.tcp_probe_many(ECHO_IP, 80, 30)
            assert all(r.ok for r in results), (step, results[:3])
            assert {r.server for r in results} == want, step
