//! Applying transactions: [`Kernel`] pipes them to `nft -f -`; [`Fake`] applies them to an
//! in-memory [`Model`] with the kernel's all-or-nothing semantics and the same errors for the
//! mistakes that matter: dangling or busy chains and sets, conflicting or missing elements,
//! elements that do not fit their set's type, and overlapping intervals. A differential test
//! (`tests/privileged/test_nft_differential.py`) holds it to what the kernel does.

use super::ast::{Data, Fmt, Hook, Key, Op, Rule, SetDef, SetSpec, Stmt, Value, TABLE};
use super::render::AFFINITY;
use crate::error::{Error, Result};
use crate::exec;
use crate::model::{Cidr, IpFamily};
use std::collections::BTreeMap;

pub trait Backend: Send {
    /// Apply one transaction atomically; the bytes of `nft -f` input it took.
    fn apply(&mut self, ops: &[Op]) -> Result<usize>;
    /// The affinity entries (client . id) and their seconds left; empty without a table.
    fn affinity(&mut self) -> Result<Vec<(Key, u32)>>;
    /// Whether our table and its `services` chain exist (nobody flushed them).
    fn intact(&mut self) -> Result<bool>;
    /// The table as text (the kernel's `nft list table`, or the model's listing).
    fn dump(&mut self) -> Result<String>;
    /// The in-memory table, for backends that have one.
    fn model(&self) -> Option<&Model>;
}

pub struct Kernel {
    family: IpFamily,
}

impl Kernel {
    pub fn new(family: IpFamily) -> Kernel {
        Kernel { family }
    }

    fn fam(&self) -> &'static str {
        super::ast::family_word(self.family)
    }
}

impl Backend for Kernel {
    fn apply(&mut self, ops: &[Op]) -> Result<usize> {
        if super::netlink::supports(ops) {
            return super::netlink::apply(self.family, TABLE, ops);
        }
        let script = Fmt(self.family).script(ops);
        exec::check(
            "nft -f",
            exec::run("nft -f", "nft", &["-f", "-"], Some(&script))?,
        )?;
        Ok(script.len())
    }

    fn affinity(&mut self) -> Result<Vec<(Key, u32)>> {
        let out = exec::run(
            "nft list set",
            "nft",
            &["-j", "list", "set", self.fam(), TABLE, AFFINITY],
            None,
        )?;
        if !out.status.success() {
            return Ok(Vec::new()); // no table yet
        }
        parse_affinity(&out.stdout)
    }

    fn intact(&mut self) -> Result<bool> {
        let out = exec::run(
            "nft list chain",
            "nft",
            &["list", "chain", self.fam(), TABLE, super::render::SERVICES],
            None,
        )?;
        Ok(out.status.success())
    }

    fn dump(&mut self) -> Result<String> {
        let out = exec::check(
            "nft list table",
            exec::run(
                "nft list table",
                "nft",
                &["list", "table", self.fam(), TABLE],
                None,
            )?,
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn model(&self) -> Option<&Model> {
        None
    }
}

/// Read kproxy's table in `family` from the kernel (an empty model when there is none).
pub fn read_kernel(family: IpFamily) -> Result<Model> {
    let fam = super::ast::family_word(family);
    let out = exec::run(
        "nft list table",
        "nft",
        &["-j", "list", "table", fam, TABLE],
        None,
    )?;
    if !out.status.success() {
        return Ok(Model::default());
    }
    super::json::model_from_json(&out.stdout, family)
}

/// `nft -j list set` output -> (client . id, seconds left).
fn parse_affinity(json: &[u8]) -> Result<Vec<(Key, u32)>> {
    let bad = |what: &str| Error::InvalidInput(format!("nft -j list set affinity: {what}"));
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| bad(&e.to_string()))?;
    let mut out = Vec::new();
    let items = v["nftables"]
        .as_array()
        .ok_or_else(|| bad("no nftables array"))?;
    for item in items {
        let Some(elems) = item["set"]["elem"].as_array() else {
            continue;
        };
        for e in elems {
            let e = &e["elem"];
            let concat = e["val"]["concat"]
                .as_array()
                .ok_or_else(|| bad("element"))?;
            let (Some(addr), Some(id)) = (
                concat
                    .first()
                    .and_then(|a| a.as_str())
                    .and_then(|a| a.parse().ok()),
                concat.get(1).and_then(serde_json::Value::as_u64),
            ) else {
                return Err(bad("element key"));
            };
            let left = e["expires"].as_u64().unwrap_or(0);
            if left > 0 {
                out.push((
                    vec![Value::Addr(addr), Value::Int(id as u32)],
                    left.min(u64::from(u32::MAX)) as u32,
                ));
            }
        }
    }
    Ok(out)
}

/// A chain of the in-memory table.
#[derive(Clone, Debug, PartialEq)]
pub struct Chain {
    pub hook: Option<Hook>,
    pub rules: Vec<Rule>,
}

/// A set or map of the in-memory table.
#[derive(Clone, Debug, PartialEq)]
pub struct Set {
    pub def: SetDef,
    pub elements: BTreeMap<Key, Option<Data>>,
}

/// One family's kproxy table.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Model {
    pub exists: bool,
    pub chains: BTreeMap<String, Chain>,
    pub sets: BTreeMap<String, Set>,
}

