//! Merged state -> nftables objects, in a layout whose number of sets and maps does not grow
//! with the number of Services.
//!
//! The kernel finds a set by walking the table's sets, and binding a map to a rule in a new
//! chain walks the map's existing bindings: one map per Service (upstream's layout) makes every
//! sync O(N²). Here every Service is a handful of *elements* in shared maps:
//!
//! * `service-ips` / `service-nodeports` (verdict maps) send a new connection to its Service:
//!   straight to an endpoint pool, or through the Service's own `external-…`/`nodeport-…`
//!   chain (masquerade and Local-policy short-circuits) or its affinity chain.
//! * An *endpoint pool* is a chain and a map per endpoint count `n` (`endpoints-n`): the chain
//!   DNATs through the map keyed by `destination . protocol . port . numgen random mod n`, so
//!   one rule serves every Service with `n` endpoints. Local-policy and NodePort traffic use
//!   the `local-`, `nodeport-` and `nodeport-local-` pools. The number of pools is bounded by
//!   the distinct endpoint counts, not by the Services.
//! * `no-endpoint-*` (verdict maps) drop or reject what has no usable endpoint, in the filter
//!   hooks; `firewall-ips`/`firewall-allow` implement loadBalancerSourceRanges;
//!   `hairpin-connections` masquerades a pod reaching itself; `cluster-ips` masquerades
//!   off-cluster traffic to cluster IPs and rejects unknown ports.
//! * ClientIP affinity uses one shared timeout set `affinity` keyed by client and endpoint id;
//!   affinity Services keep per-endpoint chains (they must record the choice).

use super::ast::{Data, Field, Hook, Key, Match, Rule, SetDef, SetSpec, Stmt, Value};
use crate::config::{LocalDetector, RenderConfig};
use crate::model::{aggregate, Cidr, Endpoint, IpFamily, Protocol, ServiceKey, ServicePortName};
use crate::naming::{endpoint_id, nft_endpoint_base, nft_service_base};
use crate::state::{ServicePortView, State};
use crate::topology::Counts;
use crate::topology::{NodeView, Serving};
use std::collections::BTreeMap;
use std::net::IpAddr;

pub const CLUSTER_IPS: &str = "cluster-ips";
/// The cluster's ServiceCIDRs (an interval set): traffic to an address in them that no Service
/// holds is dropped.
pub const SERVICE_CIDRS: &str = "service-cidrs";
pub const NODEPORT_IPS: &str = "nodeport-ips";
pub const SERVICE_IPS: &str = "service-ips";
pub const SERVICE_NODEPORTS: &str = "service-nodeports";
pub const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
pub const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
pub const FIREWALL_IPS: &str = "firewall-ips";
pub const FIREWALL_ALLOW: &str = "firewall-allow";
pub const HAIRPIN: &str = "hairpin-connections";
pub const AFFINITY: &str = "affinity";
pub const REJECT_CHAIN: &str = "reject-chain";
pub const SERVICES: &str = "services";
pub const MASQUERADING: &str = "masquerading";
pub const FIREWALL_CHECK: &str = "firewall-check";
pub const SERVICE_ENDPOINTS_CHECK: &str = "service-endpoints-check";
pub const NODEPORT_ENDPOINTS_CHECK: &str = "nodeport-endpoints-check";
pub const CLUSTER_IPS_CHECK: &str = "cluster-ips-check";

/// Most affinity entries the kernel keeps at once (per family).
pub const AFFINITY_SIZE: u32 = 1 << 20;

const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

/// How a destination reaches an endpoint pool: by service address or by NodePort.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Entry {
    Vip,
    NodePort,
}

/// A shared endpoint pool: a chain and a map of that name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pool {
    pub entry: Entry,
    /// Node-local endpoints (a Local traffic policy) rather than cluster-wide ones.
    pub local: bool,
    pub size: u32,
}

impl Pool {
    pub fn name(&self) -> String {
        let e = match self.entry {
            Entry::Vip => "",
            Entry::NodePort => "nodeport-",
        };
        let l = if self.local { "local-" } else { "" };
        format!("{e}{l}endpoints-{}", self.size)
    }

    /// Parse a name made by [`Pool::name`].
    pub fn parse(name: &str) -> Option<Pool> {
        let (entry, rest) = match name.strip_prefix("nodeport-") {
            Some(r) => (Entry::NodePort, r),
            None => (Entry::Vip, name),
        };
        let (local, rest) = match rest.strip_prefix("local-") {
            Some(r) => (true, r),
            None => (false, rest),
        };
        let size: u32 = rest.strip_prefix("endpoints-")?.parse().ok()?;
        (size > 0 && Pool { entry, local, size }.name() == name).then_some(Pool {
            entry,
            local,
            size,
        })
    }

    pub fn set_def(&self) -> SetDef {
        SetDef {
            name: self.name(),
            spec: match self.entry {
                Entry::Vip => SetSpec::AddrProtoPortIndexDnat,
                Entry::NodePort => SetSpec::ProtoPortIndexDnat,
            },
            interval: false,
            dynamic_size: None,
        }
    }

    /// The pool chain: one DNAT per protocol through the pool map.
    pub fn rules(&self) -> Vec<Rule> {
        let mut fields = match self.entry {
            Entry::Vip => vec![Field::Daddr, Field::L4proto, Field::Dport],
            Entry::NodePort => vec![Field::L4proto, Field::Dport],
        };
        fields.push(Field::Random(self.size));
        PROTOCOLS
            .iter()
            .map(|p| {
                Rule::always(Stmt::DnatMap {
                    protocol: *p,
                    fields: fields.clone(),
                    map: self.name(),
                })
            })
            .collect()
    }
}

