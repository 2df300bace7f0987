//! Validation: turns the merged raw configuration into the typed settings the
//! daemon and the actors run on, applying the documented defaults.
//!
//! Every error names the key and the source of its value, looked up in the
//! merged figment tree; secrets are read here but never printed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use figment::Figment;
use figment::value::Value;
use mailmux_actors::queue::postgres::{self, PgSettings};
use mailmux_actors::queue::{QueueSettings, StoreKind};
use mailmux_actors::{
    AuthMethod, Credentials, HealthSettings, Limits, PoolSettings, RelayKind, RelayRate,
    RelaySettings, RouterSettings, Secret, Settings, SmtpSettings, Strategy, SupervisorSettings,
    Timeouts, TlsMode,
};
use serde_json::{Map, Value as Json, json};

use super::env::{SEED_KEY, SINGLE, seed_var_name, source_name};
use super::raw::{
    Dur, RawBounces, RawConfig, RawImap, RawOAuth, RawRelay, RawSeedRelay, RawSentCopy, StringList,
};
use super::{Config, ConfigError, DaemonSettings, HttpSettings, MetricsSettings};
use crate::compose::ComposePolicy;

/// Source name of a value no layer set.
pub(crate) const DEFAULT_SOURCE: &str = "default";
/// What `mailmux config` prints instead of a secret.
pub(super) const REDACTED: &str = "[redacted]";

/// Defaults of the daemon's own keys; the actors' defaults come from their
/// `Default` impls.
const SEND_DEADLINE: Duration = Duration::from_secs(90);
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
const HTTP_READ_TIMEOUT: Duration = Duration::from_secs(30);
const HTTP_MAX_CONNECTIONS: usize = 1024;
const HTTP_MAX_SESSIONS: usize = 1024;
const HTTP_MAX_SESSIONS_PER_CALLER: usize = 64;
const HTTP_AUTH_FAILURES: &str = "10/min";
const HTTP_BIND: &str = "127.0.0.1:8025";
/// Above the largest message (10 MiB) even after base64 in a JSON body.
const HTTP_BODY_LIMIT: usize = 16 * 1024 * 1024;
/// MCP calls handled at once: enough to keep every relay busy, few enough
/// that 64 calls near the size limit fit in memory.
const MAX_CONCURRENT_CALLS: usize = 64;
/// Messages one `send_batch` call may carry.
const MAX_BATCH: usize = 1000;
/// The most of any one thing the daemon holds at once: calls, messages in
/// flight or waiting for a connection, connections, sessions. Far above what
/// one machine's file descriptors and memory carry, and far below what the
/// semaphores that count them take (tokio's panic past 2^61 permits).
const MAX_HELD: usize = 1_000_000;
/// IMAP connections of one relay's Sent copies: servers allow a user about
/// ten (Dovecot's `mail_max_userip_connections`); each is a task.
const MAX_SENT_COPY_CONNECTIONS: usize = 100;
/// Tries of one Sent copy: the waits double, and the 20th waits 2^18 times
/// `retry_base`.
const MAX_SENT_COPY_ATTEMPTS: u32 = 20;
const OUTBOX_DIR: &str = "outbox";
const QUEUE_PATH: &str = "mailmux-queue.db";
/// Connections to PostgreSQL, per daemon.
const PG_POOL: u32 = 16;
/// How long a claim on a message lasts without renewal.
const PG_LEASE: Duration = Duration::from_secs(30);
const EMBEDDED_RELAY: &str = "outbox";

/// A value's key, as the user wrote it, and the source it came from.
#[derive(Debug, Clone)]
pub(super) struct At {
    key: String,
    source: String,
}

impl At {
    pub(super) fn err(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            key: self.key.clone(),
            source_name: self.source.clone(),
            message: message.into(),
        }
    }
}

/// Adds one leaf of the effective configuration, with its source.
pub(super) fn leaf(out: &mut Map<String, Json>, name: &str, value: Json, at: &At) {
    out.insert(name.into(), json!({ "value": value, "source": at.source }));
}

pub(super) fn secs(d: Duration) -> Json {
    json!(humantime::format_duration(d).to_string())
}

fn path_json(p: &Path) -> Json {
    json!(p.display().to_string())
}

/// Where a relay was configured.
#[derive(Debug, Clone)]
enum Origin {
    /// `relays[i]` in a file (or the env).
    Listed(usize),
    /// Seed env vars with this group (`single` or the number); `tls_stem` is
    /// the variable that decided the TLS mode.
    Seed {
        group: String,
        tls_stem: &'static str,
    },
    /// The embedded file relay.
    Embedded,
}

pub(crate) struct Ctx<'a> {
    figment: &'a Figment,
    tree: &'a Value,
    /// Paths set by `MAILMUX_RELAYS__…` inside the file layer, and the variable.
    overrides: &'a [(String, String)],
}

