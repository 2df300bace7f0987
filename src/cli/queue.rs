//! `mailmux queue`: acts on the configured store directly, so it works
//! whether or not a daemon runs (a running daemon's poll delivers what is
//! queued or released here, within 100 ms). Every action goes through the
//! store's state rules, each in one transaction, so it is safe while the
//! daemon runs. Approving and rejecting need an operator, named by the
//! token in `MAILMUX_OPERATOR_TOKEN`.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Subcommand};
use futures::stream::{self, StreamExt as _};
use mailmux_actors::queue::{
    self, Action, Cancel, Decided, Decision, Event, Filter, Millis, Observer, Retry, State,
    StoreError, StoreKind, postgres::PgStore, sqlite::SqliteStore,
};

use crate::audit::Audit;
use crate::config::Config;
use crate::mcp::types::MessageStatusResult;
use crate::policy::{Gate, shown};

pub use crate::config::env::OPERATOR_TOKEN_VAR;

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// The most recent messages, newest first.
    List(ListArgs),
    /// One message: envelope, headers, attempts and history.
    Show(ShowArgs),
    /// Cancel a scheduled, queued or held message, or every one a selection
    /// names (`--batch`, `--caller`, `--status`, `--recipient`).
    Cancel(CancelArgs),
    /// Queue a queued, failed or expired message for a fresh attempt now, or
    /// every one a selection names (`--status queued`: deliver the deferred
    /// mail now, after an outage).
    Retry(RetryArgs),
    /// Release a held message for delivery, or every held message of one
    /// `send_batch` call (`--batch`).
    Approve(DecideArgs),
    /// Refuse a held message, or every held message of one `send_batch`
    /// call (`--batch`); it is never sent.
    Reject(DecideArgs),
    /// Delete finished messages older than a duration.
    Purge(PurgeArgs),
    /// Messages per state, the oldest queued, the next retry, and whether
    /// delivery is paused; with `--batch` or `--tag`, the messages per state
    /// of that batch or tag.
    Stats(StatsArgs),
    /// Pause delivery for every daemon on the store (until `resume`, across
    /// restarts): mail is still accepted and queued, and no message is
    /// handed to a relay; deliveries under way end as they would.
    Pause(PauseArgs),
    /// Resume delivery after `pause`: the queued mail goes out.
    Resume,
    /// Write a consistent copy of the SQLite store to a new file, while the
    /// daemon runs or not.
    Backup(BackupArgs),
    /// Put a copy made by `backup` in place of the SQLite store, with no
    /// daemon running; the replaced store is kept beside it.
    Restore(RestoreArgs),
    /// The suppression list: the addresses no mail is accepted for (every
    /// daemon on the store heeds a change within a second).
    #[command(subcommand)]
    Suppress(SuppressCommand),
    /// Apply the PostgreSQL store's schema migrations and count the finished
    /// messages anew, then exit (for operators who migrate before starting
    /// the daemons, or after upgrading them all).
    Migrate,
}

#[derive(Debug, Subcommand)]
pub enum SuppressCommand {
    /// Every listed address, by address.
    List {
        /// One JSON object a line.
        #[arg(long)]
        json: bool,
    },
    /// Add addresses: mail to them is refused from now on.
    Add {
        #[arg(required_unless_present = "file")]
        addresses: Vec<String>,
        /// Add the addresses of a file too, one a line (an export of
        /// another service's list); blank lines and lines that begin with
        /// `#` are skipped. Every line is checked before any is written.
        #[arg(long, value_name = "PATH")]
        file: Option<std::path::PathBuf>,
        /// Why: unsubscribed, complained or manual (bounced is the
        /// daemon's own).
        #[arg(long, default_value = "manual")]
        reason: String,
        /// A note kept with each entry (no secrets: `list` shows it).
        #[arg(long)]
        note: Option<String>,
    },
    /// Take addresses off the list.
    Remove {
        #[arg(required = true)]
        addresses: Vec<String>,
    },
}

/// `queue stats`: the whole queue, or one batch's or tag's messages.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Only the messages of this `send_batch` call (its `batch_id`).
    #[arg(long)]
    pub batch: Option<String>,
    /// Only the messages sent with this `tag`.
    #[arg(long, conflicts_with = "batch")]
    pub tag: Option<String>,
}

/// Which messages: every given condition holds.
#[derive(Debug, Args)]
pub struct Select {
    /// Only messages in this state.
    #[arg(long)]
    pub status: Option<String>,
    /// Only this caller's messages.
    #[arg(long)]
    pub caller: Option<String>,
    /// Only the messages of this `send_batch` call (its `batch_id`).
    #[arg(long)]
    pub batch: Option<String>,
    /// Only the messages sent with this `tag`.
    #[arg(long)]
    pub tag: Option<String>,
    /// Only messages with a recipient that contains this text (any case).
    #[arg(long)]
    pub recipient: Option<String>,
}

