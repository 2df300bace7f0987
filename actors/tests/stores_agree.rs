//! The three queue stores against each other: random sequences of the
//! operations the daemon, its tools and the queue command make (accepts with
//! and without keys, batches at once and as they are composed, holds,
//! claims, loads, marks, outcomes, cancels, decisions, retries, expiry, Sent
//! copies, recovery and purges), applied to
//! the `memory` store, SQLite on disk and PostgreSQL (a throwaway server)
//! alike. After every operation the answers, every message's record, the
//! listings, the counts and the due messages must be the same on all three.
//! Times the stores take from the clock are compared as "now"; times the
//! test gives are compared exactly. `MAILMUX_RANDOM_SEED` replays a run; the
//! seed is printed.

mod support;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use mailmux_actors::queue::memory::MemoryStore;
use mailmux_actors::queue::postgres::{PgSettings, PgStore};
use mailmux_actors::queue::sqlite::SqliteStore;
use mailmux_actors::queue::{
    self, AttemptRecord, Decision, Feed, Filter, Hold, Millis, NewMessage, Priority, Record,
    RejectedRecord, Settle, State, Store, StoreError, Summary, now_millis,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::postgres::Postgres;

const DAY: Millis = 24 * 3600 * 1000;

/// Times on one scale for every store: the test's own (a day before or
/// after the run, exact) and the clock's (during the run, read as `now`).
#[derive(Clone, Copy)]
struct Clock {
    start: Millis,
}

impl Clock {
    fn past(&self, rng: &mut StdRng) -> Millis {
        self.start - DAY + rng.random_range(0..1000) * 1000
    }

    fn future(&self, rng: &mut StdRng) -> Millis {
        self.start + DAY + rng.random_range(0..1000) * 1000
    }

    /// A time to ask about: before the past region's end, during the run,
    /// or in the future region.
    fn probe(&self, rng: &mut StdRng) -> Millis {
        match rng.random_range(0..4) {
            0 => self.past(rng),
            1 => self.start + 3600 * 1000,
            2 => self.future(rng),
            _ => self.start + 3 * DAY,
        }
    }

    fn show(&self, t: Millis) -> String {
        if (self.start - 1000..self.start + 3600 * 1000).contains(&t) {
            "now".into()
        } else {
            format!("{}", t - self.start)
        }
    }

    fn show_opt(&self, t: Option<Millis>) -> String {
        t.map_or("-".into(), |t| self.show(t))
    }
}

/// One store's answer, in a form that compares across stores.
fn err(e: &StoreError) -> String {
    match e {
        StoreError::Unavailable(_) => "unavailable".into(),
        StoreError::Unconfirmed(_) => "unconfirmed".into(),
        StoreError::Fenced(_) => "fenced".into(),
        StoreError::Locked { .. } => "locked".into(),
        StoreError::TooNew { .. } => "too new".into(),
    }
}

fn answer<T: std::fmt::Debug>(r: Result<T, StoreError>) -> String {
    match r {
        Ok(v) => format!("{v:?}"),
        Err(e) => format!("Err({})", err(&e)),
    }
}

/// A mark's or a settle's answer: whether it was written. A message
/// cancelled (and purged) meanwhile is refused as missing by one store and
/// as fenced by another.
fn refused(r: Result<(), StoreError>) -> String {
    match r {
        Ok(()) => "written".into(),
        Err(_) => "refused".into(),
    }
}

fn record(c: &Clock, r: &Record) -> String {
    let history: Vec<String> = r
        .history
        .iter()
        .map(|(s, t)| format!("{}@{}", s.as_str(), c.show(*t)))
        .collect();
    let attempts: Vec<String> = r
        .attempts
        .iter()
        .map(|a| {
            format!(
                "{}:{:?}:{:?}:{}@{}",
                a.relay,
                a.class,
                a.code,
                a.text,
                c.show(a.at)
            )
        })
        .collect();
    format!(
        "{} {} from={:?} to={:?} size={} prefer={:?} key={:?} queued={} due={} next={} relay={:?} \
         accepted={:?} rejected={:?} reason={:?} note={:?} attempts={attempts:?} \
         history={history:?} caller={:?} meta={:?} decided_by={:?} copy={:?} batch={:?} tag={:?} \
         max_age={:?} priority={}",
        r.message_id,
        r.state.as_str(),
        r.from,
        r.to,
        r.size,
        r.prefer,
        r.idempotency_key,
        c.show(r.queued_at),
        c.show(r.due_at),
        c.show_opt(r.next_attempt_at),
        r.relay,
        r.accepted,
        r.rejected,
        r.reason,
        r.note,
        r.caller,
        r.meta,
        r.decided_by,
        r.sent_copy,
        r.batch,
        r.tag,
        r.max_age,
        r.priority.as_str(),
    )
}

fn summary(c: &Clock, s: &Summary) -> String {
    format!(
        "{} {} {:?} {:?} queued={} relay={:?} caller={:?} batch={:?} tag={:?} priority={}",
        s.message_id,
        s.state.as_str(),
        s.from,
        s.to,
        c.show(s.queued_at),
        s.relay,
        s.caller,
        s.batch,
        s.tag,
        s.priority.as_str()
    )
}

const ADDRESSES: [&str; 4] = [
    "ann@example.org",
    "Bob@Example.NET",
    "carol@example.org",
    "dave@elsewhere.test",
];

/// What the test knows of the messages, to pick sensible operations: the
/// ids given out, and the messages each store claimed (`due`) or marked.
#[derive(Default)]
struct Known {
    ids: Vec<String>,
    claimed: BTreeSet<String>,
    marked: BTreeSet<String>,
    /// Stored by `accept_marked`, without their bytes.
    bodiless: BTreeSet<String>,
    /// Of high priority.
    high: BTreeSet<String>,
    next: usize,
}

struct Run {
    rng: StdRng,
    clock: Clock,
    known: Known,
    log: String,
}

impl Run {
    fn new_id(&mut self) -> String {
        self.known.next += 1;
        let id = format!("m{}", self.known.next);
        self.known.ids.push(id.clone());
        id
    }

    fn any_id(&mut self) -> String {
        if self.known.ids.is_empty() || self.rng.random_bool(0.05) {
            return "missing".into();
        }
        let i = self.rng.random_range(0..self.known.ids.len());
        self.known.ids[i].clone()
    }

    fn message(&mut self, keyed: bool, held: bool) -> NewMessage {
        let message_id = self.new_id();
        let rng = &mut self.rng;
        let now = now_millis();
        let due_at = match rng.random_range(0..3) {
            0 => now,
            1 => self.clock.past(rng),
            _ => self.clock.future(rng),
        };
        let to: Vec<String> = (0..rng.random_range(1..3))
            .map(|_| ADDRESSES[rng.random_range(0..ADDRESSES.len())].to_string())
            .collect();
        let caller = [None, Some("a"), Some("b")][rng.random_range(0..3)].map(str::to_owned);
        let idempotency = (keyed && rng.random_bool(0.7)).then(|| {
            let key = format!("k{}", rng.random_range(0..4));
            (key, [rng.random_range(1..3u8); 32])
        });
        let hold = (held && rng.random_bool(0.25)).then(|| Hold {
            until: if rng.random_bool(0.5) {
                self.clock.past(rng)
            } else {
                self.clock.future(rng)
            },
            hash: [rng.random_range(1..3u8); 32],
        });
        let batch = [None, Some("b1"), Some("b2")][rng.random_range(0..3)].map(str::to_owned);
        let tag = [None, Some("t1"), Some("t2")][rng.random_range(0..3)].map(str::to_owned);
        let high = rng.random_bool(0.2);
        if high {
            self.known.high.insert(message_id.clone());
        }
        let n = self.known.next;
        let bytes: Arc<[u8]> =
            Arc::from(format!("Subject: {n}\r\n\r\n{}\r\n", "x".repeat(n % 7)).into_bytes());
        NewMessage {
            message_id,
            from: rng.random_bool(0.5).then(|| "sender@example.org".into()),
            to,
            bytes,
            prefer: rng.random_bool(0.2).then(|| "r1".into()),
            queued_at: now,
            due_at,
            idempotency,
            caller,
            meta: match rng.random_range(0..6) {
                0 => Some("{\"tool\":\"send_email\"}".into()),
                1 => Some("{\"subject\":\"s\",\"metadata\":{\"campaign\":\"spring\"}}".into()),
                2 => Some("{\"metadata\":{\"campaign\":\"fall\",\"user.id\":\"7\"}}".into()),
                _ => None,
            },
            hold,
            only: rng
                .random_bool(0.2)
                .then(|| Arc::from(vec!["r1".to_string()])),
            batch,
            tag,
            max_age: rng
                .random_bool(0.2)
                .then(|| rng.random_range(1000..100_000)),
            priority: if high {
                Priority::High
            } else {
                Priority::Normal
            },
        }
    }

    fn settle(&mut self, id: &str) -> Settle {
        let rng = &mut self.rng;
        let state = [
            State::Queued,
            State::Queued,
            State::Sent,
            State::Sent,
            State::Partial,
            State::Failed,
            State::Expired,
            State::Unknown,
            State::Cancelled,
        ][rng.random_range(0..9)];
        let next_attempt_at = (state == State::Queued).then(|| {
            if rng.random_bool(0.5) {
                self.clock.past(rng)
            } else {
                self.clock.future(rng)
            }
        });
        let attempts = (0..rng.random_range(0..3))
            .map(|i| AttemptRecord {
                at: self.clock.past(rng) + i,
                relay: format!("r{i}"),
                class: rng.random_bool(0.5).then(|| "transient".into()),
                code: rng.random_bool(0.7).then_some(451),
                text: format!("attempt {i}"),
                duration_ms: 3,
            })
            .collect();
        let (accepted, rejected) = match state {
            State::Sent => (vec!["ann@example.org".into()], vec![]),
            State::Partial => (
                vec!["ann@example.org".into()],
                vec![RejectedRecord {
                    address: "Bob@Example.NET".into(),
                    code: 550,
                    text: "no such user".into(),
                }],
            ),
            _ => (vec![], vec![]),
        };
        let copy = matches!(state, State::Sent | State::Partial) && rng.random_bool(0.3);
        let keeps = state.keeps_body() || copy;
        Settle {
            state,
            relay: rng.random_bool(0.8).then(|| "r1".into()),
            attempts,
            accepted,
            rejected,
            reason: (state == State::Failed).then(|| "rejected".into()),
            note: rng.random_bool(0.5).then(|| format!("note for {id}")),
            next_attempt_at,
            copy,
            body: (keeps && self.known.bodiless.contains(id))
                .then(|| Arc::from(b"Subject: restored\r\n\r\nbody\r\n".to_vec())),
        }
    }

    fn filter(&mut self) -> Filter {
        let rng = &mut self.rng;
        Filter {
            state: rng
                .random_bool(0.4)
                .then(|| State::ALL[rng.random_range(0..State::ALL.len())]),
            caller: rng
                .random_bool(0.3)
                .then(|| ["a", "b"][rng.random_range(0..2)].into()),
            batch: rng
                .random_bool(0.3)
                .then(|| ["b1", "b2"][rng.random_range(0..2)].into()),
            tag: rng
                .random_bool(0.3)
                .then(|| ["t1", "t2"][rng.random_range(0..2)].into()),
            recipient: rng
                .random_bool(0.3)
                .then(|| ["EXAMPLE.org", "bob", "elsewhere"][rng.random_range(0..3)].into()),
            reported: None,
            metadata: rng.random_bool(0.3).then(|| {
                let pairs: &[(&str, &str)] = [
                    &[("campaign", "spring")][..],
                    &[("user.id", "7")],
                    &[("campaign", "none")],
                    &[("campaign", "fall"), ("user.id", "7")],
                    &[("campaign", "spring"), ("user.id", "7")],
                ][rng.random_range(0..5)];
                pairs
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect()
            }),
        }
    }
}

/// Applies one random operation to every store; returns its name and each
/// store's answer.
async fn step(run: &mut Run, stores: &[Arc<dyn Store>]) -> (String, Vec<String>) {
    let c = run.clock;
    let pick = run.rng.random_range(0..110);
    let mut answers = Vec::new();
    let name;
    match pick {
        0..=17 => {
            let m = run.message(true, true);
            name = format!(
                "accept {} key={:?} caller={:?} due={} hold={:?}",
                m.message_id,
                m.idempotency.as_ref().map(|(k, h)| (k.clone(), h[0])),
                m.caller,
                c.show(m.due_at),
                m.hold.as_ref().map(|h| (c.show(h.until), h.hash[0]))
            );
            for s in stores {
                answers.push(answer(s.accept(m.clone()).await));
            }
        }
        18..=23 => {
            let atomic = run.rng.random_bool(0.5);
            let n = run.rng.random_range(1..4);
            let ms: Vec<NewMessage> = (0..n).map(|_| run.message(true, true)).collect();
            name = format!("accept_many atomic={atomic} {:?}", keys_of(&ms));
            for s in stores {
                answers.push(answer(s.accept_many(ms.clone(), atomic).await));
            }
        }
        24..=29 => {
            let mut m = run.message(false, false);
            m.due_at = m.queued_at;
            let id = m.message_id.clone();
            name = format!("accept_marked {id}");
            run.known.marked.insert(id.clone());
            run.known.bodiless.insert(id.clone());
            for s in stores {
                answers.push(answer(s.accept_marked(m.clone()).await));
            }
            // The round's own: PostgreSQL leases it to this daemon.
            run.known.claimed.insert(id);
        }
        30..=33 => {
            let mut m = run.message(false, false);
            m.due_at = m.queued_at;
            let id = m.message_id.clone();
            let st = run.settle(&id);
            name = format!("accept_settled {id} {:?}", st.state);
            for s in stores {
                answers.push(answer(s.accept_settled(m.clone(), st.clone()).await));
            }
        }
        34..=45 => {
            let now = c.probe(&mut run.rng);
            name = format!("due {}", c.show(now));
            for s in stores {
                // Each store's order within a priority is its own; the high
                // ones come first.
                let high = &run.known.high;
                let got = s.due(now, 1000).await.map(|ids| {
                    let first = ids.iter().take_while(|id| high.contains(*id)).count();
                    let mut ids = ids;
                    ids[..first].sort();
                    ids[first..].sort();
                    (first, ids)
                });
                if let Ok((_, ids)) = &got {
                    run.known.claimed.extend(ids.iter().cloned());
                }
                answers.push(answer(got));
            }
        }
        46..=55 => {
            let waiting: Vec<String> = run
                .known
                .claimed
                .difference(&run.known.marked)
                .cloned()
                .collect();
            let Some(id) = choose(&mut run.rng, &waiting) else {
                return ("nothing to mark".into(), vec![]);
            };
            name = format!("mark {id}");
            for s in stores {
                answers.push(refused(s.mark(&id).await));
            }
            run.known.marked.insert(id);
        }
        56..=67 => {
            let claimed: Vec<String> = run.known.claimed.iter().cloned().collect();
            let Some(id) = choose(&mut run.rng, &claimed) else {
                return ("nothing to settle".into(), vec![]);
            };
            let st = run.settle(&id);
            name = format!(
                "settle {id} {:?} next={} copy={}",
                st.state,
                c.show_opt(st.next_attempt_at),
                st.copy
            );
            for s in stores {
                answers.push(refused(s.settle(&id, st.clone()).await));
            }
            run.known.claimed.remove(&id);
            run.known.marked.remove(&id);
        }
        68..=74 => {
            let id = run.any_id();
            name = format!("cancel {id}");
            for s in stores {
                answers.push(answer(s.cancel(&id).await));
            }
        }
        75..=79 => {
            let id = run.any_id();
            let d = Decision {
                approve: run.rng.random_bool(0.7),
                by: "ops".into(),
                hash: [None, Some([1u8; 32]), Some([2u8; 32])][run.rng.random_range(0..3)],
            };
            name = format!(
                "decide {id} approve={} hash={:?}",
                d.approve,
                d.hash.map(|h| h[0])
            );
            for s in stores {
                answers.push(answer(s.decide(&id, d.clone()).await));
            }
        }
        80..=82 => {
            let now = c.probe(&mut run.rng);
            name = format!("expire_held {}", c.show(now));
            for s in stores {
                answers.push(answer(s.expire_held(now).await.map(|mut ids| {
                    ids.sort();
                    ids
                })));
            }
        }
        83..=87 => {
            let id = run.any_id();
            let force = run.rng.random_bool(0.3);
            name = format!("retry {id} force={force}");
            for s in stores {
                answers.push(answer(s.retry(&id, force).await));
            }
        }
        88..=91 => {
            let id = run.any_id();
            let outcome = ["copied", "failed: no folder"][run.rng.random_range(0..2)];
            name = format!("note_copy {id} {outcome}");
            for s in stores {
                answers.push(answer(s.note_copy(&id, outcome).await));
            }
        }
        100..=104 => {
            // A batch stored as it is composed, committed or abandoned.
            let atomic = run.rng.random_bool(0.5);
            let commit = run.rng.random_bool(0.8);
            let n = run.rng.random_range(1..4);
            let ms: Vec<NewMessage> = (0..n).map(|_| run.message(true, true)).collect();
            name = format!(
                "accept_stream atomic={atomic} commit={commit} {:?}",
                keys_of(&ms)
            );
            for s in stores {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                let ms = ms.clone();
                let feed = tokio::spawn(async move {
                    for m in ms {
                        let _ = tx.send(Feed::Message(Box::new(m))).await;
                    }
                    if commit {
                        let _ = tx.send(Feed::Commit).await;
                    }
                });
                answers.push(answer(s.accept_stream(rx, atomic).await));
                feed.await.unwrap();
            }
        }
        105..=109 => {
            let n = run.rng.random_range(1..5);
            // As the runner asks: each id once.
            let mut ids: Vec<String> = (0..n).map(|_| run.any_id()).collect();
            let mut once = BTreeSet::new();
            ids.retain(|id| once.insert(id.clone()));
            let max = [0, 1, 30, u64::MAX][run.rng.random_range(0..4)];
            name = format!("load_many {ids:?} max_bytes={max}");
            for s in stores {
                answers.push(answer(s.load_many(&ids, max).await.map(|ps| {
                    let mut got: Vec<(String, usize)> = ps
                        .iter()
                        .map(|p| (p.message_id.clone(), p.bytes.len()))
                        .collect();
                    got.sort();
                    got
                })));
            }
        }
        92..=93 => {
            name = "recover".into();
            for s in stores {
                answers.push(answer(s.recover().await.map(|mut r| {
                    r.unknown.sort();
                    r
                })));
            }
            // Whatever was in a round is back in the store's hands.
            run.known.claimed.clear();
            run.known.marked.clear();
        }
        _ => {
            let finished = [c.start - DAY, c.start + DAY][run.rng.random_range(0..2)];
            let keys = [c.start - DAY, c.start + DAY][run.rng.random_range(0..2)];
            let chunk = run.rng.random_range(1..5);
            name = format!(
                "purge finished<{} keys<{} chunk={chunk}",
                c.show(finished),
                c.show(keys)
            );
            for s in stores {
                answers.push(answer(
                    queue::purge(s.as_ref(), finished, keys, chunk).await,
                ));
            }
        }
    }
    (name, answers)
}

/// Each message's id and key (with its content hash's first byte), for the
/// step's name.
fn keys_of(ms: &[NewMessage]) -> Vec<(String, Option<(String, u8)>)> {
    ms.iter()
        .map(|m| {
            let key = m.idempotency.as_ref().map(|(k, h)| (k.clone(), h[0]));
            (m.message_id.clone(), key)
        })
        .collect()
}

fn choose(rng: &mut StdRng, from: &[String]) -> Option<String> {
    (!from.is_empty()).then(|| from[rng.random_range(0..from.len())].clone())
}

/// Everything a caller or operator can read of one store, as text.
async fn view(run: &mut Run, store: &dyn Store) -> Vec<String> {
    let c = run.clock;
    let mut out = Vec::new();
    for id in &run.known.ids {
        let r = store.get(id).await;
        out.push(match r {
            Ok(Some(r)) => record(&c, &r),
            other => format!("{id}: {}", answer(other.map(|_| ()))),
        });
        let loaded = store.load(id).await.map(|p| {
            p.map(|p| {
                format!(
                    "{} {} rounds={} bytes={} only={:?} max_age={:?}",
                    p.message_id,
                    p.state.as_str(),
                    p.rounds,
                    p.bytes.len(),
                    p.only,
                    p.max_age
                )
            })
        });
        out.push(format!("load {id}: {}", answer(loaded)));
    }
    for caller in [None, Some("a"), Some("b")] {
        for k in 0..4 {
            let key = format!("k{k}");
            out.push(format!(
                "key {caller:?}/{key}: {}",
                answer(store.find_key(caller, &key).await)
            ));
        }
    }
    let stats = store.stats().await.map(|mut s| {
        s.counts.retain(|c| c.1 > 0);
        s.counts.sort();
        format!(
            "counts={:?} oldest_queued={} next_retry={} copies_pending={}",
            s.counts,
            c.show_opt(s.oldest_queued_at),
            c.show_opt(s.next_retry_at),
            s.copies_pending
        )
    });
    out.push(format!("stats: {}", answer(stats)));
    out.push(format!(
        "next_due: {}",
        answer(store.next_due().await.map(|t| c.show_opt(t)))
    ));
    // The same two filters on every store: the run's generator is shared.
    let filters = [Filter::default(), run.filter(), run.filter()];
    let page = run.rng.random_range(1..6);
    for f in filters {
        let mut cursor = None;
        let mut lines = Vec::new();
        loop {
            match store.list(&f, page, cursor).await {
                Ok((rows, next)) => {
                    lines.extend(rows.iter().map(|s| summary(&c, s)));
                    match next {
                        Some(n) => cursor = Some(n),
                        None => break,
                    }
                }
                Err(e) => {
                    lines.push(format!("Err({})", err(&e)));
                    break;
                }
            }
        }
        out.push(format!("list {f:?} by {page}: {lines:#?}"));
        let counted = store.count(&f).await.map(|mut counts| {
            counts.sort_by_key(|(state, _)| state.as_str());
            format!("{counts:?}")
        });
        out.push(format!("count {f:?}: {}", answer(counted)));
    }
    out
}

fn pg(url: &str) -> PgSettings {
    PgSettings {
        url: url.into(),
        pool: 4,
        node_id: "n1".into(),
        lease: Duration::from_secs(600),
    }
}

fn seed() -> u64 {
    match std::env::var("MAILMUX_RANDOM_SEED") {
        Ok(s) => s.parse().expect("MAILMUX_RANDOM_SEED is a number"),
        Err(_) => rand::random(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_three_stores_agree_on_random_operations() {
    let server = Postgres::start();
    let seed = seed();
    println!("MAILMUX_RANDOM_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    const SEQUENCES: usize = 6;
    const STEPS: usize = 120;
    for seq in 0..SEQUENCES {
        let stores: Vec<Arc<dyn Store>> = vec![
            Arc::new(MemoryStore::new()),
            Arc::new(SqliteStore::open(&dir.path().join(format!("q{seq}.db"))).unwrap()),
            Arc::new(PgStore::open(&pg(&server.database())).await.unwrap()),
        ];
        let mut run = Run {
            rng: StdRng::seed_from_u64(rng.random()),
            clock: Clock {
                start: now_millis(),
            },
            known: Known::default(),
            log: String::new(),
        };
        for n in 0..STEPS {
            let (name, answers) = step(&mut run, &stores).await;
            let _ = writeln!(run.log, "{n}: {name} -> {:?}", answers.first());
            let kinds: Vec<&str> = stores.iter().map(|s| s.kind()).collect();
            for (kind, a) in kinds.iter().zip(&answers).skip(1) {
                assert_eq!(
                    &answers[0], a,
                    "sequence {seq} step {n} ({name}): memory and {kind} answer differently; \
                     the steps so far:\n{}",
                    run.log
                );
            }
            // Each store's view with the same random filters: one
            // generator state per view.
            let state = run.rng.clone();
            let mut views = Vec::new();
            for s in &stores {
                run.rng = state.clone();
                views.push(view(&mut run, s.as_ref()).await);
            }
            for (kind, v) in kinds.iter().zip(&views).skip(1) {
                for (a, b) in views[0].iter().zip(v) {
                    assert_eq!(
                        a, b,
                        "sequence {seq} step {n} ({name}): memory and {kind} read differently; \
                         the steps so far:\n{}",
                        run.log
                    );
                }
            }
        }
        for s in &stores {
            s.close().await;
        }
    }
}
