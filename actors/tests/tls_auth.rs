//! TLS and AUTH against real servers: Python's aiosmtpd with STARTTLS and AUTH
//! required, and the fault server for implicit TLS. Certificates are made in
//! the test by rcgen (a CA plus a leaf).

mod support;

use std::sync::Arc;
use std::time::Duration;

use mailmux_actors::{
    Credentials, Dispatcher, FailureClass, Limits, Mail, RelayKind, RelaySettings, RouterSettings,
    Secret, Settings, Status, Strategy, SupervisorSettings, TlsMode,
};
use support::aiosmtpd::{Aiosmtpd, AiosmtpdOptions};
use support::fault_smtp::{FaultSmtp, Options, Script, StartTls};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(10);

fn relay(
    name: &str,
    port: u16,
    tls: TlsMode,
    ca: Option<&str>,
    auth: Option<(&str, &str)>,
) -> RelaySettings {
    let mut r = RelaySettings::smtp(name, "localhost", port);
    if let RelayKind::Smtp(s) = &mut r.kind {
        s.tls = tls;
        s.ca_pem = ca.map(|c| c.as_bytes().to_vec());
        s.auth = auth.map(|(u, p)| Credentials::password(u, Secret::new(p)));
    }
    r
}

fn settings(relays: Vec<RelaySettings>) -> Settings {
    Settings {
        relays,
        router: RouterSettings {
            strategy: Strategy::Priority,
            max_attempts: 3,
        },
        supervisor: SupervisorSettings::default(),
        limits: Limits::default(),
    }
}

fn mail(n: u32) -> Mail {
    let id = format!("tls{n}.{}@test.mailmux", std::process::id());
    let bytes = format!(
        "From: a@test.example\r\nTo: b@test.example\r\nSubject: tls {n}\r\nMessage-ID: <{id}>\r\n\r\nover TLS\r\n"
    );
    Mail {
        message_id: id,
        from: Some("a@test.example".parse().unwrap()),
        to: vec![
            "b@test.example".parse().unwrap(),
            "c@test.example".parse().unwrap(),
        ],
        bytes: Arc::from(bytes.into_bytes()),
        deadline: Instant::now() + Duration::from_secs(20),
        prefer: None,
        only: None,
        priority: Default::default(),
    }
}

async fn aiosmtpd_tls_auth() -> Aiosmtpd {
    Aiosmtpd::start_with(AiosmtpdOptions {
        starttls: true,
        auth: Some(("agent".into(), "s3cret-pw".into())),
        ..AiosmtpdOptions::default()
    })
    .await
}

#[tokio::test]
async fn starttls_and_auth_deliver_to_aiosmtpd() {
    let server = aiosmtpd_tls_auth().await;
    let d = Dispatcher::start(settings(vec![relay(
        "aiosmtpd",
        server.port(),
        TlsMode::Starttls,
        server.ca_pem(),
        Some(("agent", "s3cret-pw")),
    )]))
    .await
    .unwrap();
    for n in 0..3 {
        let r = d.send(mail(n)).await;
        assert_eq!(r.status, Status::Sent, "{r:?}");
    }
    let got = server.wait_for(3, WAIT).await.expect("three messages");
    assert_eq!(got[0].mail_from, "a@test.example");
    assert_eq!(got[0].rcpt_to, vec!["b@test.example", "c@test.example"]);
    assert_eq!(
        got[0].message_id.as_deref(),
        Some(format!("<tls0.{}@test.mailmux>", std::process::id()).as_str())
    );
    let probe = d.test_connection(None).await.unwrap();
    assert!(probe[0].reachable && probe[0].tls, "{probe:?}");
    assert_eq!(probe[0].auth, Some(true));
    // One connection carried all three messages.
    let st = d.status().await.unwrap();
    assert_eq!(st.relays[0].connections, 1, "{:?}", st.relays[0]);
}

