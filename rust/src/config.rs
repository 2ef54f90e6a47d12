//! What an engine is configured with: the settings that cross from Python ([`EngineConfig`],
//! validated here, once) and the settings every mode's renderer reads ([`RenderConfig`]).

use crate::error::{Error, Result};
use crate::model::{Cidr, IpFamily, IpvsScheduler};
use serde::Deserialize;
use std::net::IpAddr;

/// Which kernel interface an engine drives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The real kernel.
    #[default]
    Kernel,
    /// An in-memory kernel (tests, `render`, dry runs).
    Fake,
}

/// How the kernel is programmed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Iptables,
    Nftables,
    Userspace,
    Ipvs,
}

impl Mode {
    /// The mode's name, as `--proxy-mode` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
            Mode::Userspace => "userspace",
            Mode::Ipvs => "ipvs",
        }
    }
}

/// Static configuration of one engine (JSON from Python): the settings every mode reads, and
/// the section of the engine's own mode. Python's types for it are generated from this
/// definition (`python/kproxy/wire.py`, see `crate::wire`).
#[derive(Clone, Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    pub family: IpFamily,
    pub node_name: String,
    /// Pod CIDRs (ClusterCIDR or NodeCIDR detection); the one of this engine's family is used.
    #[serde(default)]
    pub cluster_cidrs: Vec<Cidr>,
    /// Pod traffic arrives on this interface (BridgeInterface), or on interfaces with this
    /// prefix when it ends in `+` (InterfaceNamePrefix). Takes precedence over the CIDRs.
    #[serde(default)]
    pub local_interface: Option<String>,
    #[serde(default)]
    pub masquerade_all: bool,
    #[serde(default = "default_masquerade_bit")]
    pub masquerade_bit: u8,
    /// `None`: NodePorts on every local address.
    #[serde(default)]
    pub nodeport_ips: Option<Vec<IpAddr>>,
    #[serde(default)]
    pub conntrack_tcp_be_liberal: bool,
    /// The node's own addresses (loadBalancerSourceRanges that contain one also admit traffic
    /// from the LB IP itself, as upstream).
    #[serde(default)]
    pub node_ips: Vec<IpAddr>,
    #[serde(default)]
    pub backend: BackendKind,
    #[serde(default)]
    pub mode: Mode,
    /// The iptables mode's own settings (refused with another mode).
    #[serde(default)]
    pub iptables: Option<IptablesConfig>,
    /// The nftables mode's own settings (refused with another mode).
    #[serde(default)]
    pub nftables: Option<NftablesConfig>,
    /// The ipvs mode's own settings (refused with another mode).
    #[serde(default)]
    pub ipvs: Option<IpvsConfig>,
    /// The userspace mode's own settings (refused with another mode).
    #[serde(default)]
    pub userspace: Option<UserspaceConfig>,
}

/// The iptables mode's section of an [`EngineConfig`].
#[derive(Clone, Debug, Default, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct IptablesConfig {
    /// NodePorts on 127.0.0.0/8 (IPv4 only; the caller sets route_localnet).
    #[serde(default)]
    pub localhost_nodeports: bool,
}

/// The nftables mode's section of an [`EngineConfig`].
#[derive(Clone, Debug, Default, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct NftablesConfig {
    /// TCP NodePorts on the family's loopback address, through a userspace proxy (KEP-6032).
    #[serde(default)]
    pub localhost_nodeports: bool,
}

/// The ipvs mode's section of an [`EngineConfig`].
#[derive(Clone, Debug, Default, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct IpvsConfig {
    /// The scheduler of every virtual server (`ipvs.scheduler`; rr when unset).
    #[serde(default)]
    pub scheduler: Option<IpvsScheduler>,
    /// Virtual servers on these addresses are someone else's (`ipvs.excludeCIDRs`).
    #[serde(default)]
    pub exclude_cidrs: Vec<Cidr>,
    /// The kernel's IPVS connection timeouts in seconds (0 or unset: unchanged).
    #[serde(default)]
    pub tcp_timeout_s: u32,
    #[serde(default)]
    pub tcp_fin_timeout_s: u32,
    #[serde(default)]
    pub udp_timeout_s: u32,
    /// The addresses of the node's interfaces (other than kube-ipvs0). An external or LB IP
    /// among them is not bound on kube-ipvs0, nor fenced by KUBE-IPVS-FILTER.
    #[serde(default)]
    pub host_ips: Vec<IpAddr>,
}

/// The userspace mode's section of an [`EngineConfig`].
#[derive(Clone, Debug, Default, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct UserspaceConfig {
    /// The addresses NodePort listeners bind (`--bind-address`).
    #[serde(default)]
    pub listen_addresses: Vec<IpAddr>,
    /// Also serve Service addresses through redirect rules (needs NET_ADMIN).
    #[serde(default)]
    pub portals: bool,
    #[serde(default)]
    pub connect_timeout_ms: Option<u64>,
    #[serde(default)]
    pub udp_idle_timeout_ms: Option<u64>,
    #[serde(default)]
    pub tcp_idle_timeout_ms: Option<u64>,
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// The ports portal listeners take (`--proxy-port-range`, first and last); unset: the
    /// kernel's ephemeral range.
    #[serde(default)]
    pub proxy_port_range: Option<(u16, u16)>,
}

