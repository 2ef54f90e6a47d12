//! A packet tracer over the in-memory nftables table: where does the first packet of a new
//! connection go?
//!
//! It answers with the same [`Trace`] as the iptables tracer, and models the same things:
//!
//! 1. filter `prerouting`/`output` at `dstnat - 10` (the source-range firewall), then nat
//!    `prerouting` (from the network) or nat `output` (from the node): every DNAT some path
//!    reaches is collected;
//! 2. the first DNAT's destination becomes the packet's, then filter `input` (to a local
//!    address), `forward`, or `output` (from the node; followed by `input` when the
//!    destination is local, as loopback traffic is);
//! 3. nat `postrouting`: [`Trace::masquerade`] is set when some path masquerades (the mark,
//!    or a hairpin connection).
//!
//! Random choices are explored, not drawn: `numgen random mod n` in a map key tries every
//! value, and a `numgen random mod n 0` condition "may match" (its target is followed, then the
//! walk goes on as if it had not matched). `fib … type local` knows [`NodeFacts::local_ips`]
//! and loopback. Interface names are not modelled: an `iifname` condition never holds, with or
//! without `!=`. Dynamic sets (affinity) start empty: there is no history for a first packet.

use super::ast::{Data, Field, Match, Rule, Stmt, Value};
use super::backend::Model;
use super::render::{
    CLUSTER_IPS_CHECK, FIREWALL_CHECK, NO_ENDPOINT_NODEPORTS, NO_ENDPOINT_SERVICES,
};
use crate::model::{IpFamily, Protocol};
use crate::naming::join_host_port;
use crate::trace::{NodeFacts, Origin, Packet, Reason, Trace, Verdict};
use std::net::IpAddr;

const MAX_DEPTH: usize = 64;

#[derive(Clone, Copy, Debug)]
struct Pkt {
    src: IpAddr,
    dst: IpAddr,
    proto: Protocol,
    dport: u16,
    mark: u32,
    dnat: bool,
}

enum Flow {
    /// Fell off the end or a goto target returned: go on in the caller.
    Continue,
    /// Stop walking this hook (a NAT was done, or a filter verdict).
    Stop(Option<Verdict>),
}

struct Walk<'a> {
    model: &'a Model,
    node: &'a NodeFacts,
    family: IpFamily,
    /// DNAT targets reached: (address, port, mark at that point).
    dnats: Vec<(IpAddr, u16, u32)>,
    masquerade: bool,
    matched: Vec<String>,
    /// The reason a verdict reached below the current chain has, from how the walk got there
    /// (a `no-endpoint-*` map entry, or `cluster-ips-check`'s goto).
    via: Option<Reason>,
    /// The reason of the latest verdict (the one the walk returns, when it returns one).
    reason: Option<Reason>,
}

/// What a verdict given in (or below) one of kproxy's check chains means: `cluster-ips-check`
/// refuses a Service's address on another port (through the reject chain) and drops an
/// address of the service CIDRs that no Service holds.
fn chain_reason(chain: &str, drop: bool) -> Option<Reason> {
    match chain {
        FIREWALL_CHECK => Some(Reason::SourceRange),
        CLUSTER_IPS_CHECK if drop => Some(Reason::UnallocatedClusterIp),
        CLUSTER_IPS_CHECK => Some(Reason::NoServicePort),
        _ => None,
    }
}

/// What an entry of a `no-endpoint-*` map means: a drop when only this node has none of the
/// Service's endpoints (a Local policy), a goto (to the reject chain) when there are none.
fn map_reason(map: &str, drop: bool) -> Option<Reason> {
    let ours = map == NO_ENDPOINT_SERVICES || map == NO_ENDPOINT_NODEPORTS;
    ours.then_some(if drop {
        Reason::NoLocalEndpoints
    } else {
        Reason::NoEndpoints
    })
}

