//! Small inputs for the nftables unit tests, so that each test is a few lines: a render
//! config, Services built up field by field, the change sets and states they make, and a
//! [`Harness`] that drives a [`Writer`] against a [`Fake`] the way the program does.
//!
//! The address plan is upstream's: pods in 10.0.0.0/8 (fd00:10::/64), the node at
//! 192.168.0.2, Services in 172.30.0.0/16, external clients in 203.0.113.0/24.

use super::ast::{Fmt, Op};
use super::backend::{Backend, Fake};
use super::render::{self, ServiceObjects};
use super::writer::{Plan, Writer};
use crate::config::{LocalDetector, RenderConfig};
use crate::model::{ChangeSet, IpFamily, Name, Protocol, ServiceKey, ServicePortName};
use crate::state::State;
use serde_json::{json, Value as J};
use std::collections::{BTreeMap, BTreeSet};

pub const NODE: &str = "node-a";

/// The config the tests render with: pods detected by CIDR, mark 0x4000, NodePorts on every
/// local address.
pub fn cfg(family: IpFamily) -> RenderConfig {
    let (pods, node_ip) = match family {
        IpFamily::V4 => ("10.0.0.0/8", "192.168.0.2"),
        IpFamily::V6 => ("fd00:10::/64", "fd00:192::2"),
    };
    RenderConfig {
        family,
        node_name: NODE.into(),
        local: LocalDetector::Cidr(pods.parse().expect("a CIDR")),
        masquerade_all: false,
        masquerade_mark: 0x4000,
        nodeport_ips: None,
        conntrack_tcp_be_liberal: false,
        node_ips: vec![node_ip.parse().expect("an address")],
        localhost_nodeports: false,
        nfacct: Vec::new(),
    }
}

/// Port `p` (TCP) of `ns/<name>`.
pub fn spn(name: &str) -> ServicePortName {
    ServicePortName {
        service: key(name),
        port: Name::new("p").expect("a DNS label"),
        protocol: Protocol::Tcp,
    }
}

/// `<prefix>-<hash>-ns/<name>/tcp/p`: the name of a chain of port `p` of `ns/<name>`.
pub fn chain(prefix: &str, name: &str) -> String {
    format!("{prefix}-{}", crate::naming::nft_service_base(&spn(name)))
}

/// A small cluster of every kind of Service, in one family: the fixtures in `testdata/`
/// are this, rendered and listed back by the kernel.
pub fn cluster(family: IpFamily) -> Vec<Svc> {
    match family {
        IpFamily::V4 => vec![
            svc("web", "172.30.0.1").eps(&["10.1.0.1", "10.1.0.2"]),
            svc("dns", "172.30.0.10").protocol("UDP").eps(&["10.1.0.3"]),
            svc("empty", "172.30.0.11").node_port(30011),
            svc("np", "172.30.0.2").node_port(30080).eps(&["10.1.0.4"]),
            svc("lb", "172.30.0.3")
                .node_port(30081)
                .load_balancer(&["203.0.113.20"], &["0.0.0.0/0", "198.51.100.0/24"])
                .eps(&["10.1.0.5"]),
            svc("local", "172.30.0.4")
                .load_balancer(&["203.0.113.21"], &["10.0.0.0/8", "192.168.0.0/16"])
                .external_local()
                .eps_on(&[("10.1.0.6", NODE), ("10.1.0.7", "node-b")]),
            svc("sticky", "172.30.0.5")
                .affinity(300)
                .eps(&["10.1.0.8", "10.1.0.9"]),
        ],
        IpFamily::V6 => vec![
            svc("web", "fd00:30::1").eps(&["fd00:10::1", "fd00:10::2"]),
            svc("lb", "fd00:30::3")
                .node_port(30081)
                .load_balancer(&["2001:db8::20"], &["::/0", "2001:db8:1::/48"])
                .external_local()
                .eps(&["fd00:10::5"]),
            svc("sticky", "fd00:30::5")
                .affinity(60)
                .eps(&["fd00:10::8"]),
        ],
    }
}

/// `ns/<name>`.
pub fn key(name: &str) -> ServiceKey {
    ServiceKey {
        namespace: Name::new("ns").expect("a DNS label"),
        name: Name::new(name).expect("a DNS label"),
    }
}

