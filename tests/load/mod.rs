//! Load-test pieces shared by the soak test and the MCP benchmark: the
//! `mailmux` binary driven by an rmcp client over stdio or streamable HTTP,
//! Postfix's `smtp-sink` as the far end, and /proc samples of the daemon.
//! It starts and stops only its own processes and talks only to 127.0.0.1.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Read as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rmcp::model::CallToolRequestParams;
use rmcp::service::{Peer, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Map, Value, json};

pub const SMTP_SINK: &str = "/usr/sbin/smtp-sink";
pub const SMTP_SOURCE: &str = "/usr/sbin/smtp-source";
pub const FROM: &str = "sender@example.org";
pub const TO: &str = "rcpt@example.org";

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn chmod(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// A Postfix `smtp-sink` on a free loopback port. With `dump`, it writes every
/// message to its own file, so that deliveries can be reconciled by
/// Message-ID. Killed on drop.
#[derive(Debug)]
pub struct Sink {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
    dump: bool,
    count: Arc<AtomicU64>,
}

impl Sink {
    pub fn start(concurrency: usize, dump: bool) -> anyhow::Result<Sink> {
        let dir = tempfile::tempdir()?;
        let dumps = dir.path().join("dumps");
        std::fs::create_dir(&dumps)?;
        let port = free_port()?;
        let mut cmd = Command::new(SMTP_SINK);
        // Run as root it must drop privileges, and the unprivileged user then
        // writes the dumps.
        if is_root() {
            chmod(dir.path(), 0o755)?;
            chmod(&dumps, 0o777)?;
            cmd.args(["-u", "nobody"]);
        }
        if dump {
            cmd.arg("-d").arg(dumps.join("msg."));
        }
        // `-c` prints counters on every "."; `-m` and the backlog exceed the
        // concurrency so that no connection waits in the kernel.
        let room = (concurrency * 2 + 16).to_string();
        cmd.args(["-c", "-m", &room])
            .arg(format!("127.0.0.1:{port}"))
            .arg(&room)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {SMTP_SINK}"))?;
        let count = Arc::new(AtomicU64::new(0));
        if let Some(mut out) = child.stdout.take() {
            let count = count.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut pending = String::new();
                while let Ok(n) = out.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    pending.push_str(&String::from_utf8_lossy(&buf[..n]));
                    while let Some(end) = pending.find(['\r', '\n']) {
                        let record: String = pending.drain(..=end).collect();
                        if let Some(m) = record
                            .split_whitespace()
                            .find_map(|f| f.strip_prefix("mesg="))
                            .and_then(|v| v.parse::<u64>().ok())
                        {
                            count.fetch_max(m, Ordering::SeqCst);
                        }
                    }
                }
            });
        }
        let mut sink = Sink {
            child,
            port,
            dir,
            dump,
            count,
        };
        let ready_by = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = sink.child.try_wait()? {
                bail!("smtp-sink exited at start ({status})");
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(sink);
            }
            if Instant::now() > ready_by {
                bail!("smtp-sink did not listen on port {port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Messages the sink completed (its `-c` counter).
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until the counter reaches `n`; the counter line is printed just
    /// after the reply to the final ".", so it may trail the client a little.
    pub fn wait_count(&self, n: u64, timeout: Duration) -> u64 {
        let until = Instant::now() + timeout;
        while self.count() < n && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.count()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How many times each Message-ID (without brackets) is in the dumps.
    pub fn message_ids(&self) -> anyhow::Result<HashMap<String, u32>> {
        if !self.dump {
            bail!("the sink was started without dumps");
        }
        let mut ids = HashMap::new();
        for entry in std::fs::read_dir(self.dir.path().join("dumps"))? {
            let path = entry?.path();
            let text = std::fs::read(&path)?;
            match message_id(&text) {
                Some(id) => *ids.entry(id).or_insert(0) += 1,
                None => bail!("no Message-ID in {}", path.display()),
            }
        }
        Ok(ids)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first Message-ID header of a message, without angle brackets.
pub fn message_id(data: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("message-id") {
            let v = value.trim();
            return Some(v.trim_start_matches('<').trim_end_matches('>').to_string());
        }
    }
    None
}

/// A sample of a process from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    pub rss_kb: u64,
    /// Peak RSS since the process started (VmHWM).
    pub hwm_kb: u64,
    pub threads: u64,
    pub fds: u64,
}

pub fn proc_sample(pid: u32) -> anyhow::Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    Ok(ProcSample {
        rss_kb: field("VmRSS:"),
        hwm_kb: field("VmHWM:"),
        threads: field("Threads:"),
        fds,
    })
}

/// User plus system CPU time of a process, from /proc/PID/stat (10 ms ticks).
pub fn proc_cpu(pid: u32) -> Option<Duration> {
    proc_cpu_split(pid).map(|(user, system)| user + system)
}

/// User and system CPU time of a process, apart.
pub fn proc_cpu_split(pid: u32) -> Option<(Duration, Duration)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((
        Duration::from_millis(utime * 10),
        Duration::from_millis(stime * 10),
    ))
}

