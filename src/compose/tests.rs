//! Behaviour of [`compose`]: the produced bytes are parsed back and checked,
//! every rule has a failing input, and random input never panics.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::*;

fn policy() -> ComposePolicy {
    ComposePolicy {
        default_from: Some("Mailmux <sender@example.org>".into()),
        ..ComposePolicy::default()
    }
}

fn draft(to: &str) -> Draft {
    Draft {
        to: Recipients::Csv(to.into()),
        subject: "Hello".into(),
        body: "Hi there.\n".into(),
        ..Draft::default()
    }
}

fn ok(d: &Draft, p: &ComposePolicy) -> Composed {
    match compose(d, p) {
        Ok(c) => c,
        Err(e) => panic!("expected Ok, got {e} ({})", e.rule),
    }
}

fn err(d: &Draft, p: &ComposePolicy) -> ComposeError {
    match compose(d, p) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

fn text(c: &Composed) -> &str {
    std::str::from_utf8(&c.bytes).expect("utf-8 message")
}

/// The header block and the body of a message (or of a MIME part).
fn split(raw: &str) -> (&str, &str) {
    raw.split_once("\r\n\r\n")
        .expect("blank line after headers")
}

/// The top-level header fields, read from the bytes independently of
/// `Preview` (folded lines are joined).
fn scan_headers(bytes: &[u8]) -> Vec<(String, String)> {
    let raw = String::from_utf8_lossy(bytes);
    let (head, _) = raw
        .split_once("\r\n\r\n")
        .expect("blank line after headers");
    let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", "\t");
    unfolded
        .split("\r\n")
        .map(|line| {
            let (name, value) = line.split_once(": ").expect("name: value");
            (name.to_owned(), value.to_owned())
        })
        .collect()
}

/// A header from the preview, which must agree with the bytes.
fn header(c: &Composed, name: &str) -> Option<String> {
    let headers = c.preview().headers;
    assert_eq!(headers, scan_headers(&c.bytes));
    headers
        .into_iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

fn header_names(c: &Composed) -> Vec<String> {
    c.preview()
        .headers
        .iter()
        .map(|(n, _)| n.to_ascii_lowercase())
        .collect()
}

fn has_bare_line_break(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().any(|(i, b)| match b {
        b'\n' => i == 0 || bytes[i - 1] != b'\r',
        b'\r' => bytes.get(i + 1) != Some(&b'\n'),
        _ => false,
    })
}

/// SMTP transparency (RFC 5321 4.5.2): what the client sends, and what the
/// server stores.
fn dot_stuff(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out
}

fn dot_unstuff(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
    }
    out
}

fn addresses(c: &Composed) -> Vec<String> {
    c.recipients.iter().map(ToString::to_string).collect()
}

#[test]
fn plain_message_headers_and_ids() {
    let c = ok(&draft("Ada <ada@example.org>"), &policy());
    let raw = text(&c);
    assert!(!has_bare_line_break(&c.bytes));
    assert_eq!(c.from.to_string(), "sender@example.org");
    assert_eq!(addresses(&c), ["ada@example.org"]);
    assert_eq!(
        header(&c, "From").as_deref(),
        Some("Mailmux <sender@example.org>")
    );
    assert_eq!(header(&c, "To").as_deref(), Some("Ada <ada@example.org>"));
    assert_eq!(header(&c, "Subject").as_deref(), Some("Hello"));
    assert!(header(&c, "Date").as_deref().is_some());
    assert_eq!(header(&c, "MIME-Version").as_deref(), Some("1.0"));
    assert_eq!(
        header(&c, "Content-Type").as_deref(),
        Some("text/plain; charset=utf-8")
    );

    let (id, domain) = c.message_id.split_once('@').expect("id@domain");
    assert_eq!(domain, "mailmux.localhost");
    assert_eq!(id.len(), 32);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    // Time first: a later message's id sorts after an earlier one's.
    std::thread::sleep(std::time::Duration::from_millis(2));
    let later = ok(&draft("a@x.org"), &policy());
    assert!(
        later.message_id > c.message_id,
        "{} then {}",
        c.message_id,
        later.message_id
    );
    assert_ne!(later.message_id[12..32], c.message_id[12..32]);
    assert_eq!(
        header(&c, "Message-ID").as_deref(),
        Some(format!("<{}>", c.message_id).as_str())
    );
    let other = ok(&draft("ada@example.org"), &policy());
    assert_ne!(other.message_id, c.message_id);

    assert_eq!(split(raw).1, "Hi there.\r\n\r\n");
    assert_eq!(c.preview().text.as_deref(), Some("Hi there.\r\n"));
    assert_eq!(c.preview().html, None);
    assert_eq!(c.preview().total_bytes, c.bytes.len());
}

#[test]
fn bcc_is_in_the_envelope_only() {
    let mut d = draft("to@example.org");
    d.cc = Recipients::List(vec!["cc@example.org".into()]);
    d.bcc = Recipients::List(vec!["Hidden Person <hidden@example.org>".into()]);
    let c = ok(&d, &policy());
    assert_eq!(
        addresses(&c),
        ["to@example.org", "cc@example.org", "hidden@example.org"]
    );
    assert!(!header_names(&c).contains(&"bcc".to_owned()));
    let raw = text(&c).to_ascii_lowercase();
    assert!(!raw.contains("hidden"), "bcc leaked into the message");
    assert_eq!(header(&c, "Cc").as_deref(), Some("cc@example.org"));
}

#[test]
fn bcc_only_message() {
    let mut d = draft("");
    d.bcc = Recipients::Csv("hidden@example.org".into());
    let c = ok(&d, &policy());
    assert_eq!(addresses(&c), ["hidden@example.org"]);
    assert!(!text(&c).contains("hidden"));
}

#[test]
fn duplicates_removed_first_occurrence_wins() {
    let mut d = draft("A <a@x.org>, b@x.org");
    d.cc = Recipients::List(vec!["a@X.ORG".into(), "A@x.org".into(), "c@x.org".into()]);
    d.bcc = Recipients::Csv("c@x.org, b@X.org, d@x.org".into());
    let c = ok(&d, &policy());
    assert_eq!(
        addresses(&c),
        ["a@x.org", "b@x.org", "A@x.org", "c@x.org", "d@x.org"]
    );
    assert_eq!(header(&c, "To").as_deref(), Some("A <a@x.org>, b@x.org"));
    assert_eq!(header(&c, "Cc").as_deref(), Some("A@x.org, c@x.org"));
}

#[test]
fn quoted_display_name_with_comma() {
    let c = ok(
        &draft(r#""Doe, Jane" <jane@x.org>, "Roe, Rick" <rick@x.org>"#),
        &policy(),
    );
    assert_eq!(addresses(&c), ["jane@x.org", "rick@x.org"]);
    // An ASCII name with a comma is a quoted string.
    assert_eq!(
        header(&c, "To").as_deref(),
        Some(r#""Doe, Jane" <jane@x.org>, "Roe, Rick" <rick@x.org>"#)
    );
}

#[test]
fn non_ascii_subject_and_names_are_encoded() {
    let mut d = draft("Zoë Ångström <zoe@example.org>");
    d.subject = "Grüße aus Köln ✉".into();
    d.from_email = Some("Jürgen <sender@example.org>".into());
    let c = ok(&d, &policy());
    let (head, _) = split(text(&c));
    assert!(head.is_ascii(), "headers must be ASCII: {head}");
    let subject = header(&c, "Subject").expect("subject");
    assert!(subject.starts_with("=?utf-8?"), "{subject}");
    assert!(header(&c, "To").expect("to").contains("=?utf-8?"));
    assert!(header(&c, "From").expect("from").contains("=?utf-8?"));
}

#[test]
fn non_ascii_address_is_accepted() {
    let c = ok(&draft("jörg@bücher.example"), &policy());
    assert_eq!(addresses(&c), ["jörg@bücher.example"]);
}

#[test]
fn html_alternative_has_both_parts() {
    let mut d = draft("a@x.org");
    d.body = "Plain version".into();
    d.html_body = Some("<p>HTML version</p>".into());
    let c = ok(&d, &policy());
    let raw = text(&c);
    let ct = header(&c, "Content-Type").expect("content type");
    assert!(ct.starts_with("multipart/alternative;"), "{ct}");
    let plain = raw.find("Content-Type: text/plain").expect("text part");
    let html = raw.find("Content-Type: text/html").expect("html part");
    assert!(plain < html, "the preferred (HTML) part comes last");
    assert!(raw.contains("Plain version"));
    assert!(raw.contains("<p>HTML version</p>"));
    assert_eq!(c.preview().text.as_deref(), Some("Plain version"));
    assert_eq!(c.preview().html.as_deref(), Some("<p>HTML version</p>"));
    assert!(!has_bare_line_break(&c.bytes));
}

#[test]
fn html_body_flag() {
    let mut d = draft("a@x.org");
    d.body = "<b>bold</b>".into();
    d.html = true;
    let c = ok(&d, &policy());
    assert_eq!(
        header(&c, "Content-Type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(c.preview().html.as_deref(), Some("<b>bold</b>"));
    assert_eq!(c.preview().text, None);
}

/// Shared attachments (a batch's defaults) are used by a draft without
/// attachments of its own, ignored by one with its own, and count against
/// `max_message_bytes` like its own.
#[test]
fn shared_attachments_go_to_drafts_without_their_own() {
    let content = b"shared,content\n".to_vec();
    let inputs = [AttachmentInput::Inline {
        filename: "shared.csv".into(),
        content_base64: STANDARD.encode(&content),
        content_type: None,
        content_id: None,
    }];
    let shared = SharedAttachments::load(&inputs, &policy()).expect("loads");
    let d = draft("a@x.org");
    let c = compose_with(&d, &policy(), Some(&shared)).expect("composes");
    assert_eq!(c.attachments.len(), 1);
    assert_eq!(c.attachments[0].filename, "shared.csv");
    assert_eq!(c.attachments[0].size, content.len());
    assert!(text(&c).contains("filename=\"shared.csv\""));

    let mut own = draft("a@x.org");
    own.attachments = vec![AttachmentInput::Inline {
        filename: "own.txt".into(),
        content_base64: STANDARD.encode(b"own"),
        content_type: None,
        content_id: None,
    }];
    let c = compose_with(&own, &policy(), Some(&shared)).expect("composes");
    assert_eq!(c.attachments.len(), 1);
    assert_eq!(c.attachments[0].filename, "own.txt");
    assert!(!text(&c).contains("shared.csv"));

    let mut small = policy();
    small.max_message_bytes = 200;
    let big = [AttachmentInput::Inline {
        filename: "big.bin".into(),
        content_base64: STANDARD.encode([7u8; 130]),
        content_type: None,
        content_id: None,
    }];
    let shared = SharedAttachments::load(&big, &small).expect("fits alone");
    let e = compose_with(&d, &small, Some(&shared)).expect_err("too large with the body");
    assert_eq!(e.rule, "too_large");

    let bad = [AttachmentInput::Inline {
        filename: "x.bin".into(),
        content_base64: "not base64!".into(),
        content_type: None,
        content_id: None,
    }];
    let e = SharedAttachments::load(&bad, &policy()).expect_err("bad base64");
    assert_eq!(e.field, "attachments[0].content_base64");
}

#[test]
fn attachment_makes_multipart_mixed() {
    let mut d = draft("a@x.org");
    d.html_body = Some("<p>hi</p>".into());
    let content = b"col1,col2\n1,2\n".to_vec();
    d.attachments = vec![AttachmentInput::Inline {
        filename: "report.csv".into(),
        content_base64: STANDARD.encode(&content),
        content_type: None,
        content_id: None,
    }];
    let c = ok(&d, &policy());
    let raw = text(&c);
    let ct = header(&c, "Content-Type").expect("content type");
    assert!(ct.starts_with("multipart/mixed;"), "{ct}");
    assert!(raw.contains("multipart/alternative"));
    assert!(raw.contains("Content-Disposition: attachment; filename=\"report.csv\""));
    assert!(raw.contains("Content-Type: text/csv"));
    let start = raw
        .find("filename=\"report.csv\"")
        .expect("attachment part");
    let (_, part_body) = split(&raw[start..]);
    let encoded: String = part_body
        .lines()
        .take_while(|l| !l.starts_with("--"))
        .collect();
    assert_eq!(STANDARD.decode(encoded).expect("base64 part"), content);
    assert_eq!(
        c.preview().attachments,
        [AttachmentSummary {
            filename: "report.csv".into(),
            content_type: "text/csv".into(),
            size: content.len(),
            content_id: None,
        }]
    );
    assert!(!has_bare_line_break(&c.bytes));
}

#[test]
fn dot_lines_and_line_endings_survive() {
    let mut d = draft("a@x.org");
    d.body = "first\n.\nsecond\r.\rthird\r\n.\r\n..fourth\n".into();
    let c = ok(&d, &policy());
    assert!(
        !has_bare_line_break(&c.bytes),
        "bare CR or LF in the message"
    );
    let (_, body) = split(text(&c));
    assert_eq!(
        body,
        "first\r\n.\r\nsecond\r\n.\r\nthird\r\n.\r\n..fourth\r\n\r\n"
    );
    // What the SMTP client sends and the server stores is the message again.
    let stuffed = dot_stuff(&c.bytes);
    assert!(!stuffed.windows(5).any(|w| w == b"\r\n.\r\n"));
    assert_eq!(dot_unstuff(&stuffed), c.bytes);
}

#[test]
fn long_lines_and_unicode_bodies_stay_short() {
    let mut d = draft("a@x.org");
    d.body = format!("{}\n.\n{}\n", "x".repeat(5000), "é".repeat(3000));
    let c = ok(&d, &policy());
    assert!(!has_bare_line_break(&c.bytes));
    let longest = c
        .bytes
        .split(|b| *b == b'\n')
        .map(<[u8]>::len)
        .max()
        .unwrap_or(0);
    assert!(longest <= 78, "a line of {longest} bytes");
}

#[test]
fn long_ascii_lines_are_quoted_printable_that_decodes_to_the_body() {
    let mut d = draft("a@x.org");
    let paragraph = "An unwrapped paragraph, as agents write them: a = b, 100 % sure. ".repeat(6);
    d.body = format!("{paragraph}\n.\n{paragraph} \nshort line\t\n");
    let c = ok(&d, &policy());
    assert_eq!(
        header(&c, "Content-Transfer-Encoding").as_deref(),
        Some("quoted-printable")
    );
    let (_, body) = split(text(&c));
    assert!(body.lines().all(|l| l.len() <= 76), "{body}");
    let decoded = quoted_printable::decode(body, quoted_printable::ParseMode::Strict).unwrap();
    assert_eq!(
        String::from_utf8(decoded).unwrap(),
        format!("{paragraph}\r\n.\r\n{paragraph} \r\nshort line\t\r\n\r\n")
    );
    let stuffed = dot_stuff(&c.bytes);
    assert_eq!(dot_unstuff(&stuffed), c.bytes);
}

#[test]
fn nul_in_body_is_base64() {
    let mut d = draft("a@x.org");
    d.body = "a\0b".into();
    let c = ok(&d, &policy());
    assert_eq!(
        header(&c, "Content-Transfer-Encoding").as_deref(),
        Some("base64")
    );
    assert!(!c.bytes.contains(&0));
}

#[test]
fn templates_apply_to_subject_and_bodies() {
    let mut d = draft("a@x.org");
    d.subject = "Hello {name}!".into();
    d.body = "Dear {name},\n{?offer}Offer: {offer}\n{/offer}{?none}gone{/none}Bye".into();
    d.html_body = Some("<p>{name}</p>".into());
    d.template_vars = Some(BTreeMap::from([
        ("name".to_owned(), "<Ada & Co>".to_owned()),
        ("offer".to_owned(), "10%".to_owned()),
    ]));
    let c = ok(&d, &policy());
    assert_eq!(header(&c, "Subject").as_deref(), Some("Hello <Ada & Co>!"));
    assert_eq!(
        c.preview().text.as_deref(),
        Some("Dear <Ada & Co>,\r\nOffer: 10%\r\nBye")
    );
    assert_eq!(
        c.preview().html.as_deref(),
        Some("<p>&lt;Ada &amp; Co&gt;</p>")
    );

    d.html = true;
    d.html_body = None;
    let c = ok(&d, &policy());
    assert!(
        c.preview()
            .html
            .as_deref()
            .is_some_and(|h| h.starts_with("Dear &lt;Ada &amp; Co&gt;,"))
    );
}

#[test]
fn missing_template_vars_are_all_listed() {
    let mut d = draft("a@x.org");
    d.subject = "{zeta}".into();
    d.body = "{alpha} {beta} {?gamma}{delta}{/gamma}".into();
    d.html_body = Some("{omega}".into());
    d.template_vars = Some(BTreeMap::new());
    let e = err(&d, &policy());
    assert_eq!(
        (e.field.as_str(), e.rule),
        ("template_vars", "missing_template_vars")
    );
    assert!(
        e.message.ends_with("alpha, beta, omega, zeta"),
        "{}",
        e.message
    );
}

#[test]
fn braces_untouched_without_template_vars() {
    let mut d = draft("a@x.org");
    d.subject = "{name} {?x}".into();
    d.body = "fn main() { println!(\"{}\", x); } {name} {?a}".into();
    let c = ok(&d, &policy());
    assert_eq!(header(&c, "Subject").as_deref(), Some("{name} {?x}"));
    assert_eq!(c.preview().text.as_deref(), Some(d.body.as_str()));
}

#[test]
fn template_value_with_line_break_cannot_reach_the_subject() {
    let mut d = draft("a@x.org");
    d.subject = "Hi {v}".into();
    d.template_vars = Some(BTreeMap::from([(
        "v".to_owned(),
        "x\r\nBcc: evil@x.org".to_owned(),
    )]));
    let e = err(&d, &policy());
    assert_eq!((e.field.as_str(), e.rule), ("subject", "header_injection"));
}

#[test]
fn sender_rules() {
    let mut p = policy();
    p.default_from = None;
    let e = err(&draft("a@x.org"), &p);
    assert_eq!((e.field.as_str(), e.rule), ("from_email", "missing_sender"));

    let mut d = draft("a@x.org");
    d.from_email = Some("Ops <ops@Corp.Example>".into());
    p.allowed_senders = vec!["@corp.example".into()];
    assert_eq!(ok(&d, &p).from.to_string(), "ops@Corp.Example");
    p.allowed_senders = vec!["ops@corp.example".into()];
    assert!(compose(&d, &p).is_ok());
    p.allowed_senders = vec!["Ops@corp.example".into(), "@other.example".into()];
    let e = err(&d, &p);
    assert_eq!(
        (e.field.as_str(), e.rule),
        ("from_email", "sender_not_allowed")
    );

    // The configured default is held to the same list.
    let mut p = policy();
    p.allowed_senders = vec!["@elsewhere.example".into()];
    let e = err(&draft("a@x.org"), &p);
    assert_eq!(
        (e.field.as_str(), e.rule),
        ("default_from", "sender_not_allowed")
    );
}

#[test]
fn threading_headers() {
    let mut d = draft("a@x.org");
    d.reply_to = Some("Help Desk <help@example.org>".into());
    d.in_reply_to = Some("abc123@mail.example".into());
    d.references = Some("<root@mail.example> abc123@mail.example".into());
    let c = ok(&d, &policy());
    assert_eq!(
        header(&c, "Reply-To").as_deref(),
        Some("Help Desk <help@example.org>")
    );
    assert_eq!(
        header(&c, "In-Reply-To").as_deref(),
        Some("<abc123@mail.example>")
    );
    assert_eq!(
        header(&c, "References").as_deref(),
        Some("<root@mail.example> <abc123@mail.example>")
    );
}

#[test]
fn recipient_limit_counts_distinct_addresses() {
    let mut p = policy();
    p.max_recipients = 2;
    let mut d = draft("a@x.org, A@X.org");
    d.cc = Recipients::Csv("a@x.org, b@x.org".into());
    // a@x.org, A@x.org: two distinct local parts.
    let e = err(&d, &p);
    assert_eq!((e.field.as_str(), e.rule), ("cc[1]", "too_many_recipients"));
    d.cc = Recipients::Csv("a@X.ORG".into());
    assert_eq!(ok(&d, &p).recipients.len(), 2);
}

#[test]
fn size_limits() {
    let mut p = policy();
    p.max_message_bytes = 1000;
    let mut d = draft("a@x.org");
    d.body = "x".repeat(2000);
    let e = err(&d, &p);
    assert_eq!((e.field.as_str(), e.rule), ("body", "too_large"));

    // Passes the estimate, but headers push the real size over.
    d.body = "x".repeat(700);
    let e = err(&d, &p);
    assert_eq!((e.field.as_str(), e.rule), ("message", "too_large"));

    d.body = "short".into();
    d.attachments = vec![AttachmentInput::Inline {
        filename: "a.bin".into(),
        content_base64: STANDARD.encode([1u8; 900]),
        content_type: None,
        content_id: None,
    }];
    let e = err(&d, &p);
    assert_eq!((e.field.as_str(), e.rule), ("attachments[0]", "too_large"));
}

#[test]
fn attachment_by_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("notes.txt"), "hello\n").expect("write");
    let mut p = policy();
    p.attachments_dir = Some(dir.path().to_path_buf());
    let mut d = draft("a@x.org");
    d.attachments = vec![AttachmentInput::Path {
        path: "notes.txt".into(),
        content_type: Some("text/markdown".into()),
        content_id: None,
    }];
    let c = ok(&d, &p);
    assert_eq!(c.preview().attachments[0].filename, "notes.txt");
    assert_eq!(c.preview().attachments[0].content_type, "text/markdown");
    assert!(text(&c).contains("filename=\"notes.txt\""));
}

#[test]
fn drafts_deserialize_from_tool_json() {
    let d: Draft = serde_json::from_str(
        r#"{"to": "a@x.org, b@x.org", "cc": ["c@x.org"], "subject": "s", "body": "b",
            "attachments": [{"filename": "a.txt", "content_base64": "aGk="},
                            {"path": "x.pdf"}]}"#,
    )
    .expect("valid json");
    assert_eq!(d.to, Recipients::Csv("a@x.org, b@x.org".into()));
    assert!(matches!(d.attachments[1], AttachmentInput::Path { .. }));
}

#[test]
fn list_unsubscribe_links_are_rendered_per_message_and_checked_after_it() {
    let mut d = draft("ada@example.org");
    d.list_unsubscribe = Some(Links::Many(vec![
        "https://example.org/u?r={rid}".into(),
        "mailto:leave@example.org?subject=leave%20{rid}".into(),
    ]));
    d.list_unsubscribe_post = true;
    d.template_vars = Some(BTreeMap::from([("rid".to_owned(), "a1b2".to_owned())]));
    let c = ok(&d, &policy());
    assert_eq!(
        header(&c, "List-Unsubscribe").as_deref(),
        Some("<https://example.org/u?r=a1b2>, <mailto:leave@example.org?subject=leave%20a1b2>")
    );
    assert_eq!(
        header(&c, "List-Unsubscribe-Post").as_deref(),
        Some("List-Unsubscribe=One-Click")
    );

    // A substituted value cannot close the link and open another, nor add a line.
    for (value, rule) in [
        ("x>, <https://evil.example.net/", "invalid_uri"),
        ("x\r\nBcc: evil@example.net", "header_injection"),
    ] {
        d.template_vars = Some(BTreeMap::from([("rid".to_owned(), value.to_owned())]));
        let e = err(&d, &policy());
        assert_eq!(
            (e.field.as_str(), e.rule),
            ("list_unsubscribe[0]", rule),
            "{value:?}"
        );
    }
    d.template_vars = None;
    let e = err(&d, &policy());
    assert_eq!(
        e.rule, "invalid_uri",
        "a {{rid}} left unrendered is no link"
    );

    // No links: no field, and a draft without them serializes as before.
    let plain = ok(&draft("ada@example.org"), &policy());
    assert!(header(&plain, "List-Unsubscribe").is_none());
    let json = serde_json::to_value(draft("ada@example.org")).expect("json");
    assert!(json.get("list_unsubscribe").is_none() && json.get("list_unsubscribe_post").is_none());
    let one: Draft =
        serde_json::from_str(r#"{"to": "a@x.org", "list_unsubscribe": "mailto:u@x.org"}"#)
            .expect("one link");
    assert_eq!(
        one.list_unsubscribe,
        Some(Links::One("mailto:u@x.org".into()))
    );
}

#[test]
fn custom_headers_are_rendered_per_message_and_checked_after_it() {
    let mut d = draft("ada@example.org");
    d.headers = BTreeMap::from([
        ("X-Ticket".to_owned(), "T-{ticket}".to_owned()),
        ("Auto-Submitted".to_owned(), "auto-generated".to_owned()),
        ("X-Note".to_owned(), "{?note}{note}{/note}".to_owned()),
    ]);
    d.template_vars = Some(BTreeMap::from([("ticket".to_owned(), "42".to_owned())]));
    let c = ok(&d, &policy());
    assert_eq!(header(&c, "X-Ticket").as_deref(), Some("T-42"));
    assert_eq!(
        header(&c, "Auto-Submitted").as_deref(),
        Some("auto-generated")
    );
    // A value that renders empty leaves its field out.
    assert!(header(&c, "X-Note").is_none());

    // A substituted value cannot add a line.
    d.template_vars = Some(BTreeMap::from([(
        "ticket".to_owned(),
        "1\r\nBcc: evil@example.net".to_owned(),
    )]));
    let e = err(&d, &policy());
    assert_eq!(
        (e.field.as_str(), e.rule),
        ("headers.X-Ticket", "header_injection")
    );
    // Nor can a field stand in for one that mailmux writes.
    d.template_vars = None;
    d.headers = BTreeMap::from([("Message-ID".to_owned(), "<x@example.org>".to_owned())]);
    let e = err(&d, &policy());
    assert_eq!(
        (e.field.as_str(), e.rule),
        ("headers.Message-ID", "header_not_allowed")
    );

    // A template error names the field, unless its name is no field name.
    d.template_vars = Some(BTreeMap::new());
    for (name, field) in [("X-Open", "headers.X-Open"), ("X Open\u{7}", "headers")] {
        d.headers = BTreeMap::from([(name.to_owned(), "{?x}unclosed".to_owned())]);
        let e = err(&d, &policy());
        assert_eq!((e.field.as_str(), e.rule), (field, "template_syntax"));
    }

    // None: a draft serializes as before.
    let json = serde_json::to_value(draft("ada@example.org")).expect("json");
    assert!(json.get("headers").is_none());
}

#[test]
fn shorthand_forms_are_written_out_for_the_content_hash() {
    let long: Draft = serde_json::from_value(serde_json::json!({
        "to": ["a@x.org", "\"Doe, Jane\" <j@x.org>"], "cc": [], "bcc": ["b@x.org"],
        "list_unsubscribe": ["mailto:u@x.org"],
    }))
    .unwrap();
    assert!(long.written_out().is_none(), "nothing to write out");
    let short: Draft = serde_json::from_value(serde_json::json!({
        "to": "a@x.org, \"Doe, Jane\" <j@x.org>", "cc": "", "bcc": " b@x.org ",
        "list_unsubscribe": "mailto:u@x.org",
    }))
    .unwrap();
    assert_eq!(short.written_out(), Some(long.clone()));
    let none: Draft = serde_json::from_value(serde_json::json!({
        "to": ["a@x.org"], "list_unsubscribe": [],
    }))
    .unwrap();
    assert_eq!(none.written_out().unwrap().list_unsubscribe, None);
    // `"priority": "normal"` is the default written out; `high` is content.
    let normal: Draft = serde_json::from_value(serde_json::json!({
        "to": ["a@x.org", "\"Doe, Jane\" <j@x.org>"], "cc": [], "bcc": ["b@x.org"],
        "list_unsubscribe": ["mailto:u@x.org"], "priority": "normal",
    }))
    .unwrap();
    assert_eq!(normal.written_out(), Some(long.clone()));
    let high = Draft {
        priority: Some(PriorityParam::High),
        ..long.clone()
    };
    assert!(high.written_out().is_none());
    assert_ne!(
        serde_json::to_value(&high).unwrap(),
        serde_json::to_value(&long).unwrap()
    );
}

#[test]
fn bad_input_table() {
    type Edit = fn(&mut Draft, &mut ComposePolicy);
    let table: Vec<(&str, Edit, &str)> = vec![
        (
            "to[0]",
            |d, _| d.to = Recipients::Csv("not an address".into()),
            "invalid_address",
        ),
        (
            "to[1]",
            |d, _| d.to = Recipients::Csv("a@x.org, b@".into()),
            "invalid_address",
        ),
        (
            "to[0]",
            |d, _| d.to = Recipients::List(vec!["".into()]),
            "invalid_address",
        ),
        (
            "to[0]",
            |d, _| d.to = Recipients::List(vec!["a@x.org\r\nBcc: e@x.org".into()]),
            "header_injection",
        ),
        (
            "cc[1]",
            |d, _| {
                d.cc = Recipients::List(vec!["c@x.org".into(), "\"Evil\nName\" <e@x.org>".into()])
            },
            "header_injection",
        ),
        (
            "bcc[0]",
            |d, _| d.bcc = Recipients::Csv("x\0@x.org".into()),
            "header_injection",
        ),
        (
            "to[0]",
            |d, _| d.to = Recipients::Csv("\"Bell\u{7}\" <b@x.org>".into()),
            "control_character",
        ),
        (
            "to[0]",
            |d, _| d.to = Recipients::Csv(format!("{}@x.org", "a".repeat(600))),
            "invalid_address",
        ),
        (
            "to",
            |d, _| d.to = Recipients::Csv(" , ".into()),
            "no_recipients",
        ),
        (
            "to[2]",
            |d, p| {
                p.max_recipients = 2;
                d.to = Recipients::Csv("a@x.org,b@x.org,c@x.org".into())
            },
            "too_many_recipients",
        ),
        (
            "subject",
            |d, _| d.subject = "Hi\r\nBcc: e@x.org".into(),
            "header_injection",
        ),
        (
            "subject",
            |d, _| d.subject = "Hi\nthere".into(),
            "header_injection",
        ),
        ("subject", |d, _| d.subject = "x".repeat(1000), "too_long"),
        (
            "from_email",
            |d, _| d.from_email = Some("me@x.org\r\nX: y".into()),
            "header_injection",
        ),
        (
            "from_email",
            |d, _| d.from_email = Some("me at x.org".into()),
            "invalid_address",
        ),
        (
            "from_email",
            |d, p| {
                p.default_from = None;
                d.from_email = None
            },
            "missing_sender",
        ),
        (
            "from_email",
            |d, p| {
                p.allowed_senders = vec!["@corp.example".into()];
                d.from_email = Some("me@x.org".into())
            },
            "sender_not_allowed",
        ),
        (
            "default_from",
            |_, p| p.default_from = Some("bad\n@x.org".into()),
            "header_injection",
        ),
        (
            "reply_to",
            |d, _| d.reply_to = Some("r@x.org\nBcc: e@x.org".into()),
            "header_injection",
        ),
        (
            "reply_to",
            |d, _| d.reply_to = Some("nope".into()),
            "invalid_address",
        ),
        (
            "in_reply_to",
            |d, _| d.in_reply_to = Some("<a@b>\r\nX: y".into()),
            "header_injection",
        ),
        (
            "in_reply_to",
            |d, _| d.in_reply_to = Some("<a b@c>".into()),
            "invalid_message_id",
        ),
        (
            "references",
            |d, _| d.references = Some("a@b\nc@d".into()),
            "header_injection",
        ),
        (
            "references[1]",
            |d, _| d.references = Some("<a@b> <nohost>".into()),
            "invalid_message_id",
        ),
        (
            "references",
            |d, _| d.references = Some("  ".into()),
            "invalid_message_id",
        ),
        (
            "html_body",
            |d, _| {
                d.html = true;
                d.html_body = Some("<p>x</p>".into())
            },
            "conflicting_fields",
        ),
        (
            "template_vars",
            |d, _| {
                d.body = "{who}".into();
                d.template_vars = Some(BTreeMap::new())
            },
            "missing_template_vars",
        ),
        (
            "body",
            |d, _| {
                d.body = "{?x}never closed".into();
                d.template_vars = Some(BTreeMap::new())
            },
            "template_syntax",
        ),
        (
            "html_body",
            |d, _| {
                d.html_body = Some("{/x}".into());
                d.template_vars = Some(BTreeMap::new())
            },
            "template_syntax",
        ),
        (
            "body",
            |d, p| {
                p.max_message_bytes = 100;
                d.body = "x".repeat(200)
            },
            "too_large",
        ),
        (
            "message_id_domain",
            |_, p| p.message_id_domain = "bad domain\r\n".into(),
            "invalid_message_id_domain",
        ),
        (
            "attachments[0].filename",
            |d, _| {
                d.attachments = vec![AttachmentInput::Inline {
                    filename: "a\r\n.txt".into(),
                    content_base64: "aGk=".into(),
                    content_type: None,
                    content_id: None,
                }]
            },
            "header_injection",
        ),
        (
            "attachments[0].filename",
            |d, _| {
                d.attachments = vec![AttachmentInput::Inline {
                    filename: " ".into(),
                    content_base64: "aGk=".into(),
                    content_type: None,
                    content_id: None,
                }]
            },
            "invalid_filename",
        ),
        (
            "attachments[0].content_base64",
            |d, _| {
                d.attachments = vec![AttachmentInput::Inline {
                    filename: "a.txt".into(),
                    content_base64: "not base64!".into(),
                    content_type: None,
                    content_id: None,
                }]
            },
            "invalid_base64",
        ),
        (
            "attachments[1].content_base64",
            |d, p| {
                p.max_attachment_bytes = 10;
                d.attachments = vec![
                    AttachmentInput::Inline {
                        filename: "a.txt".into(),
                        content_base64: "aGk=".into(),
                        content_type: None,
                        content_id: None,
                    },
                    AttachmentInput::Inline {
                        filename: "b.txt".into(),
                        content_base64: "A".repeat(100),
                        content_type: None,
                        content_id: None,
                    },
                ]
            },
            "attachment_too_large",
        ),
        (
            "attachments[0].content_type",
            |d, _| {
                d.attachments = vec![AttachmentInput::Inline {
                    filename: "a.txt".into(),
                    content_base64: "aGk=".into(),
                    content_type: Some("text/plain\nX-Evil: 1".into()),
                    content_id: None,
                }]
            },
            "header_injection",
        ),
        (
            "attachments[0].content_type",
            |d, _| {
                d.attachments = vec![AttachmentInput::Inline {
                    filename: "a.txt".into(),
                    content_base64: "aGk=".into(),
                    content_type: Some("plain".into()),
                    content_id: None,
                }]
            },
            "invalid_content_type",
        ),
        (
            "attachments[0].path",
            |d, _| {
                d.attachments = vec![AttachmentInput::Path {
                    path: "a.txt".into(),
                    content_type: None,
                    content_id: None,
                }]
            },
            "attachments_by_path_disabled",
        ),
        (
            "attachments[0]",
            |d, p| {
                p.max_message_bytes = 500;
                d.attachments = vec![AttachmentInput::Inline {
                    filename: "a.bin".into(),
                    content_base64: "A".repeat(600),
                    content_type: None,
                    content_id: None,
                }]
            },
            "too_large",
        ),
    ];
    for (field, edit, rule) in table {
        let mut d = draft("a@x.org");
        let mut p = policy();
        edit(&mut d, &mut p);
        let e = match compose(&d, &p) {
            Ok(_) => panic!("{field}: expected rule {rule}, got Ok"),
            Err(e) => e,
        };
        assert_eq!(
            (e.field.as_str(), e.rule),
            (field, rule),
            "message was: {}",
            e.message
        );
        assert!(!e.message.is_empty());
        assert!(e.to_string().starts_with(field));
    }
}

/// A small deterministic generator (xorshift64*): the same strings on every
/// run, so a failure can be reproduced.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    fn string(&mut self) -> String {
        const PIECES: &[&str] = &[
            "\r",
            "\n",
            "\r\n",
            "\0",
            "\u{1}",
            "\u{7f}",
            "\t",
            " ",
            ",",
            "\"",
            "\\",
            "<",
            ">",
            "@",
            ".",
            "(",
            ")",
            "{",
            "}",
            "{a}",
            "{?a}",
            "{/a}",
            "{b}",
            "=?utf-8?b?",
            "é",
            "日本",
            "😀",
            "\u{2028}",
            "\u{85}",
            "\u{feff}",
            "a",
            "x.org",
            "ada@example.org",
            "\"Doe, Jane\" <j@x.org>",
            "..",
            "/",
            "=",
            "aGk=",
            "\n.\n",
            ".",
            "\u{10ffff}",
        ];
        let mut s = String::new();
        if self.chance(40) {
            let piece = PIECES[self.below(PIECES.len())];
            return piece.repeat(20_000 + self.below(20_000));
        }
        for _ in 0..self.below(24) {
            s.push_str(PIECES[self.below(PIECES.len())]);
        }
        if self.chance(5) {
            s.push(char::from_u32(self.next() as u32 % 0x11_0000).unwrap_or('?'));
        }
        s
    }

    /// Mostly a valid value, sometimes a hostile one: both paths must be
    /// exercised.
    fn or_valid(&mut self, valid: &str) -> String {
        if self.chance(8) {
            self.string()
        } else {
            valid.to_owned()
        }
    }

    fn recipients(&mut self, valid: &str) -> Recipients {
        match self.below(16) {
            0 => Recipients::Csv(self.string()),
            1 => Recipients::List((0..self.below(4)).map(|_| self.string()).collect()),
            _ => Recipients::Csv(valid.into()),
        }
    }

    fn attachment(&mut self) -> AttachmentInput {
        if self.chance(4) {
            return AttachmentInput::Path {
                path: self.or_valid("a"),
                content_type: self.chance(4).then(|| self.string()),
                content_id: None,
            };
        }
        let content_base64 = if self.chance(2) {
            let bytes: Vec<u8> = (0..self.below(3000)).map(|_| self.next() as u8).collect();
            STANDARD.encode(bytes)
        } else {
            self.string()
        };
        AttachmentInput::Inline {
            filename: self.or_valid("f.txt"),
            content_base64,
            content_type: self.chance(4).then(|| self.string()),
            content_id: None,
        }
    }
}

#[test]
fn random_input_never_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("a"), "file a").expect("write");
    let mut g = Gen(0x9E37_79B9_7F4A_7C15);
    let (mut accepted, mut rejected) = (0, 0);
    for round in 0..1500 {
        let p = ComposePolicy {
            default_from: (!g.chance(8)).then(|| "sender@example.org".into()),
            max_message_bytes: 200_000,
            max_attachment_bytes: 50_000,
            attachments_dir: g.chance(2).then(|| dir.path().to_path_buf()),
            one_click: (!g.chance(4)).then(|| crate::suppress::OneClick {
                url: "https://mail.example.org".into(),
                secret: mailmux_actors::Secret::new("k".repeat(32)),
                previous: None,
            }),
            templates: named::Templates(vec![std::sync::Arc::new(named::Template {
                name: "t".into(),
                description: None,
                subject: g.or_valid("Order {a}"),
                body: g.string(),
                html_body: g.chance(2).then(|| g.string()),
                vars: Vec::new(),
                patterns: vec![named::VarPattern::new("a", "[a-z]*").unwrap()],
                images: Vec::new(),
            })]),
            ..ComposePolicy::default()
        };
        let d = Draft {
            template: g.chance(6).then(|| g.or_valid("t")),
            to: g.recipients(r#"ada@example.org, "Doe, Jane" <j@x.org>"#),
            cc: g.recipients(""),
            bcc: g.recipients("Zoë <z@x.org>"),
            subject: g.or_valid("Grüße"),
            body: g.string(),
            html: g.chance(3),
            html_body: g.chance(4).then(|| g.string()),
            from_email: g.chance(10).then(|| g.string()),
            reply_to: g.chance(8).then(|| g.string()),
            in_reply_to: g.chance(8).then(|| g.string()),
            references: g.chance(8).then(|| g.string()),
            attachments: if g.chance(3) {
                (0..1 + g.below(2)).map(|_| g.attachment()).collect()
            } else {
                Vec::new()
            },
            template_vars: g
                .chance(4)
                .then(|| BTreeMap::from([("a".to_owned(), g.string()), (g.string(), g.string())])),
            list_unsubscribe: g.chance(4).then(|| match g.below(3) {
                0 => Links::One(g.string()),
                1 => Links::Many((0..g.below(6)).map(|_| g.string()).collect()),
                _ => Links::One(g.or_valid("https://example.org/u?r={a}")),
            }),
            list_unsubscribe_post: g.chance(4),
            unsubscribe: g.chance(8),
            headers: if g.chance(4) {
                (0..g.below(4))
                    .map(|i| match g.below(3) {
                        0 => (g.string(), g.string()),
                        1 => (format!("X-F{i}"), g.string()),
                        _ => ("X-Ref".to_owned(), g.or_valid("ref {a}")),
                    })
                    .collect()
            } else {
                BTreeMap::new()
            },
            tag: g.chance(12).then(|| g.or_valid("spring sale")),
            // From the round, not the generator, whose draws make the rest.
            priority: (round % 6 == 0).then_some(PriorityParam::High),
            metadata: if g.chance(12) {
                BTreeMap::from([(g.or_valid("customer_id"), g.or_valid("c-42"))])
            } else {
                BTreeMap::new()
            },
            send_at: None,
        };
        match compose(&d, &p) {
            Ok(c) => {
                accepted += 1;
                assert!(!has_bare_line_break(&c.bytes), "round {round}: bare CR/LF");
                assert!(!c.bytes.contains(&0), "round {round}: NUL in message");
                assert!(
                    c.bytes.split(|b| *b == b'\n').all(|l| l.len() <= 1000),
                    "round {round}: line over 998 bytes"
                );
                assert!(!header_names(&c).contains(&"bcc".to_owned()));
                assert!(c.bytes.len() <= p.max_message_bytes);
            }
            Err(e) => {
                rejected += 1;
                assert!(!e.field.is_empty(), "round {round}: error without a field");
                assert!(!e.rule.is_empty());
            }
        }
    }
    assert!(
        accepted > 100 && rejected > 100,
        "the generator should produce both valid and invalid drafts: {accepted} ok, {rejected} rejected"
    );
}

