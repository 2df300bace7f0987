//! Bounce and complaint reports that come back by mail, for relays with
//! `[relays.bounces]`: a relay that took a message may still fail to
//! deliver it, and then mails a delivery status notification (RFC 3464) to
//! the envelope sender; a mailbox provider's feedback loop mails a
//! complaint (ARF, RFC 5965) when a recipient marks a message as spam.
//! Both land in the sending account's mailbox, which this module reads over
//! IMAP every `every`, and the recipients they name go on the suppression
//! list: `bounced` for a recipient whose address does not exist (an
//! enhanced status of 5.1.1, 5.1.2 or 5.1.10, as for a refusal in the SMTP
//! session), `complained` for an `abuse` complaint. The message's status
//! keeps what each report said (`Store::note_reports`), so the agent that
//! sent it learns that a recipient never got it.
//!
//! A report counts only for a message this daemon's store holds and a
//! recipient that message was sent to: anyone can mail the account a
//! forged report, and this keeps one from listing an address the daemon
//! never mailed. A complaint that names no recipient (feedback loops often
//! redact it) counts for a message with one recipient only.
//!
//! The mailbox is only read (`EXAMINE`, `BODY.PEEK`): no flag changes, and
//! nothing is moved or deleted, so it may be the account's own inbox. How
//! far it was read (its UIDVALIDITY and the last UID) is kept in the store,
//! so that a restart reads only what is new and an address an operator took
//! off the list is not put back by a report read before.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::TryStreamExt;
use mail_parser::{MessageParser, MimeHeaders, PartType};
use mailmux_actors::queue::{Millis, Queue, ReportRecord, Suppression, now_millis};
use tokio_util::sync::CancellationToken;

use crate::imap::{ImapAccount, ImapSession};
use crate::suppress::{Suppressions, clipped, key};

/// A relay's validated `[relays.bounces]`.
#[derive(Debug, Clone, PartialEq)]
pub struct BounceSettings {
    pub account: ImapAccount,
    /// The folder read. Default: `INBOX`.
    pub folder: String,
    /// How often it is read. Default: 1m.
    pub every: Duration,
}

/// One IMAP command (or the connection and login) may take this long.
const IMAP_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages whose headers are fetched in one command.
const CHUNK: usize = 100;
/// The UIDs one SEARCH covers.
const WINDOW: u32 = 5_000;
/// The windows one read goes through at most; the rest wait for the next.
const WINDOWS_PER_READ: usize = 20;
/// The bytes of a report read: its human part, its status part and the
/// returned message's headers come first; a returned message's body, which
/// may be large, is not needed.
const REPORT_BYTES: usize = 256 * 1024;

/// The reasons a report is noted with, as `list_messages`, the queue
/// command, the console and the metrics name them.
pub const REASONS: [&str; 2] = [BOUNCED, COMPLAINED];
const BOUNCED: &str = "bounced";
const COMPLAINED: &str = "complained";

/// What one report says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The Message-ID of the message it is about (without `<>`).
    pub message_id: Option<String>,
    /// `bounced` or `complained`.
    pub reason: &'static str,
    /// The recipients it lists, each with what the report says of it.
    pub recipients: Vec<(String, String)>,
    /// A complaint that names no recipient: it is about the message's only
    /// one.
    pub sole: bool,
}

