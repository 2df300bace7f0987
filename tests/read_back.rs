//! What the agent asked for is what the recipient reads. Random valid
//! messages (non-ASCII subjects and names, quoted names, dot lines, long
//! lines, every line ending, NUL, attachments of random bytes with awkward
//! names, template values) go through `send_email` to aiosmtpd, and each is
//! read back with Python's email package, as a mail client would read it.
//! Every field must come back as sent, and the parser must note no defect.
//!
//! `MAILMUX_RANDOM_SEED` replays a run; the seed is printed.

mod common;
#[path = "reliability/random_input.rs"]
mod random_input;

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use common::{Aiosmtpd, InProcess, config, relay};
use mailmux::config::Sources;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rmcp::model::CallToolRequestParams;
use serde_json::{Map, Value, json};

/// Pieces of text: ASCII with the characters headers and encodings treat
/// specially, and non-ASCII of every width.
const TEXT: &[&str] = &[
    "hello",
    "Re:",
    "a",
    " ",
    "  ",
    "\t",
    "=",
    "=3D",
    "?",
    "_",
    "\"",
    "\\",
    "(x)",
    "<b>",
    "&amp;",
    ";",
    ",",
    ":",
    "@",
    ".",
    "é",
    "Zoë",
    "ß",
    "日本語",
    "件名",
    "😀",
    "👍🏽",
    "\u{a0}",
    "\u{200d}",
    "Ωμέγα",
    "عربى",
    "=?utf-8?q?not_a_word?=",
    "=?",
    "?=",
];

/// Display names, written as the caller would: bare or quoted.
const NAMES: &[(&str, &str)] = &[
    ("Ada Lovelace", "Ada Lovelace"),
    ("Zoë Ünal", "Zoë Ünal"),
    ("日本 太郎", "日本 太郎"),
    ("\"Lovelace, Ada\"", "Lovelace, Ada"),
    ("\"O'Brien (work)\"", "O'Brien (work)"),
    ("\"say \\\"hi\\\"\"", "say \"hi\""),
    ("😀 Smile", "😀 Smile"),
    ("\"Ünal; Zoë\"", "Ünal; Zoë"),
];

/// Attachment file names.
const FILENAMES: &[&str] = &[
    "report.pdf",
    "notes.txt",
    "naïve résumé.txt",
    "日本語のファイル.csv",
    "a b  c.bin",
    "quote\"d.txt",
    "semi;colon.txt",
    "equals=sign.txt",
    "😀.png",
    "no-extension",
];

fn text(rng: &mut StdRng, pieces: std::ops::Range<usize>) -> String {
    (0..rng.random_range(pieces))
        .map(|_| TEXT[rng.random_range(0..TEXT.len())])
        .collect()
}

/// A body line: text, or one of the lines SMTP and the encoders treat
/// specially.
fn line(rng: &mut StdRng) -> String {
    match rng.random_range(0..12) {
        0 => ".".into(),
        1 => "..".into(),
        2 => format!(".{}", text(rng, 2..3)),
        3 => "From the start".into(),
        4 => "x".repeat(rng.random_range(990..2100)),
        5 => "ü".repeat(rng.random_range(300..1200)),
        6 => format!("{}   ", text(rng, 2..3)),
        7 => String::new(),
        8 => "a\0b".into(),
        _ => text(rng, 1..12),
    }
}

/// A body of random lines with random line endings, and what a reader gets
/// from it (every line ending as LF).
fn body(rng: &mut StdRng) -> (String, String) {
    let mut sent = String::new();
    let mut read = String::new();
    for _ in 0..rng.random_range(0..8) {
        let l = line(rng);
        sent.push_str(&l);
        read.push_str(&l);
        // A CR then an empty line's LF would be one CRLF.
        let ending = if sent.ends_with('\r') && l.is_empty() {
            "\r\n"
        } else {
            ["\n", "\r\n", "\r"][rng.random_range(0..3)]
        };
        sent.push_str(ending);
        read.push('\n');
    }
    if rng.random_bool(0.5) {
        let l = text(rng, 3..4);
        sent.push_str(&l);
        read.push_str(&l);
    }
    (sent, read)
}

