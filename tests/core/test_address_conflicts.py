"""A Service cannot take another Service's cluster IP (the CVE-2020-8554 class): a cluster
IP wins over an externalIP of another Service whichever came first, through partial syncs,
and the claimant gets the address back once the owner is gone. Traced in both netfilter
modes through their Fakes."""

from __future__ import annotations

import json

import pytest

from kproxy import _core
from kproxy.model import Endpoint, EndpointSlice, PortSpec, Service, ServiceKey, SlicePort
from kproxy.tracker import ChangeSet, merge_slices

NODE, NODE_IP, DNS_IP = "node-a", "192.168.0.2", "10.96.0.10"
DNS, EVIL = ServiceKey("kube-system", "kube-dns"), ServiceKey("team", "evil")


def engine(mode: str) -> _core.Engine:
    cfg = {"family": "IPv4", "node_name": NODE, "cluster_cidrs": ["10.244.0.0/16"],
           "node_ips": [NODE_IP], "backend": "fake", "mode": mode}  # fmt: skip
    return _core.Engine(json.dumps(cfg))


def service(key: ServiceKey, ip: str, external: tuple[str, ...] = ()) -> Service:
    return Service(key, (PortSpec("dns", "UDP", 53),), cluster_ips=(ip,), external_ips=external,
                   externally_accessible=bool(external))  # fmt: skip


def endpoints(key: ServiceKey, ip: str) -> ChangeSet:
    sl = EndpointSlice(key.namespace, f"{key.name}-1", key, "IPv4",
                       (SlicePort("dns", "UDP", 53),), (Endpoint(ip, node_name=NODE),))  # fmt: skip
    return ChangeSet(endpoints={key: merge_slices([sl])})


def to_dns(e: _core.Engine) -> list[str]:
    return e.trace(_core.Packet("10.244.1.9", DNS_IP, "UDP", 53, "external", [NODE_IP])).dnat


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_a_cluster_ip_wins_over_another_services_external_ip(mode: str) -> None:
    e = engine(mode)
    evil = service(EVIL, "10.96.0.99", (DNS_IP, "192.0.2.7"))
    e.sync(ChangeSet({EVIL: evil}).to_json(), True)
    e.sync(endpoints(EVIL, "10.244.2.66").to_json())
    assert to_dns(e) == ["10.244.2.66:53"]  # nobody holds the address yet: evil's to use
    # kube-dns arrives (a partial sync): its cluster IP wins, evil keeps its other address.
    r = e.sync(ChangeSet({DNS: service(DNS, DNS_IP)}).to_json())
    assert not r.full and r.address_conflicts == [("team", "evil", DNS_IP, "kube-system/kube-dns")]
    e.sync(endpoints(DNS, "10.244.1.53").to_json())
    assert to_dns(e) == ["10.244.1.53:53"]
    ext = e.trace(_core.Packet("203.0.113.1", "192.0.2.7", "UDP", 53, "external", [NODE_IP]))
    assert ext.dnat == ["10.244.2.66:53"]
    # A full resync says the same.
    r = e.sync(b"{}", True)
    assert r.address_conflicts and to_dns(e) == ["10.244.1.53:53"]
    # kube-dns deleted: the address goes back to evil.
    r = e.sync(ChangeSet({DNS: None}, {DNS: ()}).to_json())
    assert r.address_conflicts == [] and to_dns(e) == ["10.244.2.66:53"]


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_the_owner_first_then_a_claimant(mode: str) -> None:
    e = engine(mode)
    e.sync(ChangeSet({DNS: service(DNS, DNS_IP)}).to_json(), True)
    e.sync(endpoints(DNS, "10.244.1.53").to_json())
    r = e.sync(ChangeSet({EVIL: service(EVIL, "10.96.0.99", (DNS_IP,))}).to_json())
    e.sync(endpoints(EVIL, "10.244.2.66").to_json())
    assert r.address_conflicts == [("team", "evil", DNS_IP, "kube-system/kube-dns")]
    assert to_dns(e) == ["10.244.1.53:53"]
    ext = e.trace(_core.Packet("203.0.113.1", DNS_IP, "UDP", 53, "external", [NODE_IP]))
    assert ext.dnat == ["10.244.1.53:53"]
