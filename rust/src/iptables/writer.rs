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
    entries: Vec<((Root, Path), EntryId)>,
    counts: Counts,
}

/// What one sync sends: chains to (re)write per table and chains to delete.
#[derive(Debug, Default, Clone)]
pub struct Plan {
    /// Only ever holds the canary chain (declared by full syncs).
    pub mangle: Table,
    pub filter: Table,
    pub nat: Table,
    pub delete_filter: BTreeSet<String>,
    pub delete_nat: BTreeSet<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.mangle.chains.is_empty()
            && self.filter.chains.is_empty()
            && self.nat.chains.is_empty()
            && self.delete_filter.is_empty()
            && self.delete_nat.is_empty()
    }

    /// The `iptables-restore --noflush` input.
    pub fn text(&self) -> String {
        let mut out = String::with_capacity(self.filter.rules.len() + self.nat.rules.len() + 1024);
        write_table(&mut out, "mangle", &self.mangle, &BTreeSet::new());
        write_table(&mut out, "filter", &self.filter, &self.delete_filter);
        write_table(&mut out, "nat", &self.nat, &self.delete_nat);
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

#[derive(Debug, Default, Clone)]
pub struct Writer {
    services: BTreeMap<ServiceKey, Owned>,
    dispatch: Dispatch,
    /// Dispatch chains (roots included) as last written: (table, chain) -> rules.
    written: BTreeMap<(&'static str, String), Vec<String>>,
    totals: Counts,
}

impl Writer {
    pub fn totals(&self) -> Counts {
        self.totals
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
            plan.nat.chains.extend(new.nat.chains.iter().cloned());
            plan.nat.rules.push_str(&new.nat.rules);
            plan.nat.rule_count += new.nat.rule_count;

            let mut owned = Owned {
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
        for (t, fixed) in [(&mut plan.filter, filter), (&mut plan.nat, nat)] {
            t.chains.extend(fixed.chains);
            t.rules.push_str(&fixed.rules);
            t.rule_count += fixed.rule_count;
        }
        for c in FILTER_CHAINS.iter().chain([&CANARY]) {
            plan.filter.chain(c);
        }
        for c in NAT_CHAINS.iter().chain([&CANARY]) {
            plan.nat.chain(c);
        }
        plan.mangle.chain(CANARY);
        for c in existing_filter {
            if is_dynamic_chain(c) && !plan.filter.chains.contains(c) {
                plan.delete_filter.insert(c.clone());
            }
        }
        for c in existing_nat {
            if is_dynamic_chain(c) && !plan.nat.chains.contains(c) {
                plan.delete_nat.insert(c.clone());
            }
        }
        plan
    }

    /// The complete ruleset for `state` (nothing is deleted: no kernel is consulted).
    pub fn full_ruleset(mut self, state: &State, cfg: &RenderConfig) -> Ruleset {
        let plan = self.full(state, cfg, &BTreeSet::new(), &BTreeSet::new());
        Ruleset {
            filter: plan.filter,
            nat: plan.nat,
            counts: self.totals,
        }
    }
}
