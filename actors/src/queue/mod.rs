//! The durable queue: every accepted message is written to a store before
//! anyone is told it was accepted, and delivery runs from the store.
//!
//! [`Store`] is the one trait the backends implement (`sqlite` on disk, the
//! same engine in memory, and `postgres`, shared by several daemons). [`Queue`] is the handle the
//! daemon holds: it accepts messages, hands due ones to the [`Dispatcher`],
//! records each outcome (settle), and retries deferred mail. It owns the crash
//! rule: a message is marked durably as committing to a relay before its
//! final "." is written; on recovery an unmarked message is sent again and a
//! marked one becomes `unknown`.
//!
//! [`Dispatcher`]: crate::Dispatcher

pub mod memory;
pub mod postgres;
mod reserve;
mod rows;
mod runner;
pub mod sqlite;
mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use crate::mail::Priority;
pub use rows::SEARCH_ROWS;

pub use runner::{
    Action, Change, Delivered, Drain, Event, Observer, Queue, QueueError, SUPPRESSED, Screen,
    Stream, Submit, Submitted,
};
pub use watch::{POLL as WATCH_POLL, Print, Watch};

/// Where a message is in its life. Every change is stored with its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    /// `send_at` is in the future.
    Scheduled,
    /// Waiting for a relay: new, or deferred after every relay answered 4xx
    /// or was down, with its next attempt time.
    Queued,
    /// A relay holds it now.
    Sending,
    /// Every recipient accepted.
    Sent,
    /// Some recipients accepted, others refused.
    Partial,
    /// Refused permanently.
    Failed,
    /// The connection was lost after the final "."; never resent.
    Unknown,
    /// `max_age` passed without delivery.
    Expired,
    /// Cancelled before delivery.
    Cancelled,
    /// Waiting for a person's approval (the caller's policy held it), until
    /// its approval deadline (`next_attempt_at`).
    Held,
    /// A person refused a held message.
    Rejected,
}

impl State {
    pub const ALL: [State; 11] = [
        State::Scheduled,
        State::Queued,
        State::Sending,
        State::Sent,
        State::Partial,
        State::Failed,
        State::Unknown,
        State::Expired,
        State::Cancelled,
        State::Held,
        State::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Scheduled => "scheduled",
            State::Queued => "queued",
            State::Sending => "sending",
            State::Sent => "sent",
            State::Partial => "partial",
            State::Failed => "failed",
            State::Unknown => "unknown",
            State::Expired => "expired",
            State::Cancelled => "cancelled",
            State::Held => "held",
            State::Rejected => "rejected",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether a message in this state keeps its body: one that nothing can
    /// send again drops it; a failed, expired or unknown one keeps it (until
    /// `retain`), so that an operator may retry it.
    pub fn keeps_body(self) -> bool {
        !matches!(
            self,
            State::Sent | State::Partial | State::Cancelled | State::Rejected
        )
    }

    /// Whether nothing more will happen to the message.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            State::Scheduled | State::Queued | State::Sending | State::Held
        )
    }
}

/// Which backend holds the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// SQLite in one file, in WAL mode, fsynced per batch.
    Sqlite { path: PathBuf },
    /// In this process's memory: no durability at all.
    Memory,
    /// PostgreSQL, shared by several daemons.
    Postgres(postgres::PgSettings),
}

impl StoreKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            StoreKind::Sqlite { .. } => "sqlite",
            StoreKind::Memory => "memory",
            StoreKind::Postgres(_) => "postgres",
        }
    }

    pub fn is_durable(&self) -> bool {
        !matches!(self, StoreKind::Memory)
    }
}

/// `queue.min_free` unless configured: 100 MiB.
pub const MIN_FREE: u64 = 100 << 20;

/// Validated `[queue]` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSettings {
    pub store: StoreKind,
    /// How long a message may wait for delivery, from when it is due.
    pub max_age: Duration,
    /// First retry delay after every relay failed transiently; doubles.
    pub retry_base: Duration,
    /// Retry delay cap.
    pub retry_max: Duration,
    /// How long an idempotency key is remembered.
    pub idempotency_ttl: Duration,
    /// How long finished messages are kept for status queries.
    pub retain: Duration,
    /// How far ahead `send_at` may be.
    pub max_schedule: Duration,
    /// The deadline of one delivery round the queue starts by itself
    /// (retries, scheduled and recovered mail).
    pub delivery_timeout: Duration,
    /// The bytes new mail must leave free on the file system of a
    /// `sqlite` store; 0: none.
    pub min_free: u64,
    /// Whether a recipient refused as unknown goes on the suppression list
    /// (the daemon's concern: the queue only keeps the list).
    pub suppress_bounces: bool,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            store: StoreKind::Sqlite {
                path: PathBuf::from("mailmux-queue.db"),
            },
            max_age: Duration::from_secs(24 * 3600),
            retry_base: Duration::from_secs(30),
            retry_max: Duration::from_secs(3600),
            idempotency_ttl: Duration::from_secs(24 * 3600),
            retain: Duration::from_secs(7 * 24 * 3600),
            max_schedule: Duration::from_secs(30 * 24 * 3600),
            delivery_timeout: Duration::from_secs(90),
            min_free: MIN_FREE,
            suppress_bounces: true,
        }
    }
}

/// Opens the configured store for a daemon (taking its lock, or for
/// PostgreSQL, migrating and renewing its leases).
pub async fn open(kind: &StoreKind) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match kind {
        StoreKind::Sqlite { path } => Arc::new(sqlite::SqliteStore::open(path)?),
        StoreKind::Memory => Arc::new(memory::MemoryStore::new()),
        StoreKind::Postgres(s) => Arc::new(postgres::PgStore::open(s).await?),
    })
}

/// Milliseconds since the Unix epoch: how every time is stored.
pub type Millis = i64;

