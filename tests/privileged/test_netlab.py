"""Self-tests for the network-namespace lab (tests/netlab)."""

from __future__ import annotations

import pytest

from tests.netlab import NodeLab, list_netns, netlab_unavailable_reason

pytestmark = pytest.mark.privileged


@pytest.fixture(autouse=True)
def _require_netlab() -> None:
    # Tests here that build their own labs need the same guard as the fixture.
    reason = netlab_unavailable_reason()
    if reason is not None:
        pytest.skip(f"netlab unavailable: {reason}")


def _lab_namespaces(prefix: str) -> list[str]:
    return [ns for ns in list_netns() if ns.startswith(prefix + "-")]


@pytest.mark.privileged
def test_address_plan(netlab: NodeLab) -> None:
    pod1, pod3, ext = netlab.pod("pod1"), netlab.pod("pod3"), netlab.client("ext")
    assert (pod1.ip, pod1.ip6, pod1.gateway) == ("10.244.1.2", "fd00:10:244:1::2", "10.244.1.1")
    assert (pod3.ip, pod3.gateway6) == ("10.244.3.2", "fd00:10:244:3::1")
    assert (ext.ip, ext.ip6) == ("192.168.101.2", "fd00:192:168:101::2")
    assert (netlab.node_ip, netlab.node_ip6) == ("192.168.101.1", "fd00:192:168:101::1")
    assert netlab.cluster_cidr == "10.244.0.0/16"
    assert netlab.cluster_cidr6 == "fd00:10:244::/48"
    assert pod1.ns == f"{netlab.prefix}-pod1"
    assert netlab.node.ns == f"{netlab.prefix}-node"
    assert sorted(netlab.pods) == ["pod1", "pod2", "pod3"]
    # The node owns the gateway addresses and forwards.
    addrs = netlab.node.exec(["ip", "-o", "addr", "show"], check=True).stdout
    assert "10.244.2.1/24" in addrs
    assert "192.168.101.1/24" in addrs
    fwd = netlab.node.exec(["sysctl", "-n", "net.ipv4.ip_forward"], check=True).stdout
    assert fwd.strip() == "1"


@pytest.mark.privileged
@pytest.mark.parametrize("family", [4, 6])
def test_pod_to_pod_tcp_and_udp(netlab: NodeLab, family: int) -> None:
    client, target = netlab.pod("pod1"), netlab.pod("pod2")
    target.start_tcp_server(8080)
    target.start_udp_server(5353, name="dns-ish")
    ip = target.ip if family == 4 else target.ip6
    src = client.ip if family == 4 else client.ip6

    tcp = client.tcp_probe(ip, 8080, payload="hello world")
    assert tcp.ok, tcp
    assert tcp.reply is not None
    assert (tcp.server, tcp.peer, tcp.reply.payload) == ("pod2", src, "hello world")

    udp = client.udp_probe(ip, 5353, payload="q1")
    assert udp.ok, udp
    assert (udp.server, udp.peer) == ("dns-ish", src)


@pytest.mark.privileged
def test_udp_probe_with_fixed_source_port(netlab: NodeLab) -> None:
    netlab.pod("pod3").start_udp_server(53)
    result = netlab.pod("pod1").udp_probe(netlab.pod("pod3").ip, 53, src_port=40123)
    assert result.ok, result
    assert result.peer == netlab.pod("pod1").ip


@pytest.mark.privileged
def test_external_client_reaches_pod_via_node(netlab: NodeLab) -> None:
    pod, ext = netlab.pod("pod3"), netlab.client("ext")
    pod.start_tcp_server(80)
    for ip, src in ((pod.ip, ext.ip), (pod.ip6, ext.ip6)):
        result = ext.tcp_probe(ip, 80)
        assert result.ok, result
        assert (result.server, result.peer) == ("pod3", src)
    # The path really goes through the node: it is the pod's next hop.
    route = ext.exec(["ip", "route", "get", pod.ip], check=True).stdout
    assert f"via {ext.gateway}" in route


@pytest.mark.privileged
def test_probe_many_single_backend(netlab: NodeLab) -> None:
    netlab.pod("pod2").start_tcp_server(8080)
    results = netlab.client("ext").tcp_probe_many(netlab.pod("pod2").ip, 8080, count=20)
    assert len(results) == 20
    assert all(r.ok and r.server == "pod2" for r in results), results


