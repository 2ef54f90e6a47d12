"""Hostile and broken input through the real daemon, in both netfilter modes: oversized and
odd objects are handled or skipped one by one, and everything else keeps working."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import k8sobjects as k
from tests.privileged.harness import (
    ECHO_IP,
    MODES,
    ProxyLab,
    echo_service,
    echo_slice,
    http_get,
    proxy_lab,
)

pytestmark = pytest.mark.privileged

PODS = ("10.244.1.2", "10.244.2.2", "10.244.3.2")


@pytest.fixture(params=MODES)
def lab(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProxyLab]:
    with proxy_lab(tmp_path, [echo_service(), echo_slice(PODS)], mode=request.param) as pl:
        pl.start_daemon("--metrics-bind-address", "127.0.0.1:10249")
        pl.wait_synced()
        yield pl


def servers(lab: ProxyLab, count: int = 40) -> set[str]:
    # Each probe picks one of three endpoints at random: 15 probes missed one about 0.7% of
    # the time (a CI run saw it), 40 about once in four million.
    results = lab.lab.pod("client").tcp_probe_many(ECHO_IP, 80, count, timeout=2.0)
    assert all(r.ok for r in results), results[:3]
    return {r.server or "" for r in results}


def test_hostile_objects_are_handled_one_by_one(lab: ProxyLab) -> None:
    # 10,000 ports on one Service: valid, and programmed.
    many = k.service("many", "10.96.1.1", [k.port(f"p{i}", 10000 + i) for i in range(10000)])
    lab.put(many)
    # An EndpointSlice for a Service that does not exist; the same endpoint in two slices.
    lab.put(
        k.endpoint_slice("ghost-1", "ghost", [k.endpoint("10.244.2.2")], [k.slice_port("x", 1)])
    )
    lab.put(echo_slice(["10.244.1.2"], name="echo-2"))
    # A huge annotation (1 MiB) on a valid Service, and names at and over the limits.
    big = k.service("big", "10.96.1.2", [k.port("http", 80)])
    big["metadata"]["annotations"] = {"example.com/blob": "x" * (1 << 20)}
    lab.put(big)
    lab.put(k.service("a" * 63, "10.96.1.3", [k.port("http", 80)]))
    lab.put(k.service("b" * 64, "10.96.1.4", [k.port("http", 80)]))
    lab.put(k.service("ünïcode", "10.96.1.5", [k.port("http", 80)]))
    lab.put(k.service("bad-ip", "10.96.999.1", [k.port("http", 80)]))
    # A Service changing type back and forth.
    for svc_type in ("NodePort", "ClusterIP", "LoadBalancer", "ClusterIP"):
        flip = k.service("flip", "10.96.1.6", [k.port("http", 80, node_port=31000)], type=svc_type)
        if svc_type == "ClusterIP":
            del flip["spec"]["ports"][0]["nodePort"]
        lab.put(flip)
        time.sleep(0.2)
    lab.put(
        k.endpoint_slice("flip-1", "flip", [k.endpoint("10.244.3.2")], [k.slice_port("http", 8080)])
    )
    lab.wait(lambda: "10.96.1.6" in lab.rules() and "10.96.1.1" in lab.rules(), 60, "the flood")
    rules = lab.rules()
    assert "10.96.1.3" in rules  # the 63-character name is valid
    for absent in ("10.96.1.4", "10.96.1.5", "10.96.999.1"):
        assert absent not in rules
    log = lab.log()
    for name, field in (("b" * 64, "name"), ("ünïcode", "name"), ("bad-ip", "clusterIP")):
        lines = [ln for ln in log.splitlines() if f"default/{name}" in ln]
        assert len(lines) == 1 and field in lines[0], (name, lines)
    _, metrics = http_get(lab.lab.node, "http://127.0.0.1:10249/metrics")
    invalid = sum(
        float(ln.split()[-1])
        for ln in metrics.splitlines()
        if ln.startswith("kubeproxy_invalid_objects_total{")
    )
    assert invalid >= 3, metrics
    # The flipped Service ended as a ClusterIP: its NodePort is gone, its cluster IP serves.
    assert "31000" not in rules
    assert lab.lab.pod("client").tcp_probe("10.96.1.6", 80).server == "pod3"
    # And the rest kept working throughout: the duplicate endpoint counts once.
    assert servers(lab) == {"pod1", "pod2", "pod3"}
    assert "sync failed" not in log
    assert lab.daemon is not None and lab.daemon.poll() is None


def test_a_service_cannot_take_another_services_cluster_ip(lab: ProxyLab) -> None:
    """The CVE-2020-8554 class: a Service names the echo Service's cluster IP as its
    externalIP. The cluster IP wins, the claimant is named by a log line and an Event, and
    keeps its other address."""
    pods = [k.endpoint("10.244.3.2", node="node-b")]
    thief = k.service("thief", "10.96.0.66", [k.port("tcp", 80, "TCP", target=8080)],
                      externalIPs=[ECHO_IP, "10.96.150.9"])  # fmt: skip
    lab.put(thief)
    lab.put(k.endpoint_slice("thief-1", "thief", pods, [k.slice_port("tcp", 8080)]))
    conflict = f"{ECHO_IP} is the cluster IP of Service default/echo"
    lab.wait(lambda: conflict in lab.log(), 15, "the conflict reported")
    assert servers(lab) == {"pod1", "pod2", "pod3"}  # every answer from echo's own pods
    got = lab.lab.pod("client").tcp_probe_many("10.96.150.9", 80, 5, timeout=2.0)
    assert {r.server for r in got} == {"pod3"}, got
    events = lab.call(lambda: lab.api.list_objects("Event.events.k8s.io"))
    (ev,) = [e for e in events if e["reason"] == "FailedToProgram"]
    assert ev["regarding"]["name"] == "thief" and ECHO_IP in ev["note"]
