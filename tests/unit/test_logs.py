"""kproxy.logs: klog's text header and component-base's JSON schema, parsed back."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kproxy.logs import V2, JsonFormatter, TextFormatter, setup

# klog: Lmmdd hh:mm:ss.uuuuuu threadid file:line] msg
KLOG = re.compile(
    r"(?P<sev>[IWEF])(?P<mm>\d\d)(?P<dd>\d\d) (?P<time>\d\d:\d\d:\d\d\.\d{6}) +(?P<pid>\d+) "
    r"(?P<file>[\w.]+):(?P<line>\d+)\] (?P<msg>.*)"
)


def record(level: int, msg: str, *args: object, **kv: object) -> logging.LogRecord:
    r = logging.LogRecord("kproxy.daemon", level, "/x/daemon.py", 231, msg, args, None)
    if kv:
        r.kv = kv
    return r


def test_text_lines_parse_as_klog() -> None:
    for level, sev in ((logging.INFO, "I"), (logging.WARNING, "W"), (logging.ERROR, "E"),
                       (logging.DEBUG, "I"), (logging.CRITICAL, "F")):  # fmt: skip
        line = TextFormatter().format(record(level, "synced %s", "IPv4", elapsed="1.5s"))
        m = KLOG.fullmatch(line)
        assert m is not None, line
        assert m["sev"] == sev
        assert (m["file"], m["line"], int(m["pid"])) == ("daemon.py", "231", os.getpid())
        assert m["msg"] == 'synced IPv4 elapsed="1.5s"'


def test_json_lines_follow_component_bases_schema() -> None:
    info = json.loads(JsonFormatter().format(record(logging.INFO, "synced", services=3)))
    assert set(info) == {"ts", "caller", "msg", "v", "services"}
    assert (info["caller"], info["msg"], info["v"], info["services"]) == (
        "daemon.py:231",
        "synced",
        0,
        3,
    )
    assert abs(info["ts"] / 1000 - record(logging.INFO, "x").created) < 5
    debug = json.loads(JsonFormatter().format(record(logging.DEBUG, "detail")))
    assert debug["v"] == 4
    err = json.loads(JsonFormatter().format(record(logging.ERROR, "sync failed")))
    assert "v" not in err and err["err"] == "sync failed"


def test_the_commands_log_in_the_chosen_format(tmp_path: Path) -> None:
    out = tmp_path / "c.yaml"
    for fmt, parse in (("text", KLOG.fullmatch), ("json", json.loads)):
        r = subprocess.run(
            [sys.executable, "-m", "kproxy.kube_proxy", f"--logging-format={fmt}",
             f"--write-config-to={out}", "--profiling"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 2, r.stderr
        assert all(parse(line) for line in lines), lines


def test_verbosity_levels_follow_klog(capsys: pytest.CaptureFixture[str]) -> None:
    log = logging.getLogger("kproxy.test_levels")
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    shown = {}
    try:
        for v in (0, 2, 4):
            setup(v)
            log.info("info")
            log.log(V2, "per-sync")
            log.debug("detail")
            err = capsys.readouterr().err
            shown[v] = [m for m in ("info", "per-sync", "detail") if f"] {m}" in err]
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[1]:
            root.addHandler(h)
        root.setLevel(saved[0])
    assert shown == {0: ["info"], 2: ["info", "per-sync"], 4: ["info", "per-sync", "detail"]}
    assert json.loads(JsonFormatter().format(record(V2, "per-sync")))["v"] == 2
