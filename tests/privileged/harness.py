"""A node lab with the fake API server and the real kproxy daemon inside it.

The fake API server listens inside the node namespace (through a :class:`NetnsExecutor`
thread) and the daemon runs there as a subprocess, as it would on a node; the test drives the
API server with method calls and watches the kernel with ``iptables-save`` or ``nft``. Every
lab runs one proxy mode (``iptables`` or ``nftables``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from kproxy.netns import NetnsExecutor
from tests import k8sobjects as k
from tests.fakeapi import FakeApiServer
from tests.fakeapi.server import write_kubeconfig
from tests.netlab import NetNs, NodeLab, netlab_unavailable_reason

T = TypeVar("T")

NODE = "node-a"
CLUSTER_CIDR = "10.244.0.0/16"
ECHO_IP = "10.96.0.10"
EMPTY_IP = "10.96.0.20"
TCP_PORT, UDP_PORT = 8080, 8081
NODE_PORT_TCP, NODE_PORT_UDP = 30080, 30081
_DNAT = re.compile(r"--to-destination (\S+)")
# nftables: endpoint pool elements (`... : 10.244.1.2 . 8080`) and single DNATs.
_NFT_DNAT = re.compile(r": ([0-9a-f.:]+) \. (\d+)\b|dnat (?:ip6? )?to ([0-9a-f.:\[\]]+:\d+)")
MODES = ("iptables", "nftables")
KUBEADM_CONFIGMAP = Path(__file__).parents[1] / "fixtures" / "kubeadm-kube-proxy-configmap.yaml"


def echo_service(**spec: Any) -> k.Obj:
    return k.service(
        "echo",
        ECHO_IP,
        [
            k.port("tcp", 80, "TCP", node_port=NODE_PORT_TCP, target=TCP_PORT),
            k.port("udp", 80, "UDP", node_port=NODE_PORT_UDP, target=UDP_PORT),
        ],
        type="NodePort",
        **spec,
    )


def echo_slice(ips: Sequence[str], name: str = "echo-1") -> k.Obj:
    return k.endpoint_slice(
        name,
        "echo",
        [k.endpoint(ip, node=NODE if ip.startswith("10.244.1.") else "node-b") for ip in ips],
        [k.slice_port("tcp", TCP_PORT, "TCP"), k.slice_port("udp", UDP_PORT, "UDP")],
    )


def lb_service(name: str, cluster_ip: str, lb_ip: str, ranges: list[str]) -> k.Obj:
    """A LoadBalancer Service on TCP 80 (to 8080) with its ingress address and source ranges."""
    svc = k.service(
        name, cluster_ip, [k.port("tcp", 80, "TCP", target=8080)], type="LoadBalancer",
        loadBalancerSourceRanges=ranges,
    )  # fmt: skip
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}
    return svc


def empty_service() -> k.Obj:
    return k.service("empty", EMPTY_IP, [k.port("http", 80, "TCP"), k.port("dns", 53, "UDP")])


@dataclass
class ProxyLab:
    lab: NodeLab
    api: FakeApiServer
    ex: NetnsExecutor
    log_path: Path
    mode: str = "iptables"
    daemon: subprocess.Popen[str] | None = None

    def call(self, fn: Callable[[], T]) -> T:
        return self.ex.call(fn)

    def put(self, obj: k.Obj) -> None:
        self.call(lambda: self.api.put(obj))

    def delete(self, kind: str, name: str, namespace: str = "default") -> None:
        self.call(lambda: self.api.delete(kind, namespace, name))

    def start_daemon(self, *extra: str, path: str | None = None) -> subprocess.Popen[str]:
        """Start kproxy in the node namespace; ``path`` is put first on its PATH (fault
        injection: stand-in tools)."""
        args = [
            sys.executable, "-m", "kproxy", "daemon",
            "--master", self.api.api_url,
            "--hostname-override", NODE,
            "--cluster-cidr", CLUSTER_CIDR,
            "--min-sync-period", "0",
            "--healthz-bind-address", "127.0.0.1:10256",
            "-v", "4",
            "--proxy-mode", self.mode,
            *extra,
        ]  # fmt: skip
        return self.spawn(args, path=path)

    def spawn(
        self, args: Sequence[str], *, path: str | None = None, in_node: bool = True
    ) -> subprocess.Popen[str]:
        """Run ``args`` in the node namespace as the lab's daemon (its output to the log);
        ``in_node=False`` starts it in the host's namespaces, for a container runtime that
        puts the container into the node namespace itself."""
        env = dict(os.environ)
        if path is not None:
            env["PATH"] = f"{path}:{env.get('PATH', '')}"
        log = self.log_path.open("a")
        out = {"stdout": log, "stderr": subprocess.STDOUT, "env": env}
        if in_node:
            self.daemon = self.lab.node.popen(args, **out)
        else:
            self.daemon = subprocess.Popen(args, text=True, start_new_session=True, **out)  # type: ignore[call-overload]
        log.close()
        return self.daemon

    def wait_synced(self, count: int = 1, timeout: float = 30) -> None:
        """Wait until the daemon has finished ``count`` successful syncs (every family)."""
        self.wait(lambda: self.log().count("synced IPv4") >= count, timeout, "a completed sync")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def nat(self) -> str:
        return self._saved("nat")

    def filter(self) -> str:
        return self._saved("filter")

    def _saved(self, table: str) -> str:
        """iptables-save of one table without its "# Generated/Completed on <time>" lines, so
        two listings of the same rules compare equal."""
        out = self.lab.node.exec(["iptables-save", "-t", table], timeout=10, check=True).stdout
        return "".join(line for line in out.splitlines(True) if not line.startswith("#"))

    def nft(self, family: str = "ip") -> str:
        """kproxy's nftables table ("" when there is none)."""
        r = self.lab.node.exec(["nft", "list", "table", family, "kproxy"], timeout=10)
        return r.stdout if r.returncode == 0 else ""

    def rules(self) -> str:
        """Everything this lab's mode programs for IPv4, as the kernel lists it."""
        return self.nat() + self.filter() if self.mode == "iptables" else self.nft()

    def dnat_targets(self) -> set[str]:
        if self.mode == "iptables":
            return set(_DNAT.findall(self.nat()))
        out = set()
        for ip, port, single in _NFT_DNAT.findall(self.nft()):
            out.add(single if single else f"{ip}:{port}")
        return out

    def wait(
        self, predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
    ) -> float:
        """Poll until ``predicate`` holds; returns the seconds it took. Fails with the log."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            if predicate():
                return time.monotonic() - start
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}\n{self.log()[-4000:]}"
                )
            if self.daemon is not None and self.daemon.poll() is not None:
                raise AssertionError(
                    f"daemon exited ({self.daemon.returncode})\n{self.log()[-4000:]}"
                )
            time.sleep(interval)


@contextmanager
def proxy_lab(
    tmp_path: Path, objects: Sequence[k.Obj] = (), mode: str = "iptables"
) -> Iterator[ProxyLab]:
    """A node lab with the fake API server holding ``objects`` and this node's Node; skips
    the test (does not fail it) where labs cannot be built (not root, no ``ip netns``)."""
    reason = netlab_unavailable_reason()
    if reason is not None:
        pytest.skip(f"netlab unavailable: {reason}")
    with NodeLab() as lab:
        for name in ("pod1", "pod2", "pod3"):
            pod = lab.add_pod(name)
            pod.start_tcp_server(TCP_PORT)
            pod.start_udp_server(UDP_PORT)
        lab.add_pod("client")
        lab.add_client("ext")
        with NetnsExecutor(lab.node.ns) as ex:
            api = ex.call(lambda: FakeApiServer(bookmark_interval=0.5))
            ex.call(api.start)
            try:
                pl = ProxyLab(lab, api, ex, tmp_path / "kproxy.log", mode)
                pl.put(k.node(NODE, addresses=[lab.node_ip]))
                for o in objects:
                    pl.put(o)
                yield pl
            finally:
                if pl.daemon is not None and pl.daemon.poll() is None:
                    pl.daemon.terminate()
                    try:
                        pl.daemon.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        pl.daemon.kill()
                        pl.daemon.wait(timeout=5)
                ex.call(api.close)


_HTTP_GET = """
import json, sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
        print(json.dumps([r.status, r.read().decode()]))
