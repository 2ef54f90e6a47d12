"""The ``KubeProxyConfiguration`` file (``kubeproxy.config.k8s.io/v1alpha1``), as upstream reads it.

One declarative table, :data:`FIELDS`, says for every field of upstream's v1alpha1 type its
wire type, upstream's default, and what kproxy does with it (the :class:`ProxyConfig` attribute
it sets, or why it is only warned about). Everything else is derived from the table: decoding
with upstream's defaulting (kubeadm writes every field at its zero value, and upstream turns
``syncPeriod: 0s`` into 30s, ``healthzBindAddress: ""`` into ``0.0.0.0:10256`` and so on),
upstream's mode-dependent conversion (the ``nftables`` section in nftables mode, ``ipvs`` in
ipvs mode, ``iptables`` otherwise), the unknown-key report, encoding for ``--write-config-to``
and the field table in ``docs/configuration.md``.

Upstream decodes strictly, then leniently with a warning: an unknown key at any depth is
reported with its dotted path and the file is still used. A value of the wrong type, or one
upstream's validation refuses, is an error naming the field.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from kproxy.errors import ConfigError
from kproxy.goduration import format_duration, parse_duration

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"
HEALTHZ_PORT = 10256
METRICS_PORT = 10249


class Kind(Enum):
    """A field's wire type, as Go's JSON decoding of upstream's struct checks it."""

    STR = "string"
    BOOL = "boolean"
    INT32 = "int32"
    UINT32 = "uint32"
    FLOAT = "number"
    DURATION = "duration"  # metav1.Duration: a string ("30s"); a bare number is refused
    TIME_OR_DURATION = "duration or nanoseconds"  # logging.flushFrequency
    QUANTITY = "quantity"  # resource.QuantityValue: "0", "64Ki" or a number
    STR_LIST = "list of strings"
    BOOL_MAP = "map of booleans"
    VMODULE = "list of {filePattern, verbosity}"


class Use(Enum):
    """What kproxy does with a field."""

    IMPLEMENTED = "implemented"
    WARNED = "warned when not the default, ignored"
    WINDOWS = "Windows only: warned when not the default, ignored"
    KPROXY = "kproxy's own (not in upstream's type)"


@dataclass(frozen=True, slots=True)
class Field:
    path: str
    kind: Kind
    # Upstream's value after defaulting (what an absent or null field becomes, and, when
    # ``zero_defaults``, what its zero value becomes).
    default: Any
    use: Use
    note: str
    # The ProxyConfig attribute the field sets (None: nothing does).
    attr: str | None = None
    # Only read in these modes (the per-mode sections); None: in every mode.
    modes: tuple[str, ...] | None = None
    # Upstream's defaulting replaces the zero value too ("0s", "", 0), not only absence.
    zero_defaults: bool = False


def _f(path: str, kind: Kind, default: Any, use: Use, note: str, **kw: Any) -> Field:
    return Field(path, kind, default, use, note, **kw)


IMPL, WARN, WIN = Use.IMPLEMENTED, Use.WARNED, Use.WINDOWS
_NFT, _IPVS, _IPT = ("nftables",), ("ipvs",), ("iptables", "userspace")

