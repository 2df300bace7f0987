//! Following watched messages for the changes other processes make: the
//! other daemons of a shared PostgreSQL queue, and the queue command on a
//! SQLite file. Their writes reach no broadcast of this daemon, so while
//! anyone watches a message (a resource subscription, a listen stream), a
//! poll reads the watched messages' states once a [`POLL`] and sends each
//! change it finds on [`Queue::changes`](super::Queue::changes), as this
//! daemon's own changes are sent. A poll reads at most [`PER_POLL`]; past
//! that, the watched messages are read in turn.
//!
//! What a poll compares is a message's state and a measure of its stored
//! reports that grows with each one noted ([`Store::prints`](super::Store::prints)). A change this daemon made itself was sent when
//! it made it; the poll does not send it again.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::State;

/// How often the watched messages are read while any is watched: the
/// delay of an update made by another process.
pub const POLL: Duration = Duration::from_secs(1);

/// How long a poll waits between reading the states and comparing them:
/// this daemon's own change, read by the poll just after it was stored, is
/// noted as its own in that time.
pub(super) const SETTLE: Duration = Duration::from_millis(50);

/// The most messages one statement of a poll reads.
pub(super) const CHUNK: usize = 1_000;

/// The most messages one poll reads: past it, each poll goes on from where
/// the last one stopped, so that a daemon whose clients watch very many
/// messages reads a bounded number a second (each then every few seconds).
pub(super) const PER_POLL: usize = 10 * CHUNK;

/// A message's state and a measure of its reports that grows with each one.
pub type Print = (State, u64);

/// The watched messages, with what was last seen of each.
#[derive(Debug, Default)]
pub(super) struct Watches {
    ids: Mutex<Watched>,
    /// How many messages are watched: no lock is taken while none is.
    count: AtomicUsize,
}

#[derive(Debug, Default)]
struct Watched {
    by_id: BTreeMap<String, Seen>,
    /// The last message the last poll read.
    cursor: Option<String>,
}

#[derive(Debug, Default)]
struct Seen {
    /// How many watchers hold the message.
    refs: usize,
    /// As the last read found it; none before the first.
    read: Option<Print>,
    /// The last state this daemon changed it to since that read.
    own: Option<State>,
}

impl Watches {
    /// Adds a watcher of each of `ids`; answers those nobody watched yet.
    pub(super) fn add(&self, ids: &[String]) -> Vec<String> {
        let mut w = self.lock();
        let map = &mut w.by_id;
        let mut new = Vec::new();
        for id in ids {
            let seen = map.entry(id.clone()).or_default();
            seen.refs += 1;
            if seen.refs == 1 {
                new.push(id.clone());
            }
        }
        self.count.store(map.len(), Ordering::Relaxed);
        new
    }

    /// Takes a watcher of each of `ids` away.
    pub(super) fn remove(&self, ids: &[String]) {
        let mut w = self.lock();
        let map = &mut w.by_id;
        for id in ids {
            if let Some(seen) = map.get_mut(id) {
                seen.refs -= 1;
                if seen.refs == 0 {
                    map.remove(id);
                }
            }
        }
        self.count.store(map.len(), Ordering::Relaxed);
    }

    /// The next `max` messages watched now for a poll to read, on from
    /// where the last one stopped, around to the first.
    pub(super) fn next(&self, max: usize) -> Vec<String> {
        if self.count.load(Ordering::Relaxed) == 0 {
            return Vec::new();
        }
        let mut w = self.lock();
        let after = match &w.cursor {
            Some(c) => Bound::Excluded(c.clone()),
            None => Bound::Unbounded,
        };
        let mut ids: Vec<String> = w
            .by_id
            .range::<String, _>((after, Bound::Unbounded))
            .map(|(id, _)| id.clone())
            .take(max)
            .collect();
        if ids.len() < max {
            let first = ids.first().cloned();
            let more = w
                .by_id
                .keys()
                .take_while(|id| Some(*id) != first.as_ref())
                .take(max - ids.len())
                .cloned()
                .collect::<Vec<_>>();
            ids.extend(more);
        }
        w.cursor = ids.last().cloned();
        ids
    }

    /// Notes that this daemon changed `id` to `state` (and sent it).
    pub(super) fn own(&self, id: &str, state: State) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        if let Some(seen) = self.lock().by_id.get_mut(id) {
            seen.own = Some(state);
        }
    }

    /// Notes what a read found of `id`; whether that is a change another
    /// process made, to be sent. The first read of a message is only noted.
    pub(super) fn read(&self, id: &str, print: Print) -> bool {
        let mut w = self.lock();
        let Some(seen) = w.by_id.get_mut(id) else {
            return false;
        };
        match seen.read.replace(print) {
            None => false,
            Some(before) if before == print => false,
            Some(_) => seen.own.take() != Some(print.0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Watched> {
        self.ids.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Watching some messages ([`Queue::watch`](super::Queue::watch)); dropping
/// it stops.
#[derive(Debug)]
pub struct Watch {
    pub(super) watches: Option<Arc<Watches>>,
    pub(super) ids: Vec<String>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(w) = &self.watches {
            w.remove(&self.ids);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_sent_once_and_never_one_this_daemon_made() {
        let w = Watches::default();
        let ids = vec!["a".to_string(), "b".to_string()];
        assert_eq!(w.add(&ids), ids);
        assert!(w.add(&ids[..1]).is_empty(), "a is watched already");
        // The first read is the baseline.
        assert!(!w.read("a", (State::Scheduled, 0)));
        assert!(!w.read("b", (State::Scheduled, 0)));
        // Another process cancels a: sent once.
        assert!(w.read("a", (State::Cancelled, 0)));
        assert!(!w.read("a", (State::Cancelled, 0)));
        // This daemon sends b: its own change, not sent again.
        w.own("b", State::Sent);
        assert!(!w.read("b", (State::Sent, 0)));
        // A report noted elsewhere: the reports grew.
        assert!(w.read("b", (State::Sent, 40)));
        // A report this daemon noted (sent with the state it left).
        w.own("b", State::Sent);
        assert!(!w.read("b", (State::Sent, 80)));
        // Unwatched by all its watchers: no longer read.
        w.remove(&ids);
        assert_eq!(w.next(10), vec!["a".to_string()]);
        w.remove(&ids[..1]);
        assert!(w.next(10).is_empty());
        assert!(!w.read("a", (State::Sent, 0)));
    }

    #[test]
    fn a_poll_reads_a_bounded_number_and_goes_on_from_where_the_last_stopped() {
        let w = Watches::default();
        let ids: Vec<String> = (0..5).map(|i| format!("m{i}")).collect();
        w.add(&ids);
        assert_eq!(w.next(2), ["m0", "m1"]);
        assert_eq!(w.next(2), ["m2", "m3"]);
        // Around to the first, each once.
        assert_eq!(w.next(2), ["m4", "m0"]);
        assert_eq!(w.next(10), ["m1", "m2", "m3", "m4", "m0"]);
        // The message it stopped at unwatched: on from the next.
        w.remove(&ids[..1]);
        assert_eq!(w.next(2), ["m1", "m2"]);
        assert_eq!(w.next(10), ["m3", "m4", "m1", "m2"]);
    }
}
