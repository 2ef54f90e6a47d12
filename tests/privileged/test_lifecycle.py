"""Daemon lifecycle on a real kernel: start-up gating, health, cleanup, SCTP rules loading."""

from __future__ import annotations

import json
import sys
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

HEALTHZ = "http://127.0.0.1:10256/healthz"
LIVEZ = "http://127.0.0.1:10256/livez"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[ProxyLab]:
    with proxy_lab(tmp_path, [echo_service(), echo_slice(["10.244.1.2"])]) as pl:
        yield pl


def kube_rules(pl: ProxyLab) -> list[str]:
    text = pl.nat() + pl.filter()
    return [ln for ln in text.splitlines() if "KUBE-" in ln] + pl.nft().splitlines()


@pytest.fixture(params=MODES)
def mode_lab(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProxyLab]:
    objects = [echo_service(), echo_slice(["10.244.1.2"])]
    with proxy_lab(tmp_path, objects, mode=request.param) as pl:
        yield pl


def test_unreachable_api_server_programs_nothing_and_reports_not_ready(lab: ProxyLab) -> None:
    lab.call(lab.api.stop_api)
    lab.start_daemon("--sync-period", "1s")
    # Health answers while the lists are missing, and turns unhealthy after 2 x syncPeriod.
    lab.wait(lambda: http_get(lab.lab.node, LIVEZ)[0] == 503, 15, "livez to fail")
    status, body = http_get(lab.lab.node, HEALTHZ)
    assert status == 503 and "lastUpdated" in json.loads(body)
    assert kube_rules(lab) == []  # nothing is programmed before the first complete lists
    assert "retrying in" in lab.log()
    lab.call(lab.api.start_api)
    lab.wait(lambda: len(lab.dnat_targets()) == 2, 30, "rules once the API server is back")
    lab.wait(lambda: http_get(lab.lab.node, HEALTHZ)[0] == 200, 10, "healthz to recover")
    status, body = http_get(lab.lab.node, HEALTHZ)
    assert json.loads(body)["nodeEligible"] is True


def test_a_node_being_deleted_fails_healthz_but_not_livez(lab: ProxyLab) -> None:
    lab.start_daemon()
    lab.wait(lambda: http_get(lab.lab.node, HEALTHZ)[0] == 200, 30, "healthy")
    node = k.node("node-a")
    node["spec"]["taints"] = [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]
    lab.put(node)
    lab.wait(lambda: http_get(lab.lab.node, HEALTHZ)[0] == 503, 10, "healthz to fail")
    assert http_get(lab.lab.node, LIVEZ)[0] == 200


def test_cleanup_also_removes_what_kube_proxys_other_modes_leave(lab: ProxyLab) -> None:
    node = lab.lab.node
    node.exec(["nft", "add", "table", "ip", "kube-proxy"], check=True)
    node.exec(["nft", "add", "table", "ip", "someone-else"], check=True)
    node.exec(["ipset", "create", "KUBE-CLUSTER-IP", "hash:ip,port"], check=True)
    node.exec(["ipset", "create", "OTHER-SET", "hash:ip"], check=True)
    r = node.exec([sys.executable, "-m", "kproxy", "cleanup"], timeout=60)
    assert r.returncode == 0, r.stderr
    tables = node.exec(["nft", "list", "tables"], check=True).stdout
    assert "kube-proxy" not in tables and "someone-else" in tables
    sets = node.exec(["ipset", "list", "-n"], check=True).stdout.split()
    assert sets == ["OTHER-SET"]
    node.exec(["ipset", "destroy", "OTHER-SET"], check=True)


def test_cleanup_removes_everything_and_is_safe_to_repeat(mode_lab: ProxyLab) -> None:
    lab = mode_lab
    cleanup = [sys.executable, "-m", "kproxy", "cleanup"]
    # On a node kproxy never ran on.
    assert lab.lab.node.exec(cleanup, timeout=60).returncode == 0
    lab.start_daemon()
    lab.wait(lambda: len(lab.dnat_targets()) == 2, 30, "rules")
    assert lab.daemon is not None
    lab.daemon.terminate()
    assert lab.daemon.wait(timeout=10) == 0
    assert kube_rules(lab)  # SIGTERM leaves the rules in place
    for _ in range(2):
        r = lab.lab.node.exec(cleanup, timeout=60)
        assert r.returncode == 0, r.stderr
        assert kube_rules(lab) == []
    assert lab.lab.pod("client").tcp_probe(ECHO_IP, 80, timeout=1.0).error == "timeout"


def test_sctp_service_rules_load_into_the_kernel(lab: ProxyLab) -> None:
    lab.put(
        k.service(
            "sig", "10.96.0.50", [k.port("sctp", 3868, "SCTP", node_port=30868)], type="NodePort"
        )
    )
    lab.put(
        k.endpoint_slice(
            "sig-1", "sig", [k.endpoint("10.244.2.2")], [k.slice_port("sctp", 3868, "SCTP")]
        )
    )
    lab.start_daemon()
    lab.wait(lambda: "10.244.2.2:3868" in lab.dnat_targets(), 30, "SCTP rules")
    nat = lab.nat()
    assert "-d 10.96.0.50/32 -p sctp" in nat and "--dport 30868" in nat


def test_rules_flushed_by_someone_else_are_restored_within_the_sync_period(
    mode_lab: ProxyLab,
) -> None:
    lab = mode_lab
    lab.start_daemon("--sync-period", "1s")
    lab.wait_synced()
    if lab.mode == "iptables":
        # A firewall reload (a restore without --noflush): every rule and chain of nat goes.
        lab.lab.node.exec(["iptables-restore", "-w"], input="*nat\nCOMMIT\n", check=True)
    else:
        # Someone runs `nft flush ruleset` (a firewall reload): our table goes.
        lab.lab.node.exec(["nft", "flush", "ruleset"], check=True)
    assert not lab.dnat_targets()
    lab.wait(lambda: len(lab.dnat_targets()) == 2, 10, "rules to be restored")
    assert lab.lab.pod("client").tcp_probe(ECHO_IP, 80).server == "pod1"
    assert "rewriting everything" in lab.log(), "\n".join(
        ln for ln in lab.log().splitlines() if "kproxy" in ln
    )


def test_metrics_and_proxy_mode_are_served(lab: ProxyLab) -> None:
    lab.start_daemon("--metrics-bind-address", "127.0.0.1:10249")
    lab.wait_synced()
    status, body = http_get(lab.lab.node, "http://127.0.0.1:10249/metrics")
    assert status == 200
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in body.splitlines()
        if line and not line.startswith("#")
    }
    assert values['kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"}'] > 0
    assert values["kubeproxy_sync_proxy_rules_service_changes_total"] >= 1
    assert values['kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family="IPv4"}'] >= 1
    assert values['kubeproxy_sync_proxy_rules_iptables_last{ip_family="IPv4",table="nat"}'] > 0
    assert http_get(lab.lab.node, "http://127.0.0.1:10249/proxyMode") == (200, "iptables")
    # And the Starting event reached the API server.
    lab.wait(
        lambda: any(
            e["reason"] == "Starting"
            for e in lab.call(lambda: lab.api.list_objects("Event.events.k8s.io"))
        ),
        10,
        "the Starting event",
    )
