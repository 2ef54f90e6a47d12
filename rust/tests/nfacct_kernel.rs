//! The iptables Fake against the real kernel for nfacct counters, the same inputs through
//! both, in a network namespace of the test's own (the counters are per namespace, so the
//! host's are never touched). Needs root and `iptables-restore`; elsewhere it says why and
//! returns.

use _core::xtables::{Backend, Fake, Kernel};
use _core::{model::IpFamily, nfacct};

const COUNTER: &str = nfacct::INVALID_DROPPED;

fn restore_naming(counter: &str) -> String {
    format!(
        "*filter\n:KPROXY-NFACCT-TEST - [0:0]\n-A KPROXY-NFACCT-TEST -m conntrack --ctstate INVALID -m nfacct --nfacct-name {counter} -j DROP\nCOMMIT\n"
    )
}

/// The rule as each backend lists it, whitespace normalized (iptables-save prints two spaces
/// before the counter's name).
fn listed(backend: &mut dyn Backend) -> Vec<String> {
    backend
        .dump()
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("-A KPROXY-NFACCT-TEST"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

fn differential() {
    let mut kernel = Kernel::new(IpFamily::V4);
    let mut fake = Fake::new();
    let backends: [&mut dyn Backend; 2] = [&mut kernel, &mut fake];
    let mut outcomes = Vec::new();
    for b in backends {
        // A rule naming a counter that does not exist is refused, whole.
        let missing = b.restore(&restore_naming(COUNTER)).is_err();
        let absent = b.counter(COUNTER).unwrap();
        // Created (twice: the second is a no-op), the same rule is accepted.
        b.ensure_counter(COUNTER).unwrap();
        b.ensure_counter(COUNTER).unwrap();
        b.restore(&restore_naming(COUNTER)).unwrap();
        let count = b.counter(COUNTER).unwrap();
        outcomes.push((missing, absent, count, listed(b)));
    }
    assert_eq!(outcomes[0], outcomes[1], "kernel vs Fake");
    let (missing, absent, count, rules) = &outcomes[0];
    assert!(
        *missing && absent.is_none() && *count == Some(0),
        "{outcomes:?}"
    );
    assert_eq!(rules.len(), 1);
    // A name the kernel cannot hold is refused before anything is sent.
    assert!(kernel.ensure_counter(&"x".repeat(40)).is_err());
}

#[test]
fn the_fake_refuses_and_accepts_nfacct_rules_as_the_kernel_does() {
    if std::process::Command::new("iptables-restore")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: no iptables-restore here");
        return;
    }
    // A thread of its own in a new network namespace: the tools it starts run there too.
    let run = std::thread::spawn(|| {
        // SAFETY: unshare(2) changes only this thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let e = std::io::Error::last_os_error();
            eprintln!("skipped: cannot make a network namespace ({e}); run as root");
            return;
        }
        differential();
    });
    run.join().expect("the differential test panicked");
}
