//! Self-tests of the fault-injecting SMTP test server, driven by hand-written SMTP
//! over a raw TCP stream (and by lettre for STARTTLS and AUTH), so that the tests
//! built on it can trust what it does.

mod support;

use std::time::Duration;

use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use support::fault_smtp::{Action, AfterDot, FaultSmtp, Options, Phase, Script, Share, StartTls};

const SHORT: Duration = Duration::from_millis(300);
const LONG: Duration = Duration::from_secs(5);

/// A hand-driven SMTP client.
struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Client {
    async fn connect(server: &FaultSmtp) -> Self {
        let stream = TcpStream::connect(server.addr()).await.expect("connect");
        let (r, w) = stream.into_split();
        Client {
            reader: BufReader::new(r),
            writer: w,
        }
    }

    /// Connects and reads the greeting, expecting a 220.
    async fn ready(server: &FaultSmtp) -> Self {
        let mut c = Self::connect(server).await;
        assert_eq!(c.reply().await.0, 220);
        c
    }

    async fn send(&mut self, raw: &str) {
        self.writer.write_all(raw.as_bytes()).await.expect("write");
    }

    /// One reply (all its lines): the code and the text of the last line.
    async fn reply(&mut self) -> (u16, String) {
        self.try_reply(LONG).await.expect("a reply in time")
    }

    /// `None` if no complete reply came within `timeout`; code 0 on end of stream.
    async fn try_reply(&mut self, timeout: Duration) -> Option<(u16, String)> {
        tokio::time::timeout(timeout, async {
            loop {
                let mut line = String::new();
                if self.reader.read_line(&mut line).await.expect("read") == 0 {
                    return (0, String::new());
                }
                let code = line.get(..3).and_then(|c| c.parse().ok()).expect("code");
                if line.as_bytes().get(3) != Some(&b'-') {
                    return (code, line.get(4..).unwrap_or("").trim_end().to_string());
                }
            }
        })
        .await
        .ok()
    }

    async fn cmd(&mut self, line: &str) -> u16 {
        self.send(&format!("{line}\r\n")).await;
        self.reply().await.0
    }

    /// Whether the server closed the connection (end of stream within `LONG`).
    async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(LONG, self.reader.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    /// EHLO, MAIL, one RCPT, DATA: returns the codes of MAIL, RCPT and DATA.
    async fn begin(&mut self, to: &str) -> (u16, u16, u16) {
        assert_eq!(self.cmd("EHLO client.test").await, 250);
        let mail = self.cmd("MAIL FROM:<alice@a.test>").await;
        let rcpt = self.cmd(&format!("RCPT TO:<{to}>")).await;
        let data = self.cmd("DATA").await;
        (mail, rcpt, data)
    }

    /// Sends a message body after a 354 and returns the reply code after the dot.
    async fn body(&mut self, id: &str) -> u16 {
        self.send(&format!(
            "Message-ID: <{id}>\r\nSubject: t\r\n\r\nhello\r\n.\r\n"
        ))
        .await;
        self.reply().await.0
    }
}

#[tokio::test]
async fn a_normal_transaction_is_recorded_unstuffed_with_its_message_id() {
    let server = FaultSmtp::start(Script::ok()).await;
    let mut c = Client::ready(&server).await;
    // Everything in one write, as a pipelining client would send it.
    c.send(
        "EHLO client.test\r\nMAIL FROM:<alice@a.test> BODY=8BITMIME\r\n\
         RCPT TO:<bob@b.test>\r\nRCPT TO:<carol@b.test>\r\nDATA\r\n",
    )
    .await;
    let ehlo_reply = c.reply().await;
    assert_eq!(ehlo_reply.0, 250);
    for _ in 0..3 {
        assert_eq!(c.reply().await.0, 250);
    }
    assert_eq!(c.reply().await.0, 354);
    c.send(
        "Message-ID:\r\n <id-1@a.test>\r\nSubject: dots\r\n\r\n..leading dot\r\n.\
         .\r\nend\r\n.\r\nNOOP\r\n",
    )
    .await;
    assert_eq!(c.reply().await.0, 250);
    assert_eq!(c.reply().await.0, 250, "NOOP after the data");
    assert_eq!(c.cmd("QUIT").await, 221);

    let got = server.delivered();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].mail_from, "alice@a.test");
    assert_eq!(got[0].rcpt_to, vec!["bob@b.test", "carol@b.test"]);
    assert_eq!(got[0].message_id.as_deref(), Some("<id-1@a.test>"));
    assert_eq!(
        got[0].data,
        b"Message-ID:\r\n <id-1@a.test>\r\nSubject: dots\r\n\r\n.leading dot\r\n.\r\nend\r\n"
    );
    assert_eq!(server.commands(Phase::AfterDot), 1);
    assert_eq!(server.commands(Phase::Rcpt), 2);
    assert_eq!(server.verb_count("noop"), 1);
}

