"""Change trackers: no-op updates dropped, slices merged deterministically."""

from __future__ import annotations

import json

from kproxy.model import Endpoint, EndpointSlice, PortSpec, Service, ServiceKey, SlicePort
from kproxy.tracker import ChangeSet, EndpointsTracker, ServiceTracker, merge_slices

KEY = ServiceKey("ns", "svc")


def svc(port: int = 80) -> Service:
    return Service(KEY, (PortSpec("http", "TCP", port),), cluster_ips=("10.96.0.1",))


def sl(name: str, *eps: Endpoint, port: int = 8080, service: str = "svc") -> EndpointSlice:
    return EndpointSlice(
        "ns", name, ServiceKey("ns", service), "IPv4", (SlicePort("http", "TCP", port),), eps
    )


def test_service_updates_that_change_nothing_are_dropped() -> None:
    t = ServiceTracker()
    t.update(KEY, svc())
    assert t.drain() == {KEY: svc()}
    assert not t.update(KEY, svc())  # equal value: nothing owed
    assert t.drain() == {}
    t.update(KEY, svc(81))
    t.update(KEY, svc())  # changed back before a sync: nothing owed
    assert t.pending == 0
    assert t.drain() == {}


def test_add_then_delete_before_a_sync_costs_nothing() -> None:
    t = ServiceTracker()
    t.update(KEY, svc())
    t.update(KEY, None)
    assert t.drain() == {}


def test_delete_after_sync_is_reported() -> None:
    t = ServiceTracker()
    t.update(KEY, svc())
    t.drain()
    t.update(KEY, None)
    assert t.drain() == {KEY: None}


def test_resend_all_carries_everything_again() -> None:
    t = ServiceTracker()
    other = ServiceKey("ns", "other")
    t.update(KEY, svc())
    t.update(other, svc())
    t.drain()
    t.update(other, None)
    t.resend_all()
    assert t.drain() == {KEY: svc(), other: None}


def test_merge_dedupes_and_prefers_ready() -> None:
    a = sl("a", Endpoint("10.0.0.2", ready=False, serving=False), Endpoint("10.0.0.1"))
    b = sl("b", Endpoint("10.0.0.2"), Endpoint("10.0.0.3"))
    merged = merge_slices([b, a])
    assert merged == merge_slices([a, b])  # order of arrival does not matter
    (port,) = merged
    assert [(e.ip, e.ready, p) for e, p in port.endpoints] == [
        ("10.0.0.1", True, 8080),
        ("10.0.0.2", True, 8080),
        ("10.0.0.3", True, 8080),
    ]


def test_a_reused_ip_belongs_to_the_new_pod_not_the_terminating_one() -> None:
    # upstream #135266: the old pod (terminating, still serving) and the new one that was
    # given its IP, in one slice or two, in either order.
    old = Endpoint("10.0.0.2", ready=False, serving=True, terminating=True, node_name="n1")
    starting = Endpoint("10.0.0.2", ready=False, serving=False, node_name="n2")
    ready = Endpoint("10.0.0.2", node_name="n2")
    for new in (starting, ready):
        for slices in ([sl("a", old, new)], [sl("a", new, old)], [sl("a", old), sl("b", new)],
                       [sl("a", new), sl("b", old)]):  # fmt: skip
            ((port_eps,),) = [p.endpoints for p in merge_slices(slices)]
            assert port_eps == (new, 8080), (new, slices)


def test_endpoints_tracker_merges_per_service_and_drops_no_ops() -> None:
    t = EndpointsTracker()
    t.update("ns", "a", sl("a", Endpoint("10.0.0.1")))
    t.update("ns", "b", sl("b", Endpoint("10.0.0.2")))
    first = t.drain()
    assert [e.ip for e, _ in first[KEY][0].endpoints] == ["10.0.0.1", "10.0.0.2"]
    assert not t.update("ns", "a", sl("a", Endpoint("10.0.0.1")))  # identical slice
    assert t.drain() == {}
    t.update("ns", "b", None)
    assert [e.ip for e, _ in t.drain()[KEY][0].endpoints] == ["10.0.0.1"]
    t.update("ns", "a", None)
    assert t.drain() == {KEY: ()}  # no endpoints left


def test_a_slice_moving_to_another_service_updates_both() -> None:
    t = EndpointsTracker()
    t.update("ns", "a", sl("a", Endpoint("10.0.0.1")))
    t.drain()
    t.update("ns", "a", sl("a", Endpoint("10.0.0.1"), service="other"))
    out = t.drain()
    assert out[KEY] == ()
    assert out[ServiceKey("ns", "other")][0].endpoints[0][0].ip == "10.0.0.1"


def test_change_set_wire_format_matches_the_core() -> None:
    t = ServiceTracker()
    t.update(KEY, svc())
    e = EndpointsTracker()
    e.update("ns", "a", sl("a", Endpoint("10.0.0.1", node_name="n1", zone_hints=("z",))))
    cs = ChangeSet(t.drain(), e.drain())
    wire = json.loads(cs.to_json())
    assert wire["services"][0] == {
        "namespace": "ns",
        "name": "svc",
        "service": svc().to_wire(),
    }
    ep = wire["endpoints"][0]["ports"][0]["endpoints"][0]
    assert ep == {
        "ip": "10.0.0.1",
        "port": 8080,
        "ready": True,
        "serving": True,
        "terminating": False,
        "node_name": "n1",
        "zone_hints": ["z"],
        "node_hints": [],
    }
    assert bool(cs) and not bool(ChangeSet())


def test_trigger_times_are_taken_once_oldest_first() -> None:
    t = EndpointsTracker()
    t.update("ns", "a", EndpointSlice("ns", "a", KEY, "IPv4", (), (), trigger_time=200.0))
    t.update("ns", "b", EndpointSlice("ns", "b", KEY, "IPv4", (), (), trigger_time=100.0))
    assert t.take_triggers() == {KEY: 100.0}
    assert t.take_triggers() == {}
