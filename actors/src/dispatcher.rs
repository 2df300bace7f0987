//! The dispatcher: the one handle the daemon holds on the actor system.
//!
//! It owns the global in-flight bound and the caller's side of every send: it
//! waits for the reply until the deadline and, when an actor crashed under a
//! message that had not reached the final "." yet, sends it again through the
//! router. It never resends a message that may have been delivered.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorRef};
use tokio::sync::{Semaphore, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::mail::{CommitMark, FailureReason, Mail, Progress, Report, Status};
use crate::relay::{RelayMsg, relay_status};
use crate::router::{Flight, Pin, RouterCell, RouterMsg};
use crate::settings::Settings;
use crate::status::{ProbeReport, ReloadDiff, Selection, ShutdownReport, Snapshot};
use crate::supervisor::{SHUTDOWN, SupMsg, Supervisor, SupervisorArgs, View};
use crate::tally::Tally;

/// How long a control call (status, pin, reload) waits for an actor.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a caller waits past its deadline for the answer of a task that
/// was already bounded by that deadline: bookkeeping only.
const REPLY_GRACE: Duration = Duration::from_millis(250);
/// How long shutdown waits for the QUITs of idle connections.
const QUIT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a send waits before retrying while the router restarts.
const ROUTER_RETRY: Duration = Duration::from_millis(20);

/// Errors of the dispatcher's control operations (not of deliveries: those
/// are reports).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ControlError {
    #[error("unknown relay {name:?}; valid relays: {}", valid.join(", "))]
    UnknownRelay { name: String, valid: Vec<String> },
    #[error("invalid settings: {0}")]
    Invalid(String),
    #[error("the dispatcher has stopped")]
    Stopped,
}

/// An actor to crash on purpose, for fault tests.
#[cfg(feature = "fault-hooks")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PanicTarget {
    Relay(String),
    Router,
}

/// A cheap, cloneable handle on a running actor system.
#[derive(Clone, Debug)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    supervisor: ActorRef<SupMsg>,
    router: RouterCell,
    pin: Pin,
    /// Messages accepted at once, across all relays (`limits.max_in_flight`).
    slots: Arc<Semaphore>,
    max_message_bytes: AtomicUsize,
    accepting: AtomicBool,
    in_flight: Tally,
    /// How many daemons share each relay's `rate`.
    share: crate::relay::RateShare,
    /// The relays, as the supervisor last installed them.
    fleet: crate::relay::Fleet,
}

impl Dispatcher {
    /// Starts the supervisor, the router and one actor per relay.
    pub async fn start(settings: Settings) -> Result<Dispatcher, ControlError> {
        validate(&settings)?;
        let router = RouterCell::detached();
        let pin: Pin = Arc::new(Mutex::new(None));
        let slots = Arc::new(Semaphore::new(settings.limits.max_in_flight));
        let max_message_bytes = AtomicUsize::new(settings.limits.max_message_bytes);
        let share: crate::relay::RateShare = Arc::new(std::sync::atomic::AtomicU32::new(1));
        let fleet = crate::relay::Fleet::default();
        let args = SupervisorArgs {
            settings,
            router: router.clone(),
            pin: pin.clone(),
            share: share.clone(),
            fleet: fleet.clone(),
        };
        let (supervisor, _) = Actor::spawn(None, Supervisor, args)
            .await
            .map_err(|e| ControlError::Invalid(e.to_string()))?;
        Ok(Dispatcher {
            inner: Arc::new(Inner {
                supervisor,
                router,
                pin,
                slots,
                max_message_bytes,
                accepting: AtomicBool::new(true),
                in_flight: Tally::default(),
                share,
                fleet,
            }),
        })
    }

    /// Shares every relay's `rate` among `daemons` daemons (those on one
    /// shared queue): this one keeps to `count / daemons` of each limit.
    pub fn set_rate_share(&self, daemons: u32) {
        self.inner
            .share
            .store(daemons.max(1), std::sync::atomic::Ordering::Release);
    }

