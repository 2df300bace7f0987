//! The queue's handle and runner: accept, deliver in rounds, settle, retry.
//!
//! A round is one [`Dispatcher::send_marked`] of one message (with failover
//! across relays), followed by one settle write. A caller that waits runs
//! the first round itself (without a key, its message is stored by that
//! round's commit mark or settle, not before); every other round is started by the runner, which
//! takes new messages from a bounded channel and polls the store for due
//! ones (retries, scheduled mail, mail recovered after a crash, mail another
//! process queued, a batch stored as it was composed through a [`Stream`]).
//! The runner holds at most [`RUNNER_BYTES`] of messages at once; what does
//! not fit waits in the store. A message is delivered by at most one round
//! at a time: the `claimed` set is the lock, taken before a message is
//! stored or loaded.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use lettre::Address;
use rand::Rng;
use tokio::sync::{Notify, Semaphore, broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::reserve::{Reserve, Short};
use super::{
    Accepted, AttemptRecord, Cancel, CopyDue, Decided, Decision, Feed, Filter, Hold, Millis,
    NewMessage, Paused, Pending, QueueSettings, RateTake, Record, RejectedRecord, Settle, State,
    Stats, Store, StoreError, StoreKind, Summary, now_millis, to_millis,
};
use crate::dispatcher::{Dispatcher, cancelled};
use crate::mail::{CommitMark, FailureReason, Mail, Reply, Report, Status};
use crate::tally::Tally;

/// New messages waiting for the runner. Past this, a message stays in the
/// store and the next poll takes it: the channel bounds memory, not intake.
const READY_CAPACITY: usize = 1024;
/// How often the runner looks for due messages when nothing woke it.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often it does while every relay backs off: a round then only defers
/// what it claims (or expires it, past `max_age`), and on a shared queue
/// the daemons whose relays are up should take the mail first.
const OUTAGE_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Due messages taken per poll at most.
const POLL_BATCH: usize = 256;
/// While more is due than a poll took, the rounds it started wake the
/// runner once this few of them are left, so that a backlog (mail recovered
/// after a crash, a burst of scheduled or retried mail) is delivered as fast
/// as the relays take it, not one poll's worth per [`POLL_INTERVAL`].
const POLL_REFILL: usize = POLL_BATCH / 2;
/// The bytes of the messages the runner holds, at most (give or take one
/// message): those in its channel and those of its rounds. A backlog of
/// large messages (mail recovered after a restart, a retry wave) is loaded
/// a part at a time, not a page of [`POLL_BATCH`] of them at once, and a
/// burst of large `wait: false` calls leaves what does not fit in the
/// store for the polls, rather than in memory. A page of 1 KiB or 100 KiB
/// messages stays under it.
const RUNNER_BYTES: u64 = 64 * 1024 * 1024;
/// Messages of a [`Stream`] its caller may hand on before the store has
/// written them: what a batch holds at once beyond the one in hand.
const STREAM_AHEAD: usize = 4;
/// State changes a slow listener may fall behind by before it misses some.
const CHANGES_CAPACITY: usize = 1024;
/// How often finished messages and old keys are purged at most: a quarter
/// of `retain`, between 1 s and this, so that a short `retain` holds the
/// store to about that much mail.
const PURGE_INTERVAL: Duration = Duration::from_secs(60);
/// How often held messages past their approval deadline are expired.
const HELD_INTERVAL: Duration = Duration::from_secs(1);
/// How often a caller that waits re-reads a shared store, where another
/// daemon may deliver the message.
const SHARED_WAIT_POLL: Duration = Duration::from_millis(250);
/// How long shutdown waits for the settle writes of rounds that ended.
const SETTLE_GRACE: Duration = Duration::from_secs(2);
/// How long before `max_age` ends a message's last retry is due, when its
/// next retry would fall after it: room for the runner to claim it (it
/// polls every 100 ms), since no round starts once `max_age` has passed.
const LAST_RETRY_MARGIN: Duration = Duration::from_secs(1);

/// A message for the queue.
#[derive(Debug)]
pub struct Submit {
    /// The message; its `deadline` bounds a waiting caller's first round.
    pub mail: Mail,
    /// Not before this time.
    pub send_at: Option<SystemTime>,
    /// The caller's idempotency key and the hash of the call's content.
    pub idempotency: Option<(String, [u8; 32])>,
    /// Wait for the outcome until `mail.deadline`.
    pub wait: bool,
    /// The caller's name, stored with the message.
    pub caller: Option<String>,
    /// The daemon's audit description of the message (opaque here).
    pub meta: Option<String>,
    /// Store it `held` for approval; nothing delivers it until approved.
    pub hold: Option<Hold>,
    /// The `send_batch` call it came in.
    pub batch: Option<String>,
    /// The caller's label for it, which a listing filters by.
    pub tag: Option<String>,
    /// How long it may wait for delivery once due, when shorter than its
    /// caller's `max_age` (a one-time code worth nothing after minutes).
    pub max_age: Option<Duration>,
    /// Fires when the caller cancels a call that waits: a message without
    /// an idempotency key that no relay has begun to commit (before its
    /// final ".") is then `cancelled` and never sent. One a relay is
    /// committing goes on, and so does one with a key, which a retry of the
    /// call follows. Heeded by [`Queue::submit`]; a batch's call gives its
    /// token to [`Queue::submit_many`] or [`Stream::commit`] instead.
    pub cancel: Option<CancellationToken>,
}

/// What happened to a message, as the audit log names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Stored for delivery.
    Accepted,
    /// Stored for approval.
    Held,
    Approved,
    Rejected,
    Sent,
    Partial,
    /// A round delivered to some recipients and deferred the others, which
    /// wait for a retry.
    Deferred,
    Failed,
    Unknown,
    Expired,
    Cancelled,
    /// A bounce report that came back by mail after a relay took the
    /// message named one of its recipients ([`Queue::note_reports`]).
    Bounced,
    /// A complaint (spam) report named one of its recipients.
    Complained,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Accepted => "accepted",
            Action::Held => "held",
            Action::Approved => "approved",
            Action::Rejected => "rejected",
            Action::Sent => "sent",
            Action::Partial => "partial",
            Action::Deferred => "deferred",
            Action::Failed => "failed",
            Action::Unknown => "unknown",
            Action::Expired => "expired",
            Action::Cancelled => "cancelled",
            Action::Bounced => "bounced",
            Action::Complained => "complained",
        }
    }

    /// Whether it tells of a report on a message, not of a change of its
    /// state.
    pub fn is_report(self) -> bool {
        matches!(self, Action::Bounced | Action::Complained)
    }

    /// The action of a round that ended in `state`; none for a retry.
    fn of_outcome(state: State) -> Option<Action> {
        Some(match state {
            State::Sent => Action::Sent,
            State::Partial => Action::Partial,
            State::Failed => Action::Failed,
            State::Unknown => Action::Unknown,
            State::Expired => Action::Expired,
            _ => return None,
        })
    }
}

/// One audited change of one message. Never holds the body.
#[derive(Debug)]
pub struct Event<'a> {
    pub action: Action,
    pub message_id: &'a str,
    pub caller: Option<&'a str>,
    pub meta: Option<&'a str>,
    pub from: Option<&'a str>,
    pub to: &'a [String],
    pub size: u64,
    pub relay: Option<&'a str>,
    /// The last SMTP reply code of the round.
    pub code: Option<u16>,
    pub reason: Option<&'a str>,
    /// Who approved or rejected it.
    pub decided_by: Option<&'a str>,
    /// The recipients that have the message for certain.
    pub accepted: &'a [String],
    /// The recipients refused for good, each with its reply.
    pub rejected: &'a [RejectedRecord],
    /// The recipients that wait for a retry while others have the message.
    pub deferred: Vec<&'a str>,
}

impl<'a> Event<'a> {
    /// The change `action` of the stored message `r`.
    pub fn of(action: Action, r: &'a Record, decided_by: Option<&'a str>) -> Event<'a> {
        Event {
            action,
            message_id: &r.message_id,
            caller: r.caller.as_deref(),
            meta: r.meta.as_deref(),
            from: r.from.as_deref(),
            to: &r.to,
            size: r.size,
            relay: r.relay.as_deref(),
            code: r.attempts.iter().rev().find_map(|a| a.code),
            reason: r.reason.as_deref(),
            decided_by: decided_by.or(r.decided_by.as_deref()),
            accepted: &r.accepted,
            rejected: &r.rejected,
            deferred: r.deferred(),
        }
    }
}

/// A message a relay took for the first time (`sent`, `partial`, or
/// `queued` while some recipients were deferred), with the exact bytes it
/// was given: what a copy in the Sent folder files. The bytes are the body:
/// never log them.
#[derive(Debug)]
pub struct Delivered<'a> {
    pub message_id: &'a str,
    pub relay: &'a str,
    /// The envelope's recipients.
    pub to: &'a [String],
    pub bytes: &'a Arc<[u8]>,
}

/// Hears every audited change, after it is stored. Called on the task that
/// made the change: it must not block for long.
pub trait Observer: Send + Sync + std::fmt::Debug {
    fn event(&self, e: &Event<'_>);

    /// A relay took a message whose copy it files ([`Observer::copies`]):
    /// once the outcome, with the copy pending, is stored.
    fn delivered(&self, _d: &Delivered<'_>) {}

    /// Whether it files a copy of what `relay` takes (then the settle
    /// records the copy as pending, and it must record the outcome with
    /// [`Queue::note_copy`]).
    fn copies(&self, _relay: &str) -> bool {
        false
    }

    /// At shutdown, once the last delivery ended: finishes the work it
    /// still holds for messages already delivered, by `until`, and records
    /// in the store what it could not finish. The store stays open until
    /// this returns.
    fn drain(&self, _until: Instant) -> Drain<'_> {
        Box::pin(async {})
    }
}

/// Decides whether a message may still go when its round comes (the
/// daemon's suppression list), so that a message accepted before a
/// recipient was listed (scheduled, or waiting for a retry) is not sent to
/// it. Called before each round of a message that no recipient has yet,
/// and for each recipient still waiting for a message others have: it must
/// be quick.
pub trait Screen: Send + Sync + std::fmt::Debug {
    /// The first of `to` that may no longer get mail from `caller`, if any.
    fn refused(&self, caller: Option<&str>, to: &[String]) -> Option<String>;

    /// How long a message of `caller` may wait for delivery, where its
    /// caller's policy says otherwise than `max_age` ([`Settings`]).
    fn max_age(&self, _caller: Option<&str>) -> Option<Duration> {
        None
    }
}

/// The reason a message [`Screen`] refused is cancelled with.
pub const SUPPRESSED: &str = "recipient_suppressed";

/// What [`Observer::drain`] returns.
pub type Drain<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// Several observers (the audit log, the metrics, the Sent copy), each told
/// in turn.
impl Observer for Vec<Arc<dyn Observer>> {
    fn event(&self, e: &Event<'_>) {
        for o in self {
            o.event(e);
        }
    }

    fn delivered(&self, d: &Delivered<'_>) {
        for o in self {
            o.delivered(d);
        }
    }

    fn copies(&self, relay: &str) -> bool {
        self.iter().any(|o| o.copies(relay))
    }

    fn drain(&self, until: Instant) -> Drain<'_> {
        Box::pin(async move {
            for o in self {
                o.drain(until).await;
            }
        })
    }
}

impl Submit {
    /// The message as it is stored when accepted at `now`.
    fn stored_at(&self, now: Millis) -> NewMessage {
        let m = &self.mail;
        NewMessage {
            message_id: m.message_id.clone(),
            from: m.from.as_ref().map(ToString::to_string),
            to: m.to.iter().map(ToString::to_string).collect(),
            bytes: m.bytes.clone(),
            prefer: m.prefer.clone(),
            queued_at: now,
            due_at: self.send_at.map_or(now, to_millis).max(now),
            idempotency: self.idempotency.clone(),
            caller: self.caller.clone(),
            meta: self.meta.clone(),
            hold: self.hold.clone(),
            only: m.only.clone(),
            batch: self.batch.clone(),
            tag: self.tag.clone(),
            max_age: self
                .max_age
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            priority: m.priority,
        }
    }
}

/// One message entered a state, or had a report noted on it in the state
/// it is in (stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub message_id: String,
    pub state: State,
}

/// What the queue did with a message.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// The message as stored now.
    pub record: Record,
    /// The report of the last round this call waited for, if any.
    pub report: Option<Report>,
    /// The idempotency key named an earlier message: nothing new was stored.
    pub replay: bool,
}

/// Why the queue refused a message or a request.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum QueueError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("mailmux is shutting down and takes no new messages")]
    ShuttingDown,
    #[error(
        "the idempotency key was used for a different message ({message_id}); nothing was sent"
    )]
    Conflict { message_id: String },
    #[error("no message {0:?}")]
    NotFound(String),
    #[error("the call was cancelled before its message was stored; nothing was sent")]
    Cancelled,
    #[error("not queued: another message of the atomic batch was refused, so none was queued")]
    Withheld,
    #[error(
        "the queue's file system has {} MiB free, under queue.min_free ({} MiB): new mail is refused until there is room; mail already accepted is still delivered",
        .0.free >> 20,
        .0.min >> 20
    )]
    Full(Short),
}

