//! Content checks (`content_checks` in a policy): patterns that refuse a
//! message, or hold it for a person, by what it says rather than where it
//! goes, as Postfix's `header_checks` and `body_checks` do. They catch what an
//! allowlist cannot: an agent allowed to mail anyone (a support desk) told to
//! send a private key, a token or a customer list.
//!
//! Each check is a regular expression of the `regex` crate, which matches
//! in time linear in the text, so no pattern and no message can make a
//! check slow. The parts looked at, in this order: the subject, the body,
//! the HTML body, the values of the header fields the caller wrote by name
//! (`headers`, the unsubscribe links, the policy's own), the display names
//! the recipients see (From, To, Cc, Reply-To) and the `in_reply_to` and
//! `references` ids, each attachment's file name and its decoded content,
//! and inside an attachment that is an archive (`archive.rs`) the name and
//! content of every file it holds. The first check in the list that
//! matches any part decides; its action is `reject` or `hold`. An archive
//! that cannot be read whole (encrypted, too large once unpacked) is held
//! for a person, as the check [`UNREADABLE_ARCHIVE`] that comes after every
//! configured one. What matched is never repeated: an error, a log line or
//! an audit line names the check and the part, not the text.

use regex::RegexSet;
use regex::bytes::RegexSet as BytesSet;

use crate::compose::Composed;

/// Most checks in one policy.
pub const MAX_CHECKS: usize = 100;
/// Most bytes of one compiled pattern set (the `regex` crate's limit on its
/// automata): a pattern that would need more is refused at load.
const SIZE_LIMIT: usize = 16 << 20;

/// The name of the check an archive the checks cannot read "matches".
pub const UNREADABLE_ARCHIVE: &str = "unreadable archive";

/// [`ContentChecks::scan`]'s mark of an archive it could not read: after
/// every configured check, so that one of them that matches decides.
const UNREADABLE: usize = usize::MAX;

/// The check an archive that cannot be read "matches": it holds the
/// message for a person.
static UNREADABLE_CHECK: std::sync::LazyLock<Check> = std::sync::LazyLock::new(|| Check {
    name: UNREADABLE_ARCHIVE.into(),
    pattern: String::new(),
    action: Action::Hold,
});

/// What a check that matches does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Refused: `policy_denied`, rule `content_rejected`.
    Reject,
    /// Held for a person, whatever `approval` says.
    Hold,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Reject => "reject",
            Action::Hold => "hold",
        }
    }
}

/// One check as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub pattern: String,
    pub action: Action,
}

/// A policy's checks, compiled once: one set for text, one for attachments'
/// bytes, each matching every pattern in one pass.
#[derive(Debug, Clone)]
pub struct ContentChecks {
    checks: Vec<Check>,
    text: RegexSet,
    bytes: BytesSet,
}

impl PartialEq for ContentChecks {
    fn eq(&self, other: &Self) -> bool {
        self.checks == other.checks
    }
}

impl Default for ContentChecks {
    fn default() -> Self {
        ContentChecks::new(Vec::new()).unwrap_or_else(|_| unreachable!("no patterns"))
    }
}

/// The check that decided, and the part it matched first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit<'a> {
    pub check: &'a Check,
    /// `subject`, `body`, `html_body`, `headers.X-Name`,
    /// `attachments[0].filename`, `attachments[0]`.
    pub field: String,
}

