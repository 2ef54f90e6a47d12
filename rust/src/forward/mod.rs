//! The userspace forwarder: TCP and UDP listeners that relay connections to endpoints.
//!
//! Python never sees a packet: [`Forwarder::update`] takes the listeners and endpoints a sync
//! computed ([`routes`]), binds new listeners, closes removed ones (their open connections run
//! on until they end: endpoints drain gracefully) and publishes each listener's endpoints
//! with one atomic pointer swap, so traffic never waits for an update.

pub mod balance;
pub mod budget;
pub mod ports;
mod relay;
pub mod stats;
mod tcp;
mod udp;
pub mod workers;

use crate::error::{Error, Result};
use crate::model::{Protocol, ServiceKey};
use arc_swap::ArcSwap;
use balance::Backends;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{watch, Semaphore};

#[derive(Clone, Debug)]
pub struct ForwardConfig {
    /// Bound on each connect to an endpoint; the next endpoint is tried after it.
    pub connect_timeout: Duration,
    pub udp_idle_timeout: Duration,
    /// A TCP connection with no bytes either way for this long is closed (the kernel modes'
    /// counterpart is conntrack's established timeout, which this defaults to).
    pub tcp_idle_timeout: Duration,
    /// Open TCP connections across all listeners; more are reset at once and counted.
    pub max_connections: usize,
    pub max_udp_sessions: usize,
    /// Worker threads ([`workers`]).
    pub threads: usize,
    /// Where portal listeners listen (`--proxy-port-range`); `None`: the kernel's ephemeral
    /// range.
    pub portal_ports: Option<RangeInclusive<u16>>,
    /// Most listeners this forwarder holds; `None`: what the process's open-file limit
    /// allows, shared with the process's other forwarders ([`budget`]).
    pub max_listeners: Option<usize>,
}

impl Default for ForwardConfig {
    fn default() -> ForwardConfig {
        ForwardConfig {
            connect_timeout: Duration::from_secs(5),
            // The legacy userspace proxier's udpIdleTimeout default.
            udp_idle_timeout: Duration::from_millis(250),
            // kube-proxy's conntrack.tcpEstablishedTimeout default.
            tcp_idle_timeout: Duration::from_secs(24 * 3600),
            // Each connection holds at most two pipes' or buffers' worth of bytes in flight.
            max_connections: 16_384,
            max_udp_sessions: 65_536,
            // A worker per CPU the process may use: a busy Service's connections spread over
            // all of them.
            threads: std::thread::available_parallelism().map_or(2, usize::from),
            portal_ports: None,
            max_listeners: None,
        }
    }
}

/// One redirect to a portal listener: (Service address, protocol, Service port, the portal
/// listener's port).
pub type PortalElement = (IpAddr, Protocol, u16, u16);

/// One listening socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Listen {
    /// Where to listen; for a portal, the Service address it stands for (the socket itself
    /// listens on a port the kernel picks, on every address of the family).
    pub addr: SocketAddr,
    pub protocol: Protocol,
    /// Reached through redirect rules ([`portals`]) rather than directly.
    pub portal: bool,
}

/// Where a listener's connections go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The Service this listener serves (a partial sync updates only the changed ones').
    pub owner: ServiceKey,
    /// The Service port, for messages (`namespace/name:port/protocol`).
    pub service: String,
    pub endpoints: Vec<SocketAddr>,
    /// ClientIP affinity.
    pub affinity: Option<Duration>,
    /// Portals only: the Service addresses redirected to this listener (on `addr`'s port).
    pub portal_ips: Vec<IpAddr>,
}

/// What the data path shares: configuration, the connection cap and the counters.
pub struct Shared {
    pub config: ForwardConfig,
    pub pool: Arc<workers::Pool>,
    pub connections: Arc<Semaphore>,
    pub stats: stats::Stats,
}

struct Listener {
    backends: Arc<ArcSwap<Backends>>,
    route: Route,
    stop: watch::Sender<bool>,
    /// Disconnected once the listener's task has ended and closed its socket.
    done: std::sync::mpsc::Receiver<()>,
    port: u16,
    _slot: budget::Slot,
}

