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
