//! Configuration: layered loading with figment, and validation into the
//! settings `mailmux-actors` runs on.
//!
//! Layers, each overriding the last: built-in defaults, a file (`--config` or
//! `MAILMUX_CONFIG`), `MAILMUX_*` env vars, then the seed-compatible `SMTP_*`
//! env vars. Every error names the key and where its value came from.

pub(crate) mod env;
mod raw;
mod safety;
mod validate;

pub(crate) use raw::{MAX_DURATION, parse_duration};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::providers::{Format, Json, Toml, Yaml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use mailmux_actors::queue::QueueSettings;
use mailmux_actors::{Secret, Settings};

use crate::compose::ComposePolicy;

/// Where configuration is read from, besides the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    /// The file named with `--config` (else `MAILMUX_CONFIG` is consulted).
    pub file: Option<PathBuf>,
}

/// Streamable HTTP transport settings.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpSettings {
    /// Default 127.0.0.1:8025.
    pub bind: SocketAddr,
    /// Bearer token; requests without it get 401.
    pub token: Option<Secret>,
    /// Allowed Host header values (host or host:port). Empty: loopback names only.
    pub allowed_hosts: Vec<String>,
    /// Allowed Origin header values. Requests without Origin are allowed.
    pub allowed_origins: Vec<String>,
    /// Request body limit in bytes.
    pub body_limit: usize,
    /// Time a client has to send a request's header (and the most an idle
    /// connection stays open), and again its body.
    pub read_timeout: Duration,
    /// HTTP connections open at once; more wait to be accepted.
    pub max_connections: usize,
    /// Stateful sessions (true) or stateless request/response (false).
    pub stateful: bool,
    /// MCP sessions open at once (stateful mode); one more is refused (503).
    pub max_sessions: usize,
    /// MCP sessions one caller may hold; one more closes the caller's least
    /// recently used.
    pub max_sessions_per_caller: usize,
    /// TLS on the listeners (`tls_cert` and `tls_key`); none: plain HTTP.
    pub tls: Option<crate::mcp::tls::Identity>,
    /// Failed authentications one peer address may make (`"10/min"`);
    /// past them it is refused (429) until one refills. `None`: no limit.
    pub auth_failures: Option<crate::policy::rate::RateRule>,
}

/// `/metrics`: who may read it, and where besides the HTTP listener.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsSettings {
    /// When set, `/metrics` needs `Authorization: Bearer` with it; when not,
    /// only loopback peers may read it.
    pub token: Option<Secret>,
    /// A listener of its own (for a daemon serving stdio).
    pub bind: Option<SocketAddr>,
}

/// Daemon settings outside the actor system.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonSettings {
    /// Overall deadline of one send: queueing, failover and delivery.
    pub send_deadline: Duration,
    /// How long shutdown waits for deliveries in flight.
    pub shutdown_grace: Duration,
    pub compose: ComposePolicy,
    /// MCP calls handled at once, over either transport; requests past it
    /// wait unread (in the pipe, or on their HTTP connection). Each call holds
    /// its arguments and the message built from them, so this bounds the
    /// memory a burst of large calls can take.
    pub max_concurrent_calls: usize,
    /// Messages one `send_batch` call may carry.
    pub max_batch: usize,
    pub http: HttpSettings,
    pub metrics: MetricsSettings,
    /// `LOG_LEVEL` from the seed, used when `RUST_LOG` is not set.
    pub log_level: Option<String>,
}

/// Effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub dispatch: Settings,
    pub queue: QueueSettings,
    pub daemon: DaemonSettings,
    /// Callers, operators, policy and the audit log.
    pub safety: crate::policy::SafetySettings,
    /// `[notify]`: the webhook told of message events.
    pub notify: Option<crate::notify::NotifySettings>,
    /// The relays that file a copy in the Sent folder, by relay name.
    pub sent_copies: Vec<(String, crate::sent_copy::SentCopySettings)>,
    /// The relays whose bounce and complaint reports are read, by relay
    /// name.
    pub bounce_readers: Vec<(String, crate::bounces::BounceSettings)>,
    /// The relays that carry only some senders (their `senders`), in the
    /// order configured; a relay not listed carries any sender.
    pub relay_senders: Vec<RelaySenders>,
    /// True when no relay was configured and the embedded `file` relay is used.
    pub default_relay: bool,
    /// The sources that contributed, in order (e.g. "defaults", "file /etc/mailmux.toml",
    /// "env MAILMUX_*", "env SMTP_*").
    pub sources: Vec<String>,
    /// The effective configuration with secrets redacted, each leaf with the
    /// source it came from, for `mailmux config`.
    pub redacted: serde_json::Value,
    /// The `MAILMUX_*` variables that name no configuration key. They are not
    /// refused, since other programs may share the prefix, but each is
    /// warned of: a misspelt `MAILMUX_QUEUE__STOR` would otherwise go unseen.
    pub stray_env: Vec<String>,
}

/// A relay's `senders`: the only senders it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct RelaySenders {
    pub relay: String,
    /// The entries as written, for a reload's comparison.
    pub written: Vec<String>,
    pub rules: Vec<crate::policy::rules::AddressRule>,
}

impl RelaySenders {
    /// Whether the relay `relay` carries mail from `sender`, given every
    /// relay's `senders` (`all`): it has none, or they take the sender.
    pub fn carry(all: &[RelaySenders], relay: &str, sender: &lettre::Address) -> bool {
        all.iter()
            .find(|s| s.relay == relay)
            .is_none_or(|s| crate::policy::rules::allowed(&s.rules, sender))
    }
}

impl Config {
    /// The relays, in the order configured, that may carry mail from
    /// `sender`: each one whose `senders` takes it, and each one with no
    /// `senders`. `None` when no relay has `senders` (every relay may).
    pub fn relays_for_sender(&self, sender: &lettre::Address) -> Option<Vec<String>> {
        if self.relay_senders.is_empty() {
            return None;
        }
        Some(
            self.dispatch
                .relays
                .iter()
                .filter(|r| RelaySenders::carry(&self.relay_senders, &r.name, sender))
                .map(|r| r.name.clone())
                .collect(),
        )
    }

    /// The `senders` of the relay `name`, as written; empty when it carries
    /// any sender.
    pub fn senders_of(&self, name: &str) -> &[String] {
        self.relay_senders
            .iter()
            .find(|s| s.relay == name)
            .map_or(&[], |s| s.written.as_slice())
    }
}

/// A configuration error that names the key and its source.
#[derive(Debug, thiserror::Error)]
#[error("configuration error at `{key}` (from {source_name}): {message}")]
pub struct ConfigError {
    pub key: String,
    pub source_name: String,
    pub message: String,
}

/// Loads and validates configuration from the sources and the process
/// environment. Variables that are not valid UTF-8 are skipped.
pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
    let env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
    load_from(sources, env)
}