fn fail(what: String) -> Error {
    Error::Apply {
        op: "nft -f (fake)",
        code: Some(1),
        stderr: what,
    }
}

fn rule_targets(r: &Rule) -> Option<&str> {
    match &r.stmt {
        Stmt::Jump(c) | Stmt::Goto(c) => Some(c),
        _ => None,
    }
}

fn rule_sets(r: &Rule) -> Vec<&str> {
    let mut v: Vec<&str> = r
        .matches
        .iter()
        .filter_map(|m| match m {
            super::ast::Match::Lookup { set, .. } => Some(set.as_str()),
            _ => None,
        })
        .collect();
    match &r.stmt {
        Stmt::Vmap { map, .. } | Stmt::DnatMap { map, .. } => v.push(map),
        Stmt::Update { set, .. } => v.push(set),
        _ => {}
    }
    v
}

/// One component a set's key expects.
#[derive(Clone, Copy, PartialEq)]
enum Slot {
    Addr,
    Proto,
    Port,
    Int,
}

/// The key components and data of a set of `spec`; data: None (a set), Some(true) a verdict,
/// Some(false) an `address . port` DNAT target.
fn shape(spec: SetSpec) -> (&'static [Slot], Option<bool>) {
    use Slot::*;
    match spec {
        SetSpec::Addr => (&[Addr], None),
        SetSpec::AddrProtoPort => (&[Addr, Proto, Port], None),
        SetSpec::AddrProtoPortSaddr => (&[Addr, Proto, Port, Addr], None),
        SetSpec::AddrAddrProtoPort => (&[Addr, Addr, Proto, Port], None),
        SetSpec::AddrProtoPortVerdict => (&[Addr, Proto, Port], Some(true)),
        SetSpec::ProtoPortVerdict => (&[Proto, Port], Some(true)),
        SetSpec::SaddrId => (&[Addr, Int], None),
        SetSpec::AddrProtoPortIndexDnat => (&[Addr, Proto, Port, Int], Some(false)),
        SetSpec::ProtoPortIndexDnat => (&[Proto, Port, Int], Some(false)),
    }
}

/// Why `key : data` cannot be an element of `def` in a `family` table (nft refuses it, or the
/// kernel does for the bytes of the wrong length that netlink would send).
fn misfit(def: &SetDef, family: IpFamily, key: &Key, data: Option<&Data>) -> Option<String> {
    let (slots, want) = shape(def.spec);
    if key.len() != slots.len() {
        return Some(format!(
            "key of {} components, set has {}",
            key.len(),
            slots.len()
        ));
    }
    for (v, slot) in key.iter().zip(slots) {
        let fits = match (v, slot) {
            (Value::Addr(a), Slot::Addr) => family.contains(a),
            (Value::Cidr(c), Slot::Addr) => def.interval && family.contains(&c.addr()),
            (Value::Proto(_), Slot::Proto) | (Value::Port(_), Slot::Port) => true,
            (Value::Int(_), Slot::Int) => true,
            _ => false,
        };
        if !fits {
            return Some(format!("{v:?} does not fit the set's type"));
        }
    }
    match (want, data) {
        (None, None) | (Some(true), Some(Data::Goto(_) | Data::Drop)) => None,
        (Some(false), Some(Data::Dnat(a, _))) if family.contains(a) => None,
        (None, Some(_)) => Some("data for an element of a set".into()),
        (Some(_), None) => Some("map element without data".into()),
        (Some(_), Some(d)) => Some(format!("{d:?} does not fit the map's type")),
    }
}

