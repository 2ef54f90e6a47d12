"""API clients, rebuilt often enough that rotated credentials are picked up.

The ``kubernetes`` package reads a kubeconfig's ``tokenFile`` once; bound service-account
tokens rotate, so a long-running proxy must re-read it. The factory here builds a fresh
``ApiClient`` when its cached one is older than ``max_age`` or after an authentication failure.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from urllib3.util.retry import Retry

from kproxy.errors import ApiConnectionError

log = logging.getLogger(__name__)

IN_CLUSTER_ENV = "KUBERNETES_SERVICE_HOST"


class ClientFactory:
    def __init__(
        self,
        kubeconfig: str | None,
        master: str | None,
        *,
        max_age: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.master = master
        self.max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._client: k8s_client.ApiClient | None = None
        self._built_at = 0.0
        # Told of every request the informers make: (method, host, status code or "<error>",
        # seconds to the response's headers), for client-go's rest_client_* metrics.
        self.on_request: Callable[[str, str, str, float], None] | None = None
        if kubeconfig is None and master is None and os.environ.get(IN_CLUSTER_ENV):
            # The in-cluster address is a ClusterIP this very proxy programs: a node coming up
            # cold cannot reach it. Upstream's manifests pass a kubeconfig instead.
            log.warning(
                "no --kubeconfig or --master; using in-cluster config, which depends on "
                "Service rules this proxy has not programmed yet"
            )

    def _build(self) -> k8s_client.ApiClient:
        cfg = k8s_client.Configuration()
        if self.kubeconfig is not None:
            k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=self.kubeconfig, client_configuration=cfg
            )
        elif self.master is None:
            k8s_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        if self.master is not None:
            cfg.host = self.master.rstrip("/")
        # One connection per concurrent watch plus room for lists and event writes.
        cfg.connection_pool_maxsize = 8
        # Answers are retried by the informer (backoff with jitter, Retry-After capped):
        # urllib3 keeps retrying connections (a pooled one the server closed, say) but never
        # sleeps for a Retry-After header, which it would for whatever a 429 or 503 names,
        # 99999999999 s included.
        cfg.retries = Retry(total=3, redirect=0, respect_retry_after_header=False)
        return k8s_client.ApiClient(cfg)

    def observe(self, method: str, code: str, seconds: float) -> None:
        if self.on_request is not None:
            host = urlsplit(self._client.configuration.host).netloc if self._client else ""
            self.on_request(method, host, code, seconds)

    def check(self) -> None:
        """Build a client now: an unreadable or invalid kubeconfig (or missing in-cluster
        configuration) raises :class:`ApiConnectionError`, in one line, before anything else
        runs; retrying could not fix it."""
        try:
            self.get()
        except Exception as e:  # the kubernetes package raises many types for a bad file
            source = f"kubeconfig {self.kubeconfig}" if self.kubeconfig else "in-cluster config"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ApiConnectionError(source, first) from None

    def get(self) -> k8s_client.ApiClient:
        with self._lock:
            now = self._clock()
            if self._client is None or now - self._built_at >= self.max_age:
                self._client = self._build()
                self._built_at = now
            return self._client

    def invalidate(self) -> None:
        """Force the next ``get`` to re-read credentials (after a 401)."""
        with self._lock:
            self._client = None