pub fn trace(model: &Model, family: IpFamily, packet: &Packet, node: &NodeFacts) -> Trace {
    let mut w = Walk {
        model,
        node,
        family,
        dnats: Vec::new(),
        masquerade: false,
        matched: Vec::new(),
        via: None,
        reason: None,
    };
    let mut p = Pkt {
        src: packet.src,
        dst: packet.dst,
        proto: packet.protocol,
        dport: packet.dport,
        mark: 0,
        dnat: false,
    };
    let mut out = Trace::default();
    let (pre, nat) = match packet.origin {
        Origin::External => ("prerouting", "prerouting"),
        Origin::Local => ("output", "output"),
    };
    if let Some(v) = w.hook("filter", pre, true, &mut p) {
        out.verdict = Some(v);
        out.reason = w.reason;
        out.matched = w.matched;
        return out;
    }
    w.hook("nat", nat, false, &mut p);
    let paths: Vec<Pkt> = if w.dnats.is_empty() {
        vec![p]
    } else {
        w.dnats
            .iter()
            .map(|(ip, port, mark)| Pkt {
                dst: *ip,
                dport: *port,
                mark: *mark,
                dnat: true,
                ..p
            })
            .collect()
    };
    // Filter: the first path decides the verdict.
    let mut first = paths[0];
    let local_dst = node.local_ips.contains(&first.dst) || first.dst.is_loopback();
    let filter_hooks: &[&str] = match packet.origin {
        Origin::External if local_dst => &["input"],
        Origin::External => &["forward"],
        Origin::Local if local_dst => &["output", "input"],
        Origin::Local => &["output"],
    };
    for h in filter_hooks {
        if let Some(v) = w.hook("filter", h, false, &mut first) {
            out.verdict = Some(v);
            out.reason = w.reason;
            break;
        }
    }
    for mut path in paths {
        w.hook("nat", "postrouting", false, &mut path);
    }
    out.dnat = Vec::new();
    for (ip, port, _) in &w.dnats {
        let s = join_host_port(ip, *port);
        if !out.dnat.contains(&s) {
            out.dnat.push(s);
        }
    }
    out.masquerade = w.masquerade;
    out.matched = w.matched;
    out
}

