//! One SMTP session, driven phase by phase: dial (TCP with TCP_NODELAY, TLS,
//! greeting, EHLO, AUTH), then MAIL, RCPT and DATA, each with its own timeout,
//! and every outcome classified by the phase it happened in (DESIGN.md rule 4).
//!
//! This module owns no state beyond one connection. Pooling, health and
//! failover belong to the relay and router actors.

use std::error::Error as _;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use lettre::Address;
use lettre::transport::smtp::authentication::{Credentials as LettreCredentials, Mechanism};
#[allow(deprecated)]
use lettre::transport::smtp::client::{AsyncNetworkStream, AsyncTokioStream};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail as MailCmd, Noop, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailParameter, RcptParameter};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::compat::FuturesAsyncReadCompatExt;

use crate::mail::{FailureClass, Mail, Progress, Rejected, Reply};
use crate::net::Unanswered;
use crate::settings::{AuthMethod, Credentials, SmtpSettings, Timeouts, TlsMode};
use crate::status::ServerLimits;

/// Why an attempt failed, with the reply that said so when there was one.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Failure {
    pub class: FailureClass,
    pub reply: Option<Reply>,
    pub detail: String,
    /// The session is in an unknown state (a wait timed out, the connection
    /// broke, or the server is reading message data): the connection must be
    /// dropped, not reset and reused.
    pub lost: bool,
    /// What the session settled for certain, recipient by recipient: for
    /// an `Unknown` failure in a transaction after the first of a message,
    /// what the transactions before it delivered; for a message each of
    /// whose recipients was refused, each refusal.
    pub certain: Option<Box<Delivered>>,
}

impl Failure {
    pub(crate) fn new(class: FailureClass, detail: impl Into<String>) -> Self {
        Failure {
            certain: None,
            class,
            reply: None,
            detail: detail.into(),
            lost: false,
        }
    }

    /// The same failure, with the session in an unknown state.
    pub(crate) fn lost(mut self) -> Self {
        self.lost = true;
        self
    }

    /// Whether the server said it is closing the connection (421, RFC 5321
    /// 3.8): whatever the command, the session is over.
    pub(crate) fn closing(&self) -> bool {
        self.reply.as_ref().is_some_and(|r| r.code == 421)
    }

    /// Classifies a lettre error from `phase`. A negative reply keeps its code
    /// and text; anything else is a broken connection, and so is a 421.
    fn from_lettre(err: &lettre::transport::smtp::Error, phase: Phase) -> Self {
        let reply = err.status().map(|code| Reply {
            code: u16::from(code),
            text: err.source().map(|s| s.to_string()).unwrap_or_default(),
        });
        let class = match (phase, &reply) {
            (Phase::Connect | Phase::Greeting | Phase::Tls | Phase::Auth, _) => {
                FailureClass::RelayFault
            }
            (Phase::AfterDot, None) => FailureClass::Unknown,
            (_, None) => FailureClass::RelayFault,
            (_, Some(r)) if r.code >= 500 => FailureClass::Permanent,
            (_, Some(_)) => FailureClass::Transient,
        };
        let detail = match &reply {
            Some(r) => format!("{} replied {} {}", phase, r.code, r.text),
            None => format!("{phase}: {err}"),
        };
        let mut failure = Failure {
            certain: None,
            class,
            lost: false,
            reply,
            detail,
        };
        failure.lost = failure.reply.is_none() || failure.closing();
        failure
    }

    fn timeout(phase: Phase, after: Duration) -> Self {
        Failure::new(
            Self::lost_in(phase),
            format!("{phase}: no reply within {after:?}"),
        )
        .lost()
    }

    /// The caller's deadline ran out while waiting in `phase`. Before the
    /// final "." the message was not sent; after it, it may have been.
    fn deadline(phase: Phase) -> Self {
        let class = match phase {
            Phase::AfterDot => FailureClass::Unknown,
            _ => FailureClass::Busy,
        };
        Failure::new(class, format!("{phase}: the caller's deadline passed")).lost()
    }

    /// The class of a connection lost in `phase`.
    fn lost_in(phase: Phase) -> FailureClass {
        if phase == Phase::AfterDot {
            FailureClass::Unknown
        } else {
            FailureClass::RelayFault
        }
    }
}

/// The phase of a session, for classification and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Connect,
    Greeting,
    Tls,
    Auth,
    Mail,
    Rcpt,
    Data,
    AfterDot,
    Noop,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Connect => "connect",
            Phase::Greeting => "greeting/EHLO",
            Phase::Tls => "TLS",
            Phase::Auth => "AUTH",
            Phase::Mail => "MAIL FROM",
            Phase::Rcpt => "RCPT TO",
            Phase::Data => "DATA",
            Phase::AfterDot => "end of data",
            Phase::Noop => "NOOP",
        })
    }
}

/// Runs `fut` for at most `limit`, and never past `deadline`.
async fn bounded<T>(
    phase: Phase,
    limit: Duration,
    deadline: Instant,
    fut: impl Future<Output = Result<T, lettre::transport::smtp::Error>>,
) -> Result<T, Failure> {
    let until = deadline.min(Instant::now() + limit);
    match tokio::time::timeout_at(until, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failure::from_lettre(&e, phase)),
        Err(_) if until == deadline => Err(Failure::deadline(phase)),
        Err(_) => Err(Failure::timeout(phase, limit)),
    }
}

/// `reply` as `phase` must have it. lettre takes any 2xx or 3xx reply as
/// a success; MAIL, RCPT and the end of the data need a 2xx, DATA a 354.
/// Any other means the server and mailmux no longer agree on where the
/// session is: the connection is dropped, and a message the server was
/// sent (after the final ".") may have been taken, so it is unknown.
fn in_step(
    phase: Phase,
    reply: Result<lettre::transport::smtp::response::Response, Failure>,
) -> Result<lettre::transport::smtp::response::Response, Failure> {
    let resp = reply?;
    let code = u16::from(resp.code());
    let (fits, due) = match phase {
        Phase::Data => (code == 354, "354"),
        _ => (code / 100 == 2, "2xx"),
    };
    if fits {
        return Ok(resp);
    }
    let text = resp.message().collect::<Vec<_>>().join(" ");
    let class = match phase {
        Phase::AfterDot => FailureClass::Unknown,
        _ => FailureClass::RelayFault,
    };
    Err(Failure {
        certain: None,
        class,
        detail: format!("{phase} replied {code} {text}, where a {due} reply was due"),
        reply: Some(Reply { code, text }),
        lost: true,
    })
}

/// An open, greeted, authenticated SMTP connection.
pub(crate) struct Conn {
    /// Boxed: lettre's connection is over a kilobyte, and a delivery task
    /// moves its `Conn` in and out of the pool for every message.
    inner: Box<AsyncSmtpConnection>,
    pub(crate) last_used: Instant,
    pub(crate) sent: u32,
    /// Implicit TLS runs under lettre, which then sees a plain stream.
    implicit_tls: bool,
    /// Set when the session is in an unknown state; the connection is then
    /// dropped, never reused.
    pub(crate) broken: bool,
    /// The server offers PIPELINING and the relay allows it: MAIL, RCPT and
    /// DATA go out in one write.
    pipelining: bool,
    /// The relay's `recipients_per_transaction`: RCPTs in one transaction at
    /// most. `None`: as many as the server takes.
    per_transaction: Option<NonZeroUsize>,
    /// The server announced SIZE (RFC 1870), with its limit in bytes; 0 is
    /// no fixed limit.
    size: Option<u64>,
    /// The limits the server announced with LIMITS (RFC 9422).
    limits: ServerLimits,
    /// What the relay asks of delivery status notifications, when the
    /// server announced DSN (RFC 3461); `None` otherwise.
    dsn: Option<Box<crate::settings::Dsn>>,
    /// The server announced DSN.
    offers_dsn: bool,
    /// MAIL commands sent on this session, for the announced MAILMAX.
    transactions: u32,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("sent", &self.sent)
            .field("broken", &self.broken)
            .field("pipelining", &self.pipelining)
            .field("per_transaction", &self.per_transaction)
            .field("size", &self.size)
            .field("limits", &self.limits)
            .field("transactions", &self.transactions)
            .finish_non_exhaustive()
    }
}

