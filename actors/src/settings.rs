//! Validated settings that the actor system runs on.
//!
//! These are plain Rust values: `mailmux-actors` never reads files or the
//! environment. The daemon's `config` module builds them from its layered
//! configuration and validates every field before they get here.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Everything the supervisor needs to run the relays and the router.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The relays, in the order they were configured.
    pub relays: Vec<RelaySettings>,
    /// How the router picks a relay and how often it fails over.
    pub router: RouterSettings,
    /// How crashed actors are restarted.
    pub supervisor: SupervisorSettings,
    /// Bounds shared by all relays.
    pub limits: Limits,
}

/// Which relay the router tries first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// The highest-priority available relay; failover goes down the list.
    #[default]
    Priority,
    /// Each message to the next relay in turn.
    RoundRobin,
    /// Randomly, in proportion to each relay's weight.
    Weighted,
    /// The relay with the fewest messages in flight.
    LeastOutstanding,
    /// Uniformly at random.
    Random,
}

impl Strategy {
    /// The configuration name of the strategy.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Priority => "priority",
            Strategy::RoundRobin => "round_robin",
            Strategy::Weighted => "weighted",
            Strategy::LeastOutstanding => "least_outstanding",
            Strategy::Random => "random",
        }
    }

    /// All strategies, for error messages that list the valid names.
    pub const ALL: [Strategy; 5] = [
        Strategy::Priority,
        Strategy::RoundRobin,
        Strategy::Weighted,
        Strategy::LeastOutstanding,
        Strategy::Random,
    ];
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Strategy::ALL.iter().map(|s| s.as_str()).collect();
                format!(
                    "unknown strategy {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// Router settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterSettings {
    /// Relay selection strategy.
    pub strategy: Strategy,
    /// How many relays one message may try, in all. Never more than the number
    /// of relays: a relay that already tried a message is not tried again.
    pub max_attempts: u32,
}

impl Default for RouterSettings {
    fn default() -> Self {
        Self {
            strategy: Strategy::Priority,
            max_attempts: 3,
        }
    }
}

/// Restart policy for crashed actors.
#[derive(Debug, Clone, PartialEq)]
pub struct SupervisorSettings {
    /// At most this many restarts of one actor within `restart_window`.
    pub max_restarts: u32,
    /// The window the restart budget is counted over.
    pub restart_window: Duration,
    /// Pause before each restart, so that a crash loop does not spin.
    pub restart_pause: Duration,
}

impl Default for SupervisorSettings {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            restart_window: Duration::from_secs(60),
            restart_pause: Duration::from_millis(100),
        }
    }
}

/// Bounds shared by the whole dispatcher.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Messages accepted for delivery at once, across all relays. A caller past
    /// this bound waits for a slot until its deadline, then gets "busy".
    pub max_in_flight: usize,
    /// Largest message, in bytes after encoding.
    pub max_message_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_in_flight: 4096,
            max_message_bytes: 10 * 1024 * 1024,
        }
    }
}

/// One relay: where it delivers and how it is treated.
#[derive(Debug, Clone, PartialEq)]
pub struct RelaySettings {
    /// Unique name, used in status, errors and pins.
    pub name: String,
    /// What the relay delivers to.
    pub kind: RelayKind,
    /// Higher is preferred by the `priority` strategy.
    pub priority: i32,
    /// Share of traffic under the `weighted` strategy.
    pub weight: u32,
    /// Sender used when a message names none.
    pub from_email: Option<String>,
    /// The envelope sender (MAIL FROM) of every message through this relay,
    /// where bounces go; `None`: each message's own sender.
    pub return_path: Option<lettre::Address>,
    /// Connection pool, queue and per-connection bounds.
    pub pool: PoolSettings,
    /// Timeouts for every network wait.
    pub timeouts: Timeouts,
    /// Backoff and circuit breaker.
    pub health: HealthSettings,
    /// Submission limits (a provider's, such as 30 a minute): past them the
    /// router passes the relay over, and a message no relay may take now
    /// waits in the queue for its turn. Empty: no limit.
    pub rate: Vec<RelayRate>,
}

/// One limit: `count` messages per `period`, refilled evenly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayRate {
    pub count: u32,
    pub period: Duration,
}

