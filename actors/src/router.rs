//! The router actor: the relay table and the strategy. It picks a relay for
//! each message and, when a relay hands a message back (relay fault,
//! transient failure, busy), picks the next one that has not tried it, until
//! the attempts or the deadline run out.
//!
//! It never waits on a relay: it casts `Deliver` and moves on. It reads each
//! relay's availability and in-flight count from the relay's shared part.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, MessagingErr, RpcReplyPort};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::mail::{Attempt, FailureClass, FailureReason, Mail, Progress, Report, Status};
use crate::relay::{RelayMsg, RelayShared};
use crate::settings::{RouterSettings, Strategy};
use crate::status::Selection;

/// A message on its way: the mail, how far it got, who tried it, and where
/// the answer goes. Whoever finishes it answers the caller directly.
#[derive(Debug)]
pub(crate) struct Flight {
    pub mail: Arc<Mail>,
    pub progress: Arc<Progress>,
    pub tried: Vec<String>,
    pub attempts: Vec<Attempt>,
    pub reply: oneshot::Sender<Report>,
}

impl Flight {
    pub(crate) fn answer(self, report: Report) {
        // The caller may have given up at its deadline; nothing to do then.
        let _ = self.reply.send(report);
    }
}

/// Where the current router is. The supervisor replaces the reference when it
/// restarts the router; everyone else only reads it.
#[derive(Debug, Clone)]
pub(crate) struct RouterCell(Arc<RwLock<Option<ActorRef<RouterMsg>>>>);

impl RouterCell {
    pub(crate) fn detached() -> Self {
        RouterCell(Arc::new(RwLock::new(None)))
    }

    pub(crate) fn set(&self, router: ActorRef<RouterMsg>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(router);
    }

    pub(crate) fn get(&self) -> Option<ActorRef<RouterMsg>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Hands a flight to the router. If the router is down (restarting), the
    /// flight is dropped: its caller sees the dropped reply and sends the
    /// message again, which is safe because nothing was committed.
    pub(crate) fn route(&self, flight: Flight) {
        if let Some(router) = self.get() {
            let _ = router.cast(RouterMsg::Route(flight));
        }
    }
}

/// One relay as the router sees it.
#[derive(Debug, Clone)]
pub(crate) struct RelayEntry {
    pub shared: Arc<RelayShared>,
    /// `None` while the relay's actor is restarting or disabled.
    pub actor: Option<ActorRef<RelayMsg>>,
}

impl RelayEntry {
    fn name(&self) -> &str {
        self.shared.name()
    }
}

#[derive(Debug)]
pub(crate) enum RouterMsg {
    Route(Flight),
    /// The relay table changed (start, restart, reload).
    Table(Vec<RelayEntry>),
    /// Install a new table and answer once it is in force: every message
    /// routed after the answer sees it (a reload waits for this before it
    /// lets the retired relays stop accepting).
    Install(Vec<RelayEntry>, RpcReplyPort<()>),
    Settings(RouterSettings),
    /// The relay the next message would go to.
    Selection(RpcReplyPort<Selection>),
    #[cfg(feature = "fault-hooks")]
    Panic,
    /// Blocks the router for a while, as a wedged actor would be.
    #[cfg(feature = "fault-hooks")]
    Stall(std::time::Duration),
}

#[derive(Debug)]
pub(crate) struct RouterArgs {
    pub table: Vec<RelayEntry>,
    pub settings: RouterSettings,
    pub pin: Pin,
}

/// The pinned relay, shared with the dispatcher (which validates and sets
/// it) so that it survives a router restart.
pub(crate) type Pin = Arc<Mutex<Option<String>>>;

#[derive(Debug)]
pub(crate) struct RouterActor;

#[derive(Debug)]
pub(crate) struct RouterState {
    table: Vec<RelayEntry>,
    settings: RouterSettings,
    pin: Pin,
    next_turn: usize,
    rng: StdRng,
    /// While routing one message: the shortest wait of a relay that was
    /// passed over because its `rate` was used up.
    rate_wait: Option<std::time::Duration>,
    /// By relay: until when its next turn of its `rate` is kept for a
    /// message of high priority that found the rate used up, and comes back
    /// for that turn ([`RouterState::take_turn`]).
    kept: HashMap<String, Instant>,
}