/// Reads a report: a `multipart/report` whose `report-type` is
/// `delivery-status` (the failed recipients with a status of 5.1.1, 5.1.2
/// or 5.1.10) or `feedback-report` (an `abuse` complaint). `None` for any
/// other message, and for a report that lists nobody.
pub fn parse(bytes: &[u8]) -> Option<Report> {
    let message = MessageParser::default().parse(bytes)?;
    let ct = message.content_type()?;
    if !ct.ctype().eq_ignore_ascii_case("multipart")
        || !ct
            .subtype()
            .is_some_and(|s| s.eq_ignore_ascii_case("report"))
    {
        return None;
    }
    let report_type = ct.attribute("report-type")?.to_ascii_lowercase();
    let mut fields = None;
    // The Message-ID of the returned message, or of its headers.
    let mut message_id = None;
    for part in &message.parts {
        let Some(pct) = part.content_type() else {
            continue;
        };
        let kind = format!(
            "{}/{}",
            pct.ctype().to_ascii_lowercase(),
            pct.subtype().unwrap_or("").to_ascii_lowercase()
        );
        match kind.as_str() {
            "message/delivery-status"
            | "message/global-delivery-status"
            | "message/feedback-report" => {
                fields = Some(String::from_utf8_lossy(part.contents()).into_owned());
            }
            "message/rfc822" | "message/global" => {
                if let PartType::Message(m) = &part.body {
                    message_id = m.message_id().map(str::to_owned);
                }
            }
            "text/rfc822-headers" | "message/global-headers" => {
                if let Some(h) = MessageParser::default().parse_headers(part.contents()) {
                    message_id = h.message_id().map(str::to_owned);
                }
            }
            _ => {}
        }
    }
    let groups = field_groups(&fields?);
    match report_type.as_str() {
        "delivery-status" => {
            let recipients: Vec<(String, String)> = groups
                .iter()
                .skip(1)
                .filter_map(|g| {
                    let action = field(g, "action")?;
                    let status = field(g, "status")?;
                    let status = status.split_whitespace().next()?;
                    if !action.eq_ignore_ascii_case("failed")
                        || !matches!(status, "5.1.1" | "5.1.2" | "5.1.10")
                    {
                        return None;
                    }
                    // The address as it was sent (ORCPT), else where the
                    // mail ended.
                    let address = field(g, "original-recipient")
                        .and_then(typed_address)
                        .or_else(|| field(g, "final-recipient").and_then(typed_address))?;
                    let detail = field(g, "diagnostic-code")
                        .map(|d| {
                            d.split_once(';')
                                .map_or(d, |(_, text)| text)
                                .trim()
                                .to_owned()
                        })
                        .unwrap_or_else(|| format!("status {status}"));
                    Some((address, detail))
                })
                .collect();
            (!recipients.is_empty()).then_some(Report {
                message_id,
                reason: BOUNCED,
                recipients,
                sole: false,
            })
        }
        "feedback-report" => {
            let g = groups.first()?;
            let kind = field(g, "feedback-type")?;
            if !kind.eq_ignore_ascii_case("abuse") {
                return None;
            }
            let detail = format!("complaint ({kind})");
            let recipients: Vec<(String, String)> = g
                .iter()
                .filter(|(name, _)| name == "original-rcpt-to")
                .filter_map(|(_, v)| plain_address(v))
                .map(|a| (a, detail.clone()))
                .collect();
            let sole = recipients.is_empty();
            Some(Report {
                message_id,
                reason: COMPLAINED,
                recipients,
                sole,
            })
        }
        _ => None,
    }
}

/// The groups of `Name: value` fields of a status or feedback part, split
/// at blank lines, names in lower case, folded lines joined.
fn field_groups(text: &str) -> Vec<Vec<(String, String)>> {
    let mut groups = Vec::new();
    let mut group: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !group.is_empty() {
                groups.push(std::mem::take(&mut group));
            }
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = group.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            group.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    if !group.is_empty() {
        groups.push(group);
    }
    groups
}

