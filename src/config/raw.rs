//! The raw configuration: the serde shape that figment merges from every
//! layer, before validation.
//!
//! Every field is optional here; the default that applies when a field is
//! absent is documented on the field and applied in `validate`, never here.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Top-level keys, for the unknown-key check of configuration files.
pub(crate) const TOP_KEYS: &[&str] = &[
    "strategy",
    "max_attempts",
    "from_email",
    "allowed_senders",
    "send_deadline",
    "shutdown_grace",
    "max_in_flight",
    "max_concurrent_calls",
    "max_batch",
    "max_message_bytes",
    "max_recipients",
    "max_attachment_bytes",
    "attachments_dir",
    "message_id_domain",
    "outbox_dir",
    "log_level",
    "supervisor",
    "http",
    "queue",
    "relay_defaults",
    "relays",
    "stdio_caller",
    "policy",
    "callers",
    "operators",
    "audit",
    "metrics",
    "dkim",
    "unsubscribe",
    "templates",
    "notify",
];

/// Keys of `[policy]`, which every `[[callers]]` entry may override.
pub(crate) const POLICY_KEYS: &[&str] = &[
    "allowed_senders",
    "allowed_recipients",
    "allow_bcc",
    "max_recipients",
    "max_message_bytes",
    "allowed_relays",
    "mode",
    "rate",
    "approval",
    "approval_ttl",
    "elicitation_timeout",
    "approver",
    "relay_control",
    "headers",
    "from_email",
    "content_checks",
    "allowed_templates",
    "require_template",
    "transactional",
    "max_age",
];

/// Keys of one `content_checks` entry of a policy.
pub(crate) const CONTENT_CHECK_KEYS: &[&str] = &["name", "pattern", "action"];

/// Keys of a `[[callers]]` or `[[operators]]` entry besides the policy keys.
pub(crate) const IDENTITY_KEYS: &[&str] = &["name", "token_sha256", "token_file", "token_env"];

pub(crate) const AUDIT_KEYS: &[&str] = &["path", "subjects", "required"];

/// Keys of `[unsubscribe]`.
pub(crate) const UNSUBSCRIBE_KEYS: &[&str] = &[
    "url",
    "secret",
    "secret_file",
    "previous_secret",
    "previous_secret_file",
];

/// Keys of a `[[templates]]` entry.
pub(crate) const TEMPLATE_KEYS: &[&str] = &[
    "name",
    "description",
    "subject",
    "body",
    "body_file",
    "html_body",
    "html_body_file",
    "vars",
    "images",
];

/// Keys of a `[[dkim]]` entry.
pub(crate) const DKIM_KEYS: &[&str] = &["domain", "selector", "private_key", "headers"];

pub(crate) const SUPERVISOR_KEYS: &[&str] = &["max_restarts", "restart_window", "restart_pause"];

pub(crate) const HTTP_KEYS: &[&str] = &[
    "bind",
    "token",
    "token_file",
    "allowed_hosts",
    "allowed_origins",
    "body_limit",
    "read_timeout",
    "max_connections",
    "stateful",
    "max_sessions",
    "max_sessions_per_caller",
    "tls_cert",
    "tls_key",
    "auth_failures",
];

pub(crate) const METRICS_KEYS: &[&str] = &["token", "token_file", "bind"];

/// Keys of `[notify]`.
pub(crate) const NOTIFY_KEYS: &[&str] = &["url", "token", "token_file", "events", "console_url"];

pub(crate) const QUEUE_KEYS: &[&str] = &[
    "store",
    "path",
    "max_age",
    "retry_base",
    "retry_max",
    "idempotency_ttl",
    "retain",
    "max_schedule",
    "min_free",
    "url",
    "pool_size",
    "node_id",
    "lease",
    "suppress_bounces",
];

/// Keys that `relay_defaults` accepts and every relay may override.
pub(crate) const TUNING_KEYS: &[&str] = &[
    "max_connections",
    "max_queued",
    "messages_per_connection",
    "idle_timeout",
    "timeout",
    "connect_timeout",
    "greeting_timeout",
    "command_timeout",
    "data_timeout",
    "backoff_base",
    "backoff_max",
    "circuit_failures",
    "circuit_window",
    "probe_interval",
];

