"""kube-proxy's metrics, with upstream's names, types and labels (``kubeproxy_*``), served on
--metrics-bind-address with ``/metrics``, ``/proxyMode`` and ``/healthz``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from kproxy import __version__
from kproxy.http import Response, Route, Server
from kproxy.upstream import UPSTREAM_VERSION

NS = "kubeproxy"
# Upstream: ExponentialBuckets(0.001, 2, 15).
SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
# Upstream's network programming buckets: 0.25s steps, then 1s, 5s and 30s steps up to 5m.
NPL_BUCKETS = (
    0.25,
    0.5,
    *(float(i) for i in range(1, 60)),
    *(float(60 + 5 * i) for i in range(12)),
    *(float(120 + 30 * i) for i in range(7)),
)
FAM = ("ip_family",)
# client-go's request latency buckets.
REST_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
# Upstream's Prometheus client exports no `<name>_created` series.
disable_created_metrics()  # type: ignore[no-untyped-call]

# The userspace forwarder's counters (kproxy's own; upstream removed its userspace mode
# before it had metrics): core counter name -> (metric name, is a gauge, help).
FORWARD_METRICS = {
    "tcp_accepted": ("userspace_tcp_connections", False, "TCP connections accepted"),
    "tcp_active": ("userspace_tcp_connections_active", True, "TCP connections open now"),
    "tcp_connect_failures": (
        "userspace_endpoint_connect_failures",
        False,
        "Connects to an endpoint that failed or timed out (the next endpoint was tried)",
    ),
    "tcp_no_endpoint": (
        "userspace_tcp_connections_reset",
        False,
        "TCP connections reset because no endpoint could be reached",
    ),
    "tcp_over_limit": (
        "userspace_tcp_connections_over_limit",
        False,
        "TCP connections reset because the connection cap was reached",
    ),
    "tcp_reset": (
        "userspace_tcp_connections_failed",
        False,
        "TCP connections ended by a reset or error from either side, or not taken by a worker",
    ),
    "tcp_idle_closed": (
        "userspace_tcp_connections_idle_closed",
        False,
        "Relayed TCP connections closed after the idle timeout with no bytes either way",
    ),
    "bytes_to_endpoints": ("userspace_bytes_to_endpoints", False, "Bytes relayed to endpoints"),
    "bytes_to_clients": ("userspace_bytes_to_clients", False, "Bytes relayed to clients"),
    "udp_sessions": ("userspace_udp_sessions", False, "UDP sessions started"),
    "udp_active": ("userspace_udp_sessions_active", True, "UDP sessions open now"),
    "udp_datagrams": ("userspace_udp_datagrams", False, "UDP datagrams from clients"),
    "udp_dropped": (
        "userspace_udp_datagrams_dropped",
        False,
        "UDP datagrams dropped (no endpoint, or the session cap reached)",
    ),
    "listeners": ("userspace_listeners", True, "Listening sockets"),
    "listeners_refused": (
        "userspace_listeners_refused",
        False,
        "Listeners not opened because the open-file budget was spent (the Service is retried)",
    ),
}

ForwardStats = Callable[[], Mapping[str, Mapping[str, int]]]


class _ForwarderCollector:
    """Reads the forwarder's counters at scrape time (the data path never calls Python)."""

    def __init__(self, source: ForwardStats) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        stats = self._source()
        for key, (name, is_gauge, doc) in FORWARD_METRICS.items():
            kind = GaugeMetricFamily if is_gauge else CounterMetricFamily
            m = kind(f"{NS}_{name}", doc, labels=list(FAM))
            for fam, values in sorted(stats.items()):
                if key in values:
                    m.add_metric([fam], values[key])
            yield m


# The families only some modes export, as upstream's RegisterMetrics(mode) registers them
# (pkg/proxy/metrics/metrics.go); every other family is exported in every mode.
MODE_ONLY = {
    "sync_full_proxy_rules_duration_seconds": ("iptables", "nftables"),
    "sync_partial_proxy_rules_duration_seconds": ("iptables", "nftables"),
    "sync_proxy_rules_iptables_restore_failures": ("iptables", "ipvs"),
    "sync_proxy_rules_iptables_partial_restore_failures": ("iptables",),
    "sync_proxy_rules_iptables_total": ("iptables",),
    "sync_proxy_rules_iptables_last": ("iptables",),
    "sync_proxy_rules_nftables_sync_failures": ("nftables",),
    "sync_proxy_rules_nftables_cleanup_failures": ("nftables",),
}