/// An interval set's key as it is stored: the kernel keeps a full-length prefix as its
/// address (and lists it so).
fn canonical(def: &SetDef, key: &Key) -> Key {
    if !def.interval {
        return key.clone();
    }
    key.iter()
        .map(|v| match v {
            Value::Cidr(c) if *c == Cidr::host(c.addr()) => Value::Addr(c.addr()),
            v => *v,
        })
        .collect()
}

/// Each component of an interval key as an inclusive range of integers.
fn spans(key: &[Value]) -> Vec<(u128, u128)> {
    key.iter()
        .map(|v| match v {
            Value::Addr(a) => Cidr::host(*a).range(),
            Value::Cidr(c) => c.range(),
            Value::Proto(p) => (u128::from(p.number()), u128::from(p.number())),
            Value::Port(p) => (u128::from(*p), u128::from(*p)),
            Value::Int(i) => (u128::from(*i), u128::from(*i)),
        })
        .collect()
}

/// The element of `set` that a new `key` runs into. A concatenated interval set (pipapo)
/// refuses one that holds the new element's first or last point (a new element that merely
/// surrounds an old one is accepted there); a single-field one (rbtree, where `nft` says
/// "conflicting intervals specified") refuses any overlap, nested either way. The same
/// element again is no conflict in either.
fn overlapping<'a>(set: &'a Set, key: &Key) -> Option<&'a Key> {
    let new = spans(key);
    let (start, end): (Vec<u128>, Vec<u128>) = new.iter().copied().unzip();
    let holds = |old: &[(u128, u128)], p: &[u128]| {
        old.iter().zip(p).all(|((lo, hi), x)| lo <= x && x <= hi)
    };
    let single = new.len() == 1;
    let hit = |k: &&Key| {
        let old = spans(k);
        let meets = if single {
            old[0].0 <= new[0].1 && new[0].0 <= old[0].1
        } else {
            holds(&old, &start) || holds(&old, &end)
        };
        old != new && meets
    };
    // Only elements whose first component can meet the new one's: kproxy's interval keys
    // start with an exact address, so this is one Service address's elements.
    let first = match key.first() {
        Some(Value::Addr(a)) => Some(*a),
        _ => None,
    };
    let by_first = first.map(|a| {
        set.elements
            .range(vec![Value::Addr(a)]..)
            .take_while(move |(k, _)| k.first() == Some(&Value::Addr(a)))
            .map(|(k, _)| k)
    });
    // Keys led by a prefix sort after every key led by an address (Value's variant order):
    // start at the smallest prefix rather than walking the address-led keys.
    let smallest = Cidr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0).expect("a prefix");
    let led_by_ranges = set
        .elements
        .range(vec![Value::Cidr(smallest)]..)
        .map(|(k, _)| k)
        .take_while(|k| matches!(k.first(), Some(Value::Cidr(_))));
    match by_first {
        Some(exact) => exact.chain(led_by_ranges).find(hit),
        None => set.elements.keys().find(hit),
    }
}

impl Model {
    fn chain_referenced(&self, name: &str) -> bool {
        self.chains
            .values()
            .flat_map(|c| c.rules.iter())
            .any(|r| rule_targets(r) == Some(name))
            || self.sets.values().any(|s| {
                s.elements
                    .values()
                    .any(|d| matches!(d, Some(Data::Goto(c)) if c == name))
            })
    }

    fn set_mut(&mut self, name: &str) -> Result<&mut Set> {
        self.sets
            .get_mut(name)
            .ok_or_else(|| fail(format!("no set {name}")))
    }

