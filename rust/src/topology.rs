//! Which endpoints serve which traffic: upstream's `CategorizeEndpoints`.
//!
//! * Cluster policy uses ready endpoints, narrowed by topology hints when every ready endpoint
//!   carries hints and some hint names this node (PreferSameNode) or its zone (PreferSameZone);
//!   with no ready endpoint anywhere it falls back to serving-and-terminating ones.
//! * Local policy uses this node's ready endpoints, else this node's serving-and-terminating
//!   ones. A Local policy wins over topology for its traffic type.

use crate::model::Endpoint;
use crate::state::{ServicePortView, State};

/// Inputs that decide which policies a service port uses.
#[derive(Clone, Copy, Debug)]
pub struct Policies {
    pub internal_local: bool,
    pub external_local: bool,
    pub externally_accessible: bool,
}

impl Policies {
    /// Some traffic of this port goes to the cluster-wide endpoint set. An externally
    /// accessible port always needs it: even under a Local external policy, traffic from pods
    /// and from the node itself short-circuits to the cluster-wide set.
    pub fn uses_cluster(&self) -> bool {
        !self.internal_local || self.externally_accessible
    }

    /// Some traffic of this port goes to the node-local endpoint set.
    pub fn uses_local(&self) -> bool {
        self.internal_local || (self.externally_accessible && self.external_local)
    }
}

/// The node an engine runs on.
#[derive(Clone, Copy, Debug)]
pub struct NodeView<'a> {
    pub name: &'a str,
    pub zone: Option<&'a str>,
}

impl NodeView<'_> {
    pub fn is_local(&self, ep: &Endpoint) -> bool {
        ep.node_name.as_deref() == Some(self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopologyMode {
    None,
    PreferSameZone,
    PreferSameNode,
}

/// The result of categorizing one service port's endpoints.
#[derive(Debug, Default)]
pub struct Categorized<'a> {
    /// Endpoints for Cluster-policy traffic (empty when no traffic uses the Cluster policy).
    pub cluster: Vec<&'a Endpoint>,
    /// Endpoints for Local-policy traffic (empty when no traffic uses the Local policy).
    pub local: Vec<&'a Endpoint>,
    /// The union of both, in input order: every endpoint a rule may send traffic to.
    pub all_reachable: Vec<&'a Endpoint>,
    /// Whether any usable endpoint exists anywhere in the cluster.
    pub has_any: bool,
}

fn topology_mode(endpoints: &[&Endpoint], node: NodeView<'_>) -> TopologyMode {
    let mut all_node_hints = true;
    let mut hint_for_node = false;
    let mut all_zone_hints = true;
    let mut hint_for_zone = false;
    let mut any_ready = false;
    for ep in endpoints.iter().filter(|e| e.ready) {
        any_ready = true;
        if ep.node_hints.is_empty() {
            all_node_hints = false;
        } else if ep.node_hints.contains(node.name) {
            hint_for_node = true;
        }
        if ep.zone_hints.is_empty() {
            all_zone_hints = false;
        } else if node.zone.is_some_and(|z| ep.zone_hints.contains(z)) {
            hint_for_zone = true;
        }
    }
    if !any_ready {
        return TopologyMode::None;
    }
    if all_node_hints && hint_for_node {
        TopologyMode::PreferSameNode
    } else if all_zone_hints && hint_for_zone {
        TopologyMode::PreferSameZone
    } else {
        TopologyMode::None
    }
}

fn available_for_topology(ep: &Endpoint, mode: TopologyMode, node: NodeView<'_>) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::PreferSameNode => ep.node_hints.contains(node.name),
        TopologyMode::PreferSameZone => node.zone.is_some_and(|z| ep.zone_hints.contains(z)),
    }
}

fn serving_terminating(ep: &Endpoint) -> bool {
    ep.serving && ep.terminating
}

