"""The per-family engine configuration the daemon derives from its own configuration."""

from __future__ import annotations

from kproxy.backends.iptables import localhost_allowed
from kproxy.backends.proxier import engine_config
from kproxy.config import build
from kproxy.model import NodeInfo

NODE = NodeInfo("node-a", addresses=("192.168.0.2", "fd00::2"), pod_cidrs=("10.244.1.0/24",))
LOCAL = ["192.168.0.2", "192.168.1.2", "10.9.0.1", "127.0.0.1", "fd00::2"]


def test_node_port_addresses_primary_and_cidrs() -> None:
    cfg = build(None, {"hostname_override": "node-a", "nodeport_addresses": ("primary",)})
    assert engine_config(cfg, "IPv4", NODE, local_addrs=LOCAL)["nodeport_ips"] == [
        "192.168.0.2",
        "fd00::2",
    ]
    cfg = build(None, {"hostname_override": "node-a", "nodeport_addresses": ("192.168.0.0/16",)})
    assert engine_config(cfg, "IPv4", NODE, local_addrs=LOCAL)["nodeport_ips"] == [
        "192.168.0.2",
        "192.168.1.2",
    ]
    cfg = build(None, {"hostname_override": "node-a"})
    assert engine_config(cfg, "IPv4", NODE, local_addrs=LOCAL)["nodeport_ips"] is None  # all


def test_local_detection_modes() -> None:
    def local(**flags: object) -> tuple[object, object]:
        cfg = build(None, {"hostname_override": "node-a", **flags})
        c = engine_config(cfg, "IPv4", NODE, local_addrs=LOCAL)
        return c["cluster_cidrs"], c["local_interface"]

    assert local(cluster_cidrs=("10.244.0.0/16",)) == (["10.244.0.0/16"], None)
    assert local(detect_local_mode="NodeCIDR") == (["10.244.1.0/24"], None)
    assert local(detect_local_mode="BridgeInterface", pod_bridge_interface="cni0") == ([], "cni0")
    assert local(detect_local_mode="InterfaceNamePrefix", pod_interface_name_prefix="veth") == (
        [],
        "veth+",
    )
    assert local(detect_local_mode="") == ([], None)


def test_localhost_node_ports_need_loopback_in_node_port_addresses() -> None:
    assert localhost_allowed(build(None, {}))
    assert localhost_allowed(build(None, {"nodeport_addresses": ("127.0.0.0/8",)}))
    assert not localhost_allowed(build(None, {"nodeport_addresses": ("192.168.0.0/16", "primary")}))


def test_net_admin_is_read_from_the_effective_capabilities() -> None:
    from kproxy.netinfo import has_net_admin

    assert has_net_admin("Name:\tx\nCapEff:\t000001ffffffffff\n")
    assert not has_net_admin("CapEff:\t0000000000000000\n")
    assert not has_net_admin("CapEff:\t0000000000000400\n")  # CAP_NET_BIND_SERVICE only
    assert not has_net_admin("Name:\tx\n")


def test_userspace_timeouts_come_from_the_conntrack_and_udp_settings() -> None:
    def timeouts(**flags: object) -> tuple[object, object]:
        cfg = build(None, {"hostname_override": "node-a", "mode": "userspace", **flags})
        c = engine_config(cfg, "IPv4", NODE, local_addrs=LOCAL).get("userspace")
        assert c is not None
        return c.get("tcp_idle_timeout_ms"), c.get("udp_idle_timeout_ms")

    assert timeouts() == (86_400_000, 250)  # kube-proxy's defaults: 24h, 250ms
    assert timeouts(conntrack_tcp_established_timeout=90.0, udp_idle_timeout=2.0) == (90_000, 2000)
    # 0 leaves the kernel's own default in the kernel modes; its value here.
    assert timeouts(conntrack_tcp_established_timeout=0.0)[0] == 5 * 24 * 3600 * 1000


def test_userspace_portal_port_range_reaches_the_engine() -> None:
    def port_range(**flags: object) -> object:
        cfg = build(None, {"hostname_override": "node-a", "mode": "userspace", **flags})
        c = engine_config(cfg, "IPv4", NODE, local_addrs=LOCAL).get("userspace")
        assert c is not None
        return c.get("proxy_port_range")

    assert port_range() is None  # the kernel's ephemeral range
    assert port_range(proxy_port_range="40000+99") == (40000, 40099)
