//! Localhost NodePorts for the nftables mode (KEP-6032, upstream 1.38).
//!
//! nftables cannot DNAT a connection to 127.0.0.1 out of the node (that needs the
//! `route_localnet` sysctl, which the iptables mode sets and which reopened CVE-2020-8558),
//! so upstream serves `nodePortAddresses: [localhost]` with a small userspace TCP proxy. This
//! is kproxy's: the userspace mode's forwarder, listening on the family's loopback address on
//! each TCP NodePort that has an endpoint ([`localhost_routes`]). The table itself
//! leaves loopback alone (its NodePort rules match `daddr != 127.0.0.0/8`), so the two never
//! meet. A listener that cannot be opened (the port taken on loopback) is reported and tried
//! again next sync; it never fails the table's transaction.

use crate::forward::{self, ForwardConfig, Forwarder, Listen, Route};
use crate::model::{IpFamily, Protocol, ServiceKey};
use crate::naming::join_host_port;
use crate::state::State;
use crate::topology::{NodeView, Serving};
use crate::trace::{Packet, Reason, Trace, Verdict};
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// What one sync did to the localhost listeners.
#[derive(Debug, Default, PartialEq)]
pub struct Synced {
    /// Listeners open after the sync.
    pub listeners: usize,
    pub opened: usize,
    pub closed: usize,
    /// Listeners that could not be opened, each naming its Service port and the cause.
    pub errors: Vec<String>,
}

pub struct LocalhostNodePorts {
    node_name: String,
    loopback: IpAddr,
    /// Compute the listeners only, never open them (tools, dry runs).
    dry: bool,
    /// Started on the first sync that has a listener to open.
    fw: Option<Forwarder>,
    /// Services with a listener that could not be opened: the next sync tries them again.
    retry: BTreeSet<ServiceKey>,
}

impl LocalhostNodePorts {
    pub fn new(family: IpFamily, node_name: &str, dry: bool) -> LocalhostNodePorts {
        LocalhostNodePorts {
            node_name: node_name.to_owned(),
            loopback: loopback(family),
            dry,
            fw: None,
            retry: BTreeSet::new(),
        }
    }

    /// Make the listeners of `changed` (of every Service when `full`) follow `state`.
    pub fn sync(&mut self, state: &State, changed: &BTreeSet<ServiceKey>, full: bool) -> Synced {
        let scope: BTreeSet<ServiceKey> = changed.union(&self.retry).cloned().collect();
        let keys = (!full).then_some(&scope);
        let want = localhost_routes(state, keys, &self.node_name, self.loopback);
        if self.dry {
            return Synced {
                listeners: want.len(),
                ..Synced::default()
            };
        }
        if self.fw.is_none() && want.is_empty() {
            return Synced::default();
        }
        let fw = match &mut self.fw {
            Some(fw) => fw,
            None => match Forwarder::new(config()) {
                Ok(fw) => self.fw.insert(fw),
                Err(e) => {
                    // Everything is tried again next sync.
                    self.retry.extend(want.values().map(|r| r.owner.clone()));
                    return Synced {
                        errors: vec![format!("localhost NodePorts: {e}")],
                        ..Synced::default()
                    };
                }
            },
        };
        let u = if full {
            fw.update(want)
        } else {
            fw.update_services(&scope, want)
        };
        self.retry = u.failed;
        Synced {
            listeners: fw.listening().len(),
            opened: u.opened,
            closed: u.closed,
            errors: u.errors,
        }
    }

    /// The listeners `state` asks for, one `tcp <loopback>:<nodePort> -> <endpoints>` line
    /// each (what `render` shows beside the table).
    pub fn describe(&self, state: &State) -> String {
        forward::describe(&localhost_routes(
            state,
            None,
            &self.node_name,
            self.loopback,
        ))
    }

    /// What the proxy does with `packet`, which the table let through: a TCP connection to a
    /// NodePort on this family's loopback reaches the port's endpoints through a listener,
    /// or is refused when the port has none (no listener). `trace` is the table's walk.
    pub fn trace(&self, state: &State, packet: &Packet, trace: &mut Trace) {
        if packet.protocol != Protocol::Tcp || packet.dst != self.loopback {
            return;
        }
        let serves_port = state
            .service_ports()
            .iter()
            .any(|sp| sp.name.protocol == Protocol::Tcp && sp.port.node_port == packet.dport);
        if trace.verdict.is_some() || !serves_port {
            return;
        }
        let at = Listen {
            addr: std::net::SocketAddr::new(packet.dst, packet.dport),
            protocol: Protocol::Tcp,
            portal: false,
        };
        let routes = localhost_routes(state, None, &self.node_name, self.loopback);
        match routes.get(&at) {
            Some(r) => {
                trace.dnat = r
                    .endpoints
                    .iter()
                    .map(|e| join_host_port(&e.ip(), e.port()))
                    .collect();
                trace.matched.push(format!(
                    "localhost-nodeports: tcp {} -> {} ({})",
                    at.addr,
                    trace.dnat.join(" "),
                    r.service
                ));
            }
            None => {
                // No listener: the kernel answers the SYN with a reset.
                trace.verdict = Some(Verdict::Reject);
                trace.reason = Some(Reason::NoEndpoints);
                trace.matched.push(format!(
                    "localhost-nodeports: no listener on tcp {}",
                    at.addr
                ));
            }
        }
    }

