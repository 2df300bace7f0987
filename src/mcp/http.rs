//! The streamable HTTP transport: `/mcp` (rmcp's service), `/health`,
//! `/metrics`, the operators' `/admin/` routes and the console
//! (`crate::console`) inside axum, behind Host, Origin, bearer-token and
//! body-size checks.
//!
//! `/health` passes the Host and Origin checks but needs no token: it shows
//! only relay names and states and the queue's counts, never a secret or an
//! address, so probes can reach it. It answers 503 while no relay is healthy
//! or the queue store refuses writes.
//!
//! `/metrics` takes no caller token: with `metrics.token` set it needs that
//! one, and without it only loopback peers may read it. A daemon serving
//! stdio can serve it on a listener of its own (`metrics.bind`).
//!
//! A client has `http.read_timeout` to send a request's header (which also
//! closes a connection left idle that long) and as long again for its
//! body, which is read whole once the request has its call permit: a client
//! that stalls is answered 408 and its permit goes back, so clients that
//! never finish their requests cannot hold the calls of every other. A
//! JSON body that is not one JSON-RPC message is answered 400 with
//! JSON-RPC's parse error or invalid request, not rmcp's 415. At
//! most `http.max_connections` are open at once, and in stateful mode at
//! most `http.max_sessions` sessions, `http.max_sessions_per_caller` a
//! caller (one more closes the caller's least recently used, even when the
//! server holds its most).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use http_body_util::BodyExt;
use mailmux_actors::RelayState;
use mailmux_actors::queue::{Decided, Decision, Filter};
use rmcp::transport::streamable_http_server::SessionManager as _;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::tls::Handshakes;
use super::types::MessageStatusResult;
use super::{MailmuxServer, RunError, drain};
use crate::config::HttpSettings;
use crate::policy::Caller;

/// Host names always allowed, with any port: the server is meant for loopback.
const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

/// How long open connections get to finish after the sessions are closed.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The request checks, in the order they run.
#[derive(Debug, Clone)]
pub struct Guard {
    allowed_hosts: Vec<String>,
    allowed_origins: Vec<String>,
    body_limit: usize,
    /// The callers and operators by token (the server's, as reloaded).
    server: Option<MailmuxServer>,
    /// Failed authentications per peer address (the server's).
    lockout: Option<Arc<super::lockout::Lockout>>,
}

impl Guard {
    pub fn new(http: &HttpSettings, server: &MailmuxServer) -> Self {
        Guard {
            allowed_hosts: http
                .allowed_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            allowed_origins: http
                .allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            body_limit: http.body_limit,
            server: Some(server.clone()),
            lockout: server.lockout().cloned(),
        }
    }

    fn host_allowed(&self, authority: &str) -> bool {
        let authority = authority.to_ascii_lowercase();
        let host = host_part(&authority);
        LOOPBACK_HOSTS.contains(&host)
            || self
                .allowed_hosts
                .iter()
                .any(|a| a == &authority || a == host)
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if self.allowed_origins.contains(&origin) {
            return true;
        }
        let rest = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        rest.is_some_and(|authority| LOOPBACK_HOSTS.contains(&host_part(authority)))
    }

    /// The caller the request's bearer token names (every token is
    /// compared in constant time); `None` when it names none.
    fn caller(&self, headers: &HeaderMap) -> Option<Arc<Caller>> {
        self.server.as_ref()?.gate().http_caller(bearer(headers))
    }

    /// The operator the request's bearer token names.
    fn operator(&self, headers: &HeaderMap) -> Option<String> {
        self.server.as_ref()?.gate().operator(bearer(headers))
    }
}

/// The token of `Authorization: Bearer …`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
}

