"""The command line: ``kproxy daemon|render|trace|diff|doctor|cleanup|version`` with
kube-proxy's flag names."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from kproxy import __version__, _core, doctor, logs, tools, v1alpha1, xtables_backend
from kproxy.config import MODES, ProxyConfig, build, load_file
from kproxy.daemon import run
from kproxy.errors import ConfigError, KproxyError
from kproxy.goduration import parse_duration
from kproxy.lifecycle import cleanup, hand_back

log = logging.getLogger("kproxy")


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line and exit code 2, like every other bad value."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"kproxy: error: {message}\n")
        raise SystemExit(2)


def _duration_flag(name: str) -> Any:
    def parse(value: str) -> float:
        try:
            return parse_duration(name, value)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(e.message) from None

    return parse


def comma_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def gates_arg(value: str) -> dict[str, bool]:
    """``--feature-gates``: ``Name=true,Other=false``."""
    out: dict[str, bool] = {}
    for item in comma_list(value):
        name, sep, on = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{item!r} is not NAME=true|false")
        out[name.strip()] = bool_arg(on.strip())
    return out


def make_parser() -> argparse.ArgumentParser:
    # No abbreviations: kube-proxy refuses flags it does not know, and so do we.
    p = _Parser(prog="kproxy", description="A drop-in kube-proxy replacement.", allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = sub.add_parser("daemon", help="run the proxy", allow_abbrev=False)
    add_proxy_flags(d)

    r = sub.add_parser(
        "render", allow_abbrev=False,
        help="print the rules kproxy would program (no privileges, the kernel is not touched)",
    )  # fmt: skip
    add_proxy_flags(r)

    t = sub.add_parser(
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

    df = sub.add_parser(
        "diff", allow_abbrev=False,
        help="what differs between the kernel's rules and what kproxy wants (needs root)",
    )  # fmt: skip
    df.add_argument("--live", action="store_true", required=True, help="compare with the kernel")
    df.add_argument("--json", dest="as_json", action="store_true", help="machine-readable output")
    add_proxy_flags(df)

    dr = sub.add_parser(
        "doctor", allow_abbrev=False,
        help="what will go wrong on this node in the chosen mode, before it does",
    )  # fmt: skip
    dr.add_argument("--json", dest="as_json", action="store_true", help="machine-readable output")
    add_proxy_flags(dr)

    c = sub.add_parser("cleanup", help="remove every rule kproxy (or kube-proxy) created")
    c.add_argument("-v", "--v", dest="verbosity", type=int, default=0)
    c.add_argument(
        "--hand-back", action="store_true",
        help="kube-proxy runs here now: remove only what kproxy alone created",
    )  # fmt: skip

    sub.add_parser("version", help="print the version")
    return p


def add_proxy_flags(d: argparse.ArgumentParser) -> None:
    """kube-proxy's flags. Every default is suppressed: only flags the user typed override the
    config file."""
    S = argparse.SUPPRESS
    d.add_argument("--config", default=None, help="a KubeProxyConfiguration YAML file")
    d.add_argument("--kubeconfig", default=S, help="kubeconfig with the API server and credentials")
    d.add_argument("--master", default=S, help="API server address (overrides the kubeconfig)")
    d.add_argument(
        "--manifests", default=S, metavar="DIR",
        help="read Services and EndpointSlices from YAML files in DIR instead of an API server",
    )  # fmt: skip
    d.add_argument("--proxy-mode", dest="mode", choices=MODES, default=S)
    d.add_argument("--hostname-override", default=S)
    d.add_argument("--bind-address", default=S)
    d.add_argument("--cluster-cidr", dest="cluster_cidrs", type=comma_list, default=S)
    d.add_argument("--detect-local-mode", default=S)
    d.add_argument("--pod-bridge-interface", default=S)
    d.add_argument("--pod-interface-name-prefix", default=S)
    d.add_argument(
        "--iptables-localhost-nodeports", dest="localhost_nodeports", type=bool_arg, nargs="?",
        const=True, default=S, metavar="BOOL",
    )  # fmt: skip
    for flag in ("--min-sync-period", "--iptables-min-sync-period", "--ipvs-min-sync-period"):
        d.add_argument(flag, dest="min_sync_period", type=_duration_flag(flag), default=S)
    for flag in ("--sync-period", "--iptables-sync-period", "--ipvs-sync-period"):
        d.add_argument(flag, dest="sync_period", type=_duration_flag(flag), default=S)
    d.add_argument("--config-sync-period", type=_duration_flag("--config-sync-period"), default=S)
    d.add_argument("--healthz-bind-address", default=S)
    d.add_argument("--metrics-bind-address", default=S)
    d.add_argument("--nodeport-addresses", type=comma_list, default=S)
    d.add_argument(
        "--masquerade-all", type=bool_arg, nargs="?", const=True, default=S, metavar="BOOL"
    )
    d.add_argument("--iptables-masquerade-bit", dest="masquerade_bit", type=int, default=S)
    d.add_argument(
        "--conntrack-tcp-be-liberal",
        type=bool_arg,
        nargs="?",
        const=True,
        default=S,
        metavar="BOOL",
    )
    flag = "--conntrack-tcp-timeout-established"
    d.add_argument(
        flag, dest="conntrack_tcp_established_timeout", type=_duration_flag(flag), default=S
    )
    d.add_argument(
        "--udp-timeout", dest="udp_idle_timeout", type=_duration_flag("--udp-timeout"), default=S
    )
    d.add_argument(
        "--proxy-port-range", default=S, metavar="RANGE",
        help="userspace mode: ports for portal listeners (first-last; the kernel's when unset)",
    )  # fmt: skip
    d.add_argument("--ipvs-scheduler", default=S, help="IPVS scheduler (rr when empty)")
    d.add_argument("--ipvs-exclude-cidrs", type=comma_list, default=S)
    d.add_argument(
        "--ipvs-strict-arp", type=bool_arg, nargs="?", const=True, default=S, metavar="BOOL"
    )
    for flag, dest in (("--ipvs-tcp-timeout", "ipvs_tcp_timeout"),
                       ("--ipvs-tcpfin-timeout", "ipvs_tcp_fin_timeout"),
                       ("--ipvs-udp-timeout", "ipvs_udp_timeout")):  # fmt: skip
        d.add_argument(flag, dest=dest, type=_duration_flag(flag), default=S)
    d.add_argument(
        "--max-service-destinations", type=int, default=S,
        help="most ports x addresses one Service may have; larger ones are skipped (0: no limit)",
    )  # fmt: skip
    d.add_argument(
        "--feature-gates", dest="feature_gates", type=gates_arg, default=S, metavar="GATES",
        help="Name=true|false,... (the gates kproxy reads: docs/configuration.md)",
    )  # fmt: skip
    d.add_argument(
        "--external-ip-cidrs", type=comma_list, default=S, metavar="CIDRS",
        help="where Services may put externalIPs; others are not programmed (default: anywhere)",
    )  # fmt: skip
    d.add_argument("-v", "--v", dest="verbosity", type=int, default=S, help="log verbosity (0-10)")
    d.add_argument("--logging-format", choices=logs.FORMATS, default=S, help="klog's formats")


def bool_arg(value: str) -> bool:
    v = value.lower()
    if v in ("true", "1", "t"):
        return True
    if v in ("false", "0", "f"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean")


def setup_logging(verbosity: int, fmt: str = "text") -> None:
    """klog's text (or JSON) lines on stderr; details from -v=4 on."""
    logs.setup(verbosity, fmt)


