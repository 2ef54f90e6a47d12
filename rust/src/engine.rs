//! [`Engine`]: one IP family's merged state, its last applied rules and its kernel handle.
//!
//! `sync` is the one call Python makes per sync: apply the change set, render, apply to the
//! kernel, and return a small [`SyncReport`]. Rule text crosses back only on request.

use crate::error::{Error, Result};
use crate::forward;
use crate::iptables::render::LocalDetector;
use crate::iptables::trace::{NodeFacts, Packet, Trace};
use crate::iptables::{self, chains, writer::Writer, Backend, RenderConfig};
use crate::ipvs;
use crate::model::{ChangeSet, Cidr, IpFamily, ServiceKey};
use crate::nftables::{self, program::Program};
use crate::state::State;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Instant;

/// Above this many rules a sync is applied in batches of about this size (measured on this
/// project's 2-core machines: 4,000 services x 10 endpoints took 34 s as one transaction and
/// 10 s in batches of ~16k rules).
const BATCH_RULES: usize = 16_000;

/// Which kernel interface an engine drives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The real kernel.
    #[default]
    Kernel,
    /// An in-memory kernel (tests, `render`, dry runs).
    Fake,
}

/// How the kernel is programmed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Iptables,
    Nftables,
    Userspace,
    Ipvs,
}

/// Static configuration of one engine (JSON from Python).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    pub family: IpFamily,
    pub node_name: String,
    /// Pod CIDRs (ClusterCIDR or NodeCIDR detection); the one of this engine's family is used.
    #[serde(default)]
    pub cluster_cidrs: Vec<Cidr>,
    /// Pod traffic arrives on this interface (BridgeInterface), or on interfaces with this
    /// prefix when it ends in `+` (InterfaceNamePrefix). Takes precedence over the CIDRs.
    #[serde(default)]
    pub local_interface: Option<String>,
    /// NodePorts on 127.0.0.0/8 (IPv4 only; the caller sets route_localnet).
    #[serde(default)]
    pub localhost_nodeports: bool,
    #[serde(default)]
    pub masquerade_all: bool,
    #[serde(default = "default_masquerade_bit")]
    pub masquerade_bit: u8,
    /// `None`: NodePorts on every local address.
    #[serde(default)]
    pub nodeport_ips: Option<Vec<IpAddr>>,
    #[serde(default)]
    pub conntrack_tcp_be_liberal: bool,
    /// The node's own addresses (loadBalancerSourceRanges that contain one also admit traffic
    /// from the LB IP itself, as upstream).
    #[serde(default)]
    pub node_ips: Vec<IpAddr>,
    #[serde(default)]
    pub backend: BackendKind,
    #[serde(default)]
    pub mode: Mode,
    /// Userspace mode: the addresses NodePort listeners bind (`--bind-address`).
    #[serde(default)]
    pub listen_addresses: Vec<IpAddr>,
    /// Userspace mode: also serve Service addresses through redirect rules (needs NET_ADMIN).
    #[serde(default)]
    pub portals: bool,
    #[serde(default)]
    pub connect_timeout_ms: Option<u64>,
    #[serde(default)]
    pub udp_idle_timeout_ms: Option<u64>,
    #[serde(default)]
    pub tcp_idle_timeout_ms: Option<u64>,
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Userspace mode: the ports portal listeners take (`--proxy-port-range`, first and last);
    /// unset: the kernel's ephemeral range.
    #[serde(default)]
    pub proxy_port_range: Option<(u16, u16)>,
    /// ipvs mode: the scheduler of every virtual server (`ipvs.scheduler`; rr when unset).
    #[serde(default)]
    pub ipvs_scheduler: Option<String>,
    /// ipvs mode: virtual servers on these addresses are someone else's (`ipvs.excludeCIDRs`).
    #[serde(default)]
    pub ipvs_exclude_cidrs: Vec<Cidr>,
    /// ipvs mode: the kernel's IPVS connection timeouts in seconds (0 or unset: unchanged).
    #[serde(default)]
    pub ipvs_tcp_timeout_s: u32,
    #[serde(default)]
    pub ipvs_tcp_fin_timeout_s: u32,
    #[serde(default)]
    pub ipvs_udp_timeout_s: u32,
    /// ipvs mode: the addresses of the node's interfaces (other than kube-ipvs0). An external
    /// or LB IP among them is not bound on kube-ipvs0, nor fenced by KUBE-IPVS-FILTER.
    #[serde(default)]
    pub host_ips: Vec<IpAddr>,
}