/// The handle the daemon holds on the queue.
#[derive(Debug, Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn Store>,
    dispatcher: Dispatcher,
    settings: QueueSettings,
    /// False for a hand-off queue: it stores messages for the daemon that
    /// owns the store, and delivers nothing itself.
    delivers: bool,
    /// Messages a round holds (or is about to): the per-message lock.
    claimed: Mutex<HashSet<String>>,
    ready: mpsc::Sender<Pending>,
    wake: Notify,
    /// Every state change of every message, for whoever listens (resource
    /// subscriptions). Sending costs nothing while nobody listens.
    changes: broadcast::Sender<Change>,
    /// The messages someone watches for the changes other processes make
    /// ([`Queue::watch`]), and the poll that reads them, once started.
    watches: Arc<super::watch::Watches>,
    watching: OnceLock<()>,
    /// Callers waiting for the next round of a message.
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<Report>>>>,
    /// The tokens of callers that wait and may cancel (`Submit::cancel`),
    /// by message: the runner's rounds of the message heed them too.
    cancels: Mutex<HashMap<String, CancellationToken>>,
    /// Rounds at once, across callers and the runner (`max_in_flight`).
    slots: Arc<Semaphore>,
    /// Rounds started by polls and not ended yet.
    polled: AtomicUsize,
    /// The bytes of the messages the runner holds ([`RUNNER_BYTES`]).
    runner_bytes: AtomicU64,
    /// The last poll found as many due messages as it asked for: more may
    /// be due (see [`POLL_REFILL`]).
    backlog: AtomicBool,
    /// When a poll last ran while every relay backed off (milliseconds of
    /// wall time).
    outage_polled: AtomicU64,
    accepting: AtomicBool,
    /// False after a write failed, until one succeeds.
    available: AtomicBool,
    rounds: Tally,
    stop: tokio_util::sync::CancellationToken,
    observer: OnceLock<Arc<dyn Observer>>,
    /// Whether a stored message may still go when its round comes.
    screen: OnceLock<Arc<dyn Screen>>,
    /// The runner's end of `ready`, until [`Queue::run`] starts the runner.
    idle: Mutex<Option<mpsc::Receiver<Pending>>>,
    /// Messages recovery made `unknown` that the observer has not heard
    /// of yet.
    untold: Mutex<Vec<String>>,
    /// The free space new mail must leave (`queue.min_free`, SQLite only).
    reserve: Option<Reserve>,
    /// Delivery paused by an operator ([`Store::paused`]), as last read
    /// from the store or set through this queue, and how many times it was
    /// set here (a read that began before a setting is stale); `paused`
    /// says whether without the lock.
    pause: Mutex<PauseState>,
    paused: AtomicBool,
}

/// The pause of delivery as a daemon holds it.
#[derive(Debug, Default)]
struct PauseState {
    current: Option<Paused>,
    /// How many times it was set through this queue.
    settings: u64,
}

impl PauseState {
    /// Takes `pause` as set through this queue (`read_after: None`), or as
    /// read from the store by a read that began after `read_after`
    /// settings; a read that began before a later setting is stale and
    /// changes nothing. Whether the pause is in force now.
    fn take(&mut self, pause: Option<Paused>, read_after: Option<u64>) -> bool {
        match read_after {
            Some(n) if n != self.settings => return self.current.is_some(),
            Some(_) => {}
            None => self.settings += 1,
        }
        self.current = pause;
        self.current.is_some()
    }
}

/// The crash marker of one message: the store's `mark`, or for a message
/// not stored yet, its `accept_marked`.
#[derive(Debug)]
struct StoreMark {
    inner: Arc<Inner>,
    message_id: String,
    /// The message of a waiting call without a key, until it is stored.
    fresh: Mutex<Option<NewMessage>>,
    /// An `accept_marked` of `fresh` ended unconfirmed: it may have stored
    /// the message as committing, though its "." was not sent.
    unconfirmed: AtomicBool,
    /// Held while the mark is written, and while the round's end writes
    /// the outcome: a round its caller cancelled (or whose deadline
    /// passed) ends while its relay may still be writing the mark, and the
    /// outcome must follow that write (PostgreSQL writes marks and outcomes
    /// on separate connections). Its value: the round has ended, and a mark
    /// that comes after is refused, so that nothing is sent.
    writing: tokio::sync::Mutex<bool>,
}

impl StoreMark {
    fn take_fresh(&self) -> Option<NewMessage> {
        self.fresh.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl CommitMark for StoreMark {
    fn record(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let ended = self.writing.lock().await;
            if *ended {
                return Err("the delivery round had ended".into());
            }
            let inner = &self.inner;
            // Not written again after an unconfirmed try: the row that try
            // may have left would refuse it, and with it every message
            // written in the same statement. The round's end settles it.
            if self.unconfirmed.load(Ordering::Acquire) {
                return Err("the queue store did not confirm an earlier write of it".into());
            }
            let result = match self.take_fresh() {
                None => inner.store.mark(&self.message_id).await,
                Some(new) => {
                    let result = inner.store.accept_marked(new.clone()).await;
                    match &result {
                        Ok(()) => inner.notify(
                            Action::Accepted,
                            &new.record(State::Queued, new.queued_at),
                            None,
                        ),
                        // Not stored (or not known to be): a later attempt
                        // stores it, or the round's end does.
                        Err(e) => {
                            if matches!(e, StoreError::Unconfirmed(_)) {
                                self.unconfirmed.store(true, Ordering::Release);
                            }
                            *self.fresh.lock().unwrap_or_else(|e| e.into_inner()) = Some(new)
                        }
                    }
                    result
                }
            };
            inner.note_write(&result);
            if result.is_ok() {
                inner.changed(&self.message_id, State::Sending);
            }
            result.map_err(|e| e.to_string())
        })
    }
}

impl Queue {
    /// Recovers the store (the crash rule), then starts the runner and the
    /// purge loop with no observer: [`Queue::open`] then [`Queue::run`].
    pub async fn start(
        store: Arc<dyn Store>,
        dispatcher: Dispatcher,
        settings: QueueSettings,
        max_rounds: usize,
    ) -> Result<Queue, StoreError> {
        let queue = Queue::open(store, dispatcher, settings, max_rounds).await?;
        queue.run(None);
        Ok(queue)
    }

    /// Recovers the store (the crash rule). Nothing is delivered until
    /// [`Queue::run`], so that the observers are told of every round.
    pub async fn open(
        store: Arc<dyn Store>,
        dispatcher: Dispatcher,
        settings: QueueSettings,
        max_rounds: usize,
    ) -> Result<Queue, StoreError> {
        let recovered = store.recover().await?;
        if recovered.requeued > 0 || !recovered.unknown.is_empty() {
            tracing::warn!(
                requeued = recovered.requeued,
                unknown = recovered.unknown.len(),
                "recovered the queue: messages interrupted before their final \".\" are queued again; those interrupted after it are unknown and not resent"
            );
        }
        if !store.durable() {
            tracing::warn!(
                store = store.kind(),
                "the queue is in memory: accepted mail that is not yet delivered is lost on a crash or restart"
            );
        }
        let paused = store.paused().await?;
        let inner = Inner::new(store, dispatcher, settings, max_rounds, true);
        *inner.untold.lock().unwrap_or_else(|e| e.into_inner()) = recovered.unknown;
        inner.note_pause(paused, None);
        Ok(Queue { inner })
    }

    /// Attaches the observer of audited changes (the audit log, the
    /// metrics, the Sent copy), then starts the runner and the purge loop.
    /// Later calls, and calls on a hand-off queue, start nothing.
    pub fn run(&self, observer: Option<Arc<dyn Observer>>) {
        let inner = &self.inner;
        let Some(ready) = inner.idle.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        if let Some(o) = observer {
            let _ = inner.observer.set(o);
        }
        if inner.delivers {
            tokio::spawn(run(inner.clone(), ready));
            tokio::spawn(purge_loop(inner.clone()));
        }
    }

    /// Attaches the screen of stored messages ([`Screen`]); before
    /// [`Queue::run`], so that no round starts without it. Later calls
    /// change nothing.
    pub fn screen(&self, screen: Arc<dyn Screen>) {
        let _ = self.inner.screen.set(screen);
    }

    /// False for a hand-off queue, which stores messages for the daemon
    /// that owns the store and delivers nothing itself.
    pub fn delivers(&self) -> bool {
        self.inner.delivers
    }

    /// A queue over a store that a running daemon owns (opened without its
    /// lock): `submit` stores the message and the daemon's runner, which
    /// polls the store, delivers it. No recovery, runner or purge here.
    /// The pause in force is read once, so that an answer can say that
    /// the daemon will not deliver yet.
    pub async fn handoff(
        store: Arc<dyn Store>,
        dispatcher: Dispatcher,
        settings: QueueSettings,
    ) -> Result<Queue, StoreError> {
        let paused = store.paused().await?;
        let inner = Inner::new(store, dispatcher, settings, 1, false);
        inner.note_pause(paused, None);
        Ok(Queue { inner })
    }
}

impl Inner {
    /// Room for `bytes` more of new mail under `queue.min_free`.
    fn take_room(&self, bytes: usize) -> Result<(), QueueError> {
        match &self.reserve {
            Some(r) => r.take(bytes as u64).map_err(QueueError::Full),
            None => Ok(()),
        }
    }

    fn new(
        store: Arc<dyn Store>,
        dispatcher: Dispatcher,
        settings: QueueSettings,
        max_rounds: usize,
        delivers: bool,
    ) -> Arc<Inner> {
        let (ready, ready_rx) = mpsc::channel(READY_CAPACITY);
        let reserve = match &settings.store {
            StoreKind::Sqlite { path } => Reserve::new(path, settings.min_free),
            _ => None,
        };
        Arc::new(Inner {
            store,
            dispatcher,
            settings,
            delivers,
            changes: broadcast::channel(CHANGES_CAPACITY).0,
            watches: Arc::default(),
            watching: OnceLock::new(),
            claimed: Mutex::new(HashSet::new()),
            ready,
            wake: Notify::new(),
            waiters: Mutex::new(HashMap::new()),
            cancels: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(max_rounds.max(1))),
            polled: AtomicUsize::new(0),
            runner_bytes: AtomicU64::new(0),
            backlog: AtomicBool::new(false),
            outage_polled: AtomicU64::new(0),
            accepting: AtomicBool::new(true),
            available: AtomicBool::new(true),
            rounds: Tally::default(),
            stop: tokio_util::sync::CancellationToken::new(),
            observer: OnceLock::new(),
            screen: OnceLock::new(),
            idle: Mutex::new(Some(ready_rx)),
            untold: Mutex::new(Vec::new()),
            reserve,
            pause: Mutex::new(PauseState::default()),
            paused: AtomicBool::new(false),
        })
    }
}

impl Queue {
    pub fn settings(&self) -> &QueueSettings {
        &self.inner.settings
    }

    /// How long a message of `caller` may wait for delivery, as its rounds
    /// are given it now: the caller's own `max_age`, else the queue's (as
    /// it started: a reload does not change it).
    pub fn max_age(&self, caller: Option<&str>) -> Duration {
        self.inner.max_age_for(caller, None)
    }

