//! A scriptable, fault-injecting SMTP server on 127.0.0.1 for tests: a [`Script`]
//! says what to answer at each phase (a normal reply, a 4xx/5xx, a hang, a closed
//! connection, an endless reply), and the server records every transaction and connection it saw.
//! It is a test double, not a mail server: it stores nothing on disk and relays nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use super::tls::TestCa;

mod session;

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
    /// Wait this long, then answer as `Ok` does: a slow server.
    Pause(Duration),
    /// Begin a reply and never end its line: bytes without a line break
    /// until the client goes away.
    Flood,
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
    rcpts: HashMap<String, (Action, Share)>,
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
    pub fn on_rcpt(self, address: &str, action: Action) -> Self {
        self.on_rcpt_share(address, action, Share::All)
    }

    /// `action` at the occurrences of RCPT TO this address that `share`
    /// selects (a mailbox full for a while, say); `Ok` at the others.
    pub fn on_rcpt_share(mut self, address: &str, action: Action, share: Share) -> Self {
        self.rcpts
            .insert(address.to_ascii_lowercase(), (action, share));
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
    /// Implicit TLS (port 465 style): the TLS handshake comes first, before the
    /// greeting, with a certificate signed by [`FaultSmtp::ca_pem`]. STARTTLS is
    /// not advertised.
    Implicit,
}

