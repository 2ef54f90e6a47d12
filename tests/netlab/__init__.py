"""Network-namespace lab for privileged kproxy tests.

``NodeLab`` builds an isolated node (plus pods and external clients) out of
network namespaces; ``servers`` holds the tiny test servers and probes that
run inside them.  See ``topology`` for the address plan.
"""

from __future__ import annotations

from tests.netlab.servers import NetlabError, ProbeResult, Reply, Server, TcpSession
from tests.netlab.topology import (
    Client,
    NetNs,
    Node,
    NodeLab,
    Pod,
    list_netns,
    netlab_unavailable_reason,
)

__all__ = [
    "Client",
    "NetNs",
    "NetlabError",
    "Node",
    "NodeLab",
    "Pod",
    "ProbeResult",
    "Reply",
    "Server",
    "TcpSession",
    "list_netns",
    "netlab_unavailable_reason",
]