impl Conn {
    pub(crate) fn supports(&self, ext: Extension) -> bool {
        self.inner.server_info().supports_feature(ext)
    }

    pub(crate) fn is_encrypted(&self) -> bool {
        self.implicit_tls || self.inner.is_encrypted()
    }

    /// Whether the session has had as many transactions as the server's
    /// MAILMAX allows: it takes no more, and is not reused.
    pub(crate) fn spent(&self) -> bool {
        self.limits
            .mail
            .is_some_and(|max| self.transactions >= max.get())
    }

    /// How many of `to`, from the front, the next transaction names: at
    /// most the relay's `recipients_per_transaction` and the server's
    /// RCPTMAX, of at most its RCPTDOMAINMAX domains. At least one of a
    /// list that is not empty.
    fn take<'a>(&self, to: impl IntoIterator<Item = &'a Address>) -> usize {
        let most = [self.per_transaction, self.limits.rcpt]
            .into_iter()
            .flatten()
            .map(NonZeroUsize::get)
            .min()
            .unwrap_or(usize::MAX);
        let mut domains: Vec<&str> = Vec::new();
        let mut n = 0;
        for address in to.into_iter().take(most) {
            if let Some(max) = self.limits.rcpt_domains {
                let domain = address.domain();
                if !domains.iter().any(|d| d.eq_ignore_ascii_case(domain)) {
                    if domains.len() == max.get() {
                        break;
                    }
                    domains.push(domain);
                }
            }
            n += 1;
        }
        n
    }

    /// Why a message's recipients went in more than one transaction when
    /// no server refused one over its cap: the tightest of the limits
    /// [`Conn::take`] keeps to.
    /// With no limit at all, `take` names every recipient, so there is no
    /// split to explain.
    fn split(&self) -> Split {
        match self.per_transaction {
            Some(own)
                if self.limits.rcpt_domains.is_none()
                    && self.limits.rcpt.is_none_or(|announced| announced >= own) =>
            {
                Split::Limit(own.get())
            }
            _ => Split::Announced(self.limits),
        }
    }

    /// Ends the session politely, within `limit`.
    pub(crate) async fn quit(mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.inner.quit()).await;
    }
}

/// Opens a connection: TCP (TCP_NODELAY on), implicit TLS or STARTTLS as
/// configured, EHLO, AUTH. Every step is bounded by its timeout and the
/// deadline.
pub(crate) async fn dial(
    s: &SmtpSettings,
    t: &Timeouts,
    deadline: Instant,
) -> Result<Conn, Failure> {
    let tcp = bounded_io(
        Phase::Connect,
        t.connect,
        deadline,
        TcpStream::connect((s.host.as_str(), s.port)),
    )
    .await?;
    tcp.set_nodelay(true).map_err(|e| {
        Failure::new(
            FailureClass::RelayFault,
            format!("connect: TCP_NODELAY: {e}"),
        )
    })?;
    let hello = ClientId::Domain(s.hello_name.clone());
    // Below TLS, so that every byte counts.
    let tcp = Unanswered::new(tcp, MAX_UNANSWERED);

    let peer = tcp.get_ref().peer_addr().map_err(|e| {
        Failure::new(
            FailureClass::RelayFault,
            format!("connect: peer address: {e}"),
        )
    })?;
    let heard = Arc::new(Heard::default());
    let stream: Box<dyn AsyncTokioStream> = if s.tls == TlsMode::Implicit {
        let params = tls_parameters(s)?;
        #[allow(deprecated)]
        let mut net = AsyncNetworkStream::use_existing_tokio1(Box::new(tcp));
        bounded(Phase::Tls, t.connect, deadline, net.upgrade_tls(params)).await?;
        // Implicit TLS: the greeting comes after the handshake, and lettre
        // reads it through the TLS stream it set up over our socket.
        Box::new(Listening::new(net.compat(), peer, heard.clone()))
    } else {
        Box::new(Listening::new(tcp, peer, heard.clone()))
    };

    let mut inner = bounded(
        Phase::Greeting,
        t.greeting,
        deadline,
        AsyncSmtpConnection::connect_with_transport(stream, &hello),
    )
    .await?;
    // The greeting and the answer to lettre's EHLO, in clear text.
    let opening = heard.stop();

    let upgraded = match s.tls {
        TlsMode::Starttls | TlsMode::Opportunistic if inner.can_starttls() => {
            let params = tls_parameters(s)?;
            bounded(
                Phase::Tls,
                t.command,
                deadline,
                inner.starttls(params, &hello),
            )
            .await?;
            true
        }
        TlsMode::Starttls => {
            return Err(Failure::new(
                FailureClass::RelayFault,
                "TLS: the server does not offer STARTTLS and tls = \"starttls\" requires it",
            ));
        }
        _ => false,
    };

    // After STARTTLS lettre asked EHLO again inside TLS, below which the
    // bytes are not heard: ask once more there.
    let ehlo = match opening
        .as_deref()
        .and_then(ehlo_keywords)
        .filter(|_| !upgraded)
    {
        Some(found) => found,
        None => keywords(&mut inner, &hello, t, deadline).await?,
    };

    if let Some(creds) = &s.auth {
        let mechanisms: &[Mechanism] = match creds.method {
            AuthMethod::Xoauth2 => {
                xoauth2(&mut inner, creds, t, deadline).await?;
                &[]
            }
            AuthMethod::Plain => &[Mechanism::Plain],
            AuthMethod::Login => &[Mechanism::Login],
            AuthMethod::Auto => &[Mechanism::Plain, Mechanism::Login],
        };
        if !mechanisms.is_empty() {
            let lettre_creds =
                LettreCredentials::new(creds.username.clone(), creds.password.expose().to_owned());
            bounded(
                Phase::Auth,
                t.command,
                deadline,
                inner.auth(mechanisms, &lettre_creds),
            )
            .await?;
        }
    }

    Ok(Conn {
        inner: Box::new(inner),
        last_used: Instant::now(),
        sent: 0,
        implicit_tls: s.tls == TlsMode::Implicit,
        broken: false,
        pipelining: s.pipelining && ehlo.pipelining,
        per_transaction: s.recipients_per_transaction,
        size: ehlo.size,
        limits: ehlo.limits,
        dsn: s.dsn.clone().filter(|_| ehlo.dsn),
        offers_dsn: ehlo.dsn,
        transactions: 0,
    })
}

/// How a refusal for the server's announced SIZE begins: the router tells it
/// apart from a missing SMTPUTF8, the other `Unsupported`.
pub(crate) const OVER_SIZE: &str = "too large for this relay";

/// How a failure to get an OAuth2 access token begins (status output tells
/// it apart from a refusal by the server).
pub(crate) const TOKEN_FAILED: &str = "AUTH: cannot get an OAuth2 access token";

/// One line of an AUTH exchange. It holds a bearer token: never logged.
struct AuthLine(String);

