//! Approval of a held message by the user, through MCP elicitation (form
//! mode): one boolean field, `approve`, under a prompt that shows what
//! would be sent. Accepting with `approve: true` releases the message;
//! decline, cancel or `approve: false` rejects it. A client without
//! elicitation, or one that does not answer in time, leaves it held for an
//! operator.

use std::time::Duration;

use mailmux_actors::queue::{Decided, Decision, Queue, Record};
use rmcp::RoleServer;
use rmcp::service::{ElicitationError, Peer};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::compose::Composed;
use crate::policy::{Caller, shown};

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
/// marked), the Reply-To address, subject, size, attachments, and the first lines of the text,
/// each as [`shown`] writes it (a lookalike domain in its ASCII form, hidden
/// characters written out).
pub fn prompt(c: &Composed) -> String {
    let mut out = String::from("An agent wants to send this email. Approve it?\n\n");
    out.push_str(&format!("From: {}\n", shown::address(c.from.as_ref())));
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
        out.push_str(&format!(
            "Attachment: {} ({}, {} bytes)\n",
            shown::text(&a.filename),
            a.content_type,
            a.size
        ));
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
    out.push('\n');
    out.push_str(&shown::text(&lines));
    out
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
    if !peer
        .supported_elicitation_modes()
        .contains(&rmcp::service::ElicitationMode::Form)
    {
        tracing::info!(
            "held for approval; the client declared no form elicitation, so it waits for an operator"
        );
        return None;
    }
    tracing::info!("held for approval; asking the client's user");
    let timeout: Duration = caller.policy.elicitation_timeout;
    let answer = peer
        .elicit_with_timeout::<ApprovalForm>(prompt.to_owned(), Some(timeout))
        .await;
    let approve = match answer {
        Ok(Some(form)) => form.approve,
        Err(ElicitationError::UserDeclined | ElicitationError::UserCancelled) => false,
        Ok(None) | Err(ElicitationError::NoContent) => false,
        Err(e) => {
            tracing::info!(error = %e, "no answer to the approval form; the message stays held");
            return None;
        }
    };
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
            tracing::info!("the user approved the held message");
            match wait_until {
                Some(deadline) => queue.wait_final(message_id, deadline).await.ok(),
                None => queue.status(message_id).await.ok().flatten(),
            }
        }
        Ok(Decided::Rejected) => {
            tracing::info!("the user rejected the held message");
            queue.status(message_id).await.ok().flatten()
        }
        // An operator decided first, or it expired: report it as it is.
        Ok(_) => queue.status(message_id).await.ok().flatten(),
        Err(e) => {
            tracing::warn!(error = %e, "could not record the user's decision");
            None
        }
    }
}
