"""The upstream kube-proxy release whose flags, configuration and behaviour kproxy follows
(``kube-proxy --version`` and ``kubernetes_build_info`` report it)."""

from __future__ import annotations

UPSTREAM_VERSION = "v1.37.0"