/// Loads and validates configuration with an explicit environment, so that
/// callers (and tests) decide what the environment is.
pub fn load_from(
    sources: &Sources,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let env: Vec<(String, String)> = env.into_iter().collect();
    let mut names = vec!["defaults".to_string()];
    let mut figment = Figment::new();

    let (relay_vars, mailmux): (Vec<_>, Vec<_>) = env::mailmux_vars(&env)
        .into_iter()
        .partition(|v| v.path.first().is_some_and(|k| k == "relays"));
    let mut overrides = Vec::new();
    match config_file(sources, &env) {
        Some(file) => {
            let mut layer = FileLayer::read(&file)?;
            check_unknown_keys(&layer)?;
            layer.warn_if_secrets_exposed();
            overrides = layer.inject(&relay_vars)?;
            names.push(layer.name.clone());
            figment = figment.merge(layer);
        }
        None => {
            if let Some(var) = relay_vars.first() {
                return Err(ConfigError {
                    key: var.var.clone(),
                    source_name: env::source_name(&var.var),
                    message: "names a relay, but no configuration file lists relays".into(),
                });
            }
        }
    }
    if !mailmux.is_empty() || !relay_vars.is_empty() {
        names.push("env MAILMUX_*".into());
    }
    let seed = env::seed_vars(&env);
    if !seed.is_empty() {
        names.push("env SMTP_*".into());
    }
    let stray_env = mailmux
        .iter()
        .filter(|v| !names_a_key(&v.path))
        .map(|v| v.var.clone())
        .collect();
    for var in mailmux.into_iter().chain(seed) {
        figment = figment.merge(var);
    }

    let raw: raw::RawConfig = figment.extract_lossy().map_err(from_figment)?;
    let tree = figment
        .find_value("")
        .unwrap_or_else(|_| Value::from(Dict::new()));
    let mut config = validate::build(raw, &figment, &tree, &overrides, names, &env)?;
    config.stray_env = stray_env;
    Ok(config)
}

/// Whether a `MAILMUX_*` variable's path names a configuration key: a
/// top-level key, or a key of one of the tables. Deeper paths are left to
/// the tables' own checks.
fn names_a_key(path: &[String]) -> bool {
    let tables: [(&str, &[&str]); 8] = [
        ("supervisor", raw::SUPERVISOR_KEYS),
        ("unsubscribe", raw::UNSUBSCRIBE_KEYS),
        ("http", raw::HTTP_KEYS),
        ("metrics", raw::METRICS_KEYS),
        ("queue", raw::QUEUE_KEYS),
        ("policy", raw::POLICY_KEYS),
        ("audit", raw::AUDIT_KEYS),
        ("relay_defaults", raw::TUNING_KEYS),
    ];
    match path {
        [] => true,
        [key] => raw::TOP_KEYS.contains(&key.as_str()),
        [table, key, ..] => match tables.iter().find(|(t, _)| t == table) {
            Some((_, keys)) => keys.contains(&key.as_str()),
            None => raw::TOP_KEYS.contains(&table.as_str()),
        },
    }
}

/// Logs a warning for each variable of [`Config::stray_env`].
pub fn warn_stray_env(config: &Config) {
    for var in &config.stray_env {
        tracing::warn!(
            var = %var,
            "{var} names no configuration key and is ignored (see `mailmux config` for the keys)"
        );
    }
}

/// Keys whose value is a secret when written in a file.
const SECRET_KEYS: &[&str] = &["password", "token", "client_secret", "refresh_token"];

/// The paths (`relays[0].password`) of the non-empty secrets under `dict`.
fn inline_secrets(dict: &Dict, at: &str, out: &mut Vec<String>) {
    for (key, value) in dict {
        let path = if at.is_empty() {
            key.clone()
        } else {
            format!("{at}.{key}")
        };
        match value {
            Value::String(_, v) if SECRET_KEYS.contains(&key.as_str()) && !v.is_empty() => {
                out.push(path)
            }
            Value::Dict(_, d) => inline_secrets(d, &path, out),
            Value::Array(_, items) => {
                for (i, item) in items.iter().enumerate() {
                    if let Value::Dict(_, d) = item {
                        inline_secrets(d, &format!("{path}[{i}]"), out);
                    }
                }
            }
            _ => {}
        }
    }
}

/// The file to read and how it was named: `--config`, else `MAILMUX_CONFIG`.
struct NamedFile {
    path: PathBuf,
    /// The flag or variable that named it, for errors.
    key: String,
    source: String,
}

fn config_file(sources: &Sources, env: &[(String, String)]) -> Option<NamedFile> {
    if let Some(path) = &sources.file {
        return Some(NamedFile {
            path: path.clone(),
            key: "--config".into(),
            source: "command line".into(),
        });
    }
    env.iter()
        .find(|(k, v)| k == env::CONFIG_VAR && !v.is_empty())
        .map(|(k, v)| NamedFile {
            path: PathBuf::from(v),
            key: k.clone(),
            source: env::source_name(k),
        })
}

