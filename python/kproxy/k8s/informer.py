"""List, watch and relist one resource: the informer the Python client does not have.

Per resource, in its own thread:

1. list (paginated), parsing the JSON ourselves (the client's model classes are far too slow
   at 30,000 objects), handing each page to ``sink.list_page`` as it arrives (a page's raw
   objects are freed once the receiver has taken them in: 30,000 raw objects are never held at
   once) and then ``sink.list_done`` - the receiver diffs the complete list against what it
   holds, so objects deleted while we were not watching are seen as deleted;
2. watch from the list's resourceVersion with bookmarks, a server-side timeout and a client
   read timeout (a dead connection is noticed instead of blocking forever), handing each event
   to ``sink.event``;
3. when a watch ends, resume from the newest resourceVersion seen; on 410 Gone (as an HTTP
   status or an ERROR event) relist; on any other failure back off with jitter and resume.

What a broken API server or a proxy in front of it sends is never taken for the cluster's
state: a list reply that is not a ``*List`` of the asked kind with an ``items`` array is an
error to retry (nothing is deleted from the receiver's cache, which only ``list_done``
replaces), ``Retry-After`` is honoured up to the backoff ceiling, bodies and watch lines are
capped in size, and every request has a total deadline as well as a per-read one.

Credentials are re-read through :class:`ClientFactory` on every reconnect.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from urllib3 import BaseHTTPResponse

from kproxy.k8s.client import ClientFactory

log = logging.getLogger(__name__)

# Objects labelled with either of these belong to another proxy or are headless (upstream).
PROXY_LABEL_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"


@dataclass(frozen=True, slots=True)
class Resource:
    name: str  # "services", "endpointslices", "nodes", "servicecidrs"
    path: str
    list_kind: str  # what a list reply must say it is ("ServiceList")
    label_selector: str | None = None
    field_selector: str | None = None
    # A resource the cluster may not serve (older releases) or let kproxy read: a 404 or 403
    # is said once, then retried quietly at the backoff ceiling.
    optional: bool = False


def services() -> Resource:
    return Resource("services", "/api/v1/services", "ServiceList", PROXY_LABEL_SELECTOR)


def endpoint_slices() -> Resource:
    return Resource(
        "endpointslices",
        "/apis/discovery.k8s.io/v1/endpointslices",
        "EndpointSliceList",
        PROXY_LABEL_SELECTOR,
    )


def service_cidrs() -> Resource:
    """networking.k8s.io/v1 ServiceCIDRs (Kubernetes 1.33+; KEP-1880)."""
    path = "/apis/networking.k8s.io/v1/servicecidrs"
    return Resource("servicecidrs", path, "ServiceCIDRList", optional=True)


def node(name: str) -> Resource:
    return Resource("nodes", "/api/v1/nodes", "NodeList", field_selector=f"metadata.name={name}")


class Sink(Protocol):
    """Receives what an informer sees; called from the informer's thread."""

    def list_page(self, resource: str, objects: list[dict[str, Any]], first: bool) -> None:
        """One page of a list (``first``: a new list starts). Returns once taken in."""

    def list_done(self, resource: str) -> None:
        """The list is complete: whatever no page held is gone."""

    def event(self, resource: str, kind: str, obj: dict[str, Any]) -> None: ...


# How often a long list logs its progress.
LIST_PROGRESS_PERIOD = 5.0


class ApiStatusError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.retry_after = retry_after


class Gone(Exception):
    """The resourceVersion we hold is too old: relist."""


class MalformedReply(Exception):
    """The server answered with something that is not what was asked for (retried)."""


@dataclass(frozen=True, slots=True)
class Timing:
    connect_timeout: float = 10.0
    # Server-side watch length is drawn from [min, 2*min) so many nodes do not reconnect at once.
    watch_timeout_min: float = 300.0
    # No byte for this long on a watch (events and bookmarks included): the connection is dead.
    watch_read_timeout: float = 120.0
    list_read_timeout: float = 120.0
    # A whole list page, from request to last byte (a server dripping bytes is cut off).
    list_deadline: float = 300.0
    # Past the server-side watch length: a watch that outlives it has stalled.
    watch_grace: float = 60.0
    page_size: int = 500
    backoff_initial: float = 0.8
    backoff_max: float = 30.0
    # An object is at most 1.5 MiB in etcd: a page of 500 and one watch event fit these.
    max_body: int = 1 << 30
    max_line: int = 16 << 20


