//! The MCP tools (sending, status, the queue, the relays) and the resource
//! handlers. Each maps typed arguments to the queue or the dispatcher and
//! back to a structured result; `prepare` holds the checks every message
//! goes through (compose, then the caller's policy, rate and approval).
//!
//! A failure the agent can act on is a result with `isError: true` and a
//! structured `error`; JSON-RPC errors are left to rmcp for protocol faults.

use std::collections::HashMap;
use std::sync::Arc;

use std::time::{Duration, SystemTime};

use mailmux_actors::queue::{
    self, Cancel, Filter, Hold, QueueError, RateTake, Record, SEARCH_ROWS, State, StoreError,
    Stream, Submit,
};
use mailmux_actors::{ControlError, Mail};
use rmcp::RoleServer;
use rmcp::handler::server::tool::{ToolCallContext, schema_for_output};
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, CancelTaskParams,
    CancelledNotificationParam, ContentBlock, CustomRequest, CustomResult, Extensions,
    GetTaskParams, GetTaskResult, Implementation, ListResourceTemplatesResult, ListResourcesResult,
    ListToolsResult, PaginatedRequestParams, ProtocolVersion, ReadResourceRequestParams,
    ReadResourceResponse, ReadResourceResult, Resource, ResourceContents, ResourceTemplate,
    ServerCapabilities, ServerConfig, SubscribeRequestParams, SubscriptionFilter,
    UnsubscribeRequestParams,
};
use rmcp::service::{NotificationContext, RequestContext, SubscriptionContext};
use rmcp::{ErrorData, ServerHandler, tool, tool_handler, tool_router};
use sha2::Digest;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field::Empty};

use super::approval::{Answered, Ask};
use super::types::*;
use super::{MailmuxServer, approval, resources};
use crate::audit::{Meta, Refusal};
use crate::compose::{
    AttachmentInput, ComposePolicy, Composed, Draft, SharedAttachments, compose_scanned,
    compose_with,
};
use crate::config;
use crate::policy::rate::Limited;
use crate::policy::{Caller, Verdict};

/// Serialises a result; `isError` follows the presence of its `error`.
pub(super) fn respond<T: ToolOutput>(out: T, text: String) -> Result<CallToolResult, ErrorData> {
    let internal = |e: serde_json::Error| ErrorData::internal_error(e.to_string(), None);
    let value = serde_json::to_value(&out).map_err(internal)?;
    // The JSON text block, written as rmcp's `structured` writes it, but by
    // serde_json's writer rather than through `Display` (half the cost).
    let json = serde_json::to_string(&value).map_err(internal)?;
    // The sentence comes first: clients that show one text block show it.
    let content = vec![ContentBlock::text(text), ContentBlock::text(json)];
    let mut result = if out.error().is_some() {
        CallToolResult::error(content)
    } else {
        CallToolResult::success(content)
    };
    result.structured_content = Some(value);
    Ok(result)
}

fn fail<T: ToolOutput>(e: ToolError) -> Result<CallToolResult, ErrorData> {
    let text = e.message.clone();
    tracing::info!(code = %e.code, "tool call failed: {text}");
    respond(T::from_error(e), text)
}

/// Composes `draft` for `caller`: with its content checks, each
/// attachment's decoded bytes are scanned while they are at hand.
fn compose_for(
    caller: &Caller,
    draft: &Draft,
    policy: &ComposePolicy,
    shared: Option<&SharedAttachments>,
) -> Result<Composed, crate::compose::ComposeError> {
    let checks = &caller.policy.content_checks;
    if checks.is_empty() {
        return compose_with(draft, policy, shared);
    }
    compose_scanned(draft, policy, shared, &|data| checks.scan(data))
}

fn failed(e: ToolError) -> (SendResult, String) {
    let text = e.message.clone();
    tracing::info!(code = %e.code, "send refused: {text}");
    (SendResult::from_error(e), text)
}

fn control_error(e: ControlError) -> ToolError {
    match e {
        ControlError::UnknownRelay { name, valid } => ToolError::unknown_relay(&name, valid),
        ControlError::Invalid(m) => ToolError::new("invalid_config", m),
        ControlError::Stopped => ToolError::unavailable(),
    }
}

/// A send the queue did not take. When the store could not confirm the
/// write (a shared store whose connection broke before its answer), the
/// message may be stored and delivered: the caller is told so, with the
/// Message-ID to look for, instead of "not accepted".
fn queue_unavailable(e: &QueueError, message_id: Option<&str>) -> ToolError {
    match e {
        QueueError::Full(_) => ToolError::new("queue_full", format!("{e}; nothing was sent")),
        QueueError::Store(StoreError::Unconfirmed(_)) => ToolError::new(
            "queue_unavailable",
            match message_id {
                Some(id) => format!(
                    "{e}. The message may have been stored and may be delivered: ask get_message_status for {id} before sending it again"
                ),
                None => format!(
                    "{e}. These messages may have been stored and may be delivered: look for them with list_messages before sending them again"
                ),
            },
        ),
        _ => ToolError::new(
            "queue_unavailable",
            format!("the queue store is unavailable, so the message was not accepted: {e}"),
        ),
    }
}

pub(super) fn queue_error(e: &QueueError) -> ToolError {
    ToolError::new(
        "queue_unavailable",
        format!("the queue store is unavailable: {e}"),
    )
}

/// Why a message did not get its caller's rate.
enum RateRefusal {
    /// Over a limit.
    Limited(Limited),
    /// The store that keeps the limits for every daemon did not answer.
    Store(StoreError),
}

impl MailmuxServer {
    /// Takes the message to `recipients` from the caller's rate limits:
    /// in the store when the daemons sharing it keep them there, so that
    /// a caller has its rate once over all of them; else in this daemon.
    async fn take_rate(&self, caller: &Caller, recipients: &[String]) -> Result<(), RateRefusal> {
        let recipients: Vec<&str> = recipients.iter().map(String::as_str).collect();
        let queue = self.queue();
        if !queue.shares_rates() {
            return caller.take_rate(&recipients).map_err(RateRefusal::Limited);
        }
        let shared = caller
            .shared_rate(&recipients)
            .map_err(RateRefusal::Limited)?;
        match queue.take_rates(&shared.takes).await {
            Ok(None) => Ok(()),
            Ok(Some((i, wait))) => Err(RateRefusal::Limited(shared.refused(i, wait))),
            Err(e) => Err(RateRefusal::Store(e)),
        }
    }
}

/// The longest text `list_messages` searches recipients for: an address's
/// length (RFC 5321's path, less its angle brackets).
const MAX_RECIPIENT_SEARCH: usize = 254;

/// A batch message's error, its field named within `messages[i]`.
fn within_message(i: usize, mut e: ToolError) -> ToolError {
    e.field = Some(match e.field.take() {
        Some(f) => format!("messages[{i}].{f}"),
        None => format!("messages[{i}]"),
    });
    e
}

/// Hands the messages a streaming batch held on to its store transaction,
/// in their order.
async fn hand_on(st: &mut Stream, ready: &mut Vec<(usize, Submit)>, streamed: &mut Vec<usize>) {
    for (i, s) in ready.drain(..) {
        st.push(s).await;
        streamed.push(i);
    }
}

/// Takes out of a batch the held messages that did not get their rate
/// (`refused`: each one's index and error): out of `ready`, their form
/// out of `to_ask` and their size out of `total`, their error into
/// `results`. Whether there were any.
fn drop_refused(
    refused: Vec<(usize, ToolError)>,
    ready: &mut Vec<(usize, Submit)>,
    results: &mut [BatchItemOut],
    to_ask: &mut Vec<(usize, String, [u8; 32])>,
    total: &mut usize,
) -> bool {
    let any = !refused.is_empty();
    for (i, e) in refused {
        if let Some(at) = ready.iter().position(|(j, _)| *j == i) {
            let (_, s) = ready.remove(at);
            *total -= s.mail.bytes.len();
        }
        to_ask.retain(|(j, ..)| *j != i);
        if let Some(r) = results.get_mut(i) {
            *r = BatchItemOut {
                index: i,
                error: Some(e),
                ..BatchItemOut::default()
            };
        }
    }
    any
}

