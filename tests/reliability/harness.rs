//! The daemon under test and the MCP calls that drive it: in process over an
//! in-memory duplex (with the dispatcher kept for fault hooks), or as the
//! built binary over stdio pipes; and bursts of bounded, concurrent calls,
//! each wrapped in a timeout so that a hang fails the test instead of it.

// Each test binary that includes this module uses a different subset of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rmcp::model::CallToolRequestParams;
use rmcp::service::{Peer, RunningService};
use rmcp::{RoleClient, ServiceExt};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

/// The answer a call got, or why it got none.
#[derive(Debug, Clone)]
pub enum Answer {
    /// A tool result: `isError`, the structured content and the first text.
    Result {
        is_error: bool,
        value: Value,
        text: String,
    },
    /// A JSON-RPC or transport error.
    Protocol(String),
    /// No answer within the call's limit: a hang.
    TimedOut,
}

/// One tool call and what came of it.
#[derive(Debug, Clone)]
pub struct Call {
    /// What the call was, for assertion messages (e.g. `burst 17`).
    pub label: String,
    pub answer: Answer,
    pub elapsed: Duration,
}

impl Call {
    /// The structured result, if the call got one.
    pub fn value(&self) -> Option<&Value> {
        match &self.answer {
            Answer::Result { value, .. } => Some(value),
            _ => None,
        }
    }

    pub fn is_error(&self) -> bool {
        matches!(self.answer, Answer::Result { is_error: true, .. })
    }

    /// `send_email`'s status: sent, partial, unknown, failed or dry_run.
    pub fn status(&self) -> Option<&str> {
        self.value()?.get("status")?.as_str()
    }

    /// The Message-ID of a composed message, without angle brackets.
    pub fn message_id(&self) -> Option<&str> {
        self.value()?.get("message_id")?.as_str()
    }

    /// `error.code` of a failed call.
    pub fn error_code(&self) -> Option<&str> {
        self.value()?.get("error")?.get("code")?.as_str()
    }

    /// `error.message` of a failed call.
    pub fn error_message(&self) -> Option<&str> {
        self.value()?.get("error")?.get("message")?.as_str()
    }

    /// The relay that took (or last tried) the message.
    pub fn relay(&self) -> Option<&str> {
        self.value()?.get("relay")?.as_str()
    }
}

/// Calls `tool` and waits at most `limit` for the answer.
pub async fn call(
    peer: &Peer<RoleClient>,
    label: impl Into<String>,
    tool: &str,
    args: Value,
    limit: Duration,
) -> Call {
    let mut params = CallToolRequestParams::new(tool.to_string());
    if let Value::Object(map) = args {
        params = params.with_arguments(map);
    }
    let started = Instant::now();
    let answer = match tokio::time::timeout(limit, peer.call_tool(params)).await {
        Err(_) => Answer::TimedOut,
        Ok(Err(e)) => Answer::Protocol(e.to_string()),
        Ok(Ok(result)) => Answer::Result {
            is_error: result.is_error.unwrap_or(false),
            text: result
                .content
                .first()
                .and_then(|c| c.as_text())
                .map(|t| t.text.clone())
                .unwrap_or_default(),
            value: result.structured_content.unwrap_or(Value::Null),
        },
    };
    Call {
        label: label.into(),
        answer,
        elapsed: started.elapsed(),
    }
}

/// A running burst of calls; `done` counts the answered ones.
pub struct Burst {
    pub done: Arc<AtomicUsize>,
    handle: JoinHandle<Vec<Call>>,
}

impl Burst {
    /// Waits for every call of the burst. Each call is bounded by its own
    /// limit, so this returns.
    pub async fn join(self) -> Vec<Call> {
        self.handle.await.expect("the burst task panicked")
    }
}

