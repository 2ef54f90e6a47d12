"""The benchmark suite: every mode, upstream's cluster shapes, the kernel floor, in one run.

Run as root: ``python benches/suite.py [--large] [--smoke]
[--modes iptables,nftables,userspace,ipvs] [--out docs/benchmarks]``. Writes ``suite.json`` (every figure and the machine), ``suite.md``
(the tables) and ``suite_*.png`` (the plots) under ``--out``.

For each mode and shape, in a scratch network namespace of its own (connected to nothing):
the project's fake API server holds the shape's Services and EndpointSlices and this node's
Node; the real daemon (``python -m kproxy daemon --master ...``) starts cold, lists and
watches them, and programs the namespace. Measured:

* **cold start**: from the daemon's start to its first completed sync, split into API ingest
  (until the lists are in, normalization included), Python processing (change-set building
  and encoding: the sync's wall time less the core's), Rust rendering and kernel apply (the
  core's own timers);
* **one-service change** (the Service's port moves, 80 -> 81 -> 80) and **one-endpoint change**
  (an endpoint is added to a slice): from the API server's write to the daemon's completed
  partial sync, end to end (watch latency included), median of three each;
* **RSS**: the daemon's resident memory once settled;
* **floor**: the rules the daemon programmed, read back and applied in a fresh namespace by
  the kernel's tools alone (``iptables-restore`` of ``iptables-save``, as one transaction, up
  to ``--floor-max`` Services; ``nft -f`` of the listed table; in the ipvs mode ``ipset
  restore``, ``iptables-restore`` and ``ipvsadm-restore`` of what their save commands
  print), in the same run;
* **upstream shape** (single-group shapes up to ``--baseline-max`` services): the same
  cluster in upstream's layout applied by the tool (iptables: flat shared chains;
  nftables: a verdict map per Service), as ``benches/iptables_sync.py`` and
  ``benches/nftables_sync.py`` build them; ipvs: the same sets and rules, and the IPVS table
  sent one netlink request per object with a wait for each answer, as upstream's proxier
  does (the floor sends it batched, as kproxy does).

Then a **churn** run, modelled on upstream's: 1,000 Services x 100 endpoints added, then
deleted, repeatedly; each phase's time to a completed sync, and failed syncs.

Shapes (perf-anchors section 7): 100, 1,000, 5,000 and 10,000 Services x 10 endpoints;
clusterloader2's mix (per 100 nodes: 149 Services x 5, 12 x 30, 1 x 250) scaled to 5,000
nodes; one Service x 1,000 endpoints; 30,000 x 4 (nftables; every mode with ``--large``);
one Service x 100,000 endpoints (``--large``).

The ipvs mode needs a kernel with ip_vs. Where the host has none, the suite runs its ipvs
rows in a VM (``benches/vm.py``: qemu without KVM, 2 vCPUs) up to ``--vm-max-services``
Services: every figure there is slowed by emulation, so compare them with each other (apply
vs floor), not with the host's rows. Ratios are the headline; absolute times belong to this
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benches import vm
from benches.daemon_memory import status_kib
from benches.iptables_sync import cluster as cluster_changes
from benches.iptables_sync import parse as parse_restore
from benches.iptables_sync import upstream_text, without_counters
from benches.ipvs_program import PROGRAM as IPVS_PROGRAM
from benches.ipvs_program import build as build_ipvs_program
from benches.nftables_sync import upstream_like
from kproxy import _core, netns
from tests import k8sobjects as k
from tests.fakeapi import FakeApiServer

NODE = "node-a"
NODE_IP = "192.168.200.1"
SLICE_MAX = 1000  # endpoints per EndpointSlice, as the API server enforces
SAVE_MAX = 50_000  # endpoints iptables-save is trusted to read back

# name -> [(services, endpoints each)]
SHAPES: dict[str, list[tuple[int, int]]] = {
    "100x10": [(100, 10)],
    "1000x10": [(1000, 10)],
    "5000x10": [(5000, 10)],
    "10000x10": [(10000, 10)],
    "cl2-5000-nodes": [(149 * 50, 5), (12 * 50, 30), (1 * 50, 250)],
    "1x1000": [(1, 1000)],
    "30000x4": [(30000, 4)],
    "1x100000": [(1, 100000)],
}
DEFAULT = ["100x10", "1000x10", "5000x10", "10000x10", "cl2-5000-nodes", "1x1000"]
SMOKE = ["100x10", "1x1000"]

# The focused benchmarks (``--focused``): name -> (arguments of a full run, of a smoke run).
# Each compares kproxy with its baseline in the same run; their defaults are the sizes the
# issues name (30,000 Services and more), so a full run takes about an hour here.
FOCUSED: dict[str, tuple[list[str], list[str]]] = {
    "userspace_forward": (["--seconds", "5", "--repeat", "5"], ["--seconds", "1", "--repeat", "1"]),
    "ipvs_program": ([], ["--services", "100"]),
    "first_packet": ([], ["--sizes", "100,1000", "--connects", "200"]),
    "api_ingest": ([], ["--services", "1000", "--repeat", "1"]),
    "daemon_memory": ([], ["--services", "1000"]),
    "nftables_sync": ([], ["--shapes", "1000x10", "--repeat", "1"]),
    "iptables_sync": ([], ["--shapes", "1000x10"]),
    # The core's sync paths against the build before the per-mode refactor (#24); the smoke
    # run compares this tree with itself.
    "core_ab": (
        ["--build", "c575aa5", "--rounds", "7"],
        ["--baseline", "python", "--shapes", "20x2", "--rounds", "2", "--changes", "3"],
    ),
}

_FIRST = re.compile(r"first sync done ([\d.]+)s after start \(lists received after ([\d.]+)s\)")
_SYNCED = re.compile(
    r"synced IPv4 (full|partial): (\d+) service ports.*\(render ([\d.]+)ms, apply ([\d.]+)ms, "
    r"total ([\d.]+)ms\)"
)


def groups(shape: str) -> list[tuple[int, int]]:
    """A named shape's (Services, endpoints each) groups; any other ``NxM`` is one group."""
    if shape in SHAPES:
        return SHAPES[shape]
    m = re.fullmatch(r"(\d+)x(\d+)", shape)
    if m is None:
        raise SystemExit(f"no shape {shape!r}: one of {', '.join(SHAPES)}, or NxM")
    return [(int(m.group(1)), int(m.group(2)))]


