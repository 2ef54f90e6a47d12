"""``kproxy render``: the rules kproxy would program, from the daemon's own code paths with the
engines on their in-memory kernel (no privileges; the kernel is not touched)."""

from __future__ import annotations

import argparse

from kproxy import tools
from kproxy.commands.flags import Subparsers, add_proxy_flags, run_configured
from kproxy.config import ProxyConfig


def register(subparsers: Subparsers) -> None:
    r = subparsers.add_parser(
        "render", allow_abbrev=False,
        help="print the rules kproxy would program (no privileges, the kernel is not touched)",
    )  # fmt: skip
    add_proxy_flags(r)


def run(args: argparse.Namespace) -> int:
    return run_configured(args, render)


def render(cfg: ProxyConfig) -> int:
    proxier = tools.rendered(cfg)
    for fam, text in proxier.render().items():
        print(proxier.backend.render_header(fam))
        print(text, end="")
    return 0