# Upstream's v1alpha1 type (staging/src/k8s.io/kube-proxy/config/v1alpha1/types.go) and its
# defaulting (pkg/proxy/apis/config/v1alpha1/defaults.go, server_linux.go platformApplyDefaults).
FIELDS: tuple[Field, ...] = (
    _f(
        "featureGates",
        Kind.BOOL_MAP,
        {},
        IMPL,
        "gates kproxy reads are listed in the table below; others are warned",
        attr="feature_gates",
    ),
    _f(
        "clientConnection.kubeconfig",
        Kind.STR,
        "",
        IMPL,
        "kubeconfig with the API server and credentials",
        attr="kubeconfig",
    ),
    _f(
        "clientConnection.acceptContentTypes",
        Kind.STR,
        "",
        WARN,
        "kproxy always asks for application/json",
    ),
    _f(
        "clientConnection.contentType",
        Kind.STR,
        "application/vnd.kubernetes.protobuf",
        WARN,
        "kproxy always sends application/json",
        zero_defaults=True,
    ),
    _f(
        "clientConnection.qps",
        Kind.FLOAT,
        5.0,
        WARN,
        "kproxy makes one list and one watch per resource, not rate-limited",
        zero_defaults=True,
    ),
    _f("clientConnection.burst", Kind.INT32, 10, WARN, "as qps", zero_defaults=True),
    _f(
        "logging.format",
        Kind.STR,
        "text",
        IMPL,
        "klog's text or json",
        attr="logging_format",
        zero_defaults=True,
    ),
    _f(
        "logging.flushFrequency",
        Kind.TIME_OR_DURATION,
        5.0,
        IMPL,
        "kproxy writes every line at once, within any flush period",
        zero_defaults=True,
    ),
    _f("logging.verbosity", Kind.UINT32, 0, IMPL, "log verbosity, as -v", attr="verbosity"),
    _f("logging.vmodule", Kind.VMODULE, [], WARN, "per-file verbosity"),
    _f(
        "logging.options.text.splitStream",
        Kind.BOOL,
        False,
        WARN,
        "info to stdout, errors to stderr",
    ),
    _f(
        "logging.options.text.infoBufferSize",
        Kind.QUANTITY,
        "0",
        IMPL,
        "kproxy does not buffer (0)",
    ),
    _f("logging.options.json.splitStream", Kind.BOOL, False, WARN, "as text.splitStream"),
    _f("logging.options.json.infoBufferSize", Kind.QUANTITY, "0", IMPL, "as text.infoBufferSize"),
    _f(
        "hostnameOverride",
        Kind.STR,
        "",
        IMPL,
        "the Node's name (lower-cased); the hostname when empty",
        attr="hostname_override",
    ),
    _f(
        "bindAddress",
        Kind.STR,
        "0.0.0.0",
        IMPL,
        "the node's primary IP family; userspace mode: the NodePort listeners' address",
        attr="bind_address",
        zero_defaults=True,
    ),
    _f(
        "healthzBindAddress",
        Kind.STR,
        f"0.0.0.0:{HEALTHZ_PORT}",
        IMPL,
        f"health server (/healthz, /livez); a bare IP gets port {HEALTHZ_PORT}",
        attr="healthz_bind_address",
        zero_defaults=True,
    ),
    _f(
        "metricsBindAddress",
        Kind.STR,
        f"127.0.0.1:{METRICS_PORT}",
        IMPL,
        f"metrics server (/metrics); a bare IP gets port {METRICS_PORT}",
        attr="metrics_bind_address",
        zero_defaults=True,
    ),
    _f(
        "bindAddressHardFail",
        Kind.BOOL,
        False,
        IMPL,
        "exit when the health or metrics server cannot bind",
        attr="bind_address_hard_fail",
    ),
    _f("enableProfiling", Kind.BOOL, False, WARN, "/debug/pprof is Go's"),
    _f("showHiddenMetricsForVersion", Kind.STR, "", WARN, "kproxy has no hidden metrics"),
    _f(
        "mode",
        Kind.STR,
        "iptables",
        IMPL,
        "iptables, nftables, ipvs (and kproxy's userspace)",
        attr="mode",
        zero_defaults=True,
    ),
    _f(
        "iptables.masqueradeBit",
        Kind.INT32,
        14,
        IMPL,
        "fwmark bit for SNAT (iptables, ipvs, userspace modes)",
        attr="masquerade_bit",
        modes=_IPT + _IPVS,
    ),
    _f(
        "iptables.masqueradeAll",
        Kind.BOOL,
        False,
        IMPL,
        "SNAT all traffic to ClusterIPs (iptables, ipvs, userspace modes)",
        attr="masquerade_all",
        modes=_IPT + _IPVS,
    ),
    _f(
        "iptables.localhostNodePorts",
        Kind.BOOL,
        True,
        IMPL,
        "NodePorts on 127.0.0.1 (iptables mode, IPv4)",
        attr="localhost_nodeports",
    ),
    _f("iptables.snatNodeInternalIP", Kind.BOOL, False, WARN, "SNAT to the Node's InternalIP"),
    _f(
        "iptables.syncPeriod",
        Kind.DURATION,
        30.0,
        IMPL,
        "full resync period (iptables and userspace modes)",
        attr="sync_period",
        modes=_IPT,
        zero_defaults=True,
    ),
    _f(
        "iptables.minSyncPeriod",
        Kind.DURATION,
        1.0,
        IMPL,
        "least time between syncs (iptables and userspace modes)",
        attr="min_sync_period",
        modes=_IPT,
        zero_defaults=True,
    ),
    _f(
        "ipvs.syncPeriod",
        Kind.DURATION,
        30.0,
        IMPL,
        "full resync period (ipvs mode)",
        attr="sync_period",
        modes=_IPVS,
        zero_defaults=True,
    ),
    _f(
        "ipvs.minSyncPeriod",
        Kind.DURATION,
        0.0,
        IMPL,
        "least time between syncs (ipvs mode; 0: none)",
        attr="min_sync_period",
        modes=_IPVS,
    ),
    _f(
        "ipvs.scheduler",
        Kind.STR,
        "",
        IMPL,
        "IPVS scheduler (rr when empty)",
        attr="ipvs_scheduler",
    ),
    _f(
        "ipvs.excludeCIDRs",
        Kind.STR_LIST,
        [],
        IMPL,
        "IPVS services kproxy never removes",
        attr="ipvs_exclude_cidrs",
    ),
    _f(
        "ipvs.strictARP",
        Kind.BOOL,
        False,
        IMPL,
        "arp_ignore=1, arp_announce=2",
        attr="ipvs_strict_arp",
    ),
    _f(
        "ipvs.tcpTimeout",
        Kind.DURATION,
        0.0,
        IMPL,
        "IPVS TCP timeout (0: the kernel's)",
        attr="ipvs_tcp_timeout",
    ),
    _f(
        "ipvs.tcpFinTimeout",
        Kind.DURATION,
        0.0,
        IMPL,
        "IPVS TCP FIN timeout (0: the kernel's)",
        attr="ipvs_tcp_fin_timeout",
    ),
    _f(
        "ipvs.udpTimeout",
        Kind.DURATION,
        0.0,
        IMPL,
        "IPVS UDP timeout (0: the kernel's)",
        attr="ipvs_udp_timeout",
    ),
    _f(
        "nftables.masqueradeBit",
        Kind.INT32,
        14,
        IMPL,
        "fwmark bit for SNAT (nftables mode)",
        attr="masquerade_bit",
        modes=_NFT,
    ),
    _f(
        "nftables.masqueradeAll",
        Kind.BOOL,
        False,
        IMPL,
        "SNAT all traffic to ClusterIPs (nftables mode)",
        attr="masquerade_all",
        modes=_NFT,
    ),
    _f(
        "nftables.syncPeriod",
        Kind.DURATION,
        30.0,
        IMPL,
        "full resync period (nftables mode)",
        attr="sync_period",
        modes=_NFT,
        zero_defaults=True,
    ),
    _f(
        "nftables.minSyncPeriod",
        Kind.DURATION,
        1.0,
        IMPL,
        "least time between syncs (nftables mode)",
        attr="min_sync_period",
        modes=_NFT,
        zero_defaults=True,
    ),
    _f("winkernel.networkName", Kind.STR, "", WIN, ""),
    _f("winkernel.sourceVip", Kind.STR, "", WIN, ""),
    _f("winkernel.enableDSR", Kind.BOOL, False, WIN, ""),
    _f("winkernel.rootHnsEndpointName", Kind.STR, "", WIN, ""),
    _f("winkernel.forwardHealthCheckVip", Kind.BOOL, False, WIN, ""),
    _f(
        "detectLocalMode",
        Kind.STR,
        "ClusterCIDR",
        IMPL,
        "ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix",
        attr="detect_local_mode",
        zero_defaults=True,
    ),
    _f(
        "detectLocal.bridgeInterface",
        Kind.STR,
        "",
        IMPL,
        "with BridgeInterface",
        attr="pod_bridge_interface",
    ),
    _f(
        "detectLocal.interfaceNamePrefix",
        Kind.STR,
        "",
        IMPL,
        "with InterfaceNamePrefix",
        attr="pod_interface_name_prefix",
    ),
    _f(
        "clusterCIDR",
        Kind.STR,
        "",
        IMPL,
        "pod CIDRs, comma-separated (one per family)",
        attr="cluster_cidrs",
    ),
    _f(
        "nodePortAddresses",
        Kind.STR_LIST,
        [],
        IMPL,
        "CIDRs, 'primary' or 'localhost' NodePorts answer on (nftables mode: primary when empty)",
        attr="nodeport_addresses",
    ),
    _f(
        "oomScoreAdj",
        Kind.INT32,
        -999,
        IMPL,
        "the process's oom_score_adj, -1000..1000",
        attr="oom_score_adj",
    ),
    _f(
        "conntrack.maxPerCore",
        Kind.INT32,
        32768,
        IMPL,
        "nf_conntrack_max = max(maxPerCore x CPUs, min), never lowered (0: leave it)",
        attr="conntrack_max_per_core",
    ),
    _f(
        "conntrack.min",
        Kind.INT32,
        131072,
        IMPL,
        "the floor of nf_conntrack_max",
        attr="conntrack_min",
    ),
    _f(
        "conntrack.tcpEstablishedTimeout",
        Kind.DURATION,
        86400.0,
        IMPL,
        "nf_conntrack_tcp_timeout_established (0: leave it); userspace mode: idle TCP relays close",
        attr="conntrack_tcp_established_timeout",
    ),
    _f(
        "conntrack.tcpCloseWaitTimeout",
        Kind.DURATION,
        3600.0,
        IMPL,
        "nf_conntrack_tcp_timeout_close_wait (0: leave it)",
        attr="conntrack_tcp_close_wait_timeout",
    ),
    _f(
        "conntrack.tcpBeLiberal",
        Kind.BOOL,
        False,
        IMPL,
        "nf_conntrack_tcp_be_liberal=1, and no INVALID drop",
        attr="conntrack_tcp_be_liberal",
    ),
    _f(
        "conntrack.udpTimeout",
        Kind.DURATION,
        0.0,
        IMPL,
        "nf_conntrack_udp_timeout (0: leave it)",
        attr="conntrack_udp_timeout",
    ),
    _f(
        "conntrack.udpStreamTimeout",
        Kind.DURATION,
        0.0,
        IMPL,
        "nf_conntrack_udp_timeout_stream (0: leave it)",
        attr="conntrack_udp_stream_timeout",
    ),
    _f(
        "configSyncPeriod",
        Kind.DURATION,
        900.0,
        WARN,
        "informer cache replay; kproxy's periodic full sync covers it",
        zero_defaults=True,
    ),
    _f(
        "portRange",
        Kind.STR,
        "",
        IMPL,
        "userspace mode: the portal listeners' ports (unused upstream since 1.26)",
        attr="proxy_port_range",
    ),
    _f("windowsRunAsService", Kind.BOOL, False, WIN, ""),
    _f(
        "udpIdleTimeout",
        Kind.DURATION,
        0.25,
        Use.KPROXY,
        "userspace mode: a UDP session idle this long is forgotten (upstream's removed field)",
        attr="udp_idle_timeout",
        zero_defaults=True,
    ),
    _f(
        "externalIPCIDRs",
        Kind.STR_LIST,
        [],
        Use.KPROXY,
        "where Services may put externalIPs; others are not programmed (empty: anywhere)",
        attr="external_ip_cidrs",
    ),
)
BY_PATH = {f.path: f for f in FIELDS}
# Every mapping in the type, by dotted path ("" is the document).
SECTIONS: dict[str, set[str]] = {"": {"apiVersion", "kind"}}
for _field in FIELDS:
    _parts = _field.path.split(".")
    for _depth, _name in enumerate(_parts):
        SECTIONS.setdefault(".".join(_parts[:_depth]), set()).add(_name)


