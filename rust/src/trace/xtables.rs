//! A packet tracer over iptables rules: where does the first packet of a new connection go?
//!
//! [`Ruleset::parse`] reads `iptables-save` output (the kernel's normalized form) or
//! `iptables-restore` input (kproxy's own rendering, with `:CHAIN` declarations, `-X`, `-I`),
//! for any number of tables. [`trace`] then walks a [`Packet`] through them, starting from the
//! built-in chains so that the jump rules are exercised too:
//!
//! 1. nat `PREROUTING` (a packet from the network) or nat `OUTPUT` (a packet generated on the
//!    node). Every DNAT target a path reaches is collected.
//! 2. If a DNAT happened, the destination becomes the first target (address and port).
//! 3. filter `INPUT` (to a local address, from the network), `OUTPUT` (generated on the node)
//!    or `FORWARD` (anything else), until a verdict.
//!
//! nat `POSTROUTING` is not walked: [`Trace::masquerade`] (the masquerade mark was set) stands
//! for the SNAT it would do.
//!
//! # The model
//!
//! Like upstream kube-proxy's test tracer, this models the *first packet of a new
//! connection*, and explores every path rather than picking one:
//!
//! * a `-m statistic` rule "may match": its target is followed, and then the walk continues
//!   with the next rule as if it had not matched, so every endpoint of a Service is found;
//! * a jump to a user chain recurses; if the sub-chain ended in a terminal action (DNAT, a
//!   verdict) and the jump was not probabilistic, the walk stops there; `RETURN` and falling off
//!   the end of a chain return to the caller; `-g` (goto) returns to the caller's caller;
//! * `-m conntrack --ctstate` / `-m state --state` match iff the list contains `NEW`;
//! * `-m recent --set` matches (and records nothing); `--rcheck`, `--update` and `--remove`
//!   never match: there is no history for a first packet;
//! * `-m mark` sees a mark that starts at 0 and is changed by `MARK` targets (and by jumps to
//!   `KUBE-MARK-MASQ`) along the path. What a statistic rule's target does to the mark does not
//!   carry over to the rules after it (that is the other path); the filter walk continues the
//!   path of the first DNAT, with its mark. [`Trace::masquerade`] is set if *any* path set the
//!   masquerade mark;
//! * `-m addrtype` knows `LOCAL` ([`NodeFacts::local_ips`], `127.0.0.0/8` and `::1`) and, as
//!   approximations, `UNICAST` (not local, multicast or broadcast), `MULTICAST` and
//!   `BROADCAST`;
//! * `-m set --match-set NAME dims` looks the packet up in [`NodeFacts::sets`] (a set not
//!   given is empty; a source port is never known); `-m physdev --physdev-is-in` never
//!   matches (bridges are not modelled);
//! * `-i`/`-o` (interfaces) are not modelled: a rule naming an interface never matches, with or
//!   without `!`;
//! * addresses may be `a.b.c.d`, a CIDR or an address with a netmask, contiguous or not
//!   (`0.0.0.5/0.0.0.15` matches iff `addr & mask == value & mask`); a rule with an address of
//!   the other IP family never matches, with or without `!`;
//! * any other match module, option or target makes the rule never match; when its supported
//!   matches all hold (so it might have applied), [`Trace::matched`] gets an
//!   `unsupported: ...` note naming it;
//! * built-in chain policies are not applied: falling off a built-in chain gives no verdict.
//!   An explicit `ACCEPT`, `DROP` or `REJECT` rule in the filter table ends the walk with that
//!   verdict; `ACCEPT` in the nat table ends the nat walk without one.
//!
//! Parsing is strict about structure (unknown line kinds, unterminated quotes, bad addresses,
//! ports and marks are [`Error::InvalidInput`] naming the line) and lenient about content
//! (unknown modules parse, and the rules that use them never match). Comments are ignored;
//! an unquoted comment with spaces (as `Fake::dump` prints the jump rules) is
//! accepted too.

use super::{NodeFacts, Origin, Packet, Reason, Trace, Verdict};
use crate::error::Error;
use crate::model::Protocol;
use crate::naming::join_host_port;
use crate::xtables::jumps::{Jump, BUILTIN_TARGETS};
use crate::xtables::KUBE_MARK_MASQ;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The mark `KUBE-MARK-MASQ` sets when the ruleset does not say (`1 << 14`, upstream's
/// default `--iptables-masquerade-bit`).
const DEFAULT_MASQ_MARK: u32 = 0x4000;

/// How deep jumps may nest before the walk gives up (iptables itself refuses loops; a parsed
/// text may still contain one).
const MAX_DEPTH: usize = 64;

/// Names of built-in chains (in whatever table they occur).
const BUILTIN_CHAINS: &[&str] = &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

// ---------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------

/// Parsed iptables tables: table -> chain -> rules, in order.
#[derive(Clone, Debug, Default)]
pub struct Ruleset {
    tables: BTreeMap<String, BTreeMap<String, Vec<Rule>>>,
}

impl Ruleset {
    /// Parse `iptables-save` output or `iptables-restore` input. Lines are `*table`,
    /// `:CHAIN POLICY [counters]` (declaring a user chain, `-`, creates or flushes it),
    /// `-A`, `-I [n]`, `-N`, `-F`, `-X`, `-P`, `-Z`, `COMMIT`, comments and blank lines;
    /// anything else is [`Error::InvalidInput`] naming the line. The same table may occur
    /// more than once: later sections change what earlier ones built, as `--noflush` would.
    pub fn parse(text: &str) -> Result<Ruleset, Error> {
        let mut rs = Ruleset::default();
        let mut table: Option<String> = None;
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let err = |msg: String| {
                Error::InvalidInput(format!("iptables rules line {n}: {msg}: {raw:?}"))
            };
            let mut line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('*') {
                let name = name.trim();
                if name.is_empty() || name.contains(char::is_whitespace) {
                    return Err(err("bad table name".into()));
                }
                rs.tables.entry(name.to_owned()).or_default();
                table = Some(name.to_owned());
                continue;
            }
            if line == "COMMIT" {
                if table.take().is_none() {
                    return Err(err("COMMIT outside a table".into()));
                }
                continue;
            }
            let Some(tname) = table.as_deref() else {
                return Err(err("outside a table (no *table line before it)".into()));
            };
            let chains = rs.tables.entry(tname.to_owned()).or_default();
            if let Some(decl) = line.strip_prefix(':') {
                let mut words = decl.split_whitespace();
                let (Some(name), Some(policy)) = (words.next(), words.next()) else {
                    return Err(err("a chain declaration needs a name and a policy".into()));
                };
                let rules = chains.entry(name.to_owned()).or_default();
                if policy == "-" {
                    // A user chain: iptables-restore creates it or flushes it.
                    rules.clear();
                }
                continue;
            }
            // `iptables-save -c` prefixes rules with `[packets:bytes]`.
            if line.starts_with('[') {
                match line.find(']') {
                    Some(end) => line = line[end + 1..].trim_start(),
                    None => return Err(err("unterminated counters".into())),
                }
            }
            let (cmd, rest) = split_word(line);
            let (chain, rest) = split_word(rest);
            match cmd {
                "-A" | "--append" | "-I" | "--insert" => {
                    if chain.is_empty() {
                        return Err(err(format!("{cmd} needs a chain")));
                    }
                    let (pos, rest) = if cmd.starts_with("-I") || cmd == "--insert" {
                        let (w, after) = split_word(rest);
                        match w.parse::<usize>() {
                            Ok(p) if p >= 1 => (Some(p - 1), after),
                            Ok(_) => return Err(err("rule numbers start at 1".into())),
                            Err(_) => (Some(0), rest),
                        }
                    } else {
                        (None, rest)
                    };
                    let tokens = tokenize(rest).map_err(&err)?;
                    let rule = Rule::parse(&tokens, rest.to_owned()).map_err(&err)?;
                    let rules = chains.entry(chain.to_owned()).or_default();
                    match pos {
                        Some(p) => rules.insert(p.min(rules.len()), rule),
                        None => rules.push(rule),
                    }
                }
                "-N" | "--new-chain" if !chain.is_empty() => {
                    chains.entry(chain.to_owned()).or_default();
                }
                "-P" | "--policy" if !chain.is_empty() => {
                    chains.entry(chain.to_owned()).or_default();
                }
                "-F" | "--flush" => {
                    if chain.is_empty() {
                        chains.values_mut().for_each(Vec::clear);
                    } else if let Some(rules) = chains.get_mut(chain) {
                        rules.clear();
                    }
                }
                "-X" | "--delete-chain" => {
                    if chain.is_empty() {
                        chains.retain(|name, _| BUILTIN_CHAINS.contains(&name.as_str()));
                    } else {
                        chains.remove(chain);
                    }
                }
                "-Z" | "--zero" => {}
                _ => return Err(err("not an iptables-save/restore line".into())),
            }
        }
        Ok(rs)
    }

    /// Add jump rules from built-in chains the way [`crate::xtables::Backend::ensure_jumps`] does: each
    /// one not already present is inserted at the top of its chain, in order. For tracing
    /// restore text, which does not contain them.
    pub fn add_jumps(&mut self, jumps: &[Jump]) -> Result<(), Error> {
        for j in jumps {
            let tokens: Vec<String> = j.rule_args().iter().map(|s| (*s).to_owned()).collect();
            let text = tokens
                .iter()
                .map(|t| quote(t))
                .collect::<Vec<_>>()
                .join(" ");
            let rule = Rule::parse(&tokens, text)
                .map_err(|e| Error::InvalidInput(format!("jump {} -> {}: {e}", j.from, j.to)))?;
            let rules = self
                .tables
                .entry(j.table.to_owned())
                .or_default()
                .entry(j.from.to_owned())
                .or_default();
            if !rules.iter().any(|r| r.text == rule.text) {
                rules.insert(0, rule);
            }
        }
        Ok(())
    }

    /// The rules of one chain as text (what follows `-A CHAIN`), or `None` if the chain does
    /// not exist.
    pub fn rules(&self, table: &str, chain: &str) -> Option<Vec<&str>> {
        let rules = self.tables.get(table)?.get(chain)?;
        Some(rules.iter().map(|r| r.text.as_str()).collect())
    }

    fn chain(&self, table: &str, chain: &str) -> Option<&[Rule]> {
        self.tables.get(table)?.get(chain).map(Vec::as_slice)
    }

    /// The bits `KUBE-MARK-MASQ` sets, from its first `MARK` rule.
    fn masq_mark(&self) -> u32 {
        self.chain("nat", KUBE_MARK_MASQ)
            .into_iter()
            .flatten()
            .find_map(|r| match r.target {
                Target::Mark { value, mask } if value & mask != 0 => Some(value & mask),
                _ => None,
            })
            .unwrap_or(DEFAULT_MASQ_MARK)
    }
}

