//! Where a packet goes in the ipvs mode: the companion iptables rules (with their ipsets),
//! then IPVS.
//!
//! The iptables walk ([`crate::trace::xtables`]) runs first, with the sets' contents: it
//! decides the masquerade mark and any filter verdict (source ranges, KUBE-IPVS-FILTER). A
//! packet to a local address and port that has a virtual server, and that the filter let
//! through, is then forwarded by IPVS to one of the virtual server's real servers of nonzero
//! weight; with none, the kernel answers "port unreachable". A real server reached from
//! itself is masqueraded by KUBE-POSTROUTING's KUBE-LOOP-BACK rule (hairpin).

use super::ipset::Set;
use super::{Table, VirtualKey, F_PERSISTENT};
use crate::error::Result;
use crate::model::IpFamily;
use crate::trace::xtables::{self, Ruleset};
use crate::trace::{Lookup, Named, NodeFacts, Packet, Reason, Trace, Verdict};
use crate::xtables::Backend as _;

/// What the ipvs mode has in one family's kernel: the rules, kproxy's sets, the IPVS table.
pub struct Live {
    pub rules: Ruleset,
    pub sets: Named,
    pub table: Table,
}

/// Read it (root; the kernel needs ip_vs).
pub fn read_live(family: IpFamily) -> Result<Live> {
    let rules = Ruleset::parse(&crate::xtables::Kernel::new(family).dump()?)?;
    let ours: std::collections::BTreeSet<String> =
        Set::ALL.iter().map(|s| s.name(family)).collect();
    let mut sets = super::ipset::read_kernel()?;
    sets.retain(|name, _| ours.contains(name));
    let mut client = super::kernel::Client::open()?;
    let table = super::Backend::dump(&mut client, family == IpFamily::V6)?;
    Ok(Live { rules, sets, table })
}

/// One line per virtual server (as `describe` prints it) and per set member: what `kproxy
/// diff --live` compares.
pub fn lines(table: &Table, sets: &Named) -> Vec<String> {
    let mut out: Vec<String> = super::desired::describe(table)
        .lines()
        .map(|l| format!("virtual-server {l}"))
        .collect();
    for (name, c) in sets {
        out.extend(c.members.iter().map(|m| format!("ipset {name} {m}")));
    }
    out
}

