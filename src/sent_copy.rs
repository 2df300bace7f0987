//! The copy of each sent message in the account's Sent folder, for relays
//! with `[relays.sent_copy]`: SMTP submission files no copy, so after a
//! relay took a message (`sent` or `partial`, or for some recipients while
//! others were deferred: the first round that delivered, once) mailmux
//! APPENDs exactly the bytes it sent over IMAP, with the `\Seen` flag and
//! the message's date.
//!
//! The copy runs off the delivery path: the queue's observer hands each
//! delivered message to its relay's copier (a bounded channel), and at most
//! `max_connections` workers per relay, each with one IMAP session it keeps
//! and reuses, append them. A failed copy is tried again with backoff, then
//! recorded on the message (`failed: <reason>`), counted, and logged once.
//! It never delays or fails the send. A durable store holds each copy as
//! `pending` (with the message's bytes) from the delivery's settle until its
//! outcome, so the copies a crash interrupted are made at the next start;
//! for those, the folder is searched for the Message-ID first, so that a
//! copy filed just before the crash is not filed twice. At shutdown the
//! copies still waiting get the grace period once the last delivery ended;
//! each one not made by then stays pending for the next start on a durable
//! store, and is recorded as failed on `memory`, never dropped unsaid.
//! IMAP is spoken by `async-imap`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::imap::{ImapAccount, ImapSession};
use mailmux_actors::queue::{
    CopyDue, Delivered, Drain, Event, Millis, Observer, Queue, now_millis,
};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Copies waiting per relay; past it a copy is recorded as failed at once.
const BACKLOG: usize = 100_000;
/// How often a daemon on a shared store looks for the pending copies of
/// daemons that stopped.
const TAKE_OVER_EVERY: Duration = Duration::from_secs(30);
/// One IMAP command (or the connection and login) may take this long.
const IMAP_TIMEOUT: Duration = Duration::from_secs(30);

/// Which folder gets the copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Folder {
    Named(String),
    /// The folder whose SPECIAL-USE attribute is `\Sent` (RFC 6154), else
    /// `Sent`.
    SpecialUse,
}

/// A relay's validated `[relays.sent_copy]`.
#[derive(Debug, Clone, PartialEq)]
pub struct SentCopySettings {
    pub account: ImapAccount,
    pub folder: Folder,
    /// Add a Bcc header naming the envelope's Bcc recipients. Default: no.
    pub include_bcc: bool,
    /// IMAP connections at once.
    pub max_connections: usize,
    /// Tries of one copy before it is recorded as failed.
    pub attempts: u32,
    /// The wait before the second try; it doubles for each later one.
    pub retry_base: Duration,
}

/// One copy to file.
#[derive(Debug)]
struct Job {
    message_id: String,
    to: Vec<String>,
    bytes: Arc<[u8]>,
    /// Left pending by a crash: it may be in the folder already.
    recovered: bool,
}

/// Why a copy was not made when the daemon stopped first.
const STOPPED: &str = "the daemon stopped before the copy was made";