pub fn to_millis(t: SystemTime) -> Millis {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

pub fn from_millis(ms: Millis) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// A message id as a caller or an operator gives it, bare: without the
/// spaces at either end and the angle brackets around it that a
/// Message-ID header (or an In-Reply-To) writes (`<id@host>`). The queue
/// stores ids bare.
pub fn bare_id(id: &str) -> &str {
    let id = id.trim();
    id.strip_prefix('<')
        .and_then(|i| i.strip_suffix('>'))
        .map_or(id, str::trim)
}

pub fn now_millis() -> Millis {
    to_millis(SystemTime::now())
}

/// A stored span of milliseconds (a message's own `max_age`); none below 0.
pub fn duration(ms: Millis) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// A message to store.
#[derive(Debug, Clone, Default)]
pub struct NewMessage {
    pub message_id: String,
    /// MAIL FROM; `None` uses the relay's sender.
    pub from: Option<String>,
    /// RCPT TO.
    pub to: Vec<String>,
    pub bytes: Arc<[u8]>,
    pub prefer: Option<String>,
    /// When it was accepted.
    pub queued_at: Millis,
    /// When it is due: its `send_at`, or now.
    pub due_at: Millis,
    /// The caller's key and the hash of the call's content.
    pub idempotency: Option<(String, [u8; 32])>,
    /// Who sent it (the daemon's caller name).
    pub caller: Option<String>,
    /// The daemon's description of the message for its audit log (opaque
    /// here; never the body).
    pub meta: Option<String>,
    /// Stored `held` for approval instead of `queued`.
    pub hold: Option<Hold>,
    /// Only these relays may take it.
    pub only: Option<Arc<[String]>>,
    /// The `send_batch` call it came in.
    pub batch: Option<String>,
    /// The caller's label for it (`tag`), which a listing filters by.
    pub tag: Option<String>,
    /// How long it may wait for delivery once due, when the call asked for
    /// less than its caller's `max_age`, in milliseconds.
    pub max_age: Option<Millis>,
    /// Taken before normal mail when due together ([`Store::due`]).
    pub priority: Priority,
}

/// What a bounce or complaint report that came back by mail said of one
/// recipient of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportRecord {
    /// When it was read.
    pub at: Millis,
    /// `bounced` or `complained`.
    pub reason: String,
    pub address: String,
    /// The report's diagnostic.
    pub detail: String,
}

/// A message held for a person's approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// When it expires unless approved.
    pub until: Millis,
    /// The hash of the content the approval is for; an approval naming
    /// another hash does not release it.
    pub hash: [u8; 32],
}

/// An idempotency key as the store keeps it: the caller's name, then the
/// caller's key, so that two callers' equal keys never name one message.
/// A key holds no control character, so the last U+001F parts the two.
pub fn scoped_key(caller: Option<&str>, key: &str) -> String {
    format!("{}\u{1f}{key}", caller.unwrap_or_default())
}

impl NewMessage {
    /// Its idempotency key as the store keeps it ([`scoped_key`]), and the
    /// hash of the call's content.
    pub fn scoped_key(&self) -> Option<(String, &[u8; 32])> {
        let (key, hash) = self.idempotency.as_ref()?;
        Some((scoped_key(self.caller.as_deref(), key), hash))
    }

    /// The message as a round delivers it, in `state`, before any round.
    pub fn pending(&self, state: State) -> Pending {
        Pending {
            message_id: self.message_id.clone(),
            state,
            from: self.from.clone(),
            to: self.to.clone(),
            bytes: self.bytes.clone(),
            prefer: self.prefer.clone(),
            due_at: self.due_at,
            rounds: 0,
            caller: self.caller.clone(),
            meta: self.meta.clone(),
            only: self.only.clone(),
            max_age: self.max_age,
            priority: self.priority,
            accepted: Vec::new(),
            rejected: Vec::new(),
            copied: false,
        }
    }

    /// The state it is stored in at `now`.
    pub fn initial_state(&self, now: Millis) -> State {
        if self.hold.is_some() {
            State::Held
        } else if self.due_at > now {
            State::Scheduled
        } else {
            State::Queued
        }
    }

    /// The message's record as it is stored in `state` at `now`.
    pub fn record(&self, state: State, now: Millis) -> Record {
        Record {
            message_id: self.message_id.clone(),
            state,
            from: self.from.clone(),
            to: self.to.clone(),
            size: self.bytes.len() as u64,
            prefer: self.prefer.clone(),
            idempotency_key: self.idempotency.as_ref().map(|(k, _)| k.clone()),
            queued_at: self.queued_at,
            due_at: self.due_at,
            updated_at: now,
            next_attempt_at: Some(self.hold.as_ref().map_or(self.due_at, |h| h.until)),
            relay: None,
            accepted: Vec::new(),
            rejected: Vec::new(),
            reason: None,
            note: None,
            attempts: Vec::new(),
            history: vec![(state, now)],
            caller: self.caller.clone(),
            meta: self.meta.clone(),
            decided_by: None,
            sent_copy: None,
            node: None,
            batch: self.batch.clone(),
            tag: self.tag.clone(),
            max_age: self.max_age,
            priority: self.priority,
            expires_at: None,
            reports: Vec::new(),
        }
    }
}

/// What `accept` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// Stored in this state.
    Stored(State),
    /// The key was seen with the same content: the first message's id.
    Replay(String),
    /// The key was seen with other content: the first message's id.
    Conflict(String),
    /// Not stored: another message of its atomic batch conflicts, so none
    /// of the batch is stored.
    Withheld,
}

/// The answers to an atomic batch: unchanged when none conflicts (true:
/// store them); otherwise each conflict, and every other message
/// withheld (false: store none).
pub fn atomic_answers(out: Vec<Accepted>) -> (Vec<Accepted>, bool) {
    if !out.iter().any(|a| matches!(a, Accepted::Conflict(_))) {
        return (out, true);
    }
    let out = out
        .into_iter()
        .map(|a| match a {
            Accepted::Conflict(id) => Accepted::Conflict(id),
            _ => Accepted::Withheld,
        })
        .collect();
    (out, false)
}

