//! Each message as an MCP resource, `mailmux://messages/{message_id}`: its
//! status as JSON (the same shape as `get_message_status`, never the body),
//! and `notifications/resources/updated` to the clients subscribed to it
//! whenever its state changes, and when a bounce or complaint report is
//! noted on it after a relay took it.
//!
//! Clients of 2025-06-18 and 2025-11-25 subscribe with `resources/subscribe`
//! ([`Subscriptions`]): one listener on the queue's state changes starts with
//! the first subscription, so a daemon nobody subscribes to pays nothing for
//! it. Clients of 2026-07-28 open a `subscriptions/listen` stream instead
//! ([`listen`]), which holds its own listener for as long as it is open.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use mailmux_actors::queue::{Queue, State, Watch};
use rmcp::RoleServer;
use rmcp::model::ResourceUpdatedNotificationParam;
use rmcp::service::{Peer, SubscriptionContext};
use tokio::sync::broadcast::error::RecvError;

/// The scheme and path of a message's resource URI.
pub const PREFIX: &str = "mailmux://messages/";

/// The resource URI of a message.
pub fn uri(message_id: &str) -> String {
    format!("{PREFIX}{message_id}")
}

/// The message id a resource URI names, if it is one of ours.
pub fn message_id(uri: &str) -> Option<&str> {
    uri.strip_prefix(PREFIX).filter(|id| !id.is_empty())
}

/// The most messages one caller may watch at once, over all its sessions
/// and both ways of subscribing: enough for the largest batch
/// (`max_batch`'s ceiling is far above what a person follows message by
/// message; `list_messages` with a `batch_id` watches a whole batch).
pub const MAX_WATCHED: usize = 5_000;

/// Who holds a subscription: a caller's session (the `Mcp-Session-Id`
/// header; none over stdio, which has one client).
type Holder = (Arc<str>, String);

/// Whether a message's subscriptions end at this state: a final state in
/// which no relay took it. One a relay took (`sent`, `partial`, `unknown`)
/// may still get a bounce or complaint report, so its subscriptions go on.
pub fn ends_at(state: State) -> bool {
    state.is_final() && !matches!(state, State::Sent | State::Partial | State::Unknown)
}

/// Which sessions are subscribed to which message (`resources/subscribe`).
///
/// A session holds one subscription per message however often it asks; it
/// ends with `resources/unsubscribe` from the same session, when the
/// message reaches a final state no relay took it in ([`ends_at`], after
/// that update), or when an update finds the session gone. A caller holds
/// at most [`MAX_WATCHED`]; at that bound the subscriptions of its closed
/// sessions are dropped first, then its subscriptions to messages a relay
/// took (which wait only for reports), oldest first.
#[derive(Debug, Default, Clone)]
pub struct Subscriptions {
    inner: Arc<Mutex<Watched>>,
    listening: Arc<OnceLock<()>>,
}

#[derive(Debug, Default)]
struct Watched {
    by_id: HashMap<String, HashMap<Holder, Peer<RoleServer>>>,
    per_caller: HashMap<Arc<str>, usize>,
    /// Each subscribed message's watch for the changes other processes
    /// make (`Queue::watch`), for as long as it has a subscriber.
    watches: HashMap<String, Watch>,
    /// Per caller, its subscriptions to messages a relay took, oldest
    /// first (some may have ended since: they are skipped).
    delivered: HashMap<Arc<str>, VecDeque<(String, Holder)>>,
    /// The messages whose subscriptions are in `delivered`.
    delivered_ids: HashSet<String>,
}

impl Watched {
    fn remove(&mut self, id: &str, holder: &Holder) {
        let Some(peers) = self.by_id.get_mut(id) else {
            return;
        };
        let removed = peers.remove(holder).is_some();
        if peers.is_empty() {
            self.by_id.remove(id);
            self.watches.remove(id);
            self.delivered_ids.remove(id);
        }
        if removed {
            self.release(&holder.0, 1);
        }
    }

    fn release(&mut self, caller: &Arc<str>, n: usize) {
        if let Some(count) = self.per_caller.get_mut(caller) {
            *count = count.saturating_sub(n);
            if *count == 0 {
                self.per_caller.remove(caller);
            }
        }
    }

    /// Notes the subscriptions to `id`, which a relay took, as waiting only
    /// for reports (once).
    fn deliver(&mut self, id: &str) {
        if !self.delivered_ids.insert(id.to_owned()) {
            return;
        }
        let holders: Vec<Holder> = self
            .by_id
            .get(id)
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        for holder in holders {
            self.queue_delivered(id, holder);
        }
    }

    /// Queues `holder`'s subscription to `id`, a message a relay took.
    fn queue_delivered(&mut self, id: &str, holder: Holder) {
        let queue = self.delivered.entry(holder.0.clone()).or_default();
        queue.push_back((id.to_owned(), holder));
        // Ended ones are skipped when a place is needed; past twice the
        // bound they are dropped, so the queue stays within it.
        if queue.len() > 2 * MAX_WATCHED {
            let by_id = &self.by_id;
            queue.retain(|(id, h)| by_id.get(id).is_some_and(|p| p.contains_key(h)));
        }
    }