impl Ctx<'_> {
    /// The source of the value at a dotted path, if a layer set it.
    pub(super) fn source(&self, path: &str) -> Option<String> {
        if let Some((_, var)) = self.overrides.iter().find(|(p, _)| p == path) {
            return Some(source_name(var));
        }
        let mut v = self.tree;
        for seg in path.split('.') {
            v = match v {
                Value::Dict(_, d) => d.get(seg)?,
                Value::Array(_, a) => a.get(seg.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        self.figment
            .get_metadata(v.tag())
            .map(|m| m.name.to_string())
    }

    pub(super) fn at(&self, path: &str) -> At {
        At {
            key: path.to_string(),
            source: self
                .source(path)
                .unwrap_or_else(|| DEFAULT_SOURCE.to_string()),
        }
    }

    /// A relay field's key and source at the relay's own origin.
    fn relay_at(&self, origin: &Origin, field: &str) -> At {
        match origin {
            Origin::Listed(i) => {
                let mut at = self.at(&format!("relays.{i}.{field}"));
                at.key = format!("relays[{i}].{field}");
                at
            }
            Origin::Seed { group, tls_stem } => {
                let stem = match field {
                    "tls" => Some(tls_stem.to_string()),
                    "host" | "port" | "username" | "password" | "password_file" | "timeout"
                    | "from_email" | "name" | "priority" => Some(field.to_string()),
                    "auth" => Some("auth_method".to_string()),
                    _ => field.strip_prefix("oauth.").map(|k| format!("oauth_{k}")),
                };
                match stem {
                    Some(stem) => At {
                        key: seed_var_name(&stem, group),
                        source: self
                            .source(&format!("{SEED_KEY}.{group}.{stem}"))
                            .unwrap_or_else(|| DEFAULT_SOURCE.to_string()),
                    },
                    None => At {
                        key: format!("{field} of the relay from {}", seed_var_name("host", group)),
                        source: DEFAULT_SOURCE.into(),
                    },
                }
            }
            Origin::Embedded => At {
                key: format!("{field} of the embedded relay"),
                source: DEFAULT_SOURCE.into(),
            },
        }
    }
}

/// Builds the effective configuration from the merged raw layers.
pub(crate) fn build(
    raw: RawConfig,
    figment: &Figment,
    tree: &Value,
    overrides: &[(String, String)],
    sources: Vec<String>,
    env: &[(String, String)],
) -> Result<Config, ConfigError> {
    let ctx = Ctx {
        figment,
        tree,
        overrides,
    };
    let mut out = Map::new();

    let at = ctx.at("strategy");
    let strategy = match &raw.strategy {
        Some(s) => Strategy::from_str(s).map_err(|m| at.err(m))?,
        None => Strategy::default(),
    };
    leaf(&mut out, "strategy", json!(strategy.as_str()), &at);

    let router_defaults = RouterSettings::default();
    let max_attempts = at_least_one(
        &ctx,
        &mut out,
        "max_attempts",
        raw.max_attempts,
        router_defaults.max_attempts,
    )?;

    let at = ctx.at("from_email");
    if let Some(addr) = &raw.from_email {
        check_address(addr, &at)?;
    }
    leaf(&mut out, "from_email", json!(raw.from_email), &at);

    let send_deadline = positive(
        &ctx,
        &mut out,
        "send_deadline",
        raw.send_deadline.map(|d| d.0),
        SEND_DEADLINE,
    )?;
    let at = ctx.at("shutdown_grace");
    let shutdown_grace = raw.shutdown_grace.map_or(SHUTDOWN_GRACE, |d| d.0);
    leaf(&mut out, "shutdown_grace", secs(shutdown_grace), &at);

    let limits = Limits::default();
    let compose_defaults = ComposePolicy::default();
    let max_in_flight = held(
        &ctx,
        &mut out,
        "max_in_flight",
        raw.max_in_flight,
        limits.max_in_flight,
    )?;
    let max_concurrent_calls = held(
        &ctx,
        &mut out,
        "max_concurrent_calls",
        raw.max_concurrent_calls,
        MAX_CONCURRENT_CALLS,
    )?;
    let max_batch = at_least_one(&ctx, &mut out, "max_batch", raw.max_batch, MAX_BATCH)?;
    let max_message_bytes = at_least_one(
        &ctx,
        &mut out,
        "max_message_bytes",
        raw.max_message_bytes,
        limits.max_message_bytes,
    )?;
    let max_recipients = at_least_one(
        &ctx,
        &mut out,
        "max_recipients",
        raw.max_recipients,
        compose_defaults.max_recipients,
    )?;
    let max_attachment_bytes = at_least_one(
        &ctx,
        &mut out,
        "max_attachment_bytes",
        raw.max_attachment_bytes,
        compose_defaults.max_attachment_bytes,
    )?;

    let at = ctx.at("attachments_dir");
    leaf(
        &mut out,
        "attachments_dir",
        json!(
            raw.attachments_dir
                .as_deref()
                .map(|p| p.display().to_string())
        ),
        &at,
    );

    let at = ctx.at("message_id_domain");
    let message_id_domain = raw
        .message_id_domain
        .clone()
        .unwrap_or(compose_defaults.message_id_domain);
    if message_id_domain.is_empty()
        || message_id_domain
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "@<>".contains(c))
    {
        return Err(at.err(format!(
            "{message_id_domain:?} is not a domain (no spaces, `@`, `<` or `>`)"
        )));
    }
    leaf(&mut out, "message_id_domain", json!(message_id_domain), &at);
    let dkim = dkim(&ctx, &raw, &mut out)?;
    let one_click = unsubscribe(&ctx, &raw, &mut out)?;
    let templates = templates(
        &ctx,
        &raw,
        (max_message_bytes, max_attachment_bytes),
        &mut out,
    )?;
    let notify = notify(&ctx, &raw, &mut out)?;

    let at = ctx.at("outbox_dir");
    let outbox_dir = raw
        .outbox_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(OUTBOX_DIR));
    leaf(&mut out, "outbox_dir", path_json(&outbox_dir), &at);

    let at = ctx.at("log_level");
    if raw
        .log_level
        .as_deref()
        .is_some_and(|l| l.trim().is_empty())
    {
        return Err(at.err("must not be empty"));
    }
    leaf(&mut out, "log_level", json!(raw.log_level), &at);

    let supervisor = supervisor(&ctx, &raw, &mut out)?;
    let http = http(&ctx, &raw, &mut out)?;
    let metrics = metrics(&ctx, &raw, &mut out)?;
    let queue = queue(&ctx, &raw, send_deadline, env, &mut out)?;

    // Relays: the listed ones, then the seed's, which replace a listed relay
    // of the same name.
    let seeds: Vec<(String, RawRelay, Origin)> = raw
        .smtp_env
        .iter()
        .map(|(group, seed)| {
            let (relay, origin) = from_seed(group, seed);
            (group.clone(), relay, origin)
        })
        .collect();
    let mut ordered: Vec<&(String, RawRelay, Origin)> = seeds.iter().collect();
    ordered.sort_by_key(|(group, ..)| (group != SINGLE, group.parse::<u64>().unwrap_or(0)));
    let seed_names: Vec<String> = ordered.iter().map(|(_, r, _)| listed_name(r)).collect();

    // A listed relay that a seed relay replaces keeps its place in the order.
    let mut slots: Vec<Result<Built, String>> = Vec::new();
    for (i, r) in raw.relays.iter().enumerate() {
        let name = listed_name(r);
        if seed_names.contains(&name) {
            slots.push(Err(name));
            continue;
        }
        slots.push(Ok(relay(
            &ctx,
            r,
            &Origin::Listed(i),
            &raw.relay_defaults,
            &outbox_dir,
            strategy,
        )?));
    }
    for (group, r, origin) in ordered {
        if r.host.is_none() {
            // Some other variable of this group is set: name it.
            let stem = ctx
                .tree
                .find_ref(&format!("{SEED_KEY}.{group}"))
                .and_then(|v| v.as_dict())
                .and_then(|d| d.keys().next().cloned())
                .unwrap_or_default();
            let host = seed_var_name("host", group);
            return Err(ConfigError {
                key: host.clone(),
                source_name: ctx
                    .source(&format!("{SEED_KEY}.{group}.{stem}"))
                    .unwrap_or_else(|| DEFAULT_SOURCE.into()),
                message: format!("{} is set but {host} is not", seed_var_name(&stem, group)),
            });
        }
        let built = relay(&ctx, r, origin, &raw.relay_defaults, &outbox_dir, strategy)?;
        let pending = slots
            .iter()
            .position(|s| matches!(s, Err(n) if *n == built.0.name));
        match pending {
            Some(k) => slots[k] = Ok(built),
            None => slots.push(Ok(built)),
        }
    }
    let mut relays: Vec<Built> = slots.into_iter().flatten().collect();
    check_tuning_only(&ctx, &raw.relay_defaults)?;

    let default_relay = relays.is_empty();
    if default_relay {
        let r = RawRelay {
            name: Some(EMBEDDED_RELAY.into()),
            kind: Some("file".into()),
            ..RawRelay::default()
        };
        relays.push(relay(
            &ctx,
            &r,
            &Origin::Embedded,
            &raw.relay_defaults,
            &outbox_dir,
            strategy,
        )?);
    }
    for (k, (r, _, at, ..)) in relays.iter().enumerate() {
        if let Some((first, _, first_at, ..)) = relays[..k].iter().find(|(f, ..)| f.name == r.name)
        {
            return Err(at.err(format!(
                "relay name {:?} is used twice (first at `{}`); names must be unique",
                first.name, first_at.key
            )));
        }
    }

    // A sender for messages that name none: the global one, else the
    // highest-priority relay's (the first of equals).
    let default_from = raw.from_email.clone().or_else(|| {
        let mut best: Option<&RelaySettings> = None;
        for (r, ..) in &relays {
            if r.from_email.is_some() && best.is_none_or(|b| r.priority > b.priority) {
                best = Some(r);
            }
        }
        best.and_then(|r| r.from_email.clone())
    });

    let relay_names: Vec<String> = relays.iter().map(|(r, ..)| r.name.clone()).collect();
    let relay_senders: Vec<crate::config::RelaySenders> = relays
        .iter()
        .filter_map(|(.., senders, _)| senders.clone())
        .collect();
    if let Some(from) = &raw.from_email
        && let Ok(address) = lettre::Address::from_str(from)
        && !relay_names
            .iter()
            .any(|r| crate::config::RelaySenders::carry(&relay_senders, r, &address))
    {
        return Err(ctx.at("from_email").err(format!(
            "{from:?} is a sender no relay carries (each relay's `senders`), so mail \
             that names no sender could not be sent"
        )));
    }
    let safety = super::safety::build(
        &ctx,
        &raw,
        env,
        http.token.as_ref().map(Secret::expose),
        &relay_names,
        &relay_senders,
        &mut out,
    )?;

    let sent_copies: Vec<(String, crate::sent_copy::SentCopySettings)> = relays
        .iter()
        .filter_map(|(r, _, _, copy, ..)| Some((r.name.clone(), copy.clone()?)))
        .collect();
    let bounce_readers: Vec<(String, crate::bounces::BounceSettings)> = relays
        .iter()
        .filter_map(|(r, .., bounces)| Some((r.name.clone(), bounces.clone()?)))
        .collect();
    let (relays, relay_json): (Vec<RelaySettings>, Vec<Json>) =
        relays.into_iter().map(|(r, j, ..)| (r, j)).unzip();
    out.insert("relays".into(), Json::Array(relay_json));
    out.insert("default_relay".into(), json!(default_relay));

    Ok(Config {
        queue,
        dispatch: Settings {
            relays,
            router: RouterSettings {
                strategy,
                max_attempts,
            },
            supervisor,
            limits: Limits {
                max_in_flight,
                max_message_bytes,
            },
        },
        daemon: DaemonSettings {
            send_deadline,
            shutdown_grace,
            compose: ComposePolicy {
                default_from,
                // Senders are the callers' policy (crate::policy).
                allowed_senders: Vec::new(),
                max_recipients,
                max_message_bytes,
                max_attachment_bytes,
                attachments_dir: raw.attachments_dir,
                message_id_domain,
                dkim,
                one_click,
                templates,
            },
            max_concurrent_calls,
            max_batch,
            http,
            metrics,
            log_level: raw.log_level,
        },
        safety,
        notify,
        sent_copies,
        bounce_readers,
        relay_senders,
        default_relay,
        sources,
        redacted: Json::Object(out),
        stray_env: Vec::new(),
    })
}

/// A count that must be at least one.
fn at_least_one<T: Copy + PartialOrd + From<u8> + serde::Serialize + std::fmt::Display>(
    ctx: &Ctx,
    out: &mut Map<String, Json>,
    path: &str,
    raw: Option<T>,
    default: T,
) -> Result<T, ConfigError> {
    let at = ctx.at(path);
    let v = raw.unwrap_or(default);
    if v < T::from(1) {
        return Err(at.err(format!("must be at least 1, got {v}")));
    }
    leaf(out, path.rsplit('.').next().unwrap_or(path), json!(v), &at);
    Ok(v)
}

/// A count of something held at once: from 1 to [`MAX_HELD`].
fn held(
    ctx: &Ctx,
    out: &mut Map<String, Json>,
    path: &str,
    raw: Option<usize>,
    default: usize,
) -> Result<usize, ConfigError> {
    let v = at_least_one(ctx, out, path, raw, default)?;
    at_most(&ctx.at(path), v, MAX_HELD)
}

fn at_most<T: PartialOrd + std::fmt::Display>(at: &At, v: T, max: T) -> Result<T, ConfigError> {
    if v > max {
        return Err(at.err(format!("must be at most {max}, got {v}")));
    }
    Ok(v)
}

/// A duration that must not be zero.
fn positive(
    ctx: &Ctx,
    out: &mut Map<String, Json>,
    path: &str,
    raw: Option<Duration>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let at = ctx.at(path);
    let v = raw.unwrap_or(default);
    if v.is_zero() {
        return Err(at.err("must be greater than zero"));
    }
    leaf(out, path.rsplit('.').next().unwrap_or(path), secs(v), &at);
    Ok(v)
}

fn supervisor(
    ctx: &Ctx,
    raw: &RawConfig,
    top: &mut Map<String, Json>,
) -> Result<SupervisorSettings, ConfigError> {
    let d = SupervisorSettings::default();
    let s = &raw.supervisor;
    let mut out = Map::new();
    let at = ctx.at("supervisor.max_restarts");
    let max_restarts = s.max_restarts.unwrap_or(d.max_restarts);
    leaf(&mut out, "max_restarts", json!(max_restarts), &at);
    let restart_window = positive(
        ctx,
        &mut out,
        "supervisor.restart_window",
        s.restart_window.map(|d| d.0),
        d.restart_window,
    )?;
    let at = ctx.at("supervisor.restart_pause");
    let restart_pause = s.restart_pause.map_or(d.restart_pause, |d| d.0);
    leaf(&mut out, "restart_pause", secs(restart_pause), &at);
    top.insert("supervisor".into(), Json::Object(out));
    Ok(SupervisorSettings {
        max_restarts,
        restart_window,
        restart_pause,
    })
}

fn http(
    ctx: &Ctx,
    raw: &RawConfig,
    top: &mut Map<String, Json>,
) -> Result<HttpSettings, ConfigError> {
    let h = &raw.http;
    let mut out = Map::new();

    let at = ctx.at("http.bind");
    let bind_text = h.bind.as_deref().unwrap_or(HTTP_BIND);
    let bind: SocketAddr = bind_text.trim().parse().map_err(|e| {
        at.err(format!(
            "{bind_text:?} is not an address and port such as 127.0.0.1:8025: {e}"
        ))
    })?;
    leaf(&mut out, "bind", json!(bind.to_string()), &at);

    let token = token_pair(ctx, &mut out, "http", &h.token, &h.token_file)?;

    let list = |field: &str, v: &Option<StringList>, out: &mut Map<String, Json>| {
        let at = ctx.at(&format!("http.{field}"));
        let v = v.clone().unwrap_or_default().0;
        leaf(out, field, json!(v), &at);
        v
    };
    let allowed_hosts = list("allowed_hosts", &h.allowed_hosts, &mut out);
    let allowed_origins = list("allowed_origins", &h.allowed_origins, &mut out);
    let body_limit = at_least_one(
        ctx,
        &mut out,
        "http.body_limit",
        h.body_limit,
        HTTP_BODY_LIMIT,
    )?;
    let read_timeout = positive(
        ctx,
        &mut out,
        "http.read_timeout",
        h.read_timeout.as_ref().map(|d| d.0),
        HTTP_READ_TIMEOUT,
    )?;
    let max_connections = held(
        ctx,
        &mut out,
        "http.max_connections",
        h.max_connections,
        HTTP_MAX_CONNECTIONS,
    )?;
    let at = ctx.at("http.stateful");
    let stateful = h.stateful.unwrap_or(true);
    leaf(&mut out, "stateful", json!(stateful), &at);
    let max_sessions = held(
        ctx,
        &mut out,
        "http.max_sessions",
        h.max_sessions,
        HTTP_MAX_SESSIONS,
    )?;
    let max_sessions_per_caller = at_least_one(
        ctx,
        &mut out,
        "http.max_sessions_per_caller",
        h.max_sessions_per_caller,
        HTTP_MAX_SESSIONS_PER_CALLER,
    )?;
    if max_sessions_per_caller > max_sessions {
        return Err(ctx.at("http.max_sessions_per_caller").err(format!(
            "{max_sessions_per_caller} is more than http.max_sessions ({max_sessions})"
        )));
    }

    let tls = tls_identity(ctx, &mut out, h)?;

    let at = ctx.at("http.auth_failures");
    let text = h.auth_failures.as_deref().unwrap_or(HTTP_AUTH_FAILURES);
    let auth_failures = match text.trim() {
        "off" => None,
        text => {
            let rule = crate::policy::rate::RateRule::parse(text).map_err(|m| {
                at.err(format!(
                    "{m}; or \"off\" for no limit on failed authentications"
                ))
            })?;
            if rule.unit != crate::policy::rate::Unit::Messages {
                return Err(at.err(format!(
                    "{text:?}: this rate counts failed authentications; write e.g. \"10/min\""
                )));
            }
            Some(rule)
        }
    };
    leaf(&mut out, "auth_failures", json!(text.trim()), &at);

    top.insert("http".into(), Json::Object(out));
    Ok(HttpSettings {
        bind,
        token,
        allowed_hosts,
        allowed_origins,
        body_limit,
        read_timeout,
        max_connections,
        stateful,
        max_sessions,
        max_sessions_per_caller,
        tls,
        auth_failures,
    })
}

