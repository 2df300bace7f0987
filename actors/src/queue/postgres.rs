//! The PostgreSQL store: one queue shared by several daemons.
//!
//! Each daemon has a node id. A daemon delivers a message only while it
//! holds the message's lease: `node` names the holder, `lease_until` (in the
//! database's clock) ends it, and `lease_epoch` grows by one each time the
//! lease changes hands. The store remembers the epoch of every lease it
//! holds, and every write a delivery makes (`mark`, `settle`) names that
//! epoch and this node: a daemon whose lease was taken over can no longer
//! change the message. A task renews the leases this daemon holds.
//!
//! Due messages are claimed in batches with `FOR UPDATE SKIP LOCKED`, so
//! daemons polling at once take different messages. The marks of concurrent
//! rounds go to PostgreSQL together in one statement, and so do their
//! settles (`UPDATE … FROM unnest(…)`, each row fenced by its own epoch), as
//! the SQLite store folds its writes into one transaction. A message left in
//! `sending` by a daemon whose lease ran out follows the crash rule: before
//! its commit mark it is queued again, after it it becomes `unknown`.
//!
//! The schema is applied at start under an advisory lock, so that two
//! daemons starting at once do not both migrate; a schema newer than this
//! build is refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Executor, Row};
use tokio::sync::{mpsc, oneshot};

use super::rows::{self, entry, lines};
use super::{
    Accepted, AttemptRecord, Cancel, CopyDue, Decided, Decision, Feed, Filter, Millis, NewMessage,
    Paused, Pending, Print, Purged, RateTake, Record, Recovered, ReportRecord, Retry, Settle,
    State, Stats, Store, StoreError, Summary, Suppression, SuppressionChange, SuppressionPage,
    SuppressionQuery, abandoned, now_millis,
};

/// The schema, one migration per version; `mailmux_schema` records how many
/// were applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE mailmux_messages (
    seq BIGSERIAL PRIMARY KEY,
    message_id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    mail_from TEXT,
    rcpt TEXT NOT NULL,
    size BIGINT NOT NULL,
    body BYTEA,
    prefer TEXT,
    idem_key TEXT,
    queued_at BIGINT NOT NULL,
    due_at BIGINT NOT NULL,
    next_attempt_at BIGINT,
    updated_at BIGINT NOT NULL,
    finished_at BIGINT,
    committing BOOLEAN NOT NULL DEFAULT false,
    rounds INTEGER NOT NULL DEFAULT 0,
    relay TEXT,
    accepted TEXT,
    rejected TEXT,
    reason TEXT,
    note TEXT,
    history TEXT NOT NULL DEFAULT '',
    caller TEXT,
    meta TEXT,
    held_hash BYTEA,
    decided_by TEXT,
    relays TEXT,
    batch TEXT,
    sent_copy TEXT,
    node TEXT,
    lease_epoch BIGINT NOT NULL DEFAULT 0,
    lease_until BIGINT
);
CREATE INDEX mailmux_messages_due ON mailmux_messages (next_attempt_at)
    WHERE state IN ('queued', 'scheduled');
CREATE INDEX mailmux_messages_sending ON mailmux_messages (lease_until) WHERE state = 'sending';
CREATE INDEX mailmux_messages_held ON mailmux_messages (next_attempt_at) WHERE state = 'held';
CREATE INDEX mailmux_messages_finished ON mailmux_messages (finished_at)
    WHERE finished_at IS NOT NULL;
CREATE INDEX mailmux_messages_state ON mailmux_messages (state, seq);
CREATE INDEX mailmux_messages_caller ON mailmux_messages (caller, seq);
CREATE INDEX mailmux_messages_batch ON mailmux_messages (batch, seq) WHERE batch IS NOT NULL;
CREATE TABLE mailmux_attempts (
    id BIGSERIAL PRIMARY KEY,
    seq BIGINT NOT NULL,
    at BIGINT NOT NULL,
    relay TEXT NOT NULL,
    class TEXT,
    code INTEGER,
    text TEXT NOT NULL,
    duration_ms BIGINT NOT NULL
);
CREATE INDEX mailmux_attempts_seq ON mailmux_attempts (seq);
CREATE TABLE mailmux_idempotency (
    key TEXT PRIMARY KEY,
    message_id TEXT NOT NULL,
    hash BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX mailmux_idempotency_created ON mailmux_idempotency (created_at);
"#,
    r#"
-- The daemons on this queue, each seen at its last heartbeat: a relay's
-- rate is shared evenly among those seen within one lease.
CREATE TABLE mailmux_nodes (
    node TEXT PRIMARY KEY,
    seen_at BIGINT NOT NULL
);
"#,
    r#"
-- Sent copies recorded as pending (the message keeps its body until the
-- copy's outcome), and the daemon that is to make each: a copy whose daemon
-- stopped is made by the next one to look.
ALTER TABLE mailmux_messages ADD COLUMN copy_node TEXT;
CREATE INDEX mailmux_messages_copy_pending ON mailmux_messages (seq)
    WHERE sent_copy = 'pending';
"#,
    r#"
-- When a daemon last took over a pending copy: another may take it from
-- that daemon only a lease later, whatever its snapshot of the daemons.
ALTER TABLE mailmux_messages ADD COLUMN copy_claimed_at BIGINT;
"#,
    r#"
-- The finished messages (finished_at set) per state, so that the queue's
-- counts do not walk a table of millions. Each daemon adds to rows of its
-- own (`part` 1: its settles writer; 0: every other statement), in the
-- statement that finishes, queues again or purges a message, so that
-- daemons never wait for each other here. The purge folds the rows of
-- daemons that stopped into the row of node ''.
CREATE TABLE mailmux_counts (
    node TEXT NOT NULL,
    part SMALLINT NOT NULL,
    state TEXT NOT NULL,
    n BIGINT NOT NULL,
    PRIMARY KEY (node, part, state)
);
INSERT INTO mailmux_counts (node, part, state, n)
    SELECT '', 0, state, COUNT(*) FROM mailmux_messages
     WHERE finished_at IS NOT NULL GROUP BY state;
"#,
    r#"
-- Each message's delivery attempts in its row, one a line (the format of
-- rows::attempts_text), appended by the settle that already rewrites the
-- row: no insert and index entry per attempt. mailmux_attempts keeps the
-- attempts written before, and those that daemons of version 5 write during
-- a rolling upgrade; a status read shows both.
ALTER TABLE mailmux_messages ADD COLUMN attempt_log TEXT;
"#,
    r#"
-- The oldest queued message and the next retry, for the queue's stats:
-- without these, each read walked every waiting message.
CREATE INDEX mailmux_messages_queued_at ON mailmux_messages (queued_at) WHERE state = 'queued';
CREATE INDEX mailmux_messages_retry ON mailmux_messages (next_attempt_at)
    WHERE state = 'queued' AND rounds > 0;
"#,
    r#"
-- Idempotency keys are each caller's own: the key is kept after its
-- caller's name and U+001F (queue::scoped_key). A key whose message is
-- gone has no known caller and gets the empty name.
UPDATE mailmux_idempotency i SET key = COALESCE(m.caller, '') || chr(31) || i.key
  FROM mailmux_messages m WHERE m.message_id = i.message_id;
UPDATE mailmux_idempotency SET key = chr(31) || key WHERE strpos(key, chr(31)) = 0;
"#,
    r#"
-- The index by state leaves out `sent`, most of the table, which a listing
-- reads in order anyway (rows::listed_by): a delivered message's outcome
-- then adds no entry to it. A listing by state says `state <> 'sent'`,
-- which is how the planner knows the index serves it.
DROP INDEX mailmux_messages_state;
CREATE INDEX mailmux_messages_state ON mailmux_messages (state, seq) WHERE state <> 'sent';
"#,
    r#"
-- The relay whose account files a pending Sent copy: the one that first
-- took the message. A later round (a deferred recipient, through another
-- relay) rewrites `relay`, and a copy taken over after a crash must still
-- go to the first relay's Sent folder, not to another account's. Daemons
-- built for schema 9, still running during an upgrade, leave it empty:
-- their copies go by `relay`, as before.
ALTER TABLE mailmux_messages ADD COLUMN copy_relay TEXT;
"#,
    r#"
-- The suppression list: addresses no daemon accepts mail for, and a
-- version that every change of it moves, which each daemon polls to read
-- the list again after another daemon or the queue command changed it.
CREATE TABLE mailmux_suppressions (
    address TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    detail TEXT,
    message_id TEXT,
    created_at BIGINT NOT NULL
);
CREATE TABLE mailmux_suppression_version (v BIGINT NOT NULL);
INSERT INTO mailmux_suppression_version (v) VALUES (0);
"#,
    r#"
-- How far each mailbox of bounce and complaint reports has been read, and
-- what the reports said of a message's recipients (one a line: time,
-- reason, address, detail).
CREATE TABLE mailmux_report_cursors (
    mailbox TEXT PRIMARY KEY,
    validity BIGINT NOT NULL,
    uid BIGINT NOT NULL
);
ALTER TABLE mailmux_messages ADD COLUMN reports TEXT;
"#,
    r#"
-- The suppression list's changes of its last versions (an address added
-- or removed; no address: a change of the whole list), so that a daemon
-- reads what changed since its copy rather than the whole list.
CREATE TABLE mailmux_suppression_changes (
    id BIGSERIAL PRIMARY KEY,
    version BIGINT NOT NULL,
    address TEXT,
    added BOOLEAN NOT NULL
);
CREATE INDEX mailmux_suppression_changes_version ON mailmux_suppression_changes (version);
"#,
    r#"
-- Delivery paused by an operator, for every daemon: at most one row while
-- paused.
CREATE TABLE mailmux_delivery_pause (
    one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    since BIGINT NOT NULL,
    by_whom TEXT NOT NULL,
    reason TEXT
);
"#,
    r#"
-- The caller's label of a message (`tag`), which a listing filters by.
ALTER TABLE mailmux_messages ADD COLUMN tag TEXT;
CREATE INDEX mailmux_messages_tag ON mailmux_messages (tag, seq) WHERE tag IS NOT NULL;
"#,
    r#"
-- How long a message may wait for delivery once due, in milliseconds, when
-- its call asked for less than its caller's max_age.
ALTER TABLE mailmux_messages ADD COLUMN max_age BIGINT;
"#,
    r#"
-- A message's priority (1: high; null: normal), and the due messages of high
-- priority, which a claim takes before the rest.
ALTER TABLE mailmux_messages ADD COLUMN priority BIGINT;
CREATE INDEX mailmux_messages_due_high ON mailmux_messages (next_attempt_at)
    WHERE state IN ('queued', 'scheduled') AND priority = 1;
"#,
    r#"
-- Callers' rate limits, kept by every daemon together (GCRA): each
-- bucket's theoretical arrival time, in nanoseconds of the database's
-- clock. A bucket whose time has passed is full, as one with no row. No
-- index on `tat`, so that moving it on is a HOT update; the purge reads
-- the table whole.
CREATE TABLE mailmux_rates (
    key TEXT PRIMARY KEY,
    tat BIGINT NOT NULL
);

-- Takes costs[i] from bucket keys[i] for every i, or nothing when one
-- would pass its period: then answers {i - 1, nanoseconds until it would
-- pass} for the first such i, else NULL. Each row is locked in the order
-- of `keys`, which the caller sorts, so two takes never wait on each other
-- in a cycle. Every message of a caller takes the same rows, so the
-- commit does not wait for the log's flush while it holds them: a crash
-- of the database may forget the last takes, giving the caller back that
-- much of its rate.
CREATE FUNCTION mailmux_take_rates(keys TEXT[], costs BIGINT[], periods BIGINT[])
RETURNS BIGINT[] LANGUAGE plpgsql AS $$
DECLARE
    now_ns BIGINT := (extract(epoch FROM clock_timestamp()) * 1000000000)::BIGINT;
    tats BIGINT[] := '{}';
    cur BIGINT;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    FOR i IN 1 .. coalesce(array_length(keys, 1), 0) LOOP
        SELECT tat INTO cur FROM mailmux_rates WHERE key = keys[i] FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO mailmux_rates (key, tat) VALUES (keys[i], now_ns)
                ON CONFLICT (key) DO NOTHING;
            SELECT tat INTO cur FROM mailmux_rates WHERE key = keys[i] FOR UPDATE;
        END IF;
        cur := greatest(cur, now_ns) + costs[i];
        IF cur - now_ns > periods[i] THEN
            RETURN ARRAY[i - 1, cur - now_ns - periods[i]];
        END IF;
        tats := tats || cur;
    END LOOP;
    UPDATE mailmux_rates r SET tat = t.tat
      FROM unnest(keys, tats) AS t(key, tat) WHERE r.key = t.key;
    RETURN NULL;
END
$$;
"#,
    r#"
