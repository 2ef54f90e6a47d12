"""Tests for the command line: ``kproxy version`` and ``kproxy daemon``'s flags.

Every invalid flag value, config file or manifests directory must exit with status 2 and one
line on stderr starting ``kproxy: error:`` that names the flag or field, before any daemon starts.
``kproxy.daemon.run`` (the daemon) is replaced in every test here.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

import kproxy
from kproxy import commands
from kproxy.config import ProxyConfig

HEADER = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"


@pytest.fixture
def no_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the daemon is started."""

    def run(cfg: ProxyConfig) -> int:
        pytest.fail(f"the daemon was started with {cfg!r}")

    monkeypatch.setattr("kproxy.daemon.run", run)


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch) -> list[ProxyConfig]:
    """Record the configurations the daemon is started with (and do not touch logging)."""
    started: list[ProxyConfig] = []

    def run(cfg: ProxyConfig) -> int:
        started.append(cfg)
        return 0

    monkeypatch.setattr("kproxy.daemon.run", run)
    monkeypatch.setattr("kproxy.logs.setup", lambda verbosity, fmt="text": None)
    return started


def invoke(argv: Sequence[str]) -> int:
    """``commands.main(argv)``'s exit status, whether returned or raised as SystemExit."""
    try:
        return commands.main(list(argv))
    except SystemExit as e:
        assert isinstance(e.code, int)
        return e.code


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line written to stderr (nothing on stdout)."""
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kproxy: error:")
    return lines[0]


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------------------------
# version


def test_version(capsys: pytest.CaptureFixture[str], no_daemon: None) -> None:
    assert invoke(["version"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"kproxy {kproxy.__version__} (core ")
    assert out.count("\n") == 1
    assert err == ""


def test_version_in_a_subprocess() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kproxy", "version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"kproxy {kproxy.__version__} ")


# --------------------------------------------------------------------------------------------
# Invalid command lines


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (["--proxy-mode", "bogus"], "--proxy-mode"),
        (["--proxy-mode=ipvs", "--ipvs-scheduler", "fifo"], "--ipvs-scheduler"),
        (["--ipvs-tcp-timeout", "soon"], "--ipvs-tcp-timeout"),
        (["--min-sync-period", "5"], "--min-sync-period"),
        (["--min-sync-period", "-1s"], "--min-sync-period"),
        (["--min-sync-period", "1m"], "--min-sync-period"),  # greater than the 30s sync period
        (["--iptables-min-sync-period", "soon"], "--iptables-min-sync-period"),
        (["--sync-period", "0s"], "--sync-period"),
        (["--cluster-cidr", "10.0.0.0/33"], "--cluster-cidr"),
        (["--cluster-cidr", "10.0.0.0/8,192.168.0.0/16"], "--cluster-cidr"),
        (["--healthz-bind-address", "localhost:10256"], "--healthz-bind-address"),
        (["--healthz-bind-address", "0.0.0.0"], "--healthz-bind-address"),
        (["--masquerade-all=yes"], "--masquerade-all"),
        (["--iptables-masquerade-bit", "x"], "--iptables-masquerade-bit"),
        (["--iptables-masquerade-bit", "32"], "--iptables-masquerade-bit"),
        (["-v", "x"], "-v"),
        (["--v=11"], "-v"),
        (["--nodeport-addresses", "primary,bogus"], "--nodeport-addresses"),
        (["--no-such-flag"], "--no-such-flag"),
        (["--kubeconfig", "/nonexistent/kubeconfig"], "--kubeconfig"),
    ],
)
def test_invalid_flag(
    args: list[str], name: str, capsys: pytest.CaptureFixture[str], no_daemon: None
) -> None:
    assert invoke(["daemon", *args]) == 2
    assert name in error_line(capsys)


@pytest.mark.parametrize("argv", [[], ["bogus"], ["--no-such-flag", "daemon"]])
def test_invalid_command(
    argv: list[str], capsys: pytest.CaptureFixture[str], no_daemon: None
) -> None:
    assert invoke(argv) == 2
    error_line(capsys)


def test_invalid_flag_in_a_subprocess() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kproxy", "daemon", "--proxy-mode", "bogus"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kproxy: error:")
    assert "--proxy-mode" in lines[0]


def test_abbreviated_flag_is_unknown(
    capsys: pytest.CaptureFixture[str], daemon: list[ProxyConfig]
) -> None:
    assert invoke(["daemon", "--proxy", "iptables"]) == 2
    assert daemon == []
    assert "--proxy" in error_line(capsys)


def test_config_file_that_does_not_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_daemon: None
) -> None:
    assert invoke(["daemon", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "--config" in error_line(capsys)


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("apiVersion: v1\nkind: ConfigMap\n", "--config"),
        (HEADER + 'iptables:\n  masqueradeAll: "yes"\n', "iptables.masqueradeAll"),
        (HEADER + "iptables:\n  minSyncPeriod: soon\n", "iptables.minSyncPeriod"),
        (HEADER + "mode: ipvs\nipvs:\n  scheduler: fifo\n", "config.yaml: ipvs.scheduler: "),
        (HEADER + "clusterCIDR: 10.0.0.0/8,10.1.0.0/16\n", "config.yaml: clusterCIDR: "),
    ],
    ids=["wrong-kind", "wrong-type", "bad-duration", "unknown-ipvs-scheduler", "two-v4-cidrs"],
)
def test_invalid_config_file(
    tmp_path: Path,
    text: str,
    name: str,
    capsys: pytest.CaptureFixture[str],
    no_daemon: None,
) -> None:
    assert invoke(["daemon", "--config", write(tmp_path, text)]) == 2
    assert name in error_line(capsys)


def test_config_file_that_is_not_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_daemon: None
) -> None:
    assert invoke(["daemon", "--config", write(tmp_path, HEADER + "mode: [iptables\n")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("kproxy: error: --config: ")


def test_config_file_that_is_not_yaml_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_daemon: None
) -> None:
    assert invoke(["daemon", "--config", write(tmp_path, HEADER + "mode: [iptables\n")]) == 2
    assert "--config" in error_line(capsys)


def test_manifests_that_is_not_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_daemon: None
) -> None:
    not_a_dir = write(tmp_path, "", "services.yaml")
    assert invoke(["daemon", "--manifests", not_a_dir]) == 2
    assert "--manifests" in error_line(capsys)
    assert invoke(["daemon", "--manifests", str(tmp_path / "absent")]) == 2
    assert "--manifests" in error_line(capsys)


# --------------------------------------------------------------------------------------------
# Valid command lines start the daemon once, with the flags' values


def test_defaults(daemon: list[ProxyConfig]) -> None:
    assert invoke(["daemon"]) == 0
    assert daemon == [ProxyConfig()]


def test_flags_reach_the_daemon(tmp_path: Path, daemon: list[ProxyConfig]) -> None:
    kubeconfig = write(tmp_path, "apiVersion: v1\nkind: Config\n", "kubeconfig")
    argv = [
        "daemon",
        "--proxy-mode", "iptables",
        "--kubeconfig", kubeconfig,
        "--master", "https://10.0.0.1:6443",
        "--manifests", str(tmp_path),
        "--hostname-override", "Node-1",
        "--bind-address", "192.168.0.10",
        "--cluster-cidr", "10.244.0.0/16, fd00:10:244::/56",
        "--detect-local-mode", "ClusterCIDR",
        "--min-sync-period", "500ms",
        "--sync-period", "1m",
        "--config-sync-period", "10m",
        "--healthz-bind-address", "127.0.0.1:10256",
        "--metrics-bind-address", "[::1]:10249",
        "--nodeport-addresses", "primary,192.168.0.0/16",
        "--masquerade-all",
        "--iptables-masquerade-bit", "15",
        "--conntrack-tcp-be-liberal=true",
        "--conntrack-tcp-timeout-established", "1h",
        "--udp-timeout", "500ms",
        "--proxy-port-range", "40000+999",
        "-v", "4",
    ]  # fmt: skip
    assert invoke(argv) == 0
    assert daemon == [
        ProxyConfig(
            mode="iptables",
            kubeconfig=kubeconfig,
            master="https://10.0.0.1:6443",
            manifests=str(tmp_path),
            hostname_override="Node-1",
            bind_address="192.168.0.10",
            cluster_cidrs=("10.244.0.0/16", "fd00:10:244::/56"),
            detect_local_mode="ClusterCIDR",
            min_sync_period=0.5,
            sync_period=60.0,
            config_sync_period=600.0,
            healthz_bind_address="127.0.0.1:10256",
            metrics_bind_address="[::1]:10249",
            nodeport_addresses=("primary", "192.168.0.0/16"),
            masquerade_all=True,
            masquerade_bit=15,
            conntrack_tcp_be_liberal=True,
            conntrack_tcp_established_timeout=3600.0,
            udp_idle_timeout=0.5,
            proxy_port_range="40000-40999",
            verbosity=4,
        )
    ]
    assert daemon[0].node_name == "node-1"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--masquerade-all"], True),
        (["--masquerade-all=true"], True),
        (["--masquerade-all=1"], True),
        (["--masquerade-all=false"], False),
        (["--masquerade-all=F"], False),
        ([], False),
    ],
)
def test_masquerade_all_boolean(args: list[str], expected: bool, daemon: list[ProxyConfig]) -> None:
    assert invoke(["daemon", *args]) == 0
    assert [cfg.masquerade_all for cfg in daemon] == [expected]


def test_iptables_sync_period_aliases(daemon: list[ProxyConfig]) -> None:
    argv = ["daemon", "--iptables-sync-period", "20s", "--iptables-min-sync-period", "2s"]
    assert invoke(argv) == 0
    assert [(c.sync_period, c.min_sync_period) for c in daemon] == [(20.0, 2.0)]


CONFIG = (
    HEADER
    + """\
