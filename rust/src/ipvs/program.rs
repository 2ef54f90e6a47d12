//! The ipvs mode's program: the wanted table per Service ([`Index`]), and the [`Applier`]
//! that moves the kernel's IPVS table, ipsets and companion rules to it.

use super::apply::{Applier, Companions};
use super::desired::{self, Node, Wanted};
use super::index::Index;
use super::rules::{self, RuleConfig};
use super::{fake, ipset, kernel};
use crate::config::{BackendKind, EngineConfig};
use crate::error::Result;
use crate::model::{Cidr, IpFamily, IpvsScheduler, ServiceKey};
use crate::program::{ModeReport, Program, SyncReport};
use crate::state::State;
use crate::trace::xtables::Ruleset;
use crate::trace::{NodeFacts, Packet, Trace};
use crate::xtables::jumps;
use std::any::Any;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Instant;

/// What one ipvs sync sent.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(
    feature = "python",
    pyo3::pyclass(frozen, get_all, module = "kproxy._core", name = "IpvsReport")
)]
pub struct Report {
    /// IPVS operations (virtual and real servers added, edited, deleted).
    pub operations: usize,
    /// ipset members added and deleted (a full sync rewrites every member).
    pub set_members: usize,
    /// Whether the companion iptables rules were rewritten.
    pub rules_written: bool,
}

/// The ipvs mode's settings, of this engine's family.
struct Settings {
    family: IpFamily,
    node_name: String,
    /// Where NodePorts are served: the nodePortAddresses, else every node address (as
    /// upstream), loopback left out.
    nodeport_ips: Vec<IpAddr>,
    /// The node's own addresses (never bound on kube-ipvs0).
    own_ips: Vec<IpAddr>,
    scheduler: IpvsScheduler,
    exclude: Vec<Cidr>,
    /// The kernel's IPVS connection timeouts (tcp, tcpfin, udp; all 0: left alone).
    timeouts: (u32, u32, u32),
    rules: RuleConfig,
}

impl Settings {
    fn of(config: &EngineConfig) -> Settings {
        let v6 = config.family == IpFamily::V6;
        let of_family = |ips: &mut dyn Iterator<Item = &IpAddr>| -> Vec<IpAddr> {
            let mut v: Vec<IpAddr> = ips.copied().filter(|ip| ip.is_ipv6() == v6).collect();
            v.sort();
            v.dedup();
            v
        };
        let ipvs = config.ipvs.clone().unwrap_or_default();
        let own_ips = of_family(&mut config.node_ips.iter().chain(&ipvs.host_ips));
        let mut nodeport_ips = match &config.nodeport_ips {
            Some(ips) => of_family(&mut ips.iter()),
            None => own_ips.clone(),
        };
        nodeport_ips.retain(|ip| !ip.is_loopback());
        let r = config.render_config();
        Settings {
            family: config.family,
            node_name: config.node_name.clone(),
            nodeport_ips,
            own_ips,
            scheduler: ipvs.scheduler.unwrap_or(IpvsScheduler::Rr),
            exclude: ipvs.exclude_cidrs,
            timeouts: (
                ipvs.tcp_timeout_s,
                ipvs.tcp_fin_timeout_s,
                ipvs.udp_timeout_s,
            ),
            rules: RuleConfig {
                family: r.family,
                local: r.local,
                masquerade_all: r.masquerade_all,
                masquerade_mark: r.masquerade_mark,
            },
        }
    }

    fn node(&self) -> Node<'_> {
        Node {
            name: &self.node_name,
            nodeport_ips: &self.nodeport_ips,
            own_ips: &self.own_ips,
        }
    }

    /// The kernel's IPVS, its timeouts set, with the ipset and iptables tools beside it.
    fn kernel(&self) -> Result<Applier> {
        let mut client = kernel::Client::open()?;
        let (tcp, fin, udp) = self.timeouts;
        if tcp + fin + udp > 0 {
            client.set_timeouts(tcp, fin, udp)?;
        }
        let companions = Companions {
            sets: Box::new(ipset::Kernel),
            rules: Box::new(crate::xtables::Kernel::new(self.family)),
            config: self.rules.clone(),
        };
        Ok(Applier::new(
            Box::new(client),
            companions,
            self.exclude.clone(),
        ))
    }

    fn fake(&self) -> Applier {
        let companions = Companions {
            sets: Box::new(ipset::Fake::default()),
            rules: Box::new(crate::xtables::Fake::new()),
            config: self.rules.clone(),
        };
        Applier::new(
            Box::new(fake::Fake::default()),
            companions,
            self.exclude.clone(),
        )
    }
}

