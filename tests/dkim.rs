//! DKIM: the real binary, configured with `[[dkim]]` keys, signs what it
//! sends from their domains, and an independent verifier (Python's dkimpy,
//! `tests/dkim_verify.py`) accepts each signature of the bytes the SMTP
//! server received, and refuses it once one byte of the body is changed.

mod common;
#[path = "../actors/tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;

use common::StdioDaemon;
use serde_json::{Value, json};
use support::fault_smtp::{FaultSmtp, Script};

/// Every signature of each message file in `dir`, by file name, with the
/// three selectors of the tests' keys published.
fn verified(dir: &std::path::Path, files: &[String]) -> BTreeMap<String, Vec<Value>> {
    let selectors = json!({
        "rsa._domainkey.example.org.": "rsa.pem",
        "ed._domainkey.example.org.": "ed.pem",
        "k8._domainkey.other.example.": "rsa8.pem",
        "idn._domainkey.xn--bcher-kva.example.": "ed.pem",
    });
    common::dkim_verified(dir, &selectors, files)
}

/// The daemon's configuration in `dir`: a store there, the relay at `port`,
/// and `dkim`, its `[[dkim]]` entries.
fn config(dir: &std::path::Path, port: u16, dkim: &str) -> String {
    format!(
        r#"
shutdown_grace = "1s"

[queue]
path = "{db}"
retry_base = "300ms"
retry_max = "1s"

[[relays]]
name = "sink"
host = "127.0.0.1"
port = {port}
tls = "none"
timeout = "3s"
backoff_base = "50ms"
backoff_max = "200ms"
probe_interval = "200ms"
{dkim}"#,
        db = dir.join("queue.db").display(),
    )
}

