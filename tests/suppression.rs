//! The suppression list: the real binary over stdio and a fault-injecting
//! SMTP server. A recipient the server refuses as unknown (5.1.1) is listed
//! and refused at the next call, with nothing stored or sent; a refusal for
//! another reason lists nothing; the list survives a SIGKILL; an operator
//! adds and removes addresses with `mailmux queue suppress` while the daemon
//! runs, and the daemon heeds each change; a recipient listed while it
//! waits for a retry is not sent to; an entry the store cannot write yet is
//! written once it can.

mod common;
#[path = "../actors/tests/support/mod.rs"]
mod support;

use std::time::Duration;

use common::StdioDaemon;
use serde_json::{Value, json};
use support::fault_smtp::{Action, FaultSmtp, Script};

fn config(dir: &std::path::Path, port: u16, extra: &str) -> String {
    format!(
        "shutdown_grace = \"1s\"\nfrom_email = \"agent@example.org\"\n\n[queue]\npath = \"{}\"\n{extra}\n\
         [[relays]]\nname = \"main\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\ntimeout = \"2s\"\n",
        dir.join("queue.db").display(),
    )
}

fn script() -> Script {
    Script::ok()
        .on_rcpt(
            "gone@dest.example",
            Action::reply(550, "5.1.1 no such user"),
        )
        .on_rcpt(
            "policy@dest.example",
            Action::reply(550, "5.7.1 not allowed"),
        )
}

fn mail(subject: &str, fields: Value) -> Value {
    let mut m = json!({ "subject": subject, "body": "b" });
    if let (Value::Object(m), Value::Object(f)) = (&mut m, fields) {
        m.extend(f);
    }
    m
}

/// The first call: one recipient the server takes, one it refuses as
/// unknown, one for a policy of its own.
fn first_call() -> Value {
    mail(
        "first",
        json!({
            "to": ["ok@dest.example", "gone@dest.example", "policy@dest.example"],
            "idempotency_key": "first-call",
        }),
    )
}

/// A folder, the fault-injecting server of [`script`], the audit log's
/// path and a configuration that writes it.
async fn audited() -> (tempfile::TempDir, FaultSmtp, std::path::PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let smtp = FaultSmtp::start(script()).await;
    let audit = dir.path().join("audit.jsonl");
    let cfg = config(
        dir.path(),
        smtp.port(),
        &format!("\n[audit]\npath = \"{}\"\n", audit.display()),
    );
    (dir, smtp, audit, cfg)
}