impl Select {
    fn any(&self) -> bool {
        self.status.is_some()
            || self.caller.is_some()
            || self.batch.is_some()
            || self.tag.is_some()
            || self.recipient.is_some()
    }

    /// The store's filter, or the usage error of an unknown `--status` or
    /// an empty value (which would select every message: `--batch "$ID"`
    /// with `ID` unset must not cancel the whole queue).
    fn filter(self) -> Result<Filter, ExitCode> {
        for (flag, value) in [
            ("--status", &self.status),
            ("--caller", &self.caller),
            ("--batch", &self.batch),
            ("--tag", &self.tag),
            ("--recipient", &self.recipient),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                eprintln!("mailmux: {flag} must not be empty");
                return Err(ExitCode::from(EXIT_USAGE));
            }
        }
        let state = match self.status.as_deref().map(State::parse) {
            None => None,
            Some(Some(s)) => Some(s),
            Some(None) => {
                let valid: Vec<&str> = State::ALL.iter().map(|s| s.as_str()).collect();
                eprintln!("mailmux: --status must be one of {}", valid.join(", "));
                return Err(ExitCode::from(EXIT_USAGE));
            }
        };
        Ok(Filter {
            state,
            caller: self.caller,
            batch: self.batch,
            tag: self.tag,
            recipient: self.recipient,
            reported: None,
            metadata: None,
        })
    }
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub select: Select,
    /// Only messages a bounce or complaint report came back for.
    #[arg(long, value_parser = crate::bounces::REASONS)]
    pub reported: Option<String>,
    /// Only messages sent with this metadata name and value (`NAME=VALUE`);
    /// given again (for another name), with each of them.
    #[arg(long, value_name = "NAME=VALUE", value_parser = crate::compose::labels::pair)]
    pub metadata: Vec<(String, String)>,
    /// At most this many, newest first (at least 1).
    #[arg(long, default_value_t = 50, value_parser = at_least_one)]
    pub limit: usize,
    /// One JSON object a line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The message_id the send answered with (`<…>` as a header writes it
    /// is taken too).
    #[arg(value_parser = message_id)]
    pub id: String,
    /// Print the stored message (headers and body) too.
    #[arg(long)]
    pub body: bool,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The message_id the send answered with; or a selection instead.
    #[arg(
        conflicts_with_all = ["status", "caller", "batch", "tag", "recipient"],
        value_parser = message_id
    )]
    pub id: Option<String>,
    #[command(flatten)]
    pub select: Select,
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    /// The message_id the send answered with; or a selection instead.
    #[arg(
        conflicts_with_all = ["status", "caller", "batch", "tag", "recipient"],
        value_parser = message_id
    )]
    pub id: Option<String>,
    #[command(flatten)]
    pub select: Select,
    /// Retry an `unknown` message, which the server may already have.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct PauseArgs {
    /// A note kept with the pause (why; shown by `stats`, the status and
    /// the console, and written to the audit log).
    #[arg(long)]
    pub reason: Option<String>,
}

#[derive(Debug, Args)]
pub struct PurgeArgs {
    /// Finished messages that finished longer ago than this (`7d`, `12h`).
    #[arg(long, value_name = "DURATION")]
    pub older_than: String,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The copy's path: a file that does not exist yet.
    pub to: std::path::PathBuf,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The copy that `queue backup` made.
    pub from: std::path::PathBuf,
}

#[derive(Debug, Args)]
pub struct DecideArgs {
    /// The message_id the send answered with; or `--batch` instead.
    #[arg(
        conflicts_with = "batch",
        required_unless_present = "batch",
        value_parser = message_id
    )]
    pub id: Option<String>,
    /// Every held message of this `send_batch` call (its `batch_id`).
    #[arg(long)]
    pub batch: Option<String>,
}

/// Exit code when the message's state does not allow the action.
const EXIT_REFUSED: u8 = 1;
/// Exit code of a usage, configuration or permission error.
const EXIT_USAGE: u8 = 2;
/// Entries `suppress list` reads from the store at once.
const LISTED_AT_ONCE: usize = 10_000;

