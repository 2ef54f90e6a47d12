//! The nftables mode's program: turn a sync into one transaction (plus a cleanup transaction
//! for what nothing references any more) and keep the writer in step with the kernel.

use super::ast::{Fmt, Op};
use super::backend::{Backend, Fake, Model};
use super::localhost::LocalhostNodePorts;
use super::render::{self, ServiceObjects};
use super::writer::{Plan, Writer};
use crate::config::{BackendKind, EngineConfig, RenderConfig};
use crate::error::Result;
use crate::model::{ChangeSet, IpFamily, ServiceKey};
use crate::program::{ModeReport, Program, SyncReport};
use crate::state::State;
use crate::trace::{NodeFacts, Packet, Trace};
use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

/// What one nftables sync wrote, and what the table holds after it.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(
    feature = "python",
    pyo3::pyclass(frozen, get_all, module = "kproxy._core", name = "NftablesReport")
)]
pub struct Report {
    pub chains_written: usize,
    pub rules_written: usize,
    pub elements_added: usize,
    pub elements_deleted: usize,
    /// Set and map elements the table holds after this sync.
    pub elements_total: usize,
    pub stale_chains_deleted: usize,
    /// The cleanup transaction was refused (retried by the next sync).
    pub cleanup_failed: bool,
    /// Localhost NodePort listeners open after this sync ([`super::localhost`]).
    pub localhost_listeners: usize,
    /// Localhost NodePort listeners that could not be opened (each names its Service port).
    pub localhost_errors: Vec<String>,
}

pub struct NftablesProgram {
    family: IpFamily,
    render_config: RenderConfig,
    backend: Box<dyn Backend>,
    writer: Writer,
    /// What the Services a change set touches rendered to before it was applied.
    before: BTreeMap<ServiceKey, ServiceObjects>,
    /// Localhost NodePorts, when configured.
    localhost: Option<LocalhostNodePorts>,
}

impl NftablesProgram {
    pub fn new(config: &EngineConfig, backend: Box<dyn Backend>) -> NftablesProgram {
        NftablesProgram {
            family: config.family,
            render_config: config.render_config(),
            backend,
            writer: Writer::default(),
            before: BTreeMap::new(),
            localhost: config
                .nftables
                .as_ref()
                .filter(|n| n.localhost_nodeports)
                .map(|_| {
                    let dry = config.backend == BackendKind::Fake;
                    LocalhostNodePorts::new(config.family, &config.node_name, dry)
                }),
        }
    }

    /// The localhost NodePorts' forwarder counters (empty without them).
    pub fn localhost_stats(&self) -> Vec<(&'static str, u64)> {
        self.localhost
            .as_ref()
            .map(LocalhostNodePorts::stats)
            .unwrap_or_default()
    }

    fn apply(&mut self, ops: &[Op]) -> Result<usize> {
        self.backend.apply(ops)
    }

    /// The table `state` programs, in memory (for the tracer and `kproxy diff`): the Fake's
    /// own table, or the rendered one.
    pub fn model(&self, state: &State) -> Result<Model> {
        if let Some(m) = self.backend.model() {
            return Ok(m.clone());
        }
        let mut fake = Fake::new(self.family);
        fake.apply(&Writer::default().full(state, &self.render_config, &[]).ops)?;
        Ok(fake.model)
    }
}

impl Program for NftablesProgram {
    /// Remember what the Services the change set touches render to now (the kernel's content
    /// for them): the partial sync that follows diffs against it.
    fn prepare(&mut self, state: &State, changes: &ChangeSet) {
        let cfg = &self.render_config;
        self.before = state
            .affected(changes)
            .into_iter()
            .filter(|k| state.has_service(k))
            .map(|k| {
                let objects = render::render_service(state, cfg, &k);
                (k, objects)
            })
            .collect();
    }

