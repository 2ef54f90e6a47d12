"""``kproxy diff --live``: what differs between this node's kernel rules and what kproxy wants
(root). The comparison is `kproxy.tools.live_differences` (also the API's)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from kproxy import tools
from kproxy.commands.flags import Subparsers, add_proxy_flags, run_configured
from kproxy.config import ProxyConfig


def register(subparsers: Subparsers) -> None:
    df = subparsers.add_parser(
        "diff", allow_abbrev=False,
        help="what differs between the kernel's rules and what kproxy wants (needs root)",
    )  # fmt: skip
    df.add_argument("--live", action="store_true", required=True, help="compare with the kernel")
    df.add_argument("--json", dest="as_json", action="store_true", help="machine-readable output")
    add_proxy_flags(df)


def run(args: argparse.Namespace) -> int:
    return run_configured(args, lambda cfg: diff(cfg, as_json=args.as_json))


def diff(cfg: ProxyConfig, *, as_json: bool) -> int:
    """Exit status 0 when the kernel holds exactly what kproxy wants, 1 otherwise."""
    report = {family: tools.live_differences(cfg, family) for family in tools.FAMILIES}
    if as_json:
        print(json.dumps({f: [dataclasses.asdict(d) for d in ds] for f, ds in report.items()}))
    else:
        for fam, ds in report.items():
            print(f"{fam}: {'no differences' if not ds else f'{len(ds)} differences'}")
            for d in ds:
                print(f"  {d}")
    return 1 if any(report.values()) else 0
