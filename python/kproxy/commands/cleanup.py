"""``kproxy cleanup``: remove every rule kproxy (or kube-proxy) created, or with
``--hand-back`` only kproxy's own (`kproxy.lifecycle`)."""

from __future__ import annotations

import argparse
import sys

from kproxy import lifecycle, logs, xtables_backend
from kproxy.commands.flags import Subparsers
from kproxy.errors import ConfigError


def register(subparsers: Subparsers) -> None:
    c = subparsers.add_parser("cleanup", help="remove every rule kproxy (or kube-proxy) created")
    c.add_argument("-v", "--v", dest="verbosity", type=int, default=0)
    c.add_argument(
        "--hand-back", action="store_true",
        help="kube-proxy runs here now: remove only what kproxy alone created",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    try:
        logs.setup(args.verbosity)
        xtables_backend.configure()
        return lifecycle.hand_back() if args.hand_back else lifecycle.cleanup()
    except ConfigError as e:
        sys.stderr.write(f"kproxy: error: {e}\n")
        return 2