impl fmt::Display for AuthLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\r\n", self.0)
    }
}

/// SASL XOAUTH2 with the relay's current access token. When the server
/// refuses it (535, or a 334 error challenge then 535), the token is
/// refreshed once and AUTH tried again on the same connection.
async fn xoauth2(
    inner: &mut AsyncSmtpConnection,
    creds: &Credentials,
    t: &Timeouts,
    deadline: Instant,
) -> Result<(), Failure> {
    use base64::Engine as _;
    let Some(source) = &creds.token else {
        return Err(Failure::new(
            FailureClass::RelayFault,
            format!("{TOKEN_FAILED}: no token source"),
        ));
    };
    let mut last = None;
    for fresh in [false, true] {
        let until = deadline.min(Instant::now() + t.connect);
        let token = match tokio::time::timeout_at(until, source.token(fresh)).await {
            Ok(Ok(token)) => token,
            Ok(Err(e)) => {
                return Err(Failure::new(
                    FailureClass::RelayFault,
                    format!("{TOKEN_FAILED} from {}: {e}", source.label()),
                ));
            }
            Err(_) => {
                return Err(Failure::new(
                    FailureClass::RelayFault,
                    format!(
                        "{TOKEN_FAILED} from {}: no answer within {:?}",
                        source.label(),
                        t.connect
                    ),
                ));
            }
        };
        let sasl = format!(
            "user={}\x01auth=Bearer {}\x01\x01",
            creds.username,
            token.expose()
        );
        let line = AuthLine(format!(
            "AUTH XOAUTH2 {}",
            base64::engine::general_purpose::STANDARD.encode(sasl)
        ));
        let reply = bounded(Phase::Auth, t.command, deadline, inner.command(line)).await;
        let refused = match reply {
            Ok(r) if r.has_code(334) => {
                // The error as a challenge: answer with an empty line, and
                // the server replies 535.
                match bounded(
                    Phase::Auth,
                    t.command,
                    deadline,
                    inner.command(AuthLine(String::new())),
                )
                .await
                {
                    Ok(_) => Failure::new(
                        FailureClass::RelayFault,
                        "AUTH: the server accepted an empty XOAUTH2 answer",
                    ),
                    Err(f) => f,
                }
            }
            Ok(_) => return Ok(()),
            Err(f) => f,
        };
        // Only a refusal is worth a fresh token; a lost connection is not.
        if refused.reply.is_none() {
            return Err(refused);
        }
        last = Some(refused);
    }
    Err(last.unwrap_or_else(|| Failure::new(FailureClass::RelayFault, "AUTH: refused")))
}

/// The EHLO keywords lettre does not keep.
struct Keywords {
    /// PIPELINING (RFC 2920).
    pipelining: bool,
    /// SIZE (RFC 1870) and its limit, 0 when it names none.
    size: Option<u64>,
    /// LIMITS (RFC 9422).
    limits: ServerLimits,
    /// DSN (RFC 3461).
    dsn: bool,
}

impl ServerLimits {
    /// From the parameters of a LIMITS keyword: `NAME=VALUE` pairs, the
    /// names in any case. Names mailmux does not know are ignored.
    fn of<'a>(params: impl Iterator<Item = &'a str>) -> ServerLimits {
        let mut found = ServerLimits::default();
        for param in params {
            let Some((name, value)) = param.split_once('=') else {
                continue;
            };
            if name.eq_ignore_ascii_case("MAILMAX") {
                found.mail = value.parse().ok();
            } else if name.eq_ignore_ascii_case("RCPTMAX") {
                found.rcpt = value.parse().ok();
            } else if name.eq_ignore_ascii_case("RCPTDOMAINMAX") {
                found.rcpt_domains = value.parse().ok();
            }
        }
        found
    }
}

/// The EHLO keywords of `opening`, the bytes a server sent while lettre
/// opened the connection: its greeting, then its answer to lettre's EHLO.
/// `None` unless those are two whole replies and the second is a 250.
fn ehlo_keywords(opening: &[u8]) -> Option<Keywords> {
    let text = std::str::from_utf8(opening).ok()?;
    let mut replies: Vec<Vec<&str>> = vec![Vec::new()];
    for line in text.split_terminator("\r\n") {
        let code = line
            .get(..3)
            .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))?;
        let last = match line.as_bytes().get(3) {
            None | Some(b' ') => true,
            Some(b'-') => false,
            Some(_) => return None,
        };
        let reply = replies.last_mut()?;
        if reply.first().is_some_and(|first| !first.starts_with(code)) {
            return None;
        }
        reply.push(line);
        if last {
            replies.push(Vec::new());
        }
    }
    // Every reply ended; the last entry is the empty one after them.
    let [_greeting, ehlo, rest] = replies.as_slice() else {
        return None;
    };
    if !rest.is_empty() || !ehlo.first()?.starts_with("250") {
        return None;
    }
    Some(Keywords::of(
        ehlo.iter().skip(1).map(|l| l.get(4..).unwrap_or("")),
    ))
}

/// The EHLO keywords that lettre does not keep (it keeps only those it
/// uses), read by asking once more: one round trip per connection. Only
/// where the answer to lettre's own EHLO was not heard ([`ehlo_keywords`]).
async fn keywords(
    inner: &mut AsyncSmtpConnection,
    hello: &ClientId,
    t: &Timeouts,
    deadline: Instant,
) -> Result<Keywords, Failure> {
    let reply = bounded(
        Phase::Greeting,
        t.greeting,
        deadline,
        inner.command(Ehlo::new(hello.clone())),
    )
    .await?;
    Ok(Keywords::of(reply.message().skip(1)))
}

impl Keywords {
    /// From the lines of an EHLO reply after its first (the server's name).
    fn of<'a>(lines: impl Iterator<Item = &'a str>) -> Keywords {
        let mut found = Keywords {
            pipelining: false,
            size: None,
            limits: ServerLimits::default(),
            dsn: false,
        };
        for line in lines {
            let mut words = line.split_whitespace();
            match words.next() {
                Some(k) if k.eq_ignore_ascii_case("PIPELINING") => found.pipelining = true,
                // A limit that is not a number is taken as none.
                Some(k) if k.eq_ignore_ascii_case("SIZE") => {
                    found.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0));
                }
                Some(k) if k.eq_ignore_ascii_case("LIMITS") => {
                    found.limits = ServerLimits::of(words)
                }
                Some(k) if k.eq_ignore_ascii_case("DSN") => found.dsn = true,
                _ => {}
            }
        }
        found
    }
}

/// What a connection's server sent while lettre opened it, kept until
/// [`Heard::stop`].
#[derive(Debug, Default)]
struct Heard {
    stopped: AtomicBool,
    bytes: Mutex<Vec<u8>>,
}

impl Heard {
    /// Stops keeping what is read; what was kept, unless it passed
    /// [`MAX_HEARD`] (then the keywords are asked for again).
    fn stop(&self) -> Option<Vec<u8>> {
        self.stopped.store(true, Ordering::Release);
        let bytes = std::mem::take(&mut *self.bytes.lock().unwrap_or_else(|e| e.into_inner()));
        (bytes.len() <= MAX_HEARD).then_some(bytes)
    }
}

/// The most of a greeting and an EHLO answer kept.
const MAX_HEARD: usize = 64 * 1024;

/// The stream lettre gets: our socket, or the TLS stream lettre set up
/// over it, handing what it reads to a [`Heard`] until that stops.
struct Listening<S> {
    inner: S,
    peer: SocketAddr,
    heard: Arc<Heard>,
}

