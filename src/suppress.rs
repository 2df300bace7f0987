//! The suppression list: the addresses the daemon accepts no mail for.
//!
//! The list lives in the queue's store, so that every daemon on a shared
//! store, and the queue command, see one list. The send path checks each
//! recipient against a copy held in memory ([`Suppressions::check`]), which
//! a background task reads again whenever the store's version of the list
//! moves (polled every [`REFRESH`]): an entry the queue command or another
//! daemon adds is in force here within about that long. A recipient that a
//! relay refuses as unknown (an enhanced status of 5.1.1, 5.1.2 or 5.1.10)
//! is added by the daemon that saw the refusal, unless
//! `queue.suppress_bounces` is off ([`Suppressions`] is a queue observer).
//! When the store cannot take that write, the entry holds in this daemon's
//! copy and the poll writes it once the store takes writes again.
//! Bounces and complaints that come back by mail are read by
//! `bounces.rs`, which lists what they report through
//! [`Suppressions::add_all`].
//!
//! The queue asks the same copy before each round of a message that no
//! recipient has yet (through `policy/rounds.rs`): one accepted before a recipient was
//! listed (scheduled, or waiting for a retry) is cancelled with the reason
//! `recipient_suppressed`, not sent; a recipient listed while it waits for
//! a retry of a message others have counts as refused, not sent to.
//!
//! Operators add and remove entries with `mailmux queue suppress` and
//! `/admin/suppressions`, both checked by [`operator_entry`]; a recipient
//! adds itself by the one-click unsubscribe link of a message sent with
//! `unsubscribe` ([`OneClick`], served by `mcp/http.rs`).
//!
//! Addresses are compared in one form ([`key`]): the local part in lower
//! case and the domain as lower-case A-labels, whatever case or script the
//! caller wrote.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use mailmux_actors::queue::{
    Drain, Event, Millis, Observer, Queue, Suppression, SuppressionChange, SuppressionQuery,
    now_millis,
};

/// How often the store's version of the list is polled.
pub const REFRESH: Duration = Duration::from_secs(1);

/// Entries a whole read of the list takes from the store at once.
const READ_AT_ONCE: usize = 10_000;

/// How long a stopping daemon keeps trying to store the entries the store
/// refused (within `shutdown_grace`).
const DRAIN_TRIES: Duration = Duration::from_secs(5);

/// The reasons an entry may give. `bounced` is the daemon's own; the others
/// are an operator's.
pub const REASONS: &[&str] = &["bounced", UNSUBSCRIBED, "complained", "manual"];

/// The reason of a recipient who unsubscribed: it stops every caller's
/// mail but transactional callers'.
pub const UNSUBSCRIBED: &str = "unsubscribed";

/// The longest `detail` kept: a reply's text, an operator's note.
const MAX_DETAIL: usize = 300;

/// `detail` cut to [`MAX_DETAIL`] bytes, at a character's boundary.
pub(crate) fn clipped(mut detail: String) -> String {
    if detail.len() > MAX_DETAIL {
        let mut end = MAX_DETAIL;
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        detail.truncate(end);
    }
    detail
}

/// An address as the list compares it: the local part in lower case, the
/// domain as lower-case A-labels. `None` for text that is not an address.
pub fn key(address: &str) -> Option<String> {
    let address = address.trim();
    let (local, domain) = address.rsplit_once('@')?;
    if local.is_empty() || domain.is_empty() || local.chars().any(char::is_whitespace) {
        return None;
    }
    let domain = crate::policy::rules::ascii_domain(domain)?;
    if domain.is_empty() {
        return None;
    }
    Some(format!("{}@{domain}", local.to_lowercase()))
}

