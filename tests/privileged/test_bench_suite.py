"""The benchmark suite's smoke run (``benches/suite.py --smoke --focused``), so the suite
cannot rot: every mode's daemon starts cold against the fake API server (the ipvs mode's in
a VM, where virtme-ng is installed), changes are timed, the floor and upstream's shape are
loaded, a small churn runs, every focused benchmark runs at a small size, and the report is
written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benches import vm

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


def test_the_suite_smoke_run_writes_a_complete_report(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "benches" / "suite.py"), "--smoke", "--focused", "--out",
         str(tmp_path)],
        capture_output=True, text=True, timeout=2400, check=False, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    report = json.loads((tmp_path / "suite.json").read_text())
    runs = {(r["mode"], r["shape"]): r for r in report["runs"]}
    modes = {"iptables", "nftables", "userspace"}
    ipvs = {("ipvs", "100x10")} if vm.available() else set()
    assert set(runs) == {(m, s) for m in modes for s in ("100x10", "1x1000")} | ipvs
    for r in runs.values():
        parts = r["api_ingest_s"] + r["python_s"] + r["render_s"] + r["apply_s"]
        assert 0 < parts <= r["cold_start_s"] * 1.05 + 0.05, r
        assert r["one_service_s"] > 0 and r["one_endpoint_s"] > 0 and r["rss_mib"] > 10, r
    for m in ("iptables", "nftables", *(["ipvs"] if ipvs else [])):
        assert runs[(m, "100x10")]["floor_s"] > 0
        assert runs[(m, "100x10")]["upstream_shape_s"] > 0
    if ipvs:
        assert runs[("ipvs", "100x10")]["vm"].startswith("qemu without KVM")
    focused = {f["name"]: f for f in report["focused"]}
    expected = {p.stem for p in (ROOT / "benches").glob("*.py")} - {"__init__", "suite", "vm"}
    assert set(focused) == expected
    for name, f in focused.items():
        if name == "ipvs_program" and not vm.available():
            continue
        assert f["ok"], (tmp_path / f"{name}.txt").read_text()[-3000:]
        assert json.loads((tmp_path / f"{name}.json").read_text()), name
    (churn,) = report["churn"]
    assert churn["failed_syncs"] == 0 and len(churn["add_s"]) == len(churn["delete_s"]) == 1
    assert "| iptables | 100x10 | 100 | 1,000 |" in (tmp_path / "suite.md").read_text()
    for png in ("suite_sync_time.png", "suite_changes.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
