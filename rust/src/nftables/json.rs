//! Reading kproxy's table back from the kernel: `nft -j list table` -> [`Model`], so that the
//! tracer and the diff work on the rules actually programmed (`kproxy trace --live`,
//! `kproxy diff --live`).
//!
//! Only the vocabulary kproxy writes is understood. Anything else (a rule someone added by
//! hand, an expression of a newer nft) becomes [`Match::Foreign`]: it never matches in the
//! tracer and shows up, as nft printed it, in a diff. Sets and maps are recognized by name
//! (kproxy's fixed sets and its endpoint pools); others are skipped.

use super::ast::{Data, Field, Hook, Key, Match, Rule, SetDef, Stmt, Value};
use super::backend::{Chain, Model, Set};
use super::render::{self, Pool};
use crate::config::{LocalDetector, RenderConfig};
use crate::error::{Error, Result};
use crate::model::{Cidr, IpFamily, Protocol};
use serde_json::Value as J;
use std::net::IpAddr;

fn bad(what: impl std::fmt::Display) -> Error {
    Error::InvalidInput(format!("nft -j list table: {what}"))
}

/// The set declarations kproxy could have made in this family, by name.
fn known_set(name: &str, family: IpFamily) -> Option<SetDef> {
    if let Some(p) = Pool::parse(name) {
        return Some(p.set_def());
    }
    let cfg = RenderConfig {
        family,
        node_name: String::new(),
        local: LocalDetector::None,
        masquerade_all: false,
        masquerade_mark: 0,
        nodeport_ips: Some(Vec::new()), // declares nodeport-ips too
        conntrack_tcp_be_liberal: false,
        node_ips: Vec::new(),
        localhost_nodeports: false,
        nfacct: Vec::new(),
    };
    render::fixed(&cfg)
        .sets
        .into_iter()
        .find(|d| d.name == name)
}

/// Parse `nft -j list table <family> kproxy` output.
pub fn model_from_json(json: &[u8], family: IpFamily) -> Result<Model> {
    let v: J = serde_json::from_slice(json).map_err(bad)?;
    let items = v["nftables"]
        .as_array()
        .ok_or_else(|| bad("no nftables array"))?;
    let mut m = Model::default();
    for item in items {
        if item.get("table").is_some() {
            m.exists = true;
        } else if let Some(c) = item.get("chain") {
            let name = str_of(&c["name"])?.to_owned();
            let hook = hook_of(c);
            m.chains.insert(
                name,
                Chain {
                    hook,
                    rules: Vec::new(),
                },
            );
        } else if let Some(s) = item.get("set").or_else(|| item.get("map")) {
            let name = str_of(&s["name"])?;
            let Some(def) = known_set(name, family) else {
                continue;
            };
            let types = type_list(&s["type"]);
            let data_types = type_list(&s["map"]);
            let mut set = Set {
                def,
                elements: Default::default(),
            };
            for e in s["elem"].as_array().into_iter().flatten() {
                let (k, d) = match e.as_array() {
                    Some(pair) if pair.len() == 2 => (&pair[0], Some(&pair[1])),
                    _ => (e, None),
                };
                // Elements with a timeout come wrapped: {"elem": {"val": ..., "timeout": ...}}.
                let k = k.get("elem").map(|x| &x["val"]).unwrap_or(k);
                let key = key_of(k, &types)?;
                let data = match d {
                    Some(d) => Some(data_of(d, &data_types)?),
                    None => None,
                };
                set.elements.insert(key, data);
            }
            m.sets.insert(name.to_owned(), set);
        }
    }
    for item in items {
        if let Some(r) = item.get("rule") {
            let chain = str_of(&r["chain"])?;
            let rule = rule_of(r["expr"].as_array().map(Vec::as_slice).unwrap_or(&[]));
            if let Some(c) = m.chains.get_mut(chain) {
                c.rules.push(rule);
            }
        }
    }
    Ok(m)
}

fn str_of(v: &J) -> Result<&str> {
    v.as_str()
        .ok_or_else(|| bad(format!("expected a string, got {v}")))
}

fn hook_of(c: &J) -> Option<Hook> {
    let kind = match c["type"].as_str()? {
        "filter" => "filter",
        "nat" => "nat",
        _ => return None,
    };
    let hook = match c["hook"].as_str()? {
        "prerouting" => "prerouting",
        "input" => "input",
        "forward" => "forward",
        "output" => "output",
        "postrouting" => "postrouting",
        _ => return None,
    };
    Some(Hook {
        kind,
        hook,
        priority: c["prio"].as_i64()? as i32,
    })
}

