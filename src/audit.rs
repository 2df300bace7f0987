//! The audit log: one JSON line per state change of a message, or per
//! refusal, appended to `audit.path` (created with mode 0600).
//!
//! Field names follow the Elastic Common Schema where they fit (`event.*`,
//! `email.*`, `user.name`); mailmux's own fields are under `mailmux.*`. A
//! line never holds a body, an attachment, a token or a password: the
//! queue's events carry none, and refusals are written from the envelope
//! and subject only. serde_json escapes every value, so a subject cannot
//! forge a field or a line. The file is reopened on SIGHUP (log rotation).
//!
//! Each line is one `write`, so a crash of the daemon loses none. Lines are
//! made durable (`fdatasync`) at most [`SYNC_EVERY`] after they are written,
//! off the callers' path, and before the file is let go (reopen, shutdown):
//! a power loss loses at most that last second.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use mailmux_actors::queue::{Action, Event, Observer};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// `[audit]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    /// `None`: no audit log.
    pub path: Option<PathBuf>,
    /// Write subjects as they are; false writes their SHA-256.
    pub subjects: bool,
    /// Refuse new messages while the log cannot be written.
    pub required: bool,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            path: None,
            subjects: true,
            required: false,
        }
    }
}

/// What the daemon stores with each message for its audit lines: the
/// recipients by field and the subject. Never the body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Meta {
    #[serde(default)]
    pub to: Vec<String>,
    #[serde(default)]
    pub cc: Vec<String>,
    #[serde(default)]
    pub bcc: Vec<String>,
    #[serde(default)]
    pub subject: String,
    /// Where replies go, when the message names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// The names of the header fields the caller wrote by name (`headers`,
    /// the unsubscribe links, its policy's), never their values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
    /// The content check that held it for approval, and the part it
    /// matched (`content check "invoice" matched subject`): never the text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_by: Option<String>,
    /// The operator's template it was written from (`[[templates]]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// The caller's label (`tag`), which audit lines carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The caller's own names and values (`metadata`): shown with the
    /// message's status and posted by the webhook, never written to the
    /// audit log (a caller may put a person's data there).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metadata: std::collections::BTreeMap<String, String>,
}

impl Meta {
    /// A message's stored `meta`, read; the default when it has none (or
    /// one this build cannot read).
    pub fn of(meta: Option<&str>) -> Meta {
        meta.and_then(|m| serde_json::from_str(m).ok())
            .unwrap_or_default()
    }
}

/// A refusal to record: everything known about the message by then.
#[derive(Debug, Default)]
pub struct Refusal<'a> {
    pub caller: &'a str,
    pub message_id: Option<&'a str>,
    pub from: Option<&'a str>,
    pub meta: Option<&'a Meta>,
    pub size: Option<usize>,
    /// The error code (`policy_denied`, `rate_limited`, `invalid_input`…).
    pub code: &'a str,
    pub rule: Option<&'a str>,
    pub field: Option<&'a str>,
    /// The content check that refused it.
    pub check: Option<&'a str>,
}

/// A change of the suppression list, for [`Audit::suppression`].
#[derive(Debug, Clone, Copy)]
pub struct SuppressionChange<'a> {
    /// `suppressed` or `unsuppressed`.
    pub action: &'a str,
    pub by: &'a str,
    pub address: &'a str,
    /// The entry's reason (`bounced`, `unsubscribed`, …), for `suppressed`.
    pub reason: Option<&'a str>,
    /// The message whose refusal listed it.
    pub message_id: Option<&'a str>,
}

#[derive(Debug)]
pub struct Audit {
    settings: AuditSettings,
    file: Mutex<Option<File>>,
    /// Writes that failed, since start.
    failures: AtomicU64,
    /// False after a write failed, until one succeeds.
    healthy: AtomicBool,
    /// Lines were written since the last sync.
    unsynced: AtomicBool,
}

/// How long a written line may wait for its `fdatasync`.
pub const SYNC_EVERY: Duration = Duration::from_secs(1);

fn open(path: &PathBuf) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o.open(path)
}

