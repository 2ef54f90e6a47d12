"""A small, thread-safe fake of the Kubernetes API server for kproxy's tests.

It serves the part of the API that a kube-proxy consumes (Services, EndpointSlices,
Nodes, Events) with the semantics that matter for a list/watch client: one global
resourceVersion counter shared by every resource (as etcd has), consistent paginated
lists, watch replay from a resourceVersion, label/field selector transitions, bookmarks,
compaction (410 Expired) and abrupt connection loss. A second "admin" port controls it
so that tests can break the API port and still steer the fake.
"""

from __future__ import annotations

import base64
import collections
import json
import logging
import math
import random
import re
import select
import socket
import string
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("tests.fakeapi")

Obj = dict[str, Any]
Matcher = Callable[[Obj], bool]
Key = tuple[str, str]  # (namespace, name); namespace is "" for cluster-scoped objects

# Upper bound for any single blocking wait, so that stop/close are noticed promptly
# even by a thread that missed a notification.
_POLL = 0.25
# How long stop/close wait for handler threads to notice their socket was cut.
_DRAIN_TIMEOUT = 5.0


@dataclass(frozen=True)
class ResourceType:
    kind: str
    group: str  # "" for the core ("legacy") group served under /api
    version: str
    plural: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"


# Core Events and events.k8s.io Events are stored separately (the real server shares
# one storage and converts); tests look at whichever API the proxy writes to.
RESOURCE_TYPES: tuple[ResourceType, ...] = (
    ResourceType("Service", "", "v1", "services", True),
    ResourceType("Node", "", "v1", "nodes", False),
    ResourceType("Event", "", "v1", "events", True),
    ResourceType("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices", True),
    ResourceType("ServiceCIDR", "networking.k8s.io", "v1", "servicecidrs", False),
    ResourceType("Event", "events.k8s.io", "v1", "events", True),
)


def resolve_kind(name: str) -> ResourceType:
    """Find a type by Kind, plural, or either suffixed with ".group" (core types first)."""
    for rt in RESOURCE_TYPES:
        names = {rt.kind, rt.plural}
        if name in names or (rt.group and name in {f"{n}.{rt.group}" for n in names}):
            return rt
    raise ApiError(400, "BadRequest", f"unknown kind {name!r}")


def _resolve_api_version(api_version: str, kind: str) -> ResourceType:
    for rt in RESOURCE_TYPES:
        if rt.api_version == api_version and rt.kind == kind:
            return rt
    raise ApiError(400, "BadRequest", f"unsupported apiVersion/kind {api_version}/{kind}")


class ApiError(Exception):
    """An error rendered as a Kubernetes Status (API port) or {"error": ...} (admin port)."""

    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> Obj:
        return _status(self.code, self.reason, self.message, self.details)


_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def _status(code: int, reason: str, message: str, details: Obj | None = None) -> Obj:
    status: Obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        status["details"] = details
    return status


def _with_rv(obj: Obj, rv: int) -> Obj:
    # Stored objects are never mutated, so sharing everything but metadata is safe.
    return {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(rv)}}


def _key_of(obj: Obj) -> Key:
    meta = obj["metadata"]
    return (meta.get("namespace", ""), meta["name"])


def _parse_bool(value: str | None) -> bool:
    # Same spellings as Go's strconv.ParseBool, which the real server uses.
    return value is not None and value in {"1", "t", "T", "true", "TRUE", "True"}


# --------------------------------------------------------------------------- selectors

