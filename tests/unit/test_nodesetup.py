"""kproxy.nodesetup over a stand-in /proc and /sys (a directory tree): upstream's conntrack
sizing (max(maxPerCore x CPUs, min), capped, never lowered, the hash table grown to a
quarter), the timeouts, and logging on, never failing, where the kernel refuses."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kproxy import nodesetup
from kproxy.config import ProxyConfig
from kproxy.nodesetup import CONNTRACK_MAX_CAP, Proc, conntrack_max

NF = "proc/sys/net/netfilter"


def proc_tree(tmp_path: Path, ct_max: int, hashsize: int) -> Proc:
    (tmp_path / NF).mkdir(parents=True)
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "sys/module/nf_conntrack/parameters").mkdir(parents=True)
    (tmp_path / NF / "nf_conntrack_max").write_text(f"{ct_max}\n")
    (tmp_path / "sys/module/nf_conntrack/parameters/hashsize").write_text(f"{hashsize}\n")
    for name in ("nf_conntrack_tcp_timeout_established", "nf_conntrack_tcp_timeout_close_wait"):
        (tmp_path / NF / name).write_text("432000\n")
    return Proc(tmp_path)


def read(tmp_path: Path, rel: str) -> int:
    return int((tmp_path / rel).read_text())


@pytest.mark.parametrize(
    ("per_core", "floor", "cpus", "want"),
    [
        (32768, 131072, 2, 131072),  # the floor wins on a small machine
        (32768, 131072, 16, 524288),
        (32768, 131072, 256, CONNTRACK_MAX_CAP),  # capped
        (0, 131072, 16, 0),  # 0 per core: leave the kernel's
    ],
)
def test_conntrack_max(per_core: int, floor: int, cpus: int, want: int) -> None:
    cfg = ProxyConfig(conntrack_max_per_core=per_core, conntrack_min=floor)
    assert conntrack_max(cfg, cpus) == want


def test_raises_the_limit_and_grows_the_hash_table(tmp_path: Path) -> None:
    proc = proc_tree(tmp_path, ct_max=65536, hashsize=16384)
    nodesetup.apply(ProxyConfig(), proc=proc, cpus=16)
    assert read(tmp_path, f"{NF}/nf_conntrack_max") == 524288
    assert read(tmp_path, "sys/module/nf_conntrack/parameters/hashsize") == 131072
    assert read(tmp_path, f"{NF}/nf_conntrack_tcp_timeout_established") == 86400
    assert read(tmp_path, f"{NF}/nf_conntrack_tcp_timeout_close_wait") == 3600
    assert read(tmp_path, "proc/self/oom_score_adj") == -999
    # Timeouts of 0 and tcpBeLiberal false leave the kernel's.
    assert not (tmp_path / NF / "nf_conntrack_udp_timeout").exists()
    assert not (tmp_path / NF / "nf_conntrack_tcp_be_liberal").exists()


def test_never_lowers_a_higher_limit(tmp_path: Path) -> None:
    proc = proc_tree(tmp_path, ct_max=2_000_000, hashsize=1000)
    nodesetup.apply(ProxyConfig(), proc=proc, cpus=16)
    assert read(tmp_path, f"{NF}/nf_conntrack_max") == 2_000_000
    assert read(tmp_path, "sys/module/nf_conntrack/parameters/hashsize") == 1000


def test_a_read_only_proc_is_logged_and_the_rest_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proc = proc_tree(tmp_path, ct_max=1000, hashsize=100)
    (tmp_path / NF / "nf_conntrack_max").unlink()
    (tmp_path / NF / "nf_conntrack_max").mkdir()  # writing it fails, as read-only /proc does
    cfg = ProxyConfig(conntrack_udp_timeout=30.0, conntrack_tcp_be_liberal=True)
    with caplog.at_level(logging.INFO, "kproxy.nodesetup"):
        nodesetup.apply(cfg, proc=proc, cpus=2)
    assert "cannot set nf_conntrack_max to 131072" in caplog.text
    # The hash table is only grown once the limit was written.
    assert read(tmp_path, "sys/module/nf_conntrack/parameters/hashsize") == 100
    assert read(tmp_path, f"{NF}/nf_conntrack_udp_timeout") == 30
    assert read(tmp_path, f"{NF}/nf_conntrack_tcp_be_liberal") == 1


def test_without_conntrack_only_the_oom_score_is_set(tmp_path: Path) -> None:
    proc = proc_tree(tmp_path, ct_max=1000, hashsize=100)
    nodesetup.apply(ProxyConfig(oom_score_adj=-10), conntrack=False, proc=proc, cpus=2)
    assert read(tmp_path, f"{NF}/nf_conntrack_max") == 1000
    assert read(tmp_path, f"{NF}/nf_conntrack_tcp_timeout_established") == 432000
    assert read(tmp_path, "proc/self/oom_score_adj") == -10
