//! The six MCP tools, each a thin mapping from typed arguments to one
//! dispatcher call and back to a structured result.
//!
//! A failure the agent can act on is a result with `isError: true` and a
//! structured `error`; JSON-RPC errors are left to rmcp for protocol faults.

use std::sync::Arc;

use mailmux_actors::{ControlError, Mail};
use rmcp::handler::server::tool::schema_for_output;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{ErrorData, ServerHandler, tool, tool_handler, tool_router};
use tracing::{Instrument, field::Empty};

use super::MailmuxServer;
use super::types::*;
use crate::compose::compose;
use crate::config;

/// Serialises a result; `isError` follows the presence of its `error`.
fn respond<T: ToolOutput>(out: T, text: String) -> Result<CallToolResult, ErrorData> {
    let is_error = out.error().is_some();
    let value =
        serde_json::to_value(&out).map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
    let mut result = if is_error {
        CallToolResult::structured_error(value)
    } else {
        CallToolResult::structured(value)
    };
    // The sentence comes first: clients that show one text block show it.
    result.content.insert(0, ContentBlock::text(text));
    Ok(result)
}

fn fail<T: ToolOutput>(e: ToolError) -> Result<CallToolResult, ErrorData> {
    let text = e.message.clone();
    tracing::info!(code = %e.code, "tool call failed: {text}");
    respond(T::from_error(e), text)
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

/// The span of one tool call; `message_id` and `relay` are recorded when known.
pub fn tool_span(tool: &'static str) -> tracing::Span {
    tracing::info_span!("tool", tool, message_id = Empty, relay = Empty)
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
                       partial, unknown (may have been delivered: do not resend blindly) or failed.",
        output_schema = schema_for_output::<SendResult>()
    )]
    pub async fn send_email(
        &self,
        params: Parameters<Checked<SendEmailParams>>,
    ) -> Result<CallToolResult, ErrorData> {
        let span = tool_span("send_email");
        let (out, text) = self.send_email_checked(params.0.0).instrument(span).await;
        respond(out, text)
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
    ) -> Result<CallToolResult, ErrorData> {
        let span = tool_span("test_smtp_connection");
        async move {
            if self.is_closing() {
                return fail::<ProbeResult>(ToolError::unavailable());
            }
            let name = match params.0.0 {
                Ok(p) => p.server_name,
                Err(e) => return fail::<ProbeResult>(ToolError::new("invalid_input", e)),
            };
            if let Some(n) = &name {
                tracing::Span::current().record("relay", n.as_str());
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
                       selection strategy, the pinned relay, uptime and version. Holds no secret.",
        output_schema = schema_for_output::<StatusResult>()
    )]
    pub async fn get_smtp_status(&self) -> Result<CallToolResult, ErrorData> {
        let span = tool_span("get_smtp_status");
        async move {
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
    ) -> Result<CallToolResult, ErrorData> {
        let span = tool_span("switch_smtp_server");
        async move {
            if self.is_closing() {
                return fail::<SwitchResult>(ToolError::unavailable());
            }
            let name = match params.0.0 {
                Ok(p) => p.server_name,
                Err(e) => return fail::<SwitchResult>(ToolError::new("invalid_input", e)),
            };
            let dispatcher = self.dispatcher();
            let (selection, verb) = match name.as_deref() {
                None => (dispatcher.selection().await, "current selection"),
                Some("auto") => (dispatcher.pin(None).await, "unpinned"),
                Some(n) => {
                    tracing::Span::current().record("relay", n);
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
    pub async fn reload_smtp_configuration(&self) -> Result<CallToolResult, ErrorData> {
        let span = tool_span("reload_smtp_configuration");
        self.reload_inner().instrument(span).await
    }

    /// Drop every connection, reset health and probe each relay.
    #[tool(
        name = "reconnect_smtp_servers",
        description = "Drop every SMTP connection, reset each relay's health and backoff, probe \
                       each relay, and report its new state.",
        output_schema = schema_for_output::<ReconnectResult>()
    )]
    pub async fn reconnect_smtp_servers(&self) -> Result<CallToolResult, ErrorData> {
        let span = tool_span("reconnect_smtp_servers");
        async move {
            if self.is_closing() {
                return fail::<ReconnectResult>(ToolError::unavailable());
            }
            match self.dispatcher().reconnect().await {
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
}

impl MailmuxServer {
    async fn send_email_checked(
        &self,
        params: Result<SendEmailParams, String>,
    ) -> (SendResult, String) {
        match params {
            Ok(p) => self.send_email_params(p).await,
            Err(e) => failed(ToolError {
                field: Some("arguments".into()),
                rule: Some("schema".into()),
                ..ToolError::new("invalid_input", format!("arguments: {e}"))
            }),
        }
    }

    /// The whole `send_email` flow, shared by the tool and `mailmux send`:
    /// compose, then send (or only render, for a dry run). Returns the result
    /// and a sentence for the caller.
    pub async fn send_email_params(&self, mut params: SendEmailParams) -> (SendResult, String) {
        let _slot = self.call_gate().enter();
        if self.is_closing() {
            return failed(ToolError::unavailable());
        }
        let config = self.config();
        if let Some(relay) = &params.relay {
            let names = self.relay_names();
            if !names.contains(relay) {
                return failed(ToolError::unknown_relay(relay, names));
            }
        }
        // A large draft is composed on the blocking pool, so that calls
        // behind it are not held up (over stdio the daemon has one worker).
        let composed = if params.draft.is_heavy() {
            let draft = std::mem::take(&mut params.draft);
            let config = Arc::clone(&config);
            let job = tokio::task::spawn_blocking(move || compose(&draft, &config.daemon.compose));
            match job.await {
                Ok(result) => result,
                Err(e) => {
                    return failed(ToolError::new(
                        "internal",
                        format!("composing the message failed: {e}"),
                    ));
                }
            }
        } else {
            compose(&params.draft, &config.daemon.compose)
        };
        let composed = match composed {
            Ok(c) => c,
            Err(e) => return failed(ToolError::invalid_input(&e)),
        };
        let span = tracing::Span::current();
        span.record("message_id", composed.message_id.as_str());
        let envelope = Envelope {
            from: composed.from.to_string(),
            recipients: composed.recipients.iter().map(|a| a.to_string()).collect(),
        };

        if params.dry_run.unwrap_or(false) {
            let relay = match &params.relay {
                Some(r) => Some(r.clone()),
                None => self
                    .dispatcher()
                    .selection()
                    .await
                    .ok()
                    .and_then(|s| s.next),
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
                ..Default::default()
            };
            return (out, text);
        }

        let mail = Mail {
            message_id: composed.message_id.clone(),
            from: Some(composed.from),
            to: composed.recipients,
            bytes: Arc::from(composed.bytes),
            deadline: tokio::time::Instant::now() + config.daemon.send_deadline,
            prefer: params.relay,
        };
        let report = self.dispatcher().send(mail).await;
        if let Some(relay) = &report.relay {
            span.record("relay", relay.as_str());
        }
        let out = SendResult::from_report(&report, envelope);
        let text = match out.status {
            SendStatus::Sent => format!(
                "sent {} via {} to {}",
                report.message_id,
                report.relay.as_deref().unwrap_or("?"),
                report.accepted.join(", ")
            ),
            status => format!(
                "{}: {}",
                status.as_str(),
                report
                    .message
                    .clone()
                    .unwrap_or_else(|| "see attempts".into())
            ),
        };
        tracing::info!(
            status = out.status.as_str(),
            accepted = out.accepted.len(),
            rejected = out.rejected.len(),
            attempts = out.attempts.len(),
            "send finished"
        );
        (out, text)
    }

    async fn reload_inner(&self) -> Result<CallToolResult, ErrorData> {
        if self.is_closing() {
            return fail::<ReloadResult>(ToolError::unavailable());
        }
        let _one_at_a_time = self.state.reload.lock().await;
        let sources = self.state.sources.clone();
        // Loading reads files (the config, password files): keep it off the
        // async workers.
        let loaded = tokio::task::spawn_blocking(move || config::load(&sources)).await;
        let new = match loaded {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return fail::<ReloadResult>(ToolError::new(
                    "invalid_config",
                    format!("{e}; the running configuration is unchanged"),
                ));
            }
            Err(e) => {
                return fail::<ReloadResult>(ToolError::new(
                    "invalid_config",
                    format!(
                        "loading the configuration failed ({e}); the running configuration is unchanged"
                    ),
                ));
            }
        };
        let diff = match self.dispatcher().reload(new.dispatch.clone()).await {
            Ok(d) => d,
            Err(e) => return fail::<ReloadResult>(control_error(e)),
        };
        let old = self.config();
        let daemon_changed = old.daemon != new.daemon;
        let http_changed = old.daemon.http != new.daemon.http;
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
            config_sources: new.sources.clone(),
            error: None,
        };
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
        if http_changed {
            text.push_str("; HTTP transport settings take effect at the next restart");
        }
        tracing::info!("{text}");
        respond(out, text)
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for MailmuxServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("mailmux", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "mailmux sends email through SMTP relays with failover. Use send_email (try \
                 dry_run first if unsure), get_smtp_status to see the relays, and \
                 test_smtp_connection to probe them. A failed send has isError and a stable \
                 error code; status \"unknown\" means it may have been delivered.",
            )
    }
}
