"""Tiny TCP/UDP test servers and client probes for network-namespace labs.

Everything that touches the network runs as a *subprocess* inside a lab
namespace (``ip netns exec NS python -m tests.netlab.servers ...``), so the
test process itself never opens a socket in the host namespace.  The same
file is both the library (``start_server``, ``tcp_probe``...) used by tests
and the command-line program those subprocesses run (``serve``, ``probe``,
``session``).

Wire format: every reply is ``"<server-name> <peer-ip> <payload>"`` (TCP adds
a trailing newline), so a test can tell which backend answered and which
source address that backend saw (i.e. whether the node SNAT'ed the flow).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

REPO_ROOT = Path(__file__).resolve().parents[2]

Proto = Literal["tcp", "udp"]

# Bounds: every loop below is limited both in count and in time so that a
# forgotten server or probe cannot run (or send) forever.
MAX_LINE = 4096
DEFAULT_LIFETIME = 900.0  # a server exits by itself after this many seconds
ONE_SHOT_READ_TIMEOUT = 5.0
ECHO_IDLE_TIMEOUT = 120.0
MAX_ECHO_LINES = 100_000
MAX_CONNECTIONS = 1_000_000
MAX_HANDLER_THREADS = 256
MAX_PROBE_COUNT = 10_000
MAX_SESSION_LINES = 100_000
SESSION_LIFETIME = 900.0
# Extra wall-clock allowance for interpreter start-up inside `ip netns exec`.
SUBPROCESS_SLACK = 20.0

# Every lab namespace name starts with this; probes rely on it (see below).
LAB_NS_PREFIX = "kpt-"
NETNS_DIR = "/run/netns"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,62}$")


class NetlabError(RuntimeError):
    """The lab harness itself failed (as opposed to a probe that did not connect)."""


# --------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Reply:
    """What a test server said: who it is and which source address it saw."""

    server: str
    peer: str
    payload: str

    @classmethod
    def parse(cls, text: str) -> Reply | None:
        parts = text.rstrip("\r\n").split(" ", 2)
        if len(parts) < 2 or not parts[0] or not parts[1]:
            return None
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of one probe.

    ``error`` is ``None`` when ``ok``; otherwise one of ``"refused"``,
    ``"timeout"``, ``"unreachable"``, ``"closed"`` (peer closed without a
    reply), ``"badreply"`` or an errno name such as ``"ECONNRESET"``.
    """

    ok: bool
    reply: Reply | None
    error: str | None
    elapsed: float

    @property
    def server(self) -> str | None:
        return self.reply.server if self.reply else None

    @property
    def peer(self) -> str | None:
        return self.reply.peer if self.reply else None

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "server": self.server,
            "peer": self.peer,
            "payload": self.reply.payload if self.reply else None,
            "error": self.error,
            "elapsed": round(self.elapsed, 6),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ProbeResult:
        reply = None
        if obj.get("server") is not None and obj.get("peer") is not None:
            reply = Reply(str(obj["server"]), str(obj["peer"]), str(obj.get("payload") or ""))
        error = obj.get("error")
        return cls(
            ok=bool(obj["ok"]),
            reply=reply,
            error=None if error is None else str(error),
            elapsed=float(obj["elapsed"]),
        )


def _ok(reply_text: str, start: float) -> ProbeResult:
    reply = Reply.parse(reply_text)
    elapsed = time.monotonic() - start
    if reply is None:
        return ProbeResult(False, None, "badreply", elapsed)
    return ProbeResult(True, reply, None, elapsed)


def _fail(error: str, start: float) -> ProbeResult:
    return ProbeResult(False, None, error, time.monotonic() - start)


def error_name(exc: BaseException) -> str:
    """Map a socket exception to the short vocabulary tests assert on."""
    if isinstance(exc, TimeoutError):  # socket.timeout and ETIMEDOUT alike
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return "unreachable"
        return errno.errorcode.get(exc.errno, f"errno{exc.errno}")
    return type(exc).__name__


# --------------------------------------------------------------------------
# Helpers shared by both sides