fn default_masquerade_bit() -> u8 {
    14
}

impl EngineConfig {
    pub fn from_json(s: &str) -> Result<EngineConfig> {
        let cfg: EngineConfig = serde_json::from_str(s)
            .map_err(|e| Error::InvalidInput(format!("engine config: {e}")))?;
        if let Some(i) = &cfg.local_interface {
            let name = i.strip_suffix('+').unwrap_or(i);
            let ok = !name.is_empty()
                && name.len() <= 15
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !ok {
                return Err(Error::InvalidInput(format!(
                    "engine config: local_interface {i:?} is not an interface name"
                )));
            }
        }
        if let Some(s) = &cfg.ipvs_scheduler {
            let ok = !s.is_empty()
                && s.len() <= 15
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !ok {
                return Err(Error::InvalidInput(format!(
                    "engine config: ipvs_scheduler {s:?} is not a scheduler name"
                )));
            }
        }
        if let Some((first, last)) = cfg.proxy_port_range {
            if first == 0 || first > last {
                return Err(Error::InvalidInput(format!(
                    "engine config: proxy_port_range {first}-{last} is not a port range"
                )));
            }
        }
        if cfg.masquerade_bit > 31 {
            return Err(Error::InvalidInput(format!(
                "engine config: masquerade_bit {} is not in 0..=31",
                cfg.masquerade_bit
            )));
        }
        Ok(cfg)
    }

    fn forward_config(&self) -> forward::ForwardConfig {
        let d = forward::ForwardConfig::default();
        let ms = std::time::Duration::from_millis;
        forward::ForwardConfig {
            connect_timeout: self.connect_timeout_ms.map_or(d.connect_timeout, ms),
            udp_idle_timeout: self.udp_idle_timeout_ms.map_or(d.udp_idle_timeout, ms),
            tcp_idle_timeout: self.tcp_idle_timeout_ms.map_or(d.tcp_idle_timeout, ms),
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            max_udp_sessions: self.max_connections.unwrap_or(d.max_udp_sessions),
            portal_ports: self.proxy_port_range.map(|(a, b)| a..=b),
            ..d
        }
    }

    /// ipvs mode: (the addresses NodePorts are served on, the node's own addresses), of this
    /// engine's family. As upstream: NodePorts on the nodePortAddresses, else on every node
    /// address.
    fn ipvs_node_ips(&self) -> (Vec<IpAddr>, Vec<IpAddr>) {
        let v6 = self.family == IpFamily::V6;
        let of_family = |ips: &mut dyn Iterator<Item = &IpAddr>| -> Vec<IpAddr> {
            let mut v: Vec<IpAddr> = ips.copied().filter(|ip| ip.is_ipv6() == v6).collect();
            v.sort();
            v.dedup();
            v
        };
        let own_ips = of_family(&mut self.node_ips.iter().chain(&self.host_ips));
        let mut nodeport_ips = match &self.nodeport_ips {
            Some(ips) => of_family(&mut ips.iter()),
            None => own_ips.clone(),
        };
        nodeport_ips.retain(|ip| !ip.is_loopback());
        (nodeport_ips, own_ips)
    }

    fn ipvs_rule_config(&self) -> ipvs::rules::RuleConfig {
        let r = self.render_config();
        ipvs::rules::RuleConfig {
            family: r.family,
            local: r.local,
            masquerade_all: r.masquerade_all,
            masquerade_mark: r.masquerade_mark,
        }
    }

    /// The kernel's IPVS, its timeouts set, with the ipset and iptables tools beside it.
    fn ipvs_program(&self) -> Result<ipvs::program::Program> {
        let mut client = ipvs::kernel::Client::open()?;
        let (tcp, fin, udp) = (
            self.ipvs_tcp_timeout_s,
            self.ipvs_tcp_fin_timeout_s,
            self.ipvs_udp_timeout_s,
        );
        if tcp + fin + udp > 0 {
            client.set_timeouts(tcp, fin, udp)?;
        }
        let companions = ipvs::program::Companions {
            sets: Box::new(ipvs::ipset::Kernel),
            rules: Box::new(iptables::Kernel::new(self.family)),
            config: self.ipvs_rule_config(),
        };
        Ok(ipvs::program::Program::new(
            Box::new(client),
            companions,
            self.ipvs_exclude_cidrs.clone(),
        ))
    }

