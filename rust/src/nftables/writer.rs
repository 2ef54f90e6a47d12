//! What a sync writes: the whole table (full) or element and chain diffs (partial).
//!
//! The writer remembers what it last wrote for every Service (its chains and elements) and,
//! for every element of the shared sets, which Services want it. Two Services can claim one key
//! (the same external IP and port): the first by (namespace, name) wins, as the first rule
//! would in iptables, and the other takes over when it goes away.
//!
//! A partial sync is one transaction: new pools, changed chains (flushed and rewritten),
//! element deletions, then additions. Chains and pools nothing references any more are deleted
//! by a second transaction ([`Plan::cleanup`]) once the first has removed every reference.

use super::ast::Value;
use super::ast::{Data, Hook, Key, Op, Rule};
use super::packed::PackedKey;
use super::render::{
    self, Fixed, Pool, ServiceObjects, SetId, AFFINITY, NODEPORT_IPS, SERVICE_CIDRS,
};
use crate::config::RenderConfig;
use crate::model::{Cidr, ServiceKey};
use crate::state::State;
use crate::topology::Counts;
use smallvec::SmallVec;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Elements per `add element` command.
const CHUNK: usize = 4096;

type SetKey = (SetId, Key);

/// One sync's transactions.
#[derive(Debug, Default, Clone)]
pub struct Plan {
    pub ops: Vec<Op>,
    /// Deletes what nothing references any more, after `ops` succeeded.
    pub cleanup: Vec<Op>,
    pub elements_added: usize,
    pub elements_deleted: usize,
    pub chains_written: usize,
    pub rules_written: usize,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.cleanup.is_empty()
    }
}

#[derive(Debug, Default)]
pub struct Writer {
    /// Who claims each element of each set. A cluster has ten elements per Service or so, and
    /// this is the engine's largest structure: keys are packed, and the common single claim
    /// is stored inline (about 100 bytes per element in all).
    owners: BTreeMap<SetId, BTreeMap<PackedKey, Claims>>,
    /// Effective elements per pool map (pools with none are deleted).
    pool_use: BTreeMap<Pool, usize>,
    /// Pools that exist in the kernel.
    pools: BTreeSet<Pool>,
    stale_chains: BTreeSet<String>,
    stale_pools: BTreeSet<Pool>,
    totals: Counts,
    /// Elements kproxy has in the kernel (affinity entries excluded).
    element_total: usize,
    /// Keys two Services both claim (the first wins).
    conflicts: usize,
    /// The service CIDRs the kernel's `service-cidrs` set holds.
    service_cidrs: Vec<Cidr>,
}

fn cidr_elements<'a>(cidrs: impl IntoIterator<Item = &'a Cidr>) -> Vec<Key> {
    cidrs.into_iter().map(|c| vec![Value::Cidr(*c)]).collect()
}

/// A Service as an element's claimant (shared: one allocation per Service, not per element).
type Owner = Arc<ServiceKey>;

/// An element's claimants and the data each wants, sorted by Service; the first wins.
type Claims = SmallVec<[(Owner, Option<Data>); 1]>;

fn effective(owners: &[(Owner, Option<Data>)]) -> Option<&Option<Data>> {
    owners.first().map(|(_, d)| d)
}

/// Whether the claimants of a key disagree on its data (a conflict: the first one wins).
fn contested(owners: &[(Owner, Option<Data>)]) -> bool {
    owners.iter().any(|(_, d)| Some(d) != effective(owners))
}

/// A key's state: what the kernel holds for it (`None`: no element), and whether it is
/// contested.
type Status = (Option<Option<Data>>, bool);

/// One Service's elements, first claim of a key within the Service kept.
fn element_map(o: &ServiceObjects) -> BTreeMap<SetKey, Option<Data>> {
    let mut m = BTreeMap::new();
    for (set, key, data) in &o.elements {
        m.entry((*set, key.clone())).or_insert_with(|| data.clone());
    }
    m
}

fn chunked_adds(ops: &mut Vec<Op>, set: &SetId, elems: Vec<(Key, Option<Data>)>) {
    let set = set.name();
    let mut it = elems.into_iter().peekable();
    while it.peek().is_some() {
        ops.push(Op::AddElements(
            set.to_owned(),
            it.by_ref().take(CHUNK).collect(),
        ));
    }
}