pub struct IpvsProgram {
    settings: Settings,
    /// Connected on the first sync (a kernel without ip_vs fails there, with a clear error).
    applier: Option<Applier>,
    /// What is wanted, per Service (built by full syncs, updated by partial ones).
    index: Option<Index>,
}

impl IpvsProgram {
    pub fn new(config: &EngineConfig) -> IpvsProgram {
        let settings = Settings::of(config);
        let applier = (config.backend == BackendKind::Fake).then(|| settings.fake());
        IpvsProgram {
            settings,
            applier,
            index: None,
        }
    }

    /// The IPVS table, sets and companion rules `state` calls for.
    fn wanted(&self, state: &State) -> Wanted {
        desired::table(state, &self.settings.node(), self.settings.scheduler)
    }

    fn out_filter(w: &Wanted) -> Vec<String> {
        w.out_filter.iter().cloned().collect()
    }

    /// What the mode wants, as `kproxy diff` compares it: one line per virtual server and
    /// per set member; the companion rules and their jumps as `iptables-restore` input for an
    /// empty namespace; the sets as `ipset restore` input.
    pub fn parts(&self, state: &State) -> (Vec<String>, String, String) {
        let w = self.wanted(state);
        let fam = self.settings.family;
        let mut text = rules::restore_text(&self.settings.rules, &Self::out_filter(&w));
        text.push_str(&jumps::restore_text(rules::JUMPS));
        let sets = ipset::named(fam, &w.sets);
        (
            super::trace::lines(&w.table, &sets),
            text,
            ipset::full_text(fam, &w.sets, &BTreeSet::new()),
        )
    }

    /// The addresses kube-ipvs0 should hold (the last sync's; none before it).
    pub fn bind(&self) -> Vec<IpAddr> {
        self.index
            .as_ref()
            .map(|ix| ix.bind().copied().collect())
            .unwrap_or_default()
    }
}

impl Program for IpvsProgram {
    fn sync(
        &mut self,
        state: &State,
        changed: &BTreeSet<ServiceKey>,
        full: bool,
        report: &mut SyncReport,
    ) -> Result<()> {
        let s = &self.settings;
        let applier = match &mut self.applier {
            Some(a) => a,
            None => self.applier.insert(s.kernel()?),
        };
        let node = s.node();
        let t0 = Instant::now();
        // A partial sync costs what changed; a full one (or a contested virtual server)
        // rebuilds the whole wanted state.
        let delta = match (&mut self.index, full) {
            (Some(ix), false) => ix.update(state, changed, &node, s.scheduler),
            _ => None,
        };
        let (result, t1) = match delta {
            Some(d) => {
                report.render_seconds = t0.elapsed().as_secs_f64();
                let t1 = Instant::now();
                (applier.sync_delta(d), t1)
            }
            None => {
                let (ix, wanted) = Index::build(state, &node, s.scheduler);
                self.index = Some(ix);
                report.render_seconds = t0.elapsed().as_secs_f64();
                let t1 = Instant::now();
                (applier.sync(wanted, full), t1)
            }
        };
        let w = result?;
        report.apply_seconds = t1.elapsed().as_secs_f64();
        if let Some(ix) = &self.index {
            (report.service_ports, report.endpoints) = ix.totals();
        }
        report.wrote = w.operations + w.set_members > 0 || w.rules_written;
        report.transactions = w.sends;
        report.mode = ModeReport::Ipvs(Report {
            operations: w.operations,
            set_members: w.set_members,
            rules_written: w.rules_written,
        });
        Ok(())
    }

    fn intact(&mut self) -> Result<bool> {
        match &mut self.applier {
            Some(a) => a.intact(),
            None => Ok(true),
        }
    }

