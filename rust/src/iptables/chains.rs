//! Fixed chain names and the jump rules from the built-in chains, as upstream has them.

use crate::xtables::jumps::{
    jump, Jump, FORWARD, PORTALS_FROM_OUTPUT, PORTALS_FROM_PREROUTING, POSTROUTING,
};
use crate::xtables::{KUBE_FORWARD, KUBE_MARK_MASQ, KUBE_POSTROUTING, KUBE_SERVICES};

pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
/// Anti-martian drop for localhost NodePorts (a copy of kubelet's chain, as upstream).
pub const KUBE_FIREWALL: &str = "KUBE-FIREWALL";

/// An empty chain in each table whose disappearance means someone flushed our rules (a
/// firewall reload, an administrator): its absence forces a full sync.
pub const CANARY: &str = "KUBE-PROXY-CANARY";
pub const CANARY_TABLES: &[&str] = &["mangle", "nat", "filter"];

/// Chains of the filter table that every ruleset declares (and so flushes and rewrites).
pub const FILTER_CHAINS: &[&str] = &[
    KUBE_EXTERNAL_SERVICES,
    KUBE_FORWARD,
    KUBE_NODEPORTS,
    KUBE_PROXY_FIREWALL,
    KUBE_SERVICES,
];

/// Fixed chains of the nat table.
pub const NAT_CHAINS: &[&str] = &[
    KUBE_MARK_MASQ,
    KUBE_NODEPORTS,
    KUBE_POSTROUTING,
    KUBE_SERVICES,
];

/// Prefixes of per-service and per-endpoint nat chains (what a stale-chain sweep may delete).
pub const SERVICE_CHAIN_PREFIXES: &[&str] = &[
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
];

pub fn is_service_chain(name: &str) -> bool {
    SERVICE_CHAIN_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Chains that come and go with Services: per-service chains and dispatch buckets.
pub fn is_dynamic_chain(name: &str) -> bool {
    is_service_chain(name)
        || super::dispatch::BUCKET_PREFIXES
            .iter()
            .any(|p| name.starts_with(p))
}

/// Upstream's `iptablesJumpChains`, in the order it ensures them.
pub const JUMPS: &[Jump] = &[
    jump!(
        "filter",
        "INPUT",
        KUBE_EXTERNAL_SERVICES,
        "kubernetes externally-visible service portals",
        new
    ),
    jump!(
        "filter",
        "FORWARD",
        KUBE_EXTERNAL_SERVICES,
        "kubernetes externally-visible service portals",
        new
    ),
    jump!(
        "filter",
        "INPUT",
        KUBE_NODEPORTS,
        "kubernetes health check service ports"
    ),
    jump!(
        "filter",
        "FORWARD",
        KUBE_SERVICES,
        "kubernetes service portals",
        new
    ),
    jump!(
        "filter",
        "OUTPUT",
        KUBE_SERVICES,
        "kubernetes service portals",
        new
    ),
    FORWARD,
    jump!(
        "filter",
        "INPUT",
        KUBE_PROXY_FIREWALL,
        "kubernetes load balancer firewall",
        new
    ),
    jump!(
        "filter",
        "OUTPUT",
        KUBE_PROXY_FIREWALL,
        "kubernetes load balancer firewall",
        new
    ),
    jump!(
        "filter",
        "FORWARD",
        KUBE_PROXY_FIREWALL,
        "kubernetes load balancer firewall",
        new
    ),
    PORTALS_FROM_OUTPUT,
    PORTALS_FROM_PREROUTING,
    POSTROUTING,
];

/// Jumps to the anti-martian chain, present only with localhost NodePorts (IPv4).
pub const FIREWALL_JUMPS: &[Jump] = &[
    jump!(
        "filter",
        "INPUT",
        KUBE_FIREWALL,
        "kubernetes firewall for dropping marked packets"
    ),
    jump!(
        "filter",
        "OUTPUT",
        KUBE_FIREWALL,
        "kubernetes firewall for dropping marked packets"
    ),
];
