"""The ipvs mode on a kernel without ip_vs (this machine's): the daemon says which module is
missing and leaves nothing of the mode on the node (no kube-ipvs0, no ipsets, no chains).
Real IPVS is tested in the VM tier (tests/vm)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.privileged.harness import echo_service, echo_slice, proxy_lab


@pytest.mark.skipif(os.path.exists("/proc/net/ip_vs"), reason="this kernel has ip_vs loaded")
def test_without_ip_vs_the_daemon_names_the_module_and_writes_nothing(tmp_path: Path) -> None:
    with proxy_lab(tmp_path, [echo_service(), echo_slice(["10.244.1.2"])], mode="ipvs") as pl:
        pl.start_daemon()
        pl.wait(lambda: "modprobe ip_vs" in pl.log(), 60, "the missing-module error")
        node = pl.lab.node
        assert node.exec(["ip", "link", "show", "kube-ipvs0"], timeout=10).returncode != 0
        sets = node.exec(["ipset", "list", "-n"], timeout=10, check=True).stdout
        assert "KUBE-" not in sets, sets
        assert "KUBE-IPVS-FILTER" not in pl.filter()
        assert "KUBE-SERVICES" not in pl.nat()
        assert pl.daemon is not None and pl.daemon.poll() is None  # retrying, not crashed
