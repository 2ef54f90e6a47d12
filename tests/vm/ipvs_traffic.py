"""Real TCP and UDP through kproxy's ipvs mode, run inside the VM (root, the VM's own kernel).

The VM's root network namespace is the node. Two pod namespaces hold the endpoints (pod1 is on
this node, pod2 is declared on another one) and a client namespace is a machine outside the
cluster. kproxy's own Proxier (the daemon's code path: Rust engine, IPVS over netlink, ipsets,
iptables rules, kube-ipvs0 through pyroute2) programs the node from Service and EndpointSlice
objects; then packets are sent. Every server and client socket lives in this one process
(created inside the namespaces with setns), so nothing is left running. Each check prints
``ok: ...``; the first failure exits non-zero naming the check.

Usage (inside the VM): ``python ipvs_traffic.py``.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from kproxy import _core, lifecycle, tools
from kproxy.backends.ipvs import bound_addresses
from kproxy.backends.proxier import Proxier, programmed
from kproxy.config import ProxyConfig, build
from kproxy.control import Controller
from kproxy.netinfo import local_addresses
from kproxy.tracker import ChangeSet

ROOT = Path(__file__).resolve().parents[2]
NODE = "vm"
NODE_IP = "192.168.50.1"
CLIENT = "192.168.50.2"
CLIENT2 = "192.168.60.2"  # another outside machine, not in the LB's source ranges
LB_IP, EXTERNAL_IP = "203.0.113.10", "203.0.113.20"
PODS = {"pod1": ("10.244.1.2", "10.244.1.1", NODE), "pod2": ("10.244.2.2", "10.244.2.1", "other")}
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def sh(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if r.returncode != 0:
        raise SystemExit(f"FAIL: {' '.join(argv)}: {r.stderr.strip()}")
    return r.stdout


@contextmanager
def netns(name: str | None) -> Iterator[None]:
    """Run the block in network namespace `name` (this thread only); None: stay."""
    if name is None:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        yield
    finally:
        _libc.setns(home, CLONE_NEWNET)
        os.close(home)
        os.close(target)


def topology() -> None:
    clients = [("client", (CLIENT, NODE_IP, "")), ("client2", (CLIENT2, "192.168.60.1", ""))]
    for ns, (ip, gw, _) in [*PODS.items(), *clients]:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", f"v-{ns}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "addr", "add", f"{gw}/24", "dev", f"v-{ns}")
        sh("ip", "link", "set", f"v-{ns}", "up")
        for cmd in (
            ["addr", "add", f"{ip}/24", "dev", "eth0"],
            ["link", "set", "eth0", "up"],
            ["link", "set", "lo", "up"],
            ["route", "add", "default", "via", gw],
        ):
            sh("ip", "-n", ns, *cmd)


def serve(ns: str, name: str) -> None:
    """TCP 8080 and UDP 5353 in `ns`: each request line is answered with `name peer-ip`."""
    with netns(ns):
        tcp = socket.create_server(("0.0.0.0", 8080), backlog=64)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("0.0.0.0", 5353))

    def conversation(conn: socket.socket, peer: str) -> None:
        with conn:
            conn.settimeout(120)
            f = conn.makefile("rwb")
            for _ in range(1000):
                if not f.readline():
                    return
                f.write(f"{name} {peer}\n".encode())
                f.flush()

    def tcp_loop() -> None:
        while True:
            conn, (peer, _) = tcp.accept()
            threading.Thread(target=conversation, args=(conn, peer), daemon=True).start()

    def udp_loop() -> None:
        while True:
            _, (peer, port) = udp.recvfrom(2048)
            udp.sendto(f"{name} {peer}".encode(), (peer, port))

    threading.Thread(target=tcp_loop, daemon=True).start()
    threading.Thread(target=udp_loop, daemon=True).start()


class Conn:
    """A TCP conversation from namespace `ns` (None: the node)."""

    def __init__(self, ns: str | None, ip: str, port: int) -> None:
        with netns(ns):
            self.sock = socket.create_connection((ip, port), timeout=20)
        self.f = self.sock.makefile("rwb")

    def ask(self) -> tuple[str, str]:
        self.f.write(b"who\n")
        self.f.flush()
        line = self.f.readline().decode().split()
        if len(line) != 2:
            raise SystemExit(f"FAIL: no answer on {self.sock}")
        return line[0], line[1]

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def tcp(ns: str | None, ip: str, port: int) -> tuple[str, str]:
    c = Conn(ns, ip, port)
    try:
        return c.ask()
    finally:
        c.close()


def tcp_raw(ns: str | None, ip: str, port: int, timeout: float = 10) -> bool:
    """Whether a TCP connection to ip:port opens."""
    with netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with s:
        s.settimeout(timeout)
        return s.connect_ex((ip, port)) == 0


def udp(ns: str | None, ip: str, port: int) -> tuple[str, str]:
    with netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.settimeout(3)
        for _ in range(5):  # the first datagram of a flow may race conntrack; retry a little
            s.sendto(b"who", (ip, port))
            try:
                data = s.recv(2048).decode().split()
                return data[0], data[1]
            except TimeoutError:
                continue
    raise SystemExit(f"FAIL: no UDP answer from {ip}:{port}")


def check(what: str, ok: bool, detail: object = "") -> None:
    if not ok:
        raise SystemExit(f"FAIL: {what}: {detail}")
    print(f"ok: {what}", flush=True)


def service(
    name: str,
    ip: str,
    ports: list[dict[str, Any]],
    annotations: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    meta = {"namespace": "t", "name": name, "annotations": annotations or {}}
    return {
        "kind": "Service",
        "metadata": meta,
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": ports, **spec},
    }


def slice_(name: str, port: int, proto: str, pods: list[str]) -> dict[str, Any]:
    eps = [
        {
            "addresses": [PODS[p][0]],
            "nodeName": PODS[p][2],
            "conditions": {"ready": True, "serving": True, "terminating": False},
        }
        for p in pods
    ]
    return {
        "kind": "EndpointSlice",
        "addressType": "IPv4",
        "metadata": {
            "namespace": "t",
            "name": f"{name}-1",
            "labels": {"kubernetes.io/service-name": name},
        },
        "ports": [{"name": "p", "port": port, "protocol": proto}],
        "endpoints": eps,
    }


def services() -> list[dict[str, Any]]:
    tcp80 = [{"name": "p", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
    return [
        service(
            "web",
            "10.96.0.10",
            [{**tcp80[0], "nodePort": 30080}],
            type="NodePort",
            externalIPs=[EXTERNAL_IP],
        ),
        {
            **service(
                "lb",
                "10.96.0.15",
                tcp80,
                type="LoadBalancer",
                loadBalancerSourceRanges=[f"{CLIENT}/32"],
            ),
            "status": {"loadBalancer": {"ingress": [{"ip": LB_IP}]}},
        },
        service(
            "dns",
            "10.96.0.11",
            [{"name": "p", "port": 53, "targetPort": 5353, "protocol": "UDP", "nodePort": 30053}],
            type="NodePort",
        ),
        service(
            "sticky",
            "10.96.0.12",
            tcp80,
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
        ),
        service(
            "local",
            "10.96.0.13",
            [{**tcp80[0], "nodePort": 30081}],
            type="NodePort",
            externalTrafficPolicy="Local",
        ),
        service("wlc", "10.96.0.14", tcp80, {"kproxy.io/ipvs-scheduler": "wlc"}),
    ]


def slices(web: list[str]) -> list[dict[str, Any]]:
    both = ["pod1", "pod2"]
    return [
        slice_("web", 8080, "TCP", web),
        slice_("dns", 5353, "UDP", both),
        slice_("sticky", 8080, "TCP", both),
        slice_("local", 8080, "TCP", both),
        slice_("wlc", 8080, "TCP", both),
        slice_("lb", 8080, "TCP", both),
    ]


def answers(n: int, probe: Callable[[], tuple[str, str]]) -> Counter[tuple[str, str]]:
    return Counter(probe() for _ in range(n))


def ipvsadm() -> str:
    return sh("ipvsadm", "-Ln")


def table() -> dict[str, dict[str, int]]:
    """ipvsadm's listing: virtual server ("10.96.0.10:80/tcp") -> real server -> weight."""
    out: dict[str, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in ipvsadm().splitlines():
        parts = line.split()
        if parts and parts[0] in ("TCP", "UDP", "SCTP"):
            current = out.setdefault(f"{parts[1]}/{parts[0].lower()}", {})
        elif len(parts) >= 4 and parts[0] == "->" and current is not None and parts[2] == "Masq":
            current[parts[1]] = int(parts[3])
    return out


def tools_on_the_live_kernel(cfg: ProxyConfig, p: Proxier) -> None:
    """`kproxy trace --live` agrees with the rendered trace; `kproxy diff --live` is clean,
    then reports exactly what another program changed; a full sync repairs it."""
    manifests = Path("/tmp/kproxy-manifests")
    manifests.mkdir(exist_ok=True)
    objects = [*services(), *slices(["pod1", "pod2"])]
    (manifests / "all.json").write_text(json.dumps({"kind": "List", "items": objects}))
    cfg = replace(cfg, manifests=str(manifests))
    rendered = programmed(cfg, tools.snapshot(cfg), ("IPv4",)).engines["IPv4"]
    local = local_addresses()
    for src, dst, port in [
        (CLIENT, "10.96.0.10", 80),
        (CLIENT, NODE_IP, 30081),
        (CLIENT2, LB_IP, 80),
        (CLIENT, "10.96.0.10", 9999),
        (PODS["pod1"][0], "10.96.0.10", 80),
    ]:
        live = _core.trace_ipvs_live(_core.Packet(src, dst, "TCP", port, "external", local))
        want = rendered.trace(_core.Packet(src, dst, "TCP", port, "external", local))
        same = (live.dnat, live.masquerade, live.verdict) == (
            want.dnat,
            want.masquerade,
            want.verdict,
        )
        check(
            f"trace --live {src} -> {dst}:{port} equals the rendered trace",
            same,
            f"live {live.dnat} {live.masquerade} {live.verdict} / "
            f"want {want.dnat} {want.masquerade} {want.verdict}\n" + "\n".join(live.matched),
        )
    diff = tools.live_differences(cfg, "IPv4")
    check("diff --live: nothing differs after a sync", diff == [], diff)
    # Another program removes a real server and a set member, and adds a rule.
    sh("ipvsadm", "-d", "-t", "10.96.0.10:80", "-r", f"{PODS['pod2'][0]}:8080")
    sh("ipset", "del", "KUBE-CLUSTER-IP", "10.96.0.11,udp:53")
    sh("iptables", "-t", "nat", "-A", "KUBE-SERVICES", "-s", "192.0.2.1", "-j", "RETURN")
    diff = tools.live_differences(cfg, "IPv4")
    found = {(d.change, d.chain) for d in diff}
    check(
        "diff --live reports exactly what changed",
        found
        == {
            ("missing-virtual-server", "10.96.0.10:80/tcp"),
            ("unexpected-virtual-server", "10.96.0.10:80/tcp"),
            ("missing-ipset", "KUBE-CLUSTER-IP"),
            ("unexpected-rule", "KUBE-SERVICES"),
        }
        and len(diff) == 4,
        diff,
    )
    p.sync(ChangeSet(), True)  # rewrites our chains whole, the table and the sets
    diff = tools.live_differences(cfg, "IPv4")
    check("a full sync repairs the rules, the table and the sets", diff == [], diff)


# The node as kube-proxy's ipvs mode leaves it for the web Service (10.96.0.10:80 to pod1 and
# pod2 on 8080): upstream's names and set-driven rules (its layout: kube-proxy-features.md).
KUBE_PROXY_IPVS_RULES = """*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-SERVICES ! -s 10.244.0.0/16 -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ
-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -j MASQUERADE
COMMIT
"""


def kube_proxy_ipvs_node() -> None:
    sh("ip", "link", "add", "kube-ipvs0", "type", "dummy")
    sh("ip", "addr", "add", "10.96.0.10/32", "dev", "kube-ipvs0")
    sh("ipvsadm", "-A", "-t", "10.96.0.10:80", "-s", "rr")
    for pod in ("pod1", "pod2"):
        sh("ipvsadm", "-a", "-t", "10.96.0.10:80", "-r", f"{PODS[pod][0]}:8080", "-m")
    sh("ipset", "create", "KUBE-CLUSTER-IP", "hash:ip,port")
    sh("ipset", "add", "KUBE-CLUSTER-IP", "10.96.0.10,tcp:80")
    r = subprocess.run(
        ["iptables-restore", "--noflush"], input=KUBE_PROXY_IPVS_RULES, text=True,
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    check("kube-proxy's ipvs rules load", r.returncode == 0, r.stderr)


def probe_once(ip: str, port: int) -> str:
    """One new connection from the client: the answering pod, or what went wrong."""
    with netns("client"):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with s:
        s.settimeout(1.0)
        try:
            s.connect((ip, port))
            s.sendall(b"who\n")
            return s.recv(256).decode().split(" ")[0] or "empty"
        except OSError as e:
            return type(e).__name__


@contextmanager
def traffic_across(what: str) -> Iterator[None]:
    """Around the block: a connection held open through the web Service, and a new one every
    20 ms; afterwards, none of them may have failed and the held one must still answer."""
    held = Conn("client", "10.96.0.10", 80)
    pinned = held.ask()[0]
    results: list[str] = []
    stop = threading.Event()

    def prober() -> None:
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline and len(results) < 5000:
            results.append(probe_once("10.96.0.10", 80))
            time.sleep(0.02)

    t = threading.Thread(target=prober, daemon=True)
    t.start()
    time.sleep(1.0)
    try:
        yield
        time.sleep(1.0)
    finally:
        stop.set()
        t.join(timeout=30)
    failed = Counter(r for r in results if r not in PODS)
    check(
        f"no new connection failed {what}", len(results) > 20 and not failed,
        (len(results), failed),
    )  # fmt: skip
    check(f"the connection held {what} still answers", held.ask()[0] == pinned)
    held.close()


def http_status(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return 0, ""


def kubeadms_daemonset_in_ipvs_mode() -> None:
    """The drop-in in the ipvs mode: kubeadm's ConfigMap as it is with `mode: ipvs` (what a
    kubeadm user sets) and `ipvs.scheduler`, the daemon started as kubeadm's DaemonSet
    starts kube-proxy, against an API server: it serves /healthz and /metrics on upstream's
    defaulted addresses, programs the Services with the file's scheduler, detects local
    traffic by the cluster CIDR, and leaves nothing once stopped and cleaned up."""
    sys.path.insert(0, str(ROOT))
    from tests import k8sobjects
    from tests.fakeapi import FakeApiServer
    from tests.fakeapi.server import write_kubeconfig

    api = FakeApiServer(bookmark_interval=0.5)
    api.start()
    work = Path("/tmp/kproxy-kubeadm")
    work.mkdir(exist_ok=True)
    daemon: subprocess.Popen[bytes] | None = None
    try:
        api.put(k8sobjects.node(NODE, addresses=[NODE_IP]))
        for svc in services():
            api.put({"apiVersion": "v1", **svc})
        for sl in slices(["pod1", "pod2"]):
            api.put({"apiVersion": "discovery.k8s.io/v1", **sl})
        cm = yaml.safe_load((ROOT / "tests/fixtures/kubeadm-kube-proxy-configmap.yaml").read_text())
        doc = yaml.safe_load(cm["data"]["config.conf"])
        write_kubeconfig(work / "kubeconfig.conf", api.api_url)
        doc["clientConnection"]["kubeconfig"] = str(work / "kubeconfig.conf")
        doc["mode"] = "ipvs"
        doc["ipvs"]["scheduler"] = "wrr"
        (work / "config.conf").write_text(yaml.safe_dump(doc))
        log = (work / "kube-proxy.log").open("wb")
        daemon = subprocess.Popen(
            [str(Path(sys.executable).parent / "kube-proxy"), f"--config={work / 'config.conf'}",
             f"--hostname-override={NODE}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 90
        # Programmed: the virtual server, and then (after every family's engine) its address
        # on kube-ipvs0.
        while time.monotonic() < deadline and not (
            "10.96.0.10:80 wrr" in ipvsadm() and "10.96.0.10" in bound_addresses()
        ):
            if daemon.poll() is not None:
                check("kube-proxy keeps running", False, (work / "kube-proxy.log").read_text())
            time.sleep(0.5)
        text = (work / "kube-proxy.log").read_text()
        check("kubeadm's ConfigMap with mode: ipvs programs the file's scheduler",
              "10.96.0.10:80 wrr" in ipvsadm(), ipvsadm() + text[-3000:])  # fmt: skip
        check("...and warns of nothing", "not implemented" not in text, text[-3000:])
        check("/healthz answers on 0.0.0.0:10256",
              http_status(f"http://{NODE_IP}:10256/healthz")[0] == 200)  # fmt: skip
        status, body = http_status("http://127.0.0.1:10249/metrics")
        check("/metrics answers on 127.0.0.1:10249 with the ipvs mode's families",
              status == 200 and "kubeproxy_sync_proxy_rules_duration_seconds" in body
              and "kubeproxy_sync_proxy_rules_iptables_restore_failures_total" in body
              and "nftables" not in body, body[-2000:])  # fmt: skip
        check("/metrics is not on the node's address",
              http_status(f"http://{NODE_IP}:10249/metrics")[0] == 0)  # fmt: skip
        got = answers(8, lambda: tcp("client", "10.96.0.10", 80))
        check("its Services carry traffic", {n for n, _ in got} == {"pod1", "pod2"}, got)
        saved = sh("iptables-save", "-t", "nat")
        check("local traffic is detected by the cluster CIDR",
              "! -s 10.244.0.0/16" in saved, saved)  # fmt: skip
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.terminate()
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=10)
        api.close()
    check("kube-proxy stops on SIGTERM", daemon is not None and daemon.returncode == 0)
    check("kproxy cleanup after it succeeds", lifecycle.cleanup() == 0)
    check("...and leaves no kube-ipvs0", not os.path.exists("/sys/class/net/kube-ipvs0"))


def takeover_from_kube_proxy(cfg: ProxyConfig) -> None:
    """kproxy starts on a node kube-proxy's ipvs mode programmed, then hands it back: across
    each, a held connection survives and a new connection every 20 ms succeeds; after the
    takeover the node holds kproxy's rules alone (the live diff is empty)."""
    kube_proxy_ipvs_node()
    check("kube-proxy's rules serve the Service", tcp("client", "10.96.0.10", 80)[0] in PODS)
    with traffic_across("while kproxy took over from kube-proxy's ipvs mode"):
        c = Controller(NODE, wait_for_node=False)
        c.replace("services", services())
        c.replace("endpointslices", slices(["pod1", "pod2"]))
        p = Proxier(cfg, ["IPv4"], None)
        p.sync(c.drain(), True)
    # The manifests tools_on_the_live_kernel wrote: the same objects as this sync's.
    diff = tools.live_differences(replace(cfg, manifests="/tmp/kproxy-manifests"), "IPv4")
    check("after the takeover the node holds kproxy's rules, table and sets alone", not diff, diff)

    # And back: kproxy stops (its rules stay), kube-proxy's ipvs mode writes its own (the same
    # names), then `kproxy cleanup --hand-back` removes only what is kproxy's alone.
    with traffic_across("while the node went back to kube-proxy"):
        p.close()
        r = subprocess.run(
            ["iptables-restore", "--noflush"], input=KUBE_PROXY_IPVS_RULES, text=True,
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        check("kube-proxy's ipvs rules load over kproxy's", r.returncode == 0, r.stderr)
        check("the hand-back to kube-proxy's ipvs mode succeeds", lifecycle.hand_back() == 0)
    check("kube-proxy's virtual server is still there", "10.96.0.10:80/tcp" in table(), ipvsadm())
    check("kproxy cleanup after the hand-back succeeds", lifecycle.cleanup() == 0)


def a_missing_scheduler_is_contained(c: Controller, p: Proxier) -> None:
    """A Service whose scheduler module the node lacks is refused alone: the kernel answers
    its virtual server with ENOENT, the other change of the same sync lands, and the held
    Service is programmed by the first full sync after the module can be loaded."""
    release = os.uname().release
    built = Path(f"/lib/modules/{release}/modules.dep").read_text()
    loaded = {line.split()[0] for line in Path("/proc/modules").read_text().splitlines()}
    sched = next(
        (s for s in ("sed", "nq", "dh", "lblcr", "lblc", "fo", "ovf", "twos")
         if f"ip_vs_{s}" not in loaded and f"/ip_vs_{s}.ko" in built),
        None,
    )  # fmt: skip
    check("an unloaded scheduler module to refuse", sched is not None, sorted(loaded))
    assert sched is not None
    helper = Path("/proc/sys/kernel/modprobe")
    before = helper.read_text().strip()
    tcp80 = [{"name": "p", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
    held = "10.96.0.16:80/tcp"
    c.replace(
        "services",
        [*services(), service("nosched", "10.96.0.16", tcp80, {"kproxy.io/ipvs-scheduler": sched})],
    )
    c.replace(
        "endpointslices", [*slices(["pod1", "pod2"]), slice_("nosched", 8080, "TCP", ["pod1"])]
    )
    helper.write_text("/bin/false\n")  # this node cannot load the scheduler's module
    try:
        refused = p.sync(c.drain(), False)["IPv4"].refused
    finally:
        helper.write_text(before + "\n")
    check(
        f"a scheduler the kernel lacks ({sched}) is refused for its Service alone",
        [(ns, name) for ns, name, _ in refused] == [("t", "nosched")],
        refused,
    )
    dests = table()
    check(
        "...the same sync's other change lands",
        set(dests["10.96.0.10:80/tcp"]) == {"10.244.1.2:8080", "10.244.2.2:8080"},
        ipvsadm(),
    )
    check("...and the refused Service has no virtual server", held not in dests, ipvsadm())
    got = answers(8, lambda: tcp("client", "10.96.0.10", 80))
    check("...while the others serve", {n for n, _ in got} == {"pod1", "pod2"}, got)
    p.sync(c.drain(), True, retry_refused=True)
    check("once the module loads, a full sync programs it", held in table(), ipvsadm())
    got = answers(4, lambda: tcp("client", "10.96.0.16", 80))
    check("...and it serves", {n for n, _ in got} == {"pod1"}, got)


def main() -> int:
    sh("modprobe", "ip_vs")
    topology()
    for ns in PODS:
        serve(ns, ns)
    cfg = build(
        None,
        {
            "mode": "ipvs",
            "hostname_override": NODE,
            "cluster_cidrs": ("10.244.0.0/16",),
            "ipvs_tcp_fin_timeout": 2.0,
        },
    )
    c = Controller(NODE, wait_for_node=False)
    c.replace("services", services())
    c.replace("endpointslices", slices(["pod1", "pod2"]))
    p = Proxier(cfg, ["IPv4"], None)
    p.sync(c.drain(), True)
    print(ipvsadm(), flush=True)
    check(
        "kube-ipvs0 holds the ClusterIPs",
        {"10.96.0.10", "10.96.0.11", "10.96.0.12", "10.96.0.13"} <= bound_addresses(),
    )
    check("the per-Service scheduler annotation", "10.96.0.14:80 wlc" in ipvsadm(), ipvsadm())
    web = "10.96.0.10:80/tcp"
    check("every real server is masqueraded", len(table()[web]) == 2, ipvsadm())

    # ClusterIP from outside the cluster: both endpoints, masqueraded (not the client's IP).
    got = answers(12, lambda: tcp("client", "10.96.0.10", 80))
    check("TCP ClusterIP reaches both endpoints", {n for n, _ in got} == {"pod1", "pod2"}, got)
    check("off-cluster ClusterIP traffic is masqueraded", all(s != CLIENT for _, s in got), got)
    # From this node's pod: its own address is kept; reaching itself through the Service
    # (hairpin) is masqueraded, so its replies come back through the node.
    got = answers(12, lambda: tcp("pod1", "10.96.0.10", 80))
    check("pod-to-ClusterIP keeps the pod's source", ("pod2", PODS["pod1"][0]) in got, got)
    check(
        "hairpin: a pod reaches itself through its Service", ("pod1", PODS["pod1"][1]) in got, got
    )
    # NodePort from outside: both endpoints, masqueraded.
    got = answers(12, lambda: tcp("client", NODE_IP, 30080))
    check("TCP NodePort reaches both endpoints", {n for n, _ in got} == {"pod1", "pod2"}, got)
    check("NodePort traffic is masqueraded", all(s != CLIENT for _, s in got), got)
    # UDP through the ClusterIP and the NodePort.
    got = answers(8, lambda: udp("client", "10.96.0.11", 53))
    check("UDP ClusterIP reaches both endpoints", {n for n, _ in got} == {"pod1", "pod2"}, got)
    got = answers(8, lambda: udp("client", NODE_IP, 30053))
    check("UDP NodePort reaches both endpoints", {n for n, _ in got} == {"pod1", "pod2"}, got)
    check("UDP NodePort traffic is masqueraded", all(s != CLIENT for _, s in got), got)
    # An externalIP and a load balancer's address, from outside.
    got = answers(8, lambda: tcp("client", EXTERNAL_IP, 80))
    check(
        "externalIP reaches both endpoints, masqueraded",
        {n for n, _ in got} == {"pod1", "pod2"} and all(s != CLIENT for _, s in got),
        got,
    )
    got = answers(8, lambda: tcp("client", LB_IP, 80))
    check(
        "LB IP reaches both endpoints from an allowed source",
        {n for n, _ in got} == {"pod1", "pod2"},
        got,
    )
    check("loadBalancerSourceRanges drop other sources", not tcp_raw("client2", LB_IP, 80, 3))
    check("...which still reach the ClusterIP", tcp_raw("client2", "10.96.0.15", 80))
    # ClientIP affinity: one client, one endpoint.
    got = answers(10, lambda: tcp("client", "10.96.0.12", 80))
    check("ClientIP affinity pins the client to one endpoint", len({n for n, _ in got}) == 1, got)
    # eTP Local NodePort: only this node's endpoint, and the client's address is preserved.
    got = answers(10, lambda: tcp("client", NODE_IP, 30081))
    check("eTP Local NodePort goes to the local endpoint only", set(got) == {("pod1", CLIENT)}, got)
    # The node's own ports are not reachable through a Service address (KUBE-IPVS-FILTER).
    with netns(None):
        guard = socket.create_server(("0.0.0.0", 9999))
    try:
        refused = False
        try:
            tcp("client", "10.96.0.10", 9999)
        except ConnectionRefusedError:
            refused = True
        check("a node port is not reachable through a Service address", refused)
        check("...but is through the node's own address", tcp_raw("client", NODE_IP, 9999))
    finally:
        guard.close()

    tools_on_the_live_kernel(cfg, p)

    # Graceful termination: an open connection to an endpoint that leaves keeps working; the
    # real server stays at weight 0 until its connections are gone, then is deleted.
    held = [Conn("client", "10.96.0.10", 80) for _ in range(4)]
    on = {h.ask()[0]: h for h in held}
    leaving = "pod2" if "pod2" in on else "pod1"
    staying = "pod1" if leaving == "pod2" else "pod2"
    c.replace("endpointslices", slices([staying]))
    p.sync(c.drain(), False)
    dests = table()[web]
    check(
        "a leaving TCP endpoint drains at weight 0",
        dests == {f"{PODS[leaving][0]}:8080": 0, f"{PODS[staying][0]}:8080": 1},
        dests,
    )
    check("its open connection still works", on[leaving].ask()[0] == leaving)
    got = answers(8, lambda: tcp("client", "10.96.0.10", 80))
    check("new connections avoid the draining endpoint", {n for n, _ in got} == {staying}, got)
    for h in held:
        h.close()
    gone = False
    for _ in range(60):  # FIN timeout 2 s (ipvs.tcpFinTimeout); bounded wait
        time.sleep(1)
        p.sync(c.drain(), True)
        if table()[web] == {f"{PODS[staying][0]}:8080": 1}:
            gone = True
            break
    check("the drained endpoint is deleted once its connections are gone", gone, ipvsadm())

    a_missing_scheduler_is_contained(c, p)

    # Deleting every Service removes every virtual server, address and set member.
    c.replace("services", [])
    c.replace("endpointslices", [])
    p.sync(c.drain(), False)
    check("no virtual servers left", table() == {}, ipvsadm())
    check(
        "kube-ipvs0 emptied",
        os.path.exists("/sys/class/net/kube-ipvs0") and not bound_addresses(),
        str(bound_addresses()),
    )
    check("ipsets emptied", "10.96.0" not in sh("ipset", "save"), sh("ipset", "save"))
    p.close()
    check("kproxy cleanup succeeds", lifecycle.cleanup() == 0)
    check("cleanup removed kube-ipvs0", not os.path.exists("/sys/class/net/kube-ipvs0"))
    check("cleanup removed the chains", "KUBE-IPVS-FILTER" not in sh("iptables-save"))
    check("cleanup removed the ipsets", "KUBE-" not in sh("ipset", "list", "-n"))
    kubeadms_daemonset_in_ipvs_mode()
    takeover_from_kube_proxy(cfg)
    print("IPVS-TRAFFIC-DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
