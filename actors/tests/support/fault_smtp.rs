//! A scriptable, fault-injecting SMTP server on 127.0.0.1 for tests: a [`Script`]
//! says what to answer at each phase (a normal reply, a 4xx/5xx, a hang, a closed
//! connection), and the server records every transaction and connection it saw.
//! It is a test double, not a mail server: it stores nothing on disk and relays nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use super::tls::TestCa;

/// A point in the SMTP conversation where the script can inject a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// The 220 greeting when a client connects.
    Greeting,
    /// The reply to EHLO or HELO.
    Ehlo,
    /// The reply to the AUTH command (before any challenge).
    Auth,
    /// The reply to MAIL FROM.
    Mail,
    /// The reply to RCPT TO.
    Rcpt,
    /// The reply to the DATA command (354 when all is well).
    Data,
    /// The reply after the final "." of the message.
    AfterDot,
}

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::Greeting,
        Phase::Ehlo,
        Phase::Auth,
        Phase::Mail,
        Phase::Rcpt,
        Phase::Data,
        Phase::AfterDot,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// What the server does at a phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The normal 2xx/3xx reply.
    Ok,
    /// This reply instead (normally 4xx or 5xx). A 421 also closes the connection,
    /// as RFC 5321 says it must; a non-421 fault at the greeting leaves the session
    /// answering 503 to everything but QUIT.
    Reply(u16, String),
    /// Never answer; read and discard input until the client goes away.
    Hang,
    /// Drop the connection without a word.
    Close,
}

impl Action {
    /// `Action::Reply(code, text)`.
    pub fn reply(code: u16, text: impl Into<String>) -> Self {
        Action::Reply(code, text.into())
    }
}

/// Which occurrences of a phase a rule applies to. Occurrences are counted across
/// all connections, from 1, since the script was installed; the others get `Ok`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// Every occurrence.
    All,
    /// The first `n` occurrences only (a storm that then passes).
    FirstN(u64),
    /// Occurrences `n`, `2n`, `3n`, ...
    EveryNth(u64),
}

impl Share {
    fn applies(self, occurrence: u64) -> bool {
        match self {
            Share::All => true,
            Share::FirstN(n) => occurrence <= n,
            Share::EveryNth(n) => n > 0 && occurrence.is_multiple_of(n),
        }
    }
}

/// What the server answers, per phase and per recipient. The default answers `Ok`
/// everywhere.
#[derive(Debug, Clone, Default)]
pub struct Script {
    phases: HashMap<Phase, (Action, Share)>,
    rcpts: HashMap<String, Action>,
}

impl Script {
    /// A script that answers `Ok` everywhere.
    pub fn ok() -> Self {
        Self::default()
    }

    /// `action` at every occurrence of `phase` (replaces an earlier rule for it).
    pub fn on(self, phase: Phase, action: Action) -> Self {
        self.on_share(phase, action, Share::All)
    }

    /// `action` at the occurrences of `phase` that `share` selects.
    pub fn on_share(mut self, phase: Phase, action: Action, share: Share) -> Self {
        self.phases.insert(phase, (action, share));
        self
    }

    /// `action` for RCPT TO this address (case-insensitive); it takes precedence over
    /// the `Rcpt` phase rule.
    pub fn on_rcpt(mut self, address: &str, action: Action) -> Self {
        self.rcpts.insert(address.to_ascii_lowercase(), action);
        self
    }
}

/// Whether STARTTLS is offered and what happens when a client uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartTls {
    /// Not advertised; STARTTLS gets 502.
    #[default]
    Off,
    /// Advertised, and upgraded with a certificate signed by [`FaultSmtp::ca_pem`].
    On,
    /// Advertised, answered 220, then non-TLS bytes and a closed connection: the
    /// client's handshake fails.
    Broken,
}

