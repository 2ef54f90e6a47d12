"""A small HTTP server for kproxy's read-only endpoints (health, metrics, healthCheckNodePorts).

Each route is a function returning (status, content type, body); the route "*" answers any
path. Nothing a client sends can change anything (only GET is answered).

Every server in the process is served by one event-driven thread (a selector over
non-blocking sockets), so a client costs a socket, not a thread: a request's head must arrive
whole within ``REQUEST_DEADLINE`` of the connection (a client dripping a byte at a time is cut
off when it is spent, however often it sends), at most ``MAX_CONNECTIONS`` are open per server
(past that the oldest is closed, so a flood of idle connections cannot lock newcomers out),
and closing a server returns as soon as its socket is closed. Routes run on a few worker
threads per lane, away from the sockets' thread: a slow route (a scrape during a long sync)
holds up its own lane only, and never a health check.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus

log = logging.getLogger(__name__)

Response = tuple[int, str, bytes]
Route = Callable[[], Response]

# The whole request head, from the connection's accept: a slow or idle client is cut off.
REQUEST_DEADLINE = 10.0
MAX_HEAD = 16 * 1024
MAX_CONNECTIONS = 4096
# Worker threads per lane (the routes of one kind of server share them).
LANE_WORKERS = 2


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    server: Server
    deadline: float
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytes = b""
    answering: bool = False


def _reply(code: int, ctype: str, body: bytes) -> bytes:
    try:
        reason = HTTPStatus(code).phrase
    except ValueError:
        reason = ""
    head = (
        f"HTTP/1.0 {code} {reason}\r\nContent-Type: {ctype}\r\n"
        f"X-Content-Type-Options: nosniff\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _error(code: int) -> bytes:
    phrase = HTTPStatus(code).phrase
    return _reply(code, "text/plain; charset=utf-8", f"{code} {phrase}\n".encode())


class _Reactor:
    """The one thread that accepts, reads and writes for every server."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._calls: list[Callable[[], None]] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._conns: dict[socket.socket, _Conn] = {}
        self._lanes: dict[str, ThreadPoolExecutor] = {}
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()

    # -- from other threads ------------------------------------------------------------------

    def call(self, fn: Callable[[], None], wait: bool = False) -> None:
        """Run ``fn`` on the reactor's thread (and wait for it, bounded, when asked)."""
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        with self._lock:
            self._calls.append(run)
        with contextlib.suppress(BlockingIOError):  # a wake-up is pending already
            self._wake_w.send(b"\0")
        if wait and threading.current_thread() is not self._thread:
            done.wait(5.0)

    def lane(self, name: str) -> ThreadPoolExecutor:
        with self._lock:
            pool = self._lanes.get(name)
            if pool is None:
                pool = ThreadPoolExecutor(LANE_WORKERS, thread_name_prefix=f"http-{name}")
                self._lanes[name] = pool
            return pool

    # -- on the reactor's thread -------------------------------------------------------------

    def listen(self, server: Server) -> None:
        self._sel.register(server.sock, selectors.EVENT_READ, server)

    def unlisten(self, server: Server) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(server.sock)
        server.sock.close()
        for conn in [c for c in self._conns.values() if c.server is server]:
            self._drop(conn)

    def _run(self) -> None:
        while True:
            try:
                self._turn()
            except Exception:  # the thread must outlive any one bad turn
                log.exception("http: unexpected error")
                time.sleep(0.1)

    def _turn(self) -> None:
        now = time.monotonic()
        first = next(iter(self._conns.values()), None)
        timeout = 1.0 if first is None else max(0.0, min(1.0, first.deadline - now))
        for key, events in self._sel.select(timeout):
            if key.data is None:
                self._run_calls()
            elif isinstance(key.data, Server):
                self._accept(key.data)
            elif events & selectors.EVENT_READ:
                self._read(key.data)
            else:
                self._write(key.data)
        # Connections are kept oldest first, and every one has the same allowance.
        now = time.monotonic()
        while self._conns:
            conn = next(iter(self._conns.values()))
            if conn.deadline > now:
                break
            self._drop(conn)

    def _run_calls(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            calls, self._calls = self._calls, []
        for fn in calls:
            fn()

    def _accept(self, server: Server) -> None:
        for _ in range(64):  # a burst at a time; the selector comes back for the rest
            try:
                sock, _ = server.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of descriptors, say: the next turn tries again
                log.warning("%s: accept: %s", server.name, e)
                return
            sock.setblocking(False)
            if server.open >= MAX_CONNECTIONS:
                oldest = next(c for c in self._conns.values() if c.server is server)
                self._drop(oldest)
            conn = _Conn(sock, server, time.monotonic() + REQUEST_DEADLINE)
            self._conns[sock] = conn
            server.open += 1
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        if conn.answering:
            return  # anything after the head is ignored
        conn.inbox += data
        end = conn.inbox.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.inbox) > MAX_HEAD:
                self._send(conn, _error(431))
            return
        conn.answering = True
        line = bytes(conn.inbox[: conn.inbox.find(b"\r\n")])
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self._send(conn, _error(400))
        elif parts[0] != b"GET":
            self._send(conn, _error(501))
        else:
            path = parts[1].decode("latin-1").split("?", 1)[0]
            route = conn.server.routes.get(path) or conn.server.routes.get("*")
            if route is None:
                self._send(conn, _error(404))
            else:
                future = self.lane(conn.server.lane).submit(conn.server.answer, route, path)
                future.add_done_callback(lambda f: self.call(lambda: self._send(conn, f.result())))

    def _send(self, conn: _Conn, data: bytes) -> None:
        if conn.sock not in self._conns:
            return  # closed meanwhile (its deadline, or its server)
        conn.outbox = data
        self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = len(conn.outbox)
        conn.outbox = conn.outbox[sent:]
        if not conn.outbox:
            self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        if self._conns.pop(conn.sock, None) is None:
            return
        conn.server.open -= 1
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        conn.sock.close()


class _Shared:
    lock = threading.Lock()
    reactor: _Reactor | None = None


def _the_reactor() -> _Reactor:
    """The process's reactor, started by the first server."""
    with _Shared.lock:
        if _Shared.reactor is None:
            _Shared.reactor = _Reactor()
        return _Shared.reactor


class Server:
    """One listening socket and its routes. Binding happens here (a port in use raises
    OSError at once); ``start`` begins serving, ``close`` stops at once."""

    def __init__(
        self, address: str, routes: Mapping[str, Route], *, name: str, lane: str | None = None
    ) -> None:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        self.name = name
        self.routes = routes
        self.lane = lane or name
        self.open = 0  # connections (the reactor's count)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, int(port)))
            self.sock.listen(1024)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.port: int = self.sock.getsockname()[1]
        self._started = False

    def answer(self, route: Route, path: str) -> bytes:
        """Run on a lane's worker: the route's reply, or a 500 if it fails."""
        try:
            code, ctype, body = route()
        except Exception:
            log.exception("%s: %s failed", self.name, path)
            return _error(500)
        return _reply(code, ctype, body)

    def start(self) -> None:
        self._started = True
        _the_reactor().call(lambda: _the_reactor().listen(self))

    def close(self) -> None:
        if self._started:
            self._started = False
            _the_reactor().call(lambda: _the_reactor().unlisten(self), wait=True)
        else:
            self.sock.close()
