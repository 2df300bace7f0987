//! Tool schemas every client accepts: schemars writes formats of its own
//! (`uint16`, `int64`, `double`, …) that JSON Schema does not define, and
//! clients that validate schemas (the TypeScript SDK, through ajv) warn on
//! each. This drops every format JSON Schema does not define and keeps the
//! bounds (`minimum: 0` for an unsigned number) that schemars writes beside
//! it.

use rmcp::model::JsonObject;
use serde_json::Value;

/// The formats JSON Schema (2020-12) defines.
pub const STANDARD_FORMATS: &[&str] = &[
    "date-time",
    "date",
    "time",
    "duration",
    "email",
    "idn-email",
    "hostname",
    "idn-hostname",
    "ipv4",
    "ipv6",
    "uri",
    "uri-reference",
    "iri",
    "iri-reference",
    "uuid",
    "uri-template",
    "json-pointer",
    "relative-json-pointer",
    "regex",
];

/// Removes non-standard formats from a schema and everything inside it; an
/// unsigned one leaves `minimum: 0` behind.
pub fn standardize(schema: &mut JsonObject) {
    if let Some(Value::String(format)) = schema.get("format")
        && !STANDARD_FORMATS.contains(&format.as_str())
    {
        let unsigned = format.starts_with("uint");
        schema.remove("format");
        if unsigned && !schema.contains_key("minimum") {
            schema.insert("minimum".into(), Value::from(0));
        }
    }
    for value in schema.values_mut() {
        walk(value);
    }
}

fn walk(value: &mut Value) {
    match value {
        Value::Object(o) => standardize(o),
        Value::Array(items) => items.iter_mut().for_each(walk),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn drops_non_standard_formats_at_any_depth() {
        let Value::Object(mut s) = json!({
            "type": "object",
            "properties": {
                "code": {"type": "integer", "format": "uint16"},
                "n": {"type": ["integer", "null"], "format": "uint", "minimum": 1},
                "at": {"type": "string", "format": "date-time"},
                "ratio": {"type": "number", "format": "double"}
            },
            "$defs": {"X": {"anyOf": [{"type": "integer", "format": "int64"}]}}
        }) else {
            unreachable!()
        };
        standardize(&mut s);
        assert_eq!(
            Value::Object(s),
            json!({
                "type": "object",
                "properties": {
                    "code": {"type": "integer", "minimum": 0},
                    "n": {"type": ["integer", "null"], "minimum": 1},
                    "at": {"type": "string", "format": "date-time"},
                    "ratio": {"type": "number"}
                },
                "$defs": {"X": {"anyOf": [{"type": "integer"}]}}
            })
        );
    }
}
