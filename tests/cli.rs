//! The one-shot commands: exit codes and output of `send`, `check` and
//! `config`, against aiosmtpd and a dead port.

mod common;

use std::process::Command;

use common::{Aiosmtpd, free_port};
use serde_json::Value;

fn mailmux(port: u16, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mailmux"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MAILMUX_QUEUE__PATH", common::queue_db())
        .env("SMTP_HOST", "127.0.0.1")
        .env("SMTP_PORT", port.to_string())
        .env("SMTP_USE_TLS", "false")
        .env("SMTP_TIMEOUT", "3")
        .env("SMTP_FROM_EMAIL", "sender@example.org")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn send_prints_json_and_exits_by_status() {
    let smtp = Aiosmtpd::start();
    let dir = tempfile::tempdir().unwrap();
    let attachment = dir.path().join("notes.txt");
    std::fs::write(&attachment, "attached text").unwrap();
    let (code, stdout, stderr) = mailmux(
        smtp.port,
        &[
            "send",
            "--to",
            "a@example.org",
            "--bcc",
            "b@example.org",
            "--subject",
            "one shot",
            "--body",
            "hi",
            "--attach",
            attachment.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let out: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(out["status"], "sent");
    let m = smtp.wait_messages(1);
    assert_eq!(m.len(), 1);
    assert!(m[0].contains("notes.txt"));
    assert!(m[0].contains(out["message_id"].as_str().unwrap()));

    let (code, stdout, _) = mailmux(
        free_port(),
        &[
            "send",
            "--to",
            "a@example.org",
            "--subject",
            "x",
            "--body",
            "y",
        ],
    );
    // No relay took it: it stays queued for a retry, which this one-shot
    // command does not wait for, so the exit code is not success.
    assert_eq!(code, 1);
    let out: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(out["status"], "queued", "{out}");
    assert!(out["next_attempt_at"].is_string(), "{out}");
    assert_eq!(out["attempts"][0]["class"], "relay_fault", "{out}");
}

#[test]
fn check_exits_zero_only_when_every_relay_answers() {
    let smtp = Aiosmtpd::start();
    let (code, stdout, stderr) = mailmux(smtp.port, &["check"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.starts_with("RELAY"), "{stdout}");
    assert!(stdout.lines().nth(1).unwrap().contains("yes"), "{stdout}");

    let (code, stdout, _) = mailmux(free_port(), &["check"]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("NO"), "{stdout}");
}

#[test]
fn config_prints_the_effective_configuration() {
    let (code, stdout, stderr) = mailmux(2525, &["config"]);
    assert_eq!(code, 0, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert!(v.is_object());
    assert!(stdout.contains("127.0.0.1"), "{stdout}");

    let (code, _, stderr) = mailmux(2525, &["--config", "/nonexistent/mailmux.toml", "config"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("mailmux.toml"), "{stderr}");
}
