//! MCP throughput harness: the `mailmux` binary, driven by an rmcp client over
//! stdio and over streamable HTTP, delivers to Postfix's `smtp-sink`, next to
//! Postfix's `smtp-source` (the machine's limit) in the same run; also the
//! daemon's memory idle and under 1 000 concurrent calls. Results go to
//! stdout as markdown. It is run by hand and asserts nothing.
//!
//! ```text
//! cargo bench --bench mcp -- --messages 20000,2000 --concurrency 1,8,32,64 --size 1024,102400
//! ```

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/load/mod.rs"]
mod load;
#[path = "../actors/tests/support/mod.rs"]
#[allow(unused)]
mod support;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use common::{ms, parse_times, share, size_name};
use load::{Daemon, DaemonOptions, Sink, Transport};
use support::postgres::Postgres;

const USAGE: &str = "\
usage: cargo bench --bench mcp -- [options]

  --messages N[,N...]      messages per measurement, one for all sizes or one per size (20000)
  --concurrency C[,C...]   calls (or smtp-source sessions) in parallel (1,8,32,64)
  --size BYTES[,BYTES...]  message body size (1024)
  --runs R                 runs of each measurement; the best is reported (2)
  --paths P[,P...]         any of source, stdio, stdio-memory, stdio-policy, stdio-batch,
                           stdio-batch-memory, stdio-postgres, stdio-lines,
                           stdio-lines-memory, http, http-memory, http-posts,
                           http-posts-memory,
                           http-policy, http-batch, http-batch-memory, http-postgres,
                           http-postgres-2, http-postgres-3, stdio-postgres-policy,
                           http-postgres-policy, stdio-batch-postgres, http-batch-postgres,
                           stdio-batch-postgres-policy, http-batch-postgres-policy
                           (-policy: the memory store, or
                           postgres, and a caller policy every message passes, its
                           rates kept in the database on postgres; -batch: the sqlite
                           store, send_batch calls of 1000; -batch-memory: the same on
                           the memory store; -batch-postgres: on postgres;
                           -postgres: a throwaway PostgreSQL with fsync on, and 1, 2
                           or 3 daemons sharing it, the calls spread over them;
                           ceiling: the HTTP client against a trivial rmcp tool in
                           this process, the client's own limit; -lines: no rmcp
                           client, the bench writes and reads the JSON-RPC lines
                           itself, as wrk does over HTTP; -posts: a daemon serving
                           `--http --stateless`, and no rmcp client: the bench posts
                           each call as one JSON-RPC request on connections it keeps,
                           as wrk does)
                           (all five; stdio and http run on the default sqlite store)
  --burst N                concurrent calls of the memory measurement, 0 to skip it (1000)
  --batch-memory N         one send_batch of N messages of each --size (wait: true) on the
                           sqlite store, over stdio and HTTP: the daemon's peak memory;
                           0 to skip it (0)
  --backlog N              N messages of each --size scheduled over stdio on the sqlite
                           store (send_batch calls of up to 1000 and 8 MiB, wait: false, all due at once
                           a few seconds later): how fast the queue delivers mail that
                           waits in its store; 0 to skip it (0)
  --log FILTER             the daemon's RUST_LOG (info, its default)
  --http-pool              the HTTP client (rmcp's, on reqwest) keeps its connections open
                           between calls; without it, rmcp's default client opens a new
                           connection for every request
  --http-modern            the HTTP client speaks protocol 2026-07-28 (server/discover, no
                           session, each call answered with one JSON body) rather than
                           2025-11-25's initialize and a session answered over SSE
                           (the daemon paths; the ceiling keeps the session)
  --bin PATH               the mailmux binary (the one cargo built for this bench)
  --dkim KEY.pem           every daemon signs every message with this DKIM key (RSA or
                           Ed25519, PEM), as example.org with the selector `bench`
";

/// The queue store a daemon runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Sqlite,
    Memory,
    /// The memory store with a caller policy that every message passes.
    MemoryPolicy,
    /// The sqlite store, with the messages sent in `send_batch` calls of
    /// up to [`BATCH`].
    Batch,
    /// The memory store, with the messages sent as on [`Store::Batch`].
    BatchMemory,
    /// A PostgreSQL queue shared by this many daemons.
    Postgres(usize),
    /// One daemon on a PostgreSQL queue, with the caller policy of
    /// [`Store::MemoryPolicy`], whose rates are kept in the database.
    PostgresPolicy,
    /// One daemon on a PostgreSQL queue, with the messages sent as on
    /// [`Store::Batch`]; with the policy of [`Store::PostgresPolicy`] too.
    BatchPostgres,
    BatchPostgresPolicy,
}

/// Messages per `send_batch` call on the `-batch` paths.
const BATCH: usize = 1000;

impl Store {
    fn name(self) -> &'static str {
        match self {
            Store::Sqlite | Store::Batch => "sqlite",
            Store::Memory | Store::MemoryPolicy | Store::BatchMemory => "memory",
            Store::Postgres(_)
            | Store::PostgresPolicy
            | Store::BatchPostgres
            | Store::BatchPostgresPolicy => "postgres",
        }
    }

    fn daemons(self) -> usize {
        match self {
            Store::Postgres(n) => n,
            _ => 1,
        }
    }

    fn policy(self) -> bool {
        matches!(
            self,
            Store::MemoryPolicy | Store::PostgresPolicy | Store::BatchPostgresPolicy
        )
    }

    fn batch(self) -> bool {
        matches!(
            self,
            Store::Batch | Store::BatchMemory | Store::BatchPostgres | Store::BatchPostgresPolicy
        )
    }

    fn postgres(self) -> bool {
        self.name() == "postgres"
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Source,
    Mcp(Transport, Store),
    /// The bench's HTTP client against a trivial rmcp server in this
    /// process: its ceiling.
    Ceiling,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Source => "smtp-source",
            Path::Ceiling => "HTTP client ceiling (trivial rmcp tool)",
            Path::Mcp(Transport::StdioLines, Store::Sqlite) => "MCP stdio-lines, sqlite",
            Path::Mcp(Transport::StdioLines, _) => "MCP stdio-lines, memory",
            Path::Mcp(Transport::HttpPosts, Store::Sqlite) => "MCP HTTP posts, sqlite",
            Path::Mcp(Transport::HttpPosts, _) => "MCP HTTP posts, memory",
            Path::Mcp(Transport::Stdio, Store::Sqlite) => "MCP stdio, sqlite",
            Path::Mcp(Transport::Stdio, Store::Memory) => "MCP stdio, memory",
            Path::Mcp(Transport::Stdio, Store::MemoryPolicy) => "MCP stdio, memory, policy",
            Path::Mcp(Transport::Http, Store::MemoryPolicy) => "MCP HTTP, memory, policy",
            Path::Mcp(Transport::Stdio, Store::Batch) => "MCP stdio, send_batch",
            Path::Mcp(Transport::Http, Store::Batch) => "MCP HTTP, send_batch",
            Path::Mcp(Transport::Stdio, Store::BatchMemory) => "MCP stdio, send_batch, memory",
            Path::Mcp(Transport::Http, Store::BatchMemory) => "MCP HTTP, send_batch, memory",
            Path::Mcp(Transport::Stdio, Store::BatchPostgres) => "MCP stdio, send_batch, postgres",
            Path::Mcp(Transport::Http, Store::BatchPostgres) => "MCP HTTP, send_batch, postgres",
            Path::Mcp(Transport::Stdio, Store::BatchPostgresPolicy) => {
                "MCP stdio, send_batch, postgres, policy"
            }
            Path::Mcp(Transport::Http, Store::BatchPostgresPolicy) => {
                "MCP HTTP, send_batch, postgres, policy"
            }
            Path::Mcp(Transport::Http, Store::Sqlite) => "MCP HTTP, sqlite",
            Path::Mcp(Transport::Http, Store::Memory) => "MCP HTTP, memory",
            Path::Mcp(Transport::Stdio, Store::Postgres(_)) => "MCP stdio, postgres",
            Path::Mcp(Transport::Http, Store::Postgres(1)) => "MCP HTTP, postgres",
            Path::Mcp(Transport::Stdio, Store::PostgresPolicy) => "MCP stdio, postgres, policy",
            Path::Mcp(Transport::Http, Store::PostgresPolicy) => "MCP HTTP, postgres, policy",
            Path::Mcp(Transport::Http, Store::Postgres(2)) => "MCP HTTP, postgres, 2 daemons",
            Path::Mcp(Transport::Http, Store::Postgres(_)) => "MCP HTTP, postgres, 3 daemons",
        }
    }
}

