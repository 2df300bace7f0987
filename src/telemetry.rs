//! Metrics: the Prometheus recorder behind the `metrics` facade, the names
//! mailmux records, and what `/metrics` renders.
//!
//! Counters and the latency histogram are recorded where things happen: the
//! relays count attempts, failovers and latency (`mailmux_actors::meters`),
//! the queue's observer counts messages by caller and status, the MCP
//! front-end counts calls and refusals, and the HTTP transport its
//! refusals, open connections and evicted sessions. Gauges (the queue by
//! state, its oldest message, each relay's state and connections, the MCP
//! sessions open) are read from the queue, the dispatcher and rmcp's session
//! map at each scrape, so they cost nothing between scrapes.
//!
//! Labels stay low-cardinality: relay, state, status, class, caller, tool,
//! outcome and code are all names from the configuration or fixed sets;
//! never an address, a subject or a message id.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use mailmux_actors::meters::{ATTEMPTS, DELIVERY_SECONDS, FAILOVERS};
use mailmux_actors::queue::{Event, Observer, Queue, State, now_millis};
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Messages by caller and status: `accepted` and `held` as they are stored,
/// then `approved`, and each final status.
pub const MESSAGES: &str = "mailmux_messages_total";
/// Calls refused before anything was stored, by caller and error code
/// (`invalid_input`, `policy_denied`, `rate_limited`, …).
pub const REFUSED: &str = "mailmux_refused_total";
/// Messages a content check refused or held, by caller, check and action.
pub const CONTENT_CHECKS: &str = "mailmux_content_checks_total";
/// MCP tool calls, by tool and outcome (`ok`, `error`, `protocol_error`).
pub const CALLS: &str = "mailmux_mcp_calls_total";
/// Messages in the queue, by state.
pub const QUEUE_MESSAGES: &str = "mailmux_queue_messages";
/// Age of the oldest message waiting for a relay (`queued`); 0 when none.
pub const QUEUE_OLDEST: &str = "mailmux_queue_oldest_age_seconds";
/// Messages handed to the actors and not yet finished.
pub const IN_FLIGHT: &str = "mailmux_in_flight";
/// 1 for each relay's current state, 0 for the others.
pub const RELAY_STATE: &str = "mailmux_relay_state";
/// Open connections of a relay, idle or busy.
pub const RELAY_CONNECTIONS: &str = "mailmux_relay_connections";
/// Messages a relay holds now.
pub const RELAY_IN_FLIGHT: &str = "mailmux_relay_in_flight";
/// 1 while the queue's store takes writes.
pub const QUEUE_AVAILABLE: &str = "mailmux_queue_available";
/// 1 while delivery is paused by an operator.
pub const DELIVERY_PAUSED: &str = "mailmux_delivery_paused";
/// Bytes free on the SQLite store's file system, where `queue.min_free`
/// applies; under `mailmux_queue_min_free_bytes`, new mail is refused.
pub const QUEUE_FREE: &str = "mailmux_queue_free_bytes";
/// `queue.min_free`, where it applies.
pub const QUEUE_MIN_FREE: &str = "mailmux_queue_min_free_bytes";
/// Copies in the Sent folder, by relay and outcome (`copied`, `failed`).
pub const SENT_COPIES: &str = "mailmux_sent_copies_total";
/// Copies for the Sent folder handed to the copiers, not yet filed or failed.
pub const SENT_COPIES_WAITING: &str = "mailmux_sent_copies_waiting";
/// Addresses on the suppression list, as this daemon holds it.
pub const SUPPRESSED: &str = "mailmux_suppressed_addresses";
/// Addresses put on the suppression list by a bounce or complaint report
/// read from a relay's mailbox, by reason (`bounced`, `complained`).
pub const REPORTED: &str = "mailmux_suppressed_by_report_total";
/// Bounce and complaint reports noted on messages, by caller and reason
/// (`bounced`, `complained`): against `sent`, the rates mailbox providers
/// judge a sender by.
pub const REPORTS: &str = "mailmux_reports_total";
/// HTTP requests refused by the transport's checks and bounds before any
/// tool ran, by status (400 a body cut off, 401 token, 403 Host or Origin,
/// 408 a body too slow, 413 too large, 429 a caller's bound, 503 the
/// daemon's).
pub const HTTP_REFUSED: &str = "mailmux_http_refused_total";
/// Peer addresses refused now for failing authentication past
/// `http.auth_failures`, read at each scrape.
pub const HTTP_REFUSED_ADDRESSES: &str = "mailmux_http_refused_addresses";
/// HTTP connections open now (`http.max_connections` at most).
pub const HTTP_CONNECTIONS: &str = "mailmux_http_connections";
/// MCP sessions open now (stateful HTTP), read at each scrape.
pub const MCP_SESSIONS: &str = "mailmux_mcp_sessions";
/// Sessions closed because their caller opened one past its bound.
pub const MCP_SESSIONS_EVICTED: &str = "mailmux_mcp_sessions_evicted_total";
/// The build: 1, with the version as a label.
pub const BUILD_INFO: &str = "mailmux_build_info";
/// Posts of message events to the `[notify]` webhook, by outcome (`sent`,
/// `failed` after its tries, `dropped` for a full backlog).
pub const NOTIFICATIONS: &str = "mailmux_notifications_total";

