//! Agent safety against the real binary over streamable HTTP, with rmcp's
//! client: callers named by their tokens, each with its own policy; every
//! bypass attempt refused before any MAIL reaches the SMTP server; per-caller
//! rates; approval by MCP elicitation, by the `queue` command and by the
//! admin endpoint; expiry; the audit log; a dry-run-only caller; relay
//! rates that hold messages back without refusing them; the suppression
//! list through the admin endpoint.

mod common;
#[path = "reliability/random_input.rs"]
mod random_input;
#[path = "../actors/tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{hooks_taken, webhook};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CancelTaskParams, ClientCapabilities, ClientConfig,
    ElicitRequestParams, ElicitResult, ElicitationAction, GetTaskParams, Implementation,
    ProtocolVersion, ReadResourceRequestParams, SubscribeRequestParams,
};
use rmcp::service::{RequestContext, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, ErrorData, RoleClient, ServiceExt};
use serde_json::{Value, json};
use sha2::Digest;
use support::fault_smtp::{Action as SmtpAction, FaultSmtp, Phase, Script};

const ALPHA: &str = "alpha-token-5b0e";
const BETA: &str = "beta-token-91c4";
const GAMMA: &str = "gamma-token-0d7a";
const DELTA: &str = "delta-token-3f21";
const ETA: &str = "eta-token-a81f";
const ZETA: &str = "zeta-token-5c3e";
const THETA: &str = "theta-token-e2b9";
const IOTA: &str = "iota-token-41f6";
const OPS: &str = "operator-token-77aa";
/// A body and a password that must never appear in the audit log.
const BODY_MARKER: &str = "BODY-MARKER-d41d8cd9";
const PASSWORD_MARKER: &str = "PASSWORD-MARKER-8f00b204";

/// The binary serving HTTP on a configuration in its own folder.
struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    base: String,
    config: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sha256_hex(s: &str) -> String {
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The configuration: a default policy with a recipient allowlist and a
/// rate, four callers and an operator. `extra` goes at the top.
fn config_toml(dir: &Path, sink: u16, other: u16, extra: &str) -> String {
    let shipped = dir.join("shipped.txt");
    std::fs::write(
        &shipped,
        "Hello {name},\n\nyour order {order} has shipped.{?note}\nNote: {note}{/note}\n",
    )
    .unwrap();
    format!(
        r#"
send_deadline = "8s"
shutdown_grace = "2s"
{extra}

[queue]
path = "{db}"

[audit]
path = "{audit}"

[policy]
allowed_recipients = ["@example.org", "boss@partner.net", "@*.corp.example"]
rate = ["10/min"]

# Tight limits; hands off the relays.
[[callers]]
name = "alpha"
token_env = "ALPHA_TOKEN"
allowed_senders = ["@example.org"]
max_recipients = 3
allow_bcc = false
allowed_relays = ["sink"]
relay_control = false

# Preview only, to anyone.
[[callers]]
name = "beta"
token_sha256 = "{beta}"
allowed_recipients = ["*"]
mode = "dry_run"

# Outside the allowlist: held for approval.
[[callers]]
name = "gamma"
token_env = "GAMMA_TOKEN"
approval = "outside_allowlist"
approval_ttl = "4s"
elicitation_timeout = "2s"

# The default policy.
[[callers]]
name = "delta"
token_env = "DELTA_TOKEN"

# Outside the allowlist: held for an operator, whatever its client answers.
[[callers]]
name = "eta"
token_env = "ETA_TOKEN"
approval = "outside_allowlist"
approver = "operator"

# Every message marked as an agent's, which its calls cannot unsay, and
# from its own address unless a call names another.
[[callers]]
name = "zeta"
token_env = "ZETA_TOKEN"
headers = {{ Auto-Submitted = "auto-generated", X-Agent = "zeta" }}
from_email = "zeta@example.org"

# Mails anyone; what a message says can refuse it, or hold it for an
# operator.
[[callers]]
name = "theta"
token_env = "THETA_TOKEN"
allowed_recipients = ["*"]
approver = "operator"

[[callers.content_checks]]
name = "private key"
pattern = '-----BEGIN [A-Z ]*PRIVATE KEY-----'
action = "reject"

[[callers.content_checks]]
name = "invoice"
pattern = '(?i)\binvoice\b'
action = "hold"

# Sends only the operator's wording: one of its templates.
[[callers]]
name = "iota"
token_env = "IOTA_TOKEN"
allowed_recipients = ["*"]
require_template = true
allowed_templates = ["order_shipped"]

[[callers.content_checks]]
name = "private key"
pattern = '-----BEGIN [A-Z ]*PRIVATE KEY-----'
action = "reject"

[[templates]]
name = "order_shipped"
description = "Tell a customer that an order has shipped"
subject = "Order {{order}} has shipped"
body_file = "{shipped}"
html_body = "<p>Hello {{name}}, order <b>{{order}}</b> has shipped.</p>"

[templates.vars]
order = '[0-9]{{1,10}}'
name = '[^\r\n]{{1,60}}'
note = '[^\r\n]{{0,200}}'

[[templates]]
name = "internal_note"
subject = "Note"
body = "{{text}}"

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
name = "other"
host = "127.0.0.1"
port = {other}
tls = "none"
username = "mailmux"
password = "{password}"
priority = 1
timeout = "3s"
"#,
        db = dir.join("queue.db").display(),
        audit = dir.join("audit.jsonl").display(),
        beta = sha256_hex(BETA),
        password = PASSWORD_MARKER,
        shipped = shipped.display(),
    )
}

fn envs(cmd: &mut Command) -> &mut Command {
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("ALPHA_TOKEN", ALPHA)
        .env("GAMMA_TOKEN", GAMMA)
        .env("DELTA_TOKEN", DELTA)
        .env("ETA_TOKEN", ETA)
        .env("ZETA_TOKEN", ZETA)
        .env("THETA_TOKEN", THETA)
        .env("IOTA_TOKEN", IOTA)
        .env("OPS_TOKEN", OPS)
}

async fn start(sink: &FaultSmtp, other: &FaultSmtp, extra: &str) -> Daemon {
    start_with(|dir| config_toml(dir, sink.port(), other.port(), extra)).await
}

/// The daemon on the configuration `config` writes for its folder.
async fn start_with(config: impl FnOnce(&Path) -> String) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let text = config(dir.path());
    let config = dir.path().join("mailmux.toml");
    std::fs::write(&config, text).unwrap();
    let (child, base) = spawn(dir.path(), &config).await;
    Daemon {
        child,
        dir,
        base,
        config,
    }
}

/// The daemon over HTTP on a free port, in `dir`, once it answers.
async fn spawn(dir: &Path, config: &Path) -> (Child, String) {
    let port = common::free_port();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("daemon.log"))
        .unwrap();
    let child = envs(&mut Command::new(env!("CARGO_BIN_EXE_mailmux")))
        .arg("--config")
        .arg(config)
        .args(["serve", "--http", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "info")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("mailmux starts");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http.get(format!("{base}/health")).send().await.is_err() {
        assert!(Instant::now() < deadline, "the daemon never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (child, base)
}

impl Daemon {
    /// SIGKILL, then the daemon again over the same store and configuration.
    async fn kill9_and_restart(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().unwrap();
        let (child, base) = spawn(self.dir.path(), &self.config).await;
        self.child = child;
        self.base = base;
    }

    fn audit(&self) -> Vec<Value> {
        read_lines(&self.dir.path().join("audit.jsonl"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// A console page as the operator `ops` sees it, signed in afresh.
    async fn console_page(&self, path: &str) -> String {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let signed_in = http
            .post(format!("{}/console/login", self.base))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(format!("token={OPS}"))
            .send()
            .await
            .unwrap();
        let cookie = signed_in.headers()["set-cookie"].to_str().unwrap();
        let session = cookie.split(';').next().unwrap();
        common::page_text(&http, &format!("{}{path}", self.base), session).await
    }

    /// `/metrics`, read with the operator's token.
    async fn metrics(&self) -> String {
        reqwest::Client::new()
            .get(format!("{}/metrics", self.base))
            .bearer_auth(OPS)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `mailmux queue <verb> <id>` with the operator token (or `token`).
    fn queue_cmd(&self, verb: &str, id: &str, token: Option<&str>) -> (bool, String) {
        self.queue_args(&[verb, id], token)
    }

    /// `mailmux queue <args>` with the operator token (or `token`).
    fn queue_args(&self, args: &[&str], token: Option<&str>) -> (bool, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mailmux"));
        envs(&mut cmd);
        if let Some(t) = token {
            cmd.env("MAILMUX_OPERATOR_TOKEN", t);
        }
        let out = cmd
            .arg("--config")
            .arg(&self.config)
            .arg("queue")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

/// Every line of a JSON-lines file, each parsed (a line that is not JSON
/// fails the test).
fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON line: {l:?}: {e}"))
        })
        .collect()
}

/// The audit line of `action` on message `id` among `lines`.
fn audit_line<'a>(lines: &'a [Value], id: &str, action: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["email"]["message_id"] == id && l["event"]["action"] == action)
        .unwrap_or_else(|| panic!("no {action} line for {id}: {lines:#?}"))
}

/// How a test client answers an approval form.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Approve,
    Refuse,
    Decline,
    Never,
}

/// An MCP client that declares elicitation and answers it as told, keeping
/// the prompts it was shown.
#[derive(Debug, Clone)]
struct Approver {
    answer: Answer,
    prompts: Arc<Mutex<Vec<String>>>,
}

impl ClientHandler for Approver {
    async fn create_elicitation(
        &self,
        request: ElicitRequestParams,
        _context: RequestContext<RoleClient>,
    ) -> Result<ElicitResult, ErrorData> {
        if let ElicitRequestParams::FormElicitationParams { message, .. } = request {
            self.prompts.lock().unwrap().push(message);
        }
        let (action, content) = match self.answer {
            Answer::Approve => (ElicitationAction::Accept, Some(json!({ "approve": true }))),
            Answer::Refuse => (ElicitationAction::Accept, Some(json!({ "approve": false }))),
            Answer::Decline => (ElicitationAction::Decline, None),
            Answer::Never => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                (ElicitationAction::Cancel, None)
            }
        };
        let mut result = ElicitResult::new(action);
        if let Some(c) = content {
            result = result.with_content(c);
        }
        Ok(result)
    }

    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            ClientCapabilities::builder().enable_elicitation().build(),
            Implementation::new("safety-test", "1"),
        )
        .with_protocol_version(ProtocolVersion::LATEST_WITH_INITIALIZE)
    }
}

/// A client handler that answers an approval form with `answer`.
fn approver(answer: Answer) -> Approver {
    Approver {
        answer,
        prompts: Arc::new(Mutex::new(Vec::new())),
    }
}

type Client = RunningService<RoleClient, Box<dyn rmcp::service::DynService<RoleClient>>>;

async fn connect_with<H: ClientHandler>(d: &Daemon, token: &str, handler: H) -> Client {
    let cfg = StreamableHttpClientTransportConfig::with_uri(format!("{}/mcp", d.base))
        .auth_header(token.to_string());
    let transport = StreamableHttpClientTransport::from_config(cfg);
    handler
        .into_dyn()
        .serve(transport)
        .await
        .expect("client initializes over HTTP")
}

