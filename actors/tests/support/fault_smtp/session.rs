//! One SMTP session of the fault-injecting server: the command loop, the STARTTLS
//! upgrade, SASL PLAIN/LOGIN and the DATA reader. It asks the server's script what
//! to answer and records what it received; it owns no state beyond its connection.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::{Action, AfterDot, OpenGuard, Phase, Received, Shared, StartTls, lock};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Conn = BufReader<Box<dyn Io>>;

/// Why a session stops reading commands.
enum End {
    /// The client left, or the script said Close.
    Closed,
    /// The script said Hang.
    Hang,
}

/// The state of one SMTP session.
struct Session {
    shared: Arc<Shared>,
    /// Dropped at QUIT: a client that said QUIT has let go of the connection,
    /// whenever the socket itself closes.
    open: Option<OpenGuard>,
    greeted: bool,
    authenticated: bool,
    tls_active: bool,
    mail_from: Option<String>,
    rcpt_to: Vec<String>,
    /// MAIL commands taken on this session.
    transactions: usize,
}

pub(super) async fn serve(stream: TcpStream, open: OpenGuard) {
    let _ = stream.set_nodelay(true);
    let implicit = match (open.0.options.starttls, &open.0.tls) {
        (StartTls::Implicit, Some(acceptor)) => Some(acceptor.clone()),
        _ => None,
    };
    let mut conn: Conn = match implicit {
        Some(acceptor) => match acceptor.accept(stream).await {
            Ok(tls) => BufReader::new(Box::new(tls)),
            Err(_) => return,
        },
        None => BufReader::new(Box::new(stream)),
    };
    let implicit_active = open.0.options.starttls == StartTls::Implicit;
    let mut s = Session {
        shared: open.0.clone(),
        open: Some(open),
        greeted: false,
        authenticated: false,
        tls_active: implicit_active,
        mail_from: None,
        rcpt_to: Vec::new(),
        transactions: 0,
    };
    let end = match s.run(&mut conn).await {
        Ok(end) => end,
        Err(_) => End::Closed,
    };
    if let End::Hang = end {
        let mut sink = [0u8; 4096];
        while let Ok(n) = conn.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    }
}

/// The result of one step: keep going, or stop the session.
type Step = std::io::Result<Option<End>>;

impl Session {
    async fn run(&mut self, conn: &mut Conn) -> std::io::Result<End> {
        let greeting = self.decide(Phase::Greeting, None).await;
        let rejected = match greeting {
            Action::Ok => {
                let host = &self.shared.options.hostname;
                send(conn, &format!("220 {host} ESMTP fault-smtp")).await?;
                false
            }
            other => {
                if let Some(end) = self.fault(conn, other).await? {
                    return Ok(end);
                }
                true
            }
        };
        loop {
            let Some(line) = read_line(conn).await? else {
                return Ok(End::Closed);
            };
            let (verb, arg) = split_command(&line);
            self.shared.count_verb(&verb);
            if verb == "MAIL" && !conn.buffer().is_empty() {
                self.shared.pipelined.fetch_add(1, Ordering::SeqCst);
            }
            if rejected && verb != "QUIT" {
                send(conn, "503 5.5.1 No service").await?;
                continue;
            }
            let step = match verb.as_str() {
                "EHLO" | "HELO" => self.ehlo(conn, verb == "EHLO").await,
                "STARTTLS" => self.starttls(conn).await,
                "AUTH" => self.auth(conn, arg).await,
                "MAIL" => self.mail(conn, arg).await,
                "RCPT" => self.rcpt(conn, arg).await,
                "DATA" => self.data(conn).await,
                "RSET" => {
                    self.reset();
                    send(conn, "250 2.0.0 Ok").await.map(|_| None)
                }
                "NOOP" => send(conn, "250 2.0.0 Ok").await.map(|_| None),
                "VRFY" => send(conn, "252 2.0.0 Cannot verify").await.map(|_| None),
                "QUIT" => {
                    self.open = None;
                    send(conn, "221 2.0.0 Bye").await?;
                    return Ok(End::Closed);
                }
                _ => send(conn, "500 5.5.2 Unknown command").await.map(|_| None),
            };
            if let Some(end) = step? {
                return Ok(end);
            }
        }
    }

