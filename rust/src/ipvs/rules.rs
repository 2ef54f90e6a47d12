//! The iptables rules the ipvs mode needs around IPVS, as upstream writes them: masquerade
//! marks for traffic that must be SNATed, hairpin masquerade, NodePort and load-balancer
//! source-range filtering, and the filter that keeps the addresses on kube-ipvs0 from
//! exposing the node's own ports. Every rule matches an ipset ([`super::ipset`]), so the
//! rules depend on configuration only: Services change set members, never these rules.
//! The one exception is upstream's per-address "no access from the node" drop for
//! load balancers whose source ranges exclude the node, passed in as `out_filter`.

use super::ipset::Set;
use crate::config::LocalDetector;
use crate::model::IpFamily;
use crate::trace::Reason;
use crate::xtables::jumps::{
    jump, Jump, FORWARD, PORTALS_FROM_OUTPUT, PORTALS_FROM_PREROUTING, POSTROUTING,
};
use crate::xtables::{KUBE_FORWARD, KUBE_MARK_MASQ, KUBE_POSTROUTING, KUBE_SERVICES};

pub const KUBE_NODE_PORT: &str = "KUBE-NODE-PORT";
pub const KUBE_LOAD_BALANCER: &str = "KUBE-LOAD-BALANCER";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
pub const KUBE_SOURCE_RANGES_FIREWALL: &str = "KUBE-SOURCE-RANGES-FIREWALL";
pub const KUBE_IPVS_FILTER: &str = "KUBE-IPVS-FILTER";
pub const KUBE_IPVS_OUT_FILTER: &str = "KUBE-IPVS-OUT-FILTER";

/// What a verdict in one of these filter chains means, for the tracer's reasons.
pub const VERDICT_REASONS: &[(&str, Reason)] = &[
    (KUBE_SOURCE_RANGES_FIREWALL, Reason::SourceRange),
    (KUBE_IPVS_FILTER, Reason::NoServicePort),
];

pub const NAT_CHAINS: &[&str] = &[
    KUBE_SERVICES,
    KUBE_POSTROUTING,
    KUBE_NODE_PORT,
    KUBE_LOAD_BALANCER,
    KUBE_MARK_MASQ,
];

pub const FILTER_CHAINS: &[&str] = &[
    KUBE_FORWARD,
    KUBE_NODE_PORT,
    KUBE_PROXY_FIREWALL,
    KUBE_SOURCE_RANGES_FIREWALL,
    KUBE_IPVS_FILTER,
    KUBE_IPVS_OUT_FILTER,
];

/// Upstream's `iptablesJumpChain` for the ipvs mode.
pub const JUMPS: &[Jump] = &[
    PORTALS_FROM_OUTPUT,
    PORTALS_FROM_PREROUTING,
    POSTROUTING,
    FORWARD,
    jump!(
        "filter",
        "INPUT",
        KUBE_NODE_PORT,
        "kubernetes health check rules"
    ),
    jump!(
        "filter",
        "INPUT",
        KUBE_PROXY_FIREWALL,
        "kube-proxy firewall rules"
    ),
    jump!(
        "filter",
        "FORWARD",
        KUBE_PROXY_FIREWALL,
        "kube-proxy firewall rules"
    ),
    jump!(
        "filter",
        "INPUT",
        KUBE_IPVS_FILTER,
        "kubernetes ipvs access filter"
    ),
    jump!(
        "filter",
        "OUTPUT",
        KUBE_IPVS_OUT_FILTER,
        "kubernetes ipvs access filter"
    ),
];

/// What the rules depend on.
#[derive(Clone, Debug)]
pub struct RuleConfig {
    pub family: IpFamily,
    pub local: LocalDetector,
    pub masquerade_all: bool,
    pub masquerade_mark: u32,
}

