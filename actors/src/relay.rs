//! The relay actor: one per configured relay. It owns that relay's
//! connections (an idle pool behind a `max_connections` semaphore) and its
//! health (state, backoff, circuit, counters, latency).
//!
//! `Deliver` is never awaited inside `handle`: the actor spawns a task that
//! runs the SMTP transaction, answers the caller (or hands the message back
//! to the router for failover), and casts an `Outcome` back so the actor
//! updates health. The pool and the semaphore live in [`RelayShared`], which
//! outlives a crashed actor, so the connection bound holds across restarts.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lettre::Address;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::file;
use crate::health::{Health, State};
use crate::mail::{Attempt, FailureClass, FailureReason, Report, Status};
use crate::meters::RelayMeters;
use crate::router::{Flight, RouterCell};
use crate::settings::{AuthMethod, RelayKind, RelaySettings};
use crate::smtp::{self, Conn, Delivered, Failure};
use crate::status::{ProbeReport, RelayStatus};

/// Messages to a relay actor.
#[derive(Debug)]
pub(crate) enum RelayMsg {
    /// Deliver a message (from the router).
    Deliver(Flight),
    /// A delivery task finished (from the relay's own tasks).
    Outcome(Outcome),
    /// Time to check whether a probe is due.
    Tick,
    /// A probe finished.
    Probed(Result<smtp::Probed, Failure>),
    Status(RpcReplyPort<RelayStatus>),
    /// Probe now and answer with the result.
    Test(RpcReplyPort<ProbeReport>),
    /// Drop every idle connection, reset health, probe, answer.
    Reconnect(RpcReplyPort<ProbeReport>),
    /// Stop taking messages; stop once those in flight are done.
    Drain,
    /// Crash on purpose (fault tests).
    #[cfg(feature = "fault-hooks")]
    Panic,
}

/// What a delivery task reports back for health.
#[derive(Debug)]
pub(crate) struct Outcome {
    failure: Option<(FailureClass, String)>,
    latency: Duration,
    partial: bool,
    failed_over: bool,
}

/// The part of a relay that outlives its actor and that the router reads
/// without a message: the pool, the bounds, the in-flight count and the
/// health state as last published.
#[derive(Debug)]
pub(crate) struct RelayShared {
    pub(crate) settings: RelaySettings,
    /// Connection permits: at most `max_connections` open at once.
    permits: Arc<Semaphore>,
    /// One permit: the normal message that may wait for a connection. The
    /// others wait for it, so that a message of high priority, which waits
    /// for a connection directly, has at most one normal message ahead.
    normal_turn: Semaphore,
    /// Messages waiting for a permit.
    queued: AtomicUsize,
    /// Messages handed to this relay and not yet finished.
    pub(crate) in_flight: AtomicUsize,
    /// Open connections, idle or in use.
    open: AtomicUsize,
    idle: Mutex<Vec<Conn>>,
    /// Health state as the actor last published it.
    state: Mutex<State>,
    /// False once the relay drains (removed or replaced by a reload).
    accepting: AtomicBool,
    /// The relay's `rate`, one limiter per limit, built for the share they
    /// were made for. They outlive the actor (as the permits do), so a
    /// restart does not reset them.
    rate: Mutex<(u32, Vec<governor::DefaultDirectRateLimiter>)>,
    /// How many daemons share the relay's `rate` (several daemons on one
    /// queue): each takes an even share.
    share: RateShare,
    /// Attempts, failovers and latency, as metrics.
    meters: RelayMeters,
}

/// How many daemons share each relay's `rate`: 1 for a daemon alone, the
/// number of live daemons on a shared queue.
pub type RateShare = Arc<std::sync::atomic::AtomicU32>;

/// The relays the router sends to, as the supervisor last installed them:
/// the dispatcher reads their health without a round trip to an actor.
pub(crate) type Fleet = Arc<Mutex<Vec<Arc<RelayShared>>>>;

