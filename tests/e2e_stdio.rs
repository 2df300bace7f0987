//! The `mailmux` binary over stdio: through pipes with the official MCP Python
//! SDK (tests/e2e_client.py), and with stdin and stdout as plain files.

mod common;
#[path = "reliability/random_input.rs"]
mod random_input;

use std::process::{Command, Stdio};

use common::{Aiosmtpd, queue_db};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_mailmux");

fn seed_env(cmd: &mut Command, port: u16) {
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SMTP_HOST", "127.0.0.1")
        .env("SMTP_PORT", port.to_string())
        .env("SMTP_USE_TLS", "false")
        .env("SMTP_FROM_EMAIL", "sender@example.org")
        .env("RUST_LOG", "info")
        .env("MAILMUX_QUEUE__PATH", queue_db());
}

/// Runs tests/e2e_client.py in `mode` against the binary over pipes, with
/// aiosmtpd as the relay, and asserts that every one of its checks passed.
fn python_client(mode: &str) {
    let smtp = Aiosmtpd::start();
    let maildir = smtp.dir.path().join("mail");
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e_client.py"))
        .arg(mode)
        .arg(BIN)
        .arg(smtp.port.to_string())
        .arg(&maildir)
        .env("MAILMUX_QUEUE__PATH", queue_db())
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "e2e_client.py {mode} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}

#[test]
fn python_sdk_over_pipes_delivers_a_full_message() {
    python_client("stdio");
}

/// A 300-message mail merge through `send_batch` from the Python SDK.
#[test]
fn python_sdk_sends_a_300_message_mail_merge_once_each() {
    python_client("batch");
}

/// Runs `serve` with `lines` as stdin, a file, and answers each request id
/// with the answer stdout gave it; also gives the log.
fn serve_lines(
    port: u16,
    env: &[(&str, &str)],
    lines: &[&str],
) -> (std::collections::HashMap<u64, Value>, String) {
    let (out, logs) = serve_lines_all(port, env, lines);
    let by_id = out
        .into_iter()
        .filter_map(|v| Some((v.get("id")?.as_u64()?, v)))
        .collect();
    (by_id, logs)
}

/// Every line the daemon wrote, in order, and its log.
fn serve_lines_all(port: u16, env: &[(&str, &str)], lines: &[&str]) -> (Vec<Value>, String) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    let errors = dir.path().join("err.log");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let mut cmd = Command::new(BIN);
    seed_env(&mut cmd, port);
    let status = cmd
        .envs(env.iter().copied())
        .arg("serve")
        .current_dir(dir.path())
        .stdin(std::fs::File::open(&input).unwrap())
        .stdout(std::fs::File::create(&output).unwrap())
        .stderr(std::fs::File::create(&errors).unwrap())
        .status()
        .expect("mailmux runs");
    let logs = std::fs::read_to_string(&errors).unwrap();
    assert!(status.success(), "exit {status:?}\n{logs}");
    assert!(logs.contains("mode=Blocking"), "{logs}");

    let out = std::fs::read_to_string(&output).unwrap();
    let out = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        // stdout carries only JSON-RPC: every line parses.
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
        .collect();
    (out, logs)
}

const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"file-test","version":"1"}}}"#;
const INITIALIZED: &str = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;

#[test]
fn stdin_and_stdout_as_files_use_the_blocking_path() {
    let smtp = Aiosmtpd::start();
    let lines = [
        INITIALIZE,
        INITIALIZED,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#,
        r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"get_smtp_status","arguments":{}}}"#,
        r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"send_email","arguments":{"to":"rcpt@example.org","subject":"from a file","body":"hello"}}}"#,
    ];
    let (by_id, logs) = serve_lines(smtp.port, &[], &lines);
    for id in 1..=4 {
        assert!(
            by_id.contains_key(&id),
            "no answer to {id}:\n{by_id:?}\n{logs}"
        );
    }
    assert_eq!(by_id[&2]["result"]["tools"].as_array().unwrap().len(), 10);
    let send = &by_id[&4]["result"];
    assert_eq!(send["isError"], false, "{send}");
    assert_eq!(send["structuredContent"]["status"], "sent", "{send}");
    let id = send["structuredContent"]["message_id"].as_str().unwrap();
    let messages = smtp.wait_messages(1);
    assert_eq!(messages.len(), 1);
    assert!(messages[0].contains(&format!("<{id}>")));
}

