"""Handing freed memory back to the system.

A full sync of a large cluster allocates hundreds of megabytes for a moment (the list pages,
the change set, the nft or iptables-restore input) and frees them. glibc keeps freed heap
pages for reuse, so the daemon's resident size would stay at that peak for good;
``malloc_trim`` returns them. It costs milliseconds, and only runs after full syncs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None  # not glibc (musl, macOS)


_LIBC = _libc()


def trim() -> bool:
    """Return free heap memory to the system; False where the C library cannot."""
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(0))
