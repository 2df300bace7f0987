//! What the service manager hears: systemd's notification protocol
//! (`sd_notify(3)`) for a daemon started with `NOTIFY_SOCKET` set, as a
//! `Type=notify` unit starts it. Without `NOTIFY_SOCKET` nothing here sends
//! or runs.
//!
//! - `READY=1` once the transport serves (the HTTP port is bound, or stdin
//!   is read), with a `STATUS=` line that says where; before it, the status
//!   says the daemon is starting (a long recovery of the store shows so);
//! - `RELOADING=1` (with `MONOTONIC_USEC`) and then `READY=1` around the
//!   reload of each SIGHUP, applied or not;
//! - `STOPPING=1` when the drain begins;
//! - with `WATCHDOG_USEC`, `WATCHDOG=1` every half of it while the daemon
//!   works inside: the runtime runs the watch's task, the relays' router
//!   actor answers within a quarter of it, and the queue's store can still
//!   write (the SQLite writer thread runs). A wedged runtime or actor
//!   system, or a writer that ended, stops the pings, and systemd restarts
//!   the daemon (`WatchdogSec=`); relays that are down, a slow or
//!   unreachable store or a paused delivery do not;
//! - the status line also says when delivery is paused, and what stopped
//!   the pings.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;

use crate::mcp::MailmuxServer;

/// How often the status is looked at when there is no watchdog.
const STATUS_TICK: Duration = Duration::from_secs(5);

/// Whether a service manager listens, read once.
fn listening() -> bool {
    static LISTENING: OnceLock<bool> = OnceLock::new();
    *LISTENING.get_or_init(|| std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty()))
}

/// Where the daemon serves, once it does; `None` while it starts.
static SERVING: Mutex<Option<String>> = Mutex::new(None);
/// Set when the drain begins: the status says so from then on.
static STOPPING: AtomicBool = AtomicBool::new(false);
/// Set while sending fails, so that a failure is logged once a streak.
static FAILING: AtomicBool = AtomicBool::new(false);

fn send(states: &[NotifyState]) {
    if !listening() {
        return;
    }
    match sd_notify::notify(states) {
        Ok(()) => {
            if FAILING.swap(false, Ordering::Relaxed) {
                tracing::info!("the service manager hears the daemon again (NOTIFY_SOCKET)");
            }
        }
        Err(e) => {
            if !FAILING.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
            }
        }
    }
}

/// The transport serves: `READY=1`, and `serving` becomes the status.
pub fn ready(serving: String) {
    let status = serving.clone();
    *SERVING.lock().unwrap_or_else(|e| e.into_inner()) = Some(serving);
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// A SIGHUP's reload begins.
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading];
    match NotifyState::monotonic_usec_now() {
        Ok(now) => states.push(now),
        Err(e) => tracing::debug!(error = %e, "no monotonic clock for MONOTONIC_USEC"),
    }
    send(&states);
}

/// A SIGHUP's reload ended, applied or not: the daemon serves again.
pub fn reloaded() {
    send(&[NotifyState::Ready]);
}

/// The drain begins.
pub fn stopping() {
    STOPPING.store(true, Ordering::Relaxed);
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: no new calls, deliveries in flight finish"),
    ]);
}

/// The watch of a starting daemon: hand it the server with
/// [`Watch::serve`] once there is one. Dropping it ends the watch.
pub struct Watch {
    server: Option<watch::Sender<Option<MailmuxServer>>>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("running", &self.server.is_some())
            .finish()
    }
}

impl Watch {
    /// Starts the watch when a service manager listens; pings the watchdog
    /// from now on if it asks for pings, so that a long start is not taken
    /// for a hang.
    pub fn start() -> Watch {
        if !listening() {
            return Watch { server: None };
        }
        let (tx, rx) = watch::channel(None);
        let dog = sd_notify::watchdog_enabled();
        if let Some(every) = dog {
            tracing::info!(watchdog = ?every, "the service manager's watchdog is on: pinged every half of it while the daemon works");
        }
        tokio::spawn(run(dog.map(|d| d / 2), rx));
        send(&[NotifyState::Status("starting: opening the queue store")]);
        Watch { server: Some(tx) }
    }

    /// The daemon has its server: the watch asks its router from now on.
    pub fn serve(&self, server: &MailmuxServer) {
        if let Some(tx) = &self.server {
            let _ = tx.send(Some(server.clone()));
        }
    }
}

/// What keeps the daemon from working inside, if anything: a store that
/// can write nothing more, or a relays' router actor that does not answer
/// within `within`. The runtime that runs this is the rest of the check.
pub async fn trouble(server: &MailmuxServer, within: Duration) -> Option<&'static str> {
    if !server.queue().store_alive() {
        return Some("the queue store's writer has stopped");
    }
    let router = server.queue().dispatcher().selection();
    match tokio::time::timeout(within, router).await {
        Ok(Ok(_)) => None,
        _ => Some("the relays' router does not answer"),
    }
}

async fn run(ping: Option<Duration>, server: watch::Receiver<Option<MailmuxServer>>) {
    let tick = ping.unwrap_or(STATUS_TICK).max(Duration::from_millis(10));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shown = status_line(None, None);
    let mut was = None;
    // Ends when the daemon drops its Watch.
    while server.has_changed().is_ok() {
        ticker.tick().await;
        let current = server.borrow().clone();
        let now = match &current {
            Some(s) => trouble(s, tick / 2).await,
            None => None,
        };
        if now.is_none() && ping.is_some() {
            send(&[NotifyState::Watchdog]);
        }
        if now != was {
            match now {
                Some(why) => tracing::error!("{why}: the service manager's watchdog is not pinged"),
                None => tracing::warn!("the daemon works again: the watchdog is pinged"),
            }
            was = now;
        }
        if STOPPING.load(Ordering::Relaxed) {
            continue;
        }
        let status = status_line(current.as_ref(), now);
        if status != shown {
            send(&[NotifyState::Status(&status)]);
            shown = status;
        }
    }
}

/// The `STATUS=` line: where the daemon serves, and what an operator
/// looking at `systemctl status` should know.
fn status_line(server: Option<&MailmuxServer>, trouble: Option<&str>) -> String {
    let serving = SERVING.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut line = serving.unwrap_or_else(|| "starting: opening the queue store".into());
    if let Some(p) = server.and_then(|s| s.queue().paused()) {
        line.push_str("; delivery ");
        line.push_str(&crate::cli::queue::pause_text(Some(&p)));
    }
    if let Some(why) = trouble {
        line.push_str("; ");
        line.push_str(why);
    }
    line
}