/// What one update did.
#[derive(Debug, Default)]
pub struct Updated {
    pub opened: usize,
    pub closed: usize,
    pub changed: usize,
    /// Listeners that could not be opened (`service`: reason); the others are unaffected and
    /// the next update that includes the owner tries again.
    pub errors: Vec<String>,
    /// The Services those listeners belong to.
    pub failed: BTreeSet<ServiceKey>,
}

pub struct Forwarder {
    /// Held for its threads: dropping it stops them (after `drop` has stopped the
    /// listeners), and every connection with them.
    _workers: workers::Workers,
    shared: Arc<Shared>,
    listeners: BTreeMap<Listen, Listener>,
    ports: ports::PortPool,
    budget: Arc<budget::Budget>,
}

impl Forwarder {
    pub fn new(config: ForwardConfig) -> Result<Forwarder> {
        let workers =
            workers::Workers::start(config.threads, "kproxy-forward").map_err(|source| {
                Error::Forwarder {
                    op: "forwarder threads",
                    source,
                }
            })?;
        let range = config
            .portal_ports
            .clone()
            .unwrap_or_else(ports::kernel_range);
        // Any varying seed will do: it only spreads restarts over the range.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id());
        Ok(Forwarder {
            ports: ports::PortPool::new(range, seed),
            budget: config
                .max_listeners
                .map_or_else(budget::Budget::process, budget::Budget::fixed),
            shared: Arc::new(Shared {
                pool: workers.pool().clone(),
                connections: Arc::new(Semaphore::new(config.max_connections)),
                config,
                stats: stats::Stats::default(),
            }),
            listeners: BTreeMap::new(),
            _workers: workers,
        })
    }

    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        let mut s = self.shared.stats.snapshot();
        s.push(("listeners", self.listeners.len() as u64));
        s
    }

    /// The listeners open now.
    pub fn listening(&self) -> Vec<Listen> {
        self.listeners.keys().copied().collect()
    }

    /// What the redirect rules must send where: (Service address, protocol, Service port,
    /// the portal listener's port), sorted.
    pub fn portal_elements(&self) -> Vec<PortalElement> {
        let mut out: Vec<_> = self
            .listeners
            .iter()
            .filter(|(l, _)| l.portal)
            .flat_map(|(l, have)| {
                have.route
                    .portal_ips
                    .iter()
                    .map(move |ip| (*ip, l.protocol, l.addr.port(), have.port))
            })
            .collect();
        out.sort();
        out.dedup_by(|a, b| (a.0, a.1, a.2) == (b.0, b.1, b.2));
        out
    }

    /// Make the listeners exactly `routes`.
    pub fn update(&mut self, routes: BTreeMap<Listen, Route>) -> Updated {
        self.update_where(routes, |_| true)
    }

    /// Make the listeners of the Services in `owners` exactly `routes` (which holds only
    /// theirs); every other listener stays as it is. A partial sync's update.
    pub fn update_services(
        &mut self,
        owners: &BTreeSet<ServiceKey>,
        routes: BTreeMap<Listen, Route>,
    ) -> Updated {
        self.update_where(routes, |r| owners.contains(&r.owner))
    }

    /// Close the listeners `in_scope` selects that `routes` lacks, re-point the ones whose
    /// route changed, open the new ones.
    fn update_where(
        &mut self,
        routes: BTreeMap<Listen, Route>,
        in_scope: impl Fn(&Route) -> bool,
    ) -> Updated {
        let mut out = Updated::default();
        let gone: Vec<Listen> = self
            .listeners
            .iter()
            .filter(|(l, have)| !routes.contains_key(l) && in_scope(&have.route))
            .map(|(l, _)| *l)
            .collect();
        let mut closing = Vec::with_capacity(gone.len());
        for l in gone {
            if let Some(old) = self.listeners.remove(&l) {
                let _ = old.stop.send(true);
                if l.portal {
                    self.ports.release(l.protocol, old.port);
                }
                closing.push(old.done);
                out.closed += 1;
            }
        }
        // Wait (bounded) for the sockets to close: once the update returns, a client of a
        // removed listener is refused at connect rather than accepted into a backlog that
        // is about to be reset, and its port is free for a listener opened below.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        for done in closing {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let _ = done.recv_timeout(left);
        }
        // Walk the routes given, not every listener: a partial sync names a few.
        for (l, route) in routes {
            if let Some(have) = self.listeners.get_mut(&l) {
                if route != have.route {
                    let old = have.backends.load();
                    have.backends.store(Arc::new(Backends::new(
                        route.endpoints.clone(),
                        route.affinity,
                        Some(&old),
                    )));
                    have.route = route;
                    out.changed += 1;
                }
                continue;
            }
            let owner = route.owner.clone();
            match self.open(l, route) {
                Ok(listener) => {
                    self.listeners.insert(l, listener);
                    out.opened += 1;
                }
                Err(e) => {
                    out.errors.push(e);
                    out.failed.insert(owner);
                }
            }
        }
        out
    }

    fn open(&mut self, l: Listen, route: Route) -> std::result::Result<Listener, String> {
        let fail = |e: std::io::Error| {
            format!(
                "{}: cannot listen on {} ({}): {e}",
                route.service,
                l.addr,
                l.protocol.lower()
            )
        };
        let backends = Arc::new(ArcSwap::from_pointee(Backends::new(
            route.endpoints.clone(),
            route.affinity,
            None,
        )));
        if l.protocol == Protocol::Sctp {
            return Err(format!(
                "{}: SCTP is not supported by the userspace mode",
                route.service
            ));
        }
        let slot = self.budget.claim().map_err(|why| {
            stats::inc(&self.shared.stats.listeners_refused);
            format!(
                "{}: cannot listen on {} ({}): {why}",
                route.service,
                l.addr,
                l.protocol.lower()
            )
        })?;
        let (bound, port) = if l.portal {
            let any: IpAddr = if l.addr.is_ipv4() {
                Ipv4Addr::UNSPECIFIED.into()
            } else {
                Ipv6Addr::UNSPECIFIED.into()
            };
            self.ports
                .bind(l.protocol, |p| {
                    Bound::new(l.protocol, SocketAddr::new(any, p))
                })
                .map_err(fail)?
        } else {
            let bound = Bound::new(l.protocol, l.addr).map_err(fail)?;
            (bound, l.addr.port())
        };
        let (stop, stopped) = watch::channel(false);
        let (done_tx, done) = std::sync::mpsc::channel::<()>();
        let shared = self.shared.clone();
        // Listeners are spread over the workers; their connections go to every worker.
        let on = self.shared.pool.next();
        let _guard = self.shared.pool.handle(on).enter();
        let started = match bound {
            Bound::Tcp(std) => std
                .set_nonblocking(true)
                .and_then(|()| {
                    // SAFETY: a std listener owns its descriptor for as long as it lives and
                    // always reports that one.
                    let fd = unsafe { AsyncFd::register_with_interest(std, Interest::READABLE) };
                    fd.map_err(io::Error::from)
                })
                .map(|listener| {
                    let serve = tcp::serve(listener, backends.clone(), shared, stopped);
                    self.shared.pool.spawn(on, async move {
                        let _done = done_tx;
                        serve.await;
                    });
                }),
            Bound::Udp(std) => std
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UdpSocket::from_std(std))
                .map(|socket| {
                    let serve = udp::serve(socket, backends.clone(), shared, stopped);
                    self.shared.pool.spawn(on, async move {
                        let _done = done_tx;
                        serve.await;
                    });
                }),
        };
        if let Err(e) = started {
            if l.portal {
                self.ports.release(l.protocol, port);
            }
            return Err(fail(e));
        }
        Ok(Listener {
            backends,
            route,
            stop,
            done,
            port,
            _slot: slot,
        })
    }
}