/// What each message of an atomic batch would get for its key, before any
/// of it is stored: a conflict with a message stored before (`seen`, which
/// answers for one message) or with an earlier message of the batch, or
/// else `Withheld`, for [`atomic_answers`].
pub(crate) fn batch_conflicts<E>(
    ms: &[NewMessage],
    mut seen: impl FnMut(&NewMessage) -> Result<Option<Accepted>, E>,
) -> Result<Vec<Accepted>, E> {
    let mut earlier: std::collections::HashMap<String, (&str, &[u8; 32])> =
        std::collections::HashMap::new();
    let mut out = Vec::with_capacity(ms.len());
    for m in ms {
        let answer = match seen(m)? {
            Some(Accepted::Conflict(id)) => Accepted::Conflict(id),
            Some(_) => Accepted::Withheld,
            None => match m.scoped_key() {
                Some((key, hash)) => match earlier.get(&key) {
                    Some((id, first)) if *first != hash => Accepted::Conflict((*id).to_owned()),
                    Some(_) => Accepted::Withheld,
                    None => {
                        earlier.insert(key, (&m.message_id, hash));
                        Accepted::Withheld
                    }
                },
                None => Accepted::Withheld,
            },
        };
        out.push(answer);
    }
    Ok(out)
}

/// One attempt at one relay, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    pub at: Millis,
    pub relay: String,
    /// `None` when the relay took the message.
    pub class: Option<String>,
    pub code: Option<u16>,
    pub text: String,
    pub duration_ms: u64,
}

/// A recipient refused while others were accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedRecord {
    pub address: String,
    pub code: u16,
    pub text: String,
}

/// An address the daemon no longer accepts mail for: an entry of the
/// suppression list. Never holds a body or a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppression {
    /// The address as the daemon compares it (its own normal form, which
    /// the store keeps as given).
    pub address: String,
    /// Why: `bounced`, `unsubscribed`, `complained` or `manual`.
    pub reason: String,
    /// What led to it: the relay's refusal, an operator's note.
    pub detail: Option<String>,
    /// The message whose refusal listed it.
    pub message_id: Option<String>,
    pub at: Millis,
}

/// Delivery paused by an operator: while it holds, no daemon on the store
/// starts a round (hands a message to a relay); mail is still accepted and
/// waits in the queue. Never holds a body or a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paused {
    /// When it was paused.
    pub since: Millis,
    /// Who paused it: `operator NAME`, `queue command`.
    pub by: String,
    /// The operator's note, if any.
    pub reason: Option<String>,
}

/// One change of the suppression list, as [`Store::suppression_changes`]
/// reads them back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SuppressionChange {
    /// The address was listed; its entry as the store holds it now.
    Added(Suppression),
    /// The address was taken off the list.
    Removed(String),
}

/// The versions of the suppression list whose changes a store keeps for
/// [`Store::suppression_changes`]: a daemon further behind reads the whole
/// list.
pub const SUPPRESSION_VERSIONS_KEPT: i64 = 1_000;

/// The most addresses one write of the list records one by one; a larger
/// one (an import) is recorded as a change of the whole list, which every
/// daemon then reads whole.
pub const SUPPRESSION_CHANGE_ROWS: usize = 1_000;

/// Whether the rows a store keeps of the list's changes after `since` up
/// to `now` (`versions`: each row's version and whether it names an
/// address, oldest first) hold every change after `since`: each version
/// at least once, from `since + 1` to `now`, and no row that stands for
/// the whole list (no address).
pub(crate) fn changes_complete(since: i64, now: i64, versions: &[(i64, bool)]) -> bool {
    let mut expected = since + 1;
    for &(v, has_address) in versions {
        if !has_address || v > expected {
            return false;
        }
        if v == expected {
            expected += 1;
        }
    }
    expected == now + 1
}

/// What one page of the suppression list asks for
/// ([`Store::suppression_page`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SuppressionQuery {
    /// Only the addresses that hold this (compared as given: addresses are
    /// kept in lower case).
    pub contains: Option<String>,
    /// Only the addresses after this one, by address.
    pub after: Option<String>,
    /// At most this many entries; `None`: all of them.
    pub limit: Option<usize>,
    /// Whether to count the list and the addresses holding `contains`
    /// (each a read of the whole list): without, the page's `total` and
    /// `matching` are 0. A listing that goes on from a counted page needs
    /// no counts again.
    pub counts: bool,
}

/// One page of the suppression list, by address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SuppressionPage {
    /// Addresses listed in all (0 when the query asked for no counts).
    pub total: u64,
    /// Of them, those that hold the query's `contains` (all of them
    /// without one), whether before or after its `after` (0 when the
    /// query asked for no counts).
    pub matching: u64,
    /// The page: at most `limit` entries after `after`, by address.
    pub entries: Vec<Suppression>,
    /// The address the next page starts after, when there is one.
    pub next_after: Option<String>,
}

impl SuppressionPage {
    /// The page of `query` from `rows`, the matching entries after its
    /// `after` by address, of which a store read at most one more than
    /// its `limit` to know whether a next page follows.
    pub(crate) fn of(
        query: &SuppressionQuery,
        total: u64,
        matching: u64,
        mut rows: Vec<Suppression>,
    ) -> SuppressionPage {
        let more = query.limit.is_some_and(|l| rows.len() > l);
        if let Some(l) = query.limit {
            rows.truncate(l);
        }
        let next_after = rows.last().filter(|_| more).map(|e| e.address.clone());
        SuppressionPage {
            total,
            matching,
            entries: rows,
            next_after,
        }
    }
}

/// The outcome of one delivery round, to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settle {
    pub state: State,
    pub relay: Option<String>,
    pub attempts: Vec<AttemptRecord>,
    pub accepted: Vec<String>,
    pub rejected: Vec<RejectedRecord>,
    /// The stable failure code (`rejected`, `all_relays_failed`, …).
    pub reason: Option<String>,
    /// A sentence for the caller.
    pub note: Option<String>,
    /// Set when `state` is `Queued`: the next try.
    pub next_attempt_at: Option<Millis>,
    /// The relay that took it files a copy in the Sent folder: a durable
    /// store records the copy as `pending` and keeps the bytes until
    /// [`Store::note_copy`], so that a copy waiting at a crash is made at
    /// the next start ([`Store::pending_copies`]).
    pub copy: bool,
    /// The message's bytes, for one that [`Store::accept_marked`] stored
    /// without them, when this outcome keeps them (a retry or an operator
    /// needs them, or a Sent copy is due). `None` otherwise.
    pub body: Option<Arc<[u8]>>,
}

/// A Sent copy recorded as `pending` and not yet made; the message's bytes
/// are read with [`Store::load`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyDue {
    pub message_id: String,
    /// The relay that took the message.
    pub relay: String,
}

