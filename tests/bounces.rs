//! Bounce and complaint reports that come back by mail (`[relays.bounces]`):
//! the real binary over stdio, a fault-injecting SMTP server that takes
//! every message, and a throwaway Dovecot whose inbox gets the reports, as
//! a relay's account would. A delivery status notification for an unknown
//! recipient lists it (`bounced`), an `abuse` complaint lists the message's
//! only recipient (`complained`); a report about another failure, a delay,
//! a recipient the message did not have, a message the store does not
//! hold, or a complaint about a message of two recipients lists nobody.
//! The mailbox is only read, and a report read before a restart is not
//! read again: an address an operator took off the list stays off. With
//! the mailbox down, mail goes out and the reader comes back by itself;
//! two daemons on PostgreSQL list a reported recipient once; a report
//! after thousands of deleted messages is found; an OAuth2 relay's mailbox
//! is read with its tokens; reports read across a SIGKILL count once.

mod common;
#[path = "common/dovecot.rs"]
mod dovecot;
#[path = "../actors/tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use common::StdioDaemon;
use dovecot::{Dovecot, PASS, USER};
use serde_json::{Value, json};
use support::fault_smtp::{FaultSmtp, Script};

fn config(dir: &Path, smtp: u16, imap: u16) -> String {
    format!(
        r#"
shutdown_grace = "1s"
from_email = "{USER}"

[queue]
path = "{db}"

[audit]
path = "{audit}"

[[relays]]
name = "account"
host = "127.0.0.1"
port = {smtp}
tls = "none"
timeout = "3s"

[relays.bounces]
imap_host = "127.0.0.1"
port = {imap}
tls = "none"
username = "{USER}"
password = "{PASS}"
every = "200ms"
"#,
        db = dir.join("queue.db").display(),
        audit = dir.join("audit.jsonl").display(),
    )
}

/// A message sent and delivered; its id.
async fn sent(d: &StdioDaemon, to: &[&str]) -> String {
    let r = d
        .call(
            "send_email",
            json!({ "to": to, "subject": "news", "body": "hello" }),
        )
        .await;
    assert_eq!(r["status"], "sent", "{r}");
    r["message_id"].as_str().unwrap().to_owned()
}

/// A message to `to`, sent, then its bounce (`status`) in the inbox; its
/// id.
async fn bounced(d: &StdioDaemon, imap: &Dovecot, to: &str, status: &str) -> String {
    let id = sent(d, &[to]).await;
    imap.append("INBOX", &dsn(&id, &[(to, "failed", status)]))
        .await;
    id
}

/// A delivery status notification about `message_id`, one group a
/// recipient: (address, action, status).
fn dsn(message_id: &str, recipients: &[(&str, &str, &str)]) -> Vec<u8> {
    let mut groups = String::new();
    for (address, action, status) in recipients {
        groups.push_str(&format!(
            "Final-Recipient: rfc822; {address}\r\nAction: {action}\r\nStatus: {status}\r\n\
             Diagnostic-Code: smtp; 550 {status} <{address}>: Recipient address rejected\r\n\r\n"
        ));
    }
    format!(
        "From: MAILER-DAEMON@mx.dest.example\r\nTo: {USER}\r\nSubject: Undelivered Mail Returned to Sender\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n\
         --B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n\
         --B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.dest.example\r\n\r\n{groups}\
         --B\r\nContent-Type: message/rfc822\r\n\r\nFrom: {USER}\r\nMessage-ID: <{message_id}>\r\nSubject: news\r\n\r\nhello\r\n\
         --B--\r\n"
    )
    .into_bytes()
}

