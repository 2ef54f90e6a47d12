"""The real daemon in a node namespace, fed by the fake API server, with real packets.

Every test runs in both netfilter modes (iptables, nftables): ClusterIP (from a pod and from the
node itself) and NodePort (from an external client), TCP and UDP, spread over every backend;
REJECT for a Service without endpoints; endpoint changes programmed quickly; recovery from an
API server that restarts and compacts its history; bad objects skipped.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import k8sobjects as k
from tests.netlab import NetNs
from tests.privileged.harness import (
    ECHO_IP,
    EMPTY_IP,
    MODES,
    NODE_PORT_TCP,
    NODE_PORT_UDP,
    ProxyLab,
    echo_service,
    echo_slice,
    empty_service,
    proxy_lab,
)

pytestmark = pytest.mark.privileged

PODS = ("10.244.1.2", "10.244.2.2", "10.244.3.2")
BACKENDS = {"pod1", "pod2", "pod3"}


@pytest.fixture(params=MODES)
def pl(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProxyLab]:
    objects = [echo_service(), echo_slice(PODS), empty_service()]
    with proxy_lab(tmp_path, objects, mode=request.param) as lab:
        lab.start_daemon()
        lab.wait_synced()
        assert len(lab.dnat_targets()) == 6
        yield lab


def tcp_servers(src: NetNs, ip: str, port: int, count: int = 40) -> set[str]:
    results = src.tcp_probe_many(ip, port, count, timeout=2.0)
    failed = [r for r in results if not r.ok]
    assert not failed, failed[:3]
    return {r.server for r in results if r.server}


def udp_servers(src: NetNs, ip: str, port: int, count: int = 24) -> set[str]:
    seen = set()
    for _ in range(count):
        r = src.udp_probe(ip, port, timeout=2.0)
        assert r.ok, r
        assert r.server is not None
        seen.add(r.server)
        if seen == BACKENDS:
            break
    return seen


def test_cluster_ip_from_a_pod_reaches_every_backend_without_snat(pl: ProxyLab) -> None:
    client = pl.lab.pod("client")
    results = client.tcp_probe_many(ECHO_IP, 80, 40)
    assert {r.server for r in results} == BACKENDS
    # Pod-to-service traffic keeps the pod's address (no masquerade inside the cluster CIDR).
    assert {r.peer for r in results} == {client.ip}
    assert udp_servers(client, ECHO_IP, 80) == BACKENDS


def test_cluster_ip_from_the_node_itself(pl: ProxyLab) -> None:
    assert tcp_servers(pl.lab.node, ECHO_IP, 80) == BACKENDS
    assert udp_servers(pl.lab.node, ECHO_IP, 80) == BACKENDS


def test_node_port_from_an_external_client_is_masqueraded(pl: ProxyLab) -> None:
    ext = pl.lab.client("ext")
    results = ext.tcp_probe_many(pl.lab.node_ip, NODE_PORT_TCP, 40)
    assert all(r.ok for r in results), results[:3]
    assert {r.server for r in results} == BACKENDS
    # externalTrafficPolicy Cluster: the backend sees the node (its gateway), not the client.
    assert ext.ip not in {r.peer for r in results}
    assert udp_servers(ext, pl.lab.node_ip, NODE_PORT_UDP) == BACKENDS


def test_service_without_endpoints_is_refused_at_once(pl: ProxyLab) -> None:
    for src in (pl.lab.pod("client"), pl.lab.node):
        r = src.tcp_probe(EMPTY_IP, 80, timeout=3.0)
        assert r.error == "refused" and r.elapsed < 0.5, r
        u = src.udp_probe(EMPTY_IP, 53, timeout=3.0)
        # A datagram REJECTed in the sender's own OUTPUT chain fails sendmsg with EPERM; from a
        # pod it comes back as ICMP port-unreachable. Either way: no timeout.
        expected = "EPERM" if src is pl.lab.node else "refused"
        assert u.error == expected and u.elapsed < 0.5, u
    assert "demo" not in pl.rules()  # nothing from the example leaks in
    if pl.mode == "iptables":
        assert '"default/empty:http has no endpoints"' in pl.filter()
    else:
        assert f"{EMPTY_IP} . tcp . 80 : goto reject-chain" in pl.nft()


def test_endpoint_change_is_programmed_within_a_second(pl: ProxyLab) -> None:
    new = {"10.244.2.2:8080", "10.244.2.2:8081"}
    start = time.monotonic()
    pl.put(echo_slice(["10.244.2.2"]))
    elapsed = pl.wait(lambda: pl.dnat_targets() == new, 5, "the new endpoint set")
    assert time.monotonic() - start < 1.0, f"took {elapsed:.2f}s"
    assert tcp_servers(pl.lab.pod("client"), ECHO_IP, 80, 10) == {"pod2"}
    # Back to three endpoints: all of them serve again.
    pl.put(echo_slice(PODS))
    pl.wait(lambda: len(pl.dnat_targets()) == 6, 5, "three endpoints again")
    assert tcp_servers(pl.lab.pod("client"), ECHO_IP, 80) == BACKENDS


def test_service_deleted_and_endpoints_removed(pl: ProxyLab) -> None:
    pl.put(echo_slice([]))
    pl.wait(lambda: not pl.dnat_targets(), 5, "no endpoints")
    r = pl.lab.pod("client").tcp_probe(ECHO_IP, 80, timeout=3.0)
    assert r.error == "refused", r
    pl.delete("Service", "echo")
    pl.wait(lambda: ECHO_IP not in pl.rules(), 5, "echo's rules gone")
    assert "KUBE-SVC-" not in pl.nat()
    assert not re.search(r"chain (nodeport-)?(local-)?endpoints-\d", pl.nft()), "pool left behind"


def test_api_restart_with_compaction_while_services_change(pl: ProxyLab) -> None:
    # The API server goes away; while it is down a Service is changed, another is created and
    # one is deleted, and its history is compacted, so the daemon's resourceVersion is gone.
    pl.call(pl.api.stop_api)
    pl.put(echo_slice(["10.244.3.2"]))
    pl.put(k.service("late", "10.96.0.30", [k.port("http", 80)]))
    pl.put(
        k.endpoint_slice("late-1", "late", [k.endpoint("10.244.1.2")], [k.slice_port("http", 8080)])
    )
    pl.delete("Service", "empty")
    pl.call(pl.api.compact)
    time.sleep(1.0)
    # Rules already programmed stay while the API server is unreachable.
    assert len(pl.dnat_targets()) == 6
    assert tcp_servers(pl.lab.pod("client"), ECHO_IP, 80, 10) <= BACKENDS
    pl.call(pl.api.start_api)
    pl.wait(
        lambda: pl.dnat_targets() == {"10.244.3.2:8080", "10.244.3.2:8081", "10.244.1.2:8080"},
        30,
        "the changes made while the API server was down",
    )
    assert EMPTY_IP not in pl.rules()
    assert tcp_servers(pl.lab.pod("client"), "10.96.0.30", 80, 5) == {"pod1"}
    assert tcp_servers(pl.lab.pod("client"), ECHO_IP, 80, 5) == {"pod3"}
    assert "relisting" in pl.log()


def test_invalid_objects_are_skipped_and_the_rest_keeps_working(pl: ProxyLab) -> None:
    bad_protocol = k.service("bad-proto", "10.96.0.40", [k.port("x", 80, "ICMP")])
    bad_name = k.service("bad-name", "10.96.0.41", [k.port("x; -A INPUT -j DROP", 80)])
    bad_port = k.service("bad-port", "10.96.0.42", [k.port("x", 0)])
    for o in (bad_protocol, bad_name, bad_port):
        pl.put(o)
    # A good Service created after them is programmed: the bad ones did not stop the syncs.
    pl.put(k.service("good", "10.96.0.43", [k.port("http", 80)]))
    pl.put(
        k.endpoint_slice("good-1", "good", [k.endpoint("10.244.2.2")], [k.slice_port("http", 8080)])
    )
    pl.wait(lambda: "10.96.0.43" in pl.rules(), 5, "the good Service")
    log = pl.log()
    for name, field in (("bad-proto", "protocol"), ("bad-name", "name"), ("bad-port", "port")):
        lines = [ln for ln in log.splitlines() if f"default/{name}" in ln]
        assert len(lines) == 1 and field in lines[0], lines
    rules = pl.rules()
    assert "10.96.0.4" not in rules.replace("10.96.0.43", "")
    assert "-A INPUT -j DROP" not in rules
    assert tcp_servers(pl.lab.pod("client"), ECHO_IP, 80) == BACKENDS
    # An invalid update of a working Service keeps its last valid rules.
    broken = echo_service()
    broken["spec"]["ports"][0]["protocol"] = "ICMP"
    pl.put(broken)
    time.sleep(0.5)
    assert len(pl.dnat_targets() & {f"{ip}:8080" for ip in PODS}) == 3
    assert tcp_servers(pl.lab.pod("client"), ECHO_IP, 80, 10) <= BACKENDS


def test_sigterm_leaves_rules_in_place(pl: ProxyLab) -> None:
    assert pl.daemon is not None
    pl.daemon.terminate()
    assert pl.daemon.wait(timeout=10) == 0
    assert len(pl.dnat_targets()) == 6
    assert tcp_servers(pl.lab.pod("client"), ECHO_IP, 80, 10) <= BACKENDS
