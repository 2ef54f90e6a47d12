"""Apply faults on a real kernel: when iptables-restore fails, the previous rules stay and
keep serving, the failure is counted, and a retried (full) sync restores everything."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.privileged.harness import (
    ECHO_IP,
    ProxyLab,
    echo_service,
    echo_slice,
    http_get,
    proxy_lab,
)

pytestmark = pytest.mark.privileged

SHIM = """#!/bin/sh
# Fails while {count} holds a number above zero (and counts down), else runs the real tool.
n=$(cat {count} 2>/dev/null || echo 0)
if [ "$n" -gt 0 ]; then
    echo $((n - 1)) > {count}
    cat >/dev/null
    echo "iptables-restore: injected failure" >&2
    exit 1
fi
exec {real} "$@"
"""


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[ProxyLab]:
    with proxy_lab(tmp_path, [echo_service(), echo_slice(["10.244.1.2"])]) as pl:
        yield pl


def test_a_failed_restore_keeps_the_previous_rules_and_is_retried(
    lab: ProxyLab, tmp_path: Path
) -> None:
    real = shutil.which("iptables-restore")
    assert real is not None
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    count = tmp_path / "failures"
    count.write_text("0")
    shim = shim_dir / "iptables-restore"
    shim.write_text(SHIM.format(count=count, real=real))
    shim.chmod(0o755)
    lab.start_daemon("--metrics-bind-address", "127.0.0.1:10249", path=str(shim_dir))
    lab.wait_synced()
    client = lab.lab.pod("client")
    assert client.tcp_probe(ECHO_IP, 80).server == "pod1"

    count.write_text("2")  # the next two restores fail
    lab.put(echo_slice(["10.244.2.2"]))
    lab.wait(lambda: lab.log().count("sync failed") >= 2, 15, "two failed syncs")
    # The previous rules stay in place and keep serving meanwhile.
    assert client.tcp_probe(ECHO_IP, 80).server == "pod1"
    # The retry (a full sync, after backoff) programs the change.
    lab.wait(lambda: lab.dnat_targets() == {"10.244.2.2:8080", "10.244.2.2:8081"}, 20, "retry")
    assert client.tcp_probe(ECHO_IP, 80).server == "pod2"
    assert count.read_text().strip() == "0"
    _, metrics = http_get(lab.lab.node, "http://127.0.0.1:10249/metrics")
    failures = [
        ln for ln in metrics.splitlines()
        if ln.startswith("kubeproxy_sync_proxy_rules_iptables_restore_failures_total{")
    ]  # fmt: skip
    assert sum(float(ln.split()[-1]) for ln in failures) >= 2
    assert "synced IPv4 full" in lab.log().rsplit("sync failed", 1)[1]


def test_sigkill_and_restart_keep_established_connections_and_rules(lab: ProxyLab) -> None:
    lab.start_daemon()
    lab.wait_synced()
    lab.lab.pod("pod1").start_tcp_server(8090, echo=True)
    svc = echo_service()
    svc["spec"]["ports"].append({"name": "long", "port": 90, "protocol": "TCP", "targetPort": 8090})
    sl = echo_slice(["10.244.1.2"])
    sl["ports"].append({"name": "long", "port": 8090, "protocol": "TCP"})
    lab.put(svc)
    lab.put(sl)
    lab.wait(lambda: "10.244.1.2:8090" in lab.dnat_targets(), 5, "the long-lived port")
    session = lab.lab.pod("client").tcp_session(ECHO_IP, 90)
    try:
        assert session.send("before").ok
        rules_before = lab.nat()
        assert lab.daemon is not None
        lab.daemon.kill()  # SIGKILL: no chance to clean up anything
        lab.daemon.wait(timeout=10)
        assert lab.nat() == rules_before  # nothing flushed
        assert session.send("while down").ok
        lab.start_daemon()
        lab.wait_synced(count=2)  # a full sync on start
        assert session.send("after").ok
        assert lab.lab.pod("client").tcp_probe(ECHO_IP, 80).server == "pod1"
    finally:
        session.close()
