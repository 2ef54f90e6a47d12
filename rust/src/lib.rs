//! kproxy's core: the hot paths of a Kubernetes Service proxy.
//!
//! Python watches the API, normalizes objects and tracks changes; once per sync it hands this
//! crate one [`model::ChangeSet`] (JSON, parsed here with the interpreter released). From there:
//!
//! ```text
//! ChangeSet --state::State::apply--> merged services and endpoints (per engine, one IP family)
//!           --topology::categorize--> which endpoints serve cluster, local and external traffic
//!           --iptables::render--------> each changed Service's rules (deterministic order)
//!           --iptables::dispatch------> shared-chain entries placed in bounded bucket chains
//!           --iptables::writer--------> only what changed (partial) or everything (full)
//!           --iptables::Backend-------> the kernel (iptables-restore --noflush) or a Fake
//! ```
//!
//! * [`model`] holds normalized, validated values; nothing user-controlled reaches rule text
//!   without having passed validation there (names) or being hashed (chain names).
//! * [`engine::Engine`] owns merged state and what was last applied, so a resync never sends the
//!   world across the language boundary again. Any failed apply makes the next sync full.
//! * [`error::Error`] is the one error type; `py/` maps it onto `kproxy.errors`.
//! * Only `py/` uses pyo3: `cargo test --no-default-features` builds without libpython.

pub mod cleanup;
pub mod config;
pub mod engine;
pub mod error;
pub mod exec;
pub mod forward;
pub mod iptables;
pub mod ipvs;
pub mod model;
pub mod naming;
pub mod netlink;
pub mod nftables;
pub mod program;
pub mod state;
pub mod topology;

#[cfg(feature = "python")]
mod py;
