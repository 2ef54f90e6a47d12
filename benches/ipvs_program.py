"""IPVS programming: kproxy's batched netlink against one request per object, in one run.

Run as root: ``python benches/ipvs_program.py [--services 10000] [--dests 5]``. This machine's
kernel has no ip_vs, so the measurement runs in a VM (virtme-ng, Debian's kernel, qemu
without KVM: every figure is slowed by emulation, both ways alike; the ratios are the
result). Both ways program the same table from empty (every virtual server, then its real
servers), then change one service (its real servers replaced), and check that the kernel's
table reads back exactly as planned. The baseline sends each operation alone and waits for
its answer, as upstream's ipvs proxier does through its netlink library.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benches import vm

PROGRAM = ROOT / "target" / "release" / "examples" / "ipvs_program"


def build() -> None:
    """Build the example this benchmark (and the suite's ipvs floor) runs in the VM."""
    subprocess.run(
        ["cargo", "build", "--quiet", "--release", "--no-default-features", "--example",
         "ipvs_program"],
        cwd=ROOT, check=True, timeout=1200,
    )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--dests", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not vm.available():
        print(vm.MISSING, file=sys.stderr)
        return 2
    build()
    with tempfile.TemporaryDirectory() as tmp:
        run = vm.run(
            f"modprobe ip_vs && {PROGRAM} {args.services} {args.dests}",
            cwd=Path(tmp),
            timeout=3600,
            memory="2G",
        )
    rows = {
        r["way"]: r
        for r in (json.loads(line) for line in run.stdout.splitlines() if line.startswith("{"))
    }
    if run.returncode != 0 or set(rows) != {"batched", "per_object"}:
        print(run.stdout[-3000:], run.stderr[-3000:], file=sys.stderr)
        return 1
    b, p = rows["batched"], rows["per_object"]
    print(f"host: {platform.machine()}, {os.cpu_count()} cpus; VM: {Path(vm.kernel() or '?').name}, "
          "qemu without KVM")  # fmt: skip
    print(f"{args.services} services x {args.dests} real servers: {b['operations']} operations")
    print(f"{'':<12}{'full':>10}{'syscalls':>10}{'sends':>8}{'1-service':>11}{'syscalls':>10}")
    for name, r in (("batched", b), ("per object", p)):
        print(
            f"{name:<12}{r['full_seconds']:>9.2f}s{r['full_syscalls']:>10}{r['sends']:>8}"
            f"{r['change_seconds'] * 1000:>9.1f}ms{r['change_syscalls']:>10}"
        )
    print(
        f"batched: {p['full_seconds'] / b['full_seconds']:.1f}x faster, "
        f"{p['full_syscalls'] / b['full_syscalls']:.0f}x fewer system calls; the one-service "
        f"change sent {b['change_operations']} operations, all for {b['change_services']} service"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
