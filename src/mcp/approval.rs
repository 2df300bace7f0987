//! Approval of a held message by the user, through MCP elicitation (form
//! mode): one boolean field, `approve`, under a prompt that shows what
//! would be sent. Accepting with `approve: true` releases the message;
//! decline, cancel or `approve: false` rejects it. The held messages of one
//! `send_batch` call are put in one form, each shown in turn, and one answer
//! decides them all. A client without elicitation, or one that does not
//! answer in time, leaves them held for an operator.
//!
//! A client of protocol 2026-07-28 or later cannot be sent a request; one
//! that declares form elicitation gets the form in the result of its
//! `send_email` call instead ([`input_required`]: an `InputRequiredResult`,
//! the round trips of that protocol), and calls again with the user's
//! answer and the request state, which names the held message and the hash
//! of its content ([`Answered::read`]). The message, not that call's
//! arguments, is what the answer decides. A batch's form goes the same way
//! ([`batch_input_required`]); its state also carries the batch's answer,
//! which the call made again answers with ([`BatchAnswered`]).

use std::time::Duration;

use mailmux_actors::queue::{Decided, Decision, Queue, Record};
use rmcp::RoleServer;
use rmcp::model::{
    ClientCapabilities, ElicitRequest, ElicitRequestParams, ElicitResult, ElicitationAction,
    ElicitationSchema, InputRequest, InputRequiredResult, InputResponses,
};
use rmcp::service::{ElicitationError, Peer};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::types::SendBatchResult;
use crate::compose::Composed;
use crate::policy::{Approver, Caller, shown};

/// The form: one boolean.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ApprovalForm {
    /// Send this message?
    pub approve: bool,
}

rmcp::elicit_safe!(ApprovalForm);

/// Lines of the text shown in the prompt, at most.
const PROMPT_LINES: usize = 12;
/// Characters of the text shown in the prompt, at most.
const PROMPT_CHARS: usize = 1200;

/// What the person approves: sender, every recipient on its own line (Bcc
/// marked), the Reply-To address, subject, size, attachments, the header
/// fields the agent wrote by name (unsubscribe links and `headers`, which
/// carry its text to the recipients too), and the first lines of the text,
/// quoted (`> `), each as [`shown`] writes it (a lookalike domain in its
/// ASCII form, hidden characters written out). `held_by`: the content
/// check that held it, said first.
pub fn prompt(c: &Composed, held_by: Option<&str>) -> String {
    let mut out = String::from("An agent wants to send this email. Approve it?\n\n");
    if let Some(why) = held_by {
        out.push_str(&format!("Held because {}.\n\n", shown::text(why)));
    }
    // The name the recipients will see, beside the address it hides.
    match c.from_name.as_deref().filter(|n| !n.trim().is_empty()) {
        Some(name) => out.push_str(&format!(
            "From: \"{}\" <{}>\n",
            shown::text(name),
            shown::address(c.from.as_ref())
        )),
        None => out.push_str(&format!("From: {}\n", shown::address(c.from.as_ref()))),
    }
    for (address, (list, _)) in c.recipients.iter().zip(&c.fields) {
        let label = match *list {
            "to" => "To",
            "cc" => "Cc",
            _ => "Bcc (hidden from the others)",
        };
        out.push_str(&format!("{label}: {}\n", shown::address(address.as_ref())));
    }
    if let Some(reply_to) = &c.reply_to {
        out.push_str(&format!(
            "Reply-To (replies go here): {}\n",
            shown::address(reply_to.as_ref())
        ));
    }
    out.push_str(&format!("Subject: {}\n", shown::text(&c.subject)));
    out.push_str(&format!("Size: {} bytes\n", c.bytes.len()));
    for a in &c.attachments {
        let label = match a.content_id {
            Some(_) => "Shown in the HTML",
            None => "Attachment",
        };
        out.push_str(&format!(
            "{label}: {} ({}, {} bytes)\n",
            shown::text(&a.filename),
            a.content_type,
            a.size
        ));
    }
    for (name, value) in &c.own_fields {
        out.push_str(&format!("Header field {name}: {}\n", shown::text(value)));
    }
    let text = c.text.as_deref().or(c.html.as_deref()).unwrap_or("");
    let mut lines = String::new();
    for line in text.lines().take(PROMPT_LINES) {
        lines.push_str(line);
        lines.push('\n');
    }
    if lines.chars().count() > PROMPT_CHARS {
        lines = lines.chars().take(PROMPT_CHARS).collect();
        lines.push_str("…\n");
    } else if text.lines().count() > PROMPT_LINES {
        lines.push_str("…\n");
    }
    // Every line the agent wrote is quoted, so that none can pass for a
    // line of the prompt ("To: …", or another email of a batch); a lone
    // carriage return, which could hide the quote, is written out.
    out.push_str("\nThe text, as the agent wrote it:\n");
    if text.trim().is_empty() {
        out.push_str("> (no text)\n");
    }
    for line in shown::text(&lines).lines() {
        out.push_str("> ");
        out.push_str(&line.replace('\r', "<U+000D>"));
        out.push('\n');
    }
    out
}

