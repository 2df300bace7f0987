//! The copy in the Sent folder against a real IMAP server: Dovecot from
//! Debian's `dovecot-imapd`, started by the test as a non-root process with a
//! throwaway configuration on a free loopback port (`.ci/run` installs it;
//! without `/usr/sbin/dovecot` the test fails). The copy is byte-identical
//! to what the SMTP server received, `\Seen`, in the folder SPECIAL-USE
//! names; with IMAP down the send succeeds and the copy is recorded as
//! failed; a burst of 500 sends gives 500 copies over no more connections
//! than the bound; implicit TLS and STARTTLS; and a login with the relay's
//! OAuth2 tokens (XOAUTH2, which Dovecot checks at the test's token
//! endpoint); copies waiting at shutdown, and at a SIGKILL (made at the
//! next start, or by another daemon on PostgreSQL, each filed once, in the
//! account of the relay that first took the message); and
//! `mailmux send`, which files its own message's copy and, handing a
//! message to a running daemon, none of the daemon's.

mod common;
#[path = "common/dovecot.rs"]
mod dovecot;
#[path = "../actors/tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::StdioDaemon;
use serde_json::{Value, json};
use support::fault_smtp::{Action, FaultSmtp, Options, Phase, Script, Share};
use support::postgres::Postgres;
use support::tls::TestCa;

use dovecot::{Dovecot, PASS, USER};

/// A loopback TCP proxy to `to` that counts connections open at once.
struct Proxy {
    port: u16,
    max_open: Arc<AtomicUsize>,
}

async fn proxy(to: u16) -> Proxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let open = Arc::new(AtomicUsize::new(0));
    let max_open = Arc::new(AtomicUsize::new(0));
    let (o, m) = (open.clone(), max_open.clone());
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let now = o.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            let o = o.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
                o.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Proxy { port, max_open }
}

async fn smtp() -> FaultSmtp {
    FaultSmtp::start_with(
        Script::ok(),
        Options {
            auth: Some((USER.into(), PASS.into())),
            ..Options::default()
        },
    )
    .await
}

/// A relay with a Sent copy; the IMAP login is the relay's.
fn config(dir: &Path, smtp: u16, imap: u16, extra: &str) -> String {
    format!(
        r#"
send_deadline = "10s"
shutdown_grace = "1s"

[queue]
path = "{db}"

[[relays]]
name = "mailbox"
host = "127.0.0.1"
port = {smtp}
tls = "none"
username = "{USER}"
password = "{PASS}"
from_email = "{USER}"
timeout = "3s"

[relays.sent_copy]
imap_host = "127.0.0.1"
port = {imap}
tls = "none"
{extra}
"#,
        db = dir.join("queue.db").display()
    )
}

/// A `send_batch` of `n` messages, one per reader.
async fn digest(d: &StdioDaemon, n: usize, wait: bool) -> Value {
    let messages: Vec<Value> = (0..n)
        .map(|i| json!({ "to": [format!("reader{i}@example.net")] }))
        .collect();
    d.call(
        "send_batch",
        json!({ "defaults": { "subject": "Digest", "body": "News.\n" },
                "messages": messages, "wait": wait }),
    )
    .await
}