/// Random bytes, often text-like.
fn bytes(rng: &mut StdRng) -> Vec<u8> {
    let n = rng.random_range(0..3000);
    if rng.random_bool(0.5) {
        (0..n).map(|_| rng.random()).collect()
    } else {
        (0..n)
            .map(|_| b"ab \r\n.=\t"[rng.random_range(0..8)])
            .collect()
    }
}

/// One random valid message: the arguments, and what a reader must see.
fn message(rng: &mut StdRng, i: usize) -> (Value, Value) {
    let mut args = Map::new();
    let mut want = Map::new();

    let mailboxes = |rng: &mut StdRng, field: &str, n: usize| {
        let mut list = Vec::new();
        let mut read = Vec::new();
        for k in 0..n {
            // Sometimes an address that needs SMTPUTF8 (the sink offers it).
            let addr = match rng.random_range(0..10) {
                0 => format!("zoë.{field}{i}-{k}@example.org"),
                1 => format!("{field}{i}-{k}@exämple.org"),
                _ => format!("{field}{i}-{k}@example.org"),
            };
            if rng.random_bool(0.3) {
                let (written, name) = NAMES[rng.random_range(0..NAMES.len())];
                list.push(json!(format!("{written} <{addr}>")));
                read.push(json!([name, addr]));
            } else if rng.random_bool(0.5) {
                // Words of any text as a quoted string.
                let name = (0..rng.random_range(1..6))
                    .map(|_| {
                        let word = loop {
                            let piece = TEXT[rng.random_range(0..TEXT.len())];
                            if !piece.trim().is_empty() {
                                break piece;
                            }
                        };
                        // Never two pieces without a space between: a run
                        // longer than one encoded word is split inside it,
                        // which RFC 2047 readers join again but Python's
                        // parser shows with a space.
                        let space = [" ", "  ", "\t"][rng.random_range(0..3)];
                        format!("{space}{word}")
                    })
                    .collect::<String>();
                let quoted = name.replace('\\', "\\\\").replace('"', "\\\"");
                list.push(json!(format!("\"{quoted}\" <{addr}>")));
                read.push(json!([phrase(&name), addr]));
            } else {
                list.push(json!(addr));
                read.push(json!(["", addr]));
            }
        }
        (Value::Array(list), Value::Array(read))
    };
    let n = rng.random_range(1..4);
    let (to, to_read) = mailboxes(rng, "to", n);
    args.insert("to".into(), to);
    want.insert("to".into(), to_read);
    let n = rng.random_range(0..3);
    if n > 0 {
        let (cc, cc_read) = mailboxes(rng, "cc", n);
        args.insert("cc".into(), cc);
        want.insert("cc".into(), cc_read);
    }
    if rng.random_bool(0.3) {
        args.insert("bcc".into(), json!(format!("bcc{i}@example.org")));
    }
    if rng.random_bool(0.2) {
        // An id with or without its angle brackets.
        args.insert("in_reply_to".into(), json!(format!("orig{i}@mail.example")));
        want.insert(
            "in_reply_to".into(),
            json!(format!("<orig{i}@mail.example>")),
        );
        let ids: Vec<String> = (0..rng.random_range(1..12))
            .map(|k| {
                format!(
                    "<thread{i}-{k}.{}@mail.example>",
                    "x".repeat(rng.random_range(1..40))
                )
            })
            .collect();
        args.insert("references".into(), json!(ids.join(" ")));
        want.insert("references".into(), json!(ids.join(" ")));
    }
    // Every recipient is in the envelope, Bcc too.
    let mut rcpt_to: Vec<String> = ["to", "cc"]
        .iter()
        .flat_map(|f| {
            want.get(*f)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .map(|m| m[1].as_str().unwrap_or_default().to_string())
        .chain(args.get("bcc").and_then(Value::as_str).map(str::to_string))
        .collect();
    rcpt_to.sort();
    want.insert("rcpt_to".into(), json!(rcpt_to));
    if rng.random_bool(0.3) {
        let (reply_to, read) = mailboxes(rng, "reply", 1);
        args.insert("reply_to".into(), reply_to[0].clone());
        want.insert("reply_to".into(), read);
    }

    let mut subject = text(rng, 1..30);
    let (mut body, mut body_read) = body(rng);
    let templated = rng.random_bool(0.3);
    if templated {
        let value = text(rng, 1..6);
        subject.push_str(" {name}");
        body.push_str("\r\n{name}");
        args.insert("template_vars".into(), json!({ "name": value }));
        want.insert("subject".into(), json!(subject.replace("{name}", &value)));
        body_read.push_str(&format!("\n{value}"));
    } else {
        want.insert("subject".into(), json!(subject));
    }
    args.insert("subject".into(), json!(subject));
    args.insert("body".into(), json!(body));
    if !templated && rng.random_bool(0.2) {
        // The body is the HTML, alone.
        args.insert("html".into(), json!(true));
        want.insert("html".into(), json!(body_read));
        want.insert("text".into(), Value::Null);
    } else if rng.random_bool(0.3) {
        want.insert("text".into(), json!(body_read));
        let (html, html_read) = self::body(rng);
        args.insert("html_body".into(), json!(format!("<p>{html}</p>")));
        want.insert("html".into(), json!(format!("<p>{html_read}</p>")));
    } else {
        want.insert("text".into(), json!(body_read));
        want.insert("html".into(), Value::Null);
    }

    let mut attachments = Vec::new();
    let mut read = Vec::new();
    for _ in 0..rng.random_range(0..3) {
        let filename = if rng.random_bool(0.5) {
            FILENAMES[rng.random_range(0..FILENAMES.len())].to_string()
        } else {
            // Any text but a path separator, and not blank.
            let name = text(rng, 1..6).replace(['/', '\\'], "_")
                + [".txt", ".bin", ""][rng.random_range(0..3)];
            if name.trim().is_empty() {
                format!("blank{name}")
            } else {
                name
            }
        };
        let data = bytes(rng);
        let encoded = base64::engine::general_purpose::STANDARD.encode(&data);
        let mut a = json!({ "filename": filename, "content_base64": encoded });
        let mut r = json!({ "filename": filename, "content_base64": encoded });
        if rng.random_bool(0.5) {
            // As given, and as a reader names it (lowercase, no parameters).
            let (ct, read_as) = [
                ("application/octet-stream", "application/octet-stream"),
                ("text/plain", "text/plain"),
                ("image/png", "image/png"),
                ("text/plain; charset=utf-8", "text/plain"),
                ("Application/PDF", "application/pdf"),
                ("image/svg+xml", "image/svg+xml"),
                (
                    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
                    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
                ),
            ][rng.random_range(0..7)];
            a["content_type"] = json!(ct);
            r["content_type"] = json!(read_as);
        }
        attachments.push(a);
        read.push(r);
    }
    // Images the HTML shows (`content_id`), after the files or between
    // them, each named by an <img> at the end of the HTML.
    let mut inline = Vec::new();
    if want["html"].is_string() && rng.random_bool(0.4) {
        let html_arg = if args.contains_key("html_body") {
            "html_body"
        } else {
            "body"
        };
        // In order among themselves: the reader lists them so.
        let mut after = 0;
        for k in 0..rng.random_range(1..3) {
            let id = format!("pic{i}.{k}-{}@mail.example", rng.random_range(0..1000));
            let data = bytes(rng);
            let encoded = base64::engine::general_purpose::STANDARD.encode(&data);
            let img = format!("<img src=\"cid:{id}\">");
            for (map, key) in [(&mut args, html_arg), (&mut want, "html")] {
                let html = map[key].as_str().unwrap().to_owned() + &img;
                map.insert(key.into(), json!(html));
            }
            let at = rng.random_range(after..=attachments.len());
            after = at + 1;
            attachments.insert(
                at,
                json!({ "filename": format!("pic{k}.png"), "content_base64": encoded, "content_id": id }),
            );
            inline.push(json!({
                "content_id": id,
                "filename": format!("pic{k}.png"),
                "content_type": "image/png",
                "content_base64": encoded,
            }));
        }
    }
    if !attachments.is_empty() {
        args.insert("attachments".into(), Value::Array(attachments));
    }
    want.insert("attachments".into(), Value::Array(read));
    want.insert("inline".into(), Value::Array(inline));
    (Value::Object(args), Value::Object(want))
}

/// A display name as a phrase means it (RFC 5322 3.2.5): without the
/// whitespace at its ends, each run of spaces and tabs inside one space.
fn phrase(name: &str) -> String {
    name.split([' ', '\t'])
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .trim()
        .to_string()
}

/// Where two values first differ, with a little of each around that point.
fn first_difference(w: &Value, g: &Value) -> String {
    let (w, g): (Vec<char>, Vec<char>) = (
        w.to_string().chars().collect(),
        g.to_string().chars().collect(),
    );
    let at = w
        .iter()
        .zip(&g)
        .position(|(a, b)| a != b)
        .unwrap_or(w.len().min(g.len()));
    let around = |s: &[char]| -> String {
        s[at.saturating_sub(30).min(s.len())..(at + 30).min(s.len())]
            .iter()
            .collect()
    };
    format!("sent …{}…, read …{}…", around(&w), around(&g))
}

/// Where `got` (what the reader saw) differs from `want`. A body may gain
/// the one line ending that ends the data.
fn differences(want: &Value, got: &Value) -> Vec<String> {
    if let Some(e) = got["error"].as_str() {
        return vec![format!("the reader failed: {e}")];
    }
    let mut out = Vec::new();
    for (field, w) in want.as_object().unwrap() {
        let g = &got[field];
        let same = match field.as_str() {
            "text" | "html" if w.is_null() => g.is_null(),
            "text" | "html" => {
                let w = w.as_str().unwrap_or_default();
                let g = g.as_str().unwrap_or_default().replace("\r\n", "\n");
                if g == w || g == format!("{w}\n") {
                    continue;
                }
                out.push(format!(
                    "{field}: {}",
                    first_difference(&json!(w), &json!(g))
                ));
                continue;
            }
            "attachments" => {
                let (w, g) = (
                    w.as_array().unwrap(),
                    g.as_array().cloned().unwrap_or_default(),
                );
                if w.len() != g.len() {
                    out.push(format!("{} attachments sent, {} read", w.len(), g.len()));
                }
                for (k, (w, g)) in w.iter().zip(&g).enumerate() {
                    let name = w["filename"].as_str().unwrap_or_default();
                    if g["filename"] != name {
                        out.push(format!(
                            "attachments[{k}].filename: sent {name:?}, read {}",
                            g["filename"]
                        ));
                    }
                    if w["content_base64"] != g["content_base64"] {
                        out.push(format!("attachments[{k}]: other bytes"));
                    }
                    if w.get("content_type").is_some() && w["content_type"] != g["content_type"] {
                        out.push(format!(
                            "attachments[{k}].content_type: sent {}, read {}",
                            w["content_type"], g["content_type"]
                        ));
                    }
                }
                true
            }
            "to" | "cc" | "reply_to" => {
                let names = |v: &Value| -> Value {
                    v.as_array()
                        .map(|list| {
                            list.iter()
                                .map(|m| json!([phrase(m[0].as_str().unwrap_or_default()), m[1]]))
                                .collect()
                        })
                        .unwrap_or_default()
                };
                names(w) == names(g)
            }
            _ => w == g,
        };
        if !same {
            out.push(format!("{field}: {}", first_difference(w, g)));
        }
    }
    let headers = got["headers"].as_array().cloned().unwrap_or_default();
    if headers.contains(&json!("bcc")) {
        out.push("a Bcc header".into());
    }
    // Python notes a UTF-8 local part as a defect whatever the message:
    // RFC 6532 allows it, and the sink offered SMTPUTF8.
    let defects: Vec<&Value> = got["defects"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| {
            !d.as_str()
                .unwrap_or_default()
                .ends_with("NonASCIILocalPartDefect")
        })
        .collect();
    if !defects.is_empty() {
        out.push(format!("defects: {defects:?}"));
    }
    out
}

/// One tool call's structured answer.
async fn call(h: &InProcess, tool: &str, args: &Value) -> Value {
    let params = CallToolRequestParams::new(tool.to_string())
        .with_arguments(args.as_object().unwrap().clone());
    let result = tokio::time::timeout(Duration::from_secs(60), h.client.call_tool(params))
        .await
        .unwrap_or_else(|_| panic!("{tool} answers within 60 s"))
        .expect("no protocol error");
    result.structured_content.expect("structured content")
}

/// Reads every message at `smtp` with `tests/read_mail.py` and checks each
/// against what was wanted of it, by Message-ID; `wanted` holds each one's
/// number and its body as sent (for the failure message) beside it.
fn read_back(smtp: &Aiosmtpd, seed: u64, mut wanted: HashMap<String, (usize, Value, Value)>) {
    let n = wanted.len();
    let mut failures = Vec::new();
    let mut read = 0;
    for got in smtp.read_back(n) {
        let id = got["message_id"].as_str().unwrap();
        let (i, body, want) = wanted
            .remove(id)
            .unwrap_or_else(|| panic!("a message nobody sent: {id}"));
        read += 1;
        let diff = differences(&want, &got);
        if !diff.is_empty() {
            failures.push(format!(
                "message {i}: {}\n  body: {body}",
                diff.join("\n  ")
            ));
        }
    }
    assert_eq!(read, n, "every message read back once");
    assert!(
        failures.is_empty(),
        "seed {seed}: {} of {n} messages read back otherwise:\n{}",
        failures.len(),
        failures
            .iter()
            .take(8)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test]
async fn random_valid_messages_read_back_as_they_were_sent() {
    let seed = random_input::seed();
    println!("MAILMUX_RANDOM_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let smtp = Aiosmtpd::start_with(&["--smtputf8"]);
    let h = InProcess::start(
        config(vec![relay("primary", smtp.port, 100)]),
        Sources::default(),
    )
    .await;

    let mut wanted = HashMap::new();
    for i in 0..300 {
        let (args, want) = message(&mut rng, i);
        let out = call(&h, "send_email", &args).await;
        assert_eq!(
            out["status"], "sent",
            "message {i} (seed {seed}): {out}\narguments: {args}"
        );
        let id = out["message_id"].as_str().unwrap();
        wanted.insert(format!("<{id}>"), (i, args["body"].clone(), want));
    }
    read_back(&smtp, seed, wanted);
}

/// A mail merge: one `send_batch` whose `defaults` hold the templates and a
/// shared attachment, each message its own recipients and random values
/// (HTML-escaped in the HTML part), some their own subject.
#[tokio::test]
async fn a_random_mail_merge_reads_back_rendered_for_each_message() {
    let seed = random_input::seed();
    println!("MAILMUX_RANDOM_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let smtp = Aiosmtpd::start();
    let h = InProcess::start(
        config(vec![relay("primary", smtp.port, 100)]),
        Sources::default(),
    )
    .await;

    let shared = bytes(&mut rng);
    let shared_b64 = base64::engine::general_purpose::STANDARD.encode(&shared);
    let greeting = text(&mut rng, 1..4);
    let mut messages = Vec::new();
    let mut wants = Vec::new();
    for i in 0..60 {
        let name = text(&mut rng, 1..8);
        let extra = if rng.random_bool(0.5) {
            text(&mut rng, 1..4)
        } else {
            String::new()
        };
        let to = format!("merge{i}@example.org");
        // A recipient's own unsubscribe token, as a mail merge carries it.
        let rid: String = (0..rng.random_range(8..40))
            .map(|_| char::from(b"ABCabc019-_."[rng.random_range(0..12)]))
            .collect();
        let mut m = json!({
            "to": [to],
            "template_vars": { "name": name, "extra": extra, "rid": rid },
        });
        // The defaults' fields, or (a message's own `headers` replace them)
        // a field of its own; `{?extra}` leaves X-Extra out where empty.
        let own = if rng.random_bool(0.2) {
            m["headers"] = json!({ "X-Own": "{name}" });
            vec![("X-Own", name.as_str())]
        } else {
            vec![
                ("X-Campaign", "spring-2027"),
                ("X-Recipient-Ref", rid.as_str()),
                ("X-Recipient-Name", name.as_str()),
                ("X-Extra", extra.as_str()),
                ("Auto-Submitted", "auto-generated"),
            ]
        };
        // A value of whitespace alone leaves its field out.
        let own_fields: serde_json::Map<String, Value> = own
            .into_iter()
            .filter(|(_, v)| !v.trim().is_empty())
            .map(|(k, v)| (k.to_owned(), json!(v)))
            .collect();
        let subject = if rng.random_bool(0.2) {
            let own = format!("{} {{name}}", text(&mut rng, 1..4));
            m["subject"] = json!(own);
            own.replace("{name}", &name)
        } else if extra.is_empty() {
            format!("{greeting} {name}")
        } else {
            format!("{greeting} {name} ({extra})")
        };
        let mut escaped = String::new();
        for c in name.chars() {
            match c {
                '&' => escaped.push_str("&amp;"),
                '<' => escaped.push_str("&lt;"),
                '>' => escaped.push_str("&gt;"),
                '"' => escaped.push_str("&quot;"),
                '\'' => escaped.push_str("&#39;"),
                c => escaped.push(c),
            }
        }
        wants.push(json!({
            "subject": subject,
            "text": format!("Dear {name},\nthe same for everyone.\n"),
            "html": format!("<p>Dear {escaped},</p>\n"),
            "attachments": [{ "filename": "shared.bin", "content_base64": shared_b64 }],
            "rcpt_to": [to],
            "list_unsubscribe": format!(
                "<https://example.org/unsubscribe?r={rid}>, <mailto:leave@example.org?subject=leave%20{rid}>"
            ),
            "list_unsubscribe_post": "List-Unsubscribe=One-Click",
            "own_fields": own_fields,
        }));
        messages.push(m);
    }
    let args = json!({
        "defaults": {
            "subject": format!("{greeting} {{name}}{{?extra}} ({{extra}}){{/extra}}"),
            "body": "Dear {name},\nthe same for everyone.\n",
            "html_body": "<p>Dear {name},</p>\n",
            "attachments": [{ "filename": "shared.bin", "content_base64": shared_b64 }],
            "list_unsubscribe": [
                "https://example.org/unsubscribe?r={rid}",
                "mailto:leave@example.org?subject=leave%20{rid}",
            ],
            "list_unsubscribe_post": true,
            "headers": {
                "X-Campaign": "spring-2027",
                "X-Recipient-Ref": "{rid}",
                "X-Recipient-Name": "{name}",
                "X-Extra": "{?extra}{extra}{/extra}",
                "Auto-Submitted": "auto-generated",
            },
        },
        "messages": messages,
    });
    let out = call(&h, "send_batch", &args).await;
    let results = out["results"].as_array().expect("one result a message");
    assert_eq!(results.len(), wants.len(), "{out}");
    let mut wanted = HashMap::new();
    for (i, (r, want)) in results.iter().zip(wants).enumerate() {
        assert_eq!(r["status"], "sent", "message {i} (seed {seed}): {r}");
        let id = r["message_id"].as_str().unwrap();
        wanted.insert(
            format!("<{id}>"),
            (i, messages[i]["template_vars"].clone(), want),
        );
    }
    read_back(&smtp, seed, wanted);
}

/// Images the HTML shows, as a mail client reads them: in a
/// multipart/related with the HTML (inside the alternative when there is
/// a text body too), inline with their Content-ID, never listed as
/// attachments; files stay beside the body. A batch's `defaults` carry one
/// image for every message of a mail merge.
#[tokio::test]
async fn images_the_html_shows_read_back_where_it_shows_them() {
    let smtp = Aiosmtpd::start();
    let h = InProcess::start(
        config(vec![relay("primary", smtp.port, 100)]),
        Sources::default(),
    )
    .await;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let logo = b64(b"\x89PNG\r\n\x1a\nthe logo");
    let chart = b64(b"GIF89a the chart");
    let one = call(
        &h,
        "send_email",
        &json!({
            "to": "ada@example.org",
            "subject": "report",
            "body": "The logo and the chart.",
            "html_body": "<p><img src=\"cid:logo\"> <img src=\"cid:chart.1@example.org\"></p>",
            "attachments": [
                {"filename": "logo.png", "content_base64": logo, "content_id": "logo"},
                {"filename": "report.pdf", "content_base64": b64(b"%PDF-1.4")},
                {"filename": "chart.gif", "content_base64": chart, "content_id": "chart.1@example.org"},
            ],
        }),
    )
    .await;
    assert_eq!(one["status"], "sent", "{one}");
    let merge = call(
        &h,
        "send_batch",
        &json!({
            "defaults": {
                "subject": "news",
                "body": "<p>Hello {name} <img src=\"cid:logo\"></p>",
                "html": true,
                "attachments": [{"filename": "logo.png", "content_base64": logo, "content_id": "logo"}],
            },
            "messages": [
                {"to": "a@example.org", "template_vars": {"name": "Ada"}},
                {"to": "b@example.org", "template_vars": {"name": "Bob"}},
            ],
        }),
    )
    .await;
    assert_eq!(merge["summary"]["sent"], 2, "{merge}");

    let read = smtp.read_back(3);
    let by_subject = |s: &str| {
        read.iter()
            .filter(|m| m["subject"] == s)
            .collect::<Vec<_>>()
    };
    let report = by_subject("report")[0];
    assert_eq!(
        report["tree"],
        "multipart/mixed(multipart/alternative(text/plain,multipart/related(text/html,image/png,\
         image/gif)),application/pdf)"
    );
    assert_eq!(
        report["attachments"].as_array().unwrap().len(),
        1,
        "{report}"
    );
    assert_eq!(report["attachments"][0]["filename"], "report.pdf");
    let ids: Vec<&Value> = report["inline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["content_id"])
        .collect();
    assert_eq!(ids, [&json!("logo"), &json!("chart.1@example.org")]);
    assert_eq!(report["inline"][0]["content_base64"], logo);
    assert_eq!(report["inline"][1]["content_base64"], chart);
    assert_eq!(report["inline"][1]["content_type"], "image/gif");
    assert_eq!(report["text"], "The logo and the chart.");
    let news = by_subject("news");
    assert_eq!(news.len(), 2);
    // The batch's two messages may reach the sink in either order.
    for m in news {
        let name = match m["rcpt_to"][0].as_str() {
            Some("a@example.org") => "Ada",
            Some("b@example.org") => "Bob",
            other => panic!("a message of the batch to {other:?}"),
        };
        assert_eq!(m["tree"], "multipart/related(text/html,image/png)", "{m}");
        assert!(m["attachments"].as_array().unwrap().is_empty(), "{m}");
        assert_eq!(m["inline"][0]["content_id"], "logo");
        assert_eq!(m["inline"][0]["content_base64"], logo);
        let html = m["html"].as_str().unwrap();
        assert!(html.contains(&format!("Hello {name} <img")), "{m}");
    }
    assert!(
        read.iter()
            .all(|m| m["defects"].as_array().unwrap().is_empty()),
        "{read:?}"
    );
}
