//! What goes into the dispatcher and what comes out: a composed message with
//! its envelope and deadline, and the report of its delivery.
//!
//! The message is already rendered to bytes (CRLF line endings) by the daemon;
//! the actors only move it. The report records every attempt, so a caller can
//! see exactly which relay said what.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use lettre::Address;
use tokio::time::Instant;

/// A message ready for delivery.
#[derive(Debug, Clone)]
pub struct Mail {
    /// The Message-ID header value, without angle brackets. Used in logs and
    /// reports to match a result to what a server received.
    pub message_id: String,
    /// MAIL FROM. `None` uses the relay's configured sender, and failing that
    /// the null sender `<>`.
    pub from: Option<Address>,
    /// RCPT TO, already de-duplicated.
    pub to: Vec<Address>,
    /// The whole message, headers and body, with CRLF line endings.
    pub bytes: Arc<[u8]>,
    /// Delivery, queueing and failover together must finish by then.
    pub deadline: Instant,
    /// Try this relay first, whatever the strategy says.
    pub prefer: Option<String>,
    /// Only these relays may take it (the caller's `allowed_relays`).
    pub only: Option<Arc<[String]>>,
    /// `High`: the next turn of a relay's `rate` and the next connection
    /// that comes free are its before any normal message's.
    pub priority: Priority,
}

/// How soon a message must go, next to the others waiting for the same
/// relays: a one-time code or a password reset (`High`) should not wait
/// behind a mail merge (`Normal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    #[default]
    Normal,
    High,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }

    pub fn is_high(self) -> bool {
        self == Priority::High
    }
}

impl Mail {
    /// Whether any envelope address needs SMTPUTF8.
    pub fn needs_smtputf8(&self) -> bool {
        self.from
            .iter()
            .chain(&self.to)
            .any(|a: &Address| !AsRef::<str>::as_ref(a).is_ascii())
    }
}

/// How one attempt ended, classified by SMTP phase (DESIGN.md rule 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// The relay itself failed: connect, TLS, greeting, EHLO or AUTH. The
    /// message goes to another relay and this one backs off.
    RelayFault,
    /// A 4xx reply to MAIL, RCPT or DATA: worth another relay.
    Transient,
    /// A 5xx reply to MAIL, to every RCPT, or after the final ".": it would
    /// fail everywhere, so no failover.
    Permanent,
    /// The connection was lost or timed out after the final "." was sent:
    /// the message may have been delivered and is never sent again.
    Unknown,
    /// The relay had no capacity (its queue is full) or was unavailable; not
    /// the relay's fault and not counted against its health.
    Busy,
    /// The relay cannot carry this message: a non-ASCII address needs
    /// SMTPUTF8 and the relay does not offer it, or the message is larger
    /// than the SIZE its server announced (RFC 1870). Another relay may.
    Unsupported,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::RelayFault => "relay_fault",
            FailureClass::Transient => "transient",
            FailureClass::Permanent => "permanent",
            FailureClass::Unknown => "unknown",
            FailureClass::Busy => "busy",
            FailureClass::Unsupported => "unsupported",
        }
    }

    /// Whether the router sends the message on to another relay.
    pub fn fails_over(self) -> bool {
        matches!(
            self,
            FailureClass::RelayFault
                | FailureClass::Transient
                | FailureClass::Busy
                | FailureClass::Unsupported
        )
    }
}

/// An SMTP reply worth reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

/// One relay's try at one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub relay: String,
    /// `None` when the relay took the message.
    pub class: Option<FailureClass>,
    /// The SMTP reply that decided the outcome, if there was one.
    pub reply: Option<Reply>,
    /// What happened, in words, when there was no reply or to add to it.
    pub detail: String,
    pub duration: Duration,
}

/// A recipient the server refused while others were accepted, or (in a
/// report's `deferred`) answered with a 4xx: then it may take the message
/// later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub address: String,
    pub reply: Reply,
}

/// The overall result of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Every recipient accepted.
    Sent,
    /// Some recipients accepted; others refused with 5xx, or deferred
    /// (see [`Report::deferred`]).
    Partial,
    /// The connection was lost after the final "."; the message may have been
    /// delivered and was not sent again.
    Unknown,
    /// Not delivered.
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Sent => "sent",
            Status::Partial => "partial",
            Status::Unknown => "unknown",
            Status::Failed => "failed",
        }
    }
}

