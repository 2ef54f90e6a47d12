//! The Python binding: the only module that uses pyo3.
//!
//! Each heavy call releases the interpreter (`py.detach`) so Python's watchers, health and
//! metrics keep running while a sync renders and applies.

mod errors;

use crate::config::{EngineConfig, Mode};
use crate::engine;
use crate::iptables::program::IptablesProgram;
use crate::ipvs::program::IpvsProgram;
use crate::model::{ChangeSet, IpFamily};
use crate::nftables::program::NftablesProgram;
use crate::program::{ModeReport, SyncReport as CoreReport};
use crate::trace::{self, xtables};
use crate::userspace::program::UserspaceProgram;
use errors::{in_family, to_py};
use pyo3::prelude::*;
use std::sync::{Mutex, MutexGuard};

/// The core's own allocations (the engine's state and bookkeeping, and each sync's transient
/// transaction) go to mimalloc rather than the interpreter's malloc arenas: its size-segregated
/// pages keep a sync's short-lived buffers from pinning pages between the long-lived maps, and
/// it hands freed pages back, so the daemon's resident memory follows what it really holds.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(feature = "mimalloc")]
extern "C" {
    /// mimalloc's collection of freed pages (linked in with the allocator).
    fn mi_collect(force: bool);
}

fn release_freed_memory() {
    // SAFETY: mi_collect takes no pointers and may be called from any thread at any time.
    #[cfg(feature = "mimalloc")]
    unsafe {
        mi_collect(true)
    }
}

/// What one `Engine.sync` did.
#[pyclass(frozen, module = "kproxy._core", name = "SyncReport")]
pub struct SyncReport(CoreReport);

#[pymethods]
impl SyncReport {
    #[getter]
    fn full(&self) -> bool {
        self.0.full
    }
    #[getter]
    fn wrote(&self) -> bool {
        self.0.wrote
    }
    #[getter]
    fn services_changed(&self) -> usize {
        self.0.services_changed
    }
    #[getter]
    fn service_ports(&self) -> usize {
        self.0.service_ports
    }
    #[getter]
    fn endpoints(&self) -> usize {
        self.0.endpoints
    }
    #[getter]
    fn transactions(&self) -> usize {
        self.0.transactions
    }
    #[getter]
    fn bytes(&self) -> usize {
        self.0.bytes
    }
    #[getter]
    fn no_local_internal(&self) -> usize {
        self.0.no_local_internal
    }
    #[getter]
    fn no_local_external(&self) -> usize {
        self.0.no_local_external
    }
    /// What only this engine's mode reports: an `IptablesReport`, `NftablesReport`,
    /// `IpvsReport` or `UserspaceReport`; None when the sync wrote nothing.
    #[getter]
    fn mode(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        Ok(Some(match &self.0.mode {
            ModeReport::Nothing => return Ok(None),
            ModeReport::Iptables(r) => Py::new(py, r.clone())?.into_any(),
            ModeReport::Nftables(r) => Py::new(py, r.clone())?.into_any(),
            ModeReport::Ipvs(r) => Py::new(py, r.clone())?.into_any(),
            ModeReport::Userspace(r) => Py::new(py, r.clone())?.into_any(),
        }))
    }
    /// (namespace, name, address, owner "namespace/name") of every externalIP or LB IP left
    /// out because it is another Service's cluster IP.
    #[getter]
    fn address_conflicts(&self) -> Vec<(String, String, String, String)> {
        self.0
            .address_conflicts
            .iter()
            .map(|c| {
                (
                    c.service.namespace.to_string(),
                    c.service.name.to_string(),
                    c.ip.to_string(),
                    format!("{}/{}", c.owner.namespace, c.owner.name),
                )
            })
            .collect()
    }
    /// (namespace, name, the kernel's message) of every Service the kernel refused: each
    /// keeps its last good rules (none if it is new) and is tried again on its next change
    /// and on every full sync. Every sync reports all of them.
    #[getter]
    fn refused(&self) -> Vec<(String, String, String)> {
        self.0
            .refused
            .iter()
            .map(|r| {
                (
                    r.service.namespace.to_string(),
                    r.service.name.to_string(),
                    r.reason.clone(),
                )
            })
            .collect()
    }
    /// Full syncs this sync ran to find the refused Services (0 when none was refused).
    #[getter]
    fn probes(&self) -> usize {
        self.0.probes
    }
    #[getter]
    fn render_seconds(&self) -> f64 {
        self.0.render_seconds
    }
    #[getter]
    fn apply_seconds(&self) -> f64 {
        self.0.apply_seconds
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.0)
    }
}

