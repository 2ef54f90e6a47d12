//! iptables mode: render `iptables-restore` input and apply it.
//!
//! * [`mod@render`] turns one Service into its rules (upstream's per-service chains, plus entries
//!   for the shared chains), and builds the fixed chains.
//! * [`dispatch`] places shared-chain entries into bucket chains (bounded per-packet cost).
//! * [`writer`] decides what a sync writes: everything (full) or only what changed (partial).
//! * [`backend`] applies it: [`backend::Kernel`] runs the iptables tools, [`backend::Fake`]
//!   keeps an in-memory kernel with the same all-or-nothing semantics for tests.
//! * [`trace`] follows a packet through iptables-save output (tests, `kproxy trace`).
//! * [`chains`] names the fixed chains and the jump rules that hook them into the built-ins.

pub mod backend;
pub mod chains;
pub mod dispatch;
pub mod program;
pub mod render;
pub mod trace;
pub mod writer;

pub use backend::{Backend, Fake, Kernel};
pub use render::{render, Ruleset};
