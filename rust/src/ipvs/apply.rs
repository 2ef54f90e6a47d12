//! The ipvs mode's applier: what was applied last, and the sync that moves the
//! kernel's table to the wanted one.
//!
//! A partial sync plans against the table it applied last (no dump); a full sync, or the
//! first after a failure, reads the kernel's table first. When the kernel refuses some
//! operations, the rest stay applied (each message commits alone): the table is read back so
//! the next plan starts from the truth, the refusals are reported naming their Service ports,
//! and the next sync is full.

use super::desired::Wanted;
use super::index::Delta;
use super::ipset::{self, Sets};
use super::plan::{draining, plan};
use super::rules::{self, RuleConfig};
use super::{Backend, Table, VirtualKey};
use crate::error::{Error, Result};
use crate::model::Cidr;
use crate::xtables;
use std::collections::{BTreeMap, BTreeSet};

/// What one sync sent.
#[derive(Debug, Default)]
pub struct Written {
    pub operations: usize,
    pub sends: usize,
    /// ipset members added and deleted (a full sync rewrites every member).
    pub set_members: usize,
    /// Whether the companion iptables rules were rewritten.
    pub rules_written: bool,
}

/// The companions of the IPVS table: ipsets and the iptables rules that match them.
pub struct Companions {
    pub sets: Box<dyn ipset::Backend>,
    pub rules: Box<dyn xtables::Backend>,
    pub config: RuleConfig,
}

pub struct Applier {
    backend: Box<dyn Backend>,
    companions: Companions,
    v6: bool,
    /// Virtual servers on these addresses belong to someone else (`ipvs.excludeCIDRs`).
    exclude: Vec<Cidr>,
    /// What the kernel holds, as far as we know; `None`: read it before planning.
    applied: Option<Table>,
    applied_sets: Option<Sets>,
    /// The out-filter rules last written (`None`: rewrite the rules).
    applied_out_filter: Option<BTreeSet<String>>,
}

impl Applier {
    pub fn new(backend: Box<dyn Backend>, companions: Companions, exclude: Vec<Cidr>) -> Applier {
        let v6 = companions.config.family == crate::model::IpFamily::V6;
        Applier {
            backend,
            companions,
            v6,
            exclude,
            applied: None,
            applied_sets: None,
            applied_out_filter: None,
        }
    }

    /// Bring the kernel to `want`: ipsets first (the rules match them), then the rules, then
    /// the IPVS table. The addresses on kube-ipvs0 are the caller's.
    pub fn sync(&mut self, want: Wanted, full: bool) -> Result<Written> {
        let mut written = Written::default();
        let fam = self.companions.config.family;
        let sets_text = match self.applied_sets.take() {
            Some(have) if !full => ipset::partial_text(fam, &want.sets, &have),
            _ => {
                let names = self.companions.sets.names()?;
                ipset::full_text(fam, &want.sets, &names)
            }
        };
        if !sets_text.is_empty() {
            self.companions.sets.restore(&sets_text)?;
            written.set_members = sets_text
                .lines()
                .filter(|l| l.starts_with("add ") || l.starts_with("del "))
                .count();
        }
        self.applied_sets = Some(want.sets);

        let rules_stale = full || self.applied_out_filter.as_ref() != Some(&want.out_filter);
        if rules_stale {
            self.applied_out_filter = None;
            let out: Vec<String> = want.out_filter.iter().cloned().collect();
            let text = rules::restore_text(&self.companions.config, &out);
            self.companions.rules.restore(&text)?;
            if full {
                self.companions.rules.ensure_jumps(rules::JUMPS)?;
            }
            self.applied_out_filter = Some(want.out_filter);
            written.rules_written = true;
        }

        let have = match self.applied.take() {
            Some(t) if !full => t,
            _ => self.dump()?,
        };
        let (operations, sends, exact) =
            self.program_table(&want.table, have, &want.names, !full)?;
        written.operations = operations;
        written.sends = sends;
        // Real servers left draining at weight 0: the kernel's table is not the wanted one;
        // read it back so the next plan starts from what is there.
        self.applied = Some(if exact { want.table } else { self.dump()? });
        Ok(written)
    }

