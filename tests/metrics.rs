//! `/metrics` against the real binary: after a scripted run (delivered
//! mail, a 550, a 451 that fails over, a held message, refusals) the
//! Prometheus text parses and its counters equal what happened; the token
//! rules; the listener of its own beside stdio; and every metric the shipped
//! Grafana dashboard uses exists; the shipped alerting rules pass promtool and
//! read only metrics a daemon exports.

mod common;
#[path = "../actors/tests/support/mod.rs"]
mod support;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prometheus_parse::{Sample, Scrape, Value as Prom};
use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};
use support::fault_smtp::{Action, FaultSmtp, Script};

const CALLER_TOKEN: &str = "caller-token-1f3e";
const METRICS_TOKEN: &str = "metrics-token-9a2b";

struct Daemon {
    child: Child,
    _dir: tempfile::TempDir,
    base: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config_toml(dir: &Path, primary: u16, backup: u16) -> String {
    format!(
        r#"
send_deadline = "8s"
shutdown_grace = "1s"

[http]
token = "{CALLER_TOKEN}"

[metrics]
token = "{METRICS_TOKEN}"

[queue]
path = "{db}"

[policy]
allowed_recipients = ["@example.org"]
approval = "outside_allowlist"
rate = ["5/min"]

[[relays]]
name = "primary"
host = "127.0.0.1"
port = {primary}
tls = "none"
from_email = "sender@example.org"
priority = 10
timeout = "3s"
backoff_base = "60s"
backoff_max = "60s"

[[relays]]
name = "backup"
host = "127.0.0.1"
port = {backup}
tls = "none"
priority = 1
timeout = "3s"
"#,
        db = dir.join("queue.db").display(),
    )
}

async fn start(primary: u16, backup: u16) -> Daemon {
    start_with(|dir| config_toml(dir, primary, backup)).await
}

/// The daemon over HTTP on the configuration `config` writes for its folder.
async fn start_with(config: impl FnOnce(&Path) -> String) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let text = config(dir.path());
    let config = dir.path().join("mailmux.toml");
    std::fs::write(&config, text).unwrap();
    let port = common::free_port();
    let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_mailmux"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .arg("--config")
        .arg(&config)
        .args(["serve", "--http", &format!("127.0.0.1:{port}")])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("mailmux starts");
    let base = format!("http://127.0.0.1:{port}");
    wait_health(&base).await;
    Daemon {
        child,
        _dir: dir,
        base,
    }
}

async fn wait_health(base: &str) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http.get(format!("{base}/health")).send().await.is_err() {
        assert!(Instant::now() < deadline, "the daemon never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

type Client = RunningService<RoleClient, ()>;

async fn connect(d: &Daemon) -> Client {
    let cfg = StreamableHttpClientTransportConfig::with_uri(format!("{}/mcp", d.base))
        .auth_header(CALLER_TOKEN.to_string());
    ().serve(StreamableHttpClientTransport::from_config(cfg))
        .await
        .expect("client initializes over HTTP")
}

/// One tool call: (isError, structured content).
async fn call(c: &Client, tool: &str, args: Value) -> (bool, Value) {
    let mut params = CallToolRequestParams::new(tool.to_string());
    if let Value::Object(map) = args {
        params = params.with_arguments(map);
    }
    let r = tokio::time::timeout(Duration::from_secs(30), c.peer().call_tool(params))
        .await
        .expect("answer within 30 s")
        .expect("no protocol error");
    (
        r.is_error.unwrap_or(false),
        r.structured_content.unwrap_or(Value::Null),
    )
}

async fn send(c: &Client, to: &str) -> (bool, Value) {
    call(
        c,
        "send_email",
        json!({ "to": [to], "subject": "metrics", "body": "hello" }),
    )
    .await
}

/// `GET /metrics` with `token`: (status, body).
async fn get_metrics(base: &str, token: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new().get(format!("{base}/metrics"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("the daemon answers");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// Parses Prometheus text, first checking that every line is a comment or
/// one well-formed sample (the parser skips what it cannot read).
fn parse(text: &str) -> Vec<Sample> {
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name_labels, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
        let name: String = name_labels
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        assert!(
            name.starts_with("mailmux_"),
            "a metric outside mailmux_: {line:?}"
        );
        let rest = &name_labels[name.len()..];
        assert!(
            rest.is_empty() || (rest.starts_with('{') && rest.ends_with('}')),
            "bad labels: {line:?}"
        );
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "bad value: {line:?}"
        );
    }
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text parses")
        .samples
}

/// The value of the counter or gauge `name` with exactly these labels
/// among its own (others may be present); 0 when there is no such series.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            Prom::Counter(v) | Prom::Gauge(v) | Prom::Untyped(v) => v,
            _ => panic!("{name} is not a single value"),
        })
        .sum()
}

