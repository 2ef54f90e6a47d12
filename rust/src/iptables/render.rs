//! Merged state -> `iptables-restore` input, in upstream kube-proxy's layout.
//!
//! nat: `KUBE-SERVICES` matches each service address and jumps to the policy chain
//! (`KUBE-SVC-*` cluster, `KUBE-SVL-*` local) or, for external destinations, to `KUBE-EXT-*`
//! (masquerade and the Local-policy short-circuits); policy chains spread over `KUBE-SEP-*`
//! endpoint chains with `statistic` rules; `KUBE-SEP-*` masquerades hairpin traffic and DNATs.
//! filter: REJECT for services without endpoints, DROP for Local policies without local
//! endpoints, and `KUBE-FORWARD` accepting what we marked.
//!
//! Output is deterministic: services in (namespace, name, port) order, endpoints by address.

use super::chains::*;
use super::dispatch::{Key, Root};
use crate::config::RenderConfig;
use crate::model::{IpFamily, Protocol, ServiceKey};
use crate::naming::{endpoint_chain, join_host_port, ServiceChains};
use crate::nfacct;
use crate::state::{ServicePortView, State};
use crate::topology::Counts;
use crate::topology::{NodeView, Serving};
use crate::xtables::{KUBE_FORWARD, KUBE_MARK_MASQ, KUBE_POSTROUTING};
use std::collections::BTreeSet;
use std::fmt::Write;

impl RenderConfig {
    fn mark(&self) -> String {
        format!("{:#x}", self.masquerade_mark)
    }

    fn loopback(&self) -> &'static str {
        match self.family {
            IpFamily::V4 => "127.0.0.0/8",
            IpFamily::V6 => "::1/128",
        }
    }
}

/// Declared chains and their `-A` lines, in order.
#[derive(Debug, Default, Clone)]
pub struct Table {
    /// Declared chains: `iptables-restore --noflush` flushes and rewrites exactly these.
    pub chains: BTreeSet<String>,
    /// `-A ...` lines, in order.
    pub rules: String,
    pub rule_count: usize,
}

impl Table {
    pub fn chain(&mut self, name: &str) {
        self.chains.insert(name.to_owned());
    }

    pub fn rule(&mut self, chain: &str, args: std::fmt::Arguments<'_>) {
        let _ = writeln!(self.rules, "-A {chain} {args}");
        self.rule_count += 1;
    }
}

/// A rule that lives in a shared chain, placed there through the dispatch trie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub root: Root,
    pub key: Key,
    /// The rule's arguments (what follows `-A <chain> `).
    pub rule: String,
}

/// Everything one Service owns: its own nat chains and its rules in shared chains.
#[derive(Debug, Default, Clone)]
pub struct ServiceRules {
    pub nat: Table,
    pub entries: Vec<Entry>,
    pub counts: Counts,
}

impl ServiceRules {
    fn entry(&mut self, root: Root, key: Key, args: std::fmt::Arguments<'_>) {
        self.entries.push(Entry {
            root,
            key,
            rule: args.to_string(),
        });
    }
}

/// A complete ruleset (what `render` and full syncs produce).
#[derive(Debug, Default, Clone)]
pub struct Ruleset {
    pub filter: Table,
    pub nat: Table,
    pub counts: Counts,
}

impl Ruleset {
    /// The `iptables-restore --noflush` input. Chains in `stale_nat` (per-service chains that
    /// exist in the kernel but are no longer wanted) are flushed and deleted in the same
    /// transaction, after the rules that referenced them are gone.
    pub fn restore_text(&self, stale_nat: &BTreeSet<String>) -> String {
        let mut out = String::with_capacity(self.filter.rules.len() + self.nat.rules.len() + 4096);
        write_table(&mut out, "filter", &self.filter, &BTreeSet::new());
        write_table(&mut out, "nat", &self.nat, stale_nat);
        out
    }
}

