"""ServiceCIDRs in the nftables mode, real packets: ServiceCIDR objects from the API server make
the node drop new connections to their addresses that no Service holds (upstream's
`cluster-ips-check`), so a freed or never-allocated cluster IP goes nowhere instead of out of
the node; a held address still answers, and an address outside them is left alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import k8sobjects as k
from tests.privileged.harness import ECHO_IP, ProxyLab, echo_service, echo_slice, proxy_lab

pytestmark = pytest.mark.privileged

NEVER, OUTSIDE = "10.96.0.99", "10.97.0.5"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[ProxyLab]:
    objects = [echo_service(), echo_slice(["10.244.1.2"]),
               k.service_cidr("kubernetes", ["10.96.0.0/16"])]  # fmt: skip
    with proxy_lab(tmp_path, objects, mode="nftables") as pl:
        yield pl


def route_out(lab: ProxyLab, ips: list[str]) -> None:
    """Route ``ips`` from the node to the outside client, which holds them and listens on
    nothing: a connection that leaves the node is refused there at once."""
    ext = lab.lab.client("ext")
    for ip in ips:
        ext.exec(["ip", "addr", "add", f"{ip}/32", "dev", ext.ifname], timeout=10, check=True)
        lab.lab.node.exec(["ip", "route", "add", f"{ip}/32", "via", ext.ip], timeout=10,
                          check=True)  # fmt: skip


def dropped(lab: ProxyLab, ip: str) -> bool:
    """A new connection from a pod to ip:80 is dropped on the node; otherwise it leaves the
    node (route_out) and is refused outside."""
    got = lab.lab.pod("client").tcp_probe(ip, 80, timeout=1.0)
    assert got.error in ("timeout", "refused"), got
    return got.error == "timeout"


def test_unallocated_cluster_ips_are_dropped_and_follow_the_objects(lab: ProxyLab) -> None:
    route_out(lab, [NEVER, OUTSIDE, ECHO_IP, "10.98.0.1"])
    # Before kproxy: each of them leaves the node.
    assert not dropped(lab, NEVER) and not dropped(lab, OUTSIDE)
    lab.start_daemon()
    lab.wait_synced()
    lab.wait(lambda: "10.96.0.0/16" in lab.nft(), 15, "the service CIDR programmed")
    client = lab.lab.pod("client")
    assert client.tcp_probe(ECHO_IP, 80).server == "pod1"  # allocated: served
    assert dropped(lab, NEVER)  # never allocated
    assert not dropped(lab, OUTSIDE)  # outside the ServiceCIDRs: untouched
    # Freed: the Service goes, its address is now one no Service holds.
    lab.delete("Service", "echo")
    lab.wait(lambda: "10.244.1.2" not in lab.nft(), 15, "echo removed")
    assert dropped(lab, ECHO_IP)
    # A second ServiceCIDR widens what is dropped (the two as one prefix in the interval set);
    # a too-wide one is skipped and named.
    lab.put(k.service_cidr("extra", ["10.97.0.0/16"]))
    lab.wait(lambda: "10.96.0.0/15" in lab.nft(), 15, "the second CIDR programmed")
    assert dropped(lab, OUTSIDE)
    lab.put(k.service_cidr("everything", ["0.0.0.0/0"]))
    lab.wait(lambda: "ServiceCIDR everything: spec.cidrs[0]" in lab.log(), 15, "the bad one named")
    assert not dropped(lab, "10.98.0.1")
    events = lab.call(lambda: lab.api.list_objects("Event.events.k8s.io"))
    bad = [e for e in events if e["regarding"]["name"] == "everything"]
    assert [(e["reason"], e["regarding"]["apiVersion"]) for e in bad] == [
        ("FailedToProgram", "networking.k8s.io/v1")
    ], events
    # Every ServiceCIDR gone: nothing is dropped for them any more.
    for name in ("kubernetes", "extra", "everything"):
        lab.delete("ServiceCIDR", name, namespace="")
    lab.wait(lambda: "10.96.0.0/15" not in lab.nft(), 15, "the service CIDRs removed")
    assert not dropped(lab, NEVER) and not dropped(lab, OUTSIDE)
    assert lab.daemon is not None and lab.daemon.poll() is None
