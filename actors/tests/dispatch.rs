//! The dispatch core against SMTP servers that speak real SMTP over loopback:
//! priority, failover by phase, partial acceptance, unknown outcomes, timeouts,
//! backoff and circuit, strategies, bounds. Every case is asserted on what the
//! servers received, not only on what mailmux returned.

mod support;

use std::sync::Arc;
use std::time::Duration;

use mailmux_actors::{
    Dispatcher, FailureClass, FailureReason, HealthSettings, Limits, Mail, RelayKind,
    RelaySettings, RelayState, RouterSettings, Settings, Status, Strategy, SupervisorSettings,
    Timeouts,
};
use support::fault_smtp::{Action, AfterDot, FaultSmtp, Options, Phase, Script, StartTls};
use tokio::time::Instant;

fn relay(name: &str, port: u16, priority: i32) -> RelaySettings {
    let mut r = RelaySettings::smtp(name, "127.0.0.1", port);
    r.priority = priority;
    r.timeouts = Timeouts::uniform(Duration::from_secs(5));
    r.health = HealthSettings {
        backoff_base: Duration::from_secs(30),
        backoff_max: Duration::from_secs(60),
        circuit_failures: 5,
        circuit_window: Duration::from_secs(60),
        probe_interval: Duration::from_secs(30),
    };
    r
}

fn settings(relays: Vec<RelaySettings>, strategy: Strategy) -> Settings {
    Settings {
        relays,
        router: RouterSettings {
            strategy,
            max_attempts: 3,
        },
        supervisor: SupervisorSettings::default(),
        limits: Limits::default(),
    }
}

/// A dispatcher over `relays`, by priority.
async fn by_priority(relays: Vec<RelaySettings>) -> Dispatcher {
    Dispatcher::start(settings(relays, Strategy::Priority))
        .await
        .unwrap()
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn mail_to(to: &[&str]) -> Mail {
    let n = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = format!("m{n}.{}@test.mailmux", std::process::id());
    let bytes = format!(
        "From: sender@test.example\r\nTo: {}\r\nSubject: test {n}\r\nMessage-ID: <{id}>\r\n\r\nHello {n}.\r\n",
        to.join(", ")
    );
    Mail {
        message_id: id,
        from: Some("sender@test.example".parse().unwrap()),
        to: to.iter().map(|a| a.parse().unwrap()).collect(),
        bytes: Arc::from(bytes.into_bytes()),
        deadline: Instant::now() + Duration::from_secs(20),
        prefer: None,
        only: None,
        priority: Default::default(),
    }
}

fn mail() -> Mail {
    mail_to(&["rcpt@test.example"])
}

/// Copies of this message that the server answered 250 to.
fn copies(server: &FaultSmtp, message_id: &str) -> usize {
    let wanted = format!("<{message_id}>");
    server
        .delivered()
        .iter()
        .filter(|r| r.message_id.as_deref() == Some(&wanted))
        .count()
}

/// Transactions of this message the server saw through the final ".".
fn seen(server: &FaultSmtp, message_id: &str) -> usize {
    let wanted = format!("<{message_id}>");
    server
        .received()
        .iter()
        .filter(|r| r.message_id.as_deref() == Some(&wanted))
        .count()
}

async fn pair(primary: Script, backup: Script) -> (FaultSmtp, FaultSmtp, Dispatcher) {
    let a = FaultSmtp::start(primary).await;
    let b = FaultSmtp::start(backup).await;
    let d = Dispatcher::start(settings(
        vec![relay("primary", a.port(), 10), relay("backup", b.port(), 1)],
        Strategy::Priority,
    ))
    .await
    .unwrap();
    (a, b, d)
}

#[tokio::test]
async fn priority_sends_everything_to_the_highest_priority_relay() {
    let low = FaultSmtp::start(Script::ok()).await;
    let high = FaultSmtp::start(Script::ok()).await;
    let mid = FaultSmtp::start(Script::ok()).await;
    let d = Dispatcher::start(settings(
        vec![
            relay("low", low.port(), 1),
            relay("high", high.port(), 100),
            relay("mid", mid.port(), 50),
        ],
        Strategy::Priority,
    ))
    .await
    .unwrap();
    for _ in 0..20 {
        let m = mail();
        let id = m.message_id.clone();
        let r = d.send(m).await;
        assert_eq!(r.status, Status::Sent, "{r:?}");
        assert_eq!(r.relay.as_deref(), Some("high"));
        assert_eq!(copies(&high, &id), 1);
    }
    assert_eq!(high.delivered().len(), 20);
    assert!(low.received().is_empty() && mid.received().is_empty());
    assert_eq!(low.connections() + mid.connections(), 0);
}

#[tokio::test]
async fn relay_faults_fail_over_and_the_relay_backs_off() {
    for (what, script) in [
        (
            "421 greeting",
            Script::ok().on(Phase::Greeting, Action::reply(421, "busy")),
        ),
        (
            "EHLO failure",
            Script::ok().on(Phase::Ehlo, Action::reply(554, "go away")),
        ),
    ] {
        let (a, b, d) = pair(script, Script::ok()).await;
        let m = mail();
        let r = d.send(m).await;
        assert_eq!(r.relay.as_deref(), Some("backup"), "{what}: {r:?}");
        assert_eq!(
            r.attempts[0].class,
            Some(FailureClass::RelayFault),
            "{what}"
        );
        assert_eq!(a.delivered().len(), 0);
        assert_eq!(b.delivered().len(), 1);
        let st = d.status().await.unwrap();
        assert!(
            matches!(st.relays[0].state, RelayState::BackingOff { .. }),
            "{what}: {:?}",
            st.relays[0].state
        );
        // While it backs off, the primary is skipped without a connection.
        let before = a.connections();
        assert_fails_over_to_backup_only(&b, &d).await;
        assert_eq!(a.connections(), before, "{what}");
    }
}

async fn assert_fails_over_to_backup_only(backup: &FaultSmtp, d: &Dispatcher) {
    let m = mail();
    let id = m.message_id.clone();
    let r = d.send(m).await;
    assert_eq!(r.relay.as_deref(), Some("backup"), "{r:?}");
    assert_eq!(r.attempts.len(), 1, "a backing-off relay is skipped: {r:?}");
    assert_eq!(copies(backup, &id), 1);
}

#[tokio::test]
async fn connection_refused_fails_over() {
    let refused = support::free_port();
    let b = FaultSmtp::start(Script::ok()).await;
    let d = Dispatcher::start(settings(
        vec![relay("primary", refused, 10), relay("backup", b.port(), 1)],
        Strategy::Priority,
    ))
    .await
    .unwrap();
    let r = d.send(mail()).await;
    assert_eq!(r.status, Status::Sent);
    assert_eq!(r.relay.as_deref(), Some("backup"));
    assert_eq!(r.attempts[0].class, Some(FailureClass::RelayFault));
    assert!(r.attempts[0].detail.contains("connect"), "{r:?}");
    assert_eq!(b.delivered().len(), 1);
}

#[tokio::test]
async fn auth_535_fails_over() {
    let a = FaultSmtp::start_with(
        Script::ok(),
        Options {
            auth: Some(("user".into(), "right".into())),
            ..Options::default()
        },
    )
    .await;
    let b = FaultSmtp::start(Script::ok()).await;
    let mut primary = relay("primary", a.port(), 10);
    if let RelayKind::Smtp(s) = &mut primary.kind {
        s.auth = Some(mailmux_actors::Credentials::password(
            "user",
            mailmux_actors::Secret::new("wrong"),
        ));
    }
    let d = Dispatcher::start(settings(
        vec![primary, relay("backup", b.port(), 1)],
        Strategy::Priority,
    ))
    .await
    .unwrap();
    let r = d.send(mail()).await;
    assert_eq!(r.relay.as_deref(), Some("backup"), "{r:?}");
    assert_eq!(r.attempts[0].class, Some(FailureClass::RelayFault));
    assert_eq!(r.attempts[0].reply.as_ref().map(|r| r.code), Some(535));
    assert!(
        !format!("{r:?}").contains("wrong"),
        "the password leaked: {r:?}"
    );
    assert!(a.received().is_empty());
    assert_eq!(b.delivered().len(), 1);
}

#[tokio::test]
async fn tls_failure_fails_over() {
    let a = FaultSmtp::start_with(
        Script::ok(),
        Options {
            starttls: StartTls::Broken,
            ..Options::default()
        },
    )
    .await;
    let b = FaultSmtp::start(Script::ok()).await;
    let mut primary = relay("primary", a.port(), 10);
    if let RelayKind::Smtp(s) = &mut primary.kind {
        s.tls = mailmux_actors::TlsMode::Starttls;
    }
    let d = Dispatcher::start(settings(
        vec![primary, relay("backup", b.port(), 1)],
        Strategy::Priority,
    ))
    .await
    .unwrap();
    let r = d.send(mail()).await;
    assert_eq!(r.relay.as_deref(), Some("backup"), "{r:?}");
    assert_eq!(r.attempts[0].class, Some(FailureClass::RelayFault));
    assert!(a.received().is_empty());
    assert_eq!(b.delivered().len(), 1);
}

#[tokio::test]
async fn starttls_required_but_not_offered_is_a_relay_fault() {
    let (a, b, d) = {
        let a = FaultSmtp::start(Script::ok()).await;
        let b = FaultSmtp::start(Script::ok()).await;
        let mut primary = relay("primary", a.port(), 10);
        if let RelayKind::Smtp(s) = &mut primary.kind {
            s.tls = mailmux_actors::TlsMode::Starttls;
        }
        let d = Dispatcher::start(settings(
            vec![primary, relay("backup", b.port(), 1)],
            Strategy::Priority,
        ))
        .await
        .unwrap();
        (a, b, d)
    };
    let r = d.send(mail()).await;
    assert_eq!(r.relay.as_deref(), Some("backup"));
    assert!(r.attempts[0].detail.contains("STARTTLS"), "{r:?}");
    assert!(a.received().is_empty());
    assert_eq!(b.delivered().len(), 1);
}

#[tokio::test]
async fn transient_4xx_at_mail_rcpt_or_data_fails_over_exactly_once() {
    for phase in [Phase::Mail, Phase::Rcpt, Phase::Data] {
        let (a, b, d) = pair(
            Script::ok().on(phase, Action::reply(451, "try later")),
            Script::ok(),
        )
        .await;
        let m = mail();
        let id = m.message_id.clone();
        let r = d.send(m).await;
        assert_eq!(r.status, Status::Sent, "{phase:?}: {r:?}");
        assert_eq!(
            r.attempts[0].class,
            Some(FailureClass::Transient),
            "{phase:?}"
        );
        assert_eq!(r.attempts[0].reply.as_ref().map(|r| r.code), Some(451));
        assert_eq!(copies(&b, &id), 1, "{phase:?}");
        assert_eq!(seen(&a, &id), 0, "{phase:?}");
        assert_eq!(b.delivered().len(), 1);
        assert_eq!(a.pipelined(), 1, "{phase:?}: the pipelined path was tested");
    }
}

/// One relay at `port` with PIPELINING allowed or not.
fn relay_pipelining(name: &str, port: u16, allowed: bool) -> RelaySettings {
    let mut r = relay(name, port, 1);
    if let RelayKind::Smtp(s) = &mut r.kind {
        s.pipelining = allowed;
    }
    r
}

#[tokio::test]
async fn pipelining_is_used_only_when_offered_and_allowed() {
    for (offered, allowed) in [(true, true), (false, true), (true, false)] {
        let options = Options {
            pipelining: offered,
            ..Options::default()
        };
        let a = FaultSmtp::start_with(Script::ok(), options).await;
        let d = Dispatcher::start(settings(
            vec![relay_pipelining("a", a.port(), allowed)],
            Strategy::Priority,
        ))
        .await
        .unwrap();
        for _ in 0..5 {
            let m = mail_to(&["ada@test.example", "bob@test.example"]);
            let id = m.message_id.clone();
            let r = d.send(m).await;
            assert_eq!(r.status, Status::Sent, "{offered}/{allowed}: {r:?}");
            assert_eq!(copies(&a, &id), 1);
        }
        let expected = if offered && allowed { 5 } else { 0 };
        assert_eq!(
            a.pipelined(),
            expected,
            "offered {offered}, allowed {allowed}"
        );
        for got in a.delivered() {
            assert_eq!(got.rcpt_to, vec!["ada@test.example", "bob@test.example"]);
        }
    }
}

#[tokio::test]
async fn a_4xx_at_one_rcpt_defers_that_recipient_alone_and_a_4xx_at_every_rcpt_fails_over() {
    // The others get the message at the primary, in one transaction; the
    // deferred recipient is reported for a later try, and nothing goes to
    // the backup.
    for offered in [true, false] {
        let options = Options {
            pipelining: offered,
            ..Options::default()
        };
        let a = FaultSmtp::start_with(
            Script::ok()
                .on_rcpt("later@test.example", Action::reply(451, "4.2.1 try later"))
                .on_rcpt(
                    "full@test.example",
                    Action::reply(452, "4.2.2 Mailbox full"),
                ),
            options,
        )
        .await;
        let b = FaultSmtp::start(Script::ok()).await;
        let d = Dispatcher::start(settings(
            vec![relay("primary", a.port(), 10), relay("backup", b.port(), 1)],
            Strategy::Priority,
        ))
        .await
        .unwrap();
        let m = mail_to(&["ada@test.example", "later@test.example", "bob@test.example"]);
        let id = m.message_id.clone();
        let r = d.send(m).await;
        assert_eq!(r.status, Status::Partial, "pipelined {offered}: {r:?}");
        assert_eq!(r.relay.as_deref(), Some("primary"));
        assert_eq!(r.accepted, vec!["ada@test.example", "bob@test.example"]);
        assert!(r.rejected.is_empty(), "{r:?}");
        assert_eq!(deferred(&r), vec![("later@test.example", 451)]);
        let message = r.message.clone().unwrap_or_default();
        assert!(
            message.starts_with("1 of 3 recipients were deferred"),
            "{message}"
        );
        assert_eq!(copies(&a, &id), 1);
        assert_eq!(
            a.delivered()[0].rcpt_to,
            vec!["ada@test.example", "bob@test.example"]
        );
        assert_eq!(b.connections(), 0, "pipelined {offered}: no failover");
        assert_eq!(a.pipelined(), u64::from(offered));

        // Every recipient deferred: nobody has it, so another relay may take
        // it whole.
        let m = mail_to(&["later@test.example", "full@test.example"]);
        let id = m.message_id.clone();
        let r = d.send(m).await;
        assert_eq!(r.status, Status::Sent, "pipelined {offered}: {r:?}");
        assert_eq!(r.relay.as_deref(), Some("backup"));
        assert_eq!(r.attempts[0].class, Some(FailureClass::Transient));
        assert_eq!(r.attempts[0].reply.as_ref().map(|r| r.code), Some(451));
        assert!(
            r.attempts[0].detail.contains("2 of 2 were deferred"),
            "{r:?}"
        );
        assert_eq!(
            seen(&a, &id),
            0,
            "pipelined {offered}: no data at the primary"
        );
        assert_eq!(copies(&b, &id), 1);
        assert_eq!(
            b.delivered()[0].rcpt_to,
            vec!["later@test.example", "full@test.example"]
        );
    }
}

#[tokio::test]
async fn a_pipelined_refusal_at_mail_keeps_the_session_in_step_for_reuse() {
    // MAIL 451, then 503 to the RCPT and DATA already sent: all three replies
    // are read, RSET gets its own 250, and the connection serves the next
    // message.
    let a = FaultSmtp::start(Script::ok().on_share(
        Phase::Mail,
        Action::reply(451, "try later"),
        support::fault_smtp::Share::FirstN(1),
    ))
    .await;
    let mut only = relay("a", a.port(), 1);
    only.pool.max_connections = 1;
    only.health.backoff_base = Duration::from_millis(100);
    only.health.backoff_max = Duration::from_millis(200);
    let d = Dispatcher::start(settings(vec![only], Strategy::Priority))
        .await
        .unwrap();
    let first = d.send(mail()).await;
    assert_eq!(first.status, Status::Failed, "{first:?}");
    assert_eq!(first.attempts[0].class, Some(FailureClass::Transient));
    let status = d.status().await.unwrap();
    assert_eq!(
        status.relays[0].connections, 1,
        "the connection went back to the pool"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let m = mail();
    let id = m.message_id.clone();
    let second = d.send(m).await;
    assert_eq!(second.status, Status::Sent, "{second:?}");
    assert_eq!(copies(&a, &id), 1);
    assert_eq!(a.verb_count("RSET"), 1);
    assert_eq!(a.pipelined(), 2);
}

#[tokio::test]
async fn transient_4xx_after_the_dot_fails_over() {
    let (a, b, d) = pair(
        Script::ok().on(Phase::AfterDot, Action::reply(451, "queue full")),
        Script::ok(),
    )
    .await;
    let m = mail();
    let id = m.message_id.clone();
    let r = d.send(m).await;
    assert_eq!(r.status, Status::Sent, "{r:?}");
    assert_eq!(copies(&a, &id), 0);
    assert_eq!(copies(&b, &id), 1);
}

#[tokio::test]
async fn rcpt_550_is_per_recipient_and_partial_acceptance_delivers_to_the_rest() {
    let (a, b, d) = pair(
        Script::ok().on_rcpt("nobody@test.example", Action::reply(550, "no such user")),
        Script::ok(),
    )
    .await;
    let m = mail_to(&[
        "ada@test.example",
        "nobody@test.example",
        "bob@test.example",
    ]);
    let id = m.message_id.clone();
    let r = d.send(m).await;
    assert_eq!(r.status, Status::Partial, "{r:?}");
    assert_eq!(r.relay.as_deref(), Some("primary"));
    assert_eq!(r.accepted, vec!["ada@test.example", "bob@test.example"]);
    assert_eq!(r.rejected.len(), 1);
    assert_eq!(r.rejected[0].address, "nobody@test.example");
    assert_eq!(r.rejected[0].reply.code, 550);
    let got = a.delivered();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_to, vec!["ada@test.example", "bob@test.example"]);
    assert_eq!(copies(&a, &id), 1);
    assert!(
        b.received().is_empty() && b.connections() == 0,
        "no failover"
    );
}

/// A crash marker that counts its records.
#[derive(Debug, Default)]
struct CountedMark(std::sync::atomic::AtomicUsize);

impl mailmux_actors::CommitMark for CountedMark {
    fn record(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }
}

/// A primary whose server takes at most `cap` recipients a transaction,
/// PIPELINING offered or not, and a backup that should see nothing.
async fn capped(
    cap: usize,
    pipelining: bool,
    script: Script,
) -> (FaultSmtp, FaultSmtp, Dispatcher) {
    let options = Options {
        pipelining,
        max_recipients: Some(cap),
        ..Options::default()
    };
    let a = FaultSmtp::start_with(script, options).await;
    let b = FaultSmtp::start(Script::ok()).await;
    let d = Dispatcher::start(settings(
        vec![relay("primary", a.port(), 10), relay("backup", b.port(), 1)],
        Strategy::Priority,
    ))
    .await
    .unwrap();
    (a, b, d)
}

fn people(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("p{i}@test.example")).collect()
}

