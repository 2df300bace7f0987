//! The environment layers: `MAILMUX_*` and the seed-compatible `SMTP_*`
//! variables, turned into figment providers.
//!
//! The environment is an explicit input (a list of pairs), never read here,
//! so that tests do not race on the process environment. Each variable is its
//! own provider so that every value remembers the exact variable it came from.

use figment::value::{Dict, Map, Value};
use figment::{Error, Metadata, Profile, Provider};

use super::raw::SEED_RELAY_FIELDS;

/// Prefix of mailmux's own variables.
pub(crate) const PREFIX: &str = "MAILMUX_";
/// The variable naming the configuration file; not a configuration key.
pub(crate) const CONFIG_VAR: &str = "MAILMUX_CONFIG";
/// The operator's token for `mailmux queue`; not a configuration key.
pub const OPERATOR_TOKEN_VAR: &str = "MAILMUX_OPERATOR_TOKEN";
/// The HTTP token under the name users are told.
const HTTP_TOKEN_VAR: &str = "MAILMUX_HTTP_TOKEN";
/// The key under which seed relays are kept until validation merges them.
pub(crate) const SEED_KEY: &str = "smtp_env";
/// The key of the unsuffixed seed relay (`SMTP_HOST`, …) under [`SEED_KEY`].
pub(crate) const SINGLE: &str = "single";

/// One environment variable, placed at a key path.
#[derive(Debug, Clone)]
pub(crate) struct EnvVar {
    pub var: String,
    pub path: Vec<String>,
    pub value: String,
}

/// The source name of a variable, as errors and `mailmux config` show it.
pub(crate) fn source_name(var: &str) -> String {
    format!("env var {var}")
}

