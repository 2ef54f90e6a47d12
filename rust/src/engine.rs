//! [`Engine`]: one IP family's merged state, the mode's [`Program`] and the full-resync flag.
//!
//! `sync` is the one call Python makes per sync: apply the change set to the state, let the
//! program bring the kernel in line, and return a small [`SyncReport`]. Rule text crosses back
//! only on request. Nothing here knows a mode: that is each `<mode>/program.rs`.

use crate::config::{EngineConfig, Mode};
use crate::error::Result;
use crate::model::ChangeSet;
use crate::program::{self, Program, SyncReport};
use crate::state::State;
use crate::trace::{NodeFacts, Packet, Trace};

pub struct Engine {
    config: EngineConfig,
    state: State,
    program: Box<dyn Program>,
    /// Set at start and after any failure: the kernel's content is unknown.
    need_full: bool,
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
    /// resyncs). A sync with nothing changed and no full request writes nothing. On failure
    /// the kernel keeps what it had (each mode's apply is all-or-nothing, or reads the kernel
    /// back) and the next sync is full.
    pub fn sync(&mut self, changes: ChangeSet, full: bool) -> Result<SyncReport> {
        if !(full || self.need_full) {
            self.program.prepare(&self.state, &changes);
        }
        let applied = self.state.apply(changes);
        let full = full || self.need_full || applied.topology;
        let mut report = SyncReport {
            full,
            services_changed: applied.services.len(),
            ..SyncReport::default()
        };
        if !full && applied.services.is_empty() {
            return Ok(report);
        }
        report.address_conflicts = self.state.address_conflicts();
        match self
            .program
            .sync(&self.state, &applied.services, full, &mut report)
        {
            Ok(()) => {
                self.need_full = false;
                Ok(report)
            }
            Err(e) => {
                if e.needs_full_sync() {
                    self.need_full = true;
                }
                Err(e)
            }
        }
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