@dataclass(frozen=True, slots=True)
class Gate:
    name: str
    default: bool
    note: str
    # kproxy behaves as the gate says whatever its value (True), or only at its default.
    honoured: bool = False


# The feature gates kube-proxy reads (kube-proxy-features.md §1.17). Setting one of them to its
# default is silent; setting one kproxy does not honour to the other value is warned; any other
# name is warned as unknown to kproxy (upstream knows every Kubernetes gate, and refuses only
# names it does not know).
GATES: tuple[Gate, ...] = (
    Gate("NFTablesNetlink", True, "kproxy's nftables mode sends elements over netlink"),
    Gate(
        "KubeProxyNFTablesLocalhostNodePorts",
        True,
        "off, the nftables mode serves no NodePorts on loopback",
        honoured=True,
    ),
    Gate("KubeProxyIPVS", True, "the ipvs mode is available", honoured=True),
    Gate("PreferSameTrafficDistribution", True, "trafficDistribution PreferSameNode"),
    Gate(
        "MultiCIDRServiceAllocator",
        True,
        "off, ServiceCIDRs are not watched (nftables mode: unallocated cluster IPs not dropped)",
        honoured=True,
    ),
    Gate(
        "AllowServiceExternalIPs",
        True,
        "off, externalIPs are not programmed (a warning per Service)",
        honoured=True,
    ),
)
GATES_BY_NAME = {g.name: g for g in GATES}