    /// Write `changed` (or everything, when `full`). On failure nothing was changed in the
    /// kernel (a transaction is atomic) and the next sync is full.
    fn sync(
        &mut self,
        state: &State,
        changed: &BTreeSet<ServiceKey>,
        full: bool,
        report: &mut SyncReport,
    ) -> Result<()> {
        let t0 = Instant::now();
        let cfg = &self.render_config;
        let plan: Plan = if full {
            // Sessions survive a resync: carry the affinity entries into the new table.
            let affinity = self.backend.affinity()?;
            self.writer.full(state, cfg, &affinity)
        } else {
            self.writer.partial(state, cfg, changed, &mut self.before)
        };
        self.before.clear();
        let mut r = Report {
            chains_written: plan.chains_written,
            rules_written: plan.rules_written,
            elements_added: plan.elements_added,
            elements_deleted: plan.elements_deleted,
            ..Report::default()
        };
        report.render_seconds = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        // The listeners follow the state whatever the table's transaction does: they do not
        // depend on it, and a refused transaction makes the next sync full anyway.
        if let Some(lh) = &mut self.localhost {
            let s = lh.sync(state, changed, full);
            r.localhost_listeners = s.listeners;
            r.localhost_errors = s.errors;
        }
        if !plan.ops.is_empty() {
            report.bytes += self.apply(&plan.ops)?;
            report.transactions += 1;
        }
        if !plan.cleanup.is_empty() {
            // Failing here loses nothing: the stale objects are retried next time.
            match self.apply(&plan.cleanup) {
                Ok(bytes) => {
                    report.bytes += bytes;
                    report.transactions += 1;
                    r.stale_chains_deleted = plan
                        .cleanup
                        .iter()
                        .filter(|o| matches!(o, Op::DeleteChain(_)))
                        .count();
                    self.writer.cleaned();
                }
                Err(_) => r.cleanup_failed = true,
            }
        }
        report.apply_seconds = t1.elapsed().as_secs_f64();
        let totals = self.writer.totals();
        report.wrote = report.transactions > 0;
        report.service_ports = totals.service_ports;
        report.endpoints = totals.endpoints;
        report.no_local_internal = totals.no_local_internal;
        report.no_local_external = totals.no_local_external;
        r.elements_total = self.writer.element_total();
        report.mode = ModeReport::Nftables(r);
        Ok(())
    }

    fn intact(&mut self) -> Result<bool> {
        self.backend.intact()
    }

    /// The complete transaction for `state` (nothing is applied), and the localhost
    /// NodePort listeners as comments after it.
    fn render(&self, state: &State) -> String {
        let ops = Writer::default().full(state, &self.render_config, &[]).ops;
        let mut out = Fmt(self.family).script(&ops);
        if let Some(lh) = &self.localhost {
            out.push_str("# localhost NodePorts (a userspace proxy, not rules):\n");
            for line in lh.describe(state).lines() {
                out.push_str(&format!("# {line}\n"));
            }
        }
        out
    }

    fn dump(&mut self) -> Result<String> {
        let mut out = self.backend.dump()?;
        if let Some(lh) = &self.localhost {
            out.push_str(&lh.dump());
        }
        Ok(out)
    }

    fn trace(&mut self, state: &State, packet: &Packet, node: &NodeFacts) -> Result<Trace> {
        let model = self.model(state)?;
        let mut out = super::trace::trace(&model, self.family, packet, node);
        if let Some(lh) = &self.localhost {
            lh.trace(state, packet, &mut out);
        }
        Ok(out)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Remove kproxy's nftables table in one family (safe when there is none).
pub fn cleanup(backend: &mut dyn Backend) -> Result<()> {
    backend.apply(&[Op::AddTable, Op::DeleteTable]).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EngineConfig;
    use crate::engine::Engine;
    use crate::model::ChangeSet;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A Fake whose next transactions can be made to fail from outside the engine.
    struct Flaky {
        inner: Fake,
        fail: Arc<AtomicUsize>,
        /// Refuse every transaction that deletes a set (a cleanup).
        refuse_set_deletes: Arc<AtomicBool>,
    }

    impl Backend for Flaky {
        fn apply(&mut self, ops: &[Op]) -> Result<usize> {
            let deletes_a_set = ops.iter().any(|o| matches!(o, Op::DeleteSet(_)));
            if deletes_a_set && self.refuse_set_deletes.load(Ordering::SeqCst) {
                self.fail.store(1, Ordering::SeqCst);
            }
            if self.fail.load(Ordering::SeqCst) > 0 {
                self.fail.fetch_sub(1, Ordering::SeqCst);
                return Err(crate::error::Error::Apply {
                    op: "nft -f",
                    code: Some(1),
                    stderr: "refused".into(),
                });
            }
            self.inner.apply(ops)
        }
        fn affinity(&mut self) -> Result<Vec<(super::super::ast::Key, u32)>> {
            self.inner.affinity()
        }
        fn intact(&mut self) -> Result<bool> {
            self.inner.intact()
        }
        fn dump(&mut self) -> Result<String> {
            self.inner.dump()
        }
        fn model(&self) -> Option<&Model> {
            self.inner.model()
        }
    }

    fn cleanup_failed(r: &SyncReport) -> bool {
        matches!(&r.mode, ModeReport::Nftables(n) if n.cleanup_failed)
    }

    fn changes(eps_of_s1: &[&str]) -> ChangeSet {
        let eps: Vec<String> = eps_of_s1
            .iter()
            .map(|ip| {
                format!(
                    r#"{{"ip":"{ip}","port":8080,"ready":true,"serving":true,"terminating":false}}"#
                )
            })
            .collect();
        let json = format!(
            r#"{{"services":[{{"namespace":"ns","name":"s1","service":{{"cluster_ips":["172.30.0.1"],"ports":[{{"name":"p","protocol":"TCP","port":80}}]}}}}],
               "endpoints":[{{"namespace":"ns","name":"s1","ports":[{{"name":"p","protocol":"TCP","endpoints":[{}]}}]}}]}}"#,
            eps.join(",")
        );
        ChangeSet::from_json(json.as_bytes()).unwrap()
    }