    /// The listeners open now, one `# localhost NodePort: tcp <address>` line each (a
    /// comment, so the table's listing before them still reads as nft input).
    pub fn dump(&self) -> String {
        self.fw
            .iter()
            .flat_map(Forwarder::listening)
            .map(|l| format!("# localhost NodePort: tcp {}\n", l.addr))
            .collect()
    }

    /// The forwarder's counters by name (empty before it started).
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        self.fw.as_ref().map(Forwarder::stats).unwrap_or_default()
    }
}

/// The listeners: one on `loopback:<nodePort>`
/// for every TCP Service port of `keys` (every Service when `None`) that has an endpoint to
/// go to. Traffic from the node itself is internal, as in the kernel modes' "source is
/// local" short-circuit: the cluster's endpoints, whatever the external traffic policy. A
/// port without endpoints gets no listener, so a client's connect is refused, as the kernel
/// modes reject it. UDP and SCTP are not served (upstream neither).
pub fn localhost_routes(
    state: &State,
    keys: Option<&BTreeSet<ServiceKey>>,
    node_name: &str,
    loopback: IpAddr,
) -> BTreeMap<Listen, Route> {
    let node = NodeView {
        name: node_name,
        zone: state.node().zone.as_deref(),
    };
    let ports = match keys {
        None => state.service_ports(),
        Some(keys) => keys
            .iter()
            .flat_map(|k| state.service_ports_of(k))
            .collect(),
    };
    let mut out = BTreeMap::new();
    for sp in ports {
        let node_port = sp.port.node_port;
        if sp.name.protocol != Protocol::Tcp || node_port == 0 {
            continue;
        }
        let serving = Serving::of(state, &sp, node);
        let endpoints: Vec<SocketAddr> = serving
            .endpoints
            .cluster
            .iter()
            .map(|e| SocketAddr::new(e.ip, e.port.get()))
            .collect();
        if endpoints.is_empty() {
            continue;
        }
        let l = Listen {
            addr: SocketAddr::new(loopback, node_port),
            protocol: Protocol::Tcp,
            portal: false,
        };
        out.insert(
            l,
            Route {
                owner: sp.name.service.clone(),
                service: sp.name.to_string(),
                endpoints,
                affinity: sp
                    .service
                    .session_affinity_timeout
                    .map(|s| Duration::from_secs(u64::from(s))),
                portal_ips: Vec::new(),
            },
        );
    }
    out
}

fn loopback(family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => Ipv4Addr::LOCALHOST.into(),
        IpFamily::V6 => Ipv6Addr::LOCALHOST.into(),
    }
}