/// Why a rule with this comment refuses traffic: the comments kube-proxy's iptables layout (and
/// kproxy's, which follows it) gives its DROP and REJECT rules.
fn comment_reason(comment: &str) -> Option<Reason> {
    if comment.ends_with(" has no endpoints") {
        Some(Reason::NoEndpoints)
    } else if comment.ends_with(" has no local endpoints") {
        Some(Reason::NoLocalEndpoints)
    } else if comment.contains(" traffic not accepted by ") {
        Some(Reason::SourceRange)
    } else {
        None
    }
}

/// Trace the first packet of a new connection through nat, then filter (see the module
/// documentation for the model). A verdict given in one of `reasons`' chains has that chain's
/// reason (the ipvs mode names its filter chains); otherwise a rule's comment may give one.
pub fn trace(
    rules: &Ruleset,
    packet: &Packet,
    node: &NodeFacts,
    reasons: &[(&str, Reason)],
) -> Trace {
    let mut w = Walk {
        rules,
        node,
        reasons,
        src: packet.src,
        dst: packet.dst,
        protocol: packet.protocol,
        dport: packet.dport,
        mark: 0,
        masq_mark: rules.masq_mark(),
        first_dnat: None,
        out: Trace::default(),
    };
    let nat_entry = match packet.origin {
        Origin::External => "PREROUTING",
        Origin::Local => "OUTPUT",
    };
    w.chain("nat", nat_entry, 0);
    if let Some((ip, port, mark)) = w.first_dnat {
        w.dst = ip;
        if let Some(p) = port {
            w.dport = p;
        }
        w.mark = mark;
    }
    let filter_entry = match packet.origin {
        Origin::Local => "OUTPUT",
        Origin::External if node.is_local(&w.dst) => "INPUT",
        Origin::External => "FORWARD",
    };
    w.chain("filter", filter_entry, 0);
    w.out
}

// ---------------------------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Rule {
    /// The rule as written after `-A CHAIN`.
    text: String,
    conds: Vec<Cond>,
    /// `-m statistic`: the rule may or may not match.
    random: bool,
    /// What the tracer cannot evaluate; non-empty means the rule never matches.
    unsupported: Vec<String>,
    target: Target,
    /// `-m comment --comment`: kube-proxy's comments say why a rule refuses traffic.
    comment: Option<String>,
}

#[derive(Clone, Debug)]
struct Cond {
    negate: bool,
    test: Test,
}

#[derive(Clone, Debug)]
enum Test {
    Src(AddrMask),
    Dst(AddrMask),
    Proto(ProtoSpec),
    DPort(Vec<(u16, u16)>),
    SrcType(Vec<AddrType>),
    DstType(Vec<AddrType>),
    /// Whether a conntrack/state list contains `NEW`.
    CtNew(bool),
    Mark {
        value: u32,
        mask: u32,
    },
    /// An outcome known in advance for a first packet (`recent`, `-f`, `physdev`: bridges
    /// are not modelled, so a packet never entered through one).
    Fixed(bool),
    /// `-m set --match-set NAME dims`: each dimension from the source (`true`) or not.
    Set {
        name: String,
        from_src: Vec<bool>,
    },
    /// Not modelled (interfaces): false, with or without `!`.
    Never,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum ProtoSpec {
    Any,
    Is(Protocol),
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AddrType {
    Local,
    Unicast,
    Multicast,
    Broadcast,
}

#[derive(Clone, Debug)]
enum Target {
    /// No `-j`: the rule only counts.
    None,
    Verdict(Verdict),
    Return,
    Dnat {
        shown: String,
        ip: IpAddr,
        port: Option<u16>,
    },
    /// SNAT or MASQUERADE.
    Snat,
    /// `mark = (mark & !mask) ^ value`: every MARK form reduces to this (`--set-xmark`).
    Mark {
        value: u32,
        mask: u32,
    },
    /// A user chain, or a target the tracer does not know (decided when walking).
    Jump(String),
    Goto(String),
    /// LOG and friends: no effect on the packet.
    Passive,
}

/// An address and a mask, either of which may be any bit pattern; IPv4 uses the low 32 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct AddrMask {
    v6: bool,
    value: u128,
    mask: u128,
}

fn ip_bits(ip: &IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(a) => (false, u128::from(u32::from(*a))),
        IpAddr::V6(a) => (true, u128::from(*a)),
    }
}

impl AddrMask {
    /// `addr`, `addr/prefix` or `addr/netmask` (the netmask need not be contiguous).
    fn parse(s: &str) -> Result<AddrMask, String> {
        let bad = || format!("bad address {s:?}");
        let (a, m) = match s.split_once('/') {
            Some((a, m)) => (a, Some(m)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let (v6, value) = ip_bits(&addr);
        let width: u32 = if v6 { 128 } else { 32 };
        let all = if v6 { u128::MAX } else { u128::from(u32::MAX) };
        let mask = match m {
            None => all,
            Some(m) => {
                if let Ok(prefix) = m.parse::<u32>() {
                    if prefix > width {
                        return Err(bad());
                    }
                    if prefix == 0 {
                        0
                    } else {
                        all & !((1u128 << (width - prefix)) - 1)
                    }
                } else {
                    let mask: IpAddr = m.parse().map_err(|_| bad())?;
                    let (mv6, bits) = ip_bits(&mask);
                    if mv6 != v6 {
                        return Err(bad());
                    }
                    bits
                }
            }
        };
        Ok(AddrMask { v6, value, mask })
    }

    /// `None` when `ip` is of the other family.
    fn contains(&self, ip: &IpAddr) -> Option<bool> {
        let (v6, bits) = ip_bits(ip);
        (v6 == self.v6).then_some(bits & self.mask == self.value & self.mask)
    }
}

/// Split off the first whitespace-separated word.
fn split_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], s[i..].trim_start()),
        None => (s, ""),
    }
}

/// Split a rule into arguments as iptables-restore does: whitespace separates, double quotes
/// group, a backslash escapes the next character.
fn tokenize(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_token = false;
    let mut quoted = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_token = true;
            }
            '\\' => {
                cur.push(chars.next().ok_or("trailing backslash")?);
                in_token = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_token {
                    out.push(std::mem::take(&mut cur));
                    in_token = false;
                }
            }
            c => {
                cur.push(c);
                in_token = true;
            }
        }
    }
    if quoted {
        return Err("unterminated quote".into());
    }
    if in_token {
        out.push(cur);
    }
    Ok(out)
}

/// Quote an argument for display if it needs it.
fn quote(t: &str) -> String {
    if !t.is_empty() && !t.contains(|c: char| c.is_whitespace() || c == '"' || c == '\\') {
        return t.to_owned();
    }
    let mut s = String::with_capacity(t.len() + 2);
    s.push('"');
    for c in t.chars() {
        if c == '"' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    s
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("bad number {s:?}"))
}

/// `value[/mask]`, the mask defaulting to all ones.
fn parse_value_mask(s: &str) -> Result<(u32, u32), String> {
    match s.split_once('/') {
        Some((v, m)) => Ok((parse_u32(v)?, parse_u32(m)?)),
        None => Ok((parse_u32(s)?, u32::MAX)),
    }
}

/// `N`, `A:B`, `:B` or `A:`.
fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("bad port {s:?}");
    let port = |p: &str, dflt: u16| -> Result<u16, String> {
        if p.is_empty() {
            Ok(dflt)
        } else {
            p.parse().map_err(|_| bad())
        }
    };
    let (lo, hi) = match s.split_once(':') {
        Some((a, b)) => (port(a, 0)?, port(b, u16::MAX)?),
        None => {
            let p = port(s, 0)?;
            if s.is_empty() {
                return Err(bad());
            }
            (p, p)
        }
    };
    if lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

/// `--to-destination`: `ip`, `ip:port`, `[ip6]:port`, `ip6`, with ranges (`a-b`) reduced to
/// their first element.
fn parse_dnat(s: &str) -> Result<(IpAddr, Option<u16>), String> {
    let bad = || format!("bad DNAT destination {s:?}");
    let first = |r: &str| r.split('-').next().unwrap_or(r).to_owned();
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(first(p)),
            None if after.is_empty() => None,
            None => return Err(bad()),
        };
        (h.to_owned(), port)
    } else if s.matches(':').count() == 1 {
        let (h, p) = s.split_once(':').ok_or_else(bad)?;
        (first(h), Some(first(p)))
    } else {
        (first(s), None)
    };
    let ip: IpAddr = host.parse().map_err(|_| bad())?;
    let port = match port {
        Some(p) => Some(p.parse::<u16>().map_err(|_| bad())?),
        None => None,
    };
    Ok((ip, port))
}

fn parse_proto(s: &str) -> ProtoSpec {
    match s.to_ascii_lowercase().as_str() {
        "tcp" | "6" => ProtoSpec::Is(Protocol::Tcp),
        "udp" | "17" => ProtoSpec::Is(Protocol::Udp),
        "sctp" | "132" => ProtoSpec::Is(Protocol::Sctp),
        "all" | "0" => ProtoSpec::Any,
        _ => ProtoSpec::Other,
    }
}

