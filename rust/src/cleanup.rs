//! Removing what kproxy left in a node's iptables tables: the iptables mode's chains and the
//! ipvs mode's companion chains (both live in the same tables, and a node that switched modes
//! may hold either).

use crate::error::Result;
use crate::iptables::chains;
use crate::iptables::dispatch::BUCKET_PREFIXES;
use crate::ipvs;
use crate::xtables::Backend;

/// Remove everything the iptables and ipvs modes create in one family's iptables tables: the
/// jump rules from the built-in chains, then every chain of ours. Safe to run twice and on a
/// clean node.
pub fn iptables_tables(backend: &mut dyn Backend) -> Result<usize> {
    backend.remove_jumps(chains::JUMPS)?;
    backend.remove_jumps(chains::FIREWALL_JUMPS)?;
    backend.remove_jumps(ipvs::rules::JUMPS)?;
    remove_stray_jumps(backend)?;
    let mut removed = 0;
    let mut text = String::new();
    for table in ["mangle", "filter", "nat"] {
        let ours: Vec<String> = backend
            .chains(table)?
            .into_iter()
            .filter(|c| is_ours(table, c))
            .collect();
        if ours.is_empty() {
            continue;
        }
        text.push_str(&format!("*{table}\n"));
        for c in &ours {
            text.push_str(&format!(":{c} - [0:0]\n"));
        }
        for c in &ours {
            text.push_str(&format!("-X {c}\n"));
        }
        text.push_str("COMMIT\n");
        removed += ours.len();
    }
    if !text.is_empty() {
        backend.restore(&text)?;
    }
    // KUBE-FIREWALL is shared with kubelet: delete it only when nothing references it any
    // more. If something still does, this restore fails as a whole and changes nothing.
    if backend.chain_exists("filter", chains::KUBE_FIREWALL)? {
        let fw = chains::KUBE_FIREWALL;
        if backend
            .restore(&format!("*filter\n:{fw} - [0:0]\n-X {fw}\nCOMMIT\n"))
            .is_ok()
        {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Whether `chain` in `table` is one the iptables or ipvs mode creates (kproxy's or
/// kube-proxy's: the names are the same).
fn is_ours(table: &str, chain: &str) -> bool {
    let fixed: &[&[&str]] = match table {
        "nat" => &[chains::NAT_CHAINS, ipvs::rules::NAT_CHAINS],
        "filter" => &[chains::FILTER_CHAINS, ipvs::rules::FILTER_CHAINS],
        _ => &[],
    };
    fixed.iter().any(|f| f.contains(&chain))
        || chain == chains::CANARY
        || chains::is_dynamic_chain(chain)
}

/// Delete the rules in the built-in chains that jump to one of our chains but are not among
/// the jumps kproxy knows (another kube-proxy version's, or one made by hand): left there,
/// they keep the chain busy and its deletion fails.
fn remove_stray_jumps(backend: &mut dyn Backend) -> Result<()> {
    let dump = backend.dump()?;
    let mut text = String::new();
    let mut table = "";
    let mut stray = Vec::new();
    for line in dump.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t;
        } else if line == "COMMIT" {
            if !stray.is_empty() {
                text.push_str(&format!("*{table}\n{}COMMIT\n", stray.concat()));
                stray.clear();
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or("");
            let builtin = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];
            let target = crate::xtables::backend::jump_target(rule).unwrap_or("");
            if builtin.contains(&chain) && is_ours(table, target) {
                stray.push(format!("-D {rule}\n"));
            }
        }
    }
    if !text.is_empty() {
        backend.restore(&text)?;
    }
    Ok(())
}

/// Hand a node back to kube-proxy (iptables mode): remove what only kproxy creates, its
/// dispatch buckets, once kube-proxy has taken the shared chains over. The other chains have
/// upstream's names and are kube-proxy's now. While a chain that is not one of the buckets
/// still jumps to one (kube-proxy has not rewritten `KUBE-SERVICES` yet), nothing is removed
/// and the answer says why: removing them would cut the node's Service traffic.
pub fn hand_back_iptables(backend: &mut dyn Backend) -> Result<HandBack> {
    let is_bucket = |c: &str| BUCKET_PREFIXES.iter().any(|p| c.starts_with(p));
    let dump = backend.dump()?;
    let mut text = String::new();
    let mut removed = 0;
    let mut table = "";
    let mut buckets: Vec<&str> = Vec::new();
    for line in dump.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t;
            buckets.clear();
        } else if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or("");
            if is_bucket(chain) {
                buckets.push(chain);
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or("");
            let target = crate::xtables::backend::jump_target(rule).unwrap_or("");
            if !is_bucket(chain) && is_bucket(target) {
                return Ok(HandBack::Blocked(format!(
                    "{table} table: {chain} still jumps to kproxy's {target}: kube-proxy has \
                     not taken this node over yet (start it, then hand back)"
                )));
            }
        } else if line == "COMMIT" && !buckets.is_empty() {
            // Declaring a chain flushes it, so buckets that jump to each other go together.
            text.push_str(&format!("*{table}\n"));
            for b in &buckets {
                text.push_str(&format!(":{b} - [0:0]\n"));
            }
            for b in &buckets {
                text.push_str(&format!("-X {b}\n"));
            }
            text.push_str("COMMIT\n");
            removed += buckets.len();
            buckets.clear();
        }
    }
    if !text.is_empty() {
        backend.restore(&text)?;
    }
    Ok(HandBack::Removed(removed))
}

