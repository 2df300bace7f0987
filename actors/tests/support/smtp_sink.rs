//! Postfix's `smtp-sink` as a fast, real SMTP server on 127.0.0.1, and a driver for
//! `smtp-source`, for tests that reconcile deliveries and for throughput benches.
//! Processes started here are killed when their handle drops; nothing else is touched.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use super::StoredMessage;

pub const SMTP_SINK: &str = "/usr/sbin/smtp-sink";
pub const SMTP_SOURCE: &str = "/usr/sbin/smtp-source";
/// How long smtp-sink may take to listen.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at a free port: another process may grab it between probe and bind.
const PORT_ATTEMPTS: usize = 5;
/// The listen(2) backlog: generous, so that bursts from a pool queue instead of failing.
const BACKLOG: &str = "256";

/// How to run smtp-sink.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    /// Dump each message to a file so that [`SmtpSink::received`] can read it back.
    /// Off for benches: disk writes cost far more than the SMTP exchange.
    pub dump: bool,
    /// Extra smtp-sink arguments, for example `["-r", "RCPT"]` (soft-reject RCPT) or
    /// `["-W", "DATA:1"]` (delay the DATA reply by a second).
    pub extra_args: Vec<String>,
}

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            dump: true,
            extra_args: Vec::new(),
        }
    }
}

/// A running smtp-sink. Dropping it kills the process.
#[derive(Debug)]
pub struct SmtpSink {
    port: u16,
    child: Child,
    dir: tempfile::TempDir,
    messages: Arc<AtomicU64>,
}

impl SmtpSink {
    /// Starts smtp-sink with message dumps on.
    pub async fn start() -> Self {
        Self::start_with(SinkOptions::default()).await
    }