/// The limiters of a relay's `rate` for one of `share` daemons: a burst of
/// `count / share` (at least one), refilled one message every
/// `period * share / count`, so that the daemons together keep to
/// `count` per `period`. A daemon alone has the whole burst.
fn settings_rate(settings: &RelaySettings, share: u32) -> Vec<governor::DefaultDirectRateLimiter> {
    use std::num::NonZeroU32;
    let share = share.max(1);
    settings
        .rate
        .iter()
        .filter_map(|r| {
            NonZeroU32::new(r.count)?;
            let burst = NonZeroU32::new((r.count / share).max(1))?;
            let each = (r.period * share / r.count).max(std::time::Duration::from_nanos(1));
            let quota = governor::Quota::with_period(each)?.allow_burst(burst);
            Some(governor::RateLimiter::direct(quota))
        })
        .collect()
}

impl RelayShared {
    pub(crate) fn new(settings: RelaySettings, share: RateShare) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(settings.pool.max_connections)),
            normal_turn: Semaphore::new(1),
            queued: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            idle: Mutex::new(Vec::new()),
            state: Mutex::new(State::Healthy),
            accepting: AtomicBool::new(true),
            rate: Mutex::new((1, settings_rate(&settings, 1))),
            share,
            meters: RelayMeters::new(&settings.name),
            settings,
        })
    }

    /// Takes one message from every limit of the relay's `rate`, or says how
    /// long until the first refusing limit has room. Limits checked before
    /// the refusing one keep the message they took (governor has no refund).
    pub(crate) fn take_rate(&self) -> Result<(), std::time::Duration> {
        use governor::clock::Clock;
        let mut rate = self.rate.lock().unwrap_or_else(|e| e.into_inner());
        let share = self.share.load(Ordering::Acquire).max(1);
        if rate.0 != share && !rate.1.is_empty() {
            // The number of daemons changed: limiters for the new share,
            // starting empty (they refill evenly), so that the change
            // itself sends nothing early.
            let fresh = settings_rate(&self.settings, share);
            for limiter in &fresh {
                while limiter.check().is_ok() {}
            }
            *rate = (share, fresh);
        }
        for limiter in &rate.1 {
            if let Err(not_until) = limiter.check() {
                return Err(not_until.wait_time_from(limiter.clock().now()));
            }
        }
        Ok(())
    }

    pub(crate) fn name(&self) -> &str {
        &self.settings.name
    }

    pub(crate) fn state(&self) -> State {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_state(&self, state: State) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }

    /// Whether the router may send a message here now.
    pub(crate) fn available(&self, now: Instant) -> bool {
        self.accepting.load(Ordering::Acquire) && self.state().available(now)
    }

    /// An idle connection young enough to reuse. Older ones are closed here,
    /// by a caller that holds a connection permit, so that a replacement is
    /// never dialled while the old connection is still open.
    async fn checkout(&self) -> Option<Conn> {
        let max_age = self.settings.pool.idle_timeout;
        loop {
            let conn = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
            if conn.last_used.elapsed() < max_age {
                return Some(conn);
            }
            // Boxed: QUIT is the cold path, and inline its future would
            // make every delivery task kilobytes larger (see `deliver_smtp`).
            Box::pin(self.retire(conn)).await;
        }
    }

    /// Returns a connection after use: back to the pool, or dropped when it
    /// is broken. One that has carried its share of messages, or as many
    /// transactions as its server announced (LIMITS MAILMAX), is handed back
    /// to the caller to retire.
    fn checkin(&self, conn: Conn) -> Option<Conn> {
        let limit = self.settings.pool.messages_per_connection;
        if conn.broken {
            self.open.fetch_sub(1, Ordering::AcqRel);
            None
        } else if (limit > 0 && conn.sent >= limit) || conn.spent() {
            Some(conn)
        } else {
            self.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(conn);
            None
        }
    }

    /// Closes a healthy connection with QUIT.
    async fn retire(&self, conn: Conn) {
        conn.quit(self.settings.timeouts.command).await;
        self.open.fetch_sub(1, Ordering::AcqRel);
    }

    /// Closes idle connections older than the idle timeout, in the background.
    pub(crate) fn sweep_idle(self: &Arc<Self>) {
        let max_age = self.settings.pool.idle_timeout;
        let expired: Vec<Conn> = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let (old, young) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|c| c.last_used.elapsed() >= max_age);
            *idle = young;
            old
        };
        for conn in expired {
            let me = self.clone();
            tokio::spawn(async move { me.retire(conn).await });
        }
    }

    /// Closes every idle connection with QUIT and waits for it (shutdown).
    pub(crate) async fn quit_idle(&self) {
        let conns: Vec<Conn> =
            std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        let mut quits = tokio::task::JoinSet::new();
        for conn in conns {
            let limit = self.settings.timeouts.command;
            quits.spawn(conn.quit(limit));
        }
        while quits.join_next().await.is_some() {
            self.open.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Closes every idle connection, in the background.
    pub(crate) fn close_idle(self: &Arc<Self>) {
        let conns: Vec<Conn> =
            std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        for conn in conns {
            let me = self.clone();
            tokio::spawn(async move { me.retire(conn).await });
        }
    }

    pub(crate) fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::Release);
    }
}

