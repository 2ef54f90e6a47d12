"""The churn soak (see ``soak.py``) in both netfilter modes: 1,000 Services x 100 endpoints
added and deleted for ``KPROXY_SOAK_MINUTES`` (10 by default) each, while a prober
connects."""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.privileged.harness import ProxyLab, proxy_lab
from tests.privileged.soak import run_soak

pytestmark = pytest.mark.privileged


@pytest.fixture(params=["nftables", "iptables"])
def lab(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProxyLab]:
    with proxy_lab(tmp_path, mode=request.param) as pl:
        yield pl


def test_churn_soak(lab: ProxyLab, tmp_path: Path) -> None:
    minutes = float(os.environ.get("KPROXY_SOAK_MINUTES", "10"))
    r = run_soak(lab, minutes)
    summary = (
        f"\nchurn soak ({r.mode}): {r.iterations} iterations of {r.services} x {r.endpoints} "
        f"in {r.seconds:.0f}s (each {[round(s) for s in r.iteration_seconds]} s); probes "
        f"{r.probes}; RSS floor per iteration (MiB) {[round(m) for m in r.rss_floor_mib]}"
    )
    print(summary)
    # Kept with the run's files (pytest keeps its last few temporary directories), since a
    # passing test's output is not shown.
    (tmp_path / "soak-summary.txt").write_text(summary + "\n")
    assert r.iterations >= 2
    assert r.failed_syncs == 0
    assert not r.bad_probes, r.bad_probes[:10]
    assert r.probes.get("stable ok", 0) > 100 and r.probes.get("toggle ok", 0) > 0
    assert r.probes.get("toggle refused", 0) > 0  # the toggled Service did go away
    # Flat memory: what stays after an iteration does not grow. The heap takes a few
    # iterations to reach its working size (the first ones sit lower), and single iterations
    # dip or peak (a sync caught before or after freed memory was handed back); so compare
    # the median floor of the last third of iterations with the middle third's. A leak of a
    # few MiB per iteration raises every floor and fails this within a 10-minute soak.
    floors = r.rss_floor_mib
    if len(floors) >= 6:
        third = len(floors) // 3
        middle = statistics.median(floors[third : 2 * third])
        late = statistics.median(floors[-third:])
        assert late <= 1.05 * middle + 10, r.rss_floor_mib
