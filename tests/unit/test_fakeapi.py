"""Tests for the fake Kubernetes API server in tests/fakeapi.

Every network operation has a socket timeout, so a broken server fails tests instead of
hanging them.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client, config, watch

from tests.fakeapi import (
    ApiError,
    FakeApiServer,
    load_objects,
    parse_field_selector,
    parse_label_selector,
    write_kubeconfig,
)

KUBE_PROXY_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
TIMEOUT = 5.0
# kubernetes.client is typed, kubernetes.config and kubernetes.watch are not.
load_kube_config: Any = config.load_kube_config
Watch: Any = watch.Watch
REPO_ROOT = Path(__file__).resolve().parents[2]


def service(name: str, namespace: str = "default", labels: dict[str, str] | None = None) -> Any:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "protocol": "TCP"}]},
    }


def node(name: str, labels: dict[str, str] | None = None) -> Any:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels or {}}}


def endpoint_slice(name: str, service_name: str) -> Any:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.0.5"], "conditions": {"ready": True}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=0.2) as srv:
        yield srv


def request(port: int, method: str, path: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
    """One HTTP request on a fresh connection; returns (status, headers, decoded JSON)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, dict(resp.getheaders()), json.loads(raw) if raw else None
    finally:
        conn.close()


def api_get(srv: FakeApiServer, path: str) -> tuple[int, Any]:
    status, _, body = request(srv.api_port, "GET", path)
    return status, body


