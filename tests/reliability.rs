//! The reliability suite: bounded bursts of MCP calls while a fault is
//! injected (a relay killed, a 4xx storm, a blackhole, actor panics, a
//! reload, big messages, bad input, SIGTERM), every call reconciled against
//! what the real SMTP servers received.
//!
//! Needs the test-only `fault-hooks` feature (the README's test command
//! enables it). Run just this suite with
//! `cargo test --all-features --test reliability`.
#![cfg(feature = "fault-hooks")]

mod common;
#[path = "../actors/tests/support/mod.rs"]
mod support;

#[path = "reliability/bad_input.rs"]
mod bad_input;
#[path = "reliability/harness.rs"]
mod harness;
#[path = "reliability/reconcile.rs"]
mod reconcile;

use std::time::Duration;

use common::{config, relay};
use harness::{InProcess, burst, small};
use mailmux::config::Sources;
use reconcile::reconcile;
use support::fault_smtp::{FaultSmtp, Script};

/// The send deadline of the in-process daemons.
const DEADLINE: Duration = Duration::from_secs(10);
/// Each call's limit: the deadline plus a margin for the MCP round trip.
const LIMIT: Duration = Duration::from_secs(13);

/// Scenario 1: the primary dies in the middle of 2,000 concurrent sends.
/// Everything that had not reached its final "." fails over to the backup;
/// only the transactions cut off mid-DATA may be `unknown`, and none is lost
/// or sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_burst_fails_over_and_loses_nothing() {
    const CALLS: usize = 2000;
    const PRIMARY_CONNECTIONS: usize = 8;
    let primary = FaultSmtp::start(Script::ok()).await;
    let backup = FaultSmtp::start(Script::ok()).await;
    let mut p = relay("primary", primary.port(), 10);
    p.pool.max_connections = PRIMARY_CONNECTIONS;
    let mut b = relay("backup", backup.port(), 1);
    b.pool.max_connections = 8;
    let mut cfg = config(vec![p, b]);
    cfg.daemon.send_deadline = DEADLINE;
    let d = InProcess::start(cfg, Sources::default()).await;

    let calls = burst(d.peer(), "kill", CALLS, 256, LIMIT, |i| small("kill", i));
    let started = support::wait_until(|| primary.delivered().len() >= 300, LIMIT).await;
    assert!(started, "the primary never took 300 messages");
    let answered_before_kill = calls.done.load(std::sync::atomic::Ordering::SeqCst);
    primary.kill().await;
    let calls = calls.join().await;
    eprintln!("{answered_before_kill} calls had been answered when the primary was killed");
    assert!(
        answered_before_kill < CALLS / 2,
        "the kill did not overlap the burst ({answered_before_kill} of {CALLS} answered before)"
    );

    let tally = reconcile(&calls, &[&primary, &backup]).await;
    assert_eq!(tally.failed, 0, "lost: {:?}", tally.codes);
    assert_eq!(tally.sent + tally.unknown, CALLS);
    // Only a transaction past its final "." can be unknown: at most one per
    // connection the primary had open.
    assert!(
        tally.unknown <= PRIMARY_CONNECTIONS,
        "{} unknown, more than the primary's {PRIMARY_CONNECTIONS} connections",
        tally.unknown
    );
    let to_backup = calls.iter().filter(|c| c.relay() == Some("backup")).count();
    assert!(
        to_backup >= CALLS / 2 - PRIMARY_CONNECTIONS,
        "only {to_backup} went to the backup"
    );
}

/// Short backoff, so that a storm and the recovery both fit in seconds.
fn quick_health(r: &mut mailmux_actors::RelaySettings) {
    r.health.backoff_base = Duration::from_millis(100);
    r.health.backoff_max = Duration::from_millis(500);
    r.health.probe_interval = Duration::from_millis(200);
}

