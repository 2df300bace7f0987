//! The README's quick start, run as written: the commands between the
//! `quickstart` markers, with `cargo run --release --` replaced by the binary
//! this test build made and port 8025 by a free one. It must send a message
//! through the embedded file relay and show the `.eml` it wrote.

use std::process::Command;

#[test]
fn the_readme_quick_start_works_as_written() {
    let readme = include_str!("../README.md");
    let begin = readme
        .find("<!-- quickstart:begin -->")
        .expect("begin marker");
    let end = readme.find("<!-- quickstart:end -->").expect("end marker");
    let block = &readme[begin..end];
    let script = block
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a sh code block between the markers");
    assert!(script.contains("cargo run --release -- serve"), "{script}");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let script = script
        .replace("cargo run --release --", env!("CARGO_BIN_EXE_mailmux"))
        .replace("8025", &port.to_string());
    // The quick start leaves the daemon running; the test stops it.
    let script = format!("set -e\n{script}\nkill $SERVER_PID_PLACEHOLDER 2>/dev/null || true\n")
        .replacen('&', "& SERVER_PID=$!;", 1)
        .replace("$SERVER_PID_PLACEHOLDER", "$SERVER_PID");

    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("timeout")
        .args(["60", "bash", "-c", &script])
        .current_dir(dir.path())
        .env_remove("SMTP_HOST")
        .env_remove("MAILMUX_CONFIG")
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains(r#""status":"sent""#), "{stdout}");
    assert!(stdout.contains(r#""relay":"outbox""#), "{stdout}");
    assert!(stdout.contains("Subject: Hello from mailmux"), "{stdout}");
    assert!(stdout.contains("It works."), "{stdout}");
    let written: Vec<_> = std::fs::read_dir(dir.path().join("outbox"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
        .collect();
    assert_eq!(written.len(), 1);
}
