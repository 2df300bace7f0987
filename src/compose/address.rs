//! Addresses and header values: splitting recipient lists, parsing mailboxes
//! with lettre, de-duplication, the sender policy and message ids.
//!
//! Every string checked here may end up in a header, so control characters are
//! refused before lettre parses or formats anything.

use std::collections::HashSet;

use lettre::Address;
use lettre::message::Mailbox;

use super::{ComposeError, ComposePolicy, Recipients};

/// One mailbox entry, display name included. RFC 5321 caps a path at 256
/// octets; the rest leaves room for a display name. The bound also keeps
/// lettre's recursive comment parser away from pathological nesting.
const MAX_MAILBOX_INPUT: usize = 512;

/// Rejects characters that could end a header line or confuse a parser:
/// CR, LF and NUL (`header_injection`), and the other ASCII controls except
/// TAB (`control_character`).
pub(crate) fn check_header_value(field: &str, value: &str) -> Result<(), ComposeError> {
    if let Some(c) = value.chars().find(|c| matches!(c, '\r' | '\n' | '\0')) {
        let name = match c {
            '\r' => "a carriage return (CR)",
            '\n' => "a line feed (LF)",
            _ => "a NUL character",
        };
        return Err(ComposeError::new(
            field,
            "header_injection",
            format!("contains {name}; header values must be a single line"),
        ));
    }
    if let Some(c) = value.chars().find(|c| c.is_ascii_control() && *c != '\t') {
        return Err(ComposeError::new(
            field,
            "control_character",
            format!("contains the control character U+{:04X}", c as u32),
        ));
    }
    Ok(())
}

/// Splits a comma-separated list, ignoring commas inside quoted strings
/// (`"Doe, Jane" <jane@x.org>`), angle brackets and comments. Empty entries
/// (`a@x.org,,b@x.org`, a trailing comma) are skipped.
pub(crate) fn split_list(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut in_quotes = false;
    let mut escaped = false;
    let mut angle = 0usize;
    let mut paren = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if in_quotes || paren > 0 => escaped = true,
            '"' if paren == 0 => in_quotes = !in_quotes,
            '<' if !in_quotes && paren == 0 => angle += 1,
            '>' if !in_quotes && paren == 0 => angle = angle.saturating_sub(1),
            '(' if !in_quotes => paren += 1,
            ')' if !in_quotes => paren = paren.saturating_sub(1),
            ',' if !in_quotes && angle == 0 && paren == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect()
}

/// Parses one mailbox (`addr@host` or `Name <addr@host>`) after checking it
/// for header injection.
pub(crate) fn parse_mailbox(field: &str, raw: &str) -> Result<Mailbox, ComposeError> {
    check_header_value(field, raw)?;
    let raw = raw.trim();
    if raw.is_empty() {
        return Err(ComposeError::new(
            field,
            "invalid_address",
            "is empty; expected an address such as ada@example.org",
        ));
    }
    if raw.len() > MAX_MAILBOX_INPUT {
        return Err(ComposeError::new(
            field,
            "invalid_address",
            format!("is longer than {MAX_MAILBOX_INPUT} bytes"),
        ));
    }
    let parsed = match plain_address(raw) {
        Some(address) => address.map(|a| Mailbox::new(None, a)),
        None => raw.parse(),
    };
    let mut mailbox = parsed.map_err(|_| {
        ComposeError::new(
            field,
            "invalid_address",
            "is not a valid address; expected `ada@example.org` or `Ada <ada@example.org>`",
        )
    })?;
    // The parser unquotes the display name; check what lettre will format.
    if let Some(name) = &mailbox.name {
        check_header_value(field, name)?;
        if name.trim().is_empty() {
            mailbox.name = None;
        }
    }
    Ok(mailbox)
}

/// A bare `local@domain` made of dot-atoms (RFC 5322 atext, single dots
/// between runs) with an ASCII host name for a domain: the form almost
/// every address takes. lettre's mailbox parser reads it as an addr-spec
/// with no display name, then validates it with `Address::new`; this
/// validates it the same way without the parser, which costs several
/// thousand instructions an address. `None` for anything else (a display
/// name, quotes, comments, spaces, an IP literal, non-ASCII), which the
/// parser reads.
fn plain_address(raw: &str) -> Option<Result<Address, lettre::address::AddressError>> {
    let (local, domain) = raw.split_once('@')?;
    let atext = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b);
    let host = |b: u8| b.is_ascii_alphanumeric() || b == b'-';
    let dot_atom = |s: &str, allowed: &dyn Fn(u8) -> bool| {
        !s.is_empty()
            && s.split('.')
                .all(|run| !run.is_empty() && run.bytes().all(allowed))
    };
    (dot_atom(local, &atext) && dot_atom(domain, &host)).then(|| Address::new(local, domain))
}

fn entries(recipients: &Recipients) -> Vec<&str> {
    match recipients {
        Recipients::List(list) => list.iter().map(String::as_str).collect(),
        Recipients::Csv(s) => split_list(s),
    }
}