/// The stored messages (`queue list --json`), oldest first.
fn stored(dir: &std::path::Path) -> Vec<Value> {
    let (code, out, err) = common::queue_cmd(dir, &["list", "--json", "--limit", "1000"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let mut list: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    list.reverse();
    list
}

/// `queue suppress list --json`.
fn listed(dir: &std::path::Path) -> Vec<Value> {
    let (code, out, err) = common::queue_cmd(dir, &["suppress", "list", "--json"]);
    assert_eq!(code, Some(0), "{out}{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Asserts that `error` refuses `field` as suppressed for `reason`.
fn assert_suppressed(error: &Value, field: &str, reason: &str) {
    assert_eq!(error["code"], "recipient_suppressed", "{error}");
    assert_eq!(error["field"], field, "{error}");
    assert_eq!(error["rule"], reason, "{error}");
}

/// A dry run to `to` until its answer is refused (`refused`) or not,
/// within 10 s: a dry run stores and sends nothing.
async fn until_dry_run(d: &StdioDaemon, to: &str, refused: bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = d
            .call(
                "send_email",
                mail("dry", json!({ "to": [to], "dry_run": true })),
            )
            .await;
        if (r["error"]["code"] == "recipient_suppressed") == refused {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{to}: still {r} after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The subjects the server took, in order.
fn subjects(smtp: &FaultSmtp) -> Vec<String> {
    smtp.delivered()
        .iter()
        .map(|t| {
            String::from_utf8_lossy(&t.data)
                .lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_owned))
                .unwrap_or_default()
        })
        .collect()
}

/// How many stored messages have `address` among their recipients.
fn stored_to(list: &[Value], address: &str) -> usize {
    list.iter()
        .filter(|m| {
            m["recipients"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r == address)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_refused_as_unknown_is_suppressed_until_an_operator_removes_it() {
    let (dir, smtp, audit, cfg) = audited().await;
    let d = StdioDaemon::start(dir.path(), &cfg).await;

    // The first message reaches the server, which refuses one recipient as
    // unknown and another for a policy of its own.
    let r = d.call("send_email", first_call()).await;
    assert_eq!(r["status"], "partial", "{r}");
    let first = r["message_id"].as_str().unwrap().to_string();
    // Listed in the store, with the reply and the message that showed it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let list = loop {
        let list = listed(dir.path());
        if !list.is_empty() || std::time::Instant::now() > deadline {
            break list;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(list.len(), 1, "only the unknown one: {list:?}");
    assert_eq!(list[0]["address"], "gone@dest.example");
    assert_eq!(list[0]["reason"], "bounced");
    assert_eq!(list[0]["detail"], "550 5.1.1 no such user");
    assert_eq!(list[0]["message_id"], first.as_str());

    // The first call repeated with its key: its status, not a refusal.
    let r = d.call("send_email", first_call()).await;
    assert_eq!(r["message_id"], first.as_str(), "{r}");
    assert_eq!(r["status"], "partial", "{r}");
    assert_eq!(r["idempotent_replay"], true, "{r}");

    // Refused in any case and in any list, naming the field; nothing stored.
    let r = d
        .call(
            "send_email",
            mail(
                "again",
                json!({ "to": ["ok@dest.example", "Gone@DEST.example"] }),
            ),
        )
        .await;
    assert_suppressed(&r["error"], "to[1]", "bounced");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nothing was sent"),
        "{r}"
    );
    let r = d
        .call(
            "send_email",
            mail(
                "bcc",
                json!({ "to": ["ok@dest.example"], "bcc": ["gone@dest.example"] }),
            ),
        )
        .await;
    assert_suppressed(&r["error"], "bcc[0]", "bounced");
    until_dry_run(&d, "gone@dest.example", true).await;
    // A batch: the message to it refused alone.
    let b = d
        .call(
            "send_batch",
            json!({
                "defaults": { "subject": "batch", "body": "b" },
                "messages": [{ "to": ["ok@dest.example"] }, { "to": ["gone@dest.example"] }],
            }),
        )
        .await;
    assert_eq!(b["results"][0]["status"], "sent", "{b}");
    assert_suppressed(&b["results"][1]["error"], "messages[1].to[0]", "bounced");
    // The policy refusal listed nothing: it reaches the server again.
    let r = d
        .call(
            "send_email",
            mail("policy", json!({ "to": ["policy@dest.example"] })),
        )
        .await;
    assert_eq!(r["status"], "failed", "{r}");

    // Kept across a crash: refused at once after the restart.
    d.kill().await;
    let d = StdioDaemon::start(dir.path(), &cfg).await;
    let r = d
        .call(
            "send_email",
            mail("after", json!({ "to": ["gone@dest.example"] })),
        )
        .await;
    assert_suppressed(&r["error"], "to[0]", "bounced");

    // An operator lists an address while the daemon runs; bad input
    // changes nothing.
    let (code, out, err) = common::queue_cmd(
        dir.path(),
        &[
            "suppress",
            "add",
            "Unsub@Dest.example",
            "--reason",
            "unsubscribed",
            "--note",
            "asked by phone",
        ],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("added 1 of 1"), "{out}");
    for bad in [
        &["suppress", "add", "not-an-address"][..],
        &["suppress", "add", "x@dest.example", "--reason", "bounced"],
        &["suppress", "add", "x@dest.example", "--note", "two\nlines"],
    ] {
        let (code, out, err) = common::queue_cmd(dir.path(), bad);
        assert_eq!(code, Some(2), "{bad:?}: {out}{err}");
        assert!(err.contains("nothing was changed"), "{err}");
    }
    let r = until_dry_run(&d, "unsub@dest.example", true).await;
    assert_suppressed(&r["error"], "to[0]", "unsubscribed");
    let list = listed(dir.path());
    let addresses: Vec<&str> = list
        .iter()
        .map(|l| l["address"].as_str().unwrap())
        .collect();
    assert_eq!(addresses, ["gone@dest.example", "unsub@dest.example"]);
    assert_eq!(list[1]["detail"], "asked by phone");
    let st = d.call("get_smtp_status", json!({})).await;
    assert_eq!(st["queue"]["suppressed"], 2, "{st}");

    // Taken off: mail to it is accepted again, and reaches the server.
    let (code, out, err) =
        common::queue_cmd(dir.path(), &["suppress", "remove", "gone@dest.example"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, _, err) =
        common::queue_cmd(dir.path(), &["suppress", "remove", "never@dest.example"]);
    assert_eq!(code, Some(1), "{err}");
    until_dry_run(&d, "gone@dest.example", false).await;
    let r = d
        .call(
            "send_email",
            mail(
                "removed",
                json!({ "to": ["ok@dest.example", "gone@dest.example"] }),
            ),
        )
        .await;
    assert_eq!(r["status"], "partial", "{r}");

    // The queue command's changes are in the audit log beside the daemon's.
    let lines: Vec<Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let changes: Vec<String> = lines
        .iter()
        .filter(|l| {
            l["event"]["action"]
                .as_str()
                .unwrap()
                .contains("suppressed")
        })
        .map(|l| {
            format!(
                "{} {} by {}",
                l["event"]["action"].as_str().unwrap(),
                l["email"]["to"]["address"][0].as_str().unwrap(),
                l["user"]["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        changes,
        [
            "suppressed gone@dest.example by daemon",
            "suppressed unsub@dest.example by queue command",
            "unsuppressed gone@dest.example by queue command",
            "suppressed gone@dest.example by daemon",
        ],
        "{lines:?}"
    );

    // Reconciled with the store and the server: gone@ was in exactly the
    // two messages the daemon accepted for it, and the server took each
    // message that was accepted (first, the batch's one, removed).
    let list = stored(dir.path());
    assert_eq!(stored_to(&list, "gone@dest.example"), 2, "{list:?}");
    assert_eq!(stored_to(&list, "unsub@dest.example"), 0, "{list:?}");
    let subjects = subjects(&smtp);
    assert_eq!(subjects, ["first", "batch", "removed"], "{subjects:?}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_suppress_bounces_off_nothing_is_listed() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = FaultSmtp::start(script()).await;
    let cfg = config(dir.path(), smtp.port(), "suppress_bounces = false\n");
    let d = StdioDaemon::start(dir.path(), &cfg).await;
    for subject in ["one", "two"] {
        let r = d
            .call(
                "send_email",
                mail(
                    subject,
                    json!({ "to": ["ok@dest.example", "gone@dest.example"] }),
                ),
            )
            .await;
        assert_eq!(r["status"], "partial", "{subject}: {r}");
    }
    assert!(listed(dir.path()).is_empty());
    assert_eq!(smtp.delivered().len(), 2);
    d.stop().await;
}

/// A message accepted before its recipient was listed (here scheduled,
/// with the recipient listed by the queue command meanwhile) is cancelled
/// when its time comes, with the reason `recipient_suppressed`, and never
/// reaches the server; one scheduled beside it to another recipient goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_accepted_before_its_recipient_was_listed_is_cancelled_not_sent() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = FaultSmtp::start(script()).await;
    let d = StdioDaemon::start(dir.path(), &config(dir.path(), smtp.port(), "")).await;
    let mut ids = Vec::new();
    for (subject, to) in [
        ("listed", "later@dest.example"),
        ("kept", "ok@dest.example"),
    ] {
        let r = d
            .call(
                "send_email",
                mail(subject, json!({ "to": [to], "send_at": "3s" })),
            )
            .await;
        assert_eq!(r["status"], "scheduled", "{r}");
        ids.push(r["message_id"].as_str().unwrap().to_string());
    }
    let (code, out, err) =
        common::queue_cmd(dir.path(), &["suppress", "add", "later@dest.example"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let s = until_final(&d, &ids[0]).await;
    assert_eq!(s["status"], "cancelled", "{s}");
    assert_eq!(s["reason"], "recipient_suppressed", "{s}");
    let s = until_final(&d, &ids[1]).await;
    assert_eq!(s["status"], "sent", "{s}");
    let subjects = subjects(&smtp);
    assert_eq!(subjects, ["kept"]);
    d.stop().await;
}

/// A caller whose policy is `transactional` sends receipts and password
/// resets: a recipient who unsubscribed still gets them, also when listed
/// while its message waited, but a complaint (or any other reason) stops
/// them as it stops every caller's mail; its messages may carry no
/// unsubscribe link. A reload that makes the caller's mail ordinary again
/// holds its waiting messages to every entry at their round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_mail_reaches_a_recipient_who_unsubscribed_and_nothing_else_does() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = FaultSmtp::start(script()).await;
    let unsubscribe = format!(
        "[unsubscribe]\nurl = \"https://mail.example.org\"\nsecret = \"{}\"\n",
        "k".repeat(32)
    );
    let transactional = config(
        dir.path(),
        smtp.port(),
        &format!("\n[policy]\ntransactional = true\n\n{unsubscribe}"),
    );
    let d = StdioDaemon::start(dir.path(), &transactional).await;
    let status = d.call("get_smtp_status", json!({})).await;
    assert_eq!(status["caller"]["transactional"], true, "{status}");
    for (address, reason) in [
        ("left@dest.example", "unsubscribed"),
        ("angry@dest.example", "complained"),
    ] {
        let (code, out, err) = common::queue_cmd(
            dir.path(),
            &["suppress", "add", address, "--reason", reason],
        );
        assert_eq!(code, Some(0), "{out}{err}");
    }
    // The complaint, listed second, is in force: so is the unsubscribe.
    let r = until_dry_run(&d, "angry@dest.example", true).await;
    assert_suppressed(&r["error"], "to[0]", "complained");
    let r = d
        .call(
            "send_email",
            mail("receipt", json!({ "to": ["left@dest.example"] })),
        )
        .await;
    assert_eq!(r["status"], "sent", "{r}");
    let r = d
        .call(
            "send_email",
            mail("to the complainer", json!({ "to": ["angry@dest.example"] })),
        )
        .await;
    assert_suppressed(&r["error"], "to[0]", "complained");
    for (field, extra) in [
        (
            "list_unsubscribe",
            json!({ "list_unsubscribe": "mailto:leave@example.org" }),
        ),
        ("unsubscribe", json!({ "unsubscribe": true })),
    ] {
        let mut fields = json!({ "to": ["ok@dest.example"] });
        fields
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let r = d.call("send_email", mail("newsletter", fields)).await;
        assert_eq!(r["error"]["code"], "policy_denied", "{field}: {r}");
        assert_eq!(r["error"]["rule"], "unsubscribe_in_transactional", "{r}");
        assert_eq!(r["error"]["field"], field, "{r}");
    }
    // Listed while it waits: a transactional message still goes.
    let reset = schedule(&d, "reset", "later@dest.example", "3s").await;
    let (code, out, err) = common::queue_cmd(
        dir.path(),
        &[
            "suppress",
            "add",
            "later@dest.example",
            "--reason",
            "unsubscribed",
        ],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    let second = schedule(&d, "second reset", "later@dest.example", "8s").await;
    let s = until_final(&d, &reset).await;
    assert_eq!(s["status"], "sent", "{s}");
    // The caller's mail is ordinary again: the second, whose round comes
    // after the reload, is cancelled, and the unsubscribe refuses a call.
    std::fs::write(
        dir.path().join("mailmux.toml"),
        config(dir.path(), smtp.port(), &format!("\n{unsubscribe}")),
    )
    .unwrap();
    let r = d.call("reload_smtp_configuration", json!({})).await;
    assert_eq!(r["reloaded"], true, "{r}");
    let s = until_final(&d, &second).await;
    assert_eq!(s["status"], "cancelled", "{s}");
    assert_eq!(s["reason"], "recipient_suppressed", "{s}");
    let r = d
        .call(
            "send_email",
            mail("another receipt", json!({ "to": ["left@dest.example"] })),
        )
        .await;
    assert_suppressed(&r["error"], "to[0]", "unsubscribed");
    let status = d.call("get_smtp_status", json!({})).await;
    assert!(status["caller"].get("transactional").is_none(), "{status}");
    assert_eq!(subjects(&smtp), ["receipt", "reset"]);
    assert_eq!(stored(dir.path()).len(), 3, "no refused call was stored");
    d.stop().await;
}

/// The id of a message to `to` scheduled `after` from now.
async fn schedule(d: &StdioDaemon, subject: &str, to: &str, after: &str) -> String {
    let r = d
        .call(
            "send_email",
            mail(
                subject,
                json!({ "to": [to], "send_at": after, "wait": false }),
            ),
        )
        .await;
    assert_eq!(r["status"], "scheduled", "{r}");
    r["message_id"].as_str().unwrap().to_owned()
}

/// The status of message `id` once it is no longer waiting, within 15 s.
async fn until_final(d: &StdioDaemon, id: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let s = d
            .call("get_message_status", json!({ "message_id": id }))
            .await;
        if !["scheduled", "queued", "sending"].contains(&s["status"].as_str().unwrap()) {
            return s;
        }
        assert!(std::time::Instant::now() < deadline, "still {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An operator imports another service's list from a file: every line is
/// checked before any is written (a bad line names its number and changes
/// nothing), comments and blank lines are skipped, an address already
/// listed keeps its entry, and each one added is in force and audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_imports_a_list_from_a_file() {
    let (dir, _smtp, audit, cfg) = audited().await;
    let d = StdioDaemon::start(dir.path(), &cfg).await;
    let (code, out, err) = common::queue_cmd(dir.path(), &["suppress", "add", "b@dest.example"]);
    assert_eq!(code, Some(0), "{out}{err}");

    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, "a@dest.example\n# a comment\nnot an address\n").unwrap();
    let (code, out, err) = common::queue_cmd(
        dir.path(),
        &["suppress", "add", "--file", bad.to_str().unwrap()],
    );
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        err.contains("line 3") && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(listed(dir.path()).len(), 1);

    let good = dir.path().join("export.txt");
    std::fs::write(
        &good,
        "# exported suppressions\nA@Dest.example\n\n  b@dest.example  \nc@dest.example\n",
    )
    .unwrap();
    let (code, out, err) = common::queue_cmd(
        dir.path(),
        &[
            "suppress",
            "add",
            "--reason",
            "unsubscribed",
            "--file",
            good.to_str().unwrap(),
            "d@dest.example",
        ],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("added 3 of 4; 1 already listed"), "{out}");
    let list = listed(dir.path());
    let entries: Vec<(&str, &str)> = list
        .iter()
        .map(|l| {
            (
                l["address"].as_str().unwrap(),
                l["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        [
            ("a@dest.example", "unsubscribed"),
            ("b@dest.example", "manual"),
            ("c@dest.example", "unsubscribed"),
            ("d@dest.example", "unsubscribed"),
        ]
    );
    until_dry_run(&d, "c@dest.example", true).await;
    let audited = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"suppressed\""))
        .count();
    assert_eq!(audited, 4, "b@ once, then a@, c@ and d@");
    d.stop().await;
}

/// A message whose every recipient the server refuses: each is listed for
/// its own reply, the unknown one only, and the message's status names
/// each refusal; so is a message of one recipient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_every_recipient_is_refused_lists_the_unknown_ones() {
    let (dir, _smtp, _audit, cfg) = audited().await;
    let d = StdioDaemon::start(dir.path(), &cfg).await;
    let r = d
        .call(
            "send_email",
            mail(
                "both",
                json!({ "to": ["policy@dest.example", "gone@dest.example"] }),
            ),
        )
        .await;
    assert_eq!(r["status"], "failed", "{r}");
    let both = r["message_id"].as_str().unwrap().to_string();
    until_dry_run(&d, "gone@dest.example", true).await;
    let list = listed(dir.path());
    assert_eq!(list.len(), 1, "the 5.7.1 one is not listed: {list:?}");
    assert_eq!(list[0]["message_id"], both.as_str());
    let s = d
        .call("get_message_status", json!({ "message_id": both }))
        .await;
    let rejected: Vec<(String, String)> = s["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["address"].as_str().unwrap().to_owned(),
                r["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        rejected,
        [
            (
                "policy@dest.example".to_owned(),
                "5.7.1 not allowed".to_owned()
            ),
            (
                "gone@dest.example".to_owned(),
                "5.1.1 no such user".to_owned()
            ),
        ],
        "{s}"
    );

    // One recipient, refused as unknown: listed too.
    let (code, out, err) =
        common::queue_cmd(dir.path(), &["suppress", "remove", "gone@dest.example"]);
    assert_eq!(code, Some(0), "{out}{err}");
    until_dry_run(&d, "gone@dest.example", false).await;
    let r = d
        .call(
            "send_email",
            mail("only", json!({ "to": ["gone@dest.example"] })),
        )
        .await;
    assert_eq!(r["status"], "failed", "{r}");
    let only = r["message_id"].as_str().unwrap().to_string();
    until_dry_run(&d, "gone@dest.example", true).await;
    let list = listed(dir.path());
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["message_id"], only.as_str());
    d.stop().await;
}

/// A message some recipients have, whose other recipient waits for a
/// retry: listed meanwhile, that one is not sent to when the retry comes,
/// and the message ends `partial`, the listed recipient refused for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_listed_while_it_waits_for_a_retry_is_not_sent_to() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = FaultSmtp::start(
        Script::ok().on_rcpt("later@dest.example", Action::reply(451, "4.2.1 try later")),
    )
    .await;
    let cfg = config(
        dir.path(),
        smtp.port(),
        "retry_base = \"1s\"\nretry_max = \"1s\"\n",
    );
    let d = StdioDaemon::start(dir.path(), &cfg).await;
    let r = d
        .call(
            "send_email",
            mail(
                "half",
                json!({ "to": ["ok@dest.example", "later@dest.example"], "wait": false }),
            ),
        )
        .await;
    let id = r["message_id"].as_str().unwrap().to_string();
    // The first round: ok@ has it, later@ waits.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let s = d
            .call("get_message_status", json!({ "message_id": id }))
            .await;
        if s["deferred"] == json!(["later@dest.example"]) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, out, err) =
        common::queue_cmd(dir.path(), &["suppress", "add", "later@dest.example"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let s = loop {
        let s = d
            .call("get_message_status", json!({ "message_id": id }))
            .await;
        if s["status"] != "queued" && s["status"] != "sending" {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "still {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(s["status"], "partial", "{s}");
    assert_eq!(s["accepted"], json!(["ok@dest.example"]), "{s}");
    assert_eq!(s["rejected"][0]["address"], "later@dest.example", "{s}");
    assert!(
        s["rejected"][0]["text"]
            .as_str()
            .unwrap()
            .contains("suppression list"),
        "{s}"
    );
    // No later round: the server took the message once, for ok@ only.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = smtp.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].rcpt_to, ["ok@dest.example"]);
    d.stop().await;
}

/// A daemon on `dir` whose store refuses every new entry of the list, after
/// the relay on `port` refused `gone@dest.example` as unknown: the daemon
/// refuses that address from its own copy. Its configuration, the daemon,
/// and the connection that holds the store's refusal.
async fn bounced_while_the_store_refuses(
    dir: &std::path::Path,
    port: u16,
) -> (String, StdioDaemon, rusqlite::Connection) {
    let cfg = config(dir, port, "");
    let d = StdioDaemon::start(dir, &cfg).await;
    let db = common::refuse_suppressions(&dir.join("queue.db"));
    let r = d
        .call(
            "send_email",
            mail("unknown", json!({ "to": ["gone@dest.example"] })),
        )
        .await;
    assert_eq!(r["status"], "failed", "{r}");
    until_dry_run(&d, "gone@dest.example", true).await;
    (cfg, d, db)
}

/// A listing the store cannot write (a trigger refuses it here, where a
/// failing disk or a database gone for a moment would): the daemon refuses
/// the recipient at once from its own copy of the list, and stores the
/// entry once the store takes it, so that the queue command and the next
/// start see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounce_the_store_cannot_write_yet_is_stored_once_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = FaultSmtp::start(script()).await;
    let (cfg, d, db) = bounced_while_the_store_refuses(dir.path(), smtp.port()).await;
    // The poll tries the write every second, and the store refuses it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(listed(dir.path()).is_empty());
    common::accept_suppressions(&db);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let list = loop {
        let list = listed(dir.path());
        if !list.is_empty() {
            break list;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not stored within 10 s of the store taking writes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["address"], "gone@dest.example");
    assert_eq!(list[0]["reason"], "bounced");
    d.stop().await;
    let d = StdioDaemon::start(dir.path(), &cfg).await;
    until_dry_run(&d, "gone@dest.example", true).await;
    d.stop().await;
}

/// An entry the store still refuses when the daemon stops: the stop tries
/// the write again, then says in the log that one entry is lost and where
/// it is named; the next start does not have it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounce_the_store_refuses_until_the_stop_is_logged_as_lost() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = FaultSmtp::start(script()).await;
    let (cfg, d, db) = bounced_while_the_store_refuses(dir.path(), smtp.port()).await;
    d.stop().await;
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    let lost: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("suppression list entries the store refused are lost"))
        .collect();
    assert_eq!(lost.len(), 1, "{log}");
    assert!(
        lost[0].contains("ERROR") && lost[0].contains("entries=1"),
        "{}",
        lost[0]
    );
    assert!(!lost[0].contains("gone@dest.example"), "{}", lost[0]);
    common::accept_suppressions(&db);
    assert!(listed(dir.path()).is_empty());
    let d = StdioDaemon::start(dir.path(), &cfg).await;
    until_dry_run(&d, "gone@dest.example", false).await;
    d.stop().await;
}

/// A list larger than the store records address by address is read whole
/// once; the changes after it are read one by one. Each is in force on the
/// running daemon, and its copy holds as many addresses as the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_import_then_single_changes_each_reach_the_running_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = FaultSmtp::start(script()).await;
    let d = StdioDaemon::start(dir.path(), &config(dir.path(), smtp.port(), "")).await;
    let held = |n: u64| {
        let d = &d;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let s = d.call("get_smtp_status", json!({})).await;
                if s["queue"]["suppressed"] == n {
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "not {n} listed: {}",
                    s["queue"]
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let file = dir.path().join("list.txt");
    let lines: Vec<String> = (0..1500).map(|i| format!("old{i}@dest.example")).collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let (code, out, err) = common::queue_cmd(
        dir.path(),
        &["suppress", "add", "--file", file.to_str().unwrap()],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    held(1500).await;
    until_dry_run(&d, "old1499@dest.example", true).await;

    let (code, out, err) =
        common::queue_cmd(dir.path(), &["suppress", "remove", "old7@dest.example"]);
    assert_eq!(code, Some(0), "{out}{err}");
    until_dry_run(&d, "old7@dest.example", false).await;
    held(1499).await;
    for i in 0..3 {
        let (code, out, err) = common::queue_cmd(
            dir.path(),
            &["suppress", "add", &format!("new{i}@dest.example")],
        );
        assert_eq!(code, Some(0), "{out}{err}");
    }
    let (code, out, err) =
        common::queue_cmd(dir.path(), &["suppress", "remove", "new1@dest.example"]);
    assert_eq!(code, Some(0), "{out}{err}");
    held(1501).await;
    until_dry_run(&d, "new2@dest.example", true).await;
    until_dry_run(&d, "new1@dest.example", false).await;
    until_dry_run(&d, "old8@dest.example", true).await;
    d.stop().await;
}