fn default_masquerade_bit() -> u8 {
    14
}

impl EngineConfig {
    pub fn from_json(s: &str) -> Result<EngineConfig> {
        let cfg: EngineConfig = serde_json::from_str(s)
            .map_err(|e| Error::InvalidInput(format!("engine config: {e}")))?;
        if let Some(i) = &cfg.local_interface {
            let name = i.strip_suffix('+').unwrap_or(i);
            let ok = !name.is_empty()
                && name.len() <= 15
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !ok {
                return Err(Error::InvalidInput(format!(
                    "engine config: local_interface {i:?} is not an interface name"
                )));
            }
        }
        for (section, given) in [
            (Mode::Iptables, cfg.iptables.is_some()),
            (Mode::Nftables, cfg.nftables.is_some()),
            (Mode::Ipvs, cfg.ipvs.is_some()),
            (Mode::Userspace, cfg.userspace.is_some()),
        ] {
            if given && section != cfg.mode {
                return Err(Error::InvalidInput(format!(
                    "engine config: {} settings are given for the {} mode",
                    section.name(),
                    cfg.mode.name()
                )));
            }
        }
        if let Some((first, last)) = cfg.userspace.as_ref().and_then(|u| u.proxy_port_range) {
            if first == 0 || first > last {
                return Err(Error::InvalidInput(format!(
                    "engine config: userspace.proxy_port_range {first}-{last} is not a port range"
                )));
            }
        }
        if cfg.masquerade_bit > 31 {
            return Err(Error::InvalidInput(format!(
                "engine config: masquerade_bit {} is not in 0..=31",
                cfg.masquerade_bit
            )));
        }
        Ok(cfg)
    }

    /// The settings every renderer reads, for this engine's family.
    pub fn render_config(&self) -> RenderConfig {
        RenderConfig {
            family: self.family,
            node_name: self.node_name.clone(),
            local: match (
                &self.local_interface,
                self.cluster_cidrs
                    .iter()
                    .find(|c| self.family.contains(&c.addr())),
            ) {
                (Some(i), _) => LocalDetector::Interface(i.clone()),
                (None, Some(c)) => LocalDetector::Cidr(*c),
                (None, None) => LocalDetector::None,
            },
            localhost_nodeports: self
                .iptables
                .as_ref()
                .is_some_and(|i| i.localhost_nodeports),
            nfacct: Vec::new(),
            masquerade_all: self.masquerade_all,
            masquerade_mark: 1u32 << self.masquerade_bit,
            nodeport_ips: self.nodeport_ips.clone(),
            conntrack_tcp_be_liberal: self.conntrack_tcp_be_liberal,
            node_ips: self
                .node_ips
                .iter()
                .copied()
                .filter(|ip| self.family.contains(ip))
                .collect(),
        }
    }
}

/// Everything about the node and the configuration that shapes the rules.
#[derive(Clone, Debug)]
pub struct RenderConfig {
    pub family: IpFamily,
    pub node_name: String,
    /// How traffic from this node's pods is recognized (upstream's `detectLocalMode`).
    pub local: LocalDetector,
    pub masquerade_all: bool,
    /// `1 << masqueradeBit`.
    pub masquerade_mark: u32,
    /// `None`: NodePorts on every local address; `Some(ips)`: only on these node addresses.
    pub nodeport_ips: Option<Vec<IpAddr>>,
    /// Skip the conntrack INVALID drop because `nf_conntrack_tcp_be_liberal` is set.
    pub conntrack_tcp_be_liberal: bool,
    /// The node's addresses of this family.
    pub node_ips: Vec<IpAddr>,
    /// NodePorts answer on 127.0.0.0/8 too (IPv4 only; needs `route_localnet`).
    pub localhost_nodeports: bool,
    /// The nfacct counters that exist ([`crate::nfacct`]): the iptables mode's rules count
    /// into these only (a rule naming a missing one is refused).
    pub nfacct: Vec<&'static str>,
}

/// Recognizes traffic that comes from pods (upstream's local traffic detectors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalDetector {
    /// Detection off: nothing is treated as pod traffic.
    None,
    /// Sources in this CIDR (`ClusterCIDR` and `NodeCIDR` modes).
    Cidr(Cidr),
    /// Arriving on an interface: an exact name (`BridgeInterface`) or a prefix written with a
    /// trailing `+` (`InterfaceNamePrefix`), as iptables spells it. Validated by the caller.
    Interface(String),
}

/// In iptables' syntax: the iptables mode's rules and the ipvs mode's companion rules use it.
impl LocalDetector {
    /// Match arguments for "comes from a pod", if detection is on.
    pub(crate) fn if_local(&self) -> Option<String> {
        match self {
            LocalDetector::None => None,
            LocalDetector::Cidr(c) => Some(format!("-s {c}")),
            LocalDetector::Interface(i) => Some(format!("-i {i}")),
        }
    }

    /// Match arguments for "does not come from a pod", if detection is on.
    pub(crate) fn if_not_local(&self) -> Option<String> {
        match self {
            LocalDetector::None => None,
            LocalDetector::Cidr(c) => Some(format!("! -s {c}")),
            LocalDetector::Interface(i) => Some(format!("! -i {i}")),
        }
    }
}