/// The complete `iptables-restore --noflush` input: declares (so flushes) and fills every
/// chain of ours in nat and filter.
pub fn restore_text(cfg: &RuleConfig, out_filter: &[String]) -> String {
    let f = cfg.family;
    let set = |s: Set| format!("-m set --match-set {} {}", s.name(f), s.dims());
    let mark = format!("{:#x}", cfg.masquerade_mark);
    let lo = match f {
        IpFamily::V4 => "127.0.0.0/8",
        IpFamily::V6 => "::1/128",
    };
    let mut nat = vec![format!("-A {KUBE_SERVICES} -s {lo} -j RETURN")];
    let mut filter = Vec::new();
    // Set-driven jumps (upstream's ipsetWithIptablesChain), in its order.
    nat.push(format!(
        "-A {KUBE_POSTROUTING} {} -j MASQUERADE",
        set(Set::LoopBack)
    ));
    nat.push(format!(
        "-A {KUBE_SERVICES} {} -j {KUBE_LOAD_BALANCER}",
        set(Set::LoadBalancer)
    ));
    nat.push(format!(
        "-A {KUBE_LOAD_BALANCER} {} -j RETURN",
        set(Set::LoadBalancerLocal)
    ));
    for (proto, (all, local)) in [
        ("tcp", Set::node_port(crate::model::Protocol::Tcp)),
        ("udp", Set::node_port(crate::model::Protocol::Udp)),
        ("sctp", Set::node_port(crate::model::Protocol::Sctp)),
    ] {
        nat.push(format!(
            "-A {KUBE_NODE_PORT} -p {proto} {} -j RETURN",
            set(local)
        ));
        nat.push(format!(
            "-A {KUBE_NODE_PORT} -p {proto} {} -j {KUBE_MARK_MASQ}",
            set(all)
        ));
    }
    filter.push(format!(
        "-A {KUBE_PROXY_FIREWALL} {} -j {KUBE_SOURCE_RANGES_FIREWALL}",
        set(Set::LoadBalancerFw)
    ));
    filter.push(format!(
        "-A {KUBE_SOURCE_RANGES_FIREWALL} {} -j RETURN",
        set(Set::LoadBalancerSourceCidr)
    ));
    filter.push(format!(
        "-A {KUBE_SOURCE_RANGES_FIREWALL} {} -j RETURN",
        set(Set::LoadBalancerSourceIp)
    ));
    // Off-cluster traffic to a ClusterIP is masqueraded (it may leave the node again).
    let cluster = set(Set::ClusterIp);
    if cfg.masquerade_all {
        nat.push(format!("-A {KUBE_SERVICES} {cluster} -j {KUBE_MARK_MASQ}"));
    } else if let Some(not_local) = cfg.local.if_not_local() {
        nat.push(format!(
            "-A {KUBE_SERVICES} {cluster} {not_local} -j {KUBE_MARK_MASQ}"
        ));
    } else {
        // Without pod detection, upstream masquerades node-originated traffic whose source
        // is a Service address (the kernel picks a kube-ipvs0 address as the source).
        nat.push(format!(
            "-A {KUBE_SERVICES} -m set --match-set {} src,dst -j {KUBE_MARK_MASQ}",
            Set::ClusterIp.name(f)
        ));
    }
    // externalIPs: masquerade under the Cluster policy; accept off-node and local traffic.
    for (s, masq) in [(Set::ExternalIp, true), (Set::ExternalIpLocal, false)] {
        let m = set(s);
        if masq {
            nat.push(format!("-A {KUBE_SERVICES} {m} -j {KUBE_MARK_MASQ}"));
        }
        nat.push(format!(
            "-A {KUBE_SERVICES} {m} -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT"
        ));
        nat.push(format!(
            "-A {KUBE_SERVICES} {m} -m addrtype --dst-type LOCAL -j ACCEPT"
        ));
    }
    nat.push(format!(
        "-A {KUBE_SERVICES} -m addrtype --dst-type LOCAL -j {KUBE_NODE_PORT}"
    ));
    nat.push(format!("-A {KUBE_LOAD_BALANCER} -j {KUBE_MARK_MASQ}"));
    filter.push(format!("-A {KUBE_SOURCE_RANGES_FIREWALL} -j DROP"));
    filter.extend(
        out_filter
            .iter()
            .map(|r| format!("-A {KUBE_IPVS_OUT_FILTER} {r}")),
    );
    // Accept what IPVS serves, whatever other rules later in the chain say.
    nat.push(format!("-A {KUBE_SERVICES} {cluster} -j ACCEPT"));
    nat.push(format!(
        "-A {KUBE_SERVICES} {} -j ACCEPT",
        set(Set::LoadBalancer)
    ));
    filter.push(format!(
        "-A {KUBE_FORWARD} -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"
    ));
    filter.push(format!(
        "-A {KUBE_FORWARD} -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    ));
    filter.push(format!(
        "-A {KUBE_NODE_PORT} {} -j ACCEPT",
        set(Set::HealthCheckNodePort)
    ));
    // The node's other ports are not reachable through Service addresses (kubernetes#72236).
    for s in [
        Set::LoadBalancer,
        Set::ClusterIp,
        Set::ExternalIp,
        Set::ExternalIpLocal,
        Set::HealthCheckNodePort,
    ] {
        filter.push(format!("-A {KUBE_IPVS_FILTER} {} -j RETURN", set(s)));
    }
    filter.push(format!(
        "-A {KUBE_IPVS_FILTER} -m conntrack --ctstate NEW {} -j REJECT",
        set(Set::IpvsIps)
    ));
    nat.push(format!(
        "-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN"
    ));
    nat.push(format!("-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}"));
    nat.push(format!(
        "-A {KUBE_POSTROUTING} -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
    ));
    nat.push(format!("-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}"));

    let mut out = String::from("*nat\n");
    for c in NAT_CHAINS {
        out.push_str(&format!(":{c} - [0:0]\n"));
    }
    for r in nat {
        out.push_str(&r);
        out.push('\n');
    }
    out.push_str("COMMIT\n*filter\n");
    for c in FILTER_CHAINS {
        out.push_str(&format!(":{c} - [0:0]\n"));
    }
    for r in filter {
        out.push_str(&r);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xtables::{Backend, Fake};

    fn cfg(local: LocalDetector) -> RuleConfig {
        RuleConfig {
            family: IpFamily::V4,
            local,
            masquerade_all: false,
            masquerade_mark: 0x4000,
        }
    }

    #[test]
    fn the_rules_load_with_their_jumps_and_match_the_sets_by_name() {
        let text = restore_text(
            &cfg(LocalDetector::Cidr("10.244.0.0/16".parse().unwrap())),
            &[],
        );
        let mut k = Fake::new();
        k.restore(&text).unwrap();
        k.ensure_jumps(JUMPS).unwrap();
        let nat = k.rules("nat", KUBE_SERVICES).unwrap().join("\n");
        assert!(
            nat.contains(
                "-m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ"
            ),
            "{nat}"
        );
        let np = k.rules("nat", KUBE_NODE_PORT).unwrap();
        assert_eq!(np.len(), 6);
        let filter = k.rules("filter", KUBE_IPVS_FILTER).unwrap();
        assert!(filter
            .last()
            .unwrap()
            .contains("KUBE-IPVS-IPS dst -j REJECT"));
        // The jumps as restore text (for an empty namespace) give the same rules.
        let mut direct = Fake::new();
        let with_jumps = format!(
            "{}{}",
            restore_text(
                &cfg(LocalDetector::Cidr("10.244.0.0/16".parse().unwrap())),
                &[]
            ),
            crate::xtables::jumps::restore_text(JUMPS)
        );
        direct.restore(&with_jumps).unwrap();
        // (ensure_jumps prepends, so only the built-in chains' order differs.)
        let lines = |text: String| {
            let mut v: Vec<String> = text.lines().map(str::to_owned).collect();
            v.sort();
            v
        };
        assert_eq!(lines(direct.dump().unwrap()), lines(k.dump().unwrap()));
        // Without pod detection: upstream's src,dst match for node-originated traffic.
        let text = restore_text(&cfg(LocalDetector::None), &[]);
        assert!(text.contains("--match-set KUBE-CLUSTER-IP src,dst -j KUBE-MARK-MASQ"));
        // IPv6 uses the KUBE-6- sets.
        let v6 = RuleConfig {
            family: IpFamily::V6,
            ..cfg(LocalDetector::None)
        };
        assert!(restore_text(&v6, &[]).contains("KUBE-6-LOOP-BACK dst,dst,src -j MASQUERADE"));
    }
}