/// Upstream's proxy: a 5 s dial timeout, TCP only. One worker thread: this path carries a
/// node's own tooling (health checks, `curl localhost:<nodePort>`), not its Service traffic.
fn config() -> ForwardConfig {
    ForwardConfig {
        threads: 1,
        ..ForwardConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::IpFamily::V4;
    use crate::nftables::testutil::{changes, key, svc, NODE};
    use std::io::{ErrorKind, Read};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    /// An endpoint at `ip:8080` (the test cluster's endpoint port) that answers `tag` to up
    /// to eight connections.
    fn backend(ip: &str, tag: &'static str) {
        let l = TcpListener::bind((ip, 8080)).unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().take(8) {
                let _ = std::io::Write::write_all(&mut s.unwrap(), tag.as_bytes());
            }
        });
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn ask(port: u16) -> std::io::Result<String> {
        let mut c = TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(5),
        )?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut out = String::new();
        c.read_to_string(&mut out)?;
        Ok(out)
    }

    /// TCP NodePorts with endpoints get a listener on 127.0.0.1 that reaches the cluster's
    /// endpoints (a Local external policy does not apply to the node's own traffic); UDP
    /// gets none; a port without endpoints has no listener, so connect is refused; a port
    /// taken on loopback is reported by Service and opened by a later sync once free.
    #[test]
    fn localhost_nodeports_follow_the_services_endpoints() {
        backend("127.77.0.1", "a");
        let (pa, pb, pc) = (free_port(), free_port(), free_port());
        let a = || {
            svc("a", "172.30.0.1")
                .node_port(pa)
                .external_local()
                .eps_on(&[("127.77.0.1", "elsewhere")])
        };
        let dns = svc("dns", "172.30.0.2")
            .protocol("UDP")
            .node_port(pb)
            .eps(&["127.77.0.1"]);
        let c = || svc("c", "172.30.0.3").node_port(pc).eps(&["127.77.0.1"]);
        // Someone else holds c's NodePort on loopback.
        let squatter = TcpListener::bind(("127.0.0.1", pc)).unwrap();
        let mut st = State::new(V4);
        st.apply(changes(&[a(), dns, c()]));
        let mut lh = LocalhostNodePorts::new(V4, NODE, false);
        let s = lh.sync(&st, &BTreeSet::new(), true);
        assert_eq!((s.listeners, s.opened), (1, 1), "{s:?}");
        assert_eq!(s.errors.len(), 1, "{s:?}");
        assert!(
            s.errors[0].starts_with("ns/c:p: cannot listen on 127.0.0.1"),
            "{s:?}"
        );
        assert_eq!(ask(pa).unwrap(), "a");
        assert!(lh.dump().contains(&format!("tcp 127.0.0.1:{pa}")));

        // The port is free again: a sync that changes nothing else opens it.
        drop(squatter);
        let s = lh.sync(&st, &BTreeSet::new(), false);
        assert_eq!((s.listeners, s.opened, s.errors.len()), (2, 1, 0), "{s:?}");
        assert_eq!(ask(pc).unwrap(), "a");

        // a loses its endpoints: its listener closes and a client is refused at connect.
        st.apply(changes(&[svc("a", "172.30.0.1").node_port(pa)]));
        let s = lh.sync(&st, &BTreeSet::from([key("a")]), false);
        assert_eq!((s.listeners, s.closed), (1, 1), "{s:?}");
        assert_eq!(
            ask(pa).map_err(|e| e.kind()),
            Err(ErrorKind::ConnectionRefused)
        );
        assert_eq!(ask(pc).unwrap(), "a", "c's listener is untouched");
    }

    /// Dry engines (render, trace) compute the listeners and open none.
    #[test]
    fn a_dry_run_opens_nothing() {
        let port = free_port();
        let mut st = State::new(V4);
        st.apply(changes(&[svc("a", "172.30.0.1")
            .node_port(port)
            .eps(&["10.0.0.1"])]));
        let mut lh = LocalhostNodePorts::new(V4, NODE, true);
        assert_eq!(lh.sync(&st, &BTreeSet::new(), true).listeners, 1);
        assert_eq!(lh.dump(), "");
        assert_eq!(
            ask(port).map_err(|e| e.kind()),
            Err(ErrorKind::ConnectionRefused)
        );
        assert_eq!(
            lh.describe(&st),
            format!("tcp 127.0.0.1:{port} -> 10.0.0.1:8080 (ns/a:p)\n")
        );
    }

    /// The tracer follows a connection to a localhost NodePort into the proxy: to the
    /// port's endpoints, or refused when it has none; other packets are the table's.
    #[test]
    fn the_tracer_follows_localhost_nodeports_into_the_proxy() {
        use crate::trace::Origin;
        let mut st = State::new(V4);
        st.apply(changes(&[
            svc("a", "172.30.0.1").node_port(30080).eps(&["10.0.0.1"]),
            svc("e", "172.30.0.2").node_port(30081),
            svc("u", "172.30.0.3")
                .protocol("UDP")
                .node_port(30053)
                .eps(&["10.0.0.1"]),
        ]));
        let lh = LocalhostNodePorts::new(V4, NODE, true);
        let walk = |protocol: Protocol, dst: &str, dport: u16| {
            let mut t = Trace::default();
            let packet = Packet {
                src: "127.0.0.1".parse().unwrap(),
                dst: dst.parse().unwrap(),
                protocol,
                dport,
                origin: Origin::Local,
            };
            lh.trace(&st, &packet, &mut t);
            t
        };
        let t = walk(Protocol::Tcp, "127.0.0.1", 30080);
        assert_eq!(
            (t.dnat, t.verdict),
            (vec!["10.0.0.1:8080".to_owned()], None)
        );
        let t = walk(Protocol::Tcp, "127.0.0.1", 30081);
        assert_eq!(t.verdict, Some(Verdict::Reject));
        assert_eq!(t.reason, Some(Reason::NoEndpoints));
        for (protocol, dst, port) in [
            (Protocol::Udp, "127.0.0.1", 30053),
            (Protocol::Tcp, "127.0.0.1", 30999),
            (Protocol::Tcp, "192.168.0.2", 30080),
        ] {
            assert_eq!(walk(protocol, dst, port), Trace::default(), "{dst}:{port}");
        }
    }
}
