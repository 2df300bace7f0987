//! Parameter and result types of the MCP tools, with their JSON schemas.
//!
//! These are the only shapes an MCP client sees; they map the actors' plain
//! Rust views to JSON and must never carry a secret.

use std::time::Duration;

use mailmux_actors::queue::{AttemptRecord, Millis, Record, RejectedRecord, State, Summary};
use mailmux_actors::{
    Attempt, FailureClass, ProbeReport, Rejected, RelayStatus, Report, Selection, Snapshot,
};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use crate::compose::{AttachmentInput, ComposeError, Draft, Preview};

/// Tool arguments that always deserialize: a shape error becomes a tool
/// result with `isError` instead of a JSON-RPC fault, so an agent sees it.
/// The schema is the wrapped type's, closed to other properties.
#[derive(Debug)]
pub struct Checked<T>(pub Result<T, ShapeError>);

impl<'de, T: Params> Deserialize<'de> for Checked<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        Ok(Checked(parse(value, T::FIELDS)))
    }
}

impl<T: JsonSchema> JsonSchema for Checked<T> {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        T::schema_name()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let mut schema = T::json_schema(generator);
        // `send_email` flattens its draft, which serde cannot combine with
        // `deny_unknown_fields`: say in the schema what `parse` enforces.
        if let Some(o) = schema.as_object_mut()
            && o.contains_key("properties")
        {
            o.insert("additionalProperties".into(), false.into());
        }
        schema
    }
}

/// The parameters of one tool, by name: any other is refused, so that a
/// misspelt `bcc` or `attachments` never sends a message without it.
pub trait Params: serde::de::DeserializeOwned {
    const FIELDS: &'static [&'static str];
}

/// Arguments of the wrong shape: the field (a path such as `to[1]` or
/// `template_vars.name`), the rule it broke and a sentence for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError {
    pub field: String,
    /// `unknown_field`, `schema` (a wrong JSON type) or `required`.
    pub rule: &'static str,
    pub message: String,
}

impl ShapeError {
    fn new(field: String, rule: &'static str, message: String) -> Self {
        ShapeError {
            field,
            rule,
            message,
        }
    }

    /// The same error for a field inside `outer` (`messages[3]`, `defaults`).
    pub fn within(mut self, outer: &str) -> Self {
        self.message = format!("{outer}.{}", self.message);
        self.field = format!("{outer}.{}", self.field);
        self
    }
}

/// Reads a tool's arguments. A `null` is taken as an absent field. Each
/// field must be one of `fields` and of its JSON type ([`mistyped`]) before
/// serde reads them, because serde's own errors, through the flattened
/// draft and the untagged recipient lists, do not say which field was wrong.
pub fn parse<T: serde::de::DeserializeOwned>(
    mut value: serde_json::Value,
    fields: &[&str],
) -> Result<T, ShapeError> {
    if let serde_json::Value::Object(obj) = &mut value {
        obj.retain(|_, v| !v.is_null());
        if let Some(k) = obj.keys().find(|k| !fields.contains(&k.as_str())) {
            return Err(unknown_field(k, fields));
        }
        if let Some(e) = obj.iter().find_map(|(k, v)| mistyped(k, v)) {
            return Err(e);
        }
    }
    serde_json::from_value(value).map_err(|e| {
        let message = e.to_string();
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next());
        match missing {
            Some(f) => ShapeError::new(f.into(), "required", format!("{f} is required")),
            None => ShapeError::new("arguments".into(), "schema", message),
        }
    })
}

/// The longest field name an error repeats: names come from the caller.
const MAX_SHOWN: usize = 64;

/// A caller's field name as an error shows it: cut, and without controls.
fn shown(name: &str) -> String {
    name.chars()
        .take(MAX_SHOWN)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The longest value of the caller's an answer repeats, in characters.
const MAX_QUOTED: usize = 200;

/// A value the caller gave (an id, a time, a URI), as an answer and the log
/// repeat it: quoted, its control characters escaped, and cut past
/// [`MAX_QUOTED`] characters, so that a megabyte of input is neither sent
/// back nor logged.
pub fn quoted(s: &str) -> String {
    match s.char_indices().nth(MAX_QUOTED) {
        None => format!("{s:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes)", &s[..end], s.len()),
    }
}

/// A value the caller gave, as a log line's field records it: as it is
/// when it is no longer than [`MAX_QUOTED`] characters (every id mailmux
/// makes), else [`quoted`] and cut.
pub fn logged(s: &str) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(MAX_QUOTED) {
        None => s.into(),
        Some(_) => quoted(s).into(),
    }
}

/// A field that is not one of `fields`, with the closest one if any is close.
pub fn unknown_field(name: &str, fields: &[&str]) -> ShapeError {
    let name = shown(name);
    let hint = match closest(&name, fields) {
        Some(f) => format!("did you mean `{f}`?"),
        None if fields.is_empty() => "this tool takes no parameters".to_owned(),
        None => format!("the parameters are {}", fields.join(", ")),
    };
    ShapeError::new(
        name.clone(),
        "unknown_field",
        format!("{name} is not a parameter of this tool: {hint}"),
    )
}

/// A key of attachment `i` that attachments do not have.
fn unknown_attachment_key(i: usize, key: &str) -> ShapeError {
    let key = shown(key);
    let keys = AttachmentInput::FIELDS;
    let hint = match closest(&key, keys) {
        Some(k) => format!("did you mean `{k}`?"),
        None => format!("an attachment's keys are {}", keys.join(", ")),
    };
    let field = format!("attachments[{i}].{key}");
    ShapeError::new(
        field.clone(),
        "unknown_field",
        format!("{field} is not a key of an attachment: {hint}"),
    )
}

/// The one of `names` that `name` is a likely misspelling of, if any.
fn closest<'a>(name: &str, names: &[&'a str]) -> Option<&'a str> {
    names
        .iter()
        .map(|f| (strsim::levenshtein(name, f), *f))
        .min()
        .filter(|(d, f)| *d <= (f.len() / 3).max(2))
        .map(|(_, f)| f)
}

/// The answer to a call of a tool that does not exist, with the closest
/// tool's name or the list of them.
pub fn unknown_tool(name: &str, tools: &[&str]) -> rmcp::ErrorData {
    let name = shown(name);
    let hint = match closest(&name, tools) {
        Some(t) => format!("did you mean `{t}`?"),
        None => format!("the tools are {}", tools.join(", ")),
    };
    rmcp::ErrorData::invalid_params(format!("mailmux has no tool {name:?}: {hint}"), None)
}

/// The MCP requests that rmcp reads into types of their own. rmcp hands a
/// request to `on_custom_request` when it fits none of them, so a request
/// with one of these methods arrives there only when its params did not fit.
const MCP_METHODS: &[&str] = {
    use rmcp::model::*;
    &[
        PingRequestMethod::VALUE,
        InitializeResultMethod::VALUE,
        DiscoverRequestMethod::VALUE,
        CompleteRequestMethod::VALUE,
        SetLevelRequestMethod::VALUE,
        GetPromptRequestMethod::VALUE,
        ListPromptsRequestMethod::VALUE,
        ListResourcesRequestMethod::VALUE,
        ListResourceTemplatesRequestMethod::VALUE,
        ReadResourceRequestMethod::VALUE,
        SubscriptionsListenRequestMethod::VALUE,
        SubscribeRequestMethod::VALUE,
        UnsubscribeRequestMethod::VALUE,
        CallToolRequestMethod::VALUE,
        ListToolsRequestMethod::VALUE,
        GetTaskMethod::VALUE,
        UpdateTaskMethod::VALUE,
        CancelTaskMethod::VALUE,
        ListSkillsRequestMethod::VALUE,
        GetSkillRequestMethod::VALUE,
        ReadResourceDirectoryRequestMethod::VALUE,
    ]
};