class Informer:
    def __init__(
        self,
        resource: Resource,
        factory: ClientFactory,
        sink: Sink,
        stop: threading.Event,
        timing: Timing = Timing(),
    ) -> None:
        self.resource = resource
        self._factory = factory
        self._sink = sink
        self._stop = stop
        self._timing = timing
        self._thread = threading.Thread(
            target=self._run, name=f"informer-{resource.name}", daemon=True
        )
        self.lists = 0
        self.watches = 0
        self.errors = 0
        self._said_unserved = False

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    # -- the loop ---------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        backoff = self._timing.backoff_initial
        rv: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    rv = self._list()
                    backoff = self._timing.backoff_initial
                rv = self._watch(rv)
                backoff = self._timing.backoff_initial
            except Gone:
                log.info("%s: resourceVersion expired; relisting", self.resource.name)
                rv = None
            except Exception as e:  # every failure is retried: a dead thread is a blind node
                self.errors += 1
                delay = backoff * random.uniform(0.8, 1.2)  # noqa: S311 (jitter, not crypto)
                if isinstance(e, ApiStatusError):
                    # A 403 for a resource this role may not read says nothing of the
                    # credentials the other informers share.
                    if e.status in (401, 403) and not self.unserved(e):
                        self._factory.invalidate()
                    if e.retry_after is not None:
                        # Honoured, but never past our own ceiling: a huge value from a
                        # broken server must not stop us seeing changes.
                        delay = max(delay, min(e.retry_after, self._timing.backoff_max))
                if self.unserved(e):
                    delay = self._timing.backoff_max
                    if not self._said_unserved:
                        self._said_unserved = True
                        log.warning(
                            "%s: %s: not served or not allowed here; going on without them "
                            "(retried every %.0fs)",
                            self.resource.name, _describe(e), delay,
                        )  # fmt: skip
                    else:
                        log.debug("%s: %s", self.resource.name, _describe(e))
                else:
                    log.warning(
                        "%s: %s; retrying in %.1fs", self.resource.name, _describe(e), delay
                    )
                backoff = min(backoff * 2, self._timing.backoff_max)
                self._stop.wait(delay)

    def unserved(self, e: Exception) -> bool:
        """An optional resource this server does not serve (404) or lets us read (403)."""
        return self.resource.optional and isinstance(e, ApiStatusError) and e.status in (403, 404)

    def _request(self, query: list[tuple[str, str]], read_timeout: float) -> BaseHTTPResponse:
        api = self._factory.get()
        started = time.monotonic()
        try:
            raw = api.request(
                "GET", self.resource.path, query, {"Accept": "application/json"},
                timeout=(self._timing.connect_timeout, read_timeout),
            )  # fmt: skip
        except Exception:
            self._factory.observe("GET", "<error>", time.monotonic() - started)  # client-go's
            raise
        self._factory.observe("GET", str(raw.status), time.monotonic() - started)
        if not 200 <= raw.status < 300:
            body = raw.read()
            raw.release_conn()
            msg = _status_message(body)
            if raw.status == 410:
                raise Gone(msg)
            raise ApiStatusError(raw.status, msg, _retry_after(raw.headers.get("Retry-After")))
        return raw

    def _selectors(self) -> list[tuple[str, str]]:
        q: list[tuple[str, str]] = []
        if self.resource.label_selector:
            q.append(("labelSelector", self.resource.label_selector))
        if self.resource.field_selector:
            q.append(("fieldSelector", self.resource.field_selector))
        return q

    def _list(self) -> str:
        count = 0
        cont: str | None = None
        rv = ""
        started = last_report = time.monotonic()
        for page in range(1_000_000):  # bounded: a page always advances or the loop ends
            q = [*self._selectors(), ("limit", str(self._timing.page_size))]
            if cont:
                q.append(("continue", cont))
            deadline = time.monotonic() + self._timing.list_deadline
            raw = self._request(q, self._timing.list_read_timeout)
            try:
                body = _read_capped(raw, self._timing.max_body, deadline, self._stop)
            finally:
                raw.release_conn()
            try:
                doc = json.loads(body)
            except ValueError as e:
                raise MalformedReply(f"list reply is not JSON: {e}") from None
            del body
            items = self._items(doc)
            meta = doc.get("metadata") or {}
            rv = str(meta.get("resourceVersion") or rv)
            cont = meta.get("continue") or None
            del doc
            if self._stop.is_set():
                return rv
            self._sink.list_page(self.resource.name, items, page == 0)
            count += len(items)
            if not cont:
                break
            now = time.monotonic()
            if now - last_report >= LIST_PROGRESS_PERIOD:
                # A first list of tens of thousands of objects takes a while: say it moves.
                last_report = now
                rate = count / max(now - started, 1e-6)
                log.info(
                    "%s: listing, %d so far (%.0f per second)", self.resource.name, count, rate
                )
        self.lists += 1
        self._sink.list_done(self.resource.name)
        log.info("%s: listed %d at resourceVersion %s", self.resource.name, count, rv)
        return rv

    def _items(self, doc: Any) -> list[dict[str, Any]]:
        """The objects of a list reply; anything but a list of the asked kind is an error."""
        want = self.resource.list_kind
        if not isinstance(doc, dict):
            raise MalformedReply(f"list reply is a JSON {type(doc).__name__}, not the {want}")
        kind = doc.get("kind")
        if kind != want:
            what = f"a {kind}" if isinstance(kind, str) and kind else "an object without a kind"
            message = doc.get("message")
            if isinstance(message, str) and message:
                what += f" ({message[:200]})"
            raise MalformedReply(f"list reply is {what}, not the {want} asked for")
        items = doc.get("items")
        if not isinstance(items, list):
            raise MalformedReply(f"list reply is a {want} without an items array")
        return [i for i in items if isinstance(i, dict)]

    def _watch(self, rv: str) -> str:
        timeout = int(self._timing.watch_timeout_min * random.uniform(1.0, 2.0))  # noqa: S311
        q = [
            *self._selectors(),
            ("watch", "true"),
            ("resourceVersion", rv),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(timeout)),
        ]
        deadline = time.monotonic() + timeout + self._timing.watch_grace
        raw = self._request(q, self._timing.watch_read_timeout)
        self.watches += 1
        try:
            for line in _lines(raw, self._stop, self._timing.max_line, deadline):
                ev = json.loads(line)
                kind = ev.get("type")
                obj = ev.get("object")
                if not isinstance(obj, dict):
                    continue
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone(str(obj.get("message", "")))
                    raise ApiStatusError(int(obj.get("code") or 500), str(obj.get("message", "")))
                new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._sink.event(self.resource.name, kind, obj)
                if new_rv:
                    rv = str(new_rv)
        finally:
            raw.release_conn()
            raw.close()
        return rv


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (the HTTP-date form is not used by the API)."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


