"""``kproxy render`` and ``kproxy trace`` on the bundled example, without privileges."""

from __future__ import annotations

from typing import get_args

import pytest

from kproxy.commands import main
from kproxy.model import TraceReason
from kproxy.tools import REASONS

EXAMPLE = ["--manifests", "examples/manifests", "--hostname-override", "kproxy-demo"]
EXAMPLE += ["--cluster-cidr", "10.244.0.0/16"]


def test_render_prints_both_families(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", *EXAMPLE]) == 0
    out = capsys.readouterr().out
    assert "# iptables rules for IPv4" in out and "# iptables rules for IPv6" in out
    assert "--to-destination 10.244.2.2:8080" in out
    assert '"demo/empty:http has no endpoints"' in out


def test_trace_a_node_port_from_outside(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["trace", "192.168.101.2", "192.168.101.1:30080", "--node-ip", "192.168.101.1"]
    assert main([*args, *EXAMPLE]) == 0
    out = capsys.readouterr().out
    assert "DNAT to:     10.244.1.2:8080, 10.244.2.2:8080, 10.244.3.2:8080" in out
    assert "masquerade:  yes" in out


def test_trace_explains_a_rejection(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "10.244.4.2", "10.96.0.20:80/tcp", *EXAMPLE]) == 0
    out = capsys.readouterr().out
    assert "REJECT (the Service has no endpoints)" in out
    assert '"demo/empty:http has no endpoints"' in out  # the rule that decided


def test_trace_udp_and_unknown_ports(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "10.244.4.2", "10.96.0.10:80/UDP", *EXAMPLE]) == 0
    assert "10.244.3.2:8081" in capsys.readouterr().out
    assert main(["trace", "10.244.4.2", "10.96.0.10:81", *EXAMPLE]) == 0
    assert "DNAT to:     nothing" in capsys.readouterr().out


@pytest.mark.parametrize(
    "dst", ["10.96.0.10", "10.96.0.10:0", "10.96.0.10:80/ICMP", "nowhere:80", "[fd00::1]:80"]
)
def test_trace_refuses_bad_destinations(dst: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "10.244.4.2", dst, *EXAMPLE]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kproxy: error:") and len(err.strip().splitlines()) == 1


def test_render_the_ipvs_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "--proxy-mode", "ipvs", "--ipvs-scheduler", "wlc", *EXAMPLE]) == 0
    out = capsys.readouterr().out
    assert "# ipvs for IPv4" in out
    # The virtual server, its real servers, and the ipset and iptables companions.
    assert "10.96.0.10:80/tcp wlc -> 10.244.1.2:8080 10.244.2.2:8080 10.244.3.2:8080" in out
    assert "add KPROXY-IPVS-SWAP 10.96.0.10,tcp:80" in out
    assert "-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst" in out
    # A Service without endpoints: a virtual server with no real servers (refused).
    assert "10.96.0.20:80/tcp wlc -> (no real servers: refused)" in out


def test_trace_the_ipvs_mode(capsys: pytest.CaptureFixture[str]) -> None:
    ipvs = ["--proxy-mode", "ipvs", *EXAMPLE]
    assert main(["trace", "192.168.101.2", "10.96.0.10:80/tcp", *ipvs]) == 0
    out = capsys.readouterr().out
    assert "DNAT to:     10.244.1.2:8080, 10.244.2.2:8080, 10.244.3.2:8080" in out
    assert "masquerade:  yes" in out  # from outside the cluster
    assert "ipvs: 10.96.0.10:80/tcp rr -> " in out
    assert main(["trace", "10.244.4.2", "10.96.0.20:80/tcp", *ipvs]) == 0
    out = capsys.readouterr().out
    assert "verdict:     REJECT (the Service has no endpoints)" in out
    assert main(["trace", "192.168.101.2", "10.96.0.10:22/tcp", *ipvs]) == 0
    out = capsys.readouterr().out
    assert "REJECT (no Service on this port of the address)" in out
    assert "filter/KUBE-IPVS-FILTER: -m conntrack --ctstate NEW" in out


def test_every_trace_reason_is_explained() -> None:
    assert set(REASONS) == set(get_args(TraceReason))
