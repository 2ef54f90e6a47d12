"""Daemon memory with a large cluster programmed: the real daemon, fed by the fake API server.

Run as root: ``python benches/daemon_memory.py [--services 30000] [--modes nftables,iptables]``.
For each mode, in a scratch network namespace of its own: the fake API server holds N
Services with 4 endpoints each (one slice per Service) and this node's Node; ``python -m
kproxy daemon`` lists, normalizes and programs them. Reported per mode: the time to the first
completed sync, and the daemon's resident memory (VmRSS) once it has settled and its peak
(VmHWM). Upstream reports 926 MiB for nftables kube-proxy at this scale (issue 4).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benches.api_ingest import populate
from kproxy import netns
from tests import k8sobjects as k
from tests.fakeapi import FakeApiServer

NODE = "node-a"


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def breakdown_mib(pid: int) -> dict[str, float]:
    """Resident memory by kind of mapping: the heap (glibc's main arena), anonymous mappings
    (Python's object arenas, other threads' malloc arenas, large blocks), shared objects and
    the Python modules' code, and the rest."""
    out: dict[str, float] = {"heap": 0.0, "anonymous": 0.0, "libraries": 0.0, "other": 0.0}
    kind = "other"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            name = head[5] if len(head) > 5 else ""
            kind = (
                "heap" if name == "[heap]"
                else "anonymous" if name == ""
                else "libraries" if name.startswith("/")
                else "other"
            )  # fmt: skip
        elif head and head[0] == "Rss:":
            out[kind] += int(head[1]) / 1024
    return out


def run(mode: str, n: int, log: Path) -> dict[str, Any]:
    with netns.scratch() as ns, netns.NetnsExecutor(ns) as ex:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        api = ex.call(FakeApiServer)
        ex.call(api.start)
        try:
            ex.call(lambda: populate(api, n), timeout=3600)
            ex.call(lambda: api.put(k.node(NODE, addresses=["127.0.0.1"])))
            args = [
                "ip", "netns", "exec", ns, sys.executable, "-m", "kproxy", "daemon",
                "--master", api.api_url, "--hostname-override", NODE, "--proxy-mode", mode,
                "--cluster-cidr", "10.128.0.0/9", "--min-sync-period", "0",
                "--healthz-bind-address", "127.0.0.1:10256",
                "--metrics-bind-address", "127.0.0.1:10249", "-v", "4",
            ]  # fmt: skip
            with log.open("w") as out:
                start = time.monotonic()
                proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
            try:
                deadline = start + 3600
                while "synced IPv4" not in log.read_text():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{mode}: no sync\n{log.read_text()[-3000:]}")
                    time.sleep(0.2)
                first_sync = time.monotonic() - start
                time.sleep(10)  # let it settle (watches established, garbage collected)
                rss = status_kib(proc.pid, "VmRSS")
                hwm = status_kib(proc.pid, "VmHWM")
                parts = breakdown_mib(proc.pid)
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        finally:
            ex.call(api.close)
    return {"mode": mode, "services": n, "first_sync_s": first_sync, "rss_mib": rss / 1024,
            "peak_rss_mib": hwm / 1024, "rss_by_mapping_mib": parts}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=30000)
    ap.add_argument("--modes", default="nftables,iptables")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = []
    for mode in args.modes.split(","):
        r = run(mode, args.services, Path(f"/tmp/kproxy-memory-{mode}.log"))
        results.append(r)
        print(
            f"{mode:<9} {r['services']} services x 4 endpoints: first sync after "
            f"{r['first_sync_s']:.1f}s, RSS {r['rss_mib']:.0f} MiB (peak {r['peak_rss_mib']:.0f} MiB)"
        )
        print("  resident by mapping: " + ", ".join(
            f"{k} {v:.0f} MiB" for k, v in r["rss_by_mapping_mib"].items()
        ))  # fmt: skip
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, kernel {platform.release()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
