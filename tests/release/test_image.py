"""kproxy's container image, run for real: the image ``scripts/image.sh`` builds from Debian's
packages, started with crun as kubeadm's DaemonSet starts kube-proxy (``kube-proxy
--config=... --hostname-override=...``, privileged, host network), serving real TCP and UDP
through a ClusterIP and a NodePort in a lab node's namespace; its ``version`` and ``cleanup``
commands; and its choice of iptables backend (a node whose kubelet uses iptables-legacy gets
legacy rules, and nothing in iptables-nft).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kproxy import __version__
from kproxy.upstream import UPSTREAM_VERSION
from tests.privileged.harness import (
    ECHO_IP,
    NODE,
    NODE_PORT_TCP,
    NODE_PORT_UDP,
    ProxyLab,
    echo_service,
    echo_slice,
    first_sync,
    kubeadm_conf,
    proxy_lab,
)
from tests.release.image import Image, unpack

pytestmark = [pytest.mark.privileged, pytest.mark.release]

PODS = ["10.244.1.2", "10.244.2.2", "10.244.3.2"]
BACKENDS = {"pod1", "pod2", "pod3"}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    img = unpack(tmp_path_factory.mktemp("image"))
    try:
        yield img
    finally:
        img.reap()


def run_in_image(
    image: Image, lab: ProxyLab, *args: str, stdout_only: bool = False
) -> tuple[int, str]:
    argv = image.command(args, lab.lab.node.ns)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    return r.returncode, r.stdout if stdout_only else r.stdout + r.stderr


def start_in_image(image: Image, lab: ProxyLab, tmp_path: Path, mode: str) -> None:
    """kubeadm's command and ConfigMap (its kubeconfig pointed at the lab's API server)."""
    conf = kubeadm_conf(lab, tmp_path, mode=mode)
    argv = ["/usr/local/bin/kube-proxy", f"--config={conf}", f"--hostname-override={NODE}"]
    lab.spawn(image.command(argv, lab.lab.node.ns, binds=[tmp_path]), in_node=False)
    first_sync(lab)


def assert_serves(lab: ProxyLab) -> None:
    client, ext = lab.lab.pod("client"), lab.lab.client("ext")
    for src, ip, tcp, udp in (
        (client, ECHO_IP, 80, 80),
        (ext, lab.lab.node_ip, NODE_PORT_TCP, NODE_PORT_UDP),
    ):
        results = src.tcp_probe_many(ip, tcp, 30)
        assert all(r.ok for r in results), results[:3]
        assert {r.server for r in results} == BACKENDS
        replies = [src.udp_probe(ip, udp, timeout=2.0) for _ in range(6)]
        assert all(r.ok and r.server in BACKENDS for r in replies), replies


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_the_daemon_in_the_image_serves_clusterip_and_nodeport(
    image: Image, tmp_path: Path, mode: str
) -> None:
    with proxy_lab(tmp_path, [echo_service(), echo_slice(PODS)], mode=mode) as lab:
        start_in_image(image, lab, tmp_path, mode)
        log = lab.log()
        # The host's iptables is nft (Debian's default) and holds no rules: nft, as upstream.
        assert "iptables backend: nft (no rules in either" in log, log
        assert "Traceback" not in log, log
        assert_serves(lab)
        if mode == "iptables":
            assert f"-d {ECHO_IP}/32" in lab.nat()
        else:
            assert ECHO_IP in lab.nft()


def test_the_image_uses_the_legacy_iptables_the_nodes_kubelet_uses(
    image: Image, tmp_path: Path
) -> None:
    with proxy_lab(tmp_path, [echo_service(), echo_slice(PODS)]) as lab:
        node = lab.lab.node
        # kubelet marks the backend it uses with this chain (as on a legacy-iptables host).
        node.exec(["iptables-legacy", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"], check=True)
        start_in_image(image, lab, tmp_path, "iptables")
        assert (
            "iptables backend: legacy (kubelet's KUBE-IPTABLES-HINT chain is in iptables-legacy)"
            in lab.log()
        ), lab.log()
        legacy = node.exec(["iptables-legacy-save", "-t", "nat"], check=True).stdout
        nft = node.exec(["iptables-nft-save", "-t", "nat"], check=True).stdout
        assert "-A PREROUTING" in legacy and f"-d {ECHO_IP}/32" in legacy, legacy
        assert "KUBE-SERVICES" not in nft, nft
        assert_serves(lab)


def test_version_and_cleanup_run_in_the_image(image: Image, tmp_path: Path) -> None:
    with proxy_lab(tmp_path, [echo_service(), echo_slice(PODS)]) as lab:
        rc, out = run_in_image(image, lab, "kproxy", "version")
        assert rc == 0 and out.startswith(f"kproxy {__version__} (core "), out
        rc, out = run_in_image(image, lab, "kube-proxy", "--version")
        assert rc == 0 and out.strip() == f"Kubernetes {UPSTREAM_VERSION} (kproxy {__version__})"
        # The image carries every kernel mode's tools; ip_vs is this kernel's lack, not its.
        for mode in ("iptables", "nftables", "ipvs"):
            rc, out = run_in_image(
                image, lab, "kproxy", "doctor", "--json", "--proxy-mode", mode, stdout_only=True
            )
            checks = {c["name"]: c for c in json.loads(out)["checks"]}
            assert checks["tools"]["status"] == "ok", (mode, checks["tools"])
            assert rc == (1 if mode == "ipvs" and not Path("/proc/net/ip_vs").exists() else 0), out
        # Rules from a run of the image, then its cleanup: nothing of kproxy's is left.
        start_in_image(image, lab, tmp_path, "iptables")
        assert lab.daemon is not None
        lab.daemon.terminate()
        lab.daemon.wait(timeout=20)
        image.reap()
        assert "KUBE-SERVICES" in lab.nat()  # SIGTERM leaves the rules, as upstream
        rc, out = run_in_image(image, lab, "kproxy", "cleanup")
        assert rc == 0, out
        nat, filt = lab.nat(), lab.filter()
        assert "KUBE-" not in nat + filt, nat + filt