/// Options the tracer understands, per match module or target, and whether they take a value.
fn known_option(owner: &str, opt: &str) -> Option<bool> {
    let v = match (owner, opt) {
        ("tcp" | "udp" | "sctp", "--dport" | "--destination-port") => true,
        ("multiport", "--dports" | "--destination-ports") => true,
        ("comment", "--comment") => true,
        ("addrtype", "--src-type" | "--dst-type") => true,
        ("conntrack", "--ctstate") => true,
        ("nfacct", "--nfacct-name") => true,
        ("state", "--state") => true,
        ("mark", "--mark") => true,
        ("set", "--match-set") => true,
        ("physdev", "--physdev-is-in" | "--physdev-is-out" | "--physdev-is-bridged") => false,
        ("recent", "--name" | "--seconds" | "--hitcount" | "--mask") => true,
        ("recent", "--set" | "--rcheck" | "--update" | "--remove" | "--reap" | "--rttl")
        | ("recent", "--rsource" | "--rdest") => false,
        ("statistic", "--mode" | "--probability" | "--every" | "--packet") => true,
        ("DNAT", "--to-destination") | ("SNAT", "--to-source") => true,
        ("DNAT" | "SNAT" | "MASQUERADE", "--random" | "--persistent" | "--random-fully") => false,
        ("MASQUERADE", "--to-ports") => true,
        ("MARK", "--set-xmark" | "--set-mark" | "--or-mark" | "--and-mark" | "--xor-mark") => true,
        ("REJECT", "--reject-with") => true,
        ("LOG", "--log-prefix" | "--log-level") => true,
        ("LOG", _) if opt.starts_with("--log-") => false,
        ("NFLOG", "--nflog-group" | "--nflog-prefix" | "--nflog-range" | "--nflog-size")
        | ("NFLOG", "--nflog-threshold") => true,
        _ => return None,
    };
    Some(v)
}

/// Match modules the tracer knows (other options of them are unsupported).
const MODULES: &[&str] = &[
    "tcp",
    "udp",
    "sctp",
    "multiport",
    "comment",
    "addrtype",
    "conntrack",
    "nfacct",
    "state",
    "mark",
    "recent",
    "statistic",
    "set",
    "physdev",
];

/// Targets with options (or none) that the tracer understands beyond kproxy's own.
const EXTRA_TARGETS: &[&str] = &["LOG", "NFLOG"];

impl Rule {
    /// Parse the arguments of a rule (everything after the chain name).
    fn parse(tokens: &[String], text: String) -> Result<Rule, String> {
        let mut rule = Rule {
            text,
            conds: Vec::new(),
            random: false,
            unsupported: Vec::new(),
            target: Target::None,
            comment: None,
        };
        // Modules in load order; `-p tcp` loads `tcp` implicitly, as iptables does.
        let mut modules: Vec<String> = Vec::new();
        let mut target: Option<String> = None;
        let mut dnat: Option<String> = None;
        let mut negate = false;
        let mut i = 0;
        while i < tokens.len() {
            let tok = tokens[i].as_str();
            i += 1;
            if tok == "!" {
                if negate {
                    return Err("double !".into());
                }
                negate = true;
                continue;
            }
            let neg = std::mem::take(&mut negate);
            let mut value = || -> Result<&str, String> {
                let v = tokens
                    .get(i)
                    .map(String::as_str)
                    .ok_or_else(|| format!("{tok} needs a value"))?;
                i += 1;
                Ok(v)
            };
            let mut cond = |test: Test| rule.conds.push(Cond { negate: neg, test });
            match tok {
                "-s" | "--source" | "--src" => cond(Test::Src(AddrMask::parse(value()?)?)),
                "-d" | "--destination" | "--dst" => cond(Test::Dst(AddrMask::parse(value()?)?)),
                "-p" | "--protocol" => {
                    let p = value()?.to_ascii_lowercase();
                    let spec = parse_proto(&p);
                    if let ProtoSpec::Is(proto) = spec {
                        if !neg {
                            modules.push(proto.lower().to_owned());
                        }
                    }
                    cond(Test::Proto(spec));
                }
                "-i" | "--in-interface" | "-o" | "--out-interface" => {
                    value()?;
                    rule.conds.push(Cond {
                        negate: false,
                        test: Test::Never,
                    });
                }
                "-f" | "--fragment" => cond(Test::Fixed(false)),
                "-c" | "--set-counters" => {
                    value()?;
                    value()?;
                }
                "-m" | "--match" => {
                    if neg {
                        return Err("! before -m".into());
                    }
                    let m = value()?.to_owned();
                    if !MODULES.contains(&m.as_str()) {
                        rule.unsupported.push(format!("-m {m}"));
                    }
                    if let Some(p) = match m.as_str() {
                        "tcp" => Some(Protocol::Tcp),
                        "udp" => Some(Protocol::Udp),
                        "sctp" => Some(Protocol::Sctp),
                        _ => None,
                    } {
                        // These matches only ever see their own protocol.
                        cond(Test::Proto(ProtoSpec::Is(p)));
                    }
                    if m == "statistic" {
                        rule.random = true;
                    }
                    modules.push(m);
                }
                "-j" | "--jump" | "-g" | "--goto" => {
                    if neg {
                        return Err(format!("! before {tok}"));
                    }
                    if target.is_some() {
                        return Err("more than one target".into());
                    }
                    let t = value()?.to_owned();
                    rule.target = match t.as_str() {
                        _ if tok == "-g" || tok == "--goto" => Target::Goto(t.clone()),
                        "ACCEPT" => Target::Verdict(Verdict::Accept),
                        "DROP" => Target::Verdict(Verdict::Drop),
                        "REJECT" => Target::Verdict(Verdict::Reject),
                        "RETURN" => Target::Return,
                        "SNAT" | "MASQUERADE" => Target::Snat,
                        "MARK" => Target::Mark { value: 0, mask: 0 },
                        "LOG" | "NFLOG" => Target::Passive,
                        // DNAT is filled in once its destination is known.
                        _ => Target::Jump(t.clone()),
                    };
                    target = Some(t);
                }
                opt if opt.starts_with('-') => {
                    // Target options first (iptables-save prints the target last), then the
                    // most recently loaded module that knows the option.
                    let owner = target
                        .iter()
                        .filter(|t| {
                            BUILTIN_TARGETS.contains(&t.as_str())
                                || EXTRA_TARGETS.contains(&t.as_str())
                        })
                        .chain(modules.iter().rev())
                        .find(|o| known_option(o, opt).is_some())
                        .cloned();
                    let Some(owner) = owner else {
                        rule.unsupported.push(opt.to_owned());
                        // Skip its values, whatever they are.
                        while i < tokens.len() && tokens[i] != "!" && !tokens[i].starts_with('-') {
                            i += 1;
                        }
                        continue;
                    };
                    let takes_value = known_option(&owner, opt) == Some(true);
                    let v = if takes_value { Some(value()?) } else { None };
                    let v = v.unwrap_or("");
                    match (owner.as_str(), opt) {
                        (_, "--dport" | "--destination-port") => {
                            cond(Test::DPort(vec![parse_port_range(v)?]));
                        }
                        (_, "--dports" | "--destination-ports") => {
                            let ranges = v
                                .split(',')
                                .map(parse_port_range)
                                .collect::<Result<Vec<_>, _>>()?;
                            cond(Test::DPort(ranges));
                        }
                        ("comment", _) => {
                            // Kept for the trace's reasons. Tolerate an unquoted comment with
                            // spaces.
                            let mut text = v.to_owned();
                            while i < tokens.len()
                                && tokens[i] != "!"
                                && !tokens[i].starts_with('-')
                            {
                                text.push(' ');
                                text.push_str(&tokens[i]);
                                i += 1;
                            }
                            rule.comment = Some(text);
                        }
                        (_, "--src-type" | "--dst-type") => {
                            let mut types = Vec::new();
                            for t in v.split(',') {
                                match t.to_ascii_uppercase().as_str() {
                                    "LOCAL" => types.push(AddrType::Local),
                                    "UNICAST" => types.push(AddrType::Unicast),
                                    "MULTICAST" => types.push(AddrType::Multicast),
                                    "BROADCAST" => types.push(AddrType::Broadcast),
                                    other => rule.unsupported.push(format!("{opt} {other}")),
                                }
                            }
                            if opt == "--src-type" {
                                cond(Test::SrcType(types));
                            } else {
                                cond(Test::DstType(types));
                            }
                        }
                        (_, "--ctstate" | "--state") => {
                            let new = v.split(',').any(|s| s.eq_ignore_ascii_case("NEW"));
                            cond(Test::CtNew(new));
                        }
                        ("mark", "--mark") => {
                            let (value, mask) = parse_value_mask(v)?;
                            cond(Test::Mark { value, mask });
                        }
                        ("set", "--match-set") => {
                            let dims = value()?;
                            let from_src = dims
                                .split(',')
                                .map(|d| match d {
                                    "src" => Ok(true),
                                    "dst" => Ok(false),
                                    other => Err(format!("bad --match-set dimension {other:?}")),
                                })
                                .collect::<Result<Vec<_>, _>>()?;
                            cond(Test::Set {
                                name: v.to_owned(),
                                from_src,
                            });
                        }
                        ("physdev", _) => cond(Test::Fixed(false)),
                        // A counter: it counts what reaches it and matches everything.
                        ("nfacct", _) => cond(Test::Fixed(true)),
                        ("recent", "--set") => cond(Test::Fixed(true)),
                        ("recent", "--rcheck" | "--update" | "--remove") => {
                            cond(Test::Fixed(false))
                        }
                        ("DNAT", "--to-destination") => dnat = Some(v.to_owned()),
                        ("MARK", _) => {
                            let (value, mask) = match opt {
                                "--set-xmark" => parse_value_mask(v)?,
                                "--set-mark" => {
                                    let (val, m) = parse_value_mask(v)?;
                                    (val, val | m)
                                }
                                "--or-mark" => {
                                    let m = parse_u32(v)?;
                                    (m, m)
                                }
                                "--and-mark" => (0, !parse_u32(v)?),
                                _ => (parse_u32(v)?, 0), // --xor-mark
                            };
                            rule.target = Target::Mark { value, mask };
                        }
                        // Everything else is accepted and has no effect on the model.
                        _ => {}
                    }
                }
                other => return Err(format!("unexpected argument {other:?}")),
            }
        }
        if negate {
            return Err("! at the end of the rule".into());
        }
        if target.as_deref() == Some("DNAT") {
            let to = dnat.ok_or("DNAT without --to-destination")?;
            let (ip, port) = parse_dnat(&to)?;
            let shown = match port {
                Some(p) => join_host_port(&ip, p),
                None => ip.to_string(),
            };
            rule.target = Target::Dnat { shown, ip, port };
        }
        Ok(rule)
    }
}

