"""Exposure: nothing kproxy runs goes through a shell, and its HTTP endpoints stay local.

These are source-level checks on purpose: a shell invocation added anywhere would let a
user-controlled string (a Service name, an address) be interpreted by a shell, and no
behavioural test can enumerate every path that might reach one.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from kproxy.config import ProxyConfig

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sorted((ROOT / "python" / "kproxy").rglob("*.py"))
RUST = sorted((ROOT / "rust" / "src").rglob("*.rs"))

SPAWNERS = {"run", "Popen", "call", "check_call", "check_output", "create_subprocess_exec"}
SHELLS = {"system", "popen", "create_subprocess_shell", "spawnl", "execl"}


def _shell_uses(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        fn = node.func
        name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
        if name in SHELLS:
            found.append(f"{name}() at line {node.lineno}")
        if name in SPAWNERS:
            for kw in node.keywords:
                if kw.arg == "shell" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    found.append(f"{name}(shell=...) at line {node.lineno}")
            # argv must be a list, never one string a shell would split
            if node.args and isinstance(node.args[0], (ast.Constant, ast.JoinedStr)):
                found.append(f"{name}(<string argv>) at line {node.lineno}")
    return found


def test_the_scan_finds_a_shell_when_there_is_one() -> None:
    bad = ast.parse(
        "import os, subprocess\n"
        "subprocess.run('iptables -L', shell=True)\n"
        "os.system(f'ip link del {name}')\n"
        "subprocess.Popen(f'nft -f {path}')\n"
    )
    assert len(_shell_uses(bad)) == 4


def test_no_python_module_runs_a_shell() -> None:
    assert PYTHON, "the package sources were not found"
    offenders = {
        str(p.relative_to(ROOT)): uses
        for p in PYTHON
        if (uses := _shell_uses(ast.parse(p.read_text(), filename=str(p))))
    }
    assert offenders == {}


def test_the_rust_core_spawns_only_through_its_runner_and_never_a_shell() -> None:
    spawns = {str(p.relative_to(ROOT)) for p in RUST if "Command::new" in p.read_text()}
    assert spawns == {"rust/src/exec.rs"}
    offenders = [str(p.relative_to(ROOT)) for p in RUST if _RUST_SHELL.search(p.read_text())]
    assert offenders == []


# A shell as the program of a spawn (directly or through exec::run), or a "-c" argument.
# (A bare "sh" elsewhere is allowed: it is also the IPVS source-hashing scheduler's name.)
_RUST_SHELL = re.compile(
    r'(Command::new|exec::run)\((\s*"[^"]*",)?\s*"(/bin/)?(ba)?sh"|\.args?\(\s*\[?\s*"-c"'
)


def test_the_rust_shell_scan_finds_a_shell_when_there_is_one() -> None:
    for bad in ('Command::new("sh")', 'exec::run("x", "/bin/bash", &["-c", s], None)',
                'cmd.arg("-c")'):  # fmt: skip
        assert _RUST_SHELL.search(bad), bad
    assert not _RUST_SHELL.search('pub const SCHEDULERS: &[&str] = &["rr", "sh"];')


def test_http_endpoints_bind_to_localhost_by_default() -> None:
    cfg = ProxyConfig()
    assert cfg.metrics_bind_address.startswith("127.0.0.1:")
    # healthz is node-wide on purpose (the kubelet and load balancers probe it), as upstream;
    # it only ever answers GET, see test_metrics.py and test_health_during_sync.py
    assert cfg.healthz_bind_address.startswith("0.0.0.0:")
