"""The core's sync paths, this tree against another build of kproxy, side by side in one run.

For a refactor that must not slow anything down: ``python benches/core_ab.py --baseline DIR``
where ``DIR`` is the ``python/`` directory of another checkout with its extension built in
(``maturin build`` there, and the wheel's ``kproxy/_core.abi3.so`` unpacked into
``DIR/kproxy``; ``--build REV`` does both from a git revision of this repository, and
removes them afterwards). ``--json PATH`` writes the report as JSON too.

Each mode and shape (Services x endpoints, one TCP port each) runs in a fresh worker process
per build, alternating baseline and candidate for ``--rounds`` rounds. A worker builds the
cluster with its own build's Python model (so each build encodes its own change sets), then
times, through ``_core.Engine`` directly:

* **full**: the first full sync of the whole cluster;
* **change**: a one-Service partial sync (its endpoints move, then move back), median of
  ``--changes`` syncs;

with the in-memory Fake (``--backend fake``: rendering and bookkeeping, what a refactor of the
core touches) or the real kernel (``--backend kernel``, root: each worker in a new network
namespace of its own, made by ``unshare --net`` and gone when it exits; iptables and nftables
only). The report gives each build's median and the candidate/baseline ratio, with the
machine and kernel. Ratios are the headline; these machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

# A worker imports whichever build its PYTHONPATH names first (the driver imports its own,
# unused): each build encodes its change sets with its own model.
from kproxy import _core
from kproxy.model import Endpoint, EndpointSlice, PortSpec, Service, ServiceKey, SlicePort
from kproxy.tracker import ChangeSet, merge_slices

HERE = Path(__file__).resolve().parent.parent


def cluster(n: int, eps: int) -> tuple[Any, Any, Any]:
    """The cluster, a one-Service change and its reversal, in the importing build's model."""

    def slices(key: Any, name: str, ips: list[str]) -> Any:
        port = (SlicePort("http", "TCP", 8080),)
        eps_ = tuple(Endpoint(ip, node_name="n") for ip in ips)
        return merge_slices([EndpointSlice(key.namespace, name, key, "IPv4", port, eps_)])

    def ip(k: int) -> str:
        return f"10.{k // 65536 % 256}.{k // 256 % 256}.{k % 256}"

    services: dict[Any, Any] = {}
    endpoints: dict[Any, Any] = {}
    for i in range(n):
        key = ServiceKey(f"ns{i % 50}", f"svc{i}")
        vip = f"172.{16 + i // 65536}.{(i // 256) % 256}.{i % 256}"
        services[key] = Service(key, (PortSpec("http", "TCP", 80),), cluster_ips=(vip,))
        endpoints[key] = slices(key, f"svc{i}-x", [ip(i * eps + j) for j in range(eps)])
    key = ServiceKey(f"ns{(n // 2) % 50}", f"svc{n // 2}")
    moved = [f"10.250.{j // 256}.{j % 256}" for j in range(eps)]
    back = [ip((n // 2) * eps + j) for j in range(eps)]
    return (
        ChangeSet(services, endpoints),
        ChangeSet({}, {key: slices(key, "moved", moved)}),
        ChangeSet({}, {key: slices(key, f"svc{n // 2}-x", back)}),
    )


def worker(mode: str, backend: str, n: int, eps: int, changes: int) -> dict[str, float]:
    full, there, back = cluster(n, eps)
    cfg = {"family": "IPv4", "node_name": "n", "cluster_cidrs": ["10.0.0.0/8"],
           "node_ips": ["192.168.0.2"], "backend": backend, "mode": mode}  # fmt: skip
    e = _core.Engine(json.dumps(cfg))
    t0 = time.perf_counter()
    e.sync(full.to_json(), True)
    full_s = time.perf_counter() - t0
    times = []
    for i in range(changes):
        cs = there if i % 2 == 0 else back
        t0 = time.perf_counter()
        e.sync(cs.to_json(), False)
        times.append(time.perf_counter() - t0)
    return {"full": full_s, "change": statistics.median(times)}


def run_worker(tree: Path, mode: str, backend: str, shape: str, changes: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, backend, shape]
    cmd += ["--changes", str(changes)]
    if backend == "kernel":
        cmd = ["unshare", "--net", *cmd]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    if out.returncode != 0:
        raise SystemExit(f"worker {tree} {mode} {shape} failed:\n{out.stderr[-2000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def build(rev: str) -> Path:
    """Check ``rev`` out beside this tree, build its extension, return its ``python/``."""
    root = Path(tempfile.mkdtemp(prefix="kproxy-ab-"))
    src = root / "src"
    subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", str(src), rev],
                   check=True)  # fmt: skip
    dist = root / "dist"
    subprocess.run(["maturin", "build", "--release", "-q", "-o", str(dist)], cwd=src, check=True,
                   env={**os.environ, "CARGO_TARGET_DIR": str(root / "target")})  # fmt: skip
    unpack(next(dist.glob("*.whl")), src / "python")
    return src / "python"


def unpack(wheel: Path, tree: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.startswith("kproxy/_core"))
        (tree / name).write_bytes(z.read(name))


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())  # fmt: skip
    return {"kernel": platform.release(), "cpu": cpu, "cpus": str(os.cpu_count())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", type=Path, help="another build's python/ directory")
    p.add_argument("--build", metavar="REV", help="build the baseline from this git revision")
    p.add_argument("--candidate", type=Path, default=HERE / "python")
    p.add_argument("--modes", default="iptables,nftables,ipvs,userspace")
    p.add_argument("--shapes", default="1000x10,5000x10")
    p.add_argument("--backend", choices=("fake", "kernel"), default="fake")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--changes", type=int, default=9)
    p.add_argument("--json", type=Path, help="write the report as JSON here too")
    p.add_argument(
        "--worker", nargs=3, metavar=("MODE", "BACKEND", "SHAPE"), help=argparse.SUPPRESS
    )
    a = p.parse_args()
    if a.worker:
        mode, backend, shape = a.worker
        n, eps = (int(x) for x in shape.split("x"))
        print(json.dumps(worker(mode, backend, n, eps, a.changes)))
        return 0
    base = a.baseline or (build(a.build) if a.build else None)
    if base is None:
        p.error("give --baseline DIR or --build REV")
    rows = []
    print(f"baseline {base}, candidate {a.candidate}, backend {a.backend}, {machine()}")
    print(f"{'mode':<10} {'shape':>9} {'':>6} {'baseline':>10} {'candidate':>10} {'ratio':>6}")
    for mode in a.modes.split(","):
        for shape in a.shapes.split(","):
            got: dict[str, list[dict[str, float]]] = {"baseline": [], "candidate": []}
            for r in range(a.rounds):
                order = [("baseline", base), ("candidate", a.candidate)]
                for name, tree in order if r % 2 == 0 else reversed(order):
                    got[name].append(run_worker(tree, mode, a.backend, shape, a.changes))
            for what in ("full", "change"):
                b = statistics.median(x[what] for x in got["baseline"])
                c = statistics.median(x[what] for x in got["candidate"])
                rows.append({"mode": mode, "shape": shape, "what": what, "baseline_s": b,
                             "candidate_s": c, "ratio": c / b})  # fmt: skip
                print(f"{mode:<10} {shape:>9} {what:>6} {b * 1e3:>8.2f}ms {c * 1e3:>8.2f}ms "
                      f"{c / b:>6.2f}")  # fmt: skip
    if a.json:
        report = {"machine": machine(), "backend": a.backend, "rounds": a.rounds, "rows": rows}
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    if a.build:
        # The baseline's checkout and build were ours: remove them (base is <root>/src/python).
        subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force",
                        str(base.parent)], check=False)  # fmt: skip
        shutil.rmtree(base.parent.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