#[derive(Debug)]
struct Args {
    sizes: Vec<(usize, usize)>,
    concurrency: Vec<usize>,
    runs: usize,
    paths: Vec<Path>,
    burst: usize,
    batch_memory: usize,
    backlog: usize,
    log: String,
    bin: PathBuf,
    /// The HTTP client keeps its connections between calls (`--http-pool`).
    http_pool: bool,
    /// The HTTP client speaks protocol 2026-07-28 (`--http-modern`).
    http_modern: bool,
    /// A DKIM key that signs every message (`--dkim`).
    dkim_key: Option<PathBuf>,
}

fn list(flag: &str, value: Option<String>) -> anyhow::Result<Vec<usize>> {
    let value = value.with_context(|| format!("{flag} needs a value"))?;
    value
        .split(',')
        .map(|s| {
            s.trim()
                .replace('_', "")
                .parse::<usize>()
                .with_context(|| format!("{flag}: {s:?} is not a number"))
        })
        .collect()
}

fn parse_args() -> anyhow::Result<Args> {
    let mut messages = vec![20_000];
    let mut concurrency = vec![1, 8, 32, 64];
    let mut sizes = vec![1024];
    let mut runs = 2;
    let mut paths = vec![
        Path::Source,
        Path::Mcp(Transport::Stdio, Store::Sqlite),
        Path::Mcp(Transport::Stdio, Store::Memory),
        Path::Mcp(Transport::Http, Store::Sqlite),
        Path::Mcp(Transport::Http, Store::Memory),
    ];
    let mut burst = 1000;
    let mut batch_memory = 0;
    let mut backlog = 0;
    let mut log = "info".to_string();
    let mut bin = PathBuf::from(env!("CARGO_BIN_EXE_mailmux"));
    let mut http_pool = false;
    let mut http_modern = false;
    let mut dkim_key = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--bench" => {}
            "--messages" => messages = list(&arg, args.next())?,
            "--concurrency" => concurrency = list(&arg, args.next())?,
            "--size" => sizes = list(&arg, args.next())?,
            "--runs" => runs = list(&arg, args.next())?[0].max(1),
            "--burst" => burst = list(&arg, args.next())?[0],
            "--batch-memory" => batch_memory = list(&arg, args.next())?[0],
            "--backlog" => backlog = list(&arg, args.next())?[0],
            "--log" => log = args.next().context("--log needs a value")?,
            "--http-pool" => http_pool = true,
            "--http-modern" => http_modern = true,
            "--dkim" => {
                let value = args.next().context("--dkim needs a value")?;
                dkim_key =
                    Some(std::path::absolute(&value).with_context(|| format!("--dkim {value}"))?);
            }
            // Relative to the caller's folder, not the daemon's (each
            // daemon runs in a temporary folder of its own).
            "--bin" => {
                let value = args.next().context("--bin needs a value")?;
                bin = std::path::absolute(&value).with_context(|| format!("--bin {value}"))?;
            }
            "--paths" => {
                let value = args.next().context("--paths needs a value")?;
                paths = value
                    .split(',')
                    .map(|p| match p.trim() {
                        "source" | "smtp-source" => Ok(Path::Source),
                        "ceiling" => Ok(Path::Ceiling),
                        "stdio" => Ok(Path::Mcp(Transport::Stdio, Store::Sqlite)),
                        "stdio-lines" => Ok(Path::Mcp(Transport::StdioLines, Store::Sqlite)),
                        "stdio-lines-memory" => Ok(Path::Mcp(Transport::StdioLines, Store::Memory)),
                        "http-posts" => Ok(Path::Mcp(Transport::HttpPosts, Store::Sqlite)),
                        "http-posts-memory" => Ok(Path::Mcp(Transport::HttpPosts, Store::Memory)),
                        "stdio-memory" => Ok(Path::Mcp(Transport::Stdio, Store::Memory)),
                        "stdio-policy" => Ok(Path::Mcp(Transport::Stdio, Store::MemoryPolicy)),
                        "http-policy" => Ok(Path::Mcp(Transport::Http, Store::MemoryPolicy)),
                        "stdio-batch" => Ok(Path::Mcp(Transport::Stdio, Store::Batch)),
                        "http-batch" => Ok(Path::Mcp(Transport::Http, Store::Batch)),
                        "stdio-batch-memory" => Ok(Path::Mcp(Transport::Stdio, Store::BatchMemory)),
                        "http-batch-memory" => Ok(Path::Mcp(Transport::Http, Store::BatchMemory)),
                        "http" => Ok(Path::Mcp(Transport::Http, Store::Sqlite)),
                        "http-memory" => Ok(Path::Mcp(Transport::Http, Store::Memory)),
                        "stdio-postgres" => Ok(Path::Mcp(Transport::Stdio, Store::Postgres(1))),
                        "http-postgres" => Ok(Path::Mcp(Transport::Http, Store::Postgres(1))),
                        "http-postgres-2" => Ok(Path::Mcp(Transport::Http, Store::Postgres(2))),
                        "http-postgres-3" => Ok(Path::Mcp(Transport::Http, Store::Postgres(3))),
                        "stdio-postgres-policy" => {
                            Ok(Path::Mcp(Transport::Stdio, Store::PostgresPolicy))
                        }
                        "http-postgres-policy" => {
                            Ok(Path::Mcp(Transport::Http, Store::PostgresPolicy))
                        }
                        "stdio-batch-postgres" => {
                            Ok(Path::Mcp(Transport::Stdio, Store::BatchPostgres))
                        }
                        "http-batch-postgres" => {
                            Ok(Path::Mcp(Transport::Http, Store::BatchPostgres))
                        }
                        "stdio-batch-postgres-policy" => {
                            Ok(Path::Mcp(Transport::Stdio, Store::BatchPostgresPolicy))
                        }
                        "http-batch-postgres-policy" => {
                            Ok(Path::Mcp(Transport::Http, Store::BatchPostgresPolicy))
                        }
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
    if concurrency.contains(&0) || sizes.contains(&0) || messages.contains(&0) {
        bail!("--messages, --concurrency and --size must be at least 1");
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
        burst,
        batch_memory,
        backlog,
        log,
        bin,
        http_pool,
        http_modern,
        dkim_key,
    })
}

#[derive(Debug, Clone)]
struct Measurement {
    messages: usize,
    ok: usize,
    errors: usize,
    sink_count: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
    first_error: Option<String>,
    /// The daemon's VmHWM at the end of the run, in kB.
    peak_rss_kb: Option<u64>,
    /// CPU time of the daemon (MCP paths) or of smtp-source.
    cpu: Option<Duration>,
    /// The daemon's system (kernel) part of `cpu`.
    daemon_sys: Option<Duration>,
    /// PostgreSQL's statements in the run (each a round trip, and one more
    /// when sqlx's pool tests the connection given back after it), from
    /// pg_stat_statements, the CPU time of its processes, and the bytes of
    /// WAL it wrote.
    db: Option<(u64, Duration, u64)>,
    /// CPU time of this process: the rmcp client (MCP paths).
    client_cpu: Option<Duration>,
    /// CPU time of smtp-sink.
    sink_cpu: Option<Duration>,
}

impl Measurement {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    fn clean(&self) -> bool {
        self.errors == 0 && self.ok == self.messages && self.sink_count == self.messages as u64
    }

    fn better(self, other: Measurement) -> Measurement {
        if (other.clean(), other.rate()) > (self.clean(), self.rate()) {
            other
        } else {
            self
        }
    }

    fn cpu_per_message(&self) -> String {
        self.per_message(self.cpu)
    }

    fn per_message(&self, cpu: Option<Duration>) -> String {
        match cpu {
            Some(cpu) if self.ok > 0 => format!("{:.1}", cpu.as_secs_f64() * 1e6 / self.ok as f64),
            _ => "n/a".into(),
        }
    }
}

fn since(before: Option<Duration>, now: Option<Duration>) -> Option<Duration> {
    Some(now?.saturating_sub(before?))
}

/// Postfix's own client: one process, `-d` to keep each session for the
/// next message, as the daemon's pool does.
fn run_source(c: usize, n: usize, size: usize) -> anyhow::Result<Measurement> {
    let sink = Sink::start(c, false)?;
    let sink_before = load::proc_cpu(sink.pid());
    let started = Instant::now();
    let out = Command::new("sh")
        .args([
            "-c",
            r#""$0" "$@" >/dev/null; rc=$?; times >&2; exit $rc"#,
            load::SMTP_SOURCE,
        ])
        .args(["-d", "-s", &c.to_string(), "-m", &n.to_string()])
        .args(["-l", &size.to_string(), "-M", "localhost"])
        .args(["-f", load::FROM, "-t", load::TO])
        .arg(format!("127.0.0.1:{}", sink.port))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {}", load::SMTP_SOURCE))?;
    let elapsed = started.elapsed();
    let count = sink.wait_count(n as u64, Duration::from_secs(5));
    let sink_cpu = since(sink_before, load::proc_cpu(sink.pid()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ok = usize::try_from(count).unwrap_or(usize::MAX).min(n);
    Ok(Measurement {
        messages: n,
        ok,
        errors: n - ok,
        sink_count: count,
        elapsed,
        latencies: Vec::new(),
        first_error: (!out.status.success())
            .then(|| format!("smtp-source {}: {}", out.status, stderr.trim())),
        peak_rss_kb: None,
        db: None,
        cpu: stderr.lines().last().and_then(parse_times),
        daemon_sys: None,
        client_cpu: None,
        sink_cpu,
    })
}

/// CPU time of PostgreSQL's processes (the postmaster and its children),
/// by pid.
fn pg_cpu(postmaster: u32) -> std::collections::HashMap<u32, Duration> {
    let mut out = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if (pid == postmaster || ppid == Some(postmaster))
            && let Some(cpu) = load::proc_cpu(pid)
        {
            out.insert(pid, cpu);
        }
    }
    out
}

/// The cluster's current WAL position.
fn pg_wal_lsn(pg: &Postgres) -> String {
    pg.psql("postgres", "SELECT pg_current_wal_lsn()")
}

/// Bytes of WAL written since `lsn`: by every database of the cluster, and
/// so by the one run that uses it.
fn pg_wal_since(pg: &Postgres, lsn: &str) -> u64 {
    pg.psql(
        "postgres",
        &format!("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{lsn}')::bigint"),
    )
    .parse()
    .unwrap_or(0)
}

/// Statements run in database `db` so far (pg_stat_statements).
fn pg_statements(pg: &Postgres, db: &str) -> u64 {
    pg.psql(
        "postgres",
        &format!(
            "SELECT COALESCE(SUM(calls), 0) FROM pg_stat_statements
              WHERE dbid = (SELECT oid FROM pg_database WHERE datname = '{db}')"
        ),
    )
    .parse()
    .unwrap_or(0)
}

/// The daemon (or, on the `postgres` paths, each of the daemons sharing a
/// fresh database) with one relay to a fresh sink (`max_connections = C`,
/// no limit of messages per connection) and C concurrent `send_email` calls,
/// spread over the daemons.
async fn run_mcp(
    args: &Args,
    pg: Option<&Postgres>,
    transport: Transport,
    store: Store,
    c: usize,
    n: usize,
    body: Arc<String>,
) -> anyhow::Result<Measurement> {
    let sink = Sink::start(if store.batch() { 32 } else { c }, false)?;
    let url = match store.postgres() {
        true => Some(pg.context("no PostgreSQL for a postgres path")?.database()),
        false => None,
    };
    let mut daemons = Vec::new();
    for k in 0..store.daemons() {
        let queue_extra = url
            .as_ref()
            .map(|u| format!("url = \"{u}\"\nnode_id = \"bench-{k}\"\npool_size = 16"))
            .unwrap_or_default();
        daemons.push(
            Daemon::start(
                &args.bin,
                &DaemonOptions {
                    transport,
                    sink_port: sink.port,
                    // A batch is one call whatever C is: it gets smtp-source's
                    // best connection count.
                    max_connections: if store.batch() { 32 } else { c },
                    messages_per_connection: 0,
                    log: args.log.clone(),
                    http_requests: c,
                    store: store.name(),
                    policy: store.policy(),
                    queue_extra,
                    max_message_bytes: None,
                    http_pool: args.http_pool,
                    http_modern: args.http_modern,
                    dkim_key: args.dkim_key.clone(),
                },
            )
            .await?,
        );
    }
    let cpu_of = |ds: &[Daemon]| -> Option<Duration> {
        ds.iter()
            .map(|d| load::proc_cpu(d.pid))
            .sum::<Option<Duration>>()
    };
    let db_name = url
        .as_ref()
        .and_then(|u| u.rsplit('/').next())
        .map(str::to_owned);
    let db_before = match (pg, &db_name) {
        (Some(pg), Some(db)) => Some((pg_statements(pg, db), pg.pid().map(pg_cpu), pg_wal_lsn(pg))),
        _ => None,
    };
    let cpu_before = cpu_of(&daemons);
    let sys_before = daemons
        .iter()
        .map(|d| load::proc_cpu_split(d.pid).map(|s| s.1))
        .sum::<Option<Duration>>();
    let client_before = load::self_cpu();
    let sink_before = load::proc_cpu(sink.pid());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    // The -lines client is one task for all C calls; rmcp's, one per call.
    let mut callers = c;
    if transport == Transport::StdioLines {
        let lines = daemons[0].take_lines().context("the daemon's pipes")?;
        tasks.spawn(lines_client(lines, c, n, body.clone()));
        callers = 0;
    }
    if transport == Transport::HttpPosts {
        let url = daemons[0].url().context("the daemon's address")?.to_owned();
        let client = reqwest::Client::new();
        for i in 0..c {
            let k = share(n, c, i);
            tasks.spawn(posts_client(
                client.clone(),
                url.clone(),
                i,
                k,
                body.clone(),
            ));
        }
        callers = 0;
    }
    for i in 0..callers {
        let (peer, body) = (daemons[i % daemons.len()].peer(), body.clone());
        let k = share(n, c, i);
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(k);
            let mut errors = 0;
            let mut first_error = None;
            let mut j = 0;
            while j < k {
                let sent = if store.batch() {
                    let count = BATCH.min(k - j);
                    load::send_batch(&peer, &format!("bench {i}.{j}"), &body, count).await
                } else {
                    vec![load::send_email(&peer, &format!("bench {i}.{j}"), &body).await]
                };
                j += sent.len().max(1);
                for r in sent {
                    if r.status == "sent" {
                        latencies.push(r.latency);
                    } else {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{}: {:?}", r.status, r.detail));
                    }
                }
            }
            (latencies, errors, first_error)
        });
    }
    let results = tasks.join_all().await;
    let elapsed = started.elapsed();
    let cpu = since(cpu_before, cpu_of(&daemons));
    let daemon_sys = since(
        sys_before,
        daemons
            .iter()
            .map(|d| load::proc_cpu_split(d.pid).map(|s| s.1))
            .sum::<Option<Duration>>(),
    );
    let client_cpu = since(client_before, load::self_cpu());
    let sink_cpu = since(sink_before, load::proc_cpu(sink.pid()));
    let db = match (pg, &db_name, db_before) {
        (Some(pg), Some(db), Some((statements, Some(cpu), lsn))) => {
            let after = pg.pid().map(pg_cpu).unwrap_or_default();
            let spent: Duration = after
                .iter()
                .map(|(pid, t)| t.saturating_sub(cpu.get(pid).copied().unwrap_or_default()))
                .sum();
            Some((
                pg_statements(pg, db).saturating_sub(statements),
                spent,
                pg_wal_since(pg, &lsn),
            ))
        }
        _ => None,
    };
    let peak_rss_kb = daemons
        .iter()
        .filter_map(|d| load::proc_sample(d.pid).ok().map(|s| s.hwm_kb))
        .max();
    let mut m = Measurement {
        messages: n,
        ok: 0,
        errors: 0,
        sink_count: 0,
        elapsed,
        latencies: Vec::with_capacity(n),
        first_error: None,
        peak_rss_kb,
        db,
        cpu,
        daemon_sys,
        client_cpu,
        sink_cpu,
    };
    for (lat, errors, first) in results {
        m.latencies.extend(lat);
        m.errors += errors;
        if m.first_error.is_none() {
            m.first_error = first;
        }
    }
    m.ok = m.latencies.len();
    m.latencies.sort_unstable();
    for d in daemons {
        d.stop().await?;
    }
    m.sink_count = sink.wait_count(m.ok as u64, Duration::from_secs(5));
    Ok(m)
}

/// The `-lines` client: `n` `send_email` calls with `c` in flight, written
/// as JSON-RPC lines to the daemon's stdin and matched by id as their
/// answers come back, with no rmcp client: only the id and whether the
/// result says `sent` are read from each answer. Returns what each call
/// task of [`run_mcp`] returns: the latencies of the sent, the errors and
/// the first error.
async fn lines_client(
    lines: load::Lines,
    c: usize,
    n: usize,
    body: Arc<String>,
) -> (Vec<Duration>, usize, Option<String>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

    /// What is read of an answer.
    #[derive(serde::Deserialize)]
    struct Answer {
        id: Option<u64>,
        result: Option<serde::de::IgnoredAny>,
    }

    let load::Lines {
        mut stdin,
        mut stdout,
    } = lines;
    let base = Instant::now();
    // When each call was written, in ns after `base`, by id.
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let slots = Arc::new(tokio::sync::Semaphore::new(c));
    let writer = {
        let (sent_at, slots) = (sent_at.clone(), slots.clone());
        let body = serde_json::to_string(body.as_str()).expect("a string");
        tokio::spawn(async move {
            for id in 0..n {
                slots.acquire().await.expect("never closed").forget();
                let line = format!(
                    "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"tools/call\",\"params\":{{\"name\":\"send_email\",\"arguments\":{{\"to\":\"{}\",\"subject\":\"bench {id}\",\"body\":{body}}}}}}}\n",
                    load::TO
                );
                sent_at[id].store(base.elapsed().as_nanos() as u64, Ordering::Relaxed);
                if stdin.write_all(line.as_bytes()).await.is_err() {
                    break;
                }
            }
            // Kept open until every answer is read: end of input stops the daemon.
            stdin
        })
    };
    let (mut latencies, mut errors, mut first_error) = (Vec::with_capacity(n), 0, None);
    let mut line = String::new();
    let mut answered = 0;
    while answered < n {
        line.clear();
        match stdout.read_line(&mut line).await {
            Ok(0) | Err(_) => {
                errors += n - answered;
                first_error.get_or_insert_with(|| "the daemon closed its stdout".to_string());
                break;
            }
            Ok(_) => {}
        }
        let Ok(Answer {
            id: Some(id),
            result,
        }) = serde_json::from_str::<Answer>(&line)
        else {
            continue; // a notification
        };
        answered += 1;
        slots.add_permits(1);
        if result.is_some() && line.contains(r#""status":"sent""#) {
            let at = sent_at[id as usize].load(Ordering::Relaxed);
            latencies.push(base.elapsed() - Duration::from_nanos(at));
        } else {
            errors += 1;
            first_error.get_or_insert_with(|| line.chars().take(300).collect());
        }
    }
    drop(writer.await);
    (latencies, errors, first_error)
}

/// One of C callers of an `HttpPosts` daemon: `k` stateless `send_email`
/// calls posted one after another, as wrk posts them, on a client that keeps
/// its connections.
async fn posts_client(
    client: reqwest::Client,
    url: String,
    i: usize,
    k: usize,
    body: Arc<String>,
) -> (Vec<Duration>, usize, Option<String>) {
    let body = serde_json::to_string(body.as_str()).expect("a string");
    let (mut latencies, mut errors, mut first_error) = (Vec::with_capacity(k), 0, None);
    for j in 0..k {
        let call = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{j},\"method\":\"tools/call\",\"params\":{{\"name\":\"send_email\",\"arguments\":{{\"to\":\"{}\",\"subject\":\"bench {i}.{j}\",\"body\":{body}}}}}}}",
            load::TO
        );
        let start = Instant::now();
        let answer = async {
            client
                .post(&url)
                .header("Content-Type", "application/json")
                .header("Accept", "application/json, text/event-stream")
                .header("MCP-Protocol-Version", "2025-06-18")
                .body(call)
                .send()
                .await?
                .text()
                .await
        }
        .await;
        match answer {
            Ok(text) if text.contains(r#""status":"sent""#) => latencies.push(start.elapsed()),
            Ok(text) => {
                errors += 1;
                first_error.get_or_insert_with(|| text.chars().take(300).collect());
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    (latencies, errors, first_error)
}

/// What memory the daemon takes idle and under `burst` concurrent calls.
#[derive(Debug)]
struct Memory {
    transport: Transport,
    size: usize,
    idle_rss_kb: u64,
    peak_rss_kb: u64,
    after_rss_kb: u64,
    ok: usize,
    burst: usize,
    elapsed: Duration,
    first_error: Option<String>,
}

/// Starts the daemon with its default pool (8 connections), waits a second,
/// reads VmRSS (idle), then makes `burst` calls at once and reads VmHWM.
async fn run_memory(
    args: &Args,
    transport: Transport,
    size: usize,
    burst: usize,
) -> anyhow::Result<Memory> {
    let sink = Sink::start(8, false)?;
    let daemon = Daemon::start(
        &args.bin,
        &DaemonOptions {
            transport,
            sink_port: sink.port,
            max_connections: 8,
            messages_per_connection: 100,
            log: args.log.clone(),
            http_requests: burst,
            store: Store::Sqlite.name(),
            policy: false,
            queue_extra: String::new(),
            max_message_bytes: None,
            http_pool: args.http_pool,
            http_modern: args.http_modern,
            dkim_key: args.dkim_key.clone(),
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = load::proc_sample(daemon.pid)?;
    let body = Arc::new(load::body(size));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..burst {
        let (peer, body) = (daemon.peer(), body.clone());
        tasks.spawn(async move { load::send_email(&peer, &format!("burst {i}"), &body).await });
    }
    let results = tasks.join_all().await;
    let elapsed = started.elapsed();
    let peak = load::proc_sample(daemon.pid)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = load::proc_sample(daemon.pid)?;
    daemon.stop().await?;
    let ok = results.iter().filter(|r| r.status == "sent").count();
    Ok(Memory {
        transport,
        size,
        idle_rss_kb: idle.rss_kb,
        peak_rss_kb: peak.hwm_kb,
        after_rss_kb: after.rss_kb,
        ok,
        burst,
        elapsed,
        first_error: results
            .iter()
            .find(|r| r.status != "sent")
            .map(|r| format!("{}: {:?}", r.status, r.detail)),
    })
}

/// The daemon's memory around one `send_batch` of `n` messages of `size`.
#[derive(Debug)]
struct BatchMemory {
    transport: Transport,
    size: usize,
    n: usize,
    /// The composed messages' total, as the daemon stores them.
    total_bytes: usize,
    idle_rss_kb: u64,
    peak_rss_kb: u64,
    after_rss_kb: u64,
    sent: usize,
    elapsed: Duration,
    first_error: Option<String>,
}

/// One `send_batch` of `n` messages of `size` (the body in `defaults`),
/// `wait: true`, on the sqlite store, with `max_message_bytes` raised to
/// let the batch's total through; VmRSS idle, VmHWM after, VmRSS 1 s later.
async fn run_batch_memory(
    args: &Args,
    transport: Transport,
    size: usize,
    n: usize,
) -> anyhow::Result<BatchMemory> {
    let sink = Sink::start(32, false)?;
    let limit = n * (2 * size + 8192) + (1 << 20);
    let daemon = Daemon::start(&args.bin, &one_daemon(args, transport, &sink, Some(limit))).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = load::proc_sample(daemon.pid)?;
    let body = load::body(size);
    let started = Instant::now();
    let results = load::send_batch(&daemon.peer(), "batch memory", &body, n).await;
    let elapsed = started.elapsed();
    let peak = load::proc_sample(daemon.pid)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = load::proc_sample(daemon.pid)?;
    daemon.stop().await?;
    let sent = results.iter().filter(|r| r.status == "sent").count();
    Ok(BatchMemory {
        transport,
        size,
        n,
        total_bytes: n * (size + 600),
        idle_rss_kb: idle.rss_kb,
        peak_rss_kb: peak.hwm_kb,
        after_rss_kb: after.rss_kb,
        sent,
        elapsed,
        first_error: if results.is_empty() {
            Some("the batch was refused whole".into())
        } else {
            results
                .iter()
                .find(|r| r.status != "sent")
                .map(|r| format!("{}: {:?}", r.status, r.detail))
        },
    })
}

/// One daemon on the sqlite store with 32 connections to `sink`, for the
/// measurements outside the table (`--batch-memory`, `--backlog`).
fn one_daemon(
    args: &Args,
    transport: Transport,
    sink: &Sink,
    max_message_bytes: Option<usize>,
) -> DaemonOptions {
    DaemonOptions {
        transport,
        sink_port: sink.port,
        max_connections: 32,
        messages_per_connection: 0,
        log: args.log.clone(),
        http_requests: 4,
        store: Store::Sqlite.name(),
        policy: false,
        queue_extra: String::new(),
        max_message_bytes,
        http_pool: args.http_pool,
        http_modern: args.http_modern,
        dkim_key: args.dkim_key.clone(),
    }
}

/// How fast the queue delivered mail that waited in its store.
#[derive(Debug)]
struct Backlog {
    n: usize,
    sink: u64,
    elapsed: Duration,
    /// The daemon's CPU time from the moment the mail was due (µs).
    cpu_us: u64,
    /// The daemon's peak RSS from the moment the mail was due (kB).
    peak_kb: Option<u64>,
}

/// Schedules `n` messages over stdio on the sqlite store, all due at one
/// moment a few seconds ahead, and times their delivery from that moment
/// to the last message at the sink. With `wait: false` and a `send_at`,
/// nothing is delivered by the calls: every message goes through the
/// runner's polls of the store, as mail recovered after a restart, retried
/// or scheduled does.
async fn run_backlog(args: &Args, size: usize, n: usize) -> anyhow::Result<Backlog> {
    let sink = Sink::start(32, false)?;
    let daemon = Daemon::start(&args.bin, &one_daemon(args, Transport::Stdio, &sink, None)).await?;
    let body = load::body(size);
    // Far enough ahead for the calls to store every message first.
    let lead = Duration::from_secs(3) + Duration::from_millis((n / 2) as u64);
    let due = std::time::SystemTime::now() + lead;
    let due_at = humantime::format_rfc3339_millis(due).to_string();
    let started = Instant::now();
    let mut scheduled = 0;
    // A batch's messages together stay within the default
    // `max_message_bytes` (10 MiB), as the daemon requires.
    let per_call = (8 << 20) / (size + 4096);
    while scheduled < n {
        let count = (n - scheduled).min(BATCH).min(per_call.max(1));
        let stored = load::schedule_batch(&daemon.peer(), &body, scheduled, count, &due_at).await?;
        if stored != count {
            bail!("{stored} of {count} messages were scheduled");
        }
        scheduled += count;
    }
    if started.elapsed() + Duration::from_millis(500) > lead {
        bail!(
            "scheduling took {:?}, past the messages' due time",
            started.elapsed()
        );
    }
    tokio::time::sleep_until((started + lead).into()).await;
    // The peak RSS from here on: "5" resets VmHWM to the RSS now.
    let reset = std::fs::write(format!("/proc/{}/clear_refs", daemon.pid), "5").is_ok();
    let cpu_before = load::proc_cpu(daemon.pid).unwrap_or_default();
    let from = Instant::now();
    let until = from + Duration::from_secs(120);
    while (sink.count() as usize) < n && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = from.elapsed();
    let cpu = load::proc_cpu(daemon.pid).unwrap_or_default() - cpu_before;
    let peak_kb = load::proc_sample(daemon.pid)
        .ok()
        .filter(|_| reset)
        .map(|s| s.hwm_kb);
    let sink_count = sink.count();
    daemon.stop().await?;
    Ok(Backlog {
        n,
        sink: sink_count,
        elapsed,
        cpu_us: cpu.as_micros() as u64,
        peak_kb,
    })
}

struct Row {
    size: usize,
    c: usize,
    path: Path,
    m: Measurement,
}

fn mb(kb: Option<u64>) -> String {
    kb.map_or("n/a".into(), |kb| format!("{:.1}", kb as f64 / 1024.0))
}

fn table(rows: &[Row], memory: &[Memory], runs: usize) -> String {
    let find = |size, c, path| {
        rows.iter()
            .find(|r| r.size == size && r.c == c && r.path == path)
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| size | C | path | messages | accepted (sink) | errors | msgs/s | p50 ms | p99 ms | daemon peak RSS MB | daemon (or smtp-source) CPU µs/msg | MCP client CPU µs/msg | sink CPU µs/msg | vs smtp-source |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in rows {
        let vs = match (r.path, find(r.size, r.c, Path::Source)) {
            (Path::Source, _) | (_, None) => String::new(),
            (_, Some(s)) => format!("{:.0} %", 100.0 * r.m.rate() / s.m.rate()),
        };
        let errors = if r.m.clean() {
            "0".to_owned()
        } else {
            format!("**{}**", r.m.errors.max(r.m.messages - r.m.ok))
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
            size_name(r.size),
            r.c,
            r.path.name(),
            r.m.messages,
            r.m.sink_count,
            errors,
            r.m.rate(),
            ms(load::percentile(&r.m.latencies, 0.50)),
            ms(load::percentile(&r.m.latencies, 0.99)),
            mb(r.m.peak_rss_kb),
            r.m.cpu_per_message(),
            r.m.per_message(r.m.client_cpu),
            r.m.per_message(r.m.sink_cpu),
            vs,
        );
    }
    let _ = writeln!(
        out,
        "\nBest of {runs} run(s) per row. CPU times come from /proc (10 ms ticks); the MCP client is the harness process itself."
    );
    if !memory.is_empty() {
        let _ = writeln!(
            out,
            "\n| transport | body | idle RSS MB | concurrent calls | sent | wall s | peak RSS MB (VmHWM) | RSS 1 s later MB |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
        for m in memory {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {:.2} | {} | {} |",
                m.transport.name(),
                size_name(m.size),
                mb(Some(m.idle_rss_kb)),
                m.burst,
                m.ok,
                m.elapsed.as_secs_f64(),
                mb(Some(m.peak_rss_kb)),
                mb(Some(m.after_rss_kb)),
            );
            if let Some(e) = &m.first_error {
                let _ = writeln!(out, "\nFirst failed call ({}): {e}", m.transport.name());
            }
        }
    }
    let pg_rows: Vec<&Row> = rows
        .iter()
        .filter(|r| matches!(r.path, Path::Mcp(_, store) if store.postgres()))
        .collect();
    if !pg_rows.is_empty() {
        let _ = writeln!(
            out,
            "\n| size | C | path | msgs/s | vs same transport on sqlite | PostgreSQL statements per message (2 round trips each) | PostgreSQL CPU µs/msg | PostgreSQL WAL bytes/msg | daemons' CPU µs/msg |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
        for r in &pg_rows {
            let Path::Mcp(t, store) = r.path else {
                continue;
            };
            let on_sqlite = if store.batch() {
                Store::Batch
            } else {
                Store::Sqlite
            };
            let vs = find(r.size, r.c, Path::Mcp(t, on_sqlite))
                .map(|s| format!("{:.0} %", 100.0 * r.m.rate() / s.m.rate()))
                .unwrap_or_default();
            let (statements, db_cpu, wal) = match r.m.db {
                Some((st, cpu, wal)) if r.m.ok > 0 => (
                    format!("{:.2}", st as f64 / r.m.ok as f64),
                    r.m.per_message(Some(cpu)),
                    format!("{:.0}", wal as f64 / r.m.ok as f64),
                ),
                _ => ("n/a".into(), "n/a".into(), "n/a".into()),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} |",
                size_name(r.size),
                r.c,
                r.path.name(),
                r.m.rate(),
                vs,
                statements,
                db_cpu,
                wal,
                r.m.cpu_per_message(),
            );
        }
    }
    let _ = writeln!(out, "\nTargets:");
    let mut sizes: Vec<usize> = rows.iter().map(|r| r.size).collect();
    sizes.dedup();
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    for size in sizes {
        let Some(source) = find(size, 32, Path::Source) else {
            continue;
        };
        for (path, target) in [
            (Path::Mcp(Transport::Stdio, Store::Sqlite), 0.6),
            (Path::Mcp(Transport::Stdio, Store::Memory), 0.6),
            (Path::Mcp(Transport::StdioLines, Store::Sqlite), 0.6),
            (Path::Mcp(Transport::Http, Store::Sqlite), 0.6),
        ] {
            if let Some(r) = find(size, 32, path) {
                let ratio = r.m.rate() / source.m.rate();
                let _ = writeln!(
                    out,
                    "- {} at C=32, {}: {:.0} % of smtp-source ({:.0} vs {:.0} msgs/s), target {:.0} %: {}.",
                    path.name(),
                    size_name(size),
                    ratio * 100.0,
                    r.m.rate(),
                    source.m.rate(),
                    target * 100.0,
                    verdict(ratio >= target)
                );
            }
        }
        for t in [Transport::Stdio, Transport::Http] {
            if let (Some(pg), Some(sq)) = (
                find(size, 32, Path::Mcp(t, Store::Postgres(1))),
                find(size, 32, Path::Mcp(t, Store::Sqlite)),
            ) {
                let ratio = pg.m.rate() / sq.m.rate();
                let _ = writeln!(
                    out,
                    "- {} at C=32, {}: {:.0} % of the same daemon on sqlite ({:.0} vs {:.0} msgs/s), target 50 %: {}.",
                    pg.path.name(),
                    size_name(size),
                    ratio * 100.0,
                    pg.m.rate(),
                    sq.m.rate(),
                    verdict(ratio >= 0.5)
                );
            }
        }
        if let Some(r) = find(size, 1, Path::Mcp(Transport::Stdio, Store::Sqlite))
            && let Some(p50) = load::percentile(&r.m.latencies, 0.5)
        {
            let _ = writeln!(
                out,
                "- MCP stdio (sqlite) p50 at C=1, {}: {} ms, target 1 ms: {}.",
                size_name(size),
                ms(Some(p50)),
                verdict(p50 <= Duration::from_millis(1))
            );
        }
    }
    for m in memory {
        let _ = writeln!(
            out,
            "- {} RSS idle {} MB (target 20 MB: {}); peak under {} calls of {} {} MB (target 150 MB: {}).",
            m.transport.name(),
            mb(Some(m.idle_rss_kb)),
            verdict(m.idle_rss_kb <= 20 * 1024),
            m.burst,
            size_name(m.size),
            mb(Some(m.peak_rss_kb)),
            verdict(m.peak_rss_kb <= 150 * 1024),
        );
    }
    out
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    for tool in [load::SMTP_SINK, load::SMTP_SOURCE] {
        if !std::path::Path::new(tool).exists() {
            bail!("{tool} is not installed (Postfix)");
        }
    }
    if !args.bin.exists() {
        bail!("{} does not exist", args.bin.display());
    }
    eprintln!("daemon binary: {}", args.bin.display());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // One PostgreSQL for the postgres paths, durable (fsync on) like the
    // sqlite store, counting statements; each run gets a fresh database.
    let pg = args
        .paths
        .iter()
        .any(|p| matches!(p, Path::Mcp(_, store) if store.postgres()))
        .then(|| {
            let pg = Postgres::start_configured(
                true,
                "shared_preload_libraries = 'pg_stat_statements'\npg_stat_statements.track = all\n\
                 pg_stat_statements.track_planning = on",
            );
            pg.psql(
                "postgres",
                "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
            );
            pg
        });
    let mut rows = Vec::new();
    for &(size, n) in &args.sizes {
        let body = Arc::new(load::body(size));
        for &c in &args.concurrency {
            let mut best: Vec<Option<Measurement>> = vec![None; args.paths.len()];
            // Paths take turns within each run, so that a burst of load from
            // elsewhere on the machine does not hit one path only.
            for run in 1..=args.runs {
                for (k, &path) in args.paths.iter().enumerate() {
                    let m = match path {
                        Path::Source => run_source(c, n, size),
                        Path::Ceiling => {
                            rt.block_on(ceiling::run(c, n, body.clone(), args.http_pool))
                        }
                        Path::Mcp(t, store) => {
                            rt.block_on(run_mcp(&args, pg.as_ref(), t, store, c, n, body.clone()))
                        }
                    }
                    .with_context(|| format!("{} at C={c}", path.name()))?;
                    eprintln!(
                        "size {size} C={c} run {run} {:<11} {:>7.0} msgs/s  ok {} errors {} sink {} p50 {} p99 {} peak RSS {} MB cpu/msg daemon {} (sys {}) client {} sink {}{}",
                        path.name(),
                        m.rate(),
                        m.ok,
                        m.errors,
                        m.sink_count,
                        ms(load::percentile(&m.latencies, 0.5)),
                        ms(load::percentile(&m.latencies, 0.99)),
                        mb(m.peak_rss_kb),
                        m.cpu_per_message(),
                        m.per_message(m.daemon_sys),
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
    let mut memory = Vec::new();
    if args.burst > 0 {
        for &path in &args.paths {
            // The memory of the default (sqlite) daemon, once per transport.
            let Path::Mcp(t @ (Transport::Stdio | Transport::Http), Store::Sqlite) = path else {
                continue;
            };
            for &(size, _) in &args.sizes {
                let m = rt.block_on(run_memory(&args, t, size, args.burst))?;
                eprintln!("memory: {m:?}");
                memory.push(m);
            }
        }
    }
    print!("{}", table(&rows, &memory, args.runs));
    if args.batch_memory > 0 {
        println!(
            "\n| transport | one send_batch of | message body | messages' total MB (about) | sent | wall s | idle RSS MB | peak RSS MB (VmHWM) | RSS 1 s later MB |\n|---|---|---|---|---|---|---|---|---|"
        );
        for t in [Transport::Stdio, Transport::Http] {
            for &(size, _) in &args.sizes {
                let m = rt.block_on(run_batch_memory(&args, t, size, args.batch_memory))?;
                eprintln!("batch memory: {m:?}");
                println!(
                    "| {} | {} | {} | {:.1} | {} | {:.2} | {} | {} | {} |",
                    m.transport.name(),
                    m.n,
                    size_name(m.size),
                    m.total_bytes as f64 / (1024.0 * 1024.0),
                    m.sent,
                    m.elapsed.as_secs_f64(),
                    mb(Some(m.idle_rss_kb)),
                    mb(Some(m.peak_rss_kb)),
                    mb(Some(m.after_rss_kb)),
                );
                if let Some(e) = &m.first_error {
                    println!("\nFirst failed message ({}): {e}", m.transport.name());
                }
            }
        }
    }
    if args.backlog > 0 {
        println!(
            "\n| store | message body | messages scheduled | sent (sink) | s from due to the last at the sink | msgs/s | daemon CPU µs/msg (from due) | daemon peak RSS MB (from due) |\n|---|---|---|---|---|---|---|---|"
        );
        for &(size, _) in &args.sizes {
            let b = rt.block_on(run_backlog(&args, size, args.backlog))?;
            eprintln!("backlog: {b:?}");
            println!(
                "| sqlite | {} | {} | {} | {:.2} | {:.0} | {:.1} | {} |",
                size_name(size),
                b.n,
                b.sink,
                b.elapsed.as_secs_f64(),
                b.sink as f64 / b.elapsed.as_secs_f64(),
                b.cpu_us as f64 / b.sink.max(1) as f64,
                mb(b.peak_kb),
            );
        }
    }
    if let Some(pg) = &pg {
        // Where PostgreSQL's time went, over every postgres run.
        println!(
            "\nPostgreSQL statements by total execution time (all postgres runs); plans: how many times a statement was planned, and the mean of each planning:\n\n| calls | total ms | mean µs | plans | mean plan µs | statement |\n|---|---|---|---|---|---|"
        );
        let top = pg.psql(
            "postgres",
            "SELECT calls || '|' || round(total_exec_time::numeric, 0) || '|' ||
                    round((1000 * mean_exec_time)::numeric, 0) || '|' ||
                    plans || '|' || round((1000 * mean_plan_time)::numeric, 0) || '|' ||
                    left(regexp_replace(query, '\\s+', ' ', 'g'), 90)
               FROM pg_stat_statements WHERE dbid <> (SELECT oid FROM pg_database WHERE datname = 'postgres')
              ORDER BY total_exec_time DESC LIMIT 10",
        );
        for line in top.lines() {
            println!("| {} |", line.replace('|', " | "));
        }
    }
    Ok(())
}

/// The ceiling of the bench's HTTP client: the same rmcp client, session and
/// calls as the `http` paths, against an rmcp server in this process whose
/// `send_email` answers `sent` at once and sends nothing. Client and server
/// share this process, so the CPU column is both.
mod ceiling {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::Context;
    use rmcp::handler::server::router::tool::ToolRouter;
    use rmcp::handler::server::wrapper::Parameters;
    use rmcp::model::{CallToolResult, ServerCapabilities, ServerConfig};
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService,
    };
    use rmcp::{ErrorData, ServerHandler, ServiceExt, tool, tool_handler, tool_router};

    use super::{Measurement, load, share};

    #[derive(serde::Deserialize, schemars::JsonSchema)]
    struct Args {
        #[allow(dead_code)]
        to: serde_json::Value,
        #[allow(dead_code)]
        subject: String,
        #[allow(dead_code)]
        body: String,
    }

    #[derive(Clone)]
    struct Trivial {
        tool_router: ToolRouter<Trivial>,
    }

    #[tool_router]
    impl Trivial {
        #[tool(name = "send_email", description = "Answers sent; sends nothing.")]
        async fn send_email(&self, _args: Parameters<Args>) -> Result<CallToolResult, ErrorData> {
            Ok(CallToolResult::structured(serde_json::json!(
                {"status": "sent", "message_id": "ceiling@localhost"}
            )))
        }
    }

    #[tool_handler(router = self.tool_router)]
    impl ServerHandler for Trivial {
        fn get_info(&self) -> ServerConfig {
            ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
        }
    }

    pub async fn run(
        c: usize,
        n: usize,
        body: Arc<String>,
        pool: bool,
    ) -> anyhow::Result<Measurement> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let service = StreamableHttpService::new(
            || {
                Ok(Trivial {
                    tool_router: Trivial::tool_router(),
                })
            },
            Arc::new(LocalSessionManager::default()),
            StreamableHttpServerConfig::default(),
        );
        let app = axum::Router::new().nest_service("/mcp", service);
        // Nagle off, as mailmux has it: with it on, a client that reuses its
        // connection waits for the delayed ACK (40 ms) on every call.
        use axum::serve::ListenerExt as _;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let transport =
            load::http_client_transport(format!("http://127.0.0.1:{port}/mcp"), c, pool);
        let client = ().serve(transport).await.context("MCP initialize")?;
        let cpu_before = load::self_cpu();
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..c {
            let (peer, body) = (client.peer().clone(), body.clone());
            let k = share(n, c, i);
            tasks.spawn(async move {
                let mut latencies = Vec::with_capacity(k);
                let mut errors = 0;
                for j in 0..k {
                    let r = load::send_email(&peer, &format!("bench {i}.{j}"), &body).await;
                    if r.status == "sent" {
                        latencies.push(r.latency);
                    } else {
                        errors += 1;
                    }
                }
                (latencies, errors)
            });
        }
        let results = tasks.join_all().await;
        let elapsed = started.elapsed();
        let cpu = super::since(cpu_before, load::self_cpu());
        let _ = client.cancel().await;
        server.abort();
        let mut latencies: Vec<Duration> = Vec::with_capacity(n);
        let mut errors = 0;
        for (l, e) in results {
            latencies.extend(l);
            errors += e;
        }
        latencies.sort_unstable();
        Ok(Measurement {
            messages: n,
            ok: latencies.len(),
            errors,
            sink_count: 0,
            elapsed,
            latencies,
            first_error: None,
            peak_rss_kb: None,
            db: None,
            cpu: None,
            daemon_sys: None,
            client_cpu: cpu,
            sink_cpu: None,
        })
    }
}