/// Server options other than the script.
#[derive(Debug, Clone)]
pub struct Options {
    /// Advertise AUTH PLAIN LOGIN and require these credentials (535 on mismatch,
    /// 530 to MAIL before a successful AUTH).
    pub auth: Option<(String, String)>,
    /// Advertise SMTPUTF8; when off, non-ASCII addresses and the SMTPUTF8 parameter get 553.
    pub smtputf8: bool,
    /// Advertise 8BITMIME.
    pub eightbitmime: bool,
    /// STARTTLS behaviour.
    pub starttls: StartTls,
    /// The name in the greeting and the EHLO reply.
    pub hostname: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            auth: None,
            smtputf8: true,
            eightbitmime: true,
            starttls: StartTls::Off,
            hostname: "fault-smtp.test".to_string(),
        }
    }
}

/// How the server answered after the final "." of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterDot {
    /// 250: the message was accepted.
    Delivered,
    /// The script's fault reply with this code.
    Replied(u16),
    /// The script hung: the client never got an answer.
    Hung,
    /// The script closed the connection without answering.
    Closed,
}

/// One transaction whose data was received in full (up to the final ".").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The MAIL FROM address, without angle brackets (empty for the null sender).
    pub mail_from: String,
    /// The RCPT TO addresses the server accepted, in order.
    pub rcpt_to: Vec<String>,
    /// The message as sent, dot-unstuffed, without the final ".".
    pub data: Vec<u8>,
    /// The Message-ID header's value, with angle brackets.
    pub message_id: Option<String>,
    /// What the client was told after the final ".".
    pub outcome: AfterDot,
}

impl Received {
    /// Whether the server answered 250 after the final ".".
    pub fn is_delivered(&self) -> bool {
        self.outcome == AfterDot::Delivered
    }
}

/// A running fault-injecting SMTP server. Dropping it stops it.
#[derive(Debug)]
pub struct FaultSmtp {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
    ca: Option<TestCa>,
}

impl FaultSmtp {
    /// Starts a server with default options on 127.0.0.1 and a free port.
    pub async fn start(script: Script) -> Self {
        Self::start_with(script, Options::default()).await
    }

    /// Starts a server with these options on 127.0.0.1 and a free port.
    pub async fn start_with(script: Script, options: Options) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let ca = (options.starttls == StartTls::On).then(TestCa::generate);
        let tls = ca.as_ref().map(acceptor);
        let shared = Arc::new(Shared {
            options,
            tls,
            script: Mutex::new(Arc::new(Installed::new(script))),
            received: Mutex::new(Vec::new()),
            verbs: Mutex::new(HashMap::new()),
            phases: Default::default(),
            connections: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            max_open: AtomicUsize::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        FaultSmtp {
            addr,
            shared,
            accept,
            ca,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The CA that signed the STARTTLS certificate (only with [`StartTls::On`]).
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca.as_ref().map(|ca| ca.ca_pem.as_str())
    }

    /// Replaces the script for every later command, on open connections too; the
    /// occurrence counts that [`Share`] uses start again from zero.
    pub fn set_script(&self, script: Script) {
        *lock(&self.shared.script) = Arc::new(Installed::new(script));
    }

    /// Every transaction whose data arrived in full, in order, whatever the reply.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.shared.received).clone()
    }

    /// The transactions answered 250 after the final ".".
    pub fn delivered(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(Received::is_delivered)
            .collect()
    }

    /// Forgets the recorded transactions (counters are kept).
    pub fn clear_received(&self) {
        lock(&self.shared.received).clear();
    }

    /// Connections accepted since the start.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// The most connections that were ever open at once.
    pub fn max_concurrent_connections(&self) -> usize {
        self.shared.max_open.load(Ordering::SeqCst)
    }

    /// How many times the server reached `phase` since the start (greetings sent,
    /// EHLO/HELO, AUTH, MAIL, RCPT and DATA commands, final dots received).
    pub fn commands(&self, phase: Phase) -> u64 {
        self.shared.phases[phase.index()].load(Ordering::SeqCst)
    }

    /// How many commands with this verb (case-insensitive: "RSET", "NOOP",
    /// "QUIT", "STARTTLS", ...) arrived since the start.
    pub fn verb_count(&self, verb: &str) -> u64 {
        lock(&self.shared.verbs)
            .get(&verb.to_ascii_uppercase())
            .copied()
            .unwrap_or(0)
    }

    /// Stops listening and drops every open connection; later connects are refused.
    pub async fn kill(&self) {
        self.accept.abort();
        // Wait for the accept task's future to be dropped: that closes the listener
        // and aborts the connection tasks it owns.
        while !self.accept.is_finished() {
            tokio::task::yield_now().await;
        }
        let closed = super::wait_until(|| self.open_connections() == 0, Duration::from_secs(5));
        assert!(
            closed.await,
            "fault SMTP server: connections still open after kill"
        );
    }
}

impl Drop for FaultSmtp {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The script in force, with its own occurrence counters per phase.
#[derive(Debug)]
struct Installed {
    script: Script,
    seen: [AtomicU64; 7],
}

impl Installed {
    fn new(script: Script) -> Self {
        Installed {
            script,
            seen: Default::default(),
        }
    }
}

struct Shared {
    options: Options,
    tls: Option<TlsAcceptor>,
    script: Mutex<Arc<Installed>>,
    received: Mutex<Vec<Received>>,
    verbs: Mutex<HashMap<String, u64>>,
    phases: [AtomicU64; 7],
    connections: AtomicU64,
    open: AtomicUsize,
    max_open: AtomicUsize,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("options", &self.options)
            .field("connections", &self.connections)
            .field("open", &self.open)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Counts one occurrence of `phase` and returns what the script says to do.
    fn decide(&self, phase: Phase, rcpt: Option<&str>) -> Action {
        self.phases[phase.index()].fetch_add(1, Ordering::SeqCst);
        let installed = lock(&self.script).clone();
        let occurrence = installed.seen[phase.index()].fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(action) = rcpt.and_then(|r| installed.script.rcpts.get(&r.to_ascii_lowercase()))
        {
            return action.clone();
        }
        match installed.script.phases.get(&phase) {
            Some((action, share)) if share.applies(occurrence) => action.clone(),
            _ => Action::Ok,
        }
    }

