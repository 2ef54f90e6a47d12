"""kproxy.v1alpha1: upstream's KubeProxyConfiguration, read as upstream reads it.

kubeadm's ConfigMap (``tests/fixtures/``, verbatim) must load in every mode with upstream's
defaults; every field of the type is either implemented (its effect on the configuration is
checked here) or warned about by name; unknown keys are reported with their dotted path;
``--write-config-to``'s document reads back as the same configuration.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kproxy import v1alpha1
from kproxy.config import ProxyConfig, build
from kproxy.errors import ConfigError
from kproxy.v1alpha1 import FIELDS, Kind, Use

FIXTURE = Path(__file__).parents[1] / "fixtures" / "kubeadm-kube-proxy-configmap.yaml"
DOCS = Path(__file__).parents[2] / "docs" / "configuration.md"


def kubeadm_config() -> dict[str, Any]:
    """The KubeProxyConfiguration in kubeadm's ConfigMap, as the pod sees config.conf."""
    cm = yaml.safe_load(FIXTURE.read_text())
    doc = yaml.safe_load(cm["data"]["config.conf"])
    assert isinstance(doc, dict)
    return doc


def decode(doc: dict[str, Any]) -> v1alpha1.Decoded:
    return v1alpha1.decode(doc, "config.conf")


def config(doc: dict[str, Any], **flags: Any) -> ProxyConfig:
    file = decode(doc)
    file.values.pop("kubeconfig", None)  # the path exists only inside the pod
    return build(file, flags)


@pytest.mark.parametrize("mode", ["", "iptables", "nftables", "ipvs"])
def test_kubeadms_configmap_loads_with_upstreams_defaults(mode: str) -> None:
    doc = kubeadm_config()
    doc["mode"] = mode
    file = decode(doc)
    assert file.warnings == []
    assert file.values["kubeconfig"] == "/var/lib/kube-proxy/kubeconfig.conf"
    cfg = config(doc)
    assert cfg.mode == (mode or "iptables")
    # The zero values, defaulted as upstream defaults them:
    assert cfg.healthz_bind_address == "0.0.0.0:10256"
    assert cfg.metrics_bind_address == "127.0.0.1:10249"
    assert cfg.detect_local_mode == "ClusterCIDR"
    assert cfg.cluster_cidrs == ("10.244.0.0/16",)
    assert cfg.sync_period == 30.0
    # ipvs.minSyncPeriod has no default upstream: 0, a sync per change.
    assert cfg.min_sync_period == (0.0 if mode == "ipvs" else 1.0)
    assert (cfg.masquerade_bit, cfg.masquerade_all, cfg.localhost_nodeports) == (14, False, True)
    assert cfg.oom_score_adj == -999
    assert (cfg.conntrack_max_per_core, cfg.conntrack_min) == (32768, 131072)
    assert cfg.conntrack_tcp_established_timeout == 86400.0
    assert cfg.conntrack_tcp_close_wait_timeout == 3600.0
    assert (cfg.conntrack_udp_timeout, cfg.conntrack_udp_stream_timeout) == (0.0, 0.0)
    assert cfg.bind_address == "0.0.0.0" and cfg.verbosity == 0


@pytest.mark.parametrize(
    ("mode", "section"), [("nftables", "nftables"), ("iptables", "iptables"), ("ipvs", "iptables")]
)
def test_the_modes_section_is_the_one_read(mode: str, section: str) -> None:
    doc = kubeadm_config()
    doc["mode"] = mode
    for name in ("iptables", "nftables"):
        doc[name].update(masqueradeAll=name == section, masqueradeBit=9 if name == section else 3)
    doc["ipvs"]["syncPeriod"] = "11s"
    doc["nftables"]["syncPeriod"] = "12s"
    doc["iptables"]["syncPeriod"] = "13s"
    cfg = config(doc)
    assert (cfg.masquerade_all, cfg.masquerade_bit) == (True, 9)
    assert cfg.sync_period == {"ipvs": 11.0, "nftables": 12.0, "iptables": 13.0}[mode]


def test_a_bare_ip_gets_the_default_port_and_ipv6_defaults_follow_bind_address() -> None:
    doc = kubeadm_config()
    doc.update(healthzBindAddress="10.0.0.5", metricsBindAddress="::1")
    cfg = config(doc)
    assert (cfg.healthz_bind_address, cfg.metrics_bind_address) == ("10.0.0.5:10256", "[::1]:10249")
    doc = kubeadm_config()
    doc["bindAddress"] = "fd00::5"
    cfg = config(doc)
    assert (cfg.healthz_bind_address, cfg.metrics_bind_address) == ("[::]:10256", "[::1]:10249")