/// CPU time of this process (all its threads).
pub fn self_cpu() -> Option<Duration> {
    proc_cpu(std::process::id())
}

/// How the client reaches the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The daemon as a child process, MCP over its stdin and stdout (pipes).
    Stdio,
    /// `serve --http` on a free port, one stateful streamable HTTP session.
    Http,
    /// The daemon as a child process, its stdin and stdout left to the
    /// caller after the MCP handshake ([`Daemon::take_lines`]): a client
    /// that writes and reads JSON-RPC lines itself costs far less CPU a call
    /// than rmcp's, as wrk does over HTTP.
    StdioLines,
    /// `serve --http --stateless` on a free port, and no rmcp client: the
    /// caller posts JSON-RPC calls itself ([`Daemon::url`]) on connections
    /// it keeps, as wrk does.
    HttpPosts,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Stdio => "stdio",
            Transport::Http => "http",
            Transport::StdioLines => "stdio-lines",
            Transport::HttpPosts => "http-posts",
        }
    }
}

/// How the daemon's one relay to the sink is set up.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub transport: Transport,
    pub sink_port: u16,
    pub max_connections: usize,
    /// 0: a connection is never closed for its age in messages.
    pub messages_per_connection: usize,
    /// `RUST_LOG` of the daemon; its log goes to a file.
    pub log: String,
    /// Concurrent requests the HTTP client may have open.
    pub http_requests: usize,
    /// The queue's store: `sqlite` (the default, a file in the daemon's
    /// folder) or `memory`.
    pub store: &'static str,
    /// A caller policy that every message passes: a recipient and sender
    /// allowlist and a rate far above the bench's (the cost of the checks).
    pub policy: bool,
    /// More lines for the `[queue]` table (a `postgres` store's `url`).
    pub queue_extra: String,
    /// `max_message_bytes` (which also bounds a batch's total); `None`:
    /// the default.
    pub max_message_bytes: Option<usize>,
    /// The HTTP client keeps its connections open between calls, as most
    /// HTTP clients do; false: rmcp's default client, which opens a new
    /// connection for every request (it keeps no idle connection).
    pub http_pool: bool,
    /// The HTTP client speaks protocol 2026-07-28 (`server/discover`, no
    /// session: rmcp answers each call with one JSON body); false: the
    /// `initialize` handshake of 2025-11-25 and a session, answered over
    /// SSE.
    pub http_modern: bool,
    /// A DKIM private key (PEM) that signs every message, as `example.org`
    /// (the sender's domain) with the selector `bench`; `None`: unsigned.
    pub dkim_key: Option<PathBuf>,
}

/// rmcp's streamable HTTP client for `uri`, with at most `requests` open at
/// once; `pool`: on a reqwest client that keeps idle connections for reuse
/// (see [`DaemonOptions::http_pool`]).
pub fn http_client_transport(
    uri: String,
    requests: usize,
    pool: bool,
) -> StreamableHttpClientTransport<reqwest_013::Client> {
    let cfg = StreamableHttpClientTransportConfig::with_uri(uri).max_concurrent_requests(requests);
    match pool {
        true => StreamableHttpClientTransport::with_client(reqwest_013::Client::new(), cfg),
        false => StreamableHttpClientTransport::from_config(cfg),
    }
}

/// A `StdioLines` daemon's stdin and stdout, after its MCP handshake.
pub struct Lines {
    pub stdin: tokio::process::ChildStdin,
    pub stdout: tokio::io::BufReader<tokio::process::ChildStdout>,
}

