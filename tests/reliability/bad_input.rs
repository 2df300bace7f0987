//! The bad-input table: `send_email` arguments that must be refused with
//! `invalid_input`, the field at fault and the rule it broke (the rules of
//! `mailmux::compose::compose`), with nothing sent. Shared by the standalone
//! test and by the reliability scenario that runs it during a burst.

// Each test binary that includes this module uses a different subset of it.
#![allow(dead_code)]

use std::path::Path;

use base64::Engine;
use mailmux::compose::ComposePolicy;
use serde_json::{Value, json};

/// Limits small enough that oversize input stays cheap to build in a test.
pub const MAX_RECIPIENTS: usize = 5;
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
pub const MAX_ATTACHMENT_BYTES: usize = 64 * 1024;

/// One bad input and the error it must get.
#[derive(Debug, Clone)]
pub struct BadInput {
    pub name: &'static str,
    pub args: Value,
    /// `error.field`, exactly.
    pub field: &'static str,
    /// `error.rule`, exactly.
    pub rule: &'static str,
}

/// An attachments directory in a temp dir, with a file inside, a file
/// outside, a symlink that points outside, a FIFO and a subdirectory.
pub struct AttachmentsDir {
    root: tempfile::TempDir,
}

impl AttachmentsDir {
    pub fn create() -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        let dir = root.path().join("attachments");
        std::fs::create_dir_all(dir.join("sub")).expect("attachments dir");
        std::fs::write(dir.join("ok.txt"), "inside\n").expect("file inside");
        std::fs::write(dir.join("big.bin"), vec![b'x'; MAX_ATTACHMENT_BYTES + 1])
            .expect("big file");
        std::fs::write(root.path().join("outside.txt"), "secret\n").expect("file outside");
        std::os::unix::fs::symlink(root.path().join("outside.txt"), dir.join("escape.txt"))
            .expect("symlink");
        let fifo = std::process::Command::new("mkfifo")
            .arg(dir.join("pipe"))
            .status()
            .expect("mkfifo runs");
        assert!(fifo.success(), "mkfifo failed");
        AttachmentsDir { root }
    }

    pub fn path(&self) -> std::path::PathBuf {
        self.root.path().join("attachments")
    }

    /// The compose policy the table expects: these limits, this directory,
    /// a default sender.
    pub fn policy(&self) -> ComposePolicy {
        ComposePolicy {
            default_from: Some("sender@example.org".into()),
            max_recipients: MAX_RECIPIENTS,
            max_message_bytes: MAX_MESSAGE_BYTES,
            max_attachment_bytes: MAX_ATTACHMENT_BYTES,
            attachments_dir: Some(self.path()),
            ..ComposePolicy::default()
        }
    }
}

/// A valid message, with `extra` merged over it.
fn with(extra: Value) -> Value {
    let mut base = json!({
        "to": "rcpt@example.org",
        "subject": "bad input",
        "body": "this must never be sent",
    });
    if let (Value::Object(b), Value::Object(e)) = (&mut base, extra) {
        for (k, v) in e {
            b.insert(k, v);
        }
    }
    base
}

fn inline(filename: &str, content: &[u8], content_type: Option<&str>) -> Value {
    let mut a = json!({
        "filename": filename,
        "content_base64": base64::engine::general_purpose::STANDARD.encode(content),
    });
    if let Some(t) = content_type {
        a["content_type"] = json!(t);
    }
    a
}

fn case(name: &'static str, args: Value, field: &'static str, rule: &'static str) -> BadInput {
    BadInput {
        name,
        args,
        field,
        rule,
    }
}

