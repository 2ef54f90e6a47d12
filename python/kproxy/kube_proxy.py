"""``kube-proxy``: upstream's command line, so kubeadm's DaemonSet runs kproxy unchanged.

Upstream's whole flag set (``cmd/kube-proxy/app/options.go``, kube-proxy-features.md §1.16)
is accepted, with upstream's precedence: with ``--config`` the file decides, and only
``--hostname-override``, ``--master`` and the logging flags apply on top of it (upstream
ignores the others silently; kproxy says so once). A flag kproxy does not implement is
warned about and ignored, never fatal. ``--cleanup``, ``--init-only``, ``--write-config-to``
and ``--version`` work as upstream's.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import yaml

from kproxy import __version__, daemon, lifecycle, logs, nodesetup, v1alpha1, xtables_backend
from kproxy.backends import for_mode
from kproxy.commands.flags import bool_arg, comma_list, gates_arg
from kproxy.config import ProxyConfig, build, load_file
from kproxy.errors import ConfigError, KproxyError
from kproxy.goduration import parse_duration
from kproxy.upstream import UPSTREAM_VERSION

log = logging.getLogger("kproxy")


def _duration(value: str) -> float:
    try:
        return parse_duration("", value)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(e.message) from None


KINDS: dict[str, Callable[[str], Any]] = {
    "bool": bool_arg,
    "string": str,
    "int": int,
    "float": float,
    "duration": _duration,
    "list": comma_list,
    "map": gates_arg,
}


@dataclass(frozen=True, slots=True)
class Flag:
    name: str
    kind: str
    # The ProxyConfig attribute it sets; None: not implemented (warned, ignored).
    attr: str | None
    note: str = ""
    # Applies on top of --config too (upstream: hostname, master, logging).
    with_config: bool = False
    # Only in these modes ("!ipvs": every mode but ipvs), as upstream's per-mode flags.
    modes: str = ""


_LIFECYCLE = ("--config", "--write-config-to", "--cleanup", "--init-only", "--version")

# fmt: off
FLAGS: tuple[Flag, ...] = (
    Flag("--config", "string", None, "the KubeProxyConfiguration file"),
    Flag("--write-config-to", "string", None, "write the defaulted configuration there and exit"),
    Flag("--cleanup", "bool", None, "remove every mode's rules and exit"),
    Flag("--init-only", "bool", None, "do the privileged node setup and exit"),
    Flag("--version", "string", None, "print the version and exit"),
    Flag("--feature-gates", "map", "feature_gates"),
    Flag("--kubeconfig", "string", "kubeconfig"),
    Flag("--master", "string", "master", with_config=True),
    Flag("--kube-api-content-type", "string", None, "kproxy speaks application/json"),
    Flag("--kube-api-burst", "int", None, "kproxy makes one list and one watch per resource"),
    Flag("--kube-api-qps", "float", None, "as --kube-api-burst"),
    Flag("--config-sync-period", "duration", None, "kproxy's periodic full sync covers it"),
    Flag("--hostname-override", "string", "hostname_override", with_config=True),
    Flag("--bind-address", "string", "bind_address"),
    Flag("--healthz-bind-address", "string", "healthz_bind_address"),
    Flag("--metrics-bind-address", "string", "metrics_bind_address"),
    Flag("--bind-address-hard-fail", "bool", "bind_address_hard_fail"),
    Flag("--profiling", "bool", None, "/debug/pprof is Go's"),
    Flag("--show-hidden-metrics-for-version", "string", None, "kproxy has no hidden metrics"),
    Flag("--proxy-mode", "string", "mode"),
    Flag("--iptables-masquerade-bit", "int", "masquerade_bit"),
    Flag("--masquerade-all", "bool", "masquerade_all"),
    Flag("--iptables-localhost-nodeports", "bool", "localhost_nodeports"),
    Flag("--iptables-sync-period", "duration", "sync_period", modes="!ipvs"),
    Flag("--iptables-min-sync-period", "duration", "min_sync_period", modes="!ipvs"),
    Flag("--ipvs-sync-period", "duration", "sync_period", modes="ipvs"),
    Flag("--ipvs-min-sync-period", "duration", "min_sync_period", modes="ipvs"),
    Flag("--ipvs-scheduler", "string", "ipvs_scheduler"),
    Flag("--ipvs-exclude-cidrs", "list", "ipvs_exclude_cidrs"),
    Flag("--ipvs-strict-arp", "bool", "ipvs_strict_arp"),
    Flag("--ipvs-tcp-timeout", "duration", "ipvs_tcp_timeout"),
    Flag("--ipvs-tcpfin-timeout", "duration", "ipvs_tcp_fin_timeout"),
    Flag("--ipvs-udp-timeout", "duration", "ipvs_udp_timeout"),
    Flag("--detect-local-mode", "string", "detect_local_mode"),
    Flag("--pod-bridge-interface", "string", "pod_bridge_interface"),
    Flag("--pod-interface-name-prefix", "string", "pod_interface_name_prefix"),
    Flag("--cluster-cidr", "list", "cluster_cidrs"),
    Flag("--nodeport-addresses", "list", "nodeport_addresses"),
    Flag("--oom-score-adj", "int", "oom_score_adj"),
    Flag("--conntrack-max-per-core", "int", "conntrack_max_per_core"),
    Flag("--conntrack-min", "int", "conntrack_min"),
    Flag("--conntrack-tcp-timeout-established", "duration", "conntrack_tcp_established_timeout"),
    Flag("--conntrack-tcp-timeout-close-wait", "duration", "conntrack_tcp_close_wait_timeout"),
    Flag("--conntrack-tcp-be-liberal", "bool", "conntrack_tcp_be_liberal"),
    Flag("--conntrack-udp-timeout", "duration", "conntrack_udp_timeout"),
    Flag("--conntrack-udp-timeout-stream", "duration", "conntrack_udp_stream_timeout"),
    Flag("--healthz-port", "int", None, "deprecated: the port of --healthz-bind-address"),
    Flag("--metrics-port", "int", None, "deprecated: the port of --metrics-bind-address"),
    Flag("--v", "int", "verbosity", with_config=True),
    Flag("--vmodule", "string", None, "per-file verbosity", with_config=True),
    Flag("--logging-format", "string", "logging_format", with_config=True),
    Flag("--log-flush-frequency", "duration", None, "", with_config=True),
    Flag("--log-text-split-stream", "bool", None, "info to stdout, errors to stderr",
         with_config=True),
    Flag("--log-text-info-buffer-size", "string", None, "", with_config=True),
    Flag("--log-json-split-stream", "bool", None, "as --log-text-split-stream", with_config=True),
    Flag("--log-json-info-buffer-size", "string", None, "", with_config=True),
)
# fmt: on
BY_NAME = {f.name: f for f in FLAGS}
# Flags kproxy accepts without effect or warning: writing every line at once satisfies any
# flush period and buffer size; text is kproxy's format.
_HARMLESS = {"--log-flush-frequency", "--log-text-info-buffer-size", "--log-json-info-buffer-size"}


def _dest(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"kube-proxy: error: {message}\n")
        raise SystemExit(2)


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="kube-proxy",
        description="kproxy with kube-proxy's command line.",
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    for f in FLAGS:
        names = ["-v", f.name] if f.name == "--v" else [f.name]
        kw: dict[str, Any] = {"dest": _dest(f.name), "type": KINDS[f.kind]}
        if f.kind == "bool":
            kw.update(nargs="?", const=True, metavar="BOOL")
        if f.name == "--version":
            kw.update(nargs="?", const="true", metavar="true|raw")
        help_ = f.note if f.attr is not None or f.name in _LIFECYCLE else f"ignored: {f.note}"
        p.add_argument(*names, help=help_ or None, **kw)
    return p


@dataclass
class Invocation:
    cfg: ProxyConfig
    warnings: list[str]
    given: dict[str, Any]


def resolve(argv: Sequence[str]) -> Invocation:
    """The configuration a kube-proxy command line asks for, with the warnings to log."""
    args = vars(make_parser().parse_args(argv))
    given = {f.name: args[_dest(f.name)] for f in FLAGS if _dest(f.name) in args}
    warnings: list[str] = []
    for name in given:
        f = BY_NAME[name]
        unimplemented = f.attr is None and name not in _LIFECYCLE and name not in _HARMLESS
        if unimplemented:
            warnings.append(f"flag {name} is not implemented ({f.note}); ignored")
    config_file = given.get("--config")
    if config_file:
        applied = {n: v for n, v in given.items() if BY_NAME[n].with_config}
        ignored = [n for n in given if n not in applied and n not in _LIFECYCLE and BY_NAME[n].attr]
        if ignored:
            warnings.append(
                f"flags ignored because --config is given (as upstream): {', '.join(ignored)}"
            )
        file = load_file(config_file)
        warnings.extend(file.warnings)
        flags = _attrs(applied, file.values.get("mode", "iptables"))
        flags["config_file"] = config_file
        return Invocation(build(file, flags), warnings, given)
    mode = given.get("--proxy-mode") or "iptables"
    flags = _attrs(given, mode)
    for port_flag, addr_attr, default in (
        ("--healthz-port", "healthz_bind_address", f"0.0.0.0:{v1alpha1.HEALTHZ_PORT}"),
        ("--metrics-port", "metrics_bind_address", f"127.0.0.1:{v1alpha1.METRICS_PORT}"),
    ):
        if port_flag in given:
            # Upstream's addressFromDeprecatedFlags: 0 turns the server off; otherwise the
            # port is added to an address given without one.
            port = given[port_flag]
            addr = flags.get(addr_attr, default)
            flags[addr_attr] = "" if port == 0 else v1alpha1.with_port(addr, port)
    if "feature_gates" in flags:
        warnings.extend(v1alpha1.gate_warnings(flags["feature_gates"], "--feature-gates"))
    return Invocation(build(None, flags), warnings, given)


def _attrs(given: dict[str, Any], mode: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in given.items():
        f = BY_NAME[name]
        if f.attr is None:
            continue
        if (f.modes == "ipvs" and mode != "ipvs") or (f.modes == "!ipvs" and mode == "ipvs"):
            continue
        if f.attr == "hostname_override" and not value.strip():
            continue  # upstream: an empty override is no override
        out[f.attr] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        inv = resolve(argv)
    except ConfigError as e:
        sys.stderr.write(f"kube-proxy: error: {e}\n")
        return 2
    version = inv.given.get("--version")
    if version is not None and version != "false":
        if version == "raw":
            print(yaml.safe_dump({"gitVersion": UPSTREAM_VERSION, "kproxy": __version__}), end="")
        else:
            print(f"Kubernetes {UPSTREAM_VERSION} (kproxy {__version__})")
        return 0
    logs.setup(inv.cfg.verbosity, inv.cfg.logging_format)  # one setup for both commands
    for w in inv.warnings:
        log.warning("%s", w)
    cfg = inv.cfg
    try:
        xtables_backend.configure()
        if path := inv.given.get("--write-config-to"):
            with open(path, "w") as out:
                yaml.safe_dump(v1alpha1.encode(cfg), out, sort_keys=True)
            log.info("wrote the configuration to %s", path)
            return 0
        if inv.given.get("--cleanup"):
            return lifecycle.cleanup()
        if inv.given.get("--init-only"):
            nodesetup.apply(cfg)
            for_mode(cfg).init_node()
            return 0
        return daemon.run(cfg)
    except OSError as e:
        log.error("%s", e)
        return 1
    except KproxyError as e:
        log.error("%s", e)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