@dataclass
class Decoded:
    """A file decoded, defaulted and converted for its mode."""

    # ProxyConfig attribute -> value, for every implemented field.
    values: dict[str, Any] = field(default_factory=dict)
    # ProxyConfig attribute -> the field it came from ("iptables.syncPeriod").
    origins: dict[str, str] = field(default_factory=dict)
    # The file (for errors about its fields).
    source: str = ""
    warnings: list[str] = field(default_factory=list)


def _type_error(path: str, kind: Kind, value: object) -> ConfigError:
    return ConfigError(path, f"expected {kind.value}, got {value!r}")


def _decode_value(f: Field, value: object) -> Any:
    """The field's value in kproxy's terms (durations in seconds), type-checked as Go's
    decoder checks it."""
    k, path = f.kind, f.path
    if k is Kind.STR:
        if not isinstance(value, str):
            raise _type_error(path, k, value)
        return value
    if k is Kind.BOOL:
        if not isinstance(value, bool):
            raise _type_error(path, k, value)
        return value
    if k in (Kind.INT32, Kind.UINT32):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(path, k, value)
        lo = 0 if k is Kind.UINT32 else -(2**31)
        hi = 2**32 - 1 if k is Kind.UINT32 else 2**31 - 1
        if not lo <= value <= hi:
            raise ConfigError(path, f"{value} does not fit {k.value}")
        return value
    if k is Kind.FLOAT:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(path, k, value)
        return float(value)
    if k is Kind.DURATION:
        if not isinstance(value, str):
            # metav1.Duration decodes from a JSON string only: `syncPeriod: 30` is refused
            # upstream ("cannot unmarshal number"), not read as 30 nanoseconds.
            raise ConfigError(path, f"expected a duration such as 30s or 1m30s, got {value!r}")
        return parse_duration(path, value)
    if k is Kind.TIME_OR_DURATION:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise _type_error(path, k, value)
        return parse_duration(path, value)  # a number is nanoseconds here, as upstream
    if k is Kind.QUANTITY:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise _type_error(path, k, value)
        return value
    if k is Kind.STR_LIST:
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise _type_error(path, k, value)
        return list(value)
    if k is Kind.BOOL_MAP:
        if not isinstance(value, Mapping) or not all(
            isinstance(n, str) and isinstance(b, bool) for n, b in value.items()
        ):
            raise _type_error(path, k, value)
        return dict(value)
    assert k is Kind.VMODULE
    if not isinstance(value, list) or not all(
        isinstance(x, Mapping) and set(x) <= {"filePattern", "verbosity"} for x in value
    ):
        raise _type_error(path, k, value)
    return list(value)