-- The takes of several messages in one transaction, so that the calls of
-- one daemon that arrive together lock a caller's buckets once. `ukeys` are
-- the distinct buckets, sorted by the caller (the lock order, as above);
-- take i costs costs[i] from bucket ukeys[slots[i]]; message m has the
-- takes after ends[m - 1] up to ends[m], each bucket at most once. In the
-- order given, each message moves all its buckets on, or none when one
-- would pass its period. Answers {m - 1, the refusing take's place in its
-- message from 0, nanoseconds until it would pass} for each refused
-- message, one after the other; empty when none was. mailmux_take_rates
-- stays for the daemons built for schema version 18 until they are upgraded.
CREATE FUNCTION mailmux_take_rate_groups(
    ukeys TEXT[], slots INT[], costs BIGINT[], periods BIGINT[], ends INT[])
RETURNS BIGINT[] LANGUAGE plpgsql AS $$
DECLARE
    now_ns BIGINT;
    tats BIGINT[] := '{}';
    cur BIGINT;
    refused BIGINT[] := '{}';
    first INT := 1;
    fits BOOLEAN;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    FOR k IN 1 .. coalesce(array_length(ukeys, 1), 0) LOOP
        SELECT tat INTO cur FROM mailmux_rates WHERE key = ukeys[k] FOR UPDATE;
        IF NOT FOUND THEN
            -- Full: a time long past.
            INSERT INTO mailmux_rates (key, tat) VALUES (ukeys[k], 0)
                ON CONFLICT (key) DO NOTHING;
            SELECT tat INTO cur FROM mailmux_rates WHERE key = ukeys[k] FOR UPDATE;
        END IF;
        tats := tats || cur;
    END LOOP;
    -- Read once every bucket is locked: not before the takes it waited
    -- for, which moved them on by their own clock readings.
    now_ns := (extract(epoch FROM clock_timestamp()) * 1000000000)::BIGINT;
    FOR m IN 1 .. coalesce(array_length(ends, 1), 0) LOOP
        fits := true;
        FOR i IN first .. ends[m] LOOP
            cur := greatest(tats[slots[i]], now_ns) + costs[i];
            IF cur - now_ns > periods[i] THEN
                refused := refused || ARRAY[m - 1, i - first, cur - now_ns - periods[i]]::BIGINT[];
                fits := false;
                EXIT;
            END IF;
        END LOOP;
        IF fits THEN
            FOR i IN first .. ends[m] LOOP
                tats[slots[i]] := greatest(tats[slots[i]], now_ns) + costs[i];
            END LOOP;
        END IF;
        first := ends[m] + 1;
    END LOOP;
    UPDATE mailmux_rates r SET tat = t.tat
      FROM unnest(ukeys, tats) AS t(key, tat) WHERE r.key = t.key AND r.tat <> t.tat;
    RETURN refused;
END
$$;
"#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The advisory lock key of migrations ("mailmux" in ASCII).
const MIGRATION_LOCK: i64 = 0x006d_6169_6c6d_7578;

/// The database's clock in milliseconds: leases are measured in it, so that
/// daemons whose clocks differ agree on when a lease ends. The statement's
/// start time: stable within a statement, so that an index can bound it.
macro_rules! db_now {
    () => {
        "(extract(epoch from statement_timestamp()) * 1000)::bigint"
    };
}

/// The end of an `INSERT INTO mailmux_counts`: a row that exists is added to.
macro_rules! add_to_counts {
    () => {
        " ON CONFLICT (node, part, state) DO UPDATE SET n = mailmux_counts.n + EXCLUDED.n"
    };
}

/// A CTE (`counted`) that adds the finished rows among `$rows` (a CTE
/// returning `state` and `finished_at`), per state, to the counts of node
/// `$node` and part `$part` (SQL expressions); `$sign` is "" or "-".
macro_rules! count_finished {
    ($rows:literal, $node:literal, $part:literal, $sign:literal) => {
        concat!(
            "counted AS (
                INSERT INTO mailmux_counts (node, part, state, n)
                SELECT ",
            $node,
            ", ",
            $part,
            ", state, ",
            $sign,
            "COUNT(*) FROM ",
            $rows,
            " WHERE finished_at IS NOT NULL GROUP BY state",
            add_to_counts!(),
            ")"
        )
    };
}

/// The crash rule applied to the messages in `sending` that `$cond`
/// selects: with the commit mark, `unknown`; without it, `queued`. The
/// epoch grows, so the old holder's late writes are fenced. `$2` is this
/// daemon's node id, whose counts the messages made `unknown` join.
macro_rules! take_over_sql {
    ($cond:expr) => {
        concat!(
            "WITH t AS (UPDATE mailmux_messages SET
                state = CASE WHEN committing THEN 'unknown' ELSE 'queued' END,
                finished_at = CASE WHEN committing THEN $1 ELSE NULL END,
                next_attempt_at = CASE WHEN committing THEN NULL ELSE $1 END,
                note = CASE WHEN committing
                    THEN 'mailmux stopped after the message was handed to a relay; it may have been delivered and was not sent again'
                    ELSE note END,
                reason = CASE WHEN committing THEN NULL ELSE reason END,
                history = history || CASE WHEN history = '' THEN '' ELSE ';' END
                    || CASE WHEN committing THEN 'unknown@' ELSE 'queued@' END || $1::text,
                committing = false, updated_at = $1, lease_until = NULL,
                lease_epoch = lease_epoch + 1
              WHERE state = 'sending' AND ",
            $cond,
            " RETURNING message_id, state, finished_at), ",
            count_finished!("t", "$2", "0", ""),
            " SELECT message_id, state = 'unknown' FROM t"
        )
    };
}

/// Appends `$n` (a history entry) to the history, in the statement that
/// changes the state.
macro_rules! history {
    ($n:literal) => {
        concat!(
            "history = history || CASE WHEN history = '' THEN '' ELSE ';' END || $",
            $n
        )
    };
}

/// Where the database is and how this daemon takes part.
#[derive(Clone, PartialEq, Eq)]
pub struct PgSettings {
    /// `postgres://user:password@host:port/db?sslmode=...`. A secret.
    pub url: String,
    /// Connections in the pool.
    pub pool: u32,
    /// This daemon's name in leases and listings.
    pub node_id: String,
    /// How long a claim lasts without renewal.
    pub lease: Duration,
}

impl PgSettings {
    /// The URL without its password, for logs and the effective config.
    pub fn shown_url(&self) -> String {
        shown_url(&self.url)
    }
}

impl std::fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSettings")
            .field("url", &self.shown_url())
            .field("pool", &self.pool)
            .field("node_id", &self.node_id)
            .field("lease", &self.lease)
            .finish()
    }
}

/// `url` with any password replaced by `***`: the one before the host, and
/// any parameter whose name holds `password` (`?password=`, `sslpassword=`).
pub fn shown_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".into();
    };
    let (path, query) = match rest.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (rest, None),
    };
    let (auth, host) = match path.rsplit_once('@') {
        Some((auth, host)) => (Some(auth), host),
        None => (None, path),
    };
    let mut shown = match auth {
        Some(auth) => match auth.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => format!("{scheme}://{auth}@{host}"),
        },
        None => format!("{scheme}://{host}"),
    };
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.to_ascii_lowercase().contains("password") => format!("{k}=***"),
                _ => p.to_owned(),
            })
            .collect();
        shown.push('?');
        shown.push_str(&params.join("&"));
    }
    shown
}

/// The PostgreSQL store of one daemon.
#[derive(Debug)]
pub struct PgStore {
    pool: PgPool,
    node: String,
    lease_ms: i64,
    /// Whether a due message this daemon accepts is leased to it at once
    /// (a daemon delivers what it accepts; the queue command does not).
    claims: bool,
    /// The epoch of each lease this daemon holds, by message id.
    leases: Arc<Mutex<HashMap<String, i64>>>,
    /// The daemons seen within one lease, this one included.
    nodes: Arc<std::sync::atomic::AtomicU32>,
    /// The writers that fold the marks, and the settles, of concurrent
    /// rounds into one statement each.
    marks: mpsc::UnboundedSender<MarkOp>,
    settles: mpsc::UnboundedSender<SettleOp>,
    /// The writer that folds concurrent accepts without an idempotency key
    /// into one INSERT.
    accepts: mpsc::UnboundedSender<AcceptOp>,
    /// The taker that folds the rate takes of concurrent calls into one
    /// transaction.
    rates: mpsc::UnboundedSender<RateOp>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// When `due` last looked for leases that ran out (ms).
    taken_over: std::sync::atomic::AtomicI64,
    /// The messages those looks made `unknown`, not yet handed to the
    /// observers ([`Store::taken_over_unknown`]).
    untold: Mutex<Vec<String>>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A commit mark for the marks writer: the answer is whether the lease
/// still held (false: fenced).
#[derive(Debug)]
struct MarkOp {
    id: String,
    epoch: i64,
    reply: oneshot::Sender<Result<bool, StoreError>>,
}

/// A settle for the settles writer.
#[derive(Debug)]
struct SettleOp {
    id: String,
    epoch: i64,
    settle: Settle,
    reply: oneshot::Sender<Result<bool, StoreError>>,
}

/// A message without an idempotency key, for the accepts writer.
#[derive(Debug)]
struct AcceptOp {
    m: NewMessage,
    /// Stored as committing to a relay: the row `accept` and `mark` leave,
    /// without the message's bytes (a settle that keeps them brings them).
    marked: bool,
    reply: oneshot::Sender<Result<State, StoreError>>,
}

/// One message's rate takes, for the rates taker: the answer is `None`
/// when all were taken, else the refusing take and its wait.
#[derive(Debug)]
struct RateOp {
    takes: Vec<RateTake>,
    reply: oneshot::Sender<Result<Option<(usize, Duration)>, StoreError>>,
}

/// The epoch of the lease a daemon takes on a message it stores itself
/// (the `1` of the accepts' INSERT): its own deliveries' writes name it.
const FIRST_EPOCH: i64 = 1;

/// Writes folded into one statement at most.
const WRITE_BATCH: usize = 256;

/// How long a writer waits for more ops when its last statement folded
/// several: a sign that other rounds are running and will write soon.
const GATHER: Duration = Duration::from_millis(1);
/// A writer waits for more ops only while its batches are smaller than
/// this: larger ones already cost PostgreSQL little per message, and
/// waiting to make them larger still only adds latency.
const GATHER_UP_TO: usize = 16;

/// Takes every op waiting (up to [`WRITE_BATCH`]) after the first. When the
/// writer's previous batch held `last` > 1 ops and fewer than twice that
/// (and than [`GATHER_UP_TO`]) are waiting now, it waits up to [`GATHER`]
/// for more, so that a daemon with few calls in flight (one of several on a
/// database) still folds its writes into few statements. One op at a time
/// never waits: a single call pays no delay.
async fn next_batch<T>(rx: &mut mpsc::UnboundedReceiver<T>, last: &mut usize) -> Option<Vec<T>> {
    let first = rx.recv().await?;
    let mut batch = vec![first];
    let drain = |batch: &mut Vec<T>, rx: &mut mpsc::UnboundedReceiver<T>| {
        while batch.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
    };
    drain(&mut batch, rx);
    let want = (*last * 2).min(GATHER_UP_TO);
    if *last > 1 && batch.len() < want {
        let until = tokio::time::Instant::now() + GATHER;
        while batch.len() < want {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(op)) => {
                    batch.push(op);
                    drain(&mut batch, rx);
                }
                _ => break,
            }
        }
    }
    *last = batch.len();
    Some(batch)
}

/// The marks writer: the marks that arrive while one statement runs go
/// together in the next, each fenced by its own epoch.
async fn mark_loop(
    pool: PgPool,
    node: String,
    lease_ms: i64,
    mut rx: mpsc::UnboundedReceiver<MarkOp>,
) {
    let mut last = 0;
    while let Some(batch) = next_batch(&mut rx, &mut last).await {
        let now = now_millis();
        let ids: Vec<&str> = batch.iter().map(|op| op.id.as_str()).collect();
        let epochs: Vec<i64> = batch.iter().map(|op| op.epoch).collect();
        let done: Result<Vec<String>, sqlx::Error> = sqlx::query_scalar(concat!(
            "UPDATE mailmux_messages m SET state = 'sending', committing = true, updated_at = $1,
                    lease_until = ",
            db_now!(),
            " + $2,
                    history = m.history || CASE WHEN m.history = '' THEN '' ELSE ';' END || $3
               FROM unnest($4::text[], $5::bigint[]) AS l(id, epoch)
              WHERE m.message_id = l.id AND m.lease_epoch = l.epoch AND m.node = $6
                AND m.state IN ('queued', 'scheduled', 'sending')
              RETURNING m.message_id"
        ))
        .bind(now)
        .bind(lease_ms)
        .bind(entry(State::Sending, now))
        .bind(&ids)
        .bind(&epochs)
        .bind(&node)
        .fetch_all(&pool)
        .await;
        answer(batch.into_iter().map(|op| (op.id, op.reply)), done);
    }
}

