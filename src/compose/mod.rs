//! Message composition: turns a send request into a validated envelope and the
//! exact bytes to deliver.
//!
//! Everything is checked here before lettre's builder sees it (lettre panics
//! on CR or LF in a display name). Every error names the field and the rule.
//! This module never sends anything and never touches the network.

mod address;
pub(crate) mod attach;
mod custom;
pub mod dkim;
mod header;
pub mod labels;
pub mod named;
mod qp;
pub(crate) mod template;
#[cfg(test)]
mod tests;
mod unsubscribe;

pub use attach::Shared as SharedAttachments;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::SystemTime;

use lettre::Message;
use lettre::address::Envelope;
use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::message::{Attachment, Body, Mailbox, MultiPart, SinglePart};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Recipients as an array of addresses or one comma-separated string. An
/// address may carry a display name: `Ada Lovelace <ada@example.org>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Recipients {
    List(Vec<String>),
    Csv(String),
}

impl Default for Recipients {
    fn default() -> Self {
        Recipients::List(Vec::new())
    }
}

/// Links for the `List-Unsubscribe` field: one link, or an array of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Links {
    One(String),
    Many(Vec<String>),
}

impl Links {
    fn as_slice(&self) -> &[String] {
        match self {
            Links::One(l) => std::slice::from_ref(l),
            Links::Many(l) => l,
        }
    }
}

/// One attachment: inline base64 content, or a path inside the configured
/// attachments directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum AttachmentInput {
    Inline {
        /// The file name shown to the recipient.
        filename: String,
        /// The content, base64-encoded (standard alphabet, padding optional).
        content_base64: String,
        /// MIME type; guessed from the file name when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content_type: Option<String>,
        /// Shown inside the HTML body, which refers to it as `cid:ID`
        /// (`<img src="cid:logo">`), rather than attached.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content_id: Option<String>,
    },
    Path {
        /// A path relative to the configured attachments directory.
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content_type: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content_id: Option<String>,
    },
}

impl AttachmentInput {
    /// The keys an attachment object may have.
    pub const FIELDS: &[&str] = &[
        "filename",
        "content_base64",
        "path",
        "content_type",
        "content_id",
    ];
}

/// What the caller asks to send: the content of a `send_email` call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Draft {
    /// Primary recipients.
    #[serde(default)]
    pub to: Recipients,
    /// Carbon-copy recipients.
    #[serde(default)]
    pub cc: Recipients,
    /// Blind-copy recipients: in the envelope, never in the headers.
    #[serde(default)]
    pub bcc: Recipients,
    /// A template the operator configured (`get_smtp_status` lists them):
    /// it writes the subject and the bodies, filled with `template_vars`;
    /// leave `subject`, `body` and `html_body` out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// The subject line. Non-ASCII is encoded.
    #[serde(default)]
    pub subject: String,
    /// The body: plain text, or HTML when `html` is true.
    #[serde(default)]
    pub body: String,
    /// The body is HTML.
    #[serde(default)]
    pub html: bool,
    /// An HTML alternative sent beside the text `body` (multipart/alternative).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html_body: Option<String>,
    /// Sender address; defaults to the configured sender.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_email: Option<String>,
    /// Where replies go (the `Reply-To` header), if not to the sender.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Message-ID this message replies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_reply_to: Option<String>,
    /// Message-IDs of the thread, space-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub references: Option<String>,
    /// Files to attach: each `{filename, content_base64, content_type?}`, or
    /// `{path, content_type?}` inside the configured attachments directory;
    /// with `content_id`, an image the HTML body shows (`cid:ID`).
    #[serde(default)]
    pub attachments: Vec<AttachmentInput>,
    /// Where a recipient unsubscribes, for the `List-Unsubscribe` header
    /// (RFC 2369): an `https:` or `mailto:` link, or an array of up to 4.
    /// `template_vars` apply, so each message of a batch can carry its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list_unsubscribe: Option<Links>,
    /// One-click unsubscribe (RFC 8058): adds `List-Unsubscribe-Post`, which
    /// tells mailbox providers that the https: link takes a POST. Needs an
    /// https: link in `list_unsubscribe`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub list_unsubscribe_post: bool,
    /// A one-click unsubscribe link that the daemon serves itself (needs
    /// its `[unsubscribe]` configuration, and one recipient): first in
    /// `List-Unsubscribe`, with `List-Unsubscribe-Post`, and `{unsubscribe_url}`
    /// in the subject, bodies and header values. A recipient who follows
    /// it goes on the suppression list.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unsubscribe: bool,
    /// Header fields of the caller's own, by name: any `X-` field, and
    /// `Auto-Submitted`, `Precedence`, `List-ID`, `Feedback-ID`, `Keywords`,
    /// `Comments`, `Organization` and `Importance`. At most 20; each value
    /// one line of at most 900 bytes, `template_vars` applied; a field whose
    /// value renders empty (or to whitespace alone) is left out.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Values for `{name}` and `{?name}…{/name}` in subject and bodies, each a
    /// string (write `42` as `"42"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_vars: Option<BTreeMap<String, String>>,
    /// A label of your own for what the message belongs to (a campaign, a
    /// ticket): `list_messages` filters by it. 1 to 100 characters, one
    /// line. Not sent to the recipients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Names and values of your own (a customer id, an order number), kept
    /// with the message and shown with its status and in the notification
    /// webhook's posts: up to 20 names of letters, digits, `_`, `-` and `.`,
    /// each value one line of up to 500 characters. Not sent to the
    /// recipients; never put a secret here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// `high` for mail a person waits for (a one-time code, a password
    /// reset): it takes a relay's next turn of its rate and next free
    /// connection before `normal` mail (a mail merge). Default `normal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<PriorityParam>,
    /// When the message is to go out (`send_at`), for its `Date` header; now
    /// when unset or past. Not a parameter: the tools set it.
    #[serde(skip)]
    #[schemars(skip)]
    pub send_at: Option<SystemTime>,
}