/// Which set an element belongs to: a fixed one or an endpoint pool. Copy, so that hundreds
/// of thousands of elements do not each carry an allocated name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetId {
    Fixed(&'static str),
    Pool(Pool),
}

impl SetId {
    pub fn name(&self) -> String {
        match self {
            SetId::Fixed(n) => (*n).to_owned(),
            SetId::Pool(p) => p.name(),
        }
    }
}

/// A set element: set, key, data (maps only).
pub type Element = (SetId, Key, Option<Data>);

/// Everything one Service owns: its chains and its elements in the shared sets and maps.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ServiceObjects {
    pub chains: BTreeMap<String, Vec<Rule>>,
    pub elements: Vec<Element>,
    pub counts: Counts,
}

impl ServiceObjects {
    fn element(&mut self, set: &'static str, key: Key, data: Option<Data>) {
        self.elements.push((SetId::Fixed(set), key, data));
    }
}

/// The fixed part of the table: sets, maps and chains that exist whatever the Services.
pub struct Fixed {
    pub sets: Vec<SetDef>,
    pub chains: Vec<(String, Option<Hook>, Vec<Rule>)>,
}

/// Before DNAT: the source-range firewall must see the original destination.
pub const PRE_DNAT: i32 = -110;
const DSTNAT: i32 = -100;
const FILTER: i32 = 0;
const SRCNAT: i32 = 100;

fn hook(kind: &'static str, hook: &'static str, priority: i32) -> Option<Hook> {
    Some(Hook {
        kind,
        hook,
        priority,
    })
}

fn set(name: &str, spec: SetSpec) -> SetDef {
    SetDef {
        name: name.to_owned(),
        spec,
        interval: spec == SetSpec::AddrProtoPortSaddr,
        dynamic_size: None,
    }
}

fn loopback(f: IpFamily) -> Cidr {
    match f {
        IpFamily::V4 => "127.0.0.0/8".parse().expect("valid"),
        IpFamily::V6 => "::1/128".parse().expect("valid"),
    }
}

fn lookup(fields: &[Field], set: &str, neg: bool) -> Match {
    Match::Lookup {
        fields: fields.to_vec(),
        set: set.to_owned(),
        neg,
    }
}

const DST: [Field; 3] = [Field::Daddr, Field::L4proto, Field::Dport];
const NP: [Field; 2] = [Field::L4proto, Field::Dport];

/// "Addressed to a NodePort address": every local address but loopback, or the configured ones.
fn nodeport_dest(cfg: &RenderConfig) -> Vec<Match> {
    match &cfg.nodeport_ips {
        None => vec![
            Match::FibLocal { src: false },
            Match::Daddr {
                cidr: loopback(cfg.family),
                neg: true,
            },
        ],
        Some(_) => vec![lookup(&[Field::Daddr], NODEPORT_IPS, false)],
    }
}

/// Matches "comes from a pod" (`neg`: does not), if detection is on.
fn local_match(d: &LocalDetector, neg: bool) -> Option<Match> {
    match d {
        LocalDetector::None => None,
        LocalDetector::Cidr(c) => Some(Match::Saddr { cidr: *c, neg }),
        LocalDetector::Interface(i) => Some(Match::Iif {
            name: i.clone(),
            neg,
        }),
    }
}

