"""Tests for kproxy.normalize: Kubernetes objects (plain dicts) -> model values.

Upstream semantics (kube-proxy-features.md §1.1): headless and ExternalName Services are not
proxied, LB ingress entries with ``ipMode: Proxy`` are not programmed, endpoints carry their
ready/serving/terminating conditions and topology hints. Anything that could reach rule text is
validated here: a bad object raises InvalidObjectError, a bad item of a list is dropped with a
warning naming its field path.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.errors import InvalidObjectError
from kproxy.model import (
    Endpoint,
    EndpointSlice,
    NodeInfo,
    PortSpec,
    Service,
    ServiceKey,
    SlicePort,
)
from kproxy.normalize import (
    SOURCE_RANGES_ANNOTATION,
    normalize_endpoint_slice,
    normalize_node,
    normalize_service,
)
from tests import k8sobjects as k
from tests.k8sobjects import Obj

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
CLUSTER_IP = "10.96.0.10"

# --------------------------------------------------------------------------------------------
# Helpers


def web(*ports: Obj, cluster_ip: str = CLUSTER_IP, **spec: Any) -> Obj:
    """Service default/web with the given ports (one TCP port 80 named http by default).

    ``spec`` sets (or overrides) fields of the Service's spec.
    """
    obj = k.service("web", cluster_ip, list(ports) or [k.port("http", 80)])
    obj["spec"].update(spec)
    return obj


def with_port(**fields: Any) -> Obj:
    """Service default/web with one port ``http``/80 whose fields are overridden."""
    return web({"name": "http", "port": 80, **fields})


def lb(*ingress: Obj, **spec: Any) -> Obj:
    """A LoadBalancer Service with the given status.loadBalancer.ingress entries."""
    obj = web(k.port("http", 80, node_port=30080), type="LoadBalancer", **spec)
    obj["status"] = {"loadBalancer": {"ingress": list(ingress)}}
    return obj


def annotated(obj: Obj, annotations: dict[str, str]) -> Obj:
    obj["metadata"]["annotations"] = annotations
    return obj


def service_value(obj: Obj) -> Service:
    """The normalized Service, which must exist and come without warnings."""
    n = normalize_service(obj)
    assert n.warnings == ()
    assert n.value is not None
    return n.value


def web_slice(*endpoints: Obj, address_type: str = "IPv4", ports: list[Obj] | None = None) -> Obj:
    return k.endpoint_slice(
        "web-abc12",
        "web",
        list(endpoints),
        [k.slice_port("http", 8080)] if ports is None else ports,
        address_type=address_type,
    )


def slice_value(obj: Obj) -> EndpointSlice:
    n = normalize_endpoint_slice(obj)
    assert n.warnings == ()
    assert n.value is not None
    return n.value


def invalid_service(obj: Obj) -> InvalidObjectError:
    with pytest.raises(InvalidObjectError) as info:
        normalize_service(obj)
    return info.value


# --------------------------------------------------------------------------------------------
# Service: which Services are proxied, and as what


def test_cluster_ip_service() -> None:
    assert service_value(web()) == Service(
        key=ServiceKey("default", "web"),
        ports=(PortSpec("http", "TCP", 80, 0),),
        cluster_ips=(CLUSTER_IP,),
        externally_accessible=False,
        external_traffic_policy="Cluster",
        internal_traffic_policy="Cluster",
        session_affinity_timeout=None,
        health_check_node_port=0,
    )


def test_namespace_defaults_to_default() -> None:
    obj = web()
    del obj["metadata"]["namespace"]
    assert service_value(obj).key == ServiceKey("default", "web")


def test_service_in_other_namespace_keeps_it() -> None:
    obj = k.service("dns", "10.96.0.10", [k.port("dns", 53, "UDP")], namespace="kube-system")
    assert service_value(obj).key == ServiceKey("kube-system", "dns")


@pytest.mark.parametrize("cluster_ip", ["None", ""])
def test_headless_service_is_not_proxied(cluster_ip: str) -> None:
    n = normalize_service(web(cluster_ip=cluster_ip))
    assert n.value is None
    assert n.warnings == ()


def test_service_without_cluster_ip_is_headless() -> None:
    obj = web()
    del obj["spec"]["clusterIP"]
    del obj["spec"]["clusterIPs"]
    assert normalize_service(obj).value is None


def test_external_name_service_is_not_proxied() -> None:
    obj = web(cluster_ip="", type="ExternalName", externalName="db.example.com")
    assert normalize_service(obj).value is None
    # Even with a (stale) cluster IP, ExternalName is DNS only.
    assert normalize_service(web(type="ExternalName")).value is None


def test_dual_stack_cluster_ips_in_order_and_canonical() -> None:
    obj = web()
    obj["spec"]["clusterIPs"] = ["FD00::0001", "10.96.0.10"]
    obj["spec"]["clusterIP"] = "FD00::0001"
    assert service_value(obj).cluster_ips == ("fd00::1", "10.96.0.10")


def test_cluster_ip_alone_is_used_without_cluster_ips() -> None:
    obj = web(cluster_ip="FD00:0:0::A")
    del obj["spec"]["clusterIPs"]
    assert service_value(obj).cluster_ips == ("fd00::a",)


def test_protocol_defaults_to_tcp_and_others_are_kept() -> None:
    obj = web(
        {"name": "a", "port": 80},
        {"name": "b", "port": 53, "protocol": "UDP"},
        {"name": "c", "port": 3868, "protocol": "SCTP"},
    )
    assert service_value(obj).ports == (
        PortSpec("a", "TCP", 80),
        PortSpec("b", "UDP", 53),
        PortSpec("c", "SCTP", 3868),
    )


def test_unnamed_single_port() -> None:
    assert service_value(web({"port": 443})).ports == (PortSpec("", "TCP", 443),)


def test_same_port_name_with_two_protocols() -> None:
    obj = web(k.port("dns", 53, "UDP"), k.port("dns", 53, "TCP"))
    assert service_value(obj).ports == (PortSpec("dns", "UDP", 53), PortSpec("dns", "TCP", 53))


@pytest.mark.parametrize("svc_type", ["NodePort", "LoadBalancer"])
def test_node_port_kept_for_node_port_and_load_balancer(svc_type: str) -> None:
    value = service_value(web(k.port("http", 80, node_port=30080), type=svc_type))
    assert value.ports == (PortSpec("http", "TCP", 80, 30080),)
    assert value.externally_accessible


def test_node_port_dropped_for_cluster_ip() -> None:
    value = service_value(web(k.port("http", 80, node_port=30080)))
    assert value.ports == (PortSpec("http", "TCP", 80, 0),)
    assert not value.externally_accessible


def test_node_port_service_without_allocated_node_port() -> None:
    assert service_value(web(type="NodePort")).ports == (PortSpec("http", "TCP", 80, 0),)


# --------------------------------------------------------------------------------------------
# Service: load balancers, external IPs, policies


def test_load_balancer_ingress_vip_mode_only() -> None:
    value = service_value(
        lb(
            {"ip": "192.0.2.10"},
            {"ip": "192.0.2.11", "ipMode": "VIP"},
            {"ip": "192.0.2.12", "ipMode": "Proxy"},
            {"hostname": "lb.example.com"},
            {"hostname": "lb6.example.com", "ipMode": "VIP"},
            {"ip": "2001:DB8::0010"},
        )
    )
    assert value.load_balancer_ips == ("192.0.2.10", "192.0.2.11", "2001:db8::10")
    assert value.externally_accessible


def test_load_balancer_without_status() -> None:
    value = service_value(web(k.port("http", 80, node_port=30080), type="LoadBalancer"))
    assert value.load_balancer_ips == ()
    assert value.ports == (PortSpec("http", "TCP", 80, 30080),)


def test_bad_load_balancer_ingress_ip_is_dropped_with_warning() -> None:
    n = normalize_service(lb({"ip": "192.0.2.300"}, {"ip": "192.0.2.10"}))
    assert n.value is not None
    assert n.value.load_balancer_ips == ("192.0.2.10",)
    assert len(n.warnings) == 1
    assert "status.loadBalancer.ingress[0].ip" in n.warnings[0]


def test_external_ips_make_a_cluster_ip_service_externally_accessible() -> None:
    value = service_value(web(externalIPs=["198.51.100.7", "2001:DB8::7"]))
    assert value.external_ips == ("198.51.100.7", "2001:db8::7")
    assert value.externally_accessible


def test_bad_external_ips_are_dropped_with_warnings() -> None:
    n = normalize_service(web(externalIPs=["198.51.100.7", "not-an-ip", "fe80::1%eth0", 7]))
    assert n.value is not None
    assert n.value.external_ips == ("198.51.100.7",)
    assert len(n.warnings) == 3
    for i, warning in zip((1, 2, 3), n.warnings, strict=True):
        assert f"spec.externalIPs[{i}]" in warning


def test_external_traffic_policy_local_forced_to_cluster_when_not_externally_accessible() -> None:
    value = service_value(web(externalTrafficPolicy="Local"))
    assert not value.externally_accessible
    assert value.external_traffic_policy == "Cluster"


def test_all_external_ips_invalid_means_not_externally_accessible() -> None:
    n = normalize_service(web(externalIPs=["nope"], externalTrafficPolicy="Local"))
    assert n.value is not None
    assert not n.value.externally_accessible
    assert n.value.external_traffic_policy == "Cluster"
    assert len(n.warnings) == 1


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "NodePort"},
        {"type": "LoadBalancer"},
        {"type": "ClusterIP", "externalIPs": ["198.51.100.7"]},
    ],
)
def test_external_traffic_policy_local_kept_when_externally_accessible(spec: Obj) -> None:
    value = service_value(web(externalTrafficPolicy="Local", **spec))
    assert value.externally_accessible
    assert value.external_traffic_policy == "Local"


@pytest.mark.parametrize(
    ("policy", "expected"),
    [(None, "Cluster"), ("", "Cluster"), ("Cluster", "Cluster"), ("Local", "Local")],
)
def test_internal_traffic_policy(policy: str | None, expected: str) -> None:
    assert service_value(web(internalTrafficPolicy=policy)).internal_traffic_policy == expected


# --------------------------------------------------------------------------------------------
# Service: session affinity and health check node port


def test_no_session_affinity_by_default() -> None:
    assert service_value(web()).session_affinity_timeout is None


def test_session_affinity_none_ignores_its_config() -> None:
    obj = web(sessionAffinity="None", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    assert service_value(obj).session_affinity_timeout is None


@pytest.mark.parametrize(
    "config",
    [None, {}, {"clientIP": None}, {"clientIP": {}}, {"clientIP": {"timeoutSeconds": None}}],
)
def test_client_ip_affinity_defaults_to_10800(config: Obj | None) -> None:
    obj = web(sessionAffinity="ClientIP", sessionAffinityConfig=config)
    assert service_value(obj).session_affinity_timeout == 10800


@pytest.mark.parametrize("timeout", [1, 60, 86400])
def test_client_ip_affinity_timeout_in_bounds(timeout: int) -> None:
    obj = web(
        sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": timeout}}
    )
    assert service_value(obj).session_affinity_timeout == timeout


@pytest.mark.parametrize("timeout", [0, -1, 86401, "60", True, 1.5])
def test_client_ip_affinity_timeout_out_of_bounds(timeout: object) -> None:
    obj = web(
        sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": timeout}}
    )
    err = invalid_service(obj)
    assert err.field == "spec.sessionAffinityConfig.clientIP.timeoutSeconds"


def test_health_check_node_port_for_load_balancer_with_local_policy() -> None:
    value = service_value(lb(externalTrafficPolicy="Local", healthCheckNodePort=31000))
    assert value.health_check_node_port == 31000
    assert value.external_traffic_policy == "Local"


@pytest.mark.parametrize(
    "obj",
    [
        lb(externalTrafficPolicy="Cluster", healthCheckNodePort=31000),
        web(type="NodePort", externalTrafficPolicy="Local", healthCheckNodePort=31000),
        web(externalIPs=["198.51.100.7"], externalTrafficPolicy="Local", healthCheckNodePort=31000),
    ],
    ids=["lb-cluster", "nodeport-local", "externalip-local"],
)
def test_health_check_node_port_only_for_load_balancer_local(obj: Obj) -> None:
    assert service_value(obj).health_check_node_port == 0


def test_bad_health_check_node_port() -> None:
    err = invalid_service(lb(externalTrafficPolicy="Local", healthCheckNodePort=70000))
    assert err.field == "spec.healthCheckNodePort"


# --------------------------------------------------------------------------------------------
# Service: loadBalancerSourceRanges


def test_source_ranges_from_the_field_are_canonical() -> None:
    value = service_value(
        lb(loadBalancerSourceRanges=["10.0.0.0/8", " 192.168.1.7/24 ", "2001:DB8::/32"])
    )
    assert value.load_balancer_source_ranges == ("10.0.0.0/8", "192.168.1.0/24", "2001:db8::/32")


def test_source_ranges_from_the_annotation_when_the_field_is_empty() -> None:
    obj = annotated(lb(), {SOURCE_RANGES_ANNOTATION: "10.0.0.0/8, 172.16.0.0/12"})
    assert service_value(obj).load_balancer_source_ranges == ("10.0.0.0/8", "172.16.0.0/12")


def test_source_ranges_field_wins_over_the_annotation() -> None:
    obj = annotated(
        lb(loadBalancerSourceRanges=["10.0.0.0/8"]), {SOURCE_RANGES_ANNOTATION: "172.16.0.0/12"}
    )
    assert service_value(obj).load_balancer_source_ranges == ("10.0.0.0/8",)


def test_bad_source_range_in_field_is_dropped_with_warning() -> None:
    n = normalize_service(lb(loadBalancerSourceRanges=["10.0.0.0/8", "10.0.0.1", "10.0.0.0/33"]))
    assert n.value is not None
    assert n.value.load_balancer_source_ranges == ("10.0.0.0/8",)
    assert len(n.warnings) == 2
    assert "spec.loadBalancerSourceRanges[1]" in n.warnings[0]
    assert "spec.loadBalancerSourceRanges[2]" in n.warnings[1]


def test_bad_source_range_in_annotation_is_dropped_with_warning() -> None:
    obj = annotated(lb(), {SOURCE_RANGES_ANNOTATION: "10.0.0.0/8,bogus"})
    n = normalize_service(obj)
    assert n.value is not None
    assert n.value.load_balancer_source_ranges == ("10.0.0.0/8",)
    assert len(n.warnings) == 1
    assert f"metadata.annotations[{SOURCE_RANGES_ANNOTATION}][1]" in n.warnings[0]


# --------------------------------------------------------------------------------------------
# Service: whole-object errors


BAD_NAMES = ['we"b', "web'", "we b", "-A", "web\n", "a\nb", "Web", "a" * 64, "web-", "we.b", ""]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_service_name(name: str) -> None:
    err = invalid_service(k.service(name, CLUSTER_IP, [k.port("http", 80)]))
    assert (err.kind, err.namespace, err.name, err.field) == (
        "Service",
        "default",
        name,
        "metadata.name",
    )


def test_longest_service_name_is_accepted() -> None:
    name = "a" * 63
    assert service_value(k.service(name, CLUSTER_IP, [k.port("http", 80)])).key.name == name


@pytest.mark.parametrize("namespace", ["Kube-System", "kube system", "-n", "a" * 64])
def test_bad_namespace(namespace: str) -> None:
    err = invalid_service(k.service("web", CLUSTER_IP, [], namespace=namespace))
    assert (err.kind, err.namespace, err.name, err.field) == (
        "Service",
        namespace,
        "web",
        "metadata.namespace",
    )


def test_missing_name() -> None:
    obj = web()
    del obj["metadata"]["name"]
    assert invalid_service(obj).field == "metadata"


def test_not_an_object() -> None:
    with pytest.raises(InvalidObjectError) as info:
        normalize_service(["not", "a", "service"])  # type: ignore[arg-type]
    assert info.value.kind == "Service"


INVALID_SERVICES = [
    pytest.param(with_port(port=0), "spec.ports[0].port", id="port-0"),
    pytest.param(with_port(port=65536), "spec.ports[0].port", id="port-65536"),
    pytest.param(with_port(port=-1), "spec.ports[0].port", id="port-negative"),
    pytest.param(with_port(port="80"), "spec.ports[0].port", id="port-string"),
    pytest.param(with_port(port=True), "spec.ports[0].port", id="port-bool"),
    pytest.param(with_port(port=80.0), "spec.ports[0].port", id="port-float"),
    pytest.param(with_port(port=None), "spec.ports[0].port", id="port-missing"),
    pytest.param(
        web(k.port("http", 80, node_port=65536), type="NodePort"),
        "spec.ports[0].nodePort",
        id="node-port-65536",
    ),
    pytest.param(with_port(name="HTTP"), "spec.ports[0].name", id="port-name-upper"),
    pytest.param(with_port(name="a" * 64), "spec.ports[0].name", id="port-name-64"),
    pytest.param(with_port(name="a b"), "spec.ports[0].name", id="port-name-space"),
    pytest.param(with_port(name=80), "spec.ports[0].name", id="port-name-int"),
    pytest.param(with_port(protocol="ICMP"), "spec.ports[0].protocol", id="protocol-icmp"),
    pytest.param(with_port(protocol="tcp"), "spec.ports[0].protocol", id="protocol-lower"),
    pytest.param(with_port(protocol=6), "spec.ports[0].protocol", id="protocol-int"),
    pytest.param(web(cluster_ip="10.96.0.256"), "spec.clusterIPs[0]", id="cluster-ip-v4"),
    pytest.param(web(cluster_ip="fe80::1%eth0"), "spec.clusterIPs[0]", id="cluster-ip-zone"),
    pytest.param(web(cluster_ip="010.96.0.10"), "spec.clusterIPs[0]", id="cluster-ip-octal"),
    pytest.param(web(cluster_ip="10.96.0.0/12"), "spec.clusterIPs[0]", id="cluster-ip-cidr"),
    pytest.param(
        web(clusterIPs=[CLUSTER_IP, "fd00::g"]), "spec.clusterIPs[1]", id="cluster-ips-second"
    ),
    pytest.param(web(clusterIP=167772161), "spec.clusterIP", id="cluster-ip-int"),
    pytest.param(web(clusterIPs="10.96.0.10"), "spec.clusterIPs", id="cluster-ips-not-list"),
    pytest.param(
        web(k.port("http", 80), k.port("http", 8080)), "spec.ports[1]", id="duplicate-port"
    ),
    pytest.param(web({"port": 80}, {"port": 81}), "spec.ports[1]", id="duplicate-unnamed"),
    pytest.param(web(type="Foo"), "spec.type", id="bad-type"),
    pytest.param(web(type="clusterip"), "spec.type", id="type-lowercase"),
    pytest.param(web(type=["ClusterIP"]), "spec.type", id="type-list"),
    pytest.param(
        web(type="NodePort", externalTrafficPolicy="Global"),
        "spec.externalTrafficPolicy",
        id="bad-etp",
    ),
    pytest.param(web(internalTrafficPolicy="local"), "spec.internalTrafficPolicy", id="bad-itp"),
    pytest.param(web(ports="80"), "spec.ports", id="ports-not-list"),
    pytest.param(web(ports={"port": 80}), "spec.ports", id="ports-object"),
    pytest.param(web(ports=[80]), "spec.ports[0]", id="port-not-object"),
    pytest.param(web(externalIPs="198.51.100.7"), "spec.externalIPs", id="external-ips-str"),
    pytest.param({"metadata": {"name": "web"}, "spec": "ClusterIP"}, "spec", id="spec-str"),
]


@pytest.mark.parametrize(("obj", "field"), INVALID_SERVICES)
def test_invalid_service(obj: Obj, field: str) -> None:
    err = invalid_service(obj)
    assert (err.kind, err.namespace, err.name, err.field) == ("Service", "default", "web", field)
    assert str(err).startswith(f"Service default/web: {field}: ")


@pytest.mark.parametrize("protocol", [["TCP"], {"name": "UDP"}])
def test_unhashable_protocol_is_an_invalid_object(protocol: object) -> None:
    assert invalid_service(with_port(protocol=protocol)).field == "spec.ports[0].protocol"


# --------------------------------------------------------------------------------------------
# Property: only DNS labels reach a normalized value


NAME_CHARS = "abz09-.A_ \"'`$;%\n\t\u00e9\u0430"
ARBITRARY_NAMES = (
    st.text() | st.text(alphabet=NAME_CHARS, max_size=70) | st.from_regex(DNS_LABEL, fullmatch=True)
)


def assert_dns_label(name: str) -> None:
    assert DNS_LABEL.fullmatch(name) is not None, name
    assert len(name) <= 63


@settings(max_examples=300)
@given(name=ARBITRARY_NAMES)
def test_service_name_is_a_dns_label_or_rejected(name: str) -> None:
    try:
        n = normalize_service(k.service(name, CLUSTER_IP, [k.port("http", 80)]))
    except InvalidObjectError as e:
        assert e.field == "metadata.name"
        return
    assert n.value is not None
    assert_dns_label(n.value.key.name)


@settings(max_examples=300)
@given(name=ARBITRARY_NAMES)
def test_service_port_name_is_a_dns_label_or_rejected(name: str) -> None:
    try:
        n = normalize_service(with_port(name=name))
    except InvalidObjectError as e:
        assert e.field == "spec.ports[0].name"
        return
    assert n.value is not None
    (port,) = n.value.ports
    if name == "":  # an unnamed port, allowed when it is the only one
        assert port.name == ""
    else:
        assert_dns_label(port.name)


@settings(max_examples=300)
@given(port_name=ARBITRARY_NAMES, service_name=ARBITRARY_NAMES)
def test_slice_names_are_dns_labels_or_rejected(port_name: str, service_name: str) -> None:
    obj = k.endpoint_slice(
        "web-abc12", service_name, [k.endpoint("10.0.0.1")], [k.slice_port(port_name, 8080)]
    )
    try:
        n = normalize_endpoint_slice(obj)
    except InvalidObjectError as e:
        assert e.field == "metadata.labels[kubernetes.io/service-name]"
        return
    if n.value is None:  # no service-name label: not managed for a Service
        assert service_name == ""
        return
    assert_dns_label(n.value.service.name)
    if not n.value.ports:  # a bad port name drops that port, with a warning naming it
        assert n.warnings and n.warnings[0].startswith("ports[0].name: ")
        return
    (port,) = n.value.ports
    if port_name:
        assert_dns_label(port.name)
    else:
        assert port.name == ""


# --------------------------------------------------------------------------------------------
# EndpointSlice


def test_endpoint_slice() -> None:
    obj = web_slice(
        k.endpoint("10.0.0.1", node="node-a", zone="zone-a"),
        k.endpoint("10.0.0.2", ready=False, serving=True, terminating=True),
        ports=[k.slice_port("http", 8080), k.slice_port("dns", 53, "UDP")],
    )
    assert slice_value(obj) == EndpointSlice(
        namespace="default",
        name="web-abc12",
        service=ServiceKey("default", "web"),
        family="IPv4",
        ports=(SlicePort("http", "TCP", 8080), SlicePort("dns", "UDP", 53)),
        endpoints=(
            Endpoint("10.0.0.1", True, True, False, node_name="node-a", zone="zone-a"),
            Endpoint("10.0.0.2", ready=False, serving=True, terminating=True),
        ),
    )


def test_endpoint_slice_name_may_be_a_dns_subdomain() -> None:
    obj = web_slice(k.endpoint("10.0.0.1"))
    obj["metadata"]["name"] = "web.abc12"
    assert slice_value(obj).name == "web.abc12"


def test_ipv6_slice_addresses_are_canonical() -> None:
    value = slice_value(web_slice(k.endpoint("FD00::0001"), address_type="IPv6"))
    assert value.family == "IPv6"
    assert [e.ip for e in value.endpoints] == ["fd00::1"]


def test_fqdn_slice_is_not_proxied() -> None:
    obj = web_slice({"addresses": ["db.example.com"]}, address_type="FQDN")
    assert normalize_endpoint_slice(obj).value is None


@pytest.mark.parametrize("labels", [{}, None, {"app": "web"}, {"kubernetes.io/service-name": ""}])
def test_slice_without_service_name_label_is_not_proxied(labels: dict[str, str] | None) -> None:
    obj = web_slice(k.endpoint("10.0.0.1"))
    obj["metadata"]["labels"] = labels
    assert normalize_endpoint_slice(obj).value is None


def test_slice_port_without_number_is_skipped() -> None:
    ports: list[Obj] = [
        {"name": "none", "port": None},
        {"name": "absent"},
        {"name": "http", "port": 8080},
    ]
    assert slice_value(web_slice(k.endpoint("10.0.0.1"), ports=ports)).ports == (
        SlicePort("http", "TCP", 8080),
    )


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        (None, (True, True, False)),
        ({}, (True, True, False)),
        ({"ready": None, "serving": None, "terminating": None}, (True, True, False)),
        ({"ready": False}, (False, False, False)),
        ({"ready": True}, (True, True, False)),
        ({"ready": False, "serving": True, "terminating": True}, (False, True, True)),
        ({"ready": False, "serving": False, "terminating": True}, (False, False, True)),
        ({"terminating": True}, (True, True, True)),
    ],
)
def test_endpoint_condition_defaults(
    conditions: Obj | None, expected: tuple[bool, bool, bool]
) -> None:
    ep: Obj = {"addresses": ["10.0.0.1"]}
    if conditions is not None:
        ep["conditions"] = conditions
    (endpoint,) = slice_value(web_slice(ep)).endpoints
    assert (endpoint.ready, endpoint.serving, endpoint.terminating) == expected


def test_hints_are_sorted_and_deduplicated() -> None:
    ep = k.endpoint("10.0.0.1")
    ep["hints"] = {
        "forZones": [{"name": "zone-b"}, {"name": "zone-a"}, {"name": "zone-b"}, {}, "x"],
        "forNodes": [{"name": "node-2"}, {"name": "node-1"}, {"name": "node-1"}],
    }
    (endpoint,) = slice_value(web_slice(ep)).endpoints
    assert endpoint.zone_hints == ("zone-a", "zone-b")
    assert endpoint.node_hints == ("node-1", "node-2")


def test_no_hints() -> None:
    (endpoint,) = slice_value(web_slice(k.endpoint("10.0.0.1"))).endpoints
    assert (endpoint.zone_hints, endpoint.node_hints) == ((), ())


@pytest.mark.parametrize(
    ("endpoint", "address_type", "path"),
    [
        pytest.param(
            {"addresses": ["10.0.0.300"]}, "IPv4", "endpoints[1].addresses[0]", id="bad-ipv4"
        ),
        pytest.param(
            {"addresses": ["fe80::1%eth0"]}, "IPv6", "endpoints[1].addresses[0]", id="zone-id"
        ),
        pytest.param(
            {"addresses": ["fd00::1"]}, "IPv4", "endpoints[1].addresses[0]", id="v6-in-v4-slice"
        ),
        pytest.param(
            {"addresses": ["10.0.0.9"]}, "IPv6", "endpoints[1].addresses[0]", id="v4-in-v6-slice"
        ),
        pytest.param({"addresses": []}, "IPv4", "endpoints[1].addresses", id="empty-addresses"),
        pytest.param({"conditions": {}}, "IPv4", "endpoints[1].addresses", id="no-addresses"),
        pytest.param(
            {"addresses": "10.0.0.9"}, "IPv4", "endpoints[1].addresses", id="addresses-string"
        ),
        pytest.param("10.0.0.9", "IPv4", "endpoints[1]", id="not-an-object"),
    ],
)
def test_bad_endpoint_is_dropped_with_warning(
    endpoint: object, address_type: str, path: str
) -> None:
    good = "10.0.0.1" if address_type == "IPv4" else "fd00::1"
    obj = web_slice(k.endpoint(good), {}, k.endpoint(good), address_type=address_type)
    obj["endpoints"][1] = endpoint
    n = normalize_endpoint_slice(obj)
    assert n.value is not None
    assert [e.ip for e in n.value.endpoints] == [good, good]
    assert len(n.warnings) == 1
    assert n.warnings[0].startswith(f"{path}: ")


INVALID_SLICES = [
    pytest.param({"metadata": {"name": "Web-abc12"}}, "metadata.name", id="name-upper"),
    pytest.param({"metadata": {"name": "web abc"}}, "metadata.name", id="name-space"),
    pytest.param({"metadata": {"namespace": "Default"}}, "metadata.namespace", id="namespace"),
    pytest.param(
        {"metadata": {"labels": {"kubernetes.io/service-name": "Web"}}},
        "metadata.labels[kubernetes.io/service-name]",
        id="service-label",
    ),
    pytest.param({"ports": [80]}, "ports[0]", id="port-not-object"),
    pytest.param({"ports": "80"}, "ports", id="ports-not-list"),
    pytest.param({"endpoints": {"addresses": ["10.0.0.1"]}}, "endpoints", id="endpoints-object"),
]


@pytest.mark.parametrize(("change", "field"), INVALID_SLICES)
def test_invalid_endpoint_slice(change: Obj, field: str) -> None:
    obj = web_slice(k.endpoint("10.0.0.1"))
    for key, value in change.items():
        if key == "metadata":
            obj["metadata"] = {**obj["metadata"], **value}
        else:
            obj[key] = value
    with pytest.raises(InvalidObjectError) as info:
        normalize_endpoint_slice(obj)
    assert info.value.kind == "EndpointSlice"
    assert info.value.field == field
    assert info.value.name == obj["metadata"]["name"]


BAD_SLICE_PORTS = [
    pytest.param({"name": "http", "port": 0}, "ports[0].port", id="port-0"),
    pytest.param({"name": "http", "port": 65536}, "ports[0].port", id="port-big"),
    pytest.param({"name": "http", "port": "80"}, "ports[0].port", id="port-str"),
    pytest.param({"name": "HTTP", "port": 80}, "ports[0].name", id="port-name"),
    pytest.param({"port": 80, "protocol": "ICMP"}, "ports[0].protocol", id="protocol"),
    pytest.param({"port": 80, "protocol": ["TCP"]}, "ports[0].protocol", id="protocol-list"),
]


@pytest.mark.parametrize(("bad", "field"), BAD_SLICE_PORTS)
def test_a_bad_slice_port_is_dropped_and_the_others_kept(bad: Obj, field: str) -> None:
    obj = web_slice(k.endpoint("10.0.0.1"))
    obj["ports"] = [bad, {"name": "ok", "port": 8080, "protocol": "TCP"}]
    n = normalize_endpoint_slice(obj)
    assert n.value is not None
    assert [(p.name, p.port) for p in n.value.ports] == [("ok", 8080)]
    assert len(n.warnings) == 1 and n.warnings[0].startswith(f"{field}: ")


# --------------------------------------------------------------------------------------------
# Node


def test_node() -> None:
    obj = k.node("node-a", addresses=["192.168.0.10", "FD00::000A"], zone="zone-a")
    obj["spec"]["podCIDRs"] = ["10.244.1.0/24", "fd00:10:244:1::/64"]
    assert normalize_node(obj) == NodeInfo(
        name="node-a",
        zone="zone-a",
        pod_cidrs=("10.244.1.0/24", "fd00:10:244:1::/64"),
        addresses=("192.168.0.10", "fd00::a"),
        terminating=False,
        labels=(("kubernetes.io/hostname", "node-a"), ("topology.kubernetes.io/zone", "zone-a")),
    )


def test_node_without_zone() -> None:
    info = normalize_node(k.node("node-a"))
    assert info.zone is None
    assert info.pod_cidrs == ()
    assert info.addresses == ()


def test_node_pod_cidr_fallback() -> None:
    obj = k.node("node-a")
    obj["spec"]["podCIDR"] = "10.244.1.0/24"
    assert normalize_node(obj).pod_cidrs == ("10.244.1.0/24",)
    obj["spec"]["podCIDRs"] = ["10.244.2.0/24"]
    assert normalize_node(obj).pod_cidrs == ("10.244.2.0/24",)


def test_node_bad_pod_cidrs_are_dropped() -> None:
    obj = k.node("node-a")
    obj["spec"]["podCIDRs"] = ["bogus", "10.244.1.0/24", 7]
    assert normalize_node(obj).pod_cidrs == ("10.244.1.0/24",)


def test_node_addresses_internal_and_external_only() -> None:
    obj = k.node("node-a")
    obj["status"]["addresses"] = [
        {"type": "Hostname", "address": "node-a"},
        {"type": "InternalIP", "address": "192.168.0.10"},
        {"type": "ExternalIP", "address": "203.0.113.10"},
        {"type": "InternalDNS", "address": "node-a.internal"},
        {"type": "InternalIP", "address": "192.168.0.10"},
        {"type": "InternalIP", "address": "not-an-ip"},
        {"type": "InternalIP", "address": "FD00::0A"},
    ]
    assert normalize_node(obj).addresses == ("192.168.0.10", "203.0.113.10", "fd00::a")


def test_node_terminating_when_deleted() -> None:
    obj = k.node("node-a")
    obj["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    assert normalize_node(obj).terminating


def test_node_terminating_when_tainted_for_autoscaler_removal() -> None:
    obj = k.node("node-a")
    obj["spec"]["taints"] = [
        {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"},
        {"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"},
    ]
    assert normalize_node(obj).terminating


def test_node_with_other_taints_is_not_terminating() -> None:
    obj = k.node("node-a")
    obj["spec"]["taints"] = [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]
    assert not normalize_node(obj).terminating


def test_endpoint_slice_trigger_time() -> None:
    obj = web_slice(k.endpoint("10.0.0.1"))
    obj["metadata"]["annotations"] = {
        "endpoints.kubernetes.io/last-change-trigger-time": "2026-11-26T10:00:00Z"
    }
    n = normalize_endpoint_slice(obj)
    assert n.value is not None and n.value.trigger_time == 1795687200.0
    obj["metadata"]["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": "later"}
    n = normalize_endpoint_slice(obj)
    assert n.value is not None and n.value.trigger_time is None


def test_ipvs_scheduler_annotation_is_validated() -> None:
    ann = "kproxy.io/ipvs-scheduler"
    good = web()
    good["metadata"]["annotations"] = {ann: "lc"}
    n = normalize_service(good)
    assert n.value is not None and n.value.ipvs_scheduler == "lc" and not n.warnings
    bad = web()
    bad["metadata"]["annotations"] = {ann: "rr; reboot"}
    n = normalize_service(bad)
    assert n.value is not None and n.value.ipvs_scheduler is None
    assert n.warnings and ann in n.warnings[0] and "not an IPVS scheduler" in n.warnings[0]
