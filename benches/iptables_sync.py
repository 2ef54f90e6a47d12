"""iptables mode at scale: kproxy vs an upstream-shaped ruleset of the same cluster.

Run as root: ``python benches/iptables_sync.py [--shapes 1000x10,10000x10,30000x4]``.
For each shape (services x endpoints, one TCP port each, ClusterIP), in fresh network
namespaces of their own and in the same run:

* kproxy: a full sync, then a one-service change (its endpoints move), through the real
  engine: rule generation (render) and ``iptables-restore`` (apply) reported separately,
  plus the end-to-end time of the call (change set encoding included);
* upstream shape: the same rules with upstream's flat ``KUBE-SERVICES`` (one rule per service
  port, linear) applied with ``iptables-restore --noflush``: the full ruleset, then what
  upstream's partial sync writes for a one-service change (``KUBE-SERVICES`` and the other
  shared chains rewritten whole, plus the changed service's chains).

Ratios are the headline; absolute times belong to this machine.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kproxy import _core
from kproxy.model import Endpoint, EndpointSlice, PortSpec, Service, ServiceKey, SlicePort
from kproxy.tracker import ChangeSet, merge_slices

BUCKET = re.compile(r"^KUBE-(SVCS|NPS|SVCR|EXTS|FWS|HCS)-")


@contextmanager
def netns() -> Iterator[str]:
    name = f"kpb-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


CLONE_NEWNET = 0x40000000
# The namespace the benchmark started in, to come back to after each measurement.
HOST_NS = os.open("/proc/self/ns/net", os.O_RDONLY)


def _setns(fd: int) -> None:
    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


def enter(ns: str) -> None:
    """Move this thread (the only one doing kernel work here) into ``ns``."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(fd)
    finally:
        os.close(fd)


def enter_host() -> None:
    _setns(HOST_NS)


def cluster(n: int, eps: int) -> ChangeSet:
    services: dict[ServiceKey, Service | None] = {}
    endpoints: dict[ServiceKey, Any] = {}
    for i in range(n):
        key = ServiceKey(f"ns{i % 50}", f"svc{i}")
        ip = f"172.{16 + i // 65536}.{(i // 256) % 256}.{i % 256}"
        services[key] = Service(key, (PortSpec("http", "TCP", 80),), cluster_ips=(ip,))
        e = tuple(
            Endpoint(
                f"10.{(i * eps + j) // 65536 % 256}.{(i * eps + j) // 256 % 256}.{(i * eps + j) % 256}",
                node_name="n",
            )
            for j in range(eps)
        )
        sl = EndpointSlice(
            key.namespace, f"svc{i}-x", key, "IPv4", (SlicePort("http", "TCP", 8080),), e
        )
        endpoints[key] = merge_slices([sl])
    return ChangeSet(services, endpoints)


def one_change(cs: ChangeSet, n: int, eps: int) -> ChangeSet:
    key = ServiceKey(f"ns{(n // 2) % 50}", f"svc{n // 2}")
    e = tuple(Endpoint(f"10.250.{j // 256}.{j % 256}", node_name="n") for j in range(eps))
    sl = EndpointSlice(key.namespace, "moved", key, "IPv4", (SlicePort("http", "TCP", 8080),), e)
    return ChangeSet({}, {key: merge_slices([sl])})


def parse(text: str) -> dict[str, dict[str, list[str]]]:
    tables: dict[str, dict[str, list[str]]] = {}
    cur: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("*"):
            cur = tables.setdefault(line[1:], {})
        elif line.startswith(":"):
            cur.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            chain, _, rule = line[3:].partition(" ")
            cur.setdefault(chain, []).append(rule)
    return tables


def flatten(chains: dict[str, list[str]], chain: str) -> list[str]:
    out: list[str] = []
    for rule in chains.get(chain, []):
        target = rule.rsplit("-j ", 1)[-1]
        if BUCKET.match(target):
            out.extend(flatten(chains, target))
        else:
            out.append(rule)
    return out


def upstream_text(tables: dict[str, dict[str, list[str]]], only: set[str] | None) -> str:
    """Upstream's layout: shared chains flat. ``only``: per-service chains to include (partial
    sync); the shared chains are always written whole, as upstream does."""
    shared = {"KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-EXTERNAL-SERVICES", "KUBE-PROXY-FIREWALL"}
    out: list[str] = []
    for table in ("filter", "nat"):
        chains = tables.get(table, {})
        keep = [c for c in chains if not BUCKET.match(c)]
        if only is not None:
            keep = [c for c in keep if c in shared or c in only]
        out.append(f"*{table}")
        out += [f":{c} - [0:0]" for c in keep]
        for c in keep:
            rules = flatten(chains, c) if c in shared else chains[c]
            out += [f"-A {c} {r}" for r in rules]
        out.append("COMMIT")
    # Upstream creates its nfacct counters before its rules name them; the namespaces this
    # layout is restored into have none, so its rules count nothing (as upstream's do where
    # nfnetlink_acct is missing).
    return without_counters("\n".join(out) + "\n")