impl ContentChecks {
    /// Compiles `checks`; an error names the first pattern that does not
    /// compile, or that matches the empty text (and so every message), by
    /// its index.
    pub fn new(checks: Vec<Check>) -> Result<ContentChecks, (usize, String)> {
        if checks.len() > MAX_CHECKS {
            return Err((MAX_CHECKS, format!("at most {MAX_CHECKS} checks")));
        }
        // Each alone first, so that an error names its pattern.
        for (i, c) in checks.iter().enumerate() {
            let re = regex::RegexBuilder::new(&c.pattern)
                .size_limit(SIZE_LIMIT)
                .build()
                .map_err(|e| (i, format!("is not a regular expression: {e}")))?;
            if re.is_match("") {
                return Err((
                    i,
                    "matches the empty text, so it would match every message".into(),
                ));
            }
        }
        // Together they may pass the size limit that each kept alone.
        let last = checks.len().saturating_sub(1);
        let together = |e: regex::Error| (last, format!("with the checks before it: {e}"));
        let patterns = checks.iter().map(|c| c.pattern.as_str());
        let text = regex::RegexSetBuilder::new(patterns.clone())
            .size_limit(SIZE_LIMIT)
            .build()
            .map_err(together)?;
        let bytes = regex::bytes::RegexSetBuilder::new(patterns)
            .size_limit(SIZE_LIMIT)
            .build()
            .map_err(together)?;
        Ok(ContentChecks {
            checks,
            text,
            bytes,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.checks.is_empty()
    }

    pub fn checks(&self) -> &[Check] {
        &self.checks
    }

    /// The checks that match an attachment's decoded bytes, or the name or
    /// bytes of a file inside it when it is an archive, by index (and
    /// [`UNREADABLE`] for an archive that cannot be read whole): what
    /// `compose` keeps for [`ContentChecks::verdict`].
    pub fn scan(&self, data: &[u8]) -> Vec<usize> {
        let mut found: std::collections::BTreeSet<usize> =
            self.bytes.matches(data).into_iter().collect();
        let inside = super::archive::unpack(data, &mut |name, bytes| {
            if let Some(name) = name {
                found.extend(&self.text.matches(name));
            }
            found.extend(&self.bytes.matches(bytes));
        });
        if inside.is_err() {
            found.insert(UNREADABLE);
        }
        found.into_iter().collect()
    }

    /// The check that decides on `c` (the first in the list that matches
    /// any part), with the first part it matched; `None` when none matches.
    /// `c.scanned` holds what [`ContentChecks::scan`] found in each
    /// attachment.
    pub fn verdict<'a>(&'a self, c: &Composed) -> Option<Hit<'a>> {
        if self.checks.is_empty() {
            return None;
        }
        // The body a caller gave as `body` is `html` when it said html=true.
        let (body, html_body) = match (&c.text, &c.html) {
            (None, html) => (html.as_deref(), None),
            (text, html) => (text.as_deref(), html.as_deref()),
        };
        let mut parts: Vec<(String, Vec<usize>)> = Vec::new();
        // A part's name is written only when something matched in it.
        let mut text = |field: &dyn Fn() -> String, s: &str| {
            let m: Vec<usize> = self.text.matches(s).into_iter().collect();
            if !m.is_empty() {
                parts.push((field(), m));
            }
        };
        text(&|| "subject".into(), &c.subject);
        if let Some(b) = body {
            text(&|| "body".into(), b);
        }
        if let Some(h) = html_body {
            text(&|| "html_body".into(), h);
        }
        for (name, value) in &c.own_fields {
            text(&|| format!("headers.{name}"), value);
        }
        for (field, value) in &c.phrases {
            text(&|| field.clone(), value);
        }
        for (i, a) in c.attachments.iter().enumerate() {
            text(&|| format!("attachments[{i}].filename"), &a.filename);
        }
        for (i, m) in c.scanned.iter().enumerate() {
            if !m.is_empty() {
                parts.push((format!("attachments[{i}]"), m.clone()));
            }
        }
        let first = parts.iter().flat_map(|(_, m)| m).min()?;
        let field = parts.iter().find(|(_, m)| m.contains(first))?.0.clone();
        let check = match *first {
            UNREADABLE => &*UNREADABLE_CHECK,
            i => &self.checks[i],
        };
        Some(Hit { check, field })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compose::{ComposePolicy, Draft, Recipients, compose_scanned};

    fn checks(list: &[(&str, &str, Action)]) -> ContentChecks {
        ContentChecks::new(
            list.iter()
                .map(|(name, pattern, action)| Check {
                    name: (*name).into(),
                    pattern: (*pattern).into(),
                    action: *action,
                })
                .collect(),
        )
        .unwrap()
    }

    fn draft(subject: &str, body: &str) -> Draft {
        Draft {
            to: Recipients::List(vec!["a@example.org".into()]),
            subject: subject.into(),
            body: body.into(),
            from_email: Some("agent@example.org".into()),
            ..Draft::default()
        }
    }

    fn verdict(c: &ContentChecks, d: &Draft) -> Option<(String, String)> {
        let composed = compose_scanned(d, &ComposePolicy::default(), None, &|b| c.scan(b)).unwrap();
        c.verdict(&composed)
            .map(|h| (h.check.name.clone(), h.field))
    }

    /// A file inside a zip or a gzip is looked at as the attachment itself
    /// is (its name as a file name, its bytes as content); an archive that
    /// cannot be read whole holds the message, unless a configured check
    /// that matches decides first.
    #[test]
    fn what_an_archive_holds_is_checked_and_one_that_cannot_be_read_is_held() {
        use super::super::archive::tests::{encrypted, gzip_of, zip_of};
        use base64::Engine as _;
        let c = checks(&[
            ("key", "BEGIN [A-Z ]*PRIVATE KEY", Action::Reject),
            ("list", "customers\\.csv", Action::Hold),
        ]);
        let with = |data: Vec<u8>, body: &str| {
            let mut d = draft("files", body);
            d.attachments = vec![crate::compose::AttachmentInput::Inline {
                filename: "files.bin".into(),
                content_base64: base64::engine::general_purpose::STANDARD.encode(data),
                content_type: None,
                content_id: None,
            }];
            d
        };
        let key: &[u8] = b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n";
        let deflated = zip::CompressionMethod::Deflated;
        let at = |name: &str| Some((name.to_owned(), "attachments[0]".to_owned()));
        for (data, want) in [
            (zip_of(&[("id", key)], deflated), at("key")),
            (gzip_of(&zip_of(&[("id", key)], deflated)), at("key")),
            (zip_of(&[("customers.csv", b"a,b")], deflated), at("list")),
            (zip_of(&[("notes.txt", b"nothing")], deflated), None),
            (
                encrypted(zip_of(&[("id", b"x")], zip::CompressionMethod::Stored)),
                at(UNREADABLE_ARCHIVE),
            ),
        ] {
            assert_eq!(verdict(&c, &with(data, "see attached")), want);
        }
        let locked = encrypted(zip_of(&[("id", b"x")], zip::CompressionMethod::Stored));
        assert_eq!(
            verdict(&c, &with(locked.clone(), "customers.csv")),
            Some(("list".into(), "body".into())),
            "a configured check comes first"
        );
        let c = checks(&[("key", "BEGIN [A-Z ]*PRIVATE KEY", Action::Reject)]);
        let d = with(locked, "see attached");
        let composed =
            compose_scanned(&d, &ComposePolicy::default(), None, &|b| c.scan(b)).unwrap();
        let hit = c.verdict(&composed).unwrap();
        assert_eq!(hit.check.action, Action::Hold);
    }

    #[test]
    fn the_first_check_in_the_list_decides_and_names_its_first_part() {
        let c = checks(&[
            ("key", "BEGIN [A-Z ]*PRIVATE KEY", Action::Reject),
            ("invoice", "(?i)invoice", Action::Hold),
        ]);
        assert_eq!(verdict(&c, &draft("hello", "nothing here")), None);
        assert_eq!(
            verdict(&c, &draft("Invoice 42", "see attached")),
            Some(("invoice".into(), "subject".into()))
        );
        // A later part matching an earlier check wins over the subject.
        assert_eq!(
            verdict(
                &c,
                &draft("Invoice 42", "-----BEGIN RSA PRIVATE KEY-----\nMIIE")
            ),
            Some(("key".into(), "body".into()))
        );
    }

    #[test]
    fn html_headers_and_attachments_are_looked_at() {
        use crate::compose::AttachmentInput;
        use base64::Engine as _;
        let c = checks(&[("token", r"sk_live_[0-9a-zA-Z]{8}", Action::Reject)]);
        let mut d = draft("s", "plain");
        d.html_body = Some("<p>sk_live_abcdefgh</p>".into());
        assert_eq!(verdict(&c, &d), Some(("token".into(), "html_body".into())));
        let mut d = draft("s", "<p>sk_live_abcdefgh</p>");
        d.html = true;
        assert_eq!(verdict(&c, &d), Some(("token".into(), "body".into())));
        let mut d = draft("s", "plain");
        d.headers.insert("X-Ref".into(), "sk_live_abcdefgh".into());
        assert_eq!(
            verdict(&c, &d),
            Some(("token".into(), "headers.X-Ref".into()))
        );
        let attach = |name: &str, data: &[u8]| AttachmentInput::Inline {
            filename: name.into(),
            content_base64: base64::engine::general_purpose::STANDARD.encode(data),
            content_type: None,
            content_id: None,
        };
        let mut d = draft("s", "plain");
        d.attachments = vec![
            attach("a.txt", b"fine"),
            attach("b.bin", b"\x00\xffkey=sk_live_12345678\x00"),
        ];
        assert_eq!(
            verdict(&c, &d),
            Some(("token".into(), "attachments[1]".into()))
        );
        d.attachments = vec![attach("sk_live_abcdefgh.txt", b"fine")];
        assert_eq!(
            verdict(&c, &d),
            Some(("token".into(), "attachments[0].filename".into()))
        );
        // Display names the recipients see, and the thread's ids.
        let named = |f: &dyn Fn(&mut Draft)| {
            let mut d = draft("s", "plain");
            f(&mut d);
            verdict(&c, &d).map(|(_, field)| field)
        };
        assert_eq!(
            named(&|d| d.from_email = Some("\"sk_live_abcdefgh\" <agent@example.org>".into())),
            Some("from_email".into())
        );
        assert_eq!(
            named(&|d| {
                d.to = Recipients::List(vec![
                    "a@example.org".into(),
                    "sk_live_abcdefgh <b@example.org>".into(),
                ])
            }),
            Some("to[1]".into())
        );
        assert_eq!(
            named(&|d| {
                d.cc = Recipients::List(vec!["\"sk_live_abcdefgh\" <c@example.org>".into()])
            }),
            Some("cc[0]".into())
        );
        assert_eq!(
            named(&|d| d.reply_to = Some("\"sk_live_abcdefgh\" <r@example.org>".into())),
            Some("reply_to".into())
        );
        assert_eq!(
            named(&|d| d.references = Some("<sk_live_abcdefgh@example.org>".into())),
            Some("references".into())
        );
        // Bcc's names are never sent.
        assert_eq!(
            named(&|d| {
                d.bcc = Recipients::List(vec!["\"sk_live_abcdefgh\" <h@example.org>".into()])
            }),
            None
        );
    }

    #[test]
    fn a_batchs_shared_attachments_are_scanned_once_for_all_its_messages() {
        use crate::compose::{AttachmentInput, SharedAttachments};
        use base64::Engine as _;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let c = checks(&[("token", r"sk_live_[0-9a-zA-Z]{8}", Action::Reject)]);
        let policy = ComposePolicy::default();
        let shared = SharedAttachments::load(
            &[AttachmentInput::Inline {
                filename: "terms.txt".into(),
                content_base64: base64::engine::general_purpose::STANDARD
                    .encode(b"key: sk_live_12345678"),
                content_type: None,
                content_id: None,
            }],
            &policy,
        )
        .unwrap();
        let scans = AtomicUsize::new(0);
        let scan = |d: &[u8]| {
            scans.fetch_add(1, Ordering::Relaxed);
            c.scan(d)
        };
        for n in 0..3 {
            let d = draft(&format!("message {n}"), "plain");
            let composed = compose_scanned(&d, &policy, Some(&shared), &scan).unwrap();
            let hit = c.verdict(&composed).map(|h| h.field);
            assert_eq!(hit.as_deref(), Some("attachments[0]"), "message {n}");
        }
        assert_eq!(scans.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_bad_pattern_is_named_by_its_index() {
        let list = vec![
            Check {
                name: "ok".into(),
                pattern: "fine".into(),
                action: Action::Hold,
            },
            Check {
                name: "bad".into(),
                pattern: "(unclosed".into(),
                action: Action::Reject,
            },
        ];
        let (i, why) = ContentChecks::new(list).unwrap_err();
        assert_eq!(i, 1);
        assert!(why.contains("unclosed"), "{why}");
    }
}