/// One IP family's proxy engine (see the crate docs). Thread-safe: calls are serialized.
#[pyclass(frozen, module = "kproxy._core", name = "Engine")]
pub struct Engine {
    inner: Mutex<engine::Engine>,
    family: IpFamily,
    mode: Mode,
}

impl Engine {
    /// The engine, once no sync holds it. Every caller takes it inside `py.detach`: a sync
    /// holds the lock for as long as the kernel takes, and waiting with the GIL held would
    /// stop every Python thread (the daemon's event loop, a scrape) meanwhile.
    fn lock(&self) -> MutexGuard<'_, engine::Engine> {
        // A panic while holding the lock cannot leave the engine half-updated in a way that
        // matters: the next sync is full anyway after an error. Recover the guard.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[pymethods]
impl Engine {
    #[new]
    fn new(config_json: &str) -> PyResult<Engine> {
        let cfg = EngineConfig::from_json(config_json).map_err(to_py)?;
        let engine = engine::Engine::new(cfg);
        Ok(Engine {
            family: engine.config().family,
            mode: engine.mode(),
            inner: Mutex::new(engine),
        })
    }

    /// "IPv4" or "IPv6".
    #[getter]
    fn family(&self) -> &'static str {
        family_name(self.family)
    }

    #[getter]
    fn needs_full_sync(&self, py: Python<'_>) -> bool {
        py.detach(|| self.lock().needs_full_sync())
    }

    /// Apply a JSON change set and program the kernel. Raises `kproxy.errors.ApplyError` when
    /// the kernel refused (previous rules stay), `CoreInputError` for a malformed change set.
    /// `retry_refused` tries the Services the kernel refused before again (a full sync
    /// always does).
    #[pyo3(signature = (changes, full = false, retry_refused = false))]
    fn sync(
        &self,
        py: Python<'_>,
        changes: &[u8],
        full: bool,
        retry_refused: bool,
    ) -> PyResult<SyncReport> {
        let result = py.detach(|| {
            let cs = ChangeSet::from_json(changes)?;
            let mut engine = self.lock();
            if retry_refused {
                engine.retry_refused();
            }
            let report = engine.sync(cs, full);
            // A large sync allocated and freed its whole transaction: hand those pages back
            // now rather than keep them until this thread allocates again.
            match &report {
                Ok(r) if !r.full && r.services_changed < 100 => {}
                _ => release_freed_memory(),
            }
            report
        });
        result.map(SyncReport).map_err(in_family(self.family))
    }

