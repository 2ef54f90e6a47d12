//! Programs N virtual servers x M real servers into the kernel's IPVS table, then changes
//! one service, twice: batched (kproxy's client) and one request per object with a wait for
//! each answer (what upstream's ipvs proxier does). Prints one JSON line per way. Needs root
//! and ip_vs: benches/ipvs_program.py runs it in the VM.
//!
//! `ipvs_program SERVICES DESTS`
//!
//! `ipvs_program load batched|per_object < saved`: load a table `ipvsadm-save -n` printed
//! into this (empty) namespace's IPVS, and print the seconds it took as JSON: the benchmark
//! suite's floor for the ipvs mode (batched, as kproxy sends it) and upstream's way (one
//! request per object, as `ipvsadm-restore` and upstream's proxier send it). The namespace
//! needs its loopback up: without a local routing table the kernel takes every real server
//! for a broadcast address and refuses it (EINVAL).

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

/// `addr:port` or `[addr]:port`.
fn endpoint(s: &str) -> (IpAddr, u16) {
    let (addr, port) = s.rsplit_once(':').expect("addr:port");
    let addr = addr.trim_start_matches('[').trim_end_matches(']');
    (
        addr.parse().expect("an address"),
        port.parse().expect("a port"),
    )
}

/// The table `ipvsadm-save -n` printed: `-A -t|-u|--sctp-service VIP:PORT -s SCHED [-p N]`
/// and `-a -t|-u|--sctp-service VIP:PORT -r RIP:PORT -m -w W`.
fn parse_saved(text: &str) -> Table {
    let mut table = Table::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() < 3 {
            continue;
        }
        let protocol = match words[1] {
            "-t" => Protocol::Tcp,
            "-u" => Protocol::Udp,
            _ => Protocol::Sctp,
        };
        let (addr, port) = endpoint(words[2]);
        let key = VirtualKey {
            addr,
            protocol,
            port,
        };
        let after = |flag: &str| words.iter().position(|w| *w == flag).map(|i| words[i + 1]);
        match words[0] {
            "-A" => {
                let timeout: u32 = after("-p").map_or(0, |t| t.parse().expect("a timeout"));
                let service = Service {
                    scheduler: after("-s").unwrap_or("rr").to_owned(),
                    flags: if after("-p").is_some() {
                        _core::ipvs::F_PERSISTENT
                    } else {
                        0
                    },
                    timeout,
                };
                table.insert(
                    key,
                    Virtual {
                        service,
                        dests: Default::default(),
                    },
                );
            }
            "-a" => {
                let (addr, port) = endpoint(after("-r").expect("-r"));
                let weight = after("-w").map_or(1, |w| w.parse().expect("a weight"));
                let v = table.get_mut(&key).expect("-a after its -A");
                v.dests
                    .insert(DestKey { addr, port }, Dest::weighted(weight));
            }
            _ => {}
        }
    }
    table
}

fn load(way: &str) {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).expect("stdin");
    let want = parse_saved(&text);
    let mut c = Client::open().expect("ip_vs");
    c.per_send = if way == "per_object" { 1 } else { usize::MAX };
    let ops = plan(&want, &Table::new());
    let t0 = Instant::now();
    let out = c.apply(&ops).expect("apply");
    assert!(
        out.refused.is_empty(),
        "{:?}",
        &out.refused[..out.refused.len().min(5)]
    );
    println!(
        "{{\"way\": \"{way}\", \"operations\": {}, \"seconds\": {:.4}}}",
        ops.len(),
        t0.elapsed().as_secs_f64()
    );
}

fn main() {
    let mut argv = std::env::args().skip(1);
    if argv.next().as_deref() == Some("load") {
        return load(&argv.next().expect("batched or per_object"));
    }
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
