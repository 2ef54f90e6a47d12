//! Fixed chain names and the jump rules from the built-in chains, as upstream has them.

pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
/// Anti-martian drop for localhost NodePorts (a copy of kubelet's chain, as upstream).
pub const KUBE_FIREWALL: &str = "KUBE-FIREWALL";

/// An empty chain in each table whose disappearance means someone flushed our rules (a
/// firewall reload, an administrator): its absence forces a full sync.
pub const CANARY: &str = "KUBE-PROXY-CANARY";
pub const CANARY_TABLES: &[&str] = &["mangle", "nat", "filter"];

/// Chains of the filter table that every ruleset declares (and so flushes and rewrites).
pub const FILTER_CHAINS: &[&str] = &[
    KUBE_EXTERNAL_SERVICES,
    KUBE_FORWARD,
    KUBE_NODEPORTS,
    KUBE_PROXY_FIREWALL,
    KUBE_SERVICES,
];

/// Fixed chains of the nat table.
pub const NAT_CHAINS: &[&str] = &[
    KUBE_MARK_MASQ,
    KUBE_NODEPORTS,
    KUBE_POSTROUTING,
    KUBE_SERVICES,
];

/// Targets that are not chains (the ones kproxy's rules use).
pub const BUILTIN_TARGETS: &[&str] = &[
    "ACCEPT",
    "DROP",
    "REJECT",
    "RETURN",
    "DNAT",
    "SNAT",
    "MASQUERADE",
    "MARK",
];

/// Prefixes of per-service and per-endpoint nat chains (what a stale-chain sweep may delete).
pub const SERVICE_CHAIN_PREFIXES: &[&str] = &[
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
];

pub fn is_service_chain(name: &str) -> bool {
    SERVICE_CHAIN_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Chains that come and go with Services: per-service chains and dispatch buckets.
pub fn is_dynamic_chain(name: &str) -> bool {
    is_service_chain(name)
        || super::dispatch::BUCKET_PREFIXES
            .iter()
            .any(|p| name.starts_with(p))
}

/// A rule in a built-in chain that sends traffic into one of ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Jump {
    pub table: &'static str,
    pub from: &'static str,
    pub to: &'static str,
    /// Match arguments before `-j`, including the comment (fixed text, never user input).
    pub args: &'static [&'static str],
}

const NEW: &[&str] = &["-m", "conntrack", "--ctstate", "NEW"];

/// A [`Jump`] with a comment (and, with `new`, only for new connections).
macro_rules! jump {
    ($table:expr, $from:expr, $to:expr, $comment:expr, new) => {
        $crate::iptables::chains::Jump {
            table: $table,
            from: $from,
            to: $to,
            args: &[
                "-m",
                "comment",
                "--comment",
                $comment,
                "-m",
                "conntrack",
                "--ctstate",
                "NEW",
            ],
        }
    };
    ($table:expr, $from:expr, $to:expr, $comment:expr) => {
        $crate::iptables::chains::Jump {
            table: $table,
            from: $from,
            to: $to,
            args: &["-m", "comment", "--comment", $comment],
        }
    };
}
pub(crate) use jump;

/// Upstream's `iptablesJumpChains`, in the order it ensures them.
pub const JUMPS: &[Jump] = &[
    jump!(
        "filter",
        "INPUT",
        KUBE_EXTERNAL_SERVICES,
        "kubernetes externally-visible service portals",
        new
    ),
    jump!(
        "filter",
        "FORWARD",
        KUBE_EXTERNAL_SERVICES,
        "kubernetes externally-visible service portals",
        new
    ),
    jump!(
        "filter",
        "INPUT",
        KUBE_NODEPORTS,
        "kubernetes health check service ports"
    ),
    jump!(
        "filter",
        "FORWARD",
        KUBE_SERVICES,
        "kubernetes service portals",
        new
    ),
    jump!(
        "filter",
        "OUTPUT",
        KUBE_SERVICES,
        "kubernetes service portals",
        new
    ),
    jump!(
        "filter",
        "FORWARD",
        KUBE_FORWARD,
        "kubernetes forwarding rules"
    ),
    jump!(
        "filter",
        "INPUT",
        KUBE_PROXY_FIREWALL,
        "kubernetes load balancer firewall",
        new
    ),
    jump!(
        "filter",
        "OUTPUT",
        KUBE_PROXY_FIREWALL,
        "kubernetes load balancer firewall",
        new
    ),
    jump!(
        "filter",
        "FORWARD",
        KUBE_PROXY_FIREWALL,
        "kubernetes load balancer firewall",
        new
    ),
    jump!("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    jump!(
        "nat",
        "PREROUTING",
        KUBE_SERVICES,
        "kubernetes service portals"
    ),
    jump!(
        "nat",
        "POSTROUTING",
        KUBE_POSTROUTING,
        "kubernetes postrouting rules"
    ),
];

/// Jumps to the anti-martian chain, present only with localhost NodePorts (IPv4).
pub const FIREWALL_JUMPS: &[Jump] = &[
    jump!(
        "filter",
        "INPUT",
        KUBE_FIREWALL,
        "kubernetes firewall for dropping marked packets"
    ),
    jump!(
        "filter",
        "OUTPUT",
        KUBE_FIREWALL,
        "kubernetes firewall for dropping marked packets"
    ),
];

impl Jump {
    /// The rule as iptables arguments after the chain name: `<args> -j <to>`.
    pub fn rule_args(&self) -> Vec<&'static str> {
        let mut v = self.args.to_vec();
        v.push("-j");
        v.push(self.to);
        v
    }

    /// The rule as iptables-save prints it after the chain name (arguments with spaces
    /// quoted).
    pub fn rule_text(&self) -> String {
        self.rule_args()
            .iter()
            .map(|a| {
                if a.contains(' ') {
                    format!("\"{a}\"")
                } else {
                    (*a).to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Whether the rule matches on conntrack state NEW (for the tracer and tests).
    pub fn new_only(&self) -> bool {
        self.args.windows(NEW.len()).any(|w| w == NEW)
    }
}

/// `jumps` as `iptables-restore --noflush` input appending them to the built-in chains (for
/// an empty namespace: `ensure_jumps` is what keeps them unique on a node).
pub fn restore_text(jumps: &[Jump]) -> String {
    let mut out = String::new();
    for table in ["nat", "filter"] {
        let mine: Vec<&Jump> = jumps.iter().filter(|j| j.table == table).collect();
        if mine.is_empty() {
            continue;
        }
        out.push_str(&format!("*{table}\n"));
        for j in mine {
            out.push_str(&format!("-A {} {}\n", j.from, j.rule_text()));
        }
        out.push_str("COMMIT\n");
    }
    out
}
