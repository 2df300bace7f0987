//! How a held message is shown to the person who decides on it (the MCP
//! elicitation prompt, the console): as the mail will go, not as the agent
//! would like it read.
//!
//! An agent can write text that looks like something else: a domain with a
//! Cyrillic `а` reads as `example.org` and is another domain; a right-to-left
//! override reverses what follows it; zero-width and tag characters hide
//! text. [`address`] shows a domain outside ASCII in its ASCII form, which is
//! where the mail goes, with the form it was written in beside it;
//! [`text`] writes every character that reorders or hides text as
//! `<U+XXXX>`.

use super::rules::ascii_domain;

/// `address` (`local@domain`) as a person deciding on it should read it.
pub fn address(address: &str) -> String {
    let shown = text(address);
    let Some((local, domain)) = address.rsplit_once('@') else {
        return shown;
    };
    if domain.is_ascii() {
        return shown;
    }
    match ascii_domain(domain) {
        Some(ascii) => format!(
            "{}@{ascii} (an international domain, written {shown})",
            text(local)
        ),
        None => shown,
    }
}

/// `s` with every character that reorders or hides text written as
/// `<U+XXXX>`; line breaks and tabs stay.
pub fn text(s: &str) -> String {
    if !s.chars().any(hidden) {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if hidden(c) {
            out.push_str(&format!("<U+{:04X}>", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Characters a reader cannot see, or that change the order of what they
/// see: controls (but line breaks and tab), bidirectional formatting,
/// zero-width and invisible characters, and the tag characters.
fn hidden(c: char) -> bool {
    (c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        || matches!(c,
            '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}'
            | '\u{17B4}' | '\u{17B5}' | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}' | '\u{FEFF}' | '\u{FFA0}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{E0000}'..='\u{E007F}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lookalike_domain_is_shown_as_where_the_mail_goes() {
        // A Cyrillic `а` (U+0430) in `exаmple.org`.
        let lookalike = "boss@ex\u{0430}mple.org";
        let shown = address(lookalike);
        assert!(shown.starts_with("boss@xn--exmple-"), "{shown}");
        assert!(shown.contains("an international domain"), "{shown}");
        assert!(!shown.starts_with("boss@example.org"), "{shown}");
        assert_eq!(address("boss@example.org"), "boss@example.org");
        assert_eq!(
            address("a@b\u{fc}cher.example"),
            "a@xn--bcher-kva.example (an international domain, written a@b\u{fc}cher.example)"
        );
    }

    #[test]
    fn characters_that_hide_or_reorder_text_are_written_out() {
        assert_eq!(text("plain\ttext\n"), "plain\ttext\n");
        assert_eq!(text("Gr\u{fc}\u{df}e"), "Gr\u{fc}\u{df}e");
        assert_eq!(text("invoice\u{202E}fdp.exe"), "invoice<U+202E>fdp.exe");
        assert_eq!(text("a\u{200B}b\u{FEFF}"), "a<U+200B>b<U+FEFF>");
        assert_eq!(text("x\u{E0041}\u{E0042}"), "x<U+E0041><U+E0042>");
        assert_eq!(text("bell\u{7}"), "bell<U+0007>");
        assert_eq!(
            address("bo\u{200B}ss@example.org"),
            "bo<U+200B>ss@example.org"
        );
    }
}