    /// A partial sync from an [`Index`](super::index::Index) delta: only the changed
    /// Services' virtual servers, set members and (when they changed) rules.
    pub fn sync_delta(&mut self, d: Delta) -> Result<Written> {
        let mut written = Written::default();
        let fam = self.companions.config.family;
        // Taken: any failure below leaves it unknown, so the next sync is full.
        let (Some(mut applied), Some(mut sets)) = (self.applied.take(), self.applied_sets.take())
        else {
            return Err(Error::Apply {
                op: "ipvs",
                code: None,
                stderr: "nothing applied yet: a full sync is needed".into(),
            });
        };
        let text = ipset::delta_text(fam, &d.add, &d.del);
        if !text.is_empty() {
            self.companions.sets.restore(&text)?;
            written.set_members = d.add.len() + d.del.len();
        }
        for (set, m) in &d.del {
            sets.entry(*set).or_default().remove(m);
        }
        for (set, m) in &d.add {
            sets.entry(*set).or_default().insert(m.clone());
        }
        if let Some(out_filter) = d.out_filter {
            let out: Vec<String> = out_filter.iter().cloned().collect();
            let text = rules::restore_text(&self.companions.config, &out);
            self.companions.rules.restore(&text)?;
            self.applied_out_filter = Some(out_filter);
            written.rules_written = true;
        }
        let have: Table = d
            .keys
            .iter()
            .filter_map(|k| applied.get(k).map(|v| (*k, v.clone())))
            .collect();
        let (operations, sends, exact) = self.program_table(&d.table, have, &d.names, true)?;
        written.operations = operations;
        written.sends = sends;
        for k in &d.keys {
            match d.table.get(k) {
                Some(v) => applied.insert(*k, v.clone()),
                None => applied.remove(k),
            };
        }
        if !exact {
            for (k, v) in applied.iter_mut().filter(|(k, _)| d.keys.contains(k)) {
                v.dests = self.backend.dests(k)?;
            }
        }
        self.applied = Some(applied);
        self.applied_sets = Some(sets);
        Ok(written)
    }

    /// Plan `have` to `want` (the same virtual servers, or all of them), apply it, and say
    /// whether the kernel now holds exactly `want` (not so while real servers drain).
    /// `read_leaving`: `have` came from memory, so read the kernel's connection counts of
    /// the TCP real servers that leave (graceful termination needs them).
    fn program_table(
        &mut self,
        want: &Table,
        mut have: Table,
        names: &BTreeMap<VirtualKey, String>,
        read_leaving: bool,
    ) -> Result<(usize, usize, bool)> {
        if read_leaving {
            for (k, h) in have.iter_mut() {
                let leaving = want.get(k).is_some_and(|w| {
                    k.protocol == crate::model::Protocol::Tcp
                        && h.dests.keys().any(|d| !w.dests.contains_key(d))
                });
                if leaving {
                    h.dests = self.backend.dests(k)?;
                }
            }
        }
        let ops = plan(want, &have);
        let out = self.backend.apply(&ops)?;
        if out.refused.is_empty() {
            let exact = draining(want, &have).is_empty();
            return Ok((ops.len(), out.messages_per_send.len(), exact));
        }
        // Each message commits on its own: the rest is applied. The table is unknown now;
        // the next sync (full) reads it.
        self.applied = None;
        let lines: Vec<String> = out
            .refused
            .iter()
            .map(|(i, errno)| {
                let op = &ops[*i];
                let owner = names.get(&op.key()).map_or("?", String::as_str);
                let e = std::io::Error::from_raw_os_error(*errno);
                format!("{owner}: {op}: {e}")
            })
            .collect();
        Err(Error::Netlink {
            op: "ipvs",
            errno: out.refused.first().map(|(_, e)| *e),
            message: format!(
                "the kernel refused {} of {} operations (the others are applied):\n{}",
                lines.len(),
                ops.len(),
                lines.join("\n")
            ),
        })
    }

