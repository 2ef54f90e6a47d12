"""An isolated "Kubernetes node" built from Linux network namespaces.

Layout (all routed L3, no bridges, so every reply crosses the node and its
conntrack table)::

    pod i     eth0 10.244.i.2/24, fd00:10:244:i::2/64  --veth--  node vp<i> .1 / ::1
    client j  eth0 192.168.(100+j).2/24, fd00:192:168:(100+j)::2/64 --veth-- node vc<j> .1 / ::1
    node      dummy0 (a discard interface) holds the default routes (v4+v6), so
              unassigned VIPs have a route but whatever is sent there is dropped

Safety: the namespaces are wired only to each other.  Veth pairs are always
created from inside the node namespace with the peer placed directly in
another lab namespace, so no interface, address, route or sysctl is ever
added to the host namespace, and nothing a test sends can leave the lab.
Cleanup removes exactly the namespaces and processes this instance created.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import secrets
import shutil
import subprocess
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, ClassVar

from tests.netlab import servers
from tests.netlab.servers import NetlabError, ProbeResult, Server, TcpSession

IP_TIMEOUT = 10.0
MAX_PODS = 254  # third octet of 10.244.<i>.0/24
MAX_CLIENTS = 155  # third octet 100+j must stay <= 255
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
# Probes only target non-loopback addresses from namespaces named like this.
_PREFIX_RE = re.compile(rf"^{servers.LAB_NS_PREFIX}[a-z0-9-]{{1,24}}$")


def _run(argv: Sequence[str], timeout: float = IP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a setup command; raise NetlabError with its stderr on failure."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise NetlabError(f"timed out after {timeout}s: {' '.join(argv)}") from exc
    if done.returncode != 0:
        raise NetlabError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done


def list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    done = _run(["ip", "netns", "list"])
    # Lines look like "name" or "name (id: 3)".
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


@functools.cache
def netlab_unavailable_reason() -> str | None:
    """Why labs cannot be built here, or None if they can (cached per process)."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "iproute2 'ip' not found"
    probe = f"kpt-{secrets.token_hex(3)}-check"
    try:
        _run(["ip", "netns", "add", probe])
    except (NetlabError, OSError) as exc:
        return f"ip netns unusable: {exc}"
    try:
        _run(["ip", "-n", probe, "link", "set", "lo", "up"])
    except (NetlabError, OSError) as exc:
        return f"ip netns unusable: {exc}"
    finally:
        subprocess.run(
            ["ip", "netns", "del", probe], capture_output=True, timeout=IP_TIMEOUT, check=False
        )
    return None