fn chunked_deletes(ops: &mut Vec<Op>, set: &SetId, keys: Vec<Key>) {
    let set = set.name();
    let mut it = keys.into_iter().peekable();
    while it.peek().is_some() {
        ops.push(Op::DeleteElements(
            set.to_owned(),
            it.by_ref().take(CHUNK).collect(),
        ));
    }
}

fn write_chain(ops: &mut Vec<Op>, name: &str, rules: &[Rule], plan_rules: &mut usize) {
    for r in rules {
        ops.push(Op::AddRule(name.to_owned(), r.clone()));
    }
    *plan_rules += rules.len();
}

fn create_pool(ops: &mut Vec<Op>, pool: &Pool) {
    ops.push(Op::AddSet(pool.set_def()));
    ops.push(Op::AddChain(pool.name(), None));
    // `add chain` keeps what a chain of that name already holds: start it empty.
    ops.push(Op::FlushChain(pool.name()));
    for r in pool.rules() {
        ops.push(Op::AddRule(pool.name(), r));
    }
}

impl Writer {
    pub fn totals(&self) -> Counts {
        self.totals
    }

    pub fn element_total(&self) -> usize {
        self.element_total
    }

    pub fn conflicts(&self) -> usize {
        self.conflicts
    }

    /// Set and map count (fixed ones plus pools): what the kernel walks per set lookup.
    pub fn pool_count(&self) -> usize {
        self.pools.len()
    }

    /// What the kernel holds for an element (the data of its first claimant), and whether
    /// its claimants disagree.
    fn status_of(&self, (set, key): &SetKey) -> Status {
        match self
            .owners
            .get(set)
            .and_then(|s| s.get(&PackedKey::pack(key)))
        {
            Some(claims) => (effective(claims).cloned(), contested(claims)),
            None => (None, false),
        }
    }

    /// Note how `sk` was before this partial sync first touches it.
    fn remember(&self, before: &mut BTreeMap<SetKey, Status>, sk: &SetKey) {
        if !before.contains_key(sk) {
            before.insert(sk.clone(), self.status_of(sk));
        }
    }

    fn claim(&mut self, (set, key): &SetKey, owner: &Owner, data: Option<Option<Data>>) {
        let packed = PackedKey::pack(key);
        let set_owners = self.owners.entry(*set).or_default();
        let entry = set_owners.entry(packed).or_default();
        let at = entry.binary_search_by(|(o, _)| o.as_ref().cmp(owner.as_ref()));
        match (data, at) {
            (Some(d), Ok(i)) => entry[i].1 = d,
            (Some(d), Err(i)) => entry.insert(i, (owner.clone(), d)),
            (None, Ok(i)) => {
                entry.remove(i);
            }
            (None, Err(_)) => {}
        }
        if entry.is_empty() {
            set_owners.remove(&PackedKey::pack(key));
            if set_owners.is_empty() {
                self.owners.remove(set);
            }
        }
    }

    fn count_use(&mut self, set: &SetId, delta: isize) {
        if let SetId::Pool(p) = set {
            let n = self.pool_use.entry(*p).or_default();
            *n = n.checked_add_signed(delta).unwrap_or(0);
        }
    }