/// Startup arguments: the shared part, the router to hand failovers to, and
/// how often this relay's actor was restarted before.
#[derive(Debug)]
pub(crate) struct RelayArgs {
    pub shared: Arc<RelayShared>,
    pub router: RouterCell,
    pub restarts: u32,
}

#[derive(Debug)]
pub(crate) struct RelayActor;

#[derive(Debug)]
pub(crate) struct RelayState {
    shared: Arc<RelayShared>,
    router: RouterCell,
    health: Health,
    rng: StdRng,
    probing: bool,
    draining: bool,
    restarts: u32,
}

impl Actor for RelayActor {
    type Msg = RelayMsg;
    type State = RelayState;
    type Arguments = RelayArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RelayMsg>,
        args: RelayArgs,
    ) -> Result<RelayState, ActorProcessingErr> {
        let health = Health::new(args.shared.settings.health.clone());
        args.shared.set_state(health.state);
        myself.send_interval(args.shared.settings.health.probe_interval, || {
            RelayMsg::Tick
        });
        Ok(RelayState {
            shared: args.shared,
            router: args.router,
            health,
            rng: StdRng::from_os_rng(),
            probing: false,
            draining: false,
            restarts: args.restarts,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<RelayMsg>,
        state: &mut RelayState,
    ) -> Result<(), ActorProcessingErr> {
        state.shared.close_idle();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<RelayMsg>,
        msg: RelayMsg,
        state: &mut RelayState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RelayMsg::Deliver(flight) => {
                state.shared.in_flight.fetch_add(1, Ordering::AcqRel);
                tokio::spawn(deliver(
                    state.shared.clone(),
                    myself.clone(),
                    state.router.clone(),
                    flight,
                ));
            }
            RelayMsg::Outcome(outcome) => {
                state.on_outcome(outcome, &myself);
                if state.draining && state.shared.in_flight.load(Ordering::Acquire) == 0 {
                    myself.stop(Some("drained".into()));
                }
            }
            RelayMsg::Tick => {
                state.shared.sweep_idle();
                let now = Instant::now();
                let due = match state.health.state {
                    State::BackingOff { until } | State::CircuitOpen { until } => now >= until,
                    State::Healthy | State::Disabled => false,
                };
                if due && !state.probing {
                    state.probing = true;
                    spawn_probe(state.shared.clone(), myself.clone(), None);
                }
                if state.draining && state.shared.in_flight.load(Ordering::Acquire) == 0 {
                    myself.stop(Some("drained".into()));
                }
            }
            RelayMsg::Probed(result) => {
                state.probing = false;
                match result {
                    Ok(_) => state.health.recover(),
                    // No permit was free: the relay is busy, which says
                    // nothing about its health.
                    Err(f) if f.class == FailureClass::Busy => {}
                    Err(f) => {
                        let now = Instant::now();
                        state
                            .health
                            .on_probe_failure(now, &f.detail, &mut state.rng);
                        state.schedule_tick(&myself);
                    }
                }
                state.shared.set_state(state.health.state);
            }
            RelayMsg::Status(reply) => {
                let _ = reply.send(state.status());
            }
            RelayMsg::Test(reply) => {
                spawn_probe(state.shared.clone(), myself.clone(), Some(reply));
            }
            RelayMsg::Reconnect(reply) => {
                state.shared.close_idle();
                state.health.reset();
                state.shared.set_state(state.health.state);
                spawn_probe(state.shared.clone(), myself.clone(), Some(reply));
            }
            RelayMsg::Drain => {
                state.draining = true;
                state.shared.stop_accepting();
                state.shared.close_idle();
                if state.shared.in_flight.load(Ordering::Acquire) == 0 {
                    myself.stop(Some("drained".into()));
                }
            }
            #[cfg(feature = "fault-hooks")]
            RelayMsg::Panic => panic!("fault hook: relay {} panics", state.shared.name()),
        }
        Ok(())
    }
}

