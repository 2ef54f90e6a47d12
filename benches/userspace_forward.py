"""The userspace forwarder against a direct connection, HAProxy and socat, in one run.

Run: ``python benches/userspace_forward.py [--seconds 5] [--repeat 2]`` (needs iperf3,
haproxy and socat: ``apt-get install iperf3 haproxy socat``, and cargo; no root). Everything
runs on 127.0.0.1. The same backends serve every path:

* an ``iperf3`` server for throughput: one stream, and 64 parallel streams;
* ``loadgen`` (``rust/examples/loadgen.rs``, built here), a native client and its servers:
  ``crr``, sequential connections that each read one byte, for the rate of new connections
  and their latency; ``rr``, 64-byte requests echoed on 8 open connections at a moderate
  rate (``--rr-rate``, 4,000/s by default, evenly spaced: the connections take turns), for
  the latency a path adds to established traffic (p50, p99 and p99.9, minus the direct
  path's).

Paths: ``direct`` (the backend itself), ``kproxy`` (``kproxy daemon --proxy-mode userspace``
on manifests, its NodePort listeners), ``haproxy`` (``mode tcp``, as packaged) and ``socat``
(``fork``: a process per connection). They alternate ``--repeat`` times; the best throughput
and rate, and the median latencies, are reported; so are ratios paired within a round (each
path's figure against the direct path's in the same round: median and range over rounds),
which this noisy machine moves less than absolute figures. Ratios are the headline;
absolute figures belong to this machine (2 vCPUs shared by the client, the proxy and the
servers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

NODE = "bench"
ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "target" / "release" / "examples" / "loadgen"
KINDS = ("tp", "conn", "echo")
# Without NET_ADMIN the daemon only opens its NodePort listeners (no redirect rules on the
# host): as root, clear its capabilities.
UNPRIVILEGED = (
    ["setpriv", "--bounding-set", "-all", "--inh-caps", "-all"] if os.geteuid() == 0 else []
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


@contextmanager
def process(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield p
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def kproxy_manifests(d: Path, ports: dict[str, tuple[int, int]]) -> None:
    """A NodePort Service per backend: name -> (node port, backend port)."""
    docs: list[str] = []
    for name, (node_port, backend) in ports.items():
        docs.append(
            f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\n"
            f"spec:\n  type: NodePort\n  clusterIP: 10.96.0.{len(docs) + 10}\n"
            f"  ports: [{{name: tcp, protocol: TCP, port: 80, nodePort: {node_port}}}]"
        )
        docs.append(
            f"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n"
            f"  name: {name}-1\n  namespace: bench\n  labels: {{kubernetes.io/service-name: {name}}}\n"
            f"addressType: IPv4\nendpoints:\n  - addresses: [127.0.0.1]\n"
            f"    conditions: {{ready: true}}\nports: [{{name: tcp, protocol: TCP, port: {backend}}}]"
        )
    (d / "bench.yaml").write_text("\n---\n".join(docs) + "\n")


def haproxy_config(path: Path, ports: dict[str, tuple[int, int]]) -> None:
    lines = [
        "global\n  maxconn 4000\n",
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n",
    ]
    for name, (front, back) in ports.items():
        lines.append(f"listen {name}\n  bind 127.0.0.1:{front}\n  server b 127.0.0.1:{back}\n")
    path.write_text("\n".join(lines))


def iperf(port: int, seconds: float, streams: int, attempts: int = 3) -> float:
    """Gbit/s received by the iperf3 server through ``port``. iperf3 sometimes ends a run
    with no result (its JSON then names an error; seen once with 64 streams on a loaded CI
    machine): such a run is repeated, ``attempts`` times at most."""
    why = ""
    for _ in range(attempts):
        out = subprocess.run(
            ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-P",
             str(streams), "-J", "--connect-timeout", "5000"],
            capture_output=True, text=True, timeout=seconds + 60, check=False,
        )  # fmt: skip
        try:
            doc = json.loads(out.stdout)
        except ValueError:
            why = out.stderr.strip() or f"exit status {out.returncode}, no JSON"
            continue
        received = doc.get("end", {}).get("sum_received", {}).get("bits_per_second")
        if received is not None:
            return float(received) / 1e9
        why = str(doc.get("error") or "no sum_received in its report")
    raise RuntimeError(f"iperf3 through port {port}: no result in {attempts} runs ({why})")


def loadgen(*args: object, timeout: float) -> dict[str, Any]:
    out = subprocess.run(
        [str(LOADGEN), *map(str, args)], capture_output=True, text=True, timeout=timeout, check=True
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def measure(ports: dict[str, int], seconds: float, rr_rate: float) -> dict[str, Any]:
    conn = loadgen("crr", f"127.0.0.1:{ports['conn']}", seconds, timeout=seconds + 60)
    rr = loadgen("rr", f"127.0.0.1:{ports['echo']}", 8, rr_rate, seconds, timeout=seconds + 60)
    if conn["errors"] or rr["errors"]:
        raise RuntimeError(f"failed connections or requests: {conn} {rr}")
    return {
        "single_gbps": iperf(ports["tp"], seconds, 1),
        "parallel64_gbps": iperf(ports["tp"], seconds, 64),
        "conn_per_s": conn["per_second"],
        "conn_p50_us": conn["p50_us"],
        "conn_p99_us": conn["p99_us"],
        "rr_p50_us": rr["p50_us"],
        "rr_p99_us": rr["p99_us"],
        "rr_p999_us": rr["p999_us"],
    }


def build_loadgen() -> None:
    subprocess.run(
        ["cargo", "build", "--quiet", "--release", "--no-default-features", "--example", "loadgen"],
        cwd=ROOT, check=True, timeout=900,
    )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--rr-rate", type=float, default=4000.0, help="requests/s on 8 connections")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    for tool in ("iperf3", "haproxy", "socat", "cargo"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: apt-get install iperf3 haproxy socat", file=sys.stderr)
            return 2
    build_loadgen()
    tmp = Path(tempfile.mkdtemp(prefix="kproxy-bench-"))
    budget = int(args.repeat * 4 * (3 * args.seconds + 10) + 120)
    fronts = {name: {k: free_port() for k in KINDS} for name in ("kproxy", "haproxy", "socat")}
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in ("direct", *fronts)}
    iperf_port = free_port()
    servers = subprocess.Popen(
        [str(LOADGEN), "serve", str(budget)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert servers.stdout is not None
        backends = {"tp": iperf_port, **json.loads(servers.stdout.readline())}
        with (
            process(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iperf_port)], tmp / "iperf.log"),
        ):
            kdir = tmp / "manifests"
            kdir.mkdir()
            kproxy_manifests(kdir, {k: (fronts["kproxy"][k], backends[k]) for k in KINDS})
            haproxy_config(
                tmp / "haproxy.cfg", {k: (fronts["haproxy"][k], backends[k]) for k in KINDS}
            )
            kproxy = [
                *UNPRIVILEGED, sys.executable, "-m", "kproxy", "daemon", "--proxy-mode", "userspace",
                "--manifests", str(kdir), "--hostname-override", NODE, "--bind-address",
                "127.0.0.1", "--healthz-bind-address", "", "--metrics-bind-address", "",
            ]  # fmt: skip
            socats = [
                ["socat", f"TCP-LISTEN:{fronts['socat'][k]},bind=127.0.0.1,fork,reuseaddr,"
                 f"backlog=1024", f"TCP:127.0.0.1:{backends[k]}"]
                for k in KINDS
            ]  # fmt: skip
            with contextlib.ExitStack() as stack:
                stack.enter_context(process(kproxy, tmp / "kproxy.log"))
                stack.enter_context(
                    process(["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")], tmp / "haproxy.log")
                )
                for k, argv in zip(KINDS, socats, strict=True):
                    stack.enter_context(process(argv, tmp / f"socat-{k}.log"))
                for p in (*backends.values(), *(x for f in fronts.values() for x in f.values())):
                    try:
                        wait_port(p)
                    except RuntimeError:
                        for log in sorted(tmp.glob("*.log")):
                            print(f"--- {log.name}\n{log.read_text()[-2000:]}", file=sys.stderr)
                        raise
                paths = {"direct": backends, **fronts}
                for _ in range(args.repeat):
                    for name, ports in paths.items():
                        results[name].append(measure(ports, args.seconds, args.rr_rate))
                        time.sleep(1)  # let TIME_WAIT and the proxy settle
    finally:
        servers.terminate()
        servers.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    best = ("single_gbps", "parallel64_gbps", "conn_per_s")
    summary: dict[str, dict[str, float]] = {
        name: {
            key: (max if key in best else statistics.median)(r[key] for r in runs)
            for key in runs[0]
        }
        for name, runs in results.items()
    }
    d = summary["direct"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, kernel {platform.release()}")
    print(f"request/response: 8 connections, {args.rr_rate:.0f} requests/s in all")
    print(
        f"{'path':<9}{'1 stream':>11}{'vs direct':>10}{'64 streams':>12}{'conn/s':>9}"
        f"{'conn p99+':>11}{'rr p50+':>10}{'rr p99+':>10}{'rr p99.9+':>11}"
    )
    for name, s in summary.items():
        print(
            f"{name:<9}{s['single_gbps']:>8.2f} Gb{s['single_gbps'] / d['single_gbps']:>9.0%}"
            f"{s['parallel64_gbps']:>9.2f} Gb{s['conn_per_s']:>9.0f}"
            f"{s['conn_p99_us'] - d['conn_p99_us']:>8.0f} us"
            f"{s['rr_p50_us'] - d['rr_p50_us']:>7.0f} us{s['rr_p99_us'] - d['rr_p99_us']:>7.0f} us"
            f"{s['rr_p999_us'] - d['rr_p999_us']:>8.0f} us"
        )
    paired = paired_ratios(results)
    print("paired within each round (median [min-max] over rounds):")
    for name, p in paired.items():
        print(
            f"{name:<9}one stream {_spread(p['single_vs_direct'], '{:.0%}')} of direct, "
            f"added rr p50 {_spread(p['rr_p50_added_us'], '{:.0f}')} us, "
            f"p99 {_spread(p['rr_p99_added_us'], '{:.0f}')} us"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"runs": results, "summary": summary, "paired": paired}, indent=2)
        )
    return 0


def paired_ratios(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, list[float]]]:
    """Each proxy's figures against the direct path's of the same round."""
    direct = results["direct"]

    def per_round(runs: list[dict[str, Any]], f: Callable[[Any, Any], float]) -> list[float]:
        return [f(r, d) for r, d in zip(runs, direct, strict=True)]

    return {
        name: {
            "single_vs_direct": per_round(runs, lambda r, d: r["single_gbps"] / d["single_gbps"]),
            "rr_p50_added_us": per_round(runs, lambda r, d: r["rr_p50_us"] - d["rr_p50_us"]),
            "rr_p99_added_us": per_round(runs, lambda r, d: r["rr_p99_us"] - d["rr_p99_us"]),
        }
        for name, runs in results.items()
        if name != "direct"
    }


def _spread(values: list[float], fmt: str) -> str:
    return (
        f"{fmt.format(statistics.median(values))} "
        f"[{fmt.format(min(values))}-{fmt.format(max(values))}]"
    )


if __name__ == "__main__":
    raise SystemExit(main())