pub async fn run(config: Config, cmd: QueueCommand) -> ExitCode {
    let (args, approve) = match cmd {
        QueueCommand::Approve(a) => (a, true),
        QueueCommand::Reject(a) => (a, false),
        QueueCommand::Migrate => return migrate(&config).await,
        QueueCommand::Backup(a) => return backup(&config, &a.to).await,
        QueueCommand::Restore(a) => return restore(&config, a.from).await,
        other => {
            let store = match open(&config).await {
                Ok(s) => s,
                Err(code) => return code,
            };
            return inspect(&config, store.as_ref(), other).await;
        }
    };
    if config.safety.operators.is_empty() {
        eprintln!(
            "mailmux: no [[operators]] are configured; only an operator may approve or reject"
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let token = std::env::var(OPERATOR_TOKEN_VAR).ok();
    let gate = Gate::new(&config.safety, None, None);
    let Some(operator) = gate.operator(token.as_deref()) else {
        eprintln!("mailmux: {OPERATOR_TOKEN_VAR} does not hold the token of a configured operator");
        return ExitCode::from(EXIT_USAGE);
    };
    let store = match open(&config).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let by = format!("operator {operator}");
    let id = match args {
        DecideArgs { id: Some(id), .. } => id,
        DecideArgs { batch, .. } => {
            let select = Select {
                status: None,
                caller: None,
                batch,
                tag: None,
                recipient: None,
            };
            return each(
                &config,
                store.as_ref(),
                select,
                Bulk::Decide { approve, by },
            )
            .await;
        }
    };
    let decision = Decision {
        approve,
        by,
        hash: None,
    };
    let told = Told::open(&config);
    let decided = decide(&told, store.as_ref(), &id, decision).await;
    told.finish().await;
    match decided {
        Ok(Decided::Released(state)) => {
            say!("{id}: approved; now {}", state.as_str());
            ExitCode::SUCCESS
        }
        Ok(Decided::Rejected) => {
            say!("{id}: rejected; it will not be sent");
            ExitCode::SUCCESS
        }
        Ok(Decided::NotHeld(state)) => {
            eprintln!(
                "mailmux: {id} is {}, not held; only a held message can be {}",
                state.as_str(),
                if approve { "approved" } else { "rejected" }
            );
            ExitCode::from(EXIT_REFUSED)
        }
        Ok(Decided::HashMismatch) => {
            eprintln!("mailmux: {id}: the approval was for other content");
            ExitCode::from(EXIT_REFUSED)
        }
        Ok(Decided::NotFound) => {
            eprintln!("mailmux: no message {id:?}");
            ExitCode::from(EXIT_REFUSED)
        }
        Err(e) => {
            eprintln!("mailmux: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `queue migrate`: the PostgreSQL schema, applied under its lock.
async fn migrate(config: &Config) -> ExitCode {
    let StoreKind::Postgres(s) = &config.queue.store else {
        eprintln!(
            "mailmux: queue migrate is for the postgres store; a {} store is migrated by the daemon at start",
            config.queue.store.as_str()
        );
        return ExitCode::from(EXIT_USAGE);
    };
    match PgStore::migrate_only(s).await {
        Ok(v) => {
            say!("{}: schema at version {v}", s.shown_url());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mailmux: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The SQLite store's path, or the usage error of a command that copies
/// it (`backup`, `restore`) on another store.
/// `--limit`: a whole number of at least 1.
/// A message id as given ([`queue::bare_id`]); an empty one is a usage
/// error.
fn message_id(s: &str) -> Result<String, String> {
    match queue::bare_id(s) {
        "" => Err("a message id must not be empty".into()),
        id => Ok(id.to_owned()),
    }
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("expected a whole number of at least 1".into()),
    }
}

fn sqlite_path<'a>(config: &'a Config, command: &str) -> Result<&'a std::path::Path, ExitCode> {
    match &config.queue.store {
        StoreKind::Sqlite { path } => Ok(path),
        StoreKind::Postgres(s) => {
            eprintln!(
                "mailmux: queue {command} is for the sqlite store; use PostgreSQL's own tools \
                 (pg_dump, pg_restore) for {}",
                s.shown_url()
            );
            Err(ExitCode::from(EXIT_USAGE))
        }
        StoreKind::Memory => {
            eprintln!(
                "mailmux: queue {command} is for the sqlite store; the memory store keeps nothing on disk"
            );
            Err(ExitCode::from(EXIT_USAGE))
        }
    }
}

/// "3 messages (queued 1, sent 2)": a copy's messages per state.
fn described(b: &queue::sqlite::Backup) -> String {
    let total: u64 = b.counts.iter().map(|c| c.1).sum();
    let states: Vec<String> = State::ALL
        .iter()
        .filter_map(|st| {
            let n = b.counts.iter().find(|c| c.0 == *st)?.1;
            Some(format!("{} {n}", st.as_str()))
        })
        .collect();
    format!(
        "{total} message{} ({})",
        if total == 1 { "" } else { "s" },
        if states.is_empty() {
            "none".to_string()
        } else {
            states.join(", ")
        }
    )
}

/// `queue backup`: a copy of the SQLite store, made in one read transaction
/// (see `SqliteStore::backup`), so a running daemon goes on meanwhile.
async fn backup(config: &Config, to: &std::path::Path) -> ExitCode {
    let path = match sqlite_path(config, "backup") {
        Ok(p) => p,
        Err(code) => return code,
    };
    let store = match SqliteStore::open_shared(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mailmux: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let started = std::time::Instant::now();
    match store.backup(to).await {
        Ok(b) => {
            say!(
                "backed up {} to {}: {}, schema version {}, {} bytes, in {} ms",
                path.display(),
                to.display(),
                described(&b),
                b.schema,
                b.bytes,
                started.elapsed().as_millis()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mailmux: backup: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `queue restore`: the copy in place of the store (`sqlite::restore`),
/// refused while a daemon holds it.
async fn restore(config: &Config, from: std::path::PathBuf) -> ExitCode {
    let path = match sqlite_path(config, "restore") {
        Ok(p) => p.to_path_buf(),
        Err(code) => return code,
    };
    let to = path.clone();
    let from_shown = from.display().to_string();
    let done = tokio::task::spawn_blocking(move || queue::sqlite::restore(&from, &to))
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    match done {
        Ok(r) => {
            say!(
                "restored {} from {from_shown}: {}, schema version {}",
                path.display(),
                described(&r.copy),
                r.copy.schema
            );
            match &r.replaced {
                Some(old) => say!("the store it replaced is kept as {}", old.display()),
                None => say!("there was no store at {} before", path.display()),
            }
            say!("the next daemon started on it recovers it as after a crash");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mailmux: restore: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `queue suppress`: the suppression list in the store.
async fn suppress(config: &Config, store: &dyn queue::Store, cmd: SuppressCommand) -> ExitCode {
    use crate::audit::SuppressionChange;
    use crate::suppress::{key, operator_entry};
    // Changes by the queue command are the operator's at this shell.
    let log = audit_log(config);
    let audited = |action: &str, address: &str, reason: Option<&str>| {
        if let Some(log) = &log {
            log.suppression(&SuppressionChange {
                action,
                by: "queue command",
                address,
                reason,
                message_id: None,
            });
        }
    };
    let fail = |e: StoreError| {
        eprintln!("mailmux: {e}");
        ExitCode::FAILURE
    };
    // Every address is checked before any is written.
    let keys = |addresses: &[String]| -> Result<Vec<String>, ExitCode> {
        addresses
            .iter()
            .map(|a| {
                key(a).ok_or_else(|| {
                    eprintln!("mailmux: {a:?} is not an email address; nothing was changed");
                    ExitCode::from(EXIT_USAGE)
                })
            })
            .collect()
    };
    match cmd {
        SuppressCommand::List { json } => {
            // A page at a time, so that a list of millions is never all in
            // memory.
            let mut query = queue::SuppressionQuery {
                limit: Some(LISTED_AT_ONCE),
                ..Default::default()
            };
            loop {
                let page = match store.suppression_page(&query).await {
                    Ok(p) => p,
                    Err(e) => return fail(e),
                };
                for s in &page.entries {
                    if json {
                        say!("{}", crate::suppress::to_json(s));
                    } else {
                        say!(
                            "{}  {:<12}  {}  {}",
                            time(s.at),
                            s.reason,
                            shown::address(&s.address),
                            s.detail.as_deref().unwrap_or("")
                        );
                    }
                }
                match page.next_after {
                    Some(next) => query.after = Some(next),
                    None => return ExitCode::SUCCESS,
                }
            }
        }
        SuppressCommand::Add {
            addresses,
            file,
            reason,
            note,
        } => {
            let at = queue::now_millis();
            let entry = |a: &str| operator_entry(a, &reason, note.as_deref(), at);
            let mut entries = Vec::new();
            for a in &addresses {
                match entry(a) {
                    Ok(e) => entries.push(e),
                    Err(e) => {
                        eprintln!("mailmux: {e}; nothing was changed");
                        return ExitCode::from(EXIT_USAGE);
                    }
                }
            }
            if let Some(path) = &file {
                let text = match std::fs::read_to_string(path) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!(
                            "mailmux: cannot read {}: {e}; nothing was changed",
                            path.display()
                        );
                        return ExitCode::from(EXIT_USAGE);
                    }
                };
                for (i, line) in text.lines().enumerate() {
                    let line = line.trim();
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    match entry(line) {
                        Ok(e) => entries.push(e),
                        Err(e) => {
                            eprintln!(
                                "mailmux: {}, line {}: {e}; nothing was changed",
                                path.display(),
                                i + 1
                            );
                            return ExitCode::from(EXIT_USAGE);
                        }
                    }
                }
            }
            // One write for all of them; each one it added is audited.
            let n = entries.len();
            match store.suppress(entries).await {
                Ok(added) => {
                    for address in &added {
                        audited("suppressed", address, Some(&reason));
                    }
                    say!(
                        "added {} of {n}; {} already listed",
                        added.len(),
                        n - added.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        SuppressCommand::Remove { addresses } => {
            let keys = match keys(&addresses) {
                Ok(k) => k,
                Err(code) => return code,
            };
            let mut missing = 0;
            for k in &keys {
                match store.unsuppress(k).await {
                    Ok(true) => {
                        audited("unsuppressed", k, None);
                        say!("{}: removed", shown::address(k));
                    }
                    Ok(false) => {
                        missing += 1;
                        eprintln!("mailmux: {} is not listed", shown::address(k));
                    }
                    Err(e) => return fail(e),
                }
            }
            if missing > 0 {
                ExitCode::from(EXIT_REFUSED)
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}

/// The configured store, shared: the daemons that own it may be running.
async fn open(config: &Config) -> Result<Arc<dyn queue::Store>, ExitCode> {
    let failed = |e: StoreError| {
        eprintln!("mailmux: {e}");
        ExitCode::from(EXIT_USAGE)
    };
    match &config.queue.store {
        StoreKind::Sqlite { path } => match SqliteStore::open_shared(path) {
            Ok(s) => Ok(Arc::new(s)),
            Err(e) => Err(failed(e)),
        },
        StoreKind::Postgres(s) => match PgStore::open_shared(s).await {
            Ok(s) => Ok(Arc::new(s)),
            Err(e) => Err(failed(e)),
        },
        StoreKind::Memory => {
            eprintln!(
                "mailmux: the memory store lives inside the daemon; use its tools or /admin/ endpoint"
            );
            Err(ExitCode::from(EXIT_USAGE))
        }
    }
}

fn time(ms: Millis) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ms.to_string())
}

/// A pause as one line: `running`, or since when, by whom and why.
pub(crate) fn pause_text(pause: Option<&queue::Paused>) -> String {
    match pause {
        None => "running".into(),
        Some(p) => format!(
            "paused since {} by {}{}",
            time(p.since),
            p.by,
            p.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ),
    }
}

/// The commands that need no operator token.
async fn inspect(config: &Config, store: &dyn queue::Store, cmd: QueueCommand) -> ExitCode {
    let fail = |e: StoreError| {
        eprintln!("mailmux: {e}");
        ExitCode::FAILURE
    };
    match cmd {
        QueueCommand::List(a) => {
            let metadata = match crate::compose::labels::by_name(a.metadata) {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("mailmux: --metadata {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            let filter = match a.select.filter() {
                Ok(f) => Filter {
                    reported: a.reported,
                    metadata: (!metadata.is_empty()).then_some(metadata),
                    ..f
                },
                Err(code) => return code,
            };
            // A search by recipient reads a bounded number of rows a page
            // (queue::SEARCH_ROWS): go on until the limit is met or the
            // rows run out.
            let mut page = Vec::new();
            let mut cursor = None;
            loop {
                let (got, next) = match store.list(&filter, a.limit - page.len(), cursor).await {
                    Ok(p) => p,
                    Err(e) => return fail(e),
                };
                page.extend(got);
                match next {
                    Some(n) if page.len() < a.limit => cursor = Some(n),
                    _ => break,
                }
            }
            for m in &page {
                if a.json {
                    let line = serde_json::json!({
                        "message_id": m.message_id, "status": m.state.as_str(),
                        "from": m.from, "recipients": m.to, "queued_at": time(m.queued_at),
                        "updated_at": time(m.updated_at), "relay": m.relay, "caller": m.caller,
                        "batch_id": m.batch, "tag": m.tag,
                        "priority": m.priority.as_str(), "node": m.node,
                    });
                    say!("{line}");
                } else {
                    say!(
                        "{}  {:<9}  {}  {} -> {}  {}{}{}{}",
                        time(m.queued_at),
                        m.state.as_str(),
                        m.message_id,
                        m.from.as_deref().map_or("-".into(), shown::address),
                        m.to.iter()
                            .map(|a| shown::address(a))
                            .collect::<Vec<_>>()
                            .join(","),
                        m.caller.as_deref().unwrap_or("-"),
                        m.tag
                            .as_deref()
                            .map(|t| format!("  tag {}", shown::text(t)))
                            .unwrap_or_default(),
                        if m.priority.is_high() { "  high" } else { "" },
                        m.node
                            .as_deref()
                            .map(|n| format!("  @{n}"))
                            .unwrap_or_default(),
                    );
                }
            }
            ExitCode::SUCCESS
        }
        QueueCommand::Suppress(cmd) => suppress(config, store, cmd).await,
        QueueCommand::Show(a) => {
            let mut r = match store.get(&a.id).await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    eprintln!("mailmux: no message {:?}", a.id);
                    return ExitCode::from(EXIT_REFUSED);
                }
                Err(e) => return fail(e),
            };
            // By the configuration this command runs with, as a daemon on
            // it answers get_message_status.
            let caller = r.caller.as_deref().and_then(|c| config.safety.policy_of(c));
            let max_age = caller.and_then(|p| p.max_age);
            r.expires_at = r.expiry(max_age.unwrap_or(config.queue.max_age));
            let out = MessageStatusResult::from(&r);
            match serde_json::to_string_pretty(&out) {
                Ok(json) => say!("{json}"),
                Err(e) => eprintln!("mailmux: {e}"),
            }
            // An address that does not read as where the mail goes (a
            // lookalike domain, a hidden character) is said plainly.
            for a in r.from.iter().chain(&r.to) {
                let plain = shown::address(a);
                if plain != *a {
                    eprintln!("mailmux: note: {a:?} is {plain}");
                }
            }
            let meta = crate::audit::Meta::of(r.meta.as_deref());
            if let Some(why) = meta.held_by {
                say!("held because {why}");
            }
            if let Some(t) = meta.template {
                say!("written from template {t}");
            }
            if let Ok(Some(p)) = store.load(&a.id).await {
                let text = String::from_utf8_lossy(&p.bytes);
                let headers = text.split("\r\n\r\n").next().unwrap_or("");
                if a.body {
                    say!("{text}");
                } else {
                    say!("{headers}\n(body not shown; --body prints it)");
                }
            }
            ExitCode::SUCCESS
        }
        QueueCommand::Cancel(CancelArgs { id: None, select }) => {
            each(config, store, select, Bulk::Cancel).await
        }
        QueueCommand::Cancel(CancelArgs { id: Some(id), .. }) => match store.cancel(&id).await {
            Ok(Cancel::Cancelled) => {
                let told = Told::open(config);
                audit(&told, store, &id, Action::Cancelled, None).await;
                told.finish().await;
                say!("{id}: cancelled");
                ExitCode::SUCCESS
            }
            Ok(Cancel::Refused(state)) => {
                eprintln!(
                    "mailmux: {id} is {}; only a scheduled, queued or held message can be cancelled",
                    state.as_str()
                );
                ExitCode::from(EXIT_REFUSED)
            }
            Ok(Cancel::NotFound) => {
                eprintln!("mailmux: no message {id:?}");
                ExitCode::from(EXIT_REFUSED)
            }
            Err(e) => fail(e),
        },
        QueueCommand::Retry(RetryArgs {
            id: None,
            select,
            force,
        }) => each(config, store, select, Bulk::Retry { force }).await,
        QueueCommand::Retry(RetryArgs {
            id: Some(id),
            force,
            ..
        }) => match store.retry(&id, force).await {
            Ok(Retry::Queued) => {
                say!("{id}: queued for a fresh attempt");
                ExitCode::SUCCESS
            }
            Ok(Retry::NeedsForce) => {
                eprintln!(
                    "mailmux: {id} is unknown: the server may already have it; --force sends it again"
                );
                ExitCode::from(EXIT_REFUSED)
            }
            Ok(Retry::Refused(state)) => {
                let why = match state {
                    State::Held | State::Rejected | State::Expired => {
                        "a message held for approval goes out only when approved"
                    }
                    // Retryable in its state, but its bytes are not stored.
                    State::Unknown | State::Failed | State::Queued => {
                        "its bytes are not stored (a crash cut its delivery off after the final \".\"), so it cannot be sent again"
                    }
                    _ => {
                        "only a queued, failed or expired message (or, forced, an unknown one) can be retried"
                    }
                };
                eprintln!("mailmux: {id} is {}; {why}", state.as_str());
                ExitCode::from(EXIT_REFUSED)
            }
            Ok(Retry::NotFound) => {
                eprintln!("mailmux: no message {id:?}");
                ExitCode::from(EXIT_REFUSED)
            }
            Err(e) => fail(e),
        },
        QueueCommand::Purge(a) => {
            let age = match crate::config::parse_duration(&a.older_than) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("mailmux: --older-than: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            let now = queue::now_millis();
            let finished = now - age.as_millis() as i64;
            let keys = now - config.queue.idempotency_ttl.as_millis() as i64;
            match queue::purge(store, finished, keys, queue::PURGE_CHUNK).await {
                Ok(n) => {
                    say!("purged {n} finished messages");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        QueueCommand::Stats(StatsArgs { batch, tag }) if batch.is_some() || tag.is_some() => {
            if [&batch, &tag].iter().any(|v| v.as_deref() == Some("")) {
                eprintln!("mailmux: --batch and --tag take a value that is not empty");
                return ExitCode::from(EXIT_USAGE);
            }
            let filter = Filter {
                batch,
                tag,
                ..Filter::default()
            };
            match store.count(&filter).await {
                Ok(counts) => {
                    for st in State::ALL {
                        let n = counts.iter().find(|c| c.0 == st).map_or(0, |c| c.1);
                        say!("{:<10} {n}", st.as_str());
                    }
                    let total: u64 = counts.iter().map(|c| c.1).sum();
                    say!("{:<10} {total}", "total");
                    if total == 0 {
                        eprintln!("mailmux: no message matches");
                        return ExitCode::from(EXIT_REFUSED);
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        QueueCommand::Stats(_) => match store.stats().await {
            Ok(s) => {
                for st in State::ALL {
                    let n = s.counts.iter().find(|c| c.0 == st).map_or(0, |c| c.1);
                    say!("{:<10} {n}", st.as_str());
                }
                if let Some(t) = s.oldest_queued_at {
                    say!("oldest queued: {}", time(t));
                }
                if let Some(t) = s.next_retry_at {
                    say!("next retry:    {}", time(t));
                }
                say!("sent copies pending: {}", s.copies_pending);
                match store.paused().await {
                    Ok(p) => say!("delivery: {}", pause_text(p.as_ref())),
                    Err(e) => return fail(e),
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        QueueCommand::Pause(a) => {
            let reason = match crate::mcp::http::pause_reason(a.reason) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("mailmux: --{e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            match queue::pause(store, "queue command", reason).await {
                Ok((pause, true)) => {
                    let told = Told::open(config);
                    if let Some(log) = &told.audit {
                        log.delivery("paused", &pause.by, pause.reason.as_deref());
                    }
                    if let Some(n) = &told.notify {
                        n.delivery("paused", &pause.by, pause.reason.as_deref());
                    }
                    told.finish().await;
                    say!("delivery: {}", pause_text(Some(&pause)));
                    say!(
                        "running daemons start no new delivery within 100 ms; mail is still accepted and queued"
                    );
                    ExitCode::SUCCESS
                }
                Ok((pause, false)) => {
                    say!("delivery was paused already: {}", pause_text(Some(&pause)));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        QueueCommand::Resume => match store.set_paused(None).await {
            Ok(true) => {
                let told = Told::open(config);
                if let Some(log) = &told.audit {
                    log.delivery("resumed", "queue command", None);
                }
                if let Some(n) = &told.notify {
                    n.delivery("resumed", "queue command", None);
                }
                told.finish().await;
                say!("delivery: resumed; running daemons deliver the queued mail within 100 ms");
                ExitCode::SUCCESS
            }
            Ok(false) => {
                say!("delivery was not paused");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        QueueCommand::Approve(_)
        | QueueCommand::Reject(_)
        | QueueCommand::Migrate
        | QueueCommand::Backup(_)
        | QueueCommand::Restore(_) => ExitCode::from(EXIT_USAGE),
    }
}

/// What [`each`] does to every message of a selection.
#[derive(Debug, Clone)]
enum Bulk {
    Cancel,
    Retry {
        force: bool,
    },
    /// An operator's decision on each held message (`by` names them).
    Decide {
        approve: bool,
        by: String,
    },
}

/// `cancel` or `retry` on every message `select` names. Their ids are read
/// first; then each message is acted on in a transaction of its own, under
/// the state rules of the one-message form, so that a message the daemon
/// delivers meanwhile is left as it is. Prints a line per message acted
/// on and one summing up; exits 0 when at least one was acted on.
async fn each(config: &Config, store: &dyn queue::Store, select: Select, bulk: Bulk) -> ExitCode {
    if !select.any() {
        eprintln!(
            "mailmux: name a message_id, or select messages with --status, --caller, --batch, --tag or --recipient"
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let filter = match select.filter() {
        Ok(f) => f,
        Err(code) => return code,
    };
    let listed = match queue::select(store, &filter).await {
        Ok(listed) => listed,
        Err(e) => {
            eprintln!("mailmux: {e}");
            return ExitCode::FAILURE;
        }
    };
    let matched = listed.len();
    // Why the others were left: their state, or that they are gone.
    let mut left = std::collections::BTreeMap::<String, usize>::new();
    // A finished message cannot be cancelled or decided on: no write to
    // learn that (a campaign's tag may name a million sent messages). A
    // retry acts on finished ones.
    let mut ids = Vec::with_capacity(matched);
    for (id, state) in listed {
        if state.is_final() && !matches!(bulk, Bulk::Retry { .. }) {
            *left.entry(state.as_str().to_owned()).or_default() += 1;
        } else {
            ids.push(id);
        }
    }
    let log = Told::open(config);
    let (verb, done_as) = match bulk {
        Bulk::Cancel => ("cancelled", "cancelled"),
        Bulk::Retry { .. } => ("queued for a fresh attempt", "queued"),
        Bulk::Decide { approve: true, .. } => ("approved", "approved"),
        Bulk::Decide { approve: false, .. } => ("rejected", "rejected; it will not be sent"),
    };
    let bulk = &bulk;
    let log = &log;
    let mut done = 0usize;
    // A few at a time, in order: the store's writer folds them into shared
    // commits.
    let outcomes = stream::iter(&ids)
        .map(|id| async move {
            let outcome = match bulk {
                Bulk::Cancel => store.cancel(id).await.map(|c| match c {
                    Cancel::Cancelled => None,
                    Cancel::Refused(state) => Some(state.as_str().to_owned()),
                    Cancel::NotFound => Some("purged".to_owned()),
                }),
                Bulk::Decide { approve, by } => {
                    let decision = Decision {
                        approve: *approve,
                        by: by.clone(),
                        hash: None,
                    };
                    decide(log, store, id, decision).await.map(|d| match d {
                        Decided::Released(_) | Decided::Rejected => None,
                        Decided::NotHeld(state) => Some(state.as_str().to_owned()),
                        Decided::HashMismatch => Some("changed".to_owned()),
                        Decided::NotFound => Some("purged".to_owned()),
                    })
                }
                Bulk::Retry { force } => store.retry(id, *force).await.map(|r| match r {
                    Retry::Queued => None,
                    Retry::NeedsForce => Some("unknown (retried only with --force)".to_owned()),
                    Retry::Refused(state @ (State::Unknown | State::Failed | State::Queued)) => {
                        Some(format!("{} without its bytes", state.as_str()))
                    }
                    Retry::Refused(state) => Some(state.as_str().to_owned()),
                    Retry::NotFound => Some("purged".to_owned()),
                }),
            };
            (id, outcome)
        })
        .buffered(queue::AT_ONCE);
    futures::pin_mut!(outcomes);
    while let Some((id, outcome)) = outcomes.next().await {
        match outcome {
            Ok(None) => {
                done += 1;
                match bulk {
                    Bulk::Cancel => audit(log, store, id, Action::Cancelled, None).await,
                    // Audited by `decide`.
                    Bulk::Decide { .. } | Bulk::Retry { .. } => {}
                }
                say!("{id}: {done_as}");
            }
            Ok(Some(why)) => *left.entry(why).or_default() += 1,
            Err(e) => {
                say!("{verb} {done} of {matched} messages before an error");
                eprintln!("mailmux: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    log.finish().await;
    let mut summary = format!("{verb}: {done} of {matched} matching messages");
    if !left.is_empty() {
        let rest: Vec<String> = left.iter().map(|(why, n)| format!("{n} {why}")).collect();
        summary.push_str(&format!("; left as they were: {}", rest.join(", ")));
    }
    say!("{summary}");
    if done == 0 {
        ExitCode::from(EXIT_REFUSED)
    } else {
        ExitCode::SUCCESS
    }
}

/// Who is told of a message the command acted on, as the daemon tells
/// them: the audit log and the `[notify]` webhook, each when configured.
struct Told {
    audit: Option<Audit>,
    notify: Option<std::sync::Arc<crate::notify::Notifier>>,
}

impl Told {
    fn open(config: &Config) -> Told {
        Told {
            audit: audit_log(config),
            notify: config
                .notify
                .clone()
                .map(|n| crate::notify::Notifier::start(Some(n))),
        }
    }

    fn any(&self) -> bool {
        self.audit.is_some() || self.notify.is_some()
    }

    fn event(&self, e: &Event<'_>) {
        if let Some(a) = &self.audit {
            a.event(e);
        }
        if let Some(n) = &self.notify {
            n.event(e);
        }
    }

    /// Lets the webhook's posts finish, for at most 15 s (three tries).
    async fn finish(&self) {
        if let Some(n) = &self.notify {
            let until = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
            n.drain(until).await;
        }
    }
}

/// The audit log, when one is configured and opens.
fn audit_log(config: &Config) -> Option<Audit> {
    config.safety.audit.path.as_ref()?;
    match Audit::open(config.safety.audit.clone()) {
        Ok(a) => Some(a),
        Err(e) => {
            eprintln!("mailmux: cannot open the audit log: {e}");
            None
        }
    }
}

/// Decides on a held message and audits the decision. An approved message
/// may be delivered by a running daemon at once: its `approved` line is
/// written from the record read before the decision, right after it, with
/// no read between, so that it comes before the daemon's `sent` line.
async fn decide(
    log: &Told,
    store: &dyn queue::Store,
    id: &str,
    decision: Decision,
) -> Result<Decided, StoreError> {
    // A rejection sends nothing: its line is written from the record after.
    let held = match log.any() && decision.approve {
        true => store.get(id).await.ok().flatten(),
        false => None,
    };
    let by = decision.by.clone();
    let decided = store.decide(id, decision).await?;
    match decided {
        Decided::Released(_) => {
            if let Some(r) = &held {
                log.event(&Event::of(Action::Approved, r, Some(&by)));
            }
        }
        Decided::Rejected => audit(log, store, id, Action::Rejected, Some(&by)).await,
        _ => {}
    }
    Ok(decided)
}

/// Tells the audit log and the webhook of `action` on `id` (by `by`), as
/// the daemon would.
async fn audit(log: &Told, store: &dyn queue::Store, id: &str, action: Action, by: Option<&str>) {
    if !log.any() {
        return;
    }
    let Ok(Some(r)) = store.get(id).await else {
        return;
    };
    log.event(&Event::of(action, &r, by));
}