    pub fn store_kind(&self) -> &'static str {
        self.inner.store.kind()
    }

    /// False once the store can write nothing more ([`Store::alive`]).
    pub fn store_alive(&self) -> bool {
        self.inner.store.alive()
    }

    /// Ends the store's writer, for fault tests.
    #[cfg(feature = "fault-hooks")]
    pub fn stop_store_writer(&self) {
        self.inner.store.stop_writer()
    }

    pub fn durable(&self) -> bool {
        self.inner.store.durable()
    }

    /// This daemon's node id on a shared store.
    pub fn node(&self) -> Option<&str> {
        self.inner.store.node()
    }

    /// How many daemons share the store (a shared store only).
    pub fn nodes(&self) -> Option<u32> {
        self.inner.store.nodes()
    }

    /// Whether callers' rate limits are kept in the store, for every daemon
    /// that shares it ([`Store::shares_rates`]).
    pub fn shares_rates(&self) -> bool {
        self.inner.store.shares_rates()
    }

    /// [`Store::take_rates`].
    pub async fn take_rates(
        &self,
        takes: &[RateTake],
    ) -> Result<Option<(usize, Duration)>, StoreError> {
        self.inner.store.take_rates(takes).await
    }

    /// [`Store::take_rates_many`].
    pub async fn take_rates_many(
        &self,
        messages: &[&[RateTake]],
    ) -> Vec<Result<Option<(usize, Duration)>, StoreError>> {
        self.inner.store.take_rates_many(messages).await
    }

    /// False while the store refuses writes.
    pub fn available(&self) -> bool {
        self.inner.available.load(Ordering::Acquire)
    }

    /// The bytes free on the store's file system and `queue.min_free`,
    /// when a reserve applies (a `sqlite` store with `min_free` above 0).
    pub fn room(&self) -> Option<(u64, u64)> {
        self.inner.reserve.as_ref().map(|r| (r.free(), r.min()))
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        &self.inner.dispatcher
    }

    /// Stores a message durably, then delivers it: at once in this call
    /// when `wait`, otherwise through the runner. Never answers for a
    /// message it did not store.
    pub async fn submit(&self, s: Submit) -> Result<Submitted, QueueError> {
        let inner = &self.inner;
        if !inner.accepting.load(Ordering::Acquire) {
            return Err(QueueError::ShuttingDown);
        }
        inner.take_room(s.mail.bytes.len())?;
        let now = now_millis();
        let new = s.stored_at(now);
        let id = new.message_id.clone();
        let due_now = new.initial_state(now) == State::Queued;
        // Claimed before it is stored, so that a poll cannot take it too.
        if due_now {
            inner.claim(&id);
        }
        // A caller that waits and has no key is told nothing before the
        // outcome: its message is stored by the first round's commit mark
        // (or with the round's outcome), one write where there were two.
        let paused = inner.is_paused();
        let fresh = s.wait
            && due_now
            && new.idempotency.is_none()
            && inner.delivers
            && !paused
            && inner.available.load(Ordering::Acquire);
        let state = if fresh {
            State::Queued
        } else {
            match self.accept(&new, now).await? {
                Ok(state) => state,
                Err(replay) => return Ok(replay),
            }
        };
        let pending = new.pending(state);
        if state == State::Held {
            return Ok(Submitted {
                record: new.record(state, now),
                report: None,
                replay: false,
            });
        }
        if !due_now {
            inner.wake.notify_one();
            return Ok(Submitted {
                record: inner.record(&id).await?,
                report: None,
                replay: false,
            });
        }
        if !inner.delivers {
            inner.unclaim(&id);
            return Ok(Submitted {
                record: new.record(state, now),
                report: None,
                replay: false,
            });
        }
        // Delivery paused: stored and queued; a call that waits is answered
        // so now, since no round starts before a resume.
        if paused {
            release(inner, std::slice::from_ref(&id)).await;
            return Ok(Submitted {
                record: new.record(state, now),
                report: None,
                replay: false,
            });
        }
        if !s.wait {
            let record = new.record(state, now);
            if inner.dispatcher.any_relay_available() {
                inner.hand_to_runner(pending);
            } else {
                // Every relay backs off: the message waits in the store, for
                // a poll here (once a second until a relay may be tried), or
                // for another daemon of a shared store (whose claim its
                // lease would otherwise hold off).
                release(inner, std::slice::from_ref(&id)).await;
            }
            return Ok(Submitted {
                record,
                report: None,
                replay: false,
            });
        }

        // Wait: the first round here, then later rounds (retries within the
        // deadline) through the runner.
        let deadline = s.mail.deadline;
        // A message with a key goes on: the caller's retry with that key
        // follows it (a replay) rather than sending it again.
        let cancel = s.cancel.filter(|_| new.idempotency.is_none());
        let _heeded = cancel.as_ref().map(|c| Heeded::new(inner, &id, c));
        let mut next = inner.waiter(&id);
        let slot = tokio::select! {
            slot = tokio::time::timeout_at(deadline, inner.slots.clone().acquire_owned()) => slot,
            () = cancelled(cancel.as_ref()) => {
                inner.drop_waiters(&id);
                // Still claimed here: no round can take it meanwhile.
                let cancelled = if fresh {
                    Err(QueueError::Cancelled)
                } else {
                    self.cancel_claimed(&id).await
                };
                inner.unclaim(&id);
                cancelled?;
                return Ok(Submitted {
                    record: inner.record(&id).await?,
                    report: None,
                    replay: false,
                });
            }
        };
        let slot = match slot {
            Ok(Ok(permit)) => Some(permit),
            _ => None,
        };
        let mut report = None;
        // After the first round the answer is derived from what the round
        // settled, without reading the store back; later rounds are read.
        let mut record = None;
        if let Some(slot) = slot {
            let base = new.record(state, now);
            let fresh = fresh.then(|| new.clone());
            let (r, settle, lost) = first_round(
                inner.clone(),
                pending,
                fresh,
                deadline,
                slot,
                cancel.clone(),
            )
            .await;
            if let Some(e) = lost {
                inner.drop_waiters(&id);
                return Err(e.into());
            }
            report = Some(r);
            // A round whose outcome the store refused is read back below.
            record = settle.map(|s| base.settled(&s));
        } else {
            // No round slot before the deadline: the runner takes it later.
            if fresh && let Err(e) = self.accept(&new, now).await {
                inner.drop_waiters(&id);
                return Err(e);
            }
            inner.unclaim(&id);
            inner.wake.notify_one();
        }
        let mut cancelling = false;
        loop {
            let current = match record.take() {
                Some(r) => r,
                None => inner.record(&id).await?,
            };
            // Cancelled while it waits for a retry: cancel it, unless a
            // round took it just now; then again when that round ends.
            if cancelling
                && current.state == State::Queued
                && self.cancel(&id).await? == Cancel::Cancelled
            {
                inner.drop_waiters(&id);
                return Ok(Submitted {
                    record: inner.record(&id).await?,
                    report,
                    replay: false,
                });
            }
            // A round in flight (here, or on another daemon of a shared
            // store) ends within the deadline or the deadline answers.
            let in_flight = current.state == State::Sending;
            let retry_in_time = current.state == State::Queued
                && current
                    .next_attempt_at
                    .is_some_and(|t| instant_of(t) < deadline);
            if current.state.is_final() || !(in_flight || retry_in_time) {
                inner.drop_waiters(&id);
                return Ok(Submitted {
                    record: current,
                    report,
                    replay: false,
                });
            }
            // On a shared store another daemon may run the next round:
            // read the store again at least this often.
            let pause = match inner.store.node() {
                Some(_) => (Instant::now() + SHARED_WAIT_POLL).min(deadline),
                None => deadline,
            };
            let waited = tokio::select! {
                waited = tokio::time::timeout_at(pause, &mut next) => waited,
                () = cancelled(cancel.as_ref()), if !cancelling => {
                    cancelling = true;
                    continue;
                }
            };
            match waited {
                Ok(Ok(r)) => {
                    report = Some(r);
                    next = inner.waiter(&id);
                }
                Err(_) if Instant::now() < deadline => {}
                _ => {
                    inner.drop_waiters(&id);
                    return Ok(Submitted {
                        record: inner.record(&id).await?,
                        report,
                        replay: false,
                    });
                }
            }
        }
    }

    /// Stores a new message, claimed when due now: its state, or the answer
    /// to a call whose key names an earlier message (a replay). A conflict
    /// or a failed write unclaims it.
    async fn accept(
        &self,
        new: &NewMessage,
        now: Millis,
    ) -> Result<Result<State, Submitted>, QueueError> {
        let inner = &self.inner;
        let id = &new.message_id;
        let stored = inner.store.accept(new.clone()).await;
        inner.note_write(&stored);
        match stored {
            Ok(Accepted::Stored(state)) => {
                inner.stored(&new.record(state, now));
                Ok(Ok(state))
            }
            Ok(Accepted::Replay(first)) => {
                inner.unclaim(id);
                let record = inner.record(&first).await?;
                Ok(Err(Submitted {
                    record,
                    report: None,
                    replay: true,
                }))
            }
            Ok(Accepted::Conflict(first)) => {
                inner.unclaim(id);
                Err(QueueError::Conflict { message_id: first })
            }
            Ok(Accepted::Withheld) => {
                inner.unclaim(id);
                Err(QueueError::Withheld)
            }
            Err(e) => {
                inner.unclaim(id);
                Err(e.into())
            }
        }
    }

    /// Stores several messages in one transaction (all or none), then
    /// delivers the due ones. With `wait_until`, this call runs the first
    /// round of each (as many at once as `max_in_flight` allows) and answers
    /// with what it settled, without reading the store back; a message that
    /// got no round slot by then, or that was deferred, answers `queued`
    /// and the runner goes on with it. Without it, the runner delivers them.
    /// Each answer is the message, or the first message of its idempotency
    /// key (a replay), or a conflict. When `cancel` fires while the call
    /// waits, its messages are cancelled as [`Queue::submit`]'s is
    /// ([`Queue::cancel_batch`]), and the answers are as stored then. An
    /// `atomic` batch is stored whole or, if a key conflicts, not at all
    /// (each message not stored answers [`QueueError::Withheld`]).
    pub async fn submit_many(
        &self,
        batch: Vec<Submit>,
        wait_until: Option<Instant>,
        cancel: Option<CancellationToken>,
        atomic: bool,
    ) -> Result<Vec<Result<Submitted, QueueError>>, QueueError> {
        let inner = &self.inner;
        if !inner.accepting.load(Ordering::Acquire) {
            return Err(QueueError::ShuttingDown);
        }
        if cancel.as_ref().is_some_and(CancellationToken::is_cancelled) {
            return Err(QueueError::Cancelled);
        }
        inner.take_room(batch.iter().map(|s| s.mail.bytes.len()).sum())?;
        let cancel = cancel.filter(|_| wait_until.is_some() && inner.delivers);
        // Delivery paused: the batch is stored and queued, and answered so
        // at once; no round starts before a resume.
        let wait_until = wait_until.filter(|_| !inner.is_paused());
        let now = now_millis();
        let mut news = Vec::with_capacity(batch.len());
        let mut pendings = Vec::with_capacity(batch.len());
        for s in batch {
            let new = s.stored_at(now);
            if new.initial_state(now) == State::Queued {
                inner.claim(&new.message_id);
            }
            pendings.push(new.pending(State::Queued));
            news.push(new);
        }
        let stored = inner.store.accept_many(news.clone(), atomic).await;
        inner.note_write(&stored);
        let accepted = match stored {
            Ok(a) => a,
            Err(e) => {
                for n in &news {
                    inner.unclaim(&n.message_id);
                }
                return Err(e.into());
            }
        };
        let mut out = Vec::with_capacity(news.len());
        // Spawned, not in a JoinSet: a caller that goes away must not abort
        // a round half way (its claim and its settle would be lost).
        let mut rounds = Vec::new();
        // The messages a cancel of the call cancels, and their tokens,
        // known to their rounds (`round` reads them) until the call ends.
        let mut heeded = Vec::new();
        for (k, ((new, pending), accepted)) in
            news.into_iter().zip(pendings).zip(accepted).enumerate()
        {
            let id = new.message_id.clone();
            match accepted {
                Accepted::Stored(state) => {
                    let base = new.record(state, now);
                    inner.stored(&base);
                    if let (State::Queued, true, Some(deadline)) =
                        (state, inner.delivers, wait_until)
                    {
                        let inner = self.inner.clone();
                        let cancel = cancel.clone().filter(|_| new.idempotency.is_none());
                        if let Some(c) = &cancel {
                            heeded.push(Heeded::new(&inner, &id, c));
                        }
                        rounds.push(tokio::spawn(async move {
                            let slots = inner.slots.clone();
                            let slot = tokio::select! {
                                slot = tokio::time::timeout_at(deadline, slots.acquire_owned()) => slot,
                                // Let go for `cancel_batch` to cancel.
                                () = cancelled(cancel.as_ref()) => {
                                    inner.unclaim(&id);
                                    return (k, None);
                                }
                            };
                            match slot {
                                Ok(Ok(slot)) => {
                                    // Boxed once it has a slot: a task
                                    // waiting for one stays small, though
                                    // a batch spawns one per message.
                                    let (report, settle) =
                                        Box::pin(round(inner, pending, deadline, slot)).await;
                                    (k, Some((report, settle, now_millis())))
                                }
                                _ => {
                                    inner.unclaim(&id);
                                    inner.wake.notify_one();
                                    (k, None)
                                }
                            }
                        }));
                    } else if state == State::Queued && inner.delivers {
                        inner.hand_to_runner(pending);
                    } else {
                        inner.unclaim(&id);
                    }
                    out.push(Ok(Submitted {
                        record: base,
                        report: None,
                        replay: false,
                    }));
                }
                Accepted::Replay(first) => {
                    inner.unclaim(&id);
                    out.push(inner.record(&first).await.map(|record| Submitted {
                        record,
                        report: None,
                        replay: true,
                    }));
                }
                Accepted::Conflict(first) => {
                    inner.unclaim(&id);
                    out.push(Err(QueueError::Conflict { message_id: first }));
                }
                Accepted::Withheld => {
                    inner.unclaim(&id);
                    out.push(Err(QueueError::Withheld));
                }
            }
        }
        inner.wake.notify_one();
        // Each round's outcome goes on the record already answered for its
        // message: one record a message while the rounds run.
        let ended = {
            let rounds = async {
                for handle in rounds {
                    if let Ok((k, Some((report, settle, at)))) = handle.await
                        && let Ok(submitted) = &mut out[k]
                    {
                        match settle {
                            Some(settle) => submitted.record.settle_on(&settle, at),
                            // Refused by the store: read as it stands.
                            None => {
                                if let Ok(record) =
                                    self.inner.record(&submitted.record.message_id).await
                                {
                                    submitted.record = record;
                                }
                            }
                        }
                        submitted.report = Some(report);
                    }
                }
            };
            tokio::select! {
                () = rounds => true,
                () = cancelled(cancel.as_ref()) => false,
            }
        };
        if !ended && let Some(until) = wait_until {
            self.cancel_batch(&heeded, &mut out, until).await;
        }
        drop(heeded);
        Ok(out)
    }

    /// Cancels the messages `heeded` names, of a call its client
    /// cancelled, each as [`Queue::submit`] cancels its one: a queued
    /// message is cancelled here; one a round holds is cancelled by that
    /// round (it heeds the call's token, which the caller keeps registered
    /// until this returns), or goes on if a relay is committing it; it is
    /// waited for until `until`. A message a task holds while it waits for
    /// a round slot is cancelled once that task lets it go. Then each
    /// answer in `out` is read as stored.
    async fn cancel_batch(
        &self,
        heeded: &[Heeded],
        out: &mut [Result<Submitted, QueueError>],
        until: Instant,
    ) {
        let mut each = tokio::task::JoinSet::new();
        for id in heeded.iter().map(|h| h.id.clone()) {
            let queue = self.clone();
            each.spawn(async move {
                let inner = &queue.inner;
                loop {
                    let next = inner.waiter(&id);
                    let held =
                        matches!(queue.cancel(&id).await, Ok(Cancel::Refused(State::Sending)));
                    if held && Instant::now() < until {
                        let pause = (Instant::now() + POLL_INTERVAL).min(until);
                        let _ = tokio::time::timeout_at(pause, next).await;
                        continue;
                    }
                    drop(next);
                    inner.drop_waiters(&id);
                    return;
                }
            });
        }
        while each.join_next().await.is_some() {}
        for s in out.iter_mut().flatten().filter(|s| !s.replay) {
            if let Ok(record) = self.inner.record(&s.record.message_id).await {
                s.record = record;
            }
        }
    }

    /// Opens a batch that is stored as it is composed: each message
    /// [`Stream::push`]ed goes into one store transaction at once, and
    /// [`Stream::commit`] commits it. The caller holds a few messages at a
    /// time, not the whole batch. Its messages are delivered by the
    /// runner's polls, which load each one's bytes as a round slot frees
    /// up, as for mail recovered after a restart. An `atomic` batch is
    /// stored whole or, if a key conflicts, not at all.
    pub fn stream(&self, atomic: bool) -> Result<Stream, QueueError> {
        let inner = &self.inner;
        if !inner.accepting.load(Ordering::Acquire) {
            return Err(QueueError::ShuttingDown);
        }
        inner.take_room(0)?;
        let (feed, rx) = mpsc::channel(STREAM_AHEAD);
        let store = inner.store.clone();
        Ok(Stream {
            inner: inner.clone(),
            feed: Some(feed),
            stored: tokio::spawn(async move { store.accept_stream(rx, atomic).await }),
            now: now_millis(),
            fed: Vec::new(),
            full: None,
        })
    }

    /// The message as stored, with `sending` while a round holds it.
    pub async fn status(&self, message_id: &str) -> Result<Option<Record>, QueueError> {
        Ok(self.inner.store.get(message_id).await?.map(|mut r| {
            if r.state == State::Queued && self.inner.is_claimed(&r.message_id) {
                r.state = State::Sending;
            }
            r.expires_at = r.expiry(self.inner.max_age_for(r.caller.as_deref(), None));
            r
        }))
    }

    /// Records the outcome of a message's Sent copy.
    pub async fn note_copy(&self, message_id: &str, outcome: &str) -> Result<(), QueueError> {
        let result = self.inner.store.note_copy(message_id, outcome).await;
        self.inner.note_write(&result);
        Ok(result?)
    }

    /// Sent copies left `pending` for this daemon to make ([`Store::pending_copies`]).
    pub async fn pending_copies(
        &self,
        before: Millis,
        mine: bool,
    ) -> Result<Vec<CopyDue>, QueueError> {
        Ok(self.inner.store.pending_copies(before, mine).await?)
    }

    /// The stored message with its bytes, while the store keeps them (until
    /// it is final, or for `retain` when it may have been delivered).
    pub async fn stored(&self, message_id: &str) -> Result<Option<Pending>, QueueError> {
        Ok(self.inner.store.load(message_id).await?)
    }

    /// The message a caller's idempotency key names.
    pub async fn status_by_key(
        &self,
        caller: Option<&str>,
        key: &str,
    ) -> Result<Option<Record>, QueueError> {
        match self.inner.store.find_key(caller, key).await? {
            Some(id) => self.status(&id).await,
            None => Ok(None),
        }
    }

    pub async fn list(
        &self,
        filter: &Filter,
        limit: usize,
        cursor: Option<i64>,
    ) -> Result<(Vec<Summary>, Option<i64>), QueueError> {
        Ok(self.inner.store.list(filter, limit, cursor).await?)
    }

    /// How many of the messages `filter` names are in each state, as
    /// stored ([`Store::count`]), in the order of [`State::ALL`].
    pub async fn count(&self, filter: &Filter) -> Result<Vec<(State, u64)>, QueueError> {
        let mut counts = self.inner.store.count(filter).await?;
        counts.sort_by_key(|(state, _)| State::ALL.iter().position(|s| s == state));
        Ok(counts)
    }

    /// Cancels each message `filter` names as [`Queue::cancel`] does, each
    /// in its own write ([`super::AT_ONCE`] at a time, which the store's
    /// writer folds into shared commits): one a round holds now is left to
    /// it. A store error stops it there; what was cancelled before stays
    /// cancelled.
    pub async fn cancel_each(&self, filter: &Filter) -> Result<super::ActedOnMany, QueueError> {
        self.each(filter, |queue, id| async move {
            Ok(match queue.cancel(&id).await? {
                Cancel::Cancelled => Some((true, State::Cancelled)),
                Cancel::Refused(state) => Some((false, state)),
                Cancel::NotFound => None,
            })
        })
        .await
    }

    /// An operator's decision (`approve`, made `by` them) on every held
    /// message `filter` names, each under the one-message rules and on its
    /// content as stored. Counted as [`Queue::cancel_each`] counts.
    pub async fn decide_each(
        &self,
        filter: &Filter,
        approve: bool,
        by: &str,
    ) -> Result<super::ActedOnMany, QueueError> {
        self.each(filter, |queue, id| async move {
            let d = Decision {
                approve,
                by: by.to_owned(),
                hash: None,
            };
            Ok(match queue.decide(&id, d).await? {
                Decided::Released(state) => Some((true, state)),
                Decided::Rejected => Some((true, State::Rejected)),
                Decided::NotHeld(state) => Some((false, state)),
                Decided::HashMismatch => Some((false, State::Held)),
                Decided::NotFound => None,
            })
        })
        .await
    }

    /// Runs `act` (a cancel, a decision) on every message `filter` names
    /// that is not listed in a final state, a few at a time: each gives
    /// whether it acted and the message's state after, or `None` for a
    /// message gone in between. The finished ones count in their state.
    async fn each<F, Fut>(&self, filter: &Filter, act: F) -> Result<super::ActedOnMany, QueueError>
    where
        F: Fn(Queue, String) -> Fut,
        Fut: std::future::Future<Output = Result<Option<(bool, State)>, QueueError>>,
    {
        use futures_util::stream::{self, StreamExt as _};
        let listed = super::select(self.inner.store.as_ref(), filter).await?;
        let mut out = super::ActedOnMany {
            matched: listed.len(),
            ..Default::default()
        };
        // A finished message stays as it is: no write to learn that.
        let mut ids = Vec::with_capacity(listed.len());
        for (id, state) in listed {
            if state.is_final() {
                *out.states.entry(state).or_default() += 1;
            } else {
                ids.push(id);
            }
        }
        let mut acts = stream::iter(ids)
            .map(|id| act(self.clone(), id))
            .buffer_unordered(super::AT_ONCE);
        while let Some(done) = acts.next().await {
            if let Some((acted, state)) = done? {
                out.acted += usize::from(acted);
                *out.states.entry(state).or_default() += 1;
            }
        }
        Ok(out)
    }

    /// Approves or rejects a held message. An approved message is queued
    /// (or scheduled) and the runner delivers it.
    pub async fn decide(&self, message_id: &str, d: Decision) -> Result<Decided, QueueError> {
        let inner = &self.inner;
        let by = d.by.clone();
        // The runner may deliver an approved message at once: its
        // `approved` event is told from the record read before the
        // decision, with no read between the decision and the event, so
        // that it comes before the delivery's.
        let held = match inner.observer.get() {
            Some(_) if d.approve => inner.store.get(message_id).await.ok().flatten(),
            _ => None,
        };
        let result = inner.store.decide(message_id, d).await;
        inner.note_write(&result);
        let decided = result?;
        let action = match decided {
            Decided::Released(state) => {
                if let Some(r) = &held {
                    inner.notify(Action::Approved, r, Some(&by));
                }
                inner.changed(message_id, state);
                inner.wake.notify_one();
                return Ok(decided);
            }
            Decided::Rejected => {
                inner.changed(message_id, State::Rejected);
                Action::Rejected
            }
            _ => return Ok(decided),
        };
        if inner.observer.get().is_some()
            && let Ok(Some(r)) = inner.store.get(message_id).await
        {
            inner.notify(action, &r, Some(&by));
        }
        Ok(decided)
    }

    /// Queues a message for a fresh attempt (see [`super::retryable`]).
    pub async fn retry(&self, message_id: &str, force: bool) -> Result<super::Retry, QueueError> {
        let inner = &self.inner;
        let result = inner.store.retry(message_id, force).await;
        inner.note_write(&result);
        if matches!(result, Ok(super::Retry::Queued)) {
            inner.changed(message_id, State::Queued);
            inner.wake.notify_one();
        }
        Ok(result?)
    }

    /// The message once it is final, or as it is at `deadline`.
    pub async fn wait_final(
        &self,
        message_id: &str,
        deadline: Instant,
    ) -> Result<Record, QueueError> {
        let inner = &self.inner;
        loop {
            let next = inner.waiter(message_id);
            let record = inner.record(message_id).await?;
            if record.state.is_final() || Instant::now() >= deadline {
                inner.drop_waiters(message_id);
                return Ok(record);
            }
            let pause = Instant::now() + POLL_INTERVAL * 2;
            let _ = tokio::time::timeout_at(pause.min(deadline), next).await;
        }
    }

    /// Cancels a `scheduled` or `queued` message that no relay holds. Its
    /// claim is let go however this ends, even when the caller drops it half
    /// way (a selection's cancels after a store error): a claim left behind
    /// would keep the runner from the message until a restart.
    pub async fn cancel(&self, message_id: &str) -> Result<Cancel, QueueError> {
        let Some(_claim) = Claim::take(&self.inner, message_id) else {
            return Ok(Cancel::Refused(State::Sending));
        };
        self.cancel_claimed(message_id).await
    }

    /// [`Queue::cancel`] of a message this daemon has claimed.
    async fn cancel_claimed(&self, message_id: &str) -> Result<Cancel, QueueError> {
        let inner = &self.inner;
        let result = inner.store.cancel(message_id).await;
        inner.note_write(&result);
        if matches!(result, Ok(Cancel::Cancelled)) {
            inner.changed(message_id, State::Cancelled);
            if inner.observer.get().is_some()
                && let Ok(Some(r)) = inner.store.get(message_id).await
            {
                inner.notify(Action::Cancelled, &r, None);
            }
        }
        Ok(result?)
    }

    /// Every state change from now on, as it is stored, and every report
    /// this daemon notes on a message ([`Queue::note_reports`]).
    pub fn changes(&self) -> broadcast::Receiver<Change> {
        self.inner.changes.subscribe()
    }

    /// Follows `ids` for the changes other processes make to them (the
    /// other daemons of a shared store, the queue command), until the
    /// [`Watch`](super::Watch) is dropped: each one is sent on
    /// [`Queue::changes`] within about a [`WATCH_POLL`](super::WATCH_POLL),
    /// as this daemon's own are. Their states are read now, so that what
    /// changes after this call is sent. A store no other process writes
    /// needs no watch.
    pub async fn watch(&self, ids: Vec<String>) -> super::Watch {
        let inner = &self.inner;
        if !inner.store.others_write() {
            return super::Watch {
                watches: None,
                ids: Vec::new(),
            };
        }
        let new = inner.watches.add(&ids);
        for chunk in new.chunks(super::watch::CHUNK) {
            // Unread, a message is read by the next poll instead.
            if let Ok(prints) = inner.store.prints(chunk).await {
                for (id, print) in prints {
                    inner.watches.read(&id, print);
                }
            }
        }
        inner.watching.get_or_init(|| {
            tokio::spawn(poll_watched(Arc::downgrade(inner)));
        });
        super::Watch {
            watches: Some(inner.watches.clone()),
            ids,
        }
    }

    pub async fn stats(&self) -> Result<Stats, QueueError> {
        Ok(self.inner.store.stats().await?)
    }

    /// Adds entries to the store's suppression list ([`Store::suppress`]).
    pub async fn suppress(
        &self,
        entries: Vec<super::Suppression>,
    ) -> Result<Vec<String>, QueueError> {
        Ok(self.inner.store.suppress(entries).await?)
    }

    /// Takes an address off the store's suppression list
    /// ([`Store::unsuppress`]).
    pub async fn unsuppress(&self, address: &str) -> Result<bool, QueueError> {
        Ok(self.inner.store.unsuppress(address).await?)
    }

    /// The store's entry of one listed address ([`Store::suppression`]).
    pub async fn suppression(
        &self,
        address: &str,
    ) -> Result<Option<super::Suppression>, QueueError> {
        Ok(self.inner.store.suppression(address).await?)
    }

    /// One page of the store's suppression list
    /// ([`Store::suppression_page`]).
    pub async fn suppression_page(
        &self,
        query: &super::SuppressionQuery,
    ) -> Result<super::SuppressionPage, QueueError> {
        Ok(self.inner.store.suppression_page(query).await?)
    }

    /// The version of the store's suppression list
    /// ([`Store::suppression_version`]).
    pub async fn suppression_version(&self) -> Result<i64, QueueError> {
        Ok(self.inner.store.suppression_version().await?)
    }

    /// Pauses delivery for every daemon on the store, `by` whom: rounds
    /// running now end as they would, and no new one starts (here at once,
    /// on the other daemons and for the queue command's store within
    /// their next read, every 100 ms). The pause in force, and whether
    /// this call paused it (a pause while paused keeps the first).
    pub async fn pause(
        &self,
        by: &str,
        reason: Option<String>,
    ) -> Result<(Paused, bool), QueueError> {
        let (current, changed) = super::pause(self.inner.store.as_ref(), by, reason).await?;
        self.inner.note_pause(Some(current.clone()), None);
        Ok((current, changed))
    }

    /// Resumes delivery; whether it was paused.
    pub async fn resume(&self) -> Result<bool, QueueError> {
        let changed = self.inner.store.set_paused(None).await?;
        self.inner.note_pause(None, None);
        Ok(changed)
    }

    /// The pause in force, as this daemon last read it (every 100 ms).
    pub fn paused(&self) -> Option<Paused> {
        self.inner
            .pause
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .current
            .clone()
    }

    /// The changes of the store's suppression list after version `since`
    /// ([`Store::suppression_changes`]).
    pub async fn suppression_changes(
        &self,
        since: i64,
    ) -> Result<Option<(i64, Vec<super::SuppressionChange>)>, QueueError> {
        Ok(self.inner.store.suppression_changes(since).await?)
    }

    /// Adds what reports said of a message's recipients
    /// ([`Store::note_reports`]).
    /// Adds `reports` to the message `record` names, and tells the
    /// observer of each that was new to it (`bounced` or `complained`,
    /// naming its one recipient, the report's detail as the reason):
    /// once, also when daemons that share a store read the same report.
    /// Those following the message's changes ([`Queue::changes`]) hear of
    /// it as a change to its state as it is.
    pub async fn note_reports(
        &self,
        record: &Record,
        reports: Vec<super::ReportRecord>,
    ) -> Result<(), QueueError> {
        let added = self
            .inner
            .store
            .note_reports(&record.message_id, reports)
            .await?;
        if added.is_empty() {
            return Ok(());
        }
        self.inner.changed(&record.message_id, record.state);
        if let Some(o) = self.inner.observer.get() {
            for r in &added {
                let action = match r.reason.as_str() {
                    "complained" => Action::Complained,
                    _ => Action::Bounced,
                };
                let to = [r.address.clone()];
                o.event(&Event {
                    action,
                    message_id: &record.message_id,
                    caller: record.caller.as_deref(),
                    meta: record.meta.as_deref(),
                    from: record.from.as_deref(),
                    to: &to,
                    size: record.size,
                    relay: record.relay.as_deref(),
                    code: None,
                    reason: (!r.detail.is_empty()).then_some(r.detail.as_str()),
                    decided_by: None,
                    accepted: &[],
                    rejected: &[],
                    deferred: Vec::new(),
                });
            }
        }
        Ok(())
    }

    /// How far a mailbox of reports was read ([`Store::report_cursor`]).
    pub async fn report_cursor(&self, mailbox: &str) -> Result<Option<(u32, u32)>, QueueError> {
        Ok(self.inner.store.report_cursor(mailbox).await?)
    }

    /// Moves a mailbox's cursor forward ([`Store::advance_report_cursor`]).
    pub async fn advance_report_cursor(
        &self,
        mailbox: &str,
        validity: u32,
        uid: u32,
    ) -> Result<(), QueueError> {
        Ok(self
            .inner
            .store
            .advance_report_cursor(mailbox, validity, uid)
            .await?)
    }

    /// Refuses new messages, stops the runner, lets rounds in flight finish
    /// within `grace`, then stops the dispatcher. The observers then get
    /// `grace` again to finish what they hold (the Sent copies). Queued
    /// mail stays in the store for the next start.
    pub async fn shutdown(&self, grace: Duration) -> crate::status::ShutdownReport {
        let inner = &*self.inner;
        inner.accepting.store(false, Ordering::Release);
        inner.stop.cancel();
        let report = inner.dispatcher.shutdown(grace).await;
        let _ = tokio::time::timeout(SETTLE_GRACE, inner.rounds.idle()).await;
        if let Some(observer) = inner.observer.get() {
            observer.drain(Instant::now() + grace).await;
        }
        inner.store.close().await;
        report
    }
}

