//! The dispatcher: the one handle the daemon holds on the actor system.
//!
//! It owns the global in-flight bound and the caller's side of every send: it
//! waits for the reply until the deadline and, when an actor crashed under a
//! message that had not reached DATA yet, sends it again through the router.

use std::time::Duration;

use crate::mail::{Mail, Report};
use crate::settings::Settings;
use crate::status::{ProbeReport, ReloadDiff, Selection, ShutdownReport, Snapshot};

/// Errors of the dispatcher's control operations (not of deliveries: those
/// are reports).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ControlError {
    #[error("unknown relay {name:?}; valid relays: {}", valid.join(", "))]
    UnknownRelay { name: String, valid: Vec<String> },
    #[error("invalid settings: {0}")]
    Invalid(String),
    #[error("the dispatcher has stopped")]
    Stopped,
}

/// An actor to crash on purpose, for fault tests.
#[cfg(feature = "fault-hooks")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PanicTarget {
    Relay(String),
    Router,
}

/// A cheap, cloneable handle on a running actor system.
#[derive(Clone, Debug)]
pub struct Dispatcher {}

impl Dispatcher {
    /// Starts the supervisor, the router and one actor per relay.
    pub async fn start(settings: Settings) -> Result<Dispatcher, ControlError> {
        let _ = settings;
        todo!()
    }

    /// Delivers one message, failing over as the settings allow. Never hangs
    /// past `mail.deadline` (plus a few milliseconds of bookkeeping).
    pub async fn send(&self, mail: Mail) -> Report {
        let _ = mail;
        todo!()
    }

    /// A snapshot of every relay and the router.
    pub async fn status(&self) -> Result<Snapshot, ControlError> {
        todo!()
    }

    /// Pins a relay (`Some`) or unpins (`None`); returns the new selection.
    pub async fn pin(&self, relay: Option<String>) -> Result<Selection, ControlError> {
        let _ = relay;
        todo!()
    }

    /// The current pin and the relay the next message would go to.
    pub async fn selection(&self) -> Result<Selection, ControlError> {
        todo!()
    }

    /// Probes every relay, or the one named.
    pub async fn test_connection(
        &self,
        relay: Option<&str>,
    ) -> Result<Vec<ProbeReport>, ControlError> {
        let _ = relay;
        todo!()
    }

    /// Applies new settings as a diff: added relays start, removed relays
    /// drain and stop, changed relays are replaced.
    pub async fn reload(&self, settings: Settings) -> Result<ReloadDiff, ControlError> {
        let _ = settings;
        todo!()
    }

    /// Drops every connection, resets health and probes each relay.
    pub async fn reconnect(&self) -> Result<Snapshot, ControlError> {
        todo!()
    }

    /// Refuses new sends, waits up to `grace` for those in flight, then stops
    /// the actors (which QUIT their connections).
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        let _ = grace;
        todo!()
    }

    /// Crashes an actor, for fault tests only.
    #[cfg(feature = "fault-hooks")]
    pub async fn inject_panic(&self, target: PanicTarget) -> Result<(), ControlError> {
        let _ = target;
        todo!()
    }
}
