//! The ipvs mode's ipsets: what the companion iptables rules match on, as upstream names and
//! types them. Services change set *members*; the iptables rules that match the sets never
//! change with Services, so a sync rewrites no rule.
//!
//! A full sync replaces every set atomically (fill a scratch set, `swap` it in); a partial
//! sync adds and deletes only the members that changed since the last write. Both are one
//! `ipset restore` run.

use crate::error::Result;
use crate::exec;
use crate::model::{IpFamily, Protocol};
use crate::trace::{Contents, Named};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// One of upstream's sets (IPv4 names; IPv6 ones are `KUBE-6-...`, cut to 31 characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Set {
    /// Local endpoint `ip,proto:port,ip`: a pod reaching itself through a Service (hairpin).
    LoopBack,
    ClusterIp,
    ExternalIp,
    ExternalIpLocal,
    LoadBalancer,
    LoadBalancerLocal,
    /// LB addresses with loadBalancerSourceRanges.
    LoadBalancerFw,
    LoadBalancerSourceIp,
    LoadBalancerSourceCidr,
    NodePortTcp,
    NodePortLocalTcp,
    NodePortUdp,
    NodePortLocalUdp,
    NodePortSctp,
    NodePortLocalSctp,
    HealthCheckNodePort,
    /// Every address bound on kube-ipvs0.
    IpvsIps,
}

impl Set {
    pub const ALL: [Set; 17] = [
        Set::LoopBack,
        Set::ClusterIp,
        Set::ExternalIp,
        Set::ExternalIpLocal,
        Set::LoadBalancer,
        Set::LoadBalancerLocal,
        Set::LoadBalancerFw,
        Set::LoadBalancerSourceIp,
        Set::LoadBalancerSourceCidr,
        Set::NodePortTcp,
        Set::NodePortLocalTcp,
        Set::NodePortUdp,
        Set::NodePortLocalUdp,
        Set::NodePortSctp,
        Set::NodePortLocalSctp,
        Set::HealthCheckNodePort,
        Set::IpvsIps,
    ];

    fn base(self) -> &'static str {
        match self {
            Set::LoopBack => "KUBE-LOOP-BACK",
            Set::ClusterIp => "KUBE-CLUSTER-IP",
            Set::ExternalIp => "KUBE-EXTERNAL-IP",
            Set::ExternalIpLocal => "KUBE-EXTERNAL-IP-LOCAL",
            Set::LoadBalancer => "KUBE-LOAD-BALANCER",
            Set::LoadBalancerLocal => "KUBE-LOAD-BALANCER-LOCAL",
            Set::LoadBalancerFw => "KUBE-LOAD-BALANCER-FW",
            Set::LoadBalancerSourceIp => "KUBE-LOAD-BALANCER-SOURCE-IP",
            Set::LoadBalancerSourceCidr => "KUBE-LOAD-BALANCER-SOURCE-CIDR",
            Set::NodePortTcp => "KUBE-NODE-PORT-TCP",
            Set::NodePortLocalTcp => "KUBE-NODE-PORT-LOCAL-TCP",
            Set::NodePortUdp => "KUBE-NODE-PORT-UDP",
            Set::NodePortLocalUdp => "KUBE-NODE-PORT-LOCAL-UDP",
            Set::NodePortSctp => "KUBE-NODE-PORT-SCTP-HASH",
            Set::NodePortLocalSctp => "KUBE-NODE-PORT-LOCAL-SCTP-HASH",
            Set::HealthCheckNodePort => "KUBE-HEALTH-CHECK-NODE-PORT",
            Set::IpvsIps => "KUBE-IPVS-IPS",
        }
    }

    /// The set's name in `family` (upstream's: `KUBE-` becomes `KUBE-6-`, at most 31 bytes).
    pub fn name(self, family: IpFamily) -> String {
        match family {
            IpFamily::V4 => self.base().to_owned(),
            IpFamily::V6 => {
                let mut n = self.base().replacen("KUBE-", "KUBE-6-", 1);
                n.truncate(31);
                n
            }
        }
    }

    /// The ipset type.
    pub fn kind(self) -> &'static str {
        match self {
            Set::LoopBack | Set::LoadBalancerSourceIp => "hash:ip,port,ip",
            Set::LoadBalancerSourceCidr => "hash:ip,port,net",
            Set::NodePortTcp
            | Set::NodePortLocalTcp
            | Set::NodePortUdp
            | Set::NodePortLocalUdp
            | Set::HealthCheckNodePort => "bitmap:port",
            Set::IpvsIps => "hash:ip",
            _ => "hash:ip,port",
        }
    }

    /// How iptables matches a packet against it (`--match-set NAME <dims>`).
    pub fn dims(self) -> &'static str {
        match self.kind() {
            "bitmap:port" | "hash:ip" => "dst",
            "hash:ip,port" => "dst,dst",
            _ => "dst,dst,src",
        }
    }

    fn create(self, name: &str, family: IpFamily) -> String {
        let kind = self.kind();
        if kind == "bitmap:port" {
            return format!("create {name} {kind} range 0-65535");
        }
        let fam = match family {
            IpFamily::V4 => "inet",
            IpFamily::V6 => "inet6",
        };
        format!("create {name} {kind} family {fam} hashsize 1024 maxelem 1048576")
    }

    /// The NodePort sets of a protocol: (every NodePort, NodePorts under eTP Local).
    pub fn node_port(protocol: Protocol) -> (Set, Set) {
        match protocol {
            Protocol::Tcp => (Set::NodePortTcp, Set::NodePortLocalTcp),
            Protocol::Udp => (Set::NodePortUdp, Set::NodePortLocalUdp),
            Protocol::Sctp => (Set::NodePortSctp, Set::NodePortLocalSctp),
        }
    }
}

