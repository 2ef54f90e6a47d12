"""First-packet latency: does a new connection get slower as the cluster grows?

Run as root: ``python benches/first_packet.py [--sizes 1000,30000] [--connects 2000]``.
In an isolated namespace lab (one backend pod, one client pod), for each cluster size it
programs N ClusterIP services (4 endpoints each, all on the backend pod) two ways, in turn,
in the same node namespace:

* kproxy's iptables rules (bucketed dispatch), applied by the real engine;
* the same rules with upstream's flat ``KUBE-SERVICES`` (one rule per service, linear);
* kproxy's nftables table (verdict-map dispatch, shared endpoint pools);

and times TCP ``connect()`` from the client pod to services spread over the whole list (the
last one in upstream's order included). Only the first packet of a connection walks the nat
rules, so the connect time is what grows. Reports medians and p99s, and the ratio of the
largest size to the smallest per layout.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benches.iptables_sync import cluster, flatten, parse
from kproxy import _core
from kproxy.netns import NetnsExecutor
from tests.netlab import NodeLab

CLIENT = r"""
import json, socket, sys, time
targets = json.loads(sys.argv[1]); count = int(sys.argv[2])
out = {}
for ip in targets:
    lat = []
    for _ in range(count):
        s = socket.socket(); s.settimeout(2)
        t = time.perf_counter_ns(); s.connect((ip, 80)); lat.append(time.perf_counter_ns() - t)
        s.close()
    out[ip] = lat
print(json.dumps(out))
"""


def pod_cluster(n: int) -> Any:
    """N services, 4 endpoints each, every endpoint the one backend pod (10.244.1.2)."""
    cs = cluster(n, 4)
    for key, ports in cs.endpoints.items():
        (p,) = ports
        eps = tuple((ep, port) for ep, port in p.endpoints)
        fixed = tuple(
            (type(ep)("10.244.1.2", node_name=ep.node_name), port) for ep, port in eps[:1]
        )
        cs.endpoints[key] = (type(p)(p.name, p.protocol, fixed),)
    return cs


def measure(lab: NodeLab, targets: list[str], connects: int) -> list[float]:
    r = lab.pod("client").exec(
        [sys.executable, "-c", CLIENT, json.dumps(targets), str(connects)], timeout=600, check=True
    )
    lat: list[float] = []
    for v in json.loads(r.stdout).values():
        lat.extend(x / 1000 for x in v[5:])  # drop each target's warm-up connects
    return lat


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,30000")
    ap.add_argument("--connects", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[str, dict[int, dict[str, float]]] = {
        "kproxy": {},
        "upstream shape": {},
        "kproxy nftables": {},
    }
    with NodeLab() as lab:
        lab.add_pod("backend").start_tcp_server(8080)
        lab.add_pod("client")
        with NetnsExecutor(lab.node.ns) as ex:
            for n in sizes:
                cs = pod_cluster(n)
                ips = [s.cluster_ips[0] for s in cs.services.values() if s is not None]
                # Spread over the list, the last service (upstream's worst case) included.
                targets = [ips[int(i * (len(ips) - 1) / 9)] for i in range(10)]
                per_target = max(args.connects // len(targets), 20)
                cfg = json.dumps(
                    {"family": "IPv4", "node_name": "n", "cluster_cidrs": ["10.244.0.0/16"]}
                )
                engine = ex.call(functools.partial(_core.Engine, cfg))
                ex.call(functools.partial(engine.sync, cs.to_json(), True), timeout=1800)
                kp = measure(lab, targets, per_target)
                # Upstream's shape: KUBE-SERVICES rewritten flat, one rule per service (the
                # service chains are the same; the bucket chains are left unreferenced).
                nat = parse(engine.render())["nat"]
                rules = "".join(f"-A KUBE-SERVICES {r}\n" for r in flatten(nat, "KUBE-SERVICES"))
                flat = f"*nat\n:KUBE-SERVICES - [0:0]\n{rules}COMMIT\n".encode()
                restore = ["iptables-restore", "-w", "5", "--noflush"]
                ex.call(
                    functools.partial(subprocess.run, restore, input=flat, check=True), timeout=1800
                )
                up = measure(lab, targets, per_target)
                ex.call(functools.partial(_core.cleanup_iptables, "IPv4"), timeout=600)
                nft_cfg = json.dumps(
                    {
                        "family": "IPv4",
                        "node_name": "n",
                        "cluster_cidrs": ["10.244.0.0/16"],
                        "mode": "nftables",
                    }
                )
                nft_engine = ex.call(functools.partial(_core.Engine, nft_cfg))
                ex.call(functools.partial(nft_engine.sync, cs.to_json(), True), timeout=1800)
                nf = measure(lab, targets, per_target)
                ex.call(functools.partial(_core.cleanup_nftables, "IPv4"), timeout=600)
                runs = (("kproxy", kp), ("upstream shape", up), ("kproxy nftables", nf))
                for name, lat in runs:
                    q = statistics.quantiles(lat, n=100)
                    results[name][n] = {
                        "p50_us": statistics.median(lat),
                        "p99_us": q[98],
                        "samples": len(lat),
                    }
                    print(
                        f"{n:>6} services  {name:<15} connect p50 {statistics.median(lat):7.1f} us   p99 {q[98]:7.1f} us   ({len(lat)} connects)"
                    )
    lo, hi = min(sizes), max(sizes)
    print()
    for name, r in results.items():
        print(
            f"{name:<15} p50 at {hi} / at {lo}: {r[hi]['p50_us'] / r[lo]['p50_us']:.2f}x   p99: {r[hi]['p99_us'] / r[lo]['p99_us']:.2f}x"
        )
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cpus, kernel {platform.release()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
