//! What the SQL stores (`sqlite`, `postgres`) share: how list and history
//! columns (and SQLite's column of attempts) are written and read back, the
//! listing's statement, the update of a Sent copy's outcome, and the verdict
//! on a person's decision.

use super::{
    AttemptRecord, Decided, Decision, Filter, Millis, Priority, RejectedRecord, ReportRecord, State,
};

/// One history entry: `state@millis` (entries are joined with `;`).
pub(crate) fn entry(state: State, at: Millis) -> String {
    format!("{}@{at}", state.as_str())
}

/// A stored history, oldest first; entries this build cannot read are skipped.
pub(crate) fn history(text: &str) -> Vec<(State, Millis)> {
    text.split(';')
        .filter_map(|h| {
            let (state, at) = h.split_once('@')?;
            Some((State::parse(state)?, at.parse().ok()?))
        })
        .collect()
}

/// The SQL update of a message's Sent copy outcome (`?1`/`$1` the message
/// id, `?2`/`$2` the outcome, as `p` numbers them). It drops the bytes that
/// a state keeping none ([`State::keeps_body`]) kept only for the copy.
pub(crate) fn note_copy_sql(p: char) -> String {
    let without: Vec<String> = State::ALL
        .iter()
        .filter(|s| !s.keeps_body())
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    format!(
        "UPDATE {table} SET sent_copy = {p}2,
            body = CASE WHEN state IN ({states}) THEN NULL ELSE body END
          WHERE message_id = {p}1",
        table = if p == '$' {
            "mailmux_messages"
        } else {
            "messages"
        },
        states = without.join(", ")
    )
}

/// The rows a page of `limit` reads: one more, which tells whether another
/// page follows. Any `limit` a caller gives fits (a command line may ask for
/// 2^64 - 1).
pub(crate) fn page_rows(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1)
}

/// The listing's statement (`p` numbers its parameters): rows before seq
/// `1`, newest first, at most `3`, filtered by state `2`, caller `4`,
/// batch `5`, a recipient's substring `6`, tag `7` and the reason of a
/// report `8`, each unset when null.
///
/// Neither SQLite nor PostgreSQL's generic plan uses an index for
/// `4 IS NULL OR caller = 4`, so one filter, chosen by [`listed_by`], is
/// also named on its own: the listing reads through that column's index
/// from the newest match back, and checks the other filters on each row.
///
/// No index serves part of an address or a report: a search by either
/// reads at most [`SEARCH_ROWS`] of the rows the other filters name, and
/// [`searched_sql`] tells where the next page goes on.
pub(crate) fn list_sql(p: char, filter: &Filter) -> String {
    let (table, node, matching) = matching(p, filter);
    let columns = format!(
        "seq, message_id, state, mail_from, rcpt, queued_at, updated_at, relay, caller, batch,
                tag, priority{node}"
    );
    if !filter.searches() {
        return format!(
            "SELECT {columns}
           FROM {table} WHERE {matching}
          ORDER BY seq DESC LIMIT {p}3"
        );
    }
    format!(
        "SELECT {columns}
           FROM (SELECT {columns}, reports, meta FROM {table} WHERE {matching}
                  ORDER BY seq DESC LIMIT {SEARCH_ROWS}) AS searched
          WHERE {searched}
          ORDER BY seq DESC LIMIT {p}3",
        searched = searched_for(p)
    )
}

/// The most rows one page of a search by recipient reads: about 10 ms on
/// SQLite, where reading a million rows for a recipient that matches none
/// took a second and held the store's connection of status lookups.
pub const SEARCH_ROWS: i64 = 10_000;

/// The lowest seq and the number of the rows that [`list_sql`]'s search
/// by recipient read (the same parameters, `3` and `6` unused).
pub(crate) fn searched_sql(p: char, filter: &Filter) -> String {
    let (table, _, matching) = matching(p, filter);
    format!(
        "SELECT MIN(seq), COUNT(*)
           FROM (SELECT seq FROM {table} WHERE {matching}
                  ORDER BY seq DESC LIMIT {SEARCH_ROWS}) AS searched"
    )
}

/// Where the page after one of `read` rows goes on: after its last row
/// when more matched than it holds; else, for a search by recipient that
/// read its [`SEARCH_ROWS`] (`searched`: the lowest seq it read and how
/// many), after the lowest row it read, matched or not.
pub(crate) fn next_cursor(
    more: bool,
    last: Option<i64>,
    searched: Option<(Option<i64>, i64)>,
) -> Option<i64> {
    if more {
        return last;
    }
    match searched {
        Some((low, n)) if n >= SEARCH_ROWS => low,
        _ => None,
    }
}

/// The count per state of the rows [`list_sql`] names, with the same
/// parameters (`3` bounds the rows of the answer: one a state at most).
/// Meant for a batch or a tag, whose index it reads through whole; a
/// recipient, if given, is checked on each row.
pub(crate) fn count_sql(p: char, filter: &Filter) -> String {
    let (table, _, matching) = matching(p, filter);
    format!(
        "SELECT state, COUNT(*) FROM {table} WHERE {matching} AND {searched}
          GROUP BY state LIMIT {p}3",
        searched = searched_for(p)
    )
}