async fn connect(d: &Daemon, token: &str) -> Client {
    connect_with(d, token, ()).await
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

fn mail(to: Value) -> Value {
    json!({ "to": to, "subject": "hello", "body": BODY_MARKER })
}

async fn status(c: &Client, id: &str) -> Value {
    call(c, "get_message_status", json!({ "message_id": id }))
        .await
        .1
}

/// Waits until the message's status is `want`.
async fn wait_status(c: &Client, id: &str, want: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(c, id).await;
        if s["status"] == want {
            return s;
        }
        assert!(Instant::now() < deadline, "{id} never became {want}: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn servers() -> (FaultSmtp, FaultSmtp) {
    (
        FaultSmtp::start(Script::ok()).await,
        FaultSmtp::start(Script::ok()).await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bypass_attempt_is_refused_before_any_mail_command() {
    let (sink, other) = servers().await;
    let d = start(&sink, &other, "").await;
    let alpha = connect(&d, ALPHA).await;
    let delta = connect(&d, DELTA).await;

    // Attempts, each with the caller, the arguments and the field at fault.
    let attempts: Vec<(&Client, &str, Value, &str)> = vec![
        (
            &alpha,
            "case and suffix",
            mail(json!(["x@EXAMPLE.ORG.attacker.net"])),
            "to[0]",
        ),
        (
            &alpha,
            "suffix trick",
            mail(json!(["x@evil.example.org.attacker.net"])),
            "to[0]",
        ),
        (
            &alpha,
            "lookalike prefix",
            mail(json!(["x@notexample.org"])),
            "to[0]",
        ),
        (
            &alpha,
            "subdomain of an exact domain",
            mail(json!(["x@sub.example.org"])),
            "to[0]",
        ),
        (
            &alpha,
            "IDN lookalike",
            mail(json!(["x@ex\u{0430}mple.org"])),
            "to[0]",
        ),
        (
            &alpha,
            "display name",
            mail(json!(["\"ok@example.org\" <evil@attacker.net>"])),
            "to[0]",
        ),
        (
            &alpha,
            "quoted local part",
            mail(json!(["\"ok\"@attacker.net"])),
            "to[0]",
        ),
        (
            &alpha,
            "quoted local part inside",
            mail(json!(["\"evil\"@example.org.attacker.net"])),
            "to[0]",
        ),
        (
            &alpha,
            "exact address, other local part",
            mail(json!(["boss2@partner.net"])),
            "to[0]",
        ),
        (
            &alpha,
            "percent hack inside an allowed domain",
            mail(json!(["drop%attacker.net@example.org"])),
            "to[0]",
        ),
        (
            &delta,
            "bang path inside an allowed domain",
            mail(json!(["attacker.net!drop@example.org"])),
            "to[0]",
        ),
        (
            &delta,
            "percent hack inside an allowed subdomain",
            mail(json!(["drop%attacker.net@mail.corp.example"])),
            "to[0]",
        ),
        (
            &alpha,
            "the subdomain rule's own domain",
            mail(json!(["x@corp.example"])),
            "to[0]",
        ),
        (
            &delta,
            "in cc only",
            json!({"to": ["a@example.org"], "cc": ["evil@attacker.net"], "subject": "s", "body": "b"}),
            "cc[0]",
        ),
        (
            &delta,
            "in bcc only",
            json!({"to": ["a@example.org"], "bcc": ["evil@attacker.net"], "subject": "s", "body": "b"}),
            "bcc[0]",
        ),
        (
            &alpha,
            "too many recipients",
            mail(json!([
                "a@example.org",
                "b@example.org",
                "c@example.org",
                "d@example.org"
            ])),
            "to[3]",
        ),
        (
            &alpha,
            "bcc not allowed",
            json!({"to": ["a@example.org"], "bcc": ["b@example.org"], "subject": "s", "body": "b"}),
            "bcc[0]",
        ),
        (
            &alpha,
            "sender not allowed",
            json!({"to": ["a@example.org"], "from_email": "me@attacker.net", "subject": "s", "body": "b"}),
            "from_email",
        ),
        (
            &alpha,
            "relay not allowed",
            json!({"to": ["a@example.org"], "relay": "other", "subject": "s", "body": "b"}),
            "relay",
        ),
        (
            &delta,
            "replies sent outside",
            json!({"to": ["a@example.org"], "reply_to": "evil@attacker.net", "subject": "s", "body": "b"}),
            "reply_to",
        ),
        (
            &alpha,
            "replies sent to a lookalike",
            json!({"to": ["a@example.org"], "reply_to": "Team <team@ex\u{0430}mple.org>", "subject": "s", "body": "b"}),
            "reply_to",
        ),
    ];
    for (client, what, args, field) in &attempts {
        let (is_error, out) = call(client, "send_email", args.clone()).await;
        assert!(is_error, "{what}: not refused: {out}");
        assert_eq!(out["error"]["code"], "policy_denied", "{what}: {out}");
        assert_eq!(out["error"]["field"], *field, "{what}: {out}");
        assert!(out["error"]["rule"].is_string(), "{what}: {out}");
    }
    // Forms mailmux refuses as invalid addresses stay refused as such.
    for to in [
        "evil@attacker.net (ok@example.org)",
        "\"ok@example.org\"@attacker.net",
        "ok@example.org@attacker.net",
    ] {
        let (is_error, out) = call(&alpha, "send_email", mail(json!([to]))).await;
        assert!(is_error, "{to}: {out}");
        assert!(
            ["invalid_input", "policy_denied"]
                .contains(&out["error"]["code"].as_str().unwrap_or("")),
            "{to}: {out}"
        );
    }
    assert_eq!(
        sink.verb_count("MAIL"),
        0,
        "a refused message reached the server"
    );
    assert_eq!(other.verb_count("MAIL"), 0);

    // Within the policy: delivered, with case and IDN forms of allowed
    // domains matching.
    for to in ["x@Example.ORG", "boss@partner.net", "y@mail.corp.example"] {
        let (is_error, out) = call(&alpha, "send_email", mail(json!([to]))).await;
        assert!(!is_error, "{to}: {out}");
        assert_eq!(out["status"], "sent", "{to}: {out}");
        assert_eq!(out["caller"], "alpha");
    }
    // Replies to an address the caller may mail.
    let (is_error, out) = call(
        &alpha,
        "send_email",
        json!({"to": ["a@example.org"], "reply_to": "help@example.org", "subject": "s", "body": "b"}),
    )
    .await;
    assert!(!is_error, "{out}");
    assert_eq!(out["status"], "sent", "{out}");
    assert_eq!(sink.verb_count("MAIL"), 4);

    // An unknown token, and an operator's token, get 401 on /mcp.
    for token in ["nobody", OPS] {
        let r = reqwest::Client::new()
            .post(format!("{}/mcp", d.base))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "token {token}");
    }
    // Each caller sees its own messages only.
    let listed = call(&delta, "list_messages", json!({})).await.1;
    assert_eq!(listed["messages"].as_array().unwrap().len(), 0, "{listed}");
    let listed = call(&alpha, "list_messages", json!({})).await.1;
    assert_eq!(listed["messages"].as_array().unwrap().len(), 4, "{listed}");

    // A task is its caller's too: another caller can neither read nor
    // cancel it.
    let tasks = ClientConfig::new(
        ClientCapabilities::builder().enable_tasks().build(),
        Implementation::new("safety-tasks", "1"),
    );
    let alpha_tasks = connect_with(&d, ALPHA, tasks.clone()).await;
    let delta_tasks = connect_with(&d, DELTA, tasks).await;
    let Value::Object(args) = mail(json!(["t@example.org"])) else {
        panic!("arguments are an object")
    };
    let params = CallToolRequestParams::new("send_email").with_arguments(args);
    let CallToolResponse::Task(task) = alpha_tasks.peer().call_tool_once(params).await.unwrap()
    else {
        panic!("a task for a client that declares tasks");
    };
    let id = task.task.task_id;
    assert!(
        delta_tasks
            .peer()
            .get_task(GetTaskParams::new(id.clone()))
            .await
            .is_err(),
        "another caller read the task"
    );
    assert!(
        delta_tasks
            .peer()
            .cancel_task(CancelTaskParams::new(id.clone()))
            .await
            .is_err(),
        "another caller cancelled the task"
    );
    assert!(
        alpha_tasks
            .peer()
            .get_task(GetTaskParams::new(id.clone()))
            .await
            .is_ok()
    );
    // So is the message's resource: another caller can neither read it nor
    // subscribe to it. (A task's id is its Message-ID.)
    let uri = format!("mailmux://messages/{id}");
    for (c, who, mine) in [(&delta, "delta", false), (&alpha, "alpha", true)] {
        let read = c
            .peer()
            .read_resource(ReadResourceRequestParams::new(uri.clone()))
            .await;
        assert_eq!(read.is_ok(), mine, "read by {who}: {read:?}");
        #[allow(deprecated)] // resources/subscribe, as 2025-11-25 clients send it
        let subscribed = c
            .peer()
            .subscribe(SubscribeRequestParams::new(uri.clone()))
            .await;
        assert_eq!(
            subscribed.is_ok(),
            mine,
            "subscribed by {who}: {subscribed:?}"
        );
    }
}

/// A caller whose policy says `relay_control = false` is not shown the
/// tools that act on every caller's relays, and each of them refuses it
/// with `policy_denied` before it does anything: no pin, no reload, no
/// reconnect, no probe (the SMTP servers see no NOOP). A caller with the
/// default policy still has them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_without_relay_control_cannot_pin_reload_reconnect_or_probe() {
    let (sink, other) = servers().await;
    let d = start(&sink, &other, "").await;
    let alpha = connect(&d, ALPHA).await;
    let delta = connect(&d, DELTA).await;
    const CONTROL: [&str; 4] = [
        "switch_smtp_server",
        "reload_smtp_configuration",
        "reconnect_smtp_servers",
        "test_smtp_connection",
    ];
    let names = |tools: Vec<rmcp::model::Tool>| -> Vec<String> {
        tools.into_iter().map(|t| t.name.to_string()).collect()
    };
    let alphas = names(alpha.peer().list_all_tools().await.unwrap());
    let deltas = names(delta.peer().list_all_tools().await.unwrap());
    for tool in CONTROL {
        assert!(!alphas.iter().any(|n| n == tool), "alpha is shown {tool}");
        assert!(
            deltas.iter().any(|n| n == tool),
            "delta is not shown {tool}"
        );
    }
    assert!(alphas.iter().any(|n| n == "send_email"));

    let noops = || sink.verb_count("NOOP") + other.verb_count("NOOP");
    let before = noops();
    for (tool, args) in [
        ("switch_smtp_server", json!({"server_name": "other"})),
        ("switch_smtp_server", json!({"server_name": "auto"})),
        ("reload_smtp_configuration", json!({})),
        ("reconnect_smtp_servers", json!({})),
        ("test_smtp_connection", json!({})),
        ("test_smtp_connection", json!({"server_name": "sink"})),
    ] {
        let (is_error, out) = call(&alpha, tool, args).await;
        assert!(is_error, "{tool}: {out}");
        assert_eq!(out["error"]["code"], "policy_denied", "{tool}: {out}");
        assert_eq!(out["error"]["rule"], "relay_control", "{tool}: {out}");
    }
    // Showing the selection is a read, which alpha may do; nothing is pinned.
    let (is_error, shown) = call(&alpha, "switch_smtp_server", json!({})).await;
    assert!(!is_error, "{shown}");
    assert!(shown["pinned"].is_null(), "{shown}");
    assert_eq!(noops(), before, "a refused probe reached a relay");
    // Alpha still sends.
    let (is_error, out) = call(&alpha, "send_email", mail(json!(["a@example.org"]))).await;
    assert!(!is_error && out["status"] == "sent", "{out}");

    // Delta, under the default policy, probes and pins.
    let (is_error, out) = call(&delta, "test_smtp_connection", json!({})).await;
    assert!(!is_error, "{out}");
    assert!(noops() > before, "delta's probe sent no NOOP");
    let (is_error, out) = call(
        &delta,
        "switch_smtp_server",
        json!({"server_name": "other"}),
    )
    .await;
    assert!(!is_error && out["pinned"] == "other", "{out}");
    assert!(d.log().contains("relay control refused by policy"));
}

/// Records the resource updates the daemon notifies.
#[derive(Clone, Default)]
struct Watcher(Arc<Mutex<Vec<String>>>);

impl ClientHandler for Watcher {
    async fn on_resource_updated(
        &self,
        params: rmcp::model::ResourceUpdatedNotificationParam,
        _context: rmcp::service::NotificationContext<RoleClient>,
    ) {
        self.0.lock().unwrap().push(params.uri);
    }
}

/// A subscription to a message's resource is its session's own: subscribing
/// again changes nothing (one update per state change, not one per
/// subscribe), and another caller's `resources/unsubscribe` of the same URI
/// does not end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(deprecated)] // resources/subscribe and unsubscribe, as 2025-11-25 clients send them
async fn a_subscription_is_its_sessions_own_and_counted_once() {
    use rmcp::model::UnsubscribeRequestParams;
    let (sink, other) = servers().await;
    let d = start(&sink, &other, "").await;
    let watcher = Watcher::default();
    let alpha = connect_with(&d, ALPHA, watcher.clone()).await;
    let delta = connect(&d, DELTA).await;
    let mut uris = Vec::new();
    for subject in ["again", "unsubscribed by another"] {
        let mut args = mail(json!(["a@example.org"]));
        args["subject"] = json!(subject);
        args["send_at"] = json!("2s");
        let (is_error, out) = call(&alpha, "send_email", args).await;
        assert!(!is_error && out["status"] == "scheduled", "{out}");
        uris.push((
            out["message_id"].as_str().unwrap().to_owned(),
            format!("mailmux://messages/{}", out["message_id"].as_str().unwrap()),
        ));
    }
    for _ in 0..40 {
        alpha
            .peer()
            .subscribe(SubscribeRequestParams::new(uris[0].1.clone()))
            .await
            .unwrap();
    }
    alpha
        .peer()
        .subscribe(SubscribeRequestParams::new(uris[1].1.clone()))
        .await
        .unwrap();
    delta
        .peer()
        .unsubscribe(UnsubscribeRequestParams::new(uris[1].1.clone()))
        .await
        .unwrap();
    for (id, _) in &uris {
        wait_status(&alpha, id, "sent").await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let updates = watcher.0.lock().unwrap().clone();
    let of = |uri: &str| updates.iter().filter(|u| *u == uri).count();
    // Queued, sending, sent: a few changes, each told once.
    assert!(
        (1..=4).contains(&of(&uris[0].1)),
        "{} updates for one subscribed 40 times",
        of(&uris[0].1)
    );
    assert!(
        of(&uris[1].1) >= 1,
        "another caller's unsubscribe ended alpha's subscription"
    );
    assert_eq!(sink.delivered().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_caller_has_its_own_rate_and_refusals_take_none() {
    let (sink, other) = servers().await;
    let d = start(&sink, &other, "").await;
    let alpha = connect(&d, ALPHA).await;
    let delta = connect(&d, DELTA).await;
    // Refused by policy first: these take no rate.
    for _ in 0..5 {
        let (is_error, out) = call(&alpha, "send_email", mail(json!(["x@attacker.net"]))).await;
        assert!(is_error && out["error"]["code"] == "policy_denied", "{out}");
    }
    let mut sent = 0;
    let mut limited = 0;
    for i in 0..25 {
        let (is_error, out) = call(
            &alpha,
            "send_email",
            mail(json!([format!("r{i}@example.org")])),
        )
        .await;
        if !is_error {
            assert_eq!(out["status"], "sent", "{out}");
            sent += 1;
        } else {
            assert_eq!(out["error"]["code"], "rate_limited", "{out}");
            let after = out["error"]["retry_after_s"]
                .as_f64()
                .expect("retry_after_s");
            assert!(after > 0.0 && after <= 60.0, "{out}");
            limited += 1;
        }
    }
    assert_eq!((sent, limited), (10, 15));
    // Another caller under the same limit has its own bucket.
    let (is_error, out) = call(&delta, "send_email", mail(json!(["d@example.org"]))).await;
    assert!(!is_error, "{out}");
    assert!(sink.wait_for_delivered(11, Duration::from_secs(10)).await);
    assert_eq!(sink.delivered().len(), 11);
}

/// `per_recipient` limits the messages one person gets from a caller (an
/// agent in a loop, or two agents answering each other), whatever the case
/// of the address and wherever it is in the message; the refusal names the
/// recipient, and another caller has its own count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_recipient_rate_bounds_what_one_person_gets_from_a_caller() {
    let (sink, other) = servers().await;
    let d = start_with(|dir| {
        let text = config_toml(dir, sink.port(), other.port(), "");
        let limited = text.replace(
            "rate = [\"10/min\"]",
            "rate = [\"10/min\", \"per_recipient: 2/hour\"]",
        );
        assert_ne!(limited, text);
        limited
    })
    .await;
    let alpha = connect(&d, ALPHA).await;
    let delta = connect(&d, DELTA).await;
    for to in [
        json!(["pat@example.org"]),
        json!(["Pat@Example.org", "lee@example.org"]),
    ] {
        let (e, out) = call(&alpha, "send_email", mail(to)).await;
        assert!(!e, "{out}");
        assert_eq!(out["status"], "sent", "{out}");
    }
    let (e, out) = call(
        &alpha,
        "send_email",
        mail(json!(["kim@example.org", "PAT@example.org"])),
    )
    .await;
    assert!(e, "{out}");
    assert_eq!(out["error"]["code"], "rate_limited", "{out}");
    assert_eq!(out["error"]["rule"], "per_recipient: 2/hour", "{out}");
    assert_eq!(out["error"]["field"], "to[1]", "{out}");
    let after = out["error"]["retry_after_s"].as_f64().unwrap_or_default();
    assert!(after > 60.0 && after <= 1800.0, "{out}");
    let text = out["error"]["message"].as_str().unwrap_or_default();
    assert!(text.contains("for to[1] PAT@example.org"), "{out}");
    // Lee has one more; delta has its own count for Pat.
    let (e, out) = call(&alpha, "send_email", mail(json!(["lee@example.org"]))).await;
    assert!(!e, "{out}");
    let (e, out) = call(&delta, "send_email", mail(json!(["pat@example.org"]))).await;
    assert!(!e, "{out}");
    assert!(sink.wait_for_delivered(4, Duration::from_secs(10)).await);
    assert_eq!(sink.delivered().len(), 4);
}

/// An unsubscribe link the secret did not make is a wrong token: guessing
/// links counts against the address as wrong bearer tokens do
/// (`http.auth_failures`, 10 a minute here: the eleventh failure is
/// answered, and refuses), and past that the address is refused
/// everywhere but `/health`, while another address is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_unsubscribe_links_counts_as_failed_authentication() {
    let (sink, other) = servers().await;
    let extra = format!(
        "[unsubscribe]\nurl = \"https://mail.example.test/\"\nsecret = \"{}\"\n",
        "s".repeat(40)
    );
    let d = start(&sink, &other, &extra).await;
    let http = reqwest::Client::new();
    for i in 0..11 {
        let r = http
            .post(format!(
                "{}/unsubscribe/cmVhZGVyQGV4YW1wbGUub3Jn.guess{i}",
                d.base
            ))
            .body("List-Unsubscribe=One-Click")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 404, "guess {i}");
    }
    let r = http
        .get(format!(
            "{}/unsubscribe/cmVhZGVyQGV4YW1wbGUub3Jn.guess11",
            d.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    let r = http
        .get(format!("{}/admin/suppressions", d.base))
        .bearer_auth(OPS)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        429,
        "the right token from that address"
    );
    let r = http.get(format!("{}/health", d.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let elsewhere = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let r = elsewhere
        .get(format!("{}/admin/suppressions", d.base))
        .bearer_auth(OPS)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "another address");
    let listed: Value = r.json().await.unwrap();
    assert_eq!(listed["suppressions"], json!([]), "no guess listed anyone");
}

/// An idempotency key is its caller's own: two agents that pick the same
/// key (`order-42`) each get their message sent once, each repeat replays
/// the caller's own message, and a key finds only its caller's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_is_each_callers_own() {
    let (sink, other) = servers().await;
    let d = start(&sink, &other, "").await;
    let alpha = connect(&d, ALPHA).await;
    let delta = connect(&d, DELTA).await;
    let gamma = connect(&d, GAMMA).await;
    let keyed = || {
        let mut m = mail(json!(["order@example.org"]));
        m["idempotency_key"] = json!("order-42");
        m
    };
    let mut ids = Vec::new();
    for c in [&alpha, &delta] {
        let (is_error, out) = call(c, "send_email", keyed()).await;
        assert!(!is_error, "{out}");
        assert_eq!(out["status"], "sent", "{out}");
        assert_ne!(out["idempotent_replay"], true, "{out}");
        ids.push(out["message_id"].as_str().unwrap().to_owned());
    }
    assert_ne!(ids[0], ids[1]);
    for (c, id) in [(&alpha, &ids[0]), (&delta, &ids[1])] {
        let (is_error, out) = call(c, "send_email", keyed()).await;
        assert!(!is_error, "{out}");
        assert_eq!(out["idempotent_replay"], true, "{out}");
        assert_eq!(out["message_id"], id.as_str(), "{out}");
        let (is_error, out) = call(
            c,
            "get_message_status",
            json!({"idempotency_key": "order-42"}),
        )
        .await;
        assert!(!is_error, "{out}");
        assert_eq!(out["message_id"], id.as_str(), "{out}");
    }
    let (is_error, out) = call(
        &gamma,
        "get_message_status",
        json!({"idempotency_key": "order-42"}),
    )
    .await;
    assert!(is_error, "{out}");
    assert_eq!(out["error"]["code"], "not_found", "{out}");
    assert!(sink.wait_for_delivered(2, Duration::from_secs(10)).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.delivered().len(), 2, "each caller's message once");
}

/// Two callers' messages under one key, accepted and killed with SIGKILL
/// before delivery: after the restart each caller's repeat replays its own
/// message, the other caller's content under that key is a conflict, and
/// the sink gets each message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_stays_each_callers_own_across_a_crash() {
    let (sink, other) = servers().await;
    let mut d = start(&sink, &other, "").await;
    let keyed = |subject: &str| {
        json!({"to": ["order@example.org"], "subject": subject, "body": BODY_MARKER,
               "idempotency_key": "order-42", "send_at": "3s", "wait": false})
    };
    let mut ids = Vec::new();
    {
        let alpha = connect(&d, ALPHA).await;
        let delta = connect(&d, DELTA).await;
        for (c, subject) in [(&alpha, "for alpha"), (&delta, "for delta")] {
            let (is_error, out) = call(c, "send_email", keyed(subject)).await;
            assert!(!is_error && out["status"] == "scheduled", "{out}");
            ids.push(out["message_id"].as_str().unwrap().to_owned());
        }
    }
    d.kill9_and_restart().await;
    let alpha = connect(&d, ALPHA).await;
    let delta = connect(&d, DELTA).await;
    for (c, subject, id) in [
        (&alpha, "for alpha", &ids[0]),
        (&delta, "for delta", &ids[1]),
    ] {
        let (is_error, out) = call(c, "send_email", keyed(subject)).await;
        assert!(!is_error, "{out}");
        assert_eq!(out["idempotent_replay"], true, "{out}");
        assert_eq!(out["message_id"], id.as_str(), "{out}");
    }
    let (is_error, out) = call(&alpha, "send_email", keyed("for delta")).await;
    assert!(is_error, "{out}");
    assert_eq!(out["error"]["code"], "idempotency_conflict", "{out}");
    for (c, id) in [(&alpha, &ids[0]), (&delta, &ids[1])] {
        wait_status(c, id, "sent").await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut subjects: Vec<String> = sink
        .delivered()
        .iter()
        .map(|r| {
            let text = String::from_utf8_lossy(&r.data).to_string();
            text.lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_owned))
                .unwrap_or_default()
        })
        .collect();
    subjects.sort();
    assert_eq!(subjects, ["for alpha", "for delta"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_messages_go_out_only_when_a_person_approves() {
    let (sink, other) = servers().await;
    let d = start(&sink, &other, "").await;
    let outside = json!({
        "to": ["friend@outside.net"], "cc": ["a@example.org"], "bcc": ["hidden@outside.net"],
        "subject": "quarterly numbers", "body": format!("line one\n{BODY_MARKER}\nline three"),
    });

    // Within the allowlist: sent at once, nobody asked.
    let yes = approver(Answer::Approve);
    let gamma = connect_with(&d, GAMMA, yes.clone()).await;
    let (_, out) = call(&gamma, "send_email", mail(json!(["a@example.org"]))).await;
    assert_eq!(out["status"], "sent", "{out}");
    assert!(yes.prompts.lock().unwrap().is_empty());

    // Approved through elicitation: the prompt shows what goes out.
    let (_, out) = call(&gamma, "send_email", outside.clone()).await;
    assert_eq!(out["status"], "sent", "{out}");
    let approved_id = out["message_id"].as_str().unwrap().to_string();
    let prompt = yes.prompts.lock().unwrap()[0].clone();
    for needle in [
        "From: sender@example.org",
        "To: friend@outside.net",
        "Cc: a@example.org",
        "Bcc (hidden from the others): hidden@outside.net",
        "Subject: quarterly numbers",
        "\n> line one\n",
    ] {
        assert!(
            prompt.contains(needle),
            "{needle:?} not in the prompt:\n{prompt}"
        );
    }
    let s = status(&gamma, &approved_id).await;
    assert!(s["decided_by"].as_str().unwrap().contains("gamma"), "{s}");
    assert_eq!(sink.delivered().len(), 2);

    // Declined, or answered approve=false: rejected, never sent.
    for answer in [Answer::Decline, Answer::Refuse] {
        let c = connect_with(&d, GAMMA, approver(answer)).await;
        let (_, out) = call(&c, "send_email", outside.clone()).await;
        assert_eq!(out["status"], "rejected", "{answer:?}: {out}");
    }

    // No answer within elicitation_timeout: held; an operator approves it
    // with the queue command; the message goes out only then.
    let silent = connect_with(&d, GAMMA, approver(Answer::Never)).await;
    let (_, out) = call(&silent, "send_email", outside.clone()).await;
    assert_eq!(out["status"], "held", "{out}");
    let held_id = out["message_id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        sink.delivered().len(),
        2,
        "a held message reached the server"
    );
    let (ok, text) = d.queue_cmd("approve", &held_id, None);
    assert!(!ok, "approve without an operator token: {text}");
    let (ok, text) = d.queue_cmd("approve", &held_id, Some(GAMMA));
    assert!(!ok, "a caller's token is not an operator's: {text}");
    let (ok, text) = d.queue_cmd("approve", &held_id, Some(OPS));
    assert!(ok, "{text}");
    let plain = connect(&d, GAMMA).await;
    wait_status(&plain, &held_id, "sent").await;
    assert_eq!(sink.delivered().len(), 3);
    let (ok, text) = d.queue_cmd("approve", &held_id, Some(OPS));
    assert!(!ok && text.contains("not held"), "{text}");

    // A client without elicitation gets `held`, never a silent send. The
    // admin endpoint rejects it; a caller's token cannot.
    let (_, out) = call(&plain, "send_email", outside.clone()).await;
    assert_eq!(out["status"], "held", "{out}");
    let id = out["message_id"].as_str().unwrap().to_string();
    let http = reqwest::Client::new();
    let url = format!("{}/admin/messages/{id}/reject", d.base);
    let r = http.post(&url).bearer_auth(GAMMA).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = http.post(&url).bearer_auth(OPS).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(status(&plain, &id).await["status"], "rejected");
    let r = http
        .post(format!("{}/admin/messages/{id}/approve", d.base))
        .bearer_auth(OPS)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        409,
        "a rejected message cannot be approved"
    );
    // The queue command rejects as well.
    let (_, out) = call(&plain, "send_email", outside.clone()).await;
    let cli_rejected = out["message_id"].as_str().unwrap().to_string();
    let (ok, text) = d.queue_cmd("reject", &cli_rejected, Some(OPS));
    assert!(ok, "{text}");
    assert_eq!(status(&plain, &cli_rejected).await["status"], "rejected");
    let (ok, text) = d.queue_cmd("reject", &cli_rejected, Some(OPS));
    assert!(!ok && text.contains("not held"), "{text}");

    // Nobody decides within approval_ttl: expired, and no approval
    // releases it then.
    let (_, out) = call(&plain, "send_email", outside.clone()).await;
    let id = out["message_id"].as_str().unwrap().to_string();
    let s = wait_status(&plain, &id, "expired").await;
    assert_eq!(s["reason"], "approval_expired", "{s}");
    let (ok, text) = d.queue_cmd("approve", &id, Some(OPS));
    assert!(!ok && text.contains("expired"), "{text}");
    let (ok, text) = d.queue_cmd("retry", &id, None);
    assert!(
        !ok && text.contains("only when approved"),
        "queue retry never releases it: {text}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        sink.delivered().len(),
        3,
        "only approved messages were sent"
    );

    // The audit log has one line per event, with who decided.
    let audit = d.audit();
    let actions = |id: &str| -> Vec<String> {
        audit
            .iter()
            .filter(|l| l["email"]["message_id"] == id)
            .map(|l| l["event"]["action"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(actions(&approved_id), ["held", "approved", "sent"]);
    assert_eq!(actions(&held_id), ["held", "approved", "sent"]);
    let approval = audit
        .iter()
        .find(|l| {
            l["email"]["message_id"] == held_id.as_str() && l["event"]["action"] == "approved"
        })
        .unwrap();
    assert_eq!(approval["mailmux"]["decided_by"], "operator ops");
    assert_eq!(approval["user"]["name"], "gamma");
    assert_eq!(
        approval["email"]["bcc"]["address"],
        json!(["hidden@outside.net"])
    );
    assert_eq!(
        approval["email"]["to"]["address"],
        json!(["friend@outside.net"])
    );
    let sent = audit_line(&audit, &held_id, "sent");
    assert_eq!(sent["mailmux"]["smtp_code"], 250);
    assert_eq!(sent["mailmux"]["relay"], "sink");
    for key in ["accepted", "refused", "deferred"] {
        assert!(
            sent["mailmux"].get(key).is_none(),
            "every recipient had it: {sent}"
        );
    }
    assert_eq!(actions(&id), ["held", "expired"]);
}

/// A client of protocol 2026-07-28 (no session; the daemon cannot send it
/// a request) against `d` as the caller `token`, with `handler`.
async fn connect_modern<H: ClientHandler>(d: &Daemon, token: &str, handler: H) -> Client {
    use rmcp::service::{ClientLifecycleMode, ClientServiceExt};
    let cfg = StreamableHttpClientTransportConfig::with_uri(format!("{}/mcp", d.base))
        .auth_header(token.to_string());
    let transport = StreamableHttpClientTransport::from_config(cfg);
    let modern = ClientLifecycleMode::Discover {
        preferred_versions: vec![ProtocolVersion::V_2026_07_28],
    };
    handler
        .into_dyn()
        .serve_with_lifecycle(transport, modern)
        .await
        .expect("client of 2026-07-28 starts")
}

/// A call of `tool` through a client of 2026-07-28 that drives the round
/// trips of its protocol itself (rmcp's `call_tool`): (isError, structured
/// content).
async fn call_modern(c: &Client, tool: &str, args: Value) -> (bool, Value) {
    let params = CallToolRequestParams::new(tool.to_owned())
        .with_arguments(args.as_object().unwrap().clone());
    let r = tokio::time::timeout(Duration::from_secs(30), c.call_tool(params))
        .await
        .expect("answer within 30 s")
        .expect("no protocol error");
    (
        r.is_error.unwrap_or(false),
        r.structured_content.unwrap_or(Value::Null),
    )
}

/// A client of protocol 2026-07-28 that declares form elicitation is given
/// a held message's approval form in the result of its call, and calls
/// again with its user's answer: approved, the message goes out once;
/// refused or declined, it is rejected and nothing goes out. The answer
/// decides only the caller's own held message, bound to the content the
/// form showed: a request state naming another caller's message, or one
/// that is not mailmux's, is refused and decides nothing. A client that
/// declares no elicitation, and a caller approved by operators only, get
/// `held` as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_2026_07_28_approves_held_mail_through_the_calls_result() {
    let (sink, other) = servers().await;
    let d = start(&sink, &other, "").await;
    let outside = json!({
        "to": ["friend@outside.net"], "bcc": ["hidden@outside.net"],
        "subject": "quarterly numbers", "body": format!("line one\n{BODY_MARKER}"),
    });

    let yes = approver(Answer::Approve);
    let gamma = connect_modern(&d, GAMMA, yes.clone()).await;
    let (is_error, out) = call_modern(&gamma, "send_email", outside.clone()).await;
    assert!(!is_error, "{out}");
    assert_eq!(out["status"], "sent", "{out}");
    let approved = out["message_id"].as_str().unwrap().to_owned();
    let prompts = yes.prompts.lock().unwrap().clone();
    assert_eq!(prompts.len(), 1, "{prompts:?}");
    for needle in [
        "To: friend@outside.net",
        "Bcc (hidden from the others): hidden@outside.net",
        "Subject: quarterly numbers",
        "\n> line one\n",
    ] {
        assert!(
            prompts[0].contains(needle),
            "{needle:?} not in\n{}",
            prompts[0]
        );
    }
    let s = status(&gamma, &approved).await;
    assert!(s["decided_by"].as_str().unwrap().contains("gamma"), "{s}");
    assert_eq!(sink.delivered().len(), 1);

    for answer in [Answer::Refuse, Answer::Decline] {
        let c = connect_modern(&d, GAMMA, approver(answer)).await;
        let (_, out) = call_modern(&c, "send_email", outside.clone()).await;
        assert_eq!(out["status"], "rejected", "{answer:?}: {out}");
    }

    // The first call alone: the form and its request state, and `held`
    // meanwhile.
    let first = CallToolRequestParams::new("send_email")
        .with_arguments(outside.as_object().unwrap().clone());
    let form = match gamma.call_tool_once(first.clone()).await.unwrap() {
        CallToolResponse::InputRequired(form) => form,
        other => panic!("no form: {other:?}"),
    };
    let state = form.request_state.clone().unwrap();
    let id = state.split(':').nth(1).unwrap().to_owned();
    assert_eq!(status(&gamma, &id).await["status"], "held");
    let approve: rmcp::model::InputResponses = [(
        "approval".to_owned(),
        json!({"action": "accept", "content": {"approve": true}}),
    )]
    .into();
    let again = |state: &str| {
        let mut p = first.clone().with_input_responses(approve.clone());
        p.request_state = Some(state.to_owned());
        p
    };
    // Another caller cannot decide it, even with its state.
    let delta = connect_modern(&d, DELTA, ()).await;
    let refused = delta.call_tool_once(again(&state)).await.unwrap();
    let CallToolResponse::Complete(refused) = refused else {
        panic!("{refused:?}")
    };
    assert_eq!(refused.is_error, Some(true));
    assert_eq!(
        refused.structured_content.unwrap()["error"]["code"],
        "not_found"
    );
    // Nor does a state that is not mailmux's, or that names other content.
    let other_hash = format!("{}{}", &state[..state.len() - 64], "0".repeat(64));
    for bad in ["x", other_hash.as_str()] {
        let r = gamma.call_tool_once(again(bad)).await.unwrap();
        let CallToolResponse::Complete(r) = r else {
            panic!("{r:?}")
        };
        assert_eq!(r.is_error.unwrap_or(false), bad == "x", "{bad}: {r:?}");
        if bad != "x" {
            assert_eq!(r.structured_content.unwrap()["status"], "held", "{bad}");
        }
    }
    // An answer that is not an elicitation's result is refused, naming it.
    let mut malformed = again(&state);
    malformed.input_responses = Some([("approval".to_owned(), json!({"approve": true}))].into());
    let r = gamma.call_tool_once(malformed).await.unwrap();
    let CallToolResponse::Complete(r) = r else {
        panic!("{r:?}")
    };
    let out = r.structured_content.unwrap();
    assert_eq!(out["error"]["field"], "inputResponses.approval", "{out}");
    assert_eq!(status(&gamma, &id).await["status"], "held");
    // Its own answer, with the state it was given, sends it.
    let r = gamma.call_tool_once(again(&state)).await.unwrap();
    let CallToolResponse::Complete(r) = r else {
        panic!("{r:?}")
    };
    assert_eq!(r.structured_content.unwrap()["status"], "sent", "{id}");
    assert_eq!(sink.delivered().len(), 2);

    // The form is the same whether mailmux answers the call itself or
    // through rmcp's service (a member of another namespace in `_meta`).
    let mut forms = Vec::new();
    for extra in [false, true] {
        let mut meta = json!({
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {"elicitation": {}},
        });
        if extra {
            meta["example.org/trace"] = json!("t");
        }
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "send_email", "arguments": outside, "_meta": meta}});
        let r = reqwest::Client::new()
            .post(format!("{}/mcp", d.base))
            .bearer_auth(GAMMA)
            .header("Accept", "application/json, text/event-stream")
            .header("Content-Type", "application/json")
            .header("MCP-Protocol-Version", "2026-07-28")
            .header("Mcp-Method", "tools/call")
            .header("Mcp-Name", "send_email")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let mut answer: Value = r.json().await.unwrap();
        let result = &mut answer["result"];
        assert_eq!(result["resultType"], "input_required", "{result}");
        let state = result["requestState"].as_str().unwrap().to_owned();
        assert!(state.starts_with("mailmux-approval:"), "{state}");
        let id = state.split(':').nth(1).unwrap().to_owned();
        assert_eq!(status(&gamma, &id).await["status"], "held");
        result["requestState"] = json!("STATE");
        let message = result["inputRequests"]["approval"]["params"]["message"].take();
        let message = message.as_str().unwrap().to_owned();
        assert!(message.contains("To: friend@outside.net"), "{message}");
        forms.push(answer);
    }
    assert_eq!(forms[0], forms[1]);

    // No elicitation declared: held, for an operator.
    let plain = connect_modern(&d, GAMMA, ()).await;
    let (_, out) = call_modern(&plain, "send_email", outside.clone()).await;
    assert_eq!(out["status"], "held", "{out}");
    // A caller approved by operators only: held, no form.
    let eager = approver(Answer::Approve);
    let eta = connect_modern(&d, ETA, eager.clone()).await;
    let (_, out) = call_modern(&eta, "send_email", outside.clone()).await;
    assert_eq!(out["status"], "held", "{out}");
    assert!(eager.prompts.lock().unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.delivered().len(), 2, "only approved mail went out");
}

/// A `send_batch` call of a client of protocol 2026-07-28 that declares
/// form elicitation is given its held messages' form (one for all) in its
/// result, and the call made again with the answer is answered with the
/// whole batch: the message sent at once, the invalid one's error, and the
/// held ones decided. Another caller cannot decide them with the state,
/// and a state whose index is out of the batch is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_2026_07_28_approves_a_held_batch_through_the_calls_result() {
    let (sink, other) = servers().await;
    let d = start(&sink, &other, "").await;
    let batch = |tag: &str| {
        json!({
            "defaults": {"subject": "{tag} for {n}", "body": "dear {n}"},
            "messages": [
                {"to": ["a@outside.net"], "template_vars": {"tag": tag, "n": "ann"}},
                {"to": ["c@example.org"], "template_vars": {"tag": tag, "n": "cy"}},
                {"to": ["not an address"], "template_vars": {"tag": tag, "n": "x"}},
                {"to": ["b@outside.net"], "template_vars": {"tag": tag, "n": "bo"}},
            ],
        })
    };
    let statuses = |out: &Value| -> Vec<String> {
        out["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| match &r["error"] {
                Value::Null => r["status"].as_str().unwrap_or("?").to_owned(),
                e => e["code"].as_str().unwrap_or("?").to_owned(),
            })
            .collect()
    };

    let yes = approver(Answer::Approve);
    let gamma = connect_modern(&d, GAMMA, yes.clone()).await;
    let (is_error, out) = call_modern(&gamma, "send_batch", batch("offer")).await;
    assert!(!is_error, "{out}");
    assert_eq!(
        statuses(&out),
        ["sent", "sent", "invalid_input", "sent"],
        "{out}"
    );
    assert_eq!(out["summary"], json!({"sent": 3, "refused": 1}), "{out}");
    assert!(out["batch_id"].is_string(), "{out}");
    let prompts = yes.prompts.lock().unwrap().clone();
    assert_eq!(prompts.len(), 1, "one form for the batch: {prompts:?}");
    for needle in [
        "these 2 emails in one batch",
        "To: a@outside.net",
        "To: b@outside.net",
    ] {
        assert!(
            prompts[0].contains(needle),
            "{needle:?} not in\n{}",
            prompts[0]
        );
    }
    assert!(!prompts[0].contains("c@example.org"), "{}", prompts[0]);
    assert_eq!(sink.delivered().len(), 3);

    // Declined: the held two rejected, the rest as before.
    let c = connect_modern(&d, GAMMA, approver(Answer::Decline)).await;
    let (_, out) = call_modern(&c, "send_batch", batch("again")).await;
    assert_eq!(
        statuses(&out),
        ["rejected", "sent", "invalid_input", "rejected"],
        "{out}"
    );
    assert_eq!(sink.delivered().len(), 4);

    // The first call alone: its form; then answers that decide nothing.
    let first = CallToolRequestParams::new("send_batch")
        .with_arguments(batch("third").as_object().unwrap().clone());
    let form = match gamma.call_tool_once(first.clone()).await.unwrap() {
        CallToolResponse::InputRequired(form) => form,
        other => panic!("no form: {other:?}"),
    };
    let state = form.request_state.clone().unwrap();
    assert!(state.starts_with("mailmux-approval-batch:"), "{state}");
    let approve: rmcp::model::InputResponses = [(
        "approval".to_owned(),
        json!({"action": "accept", "content": {"approve": true}}),
    )]
    .into();
    let again = |state: &str| {
        let mut p = first.clone().with_input_responses(approve.clone());
        p.request_state = Some(state.to_owned());
        p
    };
    let complete = |r: CallToolResponse| match r {
        CallToolResponse::Complete(r) => r.structured_content.unwrap(),
        other => panic!("{other:?}"),
    };
    let delta = connect_modern(&d, DELTA, ()).await;
    let out = complete(delta.call_tool_once(again(&state)).await.unwrap());
    assert_eq!(out["error"]["code"], "not_found", "{out}");
    let out_of_batch = state.replacen("[[0,", "[[9,", 1);
    assert_ne!(out_of_batch, state);
    let out = complete(gamma.call_tool_once(again(&out_of_batch)).await.unwrap());
    assert_eq!(out["error"]["field"], "requestState", "{out}");
    assert_eq!(
        sink.delivered().len(),
        5,
        "only the one inside the allowlist"
    );
    // The caller's own answer sends the two.
    let out = complete(gamma.call_tool_once(again(&state)).await.unwrap());
    assert_eq!(
        statuses(&out),
        ["sent", "sent", "invalid_input", "sent"],
        "{out}"
    );
    assert_eq!(sink.delivered().len(), 7);
}

