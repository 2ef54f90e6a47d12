"""The list/watch/relist loop against the fake API server on loopback."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kproxy.k8s import informer
from kproxy.k8s.client import ClientFactory
from tests import k8sobjects as k
from tests.fakeapi import FakeApiServer, write_kubeconfig

FAST = informer.Timing(
    connect_timeout=1.0,
    watch_timeout_min=30.0,
    watch_read_timeout=5.0,
    list_read_timeout=5.0,
    page_size=2,
    backoff_initial=0.05,
    backoff_max=0.2,
)


class Recorder:
    """A sink keeping the current set of names, as the controller would."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.names: set[str] = set()
        self.listing: set[str] = set()
        self.replaces = 0
        self.events: list[tuple[str, str]] = []

    def list_page(self, resource: str, objects: list[dict[str, Any]], first: bool) -> None:
        with self.cond:
            if first:
                self.listing = set()
            self.listing |= {o["metadata"]["name"] for o in objects}

    def list_done(self, resource: str) -> None:
        with self.cond:
            self.replaces += 1
            self.names = self.listing
            self.cond.notify_all()

    def event(self, resource: str, kind: str, obj: dict[str, Any]) -> None:
        with self.cond:
            name = obj["metadata"]["name"]
            self.events.append((kind, name))
            if kind == "DELETED":
                self.names.discard(name)
            else:
                self.names.add(name)
            self.cond.notify_all()

    def wait(self, pred: Callable[[], bool], timeout: float = 10.0) -> None:
        with self.cond:
            assert self.cond.wait_for(pred, timeout), (self.names, self.events[-5:])


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=0.2) as server:
        yield server


def svc(name: str, **kw: Any) -> dict[str, Any]:
    return k.service(name, "10.96.0.1", [k.port("http", 80)], **kw)


@contextmanager
def run(
    api: FakeApiServer,
    rec: Recorder,
    res: informer.Resource | None = None,
    factory: ClientFactory | None = None,
) -> Iterator[informer.Informer]:
    stop = threading.Event()
    inf = informer.Informer(
        res or informer.services(), factory or ClientFactory(None, api.api_url), rec, stop, FAST
    )
    inf.start()
    try:
        yield inf
    finally:
        stop.set()
        api.drop_watches()
        inf.join(5)


def test_lists_in_pages_then_watches(api: FakeApiServer) -> None:
    for i in range(5):
        api.put(svc(f"s{i}"))
    rec = Recorder()
    with run(api, rec) as inf:
        rec.wait(lambda: rec.replaces == 1 and len(rec.names) == 5)
        api.put(svc("s5"))
        api.delete("Service", "default", "s0")
        rec.wait(lambda: rec.names == {"s1", "s2", "s3", "s4", "s5"})
        assert inf.lists == 1
        assert api.stats()["lists_by_path"]["/api/v1/services"] == 3  # 5 objects, 2 a page


def test_lists_and_watches_through_the_fake_servers_kubeconfig(
    api: FakeApiServer, tmp_path: Path
) -> None:
    cfg = tmp_path / "kubeconfig"
    write_kubeconfig(cfg, api.api_url, token="kubeconfig-token")
    factory = ClientFactory(str(cfg), None)
    factory.check()
    assert factory.get().host == api.api_url
    assert factory.get().authorization == "Bearer kubeconfig-token"
    api.put(svc("a"))
    rec = Recorder()
    with run(api, rec, factory=factory) as inf:
        rec.wait(lambda: rec.replaces == 1 and rec.names == {"a"})
        api.put(svc("b"))
        api.delete("Service", "default", "a")
        rec.wait(lambda: rec.names == {"b"})
        assert (inf.lists, inf.errors) == (1, 0) and inf.watches >= 1


def test_objects_labelled_for_another_proxy_are_not_seen(api: FakeApiServer) -> None:
    api.put(svc("mine"))
    api.put(svc("theirs", labels={"service.kubernetes.io/service-proxy-name": "other"}))
    rec = Recorder()
    with run(api, rec) as _:
        rec.wait(lambda: rec.replaces == 1)
        assert rec.names == {"mine"}
        api.put(svc("mine", labels={"service.kubernetes.io/headless": ""}))
        rec.wait(lambda: rec.names == set())