/// An `abuse` complaint (ARF) about `message_id` that names no recipient,
/// as feedback loops that redact it send.
fn complaint(message_id: &str) -> Vec<u8> {
    format!(
        "From: fbl@isp.example\r\nTo: {USER}\r\nSubject: FW: news\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=feedback-report; boundary=\"F\"\r\n\r\n\
         --F\r\nContent-Type: text/plain\r\n\r\nThis is an abuse report.\r\n\
         --F\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\nUser-Agent: fbl/1\r\nVersion: 1\r\n\r\n\
         --F\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: {USER}\r\nTo: redacted@isp.example\r\nMessage-ID: <{message_id}>\r\n\r\n\
         --F--\r\n"
    )
    .into_bytes()
}

/// `queue suppress list --json`, by address.
fn listed(dir: &Path) -> Vec<Value> {
    let (code, out, err) = common::queue_cmd(dir, &["suppress", "list", "--json"]);
    assert_eq!(code, Some(0), "{out}{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The list once it holds `n` entries, within 15 s.
async fn until_listed(dir: &Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let list = listed(dir);
        if list.len() >= n {
            return list;
        }
        assert!(Instant::now() < deadline, "still {list:?} after 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn entry<'a>(list: &'a [Value], address: &str) -> &'a Value {
    list.iter()
        .find(|e| e["address"] == address)
        .unwrap_or_else(|| panic!("{address} not in {list:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_list_unknown_and_complaining_recipients_of_the_daemons_own_messages() {
    let imap = Dovecot::start();
    let smtp = FaultSmtp::start(Script::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let (hook, hooks) = common::webhook().await;
    let metrics = common::free_port();
    let cfg = format!(
        "{}\n[notify]\nurl = \"http://127.0.0.1:{hook}/hook/KEY-IN-PATH\"\n\
         events = [\"bounced\", \"complained\"]\n\n[metrics]\nbind = \"127.0.0.1:{metrics}\"\n",
        config(dir.path(), smtp.port(), imap.port)
    );
    let d = StdioDaemon::start(dir.path(), &cfg).await;

    let two = sent(&d, &["gone@dest.example", "stays@dest.example"]).await;
    let full = sent(&d, &["full@dest.example"]).await;
    let one = sent(&d, &["reader@dest.example"]).await;
    let pair = sent(&d, &["x@dest.example", "y@dest.example"]).await;

    let reports: Vec<Vec<u8>> = vec![
        // The unknown recipient is listed; a delay, and a recipient the
        // message never had, are not.
        dsn(
            &two,
            &[
                ("gone@dest.example", "failed", "5.1.1"),
                ("stays@dest.example", "delayed", "4.4.1"),
                ("outsider@dest.example", "failed", "5.1.1"),
            ],
        ),
        // A full mailbox is no reason to stop mailing it.
        dsn(&full, &[("full@dest.example", "failed", "5.2.2")]),
        // A forged report about a message this daemon never sent.
        dsn(
            "0000@forged.example",
            &[("victim@dest.example", "failed", "5.1.1")],
        ),
        complaint(&one),
        // Which of two recipients complained is unknown: neither is listed.
        complaint(&pair),
        format!("From: friend@dest.example\r\nTo: {USER}\r\nSubject: hi\r\n\r\nlunch?\r\n")
            .into_bytes(),
    ];
    for r in &reports {
        imap.append("INBOX", r).await;
    }

    let list = until_listed(dir.path(), 2).await;
    // Several more reads: nothing else is listed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let list2 = listed(dir.path());
    assert_eq!(list2, list);
    assert_eq!(list.len(), 2, "{list:?}");
    let gone = entry(&list, "gone@dest.example");
    assert_eq!(gone["reason"], "bounced");
    assert_eq!(gone["message_id"], two.as_str());
    assert!(gone["detail"].as_str().unwrap().contains("5.1.1"), "{gone}");
    let reader = entry(&list, "reader@dest.example");
    assert_eq!(reader["reason"], "complained");
    assert_eq!(reader["message_id"], one.as_str());

    // Each message's status says what its reports said of its recipients.
    let status = |id: String| {
        let d = &d;
        async move {
            d.call("get_message_status", json!({ "message_id": id }))
                .await
        }
    };
    let s = status(two.clone()).await;
    assert_eq!(s["status"], "sent", "{s}");
    let noted = s["reports"].as_array().unwrap();
    assert_eq!(noted.len(), 1, "{s}");
    assert_eq!(noted[0]["address"], "gone@dest.example");
    assert_eq!(noted[0]["reason"], "bounced");
    assert!(noted[0]["detail"].as_str().unwrap().contains("5.1.1"));
    let s = status(one.clone()).await;
    assert_eq!(s["reports"][0]["reason"], "complained", "{s}");
    for id in [&full, &pair] {
        let s = status(id.clone()).await;
        assert!(s.get("reports").is_none(), "{s}");
    }
    // And a listing finds the messages a report came back for.
    let listed = |reported: &str| {
        let d = &d;
        let args = json!({ "reported": reported });
        async move { d.call("list_messages", args).await }
    };
    let ids = |v: &Value| -> Vec<String> {
        v["messages"]
            .as_array()
            .unwrap_or_else(|| panic!("{v}"))
            .iter()
            .map(|m| m["message_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&listed("bounced").await), [two.as_str()]);
    assert_eq!(ids(&listed("complained").await), [one.as_str()]);
    let bad = listed("spam").await;
    assert_eq!(
        (&bad["error"]["field"], &bad["error"]["rule"]),
        (&json!("reported"), &json!("one_of")),
        "{bad}"
    );

    // In force: the next message to it is refused, nothing sent.
    let before = smtp.delivered().len();
    let r = d
        .call(
            "send_email",
            json!({ "to": ["Gone@dest.example"], "subject": "again", "body": "b" }),
        )
        .await;
    assert_eq!(r["error"]["code"], "recipient_suppressed", "{r}");
    assert_eq!(r["error"]["rule"], "bounced", "{r}");
    assert_eq!(smtp.delivered().len(), before);

    // The mailbox was only read: every message is there, none marked seen.
    let inbox = imap.messages("INBOX").await;
    assert_eq!(inbox.len(), reports.len());
    for (flags, _) in &inbox {
        assert!(!flags.iter().any(|f| f.contains("Seen")), "{flags:?}");
    }

    // The webhook is told of each report noted on a message, once, with
    // no address (the first post is answered 500 and tried again).
    common::hooks_taken(&hooks, 2).await;
    // Long enough for a third post, were there one.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let posts: Vec<Value> = common::hooks_taken(&hooks, 2)
        .await
        .into_iter()
        .map(|h| h.body)
        .collect();
    let mut told: Vec<(&str, &str)> = posts
        .iter()
        .map(|p| {
            (
                p["event"].as_str().unwrap(),
                p["message_id"].as_str().unwrap(),
            )
        })
        .collect();
    told.sort();
    let mut want = vec![("bounced", two.as_str()), ("complained", one.as_str())];
    want.sort();
    assert_eq!(told, want, "{posts:?}");
    for p in &posts {
        assert_eq!(p["recipients"], 1, "{p}");
        assert!(
            !p.to_string().contains("dest.example"),
            "an address posted: {p}"
        );
    }

    // Counted by caller and reason, for the rates providers judge by.
    let text = common::scrape(metrics).await;
    let count = |reason: &str| -> Option<String> {
        text.lines()
            .find(|l| {
                l.starts_with("mailmux_reports_total{")
                    && l.contains("caller=\"local\"")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_owned)
    };
    assert_eq!(count("bounced").as_deref(), Some("1"), "{text}");
    assert_eq!(count("complained").as_deref(), Some("1"), "{text}");

    // Each listing is audited, by the report, and so is each report noted
    // on a message: its one recipient and the report's detail.
    d.stop().await;
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    let all: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .collect();
    let of = |action: &str| -> Vec<&Value> {
        all.iter()
            .filter(|l| l["event"]["action"] == action)
            .collect()
    };
    let lines = of("suppressed");
    assert_eq!(lines.len(), 2, "{audit}");
    for l in &lines {
        assert_eq!(l["user"]["name"], "report", "{l}");
    }
    let bounced = of("bounced");
    assert_eq!(bounced.len(), 1, "{audit}");
    assert_eq!(
        bounced[0]["email"]["message_id"],
        two.as_str(),
        "{}",
        bounced[0]
    );
    assert_eq!(
        bounced[0]["mailmux"]["reported"],
        json!(["gone@dest.example"]),
        "{}",
        bounced[0]
    );
    assert!(
        bounced[0]["event"]["reason"]
            .as_str()
            .unwrap()
            .contains("5.1.1"),
        "{}",
        bounced[0]
    );
    let complained = of("complained");
    assert_eq!(complained.len(), 1, "{audit}");
    assert_eq!(
        complained[0]["mailmux"]["reported"],
        json!(["reader@dest.example"])
    );
    assert!(!audit.contains("hello"), "a body in the audit log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_read_before_a_restart_is_not_read_again() {
    let imap = Dovecot::start();
    let smtp = FaultSmtp::start(Script::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), smtp.port(), imap.port);
    let d = StdioDaemon::start(dir.path(), &cfg).await;
    bounced(&d, &imap, "gone@dest.example", "5.1.1").await;
    until_listed(dir.path(), 1).await;
    d.stop().await;

    // The operator knows better: the address works again.
    let (code, out, err) =
        common::queue_cmd(dir.path(), &["suppress", "remove", "gone@dest.example"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(listed(dir.path()).is_empty());

    // After a restart only the new report is read.
    let d = StdioDaemon::start(dir.path(), &cfg).await;
    bounced(&d, &imap, "late@dest.example", "5.1.2").await;
    let list = until_listed(dir.path(), 1).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let list2 = listed(dir.path());
    assert_eq!(list2, list);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["address"], "late@dest.example");
    d.stop().await;
}

/// A loopback proxy on `port` to `to`, from now on.
async fn proxy(port: u16, to: u16) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_mailbox_down_mail_goes_out_and_the_reader_comes_back_by_itself() {
    let imap = Dovecot::start();
    let smtp = FaultSmtp::start(Script::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on the mailbox's port yet.
    let port = common::free_port();
    let d = StdioDaemon::start(dir.path(), &config(dir.path(), smtp.port(), port)).await;
    bounced(&d, &imap, "gone@dest.example", "5.1.1").await;
    // Many reads fail meanwhile; the log says so once, without the password.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(listed(dir.path()).is_empty());
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    let warned = log
        .lines()
        .filter(|l| l.contains("cannot read the bounce mailbox"))
        .count();
    assert_eq!(warned, 1, "{log}");
    assert!(!log.contains(PASS), "the IMAP password in the log");
    // get_smtp_status says why, without the password.
    let s = d.call("get_smtp_status", json!({})).await;
    let reader = &s["bounces"][0];
    assert_eq!(reader["relay"], "account", "{s}");
    assert_eq!(reader["folder"], "INBOX", "{s}");
    assert!(reader["error"].as_str().unwrap().contains("connect"), "{s}");
    assert!(reader.get("last_read_at").is_none(), "{s}");
    assert!(!s.to_string().contains(PASS));

    proxy(port, imap.port).await;
    let list = until_listed(dir.path(), 1).await;
    assert_eq!(list[0]["address"], "gone@dest.example");
    let s = d.call("get_smtp_status", json!({})).await;
    let reader = &s["bounces"][0];
    assert!(reader.get("error").is_none(), "{s}");
    assert!(reader["last_read_at"].is_string(), "{s}");
    assert_eq!(reader["reports"], 1, "{s}");
    assert_eq!(reader["listed"], 1, "{s}");
    d.stop().await;
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("the bounce mailbox is read again"))
            .count(),
        1,
        "{log}"
    );
    assert!(!log.contains(PASS), "the IMAP password in the log");
}

/// Two daemons on one PostgreSQL database read the same mailbox, through
/// one cursor in the database: the report lists its recipient once, in one
/// audit line, whichever daemon sent the message and whichever read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_on_postgres_list_a_reported_recipient_once() {
    let imap = Dovecot::start();
    let pg = support::postgres::Postgres::start();
    let url = pg.database();
    let smtp = FaultSmtp::start(Script::ok()).await;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let on_pg = |dir: &Path, node: &str| {
        config(dir, smtp.port(), imap.port).replacen(
            &format!("path = \"{}\"", dir.join("queue.db").display()),
            &format!("store = \"postgres\"\nurl = \"{url}\"\nnode_id = \"{node}\""),
            1,
        )
    };
    let da = StdioDaemon::start(a.path(), &on_pg(a.path(), "a")).await;
    let db = StdioDaemon::start(b.path(), &on_pg(b.path(), "b")).await;
    bounced(&db, &imap, "gone@dest.example", "5.1.1").await;
    let list = until_listed(a.path(), 1).await;
    assert_eq!(list[0]["address"], "gone@dest.example");
    // Both daemons read the mailbox several times by now (every 200 ms).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(listed(b.path()).len(), 1);
    da.stop().await;
    db.stop().await;
    let (mut lines, mut reported) = (0, 0);
    for dir in [a.path(), b.path()] {
        let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap_or_default();
        lines += audit
            .lines()
            .filter(|l| l.contains("\"suppressed\"") && l.contains("gone@dest.example"))
            .count();
        reported += audit
            .lines()
            .filter(|l| l.contains("\"action\":\"bounced\""))
            .count();
    }
    assert_eq!(lines, 1, "one audit line for one listing");
    assert_eq!(
        reported, 1,
        "one audit line for one report noted on its message"
    );
}

/// A mailbox of thousands of messages, the first five thousand deleted: the
/// reader goes through it a window of UIDs at a time, past the empty
/// stretch, and finds the report after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_after_thousands_of_deleted_messages_is_found() {
    let imap = Dovecot::start();
    {
        let mut s = imap.login().await;
        for i in 0..5_050 {
            s.append("INBOX", None, None, format!("Subject: {i}\r\n\r\nx\r\n"))
                .await
                .unwrap();
        }
        s.select("INBOX").await.unwrap();
        let _: Vec<_> = futures::TryStreamExt::try_collect(
            s.uid_store("1:5000", "+FLAGS (\\Deleted)").await.unwrap(),
        )
        .await
        .unwrap();
        let _: Vec<_> = futures::TryStreamExt::try_collect(s.expunge().await.unwrap())
            .await
            .unwrap();
        let _ = s.logout().await;
    }
    assert_eq!(imap.count("INBOX").await, 50);
    let smtp = FaultSmtp::start(Script::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let d = StdioDaemon::start(dir.path(), &config(dir.path(), smtp.port(), imap.port)).await;
    bounced(&d, &imap, "gone@dest.example", "5.1.1").await;
    let list = until_listed(dir.path(), 1).await;
    assert_eq!(list[0]["address"], "gone@dest.example");
    let s = d.call("get_smtp_status", json!({})).await;
    assert_eq!(s["bounces"][0]["reports"], 1, "{s}");
    d.stop().await;
}

/// An `xoauth2` relay's mailbox is read with the relay's own OAuth2 tokens
/// (`AUTHENTICATE XOAUTH2`, which Dovecot checks at the test's token
/// endpoint): one token serves SMTP and IMAP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mailbox_of_an_oauth2_relay_is_read_with_its_tokens() {
    let (endpoint, token_port) = common::serve_token_endpoint_for(USER, 3600).await;
    let imap = Dovecot::start_with(None, Some(token_port));
    let smtp = FaultSmtp::start_with(
        Script::ok(),
        support::fault_smtp::Options {
            xoauth2_user: Some(USER.into()),
            ..support::fault_smtp::Options::default()
        },
    )
    .await;
    // One token serves SMTP and IMAP: the server takes the fresh one too.
    smtp.accept_tokens(&[&common::access(1), &common::access(2)]);
    // The mailbox through a proxy that can end its sessions.
    let imap_proxy = support::cut_proxy::CutProxy::start(([127, 0, 0, 1], imap.port).into()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
shutdown_grace = "1s"

[queue]
path = "{db}"

{relay}
[relays.bounces]
imap_host = "127.0.0.1"
port = {imap}
tls = "none"
every = "200ms"
"#,
        db = dir.path().join("queue.db").display(),
        relay = common::oauth2_relay_toml(smtp.port(), token_port, USER),
        imap = imap_proxy.port(),
    );
    let d = StdioDaemon::start(dir.path(), &config).await;
    bounced(&d, &imap, "gone@dest.example", "5.1.1").await;
    let list = until_listed(dir.path(), 1).await;
    assert_eq!(list[0]["address"], "gone@dest.example");
    assert_eq!(endpoint.requests.lock().unwrap().len(), 1);

    // The provider revokes the token long before it expires, and the
    // session ends: the next login with the cached token is refused, and
    // the reader logs in again with a fresh one.
    endpoint.revoke_all();
    imap_proxy.close_all();
    bounced(&d, &imap, "late@dest.example", "5.1.1").await;
    let list = until_listed(dir.path(), 2).await;
    assert!(
        list.iter().any(|e| e["address"] == "late@dest.example"),
        "{list:?}"
    );
    assert_eq!(
        endpoint.requests.lock().unwrap().len(),
        2,
        "one fresh token"
    );
    d.stop().await;
}

/// SIGKILL while the reports come in and are read, then a restart: every
/// reported recipient is listed, and each message's status holds its report
/// once; a report read again after the crash doubles nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_read_across_a_sigkill_are_counted_once() {
    const N: usize = 40;
    let imap = Dovecot::start();
    let smtp = FaultSmtp::start(Script::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), smtp.port(), imap.port);
    let d = StdioDaemon::start(dir.path(), &cfg).await;
    let messages: Vec<Value> = (0..N)
        .map(|i| json!({ "to": [format!("r{i}@dest.example")] }))
        .collect();
    let out = d
        .call(
            "send_batch",
            json!({ "defaults": { "subject": "news", "body": "hello" }, "messages": messages }),
        )
        .await;
    assert_eq!(out["summary"], json!({ "sent": N }), "{out}");
    let ids: Vec<String> = out["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["message_id"].as_str().unwrap().to_owned())
        .collect();
    let report = |i: usize| {
        dsn(
            &ids[i],
            &[(&format!("r{i}@dest.example"), "failed", "5.1.1")],
        )
    };
    for i in 0..N / 2 {
        imap.append("INBOX", &report(i)).await;
    }
    // Killed while it reads the first half (every 200 ms).
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.kill().await;
    let d = StdioDaemon::start(dir.path(), &cfg).await;
    for i in N / 2..N {
        imap.append("INBOX", &report(i)).await;
    }
    let list = until_listed(dir.path(), N).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(listed(dir.path()).len(), N, "{list:?}");
    for (i, id) in ids.iter().enumerate() {
        let s = d
            .call("get_message_status", json!({ "message_id": id }))
            .await;
        let reports = s["reports"].as_array().unwrap();
        assert_eq!(reports.len(), 1, "{s}");
        assert_eq!(reports[0]["address"], format!("r{i}@dest.example"));
    }
    d.stop().await;
    // At most one audit line an address (a line being written at the
    // SIGKILL may be lost, never doubled).
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    for i in 0..N {
        let address = format!("\"r{i}@dest.example\"");
        let lines = audit
            .lines()
            .filter(|l| l.contains("\"suppressed\"") && l.contains(&address))
            .count();
        assert!(lines <= 1, "{address}: {lines} lines");
        let reported = audit
            .lines()
            .filter(|l| l.contains("\"action\":\"bounced\"") && l.contains(&address))
            .count();
        assert!(reported <= 1, "{address}: {reported} report lines");
    }
}
