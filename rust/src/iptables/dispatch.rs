//! Bounded dispatch: shared chains split into small bucket chains.
//!
//! Upstream lists one rule per service address in `KUBE-SERVICES`, so every new connection
//! walks a chain as long as the cluster has service ports, and every partial sync rewrites
//! that chain whole. Here each shared chain (a [`Root`]) holds at most a few dozen jumps into
//! a fixed trie of bucket chains:
//!
//! * address-keyed rules are bucketed by the **low** bits of the destination address, one
//!   nibble per level over three levels (4,096 leaves), matched with non-contiguous masks such
//!   as `-d 0.0.0.5/0.0.0.15`. Service addresses are allocated at random, so low bits spread
//!   evenly; the prefix they share (e.g. `10.96.0.0/12`) would not.
//! * port-keyed rules (NodePorts, health-check ports) are bucketed per protocol by the high
//!   byte of the port, then by the next nibble (`--dport 30208:30223`).
//!
//! A packet walks at most 16 bucket jumps per level, then a leaf holding the few services whose
//! addresses share those bits; a change to one service rewrites one leaf (plus its ancestors
//! only when a bucket appears or empties). Leaf rules are the unchanged upstream rules, so a
//! bucket that does not match simply returns.

use crate::model::{IpFamily, Protocol, ServiceKey};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::IpAddr;
use std::ops::Bound;

/// A shared chain whose rules are dispatched through buckets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Root {
    /// nat `KUBE-SERVICES`: service addresses -> policy and external chains.
    NatServices,
    /// nat `KUBE-NODEPORTS`: NodePorts -> external chains.
    NatNodePorts,
    /// filter `KUBE-SERVICES`: REJECT / DROP for cluster IPs without usable endpoints.
    FilterServices,
    /// filter `KUBE-EXTERNAL-SERVICES`: the same for external IPs, LB IPs and NodePorts.
    FilterExternal,
    /// filter `KUBE-PROXY-FIREWALL`: DROP for LB traffic outside loadBalancerSourceRanges.
    FilterFirewall,
    /// filter `KUBE-NODEPORTS`: ACCEPT for health-check NodePorts.
    FilterNodePorts,
}

impl Root {
    pub const ALL: [Root; 6] = [
        Root::NatServices,
        Root::NatNodePorts,
        Root::FilterServices,
        Root::FilterExternal,
        Root::FilterFirewall,
        Root::FilterNodePorts,
    ];

    pub fn table(self) -> &'static str {
        match self {
            Root::NatServices | Root::NatNodePorts => "nat",
            _ => "filter",
        }
    }

    /// The root chain (upstream's name: the entry point users script against).
    pub fn chain(self) -> &'static str {
        match self {
            Root::NatServices | Root::FilterServices => "KUBE-SERVICES",
            Root::NatNodePorts | Root::FilterNodePorts => "KUBE-NODEPORTS",
            Root::FilterExternal => "KUBE-EXTERNAL-SERVICES",
            Root::FilterFirewall => "KUBE-PROXY-FIREWALL",
        }
    }

    /// Prefix of this root's bucket chains.
    fn prefix(self) -> &'static str {
        match self {
            Root::NatServices => "KUBE-SVCS-",
            Root::NatNodePorts => "KUBE-NPS-",
            Root::FilterServices => "KUBE-SVCR-",
            Root::FilterExternal => "KUBE-EXTS-",
            Root::FilterFirewall => "KUBE-FWS-",
            Root::FilterNodePorts => "KUBE-HCS-",
        }
    }
}

/// Prefixes of every bucket chain (for stale-chain sweeps and cleanup).
pub const BUCKET_PREFIXES: &[&str] = &[
    "KUBE-SVCS-",
    "KUBE-NPS-",
    "KUBE-SVCR-",
    "KUBE-EXTS-",
    "KUBE-FWS-",
    "KUBE-HCS-",
];

/// What a rule is dispatched on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    Addr(IpAddr),
    Port(Protocol, u16),
}

/// The position of a node in a root's trie: `(kind, a, b, c)` with `depth` levels used.
/// Addresses: kind 0, `a`, `b`, `c` the low three nibbles. Ports: kind 1..=3 (the protocol),
/// `a` the high byte, `b` the next nibble.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Path {
    kind: u8,
    a: u8,
    b: u8,
    c: u8,
    depth: u8,
}

const ADDR_DEPTH: u8 = 3;
const PORT_DEPTH: u8 = 2;

fn proto_code(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 1,
        Protocol::Udp => 2,
        Protocol::Sctp => 3,
    }
}

fn proto_of(code: u8) -> Protocol {
    match code {
        1 => Protocol::Tcp,
        2 => Protocol::Udp,
        _ => Protocol::Sctp,
    }
}