# A value other than upstream's default, for every field (valid, so an implemented field's
# effect can be checked through validation).
SAMPLES: dict[str, Any] = {
    "featureGates": {"PreferSameTrafficDistribution": False},
    "clientConnection.kubeconfig": "KUBECONFIG",
    "clientConnection.acceptContentTypes": "application/json",
    "clientConnection.contentType": "application/json",
    "clientConnection.qps": 50.0,
    "clientConnection.burst": 100,
    "logging.format": "json",
    "logging.flushFrequency": "1s",
    "logging.verbosity": 4,
    "logging.vmodule": [{"filePattern": "proxier*", "verbosity": 5}],
    "logging.options.text.splitStream": True,
    "logging.options.text.infoBufferSize": "64Ki",
    "logging.options.json.splitStream": True,
    "logging.options.json.infoBufferSize": "64Ki",
    "hostnameOverride": "worker-7",
    "bindAddress": "10.0.0.5",
    "healthzBindAddress": "127.0.0.1:20256",
    "metricsBindAddress": "0.0.0.0:20249",
    "bindAddressHardFail": True,
    "enableProfiling": True,
    "showHiddenMetricsForVersion": "1.36",
    "mode": "nftables",
    "iptables.masqueradeBit": 10,
    "iptables.masqueradeAll": True,
    "iptables.localhostNodePorts": False,
    "iptables.snatNodeInternalIP": True,
    "iptables.syncPeriod": "45s",
    "iptables.minSyncPeriod": "2s",
    "ipvs.syncPeriod": "45s",
    "ipvs.minSyncPeriod": "2s",
    "ipvs.scheduler": "lc",
    "ipvs.excludeCIDRs": ["192.0.2.0/24"],
    "ipvs.strictARP": True,
    "ipvs.tcpTimeout": "15m",
    "ipvs.tcpFinTimeout": "30s",
    "ipvs.udpTimeout": "5s",
    "nftables.masqueradeBit": 10,
    "nftables.masqueradeAll": True,
    "nftables.syncPeriod": "45s",
    "nftables.minSyncPeriod": "2s",
    "winkernel.networkName": "l2bridge",
    "winkernel.sourceVip": "10.0.0.9",
    "winkernel.enableDSR": True,
    "winkernel.rootHnsEndpointName": "cbr0",
    "winkernel.forwardHealthCheckVip": True,
    "detectLocalMode": "NodeCIDR",
    "detectLocal.bridgeInterface": "cbr0",
    "detectLocal.interfaceNamePrefix": "veth",
    "clusterCIDR": "10.100.0.0/16",
    "nodePortAddresses": ["192.168.0.0/16"],
    "oomScoreAdj": -500,
    "conntrack.maxPerCore": 1000,
    "conntrack.min": 1000,
    "conntrack.tcpEstablishedTimeout": "2h",
    "conntrack.tcpCloseWaitTimeout": "30m",
    "conntrack.tcpBeLiberal": True,
    "conntrack.udpTimeout": "30s",
    "conntrack.udpStreamTimeout": "2m",
    "configSyncPeriod": "5m",
    "portRange": "40000-40099",
    "windowsRunAsService": True,
    "udpIdleTimeout": "1s",
    "externalIPCIDRs": ["203.0.113.0/24"],
}


def test_every_field_has_a_sample() -> None:
    assert set(SAMPLES) == {f.path for f in FIELDS}


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        doc = doc.setdefault(p, {})
    doc[leaf] = value


@pytest.mark.parametrize("f", FIELDS, ids=[f.path for f in FIELDS])
def test_every_field_is_implemented_or_warned(f: v1alpha1.Field, tmp_path: Path) -> None:
    base = kubeadm_config()
    # A mode in which the field is read.
    base["mode"] = f.modes[0] if f.modes else "iptables"
    doc = copy.deepcopy(base)
    value = SAMPLES[f.path]
    if f.path == "clientConnection.kubeconfig":
        value = str(tmp_path / "kubeconfig")
        Path(value).write_text("apiVersion: v1\nkind: Config\n")
    _set(doc, f.path, value)
    before, after = decode(base), decode(doc)
    if f.use in (Use.WARNED, Use.WINDOWS):
        (warning,) = after.warnings
        assert f"config.conf: {f.path}=" in warning and "not implemented" in warning
        assert after.values == before.values
        return
    if f.path == "featureGates":
        (warning,) = after.warnings
        assert "PreferSameTrafficDistribution=false is not implemented" in warning
        return
    assert after.warnings == []
    if f.attr is None:
        # Implemented without a setting: kproxy writes every log line at once, within any
        # flush period or buffer size.
        assert after.values == before.values
        return
    assert after.values[f.attr] != before.values[f.attr]
    assert after.origins[f.attr] == f.path
    # It validates, and reaches the configuration.
    before.values.pop("kubeconfig")
    if f.attr != "kubeconfig":
        after.values.pop("kubeconfig")
    cfg = build(after, {})
    assert getattr(cfg, f.attr) != getattr(build(before, {}), f.attr)