    /// The IPVS table, then the companion rules and the sets as their tools' input.
    fn render(&self, state: &State) -> String {
        let w = self.wanted(state);
        let mut text = desired::describe(&w.table);
        text.push_str("# iptables-restore --noflush\n");
        text.push_str(&rules::restore_text(
            &self.settings.rules,
            &Self::out_filter(&w),
        ));
        text.push_str("# ipset restore\n");
        text.push_str(&ipset::full_text(
            self.settings.family,
            &w.sets,
            &BTreeSet::new(),
        ));
        text
    }

    /// The IPVS table the kernel holds (nothing before the first sync).
    fn dump(&mut self) -> Result<String> {
        match &mut self.applier {
            Some(a) => Ok(desired::describe(&a.dump()?)),
            None => Ok(String::new()),
        }
    }

    fn trace(&mut self, state: &State, packet: &Packet, node: &NodeFacts) -> Result<Trace> {
        let w = self.wanted(state);
        let text = rules::restore_text(&self.settings.rules, &Self::out_filter(&w));
        let mut ruleset = Ruleset::parse(&text)?;
        ruleset.add_jumps(rules::JUMPS)?;
        let mut facts = node.clone();
        facts.local_ips.extend(w.bind.iter().copied());
        facts.sets = ipset::named(self.settings.family, &w.sets);
        Ok(super::trace::trace(&ruleset, &w.table, packet, &facts))
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
    use crate::model::ChangeSet;

    fn bind(e: &Engine) -> Vec<IpAddr> {
        e.program::<IpvsProgram>().unwrap().bind()
    }

    #[test]
    fn the_ipvs_mode_programs_one_virtual_server_per_service_address() {
        let cfg = EngineConfig::from_json(
            r#"{"family":"IPv4","node_name":"n","backend":"fake","mode":"ipvs","ipvs":{"scheduler":"wrr"}}"#,
        )
        .unwrap();
        let mut engine = Engine::new(cfg);
        let r = engine.sync(cluster(20, 3), true).unwrap();
        assert_eq!((r.service_ports, r.endpoints), (20, 60));
        let dump = engine.dump().unwrap();
        let render = engine.render();
        assert!(render.starts_with(&dump), "{render}");
        assert!(render.contains("\nadd KPROXY-IPVS-SWAP 172.30.0.19,tcp:80\n"));
        assert_eq!(dump.lines().count(), 20);
        assert!(dump.starts_with("172.30.0.0:80/tcp wrr -> "), "{dump}");
        // A change of one Service's endpoints: a partial sync, a handful of operations.
        let r = engine.sync(cluster(1, 1), false).unwrap();
        assert!(!r.full && r.wrote);
        assert_eq!(r.transactions, 1);
        assert!(engine
            .dump()
            .unwrap()
            .contains("172.30.0.0:80/tcp wrr -> 10.0.0.0:8080\n"));
        // Partial syncs (deltas per Service) end where one full sync of the same state does.
        engine
            .sync(
                ChangeSet::from_json(
                    br#"{"services":[{"namespace":"ns","name":"s3","service":null}],
                        "endpoints":[{"namespace":"ns","name":"s3","ports":[]}]}"#,
                )
                .unwrap(),
                false,
            )
            .unwrap();
        engine.sync(cluster(2, 4), false).unwrap();
        let mut fresh = Engine::new(engine.config().clone());
        let mut all = cluster(20, 3);
        all.services.retain(|c| c.key.name.as_str() != "s3");
        all.endpoints.retain(|c| c.key.name.as_str() != "s3");
        fresh.sync(all, true).unwrap();
        fresh.sync(cluster(2, 4), false).unwrap();
        assert_eq!(engine.dump().unwrap(), fresh.dump().unwrap());
        assert_eq!(bind(&engine), bind(&fresh));
        assert_eq!(bind(&engine).len(), 19);
        // A bad scheduler name never reaches the kernel.
        let bad = EngineConfig::from_json(
            r#"{"family":"IPv4","node_name":"n","mode":"ipvs","ipvs":{"scheduler":"rr; x"}}"#,
        );
        assert!(bad.is_err());
    }
}