/// The `mailmux` binary serving MCP, with a connected rmcp client. The
/// daemon is stopped (and killed if it lingers) by [`Daemon::stop`] or on
/// drop.
pub struct Daemon {
    pub pid: u32,
    client: Option<RunningService<RoleClient, ()>>,
    /// The HTTP daemon, or the `StdioLines` one: stopped by SIGTERM.
    child: Option<tokio::process::Child>,
    lines: Option<Lines>,
    /// The `/mcp` address of an HTTP daemon.
    url: Option<String>,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").field("pid", &self.pid).finish()
    }
}

fn daemon_config(o: &DaemonOptions) -> String {
    format!(
        r#"from_email = "{FROM}"
send_deadline = "300s"
shutdown_grace = "10s"
message_id_domain = "load.localhost"
{max_bytes}

[queue]
store = "{store}"
{queue_extra}

[[relays]]
name = "sink"
host = "127.0.0.1"
port = {port}
tls = "none"
hello_name = "localhost"
max_connections = {conns}
max_queued = 100000
messages_per_connection = {per_conn}
"#,
        port = o.sink_port,
        conns = o.max_connections,
        per_conn = o.messages_per_connection,
        store = o.store,
        queue_extra = o.queue_extra,
        max_bytes = o
            .max_message_bytes
            .map(|n| format!("max_message_bytes = {n}"))
            .unwrap_or_default(),
    ) + if o.policy { POLICY } else { "" }
        + &o
            .dkim_key
            .as_ref()
            .map(|k| {
                format!(
                    "\n[[dkim]]\ndomain = \"example.org\"\nselector = \"bench\"\nprivate_key = \"{}\"\n",
                    k.display()
                )
            })
            .unwrap_or_default()
}

/// The policy of `DaemonOptions::policy`.
const POLICY: &str = r#"
[policy]
allowed_senders = ["@example.org"]
allowed_recipients = ["ops@example.net", "@example.com", "@*.example.org", "@example.org"]
allow_bcc = false
max_recipients = 10
rate = ["100000000/min", "recipients: 100000000/day"]
"#;

