"""The daemon's open-file limit: lifted as far as its privileges allow."""

from __future__ import annotations

import resource

import pytest

from kproxy import daemon


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
