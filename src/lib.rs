//! mailmux: an MCP server through which AI agents send email.
//!
//! Layout:
//! - [`config`]: layered configuration, validated into actor settings;
//! - [`compose`]: validation and rendering of messages;
//! - `mailmux_actors` (the `actors/` crate): supervisor, router, relays.

pub mod compose;
pub mod config;
