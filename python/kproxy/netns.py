"""Network namespaces: a scratch one, and running Python code inside one.

A network namespace is a per-thread attribute on Linux: a thread that calls ``setns`` moves
itself (and the threads it starts later) into the namespace, and sockets it creates or rules
it writes live there for good. ``NetnsExecutor`` keeps one such thread, so work can run in
another namespace with plain function calls (``kproxy diff --live`` programs its desired rules
into a scratch namespace this way; tests run the fake API server inside a lab's node).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000


def _enter(ns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NetnsExecutor:
    """One worker thread living in network namespace ``ns``."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"netns-{ns}")
        # Enter now, and fail loudly here rather than on first use.
        self._pool.submit(_enter, ns).result(timeout=10)

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        return self._pool.submit(fn).result(timeout=timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> NetnsExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def scratch() -> Iterator[str]:
    """A new, empty network namespace (connected to nothing), removed afterwards."""
    name = f"kproxy-scratch-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=30)