def _is_zero(value: Any) -> bool:
    return value in ("", 0, 0.0, False, None) or (isinstance(value, list | dict) and not value)


def _unknown_keys(doc: Mapping[str, Any]) -> list[str]:
    """Dotted paths of the keys upstream's strict decoding would refuse."""
    out: list[str] = []

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        known = SECTIONS.get(prefix, set())
        for key, child in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in known:
                out.append(path)
            elif path in SECTIONS and path not in BY_PATH:
                if isinstance(child, Mapping):
                    walk(child, path)
                elif child is not None:
                    raise ConfigError(path, f"expected a mapping, got {child!r}")

    walk(doc, "")
    return out


def _lookup(doc: Mapping[str, Any], path: str) -> Any:
    cur: Any = doc
    for part in path.split("."):
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(part)
    return cur


def with_port(value: str, port: int) -> str:
    """Upstream's AppendPortIfNeeded: a bare IP gets the default port."""
    try:
        ip = ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return value  # HOST:PORT, or invalid (validation names it)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def defaulted(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Every field's value after upstream's defaulting, by path (kproxy's units)."""
    out: dict[str, Any] = {}
    for f in FIELDS:
        raw = _lookup(doc, f.path)
        value = f.default if raw is None else _decode_value(f, raw)
        if f.zero_defaults and _is_zero(value):
            value = f.default
        out[f.path] = value
    # The servers' default addresses follow bindAddress's family (getDefaultAddresses).
    v6 = _family(out["bindAddress"]) == 6
    for path, host, port in (
        ("healthzBindAddress", "[::]" if v6 else "0.0.0.0", HEALTHZ_PORT),
        ("metricsBindAddress", "[::1]" if v6 else "127.0.0.1", METRICS_PORT),
    ):
        given = _lookup(doc, path)
        out[path] = f"{host}:{port}" if not given else with_port(out[path], port)
    return out