/// A caller whose policy says `approver = "operator"` is never put an
/// approval form, even by a client that declares elicitation and would
/// approve anything: its held mail, one message or a batch, waits for an
/// operator, and goes out only when one approves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_mail_of_a_caller_approved_by_operators_only_is_never_put_to_its_client() {
    let (sink, other) = servers().await;
    let d = start(&sink, &other, "").await;
    let eager = Approver {
        answer: Answer::Approve,
        prompts: Arc::new(Mutex::new(Vec::new())),
    };
    let eta = connect_with(&d, ETA, eager.clone()).await;
    let (is_error, out) = call(&eta, "send_email", mail(json!(["friend@outside.net"]))).await;
    assert!(!is_error && out["status"] == "held", "{out}");
    let id = out["message_id"].as_str().unwrap().to_owned();
    let (is_error, out) = call(
        &eta,
        "send_batch",
        json!({"defaults": {"subject": "offer", "body": "hello"},
               "messages": [{"to": ["a@outside.net"]}, {"to": ["b@outside.net"]}]}),
    )
    .await;
    assert!(!is_error, "{out}");
    assert_eq!(out["summary"], json!({"held": 2}), "{out}");
    assert!(
        eager.prompts.lock().unwrap().is_empty(),
        "a form was put to the client"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sink.delivered().is_empty());
    assert!(d.log().contains("approved by an operator only"));

    let (ok, text) = d.queue_cmd("approve", &id, Some(OPS));
    assert!(ok, "{text}");
    wait_status(&eta, &id, "sent").await;
    assert_eq!(sink.delivered().len(), 1);
}