impl Walk<'_> {
    /// Walk the base chains of one hook in priority order (`pre_dnat`: only the ones at
    /// `dstnat - 10`).
    fn hook(&mut self, kind: &str, hook: &str, pre_dnat: bool, p: &mut Pkt) -> Option<Verdict> {
        let mut chains: Vec<(&String, i32)> = self
            .model
            .chains
            .iter()
            .filter_map(|(n, c)| c.hook.map(|h| (n, h)))
            .filter(|(_, h)| {
                h.kind == kind
                    && h.hook == hook
                    && (h.priority == super::render::PRE_DNAT) == pre_dnat
            })
            .map(|(n, h)| (n, h.priority))
            .collect();
        chains.sort_by_key(|(n, prio)| (*prio, n.as_str()));
        for (name, _) in chains {
            if let Flow::Stop(v) = self.chain(name, p, 0) {
                if v.is_some() || kind == "nat" {
                    return v;
                }
            }
        }
        None
    }

    fn chain(&mut self, name: &str, p: &mut Pkt, depth: usize) -> Flow {
        let Some(chain) = self.model.chains.get(name) else {
            return Flow::Continue;
        };
        if depth > MAX_DEPTH {
            return Flow::Continue;
        }
        for rule in &chain.rules {
            let mut maybe = false;
            if !self.conds(rule, p, &mut maybe) {
                continue;
            }
            self.note(name, rule);
            let mut branch = *p;
            let flow = self.stmt(name, &rule.stmt, if maybe { &mut branch } else { p }, depth);
            if maybe {
                // The other outcome: the condition did not hold.
                continue;
            }
            if let Flow::Stop(v) = flow {
                return Flow::Stop(v);
            }
            if matches!(rule.stmt, Stmt::Goto(_)) || self.vmap_goto(rule, p) {
                return Flow::Continue;
            }
        }
        Flow::Continue
    }

    /// Whether a vmap rule's lookup found a goto (the caller then returns, as after a goto).
    fn vmap_goto(&self, rule: &Rule, p: &Pkt) -> bool {
        if let Stmt::Vmap { fields, map } = &rule.stmt {
            return self
                .keys(fields, p)
                .iter()
                .any(|k| matches!(self.lookup_data(map, k), Some(Some(Data::Goto(_)))));
        }
        false
    }

    fn note(&mut self, chain: &str, rule: &Rule) {
        let mut s = format!("{chain}: ");
        super::ast::Fmt(self.family).rule(rule, &mut s);
        self.matched.push(s);
    }

    fn conds(&self, rule: &Rule, p: &Pkt, maybe: &mut bool) -> bool {
        rule.matches.iter().all(|m| match m {
            Match::CtStateNew => true,
            Match::CtStatusDnat => p.dnat,
            Match::Lookup { fields, set, neg } => {
                let hit = self
                    .keys(fields, p)
                    .iter()
                    .any(|k| self.lookup_data(set, k).is_some());
                hit != *neg
            }
            Match::Saddr { cidr, neg } => cidr.contains(&p.src) != *neg,
            Match::Daddr { cidr, neg } => cidr.contains(&p.dst) != *neg,
            Match::Iif { .. } | Match::Foreign(_) => false,
            Match::FibLocal { src } => {
                let a = if *src { p.src } else { p.dst };
                a.is_loopback() || self.node.local_ips.contains(&a)
            }
            Match::MarkAny(m) => p.mark & m != 0,
            Match::L4proto(pr) => *pr == p.proto,
            Match::OneIn(n) => {
                if *n > 1 {
                    *maybe = true;
                }
                *n >= 1
            }
        })
    }

    /// Every key the fields can produce (random fields take every value).
    fn keys(&self, fields: &[Field], p: &Pkt) -> Vec<Vec<Value>> {
        let mut keys: Vec<Vec<Value>> = vec![Vec::new()];
        for f in fields {
            let vals: Vec<Value> = match f {
                Field::Saddr => vec![Value::Addr(p.src)],
                Field::Daddr => vec![Value::Addr(p.dst)],
                Field::L4proto => vec![Value::Proto(p.proto)],
                Field::Dport => vec![Value::Port(p.dport)],
                Field::Const(c) => vec![Value::Int(*c)],
                Field::Random(n) => (0..*n).map(Value::Int).collect(),
            };
            keys = keys
                .into_iter()
                .flat_map(|k| {
                    vals.iter().map(move |v| {
                        let mut k = k.clone();
                        k.push(*v);
                        k
                    })
                })
                .collect();
        }
        keys
    }

    /// `Some(data)` when `key` is in `set` (intervals: a CIDR component contains the value).
    fn lookup_data(&self, set: &str, key: &[Value]) -> Option<Option<Data>> {
        let s = self.model.sets.get(set)?;
        if let Some(d) = s.elements.get(key) {
            return Some(d.clone());
        }
        if !s.def.interval {
            return None;
        }
        s.elements.iter().find_map(|(k, d)| {
            let hit = k.len() == key.len()
                && k.iter().zip(key).all(|(e, v)| match (e, v) {
                    (Value::Cidr(c), Value::Addr(a)) => c.contains(a),
                    _ => e == v,
                });
            hit.then(|| d.clone())
        })
    }

    /// Walk `chain` from a jump, goto or map entry that gives its verdicts `why`.
    fn enter(&mut self, chain: &str, why: Option<Reason>, p: &mut Pkt, depth: usize) -> Flow {
        let outer = self.via;
        self.via = outer.or(why);
        let flow = self.chain(chain, p, depth + 1);
        self.via = outer;
        flow
    }

    /// A verdict given in `chain`.
    fn verdict(&mut self, chain: &str, v: Verdict) -> Flow {
        self.reason = self.via.or(chain_reason(chain, v == Verdict::Drop));
        Flow::Stop(Some(v))
    }

    fn stmt(&mut self, chain: &str, stmt: &Stmt, p: &mut Pkt, depth: usize) -> Flow {
        match stmt {
            Stmt::Jump(c) | Stmt::Goto(c) => self.enter(c, chain_reason(chain, false), p, depth),
            Stmt::Vmap { fields, map } => {
                for k in self.keys(fields, p) {
                    let hit = self.lookup_data(map, &k);
                    if let Some(Some(d)) = &hit {
                        // The map entry that decided, for people reading the trace.
                        let f = super::ast::Fmt(self.family);
                        let mut s = format!("  @{map}: ");
                        f.key(&k, &mut s);
                        s.push_str(" : ");
                        f.data(d, &mut s);
                        self.matched.push(s);
                    }
                    match hit {
                        Some(Some(Data::Goto(c))) => {
                            return self.enter(&c, map_reason(map, false), p, depth);
                        }
                        Some(Some(Data::Drop)) => {
                            self.reason = self.via.or(map_reason(map, true));
                            return Flow::Stop(Some(Verdict::Drop));
                        }
                        _ => {}
                    }
                }
                Flow::Continue
            }
            Stmt::Drop => self.verdict(chain, Verdict::Drop),
            Stmt::Reject | Stmt::RejectReset => self.verdict(chain, Verdict::Reject),
            Stmt::MarkOr(m) => {
                p.mark |= m;
                Flow::Continue
            }
            Stmt::ClearMarkMasquerade(m) => {
                p.mark ^= m;
                self.masquerade = true;
                Flow::Stop(None)
            }
            Stmt::Masquerade => {
                self.masquerade = true;
                Flow::Stop(None)
            }
            Stmt::Dnat(proto, ip, port) => {
                if *proto != p.proto {
                    return Flow::Continue;
                }
                self.dnats.push((*ip, *port, p.mark));
                Flow::Stop(None)
            }
            Stmt::DnatMap {
                protocol,
                fields,
                map,
            } => {
                if *protocol != p.proto {
                    return Flow::Continue;
                }
                let mut hit = false;
                for k in self.keys(fields, p) {
                    if let Some(Some(Data::Dnat(ip, port))) = self.lookup_data(map, &k) {
                        self.dnats.push((ip, port, p.mark));
                        hit = true;
                    }
                }
                if hit {
                    Flow::Stop(None)
                } else {
                    Flow::Continue
                }
            }
            Stmt::Update { .. } => Flow::Continue,
        }
    }
}
