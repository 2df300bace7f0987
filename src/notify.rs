//! What operators are told at once (`[notify]`): a JSON POST to a webhook
//! for each message event they chose, `held` by default, and for a pause
//! or resume of delivery when chosen, so that a message
//! waiting for a person's approval does not wait for someone to look at the
//! console. One of the queue's observers, always attached, posting only
//! while `[notify]` is configured (a reload sets it): the event is put on a
//! bounded channel, and one task posts, retrying a failed post twice. Best effort:
//! a post that fails three times, or finds the channel full, is counted and
//! logged, never retried later; the message itself is unaffected. Nothing
//! of a message but its id, caller, recipient count, the caller's own
//! `tag` and `metadata` (as JSON fields, not in the text line) and, for a
//! held one, the check that held it goes out: no address, subject or body.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use mailmux_actors::Secret;
use mailmux_actors::queue::{Action, Drain, Event, Observer};
use serde_json::json;
use tokio::sync::mpsc;

use crate::telemetry::NOTIFICATIONS;

/// Events waiting to be posted; past it, new ones are dropped.
const BACKLOG: usize = 1024;
/// One post's time, connect to answer.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Posts of one event, the first included.
const ATTEMPTS: u32 = 3;
/// The wait before the second post; doubled before the third.
const RETRY_BASE: Duration = Duration::from_secs(1);

/// The events that may be chosen: a message's, then delivery's pause.
pub const EVENTS: [&str; 10] = [
    "held",
    "approved",
    "rejected",
    "failed",
    "unknown",
    "expired",
    "paused",
    "resumed",
    "bounced",
    "complained",
];

/// `[notify]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct NotifySettings {
    /// `https:`, or `http:` to a loopback address.
    pub url: reqwest::Url,
    /// Sent as `Authorization: Bearer …` when set.
    pub token: Option<Secret>,
    /// Which events are posted (names of [`EVENTS`]).
    pub events: Vec<String>,
    /// Where the console is reached (`https://mail.example.org`), for a
    /// link to the message in each post.
    pub console_url: Option<String>,
}

/// One event to post, with where and how, as configured when it happened.
type Post = (serde_json::Value, reqwest::Url, Option<Secret>);

/// The queue's observer that posts the chosen events.
#[derive(Debug)]
pub struct Notifier {
    settings: std::sync::RwLock<Option<NotifySettings>>,
    tx: mpsc::Sender<Post>,
    /// Set while posts are dropped for a full channel, so that the log
    /// says it once a streak.
    dropping: AtomicBool,
    /// Events given to the task and not yet posted or given up on.
    pending: Arc<AtomicUsize>,
}

impl Notifier {
    /// Starts the posting task; it posts once `settings` are `Some`.
    pub fn start(settings: Option<NotifySettings>) -> Arc<Notifier> {
        let (tx, rx) = mpsc::channel(BACKLOG);
        let pending = Arc::new(AtomicUsize::new(0));
        tokio::spawn(post_all(rx, pending.clone()));
        Arc::new(Notifier {
            settings: std::sync::RwLock::new(settings),
            tx,
            dropping: AtomicBool::new(false),
            pending,
        })
    }

    /// What a reload configured: events from now on are posted as it says
    /// (none when `None`); those already given go as they were.
    pub fn set(&self, settings: Option<NotifySettings>) {
        *self.settings.write().unwrap_or_else(|e| e.into_inner()) = settings;
    }

    /// Delivery was paused (`paused`, with the operator's reason) or
    /// resumed (`resumed`) by `by`.
    pub fn delivery(&self, action: &'static str, by: &str, reason: Option<&str>) {
        let post = {
            let settings = self.settings.read().unwrap_or_else(|e| e.into_inner());
            let Some(s) = settings.as_ref() else {
                return;
            };
            if !s.events.iter().any(|x| x == action) {
                return;
            }
            let mut text = match action {
                "paused" => {
                    format!("mailmux: delivery paused by {by}: mail is queued, none goes out")
                }
                _ => format!("mailmux: delivery resumed by {by}"),
            };
            if let Some(r) = reason {
                text.push_str(&format!(" (reason: {r})"));
            }
            let mut body = json!({
                "event": action,
                "by": by,
                "at": jiff::Timestamp::now().to_string(),
                "text": text,
            });
            if let Some(r) = reason {
                body["reason"] = json!(r);
            }
            (body, s.url.clone(), s.token.clone())
        };
        self.give(post);
    }

