//! The operators' web console at `/console`: the relays and the queue at a
//! glance, each message, the approvals of held messages, the relay
//! controls, and the suppression list.
//!
//! Operators sign in with their `[[operators]]` token, which becomes a
//! session (an HttpOnly, SameSite=Strict cookie naming a random id; the
//! daemon keeps the token's hash, never the token). Every form carries the
//! session's CSRF token, and every response forbids scripts, framing and
//! caching ([`protect`]). Actions go through the queue and the dispatcher, so
//! they follow the same state rules and reach the same audit log as the
//! tools. A message body appears only on that message's own page and on the
//! approvals page.
//!
//! `pages.rs` renders the HTML (maud); `chart.rs` keeps the last hour of
//! samples and draws them as SVG. The Host and Origin checks of the HTTP
//! listener run before any of this.

mod chart;
mod pages;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Form, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use mailmux_actors::queue::{
    Cancel, Decided, Decision, Filter, Retry, State as MsgState, SuppressionQuery,
};
use rand::RngCore;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::mcp::MailmuxServer;
use crate::policy::{TokenHash, hash_token};

pub use chart::History;

/// The session cookie's name.
const COOKIE: &str = "mailmux_console";
/// How long a session lasts from sign-in.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at once; the oldest goes first past it.
const MAX_SESSIONS: usize = 1024;
/// Messages on one page of the queue.
const PAGE: usize = 50;
/// The largest form the console takes: a batch's form names up to a page
/// of messages, each with its content hash.
const FORM_LIMIT: usize = 64 * 1024;

/// One signed-in operator.
#[derive(Debug, Clone)]
struct Session {
    /// The hash of the token signed in with: a reload that drops or changes
    /// it ends the session.
    token: TokenHash,
    csrf: String,
    expires: Instant,
}

/// The signed-in operator of a request, as the session check found it.
#[derive(Debug, Clone)]
pub(crate) struct Operator {
    pub name: String,
    pub csrf: String,
}

/// The console's state: its sessions and its chart samples.
#[derive(Debug, Default)]
pub struct Console {
    sessions: Mutex<HashMap<String, Session>>,
    pub history: History,
}

/// A random token of 32 bytes, hex.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Console {
    fn sign_in(&self, token: TokenHash) -> (String, Session) {
        let id = random_token();
        let session = Session {
            token,
            csrf: random_token(),
            expires: Instant::now() + SESSION_TTL,
        };
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(id.clone(), session.clone());
        (id, session)
    }

    fn session(&self, id: &str) -> Option<Session> {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions
            .get(id)
            .filter(|s| s.expires > Instant::now())
            .cloned()
    }

    fn sign_out(&self, id: &str) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.remove(id);
    }
}

/// The session id in the request's cookie.
fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == COOKIE).then_some(v)
        })
}

/// The routes under `/console`. The listener's Host and Origin checks wrap
/// them; the session check is here.
pub fn routes(server: &MailmuxServer) -> Router {
    let signed_in = Router::new()
        .route("/console", get(overview))
        .route("/console/queue", get(queue))
        .route("/console/messages/{id}", get(message))
        .route("/console/messages/{id}/cancel", post(cancel))
        .route("/console/batches/{id}/cancel", post(cancel_batch))
        .route("/console/batches/{id}/approve", post(approve_batch))
        .route("/console/batches/{id}/reject", post(reject_batch))
        .route("/console/messages/{id}/retry", post(retry))
        .route("/console/messages/{id}/approve", post(approve))
        .route("/console/messages/{id}/reject", post(reject))
        .route("/console/approvals", get(approvals))
        .route("/console/relays", get(relays))
        .route("/console/relays/{name}/reconnect", post(reconnect))
        .route("/console/relays/{name}/pin", post(pin))
        .route("/console/relays/unpin", post(unpin))
        .route("/console/delivery/pause", post(pause))
        .route("/console/delivery/resume", post(resume))
        .route("/console/suppressions", get(suppressions))
        .route("/console/suppressions/add", post(suppress))
        .route("/console/suppressions/remove", post(unsuppress))
        .route("/console/logout", post(logout))
        .route_layer(middleware::from_fn_with_state(
            server.clone(),
            require_session,
        ));
    Router::new()
        .route("/console/login", get(login_page).post(login))
        .merge(signed_in)
        .layer(middleware::map_response(protect))
        .with_state(server.clone())
}