/// A message's `priority`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PriorityParam {
    High,
    Normal,
}

impl From<PriorityParam> for mailmux_actors::Priority {
    fn from(p: PriorityParam) -> Self {
        match p {
            PriorityParam::High => mailmux_actors::Priority::High,
            PriorityParam::Normal => mailmux_actors::Priority::Normal,
        }
    }
}

impl Draft {
    /// The draft with its shorthand forms written out, for the content hash
    /// of an idempotency key: a comma-separated string of addresses as the
    /// array of its entries, one link as an array of one, an empty array of
    /// links as none, `"priority": "normal"` as no priority. So a retry
    /// that writes `"to": "a@x.org"` as `["a@x.org"]` is the same content.
    /// `None` when the draft has no shorthand, so that the hash of a draft
    /// in the long forms is the one earlier builds stored.
    pub fn written_out(&self) -> Option<Draft> {
        let csv = |r: &Recipients| matches!(r, Recipients::Csv(_));
        let short_links = match &self.list_unsubscribe {
            Some(Links::One(_)) => true,
            Some(Links::Many(v)) => v.is_empty(),
            None => false,
        };
        let normal = self.priority == Some(PriorityParam::Normal);
        if !(csv(&self.to) || csv(&self.cc) || csv(&self.bcc) || short_links || normal) {
            return None;
        }
        let mut d = self.clone();
        if normal {
            d.priority = None;
        }
        for r in [&mut d.to, &mut d.cc, &mut d.bcc] {
            if let Recipients::Csv(s) = r {
                let entries = address::split_list(s).into_iter().map(str::to_owned);
                *r = Recipients::List(entries.collect());
            }
        }
        d.list_unsubscribe = match d.list_unsubscribe.take() {
            Some(Links::One(link)) => Some(Links::Many(vec![link])),
            Some(Links::Many(v)) if v.is_empty() => None,
            links => links,
        };
        Some(d)
    }
}

/// The rules composition enforces, from configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ComposePolicy {
    /// Sender when the draft names none.
    pub default_from: Option<String>,
    /// Senders a draft may use: exact addresses or `@domain`. Empty: any.
    pub allowed_senders: Vec<String>,
    /// Recipients per message, to, cc and bcc together.
    pub max_recipients: usize,
    /// Whole message after encoding, in bytes.
    pub max_message_bytes: usize,
    /// One attachment, decoded, in bytes.
    pub max_attachment_bytes: usize,
    /// Attachments by path are allowed only inside this directory.
    pub attachments_dir: Option<PathBuf>,
    /// Domain for generated Message-IDs.
    pub message_id_domain: String,
    /// The `[[dkim]]` keys that sign each message from their domains.
    pub dkim: dkim::Signers,
    /// `[unsubscribe]`: the one-click links the daemon serves.
    pub one_click: Option<crate::suppress::OneClick>,
    /// `[[templates]]`: what a draft's `template` names.
    pub templates: named::Templates,
}

impl Default for ComposePolicy {
    fn default() -> Self {
        Self {
            default_from: None,
            allowed_senders: Vec::new(),
            max_recipients: 100,
            max_message_bytes: 10 * 1024 * 1024,
            max_attachment_bytes: 7 * 1024 * 1024,
            attachments_dir: None,
            message_id_domain: "mailmux.localhost".into(),
            dkim: dkim::Signers::default(),
            one_click: None,
            templates: named::Templates::default(),
        }
    }
}

/// An input error: which field, which rule, and a sentence for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ComposeError {
    /// The parameter at fault, e.g. `to[2]`, `attachments[0].filename`.
    pub field: String,
    /// A stable rule code, e.g. `header_injection`, `invalid_address`,
    /// `too_many_recipients`, `too_large`, `missing_template_vars`.
    pub rule: &'static str,
    pub message: String,
}

impl ComposeError {
    /// An error for `field` breaking `rule`.
    pub fn new(field: impl Into<String>, rule: &'static str, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            rule,
            message: message.into(),
        }
    }
}

/// An attachment as it went into the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct AttachmentSummary {
    pub filename: String,
    pub content_type: String,
    /// Decoded size in bytes.
    pub size: usize,
    /// Shown in the HTML body (`cid:ID`) rather than attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_id: Option<String>,
}