    fn render_config(&self) -> RenderConfig {
        RenderConfig {
            family: self.family,
            node_name: self.node_name.clone(),
            local: match (
                &self.local_interface,
                self.cluster_cidrs
                    .iter()
                    .find(|c| self.family.contains(&c.addr())),
            ) {
                (Some(i), _) => LocalDetector::Interface(i.clone()),
                (None, Some(c)) => LocalDetector::Cidr(*c),
                (None, None) => LocalDetector::None,
            },
            localhost_nodeports: self.localhost_nodeports,
            masquerade_all: self.masquerade_all,
            masquerade_mark: 1u32 << self.masquerade_bit,
            nodeport_ips: self.nodeport_ips.clone(),
            conntrack_tcp_be_liberal: self.conntrack_tcp_be_liberal,
            node_ips: self
                .node_ips
                .iter()
                .copied()
                .filter(|ip| self.family.contains(ip))
                .collect(),
        }
    }
}

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SyncReport {
    /// Whether every chain was rewritten (and the jump rules ensured).
    pub full: bool,
    /// Whether anything was written to the kernel at all.
    pub wrote: bool,
    pub services_changed: usize,
    pub service_ports: usize,
    pub endpoints: usize,
    /// Rules written by this sync (a partial sync writes only what changed).
    pub nat_rules: usize,
    pub filter_rules: usize,
    pub chains_written: usize,
    /// Rules kproxy owns in the kernel after this sync.
    pub nat_rules_total: usize,
    pub filter_rules_total: usize,
    /// iptables-restore runs (a large sync is applied in batches).
    pub transactions: usize,
    pub stale_chains_deleted: usize,
    pub bytes: usize,
    pub no_local_internal: usize,
    pub no_local_external: usize,
    /// nftables: set and map elements added and deleted by this sync, and held after it.
    pub elements_added: usize,
    pub elements_deleted: usize,
    pub elements_total: usize,
    /// nftables: the transaction deleting unreferenced chains was refused (it is retried).
    pub cleanup_failed: bool,
    /// userspace: listeners that could not be opened (each names its Service port).
    pub listen_errors: Vec<String>,
    /// externalIPs and LB IPs left out: another Service's cluster IP (every sync that writes).
    pub address_conflicts: Vec<crate::state::AddressConflict>,
    pub render_seconds: f64,
    pub apply_seconds: f64,
}

/// The mode-specific half of an engine: what was written and the kernel handle.
enum Programmer {
    Iptables {
        backend: Box<dyn Backend>,
        /// What previous syncs wrote (reset by every full sync).
        writer: Writer,
    },
    Nftables(Program),
    Userspace {
        /// Started on the first sync (building its runtime can fail; construction cannot).
        fw: Option<forward::Forwarder>,
        /// The redirect rules' elements as last written (`None`: unknown, write them).
        redirects: Option<Vec<forward::portals::Element>>,
        /// Services with a listener that could not be opened: the next sync tries them again.
        retry: BTreeSet<ServiceKey>,
    },
    /// Connected on the first sync (a kernel without ip_vs fails there, with a clear error).
    Ipvs(Option<ipvs::program::Program>),
}

pub struct Engine {
    config: EngineConfig,
    render_config: RenderConfig,
    state: State,
    programmer: Programmer,
    /// ipvs mode: what is wanted, per Service (built by full syncs, updated by partial ones).
    ipvs_index: Option<ipvs::index::Index>,
    /// Set at start and after any failure: the kernel's content is unknown.
    need_full: bool,
}

impl Engine {
    pub fn new(config: EngineConfig) -> Engine {
        let fam = config.family;
        match (config.mode, config.backend) {
            (Mode::Iptables, BackendKind::Kernel) => {
                Engine::with_backend(config, Box::new(iptables::Kernel::new(fam)))
            }
            (Mode::Iptables, BackendKind::Fake) => {
                Engine::with_backend(config, Box::new(iptables::Fake::new()))
            }
            (Mode::Nftables, BackendKind::Kernel) => {
                Engine::with_nft_backend(config, Box::new(nftables::Kernel::new(fam)))
            }
            (Mode::Nftables, BackendKind::Fake) => {
                Engine::with_nft_backend(config, Box::new(nftables::Fake::new(fam)))
            }
            (Mode::Userspace, _) => Engine::with(
                config,
                Programmer::Userspace {
                    fw: None,
                    redirects: None,
                    retry: BTreeSet::new(),
                },
            ),
            (Mode::Ipvs, BackendKind::Kernel) => Engine::with(config, Programmer::Ipvs(None)),
            (Mode::Ipvs, BackendKind::Fake) => {
                let companions = ipvs::program::Companions {
                    sets: Box::new(ipvs::ipset::Fake::default()),
                    rules: Box::new(iptables::Fake::new()),
                    config: config.ipvs_rule_config(),
                };
                let p = ipvs::program::Program::new(
                    Box::new(ipvs::fake::Fake::default()),
                    companions,
                    config.ipvs_exclude_cidrs.clone(),
                );
                Engine::with(config, Programmer::Ipvs(Some(p)))
            }
        }
    }