/// `[unsubscribe]`: the one-click links' URL and secret, both or neither.
fn unsubscribe(
    ctx: &Ctx,
    raw: &RawConfig,
    top: &mut Map<String, Json>,
) -> Result<Option<crate::suppress::OneClick>, ConfigError> {
    use crate::suppress::{MIN_SECRET, OneClick, UNSUBSCRIBE_PATH};
    let u = &raw.unsubscribe;
    let url_at = ctx.at("unsubscribe.url");
    let secret_at = ctx.at("unsubscribe.secret");
    let file_at = ctx.at("unsubscribe.secret_file");
    let secret = match (&u.secret, &u.secret_file) {
        (Some(_), Some(_)) => {
            return Err(file_at.err(format!(
                "unsubscribe.secret (from {}) and unsubscribe.secret_file are both set; use one",
                secret_at.source
            )));
        }
        (Some(s), None) => Some((Secret::new(s.trim()), &secret_at)),
        (None, Some(path)) => Some((read_secret(path, &file_at, "secret")?, &file_at)),
        (None, None) => None,
    };
    if secret.is_none() && (u.previous_secret.is_some() || u.previous_secret_file.is_some()) {
        return Err(ctx
            .at("unsubscribe.previous_secret")
            .err("is for a rotation: set unsubscribe.secret (the new key) too"));
    }
    let (url, (secret, at)) = match (u.url.as_deref().map(str::trim), secret) {
        (None, None) => return Ok(None),
        (Some(url), Some(secret)) => (url, secret),
        (None, Some(_)) => return Err(url_at.err("must be set with unsubscribe.secret")),
        (Some(_), None) => {
            return Err(secret_at.err("must be set (or secret_file) with unsubscribe.url"));
        }
    };
    if secret.expose().len() < MIN_SECRET {
        return Err(at.err(format!(
            "must be at least {MIN_SECRET} bytes (`openssl rand -hex 32` gives 64)"
        )));
    }
    let url = url.trim_end_matches('/').to_owned();
    let host = url.strip_prefix("https://").unwrap_or("");
    if host.is_empty() || host.starts_with('/') || url.contains(['?', '#']) {
        return Err(url_at.err(format!(
            "{url:?} is not an https: URL such as https://mail.example.org \
             (mailbox providers POST only to https: links)"
        )));
    }
    let previous_at = ctx.at("unsubscribe.previous_secret");
    let previous_file_at = ctx.at("unsubscribe.previous_secret_file");
    let previous = match (&u.previous_secret, &u.previous_secret_file) {
        (Some(_), Some(_)) => {
            return Err(previous_file_at.err(
                "unsubscribe.previous_secret and unsubscribe.previous_secret_file are both set; use one",
            ));
        }
        (Some(s), None) => Some((Secret::new(s.trim()), &previous_at)),
        (None, Some(path)) => Some((
            read_secret(path, &previous_file_at, "previous_secret")?,
            &previous_file_at,
        )),
        (None, None) => None,
    };
    if let Some((p, at)) = &previous
        && p.expose().len() < MIN_SECRET
    {
        return Err(at.err(format!("must be at least {MIN_SECRET} bytes")));
    }
    let one_click = OneClick {
        url,
        secret: secret.clone(),
        previous: previous.as_ref().map(|(p, _)| p.clone()),
    };
    // The longest link (an address of 254 bytes) must be one a message
    // may carry.
    let longest = one_click.link(&format!("{}@example.org", "x".repeat(64)));
    if let Some(link) = &longest
        && let Err(e) = crate::compose::check_unsubscribe_link("unsubscribe.url", link)
    {
        return Err(url_at.err(format!("does not make a valid link: {}", e.message)));
    }
    let mut out = Map::new();
    leaf(&mut out, "url", json!(one_click.url), &url_at);
    leaf(&mut out, "path", json!(UNSUBSCRIBE_PATH), &url_at);
    leaf(&mut out, "secret", json!(REDACTED), at);
    if let Some((_, at)) = &previous {
        leaf(&mut out, "previous_secret", json!(REDACTED), at);
    }
    top.insert("unsubscribe".into(), Json::Object(out));
    Ok(Some(one_click))
}

/// `[[dkim]]`: each key read and checked now, so that a bad one is a
/// start-up (or reload) error naming its key. Shown without the key.
fn dkim(
    ctx: &Ctx,
    raw: &RawConfig,
    out: &mut Map<String, Json>,
) -> Result<crate::compose::dkim::Signers, ConfigError> {
    use crate::compose::dkim::{DEFAULT_HEADERS, Signer, Signers};
    let mut signers = Vec::new();
    let mut shown = Vec::new();
    for (i, d) in raw.dkim.iter().enumerate() {
        let at = |key: &str| {
            let mut at = ctx.at(&format!("dkim.{i}.{key}"));
            at.key = format!("dkim[{i}].{key}");
            at
        };
        let required = |value: &Option<String>, key: &str| match value.as_deref() {
            Some(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
            _ => Err(at(key).err("is required")),
        };
        // An internationalised domain signs as its A-labels, the form `d=`
        // and the DNS take.
        let written = required(&d.domain, "domain")?;
        let Some(domain) = crate::policy::rules::ascii_domain(&written)
            .filter(|d| is_dns_name(d) && d.contains('.'))
        else {
            return Err(at("domain").err(format!(
                "{written:?} is not a domain name (letters, digits and `-`, in labels \
                 separated by dots)"
            )));
        };
        let selector = required(&d.selector, "selector")?;
        if !is_dns_name(&selector) {
            return Err(at("selector").err(format!(
                "{selector:?} is not a selector (letters, digits and `-`, in labels \
                 separated by dots)"
            )));
        }
        let headers: Vec<String> = match &d.headers {
            Some(list) => list.0.iter().map(|h| h.trim().to_string()).collect(),
            None => DEFAULT_HEADERS.iter().map(|h| h.to_string()).collect(),
        };
        if let Some(bad) = headers
            .iter()
            .find(|h| h.is_empty() || !h.bytes().all(|b| b.is_ascii_graphic() && b != b':'))
        {
            return Err(at("headers").err(format!("{bad:?} is not a header field name")));
        }
        if !headers.iter().any(|h| h.eq_ignore_ascii_case("From")) {
            return Err(at("headers").err("must include From, which DKIM always signs"));
        }
        let Some(path) = &d.private_key else {
            return Err(at("private_key").err("is required: the PEM file of the key"));
        };
        let key_at = at("private_key");
        let signer = Signer::read(&domain, &selector, path, headers.clone())
            .map_err(|why| key_at.err(why))?;
        warn_if_exposed(path, &key_at, "DKIM key");
        if signers.iter().any(|s: &std::sync::Arc<Signer>| {
            s.domain == signer.domain && s.selector.eq_ignore_ascii_case(&signer.selector)
        }) {
            return Err(at("selector").err(format!(
                "selector {selector:?} of {domain:?} is configured twice"
            )));
        }
        shown.push(json!({
            "domain": { "value": signer.domain, "source": at("domain").source },
            "selector": { "value": selector, "source": at("selector").source },
            "algorithm": signer.algorithm,
            "private_key": { "value": path.display().to_string(), "source": key_at.source },
            "headers": { "value": headers, "source": at("headers").source },
        }));
        signers.push(std::sync::Arc::new(signer));
    }
    out.insert("dkim".into(), Json::Array(shown));
    Ok(Signers(signers))
}

/// `[[templates]]`: each entry's texts read (from a file where it names
/// one) and parsed now, so that a bad one is a start-up (or reload) error
/// naming its key.
fn templates(
    ctx: &Ctx,
    raw: &RawConfig,
    (max_message_bytes, max_attachment_bytes): (usize, usize),
    out: &mut Map<String, Json>,
) -> Result<crate::compose::named::Templates, ConfigError> {
    use crate::compose::named::{MAX_TEMPLATES, Template, Templates};
    if raw.templates.len() > MAX_TEMPLATES {
        return Err(ctx.at("templates").err(format!(
            "has {} entries; at most {MAX_TEMPLATES}",
            raw.templates.len()
        )));
    }
    let mut all: Vec<std::sync::Arc<Template>> = Vec::new();
    let mut shown = Vec::new();
    for (i, t) in raw.templates.iter().enumerate() {
        let at = |key: &str| {
            let mut at = ctx.at(&format!("templates.{i}.{key}"));
            at.key = format!("templates[{i}].{key}");
            at
        };
        let name = t.name.clone().unwrap_or_default();
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return Err(
                at("name").err("is required: 1 to 64 ASCII letters, digits, `_`, `.` or `-`")
            );
        }
        if let Some(first) = all.iter().position(|x| x.name == name) {
            return Err(at("name").err(format!(
                "template {name:?} is configured twice (first at templates[{first}])"
            )));
        }
        let description = t.description.clone();
        if description
            .as_deref()
            .is_some_and(|d| d.len() > 500 || d.chars().any(char::is_control))
        {
            return Err(at("description").err("must be one line of at most 500 bytes"));
        }
        // Inline or from a file, not both; a file is read now (and again at
        // each reload).
        let text = |inline: &Option<String>,
                    file: &Option<PathBuf>,
                    key: &str|
         -> Result<Option<(String, At)>, ConfigError> {
            match (inline, file) {
                (Some(_), Some(_)) => Err(at(key).err(format!(
                    "is set with {key}_file; give the text or the file, not both"
                ))),
                (Some(text), None) => Ok(Some((text.clone(), at(key)))),
                (None, Some(path)) => {
                    let a = at(&format!("{key}_file"));
                    let bytes = std::fs::read(path)
                        .map_err(|e| a.err(format!("cannot read {}: {e}", path.display())))?;
                    if bytes.len() > max_message_bytes {
                        return Err(a.err(format!(
                            "{} is {} bytes, more than max_message_bytes ({max_message_bytes})",
                            path.display(),
                            bytes.len()
                        )));
                    }
                    let text = String::from_utf8(bytes)
                        .map_err(|_| a.err(format!("{} is not UTF-8 text", path.display())))?;
                    Ok(Some((text, a)))
                }
                (None, None) => Ok(None),
            }
        };
        let subject = t
            .subject
            .clone()
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| at("subject").err("is required"))?;
        if subject.chars().any(char::is_control) {
            return Err(at("subject").err("must be one line without control characters"));
        }
        let Some((body, body_at)) = text(&t.body, &t.body_file, "body")? else {
            return Err(at("body").err("is required (or body_file)"));
        };
        let html = text(&t.html_body, &t.html_body_file, "html_body")?;
        let mut vars = std::collections::BTreeSet::new();
        let parts = [
            Some((&subject, at("subject"))),
            Some((&body, body_at)),
            html.as_ref().map(|(h, a)| (h, a.clone())),
        ];
        for (text, a) in parts.into_iter().flatten() {
            let names = crate::compose::template::names(text).map_err(|why| a.err(why))?;
            vars.extend(names);
        }
        let vars: Vec<String> = vars.into_iter().collect();
        let mut patterns = Vec::new();
        if let Some(given) = &t.vars {
            for (var, pattern) in given {
                let a = at(&format!("vars.{var}"));
                if !vars.contains(var) {
                    return Err(a.err(format!(
                        "{{{var}}} is not used by this template's texts; they use: {}",
                        vars.join(", ")
                    )));
                }
                patterns.push(
                    crate::compose::named::VarPattern::new(var, pattern)
                        .map_err(|why| a.err(why))?,
                );
            }
            // `{unsubscribe_url}` is the daemon's own link (`unsubscribe:
            // true`), not the agent's text.
            let missing: Vec<&str> = vars
                .iter()
                .filter(|v| !given.contains_key(*v) && *v != crate::compose::ONE_CLICK_VAR)
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                return Err(at("vars").err(format!(
                    "has no pattern for {}, which the texts use: give every variable one",
                    missing.join(", ")
                )));
            }
        }
        // Read now (and at each reload), each named by the HTML.
        let mut images = Vec::new();
        if let Some(given) = &t.images {
            let Some((h, _)) = &html else {
                return Err(at("images")
                    .err("needs html_body (or html_body_file): the HTML shows the images"));
            };
            let mut total = 0usize;
            for (id, path) in given {
                let a = at(&format!("images.{id}"));
                let image = crate::compose::attach::image(id, path, max_attachment_bytes)
                    .map_err(|why| a.err(why))?;
                if !crate::compose::attach::names_cid(h, id) {
                    return Err(a.err(format!(
                        "the html_body never names cid:{id}: write <img src=\"cid:{id}\">"
                    )));
                }
                total = total.saturating_add(image.data.len());
                if total > max_message_bytes {
                    return Err(a.err(format!(
                        "the images come to more than max_message_bytes ({max_message_bytes})"
                    )));
                }
                images.push(image);
            }
        }
        shown.push(json!({
            "name": { "value": name, "source": at("name").source },
            "description": description,
            "subject": subject,
            "body": match &t.body_file {
                Some(p) => json!({ "file": p.display().to_string() }),
                None => json!(body),
            },
            "html_body": match (&t.html_body_file, &html) {
                (Some(p), _) => json!({ "file": p.display().to_string() }),
                (None, Some((h, _))) => json!(h),
                (None, None) => Json::Null,
            },
            "vars": vars,
            "var_patterns": t.vars,
            "images": t.images.as_ref().map(|m| {
                m.iter()
                    .map(|(id, p)| (id.clone(), json!(p.display().to_string())))
                    .collect::<Map<String, Json>>()
            }),
        }));
        all.push(std::sync::Arc::new(Template {
            name,
            description,
            subject,
            body,
            html_body: html.map(|(h, _)| h),
            vars,
            patterns,
            images,
        }));
    }
    out.insert("templates".into(), Json::Array(shown));
    Ok(Templates(all))
}

