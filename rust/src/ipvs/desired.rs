//! The IPVS table the Services and endpoints call for, as upstream's ipvs proxier builds it.
//!
//! Per Service port: a virtual server on the ClusterIP (internal traffic policy), on each
//! external IP and load-balancer IP (external policy), and on `<node IP>:<nodePort>` for
//! every node address NodePorts are served on (external policy). Every real server has
//! weight 1 and is masqueraded. ClientIP affinity is IPVS persistence with the Service's
//! timeout. Under a Local policy with no endpoint on this node, upstream's ipvs mode falls
//! back to the cluster's endpoints (kubernetes PR 97081: pods on this node can still reach
//! the Service); so does this.

use super::{Dest, DestKey, Service, Table, Virtual, VirtualKey, F_PERSISTENT, F_SCHED2};
use crate::model::Endpoint;
use crate::state::State;
use crate::topology::{categorize, NodeView};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The wanted table, and the Service port each virtual server serves (for messages).
#[derive(Debug, Default)]
pub struct Wanted {
    pub table: Table,
    pub names: BTreeMap<VirtualKey, String>,
}

/// `node_ips`: the addresses NodePorts are served on (this family's).
pub fn table(state: &State, node_name: &str, node_ips: &[IpAddr], scheduler: &str) -> Wanted {
    let node = NodeView {
        name: node_name,
        zone: state.node().zone.as_deref(),
    };
    let mut out = Wanted::default();
    for sp in state.service_ports() {
        let svc = sp.service;
        let endpoints = state.endpoints(&sp.name);
        let policies = sp.policies();
        let cat = categorize(&endpoints, policies, node);
        let pick = |local: bool| -> &[&Endpoint] {
            if local && !cat.local.is_empty() {
                &cat.local
            } else if local && !policies.uses_cluster() {
                &[]
            } else {
                &cat.cluster
            }
        };
        let service = Service {
            scheduler: scheduler.to_owned(),
            flags: svc.session_affinity_timeout.map_or(0, |_| F_PERSISTENT)
                | if scheduler == "mh" { F_SCHED2 } else { 0 },
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
            for ip in node_ips {
                add(*ip, sp.port.node_port, pick(policies.external_local));
            }
        }
    }
    out
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
        let t = table(&s, "n1", &node_ips, "rr").table;
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
        let on = |node: &str| describe(&table(&s, node, &ips, "rr").table);
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
}