/// The answer to a request that fits no MCP request: invalid params when
/// its method is one of MCP's (rmcp's own answer, "method not found", would
/// tell an agent that `tools/call` does not exist), else method not found,
/// naming the method. Neither repeats a value of the params.
pub fn unmatched_request(method: &str, params: Option<&serde_json::Value>) -> rmcp::ErrorData {
    if !MCP_METHODS.contains(&method) {
        return rmcp::ErrorData::new(
            rmcp::model::ErrorCode::METHOD_NOT_FOUND,
            format!("mailmux has no method {:?}", shown(method)),
            None,
        );
    }
    let why = match (method, params) {
        ("tools/call", Some(serde_json::Value::Object(p))) => {
            match (p.get("name"), p.get("arguments")) {
                (None, _) => {
                    "params.name is required: the tool to call (tools/list lists them)".into()
                }
                (Some(n), _) if !n.is_string() => {
                    format!("params.name must be a string, not {}", json_kind(n))
                }
                (_, Some(a)) if !a.is_object() && !a.is_null() => format!(
                    "params.arguments must be an object of the tool's parameters, not {}",
                    json_kind(a)
                ),
                _ => "see the MCP specification".into(),
            }
        }
        ("tools/call", _) => {
            "params must be an object with the tool's name and its arguments".into()
        }
        _ => "see the MCP specification".to_string(),
    };
    rmcp::ErrorData::invalid_params(format!("the params of {method} do not fit: {why}"), None)
}

/// The JSON type of `v`, with its article, for an error.
fn json_kind(v: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Whether `value` has the JSON type that the field `name` takes, in any
/// tool's parameters; the error names the innermost wrong part. Fields of
/// no fixed type here are left to serde.
pub fn mistyped(name: &str, value: &serde_json::Value) -> Option<ShapeError> {
    use serde_json::Value;
    let wrong = |path: String, want: &str| {
        let message = format!("{path} must be {want}");
        Some(ShapeError::new(path, "schema", message))
    };
    let name = shown(name);
    match name.as_str() {
        "wait" | "dry_run" | "html" | "atomic" | "list_unsubscribe_post" | "unsubscribe"
            if !value.is_boolean() =>
        {
            wrong(name, "true or false")
        }
        "subject" | "body" | "html_body" | "from_email" | "reply_to" | "in_reply_to"
        | "references" | "relay" | "idempotency_key" | "send_at" | "message_id" | "status"
        | "cursor" | "batch_id" | "server_name" | "template" | "tag" | "max_age"
            if !value.is_string() =>
        {
            wrong(name, "a string")
        }
        "priority" if !matches!(value.as_str(), Some("high" | "normal")) => {
            wrong(name, "\"high\" or \"normal\"")
        }
        "limit" if value.as_u64().is_none_or(|n| n > u64::from(u32::MAX)) => {
            wrong(name, "a whole number")
        }
        // A string, or an array of strings.
        "to" | "cc" | "bcc" | "list_unsubscribe" => {
            let (one, either) = match name.as_str() {
                "list_unsubscribe" => ("a string (one link)", "a link or an array of links"),
                _ => (
                    "a string (one address)",
                    "an address, a comma-separated string of addresses or an array of addresses",
                ),
            };
            match value {
                Value::String(_) => None,
                Value::Array(items) => items
                    .iter()
                    .position(|v| !v.is_string())
                    .and_then(|i| wrong(format!("{name}[{i}]"), one)),
                _ => wrong(name, either),
            }
        }
        // An object of names to strings.
        "template_vars" | "headers" | "metadata" => {
            let (one, all) = match name.as_str() {
                "headers" => ("a string", "an object of field names to values"),
                "metadata" => ("a string", "an object of names to strings"),
                _ => (
                    "a string (write a number as \"42\")",
                    "an object of variable names to strings",
                ),
            };
            match value {
                Value::Object(vars) => vars
                    .iter()
                    .find(|(_, v)| !v.is_string())
                    .and_then(|(k, _)| wrong(format!("{name}.{}", shown(k)), one)),
                _ => wrong(name, all),
            }
        }
        "attachments" => match value {
            Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| match item {
                Value::Object(a) => match a
                    .keys()
                    .find(|k| !AttachmentInput::FIELDS.contains(&k.as_str()))
                {
                    Some(k) => Some(unknown_attachment_key(i, k)),
                    None => AttachmentInput::FIELDS
                        .iter()
                        .find(|k| a.get(**k).is_some_and(|v| !v.is_string()))
                        .and_then(|k| wrong(format!("attachments[{i}].{k}"), "a string")),
                },
                _ => wrong(
                    format!("attachments[{i}]"),
                    "an object with `filename` and `content_base64`, or with `path`",
                ),
            }),
            _ => wrong(name, "an array of attachments"),
        },
        "defaults" if !value.is_object() => wrong(name, "an object of send_email fields"),
        "messages" => match value {
            Value::Array(items) => items
                .iter()
                .position(|v| !v.is_object())
                .and_then(|i| wrong(format!("messages[{i}]"), "an object of send_email fields")),
            _ => wrong(name, "an array of messages"),
        },
        _ => None,
    }
}

/// Arguments of `send_email`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct SendEmailParams {
    #[serde(flatten)]
    pub draft: Draft,
    /// Try this relay first (a name from `get_smtp_status`).
    #[serde(default)]
    pub relay: Option<String>,
    /// Validate and render only: return the preview, the envelope and the
    /// relay that would take the message, and send nothing.
    #[serde(default)]
    pub dry_run: Option<bool>,
    /// Makes the call safe to repeat: a second call with the same key and
    /// the same content sends nothing and answers with the first message's
    /// status (`idempotent_replay: true`); the same key with other content is
    /// refused (`idempotency_conflict`). At most 200 printable characters.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// `true` (default): wait for the delivery outcome until the send
    /// deadline. `false`: answer as soon as the message is durably queued.
    #[serde(default)]
    pub wait: Option<bool>,
    /// Send later: an RFC 3339 time (`2026-12-01T09:00:00Z`) or a delay
    /// (`10m`, `2h`). The call answers `scheduled` at once.
    #[serde(default)]
    pub send_at: Option<String>,
    /// Give up on the message if it is not delivered within this long of
    /// being due (`5m` for a one-time code): it then `expired`, never sent
    /// late. 1s up to the caller's own `max_age` (`get_smtp_status`).
    #[serde(default)]
    pub max_age: Option<String>,
}

/// Arguments of `send_batch`.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SendBatchParams {
    /// Any `send_email` field shared by every message (`from_email`,
    /// `subject` and `body` templates, `html_body`, `attachments`,
    /// `reply_to`, `cc`, `relay`, ...). A message's own field replaces it;
    /// templates are rendered per message with its `template_vars`.
    #[serde(default)]
    pub defaults: serde_json::Map<String, serde_json::Value>,
    /// Up to `max_batch` (1,000) messages, each with its own `to`/`cc`/`bcc`,
    /// `template_vars`, `idempotency_key` and any field it overrides.
    pub messages: Vec<serde_json::Map<String, serde_json::Value>>,
    /// `true` (default): wait for every outcome until the send deadline.
    #[serde(default)]
    pub wait: Option<bool>,
    /// Send every message later (RFC 3339 time or a delay such as `10m`).
    #[serde(default)]
    pub send_at: Option<String>,
    /// Validate and render every message; send nothing.
    #[serde(default)]
    pub dry_run: Option<bool>,
    /// `true`: queue nothing unless every message is valid.
    #[serde(default)]
    pub atomic: Option<bool>,
}

/// One message of a `send_batch` answer, in input order. (Read back from
/// the request state of a batch's approval form, too.)
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BatchItemOut {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<SendStatus>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub idempotent_replay: bool,
    /// Why this message was refused; its `field` starts with `messages[i]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ToolError>,
}