/// The refusal of a message to `recipients` (given in `fields`) that is
/// over its caller's rate limit, or that has more recipients than one
/// allows at all.
fn rate_error(
    caller: &Caller,
    limited: Limited,
    fields: &[(&'static str, usize)],
    recipients: &[String],
) -> ToolError {
    // A `per_recipient` limit names the recipient that had its count.
    let recipient = limited.recipient.map(|i| {
        let (list, at) = fields.get(i).copied().unwrap_or(("to", i));
        let address = recipients.get(i).map_or("", String::as_str);
        (format!("{list}[{at}]"), address)
    });
    match limited.retry_after {
        Some(after) => ToolError {
            rule: Some(limited.rule.clone()),
            field: recipient.as_ref().map(|(field, _)| field.clone()),
            retry_after_s: Some((after.as_secs_f64() * 1000.0).ceil() / 1000.0),
            ..ToolError::new(
                "rate_limited",
                format!(
                    "caller {:?} is over its rate limit {}{}; try again in {:.1} s. Nothing was sent",
                    caller.name,
                    limited.rule,
                    recipient
                        .as_ref()
                        .map(|(field, a)| format!(" for {field} {a}"))
                        .unwrap_or_default(),
                    after.as_secs_f64()
                ),
            )
        },
        None => ToolError {
            field: Some("to".into()),
            rule: Some("rate_exceeds_limit".into()),
            ..ToolError::new(
                "policy_denied",
                format!(
                    "the message has more recipients than the rate limit {} allows at all; nothing was sent",
                    limited.rule
                ),
            )
        },
    }
}

fn invalid(field: &str, rule: &str, message: String) -> ToolError {
    ToolError {
        field: Some(field.into()),
        rule: Some(rule.into()),
        ..ToolError::new("invalid_input", message)
    }
}

/// The relays a message from `from` may go through: those of the caller's
/// `allowed_relays` whose `senders` take it (`None`: any relay). An error
/// when none may, or when the relay the call asked for (`asked`) does not
/// carry that sender.
#[allow(clippy::result_large_err)] // the error is the tool's answer, built once
fn relays_for(
    config: &config::Config,
    caller: &Caller,
    from: &lettre::Address,
    asked: Option<&str>,
) -> Result<Option<Arc<[String]>>, ToolError> {
    let allowed = caller.relays();
    let Some(carrying) = config.relays_for_sender(from) else {
        return Ok(allowed);
    };
    // The errors name no relay's senders: they may be addresses, and the
    // caller is told of no address it did not give.
    if let Some(name) = asked
        && !carrying.iter().any(|n| n == name)
    {
        return Err(invalid(
            "relay",
            "relay_not_for_sender",
            format!(
                "relay {name:?} does not carry mail from {from} (its `senders`); nothing was sent"
            ),
        ));
    }
    let only: Vec<String> = carrying
        .into_iter()
        .filter(|n| allowed.as_ref().is_none_or(|a| a.contains(n)))
        .collect();
    if only.is_empty() {
        return Err(invalid(
            "from_email",
            "no_relay_for_sender",
            format!(
                "no relay {}carries mail from {from} (each relay's `senders`); nothing was sent",
                if allowed.is_some() {
                    "this caller may use "
                } else {
                    ""
                }
            ),
        ));
    }
    Ok(Some(Arc::from(only)))
}

/// Arguments of the wrong shape, as the tool's answer.
fn shape(e: ShapeError) -> ToolError {
    invalid(&e.field, e.rule, e.message)
}

/// The part of a refused message's subject the audit log keeps, in characters.
const MAX_AUDIT_SUBJECT: usize = 998;

/// The composed bytes a `send_batch` holds at most: past this, its
/// messages are written into the store's transaction as they are composed
/// ([`mailmux_actors::queue::Queue::stream`]) rather than held and stored
/// at the end, so that a batch of 1,000 large messages needs no more memory
/// than a few of them. Below it, the batch is stored with one write that
/// may share its commit with other callers' writes.
const BATCH_HELD_BYTES: usize = 4 * 1024 * 1024;

/// The composed bytes a streaming `send_batch` holds back while their
/// caller's rate is not taken yet: the rates of the messages held are taken
/// together (one statement for several on PostgreSQL) before they are
/// handed on to the store.
const STREAM_RATE_BYTES: usize = 1024 * 1024;

/// Longest idempotency key, in characters.
const MAX_KEY_CHARS: usize = 200;

/// Checks `idempotency_key` and `send_at`; returns the key and the time.
#[allow(clippy::result_large_err)] // the error is the tool's answer, built once
fn check_queue_params(
    p: &SendEmailParams,
    config: &config::Config,
) -> Result<QueueParams, ToolError> {
    if let Some(key) = &p.idempotency_key {
        let n = key.chars().count();
        if n == 0 || n > MAX_KEY_CHARS {
            return Err(invalid(
                "idempotency_key",
                "length",
                format!("idempotency_key must be 1 to {MAX_KEY_CHARS} characters, got {n}"),
            ));
        }
        if key.chars().any(char::is_control) {
            return Err(invalid(
                "idempotency_key",
                "printable",
                "idempotency_key must hold printable characters only (no control characters)"
                    .into(),
            ));
        }
    }
    let send_at = match p.send_at.as_deref().map(str::trim) {
        None => None,
        Some(text) => {
            let now = SystemTime::now();
            // None: a delay past what the clock can hold.
            let at = match text.parse::<jiff::Timestamp>() {
                Ok(t) => Some(SystemTime::from(t)),
                Err(e) => match humantime::parse_duration(text) {
                    Ok(d) => now.checked_add(d),
                    Err(_) => {
                        // A date jiff cannot take (a year past 9999, a
                        // month 13): its own words say why.
                        let why = if looks_like_a_date(text) {
                            format!("is not a valid RFC 3339 time: {e}")
                        } else {
                            "is neither an RFC 3339 time (2026-12-01T09:00:00Z) nor a delay such as 10m or 2h".into()
                        };
                        return Err(invalid(
                            "send_at",
                            "time",
                            format!("send_at {} {why}", quoted(text)),
                        ));
                    }
                },
            };
            let limit = config.queue.max_schedule;
            let ahead = at.map(|at| at.duration_since(now).unwrap_or(Duration::ZERO));
            if ahead.is_none_or(|ahead| ahead > limit) {
                return Err(invalid(
                    "send_at",
                    "max_schedule",
                    format!(
                        "send_at is more than queue.max_schedule ({}) ahead",
                        humantime::format_duration(limit)
                    ),
                ));
            }
            at
        }
    };
    let own_max_age = match p.max_age.as_deref().map(str::trim) {
        None => None,
        Some(text) => match humantime::parse_duration(text) {
            Ok(d) if d >= Duration::from_secs(1) => Some(d),
            Ok(_) => {
                return Err(invalid(
                    "max_age",
                    "range",
                    "max_age must be at least 1s".into(),
                ));
            }
            Err(_) => {
                return Err(invalid(
                    "max_age",
                    "duration",
                    format!(
                        "max_age {} is not a duration such as 10m or 2h",
                        quoted(text)
                    ),
                ));
            }
        },
    };
    Ok(QueueParams {
        idempotency_key: p.idempotency_key.clone(),
        send_at,
        max_age: own_max_age,
    })
}

/// The queue's parameters of a send, checked.
struct QueueParams {
    idempotency_key: Option<String>,
    send_at: Option<SystemTime>,
    /// The message's own `max_age`, when the call gave one: at least a
    /// second; [`MailmuxServer::prepare_with`] checks it against the
    /// caller's.
    max_age: Option<Duration>,
}

/// The refusal of a message's own `max_age` longer than its caller's.
fn longer_than_the_callers(max_age: Duration) -> ToolError {
    invalid(
        "max_age",
        "range",
        format!(
            "max_age must be at most the caller's max_age ({}): a message may be given less \
             time than its caller, never more",
            humantime::format_duration(max_age)
        ),
    )
}

/// Whether `text` begins as an RFC 3339 date does (`2026-`).
fn looks_like_a_date(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() > 4 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-'
}

/// The hash that decides "the same content" for an idempotency key: every
/// parameter except `wait` (and the key itself), with the shorthand forms
/// written out ([`crate::compose::Draft::written_out`]).
fn content_hash(p: &SendEmailParams, shared: Option<&SharedAttachments>) -> [u8; 32] {
    let written_out = p.draft.written_out();
    let draft = written_out.as_ref().unwrap_or(&p.draft);
    let content = (draft, &p.relay, &p.dry_run, &p.send_at);
    let bytes = serde_json::to_vec(&content).unwrap_or_default();
    let mut hash = sha2::Sha256::new();
    hash.update(&bytes);
    // Only when given, so that a call without it hashes as it always did.
    if let Some(max_age) = &p.max_age {
        hash.update(b"\0max_age\0");
        hash.update(max_age.as_bytes());
    }
    // Attachments from a batch's defaults are part of the content too.
    if let Some(s) = shared.filter(|_| p.draft.attachments.is_empty()) {
        hash.update(s.digest);
    }
    hash.finalize().into()
}

/// The span of one tool call; `message_id` and `relay` are recorded when known.
pub fn tool_span(tool: &'static str) -> tracing::Span {
    tracing::info_span!(
        "tool",
        tool,
        caller = Empty,
        message_id = Empty,
        relay = Empty
    )
}

/// The caller of a request: the one the HTTP guard found for its token,
/// else (stdio, in process) the stdio caller. An HTTP request without one
/// never reaches a tool (the guard answers 401).
pub fn caller_of(server: &MailmuxServer, ctx: &RequestContext<RoleServer>) -> Option<Arc<Caller>> {
    caller_in(server, &ctx.extensions)
}

/// [`caller_of`], from a request's or a notification's extensions.
fn caller_in(server: &MailmuxServer, extensions: &Extensions) -> Option<Arc<Caller>> {
    match extensions.get::<axum::http::request::Parts>() {
        Some(parts) => parts.extensions.get::<Arc<Caller>>().cloned(),
        None => Some(server.gate().stdio_caller()),
    }
}

impl MailmuxServer {
    /// The message `id` if it exists and `caller` may see it: another
    /// caller's message is not shown, nor said to exist.
    pub(super) async fn owned_by(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<Option<Record>, QueueError> {
        Ok(self
            .queue()
            .status(id)
            .await?
            .filter(|r| owns(caller, r.caller.as_deref())))
    }

    /// Whether the message exists and `caller` may see it.
    async fn visible(&self, caller: &Caller, id: &str) -> bool {
        matches!(self.owned_by(caller, id).await, Ok(Some(_)))
    }
}

/// A refusal by the caller's policy, as the tool error `policy_denied`.
fn denied(d: crate::policy::Denied) -> ToolError {
    ToolError {
        field: Some(d.field),
        rule: Some(d.rule.into()),
        check: d.check,
        ..ToolError::new("policy_denied", format!("{}; nothing was sent", d.message))
    }
}

/// A recipient on the suppression list, as the tool error
/// `recipient_suppressed`.
fn suppressed(field: &str, address: &str, listed: &crate::suppress::Listed) -> ToolError {
    let since = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(listed.at.max(0) as u64),
    );
    ToolError {
        field: Some(field.into()),
        rule: Some(listed.reason.to_string()),
        ..ToolError::new(
            "recipient_suppressed",
            format!(
                "{field} {address} is on the suppression list ({}, since {since}): mail to it is refused until an operator takes it off; nothing was sent",
                listed.reason
            ),
        )
    }
}

/// A call from a request without a caller: refused, and said so.
fn no_caller() -> ToolError {
    ToolError::new(
        "unauthorized",
        "the request carries no known caller; nothing was done",
    )
}

/// The tools that act on the relays every caller shares, which a caller
/// uses only under `relay_control` (switch_smtp_server only to pin or
/// unpin; showing the selection is a read).
pub const RELAY_CONTROL_TOOLS: &[&str] = &[
    "switch_smtp_server",
    "reload_smtp_configuration",
    "reconnect_smtp_servers",
    "test_smtp_connection",
];

/// The refusal of `tool` to a caller whose policy keeps it off the
/// relays, if it is one.
fn relay_control(caller: Option<&Caller>, tool: &str) -> Option<ToolError> {
    let Some(caller) = caller else {
        return Some(no_caller());
    };
    if caller.policy.relay_control {
        return None;
    }
    tracing::warn!(caller = %caller.name, tool, "relay control refused by policy");
    Some(ToolError {
        rule: Some("relay_control".into()),
        ..ToolError::new(
            "policy_denied",
            format!(
                "caller {:?} may not use {tool}: its policy has relay_control = false \
                 (pinning, reloading, reconnecting and probing act on every caller's relays); \
                 nothing was done",
                &*caller.name
            ),
        )
    })
}

/// The stored state a round's report stands for.
fn reported(status: mailmux_actors::Status) -> State {
    match status {
        mailmux_actors::Status::Sent => State::Sent,
        mailmux_actors::Status::Partial => State::Partial,
        mailmux_actors::Status::Unknown => State::Unknown,
        mailmux_actors::Status::Failed => State::Failed,
    }
}

/// A call its client cancelled before anything of it was stored.
fn cancelled_call() -> ToolError {
    ToolError::new("cancelled", QueueError::Cancelled.to_string())
}

/// An idempotency key at `field` that names another message.
fn key_conflict(field: String, message: String) -> ToolError {
    ToolError {
        field: Some(field),
        rule: Some("same_content".into()),
        ..ToolError::new("idempotency_conflict", message)
    }
}

/// A batch its client cancelled before any message of it was stored.
fn cancelled_batch() -> ToolError {
    ToolError::new(
        "cancelled",
        "the call was cancelled before its messages were stored; nothing was sent",
    )
}

/// Whether `caller` may see or act on a message stored by `owner`.
fn owns(caller: &Caller, owner: Option<&str>) -> bool {
    owner.is_none_or(|o| o == &*caller.name)
}

/// The sentence that comes with a `send_email` result.
pub(super) fn describe(out: &SendResult, message_id: &str, replay: bool) -> String {
    match out.status {
        _ if replay => format!(
            "idempotent replay: {message_id} is {}; nothing was sent again",
            out.status.as_str()
        ),
        SendStatus::Sent => format!(
            "sent {message_id} via {} to {}",
            out.relay.as_deref().unwrap_or("?"),
            out.accepted.join(", ")
        ),
        SendStatus::Queued => match &out.next_attempt_at {
            Some(t) if !out.deferred.is_empty() => format!(
                "queued {message_id}: sent to {}; deferred for {}, next attempt at {t}",
                out.accepted.join(", "),
                out.deferred.join(", ")
            ),
            Some(t) if !out.attempts.is_empty() => {
                format!("queued {message_id}: no relay took it yet; next attempt at {t}")
            }
            _ => format!("queued {message_id}"),
        },
        SendStatus::Scheduled => format!(
            "scheduled {message_id} for {}",
            out.next_attempt_at.as_deref().unwrap_or("?")
        ),
        SendStatus::Held => format!(
            "held {message_id} for approval: nothing is sent unless a person approves it (until {})",
            out.next_attempt_at.as_deref().unwrap_or("?")
        ),
        SendStatus::Rejected => {
            format!("rejected {message_id}: the approver refused it; nothing was sent")
        }
        status => format!(
            "{}: {}",
            status.as_str(),
            out.message.clone().unwrap_or_else(|| "see attempts".into())
        ),
    }
}

/// What [`MailmuxServer::prepare`] made of a call.
enum Prepared {
    /// Answered already: refused, or a dry run.
    Done(Box<(SendResult, String)>),
    Ready(Box<Ready>),
}

/// A checked, composed message ready for the queue.
struct Ready {
    submit: Submit,
    envelope: Envelope,
    deadline: tokio::time::Instant,
    wait: bool,
    /// The approval form's text, when the message is held.
    prompt: Option<String>,
    hold_hash: Option<[u8; 32]>,
    /// Its caller's rate, not yet taken: a batch takes those of many
    /// messages together ([`MailmuxServer::take_deferred`]).
    rate: Option<Box<DeferredRate>>,
}

/// A refused message as the audit log describes it.
#[derive(Debug, Default)]
struct Described {
    message_id: Option<String>,
    from: Option<String>,
    meta: Meta,
    size: Option<usize>,
}

impl Described {
    fn of(c: &Composed) -> Described {
        Described {
            message_id: Some(c.message_id.clone()),
            from: Some(c.from.to_string()),
            meta: meta_of(c),
            size: Some(c.bytes.len()),
        }
    }
}

/// A message's rate takes, left for its batch to take with the others'
/// in one statement of the store that keeps the rates, and what a
/// refusal needs to say.
struct DeferredRate {
    shared: crate::policy::rate::Shared,
    /// The envelope's recipients, and where each was given
    /// (`to`|`cc`|`bcc`, index).
    recipients: Vec<String>,
    fields: Vec<(&'static str, usize)>,
    idempotency: Option<(String, [u8; 32])>,
    described: Option<Described>,
}

/// The audit description of a message: recipients by field, Reply-To,
/// subject, and the names of the fields its caller wrote by name.
fn meta_of(c: &Composed) -> Meta {
    let mut m = Meta {
        subject: c.subject.clone(),
        reply_to: c.reply_to.as_ref().map(ToString::to_string),
        headers: c.own_fields.iter().map(|(name, _)| name.clone()).collect(),
        template: c.template.clone(),
        tag: c.tag.clone(),
        metadata: c.metadata.clone(),
        ..Meta::default()
    };
    for (address, (list, _)) in c.recipients.iter().zip(&c.fields) {
        let out = match *list {
            "to" => &mut m.to,
            "cc" => &mut m.cc,
            _ => &mut m.bcc,
        };
        out.push(address.to_string());
    }
    m
}

/// The hash an approval binds to: the exact bytes and envelope.
fn approval_hash(c: &Composed) -> [u8; 32] {
    let to: Vec<String> = c.recipients.iter().map(ToString::to_string).collect();
    crate::policy::approval_hash(c.from.as_ref(), &to, &c.bytes)
}

#[tool_router(router = tool_router, vis = "pub(crate)")]
impl MailmuxServer {
    /// Send an email (text, HTML or both, with attachments and templates)
    /// through the configured SMTP relays, with failover.
    #[tool(
        name = "send_email",
        description = "Send an email through the configured SMTP relays, with automatic failover. \
                       `to`/`cc`/`bcc` take an array or a comma-separated string. Set `html` for an \
                       HTML body or give `html_body` as an alternative to a text `body`. `dry_run` \
                       renders and validates without sending. The result's `status` is sent, \
                       partial, unknown (may have been delivered: do not resend blindly) or \
                       failed; queued (stored, retried on its own), scheduled (`send_at`) or held \
                       (waiting for a person's approval) when it is not out yet. Give an \
                       `idempotency_key` to make a retry of the call safe. Name a `template` \
                       (get_smtp_status lists those you may) to send its subject and bodies \
                       filled with your `template_vars`. A `tag` (list_messages filters by it) \
                       and `metadata` are kept with the message, never sent; `max_age` gives up \
                       on mail that would arrive too late (a one-time code), and `priority: \
                       \"high\"` sends it before waiting normal mail (a mail merge).",
        output_schema = schema_for_output::<SendResult>()
    )]
    pub async fn send_email(
        &self,
        params: Parameters<Checked<SendEmailParams>>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let tasks = super::tasks::wanted(&ctx);
        let ask = ask_of(&ctx);
        self.send_email_call(params.0.0, &ctx.extensions, ctx.id, ask, tasks)
            .await
    }

    /// Many messages in one call: a mail merge, or unrelated messages.
    #[tool(
        name = "send_batch",
        description = "Send many messages in one call: a mail merge or a set of unrelated \
                       messages. `defaults` holds any send_email field shared by all (subject \
                       and body templates, from_email, attachments, ...); each of `messages` \
                       gives its own to/cc/bcc, template_vars, idempotency_key and any field it \
                       overrides. Every message is validated and checked on its own; the valid \
                       ones are queued in one durable transaction and the others reported. \
                       `results` has one entry per message, in input order. `atomic: true` \
                       queues nothing unless every message is valid.",
        output_schema = schema_for_output::<SendBatchResult>()
    )]
    pub async fn send_batch(
        &self,
        params: Parameters<Checked<SendBatchParams>>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let span = tool_span("send_batch");
        let Some(caller) = caller_of(self, &ctx) else {
            return fail::<SendBatchResult>(no_caller()).map(Into::into);
        };
        span.record("caller", &*caller.name);
        let p = match params.0.0 {
            Ok(p) => p,
            Err(e) => return fail::<SendBatchResult>(shape(e)).map(Into::into),
        };
        let mut ask = ask_of(&ctx);
        // As for `send_email`: only the client's `notifications/cancelled`
        // fires it.
        let call = self
            .cancellable()
            .register(&caller, &ctx.extensions, ctx.id.clone());
        let cancel = Some(call.token.clone());
        let (out, text) = self
            .send_batch_params(caller, p, &mut ask, cancel)
            .instrument(span)
            .await;
        drop(call);
        if let Ask::InResult(Some(form)) = ask {
            return Ok(CallToolResponse::InputRequired(form));
        }
        respond(out, text).map(Into::into)
    }

    /// Probe relays: connect, TLS, EHLO, AUTH, NOOP.
    #[tool(
        name = "test_smtp_connection",
        description = "Probe the SMTP relays (connect, TLS, EHLO, AUTH, NOOP) and report for each \
                       whether it is reachable, encrypted and authenticated, with its latency. \
                       `server_name` probes one relay; omit it for all.",
        output_schema = schema_for_output::<ProbeResult>()
    )]
    pub async fn test_smtp_connection(
        &self,
        params: Parameters<Checked<ServerNameParams>>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let span = tool_span("test_smtp_connection");
        let caller = caller_of(self, &ctx);
        async move {
            if self.is_closing() {
                return fail::<ProbeResult>(ToolError::unavailable());
            }
            let name = match params.0.0 {
                Ok(p) => p.server_name,
                Err(e) => return fail::<ProbeResult>(shape(e)),
            };
            if let Some(e) = relay_control(caller.as_deref(), "test_smtp_connection") {
                return fail::<ProbeResult>(e);
            }
            if let Some(n) = &name {
                tracing::Span::current().record("relay", &*logged(n));
            }
            match self.dispatcher().test_connection(name.as_deref()).await {
                Ok(reports) => {
                    let relays: Vec<ProbeOut> = reports.iter().map(Into::into).collect();
                    let ok = !relays.is_empty()
                        && relays.iter().all(|p| {
                            p.reachable && p.error_class.is_none() && p.auth != Some(false)
                        });
                    let text = relays
                        .iter()
                        .map(|p| match (&p.error_class, &p.error_text) {
                            (None, _) => format!("{}: ok ({} ms)", p.relay, p.latency_ms),
                            (Some(c), t) => {
                                format!("{}: {c}: {}", p.relay, t.as_deref().unwrap_or(""))
                            }
                        })
                        .collect::<Vec<_>>()
                        .join("; ");
                    respond(
                        ProbeResult {
                            ok,
                            relays,
                            error: None,
                        },
                        text,
                    )
                }
                Err(e) => fail::<ProbeResult>(control_error(e)),
            }
        }
        .instrument(span)
        .await
    }

    /// Status of every relay and of the router.
    #[tool(
        name = "get_smtp_status",
        description = "Show every relay's state, health, connections, counters and latency, the \
                       selection strategy, the pinned relay, uptime and version, and the \
                       templates you may name in send_email's `template`, with their variables, \
                       and your policy in brief. Holds no secret.",
        output_schema = schema_for_output::<StatusResult>()
    )]
    pub async fn get_smtp_status(
        &self,
        params: Parameters<Checked<NoParams>>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let span = tool_span("get_smtp_status");
        let caller = caller_of(self, &ctx);
        async move {
            if let Err(e) = params.0.0 {
                return fail::<StatusResult>(shape(e));
            }
            if self.is_closing() {
                return fail::<StatusResult>(ToolError::unavailable());
            }
            let snapshot = match self.dispatcher().status().await {
                Ok(s) => s,
                Err(e) => return fail::<StatusResult>(control_error(e)),
            };
            let config = self.config();
            let warning = super::default_relay_warning(&config);
            let out = StatusResult {
                version: env!("CARGO_PKG_VERSION").to_string(),
                uptime_secs: self.state.started.elapsed().as_secs(),
                strategy: snapshot.strategy.as_str().to_string(),
                pinned: snapshot.pinned.clone(),
                in_flight: snapshot.in_flight,
                router_restarts: snapshot.router_restarts,
                config_sources: config.sources.clone(),
                default_relay: config.default_relay,
                warning: warning.clone(),
                relays: snapshot.relays.iter().map(Into::into).collect(),
                queue: Some(self.queue_status().await),
                caller: caller.as_ref().map(|c| CallerOut {
                    name: c.name.to_string(),
                    mode: match c.policy.mode {
                        crate::policy::Mode::Send => "send".into(),
                        crate::policy::Mode::DryRun => "dry_run".into(),
                    },
                    approval: c.policy.approval.as_str().into(),
                    allowed_recipients: c.policy.allowed_recipients.len(),
                    rate: c.policy.rate.iter().map(|r| r.text.clone()).collect(),
                    require_template: c.policy.require_template,
                    transactional: c.policy.transactional,
                    max_age: c
                        .policy
                        .max_age
                        .map(|d| humantime::format_duration(d).to_string()),
                }),
                templates: config
                    .daemon
                    .compose
                    .templates
                    .0
                    .iter()
                    .filter(|t| {
                        caller.as_ref().is_none_or(|c| {
                            let only = &c.policy.allowed_templates;
                            only.is_empty() || only.contains(&t.name)
                        })
                    })
                    .map(|t| TemplateOut {
                        name: t.name.clone(),
                        description: t.description.clone(),
                        vars: t.vars.clone(),
                        patterns: t
                            .patterns
                            .iter()
                            .map(|p| (p.var.clone(), p.pattern.clone()))
                            .collect(),
                        images: t.image_ids().map(str::to_owned).collect(),
                    })
                    .collect(),
                audit: self.audit().settings().path.as_ref().map(|p| AuditOut {
                    path: p.display().to_string(),
                    healthy: self.audit().healthy(),
                    failed_writes: self.audit().failures(),
                    required: self.audit().settings().required,
                }),
                open_recipients: self.gate().open_recipients(),
                dkim: config
                    .daemon
                    .compose
                    .dkim
                    .0
                    .iter()
                    .map(|k| DkimOut {
                        domain: k.domain.clone(),
                        selector: k.selector.clone(),
                        algorithm: k.algorithm.to_string(),
                    })
                    .collect(),
                bounces: self
                    .state
                    .bounces
                    .snapshot()
                    .into_iter()
                    .map(|b| BounceReaderOut {
                        relay: b.relay,
                        folder: b.folder,
                        last_read_at: b.last_read_at.map(rfc3339),
                        error: b.error,
                        reports: b.reports,
                        listed: b.listed,
                    })
                    .collect(),
                runtime: RuntimeOut::current(),
                error: None,
            };
            let mut text = out
                .relays
                .iter()
                .map(|r| format!("{}: {}", r.name, r.state))
                .collect::<Vec<_>>()
                .join("; ");
            if let Some(w) = warning {
                text = format!("WARNING: {w}. {text}");
            }
            if let Some(w) = out.queue.as_ref().and_then(|q| q.warning.as_ref()) {
                text = format!("WARNING: {w}. {text}");
            }
            if !out.open_recipients.is_empty() {
                text = format!(
                    "WARNING: caller(s) {} may mail any recipient (allowed_recipients is empty). {text}",
                    out.open_recipients.join(", ")
                );
            }
            respond(out, text)
        }
        .instrument(span)
        .await
    }

    /// Pin a relay, unpin with "auto", or show the selection.
    #[tool(
        name = "switch_smtp_server",
        description = "Pin the relay every message tries first (`server_name`), go back to \
                       automatic selection (`\"auto\"`), or, with no argument, show the pinned \
                       relay and the one the next message would go to.",
        output_schema = schema_for_output::<SwitchResult>()
    )]
    pub async fn switch_smtp_server(
        &self,
        params: Parameters<Checked<ServerNameParams>>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let span = tool_span("switch_smtp_server");
        let caller = caller_of(self, &ctx);
        async move {
            if self.is_closing() {
                return fail::<SwitchResult>(ToolError::unavailable());
            }
            let name = match params.0.0 {
                Ok(p) => p.server_name,
                Err(e) => return fail::<SwitchResult>(shape(e)),
            };
            if name.is_some()
                && let Some(e) = relay_control(caller.as_deref(), "switch_smtp_server")
            {
                return fail::<SwitchResult>(ToolError {
                    field: Some("server_name".into()),
                    ..e
                });
            }
            let dispatcher = self.dispatcher();
            let (selection, verb) = match name.as_deref() {
                None => (dispatcher.selection().await, "current selection"),
                Some("auto") => (dispatcher.pin(None).await, "unpinned"),
                Some(n) => {
                    tracing::Span::current().record("relay", &*logged(n));
                    (dispatcher.pin(Some(n.to_string())).await, "pinned")
                }
            };
            match selection {
                Ok(s) => {
                    let out = SwitchResult::from_selection(&s, self.relay_names());
                    let text = format!(
                        "{verb}: pinned {}, next message goes to {} (strategy {})",
                        out.pinned.as_deref().unwrap_or("none"),
                        out.next.as_deref().unwrap_or("no available relay"),
                        out.strategy
                    );
                    tracing::info!(pinned = ?out.pinned, next = ?out.next, "{verb}");
                    respond(out, text)
                }
                Err(e) => {
                    let mut out = SwitchResult {
                        relays: self.relay_names(),
                        ..Default::default()
                    };
                    let err = control_error(e);
                    let text = err.message.clone();
                    out.error = Some(err);
                    respond(out, text)
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Re-read the configuration and apply it as a diff.
    #[tool(
        name = "reload_smtp_configuration",
        description = "Read the configuration file and environment again and apply the change \
                       without a restart: new relays start, removed ones drain, changed ones are \
                       replaced. On an invalid configuration the running one stays in force.",
        output_schema = schema_for_output::<ReloadResult>()
    )]
    pub async fn reload_smtp_configuration(
        &self,
        params: Parameters<Checked<NoParams>>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let caller = caller_of(self, &ctx);
        async move {
            if let Err(e) = params.0.0 {
                return fail::<ReloadResult>(shape(e));
            }
            if let Some(e) = relay_control(caller.as_deref(), "reload_smtp_configuration") {
                return fail::<ReloadResult>(e);
            }
            self.reload_inner().await
        }
        .instrument(tool_span("reload_smtp_configuration"))
        .await
    }

    /// Drop every connection, reset health and probe each relay.
    #[tool(
        name = "reconnect_smtp_servers",
        description = "Drop every SMTP connection, reset each relay's health and backoff, probe \
                       each relay, and report its new state.",
        output_schema = schema_for_output::<ReconnectResult>()
    )]
    pub async fn reconnect_smtp_servers(
        &self,
        params: Parameters<Checked<NoParams>>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let span = tool_span("reconnect_smtp_servers");
        let caller = caller_of(self, &ctx);
        async move {
            if let Err(e) = params.0.0 {
                return fail::<ReconnectResult>(shape(e));
            }
            if let Some(e) = relay_control(caller.as_deref(), "reconnect_smtp_servers") {
                return fail::<ReconnectResult>(e);
            }
            if self.is_closing() {
                return fail::<ReconnectResult>(ToolError::unavailable());
            }
            match self.dispatcher().reconnect(None).await {
                Ok(s) => {
                    let out = ReconnectResult::from_snapshot(&s);
                    let text = out
                        .relays
                        .iter()
                        .map(|r| format!("{}: {}", r.name, r.state))
                        .collect::<Vec<_>>()
                        .join("; ");
                    tracing::info!("relays reconnected: {text}");
                    respond(out, text)
                }
                Err(e) => fail::<ReconnectResult>(control_error(e)),
            }
        }
        .instrument(span)
        .await
    }
    /// A message's state, times, envelope and attempts.
    #[tool(
        name = "get_message_status",
        description = "Look up one message by `message_id` (from send_email) or by the \
                       `idempotency_key` it was sent with: its status (scheduled, queued, \
                       sending, sent, partial, failed, unknown, expired, cancelled, held, \
                       rejected), its times, \
                       the envelope, every attempt with relay, class, code and text, and its \
                       history. Never the body.",
        output_schema = schema_for_output::<MessageStatusResult>()
    )]
    pub async fn get_message_status(
        &self,
        params: Parameters<Checked<MessageStatusParams>>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let span = tool_span("get_message_status");
        let Some(caller) = caller_of(self, &ctx) else {
            return fail::<MessageStatusResult>(no_caller());
        };
        span.record("caller", &*caller.name);
        async move {
            let p = match params.0.0 {
                Ok(p) => p,
                Err(e) => return fail::<MessageStatusResult>(shape(e)),
            };
            let found = match (&p.message_id, &p.idempotency_key) {
                (Some(id), None) => {
                    let id = queue::bare_id(id);
                    tracing::Span::current().record("message_id", &*logged(id));
                    self.queue().status(id).await
                }
                (None, Some(key)) => self.queue().status_by_key(Some(&caller.name), key).await,
                _ => {
                    return fail::<MessageStatusResult>(invalid(
                        "message_id",
                        "one_of",
                        "give exactly one of message_id and idempotency_key".into(),
                    ));
                }
            };
            match found {
                Ok(Some(r)) if owns(&caller, r.caller.as_deref()) => {
                    let text = format!("{}: {}", r.message_id, r.state.as_str());
                    respond(MessageStatusResult::from(&r), text)
                }
                // Another caller's message is not shown, nor said to exist.
                Ok(_) => fail::<MessageStatusResult>(no_such_message()),
                Err(e) => fail::<MessageStatusResult>(queue_error(&e)),
            }
        }
        .instrument(span)
        .await
    }

    /// The most recent messages, newest first.
    #[tool(
        name = "list_messages",
        description = "List the most recent messages, newest first, optionally only those in \
                       one `status`, of one `send_batch` (`batch_id`), sent with one `tag`, to \
                       a `recipient` (an address or part of one, any case), or that a bounce or \
                       complaint report came back for (`reported`: `bounced` or `complained`), \
                       or sent with `metadata` names and values, all of them \
                       (`{\"campaign\": \"spring\", \"segment\": \"vip\"}`). \
                       At most `limit` (1-100, default 20) a page; pass `next_cursor` back \
                       as `cursor` for the next page. With `batch_id` or `tag`, the first page \
                       has `summary`: how many of those messages are in each status.",
        output_schema = schema_for_output::<ListMessagesResult>()
    )]
    pub async fn list_messages(
        &self,
        params: Parameters<Checked<ListMessagesParams>>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let span = tool_span("list_messages");
        let Some(caller) = caller_of(self, &ctx) else {
            return fail::<ListMessagesResult>(no_caller());
        };
        span.record("caller", &*caller.name);
        async move {
            let p = match params.0.0 {
                Ok(p) => p,
                Err(e) => return fail::<ListMessagesResult>(shape(e)),
            };
            let state = match p.status.as_deref() {
                None => None,
                Some(s) => match State::parse(s) {
                    Some(st) => Some(st),
                    None => {
                        let valid: Vec<&str> = State::ALL.iter().map(|s| s.as_str()).collect();
                        return fail::<ListMessagesResult>(invalid(
                            "status",
                            "one_of",
                            format!("status {} is not one of {}", quoted(s), valid.join(", ")),
                        ));
                    }
                },
            };
            let limit = p.limit.unwrap_or(20);
            if !(1..=100).contains(&limit) {
                return fail::<ListMessagesResult>(invalid(
                    "limit",
                    "range",
                    format!("limit must be 1 to 100, got {limit}"),
                ));
            }
            let cursor = match p.cursor.as_deref() {
                None => None,
                Some(c) => match c.parse::<i64>() {
                    Ok(n) if n > 0 => Some(n),
                    _ => {
                        return fail::<ListMessagesResult>(invalid(
                            "cursor",
                            "cursor",
                            "cursor must be a next_cursor from list_messages".into(),
                        ));
                    }
                },
            };
            let recipient = match p.recipient.as_deref().map(str::trim) {
                None => None,
                Some("") => {
                    return fail::<ListMessagesResult>(invalid(
                        "recipient",
                        "empty",
                        "recipient must name an address or part of one".into(),
                    ));
                }
                Some(r) if r.chars().count() > MAX_RECIPIENT_SEARCH => {
                    return fail::<ListMessagesResult>(invalid(
                        "recipient",
                        "length",
                        format!(
                            "recipient is at most {MAX_RECIPIENT_SEARCH} characters (an address's \
                             length)"
                        ),
                    ));
                }
                Some(r) => Some(r.to_owned()),
            };
            let reported = match p.reported.as_deref() {
                None => None,
                Some(r) if crate::bounces::REASONS.contains(&r) => Some(r.to_owned()),
                Some(other) => {
                    return fail::<ListMessagesResult>(invalid(
                        "reported",
                        "one_of",
                        format!(
                            "reported {} is not one of {}",
                            quoted(other),
                            crate::bounces::REASONS.join(", ")
                        ),
                    ));
                }
            };
            let metadata = match &p.metadata {
                None => None,
                Some(m) if m.is_empty() => {
                    return fail::<ListMessagesResult>(invalid(
                        "metadata",
                        "empty",
                        "metadata must hold at least one name and its value".into(),
                    ));
                }
                Some(m) => {
                    if let Err(e) = crate::compose::labels::check(None, m) {
                        return fail::<ListMessagesResult>(ToolError::invalid_input(&e));
                    }
                    Some(m.clone())
                }
            };
            let filter = Filter {
                state,
                caller: Some(caller.name.to_string()),
                batch: p.batch_id.clone(),
                tag: p.tag.clone(),
                recipient,
                reported,
                metadata,
            };
            let (page, next) = match self.queue().list(&filter, limit as usize, cursor).await {
                Ok(listed) => listed,
                Err(e) => return fail::<ListMessagesResult>(queue_error(&e)),
            };
            // A batch's or a tag's progress, once, on the first page.
            let grouped = filter.batch.is_some() || filter.tag.is_some();
            let summary = if grouped && cursor.is_none() {
                let whole = Filter {
                    state: None,
                    ..filter.clone()
                };
                match self.queue().count(&whole).await {
                    Ok(counts) => Some(
                        counts
                            .into_iter()
                            .map(|(st, n)| (st.as_str().to_owned(), n))
                            .collect::<std::collections::BTreeMap<_, _>>(),
                    ),
                    Err(e) => return fail::<ListMessagesResult>(queue_error(&e)),
                }
            } else {
                None
            };
            let out = ListMessagesResult {
                messages: page.iter().map(Into::into).collect(),
                next_cursor: next.map(|n| n.to_string()),
                summary,
                error: None,
            };
            let mut text = format!("{} messages", out.messages.len());
            if out.next_cursor.is_some() {
                text.push_str("; more with next_cursor");
                if filter.searches() && out.messages.len() < limit as usize {
                    text.push_str(&format!(
                        " (a search by recipient, report or metadata reads {SEARCH_ROWS} messages a page)"
                    ));
                }
            }
            if let Some(summary) = &out.summary {
                let each: Vec<String> = summary.iter().map(|(st, n)| format!("{n} {st}")).collect();
                let of = if p.batch_id.is_some() {
                    "the batch"
                } else {
                    "the tag"
                };
                if each.is_empty() {
                    text.push_str(&format!("; {of} has none"));
                } else {
                    text.push_str(&format!("; {of}: {}", each.join(", ")));
                }
            }
            respond(out, text)
        }
        .instrument(span)
        .await
    }

    /// Cancels a scheduled, queued or held message, or every such message
    /// of a batch.
    #[tool(
        name = "cancel_message",
        description = "Cancel a message that is `scheduled`, `queued` or `held` (waiting for its \
                       time, a retry or an approval). A message a relay already holds, or that is \
                       finished, cannot be cancelled: the error `not_cancellable` names its state. \
                       With `batch_id` instead of `message_id`, cancels every message of that \
                       `send_batch` call that still can be, and answers how many it cancelled and \
                       the batch's messages per status; with `tag`, every message you sent with \
                       that tag that is still waiting.",
        output_schema = schema_for_output::<CancelMessageResult>()
    )]
    pub async fn cancel_message(
        &self,
        params: Parameters<Checked<CancelMessageParams>>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let span = tool_span("cancel_message");
        let Some(caller) = caller_of(self, &ctx) else {
            return fail::<CancelMessageResult>(no_caller());
        };
        span.record("caller", &*caller.name);
        async move {
            // An empty id names nothing: say so, rather than "not found".
            let empty = |field: &str| {
                fail::<CancelMessageResult>(invalid(
                    field,
                    "empty",
                    format!("{field} must not be empty"),
                ))
            };
            let id = match params.0.0 {
                Ok(CancelMessageParams {
                    message_id: Some(id),
                    batch_id: None,
                    tag: None,
                }) => id,
                Ok(CancelMessageParams {
                    message_id: None,
                    batch_id: Some(batch),
                    tag: None,
                }) => {
                    if batch.trim().is_empty() {
                        return empty("batch_id");
                    }
                    return self.cancel_batch(&caller, batch).await;
                }
                Ok(CancelMessageParams {
                    message_id: None,
                    batch_id: None,
                    tag: Some(tag),
                }) => {
                    if tag.trim().is_empty() {
                        return empty("tag");
                    }
                    return self.cancel_tag(&caller, tag).await;
                }
                Ok(_) => {
                    return fail::<CancelMessageResult>(invalid(
                        "message_id",
                        "one_of",
                        "give exactly one of message_id, batch_id and tag".into(),
                    ));
                }
                Err(e) => return fail::<CancelMessageResult>(shape(e)),
            };
            let id = queue::bare_id(&id).to_owned();
            if id.is_empty() {
                return empty("message_id");
            }
            tracing::Span::current().record("message_id", &*logged(&id));
            match self.owned_by(&caller, &id).await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    return fail::<CancelMessageResult>(ToolError::new(
                        "not_found",
                        format!("no message {}", quoted(&id)),
                    ));
                }
                Err(e) => return fail::<CancelMessageResult>(queue_error(&e)),
            }
            match self.queue().cancel(&id).await {
                Ok(Cancel::Cancelled) => {
                    tracing::info!("message cancelled");
                    // Some recipients may have it from a round that
                    // deferred the others.
                    let accepted = match self.queue().status(&id).await {
                        Ok(Some(r)) => r.accepted,
                        _ => Vec::new(),
                    };
                    let text = if accepted.is_empty() {
                        format!("cancelled {id}")
                    } else {
                        format!(
                            "cancelled {id}: the recipients that waited for a retry will not get it; {} had it already",
                            accepted.join(", ")
                        )
                    };
                    respond(
                        CancelMessageResult {
                            message_id: Some(id.clone()),
                            cancelled: true,
                            status: Some(SendStatus::Cancelled),
                            accepted,
                            ..Default::default()
                        },
                        text,
                    )
                }
                Ok(Cancel::Refused(state)) => {
                    let e = ToolError::new(
                        "not_cancellable",
                        format!(
                            "{id} is {} and cannot be cancelled; only scheduled, queued or held messages can",
                            state.as_str()
                        ),
                    );
                    let text = e.message.clone();
                    respond(
                        CancelMessageResult {
                            message_id: Some(id),
                            cancelled: false,
                            status: Some(state.into()),
                            error: Some(e),
                            ..Default::default()
                        },
                        text,
                    )
                }
                Ok(Cancel::NotFound) => fail::<CancelMessageResult>(ToolError::new(
                    "not_found",
                    format!("no message {}", quoted(&id)),
                )),
                Err(e) => fail::<CancelMessageResult>(queue_error(&e)),
            }
        }
        .instrument(span)
        .await
    }
}

