//! Normalized, validated values: what a sync is made of.
//!
//! Python normalizes Kubernetes objects and sends a [`ChangeSet`] as JSON. Everything that
//! later reaches rule text is checked while decoding: names are DNS labels ([`Name`]),
//! addresses are parsed ([`std::net::IpAddr`], [`Cidr`]), protocols are an enum. A value that
//! fails these checks fails the whole decode with [`crate::error::Error::InvalidInput`]: the
//! Python side validates first, so this is a second line of defence for library callers.

mod cidr;
mod name;

pub use cidr::{aggregate, Cidr};
pub use name::Name;

use serde::Deserialize;
use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

/// An IP family; one engine serves one family (dual-stack runs two engines).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub enum IpFamily {
    #[serde(rename = "IPv4")]
    V4,
    #[serde(rename = "IPv6")]
    V6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    pub fn contains(self, ip: &IpAddr) -> bool {
        IpFamily::of(ip) == self
    }
}

/// Transport protocols a Service port can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    /// The lower-case spelling used by iptables (`-p tcp`) and in upstream's chain hashes.
    pub fn lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// The Kubernetes spelling (`TCP`).
    pub fn upper(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// The IP protocol number (`/etc/protocols`).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }
}

/// Identifies a Service (namespace and name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct ServiceKey {
    pub namespace: Name,
    pub name: Name,
}

/// Identifies one port of a Service: upstream's `ServicePortName`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub service: ServiceKey,
    /// The port's name; empty for a Service's single unnamed port.
    pub port: Name,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    /// `ns/name` or `ns/name:port`, exactly as upstream prints it (it is hashed into chain names).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.service.namespace, self.service.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// `externalTrafficPolicy` / `internalTrafficPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// The IPVS schedulers upstream accepts: `ipvs.scheduler`, and a Service's own choice (the
/// `kproxy.io/ipvs-scheduler` annotation). The one list of them; Python's is generated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum IpvsScheduler {
    Rr,
    Wrr,
    Lc,
    Wlc,
    Lblc,
    Lblcr,
    Sh,
    Dh,
    Sed,
    Nq,
    Mh,
}

impl IpvsScheduler {
    /// The kernel's name of the scheduler (its module is `ip_vs_<name>`).
    pub fn name(self) -> &'static str {
        match self {
            IpvsScheduler::Rr => "rr",
            IpvsScheduler::Wrr => "wrr",
            IpvsScheduler::Lc => "lc",
            IpvsScheduler::Wlc => "wlc",
            IpvsScheduler::Lblc => "lblc",
            IpvsScheduler::Lblcr => "lblcr",
            IpvsScheduler::Sh => "sh",
            IpvsScheduler::Dh => "dh",
            IpvsScheduler::Sed => "sed",
            IpvsScheduler::Nq => "nq",
            IpvsScheduler::Mh => "mh",
        }
    }
}

/// One port of a Service as the Service spec declares it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    #[serde(default)]
    pub name: Name,
    pub protocol: Protocol,
    pub port: Port,
    /// 0 when the Service has no NodePort for this port.
    #[serde(default)]
    pub node_port: u16,
}

/// A non-zero port number (zero is rejected while decoding).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "u32")]
pub struct Port(u16);

impl Port {
    pub fn get(self) -> u16 {
        self.0
    }
}

impl TryFrom<u32> for Port {
    type Error = String;
    fn try_from(v: u32) -> Result<Self, String> {
        match u16::try_from(v) {
            Ok(p) if p != 0 => Ok(Port(p)),
            _ => Err(format!("port {v} is not in 1..=65535")),
        }
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A Service, family-neutral: each engine picks the addresses of its own family.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Service {
    #[serde(default)]
    pub cluster_ips: Vec<IpAddr>,
    #[serde(default)]
    pub external_ips: Vec<IpAddr>,
    #[serde(default)]
    pub load_balancer_ips: Vec<IpAddr>,
    #[serde(default)]
    pub load_balancer_source_ranges: Vec<Cidr>,
    /// Whether the Service can be reached from outside (NodePort, LoadBalancer or externalIPs);
    /// upstream only honours `externalTrafficPolicy: Local` for such Services.
    #[serde(default)]
    pub externally_accessible: bool,
    #[serde(default)]
    pub external_traffic_policy: TrafficPolicy,
    #[serde(default)]
    pub internal_traffic_policy: TrafficPolicy,
    /// `Some(seconds)` for `sessionAffinity: ClientIP`.
    #[serde(default)]
    pub session_affinity_timeout: Option<u32>,
    #[serde(default)]
    pub health_check_node_port: u16,
    pub ports: Vec<PortSpec>,
    /// The ipvs mode's scheduler for this Service (an annotation); `None`: the default.
    #[serde(default)]
    pub ipvs_scheduler: Option<IpvsScheduler>,
}

impl Service {
    /// `externalTrafficPolicy: Local` in effect (only for externally accessible Services).
    pub fn external_policy_local(&self) -> bool {
        self.externally_accessible && self.external_traffic_policy == TrafficPolicy::Local
    }

    pub fn internal_policy_local(&self) -> bool {
        self.internal_traffic_policy == TrafficPolicy::Local
    }
}

/// One endpoint of one Service port, merged from the Service's EndpointSlices.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: Port,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub zone_hints: BTreeSet<String>,
    #[serde(default)]
    pub node_hints: BTreeSet<String>,
}

/// The endpoints of one (port name, protocol) of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct EndpointPort {
    #[serde(default)]
    pub name: Name,
    pub protocol: Protocol,
    pub endpoints: Vec<Endpoint>,
}