/// The answer of `send_batch`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SendBatchResult {
    /// Names the call; `list_messages` takes it as `batch_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    pub results: Vec<BatchItemOut>,
    /// Messages per status, and `refused` for those that were not queued.
    pub summary: std::collections::BTreeMap<String, usize>,
    /// What the agent should know of the batch as a whole: that delivery
    /// is paused, when messages were queued meanwhile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ToolError>,
}

/// Arguments of `get_message_status`: exactly one of the two.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MessageStatusParams {
    /// The `message_id` a send answered with (or as a Message-ID header
    /// writes it, `<…>`).
    #[serde(default)]
    pub message_id: Option<String>,
    /// The `idempotency_key` the message was sent with.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// Arguments of `list_messages`.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListMessagesParams {
    /// Only messages in this state (`scheduled`, `queued`, `sending`, `sent`,
    /// `partial`, `failed`, `unknown`, `expired`, `cancelled`, `held`,
    /// `rejected`).
    #[serde(default)]
    pub status: Option<String>,
    /// Messages per page, 1 to 100. Default: 20.
    #[serde(default)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the page before.
    #[serde(default)]
    pub cursor: Option<String>,
    /// Only the messages of this `send_batch` call.
    #[serde(default)]
    pub batch_id: Option<String>,
    /// Only the messages sent with this `tag`.
    #[serde(default)]
    pub tag: Option<String>,
    /// Only messages with a recipient whose address contains this text, in
    /// any case: a whole address (`ada@example.org`) or part of one
    /// (`@example.org`). A page reads at most 10,000 messages, so it may
    /// hold fewer than `limit`, even none, and still have `next_cursor`.
    #[serde(default)]
    pub recipient: Option<String>,
    /// Only messages a bounce (`bounced`) or a spam complaint
    /// (`complained`) report came back for, read from the relay's mailbox
    /// after it took them: which of a mail merge's addresses to drop.
    /// Searched as `recipient` is, 10,000 messages a page.
    #[serde(default)]
    pub reported: Option<String>,
    /// Only messages sent with each of these names, each with its value,
    /// in their `metadata` (1 to 20): `{"campaign": "spring"}`. Searched as
    /// `recipient` is, 10,000 messages a page.
    #[serde(default)]
    pub metadata: Option<std::collections::BTreeMap<String, String>>,
}

/// Arguments of `cancel_message`.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelMessageParams {
    /// The `message_id` a send answered with (or as a Message-ID header
    /// writes it, `<…>`). Give this or `batch_id`.
    #[serde(default)]
    pub message_id: Option<String>,
    /// The `batch_id` a `send_batch` answered with: every message of that
    /// call that can still be cancelled is. Give this or `message_id`.
    #[serde(default)]
    pub batch_id: Option<String>,
    /// A `tag` the caller's messages were sent with: every one of them
    /// still waiting (scheduled, queued or held) is cancelled.
    #[serde(default)]
    pub tag: Option<String>,
}

/// Arguments naming one relay, or none for all of them.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
pub struct ServerNameParams {
    /// A relay name; omit for every relay. `switch_smtp_server` also takes
    /// `"auto"` to unpin.
    #[serde(default)]
    pub server_name: Option<String>,
}

/// The `send_email` fields of one message, then `extra`.
macro_rules! message_fields {
    ($($extra:literal),*) => {
        &[
            "to",
            "cc",
            "bcc",
            "subject",
            "body",
            "html",
            "html_body",
            "from_email",
            "reply_to",
            "in_reply_to",
            "references",
            "attachments",
            "list_unsubscribe",
            "list_unsubscribe_post",
            "unsubscribe",
            "headers",
            "template_vars",
            "template",
            "relay",
            "tag",
            "metadata",
            "max_age",
            "priority",
            $($extra),*
        ]
    };
}

/// The `send_email` fields of one message, which a batch's `defaults` may
/// set and each of its messages override.
pub const MESSAGE_FIELDS: &[&str] = message_fields!();

impl Params for SendEmailParams {
    const FIELDS: &'static [&'static str] =
        message_fields!("dry_run", "idempotency_key", "wait", "send_at");
}

impl Params for SendBatchParams {
    const FIELDS: &'static [&'static str] = &[
        "defaults", "messages", "wait", "send_at", "dry_run", "atomic",
    ];
}

impl Params for MessageStatusParams {
    const FIELDS: &'static [&'static str] = &["message_id", "idempotency_key"];
}

impl Params for ListMessagesParams {
    const FIELDS: &'static [&'static str] = &[
        "status",
        "limit",
        "cursor",
        "batch_id",
        "tag",
        "recipient",
        "reported",
        "metadata",
    ];
}

impl Params for CancelMessageParams {
    const FIELDS: &'static [&'static str] = &["message_id", "batch_id", "tag"];
}

impl Params for ServerNameParams {
    const FIELDS: &'static [&'static str] = &["server_name"];
}

/// The arguments of a tool that takes none: any given is refused, so that
/// an agent that thinks `reconnect_smtp_servers` takes one relay's name
/// learns that it acts on every relay before it does.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NoParams {}

impl Params for NoParams {
    const FIELDS: &'static [&'static str] = &[];
}

impl JsonSchema for NoParams {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "NoParams".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        // With `properties`, [`Checked`] closes it to any other.
        schemars::json_schema!({"type": "object", "properties": {}})
    }
}

/// A tool failure an agent can act on: a stable code and a sentence.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ToolError {
    /// Stable code: `invalid_input`, `unknown_relay`, `unavailable`,
    /// `invalid_config`, or a delivery failure (`rejected`,
    /// `all_relays_failed`, `busy`, `deadline_exceeded`, `too_large`,
    /// `smtputf8_unsupported`).
    pub code: String,
    pub message: String,
    /// The parameter at fault (`invalid_input`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The rule it broke (`invalid_input`), e.g. `invalid_address`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The valid relay names (`unknown_relay`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid: Option<Vec<String>>,
    /// The failure class of the last attempt (`relay_fault`, `transient`,
    /// `permanent`, `unknown`, `busy`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// The SMTP reply that decided it, if there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<SmtpReply>,
    /// Seconds until the message would pass the rate limit (`rate_limited`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<f64>,
    /// The name of the content check that refused it (`content_rejected`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
}

impl ToolError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        ToolError {
            code: code.into(),
            message: message.into(),
            ..Default::default()
        }
    }

    pub fn unknown_relay(name: &str, valid: Vec<String>) -> Self {
        ToolError {
            message: format!(
                "unknown relay {}; valid relays: {}",
                quoted(name),
                valid.join(", ")
            ),
            valid: Some(valid),
            ..ToolError::new("unknown_relay", "")
        }
    }

    pub fn invalid_input(e: &ComposeError) -> Self {
        ToolError {
            field: Some(e.field.clone()),
            rule: Some(e.rule.to_string()),
            ..ToolError::new("invalid_input", e.to_string())
        }
    }

    /// The code of [`ToolError::unavailable`].
    pub const UNAVAILABLE: &'static str = "unavailable";

    pub fn unavailable() -> Self {
        ToolError::new(
            Self::UNAVAILABLE,
            "mailmux is shutting down and takes no new calls; retry on another instance or later",
        )
    }
}

/// An SMTP reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SmtpReply {
    pub code: u16,
    pub text: String,
}

/// Every result type carries an optional error, so that an `isError` result
/// still matches the tool's output schema.
pub trait ToolOutput: Serialize + Default {
    fn error(&self) -> Option<&ToolError>;
    fn set_error(&mut self, e: ToolError);
    fn from_error(e: ToolError) -> Self {
        let mut out = Self::default();
        out.set_error(e);
        out
    }
}