/// How long after a relay's next turn of its `rate` is due the turn stays
/// kept for the message of high priority that asked for it: its round comes
/// back then, within a poll of the queue (100 ms).
const KEPT_FOR: std::time::Duration = std::time::Duration::from_secs(1);

impl Actor for RouterActor {
    type Msg = RouterMsg;
    type State = RouterState;
    type Arguments = RouterArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<RouterMsg>,
        args: RouterArgs,
    ) -> Result<RouterState, ActorProcessingErr> {
        Ok(RouterState {
            table: args.table,
            settings: args.settings,
            pin: args.pin,
            next_turn: 0,
            rng: StdRng::from_os_rng(),
            rate_wait: None,
            kept: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<RouterMsg>,
        msg: RouterMsg,
        state: &mut RouterState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RouterMsg::Route(flight) => state.route(flight),
            RouterMsg::Table(table) => state.table = table,
            RouterMsg::Install(table, reply) => {
                state.table = table;
                let _ = reply.send(());
            }
            RouterMsg::Settings(settings) => state.settings = settings,
            RouterMsg::Selection(reply) => {
                let now = Instant::now();
                let pinned = state.pinned();
                let next = state
                    .choose(None, None, &[], now, false, false)
                    .map(|i| state.table[i].name().to_owned());
                let _ = reply.send(Selection {
                    pinned,
                    next,
                    strategy: state.settings.strategy,
                });
            }
            #[cfg(feature = "fault-hooks")]
            RouterMsg::Panic => panic!("fault hook: the router panics"),
            #[cfg(feature = "fault-hooks")]
            RouterMsg::Stall(d) => tokio::time::sleep(d).await,
        }
        Ok(())
    }
}