    /// Whether the router may send a message to some relay now: one is
    /// healthy, or its backoff has run out. False while every relay backs
    /// off, has its circuit open or is disabled; the queue then polls for
    /// due mail once a second, not ten times, so that a daemon whose relays
    /// are down leaves the mail of a shared queue to the daemons whose
    /// relays are up.
    pub fn any_relay_available(&self) -> bool {
        let now = Instant::now();
        self.inner
            .fleet
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|r| r.available(now))
    }

    /// Delivers one message, failing over as the settings allow. Never hangs
    /// past `mail.deadline` (plus a few milliseconds of bookkeeping).
    pub async fn send(&self, mail: Mail) -> Report {
        self.send_marked(mail, None).await
    }

    /// [`Dispatcher::send`], recording with `mark` before the final "." of
    /// any attempt (the durable queue's crash marker).
    pub async fn send_marked(&self, mail: Mail, mark: Option<Arc<dyn CommitMark>>) -> Report {
        self.send_cancellable(mail, mark, None).await
    }

    /// [`Dispatcher::send_marked`], given up when `cancel` fires before any
    /// relay began to commit the message (before its final "."): then it is
    /// not sent and the report says `Cancelled` at once. Once a relay began
    /// to commit it, the delivery goes on and the report says how it ended.
    pub async fn send_cancellable(
        &self,
        mail: Mail,
        mark: Option<Arc<dyn CommitMark>>,
        cancel: Option<CancellationToken>,
    ) -> Report {
        let inner = &*self.inner;
        if !inner.accepting.load(Ordering::Acquire) {
            return Report::failed(
                &mail,
                FailureReason::Unavailable,
                "mailmux is shutting down and takes no new messages".into(),
            );
        }
        let max = inner.max_message_bytes.load(Ordering::Relaxed);
        if mail.bytes.len() > max {
            return Report::failed(
                &mail,
                FailureReason::TooLarge,
                format!(
                    "the message is {} bytes; the limit is {max}",
                    mail.bytes.len()
                ),
            );
        }
        let deadline = mail.deadline;
        let slot = tokio::select! {
            slot = tokio::time::timeout_at(deadline, inner.slots.acquire()) => slot,
            () = cancelled(cancel.as_ref()) => return Report::failed(&mail, FailureReason::Cancelled, CANCELLED.into()),
        };
        let _slot = match slot {
            Ok(Ok(permit)) => permit,
            _ => {
                return Report::failed(
                    &mail,
                    FailureReason::Busy,
                    "too many messages in flight; none finished before the deadline".into(),
                );
            }
        };
        let _counted = inner.in_flight.enter();

        let mail = Arc::new(mail);
        let progress = Arc::new(Progress::marked(mark));
        loop {
            let (tx, rx) = oneshot::channel();
            let flight = Flight {
                mail: mail.clone(),
                progress: progress.clone(),
                tried: Vec::new(),
                attempts: Vec::new(),
                reply: tx,
            };
            let sent = inner
                .router
                .get()
                .is_some_and(|r| r.cast(RouterMsg::Route(flight)).is_ok());
            if !sent {
                // The router is restarting; try again shortly.
                if Instant::now() + ROUTER_RETRY >= deadline {
                    return lost(
                        &mail,
                        &progress,
                        "the router was not available before the deadline",
                    );
                }
                tokio::time::sleep(ROUTER_RETRY).await;
                continue;
            }
            let reply = tokio::time::timeout_at(deadline + REPLY_GRACE, rx);
            tokio::pin!(reply);
            let mut watching = cancel.is_some();
            let replied = loop {
                tokio::select! {
                    r = &mut reply => break r,
                    () = cancelled(cancel.as_ref()), if watching => {
                        // Not sent unless a relay already began to commit it.
                        if progress.cancel() {
                            return Report::failed(&mail, FailureReason::Cancelled, CANCELLED.into());
                        }
                        watching = false;
                    }
                }
            };
            match replied {
                Ok(Ok(report)) => return report,
                // An actor stopped with the message in its mailbox or its
                // task: send it again unless it may have been delivered.
                Ok(Err(_)) if !progress.is_committed() && Instant::now() < deadline => {
                    tracing::warn!(message_id = %mail.message_id, "an actor stopped under a message; routing it again");
                }
                Ok(Err(_)) | Err(_) => {
                    return lost(&mail, &progress, "no answer before the deadline");
                }
            }
        }
    }

    /// A snapshot of every relay and the router.
    pub async fn status(&self) -> Result<Snapshot, ControlError> {
        let view = self.view().await?;
        let mut relays = Vec::with_capacity(view.relays.len());
        for (shared, actor, restarts) in &view.relays {
            let live = match actor {
                Some(a) => {
                    ractor::call_t!(a, RelayMsg::Status, CONTROL_TIMEOUT.as_millis() as u64).ok()
                }
                None => None,
            };
            relays.push(live.unwrap_or_else(|| relay_status(shared, None, *restarts)));
        }
        Ok(Snapshot {
            strategy: view.settings.router.strategy,
            pinned: self.pinned(),
            relays,
            in_flight: self.inner.in_flight.get(),
            router_restarts: view.router_restarts,
        })
    }

    /// Pins a relay (`Some`) or unpins (`None`); returns the new selection.
    pub async fn pin(&self, relay: Option<String>) -> Result<Selection, ControlError> {
        if let Some(name) = &relay {
            let view = self.view().await?;
            let valid: Vec<String> = view.relays.iter().map(|r| r.0.name().to_owned()).collect();
            if !valid.contains(name) {
                return Err(ControlError::UnknownRelay {
                    name: name.clone(),
                    valid,
                });
            }
        }
        *self.inner.pin.lock().unwrap_or_else(|e| e.into_inner()) = relay;
        self.selection().await
    }

    /// The current pin and the relay the next message would go to.
    pub async fn selection(&self) -> Result<Selection, ControlError> {
        let router = self.inner.router.get().ok_or(ControlError::Stopped)?;
        ractor::call_t!(
            router,
            RouterMsg::Selection,
            CONTROL_TIMEOUT.as_millis() as u64
        )
        .map_err(|_| ControlError::Stopped)
    }

    /// Probes every relay, or the one named.
    pub async fn test_connection(
        &self,
        relay: Option<&str>,
    ) -> Result<Vec<ProbeReport>, ControlError> {
        self.probe_all(relay, RelayMsg::Test).await
    }

    /// Applies new settings as a diff: added relays start, removed relays
    /// drain and stop, changed relays are replaced.
    pub async fn reload(&self, settings: Settings) -> Result<ReloadDiff, ControlError> {
        validate(&settings)?;
        let limits = settings.limits.clone();
        let diff = ractor::call_t!(
            self.inner.supervisor,
            SupMsg::Reload,
            CONTROL_TIMEOUT.as_millis() as u64,
            settings
        )
        .map_err(|_| ControlError::Stopped)??;
        self.inner
            .max_message_bytes
            .store(limits.max_message_bytes, Ordering::Relaxed);
        let mut pin = self.inner.pin.lock().unwrap_or_else(|e| e.into_inner());
        if pin.as_ref().is_some_and(|p| diff.removed.contains(p)) {
            *pin = None;
        }
        Ok(diff)
    }

    /// Drops the connections of `relay` (or of every relay), resets its
    /// health and probes it.
    pub async fn reconnect(&self, relay: Option<&str>) -> Result<Snapshot, ControlError> {
        self.probe_all(relay, RelayMsg::Reconnect).await?;
        self.status().await
    }

    /// Refuses new sends, waits up to `grace` for those in flight, then stops
    /// the actors (which QUIT their connections).
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        let inner = &*self.inner;
        inner.accepting.store(false, Ordering::Release);
        let at_start = inner.in_flight.get();
        let _ = tokio::time::timeout(grace, inner.in_flight.idle()).await;
        let abandoned = inner.in_flight.get();
        // Say QUIT on every idle connection before the actors go.
        if let Ok(view) = self.view().await {
            let quits = view.relays.iter().map(|(shared, _, _)| shared.quit_idle());
            let _ = tokio::time::timeout(QUIT_TIMEOUT, futures_join_all(quits)).await;
        }
        inner.supervisor.stop_children(Some(SHUTDOWN.into()));
        let _ = inner
            .supervisor
            .stop_and_wait(Some(SHUTDOWN.into()), Some(CONTROL_TIMEOUT))
            .await;
        ShutdownReport {
            in_flight_at_start: at_start,
            abandoned,
        }
    }

    /// Messages accepted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.get()
    }

    /// Blocks the router actor for `d`, for fault tests only: it answers
    /// nothing meanwhile.
    #[cfg(feature = "fault-hooks")]
    pub fn stall_router(&self, d: Duration) -> Result<(), ControlError> {
        let router = self.inner.router.get().ok_or(ControlError::Stopped)?;
        router
            .cast(RouterMsg::Stall(d))
            .map_err(|_| ControlError::Stopped)
    }

    /// Crashes an actor, for fault tests only.
    #[cfg(feature = "fault-hooks")]
    pub async fn inject_panic(&self, target: PanicTarget) -> Result<(), ControlError> {
        match target {
            PanicTarget::Router => {
                let router = self.inner.router.get().ok_or(ControlError::Stopped)?;
                router
                    .cast(RouterMsg::Panic)
                    .map_err(|_| ControlError::Stopped)
            }
            PanicTarget::Relay(name) => {
                let view = self.view().await?;
                let actor = view
                    .relays
                    .iter()
                    .find(|r| r.0.name() == name)
                    .and_then(|r| r.1.clone())
                    .ok_or(ControlError::Stopped)?;
                actor
                    .cast(RelayMsg::Panic)
                    .map_err(|_| ControlError::Stopped)
            }
        }
    }

    fn pinned(&self) -> Option<String> {
        self.inner
            .pin
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn view(&self) -> Result<View, ControlError> {
        ractor::call_t!(
            self.inner.supervisor,
            SupMsg::View,
            CONTROL_TIMEOUT.as_millis() as u64
        )
        .map_err(|_| ControlError::Stopped)
    }

    /// Sends a probing message to every relay (or one) at once and collects
    /// the reports in configuration order.
    async fn probe_all(
        &self,
        relay: Option<&str>,
        msg: fn(ractor::RpcReplyPort<ProbeReport>) -> RelayMsg,
    ) -> Result<Vec<ProbeReport>, ControlError> {
        let view = self.view().await?;
        if let Some(name) = relay
            && !view.relays.iter().any(|r| r.0.name() == name)
        {
            return Err(ControlError::UnknownRelay {
                name: name.to_owned(),
                valid: view.relays.iter().map(|r| r.0.name().to_owned()).collect(),
            });
        }
        let mut pending = Vec::new();
        for (shared, actor, _) in &view.relays {
            if relay.is_some_and(|n| n != shared.name()) {
                continue;
            }
            let timeouts = &shared.settings.timeouts;
            let limit = timeouts.connect + timeouts.greeting + timeouts.command * 4;
            let name = shared.name().to_owned();
            let rx = actor.as_ref().map(|a| {
                let (tx, rx) = oneshot::channel();
                let _ = a.cast(msg(tx.into()));
                rx
            });
            pending.push((name, limit, rx));
        }
        let mut out = Vec::with_capacity(pending.len());
        for (name, limit, rx) in pending {
            let started = Instant::now();
            let report = match rx {
                Some(rx) => tokio::time::timeout(limit, rx)
                    .await
                    .ok()
                    .and_then(Result::ok),
                None => None,
            };
            out.push(report.unwrap_or_else(|| ProbeReport {
                relay: name,
                reachable: false,
                tls: false,
                auth: None,
                token: None,
                latency: started.elapsed(),
                pipelining: false,
                size_limit: None,
                limits: Default::default(),
                dsn: false,
                error: Some((
                    crate::mail::FailureClass::RelayFault,
                    "the relay's actor is restarting or disabled".into(),
                )),
            }));
        }
        Ok(out)
    }
}

