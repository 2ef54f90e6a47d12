"""The command line: ``kproxy daemon|render|trace|diff|doctor|cleanup|version`` with
kube-proxy's flag names.

One module per command, each with ``register(subparsers)`` (its parser and flags) and
``run(args) -> int`` (its exit status); `COMMANDS` lists them in ``--help``'s order.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Protocol

from kproxy.commands import cleanup, daemon, diff, doctor, render, trace, version
from kproxy.commands.flags import Subparsers, _Parser


class Command(Protocol):
    def register(self, subparsers: Subparsers) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


COMMANDS: dict[str, Command] = {
    "daemon": daemon,
    "render": render,
    "trace": trace,
    "diff": diff,
    "doctor": doctor,
    "cleanup": cleanup,
    "version": version,
}


def make_parser() -> argparse.ArgumentParser:
    # No abbreviations: kube-proxy refuses flags it does not know, and so do we.
    p = _Parser(prog="kproxy", description="A drop-in kube-proxy replacement.", allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in COMMANDS.values():
        command.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    raise SystemExit(main())