#[test]
fn crlf_normalises_every_line_ending_and_keeps_the_rest() {
    for (input, expected) in [
        ("", ""),
        ("no break", "no break"),
        ("a\nb", "a\r\nb"),
        ("a\rb", "a\r\nb"),
        ("a\r\nb", "a\r\nb"),
        ("a\n\rb", "a\r\n\r\nb"),
        ("\r\r\n\n", "\r\n\r\n\r\n"),
        ("é\nü\r\n✓\r", "é\r\nü\r\n✓\r\n"),
        ("end\n", "end\r\n"),
    ] {
        assert_eq!(crlf(input), expected, "{input:?}");
    }
}

#[test]
fn text_bodies_get_the_encoding_lettre_chooses() {
    let long = "x".repeat(100);
    for (body, encoding) in [
        ("short ASCII lines\nonly\n".to_string(), "7bit"),
        (format!("{long}\nand a short one\n"), "quoted-printable"),
        ("short but not ASCII: é\n".to_string(), "quoted-printable"),
    ] {
        let mut d = draft("a@x.org");
        d.body = body.clone();
        let c = ok(&d, &policy());
        assert_eq!(
            header(&c, "Content-Transfer-Encoding").as_deref(),
            Some(encoding),
            "{body:?}"
        );
        assert!(!has_bare_line_break(&c.bytes), "{body:?}");
        // The same choice lettre makes for the String on its own.
        let reference = SinglePart::builder()
            .header(ContentType::TEXT_PLAIN)
            .body(crlf(&body));
        let ours = text_part(ContentType::TEXT_PLAIN, crlf(&body));
        assert_eq!(ours.formatted(), reference.formatted(), "{body:?}");
    }
}