def test_restart_with_compaction_relists_and_sees_deletions(api: FakeApiServer) -> None:
    api.put(svc("a"))
    api.put(svc("b"))
    rec = Recorder()
    with run(api, rec) as inf:
        rec.wait(lambda: rec.names == {"a", "b"})
        api.stop_api()
        api.delete("Service", "default", "a")
        api.put(svc("c"))
        api.compact()
        time.sleep(0.3)
        api.start_api()
        rec.wait(lambda: rec.names == {"b", "c"} and rec.replaces >= 2)
        assert inf.lists >= 2


def test_dropped_watches_resume_without_relisting(api: FakeApiServer) -> None:
    api.put(svc("a"))
    rec = Recorder()
    with run(api, rec) as inf:
        rec.wait(lambda: rec.names == {"a"})
        for i in range(3):
            api.drop_watches()
            time.sleep(0.2)
            api.put(svc(f"x{i}"))
        rec.wait(lambda: rec.names == {"a", "x0", "x1", "x2"})
        assert inf.lists == 1  # resumed from the last resourceVersion each time


def test_server_errors_are_retried(api: FakeApiServer) -> None:
    api.put(svc("a"))
    api.fail_next("/api/v1/services", status=500, count=3)
    rec = Recorder()
    with run(api, rec) as inf:
        rec.wait(lambda: rec.names == {"a"})
        assert inf.errors >= 3


def test_node_is_watched_by_field_selector(api: FakeApiServer) -> None:
    api.put(k.node("node-a", zone="z1"))
    api.put(k.node("node-b"))
    rec = Recorder()
    with run(api, rec, informer.node("node-a")) as _:
        rec.wait(lambda: rec.names == {"node-a"})


def test_a_server_that_never_answers_is_noticed() -> None:
    # Accepts connections and says nothing: only the client's read timeout can notice.
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(16)
        port = lsock.getsockname()[1]
        stop = threading.Event()
        timing = informer.Timing(
            connect_timeout=1.0, list_read_timeout=0.3, backoff_initial=0.05, backoff_max=0.1
        )
        inf = informer.Informer(
            informer.services(),
            ClientFactory(None, f"http://127.0.0.1:{port}"),
            Recorder(),
            stop,
            timing,
        )
        inf.start()
        deadline = time.monotonic() + 10
        while inf.errors < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        inf.join(5)
        assert inf.errors >= 2


def test_client_factory_rereads_rotated_tokens(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first")
    cfg = tmp_path / "kubeconfig"
    write_kubeconfig(cfg, "http://127.0.0.1:1")
    doc = json.loads(cfg.read_text())
    for user in doc["users"]:
        user["user"] = {"tokenFile": str(token)}
    cfg.write_text(json.dumps(doc))
    now = [0.0]
    factory = ClientFactory(str(cfg), None, max_age=60.0, clock=lambda: now[0])

    def auth() -> str:
        return str(factory.get().authorization)

    assert "first" in auth()
    token.write_text("second")
    assert "first" in auth()  # cached within max_age
    now[0] = 61.0
    assert "second" in auth()
    token.write_text("third")
    factory.invalidate()  # as after a 401
    assert "third" in auth()


class History(Recorder):
    """Also keeps what each completed list said the cluster holds."""

    def __init__(self) -> None:
        super().__init__()
        self.lists: list[set[str]] = []

    def list_done(self, resource: str) -> None:
        with self.cond:
            self.lists.append(set(self.listing))
        super().list_done(resource)


MALFORMED = {
    "empty object": {},
    "a Status with 200": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                          "message": "etcdserver: request timed out", "code": 500},
    "a list without items": {"kind": "ServiceList", "apiVersion": "v1", "metadata": {}},
    "items that are not an array": {"kind": "ServiceList", "items": {"a": 1}},
    "another kind's list": {"kind": "EndpointSliceList", "items": []},
}  # fmt: skip


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_relist_is_retried_and_never_empties_the_cache(
    api: FakeApiServer, body: dict[str, Any]
) -> None:
    api.put(svc("a"))
    api.put(svc("b"))
    rec = History()
    with run(api, rec) as inf:
        rec.wait(lambda: rec.names == {"a", "b"})
        # The watch is refused with 410, and the relist is answered badly, twice.
        api.fail_next("/api/v1/services", 410, watch=True)
        api.fail_next("/api/v1/services", 200, count=2, body=body, watch=False)
        api.drop_watches()
        rec.wait(lambda: inf.errors >= 2)
        assert rec.names == {"a", "b"}
        # The next good list is taken, and changes made after it are seen.
        api.put(svc("c"))
        rec.wait(lambda: rec.names == {"a", "b", "c"})
        assert inf.lists == 2 and all(seen >= {"a", "b"} for seen in rec.lists), rec.lists