/// Polls `get_smtp_status` every 20 ms until `stop` is set; returns each
/// answer with how long it took.
fn poll_status(
    peer: &rmcp::service::Peer<rmcp::RoleClient>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(Duration, serde_json::Value)>> {
    let peer = peer.clone();
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let c = harness::call(
                &peer,
                "status",
                "get_smtp_status",
                serde_json::json!({}),
                Duration::from_secs(5),
            )
            .await;
            let value = c
                .value()
                .cloned()
                .unwrap_or_else(|| panic!("get_smtp_status did not answer: {:?}", c.answer));
            assert!(!c.is_error(), "get_smtp_status failed: {value}");
            seen.push((c.elapsed, value));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seen
    })
}

/// Scenario 2: the primary answers 4xx to a share of transactions (421 to
/// MAIL, 451 after the final "."), then recovers. Every message is
/// delivered exactly once, the backoff shows in the status during the
/// storm, and the primary takes traffic again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_storm_backs_off_delivers_everything_and_recovers() {
    use support::fault_smtp::{Action, Phase, Share};
    const CALLS: usize = 800;
    let storm = Script::ok()
        .on_share(
            Phase::Mail,
            Action::reply(421, "4.3.2 too busy, closing"),
            Share::EveryNth(3),
        )
        .on_share(
            Phase::AfterDot,
            Action::reply(451, "4.3.0 try again later"),
            Share::EveryNth(4),
        );
    let primary = FaultSmtp::start(storm).await;
    let backup = FaultSmtp::start(Script::ok()).await;
    let mut p = relay("primary", primary.port(), 10);
    quick_health(&mut p);
    let b = relay("backup", backup.port(), 1);
    let mut cfg = config(vec![p, b]);
    cfg.daemon.send_deadline = DEADLINE;
    let d = InProcess::start(cfg, Sources::default()).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let polls = poll_status(d.peer(), stop.clone());
    let calls = burst(d.peer(), "storm", CALLS, 32, LIMIT, |i| small("storm", i));
    let half = support::wait_until(
        || calls.done.load(std::sync::atomic::Ordering::SeqCst) >= CALLS / 2,
        LIMIT,
    )
    .await;
    assert!(half, "half the burst did not finish in time");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let during = polls.await.unwrap();
    primary.set_script(Script::ok());
    let refused_in_storm = primary
        .received()
        .iter()
        .filter(|r| !r.is_delivered())
        .count();
    let delivered_in_storm = primary.delivered().len();

    let mut calls = calls.join().await;
    let sent_in_burst = calls.iter().filter(|c| c.status() == Some("sent")).count();
    assert_eq!(sent_in_burst, CALLS, "everything is delivered");
    assert!(
        primary.commands(Phase::Mail) > 0 && refused_in_storm > 0,
        "the storm never hit a transaction"
    );
    let backed_off = during.iter().any(|(_, s)| {
        let p = harness::relay_status(s, "primary");
        matches!(p["state"].as_str(), Some("backing_off" | "circuit_open"))
            && p["consecutive_failures"].as_u64() > Some(0)
    });
    assert!(
        backed_off,
        "no status during the storm showed the primary backing off ({} polls)",
        during.len()
    );

    // After recovery the primary is healthy and takes traffic again.
    let healthy = support::wait_until_async(
        || async { harness::relay_status(&d.status().await, "primary")["state"] == "healthy" },
        Duration::from_secs(5),
    )
    .await;
    assert!(healthy, "the primary did not recover: {}", d.status().await);
    let after = burst(d.peer(), "after", 100, 16, LIMIT, |i| small("after", i))
        .join()
        .await;
    let to_primary = after
        .iter()
        .filter(|c| c.relay() == Some("primary"))
        .count();
    assert!(
        to_primary >= 90,
        "only {to_primary} of 100 went to the recovered primary"
    );
    calls.extend(after);
    let tally = reconcile(&calls, &[&primary, &backup]).await;
    assert_eq!(tally.sent, CALLS + 100, "{tally:?}");
    eprintln!(
        "storm: primary delivered {delivered_in_storm} and refused {refused_in_storm} after the dot; {} status polls",
        during.len()
    );
}