    /// Rewrite everything: one transaction that replaces the table atomically. `affinity` is
    /// carried over (client . id, seconds left), so a resync does not forget sessions.
    pub fn full(&mut self, state: &State, cfg: &RenderConfig, affinity: &[(Key, u32)]) -> Plan {
        *self = Writer::default();
        let mut chains: Vec<(String, Vec<Rule>)> = Vec::new();
        for key in state.service_keys() {
            let o = render::render_service(state, cfg, key);
            let owner = Arc::new(key.clone());
            for (sk, d) in element_map(&o) {
                self.claim(&sk, &owner, Some(d));
            }
            self.totals.add(&o.counts);
            chains.extend(o.chains);
        }
        let mut by_set: BTreeMap<SetId, Vec<(Key, Option<Data>)>> = BTreeMap::new();
        let mut conflicts = 0;
        for (set, set_owners) in &self.owners {
            for (key, owners) in set_owners {
                conflicts += usize::from(contested(owners));
                if let Some(d) = effective(owners) {
                    by_set
                        .entry(*set)
                        .or_default()
                        .push((key.unpack(), d.clone()));
                }
            }
        }
        self.conflicts = conflicts;
        for (set, elems) in &by_set {
            if let SetId::Pool(p) = set {
                self.pool_use.insert(*p, elems.len());
                self.pools.insert(*p);
            }
        }
        if cfg.nodeport_ips.is_some() {
            by_set.insert(
                SetId::Fixed(NODEPORT_IPS),
                render::nodeport_ip_elements(cfg)
                    .into_iter()
                    .map(|k| (k, None))
                    .collect(),
            );
        }
        self.service_cidrs = state.service_cidrs().to_vec();
        if !self.service_cidrs.is_empty() {
            let elems = cidr_elements(&self.service_cidrs);
            by_set.insert(
                SetId::Fixed(SERVICE_CIDRS),
                elems.into_iter().map(|k| (k, None)).collect(),
            );
        }
        self.element_total = by_set.values().map(Vec::len).sum();

        let mut plan = Plan::default();
        let ops = &mut plan.ops;
        // Replace the table in one transaction: packets see the old rules or the new ones.
        ops.extend([Op::AddTable, Op::DeleteTable, Op::AddTable]);
        let Fixed {
            sets,
            chains: fixed_chains,
        } = render::fixed(cfg);
        for s in sets {
            ops.push(Op::AddSet(s));
        }
        for p in &self.pools {
            ops.push(Op::AddSet(p.set_def()));
        }
        let mut all: Vec<(String, Option<Hook>, Vec<Rule>)> = fixed_chains;
        for p in &self.pools {
            all.push((p.name(), None, p.rules()));
        }
        all.extend(chains.into_iter().map(|(name, rules)| (name, None, rules)));
        for (name, hook, _) in &all {
            ops.push(Op::AddChain(name.clone(), *hook));
        }
        plan.chains_written = all.len();
        for (name, _, rules) in &all {
            write_chain(ops, name, rules, &mut plan.rules_written);
        }
        for (set, elems) in by_set {
            plan.elements_added += elems.len();
            chunked_adds(ops, &set, elems);
        }
        if !affinity.is_empty() {
            ops.push(Op::AddTimedElements(AFFINITY.into(), affinity.to_vec()));
        }
        plan
    }