impl<S> Listening<S> {
    fn new(inner: S, peer: SocketAddr, heard: Arc<Heard>) -> Self {
        Listening { inner, peer, heard }
    }
}

impl<S> fmt::Debug for Listening<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listening")
            .field("peer", &self.peer)
            .finish()
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Sync + Unpin> AsyncTokioStream for Listening<S> {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.peer)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Listening<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if !self.heard.stopped.load(Ordering::Acquire) {
            let mut kept = self.heard.bytes.lock().unwrap_or_else(|e| e.into_inner());
            if kept.len() <= MAX_HEARD {
                kept.extend_from_slice(&buf.filled()[before..]);
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Listening<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// MAIL, every RCPT and DATA, written at once to a server that offers
/// PIPELINING. lettre's `command` writes whatever its argument displays as,
/// then reads one reply: the MAIL reply. The others are read one by one.
struct Batch<'a> {
    mail: &'a MailCmd,
    rcpts: &'a [Rcpt],
}

impl fmt::Display for Batch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.mail)?;
        for rcpt in self.rcpts {
            write!(f, "{rcpt}")?;
        }
        write!(f, "{Data}")
    }
}

async fn bounded_io<T>(
    phase: Phase,
    limit: Duration,
    deadline: Instant,
    fut: impl Future<Output = io::Result<T>>,
) -> Result<T, Failure> {
    let until = deadline.min(Instant::now() + limit);
    match tokio::time::timeout_at(until, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failure::new(
            FailureClass::RelayFault,
            format!("{phase}: {e}"),
        )),
        Err(_) if until == deadline => Err(Failure::deadline(phase)),
        Err(_) => Err(Failure::timeout(phase, limit)),
    }
}

fn tls_parameters(s: &SmtpSettings) -> Result<TlsParameters, Failure> {
    let tls_err = |e: lettre::transport::smtp::Error| {
        Failure::new(FailureClass::RelayFault, format!("TLS: {e}"))
    };
    let mut b = TlsParameters::builder(s.host.clone());
    if let Some(pem) = &s.ca_pem {
        b = b.add_root_certificate(Certificate::from_pem(pem).map_err(tls_err)?);
    }
    if s.accept_invalid_certs {
        b = b.dangerous_accept_invalid_certs(true);
    }
    b.build().map_err(tls_err)
}

/// What a relay accepted.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Delivered {
    pub accepted: Vec<String>,
    pub rejected: Vec<Rejected>,
    /// Recipients that did not get the message, and may later: a 4xx to
    /// their RCPT or to their transaction, or a session lost before their
    /// transaction's final ".".
    pub deferred: Vec<Rejected>,
    pub reply: Reply,
    /// Why some recipients were not sent to, when that was not the server's
    /// refusal of each one: a transaction after the first, for the
    /// recipients over the server's cap, that failed.
    pub note: Option<String>,
}

impl Delivered {
    /// Each list in the order of `to`, the message's recipients, whatever
    /// order their transactions took them in.
    fn in_order_of(&mut self, to: &[Address]) {
        let rank: std::collections::HashMap<String, usize> = to
            .iter()
            .enumerate()
            .map(|(i, a)| (a.to_string(), i))
            .collect();
        let at = |address: &str| rank.get(address).copied().unwrap_or(usize::MAX);
        self.accepted.sort_by_key(|a| at(a));
        self.rejected.sort_by_key(|r| at(&r.address));
        self.deferred.sort_by_key(|r| at(&r.address));
    }
}

/// Sends one message over an open connection, phase by phase.
///
/// - MAIL 4xx, DATA 4xx, or a 4xx to every RCPT: transient, the session
///   is reset, and another relay may take the message.
/// - Some RCPT 5xx: those recipients are reported, the rest get the message.
/// - Some RCPT 4xx while others are accepted: those recipients are
///   deferred (a queue tries them again later), the rest get the message.
/// - Every RCPT 5xx, MAIL 5xx, DATA 5xx, 5xx after the dot: permanent.
/// - No reply after the final ".": unknown, and the connection is dropped.
/// - RCPT 452 after the server accepted other recipients in the same
///   transaction: the server's cap on recipients a transaction (RFC 5321
///   4.5.3.1.10). The accepted ones get the message, and the others go in
///   further transactions on the same connection, as many as it takes.
/// - With the relay's `recipients_per_transaction`, each transaction names
///   at most that many, and the rest go in further transactions the same
///   way. A transaction whose every recipient is refused with 5xx before any
///   was accepted commits nothing: the next one is the first.
///
/// Before the first final "." the message is committed in `progress`; if
/// the caller has given up by then, nothing is sent. The transactions after
/// it belong to a committed message: when one fails, its recipients are
/// reported refused and the message is never sent elsewhere.
pub(crate) async fn transact(
    conn: &mut Conn,
    from: Option<&Address>,
    mail: &Mail,
    t: &Timeouts,
    progress: &Progress,
) -> Result<Delivered, Failure> {
    let result = transact_inner(conn, from, mail, t, progress).await;
    conn.last_used = Instant::now();
    if let Err(f) = &result {
        settle_session(conn, f, t).await;
    }
    if conn.inner.has_broken() {
        conn.broken = true;
    }
    result
}

/// After a refusal, makes the connection reusable with RSET, or marks it
/// broken when the session's state is unknown.
async fn settle_session(conn: &mut Conn, f: &Failure, t: &Timeouts) {
    if f.lost || f.class == FailureClass::Unknown {
        conn.broken = true;
    } else {
        reset(conn, t).await;
    }
}

/// Ends the open transaction with RSET; a connection whose RSET fails is
/// broken.
async fn reset(conn: &mut Conn, t: &Timeouts) {
    if conn.broken {
        return;
    }
    let reset = tokio::time::timeout(t.command, conn.inner.command(Rset)).await;
    if !matches!(reset, Ok(Ok(_))) {
        conn.broken = true;
    }
}

