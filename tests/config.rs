//! Configuration loading: layers, seed env vars, validation errors, secrets.
//!
//! The environment is passed explicitly (`load_from`), so these tests never
//! touch the process environment and run in parallel safely.

mod common;
#[path = "reliability/random_input.rs"]
mod random_input;
#[path = "../actors/tests/support/tls.rs"]
#[allow(dead_code)]
mod tls;

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Toml};
use mailmux::config::{Config, ConfigError, Sources, load_from};
use mailmux_actors::{RelayKind, SmtpSettings, Strategy, Timeouts, TlsMode};
use serde_json::Value as Json;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn load(file: Option<&Path>, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let sources = Sources {
        file: file.map(Path::to_path_buf),
    };
    load_from(&sources, env(pairs))
}

fn ok(file: Option<&Path>, pairs: &[(&str, &str)]) -> Config {
    match load(file, pairs) {
        Ok(c) => c,
        Err(e) => panic!("configuration should load: {e}"),
    }
}

fn err(file: Option<&Path>, pairs: &[(&str, &str)]) -> ConfigError {
    match load(file, pairs) {
        Ok(c) => panic!("configuration should fail, got {:?}", c.redacted),
        Err(e) => e,
    }
}

fn write(dir: &tempfile::TempDir, name: &str, content: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, content).expect("write test file");
    path
}

/// The `{"value", "source"}` leaf of `mailmux config` at a JSON pointer.
fn leaf<'a>(config: &'a Config, pointer: &str) -> (&'a Json, &'a str) {
    let node = config
        .redacted
        .pointer(pointer)
        .unwrap_or_else(|| panic!("no {pointer} in {}", config.redacted));
    (
        &node["value"],
        node["source"].as_str().expect("source is a string"),
    )
}

fn smtp(config: &Config, i: usize) -> &SmtpSettings {
    match &config.dispatch.relays[i].kind {
        RelayKind::Smtp(s) => s,
        RelayKind::File { .. } => panic!("relay {i} is a file relay"),
    }
}

#[test]
fn layers_override_in_order_default_file_mailmux_seed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        "mailmux.toml",
        "max_attempts = 4\nstrategy = \"round_robin\"\n",
    );
    let file_source = format!("file {}", file.display());

    let c = ok(None, &[]);
    assert_eq!(c.dispatch.router.max_attempts, 3);
    assert_eq!(leaf(&c, "/max_attempts").1, "default");

    let c = ok(Some(&file), &[]);
    assert_eq!(c.dispatch.router.max_attempts, 4);
    assert_eq!(leaf(&c, "/max_attempts").1, file_source);
    assert_eq!(c.dispatch.router.strategy, Strategy::RoundRobin);

    let c = ok(Some(&file), &[("MAILMUX_MAX_ATTEMPTS", "5")]);
    assert_eq!(c.dispatch.router.max_attempts, 5);
    assert_eq!(leaf(&c, "/max_attempts").1, "env var MAILMUX_MAX_ATTEMPTS");
    assert_eq!(leaf(&c, "/strategy").1, file_source);

    let c = ok(
        Some(&file),
        &[("MAILMUX_MAX_ATTEMPTS", "5"), ("SMTP_MAX_RETRIES", "6")],
    );
    assert_eq!(c.dispatch.router.max_attempts, 6);
    assert_eq!(leaf(&c, "/max_attempts").1, "env var SMTP_MAX_RETRIES");
    assert_eq!(
        c.sources,
        [
            "defaults",
            file_source.as_str(),
            "env MAILMUX_*",
            "env SMTP_*"
        ]
    );
}

#[test]
fn the_file_can_be_named_by_mailmux_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(&dir, "m.toml", "max_recipients = 7\n");
    let path = file.to_str().expect("utf-8 path");
    let c = ok(None, &[("MAILMUX_CONFIG", path)]);
    assert_eq!(c.daemon.compose.max_recipients, 7);

    // --config wins over the variable.
    let other = write(&dir, "o.toml", "max_recipients = 8\n");
    let c = ok(Some(&other), &[("MAILMUX_CONFIG", path)]);
    assert_eq!(c.daemon.compose.max_recipients, 8);
}

#[test]
fn a_named_file_that_is_missing_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("nope.toml");
    let e = err(Some(&missing), &[]);
    assert_eq!(e.key, "--config");
    assert!(
        e.to_string().contains(&missing.display().to_string()),
        "{e}"
    );

    let e = err(
        None,
        &[("MAILMUX_CONFIG", missing.to_str().expect("utf-8 path"))],
    );
    assert_eq!(e.key, "MAILMUX_CONFIG");
    assert_eq!(e.source_name, "env var MAILMUX_CONFIG");
    assert!(e.message.contains("not found"), "{e}");
}

#[test]
fn mailmux_vars_nest_with_double_underscore() {
    let c = ok(
        None,
        &[
            ("MAILMUX_HTTP__BIND", "0.0.0.0:9000"),
            ("MAILMUX_HTTP__STATEFUL", "false"),
            ("MAILMUX_HTTP_TOKEN", "s3cret-token"),
            ("MAILMUX_STRATEGY", "least_outstanding"),
            ("MAILMUX_SUPERVISOR__RESTART_WINDOW", "5m"),
            ("MAILMUX_ALLOWED_SENDERS", "ada@example.org, @example.net"),
            ("MAILMUX_RELAY_DEFAULTS__MAX_CONNECTIONS", "3"),
            ("MAILMUX_CONFIG", ""),
        ],
    );
    assert_eq!(c.daemon.http.bind, "0.0.0.0:9000".parse().expect("addr"));
    assert!(!c.daemon.http.stateful);
    assert_eq!(
        c.daemon.http.token.as_ref().map(|t| t.expose()),
        Some("s3cret-token")
    );
    assert_eq!(leaf(&c, "/http/token").1, "env var MAILMUX_HTTP_TOKEN");
    assert_eq!(c.dispatch.router.strategy, Strategy::LeastOutstanding);
    assert_eq!(
        c.dispatch.supervisor.restart_window,
        Duration::from_secs(300)
    );
    // The old top-level key still works: it is the default policy's list.
    assert_eq!(c.safety.policy.allowed_senders.len(), 2);
    assert_eq!(
        leaf(&c, "/policy/allowed_senders").1,
        "env var MAILMUX_ALLOWED_SENDERS"
    );
    assert_eq!(c.dispatch.relays[0].pool.max_connections, 3);
    assert_eq!(
        leaf(&c, "/relays/0/max_connections").1,
        "env var MAILMUX_RELAY_DEFAULTS__MAX_CONNECTIONS"
    );
    assert!(c.stray_env.is_empty(), "{:?}", c.stray_env);
}

/// A `MAILMUX_*` variable that names no key is not an error (other
/// programs may share the prefix) but is listed, for a warning.
#[test]
fn mailmux_vars_that_name_no_key_are_listed() {
    let c = ok(
        None,
        &[
            ("MAILMUX_QUEUE__STOR", "memory"),
            ("MAILMUX_SEND_DEADLIN", "5s"),
            ("MAILMUX_QUEUE__RETAIN", "1d"),
            ("MAILMUX_POLICY__RATE", "5/min"),
            ("MAILMUX_OPERATOR_TOKEN", "t"),
            ("MAILMUX_CONFIG", ""),
        ],
    );
    assert_eq!(c.stray_env, ["MAILMUX_QUEUE__STOR", "MAILMUX_SEND_DEADLIN"]);
    assert_eq!(c.queue.retain, Duration::from_secs(86_400));
    assert_eq!(leaf(&c, "/queue/store").1, "default");
}

#[test]
fn every_single_relay_seed_variable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let c = ok(
        None,
        &[
            ("SMTP_HOST", "smtp.example.org"),
            ("SMTP_PORT", "2525"),
            ("SMTP_USERNAME", "ada@example.org"),
            ("SMTP_PASSWORD", "12345"),
            ("SMTP_USE_TLS", "false"),
            ("SMTP_USE_SSL", "false"),
            ("SMTP_TIMEOUT", "7"),
            ("SMTP_MAX_RETRIES", "2"),
            ("SMTP_FROM_EMAIL", "ada@example.org"),
            ("SMTP_NAME", "main"),
            ("SMTP_PRIORITY", "100"),
            ("LOG_LEVEL", "DEBUG"),
            ("UNRELATED", "x"),
        ],
    );
    let _ = dir;
    assert!(!c.default_relay);
    assert_eq!(c.dispatch.relays.len(), 1);
    let r = &c.dispatch.relays[0];
    assert_eq!(r.name, "main");
    assert_eq!(r.priority, 100);
    assert_eq!(r.from_email.as_deref(), Some("ada@example.org"));
    assert_eq!(r.timeouts, Timeouts::uniform(Duration::from_secs(7)));
    let s = smtp(&c, 0);
    assert_eq!(s.host, "smtp.example.org");
    assert_eq!(s.port, 2525);
    assert_eq!(s.tls, TlsMode::None);
    let auth = s.auth.as_ref().expect("AUTH configured");
    assert_eq!(auth.username, "ada@example.org");
    // Digits stay a string: a password is never a number.
    assert_eq!(auth.password.expose(), "12345");
    assert_eq!(c.dispatch.router.max_attempts, 2);
    assert_eq!(c.daemon.log_level.as_deref(), Some("DEBUG"));
    assert_eq!(
        c.daemon.compose.default_from.as_deref(),
        Some("ada@example.org")
    );
    assert_eq!(leaf(&c, "/relays/0/port").1, "env var SMTP_PORT");
    assert_eq!(leaf(&c, "/relays/0/data_timeout").1, "env var SMTP_TIMEOUT");
    assert_eq!(leaf(&c, "/relays/0/tls").1, "env var SMTP_USE_TLS");
}

#[test]
fn seed_defaults_are_the_seeds() {
    let c = ok(None, &[("SMTP_HOST", "smtp.example.org")]);
    let r = &c.dispatch.relays[0];
    assert_eq!(r.name, "primary");
    assert_eq!(r.priority, 0);
    assert_eq!(r.timeouts, Timeouts::default());
    let s = smtp(&c, 0);
    assert_eq!(s.tls, TlsMode::Starttls, "SMTP_USE_TLS defaults to true");
    assert_eq!(s.port, 587);
    assert!(s.auth.is_none());

    let c = ok(
        None,
        &[("SMTP_HOST", "smtp.example.org"), ("SMTP_USE_SSL", "true")],
    );
    assert_eq!(smtp(&c, 0).tls, TlsMode::Implicit);
    assert_eq!(smtp(&c, 0).port, 465);
    assert_eq!(leaf(&c, "/relays/0/tls").1, "env var SMTP_USE_SSL");
}