def admin(srv: FakeApiServer, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    status, _, decoded = request(srv.admin_port, method, path, body)
    return status, decoded


def names(items: list[Any]) -> list[str]:
    return [i["metadata"]["name"] for i in items]


def wait_for(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


class WatchStream:
    """A raw watch request, read one JSON line at a time."""

    def __init__(self, port: int, path: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        self.conn.request("GET", path)
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200
        assert self.resp.getheader("Content-Type") == "application/json"

        self.buffer = b""

    def next(self) -> Any:
        """The next event, or None when the server ended the stream cleanly."""
        # Not resp.readline(): for chunked bodies it maps a broken stream to a clean EOF,
        # while read1() raises IncompleteRead.
        while b"\n" not in self.buffer:
            data = self.resp.read1(65536)
            if not data:
                assert self.buffer == b"", "stream ended in the middle of an event"
                return None
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def take(self, n: int) -> list[Any]:
        return [self.next() for _ in range(n)]

    def rest(self) -> list[Any]:
        """All remaining events up to a clean end of stream."""
        out = []
        while (event := self.next()) is not None:
            out.append(event)
        return out

    def broken(self) -> bool:
        """Read until the end; True if the connection broke rather than ending cleanly."""
        try:
            self.rest()
        except TimeoutError:
            raise AssertionError("watch neither ended nor broke") from None
        except (http.client.HTTPException, OSError, ValueError):
            return True
        return False

    def close(self) -> None:
        self.conn.close()


def brief(events: list[Any]) -> list[tuple[str, str]]:
    return [(e["type"], e["object"]["metadata"].get("name", "")) for e in events]


# ------------------------------------------------------------------------ list & paging


def test_list_and_resource_version(api: FakeApiServer) -> None:
    api.put(service("b"))
    api.put(service("a", namespace="kube-system"))
    api.put(node("n1"))
    status, body = api_get(api, "/api/v1/services")
    assert status == 200
    assert (body["kind"], body["apiVersion"]) == ("ServiceList", "v1")
    # Sorted by namespace/name; one RV counter shared with Nodes.
    assert names(body["items"]) == ["b", "a"]
    assert body["metadata"]["resourceVersion"] == str(api.resource_version)
    rvs = [int(i["metadata"]["resourceVersion"]) for i in body["items"]]
    assert rvs == [2, 3]
    assert all(i["metadata"]["uid"] for i in body["items"])
    assert "continue" not in body["metadata"]

    uid = body["items"][0]["metadata"]["uid"]
    updated = api.put(service("b", labels={"x": "y"}))
    assert updated["metadata"]["uid"] == uid
    assert updated["metadata"]["resourceVersion"] == str(api.resource_version) == "5"

    status, body = api_get(api, "/api/v1/namespaces/kube-system/services")
    assert names(body["items"]) == ["a"]
    status, body = api_get(api, "/api/v1/namespaces/default/services/b")
    assert (status, body["metadata"]["labels"]) == (200, {"x": "y"})
    status, body = api_get(api, "/api/v1/namespaces/default/services/nope")
    assert (status, body["kind"], body["reason"]) == (404, "Status", "NotFound")
    status, body = api_get(api, "/api/v1/pods")
    assert status == 404


def test_pagination_is_consistent_snapshot(api: FakeApiServer) -> None:
    for name in "abcde":
        api.put(service(name))
    status, page1 = api_get(api, "/api/v1/services?limit=2")
    snapshot = page1["metadata"]["resourceVersion"]
    assert names(page1["items"]) == ["a", "b"]
    assert page1["metadata"]["remainingItemCount"] == 3

    # Writes between pages must not show up: continuation is served from the snapshot.
    api.delete("Service", "default", "c")
    api.put(service("bb"))
    api.put(service("d", labels={"changed": "yes"}))

    token = page1["metadata"]["continue"]
    status, page2 = api_get(api, f"/api/v1/services?limit=2&continue={token}")
    assert names(page2["items"]) == ["c", "d"]
    assert page2["items"][1]["metadata"]["labels"] == {}
    assert page2["metadata"]["resourceVersion"] == snapshot
    assert page2["metadata"]["remainingItemCount"] == 1

    token = page2["metadata"]["continue"]
    status, page3 = api_get(api, f"/api/v1/services?limit=2&continue={token}")
    assert names(page3["items"]) == ["e"]
    assert "continue" not in page3["metadata"]

    status, body = api_get(api, "/api/v1/services?limit=2&continue=garbage")
    assert (status, body["reason"]) == (400, "BadRequest")


def test_label_and_field_selectors_on_lists(api: FakeApiServer) -> None:
    api.put(service("plain"))
    api.put(service("headless", labels={"service.kubernetes.io/headless": ""}))
    api.put(service("other-proxy", labels={"service.kubernetes.io/service-proxy-name": "x"}))
    api.put(service("web", labels={"app": "web", "tier": "front"}))
    _, body = api_get(api, f"/api/v1/services?labelSelector={KUBE_PROXY_SELECTOR}")
    assert names(body["items"]) == ["plain", "web"]
    _, body = api_get(api, "/api/v1/services?labelSelector=app%3Dweb,tier")
    assert names(body["items"]) == ["web"]
    _, body = api_get(api, "/api/v1/services?labelSelector=app!%3Dweb&limit=1")
    assert names(body["items"]) == ["headless"]
    assert "remainingItemCount" not in body["metadata"]  # as on a real server with selectors
    status, body = api_get(api, "/api/v1/services?labelSelector=bad%20key")
    assert (status, body["reason"]) == (400, "BadRequest")

    for name in ("n1", "n2"):
        api.put(node(name))
    _, body = api_get(api, "/api/v1/nodes?fieldSelector=metadata.name%3Dn2")
    assert names(body["items"]) == ["n2"]
    assert "namespace" not in body["items"][0]["metadata"]
    _, body = api_get(api, "/api/v1/nodes?fieldSelector=metadata.name!%3Dn2")
    assert names(body["items"]) == ["n1"]


def test_selector_parsers() -> None:
    sel = parse_label_selector("a, !b, c=1, d!=2, e in (x, y), f notin (z)")
    good = {"a": "", "c": "1", "e": "y"}
    assert sel(good)
    assert not sel({**good, "b": "on"})
    assert not sel({**good, "d": "2"})
    assert sel({**good, "d": "3"})
    assert not sel({**good, "e": "w"})
    assert not sel({**good, "f": "z"})
    assert not sel({"c": "1", "e": "x"})  # `a` missing
    assert parse_label_selector("")({"anything": "goes"})
    with pytest.raises(ApiError):
        parse_label_selector("a b")
    fields = parse_field_selector("metadata.name=n1,spec.unschedulable!=true")
    assert fields({"metadata": {"name": "n1"}, "spec": {}})
    assert not fields({"metadata": {"name": "n1"}, "spec": {"unschedulable": True}})


# ------------------------------------------------------------------------------- watch


def test_watch_replays_history_from_resource_version(api: FakeApiServer) -> None:
    api.put(service("old"))
    start = api.resource_version
    api.put(service("a"))
    api.put(node("n1"))  # other resource types must not leak into a Service watch
    api.put(service("a", labels={"v": "2"}))
    api.delete("Service", "default", "old")
    stream = WatchStream(api.api_port, f"/api/v1/services?watch=true&resourceVersion={start}")
    events = stream.take(3)
    assert brief(events) == [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "old")]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == [start + 1, start + 3, start + 4]
    assert events[2]["object"]["kind"] == "Service"
    stream.close()

    # Replay stops at the current RV; live events follow, and timeoutSeconds ends it cleanly.
    stream = WatchStream(api.api_port, f"/api/v1/services?watch=1&resourceVersion={start + 4}")
    api.put(service("live"))
    assert brief(stream.take(1)) == [("ADDED", "live")]
    stream.close()


def test_watch_live_events_and_timeout(api: FakeApiServer) -> None:
    rv = api.resource_version
    stream = WatchStream(
        api.api_port, f"/api/v1/services?watch=true&resourceVersion={rv}&timeoutSeconds=1"
    )
    started = time.monotonic()
    api.put(service("a"))
    api.put(node("n1"))
    api.put(service("a", labels={"x": "1"}))
    api.delete("Service", "default", "a")
    events = stream.rest()  # returns only because the server ends the stream cleanly
    assert 0.9 < time.monotonic() - started < 3
    assert brief(events) == [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]
    assert events[2]["object"]["metadata"]["resourceVersion"] == str(api.resource_version)
    wait_for(lambda: api.stats()["open_watches"] == 0)


def test_watch_without_resource_version_starts_with_current_state(api: FakeApiServer) -> None:
    api.put(service("b"))
    api.put(service("a"))
    api.put(endpoint_slice("a-1", "a"))
    for query in ("watch=true", "watch=true&resourceVersion=0"):
        stream = WatchStream(api.api_port, f"/api/v1/services?{query}")
        assert brief(stream.take(2)) == [("ADDED", "a"), ("ADDED", "b")]
        api.put(service("c"))
        assert brief(stream.take(1)) == [("ADDED", "c")]
        stream.close()
        api.delete("Service", "default", "c")
    stream = WatchStream(api.api_port, "/apis/discovery.k8s.io/v1/endpointslices?watch=true")
    (event,) = stream.take(1)
    assert (event["type"], event["object"]["kind"]) == ("ADDED", "EndpointSlice")
    stream.close()


def test_watch_label_selector_transitions(api: FakeApiServer) -> None:
    start = api.resource_version
    path = f"/api/v1/services?watch=true&labelSelector={KUBE_PROXY_SELECTOR}&resourceVersion="
    live = WatchStream(api.api_port, path + str(start))
    api.put(service("hidden", labels={"service.kubernetes.io/headless": ""}))
    api.put(service("x"))
    api.put(service("x", labels={"service.kubernetes.io/service-proxy-name": "other"}))
    api.put(service("x", labels={"a": "b"}))
    api.delete("Service", "default", "hidden")
    api.put(service("x", labels={"a": "c"}))
    expected = [("ADDED", "x"), ("DELETED", "x"), ("ADDED", "x"), ("MODIFIED", "x")]
    events = live.take(4)
    assert brief(events) == expected
    # DELETED carries the last matching content, stamped with the RV of the change.
    assert events[1]["object"]["metadata"]["labels"] == {}
    assert events[1]["object"]["metadata"]["resourceVersion"] == str(start + 3)
    live.close()
    replay = WatchStream(api.api_port, path + str(start))
    assert replay.take(4) == events
    replay.close()


def test_watch_over_http10_is_framed_by_connection_close(api: FakeApiServer) -> None:
    api.put(service("a"))
    with socket.create_connection(("127.0.0.1", api.api_port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /api/v1/services?watch=true&timeoutSeconds=1 HTTP/1.0\r\n\r\n")
        raw = b""
        while data := sock.recv(65536):
            raw += data
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].endswith(b" 200 OK")
    assert b"chunked" not in head.lower()
    assert brief([json.loads(line) for line in body.splitlines()]) == [("ADDED", "a")]


def test_watch_nodes_by_field_selector(api: FakeApiServer) -> None:
    api.put(node("me"))
    api.put(node("other"))
    stream = WatchStream(api.api_port, "/api/v1/nodes?watch=true&fieldSelector=metadata.name%3Dme")
    assert brief(stream.take(1)) == [("ADDED", "me")]
    api.put(node("other", labels={"a": "b"}))
    api.put(node("me", labels={"topology.kubernetes.io/zone": "z1"}))
    (event,) = stream.take(1)
    assert event["type"] == "MODIFIED"
    assert event["object"]["metadata"]["labels"] == {"topology.kubernetes.io/zone": "z1"}
    stream.close()


def test_bookmarks(api: FakeApiServer) -> None:
    rv = api.resource_version
    stream = WatchStream(
        api.api_port, f"/api/v1/services?watch=true&resourceVersion={rv}&allowWatchBookmarks=true"
    )
    api.put(node("n1"))  # moves the global RV without producing a Service event
    deadline = time.monotonic() + TIMEOUT
    while True:
        event = stream.next()
        assert event["type"] == "BOOKMARK"
        assert event["object"]["kind"] == "Service"
        if event["object"]["metadata"]["resourceVersion"] == str(rv + 1):
            break
        assert time.monotonic() < deadline
    stream.close()

    stream = WatchStream(
        api.api_port, f"/api/v1/services?watch=true&timeoutSeconds=1&resourceVersion={rv}"
    )
    assert stream.rest() == []  # no bookmarks unless asked for
    stream.close()


# --------------------------------------------------------------------- expiry & faults


def test_compaction_expires_watches_and_continue_tokens(api: FakeApiServer) -> None:
    for name in "abc":
        api.put(service(name))
    _, page = api_get(api, "/api/v1/services?limit=1")
    old_rv = int(page["metadata"]["resourceVersion"])
    compacted = api.compact()
    assert compacted == api.resource_version > old_rv

    stream = WatchStream(api.api_port, f"/api/v1/services?watch=true&resourceVersion={old_rv}")
    events = stream.rest()  # a single ERROR event, then a clean end: not an HTTP 410
    assert events == [
        {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f"too old resource version: {old_rv} ({compacted})",
                "reason": "Expired",
                "code": 410,
            },
        }
    ]
    stream.close()

    token = page["metadata"]["continue"]
    status, body = api_get(api, f"/api/v1/services?limit=1&continue={token}")
    assert (status, body["reason"], body["code"]) == (410, "Expired", 410)

    # Watching from the compaction point itself is fine.
    stream = WatchStream(api.api_port, f"/api/v1/services?watch=true&resourceVersion={compacted}")
    api.put(service("d"))
    assert brief(stream.take(1)) == [("ADDED", "d")]
    stream.close()


def test_history_limit_compacts_automatically() -> None:
    with FakeApiServer(history_limit=2) as srv:
        start = srv.resource_version
        for name in "abc":
            srv.put(service(name))
        stream = WatchStream(srv.api_port, f"/api/v1/services?watch=true&resourceVersion={start}")
        (event,) = stream.rest()
        assert (event["type"], event["object"]["code"]) == ("ERROR", 410)
        stream.close()


def test_fail_next(api: FakeApiServer) -> None:
    status, _ = admin(api, "POST", "/fail-next", {"path_prefix": "/api/v1/services", "count": 2})
    assert status == 200
    for _ in range(2):
        status, body = api_get(api, "/api/v1/services")
        assert (status, body["kind"], body["reason"]) == (500, "Status", "InternalError")
    assert api_get(api, "/api/v1/services")[0] == 200

    api.fail_next("/api/v1/nodes", 410)
    assert api_get(api, "/api/v1/services")[0] == 200  # other paths are unaffected
    status, body = api_get(api, "/api/v1/nodes?limit=5")
    assert (status, body["reason"]) == (410, "Expired")
    api.fail_next("/api/v1/nodes", 429)
    status, headers, _ = request(api.api_port, "GET", "/api/v1/nodes?watch=true")
    assert (status, headers["Retry-After"]) == (429, "1")


# ------------------------------------------------------------------- connection faults


def test_stop_and_start(api: FakeApiServer) -> None:
    api.put(service("a"))
    rv = api.resource_version
    stream = WatchStream(api.api_port, f"/api/v1/services?watch=true&resourceVersion={rv}")
    idle = http.client.HTTPConnection("127.0.0.1", api.api_port, timeout=TIMEOUT)
    idle.request("GET", "/version")
    idle.getresponse().read()  # now an idle keep-alive connection

    assert admin(api, "POST", "/stop")[0] == 200
    assert not api.api_running
    assert stream.broken()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", api.api_port), timeout=TIMEOUT).close()
    # The admin port still works while the API is down.
    api.put(service("b"))
    assert admin(api, "GET", "/stats")[1]["open_watches"] == 0

    status, body = admin(api, "POST", "/start")
    assert (status, body["api_port"]) == (200, api.api_port)
    _, body = api_get(api, "/api/v1/services")
    assert names(body["items"]) == ["a", "b"]
    assert body["metadata"]["resourceVersion"] == str(rv + 1)
    # A watch resumed from before the outage catches up.
    stream = WatchStream(api.api_port, f"/api/v1/services?watch=true&resourceVersion={rv}")
    assert brief(stream.take(1)) == [("ADDED", "b")]
    stream.close()
    idle.close()


def test_drop_watches(api: FakeApiServer) -> None:
    streams = [WatchStream(api.api_port, "/api/v1/services?watch=true") for _ in range(2)]
    wait_for(lambda: api.stats()["open_watches"] == 2)
    status, body = admin(api, "POST", "/drop-watches")
    assert (status, body["dropped"]) == (200, 2)
    assert all(s.broken() for s in streams)
    wait_for(lambda: api.stats()["open_watches"] == 0)
    assert api_get(api, "/api/v1/services")[0] == 200  # still listening


def test_close_is_idempotent_and_bounded() -> None:
    srv = FakeApiServer()
    srv.start()
    stream = WatchStream(srv.api_port, "/api/v1/services?watch=true")
    started = time.monotonic()
    srv.close()
    srv.close()
    assert time.monotonic() - started < 3
    assert stream.broken()
    with pytest.raises(RuntimeError):
        srv.start_api()


# ----------------------------------------------------------------- writes & admin API


def test_event_creation(api: FakeApiServer) -> None:
    core_event = {
        "metadata": {"generateName": "kproxy."},
        "involvedObject": {"kind": "Node", "name": "n1"},
        "reason": "Starting",
        "type": "Normal",
    }
    status, _, body = request(api.api_port, "POST", "/api/v1/namespaces/default/events", core_event)
    assert status == 201
    assert (body["kind"], body["metadata"]["namespace"]) == ("Event", "default")
    assert body["metadata"]["name"].startswith("kproxy.")
    new_event = {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": "e1"},
        "reason": "Starting",
    }
    path = "/apis/events.k8s.io/v1/namespaces/kube-system/events"
    status, _, body = request(api.api_port, "POST", path, new_event)
    assert (status, body["metadata"]["namespace"]) == (201, "kube-system")
    status, _, body = request(api.api_port, "POST", path, new_event)
    assert (status, body["reason"]) == (409, "AlreadyExists")
    # The two Event APIs are stored separately.
    assert len(api.list_objects("Event")) == 1
    assert names(api.list_objects("Event.events.k8s.io")) == ["e1"]
    patch = {"series": {"count": 2}}
    status, _, body = request(api.api_port, "PATCH", f"{path}/e1", patch)
    assert (status, body["series"], body["reason"]) == (200, {"count": 2}, "Starting")


def test_admin_api(api: FakeApiServer) -> None:
    status, body = admin(api, "PUT", "/objects", service("a"))
    assert (status, body["metadata"]["resourceVersion"]) == (201, "2")
    assert admin(api, "PUT", "/objects", service("a"))[0] == 200
    status, body = admin(
        api,
        "POST",
        "/apply",
        {
            "put": [node("n1"), endpoint_slice("a-1", "a")],
            "delete": [{"kind": "Service", "namespace": "default", "name": "a"}],
        },
    )
    assert (status, body["resourceVersion"]) == (200, api.resource_version)
    assert admin(api, "GET", "/objects/Service")[1] == {"items": []}
    assert names(admin(api, "GET", "/objects/EndpointSlice")[1]["items"]) == ["a-1"]
    assert admin(api, "GET", "/objects/Node/_/n1")[1]["metadata"]["name"] == "n1"
    assert admin(api, "DELETE", "/objects/Node/_/n1")[0] == 200
    assert admin(api, "DELETE", "/objects/Node/_/n1")[0] == 404
    assert (
        admin(api, "PUT", "/objects", {"kind": "Pod", "apiVersion": "v1", "metadata": {}})[0] == 400
    )
    assert admin(api, "GET", "/nothing")[0] == 404

    api_get(api, "/api/v1/services")
    WatchStream(api.api_port, "/api/v1/nodes?watch=true&timeoutSeconds=1").close()
    _, stats = admin(api, "GET", "/stats")
    assert stats["list_requests"] == 1
    assert stats["watch_requests"] == 1
    assert stats["lists_by_path"] == {"/api/v1/services": 1}
    assert stats["watches_by_path"] == {"/api/v1/nodes": 1}
    assert admin(api, "POST", "/compact")[1]["resourceVersion"] == api.resource_version


def test_discovery(api: FakeApiServer) -> None:
    status, body = api_get(api, "/version")
    assert (status, body["major"]) == (200, "1")
    assert api_get(api, "/api")[1]["versions"] == ["v1"]
    groups = [g["name"] for g in api_get(api, "/apis")[1]["groups"]]
    assert groups == ["discovery.k8s.io", "events.k8s.io", "networking.k8s.io"]
    resources = api_get(api, "/apis/discovery.k8s.io/v1")[1]["resources"]
    assert [r["name"] for r in resources] == ["endpointslices"]
    resources = api_get(api, "/apis/networking.k8s.io/v1")[1]["resources"]
    assert [(r["name"], r["namespaced"]) for r in resources] == [("servicecidrs", False)]


# --------------------------------------------------------------- official client compat


@pytest.fixture
def k8s(api: FakeApiServer, tmp_path: Path) -> Iterator[Any]:
    kubeconfig = tmp_path / "kubeconfig"
    write_kubeconfig(kubeconfig, api.api_url)
    cfg = client.Configuration()
    load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    with client.ApiClient(cfg) as api_client:
        yield api_client


def test_kubernetes_client_lists(api: FakeApiServer, k8s: Any) -> None:
    api.put(service("a"))
    api.put(service("headless", labels={"service.kubernetes.io/headless": ""}))
    api.put(endpoint_slice("a-1", "a"))
    core: Any = client.CoreV1Api(k8s)  # Any: raw responses defy the model stubs
    resp = core.list_service_for_all_namespaces(
        label_selector=KUBE_PROXY_SELECTOR, _preload_content=False, _request_timeout=TIMEOUT
    )
    body = json.loads(resp.data)
    assert names(body["items"]) == ["a"]
    typed = core.list_service_for_all_namespaces(limit=1, _request_timeout=TIMEOUT)
    assert typed.metadata.resource_version == str(api.resource_version)
    assert [s.metadata.name for s in typed.items] == ["a"]
    assert typed.metadata._continue

    discovery: Any = client.DiscoveryV1Api(k8s)
    slices = discovery.list_endpoint_slice_for_all_namespaces(_request_timeout=TIMEOUT)
    assert slices.items[0].endpoints[0].addresses == ["10.244.0.5"]
    assert slices.items[0].ports[0].port == 8080

    api.fail_next("/api/v1/services", 500)
    with pytest.raises(client.ApiException) as err:
        core.list_service_for_all_namespaces(_preload_content=False, _request_timeout=TIMEOUT)
    assert err.value.status == 500


def test_kubernetes_client_raw_watch(api: FakeApiServer, k8s: Any) -> None:
    core: Any = client.CoreV1Api(k8s)  # Any: raw responses defy the model stubs
    rv = core.list_service_for_all_namespaces(_request_timeout=TIMEOUT).metadata.resource_version
    api.put(service("a"))
    resp = core.list_service_for_all_namespaces(
        watch=True,
        resource_version=rv,
        timeout_seconds=2,
        allow_watch_bookmarks=True,
        _preload_content=False,
        _request_timeout=TIMEOUT,
    )
    buffer = b""
    lines: list[Any] = []
    for chunk in resp.stream():
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        lines.extend(json.loads(line) for line in complete)
        if len(lines) == 1:
            api.delete("Service", "default", "a")
    assert buffer == b""
    events = [e for e in lines if e["type"] != "BOOKMARK"]
    assert brief(events) == [("ADDED", "a"), ("DELETED", "a")]
    assert any(e["type"] == "BOOKMARK" for e in lines)


def test_kubernetes_client_watch_helper(api: FakeApiServer, k8s: Any) -> None:
    core: Any = client.CoreV1Api(k8s)  # Any: raw responses defy the model stubs
    rv = core.list_service_for_all_namespaces(_request_timeout=TIMEOUT).metadata.resource_version
    api.put(service("a"))
    seen = [
        (e["type"], e["object"].metadata.name)
        for e in Watch().stream(
            core.list_service_for_all_namespaces, resource_version=rv, timeout_seconds=1
        )
    ]
    assert seen == [("ADDED", "a")]
    api.compact()
    with pytest.raises(client.ApiException) as err:
        for _ in Watch().stream(
            core.list_service_for_all_namespaces, resource_version=rv, timeout_seconds=1
        ):
            pass
    assert err.value.status == 410


def test_kubernetes_client_sees_abrupt_disconnect(api: FakeApiServer, k8s: Any) -> None:
    core: Any = client.CoreV1Api(k8s)  # Any: raw responses defy the model stubs
    resp = core.list_node(watch=True, _preload_content=False, _request_timeout=TIMEOUT)
    wait_for(lambda: api.stats()["open_watches"] == 1)
    api.drop_watches()
    with pytest.raises(urllib3.exceptions.ProtocolError):
        for _ in resp.stream():
            pass


def test_kubernetes_client_creates_events(api: FakeApiServer, k8s: Any) -> None:
    core: Any = client.CoreV1Api(k8s)
    created = core.create_namespaced_event(
        "default",
        {
            "metadata": {"generateName": "kproxy."},
            "involvedObject": {"kind": "Node", "name": "n1"},
            "reason": "Starting",
        },
        _request_timeout=TIMEOUT,
    )
    assert created.metadata.name.startswith("kproxy.")
    assert api.get("Event", "default", created.metadata.name) is not None


# ----------------------------------------------------------------------- command line


def test_load_objects_and_kubeconfig(tmp_path: Path) -> None:
    json_file = tmp_path / "objs.json"
    json_file.write_text(json.dumps({"kind": "List", "items": [service("a"), node("n1")]}))
    assert names(load_objects(json_file)) == ["a", "n1"]
    kubeconfig = tmp_path / "kc"
    write_kubeconfig(kubeconfig, "http://127.0.0.1:1")
    cfg = client.Configuration()
    load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    assert cfg.host == "http://127.0.0.1:1"


def test_command_line(tmp_path: Path) -> None:
    yaml_file = tmp_path / "objs.yaml"
    yaml_file.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: default}\n---\n"
        "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n"
    )
    json_file = tmp_path / "objs.json"
    json_file.write_text(json.dumps([service("b")]))
    ready = tmp_path / "ready.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "tests.fakeapi", "--api-port", "0", "--admin-port", "0"]
    cmd += ["--objects", str(yaml_file), "--objects", str(json_file), "--ready-file", str(ready)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE)
    try:
        wait_for(ready.exists, timeout=15)
        ports = json.loads(ready.read_text())
        status, _, body = request(ports["api_port"], "GET", "/api/v1/services")
        assert (status, names(body["items"])) == (200, ["a", "b"])
        status, _, body = request(ports["admin_port"], "GET", "/objects/Node")
        assert names(body["items"]) == ["n1"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stdout is not None
        assert json.loads(proc.stdout.read()) == ports
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_admin_via_urllib(api: FakeApiServer) -> None:
    """The admin API is plain JSON over HTTP, usable from any client."""
    req = urllib.request.Request(
        f"{api.admin_url}/objects",
        data=json.dumps(service("a")).encode(),
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
        assert resp.status == 201
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{api.admin_url}/objects/Pod", timeout=TIMEOUT)
    assert err.value.code == 400
    err.value.close()
