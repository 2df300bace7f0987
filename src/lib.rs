//! mailmux: an MCP server through which AI agents send email.
//!
//! Layout:
//! - [`config`]: layered configuration, validated into actor settings;
//! - [`compose`]: validation and rendering of messages;
//! - [`policy`]: callers, operators and the per-caller policy and rates;
//! - [`audit`]: the audit log;
//! - [`imap`]: an IMAP account and its login;
//! - [`sent_copy`]: the copy of each sent message in the Sent folder (IMAP);
//! - [`bounces`]: bounce and complaint reports read from a relay's mailbox;
//! - [`suppress`]: the suppression list, the addresses no mail is accepted for;
//! - [`telemetry`]: the Prometheus metrics;
//! - [`console`]: the operators' web console on the HTTP listener;
//! - [`oauth`]: OAuth2 access tokens for XOAUTH2 relays;
//! - [`mcp`]: the MCP tools and the stdio and HTTP transports (only it knows rmcp);
//! - [`cli`]: the command line (`serve`, `send`, `check`, `config`);
//! - [`logging`]: tracing to stderr;
//! - [`service`]: what systemd hears (readiness, reloads, the watchdog);
//! - `mailmux_actors` (the `actors/` crate): supervisor, router, relays.

pub mod audit;
pub mod bounces;
pub mod cli;
pub mod compose;
pub mod config;
pub mod console;
pub mod imap;
pub mod logging;
pub mod mcp;
pub mod notify;
pub mod oauth;
pub mod policy;
pub mod sent_copy;
pub mod service;
pub mod suppress;
pub mod telemetry;