/// A request that fits no MCP request is answered with what is wrong in it:
/// invalid params (not "method not found") for `tools/call`, the closest
/// tool for a misspelt one, and the method's name for an unknown method.
/// Nothing is sent.
#[test]
fn malformed_requests_are_answered_with_what_is_wrong() {
    let smtp = Aiosmtpd::start();
    let lines = [
        INITIALIZE,
        INITIALIZED,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"send_email","arguments":"to=a@example.org"}}"#,
        r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"arguments":{"to":"a@example.org","subject":"s","body":"b"}}}"#,
        r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":["send_email"],"arguments":{}}}"#,
        r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"send_emial","arguments":{"to":"a@example.org","subject":"s","body":"b"}}}"#,
        r#"{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"fly","arguments":{}}}"#,
        r#"{"jsonrpc":"2.0","id":7,"method":"resources/read","params":{"uri":5}}"#,
        r#"{"jsonrpc":"2.0","id":8,"method":"mail/send","params":{}}"#,
        r#"{"jsonrpc":"2.0","id":9,"method":"ping"}"#,
        r#"{"jsonrpc":"2.0","id":10,"method":"tools/call","params":{"name":"reconnect_smtp_servers","arguments":{"server_name":"primary"}}}"#,
        r#"{"jsonrpc":"2.0","id":11,"method":"tools/call","params":{"name":"get_smtp_status","arguments":{"verbose":true}}}"#,
        r#"{"jsonrpc":"2.0","id":12,"method":"tools/call","params":{"name":"reconnect_smtp_servers","arguments":{}}}"#,
    ];
    // Ids a megabyte long: the answers repeat a short part of them.
    let long = "x".repeat(1 << 20);
    let long_lines = [
        json!({"jsonrpc": "2.0", "id": 13, "method": "tools/call",
               "params": {"name": "cancel_message", "arguments": {"message_id": long}}})
        .to_string(),
        json!({"jsonrpc": "2.0", "id": 14, "method": "resources/read",
               "params": {"uri": format!("mailmux://messages/{long}")}})
        .to_string(),
    ];
    let lines: Vec<&str> = lines
        .iter()
        .copied()
        .chain(long_lines.iter().map(String::as_str))
        .collect();
    let (by_id, logs) = serve_lines(smtp.port, &[], &lines);
    for id in [13, 14] {
        let answer = by_id[&id].to_string();
        assert!(answer.len() < 2_000, "request {id}: {} bytes", answer.len());
        assert!(
            answer.contains("… (1048576 bytes)"),
            "request {id}: {answer}"
        );
    }
    assert!(
        logs.len() < 200_000,
        "the log repeats the ids: {} bytes",
        logs.len()
    );
    let error = |id: u64| {
        let e = &by_id
            .get(&id)
            .unwrap_or_else(|| panic!("no answer to {id}:\n{by_id:?}\n{logs}"))["error"];
        (
            e["code"].as_i64().unwrap_or(0),
            e["message"].as_str().unwrap_or("").to_owned(),
        )
    };
    let cases: [(u64, i64, &str); 7] = [
        (
            2,
            -32602,
            "params.arguments must be an object of the tool's parameters, not a string",
        ),
        (3, -32602, "params.name is required"),
        (4, -32602, "params.name must be a string, not an array"),
        (
            5,
            -32602,
            "mailmux has no tool \"send_emial\": did you mean `send_email`?",
        ),
        (
            6,
            -32602,
            "the tools are cancel_message, get_message_status",
        ),
        (7, -32602, "the params of resources/read do not fit"),
        (8, -32601, "mailmux has no method \"mail/send\""),
    ];
    for (id, code, text) in cases {
        let (got_code, message) = error(id);
        assert_eq!(got_code, code, "request {id}: {message}");
        assert!(message.contains(text), "request {id}: {message:?}");
        assert!(
            !message.contains("a@example.org"),
            "request {id}: {message:?}"
        );
    }
    assert_eq!(by_id[&9]["result"], serde_json::json!({}), "still serving");
    // A tool that takes no parameters refuses any, as a tool result, rather
    // than act on every relay when the agent meant one.
    for (id, field) in [(10, "server_name"), (11, "verbose")] {
        let result = &by_id[&id]["result"];
        assert_eq!(result["isError"], true, "request {id}: {result}");
        let error = &result["structuredContent"]["error"];
        assert_eq!(error["code"], "invalid_input", "request {id}: {result}");
        assert_eq!(error["field"], field, "request {id}: {result}");
        assert!(
            error["message"]
                .as_str()
                .unwrap_or("")
                .contains("this tool takes no parameters"),
            "request {id}: {result}"
        );
    }
    assert_ne!(by_id[&12]["result"]["isError"], true, "{:?}", by_id[&12]);
    assert!(smtp.messages().is_empty(), "nothing is sent");
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let smtp = Aiosmtpd::start();
    let mut cmd = Command::new(BIN);
    seed_env(&mut cmd, smtp.port);
    let dir = tempfile::tempdir().unwrap();
    let errors = dir.path().join("err.log");
    let mut child = cmd
        .arg("serve")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&errors).unwrap())
        .spawn()
        .unwrap();
    // Wait until it serves, then ask it to stop.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !std::fs::read_to_string(&errors)
        .unwrap_or_default()
        .contains("serving MCP on stdio")
    {
        assert!(std::time::Instant::now() < deadline, "never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Hold stdin open: `Child::wait` would close it, and end of stdin is a
    // shutdown trigger of its own that would race the signal.
    let stdin = child.stdin.take();
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    drop(stdin);
    let logs = std::fs::read_to_string(&errors).unwrap();
    assert!(status.success(), "exit {status:?}\n{logs}");
    assert!(logs.contains("SIGTERM received"), "{logs}");
    assert!(logs.contains("in_flight=0"), "{logs}");
}

#[test]
fn socket_pair_stdio_uses_the_socket_path() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;

    let smtp = Aiosmtpd::start();
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let errors = dir.path().join("err.log");
    let mut cmd = Command::new(BIN);
    seed_env(&mut cmd, smtp.port);
    let mut child = cmd
        .arg("serve")
        .stdin(Stdio::from(OwnedFd::from(theirs.try_clone().unwrap())))
        .stdout(Stdio::from(OwnedFd::from(theirs)))
        .stderr(std::fs::File::create(&errors).unwrap())
        .spawn()
        .unwrap();
    let lines = [
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"socket-test","version":"1"}}}"#,
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"send_email","arguments":{"to":"rcpt@example.org","subject":"over a socket","body":"hello"}}}"#,
    ];
    ours.write_all((lines.join("\n") + "\n").as_bytes())
        .unwrap();
    ours.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(ours.try_clone().unwrap());
    let mut send = None;
    while send.is_none() {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "stdout closed early"
        );
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["id"] == 2 {
            send = Some(v);
        }
    }
    // End of stdin: the daemon drains and exits 0.
    ours.shutdown(std::net::Shutdown::Write).unwrap();
    let status = child.wait().unwrap();
    let logs = std::fs::read_to_string(&errors).unwrap();
    assert!(status.success(), "{status:?}\n{logs}");
    assert!(logs.contains("mode=Socket"), "{logs}");
    let send = send.unwrap();
    assert_eq!(
        send["result"]["structuredContent"]["status"], "sent",
        "{send}"
    );
    assert_eq!(smtp.wait_messages(1).len(), 1);
}

