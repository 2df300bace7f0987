//! One conformance suite for every queue store: the same checks run against
//! SQLite on disk, the in-memory store and PostgreSQL (a throwaway server),
//! so that no backend drifts. PostgreSQL's own rules (leases, fencing,
//! claims shared by daemons, migrations under a lock) are tested here too.

mod support;

use std::sync::Arc;
use std::time::Duration;

use mailmux_actors::queue::postgres::{PgSettings, PgStore};
use support::postgres::Postgres;

use mailmux_actors::queue::memory::MemoryStore;
use mailmux_actors::queue::sqlite::SqliteStore;
use mailmux_actors::queue::{
    self, Accepted, AttemptRecord, Cancel, CopyDue, Decided, Decision, Feed, Filter, Hold,
    NewMessage, Priority, Purged, RateTake, RejectedRecord, ReportRecord, Retry, Settle, State,
    Store, StoreError, Suppression, SuppressionChange, SuppressionPage, SuppressionQuery,
    now_millis,
};

fn by_state(state: State) -> Filter {
    Filter {
        state: Some(state),
        caller: None,
        ..Filter::default()
    }
}

/// A small message from a@ to b@example.org for a [`Queue`]'s `submit`,
/// with its deadline `within` from now.
fn mail_to_b(id: &str, within: Duration) -> mailmux_actors::Mail {
    mailmux_actors::Mail {
        message_id: id.into(),
        from: Some("a@example.org".parse().unwrap()),
        to: vec!["b@example.org".parse().unwrap()],
        bytes: Arc::from(format!("Message-ID: <{id}>\r\nSubject: x\r\n\r\nbody\r\n").as_bytes()),
        deadline: tokio::time::Instant::now() + within,
        prefer: None,
        only: None,
        priority: Default::default(),
    }
}

/// A dispatcher over `relays`, with default settings otherwise.
async fn dispatcher_to(relays: Vec<mailmux_actors::RelaySettings>) -> mailmux_actors::Dispatcher {
    use mailmux_actors::{Limits, RouterSettings, Settings, SupervisorSettings};
    mailmux_actors::Dispatcher::start(Settings {
        relays,
        router: RouterSettings::default(),
        supervisor: SupervisorSettings::default(),
        limits: Limits::default(),
    })
    .await
    .unwrap()
}

/// `mail` for the queue, with no key and no caller.
fn submission(
    mail: mailmux_actors::Mail,
    wait: bool,
    send_at: Option<std::time::SystemTime>,
    cancel: Option<tokio_util::sync::CancellationToken>,
) -> mailmux_actors::queue::Submit {
    mailmux_actors::queue::Submit {
        mail,
        send_at,
        idempotency: None,
        wait,
        caller: None,
        meta: None,
        hold: None,
        batch: None,
        tag: None,
        max_age: None,
        cancel,
    }
}

fn message(id: &str, key: Option<(&str, u8)>) -> NewMessage {
    let now = now_millis();
    NewMessage {
        message_id: id.into(),
        from: Some("a@example.org".into()),
        to: vec!["b@example.org".into(), "c@example.org".into()],
        bytes: Arc::from(&b"Subject: x\r\n\r\nbody\r\n"[..]),
        prefer: None,
        queued_at: now,
        due_at: now,
        idempotency: key.map(|(k, h)| (k.to_string(), [h; 32])),
        caller: Some("agent".into()),
        meta: None,
        hold: None,
        only: None,
        batch: None,
        tag: None,
        max_age: None,
        priority: Default::default(),
    }
}

/// The states of a message's history, oldest first.
fn states_of(r: &queue::Record) -> Vec<State> {
    r.history.iter().map(|(s, _)| *s).collect()
}

fn settle(state: State, next: Option<i64>) -> Settle {
    Settle {
        state,
        relay: Some("r".into()),
        attempts: vec![],
        accepted: vec![],
        rejected: vec![],
        reason: None,
        note: None,
        next_attempt_at: next,
        copy: false,
        body: None,
    }
}

/// Idempotency keys are each caller's own: another caller's equal key, with
/// the same content or other, stores a message of its own; each caller's
/// repeat replays its own; a key is found only by its caller. And a listing
/// of any size.
async fn keys_are_each_callers_own(store: &dyn Store) {
    let by = |id: &str, caller: &str, hash: u8| {
        let mut m = message(id, Some(("order-42", hash)));
        m.caller = Some(caller.into());
        m
    };
    for (id, caller) in [("a1", "agent"), ("b1", "other")] {
        assert_eq!(
            store.accept(by(id, caller, 1)).await.unwrap(),
            Accepted::Stored(State::Queued),
            "{caller}"
        );
    }
    assert_eq!(
        store.accept(by("c1", "third", 2)).await.unwrap(),
        Accepted::Stored(State::Queued)
    );
    assert_eq!(
        store.accept(by("a2", "agent", 1)).await.unwrap(),
        Accepted::Replay("a1".into())
    );
    assert_eq!(
        store.accept(by("b2", "other", 2)).await.unwrap(),
        Accepted::Conflict("b1".into())
    );
    for (caller, id) in [
        ("agent", Some("a1")),
        ("other", Some("b1")),
        ("third", Some("c1")),
    ] {
        assert_eq!(
            store
                .find_key(Some(caller), "order-42")
                .await
                .unwrap()
                .as_deref(),
            id,
            "{caller}"
        );
    }
    assert_eq!(
        store.find_key(Some("fourth"), "order-42").await.unwrap(),
        None
    );
    assert_eq!(store.find_key(None, "order-42").await.unwrap(), None);
    // A page as large as a caller may ask for (the command line takes any
    // number) lists every message, with no page after it.
    for limit in [usize::MAX, i64::MAX as usize] {
        let (page, next) = store.list(&Filter::default(), limit, None).await.unwrap();
        assert_eq!((page.len(), next), (3, None), "{limit}");
    }
}

async fn conformance(store: &dyn Store) {
    // Accept, and keys: replay with the same hash, conflict with another.
    assert_eq!(
        store.accept(message("m1", Some(("k", 1)))).await.unwrap(),
        Accepted::Stored(State::Queued)
    );
    assert_eq!(
        store.accept(message("m2", Some(("k", 1)))).await.unwrap(),
        Accepted::Replay("m1".into())
    );
    assert_eq!(
        store.accept(message("m3", Some(("k", 2)))).await.unwrap(),
        Accepted::Conflict("m1".into())
    );
    assert!(store.get("m2").await.unwrap().is_none());
    assert_eq!(
        store.find_key(Some("agent"), "k").await.unwrap().as_deref(),
        Some("m1")
    );

    // A future due time is scheduled, and not due now.
    let mut later = message("m4", None);
    later.due_at += 60_000;
    assert_eq!(
        store.accept(later).await.unwrap(),
        Accepted::Stored(State::Scheduled)
    );
    let due = store.due(now_millis(), 10).await.unwrap();
    assert_eq!(due, ["m1"]);

    // The body loads for delivery; the record never carries it.
    let p = store.load("m1").await.unwrap().unwrap();
    assert_eq!(&p.bytes[..], b"Subject: x\r\n\r\nbody\r\n");
    assert_eq!(p.to, ["b@example.org", "c@example.org"]);

    // Deferred: queued with a next attempt in the past is due again.
    let t = now_millis() - 1;
    store
        .settle("m1", settle(State::Queued, Some(t)))
        .await
        .unwrap();
    let r = store.get("m1").await.unwrap().unwrap();
    assert_eq!(r.state, State::Queued);
    assert_eq!(r.next_attempt_at, Some(t));
    assert_eq!(store.due(now_millis(), 10).await.unwrap(), ["m1"]);

    // The crash rule: marked → unknown at recovery, never due again.
    store.mark("m1").await.unwrap();
    let rec = store.recover().await.unwrap();
    assert_eq!((rec.unknown.len(), rec.requeued), (1, 0));
    let r = store.get("m1").await.unwrap().unwrap();
    assert_eq!(r.state, State::Unknown);
    let states: Vec<State> = r.history.iter().map(|h| h.0).collect();
    assert_eq!(
        states,
        [State::Queued, State::Queued, State::Sending, State::Unknown]
    );
    assert!(store.due(now_millis(), 10).await.unwrap().is_empty());

    // Reports: each recipient and reason once, oldest first; none for a
    // message the store does not hold.
    let report = |reason: &str, address: &str, at| ReportRecord {
        at,
        reason: reason.into(),
        address: address.into(),
        detail: "550 5.1.1 no\tsuch user".into(),
    };
    assert!(store.get("m1").await.unwrap().unwrap().reports.is_empty());
    store
        .note_reports("m1", vec![report("bounced", "b@example.org", 1)])
        .await
        .unwrap();
    store
        .note_reports(
            "m1",
            vec![
                report("bounced", "b@example.org", 2),
                report("complained", "c@example.org", 3),
            ],
        )
        .await
        .unwrap();
    store
        .note_reports("gone", vec![report("bounced", "b@example.org", 4)])
        .await
        .unwrap();
    let mut tab_free = report("bounced", "b@example.org", 1);
    tab_free.detail = "550 5.1.1 no such user".into();
    let mut second = report("complained", "c@example.org", 3);
    second.detail = tab_free.detail.clone();
    assert_eq!(
        store.get("m1").await.unwrap().unwrap().reports,
        [tab_free, second]
    );
    // Its body stays (until retain) for an operator's forced retry.
    assert_eq!(store.retry("m1", false).await.unwrap(), Retry::NeedsForce);
    assert!(store.load("m1").await.unwrap().is_some(), "body kept");

    // Cancel: scheduled yes; finished no; missing is not found.
    assert_eq!(store.cancel("m4").await.unwrap(), Cancel::Cancelled);
    assert_eq!(
        store.cancel("m4").await.unwrap(),
        Cancel::Refused(State::Cancelled)
    );
    assert_eq!(store.cancel("nope").await.unwrap(), Cancel::NotFound);

    // Listing pages newest first.
    for i in 0..5 {
        store.accept(message(&format!("l{i}"), None)).await.unwrap();
    }
    let (page, next) = store.list(&Filter::default(), 4, None).await.unwrap();
    let ids: Vec<&str> = page.iter().map(|s| s.message_id.as_str()).collect();
    assert_eq!(ids, ["l4", "l3", "l2", "l1"]);
    let (page, next) = store.list(&Filter::default(), 4, next).await.unwrap();
    let ids: Vec<&str> = page.iter().map(|s| s.message_id.as_str()).collect();
    assert_eq!(ids, ["l0", "m4", "m1"]);
    assert!(next.is_none());
    let (page, _) = store
        .list(&by_state(State::Unknown), 10, None)
        .await
        .unwrap();
    assert_eq!(page.len(), 1);

    let stats = store.stats().await.unwrap();
    let count = |s: State| stats.counts.iter().find(|c| c.0 == s).map_or(0, |c| c.1);
    assert_eq!(count(State::Queued), 5);
    assert_eq!(count(State::Unknown), 1);
    assert_eq!(count(State::Cancelled), 1);

    // Purge removes finished messages and old keys only.
    let n = queue::purge(store, now_millis() + 1, now_millis() + 1, 1000)
        .await
        .unwrap();
    assert_eq!(n, 2);
    assert!(store.get("m1").await.unwrap().is_none());
    assert!(store.get("l0").await.unwrap().is_some());
    assert!(store.find_key(Some("agent"), "k").await.unwrap().is_none());

    // By the caller's tag, kept with the message.
    for (id, tag) in [("t1", "spring"), ("t2", "autumn"), ("t3", "spring")] {
        let m = NewMessage {
            tag: Some(tag.into()),
            max_age: (id == "t1").then_some(5_000),
            ..message(id, None)
        };
        store.accept(m).await.unwrap();
    }
    let spring = Filter {
        tag: Some("spring".into()),
        ..Filter::default()
    };
    let (page, _) = store.list(&spring, 10, None).await.unwrap();
    let tagged: Vec<(&str, Option<&str>)> = page
        .iter()
        .map(|s| (s.message_id.as_str(), s.tag.as_deref()))
        .collect();
    assert_eq!(tagged, [("t3", Some("spring")), ("t1", Some("spring"))]);
    assert_eq!(
        store.get("t2").await.unwrap().unwrap().tag.as_deref(),
        Some("autumn")
    );
    assert_eq!(store.get("l0").await.unwrap().unwrap().tag, None);
    // And its own max_age, which a round reads.
    assert_eq!(store.get("t1").await.unwrap().unwrap().max_age, Some(5_000));
    assert_eq!(
        store.load("t1").await.unwrap().unwrap().max_age,
        Some(5_000)
    );
    assert_eq!(store.load("t2").await.unwrap().unwrap().max_age, None);
}

fn suppression(address: &str, reason: &str) -> Suppression {
    Suppression {
        address: address.into(),
        reason: reason.into(),
        detail: Some("550 5.1.1 no such user".into()),
        message_id: Some("m1".into()),
        at: 1_700_000_000_000,
    }
}

/// The whole suppression list by address, after its version read first.
async fn whole_list(store: &dyn Store) -> (i64, Vec<Suppression>) {
    let version = store.suppression_version().await.unwrap();
    let page = store
        .suppression_page(&SuppressionQuery::default())
        .await
        .unwrap();
    assert_eq!(page.next_after, None);
    (version, page.entries)
}

/// The suppression list: an address is added once (a second entry for it
/// keeps the first), removed once, and every change moves the version,
/// as seen from `other` (a second process or daemon on the same store, or
/// the store itself).
async fn suppressions(store: &dyn Store, other: &dyn Store) {
    let (v0, list) = whole_list(other).await;
    assert!(list.is_empty());
    let added = store
        .suppress(vec![
            suppression("b@example.org", "bounced"),
            suppression("a@example.org", "manual"),
            suppression("b@example.org", "unsubscribed"),
        ])
        .await
        .unwrap();
    let mut added = added;
    added.sort();
    assert_eq!(added, ["a@example.org", "b@example.org"]);
    let v1 = other.suppression_version().await.unwrap();
    assert_ne!(v1, v0);
    let (v, list) = whole_list(other).await;
    assert_eq!(v, v1);
    assert_eq!(
        list,
        [
            suppression("a@example.org", "manual"),
            suppression("b@example.org", "bounced"),
        ]
    );
    // Nothing new: the version stays.
    assert_eq!(
        store
            .suppress(vec![suppression("a@example.org", "bounced")])
            .await
            .unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(other.suppression_version().await.unwrap(), v1);
    assert!(other.unsuppress("a@example.org").await.unwrap());
    assert!(!other.unsuppress("a@example.org").await.unwrap());
    let v2 = store.suppression_version().await.unwrap();
    assert_ne!(v2, v1);
    let (_, list) = whole_list(store).await;
    assert_eq!(list, [suppression("b@example.org", "bounced")]);
    // One address's entry, as listed.
    assert_eq!(
        other.suppression("b@example.org").await.unwrap(),
        Some(suppression("b@example.org", "bounced"))
    );
    assert_eq!(other.suppression("a@example.org").await.unwrap(), None);
    suppression_changes(store, other).await;
    suppression_pages(store, other).await;
    report_cursors(store, other).await;
    pauses(store, other).await;
}

/// Delivery paused on the store is seen by `other`; a second pause keeps
/// the first one's time and name; a resume ends it once.
async fn pauses(store: &dyn Store, other: &dyn Store) {
    let pause = |by: &str, since: i64| queue::Paused {
        since,
        by: by.to_owned(),
        reason: Some("incident 42".to_owned()),
    };
    assert_eq!(other.paused().await.unwrap(), None);
    assert!(!store.set_paused(None).await.unwrap());
    assert!(
        store
            .set_paused(Some(pause("operator ops", 1_000)))
            .await
            .unwrap()
    );
    assert_eq!(
        other.paused().await.unwrap(),
        Some(pause("operator ops", 1_000))
    );
    assert!(
        !other
            .set_paused(Some(pause("queue command", 2_000)))
            .await
            .unwrap()
    );
    assert_eq!(
        store.paused().await.unwrap(),
        Some(pause("operator ops", 1_000))
    );
    assert!(other.set_paused(None).await.unwrap());
    assert!(!store.set_paused(None).await.unwrap());
    assert_eq!(store.paused().await.unwrap(), None);
    let quiet = queue::Paused {
        reason: None,
        ..pause("queue command", 3_000)
    };
    assert!(store.set_paused(Some(quiet.clone())).await.unwrap());
    assert_eq!(other.paused().await.unwrap(), Some(quiet));
    assert!(store.set_paused(None).await.unwrap());
}

/// The list a page at a time, as `other` reads it: pages walked by their
/// `next_after` give the whole list once, in its order; a part of an
/// address keeps only the addresses holding it, and is counted; a page
/// that ends the list (even one exactly `limit` long) names no next page.
async fn suppression_pages(store: &dyn Store, other: &dyn Store) {
    let query =
        |contains: Option<&str>, after: Option<&str>, limit: Option<usize>| SuppressionQuery {
            contains: contains.map(str::to_owned),
            after: after.map(str::to_owned),
            limit,
            counts: true,
        };
    let addresses = |page: &SuppressionPage| -> Vec<String> {
        page.entries.iter().map(|e| e.address.clone()).collect()
    };
    store
        .suppress(
            (0..25)
                .map(|i| suppression(&format!("page-{i:02}@pages.test"), "manual"))
                .collect(),
        )
        .await
        .unwrap();
    let (_, whole) = whole_list(other).await;
    let total = whole.len() as u64;
    assert!(total > 25);
    let mut walked = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = other
            .suppression_page(&query(None, after.as_deref(), Some(97)))
            .await
            .unwrap();
        assert_eq!((page.total, page.matching), (total, total));
        assert!(!page.entries.is_empty() && page.entries.len() <= 97);
        walked.extend(page.entries.iter().cloned());
        match page.next_after {
            Some(next) => {
                assert_eq!(Some(&next), page.entries.last().map(|e| &e.address));
                after = Some(next);
            }
            None => break,
        }
    }
    assert_eq!(walked, whole);

    let page = other
        .suppression_page(&query(Some("page-1"), None, Some(5)))
        .await
        .unwrap();
    let names: Vec<String> = (10..15).map(|i| format!("page-{i}@pages.test")).collect();
    assert_eq!(addresses(&page), names);
    assert_eq!((page.total, page.matching), (total, 10));
    assert_eq!(page.next_after.as_deref(), Some("page-14@pages.test"));
    assert_eq!(page.entries[0], suppression("page-10@pages.test", "manual"));
    let page = other
        .suppression_page(&query(Some("page-1"), Some("page-14@pages.test"), Some(5)))
        .await
        .unwrap();
    let names: Vec<String> = (15..20).map(|i| format!("page-{i}@pages.test")).collect();
    assert_eq!(addresses(&page), names);
    assert_eq!(page.matching, 10);
    assert_eq!(page.next_after, None);
    // No limit: every match; a part nobody holds: nothing, counted as such.
    let page = other
        .suppression_page(&query(Some("@pages.test"), None, None))
        .await
        .unwrap();
    assert_eq!(page.entries.len(), 25);
    assert_eq!((page.matching, page.next_after), (25, None));
    let page = other
        .suppression_page(&query(Some("nobody-holds-this"), None, Some(10)))
        .await
        .unwrap();
    assert_eq!(
        page,
        SuppressionPage {
            total,
            matching: 0,
            entries: Vec::new(),
            next_after: None,
        }
    );
    // No counts asked: none read, the same page.
    let uncounted = other
        .suppression_page(&SuppressionQuery {
            counts: false,
            ..query(Some("page-1"), None, Some(5))
        })
        .await
        .unwrap();
    let counted = other
        .suppression_page(&query(Some("page-1"), None, Some(5)))
        .await
        .unwrap();
    assert_eq!((uncounted.total, uncounted.matching), (0, 0));
    assert_eq!(
        (uncounted.entries, uncounted.next_after),
        (counted.entries, counted.next_after)
    );
    // A start past the last address: an empty page.
    let last = whole.last().map(|e| e.address.clone());
    let page = other
        .suppression_page(&query(None, last.as_deref(), Some(10)))
        .await
        .unwrap();
    assert!(page.entries.is_empty());
    assert_eq!(page.next_after, None);
}

