//! The queue store at scale: fills a SQLite store with N finished messages,
//! then measures what the daemon pays per message and at start-up with that
//! many in the store: accept + mark + settle at C=32, the two writes of a
//! call that waits (its message stored at its commit mark, then settled
//! with one attempt) at C=32, recovery on reopen, a status lookup, the first
//! page of a listing, a page of the oldest batch as its caller lists it, a
//! page of a search by a recipient that matches none, and the queue's
//! counts, and a backup of the whole store (`mailmux queue
//! backup`). Run by hand; it prints markdown, and checks only that
//! each answer is whole.
//!
//! ```text
//! cargo bench --bench queue -- --messages 10000,1000000
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mailmux_actors::queue::sqlite::SqliteStore;
use mailmux_actors::queue::{AttemptRecord, Filter, NewMessage, Settle, State, Store, now_millis};

/// Concurrent writers, as at C=32 over MCP.
const WRITERS: usize = 32;
/// Messages measured on top of the fill.
const MEASURED: usize = 10_000;
/// Body of each stored message: a small message, so that a million fit.
const BODY: usize = 256;
/// The first messages of the fill are one batch: the listing of the
/// oldest batch.
const BATCH: usize = 100;

fn message(id: String) -> NewMessage {
    let now = now_millis();
    NewMessage {
        message_id: id,
        from: Some("bench@example.org".into()),
        to: vec!["rcpt@example.org".into()],
        bytes: Arc::from(vec![b'x'; BODY]),
        prefer: None,
        queued_at: now,
        due_at: now,
        idempotency: None,
        caller: Some("bench".into()),
        meta: None,
        hold: None,
        only: None,
        batch: None,
        tag: None,
        max_age: None,
        priority: Default::default(),
    }
}

fn sent() -> Settle {
    Settle {
        state: State::Sent,
        relay: Some("sink".into()),
        attempts: vec![],
        accepted: vec!["rcpt@example.org".into()],
        rejected: vec![],
        reason: None,
        note: None,
        next_attempt_at: None,
        copy: false,
        body: None,
    }
}

/// `n` messages through the life a delivered message has: accept, mark,
/// settle; `WRITERS` at a time. Returns the wall time.
async fn lifecycle(store: Arc<dyn Store>, prefix: &str, n: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let store = store.clone();
        let prefix = prefix.to_string();
        tasks.spawn(async move {
            let mut i = w;
            while i < n {
                let id = format!("{prefix}-{i}");
                let mut m = message(id.clone());
                if prefix == "fill" && i < BATCH {
                    m.batch = Some("first".into());
                }
                store.accept(m).await?;
                store.mark(&id).await?;
                store.settle(&id, sent()).await?;
                i += WRITERS;
            }
            anyhow::Ok(())
        });
    }
    for r in tasks.join_all().await {
        r?;
    }
    Ok(started.elapsed())
}

/// `n` messages through the writes of a call that waits and has no key: the
/// insert at its commit mark, then the settle with its one attempt;
/// `WRITERS` at a time. Returns the wall time.
async fn waiting(store: Arc<dyn Store>, n: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let store = store.clone();
        tasks.spawn(async move {
            let mut i = w;
            while i < n {
                let id = format!("waiting-{i}");
                store.accept_marked(message(id.clone())).await?;
                let mut outcome = sent();
                outcome.attempts.push(AttemptRecord {
                    at: now_millis(),
                    relay: "sink".into(),
                    class: None,
                    code: Some(250),
                    text: "2.0.0 Ok: queued".into(),
                    duration_ms: 1,
                });
                store.settle(&id, outcome).await?;
                i += WRITERS;
            }
            anyhow::Ok(())
        });
    }
    for r in tasks.join_all().await {
        r?;
    }
    Ok(started.elapsed())
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed())
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