#[tokio::test]
async fn ehlo_advertises_extensions_per_options() {
    let server = FaultSmtp::start(Script::ok()).await;
    let mut c = Client::ready(&server).await;
    c.send("EHLO x\r\n").await;
    let mut lines = String::new();
    loop {
        let mut line = String::new();
        c.reader.read_line(&mut line).await.expect("read");
        lines.push_str(&line);
        if line.as_bytes().get(3) == Some(&b' ') {
            break;
        }
    }
    assert!(lines.contains("SMTPUTF8") && lines.contains("8BITMIME"));
    assert!(lines.contains("PIPELINING"));
    assert!(!lines.contains("AUTH") && !lines.contains("STARTTLS"));

    let options = Options {
        smtputf8: false,
        eightbitmime: false,
        pipelining: false,
        ..Options::default()
    };
    let plain = FaultSmtp::start_with(Script::ok(), options).await;
    let mut c = Client::ready(&plain).await;
    c.send("EHLO x\r\n").await;
    let mut line = String::new();
    c.reader.read_line(&mut line).await.expect("read");
    assert!(line.starts_with("250-"));
    line.clear();
    c.reader.read_line(&mut line).await.expect("read");
    assert!(
        !line.contains("SMTPUTF8") && !line.contains("8BITMIME") && !line.contains("PIPELINING")
    );
    assert_eq!(c.cmd("MAIL FROM:<jörg@a.test>").await, 553);
    assert_eq!(c.cmd("MAIL FROM:<a@a.test> SMTPUTF8").await, 553);
}

#[tokio::test]
async fn each_phase_replies_with_the_scripted_code() {
    let cases = [
        (Phase::Ehlo, 421),
        (Phase::Mail, 451),
        (Phase::Mail, 550),
        (Phase::Rcpt, 452),
        (Phase::Rcpt, 550),
        (Phase::Data, 451),
        (Phase::Data, 554),
        (Phase::AfterDot, 451),
        (Phase::AfterDot, 554),
    ];
    for (phase, code) in cases {
        let server = FaultSmtp::start(Script::ok().on(phase, Action::reply(code, "no"))).await;
        let mut c = Client::ready(&server).await;
        let got = match phase {
            Phase::Ehlo => c.cmd("EHLO x").await,
            Phase::Mail => c.begin("bob@b.test").await.0,
            Phase::Rcpt => c.begin("bob@b.test").await.1,
            Phase::Data => c.begin("bob@b.test").await.2,
            _ => {
                assert_eq!(c.begin("bob@b.test").await, (250, 250, 354));
                c.body("m@a.test").await
            }
        };
        assert_eq!(got, code, "{phase:?}");
        let recorded = server.received();
        if phase == Phase::AfterDot {
            assert_eq!(recorded.len(), 1);
            assert_eq!(recorded[0].outcome, AfterDot::Replied(code));
            assert!(server.delivered().is_empty());
        } else {
            assert!(recorded.is_empty(), "{phase:?}");
        }
    }
}