/// A set's key or data type: `"ipv4_addr"`, `["ipv4_addr", "inet_service"]`, or (data of a
/// `typeof` map) `"ipv4_addr . inet_service"`.
fn type_list(v: &J) -> Vec<String> {
    let words: Vec<&str> = match v {
        J::String(s) => vec![s.as_str()],
        J::Array(a) => a.iter().filter_map(J::as_str).collect(),
        _ => Vec::new(),
    };
    words
        .iter()
        .flat_map(|w| w.split(" . "))
        .map(str::to_owned)
        .collect()
}

fn parts(v: &J) -> Vec<&J> {
    match v.get("concat").and_then(J::as_array) {
        Some(a) => a.iter().collect(),
        None => vec![v],
    }
}

fn value_of(v: &J, ty: &str) -> Result<Value> {
    if let Some(p) = v.get("prefix") {
        let c: Cidr = format!("{}/{}", str_of(&p["addr"])?, p["len"])
            .parse()
            .map_err(bad)?;
        return Ok(Value::Cidr(c));
    }
    Ok(match ty {
        "ipv4_addr" | "ipv6_addr" => {
            let a: IpAddr = str_of(v)?.parse().map_err(bad)?;
            Value::Addr(a)
        }
        "inet_proto" => Value::Proto(proto_of(v)?),
        "inet_service" => Value::Port(
            v.as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| bad(format!("port {v}")))?,
        ),
        _ => Value::Int(
            v.as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .ok_or_else(|| bad(format!("integer {v}")))?,
        ),
    })
}

fn proto_of(v: &J) -> Result<Protocol> {
    match v.as_str() {
        Some("tcp") => Ok(Protocol::Tcp),
        Some("udp") => Ok(Protocol::Udp),
        Some("sctp") => Ok(Protocol::Sctp),
        _ => Err(bad(format!("protocol {v}"))),
    }
}

fn key_of(v: &J, types: &[String]) -> Result<Key> {
    let ps = parts(v);
    if ps.len() != types.len() {
        return Err(bad(format!("element {v} does not fit {types:?}")));
    }
    ps.iter().zip(types).map(|(p, t)| value_of(p, t)).collect()
}

fn data_of(v: &J, types: &[String]) -> Result<Data> {
    if let Some(g) = v.get("goto") {
        return Ok(Data::Goto(str_of(&g["target"])?.to_owned()));
    }
    if v.get("drop").is_some() || v.as_str() == Some("drop") {
        return Ok(Data::Drop);
    }
    let key = key_of(v, types)?;
    match key.as_slice() {
        [Value::Addr(a), Value::Port(p)] => Ok(Data::Dnat(*a, *p)),
        _ => Err(bad(format!("map data {v}"))),
    }
}

/// An expression as a key field, if it is one kproxy uses.
fn field_of(v: &J) -> Option<Field> {
    if let Some(p) = v.get("payload") {
        return match (p["protocol"].as_str()?, p["field"].as_str()?) {
            ("ip" | "ip6", "saddr") => Some(Field::Saddr),
            ("ip" | "ip6", "daddr") => Some(Field::Daddr),
            (_, "dport") => Some(Field::Dport),
            _ => None,
        };
    }
    if v.get("meta").map(|m| &m["key"]) == Some(&J::from("l4proto")) {
        return Some(Field::L4proto);
    }
    if let Some(n) = v.get("numgen") {
        let modulus = u32::try_from(n["mod"].as_u64()?).ok()?;
        // nft prints offsets of 2^31 and above as negative numbers.
        let offset = match &n["offset"] {
            J::Null => 0,
            o => o
                .as_u64()
                .or_else(|| o.as_i64().map(|v| u64::from(v as u32)))
                .and_then(|v| u32::try_from(v).ok())?,
        };
        return match n["mode"].as_str()? {
            "inc" if modulus == 1 => Some(Field::Const(offset)),
            "random" if offset == 0 => Some(Field::Random(modulus)),
            _ => None,
        };
    }
    None
}

fn fields_of(v: &J) -> Option<Vec<Field>> {
    parts(v).into_iter().map(field_of).collect()
}

