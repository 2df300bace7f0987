//! The operators' web console in real browsers: headless Chromium through
//! ChromeDriver and headless Firefox through geckodriver (WebDriver),
//! against the real binary. Signing in,
//! a relay turning `backing_off` after its SMTP server stops, approving a
//! held message (at the sink exactly once) and rejecting another (never at
//! the sink); another site's frame showing nothing of it; then, over plain
//! HTTP, the CSRF, session, cookie, body, response header and Host/Origin
//! rules, and random requests to every route. Screenshots of each page go
//! to `target/console/<browser>/`.
//!
//! Needs Debian's `chromium`, `chromium-driver` and `firefox-esr`, and
//! geckodriver (`cargo install --locked geckodriver`); `.ci/run` installs
//! them. `CHROMIUM`, `CHROMEDRIVER`, `FIREFOX` and `GECKODRIVER` may name
//! them elsewhere. Without them the tests fail.

mod common;
#[path = "reliability/random_input.rs"]
mod random_input;
#[path = "../actors/tests/support/mod.rs"]
mod support;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::page_text;
use fantoccini::{Client as Browser, ClientBuilder, Locator};
use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};
use support::fault_smtp::{FaultSmtp, Script};

const OPS: &str = "operator-token-c0n5";
const BODY_A: &str = "BODY-A-approve-me-7c1";
const BODY_B: &str = "BODY-B-reject-me-4e9";
const BODY_C: &str = "BODY-C-stays-held-2d8";

/// A child process killed on drop, with its process group when it leads
/// one: the WebDriver server runs in a group of its own, and the browser it
/// starts is in that group, so a test that panics leaves neither running.
struct Killed {
    child: Child,
    group: bool,
}

impl Drop for Killed {
    fn drop(&mut self) {
        if self.group {
            // kill(1) with a negative pid signals the whole process group.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config_toml(dir: &Path, sink: u16, flaky: u16) -> String {
    format!(
        r#"
send_deadline = "8s"
shutdown_grace = "1s"

[queue]
path = "{db}"

[policy]
allowed_recipients = ["@example.org"]
approval = "outside_allowlist"

[[operators]]
name = "ops"
token_env = "OPS_TOKEN"

[[relays]]
name = "sink"
host = "127.0.0.1"
port = {sink}
tls = "none"
from_email = "sender@example.org"
priority = 10
timeout = "3s"

[[relays]]
name = "flaky"
host = "127.0.0.1"
port = {flaky}
tls = "none"
priority = 1
timeout = "3s"
backoff_base = "60s"
backoff_max = "60s"
"#,
        db = dir.join("queue.db").display(),
    )
}

/// The browsers the console is tested in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chromium,
    Firefox,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Chromium => "chromium",
            Kind::Firefox => "firefox",
        }
    }
}

fn tool_path(var: &str, candidates: &[PathBuf], install: &str) -> PathBuf {
    let path = match std::env::var_os(var) {
        Some(p) => PathBuf::from(p),
        None => candidates
            .iter()
            .find(|p| p.exists())
            .cloned()
            .unwrap_or_else(|| candidates[0].clone()),
    };
    assert!(
        path.exists(),
        "{} is missing: {install} (or set {var})",
        path.display()
    );
    path
}

/// geckodriver: `GECKODRIVER`, else on `PATH`, else where `cargo install`
/// puts it.
fn geckodriver_candidates() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("geckodriver"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        out.push(Path::new(&home).join(".cargo/bin/geckodriver"));
    }
    out
}