impl Audit {
    /// Opens the log (creating it with mode 0600). A log that cannot be
    /// opened is an error at start.
    pub fn open(settings: AuditSettings) -> std::io::Result<Audit> {
        let file = match &settings.path {
            Some(p) => Some(open(p)?),
            None => None,
        };
        Ok(Audit {
            settings,
            file: Mutex::new(file),
            failures: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            unsynced: AtomicBool::new(false),
        })
    }

    /// A log that could not be opened at start: enabled, unhealthy, and
    /// reopened by SIGHUP or (when required) by the next send.
    pub fn unopened(settings: AuditSettings) -> Audit {
        Audit {
            settings,
            file: Mutex::new(None),
            failures: AtomicU64::new(0),
            healthy: AtomicBool::new(false),
            unsynced: AtomicBool::new(false),
        }
    }

    pub fn enabled(&self) -> bool {
        self.settings.path.is_some()
    }

    /// Whether new messages may be taken: always, unless the log is
    /// required and its last write failed (then it is reopened first).
    pub fn admits(&self) -> bool {
        if !self.settings.required || self.healthy.load(Ordering::Acquire) {
            return true;
        }
        self.reopen();
        self.healthy.load(Ordering::Acquire)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    pub fn settings(&self) -> &AuditSettings {
        &self.settings
    }

    /// Reopens the file at its path (after rotation).
    pub fn reopen(&self) {
        let Some(path) = &self.settings.path else {
            return;
        };
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        match open(path) {
            Ok(f) => {
                // The lines of the file let go of are made durable first.
                if let Some(old) = file.replace(f)
                    && self.unsynced.swap(false, Ordering::AcqRel)
                {
                    self.synced(old.sync_data());
                }
                self.healthy.store(true, Ordering::Release);
                tracing::info!(path = %path.display(), "audit log reopened");
            }
            Err(e) => {
                self.healthy.store(false, Ordering::Release);
                tracing::error!(path = %path.display(), error = %e, "cannot reopen the audit log");
            }
        }
    }

    fn write(&self, line: &Value) {
        let mut bytes = match serde_json::to_vec(line) {
            Ok(b) => b,
            Err(_) => return,
        };
        bytes.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let Some(f) = file.as_mut() else {
            self.failures.fetch_add(1, Ordering::Relaxed);
            return;
        };
        // One write of the whole line: O_APPEND keeps lines whole even with
        // another process (the queue command) appending.
        match f.write_all(&bytes) {
            Ok(()) => {
                self.unsynced.store(true, Ordering::Release);
                if !self.healthy.swap(true, Ordering::AcqRel) {
                    tracing::info!("the audit log is written again");
                }
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                if self.healthy.swap(false, Ordering::AcqRel) {
                    tracing::error!(error = %e, "writing the audit log failed");
                }
            }
        }
    }

    /// Makes the lines written so far durable; true if any were waiting.
    /// The file's lock is held only to duplicate its descriptor, so lines
    /// go on being written meanwhile.
    pub fn sync(&self) -> bool {
        if !self.unsynced.swap(false, Ordering::AcqRel) {
            return false;
        }
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let copy = file.as_ref().map(File::try_clone);
        drop(file);
        match copy {
            Some(Ok(f)) => self.synced(f.sync_data()),
            Some(Err(e)) => self.synced(Err(e)),
            None => {}
        }
        true
    }

    /// Counts a failed sync as a failed write: its lines may be lost.
    fn synced(&self, result: std::io::Result<()>) {
        if let Err(e) = result {
            self.failures.fetch_add(1, Ordering::Relaxed);
            if self.healthy.swap(false, Ordering::AcqRel) {
                tracing::error!(error = %e, "syncing the audit log failed");
            }
        }
    }

    fn subject(
        &self,
        email: &mut serde_json::Map<String, Value>,
        own: &mut serde_json::Map<String, Value>,
        subject: &str,
    ) {
        if self.settings.subjects {
            email.insert("subject".into(), json!(subject));
        } else {
            let hash: [u8; 32] = Sha256::digest(subject.as_bytes()).into();
            own.insert("subject_sha256".into(), json!(hex(&hash)));
        }
    }

    fn line(
        &self,
        action: &str,
        caller: Option<&str>,
        message_id: Option<&str>,
        from: Option<&str>,
        meta: Option<&Meta>,
        fallback_to: &[String],
    ) -> (Value, serde_json::Map<String, Value>) {
        let mut email = serde_json::Map::new();
        let mut own = serde_json::Map::new();
        if let Some(id) = message_id {
            email.insert("message_id".into(), json!(id));
        }
        if let Some(from) = from {
            email.insert("from".into(), json!({ "address": [from] }));
        }
        let addresses = |list: &[String]| json!({ "address": list });
        match meta {
            Some(m) => {
                email.insert("to".into(), addresses(&m.to));
                email.insert("cc".into(), addresses(&m.cc));
                email.insert("bcc".into(), addresses(&m.bcc));
                if let Some(r) = &m.reply_to {
                    email.insert("reply_to".into(), json!({ "address": [r] }));
                }
                self.subject(&mut email, &mut own, &m.subject);
                if !m.headers.is_empty() {
                    own.insert("headers".into(), json!(m.headers));
                }
                if let Some(by) = &m.held_by {
                    own.insert("held_by".into(), json!(by));
                }
                if let Some(t) = &m.template {
                    own.insert("template".into(), json!(t));
                }
                if let Some(t) = &m.tag {
                    own.insert("tag".into(), json!(t));
                }
            }
            None => {
                // A message stored without the daemon's description: its
                // envelope, which does not say which recipient was Bcc.
                own.insert("envelope_to".into(), json!(fallback_to));
            }
        }
        let outcome = match action {
            "refused" | "rejected" | "failed" | "expired" | "cancelled" => "failure",
            "unknown" => "unknown",
            _ => "success",
        };
        let line = json!({
            "@timestamp": jiff::Timestamp::now().to_string(),
            "event": { "action": action, "outcome": outcome },
            "user": { "name": caller },
            "email": Value::Object(email),
        });
        (line, own)
    }

    /// Records a change of the suppression list: `suppressed` (with the
    /// entry's reason) or `unsuppressed`, of `address`, by `by` (`operator
    /// NAME`, `daemon` for a bounce, `recipient` for an unsubscribe link).
    pub fn suppression(&self, change: &SuppressionChange<'_>) {
        if !self.enabled() {
            return;
        }
        let mut email = serde_json::Map::new();
        email.insert("to".into(), json!({ "address": [change.address] }));
        if let Some(id) = change.message_id {
            email.insert("message_id".into(), json!(id));
        }
        let mut event = json!({ "action": change.action, "outcome": "success" });
        if let Some(reason) = change.reason {
            event["reason"] = json!(reason);
        }
        self.write(&json!({
            "@timestamp": jiff::Timestamp::now().to_string(),
            "event": event,
            "user": { "name": change.by },
            "email": Value::Object(email),
        }));
    }

    /// Records that delivery was paused (`paused`, with the operator's
    /// note as `event.reason`) or resumed (`resumed`) by `by`.
    pub fn delivery(&self, action: &str, by: &str, reason: Option<&str>) {
        if !self.enabled() {
            return;
        }
        let mut event = json!({ "action": action, "outcome": "success" });
        if let Some(reason) = reason {
            event["reason"] = json!(reason);
        }
        self.write(&json!({
            "@timestamp": jiff::Timestamp::now().to_string(),
            "event": event,
            "user": { "name": by },
        }));
    }

    /// Records a refusal.
    pub fn refused(&self, r: &Refusal<'_>) {
        if !self.enabled() {
            return;
        }
        let (mut line, mut own) =
            self.line("refused", Some(r.caller), r.message_id, r.from, r.meta, &[]);
        if r.meta.is_none() {
            own.remove("envelope_to");
        }
        if let Some(size) = r.size {
            own.insert("size".into(), json!(size));
        }
        own.insert("code".into(), json!(r.code));
        if let Some(rule) = r.rule {
            own.insert("rule".into(), json!(rule));
        }
        if let Some(field) = r.field {
            own.insert("field".into(), json!(field));
        }
        if let Some(check) = r.check {
            own.insert("check".into(), json!(check));
        }
        line["event"]["reason"] = json!(r.rule.unwrap_or(r.code));
        line["mailmux"] = Value::Object(own);
        self.write(&line);
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        self.sync();
    }
}

/// Syncs the daemon's audit log every [`SYNC_EVERY`] while lines come, on
/// the blocking pool.
pub fn spawn_sync(audit: Arc<Audit>) {
    if !audit.enabled() {
        return;
    }
    tokio::spawn(async move {
        let mut every = tokio::time::interval(SYNC_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if !audit.unsynced.load(Ordering::Acquire) {
                continue;
            }
            let a = audit.clone();
            let _ = tokio::task::spawn_blocking(move || a.sync()).await;
        }
    });
}

impl Observer for Audit {
    fn event(&self, e: &Event<'_>) {
        if !self.enabled() {
            return;
        }
        let meta: Option<Meta> = e.meta.and_then(|m| serde_json::from_str(m).ok());
        let (mut line, mut own) = self.line(
            e.action.as_str(),
            e.caller,
            Some(e.message_id),
            e.from,
            meta.as_ref(),
            e.to,
        );
        own.insert("size".into(), json!(e.size));
        if let Some(relay) = e.relay {
            own.insert("relay".into(), json!(relay));
        }
        if let Some(code) = e.code {
            own.insert("smtp_code".into(), json!(code));
        }
        if let Some(by) = e.decided_by {
            own.insert("decided_by".into(), json!(by));
        }
        recipients_by_outcome(e, &mut own);
        // A bounce or complaint report names the one recipient it is about.
        if e.action.is_report() {
            own.insert("reported".into(), json!(e.to));
        }
        if let Some(reason) = e.reason {
            line["event"]["reason"] = json!(reason);
        }
        line["mailmux"] = Value::Object(own);
        self.write(&line);
    }
}

/// Which recipients had the message (`accepted`), were refused for good
/// (`refused`, each with its SMTP code) and wait for a retry (`deferred`),
/// on a line whose recipients did not all end alike: a `partial`, a
/// `deferred` round, a `failed` message's refusals, and a message
/// `cancelled`, `expired` or `unknown` after some recipients had it.
fn recipients_by_outcome(e: &Event<'_>, own: &mut serde_json::Map<String, Value>) {
    let mixed = !e.rejected.is_empty()
        || !e.deferred.is_empty()
        || (!e.accepted.is_empty() && e.action != Action::Sent);
    if !mixed {
        return;
    }
    if !e.accepted.is_empty() {
        own.insert("accepted".into(), json!(e.accepted));
    }
    if !e.rejected.is_empty() {
        let refused: Vec<Value> = e
            .rejected
            .iter()
            .map(|r| json!({ "address": r.address, "smtp_code": r.code }))
            .collect();
        own.insert("refused".into(), Value::Array(refused));
    }
    if !e.deferred.is_empty() {
        own.insert("deferred".into(), json!(e.deferred));
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(audit: &Audit) {
        audit.refused(&Refusal {
            caller: "agent",
            code: "invalid_input",
            ..Refusal::default()
        });
    }

    #[test]
    fn written_lines_wait_for_one_sync_and_a_reopen_syncs_the_file_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::open(AuditSettings {
            path: Some(path.clone()),
            ..AuditSettings::default()
        })
        .unwrap();
        assert!(!audit.sync(), "nothing was written");
        refusal(&audit);
        refusal(&audit);
        assert!(audit.sync());
        assert!(!audit.sync(), "the lines were synced once");
        refusal(&audit);
        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        audit.reopen();
        assert!(!audit.sync(), "the reopen synced the rotated file");
        refusal(&audit);
        assert!(audit.sync());
        assert!(audit.healthy());
        assert_eq!(audit.failures(), 0);
        let lines = |p: &std::path::Path| std::fs::read_to_string(p).unwrap().lines().count();
        assert_eq!(lines(&dir.path().join("audit.jsonl.1")), 3);
        assert_eq!(lines(&path), 1);
    }
}
