//! Applying rules: the kernel through the iptables tools, or an in-memory Fake.

use super::jumps::{Jump, BUILTIN_TARGETS};
use crate::error::{Error, Result};
use crate::exec;
use crate::model::IpFamily;
use std::collections::{BTreeMap, BTreeSet};

/// Where rules go. One backend serves one IP family.
pub trait Backend: Send {
    /// Feed `iptables-restore --noflush`: all of it applies, or none of it does.
    fn restore(&mut self, text: &str) -> Result<()>;
    /// Make sure each jump rule exists in its built-in chain (inserting it at the top if not).
    fn ensure_jumps(&mut self, jumps: &[Jump]) -> Result<()>;
    /// Remove the jump rules (cleanup).
    fn remove_jumps(&mut self, jumps: &[Jump]) -> Result<()>;
    /// Names of the chains that exist in `table`.
    fn chains(&mut self, table: &str) -> Result<BTreeSet<String>>;
    /// Whether one chain exists (cheap: does not list the table).
    fn chain_exists(&mut self, table: &str, chain: &str) -> Result<bool>;
    /// The tables as `iptables-save` prints them (for tests, tracing and `--dry-run`).
    fn dump(&mut self) -> Result<String>;
    /// Create the nfacct counter `name` unless it exists ([`crate::nfacct`]): a rule may
    /// name it (`-m nfacct --nfacct-name`) only after this succeeded.
    fn ensure_counter(&mut self, name: &str) -> Result<()>;
    /// The packets the nfacct counter `name` has counted (`None`: no such counter).
    fn counter(&self, name: &str) -> Result<Option<u64>>;
}

fn nfacct_error(name: &str, e: std::io::Error) -> Error {
    Error::Apply {
        op: "nfacct",
        code: e.raw_os_error(),
        stderr: format!("{name}: {e}"),
    }
}

/// The real kernel, through `iptables-restore`, `iptables` and `iptables-save` (or the ip6
/// variants). Every call waits for the xtables lock (`-w`) rather than failing on contention.
pub struct Kernel {
    family: IpFamily,
}

/// How long to wait for the xtables lock (upstream's value). The nft backend ignores `-W`
/// (the polling interval) with a warning, so it is not passed.
const WAIT_SECONDS: &str = "5";

impl Kernel {
    pub fn new(family: IpFamily) -> Kernel {
        Kernel { family }
    }

    fn tool(&self, base: &str) -> String {
        match self.family {
            IpFamily::V4 => format!("ip{base}"),
            IpFamily::V6 => format!("ip6{base}"),
        }
    }

    fn jump_cmd(&self, verb: &str, j: &Jump) -> Vec<String> {
        let mut v: Vec<String> = ["-w", WAIT_SECONDS, "-t", j.table, verb, j.from]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        v.extend(j.rule_args().iter().map(|s| (*s).to_owned()));
        v
    }
}

impl Backend for Kernel {
    fn restore(&mut self, text: &str) -> Result<()> {
        let prog = self.tool("tables-restore");
        let out = exec::run(
            "iptables-restore",
            &prog,
            &["-w", WAIT_SECONDS, "--noflush"],
            Some(text),
        )?;
        exec::check("iptables-restore", out).map(|_| ())
    }