/// A batch written into the store as it is composed ([`Queue::stream`]).
/// Dropped before [`Stream::commit`], it stores nothing.
#[derive(Debug)]
pub struct Stream {
    inner: Arc<Inner>,
    feed: Option<mpsc::Sender<Feed>>,
    stored: tokio::task::JoinHandle<Result<Vec<Accepted>, StoreError>>,
    now: Millis,
    /// Each message fed, without its bytes, and its size.
    fed: Vec<(NewMessage, u64)>,
    /// Set when a message found no room (`queue.min_free`): the feed is
    /// dropped, so nothing is stored, and the commit answers this.
    full: Option<Short>,
}

impl Stream {
    /// Hands one more message to the transaction; waits while the store
    /// is [`STREAM_AHEAD`] messages behind. Once the store has failed, or
    /// a message finds no room (`queue.min_free`), the message is dropped
    /// and [`Stream::commit`] answers that error, with nothing stored.
    pub async fn push(&mut self, s: Submit) {
        let fed = s.stored_at(self.now);
        let size = fed.bytes.len() as u64;
        if let Some(Err(short)) = self.inner.reserve.as_ref().map(|r| r.take(size)) {
            self.full.get_or_insert(short);
            self.feed = None;
        }
        let kept = NewMessage {
            bytes: Arc::from(&[][..]),
            ..fed.clone()
        };
        self.fed.push((kept, size));
        let sent = match &self.feed {
            Some(feed) => feed.send(Feed::Message(Box::new(fed))).await.is_ok(),
            None => false,
        };
        if !sent {
            self.feed = None;
        }
    }