/// A Service `ns/<name>` with one port `p` (TCP 80 unless changed) and its endpoints, as the
/// change-set JSON the Python side sends.
#[derive(Clone, Debug)]
pub struct Svc {
    name: String,
    spec: serde_json::Map<String, J>,
    port: serde_json::Map<String, J>,
    endpoints: Vec<J>,
}

pub fn svc(name: &str, cluster_ip: &str) -> Svc {
    let spec = json!({ "cluster_ips": [cluster_ip] });
    let port = json!({ "name": "p", "protocol": "TCP", "port": 80 });
    Svc {
        name: name.into(),
        spec: spec.as_object().expect("an object").clone(),
        port: port.as_object().expect("an object").clone(),
        endpoints: Vec::new(),
    }
}

impl Svc {
    fn set(mut self, field: &str, v: J) -> Svc {
        self.spec.insert(field.into(), v);
        self
    }

    pub fn protocol(mut self, p: &str) -> Svc {
        self.port.insert("protocol".into(), json!(p));
        self
    }

    pub fn node_port(mut self, port: u16) -> Svc {
        self.port.insert("node_port".into(), json!(port));
        self.set("externally_accessible", json!(true))
    }

    pub fn external_ips(self, ips: &[&str]) -> Svc {
        self.set("external_ips", json!(ips))
            .set("externally_accessible", json!(true))
    }

    /// A LoadBalancer's ingress addresses and its `loadBalancerSourceRanges`.
    pub fn load_balancer(self, ips: &[&str], source_ranges: &[&str]) -> Svc {
        self.set("load_balancer_ips", json!(ips))
            .set("load_balancer_source_ranges", json!(source_ranges))
            .set("externally_accessible", json!(true))
    }

    /// `externalTrafficPolicy: Local`.
    pub fn external_local(self) -> Svc {
        self.set("external_traffic_policy", json!("Local"))
    }

    /// `sessionAffinity: ClientIP` with this timeout.
    pub fn affinity(self, seconds: u32) -> Svc {
        self.set("session_affinity_timeout", json!(seconds))
    }

    /// Ready endpoints on port 8080 on `NODE`.
    pub fn eps(self, ips: &[&str]) -> Svc {
        let on: Vec<(&str, &str)> = ips.iter().map(|ip| (*ip, NODE)).collect();
        self.eps_on(&on)
    }

    /// Ready endpoints on port 8080, each on the named node.
    pub fn eps_on(mut self, eps: &[(&str, &str)]) -> Svc {
        self.endpoints = eps
            .iter()
            .map(|(ip, node)| {
                json!({"ip": ip, "port": 8080, "ready": true, "serving": true,
                       "terminating": false, "node_name": node})
            })
            .collect();
        self
    }

    fn service_json(&self) -> J {
        let mut spec = self.spec.clone();
        spec.insert("ports".into(), json!([self.port]));
        json!({ "namespace": "ns", "name": self.name, "service": spec })
    }

    fn endpoints_json(&self) -> J {
        let ports = if self.endpoints.is_empty() {
            json!([])
        } else {
            json!([{ "name": "p", "protocol": self.port["protocol"], "endpoints": self.endpoints }])
        };
        json!({ "namespace": "ns", "name": self.name, "ports": ports })
    }
}

fn change_set(v: J) -> ChangeSet {
    ChangeSet::from_json(v.to_string().as_bytes()).expect("a valid change set")
}

/// A change set that adds (or replaces) these Services and their endpoints.
pub fn changes(svcs: &[Svc]) -> ChangeSet {
    change_set(json!({
        "services": svcs.iter().map(Svc::service_json).collect::<Vec<_>>(),
        "endpoints": svcs.iter().map(Svc::endpoints_json).collect::<Vec<_>>(),
    }))
}

/// A change set that deletes `ns/<name>` and its endpoints.
pub fn deletion(name: &str) -> ChangeSet {
    change_set(json!({
        "services": [{ "namespace": "ns", "name": name, "service": null }],
        "endpoints": [{ "namespace": "ns", "name": name, "ports": [] }],
    }))
}