#[tokio::test]
async fn a_faulty_greeting_refuses_service_and_421_closes() {
    let server =
        FaultSmtp::start(Script::ok().on(Phase::Greeting, Action::reply(554, "go away"))).await;
    let mut c = Client::connect(&server).await;
    assert_eq!(c.reply().await.0, 554);
    assert_eq!(c.cmd("EHLO x").await, 503);
    assert_eq!(c.cmd("QUIT").await, 221);

    server.set_script(Script::ok().on(Phase::Greeting, Action::reply(421, "busy")));
    let mut c = Client::connect(&server).await;
    assert_eq!(c.reply().await.0, 421);
    assert!(c.closed().await);
}

#[tokio::test]
async fn rcpt_faults_apply_per_recipient() {
    let script = Script::ok()
        .on_rcpt("Bob@B.test", Action::reply(550, "no such user"))
        .on_rcpt("busy@b.test", Action::reply(451, "try later"));
    let server = FaultSmtp::start(script).await;
    let mut c = Client::ready(&server).await;
    assert_eq!(c.cmd("EHLO x").await, 250);
    assert_eq!(c.cmd("MAIL FROM:<>").await, 250);
    assert_eq!(c.cmd("RCPT TO:<bob@b.test>").await, 550);
    assert_eq!(c.cmd("RCPT TO:<busy@b.test>").await, 451);
    assert_eq!(c.cmd("RCPT TO:<carol@b.test>").await, 250);
    assert_eq!(c.cmd("DATA").await, 354);
    assert_eq!(c.body("r@a.test").await, 250);
    let got = server.delivered();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].mail_from, "");
    assert_eq!(got[0].rcpt_to, vec!["carol@b.test"]);
}

#[tokio::test]
async fn data_without_accepted_recipients_is_refused() {
    let server = FaultSmtp::start(Script::ok().on(Phase::Rcpt, Action::reply(550, "no"))).await;
    let mut c = Client::ready(&server).await;
    assert_eq!(c.begin("bob@b.test").await, (250, 550, 554));
    assert_eq!(server.commands(Phase::Data), 0);
}

#[tokio::test]
async fn hang_never_answers_but_keeps_the_socket_open() {
    let server = FaultSmtp::start(Script::ok().on(Phase::Mail, Action::Hang)).await;
    let mut c = Client::ready(&server).await;
    assert_eq!(c.cmd("EHLO x").await, 250);
    c.send("MAIL FROM:<a@a.test>\r\n").await;
    assert_eq!(c.try_reply(SHORT).await, None, "no answer while hanging");
    assert_eq!(server.open_connections(), 1);
    drop(c);
    assert!(support::wait_until(|| server.open_connections() == 0, LONG).await);

    let server = FaultSmtp::start(Script::ok().on(Phase::Greeting, Action::Hang)).await;
    let mut c = Client::connect(&server).await;
    assert_eq!(c.try_reply(SHORT).await, None, "no greeting");
}

#[tokio::test]
async fn close_after_the_dot_records_the_message_as_closed() {
    let server = FaultSmtp::start(Script::ok().on(Phase::AfterDot, Action::Close)).await;
    let mut c = Client::ready(&server).await;
    assert_eq!(c.begin("bob@b.test").await, (250, 250, 354));
    c.send("Message-ID: <lost@a.test>\r\n\r\nbody\r\n.\r\n")
        .await;
    assert!(c.closed().await);
    let got = server.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].outcome, AfterDot::Closed);
    assert_eq!(got[0].message_id.as_deref(), Some("<lost@a.test>"));
    assert!(server.delivered().is_empty());

    server.set_script(Script::ok().on(Phase::AfterDot, Action::Hang));
    let mut c = Client::ready(&server).await;
    assert_eq!(c.begin("bob@b.test").await, (250, 250, 354));
    c.send("Message-ID: <hung@a.test>\r\n\r\nbody\r\n.\r\n")
        .await;
    assert_eq!(c.try_reply(SHORT).await, None);
    assert_eq!(server.received()[1].outcome, AfterDot::Hung);
}