    /// Hands `post` to the posting task, or drops and counts it when the
    /// backlog is full.
    fn give(&self, post: Post) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        match self.tx.try_send(post) {
            Ok(()) => {
                self.dropping.store(false, Ordering::Relaxed);
            }
            Err(_) => {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                metrics::counter!(NOTIFICATIONS, "outcome" => "dropped").increment(1);
                if !self.dropping.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        backlog = BACKLOG,
                        "notify: the webhook is behind; events are dropped until it catches up"
                    );
                }
            }
        }
    }

    fn payload(settings: &NotifySettings, e: &Event<'_>) -> serde_json::Value {
        let action = e.action.as_str();
        let caller = e.caller.unwrap_or("-");
        let meta = crate::audit::Meta::of(e.meta);
        let held_by = match e.action {
            Action::Held => meta.held_by,
            _ => None,
        };
        let link = settings.console_url.as_ref().map(|base| {
            format!(
                "{}/console/messages/{}",
                base.trim_end_matches('/'),
                e.message_id
            )
        });
        let what = match e.action {
            Action::Held => "is held for a person's approval",
            Action::Approved => "was approved",
            Action::Rejected => "was rejected",
            Action::Failed => "failed",
            Action::Unknown => "may or may not have been delivered (unknown; never resent)",
            Action::Expired => "expired undelivered",
            Action::Bounced => "bounced (a report came back by mail)",
            Action::Complained => "drew a complaint (a report came back by mail)",
            _ => action,
        };
        let mut text = format!(
            "mailmux: message {} from caller {caller} to {} recipient{} {what}",
            e.message_id,
            e.to.len(),
            if e.to.len() == 1 { "" } else { "s" },
        );
        if let Some(by) = &held_by {
            text.push_str(&format!(" ({by})"));
        }
        if let Some(link) = &link {
            text.push_str(&format!(": {link}"));
        }
        let at = jiff::Timestamp::now().to_string();
        let mut body = json!({
            "event": action,
            "message_id": e.message_id,
            "caller": caller,
            "recipients": e.to.len(),
            "at": at,
            "text": text,
        });
        if let Some(by) = held_by {
            body["held_by"] = json!(by);
        }
        if let Some(tag) = meta.tag {
            body["tag"] = json!(tag);
        }
        if !meta.metadata.is_empty() {
            body["metadata"] = json!(meta.metadata);
        }
        if let Some(by) = e.decided_by {
            body["decided_by"] = json!(by);
        }
        if let Some(link) = link {
            body["link"] = json!(link);
        }
        body
    }
}

impl Observer for Notifier {
    fn event(&self, e: &Event<'_>) {
        let post = {
            let settings = self.settings.read().unwrap_or_else(|e| e.into_inner());
            let Some(s) = settings.as_ref() else {
                return;
            };
            if !s.events.iter().any(|x| x == e.action.as_str()) {
                return;
            }
            (Self::payload(s, e), s.url.clone(), s.token.clone())
        };
        self.give(post);
    }

    /// Lets the posts already given finish, until `until`.
    fn drain(&self, until: Instant) -> Drain<'_> {
        Box::pin(async move {
            while self.pending.load(Ordering::Acquire) > 0 && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let left = self.pending.load(Ordering::Acquire);
            if left > 0 {
                tracing::warn!(left, "notify: events not posted before the stop");
            }
        })
    }
}

/// Posts each payload in turn, each up to [`ATTEMPTS`] times. The HTTP
/// client (its TLS roots) is made at the first post, not by every start.
async fn post_all(mut rx: mpsc::Receiver<Post>, pending: Arc<AtomicUsize>) {
    let mut failing = false;
    let mut client = None;
    while let Some((body, url, token)) = rx.recv().await {
        let client: &reqwest::Client = client.get_or_insert_with(|| {
            reqwest::Client::builder()
                .timeout(TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default()
        });
        let mut wait = RETRY_BASE;
        let mut last = String::new();
        let mut sent = false;
        for attempt in 1..=ATTEMPTS {
            let mut req = client.post(url.clone()).json(&body);
            if let Some(t) = &token {
                req = req.bearer_auth(t.expose());
            }
            match req.send().await {
                Ok(r) if r.status().is_success() => {
                    sent = true;
                    break;
                }
                Ok(r) => last = format!("HTTP {}", r.status().as_u16()),
                // Without the URL, which may carry a key in its path.
                Err(e) => last = e.without_url().to_string(),
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
        let outcome = if sent { "sent" } else { "failed" };
        metrics::counter!(NOTIFICATIONS, "outcome" => outcome).increment(1);
        if !sent && !failing {
            tracing::warn!(
                event = %body["event"].as_str().unwrap_or(""),
                message_id = %body["message_id"].as_str().unwrap_or(""),
                error = %last,
                "notify: the webhook did not take the event after {ATTEMPTS} tries; it is not posted again"
            );
        } else if sent && failing {
            tracing::info!("notify: the webhook takes events again");
        }
        failing = !sent;
        pending.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(id: &str) -> Event<'_> {
        Event {
            action: Action::Held,
            message_id: id,
            caller: Some("desk"),
            meta: None,
            from: None,
            to: &[],
            size: 0,
            relay: None,
            code: None,
            reason: None,
            decided_by: None,
            accepted: &[],
            rejected: &[],
            deferred: Vec::new(),
        }
    }

    /// A webhook that takes connections and never answers: the posting
    /// task waits on its first post, and past [`BACKLOG`] waiting events
    /// new ones are dropped, not queued without bound. Events not chosen,
    /// and every event once a reload took `[notify]` away, are not queued.
    #[tokio::test]
    async fn a_webhook_that_never_answers_bounds_the_backlog() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let held_open = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        let n = Notifier::start(Some(NotifySettings {
            url: reqwest::Url::parse(&url).unwrap(),
            token: None,
            events: vec!["held".into()],
            console_url: None,
        }));
        let mut sent = held("x");
        sent.action = Action::Sent;
        n.event(&sent);
        assert_eq!(n.pending.load(Ordering::Acquire), 0, "sent is not chosen");
        for _ in 0..BACKLOG + 50 {
            n.event(&held("m"));
        }
        // One may be out of the channel, in the task's first post.
        let pending = n.pending.load(Ordering::Acquire);
        assert!((BACKLOG..=BACKLOG + 1).contains(&pending), "{pending}");
        assert!(n.dropping.load(Ordering::Relaxed));
        n.set(None);
        n.event(&held("after"));
        assert_eq!(n.pending.load(Ordering::Acquire), pending);
        held_open.abort();
    }
}