    fn apply_op(&mut self, family: IpFamily, op: &Op) -> Result<()> {
        if !self.exists && !matches!(op, Op::AddTable) {
            return Err(fail(format!("no table {TABLE} for {op:?}")));
        }
        match op {
            Op::AddTable => self.exists = true,
            Op::DeleteTable => *self = Model::default(),
            Op::AddChain(name, hook) => {
                self.chains.entry(name.clone()).or_insert(Chain {
                    hook: *hook,
                    rules: Vec::new(),
                });
            }
            Op::FlushChain(name) => {
                self.chains
                    .get_mut(name)
                    .ok_or_else(|| fail(format!("flush: no chain {name}")))?
                    .rules
                    .clear();
            }
            Op::DeleteChain(name) => {
                if !self.chains.contains_key(name) {
                    return Err(fail(format!("delete: no chain {name}")));
                }
                if self.chain_referenced(name) {
                    return Err(fail(format!("delete chain {name}: busy")));
                }
                self.chains.remove(name);
            }
            Op::AddRule(chain, rule) => {
                if let Some(t) = rule_targets(rule) {
                    if !self.chains.contains_key(t) {
                        return Err(fail(format!("rule in {chain}: no chain {t}")));
                    }
                }
                for s in rule_sets(rule) {
                    if !self.sets.contains_key(s) {
                        return Err(fail(format!("rule in {chain}: no set {s}")));
                    }
                }
                self.chains
                    .get_mut(chain)
                    .ok_or_else(|| fail(format!("add rule: no chain {chain}")))?
                    .rules
                    .push(rule.clone());
            }
            Op::AddSet(def) => match self.sets.get(&def.name) {
                Some(old) if old.def != *def => {
                    return Err(fail(format!(
                        "add set {}: exists with another type",
                        def.name
                    )))
                }
                Some(_) => {}
                None => {
                    self.sets.insert(
                        def.name.clone(),
                        Set {
                            def: def.clone(),
                            elements: BTreeMap::new(),
                        },
                    );
                }
            },
            Op::DeleteSet(name) => {
                let used = self
                    .chains
                    .values()
                    .flat_map(|c| c.rules.iter())
                    .any(|r| rule_sets(r).contains(&name.as_str()));
                if used {
                    return Err(fail(format!("delete set {name}: busy")));
                }
                self.sets
                    .remove(name)
                    .ok_or_else(|| fail(format!("delete: no set {name}")))?;
            }
            Op::AddElements(set, elems) => {
                for (_, d) in elems {
                    if let Some(Data::Goto(c)) = d {
                        if !self.chains.contains_key(c) {
                            return Err(fail(format!("element of {set}: no chain {c}")));
                        }
                    }
                }
                let s = self.set_mut(set)?;
                for (k, d) in elems {
                    if let Some(why) = misfit(&s.def, family, k, d.as_ref()) {
                        return Err(fail(format!("element of {set}: {why}")));
                    }
                    let k = canonical(&s.def, k);
                    match s.elements.get(&k) {
                        Some(old) if old != d => {
                            return Err(fail(format!("element of {set}: {k:?} exists")))
                        }
                        Some(_) => {}
                        None => {
                            if s.def.interval {
                                if let Some(old) = overlapping(s, &k) {
                                    return Err(fail(format!(
                                        "element of {set}: {k:?} overlaps {old:?} (File exists)"
                                    )));
                                }
                            }
                            s.elements.insert(k, d.clone());
                        }
                    }
                }
            }
            Op::AddTimedElements(set, elems) => {
                let s = self.set_mut(set)?;
                for (k, _) in elems {
                    if let Some(why) = misfit(&s.def, family, k, None) {
                        return Err(fail(format!("element of {set}: {why}")));
                    }
                    s.elements.insert(k.clone(), None);
                }
            }
            Op::DeleteElements(set, keys) => {
                let s = self.set_mut(set)?;
                for k in keys {
                    if s.elements.remove(&canonical(&s.def, k)).is_none() {
                        return Err(fail(format!("delete element of {set}: no {k:?}")));
                    }
                }
            }
        }
        Ok(())
    }