impl RelayState {
    fn on_outcome(&mut self, outcome: Outcome, myself: &ActorRef<RelayMsg>) {
        let counters = &mut self.health.counters;
        let meters = &self.shared.meters;
        if outcome.failed_over {
            counters.failovers_out += 1;
            meters.failed_over();
        }
        match &outcome.failure {
            None => meters.delivered(outcome.partial, outcome.latency),
            Some((class, _)) => meters.failed(*class),
        }
        match outcome.failure {
            None => {
                if outcome.partial {
                    counters.partial += 1;
                } else {
                    counters.sent += 1;
                }
                self.health.on_success(outcome.latency);
            }
            Some((FailureClass::Permanent, detail)) => {
                // The relay works; the message was refused.
                self.health.counters.permanent += 1;
                self.health.on_success(outcome.latency);
                self.health.last_error = Some(detail);
            }
            Some((class, detail)) => {
                let before = self.health.state;
                self.health
                    .on_failure(Instant::now(), class, &detail, &mut self.rng);
                if self.health.state != before {
                    self.schedule_tick(myself);
                }
            }
        }
        self.shared.set_state(self.health.state);
    }

    /// Wakes the actor when its backoff runs out, so it probes on time.
    fn schedule_tick(&self, myself: &ActorRef<RelayMsg>) {
        if let State::BackingOff { until } | State::CircuitOpen { until } = self.health.state {
            let delay = until.saturating_duration_since(Instant::now());
            myself.send_after(delay, || RelayMsg::Tick);
        }
    }

    fn status(&self) -> RelayStatus {
        relay_status(&self.shared, Some(&self.health), self.restarts)
    }
}

/// The status of a relay. Without `health` (its actor is restarting or
/// disabled) the counters are empty and the state is the last published.
pub(crate) fn relay_status(
    shared: &RelayShared,
    health: Option<&Health>,
    restarts: u32,
) -> RelayStatus {
    let s = &shared.settings;
    let (kind, host, port, tls, dir) = match &s.kind {
        RelayKind::Smtp(smtp) => (
            "smtp",
            Some(smtp.host.clone()),
            Some(smtp.port),
            Some(smtp.tls.as_str()),
            None,
        ),
        RelayKind::File { dir } => ("file", None, None, None, Some(dir.display().to_string())),
    };
    RelayStatus {
        name: s.name.clone(),
        kind,
        host,
        port,
        tls,
        dir,
        priority: s.priority,
        weight: s.weight,
        state: shared.state().view(Instant::now()),
        consecutive_failures: health.map_or(0, |h| h.consecutive_failures),
        relapses: health.map_or(0, |h| h.relapses),
        in_flight: shared.in_flight.load(Ordering::Acquire),
        connections: shared.open.load(Ordering::Acquire),
        counters: health.map(|h| h.counters.clone()).unwrap_or_default(),
        latency: health.map(|h| h.latency()).unwrap_or_default(),
        restarts,
        last_error: health.and_then(|h| h.last_error.clone()),
    }
}

