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