#[test]
fn numbered_seed_relays_with_priorities() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pw = write(&dir, "pw2", "from-file\n");
    let c = ok(
        None,
        &[
            ("SMTP_HOST", "ignored.example.org"),
            ("SMTP_HOST_1", "smtp.gmail.com"),
            ("SMTP_PORT_1", "587"),
            ("SMTP_USERNAME_1", "one@example.org"),
            ("SMTP_PASSWORD_1", "pw-one"),
            ("SMTP_USE_TLS_1", "true"),
            ("SMTP_NAME_1", "gmail_primary"),
            ("SMTP_PRIORITY_1", "100"),
            ("SMTP_FROM_EMAIL_1", "one@example.org"),
            ("SMTP_HOST_2", "smtp.outlook.com"),
            ("SMTP_USERNAME_2", "two@example.org"),
            ("SMTP_PASSWORD_FILE_2", pw.to_str().expect("utf-8 path")),
            ("SMTP_NAME_2", "outlook_backup"),
            ("SMTP_PRIORITY_2", "50"),
            ("SMTP_TIMEOUT_2", "45s"),
            ("SMTP_FROM_EMAIL_2", "two@example.org"),
            ("SMTP_HOST_3", "smtp.example.com"),
            ("SMTP_PORT_3", "465"),
            ("SMTP_USE_SSL_3", "true"),
            ("SMTP_PRIORITY_3", "10"),
            ("SMTP_MAX_RETRIES_1", "2"),
            ("SMTP_MAX_RETRIES_3", "3"),
        ],
    );
    let names: Vec<_> = c.dispatch.relays.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["gmail_primary", "outlook_backup", "server_3"]);
    let prios: Vec<_> = c.dispatch.relays.iter().map(|r| r.priority).collect();
    assert_eq!(prios, [100, 50, 10]);
    assert_eq!(smtp(&c, 0).port, 587);
    assert_eq!(smtp(&c, 0).tls, TlsMode::Starttls);
    let auth2 = smtp(&c, 1).auth.as_ref().expect("AUTH from file");
    assert_eq!(auth2.password.expose(), "from-file");
    assert_eq!(
        c.dispatch.relays[1].timeouts,
        Timeouts::uniform(Duration::from_secs(45))
    );
    assert_eq!(smtp(&c, 2).tls, TlsMode::Implicit);
    assert_eq!(smtp(&c, 2).port, 465);
    assert!(smtp(&c, 2).auth.is_none());
    assert_eq!(c.dispatch.router.max_attempts, 3);
    // The highest-priority relay's sender is the default sender.
    assert_eq!(
        c.daemon.compose.default_from.as_deref(),
        Some("one@example.org")
    );
    assert_eq!(leaf(&c, "/relays/1/password").0, "[redacted]");
    assert_eq!(
        leaf(&c, "/relays/1/password").1,
        "env var SMTP_PASSWORD_FILE_2"
    );
}

#[test]
fn a_seed_relay_replaces_a_file_relay_of_the_same_name_else_is_added() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        "m.toml",
        r#"
[[relays]]
name = "primary"
host = "file.example.org"
priority = 5

[[relays]]
name = "other"
host = "other.example.org"
"#,
    );
    let c = ok(Some(&file), &[("SMTP_HOST", "env.example.org")]);
    let names: Vec<_> = c.dispatch.relays.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["primary", "other"]);
    assert_eq!(smtp(&c, 0).host, "env.example.org");
    assert_eq!(c.dispatch.relays[0].priority, 0);

    let c = ok(
        Some(&file),
        &[("SMTP_HOST", "env.example.org"), ("SMTP_NAME", "extra")],
    );
    let names: Vec<_> = c.dispatch.relays.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["primary", "other", "extra"]);
}

#[test]
fn yaml_and_json_files() {
    let dir = tempfile::tempdir().expect("temp dir");
    let yaml = write(
        &dir,
        "m.yaml",
        "strategy: random\nrelays:\n  - name: y\n    host: y.example.org\n    tls: implicit\n    idle_timeout: 12\n",
    );
    let c = ok(Some(&yaml), &[]);
    assert_eq!(c.dispatch.router.strategy, Strategy::Random);
    assert_eq!(smtp(&c, 0).port, 465);
    assert_eq!(
        c.dispatch.relays[0].pool.idle_timeout,
        Duration::from_secs(12)
    );

    let json = write(
        &dir,
        "m.json",
        r#"{"strategy": "weighted", "relays": [{"name": "j", "host": "j.example.org", "tls": "none", "weight": 4}]}"#,
    );
    let c = ok(Some(&json), &[]);
    assert_eq!(c.dispatch.router.strategy, Strategy::Weighted);
    assert_eq!(smtp(&c, 0).port, 25);
    assert_eq!(c.dispatch.relays[0].weight, 4);
    assert_eq!(
        leaf(&c, "/relays/0/weight").1,
        format!("file {}", json.display())
    );
}

#[test]
fn durations_as_numbers_or_humantime() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        "m.toml",
        r#"
send_deadline = 45
shutdown_grace = "1m 30s"

[relay_defaults]
timeout = "20s"
data_timeout = 300

[[relays]]
host = "a.example.org"
connect_timeout = "2s"
backoff_max = "10m"
"#,
    );
    let c = ok(
        Some(&file),
        &[("MAILMUX_SUPERVISOR__RESTART_PAUSE", "250ms")],
    );
    assert_eq!(c.daemon.send_deadline, Duration::from_secs(45));
    assert_eq!(c.daemon.shutdown_grace, Duration::from_secs(90));
    assert_eq!(
        c.dispatch.supervisor.restart_pause,
        Duration::from_millis(250)
    );
    let r = &c.dispatch.relays[0];
    assert_eq!(r.name, "a.example.org", "name defaults to the host");
    assert_eq!(
        r.timeouts,
        Timeouts {
            connect: Duration::from_secs(2),
            greeting: Duration::from_secs(20),
            command: Duration::from_secs(20),
            data: Duration::from_secs(300),
        }
    );
    assert_eq!(r.health.backoff_max, Duration::from_secs(600));
    assert_eq!(
        leaf(&c, "/relays/0/greeting_timeout").1,
        format!("file {}", file.display())
    );
    assert_eq!(
        c.dispatch.relays[0].pool.max_connections,
        mailmux_actors::PoolSettings::default().max_connections
    );

    let c = ok(None, &[("MAILMUX_SEND_DEADLINE", "2m")]);
    assert_eq!(c.daemon.send_deadline, Duration::from_secs(120));
    let c = ok(None, &[("MAILMUX_SEND_DEADLINE", "15")]);
    assert_eq!(c.daemon.send_deadline, Duration::from_secs(15));

    // Up to 100 years: a longer one would overflow the clocks it is added to.
    let c = ok(None, &[("MAILMUX_QUEUE__RETAIN", "100y")]);
    assert_eq!(c.queue.retain, Duration::from_secs(100 * 31_557_600));
    for (var, value) in [
        ("MAILMUX_SEND_DEADLINE", "101y"),
        ("MAILMUX_SEND_DEADLINE", "500000000000years"),
        ("MAILMUX_QUEUE__MAX_AGE", "18446744073709551615"),
    ] {
        let e = err(None, &[(var, value)]).to_string();
        let key = var.trim_start_matches("MAILMUX_").replace("__", ".");
        assert!(e.contains(&key.to_lowercase()), "{var}={value}: {e}");
        assert!(e.contains("100 years"), "{var}={value}: {e}");
    }
}

#[test]
fn password_from_a_file_and_from_mailmux_relays_vars() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pw = write(&dir, "pw", "correct horse\r\n");
    let file = write(
        &dir,
        "m.toml",
        &format!(
            "[[relays]]\nname = \"a\"\nhost = \"a.example.org\"\nusername = \"u\"\npassword_file = {:?}\n\n[[relays]]\nname = \"b-relay\"\nhost = \"b.example.org\"\nusername = \"u\"\n",
            pw.display().to_string()
        ),
    );
    let c = ok(
        Some(&file),
        &[("MAILMUX_RELAYS__B_RELAY__PASSWORD", "from-env")],
    );
    let a = smtp(&c, 0).auth.as_ref().expect("AUTH a");
    assert_eq!(a.password.expose(), "correct horse");
    let b = smtp(&c, 1).auth.as_ref().expect("AUTH b");
    assert_eq!(b.password.expose(), "from-env");
    assert_eq!(
        leaf(&c, "/relays/1/password").1,
        "env var MAILMUX_RELAYS__B_RELAY__PASSWORD"
    );

    let e = err(Some(&file), &[("MAILMUX_RELAYS__NOPE__PASSWORD", "x")]);
    assert_eq!(e.key, "MAILMUX_RELAYS__NOPE__PASSWORD");
}

#[test]
fn secrets_are_redacted_in_the_effective_config_and_in_debug() {
    let dir = tempfile::tempdir().expect("temp dir");
    let token = write(&dir, "token", "tok-XYZZY-secret\n");
    let file = write(
        &dir,
        "m.toml",
        &format!(
            "[http]\ntoken_file = {:?}\n\n[[relays]]\nname = \"f\"\nhost = \"f.example.org\"\nusername = \"u\"\npassword = \"pw-in-file-PLUGH\"\n",
            token.display().to_string()
        ),
    );
    let c = ok(
        Some(&file),
        &[
            ("SMTP_HOST", "e.example.org"),
            ("SMTP_USERNAME", "u"),
            ("SMTP_PASSWORD", "pw-in-env-FROTZ"),
        ],
    );
    let shown = c.redacted.to_string();
    let debug = format!("{c:?}");
    for secret in ["tok-XYZZY-secret", "pw-in-file-PLUGH", "pw-in-env-FROTZ"] {
        assert!(!shown.contains(secret), "{secret} in redacted: {shown}");
        assert!(!debug.contains(secret), "{secret} in Debug");
    }
    assert!(shown.contains("[redacted]"));
    assert_eq!(leaf(&c, "/http/token").0, "[redacted]");
    assert_eq!(
        c.daemon.http.token.as_ref().map(|t| t.expose()),
        Some("tok-XYZZY-secret")
    );
}

#[test]
fn a_relays_senders_decide_which_relays_carry_a_sender() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        "senders.toml",
        "[[relays]]\nname = \"a\"\nhost = \"x\"\nfrom_email = \"n@a.example\"\n\
         senders = [\"@a.example\", \"@*.a.example\", \"ops@Bücher.example\"]\n\
         [[relays]]\nname = \"b\"\nhost = \"y\"\nsenders = [\"@b.example\"]\n\
         return_path = \"bounces@b.example\"\n\
         [[relays]]\nname = \"any\"\nhost = \"z\"\n",
    );
    let c = ok(Some(&file), &[]);
    let (shown, source) = leaf(&c, "/relays/0/senders");
    assert_eq!(
        shown,
        &serde_json::json!(["@a.example", "@*.a.example", "ops@Bücher.example"])
    );
    assert!(source.contains("senders.toml"), "{source}");
    assert_eq!(leaf(&c, "/relays/2/senders").0, &serde_json::json!([]));
    let carrying = |from: &str| c.relays_for_sender(&from.parse().unwrap());
    assert_eq!(carrying("x@a.example").unwrap(), ["a", "any"]);
    assert_eq!(carrying("x@mail.A.example").unwrap(), ["a", "any"]);
    assert_eq!(carrying("ops@xn--bcher-kva.example").unwrap(), ["a", "any"]);
    assert_eq!(carrying("x@b.example").unwrap(), ["b", "any"]);
    assert_eq!(carrying("x@c.example").unwrap(), ["any"]);
    // A domain rule never takes a local part that routes elsewhere.
    assert_eq!(carrying("x%evil.example@a.example").unwrap(), ["any"]);
    assert_eq!(c.senders_of("b"), ["@b.example"]);
    assert_eq!(c.dispatch.relays[0].return_path, None);
    assert_eq!(
        c.dispatch.relays[1].return_path,
        Some("bounces@b.example".parse().unwrap())
    );
    assert_eq!(leaf(&c, "/relays/1/return_path").0, "bounces@b.example");

    // Delivery status notifications, in the protocol's words.
    let file = write(
        &dir,
        "dsn.toml",
        "[[relays]]\nname = \"a\"\nhost = \"x\"\ndsn_notify = [\"failure\", \"Delay\"]\n\
         dsn_ret = \"hdrs\"\n[[relays]]\nname = \"b\"\nhost = \"y\"\ndsn_notify = \"never\"\n\
         [[relays]]\nname = \"c\"\nhost = \"z\"\n",
    );
    let c = ok(Some(&file), &[]);
    let dsn = |i: usize| match &c.dispatch.relays[i].kind {
        RelayKind::Smtp(s) => s.dsn.clone().map(|d| *d),
        RelayKind::File { .. } => panic!("an smtp relay"),
    };
    assert_eq!(
        dsn(0),
        Some(mailmux_actors::Dsn {
            notify: Some("FAILURE,DELAY".into()),
            ret: Some("HDRS".into())
        })
    );
    assert_eq!(
        dsn(1),
        Some(mailmux_actors::Dsn {
            notify: Some("NEVER".into()),
            ret: None
        })
    );
    assert_eq!(dsn(2), None);
    assert_eq!(leaf(&c, "/relays/0/dsn_ret").0, "hdrs");
    assert!(c.senders_of("any").is_empty());

    // No relay with `senders`: every relay carries every sender.
    let c = ok(None, &[("SMTP_HOST", "a.example.org")]);
    assert_eq!(c.relays_for_sender(&"x@c.example".parse().unwrap()), None);
}

