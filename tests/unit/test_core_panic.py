"""A panic in the Rust core (pyo3's PanicException, a BaseException) does not end the daemon:
the sync counts as failed, everything is sent again, and the next sync is full."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from kproxy.config import ProxyConfig
from kproxy.daemon import Daemon
from kproxy.model import ServiceKey
from kproxy.runner import Due
from tests import k8sobjects as k


class PanicException(BaseException):
    """What pyo3 raises for a Rust panic (matched by name, as pyo3_runtime's is)."""


class Proxier:
    mode = "iptables"

    def __init__(self) -> None:
        self.calls: list[tuple[set[ServiceKey], bool]] = []
        self.panic = True

    def sync(self, changes: Any, full: bool, retry_refused: bool = False) -> dict[str, Any]:
        self.calls.append((set(changes.services), full))
        if self.panic:
            raise PanicException("index out of bounds")
        return {}


def test_a_core_panic_fails_the_sync_and_the_next_one_resends_everything() -> None:
    d = Daemon(ProxyConfig(manifests="unused", hostname_override="n"), families=["IPv4"])
    c = d.controller
    c.replace("services", [k.service("a", "10.96.0.1", [k.port("http", 80)])])
    c.replace("endpointslices", [])
    c.replace("nodes", [k.node("n")])
    proxier = Proxier()
    d.proxier = proxier  # type: ignore[assignment]
    d._last_full = time.monotonic()  # a full sync just happened: this one would be partial

    async def sync() -> bool:
        return await d._sync(Due(requested=True, periodic=False, retry=False))

    assert asyncio.run(sync()) is False
    assert d.failures == 1
    proxier.panic = False
    asyncio.run(sync())
    (_, first_full), (resent, full) = proxier.calls
    assert not first_full and full and resent == {ServiceKey("default", "a")}


def test_other_base_exceptions_still_propagate() -> None:
    d = Daemon(ProxyConfig(manifests="unused", hostname_override="n"), families=["IPv4"])
    for r in ("services", "endpointslices"):
        d.controller.replace(r, [])
    d.controller.replace("nodes", [k.node("n")])

    class Stop:
        mode = "iptables"

        def sync(self, changes: Any, full: bool, retry_refused: bool = False) -> dict[str, Any]:
            raise KeyboardInterrupt

    d.proxier = Stop()  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        asyncio.run(d._sync(Due(requested=True, periodic=False, retry=False)))
