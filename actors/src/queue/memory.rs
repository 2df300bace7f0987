//! The `memory` store: the queue in this process's memory, behind one mutex.
//! Nothing survives the process; it exists for benches and for those who ask
//! for it, and the daemon says so loudly. It passes the same conformance
//! suite as the SQLite store.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{
    Accepted, Cancel, Decided, Decision, Filter, Millis, NewMessage, Paused, Pending, Purged,
    Record, Recovered, ReportRecord, Retry, Settle, State, Stats, Store, StoreError, Summary,
    Suppression, SuppressionChange, SuppressionPage, SuppressionQuery, now_millis,
};

#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Mem>,
}

#[derive(Debug, Default)]
struct Mem {
    next_seq: i64,
    seq_of: HashMap<String, i64>,
    rows: BTreeMap<i64, Row>,
    /// Waiting messages by due time: what the runner polls.
    due: BTreeSet<(Millis, i64)>,
    /// The entries of `due` of high priority.
    due_high: BTreeSet<(Millis, i64)>,
    /// Held messages by approval deadline.
    held: BTreeSet<(Millis, i64)>,
    /// Idempotency key → (message id, content hash, created).
    keys: HashMap<String, (String, [u8; 32], Millis)>,
    /// Messages per state, kept as states change.
    counts: BTreeMap<State, u64>,
    /// Messages whose Sent copy is pending.
    copies_pending: u64,
    /// The suppression list by address, and its version.
    suppressed: BTreeMap<String, Suppression>,
    suppressed_version: i64,
    paused: Option<Paused>,
    /// The list's changes of the last versions: (version, the address, or
    /// none for a change of the whole list, and whether it was added).
    suppression_log: std::collections::VecDeque<(i64, Option<String>, bool)>,
    /// How far each mailbox of reports was read.
    report_cursors: HashMap<String, (u32, u32)>,
}

#[derive(Debug)]
struct Row {
    record: Record,
    body: Option<Arc<[u8]>>,
    committing: bool,
    rounds: u32,
    finished_at: Option<Millis>,
    held_hash: Option<[u8; 32]>,
    only: Option<Arc<[String]>>,
    batch: Option<String>,
}

impl Row {
    /// Whether `filter` names this message.
    fn named_by(&self, filter: &Filter) -> bool {
        let r = &self.record;
        filter.state.is_none_or(|s| r.state == s)
            && filter
                .caller
                .as_ref()
                .is_none_or(|c| r.caller.as_ref() == Some(c))
            && filter
                .batch
                .as_ref()
                .is_none_or(|b| self.batch.as_ref() == Some(b))
            && filter
                .tag
                .as_ref()
                .is_none_or(|t| r.tag.as_ref() == Some(t))
            && filter.search_matches(r)
    }
}

