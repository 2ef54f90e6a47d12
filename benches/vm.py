"""A throwaway VM for what this host's kernel cannot do (it has no ip_vs): virtme-ng boots the
newest kernel image in /boot under qemu, without KVM (the host has none), with the host's
root file system shared read-only, and runs one shell command as root there. Everything it
starts ends with the VM. Used by the VM test tier, ``benches/ipvs_program.py`` and the
suite's ipvs rows.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path


def kernel() -> str | None:
    found = sorted(glob.glob("/boot/vmlinuz-*"))
    return found[-1] if found else None


def vng() -> str | None:
    return shutil.which("vng") or shutil.which("vng", path=str(Path(sys.executable).parent))


def available() -> bool:
    return os.geteuid() == 0 and kernel() is not None and vng() is not None


MISSING = "needs root, a kernel image in /boot and virtme-ng (scripts/deps.sh test)"


def run(
    script: str, *, cwd: Path, timeout: float, memory: str = "1G", cpus: int | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `script` (a shell command line) as root in a fresh VM; its output and status."""
    exe, image = vng(), kernel()
    if exe is None or image is None or os.geteuid() != 0:
        raise RuntimeError(MISSING)
    env = {**os.environ, "PATH": f"{Path(exe).parent}:{os.environ.get('PATH', '')}"}
    argv = [exe, "--run", image, "--disable-kvm", "--force-9p", "--user", "root",
            "--memory", memory, *(["--cpus", str(cpus)] if cpus else []), "--exec", script]  # fmt: skip
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def has_ip_vs() -> bool:
    """Whether this kernel serves IPVS (loading the module if it can)."""
    subprocess.run(["modprobe", "ip_vs"], capture_output=True, check=False)
    return Path("/proc/net/ip_vs").exists()
