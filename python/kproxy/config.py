"""Configuration: kube-proxy's flags and KubeProxyConfiguration file, validated into one value.

Precedence: defaults, then the ``--config`` file, then flags given on the command line (a flag
the user typed always wins). Every invalid value raises :class:`ConfigError` naming the flag or
field; nothing touches the kernel before the whole configuration is valid.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kproxy import v1alpha1
from kproxy.errors import ConfigError
from kproxy.model import IPVS_SCHEDULERS, Mode
from kproxy.normalize import DEFAULT_MAX_SERVICE_DESTINATIONS
from kproxy.v1alpha1 import Decoded

MODES = ("iptables", "nftables", "ipvs", "userspace")
# The modes this build can run; the others are refused with a clear error.
AVAILABLE_MODES = MODES

DETECT_LOCAL_MODES = ("", "ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix")
_INTERFACE = re.compile(r"[A-Za-z0-9_.-]{1,15}")


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    mode: Mode = "iptables"
    kubeconfig: str | None = None
    master: str | None = None
    manifests: str | None = None
    hostname_override: str | None = None
    bind_address: str = "0.0.0.0"
    cluster_cidrs: tuple[str, ...] = ()
    detect_local_mode: str = "ClusterCIDR"
    pod_bridge_interface: str = ""
    pod_interface_name_prefix: str = ""
    min_sync_period: float = 1.0
    sync_period: float = 30.0
    config_sync_period: float = 900.0
    healthz_bind_address: str = "0.0.0.0:10256"
    metrics_bind_address: str = "127.0.0.1:10249"
    nodeport_addresses: tuple[str, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    localhost_nodeports: bool = True
    conntrack_tcp_be_liberal: bool = False
    # Node setup (upstream's conntrack section): nf_conntrack_max is max(per core x CPUs, min)
    # and never lowered (0 per core: leave it); a timeout of 0 leaves the kernel's.
    conntrack_max_per_core: int = 32768
    conntrack_min: int = 131072
    conntrack_tcp_close_wait_timeout: float = 3600.0
    conntrack_udp_timeout: float = 0.0
    conntrack_udp_stream_timeout: float = 0.0
    # The process's oom_score_adj (upstream's default keeps kube-proxy alive under memory
    # pressure); None leaves it.
    oom_score_adj: int | None = -999
    # Exit when the health or metrics server cannot bind (upstream's bindAddressHardFail).
    bind_address_hard_fail: bool = False
    # featureGates / --feature-gates, as given (kproxy.v1alpha1.GATES says which it reads).
    feature_gates: Mapping[str, bool] = field(default_factory=dict)
    # The --config file: the daemon exits when it changes, so that its restart reads it.
    config_file: str | None = None
    # Userspace mode: a relayed TCP connection idle this long is closed (the kernel modes'
    # conntrack entry would expire); 0 means the kernel's own default, five days.
    conntrack_tcp_established_timeout: float = 86400.0
    # Userspace mode: a UDP session idle this long is forgotten (the legacy mode's default).
    udp_idle_timeout: float = 0.25
    # Userspace mode: the ports portal listeners take, "first-last" ("": the kernel's
    # ephemeral range); upstream's --proxy-port-range / portRange.
    proxy_port_range: str = ""
    # ipvs mode (upstream's `ipvs` section).
    ipvs_scheduler: str = ""
    ipvs_exclude_cidrs: tuple[str, ...] = ()
    ipvs_strict_arp: bool = False
    # IPVS connection timeouts (0: leave the kernel's).
    ipvs_tcp_timeout: float = 0.0
    ipvs_tcp_fin_timeout: float = 0.0
    ipvs_udp_timeout: float = 0.0
    # The most ports x addresses one Service may have; one over it is skipped (0: no limit).
    max_service_destinations: int = DEFAULT_MAX_SERVICE_DESTINATIONS
    # kproxy's own: where Services may put externalIPs (empty: anywhere, as upstream). An
    # externalIP outside these CIDRs is not programmed: a namespace user cannot claim an
    # address of the node's networks (the CVE-2020-8554 class) even with the gate on.
    external_ip_cidrs: tuple[str, ...] = ()
    verbosity: int = 0
    # klog's "text" or "json".
    logging_format: str = "text"

    def gate(self, name: str) -> bool:
        """A feature gate's value: as given, else its default (``v1alpha1.GATES``)."""
        return self.feature_gates.get(name, v1alpha1.GATES_BY_NAME[name].default)

    @property
    def node_name(self) -> str:
        """The Node this proxy serves: ``--hostname-override`` or the hostname, lower-cased."""
        return (self.hostname_override or socket.gethostname()).strip().lower()