/// Whether `name` is a DNS name of letters, digits and `-` (no label
/// starting or ending with `-`), in labels of 1 to 63 separated by dots,
/// 253 characters at most.
fn is_dns_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// `http.tls_cert` and `http.tls_key`: both or neither, read and checked
/// now, so that a bad pair is a start-up (or reload) error naming its key.
fn tls_identity(
    ctx: &Ctx,
    out: &mut Map<String, Json>,
    h: &super::raw::RawHttp,
) -> Result<Option<crate::mcp::tls::Identity>, ConfigError> {
    use crate::mcp::tls::{File, Identity};
    let (cert, key) = match (&h.tls_cert, &h.tls_key) {
        (None, None) => return Ok(None),
        (Some(_), None) => {
            return Err(ctx
                .at("http.tls_key")
                .err("tls_cert is set: set tls_key too"));
        }
        (None, Some(_)) => {
            return Err(ctx
                .at("http.tls_cert")
                .err("tls_key is set: set tls_cert too"));
        }
        (Some(c), Some(k)) => (c, k),
    };
    let (cert_at, key_at) = (ctx.at("http.tls_cert"), ctx.at("http.tls_key"));
    let identity = Identity::load(cert, key).map_err(|(file, why)| match file {
        File::Cert => cert_at.err(why),
        File::Key => key_at.err(why),
    })?;
    warn_if_exposed(key, &key_at, "TLS key");
    leaf(out, "tls_cert", json!(cert.display().to_string()), &cert_at);
    leaf(out, "tls_key", json!(key.display().to_string()), &key_at);
    Ok(Some(identity))
}

/// A secret given as `{table}.token` or `{table}.token_file` (not both),
/// shown redacted.
fn token_pair(
    ctx: &Ctx,
    out: &mut Map<String, Json>,
    table: &str,
    token: &Option<String>,
    token_file: &Option<PathBuf>,
) -> Result<Option<Secret>, ConfigError> {
    let token_at = ctx.at(&format!("{table}.token"));
    let file_at = ctx.at(&format!("{table}.token_file"));
    let secret = match (token, token_file) {
        (Some(_), Some(_)) => {
            return Err(file_at.err(format!(
                "{table}.token (from {}) and {table}.token_file are both set; use one",
                token_at.source
            )));
        }
        (Some(t), None) => {
            if t.trim().is_empty() {
                return Err(token_at.err("must not be empty"));
            }
            Some(Secret::new(t.clone()))
        }
        (None, Some(path)) => Some(read_secret(path, &file_at, "token")?),
        (None, None) => None,
    };
    let at = if token_file.is_some() {
        &file_at
    } else {
        &token_at
    };
    if let Some(s) = &secret {
        warn_if_short(s.expose(), at);
    }
    let shown = secret.as_ref().map(|_| REDACTED);
    leaf(out, "token", json!(shown), at);
    leaf(
        out,
        "token_file",
        json!(token_file.as_deref().map(|p| p.display().to_string())),
        &file_at,
    );
    Ok(secret)
}

/// `[notify]`: on only with a `url`.
fn notify(
    ctx: &Ctx,
    raw: &RawConfig,
    top: &mut Map<String, Json>,
) -> Result<Option<crate::notify::NotifySettings>, ConfigError> {
    let n = &raw.notify;
    let mut out = Map::new();
    let token = token_pair(ctx, &mut out, "notify", &n.token, &n.token_file)?;
    let at = ctx.at("notify.url");
    let url = match n.url.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => {
            let url = reqwest::Url::parse(text)
                .map_err(|e| at.err(format!("{text:?} is not a URL: {e}")))?;
            if !crate::oauth::may_carry_secrets(&url) {
                return Err(at.err(
                    "must be an https: URL (http: only to a loopback address): events \
                     and the token would otherwise cross the network in clear",
                ));
            }
            Some(url)
        }
    };
    // Shown without its path and query, which may hold a key (Slack's do).
    leaf(
        &mut out,
        "url",
        json!(
            url.as_ref()
                .map(|u| format!("{}://{}/{REDACTED}", u.scheme(), u.authority()))
        ),
        &at,
    );
    let at = ctx.at("notify.events");
    let events: Vec<String> = match &n.events {
        Some(list) => list.0.iter().map(|e| e.trim().to_owned()).collect(),
        None => vec!["held".to_owned()],
    };
    if let Some(bad) = events
        .iter()
        .find(|e| !crate::notify::EVENTS.contains(&e.as_str()))
    {
        return Err(at.err(format!(
            "{bad:?} is not an event; events: {}",
            crate::notify::EVENTS.join(", ")
        )));
    }
    leaf(&mut out, "events", json!(events), &at);
    let at = ctx.at("notify.console_url");
    let console_url = n
        .console_url
        .as_deref()
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| match reqwest::Url::parse(c) {
            Ok(u) if matches!(u.scheme(), "https" | "http") => {
                Ok(c.trim_end_matches('/').to_owned())
            }
            _ => Err(at.err(format!("{c:?} is not an http: or https: URL"))),
        })
        .transpose()?;
    leaf(&mut out, "console_url", json!(console_url), &at);
    top.insert("notify".into(), Json::Object(out));
    if url.is_none() && (token.is_some() || n.events.is_some() || console_url.is_some()) {
        return Err(ctx
            .at("notify.url")
            .err("is required: [notify] has other keys but no url to post to"));
    }
    Ok(url.map(|url| crate::notify::NotifySettings {
        url,
        token,
        events,
        console_url,
    }))
}

/// `[metrics]`: who may read `/metrics`, and the listener of its own.
fn metrics(
    ctx: &Ctx,
    raw: &RawConfig,
    top: &mut Map<String, Json>,
) -> Result<MetricsSettings, ConfigError> {
    let m = &raw.metrics;
    let mut out = Map::new();
    let token = token_pair(ctx, &mut out, "metrics", &m.token, &m.token_file)?;
    let at = ctx.at("metrics.bind");
    let bind = match m.bind.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => Some(text.parse::<SocketAddr>().map_err(|e| {
            at.err(format!(
                "{text:?} is not an address and port such as 127.0.0.1:9090: {e}"
            ))
        })?),
    };
    leaf(&mut out, "bind", json!(bind.map(|b| b.to_string())), &at);
    top.insert("metrics".into(), Json::Object(out));
    Ok(MetricsSettings { token, bind })
}