/// What changed since a version, as `other` reads it: each address added
/// with its entry as it is now, each removal, in order; nothing when the
/// version is the current one; `None` when the changes are not all kept
/// (a write too large to record address by address, or a version too old).
async fn suppression_changes(store: &dyn Store, other: &dyn Store) {
    let v0 = other.suppression_version().await.unwrap();
    assert_eq!(
        other.suppression_changes(v0).await.unwrap(),
        Some((v0, Vec::new()))
    );
    store
        .suppress(vec![suppression("c@example.org", "manual")])
        .await
        .unwrap();
    store
        .suppress(vec![
            suppression("d@example.org", "bounced"),
            suppression("e@example.org", "complained"),
        ])
        .await
        .unwrap();
    assert!(store.unsuppress("c@example.org").await.unwrap());
    assert!(store.unsuppress("d@example.org").await.unwrap());
    store
        .suppress(vec![suppression("d@example.org", "unsubscribed")])
        .await
        .unwrap();
    let v1 = other.suppression_version().await.unwrap();
    let (v, changes) = other.suppression_changes(v0).await.unwrap().unwrap();
    assert_eq!(v, v1);
    // c's entry is gone, so its addition reads as nothing; d's reads as its
    // entry now, then its removal, then that entry again.
    assert_eq!(
        changes,
        [
            SuppressionChange::Added(suppression("d@example.org", "unsubscribed")),
            SuppressionChange::Added(suppression("e@example.org", "complained")),
            SuppressionChange::Removed("c@example.org".into()),
            SuppressionChange::Removed("d@example.org".into()),
            SuppressionChange::Added(suppression("d@example.org", "unsubscribed")),
        ]
    );
    // From a version in between: only what came after it.
    let (_, changes) = other.suppression_changes(v1 - 1).await.unwrap().unwrap();
    assert_eq!(
        changes,
        [SuppressionChange::Added(suppression(
            "d@example.org",
            "unsubscribed"
        ))]
    );
    // An import larger than the store records address by address: read the
    // whole list.
    let many: Vec<Suppression> = (0..=queue::SUPPRESSION_CHANGE_ROWS)
        .map(|i| suppression(&format!("many{i}@example.org"), "manual"))
        .collect();
    store.suppress(many).await.unwrap();
    assert_eq!(other.suppression_changes(v1).await.unwrap(), None);
    let v2 = other.suppression_version().await.unwrap();
    // After it, changes are read again; older ones are kept only so long.
    assert!(store.unsuppress("many0@example.org").await.unwrap());
    assert_eq!(
        other.suppression_changes(v2).await.unwrap().unwrap().1,
        [SuppressionChange::Removed("many0@example.org".into())]
    );
    for i in 0..queue::SUPPRESSION_VERSIONS_KEPT {
        assert!(
            store
                .unsuppress(&format!("many{}@example.org", i + 1))
                .await
                .unwrap()
        );
    }
    assert_eq!(other.suppression_changes(v2).await.unwrap(), None);
    let v3 = other.suppression_version().await.unwrap();
    assert!(other.suppression_changes(v3 - 5).await.unwrap().is_some());
}

/// A mailbox's report cursor moves forward only, under one UIDVALIDITY,
/// whoever writes it; a new UIDVALIDITY replaces it.
async fn report_cursors(store: &dyn Store, other: &dyn Store) {
    let mailbox = "relay\u{1f}INBOX";
    assert_eq!(other.report_cursor(mailbox).await.unwrap(), None);
    store.advance_report_cursor(mailbox, 7, 40).await.unwrap();
    assert_eq!(other.report_cursor(mailbox).await.unwrap(), Some((7, 40)));
    // A reader behind the first cannot take it back.
    other.advance_report_cursor(mailbox, 7, 12).await.unwrap();
    assert_eq!(store.report_cursor(mailbox).await.unwrap(), Some((7, 40)));
    other.advance_report_cursor(mailbox, 7, 41).await.unwrap();
    assert_eq!(store.report_cursor(mailbox).await.unwrap(), Some((7, 41)));
    // The mailbox was made again: its UIDs start over.
    store.advance_report_cursor(mailbox, 9, 3).await.unwrap();
    assert_eq!(other.report_cursor(mailbox).await.unwrap(), Some((9, 3)));
    assert_eq!(other.report_cursor("another").await.unwrap(), None);
}

/// A message cancelled while a round holds it (claimed and loaded, not yet
/// marked: `mailmux queue cancel` from the shell, which acts on the store
/// while the daemon runs) is never marked, so the round sends no final
/// "." and its outcome is refused too: it stays `cancelled`. A marked
/// message cannot be cancelled.
async fn cancelled_in_a_round(store: &dyn Store) {
    for id in ["c1", "c2"] {
        store.accept(message(id, None)).await.unwrap();
    }
    assert_eq!(store.due(now_millis(), 10).await.unwrap(), ["c1", "c2"]);
    assert!(store.load("c1").await.unwrap().is_some());
    assert_eq!(store.cancel("c1").await.unwrap(), Cancel::Cancelled);
    assert!(matches!(store.mark("c1").await, Err(StoreError::Fenced(_))));
    let deferred = settle(State::Queued, Some(now_millis() + 1000));
    assert!(matches!(
        store.settle("c1", deferred).await,
        Err(StoreError::Fenced(_))
    ));
    assert!(matches!(
        store.settle("c1", settle(State::Sent, None)).await,
        Err(StoreError::Fenced(_))
    ));
    let r = store.get("c1").await.unwrap().unwrap();
    assert_eq!(r.state, State::Cancelled);
    assert_eq!(states_of(&r), [State::Queued, State::Cancelled]);
    assert_eq!(store.due(now_millis() + 60_000, 10).await.unwrap(), ["c2"]);

    store.mark("c2").await.unwrap();
    assert_eq!(
        store.cancel("c2").await.unwrap(),
        Cancel::Refused(State::Sending)
    );
    store.settle("c2", settle(State::Sent, None)).await.unwrap();
    let mut counts = store.stats().await.unwrap().counts;
    counts.retain(|c| c.1 > 0);
    counts.sort();
    assert_eq!(counts, [(State::Sent, 1), (State::Cancelled, 1)]);
}

/// The same from another process on the store (`mailmux queue cancel`,
/// run with the daemon's configuration and so, on PostgreSQL, its node
/// id) between a round's claim and its commit mark: the round's mark and
/// settle are refused, and the message stays cancelled.
async fn cancelled_in_a_round_by_the_shell(store: &dyn Store, shell: &dyn Store) {
    store.accept(message("s1", None)).await.unwrap();
    assert_eq!(store.due(now_millis(), 10).await.unwrap(), ["s1"]);
    assert!(store.load("s1").await.unwrap().is_some());
    assert_eq!(shell.cancel("s1").await.unwrap(), Cancel::Cancelled);
    assert!(matches!(store.mark("s1").await, Err(StoreError::Fenced(_))));
    assert!(matches!(
        store.settle("s1", settle(State::Sent, None)).await,
        Err(StoreError::Fenced(_))
    ));
    let r = store.get("s1").await.unwrap().unwrap();
    assert_eq!(r.state, State::Cancelled);
    assert_eq!(states_of(&r), [State::Queued, State::Cancelled]);
}

/// Purge deletes in chunks, oldest first, and a chunked purge goes on until
/// every finished message and old key is gone; waiting messages stay.
async fn purges_in_chunks(store: &dyn Store) {
    for i in 0..7 {
        let id = format!("p{i}");
        let key = format!("pk{i}");
        store.accept(message(&id, Some((&key, 1)))).await.unwrap();
        store.mark(&id).await.unwrap();
        let mut s = settle(State::Sent, None);
        s.attempts.push(AttemptRecord {
            at: now_millis(),
            relay: "r".into(),
            class: None,
            code: Some(250),
            text: "ok".into(),
            duration_ms: 1,
        });
        store.settle(&id, s).await.unwrap();
        // Distinct finish times, so that "oldest first" is observable.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    store.accept(message("waiting", None)).await.unwrap();

    let later = now_millis() + 1;
    let first = store.purge(later, later, 3).await.unwrap();
    assert_eq!(
        first,
        Purged {
            messages: 3,
            keys: 3
        }
    );
    for i in 0..3 {
        assert!(store.get(&format!("p{i}")).await.unwrap().is_none());
    }
    assert!(store.get("p3").await.unwrap().is_some());

    let rest = queue::purge(store, later, later, 3).await.unwrap();
    assert_eq!(rest, 4);
    for i in 0..7 {
        assert!(store.get(&format!("p{i}")).await.unwrap().is_none());
        assert!(
            store
                .find_key(Some("agent"), &format!("pk{i}"))
                .await
                .unwrap()
                .is_none()
        );
    }
    assert_eq!(
        store.get("waiting").await.unwrap().map(|r| r.state),
        Some(State::Queued)
    );
    assert_eq!(
        store.purge(later, later, 3).await.unwrap(),
        Purged::default()
    );
}

/// Retry: failed and expired messages queue again with a fresh due time;
/// unknown only when forced; finished ones never.
async fn retries(store: &dyn Store) {
    // The attempts of every round are kept in order, each field as written.
    store.accept(message("a", None)).await.unwrap();
    let attempt = |at, relay: &str, class: Option<&str>, code, text: &str| AttemptRecord {
        at,
        relay: relay.into(),
        class: class.map(Into::into),
        code,
        text: text.into(),
        duration_ms: at as u64 * 10,
    };
    let first = vec![attempt(
        1,
        "r",
        Some("transient"),
        Some(451),
        "4.3.2 try later",
    )];
    let second = vec![
        attempt(2, "r", Some("busy"), None, "connection refused"),
        attempt(3, "s", None, Some(250), "2.0.0 Ok: queued as A1"),
    ];
    let deferred = Settle {
        attempts: first.clone(),
        ..settle(State::Queued, Some(now_millis() - 1))
    };
    store.settle("a", deferred).await.unwrap();
    // Due again, and claimed for its second round.
    assert_eq!(store.due(now_millis(), 10).await.unwrap(), ["a"]);
    let sent = Settle {
        attempts: second.clone(),
        ..settle(State::Sent, None)
    };
    store.settle("a", sent).await.unwrap();
    let r = store.get("a").await.unwrap().unwrap();
    assert_eq!(r.attempts, [first, second].concat());

    for id in ["f", "e", "u", "s"] {
        store.accept(message(id, None)).await.unwrap();
    }
    store
        .settle("f", settle(State::Failed, None))
        .await
        .unwrap();
    store
        .settle("e", settle(State::Expired, None))
        .await
        .unwrap();
    store.settle("s", settle(State::Sent, None)).await.unwrap();
    store.mark("u").await.unwrap();
    store.recover().await.unwrap();
    let before = now_millis();
    for id in ["f", "e"] {
        assert_eq!(store.load(id).await.unwrap().unwrap().rounds, 1, "{id}");
        assert_eq!(store.retry(id, false).await.unwrap(), Retry::Queued, "{id}");
        let r = store.get(id).await.unwrap().unwrap();
        assert_eq!(r.state, State::Queued);
        assert!(r.due_at >= before, "max_age counts from the retry");
        let p = store.load(id).await.unwrap().unwrap();
        assert_eq!(p.rounds, 0, "{id}: its retries start over");
    }
    assert_eq!(store.retry("u", false).await.unwrap(), Retry::NeedsForce);
    assert_eq!(store.retry("u", true).await.unwrap(), Retry::Queued);
    assert_eq!(
        store.retry("s", true).await.unwrap(),
        Retry::Refused(State::Sent)
    );
    assert_eq!(store.retry("none", true).await.unwrap(), Retry::NotFound);
    let mut due = store.due(now_millis(), 10).await.unwrap();
    due.sort();
    assert_eq!(due, ["e", "f", "u"]);

    // An unknown message sent in several transactions: the recipients of
    // those before the lost one took it or were refused for certain, so a
    // forced retry goes only to the others, and carries the earlier lists
    // for the outcome to keep.
    // Both cases are a message to p, q and r that p took and q refused.
    let three = |id| NewMessage {
        to: ["p@example.org", "q@example.org", "r@example.org"]
            .map(String::from)
            .to_vec(),
        ..message(id, None)
    };
    let refused = RejectedRecord {
        address: "q@example.org".into(),
        code: 550,
        text: "5.1.1 no such user".into(),
    };
    let p_took_q_refused = |state, next_attempt_at| Settle {
        accepted: vec!["p@example.org".into()],
        rejected: vec![refused.clone()],
        ..settle(state, next_attempt_at)
    };
    store.accept(three("split")).await.unwrap();
    store.mark("split").await.unwrap();
    let lost = p_took_q_refused(State::Unknown, None);
    store.settle("split", lost).await.unwrap();
    assert_eq!(store.retry("split", true).await.unwrap(), Retry::Queued);
    let loaded = [
        store.load("split").await.unwrap().unwrap(),
        store
            .load_many(&["split".into()], u64::MAX)
            .await
            .unwrap()
            .remove(0),
    ];
    for p in loaded {
        assert_eq!(p.outstanding(), ["r@example.org"]);
        assert_eq!(p.to.len(), 3, "the envelope stays whole");
        assert_eq!(p.accepted, ["p@example.org"]);
        assert_eq!(p.rejected, std::slice::from_ref(&refused));
    }
    let r = store.get("split").await.unwrap().unwrap();
    assert_eq!(r.to.len(), 3);
    // Any other message goes to all of its recipients.
    assert_eq!(
        store.load("f").await.unwrap().unwrap().outstanding().len(),
        2
    );

    // A round that delivered to some recipients and deferred the others:
    // queued, its lists kept, due again for the others alone.
    store.accept(three("deferral")).await.unwrap();
    store.mark("deferral").await.unwrap();
    let took_some = p_took_q_refused(State::Queued, Some(now_millis() - 1));
    store.settle("deferral", took_some).await.unwrap();
    let r = store.get("deferral").await.unwrap().unwrap();
    assert_eq!(r.state, State::Queued);
    assert_eq!(r.deferred(), ["r@example.org"]);
    assert!(
        store
            .due(now_millis(), 100)
            .await
            .unwrap()
            .contains(&"deferral".to_string())
    );
    let p = store.load("deferral").await.unwrap().unwrap();
    assert_eq!(p.outstanding(), ["r@example.org"]);
    assert_eq!(p.accepted, ["p@example.org"]);
    assert_eq!(p.rounds, 1);
    // The next round's mark and outcome: every round's recipients kept.
    store.mark("deferral").await.unwrap();
    let rest = Settle {
        accepted: vec!["p@example.org".into(), "r@example.org".into()],
        rejected: vec![refused.clone()],
        ..settle(State::Partial, None)
    };
    store.settle("deferral", rest).await.unwrap();
    let r = store.get("deferral").await.unwrap().unwrap();
    assert_eq!(r.state, State::Partial);
    assert!(r.deferred().is_empty());
    assert_eq!(r.accepted, ["p@example.org", "r@example.org"]);
}

/// Held messages: never due, released only by an approval for the same
/// content, rejected or expired otherwise; listings filter by caller.
async fn approvals(store: &dyn Store) {
    let now = now_millis();
    let held = |id: &str, until: i64| NewMessage {
        hold: Some(Hold {
            until,
            hash: [7; 32],
        }),
        ..message(id, None)
    };
    for id in ["h1", "h2", "h3"] {
        assert_eq!(
            store.accept(held(id, now + 60_000)).await.unwrap(),
            Accepted::Stored(State::Held)
        );
    }
    assert_eq!(
        store.accept(held("h4", now - 1)).await.unwrap(),
        Accepted::Stored(State::Held)
    );
    assert!(store.due(now + 120_000, 10).await.unwrap().is_empty());
    let r = store.get("h1").await.unwrap().unwrap();
    assert_eq!(
        r.next_attempt_at,
        Some(now + 60_000),
        "the approval deadline"
    );
    assert_eq!(r.caller.as_deref(), Some("agent"));

    let approve = |hash: Option<[u8; 32]>| Decision {
        approve: true,
        by: "operator ops".into(),
        hash,
    };
    assert_eq!(
        store.decide("h1", approve(Some([8; 32]))).await.unwrap(),
        Decided::HashMismatch
    );
    assert_eq!(store.get("h1").await.unwrap().unwrap().state, State::Held);
    assert_eq!(
        store.decide("h1", approve(Some([7; 32]))).await.unwrap(),
        Decided::Released(State::Queued)
    );
    let r = store.get("h1").await.unwrap().unwrap();
    assert_eq!(r.decided_by.as_deref(), Some("operator ops"));
    assert!(
        store
            .due(now_millis(), 10)
            .await
            .unwrap()
            .contains(&"h1".to_string())
    );
    assert_eq!(
        store.decide("h1", approve(None)).await.unwrap(),
        Decided::NotHeld(State::Queued)
    );

    let reject = Decision {
        approve: false,
        by: "operator ops".into(),
        hash: None,
    };
    assert_eq!(
        store.decide("h2", reject.clone()).await.unwrap(),
        Decided::Rejected
    );
    assert_eq!(
        store.get("h2").await.unwrap().unwrap().state,
        State::Rejected
    );
    assert!(store.load("h2").await.unwrap().is_none(), "body dropped");
    assert_eq!(
        store.decide("h2", approve(None)).await.unwrap(),
        Decided::NotHeld(State::Rejected)
    );
    assert_eq!(
        store.decide("none", reject).await.unwrap(),
        Decided::NotFound
    );

    // Past its deadline: expired, and an approval no longer releases it.
    assert_eq!(store.expire_held(now_millis()).await.unwrap(), ["h4"]);
    assert_eq!(
        store.get("h4").await.unwrap().unwrap().state,
        State::Expired
    );
    assert_eq!(
        store.decide("h4", approve(None)).await.unwrap(),
        Decided::NotHeld(State::Expired)
    );
    assert_eq!(
        store.retry("h4", true).await.unwrap(),
        Retry::Refused(State::Expired)
    );
    assert_eq!(
        store.retry("h3", true).await.unwrap(),
        Retry::Refused(State::Held)
    );
    assert_eq!(
        store.retry("h2", true).await.unwrap(),
        Retry::Refused(State::Rejected)
    );
    assert_eq!(store.get("h3").await.unwrap().unwrap().state, State::Held);
    // A caller may withdraw a held message.
    assert_eq!(store.cancel("h3").await.unwrap(), Cancel::Cancelled);

    let mine = Filter {
        caller: Some("agent".into()),
        ..Filter::default()
    };
    let theirs = Filter {
        caller: Some("other".into()),
        ..Filter::default()
    };
    assert_eq!(store.list(&mine, 10, None).await.unwrap().0.len(), 4);
    assert!(store.list(&theirs, 10, None).await.unwrap().0.is_empty());
    // By part of a recipient's address, in any case.
    let first = store.get("h1").await.unwrap().unwrap().to[0].clone();
    let needle = first[..first.len().min(6)].to_uppercase();
    let by_rcpt = Filter {
        recipient: Some(needle),
        ..Filter::default()
    };
    let found = store.list(&by_rcpt, 10, None).await.unwrap().0;
    assert!(found.iter().any(|m| m.message_id == "h1"), "{found:?}");
    assert!(found.iter().all(|m| m.to.iter().any(|t| {
        t.to_uppercase()
            .contains(&first[..first.len().min(6)].to_uppercase())
    })));
    let none = Filter {
        recipient: Some("no-such-recipient-anywhere".into()),
        ..Filter::default()
    };
    assert!(store.list(&none, 10, None).await.unwrap().0.is_empty());
    // The Sent copy's outcome is kept on the message.
    store
        .note_copy("h1", "failed: connect refused")
        .await
        .unwrap();
    assert_eq!(
        store.get("h1").await.unwrap().unwrap().sent_copy.as_deref(),
        Some("failed: connect refused")
    );
    store.note_copy("gone", "copied").await.unwrap();
}

#[tokio::test]
async fn sqlite_on_disk_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str| SqliteStore::open(&dir.path().join(name)).unwrap();
    let store = open("q.db");
    assert!(store.durable());
    conformance(&store).await;
    keys_are_each_callers_own(&open("keys.db")).await;
    approvals(&open("approvals.db")).await;
    retries(&open("retries.db")).await;
    purges_in_chunks(&open("purges.db")).await;
    batch_counts(&open("batches.db")).await;
    first_rounds(&open("first.db")).await;
    listings(&open("listings.db")).await;
    priorities(&open("priorities.db")).await;
    searches(&open("searches.db")).await;
    unconfirmed_marks(&open("unconfirmed.db")).await;
    streamed_batches(&open("streamed.db")).await;
    cancelled_in_a_round(&open("cancelled.db")).await;
    suppressions(
        &open("suppressed.db"),
        &SqliteStore::open_shared(&dir.path().join("suppressed.db")).unwrap(),
    )
    .await;
    cancelled_in_a_round_by_the_shell(
        &open("shell.db"),
        &SqliteStore::open_shared(&dir.path().join("shell.db")).unwrap(),
    )
    .await;
    for name in [
        "q.db",
        "approvals.db",
        "retries.db",
        "purges.db",
        "batches.db",
        "first.db",
        "listings.db",
        "unconfirmed.db",
        "streamed.db",
        "cancelled.db",
    ] {
        counts_match_rows(&dir.path().join(name));
    }
}