    /// The userspace forwarder's counters by name: the userspace mode's, or the nftables
    /// mode's localhost NodePorts' (empty otherwise).
    fn forward_stats(&self, py: Python<'_>) -> std::collections::BTreeMap<&'static str, u64> {
        py.detach(|| {
            let engine = self.lock();
            let stats = match engine.program::<UserspaceProgram>() {
                Some(p) => p.stats(),
                None => engine
                    .program::<NftablesProgram>()
                    .map(NftablesProgram::localhost_stats)
                    .unwrap_or_default(),
            };
            stats.into_iter().collect()
        })
    }

    /// ipvs mode: (one line per virtual server and set member, the companion rules and their
    /// jumps as iptables-restore input for an empty namespace, the sets as ipset restore
    /// input) for the current state.
    fn ipvs_parts(&self, py: Python<'_>) -> (Vec<String>, String, String) {
        py.detach(|| {
            let engine = self.lock();
            let program = engine.program::<IpvsProgram>();
            program.map(|p| p.parts(engine.state())).unwrap_or_default()
        })
    }

    /// iptables mode: each nfacct counter the rules count into, with its packets so far
    /// (`None`: the counter went away); empty before the first sync and in other modes.
    fn nfacct_counters(&self, py: Python<'_>) -> PyResult<Vec<(&'static str, Option<u64>)>> {
        py.detach(|| {
            let engine = self.lock();
            match engine.program::<IptablesProgram>() {
                Some(p) => p.counters(),
                None => Ok(Vec::new()),
            }
        })
        .map_err(in_family(self.family))
    }

    /// ipvs mode: the addresses kube-ipvs0 should hold after the last sync (empty otherwise).
    fn ipvs_addresses(&self, py: Python<'_>) -> Vec<String> {
        py.detach(|| {
            let engine = self.lock();
            engine
                .program::<IpvsProgram>()
                .map(|p| p.bind())
                .unwrap_or_default()
                .iter()
                .map(ToString::to_string)
                .collect()
        })
    }

    /// Whether our canary chains are all present (False: someone flushed our tables, so the
    /// next sync should be full).
    fn canary_intact(&self, py: Python<'_>) -> PyResult<bool> {
        py.detach(|| self.lock().canary_intact())
            .map_err(in_family(self.family))
    }

    /// "iptables", "nftables", "userspace" or "ipvs".
    #[getter]
    fn mode(&self) -> &'static str {
        match self.mode {
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
            Mode::Userspace => "userspace",
            Mode::Ipvs => "ipvs",
        }
    }

    /// The complete input for the current state (iptables-restore text, or the nft
    /// transaction of a full sync); nothing is applied.
    fn render(&self, py: Python<'_>) -> String {
        py.detach(|| self.lock().render())
    }

    /// What the engine's backend holds now (iptables-save format, or nft's listing).
    fn dump(&self, py: Python<'_>) -> PyResult<String> {
        py.detach(|| self.lock().dump())
            .map_err(in_family(self.family))
    }

    /// The nftables table this engine programs (None in the iptables mode).
    fn nft_table(&self, py: Python<'_>) -> PyResult<Option<NftTable>> {
        let family = self.family;
        py.detach(|| {
            let engine = self.lock();
            let program = engine.program::<NftablesProgram>();
            program.map(|p| p.model(engine.state())).transpose()
        })
        .map(|m| m.map(|model| NftTable { model, family }))
        .map_err(in_family(family))
    }

    /// Trace the first packet of a connection through the rules this engine programs.
    fn trace(&self, py: Python<'_>, packet: &Packet) -> PyResult<Trace> {
        py.detach(|| self.lock().trace(&packet.packet, &packet.node))
            .map(Trace)
            .map_err(in_family(self.family))
    }
}

/// An nftables table (kproxy's, in one family): what an engine programs, or what the kernel
/// holds (`NftTable.live`). Compare two with `lines()`; follow a packet with `trace()`.
#[pyclass(frozen, module = "kproxy._core", name = "NftTable")]
pub struct NftTable {
    model: crate::nftables::Model,
    family: IpFamily,
}

#[pymethods]
impl NftTable {
    /// Read kproxy's table from the kernel (empty when there is none). Needs root.
    #[staticmethod]
    fn live(py: Python<'_>, family: &str) -> PyResult<NftTable> {
        let family = family_of(family).map_err(to_py)?;
        let model = py
            .detach(|| crate::nftables::backend::read_kernel(family))
            .map_err(to_py)?;
        Ok(NftTable { model, family })
    }

    #[getter]
    fn exists(&self) -> bool {
        self.model.exists
    }

    /// One line per chain, rule, set and element (affinity entries left out).
    fn lines(&self) -> Vec<String> {
        self.model.lines(self.family)
    }

    /// Trace the first packet of a connection through this table.
    fn trace(&self, py: Python<'_>, packet: &Packet) -> Trace {
        Trace(py.detach(|| {
            crate::nftables::trace::trace(&self.model, self.family, &packet.packet, &packet.node)
        }))
    }
}

