//! Random tool arguments from a seed: a valid `send_email` or `send_batch`
//! with a few of its fields replaced by values of the wrong type, the wrong
//! shape or the wrong content (CR/LF, NUL, long, non-ASCII, template
//! markers, bad dates, paths outside the attachments folder), or removed,
//! and unknown fields added; and the message tools' filters and references
//! (`list_messages`, `get_message_status`, `cancel_message`), right, wrong
//! and naming nothing. The same seed gives the same calls.

// Each test binary that includes this module uses a different subset of it.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Map, Value, json};

/// The fields of a message, as `send_email` and a batch's items take them.
const MESSAGE_FIELDS: &[&str] = &[
    "to",
    "cc",
    "bcc",
    "subject",
    "body",
    "html",
    "html_body",
    "from_email",
    "reply_to",
    "in_reply_to",
    "references",
    "attachments",
    "template_vars",
    "idempotency_key",
    "tag",
    "metadata",
    "max_age",
    "priority",
];

/// Pieces strings are made of.
const PIECES: &[&str] = &[
    "",
    "a@example.org",
    "Ada Lovelace <ada@example.org>",
    "\"quoted, name\" <q@example.org>",
    "bob@example.org, carol@example.org",
    "sender@example.org",
    "no-at-sign",
    "@example.org",
    "x@",
    "x@[127.0.0.1]",
    "user@xn--bcher-kva.example",
    "Zoë <zoë@exämple.org>",
    "日本語の件名",
    "\u{202e}reversed",
    "👍🏽",
    "\r\n",
    "\nBcc: victim@evil.example",
    "\0",
    "\t",
    "\u{7f}",
    "{{name}}",
    "{{",
    "}}",
    "{{ name | upper }}",
    "{{#each x}}",
    "{{{raw}}}",
    "<b>html</b>",
    ".\r\n.\r\n",
    "\r\n.\r\n",
    "=?utf-8?b?AAAA?=",
    "aGVsbG8gd29ybGQ=",
    "!!not base64!!",
    "<id@example.org>",
    "2026-12-04T10:00:00Z",
    "2026-13-45T99:99:99Z",
    "1970-01-01T00:00:00Z",
    "9999-12-31T23:59:59Z",
    "tomorrow",
    "../outside.txt",
    "/etc/passwd",
    "ok.txt",
    "sub/../ok.txt",
    "escape.txt",
    "pipe",
    "sub",
    "big.bin",
    "only",
    "nobody",
    "k1",
    "k2",
];

/// A string of one to four pieces, sometimes one repeated many times or a
/// non-ASCII piece cut at a random character.
pub fn string(rng: &mut StdRng) -> String {
    let mut s = String::new();
    for _ in 0..rng.random_range(1..=4) {
        let piece = PIECES[rng.random_range(0..PIECES.len())];
        match rng.random_range(0..10) {
            0 => s.push_str(&piece.repeat(rng.random_range(1..3000))),
            1 => s.extend(
                piece
                    .chars()
                    .take(rng.random_range(0..=piece.chars().count())),
            ),
            _ => s.push_str(piece),
        }
    }
    s
}

/// Any JSON value, at most `depth` deep.
pub fn value(rng: &mut StdRng, depth: u32) -> Value {
    let pick = if depth == 0 {
        rng.random_range(0..4)
    } else {
        rng.random_range(0..6)
    };
    match pick {
        0 => Value::Null,
        1 => json!(rng.random_bool(0.5)),
        2 => [
            json!(0),
            json!(-1),
            json!(1.5),
            json!(1e308),
            json!(u64::MAX),
            json!(i64::MIN),
        ][rng.random_range(0..6)]
        .clone(),
        3 => json!(string(rng)),
        4 => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| value(rng, depth - 1))
                .collect(),
        ),
        _ => {
            let mut m = Map::new();
            for _ in 0..rng.random_range(0..4) {
                let key = if rng.random_bool(0.5) {
                    MESSAGE_FIELDS[rng.random_range(0..MESSAGE_FIELDS.len())].to_string()
                } else {
                    string(rng)
                };
                m.insert(key, value(rng, depth - 1));
            }
            Value::Object(m)
        }
    }
}

