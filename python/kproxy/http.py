"""A small HTTP server for kproxy's read-only endpoints (health, metrics, proxyMode).

Each route is a function returning (status, content type, body); the route "*" answers any
path. Nothing a client sends can change anything (only GET is answered). Served from its own
threads: a long sync never delays an answer, and a slow or malformed client never stalls a
sync.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

Response = tuple[int, str, bytes]
Route = Callable[[], Response]


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class Server:
    def __init__(self, address: str, routes: Mapping[str, Route], *, name: str) -> None:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")

        class Handler(BaseHTTPRequestHandler):
            # A client that sends nothing cannot hold a thread forever.
            timeout = 10

            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0]) or routes.get("*")
                if route is None:
                    self.send_error(404)
                    return
                try:
                    code, ctype, body = route()
                except Exception:
                    log.exception("%s: %s failed", name, self.path)
                    self.send_error(500)
                    return
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug(f"{name}: " + format, *args)

        cls = _Server6 if ":" in host else ThreadingHTTPServer
        self._httpd = cls((host, int(port)), Handler)
        self._httpd.daemon_threads = True
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
