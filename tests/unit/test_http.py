"""The event-driven HTTP server behind every read-only endpoint: what it answers, the request
deadline, the connection cap, a failing or slow route, and closing."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from kproxy import http
from kproxy.http import Response, Server


def get(port: int, raw: bytes = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout: float = 5) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    return reply


def serving(routes: dict[str, http.Route], lane: str | None = None) -> Server:
    server = Server("127.0.0.1:0", routes, name="test", lane=lane)
    server.start()
    return server


def test_answers_get_and_refuses_the_rest() -> None:
    server = serving({"/ok": lambda: (200, "text/plain", b"fine")})
    try:
        reply = get(server.port, b"GET /ok?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 OK") and body == b"fine"
        assert b"Content-Length: 4" in head and b"X-Content-Type-Options: nosniff" in head
        assert get(server.port, b"GET /nothing HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 404")
        assert get(server.port, b"POST /ok HTTP/1.1\r\n\r\n{}").startswith(b"HTTP/1.0 501")
        # HEAD: GET's status and headers, no body (Go's servers answer it so; LBs may probe so).
        head_only = get(server.port, b"HEAD /ok HTTP/1.1\r\n\r\n")
        assert head_only.startswith(b"HTTP/1.0 200") and head_only.endswith(b"\r\n\r\n")
        assert b"Content-Length: 4" in head_only
        assert get(server.port, b"\x00\xff garbage\r\n\r\n").startswith(b"HTTP/1.0 400")
        assert get(server.port, b"GET /" + b"a" * 20000).startswith(b"HTTP/1.0 431")
    finally:
        server.close()


def test_a_dripping_client_is_cut_at_the_request_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "REQUEST_DEADLINE", 1.0)
    server = serving({"/": lambda: (200, "text/plain", b"")})
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\n")
            t, closed = time.monotonic(), False
            while time.monotonic() - t < 5:  # a byte every 0.2 s: never idle, never done
                try:
                    s.sendall(b"X")
                except OSError:
                    closed = True
                    break
                s.settimeout(0.2)
                try:
                    if s.recv(1) == b"":
                        closed = True
                        break
                except TimeoutError:
                    pass
            assert closed and 0.9 < time.monotonic() - t < 2.5
    finally:
        server.close()


def test_past_the_cap_the_oldest_connection_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    server = serving({"/": lambda: (200, "text/plain", b"ok")})
    monkeypatch.setattr(http._the_reactor(), "cap", 20)
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]
    try:
        assert get(server.port).endswith(b"ok")  # a newcomer always gets in
        idle[0].settimeout(2)
        assert idle[0].recv(1) == b""  # the oldest were closed to make room
    finally:
        for s in idle:
            s.close()
        server.close()


class Panic(BaseException):
    """As pyo3's PanicException: a BaseException, not an Exception."""


def test_a_failing_route_is_a_500_and_a_slow_lane_holds_up_no_other() -> None:
    release = threading.Event()

    def slow() -> Response:
        release.wait(10)
        return 200, "text/plain", b"late"

    def broken() -> Response:
        raise RuntimeError("boom")

    def panics() -> Response:
        raise Panic("the core panicked")

    slow_server = serving({"/": slow}, lane="slow")
    fast = serving({"/": lambda: (200, "text/plain", b"now"), "/broken": broken, "/panics": panics})
    try:
        waiting = [threading.Thread(target=get, args=(slow_server.port,)) for _ in range(3)]
        for w in waiting:
            w.start()
        t = time.monotonic()
        assert get(fast.port).endswith(b"now") and time.monotonic() - t < 1
        assert get(fast.port, b"GET /broken HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 500")
        assert get(fast.port, b"GET /panics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 500")
        assert get(fast.port).endswith(b"now")  # and every server still answers
    finally:
        release.set()
        for w in waiting:
            w.join(10)
        slow_server.close()
        fast.close()


def test_close_frees_the_port_at_once_and_drops_its_connections() -> None:
    server = serving({"/": lambda: (200, "text/plain", b"")})
    port = server.port
    idle = socket.create_connection(("127.0.0.1", port))
    t = time.monotonic()
    server.close()
    assert time.monotonic() - t < 0.5
    idle.settimeout(2)
    # Closed: a FIN, or a reset when it was still waiting to be accepted.
    with contextlib.suppress(ConnectionResetError):
        assert idle.recv(1) == b""
    again = Server(f"127.0.0.1:{port}", {}, name="again")  # the port is free for the next
    again.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)


def test_a_slow_answer_outlives_the_request_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The head's deadline is for the client; a route that waits (a scrape during a long
    sync) is answered."""
    monkeypatch.setattr(http, "REQUEST_DEADLINE", 0.3)

    def slow() -> Response:
        time.sleep(1.0)
        return 200, "text/plain", b"late"

    server = serving({"/": slow}, lane="slower")
    try:
        assert get(server.port).endswith(b"late")
    finally:
        server.close()


def test_a_client_that_half_closes_after_its_request_gets_the_answer() -> None:
    def slowish() -> Response:
        time.sleep(0.2)
        return 200, "text/plain", b"here"

    server = serving({"/": slowish}, lane="half")
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(b"here")
    finally:
        server.close()