fn screenshots() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
        PathBuf::from,
    );
    let dir = target.join("console");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shoot(b: &Browser, kind: Kind, name: &str) {
    let png = b.screenshot().await.expect("a screenshot");
    let dir = screenshots().join(kind.name());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

async fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The browser's WebDriver server on a free port, and a headless session
/// on it: Chromium through ChromeDriver, or Firefox through geckodriver.
async fn browser(kind: Kind, profile: &Path) -> (Killed, Browser) {
    let port = common::free_port();
    let (driver, args, caps) = match kind {
        Kind::Chromium => {
            let chromium = tool_path(
                "CHROMIUM",
                &["/usr/bin/chromium".into()],
                "install Debian's chromium",
            );
            let driver = tool_path(
                "CHROMEDRIVER",
                &["/usr/bin/chromedriver".into()],
                "install Debian's chromium-driver",
            );
            let caps = json!({ "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--disable-quic",
                    "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.display()),
                ]
            }});
            (driver, vec![format!("--port={port}")], caps)
        }
        Kind::Firefox => {
            let firefox = tool_path(
                "FIREFOX",
                &["/usr/bin/firefox-esr".into(), "/usr/bin/firefox".into()],
                "install Debian's firefox-esr",
            );
            let driver = tool_path(
                "GECKODRIVER",
                &geckodriver_candidates(),
                "cargo install --locked geckodriver",
            );
            std::fs::create_dir_all(profile).unwrap();
            let caps = json!({ "moz:firefoxOptions": {
                "binary": firefox,
                "args": ["-headless", "-width", "1280", "-height", "1000",
                         "-profile", profile.display().to_string()],
                "prefs": {
                    "network.proxy.type": 0,
                    "app.update.enabled": false,
                    "browser.shell.checkDefaultBrowser": false,
                    "datareporting.policy.dataSubmissionEnabled": false,
                    "toolkit.telemetry.enabled": false,
                }
            }});
            (
                driver,
                vec![
                    format!("--port={port}"),
                    "--host=127.0.0.1".into(),
                    format!("--websocket-port={}", common::free_port()),
                ],
                caps,
            )
        }
    };
    let child = Command::new(driver)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("the WebDriver server starts");
    let child = Killed { child, group: true };
    wait_port(port).await;
    let caps = match caps {
        Value::Object(m) => m,
        _ => unreachable!("capabilities are an object"),
    };
    // fantoccini's rustls has both providers in this build: pick one.
    let _ = tokio_rustls::rustls::crypto::aws_lc_rs::default_provider().install_default();
    let b = ClientBuilder::rustls()
        .expect("a WebDriver client")
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .unwrap_or_else(|e| panic!("a {} session: {e}", kind.name()));
    (child, b)
}

type Mcp = RunningService<RoleClient, ()>;

async fn call(c: &Mcp, tool: &str, args: Value) -> Value {
    let mut params = CallToolRequestParams::new(tool.to_string());
    if let Value::Object(map) = args {
        params = params.with_arguments(map);
    }
    let r = tokio::time::timeout(Duration::from_secs(30), c.peer().call_tool(params))
        .await
        .expect("answer within 30 s")
        .expect("no protocol error");
    r.structured_content.unwrap_or(Value::Null)
}

async fn held(c: &Mcp, args: Value) -> String {
    let out = call(c, "send_email", args).await;
    assert_eq!(out["status"], "held", "{out}");
    out["message_id"].as_str().unwrap().to_owned()
}