def load_config(args: argparse.Namespace) -> ProxyConfig:
    tool_args = ("command", "config", "src", "dst", "from_node", "live", "node_ip", "as_json")
    flags = {k: v for k, v in vars(args).items() if k not in tool_args}
    if args.config:
        flags["config_file"] = args.config
    file = load_file(args.config, flags.get("mode")) if args.config else None
    cfg = build(file, flags)
    for w in file.warnings if file is not None else ():
        log.warning("%s", w)
    for w in v1alpha1.gate_warnings(flags.get("feature_gates", {}), "--feature-gates"):
        log.warning("%s", w)
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.command == "version":
        print(f"kproxy {__version__} (core {_core.version()})")
        return 0
    try:
        if args.command == "cleanup":
            setup_logging(args.verbosity)
            xtables_backend.configure()
            return hand_back() if args.hand_back else cleanup()
        cfg = load_config(args)
    except ConfigError as e:
        sys.stderr.write(f"kproxy: error: {e}\n")
        return 2
    setup_logging(cfg.verbosity, cfg.logging_format)
    try:
        xtables_backend.configure()
        if args.command == "render":
            return tools.render_command(cfg)
        if args.command == "doctor":
            return doctor.doctor_command(cfg, as_json=args.as_json)
        if args.command == "diff":
            return tools.diff_command(cfg, as_json=args.as_json)
        if args.command == "trace":
            return tools.trace_command(
                cfg,
                args.src,
                args.dst,
                from_node=args.from_node,
                live=args.live,
                node_ips=args.node_ip,
            )
        return run(cfg)
    except ConfigError as e:
        sys.stderr.write(f"kproxy: error: {e}\n")
        return 2
    except KproxyError as e:
        log.error("%s", e)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
