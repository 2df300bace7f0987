//! Calls their clients cancel with `notifications/cancelled`.
//!
//! rmcp cancels a request's own token on that notification, but also on
//! every request still running when its transport ends (stdin closed, after
//! a few seconds), and the end of stdin must not cancel a send: it stops the
//! daemon, which delivers what it holds within `shutdown_grace`. So a call
//! that may be cancelled registers here, and only the notification
//! (`on_cancelled`) fires its token. A call is named by its caller, its
//! session (the `Mcp-Session-Id` header; none over stdio) and its request
//! id, so that no client can cancel another's call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rmcp::model::{Extensions, RequestId};
use tokio_util::sync::CancellationToken;

use crate::policy::Caller;

type Key = (Arc<str>, String, RequestId);

/// The calls running now that their clients may cancel.
#[derive(Debug, Default)]
pub struct Calls {
    open: Mutex<HashMap<Key, CancellationToken>>,
}

/// A registered call: its token fires if its client cancels it. Dropped
/// when the call ends.
#[derive(Debug)]
pub struct Registered<'a> {
    calls: &'a Calls,
    key: Key,
    pub token: CancellationToken,
}

impl Calls {
    /// Registers the call `id` of `caller` in the session `extensions` name.
    pub fn register(
        &self,
        caller: &Caller,
        extensions: &Extensions,
        id: RequestId,
    ) -> Registered<'_> {
        let key = (caller.name.clone(), session(extensions), id);
        let token = CancellationToken::new();
        self.lock().insert(key.clone(), token.clone());
        Registered {
            calls: self,
            key,
            token,
        }
    }

    /// The client of `caller` in the session `extensions` name cancelled
    /// its call `id`.
    pub fn cancel(&self, caller: &Caller, extensions: &Extensions, id: RequestId) {
        let key = (caller.name.clone(), session(extensions), id);
        if let Some(token) = self.lock().get(&key) {
            tracing::info!(request = %key.2, "a call was cancelled by its client");
            token.cancel();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, CancellationToken>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.calls.lock().remove(&self.key);
    }
}

/// The session of a request or notification: its `Mcp-Session-Id` header
/// over HTTP, none over stdio.
pub(crate) fn session(extensions: &Extensions) -> String {
    extensions
        .get::<axum::http::request::Parts>()
        .and_then(|p| p.headers.get("mcp-session-id"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}