    /// Carries out a non-Ok action; `Some` when the session must stop.
    async fn fault(&mut self, conn: &mut Conn, action: Action) -> Step {
        match action {
            Action::Ok | Action::Pause(_) => Ok(None),
            Action::Reply(code, text) => {
                send(conn, &format!("{code} {text}")).await?;
                Ok((code == 421).then_some(End::Closed))
            }
            Action::Hang => Ok(Some(End::Hang)),
            Action::Close => Ok(Some(End::Closed)),
            Action::Flood => {
                let chunk = vec![b'x'; 64 * 1024];
                conn.write_all(b"250-").await?;
                while conn.write_all(&chunk).await.is_ok() {}
                Ok(Some(End::Closed))
            }
        }
    }

    /// What the script says to do at `phase`; a pause is waited out here
    /// and then answered as `Ok`.
    async fn decide(&self, phase: Phase, rcpt: Option<&str>) -> Action {
        match self.shared.decide(phase, rcpt) {
            Action::Pause(d) => {
                tokio::time::sleep(d).await;
                Action::Ok
            }
            action => action,
        }
    }

    fn reset(&mut self) {
        self.mail_from = None;
        self.rcpt_to.clear();
    }

    async fn ehlo(&mut self, conn: &mut Conn, extended: bool) -> Step {
        let action = self.decide(Phase::Ehlo, None).await;
        if action != Action::Ok {
            return self.fault(conn, action).await;
        }
        self.greeted = true;
        self.reset();
        let opts = &self.shared.options;
        if !extended {
            return send(conn, &format!("250 {}", opts.hostname))
                .await
                .map(|_| None);
        }
        let mut lines = vec![opts.hostname.clone()];
        if opts.eightbitmime {
            lines.push("8BITMIME".into());
        }
        if opts.smtputf8 {
            lines.push("SMTPUTF8".into());
        }
        if opts.pipelining {
            lines.push("PIPELINING".into());
        }
        if let Some(n) = opts.size {
            lines.push(format!("SIZE {n}"));
        }
        if opts.dsn {
            lines.push("DSN".into());
        }
        if opts.announce_limits {
            let limits: Vec<String> = [
                ("RCPTMAX", opts.max_recipients),
                ("RCPTDOMAINMAX", opts.max_domains),
                ("MAILMAX", opts.max_transactions),
            ]
            .into_iter()
            .filter_map(|(name, n)| Some(format!("{name}={}", n?)))
            .collect();
            if !limits.is_empty() {
                lines.push(format!("LIMITS {}", limits.join(" ")));
            }
        }
        if opts.starttls != StartTls::Off && !self.tls_active {
            lines.push("STARTTLS".into());
        }
        match (opts.auth.is_some(), opts.xoauth2_user.is_some()) {
            (true, true) => lines.push("AUTH PLAIN LOGIN XOAUTH2".into()),
            (true, false) => lines.push("AUTH PLAIN LOGIN".into()),
            (false, true) => lines.push("AUTH XOAUTH2".into()),
            (false, false) => {}
        }
        lines.push("ENHANCEDSTATUSCODES".into());
        let last = lines.len() - 1;
        let reply: Vec<String> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
            .collect();
        send(conn, &reply.join("\r\n")).await.map(|_| None)
    }

    async fn starttls(&mut self, conn: &mut Conn) -> Step {
        let acceptor = match (self.shared.options.starttls, &self.shared.tls) {
            (StartTls::On, Some(acceptor)) if !self.tls_active => acceptor.clone(),
            (StartTls::Broken, _) => {
                send(conn, "220 2.0.0 Ready to start TLS").await?;
                conn.write_all(b"this is not a TLS handshake\r\n").await?;
                conn.flush().await?;
                return Ok(Some(End::Closed));
            }
            _ => {
                return send(conn, "502 5.5.1 STARTTLS not available")
                    .await
                    .map(|_| None);
            }
        };
        send(conn, "220 2.0.0 Ready to start TLS").await?;
        // The client waits for the 220 before its handshake, so nothing is buffered.
        let plain = std::mem::replace(conn, BufReader::new(Box::new(tokio::io::empty())));
        let tls = acceptor.accept(plain.into_inner()).await?;
        *conn = BufReader::new(Box::new(tls));
        self.tls_active = true;
        self.greeted = false;
        self.authenticated = false;
        self.reset();
        Ok(None)
    }