async fn transact_inner(
    conn: &mut Conn,
    from: Option<&Address>,
    mail: &Mail,
    t: &Timeouts,
    progress: &Progress,
) -> Result<Delivered, Failure> {
    let deadline = mail.deadline;
    let mut params = Vec::new();
    if mail.needs_smtputf8() {
        if !conn.supports(Extension::SmtpUtfEight) {
            return Err(Failure::new(
                FailureClass::Unsupported,
                "the relay does not offer SMTPUTF8, which a non-ASCII address needs",
            ));
        }
        params.push(MailParameter::SmtpUtfEight);
    }
    let size = mail.bytes.len();
    if let Some(max) = conn.size {
        if max > 0 && size as u64 > max {
            return Err(Failure::new(
                FailureClass::Unsupported,
                format!(
                    "{OVER_SIZE}: the message is {size} bytes and the server takes at most {max} (SIZE)"
                ),
            ));
        }
        params.push(MailParameter::Size(size));
    }
    if !mail.bytes.is_ascii() && conn.supports(Extension::EightBitMime) {
        params.push(MailParameter::Body(
            lettre::transport::smtp::extension::MailBodyParameter::EightBitMime,
        ));
    }
    if let Some(dsn) = &conn.dsn {
        if let Some(ret) = &dsn.ret {
            params.push(MailParameter::Other {
                keyword: "RET".into(),
                value: Some(ret.clone()),
            });
        }
        // RFC 3461 caps ENVID at 100 characters; a longer Message-ID (one
        // from a caller's own domain, say) names none.
        if mail.message_id.len() <= 100 {
            params.push(MailParameter::Other {
                keyword: "ENVID".into(),
                value: Some(mail.message_id.clone()),
            });
        }
    }
    let mail_cmd = MailCmd::new(from.cloned(), params);
    // Until a transaction has a recipient accepted, nothing is committed: a
    // transaction whose every recipient was refused passes to the next.
    let grouped = conn
        .limits
        .rcpt_domains
        .and_then(|_| grouped_by_domain(&mail.to));
    let mut untried: &[Address] = grouped.as_deref().unwrap_or(&mail.to);
    let mut refused = Vec::new();
    let mut deferred = Vec::new();
    let first = loop {
        if conn.spent() {
            return Err(Failure::new(
                FailureClass::Transient,
                "the session had as many transactions as the server announced (LIMITS \
                 MAILMAX) before any recipient was accepted",
            ));
        }
        let (now, after) = untried.split_at(conn.take(untried));
        untried = after;
        let to: Vec<&Address> = now.iter().collect();
        let env = envelope(conn, &mail_cmd, &to, t, deadline).await?;
        refused.extend(env.rejected);
        deferred.extend(env.deferred);
        if !env.accepted.is_empty() {
            break Envelope {
                rejected: std::mem::take(&mut refused),
                deferred: std::mem::take(&mut deferred),
                ..env
            };
        }
        if untried.is_empty() {
            return Err(no_recipient_accepted(&refused, &deferred));
        }
        reset(conn, t).await;
        if conn.broken {
            return Err(Failure::new(
                FailureClass::RelayFault,
                "the session could not be reset after a transaction whose every \
                 recipient was refused, and other recipients were not tried yet",
            )
            .lost());
        }
    };

    // The server now reads message data: if the message does not go, only
    // dropping the connection ends that without a delivery.
    match progress.commit_marked().await {
        Ok(true) => {}
        Ok(false) => {
            return Err(Failure::new(
                FailureClass::Busy,
                "the caller's deadline passed before the message was sent",
            )
            .lost());
        }
        Err(e) => {
            return Err(Failure::new(
                FailureClass::Busy,
                format!("the queue could not record the delivery, so it was not sent: {e}"),
            )
            .lost());
        }
    }
    let reply = match content(conn, mail, t, deadline).await {
        Ok(reply) => reply,
        Err(f) => {
            if f.class == FailureClass::Transient {
                // A 4xx after the dot is a clear "not taken": another relay
                // may take it without risk of a duplicate.
                progress.release();
            }
            return Err(f);
        }
    };
    let split = if first.over_cap.is_empty() {
        conn.split()
    } else {
        Split::ServerCap(first.accepted.len())
    };
    let left = first
        .over_cap
        .into_iter()
        .map(|(a, reply)| (a, Some(reply)))
        .chain(untried.iter().map(|a| (a.clone(), None)))
        .collect();
    let mut delivered = Delivered {
        accepted: first.accepted,
        rejected: first.rejected,
        deferred: first.deferred,
        reply,
        note: None,
    };
    further_transactions(conn, &mail_cmd, mail, t, &mut delivered, left, split).await?;
    if grouped.is_some() {
        delivered.in_order_of(&mail.to);
    }
    Ok(delivered)
}

/// `to` grouped by domain (without case), each domain's recipients in the
/// order given and the domains in the order each first appears, so that a
/// server's RCPTDOMAINMAX costs the fewest transactions: `a@x, b@y, c@x`
/// under a limit of one domain go in two, not three. `None` when `to` is
/// grouped already.
fn grouped_by_domain(to: &[Address]) -> Option<Vec<Address>> {
    let mut domains: Vec<String> = Vec::new();
    let mut keyed: Vec<(usize, &Address)> = Vec::with_capacity(to.len());
    for address in to {
        let domain = address.domain().to_ascii_lowercase();
        let i = match domains.iter().position(|d| *d == domain) {
            Some(i) => i,
            None => {
                domains.push(domain);
                domains.len() - 1
            }
        };
        keyed.push((i, address));
    }
    if keyed.is_sorted_by_key(|(i, _)| *i) {
        return None;
    }
    keyed.sort_by_key(|(i, _)| *i);
    Some(keyed.into_iter().map(|(_, a)| a.clone()).collect())
}

/// The DSN parameters of one recipient (RFC 3461): `NOTIFY` as the relay
/// asks, and `ORCPT`, the recipient as given: `rfc822;` for an ASCII
/// address, `utf-8;` and [`utf8_addr_xtext`] for a UTF-8 one (RFC 6533).
fn rcpt_params(dsn: Option<&crate::settings::Dsn>, to: &Address) -> Vec<RcptParameter> {
    let Some(dsn) = dsn else {
        return Vec::new();
    };
    let mut params = Vec::with_capacity(2);
    if let Some(notify) = &dsn.notify {
        params.push(RcptParameter::Other {
            keyword: "NOTIFY".into(),
            value: Some(notify.clone()),
        });
    }
    let address: &str = to.as_ref();
    let orcpt = if address.is_ascii() {
        format!("rfc822;{address}")
    } else {
        format!("utf-8;{}", utf8_addr_xtext(address))
    };
    params.push(RcptParameter::Other {
        keyword: "ORCPT".into(),
        value: Some(orcpt),
    });
    params
}

/// `address` in RFC 6533's `utf-8-addr-xtext`: printable ASCII but `+`,
/// `=` and `\` as itself, and every other character as `\x{HEX}` of its
/// code point, upper case, as Postfix writes it. The result is ASCII and
/// holds no `+` or `=`, so the xtext encoding of `ORCPT` leaves it as it is.
fn utf8_addr_xtext(address: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(address.len() * 2);
    for c in address.chars() {
        if c.is_ascii_graphic() && !matches!(c, '+' | '=' | '\\') {
            out.push(c);
        } else {
            let _ = write!(out, "\\x{{{:02X}}}", u32::from(c));
        }
    }
    out
}

/// Why a message's recipients went in more than one transaction.
#[derive(Debug, Clone, Copy)]
enum Split {
    /// The server refused the recipients past this many over its cap.
    ServerCap(usize),
    /// The relay's `recipients_per_transaction`.
    Limit(usize),
    /// The limits the server announced with LIMITS (RFC 9422).
    Announced(ServerLimits),
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Split::ServerCap(n) => {
                write!(f, "the server took at most {n} recipients a transaction")
            }
            Split::Limit(n) => write!(
                f,
                "the relay sends at most {n} recipients a transaction (recipients_per_transaction)"
            ),
            Split::Announced(limits) => {
                f.write_str("the server announced LIMITS")?;
                if let Some(n) = limits.rcpt {
                    write!(f, " RCPTMAX={n}")?;
                }
                if let Some(n) = limits.rcpt_domains {
                    write!(f, " RCPTDOMAINMAX={n}")?;
                }
                Ok(())
            }
        }
    }
}