async fn copy_status(d: &StdioDaemon, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = d
            .call("get_message_status", json!({ "message_id": id }))
            .await;
        if !s["sent_copy"].is_null() && s["sent_copy"]["status"] != "pending" {
            return s["sent_copy"].clone();
        }
        assert!(Instant::now() < deadline, "no Sent copy outcome: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_is_byte_identical_seen_and_in_the_special_use_folder() {
    let imap = Dovecot::start();
    let sink = smtp().await;
    let dir = tempfile::tempdir().unwrap();
    let d = StdioDaemon::start(
        dir.path(),
        &config(dir.path(), sink.port(), imap.port, "folder = \"\\\\Sent\""),
    )
    .await;
    let out = d
        .call(
            "send_email",
            json!({ "to": ["alice@example.net"], "cc": ["carol@example.net"],
                    "bcc": ["hidden@example.net"], "subject": "Filed", "body": "A copy, please.\n" }),
        )
        .await;
    assert_eq!(out["status"], "sent", "{out}");
    let id = out["message_id"].as_str().unwrap();
    assert_eq!(copy_status(&d, id).await, json!({ "status": "copied" }));

    let received = sink.delivered();
    assert_eq!(received.len(), 1);
    let copies = imap.messages("Sent Messages").await;
    assert_eq!(copies.len(), 1, "one copy in the \\Sent folder");
    let (flags, bytes) = &copies[0];
    assert!(flags.iter().any(|f| f.contains("Seen")), "{flags:?}");
    assert_eq!(
        String::from_utf8_lossy(bytes),
        String::from_utf8_lossy(&received[0].data),
        "the copy is what the SMTP server received"
    );
    assert_eq!(bytes, &received[0].data);
    assert!(!String::from_utf8_lossy(bytes).contains("hidden@example.net"));
    assert_eq!(imap.count("INBOX").await, 0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_imap_down_the_send_succeeds_and_the_copy_is_recorded_failed() {
    let sink = smtp().await;
    let dir = tempfile::tempdir().unwrap();
    let down = common::free_port();
    let d = StdioDaemon::start(
        dir.path(),
        &config(
            dir.path(),
            sink.port(),
            down,
            "attempts = 3\nretry_base = \"100ms\"",
        ),
    )
    .await;
    let started = Instant::now();
    let out = d.send("no copy").await;
    assert_eq!(out["status"], "sent", "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the send did not wait for the copy"
    );
    let id = out["message_id"].as_str().unwrap();
    let copy = copy_status(&d, id).await;
    assert_eq!(copy["status"], "failed", "{copy}");
    assert!(
        copy["reason"].as_str().unwrap_or("").contains("connect"),
        "{copy}"
    );
    assert_eq!(sink.delivered().len(), 1);
    d.stop().await;
    // Logged once, at warn, for the message; the retries at debug.
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    let warned = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("no copy in the Sent folder"))
        .count();
    assert_eq!(warned, 1, "{log}");
    assert!(!log.contains(PASS), "the password is not in the log");
}

/// An IMAP server that begins its greeting and never ends the line is cut
/// off once it has sent 1 MiB, and the copy is recorded failed with that
/// reason (async-imap alone would buffer up to 512 MiB of it per
/// connection, parsing all of it again at each read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imap_server_that_never_ends_its_greeting_is_cut_off() {
    let flood = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = flood.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut c, _)) = flood.accept().await {
            tokio::spawn(async move {
                let chunk = vec![b'x'; 64 * 1024];
                let _ = c.write_all(b"* OK ").await;
                while c.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    let sink = smtp().await;
    let dir = tempfile::tempdir().unwrap();
    let d = StdioDaemon::start(
        dir.path(),
        &config(
            dir.path(),
            sink.port(),
            port,
            "attempts = 2\nretry_base = \"100ms\"",
        ),
    )
    .await;
    let out = d.send("flooded").await;
    assert_eq!(out["status"], "sent", "{out}");
    let copy = copy_status(&d, out["message_id"].as_str().unwrap()).await;
    assert_eq!(copy["status"], "failed", "{copy}");
    assert!(
        copy["reason"]
            .as_str()
            .unwrap_or("")
            .contains("without a command to answer"),
        "{copy}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_500_gives_500_copies_within_the_connection_bound() {
    let imap = Dovecot::start();
    let counted = proxy(imap.port).await;
    let sink = smtp().await;
    let dir = tempfile::tempdir().unwrap();
    let d = StdioDaemon::start(
        dir.path(),
        &config(
            dir.path(),
            sink.port(),
            counted.port,
            "folder = \"Sent Messages\"\nmax_connections = 2",
        ),
    )
    .await;
    let out = digest(&d, 500, false).await;
    assert_eq!(out["results"].as_array().map(Vec::len), Some(500), "{out}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = imap.count("Sent Messages").await;
        if n >= 500 {
            break;
        }
        assert!(Instant::now() < deadline, "{n} copies of 500");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(imap.count("Sent Messages").await, 500, "no more than 500");
    assert_eq!(sink.delivered().len(), 500);
    // The test's own counting sessions go to Dovecot directly; the proxy
    // saw mailmux's alone.
    let max = counted.max_open.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&max),
        "{max} IMAP connections at once, bound 2"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_go_over_implicit_tls_and_starttls() {
    let ca = TestCa::generate();
    let imap = Dovecot::start_with(Some(&ca), None);
    let sink = smtp().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let relay = |name: &str, tls: &str, port: u16| {
        format!(
            r#"
[[relays]]
name = "{name}"
host = "127.0.0.1"
port = {smtp}
tls = "none"
username = "{USER}"
password = "{PASS}"
from_email = "{USER}"
timeout = "3s"

[relays.sent_copy]
imap_host = "localhost"
port = {port}
tls = "{tls}"
folder = "Sent Messages"
ca_file = "{ca}"
"#,
            smtp = sink.port(),
            ca = ca_file.display()
        )
    };
    let config = format!(
        "send_deadline = \"10s\"\nshutdown_grace = \"1s\"\n\n[queue]\npath = \"{}\"\n{}{}",
        dir.path().join("queue.db").display(),
        relay("implicit", "implicit", imap.tls_port),
        relay("starttls", "starttls", imap.port),
    );
    let d = StdioDaemon::start(dir.path(), &config).await;
    for relay in ["implicit", "starttls"] {
        let out = d
            .call(
                "send_email",
                json!({ "to": ["alice@example.net"], "subject": relay, "body": "Over TLS.\n", "relay": relay }),
            )
            .await;
        assert_eq!(out["status"], "sent", "{out}");
        assert_eq!(out["relay"], relay, "{out}");
        let id = out["message_id"].as_str().unwrap();
        assert_eq!(
            copy_status(&d, id).await,
            json!({ "status": "copied" }),
            "{relay}"
        );
    }
    assert_eq!(imap.count("Sent Messages").await, 2);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_logs_in_with_the_relays_oauth2_tokens() {
    let (endpoint, token_port) = common::serve_token_endpoint_for(USER, 3600).await;
    let imap = Dovecot::start_with(None, Some(token_port));
    let sink = FaultSmtp::start_with(
        Script::ok(),
        Options {
            xoauth2_user: Some(USER.into()),
            ..Options::default()
        },
    )
    .await;
    sink.accept_tokens(&[&common::access(1), &common::access(2)]);
    // The mailbox through a proxy that can end its sessions.
    let imap_proxy = support::cut_proxy::CutProxy::start(([127, 0, 0, 1], imap.port).into()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
send_deadline = "10s"
shutdown_grace = "1s"

[queue]
path = "{db}"

{relay}
[relays.sent_copy]
imap_host = "127.0.0.1"
port = {imap}
tls = "none"
folder = "\\Sent"
"#,
        db = dir.path().join("queue.db").display(),
        relay = common::oauth2_relay_toml(sink.port(), token_port, USER),
        imap = imap_proxy.port(),
    );
    let d = StdioDaemon::start(dir.path(), &config).await;
    let out = d.send("over oauth").await;
    assert_eq!(out["status"], "sent", "{out}");
    let id = out["message_id"].as_str().unwrap();
    assert_eq!(copy_status(&d, id).await, json!({ "status": "copied" }));
    assert_eq!(imap.count("Sent Messages").await, 1);
    // One token served both SMTP and IMAP.
    assert_eq!(endpoint.requests.lock().unwrap().len(), 1);
    assert_eq!(sink.tokens_presented(), [common::access(1)]);

    // The provider revokes the token long before it expires, and the
    // session ends: the copy is filed through a new session with a fresh
    // token.
    endpoint.revoke_all();
    imap_proxy.close_all();
    let out = d.send("after the revocation").await;
    assert_eq!(out["status"], "sent", "{out}");
    let id = out["message_id"].as_str().unwrap();
    assert_eq!(copy_status(&d, id).await, json!({ "status": "copied" }));
    assert_eq!(imap.count("Sent Messages").await, 2);
    assert_eq!(
        endpoint.requests.lock().unwrap().len(),
        2,
        "one fresh token"
    );
    d.stop().await;
}

/// The outcome of each message's copy, read from a daemon started again on
/// the same store after the first one stopped.
async fn outcomes_after_restart(dir: &Path, config: &str, ids: &[String]) -> Vec<Value> {
    let again = StdioDaemon::start(dir, config).await;
    let mut out = Vec::new();
    for id in ids {
        out.push(copy_status(&again, id).await);
    }
    again.stop().await;
    out
}

fn ids_of_batch(out: &Value) -> Vec<String> {
    out["results"]
        .as_array()
        .unwrap_or_else(|| panic!("{out}"))
        .iter()
        .map(|r| {
            assert_eq!(r["status"], "sent", "{r}");
            r["message_id"].as_str().unwrap().to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_waiting_at_shutdown_are_made_before_the_daemon_exits() {
    let imap = Dovecot::start();
    let sink = smtp().await;
    let dir = tempfile::tempdir().unwrap();
    // One IMAP connection, so that the copies of a batch queue up behind
    // each other and are still waiting when the daemon is told to stop.
    let cfg = config(
        dir.path(),
        sink.port(),
        imap.port,
        "folder = \"Sent Messages\"\nmax_connections = 1",
    )
    .replace("shutdown_grace = \"1s\"", "shutdown_grace = \"20s\"");
    let d = StdioDaemon::start(dir.path(), &cfg).await;
    let out = digest(&d, 200, true).await;
    let ids = ids_of_batch(&out);
    let copied_at_stop = imap.count("Sent Messages").await;
    d.stop().await;
    let copied = imap.count("Sent Messages").await;
    println!(
        "copies in the Sent folder when the stop began: {copied_at_stop}; after the exit: {copied}"
    );
    assert_eq!(copied, 200, "every copy made before the daemon exited");
    for o in outcomes_after_restart(dir.path(), &cfg, &ids).await {
        assert_eq!(o, json!({ "status": "copied" }));
    }
    assert_eq!(sink.delivered().len(), 200);
}

/// A stop whose grace ends before the IMAP server answers: on the durable
/// store the copies stay pending, and the next start files each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_not_made_by_the_end_of_the_grace_is_made_at_the_next_start() {
    let imap = Dovecot::start();
    // An IMAP server that takes the connection and never greets.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let sink = smtp().await;
    let dir = tempfile::tempdir().unwrap();
    let folder = "folder = \"Sent Messages\"";
    let cfg = config(
        dir.path(),
        sink.port(),
        port,
        &format!("{folder}\nattempts = 1"),
    );
    let d = StdioDaemon::start(dir.path(), &cfg).await;
    let ids = sent_two(&d).await;
    let started = Instant::now();
    d.stop().await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "the stop waited {took:?}, past its grace of 1 s, for a server that never answers"
    );
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(
        log.contains("Sent copies left pending"),
        "the stop says the copies wait for the next start:\n{log}"
    );
    let stats = queue_stats(dir.path());
    assert!(stats.contains("sent copies pending: 2"), "{stats}");
    drop(silent);

    let working = config(dir.path(), sink.port(), imap.port, folder);
    for o in outcomes_after_restart(dir.path(), &working, &ids).await {
        assert_eq!(o, json!({ "status": "copied" }));
    }
    let filed = imap.messages("Sent Messages").await;
    assert_eq!(filed.len(), 2, "each copy filed once");
    assert_eq!(sink.delivered().len(), 2, "no message was sent again");
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(!log.contains(PASS), "the password is not in the log");
}

/// `mailmux send` to rcpt@example.org with `config`, run from `dir`, with
/// `extra` arguments: its JSON answer and its stderr, once it exited 0.
fn send_command(dir: &Path, config: &Path, subject: &str, extra: &[&str]) -> (Value, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailmux"))
        .arg("--config")
        .arg(config)
        .args(["send", "--to", "rcpt@example.org", "--subject", subject])
        .args(["--body", "from the command line"])
        .args(extra)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    (serde_json::from_str(&stdout).unwrap(), stderr)
}

/// The status of message `id` once it is `sent` (within 30 s).
async fn until_sent(d: &StdioDaemon, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = d
            .call("get_message_status", json!({ "message_id": id }))
            .await;
        if s["status"] == "sent" {
            return s;
        }
        assert!(Instant::now() < deadline, "not delivered: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `mailmux send --no-wait` while a daemon owns the store (and its Sent
/// copies wait on an IMAP server that never greets): the command hands its
/// message to the daemon and makes none of the daemon's pending copies,
/// even configured with a working IMAP server. They are the daemon's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_no_wait_leaves_the_running_daemons_pending_copies_alone() {
    let imap = Dovecot::start();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let sink = smtp().await;
    let dir = tempfile::tempdir().unwrap();
    let folder = "folder = \"Sent Messages\"";
    let cfg = config(dir.path(), sink.port(), port, folder);
    let d = StdioDaemon::start(dir.path(), &cfg).await;
    let ids = sent_two(&d).await;
    for id in &ids {
        let s = d
            .call("get_message_status", json!({ "message_id": id }))
            .await;
        assert_eq!(s["sent_copy"]["status"], "pending", "{s}");
    }

    let working = dir.path().join("command.toml");
    std::fs::write(&working, config(dir.path(), sink.port(), imap.port, folder)).unwrap();
    let (v, _) = send_command(dir.path(), &working, "handed", &["--no-wait"]);
    assert_eq!(v["status"], "queued", "{v}");
    let handed = v["message_id"].as_str().unwrap().to_string();
    until_sent(&d, &handed).await;
    assert_eq!(sink.delivered().len(), 3);
    assert_eq!(
        imap.count("Sent Messages").await,
        0,
        "the command filed copies that were the daemon's to make"
    );
    for id in &ids {
        let s = d
            .call("get_message_status", json!({ "message_id": id }))
            .await;
        assert_eq!(s["sent_copy"]["status"], "pending", "{s}");
    }
    d.stop().await;
    drop(silent);
}

/// `mailmux send` with no daemon running delivers through the store itself,
/// and files the copy of what it sent before it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_send_command_files_the_copy_of_its_message() {
    let imap = Dovecot::start();
    let sink = smtp().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        sink.port(),
        imap.port,
        "folder = \"Sent Messages\"",
    );
    std::fs::write(dir.path().join("mailmux.toml"), cfg).unwrap();
    let (v, stderr) = send_command(dir.path(), &dir.path().join("mailmux.toml"), "by hand", &[]);
    assert_eq!(v["status"], "sent", "{v}");
    assert_eq!(sink.delivered().len(), 1);
    assert_eq!(imap.count("Sent Messages").await, 1, "{stderr}");
    let stats = queue_stats(dir.path());
    assert!(stats.contains("sent copies pending: 0"), "{stats}");
}

/// The same stop on the `memory` store, which keeps nothing across it:
/// each copy is recorded as failed, in the log, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_memory_store_a_copy_not_made_by_the_end_of_the_grace_is_recorded_failed() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let sink = smtp().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), sink.port(), port, "attempts = 1").replacen(
        "[queue]\n",
        "[queue]\nstore = \"memory\"\n",
        1,
    );
    let d = StdioDaemon::start(dir.path(), &cfg).await;
    let ids = sent_two(&d).await;
    d.stop().await;
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    for id in &ids {
        assert!(
            log.lines().any(|l| l.contains("no copy in the Sent folder")
                && l.contains(id.as_str())
                && l.contains("the daemon stopped before the copy was made")),
            "{id} is recorded as failed:\n{log}"
        );
    }
    assert!(!log.contains("left pending"), "{log}");
    assert!(!log.contains(PASS), "the password is not in the log");
    assert_eq!(sink.delivered().len(), 2);
    drop(silent);
}

/// `mailmux queue stats` on the test's configuration, while no daemon runs.
fn queue_stats(dir: &Path) -> String {
    let (code, out, err) = common::queue_cmd(dir, &["stats"]);
    assert_eq!(code, Some(0), "{err}");
    out
}

/// Sends two messages one by one; their ids.
async fn sent_two(d: &StdioDaemon) -> Vec<String> {
    let mut ids = Vec::new();
    for subject in ["first", "second"] {
        let out = d.send(subject).await;
        assert_eq!(out["status"], "sent", "{out}");
        ids.push(out["message_id"].as_str().unwrap().to_string());
    }
    ids
}

/// The `[queue]` table's body for node `node` on the PostgreSQL at `url`,
/// with a lease of two seconds.
fn postgres_queue(url: &str, node: &str) -> String {
    format!("store = \"postgres\"\nurl = \"{url}\"\nnode_id = \"{node}\"\nlease = \"2s\"")
}

/// `cfg` with its SQLite file in `dir` replaced by `queue`, when given.
fn on_store(dir: &Path, cfg: String, queue: Option<&str>) -> String {
    let file = format!("path = \"{}\"", dir.join("queue.db").display());
    match queue {
        Some(q) => cfg.replacen(&file, q, 1),
        None => cfg,
    }
}

/// SIGKILL while every copy waits (the IMAP server never greets): the store
/// keeps each copy pending with its bytes, and the next start, against a
/// working server, files each exactly once, including the one the first
/// daemon had filed without recording it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_waiting_at_a_crash_are_made_once_at_the_next_start() {
    copies_across_a_crash(None, None, Duration::ZERO).await;
}

/// The same on PostgreSQL, where another daemon makes the copies: the one
/// killed is not seen for a lease, so the next daemon to start takes its
/// pending copies over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_a_daemon_killed_on_postgres_are_made_by_another() {
    let server = Postgres::start();
    let url = server.database();
    let queue = |node: &str| postgres_queue(&url, node);
    copies_across_a_crash(Some(&queue("a")), Some(&queue("b")), Duration::from_secs(3)).await;
}

/// Sends 20 messages through a daemon whose IMAP server never greets (the
/// `[queue]` table's body is `first`, else the SQLite file), kills it with
/// SIGKILL, files the first message in the folder as if just before the
/// crash, waits `pause`, and starts a daemon on `second` against Dovecot:
/// every copy is filed once and no message is sent again.
async fn copies_across_a_crash(first: Option<&str>, second: Option<&str>, pause: Duration) {
    let imap = Dovecot::start();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let sink = smtp().await;
    let dir = tempfile::tempdir().unwrap();
    let folder = "folder = \"Sent Messages\"";
    let on = |cfg: String, queue: Option<&str>| on_store(dir.path(), cfg, queue);
    let metrics = common::free_port();
    let stuck = on(
        config(
            dir.path(),
            sink.port(),
            silent.local_addr().unwrap().port(),
            folder,
        ),
        first,
    ) + &format!("\n[metrics]\nbind = \"127.0.0.1:{metrics}\"\n");
    let d = StdioDaemon::start(dir.path(), &stuck).await;
    let ids = ids_of_batch(&digest(&d, 20, true).await);
    for id in &ids {
        let s = d
            .call("get_message_status", json!({ "message_id": id }))
            .await;
        assert_eq!(s["sent_copy"], json!({ "status": "pending" }), "{s}");
    }
    let text = common::scrape(metrics).await;
    assert!(
        text.lines().any(|l| l == "mailmux_sent_copies_waiting 20"),
        "every copy waits:\n{text}"
    );
    let status = d.call("get_smtp_status", json!({})).await;
    assert_eq!(status["queue"]["sent_copies_pending"], 20, "{status}");
    d.kill().await;
    assert!(
        queue_stats(dir.path()).contains("sent copies pending: 20"),
        "the queue command counts the copies the crash left"
    );
    drop(silent);
    // Written at trace level, as all these tests' logs.
    let crashed_log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();

    // Filed before the crash, not recorded: the first message as sent.
    let delivered = sink.delivered();
    assert_eq!(delivered.len(), 20);
    let first_id = format!("<{}>", ids[0]);
    let sent = delivered
        .iter()
        .find(|r| r.message_id.as_deref() == Some(first_id.as_str()))
        .expect("the first message reached the sink");
    imap.append("Sent Messages", &sent.data).await;
    tokio::time::sleep(pause).await;

    let working = on(config(dir.path(), sink.port(), imap.port, folder), second);
    for o in outcomes_after_restart(dir.path(), &working, &ids).await {
        assert_eq!(o, json!({ "status": "copied" }));
    }
    let filed = imap.messages("Sent Messages").await;
    for id in &ids {
        let header = format!("Message-ID: <{id}>");
        let copies = filed
            .iter()
            .filter(|(_, bytes)| String::from_utf8_lossy(bytes).contains(&header))
            .count();
        assert_eq!(copies, 1, "{id} is in the Sent folder once");
    }
    assert_eq!(filed.len(), 20);
    assert_eq!(sink.delivered().len(), 20, "no message was sent again");
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(!log.contains(PASS), "the password is not in the log");
    assert!(!crashed_log.contains("News."), "no message body in the log");
}

/// A relay that defers `deferred` (452, mailbox full) at its first
/// `times` RCPTs and takes every other recipient.
async fn smtp_deferring(deferred: &[(&str, u64)]) -> FaultSmtp {
    let script = deferred.iter().fold(Script::ok(), |s, (address, times)| {
        s.on_rcpt_share(
            address,
            Action::reply(452, "4.2.2 Mailbox full"),
            Share::FirstN(*times),
        )
    });
    FaultSmtp::start_with(
        script,
        Options {
            auth: Some((USER.into(), PASS.into())),
            ..Options::default()
        },
    )
    .await
}

/// [`config`] whose deferred messages wait an hour for their retry.
fn config_hourly_retries(dir: &Path, smtp: u16, imap: u16) -> String {
    let file = format!("path = \"{}\"", dir.join("queue.db").display());
    config(dir, smtp, imap, "folder = \"Sent Messages\"").replacen(
        &file,
        &format!("{file}\nretry_base = \"1h\"\nretry_max = \"1h\""),
        1,
    )
}

/// Sends to `to` (the second recipient deferred): answered `queued`; its id.
async fn send_deferred(d: &StdioDaemon, to: [&str; 2]) -> String {
    let out = d
        .call(
            "send_email",
            json!({ "to": to, "subject": "Minutes", "body": "The minutes.\n" }),
        )
        .await;
    assert_eq!(out["status"], "queued", "{out}");
    assert_eq!(out["deferred"], json!([to[1]]), "{out}");
    out["message_id"].as_str().unwrap().to_string()
}

/// How many messages of the Sent folder carry Message-ID `id`.
async fn filed(imap: &Dovecot, id: &str) -> usize {
    let header = format!("Message-ID: <{id}>");
    imap.messages("Sent Messages")
        .await
        .iter()
        .filter(|(_, bytes)| String::from_utf8_lossy(bytes).contains(&header))
        .count()
}

/// A message some of whose recipients are deferred is filed in the Sent
/// folder as soon as the first of them has it, not when the deferred ones
/// get it, and once: the round that delivers to the deferred recipient
/// later files nothing, and a message cancelled while its deferred
/// recipient waits has its copy all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_with_a_deferred_recipient_is_filed_at_its_first_delivery_and_once() {
    let imap = Dovecot::start();
    let sink = smtp_deferring(&[("full@example.net", 1), ("away@example.net", 1000)]).await;
    let dir = tempfile::tempdir().unwrap();
    let d = StdioDaemon::start(
        dir.path(),
        &config_hourly_retries(dir.path(), sink.port(), imap.port),
    )
    .await;

    let retried = send_deferred(&d, ["alice@example.net", "full@example.net"]).await;
    assert_eq!(
        copy_status(&d, &retried).await,
        json!({ "status": "copied" })
    );
    let s = d
        .call("get_message_status", json!({ "message_id": retried }))
        .await;
    assert_eq!(s["status"], "queued", "filed while the retry waits: {s}");
    assert_eq!(filed(&imap, &retried).await, 1);
    let (code, out, err) = common::queue_cmd(dir.path(), &["retry", &retried]);
    assert_eq!(code, Some(0), "{out}{err}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = d
            .call("get_message_status", json!({ "message_id": retried }))
            .await;
        if s["status"] == "sent" {
            assert_eq!(s["sent_copy"], json!({ "status": "copied" }), "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "never sent: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rounds: Vec<Vec<String>> = sink.delivered().into_iter().map(|t| t.rcpt_to).collect();
    assert_eq!(
        rounds,
        [
            vec!["alice@example.net".to_string()],
            vec!["full@example.net".to_string()]
        ]
    );

    let cancelled = send_deferred(&d, ["bob@example.net", "away@example.net"]).await;
    let c = d
        .call("cancel_message", json!({ "message_id": cancelled }))
        .await;
    assert_eq!(c["cancelled"], true, "{c}");
    assert_eq!(
        copy_status(&d, &cancelled).await,
        json!({ "status": "copied" })
    );
    // The last round's copy, had it filed one, would be there by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(filed(&imap, &retried).await, 1, "filed once");
    assert_eq!(filed(&imap, &cancelled).await, 1);
    assert_eq!(imap.count("Sent Messages").await, 2);
    d.stop().await;
}

/// The copy of a message whose deferred recipient still waits, left
/// pending by a SIGKILL (the IMAP server never greeted), is made at the next
/// start, once, while the message keeps waiting for its retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_messages_copy_left_pending_at_a_crash_is_made_at_the_next_start() {
    let imap = Dovecot::start();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let sink = smtp_deferring(&[("away@example.net", 1000)]).await;
    let dir = tempfile::tempdir().unwrap();
    let stuck = config_hourly_retries(dir.path(), sink.port(), silent.local_addr().unwrap().port());
    let d = StdioDaemon::start(dir.path(), &stuck).await;
    let id = send_deferred(&d, ["alice@example.net", "away@example.net"]).await;
    let s = d
        .call("get_message_status", json!({ "message_id": id }))
        .await;
    assert_eq!(s["sent_copy"], json!({ "status": "pending" }), "{s}");
    d.kill().await;
    drop(silent);

    let working = config_hourly_retries(dir.path(), sink.port(), imap.port);
    let again = StdioDaemon::start(dir.path(), &working).await;
    assert_eq!(
        copy_status(&again, &id).await,
        json!({ "status": "copied" })
    );
    let s = again
        .call("get_message_status", json!({ "message_id": id }))
        .await;
    assert_eq!(s["status"], "queued", "{s}");
    assert_eq!(s["deferred"], json!(["away@example.net"]), "{s}");
    assert_eq!(filed(&imap, &id).await, 1);
    assert_eq!(sink.delivered().len(), 1, "nothing sent again");
    again.stop().await;
}

/// Two relays, each filing copies in an account of its own (`first` in
/// `first_imap`, `second` in `second_imap`). A call waits a second, and a
/// retry comes three seconds after a deferral.
fn config_two_accounts(dir: &Path, first: (u16, u16), second: (u16, u16)) -> String {
    let relay = |name: &str, priority: u32, (smtp, imap): (u16, u16)| {
        format!(
            r#"
[[relays]]
name = "{name}"
host = "127.0.0.1"
port = {smtp}
tls = "none"
username = "{USER}"
password = "{PASS}"
from_email = "{USER}"
priority = {priority}
timeout = "3s"

[relays.sent_copy]
imap_host = "127.0.0.1"
port = {imap}
tls = "none"
folder = "Sent Messages"
"#
        )
    };
    format!(
        r#"
send_deadline = "1s"
shutdown_grace = "1s"

[queue]
path = "{db}"
retry_base = "3s"
retry_max = "3s"
{first}{second}"#,
        db = dir.join("queue.db").display(),
        first = relay("first", 10, first),
        second = relay("second", 1, second),
    )
}

/// A message whose first relay took one recipient (its copy pending: that
/// account's IMAP server never greets) and whose deferred recipient a
/// second relay, with an account of its own, took on the retry. Killed and
/// started again, the daemon files the copy once, in the first relay's
/// account, where the message was first sent from: never in the second's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_recovered_after_a_crash_goes_to_the_account_of_the_relay_that_first_took_it() {
    copy_of_two_relays_across_a_crash(None, None, Duration::ZERO).await;
}

/// The same on PostgreSQL, where another daemon takes the copy over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_taken_over_on_postgres_goes_to_the_account_of_the_relay_that_first_took_it() {
    let server = Postgres::start();
    let url = server.database();
    let queue = |node: &str| postgres_queue(&url, node);
    copy_of_two_relays_across_a_crash(Some(&queue("a")), Some(&queue("b")), Duration::from_secs(3))
        .await;
}