def test_unknown_keys_are_reported_with_their_path() -> None:
    doc = kubeadm_config()
    doc["iptables"]["masqueradeAl"] = True
    doc["conntrack"]["maxPerCPU"] = 4
    doc["someFutureField"] = {"a": 1}
    file = decode(doc)
    assert file.warnings == [
        # In the file's order.
        "config.conf: unknown fields ignored: conntrack.maxPerCPU, iptables.masqueradeAl, "
        "someFutureField"
    ]
    # The rest of the file is used.
    assert file.values["cluster_cidrs"] == ("10.244.0.0/16",)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("iptables.syncPeriod", 30, "expected a duration such as 30s"),
        ("iptables.masqueradeBit", "14", "expected int32"),
        ("iptables.masqueradeBit", 2**31, "does not fit int32"),
        ("iptables.masqueradeAll", "true", "expected boolean"),
        ("conntrack.tcpEstablishedTimeout", "-1h", "must not be negative"),
        ("conntrack.maxPerCore", 1.5, "expected int32"),
        ("nodePortAddresses", "10.0.0.0/8", "expected list of strings"),
        ("logging.verbosity", -1, "does not fit uint32"),
        ("clientConnection", "kubeconfig", "expected a mapping"),
    ],
)
def test_a_wrong_value_is_an_error_naming_the_field(path: str, value: Any, message: str) -> None:
    doc = kubeadm_config()
    _set(doc, path, value)
    with pytest.raises(ConfigError) as info:
        decode(doc)
    assert (info.value.source, info.value.field) == ("config.conf", path)
    assert message in info.value.message


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("mode", "kernelspace", "unknown mode"),
        ("iptables.masqueradeBit", 40, "not in 0..31"),
        ("oomScoreAdj", 1001, "not in -1000..1000"),
        ("detectLocalMode", "LocalCIDR", "is not one of"),
        ("healthzBindAddress", "localhost:10256", "is not an IP address"),
        ("clusterCIDR", "10.0.0.0/8,10.1.0.0/16", "at most one CIDR per IP family"),
        ("ipvs.scheduler", "fifo", "unknown scheduler"),
    ],
)
def test_a_value_upstream_refuses_is_an_error_naming_the_field(
    path: str, value: Any, message: str
) -> None:
    doc = kubeadm_config()
    doc["mode"] = "ipvs" if path.startswith("ipvs") else doc["mode"]
    _set(doc, path, value)
    with pytest.raises(ConfigError) as info:
        config(doc)
    assert (info.value.source, info.value.field) == ("config.conf", path)
    assert message in info.value.message


@pytest.mark.parametrize("mode", ["iptables", "nftables", "ipvs", "userspace"])
def test_the_written_config_reads_back_the_same(mode: str) -> None:
    cfg = build(
        None,
        {
            "mode": mode,
            "hostname_override": "worker-1",
            "cluster_cidrs": ("10.244.0.0/16", "fd00:10:244::/56"),
            "sync_period": 45.0,
            "min_sync_period": 0.5,
            "masquerade_all": True,
            "masquerade_bit": 12,
            "nodeport_addresses": ("primary",),
            "conntrack_tcp_close_wait_timeout": 1800.0,
            "ipvs_tcp_timeout": 900.0,
            "oom_score_adj": -10,
            "feature_gates": {"NFTablesNetlink": True},
            "udp_idle_timeout": 0.5,
        },
    )
    doc = yaml.safe_load(yaml.safe_dump(v1alpha1.encode(cfg)))
    file = decode(doc)
    assert file.warnings == []
    assert build(file, {}) == cfg


def test_the_docs_hold_the_generated_field_table() -> None:
    text = DOCS.read_text()
    assert v1alpha1.field_table() in text, (
        "docs/configuration.md is out of date: python -m kproxy.v1alpha1 prints the table"
    )


def test_the_schema_knows_every_section_it_walks() -> None:
    assert v1alpha1.SECTIONS["iptables"] >= {"masqueradeBit", "syncPeriod", "minSyncPeriod"}
    assert v1alpha1.SECTIONS["logging.options"] == {"text", "json"}
    assert all(f.kind in Kind for f in FIELDS)
