"""kproxy: a drop-in kube-proxy replacement with a Rust core.

The package is usable as a library; see :mod:`kproxy.api` once it exists, and the README.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kproxy")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
