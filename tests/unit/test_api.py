"""The library API and ``kproxy trace --manifests`` give upstream's answers for the proxier
matrix (the same scenarios the core tests trace; here through the public entry points)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kproxy import api
from kproxy.commands import main
from tests import k8sobjects as k

NODE_IP, POD, OUTSIDE, BLOCKED = "192.168.0.2", "10.0.0.2", "203.0.113.2", "203.0.113.130"
EPS = [("10.180.0.1", "node-a"), ("10.180.1.1", "node-b")]


def svc(name: str, ip: str, node_port: int, **spec: Any) -> dict[str, Any]:
    obj = k.service(name, ip, [k.port("p", 80, node_port=node_port)], type="NodePort", **spec)
    if spec.get("loadBalancerSourceRanges"):
        obj["spec"]["type"] = "LoadBalancer"
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}
    return obj


def eps(name: str, endpoints: list[tuple[str, str]]) -> dict[str, Any]:
    return k.endpoint_slice(
        f"{name}-1", name, [k.endpoint(ip, node=n) for ip, n in endpoints], [k.slice_port("p", 80)]
    )


OBJECTS = [
    svc("cluster", "172.30.0.1", 30001), eps("cluster", EPS),
    svc("local", "172.30.0.2", 30002, externalTrafficPolicy="Local"), eps("local", EPS),
    svc("nolocal", "172.30.0.3", 30003, externalTrafficPolicy="Local"), eps("nolocal", EPS[1:]),
    svc("empty", "172.30.0.4", 30004), eps("empty", []),
    svc("itp", "172.30.0.5", 30005, internalTrafficPolicy="Local"), eps("itp", EPS[1:]),
    svc("ranges", "172.30.0.6", 30006, loadBalancerSourceRanges=["203.0.113.0/25"]),
    eps("ranges", EPS),
    k.node("node-a", addresses=[NODE_IP]),
]  # fmt: skip

# (src, dst, port) -> (DNAT targets, verdict, masquerade)
MATRIX: list[tuple[str, str, int, set[str], str | None, bool]] = [
    (POD, "172.30.0.1", 80, {"10.180.0.1:80", "10.180.1.1:80"}, None, False),
    (OUTSIDE, "172.30.0.1", 80, {"10.180.0.1:80", "10.180.1.1:80"}, None, True),
    (OUTSIDE, NODE_IP, 30001, {"10.180.0.1:80", "10.180.1.1:80"}, "ACCEPT", True),
    (OUTSIDE, NODE_IP, 30002, {"10.180.0.1:80"}, None, False),
    (POD, NODE_IP, 30002, {"10.180.0.1:80", "10.180.1.1:80"}, None, False),
    (OUTSIDE, NODE_IP, 30003, set(), "DROP", False),
    (POD, "172.30.0.4", 80, set(), "REJECT", False),
    (OUTSIDE, NODE_IP, 30004, set(), "REJECT", False),
    (POD, "172.30.0.5", 80, set(), "DROP", False),
    (OUTSIDE, "1.2.3.4", 80, {"10.180.0.1:80", "10.180.1.1:80"}, "ACCEPT", True),
    (BLOCKED, "1.2.3.4", 80, set(), "DROP", False),
    (BLOCKED, NODE_IP, 30006, {"10.180.0.1:80", "10.180.1.1:80"}, "ACCEPT", True),
]


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("manifests")
    (d / "cluster.yaml").write_text(yaml.safe_dump_all(OBJECTS))
    return d


@pytest.mark.parametrize(("src", "dst", "port", "dnat", "verdict", "masq"), MATRIX)
def test_library_api(
    src: str, dst: str, port: int, dnat: set[str], verdict: str | None, masq: bool
) -> None:
    cluster = api.Cluster.from_objects(OBJECTS, node="node-a", cluster_cidrs=["10.0.0.0/8"])
    t = cluster.trace(src, dst, port)
    assert (set(t.dnat), t.masquerade) == (dnat, masq)
    if verdict is not None:
        assert t.verdict == verdict


@pytest.mark.parametrize(("src", "dst", "port", "dnat", "verdict", "masq"), MATRIX)
def test_trace_cli_with_manifests(
    manifests: Path,
    capsys: pytest.CaptureFixture[str],
    src: str,
    dst: str,
    port: int,
    dnat: set[str],
    verdict: str | None,
    masq: bool,
) -> None:
    args = ["trace", src, f"{dst}:{port}", "--manifests", str(manifests)]
    assert main([*args, "--hostname-override", "node-a", "--cluster-cidr", "10.0.0.0/8"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"DNAT to:\s+(.*)", out)
    assert m is not None
    got = set() if m.group(1).startswith("nothing") else set(m.group(1).split(" (")[0].split(", "))
    assert got == dnat
    assert f"masquerade:  {'yes' if masq else 'no'}" in out
    if verdict is not None:
        assert f"verdict:     {verdict}" in out


def test_render_and_settings() -> None:
    cluster = api.Cluster.from_manifests(
        "examples/manifests", node="kproxy-demo", cluster_cidrs=["10.244.0.0/16"]
    )
    rules = cluster.render()
    assert "--to-destination 10.244.1.2:8080" in rules["IPv4"]
    assert "! -s 10.244.0.0/16" in rules["IPv4"]
    everything = cluster.with_settings(masquerade_all=True).render()["IPv4"]
    assert "! -s 10.244.0.0/16" not in everything
    with pytest.raises(ValueError, match="unsupported kind"):
        cluster.add([{"kind": "Pod"}])
