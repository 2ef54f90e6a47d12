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
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from kproxy.errors import ConfigError
from kproxy.model import IPVS_SCHEDULERS
from kproxy.normalize import DEFAULT_MAX_SERVICE_DESTINATIONS

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"
MODES = ("iptables", "nftables", "ipvs", "userspace")
# The modes this build can run; the others are refused with a clear error.
AVAILABLE_MODES = MODES

DETECT_LOCAL_MODES = ("", "ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix")
_INTERFACE = re.compile(r"[A-Za-z0-9_.-]{1,15}")


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    mode: str = "iptables"
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
    verbosity: int = 0

    @property
    def node_name(self) -> str:
        """The Node this proxy serves: ``--hostname-override`` or the hostname, lower-cased."""
        return (self.hostname_override or socket.gethostname()).strip().lower()


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_UNIT_NS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign
    "\u03bcs": 1_000,  # Greek small letter mu; Go accepts both
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}


def parse_duration(field: str, value: object) -> float:
    """A Go duration (``1s``, ``500ms``, ``1m30s``, ``0``) in seconds.

    Parsed as whole nanoseconds, as Go does, so ``30s`` and ``30000000000`` compare equal.
    """
    if isinstance(value, bool):
        raise ConfigError(field, f"invalid duration {value!r}")
    if isinstance(value, int | float):
        # A bare number in a config file is nanoseconds (Go's JSON encoding of a Duration).
        nanos = round(value)
    elif isinstance(value, str):
        s = value.strip()
        sign = 1
        if s[:1] in ("+", "-"):
            sign = -1 if s[0] == "-" else 1
            s = s[1:]
        if s == "0":
            return 0.0
        pos, nanos = 0, 0
        for m in _DURATION_PART.finditer(s):
            if m.start() != pos:
                break
            nanos += round(float(m.group(1)) * _UNIT_NS[m.group(2)])
            pos = m.end()
        if pos != len(s) or pos == 0:
            raise ConfigError(field, f"invalid duration {value!r} (examples: 1s, 500ms, 1m30s)")
        nanos *= sign
    else:
        raise ConfigError(field, f"invalid duration {value!r}")
    if nanos < 0:
        raise ConfigError(field, "must not be negative")
    return nanos / 1e9


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


def _node_port_addresses(field: str, values: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for raw in values:
        v = raw.strip()
        if v == "primary":
            out.append(v)
        elif v:
            out.append(_cidr(field, v))
    return tuple(out)


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
    if cfg.conntrack_tcp_established_timeout < 0:
        raise ConfigError("--conntrack-tcp-timeout-established", "must not be negative")
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
        proxy_port_range="" if port_range is None else "{}-{}".format(*port_range),
    )


def _get(m: Mapping[str, Any], path: str, kind: type | tuple[type, ...]) -> Any:
    """The value at a dotted ``path`` (None if absent), type-checked."""
    cur: Any = m
    walked: list[str] = []
    for part in path.split("."):
        if not isinstance(cur, Mapping):
            raise ConfigError(".".join(walked), f"expected a mapping, got {cur!r}")
        cur = cur.get(part)
        walked.append(part)
        if cur is None:
            return None
    if cur is not None and (not isinstance(cur, kind) or (isinstance(cur, bool) and kind is int)):
        raise ConfigError(path, f"expected {getattr(kind, '__name__', kind)}, got {cur!r}")
    return cur


# Fields of the file this version reads; the rest of the schema is accepted and ignored.
_KNOWN_TOP_LEVEL = {
    "apiVersion", "kind", "bindAddress", "bindAddressHardFail", "clientConnection", "clusterCIDR",
    "configSyncPeriod", "conntrack", "detectLocal", "detectLocalMode", "enableProfiling",
    "featureGates", "healthzBindAddress", "hostnameOverride", "iptables", "ipvs", "logging",
    "metricsBindAddress", "mode", "nftables", "nodePortAddresses", "oomScoreAdj", "portRange",
    "showHiddenMetricsForVersion", "syncPeriod", "minSyncPeriod", "winkernel",
    "windowsRunAsService", "udpIdleTimeout", "linux",
}  # fmt: skip


