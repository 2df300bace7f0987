//! Validation of the safety keys: `[policy]`, `[[callers]]`,
//! `[[operators]]`, `stdio_caller` and `[audit]`. Tokens are hashed here and
//! never kept or printed.

use std::str::FromStr;
use std::time::Duration;

use serde_json::{Map, Value as Json, json};

use super::ConfigError;
use super::raw::{RawConfig, RawContentCheck, RawIdentity, RawPolicy};
use super::validate::{At, Ctx, REDACTED, leaf, read_secret, secs, warn_if_short};
use crate::audit::AuditSettings;
use crate::policy::content::{self, ContentChecks};
use crate::policy::rate::RateRule;
use crate::policy::rules::AddressRule;
use crate::policy::{
    Approval, Approver, CallerSettings, DEFAULT_CALLER, Mode, OperatorSettings, Policy,
    SafetySettings, TokenHash, hash_token,
};

const STDIO_CALLER: &str = "local";

/// Everything the safety keys configure. `http_token` is `http.token`,
/// which becomes the caller `default`; `relays` are the configured relay
/// names; `global_*` are the global limits a policy limit may only lower.
pub(crate) fn build(
    ctx: &Ctx,
    raw: &RawConfig,
    env: &[(String, String)],
    http_token: Option<&str>,
    relays: &[String],
    senders: &[crate::config::RelaySenders],
    out: &mut Map<String, Json>,
) -> Result<SafetySettings, ConfigError> {
    // The default policy; the old top-level `allowed_senders` still works.
    let mut defaults = raw.policy.clone();
    if defaults.allowed_senders.is_none() {
        defaults.allowed_senders = raw.allowed_senders.clone();
    } else if raw.allowed_senders.is_some() {
        return Err(ctx
            .at("allowed_senders")
            .err("is set both at the top level and in [policy]; keep it in [policy] only"));
    }
    // Checked already (`validate::templates`).
    let templates: Vec<String> = raw
        .templates
        .iter()
        .filter_map(|t| t.name.clone())
        .collect();
    let mut shown = Map::new();
    let policy = policy_table(
        ctx,
        "policy",
        &defaults,
        &Policy::default(),
        (relays, senders, &templates),
        &mut shown,
    )?;
    out.insert("policy".into(), Json::Object(shown));

    let mut callers = Vec::new();
    let mut shown_callers = Vec::new();
    for (i, c) in raw.callers.iter().enumerate() {
        let key = format!("callers.{i}");
        let name = name(ctx, &key, c)?;
        if name == DEFAULT_CALLER && http_token.is_some() {
            return Err(ctx.at(&format!("{key}.name")).err(format!(
                "{name:?} is the caller of http.token; name this caller otherwise"
            )));
        }
        if let Some(first) = callers.iter().position(|x: &CallerSettings| x.name == name) {
            return Err(ctx.at(&format!("{key}.name")).err(format!(
                "caller {name:?} is listed twice (first at callers[{first}])"
            )));
        }
        let token = token(ctx, &key, c, env)?;
        if let Some(first) = callers
            .iter()
            .position(|x: &CallerSettings| x.token == Some(token))
        {
            return Err(ctx.at(&key).err(format!(
                "callers[{i}] has the same token as callers[{first}]"
            )));
        }
        let mut shown = Map::new();
        let own = policy_table(
            ctx,
            &key,
            &c.policy,
            &policy,
            (relays, senders, &templates),
            &mut shown,
        )?;
        shown.insert("name".into(), json!(name));
        shown.insert("token".into(), json!(REDACTED));
        shown_callers.push(Json::Object(shown));
        callers.push(CallerSettings {
            name,
            token: Some(token),
            policy: own,
        });
    }
    // `http.token` becomes the caller `default` (crate::policy::Gate).
    let http_hash = http_token.map(hash_token);
    if let Some(hash) = http_hash
        && callers.iter().any(|c| c.token == Some(hash))
    {
        return Err(ctx
            .at("http.token")
            .err("is also the token of a [[callers]] entry; each caller needs its own"));
    }
    out.insert("callers".into(), Json::Array(shown_callers));

    let at = ctx.at("stdio_caller");
    let stdio_name = raw
        .stdio_caller
        .clone()
        .unwrap_or_else(|| STDIO_CALLER.into());
    if stdio_name.trim().is_empty() {
        return Err(at.err("must not be empty"));
    }
    leaf(out, "stdio_caller", json!(stdio_name), &at);
    // The stdio caller has a listed caller's policy when one has its name.
    let stdio = callers
        .iter()
        .find(|c| c.name == stdio_name)
        .map(|c| CallerSettings {
            token: None,
            ..c.clone()
        })
        .unwrap_or_else(|| CallerSettings {
            name: stdio_name,
            token: None,
            policy: policy.clone(),
        });

    let mut operators = Vec::new();
    let mut shown_ops = Vec::new();
    for (i, o) in raw.operators.iter().enumerate() {
        let key = format!("operators.{i}");
        let name = name(ctx, &key, o)?;
        let token = token(ctx, &key, o, env)?;
        if callers.iter().any(|c| c.token == Some(token)) || http_hash == Some(token) {
            return Err(ctx.at(&key).err(
                "has the token of a caller; an operator's token must be its own, so that no agent can approve",
            ));
        }
        shown_ops.push(json!({ "name": name, "token": REDACTED }));
        operators.push(OperatorSettings { name, token });
    }
    out.insert("operators".into(), Json::Array(shown_ops));

    let a = &raw.audit;
    let mut shown = Map::new();
    let at = ctx.at("audit.path");
    if a.path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
        return Err(at.err("must not be empty"));
    }
    leaf(
        &mut shown,
        "path",
        json!(a.path.as_deref().map(|p| p.display().to_string())),
        &at,
    );
    let audit = AuditSettings {
        path: a.path.clone(),
        subjects: a.subjects.unwrap_or(true),
        required: a.required.unwrap_or(false),
    };
    leaf(
        &mut shown,
        "subjects",
        json!(audit.subjects),
        &ctx.at("audit.subjects"),
    );
    leaf(
        &mut shown,
        "required",
        json!(audit.required),
        &ctx.at("audit.required"),
    );
    out.insert("audit".into(), Json::Object(shown));

    Ok(SafetySettings {
        callers,
        operators,
        stdio,
        policy,
        audit,
    })
}

