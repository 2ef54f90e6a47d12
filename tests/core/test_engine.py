"""The Rust engine through its Python binding, on the in-memory (Fake) kernel."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kproxy import _core
from kproxy.errors import ApplyError, CoreInputError, KproxyError, NetlinkError, UnsupportedError
from kproxy.model import Endpoint, EndpointSlice, PortSpec, Service, ServiceKey, SlicePort
from kproxy.tracker import ChangeSet, merge_slices

GOLDEN = Path(__file__).parent / "golden"
KEY = ServiceKey("ns1", "svc1")


def engine(**cfg: object) -> _core.Engine:
    base: dict[str, object] = {
        "family": "IPv4",
        "node_name": "test-node",
        "cluster_cidrs": ["10.0.0.0/8"],
        "backend": "fake",
    }
    base.update(cfg)
    return _core.Engine(json.dumps(base))


def svc(**kw: object) -> Service:
    fields: dict[str, object] = {
        "key": KEY,
        "ports": (PortSpec("p80", "TCP", 80, 3001),),
        "cluster_ips": ("172.30.0.41",),
        "externally_accessible": True,
    }
    fields.update(kw)
    return Service(**fields)  # type: ignore[arg-type]


def eps(*ips: str) -> ChangeSet:
    s = EndpointSlice(
        "ns1",
        "svc1-1",
        KEY,
        "IPv4",
        (SlicePort("p80", "TCP", 80),),
        tuple(Endpoint(i) for i in ips),
    )
    return ChangeSet(endpoints={KEY: merge_slices([s])})


def test_first_sync_is_full_and_writes_the_service() -> None:
    e = engine()
    r = e.sync(ChangeSet(services={KEY: svc()}).to_json())
    assert r.full and r.wrote and r.service_ports == 1
    e.sync(eps("10.180.0.1", "10.180.0.2").to_json())
    dump = e.dump()
    assert "--to-destination 10.180.0.1:80" in dump
    assert "--to-destination 10.180.0.2:80" in dump
    # Jump rules from the built-in chains exist after a full sync.
    assert (
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES' in dump
    )


def test_a_sync_with_nothing_changed_writes_nothing() -> None:
    e = engine()
    e.sync(ChangeSet(services={KEY: svc()}).to_json())
    r = e.sync(ChangeSet(services={KEY: svc()}).to_json())
    assert not r.wrote and r.services_changed == 0
    assert e.sync(b"{}", full=True).wrote  # a periodic full sync always writes


def test_removed_endpoints_and_services_leave_no_stale_chains() -> None:
    e = engine()
    e.sync(ChangeSet(services={KEY: svc()}).to_json())
    e.sync(eps("10.180.0.1", "10.180.0.2").to_json())
    r = e.sync(eps("10.180.0.2").to_json())
    assert isinstance(r.mode, _core.IptablesReport)
    assert r.mode.stale_chains_deleted == 1
    dump = e.dump()
    assert "10.180.0.1" not in dump
    r = e.sync(ChangeSet(services={KEY: None}).to_json())
    dump = e.dump()
    # KUBE-SVC, KUBE-EXT, the last KUBE-SEP, and the bucket chains only this service used:
    # three levels for its address, two for its NodePort.
    assert isinstance(r.mode, _core.IptablesReport)
    assert r.mode.stale_chains_deleted == 3 + 3 + 2
    assert "ns1/svc1" not in dump
    for prefix in ("KUBE-SVC-", "KUBE-SEP-", "KUBE-SVCS-", "KUBE-NPS-"):
        assert prefix not in dump


def test_no_endpoints_rejects_in_the_filter_table() -> None:
    e = engine()
    e.sync(ChangeSet(services={KEY: svc()}).to_json())
    dump = e.dump()
    assert "-d 172.30.0.41 --dport 80 -j REJECT" in dump
    assert "--dst-type LOCAL -m tcp -p tcp --dport 3001 -j REJECT" in dump


def test_engines_filter_by_family() -> None:
    dual = svc(cluster_ips=("172.30.0.41", "fd00:30::41"))
    v4, v6 = engine(), engine(family="IPv6", cluster_cidrs=["fd00:10::/64"])
    for e in (v4, v6):
        e.sync(ChangeSet(services={KEY: dual}).to_json())
    assert "172.30.0.41" in v4.render() and "fd00:30::41" not in v4.render()
    assert "fd00:30::41" in v6.render() and "172.30.0.41" not in v6.render()
    assert "! -d ::1/128 -j KUBE-NODEPORTS" in v6.render()


def test_render_is_deterministic_and_matches_the_golden_file() -> None:
    def build() -> str:
        e = engine()
        e.sync(ChangeSet(services={KEY: svc()}).to_json())
        e.sync(eps("10.180.0.2", "10.180.0.1", "10.180.0.3").to_json())
        return e.render()

    text = build()
    assert text == build()
    golden = GOLDEN / "iptables-nodeport-3-endpoints.txt"
    if os.environ.get("KPROXY_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


def test_malformed_input_raises_core_input_error() -> None:
    e = engine()
    with pytest.raises(CoreInputError):
        e.sync(b"not json")
    bad_name = {"services": [{"namespace": "ns", "name": "a b", "service": {"ports": []}}]}
    with pytest.raises(CoreInputError):
        e.sync(json.dumps(bad_name).encode())
    with pytest.raises(CoreInputError):
        _core.Engine(json.dumps({"family": "IPv5", "node_name": "n"}))
    with pytest.raises(CoreInputError):
        _core.Engine(json.dumps({"family": "IPv4", "node_name": "n", "masquerade_bit": 40}))


def _tools(tmp_path: Path, restore_exit: int) -> dict[str, str]:
    """Stand-in iptables tools: a failing (or succeeding) restore and an empty save."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "iptables-restore").write_text(
        "#!/bin/sh\ncat >/dev/null\n"
        f"echo 'iptables-restore: line 3 failed' >&2\nexit {restore_exit}\n"
    )
    (bin_dir / "iptables-save").write_text("#!/bin/sh\necho '*nat'\necho COMMIT\n")
    (bin_dir / "iptables").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {"PATH": str(bin_dir)}


def test_kernel_failure_raises_apply_error_and_forces_a_full_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in _tools(tmp_path, restore_exit=1).items():
        monkeypatch.setenv(k, v)
    e = engine(backend="kernel")
    with pytest.raises(ApplyError) as info:
        e.sync(ChangeSet(services={KEY: svc()}).to_json())
    err = info.value
    assert err.op == "iptables-restore" and err.exit_code == 1
    assert "line 3 failed" in err.stderr and err.needs_full_sync
    assert e.needs_full_sync
    # Set by the engine as it raises, not by the caller afterwards.
    assert err.family == "IPv4"
    assert isinstance(err, KproxyError) and not isinstance(err, NetlinkError)
    with pytest.raises(CoreInputError) as bad:
        e.sync(b"{not json")
    assert not bad.value.needs_full_sync and isinstance(bad.value, KproxyError)


def test_missing_tool_raises_apply_error_with_errno(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    e = engine(backend="kernel")
    with pytest.raises(ApplyError) as info:
        e.sync(ChangeSet(services={KEY: svc()}).to_json())
    assert info.value.errno == 2  # ENOENT


def test_the_userspace_mode_refuses_to_trace_as_unsupported_not_bad_input() -> None:
    e = engine(mode="userspace")
    with pytest.raises(UnsupportedError, match="programs no rules to trace"):
        e.trace(_core.Packet("10.0.0.1", "10.0.0.2", "TCP", 80))
