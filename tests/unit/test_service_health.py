"""healthCheckNodePort servers: upstream's JSON, 200 only with local endpoints, opened and
closed as Services come and go, a taken port reported without affecting the others."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

from kproxy.model import ServiceKey
from kproxy.service_health import ServiceHealthServers, Wanted


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_answers_follow_local_endpoints_and_proxy_health() -> None:
    healthy = [True]
    a, b = ServiceKey("ns", "a"), ServiceKey("ns", "b")
    pa, pb = free_port(), free_port()
    servers = ServiceHealthServers(lambda: healthy[0], address="127.0.0.1")
    try:
        servers.sync({a: Wanted(pa, 2), b: Wanted(pb, 0)})
        assert get(pa) == (
            200,
            {
                "service": {"namespace": "ns", "name": "a"},
                "localEndpoints": 2,
                "serviceProxyHealthy": True,
            },
        )
        assert get(pb)[0] == 503
        healthy[0] = False
        code, body = get(pa)
        assert code == 503 and body["serviceProxyHealthy"] is False
        healthy[0] = True
        servers.sync({b: Wanted(pb, 1)})  # a is gone; b gained a local endpoint
        assert get(pb)[0] == 200
        try:
            get(pa)
            raise AssertionError("port of a removed Service still answers")
        except urllib.error.URLError:
            pass
    finally:
        servers.close()


def test_a_taken_port_is_reported_and_others_keep_working() -> None:
    errors: list[tuple[ServiceKey, int]] = []
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    busy = int(taken.getsockname()[1])
    ok_port = free_port()
    a, b = ServiceKey("ns", "a"), ServiceKey("ns", "b")
    servers = ServiceHealthServers(
        lambda: True, address="127.0.0.1", on_bind_error=lambda k, p, e: errors.append((k, p))
    )
    try:
        servers.sync({a: Wanted(busy, 1), b: Wanted(ok_port, 1)})
        servers.sync({a: Wanted(busy, 1), b: Wanted(ok_port, 1)})
        assert errors == [(a, busy)]  # reported once, not on every sync
        assert get(ok_port)[0] == 200
        assert servers.ports == {b: ok_port}
    finally:
        servers.close()
        taken.close()