pub fn fixed(cfg: &RenderConfig) -> Fixed {
    let mark = cfg.masquerade_mark;
    let mut sets = vec![
        set(CLUSTER_IPS, SetSpec::Addr),
        set(SERVICE_IPS, SetSpec::AddrProtoPortVerdict),
        set(SERVICE_NODEPORTS, SetSpec::ProtoPortVerdict),
        set(NO_ENDPOINT_SERVICES, SetSpec::AddrProtoPortVerdict),
        set(NO_ENDPOINT_NODEPORTS, SetSpec::ProtoPortVerdict),
        set(FIREWALL_IPS, SetSpec::AddrProtoPort),
        set(FIREWALL_ALLOW, SetSpec::AddrProtoPortSaddr),
        set(HAIRPIN, SetSpec::AddrAddrProtoPort),
        SetDef {
            name: SERVICE_CIDRS.to_owned(),
            spec: SetSpec::Addr,
            interval: true,
            dynamic_size: None,
        },
        SetDef {
            name: AFFINITY.to_owned(),
            spec: SetSpec::SaddrId,
            interval: false,
            dynamic_size: Some(AFFINITY_SIZE),
        },
    ];
    if cfg.nodeport_ips.is_some() {
        sets.push(set(NODEPORT_IPS, SetSpec::Addr));
    }
    let new = || Match::CtStateNew;
    let mut services = Vec::new();
    if cfg.masquerade_all {
        services.push(Rule::new(
            vec![lookup(&[Field::Daddr], CLUSTER_IPS, false)],
            Stmt::MarkOr(mark),
        ));
    } else if let Some(not_pod) = local_match(&cfg.local, true) {
        services.push(Rule::new(
            vec![lookup(&[Field::Daddr], CLUSTER_IPS, false), not_pod],
            Stmt::MarkOr(mark),
        ));
    }
    services.push(Rule::always(Stmt::Vmap {
        fields: DST.to_vec(),
        map: SERVICE_IPS.into(),
    }));
    services.push(Rule::new(
        nodeport_dest(cfg),
        Stmt::Vmap {
            fields: NP.to_vec(),
            map: SERVICE_NODEPORTS.into(),
        },
    ));
    let chains = vec![
        (
            "filter-prerouting-pre-dnat".into(),
            hook("filter", "prerouting", PRE_DNAT),
            vec![Rule::new(vec![new()], Stmt::Jump(FIREWALL_CHECK.into()))],
        ),
        (
            "filter-output-pre-dnat".into(),
            hook("filter", "output", PRE_DNAT),
            vec![Rule::new(vec![new()], Stmt::Jump(FIREWALL_CHECK.into()))],
        ),
        (
            "filter-input".into(),
            hook("filter", "input", FILTER),
            vec![
                Rule::new(vec![new()], Stmt::Jump(NODEPORT_ENDPOINTS_CHECK.into())),
                Rule::new(vec![new()], Stmt::Jump(SERVICE_ENDPOINTS_CHECK.into())),
            ],
        ),
        (
            "filter-forward".into(),
            hook("filter", "forward", FILTER),
            vec![
                Rule::new(vec![new()], Stmt::Jump(SERVICE_ENDPOINTS_CHECK.into())),
                Rule::new(vec![new()], Stmt::Jump(CLUSTER_IPS_CHECK.into())),
            ],
        ),
        (
            "filter-output".into(),
            hook("filter", "output", FILTER),
            vec![
                Rule::new(vec![new()], Stmt::Jump(SERVICE_ENDPOINTS_CHECK.into())),
                Rule::new(vec![new()], Stmt::Jump(CLUSTER_IPS_CHECK.into())),
            ],
        ),
        (
            "nat-prerouting".into(),
            hook("nat", "prerouting", DSTNAT),
            vec![Rule::always(Stmt::Jump(SERVICES.into()))],
        ),
        (
            "nat-output".into(),
            hook("nat", "output", DSTNAT),
            vec![Rule::always(Stmt::Jump(SERVICES.into()))],
        ),
        (
            "nat-postrouting".into(),
            hook("nat", "postrouting", SRCNAT),
            vec![Rule::always(Stmt::Jump(MASQUERADING.into()))],
        ),
        (SERVICES.into(), None, services),
        (
            MASQUERADING.into(),
            None,
            vec![
                Rule::new(vec![Match::MarkAny(mark)], Stmt::ClearMarkMasquerade(mark)),
                Rule::new(
                    vec![
                        Match::CtStatusDnat,
                        lookup(
                            &[Field::Saddr, Field::Daddr, Field::L4proto, Field::Dport],
                            HAIRPIN,
                            false,
                        ),
                    ],
                    Stmt::Masquerade,
                ),
            ],
        ),
        (
            FIREWALL_CHECK.into(),
            None,
            vec![Rule::new(
                vec![
                    lookup(&DST, FIREWALL_IPS, false),
                    lookup(
                        &[Field::Daddr, Field::L4proto, Field::Dport, Field::Saddr],
                        FIREWALL_ALLOW,
                        true,
                    ),
                ],
                Stmt::Drop,
            )],
        ),
        (
            SERVICE_ENDPOINTS_CHECK.into(),
            None,
            vec![Rule::always(Stmt::Vmap {
                fields: DST.to_vec(),
                map: NO_ENDPOINT_SERVICES.into(),
            })],
        ),
        (
            NODEPORT_ENDPOINTS_CHECK.into(),
            None,
            vec![Rule::new(
                nodeport_dest(cfg),
                Stmt::Vmap {
                    fields: NP.to_vec(),
                    map: NO_ENDPOINT_NODEPORTS.into(),
                },
            )],
        ),
        (
            CLUSTER_IPS_CHECK.into(),
            None,
            // A cluster IP answers only on its Services' ports: anything else is refused
            // rather than left to time out; an address of the service CIDRs that no Service
            // holds is dropped (upstream nftables mode, both).
            vec![
                Rule::new(
                    vec![lookup(&[Field::Daddr], CLUSTER_IPS, false)],
                    Stmt::Goto(REJECT_CHAIN.into()),
                ),
                Rule::new(
                    vec![lookup(&[Field::Daddr], SERVICE_CIDRS, false)],
                    Stmt::Drop,
                ),
            ],
        ),
        (
            REJECT_CHAIN.into(),
            None,
            // TCP gets a reset: ICMP errors are rate-limited per client by the kernel (about
            // one a second), so a client retrying quickly would otherwise see timeouts.
            vec![
                Rule::new(vec![Match::L4proto(Protocol::Tcp)], Stmt::RejectReset),
                Rule::always(Stmt::Reject),
            ],
        ),
    ];
    Fixed { sets, chains }
}

/// Elements of the configured NodePort addresses (the `nodeport-ips` set).
pub fn nodeport_ip_elements(cfg: &RenderConfig) -> Vec<Key> {
    cfg.nodeport_ips
        .iter()
        .flatten()
        .filter(|ip| cfg.family.contains(ip) && !ip.is_loopback())
        .map(|ip| vec![Value::Addr(*ip)])
        .collect()
}