/// An operator's entry for `address` (the queue command, `/admin/`), or
/// what is wrong with it: an address that is not one, a reason that is not
/// an operator's (`bounced` is the daemon's own), a note over one line.
pub fn operator_entry(
    address: &str,
    reason: &str,
    note: Option<&str>,
    at: Millis,
) -> Result<Suppression, String> {
    let Some(address) = key(address) else {
        return Err(format!("{address:?} is not an email address"));
    };
    if !REASONS[1..].contains(&reason) {
        return Err(format!(
            "the reason must be one of {}, not {reason:?}",
            REASONS[1..].join(", ")
        ));
    }
    if let Some(n) = note
        && (n.chars().any(char::is_control) || n.len() > MAX_DETAIL)
    {
        return Err(format!(
            "the note must be one line of at most {MAX_DETAIL} bytes"
        ));
    }
    Ok(Suppression {
        address,
        reason: reason.to_owned(),
        detail: note.map(str::to_owned),
        message_id: None,
        at,
    })
}

/// The path of the one-click unsubscribe links under `unsubscribe.url`.
pub const UNSUBSCRIBE_PATH: &str = "/unsubscribe/";

/// The fewest bytes of `unsubscribe.secret`.
pub const MIN_SECRET: usize = 32;

/// One-click unsubscribe links (RFC 8058) that the daemon serves itself:
/// `{url}/unsubscribe/{token}`, where the token is the recipient's address
/// and an HMAC-SHA-256 of it under `unsubscribe.secret` (its first 16
/// bytes), both base64url. Whoever holds a link may unsubscribe that one
/// address, and nobody can make a link for another without the secret.
#[derive(Debug, Clone, PartialEq)]
pub struct OneClick {
    /// `unsubscribe.url`, without a trailing `/`.
    pub url: String,
    /// `unsubscribe.secret`: the HMAC key.
    pub secret: mailmux_actors::Secret,
    /// `unsubscribe.previous_secret`: the key before a rotation, whose
    /// links still verify; no new link is made with it.
    pub previous: Option<mailmux_actors::Secret>,
}

/// The bytes of a token's MAC.
const MAC_BYTES: usize = 16;

impl OneClick {
    fn mac(&self, address: &str) -> aws_lc_rs::hmac::Tag {
        Self::mac_under(&self.secret, address)
    }

    fn mac_under(secret: &mailmux_actors::Secret, address: &str) -> aws_lc_rs::hmac::Tag {
        use aws_lc_rs::hmac;
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes());
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(b"mailmux-unsubscribe\0");
        ctx.update(address.as_bytes());
        ctx.sign()
    }

    /// The token of `address` (in its [`key`] form).
    pub fn token(&self, address: &str) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mac = self.mac(address);
        format!(
            "{}.{}",
            b64.encode(address),
            b64.encode(&mac.as_ref()[..MAC_BYTES])
        )
    }

    /// The link that unsubscribes `address`; `None` for text that is not an
    /// address.
    pub fn link(&self, address: &str) -> Option<String> {
        let address = key(address)?;
        Some(format!(
            "{}{UNSUBSCRIBE_PATH}{}",
            self.url,
            self.token(&address)
        ))
    }

    /// The address a token unsubscribes; `None` for a token neither the
    /// secret nor the previous one made (compared in constant time).
    pub fn verify(&self, token: &str) -> Option<String> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let (address, mac) = token.split_once('.')?;
        let address = String::from_utf8(b64.decode(address).ok()?).ok()?;
        let mac = b64.decode(mac).ok()?;
        let made_by = |secret: &mailmux_actors::Secret| {
            let want = Self::mac_under(secret, &address);
            aws_lc_rs::constant_time::verify_slices_are_equal(&want.as_ref()[..MAC_BYTES], &mac)
                .is_ok()
        };
        (made_by(&self.secret) || self.previous.as_ref().is_some_and(made_by)).then_some(address)
    }
}

/// An entry as `mailmux queue suppress list --json` and `/admin/suppressions`
/// show it.
pub fn to_json(s: &Suppression) -> serde_json::Value {
    serde_json::json!({
        "address": s.address,
        "reason": s.reason,
        "detail": s.detail,
        "message_id": s.message_id,
        "since": crate::mcp::types::rfc3339(s.at),
    })
}

