//! The `List-Unsubscribe` field (RFC 2369) and its one-click form,
//! `List-Unsubscribe-Post` (RFC 8058), which mailbox providers ask of mail
//! sent in bulk.
//!
//! Each link is an `https:` or `mailto:` URI of the characters RFC 3986
//! allows unencoded, checked after template substitution, so that a value
//! substituted into it cannot add a field, a second link or a line.
//! One-click needs an `https:` link: the provider POSTs to it.

use lettre::message::header::{HeaderName, HeaderValue};

use super::ComposeError;
use super::address::check_header_value;

/// Links in one field at most.
const MAX_LINKS: usize = 4;
/// The longest link: with `List-Unsubscribe: <` it still fits a 998-byte
/// line, since a link cannot be folded.
const MAX_LINK: usize = 900;
/// The field's name; its line is folded counting from after `: `.
pub(super) const FIELD: &str = "List-Unsubscribe";
/// The one-click field's name (RFC 8058).
pub(super) const POST_FIELD: &str = "List-Unsubscribe-Post";

/// The fields for `links` (rendered) and `one_click`; none for no links.
pub(super) fn fields(links: &[String], one_click: bool) -> Result<Vec<HeaderValue>, ComposeError> {
    if links.len() > MAX_LINKS {
        return Err(ComposeError::new(
            "list_unsubscribe",
            "too_many_links",
            format!("has {} links; at most {MAX_LINKS}", links.len()),
        ));
    }
    let mut https = false;
    for (i, link) in links.iter().enumerate() {
        https |= check(&format!("list_unsubscribe[{i}]"), link)? == Scheme::Https;
    }
    if one_click && !https {
        return Err(ComposeError::new(
            "list_unsubscribe_post",
            "one_click_needs_https",
            "one-click unsubscribe (RFC 8058) needs an https: link in list_unsubscribe, \
             which the mailbox provider POSTs to",
        ));
    }
    // Folded between links; the one-click value has no space to fold at.
    let out = shown(links, one_click)
        .into_iter()
        .map(|(name, raw)| {
            let folded = super::header::fold(name.len() + 2, &raw);
            HeaderValue::dangerous_new_pre_encoded(
                HeaderName::new_from_ascii_str(name),
                raw,
                folded,
            )
        })
        .collect();
    Ok(out)
}