/// One `[[dkim]]` entry for the key file `key` in `dir`.
fn entry(dir: &std::path::Path, domain: &str, selector: &str, key: &str) -> String {
    format!(
        "\n[[dkim]]\ndomain = \"{domain}\"\nselector = \"{selector}\"\nprivate_key = \"{}\"\n",
        dir.join(key).display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_from_a_configured_domain_is_signed_and_an_independent_verifier_accepts_it() {
    let dir = tempfile::tempdir().unwrap();
    common::dkim_keys(dir.path());
    let smtp = FaultSmtp::start(Script::ok()).await;
    let dkim = [
        entry(dir.path(), "example.org", "rsa", "rsa.pem"),
        entry(dir.path(), "example.org", "ed", "ed.pem"),
        entry(dir.path(), "other.example", "k8", "rsa8.pem"),
        "headers = [\"From\", \"Subject\", \"Date\"]\n".into(),
        // Configured as written, it signs as its A-labels.
        entry(dir.path(), "bücher.example", "idn", "ed.pem"),
    ]
    .concat();
    let config = config(dir.path(), smtp.port(), &dkim);
    let d = StdioDaemon::start(dir.path(), &config).await;

    // A message with everything that changes bytes on the way: dot lines,
    // long and non-ASCII lines, trailing spaces, HTML, an attachment, the
    // unsubscribe fields and fields of the caller's own.
    let body = format!(
        ".\r\n..leading dots\r\ntrailing spaces   \r\n{}\r\nZoë 日本語\r\n\r\n\r\n",
        "x".repeat(1200)
    );
    let sends = [
        (
            "full",
            json!({
                "from_email": "Alerts <alerts@example.org>",
                "to": ["a@dest.example"], "cc": ["c@dest.example"], "bcc": ["b@dest.example"],
                "subject": "Ünïcode subject, folded: {n}".replace("{n}", &"word ".repeat(30)),
                "body": body, "html_body": "<p>hi</p>",
                "attachments": [{ "filename": "a.txt", "content_base64": "aGVsbG8=" }],
                "list_unsubscribe": "https://example.org/u/1", "list_unsubscribe_post": true,
                "headers": { "Auto-Submitted": "auto-generated", "X-Ticket": "T-1" },
            }),
        ),
        (
            "subdomain",
            json!({ "from_email": "a@mail.EXAMPLE.org", "to": ["a@dest.example"], "subject": "s", "body": "b" }),
        ),
        (
            "other",
            json!({ "from_email": "x@other.example", "to": ["a@dest.example"], "subject": "s", "body": "b" }),
        ),
        (
            "idn",
            json!({ "from_email": "x@bücher.example", "to": ["a@dest.example"], "subject": "s", "body": "b" }),
        ),
        (
            "idn-ascii",
            json!({ "from_email": "x@xn--bcher-kva.example", "to": ["a@dest.example"], "subject": "s", "body": "b" }),
        ),
        (
            "unsigned",
            json!({ "from_email": "x@unsigned.example", "to": ["a@dest.example"], "subject": "s", "body": "b" }),
        ),
        (
            "lookalike",
            json!({ "from_email": "x@badexample.org", "to": ["a@dest.example"], "subject": "s", "body": "b" }),
        ),
    ];
    let mut ids = BTreeMap::new();
    for (name, args) in sends {
        let r = d.call("send_email", args).await;
        assert_eq!(r["status"], "sent", "{name}: {r}");
        ids.insert(
            r["message_id"].as_str().unwrap().to_string(),
            name.to_string(),
        );
    }
    let batch = d
        .call(
            "send_batch",
            json!({
                "defaults": { "from_email": "news@example.org", "subject": "Hi {name}", "body": "Dear {name}," },
                "messages": [
                    { "to": ["p@dest.example"], "template_vars": { "name": "Pia" } },
                    { "to": ["q@dest.example"], "template_vars": { "name": "Quinn" } },
                ],
            }),
        )
        .await;
    for (i, r) in batch["results"].as_array().unwrap().iter().enumerate() {
        assert_eq!(r["status"], "sent", "{batch}");
        ids.insert(
            r["message_id"].as_str().unwrap().to_string(),
            format!("batch{i}"),
        );
    }
    d.stop().await;

    let mut files = Vec::new();
    for t in smtp.delivered() {
        let id = t.message_id.clone().unwrap();
        let name = &ids[id.trim_matches(['<', '>'])];
        std::fs::write(dir.path().join(name), &t.data).unwrap();
        files.push(name.clone());
    }
    assert_eq!(files.len(), 9, "{files:?}");
    let got = verified(dir.path(), &files);

    let summary = |name: &str| -> Vec<(String, String, String, bool, bool)> {
        got[name]
            .iter()
            .map(|s| {
                (
                    s["d"].as_str().unwrap().to_string(),
                    s["s"].as_str().unwrap().to_string(),
                    s["a"].as_str().unwrap().to_string(),
                    s["verified"].as_bool().unwrap(),
                    s["verified_with_a_changed_body"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    let both = vec![
        (
            "example.org".into(),
            "rsa".into(),
            "rsa-sha256".into(),
            true,
            false,
        ),
        (
            "example.org".into(),
            "ed".into(),
            "ed25519-sha256".into(),
            true,
            false,
        ),
    ];
    for name in ["full", "subdomain", "batch0", "batch1"] {
        assert_eq!(summary(name), both, "{name}");
    }
    assert_eq!(
        summary("other"),
        vec![(
            "other.example".into(),
            "k8".into(),
            "rsa-sha256".into(),
            true,
            false
        )]
    );
    // An internationalised sender's domain, in either form, is the key's.
    for name in ["idn", "idn-ascii"] {
        assert_eq!(
            summary(name),
            vec![(
                "xn--bcher-kva.example".into(),
                "idn".into(),
                "ed25519-sha256".into(),
                true,
                false
            )],
            "{name}"
        );
    }
    assert_eq!(got["unsigned"], Vec::<Value>::new());
    assert_eq!(got["lookalike"], Vec::<Value>::new());

    // The default fields signed, From twice, the unsubscribe fields among
    // them; the configured ones where a key names its own.
    let signed: Vec<String> = got["full"][0]["h"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().to_ascii_lowercase())
        .collect();
    for field in [
        "from",
        "subject",
        "date",
        "to",
        "cc",
        "message-id",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "auto-submitted",
        "mime-version",
        "content-type",
    ] {
        assert!(signed.contains(&field.to_string()), "{field} in {signed:?}");
    }
    assert_eq!(
        signed.iter().filter(|h| *h == "from").count(),
        2,
        "{signed:?}"
    );
    assert!(
        !signed.iter().any(|h| h == "bcc" || h == "x-ticket"),
        "{signed:?}"
    );
    assert_eq!(got["full"][0]["c"], "relaxed/relaxed");
    let mut other: Vec<String> = got["other"][0]["h"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().to_ascii_lowercase())
        .collect();
    other.sort();
    assert_eq!(other, ["date", "from", "subject"]);
    // Bcc is still in the envelope only.
    let full = std::fs::read_to_string(dir.path().join("full")).unwrap();
    assert!(!full.contains("b@dest.example"));
}

/// Messages signed and stored, then the daemon killed with SIGKILL before
/// any was delivered: after the restart each goes out once, with its own
/// header fields and the signature it was stored with, which still verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_mail_survives_a_sigkill_and_goes_out_once_still_verifying() {
    use support::fault_smtp::{Action, Phase, copies};
    let dir = tempfile::tempdir().unwrap();
    common::dkim_keys(dir.path());
    // The relay holds every attempt at MAIL: nothing is delivered.
    let smtp = FaultSmtp::start(Script::ok().on(Phase::Mail, Action::Hang)).await;
    let config = config(
        dir.path(),
        smtp.port(),
        &entry(dir.path(), "example.org", "rsa", "rsa.pem"),
    );
    let d = StdioDaemon::start(dir.path(), &config).await;
    let mut tickets = BTreeMap::new();
    for i in 0..5 {
        let r = d
            .call(
                "send_email",
                json!({
                    "from_email": "ops@example.org", "to": ["a@dest.example"],
                    "subject": format!("ticket {i}"), "body": "stored, then sent",
                    "headers": { "X-Ticket": format!("T-{i}"), "Auto-Submitted": "auto-generated" },
                    "wait": false,
                }),
            )
            .await;
        assert_eq!(r["status"], "queued", "{r}");
        tickets.insert(
            r["message_id"].as_str().unwrap().to_string(),
            format!("T-{i}"),
        );
    }
    assert!(
        support::wait_until(
            || smtp.commands(Phase::Mail) >= 1,
            std::time::Duration::from_secs(20)
        )
        .await,
        "no attempt reached MAIL"
    );
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    d.kill().await;
    assert!(smtp.delivered().is_empty());

    smtp.set_script(Script::ok());
    let d = StdioDaemon::start(dir.path(), &config).await;
    assert!(
        support::wait_until(
            || smtp.delivered().len() >= tickets.len(),
            std::time::Duration::from_secs(30)
        )
        .await,
        "{} of {} delivered",
        smtp.delivered().len(),
        tickets.len()
    );
    // The server has each message; its outcome is stored a moment after
    // the server's reply.
    for id in tickets.keys() {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let s = loop {
            let s = d
                .call("get_message_status", json!({ "message_id": id }))
                .await;
            if s["status"] != "sending" || std::time::Instant::now() > deadline {
                break s;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert_eq!(s["status"], "sent", "{s}");
    }
    d.stop().await;

    let got = smtp.delivered();
    let seen = copies(&got);
    assert_eq!(seen.len(), tickets.len(), "{seen:?}");
    let mut files = Vec::new();
    for t in &got {
        let id = t.message_id.clone().unwrap();
        let id = id.trim_matches(['<', '>']);
        assert_eq!(seen.get(id), Some(&1), "{id} once");
        let text = String::from_utf8_lossy(&t.data);
        assert!(
            text.contains(&format!("\r\nX-Ticket: {}\r\n", tickets[id])),
            "{text}"
        );
        std::fs::write(dir.path().join(id), &t.data).unwrap();
        files.push(id.to_string());
    }
    let verified = verified(dir.path(), &files);
    for (id, sigs) in &verified {
        assert_eq!(sigs.len(), 1, "{id}: {sigs:?}");
        assert_eq!(sigs[0]["verified"], true, "{id}: {sigs:?}");
        assert_eq!(sigs[0]["verified_with_a_changed_body"], false);
        let h: Vec<String> = sigs[0]["h"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap().to_ascii_lowercase())
            .collect();
        assert!(h.contains(&"auto-submitted".to_string()), "{h:?}");
    }
    // Signed when it was stored, before the kill, not again at the retry.
    for t in &got {
        let text = String::from_utf8_lossy(&t.data);
        let sig = text
            .split("\r\n")
            .skip_while(|l| !l.starts_with("DKIM-Signature:"))
            .take_while(|l| l.starts_with("DKIM-Signature:") || l.starts_with([' ', '\t']))
            .collect::<String>();
        let t_tag: u64 = sig
            .split(';')
            .find_map(|tag| tag.trim().strip_prefix("t="))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no t= in {sig}"));
        assert!(
            t_tag <= killed_at,
            "t={t_tag} after the kill at {killed_at}"
        );
    }
}

/// Key rotation: a new selector and key in the file, and a reload. The
/// next message is signed with the new key only, and verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_signs_with_the_rotated_key() {
    let dir = tempfile::tempdir().unwrap();
    common::dkim_keys(dir.path());
    let smtp = FaultSmtp::start(Script::ok()).await;
    let config = |selector: &str, key: &str| {
        config(
            dir.path(),
            smtp.port(),
            &entry(dir.path(), "example.org", selector, key),
        )
    };
    let d = StdioDaemon::start(dir.path(), &config("rsa", "rsa.pem")).await;
    let send = |subject: &'static str| json!({ "from_email": "a@example.org", "to": ["b@dest.example"], "subject": subject, "body": "b" });
    let r = d.call("send_email", send("before")).await;
    assert_eq!(r["status"], "sent", "{r}");
    // The new key: the record of selector k8 at example.org.
    let selectors = config("k8", "rsa8.pem");
    std::fs::write(dir.path().join("mailmux.toml"), &selectors).unwrap();
    let r = d.call("reload_smtp_configuration", json!({})).await;
    assert_eq!(r["reloaded"], true, "{r}");
    assert_eq!(r["daemon_changed"], true, "{r}");
    let r = d.call("send_email", send("after")).await;
    assert_eq!(r["status"], "sent", "{r}");
    // A key that cannot be read refuses the reload, naming it; the running
    // key goes on signing.
    std::fs::write(dir.path().join("mailmux.toml"), config("k9", "missing.pem")).unwrap();
    let r = d.call("reload_smtp_configuration", json!({})).await;
    assert_eq!(r["reloaded"], false, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("dkim[0].private_key")),
        "{r}"
    );
    let r = d.call("send_email", send("still")).await;
    assert_eq!(r["status"], "sent", "{r}");
    d.stop().await;

    let got = smtp.delivered();
    assert_eq!(got.len(), 3);
    assert!(String::from_utf8_lossy(&got[2].data).contains("s=k8;"));
    std::fs::write(dir.path().join("before"), &got[0].data).unwrap();
    std::fs::write(dir.path().join("after"), &got[1].data).unwrap();
    // Both records published, as during a rotation.
    let selectors = json!({
        "rsa._domainkey.example.org.": "rsa.pem",
        "k8._domainkey.example.org.": "rsa8.pem",
    });
    let got = common::dkim_verified(dir.path(), &selectors, &["before".into(), "after".into()]);
    let signed = |name: &str| -> Vec<(String, bool)> {
        got[name]
            .iter()
            .map(|s| {
                (
                    s["s"].as_str().unwrap().to_string(),
                    s["verified"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(signed("before"), vec![("rsa".to_string(), true)]);
    assert_eq!(signed("after"), vec![("k8".to_string(), true)]);
}

/// `mailmux dkim` prints each key's DNS record as a zone file line, and the
/// record is the one the key's maker published: the public key as
/// Python's cryptography encodes it (SubjectPublicKeyInfo for RSA, the raw
/// key for Ed25519), in strings DNS takes (at most 255 characters).
#[test]
fn the_dkim_command_prints_the_record_of_each_key() {
    let dir = tempfile::tempdir().unwrap();
    common::dkim_keys(dir.path());
    let keys = [
        ("example.org", "rsa", "rsa.pem"),
        ("other.example", "k8", "rsa8.pem"),
        ("Bücher.example", "ed", "ed.pem"),
    ];
    let dkim: String = keys
        .iter()
        .map(|(domain, selector, key)| entry(dir.path(), domain, selector, key))
        .collect();
    let path = dir.path().join("mailmux.toml");
    std::fs::write(&path, config(dir.path(), 9, &dkim)).unwrap();
    let dkim_command = |path: &std::path::Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailmux"))
            .arg("--config")
            .arg(path)
            .arg("dkim")
            .env_remove("MAILMUX_CONFIG")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let (code, stdout, stderr) = dkim_command(&path);
    assert_eq!(code, Some(0), "{stderr}");

    let records: BTreeMap<String, String> =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("records.json")).unwrap())
            .unwrap();
    let names = [
        "rsa._domainkey.example.org.",
        "k8._domainkey.other.example.",
        "ed._domainkey.xn--bcher-kva.example.",
    ];
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), keys.len(), "{stdout}");
    for ((line, name), (_, _, key)) in lines.iter().zip(names).zip(keys) {
        let strings = line
            .strip_prefix(&format!("{name} IN TXT "))
            .unwrap_or_else(|| panic!("{line}"));
        let parts: Vec<&str> = strings
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .unwrap_or_else(|| panic!("{line}"))
            .split("\" \"")
            .collect();
        assert!(parts.iter().all(|p| p.len() <= 255), "{line}");
        assert_eq!(parts.concat(), records[key], "{key}");
    }
    assert!(!stdout.contains("PRIVATE"), "{stdout}");

    // No key configured: an error, and nothing on stdout.
    std::fs::write(&path, config(dir.path(), 9, "")).unwrap();
    let (code, stdout, stderr) = dkim_command(&path);
    assert_eq!(code, Some(1));
    assert_eq!(stdout, "");
    assert!(stderr.contains("no [[dkim]] keys"), "{stderr}");
}
