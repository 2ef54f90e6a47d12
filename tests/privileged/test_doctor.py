"""``kproxy doctor`` on real namespaces, each prepared to fail one check: kube-proxy's and
Cilium's rules, a kubelet on iptables-legacy, a read-only /proc/sys, a conntrack table the
namespace cannot grow, a kernel without ip_vs, a PATH without the mode's tools, a low open file
limit. Nothing is changed by the doctor: the namespace's rules are the same after it."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netlab import NetNs, NodeLab, netlab_unavailable_reason

pytestmark = pytest.mark.privileged

DOCTOR = [sys.executable, "-m", "kproxy", "doctor", "--json", "--hostname-override", "node-a"]


@pytest.fixture
def node() -> Iterator[NetNs]:
    reason = netlab_unavailable_reason()
    if reason is not None:
        pytest.skip(f"netlab unavailable: {reason}")
    with NodeLab() as lab:
        yield lab.node


def doctor(
    ns: NetNs, *args: str, wrap: list[str] | None = None, env: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    argv = [*(wrap or []), *DOCTOR, *args]
    if env is not None:
        argv = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv]
    r = ns.exec(argv, timeout=60)
    doc = json.loads(r.stdout)
    return r.returncode, {c["name"]: c for c in doc["checks"]} | {"ready": doc["ready"]}


def base_env(**extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "PYTHONPATH")}
    keep.pop("KPROXY_IPTABLES_BACKEND", None)
    return {**keep, **extra}


def test_a_fresh_namespace_is_ready_for_iptables_and_nftables(node: NetNs) -> None:
    for mode in ("iptables", "nftables"):
        rc, checks = doctor(node, "--proxy-mode", mode, env=base_env())
        assert rc == 0 and checks["ready"], checks
        assert checks["other-proxies"]["detail"] == "none"


def test_other_proxies_rules_are_reported_and_left_alone(node: NetNs) -> None:
    node.exec(["iptables", "-t", "nat", "-N", "KUBE-SERVICES"], check=True)
    rc, checks = doctor(node, "--proxy-mode", "nftables", env=base_env())
    assert rc == 0 and "kproxy takes them over" in checks["other-proxies"]["detail"]
    node.exec(["iptables", "-t", "nat", "-N", "CILIUM_PRE_nat"], check=True)
    before = node.exec(["iptables-save", "-t", "nat"], check=True).stdout
    rc, checks = doctor(node, "--proxy-mode", "iptables", env=base_env())
    assert checks["other-proxies"]["status"] == "warn", checks
    assert "CILIUM_PRE_nat" in checks["other-proxies"]["detail"]
    after = node.exec(["iptables-save", "-t", "nat"], check=True).stdout
    assert rules(before) == rules(after)


def rules(saved: str) -> list[str]:
    """iptables-save output without its timestamp comments."""
    return [ln for ln in saved.splitlines() if not ln.startswith("#")]


def test_a_kubelet_on_legacy_iptables_fails_the_backend_check_unless_auto(node: NetNs) -> None:
    node.exec(["iptables-legacy", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"], check=True)
    rc, checks = doctor(node, "--proxy-mode", "iptables", env=base_env())
    assert rc == 1 and checks["iptables-backend"]["status"] == "fail", checks
    assert "this node uses iptables-legacy" in checks["iptables-backend"]["detail"]
    rc, checks = doctor(
        node, "--proxy-mode", "iptables", env=base_env(KPROXY_IPTABLES_BACKEND="auto")
    )
    assert rc == 0 and checks["iptables-backend"]["detail"].startswith("legacy"), checks


def test_a_read_only_proc_sys_fails_localhost_nodeports(node: NetNs) -> None:
    # As an unprivileged container sees it: /proc/sys mounted read-only (in a private mount
    # namespace, so nothing outside it changes).
    ro = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
          'mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec "$@"',
          "sh"]  # fmt: skip
    rc, checks = doctor(node, "--proxy-mode", "iptables", wrap=ro, env=base_env())
    assert rc == 1 and checks["sysctls"]["status"] == "fail", checks
    assert "route_localnet" in checks["sysctls"]["detail"]


def test_the_conntrack_table_a_namespace_cannot_grow_is_warned(node: NetNs, tmp_path: Path) -> None:
    host = int(Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text())
    conf = tmp_path / "config.conf"
    conf.write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
        f"mode: nftables\nconntrack:\n  min: {host + 1000}\n"
    )
    rc, checks = doctor(node, f"--config={conf}", env=base_env())
    assert rc == 0 and checks["conntrack"]["status"] == "warn", checks
    assert f"kproxy asks {min(host + 1000, 1 << 20)}" in checks["conntrack"]["detail"]


def test_this_kernel_has_no_ip_vs(node: NetNs) -> None:
    if Path("/proc/net/ip_vs").exists():
        pytest.skip("this kernel has ip_vs loaded")
    rc, checks = doctor(node, "--proxy-mode", "ipvs", env=base_env())
    assert rc == 1 and checks["ipvs"]["status"] == "fail", checks


def test_a_path_without_the_modes_tools(node: NetNs, tmp_path: Path) -> None:
    env = base_env(PATH=str(Path(sys.executable).parent))  # python only: no sbin tools
    rc, checks = doctor(node, "--proxy-mode", "nftables", env=env)
    assert rc == 1 and "nft" in checks["tools"]["detail"], checks


def test_a_low_open_file_limit_is_warned_for_the_userspace_mode(node: NetNs) -> None:
    rc, checks = doctor(
        node, "--proxy-mode", "userspace", wrap=["prlimit", "--nofile=1024:2048"], env=base_env()
    )
    assert rc == 0 and checks["open-files"]["status"] == "warn", checks
    assert "open file limit is 2048" in checks["open-files"]["detail"]
