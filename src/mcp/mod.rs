//! The MCP front-end: one handler type, [`MailmuxServer`], serves stdio and
//! streamable HTTP, and [`run`] ties it to the actors and to shutdown.
//!
//! Only this module knows rmcp. It turns tool calls into dispatcher calls and
//! never talks SMTP itself.

pub mod approval;
pub mod cancel;
pub mod http;
pub mod lines;
pub mod lockout;
pub mod resources;
pub mod schema;
pub mod stateless;
pub mod tasks;
pub mod tls;
pub mod tools;
pub mod transport;
pub mod types;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use mailmux_actors::queue::{self, Queue, StoreError};
use mailmux_actors::{ControlError, Dispatcher, RelayKind};
use rmcp::handler::server::router::tool::ToolRouter;

use crate::audit::Audit;
use crate::config::{Config, Sources};
use crate::policy::Gate;

/// The MCP handler. Cheap to clone: every clone shares one state, so the HTTP
/// transport can hand a clone to each session.
#[derive(Clone)]
pub struct MailmuxServer {
    state: Arc<State>,
    /// Shared, not copied: the HTTP transport clones the server for every
    /// stateless request.
    tool_router: Arc<ToolRouter<MailmuxServer>>,
}

struct State {
    queue: Queue,
    /// Swapped whole by a reload; readers clone the `Arc` and never hold the
    /// lock across an await.
    config: RwLock<Arc<Config>>,
    sources: Sources,
    started: Instant,
    /// Set when shutdown begins: new tool calls are refused from then on.
    closing: AtomicBool,
    /// Reloads run one at a time, so that two cannot interleave their diffs.
    reload: tokio::sync::Mutex<()>,
    /// `send_email` calls in progress, bounded by `max_concurrent_calls`.
    calls: Arc<transport::CallGate>,
    /// Clients subscribed to message resources.
    subscriptions: resources::Subscriptions,
    /// Calls their clients may cancel (`notifications/cancelled`).
    cancellable: cancel::Calls,
    /// Callers and operators by token, with their policies and rate
    /// buckets; rebuilt with the configuration.
    gate: RwLock<Arc<Gate>>,
    audit: Arc<Audit>,
    /// Failed authentications per peer address, shared by every HTTP
    /// listener (`http.auth_failures`, as the daemon started).
    lockout: Option<Arc<lockout::Lockout>>,
    /// The web console's sessions and chart samples.
    console: crate::console::Console,
    /// The HTTP address served, when it is beyond loopback: a reload may
    /// not drop every bearer token then.
    exposed: std::sync::OnceLock<SocketAddr>,
    /// The configuration the daemon started with: what a reload cannot
    /// change is still in force as it says.
    initial: Arc<Config>,
    /// The addresses no mail is accepted for.
    suppressions: Arc<crate::suppress::Suppressions>,
    /// What the queue asks of a message's caller before each round.
    rounds: Arc<crate::policy::rounds::Rounds>,
    /// `[notify]`'s poster, which a reload reconfigures.
    notifier: Arc<crate::notify::Notifier>,
    /// What the readers of bounce and complaint reports did.
    bounces: crate::bounces::Status,
}

impl std::fmt::Debug for MailmuxServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailmuxServer")
            .field("sources", &self.state.sources)
            .field("closing", &self.is_closing())
            .finish_non_exhaustive()
    }
}

