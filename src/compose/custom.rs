//! The header fields a caller adds by name (`headers`): its own `X-` fields
//! (a ticket number, a campaign, a tenant) and a short list of standard
//! fields that no other parameter writes, such as `Auto-Submitted` (RFC
//! 3834), which tells autoresponders not to answer.
//!
//! Every other name is refused: the fields mailmux writes itself (From, To,
//! Date, Message-ID, the MIME fields), the ones a parameter of its own
//! writes (Subject, Reply-To, List-Unsubscribe), and the ones of trace,
//! signing and resending, which a sender must not forge. Values are checked
//! after template substitution, like the subject, so a substituted value
//! cannot add a line or a field.

use std::collections::{BTreeMap, BTreeSet};

use lettre::message::header::{HeaderName, HeaderValue};

use super::ComposeError;
use super::address::check_header_value;
use super::header;

/// Fields in one message at most.
pub(crate) const MAX_FIELDS: usize = 20;
/// The longest name: with `: ` and one character of value it still fits a
/// 78-character line.
const MAX_NAME: usize = 76;
/// The longest value, as for the subject.
const MAX_VALUE: usize = 900;

/// The standard fields a caller may set, as they are written. Each takes
/// printable ASCII only: their syntax has no encoded words.
const STANDARD: &[&str] = &[
    "Auto-Submitted",
    "Precedence",
    "List-ID",
    "Feedback-ID",
    "Keywords",
    "Comments",
    "Organization",
    "Importance",
];

/// Fields that a parameter of `send_email` writes: the name, and that
/// parameter.
const OWN_PARAMETER: &[(&str, &str)] = &[
    ("From", "from_email"),
    ("To", "to"),
    ("Cc", "cc"),
    ("Bcc", "bcc"),
    ("Subject", "subject"),
    ("Reply-To", "reply_to"),
    ("In-Reply-To", "in_reply_to"),
    ("References", "references"),
    ("List-Unsubscribe", "list_unsubscribe"),
    ("List-Unsubscribe-Post", "list_unsubscribe_post"),
];

/// The fields for `fields` (names as given, values rendered), in the order
/// of their names; a field whose value is empty, or whitespace alone, is
/// left out, so that a mail merge can leave one out for some recipients.
pub(super) fn fields(fields: &BTreeMap<String, String>) -> Result<Vec<HeaderValue>, ComposeError> {
    if fields.len() > MAX_FIELDS {
        return Err(ComposeError::new(
            "headers",
            "too_many_headers",
            format!("has {} fields; at most {MAX_FIELDS}", fields.len()),
        ));
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(fields.len());
    for (name, value) in fields {
        let standard = allowed(name)?;
        let field = path(name);
        if !seen.insert(name.to_ascii_lowercase()) {
            return Err(ComposeError::new(
                &field,
                "duplicate_header",
                "names the same field as another name that differs only in case",
            ));
        }
        check_header_value(&field, value)?;
        if value.len() > MAX_VALUE {
            return Err(ComposeError::new(
                &field,
                "too_long",
                format!("is longer than {MAX_VALUE} bytes"),
            ));
        }
        if standard
            && !value
                .bytes()
                .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
        {
            return Err(ComposeError::new(
                &field,
                "invalid_header_value",
                format!("{name} takes printable ASCII only"),
            ));
        }
        if left_out(value) {
            continue;
        }
        let written = match standard {
            true => header::fold(name.len() + 2, value.trim()),
            false => header::unstructured(name, value),
        };
        let name = HeaderName::new_from_ascii(name.clone())
            .map_err(|_| bad_name("is not a valid field name"))?;
        out.push(HeaderValue::dangerous_new_pre_encoded(
            name,
            value.clone(),
            written,
        ));
    }
    Ok(out)
}

/// Whether a field with this value is left out: an empty one, or
/// whitespace alone.
pub(super) fn left_out(value: &str) -> bool {
    value.trim().is_empty()
}

/// Whether `name` is a field name: 1 to [`MAX_NAME`] printable ASCII
/// characters, no space or `:` (RFC 5322 `ftext`).
fn valid(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| (b'!'..=b'~').contains(&b) && b != b':')
}

/// The path of the field `name` in errors: `headers.NAME`, or `headers` for
/// a name that is not a field name, so that no error repeats one.
pub(super) fn path(name: &str) -> String {
    match valid(name) {
        true => format!("headers.{name}"),
        false => "headers".to_owned(),
    }
}

/// Whether a caller may set a field of this name.
pub(super) fn settable(name: &str) -> bool {
    allowed(name).is_ok()
}

/// Whether `name` may be set: an `X-` field (false) or one of [`STANDARD`]
/// (true); refused otherwise. An invalid name is reported on `headers`.
fn allowed(name: &str) -> Result<bool, ComposeError> {
    if !valid(name) {
        return Err(bad_name(&format!(
            "a field name is 1 to {MAX_NAME} printable ASCII characters, with no space or `:`"
        )));
    }
    if name.len() > 2 && name[..2].eq_ignore_ascii_case("x-") {
        return Ok(false);
    }
    if STANDARD.iter().any(|s| s.eq_ignore_ascii_case(name)) {
        return Ok(true);
    }
    let field = path(name);
    let why = match OWN_PARAMETER
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
    {
        Some((n, p)) => format!("{n} is written from the `{p}` parameter; set it there"),
        None => format!(
            "a caller may add fields named X-… and {}; mailmux writes the others itself or \
             lets no sender set them",
            STANDARD.join(", ")
        ),
    };
    Err(ComposeError::new(&field, "header_not_allowed", why))
}

