//! userspace mode: the [`crate::forward`] data path serving Service ports from listeners.
//!
//! * [`routes`]: which listeners a state asks for (NodePorts on the listen addresses, and
//!   with portals a listener per Service address) and where each one's connections go.
//! * [`portals`]: the `kproxy-userspace` nftables table that redirects Service addresses to
//!   the portal listeners (needs NET_ADMIN).
//! * [`program`]: the engine's userspace side.

pub mod portals;
pub mod program;
pub mod routes;
