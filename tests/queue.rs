//! The durable queue against the real binary: SIGKILL at each point of a
//! delivery and a restart over the same store, a killed burst, idempotency
//! across calls and restarts, deferred retries, expiry, cancel, `send_at`,
//! store faults (a full disk, a read-only store, an fsync that fails), and
//! five kills in a row under a relay that fails at random. Every test
//! reconciles what each call was told against what the fault-injecting SMTP
//! server received.

#[path = "reliability/chaos.rs"]
mod chaos;
mod common;
#[path = "reliability/harness.rs"]
mod harness;
#[path = "../actors/tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use harness::{Call, burst, call};
use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResponse, CancelTaskParams, ClientCapabilities,
    ClientConfig, ClientRequest, GetTaskParams, GetTaskResult, Implementation,
    SubscribeRequestParams, TaskPayload, TaskStatus,
};
use rmcp::service::{Peer, PeerRequestOptions, RunningService};
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::{Value, json};
use support::fault_smtp::{Action, FaultSmtp, Options, Phase, Received, Script, Share, copies};

const LIMIT: Duration = Duration::from_secs(20);

/// The built binary over stdio, on a configuration and a store in `dir`,
/// which outlives the process so that a restart finds the same store. `C`
/// is the MCP client (what it declares at `initialize`).
struct Daemon<C: ClientHandler = ()> {
    client: Option<RunningService<RoleClient, C>>,
    child: tokio::process::Child,
    pid: u32,
    /// The daemon's stderr, outside `dir`: a test may fill `dir`'s disk.
    log: tempfile::NamedTempFile,
}

fn config_toml(dir: &Path, port: u16, extra_queue: &str) -> String {
    format!(
        r#"
send_deadline = "8s"
shutdown_grace = "2s"

[queue]
path = "{db}"
retry_base = "300ms"
retry_max = "1s"
{extra_queue}

[[relays]]
name = "sink"
host = "127.0.0.1"
port = {port}
tls = "none"
from_email = "sender@example.org"
timeout = "3s"
backoff_base = "50ms"
backoff_max = "200ms"
probe_interval = "200ms"
"#,
        db = dir.join("queue.db").display()
    )
}

/// `cfg` with a deferred message's next retry an hour away.
fn hourly_retries(cfg: String) -> String {
    cfg.replace("retry_base = \"300ms\"", "retry_base = \"1h\"")
        .replace("retry_max = \"1s\"", "retry_max = \"1h\"")
}

impl Daemon {
    async fn start(dir: &Path, config: &str) -> Daemon {
        Daemon::start_as(dir, config, ()).await
    }
}

impl<C: ClientHandler> Daemon<C> {
    async fn start_as(dir: &Path, config: &str, client: C) -> Daemon<C> {
        Daemon::start_with(dir, config, client, &[]).await
    }

    /// [`Daemon::start_as`], with `env` added to the daemon's environment.
    async fn start_with(dir: &Path, config: &str, client: C, env: &[(&str, &Path)]) -> Daemon<C> {
        let path = dir.join("mailmux.toml");
        std::fs::write(&path, config).unwrap();
        let log = tempfile::Builder::new()
            .prefix("mailmux-test-")
            .suffix(".log")
            .tempfile()
            .unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailmux"))
            .arg("--config")
            .arg(&path)
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log.reopen().unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("mailmux starts");
        let pid = child.id().unwrap();
        let stdout = child.stdout.take().unwrap();
        let stdin = child.stdin.take().unwrap();
        let client = tokio::time::timeout(Duration::from_secs(20), client.serve((stdout, stdin)))
            .await
            .expect("the daemon initializes")
            .expect("client initializes");
        Daemon {
            client: Some(client),
            child,
            pid,
            log,
        }
    }

    fn peer(&self) -> &Peer<RoleClient> {
        self.client.as_ref().unwrap().peer()
    }

    /// SIGKILL, and wait for the process to be gone.
    async fn kill9(mut self) {
        let ok = std::process::Command::new("kill")
            .args(["-KILL", &self.pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -KILL {}", self.pid);
        let _ = self.child.wait().await;
        drop(self.client.take());
    }

    /// SIGTERM, and wait for the drained daemon to exit cleanly.
    async fn term(mut self) {
        common::signal(self.pid, "TERM");
        let exit = tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .expect("the daemon exits within its grace")
            .expect("wait");
        assert!(exit.success(), "exit {exit:?}\n{}", self.logs());
        drop(self.client.take());
    }

    /// Closes stdin: a graceful stop.
    async fn stop(mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.cancel().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

/// A fault-injecting SMTP server with `script`, a folder, the configuration
/// (with `extra` in its `[queue]` table) and the daemon started on them.
async fn setup(script: Script, extra: &str) -> (FaultSmtp, tempfile::TempDir, String, Daemon) {
    let smtp = FaultSmtp::start(script).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_toml(dir.path(), smtp.port(), extra);
    let d = Daemon::start(dir.path(), &cfg).await;
    (smtp, dir, cfg, d)
}

/// The operator's token in the tests that approve from the shell.
const OPS_TOKEN: &str = "queue-ops-token-5c2e";

fn msg(subject: &str, extra: Value) -> Value {
    let mut v = json!({
        "to": "rcpt@example.org",
        "subject": subject,
        "body": format!("body of {subject}\n"),
    });
    if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
        m.extend(e);
    }
    v
}

async fn send(peer: &Peer<RoleClient>, args: Value) -> Call {
    call(peer, "send", "send_email", args, LIMIT).await
}

async fn status_of(peer: &Peer<RoleClient>, id: &str) -> Value {
    let c = call(
        peer,
        "status",
        "get_message_status",
        json!({ "message_id": id }),
        LIMIT,
    )
    .await;
    c.value().cloned().unwrap_or(Value::Null)
}

/// Calls `cancel_message` on the message `id`.
async fn cancel(peer: &Peer<RoleClient>, id: &str) -> Call {
    call(
        peer,
        "cancel",
        "cancel_message",
        json!({ "message_id": id }),
        LIMIT,
    )
    .await
}

/// Seconds from a status's `due_at` to its `expires_at`, if it has one.
fn expires_in(s: &Value) -> Option<i64> {
    let at = |k: &str| s[k].as_str()?.parse::<jiff::Timestamp>().ok();
    Some(at("expires_at")?.as_second() - at("due_at")?.as_second())
}

/// The status `mailmux queue show ID` prints, with the daemon's
/// configuration in `dir`.
fn shown(dir: &Path, id: &str) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailmux"))
        .arg("--config")
        .arg(dir.join("mailmux.toml"))
        .args(["queue", "show", id])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::Deserializer::from_str(&text)
        .into_iter::<Value>()
        .next()
        .expect("a status first")
        .unwrap()
}

/// Reloads the configuration (the file in the daemon's folder).
async fn reload(peer: &Peer<RoleClient>) {
    let r = call(
        peer,
        "reload",
        "reload_smtp_configuration",
        json!({}),
        LIMIT,
    )
    .await;
    assert_eq!(r.value().unwrap()["reloaded"], true, "{r:?}");
}

/// Waits until the message is in a final state; returns its status.
async fn settled(peer: &Peer<RoleClient>, id: &str, limit: Duration) -> Value {
    let start = std::time::Instant::now();
    loop {
        let s = status_of(peer, id).await;
        let st = s["status"].as_str().unwrap_or("");
        if !matches!(st, "queued" | "scheduled" | "sending" | "") || start.elapsed() > limit {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The states a message's status lists in its history, oldest first.
fn history_of(s: &Value) -> Vec<&str> {
    s["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap())
        .collect()
}

fn subject_of(r: &Received) -> Option<String> {
    let text = String::from_utf8_lossy(&r.data);
    text.lines()
        .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
}

/// Kill after `queued` was answered, before any delivery: the relay hangs at
/// MAIL. After the restart (relay healthy), each message goes out once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_after_queued_before_delivery_sends_each_message_once() {
    let (smtp, dir, cfg, d) = setup(Script::ok().on(Phase::Mail, Action::Hang), "").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let c = send(d.peer(), msg(&format!("early {i}"), json!({"wait": false}))).await;
        assert_eq!(c.status(), Some("queued"), "{c:?}");
        ids.push(c.message_id().unwrap().to_string());
    }
    // The relay holds every attempt at MAIL: nothing is delivered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(smtp.received().is_empty());
    d.kill9().await;

    smtp.set_script(Script::ok());
    let d = Daemon::start(dir.path(), &cfg).await;
    for id in &ids {
        let s = settled(d.peer(), id, LIMIT).await;
        assert_eq!(s["status"], "sent", "{s}");
    }
    let seen = copies(&smtp.received());
    for id in &ids {
        assert_eq!(seen.get(id), Some(&1), "{id} at the sink: {seen:?}");
    }
    assert_eq!(
        seen.len(),
        ids.len(),
        "no message nobody asked for: {seen:?}"
    );
    d.stop().await;
}

/// With the server answering again, a restarted daemon sends message `id`,
/// which a stop left before its final ".", once.
async fn sent_once_after_a_restart(smtp: &FaultSmtp, dir: &Path, cfg: &str, id: &str) {
    smtp.set_script(Script::ok());
    let d = Daemon::start(dir, cfg).await;
    let s = settled(d.peer(), id, LIMIT).await;
    assert_eq!(s["status"], "sent", "{s}");
    assert_eq!(copies(&smtp.received()).get(id), Some(&1));
    assert_eq!(smtp.received().len(), 1);
    d.stop().await;
}

/// Kill while DATA is being sent (the server never answers DATA): the final
/// "." was never written, so the restart sends the message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_data_resends_once() {
    let (smtp, dir, cfg, d) = setup(Script::ok().on(Phase::Data, Action::Hang), "").await;
    let c = send(d.peer(), msg("mid data", json!({"wait": false}))).await;
    assert_eq!(c.status(), Some("queued"), "{c:?}");
    let id = c.message_id().unwrap().to_string();
    assert!(
        support::wait_until(|| smtp.commands(Phase::Data) >= 1, LIMIT).await,
        "DATA was never sent"
    );
    let s = status_of(d.peer(), &id).await;
    assert_eq!(s["status"], "sending", "a relay holds it: {s}");
    d.kill9().await;

    sent_once_after_a_restart(&smtp, dir.path(), &cfg, &id).await;
}

/// SIGTERM while a delivery is in flight waits for it, within
/// `shutdown_grace`; a second SIGTERM stops the daemon at once, as a crash
/// would. The final "." was never written, so the restart sends the message
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_stops_at_once_and_the_restart_sends_once() {
    let smtp = FaultSmtp::start(Script::ok().on(Phase::Data, Action::Hang)).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_toml(dir.path(), smtp.port(), "")
        .replace("shutdown_grace = \"2s\"", "shutdown_grace = \"60s\"")
        .replace("timeout = \"3s\"", "timeout = \"60s\"");
    let mut d = Daemon::start(dir.path(), &cfg).await;
    let c = send(d.peer(), msg("stopped twice", json!({"wait": false}))).await;
    assert_eq!(c.status(), Some("queued"), "{c:?}");
    let id = c.message_id().unwrap().to_string();
    assert!(
        support::wait_until(|| smtp.commands(Phase::Data) >= 1, LIMIT).await,
        "DATA was never sent"
    );

    common::signal(d.pid, "TERM");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the first SIGTERM waits for the delivery in flight\n{}",
        d.logs()
    );
    common::signal(d.pid, "TERM");
    let exit = tokio::time::timeout(Duration::from_secs(10), d.child.wait())
        .await
        .expect("the second SIGTERM stops the daemon at once")
        .unwrap();
    assert_eq!(exit.code(), Some(143), "{}", d.logs());
    assert!(
        d.logs().contains("a second signal: stopping now"),
        "{}",
        d.logs()
    );
    drop(d.client.take());
    assert!(smtp.received().is_empty());

    sent_once_after_a_restart(&smtp, dir.path(), &cfg, &id).await;
}

/// A message of high priority that waits for the relay's one connection
/// when the daemon is killed keeps its priority in the store: after the
/// restart it is sent once, still high, before the normal message that held
/// the connection (killed during its DATA), which is sent once too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_priority_message_survives_a_sigkill_and_is_sent_once_and_first() {
    let smtp = FaultSmtp::start(Script::ok().on(Phase::Data, Action::Hang)).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_toml(dir.path(), smtp.port(), "") + "max_connections = 1\n";
    let d = Daemon::start(dir.path(), &cfg).await;
    let normal = send(d.peer(), msg("normal", json!({"wait": false}))).await;
    assert_eq!(normal.status(), Some("queued"), "{normal:?}");
    assert!(
        support::wait_until(|| smtp.commands(Phase::Data) >= 1, LIMIT).await,
        "DATA was never sent"
    );
    let high = send(
        d.peer(),
        msg("urgent", json!({"wait": false, "priority": "high"})),
    )
    .await;
    assert_eq!(high.status(), Some("queued"), "{high:?}");
    let high = high.message_id().unwrap().to_string();
    d.kill9().await;
    assert_eq!(smtp.commands(Phase::Data), 1, "one connection");

    smtp.set_script(Script::ok());
    let d = Daemon::start(dir.path(), &cfg).await;
    let s = settled(d.peer(), &high, LIMIT).await;
    assert_eq!(s["status"], "sent", "{s}");
    assert_eq!(s["priority"], "high", "{s}");
    let normal = normal.message_id().unwrap().to_string();
    assert_eq!(settled(d.peer(), &normal, LIMIT).await["status"], "sent");
    let got = smtp.received();
    assert_eq!(got.len(), 2, "each once");
    assert_eq!(copies(&got).get(&high), Some(&1));
    assert_eq!(copies(&got).get(&normal), Some(&1));
    assert_eq!(
        subject_of(&got[0]).as_deref(),
        Some("urgent"),
        "the high one first"
    );
    d.stop().await;
}

/// Kill after the final "." (the server hangs before its reply): the message
/// may have been delivered, so after the restart it is `unknown` and never
/// sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_after_the_final_dot_is_unknown_and_never_resent() {
    let (smtp, dir, cfg, d) = setup(Script::ok().on(Phase::AfterDot, Action::Hang), "").await;
    let c = send(d.peer(), msg("after dot", json!({"wait": false}))).await;
    assert_eq!(c.status(), Some("queued"), "{c:?}");
    let id = c.message_id().unwrap().to_string();
    assert!(
        support::wait_until(|| !smtp.received().is_empty(), LIMIT).await,
        "the data never arrived"
    );
    d.kill9().await;

    smtp.set_script(Script::ok());
    let d = Daemon::start(dir.path(), &cfg).await;
    let s = status_of(d.peer(), &id).await;
    assert_eq!(s["status"], "unknown", "{s}");
    assert_eq!(history_of(&s), ["queued", "sending", "unknown"], "{s}");
    // Give a wrongful resend every chance to happen.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(smtp.received().len(), 1, "never sent again");
    assert!(d.logs().contains("recovered the queue"), "{}", d.logs());
    d.stop().await;
}

/// A relay whose server takes at most `cap` recipients a transaction.
async fn setup_capped(
    cap: usize,
    script: Script,
) -> (FaultSmtp, tempfile::TempDir, String, Daemon) {
    let options = Options {
        max_recipients: Some(cap),
        ..Options::default()
    };
    setup_server(script, options, "").await
}

/// A daemon whose one relay is a fault server started with `options`,
/// with `relay` added to the relay's table of the configuration.
async fn setup_server(
    script: Script,
    options: Options,
    relay: &str,
) -> (FaultSmtp, tempfile::TempDir, String, Daemon) {
    let smtp = FaultSmtp::start_with(script, options).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_toml(dir.path(), smtp.port(), "") + relay;
    let d = Daemon::start(dir.path(), &cfg).await;
    (smtp, dir, cfg, d)
}

/// Five recipients (To, Cc and Bcc) through a server that takes two a
/// transaction: three transactions of the same message, each recipient in
/// one of them, and the Bcc in no header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_over_the_relays_cap_get_the_message_in_more_transactions() {
    let (smtp, _dir, _cfg, d) = setup_capped(2, Script::ok()).await;
    let c = send(
        d.peer(),
        msg(
            "capped",
            json!({
                "to": ["a@example.org", "b@example.org", "c@example.org"],
                "cc": ["d@example.org"],
                "bcc": ["hidden@example.org"],
            }),
        ),
    )
    .await;
    assert_eq!(c.status(), Some("sent"), "{c:?}");
    let id = c.message_id().unwrap().to_string();
    let got = smtp.delivered();
    let mut everyone: Vec<String> = got.iter().flat_map(|t| t.rcpt_to.clone()).collect();
    everyone.sort();
    assert_eq!(
        everyone,
        [
            "a@example.org",
            "b@example.org",
            "c@example.org",
            "d@example.org",
            "hidden@example.org"
        ]
    );
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got.iter().all(|t| t.rcpt_to.len() <= 2));
    assert!(got.iter().all(|t| t.data == got[0].data), "one message");
    assert_eq!(copies(&got).get(&id), Some(&3));
    assert!(!String::from_utf8_lossy(&got[0].data).contains("hidden@"));
    let s = status_of(d.peer(), &id).await;
    assert_eq!(s["status"], "sent", "{s}");
    d.stop().await;
}

/// A provider that refuses recipients over its cap for good (550, not
/// 452): the relay's `recipients_per_transaction` keeps each transaction
/// under it, and every recipient gets the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relays_recipients_per_transaction_keeps_a_message_under_a_providers_cap() {
    let options = Options {
        max_recipients: Some(2),
        over_cap_reply: Some("550 Too many recipients".into()),
        ..Options::default()
    };
    let (smtp, _dir, _cfg, d) =
        setup_server(Script::ok(), options, "recipients_per_transaction = 2\n").await;
    let to = [
        "a@example.org",
        "b@example.org",
        "c@example.org",
        "d@example.org",
        "e@example.org",
    ];
    let c = send(d.peer(), msg("split by the relay", json!({ "to": to }))).await;
    assert_eq!(c.status(), Some("sent"), "{c:?}");
    let id = c.message_id().unwrap().to_string();
    let got = smtp.delivered();
    let groups: Vec<Vec<String>> = got.iter().map(|t| t.rcpt_to.clone()).collect();
    assert_eq!(
        groups,
        [&to[0..2], &to[2..4], &to[4..5]]
            .map(|g| g.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    );
    assert_eq!(copies(&got).get(&id), Some(&3));
    assert_eq!(smtp.connections(), 1);
    let s = status_of(d.peer(), &id).await;
    assert_eq!(s["status"], "sent", "{s}");
    assert_eq!(s["accepted"].as_array().map(Vec::len), Some(5), "{s}");
    d.stop().await;
}

/// A relay whose server announces SIZE: a message over it fails
/// `too_large` with no MAIL sent, stored `failed`; one under it goes with
/// its size declared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_relays_announced_size_fails_too_large_without_a_transaction() {
    let options = Options {
        size: Some(3_000),
        ..Options::default()
    };
    let (smtp, _dir, _cfg, d) = setup_server(Script::ok(), options, "").await;
    let big = "x".repeat(70).repeat(60);
    let c = send(d.peer(), msg("too big", json!({ "body": big }))).await;
    assert_eq!(c.status(), Some("failed"), "{c:?}");
    assert_eq!(c.error_code(), Some("too_large"), "{c:?}");
    assert!(
        c.error_message().is_some_and(|m| m.contains("(SIZE)")),
        "{c:?}"
    );
    assert_eq!(smtp.commands(Phase::Mail), 0);
    let id = c.message_id().unwrap().to_string();
    let s = status_of(d.peer(), &id).await;
    assert_eq!(s["status"], "failed", "{s}");

    let c = send(d.peer(), msg("small enough", json!({}))).await;
    assert_eq!(c.status(), Some("sent"), "{c:?}");
    let args = smtp.mail_args();
    assert_eq!(args.len(), 1);
    assert!(args[0].contains(" SIZE="), "{args:?}");
    d.stop().await;
}

