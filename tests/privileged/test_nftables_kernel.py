"""The nftables engine against the real kernel in a scratch namespace: the canonical
transactions load, a rejected transaction leaves the previous table in place and makes the
next sync full, and what the kernel then holds is what the in-memory kernel holds."""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

import pytest

from kproxy import _core, netns
from kproxy.errors import ApplyError
from kproxy.model import Endpoint, EndpointSlice, PortSpec, Service, ServiceKey, SlicePort
from kproxy.tracker import ChangeSet, merge_slices
from tests.netlab import netlab_unavailable_reason

pytestmark = pytest.mark.privileged
GOLDEN = Path(__file__).parent.parent / "core" / "golden"


@pytest.fixture
def ns() -> str:
    reason = netlab_unavailable_reason()
    if reason is not None:
        pytest.skip(f"netlab unavailable: {reason}")
    with netns.scratch() as name:
        yield name  # type: ignore[misc]


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
        # kernel refuses the whole transaction ("File exists").
        blocker = "add element ip kproxy service-ips { 172.30.0.9 . tcp . 80 : drop }\n"
        assert nft(ns, "-f", "-", stdin=blocker).returncode == 0
        with pytest.raises(ApplyError):
            ex.call(functools.partial(engine.sync, changes(9)))
        assert engine.needs_full_sync
        after = nft(ns, "list", "table", "ip", "kproxy").stdout
        assert "10.1.4.2 . 8080" in after and "10.1.8.1" not in after
        # The next sync replaces the table and succeeds.
        r = ex.call(functools.partial(engine.sync, b"{}"))
        assert r.full
        listing = nft(ns, "list", "table", "ip", "kproxy").stdout
        assert "10.1.8.1 . 8080" in listing and "172.30.0.9 . tcp . 80 : drop" not in listing
        assert ex.call(engine.canary_intact)
        assert nft(ns, "delete", "table", "ip", "kproxy").returncode == 0
        assert not ex.call(engine.canary_intact)
