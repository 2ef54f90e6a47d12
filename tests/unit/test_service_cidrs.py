"""ServiceCIDR objects (networking.k8s.io/v1, KEP-1880): what is read of them, how the
controller hands their union to the core, and a cluster that does not serve them."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from kproxy.config import build
from kproxy.control import Controller
from kproxy.errors import InvalidObjectError
from kproxy.k8s import informer
from kproxy.k8s.client import ClientFactory
from kproxy.normalize import normalize_service_cidr
from tests import k8sobjects as k
from tests.fakeapi import FakeApiServer
from tests.unit.test_informer import FAST, Recorder


def test_cidrs_are_read_canonical_and_once() -> None:
    obj = k.service_cidr("kubernetes", ["10.96.0.5/16", "fd00:10:96::/112", "10.96.0.0/16"])
    assert normalize_service_cidr(obj) == ("10.96.0.0/16", "fd00:10:96::/112")
    assert normalize_service_cidr(k.service_cidr("empty", [])) == ()


@pytest.mark.parametrize(
    ("cidrs", "field", "says"),
    [
        (["10.96.0.0/16", "not-a-cidr"], "spec.cidrs[1]", "is not a CIDR"),
        (["10.96.0.1"], "spec.cidrs[0]", "is not a CIDR"),
        (["0.0.0.0/0"], "spec.cidrs[0]", "wider than /8"),
        (["fd00::/48"], "spec.cidrs[0]", "wider than /64"),
    ],
)
def test_a_bad_or_too_wide_cidr_is_refused_naming_the_field(
    cidrs: list[str], field: str, says: str
) -> None:
    with pytest.raises(InvalidObjectError) as e:
        normalize_service_cidr(k.service_cidr("bad", cidrs))
    assert "ServiceCIDR" in str(e.value) and "bad" in str(e.value)
    assert field in str(e.value) and says in str(e.value)


def test_the_controller_hands_over_the_union_when_it_changes() -> None:
    c = Controller("n", wait_for_node=False)
    c.replace("services", [])
    c.replace("endpointslices", [])
    assert c.drain().service_cidrs is None  # none listed yet: nothing to say
    c.replace("servicecidrs", [k.service_cidr("kubernetes", ["10.96.0.0/16"])])
    assert c.drain().service_cidrs == ("10.96.0.0/16",)
    assert c.drain().service_cidrs is None  # handed over: unchanged since
    c.event("servicecidrs", "ADDED", k.service_cidr("extra", ["10.97.0.0/16", "10.96.0.0/16"]))
    cs = c.drain()
    assert cs and cs.service_cidrs == ("10.96.0.0/16", "10.97.0.0/16")
    c.event("servicecidrs", "MODIFIED", k.service_cidr("extra", ["10.96.0.0/16"]))
    assert c.drain().service_cidrs == ("10.96.0.0/16",)
    # Deleting an object whose CIDR another still holds changes nothing.
    c.event("servicecidrs", "DELETED", k.service_cidr("kubernetes", []))
    assert c.drain().service_cidrs is None
    c.event("servicecidrs", "DELETED", k.service_cidr("extra", []))
    cs = c.drain()
    assert cs and cs.service_cidrs == ()  # none left: the set is emptied
    assert b'"service_cidrs":[]' in cs.to_json()


def test_one_being_deleted_still_counts_until_it_is_gone() -> None:
    # Upstream: the allocator stops using a ServiceCIDR once its deletion starts, but the
    # addresses it gave out stay until the object (held by its finalizer) is gone; the
    # proxy's view follows the object, not its deletionTimestamp.
    c = Controller("n", wait_for_node=False)
    c.replace("servicecidrs", [k.service_cidr("kubernetes", ["10.96.0.0/16"])])
    c.drain()
    deleting = k.service_cidr("kubernetes", ["10.96.0.0/16"])
    deleting["metadata"]["deletionTimestamp"] = "2026-12-04T00:00:00Z"
    deleting["metadata"]["finalizers"] = ["networking.k8s.io/service-cidr-finalizer"]
    c.event("servicecidrs", "MODIFIED", deleting)
    assert c.drain().service_cidrs is None
    assert c.all_service_cidrs() == ("10.96.0.0/16",)
    c.event("servicecidrs", "DELETED", deleting)
    assert c.drain().service_cidrs == ()


def test_an_invalid_update_keeps_the_last_valid_cidrs() -> None:
    c = Controller("n", wait_for_node=False)
    c.replace("servicecidrs", [k.service_cidr("kubernetes", ["10.96.0.0/16"])])
    c.drain()
    c.event("servicecidrs", "MODIFIED", k.service_cidr("kubernetes", ["0.0.0.0/0"]))
    assert c.drain().service_cidrs is None
    assert c.all_service_cidrs() == ("10.96.0.0/16",) and c.invalid_objects == 1
    c.resend_all()
    assert c.drain().service_cidrs == ("10.96.0.0/16",)


def test_a_cluster_that_does_not_serve_them_is_said_once_and_retried_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An API path the server does not have: as a cluster before 1.33 answers (404).
    unserved = informer.Resource(
        "servicecidrs", "/apis/networking.k8s.io/v1beta9/servicecidrs", "ServiceCIDRList",
        optional=True,
    )  # fmt: skip
    with FakeApiServer() as api, caplog.at_level(logging.DEBUG, logger="kproxy.k8s.informer"):
        rec, stop = Recorder(), threading.Event()
        inf = informer.Informer(unserved, ClientFactory(None, api.api_url), rec, stop, FAST)
        inf.start()
        try:
            deadline = time.monotonic() + 10
            while inf.errors < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            inf.join(5)
    assert inf.errors >= 3 and rec.replaces == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not served or not allowed" in warnings[0].getMessage()


def test_the_fake_api_server_serves_them() -> None:
    with FakeApiServer() as api:
        api.put(k.service_cidr("kubernetes", ["10.96.0.0/16"]))
        rec, stop = Recorder(), threading.Event()
        res = informer.service_cidrs()
        inf = informer.Informer(res, ClientFactory(None, api.api_url), rec, stop, FAST)
        inf.start()
        try:
            rec.wait(lambda: rec.names == {"kubernetes"})
        finally:
            stop.set()
            api.drop_watches()
            inf.join(5)


@pytest.mark.parametrize(
    ("mode", "gates", "watched"),
    [
        ("nftables", {}, True),
        ("nftables", {"MultiCIDRServiceAllocator": False}, False),
        ("iptables", {}, False),  # upstream's iptables and ipvs modes do not use them
        ("ipvs", {}, False),
    ],
)
def test_only_the_nftables_mode_reads_them(
    mode: str, gates: dict[str, bool], watched: bool
) -> None:
    cfg = build(None, {"mode": mode, "hostname_override": "n", "feature_gates": gates})
    c = Controller.for_config(cfg)
    assert c.watch_service_cidrs is watched
    c.replace("servicecidrs", [k.service_cidr("kubernetes", ["10.96.0.0/16"])])
    assert c.drain().service_cidrs == (("10.96.0.0/16",) if watched else None)


def test_the_tools_snapshot_lists_them_and_goes_on_where_they_are_not_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kproxy import tools

    with FakeApiServer() as api:
        api.put(k.service_cidr("kubernetes", ["10.96.0.0/16"]))
        cfg = build(None, {"mode": "nftables", "hostname_override": "n", "master": api.api_url})
        assert tools.snapshot(cfg).all_service_cidrs() == ("10.96.0.0/16",)
        path = "/apis/networking.k8s.io/v1beta9/servicecidrs"  # a 404, as before 1.33
        unserved = informer.Resource("servicecidrs", path, "ServiceCIDRList", optional=True)
        monkeypatch.setattr(informer, "service_cidrs", lambda: unserved)
        assert tools.snapshot(cfg).all_service_cidrs() == ()
