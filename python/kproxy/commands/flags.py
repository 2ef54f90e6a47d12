"""What every command shares: one-line argparse errors, kube-proxy's flag names and value
types, and turning the flags (and ``--config``) into a `ProxyConfig` to run a command with."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeAlias

from kproxy import logs, v1alpha1, xtables_backend
from kproxy.config import MODES, ProxyConfig, build, load_file
from kproxy.errors import ConfigError, KproxyError
from kproxy.goduration import parse_duration

log = logging.getLogger("kproxy")


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line and exit code 2, like every other bad value."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"kproxy: error: {message}\n")
        raise SystemExit(2)


# What each command's ``register`` adds its parser to.
Subparsers: TypeAlias = "argparse._SubParsersAction[_Parser]"


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


def bool_arg(value: str) -> bool:
    v = value.lower()
    if v in ("true", "1", "t"):
        return True
    if v in ("false", "0", "f"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean")


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


# The commands' own arguments: not configuration.
_COMMAND_ARGS = ("command", "config", "src", "dst", "from_node", "live", "node_ip", "as_json")


def load_config(args: argparse.Namespace) -> ProxyConfig:
    flags = {k: v for k, v in vars(args).items() if k not in _COMMAND_ARGS}
    if args.config:
        flags["config_file"] = args.config
    file = load_file(args.config, flags.get("mode")) if args.config else None
    cfg = build(file, flags)
    for w in file.warnings if file is not None else ():
        log.warning("%s", w)
    for w in v1alpha1.gate_warnings(flags.get("feature_gates", {}), "--feature-gates"):
        log.warning("%s", w)
    return cfg


def run_configured(args: argparse.Namespace, command: Callable[[ProxyConfig], int]) -> int:
    """``command`` on the configuration the flags (and ``--config``) ask for, with logging set
    up: a bad value exits 2 with one ``kproxy: error:`` line, any other kproxy error 1."""
    try:
        cfg = load_config(args)
    except ConfigError as e:
        sys.stderr.write(f"kproxy: error: {e}\n")
        return 2
    logs.setup(cfg.verbosity, cfg.logging_format)
    try:
        xtables_backend.configure()
        return command(cfg)
    except ConfigError as e:
        sys.stderr.write(f"kproxy: error: {e}\n")
        return 2
    except KproxyError as e:
        log.error("%s", e)
        return 1