/// See the two tests above; `first` and `second` replace the store's path
/// in the `[queue]` table of the daemon killed and of the one started after
/// it, `pause` after the kill.
async fn copy_of_two_relays_across_a_crash(
    first_queue: Option<&str>,
    second_queue: Option<&str>,
    pause: Duration,
) {
    let first_imap = Dovecot::start();
    let second_imap = Dovecot::start();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let first = smtp_deferring(&[("away@example.net", 1)]).await;
    let second = smtp().await;
    let dir = tempfile::tempdir().unwrap();
    let on = |cfg: String, queue: Option<&str>| on_store(dir.path(), cfg, queue);
    let stuck = on(
        config_two_accounts(
            dir.path(),
            (first.port(), silent.local_addr().unwrap().port()),
            (second.port(), second_imap.port),
        ),
        first_queue,
    );
    let d = StdioDaemon::start(dir.path(), &stuck).await;
    let id = send_deferred(&d, ["alice@example.net", "away@example.net"]).await;
    // The first relay now refuses every transaction: the retry goes to the
    // second.
    first.set_script(Script::ok().on(Phase::Mail, Action::reply(421, "4.3.2 closing")));
    let s = until_sent(&d, &id).await;
    assert_eq!(s["relay"], "second", "{s}");
    assert_eq!(s["sent_copy"], json!({ "status": "pending" }), "{s}");
    d.kill().await;
    drop(silent);
    tokio::time::sleep(pause).await;

    let working = on(
        config_two_accounts(
            dir.path(),
            (first.port(), first_imap.port),
            (second.port(), second_imap.port),
        ),
        second_queue,
    );
    let again = StdioDaemon::start(dir.path(), &working).await;
    assert_eq!(
        copy_status(&again, &id).await,
        json!({ "status": "copied" })
    );
    assert_eq!(
        filed(&first_imap, &id).await,
        1,
        "filed in the first account"
    );
    assert_eq!(
        second_imap.count("Sent Messages").await,
        0,
        "filed in the account of a relay that did not first take it"
    );
    assert_eq!(first.delivered().len(), 1);
    assert_eq!(second.delivered().len(), 1);
    again.stop().await;
}