_LABEL_KEY = re.compile(r"^([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_SET_TERM = re.compile(r"^(\S+)\s+(in|notin)\s+\(([^()]*)\)$")


def _split_terms(selector: str) -> list[str]:
    """Split on commas, except those inside an `in (a,b)` value list."""
    terms, depth, current = [], 0, ""
    for ch in selector:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += ch
    terms.append(current)
    return [t.strip() for t in terms if t.strip()]


def _label_key(key: str) -> str:
    key = key.strip()
    if not _LABEL_KEY.match(key):
        raise ApiError(400, "BadRequest", f"invalid label key {key!r}")
    return key


def _label_requirement(term: str) -> Callable[[Mapping[str, str]], bool]:
    if m := _SET_TERM.match(term):
        key, op, raw = _label_key(m[1]), m[2], m[3]
        values = frozenset(v.strip() for v in raw.split(",") if v.strip())
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if term.startswith("!"):
        key = _label_key(term[1:])
        return lambda labels: key not in labels
    for op in ("!=", "==", "="):
        if op in term:
            raw_key, _, raw_value = term.partition(op)
            key, value = _label_key(raw_key), raw_value.strip()
            if op == "!=":  # like the real server: also matches when the key is absent
                return lambda labels: labels.get(key) != value
            return lambda labels: labels.get(key) == value
    key = _label_key(term)
    return lambda labels: key in labels


def parse_label_selector(selector: str) -> Callable[[Mapping[str, str]], bool]:
    """Compile a label selector (`k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (..)`, `k notin (..)`,
    comma-separated = AND) into a predicate over a labels mapping."""
    reqs = [_label_requirement(t) for t in _split_terms(selector)]
    return lambda labels: all(r(labels) for r in reqs)


def _field_value(obj: Obj, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def parse_field_selector(selector: str) -> Matcher:
    """Compile a field selector (`path=v`, `path==v`, `path!=v`, comma-separated = AND).

    Any dotted path into the object is accepted (the real server allows only a few
    per resource, always including metadata.name and metadata.namespace)."""
    reqs: list[tuple[str, bool, str]] = []
    for term in _split_terms(selector):
        for op in ("!=", "==", "="):
            if op in term:
                path, _, value = term.partition(op)
                reqs.append((path.strip(), op == "!=", value.strip()))
                break
        else:
            raise ApiError(400, "BadRequest", f"invalid field selector term {term!r}")
    return lambda obj: all((_field_value(obj, p) == v) != neg for p, neg, v in reqs)


def _matcher(query: Mapping[str, str], namespace: str | None) -> Matcher:
    labels = parse_label_selector(query.get("labelSelector", ""))
    fields = parse_field_selector(query.get("fieldSelector", ""))

    def match(obj: Obj) -> bool:
        meta = obj["metadata"]
        return (
            (namespace is None or meta.get("namespace") == namespace)
            and labels(meta.get("labels") or {})
            and fields(obj)
        )

    return match


# ----------------------------------------------------------------------- store records


@dataclass(frozen=True)
class _Change:
    """One write, as kept in history and queued for watchers."""

    rv: int
    rtype: ResourceType
    type: str  # ADDED, MODIFIED or DELETED
    obj: Obj  # state after the write; for DELETED the last state stamped with the delete RV
    prev: Obj | None  # state before the write (None on creation)


def _to_event(change: _Change, match: Matcher) -> tuple[str, Obj] | None:
    """What a watcher with filter `match` sees for `change`.

    Mirrors the real watch cache: an object entering the filter is ADDED, one leaving it is
    DELETED (carrying its previous content, stamped with the new resourceVersion)."""
    cur = change.type != "DELETED" and match(change.obj)
    old = change.prev is not None and match(change.prev)
    if cur:
        return ("MODIFIED" if old else "ADDED", change.obj)
    if old and change.prev is not None:
        return ("DELETED", _with_rv(change.prev, change.rv))
    return None


@dataclass(eq=False)
class _Watch:
    rtype: ResourceType
    match: Matcher
    since: int  # only changes newer than this are delivered
    conn: socket.socket
    queue: collections.deque[_Change] = field(default_factory=collections.deque)
    killed: bool = False


@dataclass
class _Fault:
    prefix: str
    status: int
    remaining: int
    body: Obj | None = None  # sent instead of a Status (a 200 that is not a list, say)
    retry_after: str | None = None
    watch: bool | None = None  # only watches (True), only other requests (False), or any


def _abort(sock: socket.socket) -> None:
    """Cut a connection as a crashing server would: no more bytes, then a reset."""
    try:
        # Zero linger makes the final close() send RST instead of lingering in FIN_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # shutdown() (unlike close()) wakes the owning thread out of a blocked read/write.
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _peer_closed(sock: socket.socket) -> bool:
    """True if the client hung up; lets idle watches notice it without writing."""
    try:
        poller = select.poll()  # unlike select(), poll() copes with any fd number
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0)) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class _HTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that knows its open connections, so they can be cut."""

    daemon_threads = True

    def __init__(
        self, addr: tuple[str, int], handler: type[_BaseHandler], owner: FakeApiServer
    ) -> None:
        self.owner = owner
        self.conns: set[socket.socket] = set()  # guarded by owner's lock
        self.stopping = False  # guarded by owner's lock
        super().__init__(addr, handler)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.owner._track_conn(self, request):
            super().process_request_thread(request, client_address)
        else:  # accepted just before stop(): drop it like the rest
            _abort(request)
            self.shutdown_request(request)

    def shutdown_request(self, request: Any) -> None:
        # Untrack before the socket is closed so that _abort() never touches a recycled fd.
        self.owner._untrack_conn(self, request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Peers vanishing and our own deliberate aborts are expected, not bugs.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


# ------------------------------------------------------------------------------ server


class FakeApiServer:
    """The fake API server (API port) plus its control plane (admin port).

    All state is guarded by one lock; watch handlers wait on a Condition over it and
    write to their sockets only while not holding it.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        api_port: int = 0,
        admin_port: int = 0,
        bookmark_interval: float = 1.0,
        history_limit: int = 10_000,
    ) -> None:
        if bookmark_interval <= 0:
            raise ValueError("bookmark_interval must be positive")
        self.host = host
        self.bookmark_interval = bookmark_interval
        self._api_port = api_port
        self._admin_port = admin_port
        self._history_limit = history_limit
        self._cond = threading.Condition(threading.Lock())
        self._objects: dict[ResourceType, dict[Key, Obj]] = {rt: {} for rt in RESOURCE_TYPES}
        self._rv = 1
        self._compacted_rv = 1  # history holds every change with rv > this
        self._history: collections.deque[_Change] = collections.deque()
        self._watches: set[_Watch] = set()
        self._faults: list[_Fault] = []
        self._counts: dict[str, collections.Counter[str]] = {
            k: collections.Counter() for k in ("list", "watch", "other")
        }
        # Start/stop/close block on socket teardown, which must not happen under the
        # state lock (handlers need it to finish); this serializes them instead.
        self._lifecycle = threading.RLock()
        self._api: tuple[_HTTPServer, threading.Thread] | None = None
        self._admin: tuple[_HTTPServer, threading.Thread] | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> FakeApiServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Listen on both ports (idempotent)."""
        with self._lifecycle:
            if self._closed:
                raise RuntimeError("FakeApiServer is closed")
            if self._admin is None:
                self._admin = self._serve(self._admin_port, _AdminHandler)
                self._admin_port = self._admin[0].server_address[1]
            self.start_api()

    def start_api(self) -> None:
        """(Re)open the API port, on the same port number as before."""
        with self._lifecycle:
            if self._closed:
                raise RuntimeError("FakeApiServer is closed")
            if self._api is None:
                self._api = self._serve(self._api_port, _ApiHandler)
                self._api_port = self._api[0].server_address[1]

    def stop_api(self) -> None:
        """Close the API port and cut every API connection; state is kept."""
        with self._lifecycle:
            if self._api is not None:
                self._teardown(*self._api)
                self._api = None

    def close(self) -> None:
        """Stop everything (idempotent); returns within a bounded time."""
        with self._lifecycle:
            if self._closed:
                return
            self.stop_api()
            self._closed = True
            if self._admin is not None:
                self._teardown(*self._admin)
                self._admin = None

    def _serve(
        self, port: int, handler: type[_BaseHandler]
    ) -> tuple[_HTTPServer, threading.Thread]:
        httpd = _HTTPServer((self.host, port), handler, self)
        name = f"fakeapi-{handler.__name__.strip('_').lower()}-{httpd.server_address[1]}"
        thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True
        )
        thread.start()
        return httpd, thread

    def _teardown(self, httpd: _HTTPServer, thread: threading.Thread) -> None:
        httpd.shutdown()  # stop accepting; returns once serve_forever has exited
        httpd.server_close()  # close the listening socket: new connects are refused
        with self._cond:
            httpd.stopping = True
            for watch in self._watches:
                if watch.conn in httpd.conns:
                    watch.killed = True
            for sock in httpd.conns:
                _abort(sock)
            self._cond.notify_all()
            self._cond.wait_for(lambda: not httpd.conns, timeout=_DRAIN_TIMEOUT)
        thread.join(timeout=_DRAIN_TIMEOUT)

    def _track_conn(self, httpd: _HTTPServer, sock: socket.socket) -> bool:
        with self._cond:
            if httpd.stopping:
                return False
            httpd.conns.add(sock)
            return True

    def _untrack_conn(self, httpd: _HTTPServer, sock: socket.socket) -> None:
        with self._cond:
            httpd.conns.discard(sock)
            self._cond.notify_all()  # _teardown may be waiting for the set to drain

    @property
    def api_port(self) -> int:
        return self._api_port

    @property
    def admin_port(self) -> int:
        return self._admin_port

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self._api_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.host}:{self._admin_port}"

    @property
    def api_running(self) -> bool:
        return self._api is not None

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    # -- object store --------------------------------------------------------------------

    def put(self, obj: Mapping[str, Any]) -> Obj:
        """Create or replace an object (ADDED or MODIFIED); returns the stored copy."""
        return self._put(obj)[1]

    def _put(self, obj: Mapping[str, Any]) -> tuple[bool, Obj]:
        """put(), also telling whether the object was created."""
        rtype, norm = self._normalize(obj)
        with self._cond:
            created = _key_of(norm) not in self._objects[rtype]
            return created, self._store(rtype, norm)

    def delete(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        """Delete an object; returns its last state, or None if it did not exist."""
        rtype = resolve_kind(kind)
        with self._cond:
            return self._remove(rtype, self._key(rtype, namespace, name))

    def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        rtype = resolve_kind(kind)
        with self._cond:
            obj = self._objects[rtype].get(self._key(rtype, namespace, name))
        return None if obj is None else _copy(obj)

    def list_objects(self, kind: str) -> list[Obj]:
        rtype = resolve_kind(kind)
        with self._cond:
            return [_copy(self._objects[rtype][k]) for k in sorted(self._objects[rtype])]

    def apply(
        self, put: Iterable[Mapping[str, Any]] = (), delete: Iterable[Mapping[str, Any]] = ()
    ) -> int:
        """Apply puts then deletes ({"kind","namespace","name"}; missing ones are ignored)
        in one critical section, so watchers see them back to back. Returns the new RV."""
        puts = [self._normalize(o) for o in put]
        dels = []
        for d in delete:
            rtype = resolve_kind(str(d["kind"]))
            dels.append((rtype, self._key(rtype, d.get("namespace"), str(d["name"]))))
        with self._cond:
            for rtype, norm in puts:
                self._store(rtype, norm)
            for rtype, key in dels:
                self._remove(rtype, key)
            return self._rv

    def compact(self) -> int:
        """Forget all history; returns the new compaction point (= current RV).

        The RV is bumped first so that every RV handed out so far (list results, continue
        tokens) is strictly older than the compaction point and therefore expired."""
        with self._cond:
            self._rv += 1
            self._compacted_rv = self._rv
            self._history.clear()
            return self._rv

    def drop_watches(self) -> int:
        """Abruptly cut every open watch connection; returns how many were cut."""
        with self._cond:
            for watch in self._watches:
                watch.killed = True
                _abort(watch.conn)
            self._cond.notify_all()
            return len(self._watches)

    def fail_next(
        self,
        path_prefix: str,
        status: int = 500,
        count: int = 1,
        *,
        body: Obj | None = None,
        retry_after: str | None = None,
        watch: bool | None = None,
    ) -> None:
        """Make the next `count` API requests whose path starts with `path_prefix` fail: with
        `status` and a Status body, or with `body` as it is (a malformed reply, as a broken
        proxy sends); `watch` limits it to watch requests (True) or to the others (False)."""
        with self._cond:
            self._faults.append(_Fault(path_prefix, status, count, body, retry_after, watch))

    def stats(self) -> Obj:
        with self._cond:
            return {
                "list_requests": sum(self._counts["list"].values()),
                "watch_requests": sum(self._counts["watch"].values()),
                "open_watches": len(self._watches),
                "lists_by_path": dict(self._counts["list"]),
                "watches_by_path": dict(self._counts["watch"]),
                "requests_by_path": dict(sum(self._counts.values(), collections.Counter[str]())),
                "resource_version": self._rv,
                "compacted_resource_version": self._compacted_rv,
            }

    # -- internals (callers of _store/_remove/_record hold the lock) ----------------------

    @staticmethod
    def _key(rtype: ResourceType, namespace: str | None, name: str) -> Key:
        if not rtype.namespaced:
            return ("", name)
        if namespace == "_":
            raise ApiError(400, "BadRequest", f"{rtype.kind} is namespaced")
        return (namespace or "default", name)

    @staticmethod
    def _normalize(
        obj: Mapping[str, Any], namespace: str | None = None
    ) -> tuple[ResourceType, Obj]:
        """Validate and deep-copy an incoming object; fills kind-derived defaults."""
        if not isinstance(obj, Mapping) or not isinstance(obj.get("metadata"), Mapping):
            raise ApiError(400, "BadRequest", "object must be a JSON object with metadata")
        norm = _copy(obj)
        rtype = _resolve_api_version(str(norm.get("apiVersion")), str(norm.get("kind")))
        meta = norm["metadata"]
        if not rtype.namespaced:
            meta.pop("namespace", None)
        elif namespace is not None and meta.setdefault("namespace", namespace) != namespace:
            raise ApiError(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on "
                "the request",
            )
        else:
            meta["namespace"] = meta.get("namespace") or "default"
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(422, "Invalid", "metadata.name or metadata.generateName is required")
            suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
            meta["name"] = meta["generateName"] + suffix
        return rtype, norm

    def _store(self, rtype: ResourceType, obj: Obj, *, create_only: bool = False) -> Obj:
        key = _key_of(obj)
        prev = self._objects[rtype].get(key)
        if prev is not None and create_only:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{rtype.plural} "{key[1]}" already exists',
                {"name": key[1], "group": rtype.group, "kind": rtype.plural},
            )
        self._rv += 1
        meta = obj["metadata"]
        meta["resourceVersion"] = str(self._rv)
        if prev is None:
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        else:  # identity survives replacement, as on a real update
            for field_name in ("uid", "creationTimestamp"):
                meta[field_name] = prev["metadata"].get(field_name)
        self._objects[rtype][key] = obj
        self._record(_Change(self._rv, rtype, "ADDED" if prev is None else "MODIFIED", obj, prev))
        return _copy(obj)

    def _remove(self, rtype: ResourceType, key: Key) -> Obj | None:
        prev = self._objects[rtype].pop(key, None)
        if prev is None:
            return None
        self._rv += 1
        gone = _with_rv(prev, self._rv)
        self._record(_Change(self._rv, rtype, "DELETED", gone, prev))
        return _copy(gone)

    def _record(self, change: _Change) -> None:
        self._history.append(change)
        while len(self._history) > self._history_limit:
            self._compacted_rv = self._history.popleft().rv
        for watch in self._watches:
            if watch.rtype is change.rtype:
                watch.queue.append(change)
        self._cond.notify_all()

    def _objects_at(self, rtype: ResourceType, rv: int) -> dict[Key, Obj]:
        """The objects of one type as of `rv`, rebuilt by undoing newer history."""
        objs = dict(self._objects[rtype])
        for change in reversed(self._history):
            if change.rv <= rv:
                break
            if change.rtype is rtype:
                if change.prev is None:
                    objs.pop(_key_of(change.obj), None)
                else:
                    objs[_key_of(change.prev)] = change.prev
        return objs

    def _take_fault(self, path: str, watching: bool) -> _Fault | None:
        with self._cond:
            for fault in self._faults:
                if path.startswith(fault.prefix) and fault.watch in (None, watching):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _count(self, kind: str, path: str) -> None:
        with self._cond:
            self._counts[kind][path] += 1

    # -- API operations used by the handler ----------------------------------------------

    def _api_list(
        self, rtype: ResourceType, namespace: str | None, query: Mapping[str, str]
    ) -> Obj:
        match = _matcher(query, namespace)
        try:
            limit = int(query.get("limit") or 0)
        except ValueError:
            raise ApiError(400, "BadRequest", "limit must be an integer") from None
        token = query.get("continue")
        with self._cond:
            if token:
                snap_rv, start = _decode_continue(token)
                if snap_rv < self._compacted_rv:
                    raise ApiError(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent "
                        "list result. You can start a new list without the continue parameter.",
                    )
                objs = self._objects_at(rtype, snap_rv)
            else:
                snap_rv, start, objs = self._rv, None, self._objects[rtype]
            keys = [k for k in sorted(objs) if (start is None or k > start) and match(objs[k])]
            page = keys[:limit] if limit > 0 else keys
            items = [objs[k] for k in page]
        meta: Obj = {"resourceVersion": str(snap_rv)}
        if len(page) < len(keys):
            meta["continue"] = _encode_continue(snap_rv, page[-1])
            # The real server can only count remaining items when nothing is filtered.
            if not query.get("labelSelector") and not query.get("fieldSelector"):
                meta["remainingItemCount"] = len(keys) - len(page)
        return {
            "kind": f"{rtype.kind}List",
            "apiVersion": rtype.api_version,
            "metadata": meta,
            "items": items,
        }

    def _api_get(self, rtype: ResourceType, namespace: str | None, name: str) -> Obj:
        with self._cond:
            obj = self._objects[rtype].get(self._key(rtype, namespace, name))
        if obj is None:
            raise _not_found(rtype, name)
        return obj

    def _api_write(
        self, method: str, rtype: ResourceType, namespace: str | None, name: str | None, body: Any
    ) -> tuple[int, Obj]:
        if method == "DELETE" and name is not None:
            with self._cond:
                gone = self._remove(rtype, self._key(rtype, namespace, name))
            if gone is None:
                raise _not_found(rtype, name)
            return 200, gone
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "request body must be a JSON object")
        if method == "PATCH" and name is not None:
            with self._cond:  # read-modify-write must be atomic
                cur = self._objects[rtype].get(self._key(rtype, namespace, name))
                if cur is None:
                    raise _not_found(rtype, name)
                _, norm = self._normalize(_merge_patch(cur, body), namespace)
                if _key_of(norm) != _key_of(cur):
                    raise ApiError(400, "BadRequest", "a patch cannot change the name")
                return 200, self._store(rtype, norm)
        body.setdefault("apiVersion", rtype.api_version)
        body.setdefault("kind", rtype.kind)
        body.setdefault("metadata", {})
        btype, norm = self._normalize(body, namespace)
        if btype is not rtype or (name is not None and norm["metadata"]["name"] != name):
            raise ApiError(400, "BadRequest", "object does not match the request path")
        if method == "POST" and name is None:
            with self._cond:
                return 201, self._store(rtype, norm, create_only=True)
        if method == "PUT" and name is not None:
            with self._cond:
                return 200, self._store(rtype, norm)
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")

    def _open_watch(
        self, rtype: ResourceType, match: Matcher, since: int | None, conn: socket.socket
    ) -> tuple[list[tuple[str, Obj]], _Watch | None]:
        """Initial events for a new watch and its registration (None if the RV expired)."""
        with self._cond:
            if since is None:  # "0"/absent: synthesize the current state
                objs = self._objects[rtype]
                events = [("ADDED", objs[k]) for k in sorted(objs) if match(objs[k])]
                since = self._rv
            elif since < self._compacted_rv:
                msg = f"too old resource version: {since} ({self._compacted_rv})"
                return [("ERROR", _status(410, "Expired", msg))], None
            else:
                events = [
                    ev
                    for change in self._history
                    if change.rv > since and change.rtype is rtype
                    if (ev := _to_event(change, match)) is not None
                ]
            watch = _Watch(rtype, match, max(since, self._rv), conn)
            self._watches.add(watch)
            return events, watch

    def _next_changes(self, watch: _Watch, until: float) -> tuple[list[_Change], int] | None:
        """Wait until `watch` has changes or `until`; returns them with the current RV,
        or None once the watch has been killed."""
        with self._cond:
            while not watch.queue and not watch.killed:
                remaining = until - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, _POLL))
            if watch.killed:
                return None
            changes = [c for c in watch.queue if c.rv > watch.since]
            watch.queue.clear()
            # With the queue drained, this watcher has seen everything up to the current
            # RV, which makes it a valid bookmark. A watch from a future RV waits for it.
            return changes, max(self._rv, watch.since)

    def _close_watch(self, watch: _Watch) -> None:
        with self._cond:
            self._watches.discard(watch)


def _not_found(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{rtype.plural} "{name}" not found',
        {"name": name, "group": rtype.group, "kind": rtype.plural},
    )


def _copy(obj: Mapping[str, Any]) -> Obj:
    # A JSON round trip both deep-copies and rejects values the API could not carry.
    copied: Obj = json.loads(json.dumps(obj))
    return copied


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also used, approximately, for strategic merge patches)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = _merge_patch(result.get(k), v)
    return result


def _encode_continue(rv: int, key: Key) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": list(key)})
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_continue(token: str) -> tuple[int, Key]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        rv, (ns, name) = data["rv"], data["start"]
        if isinstance(rv, int) and isinstance(ns, str) and isinstance(name, str):
            return rv, (ns, name)
    except (ValueError, KeyError, TypeError):
        pass
    raise ApiError(400, "BadRequest", "continue key is not valid")


def _parse_resource_path(path: str) -> tuple[ResourceType, str | None, str | None] | None:
    """Map /api/v1[/namespaces/NS]/PLURAL[/NAME] (or /apis/G/V/...) to (type, ns, name)."""
    parts = path.strip("/").split("/")
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif parts[0] == "apis" and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if len(rest) not in (1, 2):
        return None
    for rt in RESOURCE_TYPES:
        if (rt.group, rt.version, rt.plural) == (group, version, rest[0]):
            if namespace is not None and not rt.namespaced:
                return None
            return rt, namespace, rest[1] if len(rest) == 2 else None
    return None


# ---------------------------------------------------------------------------- handlers


class _BaseHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked watch streams, like the real API
    timeout = 120  # socket timeout: bounds reads from idle clients and writes to stuck ones
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.server.server_address[1], format % args)

    def _send_json(self, code: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _read_json(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length > 0 else b""
            return json.loads(raw) if raw else None
        except ValueError:  # also covers a malformed Content-Length
            raise ApiError(400, "BadRequest", "request body is not valid JSON") from None

    def _dispatch(self, method: str) -> None:
        raise NotImplementedError

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")


class _ApiHandler(_BaseHandler):
    _chunked = True  # how the current watch response is framed

    def _dispatch(self, method: str) -> None:
        owner = self.server.owner
        url = urlsplit(self.path)
        path = "/" + url.path.strip("/")
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        route = _parse_resource_path(path)
        watching = _parse_bool(query.get("watch"))
        if method == "GET" and route is not None and route[2] is None:
            owner._count("watch" if watching else "list", path)
        else:
            owner._count("other", path)
        try:
            # Drain the request body first so a failed request leaves the connection usable.
            body = self._read_json() if method in {"POST", "PUT", "PATCH"} else None
            fault = owner._take_fault(path, watching)
            if fault is not None:
                status = fault.status
                msg = "injected failure" if status != 410 else "resource version too old"
                retry = fault.retry_after or ("1" if status == 429 else None)
                reply = fault.body
                if reply is None:
                    reply = _status(status, _REASONS.get(status, ""), msg)
                self._send_json(status, reply, {"Retry-After": retry} if retry else None)
            elif method == "GET" and (doc := self._discovery(path)) is not None:
                self._send_json(200, doc)
            elif route is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            elif method == "GET" and route[2] is None and watching:
                self._watch(route[0], route[1], query)
            elif method == "GET" and route[2] is None:
                self._send_json(200, owner._api_list(route[0], route[1], query))
            elif method == "GET" and route[2] is not None:
                self._send_json(200, owner._api_get(route[0], route[1], route[2]))
            else:
                self._send_json(*owner._api_write(method, route[0], route[1], route[2], body))
        except ApiError as err:
            self._send_json(err.code, err.status())

    def _discovery(self, path: str) -> Obj | None:
        address = f"{self.server.owner.host}:{self.server.server_address[1]}"
        groups = sorted({rt.group for rt in RESOURCE_TYPES if rt.group})
        if path == "/version":
            return {
                "major": "1",
                "minor": "33",
                "gitVersion": "v1.33.0-fakeapi",
                "gitCommit": "0" * 40,
                "gitTreeState": "clean",
                "buildDate": "2025-01-01T00:00:00Z",
                "goVersion": "go1.24.0",
                "compiler": "gc",
                "platform": "linux/amd64",
            }
        if path == "/api":
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": address}
                ],
            }
        if path == "/apis":
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [_group(g) for g in groups],
            }
        if path.removeprefix("/apis/") in groups:
            return {"kind": "APIGroup", "apiVersion": "v1", **_group(path.removeprefix("/apis/"))}
        resources = [rt for rt in RESOURCE_TYPES if rt.prefix == path]
        if resources:
            return {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": resources[0].api_version,
                "resources": [
                    {
                        "name": rt.plural,
                        "singularName": rt.kind.lower(),
                        "namespaced": rt.namespaced,
                        "kind": rt.kind,
                        "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                    }
                    for rt in resources
                ],
            }
        return None

    def _watch(self, rtype: ResourceType, namespace: str | None, query: Mapping[str, str]) -> None:
        owner = self.server.owner
        match = _matcher(query, namespace)
        try:
            rv_param = query.get("resourceVersion", "")
            since = None if rv_param in {"", "0"} else int(rv_param)
            timeout = float(query.get("timeoutSeconds") or 0)
        except ValueError:
            raise ApiError(400, "BadRequest", "invalid resourceVersion or timeoutSeconds") from None
        bookmarks = _parse_bool(query.get("allowWatchBookmarks"))
        # HTTP/1.0 clients cannot do chunked encoding: frame by closing the connection.
        self._chunked = self.request_version != "HTTP/1.0"
        events, watch = owner._open_watch(rtype, match, since, self.connection)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if self._chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self._send_events(events)
            if watch is None:  # expired: the ERROR event has been sent, end cleanly
                self._end_stream()
                return
            deadline = time.monotonic() + timeout if timeout > 0 else math.inf
            last_write = time.monotonic()
            while True:
                now = time.monotonic()
                if now >= deadline:
                    self._end_stream()
                    return
                if _peer_closed(self.connection):
                    self.close_connection = True
                    return
                wake = min(deadline, now + _POLL)
                if bookmarks:
                    wake = min(wake, last_write + owner.bookmark_interval)
                got = owner._next_changes(watch, wake)
                if got is None:  # cut by stop/drop-watches: no terminating chunk
                    self.close_connection = True
                    return
                changes, rv = got
                out = [ev for ch in changes if (ev := _to_event(ch, match)) is not None]
                if (
                    not out
                    and bookmarks
                    and time.monotonic() >= last_write + owner.bookmark_interval
                ):
                    bookmark = {
                        "kind": rtype.kind,
                        "apiVersion": rtype.api_version,
                        "metadata": {"resourceVersion": str(rv)},
                    }
                    out = [("BOOKMARK", bookmark)]
                if out:
                    self._send_events(out)
                    last_write = time.monotonic()
        finally:
            if watch is not None:
                owner._close_watch(watch)

    def _send_events(self, events: Iterable[tuple[str, Obj]]) -> None:
        frames = []
        for type_, obj in events:
            line = json.dumps({"type": type_, "object": obj}, separators=(",", ":")) + "\n"
            data = line.encode()
            # One chunk per event, as the real server flushes after each one.
            frames.append(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)
        if frames:
            self.wfile.write(b"".join(frames))

    def _end_stream(self) -> None:
        if self._chunked:
            self.wfile.write(b"0\r\n\r\n")


def _group(name: str) -> Obj:
    version = {"groupVersion": f"{name}/v1", "version": "v1"}
    return {"name": name, "versions": [version], "preferredVersion": version}


class _AdminHandler(_BaseHandler):
    def _dispatch(self, method: str) -> None:
        owner = self.server.owner
        parts = urlsplit(self.path).path.strip("/").split("/")
        try:
            body = self._read_json() if method in {"POST", "PUT"} else None
            result = self._route(owner, method, parts, body)
            if result is None:
                self._send_json(404, {"error": f"no admin route for {method} {self.path}"})
            else:
                self._send_json(*result)
        except ApiError as err:
            self._send_json(err.code, {"error": err.message})
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            self._send_json(400, {"error": f"bad request: {err!r}"})

    @staticmethod
    def _route(
        owner: FakeApiServer, method: str, parts: list[str], body: Any
    ) -> tuple[int, Any] | None:
        match method, parts:
            case "GET", ["stats"]:
                return 200, owner.stats()
            case "GET", ["objects", kind]:
                return 200, {"items": owner.list_objects(kind)}
            case "GET", ["objects", kind, ns, name]:
                obj = owner.get(kind, ns, name)
                return (200, obj) if obj is not None else (404, {"error": "not found"})
            case "PUT", ["objects"]:
                created, obj = owner._put(body)
                return (201 if created else 200), obj
            case "DELETE", ["objects", kind, ns, name]:
                gone = owner.delete(kind, ns, name)
                return (200, gone) if gone is not None else (404, {"error": "not found"})
            case "POST", ["apply"]:
                rv = owner.apply(body.get("put", []), body.get("delete", []))
                return 200, {"resourceVersion": rv}
            case "POST", ["compact"]:
                return 200, {"resourceVersion": owner.compact()}
            case "POST", ["stop"]:
                owner.stop_api()
                return 200, {"ok": True}
            case "POST", ["start"]:
                owner.start_api()
                return 200, {"ok": True, "api_port": owner.api_port}
            case "POST", ["drop-watches"]:
                return 200, {"dropped": owner.drop_watches()}
            case "POST", ["fail-next"]:
                owner.fail_next(
                    str(body["path_prefix"]),
                    int(body.get("status", 500)),
                    int(body.get("count", 1)),
                    body=body.get("body"),
                    retry_after=body.get("retry_after"),
                    watch=body.get("watch"),
                )
                return 200, {"ok": True}
        return None


# ----------------------------------------------------------------------------- helpers


def load_objects(path: str | Path) -> list[Obj]:
    """Read objects from a JSON or (multi-document) YAML file; `*List` kinds are expanded."""
    text = Path(path).read_text()
    docs: list[Any]
    if str(path).endswith(".json"):
        data = json.loads(text)
        docs = data if isinstance(data, list) else [data]
    else:
        import yaml  # only YAML input needs PyYAML

        docs = list(yaml.safe_load_all(text))
    out: list[Obj] = []
    for doc in docs:
        if isinstance(doc, dict) and str(doc.get("kind", "")).endswith("List") and "items" in doc:
            out.extend(doc["items"])
        elif doc is not None:
            out.append(doc)
    return out


def write_kubeconfig(path: str | Path, api_url: str, token: str = "fakeapi-token") -> None:
    """Write a kubeconfig for `api_url` (plain HTTP, dummy bearer token).

    JSON is valid YAML, so kproxy's loader (kproxy.k8s.kubeconfig) and the official client's
    kubernetes.config.load_kube_config read it as is."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fakeapi", "cluster": {"server": api_url}}],
        "users": [{"name": "fakeapi", "user": {"token": token}}],
        "contexts": [{"name": "fakeapi", "context": {"cluster": "fakeapi", "user": "fakeapi"}}],
        "current-context": "fakeapi",
    }
    Path(path).write_text(json.dumps(config, indent=2) + "\n")