def _cidr(field: str, value: str) -> str:
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ConfigError(field, f"{value!r} is not a CIDR") from None


def _bind_address(field: str, value: str) -> str:
    if value == "":
        return value  # disables the server, as upstream
    host, sep, port = value.rpartition(":")
    if not sep:
        raise ConfigError(field, f"{value!r} is not HOST:PORT")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(field, f"{host!r} is not an IP address") from None
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(field, f"{port!r} is not a port")
    return value


# nodePortAddresses' keywords besides CIDRs: the Node's primary IPs (upstream 1.30), and the
# loopback addresses (KEP-6032: in the nftables mode, TCP NodePorts served on them by a small
# userspace proxy; in the iptables mode, the same as 127.0.0.0/8).
NODEPORT_KEYWORDS = ("primary", "localhost")
LOOPBACK_CIDRS = ("127.0.0.0/8", "::1/128")


def _node_port_addresses(field: str, values: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for raw in values:
        v = raw.strip()
        if v in NODEPORT_KEYWORDS:
            out.append(v)
        elif v:
            try:
                out.append(str(ipaddress.ip_network(v, strict=False)))
            except ValueError:
                raise ConfigError(
                    field,
                    f"{raw!r} is not a CIDR, 'primary' or 'localhost' (leave it empty for every "
                    "address of the node)",
                ) from None
    return tuple(out)


def nodeport_cidrs(addresses: tuple[str, ...]) -> tuple[str, ...]:
    """The CIDRs among validated nodePortAddresses, with ``localhost`` spelled out."""
    out: list[str] = []
    for a in addresses:
        if a == "localhost":
            out.extend(LOOPBACK_CIDRS)
        elif a != "primary":
            out.append(a)
    return tuple(out)


def admits_loopback(addresses: tuple[str, ...], family_version: int) -> bool:
    """Whether validated nodePortAddresses name the family's loopback address explicitly
    (``localhost`` or a CIDR holding it; an empty list names nothing)."""
    lo = ipaddress.ip_address("127.0.0.1" if family_version == 4 else "::1")
    return any(lo in ipaddress.ip_network(c) for c in nodeport_cidrs(addresses))


def parse_port_range(field: str, value: str) -> tuple[int, int] | None:
    """Upstream's port range syntax: ``first-last``, ``first+offset`` (both inclusive) or one
    port; empty, ``0`` and ``0-0`` mean unset."""
    v = value.strip()
    if v in ("", "0", "0-0"):
        return None
    m = re.fullmatch(r"(\d{1,5})(?:([-+])(\d{1,5}))?", v)
    if m is None:
        raise ConfigError(field, f"{value!r} is not a port range (first-last, first+offset, port)")
    first = int(m[1])
    last = first if m[2] is None else int(m[3]) if m[2] == "-" else first + int(m[3])
    if not 0 < first <= last <= 65535:
        raise ConfigError(field, f"{value!r} is not a port range within 1-65535")
    return first, last


def validate(cfg: ProxyConfig) -> ProxyConfig:
    """Check every field; returns the config with canonical values."""
    if cfg.mode not in MODES:
        raise ConfigError("--proxy-mode", f"unknown mode {cfg.mode!r} (one of {', '.join(MODES)})")
    if cfg.mode == "ipvs" and not cfg.gate("KubeProxyIPVS"):
        # Upstream since 1.37: the deprecated mode sits behind this gate (KEP-5495).
        raise ConfigError("--proxy-mode", "the ipvs mode is turned off (KubeProxyIPVS=false)")
    if cfg.mode not in AVAILABLE_MODES:
        raise ConfigError("--proxy-mode", f"mode {cfg.mode!r} is not available in this version yet")
    if cfg.detect_local_mode not in DETECT_LOCAL_MODES:
        choices = ", ".join(m or '""' for m in DETECT_LOCAL_MODES)
        raise ConfigError(
            "--detect-local-mode", f"{cfg.detect_local_mode!r} is not one of {choices}"
        )
    for flag, value, mode in (
        ("--pod-bridge-interface", cfg.pod_bridge_interface, "BridgeInterface"),
        ("--pod-interface-name-prefix", cfg.pod_interface_name_prefix, "InterfaceNamePrefix"),
    ):
        if value and not _INTERFACE.fullmatch(value):
            raise ConfigError(flag, f"{value!r} is not an interface name")
        if cfg.detect_local_mode == mode and not value:
            raise ConfigError(flag, f"required with --detect-local-mode {mode}")
    cidrs = tuple(_cidr("--cluster-cidr", c) for c in cfg.cluster_cidrs if c.strip())
    families = [ipaddress.ip_network(c).version for c in cidrs]
    if len(cidrs) > 2 or len(set(families)) != len(families):
        raise ConfigError("--cluster-cidr", "at most one CIDR per IP family")
    if not 0 <= cfg.masquerade_bit <= 31:
        raise ConfigError("--iptables-masquerade-bit", f"{cfg.masquerade_bit} is not in 0..31")
    if cfg.max_service_destinations < 0:
        raise ConfigError(
            "--max-service-destinations", f"{cfg.max_service_destinations} is negative"
        )
    if cfg.sync_period <= 0:
        raise ConfigError("--sync-period", "must be greater than 0")
    for flag, seconds in (
        ("--conntrack-tcp-timeout-established", cfg.conntrack_tcp_established_timeout),
        ("--conntrack-tcp-timeout-close-wait", cfg.conntrack_tcp_close_wait_timeout),
        ("--conntrack-udp-timeout", cfg.conntrack_udp_timeout),
        ("--conntrack-udp-timeout-stream", cfg.conntrack_udp_stream_timeout),
    ):
        if seconds < 0:
            raise ConfigError(flag, "must not be negative")
    for flag, count in (
        ("--conntrack-max-per-core", cfg.conntrack_max_per_core),
        ("--conntrack-min", cfg.conntrack_min),
    ):
        if count < 0:
            raise ConfigError(flag, f"{count} is negative")
    if cfg.oom_score_adj is not None and not -1000 <= cfg.oom_score_adj <= 1000:
        raise ConfigError("--oom-score-adj", f"{cfg.oom_score_adj} is not in -1000..1000")
    if cfg.udp_idle_timeout <= 0:
        raise ConfigError("--udp-timeout", "must be greater than 0")
    port_range = parse_port_range("--proxy-port-range", cfg.proxy_port_range)
    if cfg.ipvs_scheduler and cfg.ipvs_scheduler not in IPVS_SCHEDULERS:
        raise ConfigError(
            "--ipvs-scheduler",
            f"unknown scheduler {cfg.ipvs_scheduler!r} (one of {', '.join(IPVS_SCHEDULERS)})",
        )
    for flag, seconds in (
        ("--ipvs-tcp-timeout", cfg.ipvs_tcp_timeout),
        ("--ipvs-tcpfin-timeout", cfg.ipvs_tcp_fin_timeout),
        ("--ipvs-udp-timeout", cfg.ipvs_udp_timeout),
    ):
        if seconds < 0:
            raise ConfigError(flag, "must not be negative")
    if cfg.min_sync_period > cfg.sync_period:
        raise ConfigError("--min-sync-period", "must not be greater than --sync-period")
    if cfg.logging_format not in ("text", "json"):
        raise ConfigError("--logging-format", f"{cfg.logging_format!r} is not text or json")
    if not 0 <= cfg.verbosity <= 10:
        raise ConfigError("-v", f"{cfg.verbosity} is not in 0..10")
    try:
        ipaddress.ip_address(cfg.bind_address)
    except ValueError:
        raise ConfigError("--bind-address", f"{cfg.bind_address!r} is not an IP address") from None
    if cfg.hostname_override is not None and not cfg.hostname_override.strip():
        raise ConfigError("--hostname-override", "must not be empty")
    if cfg.manifests is not None and not Path(cfg.manifests).is_dir():
        raise ConfigError("--manifests", f"{cfg.manifests!r} is not a directory")
    if cfg.kubeconfig is not None and not Path(cfg.kubeconfig).is_file():
        raise ConfigError("--kubeconfig", f"{cfg.kubeconfig!r} does not exist")
    return replace(
        cfg,
        cluster_cidrs=cidrs,
        healthz_bind_address=_bind_address("--healthz-bind-address", cfg.healthz_bind_address),
        metrics_bind_address=_bind_address("--metrics-bind-address", cfg.metrics_bind_address),
        nodeport_addresses=_node_port_addresses("--nodeport-addresses", cfg.nodeport_addresses),
        ipvs_exclude_cidrs=tuple(
            _cidr("--ipvs-exclude-cidrs", c) for c in cfg.ipvs_exclude_cidrs if c.strip()
        ),
        external_ip_cidrs=tuple(
            _cidr("--external-ip-cidrs", c) for c in cfg.external_ip_cidrs if c.strip()
        ),
        proxy_port_range="" if port_range is None else "{}-{}".format(*port_range),
    )


def load_file(path: str, mode: str | None = None) -> Decoded:
    """Read a KubeProxyConfiguration file (``kproxy.v1alpha1``) into ProxyConfig values, each
    with the field it came from. ``mode``: the mode to convert for, when a flag chose it."""
    return v1alpha1.load(path, mode)


def build(file: Decoded | None, flag_overrides: Mapping[str, Any]) -> ProxyConfig:
    """Defaults < file < flags, then validation. An invalid value that came from the file is
    reported with the file's field name, one from a flag with the flag's."""
    names = {f.name for f in fields(ProxyConfig)}
    file_values = file.values if file is not None else {}
    merged = {**file_values, **flag_overrides}
    unknown = set(merged) - names
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown setting")
    try:
        return validate(ProxyConfig(**merged))
    except ConfigError as e:
        attr = FLAG_ATTRS.get(e.field)
        if file is not None and attr in file.origins and attr not in flag_overrides:
            raise ConfigError(file.origins[attr], e.message, file.source) from None
        raise


# The flag validate() names for each ProxyConfig attribute it checks.
FLAG_ATTRS = {
    "--proxy-mode": "mode",
    "--detect-local-mode": "detect_local_mode",
    "--pod-bridge-interface": "pod_bridge_interface",
    "--pod-interface-name-prefix": "pod_interface_name_prefix",
    "--cluster-cidr": "cluster_cidrs",
    "--iptables-masquerade-bit": "masquerade_bit",
    "--max-service-destinations": "max_service_destinations",
    "--external-ip-cidrs": "external_ip_cidrs",
    "--sync-period": "sync_period",
    "--min-sync-period": "min_sync_period",
    "--conntrack-tcp-timeout-established": "conntrack_tcp_established_timeout",
    "--conntrack-tcp-timeout-close-wait": "conntrack_tcp_close_wait_timeout",
    "--conntrack-udp-timeout": "conntrack_udp_timeout",
    "--conntrack-udp-timeout-stream": "conntrack_udp_timeout_stream",
    "--conntrack-max-per-core": "conntrack_max_per_core",
    "--conntrack-min": "conntrack_min",
    "--oom-score-adj": "oom_score_adj",
    "--udp-timeout": "udp_idle_timeout",
    "--proxy-port-range": "proxy_port_range",
    "--ipvs-scheduler": "ipvs_scheduler",
    "--ipvs-tcp-timeout": "ipvs_tcp_timeout",
    "--ipvs-tcpfin-timeout": "ipvs_tcp_fin_timeout",
    "--ipvs-udp-timeout": "ipvs_udp_timeout",
    "--ipvs-exclude-cidrs": "ipvs_exclude_cidrs",
    "-v": "verbosity",
    "--logging-format": "logging_format",
    "--bind-address": "bind_address",
    "--hostname-override": "hostname_override",
    "--kubeconfig": "kubeconfig",
    "--healthz-bind-address": "healthz_bind_address",
    "--metrics-bind-address": "metrics_bind_address",
    "--nodeport-addresses": "nodeport_addresses",
}
