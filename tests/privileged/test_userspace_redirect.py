"""The userspace mode with NET_ADMIN: Service addresses reach the forwarder through redirect
rules, in a node namespace with real pods, as the legacy userspace proxier's portals did."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.privileged.harness import (
    ECHO_IP,
    EMPTY_IP,
    NODE_PORT_TCP,
    ProxyLab,
    echo_service,
    echo_slice,
    empty_service,
    proxy_lab,
)

pytestmark = pytest.mark.privileged

PODS = ("10.244.1.2", "10.244.2.2", "10.244.3.2")
BACKENDS = {"pod1", "pod2", "pod3"}


def portals(pl: ProxyLab) -> str:
    r = pl.lab.node.exec(["nft", "list", "table", "ip", "kproxy-userspace"], timeout=10)
    return r.stdout if r.returncode == 0 else ""


def test_cluster_ips_node_ports_and_udp_through_the_forwarder(tmp_path: Path) -> None:
    objects = [echo_service(), echo_slice(PODS), empty_service()]
    with proxy_lab(tmp_path, objects, mode="userspace") as pl:
        pl.start_daemon("--sync-period", "2s")
        pl.wait_synced()
        assert f"{ECHO_IP} . tcp . 80 : " in portals(pl)
        lab = pl.lab
        client = lab.pod("client")
        for src in (client, lab.node):  # PREROUTING and OUTPUT
            results = src.tcp_probe_many(ECHO_IP, 80, 30)
            assert all(r.ok for r in results), [r for r in results if not r.ok][:3]
            assert {r.server for r in results} == BACKENDS
            # The connection ends at the forwarder: the pods see the node, not the client.
            assert client.ip not in {r.peer for r in results}
        ext = lab.client("ext")
        results = ext.tcp_probe_many(lab.node_ip, NODE_PORT_TCP, 30)
        assert {r.server for r in results} == BACKENDS
        udp = set()
        for _ in range(30):
            r = client.udp_probe(ECHO_IP, 80, timeout=2.0)
            assert r.ok, r
            udp.add(r.server)
            if udp == BACKENDS:
                break
        assert udp == BACKENDS
        # No endpoints: reset at once, never a timeout.
        r = client.tcp_probe(EMPTY_IP, 80, timeout=2.0)
        assert not r.ok and r.error in ("refused", "ECONNRESET", "closed"), r

        # Someone flushes the ruleset: the periodic sync notices and writes the portals again.
        lab.node.exec(["nft", "flush", "ruleset"], timeout=10, check=True)
        pl.wait(lambda: f"{ECHO_IP} . tcp . 80 : " in portals(pl), 60, "portals restored")
        assert client.tcp_probe(ECHO_IP, 80).ok

        pl.daemon.terminate()  # type: ignore[union-attr]
        pl.daemon.wait(10)  # type: ignore[union-attr]
        lab.node.exec([sys.executable, "-m", "kproxy", "cleanup"], timeout=60, check=True)
        assert portals(pl) == ""
