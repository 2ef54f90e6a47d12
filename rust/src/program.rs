//! [`Program`]: what one mode does with an engine's merged state. The engine owns the state
//! and the full-resync flag and dispatches to exactly one program; everything a mode knows
//! (its settings, what it last wrote, its kernel handle, its pre-render) lives in its own
//! `<mode>/program.rs`.
//!
//! | mode      | program                                   |
//! |-----------|-------------------------------------------|
//! | iptables  | [`crate::iptables::program::IptablesProgram`] |
//! | nftables  | [`crate::nftables::program::NftablesProgram`] |
//! | ipvs      | [`crate::ipvs::program::IpvsProgram`]         |
//! | userspace | [`crate::userspace::program::UserspaceProgram`] |

use crate::config::{BackendKind, EngineConfig, Mode};
use crate::contain::Refused;
use crate::error::Result;
use crate::model::{ChangeSet, ServiceKey};
use crate::state::{AddressConflict, State};
use crate::trace::{NodeFacts, Packet, Trace};
use crate::{iptables, ipvs, nftables, userspace, xtables};
use std::any::Any;
use std::collections::BTreeSet;

/// One mode's way of programming the node from the engine's state.
pub trait Program: Send + Any {
    /// Called before a partial sync's change set is applied to `state` (the nftables mode
    /// remembers what the touched Services render to now, that is, what the kernel holds).
    fn prepare(&mut self, _state: &State, _changes: &ChangeSet) {}

    /// Bring the kernel in line with `state`: only `changed` Services, or everything when
    /// `full`. Fills the report's shared counters and its mode section. An error that
    /// [needs a full sync](crate::error::Error::needs_full_sync) makes the next one full.
    fn sync(
        &mut self,
        state: &State,
        changed: &BTreeSet<ServiceKey>,
        full: bool,
        report: &mut SyncReport,
    ) -> Result<()>;

    /// Whether what this mode programmed is still there (false: someone flushed it, the
    /// caller should run a full sync).
    fn intact(&mut self) -> Result<bool>;

    /// The complete input for `state` (rules, transaction or listener list); nothing is applied.
    fn render(&self, state: &State) -> String;

    /// What the kernel (or the Fake) holds now, in the mode's own listing format.
    fn dump(&mut self) -> Result<String>;

    /// Follow the first packet of a connection through what this mode programs for `state`.
    fn trace(&mut self, state: &State, packet: &Packet, node: &NodeFacts) -> Result<Trace>;

    /// For [`crate::engine::Engine::program`]: a mode's own calls (the nftables table, the
    /// ipvs addresses, the forwarder's counters) are reached by its concrete type.
    fn as_any(&self) -> &dyn Any;
}

/// The program `config` asks for: its mode on the real kernel or on an in-memory Fake.
pub fn build(config: &EngineConfig) -> Box<dyn Program> {
    let fake = config.backend == BackendKind::Fake;
    match config.mode {
        Mode::Iptables => Box::new(iptables::program::IptablesProgram::new(
            config,
            if fake {
                Box::new(xtables::Fake::new())
            } else {
                Box::new(xtables::Kernel::new(config.family))
            },
        )),
        Mode::Nftables => Box::new(nftables::program::NftablesProgram::new(
            config,
            if fake {
                Box::new(nftables::Fake::new(config.family))
            } else {
                Box::new(nftables::Kernel::new(config.family))
            },
        )),
        Mode::Ipvs => Box::new(ipvs::program::IpvsProgram::new(config)),
        Mode::Userspace => Box::new(userspace::program::UserspaceProgram::new(config)),
    }
}

/// What one sync did: the counters every mode reports, and the mode's own section.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SyncReport {
    /// Whether everything was rewritten (and the hooks re-ensured).
    pub full: bool,
    /// Whether anything was written to the kernel at all.
    pub wrote: bool,
    pub services_changed: usize,
    /// Service ports and endpoints programmed after this sync.
    pub service_ports: usize,
    pub endpoints: usize,
    /// Local-policy Service ports without a local endpoint (traffic dropped, as upstream).
    pub no_local_internal: usize,
    pub no_local_external: usize,
    /// Kernel transactions (restores, nft transactions, netlink sends) this sync made.
    pub transactions: usize,
    /// Bytes of tool input this sync sent.
    pub bytes: usize,
    /// externalIPs and LB IPs left out: another Service's cluster IP (every sync that writes).
    pub address_conflicts: Vec<AddressConflict>,
    /// Services the kernel refused, held at their last good rules (every sync reports all
    /// of them; each is tried again on its next change and on every full sync).
    pub refused: Vec<Refused>,
    /// Full syncs this sync ran to find the refused Services (0 when nothing was refused).
    pub probes: usize,
    pub render_seconds: f64,
    pub apply_seconds: f64,
    pub mode: ModeReport,
}

/// The part of a [`SyncReport`] only one mode has.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum ModeReport {
    /// Nothing was written (no change, or a sync that stopped before its mode ran).
    #[default]
    Nothing,
    Iptables(iptables::program::Report),
    Nftables(nftables::program::Report),
    Ipvs(ipvs::program::Report),
    Userspace(userspace::program::Report),
}