/// The connection lost after the second transaction's "." of a message
/// split over the cap: `unknown`, with the recipients of the first
/// transaction listed as having it (or refused) for certain, and nothing
/// sent again. An operator's `queue retry --force` then sends it only to
/// the recipient it may not have reached, and the outcome is the
/// message's over both rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_split_message_lists_the_recipients_that_had_it_for_certain() {
    let (smtp, dir, _cfg, d) = setup_capped(
        2,
        Script::ok()
            .on_rcpt("x@example.org", Action::reply(550, "5.1.1 no such user"))
            .on_share(Phase::AfterDot, Action::Close, Share::EveryNth(2)),
    )
    .await;
    let to = [
        "a@example.org",
        "x@example.org",
        "b@example.org",
        "c@example.org",
    ];
    let c = send(d.peer(), msg("lost later", json!({ "to": to }))).await;
    assert_eq!(c.status(), Some("unknown"), "{c:?}");
    let id = c.message_id().unwrap().to_string();
    let certain = json!(["a@example.org", "b@example.org"]);
    assert_eq!(c.value().unwrap()["accepted"], certain, "{c:?}");
    let s = status_of(d.peer(), &id).await;
    assert_eq!(s["status"], "unknown", "{s}");
    assert_eq!(s["accepted"], certain, "{s}");
    assert_eq!(s["rejected"][0]["address"], "x@example.org", "{s}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(smtp.received().len(), 2, "never sent again");

    let (code, out, err) = common::queue_cmd(dir.path(), &["retry", &id, "--force"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        support::wait_until(|| smtp.received().len() == 3, LIMIT).await,
        "the retry never went"
    );
    let got = smtp.received();
    assert_eq!(got[2].rcpt_to, ["c@example.org"], "only the uncertain one");
    assert!(got[2].is_delivered());
    let s = loop {
        let s = status_of(d.peer(), &id).await;
        if s["status"] != "queued" && s["status"] != "sending" {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(s["status"], "partial", "{s}");
    assert_eq!(
        s["accepted"],
        json!(["a@example.org", "b@example.org", "c@example.org"]),
        "{s}"
    );
    assert_eq!(s["rejected"].as_array().map(Vec::len), Some(1), "{s}");
    assert_eq!(
        s["envelope"]["recipients"].as_array().map(Vec::len),
        Some(4),
        "{s}"
    );
    d.stop().await;
}

/// Three recipients, one answered `452 4.2.2 Mailbox full` at its first
/// `deferrals` RCPTs.
fn one_mailbox_full(deferrals: u64) -> Script {
    Script::ok().on_rcpt_share(
        "full@example.org",
        Action::reply(452, "4.2.2 Mailbox full"),
        Share::FirstN(deferrals),
    )
}

const THREE: [&str; 3] = ["a@example.org", "full@example.org", "b@example.org"];

/// `cfg` with the audit log written to `audit.jsonl` in `dir`.
fn with_audit(cfg: String, dir: &Path) -> String {
    let audit = dir.join("audit.jsonl");
    format!("{cfg}\n[audit]\npath = \"{}\"\n", audit.display())
}

/// The audit log's lines (of `with_audit`) about message `id`.
fn audit_lines(dir: &Path, id: &str) -> Vec<Value> {
    std::fs::read_to_string(dir.join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|l: &Value| l["email"]["message_id"] == id)
        .collect()
}

/// Each of `to` at the sink exactly once, in transactions that all carry
/// message `id`.
fn each_delivered_once(smtp: &FaultSmtp, id: &str, to: &[&str]) {
    let got = smtp.delivered();
    let mut everyone: Vec<String> = got.iter().flat_map(|t| t.rcpt_to.clone()).collect();
    everyone.sort();
    let mut want: Vec<String> = to.iter().map(|a| a.to_string()).collect();
    want.sort();
    assert_eq!(everyone, want, "each recipient once");
    for t in &got {
        let text = String::from_utf8_lossy(&t.data);
        assert!(text.contains(&format!("Message-ID: <{id}>")), "{text}");
    }
}

/// A 4xx to one RCPT defers that recipient alone: the others get the
/// message at once, and the deferred one at a retry, in a transaction of
/// its own with the same Message-ID. A call that waits sees the whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_a_server_defers_gets_the_message_at_a_retry_and_the_others_at_once() {
    let (smtp, _dir, _cfg, d) = setup(one_mailbox_full(2), "").await;
    let c = send(d.peer(), msg("deferred once", json!({ "to": THREE }))).await;
    assert_eq!(c.status(), Some("sent"), "{c:?}");
    let id = c.message_id().unwrap().to_string();
    let v = c.value().unwrap();
    assert_eq!(
        v["accepted"],
        json!(["a@example.org", "b@example.org", "full@example.org"]),
        "{v}"
    );
    assert!(v.get("deferred").is_none(), "{v}");
    let groups: Vec<Vec<String>> = smtp.delivered().into_iter().map(|t| t.rcpt_to).collect();
    assert_eq!(
        groups,
        [
            vec!["a@example.org".to_string(), "b@example.org".into()],
            vec!["full@example.org".to_string()]
        ]
    );
    each_delivered_once(&smtp, &id, &THREE);
    let s = status_of(d.peer(), &id).await;
    assert_eq!(s["status"], "sent", "{s}");
    assert_eq!(
        s["attempts"].as_array().map(Vec::len),
        Some(3),
        "the first round, a second deferred again, and the one that took it: {s}"
    );
    assert_eq!(
        history_of(&s).iter().filter(|h| **h == "queued").count(),
        3,
        "accepted, then deferred twice: {s}"
    );
    d.stop().await;
}

/// A message whose deferred recipient waits for its retry: the call is
/// answered `queued` with who has it and who waits. After a SIGKILL and a
/// restart, the retry goes to the deferred recipient alone, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_recipient_survives_a_sigkill_and_gets_the_message_once_after_it() {
    let (smtp, dir, cfg, d) = setup(one_mailbox_full(1), "").await;
    d.stop().await;
    let cfg = with_audit(hourly_retries(cfg), dir.path());
    let d = Daemon::start(dir.path(), &cfg).await;
    let c = send(d.peer(), msg("deferred", json!({ "to": THREE }))).await;
    assert_eq!(c.status(), Some("queued"), "{c:?}");
    let id = c.message_id().unwrap().to_string();
    let v = c.value().unwrap();
    assert_eq!(
        v["accepted"],
        json!(["a@example.org", "b@example.org"]),
        "{v}"
    );
    assert_eq!(v["deferred"], json!(["full@example.org"]), "{v}");
    assert!(v["next_attempt_at"].is_string(), "{v}");
    let message = v["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("1 of 3 recipients were deferred") && message.contains("452"),
        "{message}"
    );
    d.kill9().await;

    let d = Daemon::start(dir.path(), &cfg).await;
    let s = status_of(d.peer(), &id).await;
    assert_eq!(s["status"], "queued", "{s}");
    assert_eq!(s["deferred"], json!(["full@example.org"]), "{s}");
    assert_eq!(
        smtp.delivered().len(),
        1,
        "nothing sent again at the restart"
    );
    let (code, out, err) = common::queue_cmd(dir.path(), &["retry", &id]);
    assert_eq!(code, Some(0), "{out}{err}");
    let s = settled(d.peer(), &id, LIMIT).await;
    assert_eq!(s["status"], "sent", "{s}");
    assert_eq!(
        s["accepted"],
        json!(["a@example.org", "b@example.org", "full@example.org"]),
        "{s}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = smtp.delivered();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(
        got[1].rcpt_to,
        ["full@example.org"],
        "the deferred one alone"
    );
    each_delivered_once(&smtp, &id, &THREE);
    d.stop().await;
    // The audit log has the round that deferred, with who has the message
    // and who waits, then the outcome, which every recipient shares.
    let lines = audit_lines(dir.path(), &id);
    let actions: Vec<&str> = lines
        .iter()
        .map(|l| l["event"]["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["accepted", "deferred", "sent"], "{lines:?}");
    let deferral = &lines[1]["mailmux"];
    assert_eq!(deferral["relay"], "sink", "{lines:?}");
    assert_eq!(
        deferral["accepted"],
        json!(["a@example.org", "b@example.org"]),
        "{lines:?}"
    );
    assert_eq!(
        deferral["deferred"],
        json!(["full@example.org"]),
        "{lines:?}"
    );
    assert!(deferral.get("refused").is_none(), "{lines:?}");
    for key in ["accepted", "refused", "deferred"] {
        assert!(lines[2]["mailmux"].get(key).is_none(), "{lines:?}");
    }
}

/// Cancelling a message whose deferred recipient waits for its retry stops
/// that retry; the answer and the status say who had it already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_message_whose_recipient_waits_for_a_retry_stops_the_retry() {
    let (smtp, dir, cfg, d) = setup(one_mailbox_full(1), "").await;
    d.stop().await;
    let d = Daemon::start(dir.path(), &with_audit(hourly_retries(cfg), dir.path())).await;
    let c = send(d.peer(), msg("deferred, cancelled", json!({ "to": THREE }))).await;
    assert_eq!(c.status(), Some("queued"), "{c:?}");
    let id = c.message_id().unwrap().to_string();
    let cancel = cancel(d.peer(), &id).await;
    let v = cancel.value().unwrap();
    assert_eq!(v["cancelled"], true, "{v}");
    assert_eq!(
        v["accepted"],
        json!(["a@example.org", "b@example.org"]),
        "{v}"
    );
    let s = status_of(d.peer(), &id).await;
    assert_eq!(s["status"], "cancelled", "{s}");
    assert_eq!(
        s["accepted"],
        json!(["a@example.org", "b@example.org"]),
        "{s}"
    );
    assert!(s.get("deferred").is_none(), "{s}");
    let (code, out, err) = common::queue_cmd(dir.path(), &["retry", &id]);
    assert_ne!(
        code,
        Some(0),
        "a cancelled message is not retried: {out}{err}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(smtp.delivered().len(), 1, "the deferred one never got it");
    each_delivered_once(&smtp, &id, &["a@example.org", "b@example.org"]);
    d.stop().await;
    let lines = audit_lines(dir.path(), &id);
    let cancelled = lines.last().unwrap();
    assert_eq!(cancelled["event"]["action"], "cancelled", "{lines:?}");
    assert_eq!(
        cancelled["mailmux"]["accepted"],
        json!(["a@example.org", "b@example.org"]),
        "who had it: {lines:?}"
    );
}

/// A caller's own `max_age` (its policy's) ends its mail's wait sooner
/// than the queue's: a one-time code that could not go out within its two
/// seconds is expired, not sent an hour late. A reload that takes it away
/// gives the caller's next message the queue's `max_age`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_max_age_expires_its_mail_sooner_than_the_queues() {
    let script = Script::ok().on_rcpt("otp@example.org", Action::reply(451, "4.3.0 try later"));
    let own = "max_age = \"1h\"\n\n[policy]\nmax_age = \"2s\"";
    let (smtp, dir, cfg, d) = setup(script, own).await;
    let status = call(d.peer(), "status", "get_smtp_status", json!({}), LIMIT).await;
    let status = status.value().cloned().unwrap_or(Value::Null);
    assert_eq!(status["caller"]["max_age"], "2s", "{status}");
    let code = |subject: &str| msg(subject, json!({ "to": "otp@example.org", "wait": false }));
    let c = send(d.peer(), code("code 123456")).await;
    assert_eq!(c.status(), Some("queued"), "{c:?}");
    let id = c.message_id().unwrap().to_string();
    let s = settled(d.peer(), &id, LIMIT).await;
    assert_eq!(s["status"], "expired", "{s}");
    assert_eq!(s["reason"], "expired", "{s}");
    let note = s["message"].as_str().unwrap_or_default();
    assert!(note.contains("not delivered within max_age (2s)"), "{s}");
    assert!(
        s["attempts"].as_array().is_some_and(|a| a.len() >= 2),
        "retried within its max_age: {s}"
    );

    let plain = cfg.replace("\n\n[policy]\nmax_age = \"2s\"", "");
    assert_ne!(plain, cfg);
    std::fs::write(dir.path().join("mailmux.toml"), &plain).unwrap();
    reload(d.peer()).await;
    let c = send(d.peer(), code("code 654321")).await;
    let id = c.message_id().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = status_of(d.peer(), &id).await;
    assert_eq!(s["status"], "queued", "the queue's hour: {s}");
    assert!(s["next_attempt_at"].is_string(), "{s}");
    assert!(smtp.delivered().is_empty());
    d.stop().await;
}

/// What a caller's policy says of its waiting mail holds across a SIGKILL:
/// after the restart, a code whose caller's `max_age` is 3 s still expires
/// then (not after the queue's hour), and a transactional caller's
/// scheduled receipt to a recipient who unsubscribed meanwhile is sent at
/// its round, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_max_age_and_transactional_rule_hold_across_a_sigkill() {
    let script = Script::ok().on_rcpt("otp@example.org", Action::reply(451, "4.3.0 try later"));
    let own = "max_age = \"1h\"\n\n[policy]\nmax_age = \"3s\"\ntransactional = true";
    let (smtp, dir, cfg, d) = setup(script, own).await;
    let code = send(
        d.peer(),
        msg(
            "code 123456",
            json!({ "to": "otp@example.org", "wait": false }),
        ),
    )
    .await;
    assert_eq!(code.status(), Some("queued"), "{code:?}");
    let code = code.message_id().unwrap().to_string();
    let receipt = send(
        d.peer(),
        msg(
            "receipt",
            json!({ "to": "left@example.org", "send_at": "4s", "wait": false }),
        ),
    )
    .await;
    assert_eq!(receipt.status(), Some("scheduled"), "{receipt:?}");
    let receipt = receipt.message_id().unwrap().to_string();
    let (status, out, err) = common::queue_cmd(
        dir.path(),
        &[
            "suppress",
            "add",
            "left@example.org",
            "--reason",
            "unsubscribed",
        ],
    );
    assert_eq!(status, Some(0), "{out}{err}");
    d.kill9().await;
    let d = Daemon::start(dir.path(), &cfg).await;
    let s = settled(d.peer(), &code, LIMIT).await;
    assert_eq!(s["status"], "expired", "{s}");
    let note = s["message"].as_str().unwrap_or_default();
    assert!(note.contains("not delivered within max_age (3s)"), "{s}");
    let s = settled(d.peer(), &receipt, LIMIT).await;
    assert_eq!(s["status"], "sent", "{s}");
    let to_left = smtp
        .delivered()
        .iter()
        .filter(|r| subject_of(r).as_deref() == Some("receipt"))
        .count();
    assert_eq!(to_left, 1);
    assert_eq!(smtp.delivered().len(), 1, "the code never went out");
    d.stop().await;
}

/// A message's own `max_age` (the call's) ends its wait sooner than its
/// caller's, and holds across a SIGKILL: a code that could not go out
/// within its three seconds is expired after the restart, while one sent
/// without it waits on. More than the caller's `max_age`, or less than a
/// second, is refused and nothing is stored; in a batch, the defaults'
/// applies to every message; a key repeated with another `max_age` is a
/// conflict, and with the same one a replay even after a reload made the
/// caller's shorter than it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_messages_own_max_age_expires_it_and_holds_across_a_sigkill() {
    let script = Script::ok().on_rcpt("otp@example.org", Action::reply(451, "4.3.0 try later"));
    let (smtp, dir, cfg, d) = setup(script, "max_age = \"1h\"").await;
    let code = |subject: &str, extra: Value| {
        let mut m = msg(subject, json!({ "to": "otp@example.org", "wait": false }));
        if let (Value::Object(m), Value::Object(e)) = (&mut m, extra) {
            m.extend(e);
        }
        m
    };
    let short = send(
        d.peer(),
        code(
            "code 1",
            json!({"max_age": "3s", "idempotency_key": "otp-1"}),
        ),
    )
    .await;
    assert_eq!(short.status(), Some("queued"), "{short:?}");
    let short = short.message_id().unwrap().to_string();
    let long = send(d.peer(), code("code 2", json!({}))).await;
    let long = long.message_id().unwrap().to_string();
    let batch = call(
        d.peer(),
        "batch",
        "send_batch",
        json!({"defaults": {"subject": "code 3", "body": "x", "max_age": "3s"},
               "messages": [{"to": "otp@example.org"}], "wait": false}),
        LIMIT,
    )
    .await;
    let batched = batch.value().unwrap()["results"][0]["message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(status_of(d.peer(), &short).await["max_age"], "3s");
    assert!(status_of(d.peer(), &long).await.get("max_age").is_none());
    // When each expires: its due time and the max_age in force for it.
    assert_eq!(expires_in(&status_of(d.peer(), &short).await), Some(3));
    assert_eq!(expires_in(&status_of(d.peer(), &long).await), Some(3600));
    // `mailmux queue show` says the same, by the configuration it runs with.
    assert_eq!(expires_in(&shown(dir.path(), &short)), Some(3));
    assert_eq!(expires_in(&shown(dir.path(), &long)), Some(3600));

    let before = stored_ids(d.peer()).await;
    for (max_age, rule) in [
        (json!("2h"), "range"),
        (json!("500ms"), "range"),
        (json!("soon"), "duration"),
        (json!(5), "schema"),
    ] {
        let c = send(d.peer(), code("bad", json!({ "max_age": max_age }))).await;
        assert!(c.is_error(), "{max_age}: {c:?}");
        let e = &c.value().unwrap()["error"];
        assert_eq!(
            (e["rule"].as_str(), e["field"].as_str()),
            (Some(rule), Some("max_age")),
            "{e}"
        );
    }
    assert_eq!(stored_ids(d.peer()).await, before);
    let other = send(
        d.peer(),
        code(
            "code 1",
            json!({"max_age": "4s", "idempotency_key": "otp-1"}),
        ),
    )
    .await;
    assert_eq!(
        other.error_code(),
        Some("idempotency_conflict"),
        "{other:?}"
    );
    let same = send(
        d.peer(),
        code(
            "code 1",
            json!({"max_age": "3s", "idempotency_key": "otp-1"}),
        ),
    )
    .await;
    assert_eq!(same.message_id(), Some(short.as_str()), "{same:?}");

    d.kill9().await;
    let d = Daemon::start(dir.path(), &cfg).await;
    for id in [&short, &batched] {
        let s = settled(d.peer(), id, LIMIT).await;
        assert_eq!(s["status"], "expired", "{s}");
        let note = s["message"].as_str().unwrap_or_default();
        assert!(note.contains("not delivered within max_age (3s)"), "{s}");
    }
    let s = status_of(d.peer(), &long).await;
    assert_eq!(s["status"], "queued", "the caller's hour: {s}");
    let s = status_of(d.peer(), &short).await;
    assert_eq!(
        expires_in(&s),
        None,
        "an expired message expires no more: {s}"
    );

    // A reload that gives the caller a max_age shorter than a stored
    // message's own: a repeat of its call replays, a new call is refused.
    let keyed = code(
        "code 4",
        json!({"max_age": "30m", "idempotency_key": "otp-4"}),
    );
    let first = send(d.peer(), keyed.clone()).await;
    assert_eq!(first.status(), Some("queued"), "{first:?}");
    let shorter = format!("{cfg}\n[policy]\nmax_age = \"10m\"\n");
    std::fs::write(dir.path().join("mailmux.toml"), &shorter).unwrap();
    reload(d.peer()).await;
    // The shorter max_age in force now.
    assert_eq!(expires_in(&status_of(d.peer(), &long).await), Some(600));
    let again = send(d.peer(), keyed).await;
    assert_eq!(again.message_id(), first.message_id(), "{again:?}");
    assert_eq!(
        again.value().unwrap()["idempotent_replay"],
        true,
        "{again:?}"
    );
    let new = send(d.peer(), code("code 5", json!({"max_age": "30m"}))).await;
    let e = &new.value().unwrap()["error"];
    assert_eq!(
        (e["rule"].as_str(), e["field"].as_str()),
        (Some("range"), Some("max_age")),
        "{e}"
    );
    assert!(smtp.delivered().is_empty());
    d.stop().await;
}

/// A recipient still deferred when `max_age` ends is refused with its 4xx,
/// and the message, which the others have, is `partial`: whether the last
/// round finds it so, or the first poll after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_deferred_until_max_age_ends_is_refused_and_the_message_is_partial() {
    let (smtp, dir, cfg, d) = setup(one_mailbox_full(u64::MAX), "max_age = \"3s\"").await;
    d.stop().await;
    let cfg = with_audit(hourly_retries(cfg), dir.path());
    let d = Daemon::start(dir.path(), &cfg).await;
    // Retried once, when max_age is about to end, and deferred again.
    let c = send(d.peer(), msg("always full", json!({ "to": THREE }))).await;
    assert_eq!(c.status(), Some("partial"), "{c:?}");
    let v = c.value().unwrap();
    assert_eq!(
        v["accepted"],
        json!(["a@example.org", "b@example.org"]),
        "{v}"
    );
    assert_eq!(v["rejected"][0]["address"], "full@example.org", "{v}");
    assert_eq!(v["rejected"][0]["code"], 452, "{v}");
    let text = v["rejected"][0]["text"].as_str().unwrap_or_default();
    assert!(text.contains("max_age"), "{v}");
    assert_eq!(v["attempts"].as_array().map(Vec::len), Some(2), "{v}");
    let first = c.message_id().unwrap().to_string();
    each_delivered_once(&smtp, &first, &["a@example.org", "b@example.org"]);

    // The daemon is down when max_age ends.
    let c = send(
        d.peer(),
        msg("full, daemon down", json!({ "to": THREE, "wait": false })),
    )
    .await;
    assert_eq!(c.status(), Some("queued"), "{c:?}");
    let id = c.message_id().unwrap().to_string();
    let start = std::time::Instant::now();
    while status_of(d.peer(), &id).await["deferred"] != json!(["full@example.org"]) {
        assert!(start.elapsed() < LIMIT, "never deferred");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    d.kill9().await;
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    let d = Daemon::start(dir.path(), &cfg).await;
    let s = settled(d.peer(), &id, LIMIT).await;
    assert_eq!(s["status"], "partial", "{s}");
    assert_eq!(
        s["accepted"],
        json!(["a@example.org", "b@example.org"]),
        "{s}"
    );
    assert_eq!(s["rejected"][0]["address"], "full@example.org", "{s}");
    assert!(
        s["message"]
            .as_str()
            .unwrap_or_default()
            .contains("max_age"),
        "{s}"
    );
    assert_eq!(
        smtp.delivered().len(),
        2,
        "one transaction for each message"
    );
    d.stop().await;
    // Each partial line says who had it and who was refused: with the
    // server's 452 from the last round, and with 451 when the expiry came
    // after a restart, which has no reply of its own.
    for (id, code) in [(&first, 452), (&id, 451)] {
        let lines = audit_lines(dir.path(), id);
        let partial = lines.last().unwrap();
        assert_eq!(partial["event"]["action"], "partial", "{lines:?}");
        assert_eq!(
            partial["mailmux"]["accepted"],
            json!(["a@example.org", "b@example.org"]),
            "{lines:?}"
        );
        assert_eq!(
            partial["mailmux"]["refused"][0]["address"], "full@example.org",
            "{lines:?}"
        );
        assert_eq!(
            partial["mailmux"]["refused"][0]["smtp_code"], code,
            "{lines:?}"
        );
    }
}

/// Killed between two transactions of one message (the server took the
/// first two recipients, then never answers the second MAIL): the message
/// may have reached everyone it was committed to, so after the restart it
/// is `unknown`, and no transaction is made again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_between_two_transactions_of_one_message_is_unknown_and_never_resent() {
    let (smtp, dir, cfg, d) = setup_capped(
        2,
        Script::ok().on_share(Phase::Mail, Action::Hang, Share::EveryNth(2)),
    )
    .await;
    let c = send(
        d.peer(),
        msg(
            "split",
            json!({
                "to": ["a@example.org", "b@example.org", "c@example.org"],
                "wait": false,
            }),
        ),
    )
    .await;
    assert_eq!(c.status(), Some("queued"), "{c:?}");
    let id = c.message_id().unwrap().to_string();
    assert!(
        support::wait_until(|| smtp.commands(Phase::Mail) >= 2, LIMIT).await,
        "the second transaction never began"
    );
    assert_eq!(smtp.delivered().len(), 1);
    d.kill9().await;

    smtp.set_script(Script::ok());
    let d = Daemon::start(dir.path(), &cfg).await;
    let s = status_of(d.peer(), &id).await;
    assert_eq!(s["status"], "unknown", "{s}");
    assert_eq!(history_of(&s), ["queued", "sending", "unknown"], "{s}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = smtp.received();
    assert_eq!(got.len(), 1, "never sent again: {got:?}");
    assert_eq!(got[0].rcpt_to, ["a@example.org", "b@example.org"]);
    d.stop().await;
}

/// The ids of every stored message, newest first (one page).
async fn stored_ids(peer: &Peer<RoleClient>) -> Vec<String> {
    listed(peer, json!({"limit": 100})).await
}

/// The ids `list_messages` lists with `args`, newest first (one page).
async fn listed(peer: &Peer<RoleClient>, args: Value) -> Vec<String> {
    let c = call(peer, "list", "list_messages", args, LIMIT).await;
    assert!(!c.is_error(), "{c:?}");
    c.value().unwrap()["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message_id"].as_str().unwrap().to_string())
        .collect()
}