#[test]
fn large_or_file_drafts_are_heavy_and_small_ones_are_not() {
    let mut d = draft("a@x.org");
    assert!(!d.is_heavy());
    d.body = "x".repeat(300 * 1024);
    assert!(d.is_heavy(), "a 300 KiB body");
    let mut d = draft("a@x.org");
    d.attachments = vec![AttachmentInput::Path {
        path: "notes.txt".into(),
        content_type: None,
        content_id: None,
    }];
    assert!(d.is_heavy(), "a file to read");
    let mut d = draft("a@x.org");
    d.attachments = vec![AttachmentInput::Inline {
        filename: "a.bin".into(),
        content_base64: "QUJD".repeat(100),
        content_type: None,
        content_id: None,
    }];
    assert!(!d.is_heavy(), "a small inline attachment");
}

/// mail_parser, the reader of the console and of the Sent copy's Bcc check,
/// reads the subject, the names and a file name as they were given.
#[test]
fn mail_parser_reads_subjects_names_and_file_names_as_given() {
    use mail_parser::{MessageParser, MimeHeaders};
    let subjects = [
        "Hello there",
        " leading and trailing ",
        "two  spaces and\ta tab",
        "Re: =?utf-8?q?not_a_word?=",
        "日本語  👍🏽 Zoë",
        &"長い件名".repeat(40),
    ];
    let names = [
        "Ada Lovelace",
        "Lovelace, Ada",
        "say \"hi\"",
        "日本 太郎",
        "=?utf-8?q?x?=",
        "Ωμέγα Ωμέγα Ωμέγα Ωμέγα 日本語 日本語",
    ];
    for (subject, name) in subjects.iter().zip(names) {
        let quoted = name.replace('\\', "\\\\").replace('"', "\\\"");
        let mut d = draft(&format!("\"{quoted}\" <a@x.org>"));
        d.subject = (*subject).to_owned();
        d.attachments = vec![AttachmentInput::Inline {
            filename: format!("{name}.txt"),
            content_base64: STANDARD.encode("x"),
            content_type: None,
            content_id: None,
        }];
        let c = ok(&d, &policy());
        let m = MessageParser::default().parse(&c.bytes[..]).unwrap();
        assert_eq!(m.subject(), Some(*subject), "{}", text(&c));
        let to = m.to().unwrap().first().unwrap();
        assert_eq!(to.name(), Some(name), "{}", text(&c));
        let file = m.attachments().next().unwrap().attachment_name();
        assert_eq!(file, Some(format!("{name}.txt").as_str()), "{}", text(&c));
    }
}

