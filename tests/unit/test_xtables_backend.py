"""The iptables backend choice (legacy or nft), as upstream's iptables-wrapper makes it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kproxy import xtables_backend as xb
from kproxy.errors import ConfigError

HINT = "*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n"
CANARY = "*mangle\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n"


def rules(n: int) -> str:
    return "*filter\n:INPUT ACCEPT [0:0]\n" + "".join(f"-A INPUT -j X{i}\n" for i in range(n))


def runner(legacy: str = "", nft: str = "") -> xb.Runner:
    """Stand-in tools: ``iptables-<backend>-save`` prints the given dump (IPv4 only)."""
    dumps = {"iptables-legacy-save": legacy, "iptables-nft-save": nft}
    return lambda argv: dumps.get(argv[0], "")


@pytest.mark.parametrize(
    ("legacy", "nft", "backend", "why"),
    [
        (HINT, "", "legacy", "KUBE-IPTABLES-HINT chain is in iptables-legacy"),
        ("", HINT, "nft", "KUBE-IPTABLES-HINT chain is in iptables-nft"),
        (CANARY, rules(5), "legacy", "KUBE-KUBELET-CANARY"),  # the hint beats rule counts
        (HINT + rules(3), HINT, "nft", "iptables-nft"),  # both hinted: nft, as upstream
        (rules(7), rules(2), "legacy", "7 rules in iptables-legacy, 2 in iptables-nft"),
        (rules(2), rules(2), "nft", "2 rules in iptables-legacy, 2 in iptables-nft"),
        ("", "", "nft", "no rules in either"),
    ],
)
def test_detect(legacy: str, nft: str, backend: str, why: str) -> None:
    choice = xb.detect(runner(legacy, nft))
    assert choice.backend == backend
    assert why in choice.reason


def test_declared_chains_are_not_rules() -> None:
    # ":CHAIN" lines (every table lists its built-in chains) must not count as rules.
    only_chains = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n" * 4
    assert xb.detect(runner(only_chains, rules(1))).backend == "nft"


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A process with no choice made yet, stand-in ``xtables-*-multi`` tools on PATH."""
    for b in xb.BACKENDS:
        tool = tmp_path / f"xtables-{b}-multi"
        tool.write_text("#!/bin/sh\necho " + b + "\n")
        tool.chmod(0o755)
    monkeypatch.setattr(xb, "_chosen", None)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    yield tmp_path


def test_unset_leaves_path_alone(fresh: Path) -> None:
    before = os.environ["PATH"]
    assert xb.configure({}) is None
    assert os.environ["PATH"] == before


def test_auto_puts_the_chosen_tools_first(fresh: Path) -> None:
    choice = xb.configure({xb.ENV: "auto"}, runner(legacy=HINT))
    assert choice is not None and choice.backend == "legacy"
    first = Path(os.environ["PATH"].split(os.pathsep)[0])
    for tool in xb.TOOLS:
        assert (first / tool).resolve() == (fresh / "xtables-legacy-multi").resolve()
    # Once chosen, it holds for the process (the core and the tools must agree).
    assert xb.configure({xb.ENV: "nft"}) == choice


def test_forced_backend(fresh: Path) -> None:
    choice = xb.configure({xb.ENV: "NFT"})
    assert choice == xb.Choice("nft", f"{xb.ENV}=nft")


def test_bad_value_names_the_variable(fresh: Path) -> None:
    with pytest.raises(ConfigError, match=f"{xb.ENV}: 'iptables': must be auto, legacy or nft"):
        xb.configure({xb.ENV: "iptables"})


def test_missing_tool_is_a_clear_error(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (fresh / "xtables-legacy-multi").unlink()
    monkeypatch.setenv("PATH", str(fresh))
    with pytest.raises(ConfigError, match="xtables-legacy-multi is not installed"):
        xb.configure({xb.ENV: "legacy"})