def _family(address: str) -> int:
    try:
        return ipaddress.ip_address(address).version
    except ValueError:
        return 4


def decode(doc: object, source: str, mode: str | None = None) -> Decoded:
    """A parsed document as ProxyConfig values; ``source`` names it in errors and warnings.
    ``mode``: convert for this mode rather than the file's (a flag chose it)."""
    if not isinstance(doc, Mapping):
        raise ConfigError("--config", f"{source} does not hold a {KIND}")
    if doc.get("kind") != KIND or doc.get("apiVersion") != API_VERSION:
        raise ConfigError("--config", f"{source}: expected kind {KIND}, apiVersion {API_VERSION}")
    try:
        unknown = _unknown_keys(doc)
        values = defaulted(doc)
    except ConfigError as e:
        raise ConfigError(e.field, e.message, source) from None
    out = Decoded(source=source)
    if unknown:
        # Upstream: "using lenient decoding as strict decoding failed", then goes on.
        out.warnings.append(f"{source}: unknown fields ignored: {', '.join(unknown)}")
    mode = mode or values["mode"]
    for f in FIELDS:
        value = values[f.path]
        if f.use in (Use.WARNED, Use.WINDOWS):
            if value != f.default and not (f.zero_defaults and _is_zero(value)):
                why = "applies to Windows only" if f.use is Use.WINDOWS else f.note
                out.warnings.append(f"{source}: {f.path}={value!r} is not implemented ({why})")
            continue
        if f.attr is None or (f.modes is not None and mode not in f.modes):
            continue
        out.values[f.attr] = _convert(f, value)
        out.origins[f.attr] = f.path
    out.warnings.extend(gate_warnings(values["featureGates"], source))
    return out


