//! Who is calling, and what they may send: callers named by their bearer
//! tokens, operators, and the policy the daemon enforces on each message
//! whatever the agent was told.
//!
//! The checks run in a fixed order: identity (the transport names the
//! caller), policy ([`Caller::check`]), rate ([`Caller::take_rate`]),
//! approval (the verdict of the policy check), then the queue. A refused
//! message takes no rate and nothing is queued. A policy also says whether
//! its caller may act on the relays every caller shares (`relay_control`).

pub mod archive;
pub mod content;
pub mod rate;
pub mod rounds;
pub mod rules;
pub mod shown;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::audit::AuditSettings;
use crate::compose::Composed;
use content::ContentChecks;
use rate::{Limited, Limiter, RateRule};
use rules::AddressRule;

/// `mode`: a `dry_run` caller may only preview.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Send,
    DryRun,
}

/// `approval`: when a message waits for a person.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Approval {
    /// A recipient outside `allowed_recipients` is refused.
    Never,
    /// A message with any recipient outside `allowed_recipients` is held.
    OutsideAllowlist,
    /// Every message is held.
    Always,
}

impl Approval {
    pub fn as_str(self) -> &'static str {
        match self {
            Approval::Never => "never",
            Approval::OutsideAllowlist => "outside_allowlist",
            Approval::Always => "always",
        }
    }
}

/// Why an address that a domain rule seems to cover is not covered: its
/// local part routes to another domain. Empty for any other address.
fn routed(address: &lettre::Address) -> &'static str {
    if rules::routes_on(address.user()) {
        " (its local part holds % or !, which mail servers such as Postfix \
         follow to another domain: only an exact entry admits it)"
    } else {
        ""
    }
}

/// Who may release a caller's held messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Approver {
    /// The user of the caller's MCP client, through elicitation, or an
    /// operator.
    User,
    /// An operator only: no form is put to the client, whose answers may
    /// come from the agent itself.
    Operator,
}

impl Approver {
    pub fn as_str(self) -> &'static str {
        match self {
            Approver::User => "user",
            Approver::Operator => "operator",
        }
    }
}

/// One caller's rules (the `[policy]` table with the caller's overrides).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Empty: any sender.
    pub allowed_senders: Vec<AddressRule>,
    /// The sender of a message that names none; `None`: the top-level
    /// `from_email`.
    pub from_email: Option<String>,
    /// Empty: any recipient.
    pub allowed_recipients: Vec<AddressRule>,
    pub allow_bcc: bool,
    pub max_recipients: Option<usize>,
    pub max_message_bytes: Option<usize>,
    /// `None`: any relay.
    pub allowed_relays: Option<Vec<String>>,
    pub mode: Mode,
    pub rate: Vec<RateRule>,
    pub approval: Approval,
    /// How long a held message waits for a decision.
    pub approval_ttl: Duration,
    /// How long a call waits for the user's answer to an approval form.
    pub elicitation_timeout: Duration,
    /// Who may release a held message.
    pub approver: Approver,
    /// May use the tools that act on the relays of every caller
    /// (`switch_smtp_server` to pin, `reload_smtp_configuration`,
    /// `reconnect_smtp_servers`, `test_smtp_connection`).
    pub relay_control: bool,
    /// Header fields written on every message, which a call may not set
    /// (checked at load as `send_email`'s `headers` are).
    pub headers: BTreeMap<String, String>,
    /// Patterns that refuse or hold a message by what it says.
    pub content_checks: ContentChecks,
    /// The `[[templates]]` a message may name; empty: any.
    pub allowed_templates: Vec<String>,
    /// Every message must name a template: its subject and bodies are the
    /// operator's.
    pub require_template: bool,
    /// Sends transactional mail (receipts, password resets): a recipient
    /// who unsubscribed still gets it, and it may carry no unsubscribe
    /// link.
    pub transactional: bool,
    /// How long the caller's mail may wait for delivery, from when it is
    /// due; `None`: `queue.max_age`.
    pub max_age: Option<Duration>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allowed_senders: Vec::new(),
            from_email: None,
            allowed_recipients: Vec::new(),
            allow_bcc: true,
            max_recipients: None,
            max_message_bytes: None,
            allowed_relays: None,
            mode: Mode::Send,
            rate: Vec::new(),
            approval: Approval::Never,
            approval_ttl: Duration::from_secs(3600),
            elicitation_timeout: Duration::from_secs(300),
            approver: Approver::User,
            relay_control: true,
            headers: BTreeMap::new(),
            content_checks: ContentChecks::default(),
            allowed_templates: Vec::new(),
            require_template: false,
            transactional: false,
            max_age: None,
        }
    }
}

