"""loadBalancerSourceRanges as users write them, in both netfilter modes, traced through the
rules each renders (the nftables Fake refuses overlapping intervals as the kernel does): every
such Service programs, and a client gets in exactly when a range holds it (or, when a range
holds the node, when it is the node using the LB address itself)."""

from __future__ import annotations

import ipaddress
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy import _core
from kproxy.model import Endpoint, EndpointSlice, PortSpec, Service, ServiceKey, SlicePort
from kproxy.tracker import ChangeSet, merge_slices

NODE, NODE_IP, LB_IP = "node-a", "192.168.77.2", "192.168.77.200"
RANGES = [
    "0.0.0.0/0", "0.0.0.0/1", "128.0.0.0/1", "192.168.0.0/16", "192.168.77.0/24",
    "192.168.77.200/32", "192.168.77.128/25", "192.168.77.2/32", "10.0.0.0/8", "10.1.0.0/16",
    "10.1.2.0/24", "203.0.113.0/24", "fd00::/8",
]  # fmt: skip
CLIENTS = ["192.168.77.200", "192.168.77.2", "192.168.77.9", "192.168.77.130", "10.1.2.3",
           "10.9.9.9", "203.0.113.5", "198.51.100.1", "192.168.1.1"]  # fmt: skip


def engine(mode: str) -> _core.Engine:
    cfg = {"family": "IPv4", "node_name": NODE, "cluster_cidrs": ["10.244.0.0/16"],
           "node_ips": [NODE_IP], "backend": "fake", "mode": mode}  # fmt: skip
    return _core.Engine(json.dumps(cfg))


def allowed(src: str, ranges: list[str]) -> bool:
    v4 = [ipaddress.ip_network(r) for r in ranges if ":" not in r]
    ip = ipaddress.ip_address(src)
    if any(ip in n for n in v4):
        return True
    # The node reaching its own LB address may carry that address as its source.
    node = ipaddress.ip_address(NODE_IP)
    return src == LB_IP and any(node in n for n in v4)


@settings(max_examples=60, deadline=None)
@given(
    ranges=st.lists(st.sampled_from(RANGES), min_size=1, max_size=6),
    mode=st.sampled_from(["iptables", "nftables"]),
)
def test_every_range_list_programs_and_admits_exactly_its_clients(
    ranges: list[str], mode: str
) -> None:
    if all(":" in r for r in ranges):
        ranges = [*ranges, "203.0.113.0/24"]  # an IPv4 engine with no IPv4 range is open
    key = ServiceKey("ns", "lb")
    svc = Service(
        key, (PortSpec("p", "TCP", 80, 30080),), cluster_ips=("10.96.0.50",),
        load_balancer_ips=(LB_IP,), load_balancer_source_ranges=tuple(ranges),
        externally_accessible=True,
    )  # fmt: skip
    sl = EndpointSlice("ns", "lb-1", key, "IPv4", (SlicePort("p", "TCP", 8080),),
                       (Endpoint("10.244.1.5", node_name=NODE),))  # fmt: skip
    e = engine(mode)
    e.sync(ChangeSet({key: svc}, {key: merge_slices([sl])}).to_json(), True)
    for src in CLIENTS:
        t = e.trace(_core.Packet(src, LB_IP, "TCP", 80, "external", [NODE_IP]))
        got = t.dnat == ["10.244.1.5:8080"]
        assert got == allowed(src, ranges), (src, ranges, t)
        if not got:
            assert t.verdict == "DROP", (src, ranges, t)
