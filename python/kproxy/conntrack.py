"""The conntrack reconciler: delete UDP flows whose destination no longer serves.

A UDP client that keeps sending on one socket keeps its conntrack entry alive, so after its
endpoint goes away (or before any existed: the entry then points at the service address
itself) its packets keep going where the entry says. After every successful sync the
reconciler lists UDP entries once and deletes exactly those whose original destination is a
service address and port (cluster IP, external IP, LB IP) or a NodePort, and whose reply
source is not one of that port's serving endpoints - services with no endpoints left and
deleted services included, as upstream's reconciler does. It never flushes wholesale, so a
restart deletes nothing that still serves, and it never touches TCP.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pyroute2 import Conntrack

from kproxy.model import PortEndpoints, PortSpec, Service, ServiceKey

log = logging.getLogger(__name__)

UDP = socket.IPPROTO_UDP


class Flow(Protocol):
    tuple_orig: Any
    tuple_reply: Any


@dataclass(frozen=True, slots=True)
class Targets:
    """Where UDP flows may legitimately go: service address:port -> serving endpoint IPs, and
    NodePort -> serving endpoint IPs."""

    addresses: dict[tuple[str, int], frozenset[str]] = field(default_factory=dict)
    node_ports: dict[int, frozenset[str]] = field(default_factory=dict)


def _udp_ports(svc: Service) -> Iterator[tuple[PortSpec, tuple[str, ...]]]:
    """Each UDP port of a Service with every address it is reachable on."""
    addresses = (*svc.cluster_ips, *svc.external_ips, *svc.load_balancer_ips)
    for spec in svc.ports:
        if spec.protocol == "UDP":
            yield spec, addresses


def targets(
    services: Iterable[tuple[ServiceKey, Service]],
    endpoints: Mapping[ServiceKey, tuple[PortEndpoints, ...]],
    deleted: Iterable[Service] = (),
) -> Targets:
    t = Targets()
    for key, svc in services:
        ports = {(p.name, p.protocol): p for p in endpoints.get(key, ())}
        for spec, addresses in _udp_ports(svc):
            pe = ports.get((spec.name, "UDP"))
            serving = (
                frozenset(ep.ip for ep, _ in pe.endpoints if ep.serving) if pe else frozenset()
            )
            for ip in addresses:
                t.addresses[(ip, spec.port)] = serving
            if spec.node_port:
                t.node_ports[spec.node_port] = serving
    for svc in deleted:  # their flows go nowhere valid any more
        for spec, addresses in _udp_ports(svc):
            for ip in addresses:
                t.addresses.setdefault((ip, spec.port), frozenset())
            if spec.node_port:
                t.node_ports.setdefault(spec.node_port, frozenset())
    return t


def stale(flows: Iterable[Flow], t: Targets) -> list[Flow]:
    out = []
    for f in flows:
        o, r = f.tuple_orig, f.tuple_reply
        if o.proto != UDP:
            continue
        serving = t.addresses.get((str(o.daddr), int(o.dport)))
        if serving is None:
            serving = t.node_ports.get(int(o.dport))
        if serving is not None and str(r.saddr) not in serving:
            out.append(f)
    return out


# nfnetlink's family per IP family: a conntrack dump lists one family only (pyroute2's
# default, AF_INET, would leave every IPv6 flow alone).
NFGEN_FAMILY = {"IPv4": socket.AF_INET, "IPv6": socket.AF_INET6}


class Reconciler:
    """Lists and deletes through netlink (pyroute2), in the calling thread's namespace."""

    def __init__(self) -> None:
        self.deleted = 0

    def reconcile(self, t: Targets, family: str = "IPv4") -> int:
        """Delete ``family``'s stale UDP entries; returns how many."""
        with Conntrack(nfgen_family=NFGEN_FAMILY[family]) as ct:
            doomed = stale(ct.dump_entries(), t)
            for f in doomed:
                try:
                    ct.delete(f)
                except OSError as e:  # gone meanwhile (ENOENT) or refused: not fatal
                    log.debug("conntrack delete %s: %s", f, e)
        self.deleted += len(doomed)
        if doomed:
            log.info("deleted %d stale UDP conntrack entries (%s)", len(doomed), family)
        return len(doomed)