/// The fields' names and unfolded values for `links` (checked by
/// [`fields`]) and `one_click`: what is written, and what the approval
/// prompt shows.
pub(super) fn shown(links: &[String], one_click: bool) -> Vec<(&'static str, String)> {
    if links.is_empty() {
        return Vec::new();
    }
    let listed: Vec<String> = links.iter().map(|l| format!("<{l}>")).collect();
    let mut out = vec![(FIELD, listed.join(", "))];
    if one_click {
        out.push((POST_FIELD, "List-Unsubscribe=One-Click".to_owned()));
    }
    out
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Scheme {
    Https,
    Mailto,
}

/// One link, named `field` in errors.
pub(super) fn check(field: &str, link: &str) -> Result<Scheme, ComposeError> {
    check_header_value(field, link)?;
    let invalid = |why: &str| Err(ComposeError::new(field, "invalid_uri", why.to_owned()));
    if link.len() > MAX_LINK {
        return Err(ComposeError::new(
            field,
            "too_long",
            format!("is longer than {MAX_LINK} bytes"),
        ));
    }
    if let Some(b) = link
        .bytes()
        .find(|b| !b.is_ascii_graphic() || b"<>\"\\{}|^`".contains(b))
    {
        let what = match b {
            b' ' => "a space".to_owned(),
            b if b.is_ascii() => format!("`{}`", b as char),
            _ => "a character outside ASCII".to_owned(),
        };
        return invalid(&format!(
            "contains {what}; a link is visible ASCII without spaces or any of <>\"\\{{}}|^` \
             (RFC 3986: percent-encode the rest)"
        ));
    }
    let lower = link.to_ascii_lowercase();
    if let Some(rest) = lower.strip_prefix("https://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host = authority.rsplit('@').next().unwrap_or("");
        if host.is_empty() {
            return invalid("is an https: link without a host (https://host/…)");
        }
        Ok(Scheme::Https)
    } else if let Some(rest) = link
        .get("mailto:".len()..)
        .filter(|_| lower.starts_with("mailto:"))
    {
        let address = rest.split('?').next().unwrap_or("");
        if address.parse::<lettre::Address>().is_err() {
            return invalid("is a mailto: link without one valid address (mailto:a@example.org)");
        }
        Ok(Scheme::Mailto)
    } else {
        Err(ComposeError::new(
            field,
            "unsupported_uri_scheme",
            "must be an https: or a mailto: link",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    /// The fields as they are written into the message.
    fn written(fields: Vec<HeaderValue>) -> String {
        let mut headers = lettre::message::header::Headers::new();
        for f in fields {
            headers.insert_raw(f);
        }
        headers.to_string()
    }

    fn rule(l: &[&str], one_click: bool) -> (String, &'static str) {
        let e = fields(&links(l), one_click).expect_err("refused");
        (e.field, e.rule)
    }

    #[test]
    fn links_are_written_in_angle_brackets_and_one_click_beside_them() {
        let f = fields(
            &links(&[
                "https://example.org/u?t=1",
                "mailto:unsub@example.org?subject=x",
            ]),
            true,
        )
        .expect("valid");
        assert_eq!(
            written(f),
            "List-Unsubscribe: <https://example.org/u?t=1>,\r\n \
             <mailto:unsub@example.org?subject=x>\r\n\
             List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        );
        assert!(fields(&[], false).expect("none").is_empty());
        let f = fields(&links(&["mailto:u@example.org"]), false).expect("valid");
        assert_eq!(written(f), "List-Unsubscribe: <mailto:u@example.org>\r\n");
    }

    #[test]
    fn a_long_field_folds_between_its_links() {
        let long = format!("https://example.org/{}", "a".repeat(70));
        let f = fields(&links(&[&long, "mailto:u@example.org"]), false).expect("valid");
        assert_eq!(
            written(f),
            format!("List-Unsubscribe: <{long}>,\r\n <mailto:u@example.org>\r\n")
        );
    }

    #[test]
    fn bad_links_are_refused_with_their_index_and_rule() {
        let cases: &[(&[&str], bool, &str, &str)] = &[
            (
                &["https://x.org/\r\nBcc: e@x.org"],
                false,
                "list_unsubscribe[0]",
                "header_injection",
            ),
            (
                &["mailto:a@x.org", "https://x.org/a b"],
                false,
                "list_unsubscribe[1]",
                "invalid_uri",
            ),
            (
                &["https://x.org/>, <https://evil.net"],
                false,
                "list_unsubscribe[0]",
                "invalid_uri",
            ),
            (
                &["https://x.org/é"],
                false,
                "list_unsubscribe[0]",
                "invalid_uri",
            ),
            (
                &["https://x.org/u?r={rid}"],
                false,
                "list_unsubscribe[0]",
                "invalid_uri",
            ),
            (
                &["http://x.org/u"],
                false,
                "list_unsubscribe[0]",
                "unsupported_uri_scheme",
            ),
            (
                &["javascript:alert(1)"],
                false,
                "list_unsubscribe[0]",
                "unsupported_uri_scheme",
            ),
            (
                &[""],
                false,
                "list_unsubscribe[0]",
                "unsupported_uri_scheme",
            ),
            (
                &["https:///path"],
                false,
                "list_unsubscribe[0]",
                "invalid_uri",
            ),
            (
                &["https://user@"],
                false,
                "list_unsubscribe[0]",
                "invalid_uri",
            ),
            (&["mailto:"], false, "list_unsubscribe[0]", "invalid_uri"),
            (
                &["mailto:not-an-address?subject=x"],
                false,
                "list_unsubscribe[0]",
                "invalid_uri",
            ),
            (
                &["mailto:u@x.org"],
                true,
                "list_unsubscribe_post",
                "one_click_needs_https",
            ),
            (&[], true, "list_unsubscribe_post", "one_click_needs_https"),
            (
                &["mailto:a@x.org"; 5],
                false,
                "list_unsubscribe",
                "too_many_links",
            ),
        ];
        for (l, one_click, field, want) in cases {
            assert_eq!(rule(l, *one_click), (field.to_string(), *want), "{l:?}");
        }
        let long = format!("https://x.org/{}", "a".repeat(MAX_LINK));
        assert_eq!(
            rule(&[&long], false),
            ("list_unsubscribe[0]".into(), "too_long")
        );
    }

    #[test]
    fn schemes_match_in_any_case() {
        fields(&links(&["HTTPS://X.org/u", "MailTo:u@x.org"]), true).expect("valid");
        fields(&links(&["https://user@x.org/u"]), true).expect("userinfo and a host");
    }
}