/// Everything one Service owns, for every port it has in this engine's family.
pub fn render_service(state: &State, cfg: &RenderConfig, key: &ServiceKey) -> ServiceObjects {
    let mut out = ServiceObjects::default();
    let node = NodeView {
        name: &cfg.node_name,
        zone: state.node().zone.as_deref(),
    };
    for sp in state.service_ports_of(key) {
        render_port(&mut out, state, cfg, node, &sp);
    }
    out
}

/// Where traffic of one entry goes once policy is decided: an endpoint pool or the Service's
/// affinity chain.
struct Targets<'a> {
    spn: &'a ServicePortName,
    base: String,
    affinity: Option<u32>,
    cluster: &'a [&'a Endpoint],
    local: &'a [&'a Endpoint],
}

impl Targets<'_> {
    fn chain(&self, local: bool) -> String {
        format!("{}{}", if local { "local-" } else { "service-" }, self.base)
    }

    /// The verdict for traffic of `entry` to the (`local` or cluster) endpoint set; adds the
    /// pool elements keyed by `dest` (address . protocol . port, or protocol . port).
    fn goto(&self, out: &mut ServiceObjects, entry: Entry, local: bool, dest: &[Value]) -> String {
        let eps = if local { self.local } else { self.cluster };
        if eps.is_empty() {
            // Nothing to choose from (cannot happen for a set the policy uses, but an empty
            // pool would be `mod 0`).
            return REJECT_CHAIN.into();
        }
        if self.affinity.is_some() {
            return self.chain(local);
        }
        let pool = Pool {
            entry,
            local,
            size: eps.len() as u32,
        };
        for (i, ep) in eps.iter().enumerate() {
            let mut k = dest.to_vec();
            k.push(Value::Int(i as u32));
            out.elements
                .push((SetId::Pool(pool), k, Some(Data::Dnat(ep.ip, ep.port.get()))));
        }
        pool.name()
    }

    /// The affinity chains of one endpoint set: remembered clients first, then a uniform
    /// choice through per-endpoint chains that remember it.
    fn affinity_chains(&self, out: &mut ServiceObjects, local: bool, timeout: u32) {
        let eps = if local { self.local } else { self.cluster };
        let mut rules = Vec::new();
        for ep in eps {
            rules.push(Rule::new(
                vec![lookup(
                    &[Field::Saddr, Field::Const(endpoint_id(self.spn, ep))],
                    AFFINITY,
                    false,
                )],
                Stmt::Goto(format!("endpoint-{}", nft_endpoint_base(self.spn, ep))),
            ));
        }
        let n = eps.len();
        for (i, ep) in eps.iter().enumerate() {
            let target = Stmt::Goto(format!("endpoint-{}", nft_endpoint_base(self.spn, ep)));
            if i + 1 < n {
                rules.push(Rule::new(vec![Match::OneIn((n - i) as u32)], target));
            } else {
                rules.push(Rule::always(target));
            }
        }
        out.chains.insert(self.chain(local), rules);
        for ep in eps {
            let chain = format!("endpoint-{}", nft_endpoint_base(self.spn, ep));
            out.chains.insert(
                chain,
                vec![
                    Rule::always(Stmt::Update {
                        fields: vec![Field::Saddr, Field::Const(endpoint_id(self.spn, ep))],
                        set: AFFINITY.into(),
                        timeout,
                    }),
                    Rule::always(Stmt::Dnat(self.spn.protocol, ep.ip, ep.port.get())),
                ],
            );
        }
    }
}