/// Where a relay delivers.
#[derive(Debug, Clone, PartialEq)]
pub enum RelayKind {
    /// An SMTP server.
    Smtp(SmtpSettings),
    /// A folder: each message is written as an `.eml` file. The embedded
    /// default when no relay is configured.
    File {
        /// The folder the files go to; created if missing.
        dir: PathBuf,
    },
}

/// How to talk to an SMTP server.
#[derive(Debug, Clone, PartialEq)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    /// AUTH credentials; `None` means no AUTH.
    pub auth: Option<Credentials>,
    /// The name sent in EHLO.
    pub hello_name: String,
    /// Extra trusted root certificates (PEM), in addition to the platform's.
    pub ca_pem: Option<Vec<u8>>,
    /// Accept any certificate. For test servers only; said loudly in the log.
    pub accept_invalid_certs: bool,
    /// Send MAIL, RCPT and DATA in one write when the server offers
    /// PIPELINING (RFC 2920).
    pub pipelining: bool,
    /// RCPTs in one transaction at most; the other recipients of a message
    /// go in further transactions on the same connection. For a provider
    /// that refuses recipients over its cap with a 5xx, where a 452 would
    /// have said to send them in another transaction. `None`: as many as
    /// the server takes.
    pub recipients_per_transaction: Option<std::num::NonZeroUsize>,
    /// Delivery status notifications asked of a server that announces DSN
    /// (RFC 3461). `None`: none asked, the server's defaults.
    pub dsn: Option<Box<Dsn>>,
}

/// What a relay asks of a server's delivery status notifications (RFC
/// 3461): with either set, each message also names its Message-ID as its
/// `ENVID`, and each recipient itself as its `ORCPT`, so that a report can
/// be matched to what was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dsn {
    /// `NOTIFY` of each recipient: `NEVER`, or some of `SUCCESS`,
    /// `FAILURE` and `DELAY`, comma-separated.
    pub notify: Option<String>,
    /// `RET`: `HDRS` (a report returns the headers only) or `FULL`.
    pub ret: Option<String>,
}

/// Transport security for an SMTP relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// Plain text. Fine on loopback, nowhere else.
    None,
    /// STARTTLS when the server offers it, plain text otherwise.
    Opportunistic,
    /// STARTTLS, and fail if the server does not offer it.
    #[default]
    Starttls,
    /// TLS from the first byte (port 465 style).
    Implicit,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::None => "none",
            TlsMode::Opportunistic => "opportunistic",
            TlsMode::Starttls => "starttls",
            TlsMode::Implicit => "implicit",
        }
    }
}

/// AUTH credentials. The password never prints.
#[derive(Clone, PartialEq)]
pub struct Credentials {
    pub username: String,
    /// Unused with `xoauth2`.
    pub password: Secret,
    pub method: AuthMethod,
    /// With `xoauth2`: where the access token comes from.
    pub token: Option<TokenSource>,
}

impl Credentials {
    /// A username and password, with the mechanism the server offers.
    pub fn password(username: impl Into<String>, password: Secret) -> Self {
        Credentials {
            username: username.into(),
            password,
            method: AuthMethod::Auto,
            token: None,
        }
    }

    /// SASL XOAUTH2 for `username`, with access tokens from `token`.
    pub fn xoauth2(username: impl Into<String>, token: TokenSource) -> Self {
        Credentials {
            username: username.into(),
            password: Secret::new(""),
            method: AuthMethod::Xoauth2,
            token: Some(token),
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &self.password)
            .field("method", &self.method)
            .field("token", &self.token)
            .finish()
    }
}

/// How a relay authenticates (`auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMethod {
    /// PLAIN or LOGIN, whichever the server offers.
    #[default]
    Auto,
    Plain,
    Login,
    /// SASL XOAUTH2 with an OAuth2 access token (Microsoft 365, Gmail).
    Xoauth2,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Auto => "auto",
            AuthMethod::Plain => "plain",
            AuthMethod::Login => "login",
            AuthMethod::Xoauth2 => "xoauth2",
        }
    }
}

/// Gets OAuth2 access tokens for a relay: the daemon's OAuth2 client, which
/// caches a token until shortly before it expires.
#[async_trait::async_trait]
pub trait FetchToken: Send + Sync {
    /// A current access token. `fresh` asks for a new one even when the cached
    /// one has not expired (the server refused it). The error never holds a
    /// secret.
    async fn token(&self, fresh: bool) -> Result<Secret, String>;
}