/// The copiers of every relay with a Sent copy; the queue's observer.
#[derive(Debug)]
pub struct SentCopies {
    by_relay: HashMap<String, mpsc::Sender<Job>>,
    queue: Queue,
    /// Set at shutdown: a copy handed over later is recorded as failed.
    closing: AtomicBool,
    /// Copies handed over and not yet recorded, copied or failed.
    pending: Arc<tokio::sync::watch::Sender<usize>>,
    /// Tells the workers to stop, recording what they still hold.
    stop: CancellationToken,
    workers: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl SentCopies {
    /// Starts the workers of every relay in `settings` (relay name →
    /// settings), and hands them the copies a crash left pending. Nothing
    /// runs for a relay without a Sent copy, and nothing is looked for on a
    /// hand-off queue (the daemon that owns the store makes its copies).
    ///
    /// Call it before the queue runs ([`Queue::run`], with this as an
    /// observer): the first look for pending copies is made before it
    /// returns, so that no round of this run has touched a row it finds,
    /// and every copy settled from then on is handed over as it is settled.
    pub async fn start(queue: Queue, settings: &[(String, SentCopySettings)]) -> Arc<SentCopies> {
        let started = now_millis();
        metrics::gauge!(crate::telemetry::SENT_COPIES_WAITING).set(0.0);
        let mut by_relay = HashMap::new();
        let pending = Arc::new(tokio::sync::watch::Sender::new(0));
        let stop = CancellationToken::new();
        let mut workers = Vec::new();
        for (relay, s) in settings {
            let (tx, rx) = mpsc::channel(BACKLOG);
            let rx = Arc::new(Mutex::new(rx));
            let s = Arc::new(s.clone());
            for _ in 0..s.max_connections.max(1) {
                let copier = Copier {
                    relay: relay.clone(),
                    settings: s.clone(),
                    jobs: rx.clone(),
                    queue: queue.clone(),
                    pending: pending.clone(),
                    stop: stop.clone(),
                };
                workers.push(tokio::spawn(copier.run()));
            }
            by_relay.insert(relay.clone(), tx);
        }
        let copies = Arc::new(SentCopies {
            by_relay,
            queue,
            closing: AtomicBool::new(false),
            pending,
            stop,
            workers: std::sync::Mutex::new(workers),
        });
        if copies.queue.delivers() {
            let mine = copies.look(started, true).await;
            tokio::spawn(copies.clone().resume(mine));
        }
        copies
    }

    /// Hands over the copies the first look found; on a shared store, then
    /// every [`TAKE_OVER_EVERY`], the copies of daemons that stopped. Ends
    /// when the daemon stops; the copies not handed over stay pending.
    async fn resume(self: Arc<Self>, mut due: Vec<CopyDue>) {
        loop {
            if !self.hand_over(due).await || self.queue.node().is_none() {
                return;
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(TAKE_OVER_EVERY) => {}
            }
            due = self.look(now_millis(), false).await;
        }
    }

    /// One look for pending copies ([`Queue::pending_copies`]): with
    /// `mine`, those an earlier run of this daemon settled before `before`;
    /// else those of daemons that stopped. Nothing when the store cannot be
    /// read (the copies wait for the next look, or the next start).
    async fn look(&self, before: Millis, mine: bool) -> Vec<CopyDue> {
        match self.queue.pending_copies(before, mine).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the Sent copies left pending");
                Vec::new()
            }
        }
    }

    /// Hands `due` to the copiers; false once the daemon is stopping. A
    /// copy that could not be handed over stays pending, for this daemon's
    /// next start (or, on a shared store, for another daemon once this one
    /// stopped).
    async fn hand_over(&self, due: Vec<CopyDue>) -> bool {
        if !due.is_empty() {
            tracing::info!(
                copies = due.len(),
                "making the Sent copies that were waiting when a daemon stopped"
            );
        }
        for CopyDue { message_id, relay } in due {
            if self.closing.load(Ordering::Acquire) {
                return false;
            }
            let Some(tx) = self.by_relay.get(&relay) else {
                failed(
                    &self.queue,
                    &relay,
                    &message_id,
                    "its relay no longer files a Sent copy",
                )
                .await;
                continue;
            };
            let stored = match self.queue.stored(&message_id).await {
                Ok(Some(stored)) => stored,
                Ok(None) => {
                    failed(
                        &self.queue,
                        &relay,
                        &message_id,
                        "the message's bytes are no longer stored",
                    )
                    .await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read a Sent copy left pending");
                    return true;
                }
            };
            let job = Job {
                message_id,
                to: stored.to,
                bytes: stored.bytes,
                recovered: true,
            };
            waiting(&self.pending, 1);
            let sent = tokio::select! {
                biased;
                () = self.stop.cancelled() => false,
                sent = tx.send(job) => sent.is_ok(),
            };
            if !sent {
                waiting(&self.pending, -1);
                return false;
            }
        }
        true
    }
}

