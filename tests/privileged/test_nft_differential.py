"""The nftables Fake against the kernel: the same generated transactions go to both, and they
must accept and refuse alike and end up holding the same table.

The transactions are drawn from small pools of addresses, ranges, ports and names, so that
they collide often: overlapping, nested and duplicate intervals in the interval sets (the
class of `loadBalancerSourceRanges` that once stopped every sync, and the ServiceCIDRs'
prefixes), elements that do not fit their set's type, elements and rules that name missing
chains, and chains and sets still in use.
Most transactions carry an interval-set element, so they go through `nft -f`; the others go
over netlink, as kproxy's small element updates do."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kproxy import _core, netns
from kproxy.errors import KproxyError
from tests.netlab import netlab_unavailable_reason

pytestmark = pytest.mark.privileged

Op = dict[str, Any]

# The table every example starts from: kproxy's set names and shapes, one of each kind (the
# kernel's table is read back by name).
SETUP: list[Op] = [
    {"op": "add_table"},
    {"op": "delete_table"},
    {"op": "add_table"},
    {"op": "add_set", "name": "firewall-allow", "spec": "AddrProtoPortSaddr", "interval": True},
    {"op": "add_set", "name": "cluster-ips", "spec": "Addr"},
    {"op": "add_set", "name": "service-cidrs", "spec": "Addr", "interval": True},
    {"op": "add_set", "name": "service-nodeports", "spec": "ProtoPortVerdict"},
    {"op": "add_set", "name": "nodeport-endpoints-2", "spec": "ProtoPortIndexDnat"},
    {"op": "add_chain", "name": "a"},
    {"op": "add_chain", "name": "b"},
    {"op": "add_jump", "chain": "a", "target": "b"},
    {"op": "add_lookup", "chain": "a", "set": "firewall-allow", "spec": "AddrProtoPortSaddr"},
]

lb_addr = st.sampled_from(["192.168.77.200", "203.0.113.7"])
source = st.sampled_from(
    [
        "0.0.0.0/0", "0.0.0.0/1", "128.0.0.0/1", "192.168.0.0/16", "192.168.77.0/24",
        "192.168.77.200/32", "192.168.77.200", "192.168.77.128/25", "10.0.0.0/8",
        "10.0.0.0/24", "10.0.1.0/24", "10.1.0.0/16", "203.0.113.0/24",
    ]
)  # fmt: skip
proto = st.sampled_from(["TCP", "UDP"])
port = st.sampled_from([80, 443])
chain = st.sampled_from(["a", "b", "c", "gone"])


def value(s: str) -> dict[str, str]:
    return {"cidr": s} if "/" in s else {"addr": s}


fw_key = st.builds(
    lambda ip, p, n, src: [{"addr": ip}, {"proto": p}, {"port": n}, value(src)],
    lb_addr, proto, port, source,
)  # fmt: skip
ips_key = st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::1", "10.9.0.0/16"]).map(
    lambda s: [value(s)]
)
# The ServiceCIDRs' interval set: nested, adjacent and other-family prefixes.
cidr_key = st.sampled_from(
    ["10.96.0.0/12", "10.96.0.0/16", "10.97.0.0/16", "10.96.5.0/24", "10.96.0.1", "fd00::/108"]
).map(lambda s: [value(s)])
vm_key = st.builds(lambda p, n: [{"proto": p}, {"port": n}], proto, port)
verdict = st.one_of(st.just("drop"), chain.map(lambda c: {"goto": c}))
pool_key = st.builds(
    lambda p, n, i: [{"proto": p}, {"port": n}, {"int": i}], proto, port, st.integers(0, 1)
)
dnat = st.builds(
    lambda ip, n: {"dnat": [ip, n]}, st.sampled_from(["10.1.0.1", "10.1.0.2", "fd00::5"]),
    st.sampled_from([8080, 53]),
)  # fmt: skip


def elements(key: st.SearchStrategy[Any], data: st.SearchStrategy[Any] | None) -> Any:
    if data is None:
        return st.lists(key.map(lambda k: {"key": k}), min_size=1, max_size=3)
    return st.lists(
        st.builds(lambda k, d: {"key": k, "data": d}, key, data), min_size=1, max_size=3
    )


# A range of the other family: nft refuses it (the renderer filters ranges by family).
V6_KEY = [{"addr": "203.0.113.7"}, {"proto": "TCP"}, {"port": 80}, {"cidr": "fd00::/8"}]
V6_RANGE: Op = {"op": "add_elements", "set": "firewall-allow", "elements": [{"key": V6_KEY}]}
fw_add = elements(fw_key, None).map(
    lambda e: {"op": "add_elements", "set": "firewall-allow", "elements": e}
)
# Interval-set additions dominate: overlaps need several of them in one example.
op: st.SearchStrategy[Op] = st.one_of(
    fw_add,
    fw_add,
    fw_add,
    fw_add,
    st.just(V6_RANGE),
    st.lists(fw_key, min_size=1, max_size=2).map(
        lambda k: {"op": "delete_elements", "set": "firewall-allow", "keys": k}
    ),
    elements(ips_key, None).map(
        lambda e: {"op": "add_elements", "set": "cluster-ips", "elements": e}
    ),
    st.lists(ips_key, min_size=1, max_size=2).map(
        lambda k: {"op": "delete_elements", "set": "cluster-ips", "keys": k}
    ),
    elements(cidr_key, None).map(
        lambda e: {"op": "add_elements", "set": "service-cidrs", "elements": e}
    ),
    st.lists(cidr_key, min_size=1, max_size=2).map(
        lambda k: {"op": "delete_elements", "set": "service-cidrs", "keys": k}
    ),
    elements(vm_key, verdict).map(
        lambda e: {"op": "add_elements", "set": "service-nodeports", "elements": e}
    ),
    st.lists(vm_key, min_size=1, max_size=1).map(
        lambda k: {"op": "delete_elements", "set": "service-nodeports", "keys": k}
    ),
    elements(pool_key, dnat).map(
        lambda e: {"op": "add_elements", "set": "nodeport-endpoints-2", "elements": e}
    ),
    chain.map(lambda c: {"op": "add_chain", "name": c}),
    chain.map(lambda c: {"op": "flush_chain", "name": c}),
    chain.map(lambda c: {"op": "delete_chain", "name": c}),
    st.builds(lambda c, t: {"op": "add_jump", "chain": c, "target": t}, chain, chain),
    st.sampled_from(
        [
            {"op": "add_lookup", "chain": "c", "set": "cluster-ips", "spec": "Addr"},
            {"op": "add_lookup", "chain": "c", "set": "service-cidrs", "spec": "Addr"},
            {
                "op": "add_lookup",
                "chain": "b",
                "set": "service-nodeports",
                "spec": "ProtoPortVerdict",
            },
            {"op": "delete_set", "name": "cluster-ips"},
            {"op": "delete_set", "name": "service-nodeports"},
            {"op": "add_set", "name": "cluster-ips", "spec": "Addr"},
            {"op": "add_set", "name": "cluster-ips", "spec": "AddrProtoPort"},
        ]
    ),
)
transactions = st.lists(st.lists(op, min_size=1, max_size=2), min_size=1, max_size=5)


@pytest.fixture(scope="module")
def kernel() -> Iterator[tuple[netns.NetnsExecutor, _core.NftScratch]]:
    reason = netlab_unavailable_reason()
    if reason is not None:
        pytest.skip(f"netlab unavailable: {reason}")
    with netns.scratch() as name, netns.NetnsExecutor(name) as ex:
        yield ex, ex.call(functools.partial(_core.NftScratch, "IPv4", True))


def outcome(apply: Any, tx: list[Op]) -> str | None:
    """None when the transaction went in, else the refusal's first line."""
    try:
        apply(json.dumps(tx))
    except KproxyError as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(txs=transactions)
