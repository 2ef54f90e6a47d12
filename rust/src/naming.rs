//! Chain names derived from Service identities, exactly as upstream derives them, so that
//! scripts and dashboards written against kube-proxy keep working.

use crate::model::{Endpoint, ServicePortName};
use sha2::{Digest, Sha256};
use std::fmt::Write;
use std::net::IpAddr;

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// The first `n` characters of the RFC 4648 base32 encoding of `data`.
fn base32_prefix(data: &[u8], n: usize) -> String {
    let mut out = String::with_capacity(n);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for &b in data {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(BASE32[((acc >> bits) & 31) as usize] as char);
            if out.len() == n {
                return out;
            }
        }
    }
    out
}

/// `base32(sha256(s))[:16]`: upstream's hash for iptables chain names (the 28-character chain
/// name limit is why it is truncated).
pub fn hash16(s: &str) -> String {
    base32_prefix(&Sha256::digest(s.as_bytes()), 16)
}

/// `ip:port`, with brackets for IPv6, as Go's `net.JoinHostPort` prints it.
pub fn join_host_port(ip: &IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// The per-service-port hash shared by `KUBE-SVC-`, `KUBE-SVL-`, `KUBE-EXT-` and `KUBE-FW-`.
pub fn service_hash(spn: &ServicePortName) -> String {
    let mut s = spn.to_string();
    s.push_str(spn.protocol.lower());
    hash16(&s)
}

/// `KUBE-SEP-<hash>` for one endpoint of one service port.
pub fn endpoint_chain(spn: &ServicePortName, ep: &Endpoint) -> String {
    let mut s = spn.to_string();
    s.push_str(spn.protocol.lower());
    s.push_str(&join_host_port(&ep.ip, ep.port.get()));
    let mut out = String::from("KUBE-SEP-");
    let _ = write!(out, "{}", hash16(&s));
    out
}

/// The per-service-port chain names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceChains {
    /// `KUBE-SVC-*`: cluster traffic policy.
    pub cluster: String,
    /// `KUBE-SVL-*`: local traffic policy.
    pub local: String,
    /// `KUBE-EXT-*`: external destinations (NodePort, externalIPs, LB IPs).
    pub external: String,
    /// `KUBE-FW-*`: loadBalancerSourceRanges.
    pub firewall: String,
}

impl ServiceChains {
    pub fn new(spn: &ServicePortName) -> ServiceChains {
        let h = service_hash(spn);
        ServiceChains {
            cluster: format!("KUBE-SVC-{h}"),
            local: format!("KUBE-SVL-{h}"),
            external: format!("KUBE-EXT-{h}"),
            firewall: format!("KUBE-FW-{h}"),
        }
    }
}

/// `hashAndTruncate`: upstream nftables mode's chain-name base, `HASH8-<name>`, at most 112
/// characters (chain names are limited to 128 and the longest prefix is 16).
pub fn hash_and_truncate(name: &str) -> String {
    let mut out = base32_prefix(&Sha256::digest(name.as_bytes()), 8);
    out.push('-');
    out.push_str(name);
    if out.len() > 112 {
        out.truncate(109);
        out.push_str("...");
    }
    out
}

/// `ns/svc/proto/port`, hashed and truncated: the base of a service port's nftables chains.
pub fn nft_service_base(spn: &ServicePortName) -> String {
    hash_and_truncate(&format!(
        "{}/{}/{}/{}",
        spn.service.namespace,
        spn.service.name,
        spn.protocol.lower(),
        spn.port
    ))
}

/// `<service base>__<ip>/<port>`: the base of an endpoint's nftables chain. IPv6 colons, not
/// allowed in chain names, become dots.
pub fn nft_endpoint_base(spn: &ServicePortName, ep: &Endpoint) -> String {
    hash_and_truncate(&format!(
        "{}/{}/{}/{}__{}/{}",
        spn.service.namespace,
        spn.service.name,
        spn.protocol.lower(),
        spn.port,
        ep.ip.to_string().replace(':', "."),
        ep.port.get()
    ))
}

/// A stable 32-bit identity of an endpoint of a service port (affinity keys).
pub fn endpoint_id(spn: &ServicePortName, ep: &Endpoint) -> u32 {
    let d = Sha256::digest(
        format!(
            "{spn}/{}/{}",
            spn.protocol.lower(),
            join_host_port(&ep.ip, ep.port.get())
        )
        .as_bytes(),
    );
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Name, Protocol, ServiceKey};

    fn spn(ns: &str, name: &str, port: &str, protocol: Protocol) -> ServicePortName {
        ServicePortName {
            service: ServiceKey {
                namespace: Name::new(ns).unwrap(),
                name: Name::new(name).unwrap(),
            },
            port: Name::new(port).unwrap(),
            protocol,
        }
    }

    #[test]
    fn base32_matches_rfc4648_vectors() {
        assert_eq!(base32_prefix(b"foobar", 9), "MZXW6YTBO");
        assert_eq!(base32_prefix(b"f", 1), "M");
    }

    #[test]
    fn chain_names_match_upstream() {
        // Values verified against upstream kube-proxy (reference/kube-proxy-features.md, 2.1).
        let c = ServiceChains::new(&spn("default", "kubernetes", "https", Protocol::Tcp));
        assert_eq!(c.cluster, "KUBE-SVC-NPX46M4PTMTKRN6Y");
        let d = ServiceChains::new(&spn("kube-system", "kube-dns", "dns", Protocol::Udp));
        assert_eq!(d.cluster, "KUBE-SVC-TCOU7JCQXEZGVUNU");
        assert!(c.cluster.len() <= 28 && c.firewall.len() <= 28);
    }

    #[test]
    fn join_host_port_brackets_ipv6() {
        assert_eq!(
            join_host_port(&"10.0.0.1".parse().unwrap(), 80),
            "10.0.0.1:80"
        );
        assert_eq!(
            join_host_port(&"fd00::1".parse().unwrap(), 80),
            "[fd00::1]:80"
        );
    }
}