/// A bare kproxy table fed raw transactions (JSON, see `nftables::replay`): the in-memory
/// Fake, or the kernel of the calling thread's network namespace. The differential test runs
/// the same transactions through both.
#[pyclass(frozen, module = "kproxy._core", name = "NftScratch")]
pub struct NftScratch {
    backend: Mutex<Box<dyn crate::nftables::Backend>>,
    family: IpFamily,
}

#[pymethods]
impl NftScratch {
    #[new]
    #[pyo3(signature = (family, kernel = false))]
    fn new(family: &str, kernel: bool) -> PyResult<NftScratch> {
        let family = family_of(family).map_err(to_py)?;
        let backend: Box<dyn crate::nftables::Backend> = if kernel {
            Box::new(crate::nftables::Kernel::new(family))
        } else {
            Box::new(crate::nftables::Fake::new(family))
        };
        Ok(NftScratch {
            backend: Mutex::new(backend),
            family,
        })
    }

    /// Apply one transaction atomically; raises `ApplyError` when it is refused.
    fn apply(&self, py: Python<'_>, ops_json: &str) -> PyResult<()> {
        py.detach(|| {
            let mut b = self.backend.lock().unwrap_or_else(|e| e.into_inner());
            crate::nftables::replay::apply(b.as_mut(), ops_json)
        })
        .map_err(to_py)
    }

    /// What the table holds, as `NftTable.lines()` (the kernel's table read back).
    fn lines(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        py.detach(|| {
            let b = self.backend.lock().unwrap_or_else(|e| e.into_inner());
            match b.model() {
                Some(m) => Ok(m.lines(self.family)),
                None => {
                    crate::nftables::backend::read_kernel(self.family).map(|m| m.lines(self.family))
                }
            }
        })
        .map_err(to_py)
    }
}

/// Where the first packet of a connection goes through a set of iptables rules.
#[pyclass(frozen, module = "kproxy._core", name = "Trace")]
pub struct Trace(trace::Trace);

#[pymethods]
impl Trace {
    /// Every DNAT target some path reaches (`ip:port`), in rule order.
    #[getter]
    fn dnat(&self) -> Vec<String> {
        self.0.dnat.clone()
    }
    /// "ACCEPT", "DROP", "REJECT", or None when no filter rule decided.
    #[getter]
    fn verdict(&self) -> Option<&'static str> {
        self.0.verdict.map(|v| match v {
            trace::Verdict::Accept => "ACCEPT",
            trace::Verdict::Drop => "DROP",
            trace::Verdict::Reject => "REJECT",
        })
    }
    /// Why the packet was dropped or rejected, when the tracer knows: "no-endpoints",
    /// "no-local-endpoints", "source-range", "no-service-port" or
    /// "unallocated-cluster-ip".
    #[getter]
    fn reason(&self) -> Option<&'static str> {
        self.0.reason.map(trace::Reason::as_str)
    }
    #[getter]
    fn masquerade(&self) -> bool {
        self.0.masquerade
    }
    /// The rules that matched, as `table/CHAIN: rule`, in walk order.
    #[getter]
    fn matched(&self) -> Vec<String> {
        self.0.matched.clone()
    }
    fn __repr__(&self) -> String {
        format!(
            "Trace(dnat={:?}, verdict={:?}, masquerade={})",
            self.0.dnat,
            self.verdict(),
            self.0.masquerade
        )
    }
}

fn parse_ip(what: &str, s: &str) -> Result<std::net::IpAddr, crate::error::Error> {
    s.parse().map_err(|_| {
        crate::error::Error::InvalidInput(format!("{what}: {s:?} is not an IP address"))
    })
}

/// The first packet of a connection and the node it meets: what every tracer takes. Checked
/// once, here, so each tracer takes one argument and none repeats the validation.
#[pyclass(frozen, module = "kproxy._core", name = "Packet")]
pub struct Packet {
    packet: trace::Packet,
    node: trace::NodeFacts,
}