#[test]
fn a_one_click_link_goes_first_and_into_the_templates_of_one_recipient() {
    let mut d = draft("Ada@Example.org");
    d.unsubscribe = true;
    d.body = "Stop: {unsubscribe_url}\n{?rid}rid {rid}{/rid}\n".into();
    d.list_unsubscribe = Some(Links::One("mailto:leave@example.org".into()));
    // Without [unsubscribe]: refused, naming the field.
    let e = compose(&d, &policy()).unwrap_err();
    assert_eq!(
        (e.field.as_str(), e.rule),
        ("unsubscribe", "not_configured")
    );
    let mut p = policy();
    let one_click = crate::suppress::OneClick {
        url: "https://mail.example.org".into(),
        secret: mailmux_actors::Secret::new("k".repeat(32)),
        previous: None,
    };
    p.one_click = Some(one_click.clone());
    let link = one_click.link("ada@example.org").unwrap();
    let c = ok(&d, &p);
    assert_eq!(
        header(&c, "List-Unsubscribe").as_deref(),
        Some(format!("<{link}>, <mailto:leave@example.org>").as_str())
    );
    assert_eq!(
        header(&c, "List-Unsubscribe-Post").as_deref(),
        Some("List-Unsubscribe=One-Click")
    );
    // The caller's own variables still apply, and cannot replace the link.
    d.template_vars = Some(BTreeMap::from([
        ("rid".to_owned(), "a1".to_owned()),
        (
            "unsubscribe_url".to_owned(),
            "https://evil.example.net/".to_owned(),
        ),
    ]));
    let text = String::from_utf8_lossy(&ok(&d, &p).bytes).into_owned();
    assert!(!text.contains("evil.example.net"), "{text}");
    assert!(text.contains("rid a1"), "{text}");
    // Two recipients: one link cannot serve both.
    d.cc = Recipients::List(vec!["bob@example.org".into()]);
    let e = compose(&d, &p).unwrap_err();
    assert_eq!((e.field.as_str(), e.rule), ("unsubscribe", "one_recipient"));
}

