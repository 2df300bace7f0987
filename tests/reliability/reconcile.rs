//! The one reconciliation of what callers were told against what the SMTP
//! servers hold: sent means exactly one copy, failed means none, unknown at
//! most one, nobody hangs, and no server holds a message nobody asked for.

// Each test binary that includes this module uses a different subset of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::harness::{Answer, Call};
use crate::support::fault_smtp::{AfterDot, FaultSmtp};
use crate::support::smtp_sink::SmtpSink;

/// A server whose received messages can be listed by Message-ID.
pub trait Inbox {
    fn name(&self) -> String;
    /// The Message-IDs (with angle brackets) of every copy the server holds.
    fn copies(&self) -> Vec<String>;
}

impl Inbox for FaultSmtp {
    fn name(&self) -> String {
        format!("fault-smtp :{}", self.port())
    }

    /// Every message whose data arrived in full and that the server did not
    /// refuse: answered 250, or left unanswered (hang, close, kill), since
    /// then the server may well keep it.
    fn copies(&self) -> Vec<String> {
        self.received()
            .into_iter()
            .filter(|r| !matches!(r.outcome, AfterDot::Replied(_)))
            .map(|r| r.message_id.unwrap_or_else(|| "<no message-id>".into()))
            .collect()
    }
}

impl Inbox for SmtpSink {
    fn name(&self) -> String {
        format!("smtp-sink :{}", self.port())
    }

    fn copies(&self) -> Vec<String> {
        self.received()
            .into_iter()
            .map(|m| m.message_id.unwrap_or_else(|| "<no message-id>".into()))
            .collect()
    }
}

/// How the calls came out.
#[derive(Debug, Default)]
pub struct Tally {
    pub sent: usize,
    pub partial: usize,
    pub unknown: usize,
    pub failed: usize,
    /// Failed calls by `error.code` (delivery failures and refusals alike).
    pub codes: BTreeMap<String, usize>,
    /// Copies per server, in the order the servers were given.
    pub per_server: Vec<(String, usize)>,
    /// The labels of the `unknown` calls.
    pub unknown_labels: Vec<String>,
    pub max_elapsed: Duration,
}

/// Checks every call against the servers and panics with every violation
/// found. `limit` is the deadline plus margin each call was held to.
pub async fn reconcile(calls: &[Call], servers: &[&dyn Inbox]) -> Tally {
    let mut violations = Vec::new();
    let mut tally = Tally::default();
    let mut asked: HashSet<String> = HashSet::new();
    let mut must_arrive: HashSet<String> = HashSet::new();

    for c in calls {
        tally.max_elapsed = tally.max_elapsed.max(c.elapsed);
        match &c.answer {
            Answer::TimedOut => violations.push(format!(
                "{}: no answer within {:?} (a hang)",
                c.label, c.elapsed
            )),
            Answer::Protocol(e) => violations.push(format!("{}: protocol error: {e}", c.label)),
            Answer::Result { .. } => {}
        }
        if let Some(id) = c.message_id() {
            asked.insert(format!("<{id}>"));
            if matches!(c.status(), Some("sent" | "partial")) {
                must_arrive.insert(format!("<{id}>"));
            }
        }
        match c.status() {
            Some("sent") => tally.sent += 1,
            Some("partial") => tally.partial += 1,
            Some("unknown") => {
                tally.unknown += 1;
                tally.unknown_labels.push(c.label.clone());
            }
            Some("failed") => {
                tally.failed += 1;
                let code = c.error_code().unwrap_or("<none>").to_string();
                *tally.codes.entry(code).or_default() += 1;
            }
            Some("dry_run") => {}
            _ if c.value().is_some() => {
                // A control tool's result: nothing to reconcile.
            }
            _ => {}
        }
        let is_error = c.is_error();
        let failed = c.status() == Some("failed");
        if c.value().is_some() && c.status().is_some() && is_error != failed {
            violations.push(format!(
                "{}: isError is {is_error} but the status is {:?}",
                c.label,
                c.status()
            ));
        }
    }

    // Servers store after (smtp-sink dumps, aiosmtpd files) or just before
    // they reply: wait until every sent message is visible, then read once
    // more so that late copies of other messages show too.
    let settle = Instant::now() + Duration::from_secs(10);
    let mut copies: HashMap<String, usize>;
    loop {
        copies = HashMap::new();
        for s in servers {
            for id in s.copies() {
                *copies.entry(id).or_default() += 1;
            }
        }
        if must_arrive.iter().all(|id| copies.contains_key(id)) || Instant::now() > settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    copies = HashMap::new();
    for s in servers {
        let ids = s.copies();
        tally.per_server.push((s.name(), ids.len()));
        for id in ids {
            *copies.entry(id).or_default() += 1;
        }
    }

    for c in calls {
        let Some(id) = c.message_id() else {
            // No message was composed (invalid input, refused call): the
            // check below that every copy belongs to a call covers it.
            continue;
        };
        let n = copies.get(&format!("<{id}>")).copied().unwrap_or(0);
        let ok = match c.status() {
            Some("sent" | "partial") => n == 1,
            Some("unknown") => n <= 1,
            Some("failed" | "dry_run") => n == 0,
            _ => true,
        };
        if !ok {
            violations.push(format!(
                "{}: status {:?} but {n} copies of <{id}> (attempts: {})",
                c.label,
                c.status(),
                c.value()
                    .map(|v| v["attempts"].to_string())
                    .unwrap_or_default()
            ));
        }
    }
    for (id, n) in &copies {
        if !asked.contains(id) {
            violations.push(format!(
                "a server holds {n} copies of {id}, which no call asked for"
            ));
        }
    }

    if !violations.is_empty() {
        let shown: Vec<_> = violations.iter().take(25).cloned().collect();
        panic!(
            "{} reconciliation violations (first {}):\n{}\ntally: {tally:?}",
            violations.len(),
            shown.len(),
            shown.join("\n")
        );
    }
    eprintln!(
        "reconciled {} calls: sent {}, partial {}, unknown {}, failed {} {:?}; copies {:?}; slowest call {:?}",
        calls.len(),
        tally.sent,
        tally.partial,
        tally.unknown,
        tally.failed,
        tally.codes,
        tally.per_server,
        tally.max_elapsed
    );
    if !tally.unknown_labels.is_empty() {
        eprintln!("unknown: {:?}", tally.unknown_labels);
    }
    tally
}