fn queue(
    ctx: &Ctx,
    raw: &RawConfig,
    send_deadline: Duration,
    env: &[(String, String)],
    top: &mut Map<String, Json>,
) -> Result<QueueSettings, ConfigError> {
    let d = QueueSettings::default();
    let q = &raw.queue;
    let mut out = Map::new();
    let at = ctx.at("queue.store");
    let path_at = ctx.at("queue.path");
    let path = q.path.clone().unwrap_or_else(|| PathBuf::from(QUEUE_PATH));
    let store = match q.store.as_deref().map(str::trim) {
        None | Some("sqlite") => {
            if path.as_os_str().is_empty() {
                return Err(path_at.err("must not be empty"));
            }
            StoreKind::Sqlite { path: path.clone() }
        }
        Some("memory") => StoreKind::Memory,
        Some("postgres") => StoreKind::Postgres(postgres(ctx, q, env, &mut out)?),
        Some(other) => {
            return Err(at.err(format!(
                "{other:?} is not a store; expected sqlite, memory or postgres"
            )));
        }
    };
    leaf(&mut out, "store", json!(store.as_str()), &at);
    if matches!(store, StoreKind::Sqlite { .. }) {
        leaf(&mut out, "path", path_json(&path), &path_at);
    }
    let mut dur = |key: &str, raw: &Option<Dur>, default: Duration| {
        positive(
            ctx,
            &mut out,
            &format!("queue.{key}"),
            raw.as_ref().map(|d| d.0),
            default,
        )
    };
    let max_age = dur("max_age", &q.max_age, d.max_age)?;
    let retry_base = dur("retry_base", &q.retry_base, d.retry_base)?;
    let retry_max = dur("retry_max", &q.retry_max, d.retry_max)?;
    let idempotency_ttl = dur("idempotency_ttl", &q.idempotency_ttl, d.idempotency_ttl)?;
    let retain = dur("retain", &q.retain, d.retain)?;
    let max_schedule = dur("max_schedule", &q.max_schedule, d.max_schedule)?;
    if retry_max < retry_base {
        return Err(ctx.at("queue.retry_max").err(format!(
            "must be at least retry_base ({})",
            humantime::format_duration(retry_base)
        )));
    }
    let min_free = q.min_free.unwrap_or(d.min_free);
    if matches!(store, StoreKind::Sqlite { .. }) {
        leaf(
            &mut out,
            "min_free",
            json!(min_free),
            &ctx.at("queue.min_free"),
        );
    }
    let suppress_bounces = q.suppress_bounces.unwrap_or(d.suppress_bounces);
    leaf(
        &mut out,
        "suppress_bounces",
        json!(suppress_bounces),
        &ctx.at("queue.suppress_bounces"),
    );
    top.insert("queue".into(), Json::Object(out));
    Ok(QueueSettings {
        store,
        min_free,
        suppress_bounces,
        max_age,
        retry_base,
        retry_max,
        idempotency_ttl,
        retain,
        max_schedule,
        delivery_timeout: send_deadline,
    })
}

/// `[queue]` for `store = "postgres"`: the URL (from `queue.url`, else
/// `DATABASE_URL`), the pool, the node id and the lease.
fn postgres(
    ctx: &Ctx,
    q: &crate::config::raw::RawQueue,
    env: &[(String, String)],
    out: &mut Map<String, Json>,
) -> Result<PgSettings, ConfigError> {
    let mut at = ctx.at("queue.url");
    let url = match &q.url {
        Some(u) => u.trim().to_owned(),
        None => match env
            .iter()
            .find(|(k, v)| k == "DATABASE_URL" && !v.is_empty())
        {
            Some((_, v)) => {
                at = At {
                    key: "queue.url".into(),
                    source: super::env::source_name("DATABASE_URL"),
                };
                v.trim().to_owned()
            }
            None => {
                return Err(at.err(
                    "the postgres store needs queue.url (or MAILMUX_QUEUE__URL, or DATABASE_URL)",
                ));
            }
        },
    };
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(at.err(format!(
            "{:?} is not a PostgreSQL URL such as postgres://user:password@host:5432/mailmux",
            postgres::shown_url(&url)
        )));
    }
    leaf(out, "url", json!(postgres::shown_url(&url)), &at);
    let pool = at_least_one(ctx, out, "queue.pool_size", q.pool_size, PG_POOL)?;
    let at = ctx.at("queue.node_id");
    let node_id = match q.node_id.as_deref().map(str::trim) {
        Some("") => return Err(at.err("must not be empty")),
        Some(n) => n.to_owned(),
        None => default_node_id(),
    };
    leaf(out, "node_id", json!(node_id), &at);
    let lease = positive(
        ctx,
        out,
        "queue.lease",
        q.lease.as_ref().map(|d| d.0),
        PG_LEASE,
    )?;
    if lease < Duration::from_secs(1) {
        return Err(ctx.at("queue.lease").err("must be at least 1s"));
    }
    Ok(PgSettings {
        url,
        pool,
        node_id,
        lease,
    })
}

/// `host:pid`: unique among the daemons of one machine, and says where each
/// one runs.
fn default_node_id() -> String {
    let host = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "mailmux".into());
    format!("{host}:{}", std::process::id())
}

/// Reads a secret from a file; the error names the file, never the content.
/// A file that other users may read or write is used, with a warning.
pub(super) fn read_secret(path: &Path, at: &At, what: &str) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| at.err(format!("cannot read {what} file {}: {e}", path.display())))?;
    warn_if_exposed(path, at, what);
    let secret = text.trim_end_matches(['\r', '\n']);
    if secret.is_empty() {
        return Err(at.err(format!("{what} file {} is empty", path.display())));
    }
    Ok(Secret::new(secret))
}

/// The fewest characters of a bearer token that is not warned of.
const SHORT_TOKEN: usize = 16;

/// Warns of a bearer token shorter than [`SHORT_TOKEN`]: one that short
/// may be guessed by whoever can reach the listener. Names the key and the
/// length, never the token.
pub(super) fn warn_if_short(token: &str, at: &At) {
    let n = token.chars().count();
    if n < SHORT_TOKEN {
        tracing::warn!(
            key = %at.key,
            "the token of {} is {n} characters long and may be guessed; use at least \
             {SHORT_TOKEN} random characters (`openssl rand -hex 32` gives 64)",
            at.key
        );
    }
}

/// Warns when a secret's file may be read or written by users other than
/// its owner (any group or other bit), as ssh does of a key.
fn warn_if_exposed(path: &Path, at: &At, what: &str) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            key = %at.key,
            file = %path.display(),
            "the {what} file {} of {} may be read or written by other users (mode {mode:03o}); \
             `chmod 600` it",
            path.display(),
            at.key
        );
    }
}

fn check_address(addr: &str, at: &At) -> Result<(), ConfigError> {
    lettre::Address::from_str(addr)
        .map(|_| ())
        .map_err(|e| at.err(format!("{addr:?} is not an email address: {e}")))
}

/// Normalises a seed relay into the shape of a listed one.
fn from_seed(group: &str, s: &RawSeedRelay) -> (RawRelay, Origin) {
    // Implicit TLS wins over STARTTLS, as smtplib's SMTP_SSL did.
    let (tls, tls_stem) = if s.use_ssl == Some(true) {
        ("implicit", "use_ssl")
    } else if s.use_tls == Some(false) {
        // STARTTLS is on unless turned off: the seed's default.
        ("none", "use_tls")
    } else {
        ("starttls", "use_tls")
    };
    let name = s.name.clone().unwrap_or_else(|| {
        if group == SINGLE {
            "primary".into()
        } else {
            format!("server_{group}")
        }
    });
    let relay = RawRelay {
        name: Some(name),
        kind: Some("smtp".into()),
        host: s.host.clone(),
        port: s.port,
        tls: Some(tls.into()),
        username: s.username.clone(),
        password: s.password.clone(),
        password_file: s.password_file.clone(),
        priority: s.priority,
        from_email: s.from_email.clone(),
        timeout: s.timeout,
        auth: s.auth_method.clone(),
        oauth: seed_oauth(s),
        ..RawRelay::default()
    };
    (
        relay,
        Origin::Seed {
            group: group.into(),
            tls_stem,
        },
    )
}

/// A relay's `oauth` table, validated: the provider's presets filled in,
/// secrets kept as values or files (read now, to fail early, and again at
/// each refresh).
fn oauth(
    o: &RawOAuth,
    at_of: &dyn Fn(&str) -> At,
    out: &mut Map<String, Json>,
) -> Result<crate::oauth::OAuthSettings, ConfigError> {
    use crate::oauth::{Grant, OAuthSettings, Provider, SecretFrom};
    let mut shown = Map::new();
    let provider = match o.provider.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(p) => Some(Provider::parse(p).ok_or_else(|| {
            at_of("oauth.provider").err(format!(
                "unknown provider {p:?}; expected one of microsoft, google"
            ))
        })?),
    };
    leaf(
        &mut shown,
        "provider",
        json!(o.provider),
        &at_of("oauth.provider"),
    );
    let secret = |value: &Option<String>,
                  file: &Option<PathBuf>,
                  what: &str|
     -> Result<Option<SecretFrom>, ConfigError> {
        let value_at = at_of(&format!("oauth.{what}"));
        let file_at = at_of(&format!("oauth.{what}_file"));
        match (value, file) {
            (Some(_), Some(_)) => Err(file_at.err(format!(
                "`{}` and `{}` are both set; use one",
                value_at.key, file_at.key
            ))),
            (Some(v), None) if v.trim().is_empty() => Err(value_at.err("must not be empty")),
            (Some(v), None) => Ok(Some(SecretFrom::Value(Secret::new(v.clone())))),
            (None, Some(path)) => {
                read_secret(path, &file_at, what)?;
                Ok(Some(SecretFrom::File(path.clone())))
            }
            (None, None) => Ok(None),
        }
    };
    let client_secret = secret(&o.client_secret, &o.client_secret_file, "client_secret")?;
    let refresh = secret(&o.refresh_token, &o.refresh_token_file, "refresh_token")?;
    for (key, set, file) in [
        (
            "client_secret",
            o.client_secret.is_some(),
            &o.client_secret_file,
        ),
        (
            "refresh_token",
            o.refresh_token.is_some(),
            &o.refresh_token_file,
        ),
    ] {
        leaf(
            &mut shown,
            key,
            json!(set.then_some(REDACTED)),
            &at_of(&format!("oauth.{key}")),
        );
        leaf(
            &mut shown,
            &format!("{key}_file"),
            json!(file.as_deref().map(|p| p.display().to_string())),
            &at_of(&format!("oauth.{key}_file")),
        );
    }
    let grant_at = at_of("oauth.grant");
    let grant = match (o.grant.as_deref().map(str::trim), refresh) {
        (None | Some("refresh_token"), Some(r)) => Grant::RefreshToken(r),
        (Some("refresh_token"), None) => {
            return Err(grant_at.err(format!(
                "the refresh_token grant needs `{}` or `{}`",
                at_of("oauth.refresh_token").key,
                at_of("oauth.refresh_token_file").key
            )));
        }
        (None | Some("client_credentials"), None) => Grant::ClientCredentials,
        (Some("client_credentials"), Some(_)) => {
            return Err(grant_at.err(
                "the client_credentials grant takes no refresh token; remove it or use grant = \"refresh_token\"",
            ));
        }
        (Some(other), _) => {
            return Err(grant_at.err(format!(
                "unknown grant {other:?}; expected refresh_token or client_credentials"
            )));
        }
    };
    leaf(&mut shown, "grant", json!(grant.as_str()), &grant_at);
    if grant == Grant::ClientCredentials && client_secret.is_none() {
        return Err(at_of("oauth.client_secret").err(
            "the client_credentials grant needs the client secret (client_secret or client_secret_file)",
        ));
    }
    let client_id = match o.client_id.as_deref().map(str::trim) {
        Some(id) if !id.is_empty() => id.to_owned(),
        _ => return Err(at_of("oauth.client_id").err("the OAuth2 client id is required")),
    };
    leaf(
        &mut shown,
        "client_id",
        json!(client_id),
        &at_of("oauth.client_id"),
    );
    let tenant = o.tenant.as_deref().map(str::trim).filter(|t| !t.is_empty());
    if tenant.is_some() && provider != Some(Provider::Microsoft) {
        return Err(at_of("oauth.tenant").err("tenant applies to provider = \"microsoft\" only"));
    }
    let token_url = match (&o.token_url, provider) {
        (Some(u), _) => u.trim().to_owned(),
        (None, Some(p)) => p.token_url(tenant),
        (None, None) => {
            return Err(at_of("oauth.token_url")
                .err("give the token endpoint (token_url) or a provider (microsoft, google)"));
        }
    };
    crate::oauth::token_url_ok(&token_url).map_err(|e| at_of("oauth.token_url").err(e))?;
    leaf(
        &mut shown,
        "token_url",
        json!(token_url),
        &at_of("oauth.token_url"),
    );
    let scopes = match (&o.scope, provider) {
        (Some(list), _) => list.0.clone(),
        (None, Some(p)) => p.scopes(&grant),
        (None, None) => Vec::new(),
    };
    leaf(&mut shown, "scope", json!(scopes), &at_of("oauth.scope"));
    out.insert("oauth".into(), Json::Object(shown));
    Ok(OAuthSettings {
        token_url,
        client_id,
        client_secret,
        grant,
        scopes,
    })
}