impl Provider for EnvVar {
    fn metadata(&self) -> Metadata {
        Metadata::named(source_name(&self.var))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, Error> {
        // Strings only: the lossy extraction turns them into numbers or bools
        // where the field wants one, and a password of digits stays a string.
        let mut value = Value::from(self.value.clone());
        for key in self.path.iter().skip(1).rev() {
            let mut dict = Dict::new();
            dict.insert(key.clone(), value);
            value = Value::from(dict);
        }
        let mut dict = Dict::new();
        if let Some(first) = self.path.first() {
            dict.insert(first.clone(), value);
        }
        let mut map = Map::new();
        map.insert(Profile::Default, dict);
        Ok(map)
    }
}

/// Non-empty variables, sorted by name so that layering is deterministic.
fn present(env: &[(String, String)]) -> Vec<(&str, &str)> {
    let mut vars: Vec<(&str, &str)> = env
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    vars.sort();
    vars
}

/// `MAILMUX_*` variables: `__` separates nested keys (`MAILMUX_HTTP__BIND`),
/// and `MAILMUX_HTTP_TOKEN` is `http.token`. `MAILMUX_CONFIG` and
/// `MAILMUX_OPERATOR_TOKEN` are not keys.
pub(crate) fn mailmux_vars(env: &[(String, String)]) -> Vec<EnvVar> {
    present(env)
        .into_iter()
        .filter_map(|(var, value)| {
            if var == CONFIG_VAR || var == OPERATOR_TOKEN_VAR {
                return None;
            }
            let rest = var.strip_prefix(PREFIX)?;
            let path: Vec<String> = if var == HTTP_TOKEN_VAR {
                vec!["http".into(), "token".into()]
            } else {
                rest.split("__").map(|k| k.to_ascii_lowercase()).collect()
            };
            if path.iter().any(String::is_empty) {
                return None;
            }
            Some(EnvVar {
                var: var.to_string(),
                path,
                value: value.to_string(),
            })
        })
        .collect()
}

/// Splits `SMTP_PORT_2` into (`port`, `2`) and `SMTP_PORT` into (`port`, "").
fn split_seed(var: &str) -> Option<(String, &str)> {
    let rest = var.strip_prefix("SMTP_")?;
    let (stem, suffix) = match rest.rsplit_once('_') {
        Some((stem, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => (stem, n),
        _ => (rest, ""),
    };
    Some((stem.to_ascii_lowercase(), suffix))
}

/// The seed's variables: relays as `SMTP_HOST` … or `SMTP_HOST_N` …, plus
/// `SMTP_MAX_RETRIES` and `LOG_LEVEL`.
///
/// As in the seed, numbered relays replace the single one: when any
/// `SMTP_*_N` relay variable is set, the unsuffixed ones are not read.
/// `SMTP_MAX_RETRIES` and every `SMTP_MAX_RETRIES_N` set `max_attempts`; the
/// largest wins, because the router's budget is global.
pub(crate) fn seed_vars(env: &[(String, String)]) -> Vec<EnvVar> {
    let vars = present(env);
    // Any numbered relay variable switches to numbered relays, so that a
    // stray `SMTP_PORT_3` is reported rather than ignored.
    let numbered = vars.iter().any(|(var, _)| {
        matches!(split_seed(var), Some((stem, suffix))
            if !suffix.is_empty() && SEED_RELAY_FIELDS.contains(&stem.as_str()))
    });
    let mut out = Vec::new();
    let mut retries: Option<(&str, &str)> = None;
    for (var, value) in vars {
        if var == "LOG_LEVEL" {
            out.push(EnvVar {
                var: var.into(),
                path: vec!["log_level".into()],
                value: value.into(),
            });
            continue;
        }
        let Some((stem, suffix)) = split_seed(var) else {
            continue;
        };
        if stem == "max_retries" {
            // A value that does not parse is kept, so that its error surfaces.
            let better = match retries {
                None => true,
                Some((_, old)) => match (value.parse::<u64>(), old.parse::<u64>()) {
                    (Ok(new), Ok(old)) => new > old,
                    (Err(_), _) => true,
                    (Ok(_), Err(_)) => false,
                },
            };
            if better {
                retries = Some((var, value));
            }
            continue;
        }
        if !SEED_RELAY_FIELDS.contains(&stem.as_str()) || numbered == suffix.is_empty() {
            continue;
        }
        let group = if suffix.is_empty() { SINGLE } else { suffix };
        out.push(EnvVar {
            var: var.into(),
            path: vec![SEED_KEY.into(), group.into(), stem],
            value: value.into(),
        });
    }
    if let Some((var, value)) = retries {
        out.push(EnvVar {
            var: var.into(),
            path: vec!["max_attempts".into()],
            value: value.into(),
        });
    }
    out
}

/// The seed variable that carries `stem` for the relay in `group`.
pub(crate) fn seed_var_name(stem: &str, group: &str) -> String {
    let stem = stem.to_ascii_uppercase();
    if group == SINGLE {
        format!("SMTP_{stem}")
    } else {
        format!("SMTP_{stem}_{group}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn seed_names_split_into_stem_and_suffix() {
        assert_eq!(split_seed("SMTP_PORT_2"), Some(("port".into(), "2")));
        assert_eq!(split_seed("SMTP_USE_TLS"), Some(("use_tls".into(), "")));
        assert_eq!(
            split_seed("SMTP_PASSWORD_FILE_10"),
            Some(("password_file".into(), "10"))
        );
        assert_eq!(split_seed("SMTPX"), None);
    }

    #[test]
    fn numbered_relays_replace_the_single_one() {
        let vars = seed_vars(&env(&[
            ("SMTP_HOST", "a.example"),
            ("SMTP_HOST_1", "b.example"),
            ("SMTP_PORT_1", "2525"),
        ]));
        let paths: Vec<_> = vars.iter().map(|v| v.path.join(".")).collect();
        assert_eq!(paths, ["smtp_env.1.host", "smtp_env.1.port"]);
    }

    #[test]
    fn the_largest_max_retries_wins() {
        let vars = seed_vars(&env(&[
            ("SMTP_MAX_RETRIES_1", "2"),
            ("SMTP_MAX_RETRIES_2", "5"),
            ("SMTP_MAX_RETRIES", "4"),
        ]));
        assert_eq!(vars.len(), 1);
        assert_eq!(vars[0].var, "SMTP_MAX_RETRIES_2");
        assert_eq!(vars[0].path, ["max_attempts"]);
    }

    #[test]
    fn mailmux_vars_nest_on_double_underscore() {
        let vars = mailmux_vars(&env(&[
            ("MAILMUX_HTTP__BIND", "0.0.0.0:1"),
            ("MAILMUX_HTTP_TOKEN", "t"),
            ("MAILMUX_CONFIG", "x.toml"),
            ("MAILMUX_STRATEGY", ""),
        ]));
        let paths: Vec<_> = vars.iter().map(|v| v.path.join(".")).collect();
        assert_eq!(paths, ["http.token", "http.bind"]);
    }
}
