"""Events reach the API server (events.k8s.io/v1) with upstream's reasons."""

from __future__ import annotations

from kproxy.k8s.client import ClientFactory
from kproxy.k8s.events import Recorder, event
from tests.fakeapi import FakeApiServer


def test_events_are_written() -> None:
    with FakeApiServer() as api:
        rec = Recorder(ClientFactory(None, api.api_url), "node-a")
        regarding = {"kind": "Node", "name": "node-a", "apiVersion": "v1"}
        assert rec.post(
            event("Starting", "Starting kproxy.", regarding, node="node-a", action="Start")
        )
        (ev,) = api.list_objects("Event.events.k8s.io")
        assert ev["reason"] == "Starting" and ev["regarding"]["name"] == "node-a"
        assert ev["reportingController"] == "kproxy" and ev["type"] == "Normal"


def test_an_unreachable_api_server_is_not_fatal() -> None:
    rec = Recorder(ClientFactory(None, "http://127.0.0.1:1"), "node-a")
    regarding = {"kind": "Node", "name": "node-a", "apiVersion": "v1"}
    assert not rec.post(event("Starting", "x", regarding, node="node-a", action="Start"))
    assert rec.failed == 1