/// Says why a held message's user is not asked when there is no client
/// to ask: a stateless HTTP request (which declares no elicitation), or
/// the CLI.
pub fn not_asked(caller: &Caller) {
    if !operator_only(caller) {
        no_form();
    }
}

/// Whether only an operator approves `caller`'s messages (said in the log).
fn operator_only(caller: &Caller) -> bool {
    let only = caller.policy.approver == Approver::Operator;
    if only {
        tracing::info!(
            "held for approval; this caller's messages are approved by an operator only"
        );
    }
    only
}

fn no_form() {
    tracing::info!(
        "held for approval; the client declared no form elicitation, so it waits for an operator"
    );
}

/// Asks the user to approve `message_id` and records the answer. Returns
/// the message as it is then (after delivery when `wait_until` is given
/// and it was approved), or `None` when nobody was asked or nobody answered
/// (it stays held).
pub async fn elicit(
    queue: &Queue,
    peer: &Peer<RoleServer>,
    caller: &Caller,
    message_id: &str,
    prompt: &str,
    hash: [u8; 32],
    wait_until: Option<tokio::time::Instant>,
) -> Option<Record> {
    let approve = ask(peer, caller, prompt).await?;
    decide(queue, caller, message_id, approve, hash, wait_until).await
}

/// The held messages of one `send_batch` call, each with its prompt (as
/// [`prompt`] writes it) and content hash, put to the user in one form:
/// one answer approves or rejects them all. Returns each message as it is
/// then, in the order given (`None` for one whose decision could not be
/// recorded), or `None` when nobody was asked or nobody answered. A batch
/// whose prompts together pass [`BATCH_PROMPT_CHARS`] is not put to the
/// user, who could not read it all: it waits for an operator.
pub async fn elicit_batch(
    queue: &Queue,
    peer: &Peer<RoleServer>,
    caller: &Caller,
    held: &[(String, String, [u8; 32])],
    wait_until: Option<tokio::time::Instant>,
) -> Option<Vec<Option<Record>>> {
    let text = batch_prompt(held.iter().map(|(_, p, _)| p.as_str()), held.len())?;
    let approve = ask(peer, caller, &text).await?;
    let decisions = held
        .iter()
        .map(|(id, _, hash)| decide(queue, caller, id, approve, *hash, wait_until));
    Some(futures::future::join_all(decisions).await)
}

/// The most characters one batch's form shows; past it the batch waits for
/// an operator.
pub const BATCH_PROMPT_CHARS: usize = 64 * 1024;

/// One form for `n` messages: each message's own prompt in turn, or `None`
/// when that is longer than [`BATCH_PROMPT_CHARS`].
fn batch_prompt<'a>(prompts: impl Iterator<Item = &'a str>, n: usize) -> Option<String> {
    let mut out =
        format!("An agent wants to send these {n} emails in one batch. Approve them all?\n");
    for (i, p) in prompts.enumerate() {
        let body = p.split_once("\n\n").map_or(p, |(_, rest)| rest);
        out.push_str(&format!("\n--- Email {} of {n} ---\n", i + 1));
        out.push_str(body);
        if out.len() > BATCH_PROMPT_CHARS {
            tracing::info!(
                messages = n,
                "held for approval; the batch is too long to show in one form, so it waits for an operator"
            );
            return None;
        }
    }
    Some(out)
}

