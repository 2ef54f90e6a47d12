"""One-shot lifecycle commands (``kproxy cleanup``)."""

from __future__ import annotations

import logging
import shutil

from kproxy import _core
from kproxy.errors import KproxyError

log = logging.getLogger(__name__)


def cleanup() -> int:
    """Remove every rule kproxy creates, in every mode. Safe to run twice or on a clean node."""
    status = 0
    for family, tool in (("IPv4", "iptables"), ("IPv6", "ip6tables")):
        if shutil.which(f"{tool}-restore") is None:
            continue
        try:
            n = _core.cleanup_iptables(family)
            log.info("%s: removed %d chains", tool, n)
        except KproxyError as e:
            log.error("%s cleanup failed: %s", tool, e)
            status = 1
    return status
