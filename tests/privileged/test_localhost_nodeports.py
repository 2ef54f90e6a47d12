"""Localhost NodePorts in the nftables mode (KEP-6032), real packets: with ``localhost`` in
nodePortAddresses, TCP from the node's own loopback to a NodePort reaches the Service's pods
through kproxy's userspace proxy, over IPv4 and IPv6; the node's own traffic uses the cluster's
endpoints even under a Local external policy; a port without endpoints is refused at connect;
UDP is not served (as upstream); the listeners are counted in ``/metrics``. Without the keyword,
or with the feature gate off, loopback serves no NodePort (upstream's nftables default)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import k8sobjects as k
from tests.privileged.harness import (
    ECHO_IP,
    NODE_PORT_TCP,
    NODE_PORT_UDP,
    TCP_PORT,
    ProxyLab,
    echo_service,
    echo_slice,
    http_get,
    proxy_lab,
)

pytestmark = pytest.mark.privileged

ECHO_IP6 = "fd00:10:96::10"
# A Local external policy whose only endpoint (pod2) the API places on another node.
LOCAL_IP, LOCAL_NODE_PORT = "10.96.0.30", 30090


def dual_stack_echo() -> list[k.Obj]:
    svc = echo_service(ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="RequireDualStack")
    svc["spec"]["clusterIPs"] = [ECHO_IP, ECHO_IP6]
    v6 = echo_slice([], name="echo-v6")
    v6["addressType"] = "IPv6"
    v6["endpoints"] = [k.endpoint("fd00:10:244:1::2", node="node-a")]
    local = k.service(
        "local", LOCAL_IP,
        [k.port("tcp", 80, "TCP", node_port=LOCAL_NODE_PORT, target=TCP_PORT)],
        type="NodePort", externalTrafficPolicy="Local",
    )  # fmt: skip
    local_slice = k.endpoint_slice(
        "local-1", "local", [k.endpoint("10.244.2.2", node="node-b")],
        [k.slice_port("tcp", TCP_PORT, "TCP")],
    )  # fmt: skip
    return [svc, echo_slice(["10.244.1.2"]), v6, local, local_slice]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[ProxyLab]:
    with proxy_lab(tmp_path, dual_stack_echo(), mode="nftables") as pl:
        yield pl


def start(lab: ProxyLab, *extra: str) -> None:
    lab.start_daemon(
        "--cluster-cidr", "10.244.0.0/16,fd00:10:244::/48",
        "--metrics-bind-address", "127.0.0.1:10249",
        *extra,
    )  # fmt: skip
    lab.wait_synced()


def metric(lab: ProxyLab, line_start: str) -> str | None:
    status, body = http_get(lab.lab.node, "http://127.0.0.1:10249/metrics")
    assert status == 200, body
    found = [line for line in body.splitlines() if line.startswith(line_start)]
    return found[0].rsplit(" ", 1)[1] if found else None


def test_tcp_nodeports_answer_on_loopback_through_the_proxy(lab: ProxyLab) -> None:
    start(lab, "--nodeport-addresses", "primary,localhost")
    node = lab.lab.node
    lab.wait(lambda: node.tcp_probe("127.0.0.1", NODE_PORT_TCP).ok, 15, "the IPv4 listener")
    assert node.tcp_probe("127.0.0.1", NODE_PORT_TCP).server == "pod1"
    assert node.tcp_probe("::1", NODE_PORT_TCP).server == "pod1"
    # The node's own traffic is internal: the Local policy does not apply to it, as the
    # kernel modes' "source is local" short-circuit.
    assert node.tcp_probe("127.0.0.1", LOCAL_NODE_PORT).server == "pod2"
    # The primary address still answers through the table, for outside clients.
    ext = lab.lab.client("ext")
    assert ext.tcp_probe(lab.lab.node_ip, NODE_PORT_TCP).server == "pod1"
    # UDP NodePorts are not served on loopback (upstream neither).
    assert node.udp_probe("127.0.0.1", NODE_PORT_UDP, timeout=1.0).error in ("refused", "timeout")
    labels = 'kubeproxy_nftables_localhost_nodeport_listeners{ip_family="IPv4"}'
    assert metric(lab, labels) == "2.0"
    assert metric(lab, labels.replace("IPv4", "IPv6")) == "1.0"
    # The Service loses its endpoints: the listener closes and a connect is refused.
    lab.put(echo_slice([]))
    lab.wait(
        lambda: node.tcp_probe("127.0.0.1", NODE_PORT_TCP, timeout=1.0).error == "refused",
        15, "the listener closed",
    )  # fmt: skip
    assert metric(lab, labels) == "1.0"
    # Endpoints again: served again.
    lab.put(echo_slice(["10.244.3.2"]))
    lab.wait(lambda: node.tcp_probe("127.0.0.1", NODE_PORT_TCP).server == "pod3", 15, "back")
    assert "localhost NodePorts: TCP NodePorts with endpoints are served" in lab.log()
    assert lab.daemon is not None and lab.daemon.poll() is None


@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("--nodeport-addresses", "primary,localhost",
         "--feature-gates", "KubeProxyNFTablesLocalhostNodePorts=false"),
    ],
    ids=["not-named", "gate-off"],
)  # fmt: skip
def test_loopback_serves_no_nodeport_unless_asked(lab: ProxyLab, extra: tuple[str, ...]) -> None:
    start(lab, *extra)
    ext = lab.lab.client("ext")
    lab.wait(lambda: ext.tcp_probe(lab.lab.node_ip, NODE_PORT_TCP).ok, 15, "the NodePort")
    got = lab.lab.node.tcp_probe("127.0.0.1", NODE_PORT_TCP, timeout=1.0)
    assert got.error == "refused", got
    assert metric(lab, "kubeproxy_nftables_localhost_nodeport_listeners{") is None