/// `host` of `host[:port]`, keeping IPv6 brackets.
fn host_part(authority: &str) -> &str {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => &authority[..=end],
            None => authority,
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// A request refused by the checks or the bounds, before any tool ran:
/// counted by status for `/metrics`, then answered as [`reject`] does.
pub(super) fn refuse(status: StatusCode, message: &str) -> Response {
    metrics::counter!(crate::telemetry::HTTP_REFUSED, "status" => status.as_u16().to_string())
        .increment(1);
    reject(status, message)
}

pub(super) fn reject(status: StatusCode, message: &str) -> Response {
    let mut resp = (status, axum::Json(json!({ "error": message }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    resp
}

/// The console's paths: it checks its own sessions.
fn is_console(path: &str) -> bool {
    path == "/console" || path.starts_with("/console/")
}

/// The request checks ([`checked`]), with the count of failed
/// authentications: an address that failed too often is refused (429)
/// before any check, on every path but `/health`, and a 401 from the
/// checks or a handler (a wrong metrics token, a console sign-in) counts
/// against its address, as does an unsubscribe link the secret did not
/// make (its token is its authority: a 404 there is a wrong token).
async fn check(State(guard): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let counted = guard.lockout.as_deref().zip(
        req.extensions()
            .get::<axum::extract::ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip()),
    );
    let Some((lockout, peer)) = counted.filter(|_| req.uri().path() != "/health") else {
        return checked(&guard, req, next).await;
    };
    if let Some(wait) = lockout.refused(peer) {
        return refused_for(wait);
    }
    let link = req.uri().path().starts_with("/unsubscribe/");
    let resp = checked(&guard, req, next).await;
    if resp.status() == StatusCode::UNAUTHORIZED || (link && resp.status() == StatusCode::NOT_FOUND)
    {
        lockout.failed(peer);
    }
    resp
}

/// 429 to an address that failed authentication too often, with the whole
/// seconds until one failure refills.
fn refused_for(wait: Duration) -> Response {
    let mut resp = refuse(
        StatusCode::TOO_MANY_REQUESTS,
        "too many failed authentications from this address; try again later",
    );
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from(secs.max(1)));
    resp
}

async fn checked(guard: &Guard, mut req: Request, next: Next) -> Response {
    // The one-click unsubscribe links: mailbox providers and recipients'
    // browsers reach them by the public name, from pages of their own, with
    // no token. The signed token in the path is all the authority they
    // carry, and all they can do is list its one address.
    if req
        .uri()
        .path()
        .starts_with(crate::suppress::UNSUBSCRIBE_PATH)
    {
        return next.run(req).await;
    }
    let authority = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    if !authority.is_some_and(|a| guard.host_allowed(&a)) {
        tracing::warn!(host = ?req.headers().get(header::HOST), "HTTP request refused: Host not allowed");
        return refuse(StatusCode::FORBIDDEN, "host not allowed");
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let ok = origin.to_str().is_ok_and(|o| guard.origin_allowed(o));
        if !ok {
            tracing::warn!(origin = ?origin, "HTTP request refused: Origin not allowed");
            return refuse(StatusCode::FORBIDDEN, "origin not allowed");
        }
    }
    let path = req.uri().path();
    if path.starts_with("/admin/") {
        // Operators only: a caller's token never opens the admin routes.
        match guard.operator(req.headers()) {
            Some(name) => {
                req.extensions_mut().insert(Operator(name));
            }
            None => return refuse(StatusCode::UNAUTHORIZED, "missing or wrong operator token"),
        }
    } else if path != "/health" && path != "/metrics" && !is_console(path) {
        match guard.caller(req.headers()) {
            Some(caller) => {
                req.extensions_mut().insert(caller);
            }
            None => return refuse(StatusCode::UNAUTHORIZED, "missing or wrong bearer token"),
        }
    }
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    // A body without Content-Length (chunked) is capped as `limit` reads it.
    if length.is_some_and(|l| l > guard.body_limit) {
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    }
    next.run(req).await
}

/// The bounds on the MCP requests handled at once, on the time their
/// bodies take, and on the sessions open.
#[derive(Debug)]
struct Limits {
    /// `max_concurrent_calls`.
    calls: Arc<Semaphore>,
    /// `http.read_timeout`: the time a request's body may take to arrive.
    read_timeout: Duration,
    /// `http.body_limit`: a body without Content-Length is read up to it.
    body_limit: usize,
    /// The `subscriptions/listen` streams open at once ([`MAX_LISTENS`]).
    listens: Arc<Semaphore>,
    /// The streams each caller has open ([`MAX_LISTENS_PER_CALLER`]).
    listening: Arc<std::sync::Mutex<HashMap<Arc<str>, usize>>>,
    /// The MCP sessions open (stateful mode only).
    sessions: Option<Sessions>,
    /// The request ids of each session that are being answered now.
    in_flight: Arc<std::sync::Mutex<HashSet<(String, String)>>>,
    /// The server that answers the usual stateless `send_email` call
    /// itself (`super::stateless`), and the token that ends such calls at
    /// shutdown.
    direct: (MailmuxServer, CancellationToken),
    /// Whether the daemon keeps sessions: then only calls of protocol
    /// 2026-07-28 and later are stateless.
    stateful: bool,
}

/// A request id of a session being answered, until its response ends.
#[derive(Debug)]
struct InFlight {
    set: Arc<std::sync::Mutex<HashSet<(String, String)>>>,
    key: (String, String),
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

/// The id of a JSON-RPC request (a message with a method and an id), as
/// written; `None` for a notification, a response or a body of another
/// shape.
fn request_id(body: &[u8]) -> Option<serde_json::Value> {
    #[derive(serde::Deserialize)]
    struct Head {
        id: Option<serde_json::Value>,
        method: Option<serde::de::IgnoredAny>,
    }
    // serde would read an array's items as the struct's fields.
    if !body.trim_ascii_start().starts_with(b"{") {
        return None;
    }
    let head: Head = serde_json::from_slice(body).ok()?;
    head.method?;
    head.id.filter(|id| !id.is_null())
}

/// Marks `body`'s request id in flight in `session`. A second request
/// with the id of one still being answered in the same session is refused
/// (400, JSON-RPC -32600): rmcp routes a session's answers by request id,
/// and one of the two would never be answered. MCP asks that a client never
/// reuse an id within a session; one that does after its first request
/// was answered is served.
///
/// The `Err` is the JSON-RPC error to answer with.
fn mark_in_flight(
    limits: &Limits,
    session: &str,
    body: &[u8],
) -> Result<Option<InFlight>, serde_json::Value> {
    let Some(id) = request_id(body) else {
        return Ok(None);
    };
    let key = (session.to_owned(), id.to_string());
    let mut set = limits.in_flight.lock().unwrap_or_else(|e| e.into_inner());
    if set.contains(&key) {
        return Err(json!({
            "jsonrpc": "2.0",
            "id": id,
            "error": {
                "code": -32600,
                "message": "invalid request: another request of this session with this id is still being answered; use a new id for each request (MCP)",
            },
        }));
    }
    set.insert(key.clone());
    Ok(Some(InFlight {
        set: limits.in_flight.clone(),
        key,
    }))
}

/// The sessions rmcp holds, and the caller that opened each.
#[derive(Debug)]
struct Sessions {
    open: Arc<LocalSessionManager>,
    owners: std::sync::Mutex<HashMap<Arc<str>, Owner>>,
    /// `http.max_sessions`: past it, a new session is refused (503). rmcp
    /// closes a session after five minutes without a request, or at its
    /// client's DELETE.
    max: usize,
    /// `http.max_sessions_per_caller`, so that one caller cannot take the
    /// sessions of every other. A caller that opens one more loses the one
    /// it used least recently: clients that open a session per task and
    /// never DELETE it (or crash before they can) keep working, and only
    /// the caller's own sessions are ever closed for it.
    per_caller: usize,
}

/// Who opened a session, and when a request last named it.
#[derive(Debug)]
struct Owner {
    caller: Arc<str>,
    used: std::time::Instant,
}

impl Sessions {
    fn new(open: Arc<LocalSessionManager>, http: &HttpSettings) -> Self {
        Sessions {
            open,
            owners: std::sync::Mutex::default(),
            max: http.max_sessions,
            per_caller: http.max_sessions_per_caller,
        }
    }

    /// Makes room for `caller` to open one more session: `Err` is the
    /// refusal. A caller at its bound has its least recently used session
    /// closed, even when every session the server holds is open: the new
    /// one takes its place. Past the server's bound, any other caller is
    /// refused.
    async fn admit(&self, caller: &Arc<str>) -> Result<(), Response> {
        let oldest = {
            let live = self.open.sessions.read().await;
            let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
            // Sessions closed since (idle, or DELETE) are no one's any more.
            owners.retain(|id, _| live.contains_key(id));
            let mine = owners.iter().filter(|(_, o)| o.caller == *caller);
            if mine.clone().count() < self.per_caller {
                if live.len() >= self.max {
                    return Err(refuse(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!(
                            "{} MCP sessions are open, the most the server holds; try again later",
                            self.max
                        ),
                    ));
                }
                return Ok(());
            }
            let oldest = mine.min_by_key(|(_, o)| o.used).map(|(id, _)| id.clone());
            if let Some(id) = &oldest {
                owners.remove(id);
            }
            oldest
        };
        if let Some(id) = oldest {
            metrics::counter!(crate::telemetry::MCP_SESSIONS_EVICTED).increment(1);
            tracing::info!(
                caller = %caller,
                "closing the caller's least recently used MCP session: it has {} open and opens another",
                self.per_caller
            );
            if let Err(e) = self.open.close_session(&id).await {
                tracing::warn!(caller = %caller, "closing an MCP session failed: {e}");
            }
        }
        Ok(())
    }

    /// Records the session `response` opened, if it opened one.
    fn opened(&self, response: &Response, caller: Arc<str>) {
        if let Some(id) = response
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
        {
            let used = std::time::Instant::now();
            let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
            owners.insert(Arc::from(id), Owner { caller, used });
        }
    }

    /// Records that a request named the session `id`.
    fn used(&self, id: &str) {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(owner) = owners.get_mut(id) {
            owner.used = std::time::Instant::now();
        }
    }
}

/// At most this many `subscriptions/listen` streams are open at once; more
/// wait, as calls past their bound do.
const MAX_LISTENS: usize = 256;

/// At most this many of them per caller; one more is refused at once (429),
/// so that one caller cannot take the streams of every other.
const MAX_LISTENS_PER_CALLER: usize = 32;

/// One open stream of a caller, counted until it is dropped.
struct Listening {
    open: Arc<std::sync::Mutex<HashMap<Arc<str>, usize>>>,
    caller: Arc<str>,
}

impl Listening {
    /// Counts a stream for `caller`, unless it has the most it may.
    fn open(limits: &Limits, caller: Arc<str>) -> Option<Listening> {
        let mut open = limits.listening.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(caller.clone()).or_default();
        if *n >= MAX_LISTENS_PER_CALLER {
            return None;
        }
        *n += 1;
        Some(Listening {
            open: limits.listening.clone(),
            caller,
        })
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.caller) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.caller);
            }
        }
    }
}