/// A message's priority is kept, and the due messages of high priority
/// are taken before the others, however long those have waited.
async fn priorities(store: &dyn Store) {
    let now = now_millis();
    for (id, due, high) in [
        ("n1", now - 3_000, false),
        ("n2", now - 2_000, false),
        ("h1", now - 1_000, true),
        ("h2", now + 60_000, true),
        ("n3", now - 500, false),
    ] {
        let m = NewMessage {
            due_at: due,
            priority: if high {
                Priority::High
            } else {
                Priority::Normal
            },
            ..message(id, None)
        };
        store.accept(m).await.unwrap();
    }
    assert_eq!(store.due(now, 10).await.unwrap(), ["h1", "n1", "n2", "n3"]);
    assert_eq!(store.due(now, 2).await.unwrap(), ["h1", "n1"]);
    assert_eq!(store.due(now, 1).await.unwrap(), ["h1"]);
    assert_eq!(
        store.get("h1").await.unwrap().unwrap().priority,
        Priority::High
    );
    assert_eq!(
        store.get("n1").await.unwrap().unwrap().priority,
        Priority::Normal
    );
    assert_eq!(
        store.load("h2").await.unwrap().unwrap().priority,
        Priority::High
    );
    // Deferred, it is still taken first once due again; once due, the
    // scheduled one is too.
    store
        .settle("h1", settle(State::Queued, Some(now - 100)))
        .await
        .unwrap();
    assert_eq!(store.due(now, 2).await.unwrap(), ["h1", "n1"]);
    assert_eq!(
        store.due(now + 61_000, 3).await.unwrap(),
        ["h1", "h2", "n1"]
    );
    store.cancel("h1").await.unwrap();
    assert_eq!(store.due(now, 10).await.unwrap(), ["n1", "n2", "n3"]);
    // A listing says which are high.
    let (page, _) = store.list(&Filter::default(), 10, None).await.unwrap();
    let listed: Vec<(&str, Priority)> = page
        .iter()
        .map(|s| (s.message_id.as_str(), s.priority))
        .collect();
    assert_eq!(
        listed,
        [
            ("n3", Priority::Normal),
            ("h2", Priority::High),
            ("h1", Priority::High),
            ("n2", Priority::Normal),
            ("n1", Priority::Normal)
        ]
    );
}

/// Listings by caller, by batch and by both, newest first, a page at a
/// time: the same on every store. The SQL stores read a listing by caller
/// or by batch through an index (`listings_read_through_indexes` for
/// PostgreSQL, a unit test of the statement for SQLite).
async fn listings(store: &dyn Store) {
    for i in 0..12 {
        let m = NewMessage {
            caller: Some(if i % 2 == 0 { "a" } else { "b" }.into()),
            batch: match i {
                0..=5 => Some("x".into()),
                6..=8 => Some("y".into()),
                _ => None,
            },
            ..message(&format!("l{i}"), None)
        };
        store.accept(m).await.unwrap();
    }
    store.mark("l7").await.unwrap();
    let ids = |caller: Option<&str>, batch: Option<&str>, state: Option<State>| {
        let filter = Filter {
            caller: caller.map(Into::into),
            batch: batch.map(Into::into),
            state,
            ..Filter::default()
        };
        async move {
            let mut ids = Vec::new();
            let mut cursor = None;
            loop {
                let (page, next) = store.list(&filter, 2, cursor).await.unwrap();
                assert!(page.len() <= 2);
                ids.extend(page.into_iter().map(|s| s.message_id));
                match next {
                    Some(n) => cursor = Some(n),
                    None => return ids,
                }
            }
        }
    };
    assert_eq!(
        ids(Some("a"), None, None).await,
        ["l10", "l8", "l6", "l4", "l2", "l0"]
    );
    assert_eq!(
        ids(None, Some("x"), None).await,
        ["l5", "l4", "l3", "l2", "l1", "l0"]
    );
    assert_eq!(ids(Some("b"), Some("x"), None).await, ["l5", "l3", "l1"]);
    assert_eq!(ids(Some("a"), Some("y"), None).await, ["l8", "l6"]);
    assert_eq!(
        ids(Some("b"), Some("y"), Some(State::Sending)).await,
        ["l7"]
    );
    assert_eq!(ids(None, None, Some(State::Sending)).await, ["l7"]);
    assert_eq!(ids(Some("b"), None, Some(State::Sending)).await, ["l7"]);
    assert!(ids(Some("a"), None, Some(State::Sending)).await.is_empty());
    assert_eq!(
        ids(Some("b"), None, Some(State::Queued)).await,
        ["l11", "l9", "l5", "l3", "l1"]
    );
    assert!(ids(None, Some("z"), None).await.is_empty());
    assert!(ids(Some("c"), None, None).await.is_empty());

    // The count per state of what a filter names.
    let counts = |caller: Option<&str>, batch: Option<&str>| {
        let filter = Filter {
            caller: caller.map(Into::into),
            batch: batch.map(Into::into),
            ..Filter::default()
        };
        async move {
            let counts = store.count(&filter).await.unwrap();
            let named: std::collections::BTreeMap<&str, u64> =
                counts.iter().map(|(s, n)| (s.as_str(), *n)).collect();
            assert_eq!(named.len(), counts.len(), "one count a state: {counts:?}");
            named
        }
    };
    let x = counts(None, Some("x")).await;
    assert_eq!(x, [("queued", 6)].into());
    let y = counts(None, Some("y")).await;
    assert_eq!(y, [("queued", 2), ("sending", 1)].into());
    assert_eq!(counts(Some("b"), Some("y")).await, [("sending", 1)].into());
    assert_eq!(counts(Some("a"), Some("y")).await, [("queued", 2)].into());
    assert!(counts(None, Some("z")).await.is_empty());
}

/// A search by recipient reads at most `SEARCH_ROWS` of the rows its
/// other filters name a page: a page may hold fewer than its limit, even
/// none, with a cursor after the rows it read; following the cursors finds
/// every match once, newest first.
async fn searches(store: &dyn Store) {
    use queue::SEARCH_ROWS;
    let to = |id: String, rcpt: &str| NewMessage {
        to: vec![rcpt.into()],
        ..message(&id, None)
    };
    // Oldest first: 10 to Ada, SEARCH_ROWS + 20 to Bob, 3 to Ada.
    let bobs = SEARCH_ROWS as usize + 20;
    let mut all: Vec<NewMessage> = (0..10)
        .map(|i| to(format!("old-ada-{i}"), "ada@example.org"))
        .collect();
    all.extend((0..bobs).map(|i| to(format!("bob-{i}"), "bob@example.org")));
    all.extend((0..3).map(|i| to(format!("new-ada-{i}"), "Ada@Example.org")));
    for chunk in all.chunks(1000) {
        store.accept_many(chunk.to_vec(), false).await.unwrap();
    }
    let pages = |needle: &'static str, caller: Option<&'static str>, limit: usize| async move {
        let filter = Filter {
            recipient: Some(needle.into()),
            caller: caller.map(Into::into),
            ..Filter::default()
        };
        let mut pages = Vec::new();
        let mut cursor = None;
        loop {
            let (page, next) = store.list(&filter, limit, cursor).await.unwrap();
            pages.push(page.into_iter().map(|m| m.message_id).collect::<Vec<_>>());
            match next {
                Some(n) => cursor = Some(n),
                None => return pages,
            }
        }
    };
    let newest_ada = ["new-ada-2", "new-ada-1", "new-ada-0"];
    let old_ada = |from: usize, to: usize| (from..to).rev().map(|i| format!("old-ada-{i}"));
    // The first page reads the newest SEARCH_ROWS rows: the 3 newest Ada
    // messages, fewer than its limit, and a cursor after the rows it read.
    let ada = pages("ADA@", None, 5).await;
    assert_eq!(ada.len(), 3, "{ada:?}");
    assert_eq!(ada[0], newest_ada);
    assert_eq!(ada[1], old_ada(5, 10).collect::<Vec<_>>());
    assert_eq!(ada[2], old_ada(0, 5).collect::<Vec<_>>());
    // The same with the caller's filter, which a listing reads through.
    assert_eq!(pages("ada@", Some("agent"), 5).await, ada);
    // More matches than a page holds, within the rows read: full pages.
    let bob = pages("bob@", Some("agent"), 100).await;
    assert!(bob[..bob.len() - 1].iter().all(|p| p.len() == 100));
    let found: Vec<&String> = bob.iter().flatten().collect();
    assert_eq!(found.len(), bobs);
    assert_eq!(found.first().unwrap().as_str(), format!("bob-{}", bobs - 1));
    assert_eq!(found.last().unwrap().as_str(), "bob-0");
    // No match: an empty page with a cursor, then the rest, empty.
    assert_eq!(
        pages("nobody@", None, 20).await,
        [Vec::<String>::new(), Vec::new()]
    );
    assert_eq!(
        pages("nobody@", Some("other"), 20).await,
        [Vec::<String>::new()]
    );

    // By the reports noted on a message, searched the same way: bob-5 is
    // past the first page's rows.
    let report = |reason: &str, address: &str| ReportRecord {
        at: now_millis(),
        reason: reason.into(),
        address: address.into(),
        detail: "5.1.1".into(),
    };
    for (id, reason, address) in [
        ("old-ada-1", "bounced", "ada@example.org"),
        ("bob-5", "bounced", "bob@example.org"),
        ("new-ada-0", "complained", "ada@example.org"),
    ] {
        let noted = store
            .note_reports(id, vec![report(reason, address)])
            .await
            .unwrap();
        assert_eq!(noted.len(), 1, "{id}");
    }
    // A report noted again is not new.
    let again = store
        .note_reports("bob-5", vec![report("bounced", "bob@example.org")])
        .await
        .unwrap();
    assert!(again.is_empty(), "{again:?}");
    let reported = |reason: &'static str, needle: Option<&'static str>| async move {
        let filter = Filter {
            reported: Some(reason.into()),
            recipient: needle.map(Into::into),
            ..Filter::default()
        };
        let mut pages = Vec::new();
        let mut cursor = None;
        loop {
            let (page, next) = store.list(&filter, 5, cursor).await.unwrap();
            pages.push(page.into_iter().map(|m| m.message_id).collect::<Vec<_>>());
            match next {
                Some(n) => cursor = Some(n),
                None => return pages,
            }
        }
    };
    assert_eq!(
        reported("bounced", None).await,
        [vec![], vec!["bob-5".to_string(), "old-ada-1".into()]]
    );
    assert_eq!(
        reported("complained", None).await,
        [vec!["new-ada-0".to_string()], vec![]]
    );
    assert_eq!(
        reported("bounced", Some("ada@")).await,
        [vec![], vec!["old-ada-1".to_string()]]
    );
}

/// The counts per state that the SQLite store keeps are those of its rows.
fn counts_match_rows(path: &std::path::Path) {
    let c = rusqlite::Connection::open(path).unwrap();
    let read = |sql: &str| -> Vec<(String, i64)> {
        c.prepare(sql)
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert_eq!(
        read("SELECT state, n FROM counts WHERE n <> 0 ORDER BY state"),
        read("SELECT state, COUNT(*) FROM messages GROUP BY state ORDER BY state"),
        "{}",
        path.display()
    );
}

/// SQLite stores a waiting call's message at its commit mark without its
/// bytes (see [`marked_bytes`]).
#[tokio::test]
async fn sqlite_writes_a_marked_message_bytes_only_for_an_outcome_that_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    marked_bytes(&SqliteStore::open(&dir.path().join("q.db")).unwrap()).await;
    counts_match_rows(&dir.path().join("q.db"));
}

/// A durable store keeps a waiting call's message from its commit mark
/// without its bytes. An outcome that keeps them (a retry, a Sent copy)
/// writes them; one that does not never does. A crash before the outcome
/// leaves the message `unknown`, with nothing to retry.
/// `accept_settled_unconfirmed`, the round's end after a commit mark
/// (`accept_marked`) whose answer never came and whose "." was not sent:
/// a row that mark left takes the round's outcome with the message's
/// bytes, and is delivered from the store like any deferred message; with
/// no such row, the message is stored with its outcome. Either way once.
async fn unconfirmed_marks(store: &dyn Store) {
    let bytes = message("any", None).bytes;
    // The mark was stored after all.
    store
        .accept_marked(message("stored-mark", None))
        .await
        .unwrap();
    let t = now_millis() - 1;
    store
        .accept_settled_unconfirmed(message("stored-mark", None), settle(State::Queued, Some(t)))
        .await
        .unwrap();
    let r = store.get("stored-mark").await.unwrap().unwrap();
    let states = states_of(&r);
    assert_eq!(
        (r.state, states),
        (
            State::Queued,
            vec![State::Queued, State::Sending, State::Queued]
        )
    );
    assert_eq!(
        store.load("stored-mark").await.unwrap().unwrap().bytes,
        bytes
    );
    assert_eq!(store.due(now_millis(), 10).await.unwrap(), ["stored-mark"]);

    // The mark stored nothing: stored now, with the outcome.
    store
        .accept_settled_unconfirmed(message("no-mark", None), settle(State::Failed, None))
        .await
        .unwrap();
    let r = store.get("no-mark").await.unwrap().unwrap();
    let states = states_of(&r);
    assert_eq!(
        (r.state, states),
        (State::Failed, vec![State::Queued, State::Failed])
    );
    // A failed message keeps its bytes, for an operator's retry.
    assert_eq!(store.retry("no-mark", false).await.unwrap(), Retry::Queued);
    assert_eq!(store.load("no-mark").await.unwrap().unwrap().bytes, bytes);

    // Nothing left in `sending` for a restart to call `unknown`.
    let rec = store.recover().await.unwrap();
    assert_eq!((rec.unknown.len(), rec.requeued), (0, 0));
}

