//! The header fields whose text a caller writes, encoded so that a reader
//! decodes exactly that text: the subject (unstructured text, RFC 5322
//! 3.2.5) and the display names of From, To, Cc and Reply-To (phrases).
//!
//! lettre's own encoder differs from what readers decode in three ways, each
//! seen through Python's email parser: ASCII that looks like an encoded word
//! (`=?utf-8?q?x?=`) is left as it is, so a reader decodes it; the spaces
//! between two of its encoded words are left outside them, where RFC 2047
//! (6.2) tells a reader to drop them; and a display name is split into
//! encoded words wherever the line is full, even inside a word.
//!
//! Here a value is written as it is only when a reader cannot take any of it
//! for an encoded word and keeps all of its whitespace; otherwise the whole
//! value, spaces included, goes into encoded words that each end on a
//! character boundary. Folding only ever happens before whitespace that is
//! already there, or between encoded words.
//!
//! An attachment's file name has the same trouble in lettre's quoted form: a
//! reader decodes `=?…?=` in it. Such a name goes in RFC 2231's
//! percent-encoded form instead, which readers take literally.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use lettre::message::Mailbox;
use lettre::message::header::{Header, HeaderName, HeaderValue};

/// The length a line should stay within (RFC 5322 2.1.1).
const LINE: usize = 78;

/// The most text one encoded word holds: 39 bytes are 52 base64 characters,
/// and with `=?utf-8?b?` and `?=` a word is 64, within RFC 2047's 75 and on
/// one line after any of the field names here.
const WORD_BYTES: usize = 39;

/// The longest ASCII display name written as a quoted string; a longer one
/// goes into encoded words, which can be folded.
const QUOTED_MAX: usize = 900;

/// The From, Reply-To, To, Cc and Subject fields, in that order, for
/// lettre's builder in place of its own. Each keeps lettre's plain form as
/// its raw value, which lettre parses back (it checks From).
pub(super) fn fields(
    subject: &str,
    from: &Mailbox,
    reply_to: Option<&Mailbox>,
    to: &[Mailbox],
    cc: &[Mailbox],
) -> Vec<HeaderValue> {
    let mut out = Vec::with_capacity(5);
    out.push(mailbox_field("From", std::slice::from_ref(from)));
    if let Some(r) = reply_to {
        out.push(mailbox_field("Reply-To", std::slice::from_ref(r)));
    }
    if !to.is_empty() {
        out.push(mailbox_field("To", to));
    }
    if !cc.is_empty() {
        out.push(mailbox_field("Cc", cc));
    }
    out.push(HeaderValue::dangerous_new_pre_encoded(
        HeaderName::new_from_ascii_str("Subject"),
        subject.to_owned(),
        unstructured("Subject", subject),
    ));
    out
}

fn mailbox_field(name: &'static str, list: &[Mailbox]) -> HeaderValue {
    let raw = list
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    HeaderValue::dangerous_new_pre_encoded(
        HeaderName::new_from_ascii_str(name),
        raw,
        mailboxes(name, list),
    )
}

/// Whether lettre's `Content-Disposition` (a quoted string for printable
/// ASCII) carries `filename` as it is.
pub(super) fn plain_filename(filename: &str) -> bool {
    !filename.contains("=?")
}

/// Characters RFC 2231 lets a parameter value carry without `%` (its
/// `attribute-char`).
fn attribute_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b)
}

/// The most a continuation of the file name holds, so that each line stays
/// within [`LINE`].
const SEGMENT: usize = 54;

/// `Content-Disposition: attachment` (or `inline`) with the file name in
/// RFC 2231's percent-encoded UTF-8, split into continuations
/// (`filename*0*`, `filename*1*`, …) that never cut a `%XX`.
#[derive(Debug, Clone)]
pub(super) struct Disposition(HeaderValue);

impl Disposition {
    /// `inline` for a part the HTML body shows, else `attachment`.
    pub(super) fn new(inline: bool, filename: &str) -> Self {
        let kind = if inline { "inline" } else { "attachment" };
        let mut segments = vec![String::new()];
        let mut utf8 = [0; 4];
        // A character is never split between two continuations: readers
        // decode each on its own.
        for c in filename.chars() {
            let unit: String = c
                .encode_utf8(&mut utf8)
                .bytes()
                .map(|b| {
                    if attribute_char(b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            let last = segments.last_mut().expect("one segment at least");
            if last.len() + unit.len() > SEGMENT {
                segments.push(unit);
            } else {
                last.push_str(&unit);
            }
        }
        let mut encoded = format!("{kind};");
        if segments.len() == 1 {
            encoded.push_str("\r\n filename*=utf-8''");
            encoded.push_str(&segments[0]);
        } else {
            for (i, segment) in segments.iter().enumerate() {
                if i > 0 {
                    encoded.push(';');
                }
                let charset = if i == 0 { "utf-8''" } else { "" };
                encoded.push_str(&format!("\r\n filename*{i}*={charset}{segment}"));
            }
        }
        Disposition(HeaderValue::dangerous_new_pre_encoded(
            Self::name(),
            format!("{kind}; filename=\"{filename}\""),
            encoded,
        ))
    }
}

impl Header for Disposition {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("Content-Disposition")
    }

    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Disposition(HeaderValue::dangerous_new_pre_encoded(
            Self::name(),
            s.to_owned(),
            s.to_owned(),
        )))
    }

