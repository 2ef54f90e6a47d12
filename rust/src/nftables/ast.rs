//! The nftables objects kproxy writes, as values: rules, set elements and transaction
//! operations. One structure serves three readers: [`fmt`] writes `nft -f` syntax for the
//! kernel, the [`super::backend::Fake`] applies operations to an in-memory table, and the
//! [`super::trace`] tracer interprets rules.
//!
//! Everything printed here comes from validated model values (addresses, ports, DNS-label
//! names) or from kproxy's own constants; nothing is pasted from user input.

use crate::model::{Cidr, IpFamily, Protocol};
use serde::Deserialize;
use std::fmt::{self, Write};
use std::net::IpAddr;

/// A packet field in a lookup key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Field {
    Saddr,
    Daddr,
    L4proto,
    Dport,
    /// `numgen inc mod 1 offset <id>`: a 32-bit constant. nft accepts no literal constants
    /// inside a concatenated key; this expression always evaluates to `id`.
    Const(u32),
    /// `numgen random mod <n>`: 0..n, uniformly.
    Random(u32),
}

/// One component of a set element's key (as JSON in [`super::replay`]: `{"addr": "10.0.0.1"}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Value {
    Addr(IpAddr),
    /// Only in sets with `flags interval`.
    Cidr(Cidr),
    Proto(Protocol),
    Port(u16),
    Int(u32),
}

/// A concatenated key.
pub type Key = Vec<Value>;

/// A map element's data (as JSON: `{"goto": "chain"}`, `"drop"`, `{"dnat": ["10.0.0.1", 80]}`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Data {
    Goto(String),
    Drop,
    /// DNAT target `address . port` (in endpoint maps).
    Dnat(IpAddr, u16),
}

/// A rule's conditions (all must hold).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match {
    CtStateNew,
    CtStatusDnat,
    /// `<fields> [!=] @set`.
    Lookup {
        fields: Vec<Field>,
        set: String,
        neg: bool,
    },
    Saddr {
        cidr: Cidr,
        neg: bool,
    },
    Daddr {
        cidr: Cidr,
        neg: bool,
    },
    /// `iifname [!=] "name"`; a name ending in `+` is a prefix (written `name*`).
    Iif {
        name: String,
        neg: bool,
    },
    /// `fib saddr type local` (`src`) or `fib daddr type local`.
    FibLocal {
        src: bool,
    },
    /// `meta mark & m != 0`.
    MarkAny(u32),
    L4proto(Protocol),
    /// `numgen random mod n 0`: holds with probability 1/n.
    OneIn(u32),
    /// A rule read back from the kernel that kproxy did not write (its nft JSON): never
    /// holds in the tracer.
    Foreign(String),
}

/// What a rule does when it matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stmt {
    Jump(String),
    Goto(String),
    /// `<fields> vmap @map`.
    Vmap {
        fields: Vec<Field>,
        map: String,
    },
    Drop,
    Reject,
    /// `reject with tcp reset` (after a `meta l4proto tcp` match).
    RejectReset,
    /// `meta mark set meta mark | m` (non-terminal).
    MarkOr(u32),
    /// `meta mark set meta mark ^ m masquerade fully-random`: clear the bit, then SNAT.
    ClearMarkMasquerade(u32),
    Masquerade,
    /// `meta l4proto <p> dnat to <ip>:<port>`.
    Dnat(Protocol, IpAddr, u16),
    /// `meta l4proto <p> dnat <fam> to <fields> map @map`.
    DnatMap {
        protocol: Protocol,
        fields: Vec<Field>,
        map: String,
    },
    /// `update @set { <fields> timeout <t>s }` (non-terminal).
    Update {
        fields: Vec<Field>,
        set: String,
        timeout: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub stmt: Stmt,
}

impl Rule {
    pub fn new(matches: Vec<Match>, stmt: Stmt) -> Rule {
        Rule { matches, stmt }
    }

    pub fn always(stmt: Stmt) -> Rule {
        Rule::new(Vec::new(), stmt)
    }
}

