//! Daemons killed while callers keep sending, for the crash tests of one
//! daemon (`tests/queue.rs`) and of several on PostgreSQL
//! (`tests/cluster.rs`): a relay that fails at random, callers that make a
//! broken keyed call again on the next daemon as an agent would and cancel
//! some of what they sent, and the reconciliation of every stored message
//! against what the relay took. The relay takes at most two recipients a
//! transaction, so a message to three goes in two: after a 452 to the
//! third, or, with the relay's `recipients_per_transaction`, from the start.

// Each test binary that includes this module uses a different subset of it.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rmcp::RoleClient;
use rmcp::service::Peer;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::harness::{Call, call};
use crate::support::fault_smtp::{
    Action, AfterDot, FaultSmtp, Options, Phase, Received, Script, Share, copies,
};

/// The relay the callers' mail goes to: the fault-injecting server, which
/// takes at most [`CAP`] recipients a transaction (452 to the rest).
pub async fn relay() -> Arc<FaultSmtp> {
    let options = Options {
        max_recipients: Some(CAP),
        ..Options::default()
    };
    Arc::new(FaultSmtp::start_with(Script::ok(), options).await)
}

/// A relay like [`relay`] that refuses the recipients over [`CAP`] for good
/// (550), as some providers do: its daemons name at most `CAP` a
/// transaction ([`PER_TRANSACTION`]), and a test checks that it never had
/// to refuse one ([`FaultSmtp::over_cap_replies`]).
pub async fn relay_refusing_over_cap() -> Arc<FaultSmtp> {
    let options = Options {
        max_recipients: Some(CAP),
        over_cap_reply: Some("550 Too many recipients".into()),
        ..Options::default()
    };
    Arc::new(FaultSmtp::start_with(Script::ok(), options).await)
}

/// The relay's cap on recipients a transaction.
pub const CAP: usize = 2;

/// The relay key that keeps each transaction within [`CAP`].
pub const PER_TRANSACTION: &str = "recipients_per_transaction = 2";

/// The end of the subject of a message to three recipients, which the
/// relay takes in two transactions.
const THREE: &str = " to three";

/// The recipients a message of this subject was sent to.
fn recipients_of(subject: &str) -> usize {
    if subject.ends_with(THREE) { 3 } else { 1 }
}

/// The seed of a run: `MAILMUX_RANDOM_SEED`, or a random one.
pub fn seed() -> u64 {
    match std::env::var("MAILMUX_RANDOM_SEED") {
        Ok(s) => s.parse().expect("MAILMUX_RANDOM_SEED is a number"),
        Err(_) => rand::rng().random(),
    }
}

/// One daemon's place: its peer while it runs (`None` between its kill and
/// its next start), and how many times it was started.
#[derive(Clone, Default)]
pub struct Slot {
    pub generation: usize,
    pub peer: Option<Peer<RoleClient>>,
}

/// The daemons of a test, one slot each, as the callers see them.
pub struct Daemons(watch::Sender<Vec<Slot>>);

impl Daemons {
    pub fn new(n: usize) -> Self {
        Daemons(watch::Sender::new(vec![Slot::default(); n]))
    }

    /// Daemon `i` now serves on `peer`.
    pub fn started(&self, i: usize, peer: &Peer<RoleClient>) {
        self.0.send_modify(|v| {
            v[i].generation += 1;
            v[i].peer = Some(peer.clone());
        });
    }

    /// Daemon `i` is about to be killed: no new call goes to it.
    pub fn stopping(&self, i: usize) {
        self.0.send_modify(|v| v[i].peer = None);
    }
}

/// What one call asked for and was finally told.
pub struct Asked {
    /// The subjects of the call's messages.
    pub subjects: Vec<String>,
    pub keyed: bool,
    /// How many times a keyed call was made again after its daemon died.
    pub again: usize,
    /// The last answer; a transport error only for a call with no key.
    pub last: Call,
}

/// A cancel a caller made of one of its messages (`cancel_message` or
/// `mailmux queue cancel`) or of one of its batches.
pub struct Cancelling {
    /// `None`: the batch's.
    pub message_id: Option<String>,
    /// Whether it was answered `cancelled` (with a batch: at least one);
    /// `None`: the call broke.
    pub cancelled: Option<bool>,
}