/// The `oauth` table of a seed relay, from its `SMTP_OAUTH_*` variables.
fn seed_oauth(s: &RawSeedRelay) -> Option<RawOAuth> {
    let o = RawOAuth {
        provider: s.oauth_provider.clone(),
        tenant: s.oauth_tenant.clone(),
        token_url: s.oauth_token_url.clone(),
        client_id: s.oauth_client_id.clone(),
        client_secret: s.oauth_client_secret.clone(),
        client_secret_file: s.oauth_client_secret_file.clone(),
        refresh_token: s.oauth_refresh_token.clone(),
        refresh_token_file: s.oauth_refresh_token_file.clone(),
        grant: s.oauth_grant.clone(),
        scope: s.oauth_scope.clone(),
    };
    let any = o.provider.is_some()
        || o.tenant.is_some()
        || o.token_url.is_some()
        || o.client_id.is_some()
        || o.client_secret.is_some()
        || o.client_secret_file.is_some()
        || o.refresh_token.is_some()
        || o.refresh_token_file.is_some()
        || o.grant.is_some()
        || o.scope.is_some();
    any.then_some(o)
}

/// The name a listed relay will have, before validation.
fn listed_name(r: &RawRelay) -> String {
    match (&r.name, r.kind.as_deref()) {
        (Some(n), _) => n.clone(),
        (None, Some("file")) => EMBEDDED_RELAY.into(),
        (None, _) => r.host.clone().unwrap_or_default(),
    }
}

/// `relay_defaults` takes tuning keys only; anything else would silently
/// apply to nothing.
fn check_tuning_only(ctx: &Ctx, d: &RawRelay) -> Result<(), ConfigError> {
    let set = [
        ("name", d.name.is_some()),
        ("kind", d.kind.is_some()),
        ("host", d.host.is_some()),
        ("port", d.port.is_some()),
        ("tls", d.tls.is_some()),
        ("username", d.username.is_some()),
        ("password", d.password.is_some()),
        ("password_file", d.password_file.is_some()),
        ("hello_name", d.hello_name.is_some()),
        ("ca_file", d.ca_file.is_some()),
        ("accept_invalid_certs", d.accept_invalid_certs.is_some()),
        ("pipelining", d.pipelining.is_some()),
        (
            "recipients_per_transaction",
            d.recipients_per_transaction.is_some(),
        ),
        ("priority", d.priority.is_some()),
        ("weight", d.weight.is_some()),
        ("from_email", d.from_email.is_some()),
        ("dir", d.dir.is_some()),
        ("senders", d.senders.is_some()),
        ("return_path", d.return_path.is_some()),
        ("dsn_notify", d.dsn_notify.is_some()),
        ("dsn_ret", d.dsn_ret.is_some()),
    ];
    match set.iter().find(|(_, is)| *is) {
        Some((field, _)) => Err(ctx.at(&format!("relay_defaults.{field}")).err(
            "relay_defaults takes only pool, timeout and health keys; set this on each relay",
        )),
        None => Ok(()),
    }
}

fn dur_field(r: &RawRelay, f: &str) -> Option<Duration> {
    let d = match f {
        "idle_timeout" => r.idle_timeout,
        "timeout" => r.timeout,
        "connect_timeout" => r.connect_timeout,
        "greeting_timeout" => r.greeting_timeout,
        "command_timeout" => r.command_timeout,
        "data_timeout" => r.data_timeout,
        "backoff_base" => r.backoff_base,
        "backoff_max" => r.backoff_max,
        "circuit_window" => r.circuit_window,
        "probe_interval" => r.probe_interval,
        _ => None,
    };
    d.map(|d| d.0)
}

fn num_field(r: &RawRelay, f: &str) -> Option<u64> {
    match f {
        "max_connections" => r.max_connections.map(|v| v as u64),
        "max_queued" => r.max_queued.map(|v| v as u64),
        "messages_per_connection" => r.messages_per_connection.map(u64::from),
        "circuit_failures" => r.circuit_failures.map(u64::from),
        _ => None,
    }
}

/// The tuning sources of one relay: its own keys, then `relay_defaults`.
struct Tuning<'a> {
    ctx: &'a Ctx<'a>,
    own: &'a RawRelay,
    origin: &'a Origin,
    defaults: &'a RawRelay,
}

impl Tuning<'_> {
    /// The first of `fields` set on the relay, else on `relay_defaults`, else
    /// the built-in default. `fields` lists a specific key before a general
    /// one (`connect_timeout`, then `timeout`).
    fn pick<T>(
        &self,
        fields: &[&str],
        get: impl Fn(&RawRelay, &str) -> Option<T>,
        builtin: T,
    ) -> (T, At) {
        for f in fields {
            if let Some(v) = get(self.own, f) {
                return (v, self.ctx.relay_at(self.origin, f));
            }
        }
        for f in fields {
            if let Some(v) = get(self.defaults, f) {
                return (v, self.ctx.at(&format!("relay_defaults.{f}")));
            }
        }
        let mut at = self.ctx.relay_at(self.origin, fields[0]);
        at.source = DEFAULT_SOURCE.into();
        (builtin, at)
    }

    fn duration(
        &self,
        out: &mut Map<String, Json>,
        fields: &[&str],
        builtin: Duration,
    ) -> Result<(Duration, At), ConfigError> {
        let (v, at) = self.pick(fields, dur_field, builtin);
        if v.is_zero() {
            return Err(at.err("must be greater than zero"));
        }
        leaf(out, fields[0], secs(v), &at);
        Ok((v, at))
    }

    fn count(
        &self,
        out: &mut Map<String, Json>,
        field: &str,
        builtin: u64,
        (min, max): (u64, u64),
    ) -> Result<u64, ConfigError> {
        let (v, at) = self.pick(&[field], num_field, builtin);
        if v < min {
            return Err(at.err(format!("must be at least {min}, got {v}")));
        }
        let v = at_most(&at, v, max)?;
        leaf(out, field, json!(v), &at);
        Ok(v)
    }
}

/// A validated relay: its settings, its effective configuration, where its
/// name came from, and its Sent copy.
type Built = (
    RelaySettings,
    Json,
    At,
    Option<crate::sent_copy::SentCopySettings>,
    Option<crate::config::RelaySenders>,
    Option<crate::bounces::BounceSettings>,
);

