//! How much heap the engine keeps per Service once a large cluster is programmed.
//!
//! The daemon's memory target (issue 4: ≤ 300 MiB with 30,000 Services × 4 endpoints) is
//! measured end to end by `benches/daemon_memory.py`; this test pins the Rust core's share
//! with a counting allocator, so a change that makes the engine's bookkeeping fatter fails
//! here, deterministically, instead of showing up as a benchmark figure weeks later.

use _core::config::EngineConfig;
use _core::engine::Engine;
use _core::error::Result;
use _core::model::{ChangeSet, IpFamily};
use _core::nftables::ast::{Key, Op};
use _core::nftables::program::NftablesProgram;
use _core::nftables::{Backend, Model};
use _core::state::State;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator, only counting sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout as asked.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// A kernel that accepts everything and remembers nothing: only the engine's own memory counts.
struct Null;

impl Backend for Null {
    fn apply(&mut self, _: &[Op]) -> Result<usize> {
        Ok(0)
    }
    fn affinity(&mut self) -> Result<Vec<(Key, u32)>> {
        Ok(Vec::new())
    }
    fn intact(&mut self) -> Result<bool> {
        Ok(true)
    }
    fn dump(&mut self) -> Result<String> {
        Ok(String::new())
    }
    fn model(&self) -> Option<&Model> {
        None
    }
}

/// `n` ClusterIP Services with one port and `eps` endpoints each, as the daemon hands them over.
fn cluster(n: usize, eps: usize) -> Vec<u8> {
    let mut services = Vec::new();
    let mut endpoints = Vec::new();
    for i in 0..n {
        services.push(format!(
            r#"{{"namespace":"ns{}","name":"service-{i}","service":{{"cluster_ips":["172.30.{}.{}"],"ports":[{{"name":"http","protocol":"TCP","port":80}}]}}}}"#,
            i % 50,
            i / 256,
            i % 256
        ));
        let e: Vec<String> = (0..eps)
            .map(|j| {
                let x = i * eps + j;
                format!(
                    r#"{{"ip":"10.{}.{}.{}","port":8080,"ready":true,"serving":true,"terminating":false,"node_name":"node-{}"}}"#,
                    x / 65536,
                    x / 256 % 256,
                    x % 256,
                    x % 100
                )
            })
            .collect();
        endpoints.push(format!(
            r#"{{"namespace":"ns{}","name":"service-{i}","ports":[{{"name":"http","protocol":"TCP","endpoints":[{}]}}]}}"#,
            i % 50,
            e.join(",")
        ));
    }
    format!(
        r#"{{"services":[{}],"endpoints":[{}]}}"#,
        services.join(","),
        endpoints.join(",")
    )
    .into_bytes()
}

fn retained_per_service(mode: &str, n: usize) -> usize {
    let config = EngineConfig::from_json(&format!(
        r#"{{"family":"IPv4","node_name":"node-a","cluster_cidrs":["10.0.0.0/8"],"mode":"{mode}","backend":"fake"}}"#
    ))
    .unwrap();
    let json = cluster(n, 4);
    let before = LIVE.load(Ordering::Relaxed);
    let changes = ChangeSet::from_json(&json).unwrap();
    let mut engine = match mode {
        "nftables" => {
            let program = NftablesProgram::new(&config, Box::new(Null));
            Engine::with_program(config, Box::new(program))
        }
        _ => Engine::new(config),
    };
    let report = engine.sync(changes, true).unwrap();
    eprintln!("{mode}: {} service ports", report.service_ports);
    let retained = (LIVE.load(Ordering::Relaxed) - before) as usize;
    drop(engine);
    retained / n
}

/// The merged Services and endpoints alone (what every mode must hold).
fn state_per_service(n: usize) -> usize {
    let json = cluster(n, 4);
    let before = LIVE.load(Ordering::Relaxed);
    let changes = ChangeSet::from_json(&json).unwrap();
    let mut state = State::new(IpFamily::V4);
    state.apply(changes);
    let retained = (LIVE.load(Ordering::Relaxed) - before) as usize;
    drop(state);
    retained / n
}

#[test]
fn the_nftables_engine_keeps_little_per_service() {
    let state = state_per_service(20_000);
    let per = retained_per_service("nftables", 20_000);
    eprintln!("nftables engine: {per} bytes retained per Service (4 endpoints), {state} of them the state");
    // What it holds: the Service and its endpoints (about 1.3 KB, `state` above) and the
    // claims on its ten set elements (about 150 bytes each, keys packed). 2.85 KB today; the
    // budget leaves room for a field or two, not for a return to unpacked keys (4.9 KB).
    assert!(per <= 3_200, "{per} bytes per Service");
}
