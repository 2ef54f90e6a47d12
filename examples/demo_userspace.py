"""The rootless quickstart: kproxy's userspace mode balancing connections on loopback.

Run it through ``scripts/demo.sh`` as any user (as root it runs the namespace demo instead,
unless given ``--userspace``). It starts three small backends on 127.0.0.1 (TCP, and a UDP
echo), writes a NodePort Service and its EndpointSlices pointing at them into a temporary
manifests directory, runs ``kproxy daemon --proxy-mode userspace`` on it, sends connections
through the NodePort, moves one endpoint out and shows the traffic follow, and stops
everything it started. Nothing leaves 127.0.0.0/8; no privilege is needed.
"""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

NODE = "kproxy-demo"
# As root, run the daemon with every capability cleared all the same: the point is that it
# needs none, and without NET_ADMIN it also leaves the host's rules alone.
UNPRIVILEGED = (
    ["setpriv", "--bounding-set", "-all", "--inh-caps", "-all"] if os.geteuid() == 0 else []
)


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_tcp(name: str, stop: threading.Event) -> int:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.2)

    def run() -> None:
        deadline = time.monotonic() + 600
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = sock.accept()
                with conn:
                    conn.sendall(name.encode())
            except OSError:  # the 0.2 s timeout, or a client gone mid-reply: keep serving
                continue
        sock.close()

    threading.Thread(target=run, daemon=True).start()
    return int(sock.getsockname()[1])


def serve_udp(stop: threading.Event) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)

    def run() -> None:
        deadline = time.monotonic() + 600
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                data, peer = sock.recvfrom(2048)
                sock.sendto(b"echo: " + data, peer)
            except OSError:  # the 0.2 s timeout, or a send refused: keep serving
                continue
        sock.close()

    threading.Thread(target=run, daemon=True).start()
    return int(sock.getsockname()[1])


def manifests(tcp_np: int, udp_np: int, tcp: dict[str, int], udp: int) -> str:
    docs = [
        f"""apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: demo}}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports:
    - {{name: tcp, protocol: TCP, port: 80, nodePort: {tcp_np}}}
    - {{name: udp, protocol: UDP, port: 80, nodePort: {udp_np}}}"""
    ]
    for name, port in tcp.items():
        docs.append(f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-{name}
  namespace: demo
  labels: {{kubernetes.io/service-name: echo}}
addressType: IPv4
endpoints:
  - addresses: [127.0.0.1]
    conditions: {{ready: true}}
    nodeName: {NODE}
ports: [{{name: tcp, protocol: TCP, port: {port}}}]""")
    docs.append(f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-udp
  namespace: demo
  labels: {{kubernetes.io/service-name: echo}}
addressType: IPv4
endpoints:
  - addresses: [127.0.0.1]
    conditions: {{ready: true}}
ports: [{{name: udp, protocol: UDP, port: {udp}}}]""")
    return "\n---\n".join(docs) + "\n"


def write(d: Path, text: str) -> None:
    tmp = d / ".echo.yaml.tmp"
    tmp.write_text(text)
    tmp.rename(d / "echo.yaml")


def ask(port: int) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
            c.settimeout(2)
            return c.recv(100).decode() or "closed"
    except OSError as e:
        return f"error: {e.strerror or e}"


def spread(label: str, port: int, count: int = 30) -> collections.Counter[str]:
    seen = collections.Counter(ask(port) for _ in range(count))
    print(f"  {label:<46} {count} connections -> " + ", ".join(
        f"{k}: {v}" for k, v in sorted(seen.items())
    ))  # fmt: skip
    return seen


def main() -> int:
    stop = threading.Event()
    tcp = {name: serve_tcp(name, stop) for name in ("pod1", "pod2", "pod3")}
    udp = serve_udp(stop)
    tcp_np, udp_np = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
    with tempfile.TemporaryDirectory(prefix="kproxy-demo-") as tmp:
        d = Path(tmp)
        write(d, manifests(tcp_np, udp_np, tcp, udp))
        log = d / "daemon.log"
        print(f"backends on 127.0.0.1: {', '.join(f'{n} :{p}' for n, p in tcp.items())}; "
              f"UDP echo :{udp}")  # fmt: skip
        print(f"Service demo/echo: NodePort {tcp_np}/TCP and {udp_np}/UDP, served on 127.0.0.1")
        with log.open("w") as out:
            daemon = subprocess.Popen(
                [*UNPRIVILEGED, sys.executable, "-m", "kproxy", "daemon", "--proxy-mode", "userspace",
                 "--manifests", str(d), "--hostname-override", NODE,
                 "--bind-address", "127.0.0.1", "--healthz-bind-address", "",
                 "--metrics-bind-address", ""],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not ask(tcp_np).startswith("pod"):
                if daemon.poll() is not None or time.monotonic() > deadline:
                    print(log.read_text(), file=sys.stderr)
                    print("the daemon did not start serving", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            print("kproxy (userspace mode, no privileges) is serving:")
            first = spread(f"TCP 127.0.0.1:{tcp_np}", tcp_np)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(2)
                s.sendto(b"hello", ("127.0.0.1", udp_np))
                print(f"  {'UDP 127.0.0.1:' + str(udp_np):<46} 'hello' -> "
                      f"{s.recvfrom(100)[0].decode()!r}")  # fmt: skip
            print("pod3 leaves the Service (its EndpointSlice is deleted):")
            del tcp["pod3"]
            write(d, manifests(tcp_np, udp_np, tcp, udp))
            deadline = time.monotonic() + 10
            while "pod3" in {ask(tcp_np) for _ in range(6)} and time.monotonic() < deadline:
                time.sleep(0.2)
            second = spread(f"TCP 127.0.0.1:{tcp_np}", tcp_np)
            ok = set(first) == {"pod1", "pod2", "pod3"} and set(second) == {"pod1", "pod2"}
        finally:
            daemon.terminate()
            daemon.wait(15)
            stop.set()
    print("demo complete: every backend answered, and the traffic followed the change"
          if ok else "demo FAILED: unexpected spread, see above")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
