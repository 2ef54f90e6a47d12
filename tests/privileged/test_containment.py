"""One refused Service does not stop a node: the kernel refuses one Service's rules, every
other change of the same sync lands, the refused Service keeps its last good rules, and it
is named by a log line, an Event and a gauge until it is programmed.

The refusals are ones the kernel makes on its own. iptables mode: someone's rule jumps to a
Service's chain, so the kernel will not delete it (`-X` is refused while it is referenced).
nftables mode: two Services claim one load-balancer address and port with source ranges
that overlap, and the kernel refuses overlapping intervals in `firewall-allow` (`File
exists`); the one that comes second is held."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import k8sobjects as k
from tests.privileged.harness import (
    ECHO_IP,
    ProxyLab,
    echo_service,
    echo_slice,
    http_get,
    lb_service,
    proxy_lab,
)

pytestmark = pytest.mark.privileged

PINNED_IP = "10.96.2.1"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[ProxyLab]:
    objects = [echo_service(), echo_slice(["10.244.1.2"])]
    with proxy_lab(tmp_path, objects, mode="iptables") as pl:
        yield pl


def refused_gauge(lab: ProxyLab) -> float:
    _, metrics = http_get(lab.lab.node, "http://127.0.0.1:10249/metrics")
    for line in metrics.splitlines():
        if line.startswith("kubeproxy_sync_proxy_rules_refused_services{") and (
            'ip_family="IPv4"' in line and f'mode="{lab.mode}"' in line
        ):
            return float(line.split()[-1])
    raise AssertionError(f"no refused-services gauge in {metrics[:2000]}")


def pinned(ip: str, name: str) -> list[k.Obj]:
    return [
        k.service(name, ip, [k.port("http", 80, "TCP", target=8080)]),
        k.endpoint_slice(
            f"{name}-1", name, [k.endpoint("10.244.3.2", node="node-b")],
            [k.slice_port("http", 8080, "TCP")],
        ),
    ]  # fmt: skip


def refuse_one(lab: ProxyLab) -> str:
    """Program Service pinned, reference its chain from a chain of someone else's, and
    delete pinned (its chain must go, and the kernel will not let it); the chain's name."""
    for obj in pinned(PINNED_IP, "pinned"):
        lab.put(obj)
    lab.wait(lambda: PINNED_IP in lab.nat(), 15, "pinned programmed")
    svc_chain = re.search(rf"-d {PINNED_IP}/32 .*-j (KUBE-SVC-\w+)", lab.nat())
    assert svc_chain is not None, lab.nat()
    node = lab.lab.node
    node.exec(["iptables", "-t", "nat", "-N", "MINE"], timeout=10, check=True)
    node.exec(["iptables", "-t", "nat", "-A", "MINE", "-j", svc_chain[1]], timeout=10, check=True)
    lab.delete("Service", "pinned")
    return svc_chain[1]


def test_a_refused_service_is_contained_and_the_rest_is_programmed(lab: ProxyLab) -> None:
    lab.start_daemon("--metrics-bind-address", "127.0.0.1:10249", "--sync-period", "4s")
    lab.wait_synced()
    client = lab.lab.pod("client")
    assert client.tcp_probe(ECHO_IP, 80).server == "pod1"
    name, chain = "pinned", refuse_one(lab)
    # The same moment, another Service changes: it lands.
    lab.put(echo_slice(["10.244.2.2"]))
    moved = {"10.244.2.2:8080", "10.244.2.2:8081"}
    lab.wait(lambda: lab.dnat_targets() >= moved, 15, "echo's change programmed")
    lab.wait(lambda: f"Service default/{name} (IPv4): the kernel refused" in lab.log(), 15,
             "the refusal reported")  # fmt: skip
    assert client.tcp_probe(ECHO_IP, 80).server == "pod2"
    assert refused_gauge(lab) == 1.0
    events = lab.call(lambda: lab.api.list_objects("Event.events.k8s.io"))
    notes = [e["note"] for e in events
             if e["reason"] == "FailedToProgram" and e["regarding"]["name"] == name]  # fmt: skip
    assert len(notes) == 1, events
    # The deleted Service keeps its last good rules meanwhile, and answers.
    assert chain in notes[0]
    assert client.tcp_probe(PINNED_IP, 80).server == "pod3"
    # Later changes keep landing while it is held (and every sync reports it).
    lab.put(echo_slice(["10.244.2.2", "10.244.1.2"]))
    lab.wait(lambda: "10.244.1.2:8080" in lab.dnat_targets(), 15, "a later change")
    assert "sync failed" not in lab.log()
    assert lab.daemon is not None and lab.daemon.poll() is None
    # The reference goes: the next periodic sync (--sync-period 4s) retries the held
    # Service, and its deletion is programmed after all.
    node = lab.lab.node
    node.exec(["iptables", "-t", "nat", "-F", "MINE"], timeout=10, check=True)
    node.exec(["iptables", "-t", "nat", "-X", "MINE"], timeout=10, check=True)
    lab.wait(lambda: PINNED_IP not in lab.nat(), 20, "the held deletion programmed")
    lab.wait(lambda: "programmed after all" in lab.log(), 10, "the recovery logged")
    assert refused_gauge(lab) == 0.0
    got = client.tcp_probe(PINNED_IP, 80, timeout=2.0)
    assert not got.ok, got