/// Keys of one relay besides the tuning keys.
pub(crate) const RELAY_KEYS: &[&str] = &[
    "name",
    "kind",
    "host",
    "port",
    "tls",
    "username",
    "password",
    "password_file",
    "hello_name",
    "ca_file",
    "accept_invalid_certs",
    "pipelining",
    "recipients_per_transaction",
    "priority",
    "weight",
    "from_email",
    "dir",
    "rate",
    "senders",
    "return_path",
    "dsn_notify",
    "dsn_ret",
    "auth",
    "oauth",
    "sent_copy",
    "bounces",
];

/// Keys of a relay's `sent_copy` table.
pub(crate) const SENT_COPY_KEYS: &[&str] = &[
    "imap_host",
    "port",
    "tls",
    "folder",
    "username",
    "password",
    "password_file",
    "include_bcc",
    "max_connections",
    "attempts",
    "retry_base",
    "ca_file",
];

/// Keys of a relay's `bounces` table.
pub(crate) const BOUNCES_KEYS: &[&str] = &[
    "imap_host",
    "port",
    "tls",
    "folder",
    "username",
    "password",
    "password_file",
    "ca_file",
    "every",
];

/// Keys of a relay's `oauth` table.
pub(crate) const OAUTH_KEYS: &[&str] = &[
    "provider",
    "tenant",
    "token_url",
    "client_id",
    "client_secret",
    "client_secret_file",
    "refresh_token",
    "refresh_token_file",
    "grant",
    "scope",
];

/// The whole configuration as the layers wrote it.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawConfig {
    /// `priority` | `round_robin` | `weighted` | `least_outstanding` | `random`.
    /// Default: `priority`.
    pub strategy: Option<String>,
    /// Relays one message may try, in all (`SMTP_MAX_RETRIES` sets it too).
    /// Default: 3.
    pub max_attempts: Option<u32>,
    /// Sender when a message names none. Default: none, then the `from_email`
    /// of the highest-priority relay that has one.
    pub from_email: Option<String>,
    /// Senders a message may use: exact addresses or `@domain`. Default: empty
    /// (any sender).
    pub allowed_senders: Option<StringList>,
    /// Overall deadline of one send. Default: 90s.
    pub send_deadline: Option<Dur>,
    /// How long shutdown waits for deliveries in flight. Default: 30s.
    pub shutdown_grace: Option<Dur>,
    /// Messages in delivery at once, across relays. Default: 4096.
    pub max_in_flight: Option<usize>,
    /// MCP calls handled at once, over stdio or HTTP; more wait unread.
    /// Default: 64.
    pub max_concurrent_calls: Option<usize>,
    /// Messages one `send_batch` call may carry. Default: 1000.
    pub max_batch: Option<usize>,
    /// Largest encoded message in bytes. Default: 10485760 (10 MiB).
    pub max_message_bytes: Option<usize>,
    /// Recipients per message, to, cc and bcc together. Default: 100.
    pub max_recipients: Option<usize>,
    /// One decoded attachment in bytes. Default: 7340032 (7 MiB).
    pub max_attachment_bytes: Option<usize>,
    /// Attachments by path are read only inside this folder. Default: none
    /// (attachments by path are refused).
    pub attachments_dir: Option<PathBuf>,
    /// Domain of generated Message-IDs. Default: `mailmux.localhost`.
    pub message_id_domain: Option<String>,
    /// Folder of the embedded file relay. Default: `outbox`.
    pub outbox_dir: Option<PathBuf>,
    /// Log filter when `RUST_LOG` is not set (`LOG_LEVEL` sets it too).
    /// Default: none (the daemon's own default).
    pub log_level: Option<String>,
    #[serde(default)]
    pub supervisor: RawSupervisor,
    #[serde(default)]
    pub http: RawHttp,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub queue: RawQueue,
    /// Tuning applied to every relay that does not set the key itself.
    #[serde(default)]
    pub relay_defaults: RawRelay,
    /// The relays, in order. Default: none, which means the embedded file
    /// relay `outbox`.
    #[serde(default)]
    pub relays: Vec<RawRelay>,
    /// The caller that stdio serves. Default: `local`.
    pub stdio_caller: Option<String>,
    /// The default policy of every caller.
    #[serde(default)]
    pub policy: RawPolicy,
    /// Callers named by their bearer tokens, each with policy overrides.
    #[serde(default)]
    pub callers: Vec<RawIdentity>,
    /// People who may approve and reject held messages.
    #[serde(default)]
    pub operators: Vec<RawIdentity>,
    #[serde(default)]
    pub audit: RawAudit,
    /// `[[dkim]]`: the keys that sign outgoing mail. Default: none.
    #[serde(default)]
    pub dkim: Vec<RawDkim>,
    /// `[unsubscribe]`: the one-click unsubscribe links the daemon serves.
    /// Default: none.
    #[serde(default)]
    pub unsubscribe: RawUnsubscribe,
    /// `[[templates]]`: subjects and bodies a call names. Default: none.
    #[serde(default)]
    pub templates: Vec<RawTemplate>,
    /// `[notify]`: the webhook told of message events. Default: none.
    #[serde(default)]
    pub notify: RawNotify,
    /// Relays from the seed's `SMTP_*` env vars, by suffix; never written in
    /// a file (the unknown-key check refuses it there).
    #[serde(default)]
    pub smtp_env: BTreeMap<String, RawSeedRelay>,
}