#[tokio::test]
async fn a_wrong_password_is_a_relay_fault_that_never_shows_the_password() {
    let server = aiosmtpd_tls_auth().await;
    let backup = FaultSmtp::start(Script::ok()).await;
    let mut backup_relay = RelaySettings::smtp("backup", "127.0.0.1", backup.port());
    backup_relay.priority = -1;
    let d = Dispatcher::start(settings(vec![
        relay(
            "aiosmtpd",
            server.port(),
            TlsMode::Starttls,
            server.ca_pem(),
            Some(("agent", "wrong-pw")),
        ),
        backup_relay,
    ]))
    .await
    .unwrap();
    let r = d.send(mail(10)).await;
    assert_eq!(r.status, Status::Sent);
    assert_eq!(r.relay.as_deref(), Some("backup"));
    assert_eq!(r.attempts[0].class, Some(FailureClass::RelayFault));
    assert_eq!(
        r.attempts[0].reply.as_ref().map(|r| r.code),
        Some(535),
        "{r:?}"
    );
    assert_eq!(server.count(), 0);
    let probe = d.test_connection(Some("aiosmtpd")).await.unwrap();
    assert_eq!(probe[0].auth, Some(false), "{probe:?}");
    let everything = format!("{r:?} {probe:?} {:?}", d.status().await.unwrap());
    assert!(!everything.contains("wrong-pw"), "the password leaked");
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_tls_failure() {
    let server = aiosmtpd_tls_auth().await;
    let d = Dispatcher::start(settings(vec![relay(
        "aiosmtpd",
        server.port(),
        TlsMode::Starttls,
        None,
        Some(("agent", "s3cret-pw")),
    )]))
    .await
    .unwrap();
    let r = d.send(mail(20)).await;
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.attempts[0].class, Some(FailureClass::RelayFault));
    assert!(r.attempts[0].detail.contains("TLS"), "{r:?}");
    assert_eq!(server.count(), 0);
}

#[tokio::test]
async fn implicit_tls_delivers() {
    let server = FaultSmtp::start_with(
        Script::ok(),
        Options {
            starttls: StartTls::Implicit,
            auth: Some(("agent".into(), "pw".into())),
            ..Options::default()
        },
    )
    .await;
    let d = Dispatcher::start(settings(vec![relay(
        "smtps",
        server.port(),
        TlsMode::Implicit,
        server.ca_pem(),
        Some(("agent", "pw")),
    )]))
    .await
    .unwrap();
    let r = d.send(mail(30)).await;
    assert_eq!(r.status, Status::Sent, "{r:?}");
    assert_eq!(server.delivered().len(), 1);
    let probe = d.test_connection(None).await.unwrap();
    assert!(probe[0].tls, "{probe:?}");
}

#[tokio::test]
async fn opportunistic_tls_upgrades_when_offered_and_goes_plain_when_not() {
    let tls = FaultSmtp::start_with(
        Script::ok(),
        Options {
            starttls: StartTls::On,
            ..Options::default()
        },
    )
    .await;
    let plain = FaultSmtp::start(Script::ok()).await;
    let d = Dispatcher::start(settings(vec![
        relay(
            "tls",
            tls.port(),
            TlsMode::Opportunistic,
            tls.ca_pem(),
            None,
        ),
        relay("plain", plain.port(), TlsMode::Opportunistic, None, None),
    ]))
    .await
    .unwrap();
    let probes = d.test_connection(None).await.unwrap();
    assert!(probes[0].tls && probes[0].error.is_none(), "{probes:?}");
    assert!(!probes[1].tls && probes[1].error.is_none(), "{probes:?}");
    assert_eq!(tls.verb_count("STARTTLS"), 1);
    assert_eq!(plain.verb_count("STARTTLS"), 0);
}

/// PIPELINING and SIZE, which lettre does not keep, are read from the
/// answer to lettre's own EHLO where it was heard in clear text (plain and
/// implicit TLS: one EHLO a connection), and asked again after STARTTLS,
/// where lettre asks inside TLS. Either way both are honoured: a message
/// that fits is pipelined, one over SIZE gets no MAIL.
#[tokio::test]
async fn the_ehlo_keywords_are_read_from_lettres_ehlo_unless_tls_began_after_it() {
    for (starttls, mode, ehlos) in [
        (StartTls::Off, TlsMode::None, 1),
        (StartTls::Implicit, TlsMode::Implicit, 1),
        (StartTls::On, TlsMode::Starttls, 3),
    ] {
        let server = FaultSmtp::start_with(
            Script::ok(),
            Options {
                starttls,
                size: Some(2_000),
                ..Options::default()
            },
        )
        .await;
        let d = Dispatcher::start(settings(vec![relay(
            "r",
            server.port(),
            mode,
            server.ca_pem(),
            None,
        )]))
        .await
        .unwrap();
        let r = d.send(mail(40)).await;
        assert_eq!(r.status, Status::Sent, "{mode:?}: {r:?}");
        assert_eq!(server.pipelined(), 1, "{mode:?}: PIPELINING was read");
        let mut large = mail(41);
        large.bytes = Arc::from(vec![b'x'; 5_000]);
        let r = d.send(large).await;
        assert_eq!(r.status, Status::Failed, "{mode:?}: {r:?}");
        assert_eq!(
            r.attempts[0].class,
            Some(FailureClass::Unsupported),
            "{r:?}"
        );
        assert_eq!(
            server.commands(support::fault_smtp::Phase::Mail),
            1,
            "{mode:?}"
        );
        assert_eq!(server.connections(), 1, "{mode:?}");
        assert_eq!(
            server.verb_count("EHLO"),
            ehlos,
            "{mode:?}: EHLOs a connection"
        );
    }
}