/// Why a delivery failed, when it did. Stable codes for agents to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// A relay refused the message permanently.
    Rejected,
    /// Every candidate relay failed or was unavailable.
    AllRelaysFailed,
    /// No relay was tried: every one that may take the message is backing
    /// off or has its circuit open, and the first is tried again after
    /// `wait_ms`. Said to callers as `all_relays_failed`.
    RelaysBackingOff { wait_ms: u64 },
    /// No relay could take the message before the deadline.
    Busy,
    /// The deadline passed before the message was delivered.
    DeadlineExceeded,
    /// The message is larger than the configured limit, or than the SIZE
    /// of every relay that tried it.
    TooLarge,
    /// The message needs SMTPUTF8 and no relay offers it.
    Smtputf8Unsupported,
    /// A relay named by the caller does not exist.
    UnknownRelay,
    /// The dispatcher is shutting down or an actor stopped under the call.
    Unavailable,
    /// Every relay that may take the message used up its `rate`; one has
    /// room again after `wait_ms`.
    RateLimited { wait_ms: u64 },
    /// The caller cancelled the call before any relay began to commit the
    /// message: it was not sent.
    Cancelled,
}

impl FailureReason {
    pub fn code(self) -> &'static str {
        match self {
            FailureReason::Rejected => "rejected",
            FailureReason::AllRelaysFailed | FailureReason::RelaysBackingOff { .. } => {
                "all_relays_failed"
            }
            FailureReason::Busy => "busy",
            FailureReason::DeadlineExceeded => "deadline_exceeded",
            FailureReason::TooLarge => "too_large",
            FailureReason::Smtputf8Unsupported => "smtputf8_unsupported",
            FailureReason::UnknownRelay => "unknown_relay",
            FailureReason::Unavailable => "unavailable",
            FailureReason::RateLimited { .. } => "relay_rate_limited",
            FailureReason::Cancelled => "cancelled",
        }
    }
}

/// What happened to one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub message_id: String,
    pub status: Status,
    /// The relay that took the message (or last tried it).
    pub relay: Option<String>,
    pub accepted: Vec<String>,
    pub rejected: Vec<Rejected>,
    /// Recipients that did not get the message while others did, and may
    /// later: a 4xx to their RCPT or to their transaction, or a session
    /// lost before their transaction's final ".". A queue tries them again.
    pub deferred: Vec<Rejected>,
    pub attempts: Vec<Attempt>,
    /// Set when `status` is `Failed`.
    pub failure: Option<FailureReason>,
    /// A sentence an agent or operator can act on, when not `Sent`.
    pub message: Option<String>,
}

impl Report {
    pub(crate) fn failed(mail: &Mail, reason: FailureReason, message: String) -> Self {
        Report::failed_for(mail.message_id.clone(), reason, message)
    }

    /// The report of message `message_id`, which failed for `reason`
    /// before any relay saw it.
    pub(crate) fn failed_for(message_id: String, reason: FailureReason, message: String) -> Self {
        Report {
            message_id,
            status: Status::Failed,
            relay: None,
            accepted: vec![],
            rejected: vec![],
            deferred: vec![],
            attempts: vec![],
            failure: Some(reason),
            message: Some(message),
        }
    }
}

/// The `message` of a `partial` outcome: how many of `total` recipients
/// were refused, and `why` in brackets when there is more to say.
pub(crate) fn partly_refused(refused: usize, total: usize, why: Option<&str>) -> String {
    let said = format!("{refused} of {total} recipients were refused; the others got the message");
    match why {
        Some(why) => format!("{said} ({why})"),
        None => said,
    }
}

/// The `message` of an outcome with `deferred` recipients among `total`,
/// of which `took` have the message and `refused` were refused for good,
/// and `why` in brackets when there is more to say.
pub(crate) fn partly_deferred(
    deferred: &[Rejected],
    took: usize,
    refused: usize,
    total: usize,
    why: Option<&str>,
) -> String {
    let mut said = format!(
        "{} of {total} recipients were deferred and wait for a retry",
        deferred.len()
    );
    if let Some(first) = deferred.first() {
        said.push_str(&format!(
            " ({}: {} {})",
            first.address, first.reply.code, first.reply.text
        ));
    }
    let have = if took == 1 { "has" } else { "have" };
    said.push_str(&format!("; {took} {have} the message"));
    if refused > 0 {
        let were = if refused == 1 { "was" } else { "were" };
        said.push_str(&format!(", {refused} {were} refused"));
    }
    if let Some(why) = why {
        said.push_str(&format!(" ({why})"));
    }
    said
}

