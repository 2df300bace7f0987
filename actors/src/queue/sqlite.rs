//! The SQLite store: one file in WAL mode.
//!
//! SQLite has no group commit, so one writer thread owns the write
//! connection and folds every write that arrives while it commits into the
//! next transaction: one commit and one fsync of the log per batch. A
//! write that fails before it changed a row fails alone; one that fails
//! part-way rolls its whole batch back ([`run_write`]).
//! The writer commits with `synchronous=NORMAL` (the log is written, not
//! synced) and fsyncs the log itself before it answers the batch's
//! writes, except the outcome of a delivery that a relay took (`sent`,
//! `partial`, with no Sent copy due): such a write is answered once
//! committed, not after the fsync that the commit marks beside it wait
//! for. That fsync covers it, or the writer fsyncs the log after
//! [`LAZY_SYNC`] with no other write. A process crash loses nothing (the
//! log is written); a power loss before that fsync leaves the message
//! marked and `sending`, so it is recovered as `unknown` and never resent.
//! Reads run on the blocking pool, on two read-only connections: one for the
//! delivery path (due messages, their bytes), one for callers and operators
//! (status, listings, counts), so that a long search never holds up
//! delivery. A daemon holds
//! an advisory lock on the file for as long as it runs; other processes may
//! still open it for short transactions.

use std::cell::Cell;
use std::fs::File;
use std::ops::Deref;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;

use super::rows::{self, entry, lines};
use super::{
    Accepted, Cancel, CopyDue, Decided, Decision, Feed, Filter, Millis, NewMessage, Paused,
    Pending, Print, Purged, Record, Recovered, ReportRecord, Retry, Settle, State, Stats, Store,
    StoreError, Summary, Suppression, SuppressionChange, SuppressionPage, SuppressionQuery,
    abandoned, cancelled_in_round, now_millis,
};

/// Writes folded into one transaction at most. Bounds the latency a write
/// can add to the batch it joins.
const MAX_BATCH: usize = 512;
/// How long a connection waits for another process's lock (the queue
/// command, a `send --no-wait`) before failing.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long the log of a lazy commit may wait for its fsync when no other
/// write comes: a relay-accepted outcome is answered once written, and made
/// durable by the next commit or after this.
const LAZY_SYNC: std::time::Duration = std::time::Duration::from_millis(5);