fn set_ref(v: &J) -> Option<String> {
    v.as_str()?.strip_prefix('@').map(str::to_owned)
}

fn cidr_of(v: &J) -> Option<Cidr> {
    if let Some(p) = v.get("prefix") {
        return format!("{}/{}", p["addr"].as_str()?, p["len"]).parse().ok();
    }
    let a: IpAddr = v.as_str()?.parse().ok()?;
    format!("{a}/{}", if a.is_ipv4() { 32 } else { 128 })
        .parse()
        .ok()
}

fn match_of(m: &J) -> Option<Match> {
    let op = m["op"].as_str()?;
    let neg = match op {
        "==" | "in" => false,
        "!=" => true,
        _ => return None,
    };
    let (left, right) = (&m["left"], &m["right"]);
    if let Some(set) = set_ref(right) {
        return Some(Match::Lookup {
            fields: fields_of(left)?,
            set,
            neg,
        });
    }
    if let Some(ct) = left.get("ct") {
        let words: Vec<&str> = match right {
            J::String(s) => vec![s.as_str()],
            J::Array(a) => a.iter().filter_map(J::as_str).collect(),
            _ => return None,
        };
        return match (ct["key"].as_str()?, words.as_slice(), neg) {
            ("state", ["new"], false) => Some(Match::CtStateNew),
            ("status", ["dnat"], false) => Some(Match::CtStatusDnat),
            _ => None,
        };
    }
    if let Some(f) = left.get("fib") {
        let flags: Vec<&str> = f["flags"]
            .as_array()?
            .iter()
            .filter_map(J::as_str)
            .collect();
        if f["result"].as_str()? != "type" || right.as_str()? != "local" || neg {
            return None;
        }
        return match flags.as_slice() {
            ["saddr"] => Some(Match::FibLocal { src: true }),
            ["daddr"] => Some(Match::FibLocal { src: false }),
            _ => None,
        };
    }
    if let Some(and) = left.get("&").and_then(J::as_array) {
        // meta mark & M != 0
        if and.first()?.get("meta")?["key"].as_str()? == "mark" && neg && right.as_u64()? == 0 {
            return Some(Match::MarkAny(u32::try_from(and.get(1)?.as_u64()?).ok()?));
        }
        return None;
    }
    if let Some(meta) = left.get("meta") {
        return match meta["key"].as_str()? {
            "iifname" => {
                let n = right.as_str()?;
                let name = match n.strip_suffix('*') {
                    Some(p) => format!("{p}+"),
                    None => n.to_owned(),
                };
                Some(Match::Iif { name, neg })
            }
            "l4proto" if !neg => Some(Match::L4proto(proto_of(right).ok()?)),
            _ => None,
        };
    }
    if let Some(n) = left.get("numgen") {
        if n["mode"].as_str()? == "random" && right.as_u64()? == 0 && !neg {
            return Some(Match::OneIn(u32::try_from(n["mod"].as_u64()?).ok()?));
        }
        return None;
    }
    if let Some(p) = left.get("payload") {
        let cidr = cidr_of(right)?;
        return match p["field"].as_str()? {
            "saddr" => Some(Match::Saddr { cidr, neg }),
            "daddr" => Some(Match::Daddr { cidr, neg }),
            _ => None,
        };
    }
    None
}

fn stmt_of(s: &J, proto: Option<Protocol>) -> Option<Stmt> {
    let (name, body) = s.as_object()?.iter().next()?;
    match name.as_str() {
        "jump" => Some(Stmt::Jump(body["target"].as_str()?.to_owned())),
        "goto" => Some(Stmt::Goto(body["target"].as_str()?.to_owned())),
        "drop" => Some(Stmt::Drop),
        // A plain `reject` is an ICMP port unreachable, which nft sometimes spells out.
        "reject" => match (
            body.get("type").and_then(J::as_str),
            body.get("expr").and_then(J::as_str),
        ) {
            (Some("tcp reset"), _) => Some(Stmt::RejectReset),
            (None, None) => Some(Stmt::Reject),
            (Some("icmp" | "icmpv6" | "icmpx"), Some("port-unreachable")) => Some(Stmt::Reject),
            _ => None,
        },
        "vmap" => Some(Stmt::Vmap {
            fields: fields_of(&body["key"])?,
            map: set_ref(&body["data"])?,
        }),
        "masquerade" => Some(Stmt::Masquerade),
        "dnat" => {
            let proto = proto?;
            if let Some(map) = body["addr"].get("map") {
                return Some(Stmt::DnatMap {
                    protocol: proto,
                    fields: fields_of(&map["key"])?,
                    map: set_ref(&map["data"])?,
                });
            }
            let a: IpAddr = body["addr"].as_str()?.parse().ok()?;
            let port = u16::try_from(body["port"].as_u64()?).ok()?;
            Some(Stmt::Dnat(proto, a, port))
        }
        "set" => {
            if body["op"].as_str()? != "update" {
                return None;
            }
            let elem = &body["elem"];
            let inner = elem.get("elem").unwrap_or(elem);
            Some(Stmt::Update {
                fields: fields_of(inner.get("val").unwrap_or(inner))?,
                set: set_ref(&body["set"])?,
                timeout: u32::try_from(inner["timeout"].as_u64()?).ok()?,
            })
        }
        _ => None,
    }
}

