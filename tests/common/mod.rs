//! Shared helpers of the daemon's black-box tests: an aiosmtpd child that
//! keeps what it receives in a maildir, a configuration built in code,
//! the daemon served in process, and `mailmux queue` run on a test's
//! configuration.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mailmux::compose::ComposePolicy;
use mailmux::config::{Config, DaemonSettings, HttpSettings, Sources};
use mailmux::mcp::MailmuxServer;
use mailmux_actors::queue::{QueueSettings, StoreKind};
use mailmux_actors::{Dispatcher, RelaySettings, Settings, Timeouts};
use rmcp::service::{Peer, RunningService};
use rmcp::{RoleClient, ServiceExt};

/// A fresh SQLite queue path for a spawned daemon, so that tests never share
/// the default `mailmux-queue.db` (a second daemon on one store refuses to
/// start). The folder lives as long as the test process.
pub fn queue_db() -> String {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("a temporary folder"));
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.path()
        .join(format!("queue-{n}.db"))
        .display()
        .to_string()
}

/// Sends signal `name` (`HUP`, `TERM`) to the process `pid` with kill(1).
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}: {status}");
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on {addr}");
}

/// `python3 -m aiosmtpd` with the Mailbox handler on a free loopback port.
/// Killed on drop.
pub struct Aiosmtpd {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Aiosmtpd {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Extra arguments go before the handler (e.g. `-u` for SMTPUTF8).
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new("python3")
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
            .args(extra)
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(dir.path().join("mail"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m aiosmtpd");
        wait_listening(port);
        Aiosmtpd { port, dir, child }
    }

    pub fn maildir(&self) -> PathBuf {
        self.dir.path().join("mail").join("new")
    }

    /// Every message received so far, as text.
    pub fn messages(&self) -> Vec<String> {
        read_maildir(&self.maildir())
    }

    /// Waits until `n` messages are there (the server writes after replying).
    pub fn wait_messages(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = self.messages();
            if m.len() >= n || Instant::now() > deadline {
                return m;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The `n` messages waited for, as a mail client reads them:
    /// `tests/read_mail.py` (Python's email package), one JSON object each.
    #[allow(dead_code)]
    pub fn read_back(&self, n: usize) -> Vec<serde_json::Value> {
        assert_eq!(self.wait_messages(n).len(), n);
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/read_mail.py");
        let out = std::process::Command::new("python3")
            .arg(script)
            .arg(self.maildir())
            .output()
            .expect("python3 tests/read_mail.py");
        assert!(
            out.status.success(),
            "read_mail.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// A console page's HTML, fetched with the session cookie.
#[allow(dead_code)]
pub async fn page_text(http: &reqwest::Client, url: &str, cookie: &str) -> String {
    http.get(url)
        .header("Cookie", cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub fn read_maildir(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect()
}

impl Drop for Aiosmtpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain-text relay to 127.0.0.1:`port` with short timeouts.
pub fn relay(name: &str, port: u16, priority: i32) -> RelaySettings {
    let mut r = RelaySettings::smtp(name, "127.0.0.1", port);
    r.priority = priority;
    r.timeouts = Timeouts::uniform(Duration::from_secs(3));
    r
}

/// A configuration built in code, with the given relays.
pub fn config(relays: Vec<RelaySettings>) -> Config {
    Config {
        queue: QueueSettings {
            store: StoreKind::Memory,
            delivery_timeout: Duration::from_secs(15),
            ..QueueSettings::default()
        },
        dispatch: Settings {
            relays,
            router: Default::default(),
            supervisor: Default::default(),
            limits: Default::default(),
        },
        daemon: DaemonSettings {
            send_deadline: Duration::from_secs(15),
            shutdown_grace: Duration::from_secs(5),
            compose: ComposePolicy {
                default_from: Some("sender@example.org".into()),
                ..ComposePolicy::default()
            },
            max_concurrent_calls: 64,
            max_batch: 1000,
            http: HttpSettings {
                bind: "127.0.0.1:0".parse().unwrap(),
                token: None,
                allowed_hosts: vec![],
                allowed_origins: vec![],
                body_limit: 4 * 1024 * 1024,
                read_timeout: Duration::from_secs(30),
                max_connections: 1024,
                stateful: true,
                max_sessions: 1024,
                max_sessions_per_caller: 64,
                tls: None,
                auth_failures: Some(
                    mailmux::policy::rate::RateRule::parse("10/min").expect("the default"),
                ),
            },
            metrics: Default::default(),
            log_level: None,
        },
        notify: None,
        safety: Default::default(),
        sent_copies: Vec::new(),
        bounce_readers: Vec::new(),
        relay_senders: Vec::new(),
        default_relay: false,
        sources: vec!["test".into()],
        redacted: serde_json::json!({}),
        stray_env: Vec::new(),
    }
}

/// The daemon in this process: the real dispatcher and MCP server, and
/// rmcp's client over an in-memory duplex. The dispatcher is kept so that a
/// test can reach the fault hooks.
pub struct InProcess {
    pub client: RunningService<RoleClient, ()>,
    pub server: MailmuxServer,
    pub dispatcher: Dispatcher,
}

impl InProcess {
    pub async fn start(cfg: Config, sources: Sources) -> Self {
        let queue = mailmux::mcp::start_queue(&cfg)
            .await
            .expect("the queue and the dispatcher start");
        let dispatcher = queue.dispatcher().clone();
        let server = MailmuxServer::new(queue, cfg, sources).await;
        // Large enough that 10 MB arguments do not stall on the pipe.
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let (r, w) = tokio::io::split(server_io);
        tokio::spawn(mailmux::mcp::transport::serve_io(
            server.clone(),
            r,
            w,
            std::future::pending(),
        ));
        let client = ().serve(client_io).await.expect("client initializes");
        InProcess {
            client,
            server,
            dispatcher,
        }
    }

    pub fn peer(&self) -> &Peer<RoleClient> {
        self.client.peer()
    }
}

/// The real binary serving MCP over stdio with `config` (written to
/// `dir/mailmux.toml`), its log at trace level in `dir/daemon.log`.
pub struct StdioDaemon {
    client: Option<RunningService<RoleClient, ()>>,
    child: tokio::process::Child,
}

impl StdioDaemon {
    pub async fn start(dir: &Path, config: &str) -> StdioDaemon {
        let path = dir.join("mailmux.toml");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailmux"))
            .arg("--config")
            .arg(&path)
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "trace")
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("mailmux starts");
        let stdout = child.stdout.take().unwrap();
        let stdin = child.stdin.take().unwrap();
        let client = tokio::time::timeout(Duration::from_secs(20), ().serve((stdout, stdin)))
            .await
            .expect("the daemon initializes")
            .expect("client initializes");
        StdioDaemon {
            client: Some(client),
            child,
        }
    }

    /// One tool call's structured content (an error result's too).
    pub async fn call(&self, tool: &str, args: serde_json::Value) -> serde_json::Value {
        let mut params = rmcp::model::CallToolRequestParams::new(tool.to_string());
        if let serde_json::Value::Object(map) = args {
            params = params.with_arguments(map);
        }
        let r = tokio::time::timeout(
            Duration::from_secs(60),
            self.client.as_ref().unwrap().peer().call_tool(params),
        )
        .await
        .expect("answer within 60 s")
        .expect("no protocol error");
        r.structured_content.unwrap_or(serde_json::Value::Null)
    }

    pub async fn send(&self, subject: &str) -> serde_json::Value {
        self.call(
            "send_email",
            serde_json::json!({ "to": ["rcpt@example.org"], "subject": subject, "body": "hello" }),
        )
        .await
    }

    /// SIGKILL, as a crash: no shutdown runs.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// Closes stdin (a graceful stop) and waits for the process.
    pub async fn stop(mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.cancel().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// An OAuth2 token endpoint on loopback (`POST /token`): each request gets
/// the access token [`access`]`(n)`, valid for `expires_in` seconds, and its
/// form is kept. `POST /introspect` (RFC 7662, as Dovecot's oauth2 passdb
/// asks) says a token it issued is active for `user`.
#[derive(Debug, Default)]
pub struct TokenEndpoint {
    pub requests: std::sync::Mutex<Vec<std::collections::HashMap<String, String>>>,
    expires_in: u64,
    user: String,
    /// Tokens issued up to this one (see [`access`]) are no longer active.
    revoked: std::sync::atomic::AtomicUsize,
}

impl TokenEndpoint {
    /// Revokes every token issued so far: introspection calls them inactive,
    /// as a provider does after a password change or an admin's revocation.
    pub fn revoke_all(&self) {
        let issued = self.requests.lock().unwrap().len();
        self.revoked
            .store(issued, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The `[[relays]]` entry `m365` of an `xoauth2` account `user` on the
/// SMTP server at `smtp`, its tokens from the [`TokenEndpoint`] at
/// `token_port` (a TOML fragment; the relay's IMAP table may follow it).
pub fn oauth2_relay_toml(smtp: u16, token_port: u16, user: &str) -> String {
    format!(
        r#"[[relays]]
name = "m365"
host = "127.0.0.1"
port = {smtp}
tls = "none"
username = "{user}"
from_email = "{user}"
auth = "xoauth2"
timeout = "3s"

[relays.oauth]
token_url = "http://127.0.0.1:{token_port}/token"
client_id = "mailmux-test-client"
client_secret = "client-secret-for-imap-test"
refresh_token = "refresh-token-for-imap-test"
"#
    )
}

/// The `n`th access token a [`TokenEndpoint`] issues (from 1).
pub fn access(n: usize) -> String {
    format!("ACCESS-TOKEN-{n}-e9")
}

/// Serves a [`TokenEndpoint`] for `user`; returns it and its port.
pub async fn serve_token_endpoint(expires_in: u64) -> (std::sync::Arc<TokenEndpoint>, u16) {
    serve_token_endpoint_for("agent@example.org", expires_in).await
}

pub async fn serve_token_endpoint_for(
    user: &str,
    expires_in: u64,
) -> (std::sync::Arc<TokenEndpoint>, u16) {
    use axum::extract::{Form, State};
    use std::collections::HashMap;
    use std::sync::Arc;
    async fn token(
        State(e): State<Arc<TokenEndpoint>>,
        Form(form): Form<HashMap<String, String>>,
    ) -> axum::Json<serde_json::Value> {
        let n = {
            let mut r = e.requests.lock().unwrap();
            r.push(form);
            r.len()
        };
        axum::Json(serde_json::json!({
            "access_token": access(n),
            "token_type": "Bearer",
            "expires_in": e.expires_in,
        }))
    }
    async fn introspect(
        State(e): State<Arc<TokenEndpoint>>,
        Form(form): Form<HashMap<String, String>>,
    ) -> axum::Json<serde_json::Value> {
        let issued = e.requests.lock().unwrap().len();
        let given = form.get("token").cloned().unwrap_or_default();
        let revoked = e.revoked.load(std::sync::atomic::Ordering::SeqCst);
        let active = (revoked + 1..=issued).any(|n| access(n) == given);
        axum::Json(if active {
            serde_json::json!({ "active": "true", "username": e.user })
        } else {
            serde_json::json!({ "active": "false" })
        })
    }
    let e = Arc::new(TokenEndpoint {
        expires_in,
        user: user.to_owned(),
        ..TokenEndpoint::default()
    });
    let app = axum::Router::new()
        .route("/token", axum::routing::post(token))
        .route("/introspect", axum::routing::post(introspect))
        .with_state(e.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (e, port)
}

/// `mailmux queue <args>` on the configuration in `dir`: (exit code,
/// stdout, stderr).
pub fn queue_cmd(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    queue_cmd_as(dir, args, None)
}

/// `mailmux queue <args>` with an operator's token (approve, reject).
pub fn queue_cmd_as(
    dir: &Path,
    args: &[&str],
    token: Option<&str>,
) -> (Option<i32>, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mailmux"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    if let Some(t) = token {
        cmd.env("MAILMUX_OPERATOR_TOKEN", t);
    }
    let out = cmd
        .arg("--config")
        .arg(dir.join("mailmux.toml"))
        .arg("queue")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `send_batch`'s arguments for `n` messages to `tag+i@example.org`, with
/// `tag` as subject, and `extra` (`wait`, `send_at`…) added.
pub fn batch_args(tag: &str, n: usize, extra: serde_json::Value) -> serde_json::Value {
    let messages: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({"to": [format!("{tag}+{i}@example.org")]}))
        .collect();
    let mut args =
        serde_json::json!({"defaults": {"subject": tag, "body": "b\n"}, "messages": messages});
    if let (serde_json::Value::Object(a), serde_json::Value::Object(e)) = (&mut args, extra) {
        a.extend(e);
    }
    args
}

/// DKIM keys made by `tests/dkim_verify.py keys` in `dir`: `rsa.pem`
/// (PKCS#1), `rsa8.pem` (RSA, PKCS#8), `ed.pem` (Ed25519, PKCS#8), and
/// `records.json`, each one's DNS record.
pub fn dkim_keys(dir: &Path) {
    let status = Command::new("python3")
        .arg("tests/dkim_verify.py")
        .arg("keys")
        .arg(dir)
        .status()
        .expect("python3 runs");
    assert!(status.success(), "DKIM keys made");
}

/// Every DKIM signature of each message file in `dir` as dkimpy reports it
/// (`tests/dkim_verify.py verify`), by file name; `selectors` maps each
/// record's name (`rsa._domainkey.example.org.`) to the key file of
/// [`dkim_keys`] whose record it is.
pub fn dkim_verified(
    dir: &Path,
    selectors: &serde_json::Value,
    files: &[String],
) -> std::collections::BTreeMap<String, Vec<serde_json::Value>> {
    let path = dir.join("selectors.json");
    std::fs::write(&path, selectors.to_string()).unwrap();
    let out = Command::new("python3")
        .arg("tests/dkim_verify.py")
        .arg("verify")
        .arg(dir.join("records.json"))
        .arg(&path)
        .args(files.iter().map(|f| dir.join(f)))
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let sigs = v["signatures"].as_array().unwrap().clone();
            (v["file"].as_str().unwrap().to_string(), sigs)
        })
        .collect()
}

/// A connection to the SQLite store `db` on which the store refuses every
/// new entry of the suppression list (a trigger, as a failing disk would),
/// until [`accept_suppressions`] drops it.
pub fn refuse_suppressions(db: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c.execute_batch(
        "CREATE TRIGGER refuse_listing BEFORE INSERT ON suppressions
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
    )
    .unwrap();
    c
}

/// Lets the store of [`refuse_suppressions`] take new entries again.
pub fn accept_suppressions(c: &rusqlite::Connection) {
    c.execute_batch("DROP TRIGGER refuse_listing").unwrap();
}

/// The POSTs a [`webhook`] received, in order.
pub type Hooks = std::sync::Arc<std::sync::Mutex<Vec<Hook>>>;

/// One webhook POST as the test's server received it.
#[derive(Debug, Clone)]
pub struct Hook {
    pub authorization: String,
    pub body: serde_json::Value,
    pub answered: u16,
}

/// A webhook on a free port that records each POST to `/hook/KEY-IN-PATH`
/// and answers 500 to the first, 200 to the others.
pub async fn webhook() -> (u16, Hooks) {
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    let hooks = Hooks::default();
    async fn take(
        State(hooks): State<Hooks>,
        headers: HeaderMap,
        axum::Json(body): axum::Json<serde_json::Value>,
    ) -> StatusCode {
        let mut hooks = hooks.lock().unwrap();
        let answered = if hooks.is_empty() { 500 } else { 200 };
        hooks.push(Hook {
            authorization: headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned(),
            body,
            answered,
        });
        StatusCode::from_u16(answered).unwrap()
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new()
        .route("/hook/KEY-IN-PATH", axum::routing::post(take))
        .with_state(hooks.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, hooks)
}

/// The POSTs answered 200, once there are `n` of them.
pub async fn hooks_taken(hooks: &Hooks, n: usize) -> Vec<Hook> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let taken: Vec<Hook> = hooks
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.answered == 200)
            .cloned()
            .collect();
        if taken.len() >= n {
            return taken;
        }
        assert!(Instant::now() < deadline, "{taken:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The Prometheus text a daemon's metrics listener on `port` (loopback,
/// no token) serves.
pub async fn scrape(port: u16) -> String {
    reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Records the resource updates a client subscribed with
/// `resources/subscribe` is sent (the URIs, in order).
#[derive(Clone, Default)]
pub struct Updates(pub std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl rmcp::ClientHandler for Updates {
    async fn on_resource_updated(
        &self,
        params: rmcp::model::ResourceUpdatedNotificationParam,
        _: rmcp::service::NotificationContext<rmcp::RoleClient>,
    ) {
        self.0.lock().unwrap().push(params.uri);
    }
}