/// A due message, loaded for delivery.
#[derive(Debug, Clone)]
pub struct Pending {
    pub message_id: String,
    pub state: State,
    pub from: Option<String>,
    pub to: Vec<String>,
    pub bytes: Arc<[u8]>,
    pub prefer: Option<String>,
    pub due_at: Millis,
    /// Delivery rounds so far.
    pub rounds: u32,
    pub caller: Option<String>,
    pub meta: Option<String>,
    pub only: Option<Arc<[String]>>,
    /// Its own `max_age` in milliseconds, when the call gave one.
    pub max_age: Option<Millis>,
    pub priority: Priority,
    /// The recipients an earlier round settled for certain: those that took
    /// the message, and those refused for good. The next round goes to the
    /// others ([`Pending::outstanding`]), and its outcome keeps these. Empty
    /// but for a message an earlier round delivered to some recipients while
    /// it deferred others, and for an `unknown` message sent in several
    /// transactions that an operator sent again (`queue retry --force`).
    pub accepted: Vec<String>,
    pub rejected: Vec<RejectedRecord>,
    /// An earlier round's relay took the message for some recipients and
    /// its Sent copy was recorded (pending, made or failed): no later round
    /// files another.
    pub copied: bool,
}

impl Pending {
    /// The recipients of `to` that neither took the message for certain
    /// (`accepted`) nor were refused for good (`rejected`) in an earlier
    /// round; all of them when that leaves none.
    pub fn outstanding(&self) -> Vec<&str> {
        let left = unsettled(&self.to, &self.accepted, &self.rejected);
        if left.is_empty() {
            self.to.iter().map(String::as_str).collect()
        } else {
            left
        }
    }
}

/// The recipients of `to` that are in neither `accepted` nor `rejected`
/// (compared without regard to case), in `to`'s order.
pub(crate) fn unsettled<'a>(
    to: &'a [String],
    accepted: &[String],
    rejected: &[RejectedRecord],
) -> Vec<&'a str> {
    let settled = |a: &str| {
        accepted.iter().any(|x| x.eq_ignore_ascii_case(a))
            || rejected.iter().any(|x| x.address.eq_ignore_ascii_case(a))
    };
    to.iter()
        .map(String::as_str)
        .filter(|a| !settled(a))
        .collect()
}

impl Record {
    /// The recipients that wait for a retry while others already have the
    /// message: those an earlier round deferred. Empty unless the message
    /// is `queued` or `sending` with some recipients `accepted`.
    pub fn deferred(&self) -> Vec<&str> {
        if !matches!(self.state, State::Queued | State::Sending) || self.accepted.is_empty() {
            return Vec::new();
        }
        unsettled(&self.to, &self.accepted, &self.rejected)
    }

    /// When a waiting (`scheduled` or `queued`) message expires unless a
    /// relay takes it first: its due time and `max_age` (its caller's, or
    /// the queue's), shortened by its own. `None` for any other state.
    pub fn expiry(&self, max_age: Duration) -> Option<Millis> {
        if !matches!(self.state, State::Queued | State::Scheduled) {
            return None;
        }
        let max_age = self
            .max_age
            .map_or(max_age, |own| max_age.min(duration(own)));
        Some(self.due_at.saturating_add(max_age.as_millis() as i64))
    }
}

/// Everything stored about one message, except its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub message_id: String,
    pub state: State,
    pub from: Option<String>,
    pub to: Vec<String>,
    pub size: u64,
    pub prefer: Option<String>,
    pub idempotency_key: Option<String>,
    pub queued_at: Millis,
    pub due_at: Millis,
    pub updated_at: Millis,
    pub next_attempt_at: Option<Millis>,
    pub relay: Option<String>,
    pub accepted: Vec<String>,
    pub rejected: Vec<RejectedRecord>,
    pub reason: Option<String>,
    pub note: Option<String>,
    pub attempts: Vec<AttemptRecord>,
    /// Every state it was in, with the time it entered it, oldest first.
    pub history: Vec<(State, Millis)>,
    pub caller: Option<String>,
    pub meta: Option<String>,
    /// Who approved or rejected it, when it was held.
    pub decided_by: Option<String>,
    /// The copy in the Sent folder, when the relay files one: `copied`, or
    /// `failed: <reason>`.
    pub sent_copy: Option<String>,
    /// The daemon that holds or last held it (a shared store only).
    pub node: Option<String>,
    /// The `send_batch` call it came in.
    pub batch: Option<String>,
    /// The caller's label for it.
    pub tag: Option<String>,
    /// Its own `max_age` in milliseconds, when the call gave one.
    pub max_age: Option<Millis>,
    pub priority: Priority,
    /// When a waiting (`scheduled` or `queued`) message expires unless a
    /// relay takes it first, by the `max_age` in force now: set by
    /// [`Queue::status`](super::Queue::status), never stored.
    pub expires_at: Option<Millis>,
    /// What bounce and complaint reports that came back by mail said of
    /// its recipients after a relay took it, oldest first.
    pub reports: Vec<ReportRecord>,
}

/// One line of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub message_id: String,
    pub state: State,
    pub priority: Priority,
    pub from: Option<String>,
    pub to: Vec<String>,
    pub queued_at: Millis,
    pub updated_at: Millis,
    pub relay: Option<String>,
    pub caller: Option<String>,
    /// The daemon that holds or last held it (a shared store only).
    pub node: Option<String>,
    /// The `send_batch` call it came in.
    pub batch: Option<String>,
    /// The caller's label for it.
    pub tag: Option<String>,
}

/// Counts and ages of the queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub counts: Vec<(State, u64)>,
    /// When the oldest message waiting (`queued`) was accepted.
    pub oldest_queued_at: Option<Millis>,
    /// The earliest next attempt of a deferred message.
    pub next_retry_at: Option<Millis>,
    /// Sent copies recorded as pending: waiting for their outcome, or for
    /// the next start after a stop or a crash.
    pub copies_pending: u64,
}

/// What one purge deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    /// Finished messages, with their attempts.
    pub messages: u64,
    /// Idempotency keys.
    pub keys: u64,
}

/// Rows one purge write deletes at most, so that a large backlog (a
/// daemon that sent a million messages in a day, or a first purge after a
/// long stop) never holds the store's writer for long: other writes go in
/// between the chunks.
pub const PURGE_CHUNK: usize = 1000;