macro_rules! tool_output {
    ($($t:ty),*) => {$(
        impl ToolOutput for $t {
            fn error(&self) -> Option<&ToolError> { self.error.as_ref() }
            fn set_error(&mut self, e: ToolError) { self.error = Some(e); }
        }
    )*};
}

/// Overall outcome of `send_email`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SendStatus {
    /// Every recipient accepted.
    Sent,
    /// Some recipients accepted, others refused (see `rejected`).
    Partial,
    /// The connection was lost after the message was sent: it may have been
    /// delivered. Do not resend blindly.
    Unknown,
    /// Not delivered (see `error`).
    #[default]
    Failed,
    /// Rendered only (`dry_run`); nothing was sent.
    DryRun,
    /// Stored; waits for its `send_at`.
    Scheduled,
    /// Stored; waits for a relay (new, or deferred to `next_attempt_at`;
    /// when some recipients already have it, `deferred` lists the others).
    Queued,
    /// A relay holds it now.
    Sending,
    /// Not delivered within the queue's `max_age`.
    Expired,
    /// Cancelled before delivery.
    Cancelled,
    /// Stored; waits for a person's approval (the caller's policy held it).
    /// Nothing is sent unless it is approved.
    Held,
    /// A person refused it; nothing was sent.
    Rejected,
}

impl From<State> for SendStatus {
    fn from(s: State) -> Self {
        match s {
            State::Scheduled => SendStatus::Scheduled,
            State::Queued => SendStatus::Queued,
            State::Sending => SendStatus::Sending,
            State::Sent => SendStatus::Sent,
            State::Partial => SendStatus::Partial,
            State::Failed => SendStatus::Failed,
            State::Unknown => SendStatus::Unknown,
            State::Expired => SendStatus::Expired,
            State::Cancelled => SendStatus::Cancelled,
            State::Held => SendStatus::Held,
            State::Rejected => SendStatus::Rejected,
        }
    }
}

impl SendStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SendStatus::Sent => "sent",
            SendStatus::Partial => "partial",
            SendStatus::Unknown => "unknown",
            SendStatus::Failed => "failed",
            SendStatus::DryRun => "dry_run",
            SendStatus::Scheduled => "scheduled",
            SendStatus::Queued => "queued",
            SendStatus::Sending => "sending",
            SendStatus::Expired => "expired",
            SendStatus::Cancelled => "cancelled",
            SendStatus::Held => "held",
            SendStatus::Rejected => "rejected",
        }
    }
}

/// A recipient the server refused.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct RejectedRecipient {
    pub address: String,
    pub code: u16,
    pub text: String,
}

/// One relay's try at the message.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct AttemptOut {
    pub relay: String,
    /// `delivered`, or the failure class.
    pub class: String,
    /// The SMTP reply code that decided the attempt, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    /// The SMTP reply text, or what happened.
    pub text: String,
    pub duration_ms: u64,
    /// When the attempt started (RFC 3339, UTC), where it was recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

/// The SMTP envelope of a message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
pub struct Envelope {
    pub from: String,
    pub recipients: Vec<String>,
}

/// Result of `send_email`.
#[derive(Debug, Clone, Default, Serialize, JsonSchema)]
pub struct SendResult {
    pub status: SendStatus,
    /// Message-ID header value, without angle brackets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// The relay that took the message (or would, for a dry run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    pub accepted: Vec<String>,
    pub rejected: Vec<RejectedRecipient>,
    /// Recipients that have not got the message while others have: a
    /// server answered them with a 4xx, and they wait for the retry at
    /// `next_attempt_at`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deferred: Vec<String>,
    pub attempts: Vec<AttemptOut>,
    /// What the agent should know when the status is not `sent`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envelope: Option<Envelope>,
    /// The rendered message (`dry_run` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preview: Option<Preview>,
    /// When the queue accepted the message (RFC 3339, UTC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queued_at: Option<String>,
    /// When it is due (`scheduled`) or tried next (a deferred `queued`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    /// True when the idempotency key named an earlier message: this is that
    /// message's status, and nothing was sent again.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub idempotent_replay: bool,
    /// The caller the daemon identified (by token over HTTP; `stdio_caller`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ToolError>,
}

pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn class_str(class: Option<FailureClass>) -> String {
    class.map_or("delivered", FailureClass::as_str).to_string()
}

impl From<&Attempt> for AttemptOut {
    fn from(a: &Attempt) -> Self {
        let text = match &a.reply {
            Some(r) if a.detail.is_empty() => r.text.clone(),
            Some(r) => format!("{} ({})", r.text, a.detail),
            None => a.detail.clone(),
        };
        AttemptOut {
            relay: a.relay.clone(),
            class: class_str(a.class),
            code: a.reply.as_ref().map(|r| r.code),
            text,
            duration_ms: millis(a.duration),
            at: None,
        }
    }
}

impl From<&Rejected> for RejectedRecipient {
    fn from(r: &Rejected) -> Self {
        RejectedRecipient {
            address: r.address.clone(),
            code: r.reply.code,
            text: r.reply.text.clone(),
        }
    }
}

impl SendResult {
    /// Maps a delivery report; a failed report gets a structured error whose
    /// class and reply come from the last attempt.
    pub fn from_report(report: &Report, envelope: Envelope) -> Self {
        let status = match report.status {
            mailmux_actors::Status::Sent => SendStatus::Sent,
            mailmux_actors::Status::Partial => SendStatus::Partial,
            mailmux_actors::Status::Unknown => SendStatus::Unknown,
            mailmux_actors::Status::Failed => SendStatus::Failed,
        };
        let error = (status == SendStatus::Failed).then(|| {
            let last = report.attempts.last();
            ToolError {
                class: last.and_then(|a| a.class).map(|c| c.as_str().to_string()),
                reply: last.and_then(|a| a.reply.as_ref()).map(|r| SmtpReply {
                    code: r.code,
                    text: r.text.clone(),
                }),
                ..ToolError::new(
                    report.failure.map_or("all_relays_failed", |f| f.code()),
                    report
                        .message
                        .clone()
                        .unwrap_or_else(|| "the message was not delivered".into()),
                )
            }
        });
        SendResult {
            status,
            message_id: Some(report.message_id.clone()),
            relay: report.relay.clone(),
            accepted: report.accepted.clone(),
            rejected: report.rejected.iter().map(Into::into).collect(),
            attempts: report.attempts.iter().map(Into::into).collect(),
            message: report.message.clone(),
            envelope: Some(envelope),
            error,
            ..Default::default()
        }
    }

    /// The result of a message as the queue stores it (a replay, a message
    /// that is not final yet, or one whose last round this call did not see).
    pub fn from_record(r: &Record) -> Self {
        let status = SendStatus::from(r.state);
        let error = matches!(r.state, State::Failed | State::Expired).then(|| {
            let last = r.attempts.last();
            ToolError {
                class: last.and_then(|a| a.class.clone()),
                reply: last.and_then(|a| {
                    a.code.map(|code| SmtpReply {
                        code,
                        text: a.text.clone(),
                    })
                }),
                ..ToolError::new(
                    r.reason.as_deref().unwrap_or(if r.state == State::Expired {
                        "expired"
                    } else {
                        "all_relays_failed"
                    }),
                    r.note
                        .clone()
                        .unwrap_or_else(|| "the message was not delivered".into()),
                )
            }
        });
        SendResult {
            status,
            message_id: Some(r.message_id.clone()),
            relay: r.relay.clone(),
            accepted: r.accepted.clone(),
            rejected: r.rejected.iter().map(Into::into).collect(),
            deferred: r.deferred().into_iter().map(String::from).collect(),
            attempts: r.attempts.iter().map(Into::into).collect(),
            message: r.note.clone(),
            envelope: Some(Envelope::of(r)),
            preview: None,
            queued_at: Some(rfc3339(r.queued_at)),
            next_attempt_at: r.next_attempt_at.map(rfc3339),
            idempotent_replay: false,
            caller: r.caller.clone(),
            error,
        }
    }
}