impl RouterState {
    fn pinned(&self) -> Option<String> {
        self.pin.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn route(&mut self, mut flight: Flight) {
        self.rate_wait = None;
        loop {
            let now = Instant::now();
            if let Some(name) = &flight.mail.prefer
                && !self.table.iter().any(|e| e.name() == name)
            {
                let names: Vec<_> = self.table.iter().map(|e| e.name().to_owned()).collect();
                let report = failed(
                    &flight,
                    FailureReason::UnknownRelay,
                    format!("unknown relay {name:?}; valid relays: {}", names.join(", ")),
                );
                return flight.answer(report);
            }
            if now >= flight.mail.deadline {
                let report = failed(
                    &flight,
                    FailureReason::DeadlineExceeded,
                    format!(
                        "the deadline passed before any relay took the message{}",
                        self.describe(&flight)
                    ),
                );
                return flight.answer(report);
            }
            let max = self.settings.max_attempts.max(1) as usize;
            // A relay that could not take the message at all (too large
            // for its SIZE, no SMTPUTF8) was sent nothing: it does not use
            // up the message's attempts.
            let passed_over = flight
                .attempts
                .iter()
                .filter(|a| a.class == Some(FailureClass::Unsupported))
                .count();
            let pick = if flight.tried.len().saturating_sub(passed_over) >= max {
                None
            } else {
                self.choose(
                    flight.mail.prefer.as_deref(),
                    flight.mail.only.as_deref(),
                    &flight.tried,
                    now,
                    true,
                    flight.mail.priority.is_high(),
                )
            };
            let Some(i) = pick else {
                if let Some(wait) = self.rate_wait {
                    // Every relay left has used up its rate: the message
                    // waits for its turn (the queue retries it then).
                    let report = failed(
                        &flight,
                        FailureReason::RateLimited {
                            wait_ms: millis(wait),
                        },
                        format!(
                            "every relay that may take the message is at its rate limit; next turn in {:.1} s{}",
                            wait.as_secs_f64(),
                            self.describe(&flight)
                        ),
                    );
                    return flight.answer(report);
                }
                let all = |class| {
                    !flight.attempts.is_empty()
                        && flight.attempts.iter().all(|a| a.class == Some(class))
                };
                let reason = if all(FailureClass::Busy) {
                    FailureReason::Busy
                } else if all(FailureClass::Unsupported)
                    && let Some(wait) = self.untried_down(&flight, now)
                {
                    // Too large for the relays tried, or needing SMTPUTF8
                    // they lack: a relay that may take it is down, not
                    // refusing, so the message waits for it.
                    FailureReason::RelaysBackingOff {
                        wait_ms: millis(wait),
                    }
                } else if all(FailureClass::Unsupported) {
                    if flight
                        .attempts
                        .iter()
                        .all(|a| a.detail.starts_with(crate::smtp::OVER_SIZE))
                    {
                        FailureReason::TooLarge
                    } else {
                        FailureReason::Smtputf8Unsupported
                    }
                } else if let Some(wait) = self.next_available(&flight, now) {
                    FailureReason::RelaysBackingOff {
                        wait_ms: millis(wait),
                    }
                } else {
                    FailureReason::AllRelaysFailed
                };
                let report = failed(
                    &flight,
                    reason,
                    format!("no relay could take the message{}", self.describe(&flight)),
                );
                return flight.answer(report);
            };
            let entry = &self.table[i];
            flight.tried.push(entry.name().to_owned());
            let Some(actor) = &entry.actor else {
                continue;
            };
            match actor.cast(RelayMsg::Deliver(flight)) {
                Ok(()) => return,
                // The relay's actor stopped under us: the message is handed
                // back and goes to the next candidate.
                Err(MessagingErr::SendErr(RelayMsg::Deliver(f))) => flight = f,
                Err(_) => return,
            }
        }
    }

    /// Picks a relay that is available and has not tried this message.
    /// `advance` moves the round-robin turn (false for a look-ahead); `high`:
    /// the message is of high priority.
    fn choose(
        &mut self,
        prefer: Option<&str>,
        only: Option<&[String]>,
        tried: &[String],
        now: Instant,
        advance: bool,
        high: bool,
    ) -> Option<usize> {
        let mut candidates: Vec<usize> = (0..self.table.len())
            .filter(|&i| {
                let e = &self.table[i];
                e.actor.is_some()
                    && !tried.iter().any(|t| t == e.name())
                    && only.is_none_or(|only| only.iter().any(|n| n == e.name()))
                    && e.shared.available(now)
            })
            .collect();
        // A relay whose rate is used up is passed over (look-ahead takes no
        // rate).
        loop {
            let i = self.pick(prefer, &candidates, advance)?;
            if !advance {
                return Some(i);
            }
            match self.take_turn(i, high, now) {
                Ok(()) => return Some(i),
                Err(wait) => {
                    self.rate_wait = Some(self.rate_wait.map_or(wait, |w| w.min(wait)));
                    candidates.retain(|&c| c != i);
                }
            }
        }
    }

    /// Takes a turn of relay `i`'s `rate`, or says how long until one. A
    /// message of high priority that finds the rate used up has the next
    /// turn kept for it (until [`KEPT_FOR`] past it): no other message takes
    /// it meanwhile, so that it does not wait behind the mail deferred for
    /// the same rate, which comes back at random times within its wait.
    fn take_turn(&mut self, i: usize, high: bool, now: Instant) -> Result<(), std::time::Duration> {
        let name = self.table[i].name();
        if !high && let Some(&until) = self.kept.get(name) {
            if until > now {
                return Err(until - now);
            }
            self.kept.remove(name);
        }
        match self.table[i].shared.take_rate() {
            Ok(()) => {
                if high {
                    self.kept.remove(name);
                }
                Ok(())
            }
            Err(wait) => {
                if high {
                    self.kept.insert(name.to_owned(), now + wait + KEPT_FOR);
                }
                Err(wait)
            }
        }
    }

    /// The strategy's choice among `candidates`.
    fn pick(&mut self, prefer: Option<&str>, candidates: &[usize], advance: bool) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        let pinned = self.pinned();
        for wanted in [prefer, pinned.as_deref()].into_iter().flatten() {
            if let Some(&i) = candidates.iter().find(|&&i| self.table[i].name() == wanted) {
                return Some(i);
            }
        }
        let settings = |i: usize| &self.table[i].shared.settings;
        match self.settings.strategy {
            Strategy::Priority => candidates
                .iter()
                .copied()
                .max_by_key(|&i| (settings(i).priority, std::cmp::Reverse(i))),
            Strategy::RoundRobin => {
                let turn = self.next_turn;
                if advance {
                    self.next_turn = self.next_turn.wrapping_add(1);
                }
                // The relay whose turn it is, or the next available after it.
                let n = self.table.len();
                (0..n)
                    .map(|k| (turn + k) % n)
                    .find(|i| candidates.contains(i))
            }
            Strategy::Weighted => {
                let total: u64 = candidates
                    .iter()
                    .map(|&i| u64::from(settings(i).weight))
                    .sum();
                if total == 0 {
                    candidates.first().copied()
                } else {
                    let mut ticket = self.rng.random_range(0..total);
                    candidates.iter().copied().find(|&i| {
                        let w = u64::from(settings(i).weight);
                        if ticket < w {
                            true
                        } else {
                            ticket -= w;
                            false
                        }
                    })
                }
            }
            Strategy::LeastOutstanding => candidates.iter().copied().min_by_key(|&i| {
                let e = &self.table[i];
                (
                    e.shared
                        .in_flight
                        .load(std::sync::atomic::Ordering::Acquire),
                    std::cmp::Reverse(e.shared.settings.priority),
                    i,
                )
            }),
            Strategy::Random => Some(candidates[self.rng.random_range(0..candidates.len())]),
        }
    }