async fn marked_bytes(store: &dyn Store) {
    let bytes = message("any", None).bytes;
    for id in ["sent", "deferred", "copied", "crashed"] {
        store.accept_marked(message(id, None)).await.unwrap();
        assert!(store.load(id).await.unwrap().is_none(), "{id} has bytes");
    }
    store
        .settle("sent", settle(State::Sent, None))
        .await
        .unwrap();
    let t = now_millis() - 1;
    let deferred = Settle {
        body: Some(bytes.clone()),
        ..settle(State::Queued, Some(t))
    };
    store.settle("deferred", deferred).await.unwrap();
    let copied = Settle {
        copy: true,
        body: Some(bytes.clone()),
        ..settle(State::Sent, None)
    };
    store.settle("copied", copied).await.unwrap();

    assert!(store.load("sent").await.unwrap().is_none());
    assert_eq!(store.load("deferred").await.unwrap().unwrap().bytes, bytes);
    assert_eq!(store.due(now_millis(), 10).await.unwrap(), ["deferred"]);
    assert_eq!(store.load("copied").await.unwrap().unwrap().bytes, bytes);
    // What `load` gives for each, in one read: no row, or no bytes, is
    // left out.
    let ids = ["sent", "deferred", "nobody", "copied", "crashed"].map(String::from);
    let mut many = store.load_many(&ids, u64::MAX).await.unwrap();
    many.sort_by(|a, b| a.message_id.cmp(&b.message_id));
    let loaded: Vec<(&str, State)> = many
        .iter()
        .map(|p| (p.message_id.as_str(), p.state))
        .collect();
    assert_eq!(
        loaded,
        [("copied", State::Sent), ("deferred", State::Queued)]
    );
    assert!(many.iter().all(|p| p.bytes == bytes));
    assert!(store.load_many(&[], u64::MAX).await.unwrap().is_empty());
    // Within a budget of bytes, in the order asked: the message that
    // reaches it is the last one loaded.
    let size = bytes.len() as u64;
    let ids = ["nobody", "copied", "sent", "deferred"].map(String::from);
    let first: Vec<String> = store
        .load_many(&ids, 1)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.message_id)
        .collect();
    assert_eq!(first, ["copied"]);
    let mut both: Vec<String> = store
        .load_many(&ids, size + 1)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.message_id)
        .collect();
    both.sort();
    assert_eq!(both, ["copied", "deferred"]);
    let ids = ["deferred", "copied"].map(String::from);
    let first: Vec<String> = store
        .load_many(&ids, size)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.message_id)
        .collect();
    assert_eq!(first, ["deferred"]);
    assert!(store.load_many(&ids, 0).await.unwrap().is_empty());
    let rec = store.recover().await.unwrap();
    assert_eq!((rec.unknown.len(), rec.requeued), (1, 0));
    assert_eq!(
        store.retry("crashed", true).await.unwrap(),
        Retry::Refused(State::Unknown)
    );
}

#[tokio::test]
async fn memory_conforms() {
    let store = MemoryStore::new();
    assert!(!store.durable());
    conformance(&store).await;
    keys_are_each_callers_own(&MemoryStore::new()).await;
    approvals(&MemoryStore::new()).await;
    retries(&MemoryStore::new()).await;
    purges_in_chunks(&MemoryStore::new()).await;
    batch_counts(&MemoryStore::new()).await;
    first_rounds(&MemoryStore::new()).await;
    listings(&MemoryStore::new()).await;
    priorities(&MemoryStore::new()).await;
    searches(&MemoryStore::new()).await;
    streamed_batches(&MemoryStore::new()).await;
    cancelled_in_a_round(&MemoryStore::new()).await;
    let store = MemoryStore::new();
    suppressions(&store, &store).await;
}

/// A waiting call's message stored only at its first round's commit mark
/// (`accept_marked`), or with the outcome of a round that never reached it
/// (`accept_settled`): the same rows, history and counts as the accept and
/// the mark or settle written apart, and the same crash rule.
async fn first_rounds(store: &dyn Store) {
    store.accept_marked(message("f1", None)).await.unwrap();
    store.accept_marked(message("f2", None)).await.unwrap();
    let r = store.get("f1").await.unwrap().unwrap();
    assert_eq!(r.state, State::Sending);
    let states: Vec<State> = r.history.iter().map(|h| h.0).collect();
    assert_eq!(states, [State::Queued, State::Sending]);
    assert!(store.due(now_millis(), 10).await.unwrap().is_empty());
    store.settle("f2", settle(State::Sent, None)).await.unwrap();
    let r = store.get("f2").await.unwrap().unwrap();
    let states: Vec<State> = r.history.iter().map(|h| h.0).collect();
    assert_eq!(states, [State::Queued, State::Sending, State::Sent]);

    let t = now_millis() - 1;
    let deferred = Settle {
        attempts: vec![AttemptRecord {
            at: t,
            relay: "r".into(),
            class: Some("transient".into()),
            code: Some(451),
            text: "try later".into(),
            duration_ms: 3,
        }],
        ..settle(State::Queued, Some(t))
    };
    store
        .accept_settled(message("f3", None), deferred)
        .await
        .unwrap();
    store
        .accept_settled(message("f4", None), settle(State::Failed, None))
        .await
        .unwrap();
    let r = store.get("f3").await.unwrap().unwrap();
    assert_eq!(r.state, State::Queued);
    assert_eq!(r.next_attempt_at, Some(t));
    assert_eq!(r.attempts.len(), 1);
    assert_eq!(r.attempts[0].code, Some(451));
    assert_eq!(store.due(now_millis(), 10).await.unwrap(), ["f3"]);
    assert_eq!(store.get("f4").await.unwrap().unwrap().state, State::Failed);

    let mut counts = store.stats().await.unwrap().counts;
    counts.sort();
    assert_eq!(
        counts,
        [
            (State::Queued, 1),
            (State::Sending, 1),
            (State::Sent, 1),
            (State::Failed, 1)
        ]
    );
    // Marked: a crash leaves it `unknown`, never resent.
    let rec = store.recover().await.unwrap();
    assert_eq!((rec.unknown.len(), rec.requeued), (1, 0));
    assert_eq!(
        store.get("f1").await.unwrap().unwrap().state,
        State::Unknown
    );
}

/// The counts per state after batches whose messages are stored in
/// different states, replayed, or in conflict with a key.
async fn batch_counts(store: &dyn Store) {
    let mut later = message("b2", None);
    later.due_at += 60_000;
    let mut b1 = message("b1", Some(("bk", 1)));
    b1.batch = Some("batch-1".into());
    let first = vec![b1, later, message("b3", None)];
    assert_eq!(
        store.accept_many(first, false).await.unwrap(),
        [
            Accepted::Stored(State::Queued),
            Accepted::Stored(State::Scheduled),
            Accepted::Stored(State::Queued),
        ]
    );
    // A message names its batch, in its record and in a listing.
    let batch = Some("batch-1".to_string());
    assert_eq!(store.get("b1").await.unwrap().unwrap().batch, batch);
    assert_eq!(store.get("b3").await.unwrap().unwrap().batch, None);
    let filter = Filter {
        batch: batch.clone(),
        ..Filter::default()
    };
    let (listed, _) = store.list(&filter, 10, None).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].batch, batch);
    let second = vec![
        message("b4", Some(("bk", 1))),
        message("b5", Some(("bk", 2))),
        message("b6", None),
    ];
    assert_eq!(
        store.accept_many(second, false).await.unwrap(),
        [
            Accepted::Replay("b1".into()),
            Accepted::Conflict("b1".into()),
            Accepted::Stored(State::Queued),
        ]
    );
    // Atomic: a conflict stores none of the batch, not even its new keys.
    let conflicting = vec![
        message("b7", None),
        message("b8", Some(("bk", 2))),
        message("b9", Some(("bk9", 1))),
    ];
    assert_eq!(
        store.accept_many(conflicting, true).await.unwrap(),
        [
            Accepted::Withheld,
            Accepted::Conflict("b1".into()),
            Accepted::Withheld,
        ]
    );
    for id in ["b7", "b8", "b9"] {
        assert!(store.get(id).await.unwrap().is_none(), "{id} stored");
    }
    assert!(
        store
            .find_key(Some("agent"), "bk9")
            .await
            .unwrap()
            .is_none()
    );
    // Atomic without a conflict: stored as any batch, a replay too.
    let whole = vec![message("b10", Some(("bk", 1))), message("b11", None)];
    assert_eq!(
        store.accept_many(whole, true).await.unwrap(),
        [
            Accepted::Replay("b1".into()),
            Accepted::Stored(State::Queued)
        ]
    );
    store.mark("b1").await.unwrap();
    store.settle("b1", settle(State::Sent, None)).await.unwrap();
    let mut counts = store.stats().await.unwrap().counts;
    counts.sort();
    assert_eq!(
        counts,
        [(State::Scheduled, 1), (State::Queued, 3), (State::Sent, 1)]
    );
}

/// A batch fed to `accept_stream` a message at a time: stored whole at
/// `Feed::Commit`, with the answers `accept_many` gives (a scheduled
/// message, a replay, a conflict); nothing of it, not even its keys, when
/// the feed ends without the commit; and the store takes writes after.
async fn streamed_batches(store: &dyn Store) {
    use tokio::sync::mpsc;
    store.accept(message("s0", Some(("sk", 1)))).await.unwrap();
    let (tx, rx) = mpsc::channel(2);
    let feeding = async move {
        // Composed after the store's transaction began, as a batch's
        // messages are: each is stored as of when it comes.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut later = message("s2", None);
        later.due_at += 60_000;
        for m in [
            message("s1", None),
            later,
            message("s3", Some(("sk", 1))),
            message("s4", Some(("sk", 2))),
        ] {
            tx.send(Feed::Message(Box::new(m))).await.unwrap();
        }
        tx.send(Feed::Commit).await.unwrap();
    };
    let (stored, ()) = tokio::join!(store.accept_stream(rx, false), feeding);
    assert_eq!(
        stored.unwrap(),
        [
            Accepted::Stored(State::Queued),
            Accepted::Stored(State::Scheduled),
            Accepted::Replay("s0".into()),
            Accepted::Conflict("s0".into()),
        ]
    );
    let loaded = store.load("s1").await.unwrap().expect("s1 stored");
    assert_eq!(loaded.bytes, message("s1", None).bytes);
    assert_eq!(
        store.get("s2").await.unwrap().unwrap().state,
        State::Scheduled
    );
    assert!(store.get("s3").await.unwrap().is_none());

    // Atomic: a conflict stores none of the batch.
    let (tx, rx) = mpsc::channel(4);
    let feeding = async move {
        for m in [
            message("t1", None),
            message("t2", Some(("tk", 1))),
            message("t3", Some(("sk", 2))),
        ] {
            tx.send(Feed::Message(Box::new(m))).await.unwrap();
        }
        tx.send(Feed::Commit).await.unwrap();
    };
    let (withheld, ()) = tokio::join!(store.accept_stream(rx, true), feeding);
    assert_eq!(
        withheld.unwrap(),
        [
            Accepted::Withheld,
            Accepted::Withheld,
            Accepted::Conflict("s0".into()),
        ]
    );
    for id in ["t1", "t2", "t3"] {
        assert!(store.get(id).await.unwrap().is_none(), "{id} stored");
    }
    assert!(store.find_key(Some("agent"), "tk").await.unwrap().is_none());

    let (tx, rx) = mpsc::channel(4);
    let feeding = async move {
        for id in ["a1", "a2"] {
            let m = message(id, Some((id, 3)));
            tx.send(Feed::Message(Box::new(m))).await.unwrap();
        }
    };
    let (abandoned, ()) = tokio::join!(store.accept_stream(rx, false), feeding);
    assert!(
        matches!(abandoned, Err(StoreError::Unavailable(_))),
        "{abandoned:?}"
    );
    for id in ["a1", "a2"] {
        assert!(store.get(id).await.unwrap().is_none(), "{id} stored");
        assert!(
            store.find_key(Some("agent"), id).await.unwrap().is_none(),
            "{id}'s key kept"
        );
    }
    assert_eq!(
        store.accept(message("a1", Some(("a1", 3)))).await.unwrap(),
        Accepted::Stored(State::Queued)
    );
    let mut counts = store.stats().await.unwrap().counts;
    counts.sort();
    assert_eq!(counts, [(State::Scheduled, 1), (State::Queued, 3)]);
}

/// A settle for a relay that files a Sent copy records the copy as
/// pending and keeps the bytes; the copy's outcome drops them.
async fn copies(store: &dyn Store) {
    for id in ["c1", "c2", "c3"] {
        store.accept(message(id, None)).await.unwrap();
        store.mark(id).await.unwrap();
    }
    let copied = Settle {
        copy: true,
        body: None,
        ..settle(State::Sent, None)
    };
    store.settle("c1", copied.clone()).await.unwrap();
    store.settle("c2", copied).await.unwrap();
    store.settle("c3", settle(State::Sent, None)).await.unwrap();
    assert_eq!(store.stats().await.unwrap().copies_pending, 2);
    let c1 = store.get("c1").await.unwrap().unwrap();
    assert_eq!(c1.sent_copy.as_deref(), Some("pending"));
    assert!(store.load("c1").await.unwrap().is_some(), "bytes kept");
    assert_eq!(store.get("c3").await.unwrap().unwrap().sent_copy, None);
    assert!(
        store.load("c3").await.unwrap().is_none(),
        "no copy, no bytes"
    );
    store.note_copy("c2", "copied").await.unwrap();
    let c2 = store.get("c2").await.unwrap().unwrap();
    assert_eq!(c2.sent_copy.as_deref(), Some("copied"));
    assert!(store.load("c2").await.unwrap().is_none(), "bytes dropped");
    assert_eq!(store.stats().await.unwrap().copies_pending, 1);

    // A round that delivered to some recipients and deferred the others
    // records the copy too, on a message still queued; whatever the message
    // becomes while its copy is pending, its bytes stay for the copy.
    let took_some = |next_attempt_at| Settle {
        copy: true,
        body: None,
        accepted: vec!["b@example.org".into()],
        ..settle(State::Queued, Some(next_attempt_at))
    };
    for id in ["c4", "c5", "c6"] {
        store.accept(message(id, None)).await.unwrap();
        store.mark(id).await.unwrap();
    }
    store
        .settle("c4", took_some(now_millis() + 3_600_000))
        .await
        .unwrap();
    store
        .settle("c5", took_some(now_millis() - 1))
        .await
        .unwrap();
    store
        .settle("c6", took_some(now_millis() + 3_600_000))
        .await
        .unwrap();
    assert_eq!(store.stats().await.unwrap().copies_pending, 4);
    let c4 = store.load("c4").await.unwrap().unwrap();
    assert!(c4.copied, "a later round files no second copy");
    assert_eq!(c4.outstanding(), ["c@example.org"]);
    // c5: its copy is made, then its last round: the bytes go then.
    store.note_copy("c5", "copied").await.unwrap();
    assert!(
        store.load("c5").await.unwrap().is_some(),
        "kept for the retry"
    );
    assert_eq!(store.due(now_millis(), 100).await.unwrap(), ["c5"]);
    store.mark("c5").await.unwrap();
    let rest = Settle {
        accepted: vec!["b@example.org".into(), "c@example.org".into()],
        ..settle(State::Sent, None)
    };
    store.settle("c5", rest).await.unwrap();
    assert!(store.load("c5").await.unwrap().is_none(), "bytes dropped");
    // c6: cancelled while its copy is pending: the bytes stay for the copy,
    // and go with its outcome.
    assert_eq!(store.cancel("c6").await.unwrap(), Cancel::Cancelled);
    assert!(
        store.load("c6").await.unwrap().is_some(),
        "kept for the copy"
    );
    store.note_copy("c6", "copied").await.unwrap();
    assert!(store.load("c6").await.unwrap().is_none(), "bytes dropped");
    // c4 stays queued with its copy pending.
    assert_eq!(store.stats().await.unwrap().copies_pending, 2);
}

#[tokio::test]
async fn a_pending_copy_survives_a_reopen_with_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let store = SqliteStore::open(&path).unwrap();
    copies(&store).await;
    let settled = now_millis() + 1;
    drop(store);
    let again = SqliteStore::open(&path).unwrap();
    let due = again.pending_copies(settled, true).await.unwrap();
    // c4's message is still queued for its deferred recipient.
    assert_eq!(due, copies_due(&["c1", "c4"]));
    // Settled at or after `before` (in this run): not a leftover.
    assert!(again.pending_copies(0, true).await.unwrap().is_empty());
    // One daemon owns the file: there is no other daemon's copy to take.
    assert!(
        again
            .pending_copies(settled, false)
            .await
            .unwrap()
            .is_empty()
    );
    let c1 = again.load("c1").await.unwrap().unwrap();
    assert_eq!(c1.to, message("c1", None).to);
    again.note_copy("c1", "copied").await.unwrap();
    again.note_copy("c4", "copied").await.unwrap();
    assert!(
        again
            .pending_copies(settled, true)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(again.load("c1").await.unwrap().is_none());
    assert!(again.load("c4").await.unwrap().is_some(), "c4 is queued");
}

/// The copies [`copies`] leaves pending, as a store lists them.
fn copies_due(ids: &[&str]) -> Vec<CopyDue> {
    ids.iter()
        .map(|id| CopyDue {
            message_id: (*id).into(),
            relay: "r".into(),
        })
        .collect()
}

/// [`Store::pending_copies`], in the order of the ids.
async fn pending_copies_sorted(store: &dyn Store, before: i64, mine: bool) -> Vec<CopyDue> {
    let mut due = store.pending_copies(before, mine).await.unwrap();
    due.sort_by(|a, b| a.message_id.cmp(&b.message_id));
    due
}

#[tokio::test]
async fn the_memory_store_records_pending_copies_too() {
    let store = MemoryStore::new();
    copies(&store).await;
    // A purged message takes its pending copy out of the count.
    queue::purge(&store, now_millis() + 1, 0, 1000)
        .await
        .unwrap();
    assert!(store.get("c1").await.unwrap().is_none());
    // c4 is still queued: not purged, its copy still pending.
    assert_eq!(store.stats().await.unwrap().copies_pending, 1);
}