/// What [`hand_back_iptables`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum HandBack {
    /// This many of kproxy's own chains were removed (0: there were none).
    Removed(usize),
    /// Nothing was removed: why not.
    Blocked(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xtables::Fake;

    #[test]
    fn jumps_of_another_kube_proxy_version_do_not_keep_the_chains() {
        let mut fake = Fake::new();
        let setup = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-ABCDEFGHIJKLMNOP - [0:0]\n\
                     :DOCKER - [0:0]\n-A PREROUTING -j KUBE-SERVICES\n\
                     -A OUTPUT -m addrtype --dst-type LOCAL -j KUBE-SERVICES\n\
                     -A PREROUTING -j DOCKER\n\
                     -A KUBE-SERVICES -d 10.96.0.10/32 -j KUBE-SVC-ABCDEFGHIJKLMNOP\nCOMMIT\n";
        fake.restore(setup).unwrap();
        assert_eq!(iptables_tables(&mut fake).unwrap(), 2);
        let left = fake.dump().unwrap();
        assert!(!left.contains("KUBE-"), "{left}");
        assert!(left.contains("-A PREROUTING -j DOCKER"), "{left}");
    }

    const KPROXY_LEFT: &str = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVCS-A - [0:0]\n\
        :KUBE-SVCS-A0 - [0:0]\n:KUBE-SVC-ABCDEFGHIJKLMNOP - [0:0]\n\
        -A PREROUTING -j KUBE-SERVICES\n-A KUBE-SERVICES -j KUBE-SVCS-A\n\
        -A KUBE-SVCS-A -j KUBE-SVCS-A0\n\
        -A KUBE-SVCS-A0 -d 10.96.0.10/32 -j KUBE-SVC-ABCDEFGHIJKLMNOP\nCOMMIT\n";

    #[test]
    fn hand_back_waits_for_kube_proxy_to_rewrite_the_shared_chains() {
        let mut fake = Fake::new();
        fake.restore(KPROXY_LEFT).unwrap();
        let HandBack::Blocked(err) = hand_back_iptables(&mut fake).unwrap() else {
            panic!("removed chains kube-proxy's rules still use");
        };
        assert!(
            err.contains("KUBE-SERVICES still jumps to kproxy's KUBE-SVCS-A"),
            "{err}"
        );
        assert!(fake.dump().unwrap().contains(":KUBE-SVCS-A0"));
    }

    #[test]
    fn hand_back_removes_only_the_buckets_once_kube_proxy_owns_the_chains() {
        let mut fake = Fake::new();
        fake.restore(KPROXY_LEFT).unwrap();
        // kube-proxy's full restore: its declared chains are flushed and rewritten flat.
        let upstream = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-ABCDEFGHIJKLMNOP - [0:0]\n\
                        -A KUBE-SERVICES -d 10.96.0.10/32 -j KUBE-SVC-ABCDEFGHIJKLMNOP\nCOMMIT\n";
        fake.restore(upstream).unwrap();
        assert_eq!(hand_back_iptables(&mut fake).unwrap(), HandBack::Removed(2));
        let left = fake.dump().unwrap();
        assert!(!left.contains("KUBE-SVCS-"), "{left}");
        assert!(left.contains("-A KUBE-SERVICES -d 10.96.0.10/32"), "{left}");
        assert!(left.contains("-A PREROUTING -j KUBE-SERVICES"), "{left}");
        assert_eq!(hand_back_iptables(&mut fake).unwrap(), HandBack::Removed(0));
        // idempotent
    }
}
