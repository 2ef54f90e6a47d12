//! The IPVS client against a real kernel. ip_vs is not in this project's host kernel: the
//! tests marked `ignore` run inside a VM (tests/vm/, `--ignored`), as root in the VM's own
//! network namespace. The one that is not checks the error a kernel without ip_vs gives.

use _core::ipvs::kernel::Client;
use _core::ipvs::plan::plan;
use _core::ipvs::{Backend, Dest, DestKey, Op, Service, Table, Virtual, VirtualKey};
use _core::model::Protocol;
use std::net::IpAddr;

fn key(i: u32, protocol: Protocol) -> VirtualKey {
    VirtualKey {
        addr: IpAddr::from([10, 96, (i / 256) as u8, (i % 256) as u8]),
        protocol,
        port: 80,
    }
}

fn dest(i: u32, j: u32) -> DestKey {
    let n = i * 16 + j;
    DestKey {
        addr: IpAddr::from([10, 244, (n / 256) as u8, (n % 256) as u8]),
        port: 8080,
    }
}

fn table(services: u32, dests: u32, sched: &str) -> Table {
    (0..services)
        .map(|i| {
            let p = if i % 2 == 0 {
                Protocol::Tcp
            } else {
                Protocol::Udp
            };
            let v = Virtual {
                service: Service {
                    scheduler: sched.into(),
                    flags: if i % 3 == 0 { 1 } else { 0 },
                    timeout: if i % 3 == 0 { 10800 } else { 0 },
                },
                dests: (0..dests)
                    .map(|j| (dest(i, j), Dest::weighted(1)))
                    .collect(),
            };
            (key(i, p), v)
        })
        .collect()
}

/// Clear what a previous test left (the VM's table is ours alone).
fn reset(c: &mut Client) {
    let have = c.dump(false).unwrap();
    let out = c.apply(&plan(&Table::new(), &have)).unwrap();
    assert!(out.refused.is_empty(), "{:?}", out.refused);
}

#[test]
fn without_ip_vs_opening_names_the_missing_module() {
    if std::path::Path::new("/proc/net/ip_vs").exists() || unsafe { libc::geteuid() } != 0 {
        eprintln!("not applicable: this kernel has ip_vs loaded, or not root");
        return;
    }
    match Client::open() {
        // Loaded on demand after all (a kernel with the module): nothing to check here.
        Ok(_) => eprintln!("not applicable: ip_vs was loaded on demand"),
        Err(e) => assert!(e.to_string().contains("modprobe ip_vs"), "{e}"),
    }
}

#[test]
#[ignore = "needs ip_vs: run in the VM (tests/vm)"]
fn a_table_is_programmed_in_few_sends_and_reads_back_exactly() {
    let mut c = Client::open().unwrap();
    reset(&mut c);
    let want = table(300, 5, "rr");
    let ops = plan(&want, &Table::new());
    assert_eq!(ops.len(), 300 * 6);
    let before = c.syscalls;
    let out = c.apply(&ops).unwrap();
    assert!(out.refused.is_empty(), "{:?}", out.refused);
    // 1,800 messages of 100-150 bytes: a handful of sends, each answered once.
    assert!(
        out.messages_per_send.len() <= 4,
        "{:?}",
        out.messages_per_send
    );
    assert!(c.syscalls - before <= 8, "{}", c.syscalls - before);
    let have = c.dump(false).unwrap();
    assert_eq!(have, want);
    assert!(plan(&want, &have).is_empty());
}