#[test]
fn no_relay_means_the_embedded_file_relay() {
    let c = ok(None, &[("MAILMUX_OUTBOX_DIR", "/tmp/mailmux-test-outbox")]);
    assert!(c.default_relay);
    assert_eq!(c.dispatch.relays.len(), 1);
    let r = &c.dispatch.relays[0];
    assert_eq!(r.name, "outbox");
    assert_eq!(
        r.kind,
        RelayKind::File {
            dir: PathBuf::from("/tmp/mailmux-test-outbox")
        }
    );
    assert_eq!(c.redacted["default_relay"], true);

    let c = ok(None, &[("SMTP_HOST", "a.example.org")]);
    assert!(!c.default_relay);
}

/// A file's content (empty: no file), the env, the key the error must name
/// and the source it must name (`FILE` stands for the file's path).
type Case<'a> = (String, Vec<(&'a str, &'a str)>, &'a str, &'a str);

#[test]
fn every_validation_error_names_the_key_and_the_source() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pem = write(&dir, "not.pem", "hello");
    let empty_pw = write(&dir, "empty.pw", "\n");
    let missing = dir.path().join("missing");
    let missing = missing.display().to_string();
    let cases: Vec<Case> = vec![
        (
            "[[relays]]\nname = \"a\"\nhost = \"x\"\n[[relays]]\nname = \"a\"\nhost = \"y\"\n"
                .into(),
            vec![],
            "relays[1].name",
            "FILE",
        ),
        (
            "[[relays]]\nname = \"a\"\nhost = \"\"\n".into(),
            vec![],
            "relays[0].host",
            "FILE",
        ),
        (
            "[[relays]]\nhost = \"x\"\nsenders = [\"not an address\"]\n".into(),
            vec![],
            "relays[0].senders",
            "FILE",
        ),
        (
            "[[relays]]\nhost = \"x\"\nfrom_email = \"a@x.example\"\nsenders = [\"@y.example\"]\n"
                .into(),
            vec![],
            "relays[0].from_email",
            "FILE",
        ),
        (
            "from_email = \"a@x.example\"\n[[relays]]\nhost = \"x\"\nsenders = [\"@y.example\"]\n"
                .into(),
            vec![],
            "from_email",
            "FILE",
        ),
        (
            "[[relays]]\nhost = \"x\"\nreturn_path = \"not an address\"\n".into(),
            vec![],
            "relays[0].return_path",
            "FILE",
        ),
        (
            "[[relays]]\nhost = \"x\"\nreturn_path = \"bounces@bücher.example\"\n".into(),
            vec![],
            "relays[0].return_path",
            "FILE",
        ),
        (
            "[[relays]]\nkind = \"file\"\nreturn_path = \"bounces@x.example\"\n".into(),
            vec![],
            "relays[0].return_path",
            "FILE",
        ),
        (
            "[[relays]]\nhost = \"x\"\ndsn_notify = [\"never\", \"failure\"]\n".into(),
            vec![],
            "relays[0].dsn_notify",
            "FILE",
        ),
        (
            "[[relays]]\nhost = \"x\"\ndsn_notify = [\"sometimes\"]\n".into(),
            vec![],
            "relays[0].dsn_notify",
            "FILE",
        ),
        (
            "[[relays]]\nhost = \"x\"\ndsn_ret = \"partial\"\n".into(),
            vec![],
            "relays[0].dsn_ret",
            "FILE",
        ),
        (
            "[[relays]]\nkind = \"file\"\ndsn_notify = [\"failure\"]\n".into(),
            vec![],
            "relays[0].dsn_notify",
            "FILE",
        ),
        (
            "[unsubscribe]\nurl = \"https://mail.example.org\"\n".into(),
            vec![],
            "unsubscribe.secret",
            "default",
        ),
        (
            format!("[unsubscribe]\nsecret = \"{}\"\n", "k".repeat(32)),
            vec![],
            "unsubscribe.url",
            "default",
        ),
        (
            "[unsubscribe]\nurl = \"https://mail.example.org\"\nsecret = \"short\"\n".into(),
            vec![],
            "unsubscribe.secret",
            "FILE",
        ),
        (
            format!(
                "[unsubscribe]\nurl = \"https://mail.example.org\"\nsecret = \"{}\"\nprevious_secret = \"short\"\n",
                "k".repeat(32)
            ),
            vec![],
            "unsubscribe.previous_secret",
            "FILE",
        ),
        (
            format!("[unsubscribe]\nprevious_secret = \"{}\"\n", "k".repeat(32)),
            vec![],
            "unsubscribe.previous_secret",
            "FILE",
        ),
        (
            format!(
                "[unsubscribe]\nurl = \"http://mail.example.org\"\nsecret = \"{}\"\n",
                "k".repeat(32)
            ),
            vec![],
            "unsubscribe.url",
            "FILE",
        ),
        (
            format!(
                "[unsubscribe]\nurl = \"https://mail.example.org/a b\"\nsecret = \"{}\"\n",
                "k".repeat(32)
            ),
            vec![],
            "unsubscribe.url",
            "FILE",
        ),
        (
            "[relay_defaults]\ndsn_ret = \"hdrs\"\n[[relays]]\nhost = \"x\"\n".into(),
            vec![],
            "relay_defaults.dsn_ret",
            "FILE",
        ),
        (
            "[relay_defaults]\nsenders = [\"@x.example\"]\n[[relays]]\nhost = \"x\"\n".into(),
            vec![],
            "relay_defaults.senders",
            "FILE",
        ),
        (
            "[[relays]]\nname = \"a\"\nkind = \"smtp\"\n".into(),
            vec![],
            "relays[0].host",
            "default",
        ),
        (
            "[[relays]]\nhost = \"x\"\nport = 0\n".into(),
            vec![],
            "relays[0].port",
            "FILE",
        ),
        (
            "[[relays]]\nhost = \"x\"\nport = 70000\n".into(),
            vec![],
            "relays[0].port",
            "FILE",
        ),
        (
            "[[relays]]\nhost = \"x\"\ntls = \"ssl\"\n".into(),
            vec![],
            "relays[0].tls",
            "FILE",
        ),
        (
            "[[relays]]\nhost = \"x\"\nkind = \"carrier-pigeon\"\n".into(),
            vec![],
            "relays[0].kind",
            "FILE",
        ),
        (
            String::new(),
            vec![("MAILMUX_STRATEGY", "fastest")],
            "strategy",
            "env var MAILMUX_STRATEGY",
        ),
        (
            "strategy = \"weighted\"\n[[relays]]\nhost = \"x\"\nweight = 0\n".into(),
            vec![],
            "relays[0].weight",
            "FILE",
        ),
        (
            "[[relays]]\nhost = \"x\"\nmax_connections = 0\n".into(),
            vec![],
            "relays[0].max_connections",
            "FILE",
        ),
        (
            "[relay_defaults]\nmax_connections = 0\n".into(),
            vec![],
            "relay_defaults.max_connections",
            "FILE",
        ),
        (
            "[[relays]]\nhost = \"x\"\nrecipients_per_transaction = 0\n".into(),
            vec![],
            "relays[0].recipients_per_transaction",
            "FILE",
        ),
        (
            "[relay_defaults]\nrecipients_per_transaction = 50\n".into(),
            vec![],
            "relay_defaults.recipients_per_transaction",
            "FILE",
        ),
        (
            "[[relays]]\nhost = \"x\"\nprobe_interval = \"0s\"\n".into(),
            vec![],
            "relays[0].probe_interval",
            "FILE",
        ),
        (
            String::new(),
            vec![("MAILMUX_SEND_DEADLINE", "0")],
            "send_deadline",
            "env var MAILMUX_SEND_DEADLINE",
        ),
        (
            "[[relays]]\nhost = \"x\"\nbackoff_base = \"10m\"\nbackoff_max = \"1m\"\n".into(),
            vec![],
            "relays[0].backoff_base",
            "FILE",
        ),
        (
            format!(
                "[[relays]]\nhost = \"x\"\nusername = \"u\"\npassword = \"p\"\npassword_file = {empty_pw:?}\n",
                empty_pw = empty_pw.display().to_string()
            ),
            vec![],
            "relays[0].password_file",
            "FILE",
        ),
        (
            String::new(),
            vec![("SMTP_HOST", "x"), ("SMTP_PASSWORD", "p")],
            "SMTP_PASSWORD",
            "env var SMTP_PASSWORD",
        ),
        (
            String::new(),
            vec![("SMTP_HOST", "x"), ("SMTP_USERNAME", "u")],
            "SMTP_USERNAME",
            "env var SMTP_USERNAME",
        ),
        (
            format!("[[relays]]\nhost = \"x\"\nusername = \"u\"\npassword_file = {missing:?}\n"),
            vec![],
            "relays[0].password_file",
            "FILE",
        ),
        (
            format!(
                "[[relays]]\nhost = \"x\"\nusername = \"u\"\npassword_file = {:?}\n",
                empty_pw.display().to_string()
            ),
            vec![],
            "relays[0].password_file",
            "FILE",
        ),
        (
            format!("[[relays]]\nhost = \"x\"\nca_file = {missing:?}\n"),
            vec![],
            "relays[0].ca_file",
            "FILE",
        ),
        (
            format!(
                "[[relays]]\nhost = \"x\"\nca_file = {:?}\n",
                pem.display().to_string()
            ),
            vec![],
            "relays[0].ca_file",
            "FILE",
        ),
        (
            String::new(),
            vec![("MAILMUX_HTTP__BIND", "localhost")],
            "http.bind",
            "env var MAILMUX_HTTP__BIND",
        ),
        (
            format!("[http]\ntoken = \"t\"\ntoken_file = {missing:?}\n"),
            vec![],
            "http.token_file",
            "FILE",
        ),
        (
            "[http]\nread_timeout = \"0s\"\n".into(),
            vec![],
            "http.read_timeout",
            "FILE",
        ),
        (
            String::new(),
            vec![("MAILMUX_HTTP__MAX_CONNECTIONS", "0")],
            "http.max_connections",
            "env var MAILMUX_HTTP__MAX_CONNECTIONS",
        ),
        (
            String::new(),
            vec![
                ("SMTP_HOST_1", "x"),
                ("SMTP_HOST_2", "y"),
                ("SMTP_PORT_2", "abc"),
            ],
            "SMTP_PORT_2",
            "env var SMTP_PORT_2",
        ),
        (
            String::new(),
            vec![
                ("SMTP_HOST_1", "x"),
                ("SMTP_HOST_2", "y"),
                ("SMTP_PORT_2", "0"),
            ],
            "SMTP_PORT_2",
            "env var SMTP_PORT_2",
        ),
        (
            String::new(),
            vec![
                ("SMTP_HOST_1", "x"),
                ("SMTP_NAME_1", "a"),
                ("SMTP_HOST_2", "y"),
                ("SMTP_NAME_2", "a"),
            ],
            "SMTP_NAME_2",
            "env var SMTP_NAME_2",
        ),
        (
            String::new(),
            vec![("SMTP_HOST_1", "x"), ("SMTP_PORT_3", "25")],
            "SMTP_HOST_3",
            "env var SMTP_PORT_3",
        ),
        (
            String::new(),
            vec![("SMTP_HOST", "x"), ("SMTP_PASSWORD_2", "p")],
            "SMTP_HOST_2",
            "env var SMTP_PASSWORD_2",
        ),
        (
            String::new(),
            vec![("SMTP_MAX_RETRIES", "many")],
            "max_attempts",
            "env var SMTP_MAX_RETRIES",
        ),
        ("max_atempts = 3\n".into(), vec![], "max_atempts", "FILE"),
        (
            "[[relays]]\nhost = \"x\"\nprot = 25\n".into(),
            vec![],
            "relays[0].prot",
            "FILE",
        ),
        (
            "max_attempts = \"three\"\n".into(),
            vec![],
            "max_attempts",
            "FILE",
        ),
        (
            "[relay_defaults]\nhost = \"x\"\n".into(),
            vec![],
            "relay_defaults.host",
            "FILE",
        ),
        (
            "from_email = \"not an address\"\n".into(),
            vec![],
            "from_email",
            "FILE",
        ),
        (
            "[[relays]]\nkind = \"file\"\nhost = \"x\"\n".into(),
            vec![],
            "relays[0].host",
            "FILE",
        ),
    ];
    for (i, (content, env, key, source)) in cases.into_iter().enumerate() {
        let file = (!content.is_empty()).then(|| write(&dir, &format!("case{i}.toml"), &content));
        let e = err(file.as_deref(), &env);
        let want_source = match &file {
            Some(f) if source == "FILE" => format!("file {}", f.display()),
            _ => source.to_string(),
        };
        assert_eq!(e.key, key, "case {i} ({content:?}, {env:?}): {e}");
        assert_eq!(
            e.source_name, want_source,
            "case {i} ({content:?}, {env:?}): {e}"
        );
        let shown = e.to_string();
        assert!(
            shown.contains(key) && shown.contains(&want_source),
            "{shown}"
        );
    }
}