    /// Ends `caller`'s oldest subscription to a message a relay took, if it
    /// has one: whether a place was freed.
    fn give_up_delivered(&mut self, caller: &Arc<str>) -> bool {
        while let Some((id, holder)) = self.delivered.get_mut(caller).and_then(VecDeque::pop_front)
        {
            if self.by_id.get(&id).is_some_and(|p| p.contains_key(&holder)) {
                self.remove(&id, &holder);
                return true;
            }
        }
        false
    }

    /// Drops the subscriptions of `caller`'s sessions that have closed.
    fn sweep(&mut self, caller: &Arc<str>) {
        let mut dropped = 0;
        self.by_id.retain(|_, peers| {
            peers.retain(|holder, peer| {
                let gone = holder.0 == *caller && peer.is_transport_closed();
                dropped += usize::from(gone);
                !gone
            });
            !peers.is_empty()
        });
        let by_id = &self.by_id;
        self.watches.retain(|id, _| by_id.contains_key(id));
        self.release(caller, dropped);
    }
}

/// A caller already watches [`MAX_WATCHED`] messages.
#[derive(Debug)]
pub struct TooMany;

impl std::fmt::Display for TooMany {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "this caller is subscribed to {MAX_WATCHED} messages, the most it may; \
             unsubscribe from one, or follow a batch with list_messages"
        )
    }
}

impl Subscriptions {
    /// Subscribes `session` of `caller` to the message `id`, in `state`.
    pub async fn subscribe(
        &self,
        queue: &Queue,
        caller: &Arc<str>,
        session: String,
        id: &str,
        state: State,
        peer: Peer<RoleServer>,
    ) -> Result<(), TooMany> {
        let holder = (caller.clone(), session);
        // Before the lock: it reads the message's state. Kept by the first
        // subscriber of the message, dropped (unwatched) otherwise.
        let watch = queue.watch(vec![id.to_owned()]).await;
        {
            let mut w = self.lock();
            if let Some(held) = w.by_id.get_mut(id).and_then(|p| p.get_mut(&holder)) {
                *held = peer;
                return Ok(());
            }
            if w.per_caller.get(caller).copied().unwrap_or(0) >= MAX_WATCHED {
                w.sweep(caller);
                if w.per_caller.get(caller).copied().unwrap_or(0) >= MAX_WATCHED
                    && !w.give_up_delivered(caller)
                {
                    return Err(TooMany);
                }
            }
            let delivered = state.is_final() || w.delivered_ids.contains(id);
            w.by_id
                .entry(id.to_owned())
                .or_default()
                .insert(holder.clone(), peer);
            w.watches.entry(id.to_owned()).or_insert(watch);
            *w.per_caller.entry(caller.clone()).or_default() += 1;
            if delivered {
                w.delivered_ids.insert(id.to_owned());
                w.queue_delivered(id, holder);
            }
        }
        self.listening.get_or_init(|| {
            tokio::spawn(forward(self.clone(), queue.changes()));
        });
        Ok(())
    }

    /// Ends the subscription of `session` of `caller` to `id`, if it has one.
    pub fn unsubscribe(&self, caller: &Arc<str>, session: String, id: &str) {
        self.lock().remove(id, &(caller.clone(), session));
    }

    /// The subscribers of `id`, for one change to `state`: a final state
    /// no relay took it in ends their subscriptions ([`ends_at`]).
    fn take(&self, id: &str, state: State) -> Vec<(Holder, Peer<RoleServer>)> {
        let mut w = self.lock();
        let peers: Vec<_> = match w.by_id.get(id) {
            Some(p) => p.iter().map(|(h, p)| (h.clone(), p.clone())).collect(),
            None => return Vec::new(),
        };
        if ends_at(state) {
            for (holder, _) in &peers {
                w.remove(id, holder);
            }
        } else if state.is_final() {
            w.deliver(id);
        }
        peers
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Watched> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Serves one `subscriptions/listen` stream: a resource update for each
/// state change of the messages `ids`, until the client cancels it or goes.
pub async fn listen(queue: &Queue, ids: HashSet<String>, context: SubscriptionContext) {
    let mut changes = queue.changes();
    let _watch = queue.watch(ids.iter().cloned().collect()).await;
    loop {
        tokio::select! {
            () = context.cancelled() => return,
            change = changes.recv() => match change {
                Ok(change) if ids.contains(&change.message_id) => {
                    let sent = context
                        .sink()
                        .notify_resource_updated(uri(&change.message_id))
                        .await;
                    if sent.is_err() {
                        tracing::debug!(message_id = %change.message_id, "a listening client is gone");
                        return;
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "a subscription fell behind; some updates were not sent");
                }
                Err(RecvError::Closed) => return,
            },
        }
    }
}

/// Forwards each state change to the sessions subscribed to that message.
async fn forward(
    subs: Subscriptions,
    mut changes: tokio::sync::broadcast::Receiver<mailmux_actors::queue::Change>,
) {
    loop {
        match changes.recv().await {
            Ok(change) => {
                let id = &change.message_id;
                for (holder, peer) in subs.take(id, change.state) {
                    let param = ResourceUpdatedNotificationParam::new(uri(id));
                    if peer.notify_resource_updated(param).await.is_err() {
                        tracing::debug!(message_id = %id, "a subscribed client is gone");
                        subs.lock().remove(id, &holder);
                    }
                }
            }
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "resource notifications fell behind; some updates were not sent"
                );
            }
            Err(RecvError::Closed) => return,
        }
    }
}