/// The conditions of what no index serves: parameter `6`, lowered, in a
/// row's recipients, a report of reason `8` among its reports (stored
/// one a line, `at`, reason, address and detail tab-separated), and each
/// name of the JSON object `9` with its value in the `metadata` of its
/// `meta` (JSON), each met when its parameter is null. PostgreSQL asks
/// whether the one object holds the other (`@>`); SQLite whether merging
/// the wanted names and values into a row's metadata (`json_patch`, RFC
/// 7396) leaves it as it was: cheaper for each row than a `json_each` of
/// the wanted object (BENCHMARKS.md, "A search by several metadata
/// names"). Both objects are written by serde_json, so a value is written
/// alike on either side.
fn searched_for(p: char) -> &'static str {
    if p == '$' {
        "($6::text IS NULL OR strpos(lower(rcpt), $6) > 0)
            AND ($8::text IS NULL OR strpos(reports, chr(9) || $8 || chr(9)) > 0)
            AND ($9::text IS NULL OR (meta::jsonb -> 'metadata') @> $9::text::jsonb)"
    } else {
        "(?6 IS NULL OR instr(lower(rcpt), ?6) > 0)
            AND (?8 IS NULL OR instr(reports, char(9) || ?8 || char(9)) > 0)
            AND (?9 IS NULL
                 OR json_patch(json_extract(meta, '$.metadata'), ?9)
                    = json_extract(meta, '$.metadata'))"
    }
}

/// The metadata a filter searches for, as parameter `9` of
/// [`list_sql`] and [`count_sql`] takes it: a JSON object.
pub(crate) fn metadata_json(wanted: &std::collections::BTreeMap<String, String>) -> String {
    serde_json::to_string(wanted).unwrap_or_default()
}

/// The table, its `node` column (PostgreSQL's), and the conditions of
/// [`list_sql`]'s parameters but the recipient.
fn matching(p: char, filter: &Filter) -> (&'static str, &'static str, String) {
    let (table, node, cast) = if p == '$' {
        ("mailmux_messages", ", node", "::text")
    } else {
        ("messages", "", "")
    };
    let by = listed_by(filter).map_or(String::new(), |by| {
        let (column, n) = by.column();
        // The term that tells the planner its partial index by state
        // serves it.
        let not_sent = if by == ListedBy::State {
            "state <> 'sent' AND "
        } else {
            ""
        };
        format!("{not_sent}{column} = {p}{n} AND ")
    });
    let any = |column: &str, n: u8| format!("({p}{n}{cast} IS NULL OR {column} = {p}{n})");
    let matching = format!(
        "{by}seq < {p}1 AND {state} AND {caller} AND {batch} AND {tag}",
        state = any("state", 2),
        caller = any("caller", 4),
        batch = any("batch", 5),
        tag = any("tag", 7),
    );
    (table, node, matching)
}

/// The column whose index a listing reads through ([`listed_by`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListedBy {
    Batch,
    Tag,
    State,
    Caller,
}

impl ListedBy {
    /// The indexed column, and the number of the statement's parameter
    /// that filters by it.
    pub(crate) fn column(self) -> (&'static str, u8) {
        match self {
            ListedBy::State => ("state", 2),
            ListedBy::Caller => ("caller", 4),
            ListedBy::Batch => ("batch", 5),
            ListedBy::Tag => ("tag", 7),
        }
    }
}

/// The column whose index a listing reads through, or none for the rows
/// themselves, newest first. A batch holds at most `max_batch` messages.
/// A state other than `sent` is, in a mail queue, a few of its rows: the
/// mail still waiting, and what failed, within `retain`.
/// A tag names what its caller chose to group (a campaign, a ticket): its
/// index reads those rows only, but a campaign's grows with every message
/// sent, so a tag with such a state (what still waits of a campaign, which
/// `cancel_message` with a `tag` asks for) reads through the state's.
/// A caller may own any share of them: through its index a listing reads
/// only that caller's rows, but each costs a few times more than a row of
/// the table read in order, so a caller owning most messages and a filter
/// that few of them match (a recipient) cost more this way than before it.
/// `sent` alone is most of the table, where reading it in order is cheapest.
pub(crate) fn listed_by(filter: &Filter) -> Option<ListedBy> {
    if filter.batch.is_some() {
        Some(ListedBy::Batch)
    } else if filter.state.is_some_and(|s| s != State::Sent) {
        Some(ListedBy::State)
    } else if filter.tag.is_some() {
        Some(ListedBy::Tag)
    } else if filter.caller.is_some() {
        Some(ListedBy::Caller)
    } else {
        None
    }
}

/// A message's priority as its column holds it: 1 for `High`, null for
/// `Normal` (so that the index of due `High` mail holds only those).
pub(crate) fn priority_column(p: Priority) -> Option<i64> {
    p.is_high().then_some(1)
}

/// A stored priority ([`priority_column`]).
pub(crate) fn priority(column: Option<i64>) -> Priority {
    if column == Some(1) {
        Priority::High
    } else {
        Priority::Normal
    }
}

