"""Taking a node over from kube-proxy without dropping a connection, in namespaces.

The node starts as kube-proxy left it: in the iptables mode upstream's flat layout (what
kproxy renders, with its buckets flattened back as ``benches/iptables_sync.py`` does) and
upstream's jump rules; in the nftables mode upstream's ``kube-proxy`` table. A client holds an
established TCP connection through a Service while another opens a new connection every
20 ms; kproxy starts, programs its own rules, then removes kube-proxy's. Every connection
must succeed, the established one must survive, kube-proxy's rules must be gone, and what
belongs to other agents (Docker, Calico) must stay.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benches.iptables_sync import parse, upstream_text
from tests import k8sobjects as k
from tests.privileged.harness import (
    CLUSTER_CIDR,
    ECHO_IP,
    NODE,
    ProxyLab,
    echo_service,
    echo_slice,
    proxy_lab,
)

pytestmark = pytest.mark.privileged

PODS = ["10.244.1.2", "10.244.2.2", "10.244.3.2"]
# The Service port of the held connection, to echo servers that keep it open.
LONG_PORT, LONG_TARGET = 90, 8090
# Opens a connection every 20 ms for a while; one JSON line per try.
PROBER = r"""
import json, socket, sys, time
ip, until = sys.argv[1], time.monotonic() + float(sys.argv[2])
while time.monotonic() < until:
    s = socket.socket(); s.settimeout(1.0)
    try:
        s.connect((ip, 80)); s.sendall(b"ping\n"); out = ["ok", s.recv(256).decode().split(" ")[0]]
    except OSError as e:
        out = [type(e).__name__, ""]
    finally:
        s.close()
    print(json.dumps(out), flush=True)
    time.sleep(0.02)
"""
# Other agents' objects, which a takeover must leave alone.
FOREIGN_IPTABLES = (
    ["-t", "filter", "-N", "DOCKER-USER"],
    ["-t", "filter", "-A", "DOCKER-USER", "-j", "RETURN"],
    ["-t", "filter", "-N", "cali-FORWARD"],
    ["-t", "filter", "-A", "cali-FORWARD", "-m", "mark", "--mark", "0x10000/0x10000", "-j",
     "ACCEPT"],
)  # fmt: skip
FOREIGN_NFT = "add table ip cilium-test\nadd chain ip cilium-test keep\n"


def add_foreign(lab: ProxyLab, iptables: tuple[list[str], ...] = (), nft: str = "") -> None:
    """Other agents' chains and table (Docker, Calico, Cilium), with ``iptables`` commands and
    an ``nft`` script of the test's own added."""
    node = lab.lab.node
    for args in (*iptables, *FOREIGN_IPTABLES):
        node.exec(["iptables", *args], timeout=10, check=True)
    node.exec(["nft", "-f", "-"], input=nft + FOREIGN_NFT, timeout=10, check=True)


def assert_foreign_kept(lab: ProxyLab) -> None:
    filt = lab.filter()
    assert ":DOCKER-USER" in filt and "-A cali-FORWARD -m mark --mark 0x10000/0x10000" in filt
    r = lab.lab.node.exec(["nft", "list", "table", "ip", "cilium-test"], timeout=10)
    assert r.returncode == 0


def upstream_iptables(lab: ProxyLab) -> str:
    """kube-proxy's iptables rules for the lab's Services: kproxy's render (upstream's chains
    and hashes) with its dispatch buckets flattened into upstream's single KUBE-SERVICES."""
    r = lab.lab.node.exec(
        [sys.executable, "-m", "kproxy", "render", "--master", lab.api.api_url,
         "--hostname-override", NODE, "--cluster-cidr", CLUSTER_CIDR],
        timeout=60, check=True,
    )  # fmt: skip
    v4 = r.stdout.split("# iptables rules for IPv6")[0]
    text = upstream_text(parse(v4), None)
    # Upstream's jumps from the built-in chains.
    jumps = {
        "nat": ["-A PREROUTING -j KUBE-SERVICES", "-A OUTPUT -j KUBE-SERVICES",
                "-A POSTROUTING -j KUBE-POSTROUTING"],
        "filter": ["-A FORWARD -j KUBE-FORWARD",
                   "-A FORWARD -m conntrack --ctstate NEW -j KUBE-SERVICES",
                   "-A OUTPUT -m conntrack --ctstate NEW -j KUBE-SERVICES"],
    }  # fmt: skip
    out: list[str] = []
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        if line == "COMMIT":
            out += jumps.get(table, [])
        out.append(line)
    return "\n".join(out) + "\n"