    /// Commits what was pushed, then answers as [`Queue::submit_many`]
    /// does: with `wait_until`, each due message once its first round has
    /// ended, or as it is at `wait_until`; and with `cancel`, cancels the
    /// messages as it does once that fires. Nothing is stored when it has
    /// fired before the commit.
    pub async fn commit(
        mut self,
        wait_until: Option<Instant>,
        cancel: Option<CancellationToken>,
    ) -> Result<Vec<Result<Submitted, QueueError>>, QueueError> {
        let inner = self.inner.clone();
        let now = self.now;
        if cancel.as_ref().is_some_and(CancellationToken::is_cancelled) {
            return Err(QueueError::Cancelled);
        }
        if let Some(short) = self.full {
            return Err(QueueError::Full(short));
        }
        let waits = wait_until.filter(|_| inner.delivers);
        // Known to the runner's rounds before any can take a message.
        let heeded: Vec<Heeded> = match (&cancel, waits) {
            (Some(c), Some(_)) => self
                .fed
                .iter()
                .filter(|(new, _)| {
                    new.idempotency.is_none() && new.initial_state(now) == State::Queued
                })
                .map(|(new, _)| Heeded::new(&inner, &new.message_id, c))
                .collect(),
            _ => Vec::new(),
        };
        // Waiting before the commit: a poll may deliver a message as soon
        // as it is stored.
        let mut receivers: Vec<Option<oneshot::Receiver<Report>>> = self
            .fed
            .iter()
            .map(|(new, _)| {
                (waits.is_some() && new.initial_state(now) == State::Queued)
                    .then(|| inner.waiter(&new.message_id))
            })
            .collect();
        let drop_all = |receivers: &mut Vec<Option<oneshot::Receiver<Report>>>| {
            for (r, (new, _)) in receivers.iter_mut().zip(&self.fed) {
                if r.take().is_some() {
                    inner.drop_waiters(&new.message_id);
                }
            }
        };
        let committed = match self.feed.take() {
            Some(feed) => feed.send(Feed::Commit).await.is_ok(),
            None => false,
        };
        let stored = match (&mut self.stored).await {
            Ok(stored) => stored,
            Err(e) => Err(StoreError::Unavailable(format!(
                "the store's batch write failed: {e}"
            ))),
        };
        inner.note_write(&stored);
        let accepted = match stored {
            Ok(a) if committed && a.len() == self.fed.len() => a,
            Ok(_) => {
                drop_all(&mut receivers);
                return Err(StoreError::Unavailable(
                    "the store stopped taking the batch's messages".into(),
                )
                .into());
            }
            Err(e) => {
                drop_all(&mut receivers);
                return Err(e.into());
            }
        };
        let mut out = Vec::with_capacity(accepted.len());
        for ((new, size), accepted) in self.fed.iter().zip(accepted) {
            match accepted {
                Accepted::Stored(state) => {
                    let mut record = new.record(state, now);
                    record.size = *size;
                    inner.stored(&record);
                    out.push(Ok(Submitted {
                        record,
                        report: None,
                        replay: false,
                    }));
                }
                Accepted::Replay(first) => {
                    out.push(inner.record(&first).await.map(|record| Submitted {
                        record,
                        report: None,
                        replay: true,
                    }))
                }
                Accepted::Conflict(first) => {
                    out.push(Err(QueueError::Conflict { message_id: first }));
                }
                Accepted::Withheld => out.push(Err(QueueError::Withheld)),
            }
        }
        inner.wake.notify_one();
        let ended = {
            let outcomes = async {
                for (k, rx) in receivers.iter_mut().enumerate() {
                    let (Some(rx), Some(deadline)) = (rx.take(), waits) else {
                        continue;
                    };
                    let id = &self.fed[k].0.message_id;
                    if !matches!(&out[k], Ok(s) if !s.replay && s.record.state == State::Queued) {
                        drop(rx);
                        inner.drop_waiters(id);
                        continue;
                    }
                    let report = first_outcome(&inner, id, rx, deadline).await;
                    inner.drop_waiters(id);
                    if let Ok(record) = inner.record(id).await {
                        out[k] = Ok(Submitted {
                            record,
                            report,
                            replay: false,
                        });
                    }
                }
            };
            tokio::select! {
                () = outcomes => true,
                () = cancelled(cancel.as_ref()) => false,
            }
        };
        if !ended && let Some(until) = waits {
            drop_all(&mut receivers);
            let queue = Queue {
                inner: inner.clone(),
            };
            queue.cancel_batch(&heeded, &mut out, until).await;
        }
        drop(heeded);
        Ok(out)
    }
}

/// The report of a stored message's first round, once it has ended, or
/// None at `deadline` (or when another daemon of a shared store ran it).
async fn first_outcome(
    inner: &Inner,
    id: &str,
    mut rx: oneshot::Receiver<Report>,
    deadline: Instant,
) -> Option<Report> {
    let shared = inner.store.node().is_some();
    loop {
        // On a shared store another daemon may have run the round: read
        // before waiting, so that a batch's messages that are done cost a
        // read each, not a pause each.
        if shared {
            if let Ok(report) = rx.try_recv() {
                return Some(report);
            }
            if let Ok(Some(r)) = inner.store.get(id).await
                && r.state != State::Sending
                && (r.state != State::Queued || !r.attempts.is_empty())
            {
                return None;
            }
        }
        let pause = match shared {
            true => (Instant::now() + SHARED_WAIT_POLL).min(deadline),
            false => deadline,
        };
        match tokio::time::timeout_at(pause, &mut rx).await {
            Ok(Ok(report)) => return Some(report),
            Ok(Err(_)) => return None,
            Err(_) if Instant::now() < deadline => {}
            Err(_) => return None,
        }
    }
}

impl Inner {
    fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// How many times the pause was set here: what a read of the store
    /// that begins now hands to [`Inner::note_pause`].
    fn pause_settings(&self) -> u64 {
        self.pause
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .settings
    }

    /// Takes the pause as set here (`read_after: None`), or as read from
    /// the store by a read that began after `read_after` settings here (a
    /// staler read changes nothing), and logs a change once. A resume wakes
    /// the runner for the mail that waited.
    fn note_pause(&self, pause: Option<Paused>, read_after: Option<u64>) {
        let mut held = self.pause.lock().unwrap_or_else(|e| e.into_inner());
        let now = held.take(pause, read_after);
        let was = self.paused.swap(now, Ordering::AcqRel);
        match (&held.current, was) {
            (Some(p), false) => tracing::warn!(
                by = %p.by,
                reason = p.reason.as_deref().unwrap_or(""),
                "delivery is paused: mail is accepted and queued, and no message is handed to a relay until delivery is resumed"
            ),
            (None, true) => {
                tracing::warn!("delivery is resumed");
                self.wake.notify_one();
            }
            _ => {}
        }
    }

    /// Hands a stored, claimed, due message to the runner's channel, if the
    /// runner holds room for its bytes ([`RUNNER_BYTES`]) and the channel
    /// for the message; otherwise it waits in the store for a poll.
    fn hand_to_runner(&self, p: Pending) {
        let size = p.bytes.len() as u64;
        let held = self.runner_bytes.fetch_add(size, Ordering::AcqRel);
        let p = if held + size > RUNNER_BYTES {
            Err(p)
        } else {
            self.ready.try_send(p).map_err(|e| match e {
                mpsc::error::TrySendError::Full(p) | mpsc::error::TrySendError::Closed(p) => p,
            })
        };
        if let Err(p) = p {
            tracing::debug!(message_id = %p.message_id, "the runner is full; the message waits in the store for a poll");
            self.runner_bytes.fetch_sub(size, Ordering::AcqRel);
            self.unclaim(&p.message_id);
            self.backlog.store(true, Ordering::Release);
            self.wake.notify_one();
        }
    }

    /// A runner round of a message of `size` bytes ended; `polled`: a poll
    /// started it. While more is due than the polls took, the runner is
    /// woken for the next poll once half of the polled rounds have ended
    /// and the bytes it holds are under half of [`RUNNER_BYTES`].
    fn round_ended(&self, size: u64, polled: bool) {
        let left_bytes = self.runner_bytes.fetch_sub(size, Ordering::AcqRel) - size;
        let left = if polled {
            self.polled.fetch_sub(1, Ordering::AcqRel) - 1
        } else {
            self.polled.load(Ordering::Acquire)
        };
        // A round from the channel wakes the runner only as the bytes
        // cross under half: the rounds a poll started wake it otherwise.
        let crossed = left_bytes < RUNNER_BYTES / 2 && left_bytes + size >= RUNNER_BYTES / 2;
        if (polled || crossed)
            && left <= POLL_REFILL
            && left_bytes < RUNNER_BYTES / 2
            && self.backlog.load(Ordering::Acquire)
        {
            self.wake.notify_one();
        }
    }

    /// A new message was stored as `record` says: its state change, and
    /// `held` or `accepted` for the observers.
    fn stored(&self, record: &Record) {
        self.changed(&record.message_id, record.state);
        let action = if record.state == State::Held {
            Action::Held
        } else {
            Action::Accepted
        };
        self.notify(action, record, None);
    }

