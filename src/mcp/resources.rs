//! Each message as an MCP resource, `mailmux://messages/{message_id}`: its
//! status as JSON (the same shape as `get_message_status`, never the body),
//! and `notifications/resources/updated` to the clients subscribed to it
//! whenever its state changes (and, on a `subscriptions/listen` stream,
//! when a bounce or complaint report is noted on it after it was sent).
//!
//! Clients of 2025-06-18 and 2025-11-25 subscribe with `resources/subscribe`
//! ([`Subscriptions`]): one listener on the queue's state changes starts with
//! the first subscription, so a daemon nobody subscribes to pays nothing for
//! it. Clients of 2026-07-28 open a `subscriptions/listen` stream instead
//! ([`listen`]), which holds its own listener for as long as it is open.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use mailmux_actors::queue::{Queue, Watch};
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

/// Which sessions are subscribed to which message (`resources/subscribe`).
///
/// A session holds one subscription per message however often it asks; it
/// ends with `resources/unsubscribe` from the same session, when the
/// message reaches a final state (after that update), or when an update
/// finds the session gone. A caller holds at most [`MAX_WATCHED`]; at that
/// bound the subscriptions of its closed sessions are dropped first.
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
    /// Subscribes `session` of `caller` to the message `id`.
    pub async fn subscribe(
        &self,
        queue: &Queue,
        caller: &Arc<str>,
        session: String,
        id: &str,
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
                if w.per_caller.get(caller).copied().unwrap_or(0) >= MAX_WATCHED {
                    return Err(TooMany);
                }
            }
            w.by_id
                .entry(id.to_owned())
                .or_default()
                .insert(holder, peer);
            w.watches.entry(id.to_owned()).or_insert(watch);
            *w.per_caller.entry(caller.clone()).or_default() += 1;
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

    /// The subscribers of `id`, for one state change; a final state ends
    /// their subscriptions.
    fn take(&self, id: &str, last: bool) -> Vec<(Holder, Peer<RoleServer>)> {
        let mut w = self.lock();
        let peers: Vec<_> = match w.by_id.get(id) {
            Some(p) => p.iter().map(|(h, p)| (h.clone(), p.clone())).collect(),
            None => return Vec::new(),
        };
        if last {
            for (holder, _) in &peers {
                w.remove(id, holder);
            }
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
                for (holder, peer) in subs.take(id, change.state.is_final()) {
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
