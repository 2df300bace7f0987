//! `send_email` as an MCP task (the `io.modelcontextprotocol/tasks`
//! extension, SEP-2663).
//!
//! For a client that declares the extension, a `send_email` that would wait
//! for its outcome is stored and answered at once with a task instead. The
//! task is the message: its id is the Message-ID, `tasks/get` reads the
//! message from the queue (so a task outlives the connection and a restart
//! of the daemon, and any daemon on a shared store answers it), and
//! `tasks/cancel` cancels the message while it still waits. Nothing about
//! tasks is kept in memory.

use std::time::Duration;

use mailmux_actors::queue::{Cancel, QueueSettings, Record, State};
use rmcp::ErrorData;
use rmcp::RoleServer;
use rmcp::model::{
    CancelTaskParams, CreateTaskResult, DetailedTask, GetTaskParams, GetTaskResult, JsonObject,
    Task, TaskPayload, TaskStatus,
};
use rmcp::service::RequestContext;

use super::MailmuxServer;
use super::tools::{caller_of, describe, respond};
use super::types::{SendResult, rfc3339};

/// The pause between two `tasks/get` of one task that clients are asked
/// to keep.
const POLL_INTERVAL_MS: u64 = 500;

/// Whether this request's client declared the tasks extension.
pub fn wanted(ctx: &RequestContext<RoleServer>) -> bool {
    ctx.client_capabilities()
        .is_some_and(|caps| caps.supports_tasks())
}

/// The task of a stored message, and the `send_email` result and sentence
/// it stands for.
fn task_of(r: &Record, settings: &QueueSettings) -> (Task, SendResult, String) {
    let status = match r.state {
        State::Cancelled => TaskStatus::Cancelled,
        s if s.is_final() => TaskStatus::Completed,
        _ => TaskStatus::Working,
    };
    let out = SendResult::from_record(r);
    let text = describe(&out, &r.message_id, false);
    // Kept until it expires (`max_age` after it is due) and then `retain`.
    let waits = Duration::from_millis(r.due_at.saturating_sub(r.queued_at).max(0) as u64);
    let ttl = waits + settings.max_age + settings.retain;
    let task = Task::new(
        r.message_id.clone(),
        status,
        rfc3339(r.queued_at),
        rfc3339(r.updated_at),
    )
    .with_status_message(text.clone())
    .with_ttl_ms(ttl.as_millis() as u64)
    .with_poll_interval_ms(POLL_INTERVAL_MS);
    (task, out, text)
}

/// The answer to a `send_email` run as a task: the stored message's task.
pub fn created(r: &Record, settings: &QueueSettings) -> CreateTaskResult {
    CreateTaskResult::new(task_of(r, settings).0)
}

/// `tasks/get`: the message's task, with the `send_email` result once the
/// message is final.
pub async fn get(
    server: &MailmuxServer,
    params: GetTaskParams,
    ctx: RequestContext<RoleServer>,
) -> Result<GetTaskResult, ErrorData> {
    let r = owned(server, &params.task_id, &ctx).await?;
    let (task, out, text) = task_of(&r, server.queue().settings());
    let payload = match task.status {
        TaskStatus::Completed => {
            let result = match serde_json::to_value(respond(out, text)?) {
                Ok(serde_json::Value::Object(o)) => o,
                Ok(_) => JsonObject::new(),
                Err(e) => return Err(ErrorData::internal_error(e.to_string(), None)),
            };
            TaskPayload::Completed { result }
        }
        TaskStatus::Cancelled => TaskPayload::Cancelled,
        _ => TaskPayload::Working,
    };
    Ok(GetTaskResult::new(DetailedTask::new(task, payload)))
}

/// `tasks/cancel`: cancels the message if it still waits (`scheduled` or
/// `queued`). Cancellation is cooperative: a message a relay holds, or a
/// final one, goes on as it is, and the next `tasks/get` says so.
pub async fn cancel(
    server: &MailmuxServer,
    params: CancelTaskParams,
    ctx: RequestContext<RoleServer>,
) -> Result<(), ErrorData> {
    let r = owned(server, &params.task_id, &ctx).await?;
    match server.queue().cancel(&r.message_id).await {
        Ok(Cancel::Cancelled) => {
            tracing::info!(message_id = %r.message_id, "task cancelled");
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) => Err(ErrorData::internal_error(
            super::tools::queue_error(&e).message,
            None,
        )),
    }
}

/// The message behind a task id, if the caller may see it.
async fn owned(
    server: &MailmuxServer,
    task_id: &str,
    ctx: &RequestContext<RoleServer>,
) -> Result<Record, ErrorData> {
    let caller = caller_of(server, ctx)
        .ok_or_else(|| ErrorData::invalid_request("no caller for this request", None))?;
    server
        .owned_by(&caller, task_id)
        .await
        .map_err(|e| ErrorData::internal_error(super::tools::queue_error(&e).message, None))?
        .ok_or_else(|| {
            ErrorData::invalid_params(format!("no task {}", super::types::quoted(task_id)), None)
        })
}