#[tokio::test]
async fn one_daemon_owns_a_file_and_the_data_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let store = SqliteStore::open(&path).unwrap();
    store.accept(message("kept", None)).await.unwrap();
    // An outcome a relay took is answered before its fsync; it is written
    // all the same.
    store.accept_marked(message("sent", None)).await.unwrap();
    store
        .settle("sent", settle(State::Sent, None))
        .await
        .unwrap();
    match SqliteStore::open(&path) {
        Err(StoreError::Locked { path: p }) => assert!(p.ends_with("q.db")),
        other => panic!("a second owner was let in: {other:?}"),
    }
    // Another process may still read and write (the queue command).
    let shared = SqliteStore::open_shared(&path).unwrap();
    assert!(shared.get("kept").await.unwrap().is_some());
    drop(shared);
    drop(store);
    let again = SqliteStore::open(&path).unwrap();
    assert_eq!(again.recover().await.unwrap().unknown.len(), 0);
    assert_eq!(again.due(now_millis(), 10).await.unwrap(), ["kept"]);
    assert_eq!(again.get("sent").await.unwrap().unwrap().state, State::Sent);
}

#[tokio::test]
async fn concurrent_writes_share_commits_and_each_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("q.db")).unwrap());
    let mut tasks = Vec::new();
    for i in 0..200 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .accept(message(&format!("c{i}"), Some(("one", 7))))
                .await
        }));
    }
    let mut stored = 0;
    let mut replays = 0;
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Accepted::Stored(_) => stored += 1,
            Accepted::Replay(_) => replays += 1,
            Accepted::Conflict(_) => panic!("same content is no conflict"),
            Accepted::Withheld => panic!("a message alone is never withheld"),
        }
    }
    assert_eq!((stored, replays), (1, 199));
}

/// Schema migrations run at start: a store of version 1 (no `counts` table,
/// no caller or approval columns) is migrated to the current version, its
/// counts are backfilled and its messages read back.
#[tokio::test]
async fn a_version_1_store_is_migrated_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    {
        let store = SqliteStore::open(&path).unwrap();
        store.accept(message("old-1", None)).await.unwrap();
        store.accept(message("old-2", None)).await.unwrap();
        store.cancel("old-2").await.unwrap();
    }
    // What version 1 left: no counts table, no triggers (version 2; since
    // version 8 only the delete one is left), no
    // caller, approval or relay columns (version 3), no batch (version 4),
    // no Sent copy (version 5), no index of pending copies (version 6), and
    // the attempts in a table of their own (until version 9), no indexes
    // for the stats (version 10).
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "DROP INDEX messages_queued_at; DROP INDEX messages_retry;
             DROP TRIGGER counts_delete;
             DROP TABLE counts; DROP INDEX messages_caller;
             ALTER TABLE messages DROP COLUMN caller; ALTER TABLE messages DROP COLUMN meta;
             ALTER TABLE messages DROP COLUMN held_hash; ALTER TABLE messages DROP COLUMN decided_by;
             ALTER TABLE messages DROP COLUMN relays;
             DROP INDEX messages_batch; ALTER TABLE messages DROP COLUMN batch;
             DROP INDEX messages_copy_pending; ALTER TABLE messages DROP COLUMN sent_copy;
             ALTER TABLE messages DROP COLUMN attempt_log;
             ALTER TABLE messages DROP COLUMN copy_relay;
             DROP TABLE suppressions; DROP TABLE suppression_version; DROP TABLE report_cursors;
             DROP TABLE suppression_changes; DROP TABLE delivery_pause;
             DROP INDEX messages_tag; ALTER TABLE messages DROP COLUMN tag;
             ALTER TABLE messages DROP COLUMN max_age;
             DROP INDEX messages_due_high; ALTER TABLE messages DROP COLUMN priority;
             ALTER TABLE messages DROP COLUMN reports;
             CREATE TABLE attempts (
                 seq INTEGER NOT NULL, at INTEGER NOT NULL, relay TEXT NOT NULL, class TEXT,
                 code INTEGER, text TEXT NOT NULL, duration_ms INTEGER NOT NULL);
             CREATE INDEX attempts_seq ON attempts(seq);
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let v: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(v, mailmux_actors::queue::sqlite::SCHEMA_VERSION);
    let mut counts = store.stats().await.unwrap().counts;
    counts.sort();
    assert_eq!(counts, [(State::Queued, 1), (State::Cancelled, 1)]);
    let old = store.get("old-1").await.unwrap().unwrap();
    assert_eq!((old.state, old.caller), (State::Queued, None));
    assert!(store.load("old-1").await.unwrap().unwrap().only.is_none());
    // And the store keeps them from then on.
    store.accept(message("new", None)).await.unwrap();
    store.cancel("old-1").await.unwrap();
    let mut counts = store.stats().await.unwrap().counts;
    counts.sort();
    assert_eq!(counts, [(State::Queued, 1), (State::Cancelled, 2)]);
}

/// A store migrated from one scope of keys to a scope per caller: the key
/// `k` of agent's message `kept`, and `orphan`, whose message `purged` is
/// gone, are found where they belong now.
async fn keys_once_scoped(store: &dyn Store) {
    assert_eq!(
        store.find_key(Some("agent"), "k").await.unwrap().as_deref(),
        Some("kept")
    );
    assert_eq!(store.find_key(Some("other"), "k").await.unwrap(), None);
    assert_eq!(
        store.find_key(None, "orphan").await.unwrap().as_deref(),
        Some("purged")
    );
    assert_eq!(
        store
            .accept(message("again", Some(("k", 1))))
            .await
            .unwrap(),
        Accepted::Replay("kept".into())
    );
}

/// Version 11 keeps idempotency keys per caller: the keys of a version 10
/// store go to the callers of their messages, and a key whose message is
/// gone to no caller.
#[tokio::test]
async fn a_version_10_store_has_its_keys_scoped_to_their_callers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    {
        let store = SqliteStore::open(&path).unwrap();
        store.accept(message("kept", Some(("k", 1)))).await.unwrap();
    }
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "UPDATE idempotency SET key = substr(key, instr(key, char(31)) + 1);
             INSERT INTO idempotency (key, message_id, hash, created_at)
                 VALUES ('orphan', 'purged', x'00', 0);
             ALTER TABLE messages DROP COLUMN copy_relay;
             DROP TABLE suppressions; DROP TABLE suppression_version; DROP TABLE report_cursors;
             DROP TABLE suppression_changes; DROP TABLE delivery_pause;
             DROP INDEX messages_tag; ALTER TABLE messages DROP COLUMN tag;
             ALTER TABLE messages DROP COLUMN max_age;
             DROP INDEX messages_due_high; ALTER TABLE messages DROP COLUMN priority;
             ALTER TABLE messages DROP COLUMN reports;
             PRAGMA user_version = 10;",
        )
        .unwrap();
        let keys: String = c
            .query_row("SELECT group_concat(key, ',') FROM idempotency", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(keys, "k,orphan", "the keys as version 10 kept them");
    }
    let store = SqliteStore::open(&path).unwrap();
    keys_once_scoped(&store).await;
}

/// Version 9 keeps each message's attempts in its row: a store of version 8
/// has them moved there, in order, and its attempts table dropped.
#[tokio::test]
async fn a_version_8_store_has_its_attempts_moved_into_their_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    {
        let store = SqliteStore::open(&path).unwrap();
        for id in ["tried", "untried"] {
            store.accept(message(id, None)).await.unwrap();
        }
    }
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "ALTER TABLE messages DROP COLUMN attempt_log;
             ALTER TABLE messages DROP COLUMN copy_relay;
             DROP TABLE suppressions; DROP TABLE suppression_version; DROP TABLE report_cursors;
             DROP TABLE suppression_changes; DROP TABLE delivery_pause;
             DROP INDEX messages_tag; ALTER TABLE messages DROP COLUMN tag;
             ALTER TABLE messages DROP COLUMN max_age;
             DROP INDEX messages_due_high; ALTER TABLE messages DROP COLUMN priority;
             ALTER TABLE messages DROP COLUMN reports;
             CREATE TABLE attempts (
                 seq INTEGER NOT NULL, at INTEGER NOT NULL, relay TEXT NOT NULL, class TEXT,
                 code INTEGER, text TEXT NOT NULL, duration_ms INTEGER NOT NULL);
             CREATE INDEX attempts_seq ON attempts(seq);
             DROP INDEX messages_queued_at; DROP INDEX messages_retry;
             INSERT INTO attempts SELECT seq, 20, 'backup', NULL, 250, 'ok', 7
               FROM messages WHERE message_id = 'tried';
             INSERT INTO attempts SELECT seq, 10, 'primary', 'transient', 451,
                    'try' || char(9) || 'later' || char(13) || char(10) || 'please', 5
               FROM messages WHERE message_id = 'tried';
             PRAGMA user_version = 8;",
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let attempts = store.get("tried").await.unwrap().unwrap().attempts;
    let found: Vec<_> = attempts
        .iter()
        .map(|a| {
            (
                a.at,
                a.relay.as_str(),
                a.class.as_deref(),
                a.code,
                a.text.as_str(),
                a.duration_ms,
            )
        })
        .collect();
    assert_eq!(
        found,
        [
            (20, "backup", None, Some(250), "ok", 7),
            (
                10,
                "primary",
                Some("transient"),
                Some(451),
                "try later  please",
                5
            ),
        ],
        "in the order they were written, tabs and line breaks as spaces"
    );
    assert!(
        store
            .get("untried")
            .await
            .unwrap()
            .unwrap()
            .attempts
            .is_empty()
    );
    let tables: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM sqlite_schema WHERE name IN ('attempts', 'attempts_seq')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tables, 0, "the attempts table and its index are gone");
    // A settle after the migration adds to what was moved.
    let s = Settle {
        attempts: vec![AttemptRecord {
            at: 30,
            relay: "primary".into(),
            class: None,
            code: Some(250),
            text: "done".into(),
            duration_ms: 3,
        }],
        ..settle(State::Sent, None)
    };
    store.settle("tried", s).await.unwrap();
    let attempts = store.get("tried").await.unwrap().unwrap().attempts;
    let at: Vec<i64> = attempts.iter().map(|a| a.at).collect();
    assert_eq!(at, [20, 10, 30]);
}

fn pg(url: &str, node: &str) -> PgSettings {
    PgSettings {
        url: url.into(),
        pool: 4,
        node_id: node.into(),
        lease: Duration::from_secs(30),
    }
}

/// The store's counts per state against a count of the table itself: the
/// PostgreSQL store keeps its finished messages' counts in a table of
/// their own, which every statement that finishes, queues again or purges
/// a message must keep exact.
async fn assert_counts_exact(server: &Postgres, url: &str, store: &dyn Store) {
    let db = url.rsplit('/').next().unwrap();
    let table = server.psql(
        db,
        "SELECT COALESCE(string_agg(state || '=' || n, ',' ORDER BY state), '')
           FROM (SELECT state, COUNT(*) AS n FROM mailmux_messages GROUP BY state) c",
    );
    let mut kept: Vec<String> = store
        .stats()
        .await
        .unwrap()
        .counts
        .iter()
        .map(|(s, n)| format!("{}={n}", s.as_str()))
        .collect();
    kept.sort();
    assert_eq!(
        kept.join(","),
        table,
        "the store's counts against the table"
    );
}

#[tokio::test]
async fn postgres_conforms() {
    let server = Postgres::start();
    let url = server.database();
    let store = PgStore::open(&pg(&url, "n1")).await.unwrap();
    assert!(store.durable());
    assert_eq!(store.kind(), "postgres");
    conformance(&store).await;
    keys_are_each_callers_own(&PgStore::open(&pg(&server.database(), "n1")).await.unwrap()).await;
    assert_counts_exact(&server, &url, &store).await;
    macro_rules! on_a_new_database {
        ($suite:ident) => {
            let url = server.database();
            let store = PgStore::open(&pg(&url, "n1")).await.unwrap();
            $suite(&store).await;
            assert_counts_exact(&server, &url, &store).await;
        };
    }
    on_a_new_database!(approvals);
    on_a_new_database!(retries);
    on_a_new_database!(purges_in_chunks);
    on_a_new_database!(copies);
    on_a_new_database!(marked_bytes);
    on_a_new_database!(listings);
    on_a_new_database!(priorities);
    on_a_new_database!(searches);
    on_a_new_database!(unconfirmed_marks);
    on_a_new_database!(streamed_batches);
    on_a_new_database!(cancelled_in_a_round);
    let url = server.database();
    let store = PgStore::open(&pg(&url, "n1")).await.unwrap();
    let shell = PgStore::open_shared(&pg(&url, "n1")).await.unwrap();
    cancelled_in_a_round_by_the_shell(&store, &shell).await;
    assert_counts_exact(&server, &url, &store).await;
    let url = server.database();
    let (n1, n2) = (
        PgStore::open(&pg(&url, "n1")).await.unwrap(),
        PgStore::open(&pg(&url, "n2")).await.unwrap(),
    );
    suppressions(&n1, &n2).await;
}

