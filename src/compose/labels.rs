//! The caller's labels of a message: its `tag` (one name for what it
//! belongs to, such as a campaign or a ticket, which `list_messages`,
//! `mailmux queue list` and the console filter by) and its `metadata` (a
//! few names and values of the caller's own, such as a customer id, which
//! the message's status and the notification webhook repeat).
//!
//! Neither goes into the message: they are the sender's bookkeeping, not
//! the recipients' business, and they never reach a header. Both are
//! shown wherever the message's status is, so the rules keep them short
//! and on one line.

use std::collections::BTreeMap;

use super::ComposeError;

/// The longest tag, in characters.
pub const MAX_TAG: usize = 100;
/// Names in `metadata` at most.
pub const MAX_METADATA: usize = 20;
/// The longest name in `metadata`, in characters.
pub const MAX_NAME: usize = 40;
/// The longest value in `metadata`, in characters.
pub const MAX_VALUE: usize = 500;

/// One metadata name and value written `NAME=VALUE`, as a search for it
/// takes them (`mailmux queue list --metadata`, the console's queue page),
/// checked as a send's `metadata` is; else why not.
pub(crate) fn pair(s: &str) -> Result<(String, String), String> {
    let Some((name, value)) = s.split_once('=') else {
        return Err("expected NAME=VALUE".into());
    };
    let pair = (name.to_owned(), value.to_owned());
    check(None, &BTreeMap::from([pair.clone()])).map_err(|e| e.message)?;
    Ok(pair)
}

/// Pairs given one at a time (repeated flags, the lines of a form) as a
/// map; a name given twice is refused, not read as its last value.
pub(crate) fn by_name(
    pairs: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, String> {
    let mut map = BTreeMap::new();
    for (name, value) in pairs {
        if map.contains_key(&name) {
            return Err(format!("{name} is given twice"));
        }
        map.insert(name, value);
    }
    Ok(map)
}

/// Checks `tag` and `metadata`.
pub(crate) fn check(
    tag: Option<&str>,
    metadata: &BTreeMap<String, String>,
) -> Result<(), ComposeError> {
    if let Some(tag) = tag {
        let why = if tag.is_empty() {
            Some("empty".to_owned())
        } else if tag.chars().count() > MAX_TAG {
            Some(format!("longer than {MAX_TAG} characters"))
        } else if tag.chars().any(char::is_control) {
            Some("holds a control character (a tag is one line)".to_owned())
        } else if tag.trim() != tag {
            Some("begins or ends with a space".to_owned())
        } else {
            None
        };
        if let Some(why) = why {
            return Err(ComposeError::new(
                "tag",
                "invalid_tag",
                format!("{why}: give 1 to {MAX_TAG} printable characters"),
            ));
        }
    }
    if metadata.len() > MAX_METADATA {
        return Err(ComposeError::new(
            "metadata",
            "invalid_metadata",
            format!(
                "has {} names; at most {MAX_METADATA} are kept",
                metadata.len()
            ),
        ));
    }
    for (name, value) in metadata {
        let good_name = !name.is_empty()
            && name.chars().count() <= MAX_NAME
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !good_name {
            let shown: String = name
                .chars()
                .take(MAX_NAME)
                .map(|c| if c.is_control() { '?' } else { c })
                .collect();
            return Err(ComposeError::new(
                format!("metadata.{shown}"),
                "invalid_metadata",
                format!("a name must be 1 to {MAX_NAME} of letters, digits, `_`, `-` and `.`"),
            ));
        }
        let why = if value.chars().count() > MAX_VALUE {
            Some(format!("the value is longer than {MAX_VALUE} characters"))
        } else if value.chars().any(char::is_control) {
            Some("the value holds a control character (it is one line)".to_owned())
        } else {
            None
        };
        if let Some(why) = why {
            return Err(ComposeError::new(
                format!("metadata.{name}"),
                "invalid_metadata",
                why,
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn refused(tag: Option<&str>, m: &BTreeMap<String, String>) -> (String, &'static str) {
        let e = check(tag, m).unwrap_err();
        (e.field, e.rule)
    }

    #[test]
    fn a_tag_is_one_short_line() {
        let none = BTreeMap::new();
        assert!(check(Some("spring-sale 2027/ünï"), &none).is_ok());
        assert!(check(Some(&"x".repeat(MAX_TAG)), &none).is_ok());
        for bad in ["", " lead", "trail ", "two\nlines", "tab\there"] {
            assert_eq!(
                refused(Some(bad), &none),
                ("tag".into(), "invalid_tag"),
                "{bad:?}"
            );
        }
        let long = "é".repeat(MAX_TAG + 1);
        assert_eq!(refused(Some(&long), &none), ("tag".into(), "invalid_tag"));
    }

    #[test]
    fn metadata_names_are_plain_and_values_one_line() {
        assert!(check(None, &meta(&[("customer_id", "c-42"), ("a.b-c", "")])).is_ok());
        assert_eq!(
            refused(None, &meta(&[("has space", "v")])),
            ("metadata.has space".into(), "invalid_metadata")
        );
        assert_eq!(
            refused(None, &meta(&[("", "v")])),
            ("metadata.".into(), "invalid_metadata")
        );
        assert_eq!(
            refused(None, &meta(&[("k", "line\r\nBcc: x@y")])),
            ("metadata.k".into(), "invalid_metadata")
        );
        let long = "v".repeat(MAX_VALUE + 1);
        assert_eq!(
            refused(None, &meta(&[("k", &long)])),
            ("metadata.k".into(), "invalid_metadata")
        );
        let many: BTreeMap<String, String> = (0..=MAX_METADATA)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        assert_eq!(
            refused(None, &many),
            ("metadata".into(), "invalid_metadata")
        );
    }
}