impl Envelope {
    pub fn of(r: &Record) -> Self {
        Envelope {
            from: r.from.clone().unwrap_or_default(),
            recipients: r.to.clone(),
        }
    }
}

/// A stored time as RFC 3339 in UTC, to the millisecond.
pub fn rfc3339(ms: Millis) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(t) => format!("{t:.3}"),
        Err(_) => String::new(),
    }
}

impl From<&AttemptRecord> for AttemptOut {
    fn from(a: &AttemptRecord) -> Self {
        AttemptOut {
            relay: a.relay.clone(),
            class: a.class.clone().unwrap_or_else(|| "delivered".into()),
            code: a.code,
            text: a.text.clone(),
            duration_ms: a.duration_ms,
            at: Some(rfc3339(a.at)),
        }
    }
}

impl From<&RejectedRecord> for RejectedRecipient {
    fn from(r: &RejectedRecord) -> Self {
        RejectedRecipient {
            address: r.address.clone(),
            code: r.code,
            text: r.text.clone(),
        }
    }
}

/// One state a message was in, and when it entered it.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct StateChange {
    pub status: SendStatus,
    pub at: String,
}

/// Everything stored about one message, except its body.
#[derive(Debug, Clone, Default, Serialize, JsonSchema)]
pub struct MessageStatusResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<SendStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envelope: Option<Envelope>,
    /// The stored message's size in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// The relay asked for with the message, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preferred_relay: Option<String>,
    /// The relay that took it (or last tried it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queued_at: Option<String>,
    /// When it was due: its `send_at`, or when it was accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub due_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    pub accepted: Vec<String>,
    pub rejected: Vec<RejectedRecipient>,
    /// Recipients that have not got the message while others have: a
    /// server answered them with a 4xx, and they wait for the retry at
    /// `next_attempt_at`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deferred: Vec<String>,
    /// Every attempt at every relay, oldest first.
    pub attempts: Vec<AttemptOut>,
    /// Every state it was in, oldest first.
    pub history: Vec<StateChange>,
    /// The stable failure code, when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What the agent should know about its state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The caller that sent it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    /// Who approved or rejected it, when it was held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// The copy in the Sent folder, when the relay files one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_copy: Option<SentCopyOut>,
    /// The daemon that holds or delivered it (a shared `postgres` queue).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The `send_batch` call it came in; `list_messages` takes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    /// The `tag` it was sent with; `list_messages` takes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The `metadata` it was sent with.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metadata: std::collections::BTreeMap<String, String>,
    /// The `max_age` it was sent with (`5m`), when it gave itself less time
    /// than its caller's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age: Option<String>,
    /// `high` when it was sent with that `priority`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
    /// For a `scheduled` or `queued` message: when it expires unless a
    /// relay takes it first (its due time and the `max_age` in force).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// What bounce and complaint reports that came back by mail, after a
    /// relay took the message, said of its recipients (`[relays.bounces]`),
    /// oldest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reports: Vec<ReportOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ToolError>,
}

/// One relay's reader of bounce and complaint reports.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct BounceReaderOut {
    pub relay: String,
    pub folder: String,
    /// When the mailbox was last read; absent before a first read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_read_at: Option<String>,
    /// Why the last read failed, until one succeeds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Reports read since the daemon started.
    pub reports: u64,
    /// Addresses they put on the suppression list.
    pub listed: u64,
}

/// What one bounce or complaint report said of a recipient.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct ReportOut {
    pub address: String,
    /// `bounced` (the address does not exist) or `complained` (the
    /// recipient marked the message as spam).
    pub reason: String,
    /// The report's diagnostic.
    pub detail: String,
    /// When the report was read.
    pub at: String,
}

/// The outcome of a message's copy in the Sent folder.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct SentCopyOut {
    /// `pending` (waiting to be filed), `copied` or `failed`.
    pub status: String,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl SentCopyOut {
    fn of(stored: &str) -> SentCopyOut {
        match stored.split_once(": ") {
            Some((status, reason)) => SentCopyOut {
                status: status.to_owned(),
                reason: Some(reason.to_owned()),
            },
            None => SentCopyOut {
                status: stored.to_owned(),
                reason: None,
            },
        }
    }
}

impl From<&Record> for MessageStatusResult {
    fn from(r: &Record) -> Self {
        MessageStatusResult {
            message_id: Some(r.message_id.clone()),
            status: Some(r.state.into()),
            idempotency_key: r.idempotency_key.clone(),
            envelope: Some(Envelope::of(r)),
            size_bytes: Some(r.size),
            preferred_relay: r.prefer.clone(),
            relay: r.relay.clone(),
            queued_at: Some(rfc3339(r.queued_at)),
            due_at: Some(rfc3339(r.due_at)),
            updated_at: Some(rfc3339(r.updated_at)),
            next_attempt_at: r.next_attempt_at.map(rfc3339),
            accepted: r.accepted.clone(),
            rejected: r.rejected.iter().map(Into::into).collect(),
            deferred: r.deferred().into_iter().map(String::from).collect(),
            attempts: r.attempts.iter().map(Into::into).collect(),
            history: r
                .history
                .iter()
                .map(|(s, at)| StateChange {
                    status: (*s).into(),
                    at: rfc3339(*at),
                })
                .collect(),
            reason: r.reason.clone(),
            message: r.note.clone(),
            caller: r.caller.clone(),
            decided_by: r.decided_by.clone(),
            sent_copy: r.sent_copy.as_deref().map(SentCopyOut::of),
            node: r.node.clone(),
            batch_id: r.batch.clone(),
            tag: r.tag.clone(),
            metadata: crate::audit::Meta::of(r.meta.as_deref()).metadata,
            expires_at: r.expires_at.map(rfc3339),
            priority: r.priority.is_high().then(|| r.priority.as_str().to_owned()),
            max_age: r.max_age.map(|ms| {
                humantime::format_duration(mailmux_actors::queue::duration(ms)).to_string()
            }),
            reports: r
                .reports
                .iter()
                .map(|x| ReportOut {
                    address: x.address.clone(),
                    reason: x.reason.clone(),
                    detail: x.detail.clone(),
                    at: rfc3339(x.at),
                })
                .collect(),
            error: None,
        }
    }
}

/// One message in a listing.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct MessageSummaryOut {
    pub message_id: String,
    pub status: SendStatus,
    pub from: String,
    pub recipients: Vec<String>,
    pub queued_at: String,
    pub updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    /// The daemon that holds or delivered it (a shared `postgres` queue).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The `send_batch` call it came in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    /// The `tag` it was sent with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// `high` when it was sent with that `priority`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
}

impl From<&Summary> for MessageSummaryOut {
    fn from(s: &Summary) -> Self {
        MessageSummaryOut {
            message_id: s.message_id.clone(),
            status: s.state.into(),
            from: s.from.clone().unwrap_or_default(),
            recipients: s.to.clone(),
            queued_at: rfc3339(s.queued_at),
            updated_at: rfc3339(s.updated_at),
            relay: s.relay.clone(),
            caller: s.caller.clone(),
            node: s.node.clone(),
            batch_id: s.batch.clone(),
            tag: s.tag.clone(),
            priority: s.priority.is_high().then(|| s.priority.as_str().to_owned()),
        }
    }
}

/// Result of `list_messages`.
#[derive(Debug, Clone, Default, Serialize, JsonSchema)]
pub struct ListMessagesResult {
    /// Newest first.
    pub messages: Vec<MessageSummaryOut>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
    /// With `batch_id` or `tag`, on the first page: how many of the
    /// batch's (or the tag's) messages are in each status now, whatever
    /// `status` the page asks for (`{"sent": 950, "queued": 30}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<std::collections::BTreeMap<String, u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ToolError>,
}