/// `[supervisor]`: restart policy of crashed actors.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawSupervisor {
    /// Restarts of one actor within `restart_window`. Default: 5.
    pub max_restarts: Option<u32>,
    /// Window of the restart budget. Default: 60s.
    pub restart_window: Option<Dur>,
    /// Pause before each restart. Default: 100ms.
    pub restart_pause: Option<Dur>,
}

/// `[http]`: the streamable HTTP transport.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawHttp {
    /// Listen address. Default: `127.0.0.1:8025`.
    pub bind: Option<String>,
    /// Bearer token (`MAILMUX_HTTP_TOKEN`). Default: none (no token check).
    pub token: Option<String>,
    /// File holding the bearer token. Default: none.
    pub token_file: Option<PathBuf>,
    /// Allowed Host header values. Default: empty (loopback names only).
    pub allowed_hosts: Option<StringList>,
    /// Allowed Origin header values. Default: empty.
    pub allowed_origins: Option<StringList>,
    /// Request body limit in bytes. Default: 16777216 (16 MiB).
    pub body_limit: Option<usize>,
    /// Time a client has to send a request's header, and again its body.
    /// Default: 30s.
    pub read_timeout: Option<Dur>,
    /// Connections open at once; past it, new ones wait to be accepted.
    /// Default: 1024.
    pub max_connections: Option<usize>,
    /// Stateful sessions. Default: true.
    pub stateful: Option<bool>,
    /// MCP sessions open at once (stateful mode). Default: 1024.
    pub max_sessions: Option<usize>,
    /// MCP sessions one caller may hold. Default: 64.
    pub max_sessions_per_caller: Option<usize>,
    /// PEM certificate chain of the listeners' TLS. Default: none (plain HTTP).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Failed authentications one peer address may make, as a rate
    /// (`"10/min"`), or `"off"`. Default: 10/min.
    pub auth_failures: Option<String>,
}

/// One `[[templates]]` entry.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawTemplate {
    /// What a call names. Required.
    pub name: Option<String>,
    /// What it is for, shown to the agent. Default: none.
    pub description: Option<String>,
    /// Required.
    pub subject: Option<String>,
    /// The text body, or `body_file`. One of them is required.
    pub body: Option<String>,
    pub body_file: Option<PathBuf>,
    /// An HTML alternative, or `html_body_file`. Default: none.
    pub html_body: Option<String>,
    pub html_body_file: Option<PathBuf>,
    /// What each variable's whole value must match (a regular
    /// expression); when given, one for every variable. Default: none.
    pub vars: Option<BTreeMap<String, String>>,
    /// Images the HTML body shows, by the id it names them with
    /// (`cid:logo`): `{ logo = "/etc/mailmux/logo.png" }`. Default: none.
    pub images: Option<BTreeMap<String, PathBuf>>,
}

