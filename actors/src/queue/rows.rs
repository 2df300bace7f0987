//! What the SQL stores (`sqlite`, `postgres`) share: how list and history
//! columns are written and read back, the listing's statement, the update
//! of a Sent copy's outcome, and the verdict on a person's decision.

use super::{Decided, Decision, Millis, RejectedRecord, State};

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

/// The listing's statement (`p` numbers its parameters): rows before seq
/// `1`, newest first, at most `3`, filtered by state `2`, caller `4`,
/// batch `5` and a recipient's substring `6`, each unset when null.
/// Neither SQLite nor PostgreSQL's generic plan uses an index for
/// `4 IS NULL OR caller = 4`, so a listing by caller or by batch names it
/// in the statement, and reads through the `(caller, seq)` or
/// `(batch, seq)` index rather than every row before its match.
pub(crate) fn list_sql(p: char, by_caller: bool, by_batch: bool) -> String {
    let (table, node, cast, find) = if p == '$' {
        (
            "mailmux_messages",
            ", node",
            "::text",
            "strpos(lower(rcpt), $6)",
        )
    } else {
        ("messages", "", "", "instr(lower(rcpt), ?6)")
    };
    let unset = |n: u8| format!("{p}{n}{cast} IS NULL");
    let caller = if by_caller {
        format!("caller = {p}4")
    } else {
        unset(4)
    };
    let batch = if by_batch {
        format!("batch = {p}5")
    } else {
        unset(5)
    };
    format!(
        "SELECT seq, message_id, state, mail_from, rcpt, queued_at, updated_at, relay, caller{node}
           FROM {table} WHERE {caller} AND {batch} AND seq < {p}1
            AND ({state} OR state = {p}2) AND ({rcpt} OR {find} > 0)
          ORDER BY seq DESC LIMIT {p}3",
        state = unset(2),
        rcpt = unset(6),
    )
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

/// Refused recipients, one a line: address, code and text, tab-separated.
pub(crate) fn rejected_text(rejected: &[RejectedRecord]) -> String {
    rejected
        .iter()
        .map(|r| {
            let text = r.text.replace(['\t', '\r', '\n'], " ");
            format!("{}\t{}\t{text}", r.address, r.code)
        })
        .collect::<Vec<_>>()
        .join("\n")
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