/// Scenario 3: the primary accepts TCP connections and never says a word.
/// Short timeouts bound each attempt, every message fails over, and
/// `get_smtp_status` stays fast while the burst runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackhole_relay_times_out_fails_over_and_status_stays_fast() {
    use support::fault_smtp::{Action, Phase};
    const CALLS: usize = 400;
    let primary = FaultSmtp::start(Script::ok().on(Phase::Greeting, Action::Hang)).await;
    let backup = FaultSmtp::start(Script::ok()).await;
    let mut p = relay("primary", primary.port(), 10);
    p.pool.max_connections = 4;
    p.timeouts = mailmux_actors::Timeouts {
        connect: Duration::from_secs(1),
        greeting: Duration::from_millis(500),
        command: Duration::from_secs(1),
        data: Duration::from_secs(2),
    };
    quick_health(&mut p);
    let b = relay("backup", backup.port(), 1);
    let mut cfg = config(vec![p, b]);
    cfg.daemon.send_deadline = DEADLINE;
    let d = InProcess::start(cfg, Sources::default()).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let polls = poll_status(d.peer(), stop.clone());
    let calls = burst(d.peer(), "blackhole", CALLS, 64, LIMIT, |i| {
        small("blackhole", i)
    });
    let calls_done = calls.done.clone();
    let calls = calls.join().await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let during = polls.await.unwrap();
    assert_eq!(calls_done.load(std::sync::atomic::Ordering::SeqCst), CALLS);

    let tally = reconcile(&calls, &[&primary, &backup]).await;
    assert_eq!(tally.sent, CALLS, "{tally:?}");
    assert!(primary.connections() > 0, "the primary was never tried");
    assert!(primary.received().is_empty());
    // Each message waits at most one greeting timeout at the primary, then
    // goes to the backup: far from the deadline.
    let slowest = calls.iter().map(|c| c.elapsed).max().unwrap();
    assert!(slowest < Duration::from_secs(5), "slowest call {slowest:?}");

    let mut times: Vec<Duration> = during.iter().map(|(t, _)| *t).collect();
    times.sort();
    assert!(times.len() >= 5, "only {} status polls", times.len());
    let median = times[times.len() / 2];
    let max = *times.last().unwrap();
    eprintln!(
        "blackhole: {} status calls during the burst, median {median:?}, max {max:?}; slowest send {slowest:?}",
        times.len()
    );
    // A debug build on a shared 2-core machine: the median carries the
    // 100 ms bound. While all 64 call slots (`max_concurrent_calls`) hold
    // sends that wait out the primary's 500 ms greeting timeout, the daemon
    // reads no further request, so a status call can wait for the first slot
    // to come free: the max gets that timeout plus 500 ms for scheduling.
    assert!(median < Duration::from_millis(100), "median {median:?}");
    assert!(max < Duration::from_millis(1000), "max {max:?}");
    let down = during
        .iter()
        .any(|(_, s)| harness::relay_status(s, "primary")["state"] != "healthy");
    assert!(down, "the status never showed the primary down");
}