    /// One line per chain, rule, set and element, for comparing two tables (`kproxy diff`).
    pub fn lines(&self, family: IpFamily) -> Vec<String> {
        let f = Fmt(family);
        let mut out = Vec::new();
        if !self.exists {
            return out;
        }
        for (n, c) in &self.chains {
            match c.hook {
                Some(h) => out.push(format!(
                    "chain {n} {{ type {} hook {} priority {} }}",
                    h.kind, h.hook, h.priority
                )),
                None => out.push(format!("chain {n}")),
            }
            for (i, r) in c.rules.iter().enumerate() {
                let mut s = format!("rule {n} #{i}: ");
                f.rule(r, &mut s);
                out.push(s);
            }
        }
        for (n, s) in &self.sets {
            if n == AFFINITY {
                continue; // entries come and go with traffic
            }
            out.push(format!("set {n}"));
            for (k, d) in &s.elements {
                let mut line = format!("element {n}: ");
                f.key(k, &mut line);
                if let Some(d) = d {
                    line.push_str(" : ");
                    f.data(d, &mut line);
                }
                out.push(line);
            }
        }
        out
    }

    /// The table as an `nft -f` script that would recreate it (sorted, deterministic).
    pub fn listing(&self, family: IpFamily) -> String {
        if !self.exists {
            return String::new();
        }
        let mut ops = vec![Op::AddTable];
        for s in self.sets.values() {
            ops.push(Op::AddSet(s.def.clone()));
        }
        for (n, c) in &self.chains {
            ops.push(Op::AddChain(n.clone(), c.hook));
        }
        for (n, c) in &self.chains {
            for r in &c.rules {
                ops.push(Op::AddRule(n.clone(), r.clone()));
            }
        }
        for (n, s) in &self.sets {
            if !s.elements.is_empty() {
                ops.push(Op::AddElements(
                    n.clone(),
                    s.elements
                        .iter()
                        .map(|(k, d)| (k.clone(), d.clone()))
                        .collect(),
                ));
            }
        }
        Fmt(family).script(&ops)
    }
}

/// An in-memory kernel: a transaction applies completely or not at all.
#[derive(Debug)]
pub struct Fake {
    family: IpFamily,
    pub model: Model,
    /// Fail the next this many transactions (fault injection in tests).
    pub fail_next: usize,
    pub transactions: usize,
}

impl Fake {
    pub fn new(family: IpFamily) -> Fake {
        Fake {
            family,
            model: Model::default(),
            fail_next: 0,
            transactions: 0,
        }
    }
}

impl Backend for Fake {
    fn apply(&mut self, ops: &[Op]) -> Result<usize> {
        if self.fail_next > 0 {
            self.fail_next -= 1;
            return Err(fail("injected failure".into()));
        }
        let mut next = self.model.clone();
        for op in ops {
            next.apply_op(self.family, op)?;
        }
        self.model = next;
        self.transactions += 1;
        Ok(0)
    }

    fn affinity(&mut self) -> Result<Vec<(Key, u32)>> {
        Ok(self
            .model
            .sets
            .get(AFFINITY)
            .map(|s| s.elements.keys().map(|k| (k.clone(), 60)).collect())
            .unwrap_or_default())
    }

    fn intact(&mut self) -> Result<bool> {
        Ok(self.model.exists && self.model.chains.contains_key(super::render::SERVICES))
    }

    fn dump(&mut self) -> Result<String> {
        Ok(self.model.listing(self.family))
    }