/// The ids of every message `filter` names, newest first, each with its
/// state as listed, read a page at a time: what an action on a selection
/// (`cancel_message` with a `batch_id`, `mailmux queue cancel --batch`)
/// goes through. A message listed in a final state ([`State::is_final`])
/// can no longer be cancelled or decided on: those actions leave it
/// without a write.
pub async fn select(
    store: &dyn Store,
    filter: &Filter,
) -> Result<Vec<(String, State)>, StoreError> {
    const PAGE: usize = 500;
    let mut ids = Vec::new();
    let mut cursor = None;
    loop {
        let (page, next) = store.list(filter, PAGE, cursor).await?;
        ids.extend(page.into_iter().map(|m| (m.message_id, m.state)));
        match next {
            Some(n) => cursor = Some(n),
            None => return Ok(ids),
        }
    }
}

/// How many messages of a selection are acted on at once (cancelled,
/// retried): the store's writer folds their writes into shared commits.
pub const AT_ONCE: usize = 32;

/// What acting on the messages of a selection (cancelling them, deciding
/// on them) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActedOnMany {
    /// The messages the selection named.
    pub matched: usize,
    /// Those the action changed.
    pub acted: usize,
    /// Each message's state after: the one the action gave it, or the state
    /// that kept it from the action (a message purged in between is left
    /// out).
    pub states: std::collections::BTreeMap<State, usize>,
}

/// Pauses delivery on `store` as `by`: the pause in force, and whether
/// this call paused it (a pause while paused keeps the first).
pub async fn pause(
    store: &dyn Store,
    by: &str,
    reason: Option<String>,
) -> Result<(Paused, bool), StoreError> {
    let pause = Paused {
        since: now_millis(),
        by: by.to_owned(),
        reason,
    };
    if store.set_paused(Some(pause.clone())).await? {
        return Ok((pause, true));
    }
    Ok((store.paused().await?.unwrap_or(pause), false))
}

/// Deletes every finished message older than `finished_before` and every
/// key older than `keys_before`, in writes of at most `chunk` rows each
/// ([`PURGE_CHUNK`] in the daemon); returns the messages deleted.
pub async fn purge(
    store: &dyn Store,
    finished_before: Millis,
    keys_before: Millis,
    chunk: usize,
) -> Result<u64, StoreError> {
    let chunk = chunk.max(1);
    let mut total = 0;
    loop {
        let p = store.purge(finished_before, keys_before, chunk).await?;
        total += p.messages;
        if p.messages < chunk as u64 && p.keys < chunk as u64 {
            return Ok(total);
        }
        tokio::task::yield_now().await;
    }
}

/// The note of a message recovery made `unknown`.
pub const RECOVERED_UNKNOWN: &str = "mailmux stopped after the message was handed to a relay; it may have been delivered and was not sent again";

/// What recovery did at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Left in `sending` before the commit mark: queued again.
    pub requeued: u64,
    /// Marked as committing: may have been delivered, now `unknown`. Their
    /// Message-IDs, for the observers.
    pub unknown: Vec<String>,
}

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The store cannot be opened or written (disk full, read-only, corrupt).
    #[error("the queue store is unavailable: {0}")]
    Unavailable(String),
    /// The write may have been stored: the connection to a shared store
    /// broke after a write was sent and before its answer, and the store
    /// could not be asked again; or SQLite wrote a commit to its log and
    /// the fsync failed (a start after a crash replays it).
    #[error(
        "the queue store did not confirm the write, which may have been stored all the same: {0}"
    )]
    Unconfirmed(String),
    /// The message is no longer this daemon's to change, and the write was
    /// refused: another daemon's lease holds it now (this daemon's lease
    /// ran out, on a shared store), or it was cancelled while a delivery
    /// round held it ([`cancelled_in_round`]).
    #[error("{0}")]
    Fenced(String),
    /// Another daemon holds the store.
    #[error("{path}: the queue store is held by another mailmux daemon (lock taken)")]
    Locked { path: String },
    /// The store was written by a newer mailmux.
    #[error(
        "{path}: the queue store has schema version {found}; this mailmux knows up to {known}. It was written by a newer version"
    )]
    TooNew {
        path: String,
        found: i64,
        known: i64,
    },
}

/// The refusal of a mark or a settle of a message cancelled while a
/// delivery round held it: `mailmux queue cancel` acts on the store while
/// the daemon runs, and a message claimed and loaded is still `queued`
/// there until its mark. Nothing is written; a refused mark sends no final
/// ".", so the message stays `cancelled` and is never sent.
pub(crate) fn cancelled_in_round(message_id: &str) -> StoreError {
    StoreError::Fenced(format!(
        "message {message_id} was cancelled while a delivery round held it; it stays cancelled and is not sent"
    ))
}

/// The result of `cancel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    Cancelled,
    /// Not cancellable in this state.
    Refused(State),
    NotFound,
}

/// A person's decision on a held message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub approve: bool,
    /// Who decided: an operator's name, or the user of an MCP client.
    pub by: String,
    /// The content hash the decision was made on; a mismatch refuses it.
    pub hash: Option<[u8; 32]>,
}

/// The result of `decide`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decided {
    /// Approved: now in this state (`queued` or `scheduled`).
    Released(State),
    Rejected,
    /// The message is not held: its state.
    NotHeld(State),
    /// The approval was for other content.
    HashMismatch,
    NotFound,
}

/// The result of `retry`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Queued for a fresh attempt now (with a fresh `max_age`).
    Queued,
    /// `unknown` may have been delivered: retried only when forced.
    NeedsForce,
    /// Not retryable in this state (held, rejected, an approval that
    /// expired, sending, finished, or its body is gone).
    Refused(State),
    NotFound,
}

/// Whether `retry` may queue a message in `state` with `reason`.
pub fn retryable(state: State, reason: Option<&str>, force: bool) -> Retry {
    match state {
        State::Queued | State::Failed => Retry::Queued,
        // Only an approval releases a message whose approval expired.
        State::Expired if reason != Some(APPROVAL_EXPIRED) => Retry::Queued,
        State::Unknown if force => Retry::Queued,
        State::Unknown => Retry::NeedsForce,
        other => Retry::Refused(other),
    }
}

