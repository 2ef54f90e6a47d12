"""The bounded-frequency runner, on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from kproxy.runner import Due, Runner, Schedule


def test_requests_coalesce_within_min_interval() -> None:
    s = Schedule(min_interval=1.0, max_interval=30.0, now=0.0)
    assert s.due(0.0) is None  # nothing requested, periodic not yet due
    s.request()
    due = s.due(0.0)
    assert due is not None and due.requested and not due.periodic
    s.started(0.0, due)
    s.succeeded()
    s.request()
    s.request()
    assert s.due(0.5) is None  # too soon after the last run
    assert s.next_run() == pytest.approx(1.0)
    assert s.due(1.0) is not None


def test_zero_min_interval_runs_immediately() -> None:
    s = Schedule(min_interval=0.0, max_interval=30.0, now=0.0)
    for t in (0.0, 0.001, 0.002):
        s.request()
        due = s.due(t)
        assert due is not None
        s.started(t, due)


def test_periodic_run_every_max_interval() -> None:
    s = Schedule(min_interval=1.0, max_interval=30.0, now=0.0)
    assert s.due(29.9) is None
    due = s.due(30.0)
    assert due is not None and due.periodic and not due.requested
    s.started(30.0, due)
    assert s.next_run() == pytest.approx(60.0)


def test_a_requested_run_does_not_postpone_the_periodic_one() -> None:
    s = Schedule(min_interval=1.0, max_interval=30.0, now=0.0)
    s.request()
    due = s.due(10.0)
    assert due is not None
    s.started(10.0, due)
    assert s.next_run() == pytest.approx(30.0)


def test_failures_back_off_exponentially_up_to_max_interval() -> None:
    s = Schedule(min_interval=0.0, max_interval=30.0, now=0.0, initial_backoff=1.0)
    delays = []
    now = 0.0
    for _ in range(8):
        s.request()
        due = s.due(now)
        assert due is not None
        s.started(now, due)
        delays.append(s.failed(now))
        now = s.next_run()
        again = s.due(now)
        # A retry that would land after the periodic run is served by the periodic run.
        assert again is not None and (again.retry or again.periodic)
        s.started(now, again)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    s.succeeded()
    assert s.failed(now) == 1.0  # success resets the backoff


def test_retry_respects_min_interval() -> None:
    s = Schedule(min_interval=5.0, max_interval=60.0, now=0.0, initial_backoff=1.0)
    s.request()
    due = s.due(0.0)
    assert due is not None
    s.started(0.0, due)
    s.failed(0.0)
    assert s.next_run() == pytest.approx(5.0)


def test_invalid_intervals() -> None:
    with pytest.raises(ValueError):
        Schedule(min_interval=-1.0, max_interval=1.0, now=0.0)
    with pytest.raises(ValueError):
        Schedule(min_interval=0.0, max_interval=0.0, now=0.0)


def test_runner_drives_the_schedule_and_retries_failures() -> None:
    calls: list[Due] = []
    results = [False, True]

    async def fn(due: Due) -> bool:
        calls.append(due)
        return results.pop(0) if results else True

    async def main() -> None:
        runner = Runner(fn, min_interval=0.0, max_interval=3600.0)
        runner.schedule.initial_backoff = 0.01
        runner.schedule._backoff = 0.01
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        runner.request()
        for _ in range(200):
            if len(calls) >= 2:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 2)

    asyncio.run(main())
    assert len(calls) == 2
    assert calls[0].requested
    assert calls[1].retry


def test_a_raising_sync_counts_as_a_failure() -> None:
    calls = 0

    async def fn(due: Due) -> bool:
        nonlocal calls
        calls += 1
        raise RuntimeError("boom")

    async def main() -> None:
        runner = Runner(fn, min_interval=0.0, max_interval=3600.0)
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        runner.request()
        for _ in range(100):
            if calls:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 2)
        assert runner.schedule._retry_at is not None

    asyncio.run(main())
    assert calls == 1
