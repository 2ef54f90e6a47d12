//! The iptables mode's program: render what changed, apply it with `iptables-restore
//! --noflush` (in batches when large), and keep the writer in step with the kernel.

use super::chains;
use super::writer::Writer;
use crate::config::{BackendKind, EngineConfig, RenderConfig};
use crate::error::Result;
use crate::model::{IpFamily, ServiceKey};
use crate::program::{ModeReport, Program, SyncReport};
use crate::state::State;
use crate::trace::xtables as trace;
use crate::trace::{NodeFacts, Packet, Trace};
use crate::xtables::Backend;
use std::any::Any;
use std::collections::BTreeSet;
use std::time::Instant;

/// Above this many rules a sync is applied in batches of about this size (measured on this
/// project's 2-core machines: 4,000 services x 10 endpoints took 34 s as one transaction and
/// 10 s in batches of ~16k rules).
const BATCH_RULES: usize = 16_000;

/// What one iptables sync wrote, and what the kernel holds after it.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(
    feature = "python",
    pyo3::pyclass(frozen, get_all, module = "kproxy._core", name = "IptablesReport")
)]
pub struct Report {
    /// Rules written by this sync (a partial sync writes only what changed).
    pub nat_rules: usize,
    pub filter_rules: usize,
    pub chains_written: usize,
    pub stale_chains_deleted: usize,
    /// Rules kproxy owns in the kernel after this sync.
    pub nat_rules_total: usize,
    pub filter_rules_total: usize,
}

pub struct IptablesProgram {
    render_config: RenderConfig,
    backend: Box<dyn Backend>,
    /// The tracer reads the Fake's own rules; the kernel's are traced as rendered.
    traces_backend: bool,
    /// What previous syncs wrote (reset by every full sync).
    writer: Writer,
}

impl IptablesProgram {
    pub fn new(config: &EngineConfig, backend: Box<dyn Backend>) -> IptablesProgram {
        IptablesProgram {
            render_config: config.render_config(),
            backend,
            traces_backend: config.backend == BackendKind::Fake,
            writer: Writer::default(),
        }
    }

    fn ensure_jumps(&mut self) -> Result<()> {
        self.backend.ensure_jumps(chains::JUMPS)?;
        let cfg = &self.render_config;
        if cfg.localhost_nodeports && cfg.family == IpFamily::V4 {
            self.backend.ensure_jumps(chains::FIREWALL_JUMPS)?;
        }
        Ok(())
    }
}

impl Program for IptablesProgram {
    fn sync(
        &mut self,
        state: &State,
        changed: &BTreeSet<ServiceKey>,
        full: bool,
        report: &mut SyncReport,
    ) -> Result<()> {
        let t0 = Instant::now();
        let plan = if full {
            let filter = self.backend.chains("filter")?;
            let nat = self.backend.chains("nat")?;
            self.writer.full(state, &self.render_config, &filter, &nat)
        } else {
            self.writer.partial(state, &self.render_config, changed)
        };
        let batches = if plan.rule_count() > BATCH_RULES {
            plan.batches(BATCH_RULES)
        } else if plan.is_empty() {
            Vec::new()
        } else {
            vec![plan.text()]
        };
        report.render_seconds = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        for text in &batches {
            self.backend.restore(text)?;
        }
        if full {
            self.ensure_jumps()?;
        }
        report.apply_seconds = t1.elapsed().as_secs_f64();

        let totals = self.writer.totals();
        report.wrote = !plan.is_empty() || full;
        report.service_ports = totals.service_ports;
        report.endpoints = totals.endpoints;
        report.no_local_internal = totals.no_local_internal;
        report.no_local_external = totals.no_local_external;
        report.bytes = batches.iter().map(String::len).sum();
        report.transactions = batches.len();
        let (filter_rules_total, nat_rules_total) = self.writer.rule_totals();
        report.mode = ModeReport::Iptables(Report {
            nat_rules: plan.nat_rule_count(),
            filter_rules: plan.filter_rule_count(),
            chains_written: plan.chains_written(),
            stale_chains_deleted: plan.deleted(),
            nat_rules_total,
            filter_rules_total,
        });
        Ok(())
    }

    /// Whether the canary chains are all still there.
    fn intact(&mut self) -> Result<bool> {
        for table in chains::CANARY_TABLES {
            if !self.backend.chain_exists(table, chains::CANARY)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The `iptables-restore` input of a full sync.
    fn render(&self, state: &State) -> String {
        super::render(state, &self.render_config).restore_text(&BTreeSet::new())
    }

    /// `iptables-save` output of kproxy's tables.
    fn dump(&mut self) -> Result<String> {
        self.backend.dump()
    }

    fn trace(&mut self, state: &State, packet: &Packet, node: &NodeFacts) -> Result<Trace> {
        let rules = if self.traces_backend {
            trace::Ruleset::parse(&self.backend.dump()?)?
        } else {
            let mut rules = trace::Ruleset::parse(&self.render(state))?;
            rules.add_jumps(chains::JUMPS)?;
            rules
        };
        Ok(trace::trace(&rules, packet, node, &[]))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tests::cluster;
    use crate::engine::Engine;
    use crate::xtables::Fake;

    fn config() -> EngineConfig {
        EngineConfig::from_json(
            r#"{"family":"IPv4","node_name":"n","cluster_cidrs":["10.0.0.0/8"],"backend":"fake"}"#,
        )
        .unwrap()
    }

    fn iptables(r: &SyncReport) -> &Report {
        match &r.mode {
            ModeReport::Iptables(r) => r,
            other => panic!("not an iptables report: {other:?}"),
        }
    }

    #[test]
    fn rule_totals_count_what_the_kernel_holds() {
        let mut engine = Engine::new(config());
        let r = engine.sync(cluster(20, 3), true).unwrap();
        let dump = engine.dump().unwrap();
        let count = |table: &str| {
            dump.split("COMMIT")
                .find(|t| t.contains(&format!("*{table}")))
                .unwrap()
                .lines()
                .filter(|l| l.starts_with("-A KUBE-"))
                .count()
        };
        assert_eq!(iptables(&r).nat_rules_total, count("nat"));
        assert_eq!(iptables(&r).filter_rules_total, count("filter"));
        let r = engine.sync(cluster(1, 1), false).unwrap();
        assert!(!r.full);
        let dump = engine.dump().unwrap();
        let nat: usize = dump
            .split("COMMIT")
            .find(|t| t.contains("*nat"))
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("-A KUBE-"))
            .count();
        assert_eq!(iptables(&r).nat_rules_total, nat);
    }

    #[test]
    fn a_large_sync_in_batches_equals_one_transaction() {
        let mut engine = Engine::new(config());
        let report = engine.sync(cluster(1500, 10), true).unwrap();
        assert!(report.transactions > 1, "{report:?}");
        let mut single = Fake::new();
        single.restore(&engine.render()).unwrap();
        single.ensure_jumps(chains::JUMPS).unwrap();
        let mut canary = String::new();
        for t in chains::CANARY_TABLES {
            canary.push_str(&format!("*{t}\n:{} - [0:0]\nCOMMIT\n", chains::CANARY));
        }
        single.restore(&canary).unwrap();
        assert_eq!(engine.dump().unwrap(), single.dump().unwrap());
        // A small change afterwards is one transaction again.
        let r = engine.sync(cluster(1, 3), false).unwrap();
        assert_eq!(r.transactions, 1);
    }
}