/// The `reason` of a held message nobody approved in time.
pub const APPROVAL_EXPIRED: &str = "approval_expired";

/// Which messages a listing shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub state: Option<State>,
    /// Only this caller's messages.
    pub caller: Option<String>,
    /// Only the messages of this `send_batch` call.
    pub batch: Option<String>,
    /// Only the messages with this tag.
    pub tag: Option<String>,
    /// Only messages with a recipient that contains this text (any case).
    /// No index serves it: a page of a listing reads at most
    /// [`SEARCH_ROWS`] of the messages the other filters name, and may
    /// hold fewer than its limit, even none, with a cursor to go on.
    pub recipient: Option<String>,
    /// Only messages a report of this reason (`bounced`, `complained`) was
    /// noted on ([`Store::note_reports`]). Searched as `recipient` is.
    pub reported: Option<String>,
    /// Only messages sent with each of these names in their `metadata`,
    /// with its value (their `meta`'s `metadata`). Searched as `recipient`
    /// is.
    pub metadata: Option<std::collections::BTreeMap<String, String>>,
}

impl Filter {
    /// Whether `r` has what the filter searches for: a recipient that
    /// contains `recipient` (any case), a report of the `reported` reason,
    /// and every `metadata` name with its value.
    pub fn search_matches(&self, r: &Record) -> bool {
        self.recipient.as_ref().is_none_or(|needle| {
            let needle = needle.to_lowercase();
            r.to.iter().any(|t| t.to_lowercase().contains(&needle))
        }) && self
            .reported
            .as_ref()
            .is_none_or(|reason| r.reports.iter().any(|report| &report.reason == reason))
            && self
                .metadata
                .as_ref()
                .is_none_or(|wanted| has_metadata(r.meta.as_deref(), wanted))
    }

    /// Whether it names what no index serves (a recipient, a report, a
    /// metadata value), so that a page reads at most [`SEARCH_ROWS`] rows.
    pub fn searches(&self) -> bool {
        self.recipient.is_some() || self.reported.is_some() || self.metadata.is_some()
    }

    /// The same filter without what it searches for.
    pub fn besides_search(&self) -> Filter {
        Filter {
            recipient: None,
            reported: None,
            metadata: None,
            ..self.clone()
        }
    }
}

/// Whether the `metadata` of a message's `meta` (JSON, read once) holds
/// each of `wanted`'s names with its value.
fn has_metadata(meta: Option<&str>, wanted: &std::collections::BTreeMap<String, String>) -> bool {
    if wanted.is_empty() {
        return true;
    }
    let Some(meta) = meta.and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok()) else {
        return false;
    };
    wanted
        .iter()
        .all(|(name, value)| meta["metadata"][name].as_str() == Some(value))
}

/// What [`Store::accept_stream`] is fed.
#[derive(Debug)]
pub enum Feed {
    /// One more message for the transaction.
    Message(Box<NewMessage>),
    /// The last one came: commit.
    Commit,
}

/// The error of a [`Store::accept_stream`] whose feed ended without
/// [`Feed::Commit`]: nothing was stored.
pub(crate) fn abandoned() -> StoreError {
    StoreError::Unavailable("the batch was abandoned before its commit; nothing was stored".into())
}

/// [`Store::accept_marked`] as two writes: the accept, then the mark.
pub(crate) async fn accept_then_mark<S: Store + ?Sized>(
    store: &S,
    m: NewMessage,
) -> Result<(), StoreError> {
    let id = m.message_id.clone();
    store.accept(m).await?;
    store.mark(&id).await
}

/// One bucket of a rate limit that the daemons sharing a store keep
/// together (a caller's `rate` on PostgreSQL), by GCRA: a take moves the
/// bucket's theoretical arrival time on by `cost_ns`, and is refused when
/// that time would then lie more than `period_ns` ahead of now (a full
/// bucket holds one period's count).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateTake {
    /// The bucket: whose, which limit, and for a per-recipient limit which
    /// recipient.
    pub key: String,
    pub cost_ns: i64,
    pub period_ns: i64,
}