#[test]
fn invalid_values_list_the_valid_ones() {
    let e = err(None, &[("MAILMUX_STRATEGY", "fastest")]);
    for name in [
        "priority",
        "round_robin",
        "weighted",
        "least_outstanding",
        "random",
    ] {
        assert!(e.message.contains(name), "{e}");
    }
    let e = err(None, &[("SMTP_HOST", "x"), ("SMTP_PASSWORD", "hunter2")]);
    assert!(!e.to_string().contains("hunter2"), "{e}");

    // A password of the wrong type is not quoted back.
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        "m.toml",
        "[[relays]]\nhost = \"x\"\nusername = \"u\"\npassword = 987654321\n",
    );
    let e = err(Some(&file), &[]);
    assert_eq!(e.key, "relays[0].password");
    assert!(!e.to_string().contains("987654321"), "{e}");
}

#[test]
fn every_shipped_configuration_file_loads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&root).expect("config/ exists") {
        let path = entry.expect("dir entry").path();
        if !path
            .extension()
            .is_some_and(|e| e == "toml" || e == "yaml" || e == "json")
        {
            continue;
        }
        // The Grafana dashboard is data for Grafana (tests/metrics.rs).
        if path.ends_with("grafana-dashboard.json") {
            continue;
        }
        // Examples keep passwords out of the file: give each relay with a
        // username the password through the environment, as users would.
        let raw: Json = figment::Figment::from(Toml::file_exact(&path))
            .extract()
            .expect("parses as TOML");
        let mut vars = Vec::new();
        if let Some(relays) = raw["relays"].as_array() {
            for (i, r) in relays.iter().enumerate() {
                if r.get("username").is_some()
                    && r.get("auth").and_then(|a| a.as_str()) != Some("xoauth2")
                    && r.get("password").is_none()
                    && r.get("password_file").is_none()
                {
                    vars.push((format!("MAILMUX_RELAYS__{i}__PASSWORD"), "test".to_string()));
                }
            }
        }
        let config = load_from(
            &Sources {
                file: Some(path.clone()),
            },
            vars,
        )
        .unwrap_or_else(|e| panic!("{} does not load: {e}", path.display()));
        if path.ends_with("default.toml") {
            assert!(config.default_relay);
            // The documented defaults are the built-in ones.
            let builtin = ok(None, &[]);
            assert_eq!(config.dispatch, builtin.dispatch);
            assert_eq!(config.daemon, builtin.daemon);
            assert_eq!(config.queue, builtin.queue);
            assert_eq!(config.safety, builtin.safety);
        } else {
            assert!(!config.default_relay, "{}", path.display());
        }
        seen += 1;
    }
    assert!(seen >= 4, "expected the shipped files, saw {seen}");
}

#[test]
fn session_bounds_are_keys_and_a_caller_cannot_hold_more_than_the_server() {
    let c = ok(None, &[]);
    assert_eq!(
        (
            c.daemon.http.max_sessions,
            c.daemon.http.max_sessions_per_caller
        ),
        (1024, 64)
    );
    let c = ok(
        None,
        &[
            ("MAILMUX_HTTP__MAX_SESSIONS", "200"),
            ("MAILMUX_HTTP__MAX_SESSIONS_PER_CALLER", "200"),
        ],
    );
    assert_eq!(
        (
            c.daemon.http.max_sessions,
            c.daemon.http.max_sessions_per_caller
        ),
        (200, 200)
    );
    assert!(c.stray_env.is_empty(), "{:?}", c.stray_env);
    let e = err(None, &[("MAILMUX_HTTP__MAX_SESSIONS_PER_CALLER", "2000")]);
    assert_eq!(e.key, "http.max_sessions_per_caller");
    assert!(
        e.message.contains("more than http.max_sessions (1024)"),
        "{e}"
    );
    let e = err(None, &[("MAILMUX_HTTP__MAX_SESSIONS", "0")]);
    assert_eq!(e.key, "http.max_sessions");
}

#[test]
fn queue_keys_validate_with_their_names() {
    let c = ok(None, &[]);
    assert_eq!(
        c.queue.store,
        mailmux_actors::queue::StoreKind::Sqlite {
            path: "mailmux-queue.db".into()
        }
    );
    let c = ok(
        None,
        &[
            ("MAILMUX_QUEUE__STORE", "memory"),
            ("MAILMUX_QUEUE__RETRY_BASE", "2s"),
        ],
    );
    assert_eq!(c.queue.store, mailmux_actors::queue::StoreKind::Memory);
    assert_eq!(c.queue.retry_base, std::time::Duration::from_secs(2));
    let e = err(None, &[("MAILMUX_QUEUE__STORE", "redis")]);
    assert_eq!(e.key, "queue.store");
    assert!(e.message.contains("sqlite, memory or postgres"), "{e}");
    let e = err(None, &[("MAILMUX_QUEUE__MAX_AGE", "0s")]);
    assert_eq!(e.key, "queue.max_age");
}

/// `store = "postgres"`: the URL from `queue.url` or `DATABASE_URL`, shown
/// without its password; the pool, node id and lease, each error naming its
/// key.
#[test]
fn postgres_queue_keys_validate_and_hide_the_password() {
    use mailmux_actors::queue::StoreKind;
    let url = "postgres://mm:pg-secret-GNUSTO@db.example.org:5432/q?sslmode=require";
    let c = ok(
        None,
        &[
            ("MAILMUX_QUEUE__STORE", "postgres"),
            ("MAILMUX_QUEUE__URL", url),
            ("MAILMUX_QUEUE__NODE_ID", "mx-1"),
            ("MAILMUX_QUEUE__LEASE", "10s"),
            ("MAILMUX_QUEUE__POOL_SIZE", "4"),
        ],
    );
    let StoreKind::Postgres(pg) = &c.queue.store else {
        panic!("{:?}", c.queue.store)
    };
    assert_eq!(pg.url, url);
    assert_eq!((pg.node_id.as_str(), pg.pool), ("mx-1", 4));
    assert_eq!(pg.lease, std::time::Duration::from_secs(10));
    let shown = c.redacted.to_string();
    assert!(!shown.contains("pg-secret-GNUSTO"), "{shown}");
    assert!(!format!("{c:?}").contains("pg-secret-GNUSTO"));
    assert_eq!(
        leaf(&c, "/queue/url").0,
        "postgres://mm:***@db.example.org:5432/q?sslmode=require"
    );

    // DATABASE_URL when queue.url is not set; the node id defaults to host
    // name and pid.
    let c = ok(
        None,
        &[("MAILMUX_QUEUE__STORE", "postgres"), ("DATABASE_URL", url)],
    );
    let StoreKind::Postgres(pg) = &c.queue.store else {
        panic!()
    };
    assert_eq!(pg.url, url);
    assert!(
        pg.node_id.ends_with(&format!(":{}", std::process::id())),
        "{}",
        pg.node_id
    );
    assert_eq!(leaf(&c, "/queue/url").1, "env var DATABASE_URL");

    let e = err(None, &[("MAILMUX_QUEUE__STORE", "postgres")]);
    assert_eq!(e.key, "queue.url");
    assert!(e.message.contains("DATABASE_URL"), "{e}");
    let e = err(
        None,
        &[
            ("MAILMUX_QUEUE__STORE", "postgres"),
            ("MAILMUX_QUEUE__URL", "mysql://u:hidden-PASS@h/db"),
        ],
    );
    assert_eq!(e.key, "queue.url");
    assert!(!e.message.contains("hidden-PASS"), "{e}");
    // A password given as a URL parameter is hidden too.
    let c = ok(
        None,
        &[
            ("MAILMUX_QUEUE__STORE", "postgres"),
            (
                "MAILMUX_QUEUE__URL",
                "postgres://mm@db/q?password=pg-param-FROTZ&sslmode=disable",
            ),
        ],
    );
    assert!(!c.redacted.to_string().contains("pg-param-FROTZ"));
    assert!(!format!("{c:?}").contains("pg-param-FROTZ"));
    assert_eq!(
        leaf(&c, "/queue/url").0,
        "postgres://mm@db/q?password=***&sslmode=disable"
    );
    for (key, value) in [
        ("MAILMUX_QUEUE__LEASE", "500ms"),
        ("MAILMUX_QUEUE__POOL_SIZE", "0"),
        ("MAILMUX_QUEUE__NODE_ID", " "),
    ] {
        let e = err(
            None,
            &[
                ("MAILMUX_QUEUE__STORE", "postgres"),
                ("MAILMUX_QUEUE__URL", url),
                (key, value),
            ],
        );
        let want = key.trim_start_matches("MAILMUX_QUEUE__").to_lowercase();
        assert_eq!(e.key, format!("queue.{want}"), "{e}");
    }
}

/// `[metrics]`: a token (from the environment or a file, never shown) and a
/// listener address, each error naming its key.
#[test]
fn metrics_keys_validate_with_their_names() {
    let c = ok(None, &[]);
    assert_eq!(c.daemon.metrics.token, None);
    assert_eq!(c.daemon.metrics.bind, None);
    let c = ok(
        None,
        &[
            ("MAILMUX_METRICS__TOKEN", "metrics-secret-XYZZY"),
            ("MAILMUX_METRICS__BIND", "127.0.0.1:9091"),
        ],
    );
    assert_eq!(
        c.daemon.metrics.token.as_ref().map(|t| t.expose()),
        Some("metrics-secret-XYZZY")
    );
    assert_eq!(
        c.daemon.metrics.bind,
        Some("127.0.0.1:9091".parse().unwrap())
    );
    assert!(!c.redacted.to_string().contains("XYZZY"));
    let e = err(None, &[("MAILMUX_METRICS__BIND", "nine")]);
    assert_eq!(e.key, "metrics.bind");
    let e = err(None, &[("MAILMUX_METRICS__TOKEN", " ")]);
    assert_eq!(e.key, "metrics.token");
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "m.toml",
        "[metrics]
tokn = \"x\"\n",
    );
    let e = err(Some(&file), &[]);
    assert_eq!(e.key, "metrics.tokn");
    let secret = write(&dir, "token", "from-a-file\n");
    let file = write(
        &dir,
        "m2.toml",
        &format!("[metrics]\ntoken_file = {secret:?}\n"),
    );
    let c = ok(Some(&file), &[]);
    assert_eq!(
        c.daemon.metrics.token.as_ref().map(|t| t.expose()),
        Some("from-a-file")
    );
}

