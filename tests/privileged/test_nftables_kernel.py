"""The nftables engine against the real kernel in a scratch namespace: the canonical
transactions load, a rejected transaction leaves the previous table in place and makes the
next sync full, and what the kernel then holds is what the in-memory kernel holds."""

from __future__ import annotations

import functools
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kproxy import _core, netns
from kproxy.model import Endpoint, EndpointSlice, PortSpec, Service, ServiceKey, SlicePort
from kproxy.tracker import ChangeSet, merge_slices
from tests.netlab import netlab_unavailable_reason

pytestmark = pytest.mark.privileged
GOLDEN = Path(__file__).parent.parent / "core" / "golden"


@pytest.fixture
def ns() -> Iterator[str]:
    reason = netlab_unavailable_reason()
    if reason is not None:
        pytest.skip(f"netlab unavailable: {reason}")
    with netns.scratch() as name:
        yield name


def nft(ns: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "nft", *args],
        input=stdin, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("golden", sorted(GOLDEN.glob("nftables-*.txt")), ids=lambda p: p.stem)
def test_canonical_transactions_load_into_the_kernel(ns: str, golden: Path) -> None:
    r = nft(ns, "-f", "-", stdin=golden.read_text())
    assert r.returncode == 0, r.stderr
    assert "chain services" in nft(ns, "list", "table", "ip", "kproxy").stdout


def changes(n: int) -> bytes:
    services: dict[ServiceKey, Service | None] = {}
    endpoints = {}
    for i in range(n):
        key = ServiceKey("ns", f"s{i}")
        services[key] = Service(
            key, (PortSpec("p", "TCP", 80, 30000 + i),), cluster_ips=(f"172.30.0.{i + 1}",),
            externally_accessible=True,
        )  # fmt: skip
        eps = (Endpoint(f"10.1.{i}.1"), Endpoint(f"10.1.{i}.2"))
        s = EndpointSlice("ns", f"s{i}-1", key, "IPv4", (SlicePort("p", "TCP", 8080),), eps)
        endpoints[key] = merge_slices([s])
    return ChangeSet(services, endpoints).to_json()


def test_a_rejected_transaction_keeps_the_table_and_the_next_sync_is_full(ns: str) -> None:
    cfg = {"family": "IPv4", "node_name": "n", "cluster_cidrs": ["10.0.0.0/8"], "mode": "nftables"}
    with netns.NetnsExecutor(ns) as ex:
        engine = ex.call(functools.partial(_core.Engine, json.dumps(cfg)))
        ex.call(functools.partial(engine.sync, changes(5), True))
        before = nft(ns, "list", "table", "ip", "kproxy").stdout
        assert "10.1.4.2 . 8080" in before
        # Someone else claims the address and port of a Service the next sync adds: the
        # kernel refuses the transaction ("File exists"). The engine's contained retry is a
        # full sync, which replaces the table (the stranger's element with it): the change
        # lands in the same sync and nothing is left refused.
        blocker = "add element ip kproxy service-ips { 172.30.0.9 . tcp . 80 : drop }\n"
        assert nft(ns, "-f", "-", stdin=blocker).returncode == 0
        r = ex.call(functools.partial(engine.sync, changes(9)))
        assert r.probes >= 1 and r.refused == [], r
        assert not engine.needs_full_sync
        listing = nft(ns, "list", "table", "ip", "kproxy").stdout
        assert "10.1.8.1 . 8080" in listing and "172.30.0.9 . tcp . 80 : drop" not in listing
        assert ex.call(engine.canary_intact)
        assert nft(ns, "delete", "table", "ip", "kproxy").returncode == 0
        assert not ex.call(engine.canary_intact)


def endpoints_of(key: ServiceKey, *ips: str) -> bytes:
    eps = tuple(Endpoint(ip) for ip in ips)
    s = EndpointSlice("ns", f"{key.name}-1", key, "IPv4", (SlicePort("p", "TCP", 8080),), eps)
    return ChangeSet(endpoints={key: merge_slices([s])}).to_json()


def test_element_updates_over_netlink_leave_exactly_what_nft_would(ns: str) -> None:
    """Partial syncs that only change elements go to the kernel as nfnetlink batches; the
    kernel's table must then read back exactly as the in-memory kernel's."""
    cfg = {"family": "IPv4", "node_name": "n", "cluster_cidrs": ["10.0.0.0/8"], "mode": "nftables"}
    fake = _core.Engine(json.dumps({**cfg, "backend": "fake"}))
    s1, s9 = ServiceKey("ns", "s1"), ServiceKey("ns", "s9")
    new_service = ChangeSet(
        {s9: Service(s9, (PortSpec("p", "TCP", 80),), cluster_ips=("172.30.0.99",))}
    ).to_json()
    steps = [
        endpoints_of(s1, "10.1.1.7", "10.1.1.8"),  # endpoints move: pool and hairpin entries
        new_service,  # a Service without endpoints: rejected
        endpoints_of(s9, "10.9.0.1", "10.9.0.2"),  # ...then served from the existing pool
        endpoints_of(s1),  # and s1 loses its endpoints
    ]
    with netns.NetnsExecutor(ns) as ex:
        engine = ex.call(functools.partial(_core.Engine, json.dumps(cfg)))
        ex.call(functools.partial(engine.sync, changes(5), True))
        fake.sync(changes(5), True)
        for step in steps:
            r = ex.call(functools.partial(engine.sync, step))
            fake.sync(step)
            # One batch; a second, small transaction when a chain went stale (s1's NodePort
            # chain once it has no endpoints).
            assert isinstance(m := r.mode, _core.NftablesReport), r
            assert not r.full and r.transactions == 1 + m.stale_chains_deleted, r
            assert r.bytes < 2000, r  # a netlink batch, not an nft script of the table
            live = ex.call(lambda: _core.NftTable.live("IPv4"))
            want = fake.nft_table()
            assert want is not None and live.lines() == want.lines()
        # A batch the kernel refuses (an element someone else holds): the contained retry
        # (a full sync, replacing the table) programs the change in the same sync.
        s8 = ServiceKey("ns", "s8")
        svc = Service(s8, (PortSpec("p", "TCP", 80),), cluster_ips=("172.30.0.98",))
        ex.call(functools.partial(engine.sync, ChangeSet({s8: svc}).to_json()))
        assert nft(ns, "-f", "-", stdin=CLAIM).returncode == 0
        r = ex.call(functools.partial(engine.sync, endpoints_of(s8, "10.8.0.1", "10.8.0.2")))
        assert r.probes >= 1 and r.refused == [], r
        listing = nft(ns, "list", "table", "ip", "kproxy").stdout
        assert "10.99.99.99" not in listing and "10.8.0.2 . 8080" in listing, listing
        assert not engine.needs_full_sync


# Someone else's element under the key the next batch adds (a different verdict).
CLAIM = "add element ip kproxy endpoints-2 { 172.30.0.98 . tcp . 80 . 0 : 10.99.99.99 . 1 }\n"
