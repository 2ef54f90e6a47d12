//! iptables mode: render `iptables-restore` input and apply it.
//!
//! * [`mod@render`] turns one Service into its rules (upstream's per-service chains, plus entries
//!   for the shared chains), and builds the fixed chains.
//! * [`dispatch`] places shared-chain entries into bucket chains (bounded per-packet cost).
//! * [`writer`] decides what a sync writes: everything (full) or only what changed (partial).
//! * [`program`] runs a sync: the writer's plan, in batches, through a
//!   [`crate::xtables::Backend`] (the tools, or the Fake), then the jump rules.
//! * [`chains`] names the fixed chains and the jump rules that hook them into the built-ins.
//!
//! The tracer over this mode's rules is the shared [`crate::trace::xtables`].

pub mod chains;
pub mod dispatch;
pub mod program;
pub mod render;
pub mod writer;

pub use render::{render, Ruleset};
