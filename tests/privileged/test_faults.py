"""Apply faults on a real kernel, in both netfilter modes: when iptables-restore or the nft
transaction fails, the previous rules stay and keep serving, the failure is counted, and a
retried (full) sync restores everything."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import k8sobjects as k
from tests.privileged.harness import (
    CLUSTER_CIDR,
    ECHO_IP,
    MODES,
    NODE,
    ProxyLab,
    echo_service,
    echo_slice,
    http_get,
    proxy_lab,
)

pytestmark = pytest.mark.privileged

SHIM = """#!/bin/sh
# Fails writes (iptables-restore, nft -f) while {count} holds a number above zero, counting
# down; everything else runs the real tool.
n=$(cat {count} 2>/dev/null || echo 0)
case "{tool} $*" in
    iptables-restore*|*" -f "*) ;;
    *) n=0 ;;
esac
if [ "$n" -gt 0 ]; then
    echo $((n - 1)) > {count}
    cat >/dev/null
    echo "{tool}: injected failure" >&2
    exit 1
fi
exec {real} "$@"
"""


def install_shim(lab: ProxyLab, tmp_path: Path, template: str, **fields: object) -> Path:
    """A directory holding a stand-in for the mode's writing tool (``template`` filled with
    ``tool``, ``real`` and ``fields``), to put first on the daemon's PATH."""
    tool = "iptables-restore" if lab.mode == "iptables" else "nft"
    real = shutil.which(tool)
    assert real is not None
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    shim = shim_dir / tool
    shim.write_text(template.format(real=real, tool=tool, **fields))
    shim.chmod(0o755)
    return shim_dir


@pytest.fixture(params=MODES)
def lab(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProxyLab]:
    objects = [echo_service(), echo_slice(["10.244.1.2"])]
    with proxy_lab(tmp_path, objects, mode=request.param) as pl:
        yield pl


FAILURES = {
    "iptables": "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{",
    "nftables": "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{",
}