/// Whether a permanent refusal of one recipient says that the address does
/// not exist: its enhanced status code (RFC 3463) is 5.1.1 (no such
/// mailbox), 5.1.2 (no such domain) or 5.1.10 (a domain that accepts no
/// mail, RFC 7505). A refusal for any other reason (policy, content, the
/// sender) lists nothing.
pub fn is_hard_bounce(code: u16, text: &str) -> bool {
    if !(500..600).contains(&code) {
        return false;
    }
    let status = text.split_whitespace().next().unwrap_or("");
    matches!(status, "5.1.1" | "5.1.2" | "5.1.10")
}

/// One listed address as the send path needs it. Its reason is shared by
/// every entry that gives it: a million entries hold four strings.
#[derive(Debug, Clone)]
pub struct Listed {
    pub reason: Arc<str>,
    pub at: Millis,
}

impl Listed {
    fn new(reason: &str, at: Millis) -> Listed {
        static SHARED: std::sync::LazyLock<Vec<Arc<str>>> =
            std::sync::LazyLock::new(|| REASONS.iter().map(|r| Arc::from(*r)).collect());
        let reason = SHARED
            .iter()
            .find(|r| &***r == reason)
            .cloned()
            .unwrap_or_else(|| Arc::from(reason));
        Listed { reason, at }
    }
}

/// The daemon's copy of the list, kept in step with the store.
#[derive(Debug)]
pub struct Suppressions {
    queue: Queue,
    /// By [`key`].
    listed: RwLock<HashMap<String, Listed>>,
    /// The store's version the copy was read at; `None` before a first read.
    version: std::sync::Mutex<Option<i64>>,
    /// Entries this daemon listed whose write to the store has not
    /// succeeded yet: a read of the store's list keeps them, and the poll
    /// writes them once the store takes writes again.
    unwritten: Arc<std::sync::Mutex<HashMap<String, Suppression>>>,
    /// `queue.suppress_bounces`.
    bounces: bool,
    /// Where the bounces it lists are recorded.
    audit: Arc<crate::audit::Audit>,
}

impl Suppressions {
    /// Reads the list from the store (a failure is logged, and the list is
    /// read again at the next poll) and starts the poll, which ends when
    /// the returned value is dropped.
    pub async fn start(
        queue: Queue,
        bounces: bool,
        audit: Arc<crate::audit::Audit>,
    ) -> Arc<Suppressions> {
        let s = Arc::new(Suppressions {
            queue,
            audit,
            listed: RwLock::new(HashMap::new()),
            version: std::sync::Mutex::new(None),
            unwritten: Arc::default(),
            bounces,
        });
        if let Err(e) = s.refresh().await {
            tracing::warn!(error = %e, "cannot read the suppression list; trying again");
        }
        tokio::spawn(poll(Arc::downgrade(&s)));
        s
    }