fn field<'a>(group: &'a [(String, String)], name: &str) -> Option<&'a str> {
    group
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The address of a typed field (`rfc822; bob@example.org`, or `utf-8;`
/// with the address as it is or in RFC 6533's `\x{HEX}` escapes, the form
/// the daemon's own `ORCPT` takes).
fn typed_address(value: &str) -> Option<String> {
    let (kind, address) = value.split_once(';')?;
    let kind = kind.trim();
    if kind.eq_ignore_ascii_case("utf-8") {
        return plain_address(&unescaped(address)?);
    }
    if !kind.eq_ignore_ascii_case("rfc822") {
        return None;
    }
    plain_address(address)
}

/// `text` with each `\x{HEX}` (RFC 6533's `EmbeddedUnicodeChar`) made the
/// character it names; `None` when one names no character.
fn unescaped(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("\\x{") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 3..];
        let end = after.find('}')?;
        let code = u32::from_str_radix(&after[..end], 16).ok()?;
        out.push(char::from_u32(code)?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

fn plain_address(value: &str) -> Option<String> {
    let a = value.trim().trim_start_matches('<').trim_end_matches('>');
    (a.contains('@') && !a.chars().any(char::is_whitespace)).then(|| a.to_owned())
}

/// The entries a report adds, checked against the message it is about:
/// only that message's recipients.
fn entries(report: &Report, message_id: &str, to: &[String]) -> Vec<Suppression> {
    let recipients: Vec<String> = to.iter().filter_map(|r| key(r)).collect();
    let at = now_millis();
    let entry = |address: String, detail: &str| Suppression {
        address,
        reason: report.reason.to_owned(),
        detail: Some(clipped(detail.to_owned())),
        message_id: Some(message_id.to_owned()),
        at,
    };
    if report.sole {
        return match recipients.as_slice() {
            [only] => vec![entry(only.clone(), "complaint (abuse)")],
            _ => Vec::new(),
        };
    }
    report
        .recipients
        .iter()
        .filter_map(|(address, detail)| {
            let k = key(address)?;
            recipients.contains(&k).then(|| entry(k, detail))
        })
        .collect()
}

/// What one relay's reader has done, for `get_smtp_status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReaderStatus {
    pub relay: String,
    pub folder: String,
    /// When the mailbox was last read whole (up to what had arrived).
    pub last_read_at: Option<Millis>,
    /// Why the last read failed, until one succeeds.
    pub error: Option<String>,
    /// Reports read since the daemon started.
    pub reports: u64,
    /// Addresses those reports put on the suppression list.
    pub listed: u64,
}

/// Every reader's status, by relay, in the order configured.
#[derive(Debug, Clone, Default)]
pub struct Status(Arc<std::sync::Mutex<Vec<ReaderStatus>>>);

impl Status {
    /// One "not read yet" entry per relay in `readers`.
    pub fn new(readers: &[(String, BounceSettings)]) -> Status {
        Status(Arc::new(std::sync::Mutex::new(
            readers
                .iter()
                .map(|(relay, s)| ReaderStatus {
                    relay: relay.clone(),
                    folder: s.folder.clone(),
                    ..ReaderStatus::default()
                })
                .collect(),
        )))
    }

    pub fn snapshot(&self) -> Vec<ReaderStatus> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, relay: &str, f: impl FnOnce(&mut ReaderStatus)) {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = all.iter_mut().find(|r| r.relay == relay) {
            f(r);
        }
    }
}

/// The readers of every relay with `[relays.bounces]`; they stop when this
/// is dropped.
#[derive(Debug)]
pub struct BounceReaders {
    stop: CancellationToken,
}