impl Daemon {
    pub async fn start(bin: &Path, o: &DaemonOptions) -> anyhow::Result<Daemon> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("mailmux.toml");
        std::fs::write(&config, daemon_config(o))?;
        let log = std::fs::File::create(dir.path().join("daemon.log"))?;
        let mut cmd = tokio::process::Command::new(bin);
        // Nothing from this environment (SMTP_*, MAILMUX_*) may reach it.
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", &o.log)
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .current_dir(dir.path());
        match o.transport {
            Transport::Stdio => {
                let (transport, _) = TokioChildProcess::builder(cmd)
                    .stderr(Stdio::from(log))
                    .spawn()
                    .context("spawning mailmux")?;
                let pid = transport.id().context("mailmux has no pid")?;
                let client = ().serve(transport).await.context("MCP initialize")?;
                Ok(Daemon {
                    pid,
                    client: Some(client),
                    child: None,
                    lines: None,
                    url: None,
                    dir,
                })
            }
            Transport::StdioLines => {
                use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
                cmd.stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::from(log))
                    .kill_on_drop(true);
                let mut child = cmd.spawn().context("spawning mailmux")?;
                let pid = child.id().context("mailmux has no pid")?;
                let mut stdin = child.stdin.take().context("its stdin")?;
                let mut stdout =
                    tokio::io::BufReader::new(child.stdout.take().context("its stdout")?);
                stdin
                    .write_all(
                        concat!(
                            r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":"#,
                            r#"{"protocolVersion":"2025-06-18","capabilities":{},"#,
                            r#""clientInfo":{"name":"bench-lines","version":"0"}}}"#,
                            "\n"
                        )
                        .as_bytes(),
                    )
                    .await?;
                let mut answer = String::new();
                stdout.read_line(&mut answer).await?;
                if !answer.contains(r#""result""#) {
                    bail!("MCP initialize answered {answer:?}");
                }
                stdin
                    .write_all(b"{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}\n")
                    .await?;
                Ok(Daemon {
                    pid,
                    client: None,
                    child: Some(child),
                    lines: Some(Lines { stdin, stdout }),
                    url: None,
                    dir,
                })
            }
            Transport::Http | Transport::HttpPosts => {
                let port = free_port()?;
                cmd.arg("--http").arg(format!("127.0.0.1:{port}"));
                if o.transport == Transport::HttpPosts {
                    cmd.arg("--stateless");
                }
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::from(log))
                    .kill_on_drop(true);
                let mut child = cmd.spawn().context("spawning mailmux --http")?;
                let pid = child.id().context("mailmux has no pid")?;
                let until = Instant::now() + Duration::from_secs(20);
                while tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_err()
                {
                    if let Some(status) = child.try_wait()? {
                        bail!("mailmux exited at start ({status})");
                    }
                    if Instant::now() > until {
                        bail!("mailmux did not listen on {port} within 20 s");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let url = format!("http://127.0.0.1:{port}/mcp");
                if o.transport == Transport::HttpPosts {
                    return Ok(Daemon {
                        pid,
                        client: None,
                        child: Some(child),
                        lines: None,
                        url: Some(url),
                        dir,
                    });
                }
                let transport = http_client_transport(url.clone(), o.http_requests, o.http_pool);
                let client = if o.http_modern {
                    use rmcp::service::{ClientLifecycleMode, ClientServiceExt};
                    let modern = ClientLifecycleMode::Discover {
                        preferred_versions: vec![rmcp::model::ProtocolVersion::V_2026_07_28],
                    };
                    ().serve_with_lifecycle(transport, modern)
                        .await
                        .context("MCP server/discover")?
                } else {
                    ().serve(transport).await.context("MCP initialize")?
                };
                Ok(Daemon {
                    pid,
                    client: Some(client),
                    child: Some(child),
                    lines: None,
                    url: Some(url),
                    dir,
                })
            }
        }
    }

    /// The `/mcp` address of an HTTP daemon.
    pub fn url(&self) -> Option<&str> {
        self.url.as_deref()
    }

    /// The pipes of a `StdioLines` daemon, once.
    pub fn take_lines(&mut self) -> Option<Lines> {
        self.lines.take()
    }

    pub fn peer(&self) -> Peer<RoleClient> {
        match &self.client {
            Some(c) => c.peer().clone(),
            None => unreachable!("the client lives until stop"),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// The size of the default SQLite store on disk, with its WAL, in kB.
    pub fn store_kb(&self) -> u64 {
        ["mailmux-queue.db", "mailmux-queue.db-wal"]
            .iter()
            .filter_map(|f| std::fs::metadata(self.dir.path().join(f)).ok())
            .map(|m| m.len())
            .sum::<u64>()
            / 1024
    }

    /// Closes the session (end of stdin, or SIGTERM for HTTP) and waits for
    /// the daemon to exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(client) = self.client.take() {
            let _ = client.cancel().await;
        }
        drop(self.lines.take());
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid.to_string()])
                .status();
            match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
                Ok(status) => {
                    let status = status?;
                    if !status.success() {
                        bail!("mailmux exited with {status}");
                    }
                }
                Err(_) => {
                    let _ = child.kill().await;
                    bail!("mailmux did not stop within 20 s of SIGTERM");
                }
            }
        }
        Ok(())
    }
}

/// A body of about `size` bytes in lines of 78 characters, as smtp-source's
/// `-l` sends.
pub fn body(size: usize) -> String {
    let line = "La de da de da 1. La de da de da 2. La de da de da 3. La de da de da 4. La de ";
    let mut b = String::with_capacity(size + 80);
    while b.len() + 1 < size {
        let take = (size - b.len() - 1).min(line.len());
        b.push_str(&line[..take]);
        b.push('\n');
    }
    b
}

/// What one `send_email` call answered.
#[derive(Debug, Clone)]
pub struct Sent {
    pub status: String,
    pub message_id: Option<String>,
    pub latency: Duration,
    /// The error code or message, when not sent.
    pub detail: Option<String>,
}

