"""The modes: one module each (``iptables``, ``nftables``, ``ipvs``, ``userspace``), a
:class:`~kproxy.backends.base.ModeBackend` subclass in each, and ``proxier``, which runs one
engine per IP family for whichever mode it is given."""

from __future__ import annotations

import importlib

from kproxy.backends.base import ModeBackend
from kproxy.config import ProxyConfig

# Imported on first use: the mode modules import the proxier, which imports this package.
_MODES = {
    "iptables": ("kproxy.backends.iptables", "IptablesMode"),
    "nftables": ("kproxy.backends.nftables", "NftablesMode"),
    "ipvs": ("kproxy.backends.ipvs", "IpvsMode"),
    "userspace": ("kproxy.backends.userspace", "UserspaceMode"),
}


def for_mode(cfg: ProxyConfig) -> ModeBackend:
    """The backend of ``cfg.mode`` (validated by the config: always one of the four)."""
    module, cls = _MODES[cfg.mode]
    mode: type[ModeBackend] = getattr(importlib.import_module(module), cls)
    return mode(cfg)
