//! [`Engine`]: one IP family's merged state, the mode's [`Program`] and the full-resync flag.
//!
//! `sync` is the one call Python makes per sync: apply the change set to the state, let the
//! program bring the kernel in line, and return a small [`SyncReport`]. Rule text crosses back
//! only on request. Nothing here knows a mode: that is each `<mode>/program.rs`.

use crate::config::{EngineConfig, Mode};
use crate::contain::{self, Refused};
use crate::error::{Error, Result};
use crate::model::{ChangeSet, ServiceKey};
use crate::program::{self, Program, SyncReport};
use crate::state::{Entry, State};
use std::collections::{BTreeMap, BTreeSet};

/// A Service the kernel refused: what it wants (the engine's state has its fallback).
struct Held {
    wanted: Entry,
    reason: String,
}
use crate::trace::{NodeFacts, Packet, Trace};

pub struct Engine {
    config: EngineConfig,
    state: State,
    program: Box<dyn Program>,
    /// Set at start and after any failure: the kernel's content is unknown.
    need_full: bool,
    /// Services the kernel refused, by key.
    held: BTreeMap<ServiceKey, Held>,
    /// The next sync tries every held Service again (set by [`Engine::retry_refused`]).
    retry: bool,
}

impl Engine {
    /// The engine `config` asks for (its mode, on the kernel or a Fake).
    pub fn new(config: EngineConfig) -> Engine {
        let program = program::build(&config);
        Engine::with_program(config, program)
    }