/// Input above this many bytes makes composing a draft slow enough (decoding,
/// encoding, copying: about a millisecond per 256 KiB in a release build) to
/// be kept off the async workers.
const HEAVY_INPUT_BYTES: usize = 256 * 1024;

impl Draft {
    /// Whether composing this draft should run on a blocking thread: it
    /// reads files (attachments by path), or its text and attachments are
    /// large. Small drafts compose in microseconds, less than a thread hop.
    pub fn is_heavy(&self) -> bool {
        self.is_heavy_with(0)
    }

    /// Whether an attachment of its own is a zip or a gzip, by the first
    /// bytes its base64 encodes: content checks unpack such a one, which
    /// may take milliseconds (an attachment by path is heavy anyway).
    pub fn has_archive(&self) -> bool {
        self.attachments.iter().any(|a| match a {
            AttachmentInput::Inline { content_base64, .. } => {
                attach::starts_as_archive(content_base64)
            }
            AttachmentInput::Path { .. } => false,
        })
    }

    /// [`Draft::is_heavy`], with `shared` bytes of attachments it gets from
    /// elsewhere (a batch's defaults).
    pub fn is_heavy_with(&self, shared: usize) -> bool {
        let mut bytes = shared + self.body.len() + self.html_body.as_ref().map_or(0, String::len);
        for a in &self.attachments {
            match a {
                AttachmentInput::Inline { content_base64, .. } => bytes += content_base64.len(),
                AttachmentInput::Path { .. } => return true,
            }
        }
        bytes > HEAVY_INPUT_BYTES
    }
}

/// The rendered message, for `dry_run` and logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct Preview {
    /// Header name and value, in order, as sent (Bcc never appears).
    pub headers: Vec<(String, String)>,
    pub text: Option<String>,
    pub html: Option<String>,
    pub attachments: Vec<AttachmentSummary>,
    /// Size of the encoded message in bytes.
    pub total_bytes: usize,
}

