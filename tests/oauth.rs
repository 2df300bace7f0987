//! XOAUTH2 against the real binary: a token endpoint the test serves on
//! loopback, and the fault-injecting SMTP server checking the XOAUTH2 string
//! (user and bearer token). A first token and a refresh before expiry; a
//! token the server revoked (one refresh, then success); the refresh-token
//! file read again after a change; a token endpoint that is down
//! (`relay_fault`, then failover); no token or secret in the trace log.

mod common;
#[path = "../actors/tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use support::fault_smtp::{FaultSmtp, Options, Script};

const USER: &str = "agent@example.org";
const CLIENT_SECRET: &str = "CLIENT-SECRET-5e1d9";
const REFRESH_1: &str = "REFRESH-TOKEN-ONE-77b2";
const REFRESH_2: &str = "REFRESH-TOKEN-TWO-c4a0";

use common::{access, serve_token_endpoint as serve_endpoint};

async fn xoauth2_smtp() -> FaultSmtp {
    FaultSmtp::start_with(
        Script::ok(),
        Options {
            xoauth2_user: Some(USER.into()),
            ..Options::default()
        },
    )
    .await
}

use common::StdioDaemon as Daemon;

fn relay_toml(
    name: &str,
    smtp: u16,
    token_port: u16,
    priority: i32,
    refresh_file: &Path,
) -> String {
    format!(
        r#"
[[relays]]
name = "{name}"
host = "127.0.0.1"
port = {smtp}
tls = "none"
priority = {priority}
timeout = "3s"
messages_per_connection = 1
auth = "xoauth2"
username = "{USER}"
from_email = "{USER}"

[relays.oauth]
token_url = "http://127.0.0.1:{token_port}/token"
client_id = "mailmux-test-client"
client_secret = "{CLIENT_SECRET}"
refresh_token_file = "{file}"
scope = ["https://outlook.office.com/SMTP.Send", "offline_access"]
"#,
        file = refresh_file.display()
    )
}

/// `test_smtp_connection`'s answer for one relay.
async fn probe_of(d: &Daemon, relay: &str) -> Value {
    let probe = d
        .call("test_smtp_connection", json!({ "server_name": relay }))
        .await;
    probe["relays"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["relay"] == relay))
        .cloned()
        .unwrap_or_else(|| panic!("{relay} probed: {probe}"))
}