/// The transactions after the first, on the same session, for the
/// recipients it did not name (`left`, each with its 452 when the server
/// refused it over its cap), added to `delivered`. Each names at most the
/// connection's `per_transaction`. The message is committed to this relay:
/// a transaction that fails reports its recipients and every one after them
/// deferred, or refused when its reply was a 5xx (and `delivered.note` says
/// why), and one lost after its "." makes the whole message unknown.
async fn further_transactions(
    conn: &mut Conn,
    mail_cmd: &MailCmd,
    mail: &Mail,
    t: &Timeouts,
    delivered: &mut Delivered,
    mut left: Vec<(Address, Option<Reply>)>,
    split: Split,
) -> Result<(), Failure> {
    let deadline = mail.deadline;
    // Each transaction takes at least one recipient off `left`: it is
    // accepted, refused, or over the server's cap, which a refusal is only
    // after an accepted one. So the loop ends.
    while !left.is_empty() {
        let after = left.split_off(conn.take(left.iter().map(|(a, _)| a)));
        let to: Vec<&Address> = left.iter().map(|(a, _)| a).collect();
        let next = if conn.spent() {
            Err(Failure::new(
                FailureClass::Transient,
                "the session had as many transactions as the server announced (LIMITS MAILMAX)",
            ))
        } else {
            envelope(conn, mail_cmd, &to, t, deadline).await
        };
        let stopped = match next {
            // Every recipient of this transaction refused or deferred, each
            // with its own reply: nothing to send them.
            Ok(next) if next.accepted.is_empty() => {
                delivered.rejected.extend(next.rejected);
                delivered.deferred.extend(next.deferred);
                left = after;
                reset(conn, t).await;
                if conn.broken && !left.is_empty() {
                    Failure::new(
                        FailureClass::RelayFault,
                        "the session could not be reset after a transaction whose every \
                         recipient was refused",
                    )
                } else {
                    continue;
                }
            }
            Ok(next) => match content(conn, mail, t, deadline).await {
                Ok(reply) => {
                    delivered.accepted.extend(next.accepted);
                    delivered.rejected.extend(next.rejected);
                    delivered.deferred.extend(next.deferred);
                    delivered.reply = reply;
                    left = next
                        .over_cap
                        .into_iter()
                        .map(|(a, r)| (a, Some(r)))
                        .collect();
                    left.extend(after);
                    continue;
                }
                Err(
                    ref f @ Failure {
                        reply: Some(ref reply),
                        class: FailureClass::Transient | FailureClass::Permanent,
                        ..
                    },
                ) => {
                    // This transaction's recipients were refused (5xx) or
                    // deferred (4xx) with the reply to its "."; those over
                    // the cap again never went.
                    delivered.rejected.extend(next.rejected);
                    delivered.deferred.extend(next.deferred);
                    let took = next.accepted.into_iter().map(|address| Rejected {
                        address,
                        reply: reply.clone(),
                    });
                    if f.class == FailureClass::Permanent {
                        delivered.rejected.extend(took);
                    } else {
                        delivered.deferred.extend(took);
                    }
                    delivered
                        .deferred
                        .extend(next.over_cap.into_iter().map(|(a, reply)| Rejected {
                            address: a.to_string(),
                            reply: deferred_reply(Some(reply), &f.detail),
                        }));
                    left = after;
                    f.clone()
                }
                // No refusal of its ".": its recipients may have it.
                Err(f) => {
                    return Err(Failure {
                        certain: Some(Box::new(delivered.clone())),
                        class: FailureClass::Unknown,
                        lost: true,
                        detail: format!(
                            "{} of {} recipients had the message; in the transaction \
                             for {} more ({split}): {}",
                            delivered.accepted.len(),
                            mail.to.len(),
                            to.len(),
                            f.detail
                        ),
                        ..f
                    });
                }
            },
            Err(f) => {
                left.extend(after);
                f
            }
        };
        // The recipients not sent to yet did not get the message: refused
        // with the 5xx that ended the transaction, or else deferred with
        // its 4xx, or their own 452, or (a connection lost, say) as RFC 5321
        // 3.8 says to take a lost connection: a 451.
        let permanent = stopped.class == FailureClass::Permanent && stopped.reply.is_some();
        for (address, own) in std::mem::take(&mut left) {
            let not = Rejected {
                address: address.to_string(),
                reply: match &stopped.reply {
                    Some(reply) => reply.clone(),
                    None => deferred_reply(own, &stopped.detail),
                },
            };
            if permanent {
                delivered.rejected.push(not);
            } else {
                delivered.deferred.push(not);
            }
        }
        delivered.note = Some(format!(
            "{split}, and the transaction for the rest failed: {}",
            stopped.detail
        ));
        settle_session(conn, &stopped, t).await;
    }
    Ok(())
}

/// The reply a recipient is deferred with when its transaction never came:
/// its own reply over the server's cap when that was a 4xx (a 452), else a
/// 451 saying `why`, as RFC 5321 (3.8) says to take a lost connection. A
/// cap's 552 or 550 5.5.3 refused no recipient for good, so a deferred one
/// does not carry it.
fn deferred_reply(own: Option<Reply>, why: &str) -> Reply {
    match own {
        Some(own) if own.code < 500 => own,
        _ => Reply {
            code: 451,
            text: why.to_string(),
        },
    }
}

/// What one transaction's envelope got.
struct Envelope {
    accepted: Vec<String>,
    rejected: Vec<Rejected>,
    /// Recipients answered with a 4xx (other than the cap), with that reply.
    deferred: Vec<Rejected>,
    /// Recipients refused with 452 after the server accepted others in the
    /// same transaction, with that reply: they go in the next one.
    over_cap: Vec<(Address, Reply)>,
}

/// MAIL, RCPT for each of `to` and DATA, pipelined when the server offers
/// it; `Ok` once the server said 354 and reads message data, or with no
/// recipient accepted and no data phase open when each one was refused or
/// deferred for itself (the transaction is still open: RSET ends it).
///
/// A 5xx to a RCPT refuses that recipient alone, and a 4xx defers it
/// alone: the others still get the message. Whether a message none of
/// whose recipients was accepted goes to another relay is the caller's to
/// decide.
///
/// With PIPELINING every reply still comes back in order and is classified
/// by its own phase. A refusal does not stop the reading: the replies to
/// the commands already sent are read too, so that the session stays in
/// step and can be reset and reused.
async fn envelope(
    conn: &mut Conn,
    mail_cmd: &MailCmd,
    to: &[&Address],
    t: &Timeouts,
    deadline: Instant,
) -> Result<Envelope, Failure> {
    let rcpts: Vec<Rcpt> = to
        .iter()
        .map(|a| Rcpt::new((*a).clone(), rcpt_params(conn.dsn.as_deref(), a)))
        .collect();
    let pipelined = conn.pipelining;
    conn.transactions = conn.transactions.saturating_add(1);
    let sent = if pipelined {
        let batch = Batch {
            mail: mail_cmd,
            rcpts: &rcpts,
        };
        bounded(Phase::Mail, t.command, deadline, conn.inner.command(batch)).await
    } else {
        bounded(
            Phase::Mail,
            t.command,
            deadline,
            conn.inner.command(mail_cmd),
        )
        .await
    };
    let sent = in_step(Phase::Mail, sent);
    // The first refusal that fails the whole transaction.
    let mut refusal = match sent {
        Ok(_) => None,
        Err(f) if f.lost || !pipelined => return Err(f),
        Err(f) => Some(f),
    };

    let mut accepted = Vec::with_capacity(to.len());
    let mut rejected = Vec::new();
    let mut deferred = Vec::new();
    let mut over_cap = Vec::new();
    for (rcpt, cmd) in to.iter().zip(rcpts) {
        let reply = if pipelined {
            bounded(Phase::Rcpt, t.command, deadline, conn.inner.read_response()).await
        } else {
            bounded(Phase::Rcpt, t.command, deadline, conn.inner.command(cmd)).await
        };
        let reply = in_step(Phase::Rcpt, reply);
        match reply {
            Err(f) if f.lost => return Err(lost_after(refusal, f)),
            // Replies to commands sent after a refusal change nothing.
            _ if refusal.is_some() => {}
            Ok(_) => accepted.push(rcpt.to_string()),
            Err(Failure {
                reply: Some(reply), ..
            }) if is_cap(&reply) && !accepted.is_empty() => {
                over_cap.push(((*rcpt).clone(), reply));
            }
            Err(Failure {
                reply: Some(reply),
                class,
                ..
            }) => {
                let one = Rejected {
                    address: rcpt.to_string(),
                    reply,
                };
                if class == FailureClass::Permanent {
                    rejected.push(one);
                } else {
                    deferred.push(one);
                }
            }
            Err(f) if pipelined => refusal = Some(f),
            Err(f) => return Err(f),
        }
    }
    if refusal.is_none() && accepted.is_empty() {
        // Each recipient refused for itself: no data to send. A pipelined
        // DATA is answered too (a refusal, as no recipient was taken); a
        // server that says 354 anyway now reads data, and only dropping
        // the connection ends that.
        if pipelined {
            let data = bounded(Phase::Data, t.command, deadline, conn.inner.read_response()).await;
            if !matches!(in_step(Phase::Data, data), Err(d) if !d.lost) {
                conn.broken = true;
            }
        }
        return Ok(Envelope {
            accepted,
            rejected,
            deferred,
            over_cap,
        });
    }

    let data = if pipelined {
        bounded(Phase::Data, t.command, deadline, conn.inner.read_response()).await
    } else {
        bounded(Phase::Data, t.command, deadline, conn.inner.command(Data)).await
    };
    let data = in_step(Phase::Data, data);
    match (data, refusal) {
        (Ok(_), None) => Ok(Envelope {
            accepted,
            rejected,
            deferred,
            over_cap,
        }),
        // The server said 354 although the message cannot go: it now reads
        // message data, and only dropping the connection ends that without
        // a delivery.
        (Ok(_), Some(f)) => Err(f.lost()),
        (Err(d), Some(f)) if d.lost => Err(f.lost()),
        (Err(_), Some(f)) => Err(f),
        (Err(d), None) => Err(d),
    }
}

