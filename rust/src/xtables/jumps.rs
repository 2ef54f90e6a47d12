//! Jump rules: the rules in the built-in chains that send traffic into chains of ours (the
//! iptables mode's and the ipvs mode's), and the targets that are not chains.

use super::{KUBE_FORWARD, KUBE_POSTROUTING, KUBE_SERVICES};

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
        $crate::xtables::jumps::Jump {
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
        $crate::xtables::jumps::Jump {
            table: $table,
            from: $from,
            to: $to,
            args: &["-m", "comment", "--comment", $comment],
        }
    };
}
pub(crate) use jump;

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

// The hooks both modes put in the built-in chains (each mode's list names them in the order
// upstream ensures them).

/// nat OUTPUT to the Service portals (traffic from the node itself).
pub const PORTALS_FROM_OUTPUT: Jump =
    jump!("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals");
/// nat PREROUTING to the Service portals (traffic from the network and from pods).
pub const PORTALS_FROM_PREROUTING: Jump = jump!(
    "nat",
    "PREROUTING",
    KUBE_SERVICES,
    "kubernetes service portals"
);
/// nat POSTROUTING to the masquerade chain.
pub const POSTROUTING: Jump = jump!(
    "nat",
    "POSTROUTING",
    KUBE_POSTROUTING,
    "kubernetes postrouting rules"
);
/// filter FORWARD to the forwarding accept rules.
pub const FORWARD: Jump = jump!(
    "filter",
    "FORWARD",
    KUBE_FORWARD,
    "kubernetes forwarding rules"
);
