//! Removing what kproxy left in a node's iptables tables: the iptables mode's chains and the
//! ipvs mode's companion chains (both live in the same tables, and a node that switched modes
//! may hold either).

use crate::error::Result;
use crate::iptables::chains;
use crate::ipvs;
use crate::xtables::Backend;

/// Remove everything the iptables and ipvs modes create in one family's iptables tables: the
/// jump rules from the built-in chains, then every chain of ours. Safe to run twice and on a
/// clean node.
pub fn iptables_tables(backend: &mut dyn Backend) -> Result<usize> {
    backend.remove_jumps(chains::JUMPS)?;
    backend.remove_jumps(chains::FIREWALL_JUMPS)?;
    backend.remove_jumps(ipvs::rules::JUMPS)?;
    let mut removed = 0;
    let mut text = String::new();
    for table in ["mangle", "filter", "nat"] {
        let fixed: &[&[&str]] = match table {
            "nat" => &[chains::NAT_CHAINS, ipvs::rules::NAT_CHAINS],
            "filter" => &[chains::FILTER_CHAINS, ipvs::rules::FILTER_CHAINS],
            _ => &[],
        };
        let ours: Vec<String> = backend
            .chains(table)?
            .into_iter()
            .filter(|c| {
                fixed.iter().any(|f| f.contains(&c.as_str()))
                    || c == chains::CANARY
                    || chains::is_dynamic_chain(c)
            })
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
