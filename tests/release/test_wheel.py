"""The wheels ``scripts/release.sh`` builds: abi3 and manylinux2014 for x86_64 and aarch64,
and the host's one installs into a clean venv and runs ``kproxy render`` with no Rust
toolchain on ``PATH`` (as on a node, or a user's machine without cargo)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.release

REPO = Path(__file__).parents[2]
DIST = REPO / "dist"
# ELF e_machine values (the two architectures wheels are built for).
MACHINES = {"x86_64": 62, "aarch64": 183}


def wheels() -> dict[str, Path]:
    found = {arch: w for arch in MACHINES for w in DIST.glob(f"kproxy-*-manylinux*{arch}.whl")}
    if "x86_64" not in found:
        message = f"no wheel in {DIST}: run scripts/release.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def test_each_wheel_is_abi3_manylinux2014_for_its_architecture() -> None:
    built = wheels()
    if os.environ.get("CI"):
        assert set(built) == set(MACHINES), built  # CI's release build makes both
    for arch, wheel in built.items():
        tags = wheel.name.removesuffix(".whl").split("-")[2:]
        assert tags[:2] == ["cp311", "abi3"], wheel.name
        assert f"manylinux_2_17_{arch}" in tags[2].split("."), wheel.name
        with zipfile.ZipFile(wheel) as z:
            core = z.read("kproxy/_core.abi3.so")
            meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA")))
        assert core[:4] == b"\x7fELF"
        assert int.from_bytes(core[18:20], "little") == MACHINES[arch], arch
        # The metadata a package index shows: the SPDX license and no test tools.
        text = meta.decode()
        assert "License-Expression: Apache-2.0" in text
        requires = [ln for ln in text.splitlines() if ln.startswith("Requires-Dist:")]
        assert requires and not any(t in r for r in requires for t in ("kubernetes", "pytest"))


def test_the_wheel_installs_and_renders_without_rust(tmp_path: Path) -> None:
    wheel = wheels()["x86_64"]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    path = os.pathsep.join([str(venv / "bin"), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    assert shutil.which("cargo", path=path) is None and shutil.which("rustc", path=path) is None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CARGO", "RUST"))}
    env["PATH"] = path
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--only-binary=:all:"]
    subprocess.run([*pip, str(wheel)], check=True, timeout=600, env=env, cwd=tmp_path)
    manifests = str(REPO / "examples" / "manifests")
    for mode, expect in (("iptables", "-A KUBE-SERVICES"), ("nftables", "add table ip kproxy")):
        r = subprocess.run(
            ["kproxy", "render", "--manifests", manifests, "--proxy-mode", mode],
            capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path, check=False,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert expect in r.stdout and "10.96.0.10" in r.stdout, r.stdout[:2000]