/// `req` with its body read whole, within `http.read_timeout` (408) and
/// `http.body_limit` (413), and the body.
async fn read_whole(req: Request, limits: &Limits) -> Result<(Request, Bytes), Response> {
    let (parts, body) = req.into_parts();
    let read = axum::body::to_bytes(body, limits.body_limit);
    match tokio::time::timeout(limits.read_timeout, read).await {
        Ok(Ok(bytes)) => Ok((
            Request::from_parts(parts, axum::body::Body::from(bytes.clone())),
            bytes,
        )),
        Ok(Err(e)) if too_large(&e) => Err(refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large",
        )),
        Ok(Err(_)) => Err(refuse(
            StatusCode::BAD_REQUEST,
            "the request body was cut off",
        )),
        Err(_) => {
            tracing::warn!(
                "HTTP request refused: its body did not arrive within http.read_timeout"
            );
            Err(refuse(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive within http.read_timeout",
            ))
        }
    }
}

/// Whether reading a body failed on `http.body_limit`.
fn too_large(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// Whether a request says its body is JSON.
pub(super) fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// The answer to a JSON body that is not one JSON-RPC message. rmcp answers
/// it with 415, as though the media type were wrong; JSON-RPC's answer is a
/// parse error (-32700) for a body that is not JSON, and an invalid request
/// (-32600) for JSON of another shape, both without an id. The status is
/// 400, as MCP's streamable HTTP asks. serde's syntax errors name a place,
/// never a value of the body.
fn not_json_rpc(body: &[u8]) -> Response {
    let (code, message) = match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
        Err(e) => (-32700, format!("parse error: the body is not JSON: {e}")),
        Ok(_) if body.trim_ascii_start().starts_with(b"[") => (
            -32600,
            "invalid request: a batch (an array) of JSON-RPC messages is not taken; send one message a request".to_owned(),
        ),
        Ok(_) => (
            -32600,
            "invalid request: the body is not a JSON-RPC request, notification or response".to_owned(),
        ),
    };
    let body = json!({
        "jsonrpc": "2.0",
        "id": null,
        "error": {"code": code, "message": message},
    });
    (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
}

/// The request's method, as its `Mcp-Method` header names it, where that
/// can be trusted. rmcp checks the header against the body whenever the
/// request's protocol version asks for the standard headers (2026-07-28 and
/// later), and refuses a mismatch before any handler runs; so there the
/// header says what the body is. Before that version it is not checked, and
/// not trusted here.
fn checked_method(headers: &HeaderMap) -> Option<&header::HeaderValue> {
    let checked = headers
        .get("mcp-protocol-version")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v >= rmcp::model::ProtocolVersion::STANDARD_HEADERS.as_str());
    let mut methods = headers.get_all("mcp-method").iter();
    let method = methods.next().filter(|_| checked)?;
    methods.next().is_none().then_some(method)
}

/// Whether the request is of protocol 2026-07-28 or later and not an
/// `initialize` (which picks a version of its own): rmcp serves it without
/// a session even in stateful mode.
fn sessionless(headers: &HeaderMap) -> bool {
    checked_method(headers).is_some_and(|m| m != "initialize")
}

/// Whether `req` opens a `subscriptions/listen` stream.
fn is_listen(req: &Request) -> bool {
    checked_method(req.headers()).is_some_and(|m| m == "subscriptions/listen")
}

/// Bounds the MCP requests handled at once (`max_concurrent_calls`).
/// A request holds its permit from the moment it is taken until its response
/// body ends (in stateful mode the tool result comes on that body, after the
/// handler returned), so at most that many bodies and the messages built from
/// them are in memory. Requests past the bound wait with their bodies unread.
/// A `subscriptions/listen` stream holds its body open for as long as the
/// client listens, so it takes a permit of its own bound instead: open
/// streams never keep calls waiting. A caller past its own number of streams
/// is refused at once rather than kept waiting. Once a request has its
/// permit, its body must arrive whole within `http.read_timeout` (408
/// otherwise), so that a stalled client gives its permit back.
async fn limit(State(limits): State<Arc<Limits>>, req: Request, next: Next) -> Response {
    if let Some(sessions) = &limits.sessions
        && let Some(id) = req.headers().get("mcp-session-id")
        && let Ok(id) = id.to_str()
    {
        sessions.used(id);
    }
    if req.method() == Method::DELETE && req.uri().path().starts_with("/mcp") {
        // rmcp ends a session with 202; the Python SDK takes anything but 200
        // or 204 for a failure and logs a warning at every session's end.
        let mut response = next.run(req).await;
        if response.status() == StatusCode::ACCEPTED {
            *response.status_mut() = StatusCode::NO_CONTENT;
        }
        return response;
    }
    if req.method() != Method::POST {
        return next.run(req).await;
    }
    // `check` has put the caller in every /mcp request.
    let caller = req
        .extensions()
        .get::<Arc<Caller>>()
        .map_or_else(|| Arc::from(""), |c| c.name.clone());
    // A request without a session opens one (stateful mode), unless it is
    // of a protocol without sessions.
    let opens = limits.sessions.as_ref().filter(|_| {
        req.uri().path().starts_with("/mcp")
            && !req.headers().contains_key("mcp-session-id")
            && !sessionless(req.headers())
    });
    if let Some(sessions) = opens
        && let Err(refused) = sessions.admit(&caller).await
    {
        return refused;
    }
    let listening = if is_listen(&req) {
        let Some(listening) = Listening::open(&limits, caller.clone()) else {
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "this caller has {MAX_LISTENS_PER_CALLER} subscriptions/listen streams open, the most it may; close one first"
                ),
            );
        };
        Some(listening)
    } else {
        None
    };
    let permits = if listening.is_some() {
        &limits.listens
    } else {
        &limits.calls
    };
    let Ok(permit) = permits.clone().acquire_owned().await else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    };
    let (req, body) = match read_whole(req, &limits).await {
        Ok(read) => read,
        Err(refused) => return refused,
    };
    let in_flight = match req
        .headers()
        .get("mcp-session-id")
        .and_then(|id| id.to_str().ok())
        .filter(|_| limits.sessions.is_some())
    {
        Some(session) => match mark_in_flight(&limits, session, &body) {
            Ok(marked) => marked,
            Err(error) => return (StatusCode::BAD_REQUEST, axum::Json(error)).into_response(),
        },
        None => None,
    };
    let json = req.uri().path().starts_with("/mcp") && is_json(req.headers());
    let direct = (req.uri().path() == "/mcp")
        .then(|| super::stateless::call(req.headers(), &body, limits.stateful))
        .flatten();
    let response = match direct {
        Some(taken) => {
            let (parts, _) = req.into_parts();
            let (server, closing) = &limits.direct;
            super::stateless::serve(server, parts, taken, closing).await
        }
        None => next.run(req).await,
    };
    if response.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE && json {
        return not_json_rpc(&body);
    }
    if let Some(sessions) = opens {
        sessions.opened(&response, caller);
    }
    let (parts, body) = response.into_parts();
    let body = body.map_frame(move |frame| {
        let _held = (&permit, &listening, &in_flight);
        frame
    });
    Response::from_parts(parts, axum::body::Body::new(body))
}

