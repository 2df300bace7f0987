//! The console's pages, rendered by maud (which escapes every value it
//! writes). No page shows a secret. Only [`message`] and [`approvals`] show a
//! message body.

use mail_parser::{MessageParser, MimeHeaders};
use mailmux_actors::queue::{Filter, Pending, Record, State, Summary};
use mailmux_actors::{RelayStatus, Snapshot};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::Operator;
use super::chart::History;
use crate::mcp::types::{QueueOut, rfc3339};
use crate::policy::shown;

/// The pages' one style sheet, inline: the console serves no other file.
const STYLE: &str = r#"
:root { --fg:#0f172a; --muted:#64748b; --line:#e2e8f0; --bg:#f8fafc; --accent:#2563eb; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; color:var(--fg); background:var(--bg); }
header { background:#0f172a; color:#f8fafc; padding:0 24px; display:flex; align-items:center; gap:24px; height:52px; }
header .brand { font-weight:600; letter-spacing:.02em; }
header nav a { color:#cbd5e1; text-decoration:none; margin-right:16px; padding:15px 0; }
header nav a.active, header nav a:hover { color:#fff; border-bottom:2px solid #60a5fa; }
header .who { margin-left:auto; color:#94a3b8; display:flex; gap:12px; align-items:center; }
header .who button { background:transparent; color:#cbd5e1; border:1px solid #334155; }
main { max-width:1180px; margin:24px auto; padding:0 24px; }
td.actions { white-space:nowrap; }
h1 { font-size:20px; margin:0 0 16px; }
h2 { font-size:15px; margin:24px 0 8px; color:#334155; }
.card { background:#fff; border:1px solid var(--line); border-radius:8px; padding:16px; margin-bottom:16px; }
.grid { display:grid; grid-template-columns:repeat(auto-fit,minmax(320px,1fr)); gap:16px; }
table { width:100%; border-collapse:collapse; background:#fff; }
th, td { text-align:left; padding:7px 10px; border-bottom:1px solid var(--line); vertical-align:top; }
th { font-weight:600; color:#475569; font-size:12px; text-transform:uppercase; letter-spacing:.03em; background:#f1f5f9; }
td.num { text-align:right; font-variant-numeric:tabular-nums; }
code, pre, .mono { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:12.5px; }
pre { white-space:pre-wrap; word-break:break-word; background:#f1f5f9; padding:12px; border-radius:6px; margin:0; max-height:420px; overflow:auto; }
.state { display:inline-block; padding:1px 8px; border-radius:999px; font-size:12px; font-weight:600; background:#e2e8f0; color:#334155; }
.state.healthy, .state.sent { background:#dcfce7; color:#166534; }
.state.backing_off, .state.queued, .state.scheduled, .state.sending, .state.partial { background:#fef3c7; color:#92400e; }
.state.circuit_open, .state.failed, .state.unknown, .state.rejected, .state.expired { background:#fee2e2; color:#991b1b; }
.state.held { background:#ede9fe; color:#5b21b6; }
.state.disabled, .state.cancelled { background:#e5e7eb; color:#374151; }
.notice { background:#eff6ff; border:1px solid #bfdbfe; color:#1e3a8a; padding:10px 14px; border-radius:6px; margin-bottom:16px; }
.error { background:#fef2f2; border:1px solid #fecaca; color:#991b1b; padding:10px 14px; border-radius:6px; margin-bottom:16px; }
.muted { color:var(--muted); }
button, .button { text-decoration:none; font:inherit; padding:6px 14px; border-radius:6px; border:1px solid #cbd5e1; background:#fff; cursor:pointer; color:var(--fg); }
button.primary { background:var(--accent); border-color:var(--accent); color:#fff; }
button.danger { background:#dc2626; border-color:#dc2626; color:#fff; }
form.inline { display:inline; }
form.filters { display:flex; gap:8px; align-items:end; flex-wrap:wrap; margin-bottom:12px; }
label { display:flex; flex-direction:column; font-size:12px; color:#475569; gap:2px; }
input, select, textarea { font:inherit; padding:6px 8px; border:1px solid #cbd5e1; border-radius:6px; background:#fff; }
dl { display:grid; grid-template-columns:160px 1fr; gap:4px 12px; margin:0; }
dt { color:var(--muted); }
dd { margin:0; word-break:break-word; }
.tag { font-size:11px; font-weight:600; background:#fde68a; color:#78350f; border-radius:4px; padding:0 5px; margin-left:4px; }
.chart { margin:0; }
.chart figcaption { font-size:12px; color:#475569; margin-bottom:4px; }
.chart .legend { margin-left:8px; font-weight:600; }
.login { max-width:380px; margin:12vh auto; }
.login input { width:100%; margin:6px 0 12px; }
.actions { display:flex; gap:8px; margin-top:12px; }
"#;

/// A whole page: header, navigation, notice, content.
fn layout(
    op: Option<&Operator>,
    title: &str,
    active: &str,
    notice: Option<&str>,
    body: Markup,
) -> Markup {
    // The overview refreshes itself every 30 s; no other page does (forms stay put).
    let refresh = active == "overview";
    let nav = [
        ("overview", "/console", "Overview"),
        ("queue", "/console/queue", "Queue"),
        ("approvals", "/console/approvals", "Approvals"),
        ("relays", "/console/relays", "Relays"),
        ("suppressions", "/console/suppressions", "Suppressed"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="same-origin";
                @if refresh { meta http-equiv="refresh" content="30"; }
                title { (title) " · mailmux" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    span.brand { "mailmux" }
                    @if let Some(op) = op {
                        nav {
                            @for (key, href, label) in nav {
                                a href=(href) class=[(key == active).then_some("active")] { (label) }
                            }
                        }
                        div.who {
                            span { "operator " strong { (op.name) } }
                            form.inline method="post" action="/console/logout" {
                                input type="hidden" name="csrf" value=(op.csrf);
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main {
                    @if let Some(n) = notice {
                        div.notice role="status" { (n) }
                    }
                    (body)
                }
            }
        }
    }
}

/// A page with a title and one paragraph (errors, refusals).
pub fn plain(title: &str, text: &str) -> Markup {
    layout(
        None,
        title,
        "",
        None,
        html! {
            div.card {
                h1 { (title) }
                p { (text) }
                p { a href="/console" { "Back to the console" } }
            }
        },
    )
}

pub fn login(error: Option<&str>) -> Markup {
    layout(
        None,
        "Sign in",
        "",
        None,
        html! {
            div.card.login {
                h1 { "Sign in" }
                p.muted { "Use an operator token from " code { "[[operators]]" } "." }
                @if let Some(e) = error {
                    div.error role="alert" { (e) }
                }
                form method="post" action="/console/login" {
                    label for="token" { "Operator token" }
                    input #token type="password" name="token" autocomplete="current-password" required autofocus;
                    button.primary type="submit" { "Sign in" }
                }
            }
        },
    )
}

/// The metadata search of a queue page as its form and links write it:
/// `NAME=VALUE`, one a line.
fn searched_metadata(filter: &Filter) -> Option<String> {
    let pairs: Vec<String> = filter
        .metadata
        .as_ref()?
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    (!pairs.is_empty()).then(|| pairs.join("\n"))
}

fn state_badge(s: &str) -> Markup {
    html! { span class={ "state " (s) } { (s) } }
}

fn when(ms: i64) -> String {
    let t = rfc3339(ms);
    // 2026-11-29T18:03:04.123Z → 2026-11-29 18:03:04
    t.get(..19).map_or(t.clone(), |s| s.replace('T', " "))
}

fn millis(d: std::time::Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

pub fn overview(
    op: &Operator,
    notice: Option<&str>,
    snapshot: Option<&Snapshot>,
    queue: &QueueOut,
    history: &History,
) -> Markup {
    let body = html! {
        h1 { "Overview" }
        div.grid {
            div.card { (history.throughput()) }
            div.card { (history.latency()) }
        }
        h2 { "Relays" }
        @match snapshot {
            Some(s) => (relay_table(s, false, None)),
            None => div.error { "The relays do not answer." },
        }
        h2 { "Queue" }
        div.card {
            dl {
                dt { "store" }
                dd {
                    (queue.store)
                    @if !queue.durable { " " span.tag { "not durable" } }
                    @if !queue.available { " " span.tag { "refusing writes" } }
                }
                @if let (Some(free), Some(min)) = (queue.free_bytes, queue.min_free) {
                    dt { "free space" }
                    dd {
                        (format!("{} MiB (new mail refused under {} MiB)", free >> 20, min >> 20))
                        @if free < min { " " span.tag { "refusing new mail" } }
                    }
                }
                dt { "delivery" }
                dd #delivery {
                    @match &queue.paused {
                        Some(p) => {
                            span.tag { "paused" }
                            " since " (p.since) " by " (p.by)
                            @if let Some(r) = &p.reason { ": " (r) }
                            " "
                            form.inline method="post" action="/console/delivery/resume" {
                                input type="hidden" name="csrf" value=(op.csrf);
                                button type="submit" { "Resume delivery" }
                            }
                        }
                        None => {
                            "running "
                            form.inline method="post" action="/console/delivery/pause" {
                                input type="hidden" name="csrf" value=(op.csrf);
                                input type="text" name="reason" maxlength="500" placeholder="reason";
                                " "
                                button type="submit" { "Pause delivery" }
                            }
                        }
                    }
                }
                dt { "oldest waiting" }
                dd {
                    @match queue.oldest_queued_age_secs {
                        Some(age) => (format!("{age:.0} s")),
                        None => span.muted { "none waiting" },
                    }
                }
                @if let Some(next) = &queue.next_retry_at {
                    dt { "next retry" } dd { (next) }
                }
                @if queue.sent_copies_pending > 0 {
                    dt { "Sent copies pending" } dd { (queue.sent_copies_pending) }
                }
            }
            table style="margin-top:12px" {
                thead { tr { @for st in State::ALL { th { (st.as_str()) } } } }
                tbody {
                    tr {
                        @for st in State::ALL {
                            td.num {
                                a href={ "/console/queue?state=" (st.as_str()) } {
                                    (queue.counts.get(st.as_str()).copied().unwrap_or(0))
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    layout(Some(op), "Overview", "overview", notice, body)
}

/// The relays as a table; with `controls`, each row has its buttons.
fn relay_table(s: &Snapshot, controls: bool, op: Option<&Operator>) -> Markup {
    html! {
        table {
            thead {
                tr {
                    th { "relay" } th { "state" } th { "in flight" } th { "connections" }
                    th { "sent" } th { "failed" }
                    // The controls take the room of the finer counters.
                    @if !controls {
                        th { "transient" } th { "relay faults" } th { "unknown" }
                        th { "failovers" } th { "p50" } th { "p99" }
                    }
                    th { "last error" }
                    @if controls { th { "" } }
                }
            }
            tbody {
                @for r in &s.relays {
                    (relay_row(r, s.pinned.as_deref() == Some(r.name.as_str()), controls, op))
                }
            }
        }
    }
}

fn relay_row(r: &RelayStatus, pinned: bool, controls: bool, op: Option<&Operator>) -> Markup {
    let c = &r.counters;
    html! {
        tr data-relay=(r.name) {
            td {
                strong { (r.name) }
                @if pinned { span.tag { "pinned" } }
                br;
                span.muted.mono {
                    @match (&r.host, r.port, &r.dir) {
                        (Some(h), Some(p), _) => (format!("{h}:{p}")),
                        (_, _, Some(d)) => (d),
                        _ => (r.kind),
                    }
                }
            }
            td {
                (state_badge(r.state.as_str()))
                @if let Some(retry) = r.state.retry_in() {
                    br; span.muted { (format!("retry in {:.0} s", retry.as_secs_f64())) }
                }
            }
            td.num { (r.in_flight) }
            td.num { (r.connections) }
            td.num { (c.sent + c.partial) }
            td.num { (c.permanent) }
            @if !controls {
                td.num { (c.transient) }
                td.num { (c.relay_fault) }
                td.num { (c.unknown) }
                td.num { (c.failovers_out) }
                td.num { (millis(r.latency.p50)) }
                td.num { (millis(r.latency.p99)) }
            }
            td.muted { (r.last_error.as_deref().unwrap_or("")) }
            @if controls {
                @if let Some(op) = op {
                    td.actions {
                        form.inline method="post" action={ "/console/relays/" (r.name) "/reconnect" } {
                            input type="hidden" name="csrf" value=(op.csrf);
                            button type="submit" { "Reconnect" }
                        }
                        " "
                        form.inline method="post" action={ "/console/relays/" (r.name) "/pin" } {
                            input type="hidden" name="csrf" value=(op.csrf);
                            button type="submit" { "Pin" }
                        }
                    }
                }
            }
        }
    }
}

pub fn relays(op: &Operator, notice: Option<&str>, snapshot: Option<&Snapshot>) -> Markup {
    let body = html! {
        h1 { "Relays" }
        @match snapshot {
            Some(s) => {
                div.card {
                    p {
                        "Strategy " strong { (s.strategy.as_str()) } ". "
                        @match &s.pinned {
                            Some(p) => { "Pinned to " strong { (p) } ": every message goes to it first. " }
                            None => { "No relay is pinned. " }
                        }
                        @if s.pinned.is_some() {
                            form.inline method="post" action="/console/relays/unpin" {
                                input type="hidden" name="csrf" value=(op.csrf);
                                button type="submit" { "Unpin" }
                            }
                        }
                    }
                    p.muted {
                        "Reconnect drops a relay's connections, resets its health and probes it. "
                        "Pin sends every message to that relay first; failover still applies."
                    }
                }
                (relay_table(s, true, Some(op)))
            }
            None => div.error { "The relays do not answer." },
        }
    };
    layout(Some(op), "Relays", "relays", notice, body)
}

/// The suppression list, with a form to add an address and a button to
/// remove each.
/// Addresses on one page of the suppression list.
pub const LISTED_PAGE: usize = 100;

/// One page of the suppression list, and the search and start that made it.
#[derive(Debug)]
pub struct Listing {
    pub page: mailmux_actors::queue::SuppressionPage,
    /// A part of an address to look for, in lower case.
    pub q: Option<String>,
    /// The address the page starts after.
    pub after: Option<String>,
}

pub fn suppressions(
    op: &Operator,
    notice: Option<&str>,
    listing: Result<&Listing, &String>,
) -> Markup {
    let body = html! {
        h1 { "Suppression list" }
        div.card {
            p.muted {
                "No mail is accepted for these addresses, whichever caller asks. "
                "The daemon lists an address a relay refused as unknown, a bounce or complaint report, "
                "or a recipient's unsubscribe link."
            }
            form.filters method="post" action="/console/suppressions/add" {
                input type="hidden" name="csrf" value=(op.csrf);
                label { "address" input #address type="email" name="address" required; }
                label {
                    "reason"
                    select name="reason" {
                        @for r in &crate::suppress::REASONS[1..] {
                            option value=(r) selected[*r == "manual"] { (r) }
                        }
                    }
                }
                label { "note" input #note type="text" name="note" maxlength="300"; }
                button type="submit" { "Add" }
            }
        }
        @match listing {
            Err(e) => div.error { "The store does not answer: " (e) }
            Ok(l) if l.page.total == 0 => div.card.muted { "No address is listed." }
            Ok(l) => {
                form.filters method="get" action="/console/suppressions" {
                    label { "find an address" input #q type="search" name="q" placeholder="part of an address" value=(l.q.as_deref().unwrap_or("")); }
                    button type="submit" { "Find" }
                    a.button href="/console/suppressions" { "All" }
                }
                p.muted #count {
                    (l.page.total) " listed"
                    @if l.q.is_some() { ", " (l.page.matching) " holding “" (l.q.as_deref().unwrap_or("")) "”" }
                    @if !l.page.entries.is_empty() {
                        "; " (l.page.entries.first().map_or("", |e| e.address.as_str()))
                        " to " (l.page.entries.last().map_or("", |e| e.address.as_str())) " shown"
                    }
                    "."
                }
                @if l.page.entries.is_empty() {
                    div.card.muted { "No listed address matches." }
                }
                table {
                    thead { tr { th { "address" } th { "reason" } th { "since" } th { "detail" } th { "message" } th {} } }
                    tbody {
                        @for e in &l.page.entries {
                            tr data-address=(e.address) {
                                td.mono { (e.address) }
                                td { (e.reason) }
                                td.mono { (when(e.at)) }
                                td { (e.detail.as_deref().unwrap_or("")) }
                                td.mono {
                                    @if let Some(id) = &e.message_id {
                                        a href={ "/console/messages/" (super::urlencode(id)) } { (id) }
                                    }
                                }
                                td {
                                    form.inline method="post" action="/console/suppressions/remove" {
                                        input type="hidden" name="csrf" value=(op.csrf);
                                        input type="hidden" name="address" value=(e.address);
                                        button type="submit" { "Remove" }
                                    }
                                }
                            }
                        }
                    }
                }
                @if l.after.is_some() || l.page.next_after.is_some() {
                    p {
                        @if l.after.is_some() {
                            a.button #first href={
                                "/console/suppressions"
                                @if let Some(q) = &l.q { "?q=" (super::urlencode(q)) }
                            } { "← First" }
                            " "
                        }
                        @if let Some(next) = &l.page.next_after {
                            a.button #next href={
                                "/console/suppressions?after=" (super::urlencode(next))
                                @if let Some(q) = &l.q { "&q=" (super::urlencode(q)) }
                            } { "Next " (LISTED_PAGE) " →" }
                        }
                    }
                }
            }
        }
    };
    layout(Some(op), "Suppression list", "suppressions", notice, body)
}

/// The queue page. `counts`: the messages per state of the batch or tag
/// the filter names, shown above the list, each a link to that state's.
pub fn queue(
    op: &Operator,
    notice: Option<&str>,
    filter: &Filter,
    counts: Option<&[(State, u64)]>,
    page: &[Summary],
    next: Option<i64>,
) -> Markup {
    let mut query = String::new();
    for (k, v) in [
        ("state", filter.state.map(|s| s.as_str().to_owned())),
        ("caller", filter.caller.clone()),
        ("recipient", filter.recipient.clone()),
        ("reported", filter.reported.clone()),
        ("batch", filter.batch.clone()),
        ("tag", filter.tag.clone()),
        ("metadata", searched_metadata(filter)),
    ] {
        if let Some(v) = v {
            query.push_str(&format!("&{k}={}", super::urlencode(&v)));
        }
    }
    // The batch or tag alone, for the links of its counts.
    let group: String = [("batch", &filter.batch), ("tag", &filter.tag)]
        .iter()
        .filter_map(|(k, v)| Some(format!("&{k}={}", super::urlencode(v.as_deref()?))))
        .collect();
    let body = html! {
        h1 { "Queue" }
        form.filters method="get" action="/console/queue" {
            label {
                "state"
                select name="state" {
                    option value="" { "any" }
                    @for st in State::ALL {
                        option value=(st.as_str()) selected[filter.state == Some(st)] { (st.as_str()) }
                    }
                }
            }
            label { "caller" input type="text" name="caller" value=(filter.caller.as_deref().unwrap_or("")); }
            label { "recipient" input type="text" name="recipient" placeholder="part of an address" value=(filter.recipient.as_deref().unwrap_or("")); }
            label {
                "report"
                select name="reported" {
                    option value="" { "any" }
                    @for reason in crate::bounces::REASONS {
                        option value=(reason) selected[filter.reported.as_deref() == Some(reason)] { (reason) }
                    }
                }
            }
            label { "tag" input type="text" name="tag" value=(filter.tag.as_deref().unwrap_or("")); }
            label {
                "metadata (name=value, one a line)"
                textarea name="metadata" rows="1" placeholder="name=value" {
                    (searched_metadata(filter).unwrap_or_default())
                }
            }
            @if let Some(batch) = &filter.batch {
                // Kept while filtering further; "Clear" drops it.
                input type="hidden" name="batch" value=(batch);
                span.tag { "batch " (batch) }
            }
            button type="submit" { "Filter" }
            a.button href="/console/queue" { "Clear" }
        }
        @if let Some(batch) = &filter.batch {
            form.inline method="post" action={ "/console/batches/" (super::urlencode(batch)) "/cancel" } {
                input type="hidden" name="csrf" value=(op.csrf);
                button type="submit" data-action="cancel-batch" { "Cancel every message of this batch not yet sent" }
            }
            " "
            a.button href={ "/console/approvals?batch=" (super::urlencode(batch)) } { "Its messages waiting for approval" }
        }
        @if let Some(counts) = counts {
            @let of = if filter.batch.is_some() { "This batch" } else { "This tag" };
            @let total: u64 = counts.iter().map(|c| c.1).sum();
            p.summary {
                (of) ": " (total) " messages"
                @for (st, n) in counts {
                    " · "
                    a href={ "/console/queue?state=" (st.as_str()) (group) } { (n) " " (st.as_str()) }
                }
            }
        }
        @if page.is_empty() && next.is_some() {
            div.card.muted { "No message matches among the " (mailmux_actors::queue::SEARCH_ROWS) " read: a search by recipient or report reads that many a page. Older ones follow." }
        } @else if page.is_empty() {
            div.card.muted { "No message matches." }
        } @else {
            table {
                thead { tr { th { "accepted" } th { "message" } th { "state" } th { "from" } th { "to" } th { "caller" } th { "tag" } th { "relay" } } }
                tbody {
                    @for m in page {
                        tr {
                            td.mono { (when(m.queued_at)) }
                            td.mono { a href={ "/console/messages/" (super::urlencode(&m.message_id)) } { (m.message_id) } }
                            td {
                                (state_badge(m.state.as_str()))
                                @if m.priority.is_high() { " " span.tag { "high" } }
                            }
                            td { (m.from.as_deref().unwrap_or("")) }
                            td {
                                (m.to.first().map(String::as_str).unwrap_or(""))
                                @if m.to.len() > 1 { span.muted { (format!(" +{}", m.to.len() - 1)) } }
                            }
                            td { (m.caller.as_deref().unwrap_or("")) }
                            td { (m.tag.as_deref().unwrap_or("")) }
                            td { (m.relay.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
        }
        @if let Some(before) = next {
            p { a.button href={ "/console/queue?before=" (before) (query) } { "Older →" } }
        }
    };
    layout(Some(op), "Queue", "queue", notice, body)
}

/// What the console shows of a stored message: its header block, its text
/// body, its attachments, and which envelope recipients are Bcc. The
/// subject, text and attachment names are as [`shown::text`] writes them.
struct Parsed {
    headers: String,
    subject: String,
    /// Where replies go, when the message names it.
    reply_to: Option<String>,
    /// The sender's display name in the From header, as recipients see it.
    from_name: Option<String>,
    text: String,
    attachments: Vec<(String, String, usize)>,
    visible: Vec<String>,
    /// The fields the sender wrote by name (`headers`, the unsubscribe
    /// links), decoded: they carry its text to the recipients as the body
    /// does.
    own_fields: Vec<(String, String)>,
}

fn parse(bytes: &[u8]) -> Parsed {
    let header_end = memchr::memmem::find(bytes, b"\r\n\r\n").unwrap_or(bytes.len());
    let headers = String::from_utf8_lossy(&bytes[..header_end]).into_owned();
    // The fields the console reads, and every other as text, its encoded
    // words read (the default parser keeps those raw).
    let parser = MessageParser::new()
        .with_minimal_headers()
        .default_header_text();
    let Some(m) = parser.parse(bytes) else {
        return Parsed {
            headers,
            subject: String::new(),
            reply_to: None,
            from_name: None,
            text: String::new(),
            attachments: Vec::new(),
            visible: Vec::new(),
            own_fields: Vec::new(),
        };
    };
    let mut visible = Vec::new();
    for list in [m.to(), m.cc()].into_iter().flatten() {
        for a in list.iter() {
            if let Some(addr) = a.address() {
                visible.push(addr.to_lowercase());
            }
        }
    }
    let attachments = m
        .attachments()
        .map(|p| {
            let ctype = p
                .content_type()
                .map(|c| match c.subtype() {
                    Some(sub) => format!("{}/{sub}", c.ctype()),
                    None => c.ctype().to_owned(),
                })
                .unwrap_or_default();
            (
                shown::text(p.attachment_name().unwrap_or("(unnamed)")),
                ctype,
                p.len(),
            )
        })
        .collect();
    Parsed {
        headers,
        subject: shown::text(m.subject().unwrap_or("")),
        from_name: m
            .from()
            .and_then(|f| f.first())
            .and_then(|a| a.name())
            .filter(|n| !n.trim().is_empty())
            .map(shown::text),
        reply_to: m
            .reply_to()
            .and_then(|r| r.first())
            .and_then(|a| a.address())
            .map(shown::address),
        text: shown::text(&m.body_text(0).unwrap_or_default()),
        attachments,
        visible,
        own_fields: own_fields(&m, bytes),
    }
}

/// The fields of `m` that its sender wrote by name, each decoded (encoded
/// words read) and unfolded, as [`shown::text`] writes it.
fn own_fields(m: &mail_parser::Message<'_>, bytes: &[u8]) -> Vec<(String, String)> {
    use mail_parser::HeaderValue;
    m.headers()
        .iter()
        .filter(|h| crate::compose::caller_field(h.name()))
        .map(|h| {
            let value = match h.value() {
                HeaderValue::Text(t) => t.to_string(),
                HeaderValue::TextList(list) => list.join(", "),
                _ => {
                    let (start, end) = (h.offset_start() as usize, h.offset_end() as usize);
                    let raw = bytes.get(start..end).unwrap_or_default();
                    String::from_utf8_lossy(raw).replace("\r\n", "")
                }
            };
            (h.name().to_owned(), shown::text(value.trim()))
        })
        .collect()
}

/// The sender's own header fields, one a line.
fn field_list(fields: &[(String, String)]) -> Markup {
    html! { @for (name, value) in fields { div.mono { (name) ": " (value) } } }
}

/// The sender as recipients see it: the display name of the From header
/// (when there is one) and the envelope's address.
fn sender(name: Option<&str>, address: Option<&str>) -> String {
    let address = shown::address(address.unwrap_or(""));
    match name {
        Some(name) => format!("\"{name}\" <{address}>"),
        None => address,
    }
}

/// The envelope's recipients, each marked Bcc when no To or Cc header
/// names it, and shown as [`shown::address`] writes them.
fn recipients(to: &[String], visible: &[String]) -> Markup {
    html! {
        @for r in to {
            span.mono { (shown::address(r)) }
            @if !visible.contains(&r.to_lowercase()) { span.tag { "bcc" } }
            br;
        }
    }
}

fn attachment_list(list: &[(String, String, usize)]) -> Markup {
    html! {
        @if list.is_empty() {
            span.muted { "none" }
        } @else {
            @for (name, ctype, size) in list {
                span.mono { (name) } span.muted { " · " (ctype) " · " (size) " bytes" } br;
            }
        }
    }
}

/// The hash of a held message's content, as its buttons carry it.
fn content_hash(p: &Pending) -> String {
    crate::policy::hash_text(&crate::policy::approval_hash(
        p.from.as_deref().unwrap_or(""),
        &p.to,
        &p.bytes,
    ))
}

/// One message of a batch's form: `id hash`.
fn decided_one(p: &Pending) -> String {
    format!("{} {}", p.message_id, content_hash(p))
}

/// The approve and reject buttons of a held message, bound to the hash of
/// the content shown.
fn decide_forms(op: &Operator, p: &Pending) -> Markup {
    let hash = content_hash(p);
    let id = super::urlencode(&p.message_id);
    html! {
        div.actions {
            form.inline method="post" action={ "/console/messages/" (id) "/approve" } {
                input type="hidden" name="csrf" value=(op.csrf);
                input type="hidden" name="hash" value=(hash);
                button.primary type="submit" data-action="approve" { "Approve and send" }
            }
            form.inline method="post" action={ "/console/messages/" (id) "/reject" } {
                input type="hidden" name="csrf" value=(op.csrf);
                input type="hidden" name="hash" value=(hash);
                button.danger type="submit" data-action="reject" { "Reject" }
            }
        }
    }
}

pub fn message(
    op: &Operator,
    notice: Option<&str>,
    r: &Record,
    stored: Option<&Pending>,
) -> Markup {
    let parsed = stored.map(|p| parse(&p.bytes));
    let visible = parsed
        .as_ref()
        .map(|p| p.visible.clone())
        .unwrap_or_default();
    let id = super::urlencode(&r.message_id);
    let cancellable = matches!(r.state, State::Scheduled | State::Queued);
    let deferred = r.deferred();
    let retryable = matches!(
        r.state,
        State::Queued | State::Expired | State::Failed | State::Unknown
    );
    let body = html! {
        h1 { "Message " span.mono { (r.message_id) } }
        div.card {
            dl {
                dt { "state" } dd { (state_badge(r.state.as_str())) }
                dt { "from" } dd.mono { (sender(parsed.as_ref().and_then(|p| p.from_name.as_deref()), r.from.as_deref())) }
                dt { "recipients" } dd { (recipients(&r.to, &visible)) }
                @if !deferred.is_empty() {
                    dt { "deferred" } dd.mono { (deferred.join(", ")) }
                }
                @if let Some(r) = parsed.as_ref().and_then(|p| p.reply_to.as_ref()) {
                    dt { "replies go to" } dd.mono { (r) }
                }
                @if let Some(p) = &parsed { dt { "subject" } dd { (p.subject) } }
                @if let Some(p) = parsed.as_ref().filter(|p| !p.own_fields.is_empty()) {
                    dt { "header fields" } dd { (field_list(&p.own_fields)) }
                }
                dt { "size" } dd { (r.size) " bytes" }
                dt { "caller" } dd { (r.caller.as_deref().unwrap_or("")) }
                @let meta = crate::audit::Meta::of(r.meta.as_deref());
                @if let Some(why) = &meta.held_by {
                    dt { "held because" } dd { (why) }
                }
                @if let Some(t) = &meta.template {
                    dt { "template" } dd { (t) }
                }
                @if let Some(batch) = &r.batch {
                    dt { "batch" }
                    dd.mono { a href={ "/console/queue?batch=" (super::urlencode(batch)) } { (batch) } }
                }
                @if let Some(tag) = &r.tag {
                    dt { "tag" }
                    dd { a href={ "/console/queue?tag=" (super::urlencode(tag)) } { (tag) } }
                }
                @if r.priority.is_high() {
                    dt { "priority" } dd { "high" }
                }
                @if let Some(ms) = r.max_age {
                    dt { "own max_age" }
                    dd { (humantime::format_duration(mailmux_actors::queue::duration(ms))) }
                }
                @if !meta.metadata.is_empty() {
                    dt { "metadata" } dd { (field_list(&meta.metadata.into_iter().collect::<Vec<_>>())) }
                }
                dt { "relay" } dd { (r.relay.as_deref().unwrap_or("")) }
                dt { "accepted" } dd.mono { (when(r.queued_at)) }
                @if let Some(next) = r.next_attempt_at {
                    dt { @if r.state == State::Held { "approval deadline" } @else { "next attempt" } }
                    dd.mono { (when(next)) }
                }
                @if let Some(reason) = &r.reason { dt { "reason" } dd { (reason) } }
                @if let Some(by) = &r.decided_by { dt { "decided by" } dd { (by) } }
                @if let Some(key) = &r.idempotency_key { dt { "idempotency key" } dd.mono { (key) } }
            }
            @if cancellable || retryable {
                div.actions {
                    @if cancellable {
                        form.inline method="post" action={ "/console/messages/" (id) "/cancel" } {
                            input type="hidden" name="csrf" value=(op.csrf);
                            button type="submit" { "Cancel" }
                        }
                    }
                    @if retryable {
                        form.inline method="post" action={ "/console/messages/" (id) "/retry" } {
                            input type="hidden" name="csrf" value=(op.csrf);
                            @if r.state == State::Unknown {
                                label style="display:inline-flex;flex-direction:row;gap:4px;align-items:center" {
                                    input type="checkbox" name="force";
                                    "send again anyway (it may have been delivered)"
                                }
                                " "
                            }
                            button type="submit" { "Retry now" }
                        }
                    }
                }
            }
            @if r.state == State::Held {
                @if let Some(p) = stored { (decide_forms(op, p)) }
            }
        }
        h2 { "State history" }
        table {
            thead { tr { th { "time" } th { "state" } } }
            tbody {
                @for (st, at) in &r.history {
                    tr { td.mono { (when(*at)) } td { (state_badge(st.as_str())) } }
                }
            }
        }
        h2 { "Attempts" }
        @if r.attempts.is_empty() {
            div.card.muted { "No attempt yet." }
        } @else {
            table {
                thead { tr { th { "time" } th { "relay" } th { "outcome" } th { "reply" } th { "took" } } }
                tbody {
                    @for a in &r.attempts {
                        tr {
                            td.mono { (when(a.at)) }
                            td { (a.relay) }
                            td { (a.class.as_deref().unwrap_or("delivered")) }
                            td.mono { @if let Some(c) = a.code { (c) " " } (a.text) }
                            td.num { (a.duration_ms) " ms" }
                        }
                    }
                }
            }
        }
        @if !r.reports.is_empty() {
            h2 { "Reports that came back" }
            table {
                thead { tr { th { "read" } th { "recipient" } th { "report" } th { "detail" } } }
                tbody {
                    @for x in &r.reports {
                        tr {
                            td.mono { (when(x.at)) }
                            td.mono { (x.address) }
                            td { (x.reason) }
                            td.mono { (x.detail) }
                        }
                    }
                }
            }
        }
        @match &parsed {
            Some(p) => {
                h2 { "Attachments" }
                div.card { (attachment_list(&p.attachments)) }
                h2 { "Headers" }
                pre { (p.headers) }
                h2 { "Text body" }
                pre.body { (p.text) }
            }
            None => {
                h2 { "Content" }
                div.card.muted { "The store no longer keeps this message's content." }
            }
        }
    };
    layout(Some(op), "Message", "queue", notice, body)
}

/// The held messages, or those of one batch (`batch`): each in full with
/// its own approve and reject buttons; for a batch, also one form that
/// decides every message shown, each bound to the hash of its content.
pub fn approvals(
    op: &Operator,
    notice: Option<&str>,
    batch: Option<&str>,
    held: &[(Summary, Pending)],
) -> Markup {
    let body = html! {
        h1 { "Approvals" @if let Some(b) = batch { " " span.tag { "batch " (b) } } }
        @if held.is_empty() {
            div.card.muted { "No message is waiting for approval." }
        }
        @if let (Some(b), false) = (batch, held.is_empty()) {
            @let shown: Vec<String> = held.iter().map(|(_, p)| decided_one(p)).collect();
            div.actions {
                @for (verb, class, label) in [
                    ("approve", "primary", format!("Approve and send all {} shown", held.len())),
                    ("reject", "danger", format!("Reject all {} shown", held.len())),
                ] {
                    form.inline method="post" action={ "/console/batches/" (super::urlencode(b)) "/" (verb) } {
                        input type="hidden" name="csrf" value=(op.csrf);
                        @for m in &shown { input type="hidden" name="m" value=(m); }
                        button class=(class) type="submit" data-action={ (verb) "-batch" } { (label) }
                    }
                }
            }
        }
        @for (s, p) in held {
            @let parsed = parse(&p.bytes);
            div.card data-message=(s.message_id) {
                dl {
                    dt { "message" } dd.mono { a href={ "/console/messages/" (super::urlencode(&s.message_id)) } { (s.message_id) } }
                    dt { "caller" } dd { (s.caller.as_deref().unwrap_or("")) }
                    @let meta = crate::audit::Meta::of(p.meta.as_deref());
                    @if let Some(why) = &meta.held_by {
                        dt { "held because" } dd { (why) }
                    }
                    @if let Some(t) = &meta.template {
                        dt { "template" } dd { (t) }
                    }
                    dt { "accepted" } dd.mono { (when(s.queued_at)) }
                    dt { "from" } dd.mono { (sender(parsed.from_name.as_deref(), p.from.as_deref())) }
                    dt { "recipients" } dd { (recipients(&p.to, &parsed.visible)) }
                    @if let Some(r) = &parsed.reply_to { dt { "replies go to" } dd.mono { (r) } }
                    dt { "subject" } dd { (parsed.subject) }
                    @if !parsed.own_fields.is_empty() {
                        dt { "header fields" } dd { (field_list(&parsed.own_fields)) }
                    }
                    dt { "attachments" } dd { (attachment_list(&parsed.attachments)) }
                }
                h2 { "Text body" }
                pre.body { (parsed.text) }
                (decide_forms(op, p))
            }
        }
    };
    layout(Some(op), "Approvals", "approvals", notice, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An operator, an empty history and a SQLite queue that takes writes.
    fn overview_of_sqlite() -> (Operator, History, QueueOut) {
        let op = Operator {
            name: "ops".into(),
            csrf: "c".into(),
        };
        let queue = QueueOut {
            store: "sqlite".into(),
            durable: true,
            available: true,
            ..Default::default()
        };
        (op, History::default(), queue)
    }

    #[test]
    fn the_overview_shows_the_sent_copies_pending_only_when_there_are_some() {
        let (op, history, mut queue) = overview_of_sqlite();
        let page = overview(&op, None, None, &queue, &history).into_string();
        assert!(!page.contains("Sent copies pending"), "{page}");
        queue.sent_copies_pending = 20;
        let page = overview(&op, None, None, &queue, &history).into_string();
        assert!(
            page.contains("<dt>Sent copies pending</dt><dd>20</dd>"),
            "{page}"
        );
    }

    /// A message of caller `local` as it is stored, in no batch.
    fn stored() -> mailmux_actors::queue::NewMessage {
        mailmux_actors::queue::NewMessage {
            message_id: "m1@example.org".into(),
            from: Some("a@example.org".into()),
            to: vec!["b@example.org".into()],
            bytes: std::sync::Arc::from(&b"Subject: s\r\n\r\nb"[..]),
            prefer: None,
            queued_at: 0,
            due_at: 0,
            idempotency: None,
            caller: Some("local".into()),
            meta: None,
            hold: None,
            only: None,
            batch: None,
            tag: None,
            max_age: None,
            priority: Default::default(),
        }
    }

    #[test]
    fn a_message_links_to_its_batch_and_the_queue_page_keeps_that_filter() {
        let (op, _, _) = overview_of_sqlite();
        let new = mailmux_actors::queue::NewMessage {
            batch: Some("batch-0123456789abcdef".into()),
            ..stored()
        };
        let page = message(&op, None, &new.record(State::Sent, 0), None).into_string();
        assert!(
            page.contains(r#"href="/console/queue?batch=batch-0123456789abcdef""#),
            "{page}"
        );
        assert!(
            !page.contains("?tag=") && !page.contains("metadata"),
            "{page}"
        );
        let filter = Filter {
            batch: Some("batch-0123456789abcdef".into()),
            ..Filter::default()
        };
        let page = queue(&op, None, &filter, None, &[], None).into_string();
        assert!(
            page.contains(r#"name="batch" value="batch-0123456789abcdef""#),
            "{page}"
        );
        assert!(
            page.contains(r#"action="/console/batches/batch-0123456789abcdef/cancel""#),
            "{page}"
        );
        let page = queue(&op, None, &Filter::default(), None, &[], None).into_string();
        assert!(!page.contains("/console/batches/"), "{page}");
        let single = mailmux_actors::queue::NewMessage { batch: None, ..new };
        let page = message(&op, None, &single.record(State::Sent, 0), None).into_string();
        assert!(!page.contains("?batch="), "{page}");
    }

    #[test]
    fn a_search_by_recipient_that_read_its_rows_without_a_match_says_older_ones_follow() {
        let (op, _, _) = overview_of_sqlite();
        let filter = Filter {
            recipient: Some("ada@".into()),
            ..Filter::default()
        };
        let page = queue(&op, None, &filter, None, &[], Some(42)).into_string();
        assert!(
            page.contains("No message matches among the 10000 read"),
            "{page}"
        );
        assert!(
            page.contains(r#"href="/console/queue?before=42&amp;recipient=ada%40""#),
            "{page}"
        );
        let page = queue(&op, None, &filter, None, &[], None).into_string();
        assert!(page.contains("No message matches."), "{page}");
        assert!(!page.contains("before="), "{page}");
    }

    #[test]
    fn the_queue_page_keeps_a_report_filter_selected_and_in_its_older_link() {
        let (op, _, _) = overview_of_sqlite();
        let filter = Filter {
            reported: Some("complained".into()),
            ..Filter::default()
        };
        let page = queue(&op, None, &filter, None, &[], Some(7)).into_string();
        assert!(
            page.contains(r#"<option value="complained" selected>complained</option>"#),
            "{page}"
        );
        assert!(
            page.contains(r#"<option value="bounced">bounced</option>"#),
            "{page}"
        );
        assert!(
            page.contains(r#"href="/console/queue?before=7&amp;reported=complained""#),
            "{page}"
        );
        let page = queue(&op, None, &Filter::default(), None, &[], None).into_string();
        assert!(!page.contains("selected>complained"), "{page}");
    }

    #[test]
    fn the_queue_page_keeps_a_metadata_search_in_its_form_and_older_link() {
        let (op, _, _) = overview_of_sqlite();
        let filter = Filter {
            metadata: Some([("customer_id".into(), "c 42".into())].into()),
            ..Filter::default()
        };
        let page = queue(&op, None, &filter, None, &[], Some(7)).into_string();
        assert!(page.contains(">customer_id=c 42</textarea>"), "{page}");
        assert!(
            page.contains(r#"href="/console/queue?before=7&amp;metadata=customer_id%3Dc%2042""#),
            "{page}"
        );
        // Several names, one a line, in the form and the link alike.
        let filter = Filter {
            metadata: Some(
                [
                    ("customer_id".into(), "c 42".into()),
                    ("order".into(), "o=18".into()),
                ]
                .into(),
            ),
            ..Filter::default()
        };
        let page = queue(&op, None, &filter, None, &[], Some(7)).into_string();
        assert!(
            page.contains(">customer_id=c 42\norder=o=18</textarea>"),
            "{page}"
        );
        assert!(
            page.contains("metadata=customer_id%3Dc%2042%0Aorder%3Do%3D18\""),
            "{page}"
        );
    }

    #[test]
    fn a_message_shows_its_tag_and_metadata_and_the_queue_page_filters_by_tag() {
        let (op, _, _) = overview_of_sqlite();
        let meta = crate::audit::Meta {
            tag: Some("spring <sale>".into()),
            metadata: [("customer".to_owned(), "c-42".to_owned())].into(),
            ..Default::default()
        };
        let new = mailmux_actors::queue::NewMessage {
            meta: Some(serde_json::to_string(&meta).unwrap()),
            tag: meta.tag.clone(),
            max_age: Some(300_000),
            priority: mailmux_actors::Priority::High,
            ..stored()
        };
        let page = message(&op, None, &new.record(State::Sent, 0), None).into_string();
        assert!(
            page.contains(
                r#"href="/console/queue?tag=spring%20%3Csale%3E">spring &lt;sale&gt;</a>"#
            ),
            "{page}"
        );
        assert!(page.contains("customer: c-42"), "{page}");
        assert!(page.contains("<dd>5m</dd>"), "{page}");
        assert!(page.contains("<dt>priority</dt><dd>high</dd>"), "{page}");
        let filter = Filter {
            tag: Some("spring <sale>".into()),
            ..Filter::default()
        };
        let page = queue(&op, None, &filter, None, &[], None).into_string();
        assert!(
            page.contains(r#"name="tag" value="spring &lt;sale&gt;""#),
            "{page}"
        );
        // The tag's messages per state, each a link to that state's.
        let counts = [(State::Queued, 30), (State::Sent, 950)];
        let filter = Filter {
            state: Some(State::Failed),
            ..filter
        };
        let high = Summary {
            message_id: "m1@example.org".into(),
            state: State::Queued,
            priority: mailmux_actors::Priority::High,
            from: None,
            to: vec!["b@example.org".into()],
            queued_at: 0,
            updated_at: 0,
            relay: None,
            caller: None,
            node: None,
            batch: None,
            tag: filter.tag.clone(),
        };
        let page = queue(&op, None, &filter, Some(&counts), &[high], None).into_string();
        assert!(page.contains(r#"<span class="tag">high</span>"#), "{page}");
        assert!(page.contains("This tag: 980 messages"), "{page}");
        assert!(
            page.contains(
                r#"<a href="/console/queue?state=sent&amp;tag=spring%20%3Csale%3E">950 sent</a>"#
            ),
            "{page}"
        );
    }

    #[test]
    fn the_overview_shows_the_free_space_and_says_when_new_mail_is_refused() {
        let (op, history, mut queue) = overview_of_sqlite();
        queue.free_bytes = Some(300 << 20);
        queue.min_free = Some(100 << 20);
        let page = overview(&op, None, None, &queue, &history).into_string();
        assert!(
            page.contains("300 MiB (new mail refused under 100 MiB)"),
            "{page}"
        );
        assert!(!page.contains("refusing new mail"), "{page}");
        queue.free_bytes = Some(60 << 20);
        let page = overview(&op, None, None, &queue, &history).into_string();
        assert!(page.contains("refusing new mail"), "{page}");
        queue.free_bytes = None;
        let page = overview(&op, None, None, &queue, &history).into_string();
        assert!(!page.contains("free space"), "no reserve, no line: {page}");
    }

    #[test]
    fn the_approvals_page_shows_lookalike_domains_and_hidden_characters() {
        let (op, _, _) = overview_of_sqlite();
        let lookalike = "boss@ex\u{430}mple.org";
        let bytes = format!(
            "From: \"IT Security\" <a@example.org>\r\nTo: {lookalike}\r\nReply-To: out@evil.example\r\nSubject: invoice \u{202E}fdp.exe\r\n\
             X-Data: =?utf-8?b?dGhlIGN1c3RvbWVyIGxpc3Q=?=\r\nList-Unsubscribe: <https://example.org/u?r=1>,\r\n <mailto:u@example.org>\r\n\
             Auto-Submitted: auto-generated\r\n\
             MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Transfer-Encoding: 8bit\r\n\r\nhello\u{200B} there\r\n"
        );
        let pending = Pending {
            message_id: "m1@example.org".into(),
            state: State::Held,
            from: Some("a@example.org".into()),
            to: vec![lookalike.into()],
            bytes: std::sync::Arc::from(bytes.as_bytes()),
            prefer: None,
            due_at: 0,
            rounds: 0,
            caller: Some("local".into()),
            meta: None,
            only: None,
            max_age: None,
            priority: Default::default(),
            accepted: vec![],
            rejected: vec![],
            copied: false,
        };
        let summary = Summary {
            message_id: "m1@example.org".into(),
            state: State::Held,
            from: pending.from.clone(),
            to: pending.to.clone(),
            queued_at: 0,
            updated_at: 0,
            relay: None,
            caller: pending.caller.clone(),
            node: None,
            batch: None,
            tag: None,
            priority: Default::default(),
        };
        let page = approvals(&op, None, None, &[(summary, pending)]).into_string();
        assert!(page.contains("boss@xn--exmple-"), "{page}");
        assert!(page.contains("an international domain"), "{page}");
        assert!(
            page.contains("&quot;IT Security&quot; &lt;a@example.org&gt;"),
            "{page}"
        );
        assert!(
            page.contains("<dt>replies go to</dt><dd class=\"mono\">out@evil.example</dd>"),
            "{page}"
        );
        assert!(page.contains("invoice &lt;U+202E&gt;fdp.exe"), "{page}");
        assert!(page.contains("hello&lt;U+200B&gt; there"), "{page}");
        // The fields the agent wrote by name, decoded and unfolded.
        for field in [
            "X-Data: the customer list",
            "List-Unsubscribe: &lt;https://example.org/u?r=1&gt;, &lt;mailto:u@example.org&gt;",
            "Auto-Submitted: auto-generated",
        ] {
            assert!(
                page.contains(&format!("<div class=\"mono\">{field}</div>")),
                "{field}: {page}"
            );
        }
        assert!(
            !page.contains('\u{202E}') && !page.contains('\u{200B}'),
            "{page}"
        );
    }

    #[test]
    fn a_messages_page_shows_what_its_reports_said() {
        let (op, _, _) = overview_of_sqlite();
        let mut record = Record {
            message_id: "m2@example.org".into(),
            state: State::Sent,
            from: Some("a@example.org".into()),
            to: vec!["gone@example.net".into()],
            size: 10,
            prefer: None,
            idempotency_key: None,
            queued_at: 0,
            due_at: 0,
            updated_at: 0,
            next_attempt_at: None,
            relay: Some("main".into()),
            accepted: vec!["gone@example.net".into()],
            rejected: vec![],
            reason: None,
            note: None,
            attempts: vec![],
            history: vec![(State::Sent, 0)],
            caller: None,
            meta: None,
            decided_by: None,
            sent_copy: None,
            node: None,
            batch: None,
            tag: None,
            max_age: None,
            priority: Default::default(),
            expires_at: None,
            reports: vec![],
        };
        let page = message(&op, None, &record, None).into_string();
        assert!(!page.contains("Reports that came back"), "{page}");
        record.reports.push(mailmux_actors::queue::ReportRecord {
            at: 0,
            reason: "bounced".into(),
            address: "gone@example.net".into(),
            detail: "550 5.1.1 <gone@example.net>: unknown".into(),
        });
        let page = message(&op, None, &record, None).into_string();
        assert!(page.contains("Reports that came back"), "{page}");
        assert!(
            page.contains("550 5.1.1 &lt;gone@example.net&gt;: unknown"),
            "{page}"
        );
    }
}
