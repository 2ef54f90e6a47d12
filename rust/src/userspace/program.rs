//! The userspace mode's program: a listener per Service port on the [`Forwarder`], and with
//! portals the nftables redirect rules that lead Service addresses to them.

use super::{portals, routes};
use crate::config::{BackendKind, EngineConfig};
use crate::error::{Error, Result};
use crate::forward::{self, ForwardConfig, Forwarder};
use crate::model::{IpFamily, ServiceKey};
use crate::program::{ModeReport, Program, SyncReport};
use crate::state::State;
use crate::trace::{NodeFacts, Packet, Trace};
use std::any::Any;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// What one userspace sync did to the listeners.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(
    feature = "python",
    pyo3::pyclass(frozen, get_all, module = "kproxy._core", name = "UserspaceReport")
)]
pub struct Report {
    pub opened: usize,
    /// Listeners kept and re-pointed (their endpoints or balancing changed).
    pub changed: usize,
    pub closed: usize,
    /// Listeners that could not be opened (each names its Service port).
    pub listen_errors: Vec<String>,
}

pub struct UserspaceProgram {
    family: IpFamily,
    node_name: String,
    /// The addresses NodePort listeners bind (`--bind-address`).
    listen: Vec<IpAddr>,
    /// Also serve Service addresses through redirect rules (needs NET_ADMIN).
    portals: bool,
    /// Compute the routes only, never listen (tools, dry runs).
    dry: bool,
    forward: ForwardConfig,
    /// Started on the first sync (building its runtime can fail; construction cannot).
    fw: Option<Forwarder>,
    /// The redirect rules' elements as last written (`None`: unknown, write them).
    redirects: Option<Vec<portals::Element>>,
    /// Services with a listener that could not be opened: the next sync tries them again.
    retry: BTreeSet<ServiceKey>,
}

impl UserspaceProgram {
    pub fn new(config: &EngineConfig) -> UserspaceProgram {
        let d = ForwardConfig::default();
        let ms = Duration::from_millis;
        let u = config.userspace.clone().unwrap_or_default();
        UserspaceProgram {
            family: config.family,
            node_name: config.node_name.clone(),
            listen: u.listen_addresses,
            portals: u.portals,
            dry: config.backend == BackendKind::Fake,
            forward: ForwardConfig {
                connect_timeout: u.connect_timeout_ms.map_or(d.connect_timeout, ms),
                udp_idle_timeout: u.udp_idle_timeout_ms.map_or(d.udp_idle_timeout, ms),
                tcp_idle_timeout: u.tcp_idle_timeout_ms.map_or(d.tcp_idle_timeout, ms),
                max_connections: u.max_connections.unwrap_or(d.max_connections),
                max_udp_sessions: u.max_connections.unwrap_or(d.max_udp_sessions),
                portal_ports: u.proxy_port_range.map(|(a, b)| a..=b),
                ..d
            },
            fw: None,
            redirects: None,
            retry: BTreeSet::new(),
        }
    }

    /// The forwarder's counters by name (empty before the first sync).
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        self.fw.as_ref().map(Forwarder::stats).unwrap_or_default()
    }
}