/// Upper bounds of the delivery latency buckets, in seconds: a loopback
/// relay answers in milliseconds, a remote provider in a second or more.
pub const DELIVERY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How often the recorder's upkeep runs.
const UPKEEP: Duration = Duration::from_secs(5);

/// Relay states, as the `state` label spells them.
const RELAY_STATES: [&str; 4] = ["healthy", "backing_off", "circuit_open", "disabled"];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls return the same
/// handle) and describes every metric. Call before the actors start, so
/// their handles record into it.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new();
        let builder = match builder
            .set_buckets_for_metric(Matcher::Full(DELIVERY_SECONDS.into()), &DELIVERY_BUCKETS)
        {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: the latency buckets were refused; it is a summary");
                PrometheusBuilder::new()
            }
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("metrics: another recorder is installed; /metrics stays empty");
        }
        describe();
        metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        handle
    })
}

/// The final statuses a message's counter is shown at 0 from the start.
const FINAL: [&str; 5] = ["sent", "partial", "failed", "unknown", "expired"];

/// Shows at 0, from the start, each counter an alert reads with
/// `increase()` (`config/alerts.yml`) for every name the configuration
/// knows: a counter that first appears at 1 has no earlier sample, so
/// Prometheus would see no increase in its first event. The messages of
/// each caller by final status, its policy refusals and content checks,
/// the HTTP transport's 401s, and each Sent copy's outcomes. Called at start
/// and after each reload (a new caller or check); names that went away
/// keep their series until the process ends.
pub fn zeroes(config: &crate::config::Config) {
    let safety = &config.safety;
    // Each caller's name and policy; `default` has the default policy.
    let mut callers: Vec<(&str, &crate::policy::Policy)> = safety
        .callers
        .iter()
        .chain([&safety.stdio])
        .map(|c| (c.name.as_str(), &c.policy))
        .collect();
    if config.daemon.http.token.is_some() || safety.callers.is_empty() {
        callers.push((crate::policy::DEFAULT_CALLER, &safety.policy));
    }
    for (name, policy) in callers {
        for status in FINAL {
            metrics::counter!(MESSAGES, "caller" => name.to_owned(), "status" => status)
                .increment(0);
        }
        metrics::counter!(REFUSED, "caller" => name.to_owned(), "code" => "policy_denied")
            .increment(0);
        for reason in crate::bounces::REASONS {
            metrics::counter!(REPORTS, "caller" => name.to_owned(), "reason" => reason)
                .increment(0);
        }
        for check in policy.content_checks.checks() {
            metrics::counter!(
                CONTENT_CHECKS,
                "caller" => name.to_owned(),
                "check" => check.name.clone(),
                "action" => check.action.as_str()
            )
            .increment(0);
        }
    }
    metrics::counter!(HTTP_REFUSED, "status" => "401").increment(0);
    for (relay, _) in &config.sent_copies {
        for outcome in ["copied", "failed"] {
            metrics::counter!(SENT_COPIES, "relay" => relay.clone(), "outcome" => outcome)
                .increment(0);
        }
    }
}

