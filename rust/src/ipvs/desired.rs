//! The IPVS table the Services and endpoints call for, as upstream's ipvs proxier builds it.
//!
//! Per Service port: a virtual server on the ClusterIP (internal traffic policy), on each
//! external IP and load-balancer IP (external policy), and on `<node IP>:<nodePort>` for
//! every node address NodePorts are served on (external policy). Every real server has
//! weight 1 and is masqueraded. ClientIP affinity is IPVS persistence with the Service's
//! timeout. Under a Local policy with no endpoint on this node, upstream's ipvs mode falls
//! back to the cluster's endpoints (kubernetes PR 97081: pods on this node can still reach
//! the Service); so does this.

use super::ipset::{ip_port, Set, Sets};
use super::{Dest, DestKey, Service, Table, Virtual, VirtualKey, F_PERSISTENT, F_SCHED2};
use crate::model::{Endpoint, IpvsScheduler, Protocol, ServiceKey};
use crate::state::State;
use crate::topology::{NodeView, Serving};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// Everything the ipvs mode programs for a state.
#[derive(Debug, Default)]
pub struct Wanted {
    pub table: Table,
    /// The Service port each virtual server serves (for messages).
    pub names: BTreeMap<VirtualKey, String>,
    /// The companion rules' ipset members.
    pub sets: Sets,
    /// The addresses kube-ipvs0 must hold: every ClusterIP, and the externalIPs and LB IPs
    /// that are not the node's own.
    pub bind: BTreeSet<IpAddr>,
    /// Upstream's KUBE-IPVS-OUT-FILTER rules: the node may not reach a load balancer whose
    /// source ranges leave it out (IPVS would see the LB address as the source).
    pub out_filter: BTreeSet<String>,
}

/// Where the node is.
pub struct Node<'a> {
    pub name: &'a str,
    /// The addresses NodePorts are served on (this family's).
    pub nodeport_ips: &'a [IpAddr],
    /// The node's own addresses (never bound on kube-ipvs0).
    pub own_ips: &'a [IpAddr],
}

pub fn table(state: &State, node: &Node, scheduler: IpvsScheduler) -> Wanted {
    let mut out = Wanted::default();
    for sp in state.service_ports() {
        add_port(state, &sp, node, scheduler, &mut out);
    }
    let ipvs_ips = out.sets.entry(Set::IpvsIps).or_default();
    ipvs_ips.extend(out.bind.iter().map(IpAddr::to_string));
    out
}

/// One Service's share of [`table`] (its KUBE-IPVS-IPS members left out: those follow the
/// merged addresses).
pub fn part(state: &State, key: &ServiceKey, node: &Node, scheduler: IpvsScheduler) -> Wanted {
    let mut out = Wanted::default();
    for sp in state.service_ports_of(key) {
        add_port(state, &sp, node, scheduler, &mut out);
    }
    out
}

