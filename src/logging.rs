//! Logging setup: a tracing subscriber that writes to stderr only, as text or
//! JSON, filtered by `RUST_LOG`, else the seed's `LOG_LEVEL`, else `info`.
//!
//! It never writes to stdout: under stdio, stdout belongs to MCP.
//!
//! Whatever the filter, two libraries are held below the levels at which
//! they log what goes over the wire, so that message bodies and secrets
//! never reach the log: rmcp (every request and response, tool arguments
//! included, at `debug`) is held at `warn`, and async-imap (every IMAP
//! command, LOGIN and the APPENDed message included, at `trace`) at
//! `debug`. rmcp's `info` lines go too: each client's whole `initialize`
//! request and every notification it sends, and over stateless HTTP three
//! lines a request, beside the one line mailmux writes for each call.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Maps the seed's `LOG_LEVEL` names (Python's) to a tracing filter.
pub fn level_from_seed(level: &str) -> Option<&'static str> {
    match level.trim().to_ascii_uppercase().as_str() {
        "TRACE" => Some("trace"),
        "DEBUG" => Some("debug"),
        "INFO" => Some("info"),
        "WARNING" | "WARN" => Some("warn"),
        "ERROR" | "CRITICAL" | "FATAL" => Some("error"),
        "OFF" => Some("off"),
        _ => None,
    }
}

/// The filter in force: `RUST_LOG` when set, else `LOG_LEVEL`, else `info`.
pub fn filter() -> EnvFilter {
    if let Ok(spec) = std::env::var("RUST_LOG")
        && !spec.trim().is_empty()
        && let Ok(filter) = EnvFilter::try_new(&spec)
    {
        return filter;
    }
    let level = std::env::var("LOG_LEVEL")
        .ok()
        .and_then(|l| level_from_seed(&l))
        .unwrap_or("info");
    EnvFilter::new(level)
}

/// The most each library that logs wire traffic may log, on top of
/// [`filter`]; everything else is left to it.
fn wire_caps() -> Targets {
    Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target("rmcp", LevelFilter::WARN)
        .with_target("async_imap", LevelFilter::DEBUG)
}

/// Installs the global subscriber. Calling it twice is harmless.
pub fn init(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_target(true);
    let result = match format {
        LogFormat::Text => builder
            .with_ansi(false)
            .finish()
            .with(wire_caps())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .finish()
            .with(wire_caps())
            .try_init(),
    };
    // A second init (tests) keeps the first subscriber; nothing to report.
    drop(result);
}

#[cfg(test)]
mod tests {
    use super::level_from_seed;

    #[test]
    fn seed_levels() {
        assert_eq!(level_from_seed("DEBUG"), Some("debug"));
        assert_eq!(level_from_seed("warning"), Some("warn"));
        assert_eq!(level_from_seed("ERROR"), Some("error"));
        assert_eq!(level_from_seed("INFO"), Some("info"));
        assert_eq!(level_from_seed("loud"), None);
    }
}