impl Program for UserspaceProgram {
    fn sync(
        &mut self,
        state: &State,
        changed: &BTreeSet<ServiceKey>,
        full: bool,
        report: &mut SyncReport,
    ) -> Result<()> {
        let t0 = Instant::now();
        let (name, listen) = (&self.node_name, &self.listen);
        // A partial sync looks at the changed Services' listeners only (and at those that
        // failed to open last time).
        let scope: BTreeSet<ServiceKey> = changed.union(&self.retry).cloned().collect();
        let routes = if full {
            routes::routes(state, name, listen, self.portals)
        } else {
            routes::routes_for(state, &scope, name, listen, self.portals)
        };
        report.service_ports = routes.len();
        report.endpoints = routes.values().map(|r| r.endpoints.len()).sum();
        report.render_seconds = t0.elapsed().as_secs_f64();
        if self.dry {
            return Ok(());
        }
        let fw = match &mut self.fw {
            Some(fw) => fw,
            None => self.fw.insert(Forwarder::new(self.forward.clone())?),
        };
        let t1 = Instant::now();
        let u = if full {
            fw.update(routes)
        } else {
            fw.update_services(&scope, routes)
        };
        self.retry = u.failed;
        if self.portals {
            // Listeners first, then the rules that lead to them. A full sync always writes
            // them (someone may have flushed them); a partial one only when a redirect
            // changed, not for endpoint changes. On failure the previous rules stay and the
            // next sync (full) writes them again.
            let want = fw.portal_elements();
            if full || self.redirects.as_ref() != Some(&want) {
                self.redirects = None;
                portals::apply(self.family, &want)?;
                self.redirects = Some(want);
                report.transactions = 1;
            }
        }
        report.apply_seconds = t1.elapsed().as_secs_f64();
        report.wrote = u.opened + u.closed + u.changed > 0;
        report.mode = ModeReport::Userspace(Report {
            opened: u.opened,
            changed: u.changed,
            closed: u.closed,
            listen_errors: u.errors,
        });
        Ok(())
    }

    /// The redirect rules are there (always true without portals: listeners cannot be
    /// flushed from outside).
    fn intact(&mut self) -> Result<bool> {
        if self.portals {
            portals::intact(self.family)
        } else {
            Ok(true)
        }
    }

    /// One line per listener and its endpoints.
    fn render(&self, state: &State) -> String {
        forward::describe(&routes::routes(
            state,
            &self.node_name,
            &self.listen,
            self.portals,
        ))
    }

    /// The sockets listening now, one `protocol address` line each.
    fn dump(&mut self) -> Result<String> {
        Ok(self
            .fw
            .as_ref()
            .map(|fw| {
                fw.listening()
                    .iter()
                    .map(|l| format!("{} {}\n", l.protocol.lower(), l.addr))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn trace(&mut self, _state: &State, _packet: &Packet, _node: &NodeFacts) -> Result<Trace> {
        Err(Error::Unsupported(
            "the userspace mode programs no rules to trace".into(),
        ))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;
    use crate::model::ChangeSet;

    fn listeners(r: &SyncReport) -> &Report {
        match &r.mode {
            ModeReport::Userspace(r) => r,
            other => panic!("not a userspace report: {other:?}"),
        }
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
                r#"{"family":"IPv4","node_name":"n","mode":"userspace","userspace":{"listen_addresses":["127.0.0.1"]}}"#,
            )
            .unwrap(),
        );
        let all = changes(
            (0..3).map(service).collect(),
            (0..3).map(|i| slice(i, a)).collect(),
        );
        let r = engine.sync(all, true).unwrap();
        assert_eq!((r.service_ports, listeners(&r).opened), (3, 3));
        assert_eq!(ask(node_ports[1]), "a");
        // s1's endpoint moves to b: one listener re-pointed, nothing opened or closed.
        let r = engine
            .sync(changes(vec![], vec![slice(1, b)]), false)
            .unwrap();
        assert!(!r.full);
        assert_eq!(
            (
                r.service_ports,
                listeners(&r).opened,
                listeners(&r).changed,
                listeners(&r).closed
            ),
            (1, 0, 1, 0)
        );
        assert_eq!(ask(node_ports[1]), "b");
        assert_eq!(ask(node_ports[0]), "a");
        // s2 deleted: only its listener closes.
        let gone = br#"{"services":[{"namespace":"ns","name":"s2"}]}"#;
        let r = engine
            .sync(ChangeSet::from_json(gone).unwrap(), false)
            .unwrap();
        let l = listeners(&r);
        assert_eq!((l.opened + l.changed, l.closed), (0, 1));
        let dump = engine.dump().unwrap();
        assert_eq!(dump.lines().count(), 2, "{dump}");
        assert!(!dump.contains(&format!(":{}", node_ports[2])), "{dump}");
    }
}
