"""``kproxy trace --live`` and ``kproxy diff --live`` against rules programmed in a node
namespace by the real daemon: the live trace agrees with the rendered one, and diff reports
exactly what another program changed."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kproxy import _core
from kproxy.config import ProxyConfig
from kproxy.model import Protocol
from kproxy.tools import rendered
from tests.privileged.harness import (
    CLUSTER_CIDR,
    ECHO_IP,
    EMPTY_IP,
    NODE,
    NODE_PORT_TCP,
    NODE_PORT_UDP,
    ProxyLab,
    echo_service,
    echo_slice,
    empty_service,
    proxy_lab,
)

pytestmark = pytest.mark.privileged


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[ProxyLab]:
    local = echo_service(externalTrafficPolicy="Local", sessionAffinity="ClientIP")
    local["metadata"]["name"] = "local"
    local["spec"]["clusterIP"] = local["spec"]["clusterIPs"][0] = "10.96.0.30"
    for p in local["spec"]["ports"]:
        p["nodePort"] += 100
    local_slice = echo_slice(["10.244.1.2", "10.244.2.2"], name="local-1")
    local_slice["metadata"]["labels"]["kubernetes.io/service-name"] = "local"
    objs = [echo_service(), echo_slice(["10.244.1.2", "10.244.2.2", "10.244.3.2"])]
    with proxy_lab(tmp_path, [*objs, empty_service(), local, local_slice]) as pl:
        pl.start_daemon()
        pl.wait_synced()
        yield pl


def kproxy(lab: ProxyLab, *args: str) -> tuple[int, str]:
    """Run the CLI in the node namespace: (exit status, standard output)."""
    flags = [
        "--master",
        lab.api.api_url,
        "--hostname-override",
        NODE,
        "--cluster-cidr",
        CLUSTER_CIDR,
    ]
    r = lab.lab.node.exec([sys.executable, "-m", "kproxy", *args, *flags], timeout=120)
    return r.returncode, r.stdout


def test_live_trace_agrees_with_the_rendered_rules(lab: ProxyLab) -> None:
    live = lab.lab.node.exec(["iptables-save"], timeout=30, check=True).stdout
    # The rendered rules, from kproxy render's code path, listing the API server from inside
    # the node namespace (where it listens) with the daemon's configuration.
    cfg = ProxyConfig(master=lab.api.api_url, hostname_override=NODE, cluster_cidrs=(CLUSTER_CIDR,))
    proxier = lab.call(lambda: rendered(cfg))
    rendered_rules = proxier.engines["IPv4"].dump()
    node_ip, pod, outside = lab.lab.node_ip, "10.244.4.2", "192.168.101.2"
    cases: list[tuple[str, str, int, Protocol]] = [
        (pod, ECHO_IP, 80, "TCP"), (outside, ECHO_IP, 80, "TCP"), (pod, ECHO_IP, 80, "UDP"),
        (outside, node_ip, NODE_PORT_TCP, "TCP"), (outside, node_ip, NODE_PORT_UDP, "UDP"),
        (pod, EMPTY_IP, 80, "TCP"), (pod, EMPTY_IP, 53, "UDP"), (pod, ECHO_IP, 81, "TCP"),
        (outside, "10.96.0.30", 80, "TCP"), (outside, node_ip, NODE_PORT_TCP + 100, "TCP"),
        (pod, node_ip, NODE_PORT_TCP + 100, "TCP"), ("10.244.1.2", ECHO_IP, 80, "TCP"),
    ]  # fmt: skip
    for src, dst, port, proto in cases:
        a = _core.trace_iptables(live, _core.Packet(src, dst, proto, port, "external", [node_ip]))
        b = _core.trace_iptables(
            rendered_rules, _core.Packet(src, dst, proto, port, "external", [node_ip])
        )
        assert (a.dnat, a.verdict, a.masquerade) == (b.dnat, b.verdict, b.masquerade), (
            src,
            dst,
            port,
        )
        assert not [m for m in a.matched if m.startswith("unsupported")], a.matched
    # The CLI answers the same through the kernel's rules.
    code, out = kproxy(
        lab, "trace", "--live", "--node-ip", node_ip, outside, f"{node_ip}:{NODE_PORT_TCP + 100}"
    )
    assert code == 0 and "DNAT to:     10.244.1.2:8080\n" in out and "masquerade:  no" in out


def test_diff_reports_exactly_what_another_program_changed(lab: ProxyLab) -> None:
    code, out = kproxy(lab, "diff", "--live")
    assert code == 0, out
    assert "IPv4: no differences" in out
    # Another program inserts a rule into one of our chains and deletes one of our rules.
    svc_chain = next(
        ln.split()[1] for ln in lab.nat().splitlines()
        if ln.startswith("-A KUBE-SVC-") and "default/echo:tcp" in ln
    )  # fmt: skip
    lab.lab.node.exec(["iptables", "-t", "nat", "-I", svc_chain, "-j", "RETURN"], check=True)
    jump = ["-m", "comment", "--comment", "kubernetes postrouting rules", "-j", "KUBE-POSTROUTING"]
    lab.lab.node.exec(["iptables", "-t", "nat", "-D", "POSTROUTING", *jump], check=True)
    code, out = kproxy(lab, "diff", "--live", "--json")
    assert code == 1, out
    report = json.loads(out)
    got = {(d["table"], d["chain"], d["change"], d["rule"]) for d in report["IPv4"]}
    assert got == {
        ("nat", svc_chain, "unexpected-rule", "-j RETURN"),
        ("nat", "POSTROUTING", "missing-rule",
         '-m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING'),
    }  # fmt: skip
    assert report["IPv6"] == []


@pytest.fixture
def nft_lab(tmp_path: Path) -> Iterator[ProxyLab]:
    objs = [echo_service(), echo_slice(["10.244.1.2", "10.244.2.2", "10.244.3.2"])]
    affinity = echo_service(externalTrafficPolicy="Local", sessionAffinity="ClientIP")
    affinity["metadata"]["name"] = "local"
    affinity["spec"]["clusterIP"] = affinity["spec"]["clusterIPs"][0] = "10.96.0.30"
    for p in affinity["spec"]["ports"]:
        p["nodePort"] += 100
    local_slice = echo_slice(["10.244.1.2", "10.244.2.2"], name="local-1")
    local_slice["metadata"]["labels"]["kubernetes.io/service-name"] = "local"
    objects = [*objs, empty_service(), affinity, local_slice]
    with proxy_lab(tmp_path, objects, mode="nftables") as pl:
        pl.start_daemon()
        pl.wait_synced()
        yield pl


def test_nftables_live_table_reads_back_as_rendered_and_traces_the_same(nft_lab: ProxyLab) -> None:
    lab = nft_lab
    live = lab.call(lambda: _core.NftTable.live("IPv4"))
    cfg = ProxyConfig(
        mode="nftables",
        master=lab.api.api_url,
        hostname_override=NODE,
        cluster_cidrs=(CLUSTER_CIDR,),
    )
    want = lab.call(lambda: rendered(cfg)).engines["IPv4"].nft_table()
    assert want is not None and live.exists
    # Every chain, rule, set and element the kernel holds, read back through nft's JSON, is
    # exactly what kproxy renders: the reader understands all of kproxy's vocabulary.
    assert live.lines() == want.lines()
    node_ip, pod, outside = lab.lab.node_ip, "10.244.4.2", "192.168.101.2"
    cases: list[tuple[str, str, int, Protocol]] = [
        (pod, ECHO_IP, 80, "TCP"), (outside, ECHO_IP, 80, "TCP"), (pod, ECHO_IP, 80, "UDP"),
        (outside, node_ip, NODE_PORT_TCP, "TCP"), (pod, EMPTY_IP, 80, "TCP"),
        (pod, ECHO_IP, 81, "TCP"), (outside, "10.96.0.30", 80, "TCP"),
        (outside, node_ip, NODE_PORT_TCP + 100, "TCP"), ("10.244.1.2", ECHO_IP, 80, "TCP"),
    ]  # fmt: skip
    for src, dst, port, proto in cases:
        a = live.trace(_core.Packet(src, dst, proto, port, "external", [node_ip]))
        b = want.trace(_core.Packet(src, dst, proto, port, "external", [node_ip]))
        assert (a.dnat, a.verdict, a.masquerade, a.matched) == (
            b.dnat,
            b.verdict,
            b.masquerade,
            b.matched,
        ), (src, dst, port)
    code, out = kproxy(lab, "trace", "--live", "--proxy-mode", "nftables", pod, f"{EMPTY_IP}:80")
    assert code == 0 and "REJECT (the Service has no endpoints)" in out, out


def test_nftables_diff_reports_exactly_what_another_program_changed(nft_lab: ProxyLab) -> None:
    lab = nft_lab
    code, out = kproxy(lab, "diff", "--live", "--proxy-mode", "nftables")
    assert code == 0, out
    tamper = (
        "delete element ip kproxy service-ips { 10.96.0.10 . tcp . 80 }\n"
        "add rule ip kproxy services tcp dport 9999 drop\n"
    )
    lab.lab.node.exec(["nft", "-f", "-"], input=tamper, check=True)
    code, out = kproxy(lab, "diff", "--live", "--proxy-mode", "nftables", "--json")
    assert code == 1, out
    got = {(d["chain"], d["change"]) for d in json.loads(out)["IPv4"]}
    assert got == {("service-ips", "missing-element"), ("services", "unexpected-rule")}, got