class ProcessTracker:
    """Popen handles started in a lab, so cleanup kills exactly those."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[str]] = []

    def add(self, proc: subprocess.Popen[str]) -> None:
        self._procs.append(proc)

    @property
    def processes(self) -> tuple[subprocess.Popen[str], ...]:
        return tuple(self._procs)

    def terminate_all(self, timeout: float = 3.0) -> None:
        # Newest first: later processes (clients) may depend on earlier ones.
        for proc in reversed(self._procs):
            try:
                servers.terminate_process(proc, timeout)
            except Exception as exc:  # keep going: cleanup must not stop halfway
                warnings.warn(f"netlab: could not stop pid {proc.pid}: {exc}", stacklevel=2)


@dataclass(frozen=True, kw_only=True)
class NetNs:
    """A lab namespace: ``name`` is the logical name, ``ns`` the real netns name."""

    name: str
    ns: str
    tracker: ProcessTracker = field(repr=False, compare=False)

    def exec(
        self,
        args: Sequence[str],
        *,
        timeout: float = 30.0,
        check: bool = False,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``args`` in this namespace to completion (text, output captured)."""
        return subprocess.run(
            servers.netns_argv(self.ns, args),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            input=input,
        )

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """Start ``args`` in this namespace; the lab kills it on close.

        Always text mode and always its own session (so cleanup can signal the
        whole process group it forms); other Popen options pass through.
        """
        opts: dict[str, Any] = {**kwargs, "text": True, "start_new_session": True}
        for conflicting in ("universal_newlines", "process_group"):
            opts.pop(conflicting, None)
        proc: subprocess.Popen[str] = subprocess.Popen(servers.netns_argv(self.ns, args), **opts)
        self.tracker.add(proc)
        return proc

    # -- servers -----------------------------------------------------------

    def start_tcp_server(
        self, port: int, name: str | None = None, *, bind: str = "::", echo: bool = False
    ) -> Server:
        """TCP server answering ``"<name> <peer-ip> <line>"``; ``echo`` keeps connections open."""
        return servers.start_server(
            self.ns, "tcp", port, name=name or self.name, bind=bind, echo=echo, launcher=self.popen
        )

    def start_udp_server(self, port: int, name: str | None = None, *, bind: str = "::") -> Server:
        """UDP server answering each datagram with ``"<name> <peer-ip> <payload>"``."""
        return servers.start_server(
            self.ns, "udp", port, name=name or self.name, bind=bind, launcher=self.popen
        )

    # -- probes ------------------------------------------------------------

    def tcp_probe(
        self, ip: str, port: int, payload: str = "ping", timeout: float = 2.0
    ) -> ProbeResult:
        """One connection sending ``payload``; ``timeout`` bounds connect plus reply."""
        return servers.tcp_probe(self.ns, ip, port, payload, timeout)

    def tcp_probe_many(
        self, ip: str, port: int, count: int, timeout: float = 2.0, *, payload: str = "ping"
    ) -> list[ProbeResult]:
        """``count`` sequential connections from one helper process (for load-spread checks)."""
        return servers.tcp_probe_many(self.ns, ip, port, count, timeout, payload=payload)

    def udp_probe(
        self,
        ip: str,
        port: int,
        payload: str = "ping",
        timeout: float = 2.0,
        *,
        src_port: int | None = None,
    ) -> ProbeResult:
        """One datagram; no answer -> "timeout", ICMP port-unreachable -> "refused"."""
        return servers.udp_probe(self.ns, ip, port, payload, timeout, src_port=src_port)

    def tcp_session(self, ip: str, port: int, timeout: float = 2.0) -> TcpSession:
        """Hold one TCP connection open (pair with ``start_tcp_server(..., echo=True)``)."""
        return TcpSession(self.ns, ip, port, timeout=timeout, launcher=self.popen)


@dataclass(frozen=True, kw_only=True)
class Node(NetNs):
    """The node: forwards between pods and clients; where kproxy programs its rules."""

    dummy_ifname: str = "dummy0"


@dataclass(frozen=True, kw_only=True)
class Endpoint(NetNs):
    """A pod or client: one veth (``eth0``) to the node, default routes via the node."""

    index: int
    ip: str
    ip6: str
    gateway: str
    gateway6: str
    host_ifname: str  # the node-side end of the veth, in the node namespace
    ifname: str = "eth0"


@dataclass(frozen=True, kw_only=True)
class Pod(Endpoint):
    """A pod: ``10.244.<i>.2`` / ``fd00:10:244:<i>::2``."""


@dataclass(frozen=True, kw_only=True)
class Client(Endpoint):
    """An external host: ``192.168.<100+j>.2`` / ``fd00:192:168:<100+j>::2``."""