/// Result of `cancel_message`.
#[derive(Debug, Clone, Default, Serialize, JsonSchema)]
pub struct CancelMessageResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// Whether this call cancelled the message (with `batch_id`: at least
    /// one of the batch's).
    pub cancelled: bool,
    /// The message's state now (`cancelled`, or the state that refused it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<SendStatus>,
    /// The recipients that had the message before the cancel: a round
    /// delivered to them and deferred the others, whose retries the cancel
    /// stopped.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub accepted: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// With `batch_id` or `tag`: how many messages this call cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancelled_count: Option<usize>,
    /// With `batch_id`: the batch's messages per state after this call;
    /// with `tag`: those of its messages that were waiting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<std::collections::BTreeMap<String, usize>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ToolError>,
}

/// The queue, in `get_smtp_status` and `/health`.
#[derive(Debug, Clone, Default, Serialize, JsonSchema)]
pub struct QueueOut {
    /// `sqlite`, `memory` or `postgres`.
    pub store: String,
    /// This daemon's node id on a shared `postgres` queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// The daemons on the shared queue now (this one included); each relay's
    /// `rate` is shared evenly among them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u32>,
    /// Whether accepted mail survives a crash.
    pub durable: bool,
    /// False while the store refuses writes: new sends are refused.
    pub available: bool,
    /// Bytes free on the file system of a `sqlite` store (with
    /// `queue.min_free` above 0); under `min_free`, new sends are refused
    /// with `queue_full`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,
    /// `queue.min_free`, where it applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_free: Option<u64>,
    /// Messages per state.
    pub counts: std::collections::BTreeMap<String, u64>,
    /// Age of the oldest message waiting for a relay, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_queued_age_secs: Option<f64>,
    /// The earliest retry of a deferred message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_retry_at: Option<String>,
    /// Sent copies waiting for their outcome (or, left by a stop or a
    /// crash, for this daemon or another to make them).
    pub sent_copies_pending: u64,
    /// Addresses on the suppression list, as this daemon holds it.
    pub suppressed: u64,
    /// Delivery paused by an operator: mail is accepted and queued, and no
    /// message is handed to a relay until it is resumed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paused: Option<PausedOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// A pause of delivery, as `get_smtp_status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
pub struct PausedOut {
    /// When it was paused (RFC 3339, UTC).
    pub since: String,
    /// Who paused it: `operator NAME`, `queue command`.
    pub by: String,
    /// The operator's note.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Delivery counters of one relay.
#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
pub struct CountersOut {
    pub sent: u64,
    pub partial: u64,
    pub relay_fault: u64,
    pub transient: u64,
    pub permanent: u64,
    pub unknown: u64,
    pub busy: u64,
    pub failovers_out: u64,
}

/// Delivery latency percentiles, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
pub struct LatencyOut {
    pub count: u64,
    pub p50_ms: u64,
    pub p90_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
}

/// One relay in `get_smtp_status`.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct RelayOut {
    pub name: String,
    /// `smtp` or `file`.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `none`, `opportunistic`, `starttls` or `implicit`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    /// The folder of a `file` relay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    pub priority: i32,
    pub weight: u32,
    /// `healthy`, `backing_off`, `circuit_open` or `disabled`.
    pub state: String,
    pub consecutive_failures: u32,
    /// Times in a row the relay passed its probe and then failed the next
    /// delivery (one that answers NOOP but hangs at MAIL, say); each doubles
    /// its backoff. A delivery resets it.
    pub relapses: u32,
    /// Seconds until the relay is tried again, when it is not healthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_retry_secs: Option<f64>,
    pub in_flight: usize,
    pub connections: usize,
    pub counters: CountersOut,
    pub latency: LatencyOut,
    pub restarts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl From<&RelayStatus> for RelayOut {
    fn from(r: &RelayStatus) -> Self {
        let c = &r.counters;
        let l = &r.latency;
        RelayOut {
            name: r.name.clone(),
            kind: r.kind.to_string(),
            host: r.host.clone(),
            port: r.port,
            tls: r.tls.map(str::to_string),
            dir: r.dir.clone(),
            priority: r.priority,
            weight: r.weight,
            state: r.state.as_str().to_string(),
            consecutive_failures: r.consecutive_failures,
            relapses: r.relapses,
            next_retry_secs: r.state.retry_in().map(secs),
            in_flight: r.in_flight,
            connections: r.connections,
            counters: CountersOut {
                sent: c.sent,
                partial: c.partial,
                relay_fault: c.relay_fault,
                transient: c.transient,
                permanent: c.permanent,
                unknown: c.unknown,
                busy: c.busy,
                failovers_out: c.failovers_out,
            },
            latency: LatencyOut {
                count: l.count,
                p50_ms: millis(l.p50),
                p90_ms: millis(l.p90),
                p99_ms: millis(l.p99),
                max_ms: millis(l.max),
            },
            restarts: r.restarts,
            last_error: r.last_error.clone(),
        }
    }
}

/// Result of `get_smtp_status`.
#[derive(Debug, Clone, Default, Serialize, JsonSchema)]
pub struct StatusResult {
    pub version: String,
    pub uptime_secs: u64,
    /// The relay selection strategy.
    pub strategy: String,
    /// The pinned relay, if any (`switch_smtp_server`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    /// Messages being delivered now, across all relays.
    pub in_flight: usize,
    pub router_restarts: u32,
    /// Where the configuration came from, in order.
    pub config_sources: Vec<String>,
    /// True when no relay is configured and mail goes to local files.
    pub default_relay: bool,
    /// Set when something needs the operator's attention, such as the
    /// embedded file relay delivering nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    pub relays: Vec<RelayOut>,
    /// The durable queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueOut>,
    /// The calling caller and its policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<CallerOut>,
    /// The audit log, when one is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditOut>,
    /// Callers whose policy lets them mail anyone (`allowed_recipients` empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub open_recipients: Vec<String>,
    /// The DKIM keys that sign mail from their domains (`[[dkim]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dkim: Vec<DkimOut>,
    /// The operator's templates this caller may name in `template`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub templates: Vec<TemplateOut>,
    /// The mailboxes read for bounce and complaint reports
    /// (`[relays.bounces]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bounces: Vec<BounceReaderOut>,
    /// The daemon's async runtime, for spotting leaked tasks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ToolError>,
}

/// One DKIM key, without the key.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct DkimOut {
    /// The signing domain: mail from it and below it is signed.
    pub domain: String,
    pub selector: String,
    /// `rsa-sha256` or `ed25519-sha256`.
    pub algorithm: String,
}

/// One of the operator's templates (`[[templates]]`), as a caller names
/// it.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct TemplateOut {
    /// What `template` takes.
    pub name: String,
    /// What it is for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The variables its texts use, for `template_vars`. A variable used
    /// only in a `{?name}…{/name}` block may be left out.
    pub vars: Vec<String>,
    /// What each variable's whole value must match (a regular
    /// expression), when the operator set patterns.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub patterns: std::collections::BTreeMap<String, String>,
    /// The ids of the images its HTML shows (`cid:ID`), which every
    /// message written from it carries: an attachment of the call's may
    /// not take one of them as its `content_id`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
}

/// The audit log's health.
#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
pub struct AuditOut {
    pub path: String,
    /// False after a write failed, until one succeeds.
    pub healthy: bool,
    /// Lines that could not be written since start.
    pub failed_writes: u64,
    /// New messages are refused while the log cannot be written.
    pub required: bool,
}

