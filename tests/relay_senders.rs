//! A relay's `senders`: the real binary over stdio, three SMTP servers, and
//! mail from each sender arriving only at the server of a relay that
//! carries it, on first choice and on failover; a sender no relay carries
//! (or a relay asked for that does not carry it) refused with nothing sent;
//! stored mail whose relays a reload removed waiting for them; mail
//! recovered after a SIGKILL keeping its return path, DSN parameters and
//! caller's sender.

mod common;
#[path = "../actors/tests/support/mod.rs"]
mod support;

use common::StdioDaemon;
use serde_json::{Value, json};
use support::fault_smtp::{FaultSmtp, Script};

/// One relay entry: `name` at `port`, of `priority`, carrying `senders`
/// (none: any sender).
fn relay(name: &str, port: u16, priority: i32, senders: &[&str]) -> String {
    let senders = if senders.is_empty() {
        String::new()
    } else {
        format!("senders = {}\n", json!(senders))
    };
    format!(
        "\n[[relays]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\n\
         priority = {priority}\ntimeout = \"2s\"\nbackoff_base = \"50ms\"\nbackoff_max = \"200ms\"\n{senders}"
    )
}

fn config(dir: &std::path::Path, relays: &[String]) -> String {
    format!(
        "shutdown_grace = \"1s\"\nfrom_email = \"default@c.example\"\n\n[queue]\npath = \"{}\"\n{}",
        dir.join("queue.db").display(),
        relays.concat()
    )
}

fn mail(from: &str, subject: &str) -> Value {
    json!({ "from_email": from, "to": ["rcpt@dest.example"], "subject": subject, "body": "b" })
}

/// One `send_batch` of a message from each sender, with its subject.
async fn send_batch(d: &StdioDaemon, messages: &[(&str, &str)]) -> Value {
    let messages: Vec<Value> = messages
        .iter()
        .map(|(from, subject)| json!({ "from_email": from, "subject": subject }))
        .collect();
    d.call(
        "send_batch",
        json!({ "defaults": { "to": ["rcpt@dest.example"], "body": "b" }, "messages": messages }),
    )
    .await
}

/// Asserts that `error` is the refusal of `field` by `rule`.
fn assert_refused(error: &Value, field: &str, rule: &str) {
    assert_eq!(error["code"], "invalid_input", "{error}");
    assert_eq!(error["field"], field, "{error}");
    assert_eq!(error["rule"], rule, "{error}");
}