def load_file(path: str, warnings: list[str]) -> dict[str, Any]:
    """Read a KubeProxyConfiguration file into ProxyConfig field overrides."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError("--config", f"{path} is not valid YAML: {first}") from None
    if not isinstance(doc, Mapping):
        raise ConfigError("--config", f"{path} does not hold a {KIND}")
    if doc.get("kind") != KIND or doc.get("apiVersion") != API_VERSION:
        raise ConfigError("--config", f"{path}: expected kind {KIND}, apiVersion {API_VERSION}")
    for k in doc:
        if k not in _KNOWN_TOP_LEVEL:
            warnings.append(f"{path}: unknown field {k!r} ignored")

    out: dict[str, Any] = {}
    mode = _get(doc, "mode", str)
    if mode:
        out["mode"] = mode
    if (v := _get(doc, "clientConnection.kubeconfig", str)) is not None and v:
        out["kubeconfig"] = v
    if (v := _get(doc, "hostnameOverride", str)) is not None and v:
        out["hostname_override"] = v
    if (v := _get(doc, "bindAddress", str)) is not None and v:
        out["bind_address"] = v
    if (v := _get(doc, "clusterCIDR", str)) is not None and v:
        out["cluster_cidrs"] = tuple(c for c in v.split(",") if c.strip())
    if (v := _get(doc, "detectLocalMode", str)) is not None:
        out["detect_local_mode"] = v
    if (v := _get(doc, "detectLocal.bridgeInterface", str)) is not None:
        out["pod_bridge_interface"] = v
    if (v := _get(doc, "detectLocal.interfaceNamePrefix", str)) is not None:
        out["pod_interface_name_prefix"] = v
    if (v := _get(doc, "iptables.localhostNodePorts", bool)) is not None:
        out["localhost_nodeports"] = v
    for key, fname in (("healthzBindAddress", "healthz_bind_address"),
                       ("metricsBindAddress", "metrics_bind_address")):  # fmt: skip
        if (v := _get(doc, key, str)) is not None:
            out[fname] = v
    if (v := _get(doc, "nodePortAddresses", list)) is not None:
        if not all(isinstance(x, str) for x in v):
            raise ConfigError("nodePortAddresses", "must be a list of strings")
        out["nodeport_addresses"] = tuple(v)
    # Sync periods: the mode's own section, then the top-level fields of newer versions.
    section = "ipvs" if mode == "ipvs" else "iptables"
    for key, fname in (("syncPeriod", "sync_period"), ("minSyncPeriod", "min_sync_period")):
        for path_ in (f"{section}.{key}", key):
            raw = _get(doc, path_, (str, int, float))
            if raw is not None:
                out[fname] = parse_duration(path_, raw)
    if (v := _get(doc, "configSyncPeriod", (str, int, float))) is not None:
        out["config_sync_period"] = parse_duration("configSyncPeriod", v)
    for path_ in ("iptables.masqueradeAll", "linux.masqueradeAll"):
        if (v := _get(doc, path_, bool)) is not None:
            out["masquerade_all"] = v
    if (v := _get(doc, "iptables.masqueradeBit", int)) is not None:
        out["masquerade_bit"] = v
    if (v := _get(doc, "conntrack.tcpBeLiberal", bool)) is not None:
        out["conntrack_tcp_be_liberal"] = v
    for path_, fname in (("conntrack.tcpEstablishedTimeout", "conntrack_tcp_established_timeout"),
                         ("udpIdleTimeout", "udp_idle_timeout")):  # fmt: skip
        if (raw := _get(doc, path_, (str, int, float))) is not None:
            out[fname] = parse_duration(path_, raw)
    if (v := _get(doc, "portRange", str)) is not None:
        out["proxy_port_range"] = v
    if (v := _get(doc, "ipvs.scheduler", str)) is not None:
        out["ipvs_scheduler"] = v
    if (v := _get(doc, "ipvs.strictARP", bool)) is not None:
        out["ipvs_strict_arp"] = v
    if (v := _get(doc, "ipvs.excludeCIDRs", list)) is not None:
        if not all(isinstance(x, str) for x in v):
            raise ConfigError("ipvs.excludeCIDRs", "must be a list of strings")
        out["ipvs_exclude_cidrs"] = tuple(v)
    ipvs_timeouts = (("tcpTimeout", "ipvs_tcp_timeout"), ("tcpFinTimeout", "ipvs_tcp_fin_timeout"),
                     ("udpTimeout", "ipvs_udp_timeout"))  # fmt: skip
    for key, fname in ipvs_timeouts:
        if (raw := _get(doc, f"ipvs.{key}", (str, int, float))) is not None:
            out[fname] = parse_duration(f"ipvs.{key}", raw)
    if (v := _get(doc, "logging.verbosity", int)) is not None:
        out["verbosity"] = v
    return out


def build(file_overrides: Mapping[str, Any], flag_overrides: Mapping[str, Any]) -> ProxyConfig:
    """Defaults < file < flags, then validation."""
    names = {f.name for f in fields(ProxyConfig)}
    merged = {**file_overrides, **flag_overrides}
    unknown = set(merged) - names
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown setting")
    return validate(ProxyConfig(**merged))
