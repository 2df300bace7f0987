//! The one-shot commands: exit codes and output of `send`, `check`,
//! `config` and `queue`, against aiosmtpd, a dead port and the file relay.

mod common;
#[path = "reliability/random_input.rs"]
mod random_input;
#[path = "../actors/tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};

use base64::Engine as _;
use common::{Aiosmtpd, free_port};
use serde_json::Value;

fn mailmux(port: u16, args: &[&str]) -> (i32, String, String) {
    mailmux_with(port, args, &[])
}

/// [`mailmux`] with more environment variables.
fn mailmux_with(port: u16, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mailmux"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
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

/// The binary on the embedded default in `dir` (the store in that working
/// folder), with no other environment.
fn mailmux_in(dir: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mailmux"))
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
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
            "--header",
            "X-Ticket: T-7",
            "--header",
            "Auto-Submitted: auto-generated",
        ],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let out: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(out["status"], "sent");
    let m = smtp.wait_messages(1);
    assert_eq!(m.len(), 1);
    assert!(m[0].contains("notes.txt"));
    let line = |l: &str| m[0].lines().any(|x| x.trim_end() == l);
    assert!(line("X-Ticket: T-7"), "{}", m[0]);
    assert!(line("Auto-Submitted: auto-generated"), "{}", m[0]);
    assert!(m[0].contains(out["message_id"].as_str().unwrap()));
    assert!(!stderr.contains("restarting"), "{stderr}");

    // A send refused at once stops the actors as they start: none of them is
    // logged as exited and restarting (on the embedded file relay, it was in
    // about half the runs).
    let outbox = tempfile::tempdir().unwrap();
    for _ in 0..6 {
        let out = Command::new(env!("CARGO_BIN_EXE_mailmux"))
            .args([
                "send",
                "--to",
                "a@example.org",
                "--from",
                "agent@example.org",
            ])
            .args(["--body", "hi", "--send-at", "400d"])
            .current_dir(outbox.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
        assert!(stdout.contains("max_schedule"), "{stdout}");
        assert!(!stderr.contains("restarting"), "{stderr}");
    }

    // A waiting send waits for retries that fall within its deadline; with
    // a deadline shorter than the first retry it answers after one round.
    let (code, stdout, _) = mailmux_with(
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
        &[("MAILMUX_SEND_DEADLINE", "5s")],
    );
    // No relay took it: it stays queued for a retry after the deadline, so
    // the exit code is not success.
    assert_eq!(code, 1);
    let out: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(out["status"], "queued", "{out}");
    assert!(out["next_attempt_at"].is_string(), "{out}");
    assert_eq!(out["attempts"][0]["class"], "relay_fault", "{out}");
}

/// `mailmux --config CONFIG send --to a@example.org EXTRA…`.
fn send_to_one(port: u16, config: &str, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["--config", config, "send", "--to", "a@example.org"];
    args.extend_from_slice(extra);
    mailmux(port, &args)
}

/// `send --template NAME --var K=V` sends the operator's template with the
/// values given; a subject beside it is a usage error, a missing value a
/// refusal, and neither sends anything.
#[test]
fn send_fills_a_configured_template_from_its_vars() {
    let smtp = Aiosmtpd::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mailmux.toml");
    std::fs::write(
        &config,
        "[[templates]]\nname = \"reminder\"\nsubject = \"See you at {time}\"\n\
         body = \"Hello {name}, your appointment is at {time}.\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let send = |extra: &[&str]| send_to_one(smtp.port, config, extra);
    let (code, stdout, stderr) = send(&[
        "--template",
        "reminder",
        "--var",
        "name=Ada",
        "--var",
        "time=10:30",
    ]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let m = smtp.wait_messages(1);
    assert!(m[0].contains("Subject: See you at 10:30"), "{}", m[0]);
    assert!(
        m[0].contains("Hello Ada, your appointment is at 10:30."),
        "{}",
        m[0]
    );

    let (code, _, stderr) = send(&["--template", "reminder", "--subject", "mine"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--subject"), "{stderr}");
    let (code, stdout, _) = send(&["--template", "reminder", "--var", "name=Ada"]);
    assert_eq!(code, 1, "{stdout}");
    let out: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(out["error"]["rule"], "missing_template_vars", "{out}");
    let (code, _, stderr) = send(&["--template", "reminder", "--var", "novalue"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("NAME=VALUE"), "{stderr}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(smtp.messages().len(), 1);
}

/// `send --inline ID=PATH` sends a file the HTML body shows (`cid:ID`),
/// and a template's own `images` go with what it writes: a mail client
/// (Python's parser) finds each in a multipart/related beside the HTML,
/// not among the attachments. An image the HTML never names is refused,
/// and nothing is sent.
#[test]
fn send_carries_the_images_the_html_shows() {
    let smtp = Aiosmtpd::start();
    let dir = tempfile::tempdir().unwrap();
    let logo = dir.path().join("logo.png");
    std::fs::write(&logo, b"\x89PNG the logo").unwrap();
    let config = dir.path().join("mailmux.toml");
    std::fs::write(
        &config,
        format!(
            "[[templates]]\nname = \"receipt\"\nsubject = \"Receipt\"\nbody = \"Thanks.\"\n\
             html_body = '<img src=\"cid:logo\"><p>Thanks.</p>'\n\
             [templates.images]\nlogo = \"{}\"\n",
            logo.display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let inline = format!("chart={}", logo.display());
    let send = |extra: &[&str]| send_to_one(smtp.port, config, extra);
    let (code, stdout, stderr) = send(&[
        "--subject",
        "chart",
        "--html",
        "--body",
        "<img src=\"cid:chart\">",
        "--inline",
        &inline,
    ]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let (code, stdout, stderr) = send(&["--template", "receipt"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let (code, stdout, _) = send(&[
        "--subject",
        "x",
        "--html",
        "--body",
        "<p>none</p>",
        "--inline",
        &inline,
    ]);
    assert_eq!(code, 1, "{stdout}");
    let out: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(out["error"]["rule"], "content_id_unreferenced", "{out}");

    let mut read = smtp.read_back(2);
    read.sort_by_key(|m| m["subject"].as_str().unwrap_or_default().to_owned());
    let shown = base64::engine::general_purpose::STANDARD.encode(b"\x89PNG the logo");
    for (m, (subject, id, tree)) in read.iter().zip([
        (
            "Receipt",
            "logo",
            "multipart/alternative(text/plain,multipart/related(text/html,image/png))",
        ),
        ("chart", "chart", "multipart/related(text/html,image/png)"),
    ]) {
        assert_eq!(m["subject"], subject, "{m}");
        assert_eq!(m["tree"], tree, "{m}");
        assert_eq!(m["inline"][0]["content_id"], id, "{m}");
        assert_eq!(m["inline"][0]["content_base64"], shown, "{m}");
        assert!(m["attachments"].as_array().unwrap().is_empty(), "{m}");
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(smtp.messages().len(), 2);
}

/// A body file or attachment is read up to its limit, never whole: a path
/// that never ends (a device, a pipe) is refused, and nothing is sent.
#[test]
fn send_reads_files_only_up_to_their_limits() {
    let smtp = Aiosmtpd::start();
    for (flag, env) in [
        ("--body-file", ("MAILMUX_MAX_MESSAGE_BYTES", "65536")),
        ("--attach", ("MAILMUX_MAX_ATTACHMENT_BYTES", "65536")),
    ] {
        let started = std::time::Instant::now();
        let (code, stdout, stderr) = mailmux_with(
            smtp.port,
            &["send", "--to", "a@example.org", flag, "/dev/zero"],
            &[env],
        );
        assert_eq!(code, 2, "{flag}: {stdout}\n{stderr}");
        let key = env.0.trim_start_matches("MAILMUX_").to_ascii_lowercase();
        assert!(
            stderr.contains("/dev/zero is larger than 65536 bytes") && stderr.contains(&key),
            "{flag}: {stderr}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(smtp.messages().is_empty());
}

/// A misspelt `MAILMUX_*` variable is warned of, by name.
#[test]
fn a_variable_that_names_no_key_is_warned_of() {
    let (code, stdout, stderr) = mailmux_with(
        free_port(),
        &["config"],
        &[("MAILMUX_QUEUE__STOR", "memory")],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stderr.contains("MAILMUX_QUEUE__STOR names no configuration key and is ignored"),
        "{stderr}"
    );
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
fn check_shows_dsn_and_the_limits_a_server_announced() {
    use support::fault_smtp::{FaultSmtp, Options, Script};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let smtp = rt.block_on(FaultSmtp::start_with(
        Script::ok(),
        Options {
            max_recipients: Some(50),
            max_transactions: Some(1000),
            announce_limits: true,
            dsn: true,
            ..Options::default()
        },
    ));
    let (code, stdout, stderr) = mailmux(smtp.port(), &["check"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stdout
            .lines()
            .next()
            .unwrap()
            .ends_with("ERROR OR EXTENSIONS"),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .nth(1)
            .unwrap()
            .ends_with(" DSN LIMITS RCPTMAX=50 MAILMAX=1000"),
        "{stdout}"
    );
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

/// The shipped systemd unit starts the daemon with arguments this build
/// accepts, names every variable it sets by a key the configuration knows,
/// and keeps its sandboxing and notification options.
#[test]
fn the_systemd_unit_runs_a_command_line_this_build_accepts() {
    use clap::Parser;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mailmux.service");
    let unit = std::fs::read_to_string(&path).expect("config/mailmux.service exists");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    let args: Vec<&str> = exec.split_whitespace().collect();
    assert!(args[0].ends_with("/mailmux"), "{exec}");
    let cli = mailmux::cli::Cli::try_parse_from(&args).expect("the unit's arguments parse");
    assert!(!cli.serves_stdio(), "the unit serves HTTP");
    for option in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "StateDirectory=mailmux",
        "NoNewPrivileges=yes",
        // The daemon tells systemd when it serves, and pings its watchdog
        // (tests/service.rs).
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30s",
    ] {
        assert!(unit.lines().any(|l| l == option), "missing {option}");
    }
    // Each MAILMUX_ variable is a configuration key: the daemon refuses
    // nothing here, and a misspelt key would be silently ignored.
    let mut env = Vec::new();
    for line in unit.lines() {
        if let Some(pair) = line.strip_prefix("Environment=") {
            let (k, v) = pair.split_once('=').expect("NAME=value");
            let v = v
                .replace("%S", "/var/lib")
                .replace("%d", "/run/credentials");
            env.push((k.to_string(), v));
        }
    }
    let known = [
        "MAILMUX_QUEUE__PATH",
        "MAILMUX_OUTBOX_DIR",
        "MAILMUX_HTTP__TOKEN_FILE",
        "MAILMUX_METRICS__TOKEN_FILE",
    ];
    for (k, _) in &env {
        assert!(known.contains(&k.as_str()), "unexpected variable {k}");
    }
    // The token files do not exist here: loading names the key that reads them.
    let e = mailmux::config::load_from(&mailmux::config::Sources { file: None }, env)
        .expect_err("the credential files are absent on this machine");
    assert!(
        e.key == "http.token_file" || e.key == "metrics.token_file",
        "{e}"
    );
}

/// A reader that goes away (`mailmux queue cancel … | head -1`) ends the
/// command's printing, not the command: every selected message is still
/// cancelled, and nothing panics.
#[test]
fn a_closed_output_does_not_stop_the_queue_command_half_way() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], stdout: Stdio| {
        Command::new(env!("CARGO_BIN_EXE_mailmux"))
            .args(args)
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Scheduled, so that there is something to cancel.
    for i in 0..5 {
        let to = format!("later{i}@example.org");
        let args = [
            "send",
            "--to",
            &to,
            "--from",
            "a@example.org",
            "--body",
            "x",
            "--send-at",
            "1h",
        ];
        let out = run(&args, Stdio::piped()).wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    // Its standard output closed before it prints a line.
    let mut child = run(
        &["queue", "cancel", "--status", "scheduled"],
        Stdio::piped(),
    );
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let out = run(
        &["queue", "list", "--status", "cancelled", "--json"],
        Stdio::piped(),
    )
    .wait_with_output()
    .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(listed.lines().count(), 5, "{listed}");
    // Any --limit the command takes lists them all.
    for limit in ["18446744073709551615", "9223372036854775807"] {
        let args = ["queue", "list", "--json", "--limit", limit];
        let out = run(&args, Stdio::piped()).wait_with_output().unwrap();
        assert!(out.status.success(), "{limit}: {out:?}");
        let listed = String::from_utf8_lossy(&out.stdout);
        assert_eq!(listed.lines().count(), 5, "{limit}: {listed}");
    }
    let mut child = run(&["queue", "list", "--json"], Stdio::piped());
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

/// `queue list --recipient` finds every match up to `--limit`, however
/// many rows a page of the store's search reads (`queue::SEARCH_ROWS`).
#[test]
fn the_queue_command_lists_by_recipient_past_a_page_of_the_search() {
    use mailmux_actors::queue::{
        NewMessage, ReportRecord, SEARCH_ROWS, Store, now_millis, sqlite::SqliteStore,
    };
    let dir = tempfile::tempdir().unwrap();
    let message = |id: String, to: &str| NewMessage {
        message_id: id,
        from: Some("a@example.org".into()),
        to: vec![to.into()],
        bytes: std::sync::Arc::from(&b"Subject: x\r\n\r\nbody\r\n"[..]),
        queued_at: now_millis(),
        due_at: now_millis() + 3_600_000,
        caller: Some("local".into()),
        ..NewMessage::default()
    };
    // Oldest first: 10 to Ada, a page of the search's rows to Bob, 3 to Ada.
    let mut all: Vec<NewMessage> = (0..10)
        .map(|i| message(format!("<old-ada-{i}@x>"), "ada@example.org"))
        .collect();
    all.extend((0..SEARCH_ROWS + 20).map(|i| message(format!("<bob-{i}@x>"), "bob@example.org")));
    all.extend((0..3).map(|i| message(format!("<new-ada-{i}@x>"), "ada@example.org")));
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = SqliteStore::open(&dir.path().join("mailmux-queue.db")).unwrap();
        for chunk in all.chunks(1000) {
            store.accept_many(chunk.to_vec(), false).await.unwrap();
        }
        // A bounce came back for the oldest message to Ada.
        let bounce = ReportRecord {
            at: now_millis(),
            reason: "bounced".into(),
            address: "ada@example.org".into(),
            detail: "5.1.1".into(),
        };
        store
            .note_reports("<old-ada-0@x>", vec![bounce])
            .await
            .unwrap();
    });
    let (code, out, err) = mailmux_in(
        dir.path(),
        &[
            "queue",
            "list",
            "--recipient",
            "ADA@",
            "--limit",
            "5",
            "--json",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let ids: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["message_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        ids,
        [
            "<new-ada-2@x>",
            "<new-ada-1@x>",
            "<new-ada-0@x>",
            "<old-ada-9@x>",
            "<old-ada-8@x>"
        ],
        "{out}"
    );
    let (code, out, err) = mailmux_in(
        dir.path(),
        &["queue", "list", "--recipient", "ada@", "--limit", "100"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().count(), 13, "{out}");
    // By the reports that came back, searched the same way.
    let (code, out, err) = mailmux_in(dir.path(), &["queue", "list", "--reported", "bounced"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("<old-ada-0@x>"), "{out}");
    let (code, _, err) = mailmux_in(dir.path(), &["queue", "list", "--reported", "spam"]);
    assert_eq!(code, Some(2), "{err}");
}

/// `send --tag --metadata` labels a message (kept, not sent) and
/// `--max-age` gives it its own, and the queue command lists, shows and
/// cancels messages by tag.
#[test]
fn the_queue_command_lists_shows_and_cancels_by_tag() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| mailmux_in(dir.path(), args);
    let mut ids = Vec::new();
    for (to, labels) in [
        (
            "a@example.org",
            &[
                "--tag",
                "spring",
                "--metadata",
                "customer=c-1",
                "--max-age",
                "5m",
                "--priority",
                "high",
            ][..],
        ),
        ("b@example.org", &["--tag", "spring"][..]),
        ("c@example.org", &["--tag", "autumn"][..]),
    ] {
        let mut args = vec!["send", "--to", to, "--from", "s@example.org", "--body", "x"];
        args.extend_from_slice(&["--send-at", "1h", "--no-wait"]);
        args.extend_from_slice(labels);
        let (code, stdout, stderr) = run(&args);
        assert_eq!(code, Some(0), "{stdout}\n{stderr}");
        let out: Value = serde_json::from_str(&stdout).unwrap();
        ids.push(out["message_id"].as_str().unwrap().to_owned());
    }
    let (code, stdout, _) = run(&["send", "--to", "d@example.org", "--tag", "", "--body", "x"]);
    assert_eq!(code, Some(1), "{stdout}");
    let out: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(out["error"]["rule"], "invalid_tag", "{out}");
    let (code, _, stderr) = run(&["send", "--to", "d@example.org", "--metadata", "novalue"]);
    assert_eq!(code, Some(2), "{stderr}");

    let (code, stdout, stderr) = run(&["queue", "list", "--tag", "spring", "--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let listed: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let got: Vec<(&str, &str)> = listed
        .iter()
        .map(|m| {
            (
                m["message_id"].as_str().unwrap(),
                m["tag"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [(ids[1].as_str(), "spring"), (ids[0].as_str(), "spring")]
    );
    assert_eq!(listed[1]["priority"], "high", "{stdout}");
    assert_eq!(listed[0]["priority"], "normal", "{stdout}");
    let (_, text, _) = run(&["queue", "list", "--tag", "spring"]);
    let line = text.lines().find(|l| l.contains(&ids[0])).unwrap();
    assert!(line.contains("  high"), "{text}");
    let (_, text, _) = run(&["queue", "list", "--tag", "autumn"]);
    assert!(
        text.contains(&ids[2]) && text.contains("tag autumn"),
        "{text}"
    );
    let (code, shown, _) = run(&["queue", "show", &ids[0]]);
    assert_eq!(code, Some(0), "{shown}");
    assert!(shown.contains("\"tag\": \"spring\""), "{shown}");
    assert!(shown.contains("\"customer\": \"c-1\""), "{shown}");
    assert!(shown.contains("\"max_age\": \"5m\""), "{shown}");
    assert!(shown.contains("\"priority\": \"high\""), "{shown}");
    let (code, _, stderr) = run(&["send", "--to", "d@example.org", "--priority", "urgent"]);
    assert_eq!(code, Some(2), "{stderr}");
    // Kept with the message, not in it.
    let headers = shown.split("\nFrom: ").nth(1).unwrap();
    assert!(
        !headers.contains("c-1") && !headers.contains("spring"),
        "{shown}"
    );

    // An id as a Message-ID header writes it, in angle brackets.
    let bracketed = format!(" <{}> ", ids[0]);
    let (code, again, _) = run(&["queue", "show", &bracketed]);
    assert_eq!((code, &again), (Some(0), &shown));
    let (code, _, stderr) = run(&["queue", "show", "<>"]);
    assert_eq!(code, Some(2), "{stderr}");
    // An id and a selection at once is a usage error, not the id alone.
    for action in ["cancel", "retry"] {
        let (code, _, stderr) = run(&["queue", action, &ids[2], "--tag", "autumn"]);
        assert_eq!(code, Some(2), "{action}: {stderr}");
    }

    let (code, _, stderr) = run(&["queue", "cancel", "--tag", ""]);
    assert_eq!(code, Some(2), "{stderr}");
    let (code, out, stderr) = run(&["queue", "cancel", "--tag", "spring"]);
    assert_eq!(code, Some(0), "{out}\n{stderr}");
    let (_, left, _) = run(&["queue", "list", "--status", "scheduled", "--json"]);
    assert_eq!(left.lines().count(), 1, "{left}");
    assert!(left.contains(&ids[2]), "{left}");

    // A tag's messages per state.
    let count = |text: &str, state: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(state)?.trim().parse().ok())
    };
    let (code, stats, stderr) = run(&["queue", "stats", "--tag", "spring"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(count(&stats, "cancelled "), Some(2), "{stats}");
    assert_eq!(count(&stats, "scheduled "), Some(0), "{stats}");
    assert_eq!(count(&stats, "total "), Some(2), "{stats}");
    let (code, stats, _) = run(&["queue", "stats", "--tag", "autumn"]);
    assert_eq!(code, Some(0));
    assert_eq!(count(&stats, "scheduled "), Some(1), "{stats}");
    let (code, _, stderr) = run(&["queue", "stats", "--tag", "winter"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no message matches"), "{stderr}");
    let (code, _, stderr) = run(&["queue", "stats", "--batch", ""]);
    assert_eq!(code, Some(2), "{stderr}");
}

/// A `mailmux send` that queues one message for an hour later, on the
/// embedded default (the store in the working folder).
const SCHEDULED: [&str; 10] = [
    "send",
    "--to",
    "a@example.org",
    "--from",
    "b@example.org",
    "--body",
    "x",
    "--send-at",
    "1h",
    "--no-wait",
];

/// `queue backup` copies a SQLite store only: the memory store has nothing
/// to copy, and a PostgreSQL store is pointed to `pg_dump` without its
/// password. Neither writes the file. On the embedded default, a missing
/// folder for the copy is a clear error and leaves nothing behind. `queue
/// restore` refuses what is not a store this build can read, and restores
/// into a folder that has no store.
#[test]
fn queue_backup_copies_a_sqlite_store_only() {
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("copy.db");
    let to = to.to_str().unwrap();
    let args = ["queue", "backup", to];
    let (code, _, err) = mailmux_with(free_port(), &args, &[("MAILMUX_QUEUE__STORE", "memory")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("memory store keeps nothing on disk"), "{err}");
    let postgres = [
        ("MAILMUX_QUEUE__STORE", "postgres"),
        (
            "MAILMUX_QUEUE__URL",
            "postgres://mm:hunter2-secret@127.0.0.1:1/mail",
        ),
    ];
    let (code, _, err) = mailmux_with(free_port(), &args, &postgres);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("pg_dump"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    assert!(!std::path::Path::new(to).exists());

    // On the embedded default: the store in the working folder.
    let run = |args: &[&str]| mailmux_in(dir.path(), args);
    let (code, out, err) = run(&SCHEDULED);
    assert_eq!(code, Some(0), "{out}{err}");
    let nowhere = dir.path().join("no-such-folder").join("copy.db");
    let (code, _, err) = run(&["queue", "backup", nowhere.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("no-such-folder") && err.contains("No such file"),
        "{err}"
    );
    let (code, out, err) = run(&args);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(": 1 message (scheduled 1), schema version"),
        "{out}"
    );

    // `queue restore` takes only a mailmux store that this build can read,
    // and leaves the store alone when it refuses.
    let store = std::fs::read(dir.path().join("mailmux-queue.db")).unwrap();
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, "not a database at all, just text").unwrap();
    let empty = dir.path().join("empty.db");
    rusqlite::Connection::open(&empty)
        .unwrap()
        .execute_batch("CREATE TABLE t (x)")
        .unwrap();
    let newer = dir.path().join("newer.db");
    std::fs::copy(to, &newer).unwrap();
    rusqlite::Connection::open(&newer)
        .unwrap()
        .pragma_update(None, "user_version", 999)
        .unwrap();
    for (copy, says) in [
        (&junk, "not a database"),
        (&empty, "not a mailmux queue store"),
        (&newer, "newer version"),
    ] {
        let (code, _, err) = run(&["queue", "restore", copy.to_str().unwrap()]);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains(says), "{err}");
    }
    assert_eq!(
        std::fs::read(dir.path().join("mailmux-queue.db")).unwrap(),
        store
    );
    // Into a folder with no store yet.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mailmux"))
        .args(["queue", "restore", to])
        .current_dir(elsewhere.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(text.contains("1 message (scheduled 1)"), "{text}");
    assert!(text.contains("there was no store"), "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_mailmux"))
        .args(["queue", "list", "--status", "scheduled"])
        .current_dir(elsewhere.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        1,
        "{out:?}"
    );
}

/// `queue restore` killed with SIGKILL at moments spread over its run
/// leaves the store's path holding one whole store: the one it replaces,
/// with the commit that was only in that store's log, or the copy. The
/// store it replaces has a log that was never merged (the files of a
/// killed daemon). A restore run to its end afterwards puts the copy in
/// place.
#[test]
fn a_restore_killed_at_any_moment_leaves_one_whole_store() {
    const FILLER: i64 = 40_000;
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], at: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_mailmux"))
            .args(args)
            .current_dir(at)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let done = |child: std::process::Child| {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    let source = dir.path().join("source");
    std::fs::create_dir(&source).unwrap();
    done(run(&SCHEDULED, &source));
    let store = source.join("mailmux-queue.db");
    // The copy, made larger so that a restore takes a while.
    let copy = dir.path().join("copy.db");
    done(run(&["queue", "backup", copy.to_str().unwrap()], &source));
    rusqlite::Connection::open(&copy)
        .unwrap()
        .execute_batch(&format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {FILLER})
             INSERT INTO messages (message_id, state, rcpt, size, body, queued_at, due_at,
                                   updated_at, finished_at)
             SELECT 'filler-' || i || '@x', 'sent', 'a@example.org', 1024, zeroblob(1024),
                    0, 0, 0, 0 FROM n;
             INSERT INTO counts (state, n) VALUES ('sent', {FILLER})
                 ON CONFLICT (state) DO UPDATE SET n = n + {FILLER};"
        ))
        .unwrap();
    // The store to replace: its last commit in its log only.
    let (old, old_wal) = (dir.path().join("old.db"), dir.path().join("old.db-wal"));
    {
        let c = rusqlite::Connection::open(&store).unwrap();
        c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        c.execute("UPDATE messages SET note = 'in the log'", [])
            .unwrap();
        std::fs::copy(&store, &old).unwrap();
        std::fs::copy(source.join("mailmux-queue.db-wal"), &old_wal).unwrap();
    }
    let target = dir.path().join("target");
    std::fs::create_dir(&target).unwrap();
    let path = target.join("mailmux-queue.db");
    // A killed restore's half-made copy is left where it was, for the next
    // restore to clear.
    let put_old = || {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(target.join(format!("mailmux-queue.db{suffix}")));
        }
        std::fs::copy(&old, &path).unwrap();
        std::fs::copy(&old_wal, target.join("mailmux-queue.db-wal")).unwrap();
    };
    // What the path holds: the replaced store, whole, or the copy.
    let holds = || -> &'static str {
        let c = rusqlite::Connection::open(&path).unwrap();
        let check: String = c.query_row("PRAGMA quick_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok");
        let count = |sql: &str| c.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
        match (
            count("SELECT COUNT(*) FROM messages"),
            count("SELECT COUNT(*) FROM messages WHERE note = 'in the log'"),
        ) {
            (1, 1) => "old",
            (n, 0) if n == FILLER + 1 => "copy",
            other => panic!("neither store: {other:?}"),
        }
    };
    let restore = ["queue", "restore", copy.to_str().unwrap()];
    put_old();
    let started = std::time::Instant::now();
    done(run(&restore, &target));
    let whole = started.elapsed();
    assert_eq!(holds(), "copy");
    let mut seen = std::collections::BTreeMap::new();
    // From its start to a little past its usual end.
    for k in 0..12u32 {
        put_old();
        let mut child = run(&restore, &target);
        std::thread::sleep(whole * k / 9);
        let _ = child.kill();
        let _ = child.wait();
        *seen.entry(holds()).or_insert(0) += 1;
    }
    eprintln!("a restore of {whole:?} killed 12 times: {seen:?}");
    put_old();
    done(run(&restore, &target));
    assert_eq!(holds(), "copy");
    let left: Vec<_> = std::fs::read_dir(&target)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".restoring"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A secret's file that other users may read is used, with a warning that
/// names the file, its key and mode, and never the secret; so is a
/// configuration file that holds a secret as a value. At 0600 there is no
/// warning.
#[test]
fn a_secret_file_others_may_read_is_used_with_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("relay.password");
    std::fs::write(&secret, "SECRET-IN-A-FILE-77c1\n").unwrap();
    let config = dir.path().join("mailmux.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[relays]]
name = "primary"
host = "127.0.0.1"
port = 2525
username = "agent@example.org"
password_file = "{}"
"#,
            secret.display()
        ),
    )
    .unwrap();
    let run = || {
        let out = show_config(&config, &[]);
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!all.contains("SECRET-IN-A-FILE-77c1"), "{all}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let warned = run();
    assert!(
        warned.contains("may be read or written by other users (mode 644)")
            && warned.contains("relays[0].password_file")
            && warned.contains("relay.password"),
        "{warned}"
    );
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let quiet = run();
    assert!(!quiet.contains("other users"), "{quiet}");

    // The same of a configuration file that holds a secret as a value.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("password_file = \"{}\"", secret.display()),
        "password = \"SECRET-IN-A-FILE-77c1\"",
    );
    std::fs::write(&config, text).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let warned = run();
    assert!(
        warned.contains("holds relays[0].password and other users may read or write it (mode 644)"),
        "{warned}"
    );
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let quiet = run();
    assert!(!quiet.contains("other users"), "{quiet}");
}

/// A bearer token shorter than 16 characters is used, with a warning that
/// names its key and length and never the token; a longer one is not
/// warned of. The same for a caller's token read from the environment.
#[test]
fn a_short_bearer_token_is_used_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mailmux.toml");
    let run = |text: &str, token_env: &str| {
        std::fs::write(&config, text).unwrap();
        let out = show_config(&config, &[("AGENT_TOKEN", token_env)]);
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let long = "b7d1c0e4a9f23568";
    let relay = "\n[[relays]]\nname = \"primary\"\nhost = \"127.0.0.1\"\nport = 2525\n";
    let warned = run(&format!("[http]\ntoken = \"Pw7short\"\n{relay}"), long);
    assert!(
        warned.contains("the token of http.token is 8 characters long and may be guessed"),
        "{warned}"
    );
    assert!(!warned.contains("Pw7short"), "{warned}");
    let quiet = run(&format!("[http]\ntoken = \"{long}\"\n{relay}"), long);
    assert!(!quiet.contains("may be guessed"), "{quiet}");

    let callers = format!("[[callers]]\nname = \"agent\"\ntoken_env = \"AGENT_TOKEN\"\n{relay}");
    let warned = run(&callers, "tiny-7f");
    assert!(
        warned.contains("the token of callers.0.token_env is 7 characters long"),
        "{warned}"
    );
    assert!(!warned.contains("tiny-7f"), "{warned}");
    assert!(!run(&callers, long).contains("may be guessed"));
}

/// `mailmux --config CONFIG config` in the configuration's folder, with no
/// environment but `PATH` and `env`; it must succeed.
fn show_config(config: &std::path::Path, env: &[(&str, &str)]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_mailmux"))
        .arg("--config")
        .arg(config)
        .arg("config")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .current_dir(config.parent().unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    out
}

/// Words random command lines are made of: the commands, every option, and
/// values of the right and the wrong shape. Paths are relative (the test's
/// folder) or devices, so that nothing is written outside the folder.
const WORDS: &[&str] = &[
    "send",
    "check",
    "config",
    "queue",
    "serve",
    "help",
    "list",
    "show",
    "cancel",
    "retry",
    "approve",
    "reject",
    "purge",
    "stats",
    "backup",
    "restore",
    "migrate",
    "--to",
    "--cc",
    "--bcc",
    "--from",
    "--subject",
    "--body",
    "--body-file",
    "--html",
    "--attach",
    "--relay",
    "--dry-run",
    "--idempotency-key",
    "--send-at",
    "--no-wait",
    "--status",
    "--caller",
    "--batch",
    "--tag",
    "--metadata",
    "--max-age",
    "--recipient",
    "--reported",
    "bounced",
    "--limit",
    "--json",
    "--force",
    "--older-than",
    "--config",
    "--log-format",
    "--help",
    "-h",
    "-V",
    "--",
    "-",
    "a@example.org",
    "Ada <ada@example.org>",
    "no-at-sign",
    "",
    " ",
    "x",
    "json",
    "text",
    "queued",
    "sent",
    "failed",
    "held",
    "bogus",
    "outbox",
    "10m",
    "0s",
    "-5s",
    "1e9s",
    "99999999999999999999d",
    "2026-12-04T10:00:00Z",
    "9999-12-31T23:59:59Z",
    "0000-00-00T00:00:00Z",
    "0",
    "-1",
    "18446744073709551616",
    "/dev/null",
    "/dev/zero",
    "missing.toml",
    "copy.db",
    "store-copy.db",
    ".",
    "mailmux.toml",
    "notes.txt",
    "0123456789abcdef0123456789abcdef",
    "<id@example.org>",
    "😀",
    "\u{202e}",
    "\r\n",
    "=?utf-8?q?x?=",
    "{{name}}",
    "--to=a@example.org",
    "--limit=5",
    "--older-than=1h",
];

/// The commands, whether each takes a positional argument (an id, a path),
/// and their options with whether each takes a value: most random command
/// lines get past the argument parser.
type CommandShape = (
    &'static [&'static str],
    bool,
    &'static [(&'static str, bool)],
);
const COMMANDS: &[CommandShape] = &[
    (
        &["send"],
        false,
        &[
            ("--to", true),
            ("--cc", true),
            ("--bcc", true),
            ("--from", true),
            ("--subject", true),
            ("--body", true),
            ("--body-file", true),
            ("--html", false),
            ("--attach", true),
            ("--relay", true),
            ("--dry-run", false),
            ("--idempotency-key", true),
            ("--send-at", true),
            ("--no-wait", false),
            ("--tag", true),
            ("--metadata", true),
            ("--max-age", true),
        ],
    ),
    (
        &["queue", "list"],
        false,
        &[
            ("--status", true),
            ("--caller", true),
            ("--batch", true),
            ("--tag", true),
            ("--recipient", true),
            ("--reported", true),
            ("--limit", true),
            ("--json", false),
        ],
    ),
    (&["queue", "show"], true, &[("--body", false)]),
    (
        &["queue", "cancel"],
        true,
        &[
            ("--status", true),
            ("--caller", true),
            ("--batch", true),
            ("--tag", true),
            ("--recipient", true),
        ],
    ),
    (
        &["queue", "retry"],
        true,
        &[
            ("--status", true),
            ("--caller", true),
            ("--batch", true),
            ("--tag", true),
            ("--recipient", true),
            ("--force", false),
        ],
    ),
    (&["queue", "approve"], true, &[("--batch", true)]),
    (&["queue", "reject"], true, &[("--batch", true)]),
    (&["queue", "purge"], false, &[("--older-than", true)]),
    (&["queue", "stats"], false, &[]),
    (&["queue", "backup"], true, &[]),
    (&["queue", "restore"], true, &[]),
    (&["check"], false, &[]),
    (&["config"], false, &[]),
];

/// One random command line: usually a command with some of its own options
/// (each once) and values of every shape, sometimes any words; sometimes a
/// long word.
fn command_line(rng: &mut rand::rngs::StdRng) -> Vec<String> {
    use rand::Rng;
    use rand::seq::SliceRandom;
    let word = |rng: &mut rand::rngs::StdRng, values_only: bool| loop {
        let w = match rng.random_range(0..40) {
            0 => "a".repeat(rng.random_range(1..20_000)),
            // An argument cannot hold NUL.
            1 => random_input::string(rng).replace('\0', ""),
            _ => WORDS[rng.random_range(0..WORDS.len())].to_string(),
        };
        if !values_only || !w.starts_with('-') || w.len() < 2 {
            break w;
        }
    };
    let mut args = Vec::new();
    if rng.random_bool(0.1) {
        for _ in 0..rng.random_range(0..=8) {
            args.push(word(rng, false));
        }
        return args;
    }
    let (command, positional, options) = COMMANDS[rng.random_range(0..COMMANDS.len())];
    args.extend(command.iter().map(|w| w.to_string()));
    if positional && rng.random_bool(0.8) {
        args.push(word(rng, true));
    }
    let mut options = options.to_vec();
    options.shuffle(rng);
    if command == ["send"] && rng.random_bool(0.8) {
        options.retain(|(o, _)| *o != "--to");
        args.extend(["--to".into(), word(rng, true)]);
    }
    for (option, takes_value) in options.into_iter().take(rng.random_range(0..=5)) {
        args.push(option.into());
        if takes_value {
            args.push(word(rng, true));
        }
    }
    if rng.random_bool(0.05) {
        args.push(word(rng, false));
    }
    args
}

/// Random command lines against the embedded default (the file relay and
/// a SQLite store in the test's folder): each one ends within its time, by
/// exit code and not by a signal, and nothing panics.
#[test]
fn random_command_lines_end_by_exit_code_without_a_panic() {
    use rand::SeedableRng;
    let seed = random_input::seed();
    println!("MAILMUX_RANDOM_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "attached").unwrap();
    std::fs::write(
        dir.path().join("mailmux.toml"),
        "[queue]\nmax_age = \"1h\"\n",
    )
    .unwrap();
    let mut codes = std::collections::BTreeMap::new();
    for run in 0..250 {
        let args = command_line(&mut rng);
        let mut child = Command::new(env!("CARGO_BIN_EXE_mailmux"))
            .args(&args)
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("MAILMUX_QUEUE__PATH", dir.path().join("queue.db"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
            s
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("run {run} (seed {seed}) did not end within 30 s: {args:?}");
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        let stderr = reader.join().unwrap();
        let shown: Vec<String> = args.iter().map(|a| a.chars().take(60).collect()).collect();
        assert!(
            !stderr.contains("panicked"),
            "run {run} (seed {seed}) panicked: {shown:?}\n{stderr}"
        );
        let code = status.code().unwrap_or_else(|| {
            panic!("run {run} (seed {seed}) ended by a signal: {shown:?}\n{stderr}")
        });
        *codes.entry(code).or_insert(0) += 1;
    }
    println!("exit codes: {codes:?}");
}