/// A queue backend. Every write is durable when it returns `Ok` (for a
/// durable store); the writes of concurrent callers may share one commit.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// `sqlite`, `memory` or `postgres`.
    fn kind(&self) -> &'static str;
    /// This daemon's node id, for a store several daemons share.
    fn node(&self) -> Option<&str> {
        None
    }
    /// How many daemons share the store now (this one included), for a
    /// store several daemons share.
    fn nodes(&self) -> Option<u32> {
        None
    }
    /// The messages this daemon made `unknown` since the last call by
    /// taking over the lease of a daemon that stopped (on a store several
    /// daemons share), for the observers. Recovery at start reports its
    /// own in [`Recovered`].
    fn taken_over_unknown(&self) -> Vec<String> {
        Vec::new()
    }
    /// Whether an accepted message survives a crash.
    fn durable(&self) -> bool;
    /// False once the store can write nothing more in this process (the
    /// SQLite store's writer thread has ended): only a restart helps.
    fn alive(&self) -> bool {
        true
    }
    /// Ends the store's writer as a crash of it would, for fault tests.
    #[cfg(feature = "fault-hooks")]
    fn stop_writer(&self) {}
    /// Whether the daemons sharing this store keep callers' rate limits in
    /// it ([`Store::take_rates`]) rather than each in its own memory.
    fn shares_rates(&self) -> bool {
        false
    }
    /// Takes every one of `takes`, or none when one refuses: `None` when
    /// all were taken, else the index of the first that refused and how
    /// long until it would pass. Only a store that
    /// [`shares_rates`](Store::shares_rates) keeps them.
    async fn take_rates(
        &self,
        _takes: &[RateTake],
    ) -> Result<Option<(usize, Duration)>, StoreError> {
        Err(StoreError::Unavailable(format!(
            "the {} store keeps no rate limits",
            self.kind()
        )))
    }
    /// [`Store::take_rates`] for several messages, taken in their order:
    /// each one's answer. A store may fold them into few statements.
    async fn take_rates_many(
        &self,
        messages: &[&[RateTake]],
    ) -> Vec<Result<Option<(usize, Duration)>, StoreError>> {
        let mut answers = Vec::with_capacity(messages.len());
        for takes in messages {
            answers.push(self.take_rates(takes).await);
        }
        answers
    }
    /// Stores a new message, or finds its idempotency key.
    async fn accept(&self, m: NewMessage) -> Result<Accepted, StoreError>;
    /// Stores several messages in one transaction: all of them, or (on an
    /// error) none. An `atomic` batch is stored only if none of its keys
    /// conflicts; otherwise none of it is ([`atomic_answers`]).
    async fn accept_many(
        &self,
        ms: Vec<NewMessage>,
        atomic: bool,
    ) -> Result<Vec<Accepted>, StoreError>;
    /// Stores the messages `feed` brings in one transaction, each as it
    /// comes, so that the caller need not hold them all at once: all of
    /// them once [`Feed::Commit`] comes, none if the feed ends without it
    /// (or, when `atomic`, if a key conflicts). A shared store leases none
    /// of them to this daemon: the runner's polls deliver them. The
    /// default (the memory store's) gathers them and calls
    /// [`Store::accept_many`].
    async fn accept_stream(
        &self,
        mut feed: tokio::sync::mpsc::Receiver<Feed>,
        atomic: bool,
    ) -> Result<Vec<Accepted>, StoreError> {
        let mut ms = Vec::new();
        loop {
            match feed.recv().await {
                Some(Feed::Message(m)) => ms.push(*m),
                Some(Feed::Commit) => return self.accept_many(ms, atomic).await,
                None => return Err(abandoned()),
            }
        }
    }
    /// Marks a message as committing to a relay (state `sending`): after
    /// this, a crash makes it `unknown`, never resent.
    async fn mark(&self, message_id: &str) -> Result<(), StoreError>;
    /// Records the outcome of a delivery round.
    async fn settle(&self, message_id: &str, s: Settle) -> Result<(), StoreError>;
    /// Stores a new message without an idempotency key that is committing
    /// to a relay: [`Store::accept`] then [`Store::mark`], in one write
    /// where the store can. A caller that waits for the outcome is told
    /// nothing before this, so its message is stored here, not earlier.
    /// A marked message is never sent again from the store, so the store
    /// may leave its bytes out: the round's [`Settle::body`] brings them
    /// when its outcome keeps them.
    async fn accept_marked(&self, m: NewMessage) -> Result<(), StoreError> {
        accept_then_mark(self, m).await
    }
    /// Stores a new message without an idempotency key together with the
    /// outcome of its first round, which never reached [`Store::mark`]:
    /// [`Store::accept`] then [`Store::settle`], in one write where the
    /// store can.
    async fn accept_settled(&self, m: NewMessage, s: Settle) -> Result<(), StoreError> {
        let id = m.message_id.clone();
        self.accept(m).await?;
        self.settle(&id, s).await
    }
    /// [`Store::accept_settled`] after an [`Store::accept_marked`] of `m`
    /// that ended [`StoreError::Unconfirmed`], and whose final "." was
    /// therefore never sent: that write may have stored the message as
    /// committing. If it did, that row (still this daemon's, still
    /// committing) takes the outcome `s`, with the message's bytes where
    /// `s` keeps them, so that it is not taken for a message that may have
    /// been delivered. If it did not, the message is stored as
    /// [`Store::accept_settled`] stores it. A store that never answers
    /// `Unconfirmed` needs no more than that.
    async fn accept_settled_unconfirmed(&self, m: NewMessage, s: Settle) -> Result<(), StoreError> {
        self.accept_settled(m, s).await
    }
    /// `scheduled` or `queued` → `cancelled`.
    async fn cancel(&self, message_id: &str) -> Result<Cancel, StoreError>;
    /// `held` → `queued` (or `scheduled`) when approved, `rejected` when not.
    async fn decide(&self, message_id: &str, d: Decision) -> Result<Decided, StoreError>;
    /// `held` past its deadline → `expired`; returns their ids.
    async fn expire_held(&self, now: Millis) -> Result<Vec<String>, StoreError>;
    /// Queues a `queued`, `failed` or `expired` message (or, forced, an
    /// `unknown` one) for a fresh attempt now, with a fresh `max_age` and
    /// its retries started over (`rounds` 0); see [`retryable`].
    async fn retry(&self, message_id: &str, force: bool) -> Result<Retry, StoreError>;
    /// Ids of messages due by `now`: the `High` ones first, then the rest,
    /// each oldest due first.
    async fn due(&self, now: Millis, limit: usize) -> Result<Vec<String>, StoreError>;
    /// Messages [`Store::due`] gave that this daemon does not deliver now
    /// (no round slot, no room for their bytes): a shared store lets go of
    /// their leases, so that another daemon may take them at once. The
    /// default (one daemon per store) has nothing to let go of.
    async fn let_go(&self, _ids: &[String]) -> Result<(), StoreError> {
        Ok(())
    }
    /// The earliest due time of a waiting message.
    async fn next_due(&self) -> Result<Option<Millis>, StoreError>;
    /// A waiting message with its body, for delivery.
    async fn load(&self, message_id: &str) -> Result<Option<Pending>, StoreError>;
    /// [`Store::load`] of each of `ids`, in any order; an id with no such
    /// message (or none with its body) is left out. Taken in the order of
    /// `ids`, the messages loaded stop at the one whose bytes bring the
    /// total to `max_bytes`: the first found is loaded whenever
    /// `max_bytes` is above 0, and the total exceeds `max_bytes` by less
    /// than one message. SQLite reads
    /// them in one read transaction, PostgreSQL in one statement; the
    /// default (the memory store's) loads each in turn.
    async fn load_many(&self, ids: &[String], max_bytes: u64) -> Result<Vec<Pending>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        let mut total = 0u64;
        for id in ids {
            if total >= max_bytes {
                break;
            }
            if let Some(p) = self.load(id).await? {
                total += p.bytes.len() as u64;
                out.push(p);
            }
        }
        Ok(out)
    }
    async fn get(&self, message_id: &str) -> Result<Option<Record>, StoreError>;
    /// Whether other processes write the store too (the other daemons of a
    /// shared store, the queue command), so that the watched messages are
    /// read for their changes ([`Queue::watch`]).
    fn others_write(&self) -> bool {
        false
    }
    /// The state of each of `ids` that exists, with a measure of its
    /// reports that grows with each one noted, in no order: what a watch
    /// compares.
    async fn prints(&self, ids: &[String]) -> Result<Vec<(String, Print)>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(r) = self.get(id).await? {
                out.push((r.message_id, (r.state, r.reports.len() as u64)));
            }
        }
        Ok(out)
    }
    /// The message a caller's idempotency key names.
    async fn find_key(&self, caller: Option<&str>, key: &str)
    -> Result<Option<String>, StoreError>;
    /// Newest first; `cursor` is the `next` of the page before.
    async fn list(
        &self,
        filter: &Filter,
        limit: usize,
        cursor: Option<i64>,
    ) -> Result<(Vec<Summary>, Option<i64>), StoreError>;
    /// How many of the messages `filter` names are in each state, states
    /// with none left out. For a batch or a tag: it reads through that
    /// index, every message of it once.
    async fn count(&self, filter: &Filter) -> Result<Vec<(State, u64)>, StoreError>;
    async fn stats(&self) -> Result<Stats, StoreError>;
    /// Records the outcome of the message's Sent copy (`copied`, or
    /// `failed: <reason>`), dropping the bytes a finished message kept only
    /// for it; a message purged meanwhile is left alone.
    async fn note_copy(&self, message_id: &str, outcome: &str) -> Result<(), StoreError>;
    /// Adds to the message's reports each one whose recipient and reason
    /// it does not hold yet, and answers those (none for a message purged
    /// meanwhile). Daemons that share a store note each report once.
    async fn note_reports(
        &self,
        message_id: &str,
        reports: Vec<ReportRecord>,
    ) -> Result<Vec<ReportRecord>, StoreError>;
    /// Sent copies still `pending`, for this daemon to make: with `mine`,
    /// its own of messages last changed before `before` (the copies a crash
    /// interrupted, at the next start); on a shared store, also those of
    /// daemons not seen within one lease, taken over. A store that records
    /// no pending copy has none.
    async fn pending_copies(
        &self,
        _before: Millis,
        _mine: bool,
    ) -> Result<Vec<CopyDue>, StoreError> {
        Ok(Vec::new())
    }
    /// Applies the crash rule to messages left in `sending`.
    async fn recover(&self) -> Result<Recovered, StoreError>;
    /// Deletes up to `limit` finished messages older than `finished_before`
    /// (oldest first) and up to `limit` keys older than `keys_before`, in
    /// one write. [`purge`] repeats it until nothing is left.
    async fn purge(
        &self,
        finished_before: Millis,
        keys_before: Millis,
        limit: usize,
    ) -> Result<Purged, StoreError>;
    /// Adds each entry whose address is not listed yet to the suppression
    /// list (a listed address keeps its entry); returns the addresses it
    /// added.
    async fn suppress(&self, entries: Vec<Suppression>) -> Result<Vec<String>, StoreError>;
    /// Takes an address off the suppression list; whether it was on it.
    async fn unsuppress(&self, address: &str) -> Result<bool, StoreError>;
    /// A number that changes with every change of the suppression list, by
    /// any process or daemon on the store: what a daemon polls to know when
    /// to read the list again.
    async fn suppression_version(&self) -> Result<i64, StoreError>;
    /// The entry of one address (as listed), when it is listed.
    async fn suppression(&self, address: &str) -> Result<Option<Suppression>, StoreError>;
    /// One page of the suppression list, by address, read through the
    /// store's index of addresses: what the console and `/admin/` show
    /// without reading the whole list.
    async fn suppression_page(
        &self,
        query: &SuppressionQuery,
    ) -> Result<SuppressionPage, StoreError>;
    /// The changes of the suppression list after version `since`, oldest
    /// first, and the version they bring it to; `None` when the store no
    /// longer holds every one of them (more than
    /// [`SUPPRESSION_VERSIONS_KEPT`] versions ago, before the store kept
    /// changes, or a write of more than [`SUPPRESSION_CHANGE_ROWS`]
    /// addresses), and the whole list must be read instead.
    async fn suppression_changes(
        &self,
        since: i64,
    ) -> Result<Option<(i64, Vec<SuppressionChange>)>, StoreError>;
    /// How far the reports of one mailbox have been read: its UIDVALIDITY
    /// and the highest UID read, by the mailbox's name (`relay` and the
    /// folder). `None` before a first read.
    async fn report_cursor(&self, mailbox: &str) -> Result<Option<(u32, u32)>, StoreError>;
    /// Records that the reports of `mailbox` up to `uid` were read. A
    /// cursor only moves forward under one UIDVALIDITY (a second daemon
    /// reading the same mailbox behind the first cannot take it back); a
    /// new UIDVALIDITY replaces it.
    async fn advance_report_cursor(
        &self,
        mailbox: &str,
        validity: u32,
        uid: u32,
    ) -> Result<(), StoreError>;
    /// Whether delivery is paused, and since when and by whom: what every
    /// daemon on the store reads before it starts rounds.
    async fn paused(&self) -> Result<Option<Paused>, StoreError>;
    /// Pauses delivery (`Some`) or resumes it (`None`); whether that changed
    /// anything. A pause while paused keeps the first one's time and name.
    async fn set_paused(&self, pause: Option<Paused>) -> Result<bool, StoreError>;
    /// Finishes the writes already sent and stops taking new ones, leaving
    /// the store whole on disk: the daemon's last act on it at shutdown.
    async fn close(&self) {}
}

#[cfg(test)]
mod tests {
    use super::bare_id;

    #[test]
    fn an_id_is_taken_bare_or_as_a_header_writes_it() {
        for given in [
            "01a2@mailmux.localhost",
            " 01a2@mailmux.localhost\n",
            "<01a2@mailmux.localhost>",
            " < 01a2@mailmux.localhost > ",
        ] {
            assert_eq!(bare_id(given), "01a2@mailmux.localhost", "{given:?}");
        }
        // Only a pair of brackets around the whole id is taken off.
        assert_eq!(
            bare_id("<01a2@mailmux.localhost"),
            "<01a2@mailmux.localhost"
        );
        assert_eq!(bare_id("<>"), "");
        assert_eq!(bare_id("  "), "");
    }
}