fn with_templates() -> ComposePolicy {
    let t = named::Template {
        name: "shipped".into(),
        description: None,
        subject: "Order {order} has shipped".into(),
        body: "Hello {name},\n{?note}Note: {note}\n{/note}".into(),
        html_body: Some("<p>Hello {name}</p>".into()),
        vars: vec!["name".into(), "note".into(), "order".into()],
        patterns: vec![named::VarPattern::new("order", "[0-9]{1,10}").unwrap()],
        images: Vec::new(),
    };
    ComposePolicy {
        templates: named::Templates(vec![std::sync::Arc::new(t)]),
        ..policy()
    }
}

fn from_template(name: &str, vars: &[(&str, &str)]) -> Draft {
    Draft {
        to: Recipients::Csv("ada@example.org".into()),
        template: Some(name.into()),
        template_vars: Some(
            vars.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ),
        ..Draft::default()
    }
}

#[test]
fn a_template_writes_the_subject_and_bodies_with_the_calls_variables() {
    let p = with_templates();
    let c = ok(
        &from_template("shipped", &[("name", "<Ada>"), ("order", "1042")]),
        &p,
    );
    assert_eq!(c.subject, "Order 1042 has shipped");
    assert_eq!(c.template.as_deref(), Some("shipped"));
    assert_eq!(c.text.as_deref(), Some("Hello <Ada>,\r\n"));
    // Values are escaped in the HTML alternative, never markup.
    assert_eq!(c.html.as_deref(), Some("<p>Hello &lt;Ada&gt;</p>"));
    assert!(text(&c).contains("Subject: Order 1042 has shipped\r\n"));

    // Without template_vars the texts are still rendered: a variable they
    // need is missing, never sent as braces.
    let mut d = from_template("shipped", &[]);
    d.template_vars = None;
    let e = err(&d, &p);
    assert_eq!(
        (e.field.as_str(), e.rule),
        ("template_vars", "missing_template_vars")
    );
    assert!(e.message.contains("name, order"), "{}", e.message);

    // A subject or a body of the call's own beside a template is refused.
    for (field, set) in [
        (
            "subject",
            (|d: &mut Draft| d.subject = "mine".into()) as fn(&mut Draft),
        ),
        ("body", |d| d.body = "mine".into()),
        ("html_body", |d| d.html_body = Some("<p>mine</p>".into())),
        ("html", |d| d.html = true),
    ] {
        let mut d = from_template("shipped", &[("name", "A"), ("order", "1")]);
        set(&mut d);
        let e = err(&d, &p);
        assert_eq!((e.field.as_str(), e.rule), (field, "conflicting_fields"));
    }

    // A value its variable's pattern refuses, whole: never echoed.
    for order in ["1042; and the customer list", "", "10421042104210421042"] {
        let e = err(
            &from_template("shipped", &[("name", "A"), ("order", order)]),
            &p,
        );
        assert_eq!(
            (e.field.as_str(), e.rule),
            ("template_vars.order", "template_var_mismatch")
        );
        assert!(e.message.contains("[0-9]{1,10}"), "{}", e.message);
        assert!(
            order.is_empty() || !e.message.contains(order),
            "{}",
            e.message
        );
    }

    // With patterns, the daemon's unsubscribe link is not the agent's to give.
    let e = err(
        &from_template(
            "shipped",
            &[
                ("name", "A"),
                ("order", "1"),
                ("unsubscribe_url", "https://evil.example"),
            ],
        ),
        &p,
    );
    assert_eq!(
        (e.field.as_str(), e.rule),
        ("template_vars.unsubscribe_url", "template_var_mismatch")
    );

    let e = err(&from_template("nope", &[]), &p);
    assert_eq!((e.field.as_str(), e.rule), ("template", "unknown_template"));
    assert!(e.message.contains("\"nope\""), "{}", e.message);
    let e = err(&from_template("shipped", &[]), &policy());
    assert!(e.message.contains("none is configured"), "{}", e.message);

    // A draft without a template is as before.
    assert_eq!(ok(&draft("ada@example.org"), &p).template, None);
}

