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