#[pymethods]
impl Packet {
    /// `origin` is "external" (arrives from the network or a pod) or "local" (sent by the
    /// node itself); `local_ips` are the node's addresses.
    #[new]
    #[pyo3(signature = (src, dst, protocol, port, origin = "external", local_ips = Vec::new()))]
    fn new(
        src: &str,
        dst: &str,
        protocol: &str,
        port: u16,
        origin: &str,
        local_ips: Vec<String>,
    ) -> PyResult<Packet> {
        Packet::parse(src, dst, protocol, port, origin, &local_ips).map_err(to_py)
    }

    #[getter]
    fn src(&self) -> String {
        self.packet.src.to_string()
    }
    #[getter]
    fn dst(&self) -> String {
        self.packet.dst.to_string()
    }
    /// "TCP", "UDP" or "SCTP".
    #[getter]
    fn protocol(&self) -> &'static str {
        self.packet.protocol.upper()
    }
    #[getter]
    fn port(&self) -> u16 {
        self.packet.dport
    }
    #[getter]
    fn origin(&self) -> &'static str {
        match self.packet.origin {
            trace::Origin::External => "external",
            trace::Origin::Local => "local",
        }
    }
    #[getter]
    fn local_ips(&self) -> Vec<String> {
        self.node
            .local_ips
            .iter()
            .map(ToString::to_string)
            .collect()
    }
    fn __repr__(&self) -> String {
        format!(
            "Packet({:?}, {:?}, {:?}, {}, origin={:?}, local_ips={:?})",
            self.src(),
            self.dst(),
            self.protocol(),
            self.port(),
            self.origin(),
            self.local_ips()
        )
    }
}

