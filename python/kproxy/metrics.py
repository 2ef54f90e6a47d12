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


# The iptables mode's nfacct counters (kernel objects, one per node, shared by both
# families' rules): counter name -> (metric name, help).
NFACCT_METRICS = {
    "ct_state_invalid_dropped_pkts": (
        "iptables_ct_state_invalid_dropped_packets",
        "packets dropped by the iptables mode's conntrack INVALID rule",
    ),
    "localhost_nps_accepted_pkts": (
        "iptables_localhost_nodeports_accepted_packets",
        "packets accepted on localhost NodePorts",
    ),
}


class NfacctCollector:
    """Reads the nfacct counters at scrape time from whatever ``source`` gives (counter name
    -> packets, for the counters that exist)."""

    def __init__(self, source: Callable[[], Mapping[str, int]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        values = self.source()
        for key, (name, doc) in NFACCT_METRICS.items():
            m = CounterMetricFamily(f"{NS}_{name}", doc)
            if key in values:
                m.add_metric([], values[key])
            yield m


def histogram(registry: CollectorRegistry, name: str, doc: str) -> Histogram:
    """A sync-latency histogram per IP family, with upstream's buckets."""
    return Histogram(name, doc, FAM, namespace=NS, buckets=SYNC_BUCKETS, registry=registry)


def counter(
    registry: CollectorRegistry, name: str, doc: str, labels: tuple[str, ...] = FAM
) -> Counter:
    return Counter(name, doc, labels, namespace=NS, registry=registry)


def gauge(registry: CollectorRegistry, name: str, doc: str, labels: tuple[str, ...] = FAM) -> Gauge:
    return Gauge(name, doc, labels, namespace=NS, registry=registry)


class SyncDurations:
    """Upstream's full and partial sync latencies (the iptables and nftables modes only)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.full = histogram(
            registry,
            "sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency of full syncs",
        )
        self.partial = histogram(
            registry,
            "sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency of partial syncs",
        )

    def observe(self, family: str, full: bool, seconds: float) -> None:
        (self.full if full else self.partial).labels(ip_family=family).observe(seconds)


def restore_failures(registry: CollectorRegistry) -> Counter:
    """Upstream's iptables-restore failure count (the iptables and ipvs modes)."""
    return counter(
        registry,
        "sync_proxy_rules_iptables_restore_failures",
        "Cumulative iptables restore failures",
    )


class Metrics:
    """The families every mode exports. Each mode registers its own beside them (its
    backend's ``register_metrics``, as upstream's ``RegisterMetrics(mode)``)."""

    def __init__(
        self,
        mode: str,
        registry: CollectorRegistry | None = None,
        configz: Callable[[], object] | None = None,
    ) -> None:
        """``mode``: served on /proxyMode. ``configz``: the configuration served on /configz
        (upstream's, as JSON)."""
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

        r = self.registry
        self.sync_duration = histogram(
            r, "sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds"
        )
        self.last_sync = gauge(
            r, "sync_proxy_rules_last_timestamp_seconds", "The last time rules were synced"
        )
        self.last_queued = gauge(
            r, "sync_proxy_rules_last_queued_timestamp_seconds", "The last time a sync was queued"
        )
        self.network_programming = Histogram(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            FAM,
            namespace=NS,
            buckets=NPL_BUCKETS,
            registry=r,
        )
        self.endpoint_changes_pending = gauge(
            r,
            "sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            (),
        )
        self.endpoint_changes = counter(
            r, "sync_proxy_rules_endpoint_changes", "Cumulative proxy rules Endpoint changes", ()
        )
        self.service_changes_pending = gauge(
            r, "sync_proxy_rules_service_changes_pending", "Pending proxy rules Service changes", ()
        )
        self.service_changes = counter(
            r, "sync_proxy_rules_service_changes", "Cumulative proxy rules Service changes", ()
        )
        self.no_local_endpoints = gauge(
            r,
            "sync_proxy_rules_no_local_endpoints_total",
            "Services with a Local traffic policy and no local endpoints",
            ("ip_family", "traffic_policy"),
        )
        self.refused_services = gauge(
            r,
            "sync_proxy_rules_refused_services",
            "Services whose rules the kernel refused (kept at their last good rules)",
            ("ip_family", "mode"),
        )
        self.conntrack_duration = histogram(
            r,
            "conntrack_reconciler_sync_duration_seconds",
            "Time to reconcile stale conntrack entries",
        )
        self.conntrack_deleted = counter(
            r, "conntrack_reconciler_deleted_entries", "Stale conntrack entries deleted"
        )
        self.healthz = counter(
            r, "proxy_healthz", "Cumulative proxy healthz HTTP status", ("code",)
        )
        self.livez = counter(r, "proxy_livez", "Cumulative proxy livez HTTP status", ("code",))
        self.invalid_objects = counter(
            r, "invalid_objects", "Objects skipped because a field is invalid (kproxy)", ("kind",)
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