fn spawn_probe(
    shared: Arc<RelayShared>,
    myself: ActorRef<RelayMsg>,
    reply: Option<RpcReplyPort<ProbeReport>>,
) {
    tokio::spawn(async move {
        let started = Instant::now();
        // A probe opens a connection too, so it needs a permit like a delivery.
        let permit = tokio::time::timeout(
            shared.settings.timeouts.connect,
            shared.permits.clone().acquire_owned(),
        )
        .await;
        let result = match (&shared.settings.kind, permit) {
            (_, Err(_) | Ok(Err(_))) => Err(Failure::new(
                FailureClass::Busy,
                format!(
                    "all {} connections are busy delivering",
                    shared.settings.pool.max_connections
                ),
            )),
            (RelayKind::Smtp(s), Ok(Ok(_permit))) => {
                smtp::probe(s, &shared.settings.timeouts).await
            }
            (RelayKind::File { dir }, Ok(Ok(_permit))) => {
                probe_dir(dir).await.map(|()| smtp::Probed {
                    tls: false,
                    latency: started.elapsed(),
                    pipelining: false,
                    size_limit: None,
                    limits: Default::default(),
                    dsn: false,
                })
            }
        };
        if let Some(reply) = reply {
            let has_auth = matches!(&shared.settings.kind, RelayKind::Smtp(s) if s.auth.is_some());
            let oauth = matches!(&shared.settings.kind,
                RelayKind::Smtp(s) if s.auth.as_ref().is_some_and(|a| a.method == AuthMethod::Xoauth2));
            let report = match &result {
                Ok(p) => ProbeReport {
                    relay: shared.name().to_owned(),
                    reachable: true,
                    tls: p.tls,
                    auth: has_auth.then_some(true),
                    token: oauth.then_some(true),
                    latency: p.latency,
                    pipelining: p.pipelining,
                    size_limit: p.size_limit,
                    limits: p.limits,
                    dsn: p.dsn,
                    error: None,
                },
                Err(f) => ProbeReport {
                    relay: shared.name().to_owned(),
                    reachable: !f.detail.starts_with("connect"),
                    tls: false,
                    auth: (has_auth && f.detail.starts_with("AUTH")).then_some(false),
                    token: match (oauth, f.detail.starts_with(smtp::TOKEN_FAILED)) {
                        (false, _) => None,
                        (true, true) => Some(false),
                        // Refused by the server: the token was obtained.
                        (true, false) => f.detail.starts_with("AUTH").then_some(true),
                    },
                    latency: started.elapsed(),
                    pipelining: false,
                    size_limit: None,
                    limits: Default::default(),
                    dsn: false,
                    error: Some((f.class, f.detail.clone())),
                },
            };
            let _ = reply.send(report);
        }
        let _ = myself.cast(RelayMsg::Probed(result));
    });
}

async fn probe_dir(dir: &std::path::Path) -> Result<(), Failure> {
    let fail = |e: std::io::Error| {
        Failure::new(
            FailureClass::RelayFault,
            format!("folder {}: {e}", dir.display()),
        )
    };
    tokio::fs::create_dir_all(dir).await.map_err(fail)?;
    let probe = dir.join(".mailmux-probe");
    tokio::fs::write(&probe, b"").await.map_err(fail)?;
    let _ = tokio::fs::remove_file(&probe).await;
    Ok(())
}