/// The message data and its final ".", and the server's reply to it.
async fn content(
    conn: &mut Conn,
    mail: &Mail,
    t: &Timeouts,
    deadline: Instant,
) -> Result<Reply, Failure> {
    let sent = match std::str::from_utf8(&mail.bytes) {
        Ok(text) => {
            let content = Content(text);
            bounded(
                Phase::AfterDot,
                t.data,
                deadline,
                conn.inner.command(content),
            )
            .await
        }
        // lettre's own writer takes bytes, in two writes.
        Err(_) => {
            let content = conn.inner.message(&mail.bytes);
            bounded(Phase::AfterDot, t.data, deadline, content).await
        }
    };
    let resp = in_step(Phase::AfterDot, sent)?;
    conn.sent += 1;
    Ok(Reply {
        code: u16::from(resp.code()),
        text: resp.message().collect::<Vec<_>>().join(" "),
    })
}

/// A message as DATA content: dot-stuffed, then the final ".", for one write
/// through lettre's `command` (its `message` writes the content and the final
/// "." apart, two segments and two wake-ups at the server). A "." that starts
/// a line gets a second one, as RFC 5321 says; a line here starts after any
/// LF, so a bare LF (which lettre does not stuff after) cannot end the data
/// early at a server that takes it for a line end.
struct Content<'a>(&'a str);

impl fmt::Display for Content<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0;
        if text.starts_with('.') {
            f.write_str(".")?;
        }
        let mut start = 0;
        // Each LF followed by a "." (the pattern cannot overlap itself).
        for at in memchr::memmem::find_iter(text.as_bytes(), b"\n.") {
            // Up to and including the ".", then the stuffed one.
            f.write_str(&text[start..at + 2])?;
            f.write_str(".")?;
            start = at + 2;
        }
        f.write_str(&text[start..])?;
        // The CRLF before the final "." ends the last line (RFC 5321
        // 4.1.1.4): a message that ends with one gets no second, so the
        // server stores exactly the bytes composed.
        if text.ends_with("\r\n") {
            f.write_str(".\r\n")
        } else {
            f.write_str("\r\n.\r\n")
        }
    }
}

/// Whether a RCPT's refusal is the server's cap on recipients a
/// transaction, which asks for the rest in another transaction:
/// - 452 with the enhanced code 4.5.3 (RFC 3463) or none (RFC 5321,
///   4.5.3.1.10);
/// - 552 with 5.5.3 or none: RFC 821 gave 552 for it, and RFC 5321 asks
///   clients to take that 552 as the transient 452;
/// - any other 4xx or 5xx with the enhanced code X.5.3, "too many
///   recipients", which RFC 3463 says should split the message.
///
/// A 452 or 552 with another enhanced code says something of the recipient
/// or of the server (4.2.2 mailbox full, 4.3.1 out of storage, 5.2.2 over
/// quota).
fn is_cap(reply: &Reply) -> bool {
    let first = reply.text.split_whitespace().next().unwrap_or("");
    let parts: Vec<&str> = first.split('.').collect();
    let enhanced = parts.len() == 3
        && parts
            .iter()
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()));
    if !enhanced {
        return matches!(reply.code, 452 | 552);
    }
    let class = reply.code / 100;
    (class == 4 || class == 5) && parts[0] == class.to_string() && parts[1..] == ["5", "3"]
}

/// The failure of a message none of whose recipients was accepted: with
/// any deferred (4xx), transient, so that another relay may take it whole;
/// with each refused (5xx), permanent.
fn no_recipient_accepted(rejected: &[Rejected], deferred: &[Rejected]) -> Failure {
    let Some(first) = deferred.first() else {
        return every_recipient_refused(rejected);
    };
    Failure {
        certain: None,
        lost: false,
        class: FailureClass::Transient,
        detail: format!(
            "no recipient was accepted; {} of {} were deferred: {} {}",
            deferred.len(),
            deferred.len() + rejected.len(),
            first.reply.code,
            first.reply.text
        ),
        reply: Some(first.reply.clone()),
    }
}

/// The failure of a message each of whose recipients was refused, with
/// each one's refusal (a recipient unknown to the server and one refused
/// for a policy of its own differ).
fn every_recipient_refused(rejected: &[Rejected]) -> Failure {
    let first = rejected.first().map(|r| r.reply.clone());
    Failure {
        certain: first.clone().map(|reply| {
            Box::new(Delivered {
                accepted: Vec::new(),
                rejected: rejected.to_vec(),
                deferred: Vec::new(),
                reply,
                note: None,
            })
        }),
        lost: false,
        class: FailureClass::Permanent,
        detail: format!(
            "every recipient was refused{}",
            first
                .as_ref()
                .map(|r| format!(": {} {}", r.code, r.text))
                .unwrap_or_default()
        ),
        reply: first,
    }
}

/// The connection broke (`lost`) while the replies to a pipelined batch were
/// read. An earlier refusal still says why the message failed.
fn lost_after(refusal: Option<Failure>, lost: Failure) -> Failure {
    match refusal {
        Some(f) => f.lost(),
        None => lost,
    }
}

/// What a probe found.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Probed {
    pub tls: bool,
    pub latency: Duration,
    /// MAIL, RCPT and DATA go out in one write (offered and allowed).
    pub pipelining: bool,
    /// The SIZE the server announced, when it named a limit.
    pub size_limit: Option<u64>,
    /// The limits it announced with LIMITS.
    pub limits: ServerLimits,
    /// It announced DSN (RFC 3461).
    pub dsn: bool,
}

