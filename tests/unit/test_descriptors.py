"""Descriptors in the userspace mode: the daemon's open-file limit is lifted as far as its
privileges allow, and listeners refused for want of them are logged once, not every sync."""

from __future__ import annotations

import logging
import resource

import pytest

from kproxy import daemon
from kproxy.backends.userspace import LISTEN_ERRORS_LOGGED, UserspaceMode
from kproxy.config import ProxyConfig


class Limits:
    """RLIMIT_NOFILE as a process without (or with) CAP_SYS_RESOURCE sees it."""

    def __init__(self, soft: int, hard: int, privileged: bool) -> None:
        self.soft, self.hard, self.privileged = soft, hard, privileged

    def get(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def set(self, which: int, limits: tuple[int, int]) -> None:
        soft, hard = limits
        if hard > self.hard and not self.privileged:
            raise ValueError("not allowed to raise maximum limit")
        self.soft, self.hard = soft, hard


@pytest.mark.parametrize(
    ("privileged", "want"), [(False, (20000, 20000)), (True, (1 << 20, 1 << 20))]
)
def test_the_soft_limit_rises_to_the_hard_one_and_the_hard_one_as_root(
    monkeypatch: pytest.MonkeyPatch, privileged: bool, want: tuple[int, int]
) -> None:
    lim = Limits(1024, 20000, privileged)
    monkeypatch.setattr(resource, "getrlimit", lim.get)
    monkeypatch.setattr(resource, "setrlimit", lim.set)
    daemon._raise_fd_limit()
    assert (lim.soft, lim.hard) == want


def test_a_hard_limit_above_the_target_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    lim = Limits(1024, 1 << 22, privileged=True)
    monkeypatch.setattr(resource, "getrlimit", lim.get)
    monkeypatch.setattr(resource, "setrlimit", lim.set)
    daemon._raise_fd_limit()
    assert (lim.soft, lim.hard) == (1 << 22, 1 << 22)


def test_listener_failures_are_logged_when_new_and_summarized_past_a_few(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mode = UserspaceMode(ProxyConfig(mode="userspace"))
    errors = [f"ns/svc{i}:http: cannot listen on 10.0.0.{i}:80 (tcp): budget" for i in range(30)]

    def logged() -> list[str]:
        lines = [r.getMessage() for r in caplog.records]
        caplog.clear()
        return lines

    with caplog.at_level(logging.ERROR, logger="kproxy.backends.userspace"):
        mode._log_listen_errors("IPv4", errors)
        lines = logged()
        assert len(lines) == LISTEN_ERRORS_LOGGED + 1
        assert lines[0].startswith("ns/svc0:http: cannot listen on 10.0.0.0:80 (tcp)")
        assert lines[-1] == "... and 10 more listeners could not be opened (30 in all)"
        # Retried and failing again: nothing new to say.
        mode._log_listen_errors("IPv4", errors)
        assert logged() == []
        # One opened, one new failure: only the new one is logged.
        mode._log_listen_errors("IPv4", [*errors[1:], "ns/other:dns: cannot listen"])
        assert [line.split(" (the other")[0] for line in logged()] == [
            "ns/other:dns: cannot listen"
        ]