    /// Rewrite only what the `changed` Services own. `before` holds what each of them
    /// rendered to before the change (what the kernel holds for it: any failed sync makes
    /// the next one full), so the writer need not keep every Service's objects.
    pub fn partial(
        &mut self,
        state: &State,
        cfg: &RenderConfig,
        changed: &BTreeSet<ServiceKey>,
        before_change: &mut BTreeMap<ServiceKey, ServiceObjects>,
    ) -> Plan {
        let mut plan = Plan::default();
        let mut new_chains = Vec::new();
        let mut chain_ops = Vec::new();
        let mut before: BTreeMap<SetKey, Status> = BTreeMap::new();
        for key in changed {
            let owner = Arc::new(key.clone());
            let new = if state.has_service(key) {
                render::render_service(state, cfg, key)
            } else {
                ServiceObjects::default()
            };
            let old = before_change.remove(key).unwrap_or_default();
            let (old_e, new_e) = (element_map(&old), element_map(&new));
            for (sk, d) in &old_e {
                if new_e.get(sk) != Some(d) {
                    self.remember(&mut before, sk);
                    self.claim(sk, &owner, None);
                }
            }
            for (sk, d) in &new_e {
                if old_e.get(sk) != Some(d) {
                    self.remember(&mut before, sk);
                    self.claim(sk, &owner, Some(d.clone()));
                }
            }
            for (name, rules) in &new.chains {
                match old.chains.get(name) {
                    Some(r) if r == rules => continue,
                    Some(_) => chain_ops.push(Op::FlushChain(name.clone())),
                    None if self.stale_chains.remove(name) => {
                        chain_ops.push(Op::FlushChain(name.clone()))
                    }
                    // Declared (and emptied) before any rule: the Service's chains jump to each
                    // other.
                    None => {
                        new_chains.push(Op::AddChain(name.clone(), None));
                        new_chains.push(Op::FlushChain(name.clone()));
                    }
                }
                plan.chains_written += 1;
                write_chain(&mut chain_ops, name, rules, &mut plan.rules_written);
            }
            for name in old.chains.keys() {
                if !new.chains.contains_key(name) {
                    self.stale_chains.insert(name.clone());
                }
            }
            self.totals.sub(&old.counts);
            self.totals.add(&new.counts);
        }

        let mut deletes: BTreeMap<SetId, Vec<Key>> = BTreeMap::new();
        let mut adds: BTreeMap<SetId, Vec<(Key, Option<Data>)>> = BTreeMap::new();
        for (sk, (was, was_contested)) in before {
            let (now, now_contested) = self.status_of(&sk);
            // Whether or not the kernel's element changes, the key may have become (or
            // stopped being) contested.
            match (was_contested, now_contested) {
                (false, true) => self.conflicts += 1,
                (true, false) => self.conflicts -= 1,
                _ => {}
            }
            if was == now {
                continue;
            }
            let (set, key) = sk;
            if was.is_some() {
                self.count_use(&set, -1);
                self.element_total -= 1;
                deletes.entry(set).or_default().push(key.clone());
            }
            if let Some(d) = now {
                self.count_use(&set, 1);
                self.element_total += 1;
                adds.entry(set).or_default().push((key, d));
            }
        }

        // The service CIDRs (a cluster-wide list that seldom changes): what left, what came.
        if state.service_cidrs() != self.service_cidrs.as_slice() {
            let (old, new) = (&self.service_cidrs, state.service_cidrs());
            let gone = cidr_elements(old.iter().filter(|c| !new.contains(c)));
            let came = cidr_elements(new.iter().filter(|c| !old.contains(c)));
            self.element_total = self.element_total + came.len() - gone.len();
            let set = SetId::Fixed(SERVICE_CIDRS);
            if !gone.is_empty() {
                deletes.entry(set).or_default().extend(gone);
            }
            if !came.is_empty() {
                adds.entry(set)
                    .or_default()
                    .extend(came.into_iter().map(|k| (k, None)));
            }
            self.service_cidrs = new.to_vec();
        }

        // Pools: create the ones that gain elements, retire the ones left empty. A retired
        // pool's elements go with its set (the cleanup deletes it), not one by one: a Service
        // of 100,000 endpoints gaining one moves all of them to the next pool.
        for (p, n) in &self.pool_use {
            if *n > 0 && !self.pools.contains(p) {
                create_pool(&mut plan.ops, p);
                self.pools.insert(*p);
            } else if *n > 0 && self.stale_pools.remove(p) {
                // Retired, but its cleanup failed: the set still holds the old elements.
                plan.ops.push(Op::FlushChain(p.name()));
                plan.ops.push(Op::DeleteSet(p.name()));
                create_pool(&mut plan.ops, p);
            } else if *n == 0 && self.pools.contains(p) {
                self.stale_pools.insert(*p);
            }
        }
        self.pool_use.retain(|_, n| *n > 0);
        plan.ops.extend(new_chains);
        plan.ops.extend(chain_ops);
        for (set, keys) in deletes {
            plan.elements_deleted += keys.len();
            if matches!(set, SetId::Pool(p) if self.stale_pools.contains(&p)) {
                continue;
            }
            chunked_deletes(&mut plan.ops, &set, keys);
        }
        for (set, elems) in adds {
            plan.elements_added += elems.len();
            chunked_adds(&mut plan.ops, &set, elems);
        }
        plan.cleanup = self.cleanup_ops();
        plan
    }

    fn cleanup_ops(&self) -> Vec<Op> {
        let mut ops = Vec::new();
        let chains: Vec<String> = self
            .stale_chains
            .iter()
            .cloned()
            .chain(self.stale_pools.iter().map(Pool::name))
            .collect();
        // Flush first: stale chains may jump to each other.
        for c in &chains {
            ops.push(Op::FlushChain(c.clone()));
        }
        for c in &chains {
            ops.push(Op::DeleteChain(c.clone()));
        }
        for p in &self.stale_pools {
            ops.push(Op::DeleteSet(p.name()));
        }
        ops
    }

