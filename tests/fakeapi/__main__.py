"""Run the fake API server standalone until SIGTERM/SIGINT.

    python -m tests.fakeapi --api-port 0 --admin-port 0 --objects objs.yaml --ready-file ready.json

The ready file receives {"api_port": P, "admin_port": Q} once both ports listen (written
atomically, so a poller never reads half of it); the same JSON is printed to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path

from tests.fakeapi.server import FakeApiServer, load_objects


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fakeapi", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--api-port", type=int, default=0)
    parser.add_argument("--admin-port", type=int, default=0)
    parser.add_argument("--bookmark-interval", type=float, default=1.0)
    parser.add_argument(
        "--objects",
        action="append",
        default=[],
        metavar="FILE",
        help="JSON or YAML file of objects to preload (repeatable)",
    )
    parser.add_argument("--ready-file", type=Path)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    server = FakeApiServer(args.host, args.api_port, args.admin_port, args.bookmark_interval)
    # Preload before listening, so "ready" also means "objects are there".
    server.apply(put=[obj for path in args.objects for obj in load_objects(path)])
    server.start()
    try:
        ready = json.dumps({"api_port": server.api_port, "admin_port": server.admin_port})
        if args.ready_file is not None:
            tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
            tmp.write_text(ready + "\n")
            os.replace(tmp, args.ready_file)
        print(ready, flush=True)
        # A timed wait keeps the main thread responsive to signals.
        while not stop.wait(0.2):
            pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