impl MailmuxServer {
    /// A handler over an opened queue (and its dispatcher), which it runs
    /// once its observers are attached ([`Queue::run`]), so that they are
    /// told of every round. `sources` are read again by
    /// `reload_smtp_configuration`.
    pub async fn new(queue: Queue, config: Config, sources: Sources) -> Self {
        let calls = transport::CallGate::new(config.daemon.max_concurrent_calls);
        let http_token = config.daemon.http.token.as_ref().map(|t| t.expose());
        let gate = Arc::new(Gate::new(&config.safety, http_token, None));
        let audit = Arc::new(Audit::open(config.safety.audit.clone()).unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot open the audit log; audit lines are lost until SIGHUP reopens it");
            Audit::unopened(config.safety.audit.clone())
        }));
        let mut observers: Vec<Arc<dyn queue::Observer>> =
            vec![Arc::new(crate::telemetry::MessageMeter::default())];
        if audit.enabled() {
            observers.push(audit.clone());
        }
        let notifier = crate::notify::Notifier::start(config.notify.clone());
        observers.push(notifier.clone());
        // Started even with no relay filing copies: a copy a crash left
        // pending for a relay that no longer files one is recorded failed.
        observers
            .push(crate::sent_copy::SentCopies::start(queue.clone(), &config.sent_copies).await);
        let suppressions = crate::suppress::Suppressions::start(
            queue.clone(),
            config.queue.suppress_bounces,
            audit.clone(),
        )
        .await;
        observers.push(suppressions.clone());
        let rounds = crate::policy::rounds::Rounds::new(suppressions.clone(), &gate);
        queue.screen(rounds.clone());
        queue.run(Some(Arc::new(observers)));
        for name in gate.open_recipients() {
            tracing::warn!(caller = %name, "caller may mail any recipient: allowed_recipients is empty");
        }
        let (largest, request) = (
            config.daemon.compose.max_message_bytes,
            config.daemon.http.body_limit,
        );
        if largest > request {
            tracing::warn!(
                max_message_bytes = largest,
                http.body_limit = request,
                "max_message_bytes is above http.body_limit: a call carrying a message that large \
                 is refused over HTTP (413) and dropped unread over stdio"
            );
        }
        let lockout = config
            .daemon
            .http
            .auth_failures
            .as_ref()
            .map(|rule| Arc::new(lockout::Lockout::new(rule)));
        let bounces = crate::bounces::Status::new(&config.bounce_readers);
        MailmuxServer {
            state: Arc::new(State {
                queue,
                initial: Arc::new(config.clone()),
                config: RwLock::new(Arc::new(config)),
                sources,
                started: Instant::now(),
                closing: AtomicBool::new(false),
                reload: tokio::sync::Mutex::new(()),
                calls,
                subscriptions: resources::Subscriptions::default(),
                cancellable: cancel::Calls::default(),
                gate: RwLock::new(gate),
                audit,
                lockout,
                console: crate::console::Console::default(),
                exposed: std::sync::OnceLock::new(),
                bounces,
                suppressions,
                rounds,
                notifier,
            }),
            tool_router: Arc::new(standard_schemas(Self::tool_router())),
        }
    }

    /// The calls running now that their clients may cancel.
    pub fn cancellable(&self) -> &cancel::Calls {
        &self.state.cancellable
    }

    /// The count of `send_email` calls in progress.
    pub fn call_gate(&self) -> Arc<transport::CallGate> {
        self.state.calls.clone()
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        self.state.queue.dispatcher()
    }

    pub fn queue(&self) -> &Queue {
        &self.state.queue
    }

    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        match self.state.config.read() {
            Ok(c) => Arc::clone(&c),
            // A panic while swapping cannot leave a half-written `Arc`.
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Callers and operators in force now.
    pub fn gate(&self) -> Arc<Gate> {
        match self.state.gate.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// The count of failed authentications per peer address, unless
    /// `http.auth_failures` is off.
    pub fn lockout(&self) -> Option<&Arc<lockout::Lockout>> {
        self.state.lockout.as_ref()
    }

    pub fn audit(&self) -> &Arc<Audit> {
        &self.state.audit
    }

    pub fn console(&self) -> &crate::console::Console {
        &self.state.console
    }

    /// The suppression list as this daemon holds it.
    pub fn suppressions(&self) -> &crate::suppress::Suppressions {
        &self.state.suppressions
    }

    /// Pauses delivery for every daemon on the store as `by` (an
    /// operator), and audits it when this call paused it: the pause in
    /// force and whether this call paused it.
    pub async fn pause_delivery(
        &self,
        by: &str,
        reason: Option<String>,
    ) -> Result<(mailmux_actors::queue::Paused, bool), mailmux_actors::queue::QueueError> {
        let (pause, changed) = self.queue().pause(by, reason).await?;
        if changed {
            self.audit().delivery("paused", by, pause.reason.as_deref());
            self.state
                .notifier
                .delivery("paused", by, pause.reason.as_deref());
        }
        Ok((pause, changed))
    }

    /// Resumes delivery as `by`, and audits it; whether it was paused.
    pub async fn resume_delivery(
        &self,
        by: &str,
    ) -> Result<bool, mailmux_actors::queue::QueueError> {
        let changed = self.queue().resume().await?;
        if changed {
            self.audit().delivery("resumed", by, None);
            self.state.notifier.delivery("resumed", by, None);
        }
        Ok(changed)
    }

    /// Records that HTTP is served on `addr`, beyond loopback.
    pub(crate) fn expose(&self, addr: SocketAddr) {
        let _ = self.state.exposed.set(addr);
    }

    fn set_config(&self, config: Config) {
        let http_token = config.daemon.http.token.as_ref().map(|t| t.expose());
        let gate = Arc::new(Gate::new(&config.safety, http_token, Some(&self.gate())));
        self.state.rounds.set(&gate);
        match self.state.gate.write() {
            Ok(mut g) => *g = gate,
            Err(poisoned) => *poisoned.into_inner() = gate,
        }
        let new = Arc::new(config);
        match self.state.config.write() {
            Ok(mut c) => *c = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }

    /// Refuse new tool calls from now on (they get an `unavailable` error).
    pub fn begin_shutdown(&self) {
        self.state.closing.store(true, Ordering::SeqCst);
    }

    pub fn is_closing(&self) -> bool {
        self.state.closing.load(Ordering::SeqCst)
    }

    /// Names of the configured relays, in configuration order.
    pub fn relay_names(&self) -> Vec<String> {
        self.config()
            .dispatch
            .relays
            .iter()
            .map(|r| r.name.clone())
            .collect()
    }
}

/// The tools with schemas that use only standard JSON Schema formats.
fn standard_schemas(mut router: ToolRouter<MailmuxServer>) -> ToolRouter<MailmuxServer> {
    for route in router.map.values_mut() {
        schema::standardize(Arc::make_mut(&mut route.attr.input_schema));
        if let Some(out) = route.attr.output_schema.as_mut() {
            schema::standardize(Arc::make_mut(out));
        }
    }
    router
}

/// The loud notice for the embedded file relay, if it is in use.
pub fn default_relay_warning(config: &Config) -> Option<String> {
    if !config.default_relay {
        return None;
    }
    let dir = config
        .dispatch
        .relays
        .iter()
        .find_map(|r| match &r.kind {
            RelayKind::File { dir } => Some(dir.display().to_string()),
            RelayKind::Smtp(_) => None,
        })
        .unwrap_or_else(|| "a local folder".into());
    Some(format!(
        "no SMTP relay is configured: mail is written as .eml files to {dir} and nothing is delivered"
    ))
}

/// Which transport [`run`] serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// MCP over stdin and stdout; ends at the end of stdin.
    Stdio,
    /// Streamable HTTP at `/mcp`, plus `/health`.
    Http { bind: SocketAddr, stateful: bool },
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start the relays")]
    Start(#[source] ControlError),
    #[error("cannot open the queue")]
    Queue(#[source] StoreError),
    #[error("cannot bind {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("transport failed")]
    Transport(#[source] std::io::Error),
    #[error("cannot open the audit log (audit.path)")]
    Audit(#[source] std::io::Error),
    #[error(
        "refusing to serve MCP on {addr} without a bearer token: anyone who can reach it could \
         send mail through the relays. Set http.token (MAILMUX_HTTP_TOKEN) or tokens for \
         [[callers]], or bind to loopback behind a proxy"
    )]
    Anonymous { addr: SocketAddr },
}

/// Whether `config` lets an HTTP request in without a bearer token: no
/// `http.token` and no caller with a token. Only loopback is served so.
pub(crate) fn anonymous_http(config: &Config) -> bool {
    config.daemon.http.token.is_none() && config.safety.callers.iter().all(|c| c.token.is_none())
}

/// Refuses to serve HTTP beyond loopback without a bearer token. The Host
/// check stops DNS rebinding, not a client that names a loopback host
/// itself: there, only a token keeps strangers from sending mail.
pub(crate) fn refuse_anonymous(bind: SocketAddr, config: &Config) -> Result<(), RunError> {
    if !bind.ip().is_loopback() && anonymous_http(config) {
        return Err(RunError::Anonymous { addr: bind });
    }
    Ok(())
}

/// Runs the daemon until `shutdown` resolves (or, under stdio, stdin ends).
///
/// Shutdown order: refuse new calls, let deliveries in flight finish within
/// `daemon.shutdown_grace` while the transport still carries their answers,
/// stop the actors, then close the transport.
pub async fn run(
    config: Config,
    sources: Sources,
    transport: Transport,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    if let Some(warning) = default_relay_warning(&config) {
        tracing::warn!("{warning}");
    }
    // A configured audit log that cannot be opened stops the start.
    if config.safety.audit.path.is_some() {
        Audit::open(config.safety.audit.clone()).map_err(RunError::Audit)?;
    }
    // Before anything starts delivering.
    if let Transport::Http { bind, .. } = &transport {
        refuse_anonymous(*bind, &config)?;
    }
    // Before the actors start, so that their handles record into it.
    crate::telemetry::spawn_upkeep(crate::telemetry::install());
    crate::telemetry::zeroes(&config);
    // The service manager's watchdog is pinged while the store recovers.
    let watch = crate::service::Watch::start();
    let queue = start_queue(&config).await?;
    tracing::info!(
        relays = config.dispatch.relays.len(),
        strategy = config.dispatch.router.strategy.as_str(),
        queue = queue.store_kind(),
        sources = ?config.sources,
        "mailmux started"
    );
    let metrics_bind = config.daemon.metrics.bind;
    let server = MailmuxServer::new(queue, config, sources).await;
    // Read while the daemon serves; they stop when this is dropped.
    let _reports = crate::bounces::start(
        server.queue().clone(),
        &server.state.suppressions,
        &server.config().bounce_readers,
        &server.state.bounces,
    );
    on_hangup(server.clone());
    watch.serve(&server);
    let audit = server.audit().clone();
    crate::audit::spawn_sync(audit.clone());
    if let Some(bind) = metrics_bind {
        http::serve_metrics(&server, bind).await?;
    }
    let served = match transport {
        Transport::Stdio => transport::serve_stdio(server, shutdown).await,
        Transport::Http { bind, stateful } => http::serve(server, bind, stateful, shutdown).await,
    };
    // The last lines, made durable before the process exits.
    let _ = tokio::task::spawn_blocking(move || audit.sync()).await;
    served
}

/// SIGHUP's listener, taken as soon as the daemon's runtime runs: listening
/// replaces the signal's default action (exit) at once, so that a
/// `systemctl reload` while the daemon starts (a long recovery of its
/// store) is kept for [`on_hangup`] instead of killing the daemon.
#[cfg(unix)]
static HANGUPS: std::sync::Mutex<Option<tokio::signal::unix::Signal>> = std::sync::Mutex::new(None);

/// Starts listening for SIGHUP; [`run`] acts on what arrived since.
pub fn listen_for_hangups() {
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hup) => *HANGUPS.lock().unwrap_or_else(|e| e.into_inner()) = Some(hup),
        Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP"),
    }
}

/// On each SIGHUP, reopens the audit log (log rotation) and reloads the
/// configuration, as `reload_smtp_configuration` does: `systemctl reload`.
fn on_hangup(server: MailmuxServer) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let early = HANGUPS.lock().unwrap_or_else(|e| e.into_inner()).take();
        match early.map_or_else(|| signal(SignalKind::hangup()), Ok) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        crate::service::reloading();
                        server.audit().reopen();
                        tracing::info!("SIGHUP received: reloading the configuration");
                        // A reload that applies logs what it changed.
                        if let Err(e) = server.reload().await {
                            tracing::error!(code = %e.code, "configuration not reloaded: {}", e.message);
                        }
                        crate::service::reloaded();
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP"),
        }
    }
    #[cfg(not(unix))]
    let _ = server;
}

