"""Upstream's proxier test matrix, traced through the rules kproxy renders.

Fixture plan as upstream's proxier tests: pods in 10.0.0.0/8, this node is ``node-a`` at
192.168.0.2, cluster IPs in 172.30.0.0/16, an external IP 192.168.99.11, LB IP 1.2.3.4,
outside clients 203.0.113.0/24 (the LB source range allows 203.0.113.0/25).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from kproxy import _core
from kproxy.model import Origin, Protocol
from kproxy.normalize import normalize_endpoint_slice, normalize_service
from kproxy.tracker import ChangeSet, merge_slices
from tests import k8sobjects as k

NODE_IP = "192.168.0.2"
POD = "10.0.0.2"  # a pod on this node that is not an endpoint
EXTERNAL_CLIENT = "203.0.113.2"
BLOCKED_CLIENT = "203.0.113.130"
EP_LOCAL, EP_REMOTE1, EP_REMOTE2 = "10.180.0.1", "10.180.1.1", "10.180.2.1"


class Cluster:
    def __init__(self, **cfg: Any) -> None:
        base: dict[str, Any] = {
            "family": "IPv4",
            "node_name": "node-a",
            "cluster_cidrs": ["10.0.0.0/8"],
            "node_ips": [NODE_IP],
            "backend": "fake",
        }
        base.update(cfg)
        self.engine = _core.Engine(json.dumps(base))

    def add(self, svc: dict[str, Any], *slices: dict[str, Any]) -> None:
        s = normalize_service(svc).value
        assert s is not None
        normalized = [normalize_endpoint_slice(sl).value for sl in slices]
        merged = merge_slices([n for n in normalized if n is not None])
        self.engine.sync(ChangeSet({s.key: s}, {s.key: merged}).to_json())

    def trace(
        self, src: str, dst: str, port: int, proto: Protocol = "TCP", origin: Origin = "external"
    ) -> _core.Trace:
        return _core.trace_iptables(
            self.engine.dump(), _core.Packet(src, dst, proto, port, origin, [NODE_IP])
        )


def endpoints(
    *specs: tuple[str, str] | tuple[str, str, dict[str, bool]], port: int = 80, proto: str = "TCP"
) -> dict[str, Any]:
    eps = []
    for spec in specs:
        ip, node = spec[0], spec[1]
        cond: dict[str, bool] = spec[2] if len(spec) > 2 else {}
        eps.append(
            k.endpoint(
                ip,
                node=node,
                ready=cond.get("ready", True),
                serving=cond.get("serving"),
                terminating=cond.get("terminating", False),
            )
        )
    return k.endpoint_slice(
        "svc1-1", "svc1", eps, [k.slice_port("p80", port, proto)], namespace="ns1"
    )


def svc1(**spec: Any) -> dict[str, Any]:
    ports = spec.pop("ports", [k.port("p80", 80, node_port=3001)])
    return k.service("svc1", "172.30.0.41", ports, namespace="ns1", **spec)


def targets(t: _core.Trace) -> set[str]:
    return {d.rsplit(":", 1)[0] for d in t.dnat}


ALL_EPS = (EP_LOCAL, "node-a"), (EP_REMOTE1, "node-b"), (EP_REMOTE2, "node-c")


def test_cluster_ip_general() -> None:
    c = Cluster()
    c.add(svc1(type="NodePort"), endpoints(*ALL_EPS))
    t = c.trace(POD, "172.30.0.41", 80)
    assert targets(t) == {EP_LOCAL, EP_REMOTE1, EP_REMOTE2} and not t.masquerade
    # From outside the cluster CIDR: masqueraded.
    assert c.trace(EXTERNAL_CLIENT, "172.30.0.41", 80).masquerade
    # Hairpin: an endpoint reaching itself through the service is masqueraded.
    assert c.trace(EP_REMOTE1, "172.30.0.41", 80).masquerade
    # Wrong port or protocol: untouched.
    assert c.trace(POD, "172.30.0.41", 81).dnat == []
    assert c.trace(POD, "172.30.0.41", 80, "UDP").dnat == []
    # From the node itself (OUTPUT).
    assert targets(c.trace(NODE_IP, "172.30.0.41", 80, origin="local")) == targets(t)


def test_target_port_and_protocols_are_told_apart() -> None:
    c = Cluster()
    ports = [k.port("tcp", 53, "TCP", target=5353), k.port("udp", 53, "UDP", target=5354)]
    c.add(
        svc1(ports=ports),
        k.endpoint_slice(
            "svc1-1", "svc1", [k.endpoint(EP_LOCAL, node="node-a")],
            [k.slice_port("tcp", 5353, "TCP"), k.slice_port("udp", 5354, "UDP")], namespace="ns1",
        ),
    )  # fmt: skip
    assert c.trace(POD, "172.30.0.41", 53, "TCP").dnat == [f"{EP_LOCAL}:5353"]
    assert c.trace(POD, "172.30.0.41", 53, "UDP").dnat == [f"{EP_LOCAL}:5354"]
    assert c.trace(POD, "172.30.0.41", 53, "SCTP").dnat == []


def test_no_endpoints_rejects_every_traffic_type() -> None:
    c = Cluster()
    c.add(
        svc1(
            type="LoadBalancer",
            externalIPs=["192.168.99.11"],
            ports=[k.port("p80", 80, node_port=3001)],
        ),
        endpoints(),
    )
    obj = svc1(type="LoadBalancer", externalIPs=["192.168.99.11"])
    obj["status"] = {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}
    c.add(obj, endpoints())
    for src in (POD, EXTERNAL_CLIENT):
        for dst, port in (
            ("172.30.0.41", 80),
            ("192.168.99.11", 80),
            ("1.2.3.4", 80),
            (NODE_IP, 3001),
        ):
            t = c.trace(src, dst, port)
            assert t.verdict == "REJECT" and t.dnat == [], (src, dst, t)


def test_node_ports() -> None:
    c = Cluster()
    c.add(svc1(type="NodePort"), endpoints(*ALL_EPS))
    t = c.trace(EXTERNAL_CLIENT, NODE_IP, 3001)
    assert targets(t) == {EP_LOCAL, EP_REMOTE1, EP_REMOTE2} and t.masquerade
    # Not on loopback (localhost NodePorts are off in this version), not on other addresses.
    assert c.trace(NODE_IP, "127.0.0.1", 3001, origin="local").dnat == []
    assert c.trace(EXTERNAL_CLIENT, "192.168.0.99", 3001).dnat == []


def test_node_port_addresses_limit_where_node_ports_answer() -> None:
    c = Cluster(nodeport_ips=["192.168.0.2"])
    c.add(svc1(type="NodePort"), endpoints(*ALL_EPS))
    assert c.trace(EXTERNAL_CLIENT, NODE_IP, 3001).dnat
    # A second local address that nodePortAddresses excludes.
    t = _core.trace_iptables(
        c.engine.dump(),
        _core.Packet(
            EXTERNAL_CLIENT, "192.168.1.2", "TCP", 3001, "external", [NODE_IP, "192.168.1.2"]
        ),
    )
    assert t.dnat == []


def test_external_traffic_policy_local() -> None:
    c = Cluster()
    c.add(
        svc1(type="NodePort", externalTrafficPolicy="Local", externalIPs=["192.168.99.11"]),
        endpoints(*ALL_EPS),
    )
    for dst, port in ((NODE_IP, 3001), ("192.168.99.11", 80)):
        t = c.trace(EXTERNAL_CLIENT, dst, port)
        assert targets(t) == {EP_LOCAL} and not t.masquerade, (dst, t)
        # Pods are not subject to the policy, and keep their address.
        p = c.trace(POD, dst, port)
        assert targets(p) == {EP_LOCAL, EP_REMOTE1, EP_REMOTE2} and not p.masquerade
    # The cluster IP ignores the external policy.
    assert len(targets(c.trace(EXTERNAL_CLIENT, "172.30.0.41", 80))) == 3
    # From the node itself to the external IP: the cluster-wide set, masqueraded.
    n = c.trace(NODE_IP, "192.168.99.11", 80, origin="local")
    assert len(targets(n)) == 3 and n.masquerade


def test_external_traffic_policy_local_without_local_endpoints_drops_outside_traffic() -> None:
    c = Cluster()
    c.add(svc1(type="NodePort", externalTrafficPolicy="Local"), endpoints(*ALL_EPS[1:]))
    t = c.trace(EXTERNAL_CLIENT, NODE_IP, 3001)
    assert t.dnat == [] and t.verdict == "DROP"
    assert len(targets(c.trace(POD, NODE_IP, 3001))) == 2


def test_external_traffic_policy_cluster_masquerades_every_external_path() -> None:
    c = Cluster()
    obj = svc1(type="LoadBalancer", externalIPs=["192.168.99.11"])
    obj["status"] = {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}
    c.add(obj, endpoints(*ALL_EPS))
    for dst, port in ((NODE_IP, 3001), ("192.168.99.11", 80), ("1.2.3.4", 80)):
        for src in (EXTERNAL_CLIENT, POD):
            t = c.trace(src, dst, port)
            assert len(targets(t)) == 3 and t.masquerade, (src, dst, t)
    assert not c.trace(POD, "172.30.0.41", 80).masquerade


def test_internal_traffic_policy_local() -> None:
    c = Cluster()
    c.add(svc1(internalTrafficPolicy="Local"), endpoints(*ALL_EPS))
    assert targets(c.trace(POD, "172.30.0.41", 80)) == {EP_LOCAL}
    c.add(svc1(internalTrafficPolicy="Local"), endpoints(*ALL_EPS[1:]))
    t = c.trace(POD, "172.30.0.41", 80)
    assert t.dnat == [] and t.verdict == "DROP"


def test_load_balancer_source_ranges() -> None:
    c = Cluster()
    obj = svc1(type="LoadBalancer", loadBalancerSourceRanges=["203.0.113.0/25", "192.168.0.0/24"])
    obj["status"] = {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}
    c.add(obj, endpoints(*ALL_EPS))
    allowed = c.trace(EXTERNAL_CLIENT, "1.2.3.4", 80)
    assert len(targets(allowed)) == 3 and allowed.masquerade
    for src in (BLOCKED_CLIENT, POD):
        t = c.trace(src, "1.2.3.4", 80)
        assert t.dnat == [] and t.verdict == "DROP", (src, t)
    # The node's own address is in a range, so the LB IP itself is allowed as a source
    # ("same node to LB, SNATted to LB").
    assert len(targets(c.trace("1.2.3.4", "1.2.3.4", 80))) == 3
    # NodePorts are not subject to source ranges.
    assert targets(c.trace(BLOCKED_CLIENT, NODE_IP, 3001))


def test_terminating_endpoints_serve_only_when_nothing_is_ready() -> None:
    term = {"ready": False, "serving": True, "terminating": True}
    c = Cluster()
    c.add(svc1(type="NodePort"), endpoints((EP_LOCAL, "node-a", term), (EP_REMOTE1, "node-b")))
    assert targets(c.trace(POD, "172.30.0.41", 80)) == {EP_REMOTE1}
    c.add(
        svc1(type="NodePort"), endpoints((EP_LOCAL, "node-a", term), (EP_REMOTE1, "node-b", term))
    )
    assert targets(c.trace(POD, "172.30.0.41", 80)) == {EP_LOCAL, EP_REMOTE1}
    not_serving = {"ready": False, "serving": False, "terminating": True}
    c.add(svc1(type="NodePort"), endpoints((EP_LOCAL, "node-a", not_serving)))
    assert c.trace(POD, "172.30.0.41", 80).verdict == "REJECT"


def test_health_check_node_port_is_accepted_and_removed_with_the_service() -> None:
    c = Cluster()
    obj = svc1(type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=30000)
    c.add(obj, endpoints(*ALL_EPS))
    assert c.trace(EXTERNAL_CLIENT, NODE_IP, 30000).verdict == "ACCEPT"
    s = normalize_service(obj).value
    assert s is not None
    c.engine.sync(ChangeSet({s.key: None}).to_json())
    assert c.trace(EXTERNAL_CLIENT, NODE_IP, 30000).verdict is None


def test_session_affinity_keeps_every_endpoint_reachable() -> None:
    c = Cluster()
    c.add(svc1(sessionAffinity="ClientIP"), endpoints(*ALL_EPS))
    assert len(targets(c.trace(POD, "172.30.0.41", 80))) == 3


@pytest.mark.parametrize("masquerade_all", [True, False])
def test_masquerade_all(masquerade_all: bool) -> None:
    c = Cluster(masquerade_all=masquerade_all)
    c.add(svc1(), endpoints(*ALL_EPS))
    assert c.trace(POD, "172.30.0.41", 80).masquerade == masquerade_all


def test_rule_text_injection_is_impossible() -> None:
    """Names that could add or change a rule never reach the rules: the object is refused."""
    from kproxy.errors import InvalidObjectError

    for bad in ('x" -j ACCEPT', "x -A INPUT", "x\n-A INPUT -j DROP", "X"):
        with pytest.raises(InvalidObjectError):
            normalize_service(k.service(bad, "172.30.0.9", [k.port("p", 80)]))
        with pytest.raises(InvalidObjectError):
            normalize_service(k.service("ok", "172.30.0.9", [k.port(bad, 80)]))
