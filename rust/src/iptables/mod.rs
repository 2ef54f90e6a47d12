//! iptables mode: render `iptables-restore` input and apply it.
//!
//! * [`render`] turns merged state into a [`render::Ruleset`] (pure, deterministic).
//! * [`backend`] applies it: [`backend::Kernel`] runs the iptables tools, [`backend::Fake`]
//!   keeps an in-memory kernel with the same all-or-nothing semantics for tests.
//! * [`chains`] names the fixed chains and the jump rules that hook them into the built-ins.

pub mod backend;
pub mod chains;
pub mod render;
pub mod writer;

pub use backend::{Backend, Fake, Kernel};
pub use render::{render, RenderConfig, Ruleset};
pub mod dispatch;
pub mod trace;