fn add_port(
    state: &State,
    sp: &crate::state::ServicePortView<'_>,
    node: &Node,
    scheduler: IpvsScheduler,
    out: &mut Wanted,
) {
    let view = NodeView {
        name: node.name,
        zone: state.node().zone.as_deref(),
    };
    let svc = sp.service;
    let serving = Serving::of(state, sp, view);
    let policies = serving.policies;
    let pick = |local: bool| serving.with_cluster_fallback(local);
    let scheduler = svc.ipvs_scheduler.unwrap_or(scheduler);
    let service = Service {
        scheduler: scheduler.name().to_owned(),
        flags: svc.session_affinity_timeout.map_or(0, |_| F_PERSISTENT)
            | if scheduler == IpvsScheduler::Mh {
                F_SCHED2
            } else {
                0
            },
        timeout: svc.session_affinity_timeout.unwrap_or(0),
    };
    let virtual_ = |eps: &[&Endpoint]| Virtual {
        service: service.clone(),
        dests: eps
            .iter()
            .map(|e| {
                let d = DestKey {
                    addr: e.ip,
                    port: e.port.get(),
                };
                (d, Dest::weighted(1))
            })
            .collect(),
    };
    let protocol = sp.name.protocol;
    let port = sp.port.port.get();
    let mut add = |addr: IpAddr, port: u16, eps: &[&Endpoint]| {
        let k = VirtualKey {
            addr,
            protocol,
            port,
        };
        out.table.insert(k, virtual_(eps));
        out.names.insert(k, sp.name.to_string());
    };
    if let Some(ip) = sp.cluster_ip {
        add(ip, port, pick(policies.internal_local));
    }
    for ip in sp.external_ips.iter().chain(&sp.load_balancer_ips) {
        add(*ip, port, pick(policies.external_local));
    }
    if sp.port.node_port != 0 {
        for ip in node.nodeport_ips {
            add(*ip, sp.port.node_port, pick(policies.external_local));
        }
    }
    let mut sets = std::mem::take(&mut out.sets);
    companions(sp, &serving.all, node, &mut sets, out);
    out.sets = sets;
}

/// One Service port's ipset members, kube-ipvs0 addresses and out-filter rules.
fn companions(
    sp: &crate::state::ServicePortView<'_>,
    endpoints: &[&Endpoint],
    node: &Node,
    sets: &mut Sets,
    out: &mut Wanted,
) {
    let mut put = |s: Set, m: String| {
        sets.entry(s).or_default().insert(m);
    };
    let protocol = sp.name.protocol;
    let port = sp.port.port.get();
    let ext_local = sp.service.external_policy_local();
    // A pod reaching itself through the Service is masqueraded (hairpin).
    for e in endpoints {
        if e.node_name.as_deref() == Some(node.name) {
            let ep = ip_port(e.ip, protocol, e.port.get());
            put(Set::LoopBack, format!("{ep},{}", e.ip));
        }
    }
    if let Some(ip) = sp.cluster_ip {
        put(Set::ClusterIp, ip_port(ip, protocol, port));
        out.bind.insert(ip);
    }
    for ip in &sp.external_ips {
        let set = if ext_local {
            Set::ExternalIpLocal
        } else {
            Set::ExternalIp
        };
        put(set, ip_port(*ip, protocol, port));
    }
    for ip in &sp.load_balancer_ips {
        let m = ip_port(*ip, protocol, port);
        put(Set::LoadBalancer, m.clone());
        if ext_local {
            put(Set::LoadBalancerLocal, m.clone());
        }
        if sp.source_ranges.is_empty() {
            continue;
        }
        put(Set::LoadBalancerFw, m.clone());
        for c in &sp.source_ranges {
            // ipset spells a host network as the bare address; so do we, to compare equal.
            let host = c.prefix() == if c.addr().is_ipv6() { 128 } else { 32 };
            let net = if host {
                c.addr().to_string()
            } else {
                c.to_string()
            };
            put(Set::LoadBalancerSourceCidr, format!("{m},{net}"));
        }
        let from_node = sp
            .source_ranges
            .iter()
            .any(|c| node.own_ips.iter().any(|ip| c.contains(ip)));
        if from_node {
            put(Set::LoadBalancerSourceIp, format!("{m},{ip}"));
        } else {
            out.out_filter.insert(format!(
                "-s {ip} -m ipvs --vaddr {ip} --vproto {} --vport {port} -j DROP",
                protocol.lower()
            ));
        }
    }
    for ip in sp.external_ips.iter().chain(&sp.load_balancer_ips) {
        if !node.own_ips.contains(ip) {
            out.bind.insert(*ip);
        }
    }
    let node_port = sp.port.node_port;
    if node_port != 0 && !node.nodeport_ips.is_empty() {
        let (all, local) = Set::node_port(protocol);
        let members: Vec<String> = if protocol == Protocol::Sctp {
            // SCTP NodePorts are hash:ip,port sets (per node address), as upstream.
            node.nodeport_ips
                .iter()
                .map(|ip| ip_port(*ip, protocol, node_port))
                .collect()
        } else {
            vec![node_port.to_string()]
        };
        for m in members {
            if ext_local {
                put(local, m.clone());
            }
            put(all, m);
        }
    }
    if sp.service.health_check_node_port != 0 {
        put(
            Set::HealthCheckNodePort,
            sp.service.health_check_node_port.to_string(),
        );
    }
}