/// PostgreSQL reads a listing by caller, one by batch and one by a state
/// other than `sent` through the index on that column: its statistics
/// count a scan of each.
#[tokio::test]
async fn postgres_listings_read_through_indexes() {
    let server = Postgres::start();
    let url = server.database();
    let db = url.rsplit('/').next().unwrap().to_owned();
    let daemon = PgStore::open(&pg(&url, "n1")).await.unwrap();
    daemon.accept(message("one", None)).await.unwrap();
    drop(daemon);
    // Without a daemon's own statements (heartbeats, leases) beside it.
    let store = PgStore::open_shared(&pg(&url, "n1")).await.unwrap();
    let scans = |index: &str| -> i64 {
        server
            .psql(
                &db,
                &format!(
                    "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = '{index}'"
                ),
            )
            .parse()
            .unwrap()
    };
    for (index, filter) in [
        (
            "mailmux_messages_caller",
            Filter {
                caller: Some("agent".into()),
                ..Filter::default()
            },
        ),
        (
            "mailmux_messages_batch",
            Filter {
                caller: Some("agent".into()),
                batch: Some("x".into()),
                ..Filter::default()
            },
        ),
        (
            "mailmux_messages_state",
            Filter {
                caller: Some("agent".into()),
                state: Some(State::Failed),
                ..Filter::default()
            },
        ),
        (
            "mailmux_messages_tag",
            Filter {
                caller: Some("agent".into()),
                state: Some(State::Sent),
                tag: Some("t".into()),
                ..Filter::default()
            },
        ),
        // What still waits of a campaign: through the state's index,
        // whatever number of its messages were sent.
        (
            "mailmux_messages_state",
            Filter {
                caller: Some("agent".into()),
                state: Some(State::Queued),
                tag: Some("t".into()),
                ..Filter::default()
            },
        ),
    ] {
        let before = scans(index);
        // A backend reports its statistics at most once a second, and
        // within ten when it goes idle: list until they show the scan.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            store.list(&filter, 10, None).await.unwrap();
            if scans(index) > before {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no scan of {index} counted"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[tokio::test]
async fn postgres_counts_batches() {
    let server = Postgres::start();
    let url = server.database();
    let store = PgStore::open(&pg(&url, "n1")).await.unwrap();
    batch_counts(&store).await;
    assert_counts_exact(&server, &url, &store).await;
    let url = server.database();
    let store = PgStore::open(&pg(&url, "n2")).await.unwrap();
    first_rounds(&store).await;
    assert_counts_exact(&server, &url, &store).await;
}

/// The counts of finished messages: kept per daemon, so that daemons never
/// wait for each other's; those of daemons that stopped are folded into
/// one row by the next purge, and the sums stay exact throughout. A
/// database of the schema before the counts gets them from its messages
/// when it is migrated.
#[tokio::test]
async fn postgres_counts_survive_daemons_purges_and_migration() {
    let server = Postgres::start();
    let url = server.database();
    let db = url.rsplit('/').next().unwrap().to_owned();
    let a = PgStore::open(&pg(&url, "a")).await.unwrap();
    let b = PgStore::open(&pg(&url, "b")).await.unwrap();
    for (store, prefix) in [(&a, "a"), (&b, "b")] {
        for i in 0..6 {
            let id = format!("{prefix}{i}");
            store.accept(message(&id, None)).await.unwrap();
            store.mark(&id).await.unwrap();
            let state = [State::Sent, State::Failed, State::Unknown][i % 3];
            store.settle(&id, settle(state, None)).await.unwrap();
        }
        assert_counts_exact(&server, &url, store).await;
    }
    // A settle written again (an answer lost after its commit) finds the
    // message finished and changes nothing.
    assert!(matches!(
        a.settle("a0", settle(State::Sent, None)).await,
        Err(StoreError::Fenced(_))
    ));
    assert_counts_exact(&server, &url, &a).await;
    let rows = |server: &Postgres| {
        server.psql(
            &db,
            "SELECT string_agg(DISTINCT node, ',' ORDER BY node) FROM mailmux_counts",
        )
    };
    assert_eq!(
        rows(&server),
        "a,b",
        "each daemon counts in rows of its own"
    );
    // b stops for good; a's next purge (which removes a's oldest sent
    // message) folds b's rows into node ''.
    drop(b);
    server.psql(&db, "UPDATE mailmux_nodes SET seen_at = 0 WHERE node = 'b'");
    let purged = a.purge(now_millis() + 1, 0, 1).await.unwrap();
    assert_eq!(purged.messages, 1);
    assert_eq!(rows(&server), ",a");
    assert_counts_exact(&server, &url, &a).await;
    // Queued again by an operator: no longer finished.
    assert_eq!(a.retry("b1", true).await.unwrap(), Retry::Queued);
    assert_counts_exact(&server, &url, &a).await;

    // The schema before the counts (version 4), migrated again: the counts
    // are made from the table.
    drop(a);
    server.psql(
        &db,
        "DROP TABLE mailmux_counts; ALTER TABLE mailmux_messages DROP COLUMN attempt_log;
         ALTER TABLE mailmux_messages DROP COLUMN copy_relay;
         DROP TABLE mailmux_suppressions; DROP TABLE mailmux_suppression_version;
         DROP TABLE mailmux_suppression_changes; DROP TABLE mailmux_delivery_pause;
         DROP INDEX mailmux_messages_tag; ALTER TABLE mailmux_messages DROP COLUMN tag;
         ALTER TABLE mailmux_messages DROP COLUMN max_age;
         ALTER TABLE mailmux_messages DROP COLUMN priority;
         DROP FUNCTION mailmux_take_rates; DROP FUNCTION mailmux_take_rate_groups;
         DROP TABLE mailmux_rates;
         DROP TABLE mailmux_report_cursors; ALTER TABLE mailmux_messages DROP COLUMN reports;
         DROP INDEX mailmux_messages_queued_at, mailmux_messages_retry;
         DELETE FROM mailmux_schema WHERE version >= 5",
    );
    let c = PgStore::open(&pg(&url, "c")).await.unwrap();
    assert_eq!(rows(&server), "");
    assert_counts_exact(&server, &url, &c).await;

    // A daemon of the version before finishes a message after the
    // migration, without counting it; `mailmux queue migrate` counts anew.
    server.psql(
        &db,
        "UPDATE mailmux_messages SET state = 'sent', finished_at = 1 WHERE message_id = 'b1'",
    );
    let stats = c.stats().await.unwrap();
    assert!(
        stats.counts.contains(&(State::Sent, 3)),
        "{:?}",
        stats.counts
    );
    PgStore::migrate_only(&pg(&url, "c")).await.unwrap();
    assert_counts_exact(&server, &url, &c).await;
}

/// Schema version 6 keeps a message's attempts in its row. The attempts in
/// `mailmux_attempts`, written before the migration or by a daemon of
/// version 5 during a rolling upgrade, are still read, in time order with
/// the row's, and purged with the message.
#[tokio::test]
async fn postgres_attempts_in_the_row_and_in_the_old_table_read_as_one() {
    let server = Postgres::start();
    let url = server.database();
    let db = url.rsplit('/').next().unwrap().to_owned();
    let store = PgStore::open(&pg(&url, "a")).await.unwrap();
    let attempt = |at: i64, relay: &str, text: &str| AttemptRecord {
        at,
        relay: relay.into(),
        class: Some("transient".into()),
        code: Some(451),
        text: text.into(),
        duration_ms: 7,
    };
    store.accept(message("m", None)).await.unwrap();
    let deferred = Settle {
        attempts: vec![attempt(3, "new", "4.3.2 first\tround")],
        ..settle(State::Queued, Some(now_millis() - 1))
    };
    store.settle("m", deferred).await.unwrap();
    assert_eq!(
        server.psql(&db, "SELECT COUNT(*) FROM mailmux_attempts"),
        "0",
        "a settle inserts no attempt rows"
    );
    assert_eq!(
        server.psql(
            &db,
            "SELECT attempt_log FROM mailmux_messages WHERE message_id = 'm'"
        ),
        "3\tnew\ttransient\t451\t7\t4.3.2 first round"
    );
    // As a daemon of version 5 writes them: before and after that round.
    server.psql(
        &db,
        "INSERT INTO mailmux_attempts (seq, at, relay, class, code, text, duration_ms)
         SELECT seq, at, 'old', 'transient', 451, 'older daemon', 7
           FROM mailmux_messages, (VALUES (1), (5)) AS v(at) WHERE message_id = 'm'",
    );
    assert_eq!(store.due(now_millis(), 10).await.unwrap(), ["m"]);
    let sent = Settle {
        attempts: vec![attempt(9, "new", "2.0.0 ok")],
        ..settle(State::Sent, None)
    };
    store.settle("m", sent).await.unwrap();
    let r = store.get("m").await.unwrap().unwrap();
    assert_eq!(
        r.attempts,
        [
            attempt(1, "old", "older daemon"),
            attempt(3, "new", "4.3.2 first round"),
            attempt(5, "old", "older daemon"),
            attempt(9, "new", "2.0.0 ok"),
        ]
    );
    let purged = store.purge(now_millis() + 1, 0, 10).await.unwrap();
    assert_eq!(purged.messages, 1);
    assert_eq!(
        server.psql(&db, "SELECT COUNT(*) FROM mailmux_attempts"),
        "0"
    );
}

/// A Sent copy left pending is made by its own daemon after a restart
/// under the same `node_id`, or taken over, once, by another daemon after
/// its own was not seen for a lease; never while its daemon is alive.
#[tokio::test]
async fn postgres_pending_copies_of_a_stopped_daemon_are_taken_over_once() {
    let server = Postgres::start();
    let url = server.database();
    let a = PgStore::open(&pg(&url, "a")).await.unwrap();
    copies(&a).await;
    let later = now_millis() + 1;
    let b = PgStore::open(&pg(&url, "b")).await.unwrap();
    assert!(b.pending_copies(later, true).await.unwrap().is_empty());
    assert!(
        b.pending_copies(later, false).await.unwrap().is_empty(),
        "a is alive: its copy is its own"
    );
    // c4's message is still queued for its deferred recipient.
    let due = copies_due(&["c1", "c4"]);
    let restarted = PgStore::open(&pg(&url, "a")).await.unwrap();
    assert_eq!(pending_copies_sorted(&restarted, later, true).await, due);
    // a stops for good: not seen for a lease.
    let db = url.rsplit('/').next().unwrap();
    server.psql(db, "UPDATE mailmux_nodes SET seen_at = 0 WHERE node = 'a'");
    assert_eq!(pending_copies_sorted(&b, later, false).await, due);
    assert!(
        b.pending_copies(later, false).await.unwrap().is_empty(),
        "taken over once"
    );
    // A third daemon looking at the same moment, whose view of the daemons
    // predates b's heartbeat: b took the copy less than a lease ago, so it
    // stays b's.
    server.psql(db, "DELETE FROM mailmux_nodes WHERE node = 'b'");
    let c = PgStore::open(&pg(&url, "c")).await.unwrap();
    server.psql(db, "DELETE FROM mailmux_nodes WHERE node = 'b'");
    assert!(
        c.pending_copies(later, false).await.unwrap().is_empty(),
        "a copy just taken over is not taken again"
    );
    b.note_copy("c1", "copied").await.unwrap();
    let r = restarted.get("c1").await.unwrap().unwrap();
    assert_eq!(r.sent_copy.as_deref(), Some("copied"));
    assert!(
        restarted.load("c1").await.unwrap().is_none(),
        "bytes dropped"
    );
}

/// Every statement of the store finds its rows of `mailmux_messages`
/// through an index, even on a new database, whose table is small enough
/// that PostgreSQL would rather scan it, and would then keep the plans it
/// cached as the table grows; and none is compiled by JIT. auto_explain
/// logs the plan of each statement.
#[tokio::test]
async fn postgres_statements_never_scan_the_messages_table() {
    let server = Postgres::start_configured(
        false,
        "session_preload_libraries = 'auto_explain'\n\
         auto_explain.log_min_duration = 0\n\
         auto_explain.log_nested_statements = on\n",
    );
    let store = PgStore::open(&pg(&server.database(), "n1")).await.unwrap();
    conformance(&store).await;
    drop(store);
    retries(&PgStore::open(&pg(&server.database(), "n1")).await.unwrap()).await;
    let log = server.log();
    assert!(
        log.contains("Index Scan") || log.contains("Index Only Scan"),
        "auto_explain logged no plans: {log}"
    );
    let scans: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Seq Scan on mailmux_messages"))
        .collect();
    assert!(scans.is_empty(), "{} sequential scans: {log}", scans.len());
    // Nor is any compiled to machine code first (JIT): a scan that remains
    // of a small table is priced out too, past `jit_above_cost`.
    let compiled = log.lines().filter(|l| l.contains("JIT:")).count();
    assert_eq!(compiled, 0, "statements compiled by JIT: {log}");
}

/// The queue's stats read the oldest queued message and the next retry
/// from one entry of an index each, however many messages wait: with
/// 20,000 queued, PostgreSQL plans both through their partial indexes.
#[tokio::test]
async fn postgres_stats_read_one_entry_of_an_index_however_long_the_queue() {
    let server = Postgres::start();
    let url = server.database();
    let db = url.rsplit('/').next().unwrap().to_owned();
    let store = PgStore::open(&pg(&url, "n1")).await.unwrap();
    server.psql(
        &db,
        "INSERT INTO mailmux_messages (message_id, state, rcpt, size, body, queued_at, due_at,
                                       next_attempt_at, updated_at, rounds, history)
         SELECT 'm' || i, 'queued', 'b@example.org', 1024, decode(repeat('ab', 1024), 'hex'),
                1000 + i, 1000 + i, 61000 + i, 1000 + i, i % 2, ''
           FROM generate_series(1, 20000) AS i;
         ANALYZE mailmux_messages;",
    );
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.oldest_queued_at, Some(1001));
    assert_eq!(stats.next_retry_at, Some(61001));
    for (sql, index) in [
        (
            "SELECT MIN(queued_at) FROM mailmux_messages WHERE state = 'queued'",
            "mailmux_messages_queued_at",
        ),
        (
            "SELECT MIN(next_attempt_at) FROM mailmux_messages WHERE state = 'queued' AND rounds > 0",
            "mailmux_messages_retry",
        ),
    ] {
        let plan = server.psql(&db, &format!("EXPLAIN {sql}"));
        assert!(plan.contains(index), "{sql}: {plan}");
        assert!(!plan.contains("Seq Scan"), "{sql}: {plan}");
    }
}

/// A page of the suppression list is a range of its primary key, with no
/// sort, however long the list (20,000 listed): the store's statement,
/// planned as the store plans it.
#[tokio::test]
async fn postgres_reads_a_page_of_the_suppression_list_through_its_key() {
    let server = Postgres::start();
    let url = server.database();
    let db = url.rsplit('/').next().unwrap().to_owned();
    let store = PgStore::open(&pg(&url, "n1")).await.unwrap();
    server.psql(
        &db,
        "INSERT INTO mailmux_suppressions (address, reason, created_at)
         SELECT 'someone.' || lpad(i::text, 6, '0') || '@example.org', 'manual', 1000
           FROM generate_series(1, 20000) AS i;
         ANALYZE mailmux_suppressions;",
    );
    let page = store
        .suppression_page(&SuppressionQuery {
            after: Some("someone.010000@example.org".into()),
            limit: Some(100),
            counts: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.entries[0].address, "someone.010001@example.org");
    assert_eq!(page.total, 20_000);
    // As the store's connections plan it: once, generic, with no
    // sequential scans.
    let plan = server.psql(
        &db,
        &format!(
            "SET enable_seqscan = off;
             SET plan_cache_mode = force_generic_plan;
             PREPARE page (text, text, bigint) AS {};
             EXPLAIN EXECUTE page('someone.010000@example.org', NULL, 101);",
            mailmux_actors::queue::postgres::SUPPRESSION_PAGE_SQL
        ),
    );
    assert!(
        plan.contains("Index Scan using mailmux_suppressions_pkey")
            && plan.contains("Index Cond: (address > $1)"),
        "{plan}"
    );
    assert!(!plan.contains("Sort"), "{plan}");
}

/// Each statement of the store is planned once per connection: left to
/// choose (`plan_cache_mode = auto`), PostgreSQL plans a batched statement
/// anew at every run whenever its arrays are small, which cost more than
/// running it when several daemons share the calls.
#[tokio::test]
async fn postgres_plans_each_statement_once_per_connection() {
    let server = Postgres::start_configured(
        false,
        "shared_preload_libraries = 'pg_stat_statements'\n\
         pg_stat_statements.track_planning = on\n",
    );
    let url = server.database();
    let db = url.rsplit('/').next().unwrap().to_owned();
    server.psql(&db, "CREATE EXTENSION pg_stat_statements");
    let settings = pg(&url, "n1");
    let store = PgStore::open(&settings).await.unwrap();
    for i in 0..40 {
        let id = format!("m{i}");
        store.accept(message(&id, None)).await.unwrap();
        store.mark(&id).await.unwrap();
        store.settle(&id, settle(State::Sent, None)).await.unwrap();
    }
    // The settles: one statement each, one message each.
    let counted = server.psql(
        &db,
        "SELECT calls || ' ' || plans FROM pg_stat_statements
          WHERE query LIKE '%attempt_log = COALESCE%'",
    );
    let (calls, plans) = counted.split_once(' ').expect(&counted);
    assert_eq!(calls, "40");
    let plans: u32 = plans.parse().unwrap();
    assert!(
        plans <= settings.pool,
        "the settle was planned {plans} times over {} connections",
        settings.pool
    );
}

/// Two daemons on one database: one idempotency key stores one message
/// across both; due messages are claimed by one daemon each, never both.
/// Claims a daemon's poll does not start (no round slot, no room for
/// their bytes) are let go at once: another daemon takes them without
/// waiting for the lease to run out, and a late write of the first daemon
/// is fenced.
#[tokio::test]
async fn postgres_claims_let_go_are_taken_by_another_daemon_at_once() {
    let server = Postgres::start();
    let url = server.database();
    let a = PgStore::open(&pg(&url, "a")).await.unwrap();
    let b = PgStore::open(&pg(&url, "b")).await.unwrap();
    let shared = PgStore::open_shared(&pg(&url, "cli")).await.unwrap();
    for i in 0..4 {
        shared
            .accept(message(&format!("g{i}"), None))
            .await
            .unwrap();
    }
    let mut claimed = a.due(now_millis(), 10).await.unwrap();
    claimed.sort();
    assert_eq!(claimed, ["g0", "g1", "g2", "g3"]);
    assert!(
        b.due(now_millis(), 10).await.unwrap().is_empty(),
        "leased to a"
    );
    a.let_go(&claimed[2..]).await.unwrap();
    let mut taken = b.due(now_millis(), 10).await.unwrap();
    taken.sort();
    assert_eq!(taken, ["g2", "g3"]);
    assert!(
        matches!(a.mark("g2").await, Err(StoreError::Fenced(_))),
        "a let it go"
    );
    b.mark("g2").await.unwrap();
    a.mark("g0").await.unwrap();
}

/// Callers' rates kept in PostgreSQL for every daemon: many takes at once
/// from two daemons pass the count once; a take of several buckets moves
/// all of them or, when one is full, none, also among the takes a daemon
/// sends together; buckets full again are purged.
#[tokio::test]
async fn postgres_rates_are_taken_whole_or_not_at_all_by_every_daemon() {
    let server = Postgres::start();
    let url = server.database();
    let a: Arc<dyn Store> = Arc::new(PgStore::open(&pg(&url, "a")).await.unwrap());
    let b: Arc<dyn Store> = Arc::new(PgStore::open(&pg(&url, "b")).await.unwrap());
    assert!(a.shares_rates());
    let minute = 60_000_000_000;
    let take = |key: &str, count: i64| RateTake {
        key: key.into(),
        cost_ns: minute / count,
        period_ns: minute,
    };
    let mut tasks = Vec::new();
    for i in 0..40 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        // Two buckets each, in key order, as the caller sorts them.
        let takes = vec![
            take("agent\nall 100/min", 100),
            take("agent\nten 10/min", 10),
        ];
        tasks.push(tokio::spawn(async move { store.take_rates(&takes).await }));
    }
    let mut passed = 0;
    for t in tasks {
        match t.await.unwrap().unwrap() {
            None => passed += 1,
            Some((i, wait)) => {
                assert_eq!(i, 1, "the 10/min bucket refuses");
                assert!(
                    wait > Duration::ZERO && wait <= Duration::from_secs(6),
                    "{wait:?}"
                );
            }
        }
    }
    assert_eq!(passed, 10, "10/min over two daemons");
    // The 30 refused took nothing from 100/min: 90 are left of it.
    let mut left = 0;
    while b
        .take_rates(&[take("agent\nall 100/min", 100)])
        .await
        .unwrap()
        .is_none()
    {
        left += 1;
        assert!(left <= 100);
    }
    assert_eq!(left, 90);
    let db = url.rsplit('/').next().unwrap();
    let rows = || server.psql(db, "SELECT COUNT(*) FROM mailmux_rates");
    let brief = RateTake {
        key: "other\n1/1ms".into(),
        cost_ns: 1_000_000,
        period_ns: 1_000_000,
    };
    assert_eq!(a.take_rates(&[brief]).await.unwrap(), None);
    assert_eq!(rows(), "3");
    tokio::time::sleep(Duration::from_millis(20)).await;
    a.purge(0, 0, 100).await.unwrap();
    assert_eq!(rows(), "2", "the full bucket is gone, the used ones stay");
    // Takes that arrive together go in one transaction: there too a
    // refused message moves none of its buckets, and the others move theirs.
    let full = take("mixed\none 1/min", 1);
    assert_eq!(
        a.take_rates(std::slice::from_ref(&full)).await.unwrap(),
        None
    );
    let mut tasks = Vec::new();
    for i in 0..40 {
        let store = a.clone();
        let mut takes = vec![take("mixed\nall 100/min", 100)];
        if i % 2 == 0 {
            takes.push(full.clone());
        }
        tasks.push(tokio::spawn(async move { store.take_rates(&takes).await }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let refused = t.await.unwrap().unwrap().map(|(at, _)| at);
        assert_eq!(refused, (i % 2 == 0).then_some(1), "message {i}");
    }
    let mut left = 0;
    while a
        .take_rates(&[take("mixed\nall 100/min", 100)])
        .await
        .unwrap()
        .is_none()
    {
        left += 1;
        assert!(left <= 100);
    }
    assert_eq!(left, 80, "only the 20 that passed took from 100/min");
    // Without the database, a take is an error, not a pass.
    let mut server = server;
    server.stop();
    let e = a.take_rates(&[take("agent\nall 100/min", 100)]).await;
    assert!(matches!(e, Err(StoreError::Unavailable(_))), "{e:?}");
}

#[tokio::test]
async fn postgres_daemons_share_keys_and_split_claims() {
    let server = Postgres::start();
    let url = server.database();
    let a: Arc<dyn Store> = Arc::new(PgStore::open(&pg(&url, "a")).await.unwrap());
    let b: Arc<dyn Store> = Arc::new(PgStore::open(&pg(&url, "b")).await.unwrap());
    let mut tasks = Vec::new();
    for i in 0..100 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            store
                .accept(message(&format!("k{i}"), Some(("same-key", 7))))
                .await
        }));
    }
    let mut stored = 0;
    for t in tasks {
        if let Accepted::Stored(_) = t.await.unwrap().unwrap() {
            stored += 1;
        }
    }
    assert_eq!(stored, 1, "one key, one message across daemons");

    // Stored by a process that claims nothing (the queue command), then
    // claimed by both daemons at once.
    let shared = PgStore::open_shared(&pg(&url, "cli")).await.unwrap();
    for i in 0..200 {
        shared
            .accept(message(&format!("c{i}"), None))
            .await
            .unwrap();
    }
    let (da, db) = tokio::join!(a.due(now_millis(), 150), b.due(now_millis(), 150));
    let (da, db) = (da.unwrap(), db.unwrap());
    let mut all: Vec<&String> = da
        .iter()
        .chain(&db)
        .filter(|id| id.starts_with('c'))
        .collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "a message claimed by both daemons");
    // A message a daemon holds is not the other's to claim.
    let more = b.due(now_millis(), 500).await.unwrap();
    assert!(more.iter().all(|id| !da.contains(id)), "b took a's claims");
    // Listings show the holder.
    let r = a.get(&da[0]).await.unwrap().unwrap();
    assert_eq!(r.node.as_deref(), Some("a"));
    // A message held by a live lease elsewhere is not cancelled under it.
    assert_eq!(
        b.cancel(&da[0]).await.unwrap(),
        Cancel::Refused(State::Sending)
    );
}