fn bad_name(why: &str) -> ComposeError {
    ComposeError::new("headers", "invalid_header_name", why.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The head of a message with the fields of `pairs`, unfolded lines
    /// kept as written.
    fn written(pairs: &[(&str, &str)]) -> String {
        let mut builder = lettre::Message::builder()
            .from("a@example.org".parse().unwrap())
            .to("b@example.org".parse().unwrap());
        for v in fields(&map(pairs)).expect("allowed") {
            builder = builder.raw_header(v);
        }
        let bytes = builder.body(String::new()).unwrap().formatted();
        let text = String::from_utf8(bytes).unwrap();
        text[..text.find("\r\n\r\n").unwrap() + 2].to_owned()
    }

    /// The field `name` of `head`, continuation lines included.
    fn field<'a>(head: &'a str, name: &str) -> Option<&'a str> {
        let start = head.find(&format!("\r\n{name}: ")).map(|at| at + 2)?;
        let mut end = start + head[start..].find("\r\n").unwrap();
        while head[end + 2..].starts_with([' ', '\t']) {
            end += 2 + head[end + 2..].find("\r\n").unwrap();
        }
        Some(&head[start..end])
    }

    #[test]
    fn x_fields_and_the_standard_ones_are_written() {
        let head = written(&[
            ("X-Ticket", "T-1234"),
            ("Auto-Submitted", "auto-generated"),
            ("X-Team", "Café crème"),
            ("x-empty", "  "),
        ]);
        assert_eq!(field(&head, "X-Ticket"), Some("X-Ticket: T-1234"));
        assert_eq!(
            field(&head, "Auto-Submitted"),
            Some("Auto-Submitted: auto-generated")
        );
        // Non-ASCII goes into encoded words; the empty field is left out.
        let team = field(&head, "X-Team").unwrap();
        assert!(team.starts_with("X-Team: =?utf-8?b?"), "{team}");
        assert!(!head.to_ascii_lowercase().contains("x-empty"), "{head}");
        // In the order of the names.
        let at = |n: &str| head.find(&format!("{n}: ")).unwrap();
        assert!(at("Auto-Submitted") < at("X-Team") && at("X-Team") < at("X-Ticket"));
    }

    #[test]
    fn a_long_value_is_folded_before_whitespace() {
        let value = "word ".repeat(60);
        let head = written(&[("X-Long", value.trim_end())]);
        let line = field(&head, "X-Long").unwrap();
        assert!(line.contains("\r\n "), "{line}");
        assert!(line.split("\r\n").all(|l| l.len() <= 78), "{line}");
        assert_eq!(
            line.replace("\r\n", ""),
            format!("X-Long: {}", value.trim_end())
        );
    }

    #[test]
    fn names_and_values_are_refused_with_their_field_and_rule() {
        let long = "v".repeat(MAX_VALUE + 1);
        let many: Vec<(String, String)> = (0..=MAX_FIELDS)
            .map(|i| (format!("X-F{i}"), "v".into()))
            .collect();
        let many: BTreeMap<_, _> = many.into_iter().collect();
        assert_eq!(fields(&many).unwrap_err().rule, "too_many_headers");
        for (pairs, field, rule) in [
            (
                vec![("Subject", "x")],
                "headers.Subject",
                "header_not_allowed",
            ),
            (
                vec![("bcc", "x@evil.example")],
                "headers.bcc",
                "header_not_allowed",
            ),
            (
                vec![("Received", "x")],
                "headers.Received",
                "header_not_allowed",
            ),
            (
                vec![("DKIM-Signature", "x")],
                "headers.DKIM-Signature",
                "header_not_allowed",
            ),
            (
                vec![("Content-Type", "text/html")],
                "headers.Content-Type",
                "header_not_allowed",
            ),
            (vec![("X-", "x")], "headers.X-", "header_not_allowed"),
            (vec![("X-A B", "x")], "headers", "invalid_header_name"),
            (vec![("X-A:", "x")], "headers", "invalid_header_name"),
            (vec![("X-Ä", "x")], "headers", "invalid_header_name"),
            (vec![("", "x")], "headers", "invalid_header_name"),
            (
                vec![("X-A", "x\r\nBcc: e@evil.example")],
                "headers.X-A",
                "header_injection",
            ),
            (vec![("X-A", "x\u{1b}")], "headers.X-A", "control_character"),
            (vec![("X-A", long.as_str())], "headers.X-A", "too_long"),
            (
                vec![("Auto-Submitted", "é")],
                "headers.Auto-Submitted",
                "invalid_header_value",
            ),
            (
                vec![("X-A", "1"), ("x-a", "2")],
                "headers.x-a",
                "duplicate_header",
            ),
        ] {
            let e = fields(&map(&pairs)).expect_err(field);
            assert_eq!(
                (e.field.as_str(), e.rule),
                (field, rule),
                "{pairs:?}: {}",
                e.message
            );
        }
        let long_name = format!("X-{}", "n".repeat(MAX_NAME));
        assert_eq!(
            fields(&map(&[(long_name.as_str(), "v")])).unwrap_err().rule,
            "invalid_header_name"
        );
    }

    #[test]
    fn a_field_of_its_own_parameter_says_which() {
        let e = fields(&map(&[("reply-to", "a@example.org")])).unwrap_err();
        assert!(e.message.contains("`reply_to`"), "{}", e.message);
    }
}