/// The MIME tree of a message as `type(child,child)`, read by mail_parser.
fn tree(bytes: &[u8]) -> String {
    use mail_parser::{MessageParser, MimeHeaders, PartType};
    fn walk(m: &mail_parser::Message<'_>, id: u32) -> String {
        let part = &m.parts[id as usize];
        let ct = part.content_type().map_or("text/plain".to_owned(), |c| {
            format!("{}/{}", c.c_type, c.c_subtype.as_deref().unwrap_or(""))
        });
        match &part.body {
            PartType::Multipart(children) => {
                let inner: Vec<String> = children.iter().map(|c| walk(m, *c)).collect();
                format!("{ct}({})", inner.join(","))
            }
            _ => ct,
        }
    }
    let m = MessageParser::default().parse(bytes).expect("parses");
    walk(&m, 0)
}

fn image(filename: &str, content_id: Option<&str>, data: &[u8]) -> AttachmentInput {
    AttachmentInput::Inline {
        filename: filename.into(),
        content_base64: STANDARD.encode(data),
        content_type: None,
        content_id: content_id.map(str::to_owned),
    }
}

/// An attachment with a `content_id` is shown by the HTML, not attached:
/// the HTML and the parts it shows go in a multipart/related (the HTML
/// first), each part `inline` with its `Content-ID`; other attachments stay
/// beside the body in the multipart/mixed.
#[test]
fn attachments_with_a_content_id_are_shown_by_the_html() {
    use mail_parser::{MessageParser, MimeHeaders};
    let logo = b"\x89PNG\r\n\x1a\nlogo bytes".to_vec();
    let mut d = draft("a@x.org");
    d.body = "Our logo, and the report.\n".into();
    d.html_body = Some("<p><img src=\"cid:logo@example.org\"> and the report</p>".into());
    d.attachments = vec![
        image("report.pdf", None, b"%PDF-1.4 report"),
        image("logo.png", Some("logo@example.org"), &logo),
    ];
    let c = ok(&d, &policy());
    assert_eq!(
        tree(&c.bytes),
        "multipart/mixed(multipart/alternative(text/plain,multipart/related(text/html,image/png)),\
         application/pdf)",
        "{}",
        text(&c)
    );
    let raw = text(&c);
    assert!(raw.contains("Content-ID: <logo@example.org>"), "{raw}");
    assert!(
        raw.contains("Content-Disposition: inline; filename=\"logo.png\""),
        "{raw}"
    );
    let m = MessageParser::default().parse(&c.bytes[..]).unwrap();
    let shown = m
        .parts
        .iter()
        .find(|p| p.content_id() == Some("logo@example.org"))
        .expect("the image part");
    assert_eq!(shown.contents(), &logo[..]);
    assert_eq!(
        c.attachments[1].content_id.as_deref(),
        Some("logo@example.org")
    );
    assert_eq!(c.attachments[0].content_id, None);

    // An HTML body alone, with the image only: a multipart/related at the
    // top; a file name that needs encoding keeps it.
    let mut d = draft("a@x.org");
    d.html = true;
    d.body = "<img src=\"cid:a\"><img src=\"cid:b\">".into();
    d.attachments = vec![
        image("a.png", Some("a"), b"a"),
        image("bé ü.png", Some("b"), b"b"),
    ];
    let c = ok(&d, &policy());
    assert_eq!(
        tree(&c.bytes),
        "multipart/related(text/html,image/png,image/png)"
    );
    assert!(
        text(&c)
            .contains("Content-Disposition: inline;\r\n filename*0*=utf-8''b%C3%A9%20%C3%BC.png"),
        "{}",
        text(&c)
    );
}