/// Lines that are no request: one that is not JSON is ignored, one that is
/// JSON but no message of the protocol gets one "Invalid request" error
/// (no id), a notification of no standard method is skipped. Calls with
/// `_meta` or a byte-order mark are read too, and each call is served once.
#[test]
fn lines_that_are_no_request_are_ignored_or_refused_and_each_call_served() {
    let smtp = Aiosmtpd::start();
    let call = |id: u64, extra: &str| {
        format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"send_email","arguments":{{"to":"rcpt@example.org","subject":"line {id}","body":"b"}}{extra}}}}}"#
        )
    };
    let bom = format!("\u{feff}{}", call(4, ""));
    let lines = [
        INITIALIZE,
        INITIALIZED,
        "not json",
        r#"{"foo":1}"#,
        r#"{"jsonrpc":"2.0","method":"notifications/custom"}"#,
        "",
        &call(2, ""),
        &call(3, r#","_meta":{"progressToken":9}"#),
        &bom,
        &call(5, ""),
    ];
    let (out, logs) = serve_lines_all(smtp.port, &[], &lines);
    let refused: Vec<&Value> = out.iter().filter(|v| v.get("error").is_some()).collect();
    assert_eq!(refused.len(), 1, "{out:?}\n{logs}");
    assert_eq!(refused[0]["error"]["code"], -32600, "{out:?}");
    assert_eq!(refused[0]["id"], Value::Null, "{out:?}");
    for id in 2..=5 {
        let answers: Vec<&Value> = out.iter().filter(|v| v["id"] == id).collect();
        assert_eq!(answers.len(), 1, "answers to {id}: {out:?}\n{logs}");
        assert_eq!(
            answers[0]["result"]["structuredContent"]["status"], "sent",
            "{}",
            answers[0]
        );
    }
    let mut subjects: Vec<String> = smtp
        .wait_messages(4)
        .iter()
        .map(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    subjects.sort();
    assert_eq!(subjects, ["line 2", "line 3", "line 4", "line 5"]);
}

/// A request is one line, at most `http.body_limit` bytes: a longer one is
/// dropped unread (the log says so), and the requests after it are served.
#[test]
fn a_line_longer_than_the_body_limit_is_dropped_and_the_next_served() {
    let smtp = Aiosmtpd::start();
    let send = |id: u64, body: &str| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {
            "name": "send_email",
            "arguments": {"to": "rcpt@example.org", "subject": format!("line {id}"), "body": body}}})
        .to_string()
    };
    let (fits, long) = (send(2, &"a".repeat(3_000)), send(3, &"b".repeat(5_000)));
    let lines = [INITIALIZE, INITIALIZED, &fits, &long, &send(4, "after")];
    let (by_id, logs) = serve_lines(smtp.port, &[("MAILMUX_HTTP__BODY_LIMIT", "4096")], &lines);
    for id in [2, 4] {
        let answer = &by_id
            .get(&id)
            .unwrap_or_else(|| panic!("no answer to {id}: {logs}"));
        assert_eq!(
            answer["result"]["structuredContent"]["status"], "sent",
            "{answer}"
        );
    }
    assert!(
        !by_id.contains_key(&3),
        "the long line is not read: {:?}",
        by_id.get(&3)
    );
    assert!(
        logs.contains("a request line is longer than http.body_limit; dropped unread"),
        "{logs}"
    );
    // The default max_message_bytes (10 MiB) cannot arrive in 4 KiB: said at start.
    assert!(
        logs.contains("max_message_bytes is above http.body_limit"),
        "{logs}"
    );
    // The two calls run at once: either may arrive first.
    let mut subjects: Vec<String> = smtp
        .wait_messages(2)
        .iter()
        .filter_map(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_owned))
        })
        .collect();
    subjects.sort();
    assert_eq!(subjects, ["line 2", "line 4"]);
}

