//! What the ipvs mode wants, kept per Service so that a partial sync costs what changed.
//!
//! A full sync builds the whole [`Wanted`] and remembers each Service's share of it
//! ([`desired::part`]), with reference counts for what Services can share (set members such
//! as a pod's hairpin entry, kube-ipvs0 addresses, out-filter rules). A partial sync then
//! recomputes only the changed Services' shares and returns the [`Delta`]: their virtual
//! servers, the set members whose count went to or from zero, and the out-filter rules when
//! they changed. Two Services claiming the same virtual server (the same external IP and
//! port, say) make the merge order matter: [`Index::update`] then declines, and the caller
//! rebuilds.

use super::desired::{self, Node, Wanted};
use super::ipset::Set;
use super::{Table, VirtualKey};
use crate::model::{IpvsScheduler, ServiceKey};
use crate::state::State;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// What a partial sync must change.
#[derive(Debug, Default)]
pub struct Delta {
    /// The virtual servers of `keys` that are wanted (a key absent here is to be deleted).
    pub table: Table,
    pub keys: BTreeSet<VirtualKey>,
    pub names: BTreeMap<VirtualKey, String>,
    pub add: Vec<(Set, String)>,
    pub del: Vec<(Set, String)>,
    /// Every out-filter rule, when they changed.
    pub out_filter: Option<BTreeSet<String>>,
}

#[derive(Default)]
pub struct Index {
    parts: BTreeMap<ServiceKey, Wanted>,
    owners: BTreeMap<VirtualKey, ServiceKey>,
    /// Virtual servers more than one Service claims.
    contested: BTreeSet<VirtualKey>,
    members: BTreeMap<(Set, String), u32>,
    bind: BTreeMap<IpAddr, u32>,
    out_filter: BTreeMap<String, u32>,
    /// Real servers over every part.
    dests: usize,
}

impl Index {
    /// Index every Service; the merged result is what [`desired::table`] returns.
    pub fn build(state: &State, node: &Node, scheduler: IpvsScheduler) -> (Index, Wanted) {
        let mut ix = Index::default();
        // Merged from the parts in Service order, as `desired::table` merges its ports (a
        // later Service's claim on a contested virtual server wins in both).
        let mut wanted = Wanted::default();
        let keys: Vec<ServiceKey> = state.service_keys().cloned().collect();
        for key in keys {
            let part = desired::part(state, &key, node, scheduler);
            for vk in part.table.keys() {
                if let Some(other) = ix.owners.insert(*vk, key.clone()) {
                    if other != key {
                        ix.contested.insert(*vk);
                    }
                }
            }
            ix.count(&part, 1, &mut Vec::new(), &mut Vec::new());
            wanted
                .table
                .extend(part.table.iter().map(|(k, v)| (*k, v.clone())));
            wanted
                .names
                .extend(part.names.iter().map(|(k, n)| (*k, n.clone())));
            for (set, members) in &part.sets {
                let merged = wanted.sets.entry(*set).or_default();
                merged.extend(members.iter().cloned());
            }
            wanted.bind.extend(part.bind.iter().copied());
            wanted.out_filter.extend(part.out_filter.iter().cloned());
            ix.parts.insert(key, part);
        }
        let ipvs_ips = wanted.sets.entry(Set::IpvsIps).or_default();
        ipvs_ips.extend(wanted.bind.iter().map(IpAddr::to_string));
        (ix, wanted)
    }

    /// (virtual servers, real servers) wanted in all.
    pub fn totals(&self) -> (usize, usize) {
        (self.owners.len(), self.dests)
    }

    /// The addresses kube-ipvs0 must hold.
    pub fn bind(&self) -> impl Iterator<Item = &IpAddr> {
        self.bind.keys()
    }

