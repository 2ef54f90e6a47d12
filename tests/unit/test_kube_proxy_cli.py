"""``kube-proxy``: upstream's command line (kube-proxy-features.md §1.14, §1.16).

Every upstream flag is accepted: an implemented one changes the configuration (checked here,
flag by flag), an unimplemented one is warned about by name and ignored. With ``--config``
the file decides, except for ``--hostname-override``, ``--master`` and the logging flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kproxy import kube_proxy, nodesetup
from kproxy.config import ProxyConfig
from kproxy.kube_proxy import BY_NAME, FLAGS, resolve
from kproxy.upstream import UPSTREAM_VERSION

FIXTURE = Path(__file__).parents[1] / "fixtures" / "kubeadm-kube-proxy-configmap.yaml"

# Upstream's flags on Linux (cmd/kube-proxy/app/options.go, logsapi.AddFlags).
UPSTREAM_FLAGS = """
--config --write-config-to --cleanup --init-only --feature-gates --kubeconfig --master
--kube-api-content-type --kube-api-burst --kube-api-qps --config-sync-period
--hostname-override --bind-address --healthz-bind-address --metrics-bind-address
--bind-address-hard-fail --profiling --show-hidden-metrics-for-version --proxy-mode
--iptables-masquerade-bit --masquerade-all --iptables-localhost-nodeports
--iptables-sync-period --iptables-min-sync-period --ipvs-sync-period --ipvs-min-sync-period
--ipvs-scheduler --ipvs-exclude-cidrs --ipvs-strict-arp --ipvs-tcp-timeout
--ipvs-tcpfin-timeout --ipvs-udp-timeout --detect-local-mode --pod-bridge-interface
--pod-interface-name-prefix --cluster-cidr --nodeport-addresses --oom-score-adj
--conntrack-max-per-core --conntrack-min --conntrack-tcp-timeout-established
--conntrack-tcp-timeout-close-wait --conntrack-tcp-be-liberal --conntrack-udp-timeout
--conntrack-udp-timeout-stream --healthz-port --metrics-port --v --vmodule --logging-format
--log-flush-frequency --log-text-split-stream --log-text-info-buffer-size
--log-json-split-stream --log-json-info-buffer-size --version
""".split()  # noqa: SIM905 (a list as upstream prints it)

# A value other than the default for every flag, as typed on a command line.
SAMPLES = {
    "--feature-gates": "KubeProxyIPVS=false",
    "--kubeconfig": "KUBECONFIG",
    "--master": "https://10.0.0.1:6443",
    "--kube-api-content-type": "application/json",
    "--kube-api-burst": "100",
    "--kube-api-qps": "50",
    "--config-sync-period": "5m",
    "--hostname-override": "Worker-9",
    "--bind-address": "10.0.0.5",
    "--healthz-bind-address": "127.0.0.1:20256",
    "--metrics-bind-address": "0.0.0.0:20249",
    "--bind-address-hard-fail": "true",
    "--profiling": "true",
    "--show-hidden-metrics-for-version": "1.36",
    "--proxy-mode": "nftables",
    "--iptables-masquerade-bit": "10",
    "--masquerade-all": "true",
    "--iptables-localhost-nodeports": "false",
    "--iptables-sync-period": "45s",
    "--iptables-min-sync-period": "2s",
    "--ipvs-sync-period": "45s",
    "--ipvs-min-sync-period": "2s",
    "--ipvs-scheduler": "lc",
    "--ipvs-exclude-cidrs": "192.0.2.0/24",
    "--ipvs-strict-arp": "true",
    "--ipvs-tcp-timeout": "15m",
    "--ipvs-tcpfin-timeout": "30s",
    "--ipvs-udp-timeout": "5s",
    "--detect-local-mode": "NodeCIDR",
    "--pod-bridge-interface": "cbr0",
    "--pod-interface-name-prefix": "veth",
    "--cluster-cidr": "10.100.0.0/16",
    "--nodeport-addresses": "192.168.0.0/16",
    "--oom-score-adj": "-500",
    "--conntrack-max-per-core": "1000",
    "--conntrack-min": "1000",
    "--conntrack-tcp-timeout-established": "2h",
    "--conntrack-tcp-timeout-close-wait": "30m",
    "--conntrack-tcp-be-liberal": "true",
    "--conntrack-udp-timeout": "30s",
    "--conntrack-udp-timeout-stream": "2m",
    "--healthz-port": "0",
    "--metrics-port": "0",
    "--v": "4",
    "--vmodule": "proxier*=5",
    "--logging-format": "json",
    "--log-text-split-stream": "true",
    "--log-json-split-stream": "true",
}
_LIFECYCLE = {"--config", "--write-config-to", "--cleanup", "--init-only", "--version"}
# Accepted without effect or warning: kproxy writes every line at once.
_HARMLESS = {"--log-flush-frequency", "--log-text-info-buffer-size", "--log-json-info-buffer-size"}


def test_every_upstream_flag_is_accepted() -> None:
    assert sorted(UPSTREAM_FLAGS) == sorted(f.name for f in FLAGS)


def test_every_flag_has_a_sample() -> None:
    assert set(SAMPLES) == set(BY_NAME) - _LIFECYCLE - _HARMLESS


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_flag_is_implemented_or_warned(name: str, tmp_path: Path) -> None:
    f = BY_NAME[name]
    value = SAMPLES[name]
    if name == "--kubeconfig":
        value = str(tmp_path / "kubeconfig")
        Path(value).write_text("apiVersion: v1\nkind: Config\n")
    mode = ["--proxy-mode", "ipvs"] if f.modes == "ipvs" else []
    base = resolve(mode)
    inv = resolve([*mode, f"{name}={value}"])
    if f.attr is None:
        if name in ("--healthz-port", "--metrics-port"):
            # Deprecated, still implemented: port 0 turns the server off.
            attr = "healthz_bind_address" if name == "--healthz-port" else "metrics_bind_address"
            assert getattr(inv.cfg, attr) == "" != getattr(base.cfg, attr)
            return
        (warning,) = inv.warnings
        assert f"flag {name} is not implemented" in warning
        assert inv.cfg == base.cfg
        return
    assert getattr(inv.cfg, f.attr) != getattr(base.cfg, f.attr)
    assert inv.warnings == []


def test_feature_gates_kproxy_does_not_honour_are_warned() -> None:
    gates = "NFTablesNetlink=true,Foo=true,PreferSameTrafficDistribution=false"
    inv = resolve([f"--feature-gates={gates}"])
    assert inv.cfg.feature_gates == {
        "NFTablesNetlink": True,
        "Foo": True,
        "PreferSameTrafficDistribution": False,
    }
    assert inv.warnings == [
        "--feature-gates: feature gate Foo=true is not read by kproxy",
        "--feature-gates: feature gate PreferSameTrafficDistribution=false is not implemented "
        "(kproxy behaves as PreferSameTrafficDistribution=true: trafficDistribution "
        "PreferSameNode)",
    ]


def test_the_per_mode_sync_flags_follow_the_mode() -> None:
    argv = ["--iptables-sync-period=11s", "--ipvs-sync-period=12s"]
    assert resolve(argv).cfg.sync_period == 11.0
    assert resolve([*argv, "--proxy-mode=nftables"]).cfg.sync_period == 11.0
    assert resolve([*argv, "--proxy-mode=ipvs"]).cfg.sync_period == 12.0


def kubeadm_conf(tmp_path: Path, **changes: Any) -> str:
    cm = yaml.safe_load(FIXTURE.read_text())
    doc = yaml.safe_load(cm["data"]["config.conf"])
    kubeconfig = tmp_path / "kubeconfig.conf"
    kubeconfig.write_text(cm["data"]["kubeconfig.conf"])
    doc["clientConnection"]["kubeconfig"] = str(kubeconfig)
    doc.update(changes)
    path = tmp_path / "config.conf"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_with_config_the_file_decides_but_hostname_master_and_logging_apply(
    tmp_path: Path,
) -> None:
    conf = kubeadm_conf(tmp_path)
    inv = resolve(
        [f"--config={conf}", "--hostname-override=Node-A", "--masquerade-all",
         "--iptables-sync-period=5s", "-v=3", "--master=https://10.0.0.1:6443"]
    )  # fmt: skip
    cfg = inv.cfg
    assert (cfg.node_name, cfg.verbosity, cfg.master) == ("node-a", 3, "https://10.0.0.1:6443")
    assert (cfg.masquerade_all, cfg.sync_period) == (False, 30.0)  # the file's
    assert cfg.config_file == conf
    assert inv.warnings == [
        "flags ignored because --config is given (as upstream): --masquerade-all, "
        "--iptables-sync-period"
    ]


def test_write_config_to_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kproxy.logs.setup", lambda verbosity, fmt="text": None)
    out = tmp_path / "written.yaml"
    argv = [
        "--proxy-mode=nftables", "--masquerade-all", "--cluster-cidr=10.244.0.0/16",
        "--iptables-sync-period=45s", "--conntrack-min=5000", "--hostname-override=n1",
    ]  # fmt: skip
    assert kube_proxy.main([*argv, f"--write-config-to={out}"]) == 0
    written = resolve([f"--config={out}"])
    assert written.warnings == []
    assert written.cfg == ProxyConfig(**{**vars_of(resolve(argv).cfg), "config_file": str(out)})


def vars_of(cfg: ProxyConfig) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in cfg.__dataclass_fields__}


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert kube_proxy.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"Kubernetes {UPSTREAM_VERSION} (kproxy ")
    assert kube_proxy.main(["--version=raw"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["gitVersion"] == UPSTREAM_VERSION


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--no-such-flag"], "--no-such-flag"),
        (["--iptables-sync-period=fast"], "--iptables-sync-period"),
        (["--masquerade-all=maybe"], "--masquerade-all"),
        (["--feature-gates=Foo"], "--feature-gates"),
    ],
)
def test_a_bad_flag_exits_2_with_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        kube_proxy.main(argv)
    assert info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert needle in line


def test_a_bad_file_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = kubeadm_conf(tmp_path, oomScoreAdj=5000)
    assert kube_proxy.main([f"--config={conf}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"kube-proxy: error: {conf}: oomScoreAdj: 5000 is not in -1000..1000"
    )


def test_cleanup_and_init_only_do_their_job_and_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr("kproxy.logs.setup", lambda verbosity, fmt="text": None)

    def record(what: str) -> int:
        calls.append(what)
        return 0

    monkeypatch.setattr("kproxy.lifecycle.cleanup", lambda: record("cleanup"))
    monkeypatch.setattr(nodesetup, "apply", lambda cfg, **kw: calls.append(f"setup {cfg.mode}"))
    init_node = "kproxy.backends.ipvs.IpvsMode.init_node"  # the mode's part of --init-only
    monkeypatch.setattr(init_node, lambda self: calls.append("mode"))
    monkeypatch.setattr("kproxy.daemon.run", lambda cfg: record("daemon"))
    conf = kubeadm_conf(tmp_path, mode="ipvs")
    assert kube_proxy.main(["--cleanup"]) == 0
    assert kube_proxy.main([f"--config={conf}", "--init-only"]) == 0
    assert calls == ["cleanup", "setup ipvs", "mode"]
    assert kube_proxy.main([f"--config={conf}"]) == 0
    assert calls[-1] == "daemon"
