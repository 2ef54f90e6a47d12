"""Slow clients against the health server, with the real daemon: 2,000 connections to the
healthz port, each sending part of a request head and then a byte every few seconds (for
``KPROXY_SLOW_CLIENT_SECONDS``, 120 by default), cut off and coming back as the server's
request deadline cuts them. Meanwhile endpoints change. The changes land on time, a fresh
``/livez`` answers within a second, and the daemon's thread count stays where it was: a
client costs the daemon a socket, not a thread."""

from __future__ import annotations

import functools
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.privileged.harness import ProxyLab, echo_service, echo_slice, proxy_lab

pytestmark = pytest.mark.privileged

CLIENTS = 2000
SECONDS = float(os.environ.get("KPROXY_SLOW_CLIENT_SECONDS", "120"))
DRIP_EVERY = 5.0

# Runs in the node namespace: keeps CLIENTS connections open, dripping, reopening any the
# server closes; prints how many it had to reopen.
DRIPPER = r"""
import resource, socket, sys, time
n, seconds, every = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

def conn():
    s = socket.create_connection(("127.0.0.1", 10256), timeout=5)
    s.setblocking(False)
    s.send(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
    return s

socks = [conn() for _ in range(n)]
print("open", len(socks), flush=True)
end, reopened = time.monotonic() + seconds, 0
while time.monotonic() < end:
    time.sleep(every)
    for i, s in enumerate(socks):
        try:
            s.send(b"X")
        except OSError:
            s.close()
            reopened += 1
            try:
                socks[i] = conn()
            except OSError:
                pass
print("reopened", reopened, flush=True)
"""


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[ProxyLab]:
    with proxy_lab(tmp_path, [echo_service(), echo_slice(["10.244.1.2"])], "nftables") as pl:
        yield pl


def programmed(lab: ProxyLab, target: str) -> bool:
    return target in lab.dnat_targets()


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no thread count")


def livez_seconds() -> float:
    """One fresh GET /livez (from the node namespace): how long until the whole answer."""
    t = time.monotonic()
    with socket.create_connection(("127.0.0.1", 10256), timeout=5) as s:
        s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.0 200"), reply[:200]
    return time.monotonic() - t


def test_two_thousand_dripping_clients_hold_no_thread_and_block_nothing(
    lab: ProxyLab, tmp_path: Path
) -> None:
    daemon = lab.start_daemon("--sync-period", "5s")
    lab.wait_synced()
    assert lab.call(livez_seconds) < 1.0
    before = threads(daemon.pid)
    out = tmp_path / "dripper.out"
    with out.open("w") as f:
        dripper = lab.lab.node.popen(
            [sys.executable, "-c", DRIPPER, str(CLIENTS), str(SECONDS), str(DRIP_EVERY)],
            stdout=f, stderr=f,
        )  # fmt: skip
    try:
        lab.wait(lambda: "open" in out.read_text(), 60, "the slow clients connected")
        end, changes, worst, most = time.monotonic() + SECONDS, 0, 0.0, before
        while time.monotonic() < end - 5:
            # An endpoint change: it must land within a few seconds, as without the clients.
            ips = ["10.244.2.2"] if changes % 2 == 0 else ["10.244.1.2"]
            lab.put(echo_slice(ips))
            t = time.monotonic()
            lab.wait(functools.partial(programmed, lab, f"{ips[0]}:8080"), 5, "the change landed")
            changes += 1
            worst = max(worst, lab.call(livez_seconds))
            most = max(most, threads(daemon.pid))
            time.sleep(max(0.0, 3 - (time.monotonic() - t)))
        dripper.wait(timeout=60 + DRIP_EVERY * 2)
    finally:
        if dripper.poll() is None:
            dripper.kill()
            dripper.wait(timeout=10)
    report = out.read_text()
    assert f"open {CLIENTS}" in report, report
    print(f"{changes} changes, worst fresh /livez {worst * 1e3:.0f} ms, threads {before} -> "
          f"{most}, {report.split()[-1]} connections cut and reopened")  # fmt: skip
    assert changes >= SECONDS // 6 and worst < 1.0
    # Only the routes' lane workers may start (two per lane); never one per client.
    assert most <= before + 4, (before, most)
    # The request deadline cut every dripper at least once over a long enough run.
    if SECONDS >= 30:
        assert int(report.split()[-1]) >= CLIENTS, report
    assert daemon.poll() is None