/// The operator's shell: `mailmux queue` run in `dir`, on the
/// `mailmux.toml` there (the daemons' configuration), with `operator`'s
/// token when the configuration holds mail outside `@example.org` for an
/// operator's approval.
#[derive(Clone)]
pub struct Shell {
    pub dir: PathBuf,
    pub operator: Option<String>,
}

/// The operator's token of the tests that hold mail for approval.
pub const OPERATOR: &str = "chaos-operator-token-41f3";

/// The configuration's tables that hold mail outside `@example.org` for
/// an operator (`OPERATOR`'s) approval.
///
/// A message may wait 3 s for delivery (`queue.max_age`), so that some
/// expire while the relay fails: `with_max_age` sets it in a configuration.
pub fn with_max_age(config: String) -> String {
    assert!(config.contains("retry_max = \"1s\""), "{config}");
    config.replace("retry_max = \"1s\"", "retry_max = \"1s\"\nmax_age = \"3s\"")
}

pub fn approvals_toml() -> String {
    let hash: String = <sha2::Sha256 as sha2::Digest>::digest(OPERATOR.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!(
        "\n[policy]\nallowed_recipients = [\"@example.org\"]\napproval = \"outside_allowlist\"\n\
         approver = \"operator\"\n\n[[operators]]\nname = \"ops\"\ntoken_sha256 = \"{hash}\"\n"
    )
}

impl Shell {
    async fn run(&self, args: &[&str]) -> String {
        let shell = self.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (code, out, err) = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            crate::common::queue_cmd_as(&shell.dir, &args, shell.operator.as_deref())
        })
        .await
        .unwrap();
        assert!(code.is_some(), "mailmux queue: {out}{err}");
        out
    }
}

/// An operator's decision on a held message, and whether the shell said it
/// was made (`approved; now …` or `rejected`).
pub struct Decided {
    pub message_id: String,
    pub approve: bool,
    pub made: bool,
}

/// What the callers did.
#[derive(Default)]
pub struct Calls {
    pub asked: Vec<Asked>,
    pub cancels: Vec<Cancelling>,
    /// `mailmux queue retry` of a message told `queued`.
    pub retries: usize,
    /// Calls their caller gave up on before the answer.
    pub impatient: usize,
    pub decisions: Vec<Decided>,
}

impl Calls {
    /// Every caller's calls, once each has stopped.
    pub async fn join(mut set: JoinSet<Calls>) -> Calls {
        let mut all = Calls::default();
        while let Some(c) = set.join_next().await {
            let c = c.expect("a caller panicked");
            all.asked.extend(c.asked);
            all.cancels.extend(c.cancels);
            all.retries += c.retries;
            all.impatient += c.impatient;
            all.decisions.extend(c.decisions);
        }
        all
    }
}