    async fn auth(&mut self, conn: &mut Conn, arg: &str) -> Step {
        if arg
            .split_whitespace()
            .next()
            .map(str::to_ascii_uppercase)
            .as_deref()
            == Some("XOAUTH2")
            && self.shared.options.xoauth2_user.is_some()
        {
            return self.xoauth2(conn, arg).await;
        }
        let Some((user, pass)) = self.shared.options.auth.clone() else {
            return send(conn, "502 5.5.1 AUTH not available")
                .await
                .map(|_| None);
        };
        let action = self.decide(Phase::Auth, None).await;
        if action != Action::Ok {
            return self.fault(conn, action).await;
        }
        let mut words = arg.split_whitespace();
        let mechanism = words.next().unwrap_or("").to_ascii_uppercase();
        let initial = words.next().map(str::to_string);
        let given = match mechanism.as_str() {
            "PLAIN" => {
                let response = match initial {
                    Some(r) => r,
                    None => match self.challenge(conn, "").await? {
                        Some(r) => r,
                        None => return Ok(Some(End::Closed)),
                    },
                };
                decode_base64(&response).and_then(|raw| {
                    let mut parts = raw.split(|b| *b == 0).skip(1);
                    let u = String::from_utf8(parts.next()?.to_vec()).ok()?;
                    let p = String::from_utf8(parts.next()?.to_vec()).ok()?;
                    Some((u, p))
                })
            }
            "LOGIN" => {
                let u = match initial {
                    Some(r) => Some(r),
                    None => self.challenge(conn, "VXNlcm5hbWU6").await?,
                };
                let Some(u) = u else {
                    return Ok(Some(End::Closed));
                };
                let Some(p) = self.challenge(conn, "UGFzc3dvcmQ6").await? else {
                    return Ok(Some(End::Closed));
                };
                decode_utf8(&u).zip(decode_utf8(&p))
            }
            _ => {
                return send(conn, "504 5.5.4 Unrecognized authentication type")
                    .await
                    .map(|_| None);
            }
        };
        if given == Some((user, pass)) {
            self.authenticated = true;
            send(conn, "235 2.7.0 Authentication successful").await?;
        } else {
            send(conn, "535 5.7.8 Authentication credentials invalid").await?;
        }
        Ok(None)
    }

    /// `AUTH XOAUTH2 <base64 of "user=U^Aauth=Bearer T^A^A">`.
    async fn xoauth2(&mut self, conn: &mut Conn, arg: &str) -> Step {
        let action = self.decide(Phase::Auth, None).await;
        if action != Action::Ok {
            return self.fault(conn, action).await;
        }
        let initial = match arg.split_whitespace().nth(1) {
            Some(r) => r.to_string(),
            None => match self.challenge(conn, "").await? {
                Some(r) => r,
                None => return Ok(Some(End::Closed)),
            },
        };
        let parsed = decode_utf8(&initial).and_then(|raw| {
            let mut user = None;
            let mut token = None;
            for field in raw.split('\x01') {
                if let Some(u) = field.strip_prefix("user=") {
                    user = Some(u.to_string());
                } else if let Some(t) = field.strip_prefix("auth=Bearer ") {
                    token = Some(t.to_string());
                }
            }
            Some((user?, token?))
        });
        let expected = self.shared.options.xoauth2_user.clone();
        let ok = {
            let mut tokens = lock(&self.shared.tokens);
            if let Some((_, t)) = &parsed {
                tokens.1.push(t.clone());
            }
            parsed
                .as_ref()
                .is_some_and(|(u, t)| Some(u) == expected.as_ref() && tokens.0.contains(t))
        };
        if ok {
            self.authenticated = true;
            send(conn, "235 2.7.0 Accepted").await?;
            return Ok(None);
        }
        // Gmail's way: the error as a JSON challenge, then 535.
        let error = "eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==";
        if self.challenge(conn, error).await?.is_none() {
            return Ok(Some(End::Closed));
        }
        send(conn, "535 5.7.8 Username and Password not accepted").await?;
        Ok(None)
    }

