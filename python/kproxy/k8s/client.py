"""API clients, rebuilt often enough that rotated credentials are picked up.

Bound service-account tokens rotate, so a long-running proxy must re-read its kubeconfig's
``tokenFile`` (and the in-cluster token). The factory here builds a fresh :class:`ApiClient`
from the configuration (:mod:`kproxy.k8s.kubeconfig`) when its cached one is older than
``max_age`` or after an authentication failure.

The client is kproxy's own, over urllib3: the informers parse JSON themselves and stream
bodies, so all they need is an authenticated request that returns the raw response.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode, urlsplit

import urllib3
from urllib3.util.retry import Retry

from kproxy import __version__
from kproxy.errors import ApiConnectionError, KubeconfigError
from kproxy.k8s import kubeconfig
from kproxy.k8s.kubeconfig import ClusterConfig

log = logging.getLogger(__name__)

IN_CLUSTER_ENV = "KUBERNETES_SERVICE_HOST"
USER_AGENT = f"kproxy/{__version__}"


class ApiClient:
    """Requests to one API server with one read of the credentials: a urllib3 pool, its TLS
    context and the Authorization header."""

    def __init__(self, config: ClusterConfig, *, retries: Retry, maxsize: int) -> None:
        self.config = config
        self.host = config.server
        self._retries = retries
        pool_kw: dict[str, Any] = {}
        if urlsplit(config.server).scheme == "https":
            pool_kw["ssl_context"] = kubeconfig.ssl_context(config)
            if config.tls_server_name:
                pool_kw["server_hostname"] = config.tls_server_name
        self._pool = urllib3.PoolManager(maxsize=maxsize, retries=retries, **pool_kw)
        self._headers = {"User-Agent": USER_AGENT}
        if config.authorization is not None:
            self._headers["Authorization"] = config.authorization

    @property
    def authorization(self) -> str | None:
        """The Authorization header every request carries (read when this client was built)."""
        return self.config.authorization

    def request(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]] = (),
        headers: Mapping[str, str] | None = None,
        *,
        body: bytes | None = None,
        timeout: float | tuple[float, float] = 10.0,
    ) -> urllib3.BaseHTTPResponse:
        """Send one request; the answer, whatever its status, is returned unread
        (``preload_content=False``): read or stream it, then ``release_conn()``. Redirects are
        returned too, never followed. ``timeout`` is (connect, read) or a total."""
        url = self.host + path
        if query:
            url += "?" + urlencode(list(query))
        sent = {**self._headers, **(headers or {})}
        if "Authorization" in self._headers:  # the configured credential, whatever is passed
            sent["Authorization"] = self._headers["Authorization"]
        if isinstance(timeout, tuple):
            t = urllib3.Timeout(connect=timeout[0], read=timeout[1])
        else:
            t = urllib3.Timeout(total=timeout)
        return self._pool.urlopen(
            method,
            url,
            body=body,
            headers=sent,
            timeout=t,
            retries=self._retries,
            redirect=False,
            preload_content=False,
        )


class ClientFactory:
    def __init__(
        self,
        kubeconfig: str | None,
        master: str | None,
        *,
        max_age: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        service_account_dir: str | None = None,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.master = master
        self.max_age = max_age
        self._clock = clock
        self._service_account_dir = service_account_dir
        self._lock = threading.Lock()
        self._client: ApiClient | None = None
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

    def _config(self) -> ClusterConfig:
        """The configuration as it is now (token files re-read), ``--master`` applied."""
        if self.kubeconfig is not None:
            cfg = kubeconfig.load(self.kubeconfig)
        elif self.master is None:
            cfg = kubeconfig.in_cluster(service_account_dir=self._service_account_dir)
        else:
            cfg = ClusterConfig(server="", source="--master")
        if self.master is not None:
            cfg = cfg.with_server(self.master)
        return cfg

    def _build(self) -> ApiClient:
        # One connection per concurrent watch plus room for lists and event writes.
        # Answers are retried by the informer (backoff with jitter, Retry-After capped):
        # urllib3 keeps retrying connections (a pooled one the server closed, say) but never
        # sleeps for a Retry-After header, which it would for whatever a 429 or 503 names,
        # 99999999999 s included.
        retries = Retry(total=3, redirect=0, respect_retry_after_header=False)
        return ApiClient(self._config(), retries=retries, maxsize=8)

    def observe(self, method: str, code: str, seconds: float) -> None:
        if self.on_request is not None:
            host = urlsplit(self._client.host).netloc if self._client else ""
            self.on_request(method, host, code, seconds)

    def check(self) -> None:
        """Build a client now: an unreadable or invalid kubeconfig (or missing in-cluster
        configuration) raises :class:`ApiConnectionError`, in one line, before anything else
        runs; retrying could not fix it."""
        try:
            self.get()
        except KubeconfigError:
            raise  # names the file and the field already
        except Exception as e:
            if self.kubeconfig is not None:
                source = f"kubeconfig {self.kubeconfig}"
            else:
                source = "--master" if self.master is not None else kubeconfig.IN_CLUSTER
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ApiConnectionError(source, first) from None

    def get(self) -> ApiClient:
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
