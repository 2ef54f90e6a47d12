"""Go's durations (``time.ParseDuration``), as kube-proxy's flags and file take them."""

from __future__ import annotations

import re

from kproxy.errors import ConfigError

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_UNIT_NS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign
    "\u03bcs": 1_000,  # Greek small letter mu; Go accepts both
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}


def parse_duration(field: str, value: object) -> float:
    """A Go duration (``1s``, ``500ms``, ``1m30s``, ``0``) in seconds.

    Parsed as whole nanoseconds, as Go does, so ``30s`` and ``30000000000`` compare equal.
    """
    if isinstance(value, bool):
        raise ConfigError(field, f"invalid duration {value!r}")
    if isinstance(value, int | float):
        # A bare number in a config file is nanoseconds (Go's JSON encoding of a Duration).
        nanos = round(value)
    elif isinstance(value, str):
        s = value.strip()
        sign = 1
        if s[:1] in ("+", "-"):
            sign = -1 if s[0] == "-" else 1
            s = s[1:]
        if s == "0":
            return 0.0
        pos, nanos = 0, 0
        for m in _DURATION_PART.finditer(s):
            if m.start() != pos:
                break
            nanos += round(float(m.group(1)) * _UNIT_NS[m.group(2)])
            pos = m.end()
        if pos != len(s) or pos == 0:
            raise ConfigError(field, f"invalid duration {value!r} (examples: 1s, 500ms, 1m30s)")
        nanos *= sign
    else:
        raise ConfigError(field, f"invalid duration {value!r}")
    if nanos < 0:
        raise ConfigError(field, "must not be negative")
    return nanos / 1e9


def format_duration(seconds: float) -> str:
    """Go's canonical form: ``1h0m0s``, ``1m30s``, ``30s``, ``250ms``, ``0s``."""
    nanos = round(seconds * 1e9)
    if nanos == 0:
        return "0s"
    if nanos < 1_000_000_000:
        for unit, scale in (("ms", 1_000_000), ("us", 1_000)):
            if nanos % scale == 0:
                return f"{nanos // scale}{unit}"
        return f"{nanos}ns"
    h, rem = divmod(nanos, 3_600_000_000_000)
    m, rem = divmod(rem, 60_000_000_000)
    s = f"{rem / 1e9:.9f}".rstrip("0").rstrip(".") + "s"
    if h:
        return f"{h}h{m}m{s}"
    return f"{m}m{s}" if m else s