fn name(ctx: &Ctx, key: &str, e: &RawIdentity) -> Result<String, ConfigError> {
    let at = ctx.at(&format!("{key}.name"));
    let name = e.name.clone().ok_or_else(|| at.err("is required"))?;
    if name.trim().is_empty() || name.chars().any(|c| c.is_control()) {
        return Err(at.err("must be a non-empty name without control characters"));
    }
    Ok(name)
}

/// Exactly one of `token_sha256`, `token_file` and `token_env`, as a hash.
fn token(
    ctx: &Ctx,
    key: &str,
    e: &RawIdentity,
    env: &[(String, String)],
) -> Result<TokenHash, ConfigError> {
    let set = [
        e.token_sha256.is_some(),
        e.token_file.is_some(),
        e.token_env.is_some(),
    ];
    if set.iter().filter(|s| **s).count() != 1 {
        return Err(ctx
            .at(key)
            .err("needs exactly one of token_sha256, token_file and token_env"));
    }
    if let Some(hex) = &e.token_sha256 {
        let at = ctx.at(&format!("{key}.token_sha256"));
        return parse_hex(hex.trim())
            .ok_or_else(|| at.err("must be 64 hex digits (the SHA-256 of the token)"));
    }
    if let Some(path) = &e.token_file {
        let at = ctx.at(&format!("{key}.token_file"));
        let secret = read_secret(path, &at, "token")?;
        warn_if_short(secret.expose(), &at);
        return Ok(hash_token(secret.expose()));
    }
    let var = e.token_env.as_deref().unwrap_or_default();
    let at = ctx.at(&format!("{key}.token_env"));
    match env.iter().find(|(k, _)| k == var) {
        Some((_, v)) if !v.trim().is_empty() => {
            let v = v.trim_end_matches(['\r', '\n']);
            warn_if_short(v, &at);
            Ok(hash_token(v))
        }
        Some(_) => Err(at.err(format!("the variable {var} is empty"))),
        None => Err(at.err(format!("the variable {var} is not set"))),
    }
}

fn parse_hex(s: &str) -> Option<TokenHash> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let pair = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

fn rules(at: &At, list: &[String], recipients: bool) -> Result<Vec<AddressRule>, ConfigError> {
    list.iter()
        .map(|e| AddressRule::parse(e, recipients).map_err(|m| at.err(m)))
        .collect()
}

