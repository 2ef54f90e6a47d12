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
from kproxy.errors import ConfigError
from kproxy.model import ServiceKey
from kproxy.v1alpha1 import gate_warnings
from tests import k8sobjects as k

NODE = "node-a"
EXTERNAL = "198.51.100.7"


def svc(**spec: Any) -> k.Obj:
    spec.setdefault("externalIPs", [EXTERNAL])
    return k.service("web", "10.96.0.10", [k.port("http", 80)], **spec)


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


def test_the_allow_list_keeps_external_ips_inside_its_cidrs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = build(
        None,
        {"hostname_override": NODE, "external_ip_cidrs": ("203.0.113.0/24", "2001:db8::/64")},
    )
    c = Controller.for_config(cfg)
    ips = ["203.0.113.5", EXTERNAL, "2001:db8::5", "2001:db9::5"]
    with caplog.at_level(logging.WARNING):
        c.event("services", "ADDED", svc(externalIPs=ips))
    value = c.drain().services[ServiceKey("default", "web")]
    assert value is not None and value.external_ips == ("203.0.113.5", "2001:db8::5")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"spec.externalIPs[1]: {EXTERNAL} is outside the allowed CIDRs" in text
    assert "spec.externalIPs[3]: 2001:db9::5 is outside the allowed CIDRs" in text


@pytest.mark.parametrize("mode", ["iptables", "nftables", "ipvs"])
def test_an_external_ip_outside_the_allow_list_is_rendered_nowhere(mode: str) -> None:
    objects = [svc(externalIPs=["203.0.113.5", EXTERNAL]), endpoints()]
    cluster = api.Cluster.from_objects(
        objects, node=NODE, mode=mode, external_ip_cidrs=("203.0.113.0/24",)
    )
    rendered = cluster.render()["IPv4"]
    assert "203.0.113.5" in rendered and EXTERNAL not in rendered


def test_a_bad_allow_list_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--external-ip-cidrs: 'nope' is not a CIDR"):
        build(None, {"external_ip_cidrs": ("nope",)})


def test_kproxys_own_command_takes_the_gate_as_kube_proxy_does() -> None:
    from kproxy.commands import flags, make_parser

    args = make_parser().parse_args(
        ["render", "--feature-gates", f"{ALLOW_EXTERNAL_IPS}=false,Other=true"]
    )
    cfg = flags.load_config(args)
    assert cfg.feature_gates == {ALLOW_EXTERNAL_IPS: False, "Other": True}
    with pytest.raises(SystemExit):
        make_parser().parse_args(["render", "--feature-gates", ALLOW_EXTERNAL_IPS])