/// Runs futures concurrently to completion.
async fn futures_join_all<F: std::future::Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    let mut all: Vec<_> = futures.map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        all.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if all.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}

/// The report for a message whose answer never came: unknown if the final
/// "." may have gone out, failed otherwise.
/// What a report of a cancelled send says.
const CANCELLED: &str = "the call was cancelled before any relay took the message; it was not sent";

/// Fires when `cancel` does; never without one.
pub(crate) async fn cancelled(cancel: Option<&CancellationToken>) {
    match cancel {
        Some(c) => c.cancelled().await,
        None => std::future::pending().await,
    }
}

fn lost(mail: &Mail, progress: &Progress, why: &str) -> Report {
    if progress.abandon() {
        Report::failed(
            mail,
            FailureReason::DeadlineExceeded,
            format!("{why}; the message was not sent"),
        )
    } else {
        Report {
            status: Status::Unknown,
            failure: None,
            message: Some(format!(
                "{why} after the message was handed to the relay; it may have been delivered and was not sent again"
            )),
            ..Report::failed(mail, FailureReason::DeadlineExceeded, String::new())
        }
    }
}

fn validate(settings: &Settings) -> Result<(), ControlError> {
    let mut names = std::collections::HashSet::new();
    for r in &settings.relays {
        if !names.insert(r.name.as_str()) {
            return Err(ControlError::Invalid(format!(
                "relay name {:?} is used twice",
                r.name
            )));
        }
        if r.pool.max_connections == 0 {
            return Err(ControlError::Invalid(format!(
                "relay {:?}: max_connections must be at least 1",
                r.name
            )));
        }
    }
    if settings.limits.max_in_flight == 0 {
        return Err(ControlError::Invalid(
            "max_in_flight must be at least 1".into(),
        ));
    }
    Ok(())
}