/// The sets of `ipset save` output (every set; members without their options).
pub fn parse_save(text: &str) -> Named {
    let mut out = Named::new();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["create", name, kind, ..] => {
                out.entry((*name).to_owned()).or_default().kind = (*kind).to_owned();
            }
            ["add", name, member, ..] => {
                out.entry((*name).to_owned())
                    .or_default()
                    .members
                    .insert((*member).to_owned());
            }
            _ => {}
        }
    }
    out
}

/// kproxy's sets of one family by name, with their types.
pub fn named(family: IpFamily, sets: &Sets) -> Named {
    Set::ALL
        .iter()
        .map(|s| {
            let contents = Contents {
                kind: s.kind().to_owned(),
                members: sets.get(s).cloned().unwrap_or_default(),
            };
            (s.name(family), contents)
        })
        .collect()
}

/// Members in ipset's own spelling (as `ipset save` prints them).
pub fn ip_port(ip: IpAddr, protocol: Protocol, port: u16) -> String {
    format!("{ip},{}:{port}", protocol.lower())
}

/// Every set's members.
pub type Sets = BTreeMap<Set, BTreeSet<String>>;

/// A scratch set filled and swapped in during a full sync (removed again at its end).
const SCRATCH: &str = "KPROXY-IPVS-SWAP";

/// `ipset restore` input that makes every set hold exactly `want`. `existing`: the set
/// names the kernel has (`ipset list -n`), so only missing sets are created and a scratch
/// set left by an interrupted run is removed first.
pub fn full_text(family: IpFamily, want: &Sets, existing: &BTreeSet<String>) -> String {
    let mut out = String::new();
    if existing.contains(SCRATCH) {
        out.push_str(&format!("destroy {SCRATCH}\n"));
    }
    let empty = BTreeSet::new();
    for set in Set::ALL {
        let name = set.name(family);
        if !existing.contains(&name) {
            out.push_str(&set.create(&name, family));
            out.push('\n');
        }
        out.push_str(&set.create(SCRATCH, family));
        out.push('\n');
        for m in want.get(&set).unwrap_or(&empty) {
            out.push_str(&format!("add {SCRATCH} {m}\n"));
        }
        out.push_str(&format!("swap {SCRATCH} {name}\ndestroy {SCRATCH}\n"));
    }
    out
}

/// `ipset restore` input for the members that changed from `have` to `want` (empty: none).
pub fn partial_text(family: IpFamily, want: &Sets, have: &Sets) -> String {
    let empty = BTreeSet::new();
    let mut out = String::new();
    for set in Set::ALL {
        let (w, h) = (
            want.get(&set).unwrap_or(&empty),
            have.get(&set).unwrap_or(&empty),
        );
        let name = set.name(family);
        for m in h.difference(w) {
            out.push_str(&format!("del {name} {m} -exist\n"));
        }
        for m in w.difference(h) {
            out.push_str(&format!("add {name} {m} -exist\n"));
        }
    }
    out
}

