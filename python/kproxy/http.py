"""A small HTTP server for kproxy's read-only endpoints (health, metrics, healthCheckNodePorts).

Each route is a function returning (status, content type, body); the route "*" answers any
path. Nothing a client sends can change anything (only GET is answered, and HEAD: its
headers).

Every server in the process is served by one event-driven thread (a selector over
non-blocking sockets), so a client costs a socket, not a thread:

* a request's head must arrive whole within ``REQUEST_DEADLINE`` of the connection (a client
  dripping a byte at a time is cut off when it is spent, however often it sends); its answer
  then has ``ANSWER_DEADLINE`` (a scrape may wait out a long sync);
* at most ``MAX_CONNECTIONS`` are open in all (fewer when the descriptor limit is low): past
  that, and whenever ``accept`` runs out of descriptors, the oldest unanswered connection is
  closed, so a flood of idle connections cannot lock newcomers out;
* closing a server returns as soon as its socket is closed.

Routes run on a few worker threads per lane, away from the sockets' thread: a slow route (a
scrape during a long sync) holds up its own lane only, and never a health check.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import resource
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

log = logging.getLogger(__name__)

Response = tuple[int, str, bytes]
Route = Callable[[], Response]

# The whole request head, from the connection's accept: a slow or idle client is cut off.
REQUEST_DEADLINE = 10.0
# From the head to the last byte of the answer.
ANSWER_DEADLINE = 120.0
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
    outbox: memoryview = field(default_factory=lambda: memoryview(b""))
    # In the selector (not while an answer is awaited from a client that half-closed).
    registered: bool = True
    closed: bool = False


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


class _Lane:
    """A few daemon threads running routes (daemon: a route stuck at exit delays nothing)."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        for i in range(LANE_WORKERS):
            threading.Thread(target=self._work, name=f"http-{name}-{i}", daemon=True).start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except BaseException:  # a worker must outlive any one route
                log.exception("http: a route's job failed")


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
        # Open connections, oldest first: those still sending their head, and those being
        # answered (each list has one allowance, so its first entry expires first).
        self._reading: dict[socket.socket, _Conn] = {}
        self._answering: dict[socket.socket, _Conn] = {}
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.cap = max(64, min(MAX_CONNECTIONS, soft // 4))
        self._lanes: dict[str, _Lane] = {}
        self._warned = 0.0
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

    def lane(self, name: str) -> _Lane:
        with self._lock:
            lane = self._lanes.get(name)
            if lane is None:
                lane = self._lanes[name] = _Lane(name)
            return lane

    # -- on the reactor's thread -------------------------------------------------------------

    def listen(self, server: Server) -> None:
        self._sel.register(server.sock, selectors.EVENT_READ, server)

    def unlisten(self, server: Server) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(server.sock)
        server.sock.close()
        for conns in (self._reading, self._answering):
            for conn in [c for c in conns.values() if c.server is server]:
                self._drop(conn)

    def _run(self) -> None:
        while True:
            try:
                self._turn()
            except BaseException:  # the thread must outlive any one bad turn
                log.exception("http: unexpected error")
                time.sleep(0.1)

    def _turn(self) -> None:
        now = time.monotonic()
        firsts = [next(iter(c.values())) for c in (self._reading, self._answering) if c]
        soonest = min((c.deadline for c in firsts), default=now + 1.0)
        for key, events in self._sel.select(max(0.0, min(1.0, soonest - now))):
            if key.data is None:
                self._run_calls()
            elif isinstance(key.data, Server):
                self._accept(key.data)
            elif events & selectors.EVENT_READ:
                self._read(key.data)
            else:
                self._write(key.data)
        now = time.monotonic()
        for conns in (self._reading, self._answering):
            while conns:
                conn = next(iter(conns.values()))
                if conn.deadline > now:
                    break
                self._drop(conn)

    def _run_calls(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        with self._lock:
            calls, self._calls = self._calls, []
        for fn in calls:
            try:
                fn()
            except BaseException:  # one failing call must not lose the others
                log.exception("http: a call failed")

    def _evict_oldest(self) -> bool:
        if not self._reading:
            return False
        self._drop(next(iter(self._reading.values())))
        return True

    def _accept(self, server: Server) -> None:
        for _ in range(64):  # a burst at a time; the selector comes back for the rest
            try:
                sock, _ = server.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # Out of descriptors: free one (the oldest unanswered connection), or wait.
                now = time.monotonic()
                if now - self._warned > 10:
                    self._warned = now
                    log.warning("%s: accept: %s", server.name, e)
                if not self._evict_oldest():
                    time.sleep(0.05)
                return
            sock.setblocking(False)
            if len(self._reading) + len(self._answering) >= self.cap:
                self._evict_oldest()
            conn = _Conn(sock, server, time.monotonic() + REQUEST_DEADLINE)
            self._reading[sock] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        answering = conn.sock in self._answering
        if not data:
            if answering:
                # A client that half-closed after its request still gets the answer.
                self._sel.unregister(conn.sock)
                conn.registered = False
            else:
                self._drop(conn)
            return
        if answering:
            return  # anything after the head is ignored
        conn.inbox += data
        end = conn.inbox.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.inbox) > MAX_HEAD:
                self._answer_with(conn, _error(431))
            return
        line = bytes(conn.inbox[: conn.inbox.find(b"\r\n")])
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self._answer_with(conn, _error(400))
        elif parts[0] not in (b"GET", b"HEAD"):
            self._answer_with(conn, _error(501))
        else:
            path = parts[1].decode("latin-1").split("?", 1)[0]
            route = conn.server.routes.get(path) or conn.server.routes.get("*")
            if route is None:
                self._answer_with(conn, _error(404))
                return
            self._answering_now(conn)
            server, head_only = conn.server, parts[0] == b"HEAD"

            def job() -> None:
                if conn.closed:
                    return  # cut off while it waited for a worker
                reply = server.answer(route, path)
                if head_only:  # as Go's servers answer HEAD for a GET handler (some LBs probe so)
                    reply = reply[: reply.index(b"\r\n\r\n") + 4]
                self.call(lambda: self._send(conn, reply))

            self.lane(server.lane).submit(job)

    def _answering_now(self, conn: _Conn) -> None:
        del self._reading[conn.sock]
        conn.deadline = time.monotonic() + ANSWER_DEADLINE
        self._answering[conn.sock] = conn

    def _answer_with(self, conn: _Conn, data: bytes) -> None:
        self._answering_now(conn)
        self._send(conn, data)

    def _send(self, conn: _Conn, data: bytes) -> None:
        if conn.closed:
            return  # closed meanwhile (its deadline, or its server)
        conn.outbox = memoryview(data)
        if conn.registered:
            self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        else:
            self._sel.register(conn.sock, selectors.EVENT_WRITE, conn)
            conn.registered = True
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
        if conn.closed:
            return
        conn.closed = True
        self._reading.pop(conn.sock, None)
        self._answering.pop(conn.sock, None)
        if conn.registered:
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
        """Run on a lane's worker: the route's reply, or a 500 if it fails (a panic from the
        core included)."""
        try:
            code, ctype, body = route()
        except BaseException:
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
