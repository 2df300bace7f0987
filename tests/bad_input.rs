//! The bad-input table on its own: each entry gets a tool error with
//! `invalid_input`, the field and the rule, and the SMTP server receives
//! nothing. The same table runs during a burst in `tests/reliability.rs`.

mod common;
#[path = "../actors/tests/support/mod.rs"]
mod support;

#[path = "reliability/bad_input.rs"]
mod bad_input;
#[path = "reliability/harness.rs"]
mod harness;
#[path = "reliability/random_input.rs"]
mod random_input;
#[path = "reliability/reconcile.rs"]
mod reconcile;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{config, relay};
use mailmux::config::Sources;
use mailmux_actors::queue::StoreKind;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use support::fault_smtp::{AfterDot, FaultSmtp, Phase, Script};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_is_refused_with_its_field_and_rule() {
    let attachments = bad_input::AttachmentsDir::create();
    let smtp = FaultSmtp::start(Script::ok()).await;
    let mut cfg = config(vec![relay("only", smtp.port(), 1)]);
    cfg.daemon.compose = attachments.policy();
    let d = harness::InProcess::start(cfg, Sources::default()).await;

    let cases = bad_input::cases(&attachments.path());
    let mut calls = Vec::new();
    let mut problems = Vec::new();
    for case in &cases {
        // A FIFO or a slow path must not hang the call.
        let c = harness::call(
            d.peer(),
            case.name,
            "send_email",
            case.args.clone(),
            Duration::from_secs(10),
        )
        .await;
        if let Err(e) = bad_input::check(case, &c) {
            problems.push(e);
        }
        // The text an agent reads names the field.
        if let harness::Answer::Result { text, .. } = &c.answer {
            let field = case.field.split(['[', '.']).next().unwrap_or(case.field);
            if !text.contains(field) {
                problems.push(format!(
                    "{}: the text does not name {field}: {text}",
                    case.name
                ));
            }
        }
        calls.push(c);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    let tally = reconcile::reconcile(&calls, &[&smtp]).await;
    assert_eq!(tally.codes.get("invalid_input"), Some(&cases.len()));
    assert!(smtp.received().is_empty());
    assert_eq!(smtp.commands(support::fault_smtp::Phase::Mail), 0);
}

/// The messages a call was answered with: (Message-ID, status), for
/// `send_email` and for each item of a batch.
fn answered(tool: &str, c: &harness::Call) -> Vec<(String, String)> {
    let Some(v) = c.value() else {
        return Vec::new();
    };
    let one = |v: &Value| {
        let id = v["message_id"].as_str()?;
        let status = v["status"].as_str()?;
        Some((format!("<{id}>"), status.to_string()))
    };
    match tool {
        "send_batch" => v["results"]
            .as_array()
            .map(|rs| rs.iter().filter_map(one).collect())
            .unwrap_or_default(),
        "send_email" => one(v).into_iter().collect(),
        _ => Vec::new(),
    }
}

/// `args` with each [`random_input::EARLIER`] replaced by the id of a
/// message answered earlier in the run (the `pick`-th, wrapping), when
/// there is one.
fn with_earlier(args: &Value, earlier: &[String], pick: usize) -> Value {
    match args {
        Value::String(s) if s.contains(random_input::EARLIER) && !earlier.is_empty() => {
            Value::String(s.replace(random_input::EARLIER, &earlier[pick % earlier.len()]))
        }
        Value::Array(a) => Value::Array(a.iter().map(|v| with_earlier(v, earlier, pick)).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), with_earlier(v, earlier, pick)))
                .collect(),
        ),
        v => v.clone(),
    }
}

/// The names of a message's content anywhere in an answer: none may be
/// there, whatever the call asked.
fn content_fields(v: &Value, at: &str, found: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if ["body", "html_body", "content_base64"].contains(&k.as_str()) {
                    found.push(format!("{at}.{k}"));
                }
                content_fields(v, &format!("{at}.{k}"), found);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                content_fields(v, &format!("{at}[{i}]"), found);
            }
        }
        _ => {}
    }
}