/// A value of the type `field` takes, often with bad content; sometimes
/// any value at all.
fn field_value(rng: &mut StdRng, field: &str) -> Value {
    if rng.random_bool(0.25) {
        return value(rng, 2);
    }
    match field {
        "to" | "cc" | "bcc" => match rng.random_range(0..3) {
            0 => json!(string(rng)),
            _ => Value::Array(
                (0..rng.random_range(0..4))
                    .map(|_| json!(string(rng)))
                    .collect(),
            ),
        },
        "html" | "wait" | "dry_run" | "atomic" => json!(rng.random_bool(0.5)),
        "attachments" => Value::Array(
            (0..rng.random_range(0..3))
                .map(|_| match rng.random_range(0..4) {
                    0 => json!({ "path": string(rng) }),
                    1 => json!({
                        "filename": string(rng),
                        "content_base64": string(rng),
                        "content_type": string(rng),
                    }),
                    // An image the HTML may or may not name.
                    2 => json!({
                        "filename": string(rng),
                        "content_base64": "aGVsbG8=",
                        "content_id": string(rng),
                    }),
                    _ => json!({ "filename": string(rng), "content_base64": "aGVsbG8=" }),
                })
                .collect(),
        ),
        "template_vars" | "metadata" => {
            let mut m = Map::new();
            for _ in 0..rng.random_range(0..4) {
                m.insert(string(rng), json!(string(rng)));
            }
            Value::Object(m)
        }
        // Mostly durations, some under a second or over the queue's.
        "max_age" if rng.random_bool(0.7) => {
            json!(["10m", "1h", "2s", "500ms", "30d", "0s"][rng.random_range(0..6)])
        }
        "priority" if rng.random_bool(0.7) => json!(["high", "normal"][rng.random_range(0..2)]),
        _ => json!(string(rng)),
    }
}

/// A valid message with up to three fields replaced, removed or added.
fn message(rng: &mut StdRng, i: usize) -> Map<String, Value> {
    let mut m = json!({
        "to": "rcpt@example.org",
        "subject": format!("random {i} {{{{name}}}}"),
        "body": format!("random input {i}\n"),
        "template_vars": { "name": "Ada" },
    })
    .as_object()
    .cloned()
    .unwrap_or_default();
    for _ in 0..rng.random_range(0..=3) {
        let field = if rng.random_bool(0.9) {
            MESSAGE_FIELDS[rng.random_range(0..MESSAGE_FIELDS.len())].to_string()
        } else {
            string(rng)
        };
        if rng.random_bool(0.15) {
            m.remove(&field);
        } else {
            let v = field_value(rng, &field);
            m.insert(field, v);
        }
    }
    m
}

/// The call-wide parameters, each present at random.
fn call_fields(rng: &mut StdRng, m: &mut Map<String, Value>, fields: &[&str]) {
    for field in fields {
        if rng.random_bool(0.2) {
            let v = match *field {
                "relay" if rng.random_bool(0.5) => json!("only"),
                "wait" | "dry_run" | "atomic" if rng.random_bool(0.7) => {
                    json!(rng.random_bool(0.5))
                }
                _ => field_value(rng, field),
            };
            m.insert(field.to_string(), v);
        }
    }
}

/// Random `send_email` arguments.
pub fn send_email(rng: &mut StdRng, i: usize) -> Value {
    let mut m = message(rng, i);
    call_fields(rng, &mut m, &["relay", "dry_run", "wait", "send_at"]);
    Value::Object(m)
}

