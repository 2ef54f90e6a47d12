"""/healthz keeps answering while a long sync runs: the core releases the interpreter."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

from benches.iptables_sync import cluster
from kproxy import _core
from kproxy.health import HealthServer, ProxyHealth


def test_health_answers_during_a_long_sync() -> None:
    engine = _core.Engine(json.dumps({"family": "IPv4", "node_name": "n", "backend": "fake"}))
    data = cluster(6000, 8).to_json()
    server = HealthServer("127.0.0.1:0", ProxyHealth(60.0), lambda: True)
    server.start()
    done = threading.Event()

    def sync() -> None:
        engine.sync(data, full=True)
        done.set()

    worker = threading.Thread(target=sync)
    try:
        worker.start()
        latencies: list[float] = []
        while not done.is_set() and len(latencies) < 200:
            t = time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as r:
                assert r.status == 200
            latencies.append(time.perf_counter() - t)
        worker.join(60)
        assert done.is_set()
        assert len(latencies) >= 3, "the sync was too short to overlap with requests"
        assert max(latencies) < 0.5, latencies
    finally:
        server.close()


def test_reading_the_engine_during_a_long_sync_stops_no_other_thread() -> None:
    """A scrape reads the engine (its counters, whether a full sync is owed) while a sync holds
    it: the reader waits, but without the interpreter, so the other threads run on."""
    engine = _core.Engine(json.dumps({"family": "IPv4", "node_name": "n", "backend": "fake"}))
    data = cluster(6000, 8).to_json()
    syncing, done = threading.Event(), threading.Event()
    took: list[float] = []

    def sync() -> None:
        syncing.set()
        t = time.perf_counter()
        engine.sync(data, full=True)
        took.append(time.perf_counter() - t)
        done.set()

    def read() -> None:
        while not done.is_set():
            _ = engine.needs_full_sync, engine.forward_stats(), engine.ipvs_addresses()

    workers = [threading.Thread(target=sync), threading.Thread(target=read)]
    for w in workers:
        w.start()
    syncing.wait(5)
    gaps: list[float] = []
    last = time.perf_counter()
    while not done.is_set() and len(gaps) < 100_000:
        time.sleep(0.005)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    for w in workers:
        w.join(60)
    assert done.is_set() and took[0] > 0.3, "the sync was too short to overlap with reads"
    # This thread slept 5 ms at a time all through the sync, and was never held up long.
    assert max(gaps) < 0.25, (max(gaps), took)