/// The de-duplication key: the local part is case-sensitive (RFC 5321), the
/// domain is not.
fn dedup_key(address: &Address) -> (String, String) {
    (address.user().to_owned(), address.domain().to_lowercase())
}

/// to, cc and bcc, parsed and de-duplicated (first occurrence wins, in the
/// order to, cc, bcc).
#[derive(Debug, Default)]
pub(crate) struct RecipientSet {
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    pub bcc: Vec<Mailbox>,
    /// The field each kept recipient came from (`to`, 0), in envelope order.
    pub fields: Vec<(&'static str, usize)>,
}

impl RecipientSet {
    pub fn envelope(&self) -> Vec<Address> {
        self.to
            .iter()
            .chain(&self.cc)
            .chain(&self.bcc)
            .map(|m| m.email.clone())
            .collect()
    }
}

pub(crate) fn parse_recipients(
    to: &Recipients,
    cc: &Recipients,
    bcc: &Recipients,
    max: usize,
) -> Result<RecipientSet, ComposeError> {
    let mut seen = HashSet::new();
    let mut set = RecipientSet::default();
    let mut fields = Vec::new();
    let lists: [(&str, &Recipients, &mut Vec<Mailbox>); 3] = [
        ("to", to, &mut set.to),
        ("cc", cc, &mut set.cc),
        ("bcc", bcc, &mut set.bcc),
    ];
    for (name, recipients, out) in lists {
        for (i, raw) in entries(recipients).into_iter().enumerate() {
            let field = format!("{name}[{i}]");
            let mailbox = parse_mailbox(&field, raw)?;
            if !seen.insert(dedup_key(&mailbox.email)) {
                continue;
            }
            if seen.len() > max {
                return Err(ComposeError::new(
                    field,
                    "too_many_recipients",
                    format!("more than {max} distinct recipients (to, cc and bcc together)"),
                ));
            }
            out.push(mailbox);
            fields.push((name, i));
        }
    }
    set.fields = fields;
    if seen.is_empty() {
        return Err(ComposeError::new(
            "to",
            "no_recipients",
            "no recipient given in to, cc or bcc",
        ));
    }
    Ok(set)
}

/// Whether `address` matches one `allowed_senders` entry: `@domain` matches
/// any local part, `local@domain` matches exactly; domains are compared
/// case-insensitively.
fn sender_allowed(address: &Address, entry: &str) -> bool {
    let entry = entry.trim();
    let Some((local, domain)) = entry.rsplit_once('@') else {
        return false;
    };
    if address.domain().to_lowercase() != domain.to_lowercase() {
        return false;
    }
    local.is_empty() || local == address.user()
}

/// The sender: `from_email`, else the configured default, checked against
/// the allowed senders.
pub(crate) fn resolve_sender(
    from_email: Option<&str>,
    policy: &ComposePolicy,
) -> Result<Mailbox, ComposeError> {
    let (field, raw) = match (from_email, policy.default_from.as_deref()) {
        (Some(raw), _) => ("from_email", raw),
        (None, Some(raw)) => ("default_from", raw),
        (None, None) => {
            return Err(ComposeError::new(
                "from_email",
                "missing_sender",
                "no from_email given and no default sender configured",
            ));
        }
    };
    let mailbox = parse_mailbox(field, raw)?;
    if !policy.allowed_senders.is_empty()
        && !policy
            .allowed_senders
            .iter()
            .any(|entry| sender_allowed(&mailbox.email, entry))
    {
        return Err(ComposeError::new(
            field,
            "sender_not_allowed",
            format!(
                "{} is not among the allowed senders",
                mailbox.email.as_ref() as &str
            ),
        ));
    }
    Ok(mailbox)
}

/// Validates one message id and returns it in angle brackets. The id must be
/// printable ASCII without spaces or brackets inside and have the form
/// `left@right`.
fn message_id(field: &str, raw: &str) -> Result<String, ComposeError> {
    let inner = raw
        .strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .unwrap_or(raw);
    let printable = inner
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'<' && b != b'>');
    let well_formed = inner
        .rsplit_once('@')
        .is_some_and(|(l, r)| !l.is_empty() && !r.is_empty());
    if !printable || !well_formed || inner.len() > 250 {
        return Err(ComposeError::new(
            field,
            "invalid_message_id",
            "is not a message id; expected `<id@host>` (printable ASCII, no spaces)",
        ));
    }
    Ok(format!("<{inner}>"))
}

/// `In-Reply-To`: one message id.
pub(crate) fn in_reply_to(raw: &str) -> Result<String, ComposeError> {
    check_header_value("in_reply_to", raw)?;
    message_id("in_reply_to", raw.trim())
}