def test_a_failed_restore_keeps_the_previous_rules_and_is_retried(
    lab: ProxyLab, tmp_path: Path
) -> None:
    count = tmp_path / "failures"
    count.write_text("0")
    shim_dir = install_shim(lab, tmp_path, SHIM, count=count)
    lab.start_daemon("--metrics-bind-address", "127.0.0.1:10249", path=str(shim_dir))
    lab.wait_synced()
    # After its first sync the daemon removes the other modes' leftovers with the same tool:
    # the failures are injected once that is done.
    lab.wait(lambda: "the other modes' leftovers: removed" in lab.log(), 15, "the leftovers")
    client = lab.lab.pod("client")
    assert client.tcp_probe(ECHO_IP, 80).server == "pod1"

    # The next three writes fail: the change (the sync, then its contained retry with the
    # changed Service back as it was), then the full sync after backoff.
    count.write_text("3")
    # Two endpoints: in the nftables mode this needs a new endpoint pool, so the change goes
    # through `nft -f` (element-only changes go over netlink: test_nftables_kernel.py).
    lab.put(echo_slice(["10.244.2.2", "10.244.3.2"]))
    lab.wait(lambda: lab.log().count("sync failed") >= 2, 15, "two failed syncs")
    # The previous rules stay in place and keep serving meanwhile.
    assert client.tcp_probe(ECHO_IP, 80).server == "pod1"
    # The retry (a full sync, after backoff) programs the change.
    moved = {f"10.244.{i}.2:{p}" for i in (2, 3) for p in (8080, 8081)}
    lab.wait(lambda: lab.dnat_targets() == moved, 20, "retry")
    assert client.tcp_probe(ECHO_IP, 80).server in {"pod2", "pod3"}
    assert count.read_text().strip() == "0"
    _, metrics = http_get(lab.lab.node, "http://127.0.0.1:10249/metrics")
    failures = [
        ln for ln in metrics.splitlines()
        if ln.startswith(FAILURES[lab.mode])
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
        rules_before = lab.rules()
        assert lab.daemon is not None
        lab.daemon.kill()  # SIGKILL: no chance to clean up anything
        lab.daemon.wait(timeout=10)
        assert lab.rules() == rules_before  # nothing flushed
        assert session.send("while down").ok
        lab.start_daemon()
        lab.wait_synced(count=2)  # a full sync on start
        assert session.send("after").ok
        assert lab.lab.pod("client").tcp_probe(ECHO_IP, 80).server == "pod1"
    finally:
        session.close()


def test_a_held_xtables_lock_is_waited_for(lab: ProxyLab, tmp_path: Path) -> None:
    """iptables-legacy serializes writers with /run/xtables.lock (iptables-nft does not use
    it): with the legacy tools, kproxy waits for another holder and then succeeds."""
    if lab.mode != "iptables":
        pytest.skip("the xtables lock belongs to the iptables tools")
    shim_dir = tmp_path / "legacy"
    shim_dir.mkdir()
    for tool in ("iptables", "iptables-restore", "iptables-save"):
        for fam in ("", "6"):
            name = tool.replace("iptables", f"ip{fam}tables")
            real = shutil.which(name.replace("tables", "tables-legacy", 1))
            if real is None:
                pytest.skip(f"no legacy {name} here")
            (shim_dir / name).symlink_to(real)
    lab.start_daemon(path=str(shim_dir))
    lab.wait_synced()
    saved = lab.lab.node.exec([str(shim_dir / "iptables-save"), "-t", "nat"], check=True).stdout
    assert "KUBE-SERVICES" in saved
    holder = subprocess.Popen(["flock", "/run/xtables.lock", "sleep", "2"])
    try:
        time.sleep(0.3)  # the holder has the lock
        lab.put(echo_slice(["10.244.2.2"]))
        took = lab.wait(
            lambda: "10.244.2.2:8080" in lab.lab.node.exec(
                [str(shim_dir / "iptables-save"), "-t", "nat"], check=True
            ).stdout,
            15,
            "the change, once the lock is free",
        )  # fmt: skip
    finally:
        holder.wait(timeout=10)
    assert took >= 1.0, f"programmed after {took:.2f}s: the lock was not waited for"
    assert "sync failed" not in lab.log()
    assert lab.lab.pod("client").tcp_probe(ECHO_IP, 80).server == "pod2"


KILL_SHIM = """#!/bin/sh
# Once {armed} exists: SIGKILL the daemon (this tool's parent) in the middle of its apply,
# then (variant "after") let the write land anyway, or (variant "before") drop it.
case "{tool} $*" in
    iptables-restore*|*" -f "*)
        if [ -e {armed} ]; then
            rm -f {armed}
            kill -9 $PPID
            if [ "{variant}" = before ]; then
                cat >/dev/null
                exit 1
            fi
        fi ;;
esac
exec {real} "$@"
"""


@pytest.mark.parametrize("variant", ["before", "after"])
def test_sigkill_mid_apply_then_a_restart_without_the_api_server_keeps_every_service(
    lab: ProxyLab, tmp_path: Path, variant: str
) -> None:
    """The daemon dies inside an apply (the write dropped, or landed unseen), and comes back
    while the API server is unreachable: every Service programmed before still answers."""
    armed = tmp_path / "armed"
    shim_dir = install_shim(lab, tmp_path, KILL_SHIM, armed=armed, variant=variant)
    other = k.service("other", "10.96.0.30", [k.port("tcp", 80, "TCP", target=8080)])
    lab.put(other)
    lab.put(k.endpoint_slice("other-1", "other", [k.endpoint("10.244.3.2", node="node-b")],
                             [k.slice_port("tcp", 8080, "TCP")]))  # fmt: skip
    daemon = lab.start_daemon(path=str(shim_dir))
    lab.wait_synced()
    lab.wait(lambda: "the other modes' leftovers: removed" in lab.log(), 15, "the leftovers")
    client = lab.lab.pod("client")
    assert client.tcp_probe(ECHO_IP, 80).server == "pod1"
    assert client.tcp_probe("10.96.0.30", 80).server == "pod3"

    armed.touch()
    lab.put(echo_slice(["10.244.2.2", "10.244.3.2"]))  # a write through the shim
    deadline = time.monotonic() + 15
    while daemon.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert daemon.returncode == -9, lab.log()[-2000:]
    assert not armed.exists()
    # Back, with no API server to list from: nothing is synced, nothing is removed.
    lab.daemon = lab.spawn(
        [sys.executable, "-m", "kproxy", "daemon", "--master", "http://127.0.0.1:1",
         "--hostname-override", NODE, "--cluster-cidr", CLUSTER_CIDR, "-v", "4",
         "--healthz-bind-address", "127.0.0.1:10256", "--proxy-mode", lab.mode]
    )  # fmt: skip
    time.sleep(3)
    assert lab.daemon.poll() is None, lab.log()[-2000:]
    results = client.tcp_probe_many(ECHO_IP, 80, 12)
    assert all(r.ok for r in results), results[:3]
    # The dropped write left the old rules whole; the landed one serves the new endpoints.
    serving = {"pod1"} if variant == "before" else {"pod2", "pod3"}
    assert {r.server for r in results} <= serving, results
    assert client.tcp_probe("10.96.0.30", 80).server == "pod3"
