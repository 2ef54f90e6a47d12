"""Metric names, types and the metrics server's endpoints."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import pytest
from prometheus_client import generate_latest

from kproxy import _core
from kproxy.backends import for_mode
from kproxy.backends.proxier import engine_config
from kproxy.config import ProxyConfig
from kproxy.metrics import Metrics
from kproxy.tracker import ChangeSet


def get(port: int, path: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.status, r.headers["Content-Type"], r.read().decode()


def test_upstream_names_and_endpoints() -> None:
    m = with_mode("iptables")
    m.sync_duration.labels(ip_family="IPv4").observe(0.02)
    m.service_changes.inc()
    m.no_local_endpoints.labels(ip_family="IPv4", traffic_policy="external").set(2)
    m.health_answered("/healthz", 503)
    server = m.server("127.0.0.1:0")
    server.start()
    try:
        code, ctype, body = get(server.port, "/metrics")
        assert code == 200 and ctype.startswith("text/plain")
        for line in (
            "# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram",
            'kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family="IPv4",le="0.032"} 1.0',
            "kubeproxy_sync_proxy_rules_service_changes_total 1.0",
            "# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge",
            "# TYPE kubeproxy_network_programming_duration_seconds histogram",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total"
            '{ip_family="IPv4",traffic_policy="external"} 2.0',
            'kubeproxy_proxy_healthz_total{code="503"} 1.0',
            "# TYPE kubeproxy_sync_proxy_rules_iptables_restore_failures_total counter",
        ):
            assert line in body, line
        assert get(server.port, "/proxyMode")[2] == "iptables"
        assert get(server.port, "/healthz")[2] == "ok"
    finally:
        server.close()


def steady(text: str) -> str:
    """The exposition without the process's own figures (memory, CPU, fds move by
    themselves)."""
    return "".join(line for line in text.splitlines(True) if "process_" not in line)


def test_malformed_requests_change_nothing_and_do_not_block() -> None:
    m = Metrics("iptables")
    server = m.server("127.0.0.1:0")
    server.start()
    try:
        before = steady(get(server.port, "/metrics")[2])
        # A client that connects and says nothing, one that sends garbage, a POST.
        idle = socket.create_connection(("127.0.0.1", server.port))
        with socket.create_connection(("127.0.0.1", server.port)) as junk:
            junk.sendall(b"\x00\xff garbage\r\n\r\n")
            junk.recv(1024)
        with socket.create_connection(("127.0.0.1", server.port)) as post:
            post.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            status_line = post.recv(1024).split(b"\r\n")[0]
            assert status_line.split()[1] == b"501"
        t = time.perf_counter()
        code, _, after = get(server.port, "/metrics")
        assert code == 200 and time.perf_counter() - t < 2  # the idle client holds nothing up
        assert steady(after) == before
        idle.close()
    finally:
        server.close()


def test_forwarder_counters_are_read_at_scrape_time() -> None:
    m = Metrics("userspace")
    stats = {"IPv4": {"tcp_accepted": 3, "tcp_active": 1, "listeners": 2}}
    m.watch_forwarder(lambda: stats)
    text = generate_latest(m.registry).decode()
    assert 'kubeproxy_userspace_tcp_connections_total{ip_family="IPv4"} 3.0' in text
    assert 'kubeproxy_userspace_tcp_connections_active{ip_family="IPv4"} 1.0' in text
    stats["IPv4"]["tcp_accepted"] = 7
    assert 'connections_total{ip_family="IPv4"} 7.0' in generate_latest(m.registry).decode()


# Upstream's families (kube-proxy-features.md §1.8, RegisterMetrics(mode)): in every mode...
COMMON = {
    "sync_proxy_rules_duration_seconds", "sync_proxy_rules_last_timestamp_seconds",
    "sync_proxy_rules_last_queued_timestamp_seconds", "network_programming_duration_seconds",
    "sync_proxy_rules_endpoint_changes_pending", "sync_proxy_rules_endpoint_changes_total",
    "sync_proxy_rules_service_changes_pending", "sync_proxy_rules_service_changes_total",
    "sync_proxy_rules_no_local_endpoints_total", "proxy_healthz_total", "proxy_livez_total",
    "conntrack_reconciler_sync_duration_seconds", "conntrack_reconciler_deleted_entries_total",
    # kproxy's own: skipped objects, and Services held at their last good rules.
    "invalid_objects_total", "sync_proxy_rules_refused_services",
    # Every component's: the process, and the build.
    "process_virtual_memory_bytes", "process_resident_memory_bytes", "process_start_time_seconds",
    "process_cpu_seconds_total", "process_open_fds", "process_max_fds", "kubernetes_build_info",
    "rest_client_requests_total", "rest_client_request_duration_seconds",
}  # fmt: skip
# ...and per mode.
PER_MODE = {
    "iptables": {
        "sync_full_proxy_rules_duration_seconds", "sync_partial_proxy_rules_duration_seconds",
        "sync_proxy_rules_iptables_restore_failures_total",
        "sync_proxy_rules_iptables_partial_restore_failures_total",
        "sync_proxy_rules_iptables_total", "sync_proxy_rules_iptables_last",
        "iptables_ct_state_invalid_dropped_packets_total",
        "iptables_localhost_nodeports_accepted_packets_total",
    },
    "ipvs": {"sync_proxy_rules_iptables_restore_failures_total"},
    "nftables": {
        "sync_full_proxy_rules_duration_seconds", "sync_partial_proxy_rules_duration_seconds",
        "sync_proxy_rules_nftables_sync_failures_total",
        "sync_proxy_rules_nftables_cleanup_failures_total",
        # KubeProxyNFTablesLocalhostNodePorts (on by default since 1.38).
        "nftables_localhost_nodeport_listeners",
        "nftables_localhost_nodeport_listener_creation_failures_total",
    },
    "userspace": set(),
}  # fmt: skip


def families(m: Metrics) -> set[str]:
    text = generate_latest(m.registry).decode()
    return {
        line.split()[2].removeprefix("kubeproxy_")
        for line in text.splitlines()
        if line.startswith("# TYPE ")
    }


def with_mode(mode: str) -> Metrics:
    """The metrics a daemon in ``mode`` exports: the common families and its backend's."""
    m = Metrics(mode)
    for_mode(ProxyConfig(mode=mode)).register_metrics(m.registry)  # type: ignore[arg-type]
    return m