/// The answer to a cancel of many messages (`what` they are: `of batch-…`,
/// `waiting with that tag`): `out` with how many of the `matched` this
/// call `cancelled` and their states now; `not_cancellable` when none.
fn cancelled_many(
    mut out: CancelMessageResult,
    cancelled: usize,
    matched: usize,
    summary: std::collections::BTreeMap<String, usize>,
    what: &str,
) -> Result<CallToolResult, ErrorData> {
    let now: Vec<String> = summary.iter().map(|(st, n)| format!("{n} {st}")).collect();
    let now = now.join(", ");
    let error = (cancelled == 0).then(|| {
        ToolError::new(
            "not_cancellable",
            format!(
                "no message {what} could be cancelled; only scheduled, queued or held messages can (now: {now})"
            ),
        )
    });
    let text = match &error {
        Some(e) => e.message.clone(),
        None => format!("cancelled {cancelled} of the {matched} messages {what}; now: {now}"),
    };
    out.cancelled = cancelled > 0;
    out.cancelled_count = Some(cancelled);
    out.summary = Some(summary);
    out.error = error;
    respond(out, text)
}

impl MailmuxServer {
    /// `cancel_message` with a `batch_id`: each of the caller's messages of
    /// that batch is cancelled as one `message_id` would be, so one a relay
    /// holds now is left to its round. Not found when the caller has no
    /// message of that batch; `not_cancellable` when none could be.
    async fn cancel_batch(
        &self,
        caller: &Caller,
        batch: String,
    ) -> Result<CallToolResult, ErrorData> {
        let filter = Filter {
            state: None,
            caller: Some(caller.name.to_string()),
            batch: Some(batch.clone()),
            tag: None,
            recipient: None,
            reported: None,
            metadata: None,
        };
        let done = match self.queue().cancel_each(&filter).await {
            Ok(done) => done,
            Err(e) => return fail::<CancelMessageResult>(queue_error(&e)),
        };
        if done.matched == 0 {
            return fail::<CancelMessageResult>(ToolError::new(
                "not_found",
                format!("no message of batch {}", quoted(&batch)),
            ));
        }
        let summary = done
            .states
            .iter()
            .map(|(st, n)| (st.as_str().to_owned(), *n))
            .collect();
        tracing::info!(batch = %batch, cancelled = done.acted, of = done.matched, "batch cancelled");
        let what = format!("of {batch}");
        let out = CancelMessageResult {
            batch_id: Some(batch),
            ..Default::default()
        };
        cancelled_many(out, done.acted, done.matched, summary, &what)
    }

