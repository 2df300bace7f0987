//! Self-tests of the aiosmtpd test server: lettre delivers to it in the clear and
//! over STARTTLS with AUTH, and the wrapper reads back what arrived.

mod support;

use std::time::Duration;

use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use support::aiosmtpd::{Aiosmtpd, AiosmtpdOptions};

const WAIT: Duration = Duration::from_secs(10);

fn message(id: &str, to: &[&str]) -> Message {
    let mut builder = Message::builder()
        .from("alice@a.test".parse::<Mailbox>().expect("from"))
        .message_id(Some(format!("<{id}>")))
        .subject("hello");
    for rcpt in to {
        builder = builder.to(rcpt.parse().expect("to"));
    }
    builder
        .body("line one\r\n.a line with a leading dot\r\n".to_string())
        .expect("message")
}

#[tokio::test]
async fn plain_delivery_is_stored_with_its_envelope() {
    let server = Aiosmtpd::start().await;
    let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(server.port())
        .timeout(Some(WAIT))
        .build();
    mailer
        .send(message("one@a.test", &["bob@b.test", "carol@c.test"]))
        .await
        .expect("send one");
    mailer
        .send(message("two@a.test", &["dave@d.test"]))
        .await
        .expect("send two");

    let got = server.wait_for(2, WAIT).await.expect("two messages");
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].mail_from, "alice@a.test");
    assert_eq!(got[0].rcpt_to, vec!["bob@b.test", "carol@c.test"]);
    assert_eq!(got[0].message_id.as_deref(), Some("<one@a.test>"));
    assert!(
        String::from_utf8_lossy(&got[0].data).contains("\r\n.a line with a leading dot\r\n"),
        "dot-unstuffed data"
    );
    assert_eq!(got[1].message_id.as_deref(), Some("<two@a.test>"));
    assert_eq!(server.count(), 2);
}

#[tokio::test]
async fn starttls_and_auth_are_required_and_work() {
    let options = AiosmtpdOptions {
        starttls: true,
        auth: Some(("agent".into(), "s3cret".into())),
        ..AiosmtpdOptions::default()
    };
    let server = Aiosmtpd::start_with(options).await;
    let ca_pem = server.ca_pem().expect("CA").as_bytes().to_vec();
    let tls = || {
        TlsParameters::builder("localhost".into())
            .add_root_certificate(Certificate::from_pem(&ca_pem).expect("CA pem"))
            .build()
            .expect("tls parameters")
    };

    for (id, mechanism) in [
        ("plain@a.test", Mechanism::Plain),
        ("login@a.test", Mechanism::Login),
    ] {
        let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("localhost")
            .port(server.port())
            .tls(Tls::Required(tls()))
            .credentials(Credentials::new("agent".into(), "s3cret".into()))
            .authentication(vec![mechanism])
            .timeout(Some(WAIT))
            .build();
        mailer
            .send(message(id, &["bob@b.test"]))
            .await
            .expect("send over STARTTLS with AUTH");
    }

    let wrong_password = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("localhost")
        .port(server.port())
        .tls(Tls::Required(tls()))
        .credentials(Credentials::new("agent".into(), "wrong".into()))
        .timeout(Some(WAIT))
        .build();
    assert!(
        wrong_password
            .send(message("x@a.test", &["bob@b.test"]))
            .await
            .is_err()
    );

    let cleartext = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("localhost")
        .port(server.port())
        .timeout(Some(WAIT))
        .build();
    assert!(
        cleartext
            .send(message("y@a.test", &["bob@b.test"]))
            .await
            .is_err(),
        "STARTTLS is required"
    );

    let got = server.wait_for(2, WAIT).await.expect("two messages");
    let ids: Vec<_> = got.iter().filter_map(|m| m.message_id.clone()).collect();
    assert_eq!(ids, ["<plain@a.test>", "<login@a.test>"]);
}

#[tokio::test]
async fn wait_for_times_out_and_kill_refuses_connections() {
    let mut server = Aiosmtpd::start().await;
    assert!(
        server
            .wait_for(1, Duration::from_millis(100))
            .await
            .is_none()
    );
    let addr = server.addr();
    server.kill().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