/// What every console response tells the browser: no script runs and
/// nothing loads from elsewhere (the pages have no JavaScript, so markup
/// that slipped past escaping cannot act); no page is framed by another
/// (an approve button under a decoy); nothing is cached (message bodies
/// must not outlive the session on a shared machine); and no URL, which
/// names messages and batches, is sent on as a referrer.
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

async fn protect(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CACHE_CONTROL, "no-store"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ] {
        h.insert(name, header::HeaderValue::from_static(value));
    }
    resp
}

/// Lets a request with a live session through, with its [`Operator`];
/// sends any other to the sign-in page. A POST must carry the session's
/// CSRF token in its form, or nothing runs.
async fn require_session(
    State(server): State<MailmuxServer>,
    mut req: Request,
    next: Next,
) -> Response {
    let console = server.console();
    let found = session_id(req.headers()).and_then(|id| console.session(id));
    let operator = found.and_then(|s| {
        let name = server.gate().operator_by_hash(&s.token)?;
        Some(Operator { name, csrf: s.csrf })
    });
    let Some(operator) = operator else {
        return Redirect::to("/console/login").into_response();
    };
    // Every form carries the session's CSRF token: checked here, once, for
    // every POST, before any handler runs.
    if req.method() == axum::http::Method::POST {
        let (parts, body) = req.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, FORM_LIMIT).await else {
            return (StatusCode::PAYLOAD_TOO_LARGE, "form too large").into_response();
        };
        let form = Form::<CsrfForm>::from_request(
            Request::from_parts(parts.clone(), axum::body::Body::from(bytes.clone())),
            &(),
        )
        .await
        .map(|Form(f)| f)
        .unwrap_or_default();
        if !csrf_ok(&operator, form.csrf.as_deref()) {
            tracing::warn!(operator = %operator.name, path = %parts.uri.path(), "console form refused: no valid CSRF token");
            return forbidden_csrf();
        }
        req = Request::from_parts(parts, axum::body::Body::from(bytes));
    }
    req.extensions_mut().insert(operator);
    next.run(req).await
}

/// The CSRF token of a form, checked against the session's.
fn csrf_ok(operator: &Operator, given: Option<&str>) -> bool {
    given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(operator.csrf.as_bytes())))
}

fn forbidden_csrf() -> Response {
    (
        StatusCode::FORBIDDEN,
        pages::plain(
            "Refused",
            "The form did not carry this session's CSRF token; nothing was changed.",
        ),
    )
        .into_response()
}

/// Back to `to` with a notice shown at the top of the page.
fn back(to: &str, notice: &str) -> Response {
    let mut url = to.to_owned();
    url.push_str(if to.contains('?') { "&" } else { "?" });
    url.push_str("notice=");
    url.push_str(&urlencode(notice));
    Redirect::to(&url).into_response()
}

fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    token: Option<String>,
}

async fn login_page(State(server): State<MailmuxServer>, headers: HeaderMap) -> Response {
    let signed_in = session_id(&headers).and_then(|id| server.console().session(id));
    if signed_in.is_some() {
        return Redirect::to("/console").into_response();
    }
    pages::login(None).into_response()
}

