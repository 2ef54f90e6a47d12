"""``kproxy doctor``: what will go wrong on this node in the chosen mode, before it does. The
checks and their report are `kproxy.doctor`'."""

from __future__ import annotations

import argparse

from kproxy import doctor
from kproxy.commands.flags import Subparsers, add_proxy_flags, run_configured


def register(subparsers: Subparsers) -> None:
    dr = subparsers.add_parser(
        "doctor", allow_abbrev=False,
        help="what will go wrong on this node in the chosen mode, before it does",
    )  # fmt: skip
    dr.add_argument("--json", dest="as_json", action="store_true", help="machine-readable output")
    add_proxy_flags(dr)


def run(args: argparse.Namespace) -> int:
    return run_configured(args, lambda cfg: doctor.doctor_command(cfg, as_json=args.as_json))
