"""``kproxy trace``: where a packet goes, as kproxy would program it or (``--live``) through
the rules in this node's kernel. The tracing and its explanation are `kproxy.tools`'."""

from __future__ import annotations

import argparse

from kproxy import tools
from kproxy.commands.flags import Subparsers, add_proxy_flags, run_configured


def register(subparsers: Subparsers) -> None:
    t = subparsers.add_parser(
        "trace", allow_abbrev=False,
        help="where a packet goes: as kproxy would program it, or (--live) in the kernel",
    )  # fmt: skip
    t.add_argument("src", help="source address")
    t.add_argument("dst", help="destination: IP:PORT[/PROTO], IPv6 as [IP]:PORT[/PROTO]")
    t.add_argument(
        "--from-node", action="store_true",
        help="the packet is sent by the node itself (default: it arrives from the network)",
    )  # fmt: skip
    t.add_argument(
        "--live", action="store_true", help="trace through the rules in this node's kernel"
    )
    t.add_argument(
        "--node-ip", action="append", default=[], metavar="IP",
        help="an address of the node (repeatable; default: the Node's, or this host's)",
    )  # fmt: skip
    add_proxy_flags(t)


def run(args: argparse.Namespace) -> int:
    return run_configured(
        args,
        lambda cfg: tools.trace_command(
            cfg, args.src, args.dst, from_node=args.from_node, live=args.live, node_ips=args.node_ip
        ),
    )