/// A validated, rendered message.
#[derive(Debug, Clone)]
pub struct Composed {
    /// Without angle brackets.
    pub message_id: String,
    pub from: lettre::Address,
    /// The sender's display name, as the recipients will see it.
    pub from_name: Option<String>,
    /// to, cc and bcc, de-duplicated.
    pub recipients: Vec<lettre::Address>,
    /// Where each of `recipients` was given: (`to`|`cc`|`bcc`, index).
    pub fields: Vec<(&'static str, usize)>,
    /// The `Reply-To` address: where the recipients' replies go.
    pub reply_to: Option<lettre::Address>,
    /// The subject as rendered.
    pub subject: String,
    /// The configured template it was written from, if any.
    pub template: Option<String>,
    /// The parameter that gave it an unsubscribe link (`unsubscribe` for
    /// the daemon's own, else `list_unsubscribe`), if any.
    pub unsubscribe_link: Option<&'static str>,
    /// The caller's labels of it ([`labels`]): stored with it, not sent.
    pub tag: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub priority: mailmux_actors::Priority,
    /// CRLF line endings throughout.
    pub bytes: Vec<u8>,
    /// The parts as rendered, for [`Composed::preview`].
    pub(crate) text: Option<String>,
    pub(crate) html: Option<String>,
    pub(crate) attachments: Vec<AttachmentSummary>,
    /// The fields the caller wrote by name (`List-Unsubscribe`, its
    /// one-click field, and `headers`), with their values as rendered, for
    /// the approval prompt.
    pub own_fields: Vec<(String, String)>,
    /// What [`compose_scanned`]'s scan found in each attachment's decoded
    /// bytes, in the order of `attachments`; empty when nothing scanned.
    pub(crate) scanned: Vec<Vec<usize>>,
    /// For [`compose_scanned`] only: the other text the recipients see that
    /// the caller wrote, by field: display names (`from_email`, `to[0]`,
    /// `cc[1]`, `reply_to`) and the `in_reply_to` and `references` ids.
    pub(crate) phrases: Vec<(String, String)>,
}

impl Composed {
    /// The rendered message, for a dry run. Built on demand: a real send
    /// needs only the bytes.
    pub fn preview(&self) -> Preview {
        Preview {
            headers: header_fields(&self.bytes),
            text: self.text.clone(),
            html: self.html.clone(),
            attachments: self.attachments.clone(),
            total_bytes: self.bytes.len(),
        }
    }
}

/// Longest subject in bytes after template substitution. lettre folds at
/// spaces only, so one long word must still fit a 998-byte line with the
/// `Subject: ` prefix.
const MAX_SUBJECT: usize = 900;

/// Validates and renders a draft.
///
/// The rules, in the order they are checked (the first broken rule is
/// reported, with the field and a stable rule code):
///
/// - Header fields (recipients, subject, `from_email`, `reply_to`,
///   `in_reply_to`, `references`, attachment file names, paths and content
///   types) must not contain CR, LF or NUL (`header_injection`) or other
///   ASCII controls except TAB (`control_character`).
/// - The sender is `from_email`, else `policy.default_from`
///   (`missing_sender`), and must match `policy.allowed_senders` when that is
///   not empty (`sender_not_allowed`).
/// - Recipients are parsed with lettre (`invalid_address`), de-duplicated on
///   the exact local part and the lowercased domain (the first occurrence
///   wins, to before cc before bcc), at least one is required
///   (`no_recipients`) and at most `policy.max_recipients` distinct ones
///   (`too_many_recipients`). Bcc recipients are in the envelope only, never
///   in a header.
/// - Non-ASCII subjects and display names are RFC 2047-encoded. A non-ASCII
///   address (UTF-8 local part or domain) is accepted here and written as
///   UTF-8 (RFC 6532); whether it can be delivered depends on the relay
///   supporting SMTPUTF8, which the delivery layer checks.
/// - `template_vars`, when present, is applied to the subject, `body`,
///   `html_body`, each `list_unsubscribe` link and each `headers` value
///   (see [the template rules](#templates)).
/// - `list_unsubscribe`: at most 4 links (`too_many_links`), each an
///   `https:` link with a host or a `mailto:` link with one address
///   (`unsupported_uri_scheme`, `invalid_uri`) of the characters RFC 3986
///   allows unencoded (`invalid_uri`: no space, `<>"\{}|^` or a backtick,
///   nothing outside ASCII; a `{name}` left unrendered), at most 900 bytes
///   (`too_long`); `list_unsubscribe_post` needs an `https:` one
///   (`one_click_needs_https`).
/// - `headers`: at most 20 fields (`too_many_headers`), each named `X-…` or
///   one of `Auto-Submitted`, `Precedence`, `List-ID`, `Feedback-ID`,
///   `Keywords`, `Comments`, `Organization`, `Importance`
///   (`header_not_allowed`; `invalid_header_name` for a name that is not 1
///   to 76 printable ASCII characters without `:`), no two differing only
///   in case (`duplicate_header`); each value, rendered, one line
///   (`header_injection`, `control_character`) of at most 900 bytes
///   (`too_long`), printable ASCII for the standard fields
///   (`invalid_header_value`). Non-ASCII in an `X-` field is RFC
///   2047-encoded. A field whose value renders empty, or to whitespace
///   alone, is left out.
/// - Bodies get CRLF line endings (bare LF and bare CR become CRLF) so that
///   the SMTP layer's dot-stuffing sees every line; lettre picks 7bit,
///   quoted-printable or base64 so that lines stay short. A body containing
///   NUL is sent base64-encoded.
/// - Attachments: see [`AttachmentInput`]; inline content must be base64
///   (`invalid_base64`), at most `policy.max_attachment_bytes` decoded
///   (`attachment_too_large`, checked from the encoded length before
///   decoding); paths need `policy.attachments_dir`
///   (`attachments_by_path_disabled`), must stay inside it
///   (`path_outside_attachments_dir`) and name a regular file
///   (`not_a_regular_file`).
/// - The encoded message must fit `policy.max_message_bytes` (`too_large`):
///   estimated before building, measured after.
///
/// # Templates
///
/// `{name}` is replaced by the value of `name`; `{?name}…{/name}` keeps its
/// content only when `name` is given and not empty (blocks nest). Names are
/// ASCII letters, digits and `_`. A variable used outside a dropped block but
/// not given is an error (`missing_template_vars`, listing every missing
/// name); an unclosed or mismatched block is `template_syntax`. Any other
/// brace (`{{`, `{ x }`, `{}`, a lone `{`) is left as written, and values are
/// never re-scanned, so a literal `{name}` can be produced by passing
/// `"{name}"` as a value. Values are HTML-escaped in `html_body` and in
/// `body` when `html` is true, raw elsewhere. Without `template_vars`, braces
/// are not touched at all.
pub fn compose(draft: &Draft, policy: &ComposePolicy) -> Result<Composed, ComposeError> {
    compose_with(draft, policy, None)
}

/// [`compose`], with `shared` as the attachments of a draft that has none of
/// its own (a `send_batch`'s `defaults`, decoded once for every message).
pub fn compose_with(
    draft: &Draft,
    policy: &ComposePolicy,
    shared: Option<&SharedAttachments>,
) -> Result<Composed, ComposeError> {
    compose_inner(draft, policy, shared, None)
}

/// What a scan of an attachment's decoded bytes found (the caller's
/// content checks: `crate::policy::content`).
pub type Scan<'a> = &'a (dyn Fn(&[u8]) -> Vec<usize> + Sync);

/// [`compose_with`], with `scan` run over each attachment's decoded bytes
/// while they are at hand; its answers are kept in the [`Composed`].
pub fn compose_scanned(
    draft: &Draft,
    policy: &ComposePolicy,
    shared: Option<&SharedAttachments>,
    scan: Scan<'_>,
) -> Result<Composed, ComposeError> {
    compose_inner(draft, policy, shared, Some(scan))
}

fn compose_inner(
    draft: &Draft,
    policy: &ComposePolicy,
    shared: Option<&SharedAttachments>,
    scan: Option<Scan<'_>>,
) -> Result<Composed, ComposeError> {
    labels::check(draft.tag.as_deref(), &draft.metadata)?;
    let texts = named::texts(draft, &policy.templates)?;
    address::check_header_value("subject", texts.subject)?;
    let from = address::resolve_sender(draft.from_email.as_deref(), policy)?;
    let recipients =
        address::parse_recipients(&draft.to, &draft.cc, &draft.bcc, policy.max_recipients)?;
    let reply_to = draft
        .reply_to
        .as_deref()
        .map(|r| address::parse_mailbox("reply_to", r))
        .transpose()?;
    let in_reply_to = draft
        .in_reply_to
        .as_deref()
        .map(address::in_reply_to)
        .transpose()?;
    let references = draft
        .references
        .as_deref()
        .map(address::references)
        .transpose()?;
    let id_domain = message_id_domain(&policy.message_id_domain)?;
    if texts.html && texts.html_body.is_some() {
        return Err(ComposeError::new(
            "html_body",
            "conflicting_fields",
            "html_body is the HTML alternative to a text body; with html=true the body \
             is already HTML: send one or the other",
        ));
    }

    // The one-click link, as the variable `unsubscribe_url` beside the
    // caller's own (which it overrides).
    let one_click = one_click_link(draft, policy, &recipients)?;
    // A template's texts are always rendered, with no variables if none
    // were given.
    let vars = match (&one_click, &draft.template_vars, texts.template) {
        (Some(link), _, _) => {
            let mut vars = draft.template_vars.clone().unwrap_or_default();
            vars.insert(ONE_CLICK_VAR.into(), link.clone());
            Some(std::borrow::Cow::Owned(vars))
        }
        (None, Some(vars), _) => Some(std::borrow::Cow::Borrowed(vars)),
        (None, None, Some(_)) => Some(std::borrow::Cow::Owned(BTreeMap::new())),
        (None, None, None) => None,
    };
    let mut rendered = render(draft, &texts, vars.as_deref(), policy.max_message_bytes)?;
    let one_click_post = one_click.is_some();
    let unsubscribe_link = if one_click_post {
        Some("unsubscribe")
    } else {
        (!rendered.list_unsubscribe.is_empty()).then_some("list_unsubscribe")
    };
    if let Some(link) = one_click {
        rendered.list_unsubscribe.insert(0, link);
    }
    if rendered.subject.len() > MAX_SUBJECT {
        return Err(ComposeError::new(
            "subject",
            "too_long",
            format!("is longer than {MAX_SUBJECT} bytes"),
        ));
    }

    let unsubscribe = unsubscribe::fields(
        &rendered.list_unsubscribe,
        draft.list_unsubscribe_post || one_click_post,
    )?;
    let custom = custom::fields(&rendered.headers)?;

    let mut estimate = rendered.subject.len()
        + rendered.headers.values().map(String::len).sum::<usize>()
        + rendered.body.len()
        + rendered.html_body.as_ref().map_or(0, String::len);
    if estimate > policy.max_message_bytes {
        let html_len = rendered.html_body.as_ref().map_or(0, String::len);
        let field = if html_len > rendered.body.len() {
            "html_body"
        } else {
            "body"
        };
        return Err(too_large(field, policy.max_message_bytes));
    }
    let own = draft
        .attachments
        .iter()
        .enumerate()
        .map(|(i, input)| attach::load(i, input, policy, &mut estimate))
        .collect::<Result<Vec<_>, _>>()?;
    let shared_set = shared.filter(|_| draft.attachments.is_empty());
    let shared = shared_set.map_or(&[][..], |s| s.loaded());
    for (i, a) in shared.iter().enumerate() {
        attach::grow_estimate(i, &mut estimate, a.data.len(), policy)?;
    }
    // A template's images come last, after the call's own attachments.
    let images = texts.template.map_or(&[][..], |t| t.images.as_slice());
    for (i, a) in images.iter().enumerate() {
        attach::grow_estimate(
            own.len() + shared.len() + i,
            &mut estimate,
            a.data.len(),
            policy,
        )?;
    }
    let attachments: Vec<&attach::Loaded> = own.iter().chain(shared).chain(images).collect();
    let html_text = if texts.html {
        Some(rendered.body.as_str())
    } else {
        rendered.html_body.as_deref()
    };
    let html_field = if texts.template.is_some() {
        "template"
    } else if texts.html {
        "body"
    } else {
        "html_body"
    };
    attach::check_inline(
        &attachments,
        html_text,
        html_field,
        own.len() + shared.len(),
    )?;
    let (inline, attached): (Vec<&attach::Loaded>, Vec<&attach::Loaded>) =
        attachments.iter().partition(|a| a.content_id.is_some());
    // A batch's shared attachments are scanned once for all its messages
    // (a message that has them has none of its own).
    let scanned = match (scan, shared_set) {
        (None, _) => Vec::new(),
        (Some(scan), Some(s)) => s.scanned_with(scan).to_vec(),
        (Some(scan), None) => own.iter().map(|a| scan(&a.data)).collect(),
    };
    let phrases = match scan {
        Some(_) => phrases(draft, &from, &recipients, reply_to.as_ref()),
        None => Vec::new(),
    };

    let message_id = format!("{}@{id_domain}", local_part());
    let envelope = Envelope::new(Some(from.email.clone()), recipients.envelope())
        .map_err(|_| ComposeError::new("to", "no_recipients", "no recipient for the envelope"))?;

    // The fields a caller writes, encoded by `header` rather than by lettre.
    let mut builder = Message::builder();
    for field in header::fields(
        &rendered.subject,
        &from,
        reply_to.as_ref(),
        &recipients.to,
        &recipients.cc,
    ) {
        builder = builder.raw_header(field);
    }
    builder = builder
        .date(
            draft
                .send_at
                .map_or_else(SystemTime::now, |at| at.max(SystemTime::now())),
        )
        .message_id(Some(format!("<{message_id}>")));
    if let Some(id) = in_reply_to {
        builder = builder.in_reply_to(id);
    }
    if let Some(ids) = references {
        builder = builder.references(ids);
    }
    for field in unsubscribe.into_iter().chain(custom) {
        builder = builder.raw_header(field);
    }
    // An explicit envelope: Bcc is never given to the header builder at all.
    builder = builder.envelope(envelope);

    let body = body_part(texts.html, &rendered, &inline);
    let built = if attached.is_empty() {
        match body {
            BodyPart::Single(part) => builder.singlepart(part),
            BodyPart::Multi(part) => builder.multipart(part),
        }
    } else {
        let mut mixed = match body {
            BodyPart::Single(part) => MultiPart::mixed().singlepart(part),
            BodyPart::Multi(part) => MultiPart::mixed().multipart(part),
        };
        for a in &attached {
            mixed = mixed.singlepart(attachment_part(a));
        }
        builder.multipart(mixed)
    };
    let message = built.map_err(|e| {
        ComposeError::new("message", "build_failed", format!("cannot be built: {e}"))
    })?;
    let bytes = policy
        .dkim
        .sign(from.email.domain(), message.formatted())
        .map_err(|why| ComposeError::new("message", dkim::SIGNING_FAILED, why))?;
    if bytes.len() > policy.max_message_bytes {
        return Err(too_large("message", policy.max_message_bytes));
    }

    let mut own_fields: Vec<(String, String)> = unsubscribe::shown(
        &rendered.list_unsubscribe,
        draft.list_unsubscribe_post || one_click_post,
    )
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value))
    .collect();
    own_fields.extend(
        rendered
            .headers
            .into_iter()
            .filter(|(_, v)| !custom::left_out(v)),
    );
    let template = texts.template.map(|t| t.name.clone());
    let (text, html) = if texts.html {
        (None, Some(rendered.body))
    } else {
        (Some(rendered.body), rendered.html_body)
    };
    let attachments = attachments
        .iter()
        .map(|a| AttachmentSummary {
            filename: a.filename.clone(),
            content_type: a.content_type_name.clone(),
            size: a.data.len(),
            content_id: a.content_id.clone(),
        })
        .collect();
    Ok(Composed {
        message_id,
        from_name: from.name.clone(),
        from: from.email,
        recipients: recipients.envelope(),
        fields: recipients.fields,
        reply_to: reply_to.map(|m| m.email),
        subject: rendered.subject,
        template,
        unsubscribe_link,
        tag: draft.tag.clone(),
        metadata: draft.metadata.clone(),
        priority: draft.priority.map(Into::into).unwrap_or_default(),
        bytes,
        text,
        html,
        attachments,
        own_fields,
        scanned,
        phrases,
    })
}