/// The `+Inf` bucket (the count) of a histogram series.
fn histogram_count(samples: &[Sample], name: &str, relay: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.metric == name && s.labels.get("relay") == Some(relay))
        .map(|s| match &s.value {
            Prom::Histogram(buckets) => buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .map_or(0.0, |b| b.count),
            _ => panic!("{name} is not a histogram"),
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_equal_what_happened() {
    let primary = FaultSmtp::start(
        Script::ok()
            .on_rcpt(
                "refused@example.org",
                Action::reply(550, "5.1.1 no such user"),
            )
            .on_rcpt("later@example.org", Action::reply(451, "4.3.0 try later")),
    )
    .await;
    let backup = FaultSmtp::start(Script::ok()).await;
    let d = start(primary.port(), backup.port()).await;

    // The token rules, before anything happened.
    assert_eq!(get_metrics(&d.base, None).await.0, 401, "no token");
    assert_eq!(
        get_metrics(&d.base, Some(CALLER_TOKEN)).await.0,
        401,
        "a caller's token does not open /metrics"
    );
    assert_eq!(get_metrics(&d.base, Some("wrong")).await.0, 401);
    let (code, text) = get_metrics(&d.base, Some(METRICS_TOKEN)).await;
    assert_eq!(code, 200);
    let before = parse(&text);
    assert_eq!(
        value(&before, "mailmux_build_info", &[]),
        1.0,
        "build info: {text}"
    );

    let c = connect(&d).await;
    // Two delivered by the primary.
    for to in ["one@example.org", "two@example.org"] {
        let (err, out) = send(&c, to).await;
        assert!(!err, "{out}");
        assert_eq!(out["status"], "sent", "{out}");
        assert_eq!(out["relay"], "primary", "{out}");
    }
    // A 550: failed for good, no failover.
    let (err, out) = send(&c, "refused@example.org").await;
    assert!(err, "{out}");
    assert_eq!(out["status"], "failed", "{out}");
    // A 451 from the primary: delivered by the backup; the primary backs off.
    let (err, out) = send(&c, "later@example.org").await;
    assert!(!err, "{out}");
    assert_eq!(out["status"], "sent", "{out}");
    assert_eq!(out["relay"], "backup", "{out}");
    // Outside the allowlist: held for approval (this client has no
    // elicitation, so it stays held).
    let (err, out) = call(
        &c,
        "send_email",
        json!({ "to": ["someone@elsewhere.net"], "subject": "metrics", "body": "hello", "wait": false }),
    )
    .await;
    assert!(!err, "{out}");
    assert_eq!(out["status"], "held", "{out}");
    // The sixth message of a 5/min rate: refused, nothing stored.
    let (err, out) = send(&c, "three@example.org").await;
    assert!(err, "{out}");
    assert_eq!(out["error"]["code"], "rate_limited", "{out}");
    // Invalid input: refused.
    let (err, out) = send(&c, "not an address").await;
    assert!(err, "{out}");
    assert_eq!(out["error"]["code"], "invalid_input", "{out}");

    // Refused by the transport before any tool: a wrong token, a foreign
    // Host (three 401s of /metrics came before).
    let http = reqwest::Client::new();
    let wrong = http
        .post(format!("{}/mcp", d.base))
        .bearer_auth("wrong")
        .header("Content-Type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let foreign = http
        .get(format!("{}/health", d.base))
        .header("Host", "mail.attacker.example")
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), 403);

    let (code, text) = get_metrics(&d.base, Some(METRICS_TOKEN)).await;
    assert_eq!(code, 200);
    let m = parse(&text);
    let http_refused =
        |status: &str| value(&m, "mailmux_http_refused_total", &[("status", status)]);
    assert_eq!(http_refused("401"), 4.0, "{text}");
    assert_eq!(http_refused("403"), 1.0, "{text}");
    assert_eq!(http_refused("413") + http_refused("408"), 0.0, "{text}");
    // The client's session and at least the scrape's connection are open.
    assert_eq!(value(&m, "mailmux_mcp_sessions", &[]), 1.0, "{text}");
    assert!(value(&m, "mailmux_http_connections", &[]) >= 1.0, "{text}");
    let msgs = |status: &str| {
        value(
            &m,
            "mailmux_messages_total",
            &[("caller", "default"), ("status", status)],
        )
    };
    assert_eq!(msgs("accepted"), 4.0, "{text}");
    assert_eq!(msgs("held"), 1.0, "{text}");
    assert_eq!(msgs("sent"), 3.0, "{text}");
    assert_eq!(msgs("failed"), 1.0, "{text}");
    assert_eq!(msgs("unknown") + msgs("partial") + msgs("expired"), 0.0);

    let attempts = |relay: &str, class: &str| {
        value(
            &m,
            "mailmux_attempts_total",
            &[("relay", relay), ("class", class)],
        )
    };
    assert_eq!(attempts("primary", "sent"), 2.0, "{text}");
    assert_eq!(attempts("primary", "permanent"), 1.0, "{text}");
    assert_eq!(attempts("primary", "transient"), 1.0, "{text}");
    assert_eq!(attempts("backup", "sent"), 1.0, "{text}");
    assert_eq!(attempts("backup", "transient"), 0.0, "{text}");
    assert_eq!(
        value(&m, "mailmux_failovers_total", &[("relay", "primary")]),
        1.0
    );
    assert_eq!(
        value(&m, "mailmux_failovers_total", &[("relay", "backup")]),
        0.0
    );
    assert_eq!(
        histogram_count(&m, "mailmux_delivery_seconds", "primary"),
        2.0,
        "{text}"
    );
    assert_eq!(
        histogram_count(&m, "mailmux_delivery_seconds", "backup"),
        1.0
    );

    let refused = |code: &str| {
        value(
            &m,
            "mailmux_refused_total",
            &[("caller", "default"), ("code", code)],
        )
    };
    assert_eq!(refused("rate_limited"), 1.0, "{text}");
    assert_eq!(refused("invalid_input"), 1.0, "{text}");

    // Seven send_email calls: four answered without error (three sent, one
    // held), three with one.
    let calls = |outcome: &str| {
        value(
            &m,
            "mailmux_mcp_calls_total",
            &[("tool", "send_email"), ("outcome", outcome)],
        )
    };
    assert_eq!(calls("ok"), 4.0, "{text}");
    assert_eq!(calls("error"), 3.0, "{text}");

    // Gauges read at the scrape.
    let queue = |state: &str| value(&m, "mailmux_queue_messages", &[("state", state)]);
    assert_eq!(queue("sent"), 3.0, "{text}");
    assert_eq!(queue("failed"), 1.0);
    assert_eq!(queue("held"), 1.0);
    assert_eq!(queue("queued"), 0.0);
    assert_eq!(value(&m, "mailmux_queue_oldest_age_seconds", &[]), 0.0);
    assert_eq!(value(&m, "mailmux_queue_available", &[]), 1.0);
    // The 5.1.1 refusal listed its recipient.
    assert_eq!(
        value(&m, "mailmux_suppressed_addresses", &[]),
        1.0,
        "{text}"
    );
    let min_free = value(&m, "mailmux_queue_min_free_bytes", &[]);
    assert_eq!(min_free, 104_857_600.0, "queue.min_free's default");
    assert!(value(&m, "mailmux_queue_free_bytes", &[]) > min_free);
    let state = |relay: &str, state: &str| {
        value(
            &m,
            "mailmux_relay_state",
            &[("relay", relay), ("state", state)],
        )
    };
    assert_eq!(state("primary", "backing_off"), 1.0, "{text}");
    assert_eq!(state("primary", "healthy"), 0.0);
    assert_eq!(state("backup", "healthy"), 1.0);
    assert!(value(&m, "mailmux_relay_connections", &[("relay", "backup")]) >= 0.0);

    // No address, subject or message id reaches a label.
    for needle in ["example.org", "elsewhere.net", "metrics\"", "hello", "@"] {
        let labelled = m
            .iter()
            .flat_map(|s| s.labels.values())
            .any(|v| v.contains(needle));
        assert!(!labelled, "a label holds {needle:?}");
    }
    assert!(!text.contains(CALLER_TOKEN) && !text.contains(METRICS_TOKEN));

    // Every metric the shipped dashboard uses exists now.
    let names: BTreeSet<String> = m
        .iter()
        .flat_map(|s| {
            let base = s.metric.clone();
            match s.value {
                Prom::Histogram(_) => vec![
                    format!("{base}_bucket"),
                    format!("{base}_sum"),
                    format!("{base}_count"),
                    base,
                ],
                _ => vec![base],
            }
        })
        .collect();
    let used = dashboard_metrics();
    assert!(used.len() >= 10, "the dashboard uses {used:?}");
    let missing: Vec<_> = used.iter().filter(|u| !names.contains(*u)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard uses metrics that do not exist: {missing:?}"
    );
}

/// The shipped alerting rules (`config/alerts.yml`): promtool finds them
/// well formed and passes their tests (`tests/alerts/mailmux_test.yml`,
/// where each alert fires on what should raise it and not on its near
/// misses), every alert is shown firing there, and every metric they read
/// is one a daemon exports from its start, counters at 0 included (a
/// counter that first appeared at 1 would give `increase()` nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_alerts_pass_their_tests_on_metrics_a_daemon_exports() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let promtool = |args: &[&str]| {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(root)
            .output()
            .expect("promtool runs (Debian's prometheus package; .ci/run installs it)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool {args:?}: {text}");
        text
    };
    let checked = promtool(&["check", "rules", "config/alerts.yml"]);
    let rules = std::fs::read_to_string(root.join("config/alerts.yml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 10, "{alerts:?}");
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{checked}"
    );
    promtool(&["test", "rules", "tests/alerts/mailmux_test.yml"]);
    let tests = std::fs::read_to_string(root.join("tests/alerts/mailmux_test.yml")).unwrap();
    for alert in &alerts {
        let fires = format!("alertname: {alert}\n        exp_alerts:\n          - exp_labels");
        assert!(tests.contains(&fires), "no test shows {alert} firing");
    }

    // A daemon with a content check and a Sent copy, nothing sent yet.
    let d = start_with(|dir| {
        format!(
            r#"
[http]
token = "{CALLER_TOKEN}"

[metrics]
token = "{METRICS_TOKEN}"

[queue]
path = "{db}"

[[policy.content_checks]]
name = "private key"
pattern = '-----BEGIN [A-Z ]*PRIVATE KEY-----'
action = "reject"

[[relays]]
name = "primary"
host = "127.0.0.1"
port = {port}
tls = "none"
username = "agent"
password = "not-used"
from_email = "sender@example.org"

[relays.sent_copy]
imap_host = "127.0.0.1"
port = {port}
tls = "none"
"#,
            db = dir.join("queue.db").display(),
            port = common::free_port(),
        )
    })
    .await;
    let (code, text) = get_metrics(&d.base, Some(METRICS_TOKEN)).await;
    assert_eq!(code, 200);
    let m = parse(&text);
    let exported: BTreeSet<&str> = m.iter().map(|s| s.metric.as_str()).collect();
    let mut read = BTreeSet::new();
    let code: String = rules
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let mut rest = code.as_str();
    while let Some(at) = rest.find("mailmux_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        read.insert(name);
    }
    assert!(read.len() >= 10, "{read:?}");
    let missing: Vec<_> = read
        .iter()
        .filter(|n| !exported.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the alerts read {missing:?}, which a daemon does not export: {text}"
    );
    // The counters the alerts count with increase() are there at 0.
    for (name, labels) in [
        (
            "mailmux_messages_total",
            &[("caller", "default"), ("status", "unknown")][..],
        ),
        (
            "mailmux_messages_total",
            &[("caller", "local"), ("status", "failed")],
        ),
        (
            "mailmux_refused_total",
            &[("caller", "default"), ("code", "policy_denied")],
        ),
        (
            "mailmux_content_checks_total",
            &[
                ("caller", "default"),
                ("check", "private key"),
                ("action", "reject"),
            ],
        ),
        (
            "mailmux_reports_total",
            &[("caller", "default"), ("reason", "complained")],
        ),
        ("mailmux_http_refused_total", &[("status", "401")]),
        (
            "mailmux_sent_copies_total",
            &[("relay", "primary"), ("outcome", "failed")],
        ),
    ] {
        let there = m.iter().any(|s| {
            s.metric == name
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
                && matches!(s.value, Prom::Counter(v) if v == 0.0)
        });
        assert!(there, "{name} {labels:?} at 0: {text}");
    }
}