/// Random `send_batch` arguments: `defaults` and up to five messages.
pub fn send_batch(rng: &mut StdRng, i: usize) -> Value {
    let mut defaults = message(rng, i);
    defaults.remove("to");
    let messages: Vec<Value> = (0..rng.random_range(0..6))
        .map(|k| {
            let mut item = message(rng, i * 10 + k);
            item.remove("subject");
            item.remove("body");
            Value::Object(item)
        })
        .collect();
    let mut m = Map::new();
    m.insert("defaults".into(), Value::Object(defaults));
    m.insert("messages".into(), Value::Array(messages));
    call_fields(rng, &mut m, &["wait", "dry_run", "send_at", "atomic"]);
    if rng.random_bool(0.1) {
        // The whole of a parameter replaced.
        let key = ["defaults", "messages"][rng.random_range(0..2)];
        m.insert(key.into(), value(rng, 2));
    }
    Value::Object(m)
}

/// Stands for the id of a message an earlier call of the run was answered
/// with; the test puts one in its place when it makes the call.
pub const EARLIER: &str = "$EARLIER";

/// A message id, batch id or cursor: one the run made, one of the right
/// shape that names nothing, or any string.
fn reference(rng: &mut StdRng) -> Value {
    match rng.random_range(0..6) {
        0 | 1 => json!(EARLIER),
        2 => json!(format!("<{EARLIER}>")),
        3 => json!(format!("{:032x}@mailmux.localhost", rng.random::<u128>())),
        4 => json!(format!("batch-{:016x}", rng.random::<u64>())),
        _ => json!(string(rng)),
    }
}

/// Up to `n` of `fields`, each with a value `pick` gives or any value; and
/// now and then an unknown field.
fn query(
    rng: &mut StdRng,
    fields: &[&str],
    n: usize,
    pick: fn(&mut StdRng, &str) -> Value,
) -> Value {
    let mut m = Map::new();
    for _ in 0..rng.random_range(0..=n) {
        let field = fields[rng.random_range(0..fields.len())];
        let v = match rng.random_bool(0.8) {
            true => pick(rng, field),
            false => value(rng, 2),
        };
        m.insert(field.to_string(), v);
    }
    if rng.random_bool(0.05) {
        m.insert(string(rng), value(rng, 1));
    }
    Value::Object(m)
}

/// Random `list_messages` arguments: filters that match, that match
/// nothing, and that are wrong (an unknown state, a limit out of range, a
/// cursor that is not one, metadata with no name or a bad one).
pub fn list_messages(rng: &mut StdRng) -> Value {
    use mailmux::mcp::types::{ListMessagesParams, Params};
    query(
        rng,
        ListMessagesParams::FIELDS,
        3,
        |rng, field| match field {
            "status" | "reported" => {
                const STATES: &[&str] = &[
                    "queued",
                    "sent",
                    "failed",
                    "held",
                    "bounced",
                    "complained",
                    "SENT",
                    "",
                ];
                match rng.random_bool(0.7) {
                    true => json!(STATES[rng.random_range(0..STATES.len())]),
                    false => json!(string(rng)),
                }
            }
            "limit" => [
                json!(0),
                json!(1),
                json!(20),
                json!(100),
                json!(101),
                json!(u32::MAX),
                json!(-1),
                json!("5"),
            ][rng.random_range(0..8)]
            .clone(),
            "cursor" | "batch_id" => reference(rng),
            "metadata" => {
                let mut m = Map::new();
                for _ in 0..rng.random_range(0..3) {
                    let name = match rng.random_bool(0.5) {
                        true => "campaign".to_string(),
                        false => string(rng),
                    };
                    m.insert(name, json!(string(rng)));
                }
                Value::Object(m)
            }
            _ => json!(string(rng)),
        },
    )
}

/// Random `get_message_status` arguments: an id, a key, both or neither.
pub fn get_message_status(rng: &mut StdRng) -> Value {
    query(
        rng,
        &["message_id", "idempotency_key"],
        2,
        |rng, field| match field {
            "message_id" => reference(rng),
            _ => json!(string(rng)),
        },
    )
}