    fn model(&self) -> Option<&Model> {
        Some(&self.model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fw() -> SetDef {
        SetDef {
            name: "fw".into(),
            spec: SetSpec::AddrProtoPortSaddr,
            interval: true,
            dynamic_size: None,
        }
    }

    fn el(src: &str) -> (Key, Option<Data>) {
        let v = if src.contains('/') {
            Value::Cidr(src.parse().unwrap())
        } else {
            Value::Addr(src.parse().unwrap())
        };
        let key = vec![
            Value::Addr("1.2.3.4".parse().unwrap()),
            Value::Proto(crate::model::Protocol::Tcp),
            Value::Port(80),
            v,
        ];
        (key, None)
    }

    /// Adds each batch of elements in turn, one transaction each, to a table holding only
    /// `def`; whether each went in.
    fn adds(def: SetDef, batches: Vec<Vec<(Key, Option<Data>)>>) -> Vec<bool> {
        let mut fake = Fake::new(IpFamily::V4);
        let name = def.name.clone();
        fake.apply(&[Op::AddTable, Op::AddSet(def)]).unwrap();
        batches
            .into_iter()
            .map(|elems| fake.apply(&[Op::AddElements(name.clone(), elems)]).is_ok())
            .collect()
    }

    /// [`adds`] to the `fw` set (address . protocol . port . source range).
    fn run(txs: &[&[&str]]) -> Vec<bool> {
        adds(
            fw(),
            txs.iter()
                .map(|tx| tx.iter().map(|s| el(s)).collect())
                .collect(),
        )
    }

    // Each case was checked against the kernel (6.18, `nft add element`); the differential
    // test keeps checking it.
    #[test]
    fn interval_elements_that_meet_are_refused_as_the_kernel_does() {
        // A range holding an earlier one's start or end: refused.
        assert_eq!(run(&[&["0.0.0.0/0"], &["1.2.3.4/32"]]), [true, false]);
        assert_eq!(run(&[&["10.0.0.0/8", "10.1.0.0/16"]]), [false]);
        // A range around an earlier one (neither end inside it): accepted, as pipapo does.
        assert_eq!(run(&[&["1.2.3.4/32"], &["0.0.0.0/0"]]), [true, true]);
        // The same element again, in one command or two; and adjacent ranges.
        assert_eq!(
            run(&[&["10.0.0.0/8", "10.0.0.0/8"], &["10.0.0.0/8"]]),
            [true, true]
        );
        assert_eq!(run(&[&["10.0.0.0/24", "10.0.1.0/24"]]), [true]);
        // A host prefix is the address: the same element.
        assert_eq!(run(&[&["9.9.9.9/32"], &["9.9.9.9"]]), [true, true]);
    }

    // Checked against the kernel (6.18, nft 1.0.6): a single-field interval set refuses
    // nesting both ways, within one command or across transactions.
    #[test]
    fn single_field_interval_sets_refuse_any_overlap() {
        let run = |batches: &[&[&str]]| -> Vec<bool> {
            let def = SetDef {
                name: "cidrs".into(),
                spec: SetSpec::Addr,
                interval: true,
                dynamic_size: None,
            };
            let cidr = |c: &&str| (vec![Value::Cidr(c.parse().unwrap())], None);
            adds(
                def,
                batches
                    .iter()
                    .map(|b| b.iter().map(cidr).collect())
                    .collect(),
            )
        };
        assert_eq!(run(&[&["10.96.0.0/12"], &["10.97.0.0/16"]]), [true, false]);
        assert_eq!(run(&[&["10.97.0.0/16"], &["10.96.0.0/12"]]), [true, false]);
        assert_eq!(run(&[&["10.97.0.0/16", "10.96.0.0/12"]]), [false]);
        assert_eq!(run(&[&["10.96.0.0/12"], &["10.96.0.1/32"]]), [true, false]);
        assert_eq!(
            run(&[&["10.96.0.0/12", "10.96.0.0/12"], &["10.96.0.0/12"]]),
            [true, true]
        );
        assert_eq!(run(&[&["10.96.0.0/16", "10.97.0.0/16"]]), [true]);
    }

    #[test]
    fn a_deleted_interval_frees_its_range_within_the_transaction() {
        let mut fake = Fake::new(IpFamily::V4);
        fake.apply(&[Op::AddTable, Op::AddSet(fw())]).unwrap();
        fake.apply(&[Op::AddElements("fw".into(), vec![el("0.0.0.0/0")])])
            .unwrap();
        let (k, _) = el("0.0.0.0/0");
        fake.apply(&[
            Op::DeleteElements("fw".into(), vec![k]),
            Op::AddElements("fw".into(), vec![el("10.0.0.0/8"), el("1.2.3.4/32")]),
        ])
        .unwrap();
        // A /32 deleted by its prefix spelling.
        let (k, _) = el("1.2.3.4/32");
        fake.apply(&[Op::DeleteElements("fw".into(), vec![k])])
            .unwrap();
        assert_eq!(fake.model.sets["fw"].elements.len(), 1);
    }

    #[test]
    fn elements_must_fit_the_set_type() {
        let mut fake = Fake::new(IpFamily::V4);
        let plain = SetDef {
            name: "ips".into(),
            spec: SetSpec::Addr,
            interval: false,
            dynamic_size: None,
        };
        let vmap = SetDef {
            name: "vm".into(),
            spec: SetSpec::ProtoPortVerdict,
            interval: false,
            dynamic_size: None,
        };
        fake.apply(&[Op::AddTable, Op::AddSet(plain.clone()), Op::AddSet(vmap)])
            .unwrap();
        let addr = |s: &str| Value::Addr(s.parse().unwrap());
        let tcp = Value::Proto(crate::model::Protocol::Tcp);
        let bad: Vec<(&str, Key, Option<Data>)> = vec![
            ("ips", vec![addr("fd00::1")], None),
            (
                "ips",
                vec![Value::Cidr("10.0.0.0/8".parse().unwrap())],
                None,
            ),
            ("ips", vec![addr("10.0.0.1"), Value::Port(1)], None),
            ("ips", vec![addr("10.0.0.1")], Some(Data::Drop)),
            ("vm", vec![tcp, Value::Port(80)], None),
            (
                "vm",
                vec![tcp, Value::Port(80)],
                Some(Data::Dnat(addr_of("10.0.0.1"), 1)),
            ),
        ];
        for (set, key, data) in bad {
            let op = Op::AddElements(set.into(), vec![(key.clone(), data.clone())]);
            assert!(fake.apply(&[op]).is_err(), "{set} {key:?} {data:?}");
        }
        let other = SetDef {
            interval: true,
            ..plain
        };
        assert!(fake.apply(&[Op::AddSet(other)]).is_err());
        assert!(fake
            .apply(&[Op::AddElements(
                "vm".into(),
                vec![(vec![tcp, Value::Port(80)], Some(Data::Drop))]
            )])
            .is_ok());
    }

    fn addr_of(s: &str) -> std::net::IpAddr {
        s.parse().unwrap()
    }

    /// `nft -j list set ip kproxy affinity` with two entries (testdata/README.md).
    #[test]
    fn the_kernels_affinity_listing_gives_each_client_and_the_seconds_left() {
        let got = parse_affinity(include_bytes!("testdata/affinity.json")).unwrap();
        assert_eq!(
            got,
            [
                (vec![Value::Addr(addr_of("10.0.0.6")), Value::Int(7)], 119),
                (
                    vec![Value::Addr(addr_of("10.0.0.5")), Value::Int(4043352603)],
                    59
                ),
            ]
        );
        // No set listed (no table yet): nothing to carry over.
        assert_eq!(parse_affinity(br#"{"nftables": []}"#).unwrap(), []);
    }

    #[test]
    fn a_malformed_affinity_listing_is_refused() {
        for (json, want) in [
            (&b"["[..], "nft -j list set affinity: "),
            (br#"{"nft": []}"#, "no nftables array"),
            (
                br#"{"nftables": [{"set": {"elem": [{"elem": {"val": "10.0.0.5"}}]}}]}"#,
                "element",
            ),
            (
                br#"{"nftables": [{"set": {"elem": [{"elem": {"val": {"concat": ["x", 1]}}}]}}]}"#,
                "element key",
            ),
        ] {
            match parse_affinity(json) {
                Err(Error::InvalidInput(m)) => assert!(m.contains(want), "{m:?} lacks {want:?}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_models_lines_leave_out_affinity_entries() {
        let mut fake = Fake::new(IpFamily::V4);
        let affinity = SetDef {
            name: AFFINITY.into(),
            spec: SetSpec::SaddrId,
            interval: false,
            dynamic_size: Some(16),
        };
        fake.apply(&[
            Op::AddTable,
            Op::AddSet(fw()),
            Op::AddSet(affinity),
            Op::AddChain("c".into(), None),
            Op::AddRule("c".into(), Rule::always(Stmt::Drop)),
            Op::AddElements("fw".into(), vec![el("0.0.0.0/0")]),
            Op::AddTimedElements(
                AFFINITY.into(),
                vec![(vec![Value::Addr(addr_of("10.0.0.5")), Value::Int(1)], 60)],
            ),
        ])
        .unwrap();
        assert_eq!(
            fake.model.lines(IpFamily::V4),
            [
                "chain c",
                "rule c #0: drop",
                "set fw",
                "element fw: 1.2.3.4 . tcp . 80 . 0.0.0.0/0"
            ]
        );
        assert!(fake.dump().unwrap().contains("10.0.0.5 . 1"));
    }
}