    /// An iptables-mode engine on `backend`.
    pub fn with_backend(config: EngineConfig, backend: Box<dyn Backend>) -> Engine {
        Engine::with(
            config,
            Programmer::Iptables {
                backend,
                writer: Writer::default(),
            },
        )
    }

    /// An nftables-mode engine on `backend`.
    pub fn with_nft_backend(config: EngineConfig, backend: Box<dyn nftables::Backend>) -> Engine {
        let fam = config.family;
        Engine::with(config, Programmer::Nftables(Program::new(fam, backend)))
    }

    fn with(config: EngineConfig, programmer: Programmer) -> Engine {
        Engine {
            render_config: config.render_config(),
            state: State::new(config.family),
            config,
            programmer,
            ipvs_index: None,
            need_full: true,
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn needs_full_sync(&self) -> bool {
        self.need_full
    }

    /// Apply `changes` and bring the kernel in line with the resulting state.
    ///
    /// `full` asks for everything to be rewritten and the jump rules re-ensured (periodic
    /// resyncs). A sync with nothing changed and no full request writes nothing. On failure the
    /// kernel keeps what it had (iptables-restore is all-or-nothing) and the next sync is full.
    pub fn sync(&mut self, changes: ChangeSet, full: bool) -> Result<SyncReport> {
        if let Programmer::Nftables(prog) = &mut self.programmer {
            if !(full || self.need_full) {
                // The nftables writer diffs against what the touched Services render to now.
                let keys = self.state.affected(&changes);
                prog.remember(&self.state, &self.render_config, &keys);
            }
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
        let result = self.write(full, &applied.services, &mut report);
        if let Err(e) = &result {
            if e.needs_full_sync() {
                self.need_full = true;
            }
        }
        result.map(|()| report)
    }

    fn write(
        &mut self,
        full: bool,
        changed: &BTreeSet<ServiceKey>,
        report: &mut SyncReport,
    ) -> Result<()> {
        let ipvs_ips = (self.config.mode == Mode::Ipvs).then(|| self.config.ipvs_node_ips());
        let (backend, writer) = match &mut self.programmer {
            Programmer::Iptables { backend, writer } => (backend, writer),
            Programmer::Userspace {
                fw,
                redirects,
                retry,
            } => {
                let t0 = Instant::now();
                let (name, listen) = (&self.config.node_name, &self.config.listen_addresses);
                let portals = self.config.portals;
                // A partial sync looks at the changed Services' listeners only (and at those
                // that failed to open last time).
                let scope: BTreeSet<ServiceKey> = changed.union(retry).cloned().collect();
                let routes = if full {
                    forward::routes::routes(&self.state, name, listen, portals)
                } else {
                    forward::routes::routes_for(&self.state, &scope, name, listen, portals)
                };
                report.service_ports = routes.len();
                report.endpoints = routes.values().map(|r| r.endpoints.len()).sum();
                report.render_seconds = t0.elapsed().as_secs_f64();
                self.need_full = false;
                if self.config.backend == BackendKind::Fake {
                    return Ok(()); // tools: compute, never listen
                }
                let fw = match fw {
                    Some(fw) => fw,
                    None => fw.insert(forward::Forwarder::new(self.config.forward_config())?),
                };
                let t1 = Instant::now();
                let u = if full {
                    fw.update(routes)
                } else {
                    fw.update_services(&scope, routes)
                };
                *retry = u.failed;
                if portals {
                    // Listeners first, then the rules that lead to them. A full sync always
                    // writes them (someone may have flushed them); a partial one only when a
                    // redirect changed, not for endpoint changes. On failure the previous
                    // rules stay and the next sync (full) writes them again.
                    let want = fw.portal_elements();
                    if full || redirects.as_ref() != Some(&want) {
                        *redirects = None;
                        if let Err(e) = forward::portals::apply(self.config.family, &want) {
                            self.need_full = true;
                            return Err(e);
                        }
                        *redirects = Some(want);
                        report.transactions = 1;
                    }
                }
                report.apply_seconds = t1.elapsed().as_secs_f64();
                report.wrote = u.opened + u.closed + u.changed > 0;
                report.chains_written = u.opened + u.changed;
                report.stale_chains_deleted = u.closed;
                report.listen_errors = u.errors;
                return Ok(());
            }
            Programmer::Ipvs(prog) => {
                let (nodeport_ips, own_ips) = ipvs_ips.unwrap_or_default();
                let node = ipvs::desired::Node {
                    name: &self.config.node_name,
                    nodeport_ips: &nodeport_ips,
                    own_ips: &own_ips,
                };
                let sched = self.config.ipvs_scheduler.as_deref().unwrap_or("rr");
                let prog = match prog {
                    Some(p) => p,
                    None => prog.insert(self.config.ipvs_program()?),
                };
                let t0 = Instant::now();
                // A partial sync costs what changed; a full one (or a contested virtual
                // server) rebuilds the whole wanted state.
                let delta = match (&mut self.ipvs_index, full) {
                    (Some(ix), false) => ix.update(&self.state, changed, &node, sched),
                    _ => None,
                };
                let (result, t1) = match delta {
                    Some(d) => {
                        report.render_seconds = t0.elapsed().as_secs_f64();
                        let t1 = Instant::now();
                        (prog.sync_delta(d), t1)
                    }
                    None => {
                        let (ix, wanted) = ipvs::index::Index::build(&self.state, &node, sched);
                        self.ipvs_index = Some(ix);
                        report.render_seconds = t0.elapsed().as_secs_f64();
                        let t1 = Instant::now();
                        (prog.sync(wanted, full), t1)
                    }
                };
                let w = result?;
                report.apply_seconds = t1.elapsed().as_secs_f64();
                if let Some(ix) = &self.ipvs_index {
                    (report.service_ports, report.endpoints) = ix.totals();
                }
                report.wrote = w.operations + w.set_members > 0 || w.rules_written;
                report.transactions = w.sends;
                report.elements_added = w.set_members;
                self.need_full = false;
                return Ok(());
            }
            Programmer::Nftables(prog) => {
                let w = prog.sync(&self.state, &self.render_config, changed, full)?;
                self.need_full = false;
                let totals = prog.writer().totals();
                report.wrote = w.transactions > 0;
                report.service_ports = totals.service_ports;
                report.endpoints = totals.endpoints;
                report.no_local_internal = totals.no_local_internal;
                report.no_local_external = totals.no_local_external;
                report.nat_rules = w.rules_written;
                report.chains_written = w.chains_written;
                report.stale_chains_deleted = w.stale_chains_deleted;
                report.transactions = w.transactions;
                report.bytes = w.bytes;
                report.elements_added = w.elements_added;
                report.elements_deleted = w.elements_deleted;
                report.elements_total = prog.writer().element_total();
                report.cleanup_failed = w.cleanup_failed;
                report.render_seconds = w.render_seconds;
                report.apply_seconds = w.apply_seconds;
                return Ok(());
            }
        };
        let t0 = Instant::now();
        let plan = if full {
            let filter = backend.chains("filter")?;
            let nat = backend.chains("nat")?;
            writer.full(&self.state, &self.render_config, &filter, &nat)
        } else {
            writer.partial(&self.state, &self.render_config, changed)
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
            backend.restore(text)?;
        }
        if full {
            backend.ensure_jumps(chains::JUMPS)?;
            if self.render_config.localhost_nodeports && self.config.family == IpFamily::V4 {
                backend.ensure_jumps(chains::FIREWALL_JUMPS)?;
            }
        }
        report.apply_seconds = t1.elapsed().as_secs_f64();

        self.need_full = false;
        let totals = writer.totals();
        report.wrote = !plan.is_empty() || full;
        report.service_ports = totals.service_ports;
        report.endpoints = totals.endpoints;
        report.no_local_internal = totals.no_local_internal;
        report.no_local_external = totals.no_local_external;
        (report.filter_rules_total, report.nat_rules_total) = writer.rule_totals();
        report.nat_rules = plan.nat_rule_count();
        report.filter_rules = plan.filter_rule_count();
        report.chains_written = plan.chains_written();
        report.stale_chains_deleted = plan.deleted();
        report.bytes = batches.iter().map(String::len).sum();
        report.transactions = batches.len();
        Ok(())
    }

    /// Whether the canary chains are all still there. When one is gone, someone flushed our
    /// tables: the caller should run a full sync.
    pub fn canary_intact(&mut self) -> Result<bool> {
        match &mut self.programmer {
            Programmer::Iptables { backend, .. } => {
                for table in chains::CANARY_TABLES {
                    if !backend.chain_exists(table, chains::CANARY)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            Programmer::Nftables(prog) => prog.intact(),
            Programmer::Userspace { .. } if self.config.portals => {
                forward::portals::intact(self.config.family)
            }
            Programmer::Ipvs(Some(p)) => p.intact(),
            Programmer::Userspace { .. } | Programmer::Ipvs(None) => Ok(true),
        }
    }

    /// The complete input for the current state: `iptables-restore` text, or the `nft -f`
    /// transaction of a full sync. Nothing is applied.
    pub fn render(&self) -> String {
        match &self.programmer {
            Programmer::Iptables { .. } => {
                iptables::render(&self.state, &self.render_config).restore_text(&BTreeSet::new())
            }
            Programmer::Nftables(prog) => prog.render(&self.state, &self.render_config),
            Programmer::Userspace { .. } => forward::routes::describe(&forward::routes::routes(
                &self.state,
                &self.config.node_name,
                &self.config.listen_addresses,
                self.config.portals,
            )),
            Programmer::Ipvs(_) => {
                let w = self.wanted_ipvs();
                let out: Vec<String> = w.out_filter.iter().cloned().collect();
                let fam = self.config.family;
                let mut text = ipvs::desired::describe(&w.table);
                text.push_str("# iptables-restore --noflush\n");
                text.push_str(&ipvs::rules::restore_text(
                    &self.config.ipvs_rule_config(),
                    &out,
                ));
                text.push_str("# ipset restore\n");
                text.push_str(&ipvs::ipset::full_text(fam, &w.sets, &BTreeSet::new()));
                text
            }
        }
    }

    /// ipvs mode: what the mode wants, as `kproxy diff` compares it: one line per virtual
    /// server and per set member; the companion rules and their jumps as `iptables-restore`
    /// input for an empty namespace; the sets as `ipset restore` input.
    pub fn ipvs_parts(&self) -> (Vec<String>, String, String) {
        let w = self.wanted_ipvs();
        let fam = self.config.family;
        let out: Vec<String> = w.out_filter.iter().cloned().collect();
        let mut rules = ipvs::rules::restore_text(&self.config.ipvs_rule_config(), &out);
        rules.push_str(&chains::restore_text(ipvs::rules::JUMPS));
        let sets = ipvs::ipset::named(fam, &w.sets);
        (
            ipvs::trace::lines(&w.table, &sets),
            rules,
            ipvs::ipset::full_text(fam, &w.sets, &BTreeSet::new()),
        )
    }

    /// ipvs mode: the addresses kube-ipvs0 should hold (the last sync's; none before it).
    pub fn ipvs_bind(&self) -> Vec<IpAddr> {
        self.ipvs_index
            .as_ref()
            .map(|ix| ix.bind().copied().collect())
            .unwrap_or_default()
    }

    /// The IPVS table the current state calls for. NodePorts are served on the configured
    /// NodePort addresses, else on the node's addresses of this family.
    fn wanted_ipvs(&self) -> ipvs::desired::Wanted {
        let (nodeport_ips, own_ips) = self.config.ipvs_node_ips();
        let node = ipvs::desired::Node {
            name: &self.config.node_name,
            nodeport_ips: &nodeport_ips,
            own_ips: &own_ips,
        };
        let scheduler = self.config.ipvs_scheduler.as_deref().unwrap_or("rr");
        ipvs::desired::table(&self.state, &node, scheduler)
    }

    /// What the backend holds now (`iptables-save` format, or `nft list table`).
    pub fn dump(&mut self) -> Result<String> {
        match &mut self.programmer {
            Programmer::Iptables { backend, .. } => backend.dump(),
            Programmer::Nftables(prog) => prog.dump(),
            Programmer::Userspace { fw, .. } => Ok(fw
                .as_ref()
                .map(|fw| {
                    fw.listening()
                        .iter()
                        .map(|l| format!("{} {}\n", l.protocol.lower(), l.addr))
                        .collect()
                })
                .unwrap_or_default()),
            Programmer::Ipvs(Some(p)) => Ok(ipvs::desired::describe(&p.dump()?)),
            Programmer::Ipvs(None) => Ok(String::new()),
        }
    }

    /// The userspace forwarder's counters (empty in the other modes, or before the first sync).
    pub fn forward_stats(&self) -> Vec<(&'static str, u64)> {
        match &self.programmer {
            Programmer::Userspace { fw: Some(fw), .. } => fw.stats(),
            _ => Vec::new(),
        }
    }

    /// Trace the first packet of a connection through the rules this engine programs (the
    /// backend's rules for the in-memory backends; the rendered rules otherwise).
    pub fn trace(&mut self, packet: &Packet, node: &NodeFacts) -> Result<Trace> {
        match &mut self.programmer {
            Programmer::Iptables { backend, .. } => {
                let text = match self.config.backend {
                    BackendKind::Fake => backend.dump()?,
                    BackendKind::Kernel => iptables::render(&self.state, &self.render_config)
                        .restore_text(&BTreeSet::new()),
                };
                let mut rules = iptables::trace::Ruleset::parse(&text)?;
                if self.config.backend == BackendKind::Kernel {
                    rules.add_jumps(chains::JUMPS)?;
                }
                Ok(iptables::trace::trace(&rules, packet, node))
            }
            Programmer::Userspace { .. } => Err(Error::InvalidInput(
                "the userspace mode programs no rules to trace".into(),
            )),
            Programmer::Ipvs(_) => {
                let w = self.wanted_ipvs();
                let out: Vec<String> = w.out_filter.iter().cloned().collect();
                let text = ipvs::rules::restore_text(&self.config.ipvs_rule_config(), &out);
                let mut rules = iptables::trace::Ruleset::parse(&text)?;
                rules.add_jumps(ipvs::rules::JUMPS)?;
                let mut facts = node.clone();
                facts.local_ips.extend(w.bind.iter().copied());
                facts.sets = ipvs::ipset::named(self.config.family, &w.sets);
                Ok(ipvs::trace::trace(&rules, &w.table, packet, &facts))
            }
            Programmer::Nftables(prog) => {
                let model = prog.model(&self.state, &self.render_config)?;
                Ok(nftables::trace::trace(
                    &model,
                    self.config.family,
                    packet,
                    node,
                ))
            }
        }
    }

    pub fn mode(&self) -> Mode {
        self.config.mode
    }

    /// The nftables table this engine programs (None in the iptables mode).
    pub fn nft_model(&self) -> Result<Option<nftables::Model>> {
        match &self.programmer {
            Programmer::Iptables { .. } | Programmer::Userspace { .. } | Programmer::Ipvs(_) => {
                Ok(None)
            }
            Programmer::Nftables(prog) => prog.model(&self.state, &self.render_config).map(Some),
        }
    }
}

/// Remove everything the iptables mode creates in one family: the jump rules from the
/// built-in chains, then every chain of ours. Safe to run twice and on a clean node.
pub fn cleanup(backend: &mut dyn Backend) -> Result<usize> {
    backend.remove_jumps(chains::JUMPS)?;
    backend.remove_jumps(chains::FIREWALL_JUMPS)?;
    backend.remove_jumps(ipvs::rules::JUMPS)?;
    let mut removed = 0;
    let mut text = String::new();
    for table in ["mangle", "filter", "nat"] {
        let fixed: &[&[&str]] = match table {
            "nat" => &[chains::NAT_CHAINS, ipvs::rules::NAT_CHAINS],
            "filter" => &[chains::FILTER_CHAINS, ipvs::rules::FILTER_CHAINS],
            _ => &[],
        };
        let ours: Vec<String> = backend
            .chains(table)?
            .into_iter()
            .filter(|c| {
                fixed.iter().any(|f| f.contains(&c.as_str()))
                    || c == chains::CANARY
                    || chains::is_dynamic_chain(c)
            })
            .collect();
        if ours.is_empty() {
            continue;
        }
        text.push_str(&format!("*{table}\n"));
        for c in &ours {
            text.push_str(&format!(":{c} - [0:0]\n"));
        }
        for c in &ours {
            text.push_str(&format!("-X {c}\n"));
        }
        text.push_str("COMMIT\n");
        removed += ours.len();
    }
    if !text.is_empty() {
        backend.restore(&text)?;
    }
    // KUBE-FIREWALL is shared with kubelet: delete it only when nothing references it any
    // more. If something still does, this restore fails as a whole and changes nothing.
    if backend.chain_exists("filter", chains::KUBE_FIREWALL)? {
        let fw = chains::KUBE_FIREWALL;
        if backend
            .restore(&format!("*filter\n:{fw} - [0:0]\n-X {fw}\nCOMMIT\n"))
            .is_ok()
        {
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iptables::Fake;

    fn config() -> EngineConfig {
        EngineConfig::from_json(
            r#"{"family":"IPv4","node_name":"n","cluster_cidrs":["10.0.0.0/8"],"backend":"fake"}"#,
        )
        .unwrap()
    }

    fn cluster(n: usize, eps: usize) -> ChangeSet {
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

    #[test]
    fn rule_totals_count_what_the_kernel_holds() {
        let mut engine = Engine::with_backend(config(), Box::new(Fake::new()));
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
        assert_eq!(r.nat_rules_total, count("nat"));
        assert_eq!(r.filter_rules_total, count("filter"));
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
        assert_eq!(r.nat_rules_total, nat);
    }

    #[test]
    fn a_large_sync_in_batches_equals_one_transaction() {
        let mut engine = Engine::with_backend(config(), Box::new(Fake::new()));
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

    #[test]
    fn the_ipvs_mode_programs_one_virtual_server_per_service_address() {
        let cfg = EngineConfig::from_json(
            r#"{"family":"IPv4","node_name":"n","backend":"fake","mode":"ipvs","ipvs_scheduler":"wrr"}"#,
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
        assert_eq!(engine.ipvs_bind(), fresh.ipvs_bind());
        assert_eq!(engine.ipvs_bind().len(), 19);
        // A bad scheduler name never reaches the kernel.
        let bad = EngineConfig::from_json(
            r#"{"family":"IPv4","node_name":"n","mode":"ipvs","ipvs_scheduler":"rr; x"}"#,
        );
        assert!(bad.is_err());
    }

    /// Userspace mode, listener path: a partial sync touches only the changed Services'
    /// listeners (the others keep theirs, connections and all), and a deleted Service's
    /// listener closes.
    #[test]
    fn userspace_partial_syncs_change_only_the_changed_services_listeners() {
        use std::io::Read;
        let backend = |tag: &'static str| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            std::thread::spawn(move || {
                for s in l.incoming().take(8) {
                    let _ = std::io::Write::write_all(&mut s.unwrap(), tag.as_bytes());
                }
            });
            port
        };
        let free = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (a, b) = (backend("a"), backend("b"));
        let node_ports = [free(), free(), free()];
        let service = |i: usize| {
            format!(
                r#"{{"namespace":"ns","name":"s{i}","service":{{"cluster_ips":["172.30.0.{i}"],"ports":[{{"name":"p","protocol":"TCP","port":80,"node_port":{}}}]}}}}"#,
                node_ports[i]
            )
        };
        let slice = |i: usize, port: u16| {
            format!(
                r#"{{"namespace":"ns","name":"s{i}","ports":[{{"name":"p","protocol":"TCP","endpoints":[{{"ip":"127.0.0.1","port":{port},"ready":true,"serving":true,"terminating":false}}]}}]}}"#
            )
        };
        let changes = |services: Vec<String>, slices: Vec<String>| {
            let json = format!(
                r#"{{"services":[{}],"endpoints":[{}]}}"#,
                services.join(","),
                slices.join(",")
            );
            ChangeSet::from_json(json.as_bytes()).unwrap()
        };
        let ask = |port: u16| {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let mut out = String::new();
            let _ = c.read_to_string(&mut out);
            out
        };
        let mut engine = Engine::new(
            EngineConfig::from_json(
                r#"{"family":"IPv4","node_name":"n","mode":"userspace","listen_addresses":["127.0.0.1"]}"#,
            )
            .unwrap(),
        );
        let all = changes(
            (0..3).map(service).collect(),
            (0..3).map(|i| slice(i, a)).collect(),
        );
        let r = engine.sync(all, true).unwrap();
        assert_eq!((r.service_ports, r.chains_written), (3, 3));
        assert_eq!(ask(node_ports[1]), "a");
        // s1's endpoint moves to b: one listener re-pointed, nothing opened or closed.
        let r = engine
            .sync(changes(vec![], vec![slice(1, b)]), false)
            .unwrap();
        assert!(!r.full);
        assert_eq!(
            (r.service_ports, r.chains_written, r.stale_chains_deleted),
            (1, 1, 0)
        );
        assert_eq!(ask(node_ports[1]), "b");
        assert_eq!(ask(node_ports[0]), "a");
        // s2 deleted: only its listener closes.
        let gone = br#"{"services":[{"namespace":"ns","name":"s2"}]}"#;
        let r = engine
            .sync(ChangeSet::from_json(gone).unwrap(), false)
            .unwrap();
        assert_eq!((r.chains_written, r.stale_chains_deleted), (0, 1));
        let dump = engine.dump().unwrap();
        assert_eq!(dump.lines().count(), 2, "{dump}");
        assert!(!dump.contains(&format!(":{}", node_ports[2])), "{dump}");
    }
}