async fn login(State(server): State<MailmuxServer>, Form(form): Form<LoginForm>) -> Response {
    let token = form.token.unwrap_or_default();
    let hash = hash_token(token.trim());
    let Some(name) = server.gate().operator_by_hash(&hash) else {
        tracing::warn!("console sign-in refused: not an operator token");
        metrics::counter!(crate::telemetry::HTTP_REFUSED, "status" => "401").increment(1);
        return (
            StatusCode::UNAUTHORIZED,
            pages::login(Some("That is not an operator token.")),
        )
            .into_response();
    };
    let (id, _) = server.console().sign_in(hash);
    tracing::info!(operator = %name, "operator signed in to the console");
    // Over TLS the browser keeps the cookie off plain HTTP.
    let secure = if server.config().daemon.http.tls.is_some() {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_TTL.as_secs()
    );
    let mut resp = Redirect::to("/console").into_response();
    if let Ok(v) = header::HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

#[derive(Debug, Default, Deserialize)]
struct CsrfForm {
    csrf: Option<String>,
    /// The content hash an approval was made on (hex).
    hash: Option<String>,
    /// `retry` of an `unknown` message.
    force: Option<String>,
}

async fn logout(State(server): State<MailmuxServer>, headers: HeaderMap) -> Response {
    if let Some(id) = session_id(&headers) {
        server.console().sign_out(id);
    }
    let mut resp = Redirect::to("/console/login").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        header::HeaderValue::from_static(
            "mailmux_console=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    resp
}

#[derive(Debug, Default, Deserialize)]
struct Notice {
    notice: Option<String>,
}

async fn overview(
    State(server): State<MailmuxServer>,
    axum::Extension(op): axum::Extension<Operator>,
    Query(n): Query<Notice>,
) -> Response {
    let snapshot = server.dispatcher().status().await.ok();
    let queue = server.queue_status().await;
    pages::overview(
        &op,
        n.notice.as_deref(),
        snapshot.as_ref(),
        &queue,
        &server.console().history,
    )
    .into_response()
}

#[derive(Debug, Default, Deserialize)]
struct QueueQuery {
    state: Option<String>,
    caller: Option<String>,
    recipient: Option<String>,
    reported: Option<String>,
    batch: Option<String>,
    tag: Option<String>,
    /// Metadata names and values, `NAME=VALUE`, one a line.
    metadata: Option<String>,
    before: Option<i64>,
    notice: Option<String>,
}

/// The report reason a URL asks for: `Ok(None)` for none, `Err` with what
/// it said when that is no reason (shown, and the filter left out).
fn report_reason(asked: Option<&str>) -> Result<Option<&'static str>, String> {
    match asked.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => crate::bounces::REASONS
            .into_iter()
            .find(|r| *r == s)
            .map(Some)
            .ok_or_else(|| s.chars().take(64).collect()),
    }
}

/// A queue page's metadata search: `NAME=VALUE` a line, 1 to
/// [`MAX_METADATA`](crate::compose::labels::MAX_METADATA) names, each once.
fn metadata_search(asked: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    let pairs = asked
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(crate::compose::labels::pair)
        .collect::<Result<Vec<_>, _>>()?;
    let pairs = crate::compose::labels::by_name(pairs)?;
    if pairs.len() > crate::compose::labels::MAX_METADATA {
        return Err(format!(
            "at most {} names",
            crate::compose::labels::MAX_METADATA
        ));
    }
    Ok(pairs)
}

async fn queue(
    State(server): State<MailmuxServer>,
    axum::Extension(op): axum::Extension<Operator>,
    Query(q): Query<QueueQuery>,
) -> Response {
    let nonempty = |s: &Option<String>| {
        s.as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let asked = nonempty(&q.state);
    let state = asked.as_deref().and_then(MsgState::parse);
    // A state the URL names that does not exist is said, not dropped.
    let unknown = asked.filter(|_| state.is_none()).map(|s| {
        let shown: String = s.chars().take(64).collect();
        format!("No state is named {shown:?}: every state is listed.")
    });
    let (reported, unknown_reason) = match report_reason(q.reported.as_deref()) {
        Ok(r) => (r, None),
        Err(shown) => (
            None,
            Some(format!(
                "No report is named {shown:?}: messages with or without reports are listed."
            )),
        ),
    };
    // A search the URL writes wrong is said, and left out.
    let (metadata, bad_metadata) = match nonempty(&q.metadata) {
        None => (None, None),
        Some(asked) => match metadata_search(&asked) {
            Ok(pairs) => (Some(pairs), None),
            Err(why) => {
                let shown: String = asked.chars().take(64).collect();
                let why: String = why.chars().take(120).collect();
                (
                    None,
                    Some(format!(
                        "No metadata search {shown:?} ({why}): write NAME=VALUE, one a line. \
                         Messages with any metadata are listed."
                    )),
                )
            }
        },
    };
    let notice = q
        .notice
        .as_deref()
        .or(unknown.as_deref())
        .or(unknown_reason.as_deref())
        .or(bad_metadata.as_deref());
    let filter = Filter {
        state,
        caller: nonempty(&q.caller),
        recipient: nonempty(&q.recipient),
        batch: nonempty(&q.batch),
        tag: nonempty(&q.tag),
        reported: reported.map(str::to_owned),
        metadata,
    };
    let listed = server.queue().list(&filter, PAGE, q.before).await;
    let (page, next) = match listed {
        Ok(v) => v,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                pages::plain("Queue unavailable", &e.to_string()),
            )
                .into_response();
        }
    };
    // A batch's or a tag's messages per state, on its first page.
    let counts = if (filter.batch.is_some() || filter.tag.is_some()) && q.before.is_none() {
        let whole = Filter {
            batch: filter.batch.clone(),
            tag: filter.tag.clone(),
            ..Filter::default()
        };
        server.queue().count(&whole).await.ok()
    } else {
        None
    };
    pages::queue(&op, notice, &filter, counts.as_deref(), &page, next).into_response()
}