def upstream_nftables() -> str:
    """kube-proxy's nftables table for the echo Service's TCP ports (upstream's names)."""
    lines = [
        "add table ip kube-proxy",
        "add map ip kube-proxy service-ips"
        " { type ipv4_addr . inet_proto . inet_service : verdict ; }",
        "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }",
        "add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }",
        "add chain ip kube-proxy services",
        "add rule ip kube-proxy nat-prerouting jump services",
        "add rule ip kube-proxy nat-output jump services",
        "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips",
    ]  # fmt: skip
    for name, port, target in (("tcp", 80, 8080), ("long", LONG_PORT, LONG_TARGET)):
        service = f"service-ABCDEFGH-default/echo/tcp/{name}"
        lines.append(f"add chain ip kube-proxy {service}")
        targets = []
        for i, ip in enumerate(PODS):
            chain = f"endpoint-ABCDEFGH-default/echo/tcp/{name}__{ip}/{target}"
            lines.append(f"add chain ip kube-proxy {chain}")
            lines.append(f"add rule ip kube-proxy {chain} meta l4proto tcp dnat to {ip}:{target}")
            targets.append(f"{i} : goto {chain}")
        lines.append(
            f"add rule ip kube-proxy {service} numgen random mod 3 vmap {{ {', '.join(targets)} }}"
        )
        lines.append(
            f"add element ip kube-proxy service-ips {{ {ECHO_IP} . tcp . {port} : goto {service} }}"
        )
    return "\n".join(lines) + "\n"


def long_lived_service() -> tuple[k.Obj, k.Obj]:
    """The echo Service and slice with a port for long-lived connections (echo servers)."""
    svc = echo_service()
    svc["spec"]["ports"].append(
        {"name": "long", "port": LONG_PORT, "protocol": "TCP", "targetPort": LONG_TARGET}
    )
    sl = echo_slice(PODS)
    sl["ports"].append({"name": "long", "port": LONG_TARGET, "protocol": "TCP"})
    return svc, sl


def echo_servers(lab: ProxyLab) -> None:
    """Servers on the long-lived port that keep each connection open."""
    for pod in ("pod1", "pod2", "pod3"):
        lab.lab.pod(pod).start_tcp_server(LONG_TARGET, echo=True)


def start_prober(lab: ProxyLab, tmp_path: Path, seconds: int) -> subprocess.Popen[str]:
    """A new connection to the echo Service every 20 ms for ``seconds``, from the client."""
    return lab.lab.pod("client").popen(
        [sys.executable, "-c", PROBER, ECHO_IP, str(seconds)],
        stdout=open(tmp_path / "probes", "w"),  # the prober writes to it until it exits
    )


def assert_no_probe_failed(tmp_path: Path) -> None:
    probes = [json.loads(line) for line in (tmp_path / "probes").read_text().splitlines()]
    assert len(probes) > 100
    bad = [p for p in probes if p[0] != "ok" or p[1] not in ("pod1", "pod2", "pod3")]
    assert not bad, (len(bad), bad[:5])


def kube_proxy_gone(lab: ProxyLab, mode: str) -> bool:
    node = lab.lab.node
    if mode == "nftables":
        return node.exec(["nft", "list", "table", "ip", "kube-proxy"], timeout=10).returncode != 0
    # kube-proxy's flat KUBE-SERVICES dispatch (a rule per Service port) is replaced by
    # kproxy's buckets.
    return not any(r.startswith(f"-A KUBE-SERVICES -d {ECHO_IP}") for r in lab.nat().splitlines())


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_takeover_from_kube_proxy_drops_no_connection(tmp_path: Path, mode: str) -> None:
    with proxy_lab(tmp_path, long_lived_service(), mode=mode) as lab:
        node, client = lab.lab.node, lab.lab.pod("client")
        echo_servers(lab)
        add_foreign(lab)
        ruleset = upstream_iptables(lab) if mode == "iptables" else upstream_nftables()
        tool = ["iptables-restore", "--noflush"] if mode == "iptables" else ["nft", "-f", "-"]
        node.exec(tool, input=ruleset, timeout=30, check=True)
        assert not kube_proxy_gone(lab, mode)
        # The node serves the Service through kube-proxy's rules alone.
        assert client.tcp_probe(ECHO_IP, 80).ok
        with client.tcp_session(ECHO_IP, LONG_PORT) as held:
            assert held.send("before").ok
            prober = start_prober(lab, tmp_path, 12)
            lab.start_daemon()
            lab.wait(lambda: "first sync done" in lab.log(), 30, "kproxy's first sync")
            lab.wait(lambda: kube_proxy_gone(lab, mode), 15, "kube-proxy's rules to go")
            prober.wait(timeout=30)
            after = held.send("after")
            assert after.ok, after
        assert_no_probe_failed(tmp_path)
        assert_foreign_kept(lab)  # other agents' chains and tables are untouched