    fn ensure_jumps(&mut self, jumps: &[Jump]) -> Result<()> {
        let prog = self.tool("tables");
        for j in jumps {
            let check = self.jump_cmd("-C", j);
            let check: Vec<&str> = check.iter().map(String::as_str).collect();
            let insert = self.jump_cmd("-I", j);
            let insert: Vec<&str> = insert.iter().map(String::as_str).collect();
            // Another program may be changing the table at the same moment (a firewall reload
            // can even delete the chain we jump to): re-check and retry a few times, then
            // fail the sync so that the next one is full.
            let mut last = None;
            for attempt in 0..4 {
                if exec::run("iptables -C", &prog, &check, None)?
                    .status
                    .success()
                {
                    last = None;
                    break;
                }
                match exec::check(
                    "iptables -I",
                    exec::run("iptables -I", &prog, &insert, None)?,
                ) {
                    Ok(_) => {
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(e),
                }
                std::thread::sleep(std::time::Duration::from_millis(20 << attempt));
            }
            if let Some(e) = last {
                return Err(e);
            }
        }
        Ok(())
    }

    fn remove_jumps(&mut self, jumps: &[Jump]) -> Result<()> {
        let prog = self.tool("tables");
        for j in jumps {
            let del = self.jump_cmd("-D", j);
            let args: Vec<&str> = del.iter().map(String::as_str).collect();
            // A rule may have been inserted more than once by an earlier crash; delete every
            // copy, but never loop without bound.
            for _ in 0..16 {
                let out = exec::run("iptables -D", &prog, &args, None)?;
                if !out.status.success() {
                    break;
                }
            }
        }
        Ok(())
    }

    fn chains(&mut self, table: &str) -> Result<BTreeSet<String>> {
        let prog = self.tool("tables-save");
        let out = exec::check(
            "iptables-save",
            exec::run("iptables-save", &prog, &["-t", table], None)?,
        )?;
        Ok(parse_chain_names(&String::from_utf8_lossy(&out.stdout)))
    }

    fn chain_exists(&mut self, table: &str, chain: &str) -> Result<bool> {
        let prog = self.tool("tables");
        let out = exec::run(
            "iptables -S",
            &prog,
            &["-w", WAIT_SECONDS, "-t", table, "-S", chain, "1"],
            None,
        )?;
        Ok(out.status.success())
    }

    fn dump(&mut self) -> Result<String> {
        let prog = self.tool("tables-save");
        let mut text = String::new();
        for table in ["filter", "nat"] {
            let out = exec::check(
                "iptables-save",
                exec::run("iptables-save", &prog, &["-t", table], None)?,
            )?;
            text.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        Ok(text)
    }

    fn ensure_counter(&mut self, name: &str) -> Result<()> {
        crate::nfacct::ensure(name).map_err(|e| nfacct_error(name, e))
    }

    fn counter(&self, name: &str) -> Result<Option<u64>> {
        crate::nfacct::packets(name).map_err(|e| nfacct_error(name, e))
    }
}

fn parse_chain_names(save: &str) -> BTreeSet<String> {
    save.lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

const BUILTIN: &[(&str, &[&str])] = &[
    ("filter", &["INPUT", "FORWARD", "OUTPUT"]),
    ("nat", &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"]),
    (
        "mangle",
        &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"],
    ),
];

type Tables = BTreeMap<String, BTreeMap<String, Vec<String>>>;

/// An in-memory kernel with iptables-restore's semantics: `--noflush`, a declared chain is
/// created or flushed, every table commits all-or-nothing, a rule may only jump to a chain that
/// exists, a rule may only name an nfacct counter that exists, and a chain may only be deleted
/// when nothing references it.
pub struct Fake {
    tables: Tables,
    /// nfacct counters by name, with their packet counts.
    pub counters: BTreeMap<String, u64>,
    /// `ensure_counter` fails (a kernel without nfnetlink_acct, or no CAP_NET_ADMIN).
    pub no_counters: bool,
    /// Every restore input accepted so far (tests assert on what partial syncs wrote).
    pub restores: Vec<String>,
    /// Make the next N restores fail (fault injection).
    pub fail_next: usize,
}

impl Default for Fake {
    fn default() -> Self {
        Fake::new()
    }
}

impl Fake {
    pub fn new() -> Fake {
        let mut tables = Tables::new();
        for (t, chains) in BUILTIN {
            let m = tables.entry((*t).to_owned()).or_default();
            for c in *chains {
                m.insert((*c).to_owned(), Vec::new());
            }
        }
        Fake {
            tables,
            counters: BTreeMap::new(),
            no_counters: false,
            restores: Vec::new(),
            fail_next: 0,
        }
    }

    fn is_builtin(table: &str, chain: &str) -> bool {
        BUILTIN
            .iter()
            .any(|(t, cs)| *t == table && cs.contains(&chain))
    }

    /// The rules of one chain, as the `-A` arguments after the chain name.
    pub fn rules(&self, table: &str, chain: &str) -> Option<&[String]> {
        self.tables.get(table)?.get(chain).map(Vec::as_slice)
    }

    fn apply_table(
        table: &str,
        chains: &mut BTreeMap<String, Vec<String>>,
        counters: &BTreeMap<String, u64>,
        lines: &[(usize, &str)],
    ) -> Result<()> {
        let fail = |n: usize, msg: String| Error::Apply {
            op: "iptables-restore",
            code: Some(1),
            stderr: format!("line {n}: {msg}"),
        };
        for &(n, line) in lines {
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or("");
                if name.is_empty() {
                    return Err(fail(n, "empty chain name".into()));
                }
                if !Fake::is_builtin(table, name) {
                    chains.insert(name.to_owned(), Vec::new());
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let (chain, rule) = rest.split_once(' ').unwrap_or((rest, ""));
                let r = chains
                    .get_mut(chain)
                    .ok_or_else(|| fail(n, format!("chain {chain} does not exist")))?;
                if let Some(name) = nfacct_name(rule) {
                    // xt_nfacct's checkentry: the counter must exist when the rule is added.
                    if !counters.contains_key(name) {
                        return Err(fail(n, format!("nfacct counter {name} does not exist")));
                    }
                }
                r.push(rule.to_owned());
            } else if let Some(rest) = line.strip_prefix("-D ") {
                // Delete the first rule that matches (iptables compares the rule's meaning;
                // the Fake, the text iptables-save printed).
                let (chain, rule) = rest.split_once(' ').unwrap_or((rest, ""));
                let rules = chains
                    .get_mut(chain)
                    .ok_or_else(|| fail(n, format!("chain {chain} does not exist")))?;
                let at = rules.iter().position(|r| r == rule).ok_or_else(|| {
                    fail(
                        n,
                        "Bad rule (does a matching rule exist in that chain?)".into(),
                    )
                })?;
                rules.remove(at);
            } else if let Some(name) = line.strip_prefix("-X ") {
                if chains.remove(name.trim()).is_none() {
                    return Err(fail(n, format!("chain {name} does not exist")));
                }
            } else if !line.trim().is_empty() && !line.starts_with('#') {
                return Err(fail(n, format!("unsupported line {line:?}")));
            }
        }
        // Referential integrity at commit, as the kernel checks it.
        for (chain, rules) in chains.iter() {
            for rule in rules {
                if let Some(target) = jump_target(rule) {
                    if !BUILTIN_TARGETS.contains(&target) && !chains.contains_key(target) {
                        return Err(fail(0, format!("{chain}: jump to missing chain {target}")));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The counter a rule's `-m nfacct --nfacct-name` names, if any.
pub fn nfacct_name(rule: &str) -> Option<&str> {
    let mut it = rule.split_whitespace();
    while let Some(tok) = it.next() {
        if tok == "--nfacct-name" {
            return it.next();
        }
    }
    None
}

/// The `-j` target of a rule, if any.
pub fn jump_target(rule: &str) -> Option<&str> {
    let mut it = rule.split_whitespace();
    while let Some(tok) = it.next() {
        if tok == "-j" {
            return it.next();
        }
    }
    None
}

impl Backend for Fake {
    fn restore(&mut self, text: &str) -> Result<()> {
        if self.fail_next > 0 {
            self.fail_next -= 1;
            return Err(Error::Apply {
                op: "iptables-restore",
                code: Some(1),
                stderr: "injected failure".into(),
            });
        }
        // Group lines by table; apply each table to a copy, then commit all copies.
        let mut staged = self.tables.clone();
        let mut current: Option<(String, Vec<(usize, &str)>)> = None;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            if let Some(t) = line.strip_prefix('*') {
                current = Some((t.to_owned(), Vec::new()));
            } else if line == "COMMIT" {
                let (t, lines) = current.take().ok_or_else(|| Error::Apply {
                    op: "iptables-restore",
                    code: Some(1),
                    stderr: format!("line {n}: COMMIT outside a table"),
                })?;
                let chains = staged.entry(t.clone()).or_default();
                Fake::apply_table(&t, chains, &self.counters, &lines)?;
            } else if let Some((_, lines)) = current.as_mut() {
                lines.push((n, line));
            }
        }
        if current.is_some() {
            return Err(Error::Apply {
                op: "iptables-restore",
                code: Some(1),
                stderr: "missing COMMIT".into(),
            });
        }
        self.tables = staged;
        self.restores.push(text.to_owned());
        Ok(())
    }

    fn ensure_counter(&mut self, name: &str) -> Result<()> {
        if self.no_counters {
            return Err(Error::Apply {
                op: "nfacct",
                code: Some(libc::EOPNOTSUPP),
                stderr: format!("{name}: Operation not supported"),
            });
        }
        self.counters.entry(name.to_owned()).or_insert(0);
        Ok(())
    }

    fn counter(&self, name: &str) -> Result<Option<u64>> {
        Ok(self.counters.get(name).copied())
    }

    fn ensure_jumps(&mut self, jumps: &[Jump]) -> Result<()> {
        for j in jumps {
            let rule = j.rule_text();
            let chains = self.tables.entry(j.table.to_owned()).or_default();
            if !chains.contains_key(j.to) {
                return Err(Error::Apply {
                    op: "iptables -I",
                    code: Some(1),
                    stderr: format!("chain {} does not exist", j.to),
                });
            }
            let builtin = chains.entry(j.from.to_owned()).or_default();
            if !builtin.contains(&rule) {
                builtin.insert(0, rule);
            }
        }
        Ok(())
    }

    fn remove_jumps(&mut self, jumps: &[Jump]) -> Result<()> {
        for j in jumps {
            let rule = j.rule_text();
            if let Some(b) = self.tables.get_mut(j.table).and_then(|c| c.get_mut(j.from)) {
                b.retain(|r| *r != rule);
            }
        }
        Ok(())
    }

    fn chains(&mut self, table: &str) -> Result<BTreeSet<String>> {
        Ok(self
            .tables
            .get(table)
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default())
    }

    fn chain_exists(&mut self, table: &str, chain: &str) -> Result<bool> {
        Ok(self
            .tables
            .get(table)
            .is_some_and(|t| t.contains_key(chain)))
    }

    fn dump(&mut self) -> Result<String> {
        let mut out = String::new();
        for table in ["filter", "nat"] {
            let Some(chains) = self.tables.get(table) else {
                continue;
            };
            out.push_str(&format!("*{table}\n"));
            for name in chains.keys() {
                let policy = if Fake::is_builtin(table, name) {
                    "ACCEPT"
                } else {
                    "-"
                };
                out.push_str(&format!(":{name} {policy} [0:0]\n"));
            }
            for (name, rules) in chains {
                for r in rules {
                    out.push_str(&format!("-A {name} {r}\n"));
                }
            }
            out.push_str("COMMIT\n");
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_is_all_or_nothing() {
        let mut f = Fake::new();
        f.restore("*nat\n:KUBE-A - [0:0]\n-A KUBE-A -j RETURN\nCOMMIT\n")
            .unwrap();
        // The second table fails: nothing of this restore may stay.
        let bad = "*nat\n:KUBE-B - [0:0]\n-A KUBE-B -j RETURN\nCOMMIT\n*filter\n-A NOPE -j DROP\nCOMMIT\n";
        assert!(f.restore(bad).is_err());
        assert!(f.chains("nat").unwrap().contains("KUBE-A"));
        assert!(!f.chains("nat").unwrap().contains("KUBE-B"));
    }

    #[test]
    fn fake_rejects_dangling_jumps_and_flushes_declared_chains() {
        let mut f = Fake::new();
        assert!(f
            .restore("*nat\n:KUBE-A - [0:0]\n-A KUBE-A -j KUBE-MISSING\nCOMMIT\n")
            .is_err());
        f.restore("*nat\n:KUBE-A - [0:0]\n-A KUBE-A -j RETURN\nCOMMIT\n")
            .unwrap();
        f.restore("*nat\n:KUBE-A - [0:0]\n-A KUBE-A -j ACCEPT\nCOMMIT\n")
            .unwrap();
        assert_eq!(f.rules("nat", "KUBE-A").unwrap(), ["-j ACCEPT"]);
    }

    #[test]
    fn parses_chain_names_from_save_output() {
        let names = parse_chain_names(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SVC-X - [0:0]\n-A X\nCOMMIT\n",
        );
        assert!(names.contains("KUBE-SVC-X") && names.contains("PREROUTING"));
    }
}
