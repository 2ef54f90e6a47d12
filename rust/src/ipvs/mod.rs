//! The ipvs mode's kernel side: IP Virtual Server tables programmed over generic netlink.
//!
//! ```text
//! desired Table --plan::plan(applied)--> ordered Ops --Backend::apply--> per-op outcome
//!                                                   (one sendmsg per chunk: kernel, or Fake)
//! ```
//!
//! * [`message`] encodes each operation and decodes the kernel's dumps, byte for byte as the
//!   kernel's `ip_vs_ctl.c` reads and writes them.
//! * [`kernel::Client`] sends a whole sync's operations in a few batches (many messages per
//!   `sendmsg`) and maps every error acknowledgement back to its operation.
//! * [`fake::Fake`] keeps a table with the kernel's semantics (EEXIST, ESRCH, ENOENT) for tests.
//! * [`plan`] orders the difference between two tables: virtual servers before their real
//!   servers on the way in, real servers before their virtual server on the way out.

pub mod apply;
pub mod desired;
pub mod fake;
pub mod index;
pub mod ipset;
pub mod kernel;
pub mod message;
pub mod plan;
pub mod program;
pub mod rules;
pub mod trace;

use crate::model::Protocol;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// A virtual server's identity: address, protocol, port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VirtualKey {
    pub addr: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

impl std::fmt::Display for VirtualKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.protocol.lower()),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.protocol.lower()),
        }
    }
}

/// IP_VS_SVC_F_PERSISTENT: ClientIP affinity.
pub const F_PERSISTENT: u32 = 0x1;
/// IP_VS_SVC_F_HASHED: set by the kernel on every service it lists; never ours to compare.
pub const F_HASHED: u32 = 0x2;
/// IP_VS_SVC_F_SCHED2: for `mh`, hash the source port too (upstream's FlagSourceHash).
pub const F_SCHED2: u32 = 0x10;

/// What a virtual server does with its connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub scheduler: String,
    /// IP_VS_SVC_F_* without HASHED.
    pub flags: u32,
    /// Persistence timeout in seconds (with F_PERSISTENT).
    pub timeout: u32,
}

/// A real server: where a virtual server sends connections (always masqueraded, as upstream).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DestKey {
    pub addr: IpAddr,
    pub port: u16,
}

impl std::fmt::Display for DestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

/// A real server's state as the kernel lists it (connections are read-only there).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dest {
    pub weight: u32,
    pub active: u32,
    pub inactive: u32,
}

impl Dest {
    pub fn weighted(weight: u32) -> Dest {
        Dest {
            weight,
            ..Dest::default()
        }
    }
}

/// A virtual server and its real servers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Virtual {
    pub service: Service,
    pub dests: BTreeMap<DestKey, Dest>,
}

/// Every virtual server of one IP family.
pub type Table = BTreeMap<VirtualKey, Virtual>;

/// One change to the kernel's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    AddService(VirtualKey, Service),
    SetService(VirtualKey, Service),
    DelService(VirtualKey),
    AddDest(VirtualKey, DestKey, u32),
    /// A new weight (0: drain, graceful termination).
    SetDest(VirtualKey, DestKey, u32),
    DelDest(VirtualKey, DestKey),
}

impl Op {
    pub fn key(&self) -> VirtualKey {
        match self {
            Op::AddService(k, _)
            | Op::SetService(k, _)
            | Op::DelService(k)
            | Op::AddDest(k, _, _)
            | Op::SetDest(k, _, _)
            | Op::DelDest(k, _) => *k,
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::AddService(k, s) => write!(f, "add virtual server {k} ({})", s.scheduler),
            Op::SetService(k, s) => write!(f, "update virtual server {k} ({})", s.scheduler),
            Op::DelService(k) => write!(f, "delete virtual server {k}"),
            Op::AddDest(k, d, w) => write!(f, "add real server {d} to {k} (weight {w})"),
            Op::SetDest(k, d, w) => write!(f, "set real server {d} of {k} to weight {w}"),
            Op::DelDest(k, d) => write!(f, "delete real server {d} from {k}"),
        }
    }
}

/// What applying a list of operations did: the operations the kernel refused, by index,
/// with their errno. Everything else was applied (each message commits on its own).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub sent: usize,
    pub messages_per_send: Vec<usize>,
    pub refused: Vec<(usize, i32)>,
}

/// Where the operations go: the kernel over netlink, or a Fake.
pub trait Backend: Send {
    fn apply(&mut self, ops: &[Op]) -> crate::error::Result<Outcome>;
    /// The whole table of one family, as the kernel has it now.
    fn dump(&mut self, v6: bool) -> crate::error::Result<Table>;
    /// One virtual server's real servers with their connection counts (empty if it is gone).
    fn dests(&mut self, k: &VirtualKey) -> crate::error::Result<BTreeMap<DestKey, Dest>>;
}
