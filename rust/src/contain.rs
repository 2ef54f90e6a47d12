//! Containment: when the kernel refuses a sync, find the Services responsible and program
//! everything else.
//!
//! Works for every mode, because it needs only what every [`Program`] does: a full sync of
//! any state, which a failed sync never stops from working. The candidates are the Services
//! the refused sync changed. Each probe is a full sync of the new state with some candidates
//! set back to their fallback: their input before the change, which is what the kernel held
//! for them (nothing, for a new Service). No probe takes away a rule the kernel had. The
//! search is a bisection: a group whose probe fails is split in two until single Services
//! remain, so one bad Service among `n` changed ones costs about `2 log2 n` probes.
//!
//! The result is a state with every refused Service at its fallback, already in the kernel.
//! The engine keeps that state as its own and holds each refused Service's wanted input, to
//! try it again on its next change and on each full sync.

use crate::error::{Error, Result};
use crate::model::ServiceKey;
use crate::program::{Program, SyncReport};
use crate::state::{Entry, State};
use std::collections::{BTreeMap, BTreeSet};

/// At most this many probes per contained sync. A search that runs out holds every Service
/// of the groups it has not split yet (so a sync always ends, in a bounded time).
pub const MAX_PROBES: usize = 64;

/// A Service the kernel refused: its rules stay as they were (none when it is new).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub service: ServiceKey,
    /// The kernel's (or the tool's) message for this Service alone.
    pub reason: String,
}

/// What a contained sync ends with.
pub struct Contained {
    /// The state the kernel now holds: `wanted` with each refused Service at its fallback.
    pub state: State,
    pub refused: Vec<Refused>,
    /// The report of the probe that programmed `state`.
    pub report: SyncReport,
    pub probes: usize,
}

/// Whether containment applies: the kernel refused input. A tool that cannot run, or input
/// the core rejects, is not about any one Service.
pub fn applies(e: &Error) -> bool {
    e.is_refusal()
}

struct Search<'a> {
    program: &'a mut dyn Program,
    wanted: &'a State,
    fallback: &'a BTreeMap<ServiceKey, Entry>,
    probes: usize,
}

impl Search<'_> {
    /// A full sync of `wanted` with every candidate outside `accepted` at its fallback.
    fn probe(&mut self, accepted: &BTreeSet<ServiceKey>) -> Result<(State, SyncReport)> {
        self.probes += 1;
        let mut state = self.wanted.clone();
        let back = self.fallback.iter().filter(|(k, _)| !accepted.contains(*k));
        state.apply(Entry::changes(back));
        let mut report = SyncReport {
            full: true,
            ..SyncReport::default()
        };
        self.program
            .sync(&state, &BTreeSet::new(), true, &mut report)?;
        Ok((state, report))
    }
}

/// Find the refused Services among the keys of `fallback` (each mapped to its fallback) and
/// program `wanted` without them. `None` when even the state with every candidate at its
/// fallback is refused: the failure is not any one Service's.
pub fn contain(
    program: &mut dyn Program,
    wanted: &State,
    fallback: &BTreeMap<ServiceKey, Entry>,
) -> Option<Contained> {
    let mut search = Search {
        program,
        wanted,
        fallback,
        probes: 0,
    };
    let mut accepted: BTreeSet<ServiceKey> = BTreeSet::new();
    let mut last = search.probe(&accepted).ok()?;
    let mut last_is_accepted = true;
    let mut refused = Vec::new();
    // Groups still to try, the next one last. The whole candidate set is known to fail.
    let all: Vec<ServiceKey> = fallback.keys().cloned().collect();
    let mut todo: Vec<Vec<ServiceKey>> = split(all).into_iter().rev().collect();
    while let Some(group) = todo.pop() {
        if search.probes >= MAX_PROBES {
            let reason = format!(
                "refused in a batch that could not be narrowed down within {MAX_PROBES} tries"
            );
            for g in std::iter::once(group).chain(todo.drain(..)) {
                refused.extend(g.into_iter().map(|service| Refused {
                    service,
                    reason: reason.clone(),
                }));
            }
            break;
        }
        let mut trial = accepted.clone();
        trial.extend(group.iter().cloned());
        match search.probe(&trial) {
            Ok(ok) => {
                accepted = trial;
                last = ok;
                last_is_accepted = true;
            }
            Err(e) if group.len() == 1 => {
                last_is_accepted = false;
                refused.push(Refused {
                    service: group[0].clone(),
                    reason: e.to_string(),
                });
            }
            Err(_) => {
                last_is_accepted = false;
                todo.extend(split(group).into_iter().rev());
            }
        }
    }
    if !last_is_accepted {
        last = search.probe(&accepted).ok()?;
    }
    let probes = search.probes;
    let (state, report) = last;
    Some(Contained {
        state,
        refused,
        report,
        probes,
    })
}

fn split(mut group: Vec<ServiceKey>) -> Vec<Vec<ServiceKey>> {
    if group.len() < 2 {
        return vec![group];
    }
    let second = group.split_off(group.len() / 2);
    vec![group, second]
}

#[cfg(test)]
mod tests {
    use crate::config::EngineConfig;
    use crate::engine::Engine;
    use crate::iptables::program::IptablesProgram;
    use crate::model::ChangeSet;
    use crate::xtables::{Backend, Fake};
    use std::collections::BTreeSet;
    use std::sync::{Arc, Mutex};

    /// The iptables Fake, reachable from the test while the engine drives it.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Fake>>);