def rules_of(lab: ProxyLab, mode: str) -> bool:
    """Whether kproxy's rules of ``mode`` for the echo Service are in the kernel."""
    if mode == "nftables":
        return ECHO_IP in lab.nft()
    return f"-d {ECHO_IP}/32" in lab.nat()


@pytest.mark.parametrize(
    ("old", "new"), [("iptables", "nftables"), ("nftables", "iptables")], ids=["to-nft", "to-ipt"]
)
def test_switching_modes_on_a_running_node_drops_no_connection(
    tmp_path: Path, old: str, new: str
) -> None:
    with proxy_lab(tmp_path, long_lived_service(), mode=old) as lab:
        client = lab.lab.pod("client")
        echo_servers(lab)
        first = lab.start_daemon()
        lab.wait_synced()
        with client.tcp_session(ECHO_IP, LONG_PORT) as held:
            assert held.send("before").ok
            prober = start_prober(lab, tmp_path, 12)
            # The DaemonSet's rollout: the old pod stops (its rules stay), the new one starts.
            first.terminate()
            assert first.wait(timeout=20) == 0
            assert rules_of(lab, old)
            lab.mode = new
            lab.start_daemon()
            lab.wait(lambda: lab.log().count("first sync done") >= 2, 30, "the new first sync")
            lab.wait(lambda: not rules_of(lab, old), 15, f"the {old} rules to go")
            assert rules_of(lab, new)
            prober.wait(timeout=30)
            after = held.send("after")
            assert after.ok, after
        assert_no_probe_failed(tmp_path)


def hand_back(lab: ProxyLab) -> tuple[int, str]:
    r = lab.lab.node.exec([sys.executable, "-m", "kproxy", "cleanup", "--hand-back"], timeout=60)
    return r.returncode, r.stdout + r.stderr


BUCKETS = ("KUBE-SVCS-", "KUBE-NPS-", "KUBE-SVCR-", "KUBE-EXTS-", "KUBE-FWS-", "KUBE-HCS-")


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_handing_the_node_back_to_kube_proxy_drops_no_connection(tmp_path: Path, mode: str) -> None:
    with proxy_lab(tmp_path, long_lived_service(), mode=mode) as lab:
        node, client = lab.lab.node, lab.lab.pod("client")
        echo_servers(lab)
        add_foreign(lab)
        daemon = lab.start_daemon()
        lab.wait_synced()
        upstream = upstream_iptables(lab) if mode == "iptables" else upstream_nftables()
        with client.tcp_session(ECHO_IP, LONG_PORT) as held:
            assert held.send("before").ok
            prober = start_prober(lab, tmp_path, 10)
            daemon.terminate()
            assert daemon.wait(timeout=20) == 0
            if mode == "iptables":
                # Before kube-proxy runs, the hand-back refuses and removes nothing: the
                # node's Services still go through kproxy's buckets.
                rc, out = hand_back(lab)
                assert rc == 1 and "has not taken this node over yet" in out, out
                assert any(f":{b}" in lab.nat() for b in BUCKETS)
            # kube-proxy starts and writes its rules (its full first sync).
            tool = ["iptables-restore", "--noflush"] if mode == "iptables" else ["nft", "-f", "-"]
            node.exec(tool, input=upstream, timeout=30, check=True)
            rc, out = hand_back(lab)
            assert rc == 0, out
            prober.wait(timeout=30)
            after = held.send("after")
            assert after.ok, after
        assert_no_probe_failed(tmp_path)
        # kube-proxy's rules serve the node; nothing of kproxy's own is left.
        assert not kube_proxy_gone(lab, mode)
        assert lab.nft() == ""
        saved = lab.nat() + lab.filter()
        assert not any(f":{b}" in saved for b in BUCKETS), saved
        assert client.tcp_probe(ECHO_IP, 80).ok
        assert_foreign_kept(lab)