/// Scenario 4: the test-only hook panics the primary's actor, then the
/// router, while a burst runs. The daemon keeps serving, every call gets
/// its answer, nothing is lost or doubled, and both restarts show in the
/// status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actor_panics_under_load_are_restarted_and_every_call_answers() {
    use mailmux_actors::PanicTarget;
    use std::sync::atomic::Ordering;
    const CALLS: usize = 1000;
    let primary = FaultSmtp::start(Script::ok()).await;
    let backup = FaultSmtp::start(Script::ok()).await;
    let mut cfg = config(vec![
        relay("primary", primary.port(), 10),
        relay("backup", backup.port(), 1),
    ]);
    cfg.daemon.send_deadline = DEADLINE;
    cfg.dispatch.supervisor.restart_pause = Duration::from_millis(50);
    let d = InProcess::start(cfg, Sources::default()).await;

    let calls = burst(d.peer(), "panic", CALLS, 128, LIMIT, |i| small("panic", i));
    assert!(support::wait_until(|| primary.delivered().len() >= 150, LIMIT).await);
    d.dispatcher
        .inject_panic(PanicTarget::Relay("primary".into()))
        .await
        .expect("the primary's actor is there to panic");
    let at_relay_panic = calls.done.load(Ordering::SeqCst);
    assert!(
        support::wait_until(
            || calls.done.load(Ordering::SeqCst) >= at_relay_panic + 200,
            LIMIT
        )
        .await
    );
    d.dispatcher
        .inject_panic(PanicTarget::Router)
        .await
        .expect("the router is there to panic");
    let at_router_panic = calls.done.load(Ordering::SeqCst);
    let calls = calls.join().await;
    eprintln!(
        "panics: relay after {at_relay_panic} answers, router after {at_router_panic}, of {CALLS}"
    );
    assert!(
        at_router_panic < CALLS - 128,
        "the router panic came after the burst"
    );

    let tally = reconcile(&calls, &[&primary, &backup]).await;
    assert_eq!(tally.sent, CALLS, "{tally:?}");

    let restarted = support::wait_until_async(
        || async {
            let s = d.status().await;
            harness::relay_status(&s, "primary")["restarts"] == 1 && s["router_restarts"] == 1
        },
        Duration::from_secs(5),
    )
    .await;
    assert!(
        restarted,
        "restarts not in the status: {}",
        d.status().await
    );
    // Still serving, through the restarted actors.
    let more = burst(d.peer(), "after", 20, 20, LIMIT, |i| small("after", i))
        .join()
        .await;
    assert!(more.iter().all(|c| c.status() == Some("sent")), "{more:?}");
}

/// A configuration file for [`a_reload_under_load_replaces_relays_and_loses_nothing`].
fn relays_toml(relays: &[(&str, u16, i32)], timeout: &str) -> String {
    let mut out = format!(
        "from_email = \"sender@example.org\"\nsend_deadline = \"{}s\"\n\n[relay_defaults]\ntimeout = \"{timeout}\"\nmax_connections = 8\n",
        DEADLINE.as_secs()
    );
    for (name, port, priority) in relays {
        out.push_str(&format!(
            "\n[[relays]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\npriority = {priority}\n"
        ));
    }
    out
}