/// A relay's access-token source. Two are equal when they were made from the
/// same settings (`fingerprint`), so a reload that changes nothing keeps the
/// relay and its cached token.
#[derive(Clone)]
pub struct TokenSource {
    fetch: std::sync::Arc<dyn FetchToken>,
    /// Where tokens come from, for status and logs (no secret).
    label: String,
    fingerprint: [u8; 32],
}

impl TokenSource {
    pub fn new(
        label: impl Into<String>,
        fingerprint: [u8; 32],
        fetch: std::sync::Arc<dyn FetchToken>,
    ) -> Self {
        TokenSource {
            fetch,
            label: label.into(),
            fingerprint,
        }
    }

    pub async fn token(&self, fresh: bool) -> Result<Secret, String> {
        self.fetch.token(fresh).await
    }

    pub fn label(&self) -> &str {
        &self.label
    }
}

impl PartialEq for TokenSource {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
    }
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TokenSource").field(&self.label).finish()
    }
}

/// A secret string: `Debug` and `Display` print `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself. Call only where it is handed to the protocol.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Connection pool and queue bounds of one relay.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    /// Open connections at most; a semaphore enforces it.
    pub max_connections: usize,
    /// Messages waiting for a connection at most; past it the relay is "busy"
    /// and the router tries another.
    pub max_queued: usize,
    /// A connection is closed after this many messages (0: no limit).
    pub messages_per_connection: u32,
    /// An idle connection older than this is closed instead of reused.
    pub idle_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: 8,
            max_queued: 1024,
            messages_per_connection: 100,
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// A timeout for every network wait of a relay.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeouts {
    /// TCP connect (and the TLS handshake of implicit TLS).
    pub connect: Duration,
    /// The greeting and the EHLO reply.
    pub greeting: Duration,
    /// Each command's reply (STARTTLS, AUTH, MAIL, RCPT, DATA, NOOP, RSET).
    pub command: Duration,
    /// Sending the message and the reply after the final ".".
    pub data: Duration,
}

impl Timeouts {
    /// One timeout for every wait, as `SMTP_TIMEOUT` and smtplib have it.
    pub fn uniform(t: Duration) -> Self {
        Self {
            connect: t,
            greeting: t,
            command: t,
            data: t,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            greeting: Duration::from_secs(30),
            command: Duration::from_secs(30),
            data: Duration::from_secs(120),
        }
    }
}

/// Backoff and circuit breaker of one relay.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSettings {
    /// First backoff after a failure; doubles with each consecutive failure.
    pub backoff_base: Duration,
    /// Backoff cap.
    pub backoff_max: Duration,
    /// Failures within `circuit_window` that open the circuit.
    pub circuit_failures: u32,
    /// The window those failures are counted over.
    pub circuit_window: Duration,
    /// How often a relay that is down is probed (connect, EHLO, NOOP, AUTH).
    pub probe_interval: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            circuit_failures: 5,
            circuit_window: Duration::from_secs(60),
            probe_interval: Duration::from_secs(15),
        }
    }
}

impl RelaySettings {
    /// A relay with default pool, timeouts and health settings.
    pub fn new(name: impl Into<String>, kind: RelayKind) -> Self {
        Self {
            name: name.into(),
            kind,
            priority: 0,
            weight: 1,
            from_email: None,
            return_path: None,
            pool: PoolSettings::default(),
            timeouts: Timeouts::default(),
            health: HealthSettings::default(),
            rate: Vec::new(),
        }
    }

    /// A plain-text SMTP relay at `host:port` with default settings.
    pub fn smtp(name: impl Into<String>, host: impl Into<String>, port: u16) -> Self {
        Self::new(
            name,
            RelayKind::Smtp(SmtpSettings {
                host: host.into(),
                port,
                tls: TlsMode::None,
                auth: None,
                hello_name: "localhost".into(),
                ca_pem: None,
                accept_invalid_certs: false,
                pipelining: true,
                recipients_per_transaction: None,
                dsn: None,
            }),
        )
    }

    /// Host and port, for status output; `None` for a file relay.
    pub fn endpoint(&self) -> Option<(&str, u16)> {
        match &self.kind {
            RelayKind::Smtp(s) => Some((s.host.as_str(), s.port)),
            RelayKind::File { .. } => None,
        }
    }
}