/// One `[[dkim]]` key.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawDkim {
    /// The signing domain (`d=`); it signs mail whose sender's domain is
    /// this one or below it. Required.
    pub domain: Option<String>,
    /// The selector (`s=`). Required.
    pub selector: Option<String>,
    /// The PEM file of the private key (RSA or Ed25519). Required.
    pub private_key: Option<PathBuf>,
    /// The header fields to sign. Default: `compose::dkim::DEFAULT_HEADERS`.
    pub headers: Option<StringList>,
}

/// `[metrics]`: `/metrics`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawMetrics {
    /// Bearer token `/metrics` asks for (`MAILMUX_METRICS__TOKEN`). Default:
    /// none (open to loopback peers only).
    pub token: Option<String>,
    /// File holding that token. Default: none.
    pub token_file: Option<PathBuf>,
    /// A listener of its own for `/metrics`, for a daemon serving stdio.
    /// Default: none.
    pub bind: Option<String>,
}

/// `[notify]`: the webhook told of message events.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawNotify {
    /// Where events are POSTed (`MAILMUX_NOTIFY__URL`): `https:`, or
    /// `http:` to a loopback address. Default: none (no posts).
    pub url: Option<String>,
    /// Bearer token of the posts (`MAILMUX_NOTIFY__TOKEN`). Default: none.
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    /// The events posted (a message's, a pause's). Default: `["held"]`.
    pub events: Option<StringList>,
    /// Where operators reach the console, for a link in each post.
    /// Default: none.
    pub console_url: Option<String>,
}

/// `[unsubscribe]`: the one-click unsubscribe links the daemon serves.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawUnsubscribe {
    /// The daemon's HTTP listener as recipients reach it: `https://host`,
    /// with a path prefix where a proxy adds one.
    pub url: Option<String>,
    /// The key of the links' HMAC (`MAILMUX_UNSUBSCRIBE__SECRET`).
    pub secret: Option<String>,
    pub secret_file: Option<PathBuf>,
    /// The key before a rotation: links made with it still work.
    pub previous_secret: Option<String>,
    pub previous_secret_file: Option<PathBuf>,
}

/// `[queue]`: the durable queue.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawQueue {
    /// `sqlite` | `memory` | `postgres`. Default: `sqlite`.
    pub store: Option<String>,
    /// The PostgreSQL URL (`MAILMUX_QUEUE__URL`; else `DATABASE_URL`). A
    /// secret: shown without its password.
    pub url: Option<String>,
    /// Connections to PostgreSQL. Default: 16.
    pub pool_size: Option<u32>,
    /// This daemon's name on a shared queue. Default: host name and pid.
    pub node_id: Option<String>,
    /// How long a daemon's claim on a message lasts without renewal.
    /// Default: 30s.
    pub lease: Option<Dur>,
    /// The SQLite file. Default: `mailmux-queue.db` in the working folder.
    pub path: Option<PathBuf>,
    /// How long a message may wait for delivery from when it is due.
    /// Default: 24h.
    pub max_age: Option<Dur>,
    /// First retry delay after every relay failed transiently. Default: 30s.
    pub retry_base: Option<Dur>,
    /// Retry delay cap. Default: 1h.
    pub retry_max: Option<Dur>,
    /// How long an idempotency key is remembered. Default: 24h.
    pub idempotency_ttl: Option<Dur>,
    /// How long finished messages are kept for status queries. Default: 7d.
    pub retain: Option<Dur>,
    /// How far ahead `send_at` may be. Default: 30d.
    pub max_schedule: Option<Dur>,
    /// Bytes new mail must leave free on the SQLite store's file system; 0
    /// for none. Default: 100 MiB.
    pub min_free: Option<u64>,
    /// Whether a recipient that a relay refuses as unknown (an enhanced
    /// status of 5.1.1, 5.1.2 or 5.1.10) goes on the suppression list.
    /// Default: true.
    pub suppress_bounces: Option<bool>,
}