    /// `cancel_message` with a `tag`: each of the caller's messages sent
    /// with it that waits (scheduled, queued or held) is cancelled as one
    /// `message_id` would be; the finished ones, however many, are not
    /// visited (the tag's index, then each waiting state). Not found when
    /// none waits.
    async fn cancel_tag(&self, caller: &Caller, tag: String) -> Result<CallToolResult, ErrorData> {
        let mut cancelled = 0;
        let mut matched = 0;
        let mut summary = std::collections::BTreeMap::<String, usize>::new();
        for state in [State::Scheduled, State::Queued, State::Held] {
            let filter = Filter {
                state: Some(state),
                caller: Some(caller.name.to_string()),
                tag: Some(tag.clone()),
                ..Filter::default()
            };
            let done = match self.queue().cancel_each(&filter).await {
                Ok(done) => done,
                Err(e) => return fail::<CancelMessageResult>(queue_error(&e)),
            };
            cancelled += done.acted;
            matched += done.matched;
            for (st, n) in &done.states {
                *summary.entry(st.as_str().to_owned()).or_default() += n;
            }
        }
        if matched == 0 {
            return fail::<CancelMessageResult>(ToolError::new(
                "not_found",
                "no scheduled, queued or held message has that tag".to_owned(),
            ));
        }
        tracing::info!(cancelled, of = matched, "tag cancelled");
        let out = CancelMessageResult {
            tag: Some(tag),
            ..Default::default()
        };
        cancelled_many(out, cancelled, matched, summary, "waiting with that tag")
    }

    /// `send_email` with the parts of its request it needs: its
    /// extensions (the caller, the session), its id (for a cancel), how
    /// to ask the client's user for an approval, and whether the client
    /// takes tasks.
    pub(super) async fn send_email_call(
        &self,
        mut params: Result<SendEmailParams, ShapeError>,
        extensions: &Extensions,
        id: rmcp::model::RequestId,
        mut ask: Ask,
        tasks: bool,
    ) -> Result<CallToolResponse, ErrorData> {
        let span = tool_span("send_email");
        let Some(caller) = caller_in(self, extensions) else {
            return fail::<SendResult>(no_caller()).map(Into::into);
        };
        span.record("caller", &*caller.name);
        // A client that takes tasks gets one for a send that would wait:
        // the message is stored, and the outcome read with `tasks/get`.
        let as_task = tasks
            && matches!(&mut params, Ok(p) if p.wait != Some(false) && p.dry_run != Some(true));
        if as_task && let Ok(p) = &mut params {
            p.wait = Some(false);
        }
        // Registered before anything is sent; only the client's
        // `notifications/cancelled` fires it (see `cancel`).
        let call = self.cancellable().register(&caller, extensions, id);
        let cancel = Some(call.token.clone());
        // Boxed, so that the layers above (rmcp's tool route moves its
        // future several times) copy a pointer, not the send's state.
        let (out, text) = Box::pin(
            self.send_email_checked(caller, params, &mut ask, cancel)
                .instrument(span),
        )
        .await;
        drop(call);
        if let Ask::InResult(Some(form)) = ask {
            return Ok(CallToolResponse::InputRequired(form));
        }
        if as_task
            && out.error.is_none()
            && let Some(id) = &out.message_id
            && let Ok(Some(record)) = self.queue().status(id).await
        {
            return Ok(super::tasks::created(&record, self.queue().settings()).into());
        }
        respond(out, text).map(Into::into)
    }

    /// A `tools/call` of `send_email` served without rmcp's service (a
    /// stateless HTTP request, `super::stateless`): what `call_tool` does
    /// for it, arguments read and call counted alike. Such a request has
    /// no client to send a request to; `forms` and `tasks` are whether its
    /// `_meta` declared form elicitation and the tasks extension (only a
    /// request of 2026-07-28 or later can).
    pub(super) async fn send_email_stateless(
        &self,
        arguments: Option<rmcp::model::JsonObject>,
        extensions: Extensions,
        id: rmcp::model::RequestId,
        forms: bool,
        tasks: bool,
    ) -> Result<CallToolResponse, ErrorData> {
        let arguments = serde_json::Value::Object(arguments.unwrap_or_default());
        let params = parse::<SendEmailParams>(arguments, SendEmailParams::FIELDS);
        let ask = match forms {
            true => Ask::InResult(None),
            false => Ask::Nobody,
        };
        let result = self
            .send_email_call(params, &extensions, id, ask, tasks)
            .await;
        count_call("send_email".to_owned(), &result);
        result
    }