    /// An engine driving `program` (tests hand in programs on their own backends).
    pub fn with_program(config: EngineConfig, program: Box<dyn Program>) -> Engine {
        Engine {
            state: State::new(config.family),
            config,
            program,
            need_full: true,
            held: BTreeMap::new(),
            retry: false,
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn mode(&self) -> Mode {
        self.config.mode
    }

    /// The merged Services and endpoints after the last sync.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The program, as its mode's concrete type (`None` in another mode): a mode's own calls.
    pub fn program<P: Program>(&self) -> Option<&P> {
        self.program.as_any().downcast_ref::<P>()
    }

    pub fn needs_full_sync(&self) -> bool {
        self.need_full
    }

    /// Apply `changes` and bring the kernel in line with the resulting state.
    ///
    /// `full` asks for everything to be rewritten and the hooks re-ensured (periodic
    /// resyncs). A sync with nothing changed and no full request writes nothing.
    ///
    /// When the kernel refuses the sync, the Services responsible are found and held at
    /// their last good rules, everything else is programmed, and the sync succeeds with
    /// them listed in [`SyncReport::refused`] (see [`crate::contain`]). Any other failure
    /// leaves the kernel as it was (each mode's apply is all-or-nothing, or reads the kernel
    /// back) and makes the next sync full.
    pub fn sync(&mut self, changes: ChangeSet, full: bool) -> Result<SyncReport> {
        let full_request = full || self.need_full;
        let retry = full_request || std::mem::take(&mut self.retry);
        let changes = self.retry_held(changes, retry);
        if !full_request {
            self.program.prepare(&self.state, &changes);
        }
        // What the touched Services had: their fallback if the kernel refuses them now.
        let mut before: BTreeMap<ServiceKey, Entry> = BTreeMap::new();
        for key in changes.services.iter().map(|c| &c.key) {
            before.insert(key.clone(), self.state.entry(key));
        }
        for key in changes.endpoints.iter().map(|c| &c.key) {
            before.insert(key.clone(), self.state.entry(key));
        }
        let applied = self.state.apply(changes);
        let full = full_request || applied.topology;
        let mut report = SyncReport {
            full,
            services_changed: applied.services.len(),
            ..SyncReport::default()
        };
        if !full && applied.services.is_empty() && !applied.service_cidrs {
            report.refused = self.refused();
            return Ok(report);
        }
        report.address_conflicts = self.state.address_conflicts();
        let result = self
            .program
            .sync(&self.state, &applied.services, full, &mut report);
        match result {
            Ok(()) => {
                self.need_full = false;
                // Whatever was held and tried again here is programmed now.
                self.held.retain(|k, _| !before.contains_key(k));
                report.refused = self.refused();
                Ok(report)
            }
            Err(e) if contain::applies(&e) => self.contain(e, before, report),
            Err(e) => {
                if e.needs_full_sync() {
                    self.need_full = true;
                }
                Err(e)
            }
        }
    }

    /// Make the next sync try every refused Service again (the daemon asks on each periodic
    /// sync; full syncs always do).
    pub fn retry_refused(&mut self) {
        self.retry = !self.held.is_empty();
    }

    /// The change set with the held Services' wanted input added: all of it on a full
    /// sync or a retry, and for the Services `changes` touches the parts it does not carry itself.
    fn retry_held(&mut self, mut changes: ChangeSet, all: bool) -> ChangeSet {
        let has_service: BTreeSet<ServiceKey> =
            changes.services.iter().map(|c| c.key.clone()).collect();
        let has_endpoints: BTreeSet<ServiceKey> =
            changes.endpoints.iter().map(|c| c.key.clone()).collect();
        for (key, held) in &self.held {
            let (s, e) = (has_service.contains(key), has_endpoints.contains(key));
            if !(all || s || e) {
                continue;
            }
            let cs = Entry::changes([(key, &held.wanted)]);
            if !s {
                changes.services.extend(cs.services);
            }
            if !e {
                changes.endpoints.extend(cs.endpoints);
            }
        }
        changes
    }

    /// The kernel refused the sync of the current state: program it without the changed
    /// Services responsible (see [`crate::contain`]).
    fn contain(
        &mut self,
        error: Error,
        before: BTreeMap<ServiceKey, Entry>,
        report: SyncReport,
    ) -> Result<SyncReport> {
        // Candidates: the Services this sync changed, each falling back to what it had (so
        // no probe takes away a rule the kernel held). When the state with all of them back
        // is refused too, the failure is not theirs (a Service that did not change, a tool
        // or the kernel itself): the kernel keeps what it had, as without containment.
        let fallback = before;
        let outcome = if fallback.is_empty() {
            None
        } else {
            contain::contain(&mut *self.program, &self.state, &fallback)
        };
        let Some(c) = outcome else {
            self.need_full = true;
            return Err(error);
        };
        for r in c.refused {
            let wanted = self.state.entry(&r.service);
            self.held.insert(
                r.service,
                Held {
                    wanted,
                    reason: r.reason,
                },
            );
        }
        self.state = c.state;
        self.need_full = false;
        Ok(SyncReport {
            full: report.full,
            services_changed: report.services_changed,
            address_conflicts: self.state.address_conflicts(),
            refused: self.refused(),
            probes: c.probes,
            ..c.report
        })
    }

    /// The Services held at their last good rules, and why.
    fn refused(&self) -> Vec<Refused> {
        self.held
            .iter()
            .map(|(k, h)| Refused {
                service: k.clone(),
                reason: h.reason.clone(),
            })
            .collect()
    }

    /// Whether what the mode programmed is all still there. When not, someone flushed our
    /// tables: the caller should run a full sync.
    pub fn canary_intact(&mut self) -> Result<bool> {
        self.program.intact()
    }

    /// The complete input for the current state (`iptables-restore` text, the `nft -f`
    /// transaction of a full sync, the IPVS table, the listeners). Nothing is applied.
    pub fn render(&self) -> String {
        self.program.render(&self.state)
    }

    /// What the backend holds now (`iptables-save` format, `nft list table`, ...).
    pub fn dump(&mut self) -> Result<String> {
        self.program.dump()
    }

    /// Trace the first packet of a connection through the rules this engine programs (the
    /// backend's rules for the in-memory backends; the rendered rules otherwise).
    pub fn trace(&mut self, packet: &Packet, node: &NodeFacts) -> Result<Trace> {
        self.program.trace(&self.state, packet, node)
    }
}

#[cfg(test)]
#[cfg(test)]
pub(crate) mod tests {
    use crate::model::ChangeSet;

    /// `n` Services of one TCP port, `eps` ready endpoints each.
    pub(crate) fn cluster(n: usize, eps: usize) -> ChangeSet {
        let mut services = Vec::new();
        let mut endpoints = Vec::new();
        for i in 0..n {
            services.push(format!(
                r#"{{"namespace":"ns","name":"s{i}","service":{{"cluster_ips":["172.30.{}.{}"],"ports":[{{"name":"p","protocol":"TCP","port":80}}]}}}}"#,
                i / 256,
                i % 256
            ));
            let e: Vec<String> = (0..eps)
                .map(|j| {
                    format!(
                        r#"{{"ip":"10.{}.{}.{}","port":8080,"ready":true,"serving":true,"terminating":false}}"#,
                        (i * eps + j) / 65536,
                        (i * eps + j) / 256 % 256,
                        (i * eps + j) % 256
                    )
                })
                .collect();
            endpoints.push(format!(
                r#"{{"namespace":"ns","name":"s{i}","ports":[{{"name":"p","protocol":"TCP","endpoints":[{}]}}]}}"#,
                e.join(",")
            ));
        }
        let json = format!(
            r#"{{"services":[{}],"endpoints":[{}]}}"#,
            services.join(","),
            endpoints.join(",")
        );
        ChangeSet::from_json(json.as_bytes()).unwrap()
    }
}