pub fn categorize<'a>(
    endpoints: &[&'a Endpoint],
    policies: Policies,
    node: NodeView<'_>,
) -> Categorized<'a> {
    let mut out = Categorized::default();
    if policies.uses_cluster() {
        let mode = topology_mode(endpoints, node);
        out.cluster = endpoints
            .iter()
            .copied()
            .filter(|e| e.ready && available_for_topology(e, mode, node))
            .collect();
        if out.cluster.is_empty() {
            out.cluster = endpoints
                .iter()
                .copied()
                .filter(|e| serving_terminating(e))
                .collect();
        }
        out.has_any = !out.cluster.is_empty();
    }
    if !policies.uses_local() {
        out.all_reachable = out.cluster.clone();
        return out;
    }

    let mut local_ready = false;
    let mut local_serving_terminating = false;
    for ep in endpoints {
        if ep.ready {
            out.has_any = true;
            local_ready |= node.is_local(ep);
        } else if serving_terminating(ep) {
            out.has_any = true;
            local_serving_terminating |= node.is_local(ep);
        }
    }
    if local_ready {
        out.local = endpoints
            .iter()
            .copied()
            .filter(|e| node.is_local(e) && e.ready)
            .collect();
    } else if local_serving_terminating {
        out.local = endpoints
            .iter()
            .copied()
            .filter(|e| node.is_local(e) && serving_terminating(e))
            .collect();
    }
    if !policies.uses_cluster() {
        out.all_reachable = out.local.clone();
        return out;
    }
    out.all_reachable = endpoints
        .iter()
        .copied()
        .filter(|e| {
            out.cluster.iter().any(|c| std::ptr::eq(*c, *e))
                || out.local.iter().any(|l| std::ptr::eq(*l, *e))
        })
        .collect();
    out
}

/// What one Service port's traffic goes to on this node: computed once per port, read by
/// every mode (the policy prologue each renderer used to spell out for itself).
#[derive(Debug)]
pub struct Serving<'a> {
    pub policies: Policies,
    /// Every endpoint of the port, usable or not (sorted by address and port).
    pub all: Vec<&'a Endpoint>,
    pub endpoints: Categorized<'a>,
}