def without_counters(rules: str) -> str:
    """iptables rules without their nfacct matches: a fresh namespace has no nfacct counters
    for them to name (the kernel refuses such a rule), and the tools cannot create them."""
    return re.sub(r" -m nfacct --nfacct-name +\S+", "", rules)


def restore(text: str) -> float:
    t = time.perf_counter()
    subprocess.run(["iptables-restore", "-w", "5", "--noflush"], input=text.encode(), check=True)
    return time.perf_counter() - t


def bench(n: int, eps: int) -> dict[str, Any]:
    cs = cluster(n, eps)
    change = one_change(cs, n, eps)
    res: dict[str, Any] = {"services": n, "endpoints_per_service": eps}
    cfg = json.dumps({"family": "IPv4", "node_name": "n", "cluster_cidrs": ["10.0.0.0/8"]})
    with netns() as ns:
        enter(ns)
        engine = _core.Engine(cfg)
        data = cs.to_json()
        t = time.perf_counter()
        full = engine.sync(data, full=True)
        res["kproxy_full"] = {
            "render": full.render_seconds,
            "apply": full.apply_seconds,
            "end_to_end": time.perf_counter() - t,
            "bytes": full.bytes,
        }
        t = time.perf_counter()
        part = engine.sync(change.to_json())
        res["kproxy_one_service"] = {
            "render": part.render_seconds,
            "apply": part.apply_seconds,
            "end_to_end": time.perf_counter() - t,
            "bytes": part.bytes,
        }
        rendered = engine.render()
        enter_host()
    tables_before = parse(rendered)
    with netns() as ns:
        enter(ns)
        text = upstream_text(tables_before, None)
        res["upstream_full"] = {"apply": restore(text), "bytes": len(text)}
        # What upstream writes when that service's endpoints move: the shared chains whole
        # plus the service's own chains (old endpoint chains deleted).
        e2 = _core.Engine(
            json.dumps(
                {
                    "family": "IPv4",
                    "node_name": "n",
                    "cluster_cidrs": ["10.0.0.0/8"],
                    "backend": "fake",
                }
            )
        )
        e2.sync(cs.to_json(), full=True)
        e2.sync(change.to_json())
        after = parse(e2.render())
        changed_key = next(iter(change.endpoints))
        own = {
            c
            for t in after.values()
            for c, rules in t.items()
            if any(
                f'"{changed_key.namespace}/{changed_key.name}' in r
                or f" {changed_key.namespace}/{changed_key.name}" in r
                for r in rules
            )
        }
        stale = {
            c
            for t in tables_before.values()
            for c in t
            if c.startswith("KUBE-SEP-") and c not in after["nat"]
        }
        ptext = upstream_text(after, own)
        ptext = ptext.replace("COMMIT\n", "", 1)  # filter section first; append deletions to nat
        ptext = ptext.replace(
            "*nat\n", "COMMIT\n*nat\n" + "".join(f":{c} - [0:0]\n" for c in stale), 1
        )
        ptext = ptext.removesuffix("COMMIT\n") + "".join(f"-X {c}\n" for c in stale) + "COMMIT\n"
        res["upstream_one_service"] = {"apply": restore(ptext), "bytes": len(ptext)}
        enter_host()
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1000x10,10000x10,30000x4")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = []
    for shape in args.shapes.split(","):
        n, e = (int(x) for x in shape.split("x"))
        r = bench(n, e)
        results.append(r)
        kf, ko, uf, uo = (
            r["kproxy_full"],
            r["kproxy_one_service"],
            r["upstream_full"],
            r["upstream_one_service"],
        )
        print(f"\n{n} services x {e} endpoints")
        print(
            f"  full sync      kproxy: render {kf['render']:.3f}s + restore {kf['apply']:.3f}s (end to end {kf['end_to_end']:.3f}s, {kf['bytes'] / 1e6:.1f} MB); "
            f"upstream shape restore {uf['apply']:.3f}s ({uf['bytes'] / 1e6:.1f} MB)"
        )
        print(f"                 generation / restore = {kf['render'] / kf['apply']:.1%}")
        print(
            f"  one service    kproxy: render {ko['render'] * 1e3:.1f}ms + restore {ko['apply'] * 1e3:.1f}ms = end to end {ko['end_to_end'] * 1e3:.1f}ms ({ko['bytes']} B); "
            f"upstream shape restore {uo['apply'] * 1e3:.1f}ms ({uo['bytes'] / 1e6:.2f} MB)  -> {uo['apply'] / ko['end_to_end']:.0f}x faster"
        )
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cpus, kernel {platform.release()}, {subprocess.run(['iptables', '--version'], capture_output=True, text=True, check=False).stdout.strip()}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
