"""An informer thread that dies (a bug past its own retry loop) is started again: the daemon
never goes on looking healthy while blind to a resource."""

from __future__ import annotations

import asyncio
import logging

import pytest

from kproxy.config import ProxyConfig
from kproxy.daemon import Daemon


class Thread:
    def __init__(self, alive: bool) -> None:
        self.alive = alive


def test_a_dead_informer_is_started_again_and_the_live_ones_are_left(
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = Daemon(ProxyConfig(manifests="unused", hostname_override="n"), families=["IPv4"])
    running = {"services": Thread(alive=False), "endpointslices": Thread(alive=True)}
    started: list[str] = []

    def start(name: str) -> Thread:
        started.append(name)
        return Thread(alive=True)

    async def run() -> None:
        task = asyncio.create_task(d._supervise(running, start, period=0.01))  # type: ignore[arg-type]
        await asyncio.sleep(0.1)
        d.stop.set()
        await task

    with caplog.at_level(logging.ERROR):
        asyncio.run(run())
    assert started == ["services"]  # once: the new one is alive
    assert running["services"].alive and d.informer_restarts == 1
    assert "the services informer stopped unexpectedly; starting it again" in caplog.text