/// `n` callers, each making one call after another to a running daemon
/// until `stop`: `send_email` or (one in seven) a `send_batch` of three,
/// waiting or not, with idempotency keys or not, some for a moment later
/// (`send_at`), at random from `seed`; and now and then a `cancel_message`
/// of a message it was told `queued` or of one of its batches, and, with
/// `shell` (a folder holding the daemons' `mailmux.toml`), `mailmux queue
/// cancel` or `retry` of such a message. A keyed call that broke is made
/// again, unchanged, on a daemon started since (or another one); a call
/// with no key is left unanswered, and three in ten of those that wait are
/// given up after a moment (its client cancels it).
pub fn callers(
    n: usize,
    seed: u64,
    daemons: &Daemons,
    limit: Duration,
    shell: Option<Shell>,
    stop: Arc<AtomicBool>,
) -> JoinSet<Calls> {
    let mut set = JoinSet::new();
    for caller in 0..n {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(caller as u64 + 1));
        let mut serving = daemons.0.subscribe();
        let stop = stop.clone();
        let shell = shell.clone();
        set.spawn(async move {
            let mut calls = Calls::default();
            // The messages and batches this caller was told are `queued`.
            let mut queued: Vec<String> = Vec::new();
            let mut batches: Vec<String> = Vec::new();
            // The messages held for an operator.
            let mut held: Vec<String> = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let dice = rng.random_range(0..100);
                if dice < 13 && !queued.is_empty() {
                    // The newest, the likeliest to be still waiting (or in
                    // its round), or any.
                    let id = if rng.random_bool(0.5) {
                        queued.pop().unwrap()
                    } else {
                        queued.swap_remove(rng.random_range(0..queued.len()))
                    };
                    match (&shell, dice) {
                        (Some(shell), 10..) => {
                            let retry = rng.random_bool(0.5);
                            let verb = if retry { "retry" } else { "cancel" };
                            let out = shell.run(&[verb, &id]).await;
                            if retry {
                                calls.retries += 1;
                            } else {
                                calls.cancels.push(Cancelling {
                                    cancelled: Some(out == format!("{id}: cancelled\n")),
                                    message_id: Some(id),
                                });
                            }
                        }
                        _ => {
                            let peer = any_peer(&mut serving, &mut rng).await;
                            let args = json!({ "message_id": id });
                            let c = call(&peer, "cancel", "cancel_message", args, limit).await;
                            calls.cancels.push(Cancelling {
                                message_id: Some(id),
                                cancelled: c.value().map(|v| v["cancelled"] == true),
                            });
                        }
                    }
                    continue;
                }
                if let Some(shell) = shell.as_ref().filter(|_| dice < 20 && !held.is_empty()) {
                    let id = held.swap_remove(rng.random_range(0..held.len()));
                    let approve = rng.random_bool(0.5);
                    let verb = if approve { "approve" } else { "reject" };
                    let out = shell.run(&[verb, &id]).await;
                    let made = if approve {
                        out.starts_with(&format!("{id}: approved; now "))
                    } else {
                        out == format!("{id}: rejected; it will not be sent\n")
                    };
                    calls.decisions.push(Decided {
                        message_id: id,
                        approve,
                        made,
                    });
                    continue;
                }
                if dice < 15 && !batches.is_empty() {
                    let batch = batches.swap_remove(rng.random_range(0..batches.len()));
                    let peer = any_peer(&mut serving, &mut rng).await;
                    let args = json!({ "batch_id": batch });
                    let c = call(&peer, "cancel", "cancel_message", args, limit).await;
                    calls.cancels.push(Cancelling {
                        message_id: None,
                        cancelled: c.value().map(|v| v["cancelled"] == true),
                    });
                    continue;
                }
                i += 1;
                let keyed = rng.random_bool(0.5);
                let outside = shell.as_ref().is_some_and(|s| s.operator.is_some());
                let (tool, args, subjects) = arguments(&mut rng, caller, i, keyed, outside);
                let label = subjects[0].clone();
                let mut again = 0;
                // The daemons (and their generations) a broken call was
                // made on; the next try goes to another.
                let mut tried: Vec<(usize, usize)> = Vec::new();
                loop {
                    let (tried_on, peer) = pick_peer(&mut serving, &mut rng, &tried).await;
                    // Now and then a caller with no key gives up on a call
                    // that waits: rmcp's client then cancels it
                    // (`notifications/cancelled`), and so its message.
                    let impatient = !keyed && args["wait"] == true && rng.random_bool(0.3);
                    let limit = if impatient {
                        Duration::from_millis(rng.random_range(2..200))
                    } else {
                        limit
                    };
                    let c = call(&peer, label.clone(), tool, args.clone(), limit).await;
                    calls.impatient += usize::from(impatient && c.value().is_none());
                    // Refused by a daemon that is stopping: nothing stored.
                    let broke = c.value().is_none() || c.error_code() == Some("unavailable");
                    if !broke || !keyed {
                        let v = c.value().cloned().unwrap_or_default();
                        if let Some(b) = v["batch_id"].as_str() {
                            batches.push(b.to_owned());
                        }
                        for r in results(&v) {
                            let id = r["message_id"].as_str().map(str::to_owned);
                            match r["status"].as_str() {
                                Some("queued" | "scheduled") => queued.extend(id),
                                Some("held") => held.extend(id),
                                _ => {}
                            }
                        }
                        calls.asked.push(Asked {
                            subjects: subjects.clone(),
                            keyed,
                            again,
                            last: c,
                        });
                        break;
                    }
                    again += 1;
                    tried.push(tried_on);
                }
            }
            calls
        });
    }
    set
}