async fn wait_status(c: &Mcp, id: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = call(c, "get_message_status", json!({ "message_id": id })).await;
        if s["status"] == want {
            return;
        }
        assert!(Instant::now() < deadline, "{id} never became {want}: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn delivered_to(sink: &FaultSmtp, rcpt: &str) -> usize {
    sink.delivered()
        .iter()
        .filter(|r| r.rcpt_to.iter().any(|t| t == rcpt))
        .count()
}

/// The text of `css` once it contains `want`: after a click the old page
/// may still be showing (or its elements going stale) for a moment.
async fn text_with(b: &Browser, css: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(e) = b.find(Locator::Css(css)).await
            && let Ok(t) = e.text().await
        {
            if t.contains(want) {
                return t;
            }
            last = t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{css} never showed {want:?}; last: {last:?}")
}

async fn text_of(b: &Browser, css: &str) -> String {
    b.wait()
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_sign_in_watch_relays_and_decide_held_mail_in_chromium() {
    operators_sign_in_watch_relays_and_decide_held_mail(Kind::Chromium).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_sign_in_watch_relays_and_decide_held_mail_in_firefox() {
    operators_sign_in_watch_relays_and_decide_held_mail(Kind::Firefox).await;
}

/// The real binary serving HTTP in `dir` with [`config_toml`] (its log in
/// `dir/daemon.log`), once it listens: the process, its base URL and an MCP
/// client.
async fn serve(dir: &Path, sink: &FaultSmtp, flaky: &FaultSmtp) -> (Killed, String, Mcp) {
    serve_with(dir, sink, flaky, &[]).await
}

/// [`serve`] with more environment for the daemon.
async fn serve_with(
    dir: &Path,
    sink: &FaultSmtp,
    flaky: &FaultSmtp,
    env: &[(&str, &str)],
) -> (Killed, String, Mcp) {
    let config = dir.join("mailmux.toml");
    std::fs::write(&config, config_toml(dir, sink.port(), flaky.port())).unwrap();
    let port = common::free_port();
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    let daemon = Killed {
        child: Command::new(env!("CARGO_BIN_EXE_mailmux"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("OPS_TOKEN", OPS)
            .envs(env.iter().copied())
            .arg("--config")
            .arg(&config)
            .args(["serve", "--http", &format!("127.0.0.1:{port}")])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mailmux starts"),
        group: false,
    };
    wait_port(port).await;
    let base = format!("http://127.0.0.1:{port}");
    let mcp: Mcp = ()
        .serve(StreamableHttpClientTransport::from_uri(format!(
            "{base}/mcp"
        )))
        .await
        .expect("an MCP client over HTTP");
    (daemon, base, mcp)
}

async fn operators_sign_in_watch_relays_and_decide_held_mail(kind: Kind) {
    let sink = FaultSmtp::start(Script::ok()).await;
    let flaky = FaultSmtp::start(Script::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, base, mcp) = serve(dir.path(), &sink, &flaky).await;

    let (_driver, b) = browser(kind, &dir.path().join(kind.name())).await;

    // No session: to the sign-in page.
    b.goto(&format!("{base}/console")).await.unwrap();
    assert_eq!(b.current_url().await.unwrap().path(), "/console/login");
    shoot(&b, kind, "login").await;
    // A wrong token is refused.
    b.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys("not-the-token")
        .await
        .unwrap();
    b.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    text_with(&b, "[role=alert]", "not an operator token").await;
    assert_eq!(b.current_url().await.unwrap().path(), "/console/login");
    // The operator token signs in.
    b.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(OPS)
        .await
        .unwrap();
    b.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert_eq!(text_with(&b, "main h1", "Overview").await, "Overview");
    assert_eq!(b.current_url().await.unwrap().path(), "/console");
    let cookie = b.get_named_cookie("mailmux_console").await.unwrap();
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(
        cookie.same_site().map(|s| s.to_string()),
        Some("Strict".to_owned())
    );
    let session = cookie.value().to_owned();

    // Traffic: one message delivered, then one that prefers the flaky relay
    // after its server stopped: it fails over, and the relay backs off.
    let out = call(
        &mcp,
        "send_email",
        json!({ "to": ["ok@example.org"], "subject": "hi", "body": "plain",
                "metadata": {"customer_id": "c-1", "order": "o-9"} }),
    )
    .await;
    assert_eq!(out["status"], "sent", "{out}");
    let first = out["message_id"].as_str().unwrap().to_owned();
    flaky.kill().await;
    let out = call(
        &mcp,
        "send_email",
        json!({ "to": ["ok2@example.org"], "subject": "hi", "body": "plain", "relay": "flaky" }),
    )
    .await;
    assert_eq!(out["status"], "sent", "{out}");
    assert_eq!(out["relay"], "sink", "{out}");
    b.goto(&format!("{base}/console/relays")).await.unwrap();
    let row = text_of(&b, "tr[data-relay=flaky]").await;
    assert!(row.contains("backing_off"), "{row}");
    let row = text_of(&b, "tr[data-relay=sink]").await;
    assert!(row.contains("healthy"), "{row}");
    shoot(&b, kind, "relays").await;
    // Pin, unpin and reconnect.
    let click = |css: String| {
        let b = &b;
        async move {
            b.find(Locator::Css(&css))
                .await
                .unwrap_or_else(|e| panic!("{css}: {e}"))
                .click()
                .await
                .unwrap();
        }
    };
    click("tr[data-relay=sink] form[action$='/pin'] button".into()).await;
    text_with(&b, "[role=status]", "Pinned sink").await;
    text_with(&b, "main .card", "Pinned to sink").await;
    let selection = call(&mcp, "get_smtp_status", json!({})).await;
    assert_eq!(selection["pinned"], "sink", "{selection}");
    click("form[action='/console/relays/unpin'] button".into()).await;
    text_with(&b, "main .card", "No relay is pinned").await;
    click("tr[data-relay=sink] form[action$='/reconnect'] button".into()).await;
    text_with(&b, "[role=status]", "Reconnected sink: it is healthy").await;

    // The suppression list: an address added in the console is refused at
    // the next call; removed, it is accepted again.
    b.goto(&format!("{base}/console/suppressions"))
        .await
        .unwrap();
    text_with(&b, "main", "No address is listed").await;
    b.find(Locator::Css("#address"))
        .await
        .unwrap()
        .send_keys("Blocked@Example.org")
        .await
        .unwrap();
    b.find(Locator::Css("#note"))
        .await
        .unwrap()
        .send_keys("asked by phone")
        .await
        .unwrap();
    click("form[action='/console/suppressions/add'] button".into()).await;
    text_with(&b, "[role=status]", "Listed blocked@example.org").await;
    let row = text_of(&b, "tr[data-address='blocked@example.org']").await;
    assert!(
        row.contains("manual") && row.contains("asked by phone"),
        "{row}"
    );
    shoot(&b, kind, "suppressions").await;
    let out = call(
        &mcp,
        "send_email",
        json!({ "to": ["blocked@example.org"], "subject": "hi", "body": "plain" }),
    )
    .await;
    assert_eq!(out["error"]["code"], "recipient_suppressed", "{out}");
    assert_eq!(out["error"]["rule"], "manual", "{out}");
    click("tr[data-address='blocked@example.org'] form button".into()).await;
    text_with(&b, "[role=status]", "Removed blocked@example.org").await;
    text_with(&b, "main", "No address is listed").await;
    let out = call(
        &mcp,
        "send_email",
        json!({ "to": ["blocked@example.org"], "subject": "hi", "body": "plain", "dry_run": true }),
    )
    .await;
    assert_eq!(out["status"], "dry_run", "{out}");

    // Delivery paused from the overview: a call that waits is answered
    // `queued` and nothing goes out; resumed, the message is sent once.
    b.goto(&format!("{base}/console")).await.unwrap();
    text_with(&b, "#delivery", "running").await;
    b.find(Locator::Css(
        "form[action='/console/delivery/pause'] input[name=reason]",
    ))
    .await
    .unwrap()
    .send_keys("relay review")
    .await
    .unwrap();
    click("form[action='/console/delivery/pause'] button".into()).await;
    text_with(&b, "[role=status]", "Paused:").await;
    let shown = text_with(&b, "#delivery", "paused").await;
    assert!(
        shown.contains("operator ops") && shown.contains("relay review"),
        "{shown}"
    );
    shoot(&b, kind, "paused").await;
    let out = call(
        &mcp,
        "send_email",
        json!({ "to": ["paused@example.org"], "subject": "hi", "body": "plain" }),
    )
    .await;
    assert_eq!(out["status"], "queued", "{out}");
    let paused_id = out["message_id"].as_str().unwrap().to_owned();
    click("form[action='/console/delivery/resume'] button".into()).await;
    text_with(&b, "[role=status]", "Resumed").await;
    text_with(&b, "#delivery", "running").await;
    wait_status(&mcp, &paused_id, "sent").await;
    assert_eq!(delivered_to(&sink, "paused@example.org"), 1);

    // A long list, imported by the queue command: a hundred addresses a
    // page, and a search by part of an address.
    let file = dir.path().join("bulk.txt");
    let lines: Vec<String> = (0..250)
        .map(|i| format!("bulk{i:03}@list.example"))
        .collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let import = Command::new(env!("CARGO_BIN_EXE_mailmux"))
        .env("OPS_TOKEN", OPS)
        .arg("--config")
        .arg(dir.path().join("mailmux.toml"))
        .args(["queue", "suppress", "add", "--file"])
        .arg(&file)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(import.status.success(), "{import:?}");
    b.goto(&format!("{base}/console/suppressions"))
        .await
        .unwrap();
    text_with(
        &b,
        "#count",
        "250 listed; bulk000@list.example to bulk099@list.example shown",
    )
    .await;
    let rows = b.find_all(Locator::Css("tr[data-address]")).await.unwrap();
    assert_eq!(rows.len(), 100);
    click("#next".into()).await;
    text_with(&b, "#count", "bulk100@list.example to bulk199@list.example").await;
    click("#next".into()).await;
    text_with(&b, "#count", "bulk200@list.example to bulk249@list.example").await;
    assert!(
        b.find(Locator::Css("#next")).await.is_err(),
        "no page after the last"
    );
    b.find(Locator::Css("#q"))
        .await
        .unwrap()
        .send_keys("BULK17")
        .await
        .unwrap();
    click("form[action='/console/suppressions'] button".into()).await;
    text_with(&b, "#count", "250 listed, 10 holding “bulk17”").await;
    let rows = b.find_all(Locator::Css("tr[data-address]")).await.unwrap();
    assert_eq!(rows.len(), 10);
    shoot(&b, kind, "suppressions-search").await;

    // Three held messages (outside the allowlist); A has a Bcc.
    let a = held(
        &mcp,
        json!({ "to": ["alice@outside.net"], "bcc": ["hidden@example.org"],
                "subject": "Quarterly numbers", "body": BODY_A, "wait": false }),
    )
    .await;
    let bb = held(
        &mcp,
        json!({ "to": ["bob@outside.net"], "subject": "Please reject", "body": BODY_B, "wait": false }),
    )
    .await;
    let c = held(
        &mcp,
        json!({ "to": ["carol@outside.net"], "subject": "Stays held", "body": BODY_C, "wait": false }),
    )
    .await;

    b.goto(&format!("{base}/console")).await.unwrap();
    shoot(&b, kind, "overview").await;
    b.goto(&format!("{base}/console/queue")).await.unwrap();
    let listing = text_of(&b, "table").await;
    assert!(listing.contains(&a) && listing.contains(&bb), "{listing}");
    shoot(&b, kind, "queue").await;
    b.goto(&format!("{base}/console/queue?recipient=bob%40outside"))
        .await
        .unwrap();
    let listing = text_of(&b, "table").await;
    assert!(
        listing.contains(&bb) && !listing.contains(&a),
        "the recipient filter: {listing}"
    );

    b.goto(&format!("{base}/console/approvals")).await.unwrap();
    let card = text_of(&b, &format!("div[data-message='{a}']")).await;
    assert!(card.contains(BODY_A), "the approval shows the body: {card}");
    assert!(card.contains("Quarterly numbers"), "{card}");
    assert!(
        card.contains("hidden@example.org") && card.contains("bcc"),
        "bcc marked: {card}"
    );
    shoot(&b, kind, "approvals").await;

    // Open A, read it, approve it.
    b.find(Locator::Css(&format!("div[data-message='{a}'] dd a")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert!(
        b.current_url()
            .await
            .unwrap()
            .path()
            .starts_with("/console/messages/"),
        "on the message's page"
    );
    let body = text_of(&b, "pre.body").await;
    assert!(body.contains(BODY_A), "{body}");
    shoot(&b, kind, "message").await;
    b.find(Locator::Css("button[data-action=approve]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    text_with(&b, "[role=status]", "Approved").await;
    wait_status(&mcp, &a, "sent").await;
    // Exactly once at the sink, to both envelope recipients.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(delivered_to(&sink, "alice@outside.net"), 1);
    assert_eq!(delivered_to(&sink, "hidden@example.org"), 1);

    // Reject B from the approvals page.
    b.goto(&format!("{base}/console/approvals")).await.unwrap();
    b.find(Locator::Css(&format!(
        "div[data-message='{bb}'] button[data-action=reject]"
    )))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    text_with(&b, "[role=status]", "Rejected").await;
    wait_status(&mcp, &bb, "rejected").await;

    // A scheduled mail merge cancelled whole from its batch's queue page.
    let merge = call(
        &mcp,
        "send_batch",
        json!({"defaults": {"subject": "Merge", "body": "b"}, "send_at": "1h",
               "messages": [{"to": ["m1@example.org"]}, {"to": ["m2@example.org"]}]}),
    )
    .await;
    assert_eq!(merge["summary"], json!({"scheduled": 2}), "{merge}");
    let batch = merge["batch_id"].as_str().unwrap();
    b.goto(&format!("{base}/console/queue?batch={batch}"))
        .await
        .unwrap();
    b.find(Locator::Css("button[data-action=cancel-batch]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    text_with(
        &b,
        "[role=status]",
        "Cancelled 2 of the batch's 2 messages; now: 2 cancelled.",
    )
    .await;
    for r in merge["results"].as_array().unwrap() {
        wait_status(&mcp, r["message_id"].as_str().unwrap(), "cancelled").await;
    }
    // The batch's page counts its messages per state.
    b.goto(&format!("{base}/console/queue?batch={batch}"))
        .await
        .unwrap();
    text_with(&b, "p.summary", "This batch: 2 messages · 2 cancelled").await;

    // A held mail merge approved whole: from its batch's queue page to its
    // approvals, one button for every message shown.
    let held_merge = call(
        &mcp,
        "send_batch",
        json!({"defaults": {"subject": "Offer for {n}", "body": "Dear {n}"},
               "messages": [{"to": ["d1@outside.net"], "template_vars": {"n": "D1"}},
                            {"to": ["d2@outside.net"], "template_vars": {"n": "D2"}},
                            {"to": ["d3@example.org"], "template_vars": {"n": "D3"}}]}),
    )
    .await;
    assert_eq!(
        held_merge["summary"],
        json!({"held": 2, "sent": 1}),
        "{held_merge}"
    );
    let batch = held_merge["batch_id"].as_str().unwrap();
    b.goto(&format!("{base}/console/queue?batch={batch}"))
        .await
        .unwrap();
    b.find(Locator::Css("a[href^='/console/approvals?batch=']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert_eq!(
        b.find_all(Locator::Css("div[data-message]"))
            .await
            .unwrap()
            .len(),
        2,
        "the batch's two held messages, and no other"
    );
    shoot(&b, kind, "approvals-batch").await;
    b.find(Locator::Css("button[data-action=approve-batch]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    text_with(&b, "[role=status]", "Approved 2 of the 2 messages shown.").await;
    for r in held_merge["results"].as_array().unwrap() {
        wait_status(&mcp, r["message_id"].as_str().unwrap(), "sent").await;
    }
    assert_eq!(delivered_to(&sink, "d1@outside.net"), 1);
    assert_eq!(delivered_to(&sink, "d2@outside.net"), 1);

    // Another site cannot frame the console (an approve button under a
    // decoy): the browser refuses to show it in the frame, signed in or not.
    let decoy = serve_decoy(&format!("{base}/console/approvals")).await;
    b.goto(&decoy).await.unwrap();
    assert_eq!(text_with(&b, "h1", "Win a prize").await, "Win a prize");
    b.enter_frame(0).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let framed = b.find(Locator::Css("main h1")).await;
    assert!(
        framed.is_err(),
        "the console rendered inside another site's frame"
    );
    b.enter_parent_frame().await.unwrap();

    // Over plain HTTP with the browser's session: the CSRF token is needed.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let cookie = format!("mailmux_console={session}");
    let page = page_text(&http, &format!("{base}/console/messages/{c}"), &cookie).await;
    assert!(
        page.contains(BODY_C),
        "the message's own page shows its body"
    );
    let hash = between(&page, "name=\"hash\" value=\"", "\"");
    let csrf = between(&page, "name=\"csrf\" value=\"", "\"");
    for form in [
        vec![("hash", hash.as_str())],
        vec![("hash", hash.as_str()), ("csrf", "0000")],
    ] {
        let r = http
            .post(format!("{base}/console/messages/{c}/approve"))
            .header("Cookie", &cookie)
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "a form without the CSRF token");
    }
    // With the token but for other content: refused too.
    let other = "ab".repeat(32);
    let r = http
        .post(format!("{base}/console/messages/{c}/approve"))
        .header("Cookie", &cookie)
        .form(&[("hash", other.as_str()), ("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let to = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(to.contains("not%20the%20one%20shown"), "{to}");
    wait_status(&mcp, &c, "held").await;
    // A batch's form is bound the same way, message by message, and one
    // that names no content changes nothing.
    let wrong = format!("{c} {other}");
    for (form, says) in [
        (
            vec![("m", wrong.as_str()), ("csrf", csrf.as_str())],
            "not%20the%20one%20shown",
        ),
        (vec![("csrf", csrf.as_str())], "did%20not%20name"),
    ] {
        let r = http
            .post(format!("{base}/console/batches/some-batch/approve"))
            .header("Cookie", &cookie)
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 303);
        let to = r.headers()["location"].to_str().unwrap().to_owned();
        assert!(to.contains(says), "{to}");
    }
    wait_status(&mcp, &c, "held").await;

    // Every console response, signed in or not, forbids scripts, framing,
    // caching and referrers.
    for (path, with_cookie) in [
        ("/console/login", false),
        ("/console", false),
        ("/console/approvals", true),
        (&*format!("/console/messages/{c}"), true),
    ] {
        let mut req = http.get(format!("{base}{path}"));
        if with_cookie {
            req = req.header("Cookie", &cookie);
        }
        let r = req.send().await.unwrap();
        let h = r.headers();
        let csp = h["content-security-policy"].to_str().unwrap();
        for directive in [
            "default-src 'none'",
            "frame-ancestors 'none'",
            "form-action 'self'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(!csp.contains("script-src"), "{path}: {csp}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        assert_eq!(h["cache-control"], "no-store", "{path}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
    }

    // A state the URL names that does not exist is said, and every state
    // is listed.
    let page = page_text(
        &http,
        &format!("{base}/console/queue?state=sendingg"),
        &cookie,
    )
    .await;
    assert!(
        page.contains("No state is named &quot;sendingg&quot;"),
        "{page}"
    );
    assert!(page.contains(&c), "every state is listed");
    // So is a report reason; and no message of this daemon has a report.
    let page = page_text(
        &http,
        &format!("{base}/console/queue?reported=bouncy"),
        &cookie,
    )
    .await;
    assert!(
        page.contains("No report is named &quot;bouncy&quot;"),
        "{page}"
    );
    assert!(page.contains(&c), "with or without reports, all are listed");
    let page = page_text(
        &http,
        &format!("{base}/console/queue?reported=bounced"),
        &cookie,
    )
    .await;
    assert!(
        page.contains("No message matches.") && !page.contains(&c),
        "{page}"
    );
    // By metadata names and values, one a line: the message sent with
    // each of them, and the search kept in the form; one written wrong is
    // said and left out.
    let page = page_text(
        &http,
        &format!("{base}/console/queue?metadata=customer_id%3Dc-1"),
        &cookie,
    )
    .await;
    assert!(page.contains(&first) && !page.contains(&c), "{page}");
    assert!(page.contains(">customer_id=c-1</textarea>"), "{page}");
    let page = page_text(
        &http,
        &format!("{base}/console/queue?metadata=order%3Do-9%0D%0Acustomer_id%3Dc-1%0A"),
        &cookie,
    )
    .await;
    assert!(page.contains(&first) && !page.contains(&c), "{page}");
    assert!(
        page.contains(">customer_id=c-1\norder=o-9</textarea>"),
        "{page}"
    );
    let page = page_text(
        &http,
        &format!("{base}/console/queue?metadata=customer_id%3Dc-1%0Aorder%3Do-8"),
        &cookie,
    )
    .await;
    assert!(
        page.contains("No message matches.") && !page.contains(&first),
        "{page}"
    );
    let page = page_text(
        &http,
        &format!("{base}/console/queue?metadata=order%3Do-9%0Aorder%3Do-8"),
        &cookie,
    )
    .await;
    assert!(page.contains("order is given twice"), "{page}");
    assert!(page.contains(&c) && page.contains(&first), "{page}");
    let page = page_text(
        &http,
        &format!("{base}/console/queue?metadata=customer_id"),
        &cookie,
    )
    .await;
    assert!(
        page.contains("No metadata search &quot;customer_id&quot;"),
        "{page}"
    );
    assert!(page.contains(&c) && page.contains(&first), "{page}");

    // A body appears only on its message's page and on the approvals page.
    for path in ["/console", "/console/queue", "/console/relays"] {
        let page = page_text(&http, &format!("{base}{path}"), &cookie).await;
        for marker in [BODY_A, BODY_B, BODY_C] {
            assert!(!page.contains(marker), "{path} shows a body");
        }
        assert!(!page.contains(OPS), "{path} shows the operator token");
    }

    // No page works without a session.
    for path in [
        "/console",
        "/console/queue",
        "/console/approvals",
        "/console/relays",
        &format!("/console/messages/{c}"),
    ] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 303, "{path}");
        assert_eq!(r.headers()["location"], "/console/login", "{path}");
        let r = http
            .get(format!("{base}{path}"))
            .header("Cookie", "mailmux_console=forged")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 303, "{path} with a forged session");
    }
    let r = http
        .post(format!("{base}/console/messages/{c}/approve"))
        .form(&[("hash", hash.as_str()), ("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303, "an action without a session");
    wait_status(&mcp, &c, "held").await;

    // The listener's Host and Origin checks apply to the console.
    let r = http
        .get(format!("{base}/console/login"))
        .header("Host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let r = http
        .post(format!("{base}/console/login"))
        .header("Origin", "http://evil.example")
        .form(&[("token", OPS)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    // Signing in sets the cookie flags.
    let r = http
        .post(format!("{base}/console/login"))
        .form(&[("token", OPS)])
        .send()
        .await
        .unwrap();
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );

    // B never reached the sink; C is still held.
    assert_eq!(delivered_to(&sink, "bob@outside.net"), 0);
    assert_eq!(delivered_to(&sink, "carol@outside.net"), 0);
    let _ = b.close().await;
}

/// Serves, on a port of its own (another origin), a page that frames
/// `target`; returns its URL.
async fn serve_decoy(target: &str) -> String {
    let page = format!(
        "<!doctype html><html><body><h1>Win a prize</h1>\
         <iframe src=\"{target}\" width=\"800\" height=\"600\"></iframe></body></html>"
    );
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let page = page.clone();
            async move { axum::response::Html(page) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://127.0.0.1:{port}/")
}

/// The text between `start` and the next `end`.
fn between(s: &str, start: &str, end: &str) -> String {
    let at = s.find(start).unwrap_or_else(|| panic!("no {start:?}")) + start.len();
    let len = s[at..].find(end).unwrap();
    s[at..at + len].to_owned()
}

/// `s` with every byte but the unreserved ones percent-encoded, for a path
/// segment or a query value.
fn escaped(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A random string short enough for a URL (the client refuses one past
/// 64 KiB).
fn short_string(rng: &mut rand::rngs::StdRng) -> String {
    random_input::string(rng).chars().take(1500).collect()
}

/// 1,500 random requests to the console over plain HTTP, signed in and not,
/// with the right CSRF token and without: every route with real and random
/// ids, random query strings and form fields. Each is answered below 500,
/// and the daemon still serves and logged no panic after them. The count
/// of failed authentications is off, so that the random sign-ins reach the
/// console rather than a refusal of the test's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_console_requests_are_answered_below_500() {
    use rand::{Rng, SeedableRng};
    let seed = random_input::seed();
    println!("MAILMUX_RANDOM_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let sink = FaultSmtp::start(Script::ok()).await;
    let flaky = FaultSmtp::start(Script::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let no_lockout = [("MAILMUX_HTTP__AUTH_FAILURES", "off")];
    let (_daemon, base, mcp) = serve_with(dir.path(), &sink, &flaky, &no_lockout).await;
    // Messages to act on: delivered, held one by one, and a held batch.
    let mut ids = Vec::new();
    for i in 0..3 {
        let out = call(
            &mcp,
            "send_email",
            json!({"to": format!("r{i}@example.org"), "subject": "s", "body": "b"}),
        )
        .await;
        ids.push(out["message_id"].as_str().unwrap().to_owned());
        ids.push(
            held(
                &mcp,
                json!({"to": format!("r{i}@elsewhere.example"), "subject": "s", "body": "b"}),
            )
            .await,
        );
    }
    let batch = call(
        &mcp,
        "send_batch",
        json!({
            "defaults": {"subject": "s", "body": "b"},
            "messages": [{"to": "a@elsewhere.example"}, {"to": "b@elsewhere.example"}],
        }),
    )
    .await;
    let batch_id = batch["batch_id"].as_str().unwrap_or("no-batch").to_owned();

    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let signed_in = http
        .post(format!("{base}/console/login"))
        .form(&[("token", OPS)])
        .send()
        .await
        .unwrap();
    let session = signed_in
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix("mailmux_console="))
        .and_then(|v| v.split(';').next())
        .expect("the operator token signs in")
        .to_owned();
    let cookie = format!("mailmux_console={session}");
    let page = page_text(
        &http,
        &format!("{base}/console/messages/{}", ids[1]),
        &cookie,
    )
    .await;
    let csrf = between(&page, "name=\"csrf\" value=\"", "\"");

    let mut statuses = std::collections::BTreeMap::new();
    for n in 0..1500 {
        let id = match rng.random_range(0..4) {
            0 => batch_id.clone(),
            1 => escaped(&short_string(&mut rng)),
            _ => ids[rng.random_range(0..ids.len())].clone(),
        };
        let relay = ["sink", "flaky", "nope", "%00", "..%2F.."][rng.random_range(0..5)];
        let action = [
            "cancel",
            "retry",
            "approve",
            "reject",
            "reconnect",
            "pin",
            "x",
        ][rng.random_range(0..7)];
        let path = match rng.random_range(0..12) {
            0 => "/console".to_owned(),
            1 => "/console/queue".to_owned(),
            2 => "/console/approvals".to_owned(),
            3 => "/console/relays".to_owned(),
            4 => "/console/login".to_owned(),
            5 => format!("/console/relays/{relay}/{action}"),
            6 if rng.random_bool(0.5) => "/console/relays/unpin".to_owned(),
            6 => [
                "/console/suppressions",
                "/console/suppressions/add",
                "/console/suppressions/remove",
                "/console/delivery/pause",
                "/console/delivery/resume",
            ][rng.random_range(0..5)]
            .to_owned(),
            7 => format!("/console/batches/{id}/{action}"),
            8 => format!("/console/{}", escaped(&short_string(&mut rng))),
            9 => format!("/console/messages/{id}"),
            _ => format!("/console/messages/{id}/{action}"),
        };
        let keys = [
            "state",
            "caller",
            "batch",
            "before",
            "notice",
            "cursor",
            "m",
            "hash",
            "token",
            "csrf",
            "address",
            "reason",
            "note",
            "recipient",
            "reported",
            "tag",
            "metadata",
        ];
        let mut pairs = Vec::new();
        for _ in 0..rng.random_range(0..4) {
            let key = if rng.random_bool(0.8) {
                keys[rng.random_range(0..keys.len())].to_owned()
            } else {
                short_string(&mut rng)
            };
            pairs.push((key, short_string(&mut rng)));
        }
        let query: String = pairs
            .iter()
            .map(|(k, v)| format!("{}={}", escaped(k), escaped(v)))
            .collect::<Vec<_>>()
            .join("&");
        let url = if query.is_empty() || rng.random_bool(0.5) {
            format!("{base}{path}")
        } else {
            format!("{base}{path}?{query}")
        };
        let request = if rng.random_bool(0.5) {
            http.get(&url)
        } else {
            let mut form = pairs.clone();
            if rng.random_bool(0.7) {
                form.push(("csrf".into(), csrf.clone()));
            }
            http.post(&url).form(&form)
        };
        let request = match rng.random_range(0..20) {
            0 => request,
            1 => request.header("Cookie", "mailmux_console=not-a-session"),
            _ => request.header("Cookie", &cookie),
        };
        let shown: String = url.chars().take(200).collect();
        let response = request.send().await.unwrap_or_else(|e| {
            panic!(
                "request {n} (seed {seed}) {shown} ({} bytes): {e:?}",
                url.len()
            )
        });
        let status = response.status().as_u16();
        assert!(
            status < 500,
            "request {n} (seed {seed}): {shown} answered {status}"
        );
        *statuses.entry(status).or_insert(0) += 1;
    }
    println!("statuses: {statuses:?}");
    let page = http
        .get(format!("{base}/console/relays"))
        .header("Cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200, "the console still serves");
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}
