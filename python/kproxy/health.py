"""kube-proxy's own health endpoints: ``/healthz`` and ``/livez`` with upstream's semantics.

Healthy unless an update has been queued for longer than the timeout (2 x syncPeriod) without
a successful sync; ``/healthz`` additionally fails while the Node is being deleted or tainted
for removal, so load balancers drain it, and ``/livez`` does not (use it for liveness).
Served from its own thread: a long sync never delays an answer.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)


def go_time(t: float) -> str:
    """A timestamp as Go's ``time.Time.String()`` prints it (clients may parse it)."""
    dt = datetime.fromtimestamp(t, tz=UTC)
    return dt.strftime("%Y-%m-%d %H:%M:%S.") + f"{dt.microsecond:06d}000 +0000 UTC"


class ProxyHealth:
    def __init__(self, timeout: float, clock: Callable[[], float] = time.time) -> None:
        self.timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._oldest_queued: float | None = None
        self._last_updated = 0.0

    def queued(self) -> None:
        """An update is waiting for a sync (only the oldest counts)."""
        with self._lock:
            if self._oldest_queued is None:
                self._oldest_queued = self._clock()

    def updated(self) -> None:
        """A sync succeeded: nothing is waiting any more."""
        with self._lock:
            self._oldest_queued = None
            self._last_updated = self._clock()

    def status(self) -> tuple[bool, float, float]:
        """(healthy, lastUpdated, currentTime)."""
        with self._lock:
            now = self._clock()
            healthy = self._oldest_queued is None or now - self._oldest_queued < self.timeout
            # Upstream reports the current time as lastUpdated while healthy.
            last = now if healthy else self._last_updated
            return healthy, last, now


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class HealthServer:
    def __init__(
        self,
        address: str,
        health: ProxyHealth,
        node_eligible: Callable[[], bool],
    ) -> None:
        host, _, port = address.rpartition(":")
        self.health = health
        self.node_eligible = node_eligible
        self.requests: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path not in ("/healthz", "/livez"):
                    self.send_error(404)
                    return
                healthy, last, now = server.health.status()
                body: dict[str, Any] = {"lastUpdated": go_time(last), "currentTime": go_time(now)}
                if path == "/healthz":
                    eligible = server.node_eligible()
                    body["nodeEligible"] = eligible
                    healthy = healthy and eligible
                code = 200 if healthy else 503
                server.requests[f"{path} {code}"] = server.requests.get(f"{path} {code}", 0) + 1
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("health: " + format, *args)

        host = host.strip("[]")
        cls = _Server6 if ":" in host else ThreadingHTTPServer
        self._httpd = cls((host, int(port)), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="healthz", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
