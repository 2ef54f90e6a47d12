"""The bounded-frequency sync runner (upstream's BoundedFrequencyRunner).

Requests coalesce: a sync runs at most once per ``min_interval`` however many changes arrive,
at least once per ``max_interval`` (the periodic resync) and, after a failure, again after a
backoff that doubles up to ``max_interval``. The timing decisions live in :class:`Schedule`,
a pure object driven by an injected clock so it can be tested without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Due:
    """Why a run is due now."""

    requested: bool
    periodic: bool
    retry: bool


class Schedule:
    def __init__(
        self,
        min_interval: float,
        max_interval: float,
        now: float,
        *,
        initial_backoff: float = 1.0,
    ) -> None:
        if min_interval < 0 or max_interval <= 0:
            raise ValueError("intervals must be positive")
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.initial_backoff = min(initial_backoff, max_interval)
        self._last_run = -math.inf
        self._last_periodic = now
        self._requested = False
        self._retry_at: float | None = None
        self._backoff = self.initial_backoff

    def request(self) -> None:
        self._requested = True

    def next_run(self) -> float:
        """The earliest time at which a run is due."""
        at = self._last_periodic + self.max_interval
        if self._requested:
            at = min(at, self._last_run + self.min_interval)
        if self._retry_at is not None:
            at = min(at, max(self._retry_at, self._last_run + self.min_interval))
        return at

    def due(self, now: float) -> Due | None:
        if now < self.next_run():
            return None
        periodic = now >= self._last_periodic + self.max_interval
        retry = self._retry_at is not None and now >= self._retry_at
        return Due(requested=self._requested, periodic=periodic, retry=retry)

    def started(self, now: float, due: Due) -> None:
        self._last_run = now
        self._requested = False
        self._retry_at = None
        if due.periodic:
            self._last_periodic = now

    def succeeded(self) -> None:
        self._backoff = self.initial_backoff

    def failed(self, now: float) -> float:
        """Schedule a retry; returns the delay chosen."""
        delay = self._backoff
        self._retry_at = now + delay
        self._backoff = min(self._backoff * 2, self.max_interval)
        return delay


SyncFn = Callable[[Due], Awaitable[bool]]


class Runner:
    """Drives a :class:`Schedule` on the event loop; ``fn`` returns False on failure."""

    def __init__(
        self,
        fn: SyncFn,
        min_interval: float,
        max_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fn = fn
        self._clock = clock
        self.schedule = Schedule(min_interval, max_interval, clock())
        self._wake = asyncio.Event()

    def request(self) -> None:
        """Ask for a sync soon (coalesced; never blocks)."""
        self.schedule.request()
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            now = self._clock()
            due = self.schedule.due(now)
            if due is None:
                timeout = max(0.0, self.schedule.next_run() - now)
                self._wake.clear()
                waiters = [
                    asyncio.ensure_future(self._wake.wait()),
                    asyncio.ensure_future(stop.wait()),
                ]
                _, pending = await asyncio.wait(
                    waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                for w in pending:
                    w.cancel()
                continue
            self.schedule.started(now, due)
            try:
                ok = await self._fn(due)
            except Exception:
                log.exception("sync raised")
                ok = False
            if ok:
                self.schedule.succeeded()
            else:
                delay = self.schedule.failed(self._clock())
                log.warning("sync failed; retrying in %.1fs", delay)