/// The caller of a `get_smtp_status` call, and its policy in brief.
#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
pub struct CallerOut {
    pub name: String,
    /// `send` or `dry_run`.
    pub mode: String,
    /// `never`, `always` or `outside_allowlist`.
    pub approval: String,
    /// Allowed recipient rules; empty means anyone.
    pub allowed_recipients: usize,
    /// The caller's rate limits, as written; on a shared `postgres` queue
    /// they hold over all its daemons together.
    pub rate: Vec<String>,
    /// Every message must name one of `templates`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub require_template: bool,
    /// Sends transactional mail: recipients who unsubscribed still get it,
    /// and it may carry no unsubscribe link.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub transactional: bool,
    /// How long your mail may wait for delivery before it expires, where
    /// your policy says otherwise than the queue's `max_age`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age: Option<String>,
}

/// The tokio runtime's own counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, JsonSchema)]
pub struct RuntimeOut {
    /// Tasks spawned and not yet finished: steady under steady load, so a
    /// count that keeps growing is a leak.
    pub alive_tasks: usize,
    /// Worker threads of the runtime.
    pub workers: usize,
}

impl RuntimeOut {
    /// The counters of the runtime this is called on, if any.
    pub fn current() -> Option<Self> {
        let metrics = tokio::runtime::Handle::try_current().ok()?.metrics();
        Some(RuntimeOut {
            alive_tasks: metrics.num_alive_tasks(),
            workers: metrics.num_workers(),
        })
    }
}

/// One relay's probe.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct ProbeOut {
    pub relay: String,
    pub reachable: bool,
    /// Whether the session ended up encrypted.
    pub tls: bool,
    /// AUTH succeeded (`true`), failed (`false`), or none configured (absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<bool>,
    /// For an `xoauth2` relay: whether an OAuth2 access token was obtained.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<bool>,
    pub latency_ms: u64,
    /// MAIL, RCPT and DATA go in one write: the server offers PIPELINING and
    /// the relay allows it.
    pub pipelining: bool,
    /// The largest message the server takes, in bytes, when it announced
    /// one (SIZE): a larger message goes to another relay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_limit: Option<u64>,
    /// The limits the server announced with LIMITS (RFC 9422), which
    /// mailmux keeps to; absent when it announced none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsOut>,
    /// The server announced DSN (RFC 3461): the relay's `dsn_notify` and
    /// `dsn_ret`, when set, are asked of it.
    pub dsn: bool,
    /// The failure class, when the probe failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_class: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_text: Option<String>,
}

impl From<&ProbeReport> for ProbeOut {
    fn from(p: &ProbeReport) -> Self {
        ProbeOut {
            relay: p.relay.clone(),
            reachable: p.reachable,
            tls: p.tls,
            auth: p.auth,
            token: p.token,
            latency_ms: millis(p.latency),
            pipelining: p.pipelining,
            size_limit: p.size_limit,
            limits: LimitsOut::of(&p.limits),
            dsn: p.dsn,
            error_class: p.error.as_ref().map(|(c, _)| c.as_str().to_string()),
            error_text: p.error.as_ref().map(|(_, t)| t.clone()),
        }
    }
}

/// The limits a server announced with LIMITS (RFC 9422), by their names.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub struct LimitsOut {
    /// Transactions a session; the connection is closed after them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mailmax: Option<u64>,
    /// Recipients a transaction; more go in further transactions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rcptmax: Option<u64>,
    /// Recipient domains a transaction.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rcptdomainmax: Option<u64>,
}

impl LimitsOut {
    fn of(l: &mailmux_actors::ServerLimits) -> Option<LimitsOut> {
        let out = LimitsOut {
            mailmax: l.mail.map(|n| u64::from(n.get())),
            rcptmax: l.rcpt.map(|n| n.get() as u64),
            rcptdomainmax: l.rcpt_domains.map(|n| n.get() as u64),
        };
        (out.mailmax.is_some() || out.rcptmax.is_some() || out.rcptdomainmax.is_some())
            .then_some(out)
    }

    /// `RCPTMAX=50 MAILMAX=1000`, as the server announced them.
    pub fn announced(&self) -> String {
        [
            ("RCPTMAX", self.rcptmax),
            ("RCPTDOMAINMAX", self.rcptdomainmax),
            ("MAILMAX", self.mailmax),
        ]
        .into_iter()
        .filter_map(|(name, n)| Some(format!("{name}={}", n?)))
        .collect::<Vec<_>>()
        .join(" ")
    }
}

/// Result of `test_smtp_connection`.
#[derive(Debug, Clone, Default, Serialize, JsonSchema)]
pub struct ProbeResult {
    /// Every probed relay answered and authenticated.
    pub ok: bool,
    pub relays: Vec<ProbeOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ToolError>,
}

/// Result of `switch_smtp_server`.
#[derive(Debug, Clone, Default, Serialize, JsonSchema)]
pub struct SwitchResult {
    /// The pinned relay; absent under automatic selection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    /// The relay the next message would go to, if any is available.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    pub strategy: String,
    /// Every relay name, for the next call.
    pub relays: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ToolError>,
}

impl SwitchResult {
    pub fn from_selection(s: &Selection, relays: Vec<String>) -> Self {
        SwitchResult {
            pinned: s.pinned.clone(),
            next: s.next.clone(),
            strategy: s.strategy.as_str().to_string(),
            relays,
            error: None,
        }
    }
}

/// Result of `reload_smtp_configuration`.
#[derive(Debug, Clone, Default, Serialize, JsonSchema)]
pub struct ReloadResult {
    /// Whether the new configuration is now in force.
    pub reloaded: bool,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    /// The strategy or attempt limit changed.
    pub router_changed: bool,
    /// Daemon settings (composition rules, deadlines) changed.
    pub daemon_changed: bool,
    /// Changed keys that take effect only at the next start (the queue's
    /// store and schedule, the HTTP listener, …); the rest is in force.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub restart_needed: Vec<String>,
    pub config_sources: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ToolError>,
}

/// One relay after `reconnect_smtp_servers`.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct RelayStateOut {
    pub name: String,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_retry_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Result of `reconnect_smtp_servers`.
#[derive(Debug, Clone, Default, Serialize, JsonSchema)]
pub struct ReconnectResult {
    pub relays: Vec<RelayStateOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ToolError>,
}

impl ReconnectResult {
    pub fn from_snapshot(s: &Snapshot) -> Self {
        ReconnectResult {
            relays: s
                .relays
                .iter()
                .map(|r| RelayStateOut {
                    name: r.name.clone(),
                    state: r.state.as_str().to_string(),
                    next_retry_secs: r.state.retry_in().map(secs),
                    last_error: r.last_error.clone(),
                })
                .collect(),
            error: None,
        }
    }
}