class NodeLab:
    """A node namespace plus pods and external clients, torn down on ``close()``.

    Use as a context manager.  Cleanup is idempotent and also registered with
    ``atexit`` in case the test process exits without reaching ``close()``.
    """

    cluster_cidr: ClassVar[str] = "10.244.0.0/16"
    cluster_cidr6: ClassVar[str] = "fd00:10:244::/48"
    service_cidr: ClassVar[str] = "10.96.0.0/12"
    service_cidr6: ClassVar[str] = "fd00:10:96::/112"
    # Inside the cluster CIDR but in no pod subnet (pods use .1-.254), so only
    # the node's dummy0 default route matches: packets are silently dropped.
    blackhole_ip: ClassVar[str] = "10.244.255.254"
    blackhole_ip6: ClassVar[str] = "fd00:10:244:ffff::fe"

    def __init__(self, *, prefix: str | None = None) -> None:
        self._namespaces: list[str] = []
        self._tracker = ProcessTracker()
        self._pods: dict[str, Pod] = {}
        self._clients: dict[str, Client] = {}
        self._pod_seq = 0
        self._client_seq = 0
        self._closed = False
        self.prefix = prefix or self._fresh_prefix()
        if not _PREFIX_RE.match(self.prefix):
            raise ValueError(f"prefix must match {_PREFIX_RE.pattern}: {self.prefix!r}")
        atexit.register(self.close)
        try:
            self.node = self._make_node()
        except BaseException:
            self.close()
            raise

    # -- construction --------------------------------------------------------

    @staticmethod
    def _fresh_prefix() -> str:
        existing = list_netns()
        for _ in range(100):
            prefix = f"{servers.LAB_NS_PREFIX}{secrets.token_hex(3)}"
            if not any(ns.startswith(prefix + "-") for ns in existing):
                return prefix
        raise NetlabError("could not find an unused namespace prefix")

    def _add_netns(self, suffix: str) -> str:
        name = f"{self.prefix}-{suffix}"
        _run(["ip", "netns", "add", name])
        # Recorded only after `add` succeeded, so cleanup can never delete a
        # namespace that someone else created under the same name.
        self._namespaces.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        # No duplicate address detection on interfaces created later in this
        # namespace.  `nodad` alone covers only the global addresses; while a
        # link-local address is still tentative (~1-2 s) the kernel will not
        # send neighbour solicitations for forwarded packets, so the first
        # IPv6 connections through a fresh node would stall.
        self._sysctl(
            name,
            {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0"},
        )
        return name

    @staticmethod
    def _sysctl(ns: str, settings: Mapping[str, str]) -> None:
        # `ip netns exec` makes the writes land in the lab namespace's own
        # copies of these (per-netns) sysctls, never in the host's.
        args = [f"{key}={value}" for key, value in settings.items()]
        _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *args])

    def _make_node(self) -> Node:
        ns = self._add_netns("node")
        self._sysctl(ns, {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"})
        ip = ["ip", "-n", ns]
        self._make_discard_interface(ns, "dummy0")
        _run([*ip, "-4", "route", "add", "default", "dev", "dummy0"])
        _run([*ip, "-6", "route", "add", "default", "dev", "dummy0"])
        return Node(name="node", ns=ns, tracker=self._tracker)

    @staticmethod
    def _make_discard_interface(ns: str, ifname: str) -> None:
        """Give ``ns`` an interface that silently swallows everything routed to it.

        A ``dummy`` device would be the obvious choice, but not every kernel
        has the driver (and asking for it could load a module on the host).
        Instead: a veth pair with both ends in ``ns`` and ARP off on
        ``ifname``.  With ARP off the kernel addresses frames to the sending
        device's own MAC, so the peer sees them as meant for another host and
        drops them before any netfilter hook: no reply, no ICMP, no conntrack.
        """
        peer = f"{ifname}-sink"
        ip = ["ip", "-n", ns]
        _run([*ip, "link", "add", ifname, "type", "veth", "peer", "name", peer])
        for dev in (ifname, peer):
            # No link-local addresses: nothing should ever be sent on this link
            # except what is routed into it.
            _run([*ip, "link", "set", dev, "addrgenmode", "none"])
        _run([*ip, "link", "set", ifname, "arp", "off"])
        _run([*ip, "link", "set", peer, "up"])
        _run([*ip, "link", "set", ifname, "up"])

    def _check_name(self, name: str) -> None:
        if self._closed:
            raise NetlabError("lab is closed")
        if not _NAME_RE.match(name) or name == "node":
            raise ValueError(f"bad name {name!r}: use [a-z0-9-], not 'node'")
        if name in self._pods or name in self._clients:
            raise ValueError(f"name {name!r} already used in this lab")

    def _wire(self, ns: str, host_if: str, v4_net: str, v6_net: str) -> tuple[str, str, str, str]:
        """Veth node<->ns with .1/.2 (v4) and ::1/::2 (v6); returns (ip, ip6, gw, gw6)."""
        node = self.node.ns
        # Created from inside the node namespace with the peer placed straight
        # into the lab namespace: neither end ever exists in the host namespace.
        veth = ["type", "veth", "peer", "name", "eth0", "netns", ns]
        _run(["ip", "-n", node, "link", "add", host_if, *veth])
        gw, ip = f"{v4_net}.1", f"{v4_net}.2"
        gw6, ip6 = f"{v6_net}::1", f"{v6_net}::2"
        # nodad: addresses are usable at once instead of after ~1 s of DAD.
        _run(["ip", "-n", node, "addr", "add", f"{gw}/24", "dev", host_if])
        _run(["ip", "-n", node, "-6", "addr", "add", f"{gw6}/64", "dev", host_if, "nodad"])
        _run(["ip", "-n", node, "link", "set", host_if, "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0"])
        _run(["ip", "-n", ns, "-6", "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", ns, "-4", "route", "add", "default", "via", gw])
        _run(["ip", "-n", ns, "-6", "route", "add", "default", "via", gw6])
        return ip, ip6, gw, gw6

    def add_pod(self, name: str) -> Pod:
        """Pod number i (from 1): ``10.244.<i>.2/24``, ``fd00:10:244:<i>::2/64``."""
        self._check_name(name)
        if self._pod_seq >= MAX_PODS:
            raise NetlabError(f"at most {MAX_PODS} pods")
        self._pod_seq += 1
        i = self._pod_seq
        ns = self._add_netns(name)
        host_if = f"vp{i}"
        ip, ip6, gw, gw6 = self._wire(ns, host_if, f"10.244.{i}", f"fd00:10:244:{i}")
        pod = Pod(
            name=name,
            ns=ns,
            tracker=self._tracker,
            index=i,
            ip=ip,
            ip6=ip6,
            gateway=gw,
            gateway6=gw6,
            host_ifname=host_if,
        )
        self._pods[name] = pod
        return pod

    def add_client(self, name: str) -> Client:
        """Client number j (from 1): ``192.168.<100+j>.2/24``, ``fd00:192:168:<100+j>::2/64``."""
        self._check_name(name)
        if self._client_seq >= MAX_CLIENTS:
            raise NetlabError(f"at most {MAX_CLIENTS} clients")
        self._client_seq += 1
        j = self._client_seq
        ns = self._add_netns(name)
        host_if = f"vc{j}"
        octet = 100 + j
        ip, ip6, gw, gw6 = self._wire(ns, host_if, f"192.168.{octet}", f"fd00:192:168:{octet}")
        client = Client(
            name=name,
            ns=ns,
            tracker=self._tracker,
            index=j,
            ip=ip,
            ip6=ip6,
            gateway=gw,
            gateway6=gw6,
            host_ifname=host_if,
        )
        self._clients[name] = client
        return client

    # -- accessors -----------------------------------------------------------

    @property
    def pods(self) -> Mapping[str, Pod]:
        return MappingProxyType(self._pods)

    @property
    def clients(self) -> Mapping[str, Client]:
        return MappingProxyType(self._clients)

    def pod(self, name: str) -> Pod:
        return self._pods[name]

    def client(self, name: str) -> Client:
        return self._clients[name]

    @property
    def node_ip(self) -> str:
        """The node's primary IPv4: its side of client 1's link (exists once a client is added)."""
        return "192.168.101.1"

    @property
    def node_ip6(self) -> str:
        return "fd00:192:168:101::1"

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Namespaces created (and not yet deleted) by this lab."""
        return tuple(self._namespaces)

    @property
    def processes(self) -> tuple[subprocess.Popen[str], ...]:
        """Every process started through this lab's namespaces."""
        return self._tracker.processes

    @property
    def closed(self) -> bool:
        return self._closed

    # -- teardown ------------------------------------------------------------

    def close(self) -> None:
        """Kill this lab's processes and delete its namespaces; safe to call repeatedly."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        # Processes first: a namespace with live processes outlives `ip netns del`.
        self._tracker.terminate_all()
        for ns in reversed(self._namespaces):
            self._delete_netns(ns)
        self._namespaces.clear()

    @staticmethod
    def _delete_netns(ns: str) -> None:
        try:
            pids = subprocess.run(
                ["ip", "netns", "pids", ns],
                capture_output=True,
                text=True,
                timeout=IP_TIMEOUT,
                check=False,
            ).stdout.split()
            if pids:
                # Not ours to kill (we only kill what we started): just say so.
                warnings.warn(
                    f"netlab: processes {pids} still run in {ns}; it lingers until they exit",
                    stacklevel=3,
                )
            done = subprocess.run(
                ["ip", "netns", "del", ns],
                capture_output=True,
                text=True,
                timeout=IP_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            warnings.warn(f"netlab: could not delete {ns}: {exc}", stacklevel=3)
            return
        if done.returncode != 0 and "No such file" not in done.stderr:
            warnings.warn(f"netlab: could not delete {ns}: {done.stderr.strip()}", stacklevel=3)

    def __enter__(self) -> NodeLab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"NodeLab(prefix={self.prefix!r}, pods={list(self._pods)}, "
            f"clients={list(self._clients)}, closed={self._closed})"
        )
