//! Supervision and reloads under load: crashed actors are restarted, callers
//! always get an answer, nothing is lost or sent twice, the restart limit
//! stops a crash loop, and a reload replaces relays while mail flows.
//!
//! Needs the test-only `fault-hooks` feature (the README's test command
//! enables it).
#![cfg(feature = "fault-hooks")]

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mailmux_actors::{
    Dispatcher, Limits, Mail, PanicTarget, RelaySettings, RelayState, Report, RouterSettings,
    Settings, Status, Strategy, SupervisorSettings, Timeouts,
};
use support::fault_smtp::{FaultSmtp, Script};
use tokio::task::JoinSet;
use tokio::time::Instant;

fn relay(name: &str, port: u16, priority: i32) -> RelaySettings {
    let mut r = RelaySettings::smtp(name, "127.0.0.1", port);
    r.priority = priority;
    r.timeouts = Timeouts::uniform(Duration::from_secs(5));
    r.pool.max_connections = 4;
    r
}

fn settings(relays: Vec<RelaySettings>) -> Settings {
    Settings {
        relays,
        router: RouterSettings {
            strategy: Strategy::Priority,
            max_attempts: 3,
        },
        supervisor: SupervisorSettings {
            max_restarts: 3,
            restart_window: Duration::from_secs(60),
            restart_pause: Duration::from_millis(20),
        },
        limits: Limits::default(),
    }
}

static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn mail() -> Mail {
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = format!("s{n}.{}@test.mailmux", std::process::id());
    let bytes = format!(
        "From: a@test.example\r\nTo: b@test.example\r\nSubject: {n}\r\nMessage-ID: <{id}>\r\n\r\nbody {n}\r\n"
    );
    Mail {
        message_id: id,
        from: Some("a@test.example".parse().unwrap()),
        to: vec!["b@test.example".parse().unwrap()],
        bytes: Arc::from(bytes.into_bytes()),
        deadline: Instant::now() + Duration::from_secs(30),
        prefer: None,
        only: None,
        priority: Default::default(),
    }
}

/// Starts `n` concurrent sends in the background.
fn burst(d: &Dispatcher, n: usize) -> JoinSet<Report> {
    let mut set = JoinSet::new();
    more(&mut set, d, n);
    set
}

/// Adds `n` concurrent sends to a burst.
fn more(set: &mut JoinSet<Report>, d: &Dispatcher, n: usize) {
    for _ in 0..n {
        let d = d.clone();
        set.spawn(async move { d.send(mail()).await });
    }
}

/// Waits for every call (each must answer within its deadline) and checks
/// the reports against what the servers received: every `sent` message has
/// exactly one copy, every `failed` one none.
async fn reconcile(mut calls: JoinSet<Report>, servers: &[&FaultSmtp]) -> Vec<Report> {
    let mut reports = Vec::new();
    let all = tokio::time::timeout(Duration::from_secs(40), async {
        while let Some(r) = calls.join_next().await {
            reports.push(r.expect("a send task panicked"));
        }
    })
    .await;
    assert!(all.is_ok(), "a call hung past its deadline");
    let mut copies: HashMap<String, usize> = HashMap::new();
    for s in servers {
        for r in s.delivered() {
            *copies.entry(r.message_id.unwrap_or_default()).or_default() += 1;
        }
    }
    for r in &reports {
        let n = copies
            .get(&format!("<{}>", r.message_id))
            .copied()
            .unwrap_or(0);
        match r.status {
            Status::Sent => assert_eq!(n, 1, "sent but {n} copies: {r:?}"),
            Status::Failed => assert_eq!(n, 0, "failed but delivered: {r:?}"),
            Status::Unknown => assert!(n <= 1, "{r:?}"),
            Status::Partial => unreachable!("no recipient is refused here"),
        }
    }
    let asked: usize = reports.len();
    let delivered: usize = copies.values().sum();
    assert!(delivered <= asked, "servers got mail nobody asked for");
    reports
}

