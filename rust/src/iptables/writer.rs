//! Incremental writing: what a sync must send, given what the previous syncs wrote.
//!
//! The writer remembers, per Service, the chains it owns and the rules it placed in shared
//! (dispatch) chains, and the content of every dispatch chain as last written. A partial sync
//! re-renders only the changed Services, moves their rules in the dispatch trie, and rewrites
//! only the chains whose content changed: a one-service change costs that Service's chains, one
//! leaf per shared chain it appears in, and ancestors only when a bucket appears or empties.
//! A full sync starts from nothing and writes everything, deleting chains of ours the kernel
//! holds but no longer wants.

use super::chains::{is_dynamic_chain, CANARY, FILTER_CHAINS, NAT_CHAINS};
use super::dispatch::{Dispatch, EntryId, Path, Root};
use super::render::{
    fixed_chains, render_service, root_tail, write_table, Counts, RenderConfig, Ruleset, Table,
};
use crate::model::ServiceKey;
use crate::state::State;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Default, Clone)]
struct Owned {
    chains: BTreeSet<String>,
    /// Rules in the Service's own chains.
    rules: usize,
    entries: Vec<((Root, Path), EntryId)>,
    counts: Counts,
}

/// What one sync sends: chains to (re)write per table and chains to delete.
///
/// Per-service chains (`own`, one nat table per Service) are kept apart from the shared
/// chains (roots, buckets, fixed chains): a large plan can then be applied in several
/// transactions, per-service chains first (nothing references a new one yet, and a rewritten
/// one keeps working), shared chains and deletions last.
#[derive(Debug, Default, Clone)]
pub struct Plan {
    /// Only ever holds the canary chain (declared by full syncs).
    pub mangle: Table,
    /// Chains that depend on no Service (masquerading, forwarding, canaries): written by full
    /// syncs, first, since per-service chains jump to `KUBE-MARK-MASQ`.
    pub fixed_filter: Table,
    pub fixed_nat: Table,
    pub filter: Table,
    /// Shared nat chains.
    pub nat: Table,
    /// Each changed Service's own nat chains.
    pub own: Vec<Table>,
    pub delete_filter: BTreeSet<String>,
    pub delete_nat: BTreeSet<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.mangle.chains.is_empty()
            && self.fixed_filter.chains.is_empty()
            && self.fixed_nat.chains.is_empty()
            && self.filter.chains.is_empty()
            && self.nat.chains.is_empty()
            && self.own.iter().all(|t| t.chains.is_empty())
            && self.delete_filter.is_empty()
            && self.delete_nat.is_empty()
    }

    pub fn rule_count(&self) -> usize {
        self.filter_rule_count() + self.nat_rule_count()
    }

    pub fn filter_rule_count(&self) -> usize {
        self.fixed_filter.rule_count + self.filter.rule_count
    }

    pub fn nat_rule_count(&self) -> usize {
        self.fixed_nat.rule_count
            + self.nat.rule_count
            + self.own.iter().map(|t| t.rule_count).sum::<usize>()
    }

    pub fn chains_written(&self) -> usize {
        self.mangle.chains.len()
            + self.fixed_filter.chains.len()
            + self.fixed_nat.chains.len()
            + self.filter.chains.len()
            + self.nat.chains.len()
            + self.own.iter().map(|t| t.chains.len()).sum::<usize>()
    }

    fn merged<'a>(parts: impl Iterator<Item = &'a Table>) -> Table {
        let mut out = Table::default();
        for t in parts {
            out.chains.extend(t.chains.iter().cloned());
            out.rules.push_str(&t.rules);
            out.rule_count += t.rule_count;
        }
        out
    }

    fn filter_all(&self) -> Table {
        Plan::merged([&self.fixed_filter, &self.filter].into_iter())
    }

    fn nat_all(&self) -> Table {
        Plan::merged(
            std::iter::once(&self.fixed_nat)
                .chain(self.own.iter())
                .chain(std::iter::once(&self.nat)),
        )
    }

    /// The whole plan as one `iptables-restore --noflush` transaction.
    pub fn text(&self) -> String {
        let mut out = String::new();
        write_table(&mut out, "mangle", &self.mangle, &BTreeSet::new());
        write_table(&mut out, "filter", &self.filter_all(), &self.delete_filter);
        write_table(&mut out, "nat", &self.nat_all(), &self.delete_nat);
        out
    }

    /// The plan as a sequence of transactions of at most about `max_rules` rules each:
    /// per-service chains in batches, then everything shared (and every deletion) last.
    /// iptables-nft applies `--noflush` input in time that grows faster than linearly with its
    /// size, so batches cost far less than one huge transaction; the order keeps every state
    /// in between valid (a new chain stays unreferenced until the last step).
    pub fn batches(&self, max_rules: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut first = String::new();
        write_table(&mut first, "mangle", &self.mangle, &BTreeSet::new());
        write_table(&mut first, "filter", &self.fixed_filter, &BTreeSet::new());
        write_table(&mut first, "nat", &self.fixed_nat, &BTreeSet::new());
        if !first.is_empty() {
            out.push(first);
        }
        let mut batch = Table::default();
        let flush = |batch: &mut Table, out: &mut Vec<String>| {
            if !batch.chains.is_empty() {
                let mut text = String::new();
                write_table(&mut text, "nat", batch, &BTreeSet::new());
                out.push(text);
                *batch = Table::default();
            }
        };
        for t in &self.own {
            if batch.rule_count > 0 && batch.rule_count + t.rule_count > max_rules {
                flush(&mut batch, &mut out);
            }
            batch.chains.extend(t.chains.iter().cloned());
            batch.rules.push_str(&t.rules);
            batch.rule_count += t.rule_count;
        }
        flush(&mut batch, &mut out);
        let mut last = String::new();
        write_table(&mut last, "filter", &self.filter, &self.delete_filter);
        write_table(&mut last, "nat", &self.nat, &self.delete_nat);
        if !last.is_empty() {
            out.push(last);
        }
        out
    }

    fn table(&mut self, name: &str) -> (&mut Table, &mut BTreeSet<String>) {
        if name == "nat" {
            (&mut self.nat, &mut self.delete_nat)
        } else {
            (&mut self.filter, &mut self.delete_filter)
        }
    }

    pub fn deleted(&self) -> usize {
        self.delete_filter.len() + self.delete_nat.len()
    }
}