impl Path {
    /// The leaf a key belongs to.
    pub fn leaf(key: &Key) -> Path {
        match key {
            Key::Addr(ip) => {
                let low = match ip {
                    IpAddr::V4(a) => u32::from(*a) & 0xfff,
                    IpAddr::V6(a) => (u128::from(*a) & 0xfff) as u32,
                };
                Path {
                    kind: 0,
                    a: (low & 0xf) as u8,
                    b: ((low >> 4) & 0xf) as u8,
                    c: ((low >> 8) & 0xf) as u8,
                    depth: ADDR_DEPTH,
                }
            }
            Key::Port(p, port) => Path {
                kind: proto_code(*p),
                a: (port >> 8) as u8,
                b: ((port >> 4) & 0xf) as u8,
                c: 0,
                depth: PORT_DEPTH,
            },
        }
    }

    fn is_addr(&self) -> bool {
        self.kind == 0
    }

    fn max_depth(&self) -> u8 {
        if self.is_addr() {
            ADDR_DEPTH
        } else {
            PORT_DEPTH
        }
    }

    /// The ancestor at `depth` (1 = child of the root).
    fn at(&self, depth: u8) -> Path {
        let mut p = *self;
        p.depth = depth;
        if depth < 3 {
            p.c = 0;
        }
        if depth < 2 {
            p.b = 0;
        }
        p
    }

    /// The bucket chain's name, e.g. `KUBE-SVCS-5A3` or `KUBE-NPS-T75C`.
    pub fn chain(&self, root: Root) -> String {
        let mut s = String::from(root.prefix());
        if self.is_addr() {
            let nibbles = [self.a, self.b, self.c];
            for n in &nibbles[..self.depth as usize] {
                let _ = write!(s, "{n:X}");
            }
        } else {
            s.push(match proto_of(self.kind) {
                Protocol::Tcp => 'T',
                Protocol::Udp => 'U',
                Protocol::Sctp => 'S',
            });
            let _ = write!(s, "{:02X}", self.a);
            if self.depth >= 2 {
                let _ = write!(s, "{:X}", self.b);
            }
        }
        s
    }

    /// The match that sends a packet from the parent into this node.
    fn matcher(&self, family: IpFamily) -> String {
        if self.is_addr() {
            let (shift, n) = match self.depth {
                1 => (0, self.a),
                2 => (4, self.b),
                _ => (8, self.c),
            };
            let value = u128::from(n) << shift;
            let mask = 0xfu128 << shift;
            match family {
                IpFamily::V4 => format!(
                    "-d {}/{}",
                    std::net::Ipv4Addr::from(value as u32),
                    std::net::Ipv4Addr::from(mask as u32)
                ),
                IpFamily::V6 => format!(
                    "-d {}/{}",
                    std::net::Ipv6Addr::from(value),
                    std::net::Ipv6Addr::from(mask)
                ),
            }
        } else {
            let p = proto_of(self.kind).lower();
            let base = u32::from(self.a) << 8;
            let (lo, hi) = if self.depth == 1 {
                (base, base + 255)
            } else {
                let lo = base + (u32::from(self.b) << 4);
                (lo, lo + 15)
            };
            format!("-m {p} -p {p} --dport {lo}:{hi}")
        }
    }
}

/// Identifies a rule in a leaf: the owning service, and its position among that service's
/// rules for this root (rules keep the order the service rendered them in).
pub type EntryId = (ServiceKey, u32);

/// Every dispatched rule, by root and leaf.
#[derive(Debug, Default, Clone)]
pub struct Dispatch {
    leaves: BTreeMap<(Root, Path), BTreeMap<EntryId, String>>,
}

impl Dispatch {
    pub fn insert(&mut self, root: Root, key: &Key, id: EntryId, rule: String) -> (Root, Path) {
        let leaf = (root, Path::leaf(key));
        self.leaves.entry(leaf).or_default().insert(id, rule);
        leaf
    }

    pub fn remove(&mut self, leaf: (Root, Path), id: &EntryId) {
        if let Some(rules) = self.leaves.get_mut(&leaf) {
            rules.remove(id);
            if rules.is_empty() {
                self.leaves.remove(&leaf);
            }
        }
    }

    /// Leaves under `node` (all of `root`'s leaves when `node` is None).
    fn leaves_under(
        &self,
        root: Root,
        node: Option<Path>,
    ) -> impl Iterator<Item = (&(Root, Path), &BTreeMap<EntryId, String>)> {
        let lo = (
            root,
            Path {
                kind: 0,
                a: 0,
                b: 0,
                c: 0,
                depth: 0,
            },
        );
        let hi = (
            root,
            Path {
                kind: u8::MAX,
                a: u8::MAX,
                b: u8::MAX,
                c: u8::MAX,
                depth: u8::MAX,
            },
        );
        self.leaves
            .range((Bound::Included(lo), Bound::Included(hi)))
            .filter(move |((_, p), _)| match node {
                None => true,
                Some(n) => p.kind == n.kind && p.at(n.depth) == n,
            })
    }

    /// The chains of `root`'s trie on the path to `leaf` (root excluded), shallowest first.
    pub fn ancestors(leaf: Path) -> Vec<Path> {
        (1..=leaf.max_depth()).map(|d| leaf.at(d)).collect()
    }