/// Opens the configured store (a start-up error names its path), starts the
/// actors, then opens the queue over both; [`MailmuxServer::new`] runs it.
pub async fn start_queue(config: &Config) -> Result<Queue, RunError> {
    let store = queue::open(&config.queue.store)
        .await
        .map_err(RunError::Queue)?;
    let dispatcher = Dispatcher::start(config.dispatch.clone())
        .await
        .map_err(RunError::Start)?;
    Queue::open(
        store,
        dispatcher,
        config.queue.clone(),
        config.dispatch.limits.max_in_flight,
    )
    .await
    .map_err(RunError::Queue)
}

/// A hand-off queue over the store that running daemons own (SQLite or
/// PostgreSQL): messages are stored for a daemon to deliver (`mailmux send
/// --no-wait`).
pub async fn start_handoff(config: &Config) -> Result<Queue, RunError> {
    let store: std::sync::Arc<dyn queue::Store> = match &config.queue.store {
        queue::StoreKind::Sqlite { path } => std::sync::Arc::new(
            queue::sqlite::SqliteStore::open_shared(path).map_err(RunError::Queue)?,
        ),
        queue::StoreKind::Postgres(s) => std::sync::Arc::new(
            queue::postgres::PgStore::open_shared(s)
                .await
                .map_err(RunError::Queue)?,
        ),
        queue::StoreKind::Memory => {
            return Err(RunError::Queue(StoreError::Unavailable(
                "the memory store cannot be shared with a running daemon".into(),
            )));
        }
    };
    let dispatcher = Dispatcher::start(config.dispatch.clone())
        .await
        .map_err(RunError::Start)?;
    Queue::handoff(store, dispatcher, config.queue.clone())
        .await
        .map_err(RunError::Queue)
}

/// Refuses new calls and drains the queue; logs what it found.
pub async fn drain(server: &MailmuxServer) {
    crate::service::stopping();
    server.begin_shutdown();
    let grace = server.config().daemon.shutdown_grace;
    tracing::info!(grace = ?grace, "shutting down: no new calls, waiting for deliveries in flight");
    let report = server.queue().shutdown(grace).await;
    if report.abandoned > 0 {
        tracing::warn!(
            in_flight = report.in_flight_at_start,
            abandoned = report.abandoned,
            "shutdown grace ran out with deliveries unfinished"
        );
    } else {
        tracing::info!(
            in_flight = report.in_flight_at_start,
            abandoned = 0,
            "all deliveries finished"
        );
    }
}
