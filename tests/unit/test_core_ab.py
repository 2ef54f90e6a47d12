"""``benches/core_ab.py`` cannot rot: a tiny A/B of this tree against itself, every mode on the
Fake, writes one row per mode, shape and measure, with both builds' times and their ratio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_an_ab_run_of_this_tree_against_itself_reports_every_row(tmp_path: Path) -> None:
    out = tmp_path / "ab.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benches" / "core_ab.py"), "--baseline", str(ROOT / "python"),
         "--shapes", "20x2", "--rounds", "2", "--changes", "3", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {(r["mode"], r["what"]): r for r in report["rows"]}
    modes = ("iptables", "nftables", "ipvs", "userspace")
    assert set(rows) == {(m, w) for m in modes for w in ("full", "change")}
    for r in rows.values():
        assert r["baseline_s"] > 0 and r["candidate_s"] > 0, r
        assert r["ratio"] == r["candidate_s"] / r["baseline_s"], r
    assert report["machine"]["kernel"] and report["backend"] == "fake"