/// `References`: message ids separated by spaces (commas are tolerated).
pub(crate) fn references(raw: &str) -> Result<String, ComposeError> {
    check_header_value("references", raw)?;
    let ids = raw
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|s| !s.is_empty())
        .enumerate()
        .map(|(i, id)| message_id(&format!("references[{i}]"), id))
        .collect::<Result<Vec<_>, _>>()?;
    if ids.is_empty() {
        return Err(ComposeError::new(
            "references",
            "invalid_message_id",
            "is empty; expected one or more `<id@host>`",
        ));
    }
    Ok(ids.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input the plain path takes is read exactly as lettre's parser
    /// reads it: the same address, or an error for both.
    #[test]
    fn the_plain_path_agrees_with_the_parser() {
        let fixed = [
            "ada@example.org",
            "Ada.Lovelace+notes@Sub.Example.CO",
            "a/b=c?d^e`f{g}h|i~j!k#l$m%n&o'p*q@x-y.z",
            "1@2",
            "a@-x.org",
            "a@x-.org",
            "a@localhost",
            "a..b@x.org",
            ".a@x.org",
            "a.@x.org",
            "a@x..org",
            "a@.x.org",
            "a@x.org.",
            "a@[127.0.0.1]",
            "a@b@c",
            "@x.org",
            "a@",
            "Ada <ada@example.org>",
            "\"a b\"@x.org",
            "ada@exämple.org",
            &format!("{}@x.org", "a".repeat(64)),
            &format!("{}@x.org", "a".repeat(65)),
            &format!("a@{}.org", "b".repeat(64)),
        ];
        // Local parts and domains from small alphabets that mix what the
        // plain path takes with what it leaves to the parser (`_`, ` `
        // and `@` in a domain).
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut word = |alphabet: &[u8]| -> String {
            let r = next();
            (0..1 + (r % 9) as usize)
                .map(|k| alphabet[((r >> (8 + k * 5)) % alphabet.len() as u64) as usize] as char)
                .collect()
        };
        let generated: Vec<String> = (0..50_000)
            .map(|_| format!("{}@{}", word(b"aZ9..+=~-"), word(b"aZ9..--_ @")))
            .collect();
        let mut taken = 0;
        for raw in fixed
            .iter()
            .copied()
            .chain(generated.iter().map(String::as_str))
        {
            let Some(plain) = plain_address(raw) else {
                continue;
            };
            taken += 1;
            let parsed = raw.parse::<Mailbox>().ok();
            assert_eq!(plain.ok().map(|a| Mailbox::new(None, a)), parsed, "{raw:?}");
        }
        assert!(taken > 2_000, "the plain path took only {taken} inputs");
        assert!(plain_address("Ada <ada@example.org>").is_none());
        assert!(plain_address("a..b@x.org").is_none());
        assert!(plain_address("a@[127.0.0.1]").is_none());
        assert!(matches!(plain_address("ada@example.org"), Some(Ok(_))));
    }

    #[test]
    fn split_respects_quotes_angles_and_comments() {
        assert_eq!(
            split_list(r#""Doe, Jane" <jane@x.org>, bob@x.org"#),
            [r#""Doe, Jane" <jane@x.org>"#, "bob@x.org"]
        );
        assert_eq!(
            split_list(r#""a \" , b" <a@x.org>,c@x.org"#),
            [r#""a \" , b" <a@x.org>"#, "c@x.org"]
        );
        assert_eq!(
            split_list("a@x.org (x, y), b@x.org"),
            ["a@x.org (x, y)", "b@x.org"]
        );
        assert_eq!(split_list(" , a@x.org,, "), ["a@x.org"]);
        assert!(split_list("").is_empty());
    }

    #[test]
    fn mailbox_with_quoted_comma_name() {
        let m = parse_mailbox("to[0]", r#""Doe, Jane" <jane@x.org>"#).expect("valid");
        assert_eq!(m.name.as_deref(), Some("Doe, Jane"));
        assert_eq!(m.email.as_ref() as &str, "jane@x.org");
    }

    #[test]
    fn sender_patterns() {
        let a: Address = "Ops@Example.ORG".parse().expect("valid");
        assert!(sender_allowed(&a, "@example.org"));
        assert!(sender_allowed(&a, "Ops@example.org"));
        assert!(
            !sender_allowed(&a, "ops@example.org"),
            "local part is exact"
        );
        assert!(!sender_allowed(&a, "@other.org"));
        assert!(!sender_allowed(&a, "example.org"));
    }

    #[test]
    fn message_ids() {
        assert_eq!(in_reply_to("abc@host").expect("ok"), "<abc@host>");
        assert_eq!(in_reply_to(" <abc@host> ").expect("ok"), "<abc@host>");
        assert_eq!(
            references("<a@h> b@h, c@h").expect("ok"),
            "<a@h> <b@h> <c@h>"
        );
        assert_eq!(in_reply_to("no-at").unwrap_err().rule, "invalid_message_id");
        assert_eq!(in_reply_to("a b@h").unwrap_err().rule, "invalid_message_id");
        assert_eq!(references("<a@h> <b>").unwrap_err().field, "references[1]");
    }
}