impl Observer for SentCopies {
    fn event(&self, _e: &Event<'_>) {}

    fn copies(&self, relay: &str) -> bool {
        self.by_relay.contains_key(relay)
    }

    fn delivered(&self, d: &Delivered<'_>) {
        let Some(tx) = self.by_relay.get(d.relay) else {
            return;
        };
        let job = Job {
            message_id: d.message_id.to_owned(),
            to: d.to.to_vec(),
            bytes: d.bytes.clone(),
            recovered: false,
        };
        let refused = if self.closing.load(Ordering::Acquire) {
            // A durable store recorded it pending with the settle: the
            // next start makes it.
            (!self.queue.durable()).then_some((job, STOPPED))
        } else {
            waiting(&self.pending, 1);
            match tx.try_send(job) {
                Ok(()) => None,
                Err(
                    mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job),
                ) => {
                    waiting(&self.pending, -1);
                    Some((job, "too many copies waiting"))
                }
            }
        };
        if let Some((job, reason)) = refused {
            let queue = self.queue.clone();
            let relay = d.relay.to_owned();
            tokio::spawn(async move {
                failed(&queue, &relay, &job.message_id, reason).await;
            });
        }
    }

    /// Waits for the copies handed over until `until`, then stops the
    /// workers. The copies they still hold stay pending on a durable store
    /// and are recorded as failed on `memory`.
    fn drain(&self, until: Instant) -> Drain<'_> {
        Box::pin(async move {
            self.closing.store(true, Ordering::Release);
            let mut pending = self.pending.subscribe();
            let waiting = *pending.borrow();
            if waiting > 0 {
                tracing::info!(copies = waiting, "shutdown: waiting for the Sent copies");
            }
            let _ = tokio::time::timeout_at(until, pending.wait_for(|n| *n == 0)).await;
            let left = *pending.borrow();
            if left > 0 && self.queue.durable() {
                tracing::info!(
                    copies = left,
                    "shutdown: Sent copies left pending; the next start makes them"
                );
            }
            self.stop.cancel();
            let workers =
                std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
            for w in workers {
                let _ = w.await;
            }
        })
    }
}

/// One worker of a relay's copies.
struct Copier {
    relay: String,
    settings: Arc<SentCopySettings>,
    jobs: Arc<Mutex<mpsc::Receiver<Job>>>,
    queue: Queue,
    pending: Arc<tokio::sync::watch::Sender<usize>>,
    stop: CancellationToken,
}

impl Copier {
    /// Takes copies off the relay's channel and files them, one session
    /// kept open between them. Once stopped, leaves the copy it was making
    /// and every one still waiting to [`Copier::unmade`].
    async fn run(self) {
        let mut session: Option<(ImapSession, String)> = None;
        loop {
            let job = tokio::select! {
                biased;
                () = self.stop.cancelled() => None,
                job = async { self.jobs.lock().await.recv().await } => job,
            };
            let Some(job) = job else {
                break;
            };
            let outcome = tokio::select! {
                biased;
                () = self.stop.cancelled() => None,
                outcome = copy(&self.relay, &self.settings, &mut session, &job) => Some(outcome),
            };
            match outcome {
                Some(outcome) => self.record(&job, outcome).await,
                None => self.unmade(&job).await,
            }
        }
        // Stopped (or the channel closed, and then nothing is left).
        loop {
            let job = self.jobs.lock().await.try_recv();
            let Ok(job) = job else {
                break;
            };
            self.unmade(&job).await;
        }
    }

    /// A copy the daemon stops before making. A durable store keeps it
    /// pending, with the message's bytes, and the next start makes it
    /// (searching the folder first, in case the APPEND it interrupted went
    /// through); on `memory` it is recorded as failed.
    async fn unmade(&self, job: &Job) {
        if self.queue.durable() {
            waiting(&self.pending, -1);
        } else {
            self.record(job, Err(STOPPED.to_string())).await;
        }
    }

    async fn record(&self, job: &Job, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => {
                metrics::counter!(crate::telemetry::SENT_COPIES, "relay" => self.relay.clone(), "outcome" => "copied")
                    .increment(1);
                if let Err(e) = self.queue.note_copy(&job.message_id, "copied").await {
                    tracing::warn!(message_id = %job.message_id, error = %e, "cannot record the Sent copy");
                }
            }
            Err(reason) => failed(&self.queue, &self.relay, &job.message_id, &reason).await,
        }
        waiting(&self.pending, -1);
    }
}