async fn message(
    State(server): State<MailmuxServer>,
    axum::Extension(op): axum::Extension<Operator>,
    Path(id): Path<String>,
    Query(n): Query<Notice>,
) -> Response {
    let record = match server.queue().status(&id).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            return (
                StatusCode::NOT_FOUND,
                pages::plain("No such message", "No message has that id."),
            )
                .into_response();
        }
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                pages::plain("Queue unavailable", &e.to_string()),
            )
                .into_response();
        }
    };
    let stored = server.queue().stored(&id).await.ok().flatten();
    pages::message(&op, n.notice.as_deref(), &record, stored.as_ref()).into_response()
}

#[derive(Debug, Default, Deserialize)]
struct ApprovalsQuery {
    notice: Option<String>,
    /// Only this `send_batch` call's held messages.
    batch: Option<String>,
}

async fn approvals(
    State(server): State<MailmuxServer>,
    axum::Extension(op): axum::Extension<Operator>,
    Query(q): Query<ApprovalsQuery>,
) -> Response {
    let batch = q.batch.filter(|b| !b.is_empty());
    let filter = Filter {
        state: Some(MsgState::Held),
        batch: batch.clone(),
        ..Filter::default()
    };
    let page = match server.queue().list(&filter, PAGE, None).await {
        Ok((page, _)) => page,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                pages::plain("Queue unavailable", &e.to_string()),
            )
                .into_response();
        }
    };
    let mut held = Vec::with_capacity(page.len());
    for s in page {
        if let Ok(Some(stored)) = server.queue().stored(&s.message_id).await {
            held.push((s, stored));
        }
    }
    pages::approvals(&op, q.notice.as_deref(), batch.as_deref(), &held).into_response()
}

async fn approve_batch(
    State(server): State<MailmuxServer>,
    axum::Extension(op): axum::Extension<Operator>,
    Path(batch): Path<String>,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    decide_batch(server, op, batch, &fields, true).await
}

async fn reject_batch(
    State(server): State<MailmuxServer>,
    axum::Extension(op): axum::Extension<Operator>,
    Path(batch): Path<String>,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    decide_batch(server, op, batch, &fields, false).await
}