    /// A `send_email` call made again with the answer to the approval form
    /// its first call was given ([`approval::input_required`]): the answer
    /// decides the held message its request state names, which must be
    /// the caller's; the call's arguments are not sent again (only `wait`
    /// is read). Answered as `send_email` answers a held message its user
    /// decided.
    async fn send_email_answered(
        &self,
        request: &CallToolRequestParams,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let span = tool_span("send_email");
        async {
            let Some(caller) = caller_of(self, ctx) else {
                return fail::<SendResult>(no_caller());
            };
            tracing::Span::current().record("caller", &*caller.name);
            let _slot = self.call_gate().enter();
            if self.is_closing() {
                return fail::<SendResult>(ToolError::unavailable());
            }
            let answered = Answered::read(
                request.request_state.as_deref(),
                request.input_responses.as_ref(),
            );
            let answered = match answered {
                Ok(a) => a,
                Err(bad) => return fail::<SendResult>(bad_answer(bad)),
            };
            tracing::Span::current().record("message_id", answered.message_id.as_str());
            match self.owned_by(&caller, &answered.message_id).await {
                Ok(Some(_)) => {}
                Ok(None) => return fail::<SendResult>(no_such_message()),
                Err(e) => return fail::<SendResult>(queue_error(&e)),
            }
            let decided = answered
                .decide(self.queue(), &caller, self.wait_until(request))
                .await;
            let record = match decided {
                Some(r) => r,
                None => match self.owned_by(&caller, &answered.message_id).await {
                    Ok(Some(r)) => r,
                    Ok(None) => return fail::<SendResult>(no_such_message()),
                    Err(e) => return fail::<SendResult>(queue_error(&e)),
                },
            };
            let mut out = SendResult::from_record(&record);
            out.caller = Some(caller.name.to_string());
            let text = describe(&out, &record.message_id, false);
            tracing::info!(status = out.status.as_str(), "send finished");
            respond(out, text)
        }
        .instrument(span)
        .await
        .map(Into::into)
    }

