"""``kproxy version``: kproxy's version and its core's."""

from __future__ import annotations

import argparse

from kproxy import __version__, _core
from kproxy.commands.flags import Subparsers


def register(subparsers: Subparsers) -> None:
    subparsers.add_parser("version", help="print the version")


def run(args: argparse.Namespace) -> int:
    print(f"kproxy {__version__} (core {_core.version()})")
    return 0