/// A lease that ran out is taken over, and the old holder's late writes are
/// refused: before its commit mark the message is delivered by the new
/// holder; after it, it becomes `unknown`.
#[tokio::test]
async fn postgres_fences_the_writes_of_a_lease_taken_over() {
    let server = Postgres::start();
    let url = server.database();
    let a = PgStore::open(&pg(&url, "a")).await.unwrap();
    let b = PgStore::open(&pg(&url, "b")).await.unwrap();
    a.accept(message("before-mark", None)).await.unwrap();
    a.accept(message("after-mark", None)).await.unwrap();
    a.mark("after-mark").await.unwrap();
    // A waiting call's mark, whose answer a will be said to have lost.
    a.accept_marked(message("lost-mark", None)).await.unwrap();
    // Daemon a stalls: its leases run out.
    let db = url.rsplit('/').next().unwrap();
    server.psql(db, "UPDATE mailmux_messages SET lease_until = 0");
    let taken = b.due(now_millis(), 10).await.unwrap();
    assert_eq!(taken, ["before-mark"]);
    let r = b.get("after-mark").await.unwrap().unwrap();
    assert_eq!(r.state, State::Unknown, "marked, then its daemon vanished");
    assert_eq!(r.node.as_deref(), Some("a"));
    let r = b.get("before-mark").await.unwrap().unwrap();
    assert_eq!((r.state, r.node.as_deref()), (State::Queued, Some("b")));

    // a wakes up: each of its writes is refused.
    assert!(matches!(
        a.mark("before-mark").await,
        Err(StoreError::Fenced(_))
    ));
    assert!(matches!(
        a.settle("before-mark", settle(State::Sent, None)).await,
        Err(StoreError::Fenced(_))
    ));
    assert!(matches!(
        a.settle("after-mark", settle(State::Sent, None)).await,
        Err(StoreError::Fenced(_))
    ));
    assert_eq!(
        b.get("after-mark").await.unwrap().unwrap().state,
        State::Unknown
    );
    // Nor does the round's end after a lost mark's answer change the row
    // taken over, or store the message again; a's next accept goes through.
    let t = now_millis();
    assert!(
        a.accept_settled_unconfirmed(message("lost-mark", None), settle(State::Queued, Some(t)))
            .await
            .is_err()
    );
    assert_eq!(
        b.get("lost-mark").await.unwrap().unwrap().state,
        State::Unknown
    );
    a.accept(message("after-lost-mark", None)).await.unwrap();
    // b's own writes go through.
    b.mark("before-mark").await.unwrap();
    b.settle("before-mark", settle(State::Sent, None))
        .await
        .unwrap();
    let r = a.get("before-mark").await.unwrap().unwrap();
    assert_eq!((r.state, r.node.as_deref()), (State::Sent, Some("b")));
    assert_counts_exact(&server, &url, &a).await;
}

/// A store on a new database, reached through a [`CutProxy`] (its
/// database's name and the URL through the proxy with it). One connection,
/// and a lease no renewal falls within: the only client bytes that name a
/// message are the store's writes of it.
///
/// [`CutProxy`]: support::cut_proxy::CutProxy
async fn behind_a_cut_proxy(
    server: &Postgres,
) -> (support::cut_proxy::CutProxy, String, String, PgStore) {
    let url = server.database();
    let db = url.rsplit('/').next().unwrap().to_owned();
    let proxy = support::cut_proxy::CutProxy::start(support::loopback(server.port)).await;
    let through = url.replace(
        &format!(":{}/", server.port),
        &format!(":{}/", proxy.port()),
    );
    let settings = PgSettings {
        pool: 1,
        lease: Duration::from_secs(600),
        ..pg(&through, "n")
    };
    let store = PgStore::open(&settings).await.unwrap();
    (proxy, db, through, store)
}

/// A settle whose statement committed but whose answer was lost (the
/// connection to PostgreSQL broke in between) is tried again on a new
/// connection. The second try must neither write the outcome twice (the
/// history, the attempts, the rounds, the counts) nor report a lease lost:
/// the row holds this daemon's own outcome.
#[tokio::test]
async fn postgres_settle_whose_answer_was_lost_is_written_once() {
    let server = Postgres::start();
    let (proxy, db, through, store) = behind_a_cut_proxy(&server).await;
    let attempt = AttemptRecord {
        at: now_millis(),
        relay: "r".into(),
        class: Some("transient".into()),
        code: Some(451),
        text: "try later".into(),
        duration_ms: 3,
    };
    let with_attempt = |state, next| Settle {
        attempts: vec![attempt.clone()],
        ..settle(state, next)
    };
    // Warm the connection's prepared statements, so that the settle's
    // execution is one exchange.
    store.accept(message("warm", None)).await.unwrap();
    store.mark("warm").await.unwrap();
    store
        .settle("warm", with_attempt(State::Sent, None))
        .await
        .unwrap();

    let cases = [
        ("lost-answer-sent", State::Sent, None, true),
        (
            "lost-answer-deferred",
            State::Queued,
            Some(now_millis() + 600_000),
            false,
        ),
    ];
    for (n, (id, state, next, marked)) in cases.into_iter().enumerate() {
        store.accept(message(id, None)).await.unwrap();
        if marked {
            store.mark(id).await.unwrap();
        }
        proxy.arm(id.as_bytes());
        store
            .settle(id, with_attempt(state, next))
            .await
            .unwrap_or_else(|e| panic!("{id}: the settle committed, yet: {e}"));
        assert_eq!(proxy.cut(), n + 1, "{id}: the answer was dropped");
        let r = store.get(id).await.unwrap().unwrap();
        let states = states_of(&r);
        let expected: Vec<State> = if marked {
            vec![State::Queued, State::Sending, state]
        } else {
            vec![State::Queued, state]
        };
        assert_eq!((r.state, states), (state, expected), "{id}");
        let rounds = server.psql(
            &db,
            &format!("SELECT rounds FROM mailmux_messages WHERE message_id = '{id}'"),
        );
        assert_eq!(
            (rounds.as_str(), r.attempts.len()),
            ("1", 1),
            "{id}: one round and one attempt"
        );
        assert_counts_exact(&server, &through, &store).await;
    }
}

/// A pooled connection is pinged before use only after a second idle. One
/// that PostgreSQL closed while it sat in the pool for less (a fast
/// restart) must still cost no call an error: the next accept and the next
/// read succeed at once, on a new connection, and so does one after a
/// second idle.
#[tokio::test]
async fn postgres_connections_closed_in_the_pool_cost_no_error() {
    let server = Postgres::start();
    let (proxy, db, _, store) = behind_a_cut_proxy(&server).await;
    let backends = || {
        server.psql(
            &db,
            "SELECT COUNT(*) FROM pg_stat_activity
              WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
        )
    };
    let rows = |id: &str| {
        server.psql(
            &db,
            &format!("SELECT COUNT(*) FROM mailmux_messages WHERE message_id = '{id}'"),
        )
    };
    // Closes every connection of the store's pool (one, through the proxy),
    // well inside the second without a ping.
    let close_all = || async {
        proxy.close_all();
        let closed = support::wait_until(|| backends() == "0", Duration::from_secs(5)).await;
        assert!(closed, "the proxy did not close the pool's connection");
    };
    store.accept(message("before", None)).await.unwrap();

    close_all().await;
    assert_eq!(
        store.accept(message("after-close", None)).await,
        Ok(Accepted::Stored(State::Queued))
    );
    assert_eq!(rows("after-close"), "1");

    close_all().await;
    assert!(store.get("before").await.unwrap().is_some());

    close_all().await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(store.get("after-close").await.unwrap().is_some());
}

/// An accept whose write committed but whose answer was lost is tried
/// again in the form that keeps the first try's rows: the message is
/// stored once and the caller told so, on each path (the accepts writer's
/// INSERT, a keyed accept's transaction, a batch's transaction). When the
/// database cannot be reached again, the caller is told that the write is
/// unconfirmed, not that nothing was stored; the stored message is then
/// this daemon's to deliver.
#[tokio::test]
async fn postgres_accept_whose_answer_was_lost_is_stored_once() {
    let server = Postgres::start();
    let (proxy, db, through, store) = behind_a_cut_proxy(&server).await;
    let rows = |id: &str| {
        server.psql(
            &db,
            &format!(
                "SELECT COUNT(*) || ',' || (SELECT COUNT(*) FROM mailmux_idempotency WHERE message_id = '{id}')
                   FROM mailmux_messages WHERE message_id = '{id}'"
            ),
        )
    };

    // The accepts writer's one INSERT: the cut follows the statement that
    // names the message.
    proxy.arm(b"lost-accept-plain");
    assert_eq!(
        store.accept(message("lost-accept-plain", None)).await,
        Ok(Accepted::Stored(State::Queued))
    );
    assert_eq!(proxy.cut(), 1);
    assert_eq!(rows("lost-accept-plain"), "1,0");

    // A keyed accept: the answer to its COMMIT is lost.
    proxy.arm(b"COMMIT");
    assert_eq!(
        store
            .accept(message("lost-accept-keyed", Some(("lost-key", 7))))
            .await,
        Ok(Accepted::Stored(State::Queued))
    );
    assert_eq!(proxy.cut(), 2);
    assert_eq!(rows("lost-accept-keyed"), "1,1");
    // The key still answers for that message.
    assert_eq!(
        store
            .accept(message("lost-accept-keyed-2", Some(("lost-key", 7))))
            .await,
        Ok(Accepted::Replay("lost-accept-keyed".into()))
    );

    // A batch: the same.
    proxy.arm(b"COMMIT");
    assert_eq!(
        store
            .accept_many(
                vec![
                    message("lost-batch-1", None),
                    message("lost-batch-2", Some(("lost-batch-key", 1))),
                ],
                false
            )
            .await,
        Ok(vec![
            Accepted::Stored(State::Queued),
            Accepted::Stored(State::Queued)
        ])
    );
    assert_eq!(proxy.cut(), 3);
    assert_eq!(rows("lost-batch-1"), "1,0");
    assert_eq!(rows("lost-batch-2"), "1,1");

    // The database does not come back in time: unconfirmed, and in fact
    // stored.
    proxy.arm_then_refuse(b"lost-accept-unconfirmed");
    let out = store.accept(message("lost-accept-unconfirmed", None)).await;
    assert!(
        matches!(out, Err(StoreError::Unconfirmed(_))),
        "unconfirmed, not refused: {out:?}"
    );
    assert_eq!(proxy.cut(), 4);
    proxy.allow();
    assert_eq!(rows("lost-accept-unconfirmed"), "1,0");
    let due = store.due(now_millis(), 100).await.unwrap();
    assert!(
        due.iter().any(|id| id == "lost-accept-unconfirmed"),
        "this daemon claims it: {due:?}"
    );
    assert_counts_exact(&server, &through, &store).await;
}

/// Migrations: two daemons starting at once on an empty database migrate it
/// once; a schema newer than this build is refused.
#[tokio::test]
async fn postgres_migrates_once_and_refuses_a_newer_schema() {
    let server = Postgres::start();
    let url = server.database();
    let db = url.rsplit('/').next().unwrap().to_owned();
    let (sa, sb) = (pg(&url, "a"), pg(&url, "b"));
    let (a, b) = tokio::join!(PgStore::open(&sa), PgStore::open(&sb));
    a.unwrap();
    b.unwrap();
    let versions = server.psql(
        &db,
        "SELECT string_agg(version::text, ',') FROM mailmux_schema",
    );
    let all: Vec<String> = (1..=mailmux_actors::queue::postgres::SCHEMA_VERSION)
        .map(|v| v.to_string())
        .collect();
    assert_eq!(versions, all.join(","), "each migration applied once");
    server.psql(&db, "INSERT INTO mailmux_schema (version) VALUES (99)");
    match PgStore::open(&pg(&url, "c")).await {
        Err(StoreError::TooNew { found, .. }) => assert_eq!(found, 99),
        other => panic!("a newer schema was accepted: {other:?}"),
    }
    // An unreachable database is a clear error, not a hang.
    let dead = format!(
        "postgres://postgres:pw@127.0.0.1:{}/x",
        support::free_port()
    );
    match PgStore::open(&pg(&dead, "d")).await {
        Err(StoreError::Unavailable(e)) => assert!(!e.contains("pw@"), "{e}"),
        other => panic!("{other:?}"),
    }
}

/// Version 8 keeps idempotency keys per caller: the keys of a version 7
/// database go to the callers of their messages, and a key whose message is
/// gone to no caller.
#[tokio::test]
async fn postgres_keys_of_version_7_are_scoped_to_their_callers() {
    let server = Postgres::start();
    let url = server.database();
    let db = url.rsplit('/').next().unwrap().to_owned();
    {
        let store = PgStore::open(&pg(&url, "a")).await.unwrap();
        store.accept(message("kept", Some(("k", 1)))).await.unwrap();
    }
    server.psql(
        &db,
        "UPDATE mailmux_idempotency SET key = substr(key, strpos(key, chr(31)) + 1);
         INSERT INTO mailmux_idempotency (key, message_id, hash, created_at)
             VALUES ('orphan', 'purged', '\\x00', 0);
         ALTER TABLE mailmux_messages DROP COLUMN copy_relay;
         DROP TABLE mailmux_suppressions; DROP TABLE mailmux_suppression_version;
         DROP TABLE mailmux_suppression_changes; DROP TABLE mailmux_delivery_pause;
         DROP INDEX mailmux_messages_tag; ALTER TABLE mailmux_messages DROP COLUMN tag;
         ALTER TABLE mailmux_messages DROP COLUMN max_age;
         ALTER TABLE mailmux_messages DROP COLUMN priority;
         DROP FUNCTION mailmux_take_rates; DROP FUNCTION mailmux_take_rate_groups;
         DROP TABLE mailmux_rates;
         DROP TABLE mailmux_report_cursors; ALTER TABLE mailmux_messages DROP COLUMN reports;
         DELETE FROM mailmux_schema WHERE version >= 8;",
    );
    assert_eq!(
        server.psql(
            &db,
            "SELECT string_agg(key, ',' ORDER BY key) FROM mailmux_idempotency"
        ),
        "k,orphan",
        "the keys as version 7 kept them"
    );
    let store = PgStore::open(&pg(&url, "a")).await.unwrap();
    keys_once_scoped(&store).await;
}

/// TLS to the database where the URL asks for it: `sslmode=verify-full`
/// with the server's CA connects over TLS (PostgreSQL's own view says so);
/// with another CA it is refused.
#[tokio::test]
async fn postgres_over_tls_when_the_url_asks() {
    let ca = support::tls::TestCa::generate();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, root) = (
        dir.path().join("server.crt"),
        dir.path().join("server.key"),
        dir.path().join("ca.crt"),
    );
    std::fs::write(&cert, &ca.cert_pem).unwrap();
    std::fs::write(&key, &ca.key_pem).unwrap();
    std::fs::write(&root, &ca.ca_pem).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        // The server runs as `nobody` when the tests run as root; its key
        // must be its own.
        if std::fs::metadata("/proc/self")
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        {
            std::os::unix::fs::chown(&key, Some(65534), Some(65534)).unwrap();
        }
    }
    let server = Postgres::start_configured(
        false,
        &format!(
            "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'",
            cert.display(),
            key.display()
        ),
    );
    let url = server.database();
    let db = url.rsplit('/').next().unwrap().to_owned();
    let tls_url = format!("{url}?sslmode=verify-full&sslrootcert={}", root.display());
    let store = PgStore::open(&pg(&tls_url, "tls")).await.unwrap();
    store.accept(message("over-tls", None)).await.unwrap();
    let encrypted = server.psql(
        "postgres",
        &format!(
            "SELECT COUNT(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
              WHERE s.ssl AND a.datname = '{db}'"
        ),
    );
    assert!(encrypted.parse::<u32>().unwrap() >= 1, "no TLS connection");

    let other = support::tls::TestCa::generate();
    let wrong = dir.path().join("other-ca.crt");
    std::fs::write(&wrong, &other.ca_pem).unwrap();
    let refused = format!("{url}?sslmode=verify-full&sslrootcert={}", wrong.display());
    match PgStore::open(&pg(&refused, "tls2")).await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("a server the CA did not sign was trusted: {other:?}"),
    }
}

#[tokio::test]
async fn close_merges_the_log_and_refuses_later_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let store = SqliteStore::open(&path).unwrap();
    store.accept(message("kept", None)).await.unwrap();
    let wal = dir.path().join("q.db-wal");
    assert!(std::fs::metadata(&wal).unwrap().len() > 0);
    // Another process's close (a `send --no-wait`) leaves the daemon's log
    // alone, and the daemon's store goes on.
    let shared = SqliteStore::open_shared(&path).unwrap();
    shared.close().await;
    assert!(std::fs::metadata(&wal).unwrap().len() > 0);
    store.accept(message("more", None)).await.unwrap();
    store.close().await;
    // Merged: empty, or already removed by SQLite when the writer's
    // connection closed as the last one that had read the store.
    assert_eq!(std::fs::metadata(&wal).map_or(0, |m| m.len()), 0);
    assert!(matches!(
        store.accept(message("late", None)).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(store.get("kept").await.unwrap().is_some());
    drop(store);
    // The database file alone holds every commit.
    let c =
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let _ = std::fs::remove_file(&wal);
    let n: i64 = c
        .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);
}

