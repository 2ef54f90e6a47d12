//! Transactions given as JSON, applied to a [`Backend`]: the seam of the differential test,
//! which feeds the same generated transactions to the [`super::Fake`] and to the kernel and
//! asserts that they accept and refuse alike and end up holding the same table.
//!
//! The operations are kproxy's own ([`Op`]); rules come in the few shapes kproxy writes (a
//! jump, or a lookup in a set or verdict map), built from the set's type.

use super::ast::{Data, Field, Match, Op, Rule, SetDef, SetSpec, Stmt, Value};
use super::backend::Backend;
use crate::error::{Error, Result};
use serde::Deserialize;

/// A set element as JSON: `{"key": [{"addr": "1.2.3.4"}, {"proto": "TCP"}, ...], "data": ...}`.
#[derive(Deserialize)]
struct Element {
    key: Vec<Value>,
    #[serde(default)]
    data: Option<Data>,
}

/// One operation as JSON, tagged by `op`.
#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum JsonOp {
    AddTable,
    DeleteTable,
    AddChain {
        name: String,
    },
    FlushChain {
        name: String,
    },
    DeleteChain {
        name: String,
    },
    /// `jump <target>`.
    AddJump {
        chain: String,
        target: String,
    },
    /// A rule that reads `set` (of type `spec`): a lookup that drops, or a verdict map.
    AddLookup {
        chain: String,
        set: String,
        spec: SetSpec,
    },
    AddSet {
        name: String,
        spec: SetSpec,
        #[serde(default)]
        interval: bool,
    },
    DeleteSet {
        name: String,
    },
    AddElements {
        set: String,
        elements: Vec<Element>,
    },
    DeleteElements {
        set: String,
        keys: Vec<Vec<Value>>,
    },
}

/// The packet fields a lookup of a set of `spec` reads.
fn fields_of(spec: SetSpec) -> Vec<Field> {
    use Field::*;
    match spec {
        SetSpec::Addr => vec![Daddr],
        SetSpec::AddrProtoPort | SetSpec::AddrProtoPortVerdict => vec![Daddr, L4proto, Dport],
        SetSpec::AddrProtoPortSaddr => vec![Daddr, L4proto, Dport, Saddr],
        SetSpec::AddrAddrProtoPort => vec![Saddr, Daddr, L4proto, Dport],
        SetSpec::ProtoPortVerdict => vec![L4proto, Dport],
        SetSpec::SaddrId => vec![Saddr, Const(0)],
        SetSpec::AddrProtoPortIndexDnat => vec![Daddr, L4proto, Dport, Random(2)],
        SetSpec::ProtoPortIndexDnat => vec![L4proto, Dport, Random(2)],
    }
}

fn to_op(op: JsonOp) -> Op {
    match op {
        JsonOp::AddTable => Op::AddTable,
        JsonOp::DeleteTable => Op::DeleteTable,
        JsonOp::AddChain { name } => Op::AddChain(name, None),
        JsonOp::FlushChain { name } => Op::FlushChain(name),
        JsonOp::DeleteChain { name } => Op::DeleteChain(name),
        JsonOp::AddJump { chain, target } => Op::AddRule(chain, Rule::always(Stmt::Jump(target))),
        JsonOp::AddLookup { chain, set, spec } => {
            let fields = fields_of(spec);
            let rule = match spec {
                SetSpec::AddrProtoPortVerdict | SetSpec::ProtoPortVerdict => {
                    Rule::always(Stmt::Vmap { fields, map: set })
                }
                SetSpec::AddrProtoPortIndexDnat | SetSpec::ProtoPortIndexDnat => {
                    Rule::always(Stmt::DnatMap {
                        protocol: crate::model::Protocol::Tcp,
                        fields,
                        map: set,
                    })
                }
                _ => Rule::new(
                    vec![Match::Lookup {
                        fields,
                        set,
                        neg: false,
                    }],
                    Stmt::Drop,
                ),
            };
            Op::AddRule(chain, rule)
        }
        JsonOp::AddSet {
            name,
            spec,
            interval,
        } => Op::AddSet(SetDef {
            name,
            spec,
            interval,
            dynamic_size: None,
        }),
        JsonOp::DeleteSet { name } => Op::DeleteSet(name),
        JsonOp::AddElements { set, elements } => {
            Op::AddElements(set, elements.into_iter().map(|e| (e.key, e.data)).collect())
        }
        JsonOp::DeleteElements { set, keys } => Op::DeleteElements(set, keys),
    }
}

/// Parse a transaction (a JSON array of operations).
pub fn parse(json: &str) -> Result<Vec<Op>> {
    let ops: Vec<JsonOp> = serde_json::from_str(json)
        .map_err(|e| Error::InvalidInput(format!("nft transaction: {e}")))?;
    Ok(ops.into_iter().map(to_op).collect())
}

/// Apply one transaction given as JSON, all or nothing.
pub fn apply(backend: &mut dyn Backend, json: &str) -> Result<()> {
    backend.apply(&parse(json)?).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::IpFamily;

    #[test]
    fn a_transaction_round_trips_through_the_fake() {
        let mut fake = super::super::Fake::new(IpFamily::V4);
        apply(
            &mut fake,
            r#"[{"op":"add_table"},{"op":"add_chain","name":"a"},
                {"op":"add_set","name":"vm","spec":"ProtoPortVerdict"},
                {"op":"add_lookup","chain":"a","set":"vm","spec":"ProtoPortVerdict"},
                {"op":"add_elements","set":"vm","elements":[
                    {"key":[{"proto":"TCP"},{"port":80}],"data":{"goto":"a"}},
                    {"key":[{"proto":"UDP"},{"port":53}],"data":"drop"}]}]"#,
        )
        .unwrap();
        let lines = fake.model.lines(IpFamily::V4);
        assert!(
            lines.contains(&"element vm: tcp . 80 : goto a".to_owned()),
            "{lines:?}"
        );
        // The chain is busy (an element jumps to it); nothing of the transaction is kept.
        let busy = r#"[{"op":"delete_elements","set":"vm","keys":[[{"proto":"UDP"},{"port":53}]]},
                       {"op":"flush_chain","name":"a"},{"op":"delete_chain","name":"a"}]"#;
        assert!(apply(&mut fake, busy).is_err());
        assert_eq!(fake.model.lines(IpFamily::V4), lines);
        assert!(parse(r#"[{"op":"add_tabel"}]"#).is_err());
    }
}
