//! Which endpoint a new connection or UDP session goes to.
//!
//! Round robin over the endpoints, as the legacy userspace proxier did, with ClientIP
//! affinity as a sliding pin (each use extends it, as upstream's localnodeportproxy does).
//! A connection that fails to connect moves on to the next endpoint in the same order.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most endpoints one connection tries before giving up (each try is bounded by the connect
/// timeout, so a client waits at most this many timeouts).
pub const MAX_TRIES: usize = 3;
/// Most clients pinned per Service port; past it, expired pins are dropped first and new
/// clients go unpinned rather than grow the map without bound.
pub const MAX_PINS: usize = 65_536;

/// The endpoints of one listener, replaced as a whole on every update (readers never lock).
#[derive(Debug)]
pub struct Backends {
    pub endpoints: Vec<SocketAddr>,
    next: AtomicUsize,
    affinity: Option<Affinity>,
}

#[derive(Debug)]
struct Affinity {
    timeout: Duration,
    pins: Mutex<HashMap<IpAddr, (SocketAddr, Instant)>>,
}

impl Backends {
    /// `previous`: the table this one replaces. Its round-robin position and the pins of
    /// clients whose endpoint is still here carry over, so an update moves nobody needlessly.
    pub fn new(
        endpoints: Vec<SocketAddr>,
        affinity: Option<Duration>,
        previous: Option<&Backends>,
    ) -> Backends {
        let next = previous.map_or(0, |p| p.next.load(Ordering::Relaxed));
        let affinity = affinity.map(|timeout| {
            let mut pins = HashMap::new();
            if let Some(old) = previous.and_then(|p| p.affinity.as_ref()) {
                if let Ok(old) = old.pins.lock() {
                    pins.extend(
                        old.iter()
                            .filter(|(_, (ep, _))| endpoints.contains(ep))
                            .map(|(c, v)| (*c, *v)),
                    );
                }
            }
            Affinity {
                timeout,
                pins: Mutex::new(pins),
            }
        });
        Backends {
            endpoints,
            next: AtomicUsize::new(next),
            affinity,
        }
    }

    /// The endpoints to try for `client`, best first: its pinned endpoint (if the pin is
    /// live), then the next ones in round-robin order; at most [`MAX_TRIES`].
    pub fn order(&self, client: IpAddr) -> Vec<SocketAddr> {
        let n = self.endpoints.len();
        if n == 0 {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(MAX_TRIES.min(n));
        if let Some(pinned) = self.pinned(client) {
            out.push(pinned);
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            if out.len() >= MAX_TRIES.min(n) {
                break;
            }
            let ep = self.endpoints[(start + i) % n];
            if !out.contains(&ep) {
                out.push(ep);
            }
        }
        out
    }

    fn pinned(&self, client: IpAddr) -> Option<SocketAddr> {
        let a = self.affinity.as_ref()?;
        let pins = a.pins.lock().ok()?;
        let (ep, at) = pins.get(&client)?;
        (at.elapsed() < a.timeout && self.endpoints.contains(ep)).then_some(*ep)
    }

    /// `client` reached `ep`: pin it there (a no-op without affinity).
    pub fn pin(&self, client: IpAddr, ep: SocketAddr) {
        let Some(a) = &self.affinity else { return };
        let Ok(mut pins) = a.pins.lock() else { return };
        if pins.len() >= MAX_PINS && !pins.contains_key(&client) {
            let timeout = a.timeout;
            pins.retain(|_, (_, at)| at.elapsed() < timeout);
            if pins.len() >= MAX_PINS {
                return;
            }
        }
        pins.insert(client, (ep, Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, 0, 1], 8000 + i)))
            .collect()
    }

    #[test]
    fn round_robin_spreads_first_choices_evenly() {
        let b = Backends::new(eps(3), None, None);
        let client: IpAddr = [10, 1, 1, 1].into();
        let firsts: Vec<u16> = (0..6).map(|_| b.order(client)[0].port()).collect();
        assert_eq!(firsts, [8000, 8001, 8002, 8000, 8001, 8002]);
        assert_eq!(b.order(client).len(), 3);
        assert!(Backends::new(Vec::new(), None, None)
            .order(client)
            .is_empty());
    }

    #[test]
    fn a_pinned_client_goes_first_to_its_endpoint_until_the_pin_expires() {
        let b = Backends::new(eps(3), Some(Duration::from_millis(200)), None);
        let client: IpAddr = [10, 1, 1, 1].into();
        b.pin(client, eps(3)[2]);
        for _ in 0..5 {
            assert_eq!(b.order(client)[0], eps(3)[2]);
        }
        let other: IpAddr = [10, 1, 1, 2].into();
        assert_ne!(
            (0..3).map(|_| b.order(other)[0]).collect::<Vec<_>>(),
            vec![eps(3)[2]; 3]
        );
        std::thread::sleep(Duration::from_millis(250));
        let firsts: Vec<_> = (0..3).map(|_| b.order(client)[0]).collect();
        assert_eq!(firsts.iter().filter(|e| **e == eps(3)[2]).count(), 1);
    }

    #[test]
    fn pins_to_endpoints_that_remain_survive_an_update() {
        let old = Backends::new(eps(3), Some(Duration::from_secs(60)), None);
        let (a, b): (IpAddr, IpAddr) = ([10, 1, 1, 1].into(), [10, 1, 1, 2].into());
        old.pin(a, eps(3)[1]);
        old.pin(b, eps(3)[2]);
        let new = Backends::new(eps(2), Some(Duration::from_secs(60)), Some(&old));
        assert_eq!(new.order(a)[0], eps(3)[1]);
        assert_eq!(new.pinned(b), None); // its endpoint is gone
    }
}
