"""healthCheckNodePort servers: one per ``externalTrafficPolicy: Local`` LoadBalancer Service.

Load balancers probe them to learn which nodes have local endpoints: 200 with upstream's JSON
when this node has a ready local endpoint and the proxy is healthy, 503 otherwise. Servers are
opened and closed as Services come and go; a port that cannot be bound is reported (log line
and callback, for an Event) and the other Services keep their health checks.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kproxy.http import Response, Server
from kproxy.model import ServiceKey

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Wanted:
    port: int
    local_endpoints: int


class ServiceHealthServers:
    def __init__(
        self,
        proxy_healthy: Callable[[], bool],
        *,
        address: str = "0.0.0.0",
        on_bind_error: Callable[[ServiceKey, int, OSError], None] = lambda key, port, e: None,
    ) -> None:
        self._healthy = proxy_healthy
        self._address = address
        self._on_bind_error = on_bind_error
        self._servers: dict[ServiceKey, tuple[int, Server]] = {}
        self._counts: dict[ServiceKey, int] = {}
        self._failed: dict[ServiceKey, int] = {}

    @property
    def ports(self) -> dict[ServiceKey, int]:
        return {k: port for k, (port, _) in self._servers.items()}

    def _answer(self, key: ServiceKey) -> Response:
        n = self._counts.get(key, 0)
        healthy = self._healthy()
        body = {
            "service": {"namespace": key.namespace, "name": key.name},
            "localEndpoints": n,
            "serviceProxyHealthy": healthy,
        }
        return (200 if n > 0 and healthy else 503), "application/json", json.dumps(body).encode()

    def sync(self, wanted: Mapping[ServiceKey, Wanted]) -> None:
        """Open, move and close servers so exactly ``wanted`` is served."""
        self._counts = {k: w.local_endpoints for k, w in wanted.items()}
        for key in list(self._servers):
            port, server = self._servers[key]
            if key not in wanted or wanted[key].port != port:
                server.close()
                del self._servers[key]
        for key in list(self._failed):
            if key not in wanted or wanted[key].port != self._failed[key]:
                del self._failed[key]
        for key, w in sorted(wanted.items()):
            if key in self._servers or self._failed.get(key) == w.port:
                continue  # serving, or already reported as failing on this port
            host = f"[{self._address}]" if ":" in self._address else self._address
            try:
                server = Server(
                    f"{host}:{w.port}",
                    {"*": functools.partial(self._answer, key)},
                    name=f"healthcheck-{w.port}",
                    lane="healthcheck",
                )
            except OSError as e:
                self._failed[key] = w.port
                log.error(
                    "cannot serve the health check of Service %s on port %d: %s", key, w.port, e
                )
                self._on_bind_error(key, w.port, e)
                continue
            server.start()
            self._servers[key] = (w.port, server)

    def close(self) -> None:
        self.sync({})