/// Files one copy, with the tries and backoff of the settings; the session
/// is reused, and dropped when it may be broken.
async fn copy(
    relay: &str,
    s: &SentCopySettings,
    session: &mut Option<(ImapSession, String)>,
    job: &Job,
) -> Result<(), String> {
    let content = copy_bytes(job, s.include_bcc);
    let date = internal_date(&job.bytes);
    let mut last_error = String::new();
    for attempt in 0..s.attempts.max(1) {
        if attempt > 0 {
            let wait = s.retry_base * 2u32.saturating_pow(attempt - 1);
            tokio::time::sleep(wait).await;
        }
        if session.is_none() {
            match tokio::time::timeout(IMAP_TIMEOUT, open(s, attempt > 0)).await {
                Ok(Ok(opened)) => *session = Some(opened),
                Ok(Err(e)) => {
                    last_error = e;
                    tracing::debug!(relay = %relay, message_id = %job.message_id, attempt, error = %last_error, "Sent copy: cannot open the IMAP session");
                    continue;
                }
                Err(_) => {
                    last_error = format!("no IMAP answer within {IMAP_TIMEOUT:?}");
                    continue;
                }
            }
        }
        let Some((sess, folder)) = session.as_mut() else {
            continue;
        };
        if job.recovered {
            match filed_already(sess, folder, &job.message_id).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    last_error = e;
                    *session = None;
                    continue;
                }
            }
        }
        let appended = tokio::time::timeout(
            IMAP_TIMEOUT,
            // async-imap quotes the mailbox name itself.
            sess.append(folder.as_str(), Some("(\\Seen)"), date.as_deref(), &content),
        )
        .await;
        match appended {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last_error = format!("APPEND to {folder:?}: {e}"),
            Err(_) => last_error = format!("APPEND: no answer within {IMAP_TIMEOUT:?}"),
        }
        // The session may be broken: open a new one for the next try.
        *session = None;
        tracing::debug!(relay = %relay, message_id = %job.message_id, attempt, error = %last_error, "Sent copy failed; trying again");
    }
    Err(last_error)
}

/// Whether `folder` holds a message with this Message-ID: a copy the
/// daemon may have filed just before a crash, without recording it.
async fn filed_already(
    session: &mut ImapSession,
    folder: &str,
    message_id: &str,
) -> Result<bool, String> {
    let within = |e: String| format!("looking for the copy in {folder:?}: {e}");
    // The daemon's Message-IDs need no quoting inside "": one that would is
    // not searched for.
    if !message_id
        .chars()
        .all(|c| c.is_ascii_graphic() && c != '"' && c != '\\')
    {
        return Ok(false);
    }
    let examined = tokio::time::timeout(IMAP_TIMEOUT, session.examine(folder))
        .await
        .map_err(|_| within(format!("no answer within {IMAP_TIMEOUT:?}")))?;
    match examined {
        Ok(_) => {}
        // No such folder yet: nothing was filed in it.
        Err(async_imap::error::Error::No(_)) => return Ok(false),
        Err(e) => return Err(within(e.to_string())),
    }
    let query = format!("HEADER Message-ID \"{message_id}\"");
    let found = tokio::time::timeout(IMAP_TIMEOUT, session.uid_search(query))
        .await
        .map_err(|_| within(format!("no answer within {IMAP_TIMEOUT:?}")))?
        .map_err(|e| within(e.to_string()))?;
    Ok(!found.is_empty())
}

/// Adds `delta` to the copies handed over and not yet recorded, and shows
/// the count as the `mailmux_sent_copies_waiting` gauge.
fn waiting(pending: &tokio::sync::watch::Sender<usize>, delta: isize) {
    pending.send_modify(|n| *n = n.saturating_add_signed(delta));
    metrics::gauge!(crate::telemetry::SENT_COPIES_WAITING).set(*pending.borrow() as f64);
}

/// Records a copy that will not be made: on the message, as a metric, and
/// in one log line.
async fn failed(queue: &Queue, relay: &str, message_id: &str, reason: &str) {
    metrics::counter!(crate::telemetry::SENT_COPIES, "relay" => relay.to_owned(), "outcome" => "failed")
        .increment(1);
    tracing::warn!(relay = %relay, message_id = %message_id, reason = %reason, "no copy in the Sent folder");
    if let Err(e) = queue
        .note_copy(message_id, &format!("failed: {reason}"))
        .await
    {
        tracing::warn!(message_id = %message_id, error = %e, "cannot record the Sent copy");
    }
}