    /// Recompute the `changed` Services; `None` when a contested virtual server is involved
    /// (rebuild instead).
    pub fn update(
        &mut self,
        state: &State,
        changed: &BTreeSet<ServiceKey>,
        node: &Node,
        scheduler: IpvsScheduler,
    ) -> Option<Delta> {
        let mut fresh = Vec::new();
        for key in changed {
            let part = desired::part(state, key, node, scheduler);
            let old = self.parts.get(key);
            let claims = part
                .table
                .keys()
                .chain(old.iter().flat_map(|p| p.table.keys()));
            for vk in claims {
                let owned_by_other = self.owners.get(vk).is_some_and(|o| o != key);
                if self.contested.contains(vk) || owned_by_other {
                    return None;
                }
            }
            fresh.push((key.clone(), part));
        }
        let mut d = Delta::default();
        let filter_before: Vec<String> = self.out_filter.keys().cloned().collect();
        for (key, part) in fresh {
            let old = self.parts.remove(&key).unwrap_or_default();
            let (mut add, mut del) = (Vec::new(), Vec::new());
            self.count(&old, -1, &mut add, &mut del);
            self.count(&part, 1, &mut add, &mut del);
            // A member removed and added again in the same sync is unchanged.
            let readded: BTreeSet<(Set, String)> = add.iter().cloned().collect();
            let removed: BTreeSet<(Set, String)> = del.iter().cloned().collect();
            d.add
                .extend(add.into_iter().filter(|m| !removed.contains(m)));
            d.del
                .extend(del.into_iter().filter(|m| !readded.contains(m)));
            for vk in old.table.keys() {
                self.owners.remove(vk);
                d.keys.insert(*vk);
            }
            for (vk, v) in &part.table {
                self.owners.insert(*vk, key.clone());
                d.keys.insert(*vk);
                d.table.insert(*vk, v.clone());
            }
            d.names
                .extend(part.names.iter().map(|(k, n)| (*k, n.clone())));
            if !part.table.is_empty() {
                self.parts.insert(key, part);
            }
        }
        let filter_after: Vec<String> = self.out_filter.keys().cloned().collect();
        if filter_after != filter_before {
            d.out_filter = Some(filter_after.into_iter().collect());
        }
        Some(d)
    }

