"""An unusable kubeconfig or an unreachable API server: one line naming it, exit status 1, in
the tools and in the daemon (which stops at once, before touching the node: retrying cannot
fix a file it cannot parse)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from kproxy import commands, nodesetup

BAD = {
    "unparsable": "clusters: [\n",
    "no-current-context": "apiVersion: v1\nkind: Config\nclusters: []\n",
}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends


def error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("E")]


@pytest.mark.parametrize("command", ["render", "diff", "daemon"])
@pytest.mark.parametrize("kind", sorted(BAD))
def test_an_unusable_kubeconfig_is_one_line_and_exit_1(
    command: str, kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    touched: list[object] = []
    monkeypatch.setattr(nodesetup, "apply", lambda *a, **kw: touched.append(a))
    path = tmp_path / "kubeconfig"
    path.write_text(BAD[kind])
    argv = [command, "--kubeconfig", str(path)] + (["--live"] if command == "diff" else [])
    assert commands.main(argv) == 1
    (line,) = error_lines(capsys)
    assert f"kubeconfig {path}: " in line
    assert "Traceback" not in line
    assert touched == []


def test_an_unreachable_api_server_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = f"http://127.0.0.1:{closed_port()}"
    assert commands.main(["render", "--master", server]) == 1
    (line,) = error_lines(capsys)
    assert f"API server {server}: cannot list: " in line
    assert "Connection refused" in line