    /// Sends a 334 challenge and returns the client's answer (`None` if it left).
    async fn challenge(&mut self, conn: &mut Conn, text: &str) -> std::io::Result<Option<String>> {
        send(conn, &format!("334 {text}")).await?;
        read_line(conn).await
    }

    async fn mail(&mut self, conn: &mut Conn, arg: &str) -> Step {
        lock(&self.shared.mail_args).push(arg.to_string());
        let Some(from) = address(arg, "FROM:") else {
            return send(conn, "501 5.5.4 Syntax: MAIL FROM:<address>")
                .await
                .map(|_| None);
        };
        if !self.greeted {
            return send(conn, "503 5.5.1 Send EHLO first").await.map(|_| None);
        }
        if self.shared.options.auth.is_some() && !self.authenticated {
            return send(conn, "530 5.7.0 Authentication required")
                .await
                .map(|_| None);
        }
        if self.mail_from.is_some() {
            return send(conn, "503 5.5.1 Nested MAIL command")
                .await
                .map(|_| None);
        }
        if !self.shared.options.smtputf8
            && (!from.is_ascii() || arg.to_ascii_uppercase().contains("SMTPUTF8"))
        {
            return send(conn, "553 5.6.7 SMTPUTF8 not supported")
                .await
                .map(|_| None);
        }
        let announced = self.shared.options.size.filter(|&n| n > 0);
        let declared = arg.split_whitespace().find_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.eq_ignore_ascii_case("SIZE")
                .then(|| v.parse::<u64>().ok())?
        });
        if let (Some(max), Some(size)) = (announced, declared)
            && size > max
        {
            return send(conn, "552 5.3.4 Message size exceeds fixed limit")
                .await
                .map(|_| None);
        }
        if self
            .shared
            .options
            .max_transactions
            .is_some_and(|max| self.transactions >= max)
        {
            self.shared.over_cap.fetch_add(1, Ordering::SeqCst);
            return send(conn, "451 4.5.3 Too many transactions")
                .await
                .map(|_| None);
        }
        let action = self.decide(Phase::Mail, None).await;
        if action != Action::Ok {
            return self.fault(conn, action).await;
        }
        self.transactions += 1;
        self.mail_from = Some(from);
        send(conn, "250 2.1.0 Ok").await.map(|_| None)
    }

    async fn rcpt(&mut self, conn: &mut Conn, arg: &str) -> Step {
        lock(&self.shared.rcpt_args).push(arg.to_string());
        let Some(to) = address(arg, "TO:") else {
            return send(conn, "501 5.5.4 Syntax: RCPT TO:<address>")
                .await
                .map(|_| None);
        };
        if self.mail_from.is_none() {
            return send(conn, "503 5.5.1 Need MAIL first").await.map(|_| None);
        }
        if !self.shared.options.smtputf8 && !to.is_ascii() {
            return send(conn, "553 5.6.7 SMTPUTF8 not supported")
                .await
                .map(|_| None);
        }
        let domain = |a: &str| a.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase());
        let domains: std::collections::HashSet<_> =
            self.rcpt_to.iter().filter_map(|a| domain(a)).collect();
        let new_domain = domain(&to).is_some_and(|d| !domains.contains(&d));
        let opts = &self.shared.options;
        if opts
            .max_recipients
            .is_some_and(|max| self.rcpt_to.len() >= max)
            || opts
                .max_domains
                .is_some_and(|max| new_domain && domains.len() >= max)
        {
            self.shared.over_cap.fetch_add(1, Ordering::SeqCst);
            let reply = self.shared.options.over_cap_reply.as_deref();
            return send(
                conn,
                reply.unwrap_or("452 4.5.3 Error: too many recipients"),
            )
            .await
            .map(|_| None);
        }
        let action = self.decide(Phase::Rcpt, Some(&to)).await;
        if action != Action::Ok {
            return self.fault(conn, action).await;
        }
        self.rcpt_to.push(to);
        send(conn, "250 2.1.5 Ok").await.map(|_| None)
    }

    async fn data(&mut self, conn: &mut Conn) -> Step {
        let Some(mail_from) = self.mail_from.clone() else {
            return send(conn, "503 5.5.1 Need MAIL first").await.map(|_| None);
        };
        if self.rcpt_to.is_empty() {
            return send(conn, "554 5.5.1 No valid recipients")
                .await
                .map(|_| None);
        }
        let action = self.decide(Phase::Data, None).await;
        if action != Action::Ok {
            return self.fault(conn, action).await;
        }
        send(conn, "354 End data with <CR><LF>.<CR><LF>").await?;
        let Some(data) = read_data(conn).await? else {
            return Ok(Some(End::Closed));
        };
        let action = self.decide(Phase::AfterDot, None).await;
        let outcome = match &action {
            Action::Ok | Action::Pause(_) => AfterDot::Delivered,
            Action::Reply(code, _) => AfterDot::Replied(*code),
            Action::Hang => AfterDot::Hung,
            Action::Close | Action::Flood => AfterDot::Closed,
        };
        // Recorded before the reply goes out, so a client that saw the reply sees the record.
        lock(&self.shared.received).push(Received {
            mail_from,
            rcpt_to: std::mem::take(&mut self.rcpt_to),
            message_id: super::super::message_id(&data),
            data,
            outcome,
        });
        self.reset();
        if action != Action::Ok {
            return self.fault(conn, action).await;
        }
        let n = self.shared.phases[Phase::AfterDot.index()].load(Ordering::SeqCst);
        send(conn, &format!("250 2.0.0 Ok: queued as FAULT{n}"))
            .await
            .map(|_| None)
    }
}