/// Random `cancel_message` arguments: a message, a batch or a tag (or
/// several, or none).
pub fn cancel_message(rng: &mut StdRng) -> Value {
    query(
        rng,
        &["message_id", "batch_id", "tag"],
        2,
        |rng, field| match field {
            "tag" => json!(string(rng)),
            _ => reference(rng),
        },
    )
}

/// The tools a random request names; `reload_smtp_configuration` is left
/// out, since it would replace the test's relays with the configuration's
/// sources.
const TOOLS: &[&str] = &[
    "send_email",
    "send_batch",
    "get_smtp_status",
    "get_message_status",
    "list_messages",
    "cancel_message",
    "test_smtp_connection",
    "switch_smtp_server",
    "reconnect_smtp_servers",
    "no_such_tool",
];

const METHODS: &[&str] = &[
    "tools/call",
    "tools/call",
    "tools/call",
    "tools/list",
    "initialize",
    "ping",
    "resources/list",
    "resources/read",
    "resources/templates/list",
    "notifications/cancelled",
    "notifications/initialized",
    "tasks/get",
    "no/such/method",
];

/// One JSON-RPC message with a random method, id and params.
fn rpc(rng: &mut StdRng, i: usize) -> Value {
    let method = METHODS[rng.random_range(0..METHODS.len())];
    let id = match rng.random_range(0..6) {
        0 => json!(string(rng)),
        1 => Value::Null,
        2 => value(rng, 1),
        _ => json!(i),
    };
    let params = if method == "tools/call" && rng.random_bool(0.9) {
        let name = TOOLS[rng.random_range(0..TOOLS.len())];
        let arguments = match name {
            "send_email" => send_email(rng, i),
            "send_batch" => send_batch(rng, i),
            "list_messages" => list_messages(rng),
            "get_message_status" => get_message_status(rng),
            "cancel_message" => cancel_message(rng),
            _ => value(rng, 2),
        };
        json!({ "name": name, "arguments": arguments })
    } else {
        value(rng, 2)
    };
    let mut m = json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
    if rng.random_bool(0.1) {
        let key = ["jsonrpc", "id", "method", "params"][rng.random_range(0..4)];
        match rng.random_bool(0.5) {
            true => m[key] = value(rng, 1),
            false => {
                m.as_object_mut().map(|o| o.remove(key));
            }
        }
    }
    m
}

/// A random request body (or stdio line): bytes, a JSON-RPC message cut
/// short (perhaps inside a character), an array of messages, or one
/// message with a random method, id and params.
pub fn request(rng: &mut StdRng, i: usize) -> Vec<u8> {
    match rng.random_range(0..10) {
        0 => (0..rng.random_range(0..200))
            .map(|_| rng.random())
            .collect(),
        1 => {
            let mut bytes = rpc(rng, i).to_string().into_bytes();
            bytes.truncate(rng.random_range(0..=bytes.len()));
            bytes
        }
        2 => {
            let n = rng.random_range(0..3);
            Value::Array((0..n).map(|_| rpc(rng, i)).collect())
                .to_string()
                .into_bytes()
        }
        _ => rpc(rng, i).to_string().into_bytes(),
    }
}

/// Counts the panics of every thread from now on (tokio catches a task's
/// panic, so the daemon would go on and only this hook would see it).
pub fn count_panics() -> Arc<AtomicUsize> {
    let n = Arc::new(AtomicUsize::new(0));
    let seen = n.clone();
    let before = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        seen.fetch_add(1, Ordering::SeqCst);
        before(info);
    }));
    n
}

/// A seed from `MAILMUX_RANDOM_SEED`, or a new one.
pub fn seed() -> u64 {
    match std::env::var("MAILMUX_RANDOM_SEED") {
        Ok(s) => s.parse().expect("MAILMUX_RANDOM_SEED is a number"),
        Err(_) => rand::rng().random(),
    }
}