/// A list stored one item a line.
pub(crate) fn lines(s: Option<String>) -> Vec<String> {
    match s {
        Some(s) if !s.is_empty() => s.split('\n').map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

/// A stored state. A state this build does not know cannot come from its
/// own schema.
pub(crate) fn state(s: &str) -> State {
    State::parse(s).unwrap_or(State::Failed)
}

/// A field of a tab-separated line: tabs and line breaks become spaces.
pub(crate) fn field(s: &str) -> String {
    s.replace(['\t', '\r', '\n'], " ")
}

/// Refused recipients, one a line: address, code and text, tab-separated.
pub(crate) fn rejected_text(rejected: &[RejectedRecord]) -> String {
    rejected
        .iter()
        .map(|r| format!("{}\t{}\t{}", r.address, r.code, field(&r.text)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Delivery attempts, one a line: the time, relay, failure class, reply
/// code, duration in ms and text, tab-separated (an empty class or code is
/// none). `None` when there are none, so that an append adds nothing.
pub(crate) fn attempts_text(attempts: &[AttemptRecord]) -> Option<String> {
    if attempts.is_empty() {
        return None;
    }
    let lines: Vec<String> = attempts
        .iter()
        .map(|a| {
            format!(
                "{}\t{}\t{}\t{}\t{}\t{}",
                a.at,
                field(&a.relay),
                a.class.as_deref().map(field).unwrap_or_default(),
                a.code.map(|c| c.to_string()).unwrap_or_default(),
                a.duration_ms,
                field(&a.text)
            )
        })
        .collect();
    Some(lines.join("\n"))
}

/// Stored attempts, oldest first; lines this build cannot read are skipped.
pub(crate) fn attempts(s: Option<String>) -> Vec<AttemptRecord> {
    lines(s)
        .into_iter()
        .filter_map(|l| {
            let mut parts = l.splitn(6, '\t');
            let at = parts.next()?.parse().ok()?;
            let relay = parts.next()?.to_owned();
            let class = Some(parts.next()?)
                .filter(|c| !c.is_empty())
                .map(str::to_owned);
            let code = match parts.next()? {
                "" => None,
                c => Some(c.parse().ok()?),
            };
            let duration_ms = parts.next()?.parse().ok()?;
            let text = parts.next().unwrap_or("").to_owned();
            Some(AttemptRecord {
                at,
                relay,
                class,
                code,
                text,
                duration_ms,
            })
        })
        .collect()
}

/// A message's reports, one a line: time, reason, address and detail,
/// tab-separated.
pub(crate) fn reports(s: Option<String>) -> Vec<ReportRecord> {
    lines(s)
        .into_iter()
        .filter_map(|l| {
            let mut parts = l.splitn(4, '\t');
            Some(ReportRecord {
                at: parts.next()?.parse().ok()?,
                reason: parts.next()?.to_owned(),
                address: parts.next()?.to_owned(),
                detail: parts.next().unwrap_or("").to_owned(),
            })
        })
        .collect()
}

/// The stored reports `old` with each of `new` whose address and reason
/// it lacks, and those it added; `None` when nothing is new.
pub(crate) fn merged_reports(
    old: Option<String>,
    new: &[ReportRecord],
) -> Option<(String, Vec<ReportRecord>)> {
    let mut all = reports(old.clone());
    let before = all.len();
    for r in new {
        if !all
            .iter()
            .any(|o| o.address == r.address && o.reason == r.reason)
        {
            all.push(r.clone());
        }
    }
    let added = all[before..].to_vec();
    (!added.is_empty()).then(|| {
        let text = all
            .iter()
            .map(|r| {
                format!(
                    "{}\t{}\t{}\t{}",
                    r.at,
                    field(&r.reason),
                    field(&r.address),
                    field(&r.detail)
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        (text, added)
    })
}

pub(crate) fn rejected(s: Option<String>) -> Vec<RejectedRecord> {
    lines(s)
        .into_iter()
        .filter_map(|l| {
            let mut parts = l.splitn(3, '\t');
            Some(RejectedRecord {
                address: parts.next()?.to_owned(),
                code: parts.next()?.parse().ok()?,
                text: parts.next().unwrap_or("").to_owned(),
            })
        })
        .collect()
}

/// The state a held message goes to on decision `d` (`rejected`,
/// `scheduled` or `queued`), or the answer when it cannot be decided: not
/// held, or approved for other content.
pub(crate) fn decision(
    state: State,
    held_hash: Option<&[u8]>,
    d: &Decision,
    due_at: Millis,
    now: Millis,
) -> Result<State, Decided> {
    if state != State::Held {
        return Err(Decided::NotHeld(state));
    }
    if d.approve
        && let Some(hash) = &d.hash
        && held_hash != Some(&hash[..])
    {
        return Err(Decided::HashMismatch);
    }
    Ok(if !d.approve {
        State::Rejected
    } else if due_at > now {
        State::Scheduled
    } else {
        State::Queued
    })
}

/// The answer for a decision that moved the message to `next`.
pub(crate) fn decided(next: State) -> Decided {
    match next {
        State::Rejected => Decided::Rejected,
        other => Decided::Released(other),
    }
}