@pytest.mark.parametrize("mode", sorted(PER_MODE))
def test_each_mode_exports_upstreams_families_for_it(mode: str) -> None:
    assert families(with_mode(mode)) == COMMON | PER_MODE[mode]


def test_no_created_series() -> None:
    m = Metrics("iptables")
    m.service_changes.inc()
    m.sync_duration.labels(ip_family="IPv4").observe(0.1)
    assert "_created" not in generate_latest(m.registry).decode()


def test_configz_serves_the_configuration() -> None:
    m = Metrics("nftables", configz=lambda: {"mode": "nftables", "clusterCIDR": "10.244.0.0/16"})
    server = m.server("127.0.0.1:0")
    server.start()
    try:
        code, ctype, body = get(server.port, "/configz")
        assert (code, ctype) == (200, "application/json")
        assert json.loads(body) == {
            "kubeproxy.config.k8s.io": {"mode": "nftables", "clusterCIDR": "10.244.0.0/16"}
        }
        text = get(server.port, "/metrics")[2]
        assert 'kubernetes_build_info{git_version="v1.' in text
        assert "process_resident_memory_bytes" in text
    finally:
        server.close()


def test_the_nfacct_counters_are_read_from_the_engines_at_scrape_time() -> None:
    # The engine (on the in-memory kernel) created both counters before its rules named them.
    cfg = ProxyConfig(mode="iptables")
    mode = for_mode(cfg)
    m = Metrics("iptables")
    mode.register_metrics(m.registry)
    text = generate_latest(m.registry).decode()
    assert "\nkubeproxy_iptables_localhost_nodeports_accepted_packets_total " not in text
    wire = engine_config(cfg, "IPv4", None, backend="fake", local_addrs=["192.168.0.2"])
    engine = _core.Engine(json.dumps(wire))
    engine.sync(ChangeSet({}, {}).to_json(), True)
    assert sorted(engine.nfacct_counters()) == [
        ("ct_state_invalid_dropped_pkts", 0),
        ("localhost_nps_accepted_pkts", 0),
    ]
    mode.watch(m, {"IPv4": engine})
    text = generate_latest(m.registry).decode()
    assert "kubeproxy_iptables_ct_state_invalid_dropped_packets_total 0.0" in text
    assert "kubeproxy_iptables_localhost_nodeports_accepted_packets_total 0.0" in text