/// The display names and ids a caller wrote that the recipients see, by
/// field (Bcc's names are not sent).
fn phrases(
    draft: &Draft,
    from: &Mailbox,
    recipients: &address::RecipientSet,
    reply_to: Option<&Mailbox>,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(name) = &from.name {
        out.push(("from_email".to_owned(), name.clone()));
    }
    let shown = recipients.to.iter().chain(&recipients.cc);
    for (m, (list, i)) in shown.zip(&recipients.fields) {
        if let Some(name) = &m.name {
            out.push((format!("{list}[{i}]"), name.clone()));
        }
    }
    if let Some(name) = reply_to.and_then(|m| m.name.as_ref()) {
        out.push(("reply_to".to_owned(), name.clone()));
    }
    for (field, ids) in [
        ("in_reply_to", &draft.in_reply_to),
        ("references", &draft.references),
    ] {
        if let Some(ids) = ids {
            out.push((field.to_owned(), ids.clone()));
        }
    }
    out
}

fn too_large(field: &str, max: usize) -> ComposeError {
    ComposeError::new(
        field,
        "too_large",
        format!("the message would exceed {max} bytes once encoded"),
    )
}

/// A Message-ID's local part: 32 hex digits, the milliseconds since the
/// epoch in the first 12 and 80 random bits after them. Ids made later sort
/// later, so the queue's unique index on them (SQLite's and PostgreSQL's
/// B-trees) grows at its end instead of taking each new id on a random page;
/// 80 random bits keep ids made in the same millisecond apart.
fn local_part() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let time = ms & ((1 << 48) - 1);
    let random = rand::random::<u128>() >> 48;
    format!("{:032x}", (time << 80) | random)
}