def family_of(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET


def normalize_peer(host: str) -> str:
    """Report IPv4 clients of a dual-stack socket as plain IPv4 (not ::ffff:a.b.c.d)."""
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _in_lab_netns() -> bool:
    """True if this process runs in a named lab namespace (``/run/netns/kpt-*``).

    Matched by inode against the bind mounts ``ip netns`` keeps, so it is a
    positive identification; anything else (the host namespace included)
    counts as "not a lab".
    """
    try:
        mine = os.stat("/proc/self/ns/net")
        names = os.listdir(NETNS_DIR)
    except OSError:
        return False
    for name in names[:10_000]:
        if not name.startswith(LAB_NS_PREFIX):
            continue
        try:
            st = os.stat(os.path.join(NETNS_DIR, name))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
            return True
    return False


def _check_target_allowed(ip: str) -> None:
    # Inside a lab namespace nothing can leave the lab, so any target is safe.
    # Anywhere else (e.g. the helper started by hand in the host namespace)
    # only loopback is.
    if not ipaddress.ip_address(ip).is_loopback and not _in_lab_netns():
        raise SystemExit(f"refusing to probe {ip}: not running in a {LAB_NS_PREFIX}* namespace")


class _SocketLines:
    """Line reader over a socket with a hard cap on buffered bytes."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""

    def readline(self, deadline: float | None = None) -> bytes | None:
        """Next line without its newline; None on EOF with nothing buffered.

        A line longer than MAX_LINE, or data followed by EOF, is returned as is.
        """
        for _ in range(MAX_LINE + 1):  # each pass adds >= 1 byte or returns
            if b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                return line
            if len(self._buf) >= MAX_LINE:
                line, self._buf = self._buf, b""
                return line
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("timed out")
                self._sock.settimeout(remaining)
            chunk = self._sock.recv(MAX_LINE)
            if not chunk:
                line, self._buf = self._buf, b""
                return line or None
            self._buf += chunk
        return None


class _FdLines:
    """Line reader over a pipe fd with deadlines (select-based, no blocking reads)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = b""
        self.eof = False

    def readline(self, timeout: float) -> str | None:
        """Next line, or None on EOF; raises TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        for _ in range(1_000_000):  # bounded; the deadline normally ends it first
            if b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                return line.decode(errors="replace")
            if self.eof:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out waiting for a line")
            ready, _, _ = select.select([self._fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(self._fd, 65536)
            if not chunk:
                self.eof = True
            self._buf += chunk
        raise TimeoutError("too many reads without a line")


# --------------------------------------------------------------------------
# Process management (used by the lab as well)


def terminate_process(proc: subprocess.Popen[str], timeout: float = 3.0) -> None:
    """Stop a process we started, politely then forcibly; never raises if it is gone.

    Processes are started with ``start_new_session=True`` so the PID is also a
    process-group id; signalling the group also catches helpers it may have
    forked.  We only signal while the child is un-reaped (returncode is None):
    until we reap it, its PID (and so that group id) cannot be reused by an
    unrelated process.
    """
    if proc.returncode is None:
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                # Not a group leader (or group already empty): signal the PID itself.
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
            except PermissionError:
                proc.send_signal(sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def subprocess_env() -> dict[str, str]:
    """Environment for helper subprocesses: the repo root importable, unbuffered output."""
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) if not old else os.pathsep.join([str(REPO_ROOT), old])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def helper_command(*args: str) -> list[str]:
    """Command line running this module.

    ``-W ignore::RuntimeWarning:runpy`` silences runpy's "found in sys.modules"
    warning: importing the ``tests.netlab`` package already imports this
    module before ``-m`` executes it, which is harmless here.
    """
    return [
        sys.executable,
        "-W",
        "ignore::RuntimeWarning:runpy",
        "-m",
        "tests.netlab.servers",
        *args,
    ]


def netns_argv(ns: str, args: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *args]


class Launcher(Protocol):
    """Starts ``args`` inside a namespace (``NetNs.popen`` matches this)."""

    def __call__(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]: ...


def _plain_launcher(ns: str) -> Launcher:
    def launch(args: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        opts: dict[str, Any] = {**kwargs, "text": True, "start_new_session": True}
        proc: subprocess.Popen[str] = subprocess.Popen(netns_argv(ns, args), **opts)
        return proc

    return launch


# --------------------------------------------------------------------------
# Caller side: servers


@dataclass(frozen=True)
class Server:
    """A running test server; ``port`` is the bound port (useful with port 0)."""

    ns: str
    proto: Proto
    name: str
    bind: str
    port: int
    echo: bool
    process: subprocess.Popen[str] = field(repr=False, compare=False)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 3.0) -> None:
        terminate_process(self.process, timeout)


def _validate_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(f"bad server name {name!r} (no spaces; [A-Za-z0-9._:-], max 63)")


def start_server(
    ns: str,
    proto: Proto,
    port: int,
    *,
    name: str,
    bind: str = "::",
    echo: bool = False,
    lifetime: float = DEFAULT_LIFETIME,
    ready_timeout: float = 15.0,
    launcher: Launcher | None = None,
) -> Server:
    """Start a test server in namespace ``ns`` and wait until it is listening.

    ``launcher`` lets the lab track the process for cleanup; without one the
    caller owns the returned ``Server`` and must ``stop()`` it.
    """
    _validate_name(name)
    ipaddress.ip_address(bind)  # fail early, in the caller, on a bad address
    if echo and proto != "tcp":
        raise ValueError("echo mode is TCP only")
    args = [
        "serve",
        "--proto",
        proto,
        "--port",
        str(port),
        "--bind",
        bind,
        "--name",
        name,
        "--lifetime",
        str(lifetime),
    ]
    if echo:
        args.append("--echo")
    launch = launcher or _plain_launcher(ns)
    proc = launch(
        helper_command(*args),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        # The server writes to stderr only when it fails to start, so an
        # unread pipe cannot fill up and block it later.
        stderr=subprocess.PIPE,
        cwd=str(REPO_ROOT),
        env=subprocess_env(),
    )
    try:
        bound = _wait_ready(proc, ready_timeout)
    except BaseException:
        terminate_process(proc)
        raise
    return Server(ns, proto, name, bind, bound, echo, proc)


def _wait_ready(proc: subprocess.Popen[str], timeout: float) -> int:
    assert proc.stdout is not None
    lines = _FdLines(proc.stdout.fileno())
    try:
        line = lines.readline(timeout)
    except TimeoutError:
        raise NetlabError(f"server did not become ready within {timeout}s") from None
    if line is None or not line.startswith("READY "):
        stderr = ""
        try:
            proc.wait(timeout=5)
            if proc.stderr is not None:
                stderr = proc.stderr.read()
        except (subprocess.TimeoutExpired, OSError, ValueError):
            pass
        raise NetlabError(f"server failed to start (got {line!r}): {stderr.strip()}")
    return int(line.split()[1])


# --------------------------------------------------------------------------
# Caller side: probes


def _run_helper(ns: str, args: Sequence[str], budget: float) -> dict[str, Any]:
    cmd = netns_argv(ns, helper_command(*args))
    try:
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=budget + SUBPROCESS_SLACK,
            cwd=str(REPO_ROOT),
            env=subprocess_env(),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise NetlabError(f"probe helper in {ns} hung: {cmd}") from exc
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise NetlabError(
            f"probe helper in {ns} failed (rc={done.returncode}): {done.stderr.strip()}"
        )
    obj = json.loads(lines[-1])
    if not isinstance(obj, dict):
        raise NetlabError(f"unexpected probe output: {lines[-1]!r}")
    return obj


def _probe_args(
    proto: Proto, ip: str, port: int, payload: str, timeout: float, *, count: int = 1
) -> list[str]:
    ipaddress.ip_address(ip)
    if "\n" in payload or "\r" in payload:
        raise ValueError("payload must be a single line")
    if not 1 <= count <= MAX_PROBE_COUNT:
        raise ValueError(f"count must be in 1..{MAX_PROBE_COUNT}")
    return [
        "probe",
        "--proto",
        proto,
        "--ip",
        ip,
        "--port",
        str(port),
        # `=` form so a payload starting with '-' is not taken for an option.
        f"--payload={payload}",
        "--timeout",
        str(timeout),
        "--count",
        str(count),
    ]


def _results(obj: dict[str, Any]) -> list[ProbeResult]:
    return [ProbeResult.from_json(r) for r in obj["results"]]


def tcp_probe(
    ns: str, ip: str, port: int, payload: str = "ping", timeout: float = 2.0
) -> ProbeResult:
    """One TCP connection from namespace ``ns``; ``timeout`` bounds connect+reply."""
    args = _probe_args("tcp", ip, port, payload, timeout)
    return _results(_run_helper(ns, args, timeout))[0]


def tcp_probe_many(
    ns: str, ip: str, port: int, count: int, timeout: float = 2.0, *, payload: str = "ping"
) -> list[ProbeResult]:
    """``count`` sequential TCP connections in a single helper process."""
    args = _probe_args("tcp", ip, port, payload, timeout, count=count)
    return _results(_run_helper(ns, args, timeout * count))


def udp_probe(
    ns: str,
    ip: str,
    port: int,
    payload: str = "ping",
    timeout: float = 2.0,
    *,
    src_port: int | None = None,
) -> ProbeResult:
    """One datagram from a connected UDP socket; ICMP port-unreachable -> "refused"."""
    args = _probe_args("udp", ip, port, payload, timeout)
    if src_port is not None:
        args += ["--src-port", str(src_port)]
    return _results(_run_helper(ns, args, timeout))[0]


class TcpSession:
    """A long-lived TCP connection held by a helper process inside a namespace.

    Each ``send()`` writes one line and waits for the server's reply line
    (use with an ``echo=True`` server).  ``connect_result`` tells whether the
    connection was established; once the connection fails every further
    ``send()`` returns an error result.
    """

    def __init__(
        self,
        ns: str,
        ip: str,
        port: int,
        *,
        timeout: float = 2.0,
        launcher: Launcher | None = None,
    ) -> None:
        ipaddress.ip_address(ip)
        self.ns = ns
        self.ip = ip
        self.port = port
        self.timeout = timeout
        launch = launcher or _plain_launcher(ns)
        self.process = launch(
            helper_command("session", "--ip", ip, "--port", str(port), "--timeout", str(timeout)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=str(REPO_ROOT),
            env=subprocess_env(),
        )
        assert self.process.stdout is not None
        self._lines = _FdLines(self.process.stdout.fileno())
        self.connect_result = self._read_result(timeout + SUBPROCESS_SLACK)

    def _read_result(self, timeout: float) -> ProbeResult:
        start = time.monotonic()
        try:
            line = self._lines.readline(timeout)
        except TimeoutError:
            return _fail("timeout", start)
        if line is None:
            return _fail("closed", start)
        return ProbeResult.from_json(json.loads(line))

    def send(self, payload: str = "ping") -> ProbeResult:
        if "\n" in payload or "\r" in payload:
            raise ValueError("payload must be a single line")
        start = time.monotonic()
        stdin = self.process.stdin
        if stdin is None or stdin.closed or self.process.poll() is not None:
            return _fail("closed", start)
        try:
            stdin.write(payload + "\n")
            stdin.flush()
        except (BrokenPipeError, ValueError):
            return _fail("closed", start)
        return self._read_result(self.timeout + SUBPROCESS_SLACK)

    def close(self) -> None:
        terminate_process(self.process)

    def __enter__(self) -> TcpSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------
# Subprocess side: servers


def _bind(proto: Proto, bind: str, port: int) -> socket.socket:
    fam = family_of(bind)
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(fam, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6 and ipaddress.ip_address(bind).is_unspecified:
        # Dual-stack: one socket answers IPv4 (as mapped addresses) and IPv6.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((bind, port))
    if proto == "tcp":
        sock.listen(128)
    return sock


def _reply(name: str, peer: str, payload: bytes) -> bytes:
    text = payload.decode(errors="replace").rstrip("\r\n")
    return f"{name} {peer} {text}".encode()


def _handle_tcp(conn: socket.socket, peer: str, name: str, echo: bool, deadline: float) -> None:
    try:
        with conn:
            lines = _SocketLines(conn)
            if not echo:
                line = lines.readline(time.monotonic() + ONE_SHOT_READ_TIMEOUT)
                if line is not None:
                    conn.sendall(_reply(name, peer, line) + b"\n")
                return
            for _ in range(MAX_ECHO_LINES):
                now = time.monotonic()
                if now >= deadline:
                    return
                line = lines.readline(min(deadline, now + ECHO_IDLE_TIMEOUT))
                if line is None:
                    return
                conn.sendall(_reply(name, peer, line) + b"\n")
    except (OSError, ValueError):
        # Per-connection failures (resets, idle timeouts) are normal in tests
        # and are visible on the client side; stay silent so stderr stays empty.
        pass


def _serve_tcp(sock: socket.socket, name: str, echo: bool, deadline: float) -> None:
    sock.settimeout(0.5)  # wake up regularly to honour the lifetime
    for _ in range(MAX_CONNECTIONS):
        if time.monotonic() >= deadline:
            return
        try:
            conn, addr = sock.accept()
        except TimeoutError:
            continue
        except OSError:
            continue
        if threading.active_count() > MAX_HANDLER_THREADS:
            conn.close()
            continue
        peer = normalize_peer(addr[0])
        threading.Thread(
            target=_handle_tcp, args=(conn, peer, name, echo, deadline), daemon=True
        ).start()


def _serve_udp(sock: socket.socket, name: str, deadline: float) -> None:
    sock.settimeout(0.5)
    for _ in range(MAX_CONNECTIONS):
        if time.monotonic() >= deadline:
            return
        try:
            data, addr = sock.recvfrom(65535)
            sock.sendto(_reply(name, normalize_peer(addr[0]), data), addr)
        except OSError:
            continue


def _cmd_serve(ns: argparse.Namespace) -> int:
    proto: Proto = ns.proto
    sock = _bind(proto, ns.bind, ns.port)
    print(f"READY {sock.getsockname()[1]}", flush=True)
    deadline = time.monotonic() + ns.lifetime
    with sock:
        if proto == "tcp":
            _serve_tcp(sock, ns.name, ns.echo, deadline)
        else:
            _serve_udp(sock, ns.name, deadline)
    return 0


# --------------------------------------------------------------------------
# Subprocess side: probes


def _tcp_once(ip: str, port: int, payload: str, timeout: float) -> ProbeResult:
    start = time.monotonic()
    deadline = start + timeout
    try:
        with socket.socket(family_of(ip), socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect((ip, port))
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(payload.encode() + b"\n")
            line = _SocketLines(sock).readline(deadline)
    except OSError as exc:
        return _fail(error_name(exc), start)
    if line is None:
        return _fail("closed", start)
    return _ok(line.decode(errors="replace"), start)


def _udp_once(
    ip: str, port: int, payload: str, timeout: float, src_port: int | None
) -> ProbeResult:
    start = time.monotonic()
    fam = family_of(ip)
    try:
        with socket.socket(fam, socket.SOCK_DGRAM) as sock:
            if src_port is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", src_port))
            sock.settimeout(timeout)
            # connect() so that ICMP errors are reported on this socket.
            sock.connect((ip, port))
            sock.send(payload.encode())
            data = sock.recv(65535)
    except OSError as exc:
        return _fail(error_name(exc), start)
    return _ok(data.decode(errors="replace"), start)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _cmd_probe(ns: argparse.Namespace) -> int:
    _check_target_allowed(ns.ip)
    count = max(1, min(ns.count, MAX_PROBE_COUNT))
    results: list[ProbeResult] = []
    for _ in range(count):
        if ns.proto == "tcp":
            results.append(_tcp_once(ns.ip, ns.port, ns.payload, ns.timeout))
        else:
            results.append(_udp_once(ns.ip, ns.port, ns.payload, ns.timeout, ns.src_port))
    _emit({"results": [r.to_json() for r in results]})
    return 0


def _cmd_session(ns: argparse.Namespace) -> int:
    _check_target_allowed(ns.ip)
    start = time.monotonic()
    end = start + SESSION_LIFETIME
    try:
        sock = socket.create_connection((ns.ip, ns.port), timeout=ns.timeout)
    except OSError as exc:
        _emit(_fail(error_name(exc), start).to_json())
        return 0
    _emit(ProbeResult(True, None, None, time.monotonic() - start).to_json())
    stdin = _FdLines(sys.stdin.fileno())
    with sock:
        lines = _SocketLines(sock)
        for _ in range(MAX_SESSION_LINES):
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            try:
                request = stdin.readline(remaining)
            except TimeoutError:
                break
            if request is None:
                break
            t0 = time.monotonic()
            try:
                sock.sendall(request.encode() + b"\n")
                line = lines.readline(t0 + ns.timeout)
            except OSError as exc:
                _emit(_fail(error_name(exc), t0).to_json())
                break
            if line is None:
                _emit(_fail("closed", t0).to_json())
                break
            _emit(_ok(line.decode(errors="replace"), t0).to_json())
    return 0


# --------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.netlab.servers")
    sub = parser.add_subparsers(dest="cmd", required=True)

    serve = sub.add_parser("serve", help="run a test server")
    serve.add_argument("--proto", choices=["tcp", "udp"], default="tcp")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--bind", default="::")
    serve.add_argument("--name", default=socket.gethostname())
    serve.add_argument("--echo", action="store_true", help="TCP: keep open, answer every line")
    serve.add_argument("--lifetime", type=float, default=DEFAULT_LIFETIME)

    probe = sub.add_parser("probe", help="connect and print one JSON line of results")
    probe.add_argument("--proto", choices=["tcp", "udp"], default="tcp")
    probe.add_argument("--ip", required=True)
    probe.add_argument("--port", type=int, required=True)
    probe.add_argument("--payload", default="ping")
    probe.add_argument("--timeout", type=float, default=2.0)
    probe.add_argument("--count", type=int, default=1)
    probe.add_argument("--src-port", type=int, default=None)

    session = sub.add_parser("session", help="hold one TCP connection, one line per stdin line")
    session.add_argument("--ip", required=True)
    session.add_argument("--port", type=int, required=True)
    session.add_argument("--timeout", type=float, default=2.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "serve":
        return _cmd_serve(args)
    if args.cmd == "probe":
        return _cmd_probe(args)
    return _cmd_session(args)


if __name__ == "__main__":
    sys.exit(main())