/// `[policy]`, and the overrides on a `[[callers]]` entry. An overriding
/// list replaces the default list.
#[derive(Debug, Default, Clone, Deserialize)]
pub(crate) struct RawPolicy {
    /// Exact addresses or `@domain`. Default: the top-level
    /// `allowed_senders`, else empty (any sender).
    pub allowed_senders: Option<StringList>,
    /// The sender of a message that names none. Default: the top-level
    /// `from_email`.
    pub from_email: Option<String>,
    /// Exact addresses, `@domain`, `@*.domain` or `*`. Default: empty (anyone).
    pub allowed_recipients: Option<StringList>,
    /// Default: true.
    pub allow_bcc: Option<bool>,
    /// Default: none (the global `max_recipients`).
    pub max_recipients: Option<usize>,
    /// Default: none (the global `max_message_bytes`).
    pub max_message_bytes: Option<usize>,
    /// Default: none (any relay).
    pub allowed_relays: Option<StringList>,
    /// `send` | `dry_run`. Default: `send`.
    pub mode: Option<String>,
    /// Limits such as `30/min` or `recipients: 1000/day`. Default: none.
    pub rate: Option<StringList>,
    /// `never` | `always` | `outside_allowlist`. Default: `never`.
    pub approval: Option<String>,
    /// How long a held message waits. Default: 1h.
    pub approval_ttl: Option<Dur>,
    /// How long a call waits for the user's approval form. Default: 5m.
    pub elicitation_timeout: Option<Dur>,
    /// `user` | `operator`: who may release a held message. Default: `user`.
    pub approver: Option<String>,
    /// May pin, reload, reconnect and probe the relays. Default: true.
    pub relay_control: Option<bool>,
    /// Header fields written on every message of the caller, which its
    /// calls may not set. Default: none.
    pub headers: Option<std::collections::BTreeMap<String, String>>,
    /// Patterns that refuse or hold a message by what it says. Default:
    /// none.
    pub content_checks: Option<Vec<RawContentCheck>>,
    /// The `[[templates]]` the caller may name. Default: empty (any).
    pub allowed_templates: Option<StringList>,
    /// Every message must name a template. Default: false.
    pub require_template: Option<bool>,
    /// Sends transactional mail, which an `unsubscribed` entry of the
    /// suppression list does not stop. Default: false.
    pub transactional: Option<bool>,
    /// How long the caller's mail may wait for delivery. Default:
    /// `queue.max_age`.
    pub max_age: Option<Dur>,
}

/// One entry of `content_checks`.
#[derive(Debug, Default, Clone, Deserialize)]
pub(crate) struct RawContentCheck {
    pub name: Option<String>,
    /// A regular expression (the `regex` crate's syntax).
    pub pattern: Option<String>,
    /// `reject` | `hold`.
    pub action: Option<String>,
}

/// A `[[callers]]` or `[[operators]]` entry: a name and one token form.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawIdentity {
    pub name: Option<String>,
    /// Hex of the token's SHA-256.
    pub token_sha256: Option<String>,
    /// A file holding the token.
    pub token_file: Option<PathBuf>,
    /// An environment variable holding the token.
    pub token_env: Option<String>,
    /// Policy overrides (callers only).
    #[serde(flatten)]
    pub policy: RawPolicy,
}

/// `[audit]`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawAudit {
    /// The JSON-lines file. Default: none (no audit log).
    pub path: Option<PathBuf>,
    /// Subjects as written (true) or as SHA-256 (false). Default: true.
    pub subjects: Option<bool>,
    /// Refuse new messages while the log cannot be written. Default: false.
    pub required: Option<bool>,
}