/// `GET /health`: 200 while new mail is best sent here (a relay is healthy,
/// the store takes writes and has its free space reserve), 503 otherwise.
async fn health(State(server): State<MailmuxServer>) -> Response {
    let (ok, relays) = match server.dispatcher().status().await {
        Ok(s) => {
            let ok =
                !server.is_closing() && s.relays.iter().any(|r| r.state == RelayState::Healthy);
            let relays: Vec<_> = s
                .relays
                .iter()
                .map(|r| json!({ "name": r.name, "state": r.state.as_str() }))
                .collect();
            (ok, relays)
        }
        Err(_) => (false, Vec::new()),
    };
    let queue = server.queue_status().await;
    // Under `queue.min_free` new mail is refused: a load balancer should
    // send it elsewhere, while this daemon still delivers what it holds.
    let reserve_short = matches!((queue.free_bytes, queue.min_free), (Some(f), Some(m)) if f < m);
    let ok = ok && queue.available && !reserve_short;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(json!({ "ok": ok, "relays": relays, "queue": queue })),
    )
        .into_response()
}

/// `GET /metrics`: every metric as Prometheus text.
/// The sessions rmcp holds (stateful mode), counted at each scrape.
#[derive(Clone)]
struct OpenSessions(Arc<LocalSessionManager>);

