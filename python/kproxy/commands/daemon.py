"""``kproxy daemon``: run the proxy."""

from __future__ import annotations

import argparse

from kproxy import daemon
from kproxy.commands.flags import Subparsers, add_proxy_flags, run_configured


def register(subparsers: Subparsers) -> None:
    d = subparsers.add_parser("daemon", help="run the proxy", allow_abbrev=False)
    add_proxy_flags(d)


def run(args: argparse.Namespace) -> int:
    return run_configured(args, daemon.run)
