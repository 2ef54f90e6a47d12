//! The engine's nftables side: turn a sync into one transaction (plus a cleanup transaction
//! for what nothing references any more) and keep the writer in step with the kernel.

use super::ast::{Fmt, Op};
use super::backend::{Backend, Fake, Model};
use super::writer::{Plan, Writer};
use crate::error::Result;
use crate::iptables::render::RenderConfig;
use crate::model::{IpFamily, ServiceKey};
use crate::state::State;
use std::collections::BTreeSet;

/// What one nftables sync wrote.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Written {
    pub transactions: usize,
    pub bytes: usize,
    pub chains_written: usize,
    pub rules_written: usize,
    pub elements_added: usize,
    pub elements_deleted: usize,
    pub stale_chains_deleted: usize,
    pub render_seconds: f64,
    pub apply_seconds: f64,
}

pub struct Program {
    family: IpFamily,
    backend: Box<dyn Backend>,
    writer: Writer,
}

impl Program {
    pub fn new(family: IpFamily, backend: Box<dyn Backend>) -> Program {
        Program {
            family,
            backend,
            writer: Writer::default(),
        }
    }

    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    /// Write `changed` (or everything, when `full`). On failure nothing was changed in the
    /// kernel (a transaction is atomic) and the caller must make the next sync full.
    pub fn sync(
        &mut self,
        state: &State,
        cfg: &RenderConfig,
        changed: &BTreeSet<ServiceKey>,
        full: bool,
    ) -> Result<Written> {
        let t0 = std::time::Instant::now();
        let plan: Plan = if full {
            // Sessions survive a resync: carry the affinity entries into the new table.
            let affinity = self.backend.affinity()?;
            self.writer.full(state, cfg, &affinity)
        } else {
            self.writer.partial(state, cfg, changed)
        };
        let mut w = Written {
            chains_written: plan.chains_written,
            rules_written: plan.rules_written,
            elements_added: plan.elements_added,
            elements_deleted: plan.elements_deleted,
            render_seconds: t0.elapsed().as_secs_f64(),
            ..Written::default()
        };
        let t1 = std::time::Instant::now();
        if !plan.ops.is_empty() {
            w.bytes += self.apply(&plan.ops)?;
            w.transactions += 1;
        }
        if !plan.cleanup.is_empty() {
            // Failing here loses nothing: the stale objects are retried next time.
            if let Ok(bytes) = self.apply(&plan.cleanup) {
                w.bytes += bytes;
                w.transactions += 1;
                w.stale_chains_deleted = plan
                    .cleanup
                    .iter()
                    .filter(|o| matches!(o, Op::DeleteChain(_)))
                    .count();
                self.writer.cleaned();
            }
        }
        w.apply_seconds = t1.elapsed().as_secs_f64();
        Ok(w)
    }

    fn apply(&mut self, ops: &[Op]) -> Result<usize> {
        self.backend.apply(ops)
    }

    /// The complete transaction for `state` (nothing is applied).
    pub fn render(&self, state: &State, cfg: &RenderConfig) -> String {
        Fmt(self.family).script(&Writer::default().full(state, cfg, &[]).ops)
    }

    /// The table `state` programs, in memory (for the tracer).
    pub fn model(&self, state: &State, cfg: &RenderConfig) -> Result<Model> {
        if let Some(m) = self.backend.model() {
            return Ok(m.clone());
        }
        let mut fake = Fake::new(self.family);
        fake.apply(&Writer::default().full(state, cfg, &[]).ops)?;
        Ok(fake.model)
    }

    pub fn intact(&mut self) -> Result<bool> {
        self.backend.intact()
    }

    pub fn dump(&mut self) -> Result<String> {
        self.backend.dump()
    }
}

/// Remove kproxy's nftables table in one family (safe when there is none).
pub fn cleanup(backend: &mut dyn Backend) -> Result<()> {
    backend.apply(&[Op::AddTable, Op::DeleteTable]).map(|_| ())
}