pub async fn send_email(peer: &Peer<RoleClient>, subject: &str, body: &str) -> Sent {
    let mut args = Map::new();
    args.insert("to".into(), json!(TO));
    args.insert("subject".into(), json!(subject));
    args.insert("body".into(), json!(body));
    let params = CallToolRequestParams::new("send_email").with_arguments(args);
    let t = Instant::now();
    let result = peer.call_tool(params).await;
    let latency = t.elapsed();
    match result {
        Ok(r) => {
            let out = r.structured_content.unwrap_or(Value::Null);
            Sent {
                status: out["status"].as_str().unwrap_or("?").to_string(),
                message_id: out["message_id"].as_str().map(str::to_string),
                latency,
                detail: out.get("error").map(Value::to_string),
            }
        }
        Err(e) => Sent {
            status: "protocol_error".into(),
            message_id: None,
            latency,
            detail: Some(e.to_string()),
        },
    }
}

/// One `send_batch` call of `count` messages to [`TO`] (each its own
/// recipient address, so that none is a duplicate of another); one [`Sent`]
/// per message, each with the call's latency.
pub async fn send_batch(
    peer: &Peer<RoleClient>,
    subject: &str,
    body: &str,
    count: usize,
) -> Vec<Sent> {
    let (local, domain) = TO.split_once('@').unwrap_or((TO, "example.org"));
    let messages: Vec<Value> = (0..count)
        .map(|i| json!({"to": [format!("{local}+{i}@{domain}")]}))
        .collect();
    let mut args = Map::new();
    args.insert("defaults".into(), json!({"subject": subject, "body": body}));
    args.insert("messages".into(), Value::Array(messages));
    let params = CallToolRequestParams::new("send_batch").with_arguments(args);
    let t = Instant::now();
    let result = peer.call_tool(params).await;
    let latency = t.elapsed();
    match result {
        Ok(r) => {
            let out = r.structured_content.unwrap_or(Value::Null);
            match out["results"].as_array() {
                Some(results) => results
                    .iter()
                    .map(|m| Sent {
                        status: m["status"].as_str().unwrap_or("refused").to_string(),
                        message_id: m["message_id"].as_str().map(str::to_string),
                        latency,
                        detail: m.get("error").map(Value::to_string),
                    })
                    .collect(),
                None => vec![
                    Sent {
                        status: "error".into(),
                        message_id: None,
                        latency,
                        detail: Some(out.to_string()),
                    };
                    count
                ],
            }
        }
        Err(e) => vec![
            Sent {
                status: "protocol_error".into(),
                message_id: None,
                latency,
                detail: Some(e.to_string()),
            };
            count
        ],
    }
}

/// One `send_batch` call of `count` messages to [`TO`] (addresses `first`
/// on), scheduled for `send_at` with `wait: false`: how many were stored
/// `scheduled`.
pub async fn schedule_batch(
    peer: &Peer<RoleClient>,
    body: &str,
    first: usize,
    count: usize,
    send_at: &str,
) -> anyhow::Result<usize> {
    let (local, domain) = TO.split_once('@').unwrap_or((TO, "example.org"));
    let messages: Vec<Value> = (first..first + count)
        .map(|i| json!({"to": [format!("{local}+{i}@{domain}")]}))
        .collect();
    let mut args = Map::new();
    args.insert(
        "defaults".into(),
        json!({"subject": "scheduled", "body": body}),
    );
    args.insert("messages".into(), Value::Array(messages));
    args.insert("send_at".into(), json!(send_at));
    args.insert("wait".into(), json!(false));
    let params = CallToolRequestParams::new("send_batch").with_arguments(args);
    let out = peer
        .call_tool(params)
        .await?
        .structured_content
        .unwrap_or(Value::Null);
    Ok(out["summary"]["scheduled"].as_u64().unwrap_or(0) as usize)
}

/// `get_smtp_status`'s `runtime.alive_tasks` and `runtime.workers`.
pub async fn runtime_tasks(peer: &Peer<RoleClient>) -> anyhow::Result<(u64, u64)> {
    let r = peer
        .call_tool(CallToolRequestParams::new("get_smtp_status"))
        .await?;
    let out = r.structured_content.unwrap_or(Value::Null);
    let rt = &out["runtime"];
    match (rt["alive_tasks"].as_u64(), rt["workers"].as_u64()) {
        (Some(t), Some(w)) => Ok((t, w)),
        _ => bail!("get_smtp_status has no runtime counters: {out}"),
    }
}

/// Nearest-rank percentile of sorted latencies.
pub fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Where load-test output goes: `target/soak` (or `$CARGO_TARGET_DIR/soak`).
pub fn output_dir(name: &str) -> anyhow::Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join(name);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
