//! What the daemon's log holds: no password (a send and a probe through a
//! relay that needs AUTH, with every log level on), no message body, and one
//! message's id per line, even within a `send_batch` call.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::free_port;

const USER: &str = "mailuser";
const PASSWORD: &str = "Pa55-w0rd-zq81";

struct AuthSmtpd {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl AuthSmtpd {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut child = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/aiosmtpd_auth.py"
            ))
            .arg(port.to_string())
            .arg(dir.path().join("mail"))
            .args([USER, PASSWORD])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while line.trim() != "ready" {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "auth smtpd did not start"
            );
        }
        AuthSmtpd { child, port, dir }
    }
}

impl Drop for AuthSmtpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mailmux(smtp: &AuthSmtpd, args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mailmux"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MAILMUX_QUEUE__PATH", common::queue_db())
        .env("SMTP_HOST", "127.0.0.1")
        .env("SMTP_PORT", smtp.port.to_string())
        .env("SMTP_USE_TLS", "false")
        .env("SMTP_USERNAME", USER)
        .env("SMTP_PASSWORD", PASSWORD)
        .env("SMTP_FROM_EMAIL", "sender@example.org")
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_no_secret(what: &str, text: &str) {
    let plain = STANDARD.encode(format!("\0{USER}\0{PASSWORD}"));
    let login = STANDARD.encode(PASSWORD);
    for needle in [
        PASSWORD,
        plain.as_str(),
        login.as_str(),
        plain.trim_end_matches('='),
    ] {
        assert!(
            !text.contains(needle),
            "{what} contains a secret ({needle}):\n{text}"
        );
    }
}

#[test]
fn password_never_appears_in_logs_or_output() {
    let smtp = AuthSmtpd::start();
    let (status, stdout, stderr) = mailmux(
        &smtp,
        &[
            "send",
            "--to",
            "rcpt@example.org",
            "--subject",
            "auth",
            "--body",
            "hello",
        ],
    );
    assert!(status.success(), "send failed:\n{stdout}\n{stderr}");
    let result: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(result["status"], "sent");
    assert!(stderr.contains("send finished"), "{stderr}");
    assert_eq!(
        common::read_maildir(&smtp.dir.path().join("mail/new")).len(),
        1
    );
    assert_no_secret("send stderr", &stderr);
    assert_no_secret("send stdout", &stdout);

    let (status, stdout, stderr) = mailmux(&smtp, &["check"]);
    assert!(status.success(), "check failed:\n{stdout}\n{stderr}");
    assert_no_secret("check stderr", &stderr);
    assert_no_secret("check stdout", &stdout);

    let (status, stdout, stderr) = mailmux(&smtp, &["config"]);
    assert!(status.success(), "config failed:\n{stdout}\n{stderr}");
    assert_no_secret("config stdout", &stdout);
    assert_no_secret("config stderr", &stderr);
}

/// With every level on (the daemon's log at `trace`), a tool call's
/// arguments and its answer stay out of the log: rmcp logs every request
/// and response at `debug`, and is held at `warn` whatever `RUST_LOG` says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_bodies_never_reach_the_daemon_log() {
    const BODY: &str = "Quarterly figures: 7f3e-body-marker";
    let dir = tempfile::tempdir().unwrap();
    // The embedded default: the file relay and the SQLite queue.
    let d = common::StdioDaemon::start(dir.path(), "").await;
    let out = d
        .call(
            "send_email",
            serde_json::json!({ "from_email": "agent@example.org", "to": ["rcpt@example.org"], "subject": "Figures", "body": BODY }),
        )
        .await;
    assert_eq!(out["status"], "sent", "{out}");
    d.stop().await;
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(log.contains("TRACE"), "the log is at trace level");
    assert!(
        !log.contains("7f3e-body-marker"),
        "the body is in the log:\n{log}"
    );
}

/// A `send_batch` call's log names each message on its own lines: one log
/// line never carries the ids of several messages, so a batch of n
/// messages logs O(n) bytes, not O(n²) (each line repeating every id the
/// call had met so far), and a dry run's line names its own message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_logs_each_message_on_its_own_lines() {
    const N: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let d = common::StdioDaemon::start(dir.path(), "").await;
    let messages: Vec<serde_json::Value> = (0..N)
        .map(|i| serde_json::json!({ "to": [format!("rcpt{i}@example.org")] }))
        .collect();
    let defaults =
        serde_json::json!({ "from_email": "agent@example.org", "subject": "Hi", "body": "Hello" });
    let sent = d
        .call(
            "send_batch",
            serde_json::json!({ "defaults": defaults, "messages": messages }),
        )
        .await;
    assert_eq!(sent["summary"]["sent"], N, "{sent}");
    let dry = d
        .call(
            "send_batch",
            serde_json::json!({ "defaults": defaults, "messages": messages, "dry_run": true }),
        )
        .await;
    assert_eq!(dry["summary"]["dry_run"], N, "{dry}");
    d.stop().await;
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    let ids = |line: &str| {
        let mut ids: Vec<String> = line
            .split("message_id=")
            .skip(1)
            .map(|rest| {
                rest.split(|c: char| c.is_whitespace() || c == '}' || c == ',')
                    .next()
                    .unwrap_or_default()
                    .trim_matches('"')
                    .to_string()
            })
            .collect();
        ids.sort();
        ids.dedup();
        ids
    };
    for line in log.lines() {
        assert!(
            ids(line).len() <= 1,
            "a log line names several messages: {}",
            &line[..line.len().min(600)]
        );
    }
    // Each dry run's line names the message it was about.
    let dry_ids: Vec<&str> = dry["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["message_id"].as_str().unwrap())
        .collect();
    for id in dry_ids {
        assert!(
            log.lines()
                .any(|l| l.contains("dry run") && ids(l) == [id.to_string()]),
            "no dry-run line names {id}"
        );
    }
}