/// A bearer token as configured: its SHA-256, never the token.
pub type TokenHash = [u8; 32];

pub fn hash_token(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// The hash an approval binds to: the envelope and the exact bytes, as
/// stored. An approval that names another hash is refused.
pub fn approval_hash(from: &str, to: &[String], bytes: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(from.as_bytes());
    for r in to {
        h.update(b"\n");
        h.update(r.as_bytes());
    }
    h.update(b"\n\n");
    h.update(bytes);
    h.finalize().into()
}

/// An approval hash as text: 64 lowercase hexadecimal digits, as the
/// console's buttons and an approval form's request state carry it.
pub fn hash_text(h: &[u8; 32]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// The hash [`hash_text`] wrote (surrounding blanks ignored).
pub fn hash_from_text(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A `[[callers]]` entry, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct CallerSettings {
    pub name: String,
    /// `None` only for the stdio caller, which no token names.
    pub token: Option<TokenHash>,
    pub policy: Policy,
}

/// An `[[operators]]` entry: may approve and reject held messages.
#[derive(Debug, Clone, PartialEq)]
pub struct OperatorSettings {
    pub name: String,
    pub token: TokenHash,
}

/// Callers, operators, the default policy and the audit log.
#[derive(Debug, Clone, PartialEq)]
pub struct SafetySettings {
    /// The `[[callers]]`; `http.token` adds the caller `default`.
    pub callers: Vec<CallerSettings>,
    pub operators: Vec<OperatorSettings>,
    /// The caller that stdio serves (`stdio_caller`).
    pub stdio: CallerSettings,
    /// `[policy]`: what a caller without overrides gets.
    pub policy: Policy,
    pub audit: AuditSettings,
}

impl Default for SafetySettings {
    fn default() -> Self {
        SafetySettings {
            callers: Vec::new(),
            operators: Vec::new(),
            stdio: CallerSettings {
                name: "local".into(),
                token: None,
                policy: Policy::default(),
            },
            policy: Policy::default(),
            audit: AuditSettings::default(),
        }
    }
}

/// The name HTTP callers get when no token is configured at all, and the
/// name of `http.token`'s caller.
pub const DEFAULT_CALLER: &str = "default";

impl SafetySettings {
    /// The policy of the caller named `name`, as a [`Gate`] built from these
    /// settings gives it: a `[[callers]]` entry, the stdio caller, or
    /// `default` (HTTP's caller without a `[[callers]]` token of its own),
    /// which has `[policy]`.
    pub fn policy_of(&self, name: &str) -> Option<&Policy> {
        self.callers
            .iter()
            .chain(std::iter::once(&self.stdio))
            .find(|c| c.name == name)
            .map(|c| &c.policy)
            .or_else(|| (name == DEFAULT_CALLER).then_some(&self.policy))
    }
}

/// A caller at run time: its policy and its rate buckets.
#[derive(Debug)]
pub struct Caller {
    pub name: Arc<str>,
    pub policy: Policy,
    limits: Vec<(RateRule, Limiter)>,
}

/// A refusal by policy: the field at fault and the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub field: String,
    pub rule: &'static str,
    pub message: String,
    /// The content check that refused it (`content_rejected`).
    pub check: Option<String>,
}

impl Denied {
    fn new(field: impl Into<String>, rule: &'static str, message: impl Into<String>) -> Self {
        Denied {
            field: field.into(),
            rule,
            message: message.into(),
            check: None,
        }
    }
}

/// What the policy says of a message it does not refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Send,
    /// Store it for a person's approval; with the content check that held
    /// it, as the person is told (`content check "invoice" matched
    /// subject`).
    Hold(Option<String>),
}

impl Caller {
    /// Adds the policy's header fields to a call's `headers`; refused when
    /// the call sets one of them itself, in any case.
    pub fn stamp(&self, headers: &mut BTreeMap<String, String>) -> Result<(), Denied> {
        let (own, policy) = (headers.len(), self.policy.headers.len());
        let max = crate::compose::MAX_HEADER_FIELDS;
        if policy > 0 && own + policy > max {
            return Err(Denied::new(
                "headers",
                "too_many_headers",
                format!(
                    "has {own} fields and the policy of caller {:?} writes {policy}; \
                     a message holds at most {max}",
                    self.name
                ),
            ));
        }
        for (name, value) in &self.policy.headers {
            if let Some(own) = headers.keys().find(|k| k.eq_ignore_ascii_case(name)) {
                return Err(Denied::new(
                    format!("headers.{own}"),
                    "header_set_by_policy",
                    format!(
                        "{name} is written on every message of caller {:?} by its policy; \
                         leave it out",
                        self.name
                    ),
                ));
            }
            headers.insert(name.clone(), value.clone());
        }
        Ok(())
    }

    /// The policy checks, in order: mode, templates, an unsubscribe link
    /// in transactional mail, sender, relay, recipient count,
    /// size, Bcc, content checks (a `reject` refuses; a `hold` holds unless
    /// the allowlist refuses), then recipients against the allowlist (which
    /// refuses, or holds under `approval`). Recipients count the same in
    /// to, cc and bcc.
    pub fn check(
        &self,
        c: &Composed,
        relay: Option<&str>,
        dry_run: bool,
    ) -> Result<Verdict, Denied> {
        let p = &self.policy;
        if p.mode == Mode::DryRun && !dry_run {
            return Err(Denied::new(
                "dry_run",
                "dry_run_only",
                format!(
                    "caller {:?} may only preview (mode = \"dry_run\"); nothing was sent",
                    self.name
                ),
            ));
        }
        match c.template.as_deref() {
            None if p.require_template => {
                return Err(Denied::new(
                    "template",
                    "template_required",
                    format!(
                        "caller {:?} may send only the operator's templates: name one in \
                         template (get_smtp_status lists them), with its template_vars",
                        self.name
                    ),
                ));
            }
            Some(t)
                if !p.allowed_templates.is_empty()
                    && !p.allowed_templates.iter().any(|a| a == t) =>
            {
                return Err(Denied::new(
                    "template",
                    "template_not_allowed",
                    format!(
                        "caller {:?} may not send template {t:?}; allowed: {}",
                        self.name,
                        p.allowed_templates.join(", ")
                    ),
                ));
            }
            _ => {}
        }
        if p.transactional
            && let Some(field) = c.unsubscribe_link
        {
            return Err(Denied::new(
                field,
                "unsubscribe_in_transactional",
                format!(
                    "caller {:?} sends transactional mail (transactional = true), which reaches \
                     recipients who unsubscribed; a message with an unsubscribe link is mail \
                     one can leave: leave out {field}, or send it as a caller that is not \
                     transactional",
                    self.name
                ),
            ));
        }
        if !p.allowed_senders.is_empty() && !rules::allowed(&p.allowed_senders, &c.from) {
            return Err(Denied::new(
                "from_email",
                "sender_not_allowed",
                format!(
                    "{} is not among the senders caller {:?} may use{}",
                    c.from,
                    self.name,
                    routed(&c.from)
                ),
            ));
        }
        if let (Some(only), Some(relay)) = (&p.allowed_relays, relay)
            && !only.iter().any(|r| r == relay)
        {
            return Err(Denied::new(
                "relay",
                "relay_not_allowed",
                format!(
                    "caller {:?} may not use relay {relay:?}; allowed: {}",
                    self.name,
                    only.join(", ")
                ),
            ));
        }
        if let Some(max) = p.max_recipients
            && c.recipients.len() > max
        {
            let (list, i) = c.fields[max];
            return Err(Denied::new(
                format!("{list}[{i}]"),
                "too_many_recipients",
                format!(
                    "caller {:?} may send to at most {max} recipients a message (to, cc and bcc together)",
                    self.name
                ),
            ));
        }
        if let Some(max) = p.max_message_bytes
            && c.bytes.len() > max
        {
            return Err(Denied::new(
                "message",
                "too_large",
                format!(
                    "the message is {} bytes; caller {:?} may send at most {max}",
                    c.bytes.len(),
                    self.name
                ),
            ));
        }
        if !p.allow_bcc
            && let Some((list, i)) = c.fields.iter().find(|(l, _)| *l == "bcc")
        {
            return Err(Denied::new(
                format!("{list}[{i}]"),
                "bcc_not_allowed",
                format!("caller {:?} may not send Bcc", self.name),
            ));
        }
        let hit = p.content_checks.verdict(c);
        if let Some(hit) = &hit {
            crate::telemetry::content_check(&self.name, &hit.check.name, hit.check.action.as_str());
        }
        let held_for = match hit {
            Some(hit) if hit.check.action == content::Action::Reject => {
                return Err(Denied {
                    check: Some(hit.check.name.clone()),
                    ..Denied::new(
                        hit.field.clone(),
                        "content_rejected",
                        format!(
                            "{} matches content check {:?} of caller {:?}",
                            hit.field, hit.check.name, self.name
                        ),
                    )
                });
            }
            Some(hit) => Some(hit),
            None => None,
        };
        let outside = if p.allowed_recipients.is_empty() {
            None
        } else {
            c.recipients
                .iter()
                .zip(&c.fields)
                .find(|(a, _)| !rules::allowed(&p.allowed_recipients, a))
        };
        // Replies go to Reply-To: an address there is one the recipients
        // will mail, so it must be one the caller may mail, or one of its
        // own senders. Otherwise an agent allowed only inside could ask a
        // colleague a question and have the answer go outside.
        let reply_outside = c.reply_to.as_ref().filter(|a| {
            !p.allowed_recipients.is_empty()
                && !rules::allowed(&p.allowed_recipients, a)
                && !AsRef::<str>::as_ref(*a).eq_ignore_ascii_case(c.from.as_ref())
                && (p.allowed_senders.is_empty() || !rules::allowed(&p.allowed_senders, a))
        });
        let verdict = match (p.approval, outside, reply_outside) {
            (Approval::Always, _, _)
            | (Approval::OutsideAllowlist, Some(_), _)
            | (Approval::OutsideAllowlist, _, Some(_)) => Ok(Verdict::Hold(None)),
            (Approval::Never, Some((address, (list, i))), _) => Err(Denied::new(
                format!("{list}[{i}]"),
                "recipient_not_allowed",
                format!(
                    "{address} is not among the recipients caller {:?} may mail{}",
                    self.name,
                    routed(address)
                ),
            )),
            (Approval::Never, None, Some(address)) => Err(Denied::new(
                "reply_to",
                "reply_to_not_allowed",
                format!(
                    "{address} is not among the recipients caller {:?} may mail, nor its own \
                     address: replies would go there{}",
                    self.name,
                    routed(address)
                ),
            )),
            _ => Ok(Verdict::Send),
        }?;
        if let Some(hit) = held_for {
            tracing::info!(
                caller = %self.name,
                check = %hit.check.name,
                field = %hit.field,
                "a content check holds the message for a person's approval"
            );
            return Ok(Verdict::Hold(Some(format!(
                "content check {:?} matched {}",
                hit.check.name, hit.field
            ))));
        }
        Ok(verdict)
    }

    /// Whether the caller has any rate limit.
    pub fn has_rate(&self) -> bool {
        !self.limits.is_empty()
    }

    /// Takes the message to `recipients` (its envelope) from the caller's
    /// rate limits.
    pub fn take_rate(&self, recipients: &[&str]) -> Result<(), Limited> {
        if self.limits.is_empty() {
            return Ok(());
        }
        rate::take(&self.limits, &self.name, recipients)
    }

    /// What the message to `recipients` takes from the caller's rate limits
    /// when they are kept in a store the daemons share.
    pub fn shared_rate(&self, recipients: &[&str]) -> Result<rate::Shared, Limited> {
        rate::shared(&self.limits, &self.name, recipients)
    }

    /// The relays this caller's messages may take, for routing.
    pub fn relays(&self) -> Option<Arc<[String]>> {
        self.policy
            .allowed_relays
            .as_ref()
            .map(|r| Arc::from(r.as_slice()))
    }
}

/// Resolves tokens to callers and operators. Built from the settings at
/// start and on reload; a reload keeps the buckets of unchanged limits.
#[derive(Debug)]
pub struct Gate {
    by_token: Vec<(TokenHash, Arc<Caller>)>,
    /// HTTP's caller when no token is configured at all.
    open: Option<Arc<Caller>>,
    stdio: Arc<Caller>,
    operators: Vec<(TokenHash, String)>,
    limiters: HashMap<RateRule, Limiter>,
}

impl Gate {
    /// `http_token` (`http.token`) is the token of the caller `default`,
    /// which has the default policy.
    pub fn new(s: &SafetySettings, http_token: Option<&str>, before: Option<&Gate>) -> Gate {
        let mut limiters: HashMap<RateRule, Limiter> = HashMap::new();
        let mut caller = |c: &CallerSettings| {
            let mut limits: Vec<(RateRule, Limiter)> = c
                .policy
                .rate
                .iter()
                .map(|rule| {
                    let l = limiters
                        .entry(rule.clone())
                        .or_insert_with(|| {
                            before
                                .and_then(|b| b.limiters.get(rule).cloned())
                                .unwrap_or_else(|| rate::limiter(rule))
                        })
                        .clone();
                    (rule.clone(), l)
                })
                .collect();
            // Shortest period first: the limit that refuses most often takes
            // nothing from the others (governor has no refund), and when a
            // longer one refuses, what the shorter ones counted refills long
            // before the longer one has room.
            limits.sort_by_key(|(rule, _)| rule.period);
            Arc::new(Caller {
                name: Arc::from(c.name.as_str()),
                policy: c.policy.clone(),
                limits,
            })
        };
        let mut by_token: Vec<(TokenHash, Arc<Caller>)> = s
            .callers
            .iter()
            .filter_map(|c| Some((c.token?, caller(c))))
            .collect();
        if let Some(t) = http_token {
            let default = CallerSettings {
                name: DEFAULT_CALLER.into(),
                token: Some(hash_token(t)),
                policy: s.policy.clone(),
            };
            by_token.push((hash_token(t), caller(&default)));
        }
        let open = by_token.is_empty().then(|| {
            caller(&CallerSettings {
                name: DEFAULT_CALLER.into(),
                token: None,
                policy: s.policy.clone(),
            })
        });
        let stdio = caller(&s.stdio);
        Gate {
            by_token,
            open,
            stdio,
            operators: s
                .operators
                .iter()
                .map(|o| (o.token, o.name.clone()))
                .collect(),
            limiters,
        }
    }

    /// The caller a bearer token names over HTTP; without any configured
    /// token, every request is the caller `default`. `None`: refuse (401).
    pub fn http_caller(&self, bearer: Option<&str>) -> Option<Arc<Caller>> {
        if let Some(open) = &self.open {
            return Some(open.clone());
        }
        let given = hash_token(bearer?);
        // Every entry is compared, in constant time each.
        let mut found = None;
        for (hash, caller) in &self.by_token {
            if bool::from(hash.ct_eq(&given)) {
                found = Some(caller.clone());
            }
        }
        found
    }

    pub fn stdio_caller(&self) -> Arc<Caller> {
        self.stdio.clone()
    }

    /// The operator a bearer token names.
    pub fn operator(&self, bearer: Option<&str>) -> Option<String> {
        self.operator_by_hash(&hash_token(bearer?))
    }

    /// The operator whose token has this hash (a console session keeps the
    /// hash, so that a reload that drops or changes the token ends it).
    pub fn operator_by_hash(&self, given: &TokenHash) -> Option<String> {
        let mut found = None;
        for (hash, name) in &self.operators {
            if bool::from(hash.ct_eq(given)) {
                found = Some(name.clone());
            }
        }
        found
    }

    /// Every caller: HTTP's, then stdio's.
    fn callers(&self) -> impl Iterator<Item = &Arc<Caller>> {
        self.by_token
            .iter()
            .map(|(_, c)| c)
            .chain(self.open.iter())
            .chain(std::iter::once(&self.stdio))
    }

    /// Every caller's name and policy.
    pub fn policies(&self) -> impl Iterator<Item = (&str, &Policy)> {
        self.callers().map(|c| (&*c.name, &c.policy))
    }

    /// Whether some HTTP caller (or stdio's) may mail anyone.
    pub fn open_recipients(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .callers()
            .filter(|c| {
                c.policy.allowed_recipients.is_empty() && c.policy.approval != Approval::Always
            })
            .map(|c| c.name.to_string())
            .collect();
        names.dedup();
        names
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{CallerSettings, DEFAULT_CALLER, Policy, SafetySettings};

    /// `SafetySettings::policy_of` names the policies a gate gives: a
    /// configured caller's, stdio's, and `[policy]` for `default`.
    #[test]
    fn each_callers_policy_is_found_by_name() {
        let with = |max_age| Policy {
            max_age: Some(Duration::from_secs(max_age)),
            ..Policy::default()
        };
        let s = SafetySettings {
            callers: vec![CallerSettings {
                name: "alpha".into(),
                token: None,
                policy: with(60),
            }],
            policy: with(120),
            ..SafetySettings::default()
        };
        let max_age = |name| s.policy_of(name).and_then(|p| p.max_age);
        assert_eq!(max_age("alpha"), Some(Duration::from_secs(60)));
        assert_eq!(max_age(DEFAULT_CALLER), Some(Duration::from_secs(120)));
        assert_eq!(max_age("local"), None);
        assert!(s.policy_of("local").is_some());
        assert!(s.policy_of("nobody").is_none());
    }
}