@pytest.mark.privileged
def test_echo_server_keeps_connection(netlab: NodeLab) -> None:
    netlab.pod("pod1").start_tcp_server(9000, name="echo", echo=True)
    with netlab.client("ext").tcp_session(netlab.pod("pod1").ip, 9000) as session:
        assert session.connect_result.ok, session.connect_result
        replies = [session.send(f"line {i}") for i in range(3)]
    assert [r.reply.payload for r in replies if r.reply] == ["line 0", "line 1", "line 2"]
    assert all(r.server == "echo" for r in replies)


@pytest.mark.privileged
def test_refused_is_fast(netlab: NodeLab) -> None:
    pod1, pod2 = netlab.pod("pod1"), netlab.pod("pod2")
    tcp = pod1.tcp_probe(pod2.ip, 9, timeout=0.5)
    assert (tcp.ok, tcp.error) == (False, "refused")
    assert tcp.elapsed < 0.4
    udp = pod1.udp_probe(pod2.ip6, 9, timeout=0.5)
    assert (udp.ok, udp.error) == (False, "refused")
    assert udp.elapsed < 0.4


@pytest.mark.privileged
def test_blackholed_address_times_out(netlab: NodeLab) -> None:
    pod1 = netlab.pod("pod1")
    for ip in (netlab.blackhole_ip, netlab.blackhole_ip6):
        tcp = pod1.tcp_probe(ip, 80, timeout=0.5)
        assert (tcp.ok, tcp.error) == (False, "timeout"), tcp
        assert 0.4 <= tcp.elapsed < 2.0
        udp = pod1.udp_probe(ip, 53, timeout=0.5)
        assert (udp.ok, udp.error) == (False, "timeout"), udp
    # The node's own traffic to an unassigned VIP has a route too (dummy0).
    route = netlab.node.exec(["ip", "route", "get", "10.96.0.10"], check=True).stdout
    assert "dev dummy0" in route
    assert netlab.node.tcp_probe("10.96.0.10", 80, timeout=0.5).error == "timeout"


@pytest.mark.privileged
def test_close_removes_namespaces_and_processes() -> None:
    lab = NodeLab()
    try:
        pod = lab.add_pod("web")
        client = lab.add_client("ext")
        tcp = pod.start_tcp_server(80)
        udp = pod.start_udp_server(53)
        echo = pod.start_tcp_server(81, echo=True)
        session = client.tcp_session(pod.ip, 81)
        assert session.connect_result.ok
        sleeper = lab.node.popen(["sleep", "300"])
        assert len(_lab_namespaces(lab.prefix)) == 3
        assert all(s.running for s in (tcp, udp, echo))
    finally:
        lab.close()
    assert _lab_namespaces(lab.prefix) == []
    assert lab.namespaces == ()
    assert len(lab.processes) == 5
    assert all(p.returncode is not None for p in lab.processes)
    assert sleeper.returncode is not None
    # Idempotent, also when everything is already gone.
    lab.close()
    assert lab.closed


@pytest.mark.privileged
def test_two_labs_at_once() -> None:
    with NodeLab() as first, NodeLab() as second:
        assert first.prefix != second.prefix
        a, b = first.add_pod("pod1"), second.add_pod("pod1")
        assert a.ip == b.ip  # same address plan, fully separate namespaces
        a.start_tcp_server(80, name="first")
        b.start_tcp_server(80, name="second")
        assert first.add_pod("pod2").tcp_probe(a.ip, 80).server == "first"
        assert second.add_pod("pod2").tcp_probe(b.ip, 80).server == "second"
        assert len(_lab_namespaces(first.prefix)) == 3
        assert len(_lab_namespaces(second.prefix)) == 3
    assert _lab_namespaces(first.prefix) == []
    assert _lab_namespaces(second.prefix) == []


@pytest.mark.privileged
def test_rejects_bad_names(netlab: NodeLab) -> None:
    with pytest.raises(ValueError, match="already used"):
        netlab.add_pod("pod1")
    with pytest.raises(ValueError, match="bad name"):
        netlab.add_client("node")
    with pytest.raises(ValueError, match="bad name"):
        netlab.add_pod("Bad_Name")


@pytest.mark.privileged
def test_server_bound_to_one_address(netlab: NodeLab) -> None:
    pod, client = netlab.pod("pod2"), netlab.pod("pod1")
    server = pod.start_tcp_server(0, bind=pod.ip)  # port 0: the kernel picks one
    assert server.port > 0
    assert client.tcp_probe(pod.ip, server.port).server == "pod2"
    assert client.tcp_probe(pod.ip6, server.port, timeout=0.5).error == "refused"
    server.stop()
    assert not server.running
    assert client.tcp_probe(pod.ip, server.port, timeout=0.5).error == "refused"