/// The most fields `headers` may hold, a caller's policy's included.
pub const MAX_HEADER_FIELDS: usize = custom::MAX_FIELDS;

/// Whether a field of this name is one a caller writes by name: an `X-`
/// field, one of the standard ones `headers` takes, or the unsubscribe
/// fields. The console shows these apart, decoded.
pub fn caller_field(name: &str) -> bool {
    custom::settable(name)
        || name.eq_ignore_ascii_case(unsubscribe::FIELD)
        || name.eq_ignore_ascii_case(unsubscribe::POST_FIELD)
}

/// Checks header fields as `send_email`'s `headers` are checked, for
/// fields that configuration writes on every message of a caller.
pub fn check_headers(fields: &BTreeMap<String, String>) -> Result<(), ComposeError> {
    custom::fields(fields).map(|_| ())
}

/// The configured Message-ID domain, checked so that configuration can never
/// put arbitrary text into a header.
fn message_id_domain(domain: &str) -> Result<&str, ComposeError> {
    let valid = !domain.is_empty()
        && domain.len() <= 253
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if valid {
        Ok(domain)
    } else {
        Err(ComposeError::new(
            "message_id_domain",
            "invalid_message_id_domain",
            "the configured Message-ID domain must be ASCII letters, digits, `-` and `.`",
        ))
    }
}