impl Drop for BounceReaders {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts one reader per relay in `readers` (relay name → settings),
/// each recording what it did in `status`.
pub fn start(
    queue: Queue,
    list: &Arc<Suppressions>,
    readers: &[(String, BounceSettings)],
    status: &Status,
) -> BounceReaders {
    let stop = CancellationToken::new();
    for (relay, settings) in readers {
        let reader = Reader {
            relay: relay.clone(),
            cursor: format!(
                "{relay}\u{1f}{}@{}\u{1f}{}",
                settings.account.username, settings.account.host, settings.folder
            ),
            settings: settings.clone(),
            queue: queue.clone(),
            list: Arc::downgrade(list),
            status: status.clone(),
        };
        tokio::spawn(reader.run(stop.clone()));
    }
    BounceReaders { stop }
}

struct Reader {
    relay: String,
    /// The mailbox's name in the store's cursors.
    cursor: String,
    settings: BounceSettings,
    queue: Queue,
    list: Weak<Suppressions>,
    status: Status,
}

/// What one read found.
#[derive(Debug, Default)]
struct Read {
    /// Messages looked at.
    seen: usize,
    /// Reports among them.
    reports: usize,
    /// Addresses added to the list.
    listed: usize,
}

impl Reader {
    async fn run(self, stop: CancellationToken) {
        let mut session: Option<ImapSession> = None;
        let mut failing: Option<String> = None;
        loop {
            let read = tokio::select! {
                () = stop.cancelled() => break,
                // After a failed read, a fresh OAuth2 token (the cached
                // one may be what the server refused).
                read = self.read(&mut session, failing.is_some()) => read,
            };
            match read {
                Ok(r) => {
                    self.status.update(&self.relay, |s| {
                        s.last_read_at = Some(now_millis());
                        s.error = None;
                        s.reports += r.reports as u64;
                        s.listed += r.listed as u64;
                    });
                    if failing.take().is_some() {
                        tracing::info!(relay = %self.relay, "the bounce mailbox is read again");
                    }
                    if r.reports > 0 {
                        tracing::info!(relay = %self.relay, messages = r.seen, reports = r.reports, listed = r.listed, "bounce and complaint reports read");
                    }
                }
                Err(e) => {
                    session = None;
                    self.status
                        .update(&self.relay, |s| s.error = Some(e.clone()));
                    // Logged once per outage, not at every read.
                    if failing.as_deref() != Some(e.as_str()) {
                        tracing::warn!(relay = %self.relay, error = %e, "cannot read the bounce mailbox; trying again");
                    }
                    failing = Some(e);
                }
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(self.settings.every) => {}
            }
        }
        if let Some(mut s) = session {
            let _ = tokio::time::timeout(Duration::from_secs(1), s.logout()).await;
        }
    }

    /// Reads what arrived since the last read, lists the recipients its
    /// reports name, and moves the cursor past it.
    async fn read(&self, session: &mut Option<ImapSession>, fresh: bool) -> Result<Read, String> {
        let timed =
            |what: &'static str| move |_| format!("{what}: no answer within {IMAP_TIMEOUT:?}");
        if session.is_none() {
            let s = tokio::time::timeout(
                IMAP_TIMEOUT,
                crate::imap::login(&self.settings.account, fresh),
            )
            .await
            .map_err(timed("login"))??;
            *session = Some(s);
        }
        let Some(s) = session.as_mut() else {
            return Ok(Read::default());
        };
        let folder = self.settings.folder.as_str();
        let mailbox = tokio::time::timeout(IMAP_TIMEOUT, s.examine(folder))
            .await
            .map_err(timed("EXAMINE"))?
            .map_err(|e| format!("EXAMINE {folder:?}: {e}"))?;
        let validity = mailbox.uid_validity.unwrap_or(0);
        let cursor = self
            .queue
            .report_cursor(&self.cursor)
            .await
            .map_err(|e| format!("the store: {e}"))?;
        let mut after = match cursor {
            Some((v, uid)) if v == validity => uid,
            _ => 0,
        };
        let mut read = Read::default();
        // A window of UIDs at a time, so that no answer grows with the
        // mailbox (the server may send at most 1 MiB between two commands),
        // until the read has caught up.
        for _ in 0..WINDOWS_PER_READ {
            // UIDs are below 2^32: at the last one there is nothing after it.
            let Some(first) = after.checked_add(1) else {
                break;
            };
            if mailbox.uid_next.is_some_and(|next| next <= first) {
                break;
            }
            let last = first.saturating_add(WINDOW - 1);
            let found =
                tokio::time::timeout(IMAP_TIMEOUT, s.uid_search(format!("UID {first}:{last}")))
                    .await
                    .map_err(timed("SEARCH"))?
                    .map_err(|e| format!("SEARCH: {e}"))?;
            let mut uids: Vec<u32> = found
                .into_iter()
                .filter(|u| (first..=last).contains(u))
                .collect();
            uids.sort_unstable();
            if uids.is_empty() {
                // Nothing left in this stretch (its messages were deleted):
                // past it, if the mailbox goes on.
                if mailbox.uid_next.is_some_and(|next| next > last) {
                    self.advance(validity, last).await?;
                    after = last;
                    continue;
                }
                break;
            }
            for chunk in uids.chunks(CHUNK) {
                let set = uid_set(chunk);
                let heads = fetch(s, &set, "(UID BODY.PEEK[HEADER.FIELDS (CONTENT-TYPE)])").await?;
                let reports: Vec<u32> = heads
                    .iter()
                    .filter(|f| f.header().is_some_and(is_report))
                    .filter_map(|f| f.uid)
                    .collect();
                let mut new = Vec::new();
                for uid in reports {
                    let query = format!("(UID BODY.PEEK[]<0.{REPORT_BYTES}>)");
                    let fetched = fetch(s, &uid.to_string(), &query).await?;
                    let Some(report) = fetched.iter().find_map(|f| f.body()).and_then(parse) else {
                        continue;
                    };
                    read.reports += 1;
                    new.extend(self.noted(&report).await?);
                }
                // The chunk's entries in one write (and one read of the
                // list after it), not one a report.
                read.listed += self.list(new).await?;
                read.seen += chunk.len();
                if let Some(last) = chunk.last() {
                    self.advance(validity, *last).await?;
                    after = *last;
                }
            }
        }
        Ok(read)
    }

