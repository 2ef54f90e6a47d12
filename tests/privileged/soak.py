"""A churn soak: Services with many endpoints added and deleted over and over while a prober
connects continuously, as upstream's iptables performance test churns them.

One iteration puts N Services with E endpoints each (addresses that belong to no pod), plus an
endpoint for the *toggled* Service, waits until the daemon has programmed them, then deletes
them all (and the toggled Service's endpoint) and waits again. Throughout, a prober in a pod
connects to a *stable* Service (three real pods, never changed) and to the toggled one, every
50 ms, each connect bounded by one second. The daemon's RSS is sampled every iteration.

What must hold: no failed sync; every probe of the stable Service answered by one of its pods;
every probe of the toggled one answered by its pod or refused at once (never a timeout); RSS
flat. Used by ``test_churn_soak.py`` (CI and the report in ``docs/reliability.md``).
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests import k8sobjects as k
from tests.privileged.harness import ECHO_IP, ProxyLab, echo_service, echo_slice

TOGGLE_IP = "10.96.0.50"
PROBER = r"""
import json, socket, sys, time
targets = json.loads(sys.argv[1]); until = time.monotonic() + float(sys.argv[2])
while time.monotonic() < until:
    for name, ip in targets:
        s = socket.socket(); s.settimeout(1.0); t = time.monotonic()
        try:
            s.connect((ip, 80)); s.sendall(b"ping\n"); reply = s.recv(256).decode().split(" ")[0]
            out = ("ok", reply)
        except ConnectionRefusedError:
            out = ("refused", "")
        except OSError as e:
            out = ("timeout" if isinstance(e, TimeoutError) else type(e).__name__, "")
        finally:
            s.close()
        print(json.dumps([name, round(t, 3), *out]), flush=True)
    time.sleep(0.05)
"""
_SYNCED = re.compile(r"synced IPv4 \w+: (\d+) service ports")


@dataclass
class SoakResult:
    mode: str
    services: int
    endpoints: int
    seconds: float = 0.0
    iterations: int = 0
    failed_syncs: int = 0
    probes: dict[str, int] = field(default_factory=dict)
    bad_probes: list[list[str]] = field(default_factory=list)
    # Sampled twice a second: (seconds since start, MiB).
    rss_mib: list[tuple[float, float]] = field(default_factory=list)
    iteration_seconds: list[float] = field(default_factory=list)
    # The lowest RSS of each iteration: what stays once transient allocations are returned
    # (a leak raises it; a sync's peak does not).
    rss_floor_mib: list[float] = field(default_factory=list)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _service_ports(lab: ProxyLab) -> int:
    found = _SYNCED.findall(lab.log())
    return int(found[-1]) if found else -1


def _churn_objects(n: int, eps: int) -> list[k.Obj]:
    objs: list[k.Obj] = []
    for i in range(n):
        name = f"churn-{i}"
        objs.append(k.service(name, f"10.97.{i // 256}.{i % 256}", [k.port("http", 80)]))
        endpoints = [
            k.endpoint(f"10.{200 + (i * eps + j) // 65536}.{(i * eps + j) // 256 % 256}."
                       f"{(i * eps + j) % 256}", node="node-b")
            for j in range(eps)
        ]  # fmt: skip
        objs.append(k.endpoint_slice(f"{name}-1", name, endpoints, [k.slice_port("http", 8080)]))
    return objs


def run_soak(
    lab: ProxyLab, minutes: float, services: int = 1000, endpoints: int = 100
) -> SoakResult:
    res = SoakResult(lab.mode, services, endpoints)
    toggle = k.service("toggle", TOGGLE_IP, [k.port("tcp", 80, target=8080)])
    toggle_slice = k.endpoint_slice(
        "toggle-1", "toggle", [k.endpoint("10.244.2.2", node="node-b")], [k.slice_port("tcp", 8080)]
    )
    lab.put(echo_service())
    lab.put(echo_slice(["10.244.1.2", "10.244.2.2", "10.244.3.2"]))
    lab.put(toggle)
    daemon = lab.start_daemon("--metrics-bind-address", "127.0.0.1:10249")
    lab.wait(lambda: _service_ports(lab) >= 3, 30, "the first sync")
    churn = _churn_objects(services, endpoints)
    targets = json.dumps([["stable", ECHO_IP], ["toggle", TOGGLE_IP]])
    budget = minutes * 60
    prober = lab.lab.pod("client").popen(
        [sys.executable, "-c", PROBER, targets, str(budget + 600)],
        stdout=open(lab.log_path.with_suffix(".probes"), "w"),  # noqa: SIM115 (the lab owns it)
    )
    start = time.monotonic()
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            res.rss_mib.append((round(time.monotonic() - start, 1), _rss_mib(daemon.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        base = _service_ports(lab)
        while time.monotonic() - start < budget:
            t0 = time.monotonic()
            for o in churn:
                lab.put(o)
            lab.put(toggle_slice)
            lab.wait(lambda: _service_ports(lab) >= base + services, 600, "churn added")
            for i in range(services):
                lab.delete("EndpointSlice", f"churn-{i}-1")
                lab.delete("Service", f"churn-{i}")
            lab.delete("EndpointSlice", "toggle-1")
            lab.wait(lambda: _service_ports(lab) == base, 600, "churn deleted")
            res.iterations += 1
            res.iteration_seconds.append(time.monotonic() - t0)
            lo, hi = t0 - start, time.monotonic() - start
            res.rss_floor_mib.append(min((m for t, m in res.rss_mib if lo <= t <= hi), default=0))
    finally:
        stop.set()
        sampler.join(timeout=5)
        res.seconds = time.monotonic() - start
        prober.terminate()
        prober.wait(timeout=10)
    res.failed_syncs = lab.log().count("sync failed")
    for line in lab.log_path.with_suffix(".probes").read_text().splitlines():
        name, _, outcome, server = json.loads(line)
        res.probes[f"{name} {outcome}"] = res.probes.get(f"{name} {outcome}", 0) + 1
        good = (
            outcome == "ok" and server in ("pod1", "pod2", "pod3")
            if name == "stable"
            else (outcome == "ok" and server == "pod2") or outcome == "refused"
        )
        if not good:
            res.bad_probes.append([name, outcome, server])
    return res
