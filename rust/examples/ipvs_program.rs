//! Programs N virtual servers x M real servers into the kernel's IPVS table, then changes
//! one service, twice: batched (kproxy's client) and one request per object with a wait for
//! each answer (what upstream's ipvs proxier does). Prints one JSON line per way. Needs root
//! and ip_vs: benches/ipvs_program.py runs it in the VM.
//!
//! `ipvs_program SERVICES DESTS`

use _core::ipvs::kernel::Client;
use _core::ipvs::plan::plan;
use _core::ipvs::{Backend, Dest, DestKey, Service, Table, Virtual, VirtualKey};
use _core::model::Protocol;
use std::net::IpAddr;
use std::time::Instant;

fn table(services: u32, dests: u32, changed: Option<u32>) -> Table {
    (0..services)
        .map(|i| {
            let key = VirtualKey {
                addr: IpAddr::from([10, 96, (i / 256) as u8, (i % 256) as u8]),
                protocol: Protocol::Tcp,
                port: 80,
            };
            let shift = if changed == Some(i) { 100 } else { 0 };
            let dests = (0..dests)
                .map(|j| {
                    let n = i * dests + j + shift;
                    let d = DestKey {
                        addr: IpAddr::from([10, 200 + (n >> 16) as u8, (n >> 8) as u8, n as u8]),
                        port: 8080,
                    };
                    (d, Dest::weighted(1))
                })
                .collect();
            let service = Service {
                scheduler: "rr".into(),
                flags: 0,
                timeout: 0,
            };
            (key, Virtual { service, dests })
        })
        .collect()
}

fn main() {
    let args: Vec<u32> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("a number"))
        .collect();
    let (services, dests) = (args[0], args[1]);
    let want = table(services, dests, None);
    let changed = table(services, dests, Some(services / 2));
    for (way, per_send) in [("batched", usize::MAX), ("per_object", 1)] {
        let mut c = Client::open().expect("ip_vs");
        c.per_send = per_send;
        let have = c.dump(false).expect("dump");
        let clear = plan(&Table::new(), &have);
        c.apply(&clear).expect("clear");

        let ops = plan(&want, &Table::new());
        let (s0, t0) = (c.syscalls, Instant::now());
        let out = c.apply(&ops).expect("apply");
        let full_s = t0.elapsed().as_secs_f64();
        let full_calls = c.syscalls - s0;
        assert!(
            out.refused.is_empty(),
            "{:?}",
            &out.refused[..out.refused.len().min(5)]
        );

        let ops1 = plan(&changed, &want);
        let (s1, t1) = (c.syscalls, Instant::now());
        let out1 = c.apply(&ops1).expect("apply");
        let one_s = t1.elapsed().as_secs_f64();
        assert!(out1.refused.is_empty());
        let keys: std::collections::BTreeSet<_> = ops1.iter().map(|o| o.key()).collect();
        println!(
            "{{\"way\": \"{way}\", \"services\": {services}, \"dests\": {dests}, \
             \"operations\": {}, \"full_seconds\": {full_s:.4}, \"full_syscalls\": {full_calls}, \
             \"sends\": {}, \"change_operations\": {}, \"change_services\": {}, \
             \"change_seconds\": {one_s:.6}, \"change_syscalls\": {}}}",
            ops.len(),
            out.messages_per_send.len(),
            ops1.len(),
            keys.len(),
            c.syscalls - s1
        );
        let have = c.dump(false).expect("dump");
        assert_eq!(
            have, changed,
            "{way}: the kernel's table differs from the plan"
        );
    }
}