/// The delivery task: one attempt at one relay, then the answer or the
/// failover.
async fn deliver(
    shared: Arc<RelayShared>,
    myself: ActorRef<RelayMsg>,
    router: RouterCell,
    mut flight: Flight,
) {
    let started = Instant::now();
    let result = match &shared.settings.kind {
        RelayKind::File { dir } => file::deliver(dir, &flight.mail, &flight.progress).await,
        RelayKind::Smtp(_) => deliver_smtp(&shared, &flight).await,
    };
    let latency = started.elapsed();
    shared.in_flight.fetch_sub(1, Ordering::AcqRel);

    let name = shared.name().to_owned();
    let fails_over =
        matches!(&result, Err(f) if f.class.fails_over() && !flight.progress.is_committed());
    let _ = myself.cast(RelayMsg::Outcome(Outcome {
        failure: result.as_ref().err().map(|f| (f.class, f.detail.clone())),
        latency,
        partial: matches!(&result, Ok(d) if !d.rejected.is_empty()),
        failed_over: fails_over,
    }));

    let attempt = Attempt {
        relay: name.clone(),
        class: result.as_ref().err().map(|f| f.class),
        reply: match &result {
            Ok(d) => Some(d.reply.clone()),
            Err(f) => f.reply.clone(),
        },
        detail: match &result {
            Ok(_) => "accepted".into(),
            Err(f) => f.detail.clone(),
        },
        duration: latency,
    };
    flight.attempts.push(attempt);

    match result {
        Ok(delivered) => {
            let report = success(&mut flight, &name, delivered);
            flight.answer(report);
        }
        Err(_) if fails_over => router.route(flight),
        Err(f) => {
            let report = final_failure(&mut flight, &name, &f);
            flight.answer(report);
        }
    }
}

fn success(flight: &mut Flight, relay: &str, d: Delivered) -> Report {
    let (took, refused) = (d.accepted.len(), d.rejected.len());
    let total = took + refused + d.deferred.len();
    let message = if !d.deferred.is_empty() {
        Some(crate::mail::partly_deferred(
            &d.deferred,
            took,
            refused,
            total,
            d.note.as_deref(),
        ))
    } else if refused > 0 {
        Some(crate::mail::partly_refused(
            refused,
            total,
            d.note.as_deref(),
        ))
    } else {
        None
    };
    Report {
        message_id: flight.mail.message_id.clone(),
        status: if message.is_some() {
            Status::Partial
        } else {
            Status::Sent
        },
        relay: Some(relay.to_owned()),
        message,
        accepted: d.accepted,
        rejected: d.rejected,
        deferred: d.deferred,
        attempts: std::mem::take(&mut flight.attempts),
        failure: None,
    }
}

fn final_failure(flight: &mut Flight, relay: &str, f: &Failure) -> Report {
    let (status, failure, message) = match f.class {
        FailureClass::Unknown => (
            Status::Unknown,
            None,
            format!(
                "{relay}: {}. The message may have been delivered and was not sent again.",
                f.detail
            ),
        ),
        FailureClass::Permanent => (
            Status::Failed,
            Some(FailureReason::Rejected),
            format!("{relay} refused the message permanently: {}", f.detail),
        ),
        _ => (
            Status::Failed,
            Some(FailureReason::DeadlineExceeded),
            format!("{relay}: {}", f.detail),
        ),
    };
    // An unknown message sent in several transactions: the recipients of
    // those before the lost one had it, or were refused, for certain. A
    // message each of whose recipients was refused: each refusal.
    let (accepted, rejected) = match &f.certain {
        Some(d) => (d.accepted.clone(), d.rejected.clone()),
        None => (Vec::new(), Vec::new()),
    };
    Report {
        message_id: flight.mail.message_id.clone(),
        status,
        relay: Some(relay.to_owned()),
        accepted,
        rejected,
        deferred: Vec::new(),
        attempts: std::mem::take(&mut flight.attempts),
        failure,
        message: Some(message),
    }
}