def total_services(shape: str) -> int:
    return sum(n for n, _ in groups(shape))


def total_endpoints(shape: str) -> int:
    return sum(n * e for n, e in groups(shape))


# -- the cluster on the fake API server ----------------------------------------------------


def objects(shape: str) -> list[k.Obj]:
    """Services (one TCP port each, distinct ClusterIPs) and their slices, addresses unique."""
    out: list[k.Obj] = []
    i = ep = 0
    for count, eps in groups(shape):
        for _ in range(count):
            name, ns = f"svc{i}", f"ns{i % 50}"
            ip = f"172.{16 + i // 65536}.{(i // 256) % 256}.{i % 256}"
            out.append(k.service(name, ip, [k.port("http", 80, target=8080)], namespace=ns))
            addrs = [_pod_ip(ep + j) for j in range(eps)]
            ep += eps
            for s in range(0, eps, SLICE_MAX):
                chunk = [k.endpoint(a, node=NODE) for a in addrs[s : s + SLICE_MAX]]
                out.append(k.endpoint_slice(f"{name}-{s // SLICE_MAX}", name, chunk,
                                            [k.slice_port("http", 8080)], namespace=ns))  # fmt: skip
            i += 1
    return out


def _pod_ip(n: int) -> str:
    return f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}"


# -- one daemon run --------------------------------------------------------------------------


