//! Python's aiosmtpd as a real third-party SMTP server on 127.0.0.1, optionally
//! with STARTTLS required (certificate from [`TestCa`]) and AUTH PLAIN/LOGIN. The
//! child process is killed when the handle drops; messages land in a temp folder.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::StoredMessage;
use super::tls::TestCa;

const SCRIPT: &str = include_str!("aiosmtpd_server.py");
/// How long aiosmtpd may take to start listening (Python start-up on a busy machine).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at a free port: another process may grab it between probe and bind.
const PORT_ATTEMPTS: usize = 5;

/// How to run aiosmtpd.
#[derive(Debug, Clone, Default)]
pub struct AiosmtpdOptions {
    /// Offer and require STARTTLS, with a certificate from a fresh [`TestCa`].
    pub starttls: bool,
    /// Require AUTH (PLAIN or LOGIN) with these credentials. With `starttls`, AUTH is
    /// offered only after the upgrade.
    pub auth: Option<(String, String)>,
    /// Accept at most this many recipients a transaction, and answer each RCPT
    /// after them 452.
    pub max_recipients: Option<usize>,
    /// Announce `SIZE n` and refuse larger messages (aiosmtpd's
    /// `data_size_limit`; 32 MiB when unset).
    pub size_limit: Option<u64>,
}

/// A running aiosmtpd. Dropping it kills the process.
#[derive(Debug)]
pub struct Aiosmtpd {
    port: u16,
    child: Child,
    dir: tempfile::TempDir,
    ca: Option<TestCa>,
}

impl Aiosmtpd {
    /// Starts aiosmtpd without TLS or AUTH.
    pub async fn start() -> Self {
        Self::start_with(AiosmtpdOptions::default()).await
    }

    /// Starts aiosmtpd with these options on a free port and waits until it listens.
    pub async fn start_with(options: AiosmtpdOptions) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let script = dir.path().join("aiosmtpd_server.py");
        std::fs::write(&script, SCRIPT).expect("write aiosmtpd script");
        let out = dir.path().join("messages");
        std::fs::create_dir(&out).expect("messages dir");
        let ca = options.starttls.then(TestCa::generate);
        if let Some(ca) = &ca {
            std::fs::write(dir.path().join("cert.pem"), &ca.cert_pem).expect("write cert");
            std::fs::write(dir.path().join("key.pem"), &ca.key_pem).expect("write key");
        }
        for _ in 0..PORT_ATTEMPTS {
            let port = super::free_port();
            if let Some(child) = spawn(&script, &out, port, &options, dir.path()).await {
                return Aiosmtpd {
                    port,
                    child,
                    dir,
                    ca,
                };
            }
        }
        panic!("aiosmtpd did not start after {PORT_ATTEMPTS} attempts");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        super::loopback(self.port)
    }

    /// The CA that signed the server's certificate (only with `starttls`).
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca.as_ref().map(|ca| ca.ca_pem.as_str())
    }

    /// Every message received so far, in arrival order.
    pub fn received(&self) -> Vec<StoredMessage> {
        let out = self.dir.path().join("messages");
        let mut envelopes: Vec<PathBuf> = std::fs::read_dir(&out)
            .expect("read messages dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "env"))
            .collect();
        envelopes.sort();
        envelopes.iter().map(|env| read_message(env)).collect()
    }

    /// Waits until at least `n` messages arrived; returns them, or `None` on timeout.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Option<Vec<StoredMessage>> {
        if super::wait_until(|| self.count() >= n, timeout).await {
            Some(self.received())
        } else {
            None
        }
    }

    /// How many messages arrived (cheaper than `received().len()`).
    pub fn count(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("messages"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.path().extension().is_some_and(|x| x == "env"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Kills the server now (later connects are refused).
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// Starts the script on `port`; `None` if it exited before saying READY.
async fn spawn(
    script: &Path,
    out: &Path,
    port: u16,
    options: &AiosmtpdOptions,
    dir: &Path,
) -> Option<Child> {
    let mut cmd = Command::new("python3");
    cmd.arg("-u")
        .arg(script)
        .arg(port.to_string())
        .arg(out)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if options.starttls {
        cmd.arg("--tls")
            .arg(dir.join("cert.pem"))
            .arg(dir.join("key.pem"));
    }
    if let Some((user, password)) = &options.auth {
        // The password goes by environment, not argv, so `ps` does not show it.
        cmd.arg("--auth")
            .arg(user)
            .env("AIOSMTPD_PASSWORD", password);
    }
    if let Some(max) = options.max_recipients {
        cmd.arg("--max-recipients").arg(max.to_string());
    }
    if let Some(limit) = options.size_limit {
        cmd.arg("--size-limit").arg(limit.to_string());
    }
    let mut child = cmd.spawn().expect("spawn python3 aiosmtpd_server.py");
    let stdout = child.stdout.take().expect("child stdout");
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(READY_TIMEOUT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.starts_with("READY") {
                return true;
            }
        }
        false
    })
    .await;
    if ready == Ok(true) {
        // Keep reading stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Some(child)
    } else {
        let _ = child.kill().await;
        None
    }
}

fn read_message(env: &Path) -> StoredMessage {
    let envelope = std::fs::read_to_string(env).expect("read envelope");
    let data = std::fs::read(env.with_extension("eml")).expect("read message");
    let mut mail_from = String::new();
    let mut rcpt_to = Vec::new();
    for line in envelope.lines() {
        if let Some(from) = line.strip_prefix("from ") {
            mail_from = from.to_string();
        } else if let Some(to) = line.strip_prefix("to ") {
            rcpt_to.push(to.to_string());
        }
    }
    StoredMessage {
        mail_from,
        rcpt_to,
        message_id: super::message_id(&data),
        data,
    }
}