fn render_port(
    out: &mut ServiceObjects,
    state: &State,
    cfg: &RenderConfig,
    node: NodeView<'_>,
    sp: &ServicePortView<'_>,
) {
    let Some(cluster_ip) = sp.cluster_ip else {
        return;
    };
    let serving = Serving::of(state, sp, node);
    out.counts.add(&serving.counts());
    let svc = sp.service;
    let proto = sp.name.protocol;
    let port = sp.port.port.get();
    let (policies, cat) = (serving.policies, &serving.endpoints);
    let (has_endpoints, has_internal, has_external) = (
        serving.has_any(),
        serving.has_internal(),
        serving.has_external(),
    );
    // No usable endpoint: reject (none at all) or drop (none on this node for a Local policy).
    let refuse = if has_endpoints {
        Data::Drop
    } else {
        Data::Goto(REJECT_CHAIN.into())
    };
    let t = Targets {
        spn: &sp.name,
        base: nft_service_base(&sp.name),
        affinity: svc.session_affinity_timeout,
        cluster: &cat.cluster,
        local: &cat.local,
    };
    let vip = |ip: IpAddr| vec![Value::Addr(ip), Value::Proto(proto), Value::Port(port)];

    // The cluster IP.
    out.element(CLUSTER_IPS, vec![Value::Addr(cluster_ip)], None);
    if has_internal {
        let target = t.goto(out, Entry::Vip, policies.internal_local, &vip(cluster_ip));
        out.element(SERVICE_IPS, vip(cluster_ip), Some(Data::Goto(target)));
    } else {
        out.element(NO_ENDPOINT_SERVICES, vip(cluster_ip), Some(refuse.clone()));
    }

    // External IPs and load-balancer IPs go through the external chain.
    let externals: Vec<IpAddr> = sp
        .external_ips
        .iter()
        .chain(sp.load_balancer_ips.iter())
        .copied()
        .collect();
    let ext_chain = format!("external-{}", t.base);
    let np_chain = format!("nodeport-{}", t.base);
    for ip in &externals {
        if has_endpoints {
            out.element(SERVICE_IPS, vip(*ip), Some(Data::Goto(ext_chain.clone())));
        }
        if !has_external {
            out.element(NO_ENDPOINT_SERVICES, vip(*ip), Some(refuse.clone()));
        }
    }
    let node_port = sp.port.node_port;
    let np_key = vec![Value::Proto(proto), Value::Port(node_port)];
    if node_port != 0 {
        if has_endpoints {
            out.element(
                SERVICE_NODEPORTS,
                np_key.clone(),
                Some(Data::Goto(np_chain.clone())),
            );
        }
        if !has_external {
            out.element(NO_ENDPOINT_NODEPORTS, np_key.clone(), Some(refuse.clone()));
        }
    }

    // loadBalancerSourceRanges: traffic to the LB IP from elsewhere is dropped before DNAT.
    // `firewall-allow` is an interval set: the ranges of one address go in as the fewest
    // prefixes that cover them, since the kernel refuses overlapping elements (`0.0.0.0/0`
    // beside anything, or a LAN range holding the LB address).
    if has_endpoints && !sp.source_ranges.is_empty() {
        let admits_node = sp
            .source_ranges
            .iter()
            .any(|r| cfg.node_ips.iter().any(|ip| r.contains(ip)));
        for ip in &sp.load_balancer_ips {
            out.element(FIREWALL_IPS, vip(*ip), None);
            // A node reaching its own LB IP may see that IP as its source.
            let from_self = admits_node.then(|| Cidr::host(*ip));
            for r in aggregate(sp.source_ranges.iter().copied().chain(from_self)) {
                let mut k = vip(*ip);
                k.push(Value::Cidr(r));
                out.element(FIREWALL_ALLOW, k, None);
            }
        }
    }

    // The external chains: one per way in, since each DNATs through its own pools.
    if has_endpoints && policies.externally_accessible {
        let mut ways: Vec<(String, Entry, Vec<Vec<Value>>)> = Vec::new();
        if !externals.is_empty() {
            ways.push((
                ext_chain.clone(),
                Entry::Vip,
                externals.iter().map(|ip| vip(*ip)).collect(),
            ));
        }
        if node_port != 0 {
            ways.push((np_chain.clone(), Entry::NodePort, vec![np_key.clone()]));
        }
        for (chain, entry, dests) in ways {
            // Pool elements for every destination of this way in (the chain's last rule
            // works for all of them, keyed by the packet's destination).
            let mut to_cluster = String::new();
            let mut to_local = String::new();
            for d in &dests {
                to_cluster = t.goto(out, entry, false, d);
                if policies.external_local && has_external {
                    to_local = t.goto(out, entry, true, d);
                }
            }
            let mut rules = Vec::new();
            if !policies.external_local {
                // Cluster policy may cross nodes: masquerade so replies come back through us.
                rules.push(Rule::always(Stmt::MarkOr(cfg.masquerade_mark)));
                rules.push(Rule::always(Stmt::Goto(to_cluster)));
            } else {
                // Local policy keeps the client address, except for pods and the node itself,
                // which behave as if they went out to a load balancer and came back.
                if let Some(pod) = local_match(&cfg.local, false) {
                    rules.push(Rule::new(vec![pod], Stmt::Goto(to_cluster.clone())));
                }
                let from_node = Match::FibLocal { src: true };
                rules.push(Rule::new(
                    vec![from_node.clone()],
                    Stmt::MarkOr(cfg.masquerade_mark),
                ));
                rules.push(Rule::new(vec![from_node], Stmt::Goto(to_cluster)));
                if has_external {
                    rules.push(Rule::always(Stmt::Goto(to_local)));
                }
            }
            out.chains.insert(chain, rules);
        }
    }

    if let Some(timeout) = t.affinity {
        if !cat.cluster.is_empty() && policies.uses_cluster() {
            t.affinity_chains(out, false, timeout);
        }
        if !cat.local.is_empty() && policies.uses_local() {
            t.affinity_chains(out, true, timeout);
        }
    }

    // Hairpin: an endpoint reaching itself through the Service is masqueraded, or it would
    // answer itself directly.
    for ep in &cat.all_reachable {
        out.element(
            HAIRPIN,
            vec![
                Value::Addr(ep.ip),
                Value::Addr(ep.ip),
                Value::Proto(proto),
                Value::Port(ep.port.get()),
            ],
            None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{
        cfg, chain, elements, elements_of, key, rules, spn, state, svc, Harness, Svc, NODE,
    };
    use super::*;
    use crate::model::IpFamily::{V4, V6};
    use crate::naming::{endpoint_id, nft_endpoint_base};

    /// What `ns/a` renders to.
    fn render_a(family: IpFamily, s: Svc) -> ServiceObjects {
        let st = state(family, &[s]);
        render_service(&st, &cfg(family), &key("a"))
    }

    /// The source-range elements of the LB address 203.0.113.20 for these ranges; also
    /// checks that a table takes them (the kernel refuses overlapping intervals).
    fn allowed(ranges: &[&str]) -> Vec<String> {
        let s = || {
            svc("a", "172.30.0.1")
                .load_balancer(&["203.0.113.20"], ranges)
                .eps(&["10.1.0.1"])
        };
        let mut h = Harness::new(V4);
        h.full(super::super::testutil::changes(&[s()]));
        let o = render_a(V4, s());
        let prefix = "203.0.113.20 . tcp . 80 . ";
        elements_of(&o, V4, FIREWALL_ALLOW)
            .iter()
            .map(|e| {
                e.strip_prefix(prefix)
                    .expect("keyed by the LB address")
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn a_cluster_ip_goes_straight_to_the_pool_of_its_endpoint_count() {
        let o = render_a(V4, svc("a", "172.30.0.1").eps(&["10.1.0.1", "10.1.0.2"]));
        assert_eq!(
            elements(&o, V4),
            [
                "cluster-ips: 172.30.0.1",
                "endpoints-2: 172.30.0.1 . tcp . 80 . 0 : 10.1.0.1 . 8080",
                "endpoints-2: 172.30.0.1 . tcp . 80 . 1 : 10.1.0.2 . 8080",
                "hairpin-connections: 10.1.0.1 . 10.1.0.1 . tcp . 8080",
                "hairpin-connections: 10.1.0.2 . 10.1.0.2 . tcp . 8080",
                "service-ips: 172.30.0.1 . tcp . 80 : goto endpoints-2",
            ]
        );
        // No chain of its own.
        assert!(o.chains.is_empty());
        assert_eq!((o.counts.service_ports, o.counts.endpoints), (1, 2));
    }

    #[test]
    fn a_udp_port_is_keyed_by_udp() {
        let o = render_a(
            V4,
            svc("a", "172.30.0.1").protocol("UDP").eps(&["10.1.0.1"]),
        );
        assert_eq!(
            elements_of(&o, V4, SERVICE_IPS),
            ["172.30.0.1 . udp . 80 : goto endpoints-1"]
        );
    }

    #[test]
    fn a_service_without_endpoints_is_rejected_at_every_address() {
        let o = render_a(
            V4,
            svc("a", "172.30.0.1")
                .node_port(30080)
                .external_ips(&["203.0.113.9"]),
        );
        assert_eq!(
            elements(&o, V4),
            [
                "cluster-ips: 172.30.0.1",
                "no-endpoint-nodeports: tcp . 30080 : goto reject-chain",
                "no-endpoint-services: 172.30.0.1 . tcp . 80 : goto reject-chain",
                "no-endpoint-services: 203.0.113.9 . tcp . 80 : goto reject-chain",
            ]
        );
        assert!(o.chains.is_empty());
    }

    #[test]
    fn a_nodeport_masquerades_then_uses_the_nodeport_pool() {
        let o = render_a(
            V4,
            svc("a", "172.30.0.1").node_port(30080).eps(&["10.1.0.1"]),
        );
        let np = chain("nodeport", "a");
        assert_eq!(
            elements_of(&o, V4, SERVICE_NODEPORTS),
            [format!("tcp . 30080 : goto {np}")]
        );
        assert_eq!(
            elements_of(&o, V4, "nodeport-endpoints-1"),
            ["tcp . 30080 . 0 : 10.1.0.1 . 8080"]
        );
        assert_eq!(
            rules(&o, V4, &np),
            [
                "meta mark set meta mark | 0x00004000",
                "goto nodeport-endpoints-1"
            ]
        );
    }

    #[test]
    fn a_load_balancer_goes_through_its_external_chain_and_the_firewall() {
        let o = render_a(
            V4,
            svc("a", "172.30.0.1")
                .load_balancer(&["203.0.113.20"], &["198.51.100.0/24"])
                .eps(&["10.1.0.1"]),
        );
        let ext = chain("external", "a");
        assert_eq!(
            elements_of(&o, V4, SERVICE_IPS),
            [
                "172.30.0.1 . tcp . 80 : goto endpoints-1".to_owned(),
                format!("203.0.113.20 . tcp . 80 : goto {ext}"),
            ]
        );
        assert_eq!(
            elements_of(&o, V4, "endpoints-1"),
            [
                "172.30.0.1 . tcp . 80 . 0 : 10.1.0.1 . 8080",
                "203.0.113.20 . tcp . 80 . 0 : 10.1.0.1 . 8080",
            ]
        );
        assert_eq!(
            elements_of(&o, V4, FIREWALL_IPS),
            ["203.0.113.20 . tcp . 80"]
        );
        assert_eq!(
            elements_of(&o, V4, FIREWALL_ALLOW),
            ["203.0.113.20 . tcp . 80 . 198.51.100.0/24"]
        );
        assert_eq!(
            rules(&o, V4, &ext),
            ["meta mark set meta mark | 0x00004000", "goto endpoints-1"]
        );
    }

    #[test]
    fn source_ranges_with_everything_are_one_interval() {
        assert_eq!(allowed(&["0.0.0.0/0", "198.51.100.0/24"]), ["0.0.0.0/0"]);
        assert_eq!(allowed(&["198.51.100.0/24", "0.0.0.0/0"]), ["0.0.0.0/0"]);
    }

    #[test]
    fn overlapping_source_ranges_become_the_fewest_disjoint_prefixes() {
        // 10.1/16 inside 10/8; 192.168.0/24 inside 192.168.0/23, which holds the node's
        // address, so the node may reach the LB from the LB address itself.
        assert_eq!(
            allowed(&[
                "10.0.0.0/8",
                "10.1.0.0/16",
                "192.168.0.0/24",
                "192.168.0.0/23"
            ]),
            ["10.0.0.0/8", "192.168.0.0/23", "203.0.113.20/32"]
        );
        // A range holding the LB address already covers the node's way in.
        assert_eq!(
            allowed(&["203.0.113.0/24", "192.168.0.2/32"]),
            ["192.168.0.2/32", "203.0.113.0/24"]
        );
        // Adjacent halves are joined; duplicates go.
        assert_eq!(
            allowed(&["198.51.100.0/25", "198.51.100.128/25", "198.51.100.0/25"]),
            ["198.51.100.0/24"]
        );
    }

    #[test]
    fn changing_source_ranges_never_gives_the_kernel_overlapping_intervals() {
        let lb = |ranges: &[&str]| {
            super::super::testutil::changes(&[svc("a", "172.30.0.1")
                .load_balancer(&["203.0.113.20"], ranges)
                .eps(&["10.1.0.1"])])
        };
        let mut h = Harness::new(V4);
        h.full(lb(&["198.51.100.0/24"]));
        // Each step is applied to a Fake that refuses overlaps with "File exists".
        for ranges in [
            &["0.0.0.0/0"][..],
            &["198.51.100.0/24", "198.51.100.7/32"],
            &["10.0.0.0/8", "0.0.0.0/0"],
            &["10.0.0.0/8", "10.1.0.0/16"],
            &["10.1.0.0/16"],
        ] {
            h.partial(lb(ranges));
            h.assert_in_step();
        }
    }

    #[test]
    fn local_traffic_policy_keeps_the_client_address() {
        let o = render_a(
            V4,
            svc("a", "172.30.0.1")
                .load_balancer(&["203.0.113.20"], &[])
                .node_port(30080)
                .external_local()
                .eps_on(&[("10.1.0.1", NODE), ("10.1.0.2", "node-b")]),
        );
        // Pods and the node itself use every endpoint (masqueraded from the node); anyone
        // else only this node's.
        assert_eq!(
            rules(&o, V4, &chain("external", "a")),
            [
                "ip saddr 10.0.0.0/8 goto endpoints-2",
                "fib saddr type local meta mark set meta mark | 0x00004000",
                "fib saddr type local goto endpoints-2",
                "goto local-endpoints-1",
            ]
        );
        assert_eq!(
            rules(&o, V4, &chain("nodeport", "a")),
            [
                "ip saddr 10.0.0.0/8 goto nodeport-endpoints-2",
                "fib saddr type local meta mark set meta mark | 0x00004000",
                "fib saddr type local goto nodeport-endpoints-2",
                "goto nodeport-local-endpoints-1",
            ]
        );
        assert_eq!(
            elements_of(&o, V4, "local-endpoints-1"),
            ["203.0.113.20 . tcp . 80 . 0 : 10.1.0.1 . 8080"]
        );
        assert_eq!(
            elements_of(&o, V4, "nodeport-local-endpoints-1"),
            ["tcp . 30080 . 0 : 10.1.0.1 . 8080"]
        );
        // The cluster IP is not external: it uses every endpoint.
        assert_eq!(
            elements_of(&o, V4, SERVICE_IPS)[0],
            "172.30.0.1 . tcp . 80 : goto endpoints-2"
        );
    }

    #[test]
    fn local_traffic_policy_without_a_local_endpoint_drops_outside_traffic() {
        let o = render_a(
            V4,
            svc("a", "172.30.0.1")
                .load_balancer(&["203.0.113.20"], &[])
                .node_port(30080)
                .external_local()
                .eps_on(&[("10.1.0.2", "node-b")]),
        );
        assert_eq!(
            elements_of(&o, V4, NO_ENDPOINT_SERVICES),
            ["203.0.113.20 . tcp . 80 : drop"]
        );
        assert_eq!(
            elements_of(&o, V4, NO_ENDPOINT_NODEPORTS),
            ["tcp . 30080 : drop"]
        );
        // Pods and the node still reach the remote endpoint; there is no local pool.
        assert_eq!(
            rules(&o, V4, &chain("external", "a")),
            [
                "ip saddr 10.0.0.0/8 goto endpoints-1",
                "fib saddr type local meta mark set meta mark | 0x00004000",
                "fib saddr type local goto endpoints-1",
            ]
        );
        assert!(o
            .elements
            .iter()
            .all(|(s, _, _)| !s.name().contains("local-")));
        assert_eq!(o.counts.no_local_external, 1);
    }

    #[test]
    fn session_affinity_remembers_the_endpoint_per_client() {
        let o = render_a(
            V4,
            svc("a", "172.30.0.1")
                .affinity(300)
                .eps(&["10.1.0.1", "10.1.0.2"]),
        );
        let svc_chain = chain("service", "a");
        assert_eq!(
            elements_of(&o, V4, SERVICE_IPS),
            [format!("172.30.0.1 . tcp . 80 : goto {svc_chain}")]
        );
        // No pool: the choice goes through per-endpoint chains that record it.
        assert!(o
            .elements
            .iter()
            .all(|(s, _, _)| matches!(s, SetId::Fixed(_))));
        let eps: Vec<Endpoint> = ["10.1.0.1", "10.1.0.2"]
            .iter()
            .map(|ip| {
                serde_json::from_str(&format!(
                    r#"{{"ip":"{ip}","port":8080,"ready":true,"serving":true,"terminating":false}}"#
                ))
                .unwrap()
            })
            .collect();
        let p = spn("a");
        let (c1, c2) = (
            format!("endpoint-{}", nft_endpoint_base(&p, &eps[0])),
            format!("endpoint-{}", nft_endpoint_base(&p, &eps[1])),
        );
        let (id1, id2) = (endpoint_id(&p, &eps[0]), endpoint_id(&p, &eps[1]));
        assert_eq!(
            rules(&o, V4, &svc_chain),
            [
                format!("ip saddr . numgen inc mod 1 offset {id1} @affinity goto {c1}"),
                format!("ip saddr . numgen inc mod 1 offset {id2} @affinity goto {c2}"),
                format!("numgen random mod 2 0 goto {c1}"),
                format!("goto {c2}"),
            ]
        );
        assert_eq!(
            rules(&o, V4, &c1),
            [
                format!(
                    "update @affinity {{ ip saddr . numgen inc mod 1 offset {id1} timeout 300s }}"
                ),
                "meta l4proto tcp dnat to 10.1.0.1:8080".to_owned(),
            ]
        );
        assert_eq!(o.chains.len(), 3);
    }

    #[test]
    fn ipv6_services_use_ip6_addresses_and_bracketed_targets() {
        let o = render_a(
            V6,
            svc("a", "fd00:30::1")
                .node_port(30080)
                .eps(&["fd00:10::5", "fd00:10::6"]),
        );
        assert_eq!(
            elements_of(&o, V6, "endpoints-2"),
            [
                "fd00:30::1 . tcp . 80 . 0 : fd00:10::5 . 8080",
                "fd00:30::1 . tcp . 80 . 1 : fd00:10::6 . 8080",
            ]
        );
        assert_eq!(elements_of(&o, V6, CLUSTER_IPS), ["fd00:30::1"]);
        let o = render_a(V6, svc("a", "fd00:30::1").affinity(60).eps(&["fd00:10::5"]));
        let ep = o
            .chains
            .keys()
            .find(|c| c.starts_with("endpoint-"))
            .expect("an endpoint chain")
            .clone();
        let r = rules(&o, V6, &ep);
        assert!(r[0].starts_with("update @affinity { ip6 saddr . numgen inc mod 1 offset "));
        assert_eq!(r[1], "meta l4proto tcp dnat to [fd00:10::5]:8080");
    }

    #[test]
    fn another_familys_addresses_are_left_out() {
        let st = state(V6, &[svc("a", "172.30.0.1").eps(&["10.1.0.1"])]);
        assert_eq!(
            render_service(&st, &cfg(V6), &key("a")),
            ServiceObjects::default()
        );
    }

    #[test]
    fn pool_names_round_trip() {
        for entry in [Entry::Vip, Entry::NodePort] {
            for local in [false, true] {
                let p = Pool {
                    entry,
                    local,
                    size: 17,
                };
                assert_eq!(Pool::parse(&p.name()), Some(p));
            }
        }
        for bad in [
            "endpoints-0",
            "endpoints-x",
            "endpoints-01",
            "local-nodeport-endpoints-3",
            "service-1",
        ] {
            assert_eq!(Pool::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_pool_chain_dnats_every_protocol_through_its_map() {
        let mut text = Vec::new();
        for p in [
            Pool {
                entry: Entry::Vip,
                local: false,
                size: 3,
            },
            Pool {
                entry: Entry::NodePort,
                local: true,
                size: 1,
            },
        ] {
            for r in p.rules() {
                let mut s = String::new();
                super::super::ast::Fmt(V4).rule(&r, &mut s);
                text.push(s);
            }
        }
        assert_eq!(
            text,
            [
                "meta l4proto tcp dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 3 map @endpoints-3",
                "meta l4proto udp dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 3 map @endpoints-3",
                "meta l4proto sctp dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 3 map @endpoints-3",
                "meta l4proto tcp dnat ip to meta l4proto . th dport . numgen random mod 1 map @nodeport-local-endpoints-1",
                "meta l4proto udp dnat ip to meta l4proto . th dport . numgen random mod 1 map @nodeport-local-endpoints-1",
                "meta l4proto sctp dnat ip to meta l4proto . th dport . numgen random mod 1 map @nodeport-local-endpoints-1",
            ]
        );
    }

    #[test]
    fn the_fixed_table_follows_the_config() {
        let services = |c: &RenderConfig| {
            let f = fixed(c);
            let (_, _, rules) = f.chains.iter().find(|(n, _, _)| n == SERVICES).unwrap();
            rules
                .iter()
                .map(|r| {
                    let mut s = String::new();
                    super::super::ast::Fmt(c.family).rule(r, &mut s);
                    s
                })
                .collect::<Vec<_>>()
        };
        let mut c = cfg(V4);
        assert_eq!(
            services(&c),
            [
                "ip daddr @cluster-ips ip saddr != 10.0.0.0/8 meta mark set meta mark | 0x00004000",
                "ip daddr . meta l4proto . th dport vmap @service-ips",
                "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports",
            ]
        );
        assert!(fixed(&c).sets.iter().all(|s| s.name != NODEPORT_IPS));
        c.masquerade_all = true;
        c.nodeport_ips = Some(vec!["192.168.0.2".parse().unwrap(), "::1".parse().unwrap()]);
        assert_eq!(
            services(&c),
            [
                "ip daddr @cluster-ips meta mark set meta mark | 0x00004000",
                "ip daddr . meta l4proto . th dport vmap @service-ips",
                "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
            ]
        );
        assert!(fixed(&c).sets.iter().any(|s| s.name == NODEPORT_IPS));
        // Only this family's addresses.
        assert_eq!(
            nodeport_ip_elements(&c),
            [vec![Value::Addr("192.168.0.2".parse().unwrap())]]
        );
    }
}
