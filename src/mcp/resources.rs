//! Each message as an MCP resource, `mailmux://messages/{message_id}`: its
//! status as JSON (the same shape as `get_message_status`, never the body),
//! and `notifications/resources/updated` to the clients subscribed to it
//! whenever its state changes.
//!
//! Clients of 2025-06-18 and 2025-11-25 subscribe with `resources/subscribe`
//! ([`Subscriptions`]): one listener on the queue's state changes starts with
//! the first subscription, so a daemon nobody subscribes to pays nothing for
//! it. Clients of 2026-07-28 open a `subscriptions/listen` stream instead
//! ([`listen`]), which holds its own listener for as long as it is open.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use mailmux_actors::queue::Queue;
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

/// Which peers are subscribed to which message.
#[derive(Debug, Default, Clone)]
pub struct Subscriptions {
    by_id: Arc<Mutex<HashMap<String, Vec<Peer<RoleServer>>>>>,
    listening: Arc<OnceLock<()>>,
}

impl Subscriptions {
    pub fn subscribe(&self, queue: &Queue, id: &str, peer: Peer<RoleServer>) {
        self.by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_owned())
            .or_default()
            .push(peer);
        self.listening.get_or_init(|| {
            tokio::spawn(forward(self.clone(), queue.changes()));
        });
    }

    /// Removes every subscription of `id` (the legacy protocol names no
    /// peer in `resources/unsubscribe`; one client per stdio process).
    pub fn unsubscribe(&self, id: &str) {
        self.by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    fn peers(&self, id: &str) -> Vec<Peer<RoleServer>> {
        self.by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .unwrap_or_default()
    }
}

/// Serves one `subscriptions/listen` stream: a resource update for each
/// state change of the messages `ids`, until the client cancels it or goes.
pub async fn listen(queue: &Queue, ids: Vec<String>, context: SubscriptionContext) {
    let mut changes = queue.changes();
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

/// Forwards each state change to the peers subscribed to that message.
async fn forward(
    subs: Subscriptions,
    mut changes: tokio::sync::broadcast::Receiver<mailmux_actors::queue::Change>,
) {
    loop {
        match changes.recv().await {
            Ok(change) => {
                for peer in subs.peers(&change.message_id) {
                    let param = ResourceUpdatedNotificationParam::new(uri(&change.message_id));
                    if peer.notify_resource_updated(param).await.is_err() {
                        tracing::debug!(message_id = %change.message_id, "a subscribed client is gone");
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
