"""What ``kproxy diff`` compares: iptables rules as ``iptables-save`` prints them (the one
parser of its output in the tree), and listings of ``kind name ...`` lines (nftables and
IPVS), with the differences named per table and chain."""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Callable

from kproxy.errors import KproxyError
from kproxy.model import Family

Tables = dict[str, dict[str, list[str]]]
# kubelet's own chain in the same tables: never ours to judge.
NOT_OURS = frozenset({"KUBE-KUBELET-CANARY"})


def parse_save(text: str) -> Tables:
    """iptables-save output -> table -> chain -> rules (kproxy's chains, and the jump rules
    in built-in chains that lead to them)."""
    tables: Tables = {}
    cur: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("*"):
            cur = tables.setdefault(line[1:].strip(), {})
        elif line.startswith(":"):
            name = line[1:].split()[0]
            if name.startswith("KUBE-") and name not in NOT_OURS:
                cur.setdefault(name, [])
        elif line.startswith("-A "):
            chain, _, rule = line[3:].partition(" ")
            target = rule.rsplit("-j ", 1)[-1].split()[0] if "-j " in rule else ""
            if chain.startswith("KUBE-") and chain not in NOT_OURS:
                cur.setdefault(chain, []).append(rule)
            elif target.startswith("KUBE-") and target not in NOT_OURS:
                cur.setdefault(chain, []).append(rule)  # a jump from a built-in chain
    return tables


def save(family: Family, ns: str | None = None) -> Tables:
    tool = "iptables-save" if family == "IPv4" else "ip6tables-save"
    argv = [tool] if ns is None else ["ip", "netns", "exec", ns, tool]
    out: Tables = {}
    for table in ("filter", "nat"):
        try:
            text = subprocess.run(
                [*argv, "-t", table], capture_output=True, text=True, check=True, timeout=300
            ).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise KproxyError(f"cannot read the kernel's rules with {tool}: {e}") from None
        out.update(parse_save(text))
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class Difference:
    table: str
    chain: str
    change: str  # missing-chain, unexpected-chain, missing-rule, unexpected-rule, rule-order
    rule: str = ""

    def __str__(self) -> str:
        what = self.change.replace("-", " ")
        return f"{self.table} {self.chain}: {what}" + (f": {self.rule}" if self.rule else "")


def differences(want: Tables, have: Tables) -> list[Difference]:
    out: list[Difference] = []
    for table in sorted(set(want) | set(have)):
        w, h = dict(want.get(table, {})), dict(have.get(table, {}))
        for chain in sorted(set(w) | set(h)):
            builtin = not chain.startswith("KUBE-")  # always exists; only our jumps count
            if builtin:
                w.setdefault(chain, [])
                h.setdefault(chain, [])
            if chain not in h:
                out.append(Difference(table, chain, "missing-chain"))
                continue
            if chain not in w:
                out.append(Difference(table, chain, "unexpected-chain"))
                continue
            missing = [r for r in w[chain] if r not in h[chain]]
            extra = [r for r in h[chain] if r not in w[chain]]
            out += [Difference(table, chain, "missing-rule", r) for r in missing]
            out += [Difference(table, chain, "unexpected-rule", r) for r in extra]
            # Order matters in our chains (probabilities, the NodePorts tail); jump rules in
            # built-in chains share their chain with other programs, so only presence counts.
            if not missing and not extra and w[chain] != h[chain] and chain.startswith("KUBE-"):
                out.append(Difference(table, chain, "rule-order"))
    return out


def line_differences(
    table: str, want: list[str], have: list[str], owner: Callable[[str], str] = str
) -> list[Difference]:
    """Differences between two listings of ``kind name ...`` lines (order ignored);
    ``owner`` maps a line's name to what a difference is reported under."""
    out: list[Difference] = []
    have_set, want_set = set(have), set(want)
    for lines, other, verb in ((want, have_set, "missing"), (have, want_set, "unexpected")):
        for line in lines:
            if line in other:
                continue
            kind, rest = line.split(" ", 1)
            name = owner(rest.split(" ", 1)[0])
            out.append(Difference(table, name, f"{verb}-{kind}", line))
    return out
