"""Which iptables a node uses, legacy or nft, chosen as upstream's iptables-wrapper does.

A node has two iptables: the legacy one (x_tables in the kernel) and iptables-nft (the same
rules stored as nftables). Packets traverse both, but each tool sees only its own rules, and a
proxy writing to one while kubelet and the CNI write to the other leaves two sets of chains
that disagree about marks and masquerading. A host install uses the host's own ``iptables``
(its alternatives are the administrator's choice). The container image cannot know the host
from its own files, so it sets ``KPROXY_IPTABLES_BACKEND=auto`` and asks the kernel: kubelet's
``KUBE-IPTABLES-HINT`` (or, before 1.23, ``KUBE-KUBELET-CANARY``) chain in the mangle table
names the backend kubelet uses; without it, whichever backend holds more rules wins, and nft
when neither holds any (a fresh node on a current distribution).

The choice is made once per process, before any rule is read or written, by putting a
directory of ``iptables``/``ip6tables`` (``-save``, ``-restore``) links to the chosen
``xtables-*-multi`` first on ``PATH``: the core and every tool this process runs find it
there, and nothing on the host changes.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kproxy.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "KPROXY_IPTABLES_BACKEND"
BACKENDS = ("legacy", "nft")
HINT_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")
TOOLS = (
    "iptables", "iptables-save", "iptables-restore",
    "ip6tables", "ip6tables-save", "ip6tables-restore",
)  # fmt: skip
_HINT = re.compile(r"^:(" + "|".join(HINT_CHAINS) + r") ", re.MULTILINE)
_RULE = re.compile(r"^-A ", re.MULTILINE)

# (argv) -> stdout, "" when the tool is missing or fails (a kernel without x_tables, say).
Runner = Callable[[list[str]], str]


@dataclass(frozen=True)
class Choice:
    backend: str  # "legacy" or "nft"
    reason: str


def _run(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout if r.returncode == 0 else ""


def _dump(backend: str, run: Runner) -> str:
    return run([f"iptables-{backend}-save"]) + run([f"ip6tables-{backend}-save"])


def detect(run: Runner = _run) -> Choice:
    """The backend this node's other agents use (see the module's docstring)."""
    dumps = {b: _dump(b, run) for b in BACKENDS}
    hinted = [b for b in ("nft", "legacy") if _HINT.search(dumps[b])]
    if hinted:
        chain = _HINT.search(dumps[hinted[0]])
        assert chain is not None
        return Choice(hinted[0], f"kubelet's {chain.group(1)} chain is in iptables-{hinted[0]}")
    counts = {b: len(_RULE.findall(dumps[b])) for b in BACKENDS}
    rules = f"{counts['legacy']} rules in iptables-legacy, {counts['nft']} in iptables-nft"
    if counts["legacy"] > counts["nft"]:
        return Choice("legacy", rules)
    return Choice("nft", rules if counts["nft"] else "no rules in either; nft is the default")


def link_dir(backend: str) -> str:
    """A new directory of ``TOOLS`` linked to ``xtables-<backend>-multi`` (removed at exit)."""
    multi = shutil.which(f"xtables-{backend}-multi")
    if multi is None:
        raise ConfigError(ENV, f"{backend}: xtables-{backend}-multi is not installed")
    path = tempfile.mkdtemp(prefix=f"kproxy-iptables-{backend}-")
    atexit.register(shutil.rmtree, path, True)
    for tool in TOOLS:
        # xtables-*-multi picks the program by the name it is run as.
        os.symlink(multi, os.path.join(path, tool))
    return path


_chosen: Choice | None = None


def configure(env: Mapping[str, str] | None = None, run: Runner = _run) -> Choice | None:
    """Apply ``KPROXY_IPTABLES_BACKEND`` (``auto``, ``legacy`` or ``nft``) to this process;
    unset or empty leaves ``PATH`` alone. Idempotent: the first choice holds."""
    global _chosen  # noqa: PLW0603 - one choice per process, as PATH is
    if _chosen is not None:
        return _chosen
    value = (os.environ if env is None else env).get(ENV, "").strip().lower()
    if not value:
        return None
    if value == "auto":
        choice = detect(run)
    elif value in BACKENDS:
        choice = Choice(value, f"{ENV}={value}")
    else:
        raise ConfigError(ENV, f"{value!r}: must be auto, legacy or nft")
    directory = link_dir(choice.backend)
    os.environ["PATH"] = f"{directory}{os.pathsep}{os.environ.get('PATH', '')}"
    log.info("iptables backend: %s (%s)", choice.backend, choice.reason)
    _chosen = choice
    return choice