/// Puts `prompt` to the client's user: `Some(true)` to approve,
/// `Some(false)` to reject, `None` when the client cannot be asked, the
/// caller's policy leaves its messages to an operator (`approver =
/// "operator"`), or nobody answered.
async fn ask(peer: &Peer<RoleServer>, caller: &Caller, prompt: &str) -> Option<bool> {
    if operator_only(caller) {
        return None;
    }
    if !peer
        .supported_elicitation_modes()
        .contains(&rmcp::service::ElicitationMode::Form)
    {
        no_form();
        return None;
    }
    tracing::info!("held for approval; asking the client's user");
    let timeout: Duration = caller.policy.elicitation_timeout;
    let answer = peer
        .elicit_with_timeout::<ApprovalForm>(prompt.to_owned(), Some(timeout))
        .await;
    match answer {
        Ok(Some(form)) => Some(form.approve),
        Err(ElicitationError::UserDeclined | ElicitationError::UserCancelled) => Some(false),
        Ok(None) | Err(ElicitationError::NoContent) => Some(false),
        Err(e) => {
            tracing::info!(error = %e, "no answer to the approval form; the message stays held");
            None
        }
    }
}

/// How the user of a call's client is asked to approve a held message.
#[derive(Debug)]
pub enum Ask {
    /// Nobody can be asked: the command line, or a stateless request of a
    /// protocol before 2026-07-28 (which declares no elicitation).
    Nobody,
    /// Sent an `elicitation/create` request (a protocol before 2026-07-28).
    Request(Peer<RoleServer>),
    /// Given the form in the call's result (2026-07-28 or later, form
    /// elicitation declared): the send leaves the form here.
    InResult(Option<InputRequiredResult>),
}

/// Whether a client with `capabilities` takes form elicitation: it
/// declares elicitation, with form mode or with no mode at all (the
/// default, as rmcp reads it).
pub fn elicits_forms(capabilities: &ClientCapabilities) -> bool {
    capabilities
        .elicitation
        .as_ref()
        .is_some_and(|e| e.form.is_some() || e.url.is_none())
}

/// The key of the approval form among an `InputRequiredResult`'s requests.
pub const INPUT_KEY: &str = "approval";

/// What a request state of an approval form starts with.
const STATE_PREFIX: &str = "mailmux-approval";

/// The approval form of the held `message_id` (content `hash`) for a
/// client that is answered in the call's result rather than sent a
/// request; `None` when the caller's messages are approved by an operator
/// only.
pub fn input_required(
    caller: &Caller,
    message_id: &str,
    prompt: &str,
    hash: [u8; 32],
) -> Option<InputRequiredResult> {
    if operator_only(caller) {
        return None;
    }
    tracing::info!("held for approval; the form goes to the client's user in the call's result");
    form(message_id, prompt, hash)
}

/// The form of [`input_required`], and its request state.
fn form(message_id: &str, prompt: &str, hash: [u8; 32]) -> Option<InputRequiredResult> {
    let state = format!(
        "{STATE_PREFIX}:{message_id}:{}",
        crate::policy::hash_text(&hash)
    );
    with_state(prompt, state)
}

/// The approval form showing `prompt`, with the request state `state`.
fn with_state(prompt: &str, state: String) -> Option<InputRequiredResult> {
    let schema = ElicitationSchema::from_type::<ApprovalForm>().ok()?;
    let form = ElicitRequest::new(ElicitRequestParams::FormElicitationParams {
        meta: None,
        message: prompt.to_owned(),
        requested_schema: schema,
    });
    let requests = [(INPUT_KEY.to_owned(), InputRequest::Elicitation(form))].into();
    Some(InputRequiredResult::new(Some(requests), Some(state)))
}

/// What a request state of a batch's approval form starts with.
const BATCH_STATE_PREFIX: &str = "mailmux-approval-batch:";

/// What the request state of a batch's form carries: each held message
/// (its index in the batch, its id and the hex of its content hash), and
/// the batch's answer as it stood, for the call made again to answer with.
/// The client could change it: the messages are checked to be the
/// caller's and their hashes bind each decision, so a changed state can
/// only mislead that client about its own batch.
#[derive(Serialize, Deserialize)]
struct BatchState {
    held: Vec<(usize, String, String)>,
    answer: SendBatchResult,
}