/// Approves or rejects each message a batch's form showed (its `m` fields:
/// `id hash`), each bound to the hash of the content shown, as one
/// message's buttons are.
async fn decide_batch(
    server: MailmuxServer,
    op: Operator,
    batch: String,
    fields: &[(String, String)],
    approve: bool,
) -> Response {
    let to = format!("/console/approvals?batch={}", urlencode(&batch));
    let shown: Vec<(&str, Option<[u8; 32]>)> = fields
        .iter()
        .filter(|(k, _)| k == "m")
        .filter_map(|(_, v)| v.split_once(' '))
        .map(|(id, hash)| (id, crate::policy::hash_from_text(hash)))
        .collect();
    if shown.is_empty() || shown.iter().any(|(_, h)| h.is_none()) {
        return back(
            &to,
            "The form did not name the content it decides on; nothing was changed.",
        );
    }
    let by = format!("operator {}", op.name);
    let (mut done, mut left) = (0usize, Vec::new());
    for (id, hash) in &shown {
        let decision = Decision {
            approve,
            by: by.clone(),
            hash: *hash,
        };
        match server.queue().decide(id, decision).await {
            Ok(Decided::Released(_) | Decided::Rejected) => done += 1,
            Ok(Decided::NotHeld(state)) => left.push(format!("{id} is {}", state.as_str())),
            Ok(Decided::HashMismatch) => left.push(format!("{id} is not the one shown")),
            Ok(Decided::NotFound) => left.push(format!("{id} is gone")),
            Err(e) => left.push(format!("{id}: {e}")),
        }
    }
    let verb = if approve { "approved" } else { "rejected" };
    tracing::info!(batch = %batch, operator = %op.name, decided = done, of = shown.len(), "operator {verb} a batch's held messages");
    let mut notice = format!(
        "{} {done} of the {} messages shown.",
        capitalized(verb),
        shown.len()
    );
    if !left.is_empty() {
        notice.push_str(&format!(" Left as they were: {}.", left.join("; ")));
    }
    back(&to, &notice)
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

async fn cancel(
    State(server): State<MailmuxServer>,
    axum::Extension(op): axum::Extension<Operator>,
    Path(id): Path<String>,
) -> Response {
    let to = format!("/console/messages/{}", urlencode(&id));
    let notice = match server.queue().cancel(&id).await {
        Ok(Cancel::Cancelled) => {
            tracing::info!(message_id = %id, operator = %op.name, "operator cancelled a message");
            "Cancelled.".to_owned()
        }
        Ok(Cancel::Refused(state)) => {
            format!("Not cancelled: the message is {}.", state.as_str())
        }
        Ok(Cancel::NotFound) => "No such message.".to_owned(),
        Err(e) => e.to_string(),
    };
    back(&to, &notice)
}

/// Cancels every message of a `send_batch` call that still can be, as
/// `cancel_message` with its `batch_id` does, whoever the caller.
async fn cancel_batch(
    State(server): State<MailmuxServer>,
    axum::Extension(op): axum::Extension<Operator>,
    Path(batch): Path<String>,
) -> Response {
    let to = format!("/console/queue?batch={}", urlencode(&batch));
    let filter = Filter {
        batch: Some(batch.clone()),
        ..Filter::default()
    };
    let notice = match server.queue().cancel_each(&filter).await {
        Ok(done) => {
            tracing::info!(batch = %batch, operator = %op.name, cancelled = done.acted, of = done.matched, "operator cancelled a batch");
            let now: Vec<String> = done
                .states
                .iter()
                .map(|(st, n)| format!("{n} {}", st.as_str()))
                .collect();
            format!(
                "Cancelled {} of the batch's {} messages; now: {}.",
                done.acted,
                done.matched,
                now.join(", ")
            )
        }
        Err(e) => e.to_string(),
    };
    back(&to, &notice)
}

async fn retry(
    State(server): State<MailmuxServer>,
    axum::Extension(op): axum::Extension<Operator>,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    let to = format!("/console/messages/{}", urlencode(&id));
    let force = form.force.as_deref() == Some("on");
    let notice = match server.queue().retry(&id, force).await {
        Ok(Retry::Queued) => {
            tracing::info!(message_id = %id, operator = %op.name, "operator queued a message again");
            "Queued for a fresh attempt.".to_owned()
        }
        Ok(Retry::NeedsForce) => {
            "Not queued: the message is unknown (it may have been delivered); tick \"send again anyway\" to retry it.".to_owned()
        }
        Ok(Retry::Refused(state @ (MsgState::Unknown | MsgState::Failed | MsgState::Queued))) => {
            format!(
                "Not queued: the message is {} and its bytes are not stored (a crash cut its delivery off after the final \".\"), so it cannot be sent again.",
                state.as_str()
            )
        }
        Ok(Retry::Refused(state)) => {
            format!("Not queued: the message is {}.", state.as_str())
        }
        Ok(Retry::NotFound) => "No such message.".to_owned(),
        Err(e) => e.to_string(),
    };
    back(&to, &notice)
}

async fn approve(
    State(server): State<MailmuxServer>,
    axum::Extension(op): axum::Extension<Operator>,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    decide(server, op, id, form, true).await
}

async fn reject(
    State(server): State<MailmuxServer>,
    axum::Extension(op): axum::Extension<Operator>,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    decide(server, op, id, form, false).await
}

/// Approves or rejects a held message, bound to the content hash the
/// operator's page showed.
async fn decide(
    server: MailmuxServer,
    op: Operator,
    id: String,
    form: CsrfForm,
    approve: bool,
) -> Response {
    let Some(hash) = form.hash.as_deref().and_then(crate::policy::hash_from_text) else {
        return back(
            "/console/approvals",
            "The form did not name the content it approves; nothing was changed.",
        );
    };
    let decision = Decision {
        approve,
        by: format!("operator {}", op.name),
        hash: Some(hash),
    };
    let notice = match server.queue().decide(&id, decision).await {
        Ok(Decided::Released(_)) => {
            tracing::info!(message_id = %id, operator = %op.name, "operator approved a held message");
            format!("Approved {id}: it is queued for delivery.")
        }
        Ok(Decided::Rejected) => {
            tracing::info!(message_id = %id, operator = %op.name, "operator rejected a held message");
            format!("Rejected {id}: it will not be sent.")
        }
        Ok(Decided::NotHeld(state)) => {
            format!("{id} is {}, not held; nothing was changed.", state.as_str())
        }
        Ok(Decided::HashMismatch) => {
            "The message is not the one shown; nothing was changed.".to_owned()
        }
        Ok(Decided::NotFound) => "No such message.".to_owned(),
        Err(e) => e.to_string(),
    };
    back("/console/approvals", &notice)
}

async fn relays(
    State(server): State<MailmuxServer>,
    axum::Extension(op): axum::Extension<Operator>,
    Query(n): Query<Notice>,
) -> Response {
    let snapshot = server.dispatcher().status().await.ok();
    pages::relays(&op, n.notice.as_deref(), snapshot.as_ref()).into_response()
}

/// The query of the suppression list's page: a part of an address to
/// look for, and the address the page starts after.
#[derive(Debug, Default, Deserialize)]
struct ListedQuery {
    notice: Option<String>,
    q: Option<String>,
    after: Option<String>,
}

/// The suppression list as the store holds it, [`pages::LISTED_PAGE`]
/// addresses a page, by address, those holding `q` only.
async fn suppressions(
    State(server): State<MailmuxServer>,
    axum::Extension(op): axum::Extension<Operator>,
    Query(query): Query<ListedQuery>,
) -> Response {
    let q = query
        .q
        .as_deref()
        .map(|q| q.trim().to_lowercase())
        .filter(|q| !q.is_empty());
    let page = SuppressionQuery {
        contains: q.clone(),
        after: query.after.clone(),
        limit: Some(pages::LISTED_PAGE),
        counts: true,
    };
    let listing = server
        .queue()
        .suppression_page(&page)
        .await
        .map(|page| pages::Listing {
            page,
            q,
            after: query.after,
        })
        .map_err(|e| e.to_string());
    pages::suppressions(&op, query.notice.as_deref(), listing.as_ref()).into_response()
}

/// The console's form of an entry of the suppression list.
#[derive(Debug, Default, Deserialize)]
struct EntryForm {
    address: Option<String>,
    reason: Option<String>,
    note: Option<String>,
}

/// Lists an address, as `PUT /admin/suppressions/{address}` does: in the
/// store, in force on this daemon at once, audited as the operator's.
async fn suppress(
    State(server): State<MailmuxServer>,
    axum::Extension(op): axum::Extension<Operator>,
    Form(form): Form<EntryForm>,
) -> Response {
    let address = form.address.unwrap_or_default();
    let reason = form.reason.unwrap_or_else(|| "manual".into());
    let note = form.note.filter(|n| !n.trim().is_empty());
    let now = mailmux_actors::queue::now_millis();
    let notice = match crate::suppress::operator_entry(&address, &reason, note.as_deref(), now) {
        Err(e) => format!("Not listed: {e}."),
        Ok(entry) => {
            let shown = entry.address.clone();
            match server
                .suppressions()
                .add(entry, &format!("operator {}", op.name))
                .await
            {
                Ok(true) => format!("Listed {shown}: no mail is accepted for it."),
                Ok(false) => format!("{shown} was listed already; its entry is kept."),
                Err(e) => format!("Not listed: {e}."),
            }
        }
    };
    back("/console/suppressions", &notice)
}

/// Takes an address off the list, as `DELETE /admin/suppressions/{address}`.
async fn unsuppress(
    State(server): State<MailmuxServer>,
    axum::Extension(op): axum::Extension<Operator>,
    Form(form): Form<EntryForm>,
) -> Response {
    let address = form.address.unwrap_or_default();
    let notice = match crate::suppress::key(&address) {
        None => format!("{address:?} is not an email address."),
        Some(k) => match server
            .suppressions()
            .remove(&k, &format!("operator {}", op.name))
            .await
        {
            Ok(true) => format!("Removed {k}: mail to it is accepted again."),
            Ok(false) => format!("{k} was not listed."),
            Err(e) => format!("Not removed: {e}."),
        },
    };
    back("/console/suppressions", &notice)
}

async fn reconnect(
    State(server): State<MailmuxServer>,
    axum::Extension(op): axum::Extension<Operator>,
    Path(name): Path<String>,
) -> Response {
    let notice = match server.dispatcher().reconnect(Some(&name)).await {
        Ok(s) => {
            tracing::info!(relay = %name, operator = %op.name, "operator reconnected a relay");
            let state = s
                .relays
                .iter()
                .find(|r| r.name == name)
                .map_or("unknown", |r| r.state.as_str());
            format!("Reconnected {name}: it is {state}.")
        }
        Err(e) => e.to_string(),
    };
    back("/console/relays", &notice)
}

async fn pin(
    State(server): State<MailmuxServer>,
    axum::Extension(op): axum::Extension<Operator>,
    Path(name): Path<String>,
) -> Response {
    let notice = match server.dispatcher().pin(Some(name.clone())).await {
        Ok(_) => {
            tracing::info!(relay = %name, operator = %op.name, "operator pinned a relay");
            format!("Pinned {name}: every message goes to it first.")
        }
        Err(e) => e.to_string(),
    };
    back("/console/relays", &notice)
}

async fn unpin(
    State(server): State<MailmuxServer>,
    axum::Extension(op): axum::Extension<Operator>,
) -> Response {
    let notice = match server.dispatcher().pin(None).await {
        Ok(_) => {
            tracing::info!(operator = %op.name, "operator unpinned the relays");
            "Unpinned: the strategy picks the relay again.".to_owned()
        }
        Err(e) => e.to_string(),
    };
    back("/console/relays", &notice)
}

#[derive(Debug, Default, Deserialize)]
struct PauseForm {
    reason: Option<String>,
}

/// Pauses delivery, as `POST /admin/pause` does.
async fn pause(
    State(server): State<MailmuxServer>,
    axum::Extension(op): axum::Extension<Operator>,
    Form(form): Form<PauseForm>,
) -> Response {
    let notice = match crate::mcp::http::pause_reason(form.reason) {
        Err(e) => format!("Not paused: {e}."),
        Ok(reason) => match server
            .pause_delivery(&format!("operator {}", op.name), reason)
            .await
        {
            Ok((_, true)) => {
                "Paused: mail is accepted and queued, and none goes to a relay until you resume."
                    .to_owned()
            }
            Ok((p, false)) => format!("Delivery was paused already, by {}.", p.by),
            Err(e) => format!("Not paused: {e}."),
        },
    };
    back("/console", &notice)
}

/// Resumes delivery, as `DELETE /admin/pause` does.
async fn resume(
    State(server): State<MailmuxServer>,
    axum::Extension(op): axum::Extension<Operator>,
) -> Response {
    let notice = match server
        .resume_delivery(&format!("operator {}", op.name))
        .await
    {
        Ok(true) => "Resumed: the queued mail goes out.".to_owned(),
        Ok(false) => "Delivery was not paused.".to_owned(),
        Err(e) => format!("Not resumed: {e}."),
    };
    back("/console", &notice)
}

/// Samples the dispatcher for the overview's charts while the runtime lives.
pub fn spawn_sampler(server: MailmuxServer) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(chart::SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Ok(s) = server.dispatcher().status().await {
                server.console().history.sample(&s);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_and_hash_parsing() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; mailmux_console=abc; b=2".parse().unwrap(),
        );
        assert_eq!(session_id(&h), Some("abc"));
        assert_eq!(
            crate::policy::hash_from_text(&"ab".repeat(32)),
            Some([0xab; 32])
        );
        assert_eq!(crate::policy::hash_from_text("ab"), None);
        assert_eq!(crate::policy::hash_from_text(&"zz".repeat(32)), None);
        assert_eq!(urlencode("a b&c"), "a%20b%26c");
    }

    #[test]
    fn the_queue_page_takes_the_reasons_of_reports_list_messages_takes() {
        assert_eq!(report_reason(None), Ok(None));
        assert_eq!(report_reason(Some(" ")), Ok(None));
        assert_eq!(report_reason(Some("bounced")), Ok(Some("bounced")));
        assert_eq!(report_reason(Some(" complained ")), Ok(Some("complained")));
        assert_eq!(report_reason(Some("Bounced")), Err("Bounced".to_owned()));
        assert_eq!(report_reason(Some(&"x".repeat(100))).unwrap_err().len(), 64);
    }

    #[test]
    fn sessions_expire_and_sign_out() {
        let c = Console::default();
        let (id, s) = c.sign_in([1; 32]);
        assert_eq!(c.session(&id).map(|s| s.csrf), Some(s.csrf));
        assert!(c.session("other").is_none());
        c.sign_out(&id);
        assert!(c.session(&id).is_none());
    }
}