async fn measure(fill: usize) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("queue.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path)?);
    let filled = lifecycle(store.clone(), "fill", fill).await?;
    eprintln!("filled {fill} in {filled:?}");
    let took = lifecycle(store.clone(), "measured", MEASURED).await?;
    let per_msg = took / MEASURED as u32;
    let marked = waiting(store.clone(), MEASURED).await?;

    // Lookups against the full store.
    let mut lookups = Vec::new();
    for k in 0..200 {
        let id = format!("fill-{}", (k * 7919) % fill.max(1));
        let t = Instant::now();
        store.get(&id).await?.context("a stored message")?;
        lookups.push(t.elapsed());
    }
    lookups.sort_unstable();
    let t = Instant::now();
    store.list(&Filter::default(), 100, None).await?;
    let list = t.elapsed();
    let oldest = Filter {
        caller: Some("bench".into()),
        batch: Some("first".into()),
        ..Filter::default()
    };
    let t = Instant::now();
    let (batch, _) = store.list(&oldest, BATCH, None).await?;
    let list_batch = t.elapsed();
    anyhow::ensure!(batch.len() == BATCH.min(fill), "the oldest batch, whole");
    // A search by recipient that matches none: one page reads at most
    // queue::SEARCH_ROWS rows.
    let nobody = Filter {
        caller: Some("bench".into()),
        recipient: Some("nobody@".into()),
        ..Filter::default()
    };
    let t = Instant::now();
    let (found, _) = store.list(&nobody, 100, None).await?;
    let search = t.elapsed();
    anyhow::ensure!(found.is_empty(), "no message to nobody");
    let t = Instant::now();
    store.stats().await?;
    let stats = t.elapsed();
    let t = Instant::now();
    store.due(now_millis(), 256).await?;
    let due = t.elapsed();
    drop(store);

    // Start-up: open (lock, migrations) and recover.
    let (reopened, open) = timed(|| SqliteStore::open(&path));
    let reopened = reopened?;
    let t = Instant::now();
    reopened.recover().await?;
    let recover = t.elapsed();
    let size = std::fs::metadata(&path)?.len();
    // `mailmux queue backup`: the whole store copied and checked.
    let t = Instant::now();
    let copy = reopened
        .backup(&dir.path().join("copy.db"))
        .await
        .map_err(anyhow::Error::msg)?;
    let backup = t.elapsed();
    let copied: u64 = copy.counts.iter().map(|c| c.1).sum();
    anyhow::ensure!(copied as usize == fill + 2 * MEASURED, "the copy, whole");

    Ok(format!(
        "| {fill} | {:.0} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} |",
        MEASURED as f64 / took.as_secs_f64(),
        us(per_msg),
        MEASURED as f64 / marked.as_secs_f64(),
        us(lookups[lookups.len() / 2]),
        us(lookups[lookups.len() * 99 / 100]),
        us(list),
        us(list_batch),
        us(search),
        us(stats),
        us(due),
        us(open),
        us(recover),
        size as f64 / 1e6,
        backup.as_secs_f64() * 1e3,
        copy.bytes as f64 / 1e6,
    ))
}

fn main() -> anyhow::Result<()> {
    let mut fills = vec![10_000, 1_000_000];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => {}
            "--messages" => {
                fills = args
                    .next()
                    .context("--messages needs a value")?
                    .split(',')
                    .map(|s| s.trim().replace('_', "").parse::<usize>())
                    .collect::<Result<_, _>>()
                    .context("--messages takes numbers")?;
            }
            other => bail!("unknown argument {other:?}; usage: --messages N[,N...]"),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut out = String::from(
        "| messages in the store | accept+mark+settle msgs/s (C=32) | µs per message (wall) | marked+settle msgs/s (C=32) | get p50 µs | get p99 µs | list 100 µs | list the oldest batch µs | search a recipient, a page µs | stats µs | due µs | open µs | recover µs | file MB | backup ms | copy MB |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for fill in fills {
        out.push_str(&rt.block_on(measure(fill))?);
        out.push('\n');
    }
    println!("{out}");
    Ok(())
}