/// A policy's `content_checks`, compiled; an error names the entry's key.
fn content_checks(
    list_at: &At,
    list: &[RawContentCheck],
    at: impl Fn(usize, &str) -> At,
) -> Result<ContentChecks, ConfigError> {
    if list.len() > content::MAX_CHECKS {
        return Err(list_at.err(format!(
            "has {} checks; a policy holds at most {}",
            list.len(),
            content::MAX_CHECKS
        )));
    }
    let mut checks = Vec::with_capacity(list.len());
    for (i, raw) in list.iter().enumerate() {
        let name = raw
            .name
            .clone()
            .filter(|n| !n.trim().is_empty() && !n.chars().any(char::is_control))
            .ok_or_else(|| at(i, "name").err("is required: a name without control characters"))?;
        let pattern = raw
            .pattern
            .clone()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| at(i, "pattern").err("is required: a regular expression"))?;
        let action = match raw.action.as_deref() {
            Some("reject") => content::Action::Reject,
            Some("hold") => content::Action::Hold,
            Some(other) => {
                return Err(
                    at(i, "action").err(format!("{other:?}: expected \"reject\" or \"hold\""))
                );
            }
            None => return Err(at(i, "action").err("is required: \"reject\" or \"hold\"")),
        };
        checks.push(content::Check {
            name,
            pattern,
            action,
        });
    }
    ContentChecks::new(checks).map_err(|(i, why)| at(i, "pattern").err(why))
}

