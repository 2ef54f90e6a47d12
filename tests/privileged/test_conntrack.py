"""Stale UDP conntrack entries, with real flows: a client socket that keeps sending to a
ClusterIP follows its backend's replacement within one sync; TCP flows are untouched; a
restart deletes nothing that still serves."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import k8sobjects as k
from tests.privileged.harness import (
    ECHO_IP,
    TCP_PORT,
    ProxyLab,
    echo_service,
    echo_slice,
    http_get,
    proxy_lab,
)

pytestmark = pytest.mark.privileged
ECHO_IP6 = "fd00:10:96::10"
SRC_PORT = 40053  # one fixed source port: the same conntrack entry for every datagram


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[ProxyLab]:
    with proxy_lab(tmp_path, [echo_service(), echo_slice(["10.244.1.2"])]) as pl:
        pl.lab.pod("pod1").start_tcp_server(TCP_PORT + 10, echo=True)
        pl.start_daemon()
        pl.wait_synced()
        yield pl


def udp_server(lab: ProxyLab) -> str | None:
    r = lab.lab.pod("client").udp_probe(ECHO_IP, 80, timeout=1.0, src_port=SRC_PORT)
    return r.server


def conntrack_udp(lab: ProxyLab) -> list[str]:
    out = lab.lab.node.exec(["conntrack", "-L", "-p", "udp"], timeout=10).stdout
    return [ln for ln in out.splitlines() if f"sport={SRC_PORT}" in ln]


def flow_tuples(entry: str) -> list[str]:
    """The original and reply tuples of a `conntrack -L` line (no timeout or counters)."""
    return [f for f in entry.split() if f.split("=")[0] in ("src", "dst", "sport", "dport")]


def test_udp_flow_follows_the_replaced_backend(lab: ProxyLab) -> None:
    assert udp_server(lab) == "pod1"
    assert udp_server(lab) == "pod1"  # the flow is established: one conntrack entry
    (entry,) = conntrack_udp(lab)
    assert "src=10.244.1.2" in entry
    # pod1 is replaced by pod2 (pod1 still runs: without the reconciler the flow stays on it).
    lab.put(echo_slice(["10.244.2.2"]))
    lab.wait(lambda: lab.dnat_targets() == {"10.244.2.2:8080", "10.244.2.2:8081"}, 5, "rules")
    lab.wait(lambda: udp_server(lab) == "pod2", 5, "the flow to reach pod2", interval=0.2)
    assert "deleted 1 stale UDP conntrack entries" in lab.log()


def test_tcp_flows_are_untouched_and_a_restart_deletes_nothing_that_serves(lab: ProxyLab) -> None:
    # A long-lived TCP connection through the ClusterIP to pod1's echo port.
    svc = echo_service()
    svc["spec"]["ports"].append({"name": "long", "port": 90, "protocol": "TCP", "targetPort": 8090})
    lab.put(svc)
    sl = echo_slice(["10.244.1.2"])
    sl["ports"].append({"name": "long", "port": TCP_PORT + 10, "protocol": "TCP"})
    lab.put(sl)
    lab.wait(lambda: f"10.244.1.2:{TCP_PORT + 10}" in lab.dnat_targets(), 5, "the long port")
    session = lab.lab.pod("client").tcp_session(ECHO_IP, 90)
    try:
        assert session.send("one").ok
        assert udp_server(lab) == "pod1"
        before = conntrack_udp(lab)
        # Restart kproxy: the flow still serves, so its entry must survive.
        assert lab.daemon is not None
        lab.daemon.terminate()
        lab.daemon.wait(timeout=10)
        lab.start_daemon()
        lab.wait_synced(count=2)
        assert [flow_tuples(e) for e in conntrack_udp(lab)] == [flow_tuples(e) for e in before]
        assert udp_server(lab) == "pod1"
        # Endpoint changes elsewhere do not break the TCP connection either.
        lab.put(echo_slice(["10.244.1.2", "10.244.3.2"]))
        lab.wait(lambda: "10.244.3.2:8081" in lab.dnat_targets(), 5, "rules")
        assert session.send("two").ok
    finally:
        session.close()


def test_a_udp_flow_to_a_service_scaled_to_zero_is_cut(lab: ProxyLab) -> None:
    # Upstream since 1.36: the flow must not keep reaching the pod that served it (its IP may
    # be given to another pod by then); the client is refused, as for any endpoint-less port.
    assert udp_server(lab) == "pod1"
    assert len(conntrack_udp(lab)) == 1
    lab.put(echo_slice([]))
    lab.wait(lambda: not lab.dnat_targets(), 5, "the endpoints' rules to go")
    lab.wait(lambda: "deleted 1 stale UDP conntrack entries" in lab.log(), 5, "the reconciler")
    r = lab.lab.pod("client").udp_probe(ECHO_IP, 80, timeout=1.0, src_port=SRC_PORT)
    assert r.error == "refused" and r.server is None, r


def test_a_udp_flow_to_a_deleted_service_is_cut(lab: ProxyLab) -> None:
    assert udp_server(lab) == "pod1"
    (entry,) = conntrack_udp(lab)
    assert "src=10.244.1.2" in entry
    lab.delete("Service", "echo")
    lab.wait(lambda: ECHO_IP not in lab.nat(), 5, "the Service's rules to go")
    lab.wait(lambda: "deleted 1 stale UDP conntrack entries" in lab.log(), 5, "the reconciler")
    # The next datagram makes a new entry that no DNAT rewrites: it never reaches pod1.
    r = lab.lab.pod("client").udp_probe(ECHO_IP, 80, timeout=1.0, src_port=SRC_PORT)
    assert r.server is None, r
    assert all("src=10.244.1.2" not in e for e in conntrack_udp(lab)), conntrack_udp(lab)


def test_an_ipv6_udp_flow_follows_the_replaced_backend(tmp_path: Path) -> None:
    # A conntrack dump lists one family: IPv6 flows need their own (they were never judged).
    svc = echo_service(ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="RequireDualStack")
    svc["spec"]["clusterIPs"] = [ECHO_IP, ECHO_IP6]

    def v6_slice(i: int) -> k.Obj:
        sl = echo_slice([], name="echo-v6")
        sl["addressType"] = "IPv6"
        sl["endpoints"] = [k.endpoint(f"fd00:10:244:{i}::2", node="node-a")]
        return sl

    with proxy_lab(tmp_path, [svc, echo_slice(["10.244.1.2"]), v6_slice(1)]) as lab:
        lab.start_daemon("--cluster-cidr", "10.244.0.0/16,fd00:10:244::/48",
                         "--metrics-bind-address", "127.0.0.1:10249")  # fmt: skip
        lab.wait_synced()
        client = lab.lab.pod("client")

        def v6_server() -> str | None:
            return client.udp_probe(ECHO_IP6, 80, timeout=1.0, src_port=SRC_PORT).server

        assert v6_server() == "pod1"
        lab.put(v6_slice(2))
        lab.wait(lambda: "(IPv6)" in lab.log(), 5, "an IPv6 reconciliation")
        assert "deleted 1 stale UDP conntrack entries (IPv6)" in lab.log()
        lab.wait(lambda: v6_server() == "pod2", 5, "the IPv6 flow to reach pod2", interval=0.2)
        _, metrics = http_get(lab.lab.node, "http://127.0.0.1:10249/metrics")
        assert 'kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family="IPv6"} 1.0' in (
            metrics
        ), metrics


def test_a_pod_ip_reused_while_its_old_pod_terminates_is_the_new_pods(lab: ProxyLab) -> None:
    # upstream #135266/#135593: pod1's IP is given to a new pod (not ready yet) while pod1 is
    # still terminating. The address is the new pod's: the old pod's terminating fallback must
    # not keep it in the rules, and the flow it served is cut, not left on the new pod.
    def slice_of(*endpoints: k.Obj) -> k.Obj:
        sl = echo_slice([])
        sl["endpoints"] = list(endpoints)
        return sl

    old = k.endpoint("10.244.1.2", node="node-a", ready=False, serving=True, terminating=True)
    new = k.endpoint("10.244.1.2", node="node-b", ready=False, serving=False)
    assert udp_server(lab) == "pod1"
    # pod1 terminates, still serving: the only endpoint left, used as a fallback.
    lab.put(slice_of(old))
    lab.wait(lambda: lab.log().count("synced IPv4") >= 2, 5, "a sync")
    assert udp_server(lab) == "pod1"
    assert len(conntrack_udp(lab)) == 1
    # Its IP is reused: in the same slice, after the old copy (the EndpointSlice controller's
    # order), and not ready.
    lab.put(slice_of(old, new))
    lab.wait(lambda: not lab.dnat_targets(), 5, "the reused address out of the rules")
    lab.wait(lambda: "deleted 1 stale UDP conntrack entries" in lab.log(), 5, "the reconciler")
    r = lab.lab.pod("client").udp_probe(ECHO_IP, 80, timeout=1.0, src_port=SRC_PORT)
    assert r.error == "refused" and r.server is None, r
    # The new pod turns ready: served again.
    lab.put(slice_of(old, k.endpoint("10.244.1.2", node="node-b")))
    lab.wait(lambda: udp_server(lab) == "pod1", 5, "the new pod served", interval=0.2)