/// The person asked to approve reads where the mail goes, not what the agent
/// made it look like: a domain with a Cyrillic `а` is shown in its ASCII
/// form, and characters that reverse or hide text are written out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_approval_prompt_shows_lookalike_domains_and_hidden_characters() {
    let (sink, other) = servers().await;
    let d = start(&sink, &other, "").await;
    let asked = Approver {
        answer: Answer::Decline,
        prompts: Arc::new(Mutex::new(Vec::new())),
    };
    let gamma = connect_with(&d, GAMMA, asked.clone()).await;
    let lookalike = "boss@ex\u{430}mple.org";
    let (_, out) = call(
        &gamma,
        "send_email",
        json!({
            "to": [lookalike],
            "from_email": "IT Security <sender@example.org>",
            "subject": "invoice \u{202E}fdp.exe",
            "body": "the figures\u{200B} you asked for",
        }),
    )
    .await;
    assert_eq!(out["status"], "rejected", "outside the allowlist: {out}");
    let prompt = asked.prompts.lock().unwrap()[0].clone();
    for needle in [
        "From: \"IT Security\" <sender@example.org>",
        "To: boss@xn--exmple-",
        "an international domain",
        "Subject: invoice <U+202E>fdp.exe",
        "> the figures<U+200B> you asked for",
    ] {
        assert!(
            prompt.contains(needle),
            "{needle:?} not in the prompt:\n{prompt}"
        );
    }
    assert!(
        !prompt.contains(&format!("To: {lookalike}")),
        "the lookalike shown as written:\n{prompt}"
    );
    assert!(!prompt.contains('\u{202E}') && !prompt.contains('\u{200B}'));
    // So does the queue command, to an operator.
    let (ok, text) = d.queue_cmd("show", out["message_id"].as_str().unwrap(), None);
    assert!(ok, "{text}");
    assert!(
        text.contains("note: \"boss@ex\u{430}mple.org\" is boss@xn--exmple-4nf.org"),
        "{text}"
    );

    // Replies that would go outside hold a message to inside recipients,
    // and the prompt says where they go.
    let (_, out) = call(
        &gamma,
        "send_email",
        json!({
            "to": ["colleague@example.org"],
            "reply_to": "drop@attacker.net",
            "subject": "quick question",
            "body": "what were the Q3 figures?",
        }),
    )
    .await;
    assert_eq!(out["status"], "rejected", "{out}");
    let id = out["message_id"].as_str().unwrap().to_owned();
    let prompt = asked.prompts.lock().unwrap()[1].clone();
    assert!(
        prompt.contains("Reply-To (replies go here): drop@attacker.net"),
        "{prompt}"
    );
    let lines = d.audit();
    let held = audit_line(&lines, &id, "held");
    assert_eq!(
        held["email"]["reply_to"]["address"],
        json!(["drop@attacker.net"]),
        "{held}"
    );
    assert!(sink.delivered().is_empty());
}

