//! The `template_vars` language: `{name}` substitutes, `{?name}…{/name}` keeps
//! its block only when `name` is set and not empty.
//!
//! Anything else in braces (`{{`, `{ x }`, `{}`, a lone `{`, JSON) is left
//! exactly as written. This module only renders strings; it knows nothing of
//! mail.

use std::collections::{BTreeMap, BTreeSet};

/// Nesting of `{?name}` blocks; rendering recurses once per level, so an
/// input of a million nested blocks must not reach the stack.
const MAX_NESTING: usize = 32;

/// How substituted values are written into the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Escape {
    /// Values go in as given (plain text, subject).
    Raw,
    /// Values are HTML-escaped (HTML bodies): a value never becomes markup.
    Html,
}

#[derive(Debug)]
enum Node<'a> {
    Text(&'a str),
    Var(&'a str),
    Block(&'a str, Vec<Node<'a>>),
}

/// A token at `{`: which marker it is and how many bytes it spans.
enum Marker<'a> {
    Var(&'a str),
    Open(&'a str),
    Close(&'a str),
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Recognises `{name}`, `{?name}` or `{/name}` at the start of `s`.
fn marker(s: &str) -> Option<(Marker<'_>, usize)> {
    let bytes = s.as_bytes();
    if bytes.first() != Some(&b'{') {
        return None;
    }
    let (sigil, start) = match bytes.get(1) {
        Some(b'?') => (Some(b'?'), 2),
        Some(b'/') => (Some(b'/'), 2),
        _ => (None, 1),
    };
    let len = bytes[start..]
        .iter()
        .take_while(|b| is_name_byte(**b))
        .count();
    if len == 0 || bytes.get(start + len) != Some(&b'}') {
        return None;
    }
    let name = &s[start..start + len];
    let marker = match sigil {
        Some(b'?') => Marker::Open(name),
        Some(_) => Marker::Close(name),
        None => Marker::Var(name),
    };
    Some((marker, start + len + 1))
}

fn parse(src: &str) -> Result<Vec<Node<'_>>, String> {
    // Open blocks: (name, the nodes collected before it opened).
    let mut stack: Vec<(&str, Vec<Node<'_>>)> = Vec::new();
    let mut nodes: Vec<Node<'_>> = Vec::new();
    let mut text_start = 0;
    let mut i = 0;
    while let Some(offset) = src[i..].find('{') {
        let at = i + offset;
        let Some((marker, len)) = marker(&src[at..]) else {
            i = at + 1;
            continue;
        };
        if text_start < at {
            nodes.push(Node::Text(&src[text_start..at]));
        }
        match marker {
            Marker::Var(name) => nodes.push(Node::Var(name)),
            Marker::Open(name) => {
                if stack.len() >= MAX_NESTING {
                    return Err(format!(
                        "conditional blocks nest deeper than {MAX_NESTING} levels"
                    ));
                }
                stack.push((name, std::mem::take(&mut nodes)));
            }
            Marker::Close(name) => match stack.pop() {
                Some((open, outer)) if open == name => {
                    let inner = std::mem::replace(&mut nodes, outer);
                    nodes.push(Node::Block(name, inner));
                }
                Some((open, _)) => {
                    return Err(format!("{{/{name}}} closes {{?{open}}}"));
                }
                None => return Err(format!("{{/{name}}} has no matching {{?{name}}}")),
            },
        }
        i = at + len;
        text_start = i;
    }
    if let Some((open, _)) = stack.last() {
        return Err(format!("{{?{open}}} is never closed with {{/{open}}}"));
    }
    if text_start < src.len() {
        nodes.push(Node::Text(&src[text_start..]));
    }
    Ok(nodes)
}

pub(crate) fn escape_html(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

/// Why a template was not rendered.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RenderError {
    /// A problem with the conditional markers.
    Syntax(String),
    /// The output grew past the limit: substitution multiplies a value by
    /// the times it is used, so a small input could otherwise grow without
    /// bound.
    TooLarge,
}

/// Renders `nodes` into `out`; false once `out` is past `limit` (what is
/// left is not rendered).
fn render_nodes(
    nodes: &[Node<'_>],
    vars: &BTreeMap<String, String>,
    escape: Escape,
    limit: usize,
    missing: &mut BTreeSet<String>,
    out: &mut String,
) -> bool {
    for node in nodes {
        match node {
            Node::Text(t) => out.push_str(t),
            Node::Var(name) => match vars.get(*name) {
                // Escaping at most sextuples a value: checked before it is.
                Some(value) if out.len().saturating_add(value.len()) > limit => return false,
                Some(value) if escape == Escape::Html => escape_html(value, out),
                Some(value) => out.push_str(value),
                None => {
                    missing.insert((*name).to_owned());
                }
            },
            // Variables inside a dropped block are not required.
            Node::Block(name, inner) => {
                if vars.get(*name).is_some_and(|v| !v.is_empty())
                    && !render_nodes(inner, vars, escape, limit, missing, out)
                {
                    return false;
                }
            }
        }
        if out.len() > limit {
            return false;
        }
    }
    true
}

/// Renders `src`, adding every variable it uses but `vars` lacks to
/// `missing` (so one error can list them all). It stops with
/// [`RenderError::TooLarge`] as soon as the output is longer than `limit`
/// bytes.
pub(crate) fn render(
    src: &str,
    vars: &BTreeMap<String, String>,
    escape: Escape,
    limit: usize,
    missing: &mut BTreeSet<String>,
) -> Result<String, RenderError> {
    let nodes = parse(src).map_err(RenderError::Syntax)?;
    let mut out = String::with_capacity(src.len().min(limit));
    if !render_nodes(&nodes, vars, escape, limit, missing, &mut out) {
        return Err(RenderError::TooLarge);
    }
    Ok(out)
}

/// The variables `src` uses, or why it does not parse: for a template the
/// operator configures, checked when the configuration loads. A name used
/// only as a `{?name}` block is listed too (it may be given).
pub(crate) fn names(src: &str) -> Result<BTreeSet<String>, String> {
    fn walk(nodes: &[Node<'_>], out: &mut BTreeSet<String>) {
        for node in nodes {
            match node {
                Node::Text(_) => {}
                Node::Var(name) => {
                    out.insert((*name).to_owned());
                }
                Node::Block(name, inner) => {
                    out.insert((*name).to_owned());
                    walk(inner, out);
                }
            }
        }
    }
    let nodes = parse(src)?;
    let mut out = BTreeSet::new();
    walk(&nodes, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn raw(src: &str, v: &BTreeMap<String, String>) -> (String, BTreeSet<String>) {
        let mut missing = BTreeSet::new();
        let out = render(src, v, Escape::Raw, usize::MAX, &mut missing).expect("valid template");
        (out, missing)
    }

    #[test]
    fn names_lists_every_variable_and_refuses_bad_syntax() {
        let all = names("Hi {name}{?note}: {note} {?x}{y}{/x}{/note} {} { z } {-}").unwrap();
        assert_eq!(
            all.into_iter().collect::<Vec<_>>(),
            ["name", "note", "x", "y"]
        );
        assert!(names("{?a}open").unwrap_err().contains("never closed"));
        assert!(names("").unwrap().is_empty());
    }

    #[test]
    fn substitutes_variables() {
        let v = vars(&[("name", "Ada"), ("company", "Acme")]);
        let (out, missing) = raw("Hello {name}, welcome to {company}!", &v);
        assert_eq!(out, "Hello Ada, welcome to Acme!");
        assert!(missing.is_empty());
    }

    #[test]
    fn conditional_kept_when_set_and_dropped_when_empty_or_absent() {
        let src = "A{?offer}[{offer}]{/offer}B";
        assert_eq!(raw(src, &vars(&[("offer", "10%")])).0, "A[10%]B");
        assert_eq!(raw(src, &vars(&[("offer", "")])).0, "AB");
        let (out, missing) = raw(src, &vars(&[]));
        assert_eq!(out, "AB");
        assert!(
            missing.is_empty(),
            "vars in a dropped block are not required"
        );
    }

    #[test]
    fn nested_blocks() {
        let src = "{?a}a{?b}b{/b}{/a}.";
        assert_eq!(raw(src, &vars(&[("a", "1"), ("b", "1")])).0, "ab.");
        assert_eq!(raw(src, &vars(&[("a", "1")])).0, "a.");
        assert_eq!(raw(src, &vars(&[("b", "1")])).0, ".");
    }

    #[test]
    fn lists_every_missing_variable() {
        let (_, missing) = raw("{z} {a} {m} {a}", &vars(&[("m", "x")]));
        assert_eq!(missing.into_iter().collect::<Vec<_>>(), ["a", "z"]);
    }

    #[test]
    fn other_braces_are_left_as_written() {
        let v = vars(&[("x", "X")]);
        for src in [
            "{",
            "}",
            "{}",
            "{ x }",
            "{\"k\": 1}",
            "a{b-c}d",
            "{?}",
            "{/}",
        ] {
            assert_eq!(raw(src, &v).0, src);
        }
        assert_eq!(raw("{{x}}", &v).0, "{X}");
    }

    #[test]
    fn values_are_not_rescanned() {
        let v = vars(&[("x", "{y}")]);
        let (out, missing) = raw("{x}", &v);
        assert_eq!(out, "{y}");
        assert!(missing.is_empty());
    }

    #[test]
    fn html_escape() {
        let mut missing = BTreeSet::new();
        let out = render(
            "<p>{v}</p>",
            &vars(&[("v", "<b>&\"'")]),
            Escape::Html,
            usize::MAX,
            &mut missing,
        )
        .expect("valid");
        assert_eq!(out, "<p>&lt;b&gt;&amp;&quot;&#39;</p>");
    }

    #[test]
    fn syntax_errors() {
        let v = vars(&[]);
        let mut m = BTreeSet::new();
        assert!(render("{?a}x", &v, Escape::Raw, usize::MAX, &mut m).is_err());
        assert!(render("x{/a}", &v, Escape::Raw, usize::MAX, &mut m).is_err());
        assert!(render("{?a}{?b}{/a}{/b}", &v, Escape::Raw, usize::MAX, &mut m).is_err());
        let deep = "{?a}".repeat(1000) + &"{/a}".repeat(1000);
        assert!(render(&deep, &v, Escape::Raw, usize::MAX, &mut m).is_err());
        let ok = "{?a}".repeat(MAX_NESTING) + &"{/a}".repeat(MAX_NESTING);
        assert!(render(&ok, &v, Escape::Raw, usize::MAX, &mut m).is_ok());
    }

    #[test]
    fn unicode_around_markers() {
        let v = vars(&[("n", "Zoë")]);
        assert_eq!(raw("¡{n}! {日本}", &v).1.len(), 0);
        assert_eq!(raw("¡{n}! {日本}", &v).0, "¡Zoë! {日本}");
    }

    #[test]
    fn output_past_the_limit_stops_rendering() {
        // 3 bytes of template and 10 of value become 10 per use: a million
        // uses would be 10 MB; the limit stops it at the first use past it.
        let src = "{x}".repeat(1_000_000);
        let v = vars(&[("x", "0123456789")]);
        let mut m = BTreeSet::new();
        assert_eq!(
            render(&src, &v, Escape::Raw, 1000, &mut m),
            Err(RenderError::TooLarge)
        );
        assert_eq!(
            render(&src[..300], &v, Escape::Raw, 1000, &mut m).map(|o| o.len()),
            Ok(1000)
        );
        // Inside a kept block too, and escaped values count as escaped.
        let block = format!("{{?x}}{src}{{/x}}");
        assert_eq!(
            render(&block, &v, Escape::Raw, 1000, &mut m),
            Err(RenderError::TooLarge)
        );
        let amps = vars(&[("x", "&&&&&&&&&&")]);
        assert_eq!(
            render(&src[..90], &amps, Escape::Html, 1000, &mut m),
            Err(RenderError::TooLarge),
            "30 uses of 10 '&' are 300 bytes raw and 1500 escaped"
        );
    }
}