/// A configuration file, parsed once, under the name errors show for it.
struct FileLayer {
    name: String,
    path: PathBuf,
    data: Map<Profile, Dict>,
}

impl FileLayer {
    fn read(file: &NamedFile) -> Result<Self, ConfigError> {
        let path = &file.path;
        let fail = |message: String| ConfigError {
            key: file.key.clone(),
            source_name: file.source.clone(),
            message,
        };
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(fail(format!("{} is not a file", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(fail(format!(
                    "configuration file {} not found",
                    path.display()
                )));
            }
            Err(e) => return Err(fail(format!("cannot read {}: {e}", path.display()))),
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let parsed = match ext.as_deref() {
            Some("toml") => Toml::file_exact(path).data(),
            Some("yaml" | "yml") => Yaml::file_exact(path).data(),
            Some("json") => Json::file_exact(path).data(),
            _ => {
                return Err(fail(format!(
                    "cannot tell the format of {}: name it .toml, .yaml, .yml or .json",
                    path.display()
                )));
            }
        };
        let name = format!("file {}", path.display());
        let data = parsed.map_err(|e| ConfigError {
            key: file.key.clone(),
            source_name: name.clone(),
            message: e.kind.to_string(),
        })?;
        Ok(FileLayer {
            name,
            path: path.clone(),
            data,
        })
    }

    fn root(&self) -> Option<&Dict> {
        self.data.get(&Profile::Default)
    }

    /// Warns when the file holds a secret as a value (a password, a token,
    /// an OAuth2 client secret or refresh token) and other users may read
    /// or write it, as [`validate::read_secret`] warns of a secret's file.
    /// Called before the environment is injected, so that only the file's
    /// own values count.
    fn warn_if_secrets_exposed(&self) {
        use std::os::unix::fs::PermissionsExt;
        let Some(root) = self.root() else {
            return;
        };
        let mode = match std::fs::metadata(&self.path) {
            Ok(m) => m.permissions().mode() & 0o777,
            Err(_) => return,
        };
        if mode & 0o077 == 0 {
            return;
        }
        let mut keys = Vec::new();
        inline_secrets(root, "", &mut keys);
        if !keys.is_empty() {
            tracing::warn!(
                file = %self.path.display(),
                "{} holds {} and other users may read or write it (mode {mode:03o}): \
                 `chmod 600` it, or move the secrets to files or the environment",
                self.path.display(),
                keys.join(", ")
            );
        }
    }

    /// Applies `MAILMUX_RELAYS__<NAME or INDEX>__<KEY>` to the file's relays
    /// (figment would replace the whole array with a dict). Returns, for each
    /// value set, its path and the variable, so that errors name the variable.
    fn inject(&mut self, vars: &[env::EnvVar]) -> Result<Vec<(String, String)>, ConfigError> {
        let mut applied = Vec::new();
        for var in vars {
            let fail = |message: String| ConfigError {
                key: var.var.clone(),
                source_name: env::source_name(&var.var),
                message,
            };
            let [_, relay, field] = var.path.as_slice() else {
                return Err(fail(
                    "expected MAILMUX_RELAYS__<NAME or INDEX>__<KEY>".to_string(),
                ));
            };
            if !raw::RELAY_KEYS.contains(&field.as_str())
                && !raw::TUNING_KEYS.contains(&field.as_str())
            {
                return Err(fail(format!("unknown relay key {field:?}")));
            }
            let relays = match self
                .data
                .get_mut(&Profile::Default)
                .and_then(|root| root.get_mut("relays"))
            {
                Some(Value::Array(_, relays)) => relays,
                _ => return Err(fail(format!("{} lists no relays", self.name))),
            };
            // Env names are upper case and cannot hold `-`.
            let matches = |v: &Value| {
                v.as_dict()
                    .and_then(|d| d.get("name"))
                    .and_then(Value::as_str)
                    .is_some_and(|n| n.to_ascii_lowercase().replace('-', "_") == *relay)
            };
            let index = match relay.parse::<usize>() {
                Ok(i) if i < relays.len() => i,
                _ => relays
                    .iter()
                    .position(matches)
                    .ok_or_else(|| fail(format!("no relay named {relay:?} in {}", self.name)))?,
            };
            if let Some(Value::Dict(_, d)) = relays.get_mut(index) {
                d.insert(field.clone(), Value::from(var.value.clone()));
                applied.push((format!("relays.{index}.{field}"), var.var.clone()));
            }
        }
        Ok(applied)
    }
}

impl Provider for FileLayer {
    fn metadata(&self) -> Metadata {
        Metadata::from(self.name.clone(), self.path.as_path())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(self.data.clone())
    }
}

/// Each `content_checks` entry of a policy table, with its key's prefix.
fn content_check_entries<'a>(policy: &'a Dict, prefix: &str) -> Vec<(String, &'a Dict)> {
    match policy.get("content_checks") {
        Some(Value::Array(_, entries)) => entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match e {
                Value::Dict(_, d) => Some((format!("{prefix}content_checks[{i}]."), d)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// A misspelt key in a file would otherwise be ignored without a word. Env
/// vars are not checked: other programs share the `MAILMUX_` prefix.
fn check_unknown_keys(layer: &FileLayer) -> Result<(), ConfigError> {
    let Some(root) = layer.root() else {
        return Ok(());
    };
    let unknown = |key: String, known: &[&str]| ConfigError {
        key,
        source_name: layer.name.clone(),
        message: format!("unknown key; expected one of {}", known.join(", ")),
    };
    let check = |dict: &Dict, prefix: &str, known: &[&[&str]]| -> Result<(), ConfigError> {
        let all: Vec<&str> = known.iter().flat_map(|k| k.iter().copied()).collect();
        match dict.keys().find(|k| !all.contains(&k.as_str())) {
            Some(k) => Err(unknown(format!("{prefix}{k}"), &all)),
            None => Ok(()),
        }
    };
    check(root, "", &[raw::TOP_KEYS])?;
    if let Some(Value::Dict(_, d)) = root.get("supervisor") {
        check(d, "supervisor.", &[raw::SUPERVISOR_KEYS])?;
    }
    if let Some(Value::Dict(_, d)) = root.get("http") {
        check(d, "http.", &[raw::HTTP_KEYS])?;
    }
    if let Some(Value::Dict(_, d)) = root.get("metrics") {
        check(d, "metrics.", &[raw::METRICS_KEYS])?;
    }
    if let Some(Value::Dict(_, d)) = root.get("queue") {
        check(d, "queue.", &[raw::QUEUE_KEYS])?;
    }
    if let Some(Value::Dict(_, d)) = root.get("policy") {
        check(d, "policy.", &[raw::POLICY_KEYS])?;
        for (prefix, entry) in content_check_entries(d, "policy.") {
            check(entry, &prefix, &[raw::CONTENT_CHECK_KEYS])?;
        }
    }
    if let Some(Value::Dict(_, d)) = root.get("audit") {
        check(d, "audit.", &[raw::AUDIT_KEYS])?;
    }
    if let Some(Value::Dict(_, d)) = root.get("unsubscribe") {
        check(d, "unsubscribe.", &[raw::UNSUBSCRIBE_KEYS])?;
    }
    if let Some(Value::Dict(_, d)) = root.get("notify") {
        check(d, "notify.", &[raw::NOTIFY_KEYS])?;
    }
    for (table, known) in [
        ("callers", &[raw::IDENTITY_KEYS, raw::POLICY_KEYS][..]),
        ("operators", &[raw::IDENTITY_KEYS][..]),
        ("dkim", &[raw::DKIM_KEYS][..]),
        ("templates", &[raw::TEMPLATE_KEYS][..]),
    ] {
        if let Some(Value::Array(_, entries)) = root.get(table) {
            for (i, e) in entries.iter().enumerate() {
                if let Value::Dict(_, d) = e {
                    check(d, &format!("{table}[{i}]."), known)?;
                    if table == "callers" {
                        for (prefix, entry) in content_check_entries(d, &format!("{table}[{i}].")) {
                            check(entry, &prefix, &[raw::CONTENT_CHECK_KEYS])?;
                        }
                    }
                }
            }
        }
    }
    if let Some(Value::Dict(_, d)) = root.get("relay_defaults") {
        check(d, "relay_defaults.", &[raw::TUNING_KEYS])?;
    }
    if let Some(Value::Array(_, relays)) = root.get("relays") {
        for (i, r) in relays.iter().enumerate() {
            if let Value::Dict(_, d) = r {
                check(
                    d,
                    &format!("relays[{i}]."),
                    &[raw::RELAY_KEYS, raw::TUNING_KEYS],
                )?;
                if let Some(Value::Dict(_, o)) = d.get("oauth") {
                    check(o, &format!("relays[{i}].oauth."), &[raw::OAUTH_KEYS])?;
                }
                if let Some(Value::Dict(_, o)) = d.get("sent_copy") {
                    check(
                        o,
                        &format!("relays[{i}].sent_copy."),
                        &[raw::SENT_COPY_KEYS],
                    )?;
                }
                if let Some(Value::Dict(_, o)) = d.get("bounces") {
                    check(o, &format!("relays[{i}].bounces."), &[raw::BOUNCES_KEYS])?;
                }
            }
        }
    }
    Ok(())
}

/// Turns a figment error (a value of the wrong type) into one that names
/// the key as the user wrote it.
fn from_figment(err: figment::Error) -> ConfigError {
    let source_name = err
        .metadata
        .as_ref()
        .map_or_else(|| "configuration".to_string(), |m| m.name.to_string());
    let key = match err.path.first().map(String::as_str) {
        // A seed relay's key is the variable's name.
        Some(env::SEED_KEY) => source_name
            .strip_prefix("env var ")
            .map_or_else(|| display_key(&err.path), str::to_string),
        _ => display_key(&err.path),
    };
    // serde's type errors quote the value, which must not happen to a secret.
    let secret = err
        .path
        .last()
        .is_some_and(|k| k == "password" || k == "token");
    let message = if secret {
        "must be a string (value not shown)".to_string()
    } else {
        err.kind.to_string()
    };
    ConfigError {
        key,
        source_name,
        message,
    }
}

/// `["relays", "1", "port"]` → `relays[1].port`.
fn display_key(path: &[String]) -> String {
    let mut key = String::new();
    for seg in path {
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            key.push_str(&format!("[{seg}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(seg);
        }
    }
    if key.is_empty() {
        key.push_str("(root)");
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_display_with_indices() {
        let path: Vec<String> = ["relays", "1", "port"].map(String::from).to_vec();
        assert_eq!(display_key(&path), "relays[1].port");
        assert_eq!(display_key(&[]), "(root)");
    }

    #[test]
    fn an_empty_environment_gives_the_embedded_relay() {
        let config = load_from(&Sources::default(), Vec::new()).expect("defaults are valid");
        assert!(config.default_relay);
        assert_eq!(config.sources, ["defaults"]);
        assert_eq!(config.dispatch.relays.len(), 1);
        assert_eq!(config.dispatch.relays[0].name, "outbox");
    }

    #[test]
    fn an_unknown_extension_is_refused() {
        let dir = std::env::temp_dir().join(format!("mailmux-config-ext-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("mailmux.ini");
        std::fs::write(&file, "strategy = priority").expect("write");
        let err = load_from(
            &Sources {
                file: Some(file.clone()),
            },
            Vec::new(),
        )
        .expect_err("ini is not a known format");
        assert_eq!(err.key, "--config");
        assert!(err.message.contains(".toml"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