/// The metric names in every `expr` of `config/grafana-dashboard.json`.
fn dashboard_metrics() -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("the dashboard exists");
    let json: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&json, &mut exprs);
    assert!(!exprs.is_empty(), "the dashboard has no queries");
    let mut names = BTreeSet::new();
    for e in exprs {
        let mut rest = e.as_str();
        while let Some(at) = rest.find("mailmux_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            names.insert(name);
        }
    }
    names
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdio_daemon_serves_metrics_on_a_listener_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailmux"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MAILMUX_QUEUE__PATH", common::queue_db())
        .env("MAILMUX_OUTBOX_DIR", dir.path().join("outbox"))
        .args(["serve", "--metrics", &format!("127.0.0.1:{port}")])
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mailmux starts");
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        match reqwest::get(format!("{base}/metrics")).await {
            Ok(r) => {
                // No metrics.token: open to loopback peers.
                assert_eq!(r.status().as_u16(), 200);
                break r.text().await.unwrap();
            }
            Err(_) => {
                assert!(
                    Instant::now() < deadline,
                    "the metrics listener never answered"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let m = parse(&text);
    assert_eq!(value(&m, "mailmux_build_info", &[]), 1.0, "{text}");
    let states: HashMap<String, f64> = m
        .iter()
        .filter(|s| s.metric == "mailmux_relay_state")
        .filter_map(|s| match s.value {
            Prom::Gauge(v) => Some((s.labels.get("state")?.to_owned(), v)),
            _ => None,
        })
        .collect();
    assert_eq!(states.get("healthy"), Some(&1.0), "{text}");
    // Only /metrics is served there.
    let other = reqwest::get(format!("{base}/mcp")).await.unwrap();
    assert_eq!(other.status().as_u16(), 404);
    drop(child.stdin.take());
    let _ = child.wait();
}
