//! Read-only views of the dispatcher for status output, probes and reloads.
//! They hold no secret: a status snapshot may be shown to anyone.

use std::time::Duration;

use crate::mail::FailureClass;
use crate::settings::Strategy;

/// The health state of one relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayState {
    /// Takes traffic.
    Healthy,
    /// Skipped until `retry_in` has passed, then probed or tried again.
    BackingOff { retry_in: Duration },
    /// Too many failures in the window; skipped until a probe succeeds.
    CircuitOpen { retry_in: Duration },
    /// Out of service: its actor crashed past the restart limit, or it was
    /// removed and is draining.
    Disabled,
}

impl RelayState {
    pub fn as_str(&self) -> &'static str {
        match self {
            RelayState::Healthy => "healthy",
            RelayState::BackingOff { .. } => "backing_off",
            RelayState::CircuitOpen { .. } => "circuit_open",
            RelayState::Disabled => "disabled",
        }
    }

    /// Time until the relay is tried again, when it is not healthy.
    pub fn retry_in(&self) -> Option<Duration> {
        match self {
            RelayState::BackingOff { retry_in } | RelayState::CircuitOpen { retry_in } => {
                Some(*retry_in)
            }
            _ => None,
        }
    }
}

/// Delivery counters of one relay since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub sent: u64,
    pub partial: u64,
    pub relay_fault: u64,
    pub transient: u64,
    pub permanent: u64,
    pub unknown: u64,
    pub busy: u64,
    /// Messages this relay could not take that went on to another relay.
    pub failovers_out: u64,
}

impl Counters {
    pub(crate) fn count_failure(&mut self, class: FailureClass) {
        match class {
            FailureClass::RelayFault => self.relay_fault += 1,
            FailureClass::Transient => self.transient += 1,
            FailureClass::Permanent => self.permanent += 1,
            FailureClass::Unknown => self.unknown += 1,
            FailureClass::Busy | FailureClass::Unsupported => self.busy += 1,
        }
    }
}

/// Latency percentiles of completed deliveries (connection wait included).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Latency {
    pub count: u64,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
}

/// One relay, as status output shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayStatus {
    pub name: String,
    /// "smtp" or "file".
    pub kind: &'static str,
    pub host: Option<String>,
    pub port: Option<u16>,
    /// "none", "opportunistic", "starttls", "implicit"; `None` for a file relay.
    pub tls: Option<&'static str>,
    /// The folder of a file relay.
    pub dir: Option<String>,
    pub priority: i32,
    pub weight: u32,
    pub state: RelayState,
    pub consecutive_failures: u32,
    /// Times in a row the relay passed a probe and then failed a delivery.
    pub relapses: u32,
    pub in_flight: usize,
    /// Open connections, idle or busy.
    pub connections: usize,
    pub counters: Counters,
    pub latency: Latency,
    /// How often the relay's actor was restarted after a crash.
    pub restarts: u32,
    /// The last failure, in words.
    pub last_error: Option<String>,
}

/// The whole dispatcher.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub strategy: Strategy,
    pub pinned: Option<String>,
    pub relays: Vec<RelayStatus>,
    /// Messages accepted and not yet finished, across all relays.
    pub in_flight: usize,
    /// How often the router's actor was restarted after a crash.
    pub router_restarts: u32,
}

/// The current selection, as `switch_smtp_server` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub pinned: Option<String>,
    /// The relay the next message would go to, if any is available.
    pub next: Option<String>,
    pub strategy: Strategy,
}

/// The limits of LIMITS (RFC 9422) that mailmux keeps to. Each is `None`
/// when the server did not announce it, or gave a value that is not a
/// positive number, which is taken as no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerLimits {
    /// MAILMAX: transactions a session.
    pub mail: Option<std::num::NonZeroU32>,
    /// RCPTMAX: recipients a transaction.
    pub rcpt: Option<std::num::NonZeroUsize>,
    /// RCPTDOMAINMAX: recipient domains a transaction.
    pub rcpt_domains: Option<std::num::NonZeroUsize>,
}

/// The result of probing one relay: connect, TLS, EHLO, AUTH, NOOP.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeReport {
    pub relay: String,
    pub reachable: bool,
    /// Whether the session ended up encrypted.
    pub tls: bool,
    /// `Some(true)` when AUTH succeeded, `None` when no AUTH is configured.
    pub auth: Option<bool>,
    /// For an `xoauth2` relay: whether an access token was obtained (`None`
    /// when the probe failed before it asked for one).
    pub token: Option<bool>,
    pub latency: Duration,
    /// The server offers PIPELINING and the relay allows it.
    pub pipelining: bool,
    /// The largest message the server takes, when it announced one (SIZE,
    /// RFC 1870); a larger one is never offered to it.
    pub size_limit: Option<u64>,
    /// The limits it announced with LIMITS (RFC 9422), which mailmux keeps
    /// to.
    pub limits: ServerLimits,
    /// It announced DSN (RFC 3461): a relay's `dsn_notify` and `dsn_ret`
    /// are asked of it.
    pub dsn: bool,
    /// When the probe failed: its class and what went wrong.
    pub error: Option<(FailureClass, String)>,
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    /// The router settings (strategy, attempts) changed.
    pub router_changed: bool,
}

/// What shutdown found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Messages in flight when shutdown began.
    pub in_flight_at_start: usize,
    /// Of those, the ones still unfinished when the grace period ran out.
    pub abandoned: usize,
}
