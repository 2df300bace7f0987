//! The operator's named templates (`[[templates]]`): a subject and bodies
//! written in the configuration, which a call names (`template`) and fills
//! with its `template_vars`, so that the wording is the operator's and only
//! the variables are the agent's. This module holds them and puts a
//! template's texts in place of a draft's; `template.rs` renders them.

use std::sync::Arc;

use super::{ComposeError, Draft};

/// The most templates a configuration holds.
pub const MAX_TEMPLATES: usize = 1000;

/// One `[[templates]]` entry, checked at load: its texts parse, and `vars`
/// are the variables they use.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub name: String,
    /// What it is for, for the agent (`get_smtp_status` shows it).
    pub description: Option<String>,
    pub subject: String,
    /// The text body.
    pub body: String,
    /// An HTML alternative; values are HTML-escaped in it.
    pub html_body: Option<String>,
    /// Every variable the texts use, sorted.
    pub vars: Vec<String>,
    /// What each variable's whole value must match, when the operator
    /// said (then every variable has one).
    pub patterns: Vec<VarPattern>,
    /// The images its HTML shows (`cid:ID`), read at load: every message
    /// written from it carries them.
    pub(crate) images: Vec<super::attach::Loaded>,
}

/// The pattern a template's variable must match, whole.
#[derive(Debug, Clone)]
pub struct VarPattern {
    pub var: String,
    /// As written.
    pub pattern: String,
    /// `^(?:pattern)$`.
    pub regex: regex::Regex,
}

impl PartialEq for VarPattern {
    fn eq(&self, other: &Self) -> bool {
        self.var == other.var && self.pattern == other.pattern
    }
}

impl VarPattern {
    /// The pattern, anchored at both ends, or why it does not compile.
    pub fn new(var: &str, pattern: &str) -> Result<Self, String> {
        let regex = regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
            .size_limit(1 << 20)
            .build()
            .map_err(|e| format!("is not a regular expression: {e}"))?;
        Ok(VarPattern {
            var: var.to_owned(),
            pattern: pattern.to_owned(),
            regex,
        })
    }
}

impl Template {
    /// The ids of the images its HTML shows.
    pub fn image_ids(&self) -> impl Iterator<Item = &str> {
        self.images.iter().filter_map(|i| i.content_id.as_deref())
    }

    /// The first value of `vars` its variable's pattern refuses.
    pub(crate) fn check_vars(
        &self,
        vars: Option<&std::collections::BTreeMap<String, String>>,
    ) -> Result<(), ComposeError> {
        let Some(vars) = vars else {
            return Ok(());
        };
        // With patterns, every value the agent gives has one; the one
        // variable without is the daemon's own link, which the agent does
        // not write.
        if !self.patterns.is_empty() && vars.contains_key(super::ONE_CLICK_VAR) {
            return Err(ComposeError::new(
                format!("template_vars.{}", super::ONE_CLICK_VAR),
                "template_var_mismatch",
                format!(
                    "is the daemon's own unsubscribe link in template {:?}: give \
                     unsubscribe: true instead of a value",
                    self.name
                ),
            ));
        }
        for p in &self.patterns {
            if let Some(value) = vars.get(&p.var)
                && !p.regex.is_match(value)
            {
                // Never the value: it may be what the pattern keeps out.
                return Err(ComposeError::new(
                    format!("template_vars.{}", p.var),
                    "template_var_mismatch",
                    format!(
                        "does not match what template {:?} takes for {}: {}",
                        self.name, p.var, p.pattern
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The configured templates, in the order written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Templates(pub Vec<Arc<Template>>);

impl Templates {
    pub fn get(&self, name: &str) -> Option<&Arc<Template>> {
        self.0.iter().find(|t| t.name == name)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|t| t.name.as_str())
    }
}

/// What a draft's subject and bodies are once its template, if it names
/// one, is put in their place.
pub(crate) struct Texts<'a> {
    pub subject: &'a str,
    pub body: &'a str,
    /// `body` is HTML.
    pub html: bool,
    pub html_body: Option<&'a str>,
    /// The template: its texts are rendered even without `template_vars`
    /// (a variable it needs is then missing).
    pub template: Option<&'a Template>,
}

/// The texts of `draft`: its own, or those of the template it names. A
/// draft that names a template may not write a subject or a body of its
/// own (`conflicting_fields`); one that names no configured template is
/// refused (`unknown_template`).
pub(crate) fn texts<'a>(draft: &'a Draft, all: &'a Templates) -> Result<Texts<'a>, ComposeError> {
    let Some(name) = draft.template.as_deref() else {
        return Ok(Texts {
            subject: &draft.subject,
            body: &draft.body,
            html: draft.html,
            html_body: draft.html_body.as_deref(),
            template: None,
        });
    };
    let Some(t) = all.get(name) else {
        let known = if all.is_empty() {
            "none is configured".to_owned()
        } else {
            "get_smtp_status lists those this caller may name".to_owned()
        };
        return Err(ComposeError::new(
            "template",
            "unknown_template",
            format!("no template is named {name:?}; {known}"),
        ));
    };
    for (field, set) in [
        ("subject", !draft.subject.is_empty()),
        ("body", !draft.body.is_empty()),
        ("html_body", draft.html_body.is_some()),
        ("html", draft.html),
    ] {
        if set {
            return Err(ComposeError::new(
                field,
                "conflicting_fields",
                format!(
                    "template {name:?} writes the subject and the bodies; leave {field} out \
                     and give the template's variables in template_vars"
                ),
            ));
        }
    }
    t.check_vars(draft.template_vars.as_ref())?;
    Ok(Texts {
        subject: &t.subject,
        body: &t.body,
        html: false,
        html_body: t.html_body.as_deref(),
        template: Some(t),
    })
}