/// Subject and bodies after template substitution, bodies with CRLF line
/// endings.
#[derive(Debug)]
struct Rendered {
    subject: String,
    body: String,
    html_body: Option<String>,
    list_unsubscribe: Vec<String>,
    headers: BTreeMap<String, String>,
}

/// Checks a `List-Unsubscribe` link as a message's would be.
pub fn check_unsubscribe_link(field: &str, link: &str) -> Result<(), ComposeError> {
    unsubscribe::check(field, link).map(drop)
}

/// The variable that holds a message's one-click unsubscribe link.
pub const ONE_CLICK_VAR: &str = "unsubscribe_url";

/// The one-click unsubscribe link of a draft that asks for one (`None`
/// otherwise): refused without `[unsubscribe]` configured, or for a
/// message of more than one recipient, whose link could unsubscribe only
/// one of them.
fn one_click_link(
    draft: &Draft,
    policy: &ComposePolicy,
    recipients: &address::RecipientSet,
) -> Result<Option<String>, ComposeError> {
    if !draft.unsubscribe {
        return Ok(None);
    }
    let recipients = recipients.envelope();
    let Some(one_click) = &policy.one_click else {
        return Err(ComposeError::new(
            "unsubscribe",
            "not_configured",
            "this daemon serves no unsubscribe links ([unsubscribe] is not configured); \
             give your own in list_unsubscribe",
        ));
    };
    if recipients.len() != 1 {
        return Err(ComposeError::new(
            "unsubscribe",
            "one_recipient",
            format!(
                "an unsubscribe link is for one recipient, and this message has {}; \
                 send each recipient a message of its own (send_batch)",
                recipients.len()
            ),
        ));
    }
    Ok(one_click.link(recipients[0].as_ref()))
}

/// Renders the templates with `vars` (none: the fields as written); each
/// output is refused (`too_large`) as soon as it grows past `limit`, before
/// it is all held.
fn render(
    draft: &Draft,
    texts: &named::Texts<'_>,
    vars: Option<&BTreeMap<String, String>>,
    limit: usize,
) -> Result<Rendered, ComposeError> {
    let links = draft
        .list_unsubscribe
        .as_ref()
        .map_or(&[][..], Links::as_slice);
    let Some(vars) = vars else {
        return Ok(Rendered {
            subject: texts.subject.to_owned(),
            body: crlf(texts.body),
            html_body: texts.html_body.map(crlf),
            list_unsubscribe: links.to_vec(),
            headers: draft.headers.clone(),
        });
    };
    let mut missing = BTreeSet::new();
    let mut run = |field: &str, src: &str, escape| {
        template::render(src, vars, escape, limit, &mut missing).map_err(|e| match e {
            template::RenderError::Syntax(why) => ComposeError::new(field, "template_syntax", why),
            template::RenderError::TooLarge => too_large(field, limit),
        })
    };
    let body_escape = if texts.html {
        template::Escape::Html
    } else {
        template::Escape::Raw
    };
    let subject = run("subject", texts.subject, template::Escape::Raw)?;
    let body = run("body", texts.body, body_escape)?;
    let html_body = texts
        .html_body
        .map(|h| run("html_body", h, template::Escape::Html))
        .transpose()?;
    let list_unsubscribe = links
        .iter()
        .enumerate()
        .map(|(i, l)| run(&format!("list_unsubscribe[{i}]"), l, template::Escape::Raw))
        .collect::<Result<Vec<_>, _>>()?;
    let headers = draft
        .headers
        .iter()
        .map(|(name, v)| {
            let value = run(&custom::path(name), v, template::Escape::Raw)?;
            Ok((name.clone(), value))
        })
        .collect::<Result<BTreeMap<_, _>, ComposeError>>()?;
    if !missing.is_empty() {
        let names: Vec<_> = missing.into_iter().collect();
        return Err(ComposeError::new(
            "template_vars",
            "missing_template_vars",
            format!("no value given for: {}", names.join(", ")),
        ));
    }
    address::check_header_value("subject", &subject).map_err(|mut e| {
        e.message.push_str(" (after template substitution)");
        e
    })?;
    Ok(Rendered {
        subject,
        body: crlf(&body),
        html_body: html_body.as_deref().map(crlf),
        list_unsubscribe,
        headers,
    })
}