#[tokio::test]
async fn every_nth_storm_faults_only_its_share() {
    let script = Script::ok().on_share(
        Phase::AfterDot,
        Action::reply(451, "storm"),
        Share::EveryNth(3),
    );
    let server = FaultSmtp::start(script).await;
    let mut c = Client::ready(&server).await;
    assert_eq!(c.cmd("EHLO x").await, 250);
    let mut codes = Vec::new();
    for i in 0..9 {
        assert_eq!(c.cmd("MAIL FROM:<a@a.test>").await, 250);
        assert_eq!(c.cmd("RCPT TO:<b@b.test>").await, 250);
        assert_eq!(c.cmd("DATA").await, 354);
        codes.push(c.body(&format!("{i}@a.test")).await);
    }
    assert_eq!(codes, [250, 250, 451, 250, 250, 451, 250, 250, 451]);
    assert_eq!(server.received().len(), 9);
    assert_eq!(server.delivered().len(), 6);
}

#[tokio::test]
async fn first_n_storm_passes_and_set_script_recovers() {
    let script = Script::ok().on_share(
        Phase::Greeting,
        Action::reply(421, "storm"),
        Share::FirstN(2),
    );
    let server = FaultSmtp::start(script).await;
    let mut greetings = Vec::new();
    for _ in 0..4 {
        let mut c = Client::connect(&server).await;
        greetings.push(c.reply().await.0);
    }
    assert_eq!(greetings, [421, 421, 220, 220]);

    server.set_script(Script::ok().on(Phase::Mail, Action::reply(451, "down")));
    let mut c = Client::ready(&server).await;
    assert_eq!(c.begin("b@b.test").await.0, 451);
    server.set_script(Script::ok());
    // The open connection follows the new script too.
    assert_eq!(c.cmd("MAIL FROM:<a@a.test>").await, 250);
}

#[tokio::test]
async fn rset_noop_and_repeated_ehlo_reset_the_transaction() {
    let server = FaultSmtp::start(Script::ok()).await;
    let mut c = Client::ready(&server).await;
    assert_eq!(c.cmd("RCPT TO:<b@b.test>").await, 503, "RCPT before MAIL");
    assert_eq!(c.cmd("MAIL FROM:<a@a.test>").await, 503, "MAIL before EHLO");
    assert_eq!(c.cmd("HELO x").await, 250);
    assert_eq!(c.cmd("MAIL FROM:<a@a.test>").await, 250);
    assert_eq!(c.cmd("MAIL FROM:<a@a.test>").await, 503, "nested MAIL");
    assert_eq!(c.cmd("RSET").await, 250);
    assert_eq!(c.cmd("MAIL FROM:<a@a.test>").await, 250);
    assert_eq!(c.cmd("EHLO again").await, 250);
    assert_eq!(c.cmd("DATA").await, 503, "EHLO dropped the transaction");
    assert_eq!(c.cmd("NOOP").await, 250);
    assert_eq!(c.cmd("BOGUS").await, 500);
    assert_eq!(server.commands(Phase::Ehlo), 2);
    assert_eq!(server.verb_count("RSET"), 1);
}