/// The form of a `send_batch` call's held messages (`index`, id, prompt
/// and content hash each), one form for all as [`elicit_batch`] puts it,
/// for a client answered in the call's result; `answer` is the call's
/// answer as it stands. `None` when the caller's messages are approved by
/// an operator only, or when the form would be too long to read.
pub fn batch_input_required(
    caller: &Caller,
    held: &[(usize, String, String, [u8; 32])],
    answer: &SendBatchResult,
) -> Option<InputRequiredResult> {
    if operator_only(caller) {
        return None;
    }
    let text = batch_prompt(held.iter().map(|(_, _, p, _)| p.as_str()), held.len())?;
    let state = BatchState {
        held: held
            .iter()
            .map(|(i, id, _, hash)| (*i, id.clone(), crate::policy::hash_text(hash)))
            .collect(),
        answer: answer.clone(),
    };
    let state = format!(
        "{BATCH_STATE_PREFIX}{}",
        serde_json::to_string(&state).ok()?
    );
    tracing::info!(
        messages = held.len(),
        "held for approval; the batch's form goes to the client's user in the call's result"
    );
    with_state(&text, state)
}

/// A `send_batch` call that answers its batch's approval form: the held
/// messages (index in the batch, id, content hash), the batch's answer as
/// it stood, and the user's answer (`None`: none came back).
#[derive(Debug)]
pub struct BatchAnswered {
    pub held: Vec<(usize, String, [u8; 32])>,
    pub answer: SendBatchResult,
    pub approve: Option<bool>,
}

/// What is wrong with a call's answer to an approval form: the parameter
/// at fault, the rule it broke, and a sentence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadAnswer {
    pub field: &'static str,
    pub rule: &'static str,
    pub message: &'static str,
}

/// A request state that is not an approval form's, or does not hold.
const NOT_OURS: BadAnswer = BadAnswer {
    field: "requestState",
    rule: "invalid_request_state",
    message: "requestState is not the state of a mailmux approval form",
};

/// An answer to the form that is not an elicitation's result.
const NOT_AN_ANSWER: BadAnswer = BadAnswer {
    field: "inputResponses.approval",
    rule: "invalid_input_response",
    message: "inputResponses.approval is not an elicitation result",
};

impl BatchAnswered {
    /// The answer a call carries; an error names what is wrong with it.
    pub fn read(
        state: Option<&str>,
        responses: Option<&InputResponses>,
    ) -> Result<BatchAnswered, BadAnswer> {
        let state: BatchState = state
            .and_then(|s| s.strip_prefix(BATCH_STATE_PREFIX))
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or(NOT_OURS)?;
        let mut held = Vec::with_capacity(state.held.len());
        for (i, id, hash) in state.held {
            let hash = crate::policy::hash_from_text(&hash).ok_or(NOT_OURS)?;
            if i >= state.answer.results.len() || id.is_empty() {
                return Err(NOT_OURS);
            }
            held.push((i, id, hash));
        }
        if held.is_empty() {
            return Err(NOT_OURS);
        }
        Ok(BatchAnswered {
            held,
            answer: state.answer,
            approve: approve_of(responses)?,
        })
    }

    /// Records the answer on each held message (when there is one) and
    /// returns each as it is then, in the order of `held`: after delivery
    /// when `wait_until` is given and they were approved. The caller has
    /// been checked to own them.
    pub async fn decide(
        &self,
        queue: &Queue,
        caller: &Caller,
        wait_until: Option<tokio::time::Instant>,
    ) -> Vec<Option<Record>> {
        if self.approve.is_none() {
            tracing::info!("no answer to the approval form; the messages stay held");
        }
        let each = self.held.iter().map(|(_, id, hash)| {
            decide_answered(queue, caller, id, self.approve, *hash, wait_until)
        });
        futures::future::join_all(each).await
    }
}