    /// The first of `recipients` that is listed, with its position and
    /// entry. For `transactional` mail an [`UNSUBSCRIBED`] entry does not
    /// count: a recipient who left a newsletter still gets a receipt.
    pub fn check<'a>(
        &self,
        recipients: impl IntoIterator<Item = &'a str>,
        transactional: bool,
    ) -> Option<(usize, String, Listed)> {
        let listed = self.listed.read().unwrap_or_else(|e| e.into_inner());
        if listed.is_empty() {
            return None;
        }
        recipients.into_iter().enumerate().find_map(|(i, r)| {
            let k = key(r)?;
            listed
                .get(&k)
                .filter(|l| !(transactional && &*l.reason == UNSUBSCRIBED))
                .map(|l| (i, r.to_owned(), l.clone()))
        })
    }

    /// How many addresses are listed.
    pub fn len(&self) -> usize {
        self.listed.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Lists `entry` in the store (an address listed already keeps its
    /// entry), in force on this daemon at once, and audits it as `by`'s
    /// (`operator NAME`, `recipient`) when it was added; whether it was.
    pub async fn add(
        &self,
        entry: Suppression,
        by: &str,
    ) -> Result<bool, mailmux_actors::queue::QueueError> {
        Ok(!self.add_all(vec![entry], by).await?.is_empty())
    }

    /// [`Suppressions::add`] for several entries in one write; the
    /// addresses it added.
    pub async fn add_all(
        &self,
        entries: Vec<Suppression>,
        by: &str,
    ) -> Result<Vec<String>, mailmux_actors::queue::QueueError> {
        let reasons: HashMap<String, (String, Option<String>)> = entries
            .iter()
            .map(|e| (e.address.clone(), (e.reason.clone(), e.message_id.clone())))
            .collect();
        let added = self.queue.suppress(entries).await?;
        let _ = self.refresh().await;
        for address in &added {
            let (reason, message_id) = reasons.get(address).cloned().unwrap_or_default();
            self.audited(
                "suppressed",
                by,
                address,
                Some(&reason),
                message_id.as_deref(),
            );
        }
        Ok(added)
    }

    /// Takes `address` (in its [`key`] form) off the store's list, in
    /// force on this daemon at once, and audits it as `by`'s; whether it
    /// was listed.
    pub async fn remove(
        &self,
        address: &str,
        by: &str,
    ) -> Result<bool, mailmux_actors::queue::QueueError> {
        let gone = self.queue.unsuppress(address).await?;
        if gone {
            let _ = self.refresh().await;
            self.audited("unsuppressed", by, address, None, None);
        }
        Ok(gone)
    }

    fn audited(
        &self,
        action: &str,
        by: &str,
        address: &str,
        reason: Option<&str>,
        message_id: Option<&str>,
    ) {
        self.audit.suppression(&crate::audit::SuppressionChange {
            action,
            by,
            address,
            reason,
            message_id,
        });
    }

    /// Reads the list again if the store's version moved: after a change
    /// this daemon made, so that it is in force here at once. Only what
    /// changed since the copy's version, where the store still holds those
    /// changes; else the whole list.
    async fn refresh(&self) -> Result<(), mailmux_actors::queue::QueueError> {
        let now = self.queue.suppression_version().await?;
        let mine = *self.version.lock().unwrap_or_else(|e| e.into_inner());
        if mine == Some(now) {
            return Ok(());
        }
        if let Some(since) = mine.filter(|&since| since < now)
            && let Some((version, changes)) = self.queue.suppression_changes(since).await?
        {
            self.apply(since, version, changes);
            return Ok(());
        }
        // The whole list, a page at a time into the new copy: a list of
        // millions is never held twice over (as entries, then as the copy).
        let version = now;
        let mut listed: HashMap<String, Listed> = HashMap::new();
        let mut page = SuppressionQuery {
            limit: Some(READ_AT_ONCE),
            ..Default::default()
        };
        loop {
            let read = self.queue.suppression_page(&page).await?;
            listed.extend(
                read.entries
                    .into_iter()
                    .map(|s| (s.address, Listed::new(&s.reason, s.at))),
            );
            match read.next_after {
                Some(after) => page.after = Some(after),
                None => break,
            }
        }
        for (k, s) in self
            .unwritten
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            listed
                .entry(k.clone())
                .or_insert_with(|| Listed::new(&s.reason, s.at));
        }
        *self.listed.write().unwrap_or_else(|e| e.into_inner()) = listed;
        *self.version.lock().unwrap_or_else(|e| e.into_inner()) = Some(version);
        Ok(())
    }

    /// Applies the changes that bring the copy from version `since` to
    /// `version` (unless another refresh moved it meanwhile). An address
    /// whose write is still due stays listed.
    fn apply(&self, since: i64, version: i64, changes: Vec<SuppressionChange>) {
        let mut listed = self.listed.write().unwrap_or_else(|e| e.into_inner());
        let mut at = self.version.lock().unwrap_or_else(|e| e.into_inner());
        if *at != Some(since) {
            return;
        }
        let unwritten = self.unwritten.lock().unwrap_or_else(|e| e.into_inner());
        for change in changes {
            match change {
                SuppressionChange::Added(s) => {
                    listed.insert(s.address, Listed::new(&s.reason, s.at));
                }
                SuppressionChange::Removed(address) => {
                    if !unwritten.contains_key(&address) {
                        listed.remove(&address);
                    }
                }
            }
        }
        *at = Some(version);
    }

    /// Writes the entries a failed write left in memory only; how many it
    /// wrote (none when there were none, or the store still fails).
    async fn write_unwritten(&self) -> Result<usize, mailmux_actors::queue::QueueError> {
        let held: Vec<Suppression> = self
            .unwritten
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        if held.is_empty() {
            return Ok(0);
        }
        self.queue.suppress(held.clone()).await?;
        forget(&self.unwritten, held.iter().map(|s| &s.address));
        Ok(held.len())
    }
}

