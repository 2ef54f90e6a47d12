//! nftables mode: one table (`ip kproxy` / `ip6 kproxy`) written in atomic transactions.
//!
//! * [`ast`]: rules, elements and operations as values, printed in `nft -f` syntax.
//! * [`mod@render`]: a Service -> its chains and its elements in shared sets and maps (the
//!   layout that keeps the number of sets independent of the number of Services).
//! * [`writer`]: full syncs (the table replaced atomically) and partial ones (element diffs).
//! * [`backend`]: the kernel (`nft -f -`) or an in-memory [`backend::Fake`].
//! * [`netlink`]: small element-only updates straight over nfnetlink (no `nft` process).
//! * [`trace`]: a packet tracer over the in-memory table.
//! * [`json`]: the kernel's table read back (`nft -j list table`) into the same model.
//! * [`replay`]: transactions as JSON, for the Fake-vs-kernel differential test.
//! * [`localhost`]: localhost NodePorts through a userspace proxy (KEP-6032).
//! * [`program`]: the engine's nftables side (one sync = one transaction plus cleanup).

pub mod ast;
pub mod backend;
pub mod json;
pub mod localhost;
pub mod netlink;
pub mod packed;
pub mod program;
pub mod render;
pub mod replay;
#[cfg(test)]
mod testutil;
pub mod trace;
pub mod writer;

pub use backend::{Backend, Fake, Kernel, Model};