/// Records `approve` on `message_id` (for the content `hash`) when the
/// user answered, and returns the message as it is then.
async fn decide_answered(
    queue: &Queue,
    caller: &Caller,
    message_id: &str,
    approve: Option<bool>,
    hash: [u8; 32],
    wait_until: Option<tokio::time::Instant>,
) -> Option<Record> {
    match approve {
        Some(approve) => decide(queue, caller, message_id, approve, hash, wait_until).await,
        None => queue.status(message_id).await.ok().flatten(),
    }
}

/// The user's answer among `responses`: `None` when there is none.
fn approve_of(responses: Option<&InputResponses>) -> Result<Option<bool>, BadAnswer> {
    let Some(v) = responses.and_then(|r| r.get(INPUT_KEY)) else {
        return Ok(None);
    };
    let answer: ElicitResult = serde_json::from_value(v.clone()).map_err(|_| NOT_AN_ANSWER)?;
    // As a form answered through a request: only an accepted form that
    // says `approve: true` approves.
    Ok(Some(
        answer.action == ElicitationAction::Accept
            && answer.content.as_ref().and_then(|c| c.get("approve"))
                == Some(&serde_json::Value::Bool(true)),
    ))
}

/// A call that answers an approval form: the held message, the content
/// hash the form showed, and the user's answer (`None`: no answer came
/// back, so the message stays held).
#[derive(Debug, PartialEq, Eq)]
pub struct Answered {
    pub message_id: String,
    pub hash: [u8; 32],
    pub approve: Option<bool>,
}

impl Answered {
    /// The answer a call carries, from its request state and input
    /// responses; an error names what is wrong with them.
    pub fn read(
        state: Option<&str>,
        responses: Option<&InputResponses>,
    ) -> Result<Answered, BadAnswer> {
        let parsed = state
            .and_then(|s| {
                s.strip_prefix(STATE_PREFIX)?
                    .strip_prefix(':')?
                    .rsplit_once(':')
            })
            .and_then(|(id, hash)| Some((id, crate::policy::hash_from_text(hash)?)))
            .filter(|(id, _)| !id.is_empty());
        let Some((message_id, hash)) = parsed else {
            return Err(NOT_OURS);
        };
        Ok(Answered {
            message_id: message_id.to_owned(),
            hash,
            approve: approve_of(responses)?,
        })
    }

    /// Records the answer (when there is one) and returns the message as
    /// it is then: after delivery when `wait_until` is given and it was
    /// approved. The caller has been checked to own the message.
    pub async fn decide(
        &self,
        queue: &Queue,
        caller: &Caller,
        wait_until: Option<tokio::time::Instant>,
    ) -> Option<Record> {
        if self.approve.is_none() {
            tracing::info!("no answer to the approval form; the message stays held");
        }
        let (id, hash) = (&self.message_id, self.hash);
        decide_answered(queue, caller, id, self.approve, hash, wait_until).await
    }
}