LB_IP = "10.96.200.1"


@pytest.fixture
def nft_lab(tmp_path: Path) -> Iterator[ProxyLab]:
    first = lb_service("first", "10.96.0.31", LB_IP, ["192.168.101.0/24"])
    pods = [k.endpoint("10.244.3.2", node="node-a")]
    objects = [echo_service(), echo_slice(["10.244.1.2"]), first,
               k.endpoint_slice("first-1", "first", pods, [k.slice_port("tcp", 8080)])]  # fmt: skip
    with proxy_lab(tmp_path, objects, mode="nftables") as pl:
        yield pl


def test_nftables_a_service_the_kernel_refuses_is_held_and_the_rest_lands(
    nft_lab: ProxyLab,
) -> None:
    lab = nft_lab
    lab.start_daemon("--metrics-bind-address", "127.0.0.1:10249", "--sync-period", "4s")
    lab.wait_synced()
    allowed, blocked = lab.lab.client("ext"), lab.lab.add_client("ext2")  # .101.2, .102.2
    assert allowed.tcp_probe(LB_IP, 80).server == "pod3"
    # A second Service claims the same address and port with ranges that overlap the first's,
    # and echo changes in the same moment.
    lab.put(lb_service("second", "10.96.0.32", LB_IP, ["192.168.101.0/25", "192.168.102.0/24"]))
    pods = [k.endpoint("10.244.1.2", node="node-a")]  # pod1: echo leaves it for pod2
    lab.put(k.endpoint_slice("second-1", "second", pods, [k.slice_port("tcp", 8080)]))
    lab.put(echo_slice(["10.244.2.2"]))
    lab.wait(lambda: "Service default/second (IPv4): the kernel refused" in lab.log(), 15,
             "the refusal reported")  # fmt: skip
    lab.wait(lambda: "10.244.2.2:8080" in lab.dnat_targets(), 15, "echo's change programmed")
    client = lab.lab.pod("client")
    assert client.tcp_probe(ECHO_IP, 80).server == "pod2"
    assert refused_gauge(lab) == 1.0
    events = lab.call(lambda: lab.api.list_objects("Event.events.k8s.io"))
    held = [e for e in events if e["regarding"]["name"] == "second"]
    notes = [e["note"] for e in held if e["reason"] == "FailedToProgram"]
    assert len(notes) == 1 and "File exists" in notes[0], events
    # The first Service's ranges still hold: in-range clients in, others dropped.
    assert all(r.server == "pod3" for r in allowed.tcp_probe_many(LB_IP, 80, 5, timeout=1.0))
    assert blocked.tcp_probe(LB_IP, 80, timeout=1.0).error == "timeout"
    assert "sync failed" not in lab.log()
    # The claim goes away: nothing is held any more.
    lab.delete("Service", "second")
    lab.wait(lambda: refused_gauge(lab) == 0.0, 20, "the held Service released")
    assert lab.daemon is not None and lab.daemon.poll() is None
