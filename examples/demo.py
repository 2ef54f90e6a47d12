"""The quickstart demo: kproxy balancing real traffic between network namespaces.

Run it through ``scripts/demo.sh`` (as root). It builds an isolated node out of network
namespaces (connected only to each other), starts three echo backends whose addresses match
``examples/manifests``, runs ``kproxy daemon --manifests examples/manifests`` in the node
namespace, sends connections through the Service's ClusterIP and NodePort, prints which
backend answered each, and removes everything it created.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.netlab import NetNs, NodeLab  # noqa: E402

CLUSTER_IP, EMPTY_IP = "10.96.0.10", "10.96.0.20"
NODE_NAME = "kproxy-demo"


def spread(label: str, src: NetNs, ip: str, port: int, count: int = 30) -> None:
    results = src.tcp_probe_many(ip, port, count, timeout=2.0)
    counts = collections.Counter(r.server if r.ok else f"error:{r.error}" for r in results)
    shown = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    peers = sorted({r.peer for r in results if r.peer})
    print(
        f"  {label:<44} {count} connections -> {shown}   (backends saw source {', '.join(peers)})"
    )


def main() -> int:
    log = Path(tempfile.mkstemp(prefix="kproxy-demo-", suffix=".log")[1])
    with NodeLab() as lab:
        for name in ("pod1", "pod2", "pod3"):
            pod = lab.add_pod(name)
            pod.start_tcp_server(8080)
            pod.start_udp_server(8081)
        client = lab.add_pod("client")
        ext = lab.add_client("ext")
        print(
            f"node namespace {lab.node.ns}: backends 10.244.1.2, 10.244.2.2, 10.244.3.2; "
            f"client pod {client.ip}; external client {ext.ip}; node IP {lab.node_ip}"
        )
        with log.open("w") as out:
            daemon = lab.node.popen(
                [sys.executable, "-m", "kproxy", "daemon",
                 "--manifests", str(REPO / "examples" / "manifests"),
                 "--hostname-override", NODE_NAME, "--cluster-cidr", "10.244.0.0/16",
                 "--min-sync-period", "0", "--healthz-bind-address", "127.0.0.1:10256",
                 "-v", "2"],  # per-sync lines (klog V(2))
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while "synced IPv4" not in log.read_text():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    print(log.read_text(), file=sys.stderr)
                    print("kproxy did not program its rules", file=sys.stderr)
                    return 1
                time.sleep(0.1)
            print("\nkproxy is running in the node namespace; its log:")
            for line in log.read_text().splitlines():
                print("  " + line)
            print("\nService demo/echo (3 endpoints):")
            spread(f"ClusterIP {CLUSTER_IP}:80 from the client pod", client, CLUSTER_IP, 80)
            spread(f"ClusterIP {CLUSTER_IP}:80 from the node", lab.node, CLUSTER_IP, 80)
            spread(f"NodePort {lab.node_ip}:30080 from outside", ext, lab.node_ip, 30080)
            u = ext.udp_probe(lab.node_ip, 30081)
            print(f"  {'UDP NodePort ' + lab.node_ip + ':30081 from outside':<44} -> "
                  f"{u.server if u.ok else u.error}")  # fmt: skip
            r = client.tcp_probe(EMPTY_IP, 80)
            print(f"\nService demo/empty (no endpoints): {EMPTY_IP}:80 -> "
                  f"{r.error} after {r.elapsed * 1000:.1f} ms (REJECT, not a timeout)")  # fmt: skip
            nat = lab.node.exec(["iptables-save", "-t", "nat"]).stdout
            print("\nA few of the rules it wrote (iptables-save -t nat):")
            for line in nat.splitlines():
                if "demo/echo:tcp" in line and ("KUBE-SERVICES" in line or "KUBE-SVC" in line):
                    print("  " + line)
        finally:
            daemon.terminate()
            daemon.wait(timeout=10)
    log.unlink(missing_ok=True)
    print("\ndone: the namespaces, the backends and the daemon are gone.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