/// Every line ending becomes CRLF. lettre converts bare LF but not bare CR,
/// and its SMTP layer only dot-stuffs lines that follow a CRLF.
fn crlf(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len() + text.len() / 32 + 2);
    // Copies the runs between line breaks whole: pushing char by char cost
    // about 28 000 instructions per KiB of body, a sixth of all composing.
    let mut start = 0;
    let mut i = 0;
    while let Some(at) = memchr::memchr2(b'\r', b'\n', &bytes[i..]) {
        let at = i + at;
        out.push_str(&text[start..at]);
        out.push_str("\r\n");
        i = if bytes[at] == b'\r' && bytes.get(at + 1) == Some(&b'\n') {
            at + 2
        } else {
            at + 1
        };
        start = i;
    }
    out.push_str(&text[start..]);
    out
}

#[derive(Debug)]
enum BodyPart {
    Single(SinglePart),
    /// multipart/alternative, or multipart/related for HTML with the
    /// parts it shows.
    Multi(MultiPart),
}

fn text_part(content_type: ContentType, text: String) -> SinglePart {
    let builder = SinglePart::builder().header(content_type);
    // 7bit and quoted-printable text may not carry NUL (RFC 2045).
    if text.contains('\0') {
        builder.header(ContentTransferEncoding::Base64).body(text)
    } else if text.is_ascii() {
        // Line endings are CRLF already (`crlf`). The encoding is the one
        // lettre would choose (`Body::new`, with the same chooser); 7bit text
        // goes as it is and `qp` does quoted-printable, so neither lettre's
        // second CRLF pass nor a second choice runs over the body.
        use email_encoding::body::Encoding;
        match Encoding::choose(text.as_str(), false) {
            Encoding::SevenBit => builder.body(Body::dangerous_pre_encoded(
                text.into_bytes(),
                ContentTransferEncoding::SevenBit,
            )),
            Encoding::QuotedPrintable => builder.body(Body::dangerous_pre_encoded(
                qp::encode(&text),
                ContentTransferEncoding::QuotedPrintable,
            )),
            _ => builder.body(Body::new(text.into_bytes())),
        }
    } else {
        builder.body(text)
    }
}

/// Attachments are always base64: lettre would send ASCII-only content as
/// 7bit without converting its line endings, and a bare LF is exactly what
/// the SMTP layer fails to dot-stuff. One with a `content_id` is `inline`,
/// with its `Content-ID`, for the HTML that shows it.
fn attachment_part(a: &attach::Loaded) -> SinglePart {
    let body = match Body::new_with_encoding(a.data.clone(), ContentTransferEncoding::Base64) {
        Ok(body) => body,
        // Base64 accepts any bytes; lettre hands the input back only for 7bit/8bit.
        Err(data) => Body::new(data),
    };
    let plain = header::plain_filename(&a.filename);
    match &a.content_id {
        None if plain => Attachment::new(a.filename.clone()).body(body, a.content_type.clone()),
        Some(id) if plain => Attachment::new_inline_with_name(id.clone(), a.filename.clone())
            .body(body, a.content_type.clone()),
        id => {
            let mut part = SinglePart::builder();
            if let Some(id) = id {
                part = part.header(lettre::message::header::ContentId::from(format!("<{id}>")));
            }
            part.header(header::Disposition::new(id.is_some(), &a.filename))
                .header(a.content_type.clone())
                .body(body)
        }
    }
}

/// The body: text, HTML, or both as alternatives; HTML that shows
/// attachments (`inline`) goes in a multipart/related with them (RFC 2387),
/// the HTML first.
fn body_part(html: bool, rendered: &Rendered, inline: &[&attach::Loaded]) -> BodyPart {
    let body = rendered.body.clone();
    let html_part = |text: String| {
        let part = text_part(ContentType::TEXT_HTML, text);
        if inline.is_empty() {
            return BodyPart::Single(part);
        }
        let related = inline
            .iter()
            .fold(MultiPart::related().singlepart(part), |m, a| {
                m.singlepart(attachment_part(a))
            });
        BodyPart::Multi(related)
    };
    match (&rendered.html_body, html) {
        (_, true) => html_part(body),
        (None, false) => BodyPart::Single(text_part(ContentType::TEXT_PLAIN, body)),
        (Some(html_body), false) => {
            let alternative =
                MultiPart::alternative().singlepart(text_part(ContentType::TEXT_PLAIN, body));
            BodyPart::Multi(match html_part(html_body.clone()) {
                BodyPart::Single(part) => alternative.singlepart(part),
                BodyPart::Multi(related) => alternative.multipart(related),
            })
        }
    }
}

/// The top-level header fields of a formatted message, unfolded, values as
/// sent (still RFC 2047-encoded).
fn header_fields(bytes: &[u8]) -> Vec<(String, String)> {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(bytes.len());
    let head = String::from_utf8_lossy(&bytes[..end]);
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = fields.last_mut() {
                value.push_str(line);
            }
        } else if let Some((name, value)) = line.split_once(':') {
            fields.push((name.to_owned(), value.trim_start().to_owned()));
        }
    }
    fields
}