// ---------------------------------------------------------------------------------------------
// The walk
// ---------------------------------------------------------------------------------------------

/// How a chain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    /// Fell off the end or hit RETURN: the caller continues.
    Returned,
    /// A terminal action (DNAT, SNAT, a verdict).
    Stopped,
}

/// What one matched rule does to the walk of its chain.
enum Step {
    Next,
    Return,
    Stop,
}

struct Walk<'a> {
    rules: &'a Ruleset,
    node: &'a NodeFacts,
    reasons: &'a [(&'a str, Reason)],
    src: IpAddr,
    dst: IpAddr,
    protocol: Protocol,
    dport: u16,
    mark: u32,
    masq_mark: u32,
    /// Address, port and the path's mark at the first DNAT.
    first_dnat: Option<(IpAddr, Option<u16>, u32)>,
    out: Trace,
}

impl Walk<'_> {
    fn note(&mut self, s: String) {
        if !self.out.matched.contains(&s) {
            self.out.matched.push(s);
        }
    }

    fn addr_type(&self, ip: &IpAddr, types: &[AddrType]) -> bool {
        let local = self.node.is_local(ip);
        types.iter().any(|t| match t {
            AddrType::Local => local,
            AddrType::Multicast => ip.is_multicast(),
            AddrType::Broadcast => matches!(ip, IpAddr::V4(a) if a.is_broadcast()),
            AddrType::Unicast => {
                !local
                    && !ip.is_multicast()
                    && !ip.is_unspecified()
                    && !matches!(ip, IpAddr::V4(a) if a.is_broadcast())
            }
        })
    }

    fn holds(&self, c: &Cond) -> bool {
        let raw = match &c.test {
            Test::Src(a) => match a.contains(&self.src) {
                Some(b) => b,
                None => return false,
            },
            Test::Dst(a) => match a.contains(&self.dst) {
                Some(b) => b,
                None => return false,
            },
            Test::Proto(ProtoSpec::Any) => true,
            Test::Proto(ProtoSpec::Is(p)) => *p == self.protocol,
            Test::Proto(ProtoSpec::Other) => false,
            Test::DPort(ranges) => ranges
                .iter()
                .any(|(lo, hi)| (*lo..=*hi).contains(&self.dport)),
            Test::SrcType(t) => self.addr_type(&self.src, t),
            Test::DstType(t) => self.addr_type(&self.dst, t),
            Test::CtNew(new) => *new,
            Test::Mark { value, mask } => self.mark & mask == *value,
            Test::Fixed(b) => *b,
            Test::Set { name, from_src } => {
                let lookup = super::Lookup {
                    src: self.src,
                    dst: self.dst,
                    protocol: self.protocol,
                    dport: self.dport,
                };
                self.node
                    .sets
                    .get(name)
                    .is_some_and(|c| c.matches(from_src, &lookup))
            }
            Test::Never => return false,
        };
        raw != c.negate
    }

    fn set_mark(&mut self, value: u32, mask: u32) {
        self.mark = (self.mark & !mask) ^ value;
        if self.mark & self.masq_mark == self.masq_mark {
            self.out.masquerade = true;
        }
    }

    fn chain(&mut self, table: &str, chain: &str, depth: usize) -> Flow {
        let Some(rules) = self.rules.chain(table, chain) else {
            return Flow::Returned;
        };
        for rule in rules {
            let conds_hold = rule.conds.iter().all(|c| self.holds(c));
            if !rule.unsupported.is_empty() {
                if conds_hold {
                    self.note(format!(
                        "unsupported: {table}/{chain}: {} ({})",
                        rule.text,
                        rule.unsupported.join(", ")
                    ));
                }
                continue;
            }
            if !conds_hold {
                continue;
            }
            self.out
                .matched
                .push(format!("{table}/{chain}: {}", rule.text));
            let mark_before = self.mark;
            let step = match &rule.target {
                Target::None | Target::Passive => Step::Next,
                Target::Return => Step::Return,
                Target::Verdict(v) => {
                    if table == "filter" && self.out.verdict.is_none() {
                        self.out.verdict = Some(*v);
                        self.out.reason = self
                            .reasons
                            .iter()
                            .find(|(c, _)| *c == chain)
                            .map(|(_, r)| *r)
                            .or_else(|| rule.comment.as_deref().and_then(comment_reason));
                    }
                    Step::Stop
                }
                Target::Dnat { shown, ip, port } => {
                    if self.first_dnat.is_none() {
                        self.first_dnat = Some((*ip, *port, self.mark));
                    }
                    if !self.out.dnat.contains(shown) {
                        self.out.dnat.push(shown.clone());
                    }
                    Step::Stop
                }
                Target::Snat => {
                    self.out.masquerade = true;
                    Step::Stop
                }
                Target::Mark { value, mask } => {
                    self.set_mark(*value, *mask);
                    Step::Next
                }
                Target::Jump(to) => match self.jump(table, chain, rule, to, depth) {
                    Flow::Stopped => Step::Stop,
                    Flow::Returned => Step::Next,
                },
                Target::Goto(to) => match self.jump(table, chain, rule, to, depth) {
                    Flow::Stopped => Step::Stop,
                    Flow::Returned => Step::Return,
                },
            };
            // A statistic rule may just as well not have matched: carry on either way, on the
            // path that did not take it.
            match step {
                _ if rule.random => self.mark = mark_before,
                Step::Next => {}
                Step::Return => return Flow::Returned,
                Step::Stop => return Flow::Stopped,
            }
        }
        Flow::Returned
    }

    fn jump(&mut self, table: &str, from: &str, rule: &Rule, to: &str, depth: usize) -> Flow {
        let exists = self.rules.chain(table, to).is_some();
        if to == KUBE_MARK_MASQ {
            self.out.masquerade = true;
            if !exists {
                self.set_mark(self.masq_mark, self.masq_mark);
                return Flow::Returned;
            }
        }
        if !exists {
            self.note(format!(
                "unsupported: {table}/{from}: {} (unknown target {to})",
                rule.text
            ));
            return Flow::Returned;
        }
        if depth >= MAX_DEPTH {
            self.note(format!(
                "unsupported: {table}/{from}: {} (jumps nested deeper than {MAX_DEPTH})",
                rule.text
            ));
            return Flow::Returned;
        }
        self.chain(table, to, depth + 1)
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RenderConfig;
    use crate::iptables::chains;
    use crate::iptables::render::render;
    use crate::model::{ChangeSet, IpFamily};
    use crate::state::State;
    use crate::xtables::{Backend, Fake};
    use std::collections::BTreeSet;

    // Upstream's fixture plan: pods in 10.0.0.0/8, the node at 192.168.0.2, services in
    // 172.30.0.0/16, external clients in 203.0.113.0/24.
    const NODE_IP: &str = "192.168.0.2";
    const POD: &str = "10.0.0.2";
    const CLIENT: &str = "203.0.113.5";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cfg(family: IpFamily) -> RenderConfig {
        let cidr = match family {
            IpFamily::V4 => "10.0.0.0/8",
            IpFamily::V6 => "fd00:10::/64",
        };
        RenderConfig {
            family,
            node_name: "node-a".into(),
            local: crate::config::LocalDetector::Cidr(cidr.parse().unwrap()),
            masquerade_all: false,
            masquerade_mark: 0x4000,
            nodeport_ips: None,
            conntrack_tcp_be_liberal: false,
            node_ips: Vec::new(),
            localhost_nodeports: false,
            nfacct: Vec::new(),
        }
    }

    /// One endpoint, ready, on `node`.
    fn ep(ip: &str, port: u16, node: &str) -> String {
        format!(
            r#"{{"ip":"{ip}","port":{port},"ready":true,"serving":true,"terminating":false,"node_name":"{node}"}}"#
        )
    }

    /// A Service `ns/<name>` with one TCP port `p` (80, optional NodePort), `extra` spec fields
    /// (each followed by a comma) and the given endpoints (none: no EndpointSlices at all).
    fn svc(name: &str, cluster_ip: &str, node_port: u16, extra: &str, eps: &[String]) -> String {
        let endpoints = if eps.is_empty() {
            String::new()
        } else {
            format!(
                r#",{{"namespace":"ns","name":"{name}","ports":[{{"name":"p","protocol":"TCP","endpoints":[{}]}}]}}"#,
                eps.join(",")
            )
        };
        format!(
            r#"{{"namespace":"ns","name":"{name}","service":{{"cluster_ips":["{cluster_ip}"],{extra}
                "ports":[{{"name":"p","protocol":"TCP","port":80,"node_port":{node_port}}}]}}}}|{endpoints}"#
        )
    }

    /// Join `svc()` outputs into a change set.
    fn changeset(parts: &[String]) -> String {
        let mut services = Vec::new();
        let mut endpoints = String::new();
        for p in parts {
            let (s, e) = p.split_once('|').unwrap();
            services.push(s.to_owned());
            endpoints.push_str(e);
        }
        format!(
            r#"{{"services":[{}],"endpoints":[{}]}}"#,
            services.join(","),
            endpoints.trim_start_matches(',')
        )
    }

    /// The jumps as an `iptables-restore` section of `-I` lines.
    fn jumps_text() -> String {
        let mut out = String::new();
        for table in ["filter", "nat"] {
            out.push_str(&format!("*{table}\n"));
            for j in chains::JUMPS.iter().filter(|j| j.table == table) {
                let args: Vec<String> = j.rule_args().iter().map(|a| quote(a)).collect();
                out.push_str(&format!("-I {} {}\n", j.from, args.join(" ")));
            }
            out.push_str("COMMIT\n");
        }
        out
    }

    /// The same rules three ways: the Fake's dump after a restore and `ensure_jumps`, the
    /// restore text plus [`Ruleset::add_jumps`], and the restore text plus `-I` lines.
    struct Fixture {
        sources: Vec<(&'static str, Ruleset)>,
        node: NodeFacts,
    }

    impl Fixture {
        fn new(family: IpFamily, json: &str, node_ip: &str) -> Fixture {
            let mut st = State::new(family);
            st.apply(ChangeSet::from_json(json.as_bytes()).unwrap());
            let text = render(&st, &cfg(family)).restore_text(&BTreeSet::new());
            let mut fake = Fake::new();
            fake.restore(&text).unwrap();
            fake.ensure_jumps(chains::JUMPS).unwrap();
            let dump = Ruleset::parse(&fake.dump().unwrap()).unwrap();
            let mut direct = Ruleset::parse(&text).unwrap();
            direct.add_jumps(chains::JUMPS).unwrap();
            let with_inserts = Ruleset::parse(&format!("{text}{}", jumps_text())).unwrap();
            Fixture {
                sources: vec![
                    ("fake dump", dump),
                    ("restore text + add_jumps", direct),
                    ("restore text + -I lines", with_inserts),
                ],
                node: NodeFacts {
                    local_ips: vec![ip(node_ip)],
                    ..NodeFacts::default()
                },
            }
        }

        /// Trace over every source; they must agree.
        fn run(
            &self,
            src: &str,
            dst: &str,
            protocol: Protocol,
            dport: u16,
            origin: Origin,
        ) -> Trace {
            let packet = Packet {
                src: ip(src),
                dst: ip(dst),
                protocol,
                dport,
                origin,
            };
            let mut first: Option<Trace> = None;
            for (name, rs) in &self.sources {
                let t = trace(rs, &packet, &self.node, &[]);
                assert!(
                    !t.matched.iter().any(|m| m.starts_with("unsupported")),
                    "{name}: {:#?}",
                    t.matched
                );
                if let Some(f) = &first {
                    assert_eq!(
                        (&t.dnat, t.verdict, t.reason, t.masquerade),
                        (&f.dnat, f.verdict, f.reason, f.masquerade),
                        "{name} disagrees for {packet:?}:\n{}\nvs\n{}",
                        t.matched.join("\n"),
                        f.matched.join("\n")
                    );
                } else {
                    first = Some(t);
                }
            }
            first.unwrap()
        }

        fn tcp(&self, src: &str, dst: &str, dport: u16) -> Trace {
            self.run(src, dst, Protocol::Tcp, dport, Origin::External)
        }
    }

    #[track_caller]
    fn expect(t: &Trace, dnat: &[&str], verdict: Option<Verdict>, masquerade: bool) {
        assert_eq!(
            (t.dnat.as_slice(), t.verdict, t.masquerade),
            (
                dnat.iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .as_slice(),
                verdict,
                masquerade
            ),
            "matched:\n{}",
            t.matched.join("\n")
        );
    }

    fn general() -> Fixture {
        let json = changeset(&[
            svc(
                "three",
                "172.30.0.41",
                0,
                "",
                &[
                    ep("10.180.0.1", 8080, "node-b"),
                    ep("10.180.0.2", 8080, "node-c"),
                    ep("10.180.0.3", 8080, "node-a"),
                ],
            ),
            // Two ports on 53: TCP to 1053, UDP to 2053.
            r#"{"namespace":"ns","name":"dns","service":{"cluster_ips":["172.30.0.10"],
                "ports":[{"name":"tcp","protocol":"TCP","port":53},{"name":"udp","protocol":"UDP","port":53}]}}|,
               {"namespace":"ns","name":"dns","ports":[
                 {"name":"tcp","protocol":"TCP","endpoints":[EP_TCP]},
                 {"name":"udp","protocol":"UDP","endpoints":[EP_UDP]}]}"#
                .replace("EP_TCP", &ep("10.180.0.4", 1053, "node-b"))
                .replace("EP_UDP", &ep("10.180.0.4", 2053, "node-b")),
            svc("empty", "172.30.0.42", 30042, r#""externally_accessible":true,"#, &[]),
            svc(
                "np",
                "172.30.0.43",
                30043,
                r#""externally_accessible":true,"#,
                &[ep("10.180.0.5", 8080, "node-b"), ep("10.180.0.6", 8080, "node-a")],
            ),
            svc(
                "local",
                "172.30.0.44",
                30044,
                r#""externally_accessible":true,"external_traffic_policy":"Local","health_check_node_port":30000,"#,
                &[ep("10.180.0.7", 8080, "node-a"), ep("10.180.0.8", 8080, "node-b")],
            ),
            svc(
                "nolocal",
                "172.30.0.45",
                30045,
                r#""externally_accessible":true,"external_traffic_policy":"Local","#,
                &[ep("10.180.0.9", 8080, "node-b")],
            ),
            svc(
                "itp",
                "172.30.0.46",
                0,
                r#""internal_traffic_policy":"Local","#,
                &[ep("10.180.0.10", 8080, "node-b")],
            ),
            svc(
                "lb",
                "172.30.0.47",
                30047,
                r#""externally_accessible":true,"load_balancer_ips":["1.2.3.4"],"load_balancer_source_ranges":["203.0.113.0/25"],"#,
                &[ep("10.180.0.11", 8080, "node-b")],
            ),
            svc(
                "affinity",
                "172.30.0.48",
                0,
                r#""session_affinity_timeout":10800,"#,
                &[ep("10.180.0.12", 8080, "node-b"), ep("10.180.0.13", 8080, "node-c")],
            ),
        ]);
        Fixture::new(IpFamily::V4, &json, NODE_IP)
    }

    const THREE: [&str; 3] = ["10.180.0.1:8080", "10.180.0.2:8080", "10.180.0.3:8080"];

    #[test]
    fn cluster_ip_collects_every_endpoint_and_masquerades_off_cluster_sources() {
        let fx = general();
        let t = fx.tcp(POD, "172.30.0.41", 80);
        expect(&t, &THREE, None, false);
        assert!(
            t.matched[0].starts_with("nat/PREROUTING: "),
            "{:?}",
            t.matched
        );
        assert!(t
            .matched
            .iter()
            .any(|m| m.starts_with("nat/KUBE-") && m.contains("\"ns/three:p cluster IP\"")));
        // From outside the pod network: masqueraded, and KUBE-FORWARD accepts the marked packet.
        expect(
            &fx.tcp(CLIENT, "172.30.0.41", 80),
            &THREE,
            Some(Verdict::Accept),
            true,
        );
        // From the node itself.
        let t = fx.run(NODE_IP, "172.30.0.41", Protocol::Tcp, 80, Origin::Local);
        expect(&t, &THREE, None, true);
        assert!(t.matched[0].starts_with("nat/OUTPUT: "));
    }

    #[test]
    fn hairpin_is_masqueraded() {
        let fx = general();
        // The path through the hairpin endpoint sets the mark; the first DNAT (whose path
        // the filter walk continues) is another endpoint's, unmarked.
        expect(&fx.tcp("10.180.0.2", "172.30.0.41", 80), &THREE, None, true);
        // A single endpoint: the marked packet is accepted by KUBE-FORWARD.
        let t = fx.tcp("10.180.0.4", "172.30.0.10", 53);
        expect(&t, &["10.180.0.4:1053"], Some(Verdict::Accept), true);
        expect(
            &fx.tcp("10.180.0.9", "172.30.0.10", 53),
            &["10.180.0.4:1053"],
            None,
            false,
        );
    }

    #[test]
    fn protocols_on_the_same_port_are_told_apart() {
        let fx = general();
        let tcp = fx.run(POD, "172.30.0.10", Protocol::Tcp, 53, Origin::External);
        expect(&tcp, &["10.180.0.4:1053"], None, false);
        let udp = fx.run(POD, "172.30.0.10", Protocol::Udp, 53, Origin::External);
        expect(&udp, &["10.180.0.4:2053"], None, false);
        let sctp = fx.run(POD, "172.30.0.10", Protocol::Sctp, 53, Origin::External);
        expect(&sctp, &[], None, false);
    }

    #[test]
    fn no_endpoints_rejects() {
        let fx = general();
        expect(
            &fx.tcp(POD, "172.30.0.42", 80),
            &[],
            Some(Verdict::Reject),
            false,
        );
        expect(
            &fx.tcp(CLIENT, "172.30.0.42", 80),
            &[],
            Some(Verdict::Reject),
            false,
        );
        expect(
            &fx.tcp(CLIENT, NODE_IP, 30042),
            &[],
            Some(Verdict::Reject),
            false,
        );
        let t = fx.run(NODE_IP, "172.30.0.42", Protocol::Tcp, 80, Origin::Local);
        expect(&t, &[], Some(Verdict::Reject), false);
        assert_eq!(t.reason, Some(Reason::NoEndpoints));
        assert!(t
            .matched
            .last()
            .unwrap()
            .contains("ns/empty:p has no endpoints"));
    }

    #[test]
    fn node_ports() {
        let fx = general();
        let both = ["10.180.0.5:8080", "10.180.0.6:8080"];
        expect(
            &fx.tcp(CLIENT, NODE_IP, 30043),
            &both,
            Some(Verdict::Accept),
            true,
        );
        let t = fx.run(NODE_IP, NODE_IP, Protocol::Tcp, 30043, Origin::Local);
        expect(&t, &both, None, true);
        // Localhost NodePorts are not served.
        let t = fx.run(
            "127.0.0.1",
            "127.0.0.1",
            Protocol::Tcp,
            30043,
            Origin::Local,
        );
        expect(&t, &[], None, false);
        // A NodePort is a port on the node, not on other addresses.
        expect(&fx.tcp(CLIENT, "192.168.0.3", 30043), &[], None, false);
        // Protocol matters.
        let t = fx.run(CLIENT, NODE_IP, Protocol::Udp, 30043, Origin::External);
        expect(&t, &[], None, false);
    }

    #[test]
    fn unknown_ports_fall_through() {
        let fx = general();
        expect(&fx.tcp(POD, "172.30.0.41", 81), &[], None, false);
        expect(&fx.tcp(CLIENT, NODE_IP, 31999), &[], None, false);
        expect(&fx.tcp(CLIENT, "172.30.99.99", 80), &[], None, false);
    }

    #[test]
    fn external_traffic_policy_local() {
        let fx = general();
        // External clients: only the local endpoint, client address preserved.
        expect(
            &fx.tcp(CLIENT, NODE_IP, 30044),
            &["10.180.0.7:8080"],
            None,
            false,
        );
        // Pods short-circuit to every endpoint, unmasqueraded.
        let all = ["10.180.0.7:8080", "10.180.0.8:8080"];
        expect(&fx.tcp(POD, NODE_IP, 30044), &all, None, false);
        // The node itself: every endpoint, masqueraded.
        let t = fx.run(NODE_IP, NODE_IP, Protocol::Tcp, 30044, Origin::Local);
        expect(&t, &all, None, true);
        // The cluster IP is not subject to the external policy.
        expect(&fx.tcp(POD, "172.30.0.44", 80), &all, None, false);
        // The health-check NodePort is accepted.
        expect(
            &fx.tcp(CLIENT, NODE_IP, 30000),
            &[],
            Some(Verdict::Accept),
            false,
        );
    }

    #[test]
    fn external_traffic_policy_local_without_local_endpoints() {
        let fx = general();
        let t = fx.tcp(CLIENT, NODE_IP, 30045);
        expect(&t, &[], Some(Verdict::Drop), false);
        assert_eq!(t.reason, Some(Reason::NoLocalEndpoints));
        // Pods are still served, through the node port and the cluster IP.
        expect(
            &fx.tcp(POD, NODE_IP, 30045),
            &["10.180.0.9:8080"],
            None,
            false,
        );
        expect(
            &fx.tcp(POD, "172.30.0.45", 80),
            &["10.180.0.9:8080"],
            None,
            false,
        );
    }

    #[test]
    fn internal_traffic_policy_local_without_local_endpoints_drops() {
        let fx = general();
        expect(
            &fx.tcp(POD, "172.30.0.46", 80),
            &[],
            Some(Verdict::Drop),
            false,
        );
        let t = fx.run(NODE_IP, "172.30.0.46", Protocol::Tcp, 80, Origin::Local);
        expect(&t, &[], Some(Verdict::Drop), false);
    }

    #[test]
    fn load_balancer_source_ranges() {
        let fx = general();
        let t = fx.tcp("203.0.113.2", "1.2.3.4", 80);
        expect(&t, &["10.180.0.11:8080"], Some(Verdict::Accept), true);
        assert_eq!(t.reason, None);
        let t = fx.tcp("203.0.113.130", "1.2.3.4", 80);
        expect(&t, &[], Some(Verdict::Drop), false);
        assert_eq!(t.reason, Some(Reason::SourceRange));
        // A pod is not in the source ranges either.
        expect(&fx.tcp(POD, "1.2.3.4", 80), &[], Some(Verdict::Drop), false);
        // The NodePort is not subject to the source ranges.
        let t = fx.tcp("203.0.113.130", NODE_IP, 30047);
        expect(&t, &["10.180.0.11:8080"], Some(Verdict::Accept), true);
    }

    #[test]
    fn session_affinity_does_not_hide_endpoints() {
        let fx = general();
        let t = fx.tcp(POD, "172.30.0.48", 80);
        expect(&t, &["10.180.0.12:8080", "10.180.0.13:8080"], None, false);
        // The affinity checks never match a first packet; the DNAT rules' `--set` does.
        assert!(!t.matched.iter().any(|m| m.contains("--rcheck")));
        assert_eq!(t.matched.iter().filter(|m| m.contains("--set")).count(), 2);
    }

    #[test]
    fn ipv6_cluster_ip() {
        let json = changeset(&[svc(
            "v6",
            "fd00:172:30::1",
            30080,
            r#""externally_accessible":true,"#,
            &[
                ep("fd00:10::a", 8080, "node-b"),
                ep("fd00:10::b", 8080, "node-a"),
            ],
        )]);
        let fx = Fixture::new(IpFamily::V6, &json, "fd00:192:168::2");
        let both = ["[fd00:10::a]:8080", "[fd00:10::b]:8080"];
        expect(
            &fx.tcp("fd00:10::5", "fd00:172:30::1", 80),
            &both,
            None,
            false,
        );
        expect(
            &fx.tcp("2001:db8::1", "fd00:172:30::1", 80),
            &both,
            Some(Verdict::Accept),
            true,
        );
        expect(
            &fx.tcp("fd00:10::a", "fd00:172:30::1", 80),
            &both,
            Some(Verdict::Accept),
            true,
        );
        expect(
            &fx.tcp("2001:db8::1", "fd00:192:168::2", 30080),
            &both,
            Some(Verdict::Accept),
            true,
        );
        // IPv6 loopback NodePorts never work.
        let t = fx.run("::1", "::1", Protocol::Tcp, 30080, Origin::Local);
        expect(&t, &[], None, false);
        // An IPv4 packet matches nothing in an IPv6 ruleset.
        expect(&fx.tcp(POD, "172.30.0.41", 80), &[], None, false);
    }

    #[test]
    fn restore_text_declarations_and_deletions() {
        let fx = general();
        let text = {
            let mut st = State::new(IpFamily::V4);
            st.apply(
                ChangeSet::from_json(changeset(&[svc("x", "172.30.0.1", 0, "", &[])]).as_bytes())
                    .unwrap(),
            );
            let stale: BTreeSet<String> = ["KUBE-SVC-OLD".to_string()].into();
            render(&st, &cfg(IpFamily::V4)).restore_text(&stale)
        };
        assert!(text.contains("-X KUBE-SVC-OLD"));
        let rs = Ruleset::parse(&text).unwrap();
        assert!(rs.rules("nat", "KUBE-SVC-OLD").is_none());
        assert_eq!(
            rs.rules("nat", "KUBE-MARK-MASQ").unwrap(),
            ["-j MARK --or-mark 0x4000"]
        );
        // Without the jumps nothing is reached.
        let p = Packet {
            src: ip(POD),
            dst: ip("172.30.0.1"),
            protocol: Protocol::Tcp,
            dport: 80,
            origin: Origin::External,
        };
        assert_eq!(trace(&rs, &p, &fx.node, &[]), Trace::default());
        // A second declaration of a user chain flushes it; a built-in one does not.
        let rs = Ruleset::parse(
            "*nat\n:KUBE-A - [0:0]\n-A KUBE-A -j RETURN\n-A OUTPUT -j KUBE-A\nCOMMIT\n\
             *nat\n:OUTPUT ACCEPT [0:0]\n:KUBE-A - [0:0]\nCOMMIT\n",
        )
        .unwrap();
        assert_eq!(rs.rules("nat", "KUBE-A").unwrap(), Vec::<&str>::new());
        assert_eq!(rs.rules("nat", "OUTPUT").unwrap(), ["-j KUBE-A"]);
    }

    // --- The kernel's normalized format, by hand ---------------------------------------------

    const KERNEL: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Thu Jan  1 00:00:00 1970
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-SERVICES -d 10.96.0.20/32 -p udp -m comment --comment "ns/none:dns has no endpoints" -m udp --dport 53 -j REJECT --reject-with icmp-port-unreachable
COMMIT
# Completed on Thu Jan  1 00:00:00 1970
*nat
:PREROUTING ACCEPT [5:300]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-AAAAAAAAAAAAAAAA - [0:0]
:KUBE-SEP-BBBBBBBBBBBBBBBB - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-XXXXXXXXXXXXXXXX - [0:0]
[12:720] -A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-SEP-AAAAAAAAAAAAAAAA -s 10.1.0.1/32 -m comment --comment "ns/svc:p" -j KUBE-MARK-MASQ
-A KUBE-SEP-AAAAAAAAAAAAAAAA -p tcp -m comment --comment "ns/svc:p" -m tcp -j DNAT --to-destination 10.1.0.1:8080
-A KUBE-SEP-BBBBBBBBBBBBBBBB -s 10.1.0.2/32 -m comment --comment "ns/svc:p" -j KUBE-MARK-MASQ
-A KUBE-SEP-BBBBBBBBBBBBBBBB -p tcp -m comment --comment "ns/svc:p" -m tcp -j DNAT --to-destination 10.1.0.2:8080
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "ns/svc:p cluster IP" -m tcp --dport 80 -j KUBE-SVC-XXXXXXXXXXXXXXXX
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-XXXXXXXXXXXXXXXX ! -s 10.0.0.0/8 -d 10.96.0.10/32 -p tcp -m comment --comment "ns/svc:p cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-XXXXXXXXXXXXXXXX -m comment --comment "ns/svc:p -> 10.1.0.1:8080" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-AAAAAAAAAAAAAAAA
-A KUBE-SVC-XXXXXXXXXXXXXXXX -m comment --comment "ns/svc:p -> 10.1.0.2:8080" -j KUBE-SEP-BBBBBBBBBBBBBBBB
COMMIT
"#;

    fn pkt(src: &str, dst: &str, protocol: Protocol, dport: u16, origin: Origin) -> Packet {
        Packet {
            src: ip(src),
            dst: ip(dst),
            protocol,
            dport,
            origin,
        }
    }

    fn node() -> NodeFacts {
        NodeFacts {
            local_ips: vec![ip(NODE_IP)],
            ..NodeFacts::default()
        }
    }

    #[test]
    fn kernel_normalized_format() {
        let rs = Ruleset::parse(KERNEL).unwrap();
        let both = ["10.1.0.1:8080", "10.1.0.2:8080"];
        let t = trace(
            &rs,
            &pkt(POD, "10.96.0.10", Protocol::Tcp, 80, Origin::External),
            &node(),
            &[],
        );
        expect(&t, &both, None, false);
        assert!(t.matched.contains(
            &"nat/KUBE-SVC-XXXXXXXXXXXXXXXX: -m comment --comment \"ns/svc:p -> 10.1.0.2:8080\" -j KUBE-SEP-BBBBBBBBBBBBBBBB"
                .to_string()
        ));
        let t = trace(
            &rs,
            &pkt(CLIENT, "10.96.0.10", Protocol::Tcp, 80, Origin::External),
            &node(),
            &[],
        );
        expect(&t, &both, Some(Verdict::Accept), true);
        let t = trace(
            &rs,
            &pkt(POD, "10.96.0.20", Protocol::Udp, 53, Origin::External),
            &node(),
            &[],
        );
        expect(&t, &[], Some(Verdict::Reject), false);
        let t = trace(
            &rs,
            &pkt(POD, "10.96.0.20", Protocol::Tcp, 53, Origin::External),
            &node(),
            &[],
        );
        expect(&t, &[], None, false);
        // The masquerade mark is what KUBE-MARK-MASQ sets.
        let rs = Ruleset::parse(&KERNEL.replace("0x4000/0x4000", "0x8000/0x8000")).unwrap();
        let t = trace(
            &rs,
            &pkt(CLIENT, "10.96.0.10", Protocol::Tcp, 80, Origin::External),
            &node(),
            &[],
        );
        expect(&t, &both, Some(Verdict::Accept), true);
    }

    // --- Matchers -----------------------------------------------------------------------------

    fn one_rule(rule: &str) -> Ruleset {
        Ruleset::parse(&format!("*nat\n-A PREROUTING {rule}\nCOMMIT\n")).unwrap()
    }

    /// Whether a single-rule nat PREROUTING with `-j DNAT --to-destination 9.9.9.9:9` DNATs.
    fn hits(matches: &str, p: &Packet) -> bool {
        let rs = one_rule(&format!("{matches} -j DNAT --to-destination 9.9.9.9:9"));
        !trace(&rs, p, &node(), &[]).dnat.is_empty()
    }

    fn to(dst: &str) -> Packet {
        pkt(POD, dst, Protocol::Tcp, 80, Origin::External)
    }

    #[test]
    fn non_contiguous_masks() {
        let m = AddrMask::parse("0.0.0.5/0.0.0.15").unwrap();
        assert_eq!(m.contains(&ip("10.0.0.5")), Some(true));
        assert_eq!(m.contains(&ip("10.0.1.21")), Some(true));
        assert_eq!(m.contains(&ip("10.0.0.6")), Some(false));
        assert_eq!(m.contains(&ip("::5")), None);
        let m = AddrMask::parse("::5/::f").unwrap();
        assert_eq!(m.contains(&ip("fd00::15")), Some(true));
        assert_eq!(m.contains(&ip("fd00::16")), Some(false));
        let m = AddrMask::parse("10.0.0.0/255.0.255.0").unwrap();
        assert_eq!(m.contains(&ip("10.9.0.9")), Some(true));
        assert_eq!(m.contains(&ip("10.9.1.9")), Some(false));
        // Prefixes, hosts, the empty prefix.
        assert_eq!(
            AddrMask::parse("10.0.0.0/8")
                .unwrap()
                .contains(&ip("10.255.0.1")),
            Some(true)
        );
        assert_eq!(
            AddrMask::parse("10.0.0.1")
                .unwrap()
                .contains(&ip("10.0.0.2")),
            Some(false)
        );
        assert_eq!(
            AddrMask::parse("0.0.0.0/0")
                .unwrap()
                .contains(&ip("1.2.3.4")),
            Some(true)
        );
        assert_eq!(
            AddrMask::parse("::/0").unwrap().contains(&ip("::1")),
            Some(true)
        );
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "x",
            "10.0.0.0/::f",
            "10.0.0.0/255.0.0.256",
        ] {
            assert!(AddrMask::parse(bad).is_err(), "{bad}");
        }
        // In rules, with negation.
        assert!(hits("-d 0.0.0.5/0.0.0.15", &to("172.30.1.37")));
        assert!(!hits("-d 0.0.0.5/0.0.0.15", &to("172.30.1.38")));
        assert!(hits("! -d 0.0.0.5/0.0.0.15", &to("172.30.1.38")));
        // A rule of the other family never matches, negated or not.
        assert!(!hits("! -d ::5/::f", &to("172.30.1.38")));
    }

    #[test]
    fn bucket_chains_with_masks() {
        let rs = Ruleset::parse(
            "*nat\n\
             :KUBE-B0 - [0:0]\n:KUBE-B1 - [0:0]\n\
             -A PREROUTING -d 0.0.0.0/0.0.0.1 -j KUBE-B0\n\
             -A PREROUTING -d 0.0.0.1/0.0.0.1 -j KUBE-B1\n\
             -A KUBE-B0 -d 172.30.0.2 -p tcp --dport 80 -j DNAT --to-destination 10.1.0.2:80\n\
             -A KUBE-B1 -d 172.30.0.3 -p tcp --dport 80 -j DNAT --to-destination 10.1.0.3:80\n\
             COMMIT\n",
        )
        .unwrap();
        expect(
            &trace(&rs, &to("172.30.0.2"), &node(), &[]),
            &["10.1.0.2:80"],
            None,
            false,
        );
        expect(
            &trace(&rs, &to("172.30.0.3"), &node(), &[]),
            &["10.1.0.3:80"],
            None,
            false,
        );
        expect(
            &trace(&rs, &to("172.30.0.4"), &node(), &[]),
            &[],
            None,
            false,
        );
    }

    #[test]
    fn quoted_comments() {
        let rs = one_rule(
            r#"-m comment --comment "a \"quoted\" comment -j DROP with spaces" -d 172.30.0.1 -j DNAT --to-destination 10.1.0.1:80"#,
        );
        let t = trace(&rs, &to("172.30.0.1"), &node(), &[]);
        expect(&t, &["10.1.0.1:80"], None, false);
        assert_eq!(
            t.matched,
            [
                r#"nat/PREROUTING: -m comment --comment "a \"quoted\" comment -j DROP with spaces" -d 172.30.0.1 -j DNAT --to-destination 10.1.0.1:80"#
            ]
        );
        // As the Fake prints the jump rules: unquoted.
        let rs = one_rule("-m comment --comment kubernetes service portals -d 172.30.0.1 -j DNAT --to-destination 10.1.0.1:80");
        expect(
            &trace(&rs, &to("172.30.0.1"), &node(), &[]),
            &["10.1.0.1:80"],
            None,
            false,
        );
        assert_eq!(
            tokenize(r#"a "b c" d\"e "f\\g""#).unwrap(),
            ["a", "b c", "d\"e", "f\\g"]
        );
        assert_eq!(quote("a \"b\""), r#""a \"b\"""#);
    }

    #[test]
    fn protocols_and_ports() {
        assert!(hits("-p tcp --dport 80", &to("1.1.1.1")));
        assert!(hits("-m tcp -p tcp --dport 79:81", &to("1.1.1.1")));
        assert!(hits("-p tcp -m tcp ! --dport 81", &to("1.1.1.1")));
        assert!(hits(
            "-p tcp -m multiport --dports 22,70:90",
            &to("1.1.1.1")
        ));
        assert!(!hits(
            "-p tcp -m multiport --dports 22,81:90",
            &to("1.1.1.1")
        ));
        assert!(!hits("-p udp --dport 80", &to("1.1.1.1")));
        assert!(hits("! -p udp", &to("1.1.1.1")));
        assert!(hits("-p 6", &to("1.1.1.1")));
        assert!(hits("-p all", &to("1.1.1.1")));
        assert!(!hits("-p icmp", &to("1.1.1.1")));
        // `-m udp` only sees UDP, even without `-p`.
        assert!(!hits("-m udp --dport 80", &to("1.1.1.1")));
        let sctp = pkt(POD, "1.1.1.1", Protocol::Sctp, 80, Origin::External);
        assert!(hits("-m sctp -p sctp --dport 80", &sctp));
        assert!(!hits("-m tcp -p tcp --dport 80", &sctp));
    }

    #[test]
    fn addrtype_conntrack_recent_interfaces() {
        let to_node = to(NODE_IP);
        assert!(hits("-m addrtype --dst-type LOCAL", &to_node));
        assert!(hits("-m addrtype --dst-type LOCAL", &to("127.0.0.53")));
        assert!(!hits("-m addrtype --dst-type LOCAL", &to("1.1.1.1")));
        assert!(hits("-m addrtype ! --dst-type LOCAL", &to("1.1.1.1")));
        assert!(!hits("-m addrtype --src-type LOCAL", &to_node));
        let from_node = pkt(NODE_IP, "1.1.1.1", Protocol::Tcp, 80, Origin::Local);
        let rs = Ruleset::parse(
            "*nat\n-A OUTPUT -m addrtype --src-type LOCAL -j DNAT --to-destination 9.9.9.9:9\nCOMMIT\n",
        )
        .unwrap();
        expect(
            &trace(&rs, &from_node, &node(), &[]),
            &["9.9.9.9:9"],
            None,
            false,
        );

        assert!(hits("-m conntrack --ctstate NEW", &to_node));
        assert!(hits("-m conntrack --ctstate RELATED,NEW", &to_node));
        assert!(!hits(
            "-m conntrack --ctstate RELATED,ESTABLISHED",
            &to_node
        ));
        assert!(!hits("-m conntrack --ctstate INVALID", &to_node));
        assert!(hits("-m conntrack ! --ctstate INVALID", &to_node));
        assert!(hits("-m state --state NEW", &to_node));

        assert!(hits("-m recent --name X --set", &to_node));
        assert!(!hits(
            "-m recent --name X --rcheck --seconds 10800 --reap",
            &to_node
        ));
        assert!(!hits("-m recent --name X --update --seconds 1", &to_node));
        assert!(hits("-m recent --name X ! --rcheck", &to_node));

        assert!(!hits("-i eth0", &to_node));
        assert!(!hits("! -i eth0", &to_node));
        assert!(!hits("-o lo", &to_node));
        assert!(!hits("-f", &to_node));
        assert!(hits("! -f", &to_node));
    }

    #[test]
    fn marks_and_masquerade() {
        // KUBE-POSTROUTING-style: the RETURN is taken only while the mark is not set.
        let rs = Ruleset::parse(
            "*nat\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-P - [0:0]\n\
             -A PREROUTING -d 1.1.1.1 -j KUBE-P\n\
             -A PREROUTING -j KUBE-MARK-MASQ\n\
             -A PREROUTING -j KUBE-P\n\
             -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
             -A KUBE-P -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
             -A KUBE-P -j DNAT --to-destination 2.2.2.2:22\n\
             COMMIT\n",
        )
        .unwrap();
        let t = trace(&rs, &to("1.1.1.1"), &node(), &[]);
        expect(&t, &["2.2.2.2:22"], None, true);
        // The first pass through KUBE-P returned; the second, marked, DNATed.
        assert_eq!(
            t.matched.iter().filter(|m| m.contains("-j RETURN")).count(),
            1
        );

        // MARK forms without a KUBE-MARK-MASQ chain: the default mark.
        for mark in [
            "--set-xmark 0x4000/0x4000",
            "--or-mark 0x4000",
            "--set-mark 0x4000",
            "--set-mark 0x4000/0x4000",
            "--xor-mark 0x4000",
        ] {
            let rs = one_rule(&format!("-j MARK {mark}"));
            assert!(
                trace(&rs, &to("1.1.1.1"), &node(), &[]).masquerade,
                "{mark}"
            );
        }
        for mark in ["--set-xmark 0x1/0x1", "--and-mark 0x4000", "--xor-mark 0x0"] {
            let rs = one_rule(&format!("-j MARK {mark}"));
            assert!(
                !trace(&rs, &to("1.1.1.1"), &node(), &[]).masquerade,
                "{mark}"
            );
        }
        // A missing KUBE-MARK-MASQ chain is taken for the standard one.
        let rs = Ruleset::parse(
            "*nat\n-A PREROUTING -j KUBE-MARK-MASQ\n-A PREROUTING -m mark --mark 0x4000/0x4000 -j DNAT --to-destination 3.3.3.3\nCOMMIT\n",
        )
        .unwrap();
        expect(
            &trace(&rs, &to("1.1.1.1"), &node(), &[]),
            &["3.3.3.3"],
            None,
            true,
        );
    }

    #[test]
    fn walk_semantics() {
        let rs = Ruleset::parse(
            "*nat\n:KUBE-A - [0:0]\n:KUBE-B - [0:0]\n:KUBE-G - [0:0]\n\
             -A PREROUTING -m statistic --mode random --probability 0.5 -j DNAT --to-destination 1.0.0.1:1\n\
             -A PREROUTING -j KUBE-A\n\
             -A PREROUTING -j DNAT --to-destination 1.0.0.9:9\n\
             -A KUBE-A -g KUBE-G\n\
             -A KUBE-A -j DNAT --to-destination 1.0.0.8:8\n\
             -A KUBE-G -p udp -j DNAT --to-destination 1.0.0.7:7\n\
             -A KUBE-G -m statistic --mode nth --every 2 --packet 0 -j KUBE-B\n\
             -A KUBE-B -j DNAT --to-destination [fd00::1]:5\n\
             COMMIT\n",
        )
        .unwrap();
        // KUBE-G (a goto) returns past KUBE-A; the statistic DNAT and jump are both followed
        // and skipped; the first DNAT decides the filter destination.
        let t = trace(&rs, &to("9.9.9.9"), &node(), &[]);
        expect(&t, &["1.0.0.1:1", "[fd00::1]:5", "1.0.0.9:9"], None, false);

        // Filter: a local destination goes to INPUT, others to FORWARD, the node's own to OUTPUT.
        let rs = Ruleset::parse(
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n\
             -A INPUT -j REJECT --reject-with tcp-reset\n-A FORWARD -p tcp -j DROP\n\
             -A OUTPUT -m comment --comment \"count only\"\n-A OUTPUT -j ACCEPT\nCOMMIT\n",
        )
        .unwrap();
        expect(
            &trace(&rs, &to(NODE_IP), &node(), &[]),
            &[],
            Some(Verdict::Reject),
            false,
        );
        expect(
            &trace(&rs, &to("1.1.1.1"), &node(), &[]),
            &[],
            Some(Verdict::Drop),
            false,
        );
        let udp = pkt(POD, "1.1.1.1", Protocol::Udp, 80, Origin::External);
        // Policies are not applied.
        expect(&trace(&rs, &udp, &node(), &[]), &[], None, false);
        let local = pkt(NODE_IP, NODE_IP, Protocol::Tcp, 80, Origin::Local);
        let t = trace(&rs, &local, &node(), &[]);
        expect(&t, &[], Some(Verdict::Accept), false);
        assert_eq!(t.matched.len(), 2);

        // A jump loop ends with a note, not a hang.
        let rs = Ruleset::parse(
            "*nat\n:KUBE-L - [0:0]\n-A PREROUTING -j KUBE-L\n-A KUBE-L -j KUBE-L\nCOMMIT\n",
        )
        .unwrap();
        let t = trace(&rs, &to("1.1.1.1"), &node(), &[]);
        assert!(
            t.matched.last().unwrap().contains("nested deeper"),
            "{:?}",
            t.matched.last()
        );
    }

    #[test]
    fn set_matches_look_in_the_given_sets_and_physdev_never_matches() {
        let rs = Ruleset::parse(
            "*nat\n\
             -A PREROUTING -m set --match-set S dst,dst -m physdev --physdev-is-in -j DNAT --to-destination 7.7.7.7:7\n\
             -A PREROUTING -m set ! --match-set S dst,dst -j DNAT --to-destination 6.6.6.6:6\n\
             -A PREROUTING -m set --match-set S dst,dst -m physdev ! --physdev-is-in -j DNAT --to-destination 5.5.5.5:5\n\
             COMMIT\n",
        )
        .unwrap();
        let mut facts = node();
        facts.sets.insert(
            "S".into(),
            crate::trace::Contents {
                kind: "hash:ip,port".into(),
                members: ["1.1.1.1,tcp:80".to_owned()].into(),
            },
        );
        expect(
            &trace(&rs, &to("1.1.1.1"), &facts, &[]),
            &["5.5.5.5:5"],
            None,
            false,
        );
        // Not a member (or no such set): the negated rule matches.
        expect(
            &trace(&rs, &to("2.2.2.2"), &facts, &[]),
            &["6.6.6.6:6"],
            None,
            false,
        );
        expect(
            &trace(&rs, &to("1.1.1.1"), &node(), &[]),
            &["6.6.6.6:6"],
            None,
            false,
        );
    }

    #[test]
    fn unsupported_rules_never_match_and_are_noted() {
        let rs = Ruleset::parse(
            "*nat\n\
             -A PREROUTING -d 1.1.1.1 -m owner --uid-owner 0 -j DNAT --to-destination 6.6.6.6:6\n\
             -A PREROUTING -d 2.2.2.2 -m owner --uid-owner 0 -j DNAT --to-destination 6.6.6.6:6\n\
             -A PREROUTING -d 1.1.1.1 -p tcp -m tcp --tcp-flags SYN,ACK SYN -j DNAT --to-destination 6.6.6.6:6\n\
             -A PREROUTING -d 1.1.1.1 -j KUBE-NOWHERE\n\
             -A PREROUTING -d 1.1.1.1 -j CT --notrack\n\
             -A PREROUTING -d 1.1.1.1 -j DNAT --to-destination 5.5.5.5:5\n\
             COMMIT\n",
        )
        .unwrap();
        let t = trace(&rs, &to("1.1.1.1"), &node(), &[]);
        expect(&t, &["5.5.5.5:5"], None, false);
        let notes: Vec<&String> = t
            .matched
            .iter()
            .filter(|m| m.starts_with("unsupported: "))
            .collect();
        assert_eq!(notes.len(), 4, "{notes:#?}");
        assert!(
            notes[0].ends_with("(-m owner, --uid-owner)"),
            "{}",
            notes[0]
        );
        assert!(notes[1].ends_with("(--tcp-flags)"), "{}", notes[1]);
        assert!(
            notes[2].contains("unknown target KUBE-NOWHERE"),
            "{}",
            notes[2]
        );
        assert!(notes[3].contains("--notrack"), "{}", notes[3]);
    }

    #[test]
    fn garbage_is_an_error_naming_the_line() {
        for (text, line) in [
            ("*nat\n-A PREROUTING -j ACCEPT\nfoo bar\nCOMMIT\n", "line 3"),
            ("-A PREROUTING -j ACCEPT\n", "line 1"),
            (
                "*nat\n-A PREROUTING -m comment --comment \"open\nCOMMIT\n",
                "line 2",
            ),
            (
                "*nat\n\n-A PREROUTING -s 10.0.0.300 -j ACCEPT\nCOMMIT\n",
                "line 3",
            ),
            (
                "*nat\n-A PREROUTING -p tcp --dport 99999 -j ACCEPT\n",
                "line 2",
            ),
            ("*nat\n-A PREROUTING -j DNAT\n", "line 2"),
            (
                "*nat\n-A PREROUTING -j DNAT --to-destination nowhere\n",
                "line 2",
            ),
            ("*nat\n-A PREROUTING -d\n", "line 2"),
            (
                "*nat\n-A PREROUTING -m mark --mark 0xzz -j ACCEPT\n",
                "line 2",
            ),
            ("*nat\n-A PREROUTING stray -j ACCEPT\n", "line 2"),
            ("*nat\n-A PREROUTING ! ! -s 1.1.1.1\n", "line 2"),
            ("*nat\n-A PREROUTING -j A -j B\n", "line 2"),
            ("COMMIT\n", "line 1"),
            ("*nat\n:NOPOLICY\n", "line 2"),
        ] {
            match Ruleset::parse(text) {
                Err(Error::InvalidInput(msg)) => assert!(msg.contains(line), "{text:?}: {msg}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn dnat_destinations() {
        assert_eq!(
            parse_dnat("10.1.0.1:8080").unwrap(),
            (ip("10.1.0.1"), Some(8080))
        );
        assert_eq!(
            parse_dnat("[fd00::1]:80").unwrap(),
            (ip("fd00::1"), Some(80))
        );
        assert_eq!(parse_dnat("fd00::1").unwrap(), (ip("fd00::1"), None));
        assert_eq!(parse_dnat("10.1.0.1").unwrap(), (ip("10.1.0.1"), None));
        assert_eq!(
            parse_dnat("10.1.0.1-10.1.0.9:80-90").unwrap(),
            (ip("10.1.0.1"), Some(80))
        );
        for bad in ["", "x:1", "10.1.0.1:x", "[fd00::1", "[fd00::1]x"] {
            assert!(parse_dnat(bad).is_err(), "{bad}");
        }
    }
}