class Daemon:
    """The real daemon in `ns`, logging to `log`."""

    def __init__(self, ns: str, api_url: str, mode: str, log: Path) -> None:
        self.log = log
        args = [
            "ip", "netns", "exec", ns, sys.executable, "-m", "kproxy", "daemon",
            "--master", api_url, "--hostname-override", NODE, "--proxy-mode", mode,
            "--cluster-cidr", "10.0.0.0/8", "--min-sync-period", "0",
            "--healthz-bind-address", "", "--metrics-bind-address", "", "-v", "2",
            # A portal listener per Service port: 30,000 of them do not fit the kernel's
            # ephemeral range, which the pool uses by default.
            *(["--proxy-port-range", "20000-65000"] if mode == "userspace" else []),
        ]  # fmt: skip
        with log.open("w") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text()

    def wait(self, pred: Callable[[str], bool], timeout: float, what: str) -> float:
        """Poll the log every 2 ms until `pred` holds; the monotonic time it did."""
        deadline = time.monotonic() + timeout
        while True:
            if pred(self.text()):
                return time.monotonic()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no {what}:\n{self.text()[-3000:]}")
            time.sleep(0.002)

    def rss_mib(self) -> float:
        # `ip netns exec` execs the daemon: the child is the daemon itself.
        return status_kib(self.proc.pid, "VmRSS") / 1024

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def partial_syncs(text: str) -> int:
    return sum(1 for m in _SYNCED.finditer(text) if m.group(1) == "partial")


