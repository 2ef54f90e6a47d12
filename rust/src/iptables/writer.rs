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
use super::render::{fixed_chains, render_service, root_tail, write_table, Ruleset, Table};
use crate::config::RenderConfig;
use crate::model::ServiceKey;
use crate::state::State;
use crate::topology::Counts;
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
    /// Partial syncs: the rewritten filter chains holding their new rules and the old ones
    /// still wanted nowhere else, written before the nat table (see `Plan::shared_text`).
    pub filter_bridge: Table,
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

    /// The whole plan as one `iptables-restore --noflush` input.
    pub fn text(&self) -> String {
        let mut out = String::new();
        write_table(&mut out, "mangle", &self.mangle, &BTreeSet::new());
        self.shared_text(&mut out, &self.filter_all(), &self.nat_all());
        out
    }

    /// The filter and nat tables. `iptables-restore` commits each table on its own, so
    /// between the two commits the kernel holds one table's new rules and the other's old
    /// ones. A Service that gains endpoints loses its filter REJECT and gains its nat DNAT;
    /// one that loses them, the reverse: whichever table goes first, one of the two finds a
    /// moment where its traffic is neither refused nor forwarded (the churn soak's prober
    /// saw such connections time out). So a partial sync writes the filter chains with their
    /// old and new rules first, then the nat table, then the filter chains as wanted: every
    /// moment in between refuses or forwards (when both apply, DNAT comes first and the
    /// REJECT, matching the Service address, no longer does).
    fn shared_text(&self, out: &mut String, filter: &Table, nat: &Table) {
        if self.filter_bridge.chains.is_empty() {
            write_table(out, "filter", filter, &self.delete_filter);
            write_table(out, "nat", nat, &self.delete_nat);
        } else {
            write_table(out, "filter", &self.filter_bridge, &BTreeSet::new());
            write_table(out, "nat", nat, &self.delete_nat);
            write_table(out, "filter", filter, &self.delete_filter);
        }
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
        self.shared_text(&mut last, &self.filter, &self.nat);
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
                    if table == "filter" {
                        let old = self.written.get(&key).map(Vec::as_slice).unwrap_or(&[]);
                        let b = &mut plan.filter_bridge;
                        b.chain(&key.1);
                        for r in rules
                            .iter()
                            .chain(old.iter().filter(|r| !rules.contains(r)))
                        {
                            b.rule(&key.1, format_args!("{r}"));
                        }
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
        // Nothing old is known to bridge from: the kernel's content is replaced as a whole.
        plan.filter_bridge = Table::default();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iptables::render::tests::cfg;
    use crate::model::{ChangeSet, IpFamily};

    fn slice(ready: bool) -> ChangeSet {
        let json = format!(
            r#"{{"endpoints":[{{"namespace":"ns","name":"svc","ports":[{{"name":"p","protocol":"TCP","endpoints":[{{"ip":"10.1.0.1","port":8080,"ready":{ready},"serving":{ready},"terminating":false}}]}}]}}]}}"#
        );
        ChangeSet::from_json(json.as_bytes()).unwrap()
    }

    /// After every table commit of every sync (iptables-restore commits each table on its
    /// own), a new connection to the Service is either forwarded (nat) or refused (filter):
    /// as it gains endpoints, and as it loses them. The filter chains go first with their old
    /// and new rules, then nat, then the filter chains as wanted.
    #[test]
    fn partial_syncs_bridge_the_filter_and_nat_commits() {
        use crate::iptables::chains::JUMPS;
        use crate::trace::xtables::{trace, Ruleset};
        use crate::trace::{NodeFacts, Origin, Packet, Verdict};
        let mut state = State::new(IpFamily::V4);
        let svc = br#"{"services":[{"namespace":"ns","name":"svc","service":{"cluster_ips":["172.30.0.1"],"ports":[{"name":"p","protocol":"TCP","port":80}]}}]}"#;
        state.apply(ChangeSet::from_json(svc).unwrap());
        let changed: BTreeSet<ServiceKey> = state.service_keys().cloned().collect();
        let mut w = Writer::default();
        let mut kernel = w
            .full(&state, &cfg(), &BTreeSet::new(), &BTreeSet::new())
            .text();
        let packet = Packet {
            src: "10.9.0.5".parse().unwrap(),
            dst: "172.30.0.1".parse().unwrap(),
            protocol: crate::model::Protocol::Tcp,
            dport: 80,
            origin: Origin::External,
        };
        let outcome = |text: &str| {
            let mut rs = Ruleset::parse(text).unwrap();
            rs.add_jumps(JUMPS).unwrap();
            let t = trace(&rs, &packet, &NodeFacts::default(), &[]);
            (!t.dnat.is_empty(), t.verdict == Some(Verdict::Reject))
        };
        assert_eq!(outcome(&kernel), (false, true), "no endpoints yet: refused");
        for ready in [true, false, true] {
            state.apply(slice(ready));
            let text = w.partial(&state, &cfg(), &changed).text();
            let commits: Vec<&str> = text.split_inclusive("COMMIT\n").collect();
            for (i, commit) in commits.iter().enumerate() {
                kernel.push_str(commit);
                let (forwarded, refused) = outcome(&kernel);
                assert!(
                    forwarded || refused,
                    "ready={ready}, after commit {i}:\n{text}"
                );
            }
            assert_eq!(outcome(&kernel), (ready, !ready), "ready={ready}");
        }
    }
}