def _read_capped(
    raw: BaseHTTPResponse, limit: int, deadline: float, stop: threading.Event
) -> bytes:
    """A whole response body, refused past ``limit`` bytes or the ``deadline``."""
    parts: list[bytes] = []
    size = 0
    for chunk in raw.stream(1 << 20, decode_content=True):
        size += len(chunk)
        if size > limit:
            raise MalformedReply(f"list reply larger than {limit} bytes")
        if time.monotonic() > deadline:
            raise MalformedReply("list reply not complete by its deadline")
        if stop.is_set():
            break
        parts.append(chunk)
    return b"".join(parts)


def _lines(
    raw: BaseHTTPResponse,
    stop: threading.Event,
    limit: int = 16 << 20,
    deadline: float = float("inf"),
) -> Iterator[bytes]:
    """Newline-delimited JSON from a streaming response, however the chunks are cut; a line
    over ``limit`` bytes, or a stream still open past ``deadline``, is an error."""
    buf = b""
    for chunk in raw.stream(65536, decode_content=True):
        if stop.is_set():
            return
        if time.monotonic() > deadline:
            raise MalformedReply("watch still open past its deadline (stalled)")
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl].strip(), buf[nl + 1 :]
            if len(line) > limit:
                raise MalformedReply(f"watch event larger than {limit} bytes")
            if line:
                yield line
        if len(buf) > limit:
            raise MalformedReply(f"watch event larger than {limit} bytes")
    if buf.strip():
        yield buf.strip()


def _status_message(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace")
    if isinstance(doc, Mapping):
        return str(doc.get("message") or doc.get("reason") or "")
    return ""


def _describe(e: Exception) -> str:
    name = type(e).__name__
    text = str(e)
    return f"{name}: {text}" if text else name