/// One policy table: `raw` over `base` (an overriding list replaces the
/// base list).
fn policy_table(
    ctx: &Ctx,
    key: &str,
    raw: &RawPolicy,
    base: &Policy,
    (relays, senders, templates): (&[String], &[crate::config::RelaySenders], &[String]),
    out: &mut Map<String, Json>,
) -> Result<Policy, ConfigError> {
    let at = |f: &str| ctx.at(&format!("{key}.{f}"));
    let mut p = base.clone();
    if let Some(from) = &raw.from_email {
        let a = at("from_email");
        lettre::Address::from_str(from.trim())
            .map_err(|e| a.err(format!("{from:?} is not an email address: {e}")))?;
        p.from_email = Some(from.trim().to_string());
        leaf(out, "from_email", json!(from), &a);
    }
    if let Some(list) = &raw.allowed_senders {
        // The default policy's list may come from the old top-level key.
        let a = if key == "policy" && ctx.source("policy.allowed_senders").is_none() {
            ctx.at("allowed_senders")
        } else {
            at("allowed_senders")
        };
        p.allowed_senders = rules(&a, &list.0, false)?;
        leaf(out, "allowed_senders", json!(list.0), &a);
    }
    if let Some(list) = &raw.allowed_recipients {
        let a = at("allowed_recipients");
        p.allowed_recipients = rules(&a, &list.0, true)?;
        leaf(out, "allowed_recipients", json!(list.0), &a);
    }
    if let Some(v) = raw.allow_bcc {
        p.allow_bcc = v;
        leaf(out, "allow_bcc", json!(v), &at("allow_bcc"));
    }
    if let Some(v) = &raw.approver {
        let a = at("approver");
        p.approver = match v.as_str() {
            "user" => Approver::User,
            "operator" => Approver::Operator,
            other => return Err(a.err(format!("{other:?}: expected \"user\" or \"operator\""))),
        };
        leaf(out, "approver", json!(v), &a);
    }
    if let Some(v) = raw.relay_control {
        p.relay_control = v;
        leaf(out, "relay_control", json!(v), &at("relay_control"));
    }
    if let Some(list) = &raw.content_checks {
        let a = at("content_checks");
        p.content_checks = content_checks(&a, list, |i, f| at(&format!("content_checks.{i}.{f}")))?;
        let shown: Vec<Json> = p
            .content_checks
            .checks()
            .iter()
            .map(|c| json!({"name": c.name, "pattern": c.pattern, "action": c.action.as_str()}))
            .collect();
        leaf(out, "content_checks", json!(shown), &a);
    }
    if let Some(list) = &raw.allowed_templates {
        let a = at("allowed_templates");
        if let Some(bad) = list.0.iter().find(|t| !templates.contains(t)) {
            return Err(a.err(format!(
                "{bad:?} is not a configured template; templates: {}",
                if templates.is_empty() {
                    "none".to_owned()
                } else {
                    templates.join(", ")
                }
            )));
        }
        p.allowed_templates = list.0.clone();
        leaf(out, "allowed_templates", json!(list.0), &a);
    }
    if let Some(v) = raw.require_template {
        let a = at("require_template");
        if v && templates.is_empty() {
            return Err(
                a.err("is true, but no [[templates]] are configured: every call would be refused")
            );
        }
        p.require_template = v;
        leaf(out, "require_template", json!(v), &a);
    }
    if let Some(v) = raw.transactional {
        p.transactional = v;
        leaf(out, "transactional", json!(v), &at("transactional"));
    }
    if let Some(fields) = &raw.headers {
        let a = at("headers");
        // Written as given: a brace would make a template of it.
        if let Some(name) = fields
            .iter()
            .find(|(_, v)| v.contains(['{', '}']))
            .map(|f| f.0)
        {
            return Err(a.err(format!(
                "{name}: a value is written as it is, not a template; it may not hold {{ or }}"
            )));
        }
        crate::compose::check_headers(fields)
            .map_err(|e| a.err(format!("{}: {}", e.field, e.message)))?;
        p.headers = fields.clone();
        leaf(out, "headers", json!(fields), &a);
    }
    for (field, v, slot) in [
        ("max_recipients", raw.max_recipients, &mut p.max_recipients),
        (
            "max_message_bytes",
            raw.max_message_bytes,
            &mut p.max_message_bytes,
        ),
    ] {
        if let Some(v) = v {
            let a = at(field);
            if v == 0 {
                return Err(a.err("must be at least 1"));
            }
            *slot = Some(v);
            leaf(out, field, json!(v), &a);
        }
    }
    if let Some(list) = &raw.allowed_relays {
        let a = at("allowed_relays");
        if let Some(bad) = list.0.iter().find(|r| !relays.contains(r)) {
            return Err(a.err(format!(
                "{bad:?} is not a configured relay; relays: {}",
                relays.join(", ")
            )));
        }
        p.allowed_relays = Some(list.0.clone());
        leaf(out, "allowed_relays", json!(list.0), &a);
    }
    if let Some(m) = &raw.mode {
        let a = at("mode");
        p.mode = match m.as_str() {
            "send" => Mode::Send,
            "dry_run" => Mode::DryRun,
            other => return Err(a.err(format!("{other:?}: expected \"send\" or \"dry_run\""))),
        };
        leaf(out, "mode", json!(m), &a);
    }
    if let Some(list) = &raw.rate {
        let a = at("rate");
        p.rate = list
            .0
            .iter()
            .map(|r| RateRule::parse(r).map_err(|m| a.err(m)))
            .collect::<Result<_, _>>()?;
        leaf(out, "rate", json!(list.0), &a);
    }
    if let Some(v) = &raw.approval {
        let a = at("approval");
        p.approval = match v.as_str() {
            "never" => Approval::Never,
            "always" => Approval::Always,
            "outside_allowlist" => Approval::OutsideAllowlist,
            other => {
                return Err(a.err(format!(
                    "{other:?}: expected \"never\", \"always\" or \"outside_allowlist\""
                )));
            }
        };
        leaf(out, "approval", json!(v), &a);
    }
    if let Some(d) = raw.max_age {
        let a = at("max_age");
        if d.0 < Duration::from_secs(1) {
            return Err(a.err("must be at least 1s"));
        }
        p.max_age = Some(d.0);
        leaf(out, "max_age", secs(d.0), &a);
    }
    for (field, v, slot) in [
        ("approval_ttl", raw.approval_ttl, &mut p.approval_ttl),
        (
            "elicitation_timeout",
            raw.elicitation_timeout,
            &mut p.elicitation_timeout,
        ),
    ] {
        if let Some(d) = v {
            let a = at(field);
            if d.0 == Duration::ZERO {
                return Err(a.err("must not be zero"));
            }
            *slot = d.0;
            leaf(out, field, secs(d.0), &a);
        }
    }
    // A default sender the caller could not send as, or that none of its
    // relays carries, would refuse every call that names no sender. The
    // error names the key of this table that makes it so: its own
    // `from_email`, or the list that leaves out an inherited one.
    if let Some(from) = p.from_email.as_deref()
        && let Ok(address) = lettre::Address::from_str(from)
    {
        let own = raw.from_email.is_some();
        if !p.allowed_senders.is_empty()
            && !crate::policy::rules::allowed(&p.allowed_senders, &address)
            && (own || raw.allowed_senders.is_some())
        {
            let key = if own { "from_email" } else { "allowed_senders" };
            return Err(at(key).err(format!(
                "the default sender {from:?} is not among this policy's allowed_senders{}",
                if own {
                    ""
                } else {
                    "; set this caller's own from_email"
                }
            )));
        }
        let carried = relays
            .iter()
            .filter(|r| p.allowed_relays.as_ref().is_none_or(|a| a.contains(r)))
            .any(|r| crate::config::RelaySenders::carry(senders, r, &address));
        if !carried && (own || raw.allowed_relays.is_some()) {
            let key = if own { "from_email" } else { "allowed_relays" };
            return Err(at(key).err(format!(
                "the default sender {from:?} is one none of this policy's relays carries \
                 (each relay's `senders`){}",
                if own {
                    ""
                } else {
                    "; set this caller's own from_email"
                }
            )));
        }
    }
    Ok(p)
}