/// One `[[relays]]` entry, and also `[relay_defaults]` (tuning keys only).
#[derive(Debug, Default, Clone, Deserialize)]
pub(crate) struct RawRelay {
    /// Unique name. Default: `host` for SMTP relays, `outbox` for file relays.
    pub name: Option<String>,
    /// `smtp` | `file`. Default: `smtp`.
    pub kind: Option<String>,
    /// SMTP server host name or address. Required for SMTP relays.
    pub host: Option<String>,
    /// Default: 587 for `starttls`, 465 for `implicit`, 25 otherwise. Wide
    /// so that out-of-range values get a clear error.
    pub port: Option<i64>,
    /// `starttls` | `opportunistic` | `implicit` | `none`. Default: `starttls`.
    pub tls: Option<String>,
    /// AUTH user. Default: none (no AUTH).
    pub username: Option<String>,
    /// AUTH password; prefer `password_file` or the env.
    pub password: Option<String>,
    /// File holding the AUTH password (trailing newline ignored).
    pub password_file: Option<PathBuf>,
    /// EHLO name. Default: the machine's host name.
    pub hello_name: Option<String>,
    /// Extra trusted root certificates, PEM. Default: none.
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate (test servers only). Default: false.
    pub accept_invalid_certs: Option<bool>,
    /// Pipeline MAIL, RCPT and DATA when the server offers PIPELINING.
    /// Default: true.
    pub pipelining: Option<bool>,
    /// RCPTs in one transaction at most. Default: as many as the server
    /// takes.
    pub recipients_per_transaction: Option<u32>,
    /// Higher is preferred. Default: 0.
    pub priority: Option<i32>,
    /// Share of traffic under `weighted`. Default: 1.
    pub weight: Option<u32>,
    /// Sender for messages that name none. Default: none.
    pub from_email: Option<String>,
    /// Folder of a `file` relay. Default: `outbox_dir`.
    pub dir: Option<PathBuf>,
    /// Submission limits such as `30/min`; past them messages wait or fail
    /// over. Default: none.
    pub rate: Option<StringList>,
    /// The only senders this relay carries (`local@domain`, `@domain`,
    /// `@*.domain`); mail from others goes through other relays. Default:
    /// any sender.
    pub senders: Option<StringList>,
    /// The envelope sender (MAIL FROM) of every message through this relay,
    /// where bounces go. Default: each message's sender.
    pub return_path: Option<String>,
    /// Delivery status notifications asked of a server that announces DSN:
    /// `never`, or some of `success`, `failure` and `delay`. Default: none
    /// asked (the server's own).
    pub dsn_notify: Option<StringList>,
    /// `hdrs` or `full`: what a delivery status notification returns of
    /// the message. Default: the server's choice.
    pub dsn_ret: Option<String>,
    /// `auto` | `plain` | `login` | `xoauth2`. Default: `auto` (PLAIN or
    /// LOGIN when a password is set).
    pub auth: Option<String>,
    /// Where `xoauth2` gets its access tokens.
    pub oauth: Option<RawOAuth>,
    /// A copy of each sent message in the Sent folder, over IMAP.
    pub sent_copy: Option<RawSentCopy>,
    pub bounces: Option<RawBounces>,
    /// Open connections at most. Default: 8.
    pub max_connections: Option<usize>,
    /// Messages waiting for a connection at most. Default: 1024.
    pub max_queued: Option<usize>,
    /// Messages per connection before it is closed (0: no limit). Default: 100.
    pub messages_per_connection: Option<u32>,
    /// Idle connections older than this are closed. Default: 30s.
    pub idle_timeout: Option<Dur>,
    /// One timeout for every wait; the specific timeouts below override it.
    pub timeout: Option<Dur>,
    /// TCP connect and implicit-TLS handshake. Default: 10s.
    pub connect_timeout: Option<Dur>,
    /// Greeting and EHLO reply. Default: 30s.
    pub greeting_timeout: Option<Dur>,
    /// Each command's reply. Default: 30s.
    pub command_timeout: Option<Dur>,
    /// Sending the message and the reply after the final ".". Default: 120s.
    pub data_timeout: Option<Dur>,
    /// First backoff after a failure. Default: 1s.
    pub backoff_base: Option<Dur>,
    /// Backoff cap. Default: 300s.
    pub backoff_max: Option<Dur>,
    /// Failures within `circuit_window` that open the circuit. Default: 5.
    pub circuit_failures: Option<u32>,
    /// Window of those failures. Default: 60s.
    pub circuit_window: Option<Dur>,
    /// Probe interval of a relay that is down. Default: 15s.
    pub probe_interval: Option<Dur>,
}