    /// A `send_batch` call made again with the answer to its held
    /// messages' form ([`approval::batch_input_required`]): the answer
    /// decides each held message the request state names, which must all
    /// be the caller's, and the call is answered with the batch's answer
    /// that the state carries, its held messages' statuses brought up to
    /// date. Only `wait` is read from the call's arguments.
    async fn send_batch_answered(
        &self,
        request: &CallToolRequestParams,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let span = tool_span("send_batch");
        async {
            let Some(caller) = caller_of(self, ctx) else {
                return fail::<SendBatchResult>(no_caller());
            };
            tracing::Span::current().record("caller", &*caller.name);
            let _slot = self.call_gate().enter();
            if self.is_closing() {
                return fail::<SendBatchResult>(ToolError::unavailable());
            }
            let answered = approval::BatchAnswered::read(
                request.request_state.as_deref(),
                request.input_responses.as_ref(),
            );
            let mut answered = match answered {
                Ok(a) => a,
                Err(bad) => return fail::<SendBatchResult>(bad_answer(bad)),
            };
            for (_, id, _) in &answered.held {
                match self.owned_by(&caller, id).await {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        return fail::<SendBatchResult>(ToolError::new(
                            "not_found",
                            format!(
                                "no such message {id} (it may have been purged after queue.retain)"
                            ),
                        ));
                    }
                    Err(e) => return fail::<SendBatchResult>(queue_error(&e)),
                }
            }
            let records = answered
                .decide(self.queue(), &caller, self.wait_until(request))
                .await;
            let mut out = std::mem::take(&mut answered.answer);
            for ((i, _, _), record) in answered.held.iter().zip(records) {
                if let Some(record) = record {
                    out.results[*i].status = Some(record.state.into());
                }
            }
            out.summary = batch_summary(&out.results);
            out.message = out
                .summary
                .contains_key(SendStatus::Queued.as_str())
                .then(|| self.paused_note())
                .flatten();
            out.caller = Some(caller.name.to_string());
            let batch_id = out.batch_id.clone().unwrap_or_default();
            let text = batch_text(&batch_id, &out.summary);
            tracing::info!(batch = %batch_id, decided = answered.held.len(), "batch finished");
            respond(out, text)
        }
        .instrument(span)
        .await
        .map(Into::into)
    }

    /// Until when a call made again with an approval's answer waits for
    /// the delivery: its `wait` argument (default `true`), from now.
    fn wait_until(&self, request: &CallToolRequestParams) -> Option<tokio::time::Instant> {
        let wait = request
            .arguments
            .as_ref()
            .and_then(|a| a.get("wait"))
            .and_then(|w| w.as_bool())
            .unwrap_or(true);
        wait.then(|| tokio::time::Instant::now() + self.config().daemon.send_deadline)
    }

    async fn send_email_checked(
        &self,
        caller: Arc<Caller>,
        params: Result<SendEmailParams, ShapeError>,
        ask: &mut Ask,
        cancel: Option<CancellationToken>,
    ) -> (SendResult, String) {
        match params {
            Ok(p) => self.send_email_params(caller, p, ask, cancel).await,
            Err(e) => {
                self.audit().refused(&Refusal {
                    caller: &caller.name,
                    code: "invalid_input",
                    rule: Some(e.rule),
                    field: Some(&e.field),
                    ..Refusal::default()
                });
                failed(shape(e))
            }
        }
    }

    /// A refusal after the caller was identified: audited, then answered.
    /// `message` is the composed message, or the subject as given when it
    /// was refused before it could be composed.
    fn refuse(
        &self,
        caller: &Caller,
        message: Result<&Composed, &str>,
        e: ToolError,
    ) -> (SendResult, String) {
        let described = self.audit().enabled().then(|| match message {
            Ok(c) => Described::of(c),
            Err(subject) => Described {
                meta: Meta {
                    subject: subject.chars().take(MAX_AUDIT_SUBJECT).collect(),
                    ..Meta::default()
                },
                ..Described::default()
            },
        });
        self.refuse_described(caller, described.as_ref(), e)
    }

    /// [`MailmuxServer::refuse`], with the message as the audit log
    /// describes it (`None` when the log is off).
    fn refuse_described(
        &self,
        caller: &Caller,
        described: Option<&Described>,
        e: ToolError,
    ) -> (SendResult, String) {
        if let Some(d) = described {
            self.audit().refused(&Refusal {
                caller: &caller.name,
                message_id: d.message_id.as_deref(),
                from: d.from.as_deref(),
                meta: Some(&d.meta),
                size: d.size,
                code: &e.code,
                rule: e.rule.as_deref(),
                field: e.field.as_deref(),
                check: e.check.as_deref(),
            });
        }
        crate::telemetry::refused(&caller.name, &e.code);
        let (mut out, text) = failed(e);
        out.caller = Some(caller.name.to_string());
        (out, text)
    }

    /// A `send_email` call up to the queue: its parameters checked, the
    /// message composed and checked against the caller's policy and rate
    /// (identity, policy, rate, approval, in that order). A refusal or a dry
    /// run is answered here; a message to store comes back as [`Ready`].
    async fn prepare(&self, caller: &Arc<Caller>, params: SendEmailParams) -> Prepared {
        self.prepare_with(caller, params, None, false).await
    }

    /// [`MailmuxServer::prepare`], with attachments decoded once for many
    /// messages (a batch's defaults) for a draft that has none of its own.
    /// With `defer_rate`, a rate the store keeps for every daemon is left
    /// in [`Ready::rate`] for the batch to take.
    async fn prepare_with(
        &self,
        caller: &Arc<Caller>,
        mut params: SendEmailParams,
        shared: Option<Arc<SharedAttachments>>,
        defer_rate: bool,
    ) -> Prepared {
        let config = self.config();
        let QueueParams {
            idempotency_key: idempotency,
            send_at,
            max_age,
        } = match check_queue_params(&params, &config) {
            Ok(v) => v,
            Err(e) => {
                return Prepared::Done(Box::new(self.refuse(
                    caller,
                    Err(&params.draft.subject),
                    e,
                )));
            }
        };
        // Hashed only when a key asks for it: the draft may be megabytes.
        let idempotency = idempotency.map(|key| (key, content_hash(&params, shared.as_deref())));
        // Longer than the caller's: refused, unless it repeats a stored
        // call (whose caller's max_age a reload may have shortened since).
        let caller_max_age = self.queue().max_age(Some(&caller.name));
        if max_age.is_some_and(|own| own > caller_max_age)
            && !self.is_stored_key(caller, idempotency.as_ref()).await
        {
            return Prepared::Done(Box::new(self.refuse(
                caller,
                Err(&params.draft.subject),
                longer_than_the_callers(caller_max_age),
            )));
        }
        // A scheduled message is dated when it goes out, not when it came.
        params.draft.send_at = send_at;
        // The caller's own default sender, for a call that names none (after
        // the content hash: a retry is the same call whatever it became).
        if params.draft.from_email.is_none() {
            params.draft.from_email = caller.policy.from_email.clone();
        }
        if let Some(relay) = &params.relay {
            let names = self.relay_names();
            if !names.contains(relay) {
                return Prepared::Done(Box::new(self.refuse(
                    caller,
                    Err(&params.draft.subject),
                    ToolError::unknown_relay(relay, names),
                )));
            }
        }
        // The policy's own fields go on every message; the content hash above
        // is the call's, so a replay matches whatever the policy adds.
        if let Err(d) = caller.stamp(&mut params.draft.headers) {
            return Prepared::Done(Box::new(self.refuse(
                caller,
                Err(&params.draft.subject),
                denied(d),
            )));
        }
        let subject = params.draft.subject.clone();
        // A large draft, one whose archives the caller's content checks
        // unpack, or one an RSA key signs, is composed on the blocking
        // pool, so that calls behind it are not held up (over stdio the
        // daemon has one worker).
        let shared_bytes = shared.as_ref().map_or(0, |s| s.decoded_bytes);
        let compose = &config.daemon.compose;
        let sender = params.draft.from_email.as_deref();
        let unpacks = !caller.policy.content_checks.is_empty()
            && (params.draft.has_archive() || shared.as_ref().is_some_and(|s| s.has_archive()));
        let composed = if unpacks
            || params.draft.is_heavy_with(shared_bytes)
            || compose
                .dkim
                .is_slow_for(sender.or(compose.default_from.as_deref()))
        {
            let draft = std::mem::take(&mut params.draft);
            let config = Arc::clone(&config);
            let shared = shared.clone();
            let caller = Arc::clone(caller);
            let job = tokio::task::spawn_blocking(move || {
                compose_for(&caller, &draft, &config.daemon.compose, shared.as_deref())
            });
            match job.await {
                Ok(result) => result,
                Err(e) => {
                    return Prepared::Done(Box::new(failed(ToolError::new(
                        "internal",
                        format!("composing the message failed: {e}"),
                    ))));
                }
            }
        } else {
            compose_for(
                caller,
                &params.draft,
                &config.daemon.compose,
                shared.as_deref(),
            )
        };
        let composed = match composed {
            Ok(c) => c,
            // A DKIM key that could not sign is the daemon's fault, not the
            // caller's (keys are checked at load, so this is not expected).
            Err(e) if e.rule == crate::compose::dkim::SIGNING_FAILED => {
                return Prepared::Done(Box::new(failed(ToolError::new("internal", e.message))));
            }
            Err(e) => {
                return Prepared::Done(Box::new(self.refuse(
                    caller,
                    Err(&subject),
                    ToolError::invalid_input(&e),
                )));
            }
        };
        let span = tracing::Span::current();
        span.record("message_id", composed.message_id.as_str());
        let only = match relays_for(&config, caller, &composed.from, params.relay.as_deref()) {
            Ok(only) => only,
            Err(e) => return Prepared::Done(Box::new(self.refuse(caller, Ok(&composed), e))),
        };
        let dry_run = params.dry_run.unwrap_or(false);
        // Policy, then rate, then approval; a refusal takes no rate. A
        // repeat of a stored call (its idempotency key) is answered by the
        // queue with the first call's status, whatever the policy, the rate
        // or the suppression list say now (a refusal would say that nothing
        // was sent when the first call sent it), and takes no rate.
        let verdict = match caller.check(&composed, params.relay.as_deref(), dry_run) {
            Ok(v) => v,
            Err(_) if !dry_run && self.is_stored_key(caller, idempotency.as_ref()).await => {
                Verdict::Send
            }
            Err(d) => {
                return Prepared::Done(Box::new(self.refuse(caller, Ok(&composed), denied(d))));
            }
        };
        let envelope = Envelope {
            from: composed.from.to_string(),
            recipients: composed.recipients.iter().map(|a| a.to_string()).collect(),
        };
        if let Some((i, address, listed)) = self.suppressions().check(
            envelope.recipients.iter().map(String::as_str),
            caller.policy.transactional,
        ) && !self.is_stored_key(caller, idempotency.as_ref()).await
        {
            let (list, at) = composed.fields.get(i).copied().unwrap_or(("to", i));
            let e = suppressed(&format!("{list}[{at}]"), &address, &listed);
            return Prepared::Done(Box::new(self.refuse(caller, Ok(&composed), e)));
        }

        if dry_run {
            let relay = match &params.relay {
                Some(r) => Some(r.clone()),
                None => self
                    .dispatcher()
                    .selection()
                    .await
                    .ok()
                    .and_then(|s| s.next)
                    // The router's next pick for any message; this one
                    // goes only where its sender and caller may.
                    .and_then(|next| match &only {
                        Some(only) if !only.contains(&next) => only.first().cloned(),
                        _ => Some(next),
                    }),
            };
            let text = format!(
                "dry run: {} ({} bytes) from {} to {} would go to {}; nothing was sent",
                composed.message_id,
                composed.bytes.len(),
                envelope.from,
                envelope.recipients.join(", "),
                relay.as_deref().unwrap_or("no available relay"),
            );
            tracing::info!(recipients = envelope.recipients.len(), "dry run");
            let preview = composed.preview();
            let out = SendResult {
                status: SendStatus::DryRun,
                message_id: Some(composed.message_id),
                relay,
                envelope: Some(envelope),
                preview: Some(preview),
                caller: Some(caller.name.to_string()),
                ..Default::default()
            };
            return Prepared::Done(Box::new((out, text)));
        }

        if !self.audit().admits() {
            return Prepared::Done(Box::new(failed(ToolError::new(
                "audit_unavailable",
                "the audit log cannot be written and audit.required is set; nothing was sent",
            ))));
        }
        // A repeat of a stored call sends nothing, so it takes no rate
        // (looked up only for a caller with a rate; one stored meanwhile
        // is found below, when the rate refuses).
        let repeat = caller.has_rate() && self.is_stored_key(caller, idempotency.as_ref()).await;
        let mut rate = None;
        if !repeat && caller.has_rate() {
            let recipients = &envelope.recipients;
            if defer_rate && self.queue().shares_rates() {
                let addresses: Vec<&str> = recipients.iter().map(String::as_str).collect();
                match caller.shared_rate(&addresses) {
                    Ok(shared) => {
                        rate = Some(Box::new(DeferredRate {
                            shared,
                            recipients: recipients.clone(),
                            fields: composed.fields.clone(),
                            idempotency: idempotency.clone(),
                            described: self.audit().enabled().then(|| Described::of(&composed)),
                        }));
                    }
                    Err(limited) => {
                        let e = rate_error(caller, limited, &composed.fields, recipients);
                        return Prepared::Done(Box::new(self.refuse(caller, Ok(&composed), e)));
                    }
                }
            } else if let Err(refusal) = self.take_rate(caller, recipients).await
                && !self.is_stored_key(caller, idempotency.as_ref()).await
            {
                let e = match refusal {
                    RateRefusal::Limited(limited) => {
                        rate_error(caller, limited, &composed.fields, recipients)
                    }
                    RateRefusal::Store(e) => queue_unavailable(&QueueError::Store(e), None),
                };
                return Prepared::Done(Box::new(self.refuse(caller, Ok(&composed), e)));
            }
        }
        let policy = &caller.policy;
        let held_by = match &verdict {
            Verdict::Hold(by) => Some(by.as_deref()),
            Verdict::Send => None,
        };
        let hold = held_by.is_some().then(|| Hold {
            until: mailmux_actors::queue::now_millis() + policy.approval_ttl.as_millis() as i64,
            hash: approval_hash(&composed),
        });
        // Kept for the audit log, and for the console, the queue command
        // and the message's status when a content check held the message
        // (they say which), it was written from a template (they name it)
        // or its caller labelled it (they show the tag and metadata).
        let content_hold = held_by.flatten();
        let described = self.audit().enabled()
            || content_hold.is_some()
            || composed.template.is_some()
            || composed.tag.is_some()
            || !composed.metadata.is_empty();
        let meta = described.then(|| {
            let mut m = meta_of(&composed);
            m.held_by = content_hold.map(str::to_owned);
            serde_json::to_string(&m).unwrap_or_default()
        });
        let prompt = held_by.map(|by| approval::prompt(&composed, by));
        let hold_hash = hold.as_ref().map(|h| h.hash);

        let wait = params.wait.unwrap_or(true);
        let mail = Mail {
            message_id: composed.message_id.clone(),
            from: Some(composed.from),
            to: composed.recipients,
            bytes: Arc::from(composed.bytes),
            deadline: tokio::time::Instant::now() + config.daemon.send_deadline,
            prefer: params.relay,
            only,
            priority: composed.priority,
        };
        let deadline = mail.deadline;
        Prepared::Ready(Box::new(Ready {
            submit: Submit {
                mail,
                send_at,
                idempotency,
                wait,
                caller: Some(caller.name.to_string()),
                meta,
                hold,
                batch: None,
                tag: composed.tag.clone(),
                max_age,
                cancel: None,
            },
            envelope,
            deadline,
            wait,
            prompt,
            hold_hash,
            rate,
        }))
    }

    /// Takes the rates a batch left in its messages ([`Ready::rate`]), all
    /// at once and in their order (`Queue::take_rates_many`: PostgreSQL
    /// folds them into one statement), each message whole or not at all. Answers each message that did not get its rate
    /// (by its index in the batch) with its error, which the audit log and
    /// the metrics have seen as a refusal.
    async fn take_deferred(
        &self,
        caller: &Caller,
        rates: Vec<(usize, Box<DeferredRate>)>,
    ) -> Vec<(usize, ToolError)> {
        let takes: Vec<&[RateTake]> = rates.iter().map(|(_, r)| &r.shared.takes[..]).collect();
        let answers = self.queue().take_rates_many(&takes).await;
        let mut refused = Vec::new();
        for ((i, rate), answer) in rates.into_iter().zip(answers) {
            let e = match answer {
                Ok(None) => continue,
                Ok(Some((at, wait))) => {
                    // A repeat of a message stored meanwhile is answered by
                    // the queue, as for send_email.
                    if self.is_stored_key(caller, rate.idempotency.as_ref()).await {
                        continue;
                    }
                    let limited = rate.shared.refused(at, wait);
                    rate_error(caller, limited, &rate.fields, &rate.recipients)
                }
                Err(e) => queue_unavailable(&QueueError::Store(e), None),
            };
            let (out, _) = self.refuse_described(caller, rate.described.as_ref(), e.clone());
            refused.push((i, within_message(i, out.error.unwrap_or(e))));
        }
        refused
    }

    /// Whether the call's idempotency key names a stored message: its
    /// repeat is answered with that message's status (by the queue), not
    /// refused for what changed since, which would say that nothing was
    /// sent when the first call sent it. A store that cannot be read
    /// answers false: the refusal stands.
    async fn is_stored_key(&self, caller: &Caller, key: Option<&(String, [u8; 32])>) -> bool {
        let Some((key, _)) = key else { return false };
        matches!(
            self.queue().status_by_key(Some(&caller.name), key).await,
            Ok(Some(_))
        )
    }

    /// The whole `send_batch` flow: each message prepared as `send_email`
    /// would, the valid ones stored in one transaction, then (with `wait`)
    /// each followed to its outcome. A cancel by the call's client
    /// (`cancel`) stores nothing while the batch is composed, and later
    /// cancels each message without an idempotency key that no relay is
    /// committing, as for `send_email`.
    pub async fn send_batch_params(
        &self,
        caller: Arc<Caller>,
        p: SendBatchParams,
        ask: &mut Ask,
        cancel: Option<CancellationToken>,
    ) -> (SendBatchResult, String) {
        let _slot = self.call_gate().enter();
        let refuse_all = |e: ToolError| {
            let text = e.message.clone();
            let out = SendBatchResult {
                caller: Some(caller.name.to_string()),
                error: Some(e),
                ..SendBatchResult::default()
            };
            (out, text)
        };
        if self.is_closing() {
            return refuse_all(ToolError::unavailable());
        }
        let config = self.config();
        let max = config.daemon.max_batch;
        if p.messages.is_empty() || p.messages.len() > max {
            return refuse_all(invalid(
                "messages",
                "count",
                format!(
                    "messages must hold 1 to {max} messages (max_batch), got {}",
                    p.messages.len()
                ),
            ));
        }
        if let Some(k) = p
            .defaults
            .keys()
            .find(|k| !MESSAGE_FIELDS.contains(&k.as_str()))
        {
            return refuse_all(invalid(
                &format!("defaults.{k}"),
                "unknown_field",
                format!(
                    "defaults.{k} is not a field messages may share; allowed: {}",
                    MESSAGE_FIELDS.join(", ")
                ),
            ));
        }
        let mut defaults = p.defaults;
        defaults.retain(|_, v| !v.is_null());
        if let Some(e) = defaults.iter().find_map(|(k, v)| mistyped(k, v)) {
            return refuse_all(shape(e.within("defaults")));
        }
        // Attachments in `defaults` are decoded once, for every message that
        // has none of its own; they are not copied into each message's
        // arguments either.
        let shared = match defaults.remove("attachments") {
            None => None,
            Some(v) => {
                let inputs: Vec<AttachmentInput> = match serde_json::from_value(v) {
                    Ok(a) => a,
                    Err(e) => {
                        return refuse_all(invalid(
                            "defaults.attachments",
                            "schema",
                            format!("defaults.attachments: {e}"),
                        ));
                    }
                };
                let cfg = Arc::clone(&config);
                let job = tokio::task::spawn_blocking(move || {
                    SharedAttachments::load(&inputs, &cfg.daemon.compose)
                });
                match job.await {
                    Ok(Ok(s)) => Some(Arc::new(s)),
                    Ok(Err(e)) => {
                        let mut e = ToolError::invalid_input(&e);
                        e.field = e.field.map(|f| format!("defaults.{f}"));
                        e.message = format!("defaults.{}", e.message);
                        return refuse_all(e);
                    }
                    Err(e) => {
                        return refuse_all(ToolError::new(
                            "internal",
                            format!("decoding the attachments failed: {e}"),
                        ));
                    }
                }
            }
        };
        let batch_id = format!("batch-{:016x}", rand::random::<u64>());
        let wait = p.wait.unwrap_or(true);
        let atomic = p.atomic.unwrap_or(false);
        let limit = config.daemon.compose.max_message_bytes;
        let mut results: Vec<BatchItemOut> = Vec::with_capacity(p.messages.len());
        // The valid messages, held while their total is small; past
        // BATCH_HELD_BYTES, each goes into the store's transaction as it is
        // composed (`stream`, after its rate is taken), so that a batch
        // never holds more than that.
        let mut ready: Vec<(usize, Submit)> = Vec::new();
        let mut held = 0usize;
        let mut stream: Option<Stream> = None;
        let mut streamed: Vec<usize> = Vec::new();
        // The valid messages' total; once it is over `limit`, or an atomic
        // batch has an invalid message, nothing of the batch is stored.
        let mut total = 0usize;
        let mut any_invalid = false;
        let mut deadline = None;
        // Each idempotency key's first message in the batch, and its hash.
        let mut keys: HashMap<String, (usize, [u8; 32])> = HashMap::new();
        // The messages the policy holds: (index, prompt, content hash), put
        // to the client's user in one form once the batch is stored.
        let mut to_ask: Vec<(usize, String, [u8; 32])> = Vec::new();
        // With a rate the store keeps for every daemon, the held messages'
        // rates are taken together just before they are stored (one
        // statement for many, rather than a round trip each); these are
        // the held ones not yet taken. A streaming batch holds up to
        // STREAM_RATE_BYTES of them at a time.
        let defer_rate = caller.has_rate() && self.queue().shares_rates();
        let mut untaken: Vec<(usize, Box<DeferredRate>)> = Vec::new();
        for (i, mut item) in p.messages.into_iter().enumerate() {
            // Nothing is stored yet: a stream dropped here stores nothing.
            if cancel.as_ref().is_some_and(CancellationToken::is_cancelled) {
                return refuse_all(cancelled_batch());
            }
            any_invalid |= results.last().is_some_and(|r| r.error.is_some());
            if atomic && any_invalid || total > limit {
                ready.clear();
                untaken.clear();
                stream = None;
            }
            let item_error = |e: ToolError| BatchItemOut {
                index: i,
                error: Some(e),
                ..BatchItemOut::default()
            };
            // A message may set what the defaults may, and its own key.
            let allowed = |k: &str| MESSAGE_FIELDS.contains(&k) || k == "idempotency_key";
            if let Some(k) = item.keys().find(|k| !allowed(k)) {
                let why = if ["wait", "send_at", "dry_run"].contains(&k.as_str()) {
                    format!(
                        "messages[{i}].{k}: {k} applies to the whole batch; set it beside `messages`"
                    )
                } else {
                    format!("messages[{i}].{k} is not a send_email field")
                };
                results.push(item_error(invalid(
                    &format!("messages[{i}].{k}"),
                    "unknown_field",
                    why,
                )));
                continue;
            }
            item.retain(|_, v| !v.is_null());
            if let Some(e) = item.iter().find_map(|(k, v)| mistyped(k, v)) {
                results.push(item_error(shape(e.within(&format!("messages[{i}]")))));
                continue;
            }
            // Its own `attachments`, even `[]`, replace the defaults'.
            let shared = if item.contains_key("attachments") {
                None
            } else {
                shared.clone()
            };
            let mut merged = defaults.clone();
            merged.extend(item);
            // A batch always renders its templates: a message without the
            // variables its templates use is refused, never sent with braces.
            merged
                .entry("template_vars")
                .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
            for (k, v) in [
                ("wait", p.wait.map(serde_json::Value::Bool)),
                ("send_at", p.send_at.clone().map(serde_json::Value::String)),
                ("dry_run", p.dry_run.map(serde_json::Value::Bool)),
            ] {
                if let Some(v) = v {
                    merged.insert(k.into(), v);
                }
            }
            let params: SendEmailParams =
                match serde_json::from_value(serde_json::Value::Object(merged)) {
                    Ok(params) => params,
                    Err(e) => {
                        results.push(item_error(invalid(
                            &format!("messages[{i}]"),
                            "schema",
                            format!("messages[{i}]: {e}"),
                        )));
                        continue;
                    }
                };
            // Each message's id goes on a span of its own: recorded on the
            // call's span, every later line of the call would repeat the
            // ids of all the messages before it.
            let message = tracing::info_span!("message", index = i, message_id = Empty);
            match self
                .prepare_with(&caller, params, shared, defer_rate)
                .instrument(message)
                .await
            {
                Prepared::Done(answer) => match answer.0.error.clone() {
                    Some(e) => results.push(item_error(within_message(i, e))),
                    None => results.push(BatchItemOut {
                        index: i,
                        message_id: answer.0.message_id,
                        status: Some(answer.0.status),
                        ..BatchItemOut::default()
                    }),
                },
                Prepared::Ready(r) => {
                    let Ready {
                        submit: mut s,
                        deadline: d,
                        prompt,
                        hold_hash,
                        rate,
                        ..
                    } = *r;
                    // A key given twice in the batch for different messages
                    // is refused here, before anything is stored.
                    if let Some((key, hash)) = &s.idempotency {
                        let (first, seen) = *keys.entry(key.clone()).or_insert((i, *hash));
                        if seen != *hash {
                            results.push(item_error(key_conflict(
                                format!("messages[{i}].idempotency_key"),
                                format!(
                                    "messages[{i}].idempotency_key is also messages[{first}]'s, for a different message; nothing of this one was stored"
                                ),
                            )));
                            continue;
                        }
                    }
                    results.push(BatchItemOut {
                        index: i,
                        ..BatchItemOut::default()
                    });
                    if let (Some(prompt), Some(hash)) = (prompt, hold_hash) {
                        to_ask.push((i, prompt, hash));
                    }
                    deadline = Some(d);
                    s.batch = Some(batch_id.clone());
                    let size = s.mail.bytes.len();
                    total += size;
                    if atomic && any_invalid || total > limit {
                        continue;
                    }
                    if let (Some(st), None) = (&mut stream, &rate) {
                        // Streamed as composed: no rate to take first.
                        st.push(s).await;
                        streamed.push(i);
                        continue;
                    }
                    ready.push((i, s));
                    untaken.extend(rate.map(|r| (i, r)));
                    held += size;
                    // Past BATCH_HELD_BYTES the batch streams; then it holds
                    // back STREAM_RATE_BYTES at a time for their rates.
                    let bound = match stream {
                        Some(_) => STREAM_RATE_BYTES,
                        None => BATCH_HELD_BYTES,
                    };
                    if held > bound {
                        if stream.is_none() {
                            stream = self.queue().stream(atomic).ok();
                        }
                        if let Some(st) = &mut stream {
                            let refused = self.take_deferred(&caller, std::mem::take(&mut untaken));
                            any_invalid |= drop_refused(
                                refused.await,
                                &mut ready,
                                &mut results,
                                &mut to_ask,
                                &mut total,
                            );
                            hand_on(st, &mut ready, &mut streamed).await;
                            held = 0;
                        }
                    }
                }
            }
        }
        if !untaken.is_empty() {
            let refused = self.take_deferred(&caller, untaken).await;
            drop_refused(refused, &mut ready, &mut results, &mut to_ask, &mut total);
        }
        if let Some(st) = &mut stream {
            hand_on(st, &mut ready, &mut streamed).await;
        }
        // Every message refused is listed, and none was queued.
        let atomic_refusal = |results: Vec<BatchItemOut>| {
            let refused = results.iter().filter(|r| r.error.is_some()).count();
            let fields: Vec<String> = results
                .iter()
                .filter_map(|r| r.error.as_ref()?.field.clone())
                .collect();
            let e = ToolError {
                field: fields.first().cloned(),
                ..ToolError::new(
                    "invalid_batch",
                    format!(
                        "{refused} of {} messages are invalid ({}); atomic is set, so nothing was queued",
                        results.len(),
                        fields.join(", ")
                    ),
                )
            };
            let text = e.message.clone();
            let out = SendBatchResult {
                results,
                summary: [("refused".to_string(), refused)].into_iter().collect(),
                caller: Some(caller.name.to_string()),
                error: Some(e),
                ..SendBatchResult::default()
            };
            (out, text)
        };
        let refused = results.iter().filter(|r| r.error.is_some()).count();
        if atomic && refused > 0 {
            return atomic_refusal(results);
        }
        // A batch's total is bounded as one message is.
        if total > limit {
            return refuse_all(invalid(
                "messages",
                "max_message_bytes",
                format!(
                    "the batch's messages total {total} bytes once composed, over max_message_bytes ({limit}), which bounds a batch as it bounds one message; split it into smaller batches"
                ),
            ));
        }
        if !ready.is_empty() || stream.is_some() {
            let wait_until = if wait { deadline } else { None };
            let (indexes, answers) = match stream {
                Some(st) => (streamed, st.commit(wait_until, cancel).await),
                None => {
                    let (indexes, submits): (Vec<usize>, Vec<Submit>) = ready.into_iter().unzip();
                    let queue = self.queue();
                    (
                        indexes,
                        queue.submit_many(submits, wait_until, cancel, atomic).await,
                    )
                }
            };
            match answers {
                Ok(answers) => {
                    let mut conflicted = false;
                    for (i, answer) in indexes.into_iter().zip(answers) {
                        let slot = &mut results[i];
                        match answer {
                            Ok(sub) => {
                                slot.message_id = Some(sub.record.message_id.clone());
                                slot.status = Some(sub.record.state.into());
                                slot.idempotent_replay = sub.replay;
                            }
                            Err(QueueError::Conflict { message_id }) => {
                                conflicted = true;
                                slot.error = Some(key_conflict(
                                    format!("messages[{i}].idempotency_key"),
                                    format!(
                                        "the key was already used for a different message ({message_id})"
                                    ),
                                ));
                            }
                            // Not stored, as in an atomic batch with an
                            // invalid message: no error of its own.
                            Err(QueueError::Withheld) => {}
                            Err(e) => slot.error = Some(queue_error(&e)),
                        }
                    }
                    // A key of an atomic batch named another message.
                    if atomic && conflicted {
                        return atomic_refusal(results);
                    }
                    // A key given twice in the batch: the replay answers
                    // with its first message's status after that one's
                    // round, not with the status it was stored in.
                    let first: HashMap<String, SendStatus> = results
                        .iter()
                        .filter(|r| !r.idempotent_replay)
                        .filter_map(|r| Some((r.message_id.clone()?, r.status?)))
                        .collect();
                    for r in results.iter_mut().filter(|r| r.idempotent_replay) {
                        if let Some(status) = r.message_id.as_ref().and_then(|id| first.get(id)) {
                            r.status = Some(*status);
                        }
                    }
                }
                Err(e) => {
                    let e = match e {
                        QueueError::ShuttingDown => ToolError::unavailable(),
                        QueueError::Cancelled => cancelled_batch(),
                        other => queue_unavailable(&other, None),
                    };
                    for i in indexes {
                        results[i].error = Some(e.clone());
                    }
                }
            }
        }
        // The held messages just stored (not replays) go to the client's
        // user in one form; the answer decides them all.
        let mut indexes = Vec::new();
        let mut held = Vec::new();
        for (i, prompt, hash) in to_ask {
            let r = &results[i];
            if let (Some(SendStatus::Held), false, Some(id)) =
                (r.status, r.idempotent_replay, &r.message_id)
            {
                indexes.push(i);
                held.push((id.clone(), prompt, hash));
            }
        }
        let mut in_result = Vec::new();
        match ask {
            Ask::Request(peer) if !held.is_empty() => {
                let asked = approval::elicit_batch(
                    self.queue(),
                    peer,
                    &caller,
                    &held,
                    deadline.filter(|_| wait),
                )
                .await;
                for (i, record) in indexes.into_iter().zip(asked.into_iter().flatten()) {
                    if let Some(record) = record {
                        results[i].status = Some(record.state.into());
                    }
                }
            }
            Ask::InResult(_) => {
                in_result = indexes
                    .into_iter()
                    .zip(held)
                    .map(|(i, (id, prompt, hash))| (i, id, prompt, hash))
                    .collect();
            }
            _ => {}
        }
        let summary = batch_summary(&results);
        let text = batch_text(&batch_id, &summary);
        // Nothing stored because the daemon began to stop meanwhile: the
        // whole call is refused, as one that came in after the stop began,
        // so that the client makes it again elsewhere or later.
        let stopped = results.iter().any(|r| {
            r.error
                .as_ref()
                .is_some_and(|e| e.code == ToolError::UNAVAILABLE)
        });
        if stopped && results.iter().all(|r| r.message_id.is_none()) {
            return refuse_all(ToolError::unavailable());
        }
        tracing::info!(batch = %batch_id, messages = results.len(), refused, "batch finished");
        let message = summary
            .contains_key(SendStatus::Queued.as_str())
            .then(|| self.paused_note())
            .flatten();
        let out = SendBatchResult {
            batch_id: Some(batch_id),
            results,
            summary,
            message,
            caller: Some(caller.name.to_string()),
            error: None,
        };
        if let Ask::InResult(form) = ask
            && !in_result.is_empty()
        {
            *form = approval::batch_input_required(&caller, &in_result, &out);
        }
        (out, text)
    }

    /// While delivery is paused: what an answer of `queued` tells the agent.
    fn paused_note(&self) -> Option<String> {
        self.queue().paused().map(|p| {
            format!(
                "delivery is paused (by {} since {}): queued mail is stored, and is sent once delivery resumes",
                p.by,
                rfc3339(p.since)
            )
        })
    }

    /// The whole `send_email` flow, shared by the tool and `mailmux send`:
    /// compose, then send (or only render, for a dry run). Returns the result
    /// and a sentence for the caller.
    /// A call that waits and is cancelled by `cancel` (its client) cancels
    /// its message if no relay began to commit it. A held message's user
    /// is asked as `ask` says; [`Ask::InResult`] is left holding the form
    /// to answer the call with.
    pub async fn send_email_params(
        &self,
        caller: Arc<Caller>,
        params: SendEmailParams,
        ask: &mut Ask,
        cancel: Option<CancellationToken>,
    ) -> (SendResult, String) {
        let _slot = self.call_gate().enter();
        if self.is_closing() {
            return failed(ToolError::unavailable());
        }
        let Ready {
            mut submit,
            envelope,
            deadline,
            wait,
            prompt,
            hold_hash,
            rate: _, // taken already: prepare defers no rate
        } = match self.prepare(&caller, params).await {
            Prepared::Done(answer) => return *answer,
            Prepared::Ready(ready) => *ready,
        };
        let span = tracing::Span::current();
        let id = submit.mail.message_id.clone();
        submit.cancel = cancel;
        let submitted = self.queue().submit(submit).await;
        let sub = match submitted {
            Ok(s) => s,
            Err(QueueError::ShuttingDown) => return failed(ToolError::unavailable()),
            Err(QueueError::Cancelled) => return failed(cancelled_call()),
            Err(QueueError::Conflict { message_id }) => {
                return failed(key_conflict(
                    "idempotency_key".into(),
                    format!(
                        "idempotency_key was already used for a different message ({message_id}); nothing was sent"
                    ),
                ));
            }
            Err(e) => return failed(queue_unavailable(&e, Some(&id))),
        };
        // A held message: ask the user when the client can be asked.
        let mut sub = sub;
        let held = sub.record.state == State::Held && !sub.replay;
        match (ask, prompt, hold_hash) {
            (Ask::Nobody, _, _) if held => approval::not_asked(&caller),
            (Ask::Request(peer), Some(prompt), Some(hash)) if held => {
                let asked = approval::elicit(
                    self.queue(),
                    peer,
                    &caller,
                    &sub.record.message_id,
                    &prompt,
                    hash,
                    wait.then_some(deadline),
                )
                .await;
                if let Some(record) = asked {
                    sub.report = None;
                    sub.record = record;
                }
            }
            (Ask::InResult(form), Some(prompt), Some(hash)) if held => {
                *form = approval::input_required(&caller, &sub.record.message_id, &prompt, hash);
            }
            _ => {}
        }
        let record = &sub.record;
        // The report of the round this call saw, when it is the final word
        // (the store holds the outcome it reports, and no earlier round
        // settled some recipients); otherwise the message as stored:
        // cancelled or expired meanwhile, not final yet, or final over
        // several rounds.
        let mut out = match &sub.report {
            Some(report)
                if reported(report.status) == record.state
                    && report.accepted == record.accepted
                    && report.rejected.len() == record.rejected.len()
                    && !sub.replay =>
            {
                let mut out = SendResult::from_report(report, envelope);
                out.queued_at = Some(rfc3339(record.queued_at));
                out
            }
            _ => SendResult::from_record(record),
        };
        out.idempotent_replay = sub.replay;
        out.caller = Some(caller.name.to_string());
        if out.status == SendStatus::Queued && out.message.is_none() {
            out.message = self.paused_note();
        }
        if let Some(relay) = &out.relay {
            span.record("relay", relay.as_str());
        }
        let text = describe(&out, &record.message_id, sub.replay);
        tracing::info!(
            status = out.status.as_str(),
            replay = sub.replay,
            accepted = out.accepted.len(),
            rejected = out.rejected.len(),
            attempts = out.attempts.len(),
            "send finished"
        );
        (out, text)
    }

    /// The queue's part of `get_smtp_status` and `/health`.
    pub async fn queue_status(&self) -> QueueOut {
        let queue = self.queue();
        let warning = (!queue.durable()).then(|| {
            "the queue is in memory (queue.store = \"memory\"): accepted mail that is not yet delivered is lost on a crash or restart".to_string()
        });
        let room = queue.room();
        let mut out = QueueOut {
            store: queue.store_kind().into(),
            node_id: queue.node().map(str::to_owned),
            nodes: queue.nodes(),
            durable: queue.durable(),
            available: queue.available(),
            free_bytes: room.map(|(free, _)| free),
            min_free: room.map(|(_, min)| min),
            suppressed: self.suppressions().len() as u64,
            paused: queue.paused().map(|p| PausedOut {
                since: rfc3339(p.since),
                by: p.by,
                reason: p.reason,
            }),
            warning,
            ..Default::default()
        };
        match queue.stats().await {
            Ok(stats) => {
                for st in State::ALL {
                    out.counts.insert(st.as_str().into(), 0);
                }
                for (st, n) in stats.counts {
                    out.counts.insert(st.as_str().into(), n);
                }
                let now = mailmux_actors::queue::now_millis();
                out.oldest_queued_age_secs = stats
                    .oldest_queued_at
                    .map(|t| ((now - t).max(0) as f64) / 1000.0);
                out.next_retry_at = stats.next_retry_at.map(rfc3339);
                out.sent_copies_pending = stats.copies_pending;
            }
            Err(_) => out.available = false,
        }
        out
    }

    async fn reload_inner(&self) -> Result<CallToolResult, ErrorData> {
        match self.reload().await {
            Ok((out, text)) => respond(out, text),
            Err(e) => fail::<ReloadResult>(e),
        }
    }

    /// Reads the configuration again and applies it as a diff, for the
    /// `reload_smtp_configuration` tool and SIGHUP. On an error the running
    /// configuration stays in force. What changed is logged.
    pub(crate) async fn reload(&self) -> Result<(ReloadResult, String), ToolError> {
        if self.is_closing() {
            return Err(ToolError::unavailable());
        }
        let _one_at_a_time = self.state.reload.lock().await;
        let sources = self.state.sources.clone();
        // Loading reads files (the config, password files): keep it off the
        // async workers.
        let loaded = tokio::task::spawn_blocking(move || config::load(&sources)).await;
        let new = match loaded {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(ToolError::new(
                    "invalid_config",
                    format!("{e}; the running configuration is unchanged"),
                ));
            }
            Err(e) => {
                return Err(ToolError::new(
                    "invalid_config",
                    format!(
                        "loading the configuration failed ({e}); the running configuration is unchanged"
                    ),
                ));
            }
        };
        if let Some(addr) = self.state.exposed.get()
            && super::anonymous_http(&new)
        {
            return Err(ToolError::new(
                "invalid_config",
                format!(
                    "the configuration has no bearer token (http.token or a caller's token) while MCP is served beyond loopback on {addr}; the running configuration is unchanged"
                ),
            ));
        }
        let mut diff = self
            .dispatcher()
            .reload(new.dispatch.clone())
            .await
            .map_err(control_error)?;
        crate::config::warn_stray_env(&new);
        let old = self.config();
        // A relay whose `senders` changed is changed too, though its actor
        // is not: the senders are read as each message is accepted.
        for r in &new.dispatch.relays {
            if old.senders_of(&r.name) != new.senders_of(&r.name)
                && !diff.added.contains(&r.name)
                && !diff.changed.contains(&r.name)
            {
                diff.changed.push(r.name.clone());
            }
        }
        let daemon_changed = old.daemon != new.daemon;
        let restart_needed = restart_only(&self.state.initial, &new);
        if let Some(w) = super::default_relay_warning(&new) {
            tracing::warn!("{w}");
        }
        let out = ReloadResult {
            reloaded: true,
            added: diff.added,
            removed: diff.removed,
            changed: diff.changed,
            router_changed: diff.router_changed,
            daemon_changed,
            restart_needed: restart_needed.clone(),
            config_sources: new.sources.clone(),
            error: None,
        };
        crate::telemetry::zeroes(&new);
        self.state.notifier.set(new.notify.clone());
        self.set_config(new);
        let mut text = format!(
            "reloaded: added [{}], removed [{}], changed [{}]{}{}",
            out.added.join(", "),
            out.removed.join(", "),
            out.changed.join(", "),
            if out.router_changed {
                ", router settings changed"
            } else {
                ""
            },
            if daemon_changed {
                ", daemon settings changed"
            } else {
                ""
            },
        );
        if restart_needed.is_empty() {
            tracing::info!("{text}");
        } else {
            text.push_str(&format!(
                "; not applied until the next restart: {}",
                restart_needed.join(", ")
            ));
            tracing::warn!("{text}");
        }
        Ok((out, text))
    }
}