/// Chains of ours in `existing` that none of `written` declares.
fn stale<'a>(existing: &BTreeSet<String>, written: impl Iterator<Item = &'a Table>) -> Vec<String> {
    let written: BTreeSet<&String> = written.flat_map(|t| t.chains.iter()).collect();
    existing
        .iter()
        .filter(|c| is_dynamic_chain(c) && !written.contains(c))
        .cloned()
        .collect()
}

#[derive(Debug, Default, Clone)]
pub struct Writer {
    services: BTreeMap<ServiceKey, Owned>,
    dispatch: Dispatch,
    /// Dispatch chains (roots included) as last written: (table, chain) -> rules.
    written: BTreeMap<(&'static str, String), Vec<String>>,
    totals: Counts,
    /// Rules in the fixed chains as of the last full sync: (filter, nat).
    fixed_rules: (usize, usize),
}

impl Writer {
    pub fn totals(&self) -> Counts {
        self.totals
    }

    /// Rules kproxy owns in the kernel after the last sync: (filter, nat).
    pub fn rule_totals(&self) -> (usize, usize) {
        let (mut filter, mut nat) = self.fixed_rules;
        for ((table, _), rules) in &self.written {
            if *table == "nat" {
                nat += rules.len();
            } else {
                filter += rules.len();
            }
        }
        nat += self.services.values().map(|o| o.rules).sum::<usize>();
        (filter, nat)
    }