impl<'a> Serving<'a> {
    /// The endpoints of `sp` in `state`, categorized for this node.
    pub fn of(state: &'a State, sp: &ServicePortView<'_>, node: NodeView<'_>) -> Serving<'a> {
        let policies = sp.policies();
        let all = state.endpoints(&sp.name);
        Serving {
            policies,
            endpoints: categorize(&all, policies, node),
            all,
        }
    }

    /// Whether any usable endpoint exists anywhere in the cluster.
    pub fn has_any(&self) -> bool {
        self.endpoints.has_any
    }

    /// Internal traffic (cluster IP) has an endpoint to go to: a local one under a Local
    /// internal policy, any one otherwise.
    pub fn has_internal(&self) -> bool {
        if self.policies.internal_local {
            !self.endpoints.local.is_empty()
        } else {
            self.endpoints.has_any
        }
    }

    /// External traffic (NodePorts, externalIPs, LB IPs) has an endpoint to go to.
    pub fn has_external(&self) -> bool {
        if self.policies.external_local {
            !self.endpoints.local.is_empty()
        } else {
            self.endpoints.has_any
        }
    }

    /// The endpoints internal traffic is spread over.
    pub fn internal(&self) -> &[&'a Endpoint] {
        self.pick(self.policies.internal_local)
    }

    /// The endpoints external traffic is spread over.
    pub fn external(&self) -> &[&'a Endpoint] {
        self.pick(self.policies.external_local)
    }

    /// The ipvs mode's choice, as upstream's (kubernetes#97081): a Local policy with no local
    /// endpoint falls back to the cluster's endpoints when the port has them, so pods on a
    /// node without one still reach the Service (external clients' replies are lost, as
    /// upstream accepts).
    pub fn with_cluster_fallback(&self, local: bool) -> &[&'a Endpoint] {
        if local && self.endpoints.local.is_empty() {
            &self.endpoints.cluster
        } else {
            self.pick(local)
        }
    }

    fn pick(&self, local: bool) -> &[&'a Endpoint] {
        if local {
            &self.endpoints.local
        } else {
            &self.endpoints.cluster
        }
    }

    /// What this port adds to a sync's counters: itself, the endpoints rules may reach, and
    /// whether a Local policy finds no endpoint here while others exist.
    pub fn counts(&self) -> Counts {
        let any = self.endpoints.has_any;
        Counts {
            service_ports: 1,
            endpoints: self.endpoints.all_reachable.len(),
            no_local_internal: usize::from(any && !self.has_internal()),
            no_local_external: usize::from(any && !self.has_external()),
        }
    }
}

/// What a set of Service ports adds up to: the counters a sync reports (every mode).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub service_ports: usize,
    pub endpoints: usize,
    pub no_local_internal: usize,
    pub no_local_external: usize,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.service_ports += o.service_ports;
        self.endpoints += o.endpoints;
        self.no_local_internal += o.no_local_internal;
        self.no_local_external += o.no_local_external;
    }

    pub fn sub(&mut self, o: &Counts) {
        self.service_ports -= o.service_ports;
        self.endpoints -= o.endpoints;
        self.no_local_internal -= o.no_local_internal;
        self.no_local_external -= o.no_local_external;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn ep(ip: &str, ready: bool, serving: bool, terminating: bool, node: &str) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port: 80u32.try_into().unwrap(),
            ready,
            serving,
            terminating,
            node_name: Some(node.to_owned()),
            zone_hints: BTreeSet::new(),
            node_hints: BTreeSet::new(),
        }
    }

    const NODE: NodeView<'static> = NodeView {
        name: "node-a",
        zone: Some("zone-a"),
    };
    const CLUSTER: Policies = Policies {
        internal_local: false,
        external_local: false,
        externally_accessible: true,
    };
    const ETP_LOCAL: Policies = Policies {
        internal_local: false,
        external_local: true,
        externally_accessible: true,
    };
    const ITP_LOCAL: Policies = Policies {
        internal_local: true,
        external_local: false,
        externally_accessible: false,
    };

    fn ips(v: &[&Endpoint]) -> Vec<String> {
        v.iter().map(|e| e.ip.to_string()).collect()
    }

    #[test]
    fn cluster_uses_ready_endpoints_only() {
        let eps = [
            ep("10.0.0.1", true, true, false, "node-a"),
            ep("10.0.0.2", false, false, false, "node-b"),
            ep("10.0.0.3", false, true, true, "node-b"),
        ];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let c = categorize(&refs, CLUSTER, NODE);
        assert_eq!(ips(&c.cluster), ["10.0.0.1"]);
        assert!(c.local.is_empty());
        assert!(c.has_any);
    }

    #[test]
    fn cluster_falls_back_to_serving_terminating() {
        let eps = [
            ep("10.0.0.2", false, false, true, "node-b"),
            ep("10.0.0.3", false, true, true, "node-b"),
        ];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let c = categorize(&refs, CLUSTER, NODE);
        assert_eq!(ips(&c.cluster), ["10.0.0.3"]);
        assert!(c.has_any);
    }

    #[test]
    fn local_policy_prefers_local_ready_then_local_terminating() {
        let eps = [
            ep("10.0.0.1", true, true, false, "node-b"),
            ep("10.0.0.2", false, true, true, "node-a"),
        ];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let c = categorize(&refs, ETP_LOCAL, NODE);
        assert_eq!(ips(&c.cluster), ["10.0.0.1"]);
        assert_eq!(ips(&c.local), ["10.0.0.2"]);
        assert_eq!(ips(&c.all_reachable), ["10.0.0.1", "10.0.0.2"]);

        let c = categorize(&refs, ITP_LOCAL, NODE);
        assert!(
            c.cluster.is_empty(),
            "internal-only Local policy needs no cluster set"
        );
        assert_eq!(ips(&c.local), ["10.0.0.2"]);
        assert_eq!(ips(&c.all_reachable), ["10.0.0.2"]);
    }

    #[test]
    fn no_local_endpoints_still_has_any() {
        let eps = [ep("10.0.0.1", true, true, false, "node-b")];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let c = categorize(&refs, ITP_LOCAL, NODE);
        assert!(c.local.is_empty());
        assert!(c.has_any);
    }

    #[test]
    fn zone_hints_narrow_cluster_endpoints() {
        let mut a = ep("10.0.0.1", true, true, false, "node-b");
        a.zone_hints.insert("zone-a".into());
        let mut b = ep("10.0.0.2", true, true, false, "node-c");
        b.zone_hints.insert("zone-b".into());
        let refs = vec![&a, &b];
        assert_eq!(ips(&categorize(&refs, CLUSTER, NODE).cluster), ["10.0.0.1"]);
        // One endpoint without hints disables topology for the whole service.
        let c = ep("10.0.0.3", true, true, false, "node-c");
        let refs = vec![&a, &b, &c];
        assert_eq!(categorize(&refs, CLUSTER, NODE).cluster.len(), 3);
        // No hint for our zone: no filtering.
        let other = NodeView {
            name: "node-x",
            zone: Some("zone-x"),
        };
        assert_eq!(categorize(&[&a, &b], CLUSTER, other).cluster.len(), 2);
    }

    #[test]
    fn node_hints_take_precedence_over_zone_hints() {
        let mut a = ep("10.0.0.1", true, true, false, "node-a");
        a.zone_hints.insert("zone-a".into());
        a.node_hints.insert("node-a".into());
        let mut b = ep("10.0.0.2", true, true, false, "node-b");
        b.zone_hints.insert("zone-a".into());
        b.node_hints.insert("node-b".into());
        assert_eq!(
            ips(&categorize(&[&a, &b], CLUSTER, NODE).cluster),
            ["10.0.0.1"]
        );
    }
}