/// The listeners as text, one per line: `tcp 127.0.0.1:30080 -> 10.0.0.1:8080 10.0.0.2:8080
/// (ns/svc:http)`; what `kproxy render` prints in the userspace mode.
pub fn describe(routes: &BTreeMap<Listen, Route>) -> String {
    let mut out = String::new();
    for (l, r) in routes {
        let eps: Vec<String> = r.endpoints.iter().map(|e| e.to_string()).collect();
        let eps = if eps.is_empty() {
            "(no endpoints: reset)".to_owned()
        } else {
            eps.join(" ")
        };
        let affinity = r
            .affinity
            .map(|d| format!(" affinity {}s", d.as_secs()))
            .unwrap_or_default();
        let target = if l.portal {
            let ips: Vec<String> = r.portal_ips.iter().map(|i| i.to_string()).collect();
            format!("portal {} port {}", ips.join(","), l.addr.port())
        } else {
            l.addr.to_string()
        };
        out.push_str(&format!(
            "{} {target} -> {eps}{affinity} ({})\n",
            l.protocol.lower(),
            r.service
        ));
    }
    out
}

/// A listening socket before the runtime takes it over.
enum Bound {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

impl Bound {
    fn new(protocol: Protocol, at: SocketAddr) -> std::io::Result<Bound> {
        match protocol {
            Protocol::Tcp => std::net::TcpListener::bind(at).map(Bound::Tcp),
            Protocol::Udp => std::net::UdpSocket::bind(at).map(Bound::Udp),
            Protocol::Sctp => Err(std::io::ErrorKind::Unsupported.into()),
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        for l in self.listeners.values() {
            let _ = l.stop.send(true);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Real sockets on loopback: no privileges needed.
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream, UdpSocket};

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap()
    }

    /// A TCP server answering each connection with `tag` and then an echo of everything it
    /// read until the client half-closed. Stops after `n` connections.
    fn tcp_server(tag: &'static str, n: usize) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().take(n) {
                let Ok(mut s) = s else { continue };
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got);
                let _ = s.write_all(tag.as_bytes());
                let _ = s.write_all(&got);
            }
        });
        addr
    }

    fn config() -> ForwardConfig {
        ForwardConfig {
            connect_timeout: Duration::from_millis(500),
            threads: 1,
            ..ForwardConfig::default()
        }
    }

    fn key(name: &str) -> ServiceKey {
        ServiceKey {
            namespace: crate::model::Name::new("ns").unwrap(),
            name: crate::model::Name::new(name).unwrap(),
        }
    }

    fn route(endpoints: Vec<SocketAddr>) -> Route {
        Route {
            owner: key("svc"),
            service: "ns/svc:http".into(),
            endpoints,
            affinity: None,
            portal_ips: Vec::new(),
        }
    }

    fn ask(port: u16, msg: &str) -> std::io::Result<String> {
        let mut c = TcpStream::connect(("127.0.0.1", port))?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.write_all(msg.as_bytes())?;
        c.shutdown(Shutdown::Write)?; // half-close: the reply still comes back
        let mut out = String::new();
        c.read_to_string(&mut out)?;
        Ok(out)
    }

    fn listen(port: u16, protocol: Protocol) -> Listen {
        Listen {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            protocol,
            portal: false,
        }
    }

    #[test]
    fn tcp_is_relayed_round_robin_with_half_close() {
        let (a, b) = (tcp_server("a:", 2), tcp_server("b:", 2));
        let mut fw = Forwarder::new(config()).unwrap();
        let port = free_port();
        let u = fw.update(BTreeMap::from([(
            listen(port, Protocol::Tcp),
            route(vec![a, b]),
        )]));
        assert_eq!((u.opened, u.errors.len()), (1, 0));
        let mut replies: Vec<String> = (0..4)
            .map(|i| ask(port, &format!("hi{i}")).unwrap())
            .collect();
        replies.sort();
        assert_eq!(replies, ["a:hi0", "a:hi2", "b:hi1", "b:hi3"]);
        // A relay counts its bytes once both directions are closed, just after the client
        // has read the reply: wait for the last one (bounded).
        wait_for(&fw, "tcp_active", 0);
        assert_eq!(stat(&fw, "tcp_accepted"), 4);
        assert_eq!(stat(&fw, "bytes_to_endpoints"), 12);
        assert_eq!(stat(&fw, "bytes_to_clients"), 20);
    }

    #[test]
    fn a_dead_endpoint_is_skipped_and_no_endpoint_means_a_reset() {
        let dead = SocketAddr::from(([127, 0, 0, 1], free_port())); // nothing listens
        let live = tcp_server("live:", 3);
        let mut fw = Forwarder::new(config()).unwrap();
        let port = free_port();
        fw.update(BTreeMap::from([(
            listen(port, Protocol::Tcp),
            route(vec![dead, live]),
        )]));
        for _ in 0..3 {
            assert_eq!(ask(port, "x").unwrap(), "live:x");
        }
        let stats: BTreeMap<_, _> = fw.stats().into_iter().collect();
        assert!(stats["tcp_connect_failures"] >= 1);

        fw.update(BTreeMap::from([(
            listen(port, Protocol::Tcp),
            route(vec![]),
        )]));
        let err = ask(port, "x").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    }

    /// A listener whose accept queue is full: the kernel drops further SYNs, so a connect to
    /// it never completes (an endpoint that never answers, without leaving loopback).
    fn black_hole() -> (std::os::fd::OwnedFd, std::net::TcpStream, SocketAddr) {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket calls on a descriptor we own from here on.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        assert!(fd >= 0);
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: addr is a valid sockaddr_in of the given length.
        let rc = unsafe { libc::bind(fd, (&addr as *const libc::sockaddr_in).cast(), len) };
        assert_eq!(rc, 0);
        assert_eq!(unsafe { libc::listen(fd, 0) }, 0);
        let mut len = len;
        // SAFETY: getsockname writes at most `len` bytes into addr.
        unsafe { libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_in).cast(), &mut len) };
        let at = SocketAddr::from(([127, 0, 0, 1], u16::from_be(addr.sin_port)));
        let filler = TcpStream::connect(at).unwrap(); // takes the only queue slot
        (owned, filler, at)
    }

    #[test]
    fn an_endpoint_that_never_answers_costs_one_connect_timeout() {
        let (_hole, _filler, stalled) = black_hole();
        let live = tcp_server("live:", 4);
        let mut fw = Forwarder::new(config()).unwrap();
        let port = free_port();
        fw.update(BTreeMap::from([(
            listen(port, Protocol::Tcp),
            route(vec![stalled, live]),
        )]));
        for _ in 0..4 {
            let t = std::time::Instant::now();
            assert_eq!(ask(port, "z").unwrap(), "live:z");
            // At most one connect timeout (500 ms here) before the next endpoint.
            assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        }
        assert!(stat(&fw, "tcp_connect_failures") >= 1);
    }

    /// A server that accepts `n` connections and holds each open without reading or writing
    /// (an application that hangs after accept); dropped when `release` is dropped.
    fn stalling_server(n: usize) -> (SocketAddr, std::sync::mpsc::Sender<()>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (release, released) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let held: Vec<_> = l.incoming().take(n).filter_map(|s| s.ok()).collect();
            let _ = released.recv_timeout(Duration::from_secs(30));
            drop(held);
        });
        (addr, release)
    }

    fn stat(fw: &Forwarder, name: &str) -> u64 {
        fw.stats().into_iter().find(|(n, _)| *n == name).unwrap().1
    }

    /// Counters move just after the client sees the effect (a relay counts its bytes once
    /// both directions have closed): wait, bounded, until `name` reads `value`.
    fn wait_for(fw: &Forwarder, name: &str, value: u64) {
        for _ in 0..100 {
            if stat(fw, name) == value {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn an_endpoint_that_accepts_and_stalls_is_closed_after_the_idle_timeout() {
        let (stalled, _release) = stalling_server(1);
        let cfg = ForwardConfig {
            tcp_idle_timeout: Duration::from_millis(300),
            ..config()
        };
        let mut fw = Forwarder::new(cfg).unwrap();
        let port = free_port();
        fw.update(BTreeMap::from([(
            listen(port, Protocol::Tcp),
            route(vec![stalled]),
        )]));
        let t = std::time::Instant::now();
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut buf = [0u8; 16];
        let got = c.read(&mut buf);
        // The client learns the connection is gone (a reset) after the idle timeout, not
        // after its own read timeout.
        assert_eq!(
            got.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset)
        );
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        assert_eq!(stat(&fw, "tcp_idle_closed"), 1);
    }

    #[test]
    fn a_busy_connection_is_not_idle() {
        // Bytes trickle through more often than the idle timeout, for several timeouts.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let ep = l.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                for _ in 0..8 {
                    std::thread::sleep(Duration::from_millis(100));
                    if s.write_all(b".").is_err() {
                        return;
                    }
                }
            }
        });
        let cfg = ForwardConfig {
            tcp_idle_timeout: Duration::from_millis(300),
            ..config()
        };
        let mut fw = Forwarder::new(cfg).unwrap();
        let port = free_port();
        fw.update(BTreeMap::from([(
            listen(port, Protocol::Tcp),
            route(vec![ep]),
        )]));
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"........");
        assert_eq!(stat(&fw, "tcp_idle_closed"), 0);
    }

    #[test]
    fn an_endpoint_reset_reaches_the_client_as_a_reset() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let ep = l.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut buf = [0u8; 4];
                let _ = s.read(&mut buf);
                let _ = socket_reset(s);
            }
        });
        let mut fw = Forwarder::new(config()).unwrap();
        let port = free_port();
        fw.update(BTreeMap::from([(
            listen(port, Protocol::Tcp),
            route(vec![ep]),
        )]));
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        let got = c.read(&mut buf).map_err(|e| e.kind());
        assert_eq!(got, Err(std::io::ErrorKind::ConnectionReset));
        wait_for(&fw, "tcp_reset", 1);
        assert_eq!(stat(&fw, "tcp_reset"), 1);
    }

    /// Close with a reset (SO_LINGER zero).
    fn socket_reset(s: TcpStream) -> std::io::Result<()> {
        tcp::set_zero_linger(&s)?;
        drop(s);
        Ok(())
    }

    #[test]
    fn a_flood_past_the_cap_is_reset_counted_and_leaves_room_afterwards() {
        const CAP: usize = 8;
        const FLOOD: usize = 200;
        let (held_ep, release) = stalling_server(CAP);
        let cfg = ForwardConfig {
            max_connections: CAP,
            ..config()
        };
        let mut fw = Forwarder::new(cfg).unwrap();
        let port = free_port();
        let l = listen(port, Protocol::Tcp);
        fw.update(BTreeMap::from([(l, route(vec![held_ep]))]));
        // CAP connections take every slot (their endpoint holds them open).
        let held: Vec<TcpStream> = (0..CAP)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        wait_for(&fw, "tcp_active", CAP as u64);
        assert_eq!(stat(&fw, "tcp_active"), CAP as u64);
        // Everything past the cap is reset at once, not queued.
        let t = std::time::Instant::now();
        let mut reset = 0;
        for _ in 0..FLOOD {
            let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 1];
            if c.read(&mut buf).map_err(|e| e.kind()) == Err(std::io::ErrorKind::ConnectionReset) {
                reset += 1;
            }
        }
        assert_eq!(reset, FLOOD);
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert_eq!(stat(&fw, "tcp_over_limit"), FLOOD as u64);
        assert_eq!(stat(&fw, "tcp_active"), CAP as u64);
        // Once the held connections end, their slots serve new connections again.
        drop(held);
        drop(release);
        let ep = tcp_server("after:", 1);
        fw.update(BTreeMap::from([(l, route(vec![ep]))]));
        wait_for(&fw, "tcp_active", 0);
        assert_eq!(ask(port, "q").unwrap(), "after:q");
    }

    #[test]
    fn a_bulk_stream_arrives_whole_in_both_directions() {
        const SIZE: usize = 8 << 20;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let ep = l.local_addr().unwrap();
        std::thread::spawn(move || {
            // Echo server: everything read is written back.
            if let Ok((s, _)) = l.accept() {
                let mut r = s.try_clone().unwrap();
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(Shutdown::Write);
            }
        });
        let mut fw = Forwarder::new(config()).unwrap();
        let port = free_port();
        fw.update(BTreeMap::from([(
            listen(port, Protocol::Tcp),
            route(vec![ep]),
        )]));
        let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let data: Vec<u8> = (0..SIZE).map(|i| (i * 7 + i / 4096) as u8).collect();
        let mut w = c.try_clone().unwrap();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            w.write_all(&sent).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut back = Vec::with_capacity(SIZE);
        (&c).read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        assert!(back == data, "{} bytes back of {SIZE}", back.len());
    }

    #[test]
    fn removed_listeners_close_and_a_port_conflict_names_the_service() {
        let ep = tcp_server("e:", 1);
        let mut fw = Forwarder::new(config()).unwrap();
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = taken.local_addr().unwrap().port();
        let port = free_port();
        let u = fw.update(BTreeMap::from([
            (listen(port, Protocol::Tcp), route(vec![ep])),
            (listen(busy, Protocol::Tcp), route(vec![ep])),
        ]));
        assert_eq!(u.opened, 1);
        assert!(
            u.errors[0].starts_with("ns/svc:http: cannot listen on 127.0.0.1:"),
            "{:?}",
            u.errors
        );
        assert_eq!(ask(port, "y").unwrap(), "e:y");
        let u = fw.update(BTreeMap::new());
        assert_eq!(u.closed, 1);
        std::thread::sleep(Duration::from_millis(100));
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    }

    #[test]
    fn listeners_past_the_budget_are_refused_by_name_and_opened_once_room_is_made() {
        let ep = tcp_server("e:", 2);
        let mut fw = Forwarder::new(ForwardConfig {
            max_listeners: Some(2),
            ..config()
        })
        .unwrap();
        // (Listeners open in address order: the highest port is the one refused.)
        let mut ports = [free_port(), free_port(), free_port()];
        ports.sort_unstable();
        let all = |ps: &[u16]| -> BTreeMap<Listen, Route> {
            ps.iter()
                .map(|p| (listen(*p, Protocol::Tcp), route(vec![ep])))
                .collect()
        };
        let u = fw.update(all(&ports));
        assert_eq!((u.opened, u.errors.len()), (2, 1));
        assert!(
            u.errors[0].contains(&format!(":{} (tcp): 2 listeners open", ports[2])),
            "{:?}",
            u.errors
        );
        assert_eq!(u.failed, BTreeSet::from([key("svc")]));
        assert_eq!(stat(&fw, "listeners_refused"), 1);
        assert_eq!(ask(ports[0], "a").unwrap(), "e:a");
        // The first Service goes: its slot opens the third.
        let u = fw.update(all(&ports[1..]));
        assert_eq!((u.closed, u.opened, u.errors.len()), (1, 1, 0));
        assert_eq!(ask(ports[2], "c").unwrap(), "e:c");
    }

    #[test]
    fn udp_sessions_relay_replies_and_follow_affinity() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let ep = server.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 100];
            for _ in 0..6 {
                let Ok((n, from)) = server.recv_from(&mut buf) else {
                    return;
                };
                let mut reply = b"pong:".to_vec();
                reply.extend_from_slice(&buf[..n]);
                let _ = server.send_to(&reply, from);
            }
        });
        let mut fw = Forwarder::new(config()).unwrap();
        let port = free_port();
        fw.update(BTreeMap::from([(
            listen(port, Protocol::Udp),
            route(vec![ep]),
        )]));
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 100];
        for i in 0..3 {
            client
                .send_to(format!("{i}").as_bytes(), ("127.0.0.1", port))
                .unwrap();
            let (n, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], format!("pong:{i}").as_bytes());
            assert_eq!(from.port(), port, "replies come from the Service's address");
        }
        let stats: BTreeMap<_, _> = fw.stats().into_iter().collect();
        assert_eq!(stats["udp_sessions"], 1, "one client, one session");
    }

    #[test]
    fn a_partial_update_touches_only_the_named_services_listeners() {
        let (a, b) = (tcp_server("a:", 10), tcp_server("b:", 10));
        let mut fw = Forwarder::new(config()).unwrap();
        let (pa, pb) = (free_port(), free_port());
        let owned = |owner: &str, ep| Route {
            owner: key(owner),
            ..route(vec![ep])
        };
        fw.update(BTreeMap::from([
            (listen(pa, Protocol::Tcp), owned("one", a)),
            (listen(pb, Protocol::Tcp), owned("two", a)),
        ]));
        // "two" now goes to b; "one" is not named, so it stays as it is although the routes
        // given do not hold it.
        let u = fw.update_services(
            &BTreeSet::from([key("two")]),
            BTreeMap::from([(listen(pb, Protocol::Tcp), owned("two", b))]),
        );
        assert_eq!((u.opened, u.changed, u.closed), (0, 1, 0));
        assert_eq!(ask(pa, "1").unwrap(), "a:1");
        assert_eq!(ask(pb, "2").unwrap(), "b:2");
        // "one" deleted: its listener closes, "two"'s stays.
        let u = fw.update_services(&BTreeSet::from([key("one")]), BTreeMap::new());
        assert_eq!((u.opened, u.changed, u.closed), (0, 0, 1));
        assert_eq!(fw.listening(), [listen(pb, Protocol::Tcp)]);
        assert_eq!(ask(pb, "3").unwrap(), "b:3");
    }

    #[test]
    fn portal_listeners_take_ports_from_the_range_and_give_them_back() {
        let ep = tcp_server("p:", 10);
        let range = 47100..=47139;
        let mut fw = Forwarder::new(ForwardConfig {
            portal_ports: Some(range.clone()),
            ..config()
        })
        .unwrap();
        let portal = |ip: [u8; 4], protocol| Listen {
            addr: SocketAddr::from((ip, 80)),
            protocol,
            portal: true,
        };
        let via = |ip: [u8; 4]| Route {
            portal_ips: vec![IpAddr::from(ip)],
            ..route(vec![ep])
        };
        let all = BTreeMap::from([
            (portal([10, 96, 0, 1], Protocol::Tcp), via([10, 96, 0, 1])),
            (portal([10, 96, 0, 2], Protocol::Tcp), via([10, 96, 0, 2])),
            (portal([10, 96, 0, 3], Protocol::Udp), via([10, 96, 0, 3])),
        ]);
        let u = fw.update(all.clone());
        assert_eq!((u.opened, u.errors.len()), (3, 0), "{:?}", u.errors);
        let elements = fw.portal_elements();
        let ports: BTreeSet<u16> = elements.iter().map(|e| e.3).collect();
        assert_eq!(elements.len(), 3);
        assert!(ports.iter().all(|p| range.contains(p)), "{elements:?}");
        // Each TCP portal listener relays (the redirect rules would lead clients there).
        for e in elements.iter().filter(|e| e.1 == Protocol::Tcp) {
            assert_eq!(ask(e.3, "x").unwrap(), "p:x");
        }
        assert_eq!(fw.ports.held(), 3);
        let mut fewer = all;
        fewer.remove(&portal([10, 96, 0, 2], Protocol::Tcp));
        assert_eq!(fw.update(fewer).closed, 1);
        assert_eq!(fw.ports.held(), 2, "a closed portal's port is given back");
    }
}