    async fn advance(&self, validity: u32, uid: u32) -> Result<(), String> {
        self.queue
            .advance_report_cursor(&self.cursor, validity, uid)
            .await
            .map_err(|e| format!("the store: {e}"))
    }

    /// What `report` says of the recipients of a message of this store,
    /// kept on that message; the entries it would add to the list.
    async fn noted(&self, report: &Report) -> Result<Vec<Suppression>, String> {
        let Some(id) = report.message_id.as_deref() else {
            return Ok(Vec::new());
        };
        let Some(record) = self
            .queue
            .status(id)
            .await
            .map_err(|e| format!("the store: {e}"))?
        else {
            return Ok(Vec::new());
        };
        let new = entries(report, &record.message_id, &record.to);
        if new.is_empty() {
            return Ok(new);
        }
        // On the message whether or not the address is listed already, so
        // that its status says what happened to it.
        let noted = new
            .iter()
            .map(|e| ReportRecord {
                at: e.at,
                reason: e.reason.clone(),
                address: e.address.clone(),
                detail: e.detail.clone().unwrap_or_default(),
            })
            .collect();
        self.queue
            .note_reports(&record, noted)
            .await
            .map_err(|e| format!("the store: {e}"))?;
        Ok(new)
    }

    /// Lists `new` (audited as the report's); how many addresses it added.
    async fn list(&self, mut new: Vec<Suppression>) -> Result<usize, String> {
        // Two reports of one chunk about one address: its first entry.
        let mut seen = std::collections::HashSet::new();
        new.retain(|e| seen.insert(e.address.clone()));
        if new.is_empty() {
            return Ok(0);
        }
        let Some(list) = self.list.upgrade() else {
            return Ok(0);
        };
        let reasons: Vec<(String, String)> = new
            .iter()
            .map(|e| (e.address.clone(), e.reason.clone()))
            .collect();
        let added = list
            .add_all(new, "report")
            .await
            .map_err(|e| format!("the store: {e}"))?;
        for address in &added {
            if let Some((_, reason)) = reasons.iter().find(|(a, _)| a == address) {
                metrics::counter!(crate::telemetry::REPORTED, "reason" => reason.clone())
                    .increment(1);
            }
        }
        Ok(added.len())
    }
}

/// `UID FETCH set query`, whole, within [`IMAP_TIMEOUT`].
async fn fetch(
    s: &mut ImapSession,
    set: &str,
    query: &str,
) -> Result<Vec<async_imap::types::Fetch>, String> {
    tokio::time::timeout(IMAP_TIMEOUT, async {
        s.uid_fetch(set, query).await?.try_collect().await
    })
    .await
    .map_err(|_| format!("FETCH: no answer within {IMAP_TIMEOUT:?}"))?
    .map_err(|e| format!("FETCH: {e}"))
}

/// Whether a message's header says it is a `multipart/report`.
fn is_report(header: &[u8]) -> bool {
    MessageParser::default()
        .parse_headers(header)
        .and_then(|m| {
            m.content_type().map(|ct| {
                ct.ctype().eq_ignore_ascii_case("multipart")
                    && ct
                        .subtype()
                        .is_some_and(|s| s.eq_ignore_ascii_case("report"))
            })
        })
        .unwrap_or(false)
}

/// UIDs in IMAP's set syntax, runs joined (`3:7,9`).
fn uid_set(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end + 1 {
            i += 1;
            end = uids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bounce as Postfix writes it, with the returned message's headers.
    const POSTFIX: &str = "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r\n\
Subject: Undelivered Mail Returned to Sender\r\n\
To: agent@example.org\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"B1\"\r\n\
\r\n\
--B1\r\n\
Content-Type: text/plain\r\n\
\r\n\
I'm sorry to have to inform you that your message could not be delivered.\r\n\
--B1\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns; mx.example.net\r\n\
Arrival-Date: Sun,  6 Dec 2026 07:00:00 +0000 (UTC)\r\n\
\r\n\
Final-Recipient: rfc822; gone@example.net\r\n\
Original-Recipient: rfc822;Gone@Example.net\r\n\
Action: failed\r\n\
Status: 5.1.1\r\n\
Diagnostic-Code: smtp; 550 5.1.1 <gone@example.net>: Recipient address\r\n\trejected: User unknown\r\n\
\r\n\
Final-Recipient: rfc822; full@example.net\r\n\
Action: failed\r\n\
Status: 5.2.2\r\n\
Diagnostic-Code: smtp; 552 5.2.2 mailbox full\r\n\
\r\n\
Final-Recipient: rfc822; slow@example.net\r\n\
Action: delayed\r\n\
Status: 4.4.1\r\n\
\r\n\
Final-Recipient: rfc822; nodomain@nowhere.example\r\n\
Action: failed\r\n\
Status: 5.1.2\r\n\
\r\n\
--B1\r\n\
Content-Type: text/rfc822-headers\r\n\
\r\n\
From: agent@example.org\r\n\
To: gone@example.net, full@example.net\r\n\
Message-ID: <0193abc@mailmux.example.org>\r\n\
Subject: hello\r\n\
\r\n\
--B1--\r\n";

    #[test]
    fn a_delivery_status_lists_the_unknown_addresses_only() {
        let r = parse(POSTFIX.as_bytes()).unwrap();
        assert_eq!(r.message_id.as_deref(), Some("0193abc@mailmux.example.org"));
        assert_eq!(r.reason, "bounced");
        assert!(!r.sole);
        assert_eq!(
            r.recipients,
            [
                (
                    "Gone@Example.net".to_owned(),
                    "550 5.1.1 <gone@example.net>: Recipient address rejected: User unknown"
                        .to_owned()
                ),
                (
                    "nodomain@nowhere.example".to_owned(),
                    "status 5.1.2".to_owned()
                ),
            ]
        );
        // Against the message: only its recipients count, in the list's form.
        let e = entries(
            &r,
            "0193abc@mailmux.example.org",
            &["gone@example.net".into(), "full@example.net".into()],
        );
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].address, "gone@example.net");
        assert_eq!(e[0].reason, "bounced");
        assert_eq!(
            e[0].message_id.as_deref(),
            Some("0193abc@mailmux.example.org")
        );
    }

