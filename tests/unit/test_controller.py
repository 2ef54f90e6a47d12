"""The controller: replace-diffing, skip labels, invalid objects, initialization gating."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from kproxy.control import Controller
from kproxy.model import ServiceKey
from tests import k8sobjects as k

NODE = "node-a"


def svc(name: str, ip: str = "10.96.0.1", **kw: Any) -> dict[str, Any]:
    return k.service(name, ip, [k.port("http", 80)], **kw)


def controller(wait_for_node: bool = True) -> tuple[Controller, list[int]]:
    calls: list[int] = []
    return Controller(NODE, lambda resource: calls.append(1), wait_for_node=wait_for_node), calls


def test_nothing_is_initialized_until_every_list_arrived() -> None:
    c, _ = controller()
    c.replace("services", [svc("a")])
    c.replace("endpointslices", [])
    assert not c.initialized
    c.replace("nodes", [k.node(NODE)])
    assert c.initialized
    c2, _ = controller(wait_for_node=False)
    c2.replace("services", [])
    assert not c2.initialized
    c2.replace("endpointslices", [])
    assert c2.initialized


def test_replace_deletes_what_vanished_while_unwatched() -> None:
    c, calls = controller()
    c.replace("services", [svc("a"), svc("b", "10.96.0.2")])
    c.replace(
        "endpointslices",
        [k.endpoint_slice("a-1", "a", [k.endpoint("10.0.0.1")], [k.slice_port("http", 80)])],
    )
    first = c.drain()
    assert set(first.services) == {ServiceKey("default", "a"), ServiceKey("default", "b")}
    c.replace("services", [svc("a")])
    c.replace("endpointslices", [])
    cs = c.drain()
    assert cs.services == {ServiceKey("default", "b"): None}
    assert cs.endpoints == {ServiceKey("default", "a"): ()}
    assert calls  # every replace asks for a sync


def test_events_update_and_delete() -> None:
    c, _ = controller()
    c.event("services", "ADDED", svc("a"))
    assert c.drain().services[ServiceKey("default", "a")] is not None
    c.event("services", "MODIFIED", svc("a"))  # same content: a no-op
    assert not c.drain()
    c.event("services", "DELETED", svc("a"))
    assert c.drain().services == {ServiceKey("default", "a"): None}


@pytest.mark.parametrize(
    "label", ["service.kubernetes.io/service-proxy-name", "service.kubernetes.io/headless"]
)
def test_objects_with_skip_labels_are_not_proxied(label: str) -> None:
    c, _ = controller()
    c.event("services", "ADDED", svc("a"))
    c.drain()
    c.event("services", "MODIFIED", svc("a", labels={label: "other"}))
    assert c.drain().services == {ServiceKey("default", "a"): None}


def test_invalid_update_keeps_the_last_valid_version_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    c, _ = controller()
    c.event("services", "ADDED", svc("a"))
    good = c.drain().services[ServiceKey("default", "a")]
    bad = svc("a")
    bad["spec"]["ports"][0]["port"] = 0
    with caplog.at_level(logging.ERROR):
        c.event("services", "MODIFIED", bad)
        c.replace("services", [bad])  # a relist sees the same bad object again
    assert not c.drain().services  # nothing changes: the valid version stays programmed
    assert c.services.get(ServiceKey("default", "a")) == good
    errors = [r for r in caplog.records if "default/a" in r.getMessage()]
    assert len(errors) == 1 and "spec.ports[0].port" in errors[0].getMessage()
    assert c.invalid_objects == 2
    c.event("services", "DELETED", bad)  # deletions always apply
    assert c.drain().services == {ServiceKey("default", "a"): None}


def test_item_warnings_are_logged_once_per_object(caplog: pytest.LogCaptureFixture) -> None:
    c, _ = controller()
    o = svc("a", externalIPs=["1.2.3.4", "not-an-ip"])
    with caplog.at_level(logging.WARNING):
        c.event("services", "ADDED", o)
        c.event("services", "MODIFIED", o)
    lines = [r.getMessage() for r in caplog.records if "not-an-ip" in r.getMessage()]
    assert len(lines) == 1 and "spec.externalIPs[1]" in lines[0]
    assert c.drain().services[ServiceKey("default", "a")].external_ips == ("1.2.3.4",)  # type: ignore[union-attr]


def test_node_zone_changes_are_handed_over_other_nodes_ignored() -> None:
    c, _ = controller()
    c.replace("nodes", [k.node("someone-else", zone="z9")])
    assert c.node is None
    c.replace("nodes", [k.node(NODE, zone="z1")])
    assert c.drain().node is not None
    c.event("nodes", "MODIFIED", k.node(NODE, zone="z1"))
    assert c.drain().node is None  # unchanged topology: nothing to hand over
    c.event("nodes", "MODIFIED", k.node(NODE, zone="z2"))
    node = c.drain().node
    assert node is not None and node.zone == "z2"


def test_a_service_over_the_destination_limit_is_skipped_and_keeps_its_last_version(
    caplog: pytest.LogCaptureFixture,
) -> None:
    c = Controller(NODE, wait_for_node=False, max_service_destinations=1_000)
    ports = [k.port(f"p{i}", 1000 + i) for i in range(40)]
    ok = k.service("a", "10.96.0.1", ports, externalIPs=[f"192.0.2.{i}" for i in range(20)])
    c.event("services", "ADDED", ok)  # 40 x 21 = 840 destinations
    good = c.drain().services[ServiceKey("default", "a")]
    hostile = k.service("a", "10.96.0.1", ports, externalIPs=[f"192.0.2.{i}" for i in range(30)])
    with caplog.at_level(logging.ERROR):
        c.event("services", "MODIFIED", hostile)  # 40 x 31 = 1,240
        c.event("services", "ADDED", k.service("b", "10.96.0.2", ports[:1]))
    assert c.drain().services == {
        ServiceKey("default", "b"): c.services.get(ServiceKey("default", "b"))
    }
    assert c.services.get(ServiceKey("default", "a")) == good
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    (line,) = [r.getMessage() for r in errors if "default/a" in r.getMessage()]
    assert "1240 destinations, over the limit of 1000" in line and "spec.ports" in line
    unlimited = Controller(NODE, wait_for_node=False, max_service_destinations=0)
    unlimited.event("services", "ADDED", hostile)
    assert ServiceKey("default", "a") in unlimited.drain().services