/// Scenario 5: `reload_smtp_configuration` replaces the relays twice while a
/// burst runs (one removed, one changed, one added; then back). Nothing is
/// lost or sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_replaces_relays_and_loses_nothing() {
    use serde_json::json;
    use std::sync::atomic::Ordering;
    const CALLS: usize = 1200;
    let a = FaultSmtp::start(Script::ok()).await;
    let b = FaultSmtp::start(Script::ok()).await;
    let c = FaultSmtp::start(Script::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mailmux.toml");
    std::fs::write(
        &file,
        relays_toml(&[("a", a.port(), 10), ("b", b.port(), 1)], "3s"),
    )
    .unwrap();
    let sources = Sources {
        file: Some(file.clone()),
    };
    let cfg = mailmux::config::load_from(&sources, Vec::new()).expect("the file is valid");
    let d = InProcess::start(cfg, sources).await;

    let calls = burst(d.peer(), "reload", CALLS, 128, LIMIT, |i| {
        small("reload", i)
    });
    assert!(support::wait_until(|| a.delivered().len() >= 150, LIMIT).await);
    // "a" goes, "b" changes (a new timeout: a new actor), "c" comes.
    std::fs::write(
        &file,
        relays_toml(&[("b", b.port(), 1), ("c", c.port(), 10)], "4s"),
    )
    .unwrap();
    let first = harness::call(
        d.peer(),
        "reload 1",
        "reload_smtp_configuration",
        json!({}),
        LIMIT,
    )
    .await;
    let out = first.value().cloned().unwrap_or_default();
    assert!(!first.is_error(), "{out}");
    assert_eq!(out["removed"], json!(["a"]), "{out}");
    assert_eq!(out["added"], json!(["c"]), "{out}");
    assert_eq!(out["changed"], json!(["b"]), "{out}");
    let at_first = calls.done.load(Ordering::SeqCst);

    assert!(support::wait_until(|| c.delivered().len() >= 150, LIMIT).await);
    // And back: "a" returns at the top, "c" goes.
    std::fs::write(
        &file,
        relays_toml(&[("a", a.port(), 10), ("b", b.port(), 1)], "4s"),
    )
    .unwrap();
    let second = harness::call(
        d.peer(),
        "reload 2",
        "reload_smtp_configuration",
        json!({}),
        LIMIT,
    )
    .await;
    let out = second.value().cloned().unwrap_or_default();
    assert!(!second.is_error(), "{out}");
    assert_eq!(out["removed"], json!(["c"]), "{out}");
    assert_eq!(out["added"], json!(["a"]), "{out}");
    let at_second = calls.done.load(Ordering::SeqCst);
    let calls = calls.join().await;
    eprintln!("reloads after {at_first} and {at_second} of {CALLS} answers");
    assert!(
        at_second < CALLS - 128,
        "the second reload came after the burst"
    );

    let tally = reconcile(&calls, &[&a, &b, &c]).await;
    assert_eq!(tally.sent, CALLS, "{tally:?}");
    let via = |name: &str| calls.iter().filter(|x| x.relay() == Some(name)).count();
    assert!(
        via("c") > 0 && via("a") > 0,
        "a: {}, c: {}",
        via("a"),
        via("c")
    );
    let status = d.status().await;
    let names: Vec<_> = status["relays"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["a", "b"], "{status}");
}

/// Scenario 7: the bad-input table runs while a burst is in flight. Every
/// bad input gets its `invalid_input` error, the burst is all sent, and no
/// server receives a bad message (the reconciliation finds no copy that
/// does not belong to a sent call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_during_a_burst_does_no_collateral_damage() {
    const CALLS: usize = 600;
    let attachments = bad_input::AttachmentsDir::create();
    let primary = FaultSmtp::start(Script::ok()).await;
    let backup = FaultSmtp::start(Script::ok()).await;
    let mut cfg = config(vec![
        relay("primary", primary.port(), 10),
        relay("backup", backup.port(), 1),
    ]);
    cfg.daemon.send_deadline = DEADLINE;
    cfg.daemon.compose = attachments.policy();
    let d = InProcess::start(cfg, Sources::default()).await;

    let calls = burst(d.peer(), "good", CALLS, 64, LIMIT, |i| small("good", i));
    assert!(support::wait_until(|| primary.delivered().len() >= 100, LIMIT).await);
    let cases = bad_input::cases(&attachments.path());
    let mut set = tokio::task::JoinSet::new();
    for (i, case) in cases.iter().cloned().enumerate() {
        let peer = d.peer().clone();
        set.spawn(async move {
            let c = harness::call(
                &peer,
                format!("bad {}", case.name),
                "send_email",
                case.args,
                LIMIT,
            )
            .await;
            (i, c)
        });
    }
    let mut bad = Vec::new();
    while let Some(r) = set.join_next().await {
        bad.push(r.unwrap());
    }
    bad.sort_by_key(|(i, _)| *i);
    let done_after_bad = calls.done.load(std::sync::atomic::Ordering::SeqCst);
    let problems: Vec<String> = bad
        .iter()
        .filter_map(|(i, c)| bad_input::check(&cases[*i], c).err())
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    let mut all = calls.join().await;
    assert!(
        done_after_bad < CALLS,
        "the bad input did not overlap the burst"
    );
    let good_sent = all.iter().filter(|c| c.status() == Some("sent")).count();
    assert_eq!(good_sent, CALLS);
    all.extend(bad.into_iter().map(|(_, c)| c));
    let tally = reconcile(&all, &[&primary, &backup]).await;
    assert_eq!(tally.codes.get("invalid_input"), Some(&cases.len()));
}

