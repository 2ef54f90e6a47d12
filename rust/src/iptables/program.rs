//! The iptables mode's program: render what changed, apply it with `iptables-restore
//! --noflush` (in batches when large), and keep the writer in step with the kernel.

use super::chains;
use super::writer::Writer;
use crate::config::{BackendKind, EngineConfig, RenderConfig};
use crate::error::Result;
use crate::model::{IpFamily, ServiceKey};
use crate::nfacct;
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
    /// nfacct counters that could not be created (the first sync only): their rules are
    /// written without counting.
    pub counter_errors: Vec<String>,
}

pub struct IptablesProgram {
    render_config: RenderConfig,
    backend: Box<dyn Backend>,
    /// The tracer reads the Fake's own rules; the kernel's are traced as rendered.
    traces_backend: bool,
    /// What previous syncs wrote (reset by every full sync).
    writer: Writer,
    /// The nfacct counters were tried (once, before the first sync renders anything).
    counters_tried: bool,
    counter_errors: Vec<String>,
}

impl IptablesProgram {
    pub fn new(config: &EngineConfig, backend: Box<dyn Backend>) -> IptablesProgram {
        IptablesProgram {
            render_config: config.render_config(),
            backend,
            traces_backend: config.backend == BackendKind::Fake,
            writer: Writer::default(),
            counters_tried: false,
            counter_errors: Vec::new(),
        }
    }

    /// Create upstream's nfacct counters that this configuration's rules use; the rules
    /// count into the ones that exist. Returns what could not be created.
    fn ensure_counters(&mut self) -> Vec<String> {
        self.counters_tried = true;
        let cfg = &self.render_config;
        let mut wanted = Vec::new();
        if !cfg.conntrack_tcp_be_liberal {
            wanted.push(nfacct::INVALID_DROPPED);
        }
        if cfg.localhost_nodeports && cfg.family == IpFamily::V4 {
            wanted.push(nfacct::LOCALHOST_NODEPORTS);
        }
        let mut errors = Vec::new();
        for name in wanted {
            match self.backend.ensure_counter(name) {
                Ok(()) => self.render_config.nfacct.push(name),
                Err(e) => errors.push(e.to_string()),
            }
        }
        errors
    }

    /// Each counter this engine's rules count into, with its packets so far (`None`: it
    /// went away, for instance removed by hand).
    pub fn counters(&self) -> Result<Vec<(&'static str, Option<u64>)>> {
        let names = &self.render_config.nfacct;
        names
            .iter()
            .map(|n| Ok((*n, self.backend.counter(n)?)))
            .collect()
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
        if !self.counters_tried {
            self.counter_errors = self.ensure_counters();
        }
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
            // Said by the first sync that succeeds.
            counter_errors: std::mem::take(&mut self.counter_errors),
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
        // The engine created its counter before its first rules named it.
        single
            .ensure_counter(crate::nfacct::INVALID_DROPPED)
            .unwrap();
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

    const NODE_PORT_SERVICE: &str = r#"{"services":[{"namespace":"ns","name":"web","service":{"cluster_ips":["172.30.0.1"],"externally_accessible":true,"ports":[{"name":"p","protocol":"TCP","port":80,"node_port":30080}]}}],"endpoints":[{"namespace":"ns","name":"web","ports":[{"name":"p","protocol":"TCP","endpoints":[{"ip":"10.0.0.5","port":8080,"ready":true,"serving":true,"terminating":false}]}]}]}"#;

    fn localhost_config() -> EngineConfig {
        EngineConfig::from_json(
            r#"{"family":"IPv4","node_name":"n","cluster_cidrs":["10.0.0.0/8"],"backend":"fake","iptables":{"localhost_nodeports":true}}"#,
        )
        .unwrap()
    }

    /// Upstream's nfacct counters: created before the first rules name them; the INVALID
    /// drop counts into one, and a NodePort reached on 127.0.0.0/8 goes through a counting
    /// rule first, to the same place as from anywhere else.
    #[test]
    fn the_rules_count_into_the_nfacct_counters_they_created() {
        let mut engine = Engine::new(localhost_config());
        let r = engine
            .sync(
                crate::model::ChangeSet::from_json(NODE_PORT_SERVICE.as_bytes()).unwrap(),
                true,
            )
            .unwrap();
        assert!(iptables(&r).counter_errors.is_empty());
        let dump = engine.dump().unwrap();
        assert!(dump.contains(
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP"
        ), "{dump}");
        let nodeports: Vec<&str> = dump
            .lines()
            .filter(|l| l.contains("--dport 30080") && l.contains("KUBE-EXT-"))
            .collect();
        assert_eq!(nodeports.len(), 2, "{dump}");
        assert!(nodeports[0].contains(" -d 127.0.0.0/8 "), "{nodeports:?}");
        assert!(nodeports[0].contains("-m nfacct --nfacct-name localhost_nps_accepted_pkts"));
        let program = engine.program::<IptablesProgram>().unwrap();
        let mut counters = program.counters().unwrap();
        counters.sort();
        assert_eq!(
            counters,
            [
                (nfacct::INVALID_DROPPED, Some(0)),
                (nfacct::LOCALHOST_NODEPORTS, Some(0))
            ]
        );
        // The tracer walks through the counting rule.
        let packet = Packet {
            src: "127.0.0.1".parse().unwrap(),
            dst: "127.0.0.1".parse().unwrap(),
            protocol: crate::model::Protocol::Tcp,
            dport: 30080,
            origin: crate::trace::Origin::Local,
        };
        let t = engine.trace(&packet, &NodeFacts::default()).unwrap();
        assert_eq!(t.dnat, ["10.0.0.5:8080"]);
        assert!(t
            .matched
            .iter()
            .any(|m| m.contains("localhost_nps_accepted_pkts")));
    }

    /// Without nfnetlink_acct (or the right to use it) the rules count nothing, and the
    /// first sync says which counters are missing; nothing else changes.
    #[test]
    fn without_counters_the_rules_are_written_without_them() {
        let mut fake = Fake::new();
        fake.no_counters = true;
        let mut program = IptablesProgram::new(&localhost_config(), Box::new(fake));
        let mut state = State::new(IpFamily::V4);
        state.apply(crate::model::ChangeSet::from_json(NODE_PORT_SERVICE.as_bytes()).unwrap());
        let keys = state.service_keys().cloned().collect();
        let mut report = SyncReport::default();
        program.sync(&state, &keys, true, &mut report).unwrap();
        assert_eq!(iptables(&report).counter_errors.len(), 2, "{report:?}");
        let dump = program.dump().unwrap();
        assert!(!dump.contains("nfacct"), "{dump}");
        assert!(dump.contains("--ctstate INVALID -j DROP"));
        assert!(program.counters().unwrap().is_empty());
        let mut again = SyncReport::default();
        program.sync(&state, &keys, false, &mut again).unwrap();
        assert!(iptables(&again).counter_errors.is_empty(), "said once");
    }
}
