"""The AllowServiceExternalIPs feature gate (KEP-5707): on (the default), externalIPs are
programmed and their deprecation is said once per Service; off, they are not programmed, in
any mode, and everything else of the Service is."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from kproxy import api
from kproxy.config import build
from kproxy.control import ALLOW_EXTERNAL_IPS, Controller
from kproxy.model import ServiceKey
from kproxy.v1alpha1 import gate_warnings
from tests import k8sobjects as k

NODE = "node-a"
EXTERNAL = "198.51.100.7"


def svc(**spec: Any) -> k.Obj:
    return k.service("web", "10.96.0.10", [k.port("http", 80)], externalIPs=[EXTERNAL], **spec)


def endpoints() -> k.Obj:
    return k.endpoint_slice(
        "web-1", "web", [k.endpoint("10.244.1.2", node=NODE)], [k.slice_port("http", 8080)]
    )


def controller(gate: bool | None) -> Controller:
    gates = {} if gate is None else {ALLOW_EXTERNAL_IPS: gate}
    cfg = build(None, {"hostname_override": NODE, "feature_gates": gates})
    return Controller.for_config(cfg)


def test_on_by_default_the_external_ips_are_programmed_and_the_deprecation_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    c = controller(None)
    with caplog.at_level(logging.WARNING):
        c.event("services", "ADDED", svc())
        c.event("services", "MODIFIED", svc(sessionAffinity="ClientIP"))
    value = c.drain().services[ServiceKey("default", "web")]
    assert value is not None and value.external_ips == (EXTERNAL,)
    notes = [r.getMessage() for r in caplog.records if "KEP-5707" in r.getMessage()]
    assert len(notes) == 1 and "Service default/web" in notes[0], notes
    # Dropped and given again: said again.
    c.event("services", "MODIFIED", k.service("web", "10.96.0.10", [k.port("http", 80)]))
    with caplog.at_level(logging.WARNING):
        c.event("services", "MODIFIED", svc())
    assert len([r for r in caplog.records if "KEP-5707" in r.getMessage()]) == 2


def test_off_the_external_ips_are_not_programmed_and_the_rest_is(
    caplog: pytest.LogCaptureFixture,
) -> None:
    c = controller(False)
    with caplog.at_level(logging.WARNING):
        c.event("services", "ADDED", svc())
    value = c.drain().services[ServiceKey("default", "web")]
    assert value is not None and value.external_ips == ()
    assert value.cluster_ips == ("10.96.0.10",)
    lines = [r.getMessage() for r in caplog.records]
    assert any("spec.externalIPs: not programmed" in ln for ln in lines), lines
    assert not any("KEP-5707" in ln for ln in lines), lines


@pytest.mark.parametrize("mode", ["iptables", "nftables", "ipvs"])
def test_off_no_mode_renders_the_external_ip(mode: str) -> None:
    objects = [svc(), endpoints()]
    on = api.Cluster.from_objects(objects, node=NODE, mode=mode)
    off = api.Cluster.from_objects(
        objects, node=NODE, mode=mode, feature_gates={ALLOW_EXTERNAL_IPS: False}
    )
    assert EXTERNAL in on.render()["IPv4"]
    rendered = off.render()["IPv4"]
    assert EXTERNAL not in rendered and "10.96.0.10" in rendered


def test_the_gate_is_read_so_setting_it_is_not_warned() -> None:
    assert gate_warnings({ALLOW_EXTERNAL_IPS: False}, "--feature-gates") == []