    #[test]
    fn a_refused_transaction_keeps_the_table_and_makes_the_next_sync_full() {
        let cfg = EngineConfig::from_json(
            r#"{"family":"IPv4","node_name":"n","mode":"nftables","backend":"fake"}"#,
        )
        .unwrap();
        let fail = Arc::new(AtomicUsize::new(0));
        let backend = Flaky {
            inner: Fake::new(IpFamily::V4),
            fail: fail.clone(),
            refuse_set_deletes: Arc::default(),
        };
        let program = NftablesProgram::new(&cfg, Box::new(backend));
        let mut engine = Engine::with_program(cfg, Box::new(program));
        engine
            .sync(changes(&["10.1.0.1", "10.1.0.2"]), false)
            .unwrap();
        let before = engine.dump().unwrap();
        // Refused twice: the sync, and its contained retry with the change undone (so the
        // refusal is not the changed Service's).
        fail.store(2, Ordering::SeqCst);
        assert!(engine.sync(changes(&["10.1.0.3"]), false).is_err());
        assert!(engine.needs_full_sync());
        assert_eq!(engine.dump().unwrap(), before);
        let r = engine.sync(ChangeSet::default(), false).unwrap();
        assert!(r.full);
        assert!(engine.dump().unwrap().contains("10.1.0.3 . 8080"));
        assert!(!engine.dump().unwrap().contains("10.1.0.2"));
    }

    /// A pool left empty goes with its set rather than element by element; when the set's
    /// deletion is refused and the pool is needed again, it is started anew.
    #[test]
    fn a_pool_whose_cleanup_failed_is_recreated_when_reused() {
        let cfg = EngineConfig::from_json(
            r#"{"family":"IPv4","node_name":"n","mode":"nftables","backend":"fake"}"#,
        )
        .unwrap();
        let refuse = Arc::new(AtomicBool::new(false));
        let backend = Flaky {
            inner: Fake::new(IpFamily::V4),
            fail: Arc::default(),
            refuse_set_deletes: refuse.clone(),
        };
        let program = NftablesProgram::new(&cfg, Box::new(backend));
        let mut engine = Engine::with_program(cfg, Box::new(program));
        engine
            .sync(changes(&["10.1.0.1", "10.1.0.2"]), false)
            .unwrap();
        refuse.store(true, Ordering::SeqCst);
        // endpoints-2 is retired: its elements are not deleted one by one, and its cleanup is
        // refused, so the set keeps them.
        let r = engine
            .sync(changes(&["10.1.0.1", "10.1.0.2", "10.1.0.3"]), false)
            .unwrap();
        assert!(cleanup_failed(&r) && !r.full);
        let dump = engine.dump().unwrap();
        assert!(
            dump.contains("endpoints-2") && dump.contains("10.1.0.2"),
            "{dump}"
        );
        refuse.store(false, Ordering::SeqCst);
        // Back to two endpoints: the stale set would refuse the new data for its keys.
        let r = engine
            .sync(changes(&["10.1.0.4", "10.1.0.5"]), false)
            .unwrap();
        assert!(!r.full && !cleanup_failed(&r));
        let dump = engine.dump().unwrap();
        for gone in ["10.1.0.1", "10.1.0.2", "10.1.0.3", "endpoints-3"] {
            assert!(!dump.contains(gone), "{gone} in {dump}");
        }
        assert!(dump.contains("10.1.0.4 . 8080") && dump.contains("10.1.0.5 . 8080"));
    }

    #[test]
    fn render_is_the_full_sync_transaction() {
        use super::super::testutil::{cluster, state};
        let cfg = EngineConfig::from_json(
            r#"{"family":"IPv4","node_name":"node-a","mode":"nftables","backend":"fake",
                "cluster_cidrs":["10.0.0.0/8"],"node_ips":["192.168.0.2"]}"#,
        )
        .unwrap();
        // The engine config that makes testutil's render config.
        assert_eq!(
            format!("{:?}", cfg.render_config()),
            format!("{:?}", super::super::testutil::cfg(IpFamily::V4))
        );
        let program = NftablesProgram::new(&cfg, Box::new(Fake::new(IpFamily::V4)));
        assert_eq!(
            program.render(&state(IpFamily::V4, &cluster(IpFamily::V4))),
            include_str!("testdata/table-v4.nft")
        );
    }
}