/// Starts `n` `send_email` calls, at most `concurrency` at a time, each
/// limited to `limit`. `args(i)` gives the arguments of call `i`.
pub fn burst(
    peer: &Peer<RoleClient>,
    name: &str,
    n: usize,
    concurrency: usize,
    limit: Duration,
    args: impl Fn(usize) -> Value + Send + 'static,
) -> Burst {
    let peer = peer.clone();
    let name = name.to_string();
    let done = Arc::new(AtomicUsize::new(0));
    let counter = done.clone();
    let handle = tokio::spawn(async move {
        let gate = Arc::new(Semaphore::new(concurrency));
        let mut set = JoinSet::new();
        for i in 0..n {
            let permit = gate.clone().acquire_owned().await.expect("semaphore open");
            let peer = peer.clone();
            let a = args(i);
            let label = format!("{name} {i}");
            let counter = counter.clone();
            set.spawn(async move {
                let c = call(&peer, label, "send_email", a, limit).await;
                counter.fetch_add(1, Ordering::SeqCst);
                drop(permit);
                c
            });
        }
        let mut calls = Vec::with_capacity(n);
        while let Some(c) = set.join_next().await {
            calls.push(c.expect("a call task panicked"));
        }
        calls
    });
    Burst { done, handle }
}

/// Arguments of a small, valid message.
pub fn small(tag: &str, i: usize) -> Value {
    serde_json::json!({
        "to": "rcpt@example.org",
        "subject": format!("{tag} {i}"),
        "body": format!("message {i} of the {tag} burst\n"),
    })
}

pub use crate::common::InProcess;

impl InProcess {
    /// `get_smtp_status`' structured result.
    pub async fn status(&self) -> Value {
        status(self.peer()).await
    }
}

/// `get_smtp_status`' structured result; panics if it does not answer.
pub async fn status(peer: &Peer<RoleClient>) -> Value {
    let c = call(
        peer,
        "status",
        "get_smtp_status",
        serde_json::json!({}),
        Duration::from_secs(5),
    )
    .await;
    match c.answer {
        Answer::Result {
            is_error: false,
            value,
            ..
        } => value,
        other => panic!("get_smtp_status failed: {other:?}"),
    }
}

/// Every stored message, newest first, as `list_messages` pages it with
/// `limit` a page; panics if a page does not answer.
pub async fn list_all(peer: &Peer<RoleClient>, limit: u32) -> Vec<Value> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut args = serde_json::json!({ "limit": limit });
        if let Some(c) = &cursor {
            args["cursor"] = serde_json::json!(c);
        }
        let page = call(peer, "list", "list_messages", args, Duration::from_secs(30)).await;
        let page = page.value().cloned().unwrap_or(Value::Null);
        let messages = page["messages"].as_array().expect("a page of messages");
        all.extend(messages.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return all,
        }
    }
}

/// One relay of a status result, by name.
pub fn relay_status<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["relays"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == name))
        .unwrap_or_else(|| panic!("no relay {name} in {status}"))
}

/// The built `mailmux` binary serving MCP on stdio pipes, with a
/// configuration file and a clean environment; its log goes to a file.
pub struct ChildDaemon {
    pub client: RunningService<RoleClient, ()>,
    pub child: tokio::process::Child,
    pub pid: u32,
    pub config: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ChildDaemon {
    pub async fn start(config_toml: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("mailmux.toml");
        std::fs::write(&config, config_toml).expect("write config");
        let log = dir.path().join("mailmux.log");
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailmux"))
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("mailmux starts");
        let pid = child.id().expect("pid");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take().expect("stdin");
        let client = tokio::time::timeout(Duration::from_secs(20), ().serve((stdout, stdin)))
            .await
            .expect("the daemon initializes within 20 s")
            .expect("client initializes");
        ChildDaemon {
            client,
            child,
            pid,
            config,
            log,
            _dir: dir,
        }
    }

    pub fn peer(&self) -> &Peer<RoleClient> {
        self.client.peer()
    }

    /// What the daemon logged so far (stderr).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A field of /proc/PID/status in kB (`VmRSS`, `VmHWM`), while it runs.
    pub fn proc_kb(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        status.lines().find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
    }

    /// Sends a signal to the daemon (and to nothing else).
    pub fn signal(&self, name: &str) {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid.to_string())
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{name} {} failed", self.pid);
    }
}
