//! Self-tests of the smtp-sink and smtp-source wrappers: lettre's messages are
//! counted and read back by Message-ID; smtp-source's load is counted.

mod support;

use std::time::Duration;

use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use support::smtp_sink::{SinkOptions, SmtpSink, SourceOptions, run_smtp_source};

const WAIT: Duration = Duration::from_secs(10);

fn message(id: &str) -> Message {
    Message::builder()
        .from("alice@a.test".parse().expect("from"))
        .to("bob@b.test".parse().expect("to"))
        .cc("carol@c.test".parse().expect("cc"))
        .message_id(Some(format!("<{id}>")))
        .subject("hello")
        .body("body line\r\n".to_string())
        .expect("message")
}

#[tokio::test]
async fn lettre_messages_are_counted_and_read_back() {
    let sink = SmtpSink::start().await;
    let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(sink.port())
        .timeout(Some(WAIT))
        .build();
    for i in 0..3 {
        mailer
            .send(message(&format!("m{i}@a.test")))
            .await
            .expect("send");
    }
    assert!(sink.wait_for_count(3, WAIT).await, "count {}", sink.count());
    assert!(
        support::wait_until(|| sink.received().len() == 3, WAIT).await,
        "three dumps"
    );
    assert_eq!(
        sink.message_ids(),
        ["<m0@a.test>", "<m1@a.test>", "<m2@a.test>"]
    );
    let first = &sink.received()[0];
    assert_eq!(first.mail_from, "alice@a.test");
    assert_eq!(first.rcpt_to, vec!["bob@b.test", "carol@c.test"]);
    let text = String::from_utf8_lossy(&first.data);
    assert!(
        text.starts_with("From: "),
        "smtp-sink's own headers are stripped: {text}"
    );
    assert!(text.contains("\n\nbody line\n"), "{text:?}");
}

#[tokio::test]
async fn smtp_source_load_is_counted_without_dumps() {
    let options = SinkOptions {
        dump: false,
        ..SinkOptions::default()
    };
    let sink = SmtpSink::start_with(options).await;
    let load = SourceOptions {
        messages: 50,
        sessions: 5,
        size: 2000,
        ..SourceOptions::default()
    };
    let elapsed = run_smtp_source(sink.addr(), &load)
        .await
        .expect("smtp-source");
    assert!(elapsed > Duration::ZERO);
    assert!(
        sink.wait_for_count(50, WAIT).await,
        "count {}",
        sink.count()
    );
    assert!(sink.received().is_empty());
}

#[tokio::test]
async fn smtp_source_reports_failure_and_kill_refuses_connections() {
    let mut sink = SmtpSink::start().await;
    let addr = sink.addr();
    sink.kill().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    let load = SourceOptions {
        messages: 1,
        sessions: 1,
        ..SourceOptions::default()
    };
    assert!(run_smtp_source(addr, &load).await.is_err());
}