except urllib.error.HTTPError as e:
    print(json.dumps([e.code, e.read().decode()]))
except OSError as e:
    print(json.dumps([0, str(e)]))
"""


def http_get(ns: NetNs, url: str) -> tuple[int, str]:
    """GET ``url`` from inside namespace ``ns``: (status, body); status 0 if unreachable."""
    out = ns.exec([sys.executable, "-c", _HTTP_GET, url], timeout=15, check=True).stdout
    status, body = json.loads(out)
    return int(status), str(body)


def kubeadm_conf(lab: ProxyLab, tmp_path: Path, **changes: Any) -> str:
    """kubeadm's config.conf, with its kubeconfig pointed at the lab's API server and the
    given top-level ``changes`` (a section's dict is merged)."""
    cm = yaml.safe_load(KUBEADM_CONFIGMAP.read_text())
    doc = yaml.safe_load(cm["data"]["config.conf"])
    assert doc["clusterCIDR"] == CLUSTER_CIDR
    kubeconfig = tmp_path / "kubeconfig.conf"
    write_kubeconfig(kubeconfig, lab.api.api_url)
    doc["clientConnection"]["kubeconfig"] = str(kubeconfig)
    for key, value in changes.items():
        if isinstance(value, dict):
            doc[key].update(value)
        else:
            doc[key] = value
    path = tmp_path / "config.conf"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def first_sync(lab: ProxyLab) -> None:
    # At kubeadm's verbosity (0) the per-sync lines are not logged (V(2)), the first one is.
    lab.wait(lambda: "first sync done" in lab.log(), 30, "the first sync")