/// Random arguments (`tests/reliability/random_input.rs`): about 1,950
/// `send_email`, 600 `send_batch` and 150 each of `list_messages`,
/// `get_message_status` and `cancel_message` calls (the last two often
/// naming a message answered earlier in the run), eight at a time, on the
/// SQLite store. Every call is answered, as a tool result or a JSON-RPC
/// "invalid params" error, and no answer of the message tools holds a
/// message's content;
/// nothing panics; the server holds only messages a call was answered as
/// sent, queued or unknown, none twice, and every one answered sent. The
/// seed is printed; `MAILMUX_RANDOM_SEED` replays a run (the ids of
/// earlier messages are the run's own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_arguments_are_answered_and_send_only_what_was_answered() {
    let panics = random_input::count_panics();
    let seed = random_input::seed();
    eprintln!("random input: MAILMUX_RANDOM_SEED={seed} replays this run");
    let attachments = bad_input::AttachmentsDir::create();
    let smtp = FaultSmtp::start(Script::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(vec![relay("only", smtp.port(), 1)]);
    cfg.daemon.compose = attachments.policy();
    cfg.queue.store = StoreKind::Sqlite {
        path: dir.path().join("queue.db"),
    };
    let d = harness::InProcess::start(cfg, Sources::default()).await;

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let jobs: Vec<(&str, Value)> = (0..3000)
        .map(|i| match rng.random_range(0..100) {
            0..65 => ("send_email", random_input::send_email(&mut rng, i)),
            65..85 => ("send_batch", random_input::send_batch(&mut rng, i)),
            85..90 => ("list_messages", random_input::list_messages(&mut rng)),
            90..95 => (
                "get_message_status",
                random_input::get_message_status(&mut rng),
            ),
            _ => ("cancel_message", random_input::cancel_message(&mut rng)),
        })
        .collect();
    let gate = Arc::new(tokio::sync::Semaphore::new(8));
    let earlier = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut running = tokio::task::JoinSet::new();
    for (i, (tool, args)) in jobs.iter().cloned().enumerate() {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let peer = d.peer().clone();
        let earlier = earlier.clone();
        running.spawn(async move {
            let args = with_earlier(&args, &earlier.lock().unwrap(), i);
            let c = harness::call(
                &peer,
                format!("{tool} {i}"),
                tool,
                args.clone(),
                Duration::from_secs(20),
            )
            .await;
            drop(permit);
            let ids = answered(tool, &c)
                .into_iter()
                .map(|(id, _)| id.trim_matches(['<', '>']).to_string());
            earlier.lock().unwrap().extend(ids);
            (i, args, c)
        });
    }
    let mut calls = Vec::new();
    while let Some(done) = running.join_next().await {
        calls.push(done.unwrap());
    }
    calls.sort_by_key(|(i, _, _)| *i);

    let mut problems = Vec::new();
    let (mut allowed, mut must_arrive) = (HashSet::new(), HashSet::new());
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for (i, args, c) in &calls {
        let tool = &jobs[*i].0;
        // The message tools show the envelope and the outcome, never the
        // content (a dry run's answer is the caller's own rendering).
        if !tool.starts_with("send_")
            && let Some(v) = c.value()
        {
            let mut found = Vec::new();
            content_fields(v, "", &mut found);
            if !found.is_empty() {
                problems.push(format!("{tool} {i}: content in the answer: {found:?}"));
            }
        }
        let kind = match &c.answer {
            harness::Answer::TimedOut => {
                problems.push(format!("{tool} {i}: no answer in 20 s: {args}"));
                "no answer".to_string()
            }
            harness::Answer::Protocol(e) => {
                if !e.contains("-32602") {
                    problems.push(format!("{tool} {i}: {e}: {args}"));
                }
                "invalid params".to_string()
            }
            harness::Answer::Result { value, .. } => {
                let code = value["error"]["code"].as_str();
                if c.is_error() && code.is_none_or(str::is_empty) {
                    problems.push(format!("{tool} {i}: an error with no code: {value}"));
                }
                let page = value["messages"].is_array().then_some("page");
                code.or(value["status"].as_str())
                    .or(page)
                    .unwrap_or("?")
                    .to_string()
            }
        };
        *tally.entry(format!("{tool}: {kind}")).or_default() += 1;
        for (id, status) in answered(tool, c) {
            if *tool == "send_batch" {
                *tally.entry(format!("{tool} item: {status}")).or_default() += 1;
            }
            match status.as_str() {
                "sent" | "partial" => {
                    must_arrive.insert(id.clone());
                    allowed.insert(id);
                }
                "queued" | "unknown" | "scheduled" => {
                    allowed.insert(id);
                }
                _ => {}
            }
        }
    }
    eprintln!("random input: {tally:?}");

    // Messages answered `queued` (`wait: false`) are delivered after their
    // call: wait until the server has held still for a second.
    let mut last = usize::MAX;
    for _ in 0..60 {
        let now = smtp.received().len();
        if now == last {
            break;
        }
        last = now;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut copies: BTreeMap<String, usize> = BTreeMap::new();
    for r in smtp.received() {
        let id = r.message_id.unwrap_or_else(|| "<no message-id>".into());
        *copies.entry(id).or_default() += 1;
    }
    for (id, n) in &copies {
        if !allowed.contains(id) {
            problems.push(format!(
                "{id}: {n} copies of a message no call was answered as taken"
            ));
        } else if *n > 1 {
            problems.push(format!("{id}: {n} copies"));
        }
    }
    for id in &must_arrive {
        if !copies.contains_key(id) {
            problems.push(format!("{id}: answered sent, not at the server"));
        }
    }
    assert!(
        must_arrive.len() > 100,
        "too few sent to mean anything: {tally:?}"
    );
    assert_eq!(
        panics.load(Ordering::SeqCst),
        0,
        "a thread panicked (seed {seed})"
    );
    assert!(problems.is_empty(), "seed {seed}:\n{}", problems.join("\n"));
    harness::status(d.peer()).await;
}

/// A relay that answers at random: in each of 25 rounds a new script gives
/// one to three phases of the SMTP session a random reply (any code, at the
/// wrong phase too, with garbage after it, empty, non-ASCII or long text), a hang,
/// a close or a flood, for some or all of their occurrences; six calls run
/// per round. Then the relay turns good and the queue drains. Every call
/// is answered, nothing panics, and each message is at the server as its
/// final status says: `sent` or `partial` exactly once, `unknown` at most
/// once, anything else never. The seed is printed; `MAILMUX_RANDOM_SEED`
/// replays a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_answering_at_random_never_gets_a_message_twice() {
    use support::fault_smtp::{Action as SmtpAction, Share};
    let panics = random_input::count_panics();
    let seed = random_input::seed();
    eprintln!("random relay: MAILMUX_RANDOM_SEED={seed} replays this run");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let smtp = FaultSmtp::start(Script::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut r = relay("only", smtp.port(), 1);
    r.timeouts = mailmux_actors::Timeouts::uniform(Duration::from_millis(500));
    r.health.backoff_base = Duration::from_millis(20);
    r.health.backoff_max = Duration::from_millis(100);
    r.health.probe_interval = Duration::from_millis(100);
    let mut cfg = config(vec![r]);
    cfg.daemon.send_deadline = Duration::from_secs(2);
    cfg.queue.store = StoreKind::Sqlite {
        path: dir.path().join("queue.db"),
    };
    cfg.queue.retry_base = Duration::from_millis(100);
    cfg.queue.retry_max = Duration::from_millis(300);
    cfg.queue.delivery_timeout = Duration::from_secs(5);
    let d = harness::InProcess::start(cfg, Sources::default()).await;

    let codes = [
        0u16, 200, 220, 221, 250, 251, 334, 354, 421, 450, 451, 452, 500, 501, 503, 530, 550, 552,
        554, 999,
    ];
    let texts = [
        "".to_string(),
        "ok".to_string(),
        // A line that is no reply after it: garbage where the next reply
        // should be. (A server that answers one command with two whole
        // replies is not covered: see the README's "Relays".)
        "first line\r\nno code here".to_string(),
        "\u{fc}n\u{ef}code".to_string(),
        "x".repeat(2000),
        "4.7.0 try later".to_string(),
    ];
    let phases = [
        Phase::Greeting,
        Phase::Ehlo,
        Phase::Mail,
        Phase::Rcpt,
        Phase::Data,
        Phase::AfterDot,
    ];
    let mut calls = Vec::new();
    for round in 0..25 {
        let mut script = Script::ok();
        for _ in 0..rng.random_range(1..=3) {
            let phase = phases[rng.random_range(0..phases.len())];
            let action = match rng.random_range(0..20) {
                0 => SmtpAction::Hang,
                1 | 2 => SmtpAction::Close,
                3 => SmtpAction::Flood,
                _ => SmtpAction::Reply(
                    codes[rng.random_range(0..codes.len())],
                    texts[rng.random_range(0..texts.len())].clone(),
                ),
            };
            let share = match rng.random_range(0..3) {
                0 => Share::All,
                1 => Share::FirstN(rng.random_range(1..4)),
                _ => Share::EveryNth(rng.random_range(2..4)),
            };
            script = script.on_share(phase, action, share);
        }
        eprintln!("random relay: round {round}: {script:?}");
        smtp.set_script(script);
        let mut round_calls = tokio::task::JoinSet::new();
        for k in 0..6 {
            let peer = d.peer().clone();
            let wait = rng.random_bool(0.8);
            let args = json!({
                "to": ["rcpt@example.org"],
                "subject": format!("round {round} call {k}"),
                "body": "random relay\n",
                "wait": wait,
            });
            round_calls.spawn(async move {
                harness::call(
                    &peer,
                    format!("round {round} call {k}"),
                    "send_email",
                    args,
                    Duration::from_secs(10),
                )
                .await
            });
        }
        while let Some(c) = round_calls.join_next().await {
            calls.push(c.unwrap());
        }
    }
    // A good relay now: what waits for a retry goes out.
    smtp.set_script(Script::ok());
    let ids: Vec<String> = calls
        .iter()
        .filter_map(|c| c.message_id().map(str::to_owned))
        .collect();
    let mut finals = BTreeMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for id in &ids {
        loop {
            let s = harness::call(
                d.peer(),
                "status",
                "get_message_status",
                json!({ "message_id": id }),
                Duration::from_secs(5),
            )
            .await;
            let status = s.status().unwrap_or("?").to_owned();
            if !matches!(status.as_str(), "queued" | "sending")
                || std::time::Instant::now() > deadline
            {
                finals.insert(format!("<{id}>"), status);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut problems = Vec::new();
    for c in &calls {
        match &c.answer {
            harness::Answer::Result { .. } => {}
            other => problems.push(format!("{}: {other:?}", c.label)),
        }
    }
    // What the server may hold of each message: a transaction it accepted
    // (250, or any 2xx after the final "."), or one whose answer the client
    // never got (hung, closed).
    let mut copies: BTreeMap<String, usize> = BTreeMap::new();
    for r in smtp.received() {
        let kept = match r.outcome {
            AfterDot::Replied(code) => (200..300).contains(&code),
            _ => true,
        };
        if kept {
            let id = r.message_id.unwrap_or_else(|| "<no message-id>".into());
            *copies.entry(id).or_default() += 1;
        }
    }
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for (id, status) in &finals {
        *tally.entry(status.clone()).or_default() += 1;
        let n = copies.get(id).copied().unwrap_or(0);
        let fits = match status.as_str() {
            "sent" | "partial" => n == 1,
            "unknown" => n <= 1,
            _ => n == 0,
        };
        if !fits {
            let call = calls
                .iter()
                .find(|c| c.message_id().is_some_and(|m| id == &format!("<{m}>")));
            let told = call.map(|c| format!("{}: {:?}", c.label, c.answer));
            problems.push(format!(
                "{id}: {status}, {n} copies at the server; {}",
                told.unwrap_or_default()
            ));
        }
    }
    for id in copies.keys() {
        if !finals.contains_key(id) {
            problems.push(format!("{id}: at the server, answered to no call"));
        }
    }
    eprintln!("random relay: final states {tally:?}");
    assert_eq!(
        panics.load(Ordering::SeqCst),
        0,
        "a thread panicked (seed {seed})"
    );
    assert!(problems.is_empty(), "seed {seed}:\n{}", problems.join("\n"));
    harness::status(d.peer()).await;
}
