"""``kproxy doctor``'s checks against a node made of stand-ins: each check's ok and its
failure, and the report and exit status (the real kernel's side: tests/privileged)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from kproxy import doctor
from kproxy.config import ProxyConfig, build
from kproxy.doctor import FAIL, OK, WARN, Node, Result
from kproxy.model import IPVS_SCHEDULER_ANNOTATION
from kproxy.nodesetup import Proc
from tests import k8sobjects as k

ALL_TOOLS = {"iptables", "iptables-restore", "iptables-save", "ip6tables-restore", "ip", "nft",
             "ipset", "conntrack", "modinfo"}  # fmt: skip


def cfg(mode: str, **flags: object) -> ProxyConfig:
    return build(None, {"mode": mode, "hostname_override": "n", **flags})


def fake_proc(tmp_path: Path, files: Mapping[str, str]) -> Proc:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return Proc(tmp_path)


def node(
    tmp_path: Path,
    *,
    files: Mapping[str, str] | None = None,
    outputs: Mapping[str, tuple[int, str]] | None = None,
    tools: set[str] = ALL_TOOLS,
    read_only: Sequence[str] = (),
    nofile: tuple[int, int] = (1 << 20, 1 << 20),
) -> Node:
    """``outputs``: a command line (joined by spaces) -> (exit status, output); any other
    command fails, as a missing chain or table does."""
    base = {"proc/sys/net/netfilter/nf_conntrack_max": "262144\n",
            "proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established": "86400\n",
            "proc/sys/net/ipv4/conf/all/route_localnet": "0\n"}  # fmt: skip
    answers = {"iptables --version": (0, "iptables v1.8.9 (nf_tables)"),
               "nft --version": (0, "nftables v1.0.6 (Lester Gooch #5)"),
               "nft list ruleset": (0, "")}  # fmt: skip
    answers.update(outputs or {})

    def run(argv: Sequence[str]) -> Result:
        rc, out = answers.get(" ".join(argv), (1, ""))
        return Result(out, rc)

    ro = {tmp_path / p for p in read_only}
    writable: Callable[[Path], bool] = lambda p: p not in ro  # noqa: E731
    return Node(
        proc=fake_proc(tmp_path, {**base, **(files or {})}),
        run=run,
        which=lambda t: f"/usr/sbin/{t}" if t in tools else None,
        nofile=lambda: nofile,
        kernel="6.1.0-test",
        cpus=2,
        writable=writable,
    )


def find(checks: list[doctor.Check], name: str) -> doctor.Check:
    (c,) = [c for c in checks if c.name == name]
    return c


def test_a_healthy_iptables_node_is_ready(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = node(tmp_path)
    assert doctor.doctor_command(cfg("iptables"), node=n) == 0
    out = capsys.readouterr().out
    assert out.endswith("iptables mode: ready\n")
    assert "ok    kernel" in out and "6.1.0-test" in out


def test_missing_tools_fail_the_mode_that_runs_them(tmp_path: Path) -> None:
    n = node(tmp_path, tools=ALL_TOOLS - {"ipset"})
    c = find(doctor.checks(cfg("ipvs"), n), "tools")
    assert c.status == FAIL and "ipset: not found" in c.detail
    assert find(doctor.checks(cfg("iptables"), n), "tools").status == OK
    no_conntrack = node(tmp_path, tools=ALL_TOOLS - {"conntrack"})
    c = find(doctor.checks(cfg("nftables"), no_conntrack), "tools")
    assert c.status == WARN and "stale UDP flows" in c.detail


def test_the_iptables_backend_must_be_the_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KPROXY_IPTABLES_BACKEND", raising=False)
    hint = ":KUBE-IPTABLES-HINT - [0:0]\n"
    n = node(tmp_path, outputs={"iptables-legacy-save": (0, "*mangle\n" + hint + "COMMIT\n")})
    c = find(doctor.checks(cfg("iptables"), n), "iptables-backend")
    assert c.status == FAIL and "iptables-nft rules, but this node uses iptables-legacy" in c.detail
    monkeypatch.setenv("KPROXY_IPTABLES_BACKEND", "auto")
    c = find(doctor.checks(cfg("iptables"), n), "iptables-backend")
    assert c.status == OK and c.detail.startswith("legacy, chosen at start")


def test_nft_too_old_or_unable_to_read_the_ruleset(tmp_path: Path) -> None:
    old = node(tmp_path, outputs={"nft --version": (0, "nftables v0.9.8 (E.D.S.)")})
    c = find(doctor.checks(cfg("nftables"), old), "nft")
    assert c.status == FAIL and "needs 1.0.1 or later" in c.detail
    skew = node(
        tmp_path,
        outputs={"nft list ruleset": (1, "Error: unknown expression type 'inner'\n")},
    )
    c = find(doctor.checks(cfg("nftables"), skew), "nft")
    assert c.status == FAIL and "version skew" in c.detail and "inner" in c.detail


def test_conntrack_missing_or_too_small_for_what_is_asked(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    bare = node(tmp_path / "a")
    (tmp_path / "a/proc/sys/net/netfilter/nf_conntrack_max").unlink()
    assert find(doctor.checks(cfg("iptables"), bare), "conntrack").status == FAIL
    small = node(tmp_path, files={"proc/sys/net/netfilter/nf_conntrack_max": "1000\n"},
                 read_only=["proc/sys/net/netfilter/nf_conntrack_max"])  # fmt: skip
    c = find(doctor.checks(cfg("iptables"), small), "conntrack")
    # max(2 CPUs x 32768 per core, conntrack.min 131072) > 1000, and the file is the host's.
    assert c.status == WARN and "kproxy asks 131072" in c.detail, c
    c = find(doctor.checks(cfg("iptables", conntrack_max_per_core=0), small), "conntrack")
    assert c.status == OK


def test_read_only_sysctls(tmp_path: Path) -> None:
    ro = node(tmp_path, read_only=["proc/sys/net/ipv4/conf/all/route_localnet"])
    c = find(doctor.checks(cfg("iptables"), ro), "sysctls")
    assert c.status == FAIL and "net.ipv4.conf.all.route_localnet" in c.detail
    # Without localhost NodePorts route_localnet is not needed.
    off = cfg("iptables", localhost_nodeports=False)
    assert find(doctor.checks(off, ro), "sysctls").status == OK


def test_ipvs_module_and_scheduler(tmp_path: Path) -> None:
    none = node(tmp_path)
    c = find(doctor.checks(cfg("ipvs"), none), "ipvs")
    assert c.status == FAIL and "no ip_vs module" in c.detail
    loadable = node(tmp_path, outputs={"modinfo -n ip_vs": (0, "/lib/modules/x/ip_vs.ko")})
    assert "modprobe ip_vs" in find(doctor.checks(cfg("ipvs"), loadable), "ipvs").detail
    (tmp_path / "b").mkdir()
    loaded = node(tmp_path / "b", files={"proc/net/ip_vs": "", "sys/module/ip_vs_rr/x": ""})
    assert find(doctor.checks(cfg("ipvs"), loaded), "ipvs").status == OK
    c = find(doctor.checks(cfg("ipvs", ipvs_scheduler="mh"), loaded), "ipvs")
    assert c.status == FAIL and "ip_vs_mh" in c.detail


def test_other_proxies(tmp_path: Path) -> None:
    kube = node(tmp_path, outputs={"iptables -t nat -S KUBE-SERVICES": (0, "-N KUBE-SERVICES")})
    c = find(doctor.checks(cfg("nftables"), kube), "other-proxies")
    assert c.status == OK and "kproxy takes them over" in c.detail
    cilium = node(tmp_path, outputs={"iptables -t nat -S CILIUM_PRE_nat": (0, "-N CILIUM_PRE_nat")})
    c = find(doctor.checks(cfg("iptables"), cilium), "other-proxies")
    assert c.status == WARN and "CILIUM_PRE_nat" in c.detail


def test_userspace_open_file_limit(tmp_path: Path) -> None:
    low = node(tmp_path, nofile=(1024, 4096))
    c = find(doctor.checks(cfg("userspace"), low), "open-files")
    assert c.status == WARN and "about 682 relayed connections" in c.detail
    names = [c.name for c in doctor.checks(cfg("userspace"), low)]
    assert "conntrack" not in names and "sysctls" not in names  # no kernel rules


def test_json_report_and_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = node(tmp_path)
    assert doctor.doctor_command(cfg("ipvs"), as_json=True, node=n) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["mode"] == "ipvs" and doc["ready"] is False
    statuses = {c["name"]: c["status"] for c in doc["checks"]}
    assert statuses["ipvs"] == FAIL and statuses["kernel"] == OK


def write_manifests(tmp_path: Path) -> Path:
    d = tmp_path / "manifests"
    d.mkdir()
    sched = k.service("sched", "10.96.0.11", [k.port("http", 80)])
    sched["metadata"]["annotations"] = {IPVS_SCHEDULER_ANNOTATION: "wrr"}
    objs = [
        k.service("old", "10.96.0.10", [k.port("http", 80)], externalIPs=["198.51.100.7"]),
        sched,
        k.service("plain", "10.96.0.12", [k.port("http", 80)]),
    ]
    (d / "all.json").write_text(json.dumps({"kind": "List", "items": objs}))
    return d


def test_the_cluster_section_lists_what_upstream_is_removing(tmp_path: Path) -> None:
    d = str(write_manifests(tmp_path))
    (c,) = doctor.cluster_checks(cfg("iptables", manifests=d))
    assert (
        c.status == WARN and "1 Services use externalIPs" in c.detail and "default/old" in c.detail
    )
    assert "1 Services pick an IPVS scheduler" in c.detail and "default/sched" in c.detail
    checks = doctor.cluster_checks(cfg("ipvs", manifests=d))
    assert "the ipvs mode is deprecated upstream" in find(checks, "deprecations").detail
    assert find(checks, "ipset-sizes").status == OK
    (tmp_path / "empty").mkdir()
    (plain,) = doctor.cluster_checks(cfg("nftables", manifests=str(tmp_path / "empty")))
    assert plain.status == OK and plain.detail == "none in use by 0 Services"


def test_a_set_over_its_maxelem_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The restore text of a full sync: a scratch set filled, then swapped in (a bitmap set,
    # which has no maxelem, in between).
    restore = "\n".join([
        "create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 2",
        "create SWAP hash:ip,port family inet hashsize 1024 maxelem 2",
        *(f"add SWAP 10.96.0.{i},tcp:80" for i in range(3)),
        "swap SWAP KUBE-CLUSTER-IP", "destroy SWAP",
        "create KUBE-NODE-PORT-TCP bitmap:port range 0-65535",
        "create SWAP bitmap:port range 0-65535", "add SWAP 30080",
        "swap SWAP KUBE-NODE-PORT-TCP", "destroy SWAP",
    ])  # fmt: skip

    class Engine:
        def ipvs_parts(self) -> tuple[list[str], str, str]:
            return [], "", restore

    class Programmed:
        def __init__(self) -> None:
            self.engines = {"IPv4": Engine()}

    monkeypatch.setattr(doctor, "programmed", lambda *a: Programmed())
    d = str(write_manifests(tmp_path))
    c = find(doctor.cluster_checks(cfg("ipvs", manifests=d)), "ipset-sizes")
    assert c.status == FAIL and c.detail == "over maxelem: KUBE-CLUSTER-IP (3 > 2)", c


def test_an_unreachable_api_server_is_a_failed_check_not_a_traceback() -> None:
    (c,) = doctor.cluster_checks(cfg("nftables", master="http://127.0.0.1:1"))
    assert c.name == "cluster" and c.status == FAIL
    assert "cannot read the cluster's objects" in c.detail and "127.0.0.1:1" in c.detail
