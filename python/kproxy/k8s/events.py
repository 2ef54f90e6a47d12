"""Kubernetes Events (events.k8s.io/v1), as upstream kube-proxy emits them.

Events are best effort: a failure to write one is logged and never affects proxying. Writes
happen on a worker thread so the event loop never waits for the API server.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from datetime import UTC, datetime
from typing import Any

from kproxy.errors import InvalidObjectError
from kproxy.k8s.client import ClientFactory

log = logging.getLogger(__name__)

CONTROLLER = "kproxy"


# The API versions of the kinds kproxy reads, outside the core group.
API_VERSIONS = {"EndpointSlice": "discovery.k8s.io/v1", "ServiceCIDR": "networking.k8s.io/v1"}


def event(
    reason: str,
    note: str,
    regarding: dict[str, str],
    *,
    node: str,
    action: str,
    type: str = "Normal",
) -> dict[str, Any]:
    namespace = regarding.get("namespace") or "default"
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {
            "name": f"{regarding['name']}.{secrets.token_hex(8)}",
            "namespace": namespace,
        },
        "eventTime": now,
        "reportingController": CONTROLLER,
        "reportingInstance": f"{CONTROLLER}-{node}",
        "action": action,
        "reason": reason,
        "note": note[:1024],
        "type": type,
        "regarding": regarding,
    }


class Recorder:
    def __init__(self, factory: ClientFactory, node: str) -> None:
        self._factory = factory
        self.node = node
        self.sent = 0
        self.failed = 0

    def post(self, ev: dict[str, Any]) -> bool:
        """Write one Event now (blocking). Returns whether the API server took it."""
        ns = ev["metadata"]["namespace"]
        try:
            api = self._factory.get()
            resp = api.request(
                "POST",
                f"/apis/events.k8s.io/v1/namespaces/{ns}/events",
                headers={"Content-Type": "application/json", "Accept": "application/json"},
                body=json.dumps(ev).encode(),
                timeout=10,
            )
            status: int = resp.status
            resp.drain_conn()  # the small reply, so the connection is reused
            resp.release_conn()
            ok = 200 <= status < 300
        except Exception as e:
            log.warning("cannot record event %s: %s", ev.get("reason"), e)
            ok = False
        if ok:
            self.sent += 1
        else:
            self.failed += 1
        return ok

    def emit(self, ev: dict[str, Any]) -> None:
        """Write one Event in the background."""
        threading.Thread(target=self.post, args=(ev,), name="event", daemon=True).start()

    def starting(self) -> None:
        self.emit(
            event(
                "Starting",
                "Starting kproxy.",
                {"kind": "Node", "name": self.node, "apiVersion": "v1"},
                node=self.node,
                action="StartKubeProxy",
            )
        )

    def not_programmed(self, error: InvalidObjectError) -> None:
        """An object this node skips (invalid, or over a limit): a Warning on the object."""
        api = API_VERSIONS.get(error.kind, "v1")
        regarding = {"kind": error.kind, "name": error.name, "apiVersion": api}
        if error.namespace:  # cluster-scoped objects have none (their Event goes to default)
            regarding["namespace"] = error.namespace
        self.emit(
            event(
                "FailedToProgram",
                f"node {self.node} does not program this {error.kind}: "
                f"{error.field}: {error.message}",
                regarding,
                node=self.node,
                action="Sync",
                type="Warning",
            )
        )

    def health_check_failed(self, namespace: str, name: str, port: int, error: str) -> None:
        self.emit(
            event(
                "FailedToStartServiceHealthcheck",
                f"node {self.node} failed to start healthcheck for service on port {port}: {error}",
                {"kind": "Service", "namespace": namespace, "name": name, "apiVersion": "v1"},
                node=self.node,
                action="Listen",
                type="Warning",
            )
        )
