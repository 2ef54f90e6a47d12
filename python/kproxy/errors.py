"""The exception hierarchy. Every error kproxy raises is a :class:`KproxyError`.

The core defines the classes its errors map to (``rust/src/py/errors.rs``: ``KproxyError``,
``CoreInputError``, ``UnsupportedError``, ``ApplyError`` and its ``NetlinkError``,
``ForwarderError``) and sets their fields as it raises them, so callers never parse
messages; the Python side's own errors derive from the same base.
"""

from __future__ import annotations

from kproxy._core import (
    ApplyError,
    CoreInputError,
    ForwarderError,
    KproxyError,
    NetlinkError,
    UnsupportedError,
)

__all__ = [
    "ApiConnectionError",
    "ApplyError",
    "ConfigError",
    "CoreInputError",
    "ForwarderError",
    "InvalidObjectError",
    "KproxyError",
    "KubeconfigError",
    "NetlinkError",
    "UnsupportedError",
    "apply_error",
]


class ConfigError(KproxyError):
    """A flag or configuration-file field is invalid. ``field`` names it (a flag, or a file's
    dotted field path), ``source`` the file it is in."""

    def __init__(self, field: str, message: str, source: str | None = None) -> None:
        super().__init__(f"{source}: {field}: {message}" if source else f"{field}: {message}")
        self.field = field
        self.message = message
        self.source = source


class ApiConnectionError(KproxyError):
    """The kubeconfig cannot be used, or the API server cannot be reached. ``source`` names
    the kubeconfig or the server."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source
        self.message = message


class KubeconfigError(ApiConnectionError, ValueError):
    """A kubeconfig (or the in-cluster configuration) holds something that cannot be used.
    ``source`` names the file (``kubeconfig PATH``, or ``in-cluster config``), ``field`` the
    field in it (``clusters[NAME].cluster.server``; empty for the file as a whole), ``message``
    what is wrong with it."""

    def __init__(self, source: str, field: str, message: str) -> None:
        super().__init__(source, f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class InvalidObjectError(KproxyError):
    """A Kubernetes object cannot be proxied as it is; it is skipped, nothing else is."""

    def __init__(self, kind: str, namespace: str, name: str, field: str, message: str) -> None:
        # A cluster-scoped object (a ServiceCIDR) has no namespace: it is named alone.
        where = f"{namespace}/{name}" if namespace else name
        super().__init__(f"{kind} {where}: {field}: {message}")
        self.kind = kind
        self.namespace = namespace
        self.name = name
        self.field = field
        self.message = message


def apply_error(message: str, *, op: str, errno: int | None = None) -> ApplyError:
    """An :class:`ApplyError` raised by the Python side (node setup around the engine), with
    the fields the core sets on its own."""
    e = ApplyError(message)
    e.op = op
    e.errno = errno
    return e