/// Server options other than the script.
#[derive(Debug, Clone)]
pub struct Options {
    /// Advertise AUTH PLAIN LOGIN and require these credentials (535 on mismatch,
    /// 530 to MAIL before a successful AUTH).
    pub auth: Option<(String, String)>,
    /// Advertise AUTH XOAUTH2 for this user, and take the bearer tokens that
    /// [`FaultSmtp::accept_tokens`] allows. A wrong token gets what Gmail
    /// sends: a 334 with a JSON error, then 535 after the client's empty line.
    pub xoauth2_user: Option<String>,
    /// Advertise SMTPUTF8; when off, non-ASCII addresses and the SMTPUTF8 parameter get 553.
    pub smtputf8: bool,
    /// Advertise 8BITMIME.
    pub eightbitmime: bool,
    /// Advertise PIPELINING. Commands are read line by line either way, so a
    /// client that pipelines without it is served all the same.
    pub pipelining: bool,
    /// STARTTLS behaviour.
    pub starttls: StartTls,
    /// The name in the greeting and the EHLO reply.
    pub hostname: String,
    /// Accept at most this many recipients a transaction, and answer each
    /// RCPT after them `452 4.5.3 Error: too many recipients`, as Postfix's
    /// `smtpd_recipient_limit` does.
    pub max_recipients: Option<usize>,
    /// The reply to a RCPT past `max_recipients` or `max_domains`, in place
    /// of that 452: a provider that refuses recipients over its cap for good
    /// (`550 Too many recipients`).
    pub over_cap_reply: Option<String>,
    /// Accept recipients of at most this many domains a transaction, and
    /// answer each RCPT of a further domain as over the cap.
    pub max_domains: Option<usize>,
    /// Take at most this many transactions (MAIL commands) a session, and
    /// answer each MAIL after them `451 4.5.3 Too many transactions`.
    pub max_transactions: Option<usize>,
    /// Announce the three limits above in EHLO as `LIMITS RCPTMAX=…
    /// RCPTDOMAINMAX=… MAILMAX=…` (RFC 9422), those that are set.
    pub announce_limits: bool,
    /// Announce DSN (RFC 3461); the MAIL and RCPT arguments are recorded
    /// either way ([`FaultSmtp::mail_args`], [`FaultSmtp::rcpt_args`]).
    pub dsn: bool,
    /// Announce `SIZE n` (RFC 1870; 0: no fixed limit), and refuse a MAIL
    /// whose `SIZE=` is larger than `n`, or data larger than `n` after the
    /// final ".", with 552.
    pub size: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            auth: None,
            xoauth2_user: None,
            smtputf8: true,
            eightbitmime: true,
            pipelining: true,
            starttls: StartTls::Off,
            hostname: "fault-smtp.test".to_string(),
            max_recipients: None,
            over_cap_reply: None,
            max_domains: None,
            max_transactions: None,
            announce_limits: false,
            dsn: false,
            size: None,
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
        let ca =
            matches!(options.starttls, StartTls::On | StartTls::Implicit).then(TestCa::generate);
        let tls = ca.as_ref().map(acceptor);
        let shared = Arc::new(Shared {
            options,
            tls,
            script: Mutex::new(Arc::new(Installed::new(script))),
            received: Mutex::new(Vec::new()),
            verbs: Mutex::new(HashMap::new()),
            mail_args: Mutex::new(Vec::new()),
            rcpt_args: Mutex::new(Vec::new()),
            over_cap: AtomicU64::new(0),
            phases: Default::default(),
            connections: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            max_open: AtomicUsize::new(0),
            pipelined: AtomicU64::new(0),
            tokens: Mutex::new((Vec::new(), Vec::new())),
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

    /// XOAUTH2: from now on only these bearer tokens are accepted.
    pub fn accept_tokens(&self, tokens: &[&str]) {
        lock(&self.shared.tokens).0 = tokens.iter().map(|t| t.to_string()).collect();
    }

    /// XOAUTH2: every bearer token presented, in order.
    pub fn tokens_presented(&self) -> Vec<String> {
        lock(&self.shared.tokens).1.clone()
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

    /// Waits until at least `n` transactions were answered 250 after the dot;
    /// returns whether they were.
    pub async fn wait_for_delivered(&self, n: usize, timeout: Duration) -> bool {
        super::wait_until(|| self.delivered().len() >= n, timeout).await
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

    /// The argument of every MAIL command since the start (`FROM:<a> SIZE=…`).
    pub fn mail_args(&self) -> Vec<String> {
        lock(&self.shared.mail_args).clone()
    }

    /// The argument of every RCPT command received, in order.
    pub fn rcpt_args(&self) -> Vec<String> {
        lock(&self.shared.rcpt_args).clone()
    }

    /// How many RCPTs were answered as over `max_recipients` or
    /// `max_domains`, and MAILs as over `max_transactions`, since the start.
    pub fn over_cap_replies(&self) -> u64 {
        self.shared.over_cap.load(Ordering::SeqCst)
    }

    /// How many MAIL commands arrived with the next command already behind
    /// them in the same read: transactions the client pipelined.
    pub fn pipelined(&self) -> u64 {
        self.shared.pipelined.load(Ordering::SeqCst)
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
    /// Occurrences of RCPT TO each address the script names.
    rcpt_seen: HashMap<String, AtomicU64>,
}

impl Installed {
    fn new(script: Script) -> Self {
        let rcpt_seen = script
            .rcpts
            .keys()
            .map(|a| (a.clone(), AtomicU64::new(0)))
            .collect();
        Installed {
            script,
            seen: Default::default(),
            rcpt_seen,
        }
    }
}

struct Shared {
    options: Options,
    tls: Option<TlsAcceptor>,
    script: Mutex<Arc<Installed>>,
    received: Mutex<Vec<Received>>,
    verbs: Mutex<HashMap<String, u64>>,
    /// The argument of every MAIL command, in order.
    mail_args: Mutex<Vec<String>>,
    rcpt_args: Mutex<Vec<String>>,
    /// RCPTs answered as over `max_recipients`.
    over_cap: AtomicU64,
    phases: [AtomicU64; 7],
    connections: AtomicU64,
    open: AtomicUsize,
    max_open: AtomicUsize,
    pipelined: AtomicU64,
    /// XOAUTH2: the bearer tokens accepted now, and every one presented.
    tokens: Mutex<(Vec<String>, Vec<String>)>,
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
        if let Some(rcpt) = rcpt.map(str::to_ascii_lowercase)
            && let Some((action, share)) = installed.script.rcpts.get(&rcpt)
        {
            let nth = installed.rcpt_seen[&rcpt].fetch_add(1, Ordering::SeqCst) + 1;
            return if share.applies(nth) {
                action.clone()
            } else {
                Action::Ok
            };
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
struct OpenGuard(pub(super) Arc<Shared>);

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
                    sessions.spawn(session::serve(stream, guard));
                }
                // Out of file descriptors and the like: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
}

/// Copies of each message among `received`, by Message-ID without angle
/// brackets, counting every transaction whose data arrived in full.
pub fn copies<'a>(
    received: impl IntoIterator<Item = &'a Received>,
) -> std::collections::HashMap<String, usize> {
    let mut out = std::collections::HashMap::new();
    for r in received {
        let id = r
            .message_id
            .clone()
            .unwrap_or_default()
            .trim_matches(|c| c == '<' || c == '>')
            .to_string();
        *out.entry(id).or_default() += 1;
    }
    out
}