    fn claim(&self, id: &str) {
        self.claimed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned());
    }

    fn try_claim(&self, id: &str) -> bool {
        self.claimed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned())
    }

    fn unclaim(&self, id: &str) {
        self.claimed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    fn is_claimed(&self, id: &str) -> bool {
        self.claimed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
    }

    fn waiter(&self, id: &str) -> oneshot::Receiver<Report> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_owned())
            .or_default()
            .push(tx);
        rx
    }

    fn drop_waiters(&self, id: &str) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = waiters.get_mut(id) {
            list.retain(|tx| !tx.is_closed());
            if list.is_empty() {
                waiters.remove(id);
            }
        }
    }

    fn wake_waiters(&self, id: &str, report: &Report) {
        let list = self
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        for tx in list.into_iter().flatten() {
            let _ = tx.send(report.clone());
        }
    }

    /// Tracks whether the store takes writes, and logs each change once.
    fn note_write<T>(&self, result: &Result<T, StoreError>) {
        let ok = !matches!(
            result,
            Err(StoreError::Unavailable(_) | StoreError::Unconfirmed(_))
        );
        let was = self.available.swap(ok, Ordering::AcqRel);
        match (was, result) {
            (true, Err(e)) if !ok => {
                tracing::error!(error = %e, "the queue store refuses writes; new sends are refused")
            }
            (false, _) if ok => tracing::info!("the queue store takes writes again"),
            _ => {}
        }
    }

    async fn record(&self, id: &str) -> Result<Record, QueueError> {
        self.store
            .get(id)
            .await?
            .ok_or_else(|| QueueError::NotFound(id.to_owned()))
    }

    /// The next state of a message after a round that reported `report`.
    fn settle_for(&self, report: &Report, p: &Pending, started: Millis) -> Settle {
        let mut at = started;
        let attempts = report
            .attempts
            .iter()
            .map(|a| {
                let rec = AttemptRecord {
                    at,
                    relay: a.relay.clone(),
                    class: a.class.map(|c| c.as_str().to_owned()),
                    code: a.reply.as_ref().map(|r| r.code),
                    text: match &a.reply {
                        Some(r) if a.detail.is_empty() => r.text.clone(),
                        Some(r) => format!("{} ({})", r.text, a.detail),
                        None => a.detail.clone(),
                    },
                    duration_ms: a.duration.as_millis() as u64,
                };
                at += a.duration.as_millis() as i64;
                rec
            })
            .collect();
        let mut settle = Settle {
            state: State::Failed,
            relay: report.relay.clone(),
            attempts,
            accepted: report.accepted.clone(),
            rejected: report
                .rejected
                .iter()
                .map(|r| RejectedRecord {
                    address: r.address.clone(),
                    code: r.reply.code,
                    text: r.reply.text.clone(),
                })
                .collect(),
            reason: report.failure.map(|f| f.code().to_owned()),
            note: report.message.clone(),
            next_attempt_at: None,
            copy: false,
            body: None,
        };
        // The deferred recipients of this round got their 4xx for good.
        let mut deferral_ended = false;
        settle.state = match report.status {
            // A relay took it for some recipients and deferred others: the
            // others wait for a retry, and get their 4xx for good when
            // `max_age` leaves no time for one.
            Status::Sent | Status::Partial if !report.deferred.is_empty() => {
                match self.next_attempt(None, p) {
                    Some(next) => {
                        settle.next_attempt_at = Some(next);
                        State::Queued
                    }
                    None => {
                        let max_age = humantime::format_duration(self.max_age_of(p));
                        settle
                            .rejected
                            .extend(report.deferred.iter().map(|r| RejectedRecord {
                                address: r.address.clone(),
                                code: r.reply.code,
                                text: format!(
                                    "{} (deferred, and not delivered within max_age, {max_age})",
                                    r.reply.text
                                ),
                            }));
                        settle.note = Some(format!(
                            "the deferred recipients were not delivered within max_age ({max_age})"
                        ));
                        deferral_ended = true;
                        State::Partial
                    }
                }
            }
            Status::Sent => State::Sent,
            Status::Partial => State::Partial,
            Status::Unknown => State::Unknown,
            Status::Failed => match report.failure {
                Some(
                    FailureReason::Rejected
                    | FailureReason::TooLarge
                    | FailureReason::Smtputf8Unsupported
                    | FailureReason::UnknownRelay,
                ) => State::Failed,
                Some(FailureReason::Cancelled) => State::Cancelled,
                // Every relay failed transiently, was busy or down, or the
                // daemon is stopping: wait and try again.
                reason => match self.next_attempt(reason, p) {
                    Some(next) => {
                        settle.next_attempt_at = Some(next);
                        State::Queued
                    }
                    None => {
                        settle.note = Some(format!(
                            "not delivered within max_age ({}); last: {}",
                            humantime::format_duration(self.max_age_of(p)),
                            report.message.as_deref().unwrap_or("no relay took it")
                        ));
                        settle.reason = Some("expired".into());
                        State::Expired
                    }
                },
            },
        };
        if !p.accepted.is_empty() || !p.rejected.is_empty() {
            with_earlier_rounds(&mut settle, p, report);
            if settle.state == State::Expired && !p.accepted.is_empty() {
                let last = report.attempts.last().and_then(|a| a.reply.as_ref());
                deferral_expired(&mut settle, p, last, self.max_age_of(p));
            }
        } else if deferral_ended {
            settle.note = Some(crate::mail::partly_refused(
                settle.rejected.len(),
                p.to.len(),
                settle.note.as_deref(),
            ));
        }
        if settle.state == State::Queued && !report.deferred.is_empty() {
            let (took, refused) = (settle.accepted.len(), settle.rejected.len());
            settle.note = Some(crate::mail::partly_deferred(
                &report.deferred,
                took,
                refused,
                p.to.len(),
                None,
            ));
        }
        // The Sent copy is filed by the first round whose relay took the
        // message for some recipient: a deferral round too, so that the copy
        // does not wait for the deferred ones (and is made when they are
        // then cancelled or expire).
        let took_some =
            matches!(settle.state, State::Sent | State::Partial) || deferral_round(&settle, p);
        settle.copy = took_some
            && !p.copied
            && match (&settle.relay, self.observer.get()) {
                (Some(relay), Some(o)) => o.copies(relay),
                _ => false,
            };
        settle
    }

    /// How long `p` may wait for delivery ([`Inner::max_age_for`]).
    fn max_age_of(&self, p: &Pending) -> Duration {
        self.max_age_for(p.caller.as_deref(), p.max_age)
    }

    /// How long a message of `caller` may wait for delivery: the caller's
    /// own `max_age` ([`Screen::max_age`]), else the queue's; the
    /// message's `own` when shorter.
    fn max_age_for(&self, caller: Option<&str>, own: Option<Millis>) -> Duration {
        let max_age = self
            .screen
            .get()
            .and_then(|s| s.max_age(caller))
            .unwrap_or(self.settings.max_age);
        match own {
            Some(own) => max_age.min(super::duration(own)),
            None => max_age,
        }
    }

    /// When a message whose round ended for `reason` (`None`: some of its
    /// recipients were deferred) is tried next; `None` when `max_age`
    /// leaves no time for that.
    fn next_attempt(&self, reason: Option<FailureReason>, p: &Pending) -> Option<Millis> {
        let now = now_millis();
        let delay = match reason {
            Some(FailureReason::Unavailable) => Duration::ZERO,
            // A relay has room again then; waiting messages spread over that
            // much again, so that they do not all come back at once. One of
            // high priority comes back for the turn the router keeps for it.
            Some(FailureReason::RateLimited { wait_ms }) => {
                let wait = Duration::from_millis(wait_ms.max(1));
                if p.priority.is_high() {
                    wait
                } else {
                    wait + wait.mul_f64(rand::rng().random_range(0.0..=1.0))
                }
            }
            // The first round of a message (new, or retried by an operator)
            // that found every relay backing off comes back when one may be
            // tried (a second at least, for the relay's probe at the end of
            // its backoff), spread as above, if that is sooner than its
            // first retry. Only the first: during an outage a message
            // follows the relays' backoff once, then its own retry schedule,
            // so that a long queue is not rewritten each time a relay's
            // backoff ends.
            Some(FailureReason::RelaysBackingOff { wait_ms }) if p.rounds == 0 => {
                let wait = Duration::from_millis(wait_ms).max(RELAY_PROBE_ALLOWANCE);
                let spread = wait + wait.mul_f64(rand::rng().random_range(0.0..=1.0));
                spread.min(self.retry_delay(1))
            }
            _ => self.retry_delay(p.rounds + 1),
        };
        let next = now + delay.as_millis() as i64;
        let expires = p.due_at + self.max_age_of(p).as_millis() as i64;
        // A retry that would fall after `max_age` is brought forward to its
        // end, so that the message has the whole of `max_age`; with no time
        // left for one, none.
        let last = expires - LAST_RETRY_MARGIN.as_millis() as i64;
        let next = if next > last && now < last {
            last
        } else {
            next
        };
        (next <= last).then_some(next)
    }

    /// `retry_base · 2^(n-1)`, capped at `retry_max`, half fixed and half
    /// random (as the relays' backoff).
    fn retry_delay(&self, round: u32) -> Duration {
        let s = &self.settings;
        let exp = round.saturating_sub(1).min(30);
        let full = s.retry_base.saturating_mul(1u32 << exp).min(s.retry_max);
        let half = full / 2;
        let jitter = rand::rng().random_range(0.0..=1.0);
        half + half.mul_f64(jitter)
    }

    /// Settles a message that waited past `max_age` without a round. One
    /// that an earlier round delivered to some recipients while it deferred
    /// others is `partial`, the others refused.
    async fn expire(&self, p: &Pending) {
        let max_age = humantime::format_duration(self.max_age_of(p));
        let mut settle = Settle {
            state: State::Expired,
            relay: None,
            attempts: Vec::new(),
            accepted: p.accepted.clone(),
            rejected: p.rejected.clone(),
            reason: Some("expired".into()),
            note: Some(format!("not delivered within max_age ({max_age})")),
            next_attempt_at: None,
            copy: false,
            body: None,
        };
        if !p.accepted.is_empty() {
            deferral_expired(&mut settle, p, None, self.max_age_of(p));
        }
        let result = self.store.settle(&p.message_id, settle.clone()).await;
        self.note_write(&result);
        if result.is_ok() {
            self.changed(&p.message_id, State::Expired);
            self.notify_settled(p, &settle);
        }
    }

    /// Tells the observer of an audited change.
    fn notify(&self, action: Action, r: &Record, decided_by: Option<&str>) {
        let Some(o) = self.observer.get() else {
            return;
        };
        o.event(&Event::of(action, r, decided_by));
    }

    /// Tells the observer of a round's final outcome, or of a round that
    /// delivered to some recipients and deferred the others.
    fn notify_settled(&self, p: &Pending, s: &Settle) {
        let Some(o) = self.observer.get() else {
            return;
        };
        let action = match Action::of_outcome(s.state) {
            Some(action) => action,
            None if deferral_round(s, p) => Action::Deferred,
            None => return,
        };
        // A deferral names the recipients of its round; an outcome, all.
        let round: Vec<String>;
        let to = if action == Action::Deferred {
            round = p.outstanding().into_iter().map(String::from).collect();
            &round
        } else {
            &p.to
        };
        if s.copy
            && let Some(relay) = &s.relay
        {
            o.delivered(&Delivered {
                message_id: &p.message_id,
                relay,
                to: &p.to,
                bytes: &p.bytes,
            });
        }
        o.event(&Event {
            action,
            message_id: &p.message_id,
            caller: p.caller.as_deref(),
            meta: p.meta.as_deref(),
            from: p.from.as_deref(),
            to,
            size: p.bytes.len() as u64,
            relay: s.relay.as_deref(),
            code: s.attempts.iter().rev().find_map(|a| a.code),
            reason: s.reason.as_deref(),
            decided_by: None,
            accepted: &s.accepted,
            rejected: &s.rejected,
            deferred: if s.state == State::Queued {
                super::unsettled(&p.to, &s.accepted, &s.rejected)
            } else {
                Vec::new()
            },
        });
    }

    fn changed(&self, id: &str, state: State) {
        if self.changes.receiver_count() > 0 {
            self.watches.own(id, state);
            let _ = self.changes.send(Change {
                message_id: id.to_owned(),
                state,
            });
        }
    }
}

/// Reads the watched messages once a [`WATCH_POLL`](super::WATCH_POLL) and
/// sends each change another process made ([`Queue::watch`]), until the
/// queue stops or is gone.
async fn poll_watched(inner: std::sync::Weak<Inner>) {
    use super::watch::{CHUNK, PER_POLL, POLL, SETTLE};
    loop {
        tokio::time::sleep(POLL).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if inner.stop.is_cancelled() {
            return;
        }
        for chunk in inner.watches.next(PER_POLL).chunks(CHUNK) {
            let prints = match inner.store.prints(chunk).await {
                Ok(prints) => prints,
                Err(e) => {
                    tracing::debug!(error = %e, "watched messages not read");
                    break;
                }
            };
            tokio::time::sleep(SETTLE).await;
            for (id, print) in prints {
                if inner.watches.read(&id, print) {
                    let _ = inner.changes.send(Change {
                        message_id: id,
                        state: print.0,
                    });
                }
            }
        }
    }
}

impl Record {
    /// This record after `s` was settled on it (the answer to a caller
    /// that waited for the round, without reading the store back).
    fn settled(mut self, s: &Settle) -> Record {
        self.settle_on(s, now_millis());
        self
    }

    /// [`Record::settled`], in place, as of `now` (when the round ended).
    fn settle_on(&mut self, s: &Settle, now: Millis) {
        self.state = s.state;
        self.updated_at = now;
        self.next_attempt_at = s.next_attempt_at;
        if s.relay.is_some() {
            self.relay = s.relay.clone();
        }
        self.accepted = s.accepted.clone();
        self.rejected = s.rejected.clone();
        self.reason = s.reason.clone();
        self.note = s.note.clone();
        self.attempts.extend(s.attempts.iter().cloned());
        self.history.push((s.state, now));
    }
}

/// At least this long before a message that found every relay backing
/// off comes back: a relay probes when its backoff ends, and a relay whose
/// circuit is open takes mail only once that probe succeeded.
const RELAY_PROBE_ALLOWANCE: Duration = Duration::from_secs(1);