#[tokio::test]
async fn auth_plain_and_login_check_credentials() {
    let options = Options {
        auth: Some(("user".into(), "secret".into())),
        ..Options::default()
    };
    let server = FaultSmtp::start_with(Script::ok(), options).await;
    let mut c = Client::ready(&server).await;
    assert_eq!(c.cmd("EHLO x").await, 250);
    assert_eq!(c.cmd("MAIL FROM:<a@a.test>").await, 530);
    // "\0user\0wrong" and "\0user\0secret".
    assert_eq!(c.cmd("AUTH PLAIN AHVzZXIAd3Jvbmc=").await, 535);
    assert_eq!(c.cmd("AUTH PLAIN AHVzZXIAc2VjcmV0").await, 235);
    assert_eq!(c.cmd("MAIL FROM:<a@a.test>").await, 250);

    let mut c = Client::ready(&server).await;
    assert_eq!(c.cmd("EHLO x").await, 250);
    assert_eq!(c.cmd("AUTH LOGIN").await, 334);
    assert_eq!(c.cmd("dXNlcg==").await, 334);
    assert_eq!(c.cmd("c2VjcmV0").await, 235);

    server.set_script(Script::ok().on(Phase::Auth, Action::reply(454, "temp")));
    let mut c = Client::ready(&server).await;
    assert_eq!(c.cmd("EHLO x").await, 250);
    assert_eq!(c.cmd("AUTH PLAIN AHVzZXIAc2VjcmV0").await, 454);
}

#[tokio::test]
async fn concurrent_connections_are_counted() {
    let server = FaultSmtp::start(Script::ok()).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(Client::ready(&server).await);
    }
    assert_eq!(server.open_connections(), 5);
    assert_eq!(server.max_concurrent_connections(), 5);
    drop(clients);
    assert!(support::wait_until(|| server.open_connections() == 0, LONG).await);
    let _again = Client::ready(&server).await;
    assert_eq!(server.connections(), 6);
    assert_eq!(server.max_concurrent_connections(), 5);
    assert_eq!(server.commands(Phase::Greeting), 6);
}

#[tokio::test]
async fn kill_drops_connections_and_refuses_new_ones() {
    let server = FaultSmtp::start(Script::ok().on(Phase::Mail, Action::Hang)).await;
    let mut a = Client::ready(&server).await;
    let mut b = Client::ready(&server).await;
    assert_eq!(b.cmd("EHLO x").await, 250);
    b.send("MAIL FROM:<a@a.test>\r\n").await;
    server.kill().await;
    assert!(a.closed().await);
    assert!(b.closed().await);
    assert_eq!(server.open_connections(), 0);
    assert!(TcpStream::connect(server.addr()).await.is_err());
}

fn message(id: &str) -> Message {
    Message::builder()
        .from("alice@a.test".parse().expect("from"))
        .to("bob@b.test".parse().expect("to"))
        .message_id(Some(format!("<{id}>")))
        .subject("hi")
        .body("hello\r\n.line with a dot\r\n".to_string())
        .expect("message")
}

#[tokio::test]
async fn lettre_delivers_over_starttls_with_auth() {
    let options = Options {
        auth: Some(("user".into(), "secret".into())),
        starttls: StartTls::On,
        ..Options::default()
    };
    let server = FaultSmtp::start_with(Script::ok(), options).await;
    let ca = Certificate::from_pem(server.ca_pem().expect("CA").as_bytes()).expect("CA pem");
    let tls = TlsParameters::builder("localhost".into())
        .add_root_certificate(ca)
        .build()
        .expect("tls parameters");
    let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("localhost")
        .port(server.port())
        .tls(Tls::Required(tls))
        .credentials(Credentials::new("user".into(), "secret".into()))
        .timeout(Some(LONG))
        .build();
    mailer.send(message("tls@a.test")).await.expect("send");
    let got = server.delivered();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message_id.as_deref(), Some("<tls@a.test>"));
    assert!(String::from_utf8_lossy(&got[0].data).contains("\r\n.line with a dot"));
    assert_eq!(server.verb_count("STARTTLS"), 1);
}

#[tokio::test]
async fn broken_starttls_fails_the_handshake() {
    let options = Options {
        starttls: StartTls::Broken,
        ..Options::default()
    };
    let server = FaultSmtp::start_with(Script::ok(), options).await;
    let tls = TlsParameters::new("localhost".into()).expect("tls parameters");
    let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("localhost")
        .port(server.port())
        .tls(Tls::Required(tls))
        .timeout(Some(LONG))
        .build();
    assert!(mailer.send(message("broken@a.test")).await.is_err());
    assert!(server.received().is_empty());
}