def test_a_malformed_first_list_is_retried(api: FakeApiServer) -> None:
    api.put(svc("a"))
    api.fail_next("/api/v1/services", 200, count=2, body={}, watch=False)
    rec = History()
    with run(api, rec) as inf:
        rec.wait(lambda: rec.names == {"a"})
        assert inf.errors >= 2 and rec.lists == [{"a"}]


def test_a_huge_retry_after_is_capped_at_the_backoff_ceiling(api: FakeApiServer) -> None:
    api.put(svc("a"))
    api.fail_next("/api/v1/services", 429, retry_after="99999999999", watch=False)
    rec = Recorder()
    with run(api, rec) as inf:
        rec.wait(lambda: rec.names == {"a"}, timeout=5)
        api.fail_next("/api/v1/services", 503, count=2, retry_after="99999999999")
        api.drop_watches()
        rec.wait(lambda: inf.errors >= 3, timeout=5)
        api.put(svc("b"))
        rec.wait(lambda: rec.names == {"a", "b"}, timeout=5)
        assert inf.alive


def test_oversized_watch_lines_and_list_bodies_are_errors(api: FakeApiServer) -> None:
    api.put(svc("a"))
    rec = Recorder()
    small = dataclasses.replace(FAST, max_body=2_000, max_line=1_500)
    stop = threading.Event()
    inf = informer.Informer(informer.services(), ClientFactory(None, api.api_url), rec, stop, small)
    inf.start()
    try:
        rec.wait(lambda: rec.names == {"a"})
        # An object whose watch event is over the line cap is not taken in...
        api.put(svc("big", labels={"x": "y" * 2_000}))
        rec.wait(lambda: inf.errors >= 1)
        assert "big" not in rec.names
        # ...and neither is a list page over the body cap (retried, not emptied).
        rec.wait(lambda: inf.errors >= 3)
        assert rec.names == {"a"} and inf.alive
    finally:
        stop.set()
        api.drop_watches()
        inf.join(5)


def test_a_long_list_logs_its_progress(
    api: FakeApiServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(informer, "LIST_PROGRESS_PERIOD", 0.0)  # every page
    for i in range(5):
        api.put(svc(f"s{i}"))
    rec = Recorder()
    with caplog.at_level(logging.INFO, "kproxy.k8s.informer"), run(api, rec):
        rec.wait(lambda: rec.replaces == 1 and len(rec.names) == 5)
    progress = [r.getMessage() for r in caplog.records if "so far" in r.getMessage()]
    # Pages of 2: after 2 and 4 objects (the last page ends the list instead).
    assert [p.split(",")[1].split("(")[0].strip() for p in progress] == ["2 so far", "4 so far"]
    assert all(p.startswith("services: listing, ") and "per second)" in p for p in progress)


def test_every_request_is_reported_for_the_rest_client_metrics(api: FakeApiServer) -> None:
    api.put(svc("s0"))
    rec = Recorder()
    factory = ClientFactory(None, api.api_url)
    seen: list[tuple[str, str, str, float]] = []
    factory.on_request = lambda *request: seen.append(request)
    stop = threading.Event()
    inf = informer.Informer(informer.services(), factory, rec, stop, FAST)
    inf.start()
    try:
        rec.wait(lambda: rec.replaces == 1)
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:  # the list, then the watch
            time.sleep(0.05)
    finally:
        stop.set()
        api.drop_watches()
        inf.join(5)
    host = api.api_url.split("//")[1]
    assert [(m, h, c) for m, h, c, _ in seen[:2]] == [("GET", host, "200")] * 2
    assert all(0 <= s < 10 for *_, s in seen)