/// The keys of `new` that differ from what the daemon started with (`old`)
/// and that a reload cannot apply, because the daemon takes them once, at
/// start: the queue's store and schedule, the
/// HTTP listener (its token excepted: the callers are rebuilt), the call
/// bound, the audit log, the Sent copies and the log level. Named in the
/// answer, so that "reloaded" is not taken to mean they are in force.
fn restart_only(old: &config::Config, new: &config::Config) -> Vec<String> {
    let (q, nq) = (&old.queue, &new.queue);
    let (h, nh) = (&old.daemon.http, &new.daemon.http);
    [
        (q.store != nq.store, "queue.store"),
        (q.max_age != nq.max_age, "queue.max_age"),
        (q.retry_base != nq.retry_base, "queue.retry_base"),
        (q.retry_max != nq.retry_max, "queue.retry_max"),
        (
            q.idempotency_ttl != nq.idempotency_ttl,
            "queue.idempotency_ttl",
        ),
        (q.retain != nq.retain, "queue.retain"),
        // The deadline of the rounds the queue starts itself; calls take
        // the new one at once.
        (
            q.delivery_timeout != nq.delivery_timeout,
            "send_deadline (of the queue's own rounds)",
        ),
        (q.min_free != nq.min_free, "queue.min_free"),
        (h.bind != nh.bind, "http.bind"),
        (h.allowed_hosts != nh.allowed_hosts, "http.allowed_hosts"),
        (
            h.allowed_origins != nh.allowed_origins,
            "http.allowed_origins",
        ),
        (h.body_limit != nh.body_limit, "http.body_limit"),
        (h.read_timeout != nh.read_timeout, "http.read_timeout"),
        (
            h.max_connections != nh.max_connections,
            "http.max_connections",
        ),
        (h.stateful != nh.stateful, "http.stateful"),
        // New files are served at once; TLS on or off needs a new listener.
        (h.tls.is_some() != nh.tls.is_some(), "http.tls_cert"),
        (h.max_sessions != nh.max_sessions, "http.max_sessions"),
        (h.auth_failures != nh.auth_failures, "http.auth_failures"),
        (
            h.max_sessions_per_caller != nh.max_sessions_per_caller,
            "http.max_sessions_per_caller",
        ),
        (
            old.daemon.metrics.bind != new.daemon.metrics.bind,
            "metrics.bind",
        ),
        (
            old.daemon.max_concurrent_calls != new.daemon.max_concurrent_calls,
            "max_concurrent_calls",
        ),
        (old.daemon.log_level != new.daemon.log_level, "log_level"),
        (old.safety.audit != new.safety.audit, "audit"),
        (old.sent_copies != new.sent_copies, "relays.sent_copy"),
        (old.bounce_readers != new.bounce_readers, "relays.bounces"),
    ]
    .into_iter()
    .filter(|(changed, _)| *changed)
    .map(|(_, key)| key.to_owned())
    .collect()
}