#[test]
#[ignore = "needs ip_vs: run in the VM (tests/vm)"]
fn a_one_service_change_sends_only_that_service() {
    let mut c = Client::open().unwrap();
    reset(&mut c);
    let mut want = table(100, 4, "rr");
    c.apply(&plan(&want, &Table::new())).unwrap();
    let changed = key(10, Protocol::Tcp);
    let v = want.get_mut(&changed).unwrap();
    v.dests.remove(&dest(10, 0));
    v.dests.insert(dest(10, 9), Dest::weighted(1));
    v.service.scheduler = "wrr".into();
    let have = c.dump(false).unwrap();
    let ops = plan(&want, &have);
    assert!(ops.iter().all(|o| o.key() == changed), "{ops:?}");
    assert_eq!(ops.len(), 3); // update the service, add one real server, delete one
    let out = c.apply(&ops).unwrap();
    assert!(out.refused.is_empty(), "{:?}", out.refused);
    assert_eq!(out.messages_per_send, vec![3]);
    assert_eq!(c.dump(false).unwrap(), want);
}

#[test]
#[ignore = "needs ip_vs: run in the VM (tests/vm)"]
fn one_refused_message_leaves_the_rest_of_the_batch_applied_and_named() {
    let mut c = Client::open().unwrap();
    reset(&mut c);
    let svc = Service {
        scheduler: "rr".into(),
        flags: 0,
        timeout: 0,
    };
    let (a, missing, b) = (
        key(1, Protocol::Tcp),
        key(2, Protocol::Tcp),
        key(3, Protocol::Tcp),
    );
    let bad_sched = Service {
        scheduler: "nosuchsched".into(),
        ..svc.clone()
    };
    let ops = vec![
        Op::AddService(a, svc.clone()),
        Op::AddDest(missing, dest(2, 0), 1), // its virtual server does not exist
        Op::AddService(key(4, Protocol::Tcp), bad_sched), // no such scheduler module
        Op::AddService(b, svc.clone()),
        Op::AddDest(b, dest(3, 0), 1),
    ];
    let out = c.apply(&ops).unwrap();
    assert_eq!(out.refused, vec![(1, libc::ESRCH), (2, libc::ENOENT)]);
    let have = c.dump(false).unwrap();
    assert_eq!(have.keys().copied().collect::<Vec<_>>(), vec![a, b]);
    assert_eq!(have[&b].dests.len(), 1);
}

#[test]
#[ignore = "needs ip_vs: run in the VM (tests/vm)"]
fn timeouts_are_set() {
    let mut c = Client::open().unwrap();
    c.set_timeouts(900, 120, 300).unwrap();
    let text = std::fs::read_to_string("/proc/net/ip_vs").unwrap_or_default();
    assert!(text.contains("IP Virtual Server"), "{text}");
}

/// Leaves a table in the kernel and its description in `$KPROXY_IPVS_EXPECT` (JSON) for
/// tests/vm/ipvs_reader.py, which lists the kernel's table with pyroute2 and compares.
#[test]
#[ignore = "needs ip_vs: run in the VM (tests/vm), last"]
fn independent_reader_fixture() {
    let path = std::env::var("KPROXY_IPVS_EXPECT").expect("KPROXY_IPVS_EXPECT");
    let mut c = Client::open().unwrap();
    reset(&mut c);
    let want = table(12, 3, "wlc");
    let out = c.apply(&plan(&want, &Table::new())).unwrap();
    assert!(out.refused.is_empty());
    let mut rows = Vec::new();
    for (k, v) in &want {
        let dests: Vec<String> = v
            .dests
            .iter()
            .map(|(d, w)| format!("[\"{}\", {}, {}]", d.addr, d.port, w.weight))
            .collect();
        rows.push(format!(
            "{{\"addr\": \"{}\", \"protocol\": \"{}\", \"port\": {}, \"scheduler\": \"{}\", \
             \"persistent\": {}, \"timeout\": {}, \"dests\": [{}]}}",
            k.addr,
            k.protocol.lower(),
            k.port,
            v.service.scheduler,
            v.service.flags & 1 == 1,
            v.service.timeout,
            dests.join(", ")
        ));
    }
    std::fs::write(path, format!("[{}]\n", rows.join(",\n"))).unwrap();
}
