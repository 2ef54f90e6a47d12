"""Operator tools: ``kproxy render`` and ``kproxy trace``.

Both use the daemon's own code paths - the same sources, controller and engines - with the
engines on their in-memory kernel, so what they show is exactly what the daemon would program.
``trace --live`` reads the rules actually in this node's kernel instead.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any

from urllib3.exceptions import HTTPError

from kproxy import _core, netns
from kproxy.backends.proxier import Proxier, engine_config
from kproxy.config import ProxyConfig
from kproxy.control import Controller
from kproxy.errors import ApiConnectionError, ConfigError, KproxyError
from kproxy.k8s import informer
from kproxy.k8s.client import ClientFactory
from kproxy.model import Family, Origin, Protocol, protocol_of
from kproxy.netinfo import local_addresses
from kproxy.sources.manifests import ManifestSource

FAMILIES: tuple[Family, ...] = ("IPv4", "IPv6")


class _Collect:
    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def list_page(self, resource: str, objects: list[dict[str, Any]], first: bool) -> None:
        self.controller.list_page(resource, objects, first)

    def list_done(self, resource: str) -> None:
        self.controller.list_done(resource)

    def event(self, resource: str, kind: str, obj: dict[str, Any]) -> None:
        pass


def snapshot(cfg: ProxyConfig) -> Controller:
    """The cluster state as the daemon would see it right now (listed once, not watched)."""
    c = Controller.for_config(cfg)
    if cfg.manifests is not None:
        ManifestSource(cfg.manifests, c.replace).load()
        return c
    factory = ClientFactory(cfg.kubeconfig, cfg.master)
    factory.check()
    sink = _Collect(c)
    for res in (informer.services(), informer.endpoint_slices(), informer.node(cfg.node_name)):
        # One list per resource, through the informer's own list path.
        try:
            informer.Informer(res, factory, sink, threading.Event())._list()
        except (OSError, HTTPError, informer.ApiStatusError, informer.MalformedReply) as e:
            server = factory.get().host
            cause = getattr(e, "reason", None) or e
            raise ApiConnectionError(f"API server {server}", f"cannot list: {cause}") from None
    return c


def programmed(cfg: ProxyConfig, c: Controller, families: Sequence[Family] = FAMILIES) -> Proxier:
    """Engines on their in-memory kernel, programmed with everything ``c`` holds."""
    proxier = Proxier(cfg, families, c.node, backend="fake")
    proxier.sync(c.drain(), True)
    return proxier


def rendered(cfg: ProxyConfig) -> Proxier:
    return programmed(cfg, snapshot(cfg))


def render_command(cfg: ProxyConfig) -> int:
    for fam, text in rendered(cfg).render().items():
        if cfg.mode == "userspace":
            print(f"# userspace listeners for {fam} (protocol, address -> endpoints)")
        elif cfg.mode == "ipvs":
            print(f"# ipvs for {fam}: virtual servers (address -> real servers), then the "
                  "iptables-restore --noflush input and the ipset restore input")  # fmt: skip
        else:
            form = "nft -f input" if cfg.mode == "nftables" else "iptables-restore --noflush input"
            print(f"# {cfg.mode} rules for {fam} ({form})")
        print(text, end="")
    return 0


def parse_destination(dst: str) -> tuple[str, int, Protocol]:
    """``IP:PORT[/PROTO]`` or ``[IPv6]:PORT[/PROTO]`` -> (ip, port, protocol)."""
    rest, _, spelled = dst.partition("/")
    proto = protocol_of((spelled or "TCP").upper())
    if proto is None:
        raise ConfigError("DST", f"unknown protocol {spelled!r}")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError("DST", f"{dst!r} is not IP:PORT[/PROTO]")
    host = host.strip("[]")
    try:
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        raise ConfigError("DST", f"{host!r} is not an IP address") from None
    return ip, int(port), proto


def trace_command(
    cfg: ProxyConfig, src: str, dst: str, *, from_node: bool, live: bool, node_ips: list[str]
) -> int:
    ip, port, proto = parse_destination(dst)
    try:
        src_ip = str(ipaddress.ip_address(src))
    except ValueError:
        raise ConfigError("SRC", f"{src!r} is not an IP address") from None
    family: Family = "IPv4" if ipaddress.ip_address(ip).version == 4 else "IPv6"
    if ipaddress.ip_address(src_ip).version != ipaddress.ip_address(ip).version:
        raise ConfigError("SRC", "source and destination are of different IP families")
    origin: Origin = "local" if from_node else "external"
    if live:
        locals_ = node_ips or local_addresses()
    else:
        c = snapshot(cfg)
        locals_ = node_ips or (list(c.node.addresses) if c.node else local_addresses())
    packet = _core.Packet(src_ip, ip, proto, port, origin, locals_)
    if live and cfg.mode == "nftables":
        table = _core.NftTable.live(family)
        if not table.exists:
            raise KproxyError(f"no kproxy nftables table for {family} in this kernel")
        t = table.trace(packet)
    elif live and cfg.mode == "ipvs":
        t = _core.trace_ipvs_live(packet)
    elif live:
        tool = "iptables-save" if family == "IPv4" else "ip6tables-save"
        try:
            rules = subprocess.run(
                [tool], capture_output=True, text=True, check=True, timeout=120
            ).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise KproxyError(f"cannot read the kernel's rules with {tool}: {e}") from None
        t = _core.trace_iptables(rules, packet)
    else:
        t = programmed(cfg, c, (family,)).engines[family].trace(packet)
    print(explain(t, src_ip, dst, from_node, live))
    return 0


# Why the nftables mode dropped or rejected a packet, from the rule or map entry that decided.
_NFT_REASONS = {
    "no-endpoint-services:goto reject-chain": "the Service has no endpoints",
    "no-endpoint-services:drop": "the Service has no local endpoints (Local traffic policy)",
    "no-endpoint-nodeports:goto reject-chain": "the Service has no endpoints",
    "no-endpoint-nodeports:drop": "the Service has no local endpoints (Local traffic policy)",
    "firewall-check": "the source is not in the Service's loadBalancerSourceRanges",
    "cluster-ips-check": "no Service on this port of the cluster IP",
}


# The ipvs mode's rules that drop or reject, and why.
_IPVS_REASONS = {
    "filter/KUBE-SOURCE-RANGES-FIREWALL: -j DROP": (
        "the source is not in the Service's loadBalancerSourceRanges"
    ),
    "filter/KUBE-IPVS-FILTER: -m conntrack --ctstate NEW": (
        "no Service on this port of the address (KUBE-IPVS-FILTER)"
    ),
}


def _nft_reason_key(matched: str) -> str:
    """``@map: key : verdict`` lines -> ``map:verdict``; rule lines -> their chain."""
    line = matched.strip()
    if line.startswith("@") and " : " in line:
        name = line[1:].split(":", 1)[0]
        return f"{name}:{line.rsplit(' : ', 1)[1]}"
    chain = line.split(":", 1)[0]
    return chain if line.endswith(("drop", "reject")) else ""


def explain(t: _core.Trace, src: str, dst: str, from_node: bool, live: bool) -> str:
    where = "sent by the node itself" if from_node else "arriving from the network"
    lines = [
        f"{src} -> {dst} ({where}; {'kernel rules' if live else 'rules kproxy would program'})"
    ]
    if t.dnat:
        many = " (one per connection, at random)" if len(t.dnat) > 1 else ""
        lines.append(f"  DNAT to:     {', '.join(t.dnat)}{many}")
    else:
        lines.append("  DNAT to:     nothing (no Service matches, or none is usable)")
    lines.append(f"  masquerade:  {'yes' if t.masquerade else 'no'}")
    reason = ""
    for m in t.matched:
        if '"' in m and (
            "has no endpoints" in m or "has no local endpoints" in m or "not accepted" in m
        ):
            reason = m.split('"')[1]
        reason = _NFT_REASONS.get(_nft_reason_key(m), reason)
        reason = next((why for k, why in _IPVS_REASONS.items() if m.startswith(k)), reason)
    verdict = t.verdict or "no verdict from kproxy's rules (the chains' policies decide)"
    lines.append(f"  verdict:     {verdict}{f' ({reason})' if reason else ''}")
    lines.append("  rules matched:")
    lines += [f"    {m}" for m in t.matched] or ["    (none)"]
    return "\n".join(lines)


# -- kproxy diff --live ---------------------------------------------------------------------

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


def desired(cfg: ProxyConfig, family: Family) -> Tables:
    """What kproxy would program, as the kernel prints it: programmed into a scratch network
    namespace (connected to nothing) by the real engine, then read back."""
    c = snapshot(cfg)
    changes = c.drain()
    engine_cfg = json.dumps(engine_config(cfg, family, c.node, backend="kernel"))
    with netns.scratch() as ns, netns.NetnsExecutor(ns) as ex:
        engine = ex.call(functools.partial(_core.Engine, engine_cfg))
        ex.call(functools.partial(engine.sync, changes.to_json(), True), timeout=3600)
        return save(family, ns)


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


def nft_differences(family: Family, want: list[str], have: list[str]) -> list[Difference]:
    """Line-wise differences between two ``NftTable.lines()`` listings."""
    table = f"{'ip' if family == 'IPv4' else 'ip6'} kproxy"
    return line_differences(table, want, have, lambda name: name.split(":", 1)[0])


def nft_desired(cfg: ProxyConfig, family: Family) -> list[str]:
    table = programmed(cfg, snapshot(cfg), (family,)).engines[family].nft_table()
    return table.lines() if table is not None else []


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


def ipvs_differences(cfg: ProxyConfig, family: Family) -> list[Difference]:
    """The ipvs mode: virtual servers and set members compared line by line, and the
    companion rules as the kernel prints them (loaded into a scratch network namespace,
    connected to nothing, then read back) against this node's."""
    engine = programmed(cfg, snapshot(cfg), (family,)).engines[family]
    lines, rules, sets = engine.ipvs_parts()
    out = line_differences("ipvs", lines, _core.ipvs_live_lines(family))
    tool = "iptables-restore" if family == "IPv4" else "ip6tables-restore"
    with netns.scratch() as ns:
        for argv, text in ((["ipset", "restore"], sets), ([tool, "--noflush"], rules)):
            r = subprocess.run(
                ["ip", "netns", "exec", ns, *argv],
                input=text, capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            if r.returncode != 0:
                raise KproxyError(f"cannot load the wanted rules ({argv[0]}): {r.stderr.strip()}")
        want = save(family, ns)
    return out + differences(want, save(family))


def diff_command(cfg: ProxyConfig, *, as_json: bool) -> int:
    """Exit status 0 when the kernel holds exactly what kproxy wants, 1 otherwise."""
    if cfg.mode not in ("iptables", "nftables", "ipvs"):
        raise ConfigError("--proxy-mode", f"diff reads kernel rules; not {cfg.mode}")
    report: dict[str, list[Difference]] = {}
    for family in FAMILIES:
        if cfg.mode == "ipvs":
            report[family] = ipvs_differences(cfg, family)
        elif cfg.mode == "nftables":
            have = _core.NftTable.live(family).lines()
            report[family] = nft_differences(family, nft_desired(cfg, family), have)
        else:
            report[family] = differences(desired(cfg, family), save(family))
    if as_json:
        print(json.dumps({f: [dataclasses.asdict(d) for d in ds] for f, ds in report.items()}))
    else:
        for fam, ds in report.items():
            print(f"{fam}: {'no differences' if not ds else f'{len(ds)} differences'}")
            for d in ds:
                print(f"  {d}")
    return 1 if any(report.values()) else 0