/// `ipset restore` input for members removed and added (empty: none).
pub fn delta_text(family: IpFamily, add: &[(Set, String)], del: &[(Set, String)]) -> String {
    let mut out = String::new();
    for (verb, members) in [("del", del), ("add", add)] {
        for (set, m) in members {
            out.push_str(&format!("{verb} {} {m} -exist\n", set.name(family)));
        }
    }
    out
}

/// Where set updates go.
pub trait Backend: Send {
    /// The names of the sets that exist.
    fn names(&mut self) -> Result<BTreeSet<String>>;
    fn restore(&mut self, text: &str) -> Result<()>;
}

/// The `ipset` tool.
pub struct Kernel;

impl Backend for Kernel {
    fn names(&mut self) -> Result<BTreeSet<String>> {
        let out = exec::check("ipset", exec::run("ipset", "ipset", &["list", "-n"], None)?)?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect())
    }

    fn restore(&mut self, text: &str) -> Result<()> {
        exec::check(
            "ipset",
            exec::run("ipset", "ipset", &["restore"], Some(text))?,
        )?;
        Ok(())
    }
}

/// Every set in the kernel (`ipset save`).
pub fn read_kernel() -> Result<Named> {
    let out = exec::check("ipset", exec::run("ipset", "ipset", &["save"], None)?)?;
    Ok(parse_save(&String::from_utf8_lossy(&out.stdout)))
}

/// Sets in memory, with ipset's semantics for the commands this module writes.
#[derive(Default)]
pub struct Fake {
    pub sets: BTreeMap<String, BTreeSet<String>>,
    /// Every restore run, as given.
    pub log: Vec<String>,
}

impl Backend for Fake {
    fn names(&mut self) -> Result<BTreeSet<String>> {
        Ok(self.sets.keys().cloned().collect())
    }