/// A message to each of `to`.
fn mail_to_all(to: &[String]) -> Mail {
    mail_to(&to.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Sends one message to each of `to`; its report and Message-ID.
async fn send_to_all(d: &Dispatcher, to: &[String]) -> (mailmux_actors::Report, String) {
    let m = mail_to_all(to);
    let id = m.message_id.clone();
    (d.send(m).await, id)
}

/// The refused recipients of a report, with their reply codes.
fn refused(r: &mailmux_actors::Report) -> Vec<(&str, u16)> {
    r.rejected
        .iter()
        .map(|x| (x.address.as_str(), x.reply.code))
        .collect()
}

/// The deferred recipients of `r`, with their reply codes.
fn deferred(r: &mailmux_actors::Report) -> Vec<(&str, u16)> {
    r.deferred
        .iter()
        .map(|x| (x.address.as_str(), x.reply.code))
        .collect()
}

/// `action` at every second `phase`: the second transaction of a message
/// split over the cap, when one message is sent at a time.
fn second_transaction(phase: Phase, action: Action) -> Script {
    Script::ok().on_share(phase, action, support::fault_smtp::Share::EveryNth(2))
}

/// Sends one message to `to` through `d` and checks that it is `sent`,
/// at `a` in one transaction for each of `groups` (ranges of `to`), all on
/// one connection with the same bytes, and committed once, before the first
/// ".".
async fn sent_in_transactions(
    a: &FaultSmtp,
    d: &Dispatcher,
    to: &[String],
    groups: &[std::ops::Range<usize>],
) {
    let m = mail_to_all(to);
    let id = format!("<{}>", m.message_id);
    let bytes = m.bytes.clone();
    let mark = Arc::new(CountedMark::default());
    let r = d.send_marked(m, Some(mark.clone())).await;
    assert_eq!(r.status, Status::Sent, "{r:?}");
    assert_eq!(r.accepted, to);
    assert!(r.rejected.is_empty(), "{r:?}");
    assert_eq!(r.attempts.len(), 1);
    let got = a.delivered();
    let sent: Vec<_> = got.iter().map(|t| t.rcpt_to.clone()).collect();
    let want: Vec<_> = groups.iter().map(|g| to[g.clone()].to_vec()).collect();
    assert_eq!(sent, want);
    for t in &got {
        assert_eq!(t.message_id.as_deref(), Some(id.as_str()));
        assert_eq!(t.data.as_slice(), &bytes[..]);
    }
    assert_eq!(a.connections(), 1, "one session for every transaction");
    assert_eq!(
        mark.0.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the commit is recorded once, before the first \".\""
    );
}

#[tokio::test]
async fn recipients_over_the_servers_cap_go_in_more_transactions_on_one_connection() {
    for pipelining in [true, false] {
        let (a, b, d) = capped(3, pipelining, Script::ok()).await;
        sent_in_transactions(&a, &d, &people(7), &[0..3, 3..6, 6..7]).await;
        assert_eq!(b.connections(), 0, "no failover");
        assert_eq!(a.pipelined(), if pipelining { 3 } else { 0 });

        // The connection is still good for the next message.
        let next = d.send(mail()).await;
        assert_eq!(next.status, Status::Sent, "{next:?}");
        assert_eq!(a.connections(), 1);
    }
}

#[tokio::test]
async fn aiosmtpd_capped_at_100_recipients_gets_250_in_three_transactions() {
    use support::aiosmtpd::{Aiosmtpd, AiosmtpdOptions};
    let server = Aiosmtpd::start_with(AiosmtpdOptions {
        max_recipients: Some(100),
        ..AiosmtpdOptions::default()
    })
    .await;
    let d = by_priority(vec![relay("aiosmtpd", server.port(), 1)]).await;
    let to = people(250);
    let mut m = mail_to(&to[..1].iter().map(String::as_str).collect::<Vec<_>>());
    // The recipients in the envelope only, as Bcc: one To line of 250
    // addresses would pass the 998-octet line limit.
    m.to = to.iter().map(|a| a.parse().unwrap()).collect();
    let bytes = m.bytes.clone();
    let r = d.send(m).await;
    assert_eq!(r.status, Status::Sent, "{:?}", r.message);
    assert_eq!(r.accepted, to);
    let got = server
        .wait_for(3, Duration::from_secs(10))
        .await
        .expect("three transactions");
    let groups: Vec<_> = got.iter().map(|m| m.rcpt_to.clone()).collect();
    assert_eq!(
        groups,
        vec![
            to[0..100].to_vec(),
            to[100..200].to_vec(),
            to[200..250].to_vec()
        ]
    );
    for stored in &got {
        assert_eq!(stored.data.as_slice(), &bytes[..]);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.count(), 3, "nothing more");
}

#[tokio::test]
async fn a_550_beside_the_cap_is_reported_and_the_rest_get_the_message() {
    let (a, b, d) = capped(
        2,
        true,
        Script::ok().on_rcpt("nobody@test.example", Action::reply(550, "no such user")),
    )
    .await;
    let m = mail_to(&[
        "ada@test.example",
        "nobody@test.example",
        "bob@test.example",
        "cy@test.example",
    ]);
    let r = d.send(m).await;
    assert_eq!(r.status, Status::Partial, "{r:?}");
    assert_eq!(
        r.accepted,
        vec!["ada@test.example", "bob@test.example", "cy@test.example"]
    );
    assert_eq!(r.rejected.len(), 1);
    assert_eq!(r.rejected[0].address, "nobody@test.example");
    assert_eq!(r.rejected[0].reply.code, 550);
    let groups: Vec<_> = a.delivered().into_iter().map(|t| t.rcpt_to).collect();
    assert_eq!(
        groups,
        vec![
            vec!["ada@test.example".to_string(), "bob@test.example".into()],
            vec!["cy@test.example".to_string()],
        ]
    );
    assert_eq!(b.connections(), 0);
}

#[tokio::test]
async fn a_later_transaction_refused_after_its_dot_defers_its_recipients_and_never_fails_over() {
    // The second transaction's "." gets 451: a clear "not taken" for its
    // recipients, deferred for a later try, but the first two already have
    // the message, so it must not go to the backup.
    let (a, b, d) = capped(
        2,
        true,
        second_transaction(Phase::AfterDot, Action::reply(451, "queue full")),
    )
    .await;
    let to = people(5);
    let (r, id) = send_to_all(&d, &to).await;
    assert_eq!(r.status, Status::Partial, "{r:?}");
    assert_eq!(r.accepted, to[0..2].to_vec());
    assert!(r.rejected.is_empty(), "{r:?}");
    assert_eq!(
        deferred(&r),
        vec![
            (to[2].as_str(), 451),
            (to[3].as_str(), 451),
            (to[4].as_str(), 452)
        ]
    );
    let message = r.message.clone().unwrap_or_default();
    assert!(
        message.contains("at most 2 recipients a transaction"),
        "{message}"
    );
    assert_eq!(copies(&a, &id), 1);
    assert_eq!(seen(&a, &id), 2);
    assert_eq!(b.connections(), 0, "never sent elsewhere");
}

#[tokio::test]
async fn a_recipient_over_a_552_cap_that_never_got_its_transaction_is_deferred_with_a_4xx() {
    // A 552 over the cap refuses no recipient for good: one that was over
    // it, and whose own transaction never came, is deferred with a 4xx like
    // the rest, never with the 552.
    let to = people(5);
    for (script, why) in [
        (
            second_transaction(Phase::AfterDot, Action::reply(451, "queue full")),
            "the second transaction's \".\" answered 451",
        ),
        (
            second_transaction(Phase::Mail, Action::Close),
            "the session lost at the second MAIL",
        ),
    ] {
        let a = FaultSmtp::start_with(
            script,
            Options {
                max_recipients: Some(2),
                over_cap_reply: Some("552 5.5.3 Too many recipients".into()),
                ..Options::default()
            },
        )
        .await;
        let d = by_priority(vec![relay("primary", a.port(), 10)]).await;
        let r = d.send(mail_to_all(&to)).await;
        assert_eq!(r.status, Status::Partial, "{why}: {r:?}");
        assert_eq!(r.accepted, to[0..2].to_vec(), "{why}");
        assert!(r.rejected.is_empty(), "{why}: {r:?}");
        let deferred = deferred(&r);
        assert_eq!(deferred.len(), 3, "{why}: {r:?}");
        assert!(
            deferred.iter().all(|(_, code)| (400..500).contains(code)),
            "{why}: {deferred:?}"
        );
    }
}

#[tokio::test]
async fn a_later_transaction_lost_after_its_dot_makes_the_message_unknown() {
    let (a, b, d) = capped(2, true, second_transaction(Phase::AfterDot, Action::Close)).await;
    let to = people(4);
    let (r, id) = send_to_all(&d, &to).await;
    assert_eq!(r.status, Status::Unknown, "{r:?}");
    assert_eq!(r.attempts.len(), 1);
    assert_eq!(r.attempts[0].class, Some(FailureClass::Unknown));
    let message = r.message.clone().unwrap_or_default();
    assert!(
        message.contains("2 of 4 recipients had the message"),
        "{message}"
    );
    assert_eq!(r.accepted, to[0..2].to_vec(), "those had it for certain");
    assert!(r.rejected.is_empty(), "{r:?}");
    assert_eq!(copies(&a, &id), 1);
    assert_eq!(seen(&a, &id), 2);
    assert_eq!(b.connections(), 0, "never sent elsewhere");
}

#[tokio::test]
async fn a_later_transaction_refused_at_mail_defers_the_rest_with_that_reply() {
    // The second MAIL gets 421 and the connection closes: the first three
    // recipients have the message, the last two are deferred with the 421.
    let (a, b, d) = capped(
        3,
        true,
        second_transaction(Phase::Mail, Action::reply(421, "closing")),
    )
    .await;
    let to = people(5);
    let (r, id) = send_to_all(&d, &to).await;
    assert_eq!(r.status, Status::Partial, "{r:?}");
    assert_eq!(r.accepted, to[0..3].to_vec());
    assert!(r.rejected.is_empty(), "{r:?}");
    assert_eq!(
        deferred(&r),
        vec![(to[3].as_str(), 421), (to[4].as_str(), 421)]
    );
    assert_eq!(copies(&a, &id), 1);
    assert_eq!(b.connections(), 0, "never sent elsewhere");
}

#[tokio::test]
async fn in_a_later_transaction_a_4xx_defers_that_recipient_alone() {
    // p3's mailbox is full (452 4.2.2: no cap). In the first transaction
    // p3 is over the cap; in the second it is deferred for itself, and p2
    // and p4 still get the message there.
    let to = people(5);
    let (a, b, d) = capped(
        2,
        true,
        Script::ok().on_rcpt(&to[3], Action::reply(452, "4.2.2 Mailbox full")),
    )
    .await;
    let m = mail_to_all(&to);
    let r = d.send(m).await;
    assert_eq!(r.status, Status::Partial, "{r:?}");
    assert_eq!(
        r.accepted,
        vec![to[0].clone(), to[1].clone(), to[2].clone(), to[4].clone()]
    );
    assert!(r.rejected.is_empty(), "{r:?}");
    assert_eq!(deferred(&r), vec![(to[3].as_str(), 452)]);
    assert!(r.deferred[0].reply.text.contains("4.2.2"), "{r:?}");
    let groups: Vec<_> = a.delivered().into_iter().map(|t| t.rcpt_to).collect();
    assert_eq!(
        groups,
        vec![
            vec![to[0].clone(), to[1].clone()],
            vec![to[2].clone(), to[4].clone()]
        ]
    );
    assert_eq!(b.connections(), 0);
}

#[tokio::test]
async fn a_later_transaction_whose_every_recipient_is_deferred_sends_no_data() {
    for pipelining in [true, false] {
        let to = people(3);
        let (a, b, d) = capped(
            2,
            pipelining,
            Script::ok().on_rcpt(&to[2], Action::reply(450, "4.2.1 greylisted")),
        )
        .await;
        let (r, id) = send_to_all(&d, &to).await;
        assert_eq!(r.status, Status::Partial, "pipelined {pipelining}: {r:?}");
        assert_eq!(r.accepted, to[0..2].to_vec());
        assert!(r.rejected.is_empty(), "{r:?}");
        assert_eq!(deferred(&r), vec![(to[2].as_str(), 450)]);
        assert_eq!(seen(&a, &id), 1, "no data in the second transaction");
        assert_eq!(b.connections(), 0);
        // The session is in step: the next message goes on it.
        let next = d.send(mail()).await;
        assert_eq!(next.status, Status::Sent, "{next:?}");
        assert_eq!(a.connections(), 1, "pipelined {pipelining}");
    }
}

/// A primary relay that names at most `per_transaction` recipients a
/// transaction, to a server configured by `options`, and a backup that
/// should see nothing.
async fn limited(
    per_transaction: usize,
    options: Options,
    script: Script,
) -> (FaultSmtp, FaultSmtp, Dispatcher) {
    let a = FaultSmtp::start_with(script, options).await;
    let b = FaultSmtp::start(Script::ok()).await;
    let mut primary = relay("primary", a.port(), 10);
    if let RelayKind::Smtp(s) = &mut primary.kind {
        s.recipients_per_transaction = std::num::NonZeroUsize::new(per_transaction);
    }
    let d = by_priority(vec![primary, relay("backup", b.port(), 1)]).await;
    (a, b, d)
}

/// A server that refuses recipients past `cap` for good, as some providers
/// do, with a reply that names no cap (no 452, 552 or X.5.3), where a 452
/// would have asked for another transaction.
fn refuses_over(cap: usize, pipelining: bool) -> Options {
    Options {
        pipelining,
        max_recipients: Some(cap),
        over_cap_reply: Some("550 Too many recipients".into()),
        ..Options::default()
    }
}

/// A primary and a backup relay to servers started with these options.
async fn pair_with(primary: Options, backup: Options) -> (FaultSmtp, FaultSmtp, Dispatcher) {
    let a = FaultSmtp::start_with(Script::ok(), primary).await;
    let b = FaultSmtp::start_with(Script::ok(), backup).await;
    let d = by_priority(vec![
        relay("primary", a.port(), 10),
        relay("backup", b.port(), 1),
    ])
    .await;
    (a, b, d)
}

/// A primary relay to a server started with `options`, and a backup.
async fn primary_with(options: Options) -> (FaultSmtp, FaultSmtp, Dispatcher) {
    pair_with(options, Options::default()).await
}

#[tokio::test]
async fn a_552_or_an_x_5_3_refusal_over_the_cap_asks_for_another_transaction() {
    // RFC 5321 (4.5.3.1.10) asks clients to take RFC 821's 552 as the 452,
    // and RFC 3463 says X.5.3 "too many recipients" splits the message.
    let to = people(5);
    for over in [
        "552 Too many recipients",
        "552 5.5.3 Too many recipients",
        "550 5.5.3 Too many recipients",
        "451 4.5.3 Too many recipients",
    ] {
        let (a, b, d) = primary_with(Options {
            max_recipients: Some(2),
            over_cap_reply: Some(over.into()),
            ..Options::default()
        })
        .await;
        sent_in_transactions(&a, &d, &to, &[0..2, 2..4, 4..5]).await;
        assert_eq!(a.over_cap_replies(), 3 + 1, "{over}");
        assert_eq!(b.connections(), 0, "{over}: no failover");
    }
    // A refusal that says something of the recipient is no cap: final.
    for (over, code) in [
        ("552 5.2.2 Mailbox full", 552),
        ("550 Too many recipients", 550),
    ] {
        let (a, b, d) = primary_with(Options {
            max_recipients: Some(2),
            over_cap_reply: Some(over.into()),
            ..Options::default()
        })
        .await;
        let r = d.send(mail_to_all(&to)).await;
        assert_eq!(r.status, Status::Partial, "{over}: {r:?}");
        assert_eq!(r.accepted, to[0..2].to_vec());
        assert_eq!(
            refused(&r),
            vec![
                (to[2].as_str(), code),
                (to[3].as_str(), code),
                (to[4].as_str(), code)
            ]
        );
        assert_eq!(a.delivered().len(), 1, "{over}");
        assert_eq!(b.connections(), 0);
    }
}

#[tokio::test]
async fn a_server_that_announces_its_limits_gets_transactions_within_them() {
    // RCPTMAX (RFC 9422) from a provider whose reply over its cap would
    // refuse for good: each transaction names at most that many.
    let to = people(5);
    for pipelining in [true, false] {
        let (a, b, d) = primary_with(Options {
            announce_limits: true,
            ..refuses_over(2, pipelining)
        })
        .await;
        sent_in_transactions(&a, &d, &to, &[0..2, 2..4, 4..5]).await;
        assert_eq!(a.over_cap_replies(), 0, "pipelined {pipelining}");
        assert_eq!(b.connections(), 0);
    }
    // The relay's recipients_per_transaction, tighter, still holds.
    let (a, _b, d) = limited(
        1,
        Options {
            announce_limits: true,
            ..refuses_over(2, true)
        },
        Script::ok(),
    )
    .await;
    sent_in_transactions(&a, &d, &to[0..3], &[0..1, 1..2, 2..3]).await;
    // RCPTDOMAINMAX: recipients of one domain a transaction, the domain's
    // case aside.
    let to: Vec<String> = [
        "a@one.example",
        "b@ONE.example",
        "c@two.example",
        "d@three.example",
        "e@three.example",
    ]
    .map(String::from)
    .to_vec();
    let (a, b, d) = primary_with(Options {
        max_domains: Some(1),
        over_cap_reply: Some("550 Too many recipient domains".into()),
        announce_limits: true,
        ..Options::default()
    })
    .await;
    sent_in_transactions(&a, &d, &to, &[0..2, 2..3, 3..5]).await;
    assert_eq!(a.over_cap_replies(), 0);
    assert_eq!(b.connections(), 0);
    // Recipients of one domain go in one transaction wherever they stand in
    // the list, and the answer lists them in the order given.
    let mixed: Vec<String> = [
        "a@one.example",
        "b@two.example",
        "c@ONE.example",
        "d@two.example",
        "e@three.example",
    ]
    .map(String::from)
    .to_vec();
    let (a2, _b2, d2) = primary_with(Options {
        max_domains: Some(1),
        over_cap_reply: Some("550 Too many recipient domains".into()),
        announce_limits: true,
        ..Options::default()
    })
    .await;
    let r = d2.send(mail_to_all(&mixed)).await;
    assert_eq!(r.status, Status::Sent, "{r:?}");
    assert_eq!(r.accepted, mixed);
    let sent: Vec<_> = a2.delivered().iter().map(|t| t.rcpt_to.clone()).collect();
    let pick = |i: &[usize]| i.iter().map(|&i| mixed[i].clone()).collect::<Vec<_>>();
    assert_eq!(sent, [pick(&[0, 2]), pick(&[1, 3]), pick(&[4])]);
    assert_eq!(a2.connections(), 1);
    assert_eq!(a2.over_cap_replies(), 0);
    // A probe reports what the server announced, and nothing for a server
    // that announced nothing.
    let probed = d.test_connection(None).await.unwrap();
    assert_eq!(probed[0].limits.rcpt_domains.map(|n| n.get()), Some(1));
    assert_eq!(probed[0].limits.rcpt, None, "{probed:?}");
    assert_eq!(probed[1].limits, mailmux_actors::ServerLimits::default());
}

#[tokio::test]
async fn a_session_has_no_more_transactions_than_the_server_announced() {
    // MAILMAX=2 (RFC 9422): a session that had two is closed, and the third
    // message goes on a new one.
    let (a, b, d) = primary_with(Options {
        max_transactions: Some(2),
        announce_limits: true,
        ..Options::default()
    })
    .await;
    for _ in 0..3 {
        let r = d.send(mail()).await;
        assert_eq!(r.status, Status::Sent, "{r:?}");
    }
    assert_eq!(a.connections(), 2);
    assert_eq!(a.over_cap_replies(), 0, "no MAIL over the limit");
    assert_eq!(b.connections(), 0);
    let probed = d.test_connection(Some("primary")).await.unwrap();
    assert_eq!(
        probed[0].limits.mail.map(|n| n.get()),
        Some(2),
        "{probed:?}"
    );

    // A message split over more transactions than the session has left:
    // the recipients past them are deferred, never sent a MAIL the server
    // would refuse, and the spent session is not reused.
    let to = people(3);
    let (a, b, d) = primary_with(Options {
        max_transactions: Some(2),
        announce_limits: true,
        ..refuses_over(1, true)
    })
    .await;
    let r = d.send(mail_to_all(&to)).await;
    assert_eq!(r.status, Status::Partial, "{r:?}");
    assert_eq!(r.accepted, to[0..2].to_vec());
    assert!(r.rejected.is_empty(), "{r:?}");
    assert_eq!(deferred(&r), vec![(to[2].as_str(), 451)]);
    assert!(r.deferred[0].reply.text.contains("MAILMAX"), "{r:?}");
    assert_eq!(a.over_cap_replies(), 0);
    let next = d.send(mail()).await;
    assert_eq!(next.status, Status::Sent, "{next:?}");
    assert_eq!(a.connections(), 2);
    assert_eq!(b.connections(), 0);
}

#[tokio::test]
async fn a_server_that_refuses_recipients_over_its_cap_for_good_loses_them_unless_the_relay_splits()
{
    // Without recipients_per_transaction, the 550s past the cap are final.
    let a = FaultSmtp::start_with(Script::ok(), refuses_over(2, true)).await;
    let d = by_priority(vec![relay("primary", a.port(), 1)]).await;
    let to = people(5);
    let r = d.send(mail_to_all(&to)).await;
    assert_eq!(r.status, Status::Partial, "{r:?}");
    assert_eq!(r.accepted, to[0..2].to_vec());
    assert_eq!(
        refused(&r),
        vec![
            (to[2].as_str(), 550),
            (to[3].as_str(), 550),
            (to[4].as_str(), 550)
        ]
    );

    // With it, each transaction stays under the cap and everyone gets it.
    for pipelining in [true, false] {
        let (a, b, d) = limited(2, refuses_over(2, pipelining), Script::ok()).await;
        sent_in_transactions(&a, &d, &to, &[0..2, 2..4, 4..5]).await;
        assert_eq!(b.connections(), 0, "no failover");
        // A message within the limit is one transaction, as before.
        let next = d.send(mail_to_all(&to[0..2])).await;
        assert_eq!(next.status, Status::Sent, "{next:?}");
        assert_eq!(a.delivered().len(), 4);
        assert_eq!(a.connections(), 1);
    }
}

#[tokio::test]
async fn the_relays_limit_and_the_servers_452_cap_work_together() {
    // The relay names 3 a transaction, the server takes 2: each
    // transaction's third goes first in the next one.
    let options = Options {
        max_recipients: Some(2),
        ..Options::default()
    };
    let (a, b, d) = limited(3, options, Script::ok()).await;
    let to = people(7);
    let r = d.send(mail_to_all(&to)).await;
    assert_eq!(r.status, Status::Sent, "{r:?}");
    assert_eq!(r.accepted, to);
    let groups: Vec<_> = a.delivered().into_iter().map(|t| t.rcpt_to).collect();
    assert_eq!(
        groups,
        vec![
            to[0..2].to_vec(),
            to[2..4].to_vec(),
            to[4..6].to_vec(),
            to[6..7].to_vec()
        ]
    );
    assert_eq!(b.connections(), 0);
}

#[tokio::test]
async fn a_first_transaction_whose_every_recipient_is_refused_commits_nothing_and_the_next_is_the_first()
 {
    for pipelining in [true, false] {
        let to = people(5);
        let script = Script::ok()
            .on_rcpt(&to[0], Action::reply(550, "5.1.1 no such user"))
            .on_rcpt(&to[1], Action::reply(550, "5.1.1 no such user"));
        let options = Options {
            pipelining,
            ..Options::default()
        };
        let (a, b, d) = limited(2, options, script).await;
        let m = mail_to_all(&to);
        let id = m.message_id.clone();
        let mark = Arc::new(CountedMark::default());
        let r = d.send_marked(m, Some(mark.clone())).await;
        assert_eq!(r.status, Status::Partial, "pipelined {pipelining}: {r:?}");
        assert_eq!(r.accepted, to[2..5].to_vec());
        assert_eq!(
            refused(&r),
            vec![(to[0].as_str(), 550), (to[1].as_str(), 550)]
        );
        let groups: Vec<_> = a.delivered().into_iter().map(|t| t.rcpt_to).collect();
        assert_eq!(groups, vec![to[2..4].to_vec(), to[4..5].to_vec()]);
        assert_eq!(seen(&a, &id), 2, "no data in the refused transaction");
        assert_eq!(mark.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(b.connections(), 0, "a 5xx is no reason to fail over");

        // Every recipient refused, over two transactions: failed, nothing
        // committed, and the session still in step.
        let script = Script::ok().on(Phase::Rcpt, Action::reply(550, "5.1.1 no such user"));
        let options = Options {
            pipelining,
            ..Options::default()
        };
        let (a, b, d) = limited(2, options, script).await;
        let mark = Arc::new(CountedMark::default());
        let r = d
            .send_marked(mail_to_all(&to[0..3]), Some(mark.clone()))
            .await;
        assert_eq!(r.status, Status::Failed, "pipelined {pipelining}: {r:?}");
        assert_eq!(r.failure, Some(FailureReason::Rejected));
        assert_eq!(mark.0.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert!(a.received().is_empty(), "no data");
        assert_eq!(b.connections(), 0);
        assert_eq!(a.commands(Phase::Rcpt), 3, "each recipient tried once");
        assert_eq!(a.commands(Phase::Mail), 2);
        assert_eq!(
            a.verb_count("RSET"),
            2,
            "the session reset after each transaction"
        );
        assert_eq!(a.connections(), 1);
    }
}

#[tokio::test]
async fn a_transaction_after_the_first_lost_at_mail_defers_every_recipient_left_with_a_451() {
    let (a, b, d) = limited(
        2,
        Options::default(),
        second_transaction(Phase::Mail, Action::Close),
    )
    .await;
    let to = people(5);
    let (r, id) = send_to_all(&d, &to).await;
    assert_eq!(r.status, Status::Partial, "{r:?}");
    assert_eq!(r.accepted, to[0..2].to_vec());
    assert!(r.rejected.is_empty(), "{r:?}");
    assert_eq!(
        deferred(&r),
        vec![
            (to[2].as_str(), 451),
            (to[3].as_str(), 451),
            (to[4].as_str(), 451)
        ]
    );
    let message = r.message.clone().unwrap_or_default();
    assert!(message.contains("recipients_per_transaction"), "{message}");
    assert_eq!(copies(&a, &id), 1);
    assert_eq!(b.connections(), 0, "never sent elsewhere");
}

/// `m` with its body grown to `size` bytes in all.
fn sized(mut m: Mail, size: usize) -> Mail {
    let mut bytes = m.bytes.to_vec();
    let line = b"0123456789012345678901234567890123456789012345678901234567890123456789\r\n";
    while bytes.len() + line.len() <= size {
        bytes.extend_from_slice(line);
    }
    while bytes.len() < size - 2 {
        bytes.push(b'x');
    }
    bytes.extend_from_slice(b"\r\n");
    m.bytes = Arc::from(bytes);
    m
}

/// A server that takes everything and announces this SIZE.
async fn announcing_size(size: u64) -> FaultSmtp {
    FaultSmtp::start_with(
        Script::ok(),
        Options {
            size: Some(size),
            ..Options::default()
        },
    )
    .await
}

/// A primary and a backup relay whose servers announce these SIZEs.
async fn sized_pair(primary: u64, backup: u64) -> (FaultSmtp, FaultSmtp, Dispatcher) {
    let size = |n| Options {
        size: Some(n),
        ..Options::default()
    };
    pair_with(size(primary), size(backup)).await
}

#[tokio::test]
async fn a_message_over_the_servers_size_goes_to_a_relay_that_takes_it() {
    let (a, b, d) = sized_pair(1_000, 0).await;
    let m = sized(mail(), 5_000);
    let id = m.message_id.clone();
    let r = d.send(m).await;
    assert_eq!(r.status, Status::Sent, "{r:?}");
    assert_eq!(r.relay.as_deref(), Some("backup"));
    assert_eq!(r.attempts[0].class, Some(FailureClass::Unsupported));
    assert!(
        r.attempts[0].detail.contains("5000 bytes") && r.attempts[0].detail.contains("1000"),
        "{r:?}"
    );
    assert_eq!(
        a.commands(Phase::Mail),
        0,
        "not even a MAIL to the small one"
    );
    assert_eq!(copies(&b, &id), 1);
    // SIZE without a limit: the size is declared all the same.
    assert!(
        b.mail_args().iter().all(|m| m.ends_with(" SIZE=5000")),
        "{:?}",
        b.mail_args()
    );

    // The small relay was not held to blame: a small message goes there.
    let small = mail();
    let len = small.bytes.len();
    let r = d.send(small).await;
    assert_eq!(r.relay.as_deref(), Some("primary"), "{r:?}");
    assert_eq!(
        a.mail_args(),
        vec![format!("FROM:<sender@test.example> SIZE={len}")]
    );
}

#[tokio::test]
async fn a_message_over_every_relays_size_fails_too_large_and_nothing_is_sent() {
    let (a, b, d) = sized_pair(1_000, 2_000).await;
    let r = d.send(sized(mail(), 3_000)).await;
    assert_eq!(r.status, Status::Failed, "{r:?}");
    assert_eq!(r.failure, Some(FailureReason::TooLarge));
    assert_eq!(r.attempts.len(), 2);
    assert_eq!(a.commands(Phase::Mail) + b.commands(Phase::Mail), 0);
    // A server with no SIZE gets no SIZE parameter.
    let c = FaultSmtp::start(Script::ok()).await;
    let d = by_priority(vec![relay("plain", c.port(), 1)]).await;
    let r = d.send(sized(mail(), 3_000)).await;
    assert_eq!(r.status, Status::Sent, "{r:?}");
    assert_eq!(
        c.mail_args(),
        vec!["FROM:<sender@test.example>".to_string()]
    );
}

/// A relay too small for a message does not use up its `max_attempts`: with
/// one attempt allowed, the message still goes to the next relay, which
/// takes it.
#[tokio::test]
async fn a_relay_too_small_for_a_message_does_not_use_up_its_attempts() {
    let one_attempt = |relays| async move {
        let mut s = settings(relays, Strategy::Priority);
        s.router.max_attempts = 1;
        Dispatcher::start(s).await.unwrap()
    };
    let small = announcing_size(1_000).await;
    let large = FaultSmtp::start(Script::ok()).await;
    let d = one_attempt(vec![
        relay("small", small.port(), 10),
        relay("large", large.port(), 1),
    ])
    .await;
    let big = sized(mail(), 5_000);
    let id = big.message_id.clone();
    let r = d.send(big).await;
    assert_eq!(r.status, Status::Sent, "{r:?}");
    assert_eq!(r.relay.as_deref(), Some("large"), "{r:?}");
    assert_eq!(r.attempts[0].class, Some(FailureClass::Unsupported));
    assert_eq!(copies(&large, &id), 1);
    // A relay tried for real still counts: one attempt, no failover.
    let flaky = FaultSmtp::start(Script::ok().on(Phase::Mail, Action::reply(451, "later"))).await;
    let d = one_attempt(vec![
        relay("flaky", flaky.port(), 10),
        relay("large", large.port(), 1),
    ])
    .await;
    let r = d.send(mail()).await;
    assert_eq!(r.status, Status::Failed, "{r:?}");
    assert_eq!(r.attempts.len(), 1, "{r:?}");
}

/// A message too large for the relay that is up, while the one that would
/// take it is backing off, is not refused for good: it fails as the relays
/// backing off, which the queue retries, and goes to the large relay once
/// it is back.
#[tokio::test]
async fn a_message_too_large_for_the_relay_up_waits_for_a_larger_one_that_is_down() {
    let small = announcing_size(1_000).await;
    let large = FaultSmtp::start(Script::ok().on_share(
        Phase::Greeting,
        Action::reply(421, "4.3.2 down for a moment"),
        support::fault_smtp::Share::FirstN(1),
    ))
    .await;
    let mut first = relay("large", large.port(), 10);
    first.health.backoff_base = Duration::from_millis(400);
    first.health.backoff_max = Duration::from_millis(400);
    let d = by_priority(vec![first, relay("small", small.port(), 1)]).await;
    // The large relay fails and backs off; the small one takes this one.
    let r = d.send(mail()).await;
    assert_eq!(r.relay.as_deref(), Some("small"), "{r:?}");
    let big = sized(mail(), 3_000);
    let id = big.message_id.clone();
    let r = d.send(big.clone()).await;
    assert_eq!(r.status, Status::Failed, "{r:?}");
    assert!(
        matches!(r.failure, Some(FailureReason::RelaysBackingOff { wait_ms }) if wait_ms <= 400),
        "{r:?}"
    );
    assert_eq!(r.attempts.len(), 1, "{r:?}");
    assert_eq!(r.attempts[0].class, Some(FailureClass::Unsupported));
    // Once its backoff ends, the large relay takes it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = d.send(big).await;
    assert_eq!(r.status, Status::Sent, "{r:?}");
    assert_eq!(r.relay.as_deref(), Some("large"), "{r:?}");
    assert_eq!(copies(&large, &id), 1);
    assert_eq!(small.commands(Phase::Mail), 1, "only the small message");
}

#[tokio::test]
async fn aiosmtpd_with_a_size_limit_gets_the_messages_under_it_and_none_over_it() {
    use support::aiosmtpd::{Aiosmtpd, AiosmtpdOptions};
    let server = Aiosmtpd::start_with(AiosmtpdOptions {
        size_limit: Some(4_000),
        ..AiosmtpdOptions::default()
    })
    .await;
    let d = by_priority(vec![relay("aiosmtpd", server.port(), 1)]).await;
    let probed = d.test_connection(None).await.unwrap();
    assert_eq!(probed[0].size_limit, Some(4_000), "{probed:?}");
    let under = sized(mail(), 3_000);
    let bytes = under.bytes.clone();
    let r = d.send(under).await;
    assert_eq!(r.status, Status::Sent, "{r:?}");
    let got = server
        .wait_for(1, Duration::from_secs(10))
        .await
        .expect("the message under the limit");
    assert_eq!(got[0].data.as_slice(), &bytes[..]);

    let r = d.send(sized(mail(), 6_000)).await;
    assert_eq!(r.status, Status::Failed, "{r:?}");
    assert_eq!(r.failure, Some(FailureReason::TooLarge));
    assert!(r.attempts[0].detail.contains("4000"), "{r:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.count(), 1, "nothing over the limit");
}

#[tokio::test]
async fn a_452_to_the_first_recipient_is_no_cap_and_fails_the_message_over() {
    // No recipient was accepted before the 452: the server is out of room,
    // not counting recipients, so the whole message goes to the backup.
    let (a, b, d) = pair(
        Script::ok().on(
            Phase::Rcpt,
            Action::reply(452, "insufficient system storage"),
        ),
        Script::ok(),
    )
    .await;
    let m = mail_to(&["ada@test.example", "bob@test.example"]);
    let id = m.message_id.clone();
    let r = d.send(m).await;
    assert_eq!(r.status, Status::Sent, "{r:?}");
    assert_eq!(r.relay.as_deref(), Some("backup"));
    assert_eq!(seen(&a, &id), 0);
    assert_eq!(copies(&b, &id), 1);
    assert_eq!(
        b.delivered()[0].rcpt_to,
        vec!["ada@test.example", "bob@test.example"]
    );
}

#[tokio::test]
async fn every_recipient_refused_is_permanent_without_failover() {
    let (a, b, d) = pair(
        Script::ok().on(Phase::Rcpt, Action::reply(550, "no")),
        Script::ok(),
    )
    .await;
    let r = d.send(mail()).await;
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.failure, Some(FailureReason::Rejected));
    assert_eq!(r.attempts.len(), 1);
    assert!(a.received().is_empty());
    assert_eq!(b.connections(), 0);
}

#[tokio::test]
async fn permanent_5xx_after_the_dot_does_not_fail_over() {
    let (a, b, d) = pair(
        Script::ok().on(Phase::AfterDot, Action::reply(554, "content rejected")),
        Script::ok(),
    )
    .await;
    let m = mail();
    let id = m.message_id.clone();
    let r = d.send(m).await;
    assert_eq!(r.status, Status::Failed, "{r:?}");
    assert_eq!(r.failure, Some(FailureReason::Rejected));
    assert_eq!(r.attempts[0].class, Some(FailureClass::Permanent));
    assert_eq!(r.attempts[0].reply.as_ref().map(|r| r.code), Some(554));
    assert_eq!(seen(&a, &id), 1);
    assert_eq!(copies(&a, &id), 0);
    assert_eq!(b.connections(), 0);
    // A refused message says nothing against the relay.
    let st = d.status().await.unwrap();
    assert_eq!(st.relays[0].state, RelayState::Healthy);
}

#[tokio::test]
async fn connection_lost_after_the_dot_is_unknown_and_never_resent() {
    let (a, b, d) = pair(
        Script::ok().on(Phase::AfterDot, Action::Close),
        Script::ok(),
    )
    .await;
    let m = mail();
    let id = m.message_id.clone();
    let r = d.send(m).await;
    assert_eq!(r.status, Status::Unknown, "{r:?}");
    assert_eq!(r.attempts.len(), 1);
    assert_eq!(r.attempts[0].class, Some(FailureClass::Unknown));
    assert_eq!(seen(&a, &id), 1, "exactly one copy at the first server");
    assert_eq!(a.received()[0].outcome, AfterDot::Closed);
    assert!(
        b.received().is_empty() && b.connections() == 0,
        "never resent"
    );
}

/// A 3xx reply after the final "." is no acceptance (lettre takes it for a
/// success): the message may have been taken, so it is unknown, never sent
/// again, and the connection is dropped.
#[tokio::test]
async fn an_intermediate_reply_after_the_dot_is_unknown_not_sent() {
    let (a, b, d) = pair(
        Script::ok().on_share(
            Phase::AfterDot,
            Action::reply(334, "what now"),
            support::fault_smtp::Share::FirstN(1),
        ),
        Script::ok(),
    )
    .await;
    let m = mail();
    let id = m.message_id.clone();
    let r = d.send(m).await;
    assert_eq!(r.status, Status::Unknown, "{r:?}");
    assert_eq!(r.attempts[0].class, Some(FailureClass::Unknown));
    assert_eq!(r.attempts[0].reply.as_ref().map(|r| r.code), Some(334));
    assert_eq!(seen(&a, &id), 1);
    assert!(b.received().is_empty(), "never resent");
    // The connection was dropped: the next message goes out on a new one.
    let m = mail();
    let next = m.message_id.clone();
    let r = d.send(m).await;
    assert_eq!(r.status, Status::Sent, "{r:?}");
    assert_eq!(copies(&a, &next) + copies(&b, &next), 1);
    // Had the first server taken it, it would be on a connection of its own.
    assert_eq!(a.connections(), 1 + copies(&a, &next) as u64);
}

/// A reply that does not fit its command: DATA answered with anything but
/// 354 (a 2xx, or another 3xx) leaves the server out of data mode, and MAIL
/// or RCPT answered with a 3xx puts the session out of step. No content is
/// written, the connection is dropped, and the message fails over, once.
#[tokio::test]
async fn a_reply_that_does_not_fit_its_command_fails_over_before_any_content() {
    let cases = [
        (Phase::Data, 250, "not now"),
        (Phase::Data, 334, "not now"),
        (Phase::Mail, 354, "go ahead"),
        (Phase::Rcpt, 354, "go ahead"),
    ];
    for (phase, code, text) in cases {
        let (a, b, d) = pair(
            Script::ok().on(phase, Action::reply(code, text)),
            Script::ok(),
        )
        .await;
        let m = mail();
        let id = m.message_id.clone();
        let r = d.send(m).await;
        let case = format!("{phase:?} {code}");
        assert_eq!(r.status, Status::Sent, "{case}: {r:?}");
        assert_eq!(
            r.attempts[0].class,
            Some(FailureClass::RelayFault),
            "{case}"
        );
        assert_eq!(seen(&a, &id), 0, "{case}: content reached the server");
        assert_eq!(copies(&b, &id), 1, "{case}");
        // The first server read no message line as a command.
        assert_eq!(a.verb_count("SUBJECT:"), 0, "{case}");
    }
}

#[tokio::test]
async fn no_reply_after_the_dot_is_unknown_within_the_data_timeout() {
    let a = FaultSmtp::start(Script::ok().on(Phase::AfterDot, Action::Hang)).await;
    let b = FaultSmtp::start(Script::ok()).await;
    let mut primary = relay("primary", a.port(), 10);
    primary.timeouts.data = Duration::from_millis(400);
    let d = Dispatcher::start(settings(
        vec![primary, relay("backup", b.port(), 1)],
        Strategy::Priority,
    ))
    .await
    .unwrap();
    let m = mail();
    let id = m.message_id.clone();
    let started = Instant::now();
    let r = d.send(m).await;
    let took = started.elapsed();
    assert_eq!(r.status, Status::Unknown, "{r:?}");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(seen(&a, &id), 1);
    assert!(b.received().is_empty());
}

/// A relay that answers its probes (connect, EHLO, NOOP) but hangs at
/// MAIL: each probe it passes brings it back, and each message then waits
/// for its timeout before the backup takes it. Each such relapse doubles
/// its backoff, so it takes fewer messages hostage each time, where every
/// passed probe used to bring it back to `backoff_base`. One message it
/// delivers ends that.
#[tokio::test]
async fn a_relay_that_passes_probes_but_hangs_at_mail_backs_off_longer_each_time() {
    let a = FaultSmtp::start(Script::ok().on(Phase::Mail, Action::Hang)).await;
    let b = FaultSmtp::start(Script::ok()).await;
    let mut primary = relay("primary", a.port(), 10);
    primary.timeouts = Timeouts::uniform(Duration::from_millis(300));
    primary.health.backoff_base = Duration::from_millis(300);
    primary.health.backoff_max = Duration::from_secs(30);
    primary.health.circuit_failures = 1000;
    let d = Dispatcher::start(settings(
        vec![primary, relay("backup", b.port(), 1)],
        Strategy::Priority,
    ))
    .await
    .unwrap();
    let mut backoffs = Vec::new();
    for round in 0..3 {
        let r = d.send(mail()).await;
        assert_eq!(r.relay.as_deref(), Some("backup"), "{round}: {r:?}");
        assert_eq!(r.attempts[0].relay, "primary", "{round}: {r:?}");
        let st = d.status().await.unwrap();
        backoffs.push(st.relays[0].state.retry_in().expect("backing off"));
        // Its probe passes once the backoff runs out.
        let start = Instant::now();
        while !matches!(
            d.status().await.unwrap().relays[0].state,
            RelayState::Healthy
        ) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{round}: never probed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Up to 300 ms, then 300 to 600, then 600 to 1,200 (equal jitter).
    assert!(backoffs[0] <= Duration::from_millis(300), "{backoffs:?}");
    assert!(backoffs[2] > Duration::from_millis(450), "{backoffs:?}");
    assert!(backoffs[2] > backoffs[0], "{backoffs:?}");
    assert_eq!(d.status().await.unwrap().relays[0].relapses, 2);
    assert_eq!(a.delivered().len(), 0);
    assert_eq!(b.delivered().len(), 3);
}

#[tokio::test]
async fn a_hang_at_each_phase_is_bounded_and_the_actors_stay_responsive() {
    for phase in [
        Phase::Greeting,
        Phase::Ehlo,
        Phase::Mail,
        Phase::Rcpt,
        Phase::Data,
    ] {
        let a = FaultSmtp::start(Script::ok().on(phase, Action::Hang)).await;
        let b = FaultSmtp::start(Script::ok()).await;
        let mut primary = relay("primary", a.port(), 10);
        primary.timeouts = Timeouts::uniform(Duration::from_millis(500));
        let d = Dispatcher::start(settings(
            vec![primary, relay("backup", b.port(), 1)],
            Strategy::Priority,
        ))
        .await
        .unwrap();
        let m = mail();
        let id = m.message_id.clone();
        let sender = {
            let d = d.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                (d.send(m).await, started.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(150)).await;
        let asked = Instant::now();
        let st = d.status().await.unwrap();
        assert!(
            asked.elapsed() < Duration::from_millis(100),
            "{phase:?}: status took {:?}",
            asked.elapsed()
        );
        assert_eq!(st.relays[0].in_flight, 1, "{phase:?}");
        let (r, took) = sender.await.unwrap();
        assert_eq!(r.status, Status::Sent, "{phase:?}: {r:?}");
        assert_eq!(r.relay.as_deref(), Some("backup"));
        assert_eq!(
            r.attempts[0].class,
            Some(FailureClass::RelayFault),
            "{phase:?}"
        );
        assert!(
            took < Duration::from_millis(2500),
            "{phase:?}: took {took:?}"
        );
        assert_eq!(copies(&b, &id), 1);
        assert_eq!(seen(&a, &id), 0);
    }
}

/// A server that begins a reply and never ends its line is cut off after a
/// bounded read, long before the phase's timeout, and the message fails
/// over; after the final ".", the same flood leaves the message `unknown`.
#[tokio::test]
async fn an_endless_reply_is_cut_off_before_it_fills_memory() {
    for phase in [Phase::Greeting, Phase::Ehlo, Phase::Mail, Phase::AfterDot] {
        let a = FaultSmtp::start(Script::ok().on(phase, Action::Flood)).await;
        let b = FaultSmtp::start(Script::ok()).await;
        let mut primary = relay("primary", a.port(), 10);
        primary.timeouts = Timeouts::uniform(Duration::from_secs(20));
        let d = Dispatcher::start(settings(
            vec![primary, relay("backup", b.port(), 1)],
            Strategy::Priority,
        ))
        .await
        .unwrap();
        let m = mail();
        let id = m.message_id.clone();
        let started = Instant::now();
        let r = d.send(m).await;
        let took = started.elapsed();
        assert!(took < Duration::from_secs(10), "{phase:?}: took {took:?}");
        let first = &r.attempts[0];
        assert!(
            first.detail.contains("without a command to answer"),
            "{phase:?}: {first:?}"
        );
        if phase == Phase::AfterDot {
            assert_eq!(r.status, Status::Unknown, "{phase:?}: {r:?}");
            assert_eq!(copies(&b, &id), 0);
        } else {
            assert_eq!(r.status, Status::Sent, "{phase:?}: {r:?}");
            assert_eq!(first.class, Some(FailureClass::RelayFault), "{phase:?}");
            assert_eq!(copies(&b, &id), 1);
        }
    }
}

#[tokio::test]
async fn a_backed_off_relay_is_probed_and_comes_back() {
    let a = FaultSmtp::start(Script::ok().on(Phase::Greeting, Action::reply(421, "down"))).await;
    let b = FaultSmtp::start(Script::ok()).await;
    let mut primary = relay("primary", a.port(), 10);
    primary.health.backoff_base = Duration::from_millis(600);
    primary.health.backoff_max = Duration::from_millis(600);
    primary.health.probe_interval = Duration::from_millis(200);
    let d = Dispatcher::start(settings(
        vec![primary, relay("backup", b.port(), 1)],
        Strategy::Priority,
    ))
    .await
    .unwrap();
    assert_eq!(d.send(mail()).await.relay.as_deref(), Some("backup"));
    let st = d.status().await.unwrap();
    let retry = st.relays[0].state.retry_in().expect("backing off");
    assert!(
        retry <= Duration::from_millis(600) && retry >= Duration::from_millis(250),
        "{retry:?}"
    );

    // Skipped while backing off: no connection, straight to the backup.
    let conns = a.connections();
    assert_eq!(d.send(mail()).await.attempts.len(), 1);
    assert_eq!(a.connections(), conns);

    // The primary recovers; once its backoff runs out a probe brings it back.
    a.set_script(Script::ok());
    let back = support::wait_until(|| a.connections() > conns, Duration::from_secs(3)).await;
    assert!(back, "the primary was never probed");
    let mut healthy = false;
    for _ in 0..50 {
        if d.status().await.unwrap().relays[0].state == RelayState::Healthy {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(healthy, "the probe did not restore the primary");
    let m = mail();
    let id = m.message_id.clone();
    assert_eq!(d.send(m).await.relay.as_deref(), Some("primary"));
    assert_eq!(copies(&a, &id), 1);
}

#[tokio::test]
async fn the_circuit_opens_and_all_down_names_every_relay() {
    let a = FaultSmtp::start(Script::ok().on(Phase::Greeting, Action::reply(421, "down"))).await;
    let b = FaultSmtp::start(Script::ok().on(Phase::Ehlo, Action::reply(554, "no"))).await;
    let mut relays = vec![relay("primary", a.port(), 10), relay("backup", b.port(), 1)];
    for r in &mut relays {
        r.health.backoff_base = Duration::from_millis(1);
        r.health.backoff_max = Duration::from_millis(2);
        r.health.circuit_failures = 3;
        r.health.probe_interval = Duration::from_secs(60);
    }
    let d = Dispatcher::start(settings(relays, Strategy::Priority))
        .await
        .unwrap();
    // The first send meets both relays healthy: each is tried and fails.
    let r = d.send(mail()).await;
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.failure, Some(FailureReason::AllRelaysFailed), "{r:?}");
    assert_eq!(r.attempts.len(), 2, "{r:?}");
    // Each backoff (1-2 ms) ends in a probe, which fails too, so a relay may
    // go down again between the router's pick and the attempt (`busy`).
    // Failures from sends and probes alike open both circuits.
    let mut open = false;
    for _ in 0..500 {
        let st = d.status().await.unwrap();
        if st
            .relays
            .iter()
            .all(|r| matches!(r.state, RelayState::CircuitOpen { .. }))
        {
            open = true;
            break;
        }
        let available = |r: &RelayState| match r {
            RelayState::Healthy => true,
            RelayState::BackingOff { retry_in } => retry_in.is_zero(),
            _ => false,
        };
        if st.relays.iter().any(|r| available(&r.state)) {
            let r = d.send(mail()).await;
            assert_eq!(r.status, Status::Failed);
            assert!(
                matches!(
                    r.failure,
                    Some(
                        FailureReason::AllRelaysFailed
                            | FailureReason::Busy
                            | FailureReason::RelaysBackingOff { .. }
                    )
                ),
                "{r:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(open, "the circuits never opened");
    let st = d.status().await.unwrap();
    for relay in &st.relays {
        assert!(
            matches!(relay.state, RelayState::CircuitOpen { .. }),
            "{relay:?}"
        );
    }
    let r = d.send(mail()).await;
    assert_eq!(r.status, Status::Failed);
    assert!(r.attempts.is_empty(), "open circuits are not tried: {r:?}");
    // It says when the first circuit is probed again, for the queue's next
    // attempt; callers see `all_relays_failed` as before.
    let Some(reason @ FailureReason::RelaysBackingOff { wait_ms }) = r.failure else {
        panic!("{r:?}")
    };
    assert!(wait_ms <= 60_000, "within the probe interval: {r:?}");
    assert_eq!(reason.code(), "all_relays_failed");
    let msg = r.message.unwrap();
    assert!(
        msg.contains("primary: circuit_open") && msg.contains("backup: circuit_open"),
        "{msg}"
    );
    assert!(a.delivered().is_empty() && b.delivered().is_empty());
}

async fn three(strategy: Strategy, weights: [u32; 3]) -> ([FaultSmtp; 3], Dispatcher) {
    let servers = [
        FaultSmtp::start(Script::ok()).await,
        FaultSmtp::start(Script::ok()).await,
        FaultSmtp::start(Script::ok()).await,
    ];
    let relays = servers
        .iter()
        .zip(["a", "b", "c"])
        .zip(weights)
        .map(|((s, n), w)| {
            let mut r = relay(n, s.port(), 1);
            r.weight = w;
            r
        })
        .collect();
    let d = Dispatcher::start(settings(relays, strategy)).await.unwrap();
    (servers, d)
}

#[tokio::test]
async fn round_robin_spreads_evenly() {
    let (servers, d) = three(Strategy::RoundRobin, [1, 1, 1]).await;
    for _ in 0..300 {
        assert_eq!(d.send(mail()).await.status, Status::Sent);
    }
    for s in &servers {
        assert_eq!(s.delivered().len(), 100);
    }
}

#[tokio::test]
async fn weighted_is_proportional_to_the_weights() {
    let (servers, d) = three(Strategy::Weighted, [1, 2, 5]).await;
    let n = 800;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let d = d.clone();
        tasks.spawn(async move { d.send(mail()).await.status });
    }
    while let Some(st) = tasks.join_next().await {
        assert_eq!(st.unwrap(), Status::Sent);
    }
    let got: Vec<f64> = servers
        .iter()
        .map(|s| s.delivered().len() as f64 / n as f64)
        .collect();
    for (share, want) in got.iter().zip([1.0 / 8.0, 2.0 / 8.0, 5.0 / 8.0]) {
        assert!((share - want).abs() < 0.07, "shares {got:?}");
    }
}

#[tokio::test]
async fn least_outstanding_prefers_the_idle_relay() {
    let busy = FaultSmtp::start(Script::ok().on(Phase::AfterDot, Action::Hang)).await;
    let idle = FaultSmtp::start(Script::ok()).await;
    let mut first = relay("busy", busy.port(), 10);
    first.timeouts.data = Duration::from_secs(3);
    let d = Dispatcher::start(settings(
        vec![first, relay("idle", idle.port(), 1)],
        Strategy::LeastOutstanding,
    ))
    .await
    .unwrap();
    // The first message goes to the higher-priority relay and stays there.
    let slow = {
        let d = d.clone();
        tokio::spawn(async move { d.send(mail()).await })
    };
    assert!(support::wait_until(|| busy.commands(Phase::Data) == 1, Duration::from_secs(3)).await);
    for _ in 0..5 {
        let r = d.send(mail()).await;
        assert_eq!(r.relay.as_deref(), Some("idle"), "{r:?}");
    }
    assert_eq!(idle.delivered().len(), 5);
    assert_eq!(slow.await.unwrap().status, Status::Unknown);
}

#[tokio::test]
async fn a_pin_overrides_the_strategy_while_the_pinned_relay_is_healthy() {
    let (servers, d) = three(Strategy::RoundRobin, [1, 1, 1]).await;
    let sel = d.pin(Some("c".into())).await.unwrap();
    assert_eq!(sel.pinned.as_deref(), Some("c"));
    assert_eq!(sel.next.as_deref(), Some("c"));
    for _ in 0..10 {
        assert_eq!(d.send(mail()).await.relay.as_deref(), Some("c"));
    }
    assert_eq!(servers[2].delivered().len(), 10);
    let err = d.pin(Some("nope".into())).await.unwrap_err();
    assert!(err.to_string().contains("a, b, c"), "{err}");
    // The pinned relay goes down: traffic moves on.
    servers[2].set_script(Script::ok().on(Phase::Mail, Action::reply(451, "later")));
    let r = d.send(mail()).await;
    assert_eq!(r.status, Status::Sent);
    assert_ne!(r.relay.as_deref(), Some("c"));
    d.pin(None).await.unwrap();
    assert_eq!(d.selection().await.unwrap().pinned, None);
}

#[tokio::test]
async fn a_preferred_relay_is_tried_first_and_an_unknown_one_is_an_error() {
    let (servers, d) = three(Strategy::Priority, [1, 1, 1]).await;
    let mut m = mail();
    m.prefer = Some("b".into());
    assert_eq!(d.send(m).await.relay.as_deref(), Some("b"));
    assert_eq!(servers[1].delivered().len(), 1);
    let mut m = mail();
    m.prefer = Some("zzz".into());
    let r = d.send(m).await;
    assert_eq!(r.failure, Some(FailureReason::UnknownRelay));
    assert!(r.message.unwrap().contains("a, b, c"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_concurrent_sends_never_exceed_max_connections() {
    let a = FaultSmtp::start(Script::ok()).await;
    let b = FaultSmtp::start(Script::ok()).await;
    let mut relays = vec![relay("a", a.port(), 1), relay("b", b.port(), 1)];
    for r in &mut relays {
        r.pool.max_connections = 4;
        r.pool.max_queued = 4096;
    }
    let d = Dispatcher::start(settings(relays, Strategy::RoundRobin))
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..2000 {
        let d = d.clone();
        tasks.spawn(async move {
            let mut m = mail();
            m.deadline = Instant::now() + Duration::from_secs(120);
            d.send(m).await
        });
    }
    let mut sent = 0;
    while let Some(r) = tasks.join_next().await {
        let r = r.unwrap();
        assert_eq!(r.status, Status::Sent, "{r:?}");
        sent += 1;
    }
    assert_eq!(sent, 2000);
    assert_eq!(a.delivered().len() + b.delivered().len(), 2000);
    assert!(
        a.max_concurrent_connections() <= 4,
        "a saw {}",
        a.max_concurrent_connections()
    );
    assert!(
        b.max_concurrent_connections() <= 4,
        "b saw {}",
        b.max_concurrent_connections()
    );
    // Connections are reused, not dialled per message.
    assert!(
        a.connections() + b.connections() < 100,
        "{} connections",
        a.connections() + b.connections()
    );
}

#[tokio::test]
async fn a_full_global_bound_answers_busy_at_the_deadline() {
    let a = FaultSmtp::start(Script::ok().on(Phase::AfterDot, Action::Hang)).await;
    let mut s = settings(vec![relay("a", a.port(), 1)], Strategy::Priority);
    s.limits.max_in_flight = 1;
    let d = Dispatcher::start(s).await.unwrap();
    let hog = {
        let d = d.clone();
        tokio::spawn(async move { d.send(mail()).await })
    };
    assert!(support::wait_until(|| a.commands(Phase::Data) == 1, Duration::from_secs(3)).await);
    let mut m = mail();
    m.deadline = Instant::now() + Duration::from_millis(200);
    let r = d.send(m).await;
    assert_eq!(r.failure, Some(FailureReason::Busy), "{r:?}");
    assert_eq!(
        a.commands(Phase::Data),
        1,
        "the busy message reached no server"
    );
    hog.abort();
}

#[tokio::test]
async fn an_oversize_message_is_refused_before_any_relay() {
    let a = FaultSmtp::start(Script::ok()).await;
    let mut s = settings(vec![relay("a", a.port(), 1)], Strategy::Priority);
    s.limits.max_message_bytes = 100;
    let d = Dispatcher::start(s).await.unwrap();
    let r = d.send(mail()).await;
    assert_eq!(r.failure, Some(FailureReason::TooLarge));
    assert_eq!(a.connections(), 0);
}

#[tokio::test]
async fn a_non_ascii_address_goes_only_through_a_relay_with_smtputf8() {
    let plain = FaultSmtp::start_with(
        Script::ok(),
        Options {
            smtputf8: false,
            ..Options::default()
        },
    )
    .await;
    let utf8 = FaultSmtp::start(Script::ok()).await;
    let d = Dispatcher::start(settings(
        vec![
            relay("plain", plain.port(), 10),
            relay("utf8", utf8.port(), 1),
        ],
        Strategy::Priority,
    ))
    .await
    .unwrap();
    let r = d.send(mail_to(&["jöran@test.example"])).await;
    assert_eq!(r.relay.as_deref(), Some("utf8"), "{r:?}");
    assert!(r.attempts[0].detail.contains("SMTPUTF8"));
    assert_eq!(r.attempts[0].class, Some(FailureClass::Unsupported));
    assert!(plain.received().is_empty());
    assert_eq!(utf8.delivered().len(), 1);
    // The relay without SMTPUTF8 is not held responsible.
    assert_eq!(
        d.status().await.unwrap().relays[0].state,
        RelayState::Healthy
    );
}

#[tokio::test]
async fn the_file_relay_writes_eml_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = Dispatcher::start(settings(
        vec![RelaySettings::new(
            "outbox",
            RelayKind::File {
                dir: dir.path().join("out"),
            },
        )],
        Strategy::Priority,
    ))
    .await
    .unwrap();
    let m = mail();
    let id = m.message_id.clone();
    let bytes = m.bytes.clone();
    let r = d.send(m).await;
    assert_eq!(r.status, Status::Sent, "{r:?}");
    let written = std::fs::read(dir.path().join("out").join(format!("{id}.eml"))).unwrap();
    assert_eq!(written, &bytes[..]);
    let probe = d.test_connection(None).await.unwrap();
    assert!(probe[0].reachable && probe[0].error.is_none(), "{probe:?}");
}

#[tokio::test]
async fn probes_report_reachability_and_auth() {
    let ok = FaultSmtp::start(Script::ok()).await;
    let refused = support::free_port();
    let d = Dispatcher::start(settings(
        vec![relay("ok", ok.port(), 1), relay("refused", refused, 1)],
        Strategy::Priority,
    ))
    .await
    .unwrap();
    let all = d.test_connection(None).await.unwrap();
    assert_eq!(all.len(), 2);
    assert!(all[0].reachable && all[0].error.is_none(), "{all:?}");
    assert!(!all[1].reachable);
    assert_eq!(all[1].error.as_ref().unwrap().0, FailureClass::RelayFault);
    assert!(ok.verb_count("NOOP") >= 1);
    assert!(all[0].pipelining, "{all:?}");
    assert_eq!(all[0].size_limit, None, "no SIZE announced");
    let one = d.test_connection(Some("ok")).await.unwrap();
    assert_eq!(one.len(), 1);
    assert!(d.test_connection(Some("nope")).await.is_err());

    // What the server announces, as the deliveries will use it.
    let (a, b, d) = sized_pair(35_882_577, 0).await;
    let all = d.test_connection(None).await.unwrap();
    assert_eq!(all[0].size_limit, Some(35_882_577), "{all:?}");
    assert_eq!(all[1].size_limit, None, "SIZE 0 names no limit: {all:?}");
    let unpipelined = FaultSmtp::start_with(
        Script::ok(),
        Options {
            pipelining: false,
            ..Options::default()
        },
    )
    .await;
    let d2 = by_priority(vec![relay("plain", unpipelined.port(), 1)]).await;
    assert!(!d2.test_connection(None).await.unwrap()[0].pipelining);
    drop((a, b, d, d2));
}

#[tokio::test]
async fn a_session_whose_wait_timed_out_is_dropped_not_reused() {
    let a = FaultSmtp::start(Script::ok().on_share(
        Phase::Rcpt,
        Action::Hang,
        support::fault_smtp::Share::FirstN(1),
    ))
    .await;
    let mut only = relay("a", a.port(), 1);
    only.pool.max_connections = 1;
    only.timeouts.command = Duration::from_millis(300);
    only.health.backoff_base = Duration::from_millis(1);
    only.health.backoff_max = Duration::from_millis(2);
    let d = Dispatcher::start(settings(vec![only], Strategy::Priority))
        .await
        .unwrap();
    let first = d.send(mail()).await;
    assert_eq!(first.status, Status::Failed, "{first:?}");
    assert_eq!(first.attempts[0].class, Some(FailureClass::RelayFault));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let m = mail();
    let id = m.message_id.clone();
    let second = d.send(m).await;
    assert_eq!(second.status, Status::Sent, "{second:?}");
    assert_eq!(copies(&a, &id), 1);
    assert_eq!(
        a.delivered().len(),
        1,
        "only the second message got through"
    );
    assert!(a.connections() >= 2, "the hung session was not reused");
}

/// A server that ends an idle session says 421 and closes it (Postfix's
/// `smtpd_timeout`, a server restarting). The next message on that pooled
/// connection reads the 421: it goes out on a fresh connection at once, not
/// deferred, and the relay stays healthy. With and without PIPELINING.
#[tokio::test]
async fn a_421_on_a_pooled_connection_is_retried_on_a_fresh_one() {
    for pipelining in [true, false] {
        let a = FaultSmtp::start_with(
            Script::ok().on_share(
                Phase::Mail,
                Action::reply(421, "4.4.2 idle too long, closing"),
                support::fault_smtp::Share::EveryNth(2),
            ),
            Options {
                pipelining,
                ..Options::default()
            },
        )
        .await;
        let mut only = relay("a", a.port(), 1);
        only.pool.max_connections = 1;
        let d = Dispatcher::start(settings(vec![only], Strategy::Priority))
            .await
            .unwrap();
        let first = d.send(mail()).await;
        assert_eq!(first.status, Status::Sent, "{first:?}");
        // The pooled session: its MAIL is the server's second, answered 421.
        let m = mail();
        let id = m.message_id.clone();
        let second = d.send(m).await;
        assert_eq!(
            second.status,
            Status::Sent,
            "pipelining {pipelining}: {second:?}"
        );
        assert_eq!(copies(&a, &id), 1);
        assert_eq!(a.connections(), 2, "pipelining {pipelining}");
        let status = d.status().await.unwrap();
        assert_eq!(status.relays[0].state, RelayState::Healthy, "{status:?}");
    }
}

#[tokio::test]
async fn pipelined_transactions_reach_postfix_smtp_sink_whole() {
    // smtp-sink (Postfix) offers PIPELINING: 200 concurrent messages, three
    // recipients each, over 4 connections, each read back from the sink.
    let sink = support::smtp_sink::SmtpSink::start().await;
    let mut r = relay("sink", sink.port(), 1);
    r.pool.max_connections = 4;
    let d = Dispatcher::start(settings(vec![r], Strategy::Priority))
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let d = d.clone();
        tasks.spawn(async move {
            let m = mail_to(&["a@test.example", "b@test.example", "c@test.example"]);
            let id = m.message_id.clone();
            (id, d.send(m).await)
        });
    }
    let mut ids = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (id, r) = joined.unwrap();
        assert_eq!(r.status, Status::Sent, "{r:?}");
        assert_eq!(r.accepted.len(), 3);
        ids.push(format!("<{id}>"));
    }
    let wait = Duration::from_secs(10);
    assert!(
        sink.wait_for_count(200, wait).await,
        "count {}",
        sink.count()
    );
    assert!(support::wait_until(|| sink.received().len() == 200, wait).await);
    let mut got = sink.message_ids();
    got.sort();
    ids.sort();
    assert_eq!(got, ids, "each message exactly once");
    for m in sink.received() {
        assert_eq!(
            m.rcpt_to,
            vec!["a@test.example", "b@test.example", "c@test.example"]
        );
        assert_eq!(m.mail_from, "sender@test.example");
    }
}

#[tokio::test]
async fn lines_that_start_with_a_dot_arrive_intact() {
    let a = FaultSmtp::start(Script::ok()).await;
    let d = Dispatcher::start(settings(vec![relay("a", a.port(), 1)], Strategy::Priority))
        .await
        .unwrap();
    let mut m = mail();
    let text = format!(
        ".first\r\nMessage-ID: <{}>\r\n\r\n.leading\r\n.\r\n..two\r\n...\r\nend",
        m.message_id
    );
    m.bytes = Arc::from(text.clone().into_bytes());
    let r = d.send(m).await;
    assert_eq!(r.status, Status::Sent, "{r:?}");
    let got = a.delivered();
    assert_eq!(got.len(), 1, "one message, not cut at the lone dot");
    assert_eq!(String::from_utf8_lossy(&got[0].data), format!("{text}\r\n"));
}

#[tokio::test]
async fn a_relay_asks_for_delivery_status_notifications_only_of_a_server_that_offers_them() {
    let to = vec![
        "a+tag@test.example".to_string(),
        "b@test.example".to_string(),
    ];
    for (announced, pipelining) in [(true, true), (true, false), (false, true)] {
        let a = FaultSmtp::start_with(
            Script::ok(),
            Options {
                dsn: announced,
                pipelining,
                ..Options::default()
            },
        )
        .await;
        let mut primary = relay("primary", a.port(), 10);
        if let RelayKind::Smtp(s) = &mut primary.kind {
            s.dsn = Some(Box::new(mailmux_actors::Dsn {
                notify: Some("FAILURE,DELAY".into()),
                ret: Some("HDRS".into()),
            }));
        }
        let d = by_priority(vec![primary]).await;
        let m = mail_to_all(&to);
        let id = m.message_id.clone();
        let r = d.send(m).await;
        assert_eq!(r.status, Status::Sent, "{r:?}");
        let (mail, rcpt) = (a.mail_args(), a.rcpt_args());
        if announced {
            assert!(
                mail[0].ends_with(&format!(" RET=HDRS ENVID={id}")),
                "{mail:?}"
            );
            // ORCPT is xtext: the `+` of the address as +2B.
            assert_eq!(
                rcpt,
                [
                    "TO:<a+tag@test.example> NOTIFY=FAILURE,DELAY ORCPT=rfc822;a+2Btag@test.example",
                    "TO:<b@test.example> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b@test.example",
                ],
                "pipelined {pipelining}"
            );
        } else {
            // A server that does not offer DSN is asked nothing of it.
            assert!(!mail[0].contains("ENVID"), "{mail:?}");
            assert_eq!(rcpt, ["TO:<a+tag@test.example>", "TO:<b@test.example>"]);
        }
        // A probe says whether the server offers DSN.
        let probed = d.test_connection(None).await.unwrap();
        assert_eq!(probed[0].dsn, announced, "{probed:?}");
    }

    // Postfix's smtp-sink announces DSN and takes the parameters as sent.
    let sink = support::smtp_sink::SmtpSink::start().await;
    let mut r = relay("sink", sink.port(), 1);
    if let RelayKind::Smtp(s) = &mut r.kind {
        s.dsn = Some(Box::new(mailmux_actors::Dsn {
            notify: Some("NEVER".into()),
            ret: Some("FULL".into()),
        }));
    }
    let d = by_priority(vec![r]).await;
    assert!(d.test_connection(None).await.unwrap()[0].dsn);
    let m = mail_to_all(&to);
    let id = m.message_id.clone();
    let r = d.send(m).await;
    assert_eq!(r.status, Status::Sent, "{r:?}");
    assert_eq!(r.accepted, to);
    assert!(
        support::wait_until(
            || sink.message_ids().iter().any(|m| m.contains(&id)),
            std::time::Duration::from_secs(10)
        )
        .await,
        "{:?}",
        sink.message_ids()
    );
}

/// A UTF-8 recipient's `ORCPT` is of type `utf-8`, its characters escaped
/// as RFC 6533 has them, so that the command stays ASCII and a report can
/// name the recipient as it was given.
#[tokio::test]
async fn a_utf8_recipient_gets_an_escaped_utf8_orcpt() {
    let a = FaultSmtp::start_with(
        Script::ok(),
        Options {
            dsn: true,
            ..Options::default()
        },
    )
    .await;
    let mut primary = relay("primary", a.port(), 10);
    if let RelayKind::Smtp(s) = &mut primary.kind {
        s.dsn = Some(Box::new(mailmux_actors::Dsn {
            notify: Some("FAILURE".into()),
            ret: None,
        }));
    }
    let d = by_priority(vec![primary]).await;
    let r = d
        .send(mail_to(&["用户+1@例子.example", "b@test.example"]))
        .await;
    assert_eq!(r.status, Status::Sent, "{r:?}");
    assert_eq!(
        a.rcpt_args(),
        [
            "TO:<用户+1@例子.example> NOTIFY=FAILURE ORCPT=utf-8;\\x{7528}\\x{6237}\\x{2B}1@\\x{4F8B}\\x{5B50}.example",
            "TO:<b@test.example> NOTIFY=FAILURE ORCPT=rfc822;b@test.example",
        ]
    );
}
