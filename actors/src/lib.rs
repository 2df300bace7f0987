//! `mailmux-actors`: the actor system that delivers mail over SMTP.
//!
//! It takes validated [`Settings`] and composed [`Mail`], and knows nothing of
//! MCP, JSON or configuration files.
//!
//! Layout:
//! - [`settings`]: the validated settings the actors run on;
//! - [`mail`]: the message going in and the report coming out;
//! - [`status`]: read-only views for status, probes and reloads;
//! - [`dispatcher`]: the handle the daemon holds, and the caller's side of a send.

pub mod dispatcher;
pub mod mail;
pub mod settings;
pub mod status;

#[cfg(feature = "fault-hooks")]
pub use dispatcher::PanicTarget;
pub use dispatcher::{ControlError, Dispatcher};
pub use mail::{
    Attempt, FailureClass, FailureReason, Mail, Progress, Rejected, Reply, Report, Status,
};
pub use settings::{
    Credentials, HealthSettings, Limits, PoolSettings, RelayKind, RelaySettings, RouterSettings,
    Secret, Settings, SmtpSettings, Strategy, SupervisorSettings, Timeouts, TlsMode,
};
pub use status::{
    Counters, Latency, ProbeReport, RelayState, RelayStatus, ReloadDiff, Selection, ShutdownReport,
    Snapshot,
};