async fn metrics(
    State(server): State<MailmuxServer>,
    sessions: Option<Extension<OpenSessions>>,
    req: Request,
) -> Response {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let config = server.config();
    match &config.daemon.metrics.token {
        Some(token) => {
            use subtle::ConstantTimeEq;
            let given = bearer(req.headers()).unwrap_or_default();
            if !bool::from(given.as_bytes().ct_eq(token.expose().as_bytes())) {
                return refuse(StatusCode::UNAUTHORIZED, "missing or wrong metrics token");
            }
        }
        None if !peer.is_some_and(|p| p.ip().is_loopback()) => {
            return refuse(
                StatusCode::FORBIDDEN,
                "metrics are open to loopback peers only; set metrics.token",
            );
        }
        None => {}
    }
    if let Some(lockout) = server.lockout() {
        metrics::gauge!(crate::telemetry::HTTP_REFUSED_ADDRESSES).set(lockout.refused_now() as f64);
    }
    if let Some(Extension(OpenSessions(open))) = sessions {
        let n = open.sessions.read().await.len();
        metrics::gauge!(crate::telemetry::MCP_SESSIONS).set(n as f64);
    }
    metrics::gauge!(crate::telemetry::SUPPRESSED).set(server.suppressions().len() as f64);
    let text = crate::telemetry::scrape(server.queue()).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The operator an `/admin/` request's token named.
#[derive(Debug, Clone)]
struct Operator(String);

/// `GET /admin/messages/{id}`: the message's status, as `get_message_status`.
async fn admin_show(State(server): State<MailmuxServer>, Path(id): Path<String>) -> Response {
    match server.queue().status(&id).await {
        Ok(Some(r)) => axum::Json(MessageStatusResult::from(&r)).into_response(),
        Ok(None) => reject(StatusCode::NOT_FOUND, "no such message"),
        Err(e) => reject(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

async fn admin_approve(
    State(server): State<MailmuxServer>,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
) -> Response {
    admin_decide(server, op, id, true).await
}

async fn admin_reject(
    State(server): State<MailmuxServer>,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
) -> Response {
    admin_decide(server, op, id, false).await
}

/// Approves or rejects a held message as an operator. 409 when it is not
/// held, with its state.
async fn admin_decide(server: MailmuxServer, op: Operator, id: String, approve: bool) -> Response {
    let decision = Decision {
        approve,
        by: format!("operator {}", op.0),
        hash: None,
    };
    match server.queue().decide(&id, decision).await {
        Ok(Decided::Released(state)) => {
            tracing::info!(message_id = %id, operator = %op.0, "operator approved a held message");
            axum::Json(json!({ "message_id": id, "approved": true, "status": state.as_str() }))
                .into_response()
        }
        Ok(Decided::Rejected) => {
            tracing::info!(message_id = %id, operator = %op.0, "operator rejected a held message");
            axum::Json(json!({ "message_id": id, "approved": false, "status": "rejected" }))
                .into_response()
        }
        Ok(Decided::NotHeld(state)) => reject(
            StatusCode::CONFLICT,
            &format!("{id} is {}, not held; nothing was changed", state.as_str()),
        ),
        Ok(Decided::HashMismatch) => reject(
            StatusCode::CONFLICT,
            "the approval was for other content; nothing was changed",
        ),
        Ok(Decided::NotFound) => reject(StatusCode::NOT_FOUND, "no such message"),
        Err(e) => reject(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// The query `GET /admin/suppressions` may have: a page of the list.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListedQuery {
    /// At most this many entries (1 to [`MAX_LISTED`]).
    limit: Option<usize>,
    /// Only the entries after this address.
    after: Option<String>,
    /// Only the addresses that hold this, whatever its case.
    q: Option<String>,
}

/// The most entries one page of `GET /admin/suppressions` holds.
const MAX_LISTED: usize = 10_000;

/// `GET /admin/suppressions`: the suppression list, by address; with
/// `limit` (and `after`, `q`) one page of it, and `next_after` to ask for
/// the next.
async fn admin_suppressions(
    State(server): State<MailmuxServer>,
    query: Result<axum::extract::Query<ListedQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let query = match query {
        Ok(axum::extract::Query(q)) => q,
        Err(e) => {
            return reject(
                StatusCode::BAD_REQUEST,
                &format!("{} (limit, after and q are known)", e.body_text()),
            );
        }
    };
    if query.limit.is_some_and(|l| l == 0 || l > MAX_LISTED) {
        return reject(
            StatusCode::BAD_REQUEST,
            &format!("limit must be 1 to {MAX_LISTED}"),
        );
    }
    // No limit: the whole list, written as it is read.
    let whole = query.limit.is_none();
    let query = mailmux_actors::queue::SuppressionQuery {
        contains: query.q.map(|q| q.to_lowercase()),
        after: query.after,
        limit: query.limit.or(Some(STREAMED_LISTED)),
        counts: true,
    };
    let page = match server.queue().suppression_page(&query).await {
        Ok(page) => page,
        Err(e) => return reject(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    if whole && page.next_after.is_some() {
        return whole_list(server, query, page);
    }
    let entries: Vec<serde_json::Value> =
        page.entries.iter().map(crate::suppress::to_json).collect();
    axum::Json(
        json!({ "suppressions": entries, "total": page.total, "next_after": page.next_after }),
    )
    .into_response()
}

/// Entries the whole list is read and written out by, a page at a time.
const STREAMED_LISTED: usize = 10_000;

/// The whole list as one JSON body, written while it is read from the store
/// [`STREAMED_LISTED`] entries at a time, starting with `first` (read by
/// `query`), so that a list of millions never sits in memory. Its `total`
/// is the first page's count; the pages after it count nothing. A store
/// that fails after the first page ends the body short (not valid JSON),
/// and the log says so.
fn whole_list(
    server: MailmuxServer,
    mut query: mailmux_actors::queue::SuppressionQuery,
    first: mailmux_actors::queue::SuppressionPage,
) -> Response {
    // The entries of a page, each after a comma but the list's first.
    fn entries(page: &mailmux_actors::queue::SuppressionPage, first: bool, out: &mut Vec<u8>) {
        for (i, e) in page.entries.iter().enumerate() {
            if !(first && i == 0) {
                out.push(b',');
            }
            // A `Value` made by `to_json` always serialises.
            let _ = serde_json::to_writer(&mut *out, &crate::suppress::to_json(e));
        }
    }
    let end = format!("],\"total\":{},\"next_after\":null}}", first.total);
    let mut head = b"{\"suppressions\":[".to_vec();
    entries(&first, true, &mut head);
    query.after = first.next_after;
    query.counts = false;
    let rest = futures::stream::unfold(Some(query), move |query| {
        let (server, end) = (server.clone(), end.clone());
        async move {
            let mut query = query?;
            match server.queue().suppression_page(&query).await {
                Ok(page) => {
                    let mut chunk = Vec::with_capacity(page.entries.len() * 160);
                    entries(&page, false, &mut chunk);
                    query.after = page.next_after;
                    if query.after.is_none() {
                        chunk.extend_from_slice(end.as_bytes());
                    }
                    let next = query.after.is_some().then_some(query);
                    Some((Ok(Bytes::from(chunk)), next))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the suppression list; its listing ends short");
                    Some((Err(std::io::Error::other(e.to_string())), None))
                }
            }
        }
    });
    let body = futures::StreamExt::chain(
        futures::stream::once(async move { Ok(Bytes::from(head)) }),
        rest,
    );
    (
        [(header::CONTENT_TYPE, "application/json")],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// The body `PUT /admin/suppressions/{address}` may have.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SuppressBody {
    reason: Option<String>,
    note: Option<String>,
}

/// An admin request's optional JSON body (none is the default), or why it
/// is refused, naming its `shape`.
fn optional_body<T: Default + serde::de::DeserializeOwned>(
    body: &Bytes,
    shape: &str,
) -> Result<T, String> {
    if body.is_empty() {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| format!("the body must be {shape}: {e}; nothing was changed"))
}

/// `PUT /admin/suppressions/{address}`: lists the address (201), or finds
/// it listed (200, its entry kept), in force on this daemon at once.
async fn admin_suppress(
    State(server): State<MailmuxServer>,
    Extension(op): Extension<Operator>,
    Path(address): Path<String>,
    body: Bytes,
) -> Response {
    let b: SuppressBody = match optional_body(&body, "{\"reason\", \"note\"}") {
        Ok(b) => b,
        Err(e) => return reject(StatusCode::BAD_REQUEST, &e),
    };
    let reason = b.reason.as_deref().unwrap_or("manual");
    let now = mailmux_actors::queue::now_millis();
    let entry = match crate::suppress::operator_entry(&address, reason, b.note.as_deref(), now) {
        Ok(e) => e,
        Err(e) => {
            return reject(
                StatusCode::BAD_REQUEST,
                &format!("{e}; nothing was changed"),
            );
        }
    };
    let key = entry.address.clone();
    let by = format!("operator {}", op.0);
    match server.suppressions().add(entry, &by).await {
        Ok(added) => {
            tracing::info!(operator = %op.0, added, "operator listed an address on the suppression list");
            let status = if added {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (
                status,
                axum::Json(json!({ "address": key, "added": added })),
            )
                .into_response()
        }
        Err(e) => reject(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// `DELETE /admin/suppressions/{address}`: takes the address off the list
/// (404 when it was not on it), in force on this daemon at once.
async fn admin_unsuppress(
    State(server): State<MailmuxServer>,
    Extension(op): Extension<Operator>,
    Path(address): Path<String>,
) -> Response {
    let Some(key) = crate::suppress::key(&address) else {
        return reject(
            StatusCode::BAD_REQUEST,
            &format!("{address:?} is not an email address; nothing was changed"),
        );
    };
    match server
        .suppressions()
        .remove(&key, &format!("operator {}", op.0))
        .await
    {
        Ok(true) => {
            tracing::info!(operator = %op.0, "operator took an address off the suppression list");
            axum::Json(json!({ "address": key, "removed": true })).into_response()
        }
        Ok(false) => reject(StatusCode::NOT_FOUND, "the address is not listed"),
        Err(e) => reject(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// The body `POST /admin/pause` may have.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PauseBody {
    reason: Option<String>,
}

/// The longest note a pause may carry.
const PAUSE_REASON_MAX: usize = 500;

/// A pause's note as given (blank is none), or why it is refused: one line
/// of at most [`PAUSE_REASON_MAX`] characters.
pub(crate) fn pause_reason(reason: Option<String>) -> Result<Option<String>, String> {
    let reason = reason.filter(|r| !r.trim().is_empty());
    match &reason {
        Some(r) if r.chars().count() > PAUSE_REASON_MAX || r.chars().any(char::is_control) => Err(
            format!("reason must be at most {PAUSE_REASON_MAX} characters, on one line"),
        ),
        _ => Ok(reason),
    }
}

/// The pause in force as JSON: `{"paused": false}`, or since when, by
/// whom and why.
fn pause_json(pause: Option<&mailmux_actors::queue::Paused>) -> serde_json::Value {
    match pause {
        None => json!({ "paused": false }),
        Some(p) => json!({
            "paused": true,
            "since": crate::mcp::types::rfc3339(p.since),
            "by": p.by,
            "reason": p.reason,
        }),
    }
}

/// `GET /admin/pause`: whether delivery is paused, as this daemon read it.
async fn admin_paused(State(server): State<MailmuxServer>) -> Response {
    axum::Json(pause_json(server.queue().paused().as_ref())).into_response()
}

/// `POST /admin/pause`: pauses delivery for every daemon on the store
/// (201; 200 when it was paused already, the first pause kept).
async fn admin_pause(
    State(server): State<MailmuxServer>,
    Extension(op): Extension<Operator>,
    body: Bytes,
) -> Response {
    let b: PauseBody = match optional_body(&body, "{\"reason\"}") {
        Ok(b) => b,
        Err(e) => return reject(StatusCode::BAD_REQUEST, &e),
    };
    let reason = match pause_reason(b.reason) {
        Ok(r) => r,
        Err(e) => {
            return reject(
                StatusCode::BAD_REQUEST,
                &format!("{e}; nothing was changed"),
            );
        }
    };
    let by = format!("operator {}", op.0);
    match server.pause_delivery(&by, reason).await {
        Ok((pause, changed)) => {
            let status = if changed {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (status, axum::Json(pause_json(Some(&pause)))).into_response()
        }
        Err(e) => reject(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// `DELETE /admin/pause`: resumes delivery (404 when it was not paused).
async fn admin_resume(
    State(server): State<MailmuxServer>,
    Extension(op): Extension<Operator>,
) -> Response {
    match server.resume_delivery(&format!("operator {}", op.0)).await {
        Ok(true) => axum::Json(pause_json(None)).into_response(),
        Ok(false) => reject(StatusCode::NOT_FOUND, "delivery is not paused"),
        Err(e) => reject(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// The page of an unsubscribe link: what it does, or that it is not valid.
fn unsubscribe_page(status: StatusCode, title: &str, body: maud::Markup) -> Response {
    let page = maud::html! {
        (maud::DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { (title) } }
            body { h1 { (title) } (body) }
        }
    };
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; form-action 'self'",
            ),
        ],
        page.into_string(),
    )
        .into_response()
}

/// The address an unsubscribe token names: `None` for a token the
/// configured secret did not make, or with no `[unsubscribe]` configured.
fn unsubscribe_address(server: &MailmuxServer, token: &str) -> Option<String> {
    let config = server.config();
    config.daemon.compose.one_click.as_ref()?.verify(token)
}

/// The page of a link that unsubscribes nobody.
fn invalid_unsubscribe_link() -> Response {
    unsubscribe_page(
        StatusCode::NOT_FOUND,
        "Not a valid unsubscribe link",
        maud::html! { p { "This link does not unsubscribe anyone. Nothing was changed." } },
    )
}

/// `GET /unsubscribe/{token}`: a page with one button that unsubscribes.
/// A GET changes nothing (RFC 8058): link scanners fetch every link.
async fn unsubscribe_form(
    State(server): State<MailmuxServer>,
    Path(token): Path<String>,
) -> Response {
    let Some(address) = unsubscribe_address(&server, &token) else {
        return invalid_unsubscribe_link();
    };
    unsubscribe_page(
        StatusCode::OK,
        "Unsubscribe",
        maud::html! {
            p { "Stop the mail sent to " strong { (address) } " through this server?" }
            form method="post" { button type="submit" { "Unsubscribe" } }
        },
    )
}

/// The page that says `address` is unsubscribed.
fn unsubscribed_page(address: &str) -> Response {
    unsubscribe_page(
        StatusCode::OK,
        "Unsubscribed",
        maud::html! { p { strong { (address) } " gets no more mail through this server." } },
    )
}

/// `POST /unsubscribe/{token}`: lists the token's address on the
/// suppression list (reason `unsubscribed`), in force on this daemon at
/// once; the one-click POST of a mailbox provider (RFC 8058), or the
/// button of the form.
async fn unsubscribe(
    State(server): State<MailmuxServer>,
    Path(token): Path<String>,
    body: Bytes,
) -> Response {
    let Some(address) = unsubscribe_address(&server, &token) else {
        return invalid_unsubscribe_link();
    };
    // A link is public, in every message to its recipient, and may be
    // posted any number of times: a repeat reads the store and writes
    // nothing (a failed read goes on to the write, which says).
    if let Ok(Some(_)) = server.queue().suppression(&address).await {
        return unsubscribed_page(&address);
    }
    let detail = if body.as_ref() == b"List-Unsubscribe=One-Click" {
        "one-click (List-Unsubscribe-Post)"
    } else {
        "unsubscribe link"
    };
    let entry = mailmux_actors::queue::Suppression {
        address: address.clone(),
        reason: crate::suppress::UNSUBSCRIBED.into(),
        detail: Some(detail.into()),
        message_id: None,
        at: mailmux_actors::queue::now_millis(),
    };
    match server.suppressions().add(entry, "recipient").await {
        Ok(added) => {
            if added {
                tracing::info!(how = detail, "a recipient unsubscribed");
            }
            unsubscribed_page(&address)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot store an unsubscribe");
            unsubscribe_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Try again later",
                maud::html! { p { "The unsubscribe could not be recorded now. Nothing was changed." } },
            )
        }
    }
}

async fn admin_approve_batch(
    State(server): State<MailmuxServer>,
    Extension(op): Extension<Operator>,
    Path(batch): Path<String>,
) -> Response {
    admin_decide_batch(server, op, batch, true).await
}

async fn admin_reject_batch(
    State(server): State<MailmuxServer>,
    Extension(op): Extension<Operator>,
    Path(batch): Path<String>,
) -> Response {
    admin_decide_batch(server, op, batch, false).await
}

/// Approves or rejects every held message of one `send_batch` call as an
/// operator: how many were decided, and each message's state after. 404
/// when the batch has no message, 409 when none of them was held.
async fn admin_decide_batch(
    server: MailmuxServer,
    op: Operator,
    batch: String,
    approve: bool,
) -> Response {
    let filter = Filter {
        batch: Some(batch.clone()),
        ..Filter::default()
    };
    let by = format!("operator {}", op.0);
    let done = match server.queue().decide_each(&filter, approve, &by).await {
        Ok(done) => done,
        Err(e) => return reject(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let verb = if approve { "approved" } else { "rejected" };
    tracing::info!(batch = %crate::mcp::types::logged(&batch), operator = %op.0, decided = done.acted, of = done.matched, "operator {verb} a batch's held messages");
    if done.matched == 0 {
        return reject(StatusCode::NOT_FOUND, "no message of that batch");
    }
    let states: serde_json::Map<String, serde_json::Value> = done
        .states
        .iter()
        .map(|(st, n)| (st.as_str().to_owned(), json!(n)))
        .collect();
    let body =
        json!({ "batch_id": batch, verb: done.acted, "messages": done.matched, "states": states });
    if done.acted == 0 {
        return (StatusCode::CONFLICT, axum::Json(body)).into_response();
    }
    axum::Json(body).into_response()
}

/// The axum application: `/mcp`, `/health` and the request checks. The
/// returned token closes every MCP session when cancelled.
pub fn app(server: &MailmuxServer, stateful: bool) -> (Router, CancellationToken) {
    let http = server.config().daemon.http.clone();
    let cancel = CancellationToken::new();
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(stateful)
        // A request served without a session (stateless mode, and clients of
        // protocol 2026-07-28 in either mode) is answered with one JSON body
        // when its first message is the result, and over SSE when the
        // handler sends anything before it. Sessions of older protocols
        // always answer over SSE.
        .with_json_response(true)
        .with_cancellation_token(cancel.child_token())
        .with_max_request_body_bytes(http.body_limit)
        // Host and Origin are checked by `check`, for /health too.
        .disable_allowed_hosts()
        .disable_allowed_origins();
    let factory = server.clone();
    let open = Arc::new(LocalSessionManager::default());
    let mcp = StreamableHttpService::new(move || Ok(factory.clone()), open.clone(), config);
    let guard = Arc::new(Guard::new(&http, server));
    let limits = Arc::new(Limits {
        calls: Arc::new(Semaphore::new(server.config().daemon.max_concurrent_calls)),
        read_timeout: http.read_timeout,
        body_limit: http.body_limit,
        listens: Arc::new(Semaphore::new(MAX_LISTENS)),
        listening: Arc::default(),
        sessions: stateful.then(|| Sessions::new(open.clone(), &http)),
        in_flight: Arc::default(),
        direct: (server.clone(), cancel.child_token()),
        stateful,
    });
    let scrape = match stateful {
        true => get(metrics).layer(Extension(OpenSessions(open))),
        false => get(metrics),
    };
    let router = Router::new()
        .route("/health", get(health))
        .route("/metrics", scrape)
        .route("/admin/messages/{id}", get(admin_show))
        .route("/admin/messages/{id}/approve", post(admin_approve))
        .route("/admin/messages/{id}/reject", post(admin_reject))
        .route("/admin/batches/{id}/approve", post(admin_approve_batch))
        .route("/admin/batches/{id}/reject", post(admin_reject_batch))
        .route(
            "/unsubscribe/{token}",
            get(unsubscribe_form).post(unsubscribe),
        )
        .route(
            "/admin/pause",
            get(admin_paused).post(admin_pause).delete(admin_resume),
        )
        .route("/admin/suppressions", get(admin_suppressions))
        .route(
            "/admin/suppressions/{address}",
            put(admin_suppress).delete(admin_unsuppress),
        )
        .with_state(server.clone())
        .merge(crate::console::routes(server))
        .nest_service("/mcp", mcp)
        // Layers run outermost last-added first: the checks, then the bound.
        .layer(middleware::from_fn_with_state(limits, limit))
        .layer(middleware::from_fn_with_state(guard, check));
    (router, cancel)
}

/// Serves streamable HTTP on `bind` until `shutdown` resolves, then drains.
pub async fn serve(
    server: MailmuxServer,
    bind: SocketAddr,
    stateful: bool,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    super::refuse_anonymous(bind, &server.config())?;
    if !bind.ip().is_loopback() {
        server.expose(bind);
    }
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|source| RunError::Bind { addr: bind, source })?;
    let local = listener.local_addr().map_err(RunError::Transport)?;
    let (router, cancel) = app(&server, stateful);
    if !bind.ip().is_loopback() && server.config().daemon.http.allowed_hosts.is_empty() {
        tracing::warn!(%local, "HTTP transport bound beyond loopback with no http.allowed_hosts: only requests that name a loopback host are let in");
    }
    if super::anonymous_http(&server.config()) {
        tracing::info!(
            "HTTP transport has no bearer token: every request is the caller \"default\" (set MAILMUX_HTTP_TOKEN or [[callers]] to require one)"
        );
    }
    let tls = Handshakes::of(&server);
    let scheme = if tls.is_some() { "https" } else { "http" };
    if tls.is_none() && !bind.ip().is_loopback() {
        tracing::warn!(%local, "HTTP transport bound beyond loopback without TLS: bearer tokens and messages cross the network in clear unless a TLS proxy is in front (set http.tls_cert and http.tls_key)");
    }
    tracing::info!(%local, stateful, "serving MCP on {scheme}://{local}/mcp");
    if !server.config().safety.operators.is_empty() {
        tracing::info!(%local, "operators' console on {scheme}://{local}/console");
    }
    crate::console::spawn_sampler(server.clone());

    let closed = CancellationToken::new();
    let closed_signal = closed.clone();
    let mut serving = tokio::spawn(serve_router(
        listener,
        router,
        server.config().daemon.http.clone(),
        tls,
        metrics::gauge!(crate::telemetry::HTTP_CONNECTIONS),
        closed_signal.cancelled_owned(),
    ));
    crate::service::ready(format!("serving MCP on {scheme}://{local}/mcp"));
    tokio::select! {
        r = &mut serving => {
            // The accept loop ends only at shutdown, or if its task panicked.
            drain(&server).await;
            return r.map_err(|e| RunError::Transport(std::io::Error::other(e)));
        }
        () = shutdown => {}
    }
    tracing::info!("shutdown signal received");
    drain(&server).await;
    cancel.cancel();
    closed.cancel();
    match tokio::time::timeout(CLOSE_GRACE, &mut serving).await {
        Ok(_) => Ok(()),
        Err(_) => {
            tracing::warn!("HTTP connections still open after the close grace; closing them");
            serving.abort();
            Ok(())
        }
    }
}

/// Serves `/metrics` alone on `bind` (`metrics.bind`), behind the same
/// Host and Origin checks, until the runtime ends.
pub async fn serve_metrics(server: &MailmuxServer, bind: SocketAddr) -> Result<(), RunError> {
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|source| RunError::Bind { addr: bind, source })?;
    let local = listener.local_addr().map_err(RunError::Transport)?;
    let guard = Arc::new(Guard::new(&server.config().daemon.http, server));
    let router = Router::new()
        .route("/metrics", get(metrics))
        .with_state(server.clone())
        .layer(middleware::from_fn_with_state(guard, check));
    let tls = Handshakes::of(server);
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(%local, "serving metrics on {scheme}://{local}/metrics");
    tokio::spawn(serve_router(
        listener,
        router,
        server.config().daemon.http.clone(),
        tls,
        metrics::Gauge::noop(),
        std::future::pending(),
    ));
    Ok(())
}

/// A request's body that records whether it was read to its end. A
/// response to a request whose body was left unread (a refusal: a wrong
/// token, a body over the limit) says `Connection: close`: hyper closes
/// such a connection rather than read a large body it was not asked for,
/// and a client told to keep it would fail its next request on it.
struct Tracked {
    inner: hyper::body::Incoming,
    ended: Arc<std::sync::atomic::AtomicBool>,
}

impl Tracked {
    fn wrap(
        req: hyper::Request<hyper::body::Incoming>,
    ) -> (Request, Arc<std::sync::atomic::AtomicBool>) {
        use hyper::body::Body as _;
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(
            req.body().is_end_stream(),
        ));
        let flag = ended.clone();
        let req = req.map(|inner| axum::body::Body::new(Tracked { inner, ended: flag }));
        (req, ended)
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None)) || self.inner.is_end_stream() {
            self.ended.store(true, std::sync::atomic::Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `router` on `listener` until `shutdown`, then waits for the open
/// connections to finish their requests. Each request carries its peer's
/// address (`ConnectInfo`). A connection has `http.read_timeout` to finish
/// its TLS handshake (with `tls`), and as long to send a request's header,
/// idle or not, and is closed past it; Nagle's algorithm is off, as answers
/// are written whole. While `http.max_connections` are open, new ones wait
/// in the kernel's backlog until one closes, so that HTTP clients cannot
/// take the file descriptors the store and the relays need.
async fn serve_router(
    listener: tokio::net::TcpListener,
    router: Router,
    http: HttpSettings,
    tls: Option<Handshakes>,
    open: metrics::Gauge,
    shutdown: impl Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt as _;

    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(http.read_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(http.max_connections));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accept = async {
            // The semaphore is never closed.
            let slot = slots.clone().acquire_owned().await.ok();
            (slot, listener.accept().await)
        };
        let (slot, stream, peer) = tokio::select! {
            (slot, accepted) = accept => match accepted {
                Ok((stream, peer)) => (slot, stream, peer),
                // A connection that failed before it was accepted.
                Err(e) if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                ) => continue,
                // Out of file descriptors, say: wait for some to close.
                Err(e) => {
                    tracing::error!(error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (mut req, ended) = Tracked::wrap(req);
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                let answered = router.clone().oneshot(req);
                async move {
                    let mut resp = answered.await?;
                    if !ended.load(std::sync::atomic::Ordering::Acquire) {
                        resp.headers_mut().insert(
                            header::CONNECTION,
                            header::HeaderValue::from_static("close"),
                        );
                    }
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let acceptor = tls.as_ref().map(Handshakes::acceptor);
        let handshake_timeout = http.read_timeout;
        let open = open.clone();
        open.increment(1.0);
        tokio::spawn(async move {
            let served = match acceptor {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn).await.map_err(|e| e.to_string())
                }
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let conn = builder.serve_connection(TokioIo::new(stream), service);
                            watcher.watch(conn).await.map_err(|e| e.to_string())
                        }
                        Ok(Err(e)) => Err(format!("TLS handshake: {e}")),
                        Err(_) => Err(format!("no TLS handshake within {handshake_timeout:?}")),
                    }
                }
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, %peer, "HTTP connection ended with an error");
            }
            open.decrement(1.0);
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(hosts: &[&str], origins: &[&str]) -> Guard {
        Guard {
            allowed_hosts: hosts.iter().map(|s| s.to_string()).collect(),
            allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
            body_limit: 10,
            server: None,
            lockout: None,
        }
    }

    #[test]
    fn hosts() {
        let g = guard(&["mail.example.org", "api.example.org:8443"], &[]);
        assert!(g.host_allowed("localhost:8025"));
        assert!(g.host_allowed("127.0.0.1"));
        assert!(g.host_allowed("[::1]:9"));
        assert!(g.host_allowed("LOCALHOST:1"));
        assert!(g.host_allowed("mail.example.org:80"));
        assert!(g.host_allowed("api.example.org:8443"));
        assert!(!g.host_allowed("api.example.org:9999"));
        assert!(!g.host_allowed("evil.example.com"));
        assert!(!g.host_allowed("localhost.evil.com"));
        assert!(!g.host_allowed("[::2]:80"));
    }

    #[test]
    fn origins() {
        let g = guard(&[], &["https://app.example.org"]);
        assert!(g.origin_allowed("http://localhost:3000"));
        assert!(g.origin_allowed("http://127.0.0.1"));
        assert!(g.origin_allowed("https://app.example.org/"));
        assert!(!g.origin_allowed("https://evil.example.com"));
        assert!(!g.origin_allowed("null"));
        assert!(!g.origin_allowed("http://localhost.evil.com"));
    }

    /// Sessions with room for `max`, `per_caller` a caller, holding one
    /// session for each caller named, the first named used longest ago.
    #[test]
    fn only_a_request_has_an_id_that_is_kept_in_flight() {
        use super::request_id;
        let id = |body: &str| request_id(body.as_bytes()).map(|v| v.to_string());
        assert_eq!(
            id(r#"{"jsonrpc":"2.0","id":7,"method":"tools/list"}"#).as_deref(),
            Some("7")
        );
        assert_eq!(
            id(r#"{"jsonrpc":"2.0","id":"7","method":"x"}"#).as_deref(),
            Some("\"7\"")
        );
        // A notification, a response to the server, a null id, not JSON.
        assert_eq!(
            id(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#),
            None
        );
        assert_eq!(id(r#"{"jsonrpc":"2.0","id":7,"result":{}}"#), None);
        assert_eq!(id(r#"{"jsonrpc":"2.0","id":null,"method":"x"}"#), None);
        assert_eq!(id("[1,2]"), None);
        assert_eq!(id("{"), None);
    }

    #[test]
    fn only_a_request_of_an_older_protocol_or_an_initialize_may_open_a_session() {
        let heads = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (name, value) in pairs {
                h.append(*name, header::HeaderValue::from_static(value));
            }
            h
        };
        let modern = ("mcp-protocol-version", "2026-07-28");
        assert!(sessionless(&heads(&[modern, ("mcp-method", "tools/call")])));
        assert!(sessionless(&heads(&[
            modern,
            ("mcp-method", "server/discover")
        ])));
        for h in [
            heads(&[]),
            heads(&[("mcp-method", "tools/call")]),
            heads(&[
                ("mcp-protocol-version", "2025-11-25"),
                ("mcp-method", "tools/call"),
            ]),
            // rmcp refuses these; counted as opening, as before.
            heads(&[modern]),
            heads(&[
                modern,
                ("mcp-method", "tools/call"),
                ("mcp-method", "tools/call"),
            ]),
            heads(&[modern, ("mcp-method", "initialize")]),
        ] {
            assert!(!sessionless(&h), "{h:?}");
        }
    }

    async fn held(max: usize, per_caller: usize, callers: &[&str]) -> (Sessions, Vec<Arc<str>>) {
        let sessions = Sessions {
            open: Arc::new(LocalSessionManager::default()),
            owners: std::sync::Mutex::default(),
            max,
            per_caller,
        };
        let mut ids = Vec::new();
        let start = std::time::Instant::now();
        for (i, caller) in callers.iter().enumerate() {
            let (id, _transport) = sessions.open.create_session().await.unwrap();
            let owner = Owner {
                caller: Arc::from(*caller),
                used: start + Duration::from_millis(i as u64),
            };
            sessions.owners.lock().unwrap().insert(id.clone(), owner);
            ids.push(id);
        }
        (sessions, ids)
    }

    async fn open_ids(s: &Sessions) -> Vec<Arc<str>> {
        let mut ids: Vec<Arc<str>> = s.open.sessions.read().await.keys().cloned().collect();
        ids.sort();
        ids
    }

    #[tokio::test]
    async fn a_caller_at_its_bound_takes_the_place_of_its_own_oldest_session_even_when_all_are_open()
     {
        // Every session is open, and "a" holds as many as a caller may.
        let (s, ids) = held(3, 2, &["a", "b", "a"]).await;
        assert!(s.admit(&Arc::from("a")).await.is_ok());
        // Its least recently used one was closed; the other caller's stays.
        let mut left = vec![ids[1].clone(), ids[2].clone()];
        left.sort();
        assert_eq!(open_ids(&s).await, left);

        // Another caller below its bound finds no room.
        let (s, _) = held(3, 2, &["a", "b", "a"]).await;
        let refused = s.admit(&Arc::from("b")).await.unwrap_err();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(open_ids(&s).await.len(), 3);
        // With room, it is let in and nothing is closed.
        let (s, _) = held(4, 2, &["a", "b", "a"]).await;
        assert!(s.admit(&Arc::from("b")).await.is_ok());
        assert_eq!(open_ids(&s).await.len(), 3);
    }
}