    /// Plan a partial sync of the `changed` Services.
    pub fn partial(
        &mut self,
        state: &State,
        cfg: &RenderConfig,
        changed: &BTreeSet<ServiceKey>,
    ) -> Plan {
        let mut plan = Plan::default();
        let mut touched: BTreeSet<(Root, Path)> = BTreeSet::new();
        for key in changed {
            let new = render_service(state, cfg, key);
            let old = self.services.remove(key).unwrap_or_default();
            self.totals.sub(&old.counts);
            for (leaf, id) in &old.entries {
                self.dispatch.remove(*leaf, id);
                touched.insert(*leaf);
            }
            for stale in old.chains.difference(&new.nat.chains) {
                plan.delete_nat.insert(stale.clone());
            }
            if !new.nat.chains.is_empty() {
                plan.own.push(new.nat.clone());
            }

            let mut owned = Owned {
                rules: new.nat.rule_count,
                chains: new.nat.chains,
                entries: Vec::with_capacity(new.entries.len()),
                counts: new.counts,
            };
            let mut seq: BTreeMap<Root, u32> = BTreeMap::new();
            for e in new.entries {
                let n = seq.entry(e.root).or_insert(0);
                let id: EntryId = (key.clone(), *n);
                *n += 1;
                let leaf = self.dispatch.insert(e.root, &e.key, id.clone(), e.rule);
                touched.insert(leaf);
                owned.entries.push((leaf, id));
            }
            self.totals.add(&owned.counts);
            if !owned.chains.is_empty()
                || !owned.entries.is_empty()
                || owned.counts != Counts::default()
            {
                self.services.insert(key.clone(), owned);
            }
        }
        let mut nodes: BTreeSet<(Root, Option<Path>)> = BTreeSet::new();
        for (root, leaf) in touched {
            nodes.insert((root, None));
            for a in Dispatch::ancestors(leaf) {
                nodes.insert((root, Some(a)));
            }
        }
        for (root, node) in nodes {
            self.refresh(root, node, cfg, &mut plan);
        }
        plan
    }

    /// Bring one dispatch chain up to date in `plan` if its content changed.
    fn refresh(&mut self, root: Root, node: Option<Path>, cfg: &RenderConfig, plan: &mut Plan) {
        let table = root.table();
        let name = node.map_or_else(|| root.chain().to_owned(), |p| p.chain(root));
        let rules = self
            .dispatch
            .chain_rules(root, node, cfg.family)
            .map(|mut r| {
                if node.is_none() {
                    r.extend(root_tail(root, cfg));
                }
                r
            });
        let key = (table, name);
        match rules {
            None => {
                if self.written.remove(&key).is_some() {
                    plan.table(table).1.insert(key.1);
                }
            }
            Some(rules) => {
                if self.written.get(&key) != Some(&rules) {
                    let (t, _) = plan.table(table);
                    t.chain(&key.1);
                    for r in &rules {
                        t.rule(&key.1, format_args!("{r}"));
                    }
                    self.written.insert(key, rules);
                }
            }
        }
    }

    /// Plan a full sync: forget everything, write every chain, and delete the chains of ours
    /// in `existing_filter` / `existing_nat` (what the kernel holds) that are no longer wanted.
    pub fn full(
        &mut self,
        state: &State,
        cfg: &RenderConfig,
        existing_filter: &BTreeSet<String>,
        existing_nat: &BTreeSet<String>,
    ) -> Plan {
        *self = Writer::default();
        let all: BTreeSet<ServiceKey> = state.service_keys().cloned().collect();
        let mut plan = self.partial(state, cfg, &all);
        // Every root exists, even empty: the jump rules from the built-in chains point at them.
        for root in Root::ALL {
            self.refresh(root, None, cfg, &mut plan);
        }
        let (filter, nat) = fixed_chains(cfg);
        self.fixed_rules = (filter.rule_count, nat.rule_count);
        plan.fixed_filter = filter;
        plan.fixed_nat = nat;
        plan.fixed_filter.chain(CANARY);
        plan.fixed_nat.chain(CANARY);
        plan.mangle.chain(CANARY);
        for c in FILTER_CHAINS {
            if !plan.fixed_filter.chains.contains(*c) {
                plan.filter.chain(c);
            }
        }
        for c in NAT_CHAINS {
            if !plan.fixed_nat.chains.contains(*c) {
                plan.nat.chain(c);
            }
        }
        let filter_written = [&plan.fixed_filter, &plan.filter];
        let stale_filter = stale(existing_filter, filter_written.into_iter());
        let nat_written = plan.own.iter().chain([&plan.fixed_nat, &plan.nat]);
        let stale_nat = stale(existing_nat, nat_written);
        plan.delete_filter.extend(stale_filter);
        plan.delete_nat.extend(stale_nat);
        plan
    }

    /// The complete ruleset for `state` (nothing is deleted: no kernel is consulted).
    pub fn full_ruleset(mut self, state: &State, cfg: &RenderConfig) -> Ruleset {
        let plan = self.full(state, cfg, &BTreeSet::new(), &BTreeSet::new());
        Ruleset {
            nat: plan.nat_all(),
            filter: plan.filter_all(),
            counts: self.totals,
        }
    }
}
