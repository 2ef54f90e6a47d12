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

# mallopt(3) parameters.
_M_MMAP_THRESHOLD = -3
# Blocks from this size up get their own mapping, returned to the system when freed.
MMAP_THRESHOLD = 128 * 1024


def configure() -> bool:
    """Give large blocks (API list pages, change sets, rule text) their own mappings.

    glibc raises its mmap threshold each time such a block is freed (up to 32 MiB), so after
    the first large list the next megabyte-sized buffers are carved out of the heap between
    long-lived objects, and the pages they leave behind cannot be returned. A fixed threshold
    keeps them out of the heap. Call once, at start.
    """
    if _LIBC is None or not hasattr(_LIBC, "mallopt"):
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim() -> bool:
    """Return free heap memory to the system; False where the C library cannot."""
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(0))
