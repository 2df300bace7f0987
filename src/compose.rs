//! Message composition: turns a send request into a validated envelope and the
//! exact bytes to deliver.
//!
//! Everything is checked here before lettre's builder sees it (lettre panics
//! on CR or LF in a display name). Every error names the field and the rule.
//! This module never sends anything and never touches the network.

use std::collections::BTreeMap;
use std::path::PathBuf;

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
    },
    Path {
        /// A path relative to the configured attachments directory.
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content_type: Option<String>,
    },
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Message-ID this message replies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_reply_to: Option<String>,
    /// Message-IDs of the thread, space-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub references: Option<String>,
    #[serde(default)]
    pub attachments: Vec<AttachmentInput>,
    /// Values for `{name}` and `{?name}…{/name}` in subject and bodies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_vars: Option<BTreeMap<String, String>>,
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

/// An attachment as it went into the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct AttachmentSummary {
    pub filename: String,
    pub content_type: String,
    /// Decoded size in bytes.
    pub size: usize,
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
    /// to, cc and bcc, de-duplicated.
    pub recipients: Vec<lettre::Address>,
    /// CRLF line endings throughout.
    pub bytes: Vec<u8>,
    pub preview: Preview,
}

/// Validates and renders a draft.
pub fn compose(draft: &Draft, policy: &ComposePolicy) -> Result<Composed, ComposeError> {
    let _ = (draft, policy);
    todo!()
}
