"""kproxy's container image, run as a container runtime runs it: crun, one OCI bundle per run.

The image is the OCI layout ``scripts/image.sh`` writes (``dist/oci``, or
``KPROXY_IMAGE_LAYOUT``). It is unpacked once by umoci; each run gets a bundle whose
``config.json`` is written here from the image's own configuration (its ``Env``; the command
is the caller's, as a DaemonSet's ``command`` is) and shaped like kubeadm's kube-proxy pod:
privileged (every capability, nothing masked, ``/proc/sys`` writable), ``hostNetwork`` (no
network namespace of its own, so the container shares the lab node's namespace that crun is
started in), and ``/run/xtables.lock`` and ``/lib/modules`` from the host. The root
filesystem is shared by every run and read-only, with ``/tmp`` and ``/run`` as tmpfs.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).parents[2]
LAYOUT_ENV = "KPROXY_IMAGE_LAYOUT"
TAG = "latest"
# Capabilities by number (linux/capability.h), 0 to 31.
CAP_NAMES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP",
]  # fmt: skip
_ids = itertools.count()


def privileged_caps() -> list[str]:
    """What a privileged container gets: every capability the runtime itself holds (a
    sandbox may hold fewer than the kernel knows, and asking for more fails in capset)."""
    status = Path("/proc/self/status").read_text()
    bounding = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("CapBnd")), 16)
    return [name for bit, name in enumerate(CAP_NAMES) if bounding >> bit & 1]


# crun (1.8, Debian 12's) refuses a host with cgroup v1 controllers beside a v2 tree (hybrid,
# as on these machines) even with its cgroup manager disabled: it runs in a mount namespace
# of its own where /sys/fs/cgroup is the v2 tree alone. Nothing else changes for it.
_UNIFIED = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t cgroup2 none /sys/fs/cgroup && exec "$@"', "crun"]  # fmt: skip


def crun(*args: str) -> list[str]:
    return [*_UNIFIED, "crun", "--cgroup-manager=disabled", *args]


def layout_path() -> Path:
    return Path(os.environ.get(LAYOUT_ENV) or REPO / "dist" / "oci")


def image_config(layout: Path, tag: str = TAG) -> dict[str, Any]:
    """The image's configuration (``Env``, ``Cmd``, labels), read as a runtime reads it:
    index, then the tag's manifest, then the config blob."""

    def blob(digest: str) -> dict[str, Any]:
        algo, hexa = digest.split(":", 1)
        doc: dict[str, Any] = json.loads((layout / "blobs" / algo / hexa).read_text())
        return doc

    index = json.loads((layout / "index.json").read_text())
    by_tag = {
        m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"]
        for m in index["manifests"]
    }
    manifest = blob(by_tag[tag])
    config: dict[str, Any] = blob(manifest["config"]["digest"])["config"]
    return config


@dataclass
class Image:
    rootfs: Path
    env: list[str]
    work: Path  # bundles and crun's state

    def bundle(
        self, args: Sequence[str], netns: str, binds: Sequence[Path] = ()
    ) -> tuple[Path, str]:
        """A bundle running ``args`` in network namespace ``netns`` (a name under
        /run/netns); each of ``binds`` is mounted read-only at its own path."""
        cid = f"kproxy-test-{os.getpid()}-{next(_ids)}"
        bundle = self.work / cid
        bundle.mkdir(parents=True)
        lock = Path("/run/xtables.lock")
        lock.touch(exist_ok=True)
        mounts: list[dict[str, Any]] = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
            {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
            {"destination": str(lock), "type": "bind", "source": str(lock),
             "options": ["rbind", "rw"]},
            {"destination": "/lib/modules", "type": "bind", "source": "/lib/modules",
             "options": ["rbind", "ro"]},
        ]  # fmt: skip
        mounts += [
            {"destination": str(p), "type": "bind", "source": str(p), "options": ["rbind", "ro"]}
            for p in binds
        ]
        config = {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": 0, "gid": 0},
                "args": list(args),
                "env": self.env,
                "cwd": "/",
                "capabilities": {
                    k: privileged_caps() for k in ("bounding", "effective", "permitted")
                },
                "noNewPrivileges": False,
            },
            "root": {"path": str(self.rootfs), "readonly": True},
            "hostname": "kproxy-image-test",
            "mounts": mounts,
            "linux": {
                # The lab node's namespace, joined by path as a runtime joins a pod's (for
                # hostNetwork, the node's own).
                "namespaces": [
                    *({"type": t} for t in ("pid", "mount", "ipc", "uts")),
                    {"type": "network", "path": f"/run/netns/{netns}"},
                ],
                "maskedPaths": [],
                "readonlyPaths": [],
            },
        }
        (bundle / "config.json").write_text(json.dumps(config, indent=1))
        return bundle, cid

    def command(self, args: Sequence[str], netns: str, binds: Sequence[Path] = ()) -> list[str]:
        """``crun run`` of ``args`` in the foreground, to be started in the host's namespaces
        (the container joins ``netns`` itself); :meth:`reap` removes what is left of it."""
        bundle, cid = self.bundle(args, netns, binds)
        # No cgroup of its own (a kubelet would give the pod one; nothing here depends on it).
        state = str(self.work / "state")
        return crun("--root", state, "run", "--bundle", str(bundle), cid)

    def reap(self) -> None:
        """Kill and delete every container this image started (the lab's teardown signals
        crun; a container it left behind is removed here, by its id)."""
        state = self.work / "state"
        if not state.exists():
            return
        for entry in state.iterdir():
            subprocess.run(
                crun("--root", str(state), "delete", "--force", entry.name),
                capture_output=True, timeout=30, check=False,
            )  # fmt: skip


def unpack(dest: Path) -> Image:
    """Unpack the image (umoci) under ``dest``; fails in CI when it was not built (CI builds
    it before the tests), skips elsewhere."""
    layout = layout_path()
    missing = [t for t in ("umoci", "crun") if shutil.which(t) is None]
    if os.geteuid() != 0:
        pytest.skip("the image tier needs root")
    if missing or not (layout / "index.json").exists():
        why = f"missing tools {missing}" if missing else f"no image at {layout}"
        message = f"{why}: run scripts/deps.sh test and scripts/release.sh --host-only"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    unpacked = dest / "unpacked"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:{TAG}", str(unpacked)],
        capture_output=True, timeout=600, check=True,
    )  # fmt: skip
    env = list(image_config(layout).get("Env") or [])
    return Image(unpacked / "rootfs", env, dest / "runs")
