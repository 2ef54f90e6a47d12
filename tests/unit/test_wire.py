"""The boundary's one schema: ``kproxy.wire`` is generated from the core's serde types, every
caller is type-checked against it, and the core decodes what the types describe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from kproxy import _core, wire
from kproxy.backends.proxier import engine_config
from kproxy.config import build
from kproxy.errors import CoreInputError
from kproxy.model import IPVS_SCHEDULERS, NodeInfo

NODE = NodeInfo("node-a", addresses=("192.168.0.2",), pod_cidrs=("10.244.1.0/24",))
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mode", get_args(wire.Mode))
def test_each_mode_gets_its_own_section_and_the_core_takes_it(mode: wire.Mode) -> None:
    cfg = build(None, {"hostname_override": "node-a", "mode": mode})
    c = engine_config(cfg, "IPv4", NODE, backend="fake", local_addrs=["192.168.0.2"])
    sections = {"iptables", "ipvs", "userspace"}
    assert sections & c.keys() == ({mode} & sections)
    engine = _core.Engine(json.dumps(c))
    assert (engine.mode, engine.family) == (mode, "IPv4")


def test_the_core_refuses_another_modes_section_and_an_unknown_field() -> None:
    base: wire.EngineConfig = {"family": "IPv4", "node_name": "n", "backend": "fake"}
    with pytest.raises(CoreInputError, match="ipvs settings are given for the iptables mode"):
        _core.Engine(json.dumps({**base, "ipvs": {"scheduler": "rr"}}))
    with pytest.raises(CoreInputError, match="unknown field `sheduler`"):
        _core.Engine(json.dumps({**base, "mode": "ipvs", "ipvs": {"sheduler": "rr"}}))
    with pytest.raises(CoreInputError, match="unknown variant `fifo`"):
        _core.Engine(json.dumps({**base, "mode": "ipvs", "ipvs": {"scheduler": "fifo"}}))


def test_python_and_the_core_share_one_list_of_schedulers() -> None:
    assert get_args(wire.IpvsScheduler) == IPVS_SCHEDULERS
    assert "rr" in IPVS_SCHEDULERS and "mh" in IPVS_SCHEDULERS
    base = {"family": "IPv4", "node_name": "n", "backend": "fake", "mode": "ipvs"}
    for s in IPVS_SCHEDULERS:
        assert _core.Engine(json.dumps({**base, "ipvs": {"scheduler": s}})).mode == "ipvs"


# A caller that misspells a field of the engine configuration and of a change set, and one
# that spells them right: mypy must refuse the first and accept the second.
WRONG = """
from kproxy import wire
config: wire.EngineConfig = {"family": "IPv4", "node_nme": "n"}
change: wire.ChangeSet = {"services": [{"namespace": "a", "name": "b", "servce": None}]}
port: wire.PortSpec = {"protocol": "ICMP", "port": 1}
"""
RIGHT = """
from kproxy import wire
config: wire.EngineConfig = {"family": "IPv4", "node_name": "n", "ipvs": {"scheduler": "mh"}}
change: wire.ChangeSet = {"services": [{"namespace": "a", "name": "b", "service": None}]}
port: wire.PortSpec = {"protocol": "SCTP", "port": 1}
"""


def mypy(source: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "caller.py"
    path.write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_a_misspelled_field_fails_at_type_check_time(tmp_path: Path) -> None:
    wrong = mypy(WRONG, tmp_path)
    assert wrong.returncode == 1, wrong.stdout
    assert 'Extra key "node_nme" for TypedDict "EngineConfig"' in wrong.stdout
    assert 'Missing key "node_name" for TypedDict "EngineConfig"' in wrong.stdout
    assert 'Extra key "servce" for TypedDict "ServiceChange"' in wrong.stdout
    assert 'Literal[\'ICMP\']", TypedDict item "protocol"' in wrong.stdout
    right = mypy(RIGHT, tmp_path)
    assert right.returncode == 0, right.stdout