async fn wait_delivered(servers: &[&FaultSmtp], at_least: usize) {
    let ok = support::wait_until(
        || servers.iter().map(|s| s.delivered().len()).sum::<usize>() >= at_least,
        Duration::from_secs(10),
    )
    .await;
    assert!(ok, "the burst did not start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_relay_is_restarted_and_no_call_hangs_or_is_lost() {
    let a = FaultSmtp::start(Script::ok()).await;
    let b = FaultSmtp::start(Script::ok()).await;
    let d = Dispatcher::start(settings(vec![
        relay("primary", a.port(), 10),
        relay("backup", b.port(), 1),
    ]))
    .await
    .unwrap();
    let calls = burst(&d, 400);
    wait_delivered(&[&a, &b], 20).await;
    d.inject_panic(PanicTarget::Relay("primary".into()))
        .await
        .unwrap();
    let reports = reconcile(calls, &[&a, &b]).await;
    let sent = reports.iter().filter(|r| r.status == Status::Sent).count();
    assert_eq!(sent, 400, "every message in the burst is delivered");

    // The restart shows in the status, and the relay serves again.
    let ok = support::wait_until_async(
        || async { d.status().await.unwrap().relays[0].restarts == 1 },
        Duration::from_secs(3),
    )
    .await;
    assert!(ok, "{:?}", d.status().await.unwrap().relays[0]);
    let ok = support::wait_until_async(
        || async { d.send(mail()).await.relay.as_deref() == Some("primary") },
        Duration::from_secs(3),
    )
    .await;
    assert!(ok, "the restarted primary never took mail again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_router_is_restarted_and_every_call_gets_an_answer() {
    let a = FaultSmtp::start(Script::ok()).await;
    let d = Dispatcher::start(settings(vec![relay("only", a.port(), 1)]))
        .await
        .unwrap();
    d.pin(Some("only".into())).await.unwrap();
    let calls = burst(&d, 400);
    wait_delivered(&[&a], 20).await;
    d.inject_panic(PanicTarget::Router).await.unwrap();
    let reports = reconcile(calls, &[&a]).await;
    assert!(
        reports.iter().all(|r| r.status == Status::Sent),
        "{:?}",
        reports.iter().find(|r| r.status != Status::Sent)
    );
    let ok = support::wait_until_async(
        || async { d.status().await.unwrap().router_restarts == 1 },
        Duration::from_secs(3),
    )
    .await;
    assert!(ok);
    let st = d.status().await.unwrap();
    assert_eq!(
        st.pinned.as_deref(),
        Some("only"),
        "the pin survives the restart"
    );
    assert_eq!(d.send(mail()).await.status, Status::Sent);
}

#[tokio::test]
async fn the_restart_limit_stops_a_crash_loop() {
    let a = FaultSmtp::start(Script::ok()).await;
    let b = FaultSmtp::start(Script::ok()).await;
    let d = Dispatcher::start(settings(vec![
        relay("primary", a.port(), 10),
        relay("backup", b.port(), 1),
    ]))
    .await
    .unwrap();
    for round in 1..=3 {
        // Crash the relay's actor as soon as it runs.
        let ok = support::wait_until_async(
            || async {
                d.inject_panic(PanicTarget::Relay("primary".into()))
                    .await
                    .is_ok()
            },
            Duration::from_secs(3),
        )
        .await;
        assert!(ok, "round {round}: no actor to crash");
        let ok = support::wait_until_async(
            || async { d.status().await.unwrap().relays[0].restarts == round },
            Duration::from_secs(3),
        )
        .await;
        assert!(ok, "restart {round} did not happen");
    }
    // The fourth crash within the window exceeds the budget of three.
    let ok = support::wait_until_async(
        || async {
            d.inject_panic(PanicTarget::Relay("primary".into()))
                .await
                .is_ok()
        },
        Duration::from_secs(3),
    )
    .await;
    assert!(ok);
    let ok = support::wait_until_async(
        || async { d.status().await.unwrap().relays[0].state == RelayState::Disabled },
        Duration::from_secs(3),
    )
    .await;
    assert!(ok, "{:?}", d.status().await.unwrap().relays[0]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        d.status().await.unwrap().relays[0].restarts,
        3,
        "no restart past the limit"
    );
    // Mail still flows through the backup.
    let r = d.send(mail()).await;
    assert_eq!(r.status, Status::Sent);
    assert_eq!(r.relay.as_deref(), Some("backup"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_removes_and_changes_relays_under_load() {
    let a = FaultSmtp::start(Script::ok()).await;
    let b = FaultSmtp::start(Script::ok()).await;
    let c = FaultSmtp::start(Script::ok()).await;
    let d = Dispatcher::start(settings(vec![
        relay("a", a.port(), 10),
        relay("b", b.port(), 5),
    ]))
    .await
    .unwrap();
    let calls = burst(&d, 600);
    wait_delivered(&[&a, &b, &c], 50).await;

    let mut changed_b = relay("b", b.port(), 5);
    changed_b.pool.max_connections = 2;
    let diff = d
        .reload(settings(vec![changed_b, relay("c", c.port(), 20)]))
        .await
        .unwrap();
    assert_eq!(diff.added, vec!["c"]);
    assert_eq!(diff.removed, vec!["a"]);
    assert_eq!(diff.changed, vec!["b"]);

    // Mail routed before the reload drains through the old relays; mail
    // after it goes to the new highest-priority relay.
    let mut calls = calls;
    more(&mut calls, &d, 100);
    let reports = reconcile(calls, &[&a, &b, &c]).await;
    assert_eq!(reports.len(), 700);
    assert!(
        reports.iter().all(|r| r.status == Status::Sent),
        "{:?}",
        reports.iter().find(|r| r.status != Status::Sent)
    );
    assert!(
        c.delivered().len() >= 100,
        "the new relay takes traffic: a {} b {} c {}",
        a.delivered().len(),
        b.delivered().len(),
        c.delivered().len(),
    );

    // The removed relay drained and is gone; new mail goes to the new one.
    let st = d.status().await.unwrap();
    let names: Vec<_> = st.relays.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, vec!["b", "c"]);
    let before = a.delivered().len();
    let r = d.send(mail()).await;
    assert_eq!(r.relay.as_deref(), Some("c"));
    assert_eq!(a.delivered().len(), before);
    assert!(
        support::wait_until(|| a.open_connections() == 0, Duration::from_secs(3)).await,
        "the removed relay's connections are closed"
    );
}

#[tokio::test]
async fn an_invalid_reload_changes_nothing() {
    let a = FaultSmtp::start(Script::ok()).await;
    let d = Dispatcher::start(settings(vec![relay("a", a.port(), 1)]))
        .await
        .unwrap();
    let dup = settings(vec![relay("x", a.port(), 1), relay("x", a.port(), 2)]);
    assert!(d.reload(dup).await.is_err());
    let st = d.status().await.unwrap();
    assert_eq!(st.relays.len(), 1);
    assert_eq!(st.relays[0].name, "a");
    assert_eq!(d.send(mail()).await.status, Status::Sent);
}

#[tokio::test]
async fn shutdown_lets_in_flight_finish_and_refuses_new_mail() {
    use support::fault_smtp::{Action, Phase};
    // Each reply to the final "." comes 50 ms late, so that mail is still
    // in flight when the shutdown begins, however fast the machine.
    let a = FaultSmtp::start(
        Script::ok().on(Phase::AfterDot, Action::Pause(Duration::from_millis(50))),
    )
    .await;
    let d = Dispatcher::start(settings(vec![relay("a", a.port(), 1)]))
        .await
        .unwrap();
    let calls = burst(&d, 100);
    wait_delivered(&[&a], 5).await;
    let report = d.shutdown(Duration::from_secs(10)).await;
    assert!(report.in_flight_at_start > 0);
    assert_eq!(report.abandoned, 0);
    let reports = reconcile(calls, &[&a]).await;
    let sent = reports.iter().filter(|r| r.status == Status::Sent).count();
    assert_eq!(sent, a.delivered().len());
    let late = d.send(mail()).await;
    assert_eq!(late.status, Status::Failed);
    assert_eq!(
        late.failure,
        Some(mailmux_actors::FailureReason::Unavailable)
    );
    assert!(a.verb_count("QUIT") >= 1, "idle connections were QUIT");
    assert!(
        support::wait_until(|| a.open_connections() == 0, Duration::from_secs(3)).await,
        "connections were closed"
    );
}