/// Records, durably, that a message is committing to a relay: the queue's
/// crash marker. Called just before the final "." is written; when it fails,
/// the message is not sent.
pub trait CommitMark: Send + Sync + std::fmt::Debug {
    fn record(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

/// How far a message got, shared between the caller and the task delivering
/// it. It decides, race-free, whether a message whose caller gave up (deadline)
/// or whose actor crashed may be sent again elsewhere.
#[derive(Debug, Default)]
pub struct Progress {
    state: AtomicU8,
    mark: Option<Arc<dyn CommitMark>>,
    /// The caller cancelled: a commit a relay gives back is abandoned, so
    /// that no other relay takes the message.
    cancelled: AtomicBool,
}

const PENDING: u8 = 0;
const COMMITTED: u8 = 1;
const ABANDONED: u8 = 2;

impl Progress {
    /// Progress whose commit is first recorded by `mark`.
    pub fn marked(mark: Option<Arc<dyn CommitMark>>) -> Self {
        Progress {
            state: AtomicU8::new(PENDING),
            mark,
            cancelled: AtomicBool::new(false),
        }
    }

    /// Called by a delivery task just before it sends the final "." of DATA.
    /// Returns false if the caller has already given up: then the task must
    /// not send the message.
    pub fn commit(&self) -> bool {
        self.state
            .compare_exchange(PENDING, COMMITTED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// [`Progress::commit`], after recording the commit with the mark (if
    /// any). An error means the record failed and nothing may be sent.
    pub async fn commit_marked(&self) -> Result<bool, String> {
        if self.is_abandoned() {
            return Ok(false);
        }
        if let Some(mark) = &self.mark {
            mark.record().await?;
        }
        Ok(self.commit())
    }

    /// Called by a caller that gives up. Returns false if the message was
    /// already committed: then it may have been delivered.
    pub fn abandon(&self) -> bool {
        match self
            .state
            .compare_exchange(PENDING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(state) => state == ABANDONED,
        }
    }

    /// Called by a caller that cancels: [`Progress::abandon`], and should a
    /// relay that is committing it give the message back, it is abandoned
    /// then. Returns false if a relay is committing it now.
    pub fn cancel(&self) -> bool {
        self.cancelled.store(true, Ordering::Release);
        self.abandon()
    }

    /// Called after a clear 4xx reply to the final ".": the server did not
    /// take the message, so another relay may, unless the caller cancelled.
    pub fn release(&self) {
        let to = if self.cancelled.load(Ordering::Acquire) {
            ABANDONED
        } else {
            PENDING
        };
        let _ = self
            .state
            .compare_exchange(COMMITTED, to, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Whether the final "." was (or is being) sent.
    pub fn is_committed(&self) -> bool {
        self.state.load(Ordering::Acquire) == COMMITTED
    }

    /// Whether the caller gave up on the message.
    pub fn is_abandoned(&self) -> bool {
        self.state.load(Ordering::Acquire) == ABANDONED
    }
}

#[cfg(test)]
mod tests {
    use super::Progress;

    #[test]
    fn a_cancel_stops_a_message_no_relay_committed() {
        let p = Progress::default();
        assert!(p.cancel(), "nothing committed: stopped");
        assert!(!p.commit(), "no relay may send it now");
    }

    #[test]
    fn a_cancelled_commit_a_relay_gives_back_is_abandoned() {
        let p = Progress::default();
        assert!(p.commit(), "a relay sends the final \".\"");
        assert!(!p.cancel(), "too late to stop that relay");
        p.release();
        assert!(
            p.is_abandoned(),
            "it did not take it, and no other relay may"
        );
        assert!(!p.commit());

        let q = Progress::default();
        assert!(q.commit());
        q.release();
        assert!(q.commit(), "without a cancel, another relay may take it");
    }
}