/// A waiting call's commit mark (`accept_marked`) whose answer is lost while
/// PostgreSQL stays out of reach past the 10 s in which the store asks
/// again: the "." is not sent, and the row the mark stored must not be
/// left `sending`, to be taken for a message that may have been delivered
/// (`unknown`) and never sent. Once the database is back the round's end
/// turns that row into a deferred message with its bytes, and the next
/// round delivers it, once; the call, which waits, is told `sent`.
#[tokio::test]
async fn postgres_a_mark_whose_answer_was_lost_is_sent_once_when_the_database_is_back() {
    use mailmux_actors::RelaySettings;
    use mailmux_actors::queue::{Queue, QueueSettings, StoreKind};

    let server = Postgres::start();
    let (proxy, _db, through, store) = behind_a_cut_proxy(&server).await;
    let sink = support::smtp_sink::SmtpSink::start().await;
    let dispatcher =
        dispatcher_to(vec![RelaySettings::smtp("sink", "127.0.0.1", sink.port())]).await;
    let store: Arc<dyn Store> = Arc::new(store);
    let settings = QueueSettings {
        store: StoreKind::Postgres(pg(&through, "n")),
        retry_base: Duration::from_millis(200),
        retry_max: Duration::from_millis(400),
        ..QueueSettings::default()
    };
    // Warm the connection with the mark's own statement, so that the mark
    // is one exchange; settled, so that nothing delivers it.
    store.accept_marked(message("warm", None)).await.unwrap();
    store
        .settle("warm", settle(State::Sent, None))
        .await
        .unwrap();
    let queue = Queue::start(store.clone(), dispatcher.clone(), settings, 8)
        .await
        .unwrap();

    let id = "lost-mark@mailmux.test";
    let mail = mail_to_b(id, Duration::from_secs(120));
    proxy.arm_then_refuse(id.as_bytes());
    let call = {
        let queue = queue.clone();
        tokio::spawn(async move { queue.submit(submission(mail, true, None, None)).await })
    };
    assert!(
        support::wait_until(|| proxy.cut() == 1, Duration::from_secs(10)).await,
        "the mark's answer was not cut"
    );
    // Past the store's 10 s of asking again: the mark is unconfirmed.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(sink.count(), 0, "sent although its mark was not confirmed");
    proxy.allow();

    let answer = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("the call answers once the database is back")
        .unwrap()
        .unwrap_or_else(|e| panic!("the message is stored, yet: {e}"));
    // The call waits through the retry, within its deadline.
    assert_eq!(answer.record.state, State::Sent, "{answer:?}");
    let r = queue.status(id).await.unwrap().unwrap();
    assert_eq!(r.state, State::Sent);
    let first = &r.attempts[0];
    assert_eq!(first.class.as_deref(), Some("busy"), "{first:?}");
    assert!(first.text.contains("did not confirm"), "{first:?}");
    let states = states_of(&r);
    assert_eq!(
        states,
        [
            State::Queued,
            State::Sending,
            State::Queued,
            State::Sending,
            State::Sent
        ]
    );
    assert!(sink.wait_for_count(1, Duration::from_secs(5)).await);
    assert_eq!(sink.message_ids(), [format!("<{id}>")], "once at the sink");
    assert_eq!(sink.count(), 1);
    queue.shutdown(Duration::from_secs(5)).await;
    dispatcher.shutdown(Duration::from_secs(5)).await;
}

/// A selection's cancels write nothing for the messages it lists in a
/// final state (a campaign's tag may name a million sent ones): only the
/// one still waiting is asked to be cancelled, and the summary counts the
/// others by their state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selection_writes_nothing_for_its_finished_messages() {
    use mailmux_actors::queue::{Queue, QueueSettings, StoreKind};

    let inner: Arc<dyn Store> = Arc::new(MemoryStore::new());
    for i in 0..5 {
        let mut m = NewMessage {
            tag: Some("spring".into()),
            ..message(&format!("t{i}"), None)
        };
        if i == 4 {
            // Scheduled an hour ahead: nothing delivers it meanwhile.
            m.due_at += 3_600_000;
        }
        inner.accept(m).await.unwrap();
    }
    for i in 0..4 {
        let id = format!("t{i}");
        inner.mark(&id).await.unwrap();
        inner.settle(&id, settle(State::Sent, None)).await.unwrap();
    }
    let counted = Arc::new(SlowMarks {
        inner,
        delay: Duration::ZERO,
        cancels: Default::default(),
    });
    let dispatcher = dispatcher_to(Vec::new()).await;
    let settings = QueueSettings {
        store: StoreKind::Memory,
        ..QueueSettings::default()
    };
    let queue = Queue::start(counted.clone(), dispatcher.clone(), settings, 8)
        .await
        .unwrap();
    let filter = Filter {
        tag: Some("spring".into()),
        ..Filter::default()
    };
    let done = queue.cancel_each(&filter).await.unwrap();
    assert_eq!((done.matched, done.acted), (5, 1), "{done:?}");
    assert_eq!(
        done.states,
        [(State::Sent, 4), (State::Cancelled, 1)].into(),
        "{done:?}"
    );
    assert_eq!(
        counted.cancels.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "a cancel asked of a finished message"
    );
    queue.shutdown(Duration::from_secs(5)).await;
    dispatcher.shutdown(Duration::from_secs(5)).await;
}

/// A cancel dropped before its write is answered (a selection's cancels
/// after a store error) lets its claim on the message go: the message can
/// still be cancelled, and is never seen as one a relay holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_dropped_half_way_lets_its_claim_go() {
    use mailmux_actors::queue::{Queue, QueueSettings, StoreKind};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    let dispatcher = dispatcher_to(Vec::new()).await;
    let settings = QueueSettings {
        store: StoreKind::Sqlite { path },
        ..QueueSettings::default()
    };
    let queue = Queue::start(store, dispatcher.clone(), settings, 8)
        .await
        .unwrap();
    let id = "dropped-cancel@mailmux.test";
    let mail = mail_to_b(id, Duration::from_secs(60));
    let later = std::time::SystemTime::now() + Duration::from_secs(3600);
    queue
        .submit(submission(mail, false, Some(later), None))
        .await
        .unwrap();
    // Polled once, while the store's writer has the write: then dropped.
    let mut dropped = Box::pin(queue.cancel(id));
    let first = futures_util::poll!(dropped.as_mut());
    assert!(
        first.is_pending(),
        "the cancel ended at its first poll: {first:?}"
    );
    drop(dropped);
    let again = queue.cancel(id).await.unwrap();
    assert!(
        matches!(again, Cancel::Cancelled | Cancel::Refused(State::Cancelled)),
        "{again:?}"
    );
    queue.shutdown(Duration::from_secs(5)).await;
    dispatcher.shutdown(Duration::from_secs(5)).await;
}

/// A store whose commit marks (`mark`, `accept_marked`) take `delay`
/// before they are written: a slow database. It counts the cancels it is
/// asked for.
#[derive(Debug)]
struct SlowMarks {
    inner: Arc<dyn Store>,
    delay: Duration,
    cancels: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Store for SlowMarks {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    async fn suppress(&self, entries: Vec<Suppression>) -> Result<Vec<String>, StoreError> {
        self.inner.suppress(entries).await
    }
    async fn unsuppress(&self, address: &str) -> Result<bool, StoreError> {
        self.inner.unsuppress(address).await
    }
    async fn suppression_version(&self) -> Result<i64, StoreError> {
        self.inner.suppression_version().await
    }
    async fn paused(&self) -> Result<Option<queue::Paused>, StoreError> {
        self.inner.paused().await
    }
    async fn set_paused(&self, pause: Option<queue::Paused>) -> Result<bool, StoreError> {
        self.inner.set_paused(pause).await
    }
    async fn suppression(&self, address: &str) -> Result<Option<Suppression>, StoreError> {
        self.inner.suppression(address).await
    }
    async fn suppression_page(
        &self,
        query: &SuppressionQuery,
    ) -> Result<SuppressionPage, StoreError> {
        self.inner.suppression_page(query).await
    }
    async fn suppression_changes(
        &self,
        since: i64,
    ) -> Result<Option<(i64, Vec<SuppressionChange>)>, StoreError> {
        self.inner.suppression_changes(since).await
    }
    async fn report_cursor(&self, mailbox: &str) -> Result<Option<(u32, u32)>, StoreError> {
        self.inner.report_cursor(mailbox).await
    }
    async fn note_reports(
        &self,
        message_id: &str,
        reports: Vec<ReportRecord>,
    ) -> Result<Vec<ReportRecord>, StoreError> {
        self.inner.note_reports(message_id, reports).await
    }
    async fn advance_report_cursor(
        &self,
        mailbox: &str,
        validity: u32,
        uid: u32,
    ) -> Result<(), StoreError> {
        self.inner
            .advance_report_cursor(mailbox, validity, uid)
            .await
    }
    fn durable(&self) -> bool {
        self.inner.durable()
    }
    async fn accept(&self, m: NewMessage) -> Result<Accepted, StoreError> {
        self.inner.accept(m).await
    }
    async fn accept_many(
        &self,
        ms: Vec<NewMessage>,
        atomic: bool,
    ) -> Result<Vec<Accepted>, StoreError> {
        self.inner.accept_many(ms, atomic).await
    }
    async fn mark(&self, message_id: &str) -> Result<(), StoreError> {
        tokio::time::sleep(self.delay).await;
        self.inner.mark(message_id).await
    }
    async fn accept_marked(&self, m: NewMessage) -> Result<(), StoreError> {
        tokio::time::sleep(self.delay).await;
        self.inner.accept_marked(m).await
    }
    async fn settle(&self, message_id: &str, s: Settle) -> Result<(), StoreError> {
        self.inner.settle(message_id, s).await
    }
    async fn accept_settled(&self, m: NewMessage, s: Settle) -> Result<(), StoreError> {
        self.inner.accept_settled(m, s).await
    }
    async fn cancel(&self, message_id: &str) -> Result<Cancel, StoreError> {
        self.cancels
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.cancel(message_id).await
    }
    async fn decide(&self, message_id: &str, d: Decision) -> Result<Decided, StoreError> {
        self.inner.decide(message_id, d).await
    }
    async fn expire_held(&self, now: queue::Millis) -> Result<Vec<String>, StoreError> {
        self.inner.expire_held(now).await
    }
    async fn retry(&self, message_id: &str, force: bool) -> Result<Retry, StoreError> {
        self.inner.retry(message_id, force).await
    }
    async fn due(&self, now: queue::Millis, limit: usize) -> Result<Vec<String>, StoreError> {
        self.inner.due(now, limit).await
    }
    async fn next_due(&self) -> Result<Option<queue::Millis>, StoreError> {
        self.inner.next_due().await
    }
    async fn load(&self, message_id: &str) -> Result<Option<queue::Pending>, StoreError> {
        self.inner.load(message_id).await
    }
    async fn get(&self, message_id: &str) -> Result<Option<queue::Record>, StoreError> {
        self.inner.get(message_id).await
    }
    async fn find_key(
        &self,
        caller: Option<&str>,
        key: &str,
    ) -> Result<Option<String>, StoreError> {
        self.inner.find_key(caller, key).await
    }
    async fn list(
        &self,
        filter: &Filter,
        limit: usize,
        cursor: Option<i64>,
    ) -> Result<(Vec<queue::Summary>, Option<i64>), StoreError> {
        self.inner.list(filter, limit, cursor).await
    }
    async fn count(&self, filter: &Filter) -> Result<Vec<(State, u64)>, StoreError> {
        self.inner.count(filter).await
    }
    async fn stats(&self) -> Result<queue::Stats, StoreError> {
        self.inner.stats().await
    }
    async fn note_copy(&self, message_id: &str, outcome: &str) -> Result<(), StoreError> {
        self.inner.note_copy(message_id, outcome).await
    }
    async fn recover(&self) -> Result<queue::Recovered, StoreError> {
        self.inner.recover().await
    }
    async fn purge(
        &self,
        finished_before: queue::Millis,
        keys_before: queue::Millis,
        limit: usize,
    ) -> Result<Purged, StoreError> {
        self.inner.purge(finished_before, keys_before, limit).await
    }
}

/// A waiting call its client cancels while the round's commit mark is
/// being written (a slow store), on each store: the round ends at once,
/// and its outcome is written after the mark, so the message ends
/// `cancelled`, never `sending` with nothing left to finish it (on
/// PostgreSQL, its lease renewed for as long as the daemon runs), and no
/// "." was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cancelled_while_its_mark_is_written_ends_cancelled() {
    use mailmux_actors::RelaySettings;
    use mailmux_actors::queue::{Queue, QueueSettings, StoreKind};
    use tokio_util::sync::CancellationToken;

    let sink = support::smtp_sink::SmtpSink::start().await;
    let dispatcher =
        dispatcher_to(vec![RelaySettings::smtp("sink", "127.0.0.1", sink.port())]).await;
    let server = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    for (kind, store) in [
        ("memory", Arc::new(MemoryStore::new()) as Arc<dyn Store>),
        (
            "sqlite",
            Arc::new(SqliteStore::open(&dir.path().join("q.db")).unwrap()),
        ),
        (
            "postgres",
            Arc::new(PgStore::open(&pg(&server.database(), "n")).await.unwrap()),
        ),
    ] {
        let slow: Arc<dyn Store> = Arc::new(SlowMarks {
            inner: store.clone(),
            delay: Duration::from_millis(600),
            cancels: Default::default(),
        });
        let settings = QueueSettings {
            store: StoreKind::Memory,
            ..QueueSettings::default()
        };
        let queue = Queue::start(slow, dispatcher.clone(), settings, 8)
            .await
            .unwrap();
        let id = format!("cancelled-at-mark-{kind}@mailmux.test");
        let cancel = CancellationToken::new();
        let call = {
            let (queue, cancel) = (queue.clone(), cancel.clone());
            let mail = mail_to_b(&id, Duration::from_secs(30));
            tokio::spawn(async move {
                queue
                    .submit(submission(mail, true, None, Some(cancel)))
                    .await
            })
        };
        // The round is at its mark by now (the relay answered the envelope
        // on loopback); the mark's write takes 600 ms.
        tokio::time::sleep(Duration::from_millis(250)).await;
        cancel.cancel();
        let answer = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("the call ends")
            .unwrap();
        // Past the mark's write, and any round that could follow it.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let r = store.get(&id).await.unwrap();
        assert_eq!(
            r.as_ref().map(|r| r.state),
            Some(State::Cancelled),
            "{kind}: answered {answer:?}, stored {r:?}"
        );
        queue.shutdown(Duration::from_secs(5)).await;
    }
    assert_eq!(sink.count(), 0, "no message reached the sink");
    dispatcher.shutdown(Duration::from_secs(5)).await;
}

/// Hears every round: the ids of the messages sent, and of those whose
/// copy it was handed.
#[derive(Debug, Default)]
struct Heard {
    sent: std::sync::Mutex<Vec<String>>,
    delivered: std::sync::Mutex<Vec<String>>,
}

impl queue::Observer for Heard {
    fn event(&self, e: &queue::Event<'_>) {
        if e.action == queue::Action::Sent {
            self.sent.lock().unwrap().push(e.message_id.to_owned());
        }
    }
    fn delivered(&self, d: &queue::Delivered<'_>) {
        self.delivered.lock().unwrap().push(d.message_id.to_owned());
    }
    fn copies(&self, relay: &str) -> bool {
        relay == "sink"
    }
}

/// An opened queue recovers its store and delivers nothing until it runs,
/// so that the observer attached by `run` hears of every round, the first
/// ones of a start with mail waiting too, and the Sent copy of each is
/// handed over as it is settled (not left for the next start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opened_queue_delivers_nothing_until_it_runs_and_its_observer_hears_every_round() {
    use mailmux_actors::RelaySettings;
    use mailmux_actors::queue::{Queue, QueueSettings, StoreKind};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    let ids: Vec<String> = (0..5)
        .map(|i| format!("waiting-{i}@mailmux.test"))
        .collect();
    for id in &ids {
        store.accept(message(id, None)).await.unwrap();
    }
    let sink = support::smtp_sink::SmtpSink::start().await;
    let dispatcher =
        dispatcher_to(vec![RelaySettings::smtp("sink", "127.0.0.1", sink.port())]).await;
    let settings = QueueSettings {
        store: StoreKind::Sqlite { path },
        ..QueueSettings::default()
    };
    let queue = Queue::open(store.clone(), dispatcher.clone(), settings, 8)
        .await
        .unwrap();
    // Several of the runner's poll intervals.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.count(), 0, "delivered before the queue ran");
    for id in &ids {
        let r = queue.status(id).await.unwrap().unwrap();
        assert_eq!(r.state, State::Queued, "{id}: {r:?}");
    }

    let heard = Arc::new(Heard::default());
    queue.run(Some(heard.clone()));
    // A second run starts no second runner, and changes no observer.
    queue.run(None);
    assert!(
        sink.wait_for_count(5, Duration::from_secs(20)).await,
        "the waiting messages were not delivered: {} at the sink",
        sink.count()
    );
    let all_heard = support::wait_until(
        || heard.sent.lock().unwrap().len() == ids.len(),
        Duration::from_secs(10),
    )
    .await;
    assert!(all_heard, "heard of {:?}", heard.sent.lock().unwrap());
    let mut sent = heard.sent.lock().unwrap().clone();
    let mut delivered = heard.delivered.lock().unwrap().clone();
    sent.sort();
    delivered.sort();
    assert_eq!(sent, ids, "every round's outcome heard, once");
    assert_eq!(delivered, ids, "every copy handed over, once");
    for id in &ids {
        let r = queue.status(id).await.unwrap().unwrap();
        assert_eq!(r.state, State::Sent, "{id}: {r:?}");
        assert_eq!(r.sent_copy.as_deref(), Some("pending"), "{id}: {r:?}");
    }
    assert_eq!(sink.count(), 5, "each message once");
    queue.shutdown(Duration::from_secs(5)).await;
    dispatcher.shutdown(Duration::from_secs(5)).await;
}
