//! The iptables tools, as both the iptables mode and the ipvs mode's companion rules use them.
//!
//! * [`backend`]: [`Backend`] applies `iptables-restore --noflush` input; [`Kernel`] runs the
//!   tools, [`Fake`] keeps an in-memory kernel with the same all-or-nothing semantics.
//! * [`jumps`]: the rules in the built-in chains that lead into chains of ours.
//!
//! The parser and walker of `iptables-save` text is [`crate::trace::xtables`].

pub mod backend;
pub mod jumps;

pub use backend::{Backend, Fake, Kernel};

// Chains both the iptables mode and the ipvs mode have, under upstream's names.

/// Where Service addresses are matched (nat; the iptables mode also has one in filter).
pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
/// Masquerades what `KUBE-MARK-MASQ` marked.
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
/// Sets the masquerade mark (the tracer follows it to learn the mark).
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
/// Accepts forwarded traffic kproxy marked or has conntrack state for.
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