    /// Starts smtp-sink with these options on a free port and waits until it listens.
    pub async fn start_with(options: SinkOptions) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let dumps = dir.path().join("dumps");
        std::fs::create_dir(&dumps).expect("dumps dir");
        // As root, smtp-sink must drop to another user, who then writes the dumps.
        let run_as = if is_root().await {
            open_up(dir.path(), 0o755);
            open_up(&dumps, 0o777);
            Some("nobody")
        } else {
            None
        };
        for _ in 0..PORT_ATTEMPTS {
            let port = super::free_port();
            let mut cmd = Command::new(SMTP_SINK);
            cmd.arg("-c");
            if let Some(user) = run_as {
                cmd.arg("-u").arg(user);
            }
            if options.dump {
                // smtp-sink appends a random hex suffix to each dump file name.
                cmd.arg("-d").arg(dumps.join("msg."));
            }
            cmd.args(&options.extra_args)
                .arg(format!("127.0.0.1:{port}"))
                .arg(BACKLOG)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            let mut child = cmd.spawn().expect("spawn smtp-sink");
            if !listening(&mut child, port).await {
                let _ = child.kill().await;
                continue;
            }
            let messages = Arc::new(AtomicU64::new(0));
            let stdout = child.stdout.take().expect("smtp-sink stdout");
            tokio::spawn(read_counters(stdout, messages.clone()));
            return SmtpSink {
                port,
                child,
                dir,
                messages,
            };
        }
        panic!("smtp-sink did not start after {PORT_ATTEMPTS} attempts");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        super::loopback(self.port)
    }

    /// Messages completed (final "." received), from smtp-sink's own counter.
    pub fn count(&self) -> u64 {
        self.messages.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` messages were counted; returns whether they were.
    pub async fn wait_for_count(&self, n: u64, timeout: Duration) -> bool {
        super::wait_until(|| self.count() >= n, timeout).await
    }

    /// The dumped messages (empty without `dump`), in no particular order. `data` is
    /// the message as smtp-sink dumps it: header and body with LF line endings,
    /// without smtp-sink's own X-* and Received headers.
    pub fn received(&self) -> Vec<StoredMessage> {
        let dumps = self.dir.path().join("dumps");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dumps)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        files.iter().filter_map(|f| read_dump(f)).collect()
    }

    /// The Message-IDs of the dumped messages, sorted.
    pub fn message_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .received()
            .into_iter()
            .filter_map(|m| m.message_id)
            .collect();
        ids.sort();
        ids
    }

    /// Kills the server now (later connects are refused).
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// How to run smtp-source.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Messages in total (`-m`).
    pub messages: u64,
    /// Sessions in parallel (`-s`).
    pub sessions: u64,
    /// Payload bytes per message, headers excluded (`-l`).
    pub size: u64,
    /// Send the next message over the same connection (`-d`).
    pub reuse_connections: bool,
    pub from: String,
    pub to: String,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            messages: 100,
            sessions: 10,
            size: 1024,
            reuse_connections: true,
            from: "source@localhost".into(),
            to: "sink@localhost".into(),
        }
    }
}

/// Runs smtp-source against `addr` and returns how long it took; `Err` with its
/// output if it failed (smtp-source stops at the first unexpected reply).
pub async fn run_smtp_source(
    addr: SocketAddr,
    options: &SourceOptions,
) -> Result<Duration, String> {
    let mut cmd = Command::new(SMTP_SOURCE);
    cmd.arg("-M")
        .arg("localhost")
        .arg("-m")
        .arg(options.messages.to_string())
        .arg("-s")
        .arg(options.sessions.to_string())
        .arg("-l")
        .arg(options.size.to_string())
        .arg("-f")
        .arg(&options.from)
        .arg("-t")
        .arg(&options.to);
    if options.reuse_connections {
        cmd.arg("-d");
    }
    cmd.arg(format!("{}:{}", addr.ip(), addr.port()))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let start = Instant::now();
    let output = cmd
        .output()
        .await
        .map_err(|e| format!("spawn smtp-source: {e}"))?;
    let elapsed = start.elapsed();
    if output.status.success() {
        Ok(elapsed)
    } else {
        Err(format!(
            "smtp-source {}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

async fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().await;
    out.is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn open_up(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Whether smtp-sink listens on `port` and is still alive: if the port was taken,
/// it exits at once, and a successful connect may have reached the other program.
async fn listening(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return false;
        }
        if tokio::net::TcpStream::connect(super::loopback(port))
            .await
            .is_ok()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
            return matches!(child.try_wait(), Ok(None));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Follows smtp-sink's `-c` counters ("sess=N quit=N mesg=N", CR-separated).
async fn read_counters(mut stdout: tokio::process::ChildStdout, messages: Arc<AtomicU64>) {
    let mut buf = [0u8; 4096];
    let mut pending = String::new();
    while let Ok(n) = stdout.read(&mut buf).await {
        if n == 0 {
            break;
        }
        pending.push_str(&String::from_utf8_lossy(&buf[..n]));
        while let Some(end) = pending.find(['\r', '\n']) {
            let record: String = pending.drain(..=end).collect();
            let mesg = record
                .split_whitespace()
                .find_map(|field| field.strip_prefix("mesg="))
                .and_then(|v| v.parse::<u64>().ok());
            if let Some(mesg) = mesg {
                messages.fetch_max(mesg, Ordering::SeqCst);
            }
        }
    }
}

/// Parses one dump file: smtp-sink's X-* headers and Received header, then the
/// message, then an empty line.
fn read_dump(path: &Path) -> Option<StoredMessage> {
    let text = std::fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&text);
    let mut mail_from = String::new();
    let mut rcpt_to = Vec::new();
    let mut lines = text.split_inclusive('\n').peekable();
    while let Some(line) = lines.peek() {
        if let Some(args) = line.strip_prefix("X-Mail-Args: ") {
            mail_from = bracketed(args);
        } else if let Some(args) = line.strip_prefix("X-Rcpt-Args: ") {
            rcpt_to.push(bracketed(args));
        } else if !line.starts_with("X-") {
            break;
        }
        lines.next();
    }
    if lines.peek().is_some_and(|l| l.starts_with("Received:")) {
        lines.next();
        while lines.peek().is_some_and(|l| l.starts_with([' ', '\t'])) {
            lines.next();
        }
    }
    let mut data: String = lines.collect();
    // The dump format ends each message with one empty line of its own.
    if data.ends_with("\n\n") {
        data.pop();
    }
    let data = data.into_bytes();
    Some(StoredMessage {
        mail_from,
        rcpt_to,
        message_id: super::message_id(&data),
        data,
    })
}

/// The address inside the first `<...>` of MAIL or RCPT arguments.
fn bracketed(args: &str) -> String {
    let args = args.trim();
    match (args.find('<'), args.find('>')) {
        (Some(start), Some(end)) if start < end => args[start + 1..end].to_string(),
        _ => args.split_whitespace().next().unwrap_or("").to_string(),
    }
}
