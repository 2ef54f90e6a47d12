"""Builders for the Kubernetes objects tests feed kproxy (upstream's makeTestService shape)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Obj = dict[str, Any]


def service(
    name: str,
    cluster_ip: str,
    ports: Sequence[Obj],
    *,
    namespace: str = "default",
    type: str = "ClusterIP",
    labels: dict[str, str] | None = None,
    **spec: Any,
) -> Obj:
    s: Obj = {
        "type": type,
        "clusterIP": cluster_ip,
        "clusterIPs": [cluster_ip],
        "ports": list(ports),
        **spec,
    }
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": s,
    }


def port(
    name: str,
    port: int,
    protocol: str = "TCP",
    *,
    node_port: int | None = None,
    target: int | None = None,
) -> Obj:
    p: Obj = {"name": name, "port": port, "protocol": protocol, "targetPort": target or port}
    if node_port is not None:
        p["nodePort"] = node_port
    return p


def endpoint(
    ip: str,
    *,
    node: str | None = None,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    zone: str | None = None,
) -> Obj:
    e: Obj = {
        "addresses": [ip],
        "conditions": {
            "ready": ready,
            "serving": ready if serving is None else serving,
            "terminating": terminating,
        },
    }
    if node is not None:
        e["nodeName"] = node
    if zone is not None:
        e["zone"] = zone
    return e


def endpoint_slice(
    name: str,
    service_name: str,
    endpoints: Sequence[Obj],
    ports: Sequence[Obj],
    *,
    namespace: str = "default",
    address_type: str = "IPv4",
) -> Obj:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": address_type,
        "endpoints": list(endpoints),
        "ports": list(ports),
    }


def slice_port(name: str, port: int, protocol: str = "TCP") -> Obj:
    return {"name": name, "port": port, "protocol": protocol}


def service_cidr(name: str, cidrs: Sequence[str]) -> Obj:
    """A networking.k8s.io/v1 ServiceCIDR (cluster-scoped)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "ServiceCIDR",
        "metadata": {"name": name},
        "spec": {"cidrs": list(cidrs)},
    }


def node(name: str, *, addresses: Sequence[str] = (), zone: str | None = None) -> Obj:
    labels = {"kubernetes.io/hostname": name}
    if zone is not None:
        labels["topology.kubernetes.io/zone"] = zone
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {},
        "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]},
    }