def test_the_fake_accepts_and_refuses_what_the_kernel_does(
    kernel: tuple[netns.NetnsExecutor, _core.NftScratch], txs: list[list[Op]]
) -> None:
    ex, real = kernel
    fake = _core.NftScratch("IPv4")
    fake.apply(json.dumps(SETUP))
    ex.call(functools.partial(real.apply, json.dumps(SETUP)))
    for i, tx in enumerate(txs):
        want = outcome(lambda s: ex.call(functools.partial(real.apply, s)), tx)
        got = outcome(fake.apply, tx)
        assert (got is None) == (want is None), (
            f"transaction {i} {json.dumps(tx)}: kernel {want or 'accepted'}, "
            f"fake {got or 'accepted'}"
        )
        event(f"kernel refused: {want.rpartition('Error: ')[2][:40]}" if want else "accepted")
        assert fake.lines() == ex.call(real.lines), f"after transaction {i}"


def test_the_refusals_users_met_are_among_the_cases(
    kernel: tuple[netns.NetnsExecutor, _core.NftScratch],
) -> None:
    """The cases that stopped real nodes, spelled out (the generator finds them too)."""
    ex, real = kernel

    def fw(*sources: str) -> Op:
        keys = [
            [{"addr": "192.168.77.200"}, {"proto": "TCP"}, {"port": 80}, value(s)] for s in sources
        ]
        return {
            "op": "add_elements",
            "set": "firewall-allow",
            "elements": [{"key": k} for k in keys],
        }

    cases = [
        ([fw("0.0.0.0/0", "192.168.77.200/32")], False),  # the LB address beside 0.0.0.0/0
        ([fw("192.168.77.0/24", "192.168.77.200/32")], False),  # a LAN holding the LB
        ([fw("10.0.0.0/8", "10.1.0.0/16")], False),  # nested ranges
        ([fw("192.168.77.0/24")], True),  # what kproxy writes for the LAN case now
    ]
    fake = _core.NftScratch("IPv4")
    for tx, ok in cases:
        for apply in (fake.apply, lambda s: ex.call(functools.partial(real.apply, s))):
            apply(json.dumps(SETUP))
            assert (outcome(apply, tx) is None) == ok, tx