    fn count_verb(&self, verb: &str) {
        *lock(&self.verbs).entry(verb.to_string()).or_insert(0) += 1;
    }
}

/// Decrements the open-connection count however the connection task ends,
/// including when it is aborted by `kill`.
struct OpenGuard(Arc<Shared>);

impl OpenGuard {
    fn new(shared: Arc<Shared>) -> Self {
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let now = shared.open.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_open.fetch_max(now, Ordering::SeqCst);
        OpenGuard(shared)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking test thread must not hide the records from the others.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn acceptor(ca: &TestCa) -> TlsAcceptor {
    let (cert, key) = ca.leaf_der();
    // Both ring and aws-lc-rs are compiled in, so the provider must be named.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("TLS server certificate");
    TlsAcceptor::from(Arc::new(config))
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Owning the connection tasks here means aborting this task aborts them all.
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let guard = OpenGuard::new(shared.clone());
                    sessions.spawn(session(stream, guard));
                }
                // Out of file descriptors and the like: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Conn = BufReader<Box<dyn Io>>;

/// Why a session stops reading commands.
enum End {
    /// The client left, or the script said Close.
    Closed,
    /// The script said Hang.
    Hang,
}

/// The state of one SMTP session.
struct Session {
    shared: Arc<Shared>,
    /// Dropped at QUIT: a client that said QUIT has let go of the connection,
    /// whenever the socket itself closes.
    open: Option<OpenGuard>,
    greeted: bool,
    authenticated: bool,
    tls_active: bool,
    mail_from: Option<String>,
    rcpt_to: Vec<String>,
}

async fn session(stream: TcpStream, guard: OpenGuard) {
    let _ = stream.set_nodelay(true);
    let mut conn: Conn = BufReader::new(Box::new(stream));
    let mut s = Session {
        shared: guard.0.clone(),
        open: Some(guard),
        greeted: false,
        authenticated: false,
        tls_active: false,
        mail_from: None,
        rcpt_to: Vec::new(),
    };
    let end = match s.run(&mut conn).await {
        Ok(end) => end,
        Err(_) => End::Closed,
    };
    if let End::Hang = end {
        let mut sink = [0u8; 4096];
        while let Ok(n) = conn.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    }
}

/// The result of one step: keep going, or stop the session.
type Step = std::io::Result<Option<End>>;

impl Session {
    async fn run(&mut self, conn: &mut Conn) -> std::io::Result<End> {
        let greeting = self.shared.decide(Phase::Greeting, None);
        let rejected = match greeting {
            Action::Ok => {
                let host = &self.shared.options.hostname;
                send(conn, &format!("220 {host} ESMTP fault-smtp")).await?;
                false
            }
            other => {
                if let Some(end) = self.fault(conn, other).await? {
                    return Ok(end);
                }
                true
            }
        };
        loop {
            let Some(line) = read_line(conn).await? else {
                return Ok(End::Closed);
            };
            let (verb, arg) = split_command(&line);
            self.shared.count_verb(&verb);
            if rejected && verb != "QUIT" {
                send(conn, "503 5.5.1 No service").await?;
                continue;
            }
            let step = match verb.as_str() {
                "EHLO" | "HELO" => self.ehlo(conn, verb == "EHLO").await,
                "STARTTLS" => self.starttls(conn).await,
                "AUTH" => self.auth(conn, arg).await,
                "MAIL" => self.mail(conn, arg).await,
                "RCPT" => self.rcpt(conn, arg).await,
                "DATA" => self.data(conn).await,
                "RSET" => {
                    self.reset();
                    send(conn, "250 2.0.0 Ok").await.map(|_| None)
                }
                "NOOP" => send(conn, "250 2.0.0 Ok").await.map(|_| None),
                "VRFY" => send(conn, "252 2.0.0 Cannot verify").await.map(|_| None),
                "QUIT" => {
                    self.open = None;
                    send(conn, "221 2.0.0 Bye").await?;
                    return Ok(End::Closed);
                }
                _ => send(conn, "500 5.5.2 Unknown command").await.map(|_| None),
            };
            if let Some(end) = step? {
                return Ok(end);
            }
        }
    }

    /// Carries out a non-Ok action; `Some` when the session must stop.
    async fn fault(&mut self, conn: &mut Conn, action: Action) -> Step {
        match action {
            Action::Ok => Ok(None),
            Action::Reply(code, text) => {
                send(conn, &format!("{code} {text}")).await?;
                Ok((code == 421).then_some(End::Closed))
            }
            Action::Hang => Ok(Some(End::Hang)),
            Action::Close => Ok(Some(End::Closed)),
        }
    }

    fn reset(&mut self) {
        self.mail_from = None;
        self.rcpt_to.clear();
    }

    async fn ehlo(&mut self, conn: &mut Conn, extended: bool) -> Step {
        let action = self.shared.decide(Phase::Ehlo, None);
        if action != Action::Ok {
            return self.fault(conn, action).await;
        }
        self.greeted = true;
        self.reset();
        let opts = &self.shared.options;
        if !extended {
            return send(conn, &format!("250 {}", opts.hostname))
                .await
                .map(|_| None);
        }
        let mut lines = vec![opts.hostname.clone()];
        if opts.eightbitmime {
            lines.push("8BITMIME".into());
        }
        if opts.smtputf8 {
            lines.push("SMTPUTF8".into());
        }
        if opts.starttls != StartTls::Off && !self.tls_active {
            lines.push("STARTTLS".into());
        }
        if opts.auth.is_some() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        lines.push("ENHANCEDSTATUSCODES".into());
        let last = lines.len() - 1;
        let reply: Vec<String> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
            .collect();
        send(conn, &reply.join("\r\n")).await.map(|_| None)
    }

    async fn starttls(&mut self, conn: &mut Conn) -> Step {
        let acceptor = match (self.shared.options.starttls, &self.shared.tls) {
            (StartTls::On, Some(acceptor)) if !self.tls_active => acceptor.clone(),
            (StartTls::Broken, _) => {
                send(conn, "220 2.0.0 Ready to start TLS").await?;
                conn.write_all(b"this is not a TLS handshake\r\n").await?;
                conn.flush().await?;
                return Ok(Some(End::Closed));
            }
            _ => {
                return send(conn, "502 5.5.1 STARTTLS not available")
                    .await
                    .map(|_| None);
            }
        };
        send(conn, "220 2.0.0 Ready to start TLS").await?;
        // The client waits for the 220 before its handshake, so nothing is buffered.
        let plain = std::mem::replace(conn, BufReader::new(Box::new(tokio::io::empty())));
        let tls = acceptor.accept(plain.into_inner()).await?;
        *conn = BufReader::new(Box::new(tls));
        self.tls_active = true;
        self.greeted = false;
        self.authenticated = false;
        self.reset();
        Ok(None)
    }

    async fn auth(&mut self, conn: &mut Conn, arg: &str) -> Step {
        let Some((user, pass)) = self.shared.options.auth.clone() else {
            return send(conn, "502 5.5.1 AUTH not available")
                .await
                .map(|_| None);
        };
        let action = self.shared.decide(Phase::Auth, None);
        if action != Action::Ok {
            return self.fault(conn, action).await;
        }
        let mut words = arg.split_whitespace();
        let mechanism = words.next().unwrap_or("").to_ascii_uppercase();
        let initial = words.next().map(str::to_string);
        let given = match mechanism.as_str() {
            "PLAIN" => {
                let response = match initial {
                    Some(r) => r,
                    None => match self.challenge(conn, "").await? {
                        Some(r) => r,
                        None => return Ok(Some(End::Closed)),
                    },
                };
                decode_base64(&response).and_then(|raw| {
                    let mut parts = raw.split(|b| *b == 0).skip(1);
                    let u = String::from_utf8(parts.next()?.to_vec()).ok()?;
                    let p = String::from_utf8(parts.next()?.to_vec()).ok()?;
                    Some((u, p))
                })
            }
            "LOGIN" => {
                let u = match initial {
                    Some(r) => Some(r),
                    None => self.challenge(conn, "VXNlcm5hbWU6").await?,
                };
                let Some(u) = u else {
                    return Ok(Some(End::Closed));
                };
                let Some(p) = self.challenge(conn, "UGFzc3dvcmQ6").await? else {
                    return Ok(Some(End::Closed));
                };
                decode_utf8(&u).zip(decode_utf8(&p))
            }
            _ => {
                return send(conn, "504 5.5.4 Unrecognized authentication type")
                    .await
                    .map(|_| None);
            }
        };
        if given == Some((user, pass)) {
            self.authenticated = true;
            send(conn, "235 2.7.0 Authentication successful").await?;
        } else {
            send(conn, "535 5.7.8 Authentication credentials invalid").await?;
        }
        Ok(None)
    }

    /// Sends a 334 challenge and returns the client's answer (`None` if it left).
    async fn challenge(&mut self, conn: &mut Conn, text: &str) -> std::io::Result<Option<String>> {
        send(conn, &format!("334 {text}")).await?;
        read_line(conn).await
    }

    async fn mail(&mut self, conn: &mut Conn, arg: &str) -> Step {
        let Some(from) = address(arg, "FROM:") else {
            return send(conn, "501 5.5.4 Syntax: MAIL FROM:<address>")
                .await
                .map(|_| None);
        };
        if !self.greeted {
            return send(conn, "503 5.5.1 Send EHLO first").await.map(|_| None);
        }
        if self.shared.options.auth.is_some() && !self.authenticated {
            return send(conn, "530 5.7.0 Authentication required")
                .await
                .map(|_| None);
        }
        if self.mail_from.is_some() {
            return send(conn, "503 5.5.1 Nested MAIL command")
                .await
                .map(|_| None);
        }
        if !self.shared.options.smtputf8
            && (!from.is_ascii() || arg.to_ascii_uppercase().contains("SMTPUTF8"))
        {
            return send(conn, "553 5.6.7 SMTPUTF8 not supported")
                .await
                .map(|_| None);
        }
        let action = self.shared.decide(Phase::Mail, None);
        if action != Action::Ok {
            return self.fault(conn, action).await;
        }
        self.mail_from = Some(from);
        send(conn, "250 2.1.0 Ok").await.map(|_| None)
    }

    async fn rcpt(&mut self, conn: &mut Conn, arg: &str) -> Step {
        let Some(to) = address(arg, "TO:") else {
            return send(conn, "501 5.5.4 Syntax: RCPT TO:<address>")
                .await
                .map(|_| None);
        };
        if self.mail_from.is_none() {
            return send(conn, "503 5.5.1 Need MAIL first").await.map(|_| None);
        }
        if !self.shared.options.smtputf8 && !to.is_ascii() {
            return send(conn, "553 5.6.7 SMTPUTF8 not supported")
                .await
                .map(|_| None);
        }
        let action = self.shared.decide(Phase::Rcpt, Some(&to));
        if action != Action::Ok {
            return self.fault(conn, action).await;
        }
        self.rcpt_to.push(to);
        send(conn, "250 2.1.5 Ok").await.map(|_| None)
    }

    async fn data(&mut self, conn: &mut Conn) -> Step {
        let Some(mail_from) = self.mail_from.clone() else {
            return send(conn, "503 5.5.1 Need MAIL first").await.map(|_| None);
        };
        if self.rcpt_to.is_empty() {
            return send(conn, "554 5.5.1 No valid recipients")
                .await
                .map(|_| None);
        }
        let action = self.shared.decide(Phase::Data, None);
        if action != Action::Ok {
            return self.fault(conn, action).await;
        }
        send(conn, "354 End data with <CR><LF>.<CR><LF>").await?;
        let Some(data) = read_data(conn).await? else {
            return Ok(Some(End::Closed));
        };
        let action = self.shared.decide(Phase::AfterDot, None);
        let outcome = match &action {
            Action::Ok => AfterDot::Delivered,
            Action::Reply(code, _) => AfterDot::Replied(*code),
            Action::Hang => AfterDot::Hung,
            Action::Close => AfterDot::Closed,
        };
        // Recorded before the reply goes out, so a client that saw the reply sees the record.
        lock(&self.shared.received).push(Received {
            mail_from,
            rcpt_to: std::mem::take(&mut self.rcpt_to),
            message_id: super::message_id(&data),
            data,
            outcome,
        });
        self.reset();
        if action != Action::Ok {
            return self.fault(conn, action).await;
        }
        let n = self.shared.phases[Phase::AfterDot.index()].load(Ordering::SeqCst);
        send(conn, &format!("250 2.0.0 Ok: queued as FAULT{n}"))
            .await
            .map(|_| None)
    }
}

async fn send(conn: &mut Conn, reply: &str) -> std::io::Result<()> {
    conn.write_all(reply.as_bytes()).await?;
    conn.write_all(b"\r\n").await?;
    conn.flush().await
}

/// One command line without its line ending; `None` at end of stream.
async fn read_line(conn: &mut Conn) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    if conn.read_until(b'\n', &mut buf).await? == 0 {
        return Ok(None);
    }
    let line = String::from_utf8_lossy(&buf);
    Ok(Some(line.trim_end_matches(['\r', '\n']).to_string()))
}

/// The message after a 354, dot-unstuffed, up to the line "."; `None` if the
/// client left before it.
async fn read_data(conn: &mut Conn) -> std::io::Result<Option<Vec<u8>>> {
    let mut data = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if conn.read_until(b'\n', &mut line).await? == 0 {
            return Ok(None);
        }
        if line == b".\r\n" || line == b".\n" {
            return Ok(Some(data));
        }
        let body = line.strip_prefix(b".").unwrap_or(&line);
        data.extend_from_slice(body);
    }
}

/// The upper-cased verb and the rest of a command line.
fn split_command(line: &str) -> (String, &str) {
    let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
    (verb.to_ascii_uppercase(), arg.trim())
}

/// The address in `FROM:<a> params` or `TO:<a> params`, without brackets.
fn address(arg: &str, prefix: &str) -> Option<String> {
    let head = arg.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = arg[prefix.len()..].trim_start();
    let inner = rest.strip_prefix('<')?;
    let end = inner.find('>')?;
    Some(inner[..end].to_string())
}

fn decode_utf8(b64: &str) -> Option<String> {
    String::from_utf8(decode_base64(b64)?).ok()
}

/// Standard base64 with padding, as SASL uses it.
fn decode_base64(input: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let trimmed = input.trim().trim_end_matches('=');
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in trimmed.bytes() {
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}