/// A call that waits (the default) and has no idempotency key is told
/// nothing before its outcome, so its message is stored by the commit mark
/// just before the final ".". Killed before that (the server never answers
/// DATA), nothing was stored or sent, and the restart sends nothing: the
/// caller, whose call broke, sends it again once. Killed after the final
/// "." (the server never answers it), the message was stored `sending`
/// without its bytes, and the restart makes it `unknown` and never resends
/// it; even a forced retry is refused, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_call_is_stored_when_its_message_commits() {
    let (smtp, dir, cfg, d) = setup(Script::ok().on(Phase::Data, Action::Hang), "").await;
    let peer = d.peer().clone();
    let waiting = tokio::spawn(async move { send(&peer, msg("before dot", json!({}))).await });
    assert!(
        support::wait_until(|| smtp.commands(Phase::Data) >= 1, LIMIT).await,
        "DATA was never sent"
    );
    assert!(
        stored_ids(d.peer()).await.is_empty(),
        "stored before its commit"
    );
    d.kill9().await;
    let c = waiting.await.unwrap();
    assert_eq!(c.status(), None, "a killed daemon answered: {c:?}");

    smtp.set_script(Script::ok().on(Phase::AfterDot, Action::Hang));
    let d = Daemon::start(dir.path(), &cfg).await;
    assert!(stored_ids(d.peer()).await.is_empty(), "nothing to recover");
    let peer = d.peer().clone();
    let waiting = tokio::spawn(async move { send(&peer, msg("after dot", json!({}))).await });
    assert!(
        support::wait_until(|| !smtp.received().is_empty(), LIMIT).await,
        "the data never arrived"
    );
    let ids = stored_ids(d.peer()).await;
    assert_eq!(ids.len(), 1, "stored at its commit: {ids:?}");
    d.kill9().await;
    assert_eq!(waiting.await.unwrap().status(), None);

    smtp.set_script(Script::ok());
    let d = Daemon::start(dir.path(), &cfg).await;
    let s = status_of(d.peer(), &ids[0]).await;
    assert_eq!(s["status"], "unknown", "{s}");
    assert_eq!(history_of(&s), ["queued", "sending", "unknown"], "{s}");
    // Give a wrongful send every chance to happen.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let subjects: Vec<String> = smtp.received().iter().filter_map(subject_of).collect();
    assert_eq!(subjects, ["after dot"], "only the committed message, once");
    assert_eq!(stored_ids(d.peer()).await, ids);
    // Stored by its mark without its bytes: nothing to send again.
    let (code, _, err) = common::queue_cmd(dir.path(), &["retry", &ids[0], "--force"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("its bytes are not stored"), "{err}");
    assert_eq!(status_of(d.peer(), &ids[0]).await["status"], "unknown");
    d.stop().await;
}

/// A waiting call whose relay answers 451 after the final ".": its message
/// was stored at its commit mark without its bytes, and the deferred outcome
/// stores them, so the retry delivers the same message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_call_deferred_after_its_dot_is_retried_whole() {
    let (smtp, _dir, _cfg, d) = setup(
        Script::ok().on(Phase::AfterDot, Action::reply(451, "try later")),
        "",
    )
    .await;
    let peer = d.peer().clone();
    let waiting =
        tokio::spawn(async move { send(&peer, msg("deferred after dot", json!({}))).await });
    assert!(
        support::wait_until(|| !smtp.received().is_empty(), LIMIT).await,
        "the data never arrived"
    );
    smtp.set_script(Script::ok());
    let c = waiting.await.unwrap();
    assert_eq!(c.status(), Some("sent"), "{c:?}");
    let s = status_of(d.peer(), c.message_id().unwrap()).await;
    assert_eq!(s["attempts"][0]["code"], 451, "{s}");

    let received = smtp.received();
    let delivered: Vec<_> = received.iter().filter(|r| r.is_delivered()).collect();
    assert_eq!(delivered.len(), 1, "{received:?}");
    assert!(received.len() >= 2, "{received:?}");
    assert_eq!(
        delivered[0].data, received[0].data,
        "the retry sent other bytes"
    );
    let text = String::from_utf8_lossy(&delivered[0].data);
    assert!(text.contains("body of deferred after dot"), "{text}");
    d.stop().await;
}

/// 5,000 calls with `wait: false` at C=32, the daemon killed in the middle
/// and restarted: every message answered `queued` is at the sink exactly
/// once, or is `unknown` and there at most once; nothing appears twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_killed_mid_way_loses_nothing_and_doubles_nothing() {
    const CALLS: usize = 5000;
    let (smtp, dir, cfg, d) = setup(Script::ok(), "").await;
    let calls = burst(d.peer(), "burst", CALLS, 32, LIMIT, |i| {
        msg(&format!("burst {i}"), json!({"wait": false}))
    });
    // Kill at a moment that depends on the run: after 1,500 to 3,500 answers.
    let at = 1500 + (std::process::id() as usize % 2000);
    let reached = support::wait_until(
        || calls.done.load(std::sync::atomic::Ordering::SeqCst) >= at,
        Duration::from_secs(120),
    )
    .await;
    assert!(reached, "the burst never reached {at} answers");
    d.kill9().await;
    let calls = calls.join().await;

    let d = Daemon::start(dir.path(), &cfg).await;
    let queued: Vec<&Call> = calls
        .iter()
        .filter(|c| c.status() == Some("queued"))
        .collect();
    let unanswered = calls.iter().filter(|c| c.value().is_none()).count();
    // Wait until the restarted daemon has nothing left to send.
    let drained = support::wait_until_async(
        || async { nothing_to_send(&harness::status(d.peer()).await) },
        Duration::from_secs(120),
    )
    .await;
    assert!(drained, "the queue never drained");
    let received = smtp.received();
    let seen = copies(&received);
    let (mut sent, mut unknown) = (0, 0);
    for c in &queued {
        let id = c.message_id().unwrap();
        let s = status_of(d.peer(), id).await;
        count_final(id, s["status"].as_str(), &seen, &mut sent, &mut unknown);
    }
    only_once_and_only_asked(&received, &seen, "burst ");
    eprintln!(
        "burst of {CALLS}: killed after {at} answers; {} answered queued, {unanswered} unanswered; \
         after restart {sent} sent exactly once, {unknown} unknown; {} messages at the sink, 0 duplicated",
        queued.len(),
        received.len()
    );
    assert_eq!(sent + unknown, queued.len());
    d.stop().await;
}

/// The built binary serving HTTP, killed (SIGKILL) when dropped.
struct HttpDaemon(std::process::Child);

impl Drop for HttpDaemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The built binary serving HTTP on `port` (with `args` after
/// `serve --http ADDR`) on the configuration and the store in `dir`; its
/// log in `log` at debug level, so that the calls mailmux answers itself
/// are counted.
fn http_daemon(dir: &Path, config: &str, port: u16, args: &[&str], log: &Path) -> HttpDaemon {
    let path = dir.join("mailmux.toml");
    std::fs::write(&path, config).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_mailmux"))
        .arg("--config")
        .arg(&path)
        .args(["serve", "--http", &format!("127.0.0.1:{port}")])
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info,mailmux=debug")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("mailmux starts");
    HttpDaemon(child)
}

/// A call of `tool` with `args` as one HTTP request: of protocol
/// 2026-07-28 when `modern` (the standard headers and its `_meta`, no
/// session), else a stateless call of 2025-06-18. A `send_email` call of
/// either kind is one that mailmux answers without rmcp's service.
fn http_call(
    http: &reqwest::Client,
    url: &str,
    id: usize,
    modern: bool,
    tool: &str,
    args: Value,
) -> reqwest::RequestBuilder {
    let mut params = json!({"name": tool, "arguments": args});
    let version = match modern {
        true => "2026-07-28",
        false => "2025-06-18",
    };
    let mut r = http
        .post(url)
        .header("Accept", "application/json, text/event-stream")
        .header("Content-Type", "application/json")
        .header("MCP-Protocol-Version", version);
    if modern {
        params["_meta"] = json!({
            "io.modelcontextprotocol/protocolVersion": version,
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "kill-test", "version": "1"},
        });
        r = r
            .header("Mcp-Method", "tools/call")
            .header("Mcp-Name", tool);
    }
    r.body(
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params}).to_string(),
    )
}

/// What an HTTP call was told: the tool's result, or why there was none.
async fn http_answer(label: String, sent: reqwest::RequestBuilder) -> Call {
    let started = std::time::Instant::now();
    let answer = match tokio::time::timeout(LIMIT, sent.send()).await {
        Err(_) => harness::Answer::TimedOut,
        Ok(Err(e)) => harness::Answer::Protocol(e.to_string()),
        Ok(Ok(r)) => match r.text().await.map(|t| serde_json::from_str::<Value>(&t)) {
            Ok(Ok(v)) if v["result"].is_object() => harness::Answer::Result {
                is_error: v["result"]["isError"] == true,
                value: v["result"]["structuredContent"].clone(),
                text: String::new(),
            },
            Ok(Ok(v)) => harness::Answer::Protocol(v.to_string()),
            Ok(Err(e)) => harness::Answer::Protocol(e.to_string()),
            Err(e) => harness::Answer::Protocol(e.to_string()),
        },
    };
    Call {
        label,
        answer,
        elapsed: started.elapsed(),
    }
}

/// A burst of 3,000 `send_email` calls over HTTP at C=32, each answered by
/// mailmux itself (no rmcp service), the binary killed in the middle, then
/// restarted over the same store: every call answered `queued` or `sent` is
/// at the sink exactly once, or is `unknown` and there at most once, and
/// nothing appears twice. Without sessions the calls are of 2025-06-18 and
/// 2026-07-28 by turns; with sessions, of 2026-07-28 (older ones there go
/// through rmcp). Half of them wait for the delivery, half do not.
async fn http_burst_killed_mid_way(stateless: bool) {
    const CALLS: usize = 3000;
    let smtp = FaultSmtp::start(Script::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_toml(dir.path(), smtp.port(), "");
    let port = common::free_port();
    let args: &[&str] = if stateless { &["--stateless"] } else { &[] };
    let log = tempfile::NamedTempFile::new().unwrap();
    let daemon = http_daemon(dir.path(), &cfg, port, args, log.path());
    let url = format!("http://127.0.0.1:{port}/mcp");
    let http = reqwest::Client::new();
    serving(&http, port).await;

    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let counter = done.clone();
    let (client, target) = (http.clone(), url.clone());
    let calls = tokio::spawn(async move {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..CALLS {
            let permit = gate.clone().acquire_owned().await.unwrap();
            let modern = !stateless || i % 2 == 0;
            let args = msg(&format!("http burst {i}"), json!({"wait": i % 4 < 2}));
            let request = http_call(&client, &target, i, modern, "send_email", args);
            let counter = counter.clone();
            set.spawn(async move {
                let c = http_answer(format!("http burst {i}"), request).await;
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(permit);
                c
            });
        }
        set.join_all().await
    });
    // Kill at a moment that depends on the run: after 800 to 2,000 answers.
    let at = 800 + (std::process::id() as usize % 1200);
    let reached = support::wait_until(
        || done.load(std::sync::atomic::Ordering::SeqCst) >= at,
        Duration::from_secs(120),
    )
    .await;
    assert!(reached, "the burst never reached {at} answers");
    // SIGKILL, and wait for the process to be gone.
    drop(daemon);
    let calls = calls.await.unwrap();
    let direct = std::fs::read_to_string(log.path())
        .unwrap()
        .matches("answered without rmcp's service")
        .count();

    // The same daemon again, on the same store: the messages are the HTTP
    // caller's, so they are asked after over HTTP.
    let port = common::free_port();
    let _daemon = http_daemon(dir.path(), &cfg, port, args, log.path());
    let url = format!("http://127.0.0.1:{port}/mcp");
    serving(&http, port).await;
    let ask = |tool: &'static str, args: Value| {
        let request = http_call(&http, &url, 0, !stateless, tool, args);
        async move { http_answer(tool.to_string(), request).await }
    };
    let stored: Vec<&Call> = calls
        .iter()
        .filter(|c| matches!(c.status(), Some("queued" | "sent")))
        .collect();
    let answered = calls.iter().filter(|c| c.value().is_some()).count();
    assert!(
        answered >= at,
        "{answered} answers, {at} seen before the kill"
    );
    assert_eq!(stored.len(), answered, "every answer was queued or sent");
    assert!(
        direct >= answered,
        "{answered} answers, {direct} calls answered by mailmux itself"
    );
    let drained = support::wait_until_async(
        || async {
            let st = ask("get_smtp_status", json!({})).await;
            nothing_to_send(st.value().expect("a status"))
        },
        Duration::from_secs(120),
    )
    .await;
    assert!(drained, "the queue never drained");
    let received = smtp.received();
    let seen = copies(&received);
    let (mut sent, mut unknown) = (0, 0);
    let told_sent = stored.iter().filter(|c| c.status() == Some("sent")).count();
    for c in &stored {
        let id = c.message_id().unwrap();
        let s = ask("get_message_status", json!({ "message_id": id })).await;
        let s = s.value().cloned().unwrap_or(Value::Null);
        if c.status() == Some("sent") {
            assert_eq!(s["status"], "sent", "{id} was answered sent: {s}");
        }
        count_final(id, s["status"].as_str(), &seen, &mut sent, &mut unknown);
    }
    only_once_and_only_asked(&received, &seen, "http burst ");
    eprintln!(
        "HTTP burst of {CALLS} ({}): killed after {at} answers; {answered} answered \
         ({told_sent} sent, {} queued), all by mailmux itself ({direct} logged), {} unanswered; \
         after restart {sent} sent exactly once, {unknown} unknown; {} messages at the sink, 0 duplicated",
        if stateless {
            "stateless"
        } else {
            "sessions, 2026-07-28"
        },
        stored.len() - told_sent,
        CALLS - answered,
        received.len()
    );
    assert_eq!(sent + unknown, stored.len());
}

