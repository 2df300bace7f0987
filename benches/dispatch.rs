//! Throughput harness: Postfix's `smtp-source`, raw lettre connections and the
//! actor system each deliver the same messages to Postfix's `smtp-sink` over
//! loopback, at several concurrencies and sizes; the results go to stdout as a
//! markdown table. It is run by hand and asserts nothing: speed is compared
//! here, never in a timed test.
//!
//! ```text
//! cargo bench --bench dispatch -- --messages 20000,2000 --concurrency 1,8,32,64 --size 1024,102400
//! ```

#[path = "common/mod.rs"]
mod common;

use common::{ms, parse_times, share, size_name};
use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lettre::Address;
use lettre::address::Envelope;
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::extension::ClientId;
// The allocator the `mailmux` daemon ships with: the actors run in this
// process, so they are measured as they run in the daemon. Raw lettre shares
// the process and so the allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use mailmux_actors::queue::{self, Queue, QueueSettings, State, StoreKind, Submit};
use mailmux_actors::{
    Dispatcher, Limits, Mail, RelayKind, RelaySettings, RouterSettings, Settings, Status,
    SupervisorSettings,
};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

const SMTP_SINK: &str = "/usr/sbin/smtp-sink";
const SMTP_SOURCE: &str = "/usr/sbin/smtp-source";
const FROM: &str = "sender@localhost";
const TO: &str = "rcpt@localhost";
/// Generous: a message that misses it is a failure of the run, not a datum.
const DEADLINE: Duration = Duration::from_secs(300);

const USAGE: &str = "\
usage: cargo bench --bench dispatch -- [options]

  --messages N[,N...]      messages per measurement, one for all sizes or one per size (20000)
  --concurrency C[,C...]   sessions, connections or sending tasks in parallel (1,8,32,64)
  --size BYTES[,BYTES...]  message body size (1024)
  --runs R                 runs of each measurement; the best is reported (2)
  --paths P[,P...]         any of source, lettre, actors, actors-serial,
                           queue (the actors behind the SQLite queue), queue-memory
                           (default: source, lettre, actors, actors-serial)
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    Source,
    Lettre,
    /// The actors as shipped: pipelining MAIL, RCPT and DATA (smtp-sink
    /// offers PIPELINING).
    Actors,
    /// The actors with `pipelining = false`: the same SMTP exchange as raw
    /// lettre, so the difference is the actors' own cost.
    ActorsSerial,
    /// The actors behind the durable queue on SQLite (a file in a temporary
    /// folder): every message stored, marked before its final "." and
    /// settled, each write fsynced, as the daemon does. Each task waits for
    /// its message's outcome, as a `send_email` with `wait: true`.
    QueueSqlite,
    /// The same on the `memory` store: the queue's cost with no disk.
    QueueMemory,
}

impl Client {
    fn name(self) -> &'static str {
        match self {
            Client::Source => "smtp-source",
            Client::Lettre => "raw lettre",
            Client::Actors => "actors",
            Client::ActorsSerial => "actors, no pipelining",
            Client::QueueSqlite => "actors + queue, sqlite",
            Client::QueueMemory => "actors + queue, memory",
        }
    }
}

#[derive(Debug)]
struct Args {
    /// (body size, messages) pairs.
    sizes: Vec<(usize, usize)>,
    concurrency: Vec<usize>,
    runs: usize,
    paths: Vec<Client>,
}