fn relay(
    ctx: &Ctx,
    r: &RawRelay,
    origin: &Origin,
    defaults: &RawRelay,
    outbox_dir: &Path,
    strategy: Strategy,
) -> Result<Built, ConfigError> {
    let mut out = Map::new();
    let at_of = |f: &str| ctx.relay_at(origin, f);

    let kind_at = at_of("kind");
    let kind = r.kind.as_deref().unwrap_or("smtp");
    if kind != "smtp" && kind != "file" {
        return Err(kind_at.err(format!(
            "unknown relay kind {kind:?}; expected one of smtp, file"
        )));
    }

    let name_at = at_of("name");
    let name = listed_name(r);
    if name.trim().is_empty() || name.chars().any(char::is_control) {
        return Err(name_at.err(if r.name.is_none() && kind == "smtp" {
            "a relay needs a name or a host".to_string()
        } else {
            format!("{name:?} is not a usable name (empty or control characters)")
        }));
    }
    leaf(&mut out, "name", json!(name), &name_at);
    leaf(&mut out, "kind", json!(kind), &kind_at);

    let at = at_of("priority");
    let priority = r.priority.unwrap_or(0);
    leaf(&mut out, "priority", json!(priority), &at);

    let at = at_of("weight");
    let weight = r.weight.unwrap_or(1);
    if weight == 0 && strategy == Strategy::Weighted {
        return Err(at.err("must be greater than zero under the weighted strategy"));
    }
    leaf(&mut out, "weight", json!(weight), &at);

    let at = at_of("from_email");
    if let Some(addr) = &r.from_email {
        check_address(addr, &at)?;
    }
    leaf(&mut out, "from_email", json!(r.from_email), &at);
    let senders = relay_senders(r, &name, &at_of)?;
    let at = at_of("return_path");
    let return_path = match &r.return_path {
        None => None,
        Some(text) => {
            let address = lettre::Address::from_str(text.trim())
                .map_err(|e| at.err(format!("{text:?} is not an email address: {e}")))?;
            if !text.is_ascii() {
                return Err(at.err(format!(
                    "{text:?} is not ASCII: an envelope sender must be, so that every server takes it"
                )));
            }
            if kind == "file" {
                return Err(at.err("a file relay has no envelope sender"));
            }
            Some(address)
        }
    };
    leaf(&mut out, "return_path", json!(r.return_path), &at);
    leaf(
        &mut out,
        "senders",
        json!(r.senders.clone().unwrap_or_default().0),
        &at_of("senders"),
    );

    let kind = if kind == "file" {
        for (field, set) in [
            ("host", r.host.is_some()),
            ("port", r.port.is_some()),
            ("username", r.username.is_some()),
            (
                "password",
                r.password.is_some() || r.password_file.is_some(),
            ),
            ("dsn_notify", r.dsn_notify.is_some()),
            ("dsn_ret", r.dsn_ret.is_some()),
        ] {
            if set {
                return Err(at_of(field).err("not used by a file relay (kind = \"file\")"));
            }
        }
        let at = at_of("dir");
        let dir = r.dir.clone().unwrap_or_else(|| outbox_dir.to_path_buf());
        leaf(&mut out, "dir", path_json(&dir), &at);
        RelayKind::File { dir }
    } else {
        RelayKind::Smtp(smtp(ctx, r, origin, &mut out)?)
    };

    let t = Tuning {
        ctx,
        own: r,
        origin,
        defaults,
    };
    let pool_d = PoolSettings::default();
    let to_usize = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    let to_u32 = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    let held = MAX_HELD as u64;
    let pool = PoolSettings {
        max_connections: to_usize(t.count(
            &mut out,
            "max_connections",
            pool_d.max_connections as u64,
            (1, held),
        )?),
        max_queued: to_usize(t.count(
            &mut out,
            "max_queued",
            pool_d.max_queued as u64,
            (0, held),
        )?),
        messages_per_connection: to_u32(t.count(
            &mut out,
            "messages_per_connection",
            pool_d.messages_per_connection.into(),
            (0, u32::MAX.into()),
        )?),
        idle_timeout: t
            .duration(&mut out, &["idle_timeout"], pool_d.idle_timeout)?
            .0,
    };

    let to_d = Timeouts::default();
    let timeouts = Timeouts {
        connect: t
            .duration(&mut out, &["connect_timeout", "timeout"], to_d.connect)?
            .0,
        greeting: t
            .duration(&mut out, &["greeting_timeout", "timeout"], to_d.greeting)?
            .0,
        command: t
            .duration(&mut out, &["command_timeout", "timeout"], to_d.command)?
            .0,
        data: t
            .duration(&mut out, &["data_timeout", "timeout"], to_d.data)?
            .0,
    };

    let h_d = HealthSettings::default();
    let (backoff_base, base_at) = t.duration(&mut out, &["backoff_base"], h_d.backoff_base)?;
    let (backoff_max, max_at) = t.duration(&mut out, &["backoff_max"], h_d.backoff_max)?;
    if backoff_base > backoff_max {
        return Err(base_at.err(format!(
            "backoff_base ({}) is larger than backoff_max ({}, `{}` from {})",
            humantime::format_duration(backoff_base),
            humantime::format_duration(backoff_max),
            max_at.key,
            max_at.source
        )));
    }
    let health = HealthSettings {
        backoff_base,
        backoff_max,
        circuit_failures: to_u32(t.count(
            &mut out,
            "circuit_failures",
            h_d.circuit_failures.into(),
            (1, u32::MAX.into()),
        )?),
        circuit_window: t
            .duration(&mut out, &["circuit_window"], h_d.circuit_window)?
            .0,
        probe_interval: t
            .duration(&mut out, &["probe_interval"], h_d.probe_interval)?
            .0,
    };

    let at = ctx.relay_at(origin, "rate");
    let mut rate = Vec::new();
    for text in r.rate.clone().unwrap_or_default().0 {
        let rule = crate::policy::rate::RateRule::parse(&text).map_err(|m| at.err(m))?;
        if rule.unit != crate::policy::rate::Unit::Messages {
            return Err(at.err(format!(
                "{text:?}: a relay's rate counts messages; recipients limits belong in [policy]"
            )));
        }
        rate.push(RelayRate {
            count: rule.count,
            period: rule.period,
        });
    }
    leaf(
        &mut out,
        "rate",
        json!(r.rate.clone().unwrap_or_default().0),
        &at,
    );
    let copy = match (&kind, &r.sent_copy) {
        (_, None) => None,
        (RelayKind::Smtp(smtp), Some(raw)) => Some(sent_copy(raw, smtp, &at_of, &mut out)?),
        (RelayKind::File { .. }, Some(_)) => {
            return Err(at_of("sent_copy").err("a file relay files no Sent copy"));
        }
    };
    let bounces = match (&kind, &r.bounces) {
        (_, None) => None,
        (RelayKind::Smtp(smtp), Some(raw)) => Some(bounces(raw, smtp, &at_of, &mut out)?),
        (RelayKind::File { .. }, Some(_)) => {
            return Err(at_of("bounces").err("a file relay gets no bounces"));
        }
    };
    let settings = RelaySettings {
        name,
        kind,
        priority,
        weight,
        from_email: r.from_email.clone(),
        return_path,
        pool,
        timeouts,
        health,
        rate,
    };
    Ok((settings, Json::Object(out), name_at, copy, senders, bounces))
}

/// A relay's `senders`, parsed as `allowed_senders` entries are (`*`
/// allowed, which takes any sender). Its own `from_email` must be among
/// them.
fn relay_senders(
    r: &RawRelay,
    name: &str,
    at_of: &dyn Fn(&str) -> At,
) -> Result<Option<crate::config::RelaySenders>, ConfigError> {
    use crate::policy::rules::{AddressRule, allowed};
    let Some(list) = r.senders.as_ref().filter(|l| !l.0.is_empty()) else {
        return Ok(None);
    };
    let at = at_of("senders");
    let written: Vec<String> = list.0.iter().map(|e| e.trim().to_string()).collect();
    let rules = written
        .iter()
        .map(|e| AddressRule::parse(e, true).map_err(|m| at.err(m)))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(from) = &r.from_email
        && let Ok(address) = lettre::Address::from_str(from)
        && !allowed(&rules, &address)
    {
        return Err(at_of("from_email").err(format!(
            "{from:?} is not among the relay's senders ({})",
            written.join(", ")
        )));
    }
    Ok(Some(crate::config::RelaySenders {
        relay: name.to_string(),
        written,
        rules,
    }))
}

