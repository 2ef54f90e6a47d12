"""kube-proxy's own health endpoints: ``/healthz`` and ``/livez`` with upstream's semantics.

Healthy unless an update has been queued for longer than the timeout (2 x syncPeriod) without
a successful sync; ``/healthz`` additionally fails while the Node is being deleted or tainted
for removal, so load balancers drain it, and ``/livez`` does not (use it for liveness).
Served from its own thread: a long sync never delays an answer.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kproxy.http import Response, Route, Server

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


def health_routes(
    health: ProxyHealth,
    node_eligible: Callable[[], bool],
    on_answer: Callable[[str, int], None] = lambda path, code: None,
) -> dict[str, Route]:
    """/healthz and /livez with upstream's JSON."""

    def answer(path: str) -> Response:
        healthy, last, now = health.status()
        body: dict[str, Any] = {"lastUpdated": go_time(last), "currentTime": go_time(now)}
        if path == "/healthz":
            eligible = node_eligible()
            body["nodeEligible"] = eligible
            healthy = healthy and eligible
        code = 200 if healthy else 503
        on_answer(path, code)
        return code, "application/json", json.dumps(body).encode()

    return {"/healthz": lambda: answer("/healthz"), "/livez": lambda: answer("/livez")}


class HealthServer(Server):
    """kube-proxy's health server (--healthz-bind-address)."""

    def __init__(
        self,
        address: str,
        health: ProxyHealth,
        node_eligible: Callable[[], bool],
        on_answer: Callable[[str, int], None] = lambda path, code: None,
    ) -> None:
        super().__init__(address, health_routes(health, node_eligible, on_answer), name="healthz")
