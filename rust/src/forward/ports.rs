//! Ports for portal listeners (`--proxy-port-range`, as the legacy userspace proxier had).
//!
//! A portal listener's port is never seen by clients (redirect rules lead there), so any free
//! port will do. Letting the kernel pick (`bind` to port 0) costs a scan of the bound ports
//! per call once half the ephemeral range is taken: 5,000 portals opened in 0.14 s here,
//! 10,000 in 6 s, 20,000 in 40 s. The pool walks its range with a cursor instead and tries
//! each port once, so a bind costs one system call unless another program holds the port.
//! The cursor moves on after a release too, so a port just freed (whose redirect may still sit
//! in conntrack) is the last to be handed out again.

use std::collections::HashSet;
use std::io;
use std::ops::RangeInclusive;

use crate::model::Protocol;

/// Where the pool's ports come from when none was configured: the kernel's own ephemeral
/// range, which is what binding to port 0 used.
const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const FALLBACK: RangeInclusive<u16> = 32768..=60999;

pub fn kernel_range() -> RangeInclusive<u16> {
    std::fs::read_to_string(LOCAL_PORT_RANGE)
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>());
            match (it.next(), it.next()) {
                (Some(Ok(a)), Some(Ok(b))) if 0 < a && a <= b => Some(a..=b),
                _ => None,
            }
        })
        .unwrap_or(FALLBACK)
}

pub struct PortPool {
    range: RangeInclusive<u16>,
    next: u16,
    held: HashSet<(Protocol, u16)>,
}

impl PortPool {
    /// A pool over `range`, starting at `seed`'s place in it (a random seed keeps a restarted
    /// daemon away from the ports its predecessor's connections used).
    pub fn new(range: RangeInclusive<u16>, seed: u64) -> PortPool {
        let size = u64::from(range.end() - range.start()) + 1;
        let next = range.start() + (seed % size) as u16;
        PortPool {
            range,
            next,
            held: HashSet::new(),
        }
    }

    fn advance(&mut self) -> u16 {
        let port = self.next;
        self.next = if port == *self.range.end() {
            *self.range.start()
        } else {
            port + 1
        };
        port
    }

    /// Bind with `bind(port)` on the first port of the range that is neither ours already nor
    /// refused as in use (another program's). Each port is tried at most once per call.
    pub fn bind<T>(
        &mut self,
        protocol: Protocol,
        mut bind: impl FnMut(u16) -> io::Result<T>,
    ) -> io::Result<(T, u16)> {
        let size = usize::from(self.range.end() - self.range.start()) + 1;
        for _ in 0..size {
            let port = self.advance();
            if self.held.contains(&(protocol, port)) {
                continue;
            }
            match bind(port) {
                Ok(socket) => {
                    self.held.insert((protocol, port));
                    return Ok((socket, port));
                }
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "no free port left in the proxy port range {}-{}",
                self.range.start(),
                self.range.end()
            ),
        ))
    }

    pub fn release(&mut self, protocol: Protocol, port: u16) {
        self.held.remove(&(protocol, port));
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> io::Error {
        io::Error::from(io::ErrorKind::AddrInUse)
    }

    #[test]
    fn ports_are_handed_out_in_turn_skipping_held_and_foreign_ones() {
        let mut pool = PortPool::new(100..=104, 3); // starts at 103
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(pool.bind(Protocol::Tcp, io::Result::Ok).unwrap().1);
        }
        assert_eq!(got, [103, 104, 100]);
        // 101 belongs to another program.
        let (_, p) = pool
            .bind(
                Protocol::Tcp,
                |p| if p == 101 { Err(refused()) } else { Ok(p) },
            )
            .unwrap();
        assert_eq!(p, 102);
        // Only 101 is left, and it is still refused.
        let err = pool
            .bind(
                Protocol::Tcp,
                |p| if p == 101 { Err(refused()) } else { Ok(p) },
            )
            .unwrap_err();
        assert!(err.to_string().contains("100-104"), "{err}");
        // UDP has a port space of its own.
        assert_eq!(pool.bind(Protocol::Udp, io::Result::Ok).unwrap().1, 103);
        // A released port comes back, after the ones not used lately.
        pool.release(Protocol::Tcp, 100);
        assert_eq!(pool.bind(Protocol::Tcp, io::Result::Ok).unwrap().1, 100);
        assert_eq!(pool.held(), 5); // TCP 100, 102, 103, 104 and UDP 103
    }

    #[test]
    fn other_bind_errors_are_returned_at_once() {
        let mut pool = PortPool::new(1000..=2000, 0);
        let mut calls = 0;
        let err = pool
            .bind(Protocol::Tcp, |_| -> io::Result<()> {
                calls += 1;
                Err(io::Error::from(io::ErrorKind::PermissionDenied))
            })
            .unwrap_err();
        assert_eq!((err.kind(), calls), (io::ErrorKind::PermissionDenied, 1));
        assert_eq!(pool.held(), 0);
    }

    #[test]
    fn the_kernel_range_is_read_or_defaults() {
        let r = kernel_range();
        assert!(r.start() <= r.end() && *r.start() > 0);
    }
}