/// Connect, TLS, EHLO, AUTH (if configured), NOOP, QUIT.
pub(crate) async fn probe(s: &SmtpSettings, t: &Timeouts) -> Result<Probed, Failure> {
    let started = Instant::now();
    let deadline = started + t.connect + t.greeting + t.command * 3;
    let mut conn = dial(s, t, deadline).await?;
    bounded(Phase::Noop, t.command, deadline, conn.inner.command(Noop)).await?;
    let probed = Probed {
        tls: conn.is_encrypted(),
        latency: started.elapsed(),
        pipelining: conn.pipelining,
        size_limit: conn.size.filter(|&n| n > 0),
        limits: conn.limits,
        dsn: conn.offers_dsn,
    };
    conn.quit(t.command).await;
    Ok(probed)
}

/// The most an SMTP server may send between two writes of ours. A reply is
/// a few hundred bytes (lettre refuses one past 100,000), a pipelined round
/// a few replies, and a TLS handshake's flight some kilobytes. lettre reads
/// a reply's line whole before it checks its length, so without this bound
/// a server (or anyone in the path of a plaintext greeting before STARTTLS)
/// that never ends a line would be held in memory until the phase's
/// timeout: 2 GB in 10 s over loopback.
const MAX_UNANSWERED: usize = 1 << 20;

impl AsyncTokioStream for Unanswered<TcpStream> {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.get_ref().peer_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::{Content, ehlo_keywords, utf8_addr_xtext};

    #[test]
    fn a_utf8_orcpt_is_ascii_with_its_characters_escaped() {
        assert_eq!(
            utf8_addr_xtext("用户+x=y\\@例子.example"),
            "\\x{7528}\\x{6237}\\x{2B}x\\x{3D}y\\x{5C}@\\x{4F8B}\\x{5B50}.example"
        );
        assert_eq!(utf8_addr_xtext("josé@b.example"), "jos\\x{E9}@b.example");
    }

    #[test]
    fn the_ehlo_keywords_come_from_the_second_whole_reply_heard_or_not_at_all() {
        let k = ehlo_keywords(
            b"220-mx.example ESMTP\r\n220 no UCE\r\n250-mx.example\r\n250-pipelining\r\n250-SIZE 35882577\r\n250 8BITMIME\r\n",
        )
        .expect("two whole replies");
        assert!(k.pipelining);
        assert_eq!(k.size, Some(35_882_577));
        let k = ehlo_keywords(b"220 mx\r\n250-mx\r\n250 SIZE\r\n").expect("whole");
        assert!(!k.pipelining);
        assert_eq!(k.size, Some(0), "SIZE without a limit");
        for opening in [
            &b""[..],
            b"220 mx\r\n",
            b"220 mx\r\n250-mx\r\n250-PIPELINING\r\n",
            b"220 mx\r\n250-mx\n250 PIPELINING\n",
            b"220 mx\r\n501 syntax\r\n",
            b"220 mx\r\n250-mx\r\n251 PIPELINING\r\n",
            b"220 mx\r\n250 mx\r\n250 more\r\n",
            b"220 mx\r\n250 mx\r\n\xff\r\n",
            b"220 mx\r\n25",
        ] {
            assert!(
                ehlo_keywords(opening).is_none(),
                "{}",
                String::from_utf8_lossy(opening)
            );
        }
    }

    fn stuffed(text: &str) -> String {
        Content(text).to_string()
    }

    #[test]
    fn a_dot_that_starts_a_line_is_doubled_and_the_data_ends_with_a_dot_line() {
        assert_eq!(stuffed("Hello"), "Hello\r\n.\r\n");
        assert_eq!(stuffed(".x"), "..x\r\n.\r\n");
        assert_eq!(stuffed("a\r\n.\r\nb"), "a\r\n..\r\nb\r\n.\r\n");
        assert_eq!(stuffed("a\r\n..b\r\n.c"), "a\r\n...b\r\n..c\r\n.\r\n");
        assert_eq!(stuffed("a.\r\nb.c\r\n"), "a.\r\nb.c\r\n.\r\n");
        assert_eq!(stuffed("a\r\n\r\n"), "a\r\n\r\n.\r\n");
        assert_eq!(stuffed(""), "\r\n.\r\n");
        // A bare LF starts a line too; dots on lines one after another.
        assert_eq!(stuffed("a\n.b"), "a\n..b\r\n.\r\n");
        assert_eq!(stuffed("\n.\n.\r\n."), "\n..\n..\r\n..\r\n.\r\n");
    }

    #[test]
    fn a_452_552_or_x_5_3_is_the_recipient_cap_unless_its_enhanced_code_says_otherwise() {
        let reply = |code, text: &str| crate::mail::Reply {
            code,
            text: text.into(),
        };
        assert!(super::is_cap(&reply(
            452,
            "4.5.3 Error: too many recipients"
        )));
        assert!(super::is_cap(&reply(452, "Too many recipients")));
        assert!(super::is_cap(&reply(452, "")));
        assert!(!super::is_cap(&reply(452, "4.2.2 Mailbox full")));
        assert!(!super::is_cap(&reply(
            452,
            "4.3.1 Insufficient system storage"
        )));
        // RFC 821's 552, which RFC 5321 asks clients to take as the 452.
        assert!(super::is_cap(&reply(552, "Too many recipients")));
        assert!(super::is_cap(&reply(552, "5.5.3 Too many recipients")));
        assert!(!super::is_cap(&reply(552, "5.2.2 Mailbox full")));
        // X.5.3 is "too many recipients" whatever the basic code.
        assert!(super::is_cap(&reply(451, "4.5.3 too many recipients")));
        assert!(super::is_cap(&reply(550, "5.5.3 Too many recipients")));
        assert!(super::is_cap(&reply(554, "5.5.3 Too many recipients")));
        // No enhanced code: only 452 and 552 say it.
        assert!(!super::is_cap(&reply(550, "Too many recipients")));
        assert!(!super::is_cap(&reply(451, "Too many recipients")));
        // An enhanced code of the other class is no enhanced code of this
        // reply's.
        assert!(!super::is_cap(&reply(550, "4.5.3 too many recipients")));
        assert!(!super::is_cap(&reply(550, "5.5.30 too many")));
    }

    #[test]
    fn limits_are_read_from_the_ehlo_reply() {
        let k = ehlo_keywords(
            b"220 mx\r\n250-mx\r\n250-PIPELINING\r\n250-LIMITS MAILMAX=3 rcptmax=50 RCPTDOMAINMAX=1 BDATMAX=9\r\n250 8BITMIME\r\n",
        )
        .expect("whole");
        assert_eq!(k.limits.mail.map(|n| n.get()), Some(3));
        assert_eq!(k.limits.rcpt.map(|n| n.get()), Some(50));
        assert_eq!(k.limits.rcpt_domains.map(|n| n.get()), Some(1));
        // Values that are not positive numbers are no limit.
        let k =
            ehlo_keywords(b"220 mx\r\n250-mx\r\n250 LIMITS MAILMAX=0 RCPTMAX=x RCPTDOMAINMAX\r\n")
                .expect("whole");
        assert_eq!(k.limits, super::ServerLimits::default());
        let k = ehlo_keywords(b"220 mx\r\n250-mx\r\n250 PIPELINING\r\n").expect("whole");
        assert_eq!(k.limits, super::ServerLimits::default());
    }

    #[test]
    fn a_dot_after_a_bare_lf_is_doubled_too() {
        assert_eq!(stuffed("a\n.\nb"), "a\n..\nb\r\n.\r\n");
        assert_eq!(stuffed("\n.\n."), "\n..\n..\r\n.\r\n");
    }
}