fn head(dir: &Path) -> String {
    format!(
        "send_deadline = \"10s\"\nshutdown_grace = \"1s\"\n\n[queue]\npath = \"{}\"\n",
        dir.join("queue.db").display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_fetched_cached_refreshed_and_never_logged() {
    let smtp = xoauth2_smtp().await;
    let (endpoint, token_port) = serve_endpoint(3).await;
    smtp.accept_tokens(&[&access(1), &access(2), &access(3), &access(4), &access(5)]);
    let dir = tempfile::tempdir().unwrap();
    let refresh_file = dir.path().join("refresh-token");
    std::fs::write(&refresh_file, format!("{REFRESH_1}\n")).unwrap();
    let config = head(dir.path()) + &relay_toml("m365", smtp.port(), token_port, 10, &refresh_file);
    let d = Daemon::start(dir.path(), &config).await;
    let requests = || endpoint.requests.lock().unwrap().clone();

    // The first token, fetched for the first connection and cached for the
    // second (each message gets its own connection here).
    for subject in ["one", "two"] {
        let out = d.send(subject).await;
        assert_eq!(out["status"], "sent", "{out}");
    }
    assert_eq!(requests().len(), 1, "one token request for two messages");
    assert_eq!(smtp.tokens_presented(), [access(1), access(1)]);
    let first = &requests()[0];
    assert_eq!(first["grant_type"], "refresh_token");
    assert_eq!(first["refresh_token"], REFRESH_1);
    assert_eq!(first["client_id"], "mailmux-test-client");
    assert_eq!(first["client_secret"], CLIENT_SECRET);
    assert_eq!(
        first["scope"],
        "https://outlook.office.com/SMTP.Send offline_access"
    );

    // Refreshed ahead of its expiry (3 s, refreshed after 2.4 s).
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let out = d.send("three").await;
    assert_eq!(out["status"], "sent", "{out}");
    assert_eq!(requests().len(), 2);
    assert_eq!(smtp.tokens_presented().last(), Some(&access(2)));

    // The server revokes the cached token: one refresh, then success.
    smtp.accept_tokens(&[&access(3), &access(4), &access(5)]);
    let out = d.send("four").await;
    assert_eq!(out["status"], "sent", "{out}");
    assert_eq!(out["relay"], "m365", "{out}");
    assert_eq!(requests().len(), 3);
    let presented = smtp.tokens_presented();
    assert_eq!(presented[presented.len() - 2..], [access(2), access(3)]);

    // A new refresh token in the file is used at the next refresh.
    std::fs::write(&refresh_file, format!("{REFRESH_2}\n")).unwrap();
    smtp.accept_tokens(&[&access(4), &access(5)]);
    let out = d.send("five").await;
    assert_eq!(out["status"], "sent", "{out}");
    assert_eq!(requests().len(), 4);
    assert_eq!(requests()[3]["refresh_token"], REFRESH_2);
    assert_eq!(smtp.tokens_presented().last(), Some(&access(4)));

    // test_smtp_connection says the token was obtained and AUTH passed.
    let r = probe_of(&d, "m365").await;
    assert_eq!(r["token"], true, "{r}");
    assert_eq!(r["auth"], true, "{r}");
    assert_eq!(smtp.delivered().len(), 5);
    d.stop().await;

    // Nothing secret in the trace log: no access token, refresh token or
    // client secret.
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(log.contains("TRACE"), "the log is at trace level");
    for n in 1..=5 {
        assert!(!log.contains(&access(n)), "access token {n} in the log");
    }
    for secret in [REFRESH_1, REFRESH_2, CLIENT_SECRET] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
    // Nor the XOAUTH2 string, which is base64 of the token.
    assert!(!log.contains("AUTH XOAUTH2"), "the AUTH line in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_that_is_down_is_a_relay_fault_and_fails_over() {
    let smtp = xoauth2_smtp().await;
    let backup = FaultSmtp::start(Script::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let refresh_file = dir.path().join("refresh-token");
    std::fs::write(&refresh_file, REFRESH_1).unwrap();
    let down = common::free_port();
    let config = head(dir.path())
        + &relay_toml("m365", smtp.port(), down, 10, &refresh_file)
        + &format!(
            r#"
[[relays]]
name = "backup"
host = "127.0.0.1"
port = {}
tls = "none"
priority = 1
timeout = "3s"
"#,
            backup.port()
        );
    let d = Daemon::start(dir.path(), &config).await;
    let out = d.send("failover").await;
    assert_eq!(out["status"], "sent", "{out}");
    assert_eq!(out["relay"], "backup", "{out}");
    let first = &out["attempts"][0];
    assert_eq!(first["relay"], "m365", "{out}");
    assert_eq!(first["class"], "relay_fault", "{out}");
    assert!(
        first["text"]
            .as_str()
            .unwrap_or_default()
            .contains("OAuth2 access token"),
        "{out}"
    );
    assert!(smtp.tokens_presented().is_empty());
    assert_eq!(backup.delivered().len(), 1);

    let r = probe_of(&d, "m365").await;
    assert_eq!(r["token"], false, "{r}");
    assert_eq!(r["auth"], false, "{r}");
    d.stop().await;
}

/// A token endpoint that says its token lives longer than the clock can
/// count (`expires_in` of u64::MAX seconds) gets the token used and cached,
/// not a panic in the task that asked for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_lives_past_the_clock_is_cached_not_a_panic() {
    let smtp = xoauth2_smtp().await;
    let (endpoint, token_port) = serve_endpoint(u64::MAX).await;
    smtp.accept_tokens(&[&access(1), &access(2)]);
    let dir = tempfile::tempdir().unwrap();
    let refresh_file = dir.path().join("refresh-token");
    std::fs::write(&refresh_file, REFRESH_1).unwrap();
    let config = head(dir.path()) + &relay_toml("m365", smtp.port(), token_port, 10, &refresh_file);
    let d = Daemon::start(dir.path(), &config).await;
    for subject in ["one", "two"] {
        let out = d.send(subject).await;
        assert_eq!(out["status"], "sent", "{out}");
        assert_eq!(out["relay"], "m365", "{out}");
    }
    assert_eq!(
        endpoint.requests.lock().unwrap().len(),
        1,
        "one token, cached"
    );
    assert_eq!(smtp.tokens_presented(), [access(1), access(1)]);
    d.stop().await;
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}

/// A token endpoint that answers 200 and then never ends its body is cut
/// off at 256 KiB, well within the request's 20 s: the relay's attempt is a
/// `relay_fault` that says so, and the mail fails over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_that_never_ends_its_answer_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let flood = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let token_port = flood.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = flood.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = c.read(&mut request).await;
                let _ = c
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{\"access_token\": \"")
                    .await;
                let chunk = vec![b'x'; 64 * 1024];
                while c.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    let smtp = xoauth2_smtp().await;
    let backup = FaultSmtp::start(Script::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let refresh_file = dir.path().join("refresh-token");
    std::fs::write(&refresh_file, REFRESH_1).unwrap();
    let config = head(dir.path())
        + &relay_toml("m365", smtp.port(), token_port, 10, &refresh_file)
        + &format!(
            "\n[[relays]]\nname = \"backup\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\npriority = 1\ntimeout = \"3s\"\n",
            backup.port()
        );
    let d = Daemon::start(dir.path(), &config).await;
    let started = std::time::Instant::now();
    let out = d.send("flooded").await;
    assert!(started.elapsed() < Duration::from_secs(5), "{out}");
    assert_eq!(out["status"], "sent", "{out}");
    assert_eq!(out["relay"], "backup", "{out}");
    let first = &out["attempts"][0];
    assert_eq!(first["class"], "relay_fault", "{out}");
    assert!(
        first["text"]
            .as_str()
            .unwrap_or_default()
            .contains("passed 256 KiB"),
        "{out}"
    );
    assert!(smtp.tokens_presented().is_empty());
    d.stop().await;
}
