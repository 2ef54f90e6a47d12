"""API ingest at scale: listing Services and EndpointSlices, kproxy's path vs the client's models.

Run: ``python benches/api_ingest.py [--services 30000] [--repeat 3]``. Starts the project's
fake API server on loopback with N Services and N EndpointSlices (4 endpoints each), then, in
the same run and alternating, lists everything three ways through the same HTTP server with
the same page size:

* ``fetch only``   - the HTTP requests and nothing else: the floor every client pays here;
* ``kproxy``       - kproxy's informer list (JSON parsed with the standard library);
* ``client models`` - the ``kubernetes`` package's typed list calls (pydantic models);

and then times kproxy's normalization of what it listed (the controller). Reports medians and
the ratios to the floor; absolute times belong to this machine only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kubernetes import client as k8s

from kproxy.control import Controller
from kproxy.k8s import informer
from kproxy.k8s.client import ClientFactory
from tests import k8sobjects as k
from tests.fakeapi import FakeApiServer

PAGE = 500


def populate(api: FakeApiServer, n: int) -> None:
    for i in range(n):
        ns = f"ns{i % 100}"
        ip = f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}"
        api.put(k.service(f"svc{i}", ip, [k.port("http", 80, target=8080)], namespace=ns))
        eps = [
            k.endpoint(
                f"10.{128 + i // 16384}.{(i // 64) % 256}.{(i % 64) * 4 + j}", node=f"node-{j}"
            )
            for j in range(4)
        ]
        api.put(
            k.endpoint_slice(
                f"svc{i}-abcde", f"svc{i}", eps, [k.slice_port("http", 8080)], namespace=ns
            )
        )


def fetch_only(api: FakeApiServer) -> None:
    for path in ("/api/v1/services", "/apis/discovery.k8s.io/v1/endpointslices"):
        cont = ""
        while True:
            url = f"{api.api_url}{path}?limit={PAGE}" + (f"&continue={cont}" if cont else "")
            with urllib.request.urlopen(url, timeout=120) as r:
                body = r.read()
            # Only the continue token is read: a scan for it, no JSON parsing.
            at = body.find(b'"continue": "')
            cont = body[at + 13 : body.index(b'"', at + 13)].decode() if at >= 0 else ""
            if not cont:
                break


class Collect:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.sets: dict[str, list[dict[str, Any]]] = {}

    def list_page(self, resource: str, objects: list[dict[str, Any]], first: bool) -> None:
        if first:
            self.sets[resource] = []
        self.sets[resource].extend(objects)

    def list_done(self, resource: str) -> None:
        self.done.set()

    def event(self, resource: str, kind: str, obj: dict[str, Any]) -> None:
        pass


def kproxy_list(api: FakeApiServer) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    timing = informer.Timing(page_size=PAGE)
    for res in (informer.services(), informer.endpoint_slices()):
        sink = Collect()
        inf = informer.Informer(
            res, ClientFactory(None, api.api_url), sink, threading.Event(), timing
        )
        inf._list()  # the list half of the informer loop, synchronously
        out.update(sink.sets)
    return out


def client_models(api: FakeApiServer) -> None:
    cfg = k8s.Configuration()
    cfg.host = api.api_url
    with k8s.ApiClient(cfg) as c:
        for fn in (
            k8s.CoreV1Api(c).list_service_for_all_namespaces,
            k8s.DiscoveryV1Api(c).list_endpoint_slice_for_all_namespaces,
        ):
            cont = None
            while True:
                page = fn(limit=PAGE, _continue=cont, _request_timeout=120)
                cont = page.metadata._continue if page.metadata else None
                if not cont:
                    break


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=30000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write results here")
    args = ap.parse_args()

    with FakeApiServer(bookmark_interval=60) as api:
        t = time.perf_counter()
        populate(api, args.services)
        print(
            f"populated {args.services} Services + {args.services} EndpointSlices in {time.perf_counter() - t:.1f}s"
        )
        times: dict[str, list[float]] = {"fetch only": [], "kproxy": [], "client models": []}
        listed: dict[str, list[dict[str, Any]]] = {}
        for _ in range(args.repeat):
            times["fetch only"].append(timed(lambda: fetch_only(api)))
            times["kproxy"].append(timed(lambda: listed.update(kproxy_list(api))))
            times["client models"].append(timed(lambda: client_models(api)))
        ctl = Controller("node-0", wait_for_node=False)

        def normalize() -> None:
            ctl.replace("services", listed["services"])
            ctl.replace("endpointslices", listed["endpointslices"])
            ctl.drain()

        norm = timed(normalize)

    med = {name: statistics.median(v) for name, v in times.items()}
    floor = med["fetch only"]
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}"
    )
    print(f"{'path':<16}{'median s':>10}{'x floor':>9}   runs")
    for name, v in times.items():
        print(
            f"{name:<16}{med[name]:>10.2f}{med[name] / floor:>9.2f}   {', '.join(f'{x:.2f}' for x in v)}"
        )
    print(
        f"\nkproxy parse overhead over the floor: {med['kproxy'] - floor:.2f}s; "
        f"client models: {med['client models'] - floor:.2f}s "
        f"({(med['client models'] - floor) / max(med['kproxy'] - floor, 1e-9):.1f}x more)"
    )
    print(f"normalization + change tracking of everything listed: {norm:.2f}s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "services": args.services,
                    "median_seconds": med,
                    "normalize_seconds": norm,
                    "runs": times,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