/// The monotonic instant of a wall-clock time, for deadlines.
/// The outcome of a round of a message that an earlier round settled some
/// recipients of for certain (`p.accepted`, `p.rejected`): the message's,
/// over all its rounds. This round's recipients refused as a whole (a 5xx
/// to MAIL, to each RCPT or after the ".") are listed with that reply; the
/// message is `sent` when every recipient took it, `partial` when some did,
/// and `failed` when none did.
fn with_earlier_rounds(settle: &mut Settle, p: &Pending, report: &Report) {
    let refused_whole =
        settle.state == State::Failed && settle.reason.as_deref() == Some("rejected");
    if refused_whole && settle.rejected.is_empty() {
        let reply = report.attempts.last().and_then(|a| a.reply.as_ref());
        settle.rejected = p
            .outstanding()
            .into_iter()
            .map(|address| RejectedRecord {
                address: address.to_owned(),
                code: reply.map_or(550, |r| r.code),
                text: reply.map_or_else(
                    || settle.note.clone().unwrap_or_default(),
                    |r| r.text.clone(),
                ),
            })
            .collect();
    }
    let accepted = std::mem::take(&mut settle.accepted);
    let rejected = std::mem::take(&mut settle.rejected);
    // A recipient this round settled again (the retry of a failed message
    // resends to the refused ones) has this round's outcome, not both.
    let again = |a: &str| {
        accepted.iter().any(|x| x.eq_ignore_ascii_case(a))
            || rejected.iter().any(|x| x.address.eq_ignore_ascii_case(a))
    };
    let earlier: Vec<RejectedRecord> = p
        .rejected
        .iter()
        .filter(|r| !again(&r.address))
        .cloned()
        .collect();
    settle.accepted = p.accepted.iter().cloned().chain(accepted).collect();
    settle.rejected = earlier.into_iter().chain(rejected).collect();
    if !(refused_whole || matches!(settle.state, State::Sent | State::Partial)) {
        return;
    }
    let (took, refused) = (settle.accepted.len(), settle.rejected.len());
    let was = settle.note.take();
    (settle.state, settle.reason, settle.note) = match (took, refused) {
        (_, 0) => (State::Sent, None, None),
        (0, _) => (State::Failed, Some("rejected".into()), was),
        _ => (
            State::Partial,
            None,
            Some(crate::mail::partly_refused(
                refused,
                took + refused,
                was.as_deref(),
            )),
        ),
    };
}

/// A message some recipients have (`settle.accepted`) whose others
/// (`p.outstanding()`) were deferred until `max_age` ended: `partial`,
/// those refused with the last 4xx (`reply`) when there was one.
fn deferral_expired(settle: &mut Settle, p: &Pending, reply: Option<&Reply>, max_age: Duration) {
    let max_age = humantime::format_duration(max_age);
    let why = format!("deferred, and not delivered within max_age ({max_age})");
    let reply = reply.filter(|r| (400..500).contains(&r.code));
    let listed = |a: &str| {
        settle
            .rejected
            .iter()
            .any(|r| r.address.eq_ignore_ascii_case(a))
    };
    let left: Vec<&str> = p.outstanding().into_iter().filter(|a| !listed(a)).collect();
    settle
        .rejected
        .extend(left.into_iter().map(|address| RejectedRecord {
            address: address.to_owned(),
            code: reply.map_or(451, |r| r.code),
            text: match reply {
                Some(r) => format!("{} ({why})", r.text),
                None => why.clone(),
            },
        }));
    settle.state = State::Partial;
    settle.reason = None;
    settle.note = Some(crate::mail::partly_refused(
        settle.rejected.len(),
        p.to.len(),
        Some(&format!(
            "the deferred recipients were not delivered within max_age ({max_age})"
        )),
    ));
}

fn instant_of(t: Millis) -> Instant {
    let now = now_millis();
    let ahead = Duration::from_millis(u64::try_from(t - now).unwrap_or(0));
    Instant::now() + ahead
}

/// One delivery round of a claimed message: send, settle, unclaim, wake
/// whoever waits for it. Returns the report and what was settled.
async fn round(
    inner: Arc<Inner>,
    p: Pending,
    deadline: Instant,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> (Report, Option<Settle>) {
    // A caller that waits for it may still cancel it.
    let cancel = inner
        .cancels
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&p.message_id)
        .cloned();
    let (report, settle, _) = first_round(inner, p, None, deadline, slot, cancel).await;
    (report, settle)
}

/// [`round`], for a message that is `fresh` (not stored yet) when given:
/// it is stored by the commit mark, or with the round's outcome when the
/// round never reached the mark. The error is that of the write that
/// should have stored a fresh message; then nothing of it is stored.
/// A waiting caller's cancel token, known to every round of its message
/// until the call returns.
struct Heeded {
    inner: Arc<Inner>,
    id: String,
}

impl Heeded {
    fn new(inner: &Arc<Inner>, id: &str, cancel: &CancellationToken) -> Self {
        inner
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), cancel.clone());
        Heeded {
            inner: inner.clone(),
            id: id.to_owned(),
        }
    }
}

/// A message claimed for as long as this lives.
struct Claim<'a> {
    inner: &'a Inner,
    id: &'a str,
}

impl<'a> Claim<'a> {
    fn take(inner: &'a Inner, id: &'a str) -> Option<Self> {
        inner.try_claim(id).then(|| Claim { inner, id })
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.inner.unclaim(self.id);
    }
}

