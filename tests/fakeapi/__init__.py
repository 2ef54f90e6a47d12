"""Fake Kubernetes API server for kproxy's tests (see server.py)."""

from __future__ import annotations

from tests.fakeapi.server import (
    RESOURCE_TYPES,
    ApiError,
    FakeApiServer,
    ResourceType,
    load_objects,
    parse_field_selector,
    parse_label_selector,
    resolve_kind,
    write_kubeconfig,
)

__all__ = [
    "RESOURCE_TYPES",
    "ApiError",
    "FakeApiServer",
    "ResourceType",
    "load_objects",
    "parse_field_selector",
    "parse_label_selector",
    "resolve_kind",
    "write_kubeconfig",
]
