//! Delivery paused by an operator: the real binary over stdio, the queue
//! command and a fault-injecting SMTP server. While paused, mail is
//! accepted and queued (a call that waits is answered `queued` at once) and
//! nothing reaches the server; the pause survives a SIGKILL and a restart;
//! after `resume` every queued message is delivered once. Both changes are
//! audit lines; a bad reason is a usage error that pauses nothing.

mod common;
#[path = "../actors/tests/support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::StdioDaemon;
use serde_json::{Value, json};
use support::fault_smtp::{FaultSmtp, Script};

fn config(dir: &std::path::Path, port: u16) -> String {
    format!(
        "shutdown_grace = \"1s\"\nsend_deadline = \"20s\"\nfrom_email = \"agent@example.org\"\n\n\
         [queue]\npath = \"{}\"\n\n[audit]\npath = \"{}\"\n\n\
         [[relays]]\nname = \"main\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\ntimeout = \"2s\"\n",
        dir.join("queue.db").display(),
        dir.join("audit.jsonl").display(),
    )
}

fn mail(subject: &str, wait: bool) -> Value {
    json!({ "to": ["ada@example.org"], "subject": subject, "body": "b", "wait": wait })
}

async fn paused_status(d: &StdioDaemon) -> Value {
    d.call("get_smtp_status", json!({})).await["queue"]["paused"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_queue_takes_mail_and_sends_none_until_resumed_even_across_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = FaultSmtp::start(Script::ok()).await;
    let cfg = config(dir.path(), smtp.port());
    let d = StdioDaemon::start(dir.path(), &cfg).await;
    let first = d.call("send_email", mail("before", true)).await;
    assert_eq!(first["status"], "sent", "{first}");
    assert_eq!(paused_status(&d).await, Value::Null);

    // A reason that is not one line of at most 500 characters is a usage
    // error, and nothing is paused.
    for reason in ["two\nlines".to_owned(), "x".repeat(501)] {
        let (code, _, err) = common::queue_cmd(dir.path(), &["pause", "--reason", &reason]);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("--reason"), "{err}");
    }
    let (_, out, _) = common::queue_cmd(dir.path(), &["stats"]);
    assert!(out.contains("delivery: running"), "{out}");

    let (code, out, err) = common::queue_cmd(dir.path(), &["pause", "--reason", "incident 42"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("paused since"), "{out}");
    // The daemon reads the pause every 100 ms.
    let deadline = Instant::now() + Duration::from_secs(10);
    while paused_status(&d).await.is_null() {
        assert!(Instant::now() < deadline, "the daemon never saw the pause");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let p = paused_status(&d).await;
    assert_eq!(
        (&p["by"], &p["reason"]),
        (&json!("queue command"), &json!("incident 42"))
    );

    // Accepted and queued; a call that waits is answered so at once, not
    // at its 20 s deadline.
    let mut ids = vec![first["message_id"].as_str().unwrap().to_owned()];
    let started = Instant::now();
    let waited = d.call("send_email", mail("waits", true)).await;
    assert!(started.elapsed() < Duration::from_secs(10), "{waited}");
    assert_eq!(waited["status"], "queued", "{waited}");
    let note = waited["message"].as_str().unwrap_or_default();
    assert!(note.contains("delivery is paused"), "{waited}");
    ids.push(waited["message_id"].as_str().unwrap().to_owned());
    for i in 0..3 {
        let r = d
            .call("send_email", mail(&format!("later {i}"), false))
            .await;
        assert_eq!(r["status"], "queued", "{r}");
        ids.push(r["message_id"].as_str().unwrap().to_owned());
    }
    let batch = d
        .call(
            "send_batch",
            common::batch_args("merge", 3, json!({ "wait": true })),
        )
        .await;
    let note = batch["message"].as_str().unwrap_or_default();
    assert!(note.contains("delivery is paused"), "{batch}");
    for r in batch["results"].as_array().unwrap() {
        assert_eq!(r["status"], "queued", "{batch}");
        ids.push(r["message_id"].as_str().unwrap().to_owned());
    }
    // `mailmux send --no-wait` hands a message to the running daemon
    // through the store; its answer says that delivery is paused too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailmux"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .arg("--config")
        .arg(dir.path().join("mailmux.toml"))
        .args(["send", "--to", "ada@example.org", "--subject", "handed"])
        .args(["--body", "b", "--no-wait"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("handed to it"), "{err}");
    let handed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(handed["status"], "queued", "{handed}");
    let note = handed["message"].as_str().unwrap_or_default();
    assert!(note.contains("delivery is paused"), "{handed}");
    ids.push(handed["message_id"].as_str().unwrap().to_owned());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(smtp.delivered().len(), 1, "mail went out while paused");

    // A crash and a restart keep the pause.
    d.kill().await;
    let d = StdioDaemon::start(dir.path(), &cfg).await;
    assert_eq!(paused_status(&d).await["reason"], "incident 42");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(smtp.delivered().len(), 1, "mail went out after the restart");
    let (code, out, _) = common::queue_cmd(dir.path(), &["stats"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("delivery: paused since") && out.contains("by queue command: incident 42"),
        "{out}"
    );
    assert!(out.contains("queued     8"), "{out}");
    // A second pause keeps the first.
    let (code, out, _) = common::queue_cmd(dir.path(), &["pause"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("paused already") && out.contains("incident 42"),
        "{out}"
    );

    let (code, out, err) = common::queue_cmd(dir.path(), &["resume"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        smtp.wait_for_delivered(ids.len(), Duration::from_secs(20))
            .await,
        "{} of {} delivered after the resume",
        smtp.delivered().len(),
        ids.len()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let delivered: Vec<String> = smtp
        .delivered()
        .iter()
        .map(|r| r.message_id.clone().unwrap_or_default())
        .collect();
    assert_eq!(delivered.len(), ids.len(), "nothing twice: {delivered:?}");
    let at_sink: HashSet<String> = delivered
        .iter()
        .map(|m| m.trim_matches(['<', '>']).to_owned())
        .collect();
    assert_eq!(at_sink, ids.iter().cloned().collect::<HashSet<_>>());
    assert_eq!(paused_status(&d).await, Value::Null);
    let (_, out, _) = common::queue_cmd(dir.path(), &["resume"]);
    assert!(out.contains("was not paused"), "{out}");
    d.stop().await;

    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    let changes: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| matches!(l["event"]["action"].as_str(), Some("paused" | "resumed")))
        .collect();
    assert_eq!(changes.len(), 2, "{audit}");
    assert_eq!(changes[0]["event"]["action"], "paused");
    assert_eq!(changes[0]["event"]["reason"], "incident 42");
    assert_eq!(changes[0]["user"]["name"], "queue command");
    assert_eq!(changes[1]["event"]["action"], "resumed");
}