    /// The kernel's table as it is now, without the virtual servers of excluded addresses.
    pub fn dump(&mut self) -> Result<Table> {
        let mut t = self.backend.dump(self.v6)?;
        if !self.exclude.is_empty() {
            t.retain(|k, _| !self.exclude.iter().any(|c| c.contains(&k.addr)));
        }
        Ok(t)
    }

    /// Whether our chains are still there (someone flushing them calls for a full sync).
    pub fn intact(&mut self) -> Result<bool> {
        let r = &mut self.companions.rules;
        Ok(r.chain_exists("nat", crate::xtables::KUBE_SERVICES)?
            && r.chain_exists("filter", rules::KUBE_IPVS_FILTER)?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::Fake;
    use super::super::{Dest, DestKey, Service, Virtual, VirtualKey};
    use super::*;
    use crate::config::LocalDetector;
    use crate::model::{IpFamily, Protocol};
    use std::collections::BTreeMap;

    fn companions() -> Companions {
        Companions {
            sets: Box::new(ipset::Fake::default()),
            rules: Box::new(xtables::Fake::new()),
            config: RuleConfig {
                family: IpFamily::V4,
                local: LocalDetector::None,
                masquerade_all: false,
                masquerade_mark: 0x4000,
            },
        }
    }

    fn wanted(table: &Table, names: &BTreeMap<VirtualKey, String>) -> Wanted {
        Wanted {
            table: table.clone(),
            names: names.clone(),
            ..Wanted::default()
        }
    }

    fn vk(i: u8) -> VirtualKey {
        VirtualKey {
            addr: format!("10.96.0.{i}").parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
        }
    }

    fn one(dests: &[u8]) -> Virtual {
        Virtual {
            service: Service {
                scheduler: "rr".into(),
                flags: 0,
                timeout: 0,
            },
            dests: dests
                .iter()
                .map(|d| {
                    let k = DestKey {
                        addr: format!("10.244.0.{d}").parse().unwrap(),
                        port: 8080,
                    };
                    (k, Dest::weighted(1))
                })
                .collect(),
        }
    }

    /// A shared Fake the test can inspect while the program owns a handle to it.
    struct Shared(std::sync::Arc<std::sync::Mutex<Fake>>);

    impl Backend for Shared {
        fn apply(&mut self, ops: &[super::super::Op]) -> Result<super::super::Outcome> {
            self.0.lock().unwrap().apply(ops)
        }
        fn dump(&mut self, v6: bool) -> Result<Table> {
            self.0.lock().unwrap().dump(v6)
        }
        fn dests(&mut self, k: &VirtualKey) -> Result<std::collections::BTreeMap<DestKey, Dest>> {
            self.0.lock().unwrap().dests(k)
        }
    }

    #[test]
    fn a_refusal_names_the_service_port_and_the_rest_is_applied_then_reconciled() {
        let fake = std::sync::Arc::new(std::sync::Mutex::new(Fake::default()));
        let mut p = Applier::new(Box::new(Shared(fake.clone())), companions(), vec![]);
        let names: BTreeMap<_, _> = [(vk(1), "ns/a:http".to_owned()), (vk(2), "ns/b:http".into())]
            .into_iter()
            .collect();
        let want = Table::from([(vk(1), one(&[1, 2])), (vk(2), one(&[3]))]);
        fake.lock().unwrap().refuse.insert(vk(2));
        let err = p
            .sync(wanted(&want, &names), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ns/b:http: add virtual server 10.96.0.2:80/tcp"),
            "{err}"
        );
        assert!(err.contains("refused 2 of 5"), "{err}");
        assert_eq!(fake.lock().unwrap().table[&vk(1)], want[&vk(1)]); // applied despite b
                                                                      // The kernel accepts again: the next sync (full, after the failure) completes it,
                                                                      // sending only what is missing.
        fake.lock().unwrap().refuse.clear();
        let before = fake.lock().unwrap().log.len();
        p.sync(wanted(&want, &names), true).unwrap();
        assert_eq!(fake.lock().unwrap().table, want);
        assert_eq!(fake.lock().unwrap().log.len() - before, 2);
        // Nothing changed: nothing sent, and no dump needed for a partial sync.
        let w = p.sync(wanted(&want, &names), false).unwrap();
        assert_eq!(w.operations, 0);
    }

    #[test]
    fn something_else_removing_our_servers_is_repaired_by_a_full_sync() {
        let fake = std::sync::Arc::new(std::sync::Mutex::new(Fake::default()));
        let mut p = Applier::new(Box::new(Shared(fake.clone())), companions(), vec![]);
        let want = Table::from([(vk(1), one(&[1, 2]))]);
        p.sync(wanted(&want, &BTreeMap::new()), true).unwrap();
        fake.lock().unwrap().table.clear(); // ipvsadm -C
        p.sync(wanted(&want, &BTreeMap::new()), true).unwrap();
        assert_eq!(fake.lock().unwrap().table, want);
    }

    #[test]
    fn partial_syncs_read_only_the_virtual_servers_losing_tcp_real_servers() {
        let fake = std::sync::Arc::new(std::sync::Mutex::new(Fake::default()));
        let mut p = Applier::new(Box::new(Shared(fake.clone())), companions(), vec![]);
        let want = Table::from([(vk(1), one(&[1, 2])), (vk(2), one(&[3]))]);
        p.sync(wanted(&want, &BTreeMap::new()), true).unwrap();
        // Real server 2 carries a connection when it leaves: it drains at weight 0.
        let d2 = DestKey {
            addr: "10.244.0.2".parse().unwrap(),
            port: 8080,
        };
        let connections = |n: u32| {
            let mut f = fake.lock().unwrap();
            f.table
                .get_mut(&vk(1))
                .unwrap()
                .dests
                .get_mut(&d2)
                .unwrap()
                .active = n;
        };
        connections(1);
        let less = Table::from([(vk(1), one(&[1])), (vk(2), one(&[3]))]);
        p.sync(wanted(&less, &BTreeMap::new()), false).unwrap();
        assert_eq!(fake.lock().unwrap().table[&vk(1)].dests[&d2].weight, 0);
        // The connection ends; the next full sync deletes the drained server.
        connections(0);
        p.sync(wanted(&less, &BTreeMap::new()), true).unwrap();
        assert_eq!(fake.lock().unwrap().table, less);
    }

    #[test]
    fn excluded_addresses_are_left_alone_and_sets_change_by_difference() {
        let fake = std::sync::Arc::new(std::sync::Mutex::new(Fake::default()));
        let foreign = VirtualKey {
            addr: "192.0.2.1".parse().unwrap(),
            protocol: Protocol::Udp,
            port: 53,
        };
        fake.lock().unwrap().table.insert(foreign, one(&[9]));
        let exclude = vec!["192.0.2.0/24".parse().unwrap()];
        let mut p = Applier::new(Box::new(Shared(fake.clone())), companions(), exclude);
        let want = Table::from([(vk(1), one(&[1]))]);
        let mut w = wanted(&want, &BTreeMap::new());
        w.sets
            .entry(ipset::Set::ClusterIp)
            .or_default()
            .insert("10.96.0.1,tcp:80".into());
        let r = p.sync(w, true).unwrap();
        assert!(r.rules_written && r.set_members == 1);
        assert!(fake.lock().unwrap().table.contains_key(&foreign));
        // Nothing changed: no set member, no rule, no operation.
        let mut w = wanted(&want, &BTreeMap::new());
        w.sets
            .entry(ipset::Set::ClusterIp)
            .or_default()
            .insert("10.96.0.1,tcp:80".into());
        let r = p.sync(w, false).unwrap();
        assert!(!r.rules_written && r.set_members == 0 && r.operations == 0);
    }
}