    fn display(&self) -> HeaderValue {
        self.0.clone()
    }
}

/// Printable ASCII or a tab, with nothing a reader takes for the start of an
/// encoded word and no whitespace at either end (readers drop it).
fn plain(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
        && !value.contains("=?")
        && !value.starts_with([' ', '\t'])
        && !value.ends_with([' ', '\t'])
}

/// An unstructured field's value after `name: `.
pub(super) fn unstructured(name: &str, value: &str) -> String {
    if plain(value) {
        fold(name.len() + 2, value)
    } else {
        encoded_words(value, false)
    }
}

/// `value`, folded before whitespace where a line would pass [`LINE`]. Only
/// the last whitespace of a run is folded before, so that no line is
/// whitespace alone.
pub(super) fn fold(start: usize, value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = String::with_capacity(value.len() + 8);
    let mut column = start;
    let mut from = 0;
    let is_wsp = |b: u8| b == b' ' || b == b'\t';
    for i in 1..bytes.len() {
        let folds_here =
            is_wsp(bytes[i]) && !is_wsp(bytes[i + 1..].first().copied().unwrap_or(b' '));
        if !folds_here {
            continue;
        }
        // The piece up to this whitespace.
        let piece = &value[from..i];
        if column + piece.len() > LINE && column > 1 && from > 0 {
            out.push_str("\r\n");
            column = 0;
        }
        out.push_str(piece);
        column += piece.len();
        from = i;
    }
    let piece = &value[from..];
    if column + piece.len() > LINE && column > 1 && from > 0 {
        out.push_str("\r\n");
    }
    out.push_str(piece);
    out
}

/// All of `value` as UTF-8 B encoded words, one a line. Readers join
/// adjacent encoded words and drop the whitespace between them (RFC 2047
/// 6.2), so the value comes back whole, its own spaces included.
///
/// With `after_spaces` a word ends after a space or tab of the value where
/// one is in reach: some readers (Python's email package) put a space
/// between the encoded words of a display name, which then falls beside a
/// space that is there anyway instead of inside a word.
fn encoded_words(value: &str, after_spaces: bool) -> String {
    let mut out = String::with_capacity(value.len() * 2);
    let mut rest = value;
    while !rest.is_empty() {
        let mut end = rest.len().min(WORD_BYTES);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        if after_spaces
            && end < rest.len()
            && let Some(at) = rest[..end].rfind([' ', '\t']).filter(|&at| at > 0)
        {
            end = at + 1;
        }
        if !out.is_empty() {
            out.push_str("\r\n ");
        }
        out.push_str("=?utf-8?b?");
        STANDARD.encode_string(&rest.as_bytes()[..end], &mut out);
        out.push_str("?=");
        rest = &rest[end..];
    }
    out
}

/// Characters a display name may have and still be written bare: RFC 5322
/// `atext`, and single spaces between words.
fn atom_text(name: &str) -> bool {
    name.split(' ').all(|word| {
        !word.is_empty()
            && word
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b))
    })
}

/// A display name as a phrase: bare words, a quoted string, or encoded
/// words.
fn phrase(name: &str) -> String {
    if plain(name) && name.len() <= QUOTED_MAX {
        if atom_text(name) {
            return name.to_owned();
        }
        let mut quoted = String::with_capacity(name.len() + 2);
        quoted.push('"');
        for c in name.chars() {
            if c == '"' || c == '\\' {
                quoted.push('\\');
            }
            quoted.push(c);
        }
        quoted.push('"');
        return quoted;
    }
    encoded_words(name, true)
}