async fn send(conn: &mut Conn, reply: &str) -> std::io::Result<()> {
    conn.write_all(reply.as_bytes()).await?;
    conn.write_all(b"\r\n").await?;
    conn.flush().await
}

/// One command line without its line ending; `None` at end of stream.
async fn read_line(conn: &mut Conn) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    if conn.read_until(b'\n', &mut buf).await? == 0 {
        return Ok(None);
    }
    let line = String::from_utf8_lossy(&buf);
    Ok(Some(line.trim_end_matches(['\r', '\n']).to_string()))
}

/// The message after a 354, dot-unstuffed, up to the line "."; `None` if the
/// client left before it.
async fn read_data(conn: &mut Conn) -> std::io::Result<Option<Vec<u8>>> {
    let mut data = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if conn.read_until(b'\n', &mut line).await? == 0 {
            return Ok(None);
        }
        if line == b".\r\n" || line == b".\n" {
            return Ok(Some(data));
        }
        let body = line.strip_prefix(b".").unwrap_or(&line);
        data.extend_from_slice(body);
    }
}

/// The upper-cased verb and the rest of a command line.
fn split_command(line: &str) -> (String, &str) {
    let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
    (verb.to_ascii_uppercase(), arg.trim())
}

/// The address in `FROM:<a> params` or `TO:<a> params`, without brackets.
fn address(arg: &str, prefix: &str) -> Option<String> {
    let head = arg.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = arg[prefix.len()..].trim_start();
    let inner = rest.strip_prefix('<')?;
    let end = inner.find('>')?;
    Some(inner[..end].to_string())
}

fn decode_utf8(b64: &str) -> Option<String> {
    String::from_utf8(decode_base64(b64)?).ok()
}

/// Standard base64 with padding, as SASL uses it.
fn decode_base64(input: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let trimmed = input.trim().trim_end_matches('=');
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in trimmed.bytes() {
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}