/// A PEM file of trusted root certificates (`ca_file`).
fn read_ca_file(path: &Path, at: &At) -> Result<Vec<u8>, ConfigError> {
    let pem = std::fs::read(path)
        .map_err(|e| at.err(format!("cannot read CA file {}: {e}", path.display())))?;
    if !pem
        .windows(b"-----BEGIN CERTIFICATE-----".len())
        .any(|w| w == b"-----BEGIN CERTIFICATE-----")
    {
        return Err(at.err(format!(
            "CA file {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(pem)
}

/// The IMAP account of a relay's `sent_copy` or `bounces` table (`table`),
/// validated; the login defaults to the relay's (its OAuth2 tokens
/// included).
fn imap_account(
    raw: &RawImap,
    smtp: &SmtpSettings,
    at: &dyn Fn(&str) -> At,
    shown: &mut Map<String, Json>,
) -> Result<crate::imap::ImapAccount, ConfigError> {
    use crate::imap::{ImapAccount, ImapAuth, ImapTls};
    let host = match raw.imap_host.as_deref().map(str::trim) {
        Some(h) if !h.is_empty() && !h.chars().any(char::is_whitespace) => h.to_owned(),
        _ => return Err(at("imap_host").err("the IMAP server's host is required")),
    };
    leaf(shown, "imap_host", json!(host), &at("imap_host"));
    let tls = match raw.tls.as_deref().map(str::trim).unwrap_or("implicit") {
        "implicit" => ImapTls::Implicit,
        "starttls" => ImapTls::Starttls,
        "none" => ImapTls::None,
        other => {
            return Err(at("tls").err(format!(
                "unknown tls mode {other:?}; expected one of implicit, starttls, none"
            )));
        }
    };
    leaf(shown, "tls", json!(tls.as_str()), &at("tls"));
    let port = match raw.port {
        Some(p) => u16::try_from(p)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| at("port").err(format!("must be in 1..=65535, got {p}")))?,
        None if tls == ImapTls::Implicit => 993,
        None => 143,
    };
    leaf(shown, "port", json!(port), &at("port"));
    let relay_auth = smtp.auth.as_ref();
    let username = match raw
        .username
        .clone()
        .or_else(|| relay_auth.map(|a| a.username.clone()))
    {
        Some(u) if !u.trim().is_empty() => u,
        _ => {
            return Err(
                at("username").err("the IMAP login is required (here, or the relay's username)")
            );
        }
    };
    leaf(shown, "username", json!(username), &at("username"));
    let auth = match (&raw.password, &raw.password_file) {
        (Some(_), Some(_)) => {
            return Err(at("password_file").err(format!(
                "`{}` and `{}` are both set; use one",
                at("password").key,
                at("password_file").key
            )));
        }
        (Some(p), None) => ImapAuth::Password(Secret::new(p.clone())),
        (None, Some(path)) => {
            ImapAuth::Password(read_secret(path, &at("password_file"), "password")?)
        }
        (None, None) => match relay_auth {
            Some(a) if a.method == AuthMethod::Xoauth2 => match &a.token {
                Some(t) => ImapAuth::Xoauth2(t.clone()),
                None => return Err(at("password").err("the relay has no OAuth2 tokens to share")),
            },
            Some(a) => ImapAuth::Password(a.password.clone()),
            None => {
                return Err(at("password").err(
                    "the IMAP password is required (here, or the relay's password or OAuth2 tokens)",
                ));
            }
        },
    };
    leaf(
        shown,
        "password",
        json!(match &auth {
            ImapAuth::Password(_) => REDACTED,
            ImapAuth::Xoauth2(_) => "(the relay's OAuth2 tokens)",
        }),
        &at("password"),
    );
    let ca_pem = match &raw.ca_file {
        Some(path) => Some(read_ca_file(path, &at("ca_file"))?),
        None => None,
    };
    leaf(
        shown,
        "ca_file",
        json!(raw.ca_file.as_deref().map(|p| p.display().to_string())),
        &at("ca_file"),
    );
    Ok(ImapAccount {
        host,
        port,
        tls,
        username,
        auth,
        ca_pem,
    })
}

/// A relay's `sent_copy` table, validated.
fn sent_copy(
    raw: &RawSentCopy,
    smtp: &SmtpSettings,
    at_of: &dyn Fn(&str) -> At,
    out: &mut Map<String, Json>,
) -> Result<crate::sent_copy::SentCopySettings, ConfigError> {
    use crate::sent_copy::{Folder, SentCopySettings};
    let mut shown = Map::new();
    let at = |k: &str| at_of(&format!("sent_copy.{k}"));
    let account = imap_account(&raw.imap(), smtp, &at, &mut shown)?;
    let folder = match raw.folder.as_deref().map(str::trim) {
        None => Folder::Named("Sent".into()),
        Some("") => return Err(at("folder").err("must not be empty")),
        Some(f) if f.eq_ignore_ascii_case("\\Sent") => Folder::SpecialUse,
        Some(f) => Folder::Named(f.to_owned()),
    };
    leaf(
        &mut shown,
        "folder",
        json!(match &folder {
            Folder::Named(f) => f.clone(),
            Folder::SpecialUse => "\\Sent".into(),
        }),
        &at("folder"),
    );
    let include_bcc = raw.include_bcc.unwrap_or(false);
    leaf(
        &mut shown,
        "include_bcc",
        json!(include_bcc),
        &at("include_bcc"),
    );
    let max_connections = raw.max_connections.unwrap_or(2);
    if max_connections == 0 {
        return Err(at("max_connections").err("must be at least 1"));
    }
    at_most(
        &at("max_connections"),
        max_connections,
        MAX_SENT_COPY_CONNECTIONS,
    )?;
    leaf(
        &mut shown,
        "max_connections",
        json!(max_connections),
        &at("max_connections"),
    );
    let attempts = raw.attempts.unwrap_or(4);
    if attempts == 0 {
        return Err(at("attempts").err("must be at least 1"));
    }
    at_most(&at("attempts"), attempts, MAX_SENT_COPY_ATTEMPTS)?;
    leaf(&mut shown, "attempts", json!(attempts), &at("attempts"));
    let retry_base = raw.retry_base.map_or(Duration::from_secs(2), |d| d.0);
    leaf(
        &mut shown,
        "retry_base",
        secs(retry_base),
        &at("retry_base"),
    );
    out.insert("sent_copy".into(), Json::Object(shown));
    Ok(SentCopySettings {
        account,
        folder,
        include_bcc,
        max_connections,
        attempts,
        retry_base,
    })
}

/// A relay's `bounces` table, validated: the mailbox its bounce and
/// complaint reports come back to.
fn bounces(
    raw: &RawBounces,
    smtp: &SmtpSettings,
    at_of: &dyn Fn(&str) -> At,
    out: &mut Map<String, Json>,
) -> Result<crate::bounces::BounceSettings, ConfigError> {
    let mut shown = Map::new();
    let at = |k: &str| at_of(&format!("bounces.{k}"));
    let account = imap_account(&raw.imap(), smtp, &at, &mut shown)?;
    let folder = match raw.folder.as_deref().map(str::trim) {
        None => "INBOX".to_owned(),
        Some("") => return Err(at("folder").err("must not be empty")),
        Some(f) => f.to_owned(),
    };
    leaf(&mut shown, "folder", json!(folder), &at("folder"));
    let every = raw.every.map_or(Duration::from_secs(60), |d| d.0);
    if every < Duration::from_millis(100) {
        return Err(at("every").err("must be at least 100ms"));
    }
    leaf(&mut shown, "every", secs(every), &at("every"));
    out.insert("bounces".into(), Json::Object(shown));
    Ok(crate::bounces::BounceSettings {
        account,
        folder,
        every,
    })
}

fn smtp(
    ctx: &Ctx,
    r: &RawRelay,
    origin: &Origin,
    out: &mut Map<String, Json>,
) -> Result<SmtpSettings, ConfigError> {
    let at_of = |f: &str| ctx.relay_at(origin, f);

    let at = at_of("host");
    let host = r.host.clone().unwrap_or_default();
    if host.trim().is_empty() {
        return Err(at.err("an SMTP relay needs a host"));
    }
    if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(at.err(format!("{host:?} is not a host name")));
    }
    leaf(out, "host", json!(host), &at);

    let at = at_of("tls");
    let tls = match r.tls.as_deref().unwrap_or("starttls") {
        "starttls" => TlsMode::Starttls,
        "opportunistic" => TlsMode::Opportunistic,
        "implicit" => TlsMode::Implicit,
        "none" => TlsMode::None,
        other => {
            return Err(at.err(format!(
                "unknown tls mode {other:?}; expected one of starttls, opportunistic, implicit, none"
            )));
        }
    };
    leaf(out, "tls", json!(tls.as_str()), &at);

    let at = at_of("port");
    let port = match r.port {
        Some(p) => u16::try_from(p)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| at.err(format!("must be in 1..=65535, got {p}")))?,
        None => match tls {
            TlsMode::Starttls => 587,
            TlsMode::Implicit => 465,
            TlsMode::None | TlsMode::Opportunistic => 25,
        },
    };
    leaf(out, "port", json!(port), &at);

    let user_at = at_of("username");
    let pass_at = at_of("password");
    let file_at = at_of("password_file");
    let password = match (&r.password, &r.password_file) {
        (Some(_), Some(_)) => {
            return Err(file_at.err(format!(
                "`{}` (from {}) and `{}` are both set; use one",
                pass_at.key, pass_at.source, file_at.key
            )));
        }
        (Some(p), None) => Some((Secret::new(p.clone()), &pass_at)),
        (None, Some(path)) => Some((read_secret(path, &file_at, "password")?, &file_at)),
        (None, None) => None,
    };
    let method_at = at_of("auth");
    let method = match r.auth.as_deref().map(str::trim).unwrap_or("auto") {
        "auto" => AuthMethod::Auto,
        "plain" => AuthMethod::Plain,
        "login" => AuthMethod::Login,
        "xoauth2" => AuthMethod::Xoauth2,
        other => {
            return Err(method_at.err(format!(
                "unknown auth method {other:?}; expected one of auto, plain, login, xoauth2"
            )));
        }
    };
    leaf(out, "auth", json!(method.as_str()), &method_at);
    let auth = if method == AuthMethod::Xoauth2 {
        if let Some((_, at)) = &password {
            return Err(at.err(format!(
                "auth = \"xoauth2\" takes no password; its tokens come from `{}`",
                at_of("oauth").key
            )));
        }
        let user = match &r.username {
            Some(u) if !u.trim().is_empty() => u.clone(),
            _ => {
                return Err(
                    user_at.err("auth = \"xoauth2\" needs the mailbox's address as the username")
                );
            }
        };
        let Some(raw_oauth) = &r.oauth else {
            return Err(at_of("oauth").err(
                "auth = \"xoauth2\" needs an oauth table (token_url or provider, client_id, …)",
            ));
        };
        let settings = oauth(raw_oauth, &at_of, out)?;
        let source = crate::oauth::OAuthClient::source(settings)
            .map_err(|e| at_of("oauth.token_url").err(e))?;
        Some(Credentials::xoauth2(user, source))
    } else {
        if r.oauth.is_some() {
            return Err(at_of("oauth").err(format!(
                "an oauth table is used only with auth = \"xoauth2\" (`{}`)",
                method_at.key
            )));
        }
        let auth = match (&r.username, password) {
            (Some(u), Some((password, _))) => {
                if u.trim().is_empty() {
                    return Err(user_at.err("must not be empty"));
                }
                Some(Credentials::password(u.clone(), password))
            }
            (Some(_), None) => {
                return Err(user_at.err(format!(
                    "a username needs a password (`{}` or `{}`)",
                    pass_at.key, file_at.key
                )));
            }
            (None, Some((_, at))) => {
                return Err(at.err(format!("a password needs a username (`{}`)", user_at.key)));
            }
            (None, None) => None,
        };
        if method != AuthMethod::Auto && auth.is_none() {
            return Err(method_at.err(format!(
                "auth = {:?} needs a username and a password",
                method.as_str()
            )));
        }
        auth.map(|mut a| {
            a.method = method;
            a
        })
    };
    leaf(out, "username", json!(r.username), &user_at);
    let shown = auth
        .as_ref()
        .filter(|a| a.method != AuthMethod::Xoauth2)
        .map(|_| REDACTED);
    let at = if r.password_file.is_some() {
        &file_at
    } else {
        &pass_at
    };
    leaf(out, "password", json!(shown), at);
    leaf(
        out,
        "password_file",
        json!(r.password_file.as_deref().map(|p| p.display().to_string())),
        &file_at,
    );

    let at = at_of("hello_name");
    let hello_name = match &r.hello_name {
        Some(h) if h.trim().is_empty() || h.chars().any(|c| c.is_whitespace()) => {
            return Err(at.err(format!("{h:?} is not a host name")));
        }
        Some(h) => h.clone(),
        None => lettre::transport::smtp::extension::ClientId::default().to_string(),
    };
    leaf(out, "hello_name", json!(hello_name), &at);

    let at = at_of("ca_file");
    let ca_pem = match &r.ca_file {
        Some(path) => Some(read_ca_file(path, &at)?),
        None => None,
    };
    leaf(
        out,
        "ca_file",
        json!(r.ca_file.as_deref().map(|p| p.display().to_string())),
        &at,
    );

    let at = at_of("accept_invalid_certs");
    let accept_invalid_certs = r.accept_invalid_certs.unwrap_or(false);
    leaf(
        out,
        "accept_invalid_certs",
        json!(accept_invalid_certs),
        &at,
    );

    let at = at_of("pipelining");
    let pipelining = r.pipelining.unwrap_or(true);
    leaf(out, "pipelining", json!(pipelining), &at);

    let at = at_of("recipients_per_transaction");
    let recipients_per_transaction = match r.recipients_per_transaction {
        None => None,
        Some(n) => Some(
            usize::try_from(n)
                .ok()
                .and_then(std::num::NonZeroUsize::new)
                .ok_or_else(|| at.err("must be at least 1"))?,
        ),
    };
    leaf(
        out,
        "recipients_per_transaction",
        json!(r.recipients_per_transaction),
        &at,
    );

    let dsn = dsn(r, &at_of, out)?;

    Ok(SmtpSettings {
        host,
        port,
        tls,
        auth,
        hello_name,
        ca_pem,
        accept_invalid_certs,
        pipelining,
        recipients_per_transaction,
        dsn,
    })
}

/// `dsn_notify` and `dsn_ret`: what a relay asks of delivery status
/// notifications (RFC 3461), in the words the protocol takes.
fn dsn(
    r: &RawRelay,
    at_of: &dyn Fn(&str) -> At,
    out: &mut Map<String, Json>,
) -> Result<Option<Box<mailmux_actors::Dsn>>, ConfigError> {
    let at = at_of("dsn_notify");
    let notify = match &r.dsn_notify {
        None => None,
        Some(list) => {
            let words: Vec<String> = list
                .0
                .iter()
                .map(|w| w.trim().to_ascii_uppercase())
                .collect();
            if let Some(bad) = words
                .iter()
                .find(|w| !["NEVER", "SUCCESS", "FAILURE", "DELAY"].contains(&w.as_str()))
            {
                return Err(at.err(format!(
                    "{bad:?} is not a notification: never, or some of success, failure and delay"
                )));
            }
            if words.is_empty() || (words.len() > 1 && words.iter().any(|w| w == "NEVER")) {
                return Err(at.err("is never alone, or some of success, failure and delay"));
            }
            Some(words.join(","))
        }
    };
    leaf(
        out,
        "dsn_notify",
        json!(r.dsn_notify.as_ref().map(|l| &l.0)),
        &at,
    );
    let at = at_of("dsn_ret");
    let ret = match r.dsn_ret.as_deref().map(str::trim) {
        None => None,
        Some(v) if v.eq_ignore_ascii_case("hdrs") => Some("HDRS".to_string()),
        Some(v) if v.eq_ignore_ascii_case("full") => Some("FULL".to_string()),
        Some(v) => {
            return Err(at.err(format!(
                "{v:?} is not hdrs (a report returns the headers) or full"
            )));
        }
    };
    leaf(out, "dsn_ret", json!(r.dsn_ret), &at);
    Ok((notify.is_some() || ret.is_some()).then(|| Box::new(mailmux_actors::Dsn { notify, ret })))
}