/// One relay from the seed's `SMTP_*{_N}` env vars, field names as in the
/// variable names.
#[derive(Debug, Default, Clone, Deserialize)]
pub(crate) struct RawSeedRelay {
    pub host: Option<String>,
    pub port: Option<i64>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    /// STARTTLS. Default: true, as in the seed.
    pub use_tls: Option<bool>,
    /// Implicit TLS; wins over `use_tls`. Default: false.
    pub use_ssl: Option<bool>,
    pub timeout: Option<Dur>,
    pub from_email: Option<String>,
    pub name: Option<String>,
    pub priority: Option<i32>,
    /// `SMTP_AUTH_METHOD`: `auto`, `plain`, `login` or `xoauth2`.
    pub auth_method: Option<String>,
    pub oauth_provider: Option<String>,
    pub oauth_tenant: Option<String>,
    pub oauth_token_url: Option<String>,
    pub oauth_client_id: Option<String>,
    pub oauth_client_secret: Option<String>,
    pub oauth_client_secret_file: Option<PathBuf>,
    pub oauth_refresh_token: Option<String>,
    pub oauth_refresh_token_file: Option<PathBuf>,
    pub oauth_grant: Option<String>,
    pub oauth_scope: Option<StringList>,
}

/// A relay's `sent_copy` table.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct RawSentCopy {
    /// The IMAP server. Required.
    pub imap_host: Option<String>,
    /// Default: 993 for `implicit`, 143 otherwise.
    pub port: Option<i64>,
    /// `implicit` | `starttls` | `none`. Default: `implicit`.
    pub tls: Option<String>,
    /// The folder; `\Sent` finds the one whose SPECIAL-USE is `\Sent`.
    /// Default: `Sent`.
    pub folder: Option<String>,
    /// Default: the relay's.
    pub username: Option<String>,
    /// Default: the relay's password, or its OAuth2 tokens.
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Add a Bcc header naming the envelope's Bcc recipients. Default: false.
    pub include_bcc: Option<bool>,
    /// IMAP connections at once. Default: 2.
    pub max_connections: Option<usize>,
    /// Tries of one copy. Default: 4.
    pub attempts: Option<u32>,
    /// Wait before the second try, doubling after. Default: 2s.
    pub retry_base: Option<Dur>,
    /// Extra trusted root certificates, PEM. Default: none.
    pub ca_file: Option<PathBuf>,
}

/// The IMAP account of a `sent_copy` or `bounces` table.
#[derive(Debug, Clone, Default)]
pub(crate) struct RawImap {
    /// The IMAP server. Required.
    pub imap_host: Option<String>,
    /// Default: 993 for `implicit`, 143 otherwise.
    pub port: Option<i64>,
    /// `implicit` | `starttls` | `none`. Default: `implicit`.
    pub tls: Option<String>,
    /// Default: the relay's.
    pub username: Option<String>,
    /// Default: the relay's password, or its OAuth2 tokens.
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Extra trusted root certificates, PEM. Default: none.
    pub ca_file: Option<PathBuf>,
}

/// A relay's `bounces` table: the mailbox its bounce and complaint reports
/// come back to.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct RawBounces {
    pub imap_host: Option<String>,
    pub port: Option<i64>,
    pub tls: Option<String>,
    /// Default: `INBOX`.
    pub folder: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    /// How often the folder is read. Default: 1m.
    pub every: Option<Dur>,
}

impl RawBounces {
    pub(crate) fn imap(&self) -> RawImap {
        RawImap {
            imap_host: self.imap_host.clone(),
            port: self.port,
            tls: self.tls.clone(),
            username: self.username.clone(),
            password: self.password.clone(),
            password_file: self.password_file.clone(),
            ca_file: self.ca_file.clone(),
        }
    }
}

impl RawSentCopy {
    pub(crate) fn imap(&self) -> RawImap {
        RawImap {
            imap_host: self.imap_host.clone(),
            port: self.port,
            tls: self.tls.clone(),
            username: self.username.clone(),
            password: self.password.clone(),
            password_file: self.password_file.clone(),
            ca_file: self.ca_file.clone(),
        }
    }
}