/// The schema, one migration per version. `PRAGMA user_version` records how
/// many were applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    mail_from TEXT,
    rcpt TEXT NOT NULL,
    size INTEGER NOT NULL,
    body BLOB,
    prefer TEXT,
    idem_key TEXT,
    queued_at INTEGER NOT NULL,
    due_at INTEGER NOT NULL,
    next_attempt_at INTEGER,
    updated_at INTEGER NOT NULL,
    finished_at INTEGER,
    committing INTEGER NOT NULL DEFAULT 0,
    rounds INTEGER NOT NULL DEFAULT 0,
    relay TEXT,
    accepted TEXT,
    rejected TEXT,
    reason TEXT,
    note TEXT,
    history TEXT NOT NULL DEFAULT ''
);
CREATE INDEX messages_due ON messages(next_attempt_at) WHERE state IN ('queued', 'scheduled');
CREATE INDEX messages_finished ON messages(finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX messages_state ON messages(state, seq);
CREATE TABLE attempts (
    seq INTEGER NOT NULL,
    at INTEGER NOT NULL,
    relay TEXT NOT NULL,
    class TEXT,
    code INTEGER,
    text TEXT NOT NULL,
    duration_ms INTEGER NOT NULL
);
CREATE INDEX attempts_seq ON attempts(seq);
CREATE TABLE idempotency (
    key TEXT PRIMARY KEY,
    message_id TEXT NOT NULL,
    hash BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX idempotency_created ON idempotency(created_at);
"#,
    r#"
-- Messages per state, kept by triggers, so that the queue's counts cost the
-- same with a million messages as with ten (a GROUP BY walks every row).
CREATE TABLE counts (state TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO counts (state, n) SELECT state, COUNT(*) FROM messages GROUP BY state;
CREATE TRIGGER counts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO counts (state, n) VALUES (NEW.state, 1)
        ON CONFLICT (state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER counts_update AFTER UPDATE OF state ON messages
    WHEN OLD.state <> NEW.state BEGIN
    UPDATE counts SET n = n - 1 WHERE state = OLD.state;
    INSERT INTO counts (state, n) VALUES (NEW.state, 1)
        ON CONFLICT (state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER counts_delete AFTER DELETE ON messages BEGIN
    UPDATE counts SET n = n - 1 WHERE state = OLD.state;
END;
"#,
    r#"
-- Who sent each message, the daemon's audit description of it, and the
-- approval of a held message: the content hash it binds to and who decided.
ALTER TABLE messages ADD COLUMN caller TEXT;
ALTER TABLE messages ADD COLUMN meta TEXT;
ALTER TABLE messages ADD COLUMN held_hash BLOB;
ALTER TABLE messages ADD COLUMN decided_by TEXT;
-- The relays that may take the message (the caller's allowed_relays), one a line.
ALTER TABLE messages ADD COLUMN relays TEXT;
CREATE INDEX messages_caller ON messages(caller, seq);
"#,
    r#"
-- The send_batch call a message came in.
ALTER TABLE messages ADD COLUMN batch TEXT;
CREATE INDEX messages_batch ON messages(batch, seq) WHERE batch IS NOT NULL;
"#,
    r#"
-- The outcome of the copy in the Sent folder (IMAP APPEND).
ALTER TABLE messages ADD COLUMN sent_copy TEXT;
"#,
    r#"
-- Sent copies recorded as pending (the message keeps its body until the
-- copy's outcome): those a crash interrupted are made at the next start.
CREATE INDEX messages_copy_pending ON messages(seq) WHERE sent_copy = 'pending';
"#,
    r#"
-- The count of new messages is kept by the store's accept, once per state
-- for all the messages of one write: a trigger run per message cost about
-- a third of storing a send_batch.
DROP TRIGGER counts_insert;
"#,
    r#"
-- The counts of a state change are kept by the store's writer too, once per
-- state for all the writes of one transaction: the trigger run per changed
-- row cost about a quarter of settling a message.
DROP TRIGGER counts_update;
"#,
    r#"
-- The attempts of each message are kept in its row, one a line (see
-- rows::attempts_text), appended by the settle that rewrites the row
-- anyway: a table of their own and its index cost about two pages of the
-- log per commit.
ALTER TABLE messages ADD COLUMN attempt_log TEXT;
UPDATE messages SET attempt_log = (
    SELECT group_concat(
        a.at || char(9)
            || replace(replace(replace(a.relay, char(9), ' '), char(13), ' '), char(10), ' ')
            || char(9) || COALESCE(a.class, '') || char(9) || COALESCE(a.code, '')
            || char(9) || a.duration_ms || char(9)
            || replace(replace(replace(a.text, char(9), ' '), char(13), ' '), char(10), ' '),
        char(10) ORDER BY a.rowid)
    FROM attempts a WHERE a.seq = messages.seq)
 WHERE seq IN (SELECT seq FROM attempts);
DROP TABLE attempts;
"#,
    r#"
-- The oldest queued message and the next retry, for the queue's stats
-- (get_smtp_status, /metrics, `queue stats`): without these, each read
-- walked every waiting message, seconds with a backlog of a million.
CREATE INDEX messages_queued_at ON messages(queued_at) WHERE state = 'queued';
CREATE INDEX messages_retry ON messages(next_attempt_at) WHERE state = 'queued' AND rounds > 0;
"#,
    r#"
-- Idempotency keys are each caller's own: the key is kept after its
-- caller's name and U+001F (queue::scoped_key). A key whose message is
-- gone has no known caller and gets the empty name.
UPDATE idempotency SET key = COALESCE(
        (SELECT m.caller FROM messages m WHERE m.message_id = idempotency.message_id), '')
    || char(31) || key;
"#,
    r#"
-- The index by state leaves out `sent`, most of the table, which a listing
-- reads in order anyway (rows::listed_by): a delivered message's outcome
-- then writes no page of it. Statements that read through it say
-- `state <> 'sent'`, which is how SQLite knows the index serves them.
DROP INDEX messages_state;
CREATE INDEX messages_state ON messages(state, seq) WHERE state <> 'sent';
"#,
    r#"
-- The relay whose account files a pending Sent copy: the one that first
-- took the message. A later round (a deferred recipient, through another
-- relay) rewrites `relay`, and a copy recovered after a crash must still go
-- to the first relay's Sent folder, not to another account's.
ALTER TABLE messages ADD COLUMN copy_relay TEXT;
"#,
    r#"
-- The suppression list: addresses the daemon accepts no mail for, and
-- a version that every change of it moves, which a daemon polls to read
-- the list again after another process changed it.
CREATE TABLE suppressions (
    address TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    detail TEXT,
    message_id TEXT,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE suppression_version (v INTEGER NOT NULL);
INSERT INTO suppression_version (v) VALUES (0);
"#,
    r#"
-- How far each mailbox of bounce and complaint reports has been read, and
-- what the reports said of a message's recipients (one a line: time,
-- reason, address, detail).
CREATE TABLE report_cursors (
    mailbox TEXT PRIMARY KEY,
    validity INTEGER NOT NULL,
    uid INTEGER NOT NULL
) WITHOUT ROWID;
ALTER TABLE messages ADD COLUMN reports TEXT;
"#,
    r#"
-- The suppression list's changes of its last versions (an address added
-- or removed; no address: a change of the whole list), so that a daemon
-- reads what changed since its copy rather than the whole list.
CREATE TABLE suppression_changes (
    version INTEGER NOT NULL,
    address TEXT,
    added INTEGER NOT NULL
);
CREATE INDEX suppression_changes_version ON suppression_changes(version);
"#,
    r#"
-- Delivery paused by an operator: at most one row while paused.
CREATE TABLE delivery_pause (
    since INTEGER NOT NULL,
    by TEXT NOT NULL,
    reason TEXT
);
"#,
    r#"
-- The caller's label of a message (`tag`), which a listing filters by.
ALTER TABLE messages ADD COLUMN tag TEXT;
CREATE INDEX messages_tag ON messages(tag, seq) WHERE tag IS NOT NULL;
"#,
    r#"
-- How long a message may wait for delivery once due, in milliseconds, when
-- its call asked for less than its caller's max_age.
ALTER TABLE messages ADD COLUMN max_age INTEGER;
"#,
    r#"
-- A message's priority (1: high; null: normal), and the due messages of high
-- priority, which a poll takes before the rest.
ALTER TABLE messages ADD COLUMN priority INTEGER;
CREATE INDEX messages_due_high ON messages(next_attempt_at)
    WHERE state IN ('queued', 'scheduled') AND priority = 1;
"#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// A write for the writer thread. It runs inside the batch's transaction
/// (or gets the error that the transaction could not begin) and returns the
/// answer to send once the commit's outcome is known, with the error of a
/// write that failed after it changed rows, which the batch must undo (see
/// [`run_write`]).
type Job =
    Box<dyn FnOnce(Result<&Tx<'_>, &StoreError>, Millis) -> (Answer, Option<StoreError>) + Send>;

/// The connection a write runs on, inside its batch's transaction, with the
/// counts per state that the batch's writes moved.
struct Tx<'a> {
    conn: &'a Connection,
    moves: &'a Cell<Moves>,
}

impl Deref for Tx<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Tx<'_> {
    /// Records that `n` messages went from `from` (`None`: new ones) to `to`.
    fn moved(&self, from: Option<State>, to: State, n: i64) {
        let mut moves = self.moves.get();
        if let Some(from) = from {
            moves.0[Moves::slot(from)] -= n;
        }
        moves.0[Moves::slot(to)] += n;
        self.moves.set(moves);
    }
}

/// How many messages each state gained or lost in one transaction. The
/// writer adds them to the `counts` table before it commits, one statement
/// per state that changed ([`add_moves`]).
#[derive(Debug, Clone, Copy, Default)]
struct Moves([i64; State::ALL.len()]);

impl Moves {
    fn slot(state: State) -> usize {
        State::ALL
            .iter()
            .position(|s| *s == state)
            .expect("every state is in State::ALL")
    }
}

/// Sends a write's result, or the commit's error in place of a success.
type Answer = Box<dyn FnOnce(&Result<(), StoreError>) + Send>;

/// What the writer thread is sent.
enum Work {
    /// `lazy`: the write may be answered once written, before its fsync
    /// (see [`LAZY_SYNC`]).
    Write { job: Job, lazy: bool },
    /// A durable write that waits for its input as it runs (a streamed
    /// batch, [`Store::accept_stream`]): it gets a transaction of its own,
    /// after the writes before it, so that its failure or abandonment
    /// undoes nothing else.
    Alone(Job),
    /// Merge the write-ahead log into the database file and stop; answer
    /// once done.
    Close(oneshot::Sender<()>),
    /// Panic, as a bug in the writer would: for fault tests.
    #[cfg(feature = "fault-hooks")]
    Crash,
}

/// The SQLite store.
#[derive(Debug)]
pub struct SqliteStore {
    writes: mpsc::Sender<Work>,
    /// Cleared when the writer thread ends, however it ends.
    writing: Arc<AtomicBool>,
    /// Reads for callers and operators: status, listings, counts.
    reader: Arc<Mutex<Connection>>,
    /// Reads of the delivery path (the due messages, their bytes, pending
    /// Sent copies) on a connection of their own: a long listing or search
    /// never holds up delivery.
    delivery: Arc<Mutex<Connection>>,
    /// The advisory lock of a daemon; released when the store is dropped.
    _lock: Option<DaemonLock>,
}

/// The daemon's advisory lock on the store's file.
///
/// Dropping it unlocks explicitly rather than only closing the file: a child
/// process forked by another thread holds a copy of the descriptor until it
/// execs, and the lock would stay held for as long as that copy is open.
#[derive(Debug)]
struct DaemonLock(File);

impl DaemonLock {
    /// Takes the lock on `file`; `None` while another process holds it.
    fn take(file: File) -> std::io::Result<Option<DaemonLock>> {
        match file.try_lock() {
            Ok(()) => Ok(Some(DaemonLock(file))),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }
}

impl Drop for DaemonLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path` for a daemon: takes the
    /// advisory lock, applies migrations, starts the writer.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        Self::open_with(path, true, Box::new(fsync_log))
    }

    /// Opens the store without its daemon lock, for short transactions by
    /// another process (the queue command, `send --no-wait`) while the daemon
    /// may be running. Migrations are not applied: the store must exist.
    pub fn open_shared(path: &Path) -> Result<SqliteStore, StoreError> {
        Self::open_with(path, false, Box::new(fsync_log))
    }

    /// `sync_log` makes the write-ahead log durable: [`fsync_log`], but for
    /// the tests that watch or fail it.
    fn open_with(path: &Path, lock: bool, sync_log: SyncLog) -> Result<SqliteStore, StoreError> {
        let shown = path.display().to_string();
        let named = |e: &dyn std::fmt::Display| StoreError::Unavailable(format!("{shown}: {e}"));
        let lock = if lock {
            // A new store is readable by its owner only, as the audit log
            // is: it holds every queued message's bytes. SQLite gives its
            // log and shared-memory files the database file's mode. An
            // existing file keeps the mode its operator gave it.
            let file = open_private(path).map_err(|e| match e.kind() {
                std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied => {
                    named(&format!("the file or its file system is read-only ({e})"))
                }
                _ => named(&e),
            })?;
            match DaemonLock::take(file) {
                Ok(Some(lock)) => Some(lock),
                Ok(None) => return Err(StoreError::Locked { path: shown }),
                Err(e) => return Err(named(&e)),
            }
        } else {
            if !path.exists() {
                return Err(named(
                    &"no queue store here (start the daemon once to create it)",
                ));
            }
            None
        };
        // On a read-only file system nobody can change the store, and SQLite
        // cannot create the shared-memory file that WAL needs to read: open
        // it as immutable, for reading. Writes then fail as read-only.
        let frozen = lock.is_none() && on_read_only_fs(path);
        if frozen && unmerged_log(path) {
            return Err(named(
                &"the file system is read-only and the store's write-ahead log was never merged \
                  (the daemon did not stop cleanly); mount it writable to read the store",
            ));
        }
        let writer = if frozen {
            immutable(path)
        } else {
            Connection::open(path)
        };
        let writer = writer.map_err(|e| named(&e))?;
        configure(&writer, !frozen).map_err(|e| named(&e))?;
        migrate(&writer, &shown, lock.is_some())?;
        let reader = || -> Result<Arc<Mutex<Connection>>, StoreError> {
            let reader = if frozen {
                immutable(path)
            } else {
                Connection::open_with_flags(
                    path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
            };
            let reader = reader.map_err(|e| named(&e))?;
            configure(&reader, false).map_err(|e| named(&e))?;
            Ok(Arc::new(Mutex::new(reader)))
        };
        let (writes, writing) = spawn_writer(writer, lock.is_some(), sync_log);
        Ok(SqliteStore {
            writing,
            writes,
            reader: reader()?,
            delivery: reader()?,
            _lock: lock,
        })
    }

    /// Runs `f` in the writer thread's next transaction; answers once that
    /// transaction is committed.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Tx<'_>, Millis) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.write_with(false, f).await
    }

    /// [`SqliteStore::write`]; `lazy`: answered before the fsync.
    async fn write_with<T: Send + 'static>(
        &self,
        lazy: bool,
        f: impl FnOnce(&Tx<'_>, Millis) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.send_job(
            move |job| Work::Write { job, lazy },
            move |c, now| run_write(c, |c| f(c, now)),
        )
        .await
    }

    /// Hands the writer `f` as a job (`work` wraps it), and answers with its
    /// result once its transaction has committed. `f` answers as
    /// [`run_write`] does: its result, and the error that undoes its
    /// transaction, if any.
    async fn send_job<T: Send + 'static>(
        &self,
        work: impl FnOnce(Job) -> Work,
        f: impl FnOnce(&Tx<'_>, Millis) -> (Result<T, StoreError>, Option<StoreError>) + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel::<Result<T, StoreError>>();
        let job: Job = Box::new(move |batch, now| {
            let (result, undo) = match batch {
                Ok(t) => f(t, now),
                Err(e) => (Err(e.clone()), None),
            };
            let answer: Answer = Box::new(move |commit| {
                let _ = tx.send(match (result, commit) {
                    (Ok(_), Err(e)) => Err(e.clone()),
                    (r, _) => r,
                });
            });
            (answer, undo)
        });
        self.writes
            .send(work(job))
            .map_err(|_| unavailable("the store's writer has stopped"))?;
        rx.await
            .map_err(|_| unavailable("the store's writer has stopped"))?
    }

    /// Runs `f` on the connection of callers' and operators' reads.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        read_on(self.reader.clone(), f).await
    }

    /// Runs `f` on the connection of the delivery path's reads.
    async fn read_delivery<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        read_on(self.delivery.clone(), f).await
    }
}

/// What [`SqliteStore::backup`] wrote: the copy as checked after it was
/// made.
#[derive(Debug, Clone)]
pub struct Backup {
    /// Messages per state in the copy (the states that have any).
    pub counts: Vec<(State, u64)>,
    /// The copy's schema version.
    pub schema: i64,
    /// The copy's size in bytes.
    pub bytes: u64,
}

impl SqliteStore {
    /// Writes a consistent copy of the store to `to`, which must not exist.
    /// The copy is one read transaction (`VACUUM INTO`), so a running daemon
    /// goes on writing meanwhile; it holds every message as it was when the
    /// copy began. The file is created readable by its owner only (it holds
    /// queued messages' bytes), fsynced with its folder, then opened again
    /// and checked (`PRAGMA quick_check`). A copy that fails is removed.
    /// The error names the copy's path and what failed.
    pub async fn backup(&self, to: &Path) -> Result<Backup, String> {
        let to = to.to_path_buf();
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|e| e.into_inner());
            back_up(&conn, &to)
        })
        .await
        .map_err(|e| format!("the backup stopped: {e}"))?
    }
}

/// Copies the database `conn` reads into `to`, a new file of mode 0600
/// ([`SqliteStore::backup`]); a copy that fails is removed.
fn back_up(conn: &Connection, to: &Path) -> Result<Backup, String> {
    let shown = to.display().to_string();
    let named = |e: &dyn std::fmt::Display| format!("{shown}: {e}");
    let Some(target) = to.to_str() else {
        return Err(named(&"a backup's path must be UTF-8"));
    };
    // Created here, empty, so that the copy gets this mode (`VACUUM INTO`
    // fills an empty file) and an existing file is never overwritten.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                named(&"the file exists; a backup never overwrites one")
            }
            _ => named(&e),
        })?;
    let made = fill(conn, target, to).map_err(|e| named(&e));
    if made.is_err() {
        let _ = std::fs::remove_file(to);
    }
    made
}

/// Copies the store into `target` (`to`, created empty), syncs the copy and
/// its folder, and checks it.
fn fill(conn: &Connection, target: &str, to: &Path) -> Result<Backup, String> {
    conn.execute("VACUUM INTO ?1", [target])
        .map_err(|e| e.to_string())?;
    File::open(to)
        .and_then(|f| f.sync_all())
        .map_err(|e| e.to_string())?;
    sync_folder(to).map_err(|e| format!("syncing its folder: {e}"))?;
    let copy = Connection::open_with_flags(to, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| e.to_string())?;
    let verdict: String = copy
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if verdict != "ok" {
        return Err(format!("the copy failed its check: {verdict}"));
    }
    let read = || -> rusqlite::Result<(i64, Vec<(State, u64)>)> {
        let schema = copy.pragma_query_value(None, "user_version", |r| r.get(0))?;
        Ok((schema, counts(&copy)?))
    };
    let (schema, counts) = read().map_err(|e| e.to_string())?;
    drop(copy);
    let bytes = std::fs::metadata(to).map_err(|e| e.to_string())?.len();
    Ok(Backup {
        counts,
        schema,
        bytes,
    })
}

/// What [`restore`] did: the store now in place, as checked, and where the
/// store it replaced was kept.
#[derive(Debug, Clone)]
pub struct Restored {
    pub copy: Backup,
    /// The replaced store's file (its log merged into it, or beside it if
    /// the store was too damaged to merge), or `None` when there was no
    /// store.
    pub replaced: Option<std::path::PathBuf>,
}

/// Puts the store copied at `copy` (a `queue backup`) in place of the store
/// at `path`, which no daemon may hold.
///
/// The copy is checked (a mailmux store, not newer than this build) and
/// copied again, with `VACUUM INTO`, beside `path`: that also takes in a
/// write-ahead log left beside the copy. The replaced store's log is merged
/// into its file (or, if the store is too damaged for that, moved beside
/// it), the file is kept under a new name, and its log and shared-memory
/// files are removed before the new file is renamed over it: a log never
/// meets a database it was not written for, and at every moment `path`
/// holds one whole store, the old or the new, which gets the old one's
/// owner and mode. Both files are locked as a daemon locks its store, so
/// that none starts on them meanwhile.
pub fn restore(copy: &Path, path: &Path) -> Result<Restored, String> {
    let shown = copy.display().to_string();
    let from = Connection::open_with_flags(copy, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("{shown}: {e}"))?;
    let read = || -> rusqlite::Result<(i64, bool)> {
        let version = from.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let tables: i64 = from.query_row(
            "SELECT COUNT(*) FROM sqlite_schema WHERE type = 'table' AND name IN ('messages', 'counts')",
            [],
            |r| r.get(0),
        )?;
        Ok((version, tables == 2))
    };
    let (version, is_store) = read().map_err(|e| format!("{shown}: {e}"))?;
    if version > SCHEMA_VERSION {
        let too_new = StoreError::TooNew {
            path: shown,
            found: version,
            known: SCHEMA_VERSION,
        };
        return Err(too_new.to_string());
    }
    if version < 1 || !is_store {
        return Err(format!("{shown}: not a mailmux queue store"));
    }
    let staged = beside(path, ".restoring");
    let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    // The staged file's lock keeps two restores of one store apart; it is
    // held until the file is renamed over `path` or removed.
    let file = open_private(&staged).map_err(|e| io(&staged, e))?;
    let running = || {
        format!(
            "{}: another restore of this store is running",
            path.display()
        )
    };
    let new = match DaemonLock::take(file) {
        Ok(Some(lock)) => lock,
        Ok(None) => return Err(running()),
        Err(e) => return Err(io(&staged, e)),
    };
    // The file locked must still be the one named: another restore may have
    // renamed it over the store, or removed it, before letting go of it.
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let inode = |m: std::fs::Metadata| (m.dev(), m.ino());
    let named = std::fs::metadata(&staged).map(inode).ok();
    if named != new.0.metadata().map(inode).ok() {
        return Err(running());
    }
    let staging = || -> Result<(Backup, Option<std::path::PathBuf>), String> {
        // Whatever a restore that stopped half-way left: `VACUUM INTO`
        // fills only an empty file.
        new.0.set_len(0).map_err(|e| io(&staged, e))?;
        new.0
            .set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io(&staged, e))?;
        let old = lock_old(path)?;
        let Some(target) = staged.to_str() else {
            return Err(format!("{}: a store's path must be UTF-8", path.display()));
        };
        let checked =
            fill(&from, target, &staged).map_err(|e| format!("{}: {e}", staged.display()))?;
        Ok((checked, swap(&staged, old, path)?))
    };
    let done = staging();
    if done.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    drop(new);
    let (copy, replaced) = done?;
    Ok(Restored { copy, replaced })
}

/// Opens `path` to read and write, creating it readable by its owner only;
/// an existing file keeps its mode and its contents.
fn open_private(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
}

/// Opens and locks the store at `path` that a restore replaces, as a daemon
/// locks it; `None` when there is none.
fn lock_old(path: &Path) -> Result<Option<DaemonLock>, String> {
    let io = |e: std::io::Error| format!("{}: {e}", path.display());
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    match DaemonLock::take(file) {
        Ok(Some(lock)) => Ok(Some(lock)),
        Ok(None) => Err(format!(
            "{}: a mailmux daemon holds the store; stop it first",
            path.display()
        )),
        Err(e) => Err(io(e)),
    }
}

/// Renames `staged` over `path` as [`restore`] says, keeping `old`, the
/// store it replaces, locked meanwhile; returns that store's new name.
fn swap(
    staged: &Path,
    old: Option<DaemonLock>,
    path: &Path,
) -> Result<Option<std::path::PathBuf>, String> {
    let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    if let Some(old) = &old {
        // The service that owns the store keeps opening it: the new file
        // gets the replaced one's owner and mode.
        use std::os::unix::fs::MetadataExt as _;
        let was = old.0.metadata().map_err(|e| io(path, e))?;
        let now = std::fs::metadata(staged).map_err(|e| io(staged, e))?;
        if (was.uid(), was.gid()) != (now.uid(), now.gid()) {
            std::os::unix::fs::chown(staged, Some(was.uid()), Some(was.gid())).map_err(|e| {
                format!(
                    "{}: cannot give the restored store the owner of the one it replaces \
                     (uid {}, gid {}): {e}",
                    path.display(),
                    was.uid(),
                    was.gid()
                )
            })?;
        }
        std::fs::set_permissions(staged, was.permissions()).map_err(|e| io(staged, e))?;
    }
    let gone = |p: &Path, r: std::io::Result<()>| match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(p, e)),
        _ => Ok(()),
    };
    let mut replaced = None;
    if old.is_some() {
        // The old store's log merged into its file first, so that the file
        // alone is that whole store at every step below. A store too
        // damaged to merge keeps its log beside its new name instead.
        let merged = merge_log(path).unwrap_or(false);
        let aside = beside(path, &format!(".replaced-{}", now_millis()));
        std::fs::hard_link(path, &aside).map_err(|e| io(&aside, e))?;
        let shm = beside(path, "-shm");
        gone(&shm, std::fs::remove_file(&shm))?;
        let (wal, aside_wal) = (beside(path, "-wal"), beside(&aside, "-wal"));
        if merged {
            gone(&wal, std::fs::remove_file(&wal))?;
        } else {
            gone(&wal, std::fs::rename(&wal, &aside_wal))?;
        }
        if let Err(e) = std::fs::rename(staged, path) {
            // The old store stays in use: its log goes back beside it.
            if !merged {
                let _ = std::fs::rename(&aside_wal, &wal);
            }
            return Err(io(path, e));
        }
        replaced = Some(aside);
    } else {
        std::fs::rename(staged, path).map_err(|e| io(path, e))?;
    }
    sync_folder(path).map_err(|e| format!("{}: syncing its folder: {e}", path.display()))?;
    Ok(replaced)
}

/// Merges the write-ahead log of the store at `path` into its file and
/// empties it; true once nothing is left in the log.
fn merge_log(path: &Path) -> rusqlite::Result<bool> {
    let c = Connection::open(path)?;
    c.busy_timeout(BUSY_TIMEOUT)?;
    let busy: i64 = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
    Ok(busy == 0)
}

/// fsyncs the folder that holds `path`, so that a file made or renamed in
/// it stays.
fn sync_folder(path: &Path) -> std::io::Result<()> {
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(folder)?.sync_all()
}

/// `path` with `suffix` appended to its file name.
fn beside(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    name.into()
}

/// The messages per state, for the states that have any.
fn counts(c: &Connection) -> rusqlite::Result<Vec<(State, u64)>> {
    c.prepare_cached("SELECT state, n FROM counts WHERE n > 0")?
        .query_map([], |r| {
            Ok((
                rows::state(&r.get::<_, String>(0)?),
                r.get::<_, i64>(1)? as u64,
            ))
        })?
        .collect()
}

/// Runs `f` on `reader`, in the blocking pool.
async fn read_on<T: Send + 'static>(
    reader: Arc<Mutex<Connection>>,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(move || {
        let conn = reader.lock().unwrap_or_else(|e| e.into_inner());
        f(&conn)
    })
    .await
    .map_err(unavailable)?
    .map_err(unavailable)
}

/// Whether `path` is on a file system mounted read-only.
fn on_read_only_fs(path: &Path) -> bool {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .is_err_and(|e| e.kind() == std::io::ErrorKind::ReadOnlyFilesystem)
}

/// Whether the store's write-ahead log (`<path>-wal`) holds commits not yet
/// in the database file.
fn unmerged_log(path: &Path) -> bool {
    std::fs::metadata(beside(path, "-wal")).is_ok_and(|m| m.len() > 0)
}

/// A read-only connection that takes the file as unchanging (SQLite's
/// `immutable` URI parameter): no locks, no shared-memory file.
fn immutable(path: &Path) -> rusqlite::Result<Connection> {
    let mut uri = String::from("file:");
    for c in path.to_string_lossy().chars() {
        match c {
            '%' => uri.push_str("%25"),
            '?' => uri.push_str("%3f"),
            '#' => uri.push_str("%23"),
            c => uri.push(c),
        }
    }
    uri.push_str("?immutable=1");
    Connection::open_with_flags(
        uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )
}

fn configure(conn: &Connection, writer: bool) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    if writer {
        // WAL: readers never block the writer. FULL while the migrations
        // run; the writer thread then commits with NORMAL and fsyncs the
        // log itself ([`writer_loop`]).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
    }
    Ok(())
}

fn migrate(conn: &Connection, shown: &str, apply: bool) -> Result<(), StoreError> {
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| StoreError::Unavailable(format!("{shown}: {e}")))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: shown.into(),
            found,
            known: SCHEMA_VERSION,
        });
    }
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    if !apply {
        return Err(StoreError::Unavailable(format!(
            "{shown}: the store has schema version {found} and needs {SCHEMA_VERSION}; start the daemon once to migrate it"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = i as i64 + 1;
        let batch = format!("BEGIN IMMEDIATE; {sql}; PRAGMA user_version = {version}; COMMIT;");
        conn.execute_batch(&batch).map_err(|e| {
            let _ = conn.execute_batch("ROLLBACK");
            StoreError::Unavailable(format!("{shown}: migration to version {version}: {e}"))
        })?;
    }
    if found == 0 {
        tracing::info!(
            store = shown,
            version = SCHEMA_VERSION,
            "queue store created"
        );
    } else {
        tracing::info!(
            store = shown,
            from = found,
            version = SCHEMA_VERSION,
            "queue store migrated"
        );
    }
    Ok(())
}

/// Starts the writer thread. `owner`: this is the daemon's store (it holds
/// the lock), whose close merges the log.
/// The flag it gives is cleared when the thread ends, a panic included.
fn spawn_writer(
    conn: Connection,
    owner: bool,
    sync_log: SyncLog,
) -> (mpsc::Sender<Work>, Arc<AtomicBool>) {
    /// Clears the flag when dropped: at the thread's end, or its unwinding.
    struct Running(Arc<AtomicBool>);
    impl Drop for Running {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Release);
        }
    }
    let (tx, rx) = mpsc::channel::<Work>();
    let writing = Arc::new(AtomicBool::new(true));
    let running = Running(writing.clone());
    std::thread::Builder::new()
        .name("mailmux-queue-writer".into())
        .spawn(move || {
            let _running = running;
            writer_loop(conn, rx, owner, sync_log)
        })
        .expect("spawning the queue writer thread");
    (tx, writing)
}

/// The writer thread: takes every write waiting, runs them in one
/// transaction, commits, then answers each. A close ends it.
///
/// Every commit is written with `synchronous=NORMAL`, which writes the
/// log without an fsync. The lazy writes of a batch (see [`lazy`]) are
/// answered then; when the batch holds any other write, the writer fsyncs
/// the log and only then answers those. So a delivered message's outcome
/// never waits for the fsync of the commit marks beside it, and one
/// transaction carries both.
fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Work>, owner: bool, sync_log: SyncLog) {
    // Where the mode cannot be switched, every commit fsyncs itself.
    let synced_by_commit = conn.pragma_update(None, "synchronous", "NORMAL").is_err();
    let sync = |conn: &Connection| {
        if synced_by_commit {
            Ok(())
        } else {
            sync_log(conn)
        }
    };
    let mut batch: Vec<(Job, bool)> = Vec::with_capacity(MAX_BATCH);
    let mut closing = None;
    let mut alone = None;
    // A commit's log is not fsynced yet.
    let mut unsynced = false;
    loop {
        let first = if unsynced {
            match rx.recv_timeout(LAZY_SYNC) {
                Ok(w) => w,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // Tried once: a disk that fails it is logged once, and
                    // the next durable write's own sync tries again.
                    quietly(sync(&conn));
                    unsynced = false;
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    quietly(sync(&conn));
                    return;
                }
            }
        } else {
            match rx.recv() {
                Ok(w) => w,
                Err(_) => return,
            }
        };
        let mut next = Some(first);
        while let Some(work) = next.take() {
            match work {
                Work::Write { job, lazy } => batch.push((job, lazy)),
                Work::Close(done) => {
                    closing = Some(done);
                    break;
                }
                Work::Alone(job) => {
                    alone = Some(job);
                    break;
                }
                #[cfg(feature = "fault-hooks")]
                Work::Crash => panic!("fault hook: the queue's writer panics"),
            }
            if batch.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            unsynced = commit_batch(&mut conn, &mut batch, sync, unsynced);
        }
        if let Some(job) = alone.take() {
            batch.push((job, false));
            unsynced = commit_batch(&mut conn, &mut batch, sync, unsynced);
        }
        if let Some(done) = closing.take() {
            if unsynced {
                quietly(sync(&conn));
            }
            // Leaves the database file complete (an empty log), so that a
            // copy of it alone, or a read from a read-only file system,
            // sees every commit. Only the daemon's own store: another
            // process (`send --no-wait`) must not hold up the running
            // daemon's writes with a checkpoint.
            if owner && let Err(e) = conn.pragma_update(None, "wal_checkpoint", "TRUNCATE") {
                tracing::warn!(error = %e, "the queue store's log could not be merged at close");
            }
            let _ = done.send(());
            return;
        }
    }
}

/// Commits `batch` and answers it: its lazy writes at once, the others
/// after `sync` made the log durable. A batch that changed no row wrote
/// nothing to the log, and needs no fsync unless an earlier commit's log
/// is still unsynced (`unsynced`). Whether the log is left unsynced.
fn commit_batch(
    conn: &mut Connection,
    batch: &mut Vec<(Job, bool)>,
    sync: impl FnOnce(&Connection) -> Result<(), StoreError>,
    unsynced: bool,
) -> bool {
    let before = conn.total_changes();
    let (commit, answers) = run_batch(conn, batch);
    let wrote = commit.is_ok() && conn.total_changes() != before;
    let mut durable = Vec::with_capacity(answers.len());
    for (answer, lazy) in answers {
        if lazy || commit.is_err() {
            answer(&commit);
        } else {
            durable.push(answer);
        }
    }
    if durable.is_empty() {
        return unsynced || wrote;
    }
    let synced = if wrote || unsynced {
        sync(conn)
    } else {
        Ok(())
    };
    for answer in durable {
        answer(&synced);
    }
    synced.is_err()
}

/// Whether a settle may be answered before its fsync: the relay took the
/// message, so it was marked, and losing the outcome to a power loss leaves
/// it `unknown`, never resent. A deferred or refused outcome, or a Sent
/// copy still due, must be durable before it is answered.
fn lazy(s: &Settle) -> bool {
    matches!(s.state, State::Sent | State::Partial) && !s.copy
}

/// Moves the suppression list's version and records the change of
/// `addresses` (`None`: the whole list), keeping the changes of the last
/// [`super::SUPPRESSION_VERSIONS_KEPT`] versions.
fn log_suppression(
    c: &Connection,
    addresses: &[Option<&str>],
    added: bool,
) -> rusqlite::Result<()> {
    let v: i64 = c.query_row(
        "UPDATE suppression_version SET v = v + 1 RETURNING v",
        [],
        |r| r.get(0),
    )?;
    let mut insert = c.prepare_cached(
        "INSERT INTO suppression_changes (version, address, added) VALUES (?1, ?2, ?3)",
    )?;
    for a in addresses {
        insert.execute(params![v, a, added])?;
    }
    c.prepare_cached("DELETE FROM suppression_changes WHERE version <= ?1")?
        .execute([v - super::SUPPRESSION_VERSIONS_KEPT])?;
    Ok(())
}

/// How the writer makes the write-ahead log durable.
type SyncLog = Box<dyn Fn(&Connection) -> Result<(), StoreError> + Send>;

/// Fsyncs the write-ahead log. SQLite itself, even with
/// `synchronous=NORMAL`, syncs the log's header whenever it starts the log
/// afresh, and the log's folder with the first such sync after it opened
/// it, before it writes a frame; this covers the frames. A commit whose log
/// could not be synced was written, and a start after a crash replays it:
/// its writes may be stored, so they are unconfirmed rather than refused.
fn fsync_log(conn: &Connection) -> Result<(), StoreError> {
    let Some(path) = conn.path() else {
        return Ok(());
    };
    std::fs::OpenOptions::new()
        .write(true)
        .open(beside(Path::new(path), "-wal"))
        .and_then(|f| f.sync_data())
        .map_err(|e| StoreError::Unconfirmed(format!("the log was written but not synced ({e})")))
}

/// The outcome of a sync that no write waits on, logged if it failed.
fn quietly(synced: Result<(), StoreError>) {
    if let Err(e) = synced {
        tracing::warn!(error = %e, "the queue store's log could not be synced");
    }
}

/// Runs and commits one batch; the commit's outcome, and each write's
/// answer with whether it is lazy.
fn run_batch(
    conn: &mut Connection,
    batch: &mut Vec<(Job, bool)>,
) -> (Result<(), StoreError>, Vec<(Answer, bool)>) {
    let now = now_millis();
    let mut answers: Vec<(Answer, bool)> = Vec::with_capacity(batch.len());
    let begun = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(unavailable);
    let commit = match begun {
        Ok(tx) => {
            let moves = Cell::new(Moves::default());
            let write = Tx {
                conn: &tx,
                moves: &moves,
            };
            // Once set, the batch is rolled back and the writes after it
            // are not run.
            let mut undone: Option<StoreError> = None;
            // SQLite rolls the transaction back itself on some failures (a
            // full disk, an I/O error): what follows must not run outside
            // it, where each statement would commit on its own.
            let rolled_back = |undone: &mut Option<StoreError>| {
                if undone.is_none() && tx.is_autocommit() {
                    *undone = Some(unavailable("SQLite rolled the transaction back"));
                }
            };
            for (job, lazy) in batch.drain(..) {
                rolled_back(&mut undone);
                if let Some(e) = &undone {
                    answers.push((job(Err(e), now).0, lazy));
                    continue;
                }
                let (answer, failed) = job(Ok(&write), now);
                answers.push((answer, lazy));
                undone = failed.map(|e| {
                    StoreError::Unavailable(format!(
                        "a write in the same transaction failed part-way, so none was stored ({e})"
                    ))
                });
            }
            rolled_back(&mut undone);
            if undone.is_none()
                && let Err(e) = add_moves(&tx, moves.get())
            {
                undone = Some(unavailable(e));
            }
            match undone {
                None => tx.commit().map_err(commit_error),
                Some(e) => {
                    // Dropping the transaction rolls it back.
                    drop(tx);
                    Err(e)
                }
            }
        }
        Err(err) => {
            for (job, lazy) in batch.drain(..) {
                answers.push((job(Err(&err), now).0, lazy));
            }
            Err(err)
        }
    };
    if let Err(e) = &commit {
        tracing::error!(error = %e, "the queue store could not commit");
    }
    (commit, answers)
}

/// A commit whose fsync failed had written its frames to the log, and a
/// start after a crash replays them: its writes may be stored, so they are
/// unconfirmed rather than refused. Every other failure undid the batch.
fn commit_error(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_IOERR_FSYNC =>
        {
            StoreError::Unconfirmed(format!("the log was written but not synced ({e})"))
        }
        _ => unavailable(e),
    }
}

/// Runs one write in the batch's transaction. Each statement is atomic, so
/// a write that fails before it changed a row leaves the others in the
/// batch to commit. One that fails after (in a later statement of several)
/// returns its error a second time: the batch is then rolled back whole, and
/// every write in it fails. A savepoint per write would undo only its own,
/// but it copies each page the write touches, a tenth of the writer's work,
/// for a failure (a full disk, an I/O error) that would most likely fail
/// the others anyway.
fn run_write<T>(
    c: &Tx<'_>,
    f: impl FnOnce(&Tx<'_>) -> rusqlite::Result<T>,
) -> (Result<T, StoreError>, Option<StoreError>) {
    let before = c.total_changes();
    let moves = c.moves.get();
    match f(c) {
        Ok(v) => (Ok(v), None),
        Err(e) => {
            c.moves.set(moves);
            let e = unavailable(e);
            let undo = (c.total_changes() != before).then(|| e.clone());
            (Err(e), undo)
        }
    }
}

/// Marks message `id` as committing; false, writing nothing, when it was
/// cancelled meanwhile ([`cancelled_in_round`]).
fn mark(c: &Tx<'_>, id: &str, now: Millis) -> rusqlite::Result<bool> {
    let (seq, state) = seq_and_state(c, id)?;
    if state == State::Cancelled {
        return Ok(false);
    }
    c.prepare_cached(&format!(
        "UPDATE messages SET state = 'sending', committing = 1, updated_at = ?2, {}
         WHERE seq = ?1",
        append_history(3)
    ))?
    .execute(params![seq, now, entry(State::Sending, now)])?;
    c.moved(Some(state), State::Sending, 1);
    Ok(true)
}

/// The ids of the messages due by ?1, oldest due first, ?2 at most. Read
/// through `messages_due` by name: left to itself, SQLite's planner takes
/// `messages_state` for the `state IN (…)` and sorts every waiting message
/// to return the first few, a read of the whole backlog on each poll.
const DUE_SQL: &str = "SELECT message_id FROM messages INDEXED BY messages_due
                        WHERE state IN ('queued', 'scheduled') AND next_attempt_at <= ?1
                        ORDER BY next_attempt_at LIMIT ?2";

/// The due messages of high priority, from their own index (empty but
/// while some wait), which [`Store::due`] takes before [`DUE_SQL`]'s.
const DUE_HIGH_SQL: &str = "SELECT message_id FROM messages INDEXED BY messages_due_high
                             WHERE state IN ('queued', 'scheduled') AND priority = 1
                               AND next_attempt_at <= ?1
                             ORDER BY next_attempt_at LIMIT ?2";

/// The earliest due time of a waiting message, from `messages_due` (see
/// [`DUE_SQL`]).
const NEXT_DUE_SQL: &str = "SELECT MIN(next_attempt_at) FROM messages INDEXED BY messages_due
                             WHERE state IN ('queued', 'scheduled')";

/// When the oldest queued message was accepted: the first entry of
/// `messages_queued_at`, named as [`DUE_SQL`] names its index (SQLite's
/// planner takes `messages_state` and reads every queued message).
const OLDEST_QUEUED_SQL: &str = "SELECT MIN(queued_at) FROM messages INDEXED BY messages_queued_at
                                  WHERE state = 'queued'";

/// The next retry of a deferred message: the first entry of
/// `messages_retry` (see [`OLDEST_QUEUED_SQL`]).
const NEXT_RETRY_SQL: &str = "SELECT MIN(next_attempt_at) FROM messages INDEXED BY messages_retry
                              WHERE state = 'queued' AND rounds > 0";

/// The messages a round holds, read at start through `messages_state`
/// (whose rows leave out `sent`: the second term tells SQLite so).
const SENDING_SQL: &str = "SELECT seq, committing, message_id FROM messages
                            WHERE state = 'sending' AND state <> 'sent'";

/// A waiting message with its body ([`pending_row`]).
const LOAD_SQL: &str = "SELECT message_id, state, mail_from, rcpt, body, prefer, due_at, rounds,
                               caller, meta, relays, accepted, rejected, sent_copy IS NOT NULL,
                               max_age, priority
                          FROM messages WHERE message_id = ?1 AND body IS NOT NULL";

/// A row of [`LOAD_SQL`].
fn pending_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Pending> {
    let body: Vec<u8> = r.get(4)?;
    let accepted = lines(r.get(11)?);
    let rejected = rows::rejected(r.get(12)?);
    Ok(Pending {
        message_id: r.get(0)?,
        state: rows::state(&r.get::<_, String>(1)?),
        from: r.get(2)?,
        to: lines(r.get(3)?),
        accepted,
        rejected,
        copied: r.get(13)?,
        bytes: Arc::from(body),
        prefer: r.get(5)?,
        due_at: r.get(6)?,
        rounds: r.get(7)?,
        caller: r.get(8)?,
        meta: r.get(9)?,
        only: r
            .get::<_, Option<String>>(10)?
            .map(|s| Arc::from(lines(Some(s)))),
        max_age: r.get(14)?,
        priority: rows::priority(r.get(15)?),
    })
}

/// The row and state of message `id`; `QueryReturnedNoRows` if there is none.
fn seq_and_state(c: &Connection, id: &str) -> rusqlite::Result<(i64, State)> {
    c.prepare_cached("SELECT seq, state FROM messages WHERE message_id = ?1")?
        .query_row([id], |r| {
            Ok((r.get(0)?, rows::state(&r.get::<_, String>(1)?)))
        })
}

fn purge(c: &Connection, finished: Millis, keys: Millis, limit: usize) -> rusqlite::Result<Purged> {
    let limit = limit as i64;
    let seqs = c
        .prepare_cached(
            "SELECT seq FROM messages WHERE finished_at < ?1 ORDER BY finished_at LIMIT ?2",
        )?
        .query_map(params![finished, limit], |r| r.get::<_, i64>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut messages = c.prepare_cached("DELETE FROM messages WHERE seq = ?1")?;
    for seq in &seqs {
        messages.execute([seq])?;
    }
    let keys = c
        .prepare_cached(
            "DELETE FROM idempotency WHERE key IN
                (SELECT key FROM idempotency WHERE created_at < ?1 ORDER BY created_at LIMIT ?2)",
        )?
        .execute(params![keys, limit])?;
    Ok(Purged {
        messages: seqs.len() as u64,
        keys: keys as u64,
    })
}

/// The assignment that appends parameter `?n` (an [`entry`]) to a message's
/// history (`state@millis`, `;` between), made in the statement that changes
/// the state: a change costs no row elsewhere.
fn append_history(n: usize) -> String {
    format!("history = history || CASE WHEN history = '' THEN '' ELSE ';' END || ?{n}")
}

/// Appends a state change to the history of the message at `seq`.
fn event(c: &Connection, seq: i64, state: State, at: Millis) -> rusqlite::Result<()> {
    c.prepare_cached(&format!(
        "UPDATE messages SET {} WHERE seq = ?1",
        append_history(2)
    ))?
    .execute(params![seq, entry(state, at)])?;
    Ok(())
}

/// Stores `ms` (or finds their idempotency keys), and counts the messages
/// stored. Schema version 7 dropped the trigger that counted each insert:
/// this is the only insert.
fn accept_all(c: &Tx<'_>, ms: &[NewMessage], now: Millis) -> rusqlite::Result<Vec<Accepted>> {
    let out = ms
        .iter()
        .map(|m| accept(c, m, now))
        .collect::<rusqlite::Result<Vec<_>>>()?;
    for a in &out {
        if let Accepted::Stored(state) = a {
            c.moved(None, *state, 1);
        }
    }
    Ok(out)
}

/// What each of `ms` would get for its key ([`super::batch_conflicts`]).
fn conflicts(c: &Connection, ms: &[NewMessage]) -> rusqlite::Result<Vec<Accepted>> {
    super::batch_conflicts(ms, |m| key_seen(c, m))
}

/// The message `m`'s idempotency key already names: a replay (same
/// content) or a conflict; none for a new key or no key.
fn key_seen(c: &Connection, m: &NewMessage) -> rusqlite::Result<Option<Accepted>> {
    let Some((key, hash)) = m.scoped_key() else {
        return Ok(None);
    };
    let seen: Option<(String, Vec<u8>)> = c
        .prepare_cached("SELECT message_id, hash FROM idempotency WHERE key = ?1")?
        .query_row([key], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(seen.map(|(id, seen)| match seen == hash[..] {
        true => Accepted::Replay(id),
        false => Accepted::Conflict(id),
    }))
}

fn accept(c: &Connection, m: &NewMessage, now: Millis) -> rusqlite::Result<Accepted> {
    if let Some(seen) = key_seen(c, m)? {
        return Ok(seen);
    }
    if let Some((key, hash)) = m.scoped_key() {
        c.prepare_cached(
            "INSERT INTO idempotency (key, message_id, hash, created_at) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![key, m.message_id, &hash[..], now])?;
    }
    let state = m.initial_state(now);
    insert(c, m, state, false, &entry(state, now), m.queued_at, true)?;
    Ok(Accepted::Stored(state))
}

/// Inserts the row of `m` in `state`, with `history` and `updated_at`;
/// `committing` stores it already marked; `body`: with its bytes.
fn insert(
    c: &Connection,
    m: &NewMessage,
    state: State,
    committing: bool,
    history: &str,
    updated_at: Millis,
    body: bool,
) -> rusqlite::Result<()> {
    let next = m.hold.as_ref().map_or(m.due_at, |h| h.until);
    c.prepare_cached(
        "INSERT INTO messages (message_id, state, mail_from, rcpt, size, body, prefer, idem_key,
                               queued_at, due_at, next_attempt_at, updated_at, history,
                               caller, meta, held_hash, relays, batch, committing, tag, max_age,
                               priority)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?12, ?18, ?11, ?13, ?14, ?15, ?16, ?17,
                 ?19, ?20, ?21, ?22)",
    )?
    .execute(params![
        m.message_id,
        state.as_str(),
        m.from,
        m.to.join("\n"),
        m.bytes.len() as i64,
        body.then_some(&m.bytes[..]),
        m.prefer,
        m.idempotency.as_ref().map(|(k, _)| k),
        m.queued_at,
        m.due_at,
        history,
        next,
        m.caller,
        m.meta,
        m.hold.as_ref().map(|h| &h.hash[..]),
        m.only.as_ref().map(|o| o.join("\n")),
        m.batch,
        updated_at,
        committing,
        m.tag,
        m.max_age,
        rows::priority_column(m.priority),
    ])?;
    Ok(())
}

/// Adds what a transaction's writes moved to the counts, before its commit.
fn add_moves(c: &Connection, moves: Moves) -> rusqlite::Result<()> {
    for (state, n) in State::ALL.into_iter().zip(moves.0) {
        if n != 0 {
            add_count(c, state, n)?;
        }
    }
    Ok(())
}

/// Adds `n` messages to the count of `state`.
fn add_count(c: &Connection, state: State, n: i64) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO counts (state, n) VALUES (?1, ?2)
         ON CONFLICT (state) DO UPDATE SET n = n + excluded.n",
    )?
    .execute(params![state.as_str(), n])?;
    Ok(())
}

/// Stores a new message (without a key) already committing to a relay:
/// the row [`accept`] and then [`mark`] would leave, in one insert, but
/// without its bytes. A marked message is never sent again from the store,
/// and most rounds end `sent`, which drops the bytes: they are written only
/// by a settle whose outcome keeps them ([`Settle::body`]). A crash before
/// that leaves the message `unknown` with no bytes, which cannot be retried.
fn accept_committing(c: &Tx<'_>, m: &NewMessage, now: Millis) -> rusqlite::Result<()> {
    let history = format!(
        "{};{}",
        entry(State::Queued, m.queued_at),
        entry(State::Sending, now)
    );
    insert(c, m, State::Sending, true, &history, now, false)?;
    c.moved(None, State::Sending, 1);
    Ok(())
}

/// Records the outcome of a round of message `id`; false, writing
/// nothing, when it was cancelled meanwhile ([`cancelled_in_round`]).
fn settle(c: &Tx<'_>, id: &str, s: &Settle, now: Millis) -> rusqlite::Result<bool> {
    let finished = s.state.is_final().then_some(now);
    let keep_body = s.state.keeps_body() || s.copy;
    let rejected = rows::rejected_text(&s.rejected);
    // Found first, then changed by its rowid: an `UPDATE … RETURNING` costs
    // a temporary table per statement.
    let (seq, state) = seq_and_state(c, id)?;
    if state == State::Cancelled {
        return Ok(false);
    }
    c.prepare_cached(&format!(
        "UPDATE messages SET state = ?2, updated_at = ?3, finished_at = ?4, committing = 0,
            rounds = rounds + 1, relay = COALESCE(?5, relay), accepted = ?6, rejected = ?7,
            reason = ?8, note = ?9, next_attempt_at = ?10,
            body = CASE WHEN ?11 OR sent_copy = 'pending' THEN COALESCE(body, ?14) ELSE NULL END,
            sent_copy = CASE WHEN ?13 THEN 'pending' ELSE sent_copy END,
            copy_relay = CASE WHEN ?13 THEN ?5 ELSE copy_relay END,
            attempt_log = COALESCE(attempt_log || char(10) || ?15, ?15, attempt_log), {}
         WHERE seq = ?1",
        append_history(12)
    ))?
    .execute(params![
        seq,
        s.state.as_str(),
        now,
        finished,
        s.relay,
        s.accepted.join("\n"),
        rejected,
        s.reason,
        s.note,
        s.next_attempt_at,
        keep_body,
        entry(s.state, now),
        s.copy,
        s.body.as_deref(),
        rows::attempts_text(&s.attempts),
    ])?;
    c.moved(Some(state), s.state, 1);
    Ok(true)
}

fn cancel(c: &Tx<'_>, id: &str, now: Millis) -> rusqlite::Result<Cancel> {
    let Some((seq, state)) = seq_and_state(c, id).optional()? else {
        return Ok(Cancel::NotFound);
    };
    if !matches!(state, State::Queued | State::Scheduled | State::Held) {
        return Ok(Cancel::Refused(state));
    }
    c.execute(
        "UPDATE messages SET state = 'cancelled', updated_at = ?2, finished_at = ?2,
                next_attempt_at = NULL,
                body = CASE WHEN sent_copy = 'pending' THEN body ELSE NULL END
          WHERE seq = ?1",
        params![seq, now],
    )?;
    event(c, seq, State::Cancelled, now)?;
    c.moved(Some(state), State::Cancelled, 1);
    Ok(Cancel::Cancelled)
}

fn decide(c: &Tx<'_>, id: &str, d: &Decision, now: Millis) -> rusqlite::Result<Decided> {
    let row: Option<(i64, String, Option<Vec<u8>>, Millis)> = c
        .query_row(
            "SELECT seq, state, held_hash, due_at FROM messages WHERE message_id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((seq, state, held_hash, due_at)) = row else {
        return Ok(Decided::NotFound);
    };
    let state = rows::state(&state);
    let next = match rows::decision(state, held_hash.as_deref(), d, due_at, now) {
        Ok(next) => next,
        Err(answer) => return Ok(answer),
    };
    let finished = (next == State::Rejected).then_some(now);
    c.prepare_cached(&format!(
        "UPDATE messages SET state = ?2, updated_at = ?3, finished_at = ?4, decided_by = ?5,
                next_attempt_at = CASE WHEN ?6 THEN MAX(due_at, ?3) ELSE NULL END,
                body = CASE WHEN ?6 THEN body ELSE NULL END,
                reason = CASE WHEN ?6 THEN NULL ELSE 'rejected_by_approver' END, {}
         WHERE seq = ?1",
        append_history(7)
    ))?
    .execute(params![
        seq,
        next.as_str(),
        now,
        finished,
        d.by,
        d.approve,
        entry(next, now)
    ])?;
    c.moved(Some(state), next, 1);
    Ok(rows::decided(next))
}

fn retry(c: &Tx<'_>, id: &str, force: bool, now: Millis) -> rusqlite::Result<Retry> {
    let row: Option<(i64, String, Option<String>, bool)> = c
        .query_row(
            "SELECT seq, state, reason, body IS NOT NULL FROM messages WHERE message_id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((seq, state, reason, has_body)) = row else {
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
    c.prepare_cached(&format!(
        "UPDATE messages SET state = 'queued', updated_at = ?2, finished_at = NULL, due_at = ?2,
                next_attempt_at = ?2, committing = 0, rounds = 0, reason = NULL, note = NULL, {}
         WHERE seq = ?1",
        append_history(3)
    ))?
    .execute(params![seq, now, entry(State::Queued, now)])?;
    c.moved(Some(state), State::Queued, 1);
    Ok(Retry::Queued)
}

fn expire_held(c: &Tx<'_>, now: Millis) -> rusqlite::Result<Vec<String>> {
    let expired: Vec<String> = c
        .prepare_cached(&format!(
            "UPDATE messages SET state = 'expired', updated_at = ?1, finished_at = ?1, body = NULL,
                next_attempt_at = NULL, reason = 'approval_expired',
                note = 'nobody approved it before its approval deadline', {}
         WHERE state = 'held' AND state <> 'sent' AND next_attempt_at <= ?1
         RETURNING message_id",
            append_history(2)
        ))?
        .query_map(params![now, entry(State::Expired, now)], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    c.moved(Some(State::Held), State::Expired, expired.len() as i64);
    Ok(expired)
}

fn recover(c: &Tx<'_>, now: Millis) -> rusqlite::Result<Recovered> {
    let mut out = Recovered::default();
    let rows: Vec<(i64, bool, String)> = c
        .prepare(SENDING_SQL)?
        .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? != 0, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (seq, committing, id) in rows {
        if committing {
            c.execute(
                "UPDATE messages SET state = 'unknown', committing = 0, updated_at = ?2, finished_at = ?2,
                        reason = NULL,
                        note = 'mailmux stopped after the message was handed to a relay; it may have been delivered and was not sent again'
                 WHERE seq = ?1",
                params![seq, now],
            )?;
            event(c, seq, State::Unknown, now)?;
            c.moved(Some(State::Sending), State::Unknown, 1);
            out.unknown.push(id);
        } else {
            c.execute(
                "UPDATE messages SET state = 'queued', updated_at = ?2, next_attempt_at = ?2 WHERE seq = ?1",
                params![seq, now],
            )?;
            event(c, seq, State::Queued, now)?;
            c.moved(Some(State::Sending), State::Queued, 1);
            out.requeued += 1;
        }
    }
    Ok(out)
}

/// The entry of the suppression list in a row's columns from `first` on:
/// address, reason, detail, message_id, created_at.
fn suppression_at(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Suppression> {
    Ok(Suppression {
        address: r.get(first)?,
        reason: r.get(first + 1)?,
        detail: r.get(first + 2)?,
        message_id: r.get(first + 3)?,
        at: r.get(first + 4)?,
    })
}

/// One page of the suppression list ([`Store::suppression_page`]): the
/// entries after `?1` by address, holding `?2` when it is not NULL, at
/// most `?3` (-1: all).
const SUPPRESSION_PAGE_SQL: &str =
    "SELECT address, reason, detail, message_id, created_at FROM suppressions
      WHERE address > ?1 AND (?2 IS NULL OR instr(address, ?2) > 0)
      ORDER BY address LIMIT ?3";

#[async_trait::async_trait]
impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn durable(&self) -> bool {
        true
    }

    fn alive(&self) -> bool {
        self.writing.load(Ordering::Acquire)
    }

    #[cfg(feature = "fault-hooks")]
    fn stop_writer(&self) {
        let _ = self.writes.send(Work::Crash);
    }

    async fn accept(&self, m: NewMessage) -> Result<Accepted, StoreError> {
        self.write(move |c, now| {
            let mut stored = accept_all(c, std::slice::from_ref(&m), now)?;
            Ok(stored.remove(0))
        })
        .await
    }

    async fn accept_many(
        &self,
        ms: Vec<NewMessage>,
        atomic: bool,
    ) -> Result<Vec<Accepted>, StoreError> {
        self.write(move |c, now| {
            // Checked before anything is written: the writer's transaction
            // holds other writes too, and no other writer runs meanwhile.
            if atomic && let (out, false) = super::atomic_answers(conflicts(c, &ms)?) {
                return Ok(out);
            }
            accept_all(c, &ms, now)
        })
        .await
    }

    async fn accept_stream(
        &self,
        mut feed: tokio::sync::mpsc::Receiver<Feed>,
        atomic: bool,
    ) -> Result<Vec<Accepted>, StoreError> {
        self.send_job(Work::Alone, move |c, now| {
            let fed = run_write(c, |c| {
                // The transaction is this batch's alone: an atomic batch
                // with a conflict is undone to here, and commits nothing.
                let moves = c.moves.get();
                if atomic {
                    c.execute_batch("SAVEPOINT atomic_batch")?;
                }
                let mut out = Vec::new();
                // The writer thread waits here for the caller's next
                // message, holding the store's one write transaction.
                while let Some(fed) = feed.blocking_recv() {
                    match fed {
                        Feed::Message(m) => {
                            // Stored as of when it came: it may have been
                            // composed after the transaction began.
                            let now = now.max(now_millis());
                            out.extend(accept_all(c, std::slice::from_ref(&m), now)?);
                        }
                        Feed::Commit if atomic => {
                            let (out, store) = super::atomic_answers(out);
                            if !store {
                                c.execute_batch("ROLLBACK TO atomic_batch")?;
                                c.moves.set(moves);
                            }
                            c.execute_batch("RELEASE atomic_batch")?;
                            return Ok(Some(out));
                        }
                        Feed::Commit => return Ok(Some(out)),
                    }
                }
                Ok(None)
            });
            match fed {
                (Ok(Some(out)), undo) => (Ok(out), undo),
                // Abandoned: the transaction is rolled back.
                (Ok(None), _) => (Err(abandoned()), Some(abandoned())),
                (Err(e), undo) => (Err(e), undo),
            }
        })
        .await
    }

    async fn mark(&self, message_id: &str) -> Result<(), StoreError> {
        let id = message_id.to_owned();
        match self.write(move |c, now| mark(c, &id, now)).await? {
            true => Ok(()),
            false => Err(cancelled_in_round(message_id)),
        }
    }

    async fn settle(&self, message_id: &str, s: Settle) -> Result<(), StoreError> {
        let id = message_id.to_owned();
        match self
            .write_with(lazy(&s), move |c, now| settle(c, &id, &s, now))
            .await?
        {
            true => Ok(()),
            false => Err(cancelled_in_round(message_id)),
        }
    }

    async fn accept_marked(&self, m: NewMessage) -> Result<(), StoreError> {
        self.write(move |c, now| accept_committing(c, &m, now))
            .await
    }

    async fn accept_settled(&self, m: NewMessage, s: Settle) -> Result<(), StoreError> {
        self.write(move |c, now| {
            accept_all(c, std::slice::from_ref(&m), now)?;
            settle(c, &m.message_id, &s, now).map(drop)
        })
        .await
    }

    async fn accept_settled_unconfirmed(
        &self,
        m: NewMessage,
        mut s: Settle,
    ) -> Result<(), StoreError> {
        // Kept by the settle only where its outcome keeps them.
        s.body = Some(m.bytes.clone());
        self.write(move |c, now| {
            // One daemon owns the file: a row of this new message in
            // `sending` is the one its unconfirmed mark left.
            if !matches!(
                seq_and_state(c, &m.message_id).optional()?,
                Some((_, State::Sending))
            ) {
                accept_all(c, std::slice::from_ref(&m), now)?;
            }
            settle(c, &m.message_id, &s, now).map(drop)
        })
        .await
    }

    async fn cancel(&self, message_id: &str) -> Result<Cancel, StoreError> {
        let id = message_id.to_owned();
        self.write(move |c, now| cancel(c, &id, now)).await
    }

    async fn note_copy(&self, message_id: &str, outcome: &str) -> Result<(), StoreError> {
        let id = message_id.to_owned();
        let outcome = outcome.to_owned();
        self.write(move |c, _| {
            c.prepare_cached(&rows::note_copy_sql('?'))?
                .execute(params![id, outcome])
                .map(|_| ())
        })
        .await
    }

    async fn note_reports(
        &self,
        message_id: &str,
        reports: Vec<ReportRecord>,
    ) -> Result<Vec<ReportRecord>, StoreError> {
        let id = message_id.to_owned();
        self.write(move |c, _| {
            let old: Option<Option<String>> = c
                .prepare_cached("SELECT reports FROM messages WHERE message_id = ?1")?
                .query_row([&id], |r| r.get(0))
                .optional()?;
            let Some((merged, added)) = old.and_then(|old| rows::merged_reports(old, &reports))
            else {
                return Ok(Vec::new());
            };
            c.prepare_cached("UPDATE messages SET reports = ?2 WHERE message_id = ?1")?
                .execute(params![id, merged])?;
            Ok(added)
        })
        .await
    }

    async fn pending_copies(&self, before: Millis, mine: bool) -> Result<Vec<CopyDue>, StoreError> {
        // One daemon owns the file: every pending copy is its own.
        if !mine {
            return Ok(Vec::new());
        }
        self.read_delivery(move |c| {
            c.prepare_cached(
                "SELECT message_id, COALESCE(copy_relay, relay, '') FROM messages
                  WHERE sent_copy = 'pending' AND COALESCE(finished_at, updated_at) < ?1
                  ORDER BY seq",
            )?
            .query_map([before], |r| {
                Ok(CopyDue {
                    message_id: r.get(0)?,
                    relay: r.get(1)?,
                })
            })?
            .collect()
        })
        .await
    }

    async fn decide(&self, message_id: &str, d: Decision) -> Result<Decided, StoreError> {
        let id = message_id.to_owned();
        self.write(move |c, now| decide(c, &id, &d, now)).await
    }

    async fn expire_held(&self, now: Millis) -> Result<Vec<String>, StoreError> {
        self.write(move |c, _| expire_held(c, now)).await
    }

    async fn retry(&self, message_id: &str, force: bool) -> Result<Retry, StoreError> {
        let id = message_id.to_owned();
        self.write(move |c, now| retry(c, &id, force, now)).await
    }

    async fn due(&self, now: Millis, limit: usize) -> Result<Vec<String>, StoreError> {
        self.read_delivery(move |c| {
            let mut ids: Vec<String> = c
                .prepare_cached(DUE_HIGH_SQL)?
                .query_map(params![now, limit as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let high = ids.len();
            let rest = (limit - high) as i64;
            if rest > 0 {
                let mut stmt = c.prepare_cached(DUE_SQL)?;
                for id in
                    stmt.query_map(params![now, rest + high as i64], |r| r.get::<_, String>(0))?
                {
                    let id = id?;
                    // The high ones are in both.
                    if ids.len() < limit && !ids[..high].contains(&id) {
                        ids.push(id);
                    }
                }
            }
            Ok(ids)
        })
        .await
    }

    async fn next_due(&self) -> Result<Option<Millis>, StoreError> {
        self.read_delivery(|c| c.query_row(NEXT_DUE_SQL, [], |r| r.get(0)))
            .await
    }

    async fn load(&self, message_id: &str) -> Result<Option<Pending>, StoreError> {
        let id = message_id.to_owned();
        self.read_delivery(move |c| {
            c.prepare_cached(LOAD_SQL)?
                .query_row([id], pending_row)
                .optional()
        })
        .await
    }

    async fn load_many(&self, ids: &[String], max_bytes: u64) -> Result<Vec<Pending>, StoreError> {
        let ids = ids.to_vec();
        self.read_delivery(move |c| {
            // One read transaction: the pages of the first row are still
            // cached for the next (a new transaction after another
            // connection's commit starts from an empty page cache).
            let tx = c.unchecked_transaction()?;
            let mut stmt = tx.prepare_cached(LOAD_SQL)?;
            let mut out = Vec::with_capacity(ids.len());
            let mut total = 0u64;
            for id in &ids {
                if total >= max_bytes {
                    break;
                }
                if let Some(p) = stmt.query_row([id], pending_row).optional()? {
                    total += p.bytes.len() as u64;
                    out.push(p);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn get(&self, message_id: &str) -> Result<Option<Record>, StoreError> {
        let id = message_id.to_owned();
        self.read(move |c| get(c, &id)).await
    }

    fn others_write(&self) -> bool {
        true
    }

    async fn prints(&self, ids: &[String]) -> Result<Vec<(String, Print)>, StoreError> {
        let ids = serde_json::to_string(ids).unwrap_or_else(|_| "[]".into());
        self.read(move |c| {
            c.prepare_cached(
                "SELECT message_id, state, COALESCE(length(reports), 0) FROM messages
                  WHERE message_id IN (SELECT value FROM json_each(?1))",
            )?
            .query_map([ids], |r| {
                let state: String = r.get(1)?;
                Ok((r.get(0)?, (rows::state(&state), r.get::<_, i64>(2)? as u64)))
            })?
            .collect()
        })
        .await
    }

    async fn find_key(
        &self,
        caller: Option<&str>,
        key: &str,
    ) -> Result<Option<String>, StoreError> {
        let key = super::scoped_key(caller, key);
        self.read(move |c| {
            c.query_row(
                "SELECT message_id FROM idempotency WHERE key = ?1",
                [key],
                |r| r.get(0),
            )
            .optional()
        })
        .await
    }

    async fn list(
        &self,
        filter: &Filter,
        limit: usize,
        cursor: Option<i64>,
    ) -> Result<(Vec<Summary>, Option<i64>), StoreError> {
        let sql = rows::list_sql('?', filter);
        let searched = filter.searches().then(|| rows::searched_sql('?', filter));
        let bound = filter_params(filter, cursor.unwrap_or(i64::MAX), rows::page_rows(limit));
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&sql)?;
            let params = params_of(&stmt, &bound);
            let rows: Vec<(i64, Summary)> = stmt
                .query_map(params, |r| {
                    Ok((
                        r.get(0)?,
                        Summary {
                            message_id: r.get(1)?,
                            state: rows::state(&r.get::<_, String>(2)?),
                            from: r.get(3)?,
                            to: lines(r.get(4)?),
                            queued_at: r.get(5)?,
                            updated_at: r.get(6)?,
                            relay: r.get(7)?,
                            caller: r.get(8)?,
                            node: None,
                            batch: r.get(9)?,
                            tag: r.get(10)?,
                            priority: rows::priority(r.get(11)?),
                        },
                    ))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let more = rows.len() > limit;
            let page: Vec<(i64, Summary)> = rows.into_iter().take(limit).collect();
            let searched = match searched {
                Some(sql) if !more => {
                    let mut stmt = c.prepare_cached(&sql)?;
                    let params = params_of(&stmt, &bound);
                    Some(stmt.query_row(params, |r| Ok((r.get(0)?, r.get(1)?)))?)
                }
                _ => None,
            };
            let next = rows::next_cursor(more, page.last().map(|(s, _)| *s), searched);
            Ok((page.into_iter().map(|(_, s)| s).collect(), next))
        })
        .await
    }

    async fn count(&self, filter: &Filter) -> Result<Vec<(State, u64)>, StoreError> {
        let sql = rows::count_sql('?', filter);
        let bound = filter_params(filter, i64::MAX, State::ALL.len() as i64);
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&sql)?;
            let params = params_of(&stmt, &bound);
            stmt.query_map(params, |r| {
                Ok((
                    rows::state(&r.get::<_, String>(0)?),
                    r.get::<_, i64>(1)? as u64,
                ))
            })?
            .collect()
        })
        .await
    }

    async fn stats(&self) -> Result<Stats, StoreError> {
        self.read(|c| {
            let counts = counts(c)?;
            let oldest_queued_at = c.query_row(OLDEST_QUEUED_SQL, [], |r| r.get(0))?;
            let next_retry_at = c.query_row(NEXT_RETRY_SQL, [], |r| r.get(0))?;
            // Through the partial index of pending copies.
            let copies_pending = c.query_row(
                "SELECT COUNT(*) FROM messages WHERE sent_copy = 'pending'",
                [],
                |r| r.get::<_, i64>(0),
            )?;
            Ok(Stats {
                counts,
                oldest_queued_at,
                next_retry_at,
                copies_pending: copies_pending as u64,
            })
        })
        .await
    }

    async fn suppress(&self, entries: Vec<Suppression>) -> Result<Vec<String>, StoreError> {
        self.write(move |c, _| {
            let mut added = Vec::new();
            let mut insert = c.prepare_cached(
                "INSERT INTO suppressions (address, reason, detail, message_id, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (address) DO NOTHING",
            )?;
            for e in entries {
                if insert.execute(params![e.address, e.reason, e.detail, e.message_id, e.at])? > 0 {
                    added.push(e.address);
                }
            }
            if !added.is_empty() {
                let logged: Vec<Option<&str>> = if added.len() > super::SUPPRESSION_CHANGE_ROWS {
                    vec![None]
                } else {
                    added.iter().map(|a| Some(a.as_str())).collect()
                };
                log_suppression(c, &logged, true)?;
            }
            Ok(added)
        })
        .await
    }

    async fn unsuppress(&self, address: &str) -> Result<bool, StoreError> {
        let address = address.to_owned();
        self.write(move |c, _| {
            let gone = c.execute("DELETE FROM suppressions WHERE address = ?1", [&address])? > 0;
            if gone {
                log_suppression(c, &[Some(address.as_str())], false)?;
            }
            Ok(gone)
        })
        .await
    }

    async fn suppression_changes(
        &self,
        since: i64,
    ) -> Result<Option<(i64, Vec<SuppressionChange>)>, StoreError> {
        self.read(move |c| {
            // The version first: every version up to it is committed, so
            // the changes read after it hold each of them unless trimmed.
            let now: i64 = c.query_row("SELECT v FROM suppression_version", [], |r| r.get(0))?;
            let rows: Vec<(i64, Option<String>, bool, Option<Suppression>)> = c
                .prepare_cached(
                    "SELECT ch.version, ch.address, ch.added,
                            s.address, s.reason, s.detail, s.message_id, s.created_at
                       FROM suppression_changes ch
                       LEFT JOIN suppressions s ON ch.added AND s.address = ch.address
                      WHERE ch.version > ?1 AND ch.version <= ?2
                      ORDER BY ch.version, ch.rowid",
                )?
                .query_map(params![since, now], |r| {
                    let entry = match r.get::<_, Option<String>>(3)? {
                        Some(_) => Some(suppression_at(r, 3)?),
                        None => None,
                    };
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, entry))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let versions: Vec<(i64, bool)> =
                rows.iter().map(|(v, a, _, _)| (*v, a.is_some())).collect();
            if !super::changes_complete(since, now, &versions) {
                return Ok(None);
            }
            let changes = rows
                .into_iter()
                .filter_map(|(_, address, added, entry)| match added {
                    // As the store holds it now; gone if removed since.
                    true => entry.map(SuppressionChange::Added),
                    false => address.map(SuppressionChange::Removed),
                })
                .collect();
            Ok(Some((now, changes)))
        })
        .await
    }

    async fn suppression_version(&self) -> Result<i64, StoreError> {
        self.read(|c| c.query_row("SELECT v FROM suppression_version", [], |r| r.get(0)))
            .await
    }

    async fn paused(&self) -> Result<Option<Paused>, StoreError> {
        self.read(|c| {
            c.prepare_cached("SELECT since, by, reason FROM delivery_pause LIMIT 1")?
                .query_row([], |r| {
                    Ok(Paused {
                        since: r.get(0)?,
                        by: r.get(1)?,
                        reason: r.get(2)?,
                    })
                })
                .optional()
        })
        .await
    }

    async fn set_paused(&self, pause: Option<Paused>) -> Result<bool, StoreError> {
        self.write(move |c, _| {
            Ok(match &pause {
                Some(p) => c.execute(
                    "INSERT INTO delivery_pause (since, by, reason)
                     SELECT ?1, ?2, ?3 WHERE NOT EXISTS (SELECT 1 FROM delivery_pause)",
                    params![p.since, p.by, p.reason],
                )?,
                None => c.execute("DELETE FROM delivery_pause", [])?,
            } > 0)
        })
        .await
    }

    async fn suppression(&self, address: &str) -> Result<Option<Suppression>, StoreError> {
        let address = address.to_owned();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT address, reason, detail, message_id, created_at FROM suppressions
                  WHERE address = ?1",
            )?
            .query_row([&address], |r| suppression_at(r, 0))
            .optional()
        })
        .await
    }

    async fn suppression_page(
        &self,
        query: &SuppressionQuery,
    ) -> Result<SuppressionPage, StoreError> {
        let query = query.clone();
        self.read(move |c| {
            // `instr` and the BINARY order of the primary key compare bytes,
            // as the memory store's `contains` and order do; one row past
            // the limit says whether a next page follows (`LIMIT -1`: all).
            let limit = query.limit.map_or(-1, |l| l.saturating_add(1) as i64);
            // A bare `address > ?1` is a range of the primary key (an
            // `?1 IS NULL OR …` would read the list from its start).
            let after = query.after.as_deref().unwrap_or("");
            let rows = c
                .prepare_cached(SUPPRESSION_PAGE_SQL)?
                .query_map(params![after, query.contains, limit], |r| {
                    suppression_at(r, 0)
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let (total, matching): (i64, i64) = match (query.counts, &query.contains) {
                (false, _) => (0, 0),
                (true, contains) => {
                    let total =
                        c.query_row("SELECT count(*) FROM suppressions", [], |r| r.get(0))?;
                    let matching = match contains {
                        None => total,
                        Some(part) => c.query_row(
                            "SELECT count(*) FROM suppressions WHERE instr(address, ?1) > 0",
                            [part],
                            |r| r.get(0),
                        )?,
                    };
                    (total, matching)
                }
            };
            Ok(SuppressionPage::of(
                &query,
                total as u64,
                matching as u64,
                rows,
            ))
        })
        .await
    }

    async fn report_cursor(&self, mailbox: &str) -> Result<Option<(u32, u32)>, StoreError> {
        let mailbox = mailbox.to_owned();
        self.read(move |c| {
            c.query_row(
                "SELECT validity, uid FROM report_cursors WHERE mailbox = ?1",
                [&mailbox],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
        .await
    }

    async fn advance_report_cursor(
        &self,
        mailbox: &str,
        validity: u32,
        uid: u32,
    ) -> Result<(), StoreError> {
        let mailbox = mailbox.to_owned();
        self.write(move |c, _| {
            c.execute(
                "INSERT INTO report_cursors (mailbox, validity, uid) VALUES (?1, ?2, ?3)
                 ON CONFLICT (mailbox) DO UPDATE SET validity = excluded.validity, uid = excluded.uid
                  WHERE validity <> excluded.validity OR uid < excluded.uid",
                params![mailbox, validity, uid],
            )?;
            Ok(())
        })
        .await
    }

    async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.writes.send(Work::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    async fn recover(&self) -> Result<Recovered, StoreError> {
        self.write(recover).await
    }

    async fn purge(
        &self,
        finished_before: Millis,
        keys_before: Millis,
        limit: usize,
    ) -> Result<Purged, StoreError> {
        self.write(move |c, _| purge(c, finished_before, keys_before, limit))
            .await
    }
}

/// Those of `bound` that `stmt` numbers: a statement that leaves out the
/// last (a listing that searches for no report) takes fewer.
fn params_of<'a>(
    stmt: &rusqlite::Statement<'_>,
    bound: &'a [rusqlite::types::Value],
) -> rusqlite::ParamsFromIter<std::iter::Take<std::slice::Iter<'a, rusqlite::types::Value>>> {
    rusqlite::params_from_iter(bound.iter().take(stmt.parameter_count()))
}

/// The parameters of [`rows::list_sql`] and [`rows::count_sql`]: `filter`,
/// rows before seq `before`, at most `rows`.
fn filter_params(filter: &Filter, before: i64, rows: i64) -> Vec<rusqlite::types::Value> {
    use rusqlite::types::Value;
    let text = |s: Option<String>| s.map_or(Value::Null, Value::Text);
    vec![
        Value::Integer(before),
        text(filter.state.map(|s| s.as_str().to_owned())),
        Value::Integer(rows),
        text(filter.caller.clone()),
        text(filter.batch.clone()),
        text(filter.recipient.as_ref().map(|r| r.to_lowercase())),
        text(filter.tag.clone()),
        text(filter.reported.clone()),
        text(filter.metadata.as_ref().map(super::rows::metadata_json)),
    ]
}

fn get(c: &Connection, id: &str) -> rusqlite::Result<Option<Record>> {
    c.prepare_cached(
        "SELECT message_id, state, mail_from, rcpt, size, prefer, idem_key, queued_at, due_at,
                updated_at, next_attempt_at, relay, accepted, rejected, reason, note,
                caller, meta, decided_by, sent_copy, attempt_log, history, batch, reports, tag,
                max_age, priority
           FROM messages WHERE message_id = ?1",
    )?
    .query_row([id], |r| {
        let state = rows::state(&r.get::<_, String>(1)?);
        Ok(Record {
            message_id: r.get(0)?,
            state,
            from: r.get(2)?,
            to: lines(r.get(3)?),
            size: r.get::<_, i64>(4)? as u64,
            prefer: r.get(5)?,
            idempotency_key: r.get(6)?,
            queued_at: r.get(7)?,
            due_at: r.get(8)?,
            updated_at: r.get(9)?,
            next_attempt_at: if matches!(state, State::Queued | State::Scheduled | State::Held) {
                r.get(10)?
            } else {
                None
            },
            relay: r.get(11)?,
            accepted: lines(r.get(12)?),
            rejected: rows::rejected(r.get(13)?),
            reason: r.get(14)?,
            note: r.get(15)?,
            caller: r.get(16)?,
            meta: r.get(17)?,
            decided_by: r.get(18)?,
            sent_copy: r.get(19)?,
            attempts: rows::attempts(r.get(20)?),
            history: rows::history(&r.get::<_, String>(21)?),
            node: None,
            batch: r.get(22)?,
            tag: r.get(24)?,
            max_age: r.get(25)?,
            priority: rows::priority(r.get(26)?),
            expires_at: None,
            reports: rows::reports(r.get(23)?),
        })
    })
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::SeqCst;

    fn outcome(state: State, copy: bool) -> Settle {
        Settle {
            state,
            relay: Some("r".into()),
            attempts: vec![],
            accepted: vec![],
            rejected: vec![],
            reason: None,
            note: None,
            next_attempt_at: None,
            copy,
            body: None,
        }
    }

    /// The writer's log syncs, counted; each waits while they are held,
    /// and fails while they are failing.
    #[derive(Clone, Default)]
    struct WatchedLog {
        syncs: Arc<std::sync::atomic::AtomicUsize>,
        held: Arc<(Mutex<bool>, std::sync::Condvar)>,
        failing: Arc<std::sync::atomic::AtomicBool>,
    }

    impl WatchedLog {
        /// A new store in a folder of its own, with its log watched.
        fn store() -> (tempfile::TempDir, WatchedLog, Arc<SqliteStore>) {
            let dir = tempfile::tempdir().unwrap();
            let log = WatchedLog::default();
            let store = log.open(&dir.path().join("q.db"));
            (dir, log, store)
        }

        fn open(&self, path: &Path) -> Arc<SqliteStore> {
            let w = self.clone();
            let sync = move |c: &Connection| {
                let (lock, turned) = &*w.held;
                let mut held = lock.lock().unwrap();
                while *held {
                    held = turned.wait(held).unwrap();
                }
                drop(held);
                if w.failing.load(SeqCst) {
                    return Err(StoreError::Unconfirmed("the sync failed".into()));
                }
                let synced = fsync_log(c);
                w.syncs.fetch_add(1, SeqCst);
                synced
            };
            Arc::new(SqliteStore::open_with(path, true, Box::new(sync)).unwrap())
        }

        fn hold(&self, held: bool) {
            *self.held.0.lock().unwrap() = held;
            self.held.1.notify_all();
        }

        fn syncs(&self) -> usize {
            self.syncs.load(SeqCst)
        }
    }

    /// A write that changes a row (`changes`) or none; `lazy` as a
    /// relay-accepted outcome.
    fn write(
        store: &Arc<SqliteStore>,
        lazy: bool,
        changes: bool,
    ) -> tokio::task::JoinHandle<Result<(), StoreError>> {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write_with(lazy, move |c, _| {
                    if changes {
                        c.execute(
                            "INSERT INTO counts (state, n) VALUES ('test', 1)
                             ON CONFLICT (state) DO UPDATE SET n = n + 1",
                            [],
                        )?;
                    }
                    Ok(())
                })
                .await
        })
    }

    /// A durable and a lazy write that change a row each, waiting behind a
    /// held write so that they reach the writer as one batch; the sender
    /// releases the held write.
    async fn a_durable_and_a_lazy_write(
        store: &Arc<SqliteStore>,
    ) -> (
        std::sync::mpsc::Sender<()>,
        tokio::task::JoinHandle<Result<(), StoreError>>,
        tokio::task::JoinHandle<Result<(), StoreError>>,
    ) {
        let release = hold_writer(store, true).await;
        let durable = touch(store, false);
        let lazy = touch(store, true);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        (release, durable, lazy)
    }

    /// A write that changes a row.
    fn touch(
        store: &Arc<SqliteStore>,
        lazy: bool,
    ) -> tokio::task::JoinHandle<Result<(), StoreError>> {
        write(store, lazy, true)
    }

    fn message(id: &str) -> NewMessage {
        let now = now_millis();
        NewMessage {
            message_id: id.into(),
            from: Some("a@example.org".into()),
            to: vec!["b@example.org".into()],
            bytes: Arc::from(&b"Subject: x\r\n\r\nbody\r\n"[..]),
            prefer: None,
            queued_at: now,
            due_at: now,
            idempotency: None,
            caller: None,
            meta: None,
            hold: None,
            only: None,
            batch: None,
            tag: None,
            max_age: None,
            priority: Default::default(),
        }
    }

    /// Holds the writer thread until the returned sender is dropped.
    /// Holds the writer in a write (`lazy`: one answered before the fsync)
    /// until the sender is used or dropped.
    async fn hold_writer(store: &Arc<SqliteStore>, lazy: bool) -> std::sync::mpsc::Sender<()> {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started, running) = oneshot::channel();
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write_with(lazy, move |_, _| {
                    let _ = started.send(());
                    let _ = held.recv();
                    Ok(())
                })
                .await
        });
        running.await.unwrap();
        release
    }

    #[tokio::test]
    async fn a_new_store_and_its_log_are_readable_by_their_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db").display().to_string();
        let store = SqliteStore::open(Path::new(&path)).unwrap();
        store.accept(message("<a@x>")).await.unwrap();
        for file in [path.clone(), format!("{path}-wal"), format!("{path}-shm")] {
            assert_eq!(mode(&file), 0o600, "{file}");
        }
        // A store that exists keeps the mode its operator gave it.
        let kept = dir.path().join("kept.db").display().to_string();
        std::fs::write(&kept, b"").unwrap();
        std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o640)).unwrap();
        let store = SqliteStore::open(Path::new(&kept)).unwrap();
        store.accept(message("<b@x>")).await.unwrap();
        assert_eq!(mode(&kept), 0o640);
        assert_eq!(mode(&format!("{kept}-wal")), 0o640);
    }

    /// `restore` is refused while a daemon holds the store. Over a store
    /// whose log was never merged (its daemon was killed), it keeps that
    /// store whole under its new name, its log merged into it, and puts the
    /// copy in its place with no log beside it.
    #[tokio::test]
    async fn a_restore_keeps_the_store_it_replaces_whole_with_its_log_merged() {
        let dir = tempfile::tempdir().unwrap();
        let (path, copy) = (dir.path().join("q.db"), dir.path().join("copy.db"));
        let store = SqliteStore::open(&path).unwrap();
        store.accept(message("<old@x>")).await.unwrap();
        let made = store.backup(&copy).await.unwrap();
        assert_eq!(made.counts, [(State::Queued, 1)]);
        store.accept(message("<new@x>")).await.unwrap();
        let refused = restore(&copy, &path).unwrap_err();
        assert!(refused.contains("stop it first"), "{refused}");
        assert!(!beside(&path, ".restoring").exists());

        // The files of a daemon killed now: the last accept is in the log only.
        let crashed = tempfile::tempdir().unwrap();
        let at = crashed.path().join("q.db");
        std::fs::copy(&path, &at).unwrap();
        std::fs::copy(beside(&path, "-wal"), beside(&at, "-wal")).unwrap();
        drop(store);
        assert!(unmerged_log(&at));
        // The restored file gets the replaced one's mode and owner (as root,
        // as CI runs, another user's).
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        std::fs::set_permissions(&at, std::fs::Permissions::from_mode(0o640)).unwrap();
        let _ = std::os::unix::fs::chown(&at, Some(65534), Some(65534));
        let owner = |p: &Path| {
            let m = std::fs::metadata(p).unwrap();
            (m.uid(), m.gid(), m.mode() & 0o777)
        };
        let was = owner(&at);
        let done = restore(&copy, &at).unwrap();
        assert_eq!(owner(&at), was);
        let kept = done.replaced.expect("the replaced store is kept");
        // Its log was merged into it first.
        assert!(!beside(&kept, "-wal").exists());
        assert!(!unmerged_log(&at));
        let old = SqliteStore::open_shared(&kept).unwrap();
        let now = SqliteStore::open_shared(&at).unwrap();
        for (id, in_old, in_now) in [("<old@x>", true, true), ("<new@x>", true, false)] {
            assert_eq!(old.get(id).await.unwrap().is_some(), in_old, "{id}");
            assert_eq!(now.get(id).await.unwrap().is_some(), in_now, "{id}");
        }
    }

    #[tokio::test]
    async fn two_restores_of_one_store_never_run_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (path, copy) = (dir.path().join("q.db"), dir.path().join("copy.db"));
        let store = SqliteStore::open(&path).unwrap();
        store.accept(message("<copied@x>")).await.unwrap();
        store.backup(&copy).await.unwrap();
        store.accept(message("<later@x>")).await.unwrap();
        drop(store);
        // Another restore is staging its copy.
        let staged = beside(&path, ".restoring");
        let other = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&staged)
            .unwrap();
        let held = DaemonLock::take(other).unwrap().expect("the lock is free");
        std::fs::write(&staged, b"half of another copy").unwrap();
        let refused = restore(&copy, &path).unwrap_err();
        assert!(refused.contains("another restore"), "{refused}");
        assert_eq!(std::fs::read(&staged).unwrap(), b"half of another copy");
        let untouched = SqliteStore::open_shared(&path).unwrap();
        assert!(untouched.get("<later@x>").await.unwrap().is_some());
        drop(untouched);
        // That restore was killed half-way: the next one starts over.
        drop(held);
        let done = restore(&copy, &path).unwrap();
        assert_eq!(done.copy.counts, [(State::Queued, 1)]);
        assert!(!staged.exists());
        let now = SqliteStore::open_shared(&path).unwrap();
        assert!(now.get("<copied@x>").await.unwrap().is_some());
        assert!(now.get("<later@x>").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_write_that_fails_before_changing_a_row_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("q.db")).unwrap());
        let release = hold_writer(&store, false).await;
        let s = store.clone();
        let stored = tokio::spawn(async move { s.accept(message("<a@x>")).await });
        let s = store.clone();
        let missing = tokio::spawn(async move { s.mark("<nobody@x>").await });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        drop(release);
        assert!(matches!(
            stored.await.unwrap(),
            Ok(Accepted::Stored(State::Queued))
        ));
        assert!(missing.await.unwrap().is_err());
        assert!(store.get("<a@x>").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_write_that_fails_part_way_rolls_its_batch_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("q.db")).unwrap());
        let release = hold_writer(&store, false).await;
        let s = store.clone();
        let other = tokio::spawn(async move { s.accept(message("<a@x>")).await });
        let s = store.clone();
        let part_way = tokio::spawn(async move {
            s.write(|c, now| {
                accept_all(c, &[message("<b@x>")], now)?;
                Err::<(), _>(rusqlite::Error::QueryReturnedNoRows)
            })
            .await
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        drop(release);
        let other = other.await.unwrap().unwrap_err().to_string();
        assert!(other.contains("failed part-way"), "{other}");
        assert!(part_way.await.unwrap().is_err());
        for id in ["<a@x>", "<b@x>"] {
            assert!(store.get(id).await.unwrap().is_none(), "{id} was stored");
        }
        assert!(store.stats().await.unwrap().counts.is_empty());
        // The next batch stores as usual.
        assert!(matches!(
            store.accept(message("<a@x>")).await,
            Ok(Accepted::Stored(State::Queued))
        ));
    }

    /// A full store (here: capped with `max_page_count`) refuses what it
    /// cannot hold, in batches of concurrent writes, and answers each write
    /// as it was: a message answered stored is there, one refused is not,
    /// and the counts are those of the rows. Raising the cap, it stores
    /// again.
    #[tokio::test]
    async fn a_full_store_answers_each_write_as_it_was_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("q.db")).unwrap());
        let cap = |extra: i64| {
            let store = store.clone();
            async move {
                store
                    .write(move |c, _| {
                        let pages: i64 = c.pragma_query_value(None, "page_count", |r| r.get(0))?;
                        c.pragma_update(None, "max_page_count", pages + extra)
                    })
                    .await
                    .unwrap()
            }
        };
        // Some stored before the store fills, in batches of their own.
        for i in 0..4 {
            let id = format!("<before-{i}@x>");
            assert!(matches!(
                store.accept(message(&id)).await,
                Ok(Accepted::Stored(State::Queued))
            ));
        }
        cap(8).await;
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..64 {
            let store = store.clone();
            calls.spawn(async move {
                let id = format!("<{i}@x>");
                let m = NewMessage {
                    bytes: Arc::from(vec![b'x'; 8192]),
                    ..message(&id)
                };
                (id, store.accept(m).await)
            });
        }
        let (mut stored, mut refused) = (4, 0);
        for (id, answer) in calls.join_all().await {
            let there = store.get(&id).await.unwrap().is_some();
            match answer {
                Ok(Accepted::Stored(State::Queued)) => {
                    assert!(there, "{id} answered stored");
                    stored += 1;
                }
                Err(e) => {
                    assert!(!there, "{id} answered {e} but stored");
                    refused += 1;
                }
                other => panic!("{id}: {other:?}"),
            }
        }
        assert!(
            stored > 0 && refused > 0,
            "stored {stored}, refused {refused}"
        );
        let (counted, rows) = store
            .read(|c| {
                let n = |sql: &str| c.query_row(sql, [], |r| r.get::<_, i64>(0));
                Ok((
                    n("SELECT COALESCE(SUM(n), 0) FROM counts")?,
                    n("SELECT COUNT(*) FROM messages")?,
                ))
            })
            .await
            .unwrap();
        assert_eq!((counted, rows), (stored, stored));
        cap(10_000).await;
        assert!(matches!(
            store.accept(message("<after@x>")).await,
            Ok(Accepted::Stored(State::Queued))
        ));
    }

    #[test]
    fn due_messages_are_read_through_their_index_without_a_sort() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("q.db")).unwrap();
        let c = store.delivery.lock().unwrap();
        for sql in [DUE_SQL, NEXT_DUE_SQL] {
            let explain = format!("EXPLAIN QUERY PLAN {sql}");
            let mut stmt = c.prepare(&explain).unwrap();
            let rows = if sql == DUE_SQL {
                stmt.query(params![1, 10])
            } else {
                stmt.query([])
            };
            let plan: String = rows
                .unwrap()
                .mapped(|r| r.get::<_, String>(3))
                .collect::<rusqlite::Result<Vec<_>>>()
                .unwrap()
                .join("; ");
            assert!(plan.contains("USING INDEX messages_due"), "{sql}: {plan}");
            assert!(!plan.contains("TEMP B-TREE"), "{sql}: {plan}");
        }
    }

    #[test]
    fn a_page_of_the_suppression_list_is_a_range_of_its_key_without_a_sort() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("q.db")).unwrap();
        let c = store.reader.lock().unwrap();
        for contains in [None, Some("part")] {
            let plan: String = c
                .prepare(&format!("EXPLAIN QUERY PLAN {SUPPRESSION_PAGE_SQL}"))
                .unwrap()
                .query(params!["", contains, 101])
                .unwrap()
                .mapped(|r| r.get::<_, String>(3))
                .collect::<rusqlite::Result<Vec<_>>>()
                .unwrap()
                .join("; ");
            assert!(
                plan.starts_with("SEARCH suppressions USING PRIMARY KEY (address>?)"),
                "{plan}"
            );
            assert!(!plan.contains("TEMP B-TREE"), "{plan}");
        }
    }

    #[test]
    fn the_stats_and_the_recovery_read_through_an_index_however_long_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("q.db")).unwrap();
        let c = store.reader.lock().unwrap();
        for (sql, index) in [
            (OLDEST_QUEUED_SQL, "messages_queued_at"),
            (NEXT_RETRY_SQL, "messages_retry"),
            (SENDING_SQL, "messages_state"),
        ] {
            let plan: String = c
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query([])
                .unwrap()
                .mapped(|r| r.get::<_, String>(3))
                .collect::<rusqlite::Result<Vec<_>>>()
                .unwrap()
                .join("; ");
            // `USING INDEX`, or `USING COVERING INDEX` where the index
            // holds the column.
            assert!(plan.contains(&format!("INDEX {index}")), "{sql}: {plan}");
            assert!(plan.starts_with("SEARCH"), "{sql}: {plan}");
        }
    }

    #[test]
    fn a_listing_reads_through_the_index_it_is_listed_by() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("q.db")).unwrap();
        let c = store.reader.lock().unwrap();
        for state in [None, Some(State::Sent), Some(State::Failed)] {
            for caller in [None, Some("a".to_string())] {
                for (batch, tag) in [
                    (None, None),
                    (Some("b".to_string()), None),
                    (None, Some("t".to_string())),
                    (Some("b".to_string()), Some("t".to_string())),
                ] {
                    let filter = Filter {
                        state,
                        caller: caller.clone(),
                        batch: batch.clone(),
                        tag: tag.clone(),
                        recipient: Some("r".into()),
                        reported: None,
                        metadata: None,
                    };
                    let plan = |filter: &Filter, sql: String, rows: i64| -> String {
                        let bound = filter_params(filter, 1, rows);
                        let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
                        let params = params_of(&stmt, &bound);
                        stmt.query_map(params, |r| r.get::<_, String>(3))
                            .unwrap()
                            .collect::<rusqlite::Result<Vec<_>>>()
                            .unwrap()
                            .join("; ")
                    };
                    let listed = plan(&filter, rows::list_sql('?', &filter), 10);
                    match rows::listed_by(&filter) {
                        Some(by) => assert!(
                            listed.contains(&format!("USING INDEX messages_{} ", by.column().0)),
                            "{filter:?}: {listed}"
                        ),
                        None => assert!(!listed.contains("INDEX"), "{filter:?}: {listed}"),
                    }
                    // The count of a batch or a tag, through the same index.
                    if batch.is_none() && tag.is_none() {
                        continue;
                    }
                    // Counted whatever state a page asks for, as
                    // `list_messages` and the console count.
                    let whole = Filter {
                        state: None,
                        ..filter.clone()
                    };
                    let counted = plan(
                        &whole,
                        rows::count_sql('?', &whole),
                        State::ALL.len() as i64,
                    );
                    let by = if batch.is_some() { "batch" } else { "tag" };
                    assert!(
                        counted.contains(&format!("USING INDEX messages_{by} ")),
                        "{filter:?}: {counted}"
                    );
                }
            }
        }
        let by = |state, caller: Option<&str>, batch: Option<&str>| {
            rows::listed_by(&Filter {
                state,
                caller: caller.map(Into::into),
                batch: batch.map(Into::into),
                ..Filter::default()
            })
        };
        let tagged = |state, batch: Option<&str>| {
            rows::listed_by(&Filter {
                state,
                caller: Some("a".into()),
                batch: batch.map(Into::into),
                tag: Some("t".into()),
                recipient: None,
                reported: None,
                metadata: None,
            })
        };
        use rows::ListedBy;
        assert_eq!(
            by(Some(State::Failed), Some("a"), Some("b")),
            Some(ListedBy::Batch)
        );
        assert_eq!(
            by(Some(State::Failed), Some("a"), None),
            Some(ListedBy::State)
        );
        assert_eq!(
            by(Some(State::Sent), Some("a"), None),
            Some(ListedBy::Caller)
        );
        assert_eq!(by(Some(State::Sent), None, None), None);
        use rows::ListedBy::{Batch, Tag};
        assert_eq!(tagged(Some(State::Failed), None), Some(ListedBy::State));
        assert_eq!(tagged(Some(State::Sent), None), Some(Tag));
        assert_eq!(tagged(None, None), Some(Tag));
        assert_eq!(tagged(None, Some("b")), Some(Batch));
        assert_eq!(by(None, None, None), None);
    }

    #[tokio::test]
    async fn a_long_read_of_a_caller_holds_up_no_delivery() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("q.db")).unwrap());
        store.accept(message("<due@x>")).await.unwrap();
        // A listing or a search that takes its time.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started, running) = oneshot::channel();
        let s = store.clone();
        let long = tokio::spawn(async move {
            s.read(move |_| {
                let _ = started.send(());
                let _ = held.recv();
                Ok(())
            })
            .await
        });
        running.await.unwrap();
        let limit = std::time::Duration::from_secs(10);
        let due = tokio::time::timeout(limit, store.due(now_millis(), 10)).await;
        assert_eq!(due.expect("due answers").unwrap(), ["<due@x>"]);
        assert!(
            tokio::time::timeout(limit, store.next_due())
                .await
                .expect("next_due answers")
                .unwrap()
                .is_some()
        );
        let load = tokio::time::timeout(limit, store.load("<due@x>"))
            .await
            .expect("load answers");
        assert!(load.unwrap().is_some());
        // A caller's status read waits its turn behind the long one.
        let s = store.clone();
        let status = tokio::spawn(async move { s.get("<due@x>").await });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!status.is_finished());
        drop(release);
        long.await.unwrap().unwrap();
        assert!(status.await.unwrap().unwrap().is_some());
    }

    #[test]
    fn only_a_relay_accepted_outcome_is_answered_before_its_fsync() {
        assert!(lazy(&outcome(State::Sent, false)));
        assert!(lazy(&outcome(State::Partial, false)));
        assert!(!lazy(&outcome(State::Sent, true)), "a Sent copy is due");
        for state in [State::Queued, State::Failed, State::Unknown, State::Expired] {
            assert!(!lazy(&outcome(state, false)), "{state:?}");
        }
    }

    #[tokio::test]
    async fn a_lazy_write_beside_durable_ones_is_not_held_for_their_fsync() {
        let (_dir, log, store) = WatchedLog::store();
        let (release, durable, lazy) = a_durable_and_a_lazy_write(&store).await;
        log.hold(true);
        release.send(()).unwrap();
        let answered = tokio::time::timeout(std::time::Duration::from_secs(10), lazy).await;
        answered
            .expect("answered before the fsync")
            .unwrap()
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!durable.is_finished(), "a commit mark waits for the fsync");
        assert_eq!(log.syncs(), 0);
        log.hold(false);
        durable.await.unwrap().unwrap();
        assert!(log.syncs() >= 1);
    }

    #[tokio::test]
    async fn a_lazy_write_alone_is_synced_by_the_timer() {
        let (_dir, log, store) = WatchedLog::store();
        touch(&store, false).await.unwrap().unwrap();
        let before = log.syncs();
        assert!(before >= 1, "a durable write is answered after the fsync");
        log.hold(true);
        touch(&store, true).await.unwrap().unwrap();
        log.hold(false);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while log.syncs() == before {
            assert!(std::time::Instant::now() < deadline, "never synced");
            tokio::time::sleep(LAZY_SYNC).await;
        }
        // The writes after it still work.
        touch(&store, true).await.unwrap().unwrap();
        touch(&store, false).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_write_whose_log_was_not_synced_is_unconfirmed() {
        let (_dir, log, store) = WatchedLog::store();
        let (release, durable, lazy) = a_durable_and_a_lazy_write(&store).await;
        log.failing.store(true, SeqCst);
        release.send(()).unwrap();
        lazy.await.unwrap().unwrap();
        let e = durable.await.unwrap().unwrap_err();
        assert!(matches!(e, StoreError::Unconfirmed(_)), "{e:?}");
        log.failing.store(false, SeqCst);
        touch(&store, false).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_write_that_changed_nothing_waits_for_no_fsync() {
        let (_dir, log, store) = WatchedLog::store();
        touch(&store, false).await.unwrap().unwrap();
        let synced = log.syncs();
        write(&store, false, false).await.unwrap().unwrap();
        assert_eq!(log.syncs(), synced, "nothing was written to the log");
        // After a lazy commit, even a write that changed nothing is
        // answered after the fsync that makes what it read durable.
        log.hold(true);
        touch(&store, true).await.unwrap().unwrap();
        let unchanged = write(&store, false, false);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!unchanged.is_finished(), "waits for the log's fsync");
        log.hold(false);
        unchanged.await.unwrap().unwrap();
        assert!(log.syncs() > synced);
    }
}