impl Mem {
    /// Moves the list's version and records its changes, keeping the last
    /// [`super::SUPPRESSION_VERSIONS_KEPT`] versions.
    fn log_suppression(&mut self, addresses: Vec<Option<String>>, added: bool) {
        self.suppressed_version += 1;
        let v = self.suppressed_version;
        self.suppression_log
            .extend(addresses.into_iter().map(|a| (v, a, added)));
        while self
            .suppression_log
            .front()
            .is_some_and(|(old, _, _)| *old <= v - super::SUPPRESSION_VERSIONS_KEPT)
        {
            self.suppression_log.pop_front();
        }
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Mem> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn waiting(s: State) -> bool {
    matches!(s, State::Queued | State::Scheduled)
}

/// Whether the message's Sent copy is pending.
fn pending(r: &Record) -> bool {
    r.sent_copy.as_deref() == Some("pending")
}

impl Mem {
    /// Stores a new message, or finds its idempotency key.
    fn accept(&mut self, m: NewMessage) -> Accepted {
        let now = now_millis();
        if let Some(seen) = self.key_seen(&m) {
            return seen;
        }
        if let Some((key, hash)) = m.scoped_key() {
            self.keys.insert(key, (m.message_id.clone(), *hash, now));
        }
        let state = m.initial_state(now);
        self.next_seq += 1;
        let seq = self.next_seq;
        self.seq_of.insert(m.message_id.clone(), seq);
        match &m.hold {
            Some(h) => self.held.insert((h.until, seq)),
            None => {
                if m.priority.is_high() {
                    self.due_high.insert((m.due_at, seq));
                }
                self.due.insert((m.due_at, seq))
            }
        };
        *self.counts.entry(state).or_default() += 1;
        let record = m.record(state, now);
        self.rows.insert(
            seq,
            Row {
                record,
                body: Some(m.bytes.clone()),
                committing: false,
                rounds: 0,
                finished_at: None,
                held_hash: m.hold.as_ref().map(|h| h.hash),
                only: m.only.clone(),
                batch: m.batch.clone(),
            },
        );
        Accepted::Stored(state)
    }

    /// The message `m`'s idempotency key already names: a replay (same
    /// content) or a conflict; none for a new key or no key.
    fn key_seen(&self, m: &NewMessage) -> Option<Accepted> {
        let (key, hash) = m.scoped_key()?;
        let (id, seen, _) = self.keys.get(&key)?;
        Some(match seen == hash {
            true => Accepted::Replay(id.clone()),
            false => Accepted::Conflict(id.clone()),
        })
    }

    /// Keeps [`Mem::copies_pending`] as a message's copy changes.
    fn count_copy(&mut self, was: bool, now: bool) {
        match (was, now) {
            (false, true) => self.copies_pending += 1,
            (true, false) => self.copies_pending = self.copies_pending.saturating_sub(1),
            _ => {}
        }
    }

    fn row(&mut self, id: &str) -> Result<(i64, &mut Row), StoreError> {
        let seq = *self
            .seq_of
            .get(id)
            .ok_or_else(|| StoreError::Unavailable(format!("no message {id:?}")))?;
        let row = self
            .rows
            .get_mut(&seq)
            .ok_or_else(|| StoreError::Unavailable(format!("no message {id:?}")))?;
        Ok((seq, row))
    }

    /// A mark or settle of a message cancelled while its round held it is
    /// refused, as the SQLite store refuses it.
    fn refuse_cancelled(&mut self, id: &str) -> Result<(), StoreError> {
        match self.row(id)?.1.record.state {
            State::Cancelled => Err(super::cancelled_in_round(id)),
            _ => Ok(()),
        }
    }

    /// Moves a row to `state` at `now`, keeping the due index in step.
    fn enter(
        &mut self,
        id: &str,
        state: State,
        next: Option<Millis>,
        now: Millis,
    ) -> Result<i64, StoreError> {
        let (seq, row) = self.row(id)?;
        let old = (row.record.state, row.record.next_attempt_at);
        let high = row.record.priority.is_high();
        row.record.state = state;
        row.record.updated_at = now;
        row.record.next_attempt_at = next;
        row.record.history.push((state, now));
        if state.is_final() {
            row.finished_at = Some(now);
        }
        if let (s, Some(t)) = old
            && waiting(s)
        {
            self.due.remove(&(t, seq));
            self.due_high.remove(&(t, seq));
        }
        if let (true, Some(t)) = (waiting(state), next) {
            self.due.insert((t, seq));
            if high {
                self.due_high.insert((t, seq));
            }
        }
        if let (State::Held, Some(t)) = old {
            self.held.remove(&(t, seq));
        }
        if let Some(n) = self.counts.get_mut(&old.0) {
            *n = n.saturating_sub(1);
        }
        *self.counts.entry(state).or_default() += 1;
        Ok(seq)
    }
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn durable(&self) -> bool {
        false
    }

    async fn accept(&self, m: NewMessage) -> Result<Accepted, StoreError> {
        Ok(self.lock().accept(m))
    }

    async fn accept_many(
        &self,
        ms: Vec<NewMessage>,
        atomic: bool,
    ) -> Result<Vec<Accepted>, StoreError> {
        let mut mem = self.lock();
        if atomic {
            let seen =
                super::batch_conflicts(&ms, |m| Ok::<_, std::convert::Infallible>(mem.key_seen(m)));
            let Ok(seen) = seen;
            if let (out, false) = super::atomic_answers(seen) {
                return Ok(out);
            }
        }
        Ok(ms.into_iter().map(|m| mem.accept(m)).collect())
    }

    async fn mark(&self, message_id: &str) -> Result<(), StoreError> {
        let mut mem = self.lock();
        mem.refuse_cancelled(message_id)?;
        mem.enter(message_id, State::Sending, None, now_millis())?;
        mem.row(message_id)?.1.committing = true;
        Ok(())
    }

    async fn settle(&self, message_id: &str, s: Settle) -> Result<(), StoreError> {
        let mut mem = self.lock();
        mem.refuse_cancelled(message_id)?;
        mem.enter(message_id, s.state, s.next_attempt_at, now_millis())?;
        let (_, row) = mem.row(message_id)?;
        row.committing = false;
        row.rounds += 1;
        if s.relay.is_some() {
            row.record.relay = s.relay;
        }
        row.record.accepted = s.accepted;
        row.record.rejected = s.rejected;
        row.record.reason = s.reason;
        row.record.note = s.note;
        row.record.attempts.extend(s.attempts);
        let was_pending = pending(&row.record);
        if s.copy {
            row.record.sent_copy = Some("pending".to_owned());
        } else if !s.state.keeps_body() && !was_pending {
            row.body = None;
        }
        // A message stored by `accept_marked` gets its bytes from the
        // outcome that keeps them.
        if (s.copy || s.state.keeps_body()) && row.body.is_none() {
            row.body = s.body;
        }
        let now_pending = pending(&row.record);
        mem.count_copy(was_pending, now_pending);
        Ok(())
    }

    /// Stored marked and without its bytes, as the SQLite store stores it:
    /// a marked message is never sent again from the store.
    async fn accept_marked(&self, m: NewMessage) -> Result<(), StoreError> {
        let mut mem = self.lock();
        let id = m.message_id.clone();
        mem.accept(m);
        mem.enter(&id, State::Sending, None, now_millis())?;
        let (_, row) = mem.row(&id)?;
        row.committing = true;
        row.body = None;
        Ok(())
    }

    async fn cancel(&self, message_id: &str) -> Result<Cancel, StoreError> {
        let mut mem = self.lock();
        let Some(seq) = mem.seq_of.get(message_id).copied() else {
            return Ok(Cancel::NotFound);
        };
        let state = mem.rows[&seq].record.state;
        if !waiting(state) && state != State::Held {
            return Ok(Cancel::Refused(state));
        }
        mem.enter(message_id, State::Cancelled, None, now_millis())?;
        let (_, row) = mem.row(message_id)?;
        // Kept for a Sent copy still to be made.
        if !pending(&row.record) {
            row.body = None;
        }
        Ok(Cancel::Cancelled)
    }

    async fn decide(&self, message_id: &str, d: Decision) -> Result<Decided, StoreError> {
        let mut mem = self.lock();
        let Some(seq) = mem.seq_of.get(message_id).copied() else {
            return Ok(Decided::NotFound);
        };
        let row = &mem.rows[&seq];
        let now = now_millis();
        let due_at = row.record.due_at;
        let held_hash = row.held_hash.as_ref().map(|h| &h[..]);
        let next = match super::rows::decision(row.record.state, held_hash, &d, due_at, now) {
            Ok(next) => next,
            Err(answer) => return Ok(answer),
        };
        if next == State::Rejected {
            mem.enter(message_id, State::Rejected, None, now)?;
            let (_, row) = mem.row(message_id)?;
            row.body = None;
            row.record.reason = Some("rejected_by_approver".into());
        } else {
            mem.enter(message_id, next, Some(due_at.max(now)), now)?;
        }
        let out = super::rows::decided(next);
        mem.row(message_id)?.1.record.decided_by = Some(d.by);
        Ok(out)
    }

    async fn expire_held(&self, now: Millis) -> Result<Vec<String>, StoreError> {
        let mut mem = self.lock();
        let past: Vec<i64> = mem
            .held
            .iter()
            .take_while(|(t, _)| *t <= now)
            .map(|(_, seq)| *seq)
            .collect();
        let mut out = Vec::new();
        for seq in past {
            let Some(id) = mem.rows.get(&seq).map(|r| r.record.message_id.clone()) else {
                continue;
            };
            mem.enter(&id, State::Expired, None, now)?;
            let (_, row) = mem.row(&id)?;
            row.body = None;
            row.record.reason = Some("approval_expired".into());
            row.record.note = Some("nobody approved it before its approval deadline".into());
            out.push(id);
        }
        Ok(out)
    }

    async fn retry(&self, message_id: &str, force: bool) -> Result<Retry, StoreError> {
        let mut mem = self.lock();
        let Some(seq) = mem.seq_of.get(message_id).copied() else {
            return Ok(Retry::NotFound);
        };
        let row = &mem.rows[&seq];
        let state = row.record.state;
        let verdict = super::retryable(state, row.record.reason.as_deref(), force);
        if verdict != Retry::Queued {
            return Ok(verdict);
        }
        if row.body.is_none() {
            return Ok(Retry::Refused(state));
        }
        let now = now_millis();
        mem.enter(message_id, State::Queued, Some(now), now)?;
        let (_, row) = mem.row(message_id)?;
        row.finished_at = None;
        row.committing = false;
        row.rounds = 0;
        row.record.due_at = now;
        row.record.reason = None;
        row.record.note = None;
        Ok(Retry::Queued)
    }

    async fn due(&self, now: Millis, limit: usize) -> Result<Vec<String>, StoreError> {
        let mem = self.lock();
        let high = mem.due_high.iter().take_while(|(t, _)| *t <= now);
        let rest = mem
            .due
            .iter()
            .take_while(|(t, _)| *t <= now)
            .filter(|e| !mem.due_high.contains(e));
        Ok(high
            .chain(rest)
            .take(limit)
            .filter_map(|(_, seq)| mem.rows.get(seq).map(|r| r.record.message_id.clone()))
            .collect())
    }

    async fn next_due(&self) -> Result<Option<Millis>, StoreError> {
        Ok(self.lock().due.first().map(|(t, _)| *t))
    }

    async fn load(&self, message_id: &str) -> Result<Option<Pending>, StoreError> {
        let mem = self.lock();
        let Some(row) = mem.seq_of.get(message_id).and_then(|s| mem.rows.get(s)) else {
            return Ok(None);
        };
        let Some(body) = &row.body else {
            return Ok(None);
        };
        let r = &row.record;
        Ok(Some(Pending {
            message_id: r.message_id.clone(),
            state: r.state,
            from: r.from.clone(),
            to: r.to.clone(),
            accepted: r.accepted.clone(),
            rejected: r.rejected.clone(),
            copied: r.sent_copy.is_some(),
            bytes: body.clone(),
            prefer: r.prefer.clone(),
            due_at: r.due_at,
            rounds: row.rounds,
            caller: r.caller.clone(),
            meta: r.meta.clone(),
            only: row.only.clone(),
            max_age: r.max_age,
            priority: r.priority,
        }))
    }

    async fn note_reports(
        &self,
        message_id: &str,
        reports: Vec<ReportRecord>,
    ) -> Result<Vec<ReportRecord>, StoreError> {
        let mut mem = self.lock();
        let mut added = Vec::new();
        if let Some(seq) = mem.seq_of.get(message_id).copied()
            && let Some(row) = mem.rows.get_mut(&seq)
        {
            for mut r in reports {
                // As the SQL stores keep it: one line.
                r.detail = super::rows::field(&r.detail);
                if !row
                    .record
                    .reports
                    .iter()
                    .any(|o| o.address == r.address && o.reason == r.reason)
                {
                    row.record.reports.push(r.clone());
                    added.push(r);
                }
            }
        }
        Ok(added)
    }

    async fn note_copy(&self, message_id: &str, outcome: &str) -> Result<(), StoreError> {
        let mut mem = self.lock();
        if let Some(seq) = mem.seq_of.get(message_id).copied()
            && let Some(row) = mem.rows.get_mut(&seq)
        {
            let was_pending = pending(&row.record);
            row.record.sent_copy = Some(outcome.to_owned());
            if !row.record.state.keeps_body() {
                row.body = None;
            }
            let now_pending = pending(&row.record);
            mem.count_copy(was_pending, now_pending);
        }
        Ok(())
    }

    async fn get(&self, message_id: &str) -> Result<Option<Record>, StoreError> {
        let mem = self.lock();
        Ok(mem
            .seq_of
            .get(message_id)
            .and_then(|s| mem.rows.get(s))
            .map(|row| {
                let mut r = row.record.clone();
                if !waiting(r.state) && r.state != State::Held {
                    r.next_attempt_at = None;
                }
                r
            }))
    }

    async fn find_key(
        &self,
        caller: Option<&str>,
        key: &str,
    ) -> Result<Option<String>, StoreError> {
        let key = super::scoped_key(caller, key);
        Ok(self.lock().keys.get(&key).map(|(id, _, _)| id.clone()))
    }

    async fn list(
        &self,
        filter: &Filter,
        limit: usize,
        cursor: Option<i64>,
    ) -> Result<(Vec<Summary>, Option<i64>), StoreError> {
        let mem = self.lock();
        // A search by recipient reads at most SEARCH_ROWS of the rows the
        // other filters name, as the SQL stores do.
        let others = filter.besides_search();
        let searching = filter.searches();
        let (mut low, mut read) = (None, 0i64);
        let mut page: Vec<(i64, Summary)> = mem
            .rows
            .range(..cursor.unwrap_or(i64::MAX))
            .rev()
            .filter(|(_, row)| row.named_by(&others))
            .take(if searching {
                super::SEARCH_ROWS as usize
            } else {
                usize::MAX
            })
            .inspect(|(seq, _)| {
                low = Some(**seq);
                read += 1;
            })
            .filter(|(_, row)| filter.search_matches(&row.record))
            .take(limit.saturating_add(1))
            .map(|(seq, row)| {
                let r = &row.record;
                (
                    *seq,
                    Summary {
                        message_id: r.message_id.clone(),
                        state: r.state,
                        from: r.from.clone(),
                        to: r.to.clone(),
                        queued_at: r.queued_at,
                        updated_at: r.updated_at,
                        relay: r.relay.clone(),
                        caller: r.caller.clone(),
                        node: None,
                        batch: row.batch.clone(),
                        tag: r.tag.clone(),
                        priority: r.priority,
                    },
                )
            })
            .collect();
        let more = page.len() > limit;
        page.truncate(limit);
        let searched = searching.then_some((low, read));
        let next = super::rows::next_cursor(more, page.last().map(|(s, _)| *s), searched);
        Ok((page.into_iter().map(|(_, s)| s).collect(), next))
    }

    async fn count(&self, filter: &Filter) -> Result<Vec<(State, u64)>, StoreError> {
        let mem = self.lock();
        let mut counts = std::collections::BTreeMap::<&str, (State, u64)>::new();
        for row in mem.rows.values().filter(|row| row.named_by(filter)) {
            let state = row.record.state;
            counts.entry(state.as_str()).or_insert((state, 0)).1 += 1;
        }
        Ok(counts.into_values().collect())
    }

    async fn suppress(&self, entries: Vec<Suppression>) -> Result<Vec<String>, StoreError> {
        let mut mem = self.lock();
        let mut added = Vec::new();
        for e in entries {
            if !mem.suppressed.contains_key(&e.address) {
                added.push(e.address.clone());
                mem.suppressed.insert(e.address.clone(), e);
            }
        }
        if !added.is_empty() {
            let logged: Vec<Option<String>> = if added.len() > super::SUPPRESSION_CHANGE_ROWS {
                vec![None]
            } else {
                added.iter().cloned().map(Some).collect()
            };
            mem.log_suppression(logged, true);
        }
        Ok(added)
    }

    async fn unsuppress(&self, address: &str) -> Result<bool, StoreError> {
        let mut mem = self.lock();
        let gone = mem.suppressed.remove(address).is_some();
        if gone {
            mem.log_suppression(vec![Some(address.to_owned())], false);
        }
        Ok(gone)
    }

    async fn suppression_changes(
        &self,
        since: i64,
    ) -> Result<Option<(i64, Vec<SuppressionChange>)>, StoreError> {
        let mem = self.lock();
        let now = mem.suppressed_version;
        let rows: Vec<&(i64, Option<String>, bool)> = mem
            .suppression_log
            .iter()
            .filter(|(v, _, _)| *v > since)
            .collect();
        let versions: Vec<(i64, bool)> = rows.iter().map(|(v, a, _)| (*v, a.is_some())).collect();
        if !super::changes_complete(since, now, &versions) {
            return Ok(None);
        }
        let changes = rows
            .into_iter()
            .filter_map(|(_, address, added)| {
                let address = address.as_ref()?;
                if *added {
                    // As the store holds it now; gone if removed since.
                    mem.suppressed
                        .get(address)
                        .cloned()
                        .map(SuppressionChange::Added)
                } else {
                    Some(SuppressionChange::Removed(address.clone()))
                }
            })
            .collect();
        Ok(Some((now, changes)))
    }

    async fn suppression_version(&self) -> Result<i64, StoreError> {
        Ok(self.lock().suppressed_version)
    }

    async fn paused(&self) -> Result<Option<Paused>, StoreError> {
        Ok(self.lock().paused.clone())
    }

    async fn set_paused(&self, pause: Option<Paused>) -> Result<bool, StoreError> {
        let mut mem = self.lock();
        Ok(match pause {
            Some(p) if mem.paused.is_none() => {
                mem.paused = Some(p);
                true
            }
            Some(_) => false,
            None => mem.paused.take().is_some(),
        })
    }

    async fn suppression(&self, address: &str) -> Result<Option<Suppression>, StoreError> {
        Ok(self.lock().suppressed.get(address).cloned())
    }

    async fn suppression_page(
        &self,
        query: &SuppressionQuery,
    ) -> Result<SuppressionPage, StoreError> {
        let mem = self.lock();
        let holds = |a: &str| query.contains.as_deref().is_none_or(|c| a.contains(c));
        let start = match &query.after {
            Some(a) => std::ops::Bound::Excluded(a.clone()),
            None => std::ops::Bound::Unbounded,
        };
        let rows = mem
            .suppressed
            .range((start, std::ops::Bound::Unbounded))
            .filter(|(a, _)| holds(a))
            .take(query.limit.map_or(usize::MAX, |l| l + 1))
            .map(|(_, e)| e.clone())
            .collect();
        let (total, matching) = match (query.counts, &query.contains) {
            (false, _) => (0, 0),
            (true, None) => (mem.suppressed.len() as u64, mem.suppressed.len() as u64),
            (true, Some(_)) => (
                mem.suppressed.len() as u64,
                mem.suppressed.keys().filter(|a| holds(a)).count() as u64,
            ),
        };
        Ok(SuppressionPage::of(query, total, matching, rows))
    }

    async fn report_cursor(&self, mailbox: &str) -> Result<Option<(u32, u32)>, StoreError> {
        Ok(self.lock().report_cursors.get(mailbox).copied())
    }

    async fn advance_report_cursor(
        &self,
        mailbox: &str,
        validity: u32,
        uid: u32,
    ) -> Result<(), StoreError> {
        let mut mem = self.lock();
        let cursor = mem
            .report_cursors
            .entry(mailbox.to_owned())
            .or_insert((validity, uid));
        if cursor.0 != validity || cursor.1 < uid {
            *cursor = (validity, uid);
        }
        Ok(())
    }

    async fn stats(&self) -> Result<Stats, StoreError> {
        let mem = self.lock();
        // Only waiting messages are walked, never the finished ones.
        let mut oldest_queued_at: Option<Millis> = None;
        let mut next_retry_at: Option<Millis> = None;
        for (t, seq) in &mem.due {
            let Some(row) = mem.rows.get(seq) else {
                continue;
            };
            if row.record.state != State::Queued {
                continue;
            }
            let q = row.record.queued_at;
            oldest_queued_at = Some(oldest_queued_at.map_or(q, |o| o.min(q)));
            if row.rounds > 0 && next_retry_at.is_none() {
                next_retry_at = Some(*t);
            }
        }
        Ok(Stats {
            counts: mem
                .counts
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(s, n)| (*s, *n))
                .collect(),
            oldest_queued_at,
            next_retry_at,
            copies_pending: mem.copies_pending,
        })
    }

    async fn recover(&self) -> Result<Recovered, StoreError> {
        let mut mem = self.lock();
        let now = now_millis();
        let sending: Vec<(String, bool)> = mem
            .rows
            .values()
            .filter(|r| r.record.state == State::Sending)
            .map(|r| (r.record.message_id.clone(), r.committing))
            .collect();
        let mut out = Recovered::default();
        for (id, committing) in sending {
            if committing {
                mem.enter(&id, State::Unknown, None, now)?;
                let (_, row) = mem.row(&id)?;
                row.committing = false;
                row.record.reason = None;
                row.record.note = Some(super::RECOVERED_UNKNOWN.into());
                out.unknown.push(id);
            } else {
                mem.enter(&id, State::Queued, Some(now), now)?;
                out.requeued += 1;
            }
        }
        Ok(out)
    }

    async fn purge(
        &self,
        finished_before: Millis,
        keys_before: Millis,
        limit: usize,
    ) -> Result<Purged, StoreError> {
        let mut mem = self.lock();
        let gone: Vec<i64> = mem
            .rows
            .iter()
            .filter(|(_, r)| r.finished_at.is_some_and(|f| f < finished_before))
            .map(|(s, _)| *s)
            .take(limit)
            .collect();
        for seq in &gone {
            if let Some(row) = mem.rows.remove(seq) {
                mem.seq_of.remove(&row.record.message_id);
                mem.count_copy(pending(&row.record), false);
                if let Some(n) = mem.counts.get_mut(&row.record.state) {
                    *n = n.saturating_sub(1);
                }
            }
        }
        let old_keys: Vec<String> = mem
            .keys
            .iter()
            .filter(|(_, (_, _, created))| *created < keys_before)
            .map(|(k, _)| k.clone())
            .take(limit)
            .collect();
        for k in &old_keys {
            mem.keys.remove(k);
        }
        Ok(Purged {
            messages: gone.len() as u64,
            keys: old_keys.len() as u64,
        })
    }
}