/// Takes `keys` out of the entries held in memory only, once stored.
fn forget<'a>(
    unwritten: &std::sync::Mutex<HashMap<String, Suppression>>,
    keys: impl IntoIterator<Item = &'a String>,
) {
    let mut u = unwritten.lock().unwrap_or_else(|e| e.into_inner());
    for k in keys {
        u.remove(k);
    }
}

async fn poll(s: Weak<Suppressions>) {
    let mut failing = false;
    loop {
        tokio::time::sleep(REFRESH).await;
        let Some(s) = s.upgrade() else { return };
        match s.write_unwritten().await {
            Ok(0) | Err(_) => {}
            Ok(n) => tracing::info!(
                entries = n,
                "suppression list entries held in memory while the store failed are stored"
            ),
        }
        match s.refresh().await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("the suppression list is read again");
            }
            Ok(()) => {}
            // Logged once per outage: the store's own state changes are
            // logged by the queue.
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "cannot read the suppression list; the copy in memory stays in force");
            }
            Err(_) => {}
        }
    }
}

impl Observer for Suppressions {
    /// Writes the entries the store refused so far, trying again every
    /// [`REFRESH`] until `until` and for at most [`DRAIN_TRIES`] (once at
    /// least); those it never took are lost with the daemon, and the log
    /// says how many (the audit log's `suppressed` lines by `daemon` name
    /// them).
    fn drain(&self, until: tokio::time::Instant) -> Drain<'_> {
        Box::pin(async move {
            let until = until.min(tokio::time::Instant::now() + DRAIN_TRIES);
            loop {
                match self.write_unwritten().await {
                    Ok(0) => return,
                    Ok(n) => {
                        tracing::info!(
                            entries = n,
                            "shutdown: suppression list entries held in memory are stored"
                        );
                        return;
                    }
                    Err(e) if tokio::time::Instant::now() + REFRESH >= until => {
                        let lost = self
                            .unwritten
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .len();
                        tracing::error!(
                            entries = lost,
                            error = %e,
                            "shutdown: suppression list entries the store refused are lost; \
                             the audit log's `suppressed` lines by `daemon` name them, to list \
                             again with `mailmux queue suppress add`"
                        );
                        return;
                    }
                    Err(_) => tokio::time::sleep(REFRESH).await,
                }
            }
        })
    }

    fn event(&self, e: &Event<'_>) {
        if !self.bounces || e.rejected.is_empty() {
            return;
        }
        let at = now_millis();
        let mut new = Vec::new();
        {
            let mut listed = self.listed.write().unwrap_or_else(|e| e.into_inner());
            for r in e.rejected {
                if !is_hard_bounce(r.code, &r.text) {
                    continue;
                }
                let Some(k) = key(&r.address) else { continue };
                if listed.contains_key(&k) {
                    continue;
                }
                let reason = "bounced".to_owned();
                listed.insert(k.clone(), Listed::new(&reason, at));
                let detail = clipped(format!("{} {}", r.code, r.text));
                new.push(Suppression {
                    address: k,
                    reason,
                    detail: Some(detail),
                    message_id: Some(e.message_id.to_owned()),
                    at,
                });
            }
        }
        if new.is_empty() {
            return;
        }
        tracing::info!(
            message_id = %e.message_id,
            recipients = new.len(),
            "recipients refused as unknown; added to the suppression list"
        );
        for s in &new {
            self.audited(
                "suppressed",
                "daemon",
                &s.address,
                Some(&s.reason),
                s.message_id.as_deref(),
            );
        }
        let keys: Vec<String> = new.iter().map(|s| s.address.clone()).collect();
        self.unwritten
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(new.iter().map(|s| (s.address.clone(), s.clone())));
        let (queue, unwritten) = (self.queue.clone(), self.unwritten.clone());
        tokio::spawn(async move {
            match queue.suppress(new).await {
                Ok(_) => forget(&unwritten, &keys),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot store suppression list entries; they hold in this daemon, which stores them once the store takes writes again")
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_entries_share_their_reason() {
        let (a, b) = (Listed::new("bounced", 1), Listed::new("bounced", 2));
        assert!(Arc::ptr_eq(&a.reason, &b.reason));
        assert_eq!(&*a.reason, "bounced");
        // A reason an older release or another tool wrote is kept as given.
        assert_eq!(&*Listed::new("legacy", 3).reason, "legacy");
    }

    #[test]
    fn keys_ignore_case_and_script() {
        assert_eq!(key("Bob@Example.ORG").as_deref(), Some("bob@example.org"));
        assert_eq!(
            key("bob@bücher.example").as_deref(),
            Some("bob@xn--bcher-kva.example")
        );
        assert_eq!(
            key(" bob@example.org. ").as_deref(),
            Some("bob@example.org")
        );
        assert_eq!(key("Zoë@example.org").as_deref(), Some("zoë@example.org"));
        for bad in ["", "bob", "@example.org", "bob@", "b ob@example.org"] {
            assert_eq!(key(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_one_click_token_names_its_address_and_no_other() {
        let oc = OneClick {
            url: "https://mail.example.org".into(),
            secret: mailmux_actors::Secret::new("k".repeat(MIN_SECRET)),
            previous: None,
        };
        let link = oc.link("Bob@Example.org").unwrap();
        let token = link
            .strip_prefix("https://mail.example.org/unsubscribe/")
            .unwrap();
        assert_eq!(oc.verify(token).as_deref(), Some("bob@example.org"));
        // Another address under the same MAC, a changed MAC, another
        // secret, garbage: none verifies.
        let (_, mac) = token.split_once('.').unwrap();
        let other = oc.token("eve@example.org");
        let (addr, _) = other.split_once('.').unwrap();
        assert_eq!(oc.verify(&format!("{addr}.{mac}")), None);
        let mut bad = token.to_string();
        let last = bad.pop().unwrap();
        bad.push(if last == 'A' { 'B' } else { 'A' });
        assert_eq!(oc.verify(&bad), None);
        let other_secret = OneClick {
            secret: mailmux_actors::Secret::new("j".repeat(MIN_SECRET)),
            ..oc.clone()
        };
        assert_eq!(other_secret.verify(token), None);
        for junk in ["", ".", "x", "a.b", "%%.%%"] {
            assert_eq!(oc.verify(junk), None, "{junk:?}");
        }
        // Rotated: the old secret's links still verify, new links are the
        // new secret's, and a third secret's do not.
        let rotated = OneClick {
            previous: Some(oc.secret.clone()),
            ..other_secret.clone()
        };
        assert_eq!(rotated.verify(token).as_deref(), Some("bob@example.org"));
        let new = rotated.token("bob@example.org");
        assert_ne!(new, token);
        assert_eq!(
            other_secret.verify(&new).as_deref(),
            Some("bob@example.org")
        );
        assert_eq!(oc.verify(&new), None);
        let third = OneClick {
            secret: mailmux_actors::Secret::new("i".repeat(MIN_SECRET)),
            ..oc.clone()
        };
        assert_eq!(rotated.verify(&third.token("bob@example.org")), None);
    }

    #[test]
    fn only_unknown_addresses_are_hard_bounces() {
        assert!(is_hard_bounce(550, "5.1.1 no such user"));
        assert!(is_hard_bounce(550, "5.1.2 bad destination system"));
        assert!(is_hard_bounce(556, "5.1.10 null MX"));
        assert!(!is_hard_bounce(550, "5.7.1 relaying denied"));
        assert!(!is_hard_bounce(550, "no such user"), "no enhanced status");
        assert!(!is_hard_bounce(550, "5.1.11 x"));
        assert!(!is_hard_bounce(450, "4.1.1 try later"));
        assert!(!is_hard_bounce(452, "5.1.1 a 4xx is never one"));
    }
}