_CONVERT: dict[str, Callable[[Any], Any]] = {
    "cluster_cidrs": lambda v: tuple(c for c in v.split(",") if c.strip()),
    "nodeport_addresses": tuple,
    "ipvs_exclude_cidrs": tuple,
    "hostname_override": lambda v: v or None,
    "kubeconfig": lambda v: v or None,
}


def _convert(f: Field, value: Any) -> Any:
    assert f.attr is not None
    conv = _CONVERT.get(f.attr)
    return conv(value) if conv is not None else value


def gate_warnings(gates: Mapping[str, bool], source: str) -> list[str]:
    out: list[str] = []
    for name, on in sorted(gates.items()):
        gate = GATES_BY_NAME.get(name)
        if gate is None:
            out.append(f"{source}: feature gate {name}={str(on).lower()} is not read by kproxy")
        elif on != gate.default and not gate.honoured:
            out.append(
                f"{source}: feature gate {name}={str(on).lower()} is not implemented "
                f"(kproxy behaves as {name}={str(gate.default).lower()}: {gate.note})"
            )
    return out


def load(path: str, mode: str | None = None) -> Decoded:
    """Read and decode a KubeProxyConfiguration file."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError("--config", f"{path} is not valid YAML: {first}") from None
    return decode(doc, path, mode)


def encode(cfg: Any) -> dict[str, Any]:
    """``cfg`` (a ProxyConfig) as a defaulted v1alpha1 document, for ``--write-config-to``.

    Each per-mode field carries the value of the mode it applies to and upstream's default
    elsewhere, so decoding the document gives ``cfg`` back."""
    doc: dict[str, Any] = {"apiVersion": API_VERSION, "kind": KIND}
    for f in FIELDS:
        if f.attr is None or (f.modes is not None and cfg.mode not in f.modes):
            value = f.default
        else:
            value = getattr(cfg, f.attr)
            if f.attr == "cluster_cidrs":
                value = ",".join(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif value is None:
                value = ""
        if f.kind in (Kind.DURATION, Kind.TIME_OR_DURATION):
            value = format_duration(value)
        cur = doc
        *parents, leaf = f.path.split(".")
        for part in parents:
            cur = cur.setdefault(part, {})
        cur[leaf] = value
    return doc


def field_table() -> str:
    """The Markdown table of ``docs/configuration.md``."""
    rows = ["| field | type | default | kproxy |", "|---|---|---|---|"]
    for f in FIELDS:
        default = f.default
        if f.kind in (Kind.DURATION, Kind.TIME_OR_DURATION):
            default = format_duration(default)
        shown = f'`"{default}"`' if isinstance(default, str) else f"`{default}`"
        if isinstance(default, bool):
            shown = f"`{str(default).lower()}`"
        use = f.use.value if not f.note else f"{f.use.value}: {f.note}"
        if f.modes is not None:
            use += f" (read in {', '.join(f.modes)} mode)"
        rows.append(f"| `{f.path}` | {f.kind.value} | {shown} | {use} |")
    rows += ["", "| feature gate | default | kproxy |", "|---|---|---|"]
    for g in GATES:
        how = "honoured" if g.honoured else "warned when not the default"
        rows.append(f"| `{g.name}` | `{str(g.default).lower()}` | {how}: {g.note} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(field_table(), end="")