/// A configuration file for the binary: one relay per `(name, port,
/// priority)`, plain text on loopback, and `extra` top-level keys.
fn daemon_toml(relays: &[(&str, u16, i32)], extra: &str) -> String {
    let mut out = format!(
        "from_email = \"sender@example.org\"\n{extra}\n[relay_defaults]\ntimeout = \"5s\"\nmax_connections = 16\n"
    );
    for (name, port, priority) in relays {
        out.push_str(&format!(
            "\n[[relays]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\npriority = {priority}\n"
        ));
    }
    out
}

/// Scenario 6: eight concurrent sends of about 10 MB each (a 7 MB
/// attachment, 9.6 MB encoded, under the 10 MiB `max_message_bytes`) and a
/// stream of small sends, through the binary over stdio. The daemon's
/// memory stays bounded and the small sends are not starved.
///
/// The bound: each big send holds its JSON argument (9.3 MB), the decoded
/// attachment (7 MB) and the encoded message (9.6 MB) at most, about 26 MB,
/// so eight at once need about 210 MB; with allocator slack and the runtime,
/// peak RSS must stay under 400 MB. A copy per connection or per attempt
/// more would break it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_messages_keep_memory_bounded_and_small_ones_flowing() {
    use base64::Engine;
    use support::smtp_sink::SmtpSink;
    const BIG: usize = 8;
    const RSS_BOUND_KB: u64 = 400 * 1024;
    let sink = SmtpSink::start().await;
    let d = harness::ChildDaemon::start(&daemon_toml(
        &[("sink", sink.port(), 1)],
        "send_deadline = \"30s\"",
    ))
    .await;
    let limit = Duration::from_secs(33);
    let idle_kb = d.proc_kb("VmRSS").unwrap_or(0);

    let payload: Vec<u8> = (0..7_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let encoded = base64::engine::general_purpose::STANDARD.encode(&payload);
    drop(payload);
    let big_args = move |i: usize| {
        serde_json::json!({
            "to": "rcpt@example.org",
            "subject": format!("big {i}"),
            "body": "the attachment is about 7 MB",
            "attachments": [{"filename": format!("big{i}.bin"), "content_base64": encoded}],
        })
    };

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let pid = d.pid;
        tokio::spawn(async move {
            let mut peak = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let rss = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                    .unwrap_or(0);
                peak = peak.max(rss);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peak
        })
    };
    let big = burst(d.peer(), "big", BIG, BIG, limit, big_args);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // One stdio stream carries every call, and the daemon reads requests in
    // order: this call waits until all the big requests ahead of it were
    // read and parsed. Its latency is reported, not bounded.
    let behind = harness::call(
        d.peer(),
        "small behind the big ones",
        "send_email",
        small("behind", 0),
        limit,
    )
    .await;
    let big_left = BIG - big.done.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        big_left > 0,
        "the big sends were over before the small ones started"
    );
    // Small sends in batches of 8 for as long as big ones are composed and
    // delivered.
    let mut small_calls = Vec::new();
    let mut batch = 0;
    while big.done.load(std::sync::atomic::Ordering::SeqCst) < BIG && batch < 50 {
        let name = format!("small {batch}");
        let tag = name.clone();
        small_calls.extend(
            burst(d.peer(), &name, 8, 8, limit, move |i| small(&tag, i))
                .join()
                .await,
        );
        batch += 1;
    }
    let big_calls = big.join().await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let sampled_peak = sampler.await.unwrap();
    let hwm = d.proc_kb("VmHWM").unwrap_or(0);

    let slowest_small = small_calls.iter().map(|c| c.elapsed).max().unwrap();
    let slowest_big = big_calls.iter().map(|c| c.elapsed).max().unwrap();
    eprintln!(
        "big messages: RSS idle {idle_kb} kB, sampled peak {sampled_peak} kB, high-water mark {hwm} kB; \
         the small send behind the big requests took {:?}; then {} small sends while {big_left} big ones were in flight, slowest {slowest_small:?}; slowest big {slowest_big:?}",
        behind.elapsed,
        small_calls.len()
    );
    let small_sent = small_calls.len() + 1;
    let mut all = big_calls;
    all.extend(small_calls.iter().cloned());
    all.push(behind);
    let tally = reconcile(&all, &[&sink]).await;
    assert_eq!(tally.sent, BIG + small_sent, "{tally:?}");
    assert!(
        hwm.max(sampled_peak) < RSS_BOUND_KB,
        "peak RSS {} kB over the {RSS_BOUND_KB} kB bound",
        hwm.max(sampled_peak)
    );
    assert!(
        slowest_small < Duration::from_secs(5),
        "a small send took {slowest_small:?} while big ones flowed"
    );
    let big_ids: Vec<String> = all
        .iter()
        .filter(|c| c.label.starts_with("big"))
        .filter_map(|c| c.message_id().map(|id| format!("<{id}>")))
        .collect();
    let received = sink.received();
    for id in &big_ids {
        let m = received
            .iter()
            .find(|m| m.message_id.as_deref() == Some(id.as_str()))
            .expect("big message received");
        assert!(
            m.data.len() > 9_333_336,
            "{id}: only {} bytes",
            m.data.len()
        );
    }
}