    #[test]
    fn a_utf8_recipient_is_read_from_its_escaped_orcpt() {
        // The ORCPT the daemon sends for a UTF-8 recipient, quoted back in
        // RFC 6533's escaped form, and a Final-Recipient as it is.
        let report = POSTFIX
            .replace(
                "Original-Recipient: rfc822;Gone@Example.net",
                "Original-Recipient: utf-8;\\x{7528}\\x{6237}@\\x{4F8B}\\x{5B50}.example",
            )
            .replace(
                "Final-Recipient: rfc822; nodomain@nowhere.example",
                "Final-Recipient: utf-8; jos\u{e9}@nowhere.example",
            );
        let r = parse(report.as_bytes()).unwrap();
        let listed: Vec<&str> = r.recipients.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(listed, ["用户@例子.example", "josé@nowhere.example"]);
        // An escape that names no character reads as no address.
        assert_eq!(typed_address("utf-8;a\\x{D800}@b.example"), None);
        assert_eq!(typed_address("utf-8;a\\x{zz}@b.example"), None);
        assert_eq!(
            typed_address("utf-8; a\\x{2B}b@c.example").as_deref(),
            Some("a+b@c.example")
        );
    }

    #[test]
    fn a_returned_message_in_full_gives_its_id() {
        let full = POSTFIX.replace(
            "Content-Type: text/rfc822-headers\r\n\r\n",
            "Content-Type: message/rfc822\r\n\r\n",
        );
        let full = full.replace(
            "Subject: hello\r\n\r\n--B1--",
            "Subject: hello\r\n\r\nbody\r\n--B1--",
        );
        let r = parse(full.as_bytes()).unwrap();
        assert_eq!(r.message_id.as_deref(), Some("0193abc@mailmux.example.org"));
    }