/// A Service added or updated (`service: Some`) or deleted (`None`).
#[derive(Clone, Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ServiceChange {
    #[serde(flatten)]
    pub key: ServiceKey,
    pub service: Option<Service>,
}

/// The complete, merged endpoint set of a Service after a change (empty: no endpoints left).
#[derive(Clone, Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct EndpointsChange {
    #[serde(flatten)]
    pub key: ServiceKey,
    pub ports: Vec<EndpointPort>,
}

/// What this engine needs to know about its own Node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct NodeInfo {
    /// `topology.kubernetes.io/zone`, used for topology hints.
    #[serde(default)]
    pub zone: Option<String>,
}

/// Everything that changed since the previous sync; one per sync, never one per object.
#[derive(Clone, Debug, Default, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ChangeSet {
    #[serde(default)]
    pub services: Vec<ServiceChange>,
    #[serde(default)]
    pub endpoints: Vec<EndpointsChange>,
    /// Present when the Node's topology changed (this forces a full sync).
    #[serde(default)]
    pub node: Option<NodeInfo>,
    /// Present when the cluster's ServiceCIDRs changed: the CIDRs of every ServiceCIDR object,
    /// of both families (empty: there are none). Traffic to an address inside them that no
    /// Service holds is dropped, in the nftables mode (upstream's `cluster-ips-check`).
    #[serde(default)]
    pub service_cidrs: Option<Vec<Cidr>>,
}

impl ChangeSet {
    pub fn from_json(bytes: &[u8]) -> crate::error::Result<ChangeSet> {
        serde_json::from_slice(bytes)
            .map_err(|e| crate::error::Error::InvalidInput(format!("change set: {e}")))
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.endpoints.is_empty()
            && self.node.is_none()
            && self.service_cidrs.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spn(ns: &str, name: &str, port: &str) -> ServicePortName {
        ServicePortName {
            service: ServiceKey {
                namespace: Name::new(ns).unwrap(),
                name: Name::new(name).unwrap(),
            },
            port: Name::new(port).unwrap(),
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn service_port_name_prints_like_upstream() {
        assert_eq!(
            spn("default", "kubernetes", "https").to_string(),
            "default/kubernetes:https"
        );
        assert_eq!(spn("ns", "svc", "").to_string(), "ns/svc");
    }

    #[test]
    fn decodes_a_change_set() {
        let cs = ChangeSet::from_json(
            br#"{"services":[{"namespace":"ns","name":"svc","service":{
                "cluster_ips":["10.96.0.10"],"ports":[{"name":"dns","protocol":"UDP","port":53}]}}],
              "endpoints":[{"namespace":"ns","name":"svc","ports":[{"name":"dns","protocol":"UDP",
                "endpoints":[{"ip":"10.244.1.2","port":53,"ready":true,"serving":true,"terminating":false}]}]}]}"#,
        )
        .unwrap();
        assert_eq!(cs.services.len(), 1);
        assert_eq!(cs.endpoints[0].ports[0].endpoints[0].port.get(), 53);
    }

    #[test]
    fn rejects_port_zero_bad_names_and_unknown_protocols() {
        for bad in [
            r#"{"services":[{"namespace":"ns","name":"svc","service":{"ports":[{"protocol":"TCP","port":0}]}}]}"#,
            r#"{"services":[{"namespace":"ns","name":"a b","service":{"ports":[]}}]}"#,
            r#"{"services":[{"namespace":"ns","name":"-A x","service":{"ports":[]}}]}"#,
            r#"{"services":[{"namespace":"ns","name":"svc","service":{"ports":[{"protocol":"ICMP","port":1}]}}]}"#,
            r#"{"services":[{"namespace":"ns","name":"svc","service":{"cluster_ips":["300.1.1.1"],"ports":[]}}]}"#,
        ] {
            assert!(ChangeSet::from_json(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