/// The rates taker: the takes of the messages that arrive while one
/// transaction runs go together in the next (`mailmux_take_rate_groups`),
/// each message whole or not at all, in the order they came.
async fn rate_loop(pool: PgPool, mut rx: mpsc::UnboundedReceiver<RateOp>) {
    let mut last = 0;
    while let Some(batch) = next_batch(&mut rx, &mut last).await {
        // The buckets of the whole group in one sorted order, the order
        // every daemon locks them in.
        let mut slots: std::collections::BTreeMap<&str, i32> = std::collections::BTreeMap::new();
        for op in &batch {
            for t in &op.takes {
                slots.insert(t.key.as_str(), 0);
            }
        }
        for (n, slot) in slots.values_mut().enumerate() {
            *slot = i32::try_from(n + 1).unwrap_or(i32::MAX);
        }
        let mut of = Vec::new();
        let (mut costs, mut periods, mut ends) = (Vec::new(), Vec::new(), Vec::new());
        for op in &batch {
            for t in &op.takes {
                of.push(slots[t.key.as_str()]);
                costs.push(t.cost_ns);
                periods.push(t.period_ns);
            }
            ends.push(i32::try_from(of.len()).unwrap_or(i32::MAX));
        }
        let keys: Vec<&str> = slots.into_keys().collect();
        let refused: Result<Option<Vec<i64>>, sqlx::Error> =
            sqlx::query_scalar("SELECT mailmux_take_rate_groups($1, $2, $3, $4, $5)")
                .bind(&keys)
                .bind(&of)
                .bind(&costs)
                .bind(&periods)
                .bind(&ends)
                .fetch_one(&pool)
                .await;
        match refused {
            Ok(refused) => {
                let mut answers: Vec<Option<(usize, Duration)>> = vec![None; batch.len()];
                for r in refused.unwrap_or_default().chunks_exact(3) {
                    if let Some(a) = usize::try_from(r[0]).ok().and_then(|m| answers.get_mut(m)) {
                        let wait = Duration::from_nanos(u64::try_from(r[2]).unwrap_or(0));
                        *a = Some((usize::try_from(r[1]).unwrap_or(0), wait));
                    }
                }
                for (op, a) in batch.into_iter().zip(answers) {
                    let _ = op.reply.send(Ok(a));
                }
            }
            Err(e) => {
                let e = unavailable(e);
                for op in batch {
                    let _ = op.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// A message's takes as handed to the rates taker: the receiver of their
/// answer (`None`: no takes, nothing to wait for).
type RatesSent =
    Result<Option<oneshot::Receiver<Result<Option<(usize, Duration)>, StoreError>>>, StoreError>;

/// The answer of takes handed to the rates taker.
async fn rates_answer(sent: RatesSent) -> Result<Option<(usize, Duration)>, StoreError> {
    match sent? {
        None => Ok(None),
        Some(answer) => answer
            .await
            .map_err(|_| unavailable("the store's rates taker has stopped"))?,
    }
}

/// Answers each op of a batch: whether its row was written.
fn answer(
    ops: impl Iterator<Item = (String, oneshot::Sender<Result<bool, StoreError>>)>,
    done: Result<Vec<String>, sqlx::Error>,
) {
    match done {
        Ok(written) => {
            let written: std::collections::HashSet<String> = written.into_iter().collect();
            for (id, reply) in ops {
                let _ = reply.send(Ok(written.contains(&id)));
            }
        }
        Err(e) => {
            let e = unavailable(e);
            for (_, reply) in ops {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// The accepts writer: messages without a key that arrive while one INSERT
/// runs go together in the next. One statement: all of them or none.
async fn accept_loop(
    pool: PgPool,
    node: Option<String>,
    lease_ms: i64,
    mut rx: mpsc::UnboundedReceiver<AcceptOp>,
) {
    let mut last = 0;
    while let Some(batch) = next_batch(&mut rx, &mut last).await {
        let accepts = Accepts::new(batch);
        let node = node.as_deref();
        match accepts.insert(&pool, INSERT_ACCEPTS, lease_ms, node).await {
            Ok(()) => accepts.answer(Ok(())),
            Err(e) if ambiguous(&e) => {
                // Learning the outcome may take until the database is
                // back: the next writes do not wait for it.
                let (pool, node) = (pool.clone(), node.map(str::to_owned));
                tokio::spawn(async move {
                    let node = node.as_deref();
                    let again = || accepts.insert(&pool, INSERT_ACCEPTS_AGAIN, lease_ms, node);
                    let done = until_known(e, again).await;
                    accepts.answer(done);
                });
            }
            Err(e) => accepts.answer(Err(unavailable(e))),
        }
    }
}

/// One INSERT's worth of the accepts writer: the messages, the state each
/// is stored in, and its history entry.
struct Accepts {
    ops: Vec<AcceptOp>,
    states: Vec<State>,
    entries: Vec<String>,
    now: Millis,
}

impl Accepts {
    fn new(ops: Vec<AcceptOp>) -> Accepts {
        let now = now_millis();
        let states: Vec<State> = ops
            .iter()
            .map(|op| match op.marked {
                true => State::Sending,
                false => op.m.initial_state(now),
            })
            .collect();
        let entries = ops
            .iter()
            .zip(&states)
            .map(|(op, s)| match op.marked {
                true => format!(
                    "{};{}",
                    entry(State::Queued, op.m.queued_at),
                    entry(State::Sending, now)
                ),
                false => entry(*s, now),
            })
            .collect();
        Accepts {
            ops,
            states,
            entries,
            now,
        }
    }

    fn answer(self, done: Result<(), StoreError>) {
        match done {
            Ok(()) => {
                for (op, state) in self.ops.into_iter().zip(self.states) {
                    let _ = op.reply.send(Ok(state));
                }
            }
            Err(e) => {
                for op in self.ops {
                    let _ = op.reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Runs `sql` ([`INSERT_ACCEPTS`] or [`INSERT_ACCEPTS_AGAIN`]).
    async fn insert(
        &self,
        pool: &PgPool,
        sql: &'static str,
        lease_ms: i64,
        node: Option<&str>,
    ) -> Result<(), sqlx::Error> {
        let ms = self.ops.iter().map(|op| &op.m);
        sqlx::query(sql)
            .bind(self.now)
            .bind(lease_ms)
            .bind(
                ms.clone()
                    .map(|m| m.message_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(self.states.iter().map(|s| s.as_str()).collect::<Vec<_>>())
            .bind(ms.clone().map(|m| m.from.as_deref()).collect::<Vec<_>>())
            .bind(ms.clone().map(|m| m.to.join("\n")).collect::<Vec<_>>())
            .bind(ms.clone().map(|m| m.bytes.len() as i64).collect::<Vec<_>>())
            .bind(
                self.ops
                    .iter()
                    .map(|op| (!op.marked).then_some(&op.m.bytes[..]))
                    .collect::<Vec<_>>(),
            )
            .bind(ms.clone().map(|m| m.prefer.as_deref()).collect::<Vec<_>>())
            .bind(ms.clone().map(|m| m.queued_at).collect::<Vec<_>>())
            .bind(ms.clone().map(|m| m.due_at).collect::<Vec<_>>())
            .bind(
                ms.clone()
                    .map(|m| m.hold.as_ref().map_or(m.due_at, |h| h.until))
                    .collect::<Vec<_>>(),
            )
            .bind(&self.entries)
            .bind(ms.clone().map(|m| m.caller.as_deref()).collect::<Vec<_>>())
            .bind(ms.clone().map(|m| m.meta.as_deref()).collect::<Vec<_>>())
            .bind(
                ms.clone()
                    .map(|m| m.hold.as_ref().map(|h| &h.hash[..]))
                    .collect::<Vec<_>>(),
            )
            .bind(
                ms.clone()
                    .map(|m| m.only.as_ref().map(|o| o.join("\n")))
                    .collect::<Vec<_>>(),
            )
            .bind(ms.clone().map(|m| m.batch.as_deref()).collect::<Vec<_>>())
            .bind(
                self.states
                    .iter()
                    .map(|s| node.filter(|_| matches!(s, State::Queued | State::Sending)))
                    .collect::<Vec<_>>(),
            )
            .bind(self.ops.iter().map(|op| op.marked).collect::<Vec<_>>())
            .bind(ms.clone().map(|m| m.tag.as_deref()).collect::<Vec<_>>())
            .bind(ms.clone().map(|m| m.max_age).collect::<Vec<_>>())
            .bind(
                ms.clone()
                    .map(|m| rows::priority_column(m.priority))
                    .collect::<Vec<_>>(),
            )
            .execute(pool)
            .await
            .map(|_| ())
    }
}

macro_rules! insert_accepts {
    () => {
        concat!(
            "INSERT INTO mailmux_messages (message_id, state, mail_from, rcpt, size, body,
                 prefer, queued_at, due_at, next_attempt_at, updated_at, history, caller, meta,
                 held_hash, relays, batch, node, lease_epoch, lease_until, committing, tag,
                 max_age, priority)
             SELECT l.id, l.state, l.mail_from, l.rcpt, l.size, l.body, l.prefer, l.queued_at,
                 l.due_at, l.next_at, $1, l.entry, l.caller, l.meta, l.held_hash, l.relays,
                 l.batch, l.node, CASE WHEN l.node IS NULL THEN 0 ELSE 1 END,
                 CASE WHEN l.node IS NULL THEN NULL ELSE ",
            db_now!(),
            " + $2 END, l.committing, l.tag, l.max_age, l.priority
               FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[],
                           $8::bytea[], $9::text[], $10::bigint[], $11::bigint[], $12::bigint[],
                           $13::text[], $14::text[], $15::text[], $16::bytea[], $17::text[],
                           $18::text[], $19::text[], $20::bool[], $21::text[], $22::bigint[],
                           $23::bigint[])
                 AS l(id, state, mail_from, rcpt, size, body, prefer, queued_at, due_at,
                      next_at, entry, caller, meta, held_hash, relays, batch, node, committing,
                      tag, max_age, priority)"
        )
    };
}
/// The accepts writer's INSERT.
const INSERT_ACCEPTS: &str = insert_accepts!();
/// The same, tried again after an answer that did not come: the rows the
/// first try stored are kept as they are.
const INSERT_ACCEPTS_AGAIN: &str =
    concat!(insert_accepts!(), " ON CONFLICT (message_id) DO NOTHING");

/// Whether a failed statement may have committed all the same: its
/// connection broke after the statement was sent, before the answer came.
/// PostgreSQL's own errors undo the transaction, and a connection never
/// obtained sent nothing.
fn ambiguous(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed
    )
}

/// Runs a write (`again` false) and, when its outcome is not known
/// ([`ambiguous`]), runs it again (`again` true) in its form that keeps
/// what the first try may have stored: see [`until_known`].
async fn confirm<T, F, Fut>(mut write: F) -> Result<T, StoreError>
where
    F: FnMut(bool) -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    match write(false).await {
        Ok(v) => Ok(v),
        Err(e) if ambiguous(&e) => until_known(e, || write(true)).await,
        Err(e) => Err(unavailable(e)),
    }
}

/// Runs `again` (a write whose first try failed with `e`, in the form that
/// keeps what that try may have stored) until an answer is known, for up
/// to [`UNCONFIRMED_BUDGET`]: the first known answer decides. None is
/// [`StoreError::Unconfirmed`].
async fn until_known<T, F, Fut>(e: sqlx::Error, mut again: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    tracing::debug!(error = %e, "the store's answer to a write was lost; trying again");
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(50);
    let mut last = e;
    while started.elapsed() + pause < UNCONFIRMED_BUDGET {
        tokio::time::sleep(pause).await;
        pause *= 2;
        match again().await {
            Ok(v) => return Ok(v),
            Err(e @ sqlx::Error::Database(_)) => return Err(unavailable(e)),
            Err(e) => last = e,
        }
    }
    Err(StoreError::Unconfirmed(last.to_string()))
}

/// How long [`until_known`] tries to learn a write's outcome: long enough
/// for PostgreSQL to restart, so that a send in flight then is stored (or
/// found stored) once it is back, rather than left unconfirmed.
const UNCONFIRMED_BUDGET: Duration = Duration::from_secs(10);

/// The settles writer: the outcomes of concurrent rounds, with their
/// attempts appended to each row, in one statement, each row fenced by its
/// own epoch.
async fn settle_loop(pool: PgPool, node: String, mut rx: mpsc::UnboundedReceiver<SettleOp>) {
    let mut last = 0;
    while let Some(batch) = next_batch(&mut rx, &mut last).await {
        let now = now_millis();
        let mut ids = Vec::with_capacity(batch.len());
        let mut epochs = Vec::with_capacity(batch.len());
        let mut states = Vec::with_capacity(batch.len());
        let mut finished: Vec<Option<i64>> = Vec::with_capacity(batch.len());
        let mut relays: Vec<Option<String>> = Vec::with_capacity(batch.len());
        let mut accepted = Vec::with_capacity(batch.len());
        let mut rejected = Vec::with_capacity(batch.len());
        let mut reasons: Vec<Option<String>> = Vec::with_capacity(batch.len());
        let mut notes: Vec<Option<String>> = Vec::with_capacity(batch.len());
        let mut next: Vec<Option<i64>> = Vec::with_capacity(batch.len());
        let mut keep = Vec::with_capacity(batch.len());
        let mut copy = Vec::with_capacity(batch.len());
        let mut bodies: Vec<Option<&[u8]>> = Vec::with_capacity(batch.len());
        let mut entries = Vec::with_capacity(batch.len());
        let mut attempts: Vec<Option<String>> = Vec::with_capacity(batch.len());
        for op in &batch {
            let s = &op.settle;
            ids.push(op.id.clone());
            epochs.push(op.epoch);
            states.push(s.state.as_str());
            finished.push(s.state.is_final().then_some(now));
            relays.push(s.relay.clone());
            accepted.push(s.accepted.join("\n"));
            rejected.push(rows::rejected_text(&s.rejected));
            reasons.push(s.reason.clone());
            notes.push(s.note.clone());
            next.push(s.next_attempt_at);
            keep.push(s.state.keeps_body() || s.copy);
            copy.push(s.copy);
            bodies.push(s.body.as_deref());
            entries.push(entry(s.state, now));
            attempts.push(rows::attempts_text(&s.attempts));
        }
        let done: Result<Vec<String>, sqlx::Error> = sqlx::query_scalar(concat!(
            "WITH l AS (
                SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[],
                    $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::bigint[],
                    $11::bool[], $12::text[], $15::text[], $16::bool[], $17::bytea[])
                    AS l(id, epoch, state, finished, relay, accepted, rejected, reason, note,
                         next_at, keep, entry, attempts, copy, body)),
             u AS (
                UPDATE mailmux_messages m SET state = l.state, updated_at = $13,
                    finished_at = l.finished, committing = false, rounds = m.rounds + 1,
                    relay = COALESCE(l.relay, m.relay), accepted = l.accepted,
                    rejected = l.rejected, reason = l.reason, note = l.note,
                    next_attempt_at = l.next_at,
                    body = CASE WHEN l.keep OR m.sent_copy = 'pending'
                                THEN COALESCE(m.body, l.body) ELSE NULL END,
                    lease_until = NULL,
                    sent_copy = CASE WHEN l.copy THEN 'pending' ELSE m.sent_copy END,
                    copy_relay = CASE WHEN l.copy THEN l.relay ELSE m.copy_relay END,
                    copy_node = CASE WHEN l.copy THEN $14 ELSE m.copy_node END,
                    history = m.history || CASE WHEN m.history = '' THEN '' ELSE ';' END || l.entry,
                    attempt_log = COALESCE(m.attempt_log || E'\\n' || l.attempts, l.attempts,
                                           m.attempt_log)
                  FROM l
                 WHERE m.message_id = l.id AND m.lease_epoch = l.epoch AND m.node = $14
                   AND m.lease_until IS NOT NULL AND m.finished_at IS NULL
                RETURNING m.message_id, m.state, m.finished_at),
             ",
            count_finished!("u", "$14", "1", ""),
            "
             SELECT message_id FROM u"
        ))
        .bind(&ids)
        .bind(&epochs)
        .bind(&states)
        .bind(&finished)
        .bind(&relays)
        .bind(&accepted)
        .bind(&rejected)
        .bind(&reasons)
        .bind(&notes)
        .bind(&next)
        .bind(&keep)
        .bind(&entries)
        .bind(now)
        .bind(&node)
        .bind(&attempts)
        .bind(&copy)
        .bind(&bodies)
        .fetch_all(&pool)
        .await;
        answer(batch.into_iter().map(|op| (op.id, op.reply)), done);
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn lease_lost(id: &str) -> StoreError {
    StoreError::Fenced(format!(
        "message {id}: this daemon's lease on it ended; another daemon holds it now"
    ))
}

/// Adds `delta` to this daemon's count of finished messages in `state`,
/// in the transaction that finishes (or queues again) one.
async fn add_count(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    node: &str,
    state: State,
    delta: i64,
) -> Result<(), StoreError> {
    sqlx::query(concat!(
        "INSERT INTO mailmux_counts (node, part, state, n) VALUES ($1, 0, $2, $3)",
        add_to_counts!()
    ))
    .bind(node)
    .bind(state.as_str())
    .bind(delta)
    .execute(&mut **tx)
    .await
    .map_err(unavailable)?;
    Ok(())
}

/// The advisory lock key of folding the counts ("mmcounts" in ASCII).
const FOLD_LOCK: i64 = 0x6d6d_636f_756e_7473;

/// Folds the counts of daemons not seen within a lease (stopped, or the
/// queue command's) into node '', so that the counts table stays as small
/// as the set of running daemons. One daemon folds at a time; a daemon
/// seen again starts new rows of its own, so the sums stay exact.
async fn fold_counts(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    node: &str,
    lease_ms: i64,
) -> Result<(), StoreError> {
    let mine: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(FOLD_LOCK)
        .fetch_one(&mut **tx)
        .await
        .map_err(unavailable)?;
    if !mine {
        return Ok(());
    }
    sqlx::query(concat!(
        "WITH f AS (
            DELETE FROM mailmux_counts c
             WHERE c.node <> '' AND c.node <> $1
               AND NOT EXISTS (SELECT 1 FROM mailmux_nodes n
                                WHERE n.node = c.node AND n.seen_at >= ",
        db_now!(),
        " - $2)
            RETURNING state, n)
         INSERT INTO mailmux_counts (node, part, state, n)
         SELECT '', 0, state, SUM(n)::bigint FROM f GROUP BY state",
        add_to_counts!()
    ))
    .bind(node)
    .bind(lease_ms)
    .execute(&mut **tx)
    .await
    .map_err(unavailable)?;
    Ok(())
}

impl PgStore {
    /// Connects, migrates (under the advisory lock) and starts renewing
    /// leases: the store of a daemon.
    pub async fn open(s: &PgSettings) -> Result<PgStore, StoreError> {
        let pool = connect(s).await?;
        migrate(&pool, s, true).await?;
        let lease_ms = s.lease.as_millis() as i64;
        let seen = heartbeat(&pool, &s.node_id, lease_ms)
            .await
            .map_err(unavailable)?;
        Ok(Self::with(pool, s, true, seen))
    }

    /// The store for the queue command and `send --no-wait`: takes no lease
    /// on what it stores and migrates nothing.
    pub async fn open_shared(s: &PgSettings) -> Result<PgStore, StoreError> {
        let pool = connect(s).await?;
        migrate(&pool, s, false).await?;
        Ok(Self::with(pool, s, false, 1))
    }

    /// Hands one message's rate takes to the rates taker.
    fn send_rates(&self, takes: &[RateTake]) -> RatesSent {
        if takes.is_empty() {
            return Ok(None);
        }
        let (reply, answer) = oneshot::channel();
        let op = RateOp {
            takes: takes.to_vec(),
            reply,
        };
        self.rates
            .send(op)
            .map_err(|_| unavailable("the store's rates taker has stopped"))?;
        Ok(Some(answer))
    }

    /// The store over `pool`, with its writers and, for a daemon
    /// (`claims`), its renewer.
    fn with(pool: PgPool, s: &PgSettings, claims: bool, seen: u32) -> PgStore {
        let lease_ms = s.lease.as_millis() as i64;
        let leases = Arc::new(Mutex::new(HashMap::new()));
        let nodes = Arc::new(std::sync::atomic::AtomicU32::new(seen));
        let (marks, marks_rx) = mpsc::unbounded_channel();
        let (settles, settles_rx) = mpsc::unbounded_channel();
        let (accepts, accepts_rx) = mpsc::unbounded_channel();
        let (rates, rates_rx) = mpsc::unbounded_channel();
        let mut tasks = vec![
            tokio::spawn(rate_loop(pool.clone(), rates_rx)),
            tokio::spawn(accept_loop(
                pool.clone(),
                claims.then(|| s.node_id.clone()),
                lease_ms,
                accepts_rx,
            )),
            tokio::spawn(mark_loop(
                pool.clone(),
                s.node_id.clone(),
                lease_ms,
                marks_rx,
            )),
            tokio::spawn(settle_loop(pool.clone(), s.node_id.clone(), settles_rx)),
        ];
        if claims {
            tasks.push(tokio::spawn(renew_loop(
                pool.clone(),
                s.node_id.clone(),
                lease_ms,
                leases.clone(),
                nodes.clone(),
            )));
        }
        PgStore {
            pool,
            node: s.node_id.clone(),
            lease_ms,
            claims,
            leases,
            nodes,
            marks,
            settles,
            accepts,
            rates,
            tasks,
            taken_over: std::sync::atomic::AtomicI64::new(0),
            untold: Mutex::new(Vec::new()),
        }
    }

    /// Applies the migrations this build knows, then counts the finished
    /// messages anew (`mailmux queue migrate`).
    pub async fn migrate_only(s: &PgSettings) -> Result<i64, StoreError> {
        let pool = connect(s).await?;
        let v = migrate(&pool, s, true).await?;
        recount(&pool).await?;
        pool.close().await;
        Ok(v)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The epoch of this daemon's lease on `id`: `None` when it holds none
    /// (never claimed here, or taken over by another daemon). A delivery's
    /// writes need it; nothing claims a lease anew on the way.
    fn fence(&self, id: &str) -> Option<i64> {
        self.held().get(id).copied()
    }

    fn release(&self, id: &str) {
        self.held().remove(id);
    }

    /// The crash rule for messages in `sending` whose lease ran out (or, at
    /// start, that this node id held before a restart).
    async fn take_over(&self, own: bool) -> Result<Recovered, StoreError> {
        let now = now_millis();
        // Two statements, so that the frequent one can use the partial
        // index on `lease_until`.
        let rows: Vec<(String, bool)> = if own {
            sqlx::query_as(take_over_sql!(concat!(
                "(lease_until < ",
                db_now!(),
                " OR node = $2)"
            )))
            .bind(now)
            .bind(&self.node)
            .fetch_all(&self.pool)
            .await
        } else {
            sqlx::query_as(take_over_sql!(concat!("lease_until < ", db_now!())))
                .bind(now)
                .bind(&self.node)
                .fetch_all(&self.pool)
                .await
        }
        .map_err(unavailable)?;
        let mut out = Recovered::default();
        for (id, unknown) in rows {
            tracing::warn!(
                message_id = %id,
                outcome = if unknown { "unknown" } else { "queued again" },
                "took over a message whose daemon's lease ran out"
            );
            if unknown {
                out.unknown.push(id);
            } else {
                out.requeued += 1;
            }
        }
        if !own {
            self.untold
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(out.unknown.iter().cloned());
        }
        Ok(out)
    }
}

/// How long a pooled connection may sit idle before it is pinged when handed
/// out again.
const PING_IDLE: Duration = Duration::from_secs(1);

async fn connect(s: &PgSettings) -> Result<PgPool, StoreError> {
    let failed = |e: sqlx::Error| StoreError::Unavailable(format!("{}: {e}", s.shown_url()));
    let options: sqlx::postgres::PgConnectOptions = s.url.parse().map_err(failed)?;
    // Every statement of the store reaches its rows through an index. A
    // plan that PostgreSQL caches while the table is still small (a new
    // database) would scan the whole table instead, and keep doing so as
    // it grows, until the next ANALYZE: so sequential scans are priced out
    // (they remain where no index applies).
    //
    // Priced out, a scan that remains (of the small tables of the daemons,
    // the schema version and the counts) costs more than `jit_above_cost`,
    // and PostgreSQL would compile every such statement to machine code
    // first: 280 ms for a heartbeat that otherwise takes 3. The store's
    // statements are short; none gains from JIT.
    //
    // Each statement is prepared once per connection and planned once
    // (`force_generic_plan`): PostgreSQL would otherwise plan a batched
    // statement anew at each run whenever a plan for the given array sizes
    // looks cheaper than the generic one, as it does for the small batches
    // of several daemons, and that planning cost more than the statement.
    let options = options.options([
        ("enable_seqscan", "off"),
        ("jit", "off"),
        ("plan_cache_mode", "force_generic_plan"),
    ]);
    // The pool would otherwise ping every idle connection it hands out (one
    // more round trip before every statement): only a connection idle for
    // a while is pinged. One the server closed meanwhile is noticed by
    // sqlx's connection itself and replaced without an error
    // (`postgres_connections_closed_in_the_pool_cost_no_error`).
    PgPoolOptions::new()
        .max_connections(s.pool.max(1))
        .acquire_timeout(Duration::from_secs(2))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IDLE {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_with(options)
        .await
        .map_err(failed)
}

/// Brings the schema to this build's version, or checks it is there.
async fn migrate(pool: &PgPool, s: &PgSettings, apply: bool) -> Result<i64, StoreError> {
    let shown = s.shown_url();
    let named = |e: sqlx::Error| StoreError::Unavailable(format!("{shown}: {e}"));
    let mut tx = pool.begin().await.map_err(named)?;
    // Held until the transaction ends: a second daemon waits here, then
    // finds the schema in place.
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(named)?;
    tx.execute("CREATE TABLE IF NOT EXISTS mailmux_schema (version BIGINT NOT NULL)")
        .await
        .map_err(named)?;
    let found: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM mailmux_schema")
        .fetch_one(&mut *tx)
        .await
        .map_err(named)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: shown,
            found,
            known: SCHEMA_VERSION,
        });
    }
    if found < SCHEMA_VERSION && !apply {
        return Err(StoreError::Unavailable(format!(
            "{shown}: the database has schema version {found} and needs {SCHEMA_VERSION}; run `mailmux queue migrate` or start a daemon"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = i as i64 + 1;
        tx.execute(*sql).await.map_err(|e| {
            StoreError::Unavailable(format!("{shown}: migration to version {version}: {e}"))
        })?;
        sqlx::query("INSERT INTO mailmux_schema (version) VALUES ($1)")
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(named)?;
    }
    tx.commit().await.map_err(named)?;
    // Every version in one transaction: said once, when committed.
    if found == 0 {
        tracing::info!(store = %shown, version = SCHEMA_VERSION, "queue store created");
    } else if found < SCHEMA_VERSION {
        tracing::info!(store = %shown, from = found, version = SCHEMA_VERSION, "queue store migrated");
    }
    Ok(SCHEMA_VERSION)
}

/// Counts the finished messages per state from the table: after a rolling
/// upgrade, the messages that a daemon of an older version finished after
/// the migration are counted too. The lock holds back every statement that
/// writes the counts (they wait, for the time of one count of the table)
/// and waits for those running, so the new counts are exact.
async fn recount(pool: &PgPool) -> Result<(), StoreError> {
    let mut tx = pool.begin().await.map_err(unavailable)?;
    for sql in [
        "LOCK TABLE mailmux_counts IN SHARE ROW EXCLUSIVE MODE",
        "DELETE FROM mailmux_counts",
        "INSERT INTO mailmux_counts (node, part, state, n)
         SELECT '', 0, state, COUNT(*) FROM mailmux_messages
          WHERE finished_at IS NOT NULL GROUP BY state",
    ] {
        sqlx::query(sql)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
    }
    tx.commit().await.map_err(unavailable)
}

/// Records this daemon as alive now; returns how many daemons were seen
/// within one lease (this one included). Daemons gone for a day are
/// forgotten.
async fn heartbeat(pool: &PgPool, node: &str, lease_ms: i64) -> Result<u32, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(concat!(
        "WITH beat AS (
            INSERT INTO mailmux_nodes (node, seen_at) VALUES ($1, ",
        db_now!(),
        ")
            ON CONFLICT (node) DO UPDATE SET seen_at = EXCLUDED.seen_at),
         gone AS (
            DELETE FROM mailmux_nodes WHERE seen_at < ",
        db_now!(),
        " - 86400000)
         SELECT COUNT(*) + 1 FROM mailmux_nodes WHERE node <> $1 AND seen_at >= ",
        db_now!(),
        " - $2"
    ))
    .bind(node)
    .bind(lease_ms)
    .fetch_one(pool)
    .await?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX).max(1))
}

/// Every third of a lease: the heartbeat (and the count of daemons), then
/// the renewal of this daemon's leases, forgetting those it no longer holds
/// (finished, cancelled, or taken over).
async fn renew_loop(
    pool: PgPool,
    node: String,
    lease_ms: i64,
    leases: Arc<Mutex<HashMap<String, i64>>>,
    nodes: Arc<std::sync::atomic::AtomicU32>,
) {
    let every = Duration::from_millis((lease_ms / 3).max(100) as u64);
    // After a failure, soon again: the leases must be renewed as soon as
    // the database is back, before they run out.
    let soon = Duration::from_millis(250).min(every);
    let mut failing = false;
    let mut wait = every;
    loop {
        tokio::time::sleep(wait).await;
        let renewed = renew(&pool, &node, lease_ms, &leases).await;
        match &renewed {
            Ok(()) if failing => {
                tracing::info!("renewing queue leases works again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                tracing::error!(error = %e, "cannot renew queue leases; other daemons take these messages over when the leases run out");
                failing = true;
            }
            Err(_) => {}
        }
        wait = if renewed.is_ok() { every } else { soon };
        if renewed.is_err() {
            continue;
        }
        match heartbeat(&pool, &node, lease_ms).await {
            Ok(n) => {
                let before = nodes.swap(n, std::sync::atomic::Ordering::AcqRel);
                if before != n {
                    tracing::info!(
                        daemons = n,
                        "daemons on the shared queue changed; relay rates are shared among them"
                    );
                }
            }
            Err(e) => tracing::debug!(error = %e, "queue heartbeat failed"),
        }
    }
}

/// Renews every lease this daemon holds; forgets those it no longer holds.
async fn renew(
    pool: &PgPool,
    node: &str,
    lease_ms: i64,
    leases: &Mutex<HashMap<String, i64>>,
) -> Result<(), sqlx::Error> {
    let (ids, epochs): (Vec<String>, Vec<i64>) = leases
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .unzip();
    if ids.is_empty() {
        return Ok(());
    }
    let kept: Vec<String> = sqlx::query_scalar(concat!(
        "UPDATE mailmux_messages m SET lease_until = ",
        db_now!(),
        " + $4
           FROM unnest($1::text[], $2::bigint[]) AS l(id, epoch)
          WHERE m.message_id = l.id AND m.lease_epoch = l.epoch AND m.node = $3
            AND m.state IN ('queued', 'scheduled', 'sending')
          RETURNING m.message_id"
    ))
    .bind(&ids)
    .bind(&epochs)
    .bind(node)
    .bind(lease_ms)
    .fetch_all(pool)
    .await?;
    let kept: std::collections::HashSet<String> = kept.into_iter().collect();
    let mut held = leases.lock().unwrap_or_else(|e| e.into_inner());
    for (id, epoch) in ids.iter().zip(&epochs) {
        if !kept.contains(id) && held.get(id) == Some(epoch) {
            held.remove(id);
        }
    }
    Ok(())
}

/// Stores one message inside `tx`; `node` leases it to this daemon.
async fn accept_in(
    tx: &mut sqlx::PgConnection,
    m: &NewMessage,
    now: Millis,
    node: Option<&str>,
    lease_ms: i64,
    again: bool,
) -> Result<Accepted, sqlx::Error> {
    let state = m.initial_state(now);
    if let Some((key, hash)) = m.scoped_key() {
        let inserted = sqlx::query(
            "INSERT INTO mailmux_idempotency (key, message_id, hash, created_at)
             VALUES ($1, $2, $3, $4) ON CONFLICT (key) DO NOTHING",
        )
        .bind(&key)
        .bind(&m.message_id)
        .bind(&hash[..])
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            let (id, seen): (String, Vec<u8>) =
                sqlx::query_as("SELECT message_id, hash FROM mailmux_idempotency WHERE key = $1")
                    .bind(&key)
                    .fetch_one(&mut *tx)
                    .await?;
            return Ok(if seen == hash[..] && id == m.message_id {
                // This message's own key: a first try committed (`again`).
                Accepted::Stored(state)
            } else if seen == hash[..] {
                Accepted::Replay(id)
            } else {
                Accepted::Conflict(id)
            });
        }
    }
    let next = m.hold.as_ref().map_or(m.due_at, |h| h.until);
    let node = node.filter(|_| state == State::Queued);
    macro_rules! insert {
        () => {
            concat!(
                "INSERT INTO mailmux_messages (message_id, state, mail_from, rcpt, size, body,
                     prefer, idem_key, queued_at, due_at, next_attempt_at, updated_at, history,
                     caller, meta, held_hash, relays, batch, node, lease_epoch, lease_until, tag,
                     max_age, priority)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $9, $12, $13, $14, $15,
                     $16, $17, $18, CASE WHEN $18::text IS NULL THEN 0 ELSE 1 END,
                     CASE WHEN $18::text IS NULL THEN NULL ELSE ",
                db_now!(),
                " + $19 END, $20, $21, $22)"
            )
        };
    }
    let sql = match again {
        false => insert!(),
        // A first try that committed stored this very row.
        true => concat!(insert!(), " ON CONFLICT (message_id) DO NOTHING"),
    };
    sqlx::query(sql)
        .bind(&m.message_id)
        .bind(state.as_str())
        .bind(&m.from)
        .bind(m.to.join("\n"))
        .bind(m.bytes.len() as i64)
        .bind(&m.bytes[..])
        .bind(&m.prefer)
        .bind(m.idempotency.as_ref().map(|(k, _)| k))
        .bind(m.queued_at)
        .bind(m.due_at)
        .bind(next)
        .bind(entry(state, now))
        .bind(&m.caller)
        .bind(&m.meta)
        .bind(m.hold.as_ref().map(|h| &h.hash[..]))
        .bind(m.only.as_ref().map(|o| o.join("\n")))
        .bind(&m.batch)
        .bind(node)
        .bind(lease_ms)
        .bind(&m.tag)
        .bind(m.max_age)
        .bind(rows::priority_column(m.priority))
        .execute(&mut *tx)
        .await?;
    Ok(Accepted::Stored(state))
}

impl PgStore {
    /// The lease node for a message accepted now, when this daemon claims.
    fn claimer(&self) -> Option<&str> {
        self.claims.then_some(self.node.as_str())
    }

    async fn settle_once(&self, message_id: &str, s: &Settle) -> Result<(), StoreError> {
        let Some(epoch) = self.fence(message_id) else {
            return Err(lease_lost(message_id));
        };
        let (reply, answer) = oneshot::channel();
        let op = SettleOp {
            id: message_id.to_owned(),
            epoch,
            settle: s.clone(),
            reply,
        };
        self.settles
            .send(op)
            .map_err(|_| unavailable("the store's writer has stopped"))?;
        let written = answer
            .await
            .map_err(|_| unavailable("the store's writer has stopped"))??;
        self.release(message_id);
        if !written {
            return Err(lease_lost(message_id));
        }
        Ok(())
    }

    /// Whether the message holds the outcome `state` written under this
    /// daemon's lease of `epoch`: a settle that committed although its
    /// answer was lost.
    async fn settled_here(&self, id: &str, epoch: i64, state: State) -> Result<bool, StoreError> {
        let row: Option<bool> = sqlx::query_scalar(
            "SELECT state = $2 AND node = $3 AND lease_epoch = $4 AND lease_until IS NULL
               FROM mailmux_messages WHERE message_id = $1",
        )
        .bind(id)
        .bind(state.as_str())
        .bind(&self.node)
        .bind(epoch)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(row == Some(true))
    }

    /// Remembers the leases of messages just stored as `queued`.
    fn note_claims(&self, ms: &[NewMessage], out: &[Accepted], now: Millis) {
        if !self.claims {
            return;
        }
        let mut held = self.held();
        for (m, a) in ms.iter().zip(out) {
            if *a == Accepted::Stored(State::Queued) && m.initial_state(now) == State::Queued {
                held.insert(m.message_id.clone(), FIRST_EPOCH);
            }
        }
    }
}

/// An entry of the suppression list as read: address, reason, detail,
/// message_id, created_at.
type SuppressionRow = (String, String, Option<String>, Option<String>, i64);

fn suppression_of((address, reason, detail, message_id, at): SuppressionRow) -> Suppression {
    Suppression {
        address,
        reason,
        detail,
        message_id,
        at,
    }
}

/// One page of the suppression list ([`Store::suppression_page`]): the
/// entries after `$1` by address, holding `$2` when it is not NULL, at
/// most `$3` (NULL: all). Public for the test of its plan.
pub const SUPPRESSION_PAGE_SQL: &str =
    "SELECT address, reason, detail, message_id, created_at FROM mailmux_suppressions
      WHERE address > $1 AND ($2::text IS NULL OR strpos(address, $2) > 0)
      ORDER BY address LIMIT $3";

#[async_trait::async_trait]
impl Store for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn durable(&self) -> bool {
        true
    }

    fn node(&self) -> Option<&str> {
        Some(&self.node)
    }

    fn nodes(&self) -> Option<u32> {
        Some(self.nodes.load(std::sync::atomic::Ordering::Acquire))
    }

    fn taken_over_unknown(&self) -> Vec<String> {
        std::mem::take(&mut *self.untold.lock().unwrap_or_else(|e| e.into_inner()))
    }

    async fn accept(&self, m: NewMessage) -> Result<Accepted, StoreError> {
        let now = now_millis();
        let out = if m.idempotency.is_some() {
            let m = &m;
            confirm(|again| async move {
                let mut tx = self.pool.begin().await?;
                let out = accept_in(&mut tx, m, now, self.claimer(), self.lease_ms, again).await?;
                tx.commit().await?;
                Ok(out)
            })
            .await?
        } else {
            let (reply, answer) = oneshot::channel();
            self.accepts
                .send(AcceptOp {
                    m: m.clone(),
                    marked: false,
                    reply,
                })
                .map_err(|_| unavailable("the store's writer has stopped"))?;
            Accepted::Stored(
                answer
                    .await
                    .map_err(|_| unavailable("the store's writer has stopped"))??,
            )
        };
        self.note_claims(std::slice::from_ref(&m), std::slice::from_ref(&out), now);
        Ok(out)
    }

    /// One row through the accepts writer, leased to this daemon and
    /// marked: no mark statement follows. The bytes are left out: a marked
    /// message is never sent again from the store, and the round's settle
    /// writes them only when its outcome keeps them ([`Settle::body`]).
    async fn accept_marked(&self, m: NewMessage) -> Result<(), StoreError> {
        if m.idempotency.is_some() || !self.claims {
            return super::accept_then_mark(self, m).await;
        }
        let id = m.message_id.clone();
        let (reply, answer) = oneshot::channel();
        self.accepts
            .send(AcceptOp {
                m,
                marked: true,
                reply,
            })
            .map_err(|_| unavailable("the store's writer has stopped"))?;
        answer
            .await
            .map_err(|_| unavailable("the store's writer has stopped"))??;
        self.held().insert(id, FIRST_EPOCH);
        Ok(())
    }

    async fn accept_settled_unconfirmed(
        &self,
        m: NewMessage,
        mut s: Settle,
    ) -> Result<(), StoreError> {
        let id = m.message_id.clone();
        // Kept by the settle only where its outcome keeps them.
        s.body = Some(m.bytes.clone());
        // The lease that `accept_marked` takes with the row it stores
        // ([`FIRST_EPOCH`]). The settle is fenced by it: a row another
        // daemon took over in the meantime (as `unknown`) is left as it is.
        self.held().insert(id.clone(), FIRST_EPOCH);
        match self.settle(&id, s.clone()).await {
            // No row under that lease: the mark stored nothing, or another
            // daemon took its row over. Stored in a transaction of its own,
            // not the accepts writer's: a row taken over refuses it, and
            // must not refuse the other messages of a shared INSERT.
            Err(StoreError::Fenced(_)) => {
                self.accept_many(vec![m], false).await?;
                self.settle(&id, s).await
            }
            done => done,
        }
    }

    async fn accept_many(
        &self,
        ms: Vec<NewMessage>,
        atomic: bool,
    ) -> Result<Vec<Accepted>, StoreError> {
        let now = now_millis();
        let ms = &ms;
        let out = confirm(|again| async move {
            let mut tx = self.pool.begin().await?;
            let mut out = Vec::with_capacity(ms.len());
            for m in ms {
                out.push(accept_in(&mut tx, m, now, self.claimer(), self.lease_ms, again).await?);
            }
            if atomic {
                let (answers, store) = super::atomic_answers(out);
                if !store {
                    tx.rollback().await?;
                    return Ok(answers);
                }
                out = answers;
            }
            tx.commit().await?;
            Ok(out)
        })
        .await?;
        self.note_claims(ms, &out, now);
        Ok(out)
    }

    async fn accept_stream(
        &self,
        mut feed: mpsc::Receiver<Feed>,
        atomic: bool,
    ) -> Result<Vec<Accepted>, StoreError> {
        // One connection holds the transaction while the caller composes.
        // Not tried again on a lost connection, as `accept_many` is: the
        // messages fed are gone. A commit whose answer was lost is
        // unconfirmed.
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let mut out = Vec::new();
        loop {
            match feed.recv().await {
                // Stored as of when it came: it may have been composed
                // after the transaction began.
                Some(Feed::Message(m)) => out.push(
                    accept_in(&mut tx, &m, now_millis(), None, self.lease_ms, false)
                        .await
                        .map_err(unavailable)?,
                ),
                Some(Feed::Commit) => break,
                // Dropping the transaction rolls it back.
                None => return Err(abandoned()),
            }
        }
        if atomic {
            let (answers, store) = super::atomic_answers(out);
            if !store {
                tx.rollback().await.map_err(unavailable)?;
                return Ok(answers);
            }
            out = answers;
        }
        match tx.commit().await {
            Ok(()) => Ok(out),
            Err(e) if ambiguous(&e) => Err(StoreError::Unconfirmed(e.to_string())),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn mark(&self, message_id: &str) -> Result<(), StoreError> {
        let Some(epoch) = self.fence(message_id) else {
            return Err(lease_lost(message_id));
        };
        let (reply, answer) = oneshot::channel();
        let op = MarkOp {
            id: message_id.to_owned(),
            epoch,
            reply,
        };
        self.marks
            .send(op)
            .map_err(|_| unavailable("the store's writer has stopped"))?;
        let written = answer
            .await
            .map_err(|_| unavailable("the store's writer has stopped"))??;
        if !written {
            self.release(message_id);
            return Err(lease_lost(message_id));
        }
        Ok(())
    }

    /// Records the outcome. While the database is unreachable the write is
    /// tried again, for up to three leases (the renewal keeps the lease
    /// while the database answers): the outcome is written once the
    /// database is back. Past that, the lease is let go, and the crash rule
    /// decides (a message past its commit mark becomes `unknown`). A lease
    /// taken over meanwhile fences the write, whenever it comes.
    ///
    /// A failed try may have committed all the same (the connection broke
    /// after the statement, before its answer). The settle changes only a
    /// message whose lease is live, and it ends the lease, so a second try
    /// of a committed settle is fenced; the fence is then checked against
    /// the row, and a row that holds this outcome under this daemon's lease
    /// is the first try's, not another daemon's.
    async fn settle(&self, message_id: &str, s: Settle) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let budget = Duration::from_millis(3 * self.lease_ms as u64);
        let mut pause = Duration::from_millis(100);
        let epoch = self.fence(message_id);
        // A try failed: the next one may find the first's outcome in place.
        let mut failed_before = false;
        loop {
            match self.settle_once(message_id, &s).await {
                Err(StoreError::Unavailable(e)) if started.elapsed() + pause < budget => {
                    tracing::debug!(message_id, error = %e, "recording an outcome failed; trying again");
                    failed_before = true;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(StoreError::Fenced(e)) if failed_before => {
                    self.release(message_id);
                    let Some(epoch) = epoch else {
                        return Err(StoreError::Fenced(e));
                    };
                    return match self.settled_here(message_id, epoch, s.state).await {
                        Ok(true) => Ok(()),
                        Ok(false) => Err(StoreError::Fenced(e)),
                        Err(e) => Err(e),
                    };
                }
                Err(e) => {
                    self.release(message_id);
                    return Err(e);
                }
                Ok(()) => return Ok(()),
            }
        }
    }
    async fn cancel(&self, message_id: &str) -> Result<Cancel, StoreError> {
        let now = now_millis();
        // Refused while another daemon's live lease holds it: that daemon
        // may be about to hand it to a relay. A lease of this node id may
        // be a running daemon's when this is the queue command run with its
        // configuration: the epoch grows, so that daemon's round can no
        // longer mark or settle it.
        let row: Option<(String, bool)> = sqlx::query_as(concat!(
            "WITH cur AS (
                SELECT seq, state, (lease_until IS NULL OR lease_until < ",
            db_now!(),
            " OR node = $3) AS free
                  FROM mailmux_messages WHERE message_id = $1 FOR UPDATE),
             u AS (
                UPDATE mailmux_messages m SET state = 'cancelled', updated_at = $2,
                    finished_at = $2, next_attempt_at = NULL, lease_until = NULL,
                    body = CASE WHEN m.sent_copy = 'pending' THEN m.body END,
                    lease_epoch = m.lease_epoch + 1, ",
            history!("4"),
            " FROM cur WHERE m.seq = cur.seq AND cur.free
                    AND cur.state IN ('queued', 'scheduled', 'held')
                RETURNING m.seq, m.state, m.finished_at),
             ",
            count_finished!("u", "$3", "0", ""),
            "
             SELECT cur.state, EXISTS (SELECT 1 FROM u) FROM cur"
        ))
        .bind(message_id)
        .bind(now)
        .bind(&self.node)
        .bind(entry(State::Cancelled, now))
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(match row {
            None => Cancel::NotFound,
            Some((_, true)) => {
                self.release(message_id);
                Cancel::Cancelled
            }
            // Waiting, but another daemon's lease holds it.
            Some((state, false)) => match rows::state(&state) {
                State::Queued | State::Scheduled | State::Held => Cancel::Refused(State::Sending),
                other => Cancel::Refused(other),
            },
        })
    }

    async fn decide(&self, message_id: &str, d: Decision) -> Result<Decided, StoreError> {
        let now = now_millis();
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let row: Option<(i64, String, Option<Vec<u8>>, Millis)> = sqlx::query_as(
            "SELECT seq, state, held_hash, due_at FROM mailmux_messages
              WHERE message_id = $1 FOR UPDATE",
        )
        .bind(message_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?;
        let Some((seq, state, held_hash, due_at)) = row else {
            return Ok(Decided::NotFound);
        };
        let next = match rows::decision(rows::state(&state), held_hash.as_deref(), &d, due_at, now)
        {
            Ok(next) => next,
            Err(answer) => return Ok(answer),
        };
        let finished = (next == State::Rejected).then_some(now);
        sqlx::query(concat!(
            "UPDATE mailmux_messages SET state = $2, updated_at = $3, finished_at = $4,
                    decided_by = $5,
                    next_attempt_at = CASE WHEN $6 THEN GREATEST(due_at, $3) ELSE NULL END,
                    body = CASE WHEN $6 THEN body ELSE NULL END,
                    reason = CASE WHEN $6 THEN NULL ELSE 'rejected_by_approver' END, ",
            history!("7"),
            " WHERE seq = $1"
        ))
        .bind(seq)
        .bind(next.as_str())
        .bind(now)
        .bind(finished)
        .bind(&d.by)
        .bind(d.approve)
        .bind(entry(next, now))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        if finished.is_some() {
            add_count(&mut tx, &self.node, next, 1).await?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(rows::decided(next))
    }

    async fn expire_held(&self, now: Millis) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(concat!(
            "WITH e AS (
                UPDATE mailmux_messages SET state = 'expired', updated_at = $1, finished_at = $1,
                    body = NULL, next_attempt_at = NULL, reason = 'approval_expired',
                    note = 'nobody approved it before its approval deadline', ",
            history!("2"),
            " WHERE state = 'held' AND next_attempt_at <= $1
                RETURNING message_id, state, finished_at),
             ",
            count_finished!("e", "$3", "0", ""),
            "
             SELECT message_id FROM e"
        ))
        .bind(now)
        .bind(entry(State::Expired, now))
        .bind(&self.node)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)
    }

    async fn retry(&self, message_id: &str, force: bool) -> Result<Retry, StoreError> {
        let now = now_millis();
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let row: Option<(i64, String, Option<String>, bool, bool)> = sqlx::query_as(
            "SELECT seq, state, reason, body IS NOT NULL, finished_at IS NOT NULL
               FROM mailmux_messages WHERE message_id = $1 FOR UPDATE",
        )
        .bind(message_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?;
        let Some((seq, state, reason, has_body, finished)) = row else {
            return Ok(Retry::NotFound);
        };
        let state = rows::state(&state);
        let verdict = super::retryable(state, reason.as_deref(), force);
        if verdict != Retry::Queued {
            return Ok(verdict);
        }
        if !has_body {
            return Ok(Retry::Refused(state));
        }
        sqlx::query(concat!(
            "UPDATE mailmux_messages SET state = 'queued', updated_at = $2, finished_at = NULL,
                    due_at = $2, next_attempt_at = $2, committing = false, rounds = 0,
                    reason = NULL, note = NULL, ",
            history!("3"),
            " WHERE seq = $1"
        ))
        .bind(seq)
        .bind(now)
        .bind(entry(State::Queued, now))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        if finished {
            add_count(&mut tx, &self.node, state, -1).await?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(Retry::Queued)
    }

    /// Claims up to `limit` due messages for this daemon: those nobody
    /// holds, whose lease ran out, or that this daemon already holds.
    async fn due(&self, now: Millis, limit: usize) -> Result<Vec<String>, StoreError> {
        // Leases run out on the scale of seconds: look for them once a second.
        let last = self.taken_over.load(std::sync::atomic::Ordering::Acquire);
        if self.claims && now - last >= 1000 {
            self.taken_over
                .store(now, std::sync::atomic::Ordering::Release);
            self.take_over(false).await?;
        }
        // The due messages of high priority first (their own index, empty
        // but while some wait), then the rest, in one statement.
        let mut rows: Vec<(String, i64, Option<i64>)> = sqlx::query_as(concat!(
            "WITH h AS (
                SELECT seq, next_attempt_at FROM mailmux_messages
                 WHERE state IN ('queued', 'scheduled') AND priority = 1
                   AND next_attempt_at <= $1
                   AND (lease_until IS NULL OR lease_until < ",
            db_now!(),
            " OR node = $3)
                 ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED),
             n AS (
                SELECT seq, next_attempt_at FROM mailmux_messages
                 WHERE state IN ('queued', 'scheduled') AND next_attempt_at <= $1
                   AND (lease_until IS NULL OR lease_until < ",
            db_now!(),
            " OR node = $3)
                 ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED),
             c AS (
                SELECT seq FROM (
                    SELECT seq, 0 AS k, next_attempt_at FROM h
                    UNION ALL
                    SELECT seq, 1 AS k, next_attempt_at FROM n
                     WHERE seq NOT IN (SELECT seq FROM h)) u
                 ORDER BY k, next_attempt_at LIMIT $2)
             UPDATE mailmux_messages m SET
                lease_epoch = CASE WHEN m.node = $3 AND m.lease_until >= ",
            db_now!(),
            " THEN m.lease_epoch ELSE m.lease_epoch + 1 END,
                node = $3, lease_until = ",
            db_now!(),
            " + $4
               FROM c WHERE m.seq = c.seq
             RETURNING m.message_id, m.lease_epoch, m.priority"
        ))
        .bind(now)
        .bind(limit as i64)
        .bind(&self.node)
        .bind(self.lease_ms)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        // RETURNING keeps no order: the high ones go first.
        rows.sort_by_key(|(_, _, priority)| !rows::priority(*priority).is_high());
        let mut held = self.held();
        Ok(rows
            .into_iter()
            .map(|(id, epoch, _)| {
                held.insert(id.clone(), epoch);
                id
            })
            .collect())
    }

    async fn let_go(&self, ids: &[String]) -> Result<(), StoreError> {
        let (ids, epochs): (Vec<String>, Vec<i64>) = {
            let mut held = self.held();
            ids.iter()
                .filter_map(|id| Some((id.clone(), held.remove(id)?)))
                .unzip()
        };
        if ids.is_empty() {
            return Ok(());
        }
        // Fenced as a renewal is: a lease another daemon took is not ours.
        sqlx::query(
            "UPDATE mailmux_messages m SET lease_until = NULL
               FROM unnest($1::text[], $2::bigint[]) AS l(id, epoch)
              WHERE m.message_id = l.id AND m.lease_epoch = l.epoch AND m.node = $3
                AND m.state IN ('queued', 'scheduled')",
        )
        .bind(&ids)
        .bind(&epochs)
        .bind(&self.node)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn next_due(&self) -> Result<Option<Millis>, StoreError> {
        sqlx::query_scalar(
            "SELECT MIN(next_attempt_at) FROM mailmux_messages
              WHERE state IN ('queued', 'scheduled')",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(unavailable)
    }

    async fn load(&self, message_id: &str) -> Result<Option<Pending>, StoreError> {
        let row = sqlx::query(
            "SELECT message_id, state, mail_from, rcpt, body, prefer, due_at, rounds, caller,
                    meta, relays, accepted, rejected, sent_copy IS NOT NULL AS copied, max_age,
                    priority
               FROM mailmux_messages WHERE message_id = $1 AND body IS NOT NULL",
        )
        .bind(message_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        row.map(|r| pending(&r)).transpose().map_err(unavailable)
    }

    async fn load_many(&self, ids: &[String], max_bytes: u64) -> Result<Vec<Pending>, StoreError> {
        // The sizes are summed in the order of `ids` without reading a
        // body; only the rows within `max_bytes` are read whole.
        sqlx::query(
            "SELECT message_id, state, mail_from, rcpt, body, prefer, due_at, rounds, caller,
                    meta, relays, accepted, rejected, sent_copy IS NOT NULL AS copied, max_age,
                    priority
               FROM mailmux_messages
              WHERE seq IN (
                    SELECT seq FROM (
                        SELECT seq, SUM(size) OVER (ORDER BY array_position($1, message_id))
                                    - size AS before
                          FROM mailmux_messages
                         WHERE message_id = ANY($1) AND body IS NOT NULL) w
                     WHERE before < $2)",
        )
        .bind(ids)
        .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?
        .iter()
        .map(pending)
        .collect::<Result<_, _>>()
        .map_err(unavailable)
    }

    fn others_write(&self) -> bool {
        true
    }

    async fn prints(&self, ids: &[String]) -> Result<Vec<(String, Print)>, StoreError> {
        sqlx::query_as::<_, (String, String, i64)>(
            "SELECT message_id, state, COALESCE(length(reports), 0)::bigint
               FROM mailmux_messages WHERE message_id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)
        .map(|rows| {
            rows.into_iter()
                .map(|(id, state, n)| (id, (rows::state(&state), n as u64)))
                .collect()
        })
    }

    async fn get(&self, message_id: &str) -> Result<Option<Record>, StoreError> {
        let Some(r) = sqlx::query(
            "SELECT seq, message_id, state, mail_from, rcpt, size, prefer, idem_key, queued_at,
                    due_at, updated_at, next_attempt_at, relay, accepted, rejected, reason, note,
                    caller, meta, decided_by, sent_copy, history, node, attempt_log, batch,
                    tag, max_age, priority, reports, EXISTS (SELECT 1 FROM mailmux_attempts a WHERE a.seq = m.seq) AS in_table
               FROM mailmux_messages m WHERE message_id = $1",
        )
        .bind(message_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?
        else {
            return Ok(None);
        };
        let mut record = record(&r).map_err(unavailable)?;
        record.attempts = rows::attempts(r.try_get("attempt_log").map_err(unavailable)?);
        if r.try_get("in_table").map_err(unavailable)? {
            // Attempts from before schema version 6, or from a daemon of
            // version 5 in a rolling upgrade: merged in time order.
            let seq: i64 = r.try_get("seq").map_err(unavailable)?;
            let older = sqlx::query(
                "SELECT at, relay, class, code, text, duration_ms FROM mailmux_attempts
                  WHERE seq = $1 ORDER BY id",
            )
            .bind(seq)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?
            .iter()
            .map(|a| {
                Ok(AttemptRecord {
                    at: a.try_get("at")?,
                    relay: a.try_get("relay")?,
                    class: a.try_get("class")?,
                    code: a
                        .try_get::<Option<i32>, _>("code")?
                        .and_then(|c| u16::try_from(c).ok()),
                    text: a.try_get("text")?,
                    duration_ms: a.try_get::<i64, _>("duration_ms")?.max(0) as u64,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(unavailable)?;
            record.attempts.splice(0..0, older);
            record.attempts.sort_by_key(|a| a.at);
        }
        Ok(Some(record))
    }

    async fn find_key(
        &self,
        caller: Option<&str>,
        key: &str,
    ) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT message_id FROM mailmux_idempotency WHERE key = $1")
            .bind(super::scoped_key(caller, key))
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)
    }

    async fn list(
        &self,
        filter: &Filter,
        limit: usize,
        cursor: Option<i64>,
    ) -> Result<(Vec<Summary>, Option<i64>), StoreError> {
        let sql = rows::list_sql('$', filter);
        let before = cursor.unwrap_or(i64::MAX);
        let rows = filtered(sql, filter, before, rows::page_rows(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        let more = rows.len() > limit;
        let mut page = Vec::with_capacity(rows.len().min(limit));
        let mut last = None;
        for r in rows.iter().take(limit) {
            last = Some(r.try_get::<i64, _>("seq").map_err(unavailable)?);
            page.push(summary(r).map_err(unavailable)?);
        }
        let searched = if filter.searches() && !more {
            let sql = rows::searched_sql('$', filter);
            let r = filtered(sql, filter, before, rows::page_rows(limit))
                .fetch_one(&self.pool)
                .await
                .map_err(unavailable)?;
            Some((
                r.try_get::<Option<i64>, _>(0).map_err(unavailable)?,
                r.try_get::<i64, _>(1).map_err(unavailable)?,
            ))
        } else {
            None
        };
        Ok((page, rows::next_cursor(more, last, searched)))
    }

    async fn count(&self, filter: &Filter) -> Result<Vec<(State, u64)>, StoreError> {
        let sql = rows::count_sql('$', filter);
        let rows = filtered(sql, filter, i64::MAX, State::ALL.len() as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.iter()
            .map(|r| {
                let state: String = r.try_get(0)?;
                Ok((rows::state(&state), r.try_get::<i64, _>(1)? as u64))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(unavailable)
    }

    async fn stats(&self) -> Result<Stats, StoreError> {
        // The finished messages from the kept counts; those still on their
        // way (few, next to a retention's worth of finished ones) through
        // the state index.
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT state, SUM(n)::bigint FROM mailmux_counts GROUP BY state
             UNION ALL
             SELECT state, COUNT(*) FROM mailmux_messages
              WHERE state IN ('scheduled', 'queued', 'sending', 'held') GROUP BY state",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        let mut counts: HashMap<String, i64> = HashMap::new();
        for (state, n) in rows {
            *counts.entry(state).or_default() += n;
        }
        let (oldest_queued_at, next_retry_at, copies_pending): (Option<i64>, Option<i64>, i64) =
            sqlx::query_as(
                "SELECT (SELECT MIN(queued_at) FROM mailmux_messages WHERE state = 'queued'),
                    (SELECT MIN(next_attempt_at) FROM mailmux_messages
                      WHERE state = 'queued' AND rounds > 0),
                    (SELECT COUNT(*) FROM mailmux_messages WHERE sent_copy = 'pending')",
            )
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)?;
        let mut counts: Vec<(State, u64)> = counts
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(s, n)| (rows::state(&s), n as u64))
            .collect();
        counts.sort();
        Ok(Stats {
            counts,
            oldest_queued_at,
            next_retry_at,
            copies_pending: copies_pending as u64,
        })
    }

    async fn note_copy(&self, message_id: &str, outcome: &str) -> Result<(), StoreError> {
        // Built from the state names alone; the values are bound.
        sqlx::query(sqlx::AssertSqlSafe(rows::note_copy_sql('$')))
            .bind(message_id)
            .bind(outcome)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn note_reports(
        &self,
        message_id: &str,
        reports: Vec<ReportRecord>,
    ) -> Result<Vec<ReportRecord>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        // Locked, so that of two daemons that read one report the second
        // finds it noted.
        let old: Option<Option<String>> = sqlx::query_scalar(
            "SELECT reports FROM mailmux_messages WHERE message_id = $1 FOR UPDATE",
        )
        .bind(message_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?;
        let mut added = Vec::new();
        if let Some((merged, new)) = old.and_then(|old| rows::merged_reports(old, &reports)) {
            sqlx::query("UPDATE mailmux_messages SET reports = $2 WHERE message_id = $1")
                .bind(message_id)
                .bind(merged)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            added = new;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(added)
    }

    /// With `mine`, this daemon's pending copies settled before `before` (a
    /// previous run under the same `node_id`); and those of daemons not
    /// seen within one lease, taken over for this daemon to make.
    async fn pending_copies(&self, before: Millis, mine: bool) -> Result<Vec<CopyDue>, StoreError> {
        // A copy is another daemon's to take once its daemon was not seen
        // for a lease, and no daemon took it over within one. The second
        // test is on the row itself: when two daemons look at once, the
        // second one's UPDATE, blocked by the first, tests the row the
        // first wrote, where its view of `mailmux_nodes` may predate the
        // first daemon's heartbeat.
        let rows: Vec<(String, String)> = sqlx::query_as(concat!(
            "UPDATE mailmux_messages m SET copy_node = $1,
                    copy_claimed_at = CASE WHEN m.copy_node = $1 THEN m.copy_claimed_at ELSE ",
            db_now!(),
            " END
              WHERE m.sent_copy = 'pending'
                AND CASE WHEN m.copy_node = $1 THEN $4 AND COALESCE(m.finished_at, m.updated_at) < $2
                    ELSE COALESCE(m.copy_claimed_at, 0) < ",
            db_now!(),
            " - $3
                     AND NOT EXISTS (SELECT 1 FROM mailmux_nodes n
                                      WHERE n.node = m.copy_node AND n.seen_at >= ",
            db_now!(),
            " - $3) END
              RETURNING m.message_id, COALESCE(m.copy_relay, m.relay, '')"
        ))
        .bind(&self.node)
        .bind(before)
        .bind(self.lease_ms)
        .bind(mine)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(rows
            .into_iter()
            .map(|(message_id, relay)| CopyDue { message_id, relay })
            .collect())
    }

    /// At start: the crash rule for what this node id left in `sending`
    /// (after a restart with a fixed `node_id`) and for leases that ran out.
    async fn recover(&self) -> Result<Recovered, StoreError> {
        self.take_over(true).await
    }

    async fn suppress(&self, entries: Vec<Suppression>) -> Result<Vec<String>, StoreError> {
        let (mut addresses, mut reasons, mut details, mut ids, mut ats) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for e in entries {
            addresses.push(e.address);
            reasons.push(e.reason);
            details.push(e.detail);
            ids.push(e.message_id);
            ats.push(e.at);
        }
        // One statement: the insert, the version moved when it added a
        // row, and the change recorded under that version (one row for a
        // write too large to record address by address).
        let whole = addresses.len() > super::SUPPRESSION_CHANGE_ROWS;
        let added: Vec<String> = sqlx::query_scalar(
            "WITH added AS (
                INSERT INTO mailmux_suppressions (address, reason, detail, message_id, created_at)
                SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[])
                ON CONFLICT (address) DO NOTHING RETURNING address),
             moved AS (
                UPDATE mailmux_suppression_version SET v = v + 1
                 WHERE EXISTS (SELECT 1 FROM added) RETURNING v),
             logged AS (
                INSERT INTO mailmux_suppression_changes (version, address, added)
                SELECT moved.v, added.address, TRUE FROM moved, added WHERE NOT $6
                UNION ALL
                SELECT moved.v, NULL, TRUE FROM moved WHERE $6),
             trimmed AS (
                DELETE FROM mailmux_suppression_changes
                 WHERE version <= (SELECT v FROM moved) - $7)
             SELECT address FROM added",
        )
        .bind(addresses)
        .bind(reasons)
        .bind(details)
        .bind(ids)
        .bind(ats)
        .bind(whole)
        .bind(super::SUPPRESSION_VERSIONS_KEPT)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(added)
    }

    async fn unsuppress(&self, address: &str) -> Result<bool, StoreError> {
        let gone: bool = sqlx::query_scalar(
            "WITH gone AS (
                DELETE FROM mailmux_suppressions WHERE address = $1 RETURNING 1),
             moved AS (
                UPDATE mailmux_suppression_version SET v = v + 1
                 WHERE EXISTS (SELECT 1 FROM gone) RETURNING v),
             logged AS (
                INSERT INTO mailmux_suppression_changes (version, address, added)
                SELECT moved.v, $1, FALSE FROM moved),
             trimmed AS (
                DELETE FROM mailmux_suppression_changes
                 WHERE version <= (SELECT v FROM moved) - $2)
             SELECT EXISTS (SELECT 1 FROM gone)",
        )
        .bind(address)
        .bind(super::SUPPRESSION_VERSIONS_KEPT)
        .fetch_one(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(gone)
    }

    async fn suppression_changes(
        &self,
        since: i64,
    ) -> Result<Option<(i64, Vec<SuppressionChange>)>, StoreError> {
        // The version first: every version up to it is committed (a write
        // holds the version's row until it commits), so the changes read
        // after it hold each of them unless trimmed.
        let now = self.suppression_version().await?;
        type Row = (
            i64,
            Option<String>,
            bool,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<i64>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT ch.version, ch.address, ch.added,
                    s.address, s.reason, s.detail, s.message_id, s.created_at
               FROM mailmux_suppression_changes ch
               LEFT JOIN mailmux_suppressions s ON ch.added AND s.address = ch.address
              WHERE ch.version > $1 AND ch.version <= $2
              ORDER BY ch.version, ch.id",
        )
        .bind(since)
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        let versions: Vec<(i64, bool)> = rows.iter().map(|r| (r.0, r.1.is_some())).collect();
        if !super::changes_complete(since, now, &versions) {
            return Ok(None);
        }
        let changes = rows
            .into_iter()
            .filter_map(
                |(_, address, added, listed, reason, detail, message_id, at)| {
                    if !added {
                        return address.map(SuppressionChange::Removed);
                    }
                    // As the store holds it now; gone if removed since.
                    Some(SuppressionChange::Added(Suppression {
                        address: listed?,
                        reason: reason?,
                        detail,
                        message_id,
                        at: at?,
                    }))
                },
            )
            .collect();
        Ok(Some((now, changes)))
    }

    async fn suppression_version(&self) -> Result<i64, StoreError> {
        sqlx::query_scalar("SELECT v FROM mailmux_suppression_version")
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)
    }

    async fn paused(&self) -> Result<Option<Paused>, StoreError> {
        let row: Option<(Millis, String, Option<String>)> =
            sqlx::query_as("SELECT since, by_whom, reason FROM mailmux_delivery_pause")
                .fetch_optional(&self.pool)
                .await
                .map_err(unavailable)?;
        Ok(row.map(|(since, by, reason)| Paused { since, by, reason }))
    }

    fn shares_rates(&self) -> bool {
        true
    }

    async fn take_rates(
        &self,
        takes: &[RateTake],
    ) -> Result<Option<(usize, Duration)>, StoreError> {
        rates_answer(self.send_rates(takes)).await
    }

    async fn take_rates_many(
        &self,
        messages: &[&[RateTake]],
    ) -> Vec<Result<Option<(usize, Duration)>, StoreError>> {
        // All sent before any answer is awaited: the taker takes them in
        // this order, folded into as few statements as it can.
        let sent: Vec<_> = messages.iter().map(|t| self.send_rates(t)).collect();
        let mut answers = Vec::with_capacity(sent.len());
        for s in sent {
            answers.push(rates_answer(s).await);
        }
        answers
    }

    async fn set_paused(&self, pause: Option<Paused>) -> Result<bool, StoreError> {
        let done = match pause {
            Some(p) => sqlx::query(
                "INSERT INTO mailmux_delivery_pause (since, by_whom, reason)
                 VALUES ($1, $2, $3) ON CONFLICT (one) DO NOTHING",
            )
            .bind(p.since)
            .bind(p.by)
            .bind(p.reason),
            None => sqlx::query("DELETE FROM mailmux_delivery_pause"),
        }
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(done.rows_affected() > 0)
    }

    async fn suppression(&self, address: &str) -> Result<Option<Suppression>, StoreError> {
        let row: Option<SuppressionRow> = sqlx::query_as(
            "SELECT address, reason, detail, message_id, created_at FROM mailmux_suppressions
              WHERE address = $1",
        )
        .bind(address)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(row.map(suppression_of))
    }

    async fn suppression_page(
        &self,
        query: &SuppressionQuery,
    ) -> Result<SuppressionPage, StoreError> {
        // `strpos` finds the part as given; addresses are compared in the
        // database's collation, the order of the primary key's index, so
        // `after` and `ORDER BY` agree. One row past the limit says whether
        // a next page follows (`LIMIT NULL`: all). A bare `address > $1`
        // (the empty string for the first page) is a range of the index.
        let limit = query.limit.map(|l| l.saturating_add(1) as i64);
        let rows: Vec<SuppressionRow> = sqlx::query_as(SUPPRESSION_PAGE_SQL)
            .bind(query.after.as_deref().unwrap_or(""))
            .bind(&query.contains)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        let (total, matching): (i64, i64) = if query.counts {
            sqlx::query_as(
                "SELECT count(*), count(*) FILTER (WHERE $1::text IS NULL OR strpos(address, $1) > 0)
                   FROM mailmux_suppressions",
            )
            .bind(&query.contains)
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)?
        } else {
            (0, 0)
        };
        let rows = rows.into_iter().map(suppression_of).collect();
        Ok(SuppressionPage::of(
            query,
            total as u64,
            matching as u64,
            rows,
        ))
    }

    async fn report_cursor(&self, mailbox: &str) -> Result<Option<(u32, u32)>, StoreError> {
        let row: Option<(i64, i64)> =
            sqlx::query_as("SELECT validity, uid FROM mailmux_report_cursors WHERE mailbox = $1")
                .bind(mailbox)
                .fetch_optional(&self.pool)
                .await
                .map_err(unavailable)?;
        Ok(row.map(|(v, u)| (v as u32, u as u32)))
    }

    async fn advance_report_cursor(
        &self,
        mailbox: &str,
        validity: u32,
        uid: u32,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO mailmux_report_cursors AS c (mailbox, validity, uid) VALUES ($1, $2, $3)
             ON CONFLICT (mailbox) DO UPDATE SET validity = excluded.validity, uid = excluded.uid
              WHERE c.validity <> excluded.validity OR c.uid < excluded.uid",
        )
        .bind(mailbox)
        .bind(i64::from(validity))
        .bind(i64::from(uid))
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn purge(
        &self,
        finished_before: Millis,
        keys_before: Millis,
        limit: usize,
    ) -> Result<Purged, StoreError> {
        let limit = limit as i64;
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        // `gone` is evaluated once, so both deletes take the same messages.
        // Another daemon's purge may take the same messages at once: each
        // counts only the rows its own delete removed.
        let messages: i64 = sqlx::query_scalar(concat!(
            "WITH gone AS (SELECT seq FROM mailmux_messages WHERE finished_at < $1
                           ORDER BY finished_at LIMIT $2),
                  attempts AS (DELETE FROM mailmux_attempts WHERE seq IN (SELECT seq FROM gone)),
                  d AS (DELETE FROM mailmux_messages WHERE seq IN (SELECT seq FROM gone)
                        RETURNING state, finished_at),
                  ",
            count_finished!("d", "$3", "0", "-"),
            "
             SELECT COUNT(*) FROM d"
        ))
        .bind(finished_before)
        .bind(limit)
        .bind(&self.node)
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
        let messages = messages as u64;
        fold_counts(&mut tx, &self.node, self.lease_ms).await?;
        // Buckets full again: as good as none.
        sqlx::query(
            "DELETE FROM mailmux_rates WHERE key IN
                (SELECT key FROM mailmux_rates
                  WHERE tat < (extract(epoch FROM clock_timestamp()) * 1000000000)::BIGINT
                  LIMIT $1)",
        )
        .bind(limit)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let keys = sqlx::query(
            "DELETE FROM mailmux_idempotency WHERE key IN
                (SELECT key FROM mailmux_idempotency WHERE created_at < $1
                 ORDER BY created_at LIMIT $2)",
        )
        .bind(keys_before)
        .bind(limit)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?
        .rows_affected();
        tx.commit().await.map_err(unavailable)?;
        Ok(Purged { messages, keys })
    }
}

fn pending(r: &PgRow) -> Result<Pending, sqlx::Error> {
    let body: Vec<u8> = r.try_get("body")?;
    let accepted = lines(r.try_get("accepted")?);
    let rejected = rows::rejected(r.try_get("rejected")?);
    Ok(Pending {
        message_id: r.try_get("message_id")?,
        state: rows::state(r.try_get("state")?),
        from: r.try_get("mail_from")?,
        to: lines(r.try_get("rcpt")?),
        accepted,
        rejected,
        copied: r.try_get("copied")?,
        bytes: Arc::from(body),
        prefer: r.try_get("prefer")?,
        due_at: r.try_get("due_at")?,
        rounds: r.try_get::<i32, _>("rounds")?.max(0) as u32,
        caller: r.try_get("caller")?,
        meta: r.try_get("meta")?,
        only: r
            .try_get::<Option<String>, _>("relays")?
            .map(|s| Arc::from(lines(Some(s)))),
        max_age: r.try_get("max_age")?,
        priority: rows::priority(r.try_get("priority")?),
    })
}

fn record(r: &PgRow) -> Result<Record, sqlx::Error> {
    let state = rows::state(r.try_get("state")?);
    let rejected = rows::rejected(r.try_get("rejected")?);
    let history: String = r.try_get("history")?;
    Ok(Record {
        message_id: r.try_get("message_id")?,
        state,
        from: r.try_get("mail_from")?,
        to: lines(r.try_get("rcpt")?),
        size: r.try_get::<i64, _>("size")?.max(0) as u64,
        prefer: r.try_get("prefer")?,
        idempotency_key: r.try_get("idem_key")?,
        queued_at: r.try_get("queued_at")?,
        due_at: r.try_get("due_at")?,
        updated_at: r.try_get("updated_at")?,
        next_attempt_at: if matches!(state, State::Queued | State::Scheduled | State::Held) {
            r.try_get("next_attempt_at")?
        } else {
            None
        },
        relay: r.try_get("relay")?,
        accepted: lines(r.try_get("accepted")?),
        rejected,
        reason: r.try_get("reason")?,
        note: r.try_get("note")?,
        attempts: Vec::new(),
        history: rows::history(&history),
        caller: r.try_get("caller")?,
        meta: r.try_get("meta")?,
        decided_by: r.try_get("decided_by")?,
        sent_copy: r.try_get("sent_copy")?,
        node: r.try_get("node")?,
        batch: r.try_get("batch")?,
        tag: r.try_get("tag")?,
        max_age: r.try_get("max_age")?,
        priority: rows::priority(r.try_get("priority")?),
        expires_at: None,
        reports: rows::reports(r.try_get("reports")?),
    })
}

/// `sql`, [`rows::list_sql`] or [`rows::count_sql`] (built from constants
/// only), with `filter` bound: rows before seq `before`, at most `rows`.
fn filtered<'q>(
    sql: String,
    filter: &'q Filter,
    before: i64,
    rows: i64,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(before)
        .bind(filter.state.map(State::as_str))
        .bind(rows)
        .bind(&filter.caller)
        .bind(&filter.batch)
        .bind(filter.recipient.as_ref().map(|r| r.to_lowercase()))
        .bind(&filter.tag)
        .bind(&filter.reported)
        .bind(filter.metadata.as_ref().map(rows::metadata_json))
}

fn summary(r: &PgRow) -> Result<Summary, sqlx::Error> {
    Ok(Summary {
        message_id: r.try_get("message_id")?,
        state: rows::state(r.try_get("state")?),
        from: r.try_get("mail_from")?,
        to: lines(r.try_get("rcpt")?),
        queued_at: r.try_get("queued_at")?,
        updated_at: r.try_get("updated_at")?,
        relay: r.try_get("relay")?,
        caller: r.try_get("caller")?,
        node: r.try_get("node")?,
        batch: r.try_get("batch")?,
        tag: r.try_get("tag")?,
        priority: rows::priority(r.try_get("priority")?),
    })
}

#[cfg(test)]
mod tests {
    use super::shown_url;

    #[test]
    fn the_shown_url_hides_the_password() {
        assert_eq!(
            shown_url("postgres://mm:s3cret@127.0.0.1:5432/q?sslmode=require"),
            "postgres://mm:***@127.0.0.1:5432/q?sslmode=require"
        );
        assert_eq!(
            shown_url("postgres://127.0.0.1/q"),
            "postgres://127.0.0.1/q"
        );
        assert_eq!(shown_url("not a url s3cret"), "***");
        // A password given as a parameter, as libpq and sqlx take it.
        assert_eq!(
            shown_url("postgres://mm@db/q?sslmode=require&password=s3cret&SSLPassword=k3y"),
            "postgres://mm@db/q?sslmode=require&password=***&SSLPassword=***"
        );
        assert_eq!(
            shown_url("postgres://mm:s3cret@db/q?application_name=a@b"),
            "postgres://mm:***@db/q?application_name=a@b"
        );
    }
}
