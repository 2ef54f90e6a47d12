//! kproxy's core: the hot paths of a Kubernetes Service proxy.
//!
//! Python watches the API, normalizes objects and tracks changes; once per sync it hands this
//! crate one [`model::ChangeSet`] (JSON, parsed here with the interpreter released). From there:
//!
//! ```text
//! ChangeSet --state::State::apply--> merged services and endpoints (per engine, one IP family)
//!           --engine::Engine-------> the mode's program::Program (one per engine):
//!               iptables/program.rs   render per Service, write what changed, iptables-restore
//!               nftables/program.rs   one nft transaction per sync (plus a cleanup one)
//!               ipvs/program.rs       IPVS over netlink, ipsets, companion iptables rules
//!               userspace/program.rs  listeners on the forwarder (and nftables redirects to them)
//! ```
//!
//! The shared layer every mode reads:
//!
//! * [`model`] holds normalized, validated values; nothing user-controlled reaches rule text
//!   without having passed validation there (names) or being hashed (chain names).
//! * [`config`]: what an engine is configured with ([`config::EngineConfig`], validated once)
//!   and the settings every renderer reads ([`config::RenderConfig`]).
//! * [`state`] and [`topology`]: merged Services and endpoints, and which endpoints serve
//!   cluster, local and external traffic.
//! * [`trace`]: the packet tracer's types, and the iptables-rule walker ([`trace::xtables`]);
//!   [`xtables`]: the iptables tools both the iptables mode and the ipvs mode program through.
//! * [`engine::Engine`] owns merged state and the full-resync flag, so a resync never sends
//!   the world across the language boundary again. Any failed apply makes the next sync full.
//!   It knows no mode: [`program::build`] picks the program.
//! * [`error::Error`] is the one error type; `py/` maps it onto `kproxy.errors`.
//! * [`config::EngineConfig`] and [`model::ChangeSet`] are the boundary's one schema: Python's
//!   types for them (`python/kproxy/wire.py`) are generated from them (`wire.rs`, a test).
//! * Only `py/` uses pyo3: `cargo test --no-default-features` builds without libpython.
//! * [`forward`]: the userspace forwarder's data path (listeners, relays, balancing), which the
//!   userspace mode and the nftables mode's localhost NodePorts run on.
//! * No mode folder imports another's.

pub mod cleanup;
pub mod config;
pub mod contain;
pub mod engine;
pub mod error;
pub mod exec;
pub mod forward;
pub mod iptables;
pub mod ipvs;
pub mod model;
pub mod naming;
pub mod netlink;
pub mod nfacct;
pub mod nftables;
pub mod program;
pub mod state;
pub mod topology;
pub mod trace;
pub mod userspace;
#[cfg(test)]
mod wire;
pub mod xtables;

#[cfg(feature = "python")]
mod py;