/// Each mistake in a `content_id` is refused, naming the attachment.
#[test]
fn a_content_id_must_be_well_formed_unique_and_shown() {
    let html = |attachments: Vec<AttachmentInput>| {
        let mut d = draft("a@x.org");
        d.html_body = Some("<img src=\"cid:logo\"> <img src=\"cid:x\">".into());
        d.attachments = attachments;
        d
    };
    let cases = [
        (
            html(vec![image("a.png", Some(""), b"a")]),
            "attachments[0].content_id",
            "invalid_content_id",
        ),
        (
            html(vec![image("a.png", Some("a b"), b"a")]),
            "attachments[0].content_id",
            "invalid_content_id",
        ),
        (
            html(vec![image("a.png", Some("<logo>"), b"a")]),
            "attachments[0].content_id",
            "invalid_content_id",
        ),
        (
            html(vec![image("a.png", Some(&"l".repeat(101)), b"a")]),
            "attachments[0].content_id",
            "invalid_content_id",
        ),
        (
            html(vec![
                image("a.png", Some("logo"), b"a"),
                image("b.png", Some("logo"), b"b"),
            ]),
            "attachments[1].content_id",
            "duplicate_content_id",
        ),
        (
            html(vec![
                image("a.png", Some("logo"), b"a"),
                image("b.png", Some("other"), b"b"),
            ]),
            "attachments[1].content_id",
            "content_id_unreferenced",
        ),
        (
            Draft {
                attachments: vec![image("a.png", Some("logo"), b"a")],
                ..draft("a@x.org")
            },
            "attachments[0].content_id",
            "inline_without_html",
        ),
    ];
    for (d, field, rule) in cases {
        let e = err(&d, &policy());
        assert_eq!((e.field.as_str(), e.rule), (field, rule), "{e}");
    }
    // `cid:logo2` names logo2, not logo.
    let mut d = html(vec![image("a.png", Some("logo"), b"a")]);
    d.html_body = Some("<img src=\"cid:logo2\"> <img src='cid:logo.x'>".into());
    let e = err(&d, &policy());
    assert_eq!(e.rule, "content_id_unreferenced", "{e}");
    d.html_body = Some("<img src=\"cid:logo\"> and cid:logo2 in prose".into());
    ok(&d, &policy());
    // The longest id, and each character allowed.
    let id = format!("a.b_c-d@e{}", "f".repeat(91));
    let mut d = html(vec![image("a.png", Some(&id), b"a")]);
    d.html_body = Some(format!("<img src=\"cid:{id}\">"));
    ok(&d, &policy());
}