    impl Backend for Shared {
        fn restore(&mut self, text: &str) -> crate::error::Result<()> {
            self.0.lock().unwrap().restore(text)
        }
        fn ensure_jumps(
            &mut self,
            jumps: &[crate::xtables::jumps::Jump],
        ) -> crate::error::Result<()> {
            self.0.lock().unwrap().ensure_jumps(jumps)
        }
        fn remove_jumps(
            &mut self,
            jumps: &[crate::xtables::jumps::Jump],
        ) -> crate::error::Result<()> {
            self.0.lock().unwrap().remove_jumps(jumps)
        }
        fn chains(&mut self, table: &str) -> crate::error::Result<BTreeSet<String>> {
            self.0.lock().unwrap().chains(table)
        }
        fn chain_exists(&mut self, table: &str, chain: &str) -> crate::error::Result<bool> {
            self.0.lock().unwrap().chain_exists(table, chain)
        }
        fn dump(&mut self) -> crate::error::Result<String> {
            self.0.lock().unwrap().dump()
        }
        fn ensure_counter(&mut self, name: &str) -> crate::error::Result<()> {
            self.0.lock().unwrap().ensure_counter(name)
        }
        fn counter(&self, name: &str) -> crate::error::Result<Option<u64>> {
            self.0.lock().unwrap().counter(name)
        }
    }

    fn service(name: &str, ip: &str, endpoint: Option<&str>) -> String {
        let eps = endpoint.map_or(String::new(), |e| {
            format!(
                r#"{{"namespace":"ns","name":"{name}","ports":[{{"name":"p","protocol":"TCP","endpoints":[{{"ip":"{e}","port":8080,"ready":true,"serving":true,"terminating":false}}]}}]}}"#
            )
        });
        format!(
            r#"{{"services":[{{"namespace":"ns","name":"{name}","service":{{"cluster_ips":["{ip}"],"ports":[{{"name":"p","protocol":"TCP","port":80}}]}}}}],"endpoints":[{eps}]}}"#
        )
    }

    fn cs(json: &str) -> ChangeSet {
        ChangeSet::from_json(json.as_bytes()).unwrap()
    }

    /// Someone's own rule jumps to a Service's chain, so the kernel refuses to delete it:
    /// the other Services' changes in the same sync land, the Service keeps its rules, and it
    /// is reported until the reference is gone and a full sync deletes it.
    #[test]
    fn a_refused_service_is_held_and_the_rest_is_programmed() {
        let cfg = EngineConfig::from_json(
            r#"{"family":"IPv4","node_name":"n","cluster_cidrs":["10.0.0.0/8"],"backend":"fake"}"#,
        )
        .unwrap();
        let fake = Shared::default();
        let program = IptablesProgram::new(&cfg, Box::new(fake.clone()));
        let mut engine = Engine::with_program(cfg, Box::new(program));
        let mut all = cs(&service("a", "172.30.0.1", Some("10.1.0.1")));
        for (i, name) in ["b", "c", "d", "e"].iter().enumerate() {
            let more = cs(&service(
                name,
                &format!("172.30.0.{}", i + 2),
                Some("10.1.0.2"),
            ));
            all.services.extend(more.services);
            all.endpoints.extend(more.endpoints);
        }
        engine.sync(all, true).unwrap();
        let dump = fake.0.lock().unwrap().dump().unwrap();
        // a's endpoint chain (the one that DNATs to 10.1.0.1).
        let sep_a = dump
            .lines()
            .find(|l| l.starts_with("-A KUBE-SEP-") && l.contains("10.1.0.1:8080"))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap()
            .to_owned();
        // The foreign reference.
        fake.0
            .lock()
            .unwrap()
            .restore(&format!(
                "*nat\n:MINE - [0:0]\n-A MINE -j {sep_a}\nCOMMIT\n"
            ))
            .unwrap();
        // a's endpoint goes (so must its chain) while c moves to another endpoint.
        let mut change = cs(r#"{"endpoints":[{"namespace":"ns","name":"a","ports":[]}]}"#);
        change
            .endpoints
            .extend(cs(&service("c", "172.30.0.3", Some("10.1.0.9"))).endpoints);
        let r = engine.sync(change, false).unwrap();
        assert_eq!(r.refused.len(), 1, "{r:?}");
        assert_eq!(r.refused[0].service.name.as_str(), "a");
        assert!(r.refused[0].reason.contains(&sep_a), "{:?}", r.refused);
        assert!(r.probes > 0 && r.probes <= super::MAX_PROBES);
        let dump = fake.0.lock().unwrap().dump().unwrap();
        assert!(dump.contains("10.1.0.9"), "c's change landed");
        assert!(
            dump.contains(&format!(":{sep_a} ")),
            "a keeps its last good rules"
        );
        // Still refused on the next full sync; reported by every sync meanwhile.
        let r = engine.sync(ChangeSet::default(), false).unwrap();
        assert_eq!(r.refused.len(), 1);
        let r = engine.sync(ChangeSet::default(), true).unwrap();
        assert_eq!(r.refused.len(), 1);
        // The reference goes: the next full sync programs a as wanted.
        fake.0
            .lock()
            .unwrap()
            .restore("*nat\n:MINE - [0:0]\n-X MINE\nCOMMIT\n")
            .unwrap();
        let r = engine.sync(ChangeSet::default(), true).unwrap();
        assert!(r.refused.is_empty(), "{r:?}");
        let dump = fake.0.lock().unwrap().dump().unwrap();
        assert!(
            !dump.contains(&sep_a) && !dump.contains("10.1.0.1"),
            "{dump}"
        );
    }
}
