//! Applying transactions: [`Kernel`] pipes them to `nft -f -`; [`Fake`] applies them to an
//! in-memory [`Model`] with the kernel's all-or-nothing semantics and the same errors for the
//! mistakes that matter (dangling or busy chains, conflicting or missing elements).

use super::ast::{Data, Fmt, Hook, Key, Op, Rule, SetDef, Stmt, Value, TABLE};
use super::render::AFFINITY;
use crate::error::{Error, Result};
use crate::exec;
use crate::model::IpFamily;
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

    fn apply_op(&mut self, op: &Op) -> Result<()> {
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
            Op::AddSet(def) => {
                self.sets.entry(def.name.clone()).or_insert(Set {
                    def: def.clone(),
                    elements: BTreeMap::new(),
                });
            }
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
                    match s.elements.get(k) {
                        Some(old) if old != d => {
                            return Err(fail(format!("element of {set}: {k:?} exists")))
                        }
                        _ => {
                            s.elements.insert(k.clone(), d.clone());
                        }
                    }
                }
            }
            Op::AddTimedElements(set, elems) => {
                let s = self.set_mut(set)?;
                for (k, _) in elems {
                    s.elements.insert(k.clone(), None);
                }
            }
            Op::DeleteElements(set, keys) => {
                let s = self.set_mut(set)?;
                for k in keys {
                    if s.elements.remove(k).is_none() {
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
            next.apply_op(op)?;
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