/// Every bad input. `dir` is the attachments directory of the policy (for
/// the absolute-path cases).
pub fn cases(dir: &Path) -> Vec<BadInput> {
    const INJECT: &str = "\r\nBcc: victim@evil.example";
    let absolute_outside = dir
        .parent()
        .expect("parent")
        .join("outside.txt")
        .display()
        .to_string();
    let many: Vec<String> = (0..=MAX_RECIPIENTS)
        .map(|i| format!("r{i}@example.org"))
        .collect();
    vec![
        // Header injection, in every field that reaches a header.
        case(
            "CRLF in to",
            with(json!({"to": ["ok@example.org", format!("a@example.org{INJECT}")]})),
            "to[1]",
            "header_injection",
        ),
        case(
            "CRLF in a comma-separated to",
            with(json!({"to": format!("a@example.org{INJECT}")})),
            "to[0]",
            "header_injection",
        ),
        case(
            "CRLF in cc",
            with(json!({"cc": [format!("c@example.org{INJECT}")]})),
            "cc[0]",
            "header_injection",
        ),
        case(
            "CRLF in bcc",
            with(json!({"bcc": format!("b@example.org{INJECT}")})),
            "bcc[0]",
            "header_injection",
        ),
        case(
            "CRLF in subject",
            with(json!({"subject": format!("hello{INJECT}")})),
            "subject",
            "header_injection",
        ),
        case(
            "bare LF in subject",
            with(json!({"subject": "hello\nBcc: victim@evil.example"})),
            "subject",
            "header_injection",
        ),
        case(
            "bare CR in subject",
            with(json!({"subject": "hello\rBcc: victim@evil.example"})),
            "subject",
            "header_injection",
        ),
        case(
            "NUL in subject",
            with(json!({"subject": "hello\u{0}world"})),
            "subject",
            "header_injection",
        ),
        case(
            "control character in subject",
            with(json!({"subject": "bell\u{7}"})),
            "subject",
            "control_character",
        ),
        case(
            "CRLF in from_email",
            with(json!({"from_email": format!("me@example.org{INJECT}")})),
            "from_email",
            "header_injection",
        ),
        case(
            "CRLF in reply_to",
            with(json!({"reply_to": format!("r@example.org{INJECT}")})),
            "reply_to",
            "header_injection",
        ),
        case(
            "CRLF in in_reply_to",
            with(json!({"in_reply_to": format!("<a@example.org>{INJECT}")})),
            "in_reply_to",
            "header_injection",
        ),
        case(
            "CRLF in references",
            with(json!({"references": format!("<a@example.org>{INJECT}")})),
            "references",
            "header_injection",
        ),
        case(
            "CRLF in a display name in to",
            with(json!({"to": [format!("\"Ada{INJECT}\" <ada@example.org>")]})),
            "to[0]",
            "header_injection",
        ),
        case(
            "LF in a display name in cc",
            with(json!({"cc": ["Ada\nBcc: victim@evil.example <ada@example.org>"]})),
            "cc[0]",
            "header_injection",
        ),
        case(
            "CRLF in the display name of from_email",
            with(json!({"from_email": format!("\"Me{INJECT}\" <me@example.org>")})),
            "from_email",
            "header_injection",
        ),
        case(
            "CRLF in the display name of reply_to",
            with(json!({"reply_to": format!("\"R{INJECT}\" <r@example.org>")})),
            "reply_to",
            "header_injection",
        ),
        case(
            "CRLF in an attachment filename",
            with(json!({"attachments": [inline(&format!("a.txt{INJECT}"), b"x", None)]})),
            "attachments[0].filename",
            "header_injection",
        ),
        case(
            "CRLF in an attachment content_type",
            with(json!({"attachments": [inline("a.txt", b"x", Some("text/plain\r\nX-Evil: 1"))]})),
            "attachments[0].content_type",
            "header_injection",
        ),
        case(
            "CRLF in an attachment path",
            with(json!({"attachments": [{"path": format!("ok.txt{INJECT}")}]})),
            "attachments[0].path",
            "header_injection",
        ),
        case(
            "CRLF through a template variable into the subject",
            with(json!({
                "subject": "hello {name}",
                "template_vars": {"name": format!("Ada{INJECT}")},
            })),
            "subject",
            "header_injection",
        ),
        // Oversize input.
        case(
            "body over max_message_bytes",
            with(json!({"body": "x".repeat(MAX_MESSAGE_BYTES + 1)})),
            "body",
            "too_large",
        ),
        case(
            "attachments together over max_message_bytes",
            with(json!({"attachments": (0..5)
                .map(|i| inline(&format!("part{i}.bin"), &vec![0u8; MAX_ATTACHMENT_BYTES], None))
                .collect::<Vec<_>>()})),
            "attachments[2]",
            "too_large",
        ),
        case(
            "inline attachment over max_attachment_bytes",
            with(
                json!({"attachments": [inline("big.bin", &vec![0u8; MAX_ATTACHMENT_BYTES + 1], None)]}),
            ),
            "attachments[0].content_base64",
            "attachment_too_large",
        ),
        case(
            "attachment by path over max_attachment_bytes",
            with(json!({"attachments": [{"path": "big.bin"}]})),
            "attachments[0].path",
            "attachment_too_large",
        ),
        case(
            "subject too long",
            with(json!({"subject": "s".repeat(901)})),
            "subject",
            "too_long",
        ),
        // Too many recipients, in one list and across lists.
        case(
            "too many recipients in to",
            with(json!({"to": many})),
            "to[5]",
            "too_many_recipients",
        ),
        case(
            "too many recipients across to, cc and bcc",
            with(json!({
                "to": ["a@example.org", "b@example.org", "c@example.org"],
                "cc": "d@example.org, e@example.org",
                "bcc": ["f@example.org"],
            })),
            "bcc[0]",
            "too_many_recipients",
        ),
        // Bad addresses and ids.
        case(
            "not an address in to",
            with(json!({"to": ["ok@example.org", "not an address"]})),
            "to[1]",
            "invalid_address",
        ),
        case(
            "missing domain in cc",
            with(json!({"cc": "someone@"})),
            "cc[0]",
            "invalid_address",
        ),
        case(
            "missing local part in bcc",
            with(json!({"bcc": ["@example.org"]})),
            "bcc[0]",
            "invalid_address",
        ),
        case(
            "bad from_email",
            with(json!({"from_email": "nobody"})),
            "from_email",
            "invalid_address",
        ),
        case(
            "bad reply_to",
            with(json!({"reply_to": "a@b@c"})),
            "reply_to",
            "invalid_address",
        ),
        case(
            "no recipient at all",
            with(json!({"to": []})),
            "to",
            "no_recipients",
        ),
        case(
            "bad in_reply_to",
            with(json!({"in_reply_to": "no-at-sign"})),
            "in_reply_to",
            "invalid_message_id",
        ),
        case(
            "bad id in references",
            with(json!({"references": "<a@example.org> <b>"})),
            "references[1]",
            "invalid_message_id",
        ),
        case(
            "CRLF in a list_unsubscribe link",
            with(json!({"list_unsubscribe": format!("https://example.org/u{INJECT}")})),
            "list_unsubscribe[0]",
            "header_injection",
        ),
        case(
            "a second link smuggled into one",
            with(
                json!({"list_unsubscribe": ["mailto:u@example.org", "https://example.org/u>, <https://evil.example.net/"]}),
            ),
            "list_unsubscribe[1]",
            "invalid_uri",
        ),
        case(
            "an http: unsubscribe link",
            with(json!({"list_unsubscribe": "http://example.org/u"})),
            "list_unsubscribe[0]",
            "unsupported_uri_scheme",
        ),
        case(
            "one-click unsubscribe without an https: link",
            with(
                json!({"list_unsubscribe": "mailto:u@example.org", "list_unsubscribe_post": true}),
            ),
            "list_unsubscribe_post",
            "one_click_needs_https",
        ),
        case(
            "list_unsubscribe of the wrong type",
            with(json!({"list_unsubscribe": {"url": "https://example.org/u"}})),
            "list_unsubscribe",
            "schema",
        ),
        case(
            "CRLF in a header field of the caller's",
            with(json!({"headers": {"X-Ticket": format!("1{INJECT}")}})),
            "headers.X-Ticket",
            "header_injection",
        ),
        case(
            "a Bcc smuggled in as a header field",
            with(json!({"headers": {"Bcc": "hidden@example.net"}})),
            "headers.Bcc",
            "header_not_allowed",
        ),
        case(
            "a forged Received field",
            with(json!({"headers": {"Received": "from trusted.example.org"}})),
            "headers.Received",
            "header_not_allowed",
        ),
        case(
            "a header field name with a colon",
            with(json!({"headers": {"X-A: 1\r\nBcc": "hidden@example.net"}})),
            "headers",
            "invalid_header_name",
        ),
        case(
            "headers of the wrong type",
            with(json!({"headers": ["X-Ticket: 1"]})),
            "headers",
            "schema",
        ),
        // Path escapes and files that are not regular files.
        case(
            "parent directory escape",
            with(json!({"attachments": [{"path": "../outside.txt"}]})),
            "attachments[0].path",
            "path_outside_attachments_dir",
        ),
        case(
            "escape through a subdirectory",
            with(json!({"attachments": [{"path": "sub/../../outside.txt"}]})),
            "attachments[0].path",
            "path_outside_attachments_dir",
        ),
        case(
            "absolute path outside",
            with(json!({"attachments": [{"path": absolute_outside}]})),
            "attachments[0].path",
            "path_outside_attachments_dir",
        ),
        case(
            "absolute system path",
            with(json!({"attachments": [{"path": "/etc/passwd"}]})),
            "attachments[0].path",
            "path_outside_attachments_dir",
        ),
        case(
            "symlink pointing outside",
            with(json!({"attachments": [{"path": "escape.txt"}]})),
            "attachments[0].path",
            "path_outside_attachments_dir",
        ),
        case(
            "FIFO",
            with(json!({"attachments": [{"path": "pipe"}]})),
            "attachments[0].path",
            "not_a_regular_file",
        ),
        case(
            "directory",
            with(json!({"attachments": [{"path": "sub"}]})),
            "attachments[0].path",
            "not_a_regular_file",
        ),
        case(
            "missing file",
            with(json!({"attachments": [{"path": "nope.txt"}]})),
            "attachments[0].path",
            "attachment_not_found",
        ),
        case(
            "path separator in an inline filename",
            with(json!({"attachments": [inline("../../etc/x.txt", b"x", None)]})),
            "attachments[0].filename",
            "invalid_filename",
        ),
        // Bad content.
        case(
            "bad base64",
            with(
                json!({"attachments": [{"filename": "a.bin", "content_base64": "!!not base64!!"}]}),
            ),
            "attachments[0].content_base64",
            "invalid_base64",
        ),
        case(
            "multipart content type",
            with(json!({"attachments": [inline("a.txt", b"x", Some("multipart/mixed"))]})),
            "attachments[0].content_type",
            "invalid_content_type",
        ),
        case(
            "missing template variables",
            with(json!({
                "subject": "hello {name}",
                "body": "{greeting}, {name}",
                "template_vars": {},
            })),
            "template_vars",
            "missing_template_vars",
        ),
        case(
            "unclosed template block",
            with(json!({"subject": "{?name}hello", "template_vars": {"name": "x"}})),
            "subject",
            "template_syntax",
        ),
        case(
            "html and html_body together",
            with(json!({"html": true, "html_body": "<p>x</p>"})),
            "html_body",
            "conflicting_fields",
        ),
        case(
            "a priority that is not high or normal",
            with(json!({"priority": "urgent"})),
            "priority",
            "schema",
        ),
        case(
            "a cid link with no attachment of its id",
            with(json!({"html_body": "<p><img src=\"cid:logo\"></p>"})),
            "html_body",
            "unknown_content_id",
        ),
        // Shapes serde alone would report without the field.
        case(
            "recipients of the wrong shape",
            json!({"to": 5, "subject": "x", "body": "y"}),
            "to",
            "schema",
        ),
        case(
            "one recipient of the wrong shape",
            with(json!({"to": ["ok@example.org", 5]})),
            "to[1]",
            "schema",
        ),
        case(
            "a template variable that is a number",
            with(json!({"subject": "{n}", "template_vars": {"n": 42}})),
            "template_vars.n",
            "schema",
        ),
        // A misspelt field is refused, never ignored: `bbc` would otherwise
        // send the message without its blind copy.
        case(
            "a misspelt bcc",
            with(json!({"bbc": "boss@example.org"})),
            "bbc",
            "unknown_field",
        ),
        case(
            "a misspelt attachments",
            with(json!({"attachment": [{"path": "a.txt"}]})),
            "attachment",
            "unknown_field",
        ),
    ]
}

/// Checks one bad input's call: an `invalid_input` tool error naming the
/// field and the rule, with no message composed. Returns what is wrong.
pub fn check(case: &BadInput, c: &crate::harness::Call) -> Result<(), String> {
    let v = c
        .value()
        .ok_or_else(|| format!("{}: no tool result: {:?}", case.name, c.answer))?;
    let err = &v["error"];
    let problems: Vec<String> = [
        (!c.is_error()).then(|| "isError is not true".to_string()),
        (v["status"] != "failed").then(|| format!("status {}", v["status"])),
        (err["code"] != "invalid_input").then(|| format!("code {}", err["code"])),
        (err["field"] != case.field)
            .then(|| format!("field {} (want {})", err["field"], case.field)),
        (err["rule"] != case.rule).then(|| format!("rule {} (want {})", err["rule"], case.rule)),
        (err["message"].as_str().is_none_or(str::is_empty)).then(|| "no message".to_string()),
        c.message_id()
            .map(|id| format!("a message was composed: {id}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {} in {v}", case.name, problems.join(", ")))
    }
}