def measure(
    mode: str, shape: str, workdir: Path, floor_max: int, baseline_max: int
) -> dict[str, Any]:
    objs = objects(shape)
    res: dict[str, Any] = {"mode": mode, "shape": shape, "services": total_services(shape),
                           "endpoints": total_endpoints(shape)}  # fmt: skip
    with netns.scratch() as ns, netns.NetnsExecutor(ns) as ex:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        # The node's address, on a veth pair that stays inside the namespace.
        for cmd in (["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
                    ["addr", "add", f"{NODE_IP}/24", "dev", "eth0"],
                    ["link", "set", "eth0", "up"], ["link", "set", "eth1", "up"]):  # fmt: skip
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        api = ex.call(FakeApiServer)
        ex.call(api.start)
        try:
            ex.call(lambda: [api.put(o) for o in objs], timeout=3600)
            ex.call(lambda: api.put(k.node(NODE, addresses=[NODE_IP])))
            d = Daemon(ns, api.api_url, mode, workdir / f"{mode}-{shape}.log")
            saved = ""
            try:
                res.update(cold_start(d))
                # One iptables-restore of a large table takes minutes (upstream's own cost):
                # the iptables floor stops at --floor-max Services.
                with_floor = mode in ("nftables", "ipvs") or (
                    mode == "iptables" and total_services(shape) <= floor_max
                )
                g = groups(shape)
                if with_floor and mode == "iptables" and total_endpoints(shape) > SAVE_MAX:
                    # iptables-save crashed (SIGSEGV) reading one Service x 100,000 back:
                    # load what kproxy renders for the same cluster instead.
                    if len(g) == 1:
                        saved = rendered_iptables(*g[0])
                elif with_floor:
                    saved = programmed(mode, ns)  # what the first sync wrote
                time.sleep(2)  # settle: watches established, garbage collected
                res["rss_mib"] = d.rss_mib()
                res.update(changes(d, api, ex, objs))
                res["rss_after_changes_mib"] = d.rss_mib()
                if mode == "userspace":
                    res["listeners_refused"] = listeners_refused(d.text())
            finally:
                d.stop()
            if saved:
                res["floor_s"] = _timed_load(mode, saved)
            if mode == "ipvs" and saved and total_services(shape) <= baseline_max:
                # Upstream's ipvs proxier: the same sets and rules, IPVS one request at a time.
                res["upstream_shape_s"] = _timed_load(mode, saved, "per_object")
        finally:
            ex.call(api.close)
    return res


_REFUSED_IN_ALL = re.compile(r"more listeners could not be opened \((\d+) in all\)")
# klog's header for an error line of the daemon (kproxy.logs): "E1202 03:07:48.642123 ...".
_REFUSED = re.compile(r"^E\d{4} [\d:.]+ +\d+ \w+\.py:\d+\] (.*cannot listen on .*)$", re.M)


def listeners_refused(text: str) -> int:
    """Listeners the userspace daemon could not open (each failure is logged once, or
    counted in a summary line)."""
    summed = [int(n) for n in _REFUSED_IN_ALL.findall(text)]
    return max([len(set(_REFUSED.findall(text))), *summed])


def cold_start(d: Daemon) -> dict[str, Any]:
    d.wait(lambda t: _FIRST.search(t) is not None and _full_synced(t), 3600, "first sync")
    text = d.text()
    first = _FIRST.search(text)
    synced = next(m for m in _SYNCED.finditer(text) if m.group(1) == "full")
    assert first is not None
    render, apply, total = (float(synced.group(i)) / 1e3 for i in (3, 4, 5))
    cold, ingest = float(first.group(1)), float(first.group(2))
    # The cold start ends when the first sync has programmed the node ("first sync done");
    # the sync's own total also counts what follows it (the conntrack reconciler, metrics).
    python = min(total, cold - ingest) - render - apply
    return {
        "cold_start_s": cold,
        "api_ingest_s": ingest,
        "python_s": max(0.0, python),
        "render_s": render,
        "apply_s": apply,
        "sync_s": total,
    }


def _full_synced(text: str) -> bool:
    return any(m.group(1) == "full" for m in _SYNCED.finditer(text))


def changes(
    d: Daemon, api: FakeApiServer, ex: netns.NetnsExecutor, objs: list[k.Obj]
) -> dict[str, Any]:
    """Median end-to-end time of three one-service and three one-endpoint changes.

    The Service's change moves its port (80 -> 81 -> 80): everything the Service owns is
    rewritten, in every mode. (Toggling session affinity instead would measure a change of
    layout, and leave the endpoint changes that follow measuring it too.)"""
    svc = next(o for o in objs if o["kind"] == "Service")
    sl = next(o for o in objs if o["kind"] == "EndpointSlice")
    one_service: list[float] = []
    one_endpoint: list[float] = []
    for i in range(3):
        svc = json.loads(json.dumps(svc))
        svc["spec"]["ports"][0]["port"] = 81 if i % 2 == 0 else 80
        one_service.append(_change(d, api, ex, svc))
        sl = json.loads(json.dumps(sl))
        sl["endpoints"].append(k.endpoint(f"10.255.{i}.1", node=NODE))
        one_endpoint.append(_change(d, api, ex, sl))
    return {"one_service_s": statistics.median(one_service),
            "one_endpoint_s": statistics.median(one_endpoint)}  # fmt: skip


def _change(d: Daemon, api: FakeApiServer, ex: netns.NetnsExecutor, obj: k.Obj) -> float:
    before = partial_syncs(d.text())
    t0 = time.monotonic()
    ex.call(lambda: api.put(obj))
    done = d.wait(lambda t: partial_syncs(t) > before, 600, "partial sync")
    return done - t0


# -- the floor and upstream's shape --------------------------------------------------------


def _in(ns: str, argv: list[str], stdin: str | None = None) -> str:
    r = subprocess.run(["ip", "netns", "exec", ns, *argv], input=stdin, capture_output=True,
                       text=True, check=False, timeout=3600)  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return r.stdout


def _timed_load(mode: str, text: str, ipvs_way: str = "batched") -> float:
    """Load what `programmed` read, by the tools alone, into a fresh namespace. The ipvs mode's
    IPVS table goes in through ``ipvs_program load``: batched netlink (the floor), or one
    request per object (``per_object``: upstream's way)."""
    loads = {
        "iptables": [(["iptables-restore", "--noflush"], without_counters(text))],
        "nftables": [(["nft", "-f", "-"], text)],
    }
    if mode == "ipvs":
        saved = json.loads(text)
        loads["ipvs"] = [(["ipset", "restore"], saved["ipset"]),
                         (["iptables-restore", "--noflush"], without_counters(saved["iptables"])),
                         ([str(IPVS_PROGRAM), "load", ipvs_way], saved["ipvs"])]  # fmt: skip
    with netns.scratch() as fresh:
        # Loopback up: without it the namespace has no local routing table, and IPVS takes
        # every real server for a broadcast address.
        subprocess.run(["ip", "-n", fresh, "link", "set", "lo", "up"], check=True)
        t = time.perf_counter()
        for argv, stdin in loads[mode]:
            _in(fresh, argv, stdin)
        return time.perf_counter() - t


def programmed(mode: str, ns: str) -> str:
    """What the daemon programmed in `ns`, as the kernel's tools print it (and reload it: the
    floor is that load, by the tools alone, in a fresh namespace)."""
    if mode == "iptables":
        return _in(ns, ["iptables-save"])
    if mode == "ipvs":
        return json.dumps({"ipset": _in(ns, ["ipset", "save"]),
                           "iptables": _in(ns, ["iptables-save"]),
                           "ipvs": _in(ns, ["ipvsadm-save", "-n"])})  # fmt: skip
    return _in(ns, ["nft", "list", "table", "ip", "kproxy"])


def rendered_iptables(n: int, eps: int) -> str:
    """The iptables-restore input kproxy renders for a full sync of `n` x `eps`."""
    engine = _core.Engine(json.dumps({"family": "IPv4", "node_name": "n", "backend": "fake",
                                      "cluster_cidrs": ["10.0.0.0/8"]}))  # fmt: skip
    engine.sync(cluster_changes(n, eps).to_json(), True)
    return engine.render()


def upstream_shape(mode: str, n: int, eps: int) -> float:
    """Upstream's layout of the same cluster, applied by the tool (a full sync)."""
    if mode == "nftables":
        return _timed_load(mode, upstream_like(cluster_changes(n, eps)))
    return _timed_load(mode, upstream_text(parse_restore(rendered_iptables(n, eps)), None))


# -- churn -----------------------------------------------------------------------------------


def churn(mode: str, iterations: int, services: int, eps: int, workdir: Path) -> dict[str, Any]:
    """Upstream's churn: `services` x `eps` added, then deleted, `iterations` times."""
    res: dict[str, Any] = {"mode": mode, "services": services, "endpoints_per_service": eps,
                           "add_s": [], "delete_s": [], "failed_syncs": 0}  # fmt: skip
    churned = [o for o in objects_for(services, eps, offset=1000)]
    with netns.scratch() as ns, netns.NetnsExecutor(ns) as ex:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        api = ex.call(FakeApiServer)
        ex.call(api.start)
        try:
            ex.call(lambda: api.put(k.node(NODE, addresses=["127.0.0.1"])))
            ex.call(lambda: [api.put(o) for o in objects("100x10")])
            d = Daemon(ns, api.api_url, mode, workdir / f"{mode}-churn.log")
            try:
                d.wait(lambda t: _FIRST.search(t) is not None, 600, "first sync")
                for _ in range(iterations):
                    for phase, want in (("add_s", 100 + services), ("delete_s", 100)):
                        t0 = time.monotonic()
                        if phase == "add_s":
                            ex.call(lambda: [api.put(o) for o in churned], timeout=600)
                        else:
                            ex.call(lambda: [api.delete(o["kind"], o["metadata"]["namespace"],
                                                        o["metadata"]["name"])
                                             for o in churned], timeout=600)  # fmt: skip
                        done = d.wait(_ports_are(want), 1800, phase)
                        res[phase].append(done - t0)
                res["failed_syncs"] = d.text().count("sync failed")
                res["rss_mib"] = d.rss_mib()
            finally:
                d.stop()
        finally:
            ex.call(api.close)
    return res


def objects_for(services: int, eps: int, offset: int) -> list[k.Obj]:
    out: list[k.Obj] = []
    for i in range(services):
        name = f"churn{i}"
        ip = f"172.31.{(offset + i) // 256 % 256}.{(offset + i) % 256}"
        out.append(k.service(name, ip, [k.port("http", 80, target=8080)]))
        eps_ = [k.endpoint(f"10.200.{(i * eps + j) // 256 % 256}.{(i * eps + j) % 256}",
                           node=NODE) for j in range(eps)]  # fmt: skip
        out.append(k.endpoint_slice(f"{name}-0", name, eps_, [k.slice_port("http", 8080)]))
    return out


def _ports_are(want: int) -> Callable[[str], bool]:
    return lambda text: _last_ports(text) == want


def _last_ports(text: str) -> int:
    found = [m for m in _SYNCED.finditer(text)]
    return int(found[-1].group(2)) if found else -1


# -- the ipvs mode in a VM -------------------------------------------------------------------


def ipvs_in_vm(shapes: list[str], floor_max: int, baseline_max: int) -> list[dict[str, Any]]:
    """This suite's ipvs rows, measured by the suite itself in a VM whose kernel has ip_vs."""
    if not shapes:
        return []
    if not vm.available():
        print(f"ipvs rows skipped: {vm.MISSING}", file=sys.stderr)
        return []
    script = (
        f"modprobe ip_vs && cd {REPO} && {sys.executable} {Path(__file__).resolve()} "
        f"--modes ipvs --shapes {','.join(shapes)} --no-churn --rows-only "
        f"--floor-max {floor_max} --baseline-max {baseline_max}"
    )
    build_ipvs_program()
    with tempfile.TemporaryDirectory() as tmp:
        run = vm.run(script, cwd=Path(tmp), timeout=3600, memory="3G", cpus=2)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{"mode"')]
    if run.returncode != 0 or len(rows) != len(shapes):
        raise RuntimeError(f"the VM's ipvs rows failed:\n{run.stdout[-3000:]}{run.stderr[-3000:]}")
    for r in rows:
        r["vm"] = f"qemu without KVM, {Path(vm.kernel() or '?').name}"
    return rows


# -- the focused benchmarks ------------------------------------------------------------------


def focused(names: list[str], smoke: bool, out: Path) -> list[dict[str, Any]]:
    """Run each focused benchmark; its output goes to ``<name>.txt`` and ``<name>.json``."""
    done = []
    for name in names:
        args = FOCUSED[name][1 if smoke else 0]
        argv = [sys.executable, str(REPO / "benches" / f"{name}.py"), *args,
                "--json", str(out / f"{name}.json")]  # fmt: skip
        t = time.monotonic()
        run = subprocess.run(argv, capture_output=True, text=True, timeout=4 * 3600, cwd=REPO,
                             check=False)  # fmt: skip
        command = " ".join(["python", f"benches/{name}.py", *args])
        m = machine()
        (out / f"{name}.txt").write_text(
            f"machine: {m['arch']}, {m['cpus']} cpus, kernel {m['kernel']} "
            f"({time.strftime('%Y-%m-%d')})\n{command}\n\n{run.stdout}"
            + (f"\nfailed ({run.returncode}):\n{run.stderr[-3000:]}" if run.returncode else "")
        )
        r = {"name": name, "command": command, "seconds": time.monotonic() - t,
             "ok": run.returncode == 0}  # fmt: skip
        done.append(r)
        print(json.dumps(r), flush=True)
    return done


# -- the report ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    def tool(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            return r.stdout.strip()
        except OSError:
            return "?"

    return {
        "arch": platform.machine(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "iptables": tool(["iptables", "--version"]),
        "nft": tool(["nft", "--version"]),
        # (soft, hard): what a daemon started from here may hold open.
        "nofile": "{:,} / {:,}".format(*resource.getrlimit(resource.RLIMIT_NOFILE)),
    }


def label(r: dict[str, Any]) -> str:
    return f"{r['mode']} (VM)" if r.get("vm") else str(r["mode"])


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    out = [
        "# Benchmark suite",
        "",
        f"`python benches/suite.py{' --large' if report['large'] else ''}"
        f"{' --smoke' if report['smoke'] else ''}` on {m['arch']}, "
        f"{m['cpus']} CPUs, kernel {m['kernel']}, {m['iptables']}, {m['nft']}, Python "
        f"{m['python']}; {report['seconds']:.0f} s in all. Ratios are the headline; absolute "
        "times belong to this machine.",
        "",
        "## Cold start, changes, memory",
        "",
        "Cold start: daemon start to first completed sync = API ingest + Python processing + "
        "Rust rendering + kernel apply. Changes: the API server's write to the daemon's "
        "completed partial sync (median of 3). Floor: the same rules loaded by the kernel's "
        "tool alone. Upstream shape: the same cluster in upstream's layout, loaded by the tool.",
        *(
            [
                "",
                "Rows marked (VM) ran in a VM (this host's kernel has no ip_vs): "
                f"{next(r['vm'] for r in report['runs'] if r.get('vm'))}. Emulation slows "
                "everything there, the tools alike: compare those rows with each other, not with "
                "the host's.",
            ]
            if any(r.get("vm") for r in report["runs"])
            else []
        ),
        "",
        "| mode | shape | services | endpoints | cold start | ingest | python | render | "
        "apply | floor | apply / floor | upstream shape | one-service change | "
        "one-endpoint change | RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        floor_s = r.get("floor_s")
        up = r.get("upstream_shape_s")
        out.append(
            f"| {label(r)} | {r['shape']} | {r['services']:,} | {r['endpoints']:,} | "
            f"{r['cold_start_s']:.2f} s | {r['api_ingest_s']:.2f} s | {r['python_s']:.2f} s | "
            f"{r['render_s']:.3f} s | {r['apply_s']:.2f} s | "
            + (f"{floor_s:.2f} s | {r['apply_s'] / floor_s:.2f}x | " if floor_s else "- | - | ")
            + (f"{up:.2f} s | " if up is not None else "- | ")
            + f"{r['one_service_s'] * 1e3:.0f} ms | {r['one_endpoint_s'] * 1e3:.0f} ms | "
            f"{r['rss_mib']:.0f} MiB |"
        )
    for r in report["runs"]:
        if r.get("listeners_refused"):
            out += ["", f"{label(r)} {r['shape']}: {r['listeners_refused']:,} of its "
                    f"{r['services']:,} listeners were refused, for want of descriptors: this "
                    f"machine's open-file limit (soft / hard) is {report['machine'].get('nofile', '?')} and "
                    "the daemon may not raise it (no CAP_SYS_RESOURCE); the forwarder keeps a "
                    "quarter of it for connections. The other Services were programmed."]  # fmt: skip
    if report["churn"]:
        out += ["", "## Churn", "", "| mode | services x endpoints | iterations | add (each) | "
                "delete (each) | failed syncs | RSS after |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for c in report["churn"]:
            out.append(
                f"| {c['mode']} | {c['services']:,} x {c['endpoints_per_service']} | "
                f"{len(c['add_s'])} | {', '.join(f'{s:.1f} s' for s in c['add_s'])} | "
                f"{', '.join(f'{s:.1f} s' for s in c['delete_s'])} | {c['failed_syncs']} | "
                f"{c['rss_mib']:.0f} MiB |"
            )
    if report.get("focused"):
        out += ["", "## Focused benchmarks", "", "Each against its baseline in the same run; "
                "the figures are in the files named.", "", "| benchmark | command | time | "
                "result |", "|---|---|---|---|"]  # fmt: skip
        for f in report["focused"]:
            out.append(
                f"| {f['name']} | `{f['command']}` | {f['seconds']:.0f} s | "
                + (f"[{f['name']}.txt]({f['name']}.txt)" if f["ok"] else "**failed**")
                + " |"
            )
    out += ["", "Plots: `suite_sync_time.png` (cold-start sync time, floor and upstream shape "
            "vs services), `suite_changes.png` (change latency vs services).", ""]  # fmt: skip
    return "\n".join(out)


def plots(report: dict[str, Any], out: Path) -> None:
    single = [r for r in report["runs"] if len(groups(r["shape"])) == 1
              and groups(r["shape"])[0][0] > 1]  # fmt: skip
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for mode in sorted({label(r) for r in single}):
        rs = sorted((r for r in single if label(r) == mode), key=lambda r: r["services"])
        xs = [r["services"] for r in rs]
        ax.plot(xs, [r["render_s"] + r["apply_s"] for r in rs], "o-", label=f"{mode}: sync")
        if any("floor_s" in r for r in rs):
            ax.plot(xs, [r.get("floor_s", float("nan")) for r in rs], "x--",
                    label=f"{mode}: floor (tool alone)")  # fmt: skip
        up = [r for r in rs if r.get("upstream_shape_s") is not None]
        if up:
            ax.plot([r["services"] for r in up], [r["upstream_shape_s"] for r in up], "s:",
                    label=f"{mode}: upstream shape")  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="services (one port each)",
           ylabel="full sync, seconds", title="Full sync time vs services")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "suite_sync_time.png", dpi=110)

    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for mode in sorted({label(r) for r in single}):
        rs = sorted((r for r in single if label(r) == mode), key=lambda r: r["services"])
        xs = [r["services"] for r in rs]
        ax.plot(xs, [r["one_service_s"] * 1e3 for r in rs], "o-", label=f"{mode}: one service")
        ax.plot(xs, [r["one_endpoint_s"] * 1e3 for r in rs], "x--",
                label=f"{mode}: one endpoint")  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="services", ylabel="end to end, ms",
           title="A one-object change, API write to programmed")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "suite_changes.png", dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="iptables,nftables,userspace,ipvs")
    ap.add_argument("--large", action="store_true", help="also 30,000 x 4 everywhere, 1 x 100,000")
    ap.add_argument("--smoke", action="store_true", help="two small shapes, a small churn (CI)")
    ap.add_argument("--shapes", help=f"comma-separated: any of {', '.join(SHAPES)}, or NxM")
    ap.add_argument("--no-churn", action="store_true")
    ap.add_argument("--baseline-max", type=int, default=5000, help="upstream shapes up to N")
    ap.add_argument("--floor-max", type=int, default=5000, help="iptables floor up to N")
    ap.add_argument("--churn-iterations", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    ap.add_argument(
        "--focused",
        nargs="?",
        const=",".join(FOCUSED),
        default="",
        help=f"also the focused benchmarks (all, or some of {', '.join(FOCUSED)})",
    )
    ap.add_argument("--vm-max-services", type=int, default=100,
                    help="ipvs rows in the VM: shapes up to N Services (and 10 N endpoints)")  # fmt: skip
    ap.add_argument("--rows-only", action="store_true",
                    help="print the rows, write no report (how the VM runs its part)")  # fmt: skip
    args = ap.parse_args()
    modes = args.modes.split(",")
    started = time.monotonic()
    workdir = Path("/tmp/kproxy-suite")
    workdir.mkdir(exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    plan: list[tuple[str, str]] = []
    for mode in modes:
        shapes = (
            SMOKE if args.smoke else [*DEFAULT, *(["30000x4", "1x100000"] if args.large else [])]
        )
        if not args.smoke and not args.large and mode == "nftables":
            shapes = [*shapes, "30000x4"]
        if args.shapes:
            shapes = args.shapes.split(",")
        plan += [(mode, s) for s in shapes]
    runs = []
    in_vm = [s for m, s in plan if m == "ipvs" and not vm.has_ip_vs()]
    if args.smoke:
        in_vm = in_vm[:1]  # one boot, one small shape
    if in_vm:
        plan = [(m, s) for m, s in plan if m != "ipvs"]
        runs += ipvs_in_vm(
            [s for s in in_vm if total_services(s) <= args.vm_max_services
             and total_endpoints(s) <= args.vm_max_services * 10],
            args.floor_max, args.baseline_max,
        )  # fmt: skip
    for mode, shape in plan:
        r = measure(mode, shape, workdir, args.floor_max, args.baseline_max)
        g = groups(shape)
        if mode in ("iptables", "nftables") and len(g) == 1 and g[0][0] > 1:
            # (the ipvs mode's upstream shape is measured in `measure`, from what it wrote)
            n, eps = g[0]
            if n <= args.baseline_max:
                r["upstream_shape_s"] = upstream_shape(mode, n, eps)
        runs.append(r)
        print(json.dumps(r), flush=True)
    churn_runs = []
    churn_modes = [m for m in modes if m == "nftables" or (args.large and m == "iptables")]
    if args.no_churn:
        churn_modes = []
    for mode in churn_modes:
        n, eps, its = (50, 10, 1) if args.smoke else (1000, 100, args.churn_iterations)
        c = churn(mode, its, n, eps, workdir)
        churn_runs.append(c)
        print(json.dumps(c), flush=True)
    if args.rows_only:
        return 0
    names = [n for n in args.focused.split(",") if n]
    unknown = set(names) - set(FOCUSED)
    if unknown:
        raise SystemExit(f"--focused: no benchmark {', '.join(sorted(unknown))}")
    report = {"machine": machine(), "large": args.large, "smoke": args.smoke, "runs": runs,
              "churn": churn_runs, "focused": focused(names, args.smoke, args.out),
              "seconds": time.monotonic() - started}  # fmt: skip
    (args.out / "suite.json").write_text(json.dumps(report, indent=2))
    (args.out / "suite.md").write_text(markdown(report))
    plots(report, args.out)
    print(f"wrote {args.out}/suite.json, suite.md, suite_*.png in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
