"""/healthz and /livez: upstream's JSON and semantics."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from kproxy.health import HealthServer, ProxyHealth, go_time


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_healthy_while_starting_and_when_synced() -> None:
    clock = Clock()
    h = ProxyHealth(60.0, clock)
    assert h.status()[0]
    h.queued()
    clock.t += 59
    assert h.status()[0]  # queued, but not late yet
    clock.t += 1
    healthy, last, now = h.status()
    assert not healthy and last == 0.0 and now == clock.t
    h.updated()
    assert h.status()[0]


def test_only_the_oldest_queued_update_counts() -> None:
    clock = Clock()
    h = ProxyHealth(10.0, clock)
    h.queued()
    clock.t += 8
    h.queued()  # a newer update does not reset the clock
    clock.t += 3
    assert not h.status()[0]


def test_go_time_format() -> None:
    assert go_time(0.5) == "1970-01-01 00:00:00.500000000 +0000 UTC"


@pytest.fixture
def server() -> Iterator[tuple[HealthServer, ProxyHealth, list[bool], Clock]]:
    clock = Clock()
    health = ProxyHealth(60.0, clock)
    eligible = [True]
    srv = HealthServer("127.0.0.1:0", health, lambda: eligible[0])
    srv.start()
    yield srv, health, eligible, clock
    srv.close()


def get(port: int, path: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def test_endpoints_report_health_and_node_eligibility(
    server: tuple[HealthServer, ProxyHealth, list[bool], Clock],
) -> None:
    srv, health, eligible, clock = server
    code, body, headers = get(srv.port, "/healthz")
    assert code == 200 and body["nodeEligible"] is True
    assert set(body) == {"lastUpdated", "currentTime", "nodeEligible"}
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Content-Type-Options"] == "nosniff"
    # A node being deleted fails /healthz (so load balancers drain it) but not /livez.
    eligible[0] = False
    assert get(srv.port, "/healthz")[0] == 503
    code, body, _ = get(srv.port, "/livez")
    assert code == 200 and set(body) == {"lastUpdated", "currentTime"}
    eligible[0] = True
    health.queued()
    clock.t += 120
    assert get(srv.port, "/healthz")[0] == 503
    assert get(srv.port, "/livez")[0] == 503
    health.updated()
    assert get(srv.port, "/livez")[0] == 200


def test_unknown_paths_are_not_found(
    server: tuple[HealthServer, ProxyHealth, list[bool], Clock],
) -> None:
    srv = server[0]
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/metrics", timeout=5)
    assert info.value.code == 404