/// One SMTP attempt: wait for a connection permit (bounded queue, bounded by
/// the deadline), reuse an idle connection or dial, run the transaction.
async fn deliver_smtp(shared: &Arc<RelayShared>, flight: &Flight) -> Result<Delivered, Failure> {
    let RelayKind::Smtp(settings) = &shared.settings.kind else {
        unreachable!("deliver_smtp is only called for smtp relays");
    };
    let mail = &flight.mail;
    let busy = |detail: String| Failure::new(FailureClass::Busy, detail);

    if shared.queued.fetch_add(1, Ordering::AcqRel) >= shared.settings.pool.max_queued {
        shared.queued.fetch_sub(1, Ordering::AcqRel);
        return Err(busy(format!(
            "the relay's queue is full ({} waiting)",
            shared.settings.pool.max_queued
        )));
    }
    let permit = tokio::time::timeout_at(mail.deadline, async {
        if mail.priority.is_high() {
            return shared.permits.clone().acquire_owned().await;
        }
        let _turn = shared.normal_turn.acquire().await;
        shared.permits.clone().acquire_owned().await
    })
    .await;
    shared.queued.fetch_sub(1, Ordering::AcqRel);
    let permit = match permit {
        Ok(Ok(p)) => p,
        Ok(Err(_)) => return Err(busy("the relay is shutting down".into())),
        Err(_) => {
            return Err(busy(
                "no connection to the relay came free before the deadline".into(),
            ));
        }
    };
    // The relay may have gone down while this message waited for a
    // connection (the messages ahead of it failed). Hand it to another relay
    // now instead of letting it wait its turn to time out against a dead
    // server; the router would not pick this relay for it either.
    if !shared.state().available(Instant::now()) {
        return Err(busy(
            "the relay went down while the message waited for a connection".into(),
        ));
    }

    // The relay's return path, else the message's sender, else the relay's.
    let from = match (&shared.settings.return_path, &mail.from) {
        (Some(path), _) => Some(path.clone()),
        (None, Some(a)) => Some(a.clone()),
        (None, None) => shared
            .settings
            .from_email
            .as_deref()
            .and_then(|s| s.parse::<Address>().ok()),
    };

    // A pooled connection may have been closed by the server while idle,
    // with a 421 or without a word; such a failure before anything was
    // committed is retried once on a fresh connection.
    let mut pooled = shared.checkout().await;
    loop {
        let reused = pooled.is_some();
        let mut conn = match pooled.take() {
            Some(c) => c,
            None => {
                // Boxed: dialling (TLS, AUTH) is the cold path and its
                // future is several kilobytes; inline, it would be copied
                // into every delivery task at spawn.
                let c = Box::pin(smtp::dial(
                    settings,
                    &shared.settings.timeouts,
                    mail.deadline,
                ))
                .await?;
                shared.open.fetch_add(1, Ordering::AcqRel);
                c
            }
        };
        let result = smtp::transact(
            &mut conn,
            from.as_ref(),
            mail,
            &shared.settings.timeouts,
            &flight.progress,
        )
        .await;
        let exhausted = shared.checkin(conn);
        match result {
            Err(f)
                if reused
                    && (f.class == FailureClass::RelayFault || f.closing())
                    && !flight.progress.is_committed() =>
            {
                if let Some(old) = exhausted {
                    Box::pin(shared.retire(old)).await;
                }
                continue;
            }
            other => {
                // The caller gets its answer now; the QUIT of a connection
                // that carried its share happens after, still under the
                // permit so that the connection bound holds.
                if let Some(old) = exhausted {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        shared.retire(old).await;
                        drop(permit);
                    });
                }
                return other;
            }
        }
    }
}