    fn restore(&mut self, text: &str) -> Result<()> {
        let mut sets = self.sets.clone();
        for (n, line) in text.lines().enumerate() {
            let w: Vec<&str> = line.split_whitespace().collect();
            let fail = |why: &str| crate::error::Error::Apply {
                op: "ipset",
                code: Some(1),
                stderr: format!("Error in line {}: {why}", n + 1),
            };
            let exist = w.last() == Some(&"-exist");
            match w.as_slice() {
                ["create", name, ..] => {
                    if sets.contains_key(*name) && !exist {
                        return Err(fail("set with the same name already exists"));
                    }
                    sets.entry((*name).to_owned()).or_default();
                }
                ["destroy", name] => {
                    sets.remove(*name)
                        .ok_or_else(|| fail("set does not exist"))?;
                }
                ["swap", a, b] => {
                    let x = sets.remove(*a).ok_or_else(|| fail("set does not exist"))?;
                    let y = sets.remove(*b).ok_or_else(|| fail("set does not exist"))?;
                    sets.insert((*a).to_owned(), y);
                    sets.insert((*b).to_owned(), x);
                }
                ["add", name, member, ..] => {
                    let s = sets
                        .get_mut(*name)
                        .ok_or_else(|| fail("set does not exist"))?;
                    if !s.insert((*member).to_owned()) && !exist {
                        return Err(fail("element already added"));
                    }
                }
                ["del", name, member, ..] => {
                    let s = sets
                        .get_mut(*name)
                        .ok_or_else(|| fail("set does not exist"))?;
                    if !s.remove(*member) && !exist {
                        return Err(fail("element not added"));
                    }
                }
                _ => return Err(fail("unknown command")),
            }
        }
        self.sets = sets;
        self.log.push(text.to_owned());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sets(members: &[(Set, &str)]) -> Sets {
        let mut s = Sets::new();
        for (set, m) in members {
            s.entry(*set).or_default().insert((*m).to_owned());
        }
        s
    }

    #[test]
    fn names_follow_upstream_and_fit_ipsets_limit() {
        assert_eq!(Set::ClusterIp.name(IpFamily::V4), "KUBE-CLUSTER-IP");
        assert_eq!(Set::ClusterIp.name(IpFamily::V6), "KUBE-6-CLUSTER-IP");
        assert_eq!(
            Set::LoadBalancerSourceCidr.name(IpFamily::V6),
            "KUBE-6-LOAD-BALANCER-SOURCE-CID"
        );
        for s in Set::ALL {
            assert!(s.name(IpFamily::V6).len() <= 31);
        }
    }

    #[test]
    fn a_full_write_replaces_every_set_and_a_partial_one_sends_the_difference() {
        let mut k = Fake::default();
        // A set someone else filled, and a scratch set left by an interrupted run.
        k.sets.insert(
            "KUBE-CLUSTER-IP".into(),
            ["10.96.0.9,tcp:80".to_owned()].into(),
        );
        k.sets.insert(SCRATCH.into(), BTreeSet::new());
        let v1 = sets(&[
            (Set::ClusterIp, "10.96.0.1,tcp:80"),
            (Set::NodePortTcp, "30080"),
        ]);
        let text = full_text(IpFamily::V4, &v1, &k.names().unwrap());
        k.restore(&text).unwrap();
        assert_eq!(k.sets.len(), Set::ALL.len(), "{:?}", k.sets.keys());
        assert_eq!(k.sets["KUBE-CLUSTER-IP"], v1[&Set::ClusterIp]);
        assert_eq!(k.sets["KUBE-NODE-PORT-TCP"], v1[&Set::NodePortTcp]);
        assert!(text.contains("create KUBE-NODE-PORT-TCP bitmap:port range 0-65535\n"));
        assert!(
            !text.contains("create KUBE-CLUSTER-IP hash"),
            "exists already"
        );

        let v2 = sets(&[
            (Set::ClusterIp, "10.96.0.2,udp:53"),
            (Set::NodePortTcp, "30080"),
        ]);
        let text = partial_text(IpFamily::V4, &v2, &v1);
        assert_eq!(
            text,
            "del KUBE-CLUSTER-IP 10.96.0.1,tcp:80 -exist\nadd KUBE-CLUSTER-IP 10.96.0.2,udp:53 -exist\n"
        );
        k.restore(&text).unwrap();
        assert_eq!(k.sets["KUBE-CLUSTER-IP"], v2[&Set::ClusterIp]);
        assert_eq!(partial_text(IpFamily::V4, &v2, &v2), "");
    }

    #[test]
    fn lookups_follow_each_sets_type_and_dimensions() {
        use crate::trace::Lookup;
        let saved = "create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024\n\
            add KUBE-CLUSTER-IP 10.96.0.1,tcp:80\n\
            create KUBE-NODE-PORT-TCP bitmap:port range 0-65535\nadd KUBE-NODE-PORT-TCP 30080\n\
            create KUBE-LOOP-BACK hash:ip,port,ip family inet\n\
            add KUBE-LOOP-BACK 10.244.1.2,tcp:8080,10.244.1.2\n\
            create KUBE-LOAD-BALANCER-SOURCE-CIDR hash:ip,port,net family inet\n\
            add KUBE-LOAD-BALANCER-SOURCE-CIDR 203.0.113.10,tcp:80,192.168.50.0/24\n\
            add KUBE-LOAD-BALANCER-SOURCE-CIDR 203.0.113.10,tcp:80,10.1.1.1\n";
        let sets = parse_save(saved);
        let p = |src: &str, dst: &str, dport: u16| Lookup {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol: Protocol::Tcp,
            dport,
        };
        let m = |name: &str, dims: &[bool], l: Lookup| sets[name].matches(dims, &l);
        assert!(m(
            "KUBE-CLUSTER-IP",
            &[false, false],
            p("1.1.1.1", "10.96.0.1", 80)
        ));
        assert!(!m(
            "KUBE-CLUSTER-IP",
            &[false, false],
            p("1.1.1.1", "10.96.0.1", 81)
        ));
        assert!(!m(
            "KUBE-CLUSTER-IP",
            &[true, false],
            p("1.1.1.1", "10.96.0.1", 80)
        ));
        assert!(m(
            "KUBE-CLUSTER-IP",
            &[true, false],
            p("10.96.0.1", "1.1.1.1", 80)
        ));
        assert!(m(
            "KUBE-NODE-PORT-TCP",
            &[false],
            p("1.1.1.1", "192.168.0.1", 30080)
        ));
        let hairpin = p("10.244.1.2", "10.244.1.2", 8080);
        assert!(m("KUBE-LOOP-BACK", &[false, false, true], hairpin));
        let cidr = [false, false, true];
        assert!(m(
            "KUBE-LOAD-BALANCER-SOURCE-CIDR",
            &cidr,
            p("192.168.50.7", "203.0.113.10", 80)
        ));
        assert!(m(
            "KUBE-LOAD-BALANCER-SOURCE-CIDR",
            &cidr,
            p("10.1.1.1", "203.0.113.10", 80)
        ));
        assert!(!m(
            "KUBE-LOAD-BALANCER-SOURCE-CIDR",
            &cidr,
            p("192.168.60.2", "203.0.113.10", 80)
        ));
    }
}
