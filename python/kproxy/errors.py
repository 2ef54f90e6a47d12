"""The exception hierarchy. Every error kproxy raises is a :class:`KproxyError`.

The Rust core maps its one error enum onto these classes (``rust/src/py/errors.rs``), with
structured attributes, so callers never parse messages.
"""

from __future__ import annotations


class KproxyError(Exception):
    """Base class of every kproxy error."""


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
        super().__init__(f"{kind} {namespace}/{name}: {field}: {message}")
        self.kind = kind
        self.namespace = namespace
        self.name = name
        self.field = field
        self.message = message


class CoreInputError(KproxyError):
    """The Rust core rejected its input (a change set or engine configuration)."""

    def __init__(self, message: str, *, needs_full_sync: bool = False) -> None:
        super().__init__(message)
        self.needs_full_sync = needs_full_sync


class ApplyError(KproxyError):
    """The kernel (or its tool) refused rules. What was programmed before stays in place."""

    def __init__(
        self,
        message: str,
        *,
        op: str,
        exit_code: int | None = None,
        stderr: str = "",
        program: str | None = None,
        errno: int | None = None,
        needs_full_sync: bool = True,
    ) -> None:
        super().__init__(message)
        self.op = op
        self.exit_code = exit_code
        self.stderr = stderr
        self.program = program
        self.errno = errno
        self.needs_full_sync = needs_full_sync
        # The IP family whose engine failed, set by the proxier.
        self.family: str | None = None
