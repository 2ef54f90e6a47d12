"""The nftables mode's localhost NodePorts as the configuration turns them on, through the
engines that render and trace (no sockets: a dry engine opens no listener): ``localhost`` in
nodePortAddresses gives each family with endpoints a listener on its loopback address, which
``render`` lists and ``trace`` follows; without the keyword, or with the gate off, nothing."""

from __future__ import annotations

import json

import pytest

from kproxy import _core
from kproxy.backends.proxier import engine_config
from kproxy.config import build
from kproxy.model import (
    Endpoint,
    EndpointSlice,
    NodeInfo,
    PortSpec,
    Protocol,
    Service,
    ServiceKey,
    SlicePort,
)
from kproxy.tracker import ChangeSet, Merged, merge_slices

NODE_IP = "192.168.77.2"
WEB, EMPTY = ServiceKey("ns", "web"), ServiceKey("ns", "empty")


def cluster() -> ChangeSet:
    def service(key: ServiceKey, ip: str, node_port: int) -> Service:
        ports = (PortSpec("p", "TCP", 80, node_port), PortSpec("d", "UDP", 53, node_port))
        return Service(key, ports, cluster_ips=(ip,), externally_accessible=True)

    ports = (SlicePort("p", "TCP", 8080), SlicePort("d", "UDP", 5353))
    ep = Endpoint("10.244.1.5", node_name="node-a")
    web: Merged = merge_slices([EndpointSlice("ns", "web-1", WEB, "IPv4", ports, (ep,))])
    services: dict[ServiceKey, Service | None] = {
        WEB: service(WEB, "10.96.0.10", 30080),
        EMPTY: service(EMPTY, "10.96.0.20", 30081),
    }
    return ChangeSet(services, {WEB: web})


def engine(**given: object) -> _core.Engine:
    cfg = build(None, {"mode": "nftables", "hostname_override": "node-a", **given})
    node = NodeInfo("node-a", addresses=(NODE_IP,))
    wire = engine_config(cfg, "IPv4", node, backend="fake", local_addrs=[NODE_IP, "127.0.0.1"])
    e = _core.Engine(json.dumps(wire))
    e.sync(cluster().to_json(), True)
    return e


def from_node(e: _core.Engine, dst: str, port: int, protocol: Protocol = "TCP") -> _core.Trace:
    return e.trace(_core.Packet("127.0.0.1", dst, protocol, port, "local", [NODE_IP]))


def test_localhost_lists_and_traces_the_tcp_nodeports_with_endpoints() -> None:
    e = engine(nodeport_addresses=("primary", "localhost"))
    rendered = e.render()
    assert "# tcp 127.0.0.1:30080 -> 10.244.1.5:8080 (ns/web:p)" in rendered
    listeners = rendered.split("# localhost NodePorts")[1]
    assert "30081" not in listeners, "no listener without endpoints"
    t = from_node(e, "127.0.0.1", 30080)
    assert (t.dnat, t.verdict) == (["10.244.1.5:8080"], None), t.matched
    t = from_node(e, "127.0.0.1", 30081)
    assert (t.verdict, t.reason) == ("REJECT", "no-endpoints"), t.matched
    # UDP is the table's (and the table leaves loopback alone).
    assert from_node(e, "127.0.0.1", 30080, "UDP").dnat == []
    # The primary address is still the table's, as before.
    assert from_node(e, NODE_IP, 30080).dnat == ["10.244.1.5:8080"]


@pytest.mark.parametrize(
    "given",
    [
        {"nodeport_addresses": ("primary",)},
        {},
        {
            "nodeport_addresses": ("localhost",),
            "feature_gates": {"KubeProxyNFTablesLocalhostNodePorts": False},
        },
    ],
    ids=["primary", "default", "gate-off"],
)
def test_no_localhost_nodeports_unless_named_with_the_gate_on(given: dict[str, object]) -> None:
    e = engine(**given)
    assert "localhost NodePorts" not in e.render()
    assert from_node(e, "127.0.0.1", 30080).dnat == []