/// 2,000 random request lines (`tests/reliability/random_input.rs`: bytes,
/// JSON-RPC cut short, arrays, random methods, ids and tool arguments)
/// through pipes after the handshake, then a ping: the daemon answers the
/// ping, writes only JSON lines to stdout, panics nowhere, and exits 0 when
/// stdin ends. The seed is printed; `MAILMUX_RANDOM_SEED` replays a run.
#[test]
fn random_request_lines_over_stdio_leave_the_daemon_serving() {
    use std::io::{Read, Write};

    use rand::SeedableRng;
    let seed = random_input::seed();
    eprintln!("random lines: MAILMUX_RANDOM_SEED={seed} replays this run");
    let smtp = Aiosmtpd::start();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut input = Vec::new();
    for line in [INITIALIZE, INITIALIZED] {
        input.extend_from_slice(line.as_bytes());
        input.push(b'\n');
    }
    for i in 0..2000 {
        let mut line = random_input::request(&mut rng, i);
        line.retain(|&b| b != b'\n');
        input.extend_from_slice(&line);
        input.push(b'\n');
    }
    input.extend_from_slice(br#"{"jsonrpc":"2.0","id":"last","method":"ping"}"#);
    input.push(b'\n');
    let mut cmd = Command::new(BIN);
    seed_env(&mut cmd, smtp.port);
    let mut child = cmd
        .arg("serve")
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("err.log")).unwrap())
        .spawn()
        .expect("mailmux runs");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    writer.join().unwrap();
    let status = child.wait().unwrap();
    let logs = std::fs::read_to_string(dir.path().join("err.log")).unwrap();
    assert!(status.success(), "exit {status:?} (seed {seed})");
    assert!(!logs.contains("panicked"), "seed {seed}: {logs}");
    let mut last = None;
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("seed {seed}: not JSON on stdout: {e}: {line:?}"));
        if v["id"] == "last" {
            last = Some(v);
        }
    }
    eprintln!("random lines: {} answers", out.lines().count());
    let last = last.unwrap_or_else(|| panic!("seed {seed}: the ping was not answered"));
    assert_eq!(last["result"], json!({}), "{last}");
}