/// A running daemon's peer, any.
async fn any_peer(
    serving: &mut watch::Receiver<Vec<Slot>>,
    rng: &mut impl Rng,
) -> Peer<RoleClient> {
    pick_peer(serving, rng, &[]).await.1
}

/// A running daemon's peer, at random, waiting for one: any but those
/// `tried` (a daemon and its generation); and which it is.
async fn pick_peer(
    serving: &mut watch::Receiver<Vec<Slot>>,
    rng: &mut impl Rng,
    tried: &[(usize, usize)],
) -> ((usize, usize), Peer<RoleClient>) {
    let open = |v: &[Slot]| -> Vec<(usize, usize)> {
        v.iter()
            .enumerate()
            .filter(|(d, s)| s.peer.is_some() && !tried.contains(&(*d, s.generation)))
            .map(|(d, s)| (d, s.generation))
            .collect()
    };
    let slots = serving
        .wait_for(|v| !open(v).is_empty())
        .await
        .expect("the test keeps the sender");
    let choices = open(&slots);
    let (d, generation) = choices[rng.random_range(0..choices.len())];
    ((d, generation), slots[d].peer.clone().unwrap())
}

/// The per-message results of a `send_email` or `send_batch` answer.
fn results(v: &Value) -> Vec<Value> {
    match v.get("results") {
        Some(r) => r.as_array().cloned().unwrap_or_default(),
        None => vec![v.clone()],
    }
}

/// Caller `caller`'s call `i`: the tool, its arguments and its subjects.
/// With `outside`, one message in ten goes to a recipient outside
/// `@example.org`.
fn arguments(
    rng: &mut impl Rng,
    caller: usize,
    i: usize,
    keyed: bool,
    outside: bool,
) -> (&'static str, Value, Vec<String>) {
    let to = |rng: &mut dyn rand::RngCore| {
        if outside && rng.random_bool(0.1) {
            "rcpt@elsewhere.net"
        } else {
            "rcpt@example.org"
        }
    };
    let wait = rng.random_bool(0.5);
    let later = rng
        .random_bool(0.1)
        .then(|| format!("{}ms", rng.random_range(200..1500)));
    let tag = format!("chaos {caller}.{i}");
    let key = |j: usize| json!(format!("key-{caller}-{i}-{j}"));
    if rng.random_bool(0.15) {
        let subjects: Vec<String> = (0..3).map(|j| format!("{tag}.{j}")).collect();
        let messages: Vec<Value> = subjects
            .iter()
            .enumerate()
            .map(|(j, s)| {
                let mut m = json!({"to": [to(rng)], "subject": s});
                if keyed {
                    m["idempotency_key"] = key(j);
                }
                m
            })
            .collect();
        let mut args = json!({"defaults": {"body": "a chaos batch\n"},
                              "messages": messages, "wait": wait,
                              "atomic": rng.random_bool(0.3)});
        if let Some(t) = later {
            args["send_at"] = json!(t);
        }
        ("send_batch", args, subjects)
    } else {
        // One in four to three recipients: two transactions at the relay.
        let (to, tag) = if rng.random_bool(0.25) {
            let first = to(rng);
            (
                json!([first, "second@example.org", "third@example.org"]),
                format!("{tag}{THREE}"),
            )
        } else {
            (json!(to(rng)), tag)
        };
        let mut args = json!({"to": to, "subject": tag,
                              "body": format!("body of {tag}\n"), "wait": wait});
        if keyed {
            args["idempotency_key"] = key(0);
        }
        if let Some(t) = later {
            args["send_at"] = json!(t);
        }
        ("send_email", args, vec![tag])
    }
}

/// Eight callers ([`callers`]) and the failing relay ([`flaky_relay`]),
/// running until [`Run::finish`].
pub struct Run {
    stop: Arc<AtomicBool>,
    callers: JoinSet<Calls>,
    faults: JoinHandle<()>,
    smtp: Arc<FaultSmtp>,
}

impl Run {
    pub fn start(
        seed: u64,
        daemons: &Daemons,
        limit: Duration,
        shell: Shell,
        smtp: Arc<FaultSmtp>,
    ) -> Run {
        let stop = Arc::new(AtomicBool::new(false));
        Run {
            callers: callers(8, seed, daemons, limit, Some(shell), stop.clone()),
            faults: flaky_relay(smtp.clone(), seed, stop.clone()),
            stop,
            smtp,
        }
    }