/// Waits until the daemon on `port` answers its health check.
async fn serving(http: &reqwest::Client, port: u16) {
    let up = support::wait_until_async(
        || async {
            http.get(format!("http://127.0.0.1:{port}/health"))
                .send()
                .await
                .is_ok()
        },
        LIMIT,
    )
    .await;
    assert!(up, "the daemon never served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateless_http_burst_killed_mid_way_loses_nothing_and_doubles_nothing() {
    http_burst_killed_mid_way(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_burst_of_2026_07_28_killed_mid_way_loses_nothing_and_doubles_nothing() {
    http_burst_killed_mid_way(false).await;
}

/// Several SIGKILLs of the real binary while eight callers send, some with
/// idempotency keys, some waiting, some in small batches, and the relay
/// fails at random (after the final "." too). A caller whose call broke
/// with its daemon makes the call again on the next daemon when it has
/// keys, as an agent would; a call with no key is left unanswered. After
/// the last restart the relay turns good and the queue drains; then every
/// stored message is reconciled at the sink ([`chaos::reconcile`]). The
/// seed is printed; `MAILMUX_RANDOM_SEED` replays the callers' choices and
/// the relay's faults (the moments of the kills follow the run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_kills_under_a_flaky_relay_lose_nothing_and_double_nothing() {
    use rand::{Rng, SeedableRng};

    const KILLS: usize = 5;
    let seed = chaos::seed();
    eprintln!("repeated kills: MAILMUX_RANDOM_SEED={seed} replays this run");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let smtp = chaos::relay().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = chaos::with_max_age(config_toml(
        dir.path(),
        smtp.port(),
        &chaos::approvals_toml(),
    ))
    .replace("send_deadline = \"8s\"", "send_deadline = \"2s\"");
    let daemons = chaos::Daemons::new(1);
    let shell = chaos::Shell {
        dir: dir.path().to_path_buf(),
        operator: Some(chaos::OPERATOR.into()),
    };
    let run = chaos::Run::start(seed, &daemons, LIMIT, shell, smtp.clone());

    let mut terms = 0;
    for _ in 0..KILLS {
        let d = Daemon::start(dir.path(), &cfg).await;
        daemons.started(0, d.peer());
        tokio::time::sleep(Duration::from_millis(rng.random_range(600..2500))).await;
        // One stop in three is a SIGTERM, with the callers still calling
        // while it drains (and refuses them).
        if rng.random_bool(0.33) {
            terms += 1;
            d.term().await;
            daemons.stopping(0);
        } else {
            daemons.stopping(0);
            d.kill9().await;
        }
    }
    let d = Daemon::start(dir.path(), &cfg).await;
    daemons.started(0, d.peer());
    let tally = run.finish(d.peer()).await;
    eprintln!(
        "repeated kills: {KILLS} stops ({} SIGKILL, {terms} SIGTERM), {tally}",
        KILLS - terms
    );
    d.stop().await;
}

/// `cancel_message` of a message whose round is under way (the relay is
/// slow at RCPT) is refused, `sending`, and changes nothing: the runner's
/// polls, every 100 ms meanwhile, do not start a second round of it, and
/// the relay gets it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_refused_during_a_round_does_not_start_another() {
    let smtp = FaultSmtp::start(Script::ok().on_share(
        Phase::Rcpt,
        Action::Pause(Duration::from_millis(1500)),
        Share::FirstN(1),
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &config_toml(dir.path(), smtp.port(), "")).await;
    let queued = send(d.peer(), msg("refused cancel", json!({"wait": false}))).await;
    assert_eq!(queued.status(), Some("queued"), "{queued:?}");
    let id = queued.message_id().unwrap().to_string();
    let held = support::wait_until(|| smtp.commands(Phase::Rcpt) >= 1, LIMIT).await;
    assert!(held, "the round never reached RCPT");
    let cancel = cancel(d.peer(), &id).await;
    assert_eq!(cancel.error_code(), Some("not_cancellable"), "{cancel:?}");
    assert_eq!(cancel.value().unwrap()["status"], "sending", "{cancel:?}");

    let s = settled(d.peer(), &id, LIMIT).await;
    assert_eq!(s["status"], "sent", "{s}");
    // Time for a second round, had one started, to reach the relay.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(smtp.commands(Phase::Rcpt), 1, "one round, one RCPT");
    assert_eq!(copies(&smtp.received()).get(&id), Some(&1));
    assert_eq!(history_of(&s), ["queued", "sending", "sent"], "{s}");
    d.stop().await;
}

/// Idempotency keys: a repeat, 32 concurrent calls with one key, a repeat
/// after a restart, and a conflict. Each counts the copies at the sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_send_once_across_calls_and_restarts() {
    let (smtp, dir, cfg, d) = setup(Script::ok(), "").await;

    let first = send(d.peer(), msg("idem", json!({"idempotency_key": "k-1"}))).await;
    assert_eq!(first.status(), Some("sent"), "{first:?}");
    let id = first.message_id().unwrap().to_string();
    let again = send(
        d.peer(),
        msg("idem", json!({"idempotency_key": "k-1", "wait": false})),
    )
    .await;
    assert_eq!(again.status(), Some("sent"), "{again:?}");
    assert_eq!(again.message_id(), Some(id.as_str()));
    assert_eq!(again.value().unwrap()["idempotent_replay"], true);
    // The same content with `to` as an array, not a string, and a link as
    // an array of one: a replay too, not a conflict.
    let listed = send(
        d.peer(),
        msg(
            "idem",
            json!({"idempotency_key": "k-1", "to": ["rcpt@example.org"]}),
        ),
    )
    .await;
    assert_eq!(listed.message_id(), Some(id.as_str()), "{listed:?}");
    assert_eq!(listed.value().unwrap()["idempotent_replay"], true);
    for links in [
        json!("mailto:u@example.org"),
        json!(["mailto:u@example.org"]),
    ] {
        let extra = json!({"idempotency_key": "k-links", "list_unsubscribe": links});
        let call = send(d.peer(), msg("links", extra)).await;
        assert_eq!(call.status(), Some("sent"), "{call:?}");
    }

    // 32 at once with a new key: one message.
    let calls = burst(d.peer(), "same", 32, 32, LIMIT, |_| {
        msg("thirty-two", json!({"idempotency_key": "k-32"}))
    })
    .join()
    .await;
    let ids: std::collections::HashSet<&str> =
        calls.iter().filter_map(|c| c.message_id()).collect();
    assert_eq!(ids.len(), 1, "one message for one key: {ids:?}");
    let replays = calls
        .iter()
        .filter(|c| c.value().unwrap()["idempotent_replay"] == true)
        .count();
    assert_eq!(replays, 31);

    // Same key, other content: refused, nothing sent.
    let conflict = send(d.peer(), msg("other", json!({"idempotency_key": "k-1"}))).await;
    assert!(conflict.is_error());
    assert_eq!(conflict.error_code(), Some("idempotency_conflict"));
    d.kill9().await;

    let d = Daemon::start(dir.path(), &cfg).await;
    let after = send(d.peer(), msg("idem", json!({"idempotency_key": "k-1"}))).await;
    assert_eq!(after.message_id(), Some(id.as_str()), "{after:?}");
    assert_eq!(after.value().unwrap()["idempotent_replay"], true);
    let by_key = call(
        d.peer(),
        "by key",
        "get_message_status",
        json!({"idempotency_key": "k-32"}),
        LIMIT,
    )
    .await;
    assert_eq!(by_key.status(), Some("sent"), "{by_key:?}");

    let received = smtp.received();
    let subjects: Vec<String> = received.iter().filter_map(subject_of).collect();
    assert_eq!(subjects.iter().filter(|s| *s == "idem").count(), 1);
    assert_eq!(subjects.iter().filter(|s| *s == "thirty-two").count(), 1);
    assert_eq!(subjects.iter().filter(|s| *s == "other").count(), 0);
    assert_eq!(subjects.iter().filter(|s| *s == "links").count(), 1);
    assert_eq!(received.len(), 3);
    d.stop().await;
}

/// A caller's `tag` and `metadata`: kept with the message across a
/// SIGKILL, listed by tag (a batch's `defaults` tag every message of it,
/// and a message's own `metadata` replaces the defaults') and by one
/// metadata name and value (`list_messages`, `mailmux queue list`), shown in its
/// status, in the audit log (the tag only), and never sent; what still
/// waits of a tag is cancelled by it. Bad labels
/// are refused naming the field, and nothing is stored; a repeat of a
/// key with another tag is a conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_and_metadata_are_kept_listed_by_tag_and_never_sent() {
    let smtp = FaultSmtp::start(Script::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = with_audit(config_toml(dir.path(), smtp.port(), ""), dir.path());
    let d = Daemon::start(dir.path(), &cfg).await;

    let spring =
        json!({"tag": "spring sale", "metadata": {"customer_id": "c-4242", "order": "o-17"}});
    let first = send(d.peer(), msg("first", spring.clone())).await;
    assert_eq!(first.status(), Some("sent"), "{first:?}");
    let first = first.message_id().unwrap().to_string();
    let second = send(
        d.peer(),
        msg("second", json!({"tag": "spring sale", "wait": false})),
    )
    .await;
    assert_eq!(second.status(), Some("queued"), "{second:?}");
    let second = second.message_id().unwrap().to_string();
    let autumn = send(d.peer(), msg("third", json!({"tag": "autumn"}))).await;
    let autumn = autumn.message_id().unwrap().to_string();
    let plain = send(d.peer(), msg("plain", json!({}))).await;
    assert_eq!(plain.status(), Some("sent"), "{plain:?}");
    let batch = call(
        d.peer(),
        "batch",
        "send_batch",
        json!({
            "defaults": {"subject": "news", "body": "hello\n", "tag": "newsletter",
                         "metadata": {"list": "weekly"}},
            "messages": [
                {"to": "n1@example.org"},
                {"to": "n2@example.org", "metadata": {"list": "daily", "customer_id": "c-9"}},
            ],
        }),
        LIMIT,
    )
    .await;
    assert_eq!(batch.value().unwrap()["summary"]["sent"], 2, "{batch:?}");
    let news: Vec<String> = batch.value().unwrap()["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["message_id"].as_str().unwrap().to_string())
        .collect();

    // Refused, naming the field; nothing stored.
    let before = stored_ids(d.peer()).await;
    for (extra, rule, field) in [
        (json!({"tag": "two\nlines"}), "invalid_tag", "tag"),
        (json!({"tag": ""}), "invalid_tag", "tag"),
        (json!({"tag": "x".repeat(101)}), "invalid_tag", "tag"),
        (json!({"tag": 7}), "schema", "tag"),
        (
            json!({"metadata": {"bad name": "v"}}),
            "invalid_metadata",
            "metadata.bad name",
        ),
        (
            json!({"metadata": {"k": "a\r\nBcc: x@example.org"}}),
            "invalid_metadata",
            "metadata.k",
        ),
        (json!({"metadata": {"k": 42}}), "schema", "metadata.k"),
        (json!({"metadata": "c-1"}), "schema", "metadata"),
        (
            json!({"metadata": (0..21).map(|i| (format!("k{i}"), json!("v"))).collect::<serde_json::Map<_, _>>()}),
            "invalid_metadata",
            "metadata",
        ),
    ] {
        let c = send(d.peer(), msg("bad", extra.clone())).await;
        assert!(c.is_error(), "{extra}: {c:?}");
        let e = &c.value().unwrap()["error"];
        assert_eq!(
            (e["rule"].as_str(), e["field"].as_str()),
            (Some(rule), Some(field)),
            "{extra}: {e}"
        );
    }
    assert_eq!(stored_ids(d.peer()).await, before);
    // A key repeated with another tag is other content.
    let keyed = send(
        d.peer(),
        msg("keyed", json!({"idempotency_key": "k-tag", "tag": "a"})),
    )
    .await;
    assert_eq!(keyed.status(), Some("sent"), "{keyed:?}");
    let retagged = send(
        d.peer(),
        msg("keyed", json!({"idempotency_key": "k-tag", "tag": "b"})),
    )
    .await;
    assert_eq!(
        retagged.error_code(),
        Some("idempotency_conflict"),
        "{retagged:?}"
    );
    settled(d.peer(), &second, LIMIT).await;
    // Nor in the daemon's log, refusals included.
    let log = d.logs();
    assert!(
        log.contains("metadata.k: the value holds a control"),
        "{log}"
    );
    assert!(!log.contains("c-4242") && !log.contains("Bcc: x@"), "{log}");
    d.kill9().await;

    let d = Daemon::start(dir.path(), &cfg).await;
    let want = vec![second.clone(), first.clone()];
    assert_eq!(listed(d.peer(), json!({"tag": "spring sale"})).await, want);
    assert_eq!(
        listed(d.peer(), json!({"tag": "autumn"})).await,
        vec![autumn.clone()]
    );
    assert_eq!(
        listed(d.peer(), json!({"tag": "spring"})).await,
        Vec::<String>::new()
    );
    let mut newsletter = listed(d.peer(), json!({"tag": "newsletter", "status": "sent"})).await;
    newsletter.sort();
    let mut sorted = news.clone();
    sorted.sort();
    assert_eq!(newsletter, sorted);
    // By one metadata name and its value, as sent; with the queue command
    // too.
    for (args, want) in [
        (json!({"customer_id": "c-4242"}), vec![first.clone()]),
        (json!({"customer_id": "c-9"}), vec![news[1].clone()]),
        (json!({"list": "weekly"}), vec![news[0].clone()]),
        (json!({"customer_id": "c-42"}), vec![]),
        (json!({"order": "O-17"}), vec![]),
        // Every name given, each with its value.
        (
            json!({"customer_id": "c-4242", "order": "o-17"}),
            vec![first.clone()],
        ),
        (json!({"customer_id": "c-4242", "order": "o-18"}), vec![]),
        (
            json!({"list": "daily", "customer_id": "c-9"}),
            vec![news[1].clone()],
        ),
    ] {
        assert_eq!(
            listed(d.peer(), json!({"metadata": args})).await,
            want,
            "{args}"
        );
    }
    assert_eq!(
        listed(
            d.peer(),
            json!({"metadata": {"list": "daily"}, "tag": "autumn"})
        )
        .await,
        Vec::<String>::new()
    );
    let too_many: serde_json::Map<String, Value> =
        (0..21).map(|i| (format!("k{i}"), json!("v"))).collect();
    for (args, rule, field) in [
        (json!({}), "empty", "metadata"),
        (Value::Object(too_many), "invalid_metadata", "metadata"),
        (
            json!({"bad name": "v"}),
            "invalid_metadata",
            "metadata.bad name",
        ),
    ] {
        let c = call(
            d.peer(),
            "list",
            "list_messages",
            json!({"metadata": args}),
            LIMIT,
        )
        .await;
        let e = &c.value().unwrap_or_else(|| panic!("{c:?}"))["error"];
        assert_eq!(
            (e["rule"].as_str(), e["field"].as_str()),
            (Some(rule), Some(field)),
            "{args}: {e}"
        );
    }
    let (code, out, err) = common::queue_cmd(
        dir.path(),
        &["list", "--metadata", "customer_id=c-4242", "--json"],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(&first) && out.lines().count() == 1, "{out}");
    let (code, out, err) = common::queue_cmd(
        dir.path(),
        &[
            "list",
            "--metadata",
            "customer_id=c-4242",
            "--metadata",
            "order=o-18",
            "--json",
        ],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.trim().is_empty(), "{out}");
    let (code, _, err) = common::queue_cmd(dir.path(), &["list", "--metadata", "no pair"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("NAME=VALUE"), "{err}");
    // One name twice is refused, not read as the last value given.
    let (code, out, err) = common::queue_cmd(
        dir.path(),
        &[
            "list",
            "--metadata",
            "order=o-18",
            "--metadata",
            "order=o-17",
        ],
    );
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains("--metadata order is given twice"), "{err}");
    let c = call(
        d.peer(),
        "list",
        "list_messages",
        json!({"tag": "autumn"}),
        LIMIT,
    )
    .await;
    assert_eq!(c.value().unwrap()["messages"][0]["tag"], "autumn", "{c:?}");

    let s = status_of(d.peer(), &first).await;
    assert_eq!(s["tag"], "spring sale", "{s}");
    assert_eq!(
        s["metadata"],
        json!({"customer_id": "c-4242", "order": "o-17"}),
        "{s}"
    );
    let s = status_of(d.peer(), &news[0]).await;
    assert_eq!(
        (&s["tag"], &s["metadata"]),
        (&json!("newsletter"), &json!({"list": "weekly"})),
        "{s}"
    );
    let s = status_of(d.peer(), &news[1]).await;
    assert_eq!(
        s["metadata"],
        json!({"list": "daily", "customer_id": "c-9"}),
        "{s}"
    );
    let s = status_of(d.peer(), plain.message_id().unwrap()).await;
    assert!(s.get("tag").is_none() && s.get("metadata").is_none(), "{s}");

    // What still waits of a tag is cancelled by the tag; what went out is
    // left as it is, and another tag's mail waits on.
    let mut later = Vec::new();
    for tag in ["later", "later", "later too"] {
        let c = send(d.peer(), msg("later", json!({"tag": tag, "send_at": "1h"}))).await;
        assert_eq!(c.status(), Some("scheduled"), "{c:?}");
        later.push(c.message_id().unwrap().to_string());
    }
    let cancel_tag = |args: Value| call(d.peer(), "cancel", "cancel_message", args, LIMIT);
    let c = cancel_tag(json!({"tag": "later"})).await;
    let out = c.value().unwrap();
    assert_eq!(out["cancelled"], true, "{out}");
    assert_eq!(out["cancelled_count"], 2, "{out}");
    assert_eq!(out["summary"], json!({"cancelled": 2}), "{out}");
    for (id, want) in later.iter().zip(["cancelled", "cancelled", "scheduled"]) {
        assert_eq!(status_of(d.peer(), id).await["status"], want);
    }
    let c = cancel_tag(json!({"tag": "spring sale"})).await;
    assert_eq!(c.error_code(), Some("not_found"), "{c:?}");
    assert_eq!(status_of(d.peer(), &first).await["status"], "sent");
    let c = cancel_tag(json!({"tag": "later", "batch_id": "batch-x"})).await;
    assert_eq!(c.value().unwrap()["error"]["rule"], "one_of", "{c:?}");
    let c = cancel_tag(json!({"tag": " "})).await;
    assert_eq!(c.value().unwrap()["error"]["rule"], "empty", "{c:?}");

    // Never sent: not in any message at the sink.
    let received = smtp.received();
    assert_eq!(
        received.len(),
        7,
        "first, second, autumn, plain, two of the batch, keyed"
    );
    for r in &received {
        let text = String::from_utf8_lossy(&r.data);
        for label in [
            "spring sale",
            "c-4242",
            "o-17",
            "newsletter",
            "weekly",
            "autumn",
        ] {
            assert!(!text.contains(label), "{label} sent: {text}");
        }
    }
    // The audit log carries the tag, never the metadata.
    let lines = audit_lines(dir.path(), &first);
    assert!(!lines.is_empty());
    for l in &lines {
        assert_eq!(l["mailmux"]["tag"], "spring sale", "{l}");
    }
    let log = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(!log.contains("c-4242") && !log.contains("weekly"), "{log}");
    d.stop().await;
}

/// Every relay answers 451 for a while: the message is `queued` with a next
/// attempt, then delivered once after recovery. A message past `max_age`
/// expires; a cancelled one is never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_mail_is_retried_expired_or_cancelled() {
    let smtp =
        FaultSmtp::start(Script::ok().on(Phase::Mail, Action::reply(451, "try later"))).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_toml(dir.path(), smtp.port(), "max_age = \"3s\"");
    let d = Daemon::start(dir.path(), &cfg).await;

    let c = send(d.peer(), msg("deferred", json!({"wait": false}))).await;
    assert_eq!(c.status(), Some("queued"), "{c:?}");
    let id = c.message_id().unwrap().to_string();
    // After the first round: still queued, with its next attempt and the 451.
    let start = std::time::Instant::now();
    let s = loop {
        let s = status_of(d.peer(), &id).await;
        if s["status"] == "queued" && !s["attempts"].as_array().unwrap().is_empty() {
            break s;
        }
        assert!(start.elapsed() < LIMIT, "never deferred: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(s["next_attempt_at"].is_string(), "{s}");
    assert_eq!(s["attempts"][0]["code"], 451, "{s}");
    assert_eq!(s["attempts"][0]["class"], "transient", "{s}");

    // Cancel another deferred message while it waits for its retry.
    let doomed = send(d.peer(), msg("cancel me", json!({"wait": false}))).await;
    assert_eq!(doomed.status(), Some("queued"), "{doomed:?}");
    let doomed_id = doomed.message_id().unwrap().to_string();
    let mut cancelled = None;
    for _ in 0..50 {
        let c = cancel(d.peer(), &doomed_id).await;
        if c.value().unwrap()["cancelled"] == true {
            cancelled = Some(c);
            break;
        }
        // A retry round holds it right now.
        assert_eq!(c.error_code(), Some("not_cancellable"), "{c:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(cancelled.is_some(), "never cancellable");
    let again = cancel(d.peer(), &doomed_id).await;
    assert_eq!(again.error_code(), Some("not_cancellable"));
    assert!(
        again.value().unwrap()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cancelled")
    );

    // Recovery: the retry delivers the first message once.
    tokio::time::sleep(Duration::from_millis(700)).await;
    smtp.set_script(Script::ok());
    let s = settled(d.peer(), &id, Duration::from_secs(10)).await;
    assert_eq!(s["status"], "sent", "{s}");

    // A message that never gets through expires after max_age (3 s): a
    // caller that waits (deadline 8 s) sees it retried, then expired.
    smtp.set_script(Script::ok().on(Phase::Mail, Action::reply(451, "still later")));
    let late = send(d.peer(), msg("expires", json!({}))).await;
    assert_eq!(late.status(), Some("expired"), "{late:?}");
    assert_eq!(late.error_code(), Some("expired"), "{late:?}");
    let late_id = late.message_id().unwrap().to_string();
    let s = status_of(d.peer(), &late_id).await;
    assert_eq!(s["status"], "expired", "{s}");
    assert!(s["attempts"].as_array().unwrap().len() >= 2, "retried: {s}");

    let subjects: Vec<String> = smtp.received().iter().filter_map(subject_of).collect();
    assert_eq!(
        subjects,
        ["deferred"],
        "only the deferred message got through"
    );
    let s = status_of(d.peer(), &doomed_id).await;
    assert_eq!(s["status"], "cancelled");
    d.stop().await;
}

/// Starts a `send_email` call, waits for `until`, then cancels the call as
/// a client does (`notifications/cancelled`).
async fn send_then_cancel(
    peer: &Peer<RoleClient>,
    args: Value,
    until: impl std::future::Future<Output = ()>,
) {
    call_then_cancel(peer, "send_email", args, until).await;
}

/// Calls `tool` with `args`, and cancels the call once `until` is done.
async fn call_then_cancel(
    peer: &Peer<RoleClient>,
    tool: &'static str,
    args: Value,
    until: impl std::future::Future<Output = ()>,
) {
    let mut params = CallToolRequestParams::new(tool);
    if let Value::Object(map) = args {
        params = params.with_arguments(map);
    }
    let request = ClientRequest::CallToolRequest(CallToolRequest::new(params));
    let handle = peer
        .send_cancellable_request(request, PeerRequestOptions::no_options())
        .await
        .unwrap();
    until.await;
    handle
        .cancel(Some("the client gave up".into()))
        .await
        .unwrap();
}

/// The newest message, once it is finished; never one of `seen`.
async fn newest_finished(peer: &Peer<RoleClient>, seen: &[String]) -> Value {
    let start = std::time::Instant::now();
    loop {
        let listed = call(peer, "list", "list_messages", json!({"limit": 1}), LIMIT).await;
        let newest = listed.value().unwrap()["messages"][0].clone();
        let id = newest["message_id"].as_str().unwrap_or_default();
        let st = newest["status"].as_str().unwrap_or_default();
        if !id.is_empty()
            && !seen.iter().any(|s| s == id)
            && !["queued", "scheduled", "sending"].contains(&st)
        {
            return status_of(peer, id).await;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "never finished: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A call that waits and is cancelled by its client (`notifications/cancelled`:
/// what the TypeScript SDK sends when its 60 s request timeout passes, and
/// rmcp's client when a call is dropped) cancels its message while no relay
/// has begun to commit it: in its first round, and while it waits for a
/// retry. Once a relay has its final "." the delivery goes on. A message
/// with an idempotency key goes on too: the caller's retry with that key
/// follows it, and it is sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_its_client_cancels_cancels_its_message_until_a_relay_commits_it() {
    let smtp = FaultSmtp::start(Script::ok().on(Phase::Greeting, Action::Hang)).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_toml(dir.path(), smtp.port(), "");
    let d = Daemon::start(dir.path(), &cfg).await;
    let soon = || tokio::time::sleep(Duration::from_millis(300));
    let mut seen = Vec::new();
    let finished = |s: Value, seen: &mut Vec<String>| {
        seen.push(s["message_id"].as_str().unwrap().to_owned());
        s
    };

    // In its first round, the relay silent after connecting.
    send_then_cancel(d.peer(), msg("silent", json!({})), soon()).await;
    let s = finished(newest_finished(d.peer(), &seen).await, &mut seen);
    assert_eq!(s["status"], "cancelled", "{s}");
    assert_eq!(s["reason"], "cancelled", "{s}");

    // Waiting for a retry: every attempt answered 451.
    smtp.set_script(Script::ok().on(Phase::Mail, Action::reply(451, "try later")));
    let attempted = || async {
        while smtp.commands(Phase::Mail) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    send_then_cancel(d.peer(), msg("deferred", json!({})), attempted()).await;
    let s = finished(newest_finished(d.peer(), &seen).await, &mut seen);
    assert_eq!(s["status"], "cancelled", "{s}");
    assert!(
        !s["attempts"].as_array().unwrap().is_empty(),
        "it was tried: {s}"
    );

    // With a key, the message goes on: a retry with the key follows it.
    send_then_cancel(
        d.peer(),
        msg("keyed", json!({"idempotency_key": "k-1"})),
        soon(),
    )
    .await;
    smtp.set_script(Script::ok());
    let retry = send(d.peer(), msg("keyed", json!({"idempotency_key": "k-1"}))).await;
    assert_eq!(
        retry.value().unwrap()["idempotent_replay"],
        true,
        "{retry:?}"
    );
    let keyed = retry.message_id().unwrap().to_string();
    assert_eq!(settled(d.peer(), &keyed, LIMIT).await["status"], "sent");
    seen.push(keyed.clone());

    // Only the keyed message went out, once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ids: Vec<String> = smtp
        .delivered()
        .iter()
        .filter_map(|r| r.message_id.clone())
        .collect();
    assert_eq!(
        ids,
        [format!("<{keyed}>")],
        "only the keyed message is sent"
    );
    for id in &seen[..2] {
        assert_eq!(status_of(d.peer(), id).await["status"], "cancelled");
    }

    // The relay has its final "." (and never answers): the delivery goes on,
    // and ends `unknown`, never `cancelled`.
    smtp.set_script(Script::ok().on(Phase::AfterDot, Action::Hang));
    let dotted = || async {
        while smtp.received().len() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    send_then_cancel(d.peer(), msg("dotted", json!({})), dotted()).await;
    let s = newest_finished(d.peer(), &seen).await;
    assert_eq!(s["status"], "unknown", "{s}");
    d.stop().await;
}

/// Each stored message's status, by its one recipient, once those of
/// `tag` are all `cancelled` or `sent` but the keyed one (or 15 s have
/// passed).
async fn batch_states(
    peer: &Peer<RoleClient>,
    tag: &str,
) -> std::collections::HashMap<String, String> {
    let start = std::time::Instant::now();
    loop {
        let states: std::collections::HashMap<String, String> = harness::list_all(peer, 100)
            .await
            .iter()
            .filter_map(|m| {
                let to = m["recipients"][0].as_str()?;
                let st = m["status"].as_str()?;
                to.starts_with(&format!("{tag}+"))
                    .then(|| (to.to_owned(), st.to_owned()))
            })
            .collect();
        let done = states
            .iter()
            .all(|(to, st)| to.contains("keyed") || st == "cancelled" || st == "sent");
        if (done && !states.is_empty()) || start.elapsed() > Duration::from_secs(15) {
            return states;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `send_batch` that waits, cancelled by its client, cancels its messages
/// as a cancelled `send_email` does: those in a round and those waiting for
/// a round slot, whether the batch was stored in one write or, over 4 MiB,
/// as it was composed (then delivered by the runner's rounds). A message
/// with an idempotency key goes on and is sent once; nothing else reaches
/// the sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_its_client_cancels_cancels_its_messages_but_the_keyed_ones() {
    cancel_a_batch("small", "a short body\n".into()).await;
    cancel_a_batch("large", long_body(15_000)).await;
}

/// Six messages to `tag+i@example.org` with `body`, the last with a key;
/// two round slots, each held by a relay silent after connecting, while
/// the others wait for one; the call cancelled then.
async fn cancel_a_batch(tag: &str, body: String) {
    const N: usize = 6;
    let script = Script::ok().on(Phase::Greeting, Action::Hang);
    let (smtp, _dir, _cfg, d, mut args) = waiting_batch(script, "8s", 2, tag, N).await;
    let keyed = format!("{tag}+keyed@example.org");
    args["defaults"]["body"] = json!(body);
    args["messages"][N - 1] = json!({"to": [keyed], "idempotency_key": tag});
    let connected = || async {
        support::wait_until(|| smtp.connections() >= 2, LIMIT).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    call_then_cancel(d.peer(), "send_batch", args, connected()).await;
    let states = batch_states(d.peer(), tag).await;
    assert_eq!(states.len(), N, "{states:?}");
    for (to, st) in &states {
        if *to != keyed {
            assert_eq!(st, "cancelled", "{to}: {states:?}");
        }
    }

    // The keyed message goes on, and is the only one sent.
    smtp.set_script(Script::ok());
    let sent = support::wait_until(|| !smtp.delivered().is_empty(), LIMIT).await;
    assert!(sent, "{keyed} was never sent");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let to: Vec<String> = smtp
        .delivered()
        .iter()
        .flat_map(|r| r.rcpt_to.clone())
        .collect();
    assert_eq!(to, [keyed]);
    d.stop().await;
}

/// A waiting batch cancelled after one of its messages was deferred (its
/// round over, its next retry an hour away) and while another is in a
/// round: both are cancelled, the deferred one without waiting for its
/// retry, and nothing reaches the sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_batch_cancels_its_deferred_message_too() {
    let script = Script::ok()
        .on_rcpt("deferred+0@example.org", Action::reply(451, "4.2.0 later"))
        .on_rcpt("deferred+1@example.org", Action::Hang);
    let smtp = FaultSmtp::start(script).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_toml(dir.path(), smtp.port(), "")
        .replace("retry_base = \"300ms\"", "retry_base = \"1h\"")
        .replace("retry_max = \"1s\"", "retry_max = \"1h\"")
        .replace(
            "send_deadline = \"8s\"",
            "send_deadline = \"8s\"\nmax_in_flight = 2",
        );
    let d = Daemon::start(dir.path(), &cfg).await;
    let args = common::batch_args("deferred", 2, json!({"wait": true}));
    let first = async {
        assert!(support::wait_until(|| smtp.connections() >= 2, LIMIT).await);
        // The 451 ends the first message's round: it is queued again.
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    call_then_cancel(d.peer(), "send_batch", args, first).await;
    let states = batch_states(d.peer(), "deferred").await;
    assert_eq!(states.len(), 2, "{states:?}");
    assert!(states.values().all(|st| st == "cancelled"), "{states:?}");
    let listed = harness::list_all(d.peer(), 100).await;
    let deferred = listed
        .iter()
        .find(|m| m["recipients"][0] == "deferred+0@example.org")
        .unwrap();
    let s = status_of(d.peer(), deferred["message_id"].as_str().unwrap()).await;
    let tried: Vec<&Value> = s["attempts"].as_array().unwrap().iter().collect();
    assert!(
        tried.len() == 1 && tried[0]["code"] == 451,
        "deferred once before the cancel: {s}"
    );
    assert!(smtp.delivered().is_empty());
    d.stop().await;
}

/// Mail that finds its relay backing off comes back when the backoff ends,
/// not at its own next retry (half an hour to an hour here): a new message
/// whose call waits, whose first round tried no relay; a deferred one an
/// operator retried while the relay still backed off, its retries started
/// over; and a new one whose call does not wait. While every relay backs
/// off the runner polls once a second, so the last two have at most one
/// round (which tries no relay) before then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_that_finds_its_relay_backing_off_comes_back_when_the_backoff_ends() {
    let smtp =
        FaultSmtp::start(Script::ok().on(Phase::Mail, Action::reply(451, "try later"))).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_toml(dir.path(), smtp.port(), "")
        .replace("retry_base = \"300ms\"", "retry_base = \"1h\"")
        .replace("retry_max = \"1s\"", "retry_max = \"1h\"")
        .replace("backoff_base = \"50ms\"", "backoff_base = \"2s\"")
        .replace("backoff_max = \"200ms\"", "backoff_max = \"2s\"");
    let d = Daemon::start(dir.path(), &cfg).await;
    let first = send(d.peer(), msg("first", json!({}))).await;
    assert_eq!(first.status(), Some("queued"), "{first:?}");
    let first = first.message_id().unwrap().to_string();

    // The relay backs off for a second or two after the 451. The operator
    // retries the deferred message within that time, and a new message
    // comes in: neither is tried until the backoff ends.
    smtp.set_script(Script::ok());
    let (code, out, err) = common::queue_cmd(dir.path(), &["retry", &first]);
    assert_eq!(code, Some(0), "{out}{err}");
    let third = send(d.peer(), msg("third", json!({"wait": false}))).await;
    assert_eq!(third.status(), Some("queued"), "{third:?}");
    let third = third.message_id().unwrap().to_string();
    let second = send(d.peer(), msg("second", json!({}))).await;
    // The call waits (send_deadline, 8 s) for the round after the backoff.
    assert_eq!(second.status(), Some("sent"), "{second:?}");
    let second = second.message_id().unwrap().to_string();
    let first = settled(d.peer(), &first, LIMIT).await;
    assert_eq!(first["status"], "sent", "{first}");
    let codes: Vec<&Value> = first["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["code"])
        .collect();
    assert_eq!(codes, [451, 250], "{first}");
    let queued = |s: &Value| {
        s["history"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["status"] == "queued")
            .count()
    };
    // Accepted, deferred by the 451, retried; then at most one round that
    // found the relay backing off.
    assert!(matches!(queued(&first), 3 | 4), "{first}");
    let third = settled(d.peer(), &third, LIMIT).await;
    assert_eq!(third["status"], "sent", "{third}");
    assert!(matches!(queued(&third), 1 | 2), "{third}");
    let second = status_of(d.peer(), &second).await;
    assert_eq!(
        queued(&second),
        2,
        "accepted, then no relay tried: {second}"
    );
    let subjects: Vec<String> = smtp.received().iter().filter_map(subject_of).collect();
    assert_eq!(subjects.len(), 3, "{subjects:?}");
    d.stop().await;
}

/// While every relay backs off for long (30 s here), the queue claims no
/// mail but still expires what waited past `max_age` (2 s): a message
/// deferred by the relay's failure and one accepted during the backoff end
/// `expired` within seconds, not when the relay is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_expires_on_time_while_every_relay_backs_off() {
    let smtp = FaultSmtp::start(Script::ok().on(Phase::Greeting, Action::Close)).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_toml(dir.path(), smtp.port(), "max_age = \"2s\"")
        .replace("backoff_base = \"50ms\"", "backoff_base = \"30s\"")
        .replace("backoff_max = \"200ms\"", "backoff_max = \"30s\"")
        .replace("probe_interval = \"200ms\"", "probe_interval = \"30s\"");
    let d = Daemon::start(dir.path(), &cfg).await;
    let first = send(d.peer(), msg("before", json!({"wait": false}))).await;
    assert_eq!(first.status(), Some("queued"), "{first:?}");
    let first = first.message_id().unwrap().to_string();
    assert!(
        support::wait_until(|| smtp.connections() >= 1, LIMIT).await,
        "the relay was never tried"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let during = send(d.peer(), msg("during", json!({"wait": false}))).await;
    assert_eq!(during.status(), Some("queued"), "{during:?}");
    let during = during.message_id().unwrap().to_string();
    for id in [&first, &during] {
        let s = settled(d.peer(), id, Duration::from_secs(8)).await;
        assert_eq!(s["status"], "expired", "{s}");
    }
    assert!(smtp.received().is_empty());
    d.stop().await;
}

/// A message whose next retry would fall after `max_age` is tried once more
/// just before `max_age` ends (a second before, room for the runner to claim
/// it), not expired at once: it has the whole of `max_age`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_retried_until_its_max_age_ends() {
    let smtp =
        FaultSmtp::start(Script::ok().on(Phase::Mail, Action::reply(451, "try later"))).await;
    let dir = tempfile::tempdir().unwrap();
    // The first retry (5 to 10 s) falls after max_age (4 s).
    let cfg = config_toml(dir.path(), smtp.port(), "max_age = \"4s\"").replace(
        "retry_base = \"300ms\"\nretry_max = \"1s\"",
        "retry_base = \"10s\"\nretry_max = \"10s\"",
    );
    let d = Daemon::start(dir.path(), &cfg).await;
    let c = send(d.peer(), msg("slow", json!({"wait": false}))).await;
    assert_eq!(c.status(), Some("queued"), "{c:?}");
    let id = c.message_id().unwrap().to_string();
    let s = settled(d.peer(), &id, Duration::from_secs(10)).await;
    assert_eq!(s["status"], "expired", "{s}");
    let at = |v: &Value| v.as_str().unwrap().parse::<jiff::Timestamp>().unwrap();
    let queued = at(&s["queued_at"]);
    let attempts = s["attempts"].as_array().unwrap();
    assert_eq!(
        attempts.len(),
        2,
        "the first try, and one before max_age ends: {s}"
    );
    let last = at(&attempts[1]["at"]).duration_since(queued);
    assert!(
        last >= jiff::SignedDuration::from_millis(2_900)
            && last < jiff::SignedDuration::from_secs(4),
        "the last try {last:?} after acceptance: {s}"
    );
    assert!(smtp.delivered().is_empty(), "nothing got through");
    d.stop().await;
}

/// `send_at` in the future: `scheduled` at once, nothing before the time,
/// one copy after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_at_waits_for_its_time() {
    let (smtp, _dir, _cfg, d) = setup(Script::ok(), "").await;
    let c = send(d.peer(), msg("later", json!({"send_at": "2s"}))).await;
    assert_eq!(c.status(), Some("scheduled"), "{c:?}");
    let id = c.message_id().unwrap().to_string();
    let due = c.value().unwrap()["next_attempt_at"]
        .as_str()
        .unwrap()
        .to_string();
    let due: jiff::Timestamp = due.parse().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(smtp.received().is_empty(), "sent before its time");
    let s = settled(d.peer(), &id, Duration::from_secs(10)).await;
    assert_eq!(s["status"], "sent", "{s}");
    let sent_at: jiff::Timestamp = s["attempts"][0]["at"].as_str().unwrap().parse().unwrap();
    assert!(sent_at >= due, "sent at {sent_at}, due {due}");
    assert_eq!(smtp.received().len(), 1);
    // Dated when it was due to go out, not when it was accepted.
    let data = String::from_utf8_lossy(&smtp.received()[0].data).into_owned();
    let date = data
        .lines()
        .find_map(|l| l.strip_prefix("Date: "))
        .unwrap_or_else(|| panic!("no Date header:\n{data}"));
    let date = jiff::fmt::rfc2822::parse(date).unwrap().timestamp();
    assert!(
        date <= due && due.duration_since(date) < jiff::SignedDuration::from_secs(1),
        "Date: {date}, due {due}"
    );

    // Bad values are refused, naming the field, and nothing is queued.
    for (args, field) in [
        (json!({"send_at": "next tuesday"}), "send_at"),
        (json!({"send_at": "400d"}), "send_at"),
        // Past what the clock can hold, and past the dates RFC 3339 parsers
        // take: refused like any other, and the daemon goes on serving.
        (json!({"send_at": "500000000000years"}), "send_at"),
        (json!({"send_at": "9999-12-31T23:59:59Z"}), "send_at"),
        (json!({"idempotency_key": ""}), "idempotency_key"),
        (json!({"idempotency_key": "a\u{7}b"}), "idempotency_key"),
        (
            json!({"idempotency_key": "x".repeat(201)}),
            "idempotency_key",
        ),
    ] {
        let c = send(d.peer(), msg("bad", args.clone())).await;
        assert_eq!(c.error_code(), Some("invalid_input"), "{args}: {c:?}");
        assert_eq!(c.value().unwrap()["error"]["field"], field, "{args}");
    }
    let c = send(d.peer(), msg("bad", json!({"wait": "yes"}))).await;
    assert_eq!(c.error_code(), Some("invalid_input"), "{c:?}");
    assert_eq!(c.value().unwrap()["error"]["field"], "wait", "{c:?}");
    let list = call(d.peer(), "list", "list_messages", json!({}), LIMIT).await;
    assert_eq!(
        list.value().unwrap()["messages"].as_array().unwrap().len(),
        1
    );
    d.stop().await;
}

/// More mail due at once than one poll of the store takes (256): every
/// message is delivered exactly once, through polls that follow each other
/// as rounds end, and each ends `sent`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_larger_than_a_poll_is_delivered_once_each() {
    const N: usize = 700;
    let (smtp, _dir, _cfg, d) = setup(Script::ok(), "").await;
    let messages: Vec<Value> = (0..N)
        .map(|i| json!({"to": [format!("rcpt+{i}@example.org")]}))
        .collect();
    let c = call(
        d.peer(),
        "backlog",
        "send_batch",
        json!({
            "defaults": {"subject": "backlog", "body": "due at once"},
            "messages": messages,
            "send_at": "2s",
            "wait": false,
        }),
        LIMIT,
    )
    .await;
    let out = c.value().unwrap_or_else(|| panic!("{c:?}")).clone();
    assert_eq!(out["summary"]["scheduled"], N, "{out}");
    let ids: Vec<String> = out["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["message_id"].as_str().unwrap().to_string())
        .collect();
    delivered_once_each(&smtp, &ids).await;
    for id in ids.iter().step_by(50) {
        let s = settled(d.peer(), id, LIMIT).await;
        assert_eq!(s["status"], "sent", "{s}");
    }
    d.stop().await;
}

/// A body of `lines` short lines of 60 bytes, sent as it is (7bit).
fn long_body(lines: usize) -> String {
    "a line of a long letter, short enough to be sent as it is.\n".repeat(lines)
}

/// Waits (up to 60 s) until the sink has as many messages as `ids`, and a
/// moment more for any late copy; then each of `ids` is there exactly
/// once, and nothing else.
/// Checks message `id`'s final `status` against its copies at the sink
/// (`sent`: exactly one; `unknown`, cut after its final ".": at most one)
/// and counts it; any other state fails the test.
fn count_final(
    id: &str,
    status: Option<&str>,
    seen: &std::collections::HashMap<String, usize>,
    sent: &mut usize,
    unknown: &mut usize,
) {
    let n = seen.get(id).copied().unwrap_or(0);
    match status {
        Some("sent") => {
            *sent += 1;
            assert_eq!(n, 1, "{id}: sent, {n} copies at the sink");
        }
        Some("unknown") => {
            *unknown += 1;
            assert!(n <= 1, "{id}: unknown, {n} copies at the sink");
        }
        other => panic!("{id}: stored, now {other:?}"),
    }
}

/// Whether `get_smtp_status`'s answer `status` shows nothing queued or
/// being sent.
fn nothing_to_send(status: &Value) -> bool {
    let counts = &status["queue"]["counts"];
    counts["queued"] == 0 && counts["sending"] == 0
}

/// No message reached the sink twice, answered or not, and none that no
/// call asked for: each subject starts with `asked`.
fn only_once_and_only_asked(
    received: &[Received],
    seen: &std::collections::HashMap<String, usize>,
    asked: &str,
) {
    for (id, n) in seen {
        assert_eq!(*n, 1, "{id} reached the sink {n} times");
    }
    for r in received {
        let subject = subject_of(r).unwrap_or_default();
        assert!(
            subject.starts_with(asked),
            "unasked-for message {subject:?}"
        );
    }
}

/// The message ids of calls that must each have been answered `queued`.
fn queued_ids(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .map(|c| {
            assert_eq!(c.status(), Some("queued"), "{c:?}");
            c.message_id().unwrap().to_string()
        })
        .collect()
}

/// Each message the sink received (`seen`: its copies by id) arrived once
/// and is one of the `listed` stored messages.
fn each_at_the_sink_once_and_stored(
    seen: &std::collections::HashMap<String, usize>,
    listed: &[Value],
) {
    for (id, n) in seen {
        assert_eq!(*n, 1, "{id} reached the sink {n} times");
        assert!(
            listed.iter().any(|m| m["message_id"] == id.as_str()),
            "{id} at the sink but not stored"
        );
    }
}

/// Every stored message, listed once none is `queued` or `sending` any
/// more (or once `limit` passed).
async fn listed_when_final(peer: &Peer<RoleClient>, limit: Duration) -> Vec<Value> {
    let until = std::time::Instant::now() + limit;
    loop {
        let listed = harness::list_all(peer, 100).await;
        let waiting = listed
            .iter()
            .any(|m| matches!(m["status"].as_str(), Some("queued" | "sending")));
        if !waiting || std::time::Instant::now() > until {
            return listed;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A daemon whose relay follows `script`, with `send_deadline` and
/// `max_in_flight` as given, and the arguments of a waiting `send_batch` of
/// `n` messages to `tag+i@example.org`.
async fn waiting_batch(
    script: Script,
    deadline: &str,
    in_flight: usize,
    tag: &str,
    n: usize,
) -> (FaultSmtp, tempfile::TempDir, String, Daemon, Value) {
    let smtp = FaultSmtp::start(script).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_toml(dir.path(), smtp.port(), "").replace(
        "send_deadline = \"8s\"",
        &format!("send_deadline = \"{deadline}\"\nmax_in_flight = {in_flight}"),
    );
    let d = Daemon::start(dir.path(), &cfg).await;
    let messages: Vec<Value> = (0..n)
        .map(|i| json!({"to": [format!("{tag}+{i}@example.org")]}))
        .collect();
    let args = json!({"defaults": {"subject": tag, "body": format!("a {tag} batch\n")},
                      "messages": messages, "wait": true});
    (smtp, dir, cfg, d, args)
}

async fn delivered_once_each(smtp: &FaultSmtp, ids: &[String]) {
    let n = ids.len();
    support::wait_until(|| smtp.received().len() >= n, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = copies(&smtp.received());
    for id in ids {
        assert_eq!(seen.get(id), Some(&1), "{id} at the sink");
    }
    assert_eq!(seen.len(), n, "no message nobody asked for");
}

/// A backlog of large messages (80 of 1 MiB, due at once) is loaded a
/// part at a time, within the bytes the runner's polls may hold (64 MiB),
/// and the rounds that end start the next part: every message arrives
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_large_messages_is_delivered_once_each() {
    const N: usize = 80;
    let (smtp, _dir, _cfg, d) = setup(Script::ok(), "").await;
    let body = long_body(17_500);
    let mut ids = Vec::new();
    // Eight to a batch: a batch's messages stay within max_message_bytes.
    for first in (0..N).step_by(8) {
        let messages: Vec<Value> = (first..first + 8)
            .map(|i| json!({"to": [format!("large+{i}@example.org")]}))
            .collect();
        let c = call(
            d.peer(),
            "large",
            "send_batch",
            json!({
                "defaults": {"subject": "large", "body": body},
                "messages": messages,
                "send_at": "4s",
                "wait": false,
            }),
            LIMIT,
        )
        .await;
        let out = c.value().unwrap_or_else(|| panic!("{c:?}")).clone();
        assert_eq!(out["summary"]["scheduled"], 8, "{}", out["summary"]);
        for r in out["results"].as_array().unwrap() {
            ids.push(r["message_id"].as_str().unwrap().to_string());
        }
    }
    delivered_once_each(&smtp, &ids).await;
    assert!(smtp.received().iter().all(|r| r.data.len() > 1_000_000));
    d.stop().await;
}

/// A burst of large `wait: false` calls while the relay holds every
/// session at MAIL: the runner keeps what fits in its 64 MiB, the rest
/// waits in the store for the polls; once the relay answers, every message
/// answered `queued` arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_large_calls_beyond_the_runners_bytes_is_delivered_once_each() {
    const N: usize = 90;
    let (smtp, _dir, _cfg, d) = setup(Script::ok().on(Phase::Mail, Action::Hang), "").await;
    let body = long_body(17_500);
    let calls = burst(d.peer(), "large", N, 16, LIMIT, move |i| {
        json!({"to": format!("large+{i}@example.org"), "subject": "large",
               "body": body.clone(), "wait": false})
    })
    .join()
    .await;
    let ids = queued_ids(&calls);
    assert!(smtp.received().is_empty());
    smtp.set_script(Script::ok());
    delivered_once_each(&smtp, &ids).await;
    d.stop().await;
}

/// A waiting batch with more messages than round slots: the message whose
/// round hangs holds the only slot past the deadline, so the others never
/// get one. Each is answered `queued` (stored, never a later state it did
/// not reach), and the runner then delivers every one of them once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_batch_beyond_its_round_slots_is_answered_queued_and_delivered_once_each() {
    const N: usize = 6;
    let script = Script::ok().on_share(Phase::Mail, Action::Hang, Share::FirstN(1));
    let (smtp, _dir, _cfg, d, args) = waiting_batch(script, "2s", 1, "slots", N).await;
    let c = call(d.peer(), "batch", "send_batch", args, LIMIT).await;
    let v = c.value().unwrap_or_else(|| panic!("{c:?}"));
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), N);
    let ids: Vec<String> = results
        .iter()
        .map(|r| {
            assert_eq!(r["status"], "queued", "{r}");
            r["message_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(v["summary"]["queued"], json!(N), "{v}");
    delivered_once_each(&smtp, &ids).await;
    for id in &ids {
        assert_eq!(settled(d.peer(), id, LIMIT).await["status"], "sent", "{id}");
    }
    d.stop().await;
}

/// A waiting batch (under the 4 MiB a batch holds) killed with SIGKILL while
/// its rounds run: some messages delivered, some cut after their final "."
/// (the server never answers every tenth), the rest waiting for one of the
/// four round slots. The batch was stored whole before any round began, so
/// the restarted daemon finishes it: each message at the sink once, or
/// `unknown` and there at most once, and nothing that was not stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_batch_killed_mid_way_is_finished_once_each_after_a_restart() {
    const N: usize = 120;
    let script = Script::ok().on_share(Phase::AfterDot, Action::Hang, Share::EveryNth(10));
    let (smtp, dir, cfg, d, args) = waiting_batch(script, "60s", 4, "waiting", N).await;
    let peer = d.peer().clone();
    let pending =
        tokio::spawn(async move { call(&peer, "batch", "send_batch", args, LIMIT).await });
    // Kill once a third of the batch reached the server, with rounds still
    // running (each hung one holds its slot for the relay's 3 s timeout).
    let reached = support::wait_until(|| smtp.received().len() >= N / 3, LIMIT).await;
    assert!(reached, "the batch never reached {} messages", N / 3);
    d.kill9().await;
    let told = pending.await.unwrap();
    assert!(told.value().is_none(), "answered before the kill: {told:?}");
    let before = smtp.received().len();
    assert!(
        before < N,
        "the whole batch reached the server before the kill"
    );

    smtp.set_script(Script::ok());
    let d = Daemon::start(dir.path(), &cfg).await;
    let listed = listed_when_final(d.peer(), Duration::from_secs(60)).await;
    assert_eq!(
        listed.len(),
        N,
        "the batch was stored whole before its rounds"
    );
    let received = smtp.received();
    let seen = copies(&received);
    let (mut sent, mut unknown) = (0, 0);
    for m in &listed {
        let id = m["message_id"].as_str().unwrap();
        count_final(id, m["status"].as_str(), &seen, &mut sent, &mut unknown);
    }
    assert!(unknown > 0, "no message was cut after its final \".\"");
    each_at_the_sink_once_and_stored(&seen, &listed);
    eprintln!(
        "waiting batch of {N}: killed with {before} at the server; after the restart \
         {sent} sent exactly once, {unknown} unknown; {} at the sink, 0 duplicated",
        received.len()
    );
    d.stop().await;
}

/// A waiting batch its client cancels, killed with SIGKILL once its first
/// message shows `cancelled`, while the call still waits for the rounds a
/// relay is committing (the server never answers every tenth final "."):
/// after the restart, each message cancelled never reached the sink, each
/// other one is delivered once (or is `unknown`, cut after its final ".",
/// and there at most once), and nothing reached the sink that was not
/// stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_batch_killed_before_its_call_ends_sends_nothing_cancelled_and_the_rest_once() {
    const N: usize = 120;
    let script = Script::ok().on_share(Phase::AfterDot, Action::Hang, Share::EveryNth(10));
    let (smtp, dir, cfg, d, args) = waiting_batch(script, "60s", 4, "cxl", N).await;
    let reached = || async {
        support::wait_until(|| smtp.received().len() >= N / 4, LIMIT).await;
    };
    call_then_cancel(d.peer(), "send_batch", args, reached()).await;
    let cancelling = support::wait_until_async(
        || async {
            let listed = call(
                d.peer(),
                "list",
                "list_messages",
                json!({"status": "cancelled", "limit": 1}),
                LIMIT,
            )
            .await;
            listed
                .value()
                .is_some_and(|v| v["messages"].as_array().is_some_and(|m| !m.is_empty()))
        },
        LIMIT,
    )
    .await;
    assert!(cancelling, "no message was cancelled");
    d.kill9().await;
    let before = smtp.received().len();

    smtp.set_script(Script::ok());
    let d = Daemon::start(dir.path(), &cfg).await;
    let listed = listed_when_final(d.peer(), Duration::from_secs(60)).await;
    assert_eq!(listed.len(), N, "the batch was stored whole");
    let received = smtp.received();
    let seen = copies(&received);
    let (mut cancelled, mut sent, mut unknown) = (0, 0, 0);
    for m in &listed {
        let id = m["message_id"].as_str().unwrap();
        if m["status"] == "cancelled" {
            cancelled += 1;
            assert!(!seen.contains_key(id), "{id}: cancelled, yet at the sink");
        } else {
            count_final(id, m["status"].as_str(), &seen, &mut sent, &mut unknown);
        }
    }
    assert!(cancelled > 0);
    each_at_the_sink_once_and_stored(&seen, &listed);
    eprintln!(
        "cancelled batch of {N}: killed with {before} at the server; after the restart \
         {cancelled} cancelled and never sent, {sent} sent exactly once, {unknown} unknown; \
         {} at the sink, 0 duplicated",
        received.len()
    );
    d.stop().await;
}

/// A batch over the 4 MiB a batch holds is written into the store as it is
/// composed, in one transaction. Killed with SIGKILL before that
/// transaction opens, while it is open, and after the answer, the restarted
/// daemon delivers each batch whole, each message once, or none of it; a
/// batch answered `queued` is delivered whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_killed_mid_way_is_delivered_whole_or_not_at_all() {
    const N: usize = 90;
    let (smtp, dir, cfg, d) = setup(Script::ok(), "").await;
    // About 100 KiB a message in short lines, 9.3 MB in all: under the
    // default max_message_bytes (10 MiB), past the 4 MiB a batch holds
    // from about its 41st message on.
    let body = long_body(1706);
    let batch = |tag: &str| {
        let messages: Vec<Value> = (0..N)
            .map(|i| json!({"to": [format!("{tag}+{i}@example.org")]}))
            .collect();
        json!({"defaults": {"subject": tag, "body": body}, "messages": messages, "wait": false})
    };
    let at_sink = |tag: &str| {
        let prefix = format!("{tag}+");
        smtp.received()
            .iter()
            .filter(|r| r.rcpt_to.iter().any(|t| t.starts_with(&prefix)))
            .count()
    };
    // How long a whole call takes here, to kill at points inside one.
    let started = std::time::Instant::now();
    let c = call(d.peer(), "whole", "send_batch", batch("whole"), LIMIT).await;
    let took = started.elapsed();
    assert_eq!(
        c.value().map(|v| v["summary"]["queued"].clone()),
        Some(json!(N)),
        "{c:?}"
    );
    assert!(support::wait_until(|| at_sink("whole") == N, LIMIT).await);

    let mut d = d;
    let mut told = Vec::new();
    for (k, fraction) in [0.3, 0.6, 0.75, 0.9, 1.5].into_iter().enumerate() {
        let tag = format!("kill{k}");
        let peer = d.peer().clone();
        let args = batch(&tag);
        let pending =
            tokio::spawn(async move { call(&peer, "batch", "send_batch", args, LIMIT).await });
        tokio::time::sleep(took.mul_f64(fraction)).await;
        d.kill9().await;
        let c = pending.await.unwrap();
        let queued = c
            .value()
            .is_some_and(|v| v["summary"]["queued"] == json!(N));
        told.push((tag, fraction, queued));
        d = Daemon::start(dir.path(), &cfg).await;
    }
    // The restarted daemon delivers what it recovered.
    let listed = listed_when_final(d.peer(), LIMIT).await;
    let seen = copies(&smtp.received());
    for (tag, fraction, queued) in told {
        let prefix = format!("{tag}+");
        let stored: Vec<&Value> = listed
            .iter()
            .filter(|m| m["recipients"][0].as_str().unwrap().starts_with(&prefix))
            .collect();
        let n = at_sink(&tag);
        let unknown = stored.iter().filter(|m| m["status"] == "unknown").count();
        eprintln!(
            "killed at {fraction} of a call: answered queued: {queued}; stored {} of {N}; at the sink {n}; unknown {unknown}",
            stored.len()
        );
        // Whole or nothing.
        assert!(
            stored.is_empty() || stored.len() == N,
            "{tag}: {} of {N} stored, a part of a batch",
            stored.len()
        );
        if queued {
            assert_eq!(stored.len(), N, "{tag} was answered queued");
        }
        if stored.is_empty() {
            assert_eq!(n, 0, "{tag}: delivered but not stored");
        }
        // Each stored message once, or `unknown` (cut after its final
        // "."): at most once.
        for m in &stored {
            let id = m["message_id"].as_str().unwrap();
            let copies = seen.get(id).copied().unwrap_or(0);
            match m["status"].as_str() {
                Some("sent") => assert_eq!(copies, 1, "{id}: {copies} copies"),
                Some("unknown") => assert!(copies <= 1, "{id}: {copies} copies"),
                other => panic!("{id} ended {other:?}"),
            }
        }
        let stored_at_sink = stored
            .iter()
            .filter(|m| seen.contains_key(m["message_id"].as_str().unwrap()))
            .count();
        assert_eq!(n, stored_at_sink, "{tag}: a message nobody asked for");
    }
    d.stop().await;
}

/// `list_messages` pages newest first; `get_smtp_status` shows the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_messages_pages_newest_first() {
    let (_smtp, _dir, _cfg, d) = setup(Script::ok(), "").await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let c = send(d.peer(), msg(&format!("list {i}"), json!({}))).await;
        ids.push(c.message_id().unwrap().to_string());
    }
    let seen: Vec<String> = harness::list_all(d.peer(), 3)
        .await
        .iter()
        .map(|m| m["message_id"].as_str().unwrap().to_string())
        .collect();
    ids.reverse();
    assert_eq!(seen, ids);
    let sent = call(
        d.peer(),
        "list",
        "list_messages",
        json!({"status": "queued"}),
        LIMIT,
    )
    .await;
    assert!(
        sent.value().unwrap()["messages"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let bad = call(
        d.peer(),
        "list",
        "list_messages",
        json!({"limit": 101}),
        LIMIT,
    )
    .await;
    assert_eq!(bad.error_code(), Some("invalid_input"));
    let st = harness::status(d.peer()).await;
    assert_eq!(st["queue"]["store"], "sqlite");
    assert_eq!(st["queue"]["durable"], true);
    assert_eq!(st["queue"]["counts"]["sent"], 7);
    d.stop().await;
}

/// A second daemon on the same store refuses to start, naming the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_held_by_another_daemon_is_a_start_up_error() {
    let (_smtp, dir, cfg, d) = setup(Script::ok(), "").await;
    let out = start_failure(dir.path(), &cfg);
    assert!(out.contains("held by another mailmux daemon"), "{out}");
    assert!(out.contains("queue.db"), "{out}");
    // The first daemon still serves.
    let c = send(d.peer(), msg("still here", json!({}))).await;
    assert_eq!(c.status(), Some("sent"));
    d.stop().await;
}

/// Runs the binary expecting it to refuse to start; returns its stderr.
fn start_failure(dir: &Path, config: &str) -> String {
    start_failure_as(
        dir,
        config,
        std::process::Command::new(env!("CARGO_BIN_EXE_mailmux")),
    )
}

/// [`start_failure`] with `mailmux` started by `command` (as another user).
fn start_failure_as(dir: &Path, config: &str, mut command: std::process::Command) -> String {
    let path = dir.join("second.toml");
    // Written ahead where `dir` is read-only.
    if std::fs::read_to_string(&path).ok().as_deref() != Some(config) {
        std::fs::write(&path, config).unwrap();
    }
    let out = command
        .arg("--config")
        .arg(&path)
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "it started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A store file the daemon's user may not write (mode 0444, the daemon run
/// as `nobody` from a copy of the binary it can read): a start-up error
/// naming the path and the cause, and the queue command, as that user,
/// still lists the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_file_its_user_cannot_write_is_a_start_up_error() {
    use std::os::unix::fs::PermissionsExt;
    let (_smtp, dir, cfg, d) = setup(Script::ok(), "").await;
    let later = send(d.peer(), msg("later", json!({"send_at": "1h"}))).await;
    let id = later.message_id().unwrap().to_string();
    d.stop().await;
    let mode = |path: &Path, m: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(m)).unwrap();
    };
    let bin = dir.path().join("mailmux");
    std::fs::copy(env!("CARGO_BIN_EXE_mailmux"), &bin).unwrap();
    mode(&bin, 0o755);
    mode(dir.path(), 0o777);
    // The store's files are made the owner's only; opened here to every
    // user for reading, as an operator may open them to another.
    for file in ["queue.db", "queue.db-wal", "queue.db-shm"] {
        let path = dir.path().join(file);
        if path.exists() {
            mode(&path, 0o444);
        }
    }
    let as_nobody = || {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin);
        c
    };
    let out = start_failure_as(dir.path(), &cfg, as_nobody());
    assert!(out.contains("queue.db"), "{out}");
    assert!(
        out.contains("read-only") && out.contains("Permission denied"),
        "{out}"
    );
    let listed = as_nobody()
        .arg("--config")
        .arg(dir.path().join("mailmux.toml"))
        .args(["queue", "list"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(text.contains(&id) && text.contains("scheduled"), "{text}");
}

/// A store written by a newer mailmux, and a file that is not a database,
/// are start-up errors that say so.
#[test]
fn a_newer_or_corrupt_store_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_toml(dir.path(), 9, "");
    let db = dir.path().join("queue.db");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
    }
    let out = start_failure(dir.path(), &cfg);
    assert!(out.contains("newer version"), "{out}");
    std::fs::write(&db, b"this is not a database at all, not even close....").unwrap();
    let _ = std::fs::remove_file(dir.path().join("queue.db-wal"));
    let out = start_failure(dir.path(), &cfg);
    assert!(out.contains("queue.db"), "{out}");
    assert!(out.contains("cannot open the queue"), "{out}");
}

/// A small tmpfs the test mounts (it needs root, as CI has), unmounted on
/// drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path) -> Tmpfs {
        Tmpfs::mount_sized(at, "2m")
    }

    fn mount_sized(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir(at).unwrap();
        Tmpfs::run(&["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"], at);
        Tmpfs(at.to_path_buf())
    }

    /// Remounts it read-only (`ro`) or read-write (`rw`).
    fn remount(&self, mode: &str) {
        Tmpfs::run(&["-o", &format!("remount,{mode}")], &self.0);
    }

    fn run(args: &[&str], at: &Path) {
        let ok = std::process::Command::new("mount")
            .args(args)
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount {args:?} needs root (CI runs as root)");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A store on a read-only file system: the daemon refuses to start, naming
/// the path and the cause. The queue command still reads it once a clean
/// stop has merged the write-ahead log (after a crash it says why it cannot),
/// and refuses to change it. Once the file system is writable again the
/// stored message is still there, and nothing was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_store_is_a_start_up_error_and_loses_nothing() {
    let smtp = FaultSmtp::start(Script::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("ro"));
    // A 2 MiB file system: no free space reserve.
    let cfg = config_toml(&fs.0, smtp.port(), "min_free = 0");
    std::fs::write(fs.0.join("second.toml"), &cfg).unwrap();
    let d = Daemon::start(&fs.0, &cfg).await;
    let later = send(d.peer(), msg("later", json!({"send_at": "1h"}))).await;
    assert_eq!(later.status(), Some("scheduled"), "{later:?}");
    let id = later.message_id().unwrap().to_string();
    d.kill9().await;

    // After a crash the log holds the commits; read-only, nobody can merge it.
    fs.remount("ro");
    let out = start_failure(&fs.0, &cfg);
    assert!(out.contains("queue.db"), "{out}");
    assert!(out.contains("read-only"), "{out}");
    let (code, _, err) = common::queue_cmd(&fs.0, &["list"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("never merged"), "{err}");

    // A clean stop leaves the database file whole.
    fs.remount("rw");
    Daemon::start(&fs.0, &cfg).await.stop().await;
    let wal = std::fs::metadata(fs.0.join("queue.db-wal")).map_or(0, |m| m.len());
    assert_eq!(wal, 0, "a clean stop left commits in the log");
    fs.remount("ro");
    let (code, listed, err) = common::queue_cmd(&fs.0, &["list"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        listed.contains(&id) && listed.contains("scheduled"),
        "{listed}"
    );
    let (code, _, err) = common::queue_cmd(&fs.0, &["cancel", &id]);
    assert_ne!(code, Some(0), "a cancel on a read-only store succeeded");
    assert!(err.contains("readonly"), "{err}");

    fs.remount("rw");
    let d = Daemon::start(&fs.0, &cfg).await;
    let st = status_of(d.peer(), &id).await;
    assert_eq!(st["status"], "scheduled", "{st}");
    let c = cancel(d.peer(), &id).await;
    assert_eq!(c.status(), Some("cancelled"), "{c:?}");
    d.stop().await;
    assert!(smtp.received().is_empty(), "a scheduled message was sent");
}

/// A full disk, with no reserve (`queue.min_free = 0`): sends are refused
/// with `queue_unavailable` (never `queued`), `/health`-style status says
/// so, and once there is room again sends work and nothing was lost or
/// doubled. The store lives on a small tmpfs that the test mounts (it needs
/// root, as CI has).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_sends_clearly_and_recovers() {
    let smtp = FaultSmtp::start(Script::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let small = Tmpfs::mount(&dir.path().join("small"));
    let mnt = small.0.clone();

    let cfg = config_toml(&mnt, smtp.port(), "min_free = 0");
    let d = Daemon::start(&mnt, &cfg).await;
    let ok = send(d.peer(), msg("before", json!({}))).await;
    assert_eq!(ok.status(), Some("sent"), "{ok:?}");

    // Fill the disk.
    let filler = mnt.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .stderr(Stdio::null())
        .status();
    let big = "x".repeat(200_000);
    // Calls that answer once stored and calls that wait for the delivery
    // (whose first round begins while the message is being stored).
    let mut refused = Vec::new();
    for i in 0..6 {
        let subject = format!("full {i}");
        let mut a = msg(&subject, json!({"wait": i % 2 == 1}));
        a["body"] = json!(big);
        let c = send(d.peer(), a).await;
        match c.status() {
            Some("queued") | Some("sent") => {}
            _ => {
                assert_eq!(
                    c.error_code(),
                    Some("queue_unavailable"),
                    "{c:?}\n{}",
                    d.logs()
                );
                refused.push((subject, i % 2 == 1));
            }
        }
    }
    assert!(
        refused.iter().any(|(_, wait)| !wait) && refused.iter().any(|(_, wait)| *wait),
        "a full disk refused {refused:?}"
    );
    let st = harness::status(d.peer()).await;
    assert_eq!(st["queue"]["available"], false, "{}", st["queue"]);

    std::fs::remove_file(&filler).unwrap();
    let after = send(d.peer(), msg("after", json!({}))).await;
    assert_eq!(after.status(), Some("sent"), "{after:?}");
    let st = harness::status(d.peer()).await;
    assert_eq!(st["queue"]["available"], true);
    let subjects: Vec<String> = smtp.received().iter().filter_map(subject_of).collect();
    for s in &subjects {
        assert_eq!(subjects.iter().filter(|x| *x == s).count(), 1, "{s} twice");
    }
    assert!(subjects.contains(&"before".to_string()));
    assert!(subjects.contains(&"after".to_string()));
    for (s, _) in &refused {
        assert!(!subjects.contains(s), "{s} was refused and sent");
    }
    d.stop().await;
}

/// Under `queue.min_free`, new mail is refused with `queue_full` (a call
/// that waits, one that does not, a batch), while mail accepted before is
/// still delivered and its outcome stored; status shows the free space, the
/// log says so once, and once there is room again sends work. The store
/// lives on a 16 MiB tmpfs the test mounts (it needs root, as CI has), with
/// a reserve of 8 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_free_space_reserve_new_mail_is_refused_and_accepted_mail_delivered() {
    let smtp = FaultSmtp::start(Script::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount_sized(&dir.path().join("reserve"), "16m");
    let mnt = fs.0.clone();
    let cfg = config_toml(&mnt, smtp.port(), "min_free = 8388608");
    let d = Daemon::start(&mnt, &cfg).await;
    let ok = send(d.peer(), msg("before", json!({}))).await;
    assert_eq!(ok.status(), Some("sent"), "{ok:?}");
    let later = send(d.peer(), msg("accepted", json!({"send_at": "3s"}))).await;
    assert_eq!(later.status(), Some("scheduled"), "{later:?}");
    let later = later.message_id().unwrap().to_string();

    // Leave about 5 MiB free.
    let filler = mnt.join("filler");
    let free_now = |st: &Value| st["queue"]["free_bytes"].as_u64().unwrap();
    let st = harness::status(d.peer()).await;
    assert_eq!(st["queue"]["min_free"], 8_388_608, "{}", st["queue"]);
    let fill = (free_now(&st) - 5 * 1024 * 1024) / 65_536;
    let filled = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=64k", &format!("count={fill}")])
        .arg(format!("of={}", filler.display()))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(filled.success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    for args in [json!({}), json!({"wait": false})] {
        let c = send(d.peer(), msg("refused", args)).await;
        assert_eq!(c.error_code(), Some("queue_full"), "{c:?}");
        let text = c.error_message().unwrap_or_default();
        assert!(text.contains("queue.min_free"), "{text}");
    }
    let b = call(
        d.peer(),
        "batch",
        "send_batch",
        json!({"defaults": {"subject": "refused", "body": "b"},
               "messages": [{"to": ["a@example.org"]}, {"to": ["b@example.org"]}]}),
        LIMIT,
    )
    .await;
    let out = b.value().unwrap();
    for r in out["results"].as_array().unwrap() {
        assert_eq!(r["error"]["code"], "queue_full", "{r}");
    }
    let st = harness::status(d.peer()).await;
    assert!(free_now(&st) < 8 * 1024 * 1024, "{}", st["queue"]);
    assert_eq!(
        st["queue"]["available"], true,
        "the store still takes writes"
    );
    // The message accepted before is delivered, and its outcome stored.
    let s = settled(d.peer(), &later, LIMIT).await;
    assert_eq!(s["status"], "sent", "{s}");

    std::fs::remove_file(&filler).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = send(d.peer(), msg("after", json!({}))).await;
    assert_eq!(after.status(), Some("sent"), "{after:?}");
    let logs = d.logs();
    assert_eq!(
        logs.matches("under queue.min_free: new mail is refused")
            .count(),
        1,
        "{logs}"
    );
    assert!(logs.contains("room again"), "{logs}");
    let subjects: Vec<String> = smtp.received().iter().filter_map(subject_of).collect();
    assert_eq!(subjects, ["before", "accepted", "after"]);
    d.stop().await;
}

/// Builds `tests/queue/fail_fsync.c` into `dir`; returns the library.
fn fsync_shim(dir: &Path) -> std::path::PathBuf {
    let shim = dir.join("fail_fsync.so");
    let built = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&shim)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/queue/fail_fsync.c"
        ))
        .arg("-ldl")
        .status()
        .expect("cc runs");
    assert!(built.success(), "building the fsync shim");
    shim
}

/// The `file` relay writes a message as a maildir delivery does: the file is
/// synced before its rename, so a disk that fails the sync (an injected EIO
/// on the temporary file) gets the message retried, never reported `sent`
/// with nothing durable behind it. Once the disk is healthy the retry
/// writes it, once, readable by its owner only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_relay_reports_sent_only_what_it_made_durable() {
    use std::os::unix::fs::PermissionsExt as _;
    let shim_dir = tempfile::tempdir().unwrap();
    let shim = fsync_shim(shim_dir.path());
    let failing = shim_dir.path().join("failing");
    let suffix = std::path::PathBuf::from(".tmp");
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox");
    let cfg = format!(
        r#"
send_deadline = "2s"
shutdown_grace = "2s"
from_email = "sender@example.org"

[queue]
path = "{db}"
retry_base = "300ms"
retry_max = "500ms"

[[relays]]
name = "outbox"
kind = "file"
dir = "{outbox}"
backoff_base = "50ms"
backoff_max = "200ms"
probe_interval = "200ms"
"#,
        db = dir.path().join("queue.db").display(),
        outbox = outbox.display(),
    );
    let env = [
        ("LD_PRELOAD", shim.as_path()),
        ("FAIL_FSYNC_WHEN", failing.as_path()),
        ("FAIL_FSYNC_SUFFIX", suffix.as_path()),
    ];
    let d = Daemon::start_with(dir.path(), &cfg, (), &env).await;
    let eml = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&outbox)
            .map(|rd| {
                rd.filter_map(|e| Some(e.ok()?.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "eml"))
                    .collect()
            })
            .unwrap_or_default()
    };

    std::fs::write(&failing, "").unwrap();
    let c = send(d.peer(), msg("unsynced", json!({}))).await;
    assert_eq!(c.status(), Some("queued"), "{c:?}");
    let id = c.message_id().unwrap().to_owned();
    let s = status_of(d.peer(), &id).await;
    let text = s["attempts"][0]["text"].as_str().unwrap_or_default();
    assert!(text.contains("cannot write durably"), "{s}");
    assert!(eml().is_empty(), "a file that was not synced was delivered");

    std::fs::remove_file(&failing).unwrap();
    let s = settled(d.peer(), &id, LIMIT).await;
    assert_eq!(s["status"], "sent", "{s}");
    let files = eml();
    assert_eq!(files.len(), 1, "{files:?}");
    let mode = std::fs::metadata(&files[0]).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let text = std::fs::read_to_string(&files[0]).unwrap();
    assert!(text.contains("Subject: unsynced"), "{text}");
    d.stop().await;
}

/// A disk that fails to make a commit durable: SQLite's fsync of its log
/// fails (an injected EIO, `tests/queue/fail_fsync.c`) after the commit's
/// frames were written, so those frames may be replayed at the next start.
/// Every call whose write failed so is told its message may have been
/// stored, never "not accepted"; after a SIGKILL and a restart on a healthy
/// disk, what the sink received agrees with each message's status. The
/// first failing call waits and has no key, so the write that fails is its
/// commit mark, and then the round's end; the next ones take the other
/// path, since the store is known to refuse writes by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_fsync_fails_is_reported_unconfirmed() {
    let shim_dir = tempfile::tempdir().unwrap();
    let shim = fsync_shim(shim_dir.path());
    let failing = shim_dir.path().join("failing");

    let smtp = FaultSmtp::start(Script::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_toml(dir.path(), smtp.port(), "");
    let env = [
        ("LD_PRELOAD", shim.as_path()),
        ("FAIL_FSYNC_WHEN", failing.as_path()),
    ];
    let d = Daemon::start_with(dir.path(), &cfg, (), &env).await;
    let ok = send(d.peer(), msg("before", json!({}))).await;
    assert_eq!(ok.status(), Some("sent"), "{ok:?}");

    std::fs::write(&failing, "").unwrap();
    let mut told = Vec::new();
    for i in 0..4 {
        let subject = format!("failing {i}");
        let c = send(d.peer(), msg(&subject, json!({"wait": i % 2 == 0}))).await;
        assert_eq!(
            c.error_code(),
            Some("queue_unavailable"),
            "{subject}: {c:?}"
        );
        let text = c.error_message().unwrap().to_string();
        assert!(
            text.contains("may have been stored") && !text.contains("not accepted"),
            "{subject}: {text}"
        );
        let id = text
            .split("get_message_status for ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or_else(|| panic!("{subject}: no Message-ID in {text}"))
            .to_string();
        told.push((subject, id));
    }
    d.kill9().await;
    std::fs::remove_file(&failing).unwrap();

    let d = Daemon::start(dir.path(), &cfg).await;
    let mut stored = 0;
    for (subject, id) in &told {
        // Recovery ran before the daemon answered: a message it does not
        // know now was not stored.
        let found = call(
            d.peer(),
            "status",
            "get_message_status",
            json!({ "message_id": id }),
            LIMIT,
        )
        .await;
        let status = match found.error_code() {
            Some("not_found") => Value::Null,
            None => settled(d.peer(), id, LIMIT).await,
            Some(other) => panic!("{subject}: {other}: {found:?}"),
        };
        let copies = smtp
            .received()
            .iter()
            .filter(|r| subject_of(r).as_deref() == Some(subject.as_str()))
            .count();
        match status["status"].as_str() {
            None => assert_eq!(copies, 0, "{subject}: not stored, yet delivered"),
            Some("sent") => {
                stored += 1;
                assert_eq!(copies, 1, "{subject}: {status}");
            }
            Some(other) => panic!("{subject}: {other} after the restart: {status}"),
        }
    }
    eprintln!(
        "fsync failing: {} calls told unconfirmed, {stored} of them stored and sent once at the restart",
        told.len()
    );
    // The last failed commit is still in the log at the kill (each one
    // before it was overwritten by the next commit): the case is real.
    assert!(stored >= 1, "no failed commit was replayed");
    d.stop().await;
}

/// `mailmux send` while a daemon owns the store: without `--no-wait` it
/// refuses and says how; with it, the message is stored for the daemon,
/// which delivers it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_no_wait_hands_a_message_to_the_running_daemon() {
    let (smtp, dir, _cfg, d) = setup(Script::ok(), "").await;
    let cli = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailmux"))
            .arg("--config")
            .arg(dir.path().join("mailmux.toml"))
            .args(["send", "--to", "rcpt@example.org", "--subject", "handed"])
            .args(["--body", "from the command line"])
            .args(extra)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = cli(&[]);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("held by another mailmux daemon"), "{err}");
    assert!(err.contains("--no-wait"), "{err}");
    assert!(smtp.received().is_empty());

    let (code, out, err) = cli(&["--no-wait"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], "queued", "{v}");
    let id = v["message_id"].as_str().unwrap().to_string();
    let s = settled(d.peer(), &id, LIMIT).await;
    assert_eq!(s["status"], "sent", "{s}");
    let subjects: Vec<String> = smtp.received().iter().filter_map(subject_of).collect();
    assert_eq!(subjects, ["handed"]);
    d.stop().await;
}

/// `mailmux queue` on the store while the daemon runs: list, show, cancel,
/// retry (a failed message goes out after the fault is fixed; a sent one is
/// refused), stats and purge.
/// `mailmux queue` with no daemon running: every subcommand works on the
/// store file alone, and what it queued is delivered by the next daemon to
/// start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_command_works_with_the_daemon_stopped() {
    let script = Script::ok().on_rcpt(
        "bounce@example.org",
        Action::reply(550, "5.2.1 mailbox disabled"),
    );
    // Mail outside @example.org is held for an operator's approval.
    let ops_hash: String = <sha2::Sha256 as sha2::Digest>::digest(OPS_TOKEN.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let extra = format!(
        "\n[policy]\nallowed_recipients = [\"@example.org\"]\napproval = \"outside_allowlist\"\n\n[[operators]]\nname = \"ops\"\ntoken_sha256 = \"{ops_hash}\"\n"
    );
    let (smtp, dir, cfg, d) = setup(script, &extra).await;
    let q = |args: &[&str]| common::queue_cmd(dir.path(), args);
    let ops = |args: &[&str]| common::queue_cmd_as(dir.path(), args, Some(OPS_TOKEN));
    let id = |c: &Call| {
        c.value().unwrap()["message_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let failed = send(
        d.peer(),
        msg("bounced", json!({"to": "bounce@example.org"})),
    )
    .await;
    assert_eq!(failed.status(), Some("failed"), "{failed:?}");
    let failed_id = id(&failed);
    let sent_id = id(&send(d.peer(), msg("fine", json!({}))).await);
    let later_id = id(&send(d.peer(), msg("later", json!({"send_at": "1h"}))).await);
    let other_id = id(&send(d.peer(), msg("other", json!({"send_at": "1h"}))).await);
    let held_a = send(d.peer(), msg("held a", json!({"to": "a@elsewhere.net"}))).await;
    assert_eq!(held_a.status(), Some("held"), "{held_a:?}");
    let held_a = id(&held_a);
    let held_b = id(&send(d.peer(), msg("held b", json!({"to": "b@elsewhere.net"}))).await);
    d.stop().await;

    let (code, out, err) = q(&["list", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().count(), 6, "{out}");
    let (code, out, err) = q(&["list", "--json", "--limit", "2"]);
    assert_eq!((code, out.lines().count()), (Some(0), 2), "{out}{err}");
    let (code, _, err) = q(&["list", "--limit", "0"]);
    assert_eq!(code, Some(2), "a limit of 0 is a usage error: {err}");
    assert!(
        err.contains("expected a whole number of at least 1"),
        "{err}"
    );
    let (code, out, err) = q(&["list", "--recipient", "ELSEWHERE.net"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.lines().count() == 2 && out.contains(&held_a) && out.contains(&held_b),
        "{out}"
    );
    let (_, out, _) = q(&["list", "--caller", "local", "--status", "scheduled"]);
    assert!(
        out.lines().count() == 2 && out.contains(&later_id) && out.contains(&other_id),
        "{out}"
    );
    let (_, out, _) = q(&["list", "--caller", "somebody"]);
    assert_eq!(out, "", "another caller has none");
    let (_, out, _) = q(&["list", "--batch", "batch-0000000000000000"]);
    assert_eq!(out, "", "no such batch");
    // Approvals need an operator's token, and a held message.
    let (code, _, err) = q(&["approve", &held_a]);
    assert_eq!(code, Some(2), "no operator token: {err}");
    let (code, out, err) = ops(&["approve", &held_a]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, _, err) = ops(&["approve", &held_a]);
    assert_eq!(code, Some(1), "no longer held: {err}");
    let (code, _, err) = ops(&["approve", &sent_id]);
    assert_eq!(code, Some(1), "{err}");
    let (code, out, err) = ops(&["reject", &held_b]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, _, err) = q(&["retry", &held_b]);
    assert_eq!(code, Some(1), "a rejected message is never retried: {err}");
    let (code, out, _) = q(&["list", "--status", "scheduled"]);
    assert_eq!(code, Some(0));
    assert!(out.contains(&later_id) && !out.contains(&sent_id), "{out}");
    let (code, out, _) = q(&["show", &failed_id]);
    assert_eq!(code, Some(0));
    assert!(out.contains("5.2.1 mailbox disabled"), "{out}");
    let (code, out, _) = q(&["show", &failed_id, "--body"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("body of bounced"), "{out}");
    let (code, _, err) = q(&["cancel", &sent_id]);
    assert_eq!(code, Some(1), "{err}");
    let (code, out, err) = q(&["cancel", &later_id]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, _, err) = q(&["retry", &sent_id]);
    assert_eq!(code, Some(1), "{err}");
    let (code, out, err) = q(&["retry", &failed_id]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, _) = q(&["stats"]);
    assert_eq!(code, Some(0));
    for (state, n) in [
        ("sent", "1"),
        ("queued", "2"),
        ("cancelled", "1"),
        ("scheduled", "1"),
        ("rejected", "1"),
    ] {
        assert!(
            out.lines().any(|l| l.split_whitespace().eq([state, n])),
            "{state} {n}: {out}"
        );
    }
    let (code, out, _) = q(&["purge", "--older-than", "0s"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("purged 3"),
        "sent, cancelled and rejected: {out}"
    );

    // The next daemon delivers the messages the command queued (the retried
    // one and the approved one), and keeps the one still scheduled.
    smtp.set_script(Script::ok());
    let d = Daemon::start(dir.path(), &cfg).await;
    let s = settled(d.peer(), &failed_id, LIMIT).await;
    assert_eq!(s["status"], "sent", "{s}");
    let s = settled(d.peer(), &held_a, LIMIT).await;
    assert_eq!(s["status"], "sent", "{s}");
    assert_eq!(s["decided_by"], "operator ops", "{s}");
    assert_eq!(status_of(d.peer(), &other_id).await["status"], "scheduled");
    assert_eq!(
        status_of(d.peer(), &later_id).await["error"]["code"],
        "not_found",
        "purged"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_command_inspects_and_acts_while_the_daemon_runs() {
    let script = Script::ok().on_rcpt(
        "bounce@example.org",
        Action::reply(550, "5.2.1 mailbox disabled"),
    );
    let (smtp, dir, _cfg, d) = setup(script, "").await;
    let q = |args: &[&str]| common::queue_cmd(dir.path(), args);
    let failed = send(
        d.peer(),
        msg("bounced", json!({"to": "bounce@example.org"})),
    )
    .await;
    assert_eq!(failed.status(), Some("failed"), "{failed:?}");
    let failed_id = failed.value().unwrap()["message_id"]
        .as_str()
        .unwrap()
        .to_string();
    let sent = send(d.peer(), msg("fine", json!({}))).await;
    let sent_id = sent.value().unwrap()["message_id"]
        .as_str()
        .unwrap()
        .to_string();
    let later = send(d.peer(), msg("later", json!({"send_at": "1h"}))).await;
    let later_id = later.value().unwrap()["message_id"]
        .as_str()
        .unwrap()
        .to_string();

    let (code, out, err) = q(&["list", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let states: Vec<&str> = lines
        .iter()
        .map(|l| l["status"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["scheduled", "sent", "failed"], "{out}");
    let (_, out, _) = q(&["list", "--status", "failed"]);
    assert!(out.contains(&failed_id) && !out.contains(&sent_id), "{out}");

    let (code, out, _) = q(&["show", &failed_id]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("5.2.1 mailbox disabled") && out.contains("Subject: bounced"),
        "{out}"
    );
    assert!(
        !out.contains("body of bounced"),
        "the body only with --body: {out}"
    );
    let (_, out, _) = q(&["show", &failed_id, "--body"]);
    assert!(out.contains("body of bounced"), "{out}");

    let (code, _, err) = q(&["cancel", &sent_id]);
    assert_eq!(code, Some(1), "a sent message cannot be cancelled: {err}");
    let (code, out, _) = q(&["cancel", &later_id]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(status_of(d.peer(), &later_id).await["status"], "cancelled");

    let (code, _, err) = q(&["retry", &sent_id]);
    assert_eq!(code, Some(1), "{err}");
    smtp.set_script(Script::ok());
    let (code, out, err) = q(&["retry", &failed_id]);
    assert_eq!(code, Some(0), "{out}{err}");
    let s = settled(d.peer(), &failed_id, LIMIT).await;
    assert_eq!(
        s["status"], "sent",
        "the daemon delivered the retried message: {s}"
    );

    let (code, out, _) = q(&["stats"]);
    assert_eq!(code, Some(0));
    assert!(
        out.lines().any(|l| l.split_whitespace().eq(["sent", "2"])),
        "{out}"
    );
    let (code, out, _) = q(&["purge", "--older-than", "0s"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("purged 3"), "{out}");
    let (code, _, _) = q(&["show", &sent_id]);
    assert_eq!(code, Some(1));
    d.stop().await;
}

/// `queue cancel` and `queue retry` with a selection instead of an id, while
/// the daemon runs: a scheduled mail merge is cancelled whole by its batch
/// id, and the mail deferred through a relay outage (its next retry an hour
/// away) goes out at once with `retry --status queued`, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_command_cancels_and_retries_a_selection_at_once() {
    let smtp = FaultSmtp::start(Script::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = hourly_retries(config_toml(dir.path(), smtp.port(), ""));
    let d = Daemon::start(dir.path(), &cfg).await;
    let q = |args: &[&str]| common::queue_cmd(dir.path(), args);
    let batch = |tag: &str, extra: Value| common::batch_args(tag, 3, extra);
    let sent = send(d.peer(), msg("sent", json!({}))).await;
    assert_eq!(sent.status(), Some("sent"), "{sent:?}");

    // The relay defers everything: a batch that waits is answered queued.
    smtp.set_script(Script::ok().on(Phase::Mail, Action::reply(451, "try later")));
    let deferred = call(
        d.peer(),
        "b",
        "send_batch",
        batch("deferred", json!({"wait": true})),
        LIMIT,
    )
    .await;
    let deferred = deferred.value().unwrap();
    let deferred_ids: Vec<String> = deferred["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["status"], "queued", "{r}");
            r["message_id"].as_str().unwrap().to_string()
        })
        .collect();
    let later = call(
        d.peer(),
        "b",
        "send_batch",
        batch("later", json!({"send_at": "1h"})),
        LIMIT,
    )
    .await;
    let later = later.value().unwrap();
    let later_batch = later["batch_id"].as_str().unwrap().to_string();

    let (code, _, err) = q(&["cancel"]);
    assert_eq!(code, Some(2), "neither an id nor a selection: {err}");
    let (code, _, err) = q(&["cancel", &deferred_ids[0], "--batch", &later_batch]);
    assert_eq!(code, Some(2), "an id and a selection: {err}");
    let (code, _, err) = q(&["retry", "--status", "waiting"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, _, err) = q(&["cancel", "--batch", ""]);
    assert_eq!(code, Some(2), "an empty value selects nothing: {err}");
    assert!(err.contains("--batch must not be empty"), "{err}");

    let (code, out, err) = q(&["cancel", "--batch", &later_batch]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.ends_with("cancelled: 3 of 3 matching messages\n"),
        "{out}"
    );
    for r in later["results"].as_array().unwrap() {
        let id = r["message_id"].as_str().unwrap();
        assert!(out.contains(&format!("{id}: cancelled")), "{out}");
        assert_eq!(status_of(d.peer(), id).await["status"], "cancelled");
    }
    let (code, out, _) = q(&["cancel", "--batch", &later_batch]);
    assert_eq!(code, Some(1), "nothing left to cancel: {out}");
    assert!(
        out.contains("0 of 3 matching messages; left as they were: 3 cancelled"),
        "{out}"
    );

    // The relay is back, though it may still be backing off from the 451s
    // (up to 200 ms): the deferred mail goes now, not in an hour. A
    // retried message that finds the relay backing off comes back when the
    // relay's backoff ends, its retries started over.
    smtp.set_script(Script::ok());
    let (code, out, err) = q(&["retry", "--status", "queued"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.ends_with("queued for a fresh attempt: 3 of 3 matching messages\n"),
        "{out}"
    );
    for id in &deferred_ids {
        let s = settled(d.peer(), id, LIMIT).await;
        assert_eq!(s["status"], "sent", "{s}");
    }
    let (code, out, _) = q(&["retry", "--caller", "local", "--status", "sent"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("0 of 4 matching messages; left as they were: 4 sent"),
        "{out}"
    );
    d.stop().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let subjects: Vec<String> = smtp.received().iter().filter_map(subject_of).collect();
    assert_eq!(subjects, ["sent", "deferred", "deferred", "deferred"]);
}

/// `queue cancel` from the shell while the daemon's delivery round holds
/// the message: it was claimed and loaded, and the relay is slow to answer
/// its RCPT, so it is still `queued` in the store. The cancel is answered
/// `cancelled`, and then the message is never sent, by that round or a
/// later one, and stays `cancelled`; a call that waits for it is answered
/// `cancelled`. A cancel while the round holds a
/// message it already marked as committing is refused (`sending`), and
/// that message is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_cancelled_from_the_shell_during_its_round_is_never_sent() {
    let slow = || {
        Script::ok().on_share(
            Phase::Rcpt,
            Action::Pause(Duration::from_millis(1500)),
            Share::FirstN(1),
        )
    };
    // A round the store refuses is not retried for an hour: only the store
    // can answer the waiting call below.
    let smtp = FaultSmtp::start(slow()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = hourly_retries(config_toml(dir.path(), smtp.port(), ""));
    let d = Daemon::start(dir.path(), &cfg).await;
    let q = |args: &[&str]| common::queue_cmd(dir.path(), args);

    let queued = send(
        d.peer(),
        msg("cancelled in its round", json!({"wait": false})),
    )
    .await;
    assert_eq!(queued.status(), Some("queued"), "{queued:?}");
    let id = queued.message_id().unwrap().to_string();
    let held = support::wait_until(|| smtp.commands(Phase::Rcpt) >= 1, LIMIT).await;
    assert!(held, "the round never reached RCPT");
    let (code, out, err) = q(&["cancel", &id]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out, format!("{id}: cancelled\n"));

    // The relay answers the round after the cancel; then it would take
    // anything, on this connection or a new one.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let s = status_of(d.peer(), &id).await;
    assert_eq!(s["status"], "cancelled", "{s}");
    assert!(smtp.received().is_empty(), "{:?}", smtp.received());

    // A waiting call's message, stored before its round for its key: the
    // call is answered as the store has it, `cancelled`.
    smtp.set_script(slow());
    let rcpts = smtp.commands(Phase::Rcpt);
    let peer = d.peer().clone();
    let waiting = tokio::spawn(async move {
        send(&peer, msg("waits", json!({"idempotency_key": "waits-1"}))).await
    });
    let held = support::wait_until(|| smtp.commands(Phase::Rcpt) > rcpts, LIMIT).await;
    assert!(held, "the waiting call's round never reached RCPT");
    let (code, out, err) = q(&["cancel", "--status", "queued"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.ends_with("cancelled: 1 of 1 matching messages\n"),
        "{out}"
    );
    let answer = waiting.await.unwrap();
    assert_eq!(answer.status(), Some("cancelled"), "{answer:?}");
    assert!(smtp.received().is_empty(), "{:?}", smtp.received());

    // Marked before the cancel: refused, and delivered once.
    smtp.set_script(Script::ok().on_share(
        Phase::AfterDot,
        Action::Pause(Duration::from_millis(1500)),
        Share::FirstN(1),
    ));
    let committed = send(d.peer(), msg("committed", json!({"wait": false}))).await;
    let id = committed.message_id().unwrap().to_string();
    let at_dot = support::wait_until(|| smtp.commands(Phase::AfterDot) >= 1, LIMIT).await;
    assert!(at_dot, "the round never sent its final dot");
    let (code, _, err) = q(&["cancel", &id]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is sending"), "{err}");
    let s = settled(d.peer(), &id, LIMIT).await;
    assert_eq!(s["status"], "sent", "{s}");
    d.stop().await;
    let subjects: Vec<String> = smtp.received().iter().filter_map(subject_of).collect();
    assert_eq!(subjects, ["committed"]);
}

/// `queue backup` while the daemon runs and a burst is being written: the
/// copy is made in one read transaction, readable by its owner only, and
/// never written over an existing file. `queue restore` is refused while
/// the daemon runs; once it is stopped, it puts the copy in place and keeps
/// the store it replaced, and a daemon started on the copy delivers the mail
/// that waited in it. The reconciling
/// counts each message at the sink: one final in the copy is never sent
/// again; one still waiting in the copy, which the first daemon delivered
/// after the copy was made, is sent once more (the README warns of it),
/// unless the copy had it marked as committing to its relay, and then it
/// is `unknown` and not resent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_made_while_the_daemon_runs_restores_its_queue() {
    use std::os::unix::fs::PermissionsExt as _;
    const CALLS: usize = 300;
    let script = || {
        Script::ok().on_rcpt(
            "later@example.org",
            Action::reply(451, "4.3.0 try again later"),
        )
    };
    let (smtp, dir, cfg, d) = setup(script(), "").await;
    let mut deferred = Vec::new();
    for i in 0..3 {
        let args = json!({"to": "later@example.org", "wait": false});
        let c = send(d.peer(), msg(&format!("deferred {i}"), args)).await;
        assert_eq!(c.status(), Some("queued"), "{c:?}");
        deferred.push(c.message_id().unwrap().to_string());
    }
    let calls = burst(d.peer(), "burst", CALLS, 16, LIMIT, |i| {
        msg(&format!("burst {i}"), json!({"wait": false}))
    });
    let reached = support::wait_until(
        || calls.done.load(std::sync::atomic::Ordering::SeqCst) >= CALLS / 3,
        Duration::from_secs(60),
    )
    .await;
    assert!(reached, "the burst never reached {} answers", CALLS / 3);
    // The copy goes where a second configuration keeps its store, so that
    // the queue command can read it as a store of its own.
    let copy_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        copy_dir.path().join("mailmux.toml"),
        config_toml(copy_dir.path(), smtp.port(), ""),
    )
    .unwrap();
    let copy = copy_dir.path().join("queue.db");
    let backup = |to: PathBuf| {
        let dir = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            common::queue_cmd(&dir, &["backup", to.to_str().unwrap()])
        })
    };
    let (code, out, err) = backup(copy.clone()).await.unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("backed up "), "{out}");
    let mode = std::fs::metadata(&copy).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the copy holds message bytes");
    let made = std::fs::read(&copy).unwrap();
    let (code, _, err) = backup(copy.clone()).await.unwrap();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("exists"), "{err}");
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        made,
        "an existing file is kept"
    );

    // The first daemon delivers the whole burst, once each.
    let calls = calls.join().await;
    let ids = queued_ids(&calls);
    let all_sent = support::wait_until(
        || {
            let seen = copies(&smtp.received());
            ids.iter().all(|id| seen.contains_key(id))
        },
        Duration::from_secs(60),
    )
    .await;
    assert!(all_sent, "the burst was not delivered");
    let files = || {
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = files();
    let copy_arg = copy.to_str().unwrap().to_string();
    let (code, _, err) = common::queue_cmd(dir.path(), &["restore", &copy_arg]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("stop it first"), "{err}");
    assert_eq!(
        files(),
        before,
        "a refused restore leaves the files as they were"
    );
    d.stop().await;

    // The restore, with the daemon stopped: the store it replaces is kept.
    let (code, out, err) = common::queue_cmd(dir.path(), &["restore", &copy_arg]);
    assert_eq!(code, Some(0), "{out}{err}");
    let kept = files()
        .into_iter()
        .find(|f| f.starts_with("queue.db.replaced-") && !f.ends_with("-wal"))
        .expect("the replaced store is kept");
    assert!(out.contains(&kept), "{out}");
    assert!(
        !files().iter().any(|f| f.ends_with(".restoring")),
        "{:?}",
        files()
    );
    let (code, out, err) =
        common::queue_cmd(copy_dir.path(), &["list", "--json", "--limit", "1000"]);
    assert_eq!(code, Some(0), "{err}");
    let in_copy: std::collections::HashMap<String, String> = out
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let id = v["message_id"].as_str().unwrap().to_string();
            (id, v["status"].as_str().unwrap().to_string())
        })
        .collect();
    for id in &deferred {
        assert!(
            matches!(
                in_copy.get(id).map(String::as_str),
                Some("queued" | "sending")
            ),
            "{id}: {:?}",
            in_copy.get(id)
        );
    }

    smtp.set_script(Script::ok());
    let d = Daemon::start(dir.path(), &cfg).await;
    let drained = support::wait_until_async(
        || async { nothing_to_send(&harness::status(d.peer()).await) },
        LIMIT,
    )
    .await;
    assert!(drained, "the restored queue never drained");
    let seen = copies(&smtp.received());
    for id in &deferred {
        let s = status_of(d.peer(), id).await;
        assert_eq!(s["status"], "sent", "{s}");
        assert_eq!(seen.get(id), Some(&1), "{id}");
    }
    let (mut final_in_copy, mut resent, mut unknown, mut after_copy) = (0, 0, 0, 0);
    for id in &ids {
        let n = seen.get(id).copied().unwrap_or(0);
        let expected = match in_copy.get(id).map(String::as_str) {
            None => {
                after_copy += 1;
                1
            }
            Some("sent") => {
                final_in_copy += 1;
                1
            }
            Some(_) => match status_of(d.peer(), id).await["status"].as_str() {
                Some("unknown") => {
                    unknown += 1;
                    1
                }
                Some("sent") => {
                    resent += 1;
                    2
                }
                other => panic!("{id}: waiting in the copy, now {other:?}"),
            },
        };
        assert_eq!(n, expected, "{id}: {n} copies at the sink");
    }
    eprintln!(
        "backup during a burst of {CALLS}: {final_in_copy} sent in the copy and not resent, \
         {resent} waiting in the copy and sent again after the restore, {unknown} unknown, \
         {after_copy} accepted after the copy"
    );
    d.stop().await;
}

/// A client that declares the tasks extension.
fn tasks_client() -> ClientConfig {
    ClientConfig::new(
        ClientCapabilities::builder().enable_tasks().build(),
        Implementation::new("tasks-test", "1.0"),
    )
}

/// `send_email` through `call_tool_once`: the complete result or the task.
async fn send_once(peer: &Peer<RoleClient>, args: Value) -> CallToolResponse {
    let Value::Object(args) = args else {
        panic!("arguments are an object")
    };
    let params = CallToolRequestParams::new("send_email").with_arguments(args);
    tokio::time::timeout(LIMIT, peer.call_tool_once(params))
        .await
        .expect("an answer in time")
        .expect("no protocol error")
}

async fn get_task(peer: &Peer<RoleClient>, id: &str) -> GetTaskResult {
    peer.get_task(GetTaskParams::new(id))
        .await
        .expect("tasks/get answers")
}

/// Polls `tasks/get` until the task is terminal.
async fn task_done(peer: &Peer<RoleClient>, id: &str) -> GetTaskResult {
    let start = std::time::Instant::now();
    loop {
        let t = get_task(peer, id).await;
        if t.task.status().is_terminal() || start.elapsed() > LIMIT {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client that declares the tasks extension gets a task for a
/// `send_email` that would wait: the task id is the Message-ID, `tasks/get`
/// answers from the store (also after a restart) with the `send_email`
/// result once the message is final, and `tasks/cancel` cancels a message
/// that still waits. Calls with `wait: false`, dry runs, refusals and
/// clients without the extension are answered as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_email_is_a_task_for_clients_that_take_tasks() {
    let smtp = FaultSmtp::start(Script::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_toml(dir.path(), smtp.port(), "");
    let d = Daemon::start_as(dir.path(), &cfg, tasks_client()).await;

    // A send that would wait is a task; it completes with the send result.
    let CallToolResponse::Task(created) = send_once(d.peer(), msg("as a task", json!({}))).await
    else {
        panic!("a task for a client that takes tasks");
    };
    let id = created.task.task_id.clone();
    assert!(id.ends_with("@mailmux.localhost"), "the Message-ID: {id}");
    assert!(created.task.poll_interval_ms.is_some());
    assert!(created.task.ttl_ms.is_some());
    let done = task_done(d.peer(), &id).await;
    assert_eq!(done.task.status(), TaskStatus::Completed, "{done:?}");
    let TaskPayload::Completed { result } = &done.task.payload else {
        panic!("a completed task carries its result: {done:?}");
    };
    let out = &result["structuredContent"];
    assert_eq!(out["status"], "sent", "{result:?}");
    assert_eq!(out["message_id"], id.as_str());
    assert_eq!(result["isError"], false);
    assert!(
        result["content"][0]["text"]
            .as_str()
            .is_some_and(|t| t.starts_with(&format!("sent {id}"))),
        "{result:?}"
    );

    // A message that waits for its time: working, then cancelled by
    // tasks/cancel, and never sent.
    let CallToolResponse::Task(later) =
        send_once(d.peer(), msg("cancelled task", json!({"send_at": "1h"}))).await
    else {
        panic!("a task for a scheduled send");
    };
    let later_id = later.task.task_id.clone();
    let waiting = get_task(d.peer(), &later_id).await;
    assert_eq!(waiting.task.status(), TaskStatus::Working);
    assert!(
        waiting
            .task
            .task
            .status_message
            .as_deref()
            .is_some_and(|m| m.starts_with("scheduled")),
        "{waiting:?}"
    );
    d.peer()
        .cancel_task(CancelTaskParams::new(later_id.clone()))
        .await
        .expect("tasks/cancel answers");
    assert_eq!(
        get_task(d.peer(), &later_id).await.task.status(),
        TaskStatus::Cancelled
    );
    assert_eq!(status_of(d.peer(), &later_id).await["status"], "cancelled");

    // An unknown task is an error, not a guess.
    assert!(
        d.peer()
            .get_task(GetTaskParams::new("nope@x"))
            .await
            .is_err()
    );

    // Answered as before: wait: false, a dry run, and a refusal.
    let no_wait = match send_once(d.peer(), msg("no wait", json!({"wait": false}))).await {
        CallToolResponse::Complete(r) => {
            let s = r.structured_content.unwrap();
            assert!(
                matches!(s["status"].as_str(), Some("queued" | "sent")),
                "{s}"
            );
            s["message_id"].as_str().unwrap().to_string()
        }
        other => panic!("wait: false answers at once: {other:?}"),
    };
    match send_once(d.peer(), msg("dry", json!({"dry_run": true}))).await {
        CallToolResponse::Complete(r) => {
            assert_eq!(r.structured_content.unwrap()["status"], "dry_run")
        }
        other => panic!("a dry run is no task: {other:?}"),
    }
    match send_once(
        d.peer(),
        json!({"to": "not an address", "subject": "x", "body": "y"}),
    )
    .await
    {
        CallToolResponse::Complete(r) => assert_eq!(r.is_error, Some(true)),
        other => panic!("a refusal is no task: {other:?}"),
    }

    // The task is the stored message: it is still there after a restart.
    // (The kill waits for the message without a wait to be delivered: one
    // killed between its commit mark and its final "." would be `unknown`
    // and never at the sink.)
    let s = settled(d.peer(), &no_wait, LIMIT).await;
    assert_eq!(s["status"], "sent", "{s}");
    d.kill9().await;
    let d = Daemon::start_as(dir.path(), &cfg, tasks_client()).await;
    let again = get_task(d.peer(), &id).await;
    assert_eq!(again.task.status(), TaskStatus::Completed);
    d.stop().await;

    // A client without the extension gets the outcome in the call.
    let d = Daemon::start(dir.path(), &cfg).await;
    match send_once(d.peer(), msg("no tasks", json!({}))).await {
        CallToolResponse::Complete(r) => {
            assert_eq!(r.structured_content.unwrap()["status"], "sent")
        }
        other => panic!("no task for a client without the extension: {other:?}"),
    }
    d.stop().await;

    let counts = copies(&smtp.received());
    let subjects: Vec<String> = smtp.received().iter().filter_map(subject_of).collect();
    for s in ["as a task", "no wait", "no tasks"] {
        assert_eq!(subjects.iter().filter(|x| *x == s).count(), 1, "{s}");
    }
    assert_eq!(
        subjects.iter().filter(|x| *x == "cancelled task").count(),
        0
    );
    assert_eq!(counts.get(&id), Some(&1));
}

/// On SQLite, what the queue command does to a message reaches the client
/// subscribed to it on the daemon that owns the file, once: a scheduled
/// message cancelled from the shell is told within the daemon's poll of
/// the watched messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_hears_what_the_queue_command_did() {
    let smtp = FaultSmtp::start(Script::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_toml(dir.path(), smtp.port(), "");
    let updates = common::Updates::default();
    let d = Daemon::start_as(dir.path(), &cfg, updates.clone()).await;
    let c = send(d.peer(), msg("later", json!({"send_at": "1h"}))).await;
    assert_eq!(c.status(), Some("scheduled"), "{c:?}");
    let id = c.value().unwrap()["message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let uri = format!("mailmux://messages/{id}");
    #[allow(deprecated)] // resources/subscribe, as clients of 2025-06-18 send it
    d.peer()
        .subscribe(SubscribeRequestParams::new(uri.clone()))
        .await
        .unwrap();

    let (code, out, err) = common::queue_cmd(dir.path(), &["cancel", &id]);
    assert_eq!(code, Some(0), "{out}{err}");
    let heard = support::wait_until(
        || !updates.0.lock().unwrap().is_empty(),
        Duration::from_secs(10),
    )
    .await;
    assert!(heard, "the queue command's cancel is not heard");
    tokio::time::sleep(2 * mailmux_actors::queue::WATCH_POLL + Duration::from_millis(500)).await;
    assert_eq!(*updates.0.lock().unwrap(), vec![uri]);
    assert_eq!(status_of(d.peer(), &id).await["status"], "cancelled");
    assert!(smtp.received().is_empty());
    d.stop().await;
}