    /// The cleanup transaction went through.
    pub fn cleaned(&mut self) {
        self.stale_chains.clear();
        for p in std::mem::take(&mut self.stale_pools) {
            self.pools.remove(&p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{changes, deletion, lines, svc, Harness};
    use crate::model::ChangeSet;
    use crate::model::IpFamily::V4;

    #[test]
    fn a_full_sync_replaces_the_table_in_one_transaction() {
        let mut h = Harness::new(V4);
        let plan = h.full(changes(&[
            svc("a", "172.30.0.1").eps(&["10.1.0.1", "10.1.0.2"]),
            svc("b", "172.30.0.2").eps(&["10.1.0.3"]),
        ]));
        // The table is re-created inside the transaction, so no old object survives it.
        assert_eq!(
            lines(V4, &plan.ops[..3], ""),
            [
                "add table ip kproxy",
                "delete table ip kproxy",
                "add table ip kproxy"
            ]
        );
        // One pool per endpoint count, not one per Service.
        assert_eq!(
            lines(V4, &plan.ops, "add map ip kproxy endpoints-"),
            [
                "add map ip kproxy endpoints-1 { typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport ; }",
                "add map ip kproxy endpoints-2 { typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport ; }",
            ]
        );
        assert_eq!(
            lines(V4, &plan.ops, "add element ip kproxy service-ips"),
            ["add element ip kproxy service-ips { 172.30.0.1 . tcp . 80 : goto endpoints-2, 172.30.0.2 . tcp . 80 : goto endpoints-1 }"]
        );
        assert_eq!(
            lines(V4, &plan.ops, "add element ip kproxy endpoints-2"),
            ["add element ip kproxy endpoints-2 { 172.30.0.1 . tcp . 80 . 0 : 10.1.0.1 . 8080, 172.30.0.1 . tcp . 80 . 1 : 10.1.0.2 . 8080 }"]
        );
        assert!(plan.cleanup.is_empty());
        assert_eq!(h.writer.pool_count(), 2);
        // cluster-ips 2, service-ips 2, pools 3, hairpin 3.
        assert_eq!(h.writer.element_total(), 10);
        assert_eq!(plan.elements_added, 10);
        assert_eq!(h.writer.totals().endpoints, 3);
        assert_eq!(h.writer.conflicts(), 0);
        h.assert_in_step();
    }

    #[test]
    fn a_partial_sync_writes_only_the_changed_elements() {
        let mut h = Harness::new(V4);
        h.full(changes(&[
            svc("a", "172.30.0.1").eps(&["10.1.0.1", "10.1.0.2"]),
            svc("b", "172.30.0.2").eps(&["10.1.0.3"]),
        ]));
        // b's endpoint moves: two pool elements and a hairpin element, nothing else.
        let plan = h.partial(changes(&[svc("b", "172.30.0.2").eps(&["10.1.0.4"])]));
        assert_eq!(
            lines(V4, &plan.ops, ""),
            [
                "delete element ip kproxy hairpin-connections { 10.1.0.3 . 10.1.0.3 . tcp . 8080 }",
                "delete element ip kproxy endpoints-1 { 172.30.0.2 . tcp . 80 . 0 }",
                "add element ip kproxy hairpin-connections { 10.1.0.4 . 10.1.0.4 . tcp . 8080 }",
                "add element ip kproxy endpoints-1 { 172.30.0.2 . tcp . 80 . 0 : 10.1.0.4 . 8080 }",
            ]
        );
        assert_eq!((plan.elements_added, plan.elements_deleted), (2, 2));
        assert!(plan.cleanup.is_empty());
        h.assert_in_step();
    }

    #[test]
    fn a_removed_service_takes_its_elements_and_its_empty_pool_with_it() {
        let mut h = Harness::new(V4);
        h.full(changes(&[
            svc("a", "172.30.0.1").eps(&["10.1.0.1", "10.1.0.2"]),
            svc("b", "172.30.0.2").eps(&["10.1.0.3"]),
        ]));
        let plan = h.partial(deletion("b"));
        // endpoints-1 is left empty: its element goes with the map in the cleanup rather
        // than one by one.
        assert_eq!(
            lines(V4, &plan.ops, ""),
            [
                "delete element ip kproxy cluster-ips { 172.30.0.2 }",
                "delete element ip kproxy hairpin-connections { 10.1.0.3 . 10.1.0.3 . tcp . 8080 }",
                "delete element ip kproxy service-ips { 172.30.0.2 . tcp . 80 }",
            ]
        );
        assert_eq!(
            lines(V4, &plan.cleanup, ""),
            [
                "flush chain ip kproxy endpoints-1",
                "delete chain ip kproxy endpoints-1",
                "delete set ip kproxy endpoints-1",
            ]
        );
        assert_eq!(plan.elements_deleted, 4);
        assert_eq!(h.writer.pool_count(), 1);
        h.assert_in_step();
    }

    #[test]
    fn a_service_gaining_an_endpoint_moves_to_the_next_pool() {
        let mut h = Harness::new(V4);
        h.full(changes(&[svc("a", "172.30.0.1").eps(&["10.1.0.1"])]));
        let plan = h.partial(changes(&[
            svc("a", "172.30.0.1").eps(&["10.1.0.1", "10.1.0.2"])
        ]));
        assert_eq!(
            lines(V4, &plan.ops, "add chain"),
            ["add chain ip kproxy endpoints-2"]
        );
        assert_eq!(
            lines(V4, &plan.ops, "add element ip kproxy service-ips"),
            ["add element ip kproxy service-ips { 172.30.0.1 . tcp . 80 : goto endpoints-2 }"]
        );
        assert_eq!(
            lines(V4, &plan.cleanup, "delete"),
            [
                "delete chain ip kproxy endpoints-1",
                "delete set ip kproxy endpoints-1"
            ]
        );
        h.assert_in_step();
    }

    #[test]
    fn a_changed_chain_is_flushed_and_rewritten_and_a_dropped_one_deleted() {
        let mut h = Harness::new(V4);
        h.full(changes(&[svc("a", "172.30.0.1")
            .node_port(30080)
            .eps(&["10.1.0.1"])]));
        let chain = lines(
            V4,
            &h.writer.full(&h.state, &h.cfg, &[]).ops,
            "add chain ip kproxy nodeport-",
        )
        .pop()
        .expect("a nodeport chain");
        let name = chain.trim_start_matches("add chain ip kproxy ").to_owned();
        // Local policy: the chain's rules change.
        let plan = h.partial(changes(&[svc("a", "172.30.0.1")
            .node_port(30080)
            .external_local()
            .eps(&["10.1.0.1"])]));
        // The pool of node-local endpoints is new (created empty); the chain is rewritten.
        assert_eq!(
            lines(V4, &plan.ops, "flush chain"),
            [
                "flush chain ip kproxy nodeport-local-endpoints-1".to_owned(),
                format!("flush chain ip kproxy {name}")
            ]
        );
        assert_eq!(plan.chains_written, 1);
        assert_eq!(plan.rules_written, 4);
        h.assert_in_step();
        // No NodePort any more: the chain goes in the cleanup, after nothing refers to it.
        let plan = h.partial(changes(&[svc("a", "172.30.0.1").eps(&["10.1.0.1"])]));
        assert_eq!(
            lines(V4, &plan.ops, "delete element ip kproxy service-nodeports"),
            ["delete element ip kproxy service-nodeports { tcp . 30080 }"]
        );
        assert!(lines(V4, &plan.cleanup, "delete chain")
            .contains(&format!("delete chain ip kproxy {name}")));
        h.assert_in_step();
    }

    /// Two Services claiming one external IP and port: the first by name wins, the other
    /// takes over when it goes, and the count of contested keys follows every partial sync.
    #[test]
    fn conflicts_stay_right_after_partial_syncs() {
        let a = || {
            svc("a", "172.30.0.1")
                .external_ips(&["203.0.113.10"])
                .eps(&["10.1.0.1"])
        };
        let b = || {
            svc("b", "172.30.0.2")
                .external_ips(&["203.0.113.10"])
                .eps(&["10.1.0.2"])
        };
        let mut h = Harness::new(V4);
        h.full(changes(&[a(), b()]));
        assert_eq!(h.writer.conflicts(), 2);
        h.full(deletion("b"));
        assert_eq!(h.writer.conflicts(), 0);
        // b claims a's external IP and port: two keys are contested, the `service-ips`
        // element (goto external-<a> or external-<b>) and the pool element behind it (which
        // endpoint).
        h.partial(changes(&[b()]));
        assert_eq!(h.writer.conflicts(), 2);
        h.assert_in_step();
        // a goes: b takes over, nothing is contested.
        let plan = h.partial(deletion("a"));
        assert!(lines(V4, &plan.ops, "add element ip kproxy service-ips")
            .iter()
            .any(|l| l.contains("203.0.113.10 . tcp . 80 : goto external-")));
        assert_eq!(h.writer.conflicts(), 0);
        h.assert_in_step();
        // a comes back and wins again.
        h.partial(changes(&[a()]));
        assert_eq!(h.writer.conflicts(), 2);
        h.assert_in_step();
        // b gives the address up.
        h.partial(changes(&[svc("b", "172.30.0.2").eps(&["10.1.0.2"])]));
        assert_eq!(h.writer.conflicts(), 0);
        h.assert_in_step();
    }

    #[test]
    fn bookkeeping_stays_right_over_a_run_of_partial_syncs() {
        let mut h = Harness::new(V4);
        h.full(changes(&[
            svc("a", "172.30.0.1").eps(&["10.1.0.1", "10.1.0.2"]),
            svc("b", "172.30.0.2").node_port(30081).eps(&["10.1.0.3"]),
        ]));
        let steps = [
            changes(&[svc("c", "172.30.0.3")
                .load_balancer(&["203.0.113.20"], &["0.0.0.0/0", "198.51.100.0/24"])
                .eps(&["10.1.0.4"])]),
            changes(&[svc("a", "172.30.0.1").eps(&["10.1.0.1"])]),
            changes(&[svc("b", "172.30.0.2")
                .node_port(30081)
                .external_local()
                .eps_on(&[("10.1.0.3", "node-b")])]),
            deletion("a"),
            changes(&[svc("d", "172.30.0.4")
                .affinity(300)
                .eps(&["10.1.0.5", "10.1.0.6"])]),
            changes(&[svc("c", "172.30.0.3")
                .load_balancer(&["203.0.113.20"], &["198.51.100.0/24"])
                .eps(&["10.1.0.4", "10.1.0.7"])]),
            changes(&[svc("d", "172.30.0.4").eps(&[])]),
            deletion("c"),
        ];
        for cs in steps {
            h.partial(cs);
            h.assert_in_step();
        }
    }

    fn service_cidrs(cidrs: &[&str]) -> ChangeSet {
        ChangeSet {
            service_cidrs: Some(cidrs.iter().map(|c| c.parse().unwrap()).collect()),
            ..ChangeSet::default()
        }
    }

    /// The ServiceCIDRs' set follows the cluster's objects through partial syncs: only this
    /// family's CIDRs, overlapping ones as the fewest prefixes (the set is an interval set,
    /// which the Fake refuses overlaps in as the kernel does), and only what changed written.
    #[test]
    fn service_cidrs_follow_partial_syncs() {
        let mut h = Harness::new(V4);
        h.full(changes(&[svc("a", "172.30.0.1").eps(&["10.1.0.1"])]));
        assert!(lines(
            V4,
            &h.writer.full(&h.state, &h.cfg, &[]).ops,
            "add element ip kproxy service-cidrs"
        )
        .is_empty());
        let plan = h.partial(service_cidrs(&[
            "172.30.0.0/16",
            "172.30.5.0/24",
            "fd00::/108",
        ]));
        assert_eq!(
            lines(V4, &plan.ops, "add element ip kproxy service-cidrs"),
            ["add element ip kproxy service-cidrs { 172.30.0.0/16 }"]
        );
        assert!(lines(V4, &plan.ops, "delete").is_empty());
        h.assert_in_step();
        // The same list again writes nothing; a second, adjacent CIDR joins the first.
        assert!(h.partial(service_cidrs(&["172.30.0.0/16"])).ops.is_empty());
        let plan = h.partial(service_cidrs(&["172.30.0.0/16", "172.31.0.0/16"]));
        assert_eq!(
            lines(V4, &plan.ops, "delete element ip kproxy service-cidrs"),
            ["delete element ip kproxy service-cidrs { 172.30.0.0/16 }"]
        );
        assert_eq!(
            lines(V4, &plan.ops, "add element ip kproxy service-cidrs"),
            ["add element ip kproxy service-cidrs { 172.30.0.0/15 }"]
        );
        h.assert_in_step();
        // Every ServiceCIDR gone.
        let plan = h.partial(service_cidrs(&[]));
        assert_eq!(
            lines(V4, &plan.ops, "delete element ip kproxy service-cidrs"),
            ["delete element ip kproxy service-cidrs { 172.30.0.0/15 }"]
        );
        h.assert_in_step();
    }
}