/// A `send_batch` whose messages the policy holds puts them to the client's
/// user in one form, each message shown as `send_email`'s prompt shows it:
/// approved, they are sent (and the call, which waits, answers `sent`);
/// declined, every one is rejected and none is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_batch_is_put_to_the_user_in_one_form() {
    let (sink, other) = servers().await;
    let d = start(&sink, &other, "").await;
    let batch = |tag: &str| {
        json!({
            "defaults": {"subject": "{tag} for {n}", "body": "dear {n}"},
            "messages": [
                {"to": ["a@outside.net"], "template_vars": {"tag": tag, "n": "ann"}},
                {"to": ["c@example.org"], "template_vars": {"tag": tag, "n": "cy"}},
                {"to": ["b@outside.net"], "bcc": ["h@outside.net"],
                 "template_vars": {"tag": tag, "n": "bo"}},
            ],
        })
    };
    let yes = Approver {
        answer: Answer::Approve,
        prompts: Arc::new(Mutex::new(Vec::new())),
    };
    let gamma = connect_with(&d, GAMMA, yes.clone()).await;
    let (is_error, out) = call(&gamma, "send_batch", batch("offer")).await;
    assert!(!is_error, "{out}");
    let statuses: Vec<&str> = out["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(statuses, ["sent", "sent", "sent"], "{out}");
    assert_eq!(out["summary"], json!({"sent": 3}), "{out}");
    let prompts = yes.prompts.lock().unwrap().clone();
    assert_eq!(prompts.len(), 1, "one form for the batch: {prompts:?}");
    let prompt = &prompts[0];
    for needle in [
        "these 2 emails in one batch",
        "--- Email 1 of 2 ---",
        "To: a@outside.net",
        "Subject: offer for ann",
        "> dear ann",
        "--- Email 2 of 2 ---",
        "To: b@outside.net",
        "Bcc (hidden from the others): h@outside.net",
        "Subject: offer for bo",
    ] {
        assert!(prompt.contains(needle), "{needle:?} not in:\n{prompt}");
    }
    assert!(
        !prompt.contains("c@example.org"),
        "the message inside the allowlist was not held: {prompt}"
    );
    assert_eq!(sink.delivered().len(), 3);
    let s = status(&gamma, out["results"][0]["message_id"].as_str().unwrap()).await;
    assert!(s["decided_by"].as_str().unwrap().contains("gamma"), "{s}");

    // Declined: both held messages rejected, neither sent.
    let no = Approver {
        answer: Answer::Decline,
        prompts: Arc::new(Mutex::new(Vec::new())),
    };
    let declining = connect_with(&d, GAMMA, no.clone()).await;
    let (_, out) = call(&declining, "send_batch", batch("again")).await;
    assert_eq!(out["summary"], json!({"rejected": 2, "sent": 1}), "{out}");
    assert_eq!(no.prompts.lock().unwrap().len(), 1);
    assert_eq!(sink.delivered().len(), 4);

    // A client that cannot be asked gets `held`, for an operator, who
    // decides the whole batch with the queue command.
    let plain = connect(&d, GAMMA).await;
    let (_, out) = call(&plain, "send_batch", batch("later")).await;
    assert_eq!(out["summary"], json!({"held": 2, "sent": 1}), "{out}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.delivered().len(), 5);
    let id = out["batch_id"].as_str().unwrap();
    let by_batch = format!("--batch={id}");
    let (ok, text) = d.queue_cmd("approve", &by_batch, Some(GAMMA));
    assert!(!ok, "a caller's token approves nothing: {text}");
    let (ok, text) = d.queue_cmd("approve", &by_batch, Some(OPS));
    assert!(ok, "{text}");
    assert!(
        text.contains("approved: 2 of 3 matching messages; left as they were: 1 sent"),
        "{text}"
    );
    for r in out["results"].as_array().unwrap() {
        wait_status(&plain, r["message_id"].as_str().unwrap(), "sent").await;
    }
    assert_eq!(sink.delivered().len(), 7);
    let (ok, text) = d.queue_cmd("approve", &by_batch, Some(OPS));
    assert!(!ok, "nothing left to approve: {text}");

    let (_, out) = call(
        &plain,
        "send_batch",
        json!({"defaults": {"subject": "s", "body": "b"}, "messages": [{"to": ["z@outside.net"]}]}),
    )
    .await;
    assert_eq!(out["summary"], json!({"held": 1}), "{out}");
    let by_batch = format!("--batch={}", out["batch_id"].as_str().unwrap());
    let (ok, text) = d.queue_cmd("reject", &by_batch, Some(OPS));
    assert!(ok && text.contains("rejected: 1 of 1"), "{text}");
    let rejected = out["results"][0]["message_id"].as_str().unwrap();
    assert_eq!(status(&plain, rejected).await["status"], "rejected");
    let decided: Vec<Value> = d
        .audit()
        .into_iter()
        .filter(|l| l["email"]["message_id"] == rejected)
        .collect();
    assert_eq!(decided.last().unwrap()["event"]["action"], "rejected");
    assert_eq!(
        decided.last().unwrap()["mailmux"]["decided_by"],
        "operator ops"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.delivered().len(), 7);
}

/// The admin endpoint decides a held batch whole: an operator's token only;
/// 200 with the count and each message's state after, 409 when nothing of
/// it was held, 404 for a batch with no message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_decides_a_held_batch_over_http() {
    let (sink, other) = servers().await;
    let d = start(&sink, &other, "").await;
    let plain = connect(&d, GAMMA).await;
    let merge = |n: usize| {
        let messages: Vec<Value> = (0..n)
            .map(|i| json!({"to": [format!("r{i}@outside.net")]}))
            .chain([json!({"to": ["in@example.org"]})])
            .collect();
        json!({"defaults": {"subject": "s", "body": "b"}, "messages": messages})
    };
    let (_, out) = call(&plain, "send_batch", merge(2)).await;
    assert_eq!(out["summary"], json!({"held": 2, "sent": 1}), "{out}");
    let batch = out["batch_id"].as_str().unwrap().to_owned();
    let http = reqwest::Client::new();
    let url = |b: &str, verb: &str| format!("{}/admin/batches/{b}/{verb}", d.base);

    let r = http
        .post(url(&batch, "approve"))
        .bearer_auth(GAMMA)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401, "a caller's token");
    let r = http
        .post(url(&batch, "approve"))
        .bearer_auth(OPS)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["approved"], 2, "{body}");
    assert_eq!(body["messages"], 3, "{body}");
    assert_eq!(body["states"], json!({"queued": 2, "sent": 1}), "{body}");
    for m in out["results"].as_array().unwrap() {
        wait_status(&plain, m["message_id"].as_str().unwrap(), "sent").await;
    }
    assert_eq!(sink.delivered().len(), 3);
    let r = http
        .post(url(&batch, "approve"))
        .bearer_auth(OPS)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 409, "nothing left held");

    let (_, out) = call(&plain, "send_batch", merge(1)).await;
    let batch = out["batch_id"].as_str().unwrap();
    let r = http
        .post(url(batch, "reject"))
        .bearer_auth(OPS)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["rejected"], 1, "{body}");
    let held = out["results"][0]["message_id"].as_str().unwrap();
    assert_eq!(status(&plain, held).await["status"], "rejected");
    let r = http
        .post(url("batch-nope", "reject"))
        .bearer_auth(OPS)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let decided: Vec<Value> = d
        .audit()
        .into_iter()
        .filter(|l| l["email"]["message_id"] == held)
        .collect();
    assert_eq!(decided.last().unwrap()["event"]["action"], "rejected");
    assert_eq!(
        decided.last().unwrap()["mailmux"]["decided_by"],
        "operator ops"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.delivered().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_is_complete_escaped_secret_free_and_reopened_on_sighup() {
    let (sink, other) = servers().await;
    let d = start(&sink, &other, "").await;
    let delta = connect(&d, DELTA).await;
    let (_, out) = call(&delta, "send_email", mail(json!(["a@example.org"]))).await;
    assert_eq!(out["status"], "sent", "{out}");
    let sent_id = out["message_id"].as_str().unwrap().to_string();
    call(&delta, "send_email", mail(json!(["x@attacker.net"]))).await;
    // A subject that tries to end the line and forge a field: refused as
    // invalid input, and still one JSON line.
    let forged = "He said \"hi\"\n{\"event\":{\"action\":\"approved\"}}";
    let (is_error, out) = call(
        &delta,
        "send_email",
        json!({"to": ["a@example.org"], "subject": forged, "body": "b"}),
    )
    .await;
    assert!(is_error && out["error"]["code"] == "invalid_input", "{out}");

    let path = d.dir.path().join("audit.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    for secret in [BODY_MARKER, PASSWORD_MARKER, DELTA, ALPHA, OPS] {
        assert!(!text.contains(secret), "{secret} is in the audit log");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let lines = d.audit();
    let of = |id: &str| {
        lines
            .iter()
            .filter(|l| l["email"]["message_id"] == id)
            .count()
    };
    assert_eq!(of(&sent_id), 2, "accepted and sent: {lines:?}");
    let accepted = &lines[0];
    assert_eq!(accepted["event"]["action"], "accepted");
    assert_eq!(accepted["user"]["name"], "delta");
    assert_eq!(accepted["email"]["subject"], "hello");
    assert_eq!(
        accepted["email"]["from"]["address"],
        json!(["sender@example.org"])
    );
    assert!(accepted["@timestamp"].is_string());
    let refusals: Vec<&Value> = lines
        .iter()
        .filter(|l| l["event"]["action"] == "refused")
        .collect();
    assert_eq!(refusals.len(), 2);
    assert_eq!(refusals[0]["mailmux"]["code"], "policy_denied");
    assert_eq!(refusals[0]["mailmux"]["rule"], "recipient_not_allowed");
    assert_eq!(
        refusals[0]["email"]["to"]["address"],
        json!(["x@attacker.net"])
    );
    assert_eq!(
        refusals[1]["email"]["subject"], forged,
        "escaped, not interpreted"
    );
    assert_eq!(text.lines().count(), lines.len());
    assert!(!lines.iter().any(|l| l["event"]["action"] == "approved"));

    // Rotation: move the file away, SIGHUP, and the next line starts a new one.
    let rotated = d.dir.path().join("audit.jsonl.1");
    std::fs::rename(&path, &rotated).unwrap();
    hangup(&d, "audit log reopened").await;
    call(&delta, "send_email", mail(json!(["b@example.org"]))).await;
    let fresh = read_lines(&path);
    assert_eq!(
        fresh.len(),
        2,
        "accepted and sent in the new file: {fresh:?}"
    );
    assert_eq!(read_lines(&rotated).len(), lines.len());
}

/// A daemon killed with SIGKILL after a message's final "." was written,
/// before the relay answered: after the restart the message is `unknown`,
/// and the audit log has its line (`event.reason` "recovered"), with who
/// sent it and to whom: its outcome, where the log would otherwise end at
/// `accepted` for a message that may have been delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_a_crash_left_unknown_is_in_the_audit_log() {
    let sink = FaultSmtp::start(Script::ok().on(Phase::AfterDot, SmtpAction::Hang)).await;
    let other = FaultSmtp::start(Script::ok()).await;
    let mut d = start(&sink, &other, "").await;
    let delta = connect(&d, DELTA).await;
    let args = json!({"to": ["crash@example.org"], "subject": "cut off", "body": BODY_MARKER});
    let waiting = tokio::spawn(async move {
        let mut params = CallToolRequestParams::new("send_email");
        if let Value::Object(map) = args {
            params = params.with_arguments(map);
        }
        // No answer comes: the daemon is killed while it waits.
        let _ = delta.peer().call_tool(params).await;
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while sink.received().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the message never reached its final \".\""
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let id = sink.received()[0].message_id.clone().expect("a Message-ID");
    let id = id.trim_start_matches('<').trim_end_matches('>').to_string();
    let of = |lines: &[Value]| -> Vec<Value> {
        lines
            .iter()
            .filter(|l| l["email"]["message_id"] == id.as_str())
            .cloned()
            .collect()
    };
    // Stored by its commit mark, and audited as accepted then.
    let accepted = of(&d.audit());
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert_eq!(accepted[0]["event"]["action"], "accepted");

    d.kill9_and_restart().await;
    waiting.abort();
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let lines = of(&d.audit());
        if lines.len() > 1 || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(lines.len(), 2, "accepted, then unknown: {lines:?}");
    let line = &lines[1];
    assert_eq!(line["event"]["action"], "unknown", "{line}");
    assert_eq!(line["event"]["outcome"], "unknown", "{line}");
    assert_eq!(line["event"]["reason"], "recovered", "{line}");
    assert_eq!(line["user"]["name"], "delta", "{line}");
    assert_eq!(line["email"]["subject"], "cut off", "{line}");
    assert_eq!(line["email"]["to"]["address"], json!(["crash@example.org"]));
    let delta = connect(&d, DELTA).await;
    assert_eq!(status(&delta, &id).await["status"], "unknown");
    // Never sent again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.received().len(), 1);
    assert!(
        !std::fs::read_to_string(d.dir.path().join("audit.jsonl"))
            .unwrap()
            .contains(BODY_MARKER)
    );
}

/// Sends the daemon SIGHUP and waits for one more log line with `line`.
async fn hangup(d: &Daemon, line: &str) {
    let before = d.log().matches(line).count();
    common::signal(d.child.id(), "HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.log().matches(line).count() == before {
        assert!(Instant::now() < deadline, "no {line:?}: {}", d.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGHUP reloads the configuration (`systemctl reload`), as the tool
/// does: a recipient allowed in the file since is allowed at the next call.
/// A file that no longer parses leaves the running configuration in force,
/// and the log says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_configuration_and_keeps_it_when_the_file_is_bad() {
    let (sink, other) = servers().await;
    let d = start(&sink, &other, "").await;
    let delta = connect(&d, DELTA).await;
    let (is_error, out) = call(&delta, "send_email", mail(json!(["x@attacker.net"]))).await;
    assert!(is_error && out["error"]["code"] == "policy_denied", "{out}");

    let text = std::fs::read_to_string(&d.config).unwrap();
    let widened = text.replace(
        r#""boss@partner.net","#,
        r#""boss@partner.net", "@attacker.net","#,
    );
    assert_ne!(widened, text);
    std::fs::write(&d.config, widened).unwrap();
    hangup(&d, "reloaded: added []").await;
    let (is_error, out) = call(&delta, "send_email", mail(json!(["x@attacker.net"]))).await;
    assert!(!is_error && out["status"] == "sent", "{out}");

    std::fs::write(&d.config, "[[relays]\n").unwrap();
    hangup(&d, "configuration not reloaded").await;
    assert!(
        d.log().contains("the running configuration is unchanged"),
        "{}",
        d.log()
    );
    let (is_error, out) = call(&delta, "send_email", mail(json!(["y@attacker.net"]))).await;
    assert!(!is_error && out["status"] == "sent", "{out}");
    assert_eq!(sink.received().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_caller_sends_nothing() {
    let (sink, other) = servers().await;
    let d = start(&sink, &other, "").await;
    let beta = connect(&d, BETA).await;
    let (is_error, out) = call(&beta, "send_email", mail(json!(["anyone@anywhere.net"]))).await;
    assert!(is_error, "{out}");
    assert_eq!(out["error"]["code"], "policy_denied");
    assert_eq!(out["error"]["rule"], "dry_run_only");
    let mut preview = mail(json!(["anyone@anywhere.net"]));
    preview["dry_run"] = json!(true);
    let (is_error, out) = call(&beta, "send_email", preview).await;
    assert!(!is_error, "{out}");
    assert_eq!(out["status"], "dry_run");
    let status = call(&beta, "get_smtp_status", json!({})).await.1;
    assert_eq!(status["audit"]["healthy"], true, "{status}");
    assert_eq!(status["audit"]["failed_writes"], 0);
    assert_eq!(status["caller"]["name"], "beta");
    assert_eq!(status["caller"]["mode"], "dry_run");
    assert!(status.get("open_recipients").is_none(), "{status}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.verb_count("MAIL") + other.verb_count("MAIL"), 0);
    assert!(
        call(&beta, "list_messages", json!({})).await.1["messages"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// The lines of a delivered message's head, unfolded.
fn head_lines(data: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(data);
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    head.replace("\r\n ", " ")
        .split("\r\n")
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn a_callers_policy_writes_its_header_fields_on_every_message() {
    let (sink, other) = servers().await;
    let d = start(&sink, &other, "").await;
    let zeta = connect(&d, ZETA).await;
    let mut m = mail(json!(["a@example.org"]));
    m["headers"] = json!({"X-Ticket": "T-9"});
    let (is_error, out) = call(&zeta, "send_email", m).await;
    assert!(!is_error, "{out}");
    assert_eq!(out["status"], "sent");
    let got = sink.delivered();
    assert_eq!(got.len(), 1);
    // The caller's own sender, the call having named none.
    assert_eq!(got[0].mail_from, "zeta@example.org");
    let head = head_lines(&got[0].data);
    for line in [
        "From: zeta@example.org",
        "Auto-Submitted: auto-generated",
        "X-Agent: zeta",
        "X-Ticket: T-9",
    ] {
        assert!(head.iter().any(|l| l == line), "{line} not in {head:?}");
    }
    // The audit log names the fields, and holds none of their values.
    let id = out["message_id"].as_str().unwrap().to_owned();
    let audit = d.dir.path().join("audit.jsonl");
    assert!(!std::fs::read_to_string(&audit).unwrap().contains("T-9"));
    let lines = read_lines(&audit);
    for action in ["accepted", "sent"] {
        let line = audit_line(&lines, &id, action);
        assert_eq!(
            line["mailmux"]["headers"],
            json!(["Auto-Submitted", "X-Agent", "X-Ticket"]),
            "{line}"
        );
    }

    // A call cannot set a field of the policy's, in any case, and then
    // nothing is sent; the preview shows the policy's fields.
    for name in ["X-Agent", "auto-submitted"] {
        let mut m = mail(json!(["a@example.org"]));
        m["headers"] = json!({ name: "someone-else" });
        let (is_error, out) = call(&zeta, "send_email", m).await;
        assert!(is_error, "{out}");
        assert_eq!(out["error"]["code"], "policy_denied", "{out}");
        assert_eq!(out["error"]["rule"], "header_set_by_policy");
        assert_eq!(out["error"]["field"], format!("headers.{name}"));
    }
    // 19 fields of its own and the policy's 2 are more than a message holds.
    let mut m = mail(json!(["a@example.org"]));
    m["headers"] = (0..19).map(|i| (format!("X-F{i}"), json!("v"))).collect();
    let (is_error, out) = call(&zeta, "send_email", m).await;
    assert!(is_error, "{out}");
    assert_eq!(out["error"]["rule"], "too_many_headers", "{out}");
    assert_eq!(out["error"]["field"], "headers");
    assert!(
        out["error"]["message"]
            .as_str()
            .unwrap()
            .contains("writes 2")
    );
    let mut m = mail(json!(["a@example.org"]));
    m["dry_run"] = json!(true);
    let (_, out) = call(&zeta, "send_email", m).await;
    let shown = out["preview"]["headers"].to_string();
    assert!(
        shown.contains("X-Agent") && shown.contains("auto-generated"),
        "{out}"
    );

    // In a batch, per message.
    let batch = json!({
        "defaults": {"subject": "s", "body": "b"},
        "messages": [
            {"to": ["b@example.org"]},
            {"to": ["c@example.org"], "headers": {"X-Agent": "not-zeta"}},
        ],
    });
    let (_, out) = call(&zeta, "send_batch", batch).await;
    let r = &out["results"];
    assert_eq!(r[0]["status"], "sent", "{out}");
    assert_eq!(
        r[1]["error"]["field"], "messages[1].headers.X-Agent",
        "{out}"
    );
    assert_eq!(r[1]["error"]["rule"], "header_set_by_policy");
    let got = sink.delivered();
    assert_eq!(got.len(), 2, "the refused ones sent nothing");
    assert!(
        head_lines(&got[1].data)
            .iter()
            .any(|l| l == "X-Agent: zeta")
    );

    // Another caller's messages carry none of them, and the configured
    // sender.
    let delta = connect(&d, DELTA).await;
    let (_, out) = call(&delta, "send_email", mail(json!(["d@example.org"]))).await;
    assert_eq!(out["status"], "sent", "{out}");
    let got = sink.delivered();
    assert!(
        !head_lines(&got[2].data)
            .iter()
            .any(|l| l.starts_with("X-Agent"))
    );
    assert_eq!(got[2].mail_from, "sender@example.org");
}

/// Two relays' configuration: `fast` with `rate`, `spare` (lower priority)
/// without one unless `spare_port` is `None`.
fn rate_config(dir: &Path, fast: u16, rate: &str, spare: Option<u16>) -> String {
    let mut text = format!(
        r#"
send_deadline = "30s"

[queue]
path = "{db}"
retry_base = "200ms"
retry_max = "1s"

[[relays]]
name = "fast"
host = "127.0.0.1"
port = {fast}
tls = "none"
from_email = "sender@example.org"
priority = 10
rate = ["{rate}"]
"#,
        db = dir.join("queue.db").display()
    );
    if let Some(port) = spare {
        text.push_str(&format!(
            r#"
[[relays]]
name = "spare"
host = "127.0.0.1"
port = {port}
tls = "none"
from_email = "sender@example.org"
priority = 1
"#
        ));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_rate_holds_messages_back_and_never_refuses_them() {
    // 5 at once, then one every 400 ms.
    let sink = FaultSmtp::start(Script::ok()).await;
    let d = start_with(|dir| rate_config(dir, sink.port(), "5/2s", None)).await;
    let c = connect(&d, "no-token-configured").await;
    let started = Instant::now();
    let mut ids = Vec::new();
    for i in 0..15 {
        let mut args = mail(json!([format!("r{i}@example.org")]));
        args["wait"] = json!(false);
        let (is_error, out) = call(&c, "send_email", args).await;
        assert!(!is_error, "never refused for the relay's rate: {out}");
        ids.push(out["message_id"].as_str().unwrap().to_string());
    }
    // Sampled as they arrive: never more than the rate allows.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = sink.delivered().len();
        let allowed = 5 + (started.elapsed().as_millis() / 400) as usize + 1;
        assert!(
            n <= allowed,
            "{n} delivered after {:?}; the rate allows {allowed}",
            started.elapsed()
        );
        if n == 15 {
            break;
        }
        assert!(Instant::now() < deadline, "only {n} of 15 delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(3500),
        "{:?}",
        started.elapsed()
    );
    for id in &ids {
        // The sink has it before the daemon has stored the outcome.
        wait_status(&c, id, "sent").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_its_rate_a_relay_is_passed_over_for_another() {
    let fast = FaultSmtp::start(Script::ok()).await;
    let spare = FaultSmtp::start(Script::ok()).await;
    let d = start_with(|dir| rate_config(dir, fast.port(), "2/1h", Some(spare.port()))).await;
    let c = connect(&d, "no-token-configured").await;
    for i in 0..6 {
        let (is_error, out) =
            call(&c, "send_email", mail(json!([format!("r{i}@example.org")]))).await;
        assert!(!is_error && out["status"] == "sent", "{out}");
    }
    assert_eq!(fast.delivered().len(), 2);
    assert_eq!(spare.delivered().len(), 4);
}

/// Where among the sink's deliveries the message with `subject` came, once
/// it came.
async fn arrival(sink: &FaultSmtp, subject: &str) -> usize {
    let line = format!("Subject: {subject}\r\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = sink.delivered();
        if let Some(k) = got
            .iter()
            .position(|r| String::from_utf8_lossy(&r.data).contains(&line))
        {
            return k;
        }
        assert!(Instant::now() < deadline, "{subject:?} never came");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A backlog of `n` normal messages for one relay, sent as one batch that
/// does not wait.
async fn backlog(c: &Client, n: usize) {
    let messages: Vec<Value> = (0..n)
        .map(|i| json!({"to": [format!("r{i}@example.org")]}))
        .collect();
    let (is_error, out) = call(
        c,
        "send_batch",
        json!({"defaults": {"subject": "news", "body": "b"}, "messages": messages, "wait": false}),
    )
    .await;
    assert!(!is_error, "{out}");
}

/// Mail of high priority sent while a mail merge waits for a relay's rate
/// takes the relay's next turn: the deferred messages, which come back at
/// random times within their wait, do not take it first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_mail_takes_a_relays_next_turn_of_its_rate() {
    let sink = FaultSmtp::start(Script::ok()).await;
    // 4 at once, then one every 250 ms.
    let d = start_with(|dir| rate_config(dir, sink.port(), "4/1s", None)).await;
    let c = connect(&d, "no-token-configured").await;
    backlog(&c, 40).await;
    assert!(sink.wait_for_delivered(8, Duration::from_secs(20)).await);
    let before = sink.delivered().len();
    let mut urgent = mail(json!(["urgent@example.org"]));
    urgent["subject"] = json!("urgent");
    urgent["priority"] = json!("high");
    urgent["wait"] = json!(false);
    let (is_error, out) = call(&c, "send_email", urgent).await;
    assert!(!is_error, "{out}");
    let at = arrival(&sink, "urgent").await;
    assert!(
        at <= before + 2,
        "delivered {} after it was sent, of 32 waiting",
        at - before
    );
    let s = status(&c, out["message_id"].as_str().unwrap()).await;
    assert_eq!(s["priority"], "high", "{s}");
    // The rest of the mail merge, each message once.
    assert!(sink.wait_for_delivered(41, Duration::from_secs(30)).await);
    let mut to: Vec<String> = sink
        .delivered()
        .iter()
        .map(|r| r.rcpt_to.join(","))
        .collect();
    to.sort();
    to.dedup();
    assert_eq!(to.len(), 41);
}

/// Mail of high priority waits for a relay's connection behind at most one
/// normal message, not behind a mail merge's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_mail_takes_a_relays_next_free_connection() {
    let sink = FaultSmtp::start(
        Script::ok().on(Phase::Data, SmtpAction::Pause(Duration::from_millis(150))),
    )
    .await;
    let d =
        start_with(|dir| rate_config(dir, sink.port(), "1000/1s", None) + "max_connections = 1\n")
            .await;
    let c = connect(&d, "no-token-configured").await;
    backlog(&c, 20).await;
    assert!(sink.wait_for_delivered(2, Duration::from_secs(20)).await);
    let before = sink.delivered().len();
    let mut urgent = mail(json!(["urgent@example.org"]));
    urgent["subject"] = json!("urgent");
    urgent["priority"] = json!("high");
    let (is_error, out) = call(&c, "send_email", urgent).await;
    assert!(!is_error && out["status"] == "sent", "{out}");
    let at = arrival(&sink, "urgent").await;
    assert!(
        at <= before + 2,
        "delivered {} after it was sent",
        at - before
    );
    assert!(sink.wait_for_delivered(21, Duration::from_secs(30)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_checked_per_message_and_each_message_takes_rate() {
    let (sink, other) = servers().await;
    let d = start(&sink, &other, "").await;
    let delta = connect(&d, DELTA).await;
    // 13 messages: one outside the allowlist, twelve inside; delta may send
    // ten a minute.
    let mut messages: Vec<Value> = vec![json!({"to": ["evil@attacker.net"]})];
    messages.extend((0..12).map(|i| json!({"to": [format!("r{i}@example.org")]})));
    let (is_error, out) = call(
        &delta,
        "send_batch",
        json!({"defaults": {"subject": "s", "body": BODY_MARKER}, "messages": messages}),
    )
    .await;
    assert!(!is_error, "{out}");
    let r = out["results"].as_array().unwrap();
    assert_eq!(r[0]["error"]["code"], "policy_denied");
    assert_eq!(r[0]["error"]["field"], "messages[0].to[0]");
    let sent = r.iter().filter(|x| x["status"] == "sent").count();
    let limited: Vec<&Value> = r
        .iter()
        .filter(|x| x["error"]["code"] == "rate_limited")
        .collect();
    assert_eq!((sent, limited.len()), (10, 2), "{out}");
    assert!(
        limited
            .iter()
            .all(|x| x["error"]["retry_after_s"].as_f64().unwrap() > 0.0)
    );
    assert_eq!(out["summary"], json!({"refused": 3, "sent": 10}));
    assert_eq!(sink.delivered().len(), 10);
    // Each refusal is audited on its own.
    let refused = d
        .audit()
        .into_iter()
        .filter(|l| l["event"]["action"] == "refused")
        .count();
    assert_eq!(refused, 3);
}

/// Whether the allowlist of the test's configuration (`@example.org`,
/// `boss@partner.net`, `@*.corp.example`) lets mail go to `rcpt`, an
/// envelope recipient as a relay received it. Lenient where the rules could
/// be read two ways (letter case, one trailing dot), strict on the domain a
/// relay routes by, and on a local part that routes elsewhere (`%`, `!`).
fn allowed_by_the_test_allowlist(rcpt: &str) -> bool {
    let rcpt = rcpt.trim_start_matches('<').trim_end_matches('>');
    let Some((local, domain)) = rcpt.rsplit_once('@') else {
        return false;
    };
    let domain = domain.to_ascii_lowercase();
    let domain = domain.strip_suffix('.').unwrap_or(&domain);
    let plain_local = !local.contains(['%', '!']);
    match domain {
        "example.org" => plain_local,
        "partner.net" => local.eq_ignore_ascii_case("boss"),
        d => d.ends_with(".corp.example") && plain_local,
    }
}

/// Random recipients against the recipient allowlist: local parts and
/// domains that route elsewhere or look like allowed ones, quoted, with
/// display names and comments, in to, cc and bcc. Whatever each call is
/// answered, every recipient the relay received is one the allowlist allows.
#[tokio::test]
async fn random_recipients_reach_only_what_the_allowlist_allows() {
    use rand::{Rng, SeedableRng};
    let seed = random_input::seed();
    println!("MAILMUX_RANDOM_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let sink = FaultSmtp::start(Script::ok()).await;
    let port = sink.port();
    let d = start_with(|dir| {
        format!(
            r#"
send_deadline = "8s"
shutdown_grace = "2s"

[queue]
path = "{db}"

[policy]
allowed_recipients = ["@example.org", "boss@partner.net", "@*.corp.example"]

[[callers]]
name = "delta"
token_env = "DELTA_TOKEN"

[[relays]]
name = "sink"
host = "127.0.0.1"
port = {port}
tls = "none"
from_email = "sender@example.org"
timeout = "3s"
"#,
            db = dir.join("queue.db").display(),
        )
    })
    .await;
    let c = connect(&d, DELTA).await;

    const LOCALS: &[&str] = &[
        "x",
        "X",
        "a.b",
        "boss",
        "Boss",
        "boss2",
        "\"q\"",
        "\"a@b\"",
        "\"evil@attacker.net\"",
        "drop%attacker.net",
        "attacker.net!drop",
        "o'k",
        "x+tag",
        "ü",
        "\"a b\"",
        "a..b",
        ".x",
    ];
    const DOMAINS: &[&str] = &[
        "example.org",
        "EXAMPLE.ORG",
        "example.org.",
        "sub.example.org",
        "corp.example",
        "mail.corp.example",
        "a.b.corp.example",
        "MAIL.CORP.EXAMPLE",
        "xcorp.example",
        "corp.example.attacker.net",
        "partner.net",
        "PARTNER.NET",
        "attacker.net",
        "example.org.attacker.net",
        "ex\u{430}mple.org",
        "[127.0.0.1]",
        "[IPv6:::1]",
        "xn--exmple-cua.org",
        "example.org@attacker.net",
        "example.org>",
        "example.org,evil@attacker.net",
        "example.org (comment)",
        "attacker.net (example.org)",
        "",
    ];
    // Well-formed ones, inside the allowlist and out, so that many calls
    // are taken.
    const WELL_FORMED: &[&str] = &[
        "x@example.org",
        "X@EXAMPLE.ORG",
        "boss@partner.net",
        "a@mail.corp.example",
        "\"q\"@example.org",
        "evil@attacker.net",
        "x@sub.example.org",
        "x@corp.example",
        "boss2@partner.net",
        "x@example.org.attacker.net",
    ];
    let address = |rng: &mut rand::rngs::StdRng| {
        let addr = if rng.random_bool(0.6) {
            WELL_FORMED[rng.random_range(0..WELL_FORMED.len())].to_owned()
        } else {
            format!(
                "{}@{}",
                LOCALS[rng.random_range(0..LOCALS.len())],
                DOMAINS[rng.random_range(0..DOMAINS.len())]
            )
        };
        match rng.random_range(0..10) {
            0 => format!("\"ok@example.org\" <{addr}>"),
            1 => format!("<{addr}>"),
            2 => format!("Name <{addr}> (x@example.org)"),
            3 => format!(
                "{addr}, {}",
                ["x@example.org", "evil@attacker.net"][rng.random_range(0..2)]
            ),
            _ => addr,
        }
    };
    let mut answered = std::collections::BTreeMap::new();
    for i in 0..600 {
        let mut args = json!({ "subject": format!("random {i}"), "body": BODY_MARKER });
        for field in ["to", "cc", "bcc"] {
            if field == "to" || rng.random_bool(0.3) {
                let list: Vec<String> = (0..rng.random_range(1..3))
                    .map(|_| address(&mut rng))
                    .collect();
                args[field] = json!(list);
            }
        }
        let (is_error, out) = call(&c, "send_email", args).await;
        let key = if is_error {
            format!("error {}", out["error"]["code"].as_str().unwrap_or("?"))
        } else {
            out["status"].as_str().unwrap_or("?").to_owned()
        };
        *answered.entry(key).or_insert(0) += 1;
    }
    println!("answers: {answered:?}");
    let delivered = sink.delivered();
    let outside: Vec<&String> = delivered
        .iter()
        .flat_map(|r| &r.rcpt_to)
        .filter(|r| !allowed_by_the_test_allowlist(r))
        .collect();
    assert!(
        outside.is_empty(),
        "seed {seed}: mail went outside the allowlist: {outside:?}"
    );
    assert!(
        delivered.len() >= 10,
        "seed {seed}: too few messages went out to prove anything: {answered:?}"
    );
}

/// Delivery paused and resumed over `/admin/pause` by an operator: a
/// caller's token is refused; a bad body is refused and pauses nothing;
/// while paused a call that waits is answered `queued` and nothing reaches
/// the server; the status, the metrics and the audit log say so; a resume
/// delivers the queued message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_pause_and_resume_delivery_over_http() {
    let sink = FaultSmtp::start(Script::ok()).await;
    let other = FaultSmtp::start(Script::ok()).await;
    let d = start_with(|dir| config_toml(dir, sink.port(), other.port(), "")).await;
    let delta = connect(&d, DELTA).await;
    let http = reqwest::Client::new();
    let url = format!("{}/admin/pause", d.base);
    let r = http.post(&url).bearer_auth(DELTA).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401, "a caller's token");
    for body in [
        json!({ "colour": "red" }),
        json!({ "reason": "two\nlines" }),
    ] {
        let r = http
            .post(&url)
            .bearer_auth(OPS)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{body}");
        assert!(r.text().await.unwrap().contains("nothing was changed"));
    }
    let r = http.get(&url).bearer_auth(OPS).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({ "paused": false }));
    let r = http.delete(&url).bearer_auth(OPS).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404, "resumed while running");

    let r = http
        .post(&url)
        .bearer_auth(OPS)
        .json(&json!({ "reason": "rollout" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let p = r.json::<Value>().await.unwrap();
    assert_eq!(
        (&p["paused"], &p["by"], &p["reason"]),
        (&json!(true), &json!("operator ops"), &json!("rollout"))
    );
    let r = http.post(&url).bearer_auth(OPS).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "paused already: the first kept");
    assert_eq!(r.json::<Value>().await.unwrap()["reason"], "rollout");

    let (_, out) = call(&delta, "send_email", mail(json!(["a@example.org"]))).await;
    assert_eq!(out["status"], "queued", "{out}");
    let id = out["message_id"].as_str().unwrap().to_owned();
    let (_, st) = call(&delta, "get_smtp_status", json!({})).await;
    assert_eq!(st["queue"]["paused"]["by"], "operator ops", "{st}");
    let metrics = d.metrics().await;
    assert!(metrics.contains("mailmux_delivery_paused 1"), "{metrics}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(sink.delivered().is_empty() && other.delivered().is_empty());

    let r = http.delete(&url).bearer_auth(OPS).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({ "paused": false }));
    wait_status(&delta, &id, "sent").await;
    assert_eq!(sink.delivered().len() + other.delivered().len(), 1);
    let changes: Vec<Value> = d
        .audit()
        .into_iter()
        .filter(|l| matches!(l["event"]["action"].as_str(), Some("paused" | "resumed")))
        .collect();
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!(changes[0]["event"]["reason"], "rollout");
    assert_eq!(changes[0]["user"]["name"], "operator ops");
    assert_eq!(changes[1]["event"]["action"], "resumed");
}

/// The suppression list through `/admin/suppressions` on the `memory`
/// store, which the queue command cannot reach: a bounce listed by the
/// daemon, an operator's entry and removal in force at once, bad input
/// refused with nothing changed, a caller's token refused, and the
/// refusals of listed recipients in the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_keep_the_suppression_list_over_http() {
    let sink = FaultSmtp::start(Script::ok().on_rcpt(
        "gone@example.org",
        SmtpAction::reply(550, "5.1.1 no such user"),
    ))
    .await;
    let other = FaultSmtp::start(Script::ok()).await;
    let d = start_with(|dir| {
        config_toml(dir, sink.port(), other.port(), "")
            .replace("[queue]\n", "[queue]\nstore = \"memory\"\n")
    })
    .await;
    let delta = connect(&d, DELTA).await;
    let to_gone = json!(["a@example.org", "gone@example.org"]);
    let (_, out) = call(&delta, "send_email", mail(to_gone.clone())).await;
    assert_eq!(out["status"], "partial", "{out}");

    let http = reqwest::Client::new();
    let url = |path: &str| format!("{}/admin/suppressions{path}", d.base);
    let list = || async {
        let r = http.get(url("")).bearer_auth(OPS).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r.json::<Value>().await.unwrap()["suppressions"].clone()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while list().await.as_array().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the bounce was never listed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let l = list().await;
    assert_eq!(l[0]["address"], "gone@example.org", "{l}");
    assert_eq!(l[0]["reason"], "bounced", "{l}");
    let r = http.get(url("")).bearer_auth(DELTA).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401, "a caller's token");

    // An operator's entry: in force at once, kept as first written.
    let put = |path: &str, body: Option<Value>| {
        let mut req = http.put(url(path)).bearer_auth(OPS);
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send()
    };
    let note = json!({ "reason": "unsubscribed", "note": "web form" });
    let r = put("/Unsub@Example.org", Some(note.clone())).await.unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let r = put("/unsub@example.org", None).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["added"], false);
    for (path, body) in [
        ("/not-an-address", None),
        ("/x@example.org", Some(json!({ "reason": "bounced" }))),
        ("/x@example.org", Some(json!({ "colour": "red" }))),
        ("/x@example.org", Some(json!({ "note": "two\nlines" }))),
    ] {
        let r = put(path, body.clone()).await.unwrap();
        assert_eq!(r.status().as_u16(), 400, "{path} {body:?}");
        let text = r.text().await.unwrap();
        assert!(text.contains("nothing was changed"), "{text}");
    }
    assert_eq!(list().await.as_array().unwrap().len(), 2);
    // A page at a time, by address, and a search.
    let page = |query: &str| {
        let req = http.get(url(query)).bearer_auth(OPS);
        async move {
            let r = req.send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or_default(),
            )
        }
    };
    let (status, p) = page("?limit=1").await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["total"], 2, "{p}");
    assert_eq!(p["suppressions"].as_array().unwrap().len(), 1, "{p}");
    assert_eq!(p["suppressions"][0]["address"], "gone@example.org", "{p}");
    assert_eq!(p["next_after"], "gone@example.org", "{p}");
    let (_, p) = page("?limit=1&after=gone%40example.org").await;
    assert_eq!(p["suppressions"][0]["address"], "unsub@example.org", "{p}");
    assert!(p["next_after"].is_null(), "{p}");
    let (_, p) = page("?q=UNSUB").await;
    assert_eq!(p["suppressions"].as_array().unwrap().len(), 1, "{p}");
    assert_eq!(p["suppressions"][0]["address"], "unsub@example.org", "{p}");
    for bad in ["?limit=0", "?limit=10001", "?limit=ten", "?colour=red"] {
        let (status, _) = page(bad).await;
        assert_eq!(status, 400, "{bad}");
    }
    let (_, out) = call(&delta, "send_email", mail(json!(["unsub@example.org"]))).await;
    assert_eq!(out["error"]["code"], "recipient_suppressed", "{out}");
    assert_eq!(out["error"]["rule"], "unsubscribed", "{out}");

    // Removed: in force at once; a second removal finds nothing.
    for want in [200, 404] {
        let r = http
            .delete(url("/gone@example.org"))
            .bearer_auth(OPS)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), want);
    }
    let (_, out) = call(&delta, "send_email", mail(to_gone)).await;
    assert_eq!(out["status"], "partial", "{out}");
    assert_eq!(sink.delivered().len(), 2);

    // The refusal is audited with its code, and no body; each change of
    // the list with who made it.
    let audit = d.audit();
    let refused: Vec<&Value> = audit
        .iter()
        .filter(|l| l["mailmux"]["code"] == "recipient_suppressed")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["event"]["action"], "refused");
    assert!(!refused[0].to_string().contains(BODY_MARKER));
    let changes: Vec<(String, String, String, String)> = audit
        .iter()
        .filter(|l| {
            l["event"]["action"]
                .as_str()
                .unwrap()
                .contains("suppressed")
        })
        .map(|l| {
            let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
            (
                s(&l["event"]["action"]),
                s(&l["user"]["name"]),
                s(&l["email"]["to"]["address"][0]),
                s(&l["event"]["reason"]),
            )
        })
        .collect();
    let want = [
        ("suppressed", "daemon", "gone@example.org", "bounced"),
        (
            "suppressed",
            "operator ops",
            "unsub@example.org",
            "unsubscribed",
        ),
        ("unsuppressed", "operator ops", "gone@example.org", ""),
        // Listed again by the bounce of the last message.
        ("suppressed", "daemon", "gone@example.org", "bounced"),
    ]
    .map(|(a, b, c, d)| (a.to_owned(), b.to_owned(), c.to_owned(), d.to_owned()));
    assert_eq!(changes, want);
}

/// The text body of a message as sent, decoded.
fn body_text(data: &[u8]) -> String {
    mail_parser::MessageParser::default()
        .parse(data)
        .and_then(|m| m.body_text(0).map(|b| b.into_owned()))
        .unwrap_or_default()
}

/// A list of 25,000 imported while the daemon runs: the daemon reads it
/// whole into its copy (10,000 at a time) and refuses its last address;
/// `GET /admin/suppressions` without `limit` answers the whole list (the
/// store read 10,000 at a time, the body written as it is read), each
/// address once, in order, with the total; a page of 10,000 asked for by
/// `limit` is still one page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_suppression_list_is_answered_however_long() {
    let sink = FaultSmtp::start(Script::ok()).await;
    let other = FaultSmtp::start(Script::ok()).await;
    let d = start(&sink, &other, "").await;
    let addresses: Vec<String> = (0..25_000)
        .map(|i| format!("listed-{i:05}@example.org"))
        .collect();
    let file = d.dir.path().join("list.txt");
    std::fs::write(&file, addresses.join("\n")).unwrap();
    let (ok, out) = d.queue_args(&["suppress", "add", "--file", file.to_str().unwrap()], None);
    assert!(ok, "{out}");
    let delta = connect(&d, DELTA).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, status) = call(&delta, "get_smtp_status", json!({})).await;
        if status["queue"]["suppressed"] == 25_000 {
            break;
        }
        assert!(Instant::now() < deadline, "{}", status["queue"]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, out) = call(
        &delta,
        "send_email",
        json!({ "to": ["listed-24999@example.org"], "subject": "s", "body": "b", "dry_run": true }),
    )
    .await;
    assert_eq!(out["error"]["code"], "recipient_suppressed", "{out}");
    let http = reqwest::Client::new();
    let get = |query: &'static str| {
        let http = http.clone();
        let url = format!("{}/admin/suppressions{query}", d.base);
        async move {
            let r = http.get(url).bearer_auth(OPS).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let whole = get("").await;
    let listed: Vec<&str> = whole["suppressions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["address"].as_str().unwrap())
        .collect();
    assert_eq!(listed, addresses);
    assert_eq!(whole["total"], 25_000);
    assert_eq!(whole["next_after"], Value::Null);
    assert_eq!(whole["suppressions"][0]["reason"], "manual");
    // With a search, the whole of what holds it.
    let found = get("?q=LISTED-1").await;
    assert_eq!(found["suppressions"].as_array().unwrap().len(), 10_000);
    assert_eq!(found["total"], 25_000);
    let page = get("?limit=10000").await;
    assert_eq!(page["suppressions"].as_array().unwrap().len(), 10_000);
    assert_eq!(page["next_after"], "listed-09999@example.org");
}

/// One-click unsubscribe links that the daemon serves: each message of one
/// recipient gets its own link in `List-Unsubscribe` (with
/// `List-Unsubscribe-Post`) and in its body; a GET of the link shows a form
/// and changes nothing; the one-click POST, with no token and by the public
/// host name, lists the recipient, whose next message is refused; a link
/// with a changed token lists nobody; a message of two recipients cannot
/// have one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_click_unsubscribe_lists_its_recipient() {
    let sink = FaultSmtp::start(Script::ok()).await;
    let other = FaultSmtp::start(Script::ok()).await;
    let secret = "0123456789abcdef0123456789abcdef-unsubscribe";
    let extra =
        format!("[unsubscribe]\nurl = \"https://mail.example.test/\"\nsecret = \"{secret}\"\n");
    let d = start(&sink, &other, &extra).await;
    let delta = connect(&d, DELTA).await;
    let letter = |to: Value| {
        json!({
            "to": to, "subject": "news", "unsubscribe": true,
            "body": "Hello.\nTo stop these: {unsubscribe_url}\n",
        })
    };
    let (_, out) = call(&delta, "send_email", letter(json!(["reader@example.org"]))).await;
    assert_eq!(out["status"], "sent", "{out}");
    let text = String::from_utf8_lossy(&sink.delivered()[0].data).into_owned();
    assert!(
        text.contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click"),
        "{text}"
    );
    let start = text
        .find("<https://mail.example.test/unsubscribe/")
        .unwrap()
        + 1;
    let link = &text[start..start + text[start..].find('>').unwrap()];
    let body = body_text(&sink.delivered()[0].data);
    assert!(body.contains(&format!("To stop these: {link}")), "{body}");
    let token = link.rsplit('/').next().unwrap().to_string();

    let http = reqwest::Client::new();
    let url = format!("{}/unsubscribe/{token}", d.base);
    let listed = || async {
        let r = http
            .get(format!("{}/admin/suppressions", d.base))
            .bearer_auth(OPS)
            .send()
            .await
            .unwrap();
        r.json::<Value>().await.unwrap()["suppressions"].clone()
    };
    // A GET shows the form and changes nothing.
    let r = http
        .get(&url)
        .header("Host", "mail.example.test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let page = r.text().await.unwrap();
    assert!(
        page.contains("reader@example.org") && page.contains("<form method=\"post\""),
        "{page}"
    );
    assert_eq!(listed().await, json!([]));
    // A changed token lists nobody.
    let mut forged = token.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    let r = http
        .post(format!("{}/unsubscribe/{forged}", d.base))
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(listed().await, json!([]));
    // The one-click POST, as a mailbox provider makes it.
    let r = http
        .post(&url)
        .header("Host", "mail.example.test")
        .header("Origin", "https://mail.example.test")
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let l = listed().await;
    assert_eq!(l[0]["address"], "reader@example.org", "{l}");
    assert_eq!(l[0]["reason"], "unsubscribed", "{l}");
    assert_eq!(l[0]["detail"], "one-click (List-Unsubscribe-Post)", "{l}");
    let audited: Vec<Value> = d
        .audit()
        .into_iter()
        .filter(|l| l["event"]["action"] == "suppressed")
        .collect();
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert_eq!(audited[0]["user"]["name"], "recipient");
    assert_eq!(
        audited[0]["email"]["to"]["address"][0],
        "reader@example.org"
    );
    // The link posted again writes nothing: with the store refusing every
    // new entry, the recipient still reads that it is unsubscribed.
    let db = common::refuse_suppressions(&d.dir.path().join("queue.db"));
    for _ in 0..3 {
        let r = http
            .post(&url)
            .header("Host", "mail.example.test")
            .body("List-Unsubscribe=One-Click")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(r.text().await.unwrap().contains("Unsubscribed"));
    }
    common::accept_suppressions(&db);
    let (_, out) = call(&delta, "send_email", letter(json!(["Reader@example.org"]))).await;
    assert_eq!(out["error"]["code"], "recipient_suppressed", "{out}");
    assert_eq!(out["error"]["rule"], "unsubscribed", "{out}");

    // One link per recipient: two recipients in one message are refused;
    // a batch gives each message its own.
    let (_, out) = call(
        &delta,
        "send_email",
        letter(json!(["a@example.org", "b@example.org"])),
    )
    .await;
    assert_eq!(out["error"]["code"], "invalid_input", "{out}");
    assert_eq!(out["error"]["field"], "unsubscribe", "{out}");
    assert_eq!(out["error"]["rule"], "one_recipient", "{out}");
    let (_, out) = call(
        &delta,
        "send_batch",
        json!({
            "defaults": { "subject": "news", "body": "Stop: {unsubscribe_url}\n", "unsubscribe": true },
            "messages": [{ "to": ["a@example.org"] }, { "to": ["b@example.org"] }],
        }),
    )
    .await;
    assert_eq!(out["summary"], json!({ "sent": 2 }), "{out}");
    let got = sink.delivered();
    let links: Vec<String> = got[1..]
        .iter()
        .map(|t| {
            let text = body_text(&t.data);
            let s = text.find("Stop: ").unwrap() + 6;
            text[s..].lines().next().unwrap().to_string()
        })
        .collect();
    assert_eq!(links.len(), 2);
    assert_ne!(links[0], links[1]);
    assert_eq!(sink.delivered().len(), 3, "the refused ones never went");
}

/// A rotation of the unsubscribe secret, by SIGHUP: with the old key as
/// `previous_secret`, a link sent before still lists its recipient and new
/// links are the new key's; once the old key is dropped, its links list
/// nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_made_before_a_rotation_of_the_unsubscribe_secret_still_work() {
    let sink = FaultSmtp::start(Script::ok()).await;
    let other = FaultSmtp::start(Script::ok()).await;
    let (old, new) = ("o".repeat(40), "n".repeat(40));
    let section = |extra: &str| {
        format!("[unsubscribe]\nurl = \"https://mail.example.test/\"\nsecret = \"{new}\"\n{extra}")
    };
    let first =
        format!("[unsubscribe]\nurl = \"https://mail.example.test/\"\nsecret = \"{old}\"\n");
    let d = start(&sink, &other, &first).await;
    let delta = connect(&d, DELTA).await;
    let http = reqwest::Client::new();
    let link_to = |to: &'static str| {
        let delta = &delta;
        let sink = &sink;
        async move {
            let (_, out) = call(
                delta,
                "send_email",
                json!({ "to": [to], "subject": "news", "body": "Stop: {unsubscribe_url}\n", "unsubscribe": true }),
            )
            .await;
            assert_eq!(out["status"], "sent", "{out}");
            let body = body_text(&sink.delivered().last().unwrap().data);
            let s = body.find("Stop: ").unwrap() + 6;
            let link = body[s..].lines().next().unwrap().to_string();
            link.rsplit('/').next().unwrap().to_string()
        }
    };
    let post = |token: String| {
        let http = &http;
        let base = d.base.clone();
        async move {
            http.post(format!("{base}/unsubscribe/{token}"))
                .body("List-Unsubscribe=One-Click")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let before = link_to("early@example.org").await;
    let dropped = link_to("dropped@example.org").await;

    let text = std::fs::read_to_string(&d.config).unwrap();
    let rotated = text.replace(&first, &section(&format!("previous_secret = \"{old}\"\n")));
    assert_ne!(rotated, text);
    std::fs::write(&d.config, &rotated).unwrap();
    hangup(&d, "reloaded: added []").await;
    assert_eq!(post(before).await, 200, "a link sent before the rotation");
    let after = link_to("late@example.org").await;
    assert_ne!(after, dropped);
    assert_eq!(post(after).await, 200, "a link made after it");

    // The old key dropped: its links list nobody.
    std::fs::write(
        &d.config,
        rotated.replace(&format!("previous_secret = \"{old}\"\n"), ""),
    )
    .unwrap();
    hangup(&d, "reloaded: added []").await;
    assert_eq!(post(dropped).await, 404);
    let r = http
        .get(format!("{}/admin/suppressions", d.base))
        .bearer_auth(OPS)
        .send()
        .await
        .unwrap();
    let listed: Vec<String> = r.json::<Value>().await.unwrap()["suppressions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["address"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, ["early@example.org", "late@example.org"]);
    assert!(
        !d.log().contains(&old) && !d.log().contains(&new),
        "a secret in the log"
    );
}

/// A repeat of a stored call, by its idempotency key, is answered with the
/// first call's status even when the policy (changed by a reload) or the
/// caller's rate would refuse the call now: a refusal would say that
/// nothing was sent when the first call sent it. Nothing is sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_repeat_gets_its_first_calls_status_whatever_the_policy_and_rate_say_now() {
    let (sink, other) = servers().await;
    let d = start(&sink, &other, "").await;
    let delta = connect(&d, DELTA).await;
    let keyed = |to: &str, key: &str| {
        let mut m = mail(json!([to]));
        m["idempotency_key"] = json!(key);
        m
    };
    let (_, first) = call(&delta, "send_email", keyed("boss@partner.net", "k-policy")).await;
    assert_eq!(first["status"], "sent", "{first}");

    // The partner is no longer allowed.
    let text = std::fs::read_to_string(&d.config).unwrap();
    let narrowed = text.replace(r#""boss@partner.net", "#, "");
    assert_ne!(narrowed, text);
    std::fs::write(&d.config, narrowed).unwrap();
    hangup(&d, "reloaded: added []").await;
    let (_, out) = call(&delta, "send_email", mail(json!(["boss@partner.net"]))).await;
    assert_eq!(out["error"]["code"], "policy_denied", "{out}");
    let (is_error, out) = call(&delta, "send_email", keyed("boss@partner.net", "k-policy")).await;
    assert!(!is_error, "{out}");
    assert_eq!(out["status"], "sent", "{out}");
    assert_eq!(out["idempotent_replay"], true, "{out}");
    assert_eq!(out["message_id"], first["message_id"], "{out}");

    // The rate (10 recipients a minute) spent: the repeat still gets its
    // status; a new call is limited.
    let (_, second) = call(&delta, "send_email", keyed("a@example.org", "k-rate")).await;
    assert_eq!(second["status"], "sent", "{second}");
    let mut limited = None;
    for i in 0..10 {
        let (_, out) = call(
            &delta,
            "send_email",
            mail(json!([format!("r{i}@example.org")])),
        )
        .await;
        if out["error"]["code"] == "rate_limited" {
            limited = Some(out);
            break;
        }
    }
    assert!(limited.is_some(), "the rate was never reached");
    let (is_error, out) = call(&delta, "send_email", keyed("a@example.org", "k-rate")).await;
    assert!(!is_error, "{out}");
    assert_eq!(out["idempotent_replay"], true, "{out}");
    assert_eq!(out["message_id"], second["message_id"], "{out}");
    let to_boss = sink
        .received()
        .iter()
        .filter(|m| m.rcpt_to.iter().any(|r| r == "boss@partner.net"))
        .count();
    assert_eq!(to_boss, 1, "sent once");
}

/// Repeats of a stored call take nothing from the caller's rate: they send
/// nothing. After twenty repeats the caller (10 recipients a minute) still
/// sends nine new one-recipient messages, and the tenth new one is limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_repeats_take_no_rate() {
    let (sink, other) = servers().await;
    let d = start(&sink, &other, "").await;
    let delta = connect(&d, DELTA).await;
    let mut keyed = mail(json!(["a@example.org"]));
    keyed["idempotency_key"] = json!("k-repeated");
    let (_, first) = call(&delta, "send_email", keyed.clone()).await;
    assert_eq!(first["status"], "sent", "{first}");
    for _ in 0..20 {
        let (is_error, out) = call(&delta, "send_email", keyed.clone()).await;
        assert!(!is_error, "{out}");
        assert_eq!(out["idempotent_replay"], true, "{out}");
    }
    for i in 0..9 {
        let (_, out) = call(
            &delta,
            "send_email",
            mail(json!([format!("r{i}@example.org")])),
        )
        .await;
        assert_eq!(out["status"], "sent", "new message {i}: {out}");
    }
    let (_, out) = call(&delta, "send_email", mail(json!(["r9@example.org"]))).await;
    assert_eq!(out["error"]["code"], "rate_limited", "{out}");
    assert_eq!(
        sink.received().len(),
        10,
        "the first call and nine new ones"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_checks_refuse_or_hold_a_message_by_what_it_says() {
    use base64::Engine as _;
    const KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n-----END OPENSSH PRIVATE KEY-----\n";
    let (sink, other) = servers().await;
    let d = start(&sink, &other, "").await;
    let theta = connect(&d, THETA).await;
    let to = json!(["someone@anywhere.net"]);

    // theta may mail anyone: a plain message goes out.
    let (e, out) = call(
        &theta,
        "send_email",
        json!({"to": to, "subject": "hi", "body": "plain"}),
    )
    .await;
    assert!(!e, "{out}");
    assert_eq!(out["status"], "sent", "{out}");

    // A key in the body, in an attachment (decoded), or in a dry run: refused,
    // naming the check and the part, never the text.
    let attachment = base64::engine::general_purpose::STANDARD.encode(KEY);
    for (args, field) in [
        (
            json!({"to": to, "subject": "keys", "body": format!("here it is:\n{KEY}")}),
            "body",
        ),
        (
            json!({"to": to, "subject": "keys", "body": "see attached",
                   "attachments": [{"filename": "id_ed25519", "content_base64": attachment}]}),
            "attachments[0]",
        ),
        (
            json!({"to": to, "subject": "keys", "body": KEY, "dry_run": true}),
            "body",
        ),
    ] {
        let (e, out) = call(&theta, "send_email", args).await;
        assert!(e, "{out}");
        assert_eq!(out["error"]["code"], "policy_denied", "{out}");
        assert_eq!(out["error"]["rule"], "content_rejected", "{out}");
        assert_eq!(out["error"]["field"], field, "{out}");
        assert_eq!(out["error"]["check"], "private key", "{out}");
        assert_eq!(
            out["error"]["message"],
            format!(
                "{field} matches content check \"private key\" of caller \"theta\"; nothing was sent"
            ),
            "{out}"
        );
        assert!(!out.to_string().contains("OPENSSH"), "{out}");
    }
    assert_eq!(sink.delivered().len(), 1);

    // An invoice is held for an operator, even though theta may mail
    // anyone; approved, it goes out.
    let (e, out) = call(
        &theta,
        "send_email",
        json!({"to": to, "subject": "Invoice 42", "body": "attached", "wait": false}),
    )
    .await;
    assert!(!e, "{out}");
    assert_eq!(out["status"], "held", "{out}");
    let held = out["message_id"].as_str().unwrap().to_string();
    assert!(!out.to_string().contains("content check"), "{out}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.delivered().len(), 1, "a held message went out");
    // The operator's console says which check held it; the audit line too.
    let why = "<dt>held because</dt><dd>content check &quot;invoice&quot; matched subject</dd>";
    for page in [
        "/console/approvals".to_owned(),
        format!("/console/messages/{held}"),
    ] {
        let html = d.console_page(&page).await;
        assert!(html.contains(why), "{page}: {html}");
    }
    let lines = d.audit();
    let line = audit_line(&lines, &held, "held");
    assert_eq!(
        line["mailmux"]["held_by"], "content check \"invoice\" matched subject",
        "{line}"
    );
    // Each check that decided is counted, by caller, check and action.
    let metrics = d.metrics().await;
    for line in [
        r#"mailmux_content_checks_total{caller="theta",check="private key",action="reject"} 3"#,
        r#"mailmux_content_checks_total{caller="theta",check="invoice",action="hold"} 1"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}: {metrics}");
    }
    let (ok, text) = d.queue_cmd("show", &held, None);
    assert!(ok, "{text}");
    assert!(
        text.contains("held because content check \"invoice\" matched subject"),
        "{text}"
    );
    let (ok, text) = d.queue_cmd("approve", &held, Some(OPS));
    assert!(ok, "{text}");
    wait_status(&theta, &held, "sent").await;

    // A batch is checked message by message, after its templates are
    // rendered: the one whose variables carry a key is refused alone.
    let (e, out) = call(
        &theta,
        "send_batch",
        json!({"defaults": {"subject": "Update for {name}", "body": "Hello {name}: {note}"},
               "messages": [
                   {"to": ["ada@anywhere.net"], "template_vars": {"name": "Ada", "note": "fine"}},
                   {"to": ["bob@anywhere.net"], "template_vars": {"name": "Bob", "note": KEY}},
                   {"to": ["cy@anywhere.net"], "template_vars": {"name": "Cy", "note": "ok"}}]}),
    )
    .await;
    assert!(!e, "{out}");
    let r = out["results"].as_array().unwrap();
    assert_eq!(
        (&r[0]["status"], &r[2]["status"]),
        (&json!("sent"), &json!("sent")),
        "{out}"
    );
    assert_eq!(r[1]["error"]["rule"], "content_rejected", "{out}");
    assert_eq!(r[1]["error"]["field"], "messages[1].body", "{out}");
    assert!(!out.to_string().contains("OPENSSH"), "{out}");

    let delivered = sink.delivered();
    assert_eq!(delivered.len(), 4);
    assert!(
        delivered
            .iter()
            .all(|m| !String::from_utf8_lossy(&m.data).contains("OPENSSH"))
    );
    // The refusals are audited by their rule; neither the audit log nor the
    // daemon's log repeats what matched.
    let audit = d.audit();
    let refused: Vec<&Value> = audit
        .iter()
        .filter(|l| l["mailmux"]["rule"] == "content_rejected")
        .collect();
    assert!(refused.len() >= 3, "{audit:#?}");
    assert!(
        refused
            .iter()
            .all(|l| l["mailmux"]["check"] == "private key"),
        "{refused:#?}"
    );
    assert!(!audit.iter().any(|l| l.to_string().contains("OPENSSH")));
    let log = d.log();
    assert!(!log.contains("OPENSSH"));
    assert!(
        log.contains("a content check holds the message"),
        "the hold is not logged"
    );
}

/// An agent that zips what a check would find does not get it past the
/// check: the files inside a zip or gzip are looked at. An archive that
/// cannot be read whole (here a bomb that would unpack past 8 MiB) is held
/// for an operator, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_checks_look_inside_archives_and_hold_what_they_cannot_read() {
    use base64::Engine as _;
    use std::io::Write as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let (sink, other) = servers().await;
    let d = start(&sink, &other, "").await;
    let theta = connect(&d, THETA).await;
    let to = json!(["someone@anywhere.net"]);
    let zipped = |name: &str, data: &[u8]| {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let deflated = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        w.start_file(name, deflated).unwrap();
        w.write_all(data).unwrap();
        w.finish().unwrap().into_inner()
    };
    let gzipped = |data: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    };
    let key = b"-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----\n";
    for (file, data) in [
        ("keys.zip", zipped("id_rsa", key)),
        ("keys.tar.gz", gzipped(key)),
    ] {
        let (e, out) = call(
            &theta,
            "send_email",
            json!({"to": to, "subject": "backup", "body": "attached",
                   "attachments": [{"filename": file, "content_base64": b64(&data)}]}),
        )
        .await;
        assert!(e, "{file}: {out}");
        assert_eq!(out["error"]["rule"], "content_rejected", "{out}");
        assert_eq!(out["error"]["field"], "attachments[0]", "{out}");
        assert_eq!(out["error"]["check"], "private key", "{out}");
    }
    // A harmless zip goes out.
    let (e, out) = call(
        &theta,
        "send_email",
        json!({"to": to, "subject": "notes", "body": "attached",
               "attachments": [{"filename": "notes.zip",
                                "content_base64": b64(&zipped("notes.txt", b"see you at ten"))}]}),
    )
    .await;
    assert!(!e, "{out}");
    assert_eq!(out["status"], "sent", "{out}");
    // A bomb: a few KiB that would unpack to 9 MiB.
    let bomb = gzipped(&vec![b'a'; 9 << 20]);
    assert!(bomb.len() < 64 << 10);
    let (e, out) = call(
        &theta,
        "send_email",
        json!({"to": to, "subject": "data", "body": "attached", "wait": false,
               "attachments": [{"filename": "data.gz", "content_base64": b64(&bomb)}]}),
    )
    .await;
    assert!(!e, "{out}");
    assert_eq!(out["status"], "held", "{out}");
    let held = out["message_id"].as_str().unwrap().to_string();
    let lines = d.audit();
    let line = audit_line(&lines, &held, "held");
    assert_eq!(
        line["mailmux"]["held_by"], "content check \"unreadable archive\" matched attachments[0]",
        "{line}"
    );
    let metrics = d.metrics().await;
    let counted = r#"mailmux_content_checks_total{caller="theta",check="unreadable archive",action="hold"} 1"#;
    assert!(metrics.lines().any(|l| l == counted), "{metrics}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.delivered().len(), 1, "only the harmless zip went out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_checks_change_with_a_reload_and_a_bad_pattern_keeps_the_old_ones() {
    let (sink, other) = servers().await;
    let d = start(&sink, &other, "").await;
    let theta = connect(&d, THETA).await;
    let invoice = |n: u32| {
        json!({"to": ["client@anywhere.net"], "subject": format!("Invoice {n}"),
               "body": "attached", "wait": false})
    };
    let (_, out) = call(&theta, "send_email", invoice(7)).await;
    assert_eq!(out["status"], "held", "{out}");

    // The check's action changed to reject: a reload applies it.
    let text = std::fs::read_to_string(&d.config).unwrap();
    assert_eq!(text.matches(r#"action = "hold""#).count(), 1);
    std::fs::write(
        &d.config,
        text.replace(r#"action = "hold""#, r#"action = "reject""#),
    )
    .unwrap();
    hangup(&d, "reloaded:").await;
    let (is_error, out) = call(&theta, "send_email", invoice(8)).await;
    assert!(is_error, "{out}");
    assert_eq!(out["error"]["rule"], "content_rejected", "{out}");
    assert_eq!(out["error"]["field"], "subject", "{out}");

    // A pattern that does not compile: the reload is refused, naming its
    // key, and the checks in force stay.
    let text = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        text.replace(r"'(?i)\binvoice\b'", "'(?i)(unclosed'"),
    )
    .unwrap();
    hangup(&d, "configuration not reloaded").await;
    assert!(
        d.log().contains("callers.6.content_checks.1.pattern"),
        "{}",
        d.log()
    );
    let (is_error, out) = call(&theta, "send_email", invoice(9)).await;
    assert!(
        is_error && out["error"]["rule"] == "content_rejected",
        "{out}"
    );
    assert_eq!(sink.delivered().len(), 0);
}

/// The operator's templates: a caller held to them sends only their
/// wording, filled with its variables (escaped in HTML), alone and in a
/// batch; what it may name is listed to it; content checks read the
/// rendered text; the audit line names the template; a reload re-reads the
/// file, and a template that does not parse keeps the ones in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_held_to_templates_sends_only_the_operators_wording() {
    const KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----";
    let (sink, other) = servers().await;
    let d = start(&sink, &other, "").await;
    let iota = connect(&d, IOTA).await;
    let delta = connect(&d, DELTA).await;
    let to = json!(["customer@anywhere.net"]);

    // What each caller may name, with the variables to give.
    let status = call(&iota, "get_smtp_status", json!({})).await.1;
    assert_eq!(status["caller"]["require_template"], true, "{status}");
    assert_eq!(
        status["templates"],
        json!([{"name": "order_shipped",
                "description": "Tell a customer that an order has shipped",
                "vars": ["name", "note", "order"],
                "patterns": {"name": "[^\\r\\n]{1,60}", "note": "[^\\r\\n]{0,200}",
                             "order": "[0-9]{1,10}"}}]),
        "{status}"
    );
    let status = call(&delta, "get_smtp_status", json!({})).await.1;
    assert!(
        status["caller"].get("require_template").is_none(),
        "{status}"
    );
    let names: Vec<&Value> = status["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["name"])
        .collect();
    assert_eq!(names, [&json!("order_shipped"), &json!("internal_note")]);

    // Refused, each naming its field and rule, before anything is sent.
    for (args, code, field, rule) in [
        (
            json!({"to": to, "subject": "hi", "body": "my own words"}),
            "policy_denied",
            "template",
            "template_required",
        ),
        (
            json!({"to": to, "template": "internal_note", "template_vars": {"text": "x"}}),
            "policy_denied",
            "template",
            "template_not_allowed",
        ),
        (
            json!({"to": to, "template": "order_shipped", "subject": "mine",
                   "template_vars": {"name": "Ada", "order": "1"}}),
            "invalid_input",
            "subject",
            "conflicting_fields",
        ),
        (
            json!({"to": to, "template": "order_shipped", "template_vars": {"name": "Ada"}}),
            "invalid_input",
            "template_vars",
            "missing_template_vars",
        ),
        (
            json!({"to": to, "template": "order_shipped",
                   "template_vars": {"name": "Ada", "order": "1", "note": KEY}}),
            "policy_denied",
            "body",
            "content_rejected",
        ),
        (
            json!({"to": to, "template": "order_shipped",
                   "template_vars": {"name": "Ada", "order": "1 SECRET-IN-A-VALUE"}}),
            "invalid_input",
            "template_vars.order",
            "template_var_mismatch",
        ),
    ] {
        let (e, out) = call(&iota, "send_email", args).await;
        assert!(e, "{out}");
        assert_eq!(
            (
                &out["error"]["code"],
                &out["error"]["field"],
                &out["error"]["rule"]
            ),
            (&json!(code), &json!(field), &json!(rule)),
            "{out}"
        );
        assert!(!out.to_string().contains("SECRET-IN-A-VALUE"), "{out}");
    }
    let (e, out) = call(&delta, "send_email", json!({"to": to, "template": "nope"})).await;
    assert!(e, "{out}");
    assert_eq!(out["error"]["rule"], "unknown_template", "{out}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sink.verb_count("MAIL") + other.verb_count("MAIL"), 0);

    // The template's words with the call's values; HTML-escaped in HTML.
    let (e, out) = call(
        &iota,
        "send_email",
        json!({"to": to, "template": "order_shipped",
               "template_vars": {"name": "<Ada>", "order": "1042", "note": "gift wrap"}}),
    )
    .await;
    assert!(!e, "{out}");
    assert_eq!(out["status"], "sent", "{out}");
    let first = out["message_id"].as_str().unwrap().to_owned();
    let m = sink.delivered().pop().unwrap();
    let text = String::from_utf8_lossy(&m.data).into_owned();
    assert!(
        text.contains("Subject: Order 1042 has shipped\r\n"),
        "{text}"
    );
    assert!(
        text.contains("Hello <Ada>,\r\n\r\nyour order 1042 has shipped.\r\nNote: gift wrap"),
        "{text}"
    );
    assert!(
        text.contains("<p>Hello &lt;Ada&gt;, order <b>1042</b>"),
        "{text}"
    );

    // A batch: the template in the defaults, each message's own values.
    let (e, out) = call(
        &iota,
        "send_batch",
        json!({"defaults": {"template": "order_shipped"},
               "messages": [
                   {"to": ["a@anywhere.net"], "template_vars": {"name": "Ann", "order": "1"}},
                   {"to": ["b@anywhere.net"], "template_vars": {"name": "Bo", "order": "2"}},
                   {"to": ["c@anywhere.net"], "subject": "mine",
                    "template_vars": {"name": "Cy", "order": "3"}}]}),
    )
    .await;
    assert!(!e, "{out}");
    let r = out["results"].as_array().unwrap();
    assert_eq!(
        (&r[0]["status"], &r[1]["status"]),
        (&json!("sent"), &json!("sent")),
        "{out}"
    );
    assert_eq!(r[2]["error"]["field"], "messages[2].subject", "{out}");
    let delivered = sink.delivered();
    assert_eq!(delivered.len(), 3);
    for (who, order) in [("Ann", "1"), ("Bo", "2")] {
        assert!(
            delivered.iter().any(|m| {
                let t = String::from_utf8_lossy(&m.data);
                t.contains(&format!("Subject: Order {order} has shipped\r\n"))
                    && t.contains(&format!("Hello {who},"))
            }),
            "{who}"
        );
    }

    // The audit line names the template it was written from.
    let lines = d.audit();
    let line = audit_line(&lines, &first, "sent");
    assert_eq!(line["mailmux"]["template"], "order_shipped", "{line}");
    // So do `queue show` and the console's page of the message.
    let (ok, text) = d.queue_cmd("show", &first, None);
    assert!(
        ok && text.contains("written from template order_shipped"),
        "{text}"
    );
    let page = d.console_page(&format!("/console/messages/{first}")).await;
    assert!(
        page.contains("<dt>template</dt><dd>order_shipped</dd>"),
        "{page}"
    );

    // The file changed: a reload reads it again.
    std::fs::write(
        d.dir.path().join("shipped.txt"),
        "Dear {name}, order {order} is on its way.{?note} ({note}){/note}\n",
    )
    .unwrap();
    hangup(&d, "reloaded:").await;
    let (e, out) = call(
        &iota,
        "send_email",
        json!({"to": to, "template": "order_shipped",
               "template_vars": {"name": "Ada", "order": "7"}}),
    )
    .await;
    assert!(!e && out["status"] == "sent", "{out}");
    let text = String::from_utf8_lossy(&sink.delivered().pop().unwrap().data).into_owned();
    assert!(text.contains("Dear Ada, order 7 is on its way."), "{text}");

    // A template that does not parse: the reload is refused, naming its
    // key, and the templates in force stay.
    std::fs::write(d.dir.path().join("shipped.txt"), "Dear {?name}, unclosed\n").unwrap();
    hangup(&d, "configuration not reloaded").await;
    assert!(d.log().contains("templates[0].body_file"), "{}", d.log());
    let (e, out) = call(
        &iota,
        "send_email",
        json!({"to": to, "template": "order_shipped",
               "template_vars": {"name": "Ada", "order": "8"}}),
    )
    .await;
    assert!(!e && out["status"] == "sent", "{out}");
    let text = String::from_utf8_lossy(&sink.delivered().pop().unwrap().data).into_owned();
    assert!(text.contains("Dear Ada, order 8 is on its way."), "{text}");
}

/// `[notify]`: operators are told at once, by a webhook, of a message held
/// for them and of the decision on it; the post is retried after a 500,
/// carries the bearer token, the check that held it, the caller's tag and
/// metadata and a link to the console, and no address, subject or body;
/// events not chosen are not posted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_are_told_by_webhook_of_held_mail_and_its_decision() {
    const HOOK_TOKEN: &str = "hook-token-7c1d9e02";
    let (sink, other) = servers().await;
    let (port, hooks) = webhook().await;
    let extra = format!(
        "[notify]\nurl = \"http://127.0.0.1:{port}/hook/KEY-IN-PATH\"\ntoken = \"{HOOK_TOKEN}\"\n\
         events = [\"held\", \"rejected\", \"paused\"]\nconsole_url = \"https://mail.example.org/\"\n"
    );
    let d = start(&sink, &other, &extra).await;
    let theta = connect(&d, THETA).await;
    let delta = connect(&d, DELTA).await;

    // Sent mail is not an event chosen: nothing is posted for it.
    let (e, out) = call(&delta, "send_email", mail(json!(["ada@example.org"]))).await;
    assert!(!e && out["status"] == "sent", "{out}");
    // Held by a content check: posted, once the 500 was retried.
    let (e, out) = call(
        &theta,
        "send_email",
        json!({"to": ["client@anywhere.net"], "subject": "Invoice 42",
               "body": "attached", "wait": false, "tag": "billing",
               "metadata": {"account": "acct-77"}}),
    )
    .await;
    assert!(!e && out["status"] == "held", "{out}");
    let held = out["message_id"].as_str().unwrap().to_owned();
    let taken = hooks_taken(&hooks, 1).await;
    let all = hooks.lock().unwrap().clone();
    assert_eq!(all.len(), 2, "one refused post, one retry: {all:#?}");
    assert_eq!(all[0].body, all[1].body);
    let h = &taken[0];
    assert_eq!(h.authorization, format!("Bearer {HOOK_TOKEN}"));
    let b = &h.body;
    assert_eq!(b["event"], "held", "{b}");
    assert_eq!(b["message_id"], held.as_str(), "{b}");
    assert_eq!(b["caller"], "theta", "{b}");
    assert_eq!(b["recipients"], 1, "{b}");
    assert_eq!(
        b["held_by"], "content check \"invoice\" matched subject",
        "{b}"
    );
    // The caller's labels, as fields for the operator's tools to route by.
    assert_eq!(b["tag"], "billing", "{b}");
    assert_eq!(b["metadata"], json!({"account": "acct-77"}), "{b}");
    let link = format!("https://mail.example.org/console/messages/{held}");
    assert_eq!(b["link"], link.as_str(), "{b}");
    assert_eq!(
        b["text"],
        format!(
            "mailmux: message {held} from caller theta to 1 recipient is held for a person's \
             approval (content check \"invoice\" matched subject): {link}"
        ),
        "{b}"
    );
    let text = b.to_string();
    assert!(
        !text.contains("Invoice") && !text.contains("anywhere.net") && !text.contains("attached"),
        "{text}"
    );

    // The operator rejects it over HTTP: the decision is posted too.
    let r = reqwest::Client::new()
        .post(format!("{}/admin/messages/{held}/reject", d.base))
        .bearer_auth(OPS)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let taken = hooks_taken(&hooks, 2).await;
    assert_eq!(taken[1].body["event"], "rejected", "{:?}", taken[1].body);
    assert_eq!(
        taken[1].body["decided_by"], "operator ops",
        "{:?}",
        taken[1].body
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        hooks.lock().unwrap().len(),
        3,
        "only the chosen events are posted"
    );
    let metrics = d.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"mailmux_notifications_total{outcome="sent"} 2"#),
        "{metrics}"
    );

    // A reload takes a new token at once; one without [notify] stops the
    // posts.
    const NEW_TOKEN: &str = "hook-token-rotated-55e0";
    let text = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, text.replace(HOOK_TOKEN, NEW_TOKEN)).unwrap();
    hangup(&d, "reloaded:").await;
    let invoice = json!({"to": ["client@anywhere.net"], "subject": "Invoice 43",
                         "body": "attached", "wait": false});
    let (_, out) = call(&theta, "send_email", invoice.clone()).await;
    assert_eq!(out["status"], "held", "{out}");
    let taken = hooks_taken(&hooks, 3).await;
    assert_eq!(taken[2].authorization, format!("Bearer {NEW_TOKEN}"));
    assert_eq!(taken[2].body["message_id"], out["message_id"]);
    // A decision made with the queue command is posted as well.
    let id = out["message_id"].as_str().unwrap();
    let (ok, text) = d.queue_cmd("reject", id, Some(OPS));
    assert!(ok, "{text}");
    let taken = hooks_taken(&hooks, 4).await;
    assert_eq!(taken[3].body["event"], "rejected", "{:?}", taken[3].body);
    assert_eq!(taken[3].body["message_id"], id, "{:?}", taken[3].body);
    assert_eq!(
        taken[3].body["decided_by"], "operator ops",
        "{:?}",
        taken[3].body
    );
    // A pause of delivery is posted with its reason; the resume is not an
    // event chosen here.
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/admin/pause", d.base))
        .bearer_auth(OPS)
        .json(&json!({"reason": "incident 42"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let taken = hooks_taken(&hooks, 5).await;
    let b = &taken[4].body;
    assert_eq!(
        (&b["event"], &b["by"], &b["reason"]),
        (
            &json!("paused"),
            &json!("operator ops"),
            &json!("incident 42")
        ),
        "{b}"
    );
    let r = http
        .delete(format!("{}/admin/pause", d.base))
        .bearer_auth(OPS)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = std::fs::read_to_string(&d.config).unwrap();
    let start = text.find("[notify]").unwrap();
    let end = start + text[start..].find("[queue]").unwrap();
    std::fs::write(&d.config, format!("{}{}", &text[..start], &text[end..])).unwrap();
    hangup(&d, "reloaded:").await;
    let (_, out) = call(&theta, "send_email", invoice).await;
    assert_eq!(out["status"], "held", "{out}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        hooks.lock().unwrap().len(),
        6,
        "posted a resume not chosen, or after [notify] went away"
    );

    // Neither token nor the URL's path reaches the log.
    let log = d.log();
    assert!(
        !log.contains(HOOK_TOKEN) && !log.contains(NEW_TOKEN) && !log.contains("KEY-IN-PATH"),
        "{log}"
    );
}
