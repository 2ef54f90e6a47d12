"""Read the kernel's IPVS table with pyroute2 and compare it with what kproxy meant to write.

Run inside the VM after ``independent_reader_fixture`` (rust/tests/ipvs_kernel.rs):
``python ipvs_reader.py EXPECTED.json``. An independent reader: pyroute2 decodes the kernel's
messages with its own code. Its short field names fall back to class defaults for several
attributes (the forwarding method reads as direct routing), so the raw attributes are read.
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any

from pyroute2 import IPVS, IPVSService

PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", 132: "sctp"}
MASQ = 0


def snapshot() -> list[dict[str, Any]]:
    rows = []
    with IPVS() as ipvs:
        for smsg in ipvs.service("dump"):
            g = smsg.get_attr("IPVS_CMD_ATTR_SERVICE").get_attr
            svc = IPVSService.from_message(smsg)
            dests = []
            for dmsg in ipvs.dest("dump", service=svc):
                d = dmsg.get_attr("IPVS_CMD_ATTR_DEST").get_attr
                if d("IPVS_DEST_ATTR_FWD_METHOD") != MASQ:
                    raise SystemExit(f"{svc}: real server not masqueraded")
                dests.append([d("IPVS_DEST_ATTR_ADDR"), d("IPVS_DEST_ATTR_PORT"),
                              d("IPVS_DEST_ATTR_WEIGHT")])  # fmt: skip
            rows.append({
                "addr": g("IPVS_SVC_ATTR_ADDR"),
                "protocol": PROTOCOLS[g("IPVS_SVC_ATTR_PROTOCOL")],
                "port": g("IPVS_SVC_ATTR_PORT"),
                "scheduler": g("IPVS_SVC_ATTR_SCHED_NAME"),
                "persistent": bool(g("IPVS_SVC_ATTR_FLAGS")["flags"] & 1),
                "timeout": g("IPVS_SVC_ATTR_TIMEOUT"),
                "dests": sorted(dests),
            })  # fmt: skip
    return sorted(rows, key=lambda r: (r["addr"], r["protocol"], r["port"]))


def main() -> int:
    with open(sys.argv[1]) as f:
        want = sorted(json.load(f), key=lambda r: (r["addr"], r["protocol"], r["port"]))
    for r in want:
        r["dests"] = sorted(r["dests"])
    have = snapshot()
    if have != want:
        print(json.dumps({"want": want, "have": have}, indent=1))
        return 1
    print(f"pyroute2 lists the {len(have)} virtual servers kproxy wrote, with their real servers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