/// Records the user's answer on `message_id` (for the content `hash`), and
/// returns the message as it is then: after delivery when `wait_until` is
/// given and it was approved.
async fn decide(
    queue: &Queue,
    caller: &Caller,
    message_id: &str,
    approve: bool,
    hash: [u8; 32],
    wait_until: Option<tokio::time::Instant>,
) -> Option<Record> {
    let by = format!("user of caller {} (MCP elicitation)", caller.name);
    let decided = queue
        .decide(
            message_id,
            Decision {
                approve,
                by,
                hash: Some(hash),
            },
        )
        .await;
    match decided {
        Ok(Decided::Released(_)) => {
            tracing::info!(message_id = %message_id, "the user approved the held message");
            match wait_until {
                Some(deadline) => queue.wait_final(message_id, deadline).await.ok(),
                None => queue.status(message_id).await.ok().flatten(),
            }
        }
        Ok(Decided::Rejected) => {
            tracing::info!(message_id = %message_id, "the user rejected the held message");
            queue.status(message_id).await.ok().flatten()
        }
        // An operator decided first, or it expired: report it as it is.
        Ok(_) => queue.status(message_id).await.ok().flatten(),
        Err(e) => {
            tracing::warn!(message_id = %message_id, error = %e, "could not record the user's decision");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_read_from_the_state_the_form_was_given() {
        let form = form("abc@mailmux.localhost", "Approve?", [7; 32]).unwrap();
        let state = form.request_state.clone().unwrap();
        let request = &form.input_requests.as_ref().unwrap()[INPUT_KEY];
        let shown = serde_json::to_value(request).unwrap();
        assert_eq!(shown["method"], "elicitation/create", "{shown}");
        assert_eq!(shown["params"]["message"], "Approve?", "{shown}");
        assert_eq!(
            shown["params"]["requestedSchema"]["properties"]["approve"]["type"],
            "boolean"
        );
        let responses = |v: serde_json::Value| -> InputResponses { [(INPUT_KEY.into(), v)].into() };
        let read = |v| Answered::read(Some(&state), Some(&responses(v)));
        let yes = serde_json::json!({"action": "accept", "content": {"approve": true}});
        assert_eq!(
            read(yes),
            Ok(Answered {
                message_id: "abc@mailmux.localhost".into(),
                hash: [7; 32],
                approve: Some(true),
            })
        );
        for no in [
            serde_json::json!({"action": "accept", "content": {"approve": false}}),
            serde_json::json!({"action": "accept"}),
            serde_json::json!({"action": "accept", "content": {"approve": "true"}}),
            serde_json::json!({"action": "decline"}),
            serde_json::json!({"action": "cancel"}),
        ] {
            assert_eq!(read(no.clone()).unwrap().approve, Some(false), "{no}");
        }
        assert_eq!(
            read(serde_json::json!({"approve": true}))
                .unwrap_err()
                .field,
            "inputResponses.approval"
        );
        assert_eq!(Answered::read(Some(&state), None).unwrap().approve, None);
        assert_eq!(
            Answered::read(Some("x"), None).unwrap_err().field,
            "requestState"
        );
        for bad in [
            "",
            "abc@mailmux.localhost",
            "mailmux-approval:abc@mailmux.localhost",
            "mailmux-approval::0707070707070707070707070707070707070707070707070707070707070707",
            "mailmux-approval:abc:07",
            "other:abc:0707070707070707070707070707070707070707070707070707070707070707",
        ] {
            assert!(Answered::read(Some(bad), None).is_err(), "{bad}");
        }
        assert!(Answered::read(None, Some(&responses(serde_json::json!({})))).is_err());
    }

    fn composed(body: &str) -> Composed {
        let draft = crate::compose::Draft {
            to: crate::compose::Recipients::Csv("friend@outside.net".into()),
            subject: "numbers".into(),
            body: body.into(),
            ..Default::default()
        };
        let policy = crate::compose::ComposePolicy {
            default_from: Some("agent@example.org".into()),
            ..Default::default()
        };
        crate::compose::compose(&draft, &policy).expect("composes")
    }

    #[test]
    fn a_batch_answer_names_held_messages_of_its_batch() {
        let answer = SendBatchResult {
            batch_id: Some("batch-1".into()),
            results: vec![Default::default(), Default::default()],
            ..Default::default()
        };
        let state = |held: serde_json::Value| {
            let s = serde_json::json!({"held": held, "answer": answer});
            format!("{BATCH_STATE_PREFIX}{s}")
        };
        let hash = "07".repeat(32);
        let good = state(serde_json::json!([[1, "a@x", hash]]));
        let read = BatchAnswered::read(Some(&good), None).unwrap();
        assert_eq!(read.held, [(1, "a@x".to_owned(), [7; 32])]);
        assert_eq!(read.answer, answer);
        assert_eq!(read.approve, None);
        for bad in [
            state(serde_json::json!([])),
            state(serde_json::json!([[2, "a@x", hash]])),
            state(serde_json::json!([[0, "", hash]])),
            state(serde_json::json!([[0, "a@x", "07"]])),
            format!("{BATCH_STATE_PREFIX}{{}}"),
            good.replacen(BATCH_STATE_PREFIX, "mailmux-approval:", 1),
        ] {
            assert!(BatchAnswered::read(Some(&bad), None).is_err(), "{bad}");
        }
        // Nor is a batch's state one message's, or the other way round.
        assert!(Answered::read(Some(&good), None).is_err());
    }

    #[test]
    fn the_agents_text_is_quoted_so_it_cannot_pass_for_the_prompt() {
        let forged = "To: boss@example.org\n--- Email 2 of 2 ---\nfine\rTo: x@example.org\n\n";
        let p = prompt(&composed(forged), None);
        let lines: Vec<&str> = p.lines().collect();
        assert_eq!(
            lines.iter().filter(|l| l.starts_with("To: ")).count(),
            1,
            "{p}"
        );
        assert!(lines.contains(&"To: friend@outside.net"), "{p}");
        assert!(lines.contains(&"> To: boss@example.org"), "{p}");
        assert!(lines.contains(&"> --- Email 2 of 2 ---"), "{p}");
        assert!(!lines.contains(&"--- Email 2 of 2 ---"), "{p}");
        // A lone carriage return is a line break by the time it is composed.
        assert!(lines.contains(&"> To: x@example.org"), "{p}");
        assert!(!p.contains('\r'), "{p:?}");
        // After the header line, every line the agent wrote is quoted.
        let at = lines
            .iter()
            .position(|l| *l == "The text, as the agent wrote it:")
            .expect("the text's header");
        assert!(lines[at + 1..].iter().all(|l| l.starts_with("> ")), "{p}");
        // In a batch form too.
        let form = batch_prompt([p.as_str(), p.as_str()].into_iter(), 2).unwrap();
        assert_eq!(
            form.lines().filter(|l| l.starts_with("--- Email")).count(),
            2
        );
        assert!(prompt(&composed(""), None).contains("> (no text)\n"));
        // A content check that held it is said first.
        let held = prompt(
            &composed("x"),
            Some("content check \"invoice\" matched subject"),
        );
        let first = held.lines().nth(2).unwrap_or_default();
        assert_eq!(
            first,
            "Held because content check \"invoice\" matched subject."
        );
    }

    #[test]
    fn the_fields_the_agent_wrote_by_name_are_shown() {
        let draft = crate::compose::Draft {
            to: crate::compose::Recipients::Csv("friend@outside.net".into()),
            body: "hi".into(),
            list_unsubscribe: Some(crate::compose::Links::One(
                "https://example.org/u?r=1".into(),
            )),
            list_unsubscribe_post: true,
            headers: [
                ("X-Data".to_owned(), "the customer list".to_owned()),
                ("X-Forged".to_owned(), "To: boss@example.org".to_owned()),
                ("X-Empty".to_owned(), " ".to_owned()),
            ]
            .into(),
            ..Default::default()
        };
        let policy = crate::compose::ComposePolicy {
            default_from: Some("agent@example.org".into()),
            ..Default::default()
        };
        let p = prompt(
            &crate::compose::compose(&draft, &policy).expect("composes"),
            None,
        );
        let lines: Vec<&str> = p.lines().collect();
        for line in [
            "Header field List-Unsubscribe: <https://example.org/u?r=1>",
            "Header field List-Unsubscribe-Post: List-Unsubscribe=One-Click",
            "Header field X-Data: the customer list",
            "Header field X-Forged: To: boss@example.org",
        ] {
            assert!(lines.contains(&line), "{line} not in {p}");
        }
        // A field's value cannot pass for a line of the prompt, and one that
        // is not sent is not shown.
        assert_eq!(lines.iter().filter(|l| l.starts_with("To: ")).count(), 1);
        assert!(!p.contains("X-Empty"), "{p}");
    }

    #[test]
    fn a_batch_form_shows_each_message_or_is_not_asked_at_all() {
        let one =
            "An agent wants to send this email. Approve it?\n\nTo: a@x.org\nSubject: s\n\nhi\n";
        let form = batch_prompt([one, one].into_iter(), 2).expect("short enough");
        assert!(form.starts_with("An agent wants to send these 2 emails in one batch."));
        assert_eq!(form.matches("To: a@x.org").count(), 2, "{form}");
        assert!(form.contains("--- Email 2 of 2 ---"), "{form}");
        assert!(!form.contains("Approve it?"), "{form}");
        // Too long to read in one form: nobody is asked.
        let long = format!("header\n\n{}", "x".repeat(1000));
        let n = BATCH_PROMPT_CHARS / 1000 + 1;
        assert_eq!(batch_prompt(std::iter::repeat_n(long.as_str(), n), n), None);
    }
}