/// A template that multiplies a variable: 600 KB of `{x}` and a 10 KB value
/// would render 2 GB. Rendering stops once the output passes
/// `max_message_bytes` (1 MiB here): the call and the batch's message are
/// refused `too_large` on the field, nothing is sent, and the daemon's
/// memory grows by tens of megabytes at most (by 5 GB before rendering was
/// bounded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_that_multiplies_its_variables_is_refused_before_it_grows() {
    use support::smtp_sink::SmtpSink;
    const GROWTH_BOUND_KB: u64 = 64 * 1024;
    let sink = SmtpSink::start().await;
    let d = harness::ChildDaemon::start(&daemon_toml(
        &[("sink", sink.port(), 1)],
        "max_message_bytes = 1048576\nmax_attachment_bytes = 524288",
    ))
    .await;
    let limit = Duration::from_secs(30);
    let idle_kb = d.proc_kb("VmHWM").unwrap_or(0);
    let body = "{x}".repeat(200_000);
    let vars = serde_json::json!({ "x": "x".repeat(10_000) });

    let one = harness::call(
        d.peer(),
        "send_email",
        "send_email",
        serde_json::json!({
            "to": "rcpt@example.org",
            "subject": "multiplied",
            "body": body,
            "template_vars": vars,
        }),
        limit,
    )
    .await;
    assert!(one.is_error(), "{:?}", one.answer);
    let e = &one.value().expect("an answer")["error"];
    assert_eq!(e["code"], "invalid_input", "{e}");
    assert_eq!(e["rule"], "too_large", "{e}");
    assert_eq!(e["field"], "body", "{e}");

    let batch = harness::call(
        d.peer(),
        "send_batch",
        "send_batch",
        serde_json::json!({
            "defaults": { "subject": "multiplied", "body": body },
            "messages": [
                { "to": "a@example.org", "template_vars": vars },
                { "to": "b@example.org", "template_vars": { "x": "small" },
                  "body": "fits: {x}" },
            ],
        }),
        limit,
    )
    .await;
    let out = batch.value().expect("an answer");
    let results = out["results"].as_array().expect("results");
    assert_eq!(results[0]["error"]["rule"], "too_large", "{out}");
    assert_eq!(results[0]["error"]["field"], "messages[0].body", "{out}");
    assert_eq!(results[1]["status"], "sent", "{out}");

    let grown = d
        .proc_kb("VmHWM")
        .unwrap_or(u64::MAX)
        .saturating_sub(idle_kb);
    eprintln!("high-water mark grew by {grown} kB");
    assert!(
        grown < GROWTH_BOUND_KB,
        "the daemon's high-water mark grew by {grown} kB"
    );
    let received = sink.received();
    assert_eq!(received.len(), 1, "only the message that fits is sent");
}

