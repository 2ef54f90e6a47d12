//! The boundary's one schema. The serde types of [`crate::config::EngineConfig`] and
//! [`crate::model::ChangeSet`] are the definition; Python's types for them
//! (`python/kproxy/wire.py`, `TypedDict`s and `Literal`s that mypy checks every caller
//! against) are generated from it here, by a test, so the two cannot drift apart:
//!
//! ```text
//! cargo test --no-default-features --lib wire            # fails when wire.py is stale
//! KPROXY_WRITE_WIRE=1 cargo test --no-default-features --lib wire   # rewrites it
//! ```
//!
//! The generator understands the shapes these types produce (objects, string enums, options,
//! lists, pairs); anything else fails the test rather than being typed loosely.

use crate::config::EngineConfig;
use crate::model::{ChangeSet, Cidr, Name, Port};
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::fmt::Write as _;

impl JsonSchema for Name {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        "Name".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "string", "description": "a DNS label, or empty"})
    }
}

impl JsonSchema for Cidr {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        "Cidr".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "string", "description": "an address prefix, 10.0.0.0/8"})
    }
}

impl JsonSchema for Port {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        "Port".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "integer", "minimum": 1, "maximum": 65535})
    }
}

const HEADER: &str = r#""""The JSON the Rust core decodes: generated from its serde types (``rust/src/wire.rs``).

Do not edit: ``KPROXY_WRITE_WIRE=1 cargo test --no-default-features --lib wire`` rewrites this
file, and ``cargo test`` fails when it is stale. mypy checks every caller against these types.
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict
"#;

/// The Python module for the boundary's types.
pub fn python_module() -> String {
    let mut generator = SchemaGenerator::default();
    generator.subschema_for::<EngineConfig>();
    generator.subschema_for::<ChangeSet>();
    let defs = generator.definitions().clone();
    let mut out = String::from(HEADER);
    for (i, (name, def)) in defs.iter().enumerate() {
        let text = definition(name, def.as_object().expect("a schema object"));
        // Two blank lines between definitions; isort wants one after the imports unless a
        // class follows.
        let first_alias = i == 0 && !text.starts_with("class ");
        out.push_str(if first_alias { "\n" } else { "\n\n" });
        out.push_str(&text);
    }
    out
}

fn definition(name: &str, def: &Map<String, Value>) -> String {
    if let Some(values) = string_enum(def) {
        let doc = comment(def);
        let lits: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
        return format!("{doc}{name} = Literal[{}]\n", lits.join(", "));
    }
    assert_eq!(
        def.get("type"),
        Some(&Value::from("object")),
        "{name}: not an object"
    );
    let required: Vec<&str> = def
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut out = format!("class {name}(TypedDict):\n");
    if let Some(d) = description(def) {
        let _ = writeln!(out, "    \"\"\"{}\"\"\"\n", d.replace('\n', "\n    "));
    }
    let props = def
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("{name}: no properties"));
    for (field, schema) in props {
        let schema = schema.as_object().expect("a property schema");
        let mut ty = python_type(schema);
        if !required.contains(&field.as_str()) {
            ty = format!("NotRequired[{ty}]");
        }
        if let Some(d) = description(schema) {
            for line in d.lines() {
                let _ = writeln!(out, "    # {line}");
            }
        }
        let _ = writeln!(out, "    {field}: {ty}");
    }
    out
}

fn description(schema: &Map<String, Value>) -> Option<String> {
    schema
        .get("description")
        .and_then(Value::as_str)
        .map(|d| d.replace("\n\n", "\n").trim().to_owned())
}

fn comment(def: &Map<String, Value>) -> String {
    description(def)
        .map(|d| d.lines().map(|l| format!("# {l}\n")).collect())
        .unwrap_or_default()
}

/// The values of a string enum (`enum: [...]`, or `oneOf` of `const`s when the variants have
/// doc comments).
fn string_enum(def: &Map<String, Value>) -> Option<Vec<String>> {
    if let Some(values) = def.get("enum").and_then(Value::as_array) {
        return values
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect();
    }
    let one_of = def.get("oneOf")?.as_array()?;
    let mut values = Vec::new();
    for variant in one_of {
        let v = variant.as_object()?;
        match (v.get("const"), v.get("enum").and_then(Value::as_array)) {
            (Some(c), _) => values.push(c.as_str()?.to_owned()),
            (None, Some(e)) => {
                for c in e {
                    values.push(c.as_str()?.to_owned());
                }
            }
            _ => return None,
        }
    }
    Some(values)
}

fn python_type(schema: &Map<String, Value>) -> String {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        return r.rsplit('/').next().expect("a reference").to_owned();
    }
    if let Some(any) = schema.get("anyOf").and_then(Value::as_array) {
        let parts: Vec<String> = any
            .iter()
            .map(|s| python_type(s.as_object().expect("a schema")))
            .collect();
        return parts.join(" | ");
    }
    match schema.get("type") {
        Some(Value::Array(types)) => types
            .iter()
            .map(|t| {
                let mut one = schema.clone();
                one.insert("type".into(), t.clone());
                python_type(&one)
            })
            .collect::<Vec<_>>()
            .join(" | "),
        Some(Value::String(t)) => match t.as_str() {
            "string" => "str".into(),
            "integer" => "int".into(),
            "number" => "float".into(),
            "boolean" => "bool".into(),
            "null" => "None".into(),
            "array" => array_type(schema),
            other => panic!("no Python type for JSON type {other:?}"),
        },
        _ => panic!("no Python type for {schema:?}"),
    }
}

fn array_type(schema: &Map<String, Value>) -> String {
    if let Some(items) = schema.get("prefixItems").and_then(Value::as_array) {
        let parts: Vec<String> = items
            .iter()
            .map(|s| python_type(s.as_object().expect("a schema")))
            .collect();
        return format!("tuple[{}]", parts.join(", "));
    }
    let items = schema
        .get("items")
        .and_then(Value::as_object)
        .expect("an array's items");
    format!("list[{}]", python_type(items))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn python_wire_module_is_current() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/kproxy/wire.py");
        let want = super::python_module();
        if std::env::var_os("KPROXY_WRITE_WIRE").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{} is stale: run KPROXY_WRITE_WIRE=1 cargo test --no-default-features --lib wire",
            path.display()
        );
    }
}