hostnameOverride: From-File
clusterCIDR: 10.244.0.0/16
iptables:
  masqueradeAll: true
  masqueradeBit: 12
  syncPeriod: 10s
  minSyncPeriod: 2s
conntrack:
  tcpBeLiberal: true
logging:
  verbosity: 2
"""
)


def test_config_file_values_reach_the_daemon(tmp_path: Path, daemon: list[ProxyConfig]) -> None:
    path = write(tmp_path, CONFIG)
    assert invoke(["daemon", "--config", path]) == 0
    assert daemon == [
        ProxyConfig(
            config_file=path,
            hostname_override="From-File",
            cluster_cidrs=("10.244.0.0/16",),
            masquerade_all=True,
            masquerade_bit=12,
            sync_period=10.0,
            min_sync_period=2.0,
            conntrack_tcp_be_liberal=True,
            verbosity=2,
        )
    ]


def test_flags_override_the_config_file(tmp_path: Path, daemon: list[ProxyConfig]) -> None:
    argv = [
        "daemon",
        "--config", write(tmp_path, CONFIG),
        "--hostname-override", "From-Flag",
        "--masquerade-all=false",
        "--iptables-masquerade-bit", "13",
        "--min-sync-period", "5s",
        "-v", "4",
    ]  # fmt: skip
    assert invoke(argv) == 0
    (cfg,) = daemon
    # From the flags:
    assert cfg.hostname_override == "From-Flag"
    assert cfg.node_name == "from-flag"
    assert cfg.masquerade_all is False
    assert cfg.masquerade_bit == 13
    assert cfg.min_sync_period == 5.0
    assert cfg.verbosity == 4
    # From the file:
    assert cfg.sync_period == 10.0
    assert cfg.cluster_cidrs == ("10.244.0.0/16",)
    assert cfg.conntrack_tcp_be_liberal is True
    # Defaults:
    assert cfg.healthz_bind_address == "0.0.0.0:10256"


def test_unknown_config_field_is_only_a_warning(
    tmp_path: Path, daemon: list[ProxyConfig], caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, HEADER + "futureField: 1\n")
    assert invoke(["daemon", "--config", path]) == 0
    assert daemon == [ProxyConfig(config_file=path)]
    assert "futureField" in caplog.text


def test_daemon_exit_status_is_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kproxy.daemon.run", lambda cfg: 3)
    monkeypatch.setattr("kproxy.logs.setup", lambda verbosity, fmt="text": None)
    assert invoke(["daemon"]) == 3