/// Write one table's section: declarations (which flush), rules, then deletions.
pub fn write_table(out: &mut String, name: &str, table: &Table, delete: &BTreeSet<String>) {
    if table.chains.is_empty() && delete.is_empty() {
        return;
    }
    let _ = writeln!(out, "*{name}");
    for chain in table.chains.iter().chain(delete.iter()) {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    out.push_str(&table.rules);
    for chain in delete {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
}

/// `-m <proto> -p <proto>`, the match prefix upstream uses for every port match.
fn proto(p: Protocol) -> String {
    let p = p.lower();
    format!("-m {p} -p {p}")
}

/// `computeProbability`: `1/n` printed with ten decimals.
fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// The rules of the chains that do not depend on any Service: masquerading and forwarding.
pub fn fixed_chains(cfg: &RenderConfig) -> (Table, Table) {
    let mut filter = Table::default();
    let mut nat = Table::default();
    let mark = cfg.mark();
    for c in [KUBE_POSTROUTING, KUBE_MARK_MASQ] {
        nat.chain(c);
    }
    filter.chain(KUBE_FORWARD);

    // The masquerade machinery: mark in KUBE-MARK-MASQ, SNAT marked packets on the way out.
    nat.rule(
        KUBE_POSTROUTING,
        format_args!("-m mark ! --mark {mark}/{mark} -j RETURN"),
    );
    // Clear the mark so a packet re-traversing the stack (e.g. after encapsulation) is not
    // masqueraded twice.
    nat.rule(KUBE_POSTROUTING, format_args!("-j MARK --xor-mark {mark}"));
    nat.rule(
        KUBE_POSTROUTING,
        format_args!(
            "-m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
        ),
    );
    nat.rule(KUBE_MARK_MASQ, format_args!("-j MARK --or-mark {mark}"));

    // Localhost NodePorts need route_localnet, which would also let the outside reach
    // 127.0.0.0/8 through us: drop such martians unless they are our own DNATed traffic.
    if cfg.localhost_nodeports && cfg.family == IpFamily::V4 {
        filter.chain(KUBE_FIREWALL);
        filter.rule(
            KUBE_FIREWALL,
            format_args!(
                "-m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
            ),
        );
    }

    // Forwarding: drop INVALID packets (they would otherwise reach pods un-NATed and cause
    // spurious resets), accept what we marked and what belongs to accepted connections.
    if !cfg.conntrack_tcp_be_liberal {
        let count = counting(cfg, nfacct::INVALID_DROPPED);
        filter.rule(
            KUBE_FORWARD,
            format_args!("-m conntrack --ctstate INVALID{count} -j DROP"),
        );
    }
    filter.rule(
        KUBE_FORWARD,
        format_args!("-m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"),
    );
    filter.rule(
        KUBE_FORWARD,
        format_args!(
            "-m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        ),
    );
    (filter, nat)
}

/// Rules a root chain has after its bucket jumps: nat `KUBE-SERVICES` ends with the jump to
/// `KUBE-NODEPORTS`, which must stay its last rule.
pub fn root_tail(root: Root, cfg: &RenderConfig) -> Vec<String> {
    if root != Root::NatServices {
        return Vec::new();
    }
    let np_comment =
        "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";
    // Localhost NodePorts only work for IPv4 (with route_localnet); otherwise keep loopback
    // destinations out, as upstream.
    let localhost = cfg.localhost_nodeports && cfg.family == IpFamily::V4;
    match &cfg.nodeport_ips {
        None if localhost => vec![format!(
            "{np_comment} -m addrtype --dst-type LOCAL -j {KUBE_NODEPORTS}"
        )],
        None => vec![format!(
            "{np_comment} -m addrtype --dst-type LOCAL ! -d {} -j {KUBE_NODEPORTS}",
            cfg.loopback()
        )],
        Some(ips) => ips
            .iter()
            .filter(|ip| cfg.family.contains(ip) && (localhost || !ip.is_loopback()))
            .map(|ip| format!("{np_comment} -d {ip} -j {KUBE_NODEPORTS}"))
            .collect(),
    }
}

/// ` -m nfacct --nfacct-name <counter>` when the counter exists, else nothing.
fn counting(cfg: &RenderConfig, counter: &str) -> String {
    if cfg.nfacct.contains(&counter) {
        format!(" -m nfacct --nfacct-name {counter}")
    } else {
        String::new()
    }
}

/// Everything one Service owns, for every port it has in this engine's family.
pub fn render_service(state: &State, cfg: &RenderConfig, key: &ServiceKey) -> ServiceRules {
    let mut out = ServiceRules::default();
    let node = NodeView {
        name: &cfg.node_name,
        zone: state.node().zone.as_deref(),
    };
    for sp in state.service_ports_of(key) {
        render_service_port(&mut out, state, cfg, node, &sp);
    }
    out
}

/// The complete ruleset for `state` (what a full sync writes).
pub fn render(state: &State, cfg: &RenderConfig) -> Ruleset {
    super::writer::Writer::default().full_ruleset(state, cfg)
}

fn render_service_port(
    out: &mut ServiceRules,
    state: &State,
    cfg: &RenderConfig,
    node: NodeView<'_>,
    sp: &ServicePortView<'_>,
) {
    let Some(cluster_ip) = sp.cluster_ip else {
        return;
    };
    let serving = Serving::of(state, sp, node);
    out.counts.add(&serving.counts());
    let name = sp.name.to_string();
    let chains = ServiceChains::new(&sp.name);
    let p = proto(sp.name.protocol);
    let port = sp.port.port;
    let svc = sp.service;

    let (policies, cat) = (serving.policies, &serving.endpoints);
    let uses_cluster_chain = !cat.cluster.is_empty() && policies.uses_cluster();
    let uses_local_chain = !cat.local.is_empty() && policies.uses_local();

    let (has_endpoints, has_internal, has_external) = (
        serving.has_any(),
        serving.has_internal(),
        serving.has_external(),
    );
    let chain_of = |local: bool| {
        if local {
            &chains.local
        } else {
            &chains.cluster
        }
    };
    let internal_chain = chain_of(policies.internal_local);
    let external_policy_chain = chain_of(policies.external_local);
    let uses_external_chain = has_endpoints && policies.externally_accessible;
    let uses_fw_chain =
        has_endpoints && !sp.load_balancer_ips.is_empty() && !sp.source_ranges.is_empty();
    let lb_chain = if uses_fw_chain {
        &chains.firewall
    } else {
        &chains.external
    };

    // What the filter table does with traffic that finds no usable endpoint. TCP is refused
    // with a reset, not upstream's ICMP port unreachable: the kernel rate-limits ICMP errors
    // per client (about one a second), so a client retrying faster saw timeouts instead of
    // refusals (the churn soak found it, as it did in the nftables mode).
    let reject = if sp.name.protocol == Protocol::Tcp {
        "REJECT --reject-with tcp-reset"
    } else {
        "REJECT"
    };
    let (int_target, int_comment, ext_target, ext_comment) = if !has_endpoints {
        let c = format!("{name} has no endpoints");
        (reject, c.clone(), reject, c)
    } else {
        let c = format!("{name} has no local endpoints");
        ("DROP", c.clone(), "DROP", c)
    };

    // The cluster IP.
    if has_internal {
        out.entry(Root::NatServices, Key::Addr(cluster_ip),
            format_args!(
                "-m comment --comment \"{name} cluster IP\" {p} -d {cluster_ip} --dport {port} -j {internal_chain}"
            ),
        );
    } else {
        out.entry(Root::FilterServices, Key::Addr(cluster_ip),
            format_args!(
                "-m comment --comment \"{int_comment}\" {p} -d {cluster_ip} --dport {port} -j {int_target}"
            ),
        );
    }

    // External IPs.
    for ip in &sp.external_ips {
        if has_endpoints {
            out.entry(
                Root::NatServices,
                Key::Addr(*ip),
                format_args!(
                    "-m comment --comment \"{name} external IP\" {p} -d {ip} --dport {port} -j {}",
                    chains.external
                ),
            );
        }
        if !has_external {
            out.entry(Root::FilterExternal, Key::Addr(*ip),
                format_args!(
                    "-m comment --comment \"{ext_comment}\" {p} -d {ip} --dport {port} -j {ext_target}"
                ),
            );
        }
    }

    // Load-balancer ingress IPs.
    for ip in &sp.load_balancer_ips {
        if has_endpoints {
            out.entry(Root::NatServices, Key::Addr(*ip),
                format_args!(
                    "-m comment --comment \"{name} loadbalancer IP\" {p} -d {ip} --dport {port} -j {lb_chain}"
                ),
            );
        }
        if uses_fw_chain {
            out.entry(Root::FilterFirewall, Key::Addr(*ip),
                format_args!(
                    "-m comment --comment \"{name} traffic not accepted by {}\" {p} -d {ip} --dport {port} -j DROP",
                    chains.firewall
                ),
            );
        }
    }
    if !has_external {
        for ip in &sp.load_balancer_ips {
            out.entry(Root::FilterExternal, Key::Addr(*ip),
                format_args!(
                    "-m comment --comment \"{ext_comment}\" {p} -d {ip} --dport {port} -j {ext_target}"
                ),
            );
        }
    }

    // NodePort. (NodePorts are not subject to loadBalancerSourceRanges, as upstream.)
    let node_port = sp.port.node_port;
    if node_port != 0 {
        if has_endpoints {
            // Connections to the NodePort on 127.0.0.0/8 are counted first (upstream's
            // localhost NodePort counter), then take the same way as the others.
            if cfg.localhost_nodeports && cfg.family == IpFamily::V4 {
                let count = counting(cfg, nfacct::LOCALHOST_NODEPORTS);
                if !count.is_empty() {
                    out.entry(
                        Root::NatNodePorts,
                        Key::Port(sp.name.protocol, node_port),
                        format_args!(
                            "-d 127.0.0.0/8 -m comment --comment {name} {p} --dport {node_port}{count} -j {}",
                            chains.external
                        ),
                    );
                }
            }
            out.entry(
                Root::NatNodePorts,
                Key::Port(sp.name.protocol, node_port),
                format_args!(
                    "-m comment --comment {name} {p} --dport {node_port} -j {}",
                    chains.external
                ),
            );
        }
        if !has_external {
            out.entry(Root::FilterExternal, Key::Port(sp.name.protocol, node_port),
                format_args!(
                    "-m comment --comment \"{ext_comment}\" -m addrtype --dst-type LOCAL {p} --dport {node_port} -j {ext_target}"
                ),
            );
        }
    }

    // Health-check NodePort: accepted whether or not there are local endpoints, for hosts with
    // restrictive firewalls.
    if svc.health_check_node_port != 0 {
        out.entry(Root::FilterNodePorts, Key::Port(Protocol::Tcp, svc.health_check_node_port),
            format_args!(
                "-m comment --comment \"{name} health check node port\" -m tcp -p tcp --dport {} -j ACCEPT",
                svc.health_check_node_port
            ),
        );
    }

    // Masquerade traffic to the cluster IP that does not come from a pod: it may have been
    // routed to this node from elsewhere, and the reply must come back through us.
    if has_internal {
        let masq_args = format!(
            "-m comment --comment \"{name} cluster IP\" {p} -d {cluster_ip} --dport {port}"
        );
        if cfg.masquerade_all {
            out.nat.rule(
                internal_chain,
                format_args!("{masq_args} -j {KUBE_MARK_MASQ}"),
            );
        } else if let Some(not_local) = cfg.local.if_not_local() {
            out.nat.rule(
                internal_chain,
                format_args!("{masq_args} {not_local} -j {KUBE_MARK_MASQ}"),
            );
        }
    }

    // External destinations.
    if uses_external_chain {
        out.nat.chain(&chains.external);
        let ext = &chains.external;
        if !policies.external_local {
            // Cluster policy may cross nodes: masquerade so replies come back through us.
            out.nat.rule(
                ext,
                format_args!(
                    "-m comment --comment \"masquerade traffic for {name} external destinations\" -j {KUBE_MARK_MASQ}"
                ),
            );
        } else {
            // Local policy keeps the client's address, except for two special cases that
            // behave as if they went out to a load balancer and came back: pods (not subject to
            // the policy at all) and the node itself (its source would be the external address).
            if let Some(local) = cfg.local.if_local() {
                out.nat.rule(
                    ext,
                    format_args!(
                        "-m comment --comment \"pod traffic for {name} external destinations\" {local} -j {}",
                        chains.cluster
                    ),
                );
            }
            out.nat.rule(
                ext,
                format_args!(
                    "-m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}"
                ),
            );
            out.nat.rule(
                ext,
                format_args!(
                    "-m comment --comment \"route LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {}",
                    chains.cluster
                ),
            );
        }
        if has_external {
            out.nat
                .rule(ext, format_args!("-j {external_policy_chain}"));
        }
    }

    // loadBalancerSourceRanges: allowed sources continue to the external chain; the rest fall
    // through un-DNATed and are dropped by KUBE-PROXY-FIREWALL.
    if uses_fw_chain {
        let fw = &chains.firewall;
        out.nat.chain(fw);
        for cidr in &sp.source_ranges {
            out.nat.rule(
                fw,
                format_args!(
                    "-m comment --comment \"{name} loadbalancer IP\" -s {cidr} -j {}",
                    chains.external
                ),
            );
        }
        // A node reaching its own LB IP may see that IP as the source (the VIP is often a
        // local address): allow it when a range admits the node.
        if sp
            .source_ranges
            .iter()
            .any(|r| cfg.node_ips.iter().any(|ip| r.contains(ip)))
        {
            for ip in &sp.load_balancer_ips {
                out.nat.rule(
                    fw,
                    format_args!(
                        "-m comment --comment \"{name} loadbalancer IP\" -s {ip} -j {}",
                        chains.external
                    ),
                );
            }
        }
        out.nat.rule(
            fw,
            format_args!(
                "-m comment --comment \"other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL\""
            ),
        );
    }

    if uses_cluster_chain {
        write_policy_chain(
            out,
            &name,
            &chains.cluster,
            &sp.name,
            &cat.cluster,
            svc.session_affinity_timeout,
        );
    }
    if uses_local_chain {
        write_policy_chain(
            out,
            &name,
            &chains.local,
            &sp.name,
            &cat.local,
            svc.session_affinity_timeout,
        );
    }

    // Endpoint chains.
    for ep in &cat.all_reachable {
        let chain = endpoint_chain(&sp.name, ep);
        out.nat.chain(&chain);
        // Hairpin: an endpoint reaching itself through the service must be masqueraded, or it
        // would answer itself directly and the client side would never see the reply.
        out.nat.rule(
            &chain,
            format_args!(
                "-m comment --comment {name} -s {} -j {KUBE_MARK_MASQ}",
                ep.ip
            ),
        );
        let affinity = if svc.session_affinity_timeout.is_some() {
            format!(" -m recent --name {chain} --set")
        } else {
            String::new()
        };
        out.nat.rule(
            &chain,
            format_args!(
                "-m comment --comment {name}{affinity} {p} -j DNAT --to-destination {}",
                join_host_port(&ep.ip, ep.port.get())
            ),
        );
    }
}

fn write_policy_chain(
    out: &mut ServiceRules,
    name: &str,
    chain: &str,
    spn: &crate::model::ServicePortName,
    endpoints: &[&crate::model::Endpoint],
    affinity_timeout: Option<u32>,
) {
    out.nat.chain(chain);
    if let Some(timeout) = affinity_timeout {
        for ep in endpoints {
            let ep_chain = endpoint_chain(spn, ep);
            out.nat.rule(
                chain,
                format_args!(
                    "-m comment --comment \"{name} -> {}\" -m recent --name {ep_chain} --rcheck --seconds {timeout} --reap -j {ep_chain}",
                    join_host_port(&ep.ip, ep.port.get())
                ),
            );
        }
    }
    let n = endpoints.len();
    for (i, ep) in endpoints.iter().enumerate() {
        let ep_chain = endpoint_chain(spn, ep);
        let dest = join_host_port(&ep.ip, ep.port.get());
        if i + 1 < n {
            out.nat.rule(
                chain,
                format_args!(
                    "-m comment --comment \"{name} -> {dest}\" -m statistic --mode random --probability {} -j {ep_chain}",
                    probability(n - i)
                ),
            );
        } else {
            out.nat.rule(
                chain,
                format_args!("-m comment --comment \"{name} -> {dest}\" -j {ep_chain}"),
            );
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::LocalDetector;
    use crate::model::ChangeSet;
    use crate::xtables::KUBE_SERVICES;

    pub(crate) fn cfg() -> RenderConfig {
        RenderConfig {
            family: IpFamily::V4,
            node_name: "node-a".into(),
            local: LocalDetector::Cidr("10.0.0.0/8".parse().unwrap()),
            masquerade_all: false,
            masquerade_mark: 0x4000,
            nodeport_ips: None,
            conntrack_tcp_be_liberal: false,
            node_ips: vec!["192.168.0.2".parse().unwrap()],
            localhost_nodeports: false,
            nfacct: Vec::new(),
        }
    }

    /// A state with one service `ns/svc` (port `p`, TCP 80, NodePort 30080) and endpoints
    /// given as (ip, node, ready).
    fn state(svc_extra: &str, eps: &[(&str, &str, bool)]) -> State {
        let endpoints: Vec<String> = eps
            .iter()
            .map(|(ip, node, ready)| {
                format!(
                    r#"{{"ip":"{ip}","port":8080,"ready":{ready},"serving":{ready},"terminating":false,"node_name":"{node}"}}"#
                )
            })
            .collect();
        let json = format!(
            r#"{{"services":[{{"namespace":"ns","name":"svc","service":{{"cluster_ips":["172.30.0.1"],
                 "externally_accessible":true,{svc_extra}
                 "ports":[{{"name":"p","protocol":"TCP","port":80,"node_port":30080}}]}}}}],
               "endpoints":[{{"namespace":"ns","name":"svc","ports":[{{"name":"p","protocol":"TCP",
                 "endpoints":[{}]}}]}}]}}"#,
            endpoints.join(",")
        );
        let mut st = State::new(IpFamily::V4);
        st.apply(ChangeSet::from_json(json.as_bytes()).unwrap());
        st
    }

    fn rules_of<'a>(t: &'a Table, chain: &str) -> Vec<&'a str> {
        let prefix = format!("-A {chain} ");
        t.rules
            .lines()
            .filter_map(|l| l.strip_prefix(prefix.as_str()))
            .collect()
    }

    /// The rules reachable from a shared chain through its bucket chains, leaves inlined.
    fn dispatched<'a>(t: &'a Table, chain: &str) -> Vec<&'a str> {
        let mut out = Vec::new();
        for r in rules_of(t, chain) {
            match r.split("-j ").nth(1) {
                Some(target)
                    if super::super::dispatch::BUCKET_PREFIXES
                        .iter()
                        .any(|p| target.starts_with(p)) =>
                {
                    out.extend(dispatched(t, target))
                }
                _ => out.push(r),
            }
        }
        out
    }

    fn chain_with(t: &Table, prefix: &str) -> String {
        t.chains
            .iter()
            .find(|c| c.starts_with(prefix))
            .cloned()
            .unwrap_or_else(|| panic!("no chain {prefix}*"))
    }

    #[test]
    fn spreads_over_endpoints_with_decreasing_probabilities() {
        let st = state(
            "",
            &[
                ("10.1.0.1", "n", true),
                ("10.1.0.2", "n", true),
                ("10.1.0.3", "n", true),
                ("10.1.0.4", "n", true),
            ],
        );
        let rs = render(&st, &cfg());
        let svc = chain_with(&rs.nat, "KUBE-SVC-");
        let rules = rules_of(&rs.nat, &svc);
        let probs: Vec<&str> = rules
            .iter()
            .filter_map(|r| r.split("--probability ").nth(1))
            .map(|r| r.split(' ').next().unwrap())
            .collect();
        assert_eq!(probs, ["0.2500000000", "0.3333333333", "0.5000000000"]);
        // The last endpoint is an unconditional jump.
        assert!(rules.last().unwrap().contains("-j KUBE-SEP-"));
        assert!(!rules.last().unwrap().contains("statistic"));
        assert_eq!(rs.counts.endpoints, 4);
    }

    #[test]
    fn masquerades_off_cluster_traffic_and_hairpin() {
        let st = state("", &[("10.1.0.1", "n", true)]);
        let rs = render(&st, &cfg());
        let svc = chain_with(&rs.nat, "KUBE-SVC-");
        assert!(rules_of(&rs.nat, &svc)[0].ends_with("! -s 10.0.0.0/8 -j KUBE-MARK-MASQ"));
        let sep = chain_with(&rs.nat, "KUBE-SEP-");
        let sep_rules = rules_of(&rs.nat, &sep);
        assert!(sep_rules[0].ends_with("-s 10.1.0.1 -j KUBE-MARK-MASQ"));
        assert!(sep_rules[1].ends_with("-m tcp -p tcp -j DNAT --to-destination 10.1.0.1:8080"));

        let mut all = cfg();
        all.masquerade_all = true;
        let rs = render(&st, &all);
        assert!(rules_of(&rs.nat, &svc)[0].ends_with("--dport 80 -j KUBE-MARK-MASQ"));

        let mut none = cfg();
        none.local = LocalDetector::None;
        let rs = render(&st, &none);
        assert!(rules_of(&rs.nat, &svc)
            .iter()
            .all(|r| !r.contains("KUBE-MARK-MASQ")));
    }

    #[test]
    fn no_endpoints_rejects_and_writes_no_nat_rules() {
        let st = state("", &[]);
        let rs = render(&st, &cfg());
        let filter_services = dispatched(&rs.filter, KUBE_SERVICES);
        assert_eq!(filter_services.len(), 1);
        assert!(filter_services[0].contains("\"ns/svc:p has no endpoints\""));
        assert!(filter_services[0]
            .ends_with("-d 172.30.0.1 --dport 80 -j REJECT --reject-with tcp-reset"));
        let ext = dispatched(&rs.filter, KUBE_EXTERNAL_SERVICES);
        assert!(ext[0].ends_with(
            "--dst-type LOCAL -m tcp -p tcp --dport 30080 -j REJECT --reject-with tcp-reset"
        ));
        assert!(!rs.nat.chains.iter().any(|c| is_service_chain(c)));
        // Not-ready endpoints are no endpoints.
        let rs = render(&state("", &[("10.1.0.1", "n", false)]), &cfg());
        assert_eq!(dispatched(&rs.filter, KUBE_SERVICES).len(), 1);
    }

    #[test]
    fn node_port_goes_through_the_external_chain_with_masquerade() {
        let st = state("", &[("10.1.0.1", "n", true)]);
        let rs = render(&st, &cfg());
        let ext = chain_with(&rs.nat, "KUBE-EXT-");
        let np = dispatched(&rs.nat, KUBE_NODEPORTS);
        assert_eq!(np.len(), 1);
        assert!(np[0].ends_with(&format!("--dport 30080 -j {ext}")));
        let ext_rules = rules_of(&rs.nat, &ext);
        assert!(ext_rules[0].ends_with("-j KUBE-MARK-MASQ"));
        assert!(ext_rules[1].starts_with("-j KUBE-SVC-"));
        // The NodePort dispatch stays the last rule of KUBE-SERVICES.
        let services = dispatched(&rs.nat, KUBE_SERVICES);
        assert!(services
            .last()
            .unwrap()
            .ends_with("! -d 127.0.0.0/8 -j KUBE-NODEPORTS"));
    }

    #[test]
    fn nodeport_addresses_restrict_the_dispatch() {
        let st = state("", &[("10.1.0.1", "n", true)]);
        let mut c = cfg();
        c.nodeport_ips = Some(vec![
            "192.168.0.2".parse().unwrap(),
            "127.0.0.1".parse().unwrap(),
            "fd00::1".parse().unwrap(),
        ]);
        let rs = render(&st, &c);
        let tail: Vec<&str> = dispatched(&rs.nat, KUBE_SERVICES)
            .into_iter()
            .filter(|r| r.contains("KUBE-NODEPORTS"))
            .collect();
        assert_eq!(tail.len(), 1);
        assert!(tail[0].ends_with("-d 192.168.0.2 -j KUBE-NODEPORTS"));
    }

    #[test]
    fn external_local_short_circuits_pods_and_the_node_and_drops_without_local_endpoints() {
        let st = state(
            r#""external_traffic_policy":"Local","#,
            &[("10.1.0.1", "node-a", true), ("10.1.0.2", "node-b", true)],
        );
        let rs = render(&st, &cfg());
        let ext = chain_with(&rs.nat, "KUBE-EXT-");
        let svl = chain_with(&rs.nat, "KUBE-SVL-");
        let svc = chain_with(&rs.nat, "KUBE-SVC-");
        let r = rules_of(&rs.nat, &ext);
        assert!(r[0].ends_with(&format!("-s 10.0.0.0/8 -j {svc}")));
        assert!(r[1].ends_with("--src-type LOCAL -j KUBE-MARK-MASQ"));
        assert!(r[2].ends_with(&format!("--src-type LOCAL -j {svc}")));
        assert_eq!(r[3], format!("-j {svl}"));
        // Only the local endpoint behind the local chain.
        let local = rules_of(&rs.nat, &svl);
        assert_eq!(local.len(), 1);
        assert!(local[0].contains("10.1.0.1:8080"));

        let st = state(
            r#""external_traffic_policy":"Local","#,
            &[("10.1.0.2", "node-b", true)],
        );
        let rs = render(&st, &cfg());
        assert_eq!(rs.counts.no_local_external, 1);
        let drop = dispatched(&rs.filter, KUBE_EXTERNAL_SERVICES);
        assert!(drop[0].contains("has no local endpoints") && drop[0].ends_with("-j DROP"));
        // The external chain still exists for the short-circuits, without a policy jump.
        let ext = chain_with(&rs.nat, "KUBE-EXT-");
        assert_eq!(rules_of(&rs.nat, &ext).len(), 3);
    }

    #[test]
    fn internal_local_without_local_endpoints_drops_cluster_ip_traffic() {
        let st = state(
            r#""internal_traffic_policy":"Local","#,
            &[("10.1.0.2", "node-b", true)],
        );
        let rs = render(&st, &cfg());
        let f = dispatched(&rs.filter, KUBE_SERVICES);
        assert!(f[0].contains("has no local endpoints") && f[0].ends_with("-j DROP"));
        assert_eq!(rs.counts.no_local_internal, 1);
    }

    #[test]
    fn session_affinity_checks_and_sets_recent_lists() {
        let st = state(
            r#""session_affinity_timeout":300,"#,
            &[("10.1.0.1", "n", true), ("10.1.0.2", "n", true)],
        );
        let rs = render(&st, &cfg());
        let svc = chain_with(&rs.nat, "KUBE-SVC-");
        let rules = rules_of(&rs.nat, &svc);
        let checks: Vec<&&str> = rules
            .iter()
            .filter(|r| r.contains("--rcheck --seconds 300 --reap"))
            .collect();
        assert_eq!(checks.len(), 2);
        let sep = chain_with(&rs.nat, "KUBE-SEP-");
        assert!(rules_of(&rs.nat, &sep)[1].contains(&format!("-m recent --name {sep} --set")));
    }

    #[test]
    fn invalid_drop_is_skipped_when_tcp_be_liberal() {
        let st = state("", &[]);
        let mut c = cfg();
        assert!(rules_of(&render(&st, &c).filter, KUBE_FORWARD)[0].contains("INVALID -j DROP"));
        c.conntrack_tcp_be_liberal = true;
        assert!(rules_of(&render(&st, &c).filter, KUBE_FORWARD)
            .iter()
            .all(|r| !r.contains("INVALID")));
    }

    #[test]
    fn stale_chains_are_flushed_then_deleted_after_the_rules() {
        let st = state("", &[]);
        let rs = render(&st, &cfg());
        let stale: BTreeSet<String> = ["KUBE-SVC-OLD".to_string()].into();
        let text = rs.restore_text(&stale);
        let decl = text.find(":KUBE-SVC-OLD - [0:0]").unwrap();
        let del = text.find("-X KUBE-SVC-OLD").unwrap();
        let commit = text.rfind("COMMIT").unwrap();
        assert!(decl < del && del < commit);
        assert!(text.find("*nat").unwrap() < decl);
    }
}