    /// Once the daemons run again for good: gives the keyed calls that
    /// broke at the last stop time to be made again, stops the callers and
    /// turns the relay good, waits until the queue (as `peer` lists it) has
    /// nothing left to send, and reconciles ([`reconcile`]).
    pub async fn finish(self, peer: &Peer<RoleClient>) -> Tally {
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.stop.store(true, Ordering::SeqCst);
        self.faults.await.unwrap();
        let calls = Calls::join(self.callers).await;
        let listed = listed_when_final(peer, Duration::from_secs(60)).await;
        reconcile(&calls, &listed, &self.smtp.received())
    }
}

/// A relay script that fails for a moment: 4xx, a closed connection or a
/// slow reply at any phase, after the final "." too, for a share of the
/// transactions. Nothing permanent, so every stored message can be sent.
pub fn flaky_script(rng: &mut impl Rng) -> Script {
    let phases = [
        Phase::Greeting,
        Phase::Mail,
        Phase::Rcpt,
        Phase::Data,
        Phase::AfterDot,
    ];
    let mut script = Script::ok();
    for _ in 0..rng.random_range(0..=2) {
        let phase = phases[rng.random_range(0..phases.len())];
        let action = match rng.random_range(0..6) {
            0 => Action::Close,
            1 => Action::Pause(Duration::from_millis(rng.random_range(50..400))),
            2 => Action::reply(421, "4.3.0 closing"),
            _ => Action::reply(451, "4.3.0 try again later"),
        };
        let share = if rng.random_bool(0.5) {
            Share::EveryNth(rng.random_range(2..5))
        } else {
            Share::FirstN(rng.random_range(1..4))
        };
        script = script.on_share(phase, action, share);
    }
    script
}

/// A new random script for `smtp` every 250 ms until `stop`, then a good one.
pub fn flaky_relay(smtp: Arc<FaultSmtp>, seed: u64, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_sub(1));
    tokio::spawn(async move {
        while !stop.load(Ordering::SeqCst) {
            smtp.set_script(flaky_script(&mut rng));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        smtp.set_script(Script::ok());
    })
}

