"""Traffic types and policies with real packets, in both netfilter modes: source-IP
preservation under externalTrafficPolicy Local, internalTrafficPolicy Local, session affinity,
REJECT vs DROP, loadBalancerSourceRanges, externalIPs and dual-stack.

pod1 (10.244.1.2) runs on this node (node-a); pod2 and pod3 on node-b.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import k8sobjects as k
from tests.privileged.harness import (
    ECHO_IP,
    MODES,
    NODE_PORT_TCP,
    ProxyLab,
    echo_service,
    echo_slice,
    http_get,
    lb_service,
    proxy_lab,
)

pytestmark = pytest.mark.privileged

PODS = ("10.244.1.2", "10.244.2.2", "10.244.3.2")
LB_IP = "10.96.200.1"
EXTERNAL_IP = "10.96.150.1"


@pytest.fixture(params=MODES)
def lab(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProxyLab]:
    with proxy_lab(tmp_path, mode=request.param) as pl:
        yield pl


def only(lab: ProxyLab, mode: str) -> None:
    if lab.mode != mode:
        pytest.skip(f"{mode} mode only")


def run(lab: ProxyLab, svc: dict[str, Any], ips: tuple[str, ...] = PODS, *extra: str) -> None:
    lab.put(svc)
    lab.put(echo_slice(list(ips)))
    lab.start_daemon(*extra)
    lab.wait_synced()


def servers(src: Any, ip: str, port: int, count: int = 20) -> list[Any]:
    results = src.tcp_probe_many(ip, port, count, timeout=1.0)
    return list(results)


def test_external_local_preserves_the_client_address_and_uses_local_endpoints(
    lab: ProxyLab,
) -> None:
    run(lab, echo_service(externalTrafficPolicy="Local", externalIPs=[EXTERNAL_IP]))
    ext = lab.lab.client("ext")
    for dst, port in ((lab.lab.node_ip, NODE_PORT_TCP), (EXTERNAL_IP, 80)):
        results = servers(ext, dst, port)
        assert all(r.ok for r in results), results[:2]
        assert {r.server for r in results} == {"pod1"}
        assert {r.peer for r in results} == {ext.ip}, "the client's address must be preserved"
    # Pods are not subject to the external policy: every endpoint, no masquerade.
    client = lab.lab.pod("client")
    results = servers(client, lab.lab.node_ip, NODE_PORT_TCP, 30)
    assert {r.server for r in results} == {"pod1", "pod2", "pod3"}
    # The cluster IP ignores the external policy.
    assert {r.server for r in servers(client, ECHO_IP, 80, 30)} == {"pod1", "pod2", "pod3"}


def test_external_local_without_local_endpoints_drops_outside_traffic(lab: ProxyLab) -> None:
    run(lab, echo_service(externalTrafficPolicy="Local"), ("10.244.2.2", "10.244.3.2"))
    r = lab.lab.client("ext").tcp_probe(lab.lab.node_ip, NODE_PORT_TCP, timeout=1.0)
    assert r.error == "timeout", r  # DROP, not REJECT
    from_pod = servers(lab.lab.pod("client"), lab.lab.node_ip, NODE_PORT_TCP, 10)
    assert all(r.ok for r in from_pod) and {r.server for r in from_pod} <= {"pod2", "pod3"}


def test_internal_local(lab: ProxyLab) -> None:
    run(lab, echo_service(internalTrafficPolicy="Local"))
    client = lab.lab.pod("client")
    assert {r.server for r in servers(client, ECHO_IP, 80)} == {"pod1"}
    lab.put(echo_slice(["10.244.2.2"]))
    lab.wait(lambda: lab.dnat_targets() <= {"10.244.2.2:8080", "10.244.2.2:8081"}, 10, "update")
    r = client.tcp_probe(ECHO_IP, 80, timeout=1.0)
    assert r.error == "timeout", r  # no local endpoint: DROP


def test_session_affinity_sticks_to_one_backend(lab: ProxyLab) -> None:
    run(lab, echo_service(sessionAffinity="ClientIP"))
    for src in (lab.lab.pod("client"), lab.lab.client("ext")):
        results = servers(src, ECHO_IP, 80, 25)
        assert all(r.ok for r in results)
        assert len({r.server for r in results}) == 1, {r.server for r in results}
    # Without affinity the same client is spread (the control for the assertion above).
    lab.put(echo_service())
    marker = "recent" if lab.mode == "iptables" else "update @affinity"
    lab.wait(lambda: marker not in lab.rules(), 10, "affinity rules gone")
    assert len({r.server for r in servers(lab.lab.pod("client"), ECHO_IP, 80, 30)}) > 1


def test_load_balancer_source_ranges(lab: ProxyLab) -> None:
    blocked = lab.lab.add_client("ext2")
    svc = echo_service(loadBalancerSourceRanges=["192.168.101.0/24"])
    svc["spec"]["type"] = "LoadBalancer"
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
    run(lab, svc)
    allowed = lab.lab.client("ext")
    assert all(r.ok for r in servers(allowed, LB_IP, 80, 5))
    r = blocked.tcp_probe(LB_IP, 80, timeout=1.0)
    assert r.error == "timeout", r
    # NodePorts are not subject to the ranges.
    assert blocked.tcp_probe(lab.lab.node_ip, NODE_PORT_TCP).ok


def test_source_ranges_as_users_write_them(lab: ProxyLab) -> None:
    """Nested and duplicate ranges, a range that holds the LB address and the node (a LAN),
    and 0.0.0.0/0: every Service is programmed in the first sync, the ranges are enforced, and
    a later change still lands (in nftables mode these once made every transaction fail)."""
    blocked = lab.lab.add_client("ext2")  # 192.168.102.2
    lan = ["192.168.101.0/24", "192.168.101.0/25", "192.168.101.2/32", "10.96.200.0/24"]
    lab.put(lb_service("lan", "10.96.0.31", "10.96.200.1", lan))
    lab.put(lb_service("open", "10.96.0.32", "10.96.200.2", ["0.0.0.0/0", "192.168.102.0/24"]))
    for name in ("lan", "open"):
        pods = [k.endpoint("10.244.1.2", node="node-a")]
        lab.put(k.endpoint_slice(f"{name}-1", name, pods, [k.slice_port("tcp", 8080)]))
    run(lab, echo_service())
    allowed = lab.lab.client("ext")  # 192.168.101.2
    assert all(r.ok for r in servers(allowed, "10.96.200.1", 80, 5))
    assert blocked.tcp_probe("10.96.200.1", 80, timeout=1.0).error == "timeout"
    for client in (allowed, blocked):
        assert all(r.ok for r in servers(client, "10.96.200.2", 80, 5))
    # The node programs what comes next: the echo Service loses two of its endpoints.
    lab.put(echo_slice([PODS[0]]))
    lab.wait(
        lambda: (
            lab.dnat_targets() >= {"10.244.1.2:8080"}
            and "10.244.2.2:8080" not in lab.dnat_targets()
        ),
        15,
        "echo down to one endpoint",
    )
    assert "Error" not in lab.log() and "File exists" not in lab.log()


def test_dual_stack(lab: ProxyLab) -> None:
    svc = echo_service(ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="RequireDualStack")
    svc["spec"]["clusterIPs"] = [ECHO_IP, "fd00:10:96::10"]
    lab.put(svc)
    lab.put(echo_slice(list(PODS)))
    v6 = echo_slice([], name="echo-v6")
    v6["addressType"] = "IPv6"
    v6["endpoints"] = [
        k.endpoint(f"fd00:10:244:{i}::2", node="node-a" if i == 1 else "node-b") for i in (1, 2, 3)
    ]
    lab.put(v6)
    lab.start_daemon("--cluster-cidr", "10.244.0.0/16,fd00:10:244::/48")
    lab.wait_synced()
    client = lab.lab.pod("client")
    for ip in (ECHO_IP, "fd00:10:96::10"):
        results = servers(client, ip, 80, 30)
        assert all(r.ok for r in results), (ip, results[:2])
        assert {r.server for r in results} == {"pod1", "pod2", "pod3"}, ip
    assert {r.peer for r in servers(client, "fd00:10:96::10", 80, 3)} == {client.ip6}
    # NodePort over IPv6 from outside.
    ext = lab.lab.client("ext")
    assert all(r.ok for r in servers(ext, lab.lab.node_ip6, NODE_PORT_TCP, 5))


def test_localhost_node_ports(lab: ProxyLab) -> None:
    only(lab, "iptables")
    run(lab, echo_service())
    results = servers(lab.lab.node, "127.0.0.1", NODE_PORT_TCP, 10)
    assert all(r.ok for r in results), results[:2]
    assert (
        lab.lab.node.exec(["sysctl", "-n", "net.ipv4.conf.all.route_localnet"]).stdout.strip()
        == "1"
    )
    assert "KUBE-FIREWALL" in lab.filter()
    # Upstream's nfacct counters, in the kernel: each of the 10 connections on loopback was
    # counted once (nat rules see a connection's first packet); one to the node's address
    # is not.
    assert lab.lab.node.tcp_probe(lab.lab.node_ip, NODE_PORT_TCP).ok
    assert "--nfacct-name  localhost_nps_accepted_pkts" in lab.nat()
    assert "--nfacct-name  ct_state_invalid_dropped_pkts" in lab.filter()
    status, body = http_get(lab.lab.node, "http://127.0.0.1:10249/metrics")
    assert status == 200, body
    assert "\nkubeproxy_iptables_localhost_nodeports_accepted_packets_total 10.0\n" in body
    assert "\nkubeproxy_iptables_ct_state_invalid_dropped_packets_total 0.0\n" in body


def test_localhost_node_ports_can_be_turned_off(lab: ProxyLab) -> None:
    only(lab, "iptables")
    run(lab, echo_service(), PODS, "--iptables-localhost-nodeports=false")
    r = lab.lab.node.tcp_probe("127.0.0.1", NODE_PORT_TCP, timeout=1.0)
    assert r.error == "refused", r  # not DNATed: nothing listens on the node itself
    assert lab.lab.node.tcp_probe(lab.lab.node_ip, NODE_PORT_TCP).ok


def test_nftables_has_no_localhost_node_ports(lab: ProxyLab) -> None:
    # As upstream's nftables mode: NodePorts answer on the node's addresses, not on loopback.
    only(lab, "nftables")
    run(lab, echo_service())
    r = lab.lab.node.tcp_probe("127.0.0.1", NODE_PORT_TCP, timeout=1.0)
    assert r.error == "refused", r
    assert lab.lab.node.tcp_probe(lab.lab.node_ip, NODE_PORT_TCP).ok


def test_unknown_port_of_a_cluster_ip_is_rejected(lab: ProxyLab) -> None:
    # nftables mode only, as upstream: a cluster IP answers on its Services' ports alone.
    only(lab, "nftables")
    run(lab, echo_service())
    r = lab.lab.pod("client").tcp_probe(ECHO_IP, 81, timeout=3.0)
    assert r.error == "refused" and r.elapsed < 0.5, r


def test_interface_name_prefix_detects_pod_traffic(lab: ProxyLab) -> None:
    # The lab names the node side of every pod's link vp<N>.
    run(
        lab, echo_service(), PODS,
        "--detect-local-mode", "InterfaceNamePrefix", "--pod-interface-name-prefix", "vp",
    )  # fmt: skip
    client = lab.lab.pod("client")
    assert {r.peer for r in servers(client, ECHO_IP, 80, 10)} == {client.ip}
    ext = lab.lab.client("ext")
    assert ext.ip not in {r.peer for r in servers(ext, ECHO_IP, 80, 10)}  # masqueraded


def test_health_check_node_port_follows_local_endpoints(lab: ProxyLab) -> None:
    svc = echo_service(externalTrafficPolicy="Local", healthCheckNodePort=32100)
    svc["spec"]["type"] = "LoadBalancer"
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
    run(lab, svc)
    ext = lab.lab.client("ext")
    url = f"http://{lab.lab.node_ip}:32100/"
    status, body = http_get(ext, url)
    assert status == 200, body
    assert json.loads(body) == {
        "service": {"namespace": "default", "name": "echo"},
        "localEndpoints": 1,
        "serviceProxyHealthy": True,
    }
    # Only remote endpoints left: 503, and the load balancer stops sending to this node.
    lab.put(echo_slice(["10.244.2.2", "10.244.3.2"]))
    lab.wait(lambda: http_get(ext, url)[0] == 503, 10, "the health check to fail")
    # The Service goes: so does its health check.
    lab.delete("Service", "echo")
    lab.wait(lambda: http_get(ext, url)[0] == 0, 10, "the health check port to close")