pub fn trace(rules: &Ruleset, table: &Table, packet: &Packet, node: &NodeFacts) -> Trace {
    let mut t = xtables::trace(rules, packet, node, super::rules::VERDICT_REASONS);
    let key = VirtualKey {
        addr: packet.dst,
        protocol: packet.protocol,
        port: packet.dport,
    };
    let Some(v) = table.get(&key) else {
        return t;
    };
    if !node.is_local(&packet.dst) {
        t.matched.push(format!(
            "ipvs: {key} is not a local address here (not on kube-ipvs0): IPVS never sees it"
        ));
        return t;
    }
    if matches!(t.verdict, Some(Verdict::Drop | Verdict::Reject)) {
        return t; // the filter table decided before IPVS (LOCAL_IN, after filter INPUT)
    }
    let dests: Vec<_> = v.dests.iter().filter(|(_, d)| d.weight > 0).collect();
    let persist = if v.service.flags & F_PERSISTENT != 0 {
        format!(" persistent {}s", v.service.timeout)
    } else {
        String::new()
    };
    if dests.is_empty() {
        t.matched.push(format!(
            "ipvs: {key} {}{persist}: \"the virtual server has no endpoints\"",
            v.service.scheduler
        ));
        t.verdict = Some(Verdict::Reject);
        t.reason = Some(Reason::NoEndpoints);
        return t;
    }
    let shown: Vec<String> = dests.iter().map(|(d, _)| d.to_string()).collect();
    t.matched.push(format!(
        "ipvs: {key} {}{persist} -> {}",
        v.service.scheduler,
        shown.join(" ")
    ));
    t.dnat = shown;
    let family = IpFamily::of(&packet.dst);
    let loopback = node.sets.get(&Set::LoopBack.name(family));
    for (d, _) in &dests {
        let reached = Lookup {
            src: packet.src,
            dst: d.addr,
            protocol: packet.protocol,
            dport: d.port,
        };
        if loopback.is_some_and(|s| s.matches(&[false, false, true], &reached)) {
            t.masquerade = true;
            t.matched.push(format!(
                "nat/KUBE-POSTROUTING: {d} reached from itself: MASQUERADE (KUBE-LOOP-BACK)"
            ));
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LocalDetector;
    use crate::ipvs::desired::{table as wanted, Node};
    use crate::ipvs::ipset::named;
    use crate::ipvs::rules::{restore_text, RuleConfig, JUMPS};
    use crate::model::{ChangeSet, IpvsScheduler, Protocol};
    use crate::state::State;
    use crate::trace::Origin;
    use std::net::IpAddr;

    const CLUSTER: &str = r#"{"services":[
        {"namespace":"ns","name":"web","service":{"cluster_ips":["10.96.0.10"],
         "externally_accessible":true,"ports":[{"name":"p","protocol":"TCP","port":80,"node_port":30080}]}},
        {"namespace":"ns","name":"loc","service":{"cluster_ips":["10.96.0.13"],
         "externally_accessible":true,"external_traffic_policy":"Local",
         "ports":[{"name":"p","protocol":"TCP","port":80,"node_port":30081}]}},
        {"namespace":"ns","name":"lb","service":{"cluster_ips":["10.96.0.15"],
         "load_balancer_ips":["203.0.113.10"],"load_balancer_source_ranges":["192.168.50.2/32"],
         "externally_accessible":true,"ports":[{"name":"p","protocol":"TCP","port":80}]}},
        {"namespace":"ns","name":"empty","service":{"cluster_ips":["10.96.0.20"],
         "ports":[{"name":"p","protocol":"TCP","port":80}]}}],
      "endpoints":[
        {"namespace":"ns","name":"web","ports":[{"name":"p","protocol":"TCP","endpoints":[
          {"ip":"10.244.1.2","port":8080,"ready":true,"serving":true,"terminating":false,"node_name":"n1"},
          {"ip":"10.244.2.2","port":8080,"ready":true,"serving":true,"terminating":false,"node_name":"n2"}]}]},
        {"namespace":"ns","name":"loc","ports":[{"name":"p","protocol":"TCP","endpoints":[
          {"ip":"10.244.1.2","port":8080,"ready":true,"serving":true,"terminating":false,"node_name":"n1"},
          {"ip":"10.244.2.2","port":8080,"ready":true,"serving":true,"terminating":false,"node_name":"n2"}]}]},
        {"namespace":"ns","name":"lb","ports":[{"name":"p","protocol":"TCP","endpoints":[
          {"ip":"10.244.2.2","port":8080,"ready":true,"serving":true,"terminating":false,"node_name":"n2"}]}]}]}"#;

    const NODE_IP: &str = "192.168.50.1";

    fn go(src: &str, dst: &str, port: u16) -> Trace {
        let mut state = State::new(IpFamily::V4);
        state.apply(ChangeSet::from_json(CLUSTER.as_bytes()).unwrap());
        let ips: Vec<IpAddr> = vec![NODE_IP.parse().unwrap()];
        let node = Node {
            name: "n1",
            nodeport_ips: &ips,
            own_ips: &ips,
        };
        let w = wanted(&state, &node, IpvsScheduler::Rr);
        let cfg = RuleConfig {
            family: IpFamily::V4,
            local: LocalDetector::Cidr("10.244.0.0/16".parse().unwrap()),
            masquerade_all: false,
            masquerade_mark: 0x4000,
        };
        let mut rules = Ruleset::parse(&restore_text(&cfg, &[])).unwrap();
        rules.add_jumps(JUMPS).unwrap();
        let mut local_ips = ips.clone();
        local_ips.extend(w.bind.iter().copied());
        let facts = NodeFacts {
            local_ips,
            sets: named(IpFamily::V4, &w.sets),
        };
        let packet = Packet {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol: Protocol::Tcp,
            dport: port,
            origin: Origin::External,
        };
        trace(&rules, &w.table, &packet, &facts)
    }

    #[test]
    fn cluster_ip_from_outside_and_from_a_pod() {
        let t = go("192.168.50.2", "10.96.0.10", 80);
        assert_eq!(t.dnat, ["10.244.1.2:8080", "10.244.2.2:8080"]);
        assert!(t.masquerade, "off-cluster source: masqueraded");
        let t = go("10.244.2.2", "10.96.0.10", 80);
        assert!(!t.masquerade, "{t:?}");
        // A pod of this node reaching itself: hairpin masquerade.
        let t = go("10.244.1.2", "10.96.0.10", 80);
        assert!(t.masquerade, "{t:?}");
    }

    #[test]
    fn node_ports_and_the_local_policy() {
        let t = go("192.168.50.2", NODE_IP, 30080);
        assert_eq!(t.dnat.len(), 2);
        assert!(t.masquerade);
        let t = go("192.168.50.2", NODE_IP, 30081);
        assert_eq!(t.dnat, ["10.244.1.2:8080"]);
        assert!(!t.masquerade, "eTP Local keeps the client's address: {t:?}");
    }

    #[test]
    fn source_ranges_the_ipvs_filter_and_empty_services() {
        let t = go("192.168.50.2", "203.0.113.10", 80);
        assert_eq!(t.dnat, ["10.244.2.2:8080"]);
        assert_eq!(t.reason, None);
        let t = go("192.168.60.2", "203.0.113.10", 80);
        assert_eq!((t.dnat.len(), t.verdict), (0, Some(Verdict::Drop)), "{t:?}");
        assert_eq!(t.reason, Some(Reason::SourceRange));
        // Another port of a Service address reaches nothing on the node.
        let t = go("192.168.50.2", "10.96.0.10", 22);
        assert_eq!(t.verdict, Some(Verdict::Reject), "{t:?}");
        assert_eq!(t.reason, Some(Reason::NoServicePort));
        let t = go("192.168.50.2", "10.96.0.20", 80);
        assert_eq!(t.verdict, Some(Verdict::Reject));
        assert_eq!(t.reason, Some(Reason::NoEndpoints));
        assert!(t.matched.iter().any(|m| m.contains("has no endpoints")));
    }
}
