//! Counters the forwarder keeps for Python to poll (the data path never calls into Python).

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Stats {
    pub tcp_accepted: AtomicU64,
    pub tcp_active: AtomicU64,
    /// Connections to an endpoint that failed or timed out (the next endpoint was tried).
    pub tcp_connect_failures: AtomicU64,
    /// Connections closed with a reset because no endpoint could be reached.
    pub tcp_no_endpoint: AtomicU64,
    /// Connections refused because `max_connections` were open.
    pub tcp_over_limit: AtomicU64,
    /// Relayed connections that ended in a reset or another error from either side, and
    /// accepted ones that no worker's poller would take.
    pub tcp_reset: AtomicU64,
    /// Relayed connections closed after moving nothing for the idle timeout.
    pub tcp_idle_closed: AtomicU64,
    pub bytes_to_endpoints: AtomicU64,
    pub bytes_to_clients: AtomicU64,
    pub udp_sessions: AtomicU64,
    pub udp_active: AtomicU64,
    pub udp_datagrams: AtomicU64,
    /// Datagrams dropped: no endpoint, or `max_udp_sessions` open.
    pub udp_dropped: AtomicU64,
    /// Listeners not opened: the descriptor budget was spent ([`super::budget`]).
    pub listeners_refused: AtomicU64,
}

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub fn dec(c: &AtomicU64) {
    c.fetch_sub(1, Ordering::Relaxed);
}

impl Stats {
    /// Name and value of every counter, for Python.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("tcp_accepted", g(&self.tcp_accepted)),
            ("tcp_active", g(&self.tcp_active)),
            ("tcp_connect_failures", g(&self.tcp_connect_failures)),
            ("tcp_no_endpoint", g(&self.tcp_no_endpoint)),
            ("tcp_over_limit", g(&self.tcp_over_limit)),
            ("tcp_reset", g(&self.tcp_reset)),
            ("tcp_idle_closed", g(&self.tcp_idle_closed)),
            ("bytes_to_endpoints", g(&self.bytes_to_endpoints)),
            ("bytes_to_clients", g(&self.bytes_to_clients)),
            ("udp_sessions", g(&self.udp_sessions)),
            ("udp_active", g(&self.udp_active)),
            ("udp_datagrams", g(&self.udp_datagrams)),
            ("udp_dropped", g(&self.udp_dropped)),
            ("listeners_refused", g(&self.listeners_refused)),
        ]
    }
}
