"""The node setup kube-proxy does before it proxies: conntrack's table size and timeouts, and
the process's OOM score (upstream's ``platformSetup`` and ``conntrack.go``).

Every step logs and goes on when the kernel will not take the value: ``/proc/sys`` is read-only
in an unprivileged container and on LXC, and ``nf_conntrack_max`` can only be written from the
host's network namespace. Upstream does the same. ``kube-proxy --init-only`` runs this and
exits, so the long-running container can do without the privileges it needs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from kproxy.config import ProxyConfig

log = logging.getLogger(__name__)

# Upstream caps the table it asks for (a per-core default on a 256-core machine would
# otherwise ask for 8M entries, about 2.5 GiB of kernel memory).
CONNTRACK_MAX_CAP = 1 << 20
_NETFILTER = "sys/net/netfilter"
_HASHSIZE = "sys/module/nf_conntrack/parameters/hashsize"


def conntrack_max(cfg: ProxyConfig, cpus: int) -> int:
    """The ``nf_conntrack_max`` kube-proxy asks for: max(maxPerCore x CPUs, min), capped;
    0 (leave the kernel's) when maxPerCore is 0."""
    if cfg.conntrack_max_per_core <= 0:
        return 0
    return min(max(cfg.conntrack_max_per_core * cpus, cfg.conntrack_min), CONNTRACK_MAX_CAP)


def conntrack_sysctls(cfg: ProxyConfig) -> dict[str, int]:
    """The per-namespace conntrack sysctls to set (name under net.netfilter -> value); a
    timeout of 0 leaves the kernel's."""
    out: dict[str, int] = {}
    for name, seconds in (
        ("nf_conntrack_tcp_timeout_established", cfg.conntrack_tcp_established_timeout),
        ("nf_conntrack_tcp_timeout_close_wait", cfg.conntrack_tcp_close_wait_timeout),
        ("nf_conntrack_udp_timeout", cfg.conntrack_udp_timeout),
        ("nf_conntrack_udp_timeout_stream", cfg.conntrack_udp_stream_timeout),
    ):
        if seconds > 0:
            out[name] = max(1, round(seconds))
    if cfg.conntrack_tcp_be_liberal:
        out["nf_conntrack_tcp_be_liberal"] = 1
    return out


@dataclass(frozen=True, slots=True)
class Proc:
    """Where /proc and /sys are (a directory holding ``proc/`` and ``sys/``; tests use a
    copy)."""

    root: Path = Path("/")

    def read_int(self, rel: str) -> int | None:
        try:
            return int((self.root / rel).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def write(self, rel: str, value: int) -> str | None:
        """None when written, else why not."""
        try:
            (self.root / rel).write_text(f"{value}\n")
        except OSError as e:
            return e.strerror or type(e).__name__
        return None


def set_conntrack_max(want: int, proc: Proc) -> None:
    """Raise ``nf_conntrack_max`` to ``want``, never lower it; grow the hash table to a
    quarter of it, as upstream, once the limit was written."""
    path = f"proc/{_NETFILTER}/nf_conntrack_max"
    have = proc.read_int(path)
    if have is not None and have >= want:
        log.debug("nf_conntrack_max is %d, not lowered to %d", have, want)
        return
    err = proc.write(path, want)
    if err is not None:
        log.warning("cannot set nf_conntrack_max to %d (%s); left at %s", want, err, have)
        return
    log.info("set nf_conntrack_max to %d", want)
    hashsize = proc.read_int(_HASHSIZE)
    if hashsize is not None and hashsize < want // 4:
        err = proc.write(_HASHSIZE, want // 4)
        if err is not None:
            log.warning("cannot set the conntrack hashsize to %d (%s)", want // 4, err)


def apply(
    cfg: ProxyConfig, *, conntrack: bool = True, proc: Proc | None = None, cpus: int | None = None
) -> None:
    """The whole node setup for ``cfg`` (``conntrack``: with conntrack's)."""
    proc = proc or Proc()
    if cpus is None:
        cpus = len(os.sched_getaffinity(0))
    want = conntrack_max(cfg, cpus) if conntrack else 0
    if want:
        set_conntrack_max(want, proc)
    for name, value in conntrack_sysctls(cfg).items() if conntrack else ():
        path = f"proc/{_NETFILTER}/{name}"
        if proc.read_int(path) == value:
            continue
        err = proc.write(path, value)
        if err is None:
            log.info("set net.netfilter.%s to %d", name, value)
        else:
            log.warning("cannot set net.netfilter.%s to %d (%s)", name, value, err)
    if cfg.oom_score_adj is not None:
        err = proc.write("proc/self/oom_score_adj", cfg.oom_score_adj)
        if err is not None:  # lowering it needs CAP_SYS_RESOURCE
            log.info("cannot set oom_score_adj to %d (%s)", cfg.oom_score_adj, err)