/// How a held message's user is asked, for a call of `ctx`: a client of
/// 2026-07-28 or later (which is sent no requests) is given the form in
/// the call's result when it declares form elicitation, and is not asked
/// otherwise; a client of an earlier protocol is sent the form as a
/// request (when it declared elicitation; [`approval::elicit`] checks).
fn ask_of(ctx: &RequestContext<RoleServer>) -> Ask {
    let modern = ctx
        .protocol_version()
        .is_some_and(|v| v.as_str() >= ProtocolVersion::V_2026_07_28.as_str());
    match modern {
        true if ctx
            .client_capabilities()
            .is_some_and(|c| approval::elicits_forms(&c)) =>
        {
            Ask::InResult(None)
        }
        true => Ask::Nobody,
        false => Ask::Request(ctx.peer.clone()),
    }
}

/// A message that does not exist or is another caller's: not shown, nor
/// said to exist.
fn no_such_message() -> ToolError {
    ToolError::new(
        "not_found",
        "no such message (it may have been purged after queue.retain)",
    )
}

/// A call's answer to an approval form that does not hold.
fn bad_answer(bad: approval::BadAnswer) -> ToolError {
    invalid(bad.field, bad.rule, bad.message.to_owned())
}

/// A batch's messages per status, and `refused` for those not stored.
fn batch_summary(results: &[BatchItemOut]) -> std::collections::BTreeMap<String, usize> {
    let mut summary = std::collections::BTreeMap::new();
    for r in results {
        let key = match (&r.error, r.status) {
            (Some(_), _) => "refused".to_string(),
            (None, Some(s)) => s.as_str().to_string(),
            (None, None) => "unknown".to_string(),
        };
        *summary.entry(key).or_insert(0usize) += 1;
    }
    summary
}

/// The sentence of a batch's answer.
fn batch_text(batch_id: &str, summary: &std::collections::BTreeMap<String, usize>) -> String {
    format!(
        "batch {batch_id}: {}",
        summary
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Counts a tool call by tool and outcome.
fn count_call(tool: String, result: &Result<CallToolResponse, ErrorData>) {
    let outcome = match result {
        Ok(CallToolResponse::Complete(r)) if r.is_error == Some(true) => "error",
        Ok(_) => "ok",
        Err(_) => "protocol_error",
    };
    crate::telemetry::call(tool, outcome);
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for MailmuxServer {
    /// Calls the tool, and counts the call by tool and outcome.
    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        if !self.tool_router.has_route(&request.name) {
            crate::telemetry::call("unknown".to_owned(), "protocol_error");
            let tools = self.tool_router.list_all();
            let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
            return Err(unknown_tool(&request.name, &names));
        }
        // A `send_email` or `send_batch` call again, with the answer to
        // its approval form.
        if request.request_state.is_some() || request.input_responses.is_some() {
            let result = match request.name.as_ref() {
                "send_email" => Some(self.send_email_answered(&request, &context).await),
                "send_batch" => Some(self.send_batch_answered(&request, &context).await),
                _ => None,
            };
            if let Some(result) = result {
                count_call(request.name.to_string(), &result);
                return result;
            }
        }
        let tool = request.name.to_string();
        let tcc = ToolCallContext::new(self, request, context);
        let result = self.tool_router.call(tcc).await;
        count_call(tool, &result);
        result
    }

    /// Every tool, but those that act on the relays to a caller whose
    /// policy keeps it off them (`relay_control = false`). Such a list is
    /// the caller's own: rmcp marks it private for clients that cache.
    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let mut tools = self.tool_router.list_all();
        if caller_of(self, &context).is_some_and(|c| !c.policy.relay_control) {
            tools.retain(|t| !RELAY_CONTROL_TOOLS.contains(&t.name.as_ref()));
        }
        Ok(ListToolsResult::with_all_items(tools))
    }

    /// A client cancelled one of its calls: a send that waits cancels its
    /// message if no relay began to commit it.
    async fn on_cancelled(
        &self,
        notification: CancelledNotificationParam,
        context: NotificationContext<RoleServer>,
    ) {
        let caller = caller_in(self, &context.extensions);
        if let (Some(caller), Some(id)) = (caller, notification.request_id) {
            self.cancellable().cancel(&caller, &context.extensions, id);
        }
    }

    /// A request that fits no MCP request: see [`unmatched_request`].
    async fn on_custom_request(
        &self,
        request: CustomRequest,
        _context: RequestContext<RoleServer>,
    ) -> Result<CustomResult, ErrorData> {
        Err(unmatched_request(&request.method, request.params.as_ref()))
    }

    fn get_info(&self) -> ServerConfig {
        let capabilities = ServerCapabilities::builder()
            .enable_tools()
            .enable_resources()
            .enable_resources_subscribe()
            .enable_tasks()
            .build();
        ServerConfig::new(capabilities)
            .with_server_info(Implementation::new("mailmux", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "mailmux sends email through SMTP relays with failover. Use send_email (try \
                 dry_run first if unsure), send_batch for many messages or a mail merge in one \
                 call, get_smtp_status to see the relays, and test_smtp_connection to probe \
                 them. Give each message an idempotency_key so that repeating a call never \
                 sends twice. A failed send has isError and a stable error code; status \
                 \"unknown\" means it may have been delivered; \"queued\" means mailmux keeps \
                 retrying (get_message_status follows it). Each message is also the resource \
                 mailmux://messages/{message_id}.",
            )
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        Ok(ListResourceTemplatesResult::with_all_items(vec![
            ResourceTemplate::new(format!("{}{{message_id}}", resources::PREFIX), "message")
                .with_description(
                    "One message in mailmux's queue: status, times, envelope and attempts \
                     (never the body), as JSON. Subscribe for a notification on each change.",
                )
                .with_mime_type("application/json"),
        ]))
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        let caller = caller_of(self, &context)
            .ok_or_else(|| ErrorData::invalid_request(no_caller().message, None))?;
        let filter = Filter {
            state: None,
            caller: Some(caller.name.to_string()),
            ..Filter::default()
        };
        let (page, _) = self
            .queue()
            .list(&filter, RESOURCES_LISTED, None)
            .await
            .map_err(|e| ErrorData::internal_error(queue_error(&e).message, None))?;
        Ok(ListResourcesResult::with_all_items(
            page.iter()
                .map(|m| {
                    Resource::new(resources::uri(&m.message_id), m.message_id.clone())
                        .with_description(format!("{} message", m.state.as_str()))
                        .with_mime_type("application/json")
                })
                .collect(),
        ))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let caller = caller_of(self, &context)
            .ok_or_else(|| ErrorData::invalid_request(no_caller().message, None))?;
        let id = resources::message_id(&request.uri).ok_or_else(|| {
            ErrorData::resource_not_found(format!("no resource {}", quoted(&request.uri)), None)
        })?;
        let record = self
            .owned_by(&caller, id)
            .await
            .map_err(|e| ErrorData::internal_error(queue_error(&e).message, None))?
            .ok_or_else(|| {
                ErrorData::resource_not_found(format!("no message {}", quoted(id)), None)
            })?;
        let json = serde_json::to_string(&MessageStatusResult::from(&record))
            .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
        Ok(ReadResourceResult::new(vec![
            ResourceContents::text(json, request.uri).with_mime_type("application/json"),
        ])
        .into())
    }

    async fn get_task(
        &self,
        request: GetTaskParams,
        context: RequestContext<RoleServer>,
    ) -> Result<GetTaskResult, ErrorData> {
        super::tasks::get(self, request, context).await
    }

    async fn cancel_task(
        &self,
        request: CancelTaskParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        super::tasks::cancel(self, request, context).await
    }

    /// `subscriptions/listen` (2026-07-28): the message resources asked
    /// for, the first `MAX_WATCHED` of them (the acknowledgment names
    /// those); the listen itself keeps those of the caller's own messages.
    fn accepted_subscription_filter(
        &self,
        requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        let ours: Vec<String> = requested
            .resource_subscriptions
            .iter()
            .flatten()
            .filter(|uri| resources::message_id(uri).is_some())
            .take(resources::MAX_WATCHED)
            .cloned()
            .collect();
        Some(
            SubscriptionFilter::builder()
                .resource_subscriptions(ours)
                .build(),
        )
    }

    async fn listen(&self, context: SubscriptionContext) -> Result<(), ErrorData> {
        let caller = caller_of(self, context.request_context())
            .ok_or_else(|| ErrorData::invalid_request(no_caller().message, None))?;
        let mut ids = std::collections::HashSet::new();
        for uri in context.accepted().resource_subscriptions.iter().flatten() {
            if let Some(id) = resources::message_id(uri)
                && self.visible(&caller, id).await
            {
                ids.insert(id.to_owned());
            }
        }
        resources::listen(self.queue(), ids, context).await;
        Ok(())
    }

    #[allow(deprecated)] // resources/subscribe: what clients of 2025-06-18 send
    async fn subscribe(
        &self,
        request: SubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let caller = caller_of(self, &context)
            .ok_or_else(|| ErrorData::invalid_request(no_caller().message, None))?;
        let not_found =
            || ErrorData::resource_not_found(format!("no resource {}", quoted(&request.uri)), None);
        let id = resources::message_id(&request.uri).ok_or_else(not_found)?;
        let Ok(Some(record)) = self.owned_by(&caller, id).await else {
            return Err(not_found());
        };
        // A message that ended without a relay taking it changes no more:
        // nothing to keep a place for. One a relay took may get a report.
        if resources::ends_at(record.state) {
            return Ok(());
        }
        let session = super::cancel::session(&context.extensions);
        self.state
            .subscriptions
            .subscribe(
                self.queue(),
                &caller.name,
                session,
                id,
                record.state,
                context.peer.clone(),
            )
            .await
            .map_err(|e| ErrorData::invalid_request(e.to_string(), None))
    }

    #[allow(deprecated)]
    async fn unsubscribe(
        &self,
        request: UnsubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let caller = caller_of(self, &context)
            .ok_or_else(|| ErrorData::invalid_request(no_caller().message, None))?;
        if let Some(id) = resources::message_id(&request.uri) {
            let session = super::cancel::session(&context.extensions);
            self.state
                .subscriptions
                .unsubscribe(&caller.name, session, id);
        }
        Ok(())
    }
}

/// Messages `resources/list` shows: the most recent (the template reaches
/// every other one).
const RESOURCES_LISTED: usize = 100;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unconfirmed_write_is_never_reported_as_not_accepted() {
        let unconfirmed = QueueError::Store(StoreError::Unconfirmed("connection reset".into()));
        let e = queue_unavailable(&unconfirmed, Some("abc@mailmux.localhost"));
        assert_eq!(e.code, "queue_unavailable");
        assert!(!e.message.contains("not accepted"), "{}", e.message);
        assert!(e.message.contains("may have been stored"), "{}", e.message);
        assert!(e.message.contains("abc@mailmux.localhost"), "{}", e.message);
        let batch = queue_unavailable(&unconfirmed, None);
        assert!(!batch.message.contains("not accepted"), "{}", batch.message);

        let down = QueueError::Store(StoreError::Unavailable("disk full".into()));
        let e = queue_unavailable(&down, Some("abc@mailmux.localhost"));
        assert!(e.message.contains("not accepted"), "{}", e.message);
    }
}