/// The safety keys: callers, operators, policy and audit, each error naming
/// its key; tokens never printed.
#[test]
fn safety_keys_validate_with_their_names() {
    let dir = tempfile::tempdir().unwrap();
    let base = r#"
[[relays]]
name = "primary"
host = "127.0.0.1"
tls = "none"
"#;
    let hex = "ebca95604276a73fb41ea1ae6556b45bf815fa9733bc6e7a7be1316f9c3e8a89";
    let good = write(
        &dir,
        "good.toml",
        &format!(
            r#"{base}
[policy]
allowed_recipients = ["@example.org"]
rate = ["30/min"]
headers = {{ Auto-Submitted = "auto-generated" }}

[[callers]]
name = "a"
token_sha256 = "{hex}"
allowed_recipients = ["*"]
approval = "always"
headers = {{ X-Agent = "a" }}
from_email = "a@example.org"

[[callers]]
name = "b"
token_env = "B_TOKEN"

[[operators]]
name = "ops"
token_env = "OPS_TOKEN"
"#
        ),
    );
    let c = ok(
        Some(&good),
        &[("B_TOKEN", "bee-secret"), ("OPS_TOKEN", "ops-secret")],
    );
    let s = &c.safety;
    assert_eq!(s.callers.len(), 2);
    assert_eq!(
        s.callers[0].policy.approval,
        mailmux::policy::Approval::Always
    );
    assert_eq!(s.callers[0].policy.rate.len(), 1, "inherited from [policy]");
    assert_eq!(
        s.callers[0].policy.from_email.as_deref(),
        Some("a@example.org")
    );
    assert_eq!(
        s.callers[1].policy.from_email, None,
        "the top-level one applies"
    );
    assert_eq!(s.callers[1].policy.allowed_recipients.len(), 1);
    // A caller's fields replace the default's, as a list does.
    let fields = |i: usize| {
        s.callers[i]
            .policy
            .headers
            .keys()
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(fields(0), ["X-Agent"]);
    assert_eq!(fields(1), ["Auto-Submitted"]);
    assert_eq!(s.stdio.name, "local");
    let shown = c.redacted.to_string();
    assert!(!shown.contains("bee-secret") && !shown.contains("ops-secret"));

    let cases: &[(&str, &str, &str)] = &[
        (
            "[[callers]]\nname = \"x\"\ntoken_env = \"B_TOKEN\"\ntoken_sha256 = \"00\"\n",
            "callers.0",
            "exactly one of",
        ),
        (
            "[[callers]]\nname = \"x\"\ntoken_env = \"UNSET_VAR\"\n",
            "callers.0.token_env",
            "not set",
        ),
        (
            "[[callers]]\nname = \"x\"\ntoken_sha256 = \"abc\"\n",
            "callers.0.token_sha256",
            "64 hex",
        ),
        (
            "[policy]\nrate = [\"30/fortnight\"]\n",
            "policy.rate",
            "period",
        ),
        (
            "[policy]\nallowed_recipients = [\"example.org\"]\n",
            "policy.allowed_recipients",
            "not an address",
        ),
        (
            "[policy]\nallowed_relays = [\"nope\"]\n",
            "policy.allowed_relays",
            "not a configured relay",
        ),
        (
            "[policy]\napproval = \"sometimes\"\n",
            "policy.approval",
            "outside_allowlist",
        ),
        ("[policy]\nmode = \"yolo\"\n", "policy.mode", "dry_run"),
        (
            "[policy]\nmax_recpients = 3\n",
            "policy.max_recpients",
            "unknown key",
        ),
        (
            "[[callers]]\nname = \"x\"\ntoken_env = \"B_TOKEN\"\n[[operators]]\nname = \"o\"\ntoken_env = \"B_TOKEN\"\n",
            "operators.0",
            "token of a caller",
        ),
        (
            "allowed_senders = [\"@a.org\"]\n[policy]\nallowed_senders = [\"@b.org\"]\n",
            "allowed_senders",
            "both",
        ),
        (
            "[policy]\nheaders = { Bcc = \"x@example.org\" }\n",
            "policy.headers",
            "headers.Bcc: Bcc is written from the `bcc` parameter",
        ),
        (
            "[[callers]]\nname = \"x\"\ntoken_env = \"B_TOKEN\"\nheaders = { X-Agent = \"{name}\" }\n",
            "callers.0.headers",
            "not a template",
        ),
        (
            "[policy]\nheaders = { X-Agent = \"a\\r\\nBcc: x@example.org\" }\n",
            "policy.headers",
            "single line",
        ),
        (
            "[policy]\nheaders = { X-Agent = 7 }\n",
            "policy.headers.X-Agent",
            "expected a string",
        ),
        (
            "[[callers]]\nname = \"x\"\ntoken_env = \"B_TOKEN\"\nfrom_email = \"not an address\"\n",
            "callers.0.from_email",
            "not an email address",
        ),
        (
            "[[callers]]\nname = \"x\"\ntoken_env = \"B_TOKEN\"\nallowed_senders = [\"@a.org\"]\n\
             from_email = \"x@b.org\"\n",
            "callers.0.from_email",
            "allowed_senders",
        ),
        (
            "[[callers]]\nname = \"x\"\ntoken_env = \"B_TOKEN\"\nallowed_relays = [\"only-a\"]\n\
             from_email = \"x@b.org\"\n[[relays]]\nname = \"only-a\"\nhost = \"h\"\n\
             senders = [\"@a.org\"]\n",
            "callers.0.from_email",
            "none of this policy's relays",
        ),
        (
            "[policy]\nfrom_email = \"x@a.org\"\n[[callers]]\nname = \"x\"\ntoken_env = \"B_TOKEN\"\n\
             allowed_senders = [\"@b.org\"]\n",
            "callers.0.allowed_senders",
            "set this caller's own from_email",
        ),
        (
            "[[policy.content_checks]]\nname = \"k\"\npattern = \"(unclosed\"\naction = \"reject\"\n",
            "policy.content_checks.0.pattern",
            "not a regular expression",
        ),
        (
            "[[policy.content_checks]]\nname = \"k\"\npattern = \"(?i)x*\"\naction = \"reject\"\n",
            "policy.content_checks.0.pattern",
            "would match every message",
        ),
        (
            "[[policy.content_checks]]\nname = \"k\"\npattern = \"x\"\naction = \"drop\"\n",
            "policy.content_checks.0.action",
            "expected \"reject\" or \"hold\"",
        ),
        (
            "[[policy.content_checks]]\npattern = \"x\"\naction = \"hold\"\n",
            "policy.content_checks.0.name",
            "is required",
        ),
        (
            "[[policy.content_checks]]\nname = \"k\"\npattern = \"x\"\nacton = \"hold\"\n",
            "policy.content_checks[0].acton",
            "unknown key",
        ),
        (
            "[[callers]]\nname = \"x\"\ntoken_env = \"B_TOKEN\"\n\
             [[callers.content_checks]]\nname = \"a\"\npattern = \"a\"\naction = \"hold\"\n\
             [[callers.content_checks]]\nname = \"b\"\npattern = \"[\"\naction = \"hold\"\n",
            "callers.0.content_checks.1.pattern",
            "not a regular expression",
        ),
    ];
    for (i, (extra, key, message)) in cases.iter().enumerate() {
        let file = write(&dir, &format!("bad{i}.toml"), &format!("{extra}{base}"));
        let e = err(Some(&file), &[("B_TOKEN", "bee-secret")]);
        assert_eq!(e.key, *key, "{extra}: {e}");
        assert!(e.message.contains(message), "{extra}: {e}");
        assert!(!e.to_string().contains("bee-secret"));
    }
}

/// `auth` and `[relays.oauth]`: XOAUTH2 with a provider's presets, from a
/// file or the seed's `SMTP_AUTH_METHOD` and `SMTP_OAUTH_*`; each mistake
/// names its key; no secret in the effective configuration.
#[test]
fn xoauth2_keys_validate_with_their_names() {
    use mailmux_actors::AuthMethod;
    let dir = tempfile::tempdir().unwrap();
    let relay = |extra: &str| {
        format!(
            "[[relays]]\nname = \"m365\"\nhost = \"smtp.office365.com\"\nusername = \"agent@contoso.com\"\n{extra}\n"
        )
    };
    let file = write(
        &dir,
        "ms.toml",
        &relay(
            "auth = \"xoauth2\"\n[relays.oauth]\nprovider = \"microsoft\"\ntenant = \"contoso.onmicrosoft.com\"\nclient_id = \"app-id\"\nclient_secret = \"SECRET-q9\"\n",
        ),
    );
    let c = ok(Some(&file), &[]);
    let auth = smtp(&c, 0).auth.as_ref().expect("auth");
    assert_eq!(auth.method, AuthMethod::Xoauth2);
    assert_eq!(auth.username, "agent@contoso.com");
    assert!(auth.token.is_some());
    let (url, _) = leaf(&c, "/relays/0/oauth/token_url");
    assert_eq!(
        url,
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    );
    assert_eq!(leaf(&c, "/relays/0/oauth/grant").0, "client_credentials");
    assert_eq!(
        leaf(&c, "/relays/0/oauth/scope").0,
        &serde_json::json!(["https://outlook.office365.com/.default"])
    );
    assert!(!c.redacted.to_string().contains("SECRET-q9"));
    assert!(!format!("{:?}", c.dispatch).contains("SECRET-q9"));

    // Mistakes, each naming its key.
    for (extra, key, says) in [
        ("auth = \"xoauth2\"\n", "relays[0].oauth", "oauth table"),
        (
            "auth = \"xoauth2\"\npassword = \"pw\"\n[relays.oauth]\nprovider = \"google\"\nclient_id = \"c\"\nrefresh_token = \"r\"\n",
            "relays[0].password",
            "takes no password",
        ),
        (
            "auth = \"xoauth2\"\n[relays.oauth]\ntoken_url = \"http://oauth.example.com/token\"\nclient_id = \"c\"\nrefresh_token = \"r\"\n",
            "relays[0].oauth.token_url",
            "https",
        ),
        (
            "auth = \"xoauth2\"\n[relays.oauth]\nprovider = \"microsoft\"\nclient_id = \"c\"\n",
            "relays[0].oauth.client_secret",
            "client secret",
        ),
        (
            "auth = \"xoauth2\"\n[relays.oauth]\nprovider = \"yahoo\"\nclient_id = \"c\"\n",
            "relays[0].oauth.provider",
            "microsoft, google",
        ),
        (
            "auth = \"xoauth2\"\n[relays.oauth]\nprovider = \"google\"\nrefresh_token = \"r\"\n",
            "relays[0].oauth.client_id",
            "required",
        ),
        (
            "auth = \"xoauth2\"\n[relays.oauth]\nprovider = \"google\"\nclient_id = \"c\"\nrefresh_tokn = \"r\"\n",
            "relays[0].oauth.refresh_tokn",
            "unknown key",
        ),
        (
            "auth = \"kerberos\"\npassword = \"pw\"\n",
            "relays[0].auth",
            "xoauth2",
        ),
        (
            "password = \"pw\"\n[relays.oauth]\nprovider = \"google\"\nclient_id = \"c\"\n",
            "relays[0].oauth",
            "only with auth",
        ),
    ] {
        let file = write(&dir, "bad.toml", &relay(extra));
        let e = err(Some(&file), &[]);
        assert_eq!(e.key, key, "{extra}: {e}");
        assert!(e.message.contains(says), "{extra}: {e}");
        assert!(!e.to_string().contains("SECRET"), "{e}");
    }

    // auth = "login" keeps the password, with that mechanism only.
    let file = write(
        &dir,
        "login.toml",
        &relay("auth = \"login\"\npassword = \"pw\"\n"),
    );
    let c = ok(Some(&file), &[]);
    assert_eq!(smtp(&c, 0).auth.as_ref().unwrap().method, AuthMethod::Login);

    // The seed's variables.
    let rt = write(&dir, "rt", "REFRESH-SEED-3c\n");
    let c = ok(
        None,
        &[
            ("SMTP_HOST", "smtp.gmail.com"),
            ("SMTP_USERNAME", "agent@gmail.com"),
            ("SMTP_AUTH_METHOD", "xoauth2"),
            ("SMTP_OAUTH_PROVIDER", "google"),
            ("SMTP_OAUTH_CLIENT_ID", "gid"),
            ("SMTP_OAUTH_CLIENT_SECRET", "gsecret"),
            ("SMTP_OAUTH_REFRESH_TOKEN_FILE", rt.to_str().unwrap()),
        ],
    );
    let auth = smtp(&c, 0).auth.as_ref().expect("auth");
    assert_eq!(auth.method, AuthMethod::Xoauth2);
    assert_eq!(
        leaf(&c, "/relays/0/oauth/token_url").0,
        "https://oauth2.googleapis.com/token"
    );
    assert_eq!(leaf(&c, "/relays/0/oauth/grant").0, "refresh_token");
    let e = err(
        None,
        &[
            ("SMTP_HOST", "smtp.gmail.com"),
            ("SMTP_USERNAME", "agent@gmail.com"),
            ("SMTP_AUTH_METHOD", "xoauth2"),
            ("SMTP_OAUTH_PROVIDER", "google"),
            ("SMTP_OAUTH_REFRESH_TOKEN", "r"),
        ],
    );
    assert_eq!(e.key, "SMTP_OAUTH_CLIENT_ID", "{e}");
}

#[test]
fn counts_past_what_the_daemon_can_hold_are_refused_naming_the_key() {
    // Each of these sized a semaphore or spawned a task per unit: past
    // tokio's bound a semaphore panicked at start (`max_in_flight`,
    // `max_concurrent_calls`, `http.max_connections`, a relay's
    // `max_connections`), and a Sent copy spawned one worker per connection.
    let dir = tempfile::tempdir().expect("temp dir");
    let relay =
        "[[relays]]\nname = \"r\"\nhost = \"127.0.0.1\"\nusername = \"u\"\npassword = \"p\"\n";
    let big = "9223372036854775807";
    let cases = [
        (
            format!("max_in_flight = {big}\n"),
            "max_in_flight",
            "1000000",
        ),
        (
            "max_in_flight = 1000001\n".into(),
            "max_in_flight",
            "1000000",
        ),
        (
            format!("max_concurrent_calls = {big}\n"),
            "max_concurrent_calls",
            "1000000",
        ),
        (
            "[http]\nmax_connections = 1000001\n".into(),
            "http.max_connections",
            "1000000",
        ),
        (
            "[http]\nmax_sessions = 1000001\n".into(),
            "http.max_sessions",
            "1000000",
        ),
        (
            format!("[relay_defaults]\nmax_connections = {big}\n"),
            "relay_defaults.max_connections",
            "1000000",
        ),
        (
            format!("{relay}max_queued = 1000001\n"),
            "relays[0].max_queued",
            "1000000",
        ),
        (
            format!(
                "{relay}[relays.sent_copy]\nimap_host = \"127.0.0.1\"\nmax_connections = {big}\n"
            ),
            "relays[0].sent_copy.max_connections",
            "100",
        ),
        (
            format!("{relay}[relays.sent_copy]\nimap_host = \"127.0.0.1\"\nattempts = 21\n"),
            "relays[0].sent_copy.attempts",
            "20",
        ),
        (
            "[policy]\nrate = [\"4294967296/min\"]\n".into(),
            "policy.rate",
            "4294967295",
        ),
    ];
    for (i, (content, key, max)) in cases.into_iter().enumerate() {
        let file = write(&dir, &format!("case{i}.toml"), &content);
        let e = err(Some(&file), &[]);
        assert_eq!(e.key, key, "{content:?}: {e}");
        assert!(
            e.to_string().contains(&format!("at most {max}")),
            "{content:?}: {e}"
        );
    }
    // The bounds themselves load.
    let file = write(
        &dir,
        "bounds.toml",
        &format!(
            "max_in_flight = 1000000\nmax_concurrent_calls = 1000000\n[http]\nmax_connections = 1000000\n{relay}max_connections = 1000000\nmax_queued = 1000000\n"
        ),
    );
    let c = ok(Some(&file), &[]);
    assert_eq!(c.dispatch.relays[0].pool.max_connections, 1_000_000);
}

#[test]
fn tls_keys_are_a_pair_read_and_checked_at_load() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, b) = (tls::TestCa::generate(), tls::TestCa::generate());
    let cert = write(&dir, "a.pem", &a.cert_pem);
    let key = write(&dir, "a.key", &a.key_pem);
    let other_key = write(&dir, "b.key", &b.key_pem);
    let junk = write(&dir, "junk.pem", "not PEM\n");
    let http = |cert: &Path, key: &Path| {
        format!(
            "[http]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            cert.display(),
            key.display()
        )
    };
    let cases = [
        (
            format!("[http]\ntls_cert = \"{}\"\n", cert.display()),
            "http.tls_key",
            "set tls_key too",
        ),
        (
            format!("[http]\ntls_key = \"{}\"\n", key.display()),
            "http.tls_cert",
            "set tls_cert too",
        ),
        (
            http(&junk, &key),
            "http.tls_cert",
            "holds no PEM certificate",
        ),
        (
            http(&cert, &junk),
            "http.tls_key",
            "holds no PEM private key",
        ),
        (
            http(&cert, &other_key),
            "http.tls_key",
            "is not the key of the first certificate",
        ),
        (
            http(&dir.path().join("missing.pem"), &key),
            "http.tls_cert",
            "cannot read",
        ),
    ];
    for (i, (content, key_name, why)) in cases.into_iter().enumerate() {
        let file = write(&dir, &format!("tls{i}.toml"), &content);
        let e = err(Some(&file), &[]);
        assert_eq!(e.key, key_name, "{content:?}: {e}");
        let shown = e.to_string();
        assert!(shown.contains(why), "{content:?}: {shown}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    }
    let file = write(&dir, "tls-ok.toml", &http(&cert, &key));
    let c = ok(Some(&file), &[]);
    let identity = c.daemon.http.tls.as_ref().expect("TLS on");
    assert_eq!(
        (identity.cert.as_path(), identity.key.as_path()),
        (cert.as_path(), key.as_path())
    );
    assert_eq!(
        leaf(&c, "/http/tls_key").0,
        key.display().to_string().as_str()
    );
}

/// The default configuration file with random values in place of some of
/// its own, random secrets (tokens, passwords, a PostgreSQL URL with its
/// password) and random relays, and random `SMTP_*` and `MAILMUX_*`
/// variables, 3,000 times from a printed seed (`MAILMUX_RANDOM_SEED`
/// replays it). Loading never panics; a refusal names a key and says what
/// is wrong; neither a refusal nor a loaded configuration's `Debug` shows a
/// secret, whatever its form.
#[test]
fn random_configurations_load_or_are_refused_without_a_panic_or_a_secret() {
    use rand::{Rng, SeedableRng};
    const SECRET: &str = "SECRET-MARKER-7d1c";
    let seed = random_input::seed();
    eprintln!("random configurations: MAILMUX_RANDOM_SEED={seed} replays this run");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let default =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"))
            .unwrap();
    let values = [
        "0",
        "-1",
        "1",
        "2",
        "65535",
        "65536",
        "9223372036854775807",
        "1.5",
        "true",
        "false",
        "\"0s\"",
        "\"1ns\"",
        "\"5m\"",
        "\"999999999999999999999d\"",
        "\"18446744073709551615s\"",
        "\"-5s\"",
        "\"5x\"",
        "\"\"",
        "\"*\"",
        "\"\\u0000\"",
        "\"a\\r\\nb\"",
        "[]",
        "[\"a\", 1]",
        "{ a = 1 }",
        "\"127.0.0.1:0\"",
        "\"[::1]:8025\"",
        "\"300.0.0.1:1\"",
        "\"/dev/null\"",
        "\"/nonexistent/dir/q.db\"",
        "\"30/min\"",
        "[\"0/min\"]",
        "[\"1000000000000/ns\"]",
        "[\"recipients: 1/day\", \"30/min\"]",
        "\"round_robin\"",
        "\"nope\"",
        "\"memory\"",
        "\"postgres\"",
        "\"@example.org\"",
        "[\"@*.\", \"\"]",
        "\"starttls\"",
        "\"implicit\"",
        "\"xoauth2\"",
        "\"ZoË\"",
    ];
    // A secret in every form a file can give it.
    let secrets: Vec<String> = [
        format!("\"{SECRET}\""),
        format!("\"{SECRET}\\r\\n\""),
        format!("\"short{}\"", &SECRET[..4]),
        format!("[\"{SECRET}\"]"),
        format!("{{ x = \"{SECRET}\" }}"),
        format!("\"postgres://u:{SECRET}@127.0.0.1:1/db\""),
        format!("\"postgres://u:{SECRET}@[bad/db?sslmode=nope\""),
        format!("\"{SECRET}:{SECRET}@\""),
    ]
    .into();
    let relay_keys = [
        "name",
        "host",
        "port",
        "tls",
        "username",
        "priority",
        "weight",
        "from_email",
        "timeout",
        "max_connections",
        "auth",
        "rate",
        "kind",
        "path",
    ];
    let env_keys = [
        "SMTP_HOST",
        "SMTP_PORT",
        "SMTP_USERNAME",
        "SMTP_USE_TLS",
        "SMTP_FROM_EMAIL",
        "SMTP_HOST_1",
        "SMTP_PORT_1",
        "SMTP_PRIORITY_1",
        "SMTP_NAME_1",
        "SMTP_MAX_RETRIES",
        "MAILMUX_QUEUE__MAX_AGE",
        "MAILMUX_HTTP__BIND",
        "MAILMUX_RELAYS__0__PORT",
        "MAILMUX_POLICY__RATE",
        "MAILMUX_QUEUE__STORE",
        "MAILMUX_NO_SUCH_KEY",
    ];
    let secret_env_keys = [
        "SMTP_PASSWORD",
        "SMTP_PASSWORD_2",
        "MAILMUX_HTTP__TOKEN",
        "MAILMUX_QUEUE__URL",
        "DATABASE_URL",
        "MAILMUX_RELAYS__0__PASSWORD",
    ];
    let env_values = [
        "",
        "0",
        "25",
        "99999",
        "127.0.0.1",
        "true",
        "yes",
        "1h",
        "-1",
        "[1]",
        "a\nb",
    ];
    let secret_env = [
        SECRET.to_string(),
        format!("{SECRET}\n"),
        format!("postgres://u:{SECRET}@127.0.0.1:1/db"),
        format!("postgres://u:{SECRET}@[bad"),
        format!("[{SECRET}]"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let (mut loaded, mut refused) = (0, 0);
    let mut problems = Vec::new();
    for i in 0..3000 {
        let mut file = String::new();
        for line in default.lines() {
            let key = line.split('=').next().unwrap_or("").trim();
            let is_key = line.contains('=') && !line.trim_start().starts_with('#');
            if is_key && rng.random_bool(0.08) {
                let v = values[rng.random_range(0..values.len())];
                file.push_str(&format!("{key} = {v}\n"));
            } else {
                file.push_str(line);
                file.push('\n');
            }
            let table = line.split('#').next().unwrap_or("").trim();
            let secret_key = match table {
                "[http]" | "[metrics]" => Some("token"),
                "[queue]" => Some("url"),
                _ => None,
            };
            if let Some(k) = secret_key
                && rng.random_bool(0.3)
            {
                let v = &secrets[rng.random_range(0..secrets.len())];
                file.push_str(&format!("{k} = {v}\n"));
            }
        }
        for _ in 0..rng.random_range(0..3) {
            file.push_str("\n[[relays]]\n");
            for key in relay_keys {
                if rng.random_bool(0.4) {
                    let v = values[rng.random_range(0..values.len())];
                    file.push_str(&format!("{key} = {v}\n"));
                }
            }
            if rng.random_bool(0.6) {
                let v = &secrets[rng.random_range(0..secrets.len())];
                file.push_str(&format!("password = {v}\n"));
            }
        }
        let path = dir.path().join(format!("random-{i}.toml"));
        std::fs::write(&path, &file).unwrap();
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for _ in 0..rng.random_range(0..4) {
            match rng.random_bool(0.7) {
                true => pairs.push((
                    env_keys[rng.random_range(0..env_keys.len())],
                    env_values[rng.random_range(0..env_values.len())],
                )),
                false => pairs.push((
                    secret_env_keys[rng.random_range(0..secret_env_keys.len())],
                    &secret_env[rng.random_range(0..secret_env.len())],
                )),
            }
        }
        let file_arg = rng.random_bool(0.9).then_some(path.as_path());
        let result = std::panic::catch_unwind(|| load(file_arg, &pairs));
        match result {
            Err(_) => problems.push(format!("{i}: panicked on\n{file}\nwith {pairs:?}")),
            Ok(Ok(c)) => {
                loaded += 1;
                if format!("{c:?}").contains(SECRET) {
                    problems.push(format!("{i}: the configuration shows a secret"));
                }
            }
            Ok(Err(e)) => {
                refused += 1;
                let text = e.to_string();
                if text.contains(SECRET) {
                    problems.push(format!("{i}: the error shows a secret: {text}"));
                }
                if e.message.is_empty() || e.key.is_empty() {
                    problems.push(format!("{i}: an error that says nothing: {text}"));
                }
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    eprintln!("random configurations: {loaded} loaded, {refused} refused");
    assert!(problems.is_empty(), "seed {seed}:\n{}", problems.join("\n"));
    assert!(
        loaded > 50 && refused > 50,
        "{loaded} loaded, {refused} refused"
    );
}

#[test]
fn auth_failures_is_a_rate_or_off() {
    let c = ok(None, &[]);
    let rule = c.daemon.http.auth_failures.expect("on by default");
    assert_eq!((rule.count, rule.period), (10, Duration::from_secs(60)));
    let c = ok(None, &[("MAILMUX_HTTP__AUTH_FAILURES", "5/10s")]);
    let rule = c.daemon.http.auth_failures.unwrap();
    assert_eq!((rule.count, rule.period), (5, Duration::from_secs(10)));
    let c = ok(None, &[("MAILMUX_HTTP__AUTH_FAILURES", "off")]);
    assert!(c.daemon.http.auth_failures.is_none());
    for bad in ["banana", "0/min", "recipients: 5/min", "5/never"] {
        let e = err(None, &[("MAILMUX_HTTP__AUTH_FAILURES", bad)]);
        assert_eq!(e.key, "http.auth_failures", "{bad}: {e}");
    }
}

#[test]
fn dkim_keys_are_read_at_load_and_each_mistake_names_its_key() {
    let dir = tempfile::tempdir().unwrap();
    common::dkim_keys(dir.path());
    let key = |name: &str| dir.path().join(name).display().to_string();
    let entry = |domain: &str, selector: &str, file: &str| {
        format!(
            "[[dkim]]\ndomain = \"{domain}\"\nselector = \"{selector}\"\nprivate_key = \"{}\"\n",
            key(file)
        )
    };
    let file = write(
        &dir,
        "ok.toml",
        &format!(
            "{}{}{}headers = [\"From\", \"Subject\"]\n{}",
            entry("Example.org", "rsa", "rsa.pem"),
            entry("example.org", "ed", "ed.pem"),
            entry("other.example", "k8", "rsa8.pem"),
            entry("Bücher.example", "idn", "ed.pem"),
        ),
    );
    let c = ok(Some(&file), &[]);
    let signers = &c.daemon.compose.dkim.0;
    let shown: Vec<_> = signers
        .iter()
        .map(|s| (s.domain.as_str(), s.selector.as_str(), s.algorithm))
        .collect();
    assert_eq!(
        shown,
        [
            ("example.org", "rsa", "rsa-sha256"),
            ("example.org", "ed", "ed25519-sha256"),
            ("other.example", "k8", "rsa-sha256"),
            ("xn--bcher-kva.example", "idn", "ed25519-sha256")
        ]
    );
    let (headers, _) = leaf(&c, "/dkim/2/headers");
    assert_eq!(headers, &serde_json::json!(["From", "Subject"]));
    let text = c.redacted.to_string();
    let pem = std::fs::read_to_string(dir.path().join("ed.pem")).unwrap();
    let body = pem.lines().nth(1).unwrap();
    assert!(!text.contains(body), "the key is never shown");

    write(
        &dir,
        "garbage.pem",
        "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWJ5dGVz\n-----END PRIVATE KEY-----\n",
    );
    let cases = [
        (
            "[[dkim]]\nselector = \"s\"\n".to_string(),
            "dkim[0].domain",
            "required",
        ),
        (
            entry("not a domain", "s", "rsa.pem"),
            "dkim[0].domain",
            "not a domain name",
        ),
        (
            entry("ex_ämple.org", "s", "rsa.pem"),
            "dkim[0].domain",
            "not a domain name",
        ),
        (
            entry("localhost", "s", "rsa.pem"),
            "dkim[0].domain",
            "not a domain name",
        ),
        (
            entry("example.org", "s_1", "rsa.pem"),
            "dkim[0].selector",
            "not a selector",
        ),
        (
            "[[dkim]]\ndomain = \"example.org\"\nselector = \"s\"\n".to_string(),
            "dkim[0].private_key",
            "required",
        ),
        (
            entry("example.org", "s", "missing.pem"),
            "dkim[0].private_key",
            "cannot read",
        ),
        (
            entry("example.org", "s", "garbage.pem"),
            "dkim[0].private_key",
            "neither an RSA nor an Ed25519",
        ),
        (
            format!(
                "{}headers = [\"Subject\"]\n",
                entry("example.org", "s", "rsa.pem")
            ),
            "dkim[0].headers",
            "must include From",
        ),
        (
            format!(
                "{}headers = [\"From\", \"Sub ject\"]\n",
                entry("example.org", "s", "rsa.pem")
            ),
            "dkim[0].headers",
            "not a header field name",
        ),
        (
            format!(
                "{}{}",
                entry("example.org", "s", "rsa.pem"),
                entry("EXAMPLE.org", "S", "ed.pem")
            ),
            "dkim[1].selector",
            "configured twice",
        ),
        (
            format!(
                "{}algorithm = \"rsa\"\n",
                entry("example.org", "s", "rsa.pem")
            ),
            "dkim[0].algorithm",
            "",
        ),
    ];
    for (toml, key, says) in cases {
        let file = write(&dir, "bad.toml", &toml);
        let e = err(Some(&file), &[]);
        assert_eq!(e.key, key, "{toml}: {e}");
        assert!(e.message.contains(says), "{toml}: {e}");
        assert!(!e.message.contains("c2VjcmV0"), "{e}");
    }
}

/// `[unsubscribe]` from the environment: the URL without its trailing
/// slash, the secret never shown.
#[test]
fn the_unsubscribe_links_load_from_the_environment_and_hide_the_secret() {
    let secret = "s3cret-unsubscribe-key-0123456789abcdef";
    let c = ok(
        None,
        &[
            ("MAILMUX_UNSUBSCRIBE__URL", "https://mail.example.org/mm/"),
            ("MAILMUX_UNSUBSCRIBE__SECRET", secret),
        ],
    );
    let one_click = c.daemon.compose.one_click.as_ref().unwrap();
    assert_eq!(one_click.url, "https://mail.example.org/mm");
    assert!(
        one_click
            .link("a@example.org")
            .unwrap()
            .starts_with("https://mail.example.org/mm/unsubscribe/")
    );
    assert_eq!(
        leaf(&c, "/unsubscribe/url").0,
        "https://mail.example.org/mm"
    );
    assert!(!c.redacted.to_string().contains(secret));
}

#[test]
fn a_relays_bounce_mailbox_is_checked_and_shown_without_its_password() {
    let dir = tempfile::tempdir().unwrap();
    let relay = "[[relays]]\nname = \"acct\"\nhost = \"smtp.example.org\"\nusername = \"me@example.org\"\npassword = \"smtp-secret-9\"\n";
    let file = write(
        &dir,
        "ok.toml",
        &format!("{relay}[relays.bounces]\nimap_host = \"imap.example.org\"\n"),
    );
    let c = ok(Some(&file), &[]);
    assert_eq!(c.bounce_readers.len(), 1);
    let (name, b) = &c.bounce_readers[0];
    assert_eq!(name, "acct");
    assert_eq!(b.folder, "INBOX");
    assert_eq!(b.every, std::time::Duration::from_secs(60));
    assert_eq!(b.account.port, 993);
    assert_eq!(b.account.username, "me@example.org");
    assert_eq!(leaf(&c, "/relays/0/bounces/password").0, "[redacted]");
    assert_eq!(leaf(&c, "/relays/0/bounces/every").0, "1m");
    assert!(!c.redacted.to_string().contains("smtp-secret-9"));

    let cases = [
        (
            "[[relays]]\nname = \"f\"\nkind = \"file\"\n[relays.bounces]\nimap_host = \"imap.example.org\"\n".to_owned(),
            "relays[0].bounces",
        ),
        (format!("{relay}[relays.bounces]\nport = 993\n"), "relays[0].bounces.imap_host"),
        (
            format!("{relay}[relays.bounces]\nimap_host = \"i.example.org\"\nevery = \"10ms\"\n"),
            "relays[0].bounces.every",
        ),
        (
            format!("{relay}[relays.bounces]\nimap_host = \"i.example.org\"\nfolder = \" \"\n"),
            "relays[0].bounces.folder",
        ),
        (
            format!("{relay}[relays.bounces]\nimap_host = \"i.example.org\"\nfoldr = \"x\"\n"),
            "relays[0].bounces.foldr",
        ),
        (
            format!("{relay}[relays.bounces]\nimap_host = \"i.example.org\"\ntls = \"maybe\"\n"),
            "relays[0].bounces.tls",
        ),
    ];
    for (i, (content, key)) in cases.into_iter().enumerate() {
        let file = write(&dir, &format!("case{i}.toml"), &content);
        let e = err(Some(&file), &[]);
        assert_eq!(e.key, key, "{content:?}: {e}");
    }
}

/// `content_checks`: a caller's list replaces the default's; the effective
/// configuration shows each check.
#[test]
fn content_checks_load_per_caller_and_show_in_the_effective_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "checks.toml",
        r#"
[[policy.content_checks]]
name = "private key"
pattern = '-----BEGIN [A-Z ]*PRIVATE KEY-----'
action = "reject"

[[callers]]
name = "desk"
token_env = "B_TOKEN"

[[callers.content_checks]]
name = "invoice"
pattern = '(?i)\binvoice\b'
action = "hold"

[[callers]]
name = "plain"
token_env = "C_TOKEN"
"#,
    );
    let c = ok(
        Some(&file),
        &[("B_TOKEN", "bee-secret"), ("C_TOKEN", "cee-secret")],
    );
    let names = |p: &mailmux::policy::Policy| -> Vec<(String, &'static str)> {
        p.content_checks
            .checks()
            .iter()
            .map(|c| (c.name.clone(), c.action.as_str()))
            .collect()
    };
    let callers = &c.safety.callers;
    assert_eq!(names(&c.safety.policy), [("private key".into(), "reject")]);
    assert_eq!(names(&callers[0].policy), [("invoice".into(), "hold")]);
    assert_eq!(
        names(&callers[1].policy),
        [("private key".into(), "reject")]
    );
    let (shown, _) = leaf(&c, "/policy/content_checks");
    assert_eq!(
        shown[0],
        serde_json::json!({"name": "private key", "pattern": "-----BEGIN [A-Z ]*PRIVATE KEY-----", "action": "reject"})
    );
}

/// `[[templates]]`: texts inline or from a file, checked at load; the
/// variables they use; a policy may name only configured ones; each mistake
/// names its key.
#[test]
fn templates_load_with_their_files_and_each_mistake_names_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let body = write(
        &dir,
        "shipped.txt",
        "Hello {name},\n{?note}Note: {note}{/note}\n",
    );
    let good = format!(
        r#"
[[templates]]
name = "order_shipped"
description = "An order left the warehouse"
subject = "Order {{order}} has shipped"
body_file = "{body}"
html_body = "<p>Hello {{name}}</p>"

[templates.vars]
order = '[0-9]{{1,10}}'
name = '[^\n]{{1,60}}'
note = '.{{0,200}}'

[[templates]]
name = "welcome"
subject = "Welcome"
body = "Hello."

[policy]
allowed_templates = ["welcome"]

[[callers]]
name = "shop"
token_env = "B_TOKEN"
require_template = true
allowed_templates = ["order_shipped"]
"#,
        body = body.display()
    );
    let file = write(&dir, "good.toml", &good);
    let c = ok(Some(&file), &[("B_TOKEN", "bee-secret")]);
    let t = &c.daemon.compose.templates;
    assert_eq!(t.names().collect::<Vec<_>>(), ["order_shipped", "welcome"]);
    let shipped = t.get("order_shipped").unwrap();
    assert_eq!(shipped.vars, ["name", "note", "order"]);
    assert_eq!(shipped.body, "Hello {name},\n{?note}Note: {note}{/note}\n");
    assert_eq!(
        shipped.description.as_deref(),
        Some("An order left the warehouse")
    );
    assert!(t.get("welcome").unwrap().vars.is_empty());
    let patterns: Vec<(&str, &str)> = shipped
        .patterns
        .iter()
        .map(|p| (p.var.as_str(), p.pattern.as_str()))
        .collect();
    assert_eq!(
        patterns,
        [
            ("name", "[^\\n]{1,60}"),
            ("note", ".{0,200}"),
            ("order", "[0-9]{1,10}")
        ]
    );
    assert_eq!(c.safety.policy.allowed_templates, ["welcome"]);
    assert!(!c.safety.policy.require_template);
    let shop = &c.safety.callers[0].policy;
    assert_eq!(shop.allowed_templates, ["order_shipped"]);
    assert!(shop.require_template);
    let shown = &c.redacted["templates"][0];
    assert_eq!(shown["body"]["file"], body.display().to_string(), "{shown}");
    assert_eq!(shown["vars"], serde_json::json!(["name", "note", "order"]));

    let missing = dir.path().join("missing.txt");
    let cases = [
        (
            "[[templates]]\nsubject = \"s\"\nbody = \"b\"\n".to_owned(),
            "templates[0].name",
            "is required",
        ),
        (
            "[[templates]]\nname = \"a b\"\nsubject = \"s\"\nbody = \"b\"\n".to_owned(),
            "templates[0].name",
            "ASCII letters",
        ),
        (
            "[[templates]]\nname = \"a\"\nsubject = \"s\"\nbody = \"b\"\n\
             [[templates]]\nname = \"a\"\nsubject = \"s\"\nbody = \"b\"\n"
                .to_owned(),
            "templates[1].name",
            "configured twice",
        ),
        (
            "[[templates]]\nname = \"a\"\nbody = \"b\"\n".to_owned(),
            "templates[0].subject",
            "is required",
        ),
        (
            "[[templates]]\nname = \"a\"\nsubject = \"s\"\n".to_owned(),
            "templates[0].body",
            "is required",
        ),
        (
            format!(
                "[[templates]]\nname = \"a\"\nsubject = \"s\"\nbody = \"b\"\nbody_file = \"{}\"\n",
                body.display()
            ),
            "templates[0].body",
            "not both",
        ),
        (
            format!(
                "[[templates]]\nname = \"a\"\nsubject = \"s\"\nbody_file = \"{}\"\n",
                missing.display()
            ),
            "templates[0].body_file",
            "cannot read",
        ),
        (
            "[[templates]]\nname = \"a\"\nsubject = \"s\"\nbody = \"{?x}open\"\n".to_owned(),
            "templates[0].body",
            "never closed",
        ),
        (
            "[[templates]]\nname = \"a\"\nsubject = \"{/y}\"\nbody = \"b\"\n".to_owned(),
            "templates[0].subject",
            "no matching",
        ),
        (
            "[[templates]]\nname = \"a\"\nsubject = \"s\"\nbody = \"b\"\nhtml = true\n".to_owned(),
            "templates[0].html",
            "unknown key",
        ),
        (
            "[[templates]]\nname = \"a\"\nsubject = \"{x}\"\nbody = \"{y}\"\n\
             [templates.vars]\nx = \"[0-9]+\"\n"
                .to_owned(),
            "templates[0].vars",
            "no pattern for y",
        ),
        (
            "[[templates]]\nname = \"a\"\nsubject = \"{x}\"\nbody = \"b\"\n\
             [templates.vars]\nx = \"[0-9]+\"\nz = \".*\"\n"
                .to_owned(),
            "templates[0].vars.z",
            "not used",
        ),
        (
            "[[templates]]\nname = \"a\"\nsubject = \"{x}\"\nbody = \"b\"\n\
             [templates.vars]\nx = \"(unclosed\"\n"
                .to_owned(),
            "templates[0].vars.x",
            "not a regular expression",
        ),
        (
            // `{unsubscribe_url}` needs no pattern; `{y}` does.
            "[[templates]]\nname = \"a\"\nsubject = \"{x}\"\nbody = \"{unsubscribe_url} {y}\"\n\
             [templates.vars]\nx = \"[0-9]+\"\n"
                .to_owned(),
            "templates[0].vars",
            "has no pattern for y,",
        ),
        (
            "[policy]\nallowed_templates = [\"nope\"]\n".to_owned(),
            "policy.allowed_templates",
            "not a configured template",
        ),
        (
            "[[callers]]\nname = \"x\"\ntoken_env = \"B_TOKEN\"\nrequire_template = true\n"
                .to_owned(),
            "callers.0.require_template",
            "no [[templates]]",
        ),
    ];
    for (i, (text, key, message)) in cases.iter().enumerate() {
        let file = write(&dir, &format!("bad{i}.toml"), text);
        let e = err(Some(&file), &[("B_TOKEN", "bee-secret")]);
        assert_eq!(e.key, *key, "{text}: {e}");
        assert!(e.message.contains(message), "{text}: {e}");
    }
}

/// `[notify]`: on only with a URL, https or loopback http; the events are
/// checked; the URL is shown without its path (a webhook's key) and the
/// token redacted; each mistake names its key.
#[test]
fn notify_keys_validate_and_hide_the_webhooks_key() {
    let dir = tempfile::tempdir().unwrap();
    let c = ok(None, &[]);
    assert!(c.notify.is_none());
    let file = write(
        &dir,
        "notify.toml",
        "[notify]\nurl = \"https://hooks.example.org/services/T0/B0/KEY-IN-PATH\"\n\
         token = \"TOKEN-a8f3e1c2d4b5\"\nevents = [\"held\", \"unknown\"]\n",
    );
    let c = ok(Some(&file), &[]);
    let n = c.notify.as_ref().expect("notify");
    assert_eq!(n.url.path(), "/services/T0/B0/KEY-IN-PATH");
    assert_eq!(n.events, ["held", "unknown"]);
    assert_eq!(n.token.as_ref().unwrap().expose(), "TOKEN-a8f3e1c2d4b5");
    let shown = c.redacted["notify"].to_string();
    assert!(
        !shown.contains("KEY-IN-PATH") && !shown.contains("TOKEN-a8f3"),
        "{shown}"
    );
    // The default event, and loopback http; from the environment too.
    let c = ok(None, &[("MAILMUX_NOTIFY__URL", "http://127.0.0.1:9/hook")]);
    assert_eq!(c.notify.as_ref().unwrap().events, ["held"]);

    for (text, key, message) in [
        (
            "[notify]\nurl = \"http://hooks.example.org/x\"\n",
            "notify.url",
            "https",
        ),
        ("[notify]\nurl = \"not a url\"\n", "notify.url", "not a URL"),
        (
            "[notify]\nurl = \"https://h.example.org/\"\nevents = [\"sent\"]\n",
            "notify.events",
            "not an event",
        ),
        (
            "[notify]\nevents = [\"held\"]\n",
            "notify.url",
            "is required",
        ),
        (
            "[notify]\nurl = \"https://h.example.org/\"\nconsole_url = \"ftp://x\"\n",
            "notify.console_url",
            "not an http",
        ),
        (
            "[notify]\nurl = \"https://h.example.org/\"\nevent = [\"held\"]\n",
            "notify.event",
            "unknown key",
        ),
    ] {
        let file = write(&dir, "bad.toml", text);
        let e = err(Some(&file), &[]);
        assert_eq!(e.key, key, "{text}: {e}");
        assert!(e.message.contains(message), "{text}: {e}");
    }
}

/// `transactional` is a policy key like the others: off by default, set in
/// `[policy]` (here from the environment) or per caller, shown by `mailmux
/// config` with where it came from, and refused, naming its entry, when it
/// is not a boolean.
#[test]
fn transactional_is_a_policy_key_set_per_caller_or_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[[callers]]\nname = \"receipts\"\ntoken_env = \"R_TOKEN\"\ntransactional = true\n\n\
                [[callers]]\nname = \"news\"\ntoken_env = \"N_TOKEN\"\n";
    let file = write(&dir, "good.toml", text);
    let tokens = [("R_TOKEN", "r-secret"), ("N_TOKEN", "n-secret")];
    let c = ok(Some(&file), &tokens);
    assert!(!c.safety.policy.transactional);
    assert!(c.safety.callers[0].policy.transactional);
    assert!(!c.safety.callers[1].policy.transactional);
    assert!(!c.safety.stdio.policy.transactional);

    let mut pairs = tokens.to_vec();
    pairs.push(("MAILMUX_POLICY__TRANSACTIONAL", "true"));
    let c = ok(Some(&file), &pairs);
    assert!(c.safety.policy.transactional);
    assert!(
        c.safety.callers[1].policy.transactional,
        "inherits [policy]"
    );
    assert!(c.safety.stdio.policy.transactional);
    let (value, source) = leaf(&c, "/policy/transactional");
    assert_eq!(value, &Json::Bool(true));
    assert_eq!(source, "env var MAILMUX_POLICY__TRANSACTIONAL");

    let bad = write(
        &dir,
        "bad.toml",
        "[[callers]]\nname = \"receipts\"\ntoken_env = \"R_TOKEN\"\ntransactional = \"yes\"\n",
    );
    let e = err(Some(&bad), &tokens).to_string();
    assert!(
        e.contains("`callers[0]`") && e.contains("expected a boolean"),
        "{e}"
    );
}

/// A template's `images` are read at load, each named by its HTML as
/// `cid:ID`, and shown by `mailmux config` by path; each mistake stops the
/// load naming its key.
#[test]
fn a_templates_images_load_from_their_files_and_each_mistake_names_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let logo = dir.path().join("logo.png");
    std::fs::write(&logo, b"\x89PNG logo").unwrap();
    let entry = |html: &str, images: &str| {
        format!(
            "[[templates]]\nname = \"receipt\"\nsubject = \"s\"\nbody = \"b\"\n{html}\n\
             [templates.images]\n{images}\n"
        )
    };
    let good = entry(
        "html_body = '<img src=\"cid:logo\">'",
        &format!("logo = \"{}\"", logo.display()),
    );
    let file = write(&dir, "good.toml", &good);
    let c = ok(Some(&file), &[]);
    let t = c.daemon.compose.templates.get("receipt").unwrap();
    assert_eq!(t.image_ids().collect::<Vec<_>>(), ["logo"]);
    let shown = &c.redacted["templates"][0]["images"];
    assert_eq!(shown["logo"], logo.display().to_string(), "{shown}");

    let cases = [
        (
            entry("", &format!("logo = \"{}\"", logo.display())),
            "templates[0].images",
            "needs html_body",
        ),
        (
            entry(
                "html_body = '<img src=\"cid:logo\">'",
                "logo = \"/nonexistent/logo.png\"",
            ),
            "templates[0].images.logo",
            "cannot read",
        ),
        (
            entry(
                "html_body = '<p>no image</p>'",
                &format!("logo = \"{}\"", logo.display()),
            ),
            "templates[0].images.logo",
            "never names cid:logo",
        ),
        (
            entry(
                "html_body = '<img src=\"cid:a b\">'",
                &format!("\"a b\" = \"{}\"", logo.display()),
            ),
            "templates[0].images.a b",
            "letters, digits",
        ),
    ];
    for (i, (text, key, message)) in cases.iter().enumerate() {
        let file = write(&dir, &format!("bad{i}.toml"), text);
        let e = err(Some(&file), &[]).to_string();
        assert!(e.contains(&format!("`{key}`")), "{i}: {e}");
        assert!(e.contains(message), "{i}: {e}");
    }
}