/// A mailbox-list field's value after `name: `, folded between mailboxes.
fn mailboxes(name: &str, list: &[Mailbox]) -> String {
    let mut out = String::new();
    let mut column = name.len() + 2;
    for (i, mailbox) in list.iter().enumerate() {
        let one = match mailbox.name.as_deref().map(str::trim) {
            Some(n) if !n.is_empty() => format!("{} <{}>", phrase(n), mailbox.email),
            _ => mailbox.email.to_string(),
        };
        let first_line = one.split("\r\n").next().unwrap_or_default().len();
        if i > 0 {
            if column + 2 + first_line > LINE {
                out.push_str(",\r\n ");
                column = 1;
            } else {
                out.push_str(", ");
                column += 2;
            }
        }
        out.push_str(&one);
        column = match one.rsplit_once("\r\n") {
            Some((_, last)) => last.len(),
            None => column + one.len(),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text of each encoded word of `out`, one a line.
    fn decoded_words(out: &str) -> Vec<String> {
        out.split("\r\n ")
            .map(|w| {
                let b64 = w
                    .strip_prefix("=?utf-8?b?")
                    .and_then(|w| w.strip_suffix("?="))
                    .unwrap_or_else(|| panic!("not an encoded word: {w}"));
                String::from_utf8(STANDARD.decode(b64).unwrap()).unwrap()
            })
            .collect()
    }

    #[test]
    fn plain_text_stays_as_it_is_and_folds_only_before_its_own_spaces() {
        assert_eq!(unstructured("Subject", "Hello there"), "Hello there");
        let long = "word ".repeat(30);
        let long = long.trim_end();
        let folded = unstructured("Subject", long);
        assert_eq!(folded.replace("\r\n", ""), long);
        assert!(folded.split("\r\n").all(|l| l.len() + 9 <= LINE + 9));
        assert!(folded.split("\r\n").skip(1).all(|l| l.starts_with(' ')));
        // A run of spaces folds before its last one: no line is blank.
        let spaced = format!("{}   b", "a".repeat(80));
        let folded = unstructured("Subject", &spaced);
        assert_eq!(folded.replace("\r\n", ""), spaced);
        assert!(folded.split("\r\n").all(|l| !l.trim().is_empty()));
    }

    #[test]
    fn text_a_reader_would_change_goes_whole_into_encoded_words() {
        for value in [
            "=?utf-8?q?not_a_word?=",
            " leading",
            "trailing ",
            "Zoë  and   Ünal",
            "日本語",
        ] {
            let out = unstructured("Subject", value);
            assert_eq!(decoded_words(&out).concat(), value, "{out}");
        }
    }

    #[test]
    fn encoded_words_end_on_character_boundaries_and_stay_short() {
        let value = "👍🏽".repeat(40);
        let out = encoded_words(&value, false);
        assert!(out.split("\r\n ").all(|w| w.len() <= 75), "{out}");
        // Each word decodes on its own to whole characters.
        assert_eq!(decoded_words(&out).concat(), value);
    }

    #[test]
    fn display_names_are_bare_quoted_or_encoded() {
        assert_eq!(phrase("Ada Lovelace"), "Ada Lovelace");
        assert_eq!(phrase("O'Brien"), "O'Brien");
        assert_eq!(phrase("Lovelace, Ada"), "\"Lovelace, Ada\"");
        assert_eq!(phrase("say \"hi\" \\o/"), "\"say \\\"hi\\\" \\\\o/\"");
        assert_eq!(phrase("Ada  Lovelace"), "\"Ada  Lovelace\"");
        assert_eq!(phrase("日本 太郎"), "=?utf-8?b?5pel5pysIOWkqumDjg==?=");
        assert!(phrase("=?x?").starts_with("=?utf-8?b?"));
        // A long name's words end after its own spaces.
        let long = phrase("Ωμέγα Ωμέγα Ωμέγα Ωμέγα 日本語 日本語");
        assert_eq!(
            decoded_words(&long),
            ["Ωμέγα Ωμέγα Ωμέγα ", "Ωμέγα 日本語 日本語"]
        );
    }

    #[test]
    fn a_file_name_a_reader_would_change_is_percent_encoded() {
        assert!(plain_filename("report 2026 (final).pdf"));
        assert!(plain_filename("naïve.txt"));
        assert!(!plain_filename("=?utf-8?q?x?=.txt"));
        let field = |name: &str| {
            let part = lettre::message::SinglePart::builder()
                .header(Disposition::new(false, name))
                .body(String::new());
            let text = String::from_utf8(part.formatted()).unwrap();
            let (head, _) = text.split_once("\r\n\r\n").unwrap();
            head.lines()
                .skip_while(|l| !l.starts_with("Content-Disposition:"))
                .take_while(|l| l.starts_with("Content-Disposition:") || l.starts_with(' '))
                .map(|l| l.trim_end_matches('\r').to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            field("<b> naïve.txt"),
            [
                "Content-Disposition: attachment;",
                " filename*=utf-8''%3Cb%3E%20na%C3%AFve.txt"
            ]
        );
        // 40 × `%C3%A9` is 240 characters: five continuations, of nine
        // `%C3%A9` each and four in the last; a `€` (`%E2%82%AC`) is never
        // cut.
        let lines = field(&"é".repeat(40));
        assert_eq!(lines.len(), 6, "{lines:?}");
        let euros = field(&format!("a{}", "€".repeat(12)));
        assert!(euros[1].ends_with("%E2%82%AC;"), "{euros:?}");
        assert!(euros[2].starts_with(" filename*1*=%E2%82%AC"), "{euros:?}");
        assert!(lines[1].starts_with(" filename*0*=utf-8''%C3%A9"));
        assert!(lines[2].starts_with(" filename*1*=%C3%A9"));
        assert!(lines.iter().all(|l| l.len() <= LINE));
    }

    #[test]
    fn a_list_of_mailboxes_folds_between_them() {
        let list: Vec<Mailbox> = (0..6)
            .map(|i| {
                format!("Person Number {i} <person{i}@example.org>")
                    .parse()
                    .unwrap()
            })
            .collect();
        let out = mailboxes("To", &list);
        let mut lines = out.split("\r\n");
        assert!(lines.next().unwrap().len() + "To: ".len() <= LINE, "{out}");
        assert!(lines.all(|l| l.len() <= LINE), "{out}");
        assert_eq!(
            out.replace(",\r\n ", ", "),
            list.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}