    /// The rules of the chain at `node` (None: the root itself), or None if the node is empty
    /// (has no leaf under it) and so must not exist.
    pub fn chain_rules(
        &self,
        root: Root,
        node: Option<Path>,
        family: IpFamily,
    ) -> Option<Vec<String>> {
        let mut rules = Vec::new();
        match node {
            Some(n) if n.depth == n.max_depth() => {
                let leaf = self.leaves.get(&(root, n))?;
                rules.extend(leaf.values().cloned());
            }
            _ => {
                let child_depth = node.map_or(1, |n| n.depth + 1);
                let mut last: Option<Path> = None;
                for ((_, p), _) in self.leaves_under(root, node) {
                    let child = p.at(child_depth);
                    if last != Some(child) {
                        rules.push(format!(
                            "{} -j {}",
                            child.matcher(family),
                            child.chain(root)
                        ));
                        last = Some(child);
                    }
                }
                if node.is_some() && rules.is_empty() {
                    return None;
                }
            }
        }
        Some(rules)
    }

    /// Every node (chain) that exists under `root`, shallowest first.
    pub fn nodes(&self, root: Root) -> Vec<Path> {
        let mut out: Vec<Path> = Vec::new();
        for ((_, leaf), _) in self.leaves_under(root, None) {
            for a in Dispatch::ancestors(*leaf) {
                if !out.contains(&a) {
                    out.push(a);
                }
            }
        }
        out.sort_by_key(|p| (p.depth, *p));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Name;

    fn id(n: &str) -> EntryId {
        (
            ServiceKey {
                namespace: Name::new("ns").unwrap(),
                name: Name::new(n).unwrap(),
            },
            0,
        )
    }

    #[test]
    fn addresses_are_bucketed_by_low_nibbles() {
        let leaf = Path::leaf(&Key::Addr("10.96.3.165".parse().unwrap()));
        // 3.165 = 0x3A5: nibbles 5, A, 3 from the lowest.
        assert_eq!(leaf.chain(Root::NatServices), "KUBE-SVCS-5A3");
        let anc = Dispatch::ancestors(leaf);
        assert_eq!(anc[0].matcher(IpFamily::V4), "-d 0.0.0.5/0.0.0.15");
        assert_eq!(anc[1].matcher(IpFamily::V4), "-d 0.0.0.160/0.0.0.240");
        assert_eq!(anc[2].matcher(IpFamily::V4), "-d 0.0.3.0/0.0.15.0");
        let v6 = Path::leaf(&Key::Addr("fd00::3a5".parse().unwrap()));
        assert_eq!(
            Dispatch::ancestors(v6)[2].matcher(IpFamily::V6),
            "-d ::300/::f00"
        );
    }

    #[test]
    fn ports_are_bucketed_by_range() {
        let leaf = Path::leaf(&Key::Port(Protocol::Udp, 30081));
        assert_eq!(leaf.chain(Root::NatNodePorts), "KUBE-NPS-U758");
        let anc = Dispatch::ancestors(leaf);
        assert_eq!(
            anc[0].matcher(IpFamily::V4),
            "-m udp -p udp --dport 29952:30207"
        );
        assert_eq!(
            anc[1].matcher(IpFamily::V4),
            "-m udp -p udp --dport 30080:30095"
        );
    }

    #[test]
    fn chains_exist_only_for_non_empty_buckets() {
        let mut d = Dispatch::default();
        let a = d.insert(
            Root::NatServices,
            &Key::Addr("10.0.0.1".parse().unwrap()),
            id("a"),
            "A".into(),
        );
        let b = d.insert(
            Root::NatServices,
            &Key::Addr("10.0.0.17".parse().unwrap()),
            id("b"),
            "B".into(),
        );
        let root = d
            .chain_rules(Root::NatServices, None, IpFamily::V4)
            .unwrap();
        assert_eq!(root, ["-d 0.0.0.1/0.0.0.15 -j KUBE-SVCS-1"]);
        let l1 = d
            .chain_rules(
                Root::NatServices,
                Some(Dispatch::ancestors(a.1)[0]),
                IpFamily::V4,
            )
            .unwrap();
        assert_eq!(l1.len(), 2); // nibble 0 (10.0.0.1) and nibble 1 (10.0.0.17)
        assert_eq!(d.nodes(Root::NatServices).len(), 1 + 2 + 2);
        d.remove(a, &id("a"));
        assert!(d
            .chain_rules(Root::NatServices, Some(a.1), IpFamily::V4)
            .is_none());
        assert_eq!(
            d.chain_rules(Root::NatServices, Some(b.1), IpFamily::V4)
                .unwrap(),
            ["B"]
        );
        d.remove(b, &id("b"));
        assert_eq!(
            d.chain_rules(Root::NatServices, None, IpFamily::V4)
                .unwrap(),
            Vec::<String>::new()
        );
        assert!(d.nodes(Root::NatServices).is_empty());
    }
}