/// A base chain's hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Hook {
    /// `filter` or `nat`.
    pub kind: &'static str,
    /// `prerouting`, `input`, `forward`, `output`, `postrouting`.
    pub hook: &'static str,
    /// Priority (nft's names are not accepted in every hook: dstnat is -100, filter 0,
    /// srcnat 100).
    pub priority: i32,
}

/// A set or map declaration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetDef {
    pub name: String,
    /// What follows `type`/`typeof`, for `family`.
    pub spec: SetSpec,
    pub interval: bool,
    /// `flags dynamic,timeout` with this many elements at most.
    pub dynamic_size: Option<u32>,
}

/// Key (and data) shapes of the sets kproxy declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum SetSpec {
    /// address
    Addr,
    /// address . protocol . port
    AddrProtoPort,
    /// address . protocol . port . source address (interval)
    AddrProtoPortSaddr,
    /// address . address . protocol . port
    AddrAddrProtoPort,
    /// address . protocol . port : verdict
    AddrProtoPortVerdict,
    /// protocol . port : verdict
    ProtoPortVerdict,
    /// client . id (affinity)
    SaddrId,
    /// destination . protocol . port . index : address . port
    AddrProtoPortIndexDnat,
    /// protocol . port . index : address . port
    ProtoPortIndexDnat,
}

impl SetSpec {
    pub fn is_map(self) -> bool {
        matches!(
            self,
            SetSpec::AddrProtoPortVerdict
                | SetSpec::ProtoPortVerdict
                | SetSpec::AddrProtoPortIndexDnat
                | SetSpec::ProtoPortIndexDnat
        )
    }
}

/// One operation of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `add table` (idempotent).
    AddTable,
    /// `delete table` (the table must exist: precede with [`Op::AddTable`]).
    DeleteTable,
    AddChain(String, Option<Hook>),
    FlushChain(String),
    DeleteChain(String),
    AddRule(String, Rule),
    AddSet(SetDef),
    DeleteSet(String),
    AddElements(String, Vec<(Key, Option<Data>)>),
    DeleteElements(String, Vec<Key>),
    /// Elements with their own timeout in seconds (affinity entries carried over).
    AddTimedElements(String, Vec<(Key, u32)>),
}

/// The table kproxy owns in each family.
pub const TABLE: &str = "kproxy";

pub fn family_word(f: IpFamily) -> &'static str {
    match f {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

fn addr_type(f: IpFamily) -> &'static str {
    match f {
        IpFamily::V4 => "ipv4_addr",
        IpFamily::V6 => "ipv6_addr",
    }
}

/// Formats objects for one family.
#[derive(Clone, Copy, Debug)]
pub struct Fmt(pub IpFamily);