/// `meta mark set meta mark | M` or `^ M`, as the mangle statement nft prints.
fn mark_op(s: &J) -> Option<(bool, u32)> {
    let m = s.get("mangle")?;
    if m["key"].get("meta")?["key"].as_str()? != "mark" {
        return None;
    }
    let (op, args) = m["value"].as_object()?.iter().next()?;
    let bits = u32::try_from(args.as_array()?.get(1)?.as_u64()?).ok()?;
    match op.as_str() {
        "|" => Some((false, bits)),
        "^" => Some((true, bits)),
        _ => None,
    }
}

fn rule_of(exprs: &[J]) -> Rule {
    let foreign = || {
        let text = serde_json::to_string(exprs).unwrap_or_default();
        Rule::new(vec![Match::Foreign(text)], Stmt::Drop)
    };
    let mut matches = Vec::new();
    let mut proto = None;
    let mut stmts = Vec::new();
    for e in exprs {
        if let Some(m) = e.get("match") {
            match match_of(m) {
                Some(Match::L4proto(p)) => {
                    proto = Some(p);
                    matches.push(Match::L4proto(p));
                }
                Some(x) => matches.push(x),
                None => return foreign(),
            }
        } else if e.get("counter").is_some() {
            continue;
        } else {
            stmts.push(e);
        }
    }
    // `meta l4proto tcp dnat ...`: nft folds the protocol into the statement's dependency;
    // kproxy's own form keeps it in the statement.
    let stmt = match stmts.as_slice() {
        [s] => {
            if let Some((false, bits)) = mark_op(s) {
                Some(Stmt::MarkOr(bits))
            } else {
                let dnat_proto = proto.or_else(|| dnat_protocol(s));
                stmt_of(s, dnat_proto)
            }
        }
        [mark, masq] if masq.get("masquerade").is_some() => match mark_op(mark) {
            Some((true, bits)) => Some(Stmt::ClearMarkMasquerade(bits)),
            _ => None,
        },
        _ => None,
    };
    let Some(stmt) = stmt else {
        return foreign();
    };
    if matches!(stmt, Stmt::Dnat(..) | Stmt::DnatMap { .. }) {
        matches.retain(|m| !matches!(m, Match::L4proto(_)));
    }
    // `reject with tcp reset` implies `meta l4proto tcp`, which nft then leaves out.
    if stmt == Stmt::RejectReset && !matches.iter().any(|m| matches!(m, Match::L4proto(_))) {
        matches.push(Match::L4proto(Protocol::Tcp));
    }
    Rule::new(matches, stmt)
}

