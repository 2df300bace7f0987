//! `send_batch` through rmcp's client against the daemon in process, on a
//! SQLite queue, with the fault-injecting SMTP server counting what arrives:
//! a mail merge, a batch with invalid messages, `atomic`, idempotency keys
//! per message, a dry run, and the limits of a batch.

mod common;
#[path = "../actors/tests/support/mod.rs"]
mod support;

use std::time::Duration;

use common::{InProcess, config, relay};
use mailmux::config::Sources;
use mailmux_actors::queue::StoreKind;
use rmcp::model::CallToolRequestParams;
use serde_json::{Value, json};
use support::fault_smtp::{FaultSmtp, Script};

struct Setup {
    smtp: FaultSmtp,
    h: InProcess,
    _dir: tempfile::TempDir,
}

async fn setup(max_batch: usize) -> Setup {
    let smtp = FaultSmtp::start(Script::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(vec![relay("primary", smtp.port(), 100)]);
    cfg.queue.store = StoreKind::Sqlite {
        path: dir.path().join("queue.db"),
    };
    cfg.daemon.max_batch = max_batch;
    let h = InProcess::start(cfg, Sources::default()).await;
    Setup { smtp, h, _dir: dir }
}

async fn call(s: &Setup, tool: &str, args: Value) -> (bool, Value) {
    let mut params = CallToolRequestParams::new(tool.to_string());
    if let Value::Object(map) = args {
        params = params.with_arguments(map);
    }
    let r = tokio::time::timeout(Duration::from_secs(60), s.h.peer().call_tool(params))
        .await
        .expect("answer within 60 s")
        .expect("no protocol error");
    (
        r.is_error.unwrap_or(false),
        r.structured_content.expect("structured content"),
    )
}

/// The recipients of each message at the sink, sorted.
fn recipients(s: &Setup) -> Vec<String> {
    let mut rcpts: Vec<String> = s
        .smtp
        .delivered()
        .iter()
        .map(|r| r.rcpt_to.join(","))
        .collect();
    rcpts.sort();
    rcpts
}

fn subject(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    text.lines()
        .find_map(|l| l.strip_prefix("Subject: "))
        .unwrap_or("")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_merge_renders_each_message_and_sends_every_one() {
    let s = setup(1000).await;
    let names = ["Ada", "Grace", "Edsger", "Barbara", "Ken"];
    let messages: Vec<Value> = names
        .iter()
        .map(|n| {
            json!({"to": [format!("{}@example.org", n.to_lowercase())],
                   "template_vars": {"name": n}})
        })
        .collect();
    let (is_error, out) = call(
        &s,
        "send_batch",
        json!({
            "defaults": {"subject": "Hello {name}", "body": "Dear {name},\nthe report is out.",
                         "from_email": "news@example.org"},
            "messages": messages,
        }),
    )
    .await;
    assert!(!is_error, "{out}");
    assert_eq!(out["summary"], json!({"sent": 5}), "{out}");
    let results = out["results"].as_array().unwrap();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["index"], i);
        assert_eq!(r["status"], "sent");
    }
    let mut subjects: Vec<String> = s
        .smtp
        .delivered()
        .iter()
        .map(|r| subject(&r.data))
        .collect();
    subjects.sort();
    let mut want: Vec<String> = names.iter().map(|n| format!("Hello {n}")).collect();
    want.sort();
    assert_eq!(subjects, want);
    for r in s.smtp.delivered() {
        assert_eq!(r.mail_from, "news@example.org");
        assert_eq!(r.rcpt_to.len(), 1);
    }
    // The batch's messages, and only they, by its id.
    let batch = out["batch_id"].as_str().unwrap();
    call(
        &s,
        "send_email",
        json!({"to": ["x@example.org"], "subject": "s", "body": "b"}),
    )
    .await;
    let (_, listed) = call(&s, "list_messages", json!({"batch_id": batch})).await;
    assert_eq!(listed["messages"].as_array().unwrap().len(), 5, "{listed}");
    // With the batch's progress on its first page, whatever status the
    // page asks for; later pages leave it out.
    assert_eq!(listed["summary"], json!({"sent": 5}), "{listed}");
    let (_, first) = call(&s, "list_messages", json!({"batch_id": batch, "limit": 2})).await;
    assert_eq!(first["summary"], json!({"sent": 5}), "{first}");
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, second) = call(
        &s,
        "list_messages",
        json!({"batch_id": batch, "limit": 2, "cursor": cursor}),
    )
    .await;
    assert_eq!(second["messages"].as_array().unwrap().len(), 2, "{second}");
    assert!(second.get("summary").is_none(), "{second}");
    let (_, failed) = call(
        &s,
        "list_messages",
        json!({"batch_id": batch, "status": "failed"}),
    )
    .await;
    assert!(
        failed["messages"].as_array().unwrap().is_empty(),
        "{failed}"
    );
    assert_eq!(failed["summary"], json!({"sent": 5}), "{failed}");
    let (_, none) = call(&s, "list_messages", json!({"batch_id": "batch-none"})).await;
    assert_eq!(none["summary"], json!({}), "{none}");
    // By a recipient's address or part of one, in any case.
    let (_, grace) = call(&s, "list_messages", json!({"recipient": "GRACE@"})).await;
    let found = grace["messages"].as_array().unwrap();
    assert_eq!(found.len(), 1, "{grace}");
    assert_eq!(
        found[0]["recipients"],
        json!(["grace@example.org"]),
        "{grace}"
    );
    assert!(grace.get("next_cursor").is_none(), "{grace}");
    let (_, domain) = call(
        &s,
        "list_messages",
        json!({"recipient": " @Example.org ", "batch_id": batch, "limit": 3}),
    )
    .await;
    assert_eq!(domain["messages"].as_array().unwrap().len(), 3, "{domain}");
    assert_eq!(domain["summary"], json!({"sent": 5}), "{domain}");
    let (_, nobody) = call(&s, "list_messages", json!({"recipient": "nobody@"})).await;
    assert!(
        nobody["messages"].as_array().unwrap().is_empty(),
        "{nobody}"
    );
    for (bad, rule) in [(json!("  "), "empty"), (json!("a".repeat(255)), "length")] {
        let (is_error, out) = call(&s, "list_messages", json!({"recipient": bad})).await;
        assert!(is_error, "{out}");
        assert_eq!(
            (
                &out["error"]["code"],
                &out["error"]["field"],
                &out["error"]["rule"]
            ),
            (&json!("invalid_input"), &json!("recipient"), &json!(rule)),
            "{out}"
        );
    }
    let (_, plain) = call(&s, "list_messages", json!({})).await;
    assert!(plain.get("summary").is_none(), "{plain}");
    // A batch and a tag whose messages are in several states.
    let (_, later) = call(
        &s,
        "send_batch",
        json!({
            "defaults": {"subject": "later", "body": "b", "tag": "spring"},
            "messages": [{"to": "a@example.org"}, {"to": "b@example.org"}, {"to": "c@example.org"}],
            "send_at": "1h",
        }),
    )
    .await;
    let later_id = later["batch_id"].as_str().unwrap();
    let one = later["results"][0]["message_id"].as_str().unwrap();
    // An id as a Message-ID header writes it, in angle brackets.
    let (_, c) = call(
        &s,
        "cancel_message",
        json!({"message_id": format!(" <{one}>")}),
    )
    .await;
    assert_eq!(c["cancelled"], true, "{c}");
    assert_eq!(c["message_id"], one, "{c}");
    call(
        &s,
        "send_email",
        json!({"to": "d@example.org", "subject": "s", "body": "b", "tag": "spring"}),
    )
    .await;
    let (_, listed) = call(&s, "list_messages", json!({"batch_id": later_id})).await;
    assert_eq!(
        listed["summary"],
        json!({"scheduled": 2, "cancelled": 1}),
        "{listed}"
    );
    let (_, tagged) = call(&s, "list_messages", json!({"tag": "spring", "limit": 1})).await;
    assert_eq!(
        tagged["summary"],
        json!({"scheduled": 2, "cancelled": 1, "sent": 1}),
        "{tagged}"
    );
    // Each message names its batch, so that it can be found from one of
    // them (a call whose answer was lost); a single send names none.
    let (_, all) = call(&s, "list_messages", json!({"limit": 100})).await;
    let all = all["messages"].as_array().unwrap();
    // Newest first: the tag's send, the later batch, then the single send.
    let all = &all[4..];
    assert_eq!(all.len(), 6);
    assert!(all[0]["batch_id"].is_null(), "{}", all[0]);
    assert!(all[1..].iter().all(|m| m["batch_id"] == batch), "{all:?}");
    let id = results[2]["message_id"].as_str().unwrap();
    let (_, status) = call(&s, "get_message_status", json!({"message_id": id})).await;
    assert_eq!(status["status"], "sent");
    assert_eq!(status["batch_id"], batch, "{status}");
    let bracketed = json!({"message_id": format!("<{id}>")});
    let (_, again) = call(&s, "get_message_status", bracketed).await;
    assert_eq!(again, status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_messages_are_reported_and_the_valid_ones_sent() {
    let s = setup(1000).await;
    let batch = json!({
        "defaults": {"subject": "Hi {name}", "body": "b"},
        "messages": [
            {"to": ["a@example.org"], "template_vars": {"name": "A"}},
            {"to": ["not an address"], "template_vars": {"name": "B"}},
            {"to": ["c@example.org"]},
            {"to": ["d@example.org"], "template_vars": {"name": "D"}, "colour": "red"},
            {"to": ["e@example.org"], "template_vars": {"name": "E"}, "wait": false},
            {"to": ["f@example.org"], "template_vars": {"name": "F"}},
            {"to": 7, "template_vars": {"name": "G"}},
            {"to": ["h@example.org"], "template_vars": {"name": "H I"},
             "list_unsubscribe": "https://example.org/u?n={name}"},
            {"to": ["i@example.org"], "template_vars": {"name": "I"}, "list_unsubscribe": [5]},
            {"to": ["j@example.org"], "template_vars": {"name": "J"},
             "headers": {"X-Ticket": "J-1", "Bcc": "k@example.org"}},
            {"to": ["l@example.org"], "template_vars": {"name": "L"}, "headers": {"X-Ticket": 5}},
            {"to": ["m@example.org"], "template_vars": {"name": "M"}, "priority": "urgent"},
            {"to": ["n@example.org"], "template_vars": {"name": "N"}, "priority": "high"},
        ],
    });
    let (is_error, out) = call(&s, "send_batch", batch.clone()).await;
    assert!(
        !is_error,
        "a partly invalid batch is not an error result: {out}"
    );
    let r = out["results"].as_array().unwrap();
    assert_eq!(r[0]["status"], "sent");
    assert_eq!(r[1]["error"]["code"], "invalid_input");
    assert_eq!(r[1]["error"]["field"], "messages[1].to[0]");
    assert_eq!(r[2]["error"]["rule"], "missing_template_vars", "{}", r[2]);
    assert!(
        r[2]["error"]["field"]
            .as_str()
            .unwrap()
            .starts_with("messages[2].")
    );
    assert_eq!(r[3]["error"]["field"], "messages[3].colour");
    assert_eq!(r[4]["error"]["field"], "messages[4].wait");
    assert_eq!(r[5]["status"], "sent");
    assert_eq!(r[6]["error"]["field"], "messages[6].to");
    assert_eq!(r[6]["error"]["rule"], "schema");
    // A link checked as rendered: the space a variable brought is refused.
    assert_eq!(r[7]["error"]["field"], "messages[7].list_unsubscribe[0]");
    assert_eq!(r[7]["error"]["rule"], "invalid_uri", "{}", r[7]);
    assert_eq!(r[8]["error"]["field"], "messages[8].list_unsubscribe[0]");
    assert_eq!(r[8]["error"]["rule"], "schema");
    // A field that would add a recipient unseen, and one of the wrong type.
    assert_eq!(r[9]["error"]["field"], "messages[9].headers.Bcc");
    assert_eq!(r[9]["error"]["rule"], "header_not_allowed", "{}", r[9]);
    assert_eq!(r[10]["error"]["field"], "messages[10].headers.X-Ticket");
    assert_eq!(r[10]["error"]["rule"], "schema");
    assert_eq!(r[11]["error"]["field"], "messages[11].priority");
    assert_eq!(r[11]["error"]["rule"], "schema");
    assert_eq!(r[12]["status"], "sent", "{}", r[12]);
    let id = r[12]["message_id"].as_str().unwrap();
    let (_, status) = call(&s, "get_message_status", json!({"message_id": id})).await;
    assert_eq!(status["priority"], "high", "{status}");
    let (_, listed) = call(&s, "list_messages", json!({})).await;
    let high: Vec<&Value> = listed["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m.get("priority").is_some())
        .collect();
    assert_eq!(high.len(), 1, "{listed}");
    assert_eq!(high[0]["message_id"], id);
    assert_eq!(high[0]["priority"], "high");
    assert_eq!(out["summary"], json!({"refused": 10, "sent": 3}));
    assert_eq!(s.smtp.delivered().len(), 3);

    // atomic: the same batch queues nothing and is an error listing each.
    let mut atomic = batch;
    atomic["atomic"] = json!(true);
    let (is_error, out) = call(&s, "send_batch", atomic).await;
    assert!(is_error, "{out}");
    assert_eq!(out["error"]["code"], "invalid_batch");
    let message = out["error"]["message"].as_str().unwrap();
    for f in [
        "messages[1].to[0]",
        "messages[3].colour",
        "messages[4].wait",
        "messages[6].to",
        "messages[7].list_unsubscribe[0]",
        "messages[8].list_unsubscribe[0]",
        "messages[9].headers.Bcc",
        "messages[10].headers.X-Ticket",
        "messages[11].priority",
    ] {
        assert!(message.contains(f), "{f} not in {message}");
    }
    // A shared field of the wrong type refuses the whole batch, naming it.
    let (is_error, out) = call(
        &s,
        "send_batch",
        json!({"defaults": {"subject": 5}, "messages": [{"to": ["a@example.org"]}]}),
    )
    .await;
    assert!(is_error, "{out}");
    assert_eq!(out["error"]["field"], "defaults.subject", "{out}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.smtp.delivered().len(), 3, "atomic queued nothing");
    let (_, listed) = call(&s, "list_messages", json!({})).await;
    assert_eq!(listed["messages"].as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_dry_runs_and_limits_apply_per_message() {
    let s = setup(3).await;
    let batch = json!({
        "defaults": {"subject": "once", "body": "b"},
        "messages": [
            {"to": ["a@example.org"], "idempotency_key": "k-a"},
            {"to": ["b@example.org"], "idempotency_key": "k-b"},
        ],
        "wait": false,
    });
    let (_, first) = call(&s, "send_batch", batch.clone()).await;
    assert_eq!(first["summary"], json!({"queued": 2}), "{first}");
    let (_, again) = call(&s, "send_batch", batch).await;
    for (i, r) in again["results"].as_array().unwrap().iter().enumerate() {
        assert_eq!(r["idempotent_replay"], true, "{r}");
        assert_eq!(r["message_id"], first["results"][i]["message_id"]);
    }
    assert!(s.smtp.wait_for_delivered(2, Duration::from_secs(10)).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.smtp.delivered().len(), 2, "each message once");

    // The same key with other content in a batch is a conflict.
    let (_, out) = call(
        &s,
        "send_batch",
        json!({"defaults": {"subject": "other", "body": "b"},
               "messages": [{"to": ["a@example.org"], "idempotency_key": "k-a"}]}),
    )
    .await;
    assert_eq!(
        out["results"][0]["error"]["code"], "idempotency_conflict",
        "{out}"
    );
    assert_eq!(
        out["results"][0]["error"]["field"],
        "messages[0].idempotency_key"
    );

    let (_, out) = call(
        &s,
        "send_batch",
        json!({"defaults": {"subject": "s", "body": "b"}, "dry_run": true,
               "messages": [{"to": ["p@example.org"]}, {"to": ["q@example.org"]}]}),
    )
    .await;
    assert_eq!(out["summary"], json!({"dry_run": 2}), "{out}");

    let four: Vec<Value> = (0..4)
        .map(|i| json!({"to": [format!("r{i}@example.org")]}))
        .collect();
    let (is_error, out) = call(&s, "send_batch", json!({"messages": four})).await;
    assert!(is_error);
    assert_eq!(out["error"]["field"], "messages");
    let (is_error, out) = call(&s, "send_batch", json!({"messages": [], "defaults": {}})).await;
    assert!(is_error && out["error"]["rule"] == "count", "{out}");
    let (is_error, out) = call(
        &s,
        "send_batch",
        json!({"defaults": {"idempotency_key": "shared"}, "messages": [{"to": ["a@example.org"]}]}),
    )
    .await;
    assert!(
        is_error && out["error"]["field"] == "defaults.idempotency_key",
        "{out}"
    );
    assert_eq!(s.smtp.delivered().len(), 2, "nothing else was sent");
}

/// A batch whose messages total more than `max_message_bytes` once
/// composed is refused whole, naming the field; nothing is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_max_message_bytes_in_total_is_refused() {
    let smtp = FaultSmtp::start(Script::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(vec![relay("primary", smtp.port(), 100)]);
    cfg.queue.store = StoreKind::Sqlite {
        path: dir.path().join("queue.db"),
    };
    cfg.daemon.compose.max_message_bytes = 64 * 1024;
    let s = Setup {
        smtp,
        h: InProcess::start(cfg, Sources::default()).await,
        _dir: dir,
    };
    // Each message is about 10 KiB: one fits, ten do not together.
    let body = "x".repeat(10 * 1024);
    let ten: Vec<Value> = (0..10)
        .map(|i| json!({"to": [format!("t{i}@example.org")]}))
        .collect();
    let (is_error, out) = call(
        &s,
        "send_batch",
        json!({"defaults": {"subject": "big", "body": body}, "messages": ten, "wait": false}),
    )
    .await;
    assert!(is_error, "{out}");
    assert_eq!(out["error"]["field"], "messages", "{out}");
    assert_eq!(out["error"]["rule"], "max_message_bytes", "{out}");
    let (_, listed) = call(&s, "list_messages", json!({})).await;
    assert_eq!(listed["messages"], json!([]), "nothing queued: {listed}");
    let (is_error, out) = call(
        &s,
        "send_batch",
        json!({"defaults": {"subject": "big", "body": body},
               "messages": [{"to": ["one@example.org"]}], "wait": false}),
    )
    .await;
    assert!(!is_error, "{out}");
    assert!(s.smtp.wait_for_delivered(1, Duration::from_secs(10)).await);
    assert_eq!(s.smtp.delivered().len(), 1);
}

/// A body of about `kib` KiB in short lines.
fn long_body(kib: usize) -> String {
    "a line of a long letter, short enough to be sent as it is.\n".repeat(kib * 1024 / 60)
}

/// A batch of about 6 MB once composed, over the 4 MiB a batch holds: its
/// messages go into the store's transaction as they are composed, and are
/// delivered from the store. Each arrives once with its own variables, an
/// invalid one is reported on its own, and a second call with the same
/// keys sends nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_a_batch_holds_is_stored_as_it_is_composed() {
    let s = setup(1000).await;
    let body = format!("Dear {{name}},\n{}", long_body(100));
    let messages: Vec<Value> = (0..60)
        .map(|i| {
            let to = if i == 45 {
                "not an address".to_string()
            } else {
                format!("r{i}@example.org")
            };
            json!({"to": [to], "template_vars": {"name": format!("N{i}")},
                   "idempotency_key": format!("big-{i}")})
        })
        .collect();
    let batch = json!({
        "defaults": {"subject": "Hello {name}", "body": body, "from_email": "news@example.org"},
        "messages": messages,
    });
    let (is_error, out) = call(&s, "send_batch", batch.clone()).await;
    assert!(!is_error, "{}", out["summary"]);
    assert_eq!(out["summary"], json!({"refused": 1, "sent": 59}));
    let results = out["results"].as_array().unwrap();
    assert_eq!(results[45]["error"]["field"], "messages[45].to[0]");
    let mut want = Vec::new();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["index"], i);
        if i != 45 {
            assert_eq!(r["status"], "sent", "{i}");
            want.push((format!("r{i}@example.org"), format!("Hello N{i}")));
        }
    }
    let mut got: Vec<(String, String)> = s
        .smtp
        .delivered()
        .iter()
        .map(|r| (r.rcpt_to.join(","), subject(&r.data)))
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "each message once, with its own variables");
    for r in s.smtp.delivered() {
        let text = String::from_utf8_lossy(&r.data);
        let name = subject(&r.data).replace("Hello ", "");
        assert!(text.contains(&format!("Dear {name},")), "its own body");
        assert!(r.data.len() > 100 * 1000, "the whole body");
    }
    let (_, again) = call(&s, "send_batch", batch).await;
    for (i, r) in again["results"].as_array().unwrap().iter().enumerate() {
        if i != 45 {
            assert_eq!(r["idempotent_replay"], true, "{r}");
            assert_eq!(r["message_id"], results[i]["message_id"]);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.smtp.delivered().len(), 59, "nothing sent twice");
}

/// Past the 4 MiB a batch holds, a batch that is refused in the end (an
/// atomic one with its last message invalid, one over `max_message_bytes`
/// in total) stores nothing of what it had already written; `wait: false`
/// answers `queued` and the runner delivers each message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_refused_at_its_end_stores_nothing() {
    let s = setup(1000).await;
    let body = long_body(100);
    let mut messages: Vec<Value> = (0..60)
        .map(|i| json!({"to": [format!("r{i}@example.org")]}))
        .collect();
    messages.push(json!({"to": ["not an address"]}));
    let (is_error, out) = call(
        &s,
        "send_batch",
        json!({"defaults": {"subject": "s", "body": body}, "messages": messages, "atomic": true}),
    )
    .await;
    assert!(is_error, "{}", out["error"]);
    assert_eq!(out["error"]["code"], "invalid_batch");
    assert_eq!(out["error"]["field"], "messages[60].to[0]");
    // Over the default max_message_bytes (10 MiB) in total.
    let many: Vec<Value> = (0..110)
        .map(|i| json!({"to": [format!("m{i}@example.org")]}))
        .collect();
    let (is_error, out) = call(
        &s,
        "send_batch",
        json!({"defaults": {"subject": "s", "body": body}, "messages": many}),
    )
    .await;
    assert!(is_error, "{}", out["error"]);
    assert_eq!(out["error"]["rule"], "max_message_bytes");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, listed) = call(&s, "list_messages", json!({})).await;
    assert_eq!(listed["messages"], json!([]), "nothing stored");
    assert_eq!(s.smtp.delivered().len(), 0);

    let fifty: Vec<Value> = (0..50)
        .map(|i| json!({"to": [format!("q{i}@example.org")]}))
        .collect();
    let (is_error, out) = call(
        &s,
        "send_batch",
        json!({"defaults": {"subject": "s", "body": body}, "messages": fifty, "wait": false}),
    )
    .await;
    assert!(!is_error, "{}", out["error"]);
    assert_eq!(out["summary"], json!({"queued": 50}));
    assert!(s.smtp.wait_for_delivered(50, Duration::from_secs(30)).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut rcpts = recipients(&s);
    rcpts.dedup();
    assert_eq!(rcpts.len(), 50, "each once");
    assert_eq!(s.smtp.delivered().len(), 50);
}

/// An idempotency key that names an earlier message with other content is
/// found as the batch is stored; with `atomic`, it refuses the whole batch
/// there, whether the batch was stored in one write or, over the 4 MiB a
/// batch holds, as it was composed: nothing of it is stored, not even its
/// new keys. A key given twice in one batch for different messages is
/// refused before anything is stored; given twice for the same message, the
/// second is a replay of the first, with its status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_conflict_refuses_an_atomic_batch_whole() {
    let s = setup(1000).await;
    let (_, first) = call(
        &s,
        "send_batch",
        json!({"defaults": {"subject": "first", "body": "b"},
               "messages": [{"to": ["a@example.org"], "idempotency_key": "k-a"}]}),
    )
    .await;
    assert_eq!(first["summary"], json!({"sent": 1}), "{first}");
    let conflicting =
        json!({"to": ["a@example.org"], "idempotency_key": "k-a", "subject": "other"});

    let small =
        json!([{"to": ["b@example.org"], "idempotency_key": "k-b"}, {"to": ["c@example.org"]}]);
    let mut with_conflict = small.as_array().unwrap().clone();
    with_conflict.push(conflicting.clone());
    let body = long_body(100);
    let mut large: Vec<Value> = (0..50)
        .map(|i| json!({"to": [format!("l{i}@example.org")], "idempotency_key": format!("l-{i}")}))
        .collect();
    large.push(conflicting);
    for (messages, body) in [(with_conflict, "b".to_string()), (large, body)] {
        let n = messages.len();
        let (is_error, out) = call(
            &s,
            "send_batch",
            json!({"defaults": {"subject": "s", "body": body}, "messages": messages, "atomic": true}),
        )
        .await;
        assert!(is_error, "{}", out["summary"]);
        assert_eq!(out["error"]["code"], "invalid_batch", "{}", out["error"]);
        let field = format!("messages[{}].idempotency_key", n - 1);
        assert_eq!(out["error"]["field"], field.as_str());
        let results = out["results"].as_array().unwrap();
        assert_eq!(results[n - 1]["error"]["code"], "idempotency_conflict");
        assert!(
            results[..n - 1]
                .iter()
                .all(|r| r["message_id"].is_null() && r["error"].is_null()),
            "{}",
            out["results"]
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, listed) = call(&s, "list_messages", json!({})).await;
    assert_eq!(
        listed["messages"].as_array().unwrap().len(),
        1,
        "only the first message is stored: {listed}"
    );

    // Its keys were not kept: the batch without the conflict sends each.
    let (is_error, out) = call(
        &s,
        "send_batch",
        json!({"defaults": {"subject": "s", "body": "b"}, "messages": small, "atomic": true}),
    )
    .await;
    assert!(!is_error, "{}", out["error"]);
    assert_eq!(out["summary"], json!({"sent": 2}), "{out}");

    // A key twice in one batch.
    let (is_error, out) = call(
        &s,
        "send_batch",
        json!({"defaults": {"subject": "s", "body": "b"}, "messages": [
            {"to": ["d@example.org"], "idempotency_key": "dup"},
            {"to": ["e@example.org"], "idempotency_key": "dup"},
            {"to": ["f@example.org"], "idempotency_key": "same"},
            {"to": ["f@example.org"], "idempotency_key": "same"},
        ]}),
    )
    .await;
    assert!(!is_error, "{}", out["error"]);
    let r = out["results"].as_array().unwrap();
    assert_eq!(r[0]["status"], "sent", "{out}");
    assert_eq!(r[1]["error"]["code"], "idempotency_conflict", "{out}");
    assert!(
        r[1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("messages[0]"),
        "{out}"
    );
    assert_eq!(r[2]["status"], "sent", "{out}");
    assert_eq!(r[3]["idempotent_replay"], true, "{out}");
    assert_eq!(r[3]["message_id"], r[2]["message_id"]);
    assert_eq!(r[3]["status"], "sent", "the first's status: {out}");

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        recipients(&s),
        [
            "a@example.org",
            "b@example.org",
            "c@example.org",
            "d@example.org",
            "f@example.org"
        ]
    );
}

/// The decoded content of the attachment named `filename` in a message as
/// sent (lettre writes it base64-encoded, in lines).
fn attachment(data: &[u8], filename: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let text = String::from_utf8_lossy(data);
    let at = text.find(&format!("filename=\"{filename}\""))?;
    let start = at + text[at..].find("\r\n\r\n")? + 4;
    let end = start + text[start..].find("\r\n--")?;
    let b64: String = text[start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

/// Attachments in `defaults` are decoded once for the whole batch and reach
/// every message that has none of its own, byte for byte; a message with
/// its own keeps only its own. The shared attachments are part of each
/// message's content for its idempotency key. Bad base64 in the defaults
/// refuses the whole batch, naming the field under `defaults`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_in_defaults_reach_every_message() {
    use base64::Engine;
    let b64 = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(d);
    let s = setup(1000).await;
    let report: Vec<u8> = (0..48 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let own = b"an attachment of its own\n".to_vec();
    let batch = |content: &str| {
        let mut messages: Vec<Value> = (0..40)
            .map(|i| json!({"to": [format!("m{i}@example.org")], "idempotency_key": format!("att-{i}")}))
            .collect();
        messages.push(
            json!({"to": ["own@example.org"], "idempotency_key": "att-own",
            "attachments": [{"filename": "own.txt", "content_base64": b64(&own)}]}),
        );
        json!({"defaults": {"subject": "with attachment", "body": "see attached",
                            "attachments": [{"filename": "report.bin", "content_base64": content}]},
               "messages": messages})
    };
    let (is_error, out) = call(&s, "send_batch", batch(&b64(&report))).await;
    assert!(!is_error, "{out}");
    assert_eq!(out["summary"], json!({"sent": 41}), "{out}");
    let delivered = s.smtp.delivered();
    assert_eq!(delivered.len(), 41);
    for r in &delivered {
        if r.rcpt_to == ["own@example.org"] {
            assert_eq!(attachment(&r.data, "own.txt"), Some(own.clone()));
            assert_eq!(attachment(&r.data, "report.bin"), None);
        } else {
            assert_eq!(
                attachment(&r.data, "report.bin").as_deref(),
                Some(&report[..]),
                "{:?}",
                r.rcpt_to
            );
        }
    }

    // The same batch again: every message a replay, nothing sent again.
    let (_, again) = call(&s, "send_batch", batch(&b64(&report))).await;
    let results = again["results"].as_array().unwrap();
    assert!(
        results.iter().all(|r| r["idempotent_replay"] == true),
        "{again}"
    );
    // Other shared attachments under the same keys: conflicts, except the
    // message with its own attachment, whose content did not change.
    let mut other = report.clone();
    other[0] ^= 1;
    let (_, changed) = call(&s, "send_batch", batch(&b64(&other))).await;
    let results = changed["results"].as_array().unwrap();
    for r in &results[..40] {
        assert_eq!(r["error"]["code"], "idempotency_conflict", "{r}");
    }
    assert_eq!(results[40]["idempotent_replay"], true, "{changed}");

    // Bad base64 in the defaults: the whole batch is refused.
    let (is_error, bad) = call(&s, "send_batch", batch("not base64!")).await;
    assert!(is_error, "{bad}");
    assert_eq!(
        bad["error"]["field"], "defaults.attachments[0].content_base64",
        "{bad}"
    );
    assert_eq!(bad["error"]["code"], "invalid_input", "{bad}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.smtp.delivered().len(), 41, "nothing more was sent");
}

/// `cancel_message` with a `batch_id` cancels every message of that batch
/// that can still be cancelled, in one call, and says how many; a batch
/// already sent is `not_cancellable`, an unknown one `not_found`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_message_with_a_batch_id_cancels_the_whole_batch() {
    let s = setup(1000).await;
    let batch = |tag: &str, extra: Value| common::batch_args(tag, 4, extra);
    let (is_error, later) = call(&s, "send_batch", batch("later", json!({"send_at": "2s"}))).await;
    assert!(!is_error, "{later}");
    assert_eq!(later["summary"], json!({"scheduled": 4}), "{later}");
    let later_batch = later["batch_id"].as_str().unwrap();
    let (is_error, now) = call(&s, "send_batch", batch("now", json!({}))).await;
    assert!(!is_error, "{now}");
    assert_eq!(now["summary"], json!({"sent": 4}), "{now}");
    let now_batch = now["batch_id"].as_str().unwrap();

    let one = later["results"][0]["message_id"].as_str().unwrap();
    let (is_error, out) = call(&s, "cancel_message", json!({"message_id": one})).await;
    assert!(!is_error, "{out}");
    let (is_error, out) = call(&s, "cancel_message", json!({"batch_id": later_batch})).await;
    assert!(!is_error, "{out}");
    assert_eq!(out["cancelled"], true, "{out}");
    assert_eq!(out["cancelled_count"], 3, "{out}");
    assert_eq!(out["summary"], json!({"cancelled": 4}), "{out}");
    assert_eq!(out["batch_id"], later_batch, "{out}");
    for r in later["results"].as_array().unwrap() {
        let (_, st) = call(
            &s,
            "get_message_status",
            json!({"message_id": r["message_id"]}),
        )
        .await;
        assert_eq!(st["status"], "cancelled", "{st}");
    }

    let (is_error, out) = call(&s, "cancel_message", json!({"batch_id": later_batch})).await;
    assert!(is_error, "nothing left to cancel: {out}");
    assert_eq!(out["error"]["code"], "not_cancellable", "{out}");
    assert_eq!(out["cancelled_count"], 0, "{out}");
    let (is_error, out) = call(&s, "cancel_message", json!({"batch_id": now_batch})).await;
    assert!(is_error, "{out}");
    assert_eq!(out["error"]["code"], "not_cancellable", "{out}");
    assert_eq!(out["summary"], json!({"sent": 4}), "{out}");
    let (is_error, out) = call(&s, "cancel_message", json!({"batch_id": "batch-none"})).await;
    assert!(is_error, "{out}");
    assert_eq!(out["error"]["code"], "not_found", "{out}");
    let both = json!({"message_id": one, "batch_id": later_batch});
    let (is_error, out) = call(&s, "cancel_message", both).await;
    assert!(is_error, "{out}");
    assert_eq!(out["error"]["code"], "invalid_input", "{out}");
    let (is_error, out) = call(&s, "cancel_message", json!({})).await;
    assert!(is_error, "{out}");
    assert_eq!(out["error"]["code"], "invalid_input", "{out}");
    // An empty id names nothing, and is refused as such.
    for field in ["batch_id", "message_id"] {
        let (is_error, out) = call(&s, "cancel_message", json!({ field: " " })).await;
        assert!(is_error, "{out}");
        assert_eq!(out["error"]["code"], "invalid_input", "{out}");
        assert_eq!(out["error"]["field"], field, "{out}");
        assert_eq!(out["error"]["rule"], "empty", "{out}");
    }

    // Past the batch's send_at: only the batch sent at once is at the sink.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let want: Vec<String> = (0..4).map(|i| format!("now+{i}@example.org")).collect();
    assert_eq!(recipients(&s), want);
}