tool_output!(
    SendResult,
    StatusResult,
    ProbeResult,
    SwitchResult,
    ReloadResult,
    ReconnectResult,
    MessageStatusResult,
    ListMessagesResult,
    CancelMessageResult,
    SendBatchResult
);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn announced_limits_are_shown_by_their_names_and_absent_when_none() {
        use std::num::{NonZeroU32, NonZeroUsize};
        let none = mailmux_actors::ServerLimits::default();
        assert_eq!(LimitsOut::of(&none), None);
        let some = mailmux_actors::ServerLimits {
            mail: NonZeroU32::new(1000),
            rcpt: NonZeroUsize::new(50),
            rcpt_domains: None,
        };
        let out = LimitsOut::of(&some).unwrap();
        assert_eq!(
            serde_json::to_value(&out).unwrap(),
            json!({"MAILMAX": 1000, "RCPTMAX": 50})
        );
        assert_eq!(out.announced(), "RCPTMAX=50 MAILMAX=1000");
    }

    /// The names a tool's schema lists, which `Params::FIELDS` must equal.
    fn properties<T: JsonSchema>() -> Vec<String> {
        let schema = schemars::SchemaGenerator::default().into_root_schema_for::<Checked<T>>();
        assert_eq!(schema.get("additionalProperties"), Some(&json!(false)));
        let mut names: Vec<String> = schema
            .get("properties")
            .and_then(|p| p.as_object())
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    fn fields<T: Params>() -> Vec<String> {
        let mut names: Vec<String> = T::FIELDS.iter().map(|f| f.to_string()).collect();
        names.sort();
        names
    }

    #[test]
    fn every_tool_lists_the_fields_its_schema_has() {
        assert_eq!(fields::<SendEmailParams>(), properties::<SendEmailParams>());
        assert_eq!(fields::<SendBatchParams>(), properties::<SendBatchParams>());
        assert_eq!(
            fields::<MessageStatusParams>(),
            properties::<MessageStatusParams>()
        );
        assert_eq!(
            fields::<ListMessagesParams>(),
            properties::<ListMessagesParams>()
        );
        assert_eq!(
            fields::<CancelMessageParams>(),
            properties::<CancelMessageParams>()
        );
        assert_eq!(
            fields::<ServerNameParams>(),
            properties::<ServerNameParams>()
        );
        assert_eq!(fields::<NoParams>(), properties::<NoParams>());
        let e = parse::<NoParams>(json!({"server_name": "a"}), NoParams::FIELDS).unwrap_err();
        assert_eq!((e.field.as_str(), e.rule), ("server_name", "unknown_field"));
        assert!(
            e.message.ends_with("this tool takes no parameters"),
            "{}",
            e.message
        );
        parse::<NoParams>(json!({"server_name": null}), NoParams::FIELDS).unwrap();
        for f in MESSAGE_FIELDS {
            assert!(SendEmailParams::FIELDS.contains(f), "{f}");
        }
    }

    fn send(args: serde_json::Value) -> Result<SendEmailParams, ShapeError> {
        parse(args, SendEmailParams::FIELDS)
    }

    fn refused(args: serde_json::Value) -> ShapeError {
        match send(args.clone()) {
            Ok(p) => panic!("{args} was read as {p:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_value_repeated_to_its_caller_is_cut_and_escaped() {
        assert_eq!(quoted("m-1@x"), "\"m-1@x\"");
        assert_eq!(quoted("a\r\nb"), "\"a\\r\\nb\"");
        let long = "é".repeat(100_000);
        let shown = quoted(&long);
        assert!(shown.chars().count() < MAX_QUOTED + 30, "{shown}");
        assert!(shown.ends_with("… (200000 bytes)"), "{shown}");
        assert_eq!(logged("m-1@x"), "m-1@x");
        assert_eq!(logged(&long), shown);
    }

    #[test]
    fn a_misspelt_field_is_refused_with_the_one_meant() {
        let e = refused(json!({"to": "a@example.org", "bbc": "b@example.org"}));
        assert_eq!((e.field.as_str(), e.rule), ("bbc", "unknown_field"));
        assert!(e.message.contains("did you mean `bcc`?"), "{}", e.message);

        let e = refused(json!({"to": "a@example.org", "attachment": []}));
        assert!(e.message.contains("`attachments`"), "{}", e.message);

        // Nothing close: every parameter is listed.
        let e = refused(json!({"to": "a@example.org", "urgency": "high"}));
        assert_eq!(e.field, "urgency");
        assert!(e.message.contains("template_vars"), "{}", e.message);

        // A name the caller chose is cut and shown without its controls.
        let long = format!("x\r\n{}", "y".repeat(500));
        let e = refused(json!({ long: 1 }));
        assert_eq!(e.field.chars().count(), MAX_SHOWN);
        assert!(!e.message.contains(['\r', '\n']), "{}", e.message);
    }

    #[test]
    fn a_wrong_type_names_its_innermost_field() {
        let cases = [
            (json!({"to": 5}), "to"),
            (json!({"to": ["a@example.org", 5]}), "to[1]"),
            (json!({"bcc": {"a": 1}}), "bcc"),
            (json!({"to": "a@example.org", "subject": 7}), "subject"),
            (json!({"to": "a@example.org", "wait": "yes"}), "wait"),
            (
                json!({"to": "a@example.org", "template_vars": {"n": 42}}),
                "template_vars.n",
            ),
            (
                json!({"to": "a@example.org", "template_vars": "n=1"}),
                "template_vars",
            ),
            (
                json!({"to": "a@example.org", "attachments": "a.txt"}),
                "attachments",
            ),
            (
                json!({"to": "a@example.org", "attachments": [{"path": "a"}, "b"]}),
                "attachments[1]",
            ),
            (
                json!({"to": "a@example.org", "attachments": [{"path": ["a"]}]}),
                "attachments[0].path",
            ),
        ];
        for (args, field) in cases {
            let e = refused(args.clone());
            assert_eq!((e.field.as_str(), e.rule), (field, "schema"), "{args}");
            assert!(e.message.starts_with(field), "{args}: {}", e.message);
        }
    }

    /// A misspelt key of an attachment would send it without what it
    /// says (an inline image attached, a type guessed): refused, naming it.
    #[test]
    fn an_unknown_key_of_an_attachment_is_refused_with_the_closest() {
        let e = refused(json!({
            "to": "a@example.org",
            "attachments": [
                {"path": "a.png", "content_id": "logo"},
                {"filename": "b.png", "content_base64": "YQ==", "contentid": "x"},
            ],
        }));
        assert_eq!(
            (e.field.as_str(), e.rule),
            ("attachments[1].contentid", "unknown_field")
        );
        assert!(
            e.message.contains("did you mean `content_id`?"),
            "{}",
            e.message
        );
        let e = refused(json!({
            "to": "a@example.org",
            "attachments": [{"path": "a.png", "zzzzzzzzzzzz": 1}],
        }));
        assert_eq!(e.field, "attachments[0].zzzzzzzzzzzz");
        assert!(e.message.contains("content_id"), "{}", e.message);
        let e = refused(json!({
            "to": "a@example.org",
            "attachments": [{"path": "a.png", "content_id": 7}],
        }));
        assert_eq!(
            (e.field.as_str(), e.rule),
            ("attachments[0].content_id", "schema")
        );
    }

    #[test]
    fn null_is_an_absent_field() {
        let p = send(json!({"to": "a@example.org", "cc": null, "subject": null, "wait": null}))
            .unwrap();
        assert_eq!(p.draft.cc, crate::compose::Recipients::default());
        assert_eq!(p.draft.subject, "");
        assert_eq!(p.wait, None);
    }

    #[test]
    fn other_tools_name_their_fields_too() {
        let e = parse::<ListMessagesParams>(json!({"limit": -1}), ListMessagesParams::FIELDS)
            .unwrap_err();
        assert_eq!((e.field.as_str(), e.rule), ("limit", "schema"));
        let e = parse::<ListMessagesParams>(json!({"stat": "sent"}), ListMessagesParams::FIELDS)
            .unwrap_err();
        assert_eq!((e.field.as_str(), e.rule), ("stat", "unknown_field"));
        assert!(e.message.contains("`status`"), "{}", e.message);
        let e = parse::<SendBatchParams>(json!({}), SendBatchParams::FIELDS).unwrap_err();
        assert_eq!((e.field.as_str(), e.rule), ("messages", "required"));
        let e = parse::<CancelMessageParams>(json!({"batch_id": 7}), CancelMessageParams::FIELDS)
            .unwrap_err();
        assert_eq!((e.field.as_str(), e.rule), ("batch_id", "schema"));
        let e = parse::<ServerNameParams>(json!({"server": "a"}), ServerNameParams::FIELDS)
            .unwrap_err();
        assert_eq!((e.field.as_str(), e.rule), ("server", "unknown_field"));
        let e = parse::<SendBatchParams>(json!({"messages": [{}, 3]}), SendBatchParams::FIELDS)
            .unwrap_err();
        assert_eq!(e.field, "messages[1]");
    }
}