impl Packet {
    fn parse(
        src: &str,
        dst: &str,
        protocol: &str,
        port: u16,
        origin: &str,
        local_ips: &[String],
    ) -> Result<Packet, crate::error::Error> {
        use crate::error::Error;
        use crate::model::Protocol;
        let protocol = match protocol.to_ascii_uppercase().as_str() {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => Protocol::Sctp,
            other => {
                return Err(Error::InvalidInput(format!(
                    "protocol {other:?} is not TCP, UDP or SCTP"
                )))
            }
        };
        let origin = match origin {
            "external" => trace::Origin::External,
            "local" => trace::Origin::Local,
            other => {
                return Err(Error::InvalidInput(format!(
                    "origin {other:?} is not external or local"
                )))
            }
        };
        let (src, dst) = (parse_ip("src", src)?, parse_ip("dst", dst)?);
        if IpFamily::of(&src) != IpFamily::of(&dst) {
            return Err(Error::InvalidInput(format!(
                "src {src} and dst {dst} are of different IP families"
            )));
        }
        let local_ips = local_ips
            .iter()
            .map(|s| parse_ip("local_ips", s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Packet {
            packet: trace::Packet {
                src,
                dst,
                protocol,
                dport: port,
                origin,
            },
            node: trace::NodeFacts {
                local_ips,
                ..trace::NodeFacts::default()
            },
        })
    }
}

/// Trace the first packet of a connection through iptables rules (`iptables-save` output or
/// kproxy's restore text).
#[pyfunction]
fn trace_iptables(py: Python<'_>, rules: &str, packet: &Packet) -> PyResult<Trace> {
    let result = py.detach(|| {
        xtables::Ruleset::parse(rules)
            .map(|rs| xtables::trace(&rs, &packet.packet, &packet.node, &[]))
    });
    result.map(Trace).map_err(to_py)
}

/// Trace the first packet of a connection through the ipvs mode as this node's kernel has
/// it: the iptables rules, kproxy's ipsets and the IPVS table (root; needs ip_vs).
#[pyfunction]
fn trace_ipvs_live(py: Python<'_>, packet: &Packet) -> PyResult<Trace> {
    let family = IpFamily::of(&packet.packet.dst);
    let result = py.detach(|| {
        crate::ipvs::trace::read_live(family).map(|live| {
            let node = trace::NodeFacts {
                sets: live.sets,
                ..packet.node.clone()
            };
            crate::ipvs::trace::trace(&live.rules, &live.table, &packet.packet, &node)
        })
    });
    result.map(Trace).map_err(to_py)
}

/// The ipvs mode's virtual servers and kproxy's set members in this node's kernel, one line
/// each, as `Engine.ipvs_parts` lists what kproxy wants (root; needs ip_vs).
#[pyfunction]
fn ipvs_live_lines(py: Python<'_>, family: &str) -> PyResult<Vec<String>> {
    let fam = family_of(family).map_err(to_py)?;
    py.detach(|| {
        crate::ipvs::trace::read_live(fam)
            .map(|live| crate::ipvs::trace::lines(&live.table, &live.sets))
    })
    .map_err(to_py)
}

/// Remove every iptables chain and jump rule kproxy creates in one family. Returns the number
/// of chains removed.
#[pyfunction]
fn cleanup_iptables(py: Python<'_>, family: &str) -> PyResult<usize> {
    let fam = family_of(family).map_err(to_py)?;
    py.detach(|| crate::cleanup::iptables_tables(&mut crate::xtables::Kernel::new(fam)))
        .map_err(to_py)
}

/// Remove kproxy's own iptables chains (its dispatch buckets) in one family once kube-proxy
/// has taken the node over. Returns (chains removed, None), or (0, why nothing was removed).
#[pyfunction]
fn hand_back_iptables(py: Python<'_>, family: &str) -> PyResult<(usize, Option<String>)> {
    use crate::cleanup::HandBack;
    let fam = family_of(family).map_err(to_py)?;
    let done = py
        .detach(|| crate::cleanup::hand_back_iptables(&mut crate::xtables::Kernel::new(fam)))
        .map_err(to_py)?;
    Ok(match done {
        HandBack::Removed(n) => (n, None),
        HandBack::Blocked(why) => (0, Some(why)),
    })
}

/// The names of every ipset the ipvs mode creates (upstream's names, both families): the
/// only sets a cleanup may destroy (kube-router's `KUBE-SRC-*`/`KUBE-DST-*` share the prefix).
#[pyfunction]
fn ipvs_set_names() -> Vec<String> {
    use crate::ipvs::ipset::Set;
    [IpFamily::V4, IpFamily::V6]
        .into_iter()
        .flat_map(|fam| Set::ALL.iter().map(move |s| s.name(fam)))
        .collect()
}

/// Remove kproxy's nftables table in one family (nothing happens when there is none).
#[pyfunction]
fn cleanup_nftables(py: Python<'_>, family: &str) -> PyResult<()> {
    let fam = family_of(family).map_err(to_py)?;
    py.detach(|| crate::nftables::program::cleanup(&mut crate::nftables::Kernel::new(fam)))
        .map_err(to_py)
}

fn family_of(family: &str) -> Result<IpFamily, crate::error::Error> {
    match family {
        "IPv4" => Ok(IpFamily::V4),
        "IPv6" => Ok(IpFamily::V6),
        other => Err(crate::error::Error::InvalidInput(format!(
            "family {other:?} is not IPv4 or IPv6"
        ))),
    }
}

/// The core's version (the crate version).
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// "IPv4" or "IPv6", as the Python side names families.
pub(crate) fn family_name(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "IPv4",
        IpFamily::V6 => "IPv6",
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    m.add_class::<Engine>()?;
    m.add_class::<SyncReport>()?;
    m.add_class::<crate::iptables::program::Report>()?;
    m.add_class::<crate::nftables::program::Report>()?;
    m.add_class::<crate::ipvs::program::Report>()?;
    m.add_class::<crate::userspace::program::Report>()?;
    m.add_class::<Trace>()?;
    m.add_class::<Packet>()?;
    m.add_class::<NftTable>()?;
    m.add_class::<NftScratch>()?;
    m.add_function(wrap_pyfunction!(trace_iptables, m)?)?;
    m.add_function(wrap_pyfunction!(trace_ipvs_live, m)?)?;
    m.add_function(wrap_pyfunction!(ipvs_live_lines, m)?)?;
    m.add_function(wrap_pyfunction!(cleanup_iptables, m)?)?;
    m.add_function(wrap_pyfunction!(hand_back_iptables, m)?)?;
    m.add_function(wrap_pyfunction!(ipvs_set_names, m)?)?;
    m.add_function(wrap_pyfunction!(cleanup_nftables, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    Ok(())
}