/// Runs the recorder's upkeep (it drains histogram buffers) for as long as
/// the runtime lives.
pub fn spawn_upkeep(handle: &'static PrometheusHandle) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
}

fn describe() {
    describe_counter!(
        MESSAGES,
        "Messages by caller and status: accepted and held as stored, then approved and each final status."
    );
    describe_counter!(
        REFUSED,
        "Calls refused before anything was stored, by caller and error code."
    );
    describe_counter!(CALLS, "MCP tool calls, by tool and outcome.");
    describe_counter!(ATTEMPTS, "Delivery attempts, by relay and class.");
    describe_counter!(
        FAILOVERS,
        "Messages a relay could not take that went on to another relay."
    );
    describe_histogram!(
        DELIVERY_SECONDS,
        Unit::Seconds,
        "Time from handing a message to a relay to its final reply, of delivered messages."
    );
    describe_gauge!(QUEUE_MESSAGES, "Messages in the queue, by state.");
    describe_gauge!(
        QUEUE_OLDEST,
        Unit::Seconds,
        "Age of the oldest message waiting for a relay; 0 when none waits."
    );
    describe_gauge!(QUEUE_AVAILABLE, "1 while the queue's store takes writes.");
    describe_gauge!(
        DELIVERY_PAUSED,
        "1 while delivery is paused by an operator: mail is queued, none is handed to a relay."
    );
    describe_gauge!(
        QUEUE_FREE,
        Unit::Bytes,
        "Bytes free on the SQLite store's file system; new mail is refused under queue.min_free."
    );
    describe_gauge!(QUEUE_MIN_FREE, Unit::Bytes, "queue.min_free.");
    describe_gauge!(
        IN_FLIGHT,
        "Messages handed to the relays and not yet finished."
    );
    describe_gauge!(
        RELAY_STATE,
        "1 for each relay's current state, 0 for the others."
    );
    describe_gauge!(
        RELAY_CONNECTIONS,
        "Open connections of a relay, idle or busy."
    );
    describe_gauge!(RELAY_IN_FLIGHT, "Messages a relay holds now.");
    describe_gauge!(BUILD_INFO, "1, with the version as a label.");
    describe_counter!(
        HTTP_REFUSED,
        "HTTP requests refused by the transport's checks and bounds before any tool ran, by status."
    );
    describe_gauge!(
        HTTP_REFUSED_ADDRESSES,
        "Peer addresses refused now (429) for failing authentication past http.auth_failures, read at each scrape."
    );
    describe_gauge!(HTTP_CONNECTIONS, "HTTP connections open now.");
    describe_gauge!(
        MCP_SESSIONS,
        "MCP sessions open now (stateful HTTP), read at each scrape."
    );
    describe_counter!(
        MCP_SESSIONS_EVICTED,
        "MCP sessions closed because their caller opened one past its bound."
    );
    describe_counter!(
        SENT_COPIES,
        "Copies in the Sent folder over IMAP, by relay and outcome (copied, failed)."
    );
    describe_gauge!(
        SENT_COPIES_WAITING,
        "Copies for the Sent folder handed to the copiers and not yet filed or failed."
    );
    describe_gauge!(
        SUPPRESSED,
        "Addresses on the suppression list, as this daemon holds it, read at each scrape."
    );
    describe_counter!(
        NOTIFICATIONS,
        "Message events posted to the [notify] webhook, by outcome (sent, failed, dropped)."
    );
    describe_counter!(
        REPORTS,
        "Bounce and complaint reports read over IMAP and noted on the messages they name, by caller and reason (bounced, complained)."
    );
    describe_counter!(
        REPORTED,
        "Addresses put on the suppression list by a bounce or complaint report read over IMAP, by reason (bounced, complained)."
    );
}