class Metrics:
    def __init__(
        self,
        mode: str,
        registry: CollectorRegistry | None = None,
        configz: Callable[[], object] | None = None,
    ) -> None:
        """``configz``: the configuration served on /configz (upstream's, as JSON)."""
        self.mode = mode
        self.registry = registry or CollectorRegistry()
        self._configz = configz
        # process_* (CPU, memory, open files, start time), as every Go component exports.
        ProcessCollector(registry=self.registry)
        build = Gauge(
            "kubernetes_build_info",
            "The build kproxy follows (upstream's release) and kproxy's own version",
            ("git_version", "kproxy_version"),
            registry=self.registry,
        )
        build.labels(git_version=UPSTREAM_VERSION, kproxy_version=__version__).set(1)
        # client-go's, for the informers' requests to the API server.
        self.rest_requests = Counter(
            "rest_client_requests",
            "Number of HTTP requests, partitioned by status code, method, and host",
            ("code", "host", "method"),
            registry=self.registry,
        )
        self.rest_duration = Histogram(
            "rest_client_request_duration_seconds",
            "Request latency in seconds, broken down by verb and host",
            ("verb", "host"),
            buckets=REST_BUCKETS,
            registry=self.registry,
        )

        def reg(name: str) -> CollectorRegistry | None:
            # A family of another mode still exists (the daemon's code stays mode-blind) but
            # is never exported.
            return self.registry if mode in MODE_ONLY.get(name, (mode,)) else None

        def hist(name: str, doc: str, buckets: tuple[float, ...] = SYNC_BUCKETS) -> Histogram:
            return Histogram(name, doc, FAM, namespace=NS, buckets=buckets, registry=reg(name))

        def gauge(name: str, doc: str, labels: tuple[str, ...] = FAM) -> Gauge:
            return Gauge(name, doc, labels, namespace=NS, registry=reg(name))

        def counter(name: str, doc: str, labels: tuple[str, ...] = FAM) -> Counter:
            return Counter(name, doc, labels, namespace=NS, registry=reg(name))

        self.sync_duration = hist(
            "sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds"
        )
        self.sync_full_duration = hist(
            "sync_full_proxy_rules_duration_seconds", "SyncProxyRules latency of full syncs"
        )
        self.sync_partial_duration = hist(
            "sync_partial_proxy_rules_duration_seconds", "SyncProxyRules latency of partial syncs"
        )
        self.last_sync = gauge(
            "sync_proxy_rules_last_timestamp_seconds", "The last time rules were synced"
        )
        self.last_queued = gauge(
            "sync_proxy_rules_last_queued_timestamp_seconds", "The last time a sync was queued"
        )
        self.network_programming = hist(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            NPL_BUCKETS,
        )
        self.endpoint_changes_pending = gauge(
            "sync_proxy_rules_endpoint_changes_pending", "Pending proxy rules Endpoint changes", ()
        )
        self.endpoint_changes = counter(
            "sync_proxy_rules_endpoint_changes", "Cumulative proxy rules Endpoint changes", ()
        )
        self.service_changes_pending = gauge(
            "sync_proxy_rules_service_changes_pending", "Pending proxy rules Service changes", ()
        )
        self.service_changes = counter(
            "sync_proxy_rules_service_changes", "Cumulative proxy rules Service changes", ()
        )
        self.no_local_endpoints = gauge(
            "sync_proxy_rules_no_local_endpoints_total",
            "Services with a Local traffic policy and no local endpoints",
            ("ip_family", "traffic_policy"),
        )
        self.restore_failures = counter(
            "sync_proxy_rules_iptables_restore_failures", "Cumulative iptables restore failures"
        )
        self.partial_restore_failures = counter(
            "sync_proxy_rules_iptables_partial_restore_failures",
            "Cumulative iptables partial restore failures",
        )
        self.nft_sync_failures = counter(
            "sync_proxy_rules_nftables_sync_failures", "Cumulative nftables sync failures"
        )
        self.refused_services = gauge(
            "sync_proxy_rules_refused_services",
            "Services whose rules the kernel refused (kept at their last good rules)",
            ("ip_family", "mode"),
        )
        self.nft_cleanup_failures = counter(
            "sync_proxy_rules_nftables_cleanup_failures", "Cumulative nftables cleanup failures"
        )
        self.rules_last = gauge(
            "sync_proxy_rules_iptables_last",
            "Number of iptables rules written in the last sync",
            ("ip_family", "table"),
        )
        self.conntrack_duration = Histogram(
            "conntrack_reconciler_sync_duration_seconds",
            "Time to reconcile stale conntrack entries",
            FAM,
            namespace=NS,
            buckets=SYNC_BUCKETS,
            registry=self.registry,
        )
        self.conntrack_deleted = counter(
            "conntrack_reconciler_deleted_entries", "Stale conntrack entries deleted"
        )
        self.rules_total = gauge(
            "sync_proxy_rules_iptables_total",
            "Number of iptables rules owned by kube-proxy",
            ("ip_family", "table"),
        )
        self.healthz = counter("proxy_healthz", "Cumulative proxy healthz HTTP status", ("code",))
        self.livez = counter("proxy_livez", "Cumulative proxy livez HTTP status", ("code",))
        self.invalid_objects = counter(
            "invalid_objects", "Objects skipped because a field is invalid (kproxy)", ("kind",)
        )

    def watch_forwarder(self, source: ForwardStats) -> None:
        """Export the userspace forwarder's counters: ``source`` gives them per IP family."""
        self.registry.register(_ForwarderCollector(source))

    def rest_request(self, method: str, host: str, code: str, seconds: float) -> None:
        self.rest_requests.labels(code=code, host=host, method=method).inc()
        self.rest_duration.labels(verb=method, host=host).observe(seconds)

    def health_answered(self, path: str, code: int) -> None:
        (self.healthz if path == "/healthz" else self.livez).labels(code=str(code)).inc()

    def routes(self) -> dict[str, Route]:
        def metrics() -> Response:
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)

        def proxy_mode() -> Response:
            return 200, "text/plain; charset=utf-8", self.mode.encode()

        def ok() -> Response:
            return 200, "text/plain; charset=utf-8", b"ok"

        def configz() -> Response:
            cfg = self._configz() if self._configz is not None else {}
            body = json.dumps({"kubeproxy.config.k8s.io": cfg}, default=str)
            return 200, "application/json", body.encode()

        return {"/metrics": metrics, "/proxyMode": proxy_mode, "/healthz": ok, "/configz": configz}

    def server(self, address: str) -> Server:
        return Server(address, self.routes(), name="metrics")
