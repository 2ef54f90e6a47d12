"""Log lines in klog's formats, so what reads kube-proxy's logs reads kproxy's.

Text (klog's header): ``I1202 03:07:48.642123   12345 daemon.py:231] message key="value"``:
severity letter, month and day, time to the microsecond, the process id right-aligned in
seven columns, the Python file and line in place of the Go file, then the message.

JSON (``--logging-format=json``, component-base's schema): one object per line with ``ts``
(milliseconds since the epoch), ``caller``, ``msg``, ``v`` (the verbosity level, info lines
only) and ``err`` for errors; key-value pairs given as ``extra={"kv": {...}}`` become fields.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

FORMATS = ("text", "json")
# klog's V(2): per-sync lines, shown from -v=2 on (DEBUG is V(4): details).
V2 = 15
logging.addLevelName(V2, "V2")
_SEVERITY = {
    logging.DEBUG: "I",
    V2: "I",
    logging.INFO: "I",
    logging.WARNING: "W",
    logging.ERROR: "E",
}


def _kv(record: logging.LogRecord) -> dict[str, Any]:
    kv = getattr(record, "kv", None)
    return dict(kv) if isinstance(kv, dict) else {}


def _verbosity(record: logging.LogRecord) -> int:
    if record.levelno <= logging.DEBUG:
        return 4
    return 2 if record.levelno < logging.INFO else 0


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        micros = int(record.created % 1 * 1_000_000)
        severity = _SEVERITY.get(record.levelno, "F" if record.levelno > logging.ERROR else "I")
        head = (
            f"{severity}{t.tm_mon:02d}{t.tm_mday:02d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{micros:06d} "
            f"{os.getpid():>7} {record.filename}:{record.lineno}] "
        )
        msg = record.getMessage()
        kv = "".join(f" {k}={json.dumps(v, default=str)}" for k, v in _kv(record).items())
        line = head + msg + kv
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": round(record.created * 1000, 3),
            "caller": f"{record.filename}:{record.lineno}",
            "msg": record.getMessage(),
        }
        if record.levelno >= logging.ERROR:
            obj["err"] = self.formatException(record.exc_info) if record.exc_info else obj["msg"]
        else:
            obj["v"] = _verbosity(record)
        obj.update(_kv(record))
        return json.dumps(obj, default=str)


def setup(verbosity: int, fmt: str = "text") -> None:
    """Log to stderr in klog's ``fmt`` at ``verbosity`` (klog's -v: per-sync lines from 2 on,
    details from 4 on)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity >= 4 else V2 if verbosity >= 2 else logging.INFO)
    # The libraries' own debug lines (every netlink message, every HTTP request) only from
    # -v=8 on, as klog shows request details from V(8).
    for name in ("pyroute2", "urllib3", "asyncio"):
        logging.getLogger(name).setLevel(logging.NOTSET if verbosity >= 8 else logging.INFO)