    const ARF: &str = "From: fbl@isp.example\r\n\
To: abuse@example.org\r\n\
Subject: complaint\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=feedback-report; boundary=\"F\"\r\n\
\r\n\
--F\r\n\
Content-Type: text/plain\r\n\
\r\n\
This is an email abuse report.\r\n\
--F\r\n\
Content-Type: message/feedback-report\r\n\
\r\n\
Feedback-Type: abuse\r\n\
User-Agent: SomeFBL/1.0\r\n\
Version: 1\r\n\
RCPT-LINE\
\r\n\
--F\r\n\
Content-Type: message/rfc822\r\n\
\r\n\
From: agent@example.org\r\n\
To: reader@example.net\r\n\
Message-ID: <0193def@mailmux.example.org>\r\n\
\r\n\
hi\r\n\
--F--\r\n";

    #[test]
    fn a_complaint_names_its_recipient_or_the_messages_only_one() {
        let named = ARF.replace("RCPT-LINE", "Original-Rcpt-To: <Reader@example.net>\r\n");
        let r = parse(named.as_bytes()).unwrap();
        assert_eq!(r.reason, "complained");
        assert_eq!(r.message_id.as_deref(), Some("0193def@mailmux.example.org"));
        assert_eq!(r.recipients.len(), 1);
        assert!(!r.sole);
        let e = entries(
            &r,
            "m",
            &["reader@example.net".into(), "x@example.net".into()],
        );
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].address, "reader@example.net");

        let redacted = ARF.replace("RCPT-LINE", "");
        let r = parse(redacted.as_bytes()).unwrap();
        assert!(r.sole);
        assert_eq!(entries(&r, "m", &["reader@example.net".into()]).len(), 1);
        // Of two recipients, which one complained is unknown: nobody.
        assert!(entries(&r, "m", &["a@example.net".into(), "b@example.net".into()]).is_empty());

        let not_spam = ARF
            .replace("Feedback-Type: abuse", "Feedback-Type: not-spam")
            .replace("RCPT-LINE", "");
        assert_eq!(parse(not_spam.as_bytes()), None);
    }

    #[test]
    fn other_mail_is_no_report() {
        assert_eq!(
            parse(b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n"),
            None
        );
        let other = POSTFIX.replace(
            "report-type=delivery-status",
            "report-type=disposition-notification",
        );
        assert_eq!(parse(other.as_bytes()), None);
        assert!(is_report(
            b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\n"
        ));
        assert!(!is_report(
            b"Content-Type: multipart/mixed; boundary=x\r\n\r\n"
        ));
    }

    #[test]
    fn uid_sets_join_runs() {
        assert_eq!(uid_set(&[1, 2, 3, 5, 7, 8]), "1:3,5,7:8");
        assert_eq!(uid_set(&[4]), "4");
        assert_eq!(uid_set(&[]), "");
    }
}