/// Reads the gauges from the queue and the dispatcher, then renders every
/// metric as Prometheus text.
pub async fn scrape(queue: &Queue) -> String {
    let handle = install();
    let available = queue.available();
    if let Some((free, min)) = queue.room() {
        metrics::gauge!(QUEUE_FREE).set(free as f64);
        metrics::gauge!(QUEUE_MIN_FREE).set(min as f64);
    }
    metrics::gauge!(DELIVERY_PAUSED).set(if queue.paused().is_some() { 1.0 } else { 0.0 });
    match queue.stats().await {
        Ok(stats) => {
            for st in State::ALL {
                let n = stats
                    .counts
                    .iter()
                    .find(|(s, _)| *s == st)
                    .map_or(0, |(_, n)| *n);
                metrics::gauge!(QUEUE_MESSAGES, "state" => st.as_str()).set(n as f64);
            }
            let oldest = stats
                .oldest_queued_at
                .map_or(0.0, |t| (now_millis() - t).max(0) as f64 / 1000.0);
            metrics::gauge!(QUEUE_OLDEST).set(oldest);
            metrics::gauge!(QUEUE_AVAILABLE).set(if available { 1.0 } else { 0.0 });
        }
        Err(_) => metrics::gauge!(QUEUE_AVAILABLE).set(0.0),
    }
    if let Ok(snapshot) = queue.dispatcher().status().await {
        metrics::gauge!(IN_FLIGHT).set(snapshot.in_flight as f64);
        for r in &snapshot.relays {
            let now = r.state.as_str();
            for state in RELAY_STATES {
                let on = if state == now { 1.0 } else { 0.0 };
                metrics::gauge!(RELAY_STATE, "relay" => r.name.clone(), "state" => state).set(on);
            }
            metrics::gauge!(RELAY_CONNECTIONS, "relay" => r.name.clone()).set(r.connections as f64);
            metrics::gauge!(RELAY_IN_FLIGHT, "relay" => r.name.clone()).set(r.in_flight as f64);
        }
    }
    handle.render()
}

/// A refused call, by caller and error code.
/// A content check that decided on a message: `reject` or `hold`.
pub fn content_check(caller: &str, check: &str, action: &'static str) {
    metrics::counter!(
        CONTENT_CHECKS,
        "caller" => caller.to_owned(),
        "check" => check.to_owned(),
        "action" => action
    )
    .increment(1);
}

pub fn refused(caller: &str, code: &str) {
    metrics::counter!(REFUSED, "caller" => caller.to_owned(), "code" => code.to_owned())
        .increment(1);
}

/// One MCP tool call and how it ended. `tool` is a tool's name, or
/// `unknown` for a name no tool has.
pub fn call(tool: String, outcome: &'static str) {
    metrics::counter!(CALLS, "tool" => tool, "outcome" => outcome).increment(1);
}

/// Counts the queue's changes of each message, by caller and status. The
/// handles are kept by caller, then status, so that counting one costs a
/// read lock and an atomic add, not a key built per message.
#[derive(Debug, Default)]
pub struct MessageMeter {
    handles: std::sync::RwLock<HashMap<String, HashMap<&'static str, metrics::Counter>>>,
}

impl Observer for MessageMeter {
    fn event(&self, e: &Event<'_>) {
        let caller = e.caller.unwrap_or("-");
        // A report tells of a message already counted by its outcome.
        if e.action.is_report() {
            metrics::counter!(REPORTS, "caller" => caller.to_owned(), "reason" => e.action.as_str())
                .increment(1);
            return;
        }
        let status = e.action.as_str();
        if let Ok(handles) = self.handles.read()
            && let Some(c) = handles.get(caller).and_then(|m| m.get(status))
        {
            c.increment(1);
            return;
        }
        let c = metrics::counter!(MESSAGES, "caller" => caller.to_owned(), "status" => status);
        c.increment(1);
        if let Ok(mut handles) = self.handles.write() {
            handles
                .entry(caller.to_owned())
                .or_default()
                .insert(status, c);
        }
    }
}
