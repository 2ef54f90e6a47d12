"""The drop-in, end to end: kproxy started exactly as kubeadm's DaemonSet starts kube-proxy
(``kube-proxy --config=<kubeadm's config.conf> --hostname-override=<node>``), with kubeadm's
ConfigMap as it is (``tests/fixtures/``), against real kernel rules in a namespace.

Also the node setup in a namespace: ``--init-only`` writes the per-namespace conntrack
sysctls and exits; ``nf_conntrack_max`` (the host's, read-only from a namespace) is left
alone with a log line, never an error; and the daemon exits when its config file changes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.privileged.harness import (
    CLUSTER_CIDR,
    ECHO_IP,
    NODE,
    ProxyLab,
    echo_service,
    echo_slice,
    first_sync,
    http_get,
    kubeadm_conf,
    proxy_lab,
)

pytestmark = pytest.mark.privileged

KUBE_PROXY = str(Path(sys.executable).parent / "kube-proxy")
PODS = ["10.244.1.2", "10.244.2.2", "10.244.3.2"]


@pytest.mark.parametrize(
    ("mode", "section"),
    [("", {}), ("nftables", {"nftables": {"masqueradeAll": True}})],
    ids=["kubeadm-default-iptables", "nftables-masqueradeAll"],
)
def test_kubeadms_daemonset_command_with_its_configmap(
    tmp_path: Path, mode: str, section: dict[str, Any]
) -> None:
    objects = [echo_service(), echo_slice(PODS)]
    with proxy_lab(tmp_path, objects, mode=mode or "iptables") as lab:
        conf = kubeadm_conf(lab, tmp_path, mode=mode, **section)
        lab.spawn([KUBE_PROXY, f"--config={conf}", f"--hostname-override={NODE}"])
        first_sync(lab)
        log = lab.log()
        assert "not implemented" not in log and "unknown fields" not in log, log
        # /healthz on 0.0.0.0:10256 (reachable on the node's address), /metrics on
        # 127.0.0.1:10249 only: kubeadm's empty addresses, defaulted as upstream.
        node = lab.lab.node
        lab.wait(lambda: http_get(node, "http://127.0.0.1:10256/healthz")[0] == 200, 10, "ok")
        assert http_get(node, f"http://{lab.lab.node_ip}:10256/healthz")[0] == 200
        status, body = http_get(node, "http://127.0.0.1:10249/metrics")
        assert status == 200 and "kubeproxy_sync_proxy_rules_duration_seconds" in body
        assert http_get(node, f"http://{lab.lab.node_ip}:10249/metrics")[0] == 0
        # Services are programmed: a pod reaches the ClusterIP's endpoints.
        results = lab.lab.pod("client").tcp_probe_many(ECHO_IP, 80, 20)
        assert {r.server for r in results} <= {"pod1", "pod2", "pod3"}
        assert all(r.ok for r in results), results
        if mode == "nftables":
            # nftables.masqueradeAll: every ClusterIP packet is marked, whatever its source.
            rules = lab.nft()
            assert "ip daddr @cluster-ips meta mark set" in rules.replace("  ", " "), rules
            assert f"ip saddr != {CLUSTER_CIDR}" not in rules
        else:
            # detectLocalMode "" is ClusterCIDR: traffic from outside the pods is masqueraded.
            masq = [r for r in lab.nat().splitlines() if r.endswith("-j KUBE-MARK-MASQ")]
            assert any(f"! -s {CLUSTER_CIDR} " in r for r in masq), masq


def sysctl(lab: ProxyLab, name: str) -> int:
    path = "/proc/sys/net/netfilter/" + name
    return int(lab.lab.node.exec(["cat", path], timeout=5, check=True).stdout)


def test_init_only_writes_the_conntrack_sysctls_and_leaves_the_hosts_table_size(
    tmp_path: Path,
) -> None:
    with proxy_lab(tmp_path) as lab:
        host_max = int(Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text())
        conf = kubeadm_conf(
            lab,
            tmp_path,
            conntrack={"tcpEstablishedTimeout": "7h", "tcpCloseWaitTimeout": "7m",
                       "udpTimeout": "17s", "udpStreamTimeout": "77s", "tcpBeLiberal": True,
                       "min": host_max + 1000},
        )  # fmt: skip
        r = lab.lab.node.exec(
            [KUBE_PROXY, f"--config={conf}", "--init-only"], timeout=30, check=False
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert sysctl(lab, "nf_conntrack_tcp_timeout_established") == 7 * 3600
        assert sysctl(lab, "nf_conntrack_tcp_timeout_close_wait") == 7 * 60
        assert sysctl(lab, "nf_conntrack_udp_timeout") == 17
        assert sysctl(lab, "nf_conntrack_udp_timeout_stream") == 77
        assert sysctl(lab, "nf_conntrack_tcp_be_liberal") == 1
        # The table size is the host's: from a namespace it is read-only, so kube-proxy logs
        # it and goes on (the daemon was not started: --init-only exits).
        assert f"cannot set nf_conntrack_max to {host_max + 1000}" in r.stdout + r.stderr
        assert int(Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text()) == host_max
        assert "kproxy started" not in r.stdout + r.stderr


def test_the_daemon_exits_when_its_config_file_changes(tmp_path: Path) -> None:
    with proxy_lab(tmp_path, [echo_service(), echo_slice(PODS)]) as lab:
        conf = kubeadm_conf(lab, tmp_path)
        daemon = lab.spawn([KUBE_PROXY, f"--config={conf}", f"--hostname-override={NODE}"])
        first_sync(lab)
        nat = lab.nat()
        text = Path(conf).read_text()
        Path(conf).write_text(text.replace("masqueradeAll: false", "masqueradeAll: true", 1))
        deadline = time.monotonic() + 15
        while daemon.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert daemon.returncode == 1, lab.log()
        assert f"the configuration file {conf} changed" in lab.log()
        # The rules stay while it restarts, as on SIGTERM.
        assert lab.nat() == nat


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_the_other_modes_leftovers_are_removed_once_the_rules_are_in(
    tmp_path: Path, mode: str
) -> None:
    with proxy_lab(tmp_path, [echo_service(), echo_slice(PODS)], mode=mode) as lab:
        node = lab.lab.node
        # What kube-proxy left behind in the other mode.
        if mode == "iptables":
            leftover = "add table ip kube-proxy\nadd chain ip kube-proxy services\n"
            node.exec(["nft", "-f", "-"], input=leftover, timeout=10, check=True)
        else:
            for cmd in (["-N", "KUBE-SERVICES"], ["-A", "PREROUTING", "-j", "KUBE-SERVICES"]):
                node.exec(["iptables", "-t", "nat", *cmd], timeout=10, check=True)
        lab.start_daemon()
        lab.wait_synced()

        def gone() -> bool:
            if mode == "iptables":
                r = node.exec(["nft", "list", "table", "ip", "kube-proxy"], timeout=10)
                return r.returncode != 0
            return "KUBE-SERVICES" not in lab.nat()

        lab.wait(gone, 10, "the other mode's leftovers to be removed")
        results = lab.lab.pod("client").tcp_probe_many(ECHO_IP, 80, 10)
        assert all(r.ok for r in results), results
