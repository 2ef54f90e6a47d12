"""Build a lab by hand for debugging: ``python -m tests.netlab --pods 2 --hold 300``.

Prints the namespace names and addresses as JSON, keeps the lab for
``--hold`` seconds (bounded) or until Ctrl-C, then tears it down.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

from tests.netlab.topology import NodeLab, netlab_unavailable_reason

MAX_HOLD = 3600.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.netlab")
    parser.add_argument("--pods", type=int, default=2)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--hold", type=float, default=60.0, help=f"seconds, max {MAX_HOLD:.0f}")
    args = parser.parse_args(argv)
    reason = netlab_unavailable_reason()
    if reason:
        print(f"netlab unavailable: {reason}", file=sys.stderr)
        return 2
    with NodeLab() as lab:
        for i in range(1, args.pods + 1):
            lab.add_pod(f"pod{i}")
        for j in range(1, args.clients + 1):
            lab.add_client("ext" if j == 1 else f"ext{j}")
        info = {
            "prefix": lab.prefix,
            "node": lab.node.ns,
            "node_ip": lab.node_ip,
            "pods": {p.name: {"ns": p.ns, "ip": p.ip, "ip6": p.ip6} for p in lab.pods.values()},
            "clients": {
                c.name: {"ns": c.ns, "ip": c.ip, "ip6": c.ip6} for c in lab.clients.values()
            },
        }
        print(json.dumps(info, indent=2), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(max(0.0, min(args.hold, MAX_HOLD)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