/// The bytes to file: as sent, with a Bcc header when asked for (the
/// envelope's recipients that no To or Cc header names).
fn copy_bytes(job: &Job, include_bcc: bool) -> Vec<u8> {
    if !include_bcc {
        return job.bytes.to_vec();
    }
    let visible: Vec<String> = mail_parser::MessageParser::default()
        .parse(&job.bytes[..])
        .map(|m| {
            [m.to(), m.cc()]
                .into_iter()
                .flatten()
                .flat_map(|list| {
                    list.iter()
                        .filter_map(|a| a.address().map(str::to_lowercase))
                })
                .collect()
        })
        .unwrap_or_default();
    let bcc: Vec<&str> = job
        .to
        .iter()
        .filter(|r| !visible.contains(&r.to_lowercase()))
        .map(String::as_str)
        .collect();
    if bcc.is_empty() {
        return job.bytes.to_vec();
    }
    let mut out = format!("Bcc: {}\r\n", bcc.join(", ")).into_bytes();
    out.extend_from_slice(&job.bytes);
    out
}

/// The message's Date header as an IMAP date-time (`"29-Nov-2026 18:03:04 +0000"`).
fn internal_date(bytes: &[u8]) -> Option<String> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m = mail_parser::MessageParser::default().parse_headers(bytes)?;
    let d = m.date()?;
    let month = MONTHS.get(usize::from(d.month).checked_sub(1)?)?;
    let sign = if d.tz_before_gmt { '-' } else { '+' };
    Some(format!(
        "\"{:02}-{month}-{:04} {:02}:{:02}:{:02} {sign}{:02}{:02}\"",
        d.day, d.year, d.hour, d.minute, d.second, d.tz_hour, d.tz_minute
    ))
}

/// Connects, secures, logs in, and finds the folder. `fresh` asks for a
/// new OAuth2 token (the last login may have failed on an old one).
async fn open(s: &SentCopySettings, fresh: bool) -> Result<(ImapSession, String), String> {
    let mut session = crate::imap::login(&s.account, fresh).await?;
    let folder = match &s.folder {
        Folder::Named(f) => f.clone(),
        Folder::SpecialUse => special_use_sent(&mut session).await?,
    };
    Ok((session, folder))
}

/// The folder marked `\Sent`, else `Sent`.
async fn special_use_sent(session: &mut ImapSession) -> Result<String, String> {
    use futures::TryStreamExt as _;
    let names: Vec<async_imap::types::Name> = session
        .list(Some(""), Some("*"))
        .await
        .map_err(|e| format!("LIST: {e}"))?
        .try_collect()
        .await
        .map_err(|e| format!("LIST: {e}"))?;
    Ok(names
        .iter()
        .find(|n| {
            n.attributes()
                .iter()
                .any(|a| matches!(a, async_imap::imap_proto::NameAttribute::Sent))
        })
        .map_or_else(|| "Sent".to_owned(), |n| n.name().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_bcc() {
        let bytes: Arc<[u8]> = Arc::from(
            &b"Date: Sun, 29 Nov 2026 18:03:04 +0100\r\nTo: a@example.org\r\nCc: B@example.org\r\nSubject: s\r\n\r\nbody\r\n"[..],
        );
        assert_eq!(
            internal_date(&bytes).as_deref(),
            Some("\"29-Nov-2026 18:03:04 +0100\"")
        );
        let job = Job {
            message_id: "m".into(),
            to: vec![
                "a@example.org".into(),
                "b@example.org".into(),
                "hidden@example.org".into(),
            ],
            bytes,
            recovered: false,
        };
        assert_eq!(copy_bytes(&job, false), &job.bytes[..]);
        let with = copy_bytes(&job, true);
        assert!(with.starts_with(b"Bcc: hidden@example.org\r\nDate:"));
        assert_eq!(&with[with.len() - job.bytes.len()..], &job.bytes[..]);
    }
}