# What kube-proxy left half done: a Service chain with no endpoints' chains behind it, an
# orphaned endpoint chain, a chain without its jump, and in the nftables mode a table holding
# one empty chain. And the ipvs mode's interface and one of its sets.
HALF_IPTABLES = (
    ["-t", "nat", "-N", "KUBE-SERVICES"],
    ["-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"],
    ["-t", "nat", "-N", "KUBE-SVC-HALFHALFHALFHALF"],
    ["-t", "nat", "-A", "KUBE-SERVICES", "-d", "10.96.0.99/32", "-p", "tcp", "--dport", "80",
     "-j", "KUBE-SVC-HALFHALFHALFHALF"],
    ["-t", "nat", "-N", "KUBE-SEP-ORPHANORPHANORPH"],
    ["-t", "filter", "-N", "KUBE-FORWARD"],
)  # fmt: skip
HALF_NFT = "add table ip kube-proxy\nadd chain ip kube-proxy services\n"
# kube-router's objects, which share kube-proxy's KUBE- prefix and must stay.
KUBE_ROUTER_IPTABLES = (
    ["-t", "filter", "-N", "KUBE-ROUTER-INPUT"],
    ["-t", "filter", "-A", "INPUT", "-j", "KUBE-ROUTER-INPUT"],
)
KUBE_ROUTER_SETS = ("KUBE-DST-ROUTERSET", "kube-router-local-ips")


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_a_half_programmed_node_is_taken_over_and_only_kube_proxys_objects_go(
    tmp_path: Path, mode: str
) -> None:
    with proxy_lab(tmp_path, [echo_service(), echo_slice(PODS)], mode=mode) as lab:
        node, client = lab.lab.node, lab.lab.pod("client")
        add_foreign(lab, (*HALF_IPTABLES, *KUBE_ROUTER_IPTABLES), HALF_NFT)
        # kube-ipvs0 is a dummy device; this kernel has no dummy driver, a veth stands in.
        ipvs_if = ["ip", "link", "add", "kube-ipvs0", "type", "veth", "peer", "name", "ipvs0-peer"]
        node.exec(ipvs_if, timeout=10, check=True)
        for name in ("KUBE-CLUSTER-IP", *KUBE_ROUTER_SETS):
            node.exec(["ipset", "create", name, "hash:ip"], timeout=10, check=True)
        lab.start_daemon()
        lab.wait(lambda: "first sync done" in lab.log(), 30, "kproxy's first sync")

        def half_gone() -> bool:
            nat = lab.nat()
            gone = "KUBE-SVC-HALF" not in nat and "KUBE-SEP-ORPHAN" not in nat
            if mode == "nftables":
                r = node.exec(["nft", "list", "table", "ip", "kube-proxy"], timeout=10)
                gone = gone and r.returncode != 0 and "KUBE-FORWARD" not in lab.filter()
            return gone

        lab.wait(half_gone, 15, "kube-proxy's half-made rules to go")
        results = client.tcp_probe_many(ECHO_IP, 80, 10)
        assert all(r.ok for r in results), results
        sets = node.exec(["ipset", "list", "-n"], timeout=10, check=True).stdout.split()
        if mode == "iptables":
            # The two stale chains (the Service's and the orphaned endpoint's), reported.
            assert "removed chains left by an earlier proxy: IPv4 2" in lab.log(), lab.log()
        if mode == "nftables":
            # The nftables mode takes the ipvs mode's leftovers too, and says how much.
            assert "KUBE-CLUSTER-IP" not in sets
            links = node.exec(["ip", "link", "show"], timeout=10, check=True).stdout
            assert "kube-ipvs0" not in links
            assert "iptables: removed" in lab.log(), lab.log()[-3000:]
        # kube-router's and the other agents' objects are all there.
        assert set(KUBE_ROUTER_SETS) <= set(sets), sets
        filt = lab.filter()
        assert ":KUBE-ROUTER-INPUT" in filt and "-A INPUT -j KUBE-ROUTER-INPUT" in filt, filt
        assert_foreign_kept(lab)