/// The transport protocol a DNAT map's key names (`tcp dport` in `ip daddr . tcp dport`).
fn dnat_protocol(s: &J) -> Option<Protocol> {
    let key = &s["dnat"]["addr"]["map"]["key"];
    parts(key).into_iter().find_map(|p| {
        let pl = p.get("payload")?;
        (pl["field"].as_str()? == "dport")
            .then(|| proto_of(&pl["protocol"]).ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::super::ast::{Fmt, SetSpec};
    use super::super::backend::{Backend, Fake};
    use super::super::testutil::{cfg, cluster, state};
    use super::super::writer::Writer;
    use super::*;
    use crate::model::IpFamily::{V4, V6};

    // `testdata/table-<family>.nft` is what kproxy renders for `testutil::cluster`; the
    // `.json` beside it is what `nft -j list table` printed after `nft -f` of it (nft 1.0.6,
    // kernel 6.18, in a scratch network namespace; pretty-printed). See testdata/README.md
    // for regenerating both.
    const V4_NFT: &str = include_str!("testdata/table-v4.nft");
    const V4_JSON: &str = include_str!("testdata/table-v4.json");
    const V6_NFT: &str = include_str!("testdata/table-v6.nft");
    const V6_JSON: &str = include_str!("testdata/table-v6.json");

    /// What the Fake holds after the transaction that made the fixture.
    fn rendered(family: IpFamily, fixture_script: &str) -> Model {
        let st = state(family, &cluster(family));
        let plan = Writer::default().full(&st, &cfg(family), &[]);
        assert_eq!(
            Fmt(family).script(&plan.ops),
            fixture_script,
            "the render changed: regenerate testdata/ (testdata/README.md)"
        );
        let mut fake = Fake::new(family);
        fake.apply(&plan.ops).unwrap();
        fake.model
    }

    fn err_of(json: &str) -> String {
        match model_from_json(json.as_bytes(), V4) {
            Err(Error::InvalidInput(m)) => m,
            other => panic!("not refused as invalid: {other:?}"),
        }
    }

    #[test]
    fn the_kernels_ipv4_listing_reads_back_as_what_was_written() {
        let want = rendered(V4, V4_NFT);
        let got = model_from_json(V4_JSON.as_bytes(), V4).unwrap();
        // Line by line first, for a readable failure; then the values themselves.
        assert_eq!(got.lines(V4), want.lines(V4));
        assert_eq!(got, want);
    }

    #[test]
    fn the_kernels_ipv6_listing_reads_back_as_what_was_written() {
        let want = rendered(V6, V6_NFT);
        let got = model_from_json(V6_JSON.as_bytes(), V6).unwrap();
        assert_eq!(got.lines(V6), want.lines(V6));
        assert_eq!(got, want);
    }

    #[test]
    fn the_listing_reads_the_shapes_nft_prints() {
        let m = model_from_json(V4_JSON.as_bytes(), V4).unwrap();
        let line = |r: &Rule| {
            let mut s = String::new();
            Fmt(V4).rule(r, &mut s);
            s
        };
        // nft folds `meta l4proto tcp` into `tcp dport`, and prints `reject` as ICMP port
        // unreachable and `reject with tcp reset` without its protocol match.
        let reject: Vec<String> = m.chains["reject-chain"].rules.iter().map(line).collect();
        assert_eq!(reject, ["meta l4proto tcp reject with tcp reset", "reject"]);
        let pool: Vec<String> = m.chains["endpoints-2"].rules.iter().map(line).collect();
        assert_eq!(
            pool[0],
            "meta l4proto tcp dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 2 map @endpoints-2"
        );
        // Offsets of 2^31 and more (affinity ids) come back negative.
        assert!(
            V4_JSON.contains("\"offset\": -"),
            "the fixture has no negative offset"
        );
        assert!(m
            .chains
            .values()
            .flat_map(|c| &c.rules)
            .all(|r| !r.matches.iter().any(|x| matches!(x, Match::Foreign(_)))));
        // Interval elements: a prefix, or an address for a full-length one.
        let allow: Vec<String> = m.sets["firewall-allow"]
            .elements
            .keys()
            .map(|k| {
                let mut s = String::new();
                Fmt(V4).key(k, &mut s);
                s
            })
            .collect();
        assert_eq!(
            allow,
            [
                "203.0.113.20 . tcp . 80 . 0.0.0.0/0",
                "203.0.113.21 . tcp . 80 . 203.0.113.21",
                "203.0.113.21 . tcp . 80 . 10.0.0.0/8",
                "203.0.113.21 . tcp . 80 . 192.168.0.0/16",
            ]
        );
        assert_eq!(
            m.sets["firewall-allow"].def.spec,
            SetSpec::AddrProtoPortSaddr
        );
        assert!(m.sets["firewall-allow"].def.interval);
    }

    #[test]
    fn an_empty_listing_is_no_table() {
        let m = model_from_json(
            br#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}]}"#,
            V4,
        )
        .unwrap();
        assert_eq!(m, Model::default());
    }

    #[test]
    fn what_kproxy_did_not_write_is_kept_as_foreign_or_skipped() {
        let m = model_from_json(
            br#"{"nftables": [
                {"table": {"family": "ip", "name": "kproxy", "handle": 1}},
                {"set": {"family": "ip", "name": "mine", "table": "kproxy", "type": "ipv4_addr",
                         "elem": ["10.0.0.1"]}},
                {"chain": {"family": "ip", "table": "kproxy", "name": "services"}},
                {"rule": {"family": "ip", "table": "kproxy", "chain": "services",
                          "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}},
                                              "right": "eth0"}},
                                   {"log": {"prefix": "x"}}]}},
                {"rule": {"family": "ip", "table": "kproxy", "chain": "services",
                          "expr": [{"counter": {"packets": 1, "bytes": 60}},
                                   {"jump": {"target": "services"}}]}},
                {"rule": {"family": "ip", "table": "kproxy", "chain": "gone",
                          "expr": [{"drop": null}]}}
            ]}"#,
            V4,
        )
        .unwrap();
        assert!(m.exists);
        // A set that is none of kproxy's is skipped.
        assert!(m.sets.is_empty());
        let rules = &m.chains["services"].rules;
        assert_eq!(rules.len(), 2);
        match &rules[0].matches[..] {
            [Match::Foreign(text)] => assert!(text.contains("\"log\""), "{text}"),
            other => panic!("not foreign: {other:?}"),
        }
        // Counters are ignored.
        assert_eq!(rules[1], Rule::always(Stmt::Jump("services".into())));
        // A rule of a chain that was not listed is dropped.
        assert_eq!(m.chains.len(), 1);
    }

    #[test]
    fn malformed_listings_are_refused_with_what_is_wrong() {
        let table = r#"{"table": {"family": "ip", "name": "kproxy"}}"#;
        let with = |item: &str| format!(r#"{{"nftables": [{table}, {item}]}}"#);
        let cases: [(String, &str); 8] = [
            ("not json".into(), "expected ident"),
            (r#"{"tables": []}"#.into(), "no nftables array"),
            (
                with(r#"{"chain": {"name": 7}}"#),
                "expected a string, got 7",
            ),
            (
                with(
                    r#"{"set": {"name": "cluster-ips", "type": "ipv4_addr", "elem": ["10.0.0.300"]}}"#,
                ),
                "invalid IP address syntax",
            ),
            (
                with(
                    r#"{"set": {"name": "firewall-ips", "type": ["ipv4_addr", "inet_proto", "inet_service"],
                                "elem": [{"concat": ["10.0.0.1", "tcp"]}]}}"#,
                ),
                "does not fit",
            ),
            (
                with(
                    r#"{"set": {"name": "firewall-ips", "type": ["ipv4_addr", "inet_proto", "inet_service"],
                                "elem": [{"concat": ["10.0.0.1", "icmp", 80]}]}}"#,
                ),
                "protocol \"icmp\"",
            ),
            (
                with(
                    r#"{"set": {"name": "firewall-ips", "type": ["ipv4_addr", "inet_proto", "inet_service"],
                                "elem": [{"concat": ["10.0.0.1", "tcp", 70000]}]}}"#,
                ),
                "port 70000",
            ),
            (
                with(
                    r#"{"map": {"name": "endpoints-1", "type": ["ipv4_addr", "inet_proto", "inet_service", "integer"],
                                "map": "ipv4_addr . inet_service",
                                "elem": [[{"concat": ["10.0.0.1", "tcp", 80, 0]}, {"concat": ["10.1.0.1", "tcp"]}]]}}"#,
                ),
                "port \"tcp\"",
            ),
        ];
        for (json, want) in &cases {
            let e = err_of(json);
            assert!(e.starts_with("nft -j list table: "), "{e}");
            assert!(e.contains(want), "{json}: {e:?} does not say {want:?}");
        }
    }

    #[test]
    fn a_set_is_known_by_name_in_its_family() {
        assert_eq!(
            known_set("nodeport-local-endpoints-4", V6).map(|d| d.spec),
            Some(SetSpec::ProtoPortIndexDnat)
        );
        assert_eq!(
            known_set("nodeport-ips", V4).map(|d| d.spec),
            Some(SetSpec::Addr)
        );
        assert_eq!(known_set("endpoints-0", V4), None);
        assert_eq!(known_set("kube-proxy-sets", V4), None);
    }
}