/// The subjects each server received, in order.
fn subjects(sink: &FaultSmtp) -> Vec<String> {
    sink.delivered()
        .iter()
        .map(|t| {
            let text = String::from_utf8_lossy(&t.data);
            text.lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_goes_only_through_relays_that_carry_its_sender() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, f) = (
        FaultSmtp::start(Script::ok()).await,
        FaultSmtp::start(Script::ok()).await,
        FaultSmtp::start(Script::ok()).await,
    );
    let relays = |a_senders: &[&str], fallback: bool| {
        let mut r = vec![
            relay("brand-a", a.port(), 10, a_senders),
            // Bounces of brand-b's mail go to one address of its own.
            relay("brand-b", b.port(), 5, &["@b.example", "@*.b.example"])
                + "return_path = \"bounces@b.example\"\n",
        ];
        if fallback {
            r.push(relay("fallback", f.port(), 1, &[]));
        }
        config(dir.path(), &r)
    };
    let d = StdioDaemon::start(dir.path(), &relays(&["@a.example"], true)).await;

    // Each sender through the relays that carry it, whatever the priority.
    for (from, subject) in [
        ("x@a.example", "a1"),
        ("x@news.b.example", "b1"),
        ("x@B.example", "b2"),
        ("x@c.example", "f1"),
    ] {
        let r = d.call("send_email", mail(from, subject)).await;
        assert_eq!(r["status"], "sent", "{from}: {r}");
    }
    // The configured default sender, which only the fallback carries.
    let r = d
        .call(
            "send_email",
            json!({ "to": ["rcpt@dest.example"], "subject": "f2", "body": "b" }),
        )
        .await;
    assert_eq!(r["relay"], "fallback", "{r}");

    // A relay asked for that does not carry the sender: refused, named.
    let mut asked = mail("x@a.example", "never");
    asked["relay"] = json!("brand-b");
    let r = d.call("send_email", asked).await;
    assert_refused(&r["error"], "relay", "relay_not_for_sender");

    // A batch: each message through its own sender's relays.
    let batch = send_batch(
        &d,
        &[
            ("y@a.example", "a2"),
            ("y@b.example", "b3"),
            ("y@c.example", "f3"),
        ],
    )
    .await;
    assert_eq!(batch["summary"], json!({ "sent": 3 }), "{batch}");

    // A dry run names a relay that carries the sender.
    let mut dry = mail("z@b.example", "dry");
    dry["dry_run"] = json!(true);
    let r = d.call("send_email", dry).await;
    assert_eq!(r["status"], "dry_run", "{r}");
    assert_eq!(r["relay"], "brand-b", "{r}");

    // A pinned relay goes first only for the mail it carries.
    let r = d
        .call("switch_smtp_server", json!({ "server_name": "brand-b" }))
        .await;
    assert_eq!(r["pinned"], "brand-b", "{r}");
    let r = d.call("send_email", mail("x@a.example", "ap")).await;
    assert_eq!(r["relay"], "brand-a", "{r}");
    d.call("switch_smtp_server", json!({ "server_name": "auto" }))
        .await;

    // A reload that would leave the default sender to no relay is refused,
    // and the running configuration stays.
    let write = |a_senders: &[&str]| {
        std::fs::write(dir.path().join("mailmux.toml"), relays(a_senders, false)).unwrap()
    };
    write(&["@a.example", "ops@c.example"]);
    let r = d.call("reload_smtp_configuration", json!({})).await;
    assert_eq!(r["reloaded"], false, "{r}");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(message.contains("`from_email`"), "{message}");
    // No fallback, and brand-a carries the default sender at c.example.
    write(&["@a.example", "default@c.example"]);
    let r = d.call("reload_smtp_configuration", json!({})).await;
    assert_eq!(r["reloaded"], true, "{r}");
    assert_eq!(r["removed"], json!(["fallback"]), "{r}");
    assert_eq!(r["changed"], json!(["brand-a"]), "{r}");
    let r = d.call("send_email", mail("x@c.example", "never")).await;
    assert_refused(&r["error"], "from_email", "no_relay_for_sender");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(message.contains("x@c.example"), "{message}");
    assert!(
        !message.contains("default@c.example"),
        "no configured address: {message}"
    );
    let r = d.call("send_email", mail("default@c.example", "a3")).await;
    assert_eq!(r["relay"], "brand-a", "{r}");
    // In a batch, the message no relay carries is refused on its own.
    let batch = send_batch(&d, &[("y@b.example", "b4"), ("y@c.example", "never")]).await;
    assert_eq!(batch["results"][0]["status"], "sent", "{batch}");
    assert_refused(
        &batch["results"][1]["error"],
        "messages[1].from_email",
        "no_relay_for_sender",
    );
    d.stop().await;

    assert_eq!(subjects(&a), ["a1", "a2", "ap", "a3"]);
    assert_eq!(subjects(&b), ["b1", "b2", "b3", "b4"]);
    assert_eq!(subjects(&f), ["f1", "f2", "f3"]);
    // The envelope sender: brand-b's return path, else the message's sender;
    // the From field is the sender's either way.
    let envelope = |sink: &FaultSmtp| -> Vec<String> {
        sink.delivered()
            .iter()
            .map(|t| t.mail_from.clone())
            .collect()
    };
    assert_eq!(envelope(&b), ["bounces@b.example"; 4]);
    assert_eq!(
        envelope(&a),
        [
            "x@a.example",
            "y@a.example",
            "x@a.example",
            "default@c.example"
        ]
    );
    let first_b = String::from_utf8_lossy(&b.delivered()[0].data).into_owned();
    assert!(first_b.contains("From: x@news.b.example"), "{first_b}");
    // Nothing refused was stored either.
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_mailmux"))
        .arg("--config")
        .arg(dir.path().join("mailmux.toml"))
        .args(["queue", "list", "--json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{text}");
    assert!(!text.contains("never"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_is_down_fails_over_only_to_relays_that_carry_the_sender() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = (
        FaultSmtp::start(Script::ok()).await,
        FaultSmtp::start(Script::ok()).await,
    );
    let down = common::free_port();
    let d = StdioDaemon::start(
        dir.path(),
        &config(
            dir.path(),
            &[
                relay("brand-a", down, 10, &["@a.example"]),
                relay("brand-b", b.port(), 5, &["@b.example"]),
                relay("fallback", f.port(), 1, &[]),
            ],
        ),
    )
    .await;
    for i in 0..3 {
        let r = d
            .call("send_email", mail("x@a.example", &format!("a{i}")))
            .await;
        assert_eq!(r["status"], "sent", "{r}");
        assert_eq!(r["relay"], "fallback", "{r}");
    }
    d.stop().await;
    assert_eq!(subjects(&f), ["a0", "a1", "a2"]);
    assert_eq!(b.delivered().len(), 0, "brand-b never carries a.example");
}

/// Mail accepted, then the daemon killed with SIGKILL while its relay held
/// the messages at MAIL: after the restart, with that relay gone down, each
/// message goes out once, only through a relay that carries its sender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigkill_stored_mail_keeps_to_the_relays_of_its_sender() {
    use std::collections::BTreeMap;
    use support::fault_smtp::{Action, Phase};
    let dir = tempfile::tempdir().unwrap();
    let a = FaultSmtp::start(Script::ok().on(Phase::Mail, Action::Hang)).await;
    let (b, f) = (
        FaultSmtp::start(Script::ok()).await,
        FaultSmtp::start(Script::ok()).await,
    );
    let relays = |a_port: u16| {
        config(
            dir.path(),
            &[
                relay("brand-a", a_port, 10, &["@a.example"]),
                relay("brand-b", b.port(), 5, &["@b.example"]),
                relay("fallback", f.port(), 1, &[]),
            ],
        )
    };
    let d = StdioDaemon::start(dir.path(), &relays(a.port())).await;
    let mut sender_of = BTreeMap::new();
    for i in 0..20 {
        let from = if i % 2 == 0 {
            "x@a.example"
        } else {
            "x@b.example"
        };
        let mut args = mail(from, &format!("m{i}"));
        args["wait"] = json!(false);
        let r = d.call("send_email", args).await;
        assert_eq!(r["status"], "queued", "{r}");
        sender_of.insert(format!("<{}>", r["message_id"].as_str().unwrap()), from);
    }
    assert!(
        support::wait_until(
            || a.commands(Phase::Mail) >= 1,
            std::time::Duration::from_secs(20)
        )
        .await,
        "no attempt reached brand-a's MAIL"
    );
    // brand-b's mail is out before the kill, so none is caught in flight
    // (which would leave it `unknown`, rightly never resent).
    assert!(
        support::wait_until(
            || b.delivered().len() >= 10,
            std::time::Duration::from_secs(20)
        )
        .await,
        "brand-b's mail delivered"
    );
    d.kill().await;

    let d = StdioDaemon::start(dir.path(), &relays(common::free_port())).await;
    let delivered = || b.delivered().len() + f.delivered().len();
    assert!(
        support::wait_until(|| delivered() >= 20, std::time::Duration::from_secs(30)).await,
        "{} of 20 delivered",
        delivered()
    );
    // Settle: no copy more arrives.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    d.stop().await;

    assert!(a.delivered().is_empty());
    let mut copies: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (sink, name) in [(&b, "brand-b"), (&f, "fallback")] {
        for t in sink.delivered() {
            copies
                .entry(t.message_id.clone().unwrap())
                .or_default()
                .push(name);
        }
    }
    assert_eq!(copies.len(), 20, "every message delivered: {copies:?}");
    for (id, at) in &copies {
        assert_eq!(at.len(), 1, "{id} delivered {} times", at.len());
        if sender_of[id] == "x@a.example" {
            assert_eq!(at[0], "fallback", "{id} from a.example went to {}", at[0]);
        }
    }
    let at_b = b.delivered().len();
    println!(
        "20 accepted; at brand-b {at_b}, at the fallback {}; none twice",
        f.delivered().len()
    );
}

/// A reload that removes every relay a stored message may take: the message
/// waits, queued, and its status says why; a reload that brings the relay
/// back delivers it, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_whose_relays_a_reload_removed_waits_for_them_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (a, c) = (
        FaultSmtp::start(Script::ok()).await,
        FaultSmtp::start(Script::ok()).await,
    );
    let write = |with_a: bool| {
        let mut relays = vec![relay("brand-c", c.port(), 1, &["@c.example"])];
        if with_a {
            relays.push(relay("brand-a", a.port(), 5, &["@a.example"]));
        }
        let cfg = config(dir.path(), &relays).replacen(
            "[queue]\n",
            "[queue]\nretry_base = \"500ms\"\nretry_max = \"1s\"\n",
            1,
        );
        std::fs::write(dir.path().join("mailmux.toml"), &cfg).unwrap();
        cfg
    };
    let d = StdioDaemon::start(dir.path(), &write(true)).await;
    let mut args = mail("x@a.example", "later");
    args["send_at"] = json!("2s");
    let r = d.call("send_email", args).await;
    assert_eq!(r["status"], "scheduled", "{r}");
    let id = r["message_id"].as_str().unwrap().to_string();
    write(false);
    let r = d.call("reload_smtp_configuration", json!({})).await;
    assert_eq!(r["removed"], json!(["brand-a"]), "{r}");

    let status = || d.call("get_message_status", json!({ "message_id": id }));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    // Read while it waits for its next attempt: each attempt finds the
    // message `sending` for a moment, with the last attempt's note.
    let s = loop {
        let s = status().await;
        if s.to_string().contains("is configured now") && s["status"] != "sending" {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "still {s}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(s["status"], "queued", "{s}");
    assert!(s["next_attempt_at"].is_string(), "{s}");
    assert!(
        s.to_string()
            .contains("none of the relays that may take it (brand-a) is configured now"),
        "{s}"
    );
    assert!(
        c.delivered().is_empty(),
        "not through another sender's relay"
    );

    write(true);
    let r = d.call("reload_smtp_configuration", json!({})).await;
    assert_eq!(r["added"], json!(["brand-a"]), "{r}");
    assert!(
        support::wait_until(
            || !a.delivered().is_empty(),
            std::time::Duration::from_secs(15)
        )
        .await,
        "not delivered once brand-a came back"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while status().await["status"] != "sent" {
        assert!(std::time::Instant::now() < deadline, "{}", status().await);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    d.stop().await;
    assert_eq!(subjects(&a), ["later"]);
    assert!(c.delivered().is_empty());
}

/// A message caught in flight by a SIGKILL, before any "." was sent, goes
/// out once after the restart with everything its relay and its caller
/// set: the caller's own sender, the relay's return path as the envelope
/// sender, and the DSN parameters (RET, ENVID, NOTIFY, ORCPT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigkill_recovered_mail_keeps_its_return_path_dsn_and_callers_sender() {
    use support::fault_smtp::{Action, Options, Phase};
    let dir = tempfile::tempdir().unwrap();
    let a = FaultSmtp::start_with(
        Script::ok().on(Phase::Rcpt, Action::Hang),
        Options {
            dsn: true,
            ..Options::default()
        },
    )
    .await;
    let cfg = config(
        dir.path(),
        &[relay("brand-a", a.port(), 1, &[]).replacen(
            "timeout = \"2s\"\n",
            "timeout = \"30s\"\nreturn_path = \"bounces@a.example\"\n\
             dsn_notify = [\"failure\", \"delay\"]\ndsn_ret = \"hdrs\"\n",
            1,
        )],
    )
    .replacen(
        "\n[queue]",
        &format!(
            "\n[[callers]]\nname = \"local\"\ntoken_sha256 = \"{}\"\nfrom_email = \"agent-7@a.example\"\n\n[queue]",
            "0".repeat(64)
        ),
        1,
    );
    let d = StdioDaemon::start(dir.path(), &cfg).await;
    let r = d
        .call(
            "send_email",
            json!({ "to": ["rcpt@dest.example"], "subject": "kept", "body": "b", "wait": false }),
        )
        .await;
    assert_eq!(r["status"], "queued", "{r}");
    let id = r["message_id"].as_str().unwrap().to_string();
    assert!(
        support::wait_until(
            || a.commands(Phase::Rcpt) >= 1,
            std::time::Duration::from_secs(20)
        )
        .await,
        "no attempt reached RCPT"
    );
    d.kill().await;

    a.set_script(Script::ok());
    let d = StdioDaemon::start(dir.path(), &cfg).await;
    assert!(
        support::wait_until(
            || !a.delivered().is_empty(),
            std::time::Duration::from_secs(30)
        )
        .await,
        "not delivered after the restart"
    );
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let s = d
        .call("get_message_status", json!({ "message_id": id }))
        .await;
    d.stop().await;
    assert_eq!(s["status"], "sent", "{s}");
    assert_eq!(s["envelope"]["from"], "agent-7@a.example", "{s}");

    let got = a.delivered();
    assert_eq!(got.len(), 1, "once: {got:?}");
    assert_eq!(got[0].mail_from, "bounces@a.example");
    assert_eq!(got[0].message_id.as_deref(), Some(&*format!("<{id}>")));
    let text = String::from_utf8_lossy(&got[0].data).into_owned();
    assert!(text.contains("From: agent-7@a.example"), "{text}");
    // Every MAIL and RCPT, before the kill and after it, asked alike.
    let (mail, rcpt) = (a.mail_args(), a.rcpt_args());
    assert_eq!(mail.len(), 2, "{mail:?}");
    assert_eq!(rcpt.len(), 2, "{rcpt:?}");
    for m in &mail {
        assert!(m.contains("RET=HDRS"), "{m}");
        assert!(m.contains(&format!("ENVID={id}")), "{m}");
    }
    for r in &rcpt {
        assert!(r.contains("NOTIFY=FAILURE,DELAY"), "{r}");
        assert!(r.contains("ORCPT=rfc822;rcpt@dest.example"), "{r}");
    }
}