pub fn state(family: IpFamily, svcs: &[Svc]) -> State {
    let mut st = State::new(family);
    st.apply(changes(svcs));
    st
}

/// One Service's elements as `set: key [: data]` lines, sorted.
pub fn elements(o: &ServiceObjects, family: IpFamily) -> Vec<String> {
    let f = Fmt(family);
    let mut out: Vec<String> = o
        .elements
        .iter()
        .map(|(set, k, d)| {
            let mut s = format!("{}: ", set.name());
            f.key(k, &mut s);
            if let Some(d) = d {
                s.push_str(" : ");
                f.data(d, &mut s);
            }
            s
        })
        .collect();
    out.sort();
    out
}

/// The elements of one set, as `key [: data]` text.
pub fn elements_of(o: &ServiceObjects, family: IpFamily, set: &str) -> Vec<String> {
    let prefix = format!("{set}: ");
    elements(o, family)
        .iter()
        .filter_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
        .collect()
}

/// One chain's rules as nft text.
pub fn rules(o: &ServiceObjects, family: IpFamily, chain: &str) -> Vec<String> {
    let f = Fmt(family);
    o.chains
        .get(chain)
        .unwrap_or_else(|| panic!("no chain {chain} in {:?}", o.chains.keys()))
        .iter()
        .map(|r| {
            let mut s = String::new();
            f.rule(r, &mut s);
            s
        })
        .collect()
}

/// A transaction's lines that start with `prefix` (`"add element"`, `"delete chain"`...).
pub fn lines(family: IpFamily, ops: &[Op], prefix: &str) -> Vec<String> {
    Fmt(family)
        .script(ops)
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

/// A writer driven as [`super::program::NftablesProgram`] drives it, applying every plan to
/// a [`Fake`] (which refuses what the kernel would).
pub struct Harness {
    pub family: IpFamily,
    pub cfg: RenderConfig,
    pub state: State,
    pub writer: Writer,
    pub fake: Fake,
}

impl Harness {
    pub fn new(family: IpFamily) -> Harness {
        Harness {
            family,
            cfg: cfg(family),
            state: State::new(family),
            writer: Writer::default(),
            fake: Fake::new(family),
        }
    }

    /// Apply `cs` to the state and write everything.
    pub fn full(&mut self, cs: ChangeSet) -> Plan {
        self.state.apply(cs);
        let plan = self.writer.full(&self.state, &self.cfg, &[]);
        self.fake.apply(&plan.ops).expect("the full sync applies");
        plan
    }

    /// Apply `cs` to the state and write only what it changed (and the cleanup).
    pub fn partial(&mut self, cs: ChangeSet) -> Plan {
        let mut before: BTreeMap<ServiceKey, ServiceObjects> = self
            .state
            .affected(&cs)
            .into_iter()
            .filter(|k| self.state.has_service(k))
            .map(|k| {
                let objects = render::render_service(&self.state, &self.cfg, &k);
                (k, objects)
            })
            .collect();
        let changed: BTreeSet<ServiceKey> = self.state.apply(cs).services;
        let plan = self
            .writer
            .partial(&self.state, &self.cfg, &changed, &mut before);
        self.fake
            .apply(&plan.ops)
            .expect("the partial sync applies");
        if !plan.cleanup.is_empty() {
            self.fake.apply(&plan.cleanup).expect("the cleanup applies");
            self.writer.cleaned();
        }
        plan
    }

    /// Panics unless the writer's bookkeeping and the Fake's table are what a fresh full sync
    /// of the same state gives.
    pub fn assert_in_step(&self) {
        let mut fresh = Writer::default();
        let plan = fresh.full(&self.state, &self.cfg, &[]);
        let mut kernel = Fake::new(self.family);
        kernel.apply(&plan.ops).expect("the full sync applies");
        assert_eq!(
            self.fake.model.listing(self.family),
            kernel.model.listing(self.family),
            "the table"
        );
        let w = &self.writer;
        assert_eq!(w.conflicts(), fresh.conflicts(), "conflicts");
        assert_eq!(w.element_total(), fresh.element_total(), "element_total");
        assert_eq!(w.pool_count(), fresh.pool_count(), "pool_count");
        assert_eq!(w.totals(), fresh.totals(), "totals");
    }
}
