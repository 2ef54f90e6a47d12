"""The ipvs tier: kproxy's ipvs mode against a real kernel, in a VM.

This machine's kernel has no ip_vs, so one VM (virtme-ng booting Debian's kernel under qemu,
software emulation) runs, in order:

* the Rust kernel tests of ``rust/tests/ipvs_kernel.rs`` (batching, errors, timeouts);
* pyroute2's independent reading of the table they leave (``ipvs_reader.py``);
* real TCP and UDP through the whole mode (``ipvs_traffic.py``): ClusterIP, NodePort,
  affinity, eTP Local, the node-port filter, graceful termination, cleanup, and a takeover
  from kube-proxy's ipvs mode and the hand-back to it, each with a 20 ms prober and a held
  connection.

One boot for the whole tier: about 30-60 s here, plus the tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benches import vm

ROOT = Path(__file__).resolve().parents[2]


pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not vm.available(), reason=vm.MISSING),
]


def _test_binary() -> str:
    out = subprocess.run(
        ["cargo", "test", "--no-default-features", "--test", "ipvs_kernel", "--no-run",
         "--message-format=json"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=1200,
    )  # fmt: skip
    for line in out.stdout.splitlines():
        msg = json.loads(line)
        exe = msg.get("executable")
        if msg.get("reason") == "compiler-artifact" and exe and "ipvs_kernel" in exe:
            return str(exe)
    raise AssertionError("cargo built no ipvs_kernel test binary")


def test_ipvs_mode_on_a_real_kernel(tmp_path: Path) -> None:
    binary = _test_binary()
    reader = ROOT / "tests" / "vm" / "ipvs_reader.py"
    traffic = ROOT / "tests" / "vm" / "ipvs_traffic.py"
    # Inside the VM: root in the VM's own network namespace; /tmp is the VM's.
    script = " && ".join([
        "modprobe ip_vs",
        f"{binary} --ignored --test-threads=1 --skip independent_reader_fixture",
        f"KPROXY_IPVS_EXPECT=/tmp/expect.json {binary} --ignored --exact "
        "independent_reader_fixture",
        f"{sys.executable} {reader} /tmp/expect.json",
        "ipvsadm --clear",
        f"{sys.executable} {traffic}",
        "echo VM-TIER-DONE",
    ])  # fmt: skip
    run = vm.run(script, cwd=tmp_path, timeout=900)
    out = run.stdout + run.stderr
    print(out[-4000:])
    assert run.returncode == 0, out[-4000:]
    assert "test result: ok. 4 passed" in out, out[-4000:]  # every kernel test but the fixture
    assert "test result: ok. 1 passed" in out, out[-4000:]  # the fixture
    assert "pyroute2 lists the 12 virtual servers kproxy wrote" in out
    assert "IPVS-TRAFFIC-DONE" in out, out[-4000:]
    assert out.count("\nok: ") == 67, out[-4000:]  # every check of ipvs_traffic.py
    assert "VM-TIER-DONE" in out