    /// The relays that may take the message and have not tried it.
    fn untried<'a>(&'a self, flight: &'a Flight) -> impl Iterator<Item = &'a RelayEntry> + 'a {
        let only = flight.mail.only.as_deref();
        self.table.iter().filter(move |e| {
            e.actor.is_some()
                && !flight.tried.iter().any(|t| t == e.name())
                && only.is_none_or(|only| only.iter().any(|n| n == e.name()))
        })
    }

    /// When no relay was tried because each that may take the message is
    /// backing off or has its circuit open: how long until the first of
    /// them may be tried again.
    fn next_available(&self, flight: &Flight, now: Instant) -> Option<Duration> {
        if !flight.attempts.is_empty() {
            return None;
        }
        self.untried(flight)
            .map(|e| e.shared.state().view(now).retry_in())
            .collect::<Option<Vec<Duration>>>()?
            .into_iter()
            .min()
    }

    /// How long until the first relay that may take the message, has not
    /// tried it and is down now (backing off, or its circuit open) may be
    /// tried; `None` when there is no such relay.
    fn untried_down(&self, flight: &Flight, now: Instant) -> Option<Duration> {
        self.untried(flight)
            .filter(|e| !e.shared.available(now))
            .filter_map(|e| e.shared.state().view(now).retry_in())
            .min()
    }

    /// "; tried: a (relay_fault: …); b: backing_off (retry in 3s)"
    fn describe(&self, flight: &Flight) -> String {
        let mut out = String::new();
        if !flight.attempts.is_empty() {
            out.push_str("; tried: ");
            for (k, a) in flight.attempts.iter().enumerate() {
                if k > 0 {
                    out.push_str(", ");
                }
                let class = a.class.map_or("ok", FailureClass::as_str);
                let _ = write!(out, "{} ({class}: {})", a.relay, a.detail);
            }
        }
        let now = Instant::now();
        let others: Vec<String> = self
            .table
            .iter()
            .map(|e| {
                let state = e.shared.state().view(now);
                match (e.actor.is_some(), state.retry_in()) {
                    (false, _) => format!("{}: restarting or disabled", e.name()),
                    (true, Some(d)) => {
                        format!(
                            "{}: {} (retry in {:.1}s)",
                            e.name(),
                            state.as_str(),
                            d.as_secs_f64()
                        )
                    }
                    (true, None) => format!("{}: {}", e.name(), state.as_str()),
                }
            })
            .collect();
        if !others.is_empty() {
            let _ = write!(out, "; relays: {}", others.join(", "));
        }
        if self.table.is_empty() {
            out.push_str("; no relay is configured");
        } else if let Some(only) = flight.mail.only.as_deref()
            && !only
                .iter()
                .any(|n| self.table.iter().any(|e| e.name() == n))
        {
            // Fixed when it was accepted; a reload took them all away.
            let _ = write!(
                out,
                "; none of the relays that may take it ({}) is configured now",
                only.join(", ")
            );
        }
        out
    }
}

fn failed(flight: &Flight, reason: FailureReason, message: String) -> Report {
    Report {
        message_id: flight.mail.message_id.clone(),
        status: Status::Failed,
        relay: flight.attempts.last().map(|a| a.relay.clone()),
        accepted: Vec::new(),
        rejected: Vec::new(),
        deferred: Vec::new(),
        attempts: flight.attempts.clone(),
        failure: Some(reason),
        message: Some(message),
    }
}

/// A wait in whole milliseconds, as a failure reason carries it.
fn millis(wait: Duration) -> u64 {
    u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)
}
