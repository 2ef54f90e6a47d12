//! The redirect rules of the userspace mode: one nftables table per family, `kproxy-userspace`,
//! sending each Service address and port to its portal listener (`redirect`: to 127.0.0.1 for
//! the node's own connections, to the receiving interface's address for pods' and outside
//! clients'). The table is small (one map, two chains) and replaced whole, atomically, by
//! each write.

use crate::error::Result;
use crate::exec;
use crate::model::IpFamily;
use std::fmt::Write;

pub const TABLE: &str = "kproxy-userspace";

/// One redirect: (Service address, protocol, Service port, the portal listener's port).
pub use crate::forward::PortalElement as Element;

fn family_word(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

/// The `nft -f` transaction for `elements` (address, protocol, Service port, listener port).
pub fn script(family: IpFamily, elements: &[Element]) -> String {
    let fam = family_word(family);
    let (addr_type, daddr) = match family {
        IpFamily::V4 => ("ipv4_addr", "ip daddr"),
        IpFamily::V6 => ("ipv6_addr", "ip6 daddr"),
    };
    let mut s = String::new();
    // Replace atomically: add (so the delete cannot fail), delete, add again.
    let _ = writeln!(s, "add table {fam} {TABLE}\ndelete table {fam} {TABLE}");
    let _ = writeln!(s, "table {fam} {TABLE} {{");
    let _ = writeln!(
        s,
        "  map portals {{\n    type {addr_type} . inet_proto . inet_service : inet_service"
    );
    let elems: Vec<String> = elements
        .iter()
        .filter(|(ip, ..)| family.contains(ip))
        .map(|(ip, proto, port, to)| format!("{ip} . {} . {port} : {to}", proto.lower()))
        .collect();
    if !elems.is_empty() {
        let _ = writeln!(s, "    elements = {{ {} }}", elems.join(", "));
    }
    let _ = writeln!(s, "  }}");
    for (chain, hook, prio) in [
        ("prerouting", "prerouting", -100),
        ("output", "output", -100),
    ] {
        let _ = writeln!(
            s,
            "  chain {chain} {{\n    type nat hook {hook} priority {prio}; policy accept;\n    \
             meta l4proto {{ tcp, udp }} redirect to : {daddr} . meta l4proto . th dport map @portals\n  }}"
        );
    }
    let _ = writeln!(s, "}}");
    s
}

pub fn apply(family: IpFamily, elements: &[Element]) -> Result<()> {
    let text = script(family, elements);
    exec::check(
        "nft -f (userspace portals)",
        exec::run("nft -f", "nft", &["-f", "-"], Some(&text))?,
    )?;
    Ok(())
}

/// Whether the table is still there (someone may flush the ruleset).
pub fn intact(family: IpFamily) -> Result<bool> {
    let out = exec::run(
        "nft list table",
        "nft",
        &["list", "table", family_word(family), TABLE],
        None,
    )?;
    Ok(out.status.success())
}

/// Remove the table (nothing happens when there is none).
pub fn cleanup(family: IpFamily) -> Result<()> {
    let fam = family_word(family);
    let text = format!("add table {fam} {TABLE}\ndelete table {fam} {TABLE}\n");
    exec::check(
        "nft -f (userspace cleanup)",
        exec::run("nft -f", "nft", &["-f", "-"], Some(&text))?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    #[test]
    fn the_table_maps_service_addresses_to_listener_ports() {
        let s = script(
            IpFamily::V4,
            &[
                ("10.96.0.10".parse().unwrap(), Protocol::Tcp, 80, 41000),
                ("fd00::1".parse().unwrap(), Protocol::Tcp, 80, 41001),
                ("10.96.0.10".parse().unwrap(), Protocol::Udp, 53, 41002),
            ],
        );
        assert!(s.starts_with("add table ip kproxy-userspace\ndelete table ip kproxy-userspace\n"));
        assert!(s.contains(
            "elements = { 10.96.0.10 . tcp . 80 : 41000, 10.96.0.10 . udp . 53 : 41002 }"
        ));
        assert!(
            !s.contains("fd00"),
            "other families' addresses are left out"
        );
        assert_eq!(
            s.matches("redirect to : ip daddr . meta l4proto . th dport map @portals")
                .count(),
            2
        );
    }
}