    /// Add (`by` 1) or remove (-1) a part's shared items; members whose count crosses zero
    /// go to `added` / `removed`.
    fn count(
        &mut self,
        part: &Wanted,
        by: i32,
        added: &mut Vec<(Set, String)>,
        removed: &mut Vec<(Set, String)>,
    ) {
        fn step<K: Ord + Clone>(m: &mut BTreeMap<K, u32>, k: &K, by: i32) -> Option<bool> {
            if by > 0 {
                let c = m.entry(k.clone()).or_insert(0);
                *c += 1;
                (*c == 1).then_some(true)
            } else {
                let c = m.get_mut(k)?;
                *c -= 1;
                if *c == 0 {
                    m.remove(k);
                    return Some(false);
                }
                None
            }
        }
        let mut crossed = |m: (Set, String), went: Option<bool>| match went {
            Some(true) => added.push(m),
            Some(false) => removed.push(m),
            None => {}
        };
        for (set, members) in &part.sets {
            for member in members {
                let m = (*set, member.clone());
                let went = step(&mut self.members, &m, by);
                crossed(m, went);
            }
        }
        for ip in &part.bind {
            let went = step(&mut self.bind, ip, by);
            crossed((Set::IpvsIps, ip.to_string()), went);
        }
        for rule in &part.out_filter {
            step(&mut self.out_filter, rule, by);
        }
        let dests: usize = part.table.values().map(|v| v.dests.len()).sum();
        self.dests = if by > 0 {
            self.dests + dests
        } else {
            self.dests.saturating_sub(dests)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ChangeSet, IpFamily};

    fn apply(state: &mut State, json: &str) -> BTreeSet<ServiceKey> {
        state
            .apply(ChangeSet::from_json(json.as_bytes()).unwrap())
            .services
    }

    fn svc(name: &str, ip: &str, ext: &str, pod: &str) -> String {
        format!(
            r#"{{"services":[{{"namespace":"ns","name":"{name}","service":{{"cluster_ips":["{ip}"],
            "external_ips":[{ext}],"externally_accessible":true,
            "ports":[{{"name":"p","protocol":"TCP","port":80,"node_port":0}}]}}}}],
            "endpoints":[{{"namespace":"ns","name":"{name}","ports":[{{"name":"p","protocol":"TCP",
            "endpoints":[{{"ip":"{pod}","port":8080,"ready":true,"serving":true,"terminating":false,"node_name":"n1"}}]}}]}}]}}"#
        )
    }

    /// Applying the deltas to the previous full result gives the new full result.
    fn check(state: &State, before: &Wanted, d: &Delta, node: &Node) {
        let after = desired::table(state, node, IpvsScheduler::Rr);
        let mut table = before.table.clone();
        for k in &d.keys {
            match d.table.get(k) {
                Some(v) => table.insert(*k, v.clone()),
                None => table.remove(k),
            };
        }
        assert_eq!(table, after.table);
        let mut sets = before.sets.clone();
        for (s, m) in &d.del {
            assert!(sets.entry(*s).or_default().remove(m), "{s:?} {m}");
        }
        for (s, m) in &d.add {
            assert!(sets.entry(*s).or_default().insert(m.clone()), "{s:?} {m}");
        }
        sets.retain(|_, m| !m.is_empty());
        let mut want = after.sets.clone();
        want.retain(|_, m| !m.is_empty());
        assert_eq!(sets, want);
    }

    #[test]
    fn deltas_carry_exactly_what_changed_and_shared_members_stay() {
        let mut state = State::new(IpFamily::V4);
        let ips: Vec<IpAddr> = vec!["192.168.0.2".parse().unwrap()];
        let node = Node {
            name: "n1",
            nodeport_ips: &ips,
            own_ips: &ips,
        };
        apply(&mut state, &svc("a", "10.96.0.1", "", "10.1.0.1"));
        apply(&mut state, &svc("b", "10.96.0.2", "", "10.1.0.1")); // same pod: shared hairpin
        let (mut ix, before) = Index::build(&state, &node, IpvsScheduler::Rr);
        let whole = desired::table(&state, &node, IpvsScheduler::Rr);
        assert_eq!(
            (&before.table, &before.names, &before.sets, &before.bind),
            (&whole.table, &whole.names, &whole.sets, &whole.bind)
        );
        // b moves to another pod: its hairpin member goes, a's (the same string) stays.
        let changed = apply(&mut state, &svc("b", "10.96.0.2", "", "10.1.0.2"));
        let d = ix
            .update(&state, &changed, &node, IpvsScheduler::Rr)
            .unwrap();
        assert_eq!(d.keys.len(), 1);
        assert!(
            d.del.is_empty(),
            "the shared hairpin member stays: {:?}",
            d.del
        );
        assert_eq!(
            d.add,
            [(Set::LoopBack, "10.1.0.2,tcp:8080,10.1.0.2".into())]
        );
        check(&state, &before, &d, &node);
        // Deleting a Service removes its virtual server, address and members.
        let before = desired::table(&state, &node, IpvsScheduler::Rr);
        let changed = apply(
            &mut state,
            r#"{"services":[{"namespace":"ns","name":"a","service":null}],
                "endpoints":[{"namespace":"ns","name":"a","ports":[]}]}"#,
        );
        let d = ix
            .update(&state, &changed, &node, IpvsScheduler::Rr)
            .unwrap();
        check(&state, &before, &d, &node);
        assert_eq!(ix.bind().count(), 1);
    }

    #[test]
    fn a_contested_virtual_server_asks_for_a_rebuild() {
        let mut state = State::new(IpFamily::V4);
        let node = Node {
            name: "n1",
            nodeport_ips: &[],
            own_ips: &[],
        };
        apply(
            &mut state,
            &svc("a", "10.96.0.1", "\"203.0.113.1\"", "10.1.0.1"),
        );
        let (mut ix, _) = Index::build(&state, &node, IpvsScheduler::Rr);
        let changed = apply(
            &mut state,
            &svc("b", "10.96.0.2", "\"203.0.113.1\"", "10.1.0.2"),
        );
        assert!(ix
            .update(&state, &changed, &node, IpvsScheduler::Rr)
            .is_none());
    }
}