/// Every stored message, listed once none is `queued`, `scheduled` or
/// `sending` any more (or once `limit` passed).
pub async fn listed_when_final(peer: &Peer<RoleClient>, limit: Duration) -> Vec<Value> {
    let until = std::time::Instant::now() + limit;
    loop {
        let listed = crate::harness::list_all(peer, 100).await;
        let waiting = listed.iter().any(|m| {
            matches!(
                m["status"].as_str(),
                Some("queued" | "scheduled" | "sending")
            )
        });
        if !waiting || std::time::Instant::now() > until {
            return listed;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn subject_of(r: &Received) -> String {
    let text = String::from_utf8_lossy(&r.data);
    text.lines()
        .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
        .unwrap_or_default()
}

/// What [`reconcile`] counted.
#[derive(Debug, Default)]
pub struct Tally {
    pub calls: usize,
    pub answered: usize,
    /// Calls with no key that broke with their daemon.
    pub broken: usize,
    /// Calls with no key refused by a daemon that was stopping.
    pub refused: usize,
    /// Keyed calls made again after their daemon died.
    pub again: usize,
    pub stored: usize,
    pub sent: usize,
    /// Of those sent, the messages to three recipients, in two
    /// transactions.
    pub split: usize,
    /// Messages to three recipients whose second transaction failed.
    pub partial: usize,
    pub unknown: usize,
    /// Stored messages never sent: `cancelled`, `rejected`, `held` or
    /// `expired`.
    pub nothing_sent: std::collections::BTreeMap<String, usize>,
    /// Messages cancelled while recipients that a round deferred waited
    /// for a retry: some of their recipients had the message, once.
    pub cancelled_after_some: usize,
    /// Operators' decisions, and the approvals made.
    pub decided: usize,
    pub approved: usize,
    /// Cancels of a message or a batch, and those answered `cancelled`.
    pub cancels: usize,
    pub told_cancelled: usize,
    /// `mailmux queue retry` runs.
    pub retries: usize,
    /// Calls their caller gave up on (and so cancelled).
    pub impatient: usize,
    pub transactions: usize,
    pub taken: usize,
    /// Stored messages by the daemon that holds or delivered them, where
    /// the store names one (a shared PostgreSQL queue).
    pub by_node: std::collections::BTreeMap<String, usize>,
}

/// Reconciles the final `listed` messages and the callers' `asked` against
/// what the relay `received`. The relay may have taken every transaction it
/// did not answer 4xx or 5xx after the final ".", and no recipient may have
/// taken two copies of a message: every stored message is `sent`, each of
/// its recipients with one copy answered 250, `partial` (a message to three
/// whose second transaction failed), with some of them so, `unknown`, with
/// at most one copy each, or `cancelled`, `rejected`, `held` or `expired`,
/// with none (but a message cancelled while recipients a round deferred
/// waited, which some of its recipients took); a cancel answered `cancelled` left its message so, and so
/// did a decision; each copy is of a stored message a caller asked for; no
/// subject was taken twice by one recipient; every answer names stored
/// messages, told `sent`, `partial`, `queued`, `unknown` or `sending`;
/// every keyed call was answered.
pub fn reconcile(calls: &Calls, listed: &[Value], received: &[Received]) -> Tally {
    let asked = &calls.asked;
    let mut t = Tally {
        calls: asked.len(),
        stored: listed.len(),
        transactions: received.len(),
        ..Tally::default()
    };
    let mut taken: HashMap<String, Vec<&Received>> = HashMap::new();
    for r in received {
        let subject = subject_of(r);
        assert!(
            subject.starts_with("chaos "),
            "unasked-for message {subject:?}"
        );
        if !matches!(r.outcome, AfterDot::Replied(_)) {
            let id = copies([r]).into_keys().next().unwrap();
            taken.entry(id).or_default().push(r);
            t.taken += 1;
        }
    }
    for m in listed {
        let id = m["message_id"].as_str().unwrap();
        if let Some(node) = m["node"].as_str() {
            *t.by_node.entry(node.to_owned()).or_default() += 1;
        }
        let copies = taken.get(id).map_or(&[][..], Vec::as_slice);
        // Each recipient's copies, over the message's transactions: no
        // recipient may have two.
        let mut each: HashMap<&str, usize> = HashMap::new();
        for r in copies {
            for to in &r.rcpt_to {
                *each.entry(to.as_str()).or_default() += 1;
            }
        }
        assert!(
            each.values().all(|n| *n == 1),
            "{id}: a recipient took two copies: {each:?}"
        );
        let outcomes: Vec<_> = copies.iter().map(|r| &r.outcome).collect();
        let asked_for = copies.first().map_or(0, |r| recipients_of(&subject_of(r)));
        match m["status"].as_str() {
            Some("sent") => {
                t.sent += 1;
                t.split += usize::from(copies.len() > 1);
                assert!(
                    copies.iter().all(|r| r.is_delivered()),
                    "{id}: sent, copies taken: {outcomes:?}"
                );
                assert_eq!(each.len(), asked_for, "{id}: sent, to {each:?}");
            }
            Some("partial") => {
                // A further transaction for the recipients over the
                // relay's cap failed before its "." was taken.
                t.partial += 1;
                assert!(
                    copies.iter().all(|r| r.is_delivered()),
                    "{id}: partial, copies taken: {outcomes:?}"
                );
                assert!(
                    !each.is_empty() && each.len() < asked_for,
                    "{id}: partial, to {each:?}"
                );
            }
            Some("unknown") => {
                t.unknown += 1;
            }
            // A round took it for some recipients and deferred the
            // others; the cancel stopped their retries.
            Some("cancelled") if !copies.is_empty() => {
                t.cancelled_after_some += 1;
                assert!(
                    copies.iter().all(|r| r.is_delivered()) && each.len() < asked_for,
                    "{id}: cancelled, copies to {each:?}: {outcomes:?}"
                );
            }
            Some(state @ ("cancelled" | "rejected" | "held" | "expired")) => {
                *t.nothing_sent.entry(state.to_owned()).or_default() += 1;
                assert!(copies.is_empty(), "{id}: {state}, {} copies", copies.len());
            }
            other => panic!("{id}: stored, now {other:?}: {m}"),
        }
    }
    let stored: HashSet<&str> = listed
        .iter()
        .map(|m| m["message_id"].as_str().unwrap())
        .collect();
    for id in taken.keys() {
        assert!(
            stored.contains(id.as_str()),
            "{id} at the sink but not stored"
        );
    }
    let mut subjects = HashSet::new();
    for r in taken.values().flatten() {
        let s = subject_of(r);
        for to in &r.rcpt_to {
            assert!(
                subjects.insert((s.clone(), to.clone())),
                "{s:?} taken twice by {to}"
            );
        }
    }
    for a in asked {
        t.again += a.again;
        let Some(v) = a.last.value() else {
            assert!(
                !a.keyed,
                "{}: a keyed call is made until answered",
                a.last.label
            );
            t.broken += 1;
            continue;
        };
        if a.last.error_code() == Some("unavailable") {
            assert!(
                !a.keyed,
                "{}: a keyed call is made until stored",
                a.last.label
            );
            t.refused += 1;
            continue;
        }
        t.answered += 1;
        let results = results(v);
        assert_eq!(results.len(), a.subjects.len(), "{}: {v}", a.last.label);
        for r in &results {
            // `sending`: a replay, or a waiting call whose deadline passed
            // while a round not its own (a retry, another daemon's, or a
            // dead daemon's whose lease still runs) held the message.
            assert!(
                matches!(
                    r["status"].as_str(),
                    Some(
                        "sent"
                            | "partial"
                            | "queued"
                            | "scheduled"
                            | "unknown"
                            | "sending"
                            | "held"
                            | "expired"
                    )
                ),
                "{}: told {r}",
                a.last.label
            );
            let id = r["message_id"].as_str().unwrap();
            assert!(
                stored.contains(id),
                "{}: {id} told, not stored",
                a.last.label
            );
        }
    }
    // A cancel answered `cancelled` holds: the message stays cancelled
    // and was never taken.
    t.retries = calls.retries;
    t.impatient = calls.impatient;
    for c in &calls.cancels {
        t.cancels += 1;
        if c.cancelled != Some(true) {
            continue;
        }
        t.told_cancelled += 1;
        let Some(id) = &c.message_id else {
            continue;
        };
        let m = listed.iter().find(|m| m["message_id"] == id.as_str());
        let status = m.map(|m| m["status"].clone());
        assert_eq!(
            status,
            Some(json!("cancelled")),
            "{id}: told cancelled, now {status:?}"
        );
    }
    // An operator's decision the shell said was made holds.
    for d in &calls.decisions {
        t.decided += 1;
        if !d.made {
            continue;
        }
        let m = listed
            .iter()
            .find(|m| m["message_id"] == d.message_id.as_str());
        let status = m.and_then(|m| m["status"].as_str());
        if d.approve {
            t.approved += 1;
            assert!(
                // Or cancelled since, with its batch.
                matches!(
                    status,
                    Some("sent" | "partial" | "unknown" | "expired" | "cancelled")
                ),
                "{}: approved, now {status:?}",
                d.message_id
            );
        } else {
            assert_eq!(status, Some("rejected"), "{}: rejected", d.message_id);
        }
    }
    assert!(t.unknown < t.stored / 2, "most messages were sent: {t:?}");
    t
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} calls ({} answered, {} refused while a daemon stopped, {} without a key broke \
             unanswered, {} of them given up by their caller, {} keyed calls made again after a kill), {} cancels ({} answered \
             cancelled), {} shell retries, {} decisions ({} approvals); {} messages stored: {} \
             sent once ({} of them to three recipients, in two transactions), {} partial, \
             {} unknown, never sent {:?}, {} cancelled after some recipients had them; \
             {} transactions at the sink, {} taken, none twice to one recipient",
            self.calls,
            self.answered,
            self.refused,
            self.broken,
            self.impatient,
            self.again,
            self.cancels,
            self.told_cancelled,
            self.retries,
            self.decided,
            self.approved,
            self.stored,
            self.sent,
            self.split,
            self.partial,
            self.unknown,
            self.nothing_sent,
            self.cancelled_after_some,
            self.transactions,
            self.taken
        )?;
        if !self.by_node.is_empty() {
            write!(f, "; held or delivered by each daemon {:?}", self.by_node)?;
        }
        Ok(())
    }
}