/// Scenario 8: SIGTERM to the binary while a burst is in flight (the relay
/// answers DATA after a second, so deliveries are in progress). Those in
/// flight finish within the grace, new calls are refused as `unavailable`,
/// the exit is clean and the log says how many were in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_burst_drains_refuses_and_exits_cleanly() {
    use support::smtp_sink::{SinkOptions, SmtpSink};
    const CALLS: usize = 64;
    let sink = SmtpSink::start_with(SinkOptions {
        extra_args: vec!["-w".into(), "1".into()],
        ..SinkOptions::default()
    })
    .await;
    let mut d = harness::ChildDaemon::start(&daemon_toml(
        &[("sink", sink.port(), 1)],
        "send_deadline = \"15s\"\nshutdown_grace = \"10s\"",
    ))
    .await;
    let limit = Duration::from_secs(18);

    let calls = burst(d.peer(), "term", CALLS, CALLS, limit, |i| small("term", i));
    assert!(
        sink.wait_for_count(16, Duration::from_secs(10)).await,
        "the burst never reached the relay"
    );
    let answered_at_signal = calls.done.load(std::sync::atomic::Ordering::SeqCst);
    let signalled = std::time::Instant::now();
    d.signal("TERM");
    assert!(
        support::wait_until(
            || d.logs().contains("SIGTERM received"),
            Duration::from_secs(5)
        )
        .await,
        "the daemon did not see the signal:\n{}",
        d.logs()
    );
    // New calls during the grace are refused.
    let mut refused = Vec::new();
    for i in 0..3 {
        refused.push(
            harness::call(
                d.peer(),
                format!("refused {i}"),
                "send_email",
                small("refused", i),
                limit,
            )
            .await,
        );
    }
    let status = harness::call(
        d.peer(),
        "refused status",
        "get_smtp_status",
        serde_json::json!({}),
        limit,
    )
    .await;
    for c in refused.iter().chain([&status]) {
        assert!(c.is_error(), "{}: {:?}", c.label, c.answer);
        assert_eq!(
            c.error_code(),
            Some("unavailable"),
            "{}: {:?}",
            c.label,
            c.answer
        );
    }

    let calls = calls.join().await;
    let exit = tokio::time::timeout(Duration::from_secs(15), d.child.wait())
        .await
        .expect("the daemon exits within the grace")
        .expect("wait");
    let took = signalled.elapsed();
    let logs = d.logs();
    assert!(exit.success(), "exit {exit:?}\n{logs}");
    assert!(
        took < Duration::from_secs(12),
        "exit {took:?} after SIGTERM"
    );
    eprintln!("SIGTERM after {answered_at_signal} of {CALLS} answers; exit after {took:?}");
    assert!(
        answered_at_signal < CALLS,
        "nothing was in flight at SIGTERM"
    );
    let in_flight: usize = logs
        .lines()
        .find(|l| l.contains("all deliveries finished"))
        .and_then(|l| l.split("in_flight=").nth(1))
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or_else(|| panic!("no in-flight count in the log:\n{logs}"));
    assert!(in_flight > 0, "the log reports nothing in flight:\n{logs}");
    assert!(logs.contains("abandoned=0"), "{logs}");

    let mut all = calls;
    all.extend(refused);
    let tally = reconcile(&all, &[&sink]).await;
    assert_eq!(tally.sent, CALLS, "in-flight deliveries finish: {tally:?}");
    assert_eq!(tally.codes.get("unavailable"), Some(&3));
}
