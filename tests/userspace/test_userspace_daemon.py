"""The userspace mode's listener path, end to end and without privileges.

The real daemon (`python -m kproxy daemon --proxy-mode userspace`) runs on manifests with no
capabilities at all (as root, `setpriv` clears them), serves NodePorts on 127.0.0.1 and
relays to backends on loopback. Nothing leaves 127.0.0.0/8.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import k8sobjects as k

NODE = "node-a"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _LoopbackServer:
    """A server thread on a loopback socket, bounded: it stops on close or after 300 s."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        deadline = time.monotonic() + 300
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self._handle()
            except OSError:  # the 0.2 s timeout, or a client gone: look at the clock again
                continue

    def _handle(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


class Backend(_LoopbackServer):
    """A TCP server answering every connection with its name."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(socket.create_server(("127.0.0.1", 0)))

    def _handle(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.sendall(self.name.encode())


class UdpEcho(_LoopbackServer):
    """A UDP server answering every datagram with `echo:` and the datagram."""

    def __init__(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        super().__init__(sock)

    def _handle(self) -> None:
        data, peer = self.sock.recvfrom(2048)
        self.sock.sendto(b"echo:" + data, peer)


def write_manifests(
    d: Path, tcp_node_port: int, udp_node_port: int, tcp: list[Backend], udp: UdpEcho
) -> None:
    objs = [
        k.service(
            "web",
            "10.96.0.10",
            [
                k.port("http", 80, node_port=tcp_node_port, target=8080),
                k.port("dns", 53, "UDP", node_port=udp_node_port),
            ],
            namespace="demo",
            type="NodePort",
        )
    ]
    for b in tcp:
        objs.append(
            k.endpoint_slice(
                f"web-{b.name}",
                "web",
                [k.endpoint("127.0.0.1", node=NODE)],
                [k.slice_port("http", b.port)],
                namespace="demo",
            )
        )
    objs.append(
        k.endpoint_slice(
            "web-udp",
            "web",
            [k.endpoint("127.0.0.1", node=NODE)],
            [k.slice_port("dns", udp.port, "UDP")],
            namespace="demo",
        )
    )
    tmp = d / "objects.json.tmp"
    # One JSON document per file is YAML too; written aside and renamed, so the daemon
    # never reads half a file.
    tmp.write_text("\n---\n".join(json.dumps(o) for o in objs))
    tmp.rename(d / "objects.yaml")


def ask(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.settimeout(5)
        chunks = []
        while data := c.recv(100):
            chunks.append(data)
        return b"".join(chunks).decode()


def wait_for(pred: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():  # type: ignore[operator]
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


@pytest.fixture
def backends() -> Iterator[tuple[list[Backend], UdpEcho]]:
    tcp = [Backend("a"), Backend("b"), Backend("c")]
    udp = UdpEcho()
    yield tcp, udp
    for b in tcp:
        b.close()
    udp.close()


def start_daemon(manifests: Path, log: Path, metrics_port: int) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable, "-m", "kproxy", "daemon", "--proxy-mode", "userspace",
        "--manifests", str(manifests), "--hostname-override", NODE,
        "--bind-address", "127.0.0.1", "--healthz-bind-address", "",
        "--metrics-bind-address", f"127.0.0.1:{metrics_port}", "-v", "2",
    ]  # fmt: skip
    if os.geteuid() == 0:
        # Prove the point even as root: no capabilities at all, in any set.
        argv = ["setpriv", "--bounding-set", "-all", "--inh-caps", "-all", *argv]
    out = log.open("wb")
    return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


def cap_eff(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapEff")


def test_nodeports_are_served_without_privileges_and_follow_endpoint_changes(
    tmp_path: Path, backends: tuple[list[Backend], UdpEcho]
) -> None:
    (a, b, c), udp = backends
    tcp_port, udp_port = free_port(), free_port(socket.SOCK_DGRAM)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    write_manifests(manifests, tcp_port, udp_port, [a, b], udp)
    metrics_port = free_port()
    daemon = start_daemon(manifests, tmp_path / "daemon.log", metrics_port)
    try:
        wait_for(lambda: ask(tcp_port) in ("a", "b"))
        assert cap_eff(daemon.pid) == 0
        seen = Counter(ask(tcp_port) for _ in range(20))
        assert set(seen) == {"a", "b"} and min(seen.values()) >= 5, seen

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(b"q1", ("127.0.0.1", udp_port))
            data, peer = s.recvfrom(100)
            assert (data, peer[1]) == (b"echo:q1", udp_port)

        # Endpoints change under load: b leaves the Service (still running, as a pod that is
        # being replaced) and c joins. Every connection meanwhile must succeed.
        answers: list[str] = []
        failures: list[str] = []
        stop = threading.Event()

        def load() -> None:
            # Paced: unpaced, a fast machine made its 5,000 connections before the manifest
            # poller (1 s) saw the change, and the last answers could never include c.
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline and len(answers) < 20000:
                try:
                    answers.append(ask(tcp_port))
                except OSError as e:
                    failures.append(repr(e))
                time.sleep(0.002)

        t = threading.Thread(target=load)
        t.start()
        time.sleep(0.5)
        write_manifests(manifests, tcp_port, udp_port, [a, c], udp)
        wait_for(lambda: "c" in answers[-20:], timeout=20)
        time.sleep(0.5)
        stop.set()
        t.join(30)
        assert not failures, failures[:5]
        after = answers[answers.index("c") :]
        assert "b" not in after, "b chosen after the update published c"
        assert {"a", "c"} <= set(after)

        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            metrics = r.read().decode()
        accepted = [
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith('kubeproxy_userspace_tcp_connections_total{ip_family="IPv4"}')
        ]
        assert accepted and accepted[0] >= 21 + len(answers), accepted
        assert 'kubeproxy_userspace_listeners{ip_family="IPv4"} 2.0' in metrics
    finally:
        daemon.terminate()
        daemon.wait(15)
    log = (tmp_path / "daemon.log").read_text()
    assert "Traceback" not in log, log[-3000:]