/// The table as text, one virtual server per line with its real servers; what `kproxy
/// render` prints in the ipvs mode.
pub fn describe(t: &Table) -> String {
    let mut out = String::new();
    for (k, v) in t {
        let dests: Vec<String> = v.dests.keys().map(|d| d.to_string()).collect();
        let dests = if dests.is_empty() {
            "(no real servers: refused)".to_owned()
        } else {
            dests.join(" ")
        };
        let persist = if v.service.flags & F_PERSISTENT != 0 {
            format!(" persistent {}s", v.service.timeout)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "{k} {}{persist} -> {dests}\n",
            v.service.scheduler
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ChangeSet, IpFamily, Protocol};

    fn node<'a>(name: &'a str, ips: &'a [IpAddr]) -> Node<'a> {
        Node {
            name,
            nodeport_ips: ips,
            own_ips: ips,
        }
    }

    fn state(json: &str) -> State {
        let mut s = State::new(IpFamily::V4);
        s.apply(ChangeSet::from_json(json.as_bytes()).unwrap());
        s
    }

    const CLUSTER: &str = r#"{"services":[
        {"namespace":"ns","name":"web","service":{"cluster_ips":["172.30.0.1"],
         "external_ips":["203.0.113.7"],"session_affinity_timeout":600,"externally_accessible":true,
         "ports":[{"name":"http","protocol":"TCP","port":80,"node_port":30080}]}},
        {"namespace":"ns","name":"loc","service":{"cluster_ips":["172.30.0.2"],
         "externally_accessible":true,"external_traffic_policy":"Local","health_check_node_port":32000,
         "ports":[{"name":"dns","protocol":"UDP","port":53,"node_port":30053}]}}],
      "endpoints":[
        {"namespace":"ns","name":"web","ports":[{"name":"http","protocol":"TCP","endpoints":[
          {"ip":"10.1.0.1","port":8080,"ready":true,"serving":true,"terminating":false,"node_name":"n1"},
          {"ip":"10.2.0.1","port":8080,"ready":true,"serving":true,"terminating":false,"node_name":"n2"},
          {"ip":"10.2.0.2","port":8080,"ready":false,"serving":true,"terminating":true,"node_name":"n2"}]}]},
        {"namespace":"ns","name":"loc","ports":[{"name":"dns","protocol":"UDP","endpoints":[
          {"ip":"10.2.0.9","port":5353,"ready":true,"serving":true,"terminating":false,"node_name":"n2"}]}]}]}"#;

    #[test]
    fn every_service_address_gets_a_virtual_server() {
        let s = state(CLUSTER);
        let node_ips: Vec<IpAddr> = vec!["192.168.0.2".parse().unwrap()];
        let t = table(&s, &node("n1", &node_ips), IpvsScheduler::Rr).table;
        let text = describe(&t);
        let want = "\
172.30.0.1:80/tcp rr persistent 600s -> 10.1.0.1:8080 10.2.0.1:8080
172.30.0.2:53/udp rr -> 10.2.0.9:5353
192.168.0.2:30080/tcp rr persistent 600s -> 10.1.0.1:8080 10.2.0.1:8080
192.168.0.2:30053/udp rr -> 10.2.0.9:5353
203.0.113.7:80/tcp rr persistent 600s -> 10.1.0.1:8080 10.2.0.1:8080
";
        assert_eq!(text, want);
        // eTP Local with no endpoint on n1: upstream's fallback to the cluster's endpoints
        // (the NodePort above); the terminating endpoint is not used while ready ones exist.
        let k = VirtualKey {
            addr: "192.168.0.2".parse().unwrap(),
            protocol: Protocol::Udp,
            port: 30053,
        };
        assert_eq!(t[&k].dests.len(), 1);
    }

    #[test]
    fn local_policies_pick_this_nodes_endpoints_and_fall_back_as_upstream() {
        let s = state(
            r#"{"services":[
            {"namespace":"ns","name":"loc","service":{"cluster_ips":["172.30.0.2"],
             "externally_accessible":true,"external_traffic_policy":"Local",
             "ports":[{"name":"dns","protocol":"UDP","port":53,"node_port":30053}]}},
            {"namespace":"ns","name":"itp","service":{"cluster_ips":["172.30.0.3"],
             "internal_traffic_policy":"Local",
             "ports":[{"name":"t","protocol":"TCP","port":80}]}}],
          "endpoints":[
            {"namespace":"ns","name":"loc","ports":[{"name":"dns","protocol":"UDP","endpoints":[
              {"ip":"10.1.0.9","port":5353,"ready":true,"serving":true,"terminating":false,"node_name":"n1"},
              {"ip":"10.2.0.9","port":5353,"ready":true,"serving":true,"terminating":false,"node_name":"n2"}]}]},
            {"namespace":"ns","name":"itp","ports":[{"name":"t","protocol":"TCP","endpoints":[
              {"ip":"10.2.0.5","port":80,"ready":true,"serving":true,"terminating":false,"node_name":"n2"}]}]}]}"#,
        );
        let ips: Vec<IpAddr> = vec!["192.168.0.2".parse().unwrap()];
        let on = |name: &str| describe(&table(&s, &node(name, &ips), IpvsScheduler::Rr).table);
        // n1: the NodePort goes to n1's endpoint only; the ClusterIP to both; the internal-
        // Local Service has no endpoint here and no fallback (it uses no cluster endpoints).
        assert_eq!(
            on("n1"),
            "172.30.0.2:53/udp rr -> 10.1.0.9:5353 10.2.0.9:5353\n\
             172.30.0.3:80/tcp rr -> (no real servers: refused)\n\
             192.168.0.2:30053/udp rr -> 10.1.0.9:5353\n"
        );
        // n3 has no endpoint of either: the NodePort falls back to every endpoint (PR 97081).
        assert_eq!(
            on("n3"),
            "172.30.0.2:53/udp rr -> 10.1.0.9:5353 10.2.0.9:5353\n\
             172.30.0.3:80/tcp rr -> (no real servers: refused)\n\
             192.168.0.2:30053/udp rr -> 10.1.0.9:5353 10.2.0.9:5353\n"
        );
    }

    #[test]
    fn companion_sets_follow_upstreams_layout() {
        let s = state(
            r#"{"services":[
            {"namespace":"ns","name":"lb","service":{"cluster_ips":["172.30.0.5"],
             "external_ips":["203.0.113.7","192.168.0.2"],"load_balancer_ips":["198.51.100.1"],
             "load_balancer_source_ranges":["192.168.0.0/24","192.0.2.9/32"],
             "externally_accessible":true,"external_traffic_policy":"Local","health_check_node_port":32000,
             "ports":[{"name":"http","protocol":"TCP","port":80,"node_port":30080}]}},
            {"namespace":"ns","name":"fw","service":{"cluster_ips":["172.30.0.6"],
             "load_balancer_ips":["198.51.100.2"],"load_balancer_source_ranges":["10.9.0.0/16"],
             "externally_accessible":true,
             "ports":[{"name":"s","protocol":"SCTP","port":90,"node_port":30090}]}}],
          "endpoints":[
            {"namespace":"ns","name":"lb","ports":[{"name":"http","protocol":"TCP","endpoints":[
              {"ip":"10.1.0.1","port":8080,"ready":true,"serving":true,"terminating":false,"node_name":"n1"},
              {"ip":"10.2.0.1","port":8080,"ready":true,"serving":true,"terminating":false,"node_name":"n2"}]}]}]}"#,
        );
        let ips: Vec<IpAddr> = vec!["192.168.0.2".parse().unwrap()];
        let w = table(&s, &node("n1", &ips), IpvsScheduler::Rr);
        let members = |set: Set| -> Vec<&str> {
            w.sets
                .get(&set)
                .map(|m| m.iter().map(String::as_str).collect())
                .unwrap_or_default()
        };
        assert_eq!(members(Set::LoopBack), ["10.1.0.1,tcp:8080,10.1.0.1"]);
        assert_eq!(
            members(Set::ClusterIp),
            ["172.30.0.5,tcp:80", "172.30.0.6,sctp:90"]
        );
        assert_eq!(
            members(Set::ExternalIpLocal),
            ["192.168.0.2,tcp:80", "203.0.113.7,tcp:80"]
        );
        assert!(members(Set::ExternalIp).is_empty());
        assert_eq!(
            members(Set::LoadBalancer),
            ["198.51.100.1,tcp:80", "198.51.100.2,sctp:90"]
        );
        assert_eq!(members(Set::LoadBalancerLocal), ["198.51.100.1,tcp:80"]);
        assert_eq!(
            members(Set::LoadBalancerSourceCidr),
            [
                "198.51.100.1,tcp:80,192.0.2.9", // a host range as ipset prints it
                "198.51.100.1,tcp:80,192.168.0.0/24",
                "198.51.100.2,sctp:90,10.9.0.0/16"
            ]
        );
        // The first LB's ranges hold the node: it may reach its own LB address...
        assert_eq!(
            members(Set::LoadBalancerSourceIp),
            ["198.51.100.1,tcp:80,198.51.100.1"]
        );
        // ...the second's do not: the node is kept out, as upstream.
        assert_eq!(
            w.out_filter.iter().collect::<Vec<_>>(),
            ["-s 198.51.100.2 -m ipvs --vaddr 198.51.100.2 --vproto sctp --vport 90 -j DROP"]
        );
        assert_eq!(members(Set::NodePortTcp), ["30080"]);
        assert_eq!(members(Set::NodePortLocalTcp), ["30080"]);
        assert_eq!(members(Set::NodePortSctp), ["192.168.0.2,sctp:30090"]);
        assert_eq!(members(Set::HealthCheckNodePort), ["32000"]);
        // The node's own address is never bound on kube-ipvs0.
        let bind: Vec<String> = w.bind.iter().map(IpAddr::to_string).collect();
        assert_eq!(
            bind,
            [
                "172.30.0.5",
                "172.30.0.6",
                "198.51.100.1",
                "198.51.100.2",
                "203.0.113.7"
            ]
        );
        assert_eq!(members(Set::IpvsIps).len(), 5);
    }

    #[test]
    fn a_services_own_scheduler_is_used_and_an_unknown_one_refused() {
        let with = |sched: &str| {
            ChangeSet::from_json(format!(
                r#"{{"services":[{{"namespace":"ns","name":"a","service":{{"cluster_ips":["172.30.0.1"],
                "ipvs_scheduler":"{sched}","ports":[{{"name":"p","protocol":"TCP","port":80}}]}}}}]}}"#
            ).as_bytes())
        };
        let ips: Vec<IpAddr> = vec![];
        let mut s = State::new(IpFamily::V4);
        s.apply(with("lc").unwrap());
        assert_eq!(
            describe(&table(&s, &node("n1", &ips), IpvsScheduler::Rr).table),
            "172.30.0.1:80/tcp lc -> (no real servers: refused)\n"
        );
        // A name that is not a scheduler never reaches the kernel: the decode refuses it.
        let err = with("x;y").unwrap_err().to_string();
        assert!(err.contains("unknown variant `x;y`"), "{err}");
    }
}