/// A `cid:` link of the HTML (an attribute's value, a CSS `url(`) with no
/// attachment of that `content_id` shows a broken image: refused, naming
/// the field the HTML came from. Prose that mentions "cid:" is no link.
#[test]
fn a_cid_link_without_its_attachment_is_refused() {
    let with = |html: &str, ids: &[&str]| {
        let mut d = draft("a@x.org");
        d.html_body = Some(html.into());
        d.attachments = ids
            .iter()
            .map(|id| image(&format!("{id}.png"), Some(id), b"png"))
            .collect();
        d
    };
    for html in [
        "<img src=\"cid:logo\"><img src=\"cid:banner\">",
        "<img src='cid:logo'><img src = CID:banner>",
        "<img src=\"cid:logo\"><td style=\"background: url( 'cid:banner' )\">",
        "<img src=\"cid:logo\"><table background=\"cid:banner\">",
    ] {
        let e = err(&with(html, &["logo"]), &policy());
        assert_eq!(
            (e.field.as_str(), e.rule),
            ("html_body", "unknown_content_id"),
            "{html}: {e}"
        );
        assert!(e.message.contains("cid:banner"), "{e}");
        ok(&with(html, &["logo", "banner"]), &policy());
    }
    // Without any attachment, and with the HTML as the body.
    let mut d = with("<p>Hi</p><img src=\"cid:logo@example.org\">", &[]);
    let e = err(&d, &policy());
    assert_eq!(
        (e.field.as_str(), e.rule),
        ("html_body", "unknown_content_id"),
        "{e}"
    );
    d.html_body = None;
    d.html = true;
    d.body = "<img src=\"cid:logo@example.org\">".into();
    let e = err(&d, &policy());
    assert_eq!(
        (e.field.as_str(), e.rule),
        ("body", "unknown_content_id"),
        "{e}"
    );
    // Prose, an empty link and a percent-encoded id are no link to check.
    ok(
        &with("<p>the cid: scheme, as in cid:logo, names a part</p>", &[]),
        &policy(),
    );
    ok(&with("<img src=\"cid:\">", &[]), &policy());
    ok(&with("<img src=\"cid:a%40b\">", &[]), &policy());
}

/// A template's images go with every message written from it, shown by
/// its HTML, after the call's own attachments; a call's attachment may not
/// take one of their ids.
#[test]
fn a_templates_images_go_with_each_message_written_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("logo.png");
    std::fs::write(&path, b"\x89PNG logo").unwrap();
    let logo = attach::image("logo", &path, 1 << 20).unwrap();
    let t = named::Template {
        name: "receipt".into(),
        description: None,
        subject: "Your receipt".into(),
        body: "Thanks, {name}.".into(),
        html_body: Some("<img src=\"cid:logo\"><p>Thanks, {name}.</p>".into()),
        vars: vec!["name".into()],
        patterns: Vec::new(),
        images: vec![logo],
    };
    let p = ComposePolicy {
        templates: named::Templates(vec![std::sync::Arc::new(t)]),
        ..policy()
    };
    let mut d = draft("ada@example.org");
    d.subject = String::new();
    d.body = String::new();
    d.template = Some("receipt".into());
    d.template_vars = Some(BTreeMap::from([("name".into(), "Ada".into())]));
    d.attachments = vec![image("order.pdf", None, b"%PDF")];
    let c = ok(&d, &p);
    assert_eq!(
        tree(&c.bytes),
        "multipart/mixed(multipart/alternative(text/plain,multipart/related(text/html,image/png)),application/pdf)"
    );
    assert!(text(&c).contains("Content-ID: <logo>"), "{}", text(&c));
    let names: Vec<&str> = c.attachments.iter().map(|a| a.filename.as_str()).collect();
    assert_eq!(names, ["order.pdf", "logo.png"]);
    d.attachments = vec![image("mine.png", Some("logo"), b"x")];
    let e = err(&d, &p);
    assert_eq!(
        (e.field.as_str(), e.rule),
        ("attachments[0].content_id", "duplicate_content_id")
    );
    assert!(e.message.contains("an image of the template"), "{e}");

    // A link of the template's HTML may be to an image the call gives;
    // without it, the template is what shows a broken image.
    let mut t = (*p.templates.0[0]).clone();
    t.html_body = Some("<img src=\"cid:logo\"><img src=\"cid:photo\">{name}".into());
    let p = ComposePolicy {
        templates: named::Templates(vec![std::sync::Arc::new(t)]),
        ..policy()
    };
    d.attachments = vec![image("order.pdf", None, b"%PDF")];
    let e = err(&d, &p);
    assert_eq!(
        (e.field.as_str(), e.rule),
        ("template", "unknown_content_id"),
        "{e}"
    );
    d.attachments = vec![image("ada.jpg", Some("photo"), b"jpg")];
    ok(&d, &p);
}