fn list(flag: &str, value: Option<String>) -> anyhow::Result<Vec<usize>> {
    let value = value.with_context(|| format!("{flag} needs a value"))?;
    let items = value
        .split(',')
        .map(|s| {
            s.trim()
                .replace('_', "")
                .parse::<usize>()
                .with_context(|| format!("{flag}: {s:?} is not a number"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if items.is_empty() || items.contains(&0) {
        bail!("{flag}: every value must be at least 1");
    }
    Ok(items)
}

fn parse_args() -> anyhow::Result<Args> {
    let mut messages = vec![20_000];
    let mut concurrency = vec![1, 8, 32, 64];
    let mut sizes = vec![1024];
    let mut runs = 2;
    let mut paths = vec![
        Client::Source,
        Client::Lettre,
        Client::Actors,
        Client::ActorsSerial,
        Client::QueueSqlite,
        Client::QueueMemory,
    ];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            // cargo passes `--bench` to every bench binary.
            "--bench" => {}
            "--messages" => messages = list(&arg, args.next())?,
            "--concurrency" => concurrency = list(&arg, args.next())?,
            "--size" => sizes = list(&arg, args.next())?,
            "--runs" => runs = list(&arg, args.next())?[0],
            "--paths" => {
                let value = args.next().context("--paths needs a value")?;
                paths = value
                    .split(',')
                    .map(|p| match p.trim() {
                        "source" | "smtp-source" => Ok(Client::Source),
                        "lettre" => Ok(Client::Lettre),
                        "actors" => Ok(Client::Actors),
                        "actors-serial" => Ok(Client::ActorsSerial),
                        "queue" | "queue-sqlite" => Ok(Client::QueueSqlite),
                        "queue-memory" => Ok(Client::QueueMemory),
                        other => bail!("--paths: unknown path {other:?}"),
                    })
                    .collect::<anyhow::Result<_>>()?;
            }
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let sizes = match messages.len() {
        1 => sizes.iter().map(|&s| (s, messages[0])).collect(),
        n if n == sizes.len() => sizes.into_iter().zip(messages).collect(),
        _ => bail!("--messages takes one value, or one per --size"),
    };
    Ok(Args {
        sizes,
        concurrency,
        runs,
        paths,
    })
}

/// What one run of one path measured.
#[derive(Debug, Clone)]
struct Measurement {
    messages: usize,
    /// Messages the client saw accepted.
    ok: usize,
    errors: usize,
    /// Messages smtp-sink counted (its `-c` counter after the last ".").
    sink_count: Option<u64>,
    elapsed: Duration,
    /// Per-message latency, sorted; empty when the path cannot tell.
    latencies: Vec<Duration>,
    first_error: Option<String>,
    /// CPU time (user + system) the client spent during the run.
    client_cpu: Option<Duration>,
    /// CPU time smtp-sink spent during the run.
    sink_cpu: Option<Duration>,
}

impl Measurement {
    /// CPU per accepted message, in microseconds: unlike the rate, it hardly
    /// changes when other programs share the machine.
    fn per_message(&self, cpu: Option<Duration>) -> String {
        match cpu {
            Some(cpu) if self.ok > 0 => format!("{:.1}", cpu.as_secs_f64() * 1e6 / self.ok as f64),
            _ => "n/a".into(),
        }
    }

    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    /// Nearest-rank percentile.
    fn percentile(&self, q: f64) -> Option<Duration> {
        if self.latencies.is_empty() {
            return None;
        }
        let rank = (q * self.latencies.len() as f64).ceil() as usize;
        Some(self.latencies[rank.clamp(1, self.latencies.len()) - 1])
    }

    fn clean(&self) -> bool {
        self.errors == 0
            && self.ok == self.messages
            && self.sink_count.is_none_or(|c| c == self.messages as u64)
    }

    /// The better of two runs: a clean one, then the faster one.
    fn better(self, other: Measurement) -> Measurement {
        if (other.clean(), other.rate()) > (self.clean(), self.rate()) {
            other
        } else {
            self
        }
    }
}

/// A Postfix smtp-sink on a free loopback port, started for one run.
struct Sink {
    child: Child,
    port: u16,
    log: tempfile::NamedTempFile,
}

impl Sink {
    fn start(concurrency: usize) -> anyhow::Result<Sink> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = tempfile::NamedTempFile::new()?;
        let mut cmd = Command::new(SMTP_SINK);
        // Run as root it must drop privileges once it has its socket.
        if is_root() {
            cmd.args(["-u", "nobody"]);
        }
        // `-c` prints counters on every "." so the run can be checked; `-m`
        // (simultaneous connections) and the backlog must exceed the
        // concurrency, or excess connections wait in the kernel.
        let room = (concurrency * 2 + 16).to_string();
        cmd.args(["-c", "-m", &room])
            .arg(format!("127.0.0.1:{port}"))
            .arg(&room)
            .stdin(Stdio::null())
            .stdout(log.reopen()?)
            .stderr(log.reopen()?);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {SMTP_SINK}"))?;
        let mut sink = Sink { child, port, log };
        let ready_by = Instant::now() + Duration::from_secs(5);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(sink);
            }
            if let Some(status) = sink.child.try_wait()? {
                bail!("smtp-sink exited at start ({status}): {}", sink.output());
            }
            if Instant::now() > ready_by {
                bail!("smtp-sink did not listen on port {port} within 5s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Stops the sink and returns how many messages it took and the CPU
    /// time it used.
    fn stop(mut self) -> anyhow::Result<(u64, Option<Duration>)> {
        let cpu = process_cpu(&self.child.id().to_string());
        // Every client has its final reply by now, so the counter is complete.
        self.child.kill()?;
        self.child.wait()?;
        let out = self.output();
        let last = out
            .rsplit("mesg=")
            .next()
            .filter(|_| out.contains("mesg="))
            .map(|s| {
                s.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
            });
        match last.and_then(|s| s.parse().ok()) {
            Some(n) => Ok((n, cpu)),
            None if out.trim().is_empty() => Ok((0, cpu)),
            None => bail!("no counter in smtp-sink's output: {}", out.trim()),
        }
    }
}

/// User plus system CPU time of a process (`self` or a pid), from
/// /proc/PID/stat, in clock ticks of 1/100 s.
fn process_cpu(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it do not.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 1000 / CLK_TCK))
}

/// USER_HZ: 100 on every Linux this runs on (`getconf CLK_TCK`).
const CLK_TCK: u64 = 100;

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A message of about `size` body bytes: short headers, then lines of 78
/// characters, as smtp-source's `-l` sends them.
fn message(size: usize) -> Arc<[u8]> {
    let mut m = format!(
        "From: <{FROM}>\r\nTo: <{TO}>\r\nSubject: mailmux bench\r\nMessage-ID: <bench@localhost>\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    )
    .into_bytes();
    let line = b"La de da de da 1. La de da de da 2. La de da de da 3. La de da de da 4. La de ";
    let mut left = size;
    while left > 0 {
        let take = left.min(line.len());
        m.extend_from_slice(&line[..take]);
        m.extend_from_slice(b"\r\n");
        left = left.saturating_sub(take + 2);
    }
    Arc::from(m)
}

/// The physical limit: Postfix's own C client, one process, no pipelining.
fn run_source(c: usize, n: usize, size: usize) -> anyhow::Result<Measurement> {
    let sink = Sink::start(c)?;
    let started = Instant::now();
    // The shell reports the CPU time of its child with `times`, on stderr
    // so that it stays apart from smtp-source's (silenced) output. -d keeps
    // each session open for the next message, as the other paths do.
    let out = Command::new("sh")
        .args([
            "-c",
            r#""$0" "$@" >/dev/null; rc=$?; times >&2; exit $rc"#,
            SMTP_SOURCE,
        ])
        .args(["-d", "-s", &c.to_string(), "-m", &n.to_string()])
        .args([
            "-l",
            &size.to_string(),
            "-M",
            "localhost",
            "-f",
            FROM,
            "-t",
            TO,
        ])
        .arg(format!("127.0.0.1:{}", sink.port))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {SMTP_SOURCE}"))?;
    let elapsed = started.elapsed();
    let (count, sink_cpu) = sink.stop()?;
    let ok = usize::try_from(count).unwrap_or(usize::MAX).min(n);
    let failed = !out.status.success();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let client_cpu = stderr.lines().last().and_then(parse_times);
    Ok(Measurement {
        messages: n,
        ok,
        errors: if failed { (n - ok).max(1) } else { n - ok },
        sink_count: Some(count),
        elapsed,
        latencies: Vec::new(),
        first_error: failed.then(|| format!("smtp-source {}: {}", out.status, stderr.trim())),
        client_cpu,
        sink_cpu,
    })
}

/// What one sending task brings back.
#[derive(Default)]
struct TaskResult {
    latencies: Vec<Duration>,
    errors: usize,
    first_error: Option<String>,
    /// Kept open until the clock has stopped, so QUIT is not timed.
    conn: Option<AsyncSmtpConnection>,
}

impl TaskResult {
    fn fail(&mut self, count: usize, e: impl std::fmt::Display) {
        self.errors += count;
        self.first_error.get_or_insert_with(|| e.to_string());
    }
}

/// C tasks, each with its own lettre connection, sending in a loop: what
/// lettre alone can do on this machine.
async fn run_lettre(
    port: u16,
    c: usize,
    n: usize,
    msg: Arc<[u8]>,
) -> anyhow::Result<(Measurement, Vec<AsyncSmtpConnection>)> {
    let envelope = Envelope::new(Some(FROM.parse::<Address>()?), vec![TO.parse::<Address>()?])?;
    let envelope = Arc::new(envelope);
    let cpu = process_cpu("self");
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..c {
        let k = share(n, c, i);
        let envelope = envelope.clone();
        let msg = msg.clone();
        tasks.spawn(async move {
            let mut r = TaskResult {
                latencies: Vec::with_capacity(k),
                ..TaskResult::default()
            };
            let tcp = match TcpStream::connect(("127.0.0.1", port)).await {
                Ok(tcp) => tcp,
                Err(e) => {
                    r.fail(k, format!("connect: {e}"));
                    return r;
                }
            };
            if let Err(e) = tcp.set_nodelay(true) {
                r.fail(k, format!("TCP_NODELAY: {e}"));
                return r;
            }
            let hello = ClientId::Domain("localhost".into());
            let mut conn =
                match AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &hello).await {
                    Ok(conn) => conn,
                    Err(e) => {
                        r.fail(k, format!("greeting/EHLO: {e}"));
                        return r;
                    }
                };
            for sent in 0..k {
                let t = Instant::now();
                match conn.send(&envelope, &msg).await {
                    Ok(_) => r.latencies.push(t.elapsed()),
                    Err(e) if conn.has_broken() => {
                        r.fail(k - sent, format!("connection broke: {e}"));
                        return r;
                    }
                    Err(e) => r.fail(1, e),
                }
            }
            r.conn = Some(conn);
            r
        });
    }
    let results = tasks.join_all().await;
    let elapsed = started.elapsed();
    let mut m = collect(n, elapsed, results.iter());
    m.client_cpu = cpu_since(cpu);
    m.latencies.sort_unstable();
    let conns = results.into_iter().filter_map(|r| r.conn).collect();
    Ok((m, conns))
}

fn cpu_since(before: Option<Duration>) -> Option<Duration> {
    Some(process_cpu("self")?.saturating_sub(before?))
}

fn collect<'a>(
    n: usize,
    elapsed: Duration,
    results: impl Iterator<Item = &'a TaskResult>,
) -> Measurement {
    let mut m = Measurement {
        messages: n,
        ok: 0,
        errors: 0,
        sink_count: None,
        elapsed,
        latencies: Vec::with_capacity(n),
        first_error: None,
        client_cpu: None,
        sink_cpu: None,
    };
    for r in results {
        m.latencies.extend_from_slice(&r.latencies);
        m.errors += r.errors;
        if m.first_error.is_none() {
            m.first_error.clone_from(&r.first_error);
        }
    }
    m.ok = m.latencies.len();
    m
}

/// The actor system with one relay whose pool has C connections, fed by C
/// concurrent callers, each timing its own `send`.
/// The dispatcher as the actor paths configure it: one relay to the sink
/// with `c` connections.
async fn dispatcher(port: u16, c: usize, n: usize, pipelining: bool) -> anyhow::Result<Dispatcher> {
    let mut relay = RelaySettings::smtp("sink", "127.0.0.1", port);
    if let RelayKind::Smtp(s) = &mut relay.kind {
        s.pipelining = pipelining;
    }
    relay.pool.max_connections = c;
    relay.pool.messages_per_connection = 0;
    relay.pool.max_queued = n.max(1024);
    Dispatcher::start(Settings {
        relays: vec![relay],
        router: RouterSettings::default(),
        supervisor: SupervisorSettings::default(),
        limits: Limits::default(),
    })
    .await
    .context("starting the dispatcher")
}

async fn run_actors(
    port: u16,
    c: usize,
    n: usize,
    msg: Arc<[u8]>,
    pipelining: bool,
) -> anyhow::Result<Measurement> {
    let dispatcher = dispatcher(port, c, n, pipelining).await?;
    let d = dispatcher.clone();
    let m = drive(c, n, msg, move |mail| {
        let d = d.clone();
        async move {
            let report = d.send(mail).await;
            match report.status {
                Status::Sent => Ok(()),
                other => Err(format!(
                    "{}: {}",
                    other.as_str(),
                    report.message.as_deref().unwrap_or("")
                )),
            }
        }
    })
    .await?;
    let shut = dispatcher.shutdown(Duration::from_secs(5)).await;
    if shut.abandoned > 0 {
        eprintln!(
            "  note: {} sends still in flight at shutdown",
            shut.abandoned
        );
    }
    Ok(m)
}

/// The actors behind the queue: each of `c` tasks submits its share of the
/// messages one after another and waits for each outcome.
async fn run_queue(
    port: u16,
    c: usize,
    n: usize,
    msg: Arc<[u8]>,
    durable: bool,
) -> anyhow::Result<Measurement> {
    let dir = tempfile::tempdir()?;
    let kind = if durable {
        StoreKind::Sqlite {
            path: dir.path().join("queue.db"),
        }
    } else {
        StoreKind::Memory
    };
    let store = queue::open(&kind).await.context("opening the store")?;
    let settings = QueueSettings {
        store: kind,
        delivery_timeout: DEADLINE,
        ..QueueSettings::default()
    };
    let dispatcher = dispatcher(port, c, n, true).await?;
    let rounds = Limits::default().max_in_flight;
    let q = Queue::start(store, dispatcher.clone(), settings, rounds)
        .await
        .context("starting the queue")?;
    let queue = q.clone();
    let m = drive(c, n, msg, move |mail| {
        let q = queue.clone();
        async move {
            let submit = Submit {
                mail,
                send_at: None,
                idempotency: None,
                wait: true,
                caller: None,
                meta: None,
                hold: None,
                batch: None,
                tag: None,
                max_age: None,
                cancel: None,
            };
            match q.submit(submit).await {
                Ok(s) if s.record.state == State::Sent => Ok(()),
                Ok(s) => Err(format!("ended {}", s.record.state.as_str())),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await?;
    q.shutdown(Duration::from_secs(5)).await;
    dispatcher.shutdown(Duration::from_secs(5)).await;
    Ok(m)
}

/// Runs `c` tasks that each send their share of `n` messages one after
/// another through `send` (which says whether the message was sent), and
/// measures them; the client CPU is this whole process.
async fn drive<S, F>(c: usize, n: usize, msg: Arc<[u8]>, send: S) -> anyhow::Result<Measurement>
where
    S: Fn(Mail) -> F + Clone + Send + 'static,
    F: std::future::Future<Output = Result<(), String>> + Send,
{
    let from: Address = FROM.parse()?;
    let to: Address = TO.parse()?;
    let cpu = process_cpu("self");
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..c {
        let k = share(n, c, i);
        let (send, msg, from, to) = (send.clone(), msg.clone(), from.clone(), to.clone());
        tasks.spawn(async move {
            let mut r = TaskResult {
                latencies: Vec::with_capacity(k),
                ..TaskResult::default()
            };
            for j in 0..k {
                let mail = Mail {
                    message_id: format!("bench.{i}.{j}@localhost"),
                    from: Some(from.clone()),
                    to: vec![to.clone()],
                    bytes: msg.clone(),
                    deadline: tokio::time::Instant::now() + DEADLINE,
                    prefer: None,
                    only: None,
                    priority: Default::default(),
                };
                let t = Instant::now();
                match send(mail).await {
                    Ok(()) => r.latencies.push(t.elapsed()),
                    Err(e) => r.fail(1, e),
                }
            }
            r
        });
    }
    let results = tasks.join_all().await;
    let elapsed = started.elapsed();
    let mut m = collect(n, elapsed, results.iter());
    m.client_cpu = cpu_since(cpu);
    m.latencies.sort_unstable();
    Ok(m)
}

/// One run of one path against a fresh sink.
fn measure(
    rt: &tokio::runtime::Runtime,
    path: Client,
    c: usize,
    n: usize,
    size: usize,
    msg: &Arc<[u8]>,
) -> anyhow::Result<Measurement> {
    match path {
        Client::Source => run_source(c, n, size),
        Client::Lettre => {
            let sink = Sink::start(c)?;
            let (mut m, conns) = rt.block_on(run_lettre(sink.port, c, n, msg.clone()))?;
            rt.block_on(async {
                for mut conn in conns {
                    let _ = conn.quit().await;
                }
            });
            (m.sink_count, m.sink_cpu) = sink.stop().map(|(n, cpu)| (Some(n), cpu))?;
            Ok(m)
        }
        Client::Actors | Client::ActorsSerial => {
            let sink = Sink::start(c)?;
            let pipelining = path == Client::Actors;
            let mut m = rt.block_on(run_actors(sink.port, c, n, msg.clone(), pipelining))?;
            (m.sink_count, m.sink_cpu) = sink.stop().map(|(n, cpu)| (Some(n), cpu))?;
            Ok(m)
        }
        Client::QueueSqlite | Client::QueueMemory => {
            let sink = Sink::start(c)?;
            let durable = path == Client::QueueSqlite;
            let mut m = rt.block_on(run_queue(sink.port, c, n, msg.clone(), durable))?;
            (m.sink_count, m.sink_cpu) = sink.stop().map(|(n, cpu)| (Some(n), cpu))?;
            Ok(m)
        }
    }
}

struct Row {
    size: usize,
    c: usize,
    path: Client,
    m: Measurement,
}

fn ratio(a: Option<&Row>, b: Option<&Row>) -> Option<f64> {
    Some(a?.m.rate() / b?.m.rate())
}

fn pct(r: Option<f64>) -> String {
    r.map_or("".into(), |r| format!("{:.0} %", r * 100.0))
}

fn table(rows: &[Row], runs: usize) -> String {
    let find = |size, c, path| {
        rows.iter()
            .find(|r| r.size == size && r.c == c && r.path == path)
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| size | C | path | messages | accepted (sink) | errors | msgs/s | p50 ms | p99 ms | client CPU µs/msg | sink CPU µs/msg | vs raw lettre | vs smtp-source |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let lettre = find(r.size, r.c, Client::Lettre);
        let source = find(r.size, r.c, Client::Source);
        let vs_lettre = match r.path {
            Client::Actors | Client::ActorsSerial => pct(ratio(Some(r), lettre)),
            _ => String::new(),
        };
        let vs_source = match r.path {
            Client::Source => String::new(),
            _ => pct(ratio(Some(r), source)),
        };
        let errors = if r.m.clean() {
            "0".to_owned()
        } else {
            format!("**{}**", r.m.errors.max(r.m.messages - r.m.ok))
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} |",
            size_name(r.size),
            r.c,
            r.path.name(),
            r.m.messages,
            r.m.sink_count.map_or("?".into(), |c| c.to_string()),
            errors,
            r.m.rate(),
            ms(r.m.percentile(0.50)),
            ms(r.m.percentile(0.99)),
            r.m.per_message(r.m.client_cpu),
            r.m.per_message(r.m.sink_cpu),
            vs_lettre,
            vs_source,
        );
    }
    let _ = writeln!(
        out,
        "\nBest of {runs} run(s) per row; msgs/s counts accepted messages over wall time from the first connect to the last reply."
    );
    let mut sizes: Vec<usize> = rows.iter().map(|r| r.size).collect();
    sizes.dedup();
    for size in sizes {
        let Some(l) = find(size, 32, Client::Lettre) else {
            continue;
        };
        for path in [Client::Actors, Client::ActorsSerial] {
            let Some(a) = find(size, 32, path) else {
                continue;
            };
            let r = a.m.rate() / l.m.rate();
            let _ = writeln!(
                out,
                "\nTarget at C=32, {}: {} reach {:.1} % of raw lettre ({:.0} vs {:.0} msgs/s): {}.",
                size_name(size),
                path.name(),
                r * 100.0,
                a.m.rate(),
                l.m.rate(),
                if r >= 0.9 { "met" } else { "NOT met" }
            );
        }
    }
    out
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    for tool in [SMTP_SINK, SMTP_SOURCE] {
        if !Path::new(tool).exists() && args.paths.contains(&Client::Source) {
            bail!("{tool} is not installed (Postfix)");
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    for &(size, n) in &args.sizes {
        let msg = message(size);
        for &c in &args.concurrency {
            let mut best: Vec<Option<Measurement>> = vec![None; args.paths.len()];
            // Paths take turns within each run so that a burst of load from
            // elsewhere on the machine does not hit one path only.
            for run in 1..=args.runs {
                for (k, &path) in args.paths.iter().enumerate() {
                    let m = measure(&rt, path, c, n, size, &msg)
                        .with_context(|| format!("{} at C={c}", path.name()))?;
                    eprintln!(
                        "size {size} C={c} run {run} {:<11} {:>8.0} msgs/s  ok {} errors {} sink {:?} p50 {} p99 {} cpu/msg client {} sink {}{}",
                        path.name(),
                        m.rate(),
                        m.ok,
                        m.errors,
                        m.sink_count,
                        ms(m.percentile(0.5)),
                        ms(m.percentile(0.99)),
                        m.per_message(m.client_cpu),
                        m.per_message(m.sink_cpu),
                        m.first_error
                            .as_deref()
                            .map(|e| format!("  first error: {e}"))
                            .unwrap_or_default()
                    );
                    best[k] = Some(match best[k].take() {
                        Some(b) => b.better(m),
                        None => m,
                    });
                }
            }
            for (k, m) in best.into_iter().enumerate() {
                if let Some(m) = m {
                    rows.push(Row {
                        size,
                        c,
                        path: args.paths[k],
                        m,
                    });
                }
            }
        }
    }
    print!("{}", table(&rows, args.runs));
    Ok(())
}