impl Drop for Heeded {
    fn drop(&mut self) {
        self.inner
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

async fn first_round(
    inner: Arc<Inner>,
    p: Pending,
    fresh: Option<NewMessage>,
    deadline: Instant,
    _slot: tokio::sync::OwnedSemaphorePermit,
    cancel: Option<CancellationToken>,
) -> (Report, Option<Settle>, Option<StoreError>) {
    let _counted = inner.rounds.enter();
    let started = now_millis();
    let id = p.message_id.clone();
    let was_fresh = fresh.is_some();
    let store_mark = Arc::new(StoreMark {
        inner: inner.clone(),
        message_id: id.clone(),
        fresh: Mutex::new(fresh),
        unconfirmed: AtomicBool::new(false),
        writing: tokio::sync::Mutex::new(false),
    });
    // A message that no recipient has yet, with a recipient listed since
    // it was accepted: cancelled before any relay sees it. A fresh one was
    // screened by its caller a moment ago, but not a repeat of a call whose
    // idempotency key was purged meanwhile.
    let screened = p
        .accepted
        .is_empty()
        .then(|| {
            inner
                .screen
                .get()
                .and_then(|s| s.refused(p.caller.as_deref(), &p.to))
        })
        .flatten();
    // A message some recipients have, whose others wait for a retry: those
    // listed since are not sent to, and count as refused; when none is
    // left, no relay sees the message again.
    let mut p = p;
    let mut none_left = false;
    if !p.accepted.is_empty()
        && let Some(screen) = inner.screen.get()
    {
        let listed: Vec<String> = super::unsettled(&p.to, &p.accepted, &p.rejected)
            .into_iter()
            .filter(|a| {
                screen
                    .refused(p.caller.as_deref(), &[(*a).to_owned()])
                    .is_some()
            })
            .map(str::to_owned)
            .collect();
        if !listed.is_empty() {
            p.rejected.extend(listed.into_iter().map(|address| RejectedRecord {
                address,
                code: 550,
                text: format!(
                    "not sent: on the suppression list since the message was accepted ({SUPPRESSED})"
                ),
            }));
            none_left = super::unsettled(&p.to, &p.accepted, &p.rejected).is_empty();
        }
    }
    let screened =
        screened.or_else(|| none_left.then(|| "every recipient still waiting for it".to_owned()));
    let report = match (&screened, mail_of(&p, deadline)) {
        (Some(address), _) => Report::failed_for(
            id.clone(),
            FailureReason::Cancelled,
            format!(
                "{address} is on the suppression list since the message was accepted; it was not sent"
            ),
        ),
        (None, Ok(mail)) => {
            let mark: Arc<dyn CommitMark> = store_mark.clone();
            // The delivery's log lines name the message and its caller.
            let span = tracing::info_span!(
                "delivery",
                message_id = %id,
                caller = p.caller.as_deref().unwrap_or("")
            );
            inner
                .dispatcher
                .send_cancellable(mail, Some(mark), cancel.clone())
                .instrument(span)
                .await
        }
        (None, Err(e)) => Report::failed_for(id.clone(), FailureReason::Rejected, e),
    };
    let mut settle = inner.settle_for(&report, &p, started);
    if none_left {
        // Some recipients have it, and the rest are listed.
        settle.state = State::Partial;
        settle.reason = None;
        settle.next_attempt_at = None;
        settle.note = Some(crate::mail::partly_refused(
            settle.rejected.len(),
            p.to.len(),
            Some("the recipients still waiting for it are on the suppression list"),
        ));
    } else if screened.is_some() {
        settle.state = State::Cancelled;
        settle.reason = Some(SUPPRESSED.into());
        settle.next_attempt_at = None;
    }
    // Cancelled by its caller and not taken by a relay: not tried again.
    if cancel.as_ref().is_some_and(CancellationToken::is_cancelled)
        && matches!(settle.state, State::Queued | State::Expired)
    {
        settle.state = State::Cancelled;
        settle.reason = Some(FailureReason::Cancelled.code().into());
        settle.next_attempt_at = None;
    }
    let state = settle.state;
    // After a mark being written now; a mark written later finds the
    // outcome (and no fresh message) and is refused.
    let mut writing = store_mark.writing.lock().await;
    *writing = true;
    let fresh = store_mark.take_fresh();
    // Stored by its mark (`accept_marked`), which may leave the bytes out.
    if was_fresh && fresh.is_none() && (state.keeps_body() || settle.copy) {
        settle.body = Some(p.bytes.clone());
    }
    let unconfirmed = store_mark.unconfirmed.load(Ordering::Acquire);
    let result = match &fresh {
        // No "." was sent: a row its unconfirmed mark left takes the outcome.
        Some(new) if unconfirmed => {
            inner
                .store
                .accept_settled_unconfirmed(new.clone(), settle.clone())
                .await
        }
        Some(new) => {
            inner
                .store
                .accept_settled(new.clone(), settle.clone())
                .await
        }
        None => inner.store.settle(&id, settle.clone()).await,
    };
    drop(writing);
    inner.note_write(&result);
    if result.is_ok() {
        if let Some(new) = &fresh {
            inner.notify(
                Action::Accepted,
                &new.record(State::Queued, new.queued_at),
                None,
            );
        }
        inner.changed(&id, state);
        inner.notify_settled(&p, &settle);
        if screened.is_some()
            && !none_left
            && inner.observer.get().is_some()
            && let Ok(Some(r)) = inner.store.get(&id).await
        {
            inner.notify(Action::Cancelled, &r, None);
        }
    }
    let mut lost = None;
    if let (Some(_), Err(e)) = (&fresh, &result) {
        tracing::error!(message_id = %id, error = %e, "could not store a message after its round; the caller is told so");
        // An unconfirmed mark may have stored it: never "not accepted".
        lost = Some(match e {
            StoreError::Unavailable(why) | StoreError::Fenced(why) if unconfirmed => {
                StoreError::Unconfirmed(why.clone())
            }
            e => e.clone(),
        });
    } else if let Err(StoreError::Fenced(e)) = &result {
        // Cancelled meanwhile, or another daemon's lease holds it now: its
        // state is theirs to write.
        tracing::warn!(message_id = %id, state = state.as_str(), error = %e, "a delivery's outcome was not recorded");
    } else if let Err(e) = &result {
        // The outcome is not stored. A message marked as committing stays
        // `sending` and becomes `unknown` at recovery; one not marked stays
        // queued and is tried again.
        tracing::error!(message_id = %id, state = state.as_str(), error = %e, "could not record a delivery's outcome");
    }
    inner.unclaim(&id);
    inner.wake_waiters(&id, &report);
    // Refused: the message changed hands (cancelled meanwhile, or another
    // daemon's lease), so the store, not this round, has its state.
    let recorded = !matches!(result, Err(StoreError::Fenced(_)));
    (report, recorded.then_some(settle), lost)
}

/// Whether the round that settles `s` on `p` delivered to some recipients
/// while it deferred others, which wait for a retry.
fn deferral_round(s: &Settle, p: &Pending) -> bool {
    s.state == State::Queued && s.accepted.len() > p.accepted.len()
}

fn mail_of(p: &Pending, deadline: Instant) -> Result<Mail, String> {
    let parse = |s: &str| {
        s.parse::<Address>()
            .map_err(|e| format!("stored address {s:?} is not valid: {e}"))
    };
    Ok(Mail {
        message_id: p.message_id.clone(),
        from: p.from.as_deref().map(parse).transpose()?,
        to: p
            .outstanding()
            .into_iter()
            .map(parse)
            .collect::<Result<_, _>>()?,
        bytes: p.bytes.clone(),
        deadline,
        prefer: p.prefer.clone(),
        only: p.only.clone(),
        priority: p.priority,
    })
}

/// The runner: new messages from the channel, due ones from the store.
async fn run(inner: Arc<Inner>, mut ready: mpsc::Receiver<Pending>) {
    let mut held_checked = Instant::now();
    let mut pause_read = Instant::now();
    loop {
        // Another daemon or the queue command may pause or resume.
        if pause_read.elapsed() >= POLL_INTERVAL {
            pause_read = Instant::now();
            let settings = inner.pause_settings();
            match inner.store.paused().await {
                Ok(p) => inner.note_pause(p, Some(settings)),
                Err(e) => tracing::debug!(error = %e, "reading whether delivery is paused failed"),
            }
        }
        if held_checked.elapsed() >= HELD_INTERVAL {
            held_checked = Instant::now();
            expire_held(&inner).await;
            tell_unknown(&inner).await;
            // Daemons on one shared store share each relay's rate.
            if let Some(n) = inner.store.nodes() {
                inner.dispatcher.set_rate_share(n);
            }
        }
        tokio::select! {
            biased;
            () = inner.stop.cancelled() => break,
            Some(p) = ready.recv() => {
                let size = p.bytes.len() as u64;
                if inner.is_paused() {
                    // It waits in the store for a poll after the resume.
                    inner.runner_bytes.fetch_sub(size, Ordering::AcqRel);
                    release(&inner, std::slice::from_ref(&p.message_id)).await;
                    continue;
                }
                let Some(slot) = acquire(&inner).await else {
                    inner.runner_bytes.fetch_sub(size, Ordering::AcqRel);
                    inner.unclaim(&p.message_id);
                    break;
                };
                let deadline = Instant::now() + inner.settings.delivery_timeout;
                let inner = inner.clone();
                tokio::spawn(async move {
                    round(inner.clone(), p, deadline, slot).await;
                    inner.round_ended(size, false);
                });
            }
            () = inner.wake.notified() => poll(&inner).await,
            () = tokio::time::sleep(POLL_INTERVAL) => poll(&inner).await,
        }
    }
    // Messages still in the channel stay queued in the store.
    while let Ok(p) = ready.try_recv() {
        inner
            .runner_bytes
            .fetch_sub(p.bytes.len() as u64, Ordering::AcqRel);
        inner.unclaim(&p.message_id);
    }
}

/// Tells the observer (the audit log, the metrics) of the messages that
/// recovery, or a takeover of a stopped daemon's leases, made `unknown`,
/// once it is attached. A message that cannot be read now is told later.
async fn tell_unknown(inner: &Arc<Inner>) {
    if inner.observer.get().is_none() {
        return;
    }
    let mut ids = std::mem::take(&mut *inner.untold.lock().unwrap_or_else(|e| e.into_inner()));
    ids.extend(inner.store.taken_over_unknown());
    let mut later = Vec::new();
    for id in ids {
        match inner.store.get(&id).await {
            Ok(Some(r)) => {
                inner.changed(&id, State::Unknown);
                let mut e = Event::of(Action::Unknown, &r, None);
                e.reason = e.reason.or(Some(RECOVERED));
                if let Some(o) = inner.observer.get() {
                    o.event(&e);
                }
            }
            Ok(None) => {}
            Err(_) => later.push(id),
        }
    }
    inner
        .untold
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(later);
}

/// The audit reason of a message made `unknown` because the daemon that
/// handed it to a relay stopped before it learnt the outcome.
const RECOVERED: &str = "recovered";

/// Expires held messages that nobody approved in time.
async fn expire_held(inner: &Arc<Inner>) {
    let ids = match inner.store.expire_held(now_millis()).await {
        Ok(ids) => ids,
        Err(e) => {
            tracing::debug!(error = %e, "expiring held messages failed");
            return;
        }
    };
    for id in ids {
        tracing::info!(message_id = %id, "a held message expired: nobody approved it in time");
        inner.changed(&id, State::Expired);
        if inner.observer.get().is_some()
            && let Ok(Some(r)) = inner.store.get(&id).await
        {
            inner.notify(Action::Expired, &r, None);
        }
    }
}

async fn acquire(inner: &Arc<Inner>) -> Option<tokio::sync::OwnedSemaphorePermit> {
    tokio::select! {
        () = inner.stop.cancelled() => None,
        p = inner.slots.clone().acquire_owned() => p.ok(),
    }
}

/// Starts a round for every due message no round holds, as slots allow.
async fn poll(inner: &Arc<Inner>) {
    let free = inner.slots.available_permits();
    if free == 0 || inner.stop.is_cancelled() || inner.is_paused() {
        return;
    }
    // Every relay backs off (or is closed): a round would only defer what
    // it claimed. The due mail waits where it is, for the poll after a
    // relay's backoff ends, or for another daemon on a shared queue; a
    // poll a second still expires what is past `max_age`, and defers the
    // rest as before.
    if !inner.dispatcher.any_relay_available() {
        let now = u64::try_from(now_millis()).unwrap_or(0);
        let last = inner.outage_polled.load(Ordering::Acquire);
        if now.saturating_sub(last) < OUTAGE_POLL_INTERVAL.as_millis() as u64 {
            return;
        }
        inner.outage_polled.store(now, Ordering::Release);
    }
    // The rounds that end wake the runner while there is a backlog.
    let room = RUNNER_BYTES.saturating_sub(inner.runner_bytes.load(Ordering::Acquire));
    if room == 0 {
        return;
    }
    let want = free.min(POLL_BATCH);
    let ids = match inner.store.due(now_millis(), want).await {
        Ok(ids) => ids,
        Err(e) => {
            tracing::debug!(error = %e, "polling the queue failed");
            return;
        }
    };
    // The page holds the messages in flight too (due until their mark):
    // a full one may leave due messages behind it.
    inner.backlog.store(ids.len() == want, Ordering::Release);
    let claimed: Vec<String> = ids.into_iter().filter(|id| inner.try_claim(id)).collect();
    if claimed.is_empty() {
        return;
    }
    // Loaded after the claims: a cancel that won the race shows here.
    let loaded = match inner.store.load_many(&claimed, room).await {
        Ok(loaded) => loaded,
        Err(e) => {
            tracing::debug!(error = %e, "loading due messages failed");
            release(inner, &claimed).await;
            return;
        }
    };
    // A page cut short by `room` leaves due messages behind it too.
    let bytes: u64 = loaded.iter().map(|p| p.bytes.len() as u64).sum();
    if bytes >= room {
        inner.backlog.store(true, Ordering::Release);
    }
    let mut loaded: HashMap<String, Pending> = loaded
        .into_iter()
        .map(|p| (p.message_id.clone(), p))
        .collect();
    // Oldest due first, as `due` gave them; every claim not handed to a
    // round (`left`) is released.
    let mut left = Vec::new();
    for (k, id) in claimed.iter().enumerate() {
        let Some(p) = loaded
            .remove(id)
            .filter(|p| matches!(p.state, State::Queued | State::Scheduled))
        else {
            left.push(id.clone());
            continue;
        };
        let expires = p.due_at + inner.max_age_of(&p).as_millis() as i64;
        if now_millis() > expires {
            inner.expire(&p).await;
            inner.unclaim(id);
            continue;
        }
        let Ok(slot) = inner.slots.clone().try_acquire_owned() else {
            left.extend_from_slice(&claimed[k..]);
            break;
        };
        let deadline = Instant::now() + inner.settings.delivery_timeout;
        let size = p.bytes.len() as u64;
        inner.polled.fetch_add(1, Ordering::AcqRel);
        inner.runner_bytes.fetch_add(size, Ordering::AcqRel);
        let inner = inner.clone();
        tokio::spawn(async move {
            round(inner.clone(), p, deadline, slot).await;
            inner.round_ended(size, true);
        });
    }
    release(inner, &left).await;
}

/// Claims a poll did not start: unclaimed here, and let go in a shared
/// store ([`Store::let_go`]); a failure there only leaves their leases to
/// run out.
async fn release(inner: &Inner, ids: &[String]) {
    for id in ids {
        inner.unclaim(id);
    }
    if ids.is_empty() {
        return;
    }
    if let Err(e) = inner.store.let_go(ids).await {
        tracing::debug!(error = %e, "letting go of due messages failed");
    }
}

/// The pause between purges for a given `retain`.
fn purge_every(retain: Duration) -> Duration {
    (retain / 4).clamp(Duration::from_secs(1), PURGE_INTERVAL)
}

async fn purge_loop(inner: Arc<Inner>) {
    loop {
        let now = now_millis();
        let finished = now - inner.settings.retain.as_millis() as i64;
        let keys = now - inner.settings.idempotency_ttl.as_millis() as i64;
        match super::purge(inner.store.as_ref(), finished, keys, super::PURGE_CHUNK).await {
            Ok(n) if n > 0 => tracing::info!(purged = n, "purged finished messages past retain"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "purging the queue failed"),
        }
        tokio::select! {
            () = inner.stop.cancelled() => return,
            () = tokio::time::sleep(purge_every(inner.settings.retain)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mail::Attempt;

    /// A read of the store that began before a pause or a resume through
    /// this queue does not undo it; one that began after it is taken.
    #[test]
    fn a_stale_read_of_the_pause_changes_nothing() {
        let paused = |by: &str| {
            Some(Paused {
                since: 1,
                by: by.into(),
                reason: None,
            })
        };
        let mut p = PauseState::default();
        let read = p.settings;
        assert!(p.take(paused("operator ops"), None), "paused here");
        assert!(p.take(None, Some(read)), "a read from before the pause");
        assert_eq!(p.current, paused("operator ops"));
        let read = p.settings;
        assert!(!p.take(None, Some(read)), "a later read: resumed elsewhere");
        assert!(
            p.take(paused("queue command"), Some(read)),
            "paused elsewhere"
        );
        let read = p.settings;
        assert!(!p.take(None, None), "resumed here");
        assert!(
            !p.take(paused("queue command"), Some(read)),
            "a read from before the resume"
        );
        assert_eq!(p.current, None);
    }

    /// An `unknown` message that took `p@` and refused `q@` for certain,
    /// retried for `r@` alone.
    fn retried(earlier_accepted: &[&str]) -> Pending {
        Pending {
            message_id: "m".into(),
            state: State::Queued,
            from: None,
            to: ["p@example.org", "q@example.org", "r@example.org"]
                .map(String::from)
                .to_vec(),
            bytes: Arc::from(&b"x"[..]),
            prefer: None,
            due_at: 0,
            rounds: 0,
            caller: None,
            meta: None,
            only: None,
            max_age: None,
            priority: Default::default(),
            copied: false,
            accepted: earlier_accepted.iter().map(|a| a.to_string()).collect(),
            rejected: vec![RejectedRecord {
                address: "q@example.org".into(),
                code: 550,
                text: "no such user".into(),
            }],
        }
    }

    fn outcome(state: State, reason: Option<&str>, accepted: &[&str]) -> Settle {
        Settle {
            state,
            relay: Some("r".into()),
            attempts: vec![],
            accepted: accepted.iter().map(|a| a.to_string()).collect(),
            rejected: vec![],
            reason: reason.map(Into::into),
            note: Some("this round".into()),
            next_attempt_at: None,
            copy: false,
            body: None,
        }
    }

    fn report(reply: Option<(u16, &str)>) -> Report {
        Report {
            message_id: "m".into(),
            status: Status::Failed,
            relay: Some("r".into()),
            accepted: vec![],
            rejected: vec![],
            deferred: vec![],
            attempts: vec![Attempt {
                relay: "r".into(),
                class: None,
                reply: reply.map(|(code, text)| Reply {
                    code,
                    text: text.into(),
                }),
                detail: String::new(),
                duration: Duration::ZERO,
            }],
            failure: None,
            message: None,
        }
    }

    fn addresses(s: &Settle) -> (Vec<&str>, Vec<(&str, u16)>) {
        (
            s.accepted.iter().map(String::as_str).collect(),
            s.rejected
                .iter()
                .map(|r| (r.address.as_str(), r.code))
                .collect(),
        )
    }

    #[test]
    fn a_recipient_settled_again_has_the_latest_rounds_outcome() {
        // The retry of a failed message resends to the refused q@, which
        // takes it now: sent, not both taken and refused.
        let mut s = outcome(
            State::Sent,
            None,
            &["p@example.org", "q@example.org", "r@example.org"],
        );
        with_earlier_rounds(&mut s, &retried(&[]), &report(None));
        assert_eq!(s.state, State::Sent);
        assert!(s.rejected.is_empty(), "{:?}", s.rejected);
        // Refused again, with another reply: that one.
        let mut s = outcome(State::Partial, None, &["p@example.org", "r@example.org"]);
        s.rejected = vec![RejectedRecord {
            address: "Q@example.org".into(),
            code: 552,
            text: "5.2.2 mailbox full".into(),
        }];
        with_earlier_rounds(&mut s, &retried(&[]), &report(None));
        assert_eq!(s.state, State::Partial);
        assert_eq!(addresses(&s).1, vec![("Q@example.org", 552)]);
    }

    #[test]
    fn a_retried_round_settles_the_message_over_all_its_rounds() {
        // Taken by the retry: partial, as q@ was refused before.
        let mut s = outcome(State::Sent, None, &["r@example.org"]);
        with_earlier_rounds(&mut s, &retried(&["p@example.org"]), &report(None));
        assert_eq!(s.state, State::Partial);
        assert_eq!(
            addresses(&s),
            (
                vec!["p@example.org", "r@example.org"],
                vec![("q@example.org", 550)]
            )
        );
        assert!(
            s.note
                .unwrap()
                .starts_with("1 of 3 recipients were refused")
        );

        // Refused as a whole by the retry: partial still, p@ had it.
        let mut s = outcome(State::Failed, Some("rejected"), &[]);
        let refusal = report(Some((554, "5.7.1 rejected")));
        with_earlier_rounds(&mut s, &retried(&["p@example.org"]), &refusal);
        assert_eq!(s.state, State::Partial);
        assert_eq!(s.reason, None);
        assert_eq!(
            addresses(&s).1,
            vec![("q@example.org", 550), ("r@example.org", 554)]
        );

        // Nobody took it in any round: failed, every refusal listed.
        let mut s = outcome(State::Failed, Some("rejected"), &[]);
        with_earlier_rounds(&mut s, &retried(&[]), &refusal);
        assert_eq!(s.state, State::Failed);
        assert_eq!(s.reason.as_deref(), Some("rejected"));
        assert_eq!(
            addresses(&s).1,
            vec![
                ("q@example.org", 550),
                ("p@example.org", 554),
                ("r@example.org", 554)
            ]
        );

        // Deferred: still queued, and the earlier lists kept for later.
        let mut s = outcome(State::Queued, Some("all_relays_failed"), &[]);
        with_earlier_rounds(&mut s, &retried(&["p@example.org"]), &report(None));
        assert_eq!(s.state, State::Queued);
        assert_eq!(
            addresses(&s),
            (vec!["p@example.org"], vec![("q@example.org", 550)])
        );
    }

    #[test]
    fn only_the_recipients_not_settled_for_certain_are_outstanding() {
        let mut p = retried(&["P@example.org"]);
        assert_eq!(p.outstanding(), ["r@example.org"]);
        let all = ["p@example.org", "q@example.org", "r@example.org"];
        // Every one settled: all of them, rather than a round with none.
        p.accepted.push("r@example.org".into());
        assert_eq!(p.outstanding(), all);
        p.accepted.clear();
        p.rejected.clear();
        assert_eq!(p.outstanding(), all);
    }
}