/// A relay's `oauth` table.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct RawOAuth {
    /// `microsoft` | `google`: the token URL and scopes. Default: none.
    pub provider: Option<String>,
    /// Microsoft's tenant (id or domain). Default: `organizations`.
    pub tenant: Option<String>,
    /// The token endpoint; `https` unless on loopback. Default: the provider's.
    pub token_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    pub refresh_token: Option<String>,
    /// Read again at every refresh.
    pub refresh_token_file: Option<PathBuf>,
    /// `refresh_token` | `client_credentials`. Default: `refresh_token` when
    /// a refresh token is given, else `client_credentials`.
    pub grant: Option<String>,
    /// Default: the provider's.
    pub scope: Option<StringList>,
}

/// The seed variable stems (after `SMTP_`, before `_N`) that describe a relay.
pub(crate) const SEED_RELAY_FIELDS: &[&str] = &[
    "host",
    "port",
    "username",
    "password",
    "password_file",
    "use_tls",
    "use_ssl",
    "timeout",
    "from_email",
    "name",
    "priority",
    "auth_method",
    "oauth_provider",
    "oauth_tenant",
    "oauth_token_url",
    "oauth_client_id",
    "oauth_client_secret",
    "oauth_client_secret_file",
    "oauth_refresh_token",
    "oauth_refresh_token_file",
    "oauth_grant",
    "oauth_scope",
];

/// A duration written as humantime (`30s`, `5m`, `1h 30m`) or as a bare
/// number of seconds (integer, decimal, or a string of digits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dur(pub Duration);

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// The longest duration a configuration may give: 100 years (of 365.25
/// days, as humantime counts them). Every duration is added to clocks and
/// counted in milliseconds, which a far longer one would overflow.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// `d`, unless it is longer than [`MAX_DURATION`]; `shown` is how it was
/// written.
fn bounded(d: Duration, shown: &dyn fmt::Display) -> Result<Duration, String> {
    if d > MAX_DURATION {
        return Err(format!(
            "invalid duration {shown}: longer than the most a duration may be (100 years)"
        ));
    }
    Ok(d)
}

/// Parses a duration the way configuration files write it.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let shown = format!("{s:?}");
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|e| format!("invalid duration {shown}: {e}"))
            .and_then(|d| bounded(d, &shown));
    }
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("invalid duration {shown}: negative or too large"))
            .and_then(|d| bounded(d, &shown));
    }
    humantime::parse_duration(s)
        .map_err(|e| {
            format!(
                "invalid duration {shown}: {e} (write e.g. `30s`, `5m`, or a number of seconds)"
            )
        })
        .and_then(|d| bounded(d, &shown))
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as `30s` or `5m`, or a number of seconds")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                bounded(Duration::from_secs(v), &v)
                    .map(Dur)
                    .map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("invalid duration {v}: negative")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Dur, E> {
                Duration::try_from_secs_f64(v)
                    .map_err(|_| format!("invalid duration {v}: negative or too large"))
                    .and_then(|d| bounded(d, &v))
                    .map(Dur)
                    .map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A list of strings, written as an array or as one comma-separated string
/// (the form env vars can carry).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct StringList(pub Vec<String>);

impl<'de> Deserialize<'de> for StringList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StringList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of strings or one comma-separated string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StringList, E> {
                Ok(StringList(
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect(),
                ))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StringList, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(StringList(out))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_written_form() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration(" 30s "), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn a_duration_is_at_most_100_years_in_every_written_form() {
        assert_eq!(parse_duration("100y"), Ok(MAX_DURATION));
        for long in ["101y", "500000000000years", "3155760001", "3155760001.5"] {
            let e = parse_duration(long).unwrap_err();
            assert!(e.contains("100 years"), "{long}: {e}");
        }
        // Numbers, as TOML, YAML and JSON files write them.
        let number = |v: &str| serde_json::from_str::<Dur>(v);
        assert_eq!(number("3155760000").unwrap(), Dur(MAX_DURATION));
        for long in ["3155760001", "3155760001.0", "18446744073709551615"] {
            let e = number(long).unwrap_err().to_string();
            assert!(e.contains("100 years"), "{long}: {e}");
        }
    }

    #[test]
    fn duration_serializes_as_humantime() {
        let s = serde_json::to_string(&Dur(Duration::from_secs(90))).unwrap();
        assert_eq!(s, "\"1m 30s\"");
    }
}
