"""Tests for kproxy.config: Go durations, the KubeProxyConfiguration file, precedence, validation.

Upstream (kube-proxy-features.md §1.14-1.16): the file is ``kubeproxy.config.k8s.io/v1alpha1``
YAML, durations are Go durations (a bare number in the file is nanoseconds), and the Node name is
``--hostname-override`` lower-cased. kproxy's own precedence is defaults < file < flags.
"""

from __future__ import annotations

import re
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kproxy.config import (
    ProxyConfig,
    admits_loopback,
    build,
    load_file,
    nodeport_cidrs,
    validate,
)
from kproxy.errors import ConfigError
from kproxy.goduration import parse_duration

HEADER = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load(tmp_path: Path, body: str) -> tuple[dict[str, Any], list[str]]:
    """``load_file`` of a file holding the standard header and ``body``: the values it sets
    that differ from an empty file's (upstream's defaults), and its warnings."""
    defaults = load_file(write(tmp_path, HEADER, "empty.yaml")).values
    file = load_file(write(tmp_path, HEADER + body))
    changed = {k: v for k, v in file.values.items() if defaults.get(k, object()) != v}
    return changed, file.warnings


def config_error(cfg: ProxyConfig) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    return info.value


# --------------------------------------------------------------------------------------------
# parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("500ms", 0.5),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("1h2m3s", 3723.0),
        ("250us", 250e-6),
        ("250\u00b5s", 250e-6),  # MICRO SIGN
        ("100ns", 100e-9),
        ("2m0.5s", 120.5),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration("--sync-period", text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5", "abc", "-1s", "1x", "s", "1 s", "1s2", "1.2.3s", "ms"])
def test_parse_duration_invalid(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration("--min-sync-period", text)
    assert info.value.field == "--min-sync-period"


@pytest.mark.parametrize(
    ("number", "seconds"), [(1_000_000_000, 1.0), (1_500_000_000, 1.5), (0, 0.0), (2.5e9, 2.5)]
)
def test_numbers_are_nanoseconds(number: float, seconds: float) -> None:
    assert parse_duration("syncPeriod", number) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [-1, True, False, None, ["1s"]])
def test_parse_duration_invalid_values(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration("syncPeriod", value)
    assert info.value.field == "syncPeriod"


def test_parse_duration_empty_string_is_invalid() -> None:
    with pytest.raises(ConfigError):
        parse_duration("--min-sync-period", "")


@pytest.mark.parametrize(("text", "seconds"), [("+1s", 1.0), ("3\u03bcs", 3e-6)])
def test_parse_duration_go_forms_not_accepted(text: str, seconds: float) -> None:
    assert parse_duration("--sync-period", text) == pytest.approx(seconds)


# --------------------------------------------------------------------------------------------
# load_file


FULL_CONFIG = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection:
  kubeconfig: {kubeconfig}
  qps: 5
  burst: 10
hostnameOverride: Worker-1
bindAddress: 0.0.0.0
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
detectLocalMode: ClusterCIDR
healthzBindAddress: 0.0.0.0:10256
metricsBindAddress: 127.0.0.1:10249
configSyncPeriod: 15m
iptables:
  masqueradeAll: true
  masqueradeBit: 15
  localhostNodePorts: true
  syncPeriod: 45s
  minSyncPeriod: 500ms
nodePortAddresses:
  - primary
  - 192.168.0.0/16
conntrack:
  maxPerCore: 32768
  tcpBeLiberal: true
  tcpEstablishedTimeout: 2h
udpIdleTimeout: 1s
logging:
  verbosity: 4
oomScoreAdj: -999
"""


def test_detect_local_modes(tmp_path: Path) -> None:
    doc = (
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
        "detectLocalMode: InterfaceNamePrefix\ndetectLocal:\n  interfaceNamePrefix: veth\n"
    )
    cfg = build(load_file(write(tmp_path, doc)), {})
    assert cfg.detect_local_mode == "InterfaceNamePrefix"
    assert cfg.pod_interface_name_prefix == "veth"
    for flags, field in (
        ({"detect_local_mode": "BridgeInterface"}, "--pod-bridge-interface"),
        ({"detect_local_mode": "Bogus"}, "--detect-local-mode"),
        ({"pod_interface_name_prefix": "a b"}, "--pod-interface-name-prefix"),
        ({"pod_bridge_interface": "x" * 16}, "--pod-bridge-interface"),
        ({"conntrack_tcp_established_timeout": -1.0}, "--conntrack-tcp-timeout-established"),
        ({"udp_idle_timeout": 0.0}, "--udp-timeout"),
    ):
        with pytest.raises(ConfigError) as info:
            build(None, flags)
        assert info.value.field == field


def test_load_full_file(tmp_path: Path) -> None:
    kubeconfig = write(tmp_path, "apiVersion: v1\nkind: Config\n", "kubeconfig")
    file = load_file(write(tmp_path, FULL_CONFIG.format(kubeconfig=kubeconfig)))
    assert file.warnings == []
    expected = {
        "mode": "iptables",
        "kubeconfig": kubeconfig,
        "hostname_override": "Worker-1",
        "bind_address": "0.0.0.0",
        "cluster_cidrs": ("10.244.0.0/16", "fd00:10:244::/56"),
        "detect_local_mode": "ClusterCIDR",
        "healthz_bind_address": "0.0.0.0:10256",
        "metrics_bind_address": "127.0.0.1:10249",
        "masquerade_all": True,
        "masquerade_bit": 15,
        "localhost_nodeports": True,
        "sync_period": 45.0,
        "min_sync_period": 0.5,
        "nodeport_addresses": ("primary", "192.168.0.0/16"),
        "conntrack_tcp_be_liberal": True,
        "conntrack_tcp_established_timeout": 7200.0,
        "udp_idle_timeout": 1.0,
        "verbosity": 4,
        "oom_score_adj": -999,
    }
    assert {k: file.values[k] for k in expected} == expected
    assert file.origins["sync_period"] == "iptables.syncPeriod"
    cfg = build(file, {})
    assert cfg.cluster_cidrs == ("10.244.0.0/16", "fd00:10:244::/56")
    assert cfg.node_name == "worker-1"
    assert cfg.masquerade_bit == 15
    assert cfg.sync_period == 45.0


def test_a_minimal_file_is_upstreams_defaults(tmp_path: Path) -> None:
    file = load_file(write(tmp_path, HEADER))
    assert file.warnings == []
    assert build(file, {}) == ProxyConfig(config_file=None)


def test_bare_numbers_are_not_durations_in_the_file(tmp_path: Path) -> None:
    # metav1.Duration decodes from a string only; upstream refuses `syncPeriod: 30000000000`.
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "iptables:\n  syncPeriod: 30000000000\n")
    assert info.value.field == "iptables.syncPeriod"
    assert "30s" in info.value.message


def test_fields_of_other_versions_are_unknown(tmp_path: Path) -> None:
    # The internal type's top-level syncPeriod and linux section are not v1alpha1 fields.
    values, warnings = load(
        tmp_path,
        "iptables: {syncPeriod: 10s}\nsyncPeriod: 20s\nminSyncPeriod: 2s\n"
        "linux: {masqueradeAll: true}\n",
    )
    assert values == {"sync_period": 10.0}
    assert len(warnings) == 1
    assert "syncPeriod, minSyncPeriod, linux" in warnings[0]


def test_unknown_fields_at_any_depth_are_warned_with_their_path(tmp_path: Path) -> None:
    values, warnings = load(
        tmp_path,
        "mode: iptables\nnoSuchField: 1\niptables:\n  masqueradeAl: true\n"
        "logging:\n  options:\n    text:\n      colour: true\n",
    )
    assert values == {}
    assert len(warnings) == 1
    assert warnings[0].endswith(
        "unknown fields ignored: noSuchField, iptables.masqueradeAl, logging.options.text.colour"
    )


@pytest.mark.parametrize(
    "text",
    [
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration\n",
        "apiVersion: kubeproxy.config.k8s.io/v1beta1\nkind: KubeProxyConfiguration\n",
        "kind: KubeProxyConfiguration\n",
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n",
        "",
        "- a list\n",
        "just a string\n",
    ],
    ids=["kind", "apiVersion", "no-apiVersion", "no-kind", "empty", "list", "scalar"],
)
def test_not_a_kube_proxy_configuration(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_file(write(tmp_path, text))
    assert info.value.field == "--config"


@pytest.mark.parametrize("text", ["mode: [iptables\n", "mode: iptables\n\tbad: tab\n", "a: b: c\n"])
def test_invalid_yaml(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_file(write(tmp_path, HEADER + text))
    assert info.value.field == "--config"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_file(str(tmp_path / "absent.yaml"))
    assert info.value.field == "--config"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('iptables:\n  masqueradeAll: "yes"\n', "iptables.masqueradeAll"),
        ("iptables:\n  masqueradeBit: true\n", "iptables.masqueradeBit"),
        ('iptables:\n  masqueradeBit: "14"\n', "iptables.masqueradeBit"),
        ("iptables:\n  syncPeriod: true\n", "iptables.syncPeriod"),
        ("iptables:\n  minSyncPeriod: fast\n", "iptables.minSyncPeriod"),
        ("configSyncPeriod: -1s\n", "configSyncPeriod"),
        ("iptables:\n  syncPeriod: 30\n", "iptables.syncPeriod"),
        ("oomScoreAdj: 1.5\n", "oomScoreAdj"),
        ("featureGates: {A: yes-please}\n", "featureGates"),
        ("mode: 1\n", "mode"),
        ("clusterCIDR: [10.0.0.0/8]\n", "clusterCIDR"),
        ("hostnameOverride: 7\n", "hostnameOverride"),
        ("nodePortAddresses: 10.0.0.0/8\n", "nodePortAddresses"),
        ("nodePortAddresses: [1, 2]\n", "nodePortAddresses"),
        ("conntrack:\n  tcpBeLiberal: 1\n", "conntrack.tcpBeLiberal"),
        ("logging:\n  verbosity: high\n", "logging.verbosity"),
        ("clientConnection:\n  kubeconfig: 3\n", "clientConnection.kubeconfig"),
    ],
)
def test_wrong_type_names_the_field(tmp_path: Path, body: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, body)
    assert info.value.field == field
    assert str(info.value).startswith(f"{tmp_path / 'config.yaml'}: {field}: ")


def test_section_of_wrong_type_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "iptables: fast\n")
    assert info.value.field.startswith("iptables")


# --------------------------------------------------------------------------------------------
# build: defaults < file < flags


def test_build_defaults() -> None:
    cfg = build(None, {})
    assert cfg == ProxyConfig()
    assert (cfg.mode, cfg.min_sync_period, cfg.sync_period) == ("iptables", 1.0, 30.0)
    assert (cfg.masquerade_bit, cfg.healthz_bind_address) == (14, "0.0.0.0:10256")


def test_build_file_overrides_defaults_and_flags_override_file(tmp_path: Path) -> None:
    file = load_file(
        write(tmp_path, HEADER + "iptables: {masqueradeBit: 12, syncPeriod: 10s}\n"
              "hostnameOverride: from-file\n")
    )  # fmt: skip
    cfg = build(file, {"masquerade_bit": 13, "min_sync_period": 5.0})
    assert cfg.masquerade_bit == 13  # flag
    assert cfg.min_sync_period == 5.0  # flag
    assert cfg.sync_period == 10.0  # file
    assert cfg.hostname_override == "from-file"  # file
    assert cfg.verbosity == 0  # default


def test_build_validates_the_merged_result(tmp_path: Path) -> None:
    file = load_file(write(tmp_path, HEADER + "iptables: {syncPeriod: 10s}\n"))
    with pytest.raises(ConfigError) as info:
        build(file, {"min_sync_period": 20.0})
    assert info.value.field == "--min-sync-period"


def test_an_invalid_file_value_is_named_by_its_field(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "iptables: {minSyncPeriod: 1m}\n")
    with pytest.raises(ConfigError) as info:
        build(load_file(path), {})
    assert (info.value.source, info.value.field) == (path, "iptables.minSyncPeriod")
    assert str(info.value).startswith(f"{path}: iptables.minSyncPeriod: must not be greater")
    # Given by a flag, the same value is the flag's error.
    with pytest.raises(ConfigError) as info:
        build(load_file(path), {"min_sync_period": 40.0})
    assert (info.value.source, info.value.field) == (None, "--min-sync-period")
    path = write(tmp_path, HEADER + "oomScoreAdj: 2000\n", "oom.yaml")
    with pytest.raises(ConfigError) as info:
        build(load_file(path), {})
    assert info.value.field == "oomScoreAdj"


def test_build_unknown_setting() -> None:
    with pytest.raises(ConfigError) as info:
        build(None, {"no_such_setting": 1})
    assert info.value.field == "no_such_setting"


# --------------------------------------------------------------------------------------------
# validate


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"mode": "bogus"}, "--proxy-mode"),
        ({"mode": "kernelspace"}, "--proxy-mode"),
        ({"ipvs_scheduler": "fifo"}, "--ipvs-scheduler"),
        ({"ipvs_scheduler": "RR"}, "--ipvs-scheduler"),
        ({"ipvs_exclude_cidrs": ("10.0.0.0/33",)}, "--ipvs-exclude-cidrs"),
        ({"ipvs_tcp_timeout": -1.0}, "--ipvs-tcp-timeout"),
        ({"cluster_cidrs": ("10.0.0.0/8", "192.168.0.0/16")}, "--cluster-cidr"),
        ({"cluster_cidrs": ("fd00::/48", "fd01::/48")}, "--cluster-cidr"),
        ({"cluster_cidrs": ("10.0.0.0/8", "fd00::/48", "10.1.0.0/16")}, "--cluster-cidr"),
        ({"cluster_cidrs": ("10.0.0.0/33",)}, "--cluster-cidr"),
        ({"cluster_cidrs": ("bogus",)}, "--cluster-cidr"),
        ({"masquerade_bit": 32}, "--iptables-masquerade-bit"),
        ({"masquerade_bit": -1}, "--iptables-masquerade-bit"),
        ({"min_sync_period": 31.0}, "--min-sync-period"),
        ({"sync_period": 0.0}, "--sync-period"),
        ({"verbosity": 11}, "-v"),
        ({"verbosity": -1}, "-v"),
        ({"healthz_bind_address": "localhost:10256"}, "--healthz-bind-address"),
        ({"healthz_bind_address": "0.0.0.0"}, "--healthz-bind-address"),
        ({"healthz_bind_address": "0.0.0.0:99999"}, "--healthz-bind-address"),
        ({"healthz_bind_address": "0.0.0.0:http"}, "--healthz-bind-address"),
        ({"healthz_bind_address": "10.0.0.256:10256"}, "--healthz-bind-address"),
        ({"metrics_bind_address": "nowhere:10249"}, "--metrics-bind-address"),
        ({"nodeport_addresses": ("10.0.0.0/33",)}, "--nodeport-addresses"),
        ({"nodeport_addresses": ("primary", "bogus")}, "--nodeport-addresses"),
        ({"nodeport_addresses": ("Primary",)}, "--nodeport-addresses"),
        ({"bind_address": "0.0.0.0:80"}, "--bind-address"),
        ({"hostname_override": "  "}, "--hostname-override"),
        ({"detect_local_mode": "NodeCIDRs"}, "--detect-local-mode"),
        ({"manifests": "/nonexistent/kproxy-manifests"}, "--manifests"),
        ({"kubeconfig": "/nonexistent/kubeconfig"}, "--kubeconfig"),
    ],
)
def test_validate_names_the_flag(changes: dict[str, Any], flag: str) -> None:
    err = config_error(replace(ProxyConfig(), **changes))
    assert err.field == flag
    assert str(err).startswith(f"{flag}: ")


def test_the_ipvs_section_from_file_and_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
        "mode: ipvs\nipvs:\n  scheduler: wlc\n  strictARP: true\n  syncPeriod: 45s\n"
        "  excludeCIDRs: ['192.0.2.0/24']\n  tcpTimeout: 15m\n  tcpFinTimeout: 30s\n"
        "  udpTimeout: 5s\n"
    )
    file = load_file(str(f))
    cfg = build(file, {"ipvs_udp_timeout": 7.0})
    assert not file.warnings
    assert (cfg.mode, cfg.ipvs_scheduler, cfg.ipvs_strict_arp) == ("ipvs", "wlc", True)
    assert cfg.sync_period == 45.0  # the ipvs section's, in ipvs mode (as upstream)
    assert cfg.ipvs_exclude_cidrs == ("192.0.2.0/24",)
    assert (cfg.ipvs_tcp_timeout, cfg.ipvs_tcp_fin_timeout) == (900.0, 30.0)
    assert cfg.ipvs_udp_timeout == 7.0  # the flag wins


@pytest.mark.parametrize(
    ("text", "canonical"),
    [("", ""), ("0", ""), ("0-0", ""), ("40000-40999", "40000-40999"),
     ("40000+99", "40000-40099"), ("41000", "41000-41000"), (" 1-65535 ", "1-65535")],
)  # fmt: skip
def test_proxy_port_range_forms(text: str, canonical: str) -> None:
    assert validate(ProxyConfig(proxy_port_range=text)).proxy_port_range == canonical


@pytest.mark.parametrize("text", ["40000-", "a-b", "5-4", "65000+1000", "0-10", "-1", "1,2"])
def test_proxy_port_range_invalid(text: str) -> None:
    err = config_error(ProxyConfig(proxy_port_range=text))
    assert err.field == "--proxy-port-range"
    assert repr(text) in str(err)


def test_port_range_from_the_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
        "mode: userspace\nportRange: 40000+9\n"
    )
    file = load_file(str(f))
    cfg = build(file, {})
    assert (file.warnings, cfg.proxy_port_range) == ([], "40000-40009")


def test_validate_canonicalizes() -> None:
    cfg = validate(
        ProxyConfig(
            cluster_cidrs=(" 10.244.1.5/16", "FD00:10:244::/56", ""),
            nodeport_addresses=("primary", " 192.168.1.9/24 ", ""),
            healthz_bind_address="[::1]:10256",
            metrics_bind_address="",
        )
    )
    assert cfg.cluster_cidrs == ("10.244.0.0/16", "fd00:10:244::/56")
    assert cfg.nodeport_addresses == ("primary", "192.168.1.0/24")
    assert cfg.healthz_bind_address == "[::1]:10256"
    assert cfg.metrics_bind_address == ""  # disabled


def test_validate_accepts_equal_sync_periods_and_dual_stack(tmp_path: Path) -> None:
    cfg = ProxyConfig(
        min_sync_period=30.0,
        cluster_cidrs=("10.0.0.0/8", "fd00::/48"),
        masquerade_bit=31,
        manifests=str(tmp_path),
        verbosity=10,
    )
    assert validate(cfg) == cfg


# --------------------------------------------------------------------------------------------
# node_name


@pytest.mark.parametrize(
    ("override", "expected"),
    [("Node-A", "node-a"), (" worker-1.EXAMPLE.com ", "worker-1.example.com")],
)
def test_node_name_is_the_lower_cased_hostname_override(override: str, expected: str) -> None:
    assert ProxyConfig(hostname_override=override).node_name == expected


def test_node_name_defaults_to_the_lower_cased_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "My-Host")
    assert ProxyConfig().node_name == "my-host"


def test_an_unknown_node_port_address_keyword_says_what_is_accepted() -> None:
    # `all` is not a keyword upstream: the error lists what is.
    says = "--nodeport-addresses: 'all' is not a CIDR, 'primary' or 'localhost'"
    with pytest.raises(ConfigError, match=re.escape(says)):
        build(None, {"nodeport_addresses": ("all",)})


@pytest.mark.parametrize(
    ("given", "cidrs", "v4", "v6"),
    [
        (("localhost",), ("127.0.0.0/8", "::1/128"), True, True),
        (("primary", "localhost"), ("127.0.0.0/8", "::1/128"), True, True),
        (("127.0.0.1/32", "10.0.0.0/8"), ("127.0.0.1/32", "10.0.0.0/8"), True, False),
        (("::/0",), ("::/0",), False, True),
        (("primary",), (), False, False),
        # Empty means every address, but names no loopback explicitly (upstream: no
        # localhost NodePorts in the nftables mode).
        ((), (), False, False),
    ],
)
def test_node_port_addresses_spell_out_localhost(
    given: tuple[str, ...], cidrs: tuple[str, ...], v4: bool, v6: bool
) -> None:
    addresses = build(None, {"nodeport_addresses": given}).nodeport_addresses
    assert addresses == given
    assert nodeport_cidrs(addresses) == cidrs
    assert (admits_loopback(addresses, 4), admits_loopback(addresses, 6)) == (v4, v6)


def test_gates_default_as_upstream_and_follow_what_is_given() -> None:
    cfg = build(None, {})
    assert cfg.gate("KubeProxyNFTablesLocalhostNodePorts") is True
    assert cfg.gate("AllowServiceExternalIPs") is True
    off = build(None, {"feature_gates": {"KubeProxyNFTablesLocalhostNodePorts": False}})
    assert off.gate("KubeProxyNFTablesLocalhostNodePorts") is False


def test_the_kube_proxy_ipvs_gate_turns_the_mode_off() -> None:
    with pytest.raises(ConfigError, match=r"--proxy-mode: the ipvs mode is turned off"):
        build(None, {"mode": "ipvs", "feature_gates": {"KubeProxyIPVS": False}})
    assert build(None, {"mode": "ipvs", "feature_gates": {"KubeProxyIPVS": True}}).mode == "ipvs"
    # Other modes do not care.
    assert build(None, {"mode": "nftables", "feature_gates": {"KubeProxyIPVS": False}})