impl Fmt {
    fn fam(self) -> &'static str {
        family_word(self.0)
    }

    pub fn field(self, f: &Field, out: &mut String) {
        let fam = self.fam();
        let _ = match f {
            Field::Saddr => write!(out, "{fam} saddr"),
            Field::Daddr => write!(out, "{fam} daddr"),
            Field::L4proto => write!(out, "meta l4proto"),
            Field::Dport => write!(out, "th dport"),
            Field::Const(id) => write!(out, "numgen inc mod 1 offset {id}"),
            Field::Random(n) => write!(out, "numgen random mod {n}"),
        };
    }

    fn fields(self, fs: &[Field], out: &mut String) {
        for (i, f) in fs.iter().enumerate() {
            if i > 0 {
                out.push_str(" . ");
            }
            self.field(f, out);
        }
    }

    pub fn value(self, v: &Value, out: &mut String) {
        let _ = match v {
            Value::Addr(a) => write!(out, "{a}"),
            Value::Cidr(c) => write!(out, "{c}"),
            Value::Proto(p) => write!(out, "{}", p.lower()),
            Value::Port(p) => write!(out, "{p}"),
            Value::Int(i) => write!(out, "{i}"),
        };
    }

    pub fn key(self, k: &[Value], out: &mut String) {
        for (i, v) in k.iter().enumerate() {
            if i > 0 {
                out.push_str(" . ");
            }
            self.value(v, out);
        }
    }

    pub fn data(self, d: &Data, out: &mut String) {
        let _ = match d {
            Data::Goto(c) => write!(out, "goto {c}"),
            Data::Drop => write!(out, "drop"),
            Data::Dnat(a, p) => write!(out, "{a} . {p}"),
        };
    }

    pub fn rule(self, r: &Rule, out: &mut String) {
        let fam = self.fam();
        for m in &r.matches {
            let _ = match m {
                Match::CtStateNew => write!(out, "ct state new "),
                Match::CtStatusDnat => write!(out, "ct status dnat "),
                Match::Lookup { fields, set, neg } => {
                    self.fields(fields, out);
                    write!(out, " {}@{set} ", if *neg { "!= " } else { "" })
                }
                Match::Saddr { cidr, neg } => {
                    write!(out, "{fam} saddr {}{cidr} ", if *neg { "!= " } else { "" })
                }
                Match::Daddr { cidr, neg } => {
                    write!(out, "{fam} daddr {}{cidr} ", if *neg { "!= " } else { "" })
                }
                Match::Iif { name, neg } => {
                    let n = match name.strip_suffix('+') {
                        Some(p) => format!("{p}*"),
                        None => name.clone(),
                    };
                    write!(out, "iifname {}\"{n}\" ", if *neg { "!= " } else { "" })
                }
                Match::FibLocal { src } => {
                    write!(
                        out,
                        "fib {} type local ",
                        if *src { "saddr" } else { "daddr" }
                    )
                }
                Match::MarkAny(m) => write!(out, "meta mark & {m:#010x} != 0 "),
                Match::L4proto(p) => write!(out, "meta l4proto {} ", p.lower()),
                Match::OneIn(n) => write!(out, "numgen random mod {n} 0 "),
                Match::Foreign(json) => write!(out, "# not kproxy's: {json} "),
            };
        }
        let _ = match &r.stmt {
            Stmt::Jump(c) => write!(out, "jump {c}"),
            Stmt::Goto(c) => write!(out, "goto {c}"),
            Stmt::Vmap { fields, map } => {
                self.fields(fields, out);
                write!(out, " vmap @{map}")
            }
            Stmt::Drop => write!(out, "drop"),
            Stmt::Reject => write!(out, "reject"),
            Stmt::RejectReset => write!(out, "reject with tcp reset"),
            Stmt::MarkOr(m) => write!(out, "meta mark set meta mark | {m:#010x}"),
            Stmt::ClearMarkMasquerade(m) => write!(
                out,
                "meta mark set meta mark ^ {m:#010x} masquerade fully-random"
            ),
            Stmt::Masquerade => write!(out, "masquerade fully-random"),
            Stmt::Dnat(p, a, port) => match a {
                IpAddr::V4(_) => write!(out, "meta l4proto {} dnat to {a}:{port}", p.lower()),
                IpAddr::V6(_) => write!(out, "meta l4proto {} dnat to [{a}]:{port}", p.lower()),
            },
            Stmt::DnatMap {
                protocol,
                fields,
                map,
            } => {
                let _ = write!(out, "meta l4proto {} dnat {fam} to ", protocol.lower());
                self.fields(fields, out);
                write!(out, " map @{map}")
            }
            Stmt::Update {
                fields,
                set,
                timeout,
            } => {
                let _ = write!(out, "update @{set} {{ ");
                self.fields(fields, out);
                write!(out, " timeout {timeout}s }}")
            }
        };
    }

    fn set_body(self, d: &SetDef, out: &mut String) {
        let a = addr_type(self.0);
        let fam = self.fam();
        let _ = match d.spec {
            SetSpec::Addr => write!(out, "type {a} ;"),
            SetSpec::AddrProtoPort => write!(out, "type {a} . inet_proto . inet_service ;"),
            SetSpec::AddrProtoPortSaddr => {
                write!(out, "type {a} . inet_proto . inet_service . {a} ;")
            }
            SetSpec::AddrAddrProtoPort => {
                write!(out, "type {a} . {a} . inet_proto . inet_service ;")
            }
            SetSpec::AddrProtoPortVerdict => {
                write!(out, "type {a} . inet_proto . inet_service : verdict ;")
            }
            SetSpec::ProtoPortVerdict => write!(out, "type inet_proto . inet_service : verdict ;"),
            SetSpec::SaddrId => write!(out, "typeof {fam} saddr . numgen inc mod 1 ;"),
            SetSpec::AddrProtoPortIndexDnat => write!(
                out,
                "typeof {fam} daddr . meta l4proto . th dport . numgen random mod 1 : {fam} daddr . th dport ;"
            ),
            SetSpec::ProtoPortIndexDnat => write!(
                out,
                "typeof meta l4proto . th dport . numgen random mod 1 : {fam} daddr . th dport ;"
            ),
        };
        if d.interval {
            out.push_str(" flags interval ;");
        }
        if let Some(size) = d.dynamic_size {
            let _ = write!(out, " flags dynamic,timeout ; size {size} ;");
        }
    }

    /// One operation as an `nft -f` line (with a newline).
    pub fn op(self, op: &Op, out: &mut String) {
        let t = format!("{} {TABLE}", self.fam());
        let _ = match op {
            Op::AddTable => writeln!(out, "add table {t}"),
            Op::DeleteTable => writeln!(out, "delete table {t}"),
            Op::AddChain(c, None) => writeln!(out, "add chain {t} {c}"),
            Op::AddChain(c, Some(h)) => writeln!(
                out,
                "add chain {t} {c} {{ type {} hook {} priority {} ; }}",
                h.kind, h.hook, h.priority
            ),
            Op::FlushChain(c) => writeln!(out, "flush chain {t} {c}"),
            Op::DeleteChain(c) => writeln!(out, "delete chain {t} {c}"),
            Op::AddRule(c, r) => {
                let _ = write!(out, "add rule {t} {c} ");
                self.rule(r, out);
                writeln!(out)
            }
            Op::AddSet(d) => {
                let kw = if d.spec.is_map() { "map" } else { "set" };
                let _ = write!(out, "add {kw} {t} {} {{ ", d.name);
                self.set_body(d, out);
                writeln!(out, " }}")
            }
            Op::DeleteSet(s) => writeln!(out, "delete set {t} {s}"),
            Op::AddElements(s, elems) => {
                let _ = write!(out, "add element {t} {s} {{ ");
                for (i, (k, d)) in elems.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    self.key(k, out);
                    if let Some(d) = d {
                        out.push_str(" : ");
                        self.data(d, out);
                    }
                }
                writeln!(out, " }}")
            }
            Op::AddTimedElements(s, elems) => {
                let _ = write!(out, "add element {t} {s} {{ ");
                for (i, (k, secs)) in elems.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    self.key(k, out);
                    let _ = write!(out, " timeout {secs}s");
                }
                writeln!(out, " }}")
            }
            Op::DeleteElements(s, keys) => {
                let _ = write!(out, "delete element {t} {s} {{ ");
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    self.key(k, out);
                }
                writeln!(out, " }}")
            }
        };
    }

    /// A transaction as `nft -f` input.
    pub fn script(self, ops: &[Op]) -> String {
        let mut out = String::with_capacity(ops.len() * 64);
        for op in ops {
            self.op(op, &mut out);
        }
        out
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        Fmt(IpFamily::V4).field(self, &mut s);
        f.write_str(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::IpFamily::{V4, V6};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rule_text(family: IpFamily, r: &Rule) -> String {
        let mut s = String::new();
        Fmt(family).rule(r, &mut s);
        s
    }

    fn op_text(family: IpFamily, op: Op) -> String {
        Fmt(family).script(&[op])
    }

    #[test]
    fn every_match_prints_as_nft_reads_it() {
        let cidr = "10.0.0.0/8".parse().unwrap();
        let cases: Vec<(Match, &str)> = vec![
            (Match::CtStateNew, "ct state new"),
            (Match::CtStatusDnat, "ct status dnat"),
            (
                Match::Lookup {
                    fields: vec![Field::Daddr, Field::L4proto, Field::Dport],
                    set: "firewall-ips".into(),
                    neg: false,
                },
                "ip daddr . meta l4proto . th dport @firewall-ips",
            ),
            (
                Match::Lookup {
                    fields: vec![Field::Saddr],
                    set: "s".into(),
                    neg: true,
                },
                "ip saddr != @s",
            ),
            (Match::Saddr { cidr, neg: false }, "ip saddr 10.0.0.0/8"),
            (Match::Daddr { cidr, neg: true }, "ip daddr != 10.0.0.0/8"),
            (
                Match::Iif {
                    name: "cbr0".into(),
                    neg: false,
                },
                "iifname \"cbr0\"",
            ),
            // iptables' prefix spelling becomes nft's wildcard.
            (
                Match::Iif {
                    name: "veth+".into(),
                    neg: true,
                },
                "iifname != \"veth*\"",
            ),
            (Match::FibLocal { src: true }, "fib saddr type local"),
            (Match::FibLocal { src: false }, "fib daddr type local"),
            (Match::MarkAny(0x4000), "meta mark & 0x00004000 != 0"),
            (Match::L4proto(Protocol::Sctp), "meta l4proto sctp"),
            (Match::OneIn(3), "numgen random mod 3 0"),
        ];
        for (m, want) in cases {
            assert_eq!(
                rule_text(V4, &Rule::new(vec![m.clone()], Stmt::Drop)),
                format!("{want} drop"),
                "{m:?}"
            );
        }
    }

    #[test]
    fn every_statement_prints_as_nft_reads_it() {
        let cases: Vec<(Stmt, &str)> = vec![
            (Stmt::Jump("services".into()), "jump services"),
            (Stmt::Goto("reject-chain".into()), "goto reject-chain"),
            (
                Stmt::Vmap {
                    fields: vec![Field::L4proto, Field::Dport],
                    map: "service-nodeports".into(),
                },
                "meta l4proto . th dport vmap @service-nodeports",
            ),
            (Stmt::Drop, "drop"),
            (Stmt::Reject, "reject"),
            (Stmt::RejectReset, "reject with tcp reset"),
            (Stmt::MarkOr(0x4000), "meta mark set meta mark | 0x00004000"),
            (
                Stmt::ClearMarkMasquerade(0x4000),
                "meta mark set meta mark ^ 0x00004000 masquerade fully-random",
            ),
            (Stmt::Masquerade, "masquerade fully-random"),
            (
                Stmt::Dnat(Protocol::Tcp, ip("10.1.0.1"), 8080),
                "meta l4proto tcp dnat to 10.1.0.1:8080",
            ),
            (
                Stmt::DnatMap {
                    protocol: Protocol::Udp,
                    fields: vec![Field::L4proto, Field::Dport, Field::Random(2)],
                    map: "nodeport-endpoints-2".into(),
                },
                "meta l4proto udp dnat ip to meta l4proto . th dport . numgen random mod 2 map @nodeport-endpoints-2",
            ),
            (
                Stmt::Update {
                    fields: vec![Field::Saddr, Field::Const(7)],
                    set: "affinity".into(),
                    timeout: 10800,
                },
                "update @affinity { ip saddr . numgen inc mod 1 offset 7 timeout 10800s }",
            ),
        ];
        for (s, want) in cases {
            assert_eq!(rule_text(V4, &Rule::always(s.clone())), want, "{s:?}");
        }
    }

    #[test]
    fn ipv6_rules_use_ip6_and_brackets() {
        let r = Rule::new(
            vec![Match::Saddr {
                cidr: "fd00:10::/64".parse().unwrap(),
                neg: true,
            }],
            Stmt::Dnat(Protocol::Udp, ip("fd00::1"), 53),
        );
        assert_eq!(
            rule_text(V6, &r),
            "ip6 saddr != fd00:10::/64 meta l4proto udp dnat to [fd00::1]:53"
        );
        let r = Rule::always(Stmt::DnatMap {
            protocol: Protocol::Tcp,
            fields: vec![Field::Daddr, Field::L4proto, Field::Dport, Field::Random(1)],
            map: "endpoints-1".into(),
        });
        assert_eq!(
            rule_text(V6, &r),
            "meta l4proto tcp dnat ip6 to ip6 daddr . meta l4proto . th dport . numgen random mod 1 map @endpoints-1"
        );
    }

    #[test]
    fn table_chain_and_set_operations() {
        let hook = Hook {
            kind: "nat",
            hook: "prerouting",
            priority: -100,
        };
        let set = |spec, interval, dynamic_size| SetDef {
            name: "s".into(),
            spec,
            interval,
            dynamic_size,
        };
        let cases: Vec<(IpFamily, Op, &str)> = vec![
            (V4, Op::AddTable, "add table ip kproxy"),
            (V6, Op::DeleteTable, "delete table ip6 kproxy"),
            (V4, Op::AddChain("services".into(), None), "add chain ip kproxy services"),
            (
                V4,
                Op::AddChain("nat-prerouting".into(), Some(hook)),
                "add chain ip kproxy nat-prerouting { type nat hook prerouting priority -100 ; }",
            ),
            (V4, Op::FlushChain("c".into()), "flush chain ip kproxy c"),
            (V4, Op::DeleteChain("c".into()), "delete chain ip kproxy c"),
            (
                V4,
                Op::AddRule("c".into(), Rule::always(Stmt::Drop)),
                "add rule ip kproxy c drop",
            ),
            (
                V4,
                Op::AddSet(set(SetSpec::Addr, false, None)),
                "add set ip kproxy s { type ipv4_addr ; }",
            ),
            (
                V6,
                Op::AddSet(set(SetSpec::AddrProtoPortSaddr, true, None)),
                "add set ip6 kproxy s { type ipv6_addr . inet_proto . inet_service . ipv6_addr ; flags interval ; }",
            ),
            (
                V4,
                Op::AddSet(set(SetSpec::AddrAddrProtoPort, false, None)),
                "add set ip kproxy s { type ipv4_addr . ipv4_addr . inet_proto . inet_service ; }",
            ),
            // Verdict and DNAT maps are `map`s.
            (
                V4,
                Op::AddSet(set(SetSpec::ProtoPortVerdict, false, None)),
                "add map ip kproxy s { type inet_proto . inet_service : verdict ; }",
            ),
            (
                V4,
                Op::AddSet(set(SetSpec::AddrProtoPortVerdict, false, None)),
                "add map ip kproxy s { type ipv4_addr . inet_proto . inet_service : verdict ; }",
            ),
            (
                V6,
                Op::AddSet(set(SetSpec::ProtoPortIndexDnat, false, None)),
                "add map ip6 kproxy s { typeof meta l4proto . th dport . numgen random mod 1 : ip6 daddr . th dport ; }",
            ),
            (
                V4,
                Op::AddSet(set(SetSpec::SaddrId, false, Some(1024))),
                "add set ip kproxy s { typeof ip saddr . numgen inc mod 1 ; flags dynamic,timeout ; size 1024 ; }",
            ),
            (V4, Op::DeleteSet("s".into()), "delete set ip kproxy s"),
        ];
        for (family, op, want) in cases {
            assert_eq!(op_text(family, op.clone()), format!("{want}\n"), "{op:?}");
        }
    }

    #[test]
    fn element_operations_list_keys_and_data() {
        let tcp = Value::Proto(Protocol::Tcp);
        let vip = vec![Value::Addr(ip("172.30.0.1")), tcp, Value::Port(80)];
        let add = Op::AddElements(
            "service-ips".into(),
            vec![
                (vip.clone(), Some(Data::Goto("endpoints-1".into()))),
                (
                    vec![Value::Addr(ip("172.30.0.2")), tcp, Value::Port(80)],
                    Some(Data::Drop),
                ),
            ],
        );
        assert_eq!(
            op_text(V4, add),
            "add element ip kproxy service-ips { 172.30.0.1 . tcp . 80 : goto endpoints-1, 172.30.0.2 . tcp . 80 : drop }\n"
        );
        let mut pool = vip.clone();
        pool.push(Value::Int(0));
        assert_eq!(
            op_text(
                V4,
                Op::AddElements(
                    "endpoints-1".into(),
                    vec![(pool, Some(Data::Dnat(ip("10.1.0.1"), 8080)))]
                )
            ),
            "add element ip kproxy endpoints-1 { 172.30.0.1 . tcp . 80 . 0 : 10.1.0.1 . 8080 }\n"
        );
        let mut range = vip.clone();
        range.push(Value::Cidr("0.0.0.0/0".parse().unwrap()));
        assert_eq!(
            op_text(
                V4,
                Op::AddElements("firewall-allow".into(), vec![(range, None)])
            ),
            "add element ip kproxy firewall-allow { 172.30.0.1 . tcp . 80 . 0.0.0.0/0 }\n"
        );
        assert_eq!(
            op_text(
                V4,
                Op::AddTimedElements(
                    "affinity".into(),
                    vec![
                        (vec![Value::Addr(ip("10.0.0.5")), Value::Int(9)], 42),
                        (vec![Value::Addr(ip("10.0.0.6")), Value::Int(9)], 1),
                    ]
                )
            ),
            "add element ip kproxy affinity { 10.0.0.5 . 9 timeout 42s, 10.0.0.6 . 9 timeout 1s }\n"
        );
        assert_eq!(
            op_text(
                V6,
                Op::DeleteElements(
                    "cluster-ips".into(),
                    vec![
                        vec![Value::Addr(ip("fd00::1"))],
                        vec![Value::Addr(ip("fd00::2"))]
                    ]
                )
            ),
            "delete element ip6 kproxy cluster-ips { fd00::1, fd00::2 }\n"
        );
    }

    #[test]
    fn a_script_is_one_line_per_operation() {
        let ops = [
            Op::AddTable,
            Op::AddChain("c".into(), None),
            Op::AddRule("c".into(), Rule::always(Stmt::Reject)),
        ];
        assert_eq!(
            Fmt(V4).script(&ops),
            "add table ip kproxy\nadd chain ip kproxy c\nadd rule ip kproxy c reject\n"
        );
        assert_eq!(Fmt(V4).script(&[]), "");
    }

    /// Values and data as the replay JSON spells them, and back to the text nft reads.
    #[test]
    fn values_and_data_round_trip_from_their_json_form() {
        let key: Key = serde_json::from_str(
            r#"[{"addr": "172.30.0.1"}, {"proto": "TCP"}, {"port": 80}, {"int": 3},
                {"cidr": "10.0.0.0/8"}]"#,
        )
        .unwrap();
        let mut s = String::new();
        Fmt(V4).key(&key, &mut s);
        assert_eq!(s, "172.30.0.1 . tcp . 80 . 3 . 10.0.0.0/8");
        let data: Vec<Data> =
            serde_json::from_str(r#"[{"goto": "c"}, "drop", {"dnat": ["fd00::1", 53]}]"#).unwrap();
        let text: Vec<String> = data
            .iter()
            .map(|d| {
                let mut s = String::new();
                Fmt(V6).data(d, &mut s);
                s
            })
            .collect();
        assert_eq!(text, ["goto c", "drop", "fd00::1 . 53"]);
        assert!(serde_json::from_str::<Value>(r#"{"port": 70000}"#).is_err());
        assert!(serde_json::from_str::<Value>(r#"{"addr": "not-an-ip"}"#).is_err());
    }

    #[test]
    fn fields_display_in_ipv4_form() {
        let shown: Vec<String> = [
            Field::Saddr,
            Field::Daddr,
            Field::L4proto,
            Field::Dport,
            Field::Const(5),
            Field::Random(4),
        ]
        .iter()
        .map(Field::to_string)
        .collect();
        assert_eq!(
            shown,
            [
                "ip saddr",
                "ip daddr",
                "meta l4proto",
                "th dport",
                "numgen inc mod 1 offset 5",
                "numgen random mod 4"
            ]
        );
    }
}
