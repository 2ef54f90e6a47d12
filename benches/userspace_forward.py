"""The userspace forwarder against a direct connection, HAProxy and socat, in one run.

Run: ``python benches/userspace_forward.py [--seconds 5] [--repeat 2]`` (needs iperf3,
haproxy and socat: ``apt-get install iperf3 haproxy socat``; no root). Everything runs on
127.0.0.1. The same backends serve every path:

* an ``iperf3`` server for throughput: one stream, and 64 parallel streams;
* a small server that answers each connection with one byte and closes, for the rate of
  new connections (one client, sequential) and the latency each path adds to a connection
  (connect, first byte, close; p50 and p99 over the run, minus the direct path's).

Paths: ``direct`` (the backend itself), ``kproxy`` (``kproxy daemon --proxy-mode userspace``
on manifests, its NodePort listeners), ``haproxy`` (``mode tcp``, as packaged) and ``socat``
(``fork``: a process per connection). They alternate ``--repeat`` times; the best throughput
and rate, and the median latencies, are reported. Ratios are the headline; absolute figures
belong to this machine (2 vCPUs shared by the client, the proxy and the servers).
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
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

NODE = "bench"
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


class ByteServer:
    """Answers every connection with one byte and closes it (bounded by ``stop``)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        deadline = time.monotonic() + 3600
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with contextlib.suppress(OSError):
                conn.sendall(b"x")
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


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


def iperf(port: int, seconds: float, streams: int) -> float:
    """Gbit/s received by the iperf3 server through ``port``."""
    out = subprocess.run(
        ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-P", str(streams),
         "-J", "--connect-timeout", "5000"],
        capture_output=True, text=True, timeout=seconds + 60, check=True,
    )  # fmt: skip
    return float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9


def connections(port: int, seconds: float) -> tuple[float, list[float]]:
    """Sequential connections for ``seconds``: the rate, and each one's time in seconds."""
    times: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(times) < 200_000:
        t = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.recv(1)
        times.append(time.perf_counter() - t)
    return len(times) / seconds, times


def measure(port_tp: int, port_conn: int, seconds: float) -> dict[str, Any]:
    rate, times = connections(port_conn, seconds)
    times.sort()
    return {
        "single_gbps": iperf(port_tp, seconds, 1),
        "parallel64_gbps": iperf(port_tp, seconds, 64),
        "conn_per_s": rate,
        "p50_us": times[len(times) // 2] * 1e6,
        "p99_us": times[int(len(times) * 0.99)] * 1e6,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    for tool in ("iperf3", "haproxy", "socat"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: apt-get install iperf3 haproxy socat", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="kproxy-bench-"))
    iperf_port = free_port()
    byte_server = ByteServer()
    fronts = {name: (free_port(), free_port()) for name in ("kproxy", "haproxy", "socat")}
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in ("direct", *fronts)}
    try:
        with (
            process(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iperf_port)], tmp / "iperf.log"),
        ):
            kdir = tmp / "manifests"
            kdir.mkdir()
            kproxy_manifests(
                kdir,
                {"tp": (fronts["kproxy"][0], iperf_port), "conn": (fronts["kproxy"][1], byte_server.port)},
            )  # fmt: skip
            haproxy_config(
                tmp / "haproxy.cfg",
                {"tp": (fronts["haproxy"][0], iperf_port), "conn": (fronts["haproxy"][1], byte_server.port)},
            )  # fmt: skip
            kproxy = [
                *UNPRIVILEGED, sys.executable, "-m", "kproxy", "daemon", "--proxy-mode", "userspace",
                "--manifests", str(kdir), "--hostname-override", NODE, "--bind-address",
                "127.0.0.1", "--healthz-bind-address", "", "--metrics-bind-address", "",
            ]  # fmt: skip
            socats = [
                ["socat", f"TCP-LISTEN:{front},bind=127.0.0.1,fork,reuseaddr,backlog=1024",
                 f"TCP:127.0.0.1:{back}"]
                for front, back in ((fronts["socat"][0], iperf_port), (fronts["socat"][1], byte_server.port))
            ]  # fmt: skip
            with (
                process(kproxy, tmp / "kproxy.log"),
                process(["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")], tmp / "haproxy.log"),
                process(socats[0], tmp / "socat-tp.log"),
                process(socats[1], tmp / "socat-conn.log"),
            ):
                for p in (iperf_port, byte_server.port, *(x for f in fronts.values() for x in f)):
                    try:
                        wait_port(p)
                    except RuntimeError:
                        for log in sorted(tmp.glob("*.log")):
                            print(f"--- {log.name}\n{log.read_text()[-2000:]}", file=sys.stderr)
                        raise
                paths = {"direct": (iperf_port, byte_server.port), **fronts}
                for _ in range(args.repeat):
                    for name, (tp, conn) in paths.items():
                        results[name].append(measure(tp, conn, args.seconds))
                        time.sleep(1)  # let TIME_WAIT and the proxy settle
    finally:
        byte_server.close()
        shutil.rmtree(tmp, ignore_errors=True)

    summary: dict[str, dict[str, float]] = {}
    for name, runs in results.items():
        summary[name] = {
            "single_gbps": max(r["single_gbps"] for r in runs),
            "parallel64_gbps": max(r["parallel64_gbps"] for r in runs),
            "conn_per_s": max(r["conn_per_s"] for r in runs),
            "p50_us": statistics.median(r["p50_us"] for r in runs),
            "p99_us": statistics.median(r["p99_us"] for r in runs),
        }
    d = summary["direct"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, kernel {platform.release()}")
    print(
        f"{'path':<9}{'1 stream':>11}{'vs direct':>10}{'64 streams':>12}{'conn/s':>9}"
        f"{'p50 added':>11}{'p99 added':>11}"
    )
    for name, s in summary.items():
        print(
            f"{name:<9}{s['single_gbps']:>8.2f} Gb{s['single_gbps'] / d['single_gbps']:>9.0%}"
            f"{s['parallel64_gbps']:>9.2f} Gb{s['conn_per_s']:>9.0f}"
            f"{s['p50_us'] - d['p50_us']:>8.0f} us{s['p99_us'] - d['p99_us']:>8.0f} us"
        )
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
