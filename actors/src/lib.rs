//! `mailmux-actors`: the actor system that delivers mail over SMTP.
//!
//! It takes validated [`Settings`] and composed [`Mail`], and knows nothing of
//! MCP, JSON or configuration files.
//!
//! Layout:
//! - [`settings`]: the validated settings the actors run on;
//! - [`mail`]: the message going in and the report coming out;
//! - [`status`]: read-only views for status, probes and reloads;
//! - [`dispatcher`]: the handle the daemon holds, and the caller's side of a send;
//! - `supervisor`, `router`, `relay`: the actors, one file each;
//! - `smtp`, `file`: one delivery attempt over SMTP or into a folder;
//! - [`queue`]: the durable queue: the store trait, its SQLite backend, and
//!   the runner that delivers from it;
//! - `tally`: a count of work in progress that shutdown awaits;
//! - `health`: backoff, circuit breaker, counters and latency of one relay;
//! - [`meters`]: the relay metrics recorded through the `metrics` facade;
//! - [`net`]: a server's socket whose reads are bounded between two writes.

pub mod dispatcher;
mod file;
mod health;
pub mod mail;
pub mod meters;
pub mod net;
pub mod queue;
mod relay;
mod router;
pub mod settings;
mod smtp;
pub mod status;
mod supervisor;
mod tally;

#[cfg(feature = "fault-hooks")]
pub use dispatcher::PanicTarget;
pub use dispatcher::{ControlError, Dispatcher};
pub use mail::{
    Attempt, CommitMark, FailureClass, FailureReason, Mail, Priority, Rejected, Reply, Report,
    Status,
};
pub use settings::{
    AuthMethod, Credentials, Dsn, FetchToken, HealthSettings, Limits, PoolSettings, RelayKind,
    RelayRate, RelaySettings, RouterSettings, Secret, Settings, SmtpSettings, Strategy,
    SupervisorSettings, Timeouts, TlsMode, TokenSource,
};
pub use status::{
    Counters, Latency, ProbeReport, RelayState, RelayStatus, ReloadDiff, Selection, ServerLimits,
    ShutdownReport, Snapshot,
};
