//! The command line: `serve` (the default), one-shot `send`, `check`,
//! `config`, and `queue` (approve and reject held messages). It loads configuration, starts the actors and maps outcomes to
//! exit codes; the work itself is done by `mcp` and the dispatcher.

/// `println!` for the commands' output, except that a reader that has gone
/// away (`mailmux queue list | head`) ends the printing, not the command:
/// `println!` panics then, half way through a `queue cancel --batch` that
/// prints a line for each message it cancels.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub(crate) mod queue;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::Engine;
use clap::{Args, Parser, Subcommand};
use mailmux_actors::queue::{Queue, StoreError};
use mailmux_actors::{Dispatcher, Secret};
use tracing::Instrument;

use crate::compose::{AttachmentInput, Draft, Recipients};
use crate::config::{self, Config, Sources};
use crate::logging::LogFormat;
use crate::mcp::types::{ProbeOut, SendEmailParams, SendStatus};
use crate::mcp::{self, MailmuxServer, Transport};

/// Exit code of a usage or configuration error.
const EXIT_CONFIG: u8 = 2;

/// mailmux: an MCP server through which AI agents send email, with relay failover.
#[derive(Debug, Parser)]
#[command(name = "mailmux", version, about)]
pub struct Cli {
    /// Configuration file (TOML, YAML or JSON). Else `MAILMUX_CONFIG`.
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Log line format (logs always go to stderr).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve MCP on stdio (default) or streamable HTTP.
    Serve(ServeArgs),
    /// Send one message through the relays and print the result as JSON.
    Send(Box<SendArgs>),
    /// Probe every relay and print a table; exit 0 only if all are OK.
    Check,
    /// Print the effective configuration, secrets redacted, with each value's source.
    Config,
    /// Print the DNS TXT record of each `[[dkim]]` key's public key, one
    /// zone file line a key, to publish before mail is signed with it.
    Dkim,
    /// Read and act on the queue's store: list, show, cancel, retry, purge,
    /// stats, backup, restore, migrate, and approve or reject held messages
    /// (an operator's token in MAILMUX_OPERATOR_TOKEN).
    #[command(subcommand)]
    Queue(queue::QueueCommand),
}

#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// Serve streamable HTTP at /mcp instead of stdio, on ADDR (default:
    /// `http.bind` from the configuration, 127.0.0.1:8025).
    #[arg(long, value_name = "ADDR", num_args = 0..=1)]
    pub http: Option<Option<SocketAddr>>,
    /// HTTP without sessions: each POST is answered on its own.
    #[arg(long, requires = "http")]
    pub stateless: bool,
    /// Serve /metrics on a listener of its own at ADDR (`metrics.bind`),
    /// for a daemon serving stdio.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
}

#[derive(Debug, Default, Args)]
pub struct SendArgs {
    /// Recipient (repeatable, or comma-separated).
    #[arg(long, required = true)]
    pub to: Vec<String>,
    #[arg(long)]
    pub cc: Vec<String>,
    #[arg(long)]
    pub bcc: Vec<String>,
    /// Sender; defaults to the configured sender.
    #[arg(long)]
    pub from: Option<String>,
    #[arg(long, default_value = "")]
    pub subject: String,
    /// The body text.
    #[arg(long, conflicts_with = "body_file")]
    pub body: Option<String>,
    /// Read the body from a file.
    #[arg(long, value_name = "PATH")]
    pub body_file: Option<PathBuf>,
    /// The body is HTML.
    #[arg(long)]
    pub html: bool,
    /// Send a template the configuration names (`[[templates]]`): it writes
    /// the subject and the bodies.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["subject", "body", "body_file", "html"])]
    pub template: Option<String>,
    /// A template variable, `NAME=VALUE` (repeatable); with `--template`,
    /// or for `{NAME}` in `--subject` and the body.
    #[arg(long = "var", value_name = "NAME=VALUE", value_parser = var_arg)]
    pub vars: Vec<(String, String)>,
    /// Attach a file (repeatable); sent inline, so no attachments_dir is needed.
    #[arg(long, value_name = "PATH")]
    pub attach: Vec<PathBuf>,
    /// A file the HTML body shows, `ID=PATH` (repeatable): the body names
    /// it as `cid:ID` (`<img src="cid:logo">`).
    #[arg(long, value_name = "ID=PATH", value_parser = inline_arg)]
    pub inline: Vec<(String, PathBuf)>,
    /// Add a header field of your own, `NAME: VALUE` (repeatable): an `X-`
    /// field, or one that `send_email`'s `headers` takes.
    #[arg(long, value_name = "NAME: VALUE", value_parser = header_arg)]
    pub header: Vec<(String, String)>,
    /// A label of your own for the message (a campaign, a ticket), which
    /// `mailmux queue list --tag` filters by. Not sent.
    #[arg(long)]
    pub tag: Option<String>,
    /// A name and value of your own kept with the message, `NAME=VALUE`
    /// (repeatable), shown with its status. Not sent.
    #[arg(long = "metadata", value_name = "NAME=VALUE", value_parser = var_arg)]
    pub metadata: Vec<(String, String)>,
    /// `high` for mail a person waits for: it takes a relay's next turn and
    /// next free connection before normal mail.
    #[arg(long, value_name = "high|normal", value_parser = priority_arg)]
    pub priority: Option<crate::compose::PriorityParam>,
    /// Try this relay first.
    #[arg(long)]
    pub relay: Option<String>,
    /// Render and validate only; send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Make the send safe to repeat: a second send with this key and the
    /// same content sends nothing and prints the first message's status.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// Send later: an RFC 3339 time or a delay such as 10m.
    #[arg(long, value_name = "WHEN")]
    pub send_at: Option<String>,
    /// Give up on the message (`expired`) if it is not delivered within
    /// this long of being due, such as 5m; at most the caller's max_age.
    #[arg(long, value_name = "DURATION")]
    pub max_age: Option<String>,
    /// Answer once the message is durably queued, without waiting for the
    /// delivery (it is delivered now, or by the next daemon to start).
    #[arg(long)]
    pub no_wait: bool,
}

impl Cli {
    /// Whether this command serves MCP over stdio (`serve` without `--http`,
    /// or no command).
    pub fn serves_stdio(&self) -> bool {
        match &self.command {
            None => true,
            Some(Command::Serve(args)) => args.http.is_none(),
            Some(_) => false,
        }
    }

    /// Whether this command serves MCP over HTTP (`serve --http`).
    pub fn serves_http(&self) -> bool {
        matches!(&self.command, Some(Command::Serve(args)) if args.http.is_some())
    }

    /// The tokio runtime for this command. Over stdio the daemon serves one
    /// client, whose requests rmcp reads one at a time, and an MCP host starts
    /// one such process per client: it runs on one worker thread, which on a
    /// busy two-core machine spent about a fifth less CPU per `send_email`
    /// than two workers waking each other (BENCHMARKS.md). Over HTTP, the
    /// shared daemon runs one worker per core but one, which it leaves to
    /// the queue's writer thread (SQLite) and the kernel's loopback work: on
    /// two cores, one worker answered one call at a time in about 0.5 ms
    /// where two took 0.8, for about 40 % less CPU a call. The other
    /// commands: one worker per core. `TOKIO_WORKER_THREADS`, when set,
    /// decides instead.
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.enable_all();
        if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
            if self.serves_stdio() {
                builder.worker_threads(1);
            } else if self.serves_http() {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                builder.worker_threads(cores.saturating_sub(1).max(1));
            }
        }
        builder.build()
    }
}

/// Runs the command and returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    if cli.serves_stdio() || cli.serves_http() {
        mcp::listen_for_hangups();
    }
    let sources = Sources {
        file: cli.config.clone(),
    };
    let command = cli
        .command
        .unwrap_or_else(|| Command::Serve(ServeArgs::default()));
    let config = match load(&sources).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("mailmux: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    config::warn_stray_env(&config);
    match command {
        Command::Serve(args) => serve(config, sources, args).await,
        Command::Send(args) => send(config, sources, *args).await,
        Command::Check => check(config).await,
        Command::Config => print_config(&config),
        Command::Dkim => print_dkim_records(&config),
        Command::Queue(cmd) => queue::run(config, cmd).await,
    }
}

async fn load(sources: &Sources) -> Result<Config, String> {
    let sources = sources.clone();
    match tokio::task::spawn_blocking(move || config::load(&sources)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("loading the configuration failed: {e}")),
    }
}

/// Resolves on SIGINT or SIGTERM, which begins the drain. A second one,
/// while the daemon drains, stops the process at once (exit 130 for SIGINT,
/// 143 for SIGTERM, as a shell reports a death by either): deliveries in
/// flight are abandoned as a crash would leave them, and the queue's store
/// recovers them at the next start.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => tracing::info!("SIGINT received"),
                _ = term.recv() => tracing::info!("SIGTERM received"),
            }
            tokio::spawn(async move {
                let (name, code) = tokio::select! {
                    _ = int.recv() => ("SIGINT", 130),
                    _ = term.recv() => ("SIGTERM", 143),
                };
                tracing::warn!(
                    signal = name,
                    "a second signal: stopping now, without waiting for deliveries in \
                     flight; the queue recovers them at the next start"
                );
                std::process::exit(code);
            });
        }
        _ => {
            tracing::warn!("cannot listen for SIGTERM; only Ctrl-C stops the daemon");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn serve(mut config: Config, sources: Sources, args: ServeArgs) -> ExitCode {
    raise_open_files_limit();
    if args.metrics.is_some() {
        config.daemon.metrics.bind = args.metrics;
    }
    let transport = match args.http {
        None => Transport::Stdio,
        Some(addr) => {
            // The token may come from the environment even when the
            // configuration layer did not map it.
            if config.daemon.http.token.is_none()
                && let Ok(token) = std::env::var("MAILMUX_HTTP_TOKEN")
                && !token.is_empty()
            {
                config.daemon.http.token = Some(Secret::new(token));
            }
            Transport::Http {
                bind: addr.unwrap_or(config.daemon.http.bind),
                stateful: config.daemon.http.stateful && !args.stateless,
            }
        }
    };
    match mcp::run(config, sources, transport, shutdown_signal()).await {
        Ok(()) => {
            tracing::info!("mailmux stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let chain = error_chain(&e);
            tracing::error!("{chain}");
            eprintln!("mailmux: {chain}");
            ExitCode::FAILURE
        }
    }
}

/// Raises this process's soft limit of open files to its hard limit, as
/// most servers do: the soft limit is often 1,024, which the store's files,
/// the relays' connections and the HTTP clients' connections would share.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(open_files = n, "limit of open files"),
        Err(e) => tracing::warn!(error = %e, "could not raise the limit of open files"),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Reads at most `limit` bytes of a file, or says it is larger: a path may
/// name a device or a pipe (`/dev/stdin`) that never ends.
fn read_file(path: &Path, what: &str, limit: (usize, &str)) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let (max, key) = limit;
    let cannot = |e: std::io::Error| format!("cannot read {what} {}: {e}", path.display());
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| {
            f.take((max as u64).saturating_add(1))
                .read_to_end(&mut bytes)
        })
        .map_err(cannot)?;
    if bytes.len() > max {
        return Err(format!(
            "{what} {} is larger than {max} bytes ({key})",
            path.display()
        ));
    }
    Ok(bytes)
}

/// `--header NAME: VALUE`, split at the first `:`; the value's leading
/// whitespace is the separator's.
fn header_arg(arg: &str) -> Result<(String, String), String> {
    match arg.split_once(':') {
        Some((name, value)) if !name.is_empty() => {
            Ok((name.to_owned(), value.trim_start().to_owned()))
        }
        _ => Err("expected NAME: VALUE, such as \"X-Ticket: 1234\"".into()),
    }
}

fn var_arg(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err("expected NAME=VALUE, such as \"order=1042\"".into()),
    }
}

fn inline_arg(arg: &str) -> Result<(String, PathBuf), String> {
    match arg.split_once('=') {
        Some((id, path)) if !id.is_empty() && !path.is_empty() => {
            Ok((id.to_owned(), PathBuf::from(path)))
        }
        _ => Err("expected ID=PATH, such as \"logo=logo.png\"".into()),
    }
}

fn draft_from_args(
    args: &SendArgs,
    policy: &crate::compose::ComposePolicy,
) -> Result<Draft, String> {
    let body_limit = (policy.max_message_bytes, "max_message_bytes");
    let body = match (&args.body, &args.body_file) {
        (Some(b), _) => b.clone(),
        (None, Some(p)) => String::from_utf8(read_file(p, "body file", body_limit)?)
            .map_err(|_| format!("body file {} is not UTF-8", p.display()))?,
        (None, None) => String::new(),
    };
    let mut attachments = Vec::with_capacity(args.attach.len() + args.inline.len());
    let files = args.attach.iter().map(|p| (None, p));
    let shown = args.inline.iter().map(|(id, p)| (Some(id), p));
    for (content_id, path) in files.chain(shown) {
        let limit = (policy.max_attachment_bytes, "max_attachment_bytes");
        let bytes = read_file(path, "attachment", limit)?;
        let filename = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "attachment".into());
        attachments.push(AttachmentInput::Inline {
            filename,
            content_base64: base64::engine::general_purpose::STANDARD.encode(bytes),
            content_type: None,
            content_id: content_id.cloned(),
        });
    }
    use crate::compose::labels::by_name;
    let headers = by_name(args.header.iter().cloned()).map_err(|e| format!("--header {e}"))?;
    let vars = by_name(args.vars.iter().cloned()).map_err(|e| format!("--var {e}"))?;
    let metadata = by_name(args.metadata.iter().cloned()).map_err(|e| format!("--metadata {e}"))?;
    Ok(Draft {
        template: args.template.clone(),
        template_vars: (!vars.is_empty()).then_some(vars),
        to: Recipients::List(args.to.clone()),
        cc: Recipients::List(args.cc.clone()),
        bcc: Recipients::List(args.bcc.clone()),
        subject: args.subject.clone(),
        body,
        html: args.html,
        from_email: args.from.clone(),
        attachments,
        headers,
        tag: args.tag.clone(),
        metadata,
        priority: args.priority,
        ..Draft::default()
    })
}

fn priority_arg(s: &str) -> Result<crate::compose::PriorityParam, String> {
    match s {
        "high" => Ok(crate::compose::PriorityParam::High),
        "normal" => Ok(crate::compose::PriorityParam::Normal),
        _ => Err("high or normal".into()),
    }
}

/// The dispatcher and the queue for `send`. When a daemon holds the store,
/// `--no-wait` hands the message to it through the store.
async fn start_queue(config: &Config, no_wait: bool) -> Option<Queue> {
    if let Some(w) = mcp::default_relay_warning(config) {
        tracing::warn!("{w}");
    }
    let started = match mcp::start_queue(config).await {
        Err(mcp::RunError::Queue(StoreError::Locked { .. })) if no_wait => {
            let q = mcp::start_handoff(config).await;
            if q.is_ok() {
                eprintln!(
                    "mailmux: a running daemon holds the queue store; the message is handed to it"
                );
            }
            q
        }
        other => other,
    };
    match started {
        Ok(q) => Some(q),
        Err(e) => {
            let locked = matches!(e, mcp::RunError::Queue(StoreError::Locked { .. }));
            let e = anyhow::Error::new(e);
            tracing::error!("{e:#}");
            eprintln!("mailmux: {e:#}");
            if locked {
                eprintln!("mailmux: with --no-wait the message is handed to that daemon instead");
            }
            None
        }
    }
}

async fn start(config: &Config) -> Option<Dispatcher> {
    if let Some(w) = mcp::default_relay_warning(config) {
        tracing::warn!("{w}");
    }
    match Dispatcher::start(config.dispatch.clone()).await {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::error!("cannot start the relays: {e}");
            eprintln!("mailmux: cannot start the relays: {e}");
            None
        }
    }
}

async fn send(config: Config, sources: Sources, args: SendArgs) -> ExitCode {
    let draft = match draft_from_args(&args, &config.daemon.compose) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("mailmux: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let grace = config.daemon.shutdown_grace;
    let Some(queue) = start_queue(&config, args.no_wait && !args.dry_run).await else {
        return ExitCode::FAILURE;
    };
    let server = MailmuxServer::new(queue.clone(), config, sources).await;
    let params = SendEmailParams {
        draft,
        relay: args.relay,
        dry_run: Some(args.dry_run),
        idempotency_key: args.idempotency_key,
        wait: Some(!args.no_wait),
        send_at: args.send_at,
        max_age: args.max_age,
    };
    // The command line sends as the stdio caller, under its policy.
    let caller = server.gate().stdio_caller();
    let (out, text) = server
        .send_email_params(caller, params, &mut mcp::approval::Ask::Nobody, None)
        .instrument(mcp::tools::tool_span("send"))
        .await;
    queue.shutdown(grace).await;
    match serde_json::to_string_pretty(&out) {
        Ok(json) => say!("{json}"),
        Err(e) => eprintln!("mailmux: {e}"),
    }
    eprintln!("{text}");
    match out.status {
        SendStatus::Sent | SendStatus::DryRun => ExitCode::SUCCESS,
        SendStatus::Queued | SendStatus::Scheduled if out.error.is_none() && args.no_wait => {
            ExitCode::SUCCESS
        }
        SendStatus::Scheduled if out.error.is_none() => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

/// One row of the `check` table.
pub fn probe_row(p: &ProbeOut) -> String {
    let auth = match (p.token, p.auth) {
        // XOAUTH2: the token, then the server's answer.
        (Some(false), _) => "NO TOKEN",
        (Some(true), Some(true)) => "token ok",
        (Some(true), _) => "token, FAILED",
        (None, Some(true)) => "ok",
        (None, Some(false)) => "FAILED",
        (None, None) => "-",
    };
    let error = match (&p.error_class, &p.error_text) {
        (Some(c), Some(t)) => format!("{c}: {t}"),
        (Some(c), None) => c.clone(),
        // What the server announced beyond the columns: DSN, then LIMITS.
        _ => [
            p.dsn.then(|| "DSN".to_string()),
            p.limits
                .as_ref()
                .map(|l| format!("LIMITS {}", l.announced())),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" "),
    };
    format!(
        "{:<20} {:<9} {:<4} {:<13} {:<10} {:>10} {:>8} {}",
        p.relay,
        if p.reachable { "yes" } else { "NO" },
        if p.tls { "yes" } else { "no" },
        auth,
        if p.pipelining { "yes" } else { "no" },
        p.size_limit
            .map_or_else(|| "-".to_string(), |n| n.to_string()),
        format!("{}ms", p.latency_ms),
        error
    )
}

async fn check(config: Config) -> ExitCode {
    let grace = config.daemon.shutdown_grace;
    let Some(dispatcher) = start(&config).await else {
        return ExitCode::FAILURE;
    };
    let reports = dispatcher.test_connection(None).await;
    dispatcher.shutdown(grace).await;
    let reports = match reports {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mailmux: {e}");
            return ExitCode::FAILURE;
        }
    };
    say!(
        "{:<20} {:<9} {:<4} {:<13} {:<10} {:>10} {:>8} ERROR OR EXTENSIONS",
        "RELAY",
        "REACHABLE",
        "TLS",
        "AUTH",
        "PIPELINING",
        "SIZE",
        "LATENCY"
    );
    let mut all_ok = !reports.is_empty();
    for report in &reports {
        let p = ProbeOut::from(report);
        all_ok &= p.reachable && p.error_class.is_none() && p.auth != Some(false);
        say!("{}", probe_row(&p));
    }
    if let Some(w) = mcp::default_relay_warning(&config) {
        say!("WARNING: {w}");
    }
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn print_config(config: &Config) -> ExitCode {
    match serde_json::to_string_pretty(&config.redacted) {
        Ok(json) => {
            say!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mailmux: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_dkim_records(config: &Config) -> ExitCode {
    let keys = &config.daemon.compose.dkim.0;
    if keys.is_empty() {
        eprintln!("mailmux: no [[dkim]] keys are configured");
        return ExitCode::FAILURE;
    }
    for key in keys {
        say!("{}", key.zone_line());
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_is_the_default_and_http_takes_an_optional_addr() {
        let cli = Cli::try_parse_from(["mailmux"]).unwrap();
        assert!(cli.command.is_none());
        let cli = Cli::try_parse_from(["mailmux", "serve", "--http", "127.0.0.1:9000"]).unwrap();
        match cli.command {
            Some(Command::Serve(a)) => {
                assert_eq!(a.http, Some(Some("127.0.0.1:9000".parse().unwrap())))
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["mailmux", "serve", "--http", "--stateless"]).unwrap();
        match cli.command {
            Some(Command::Serve(a)) => {
                assert_eq!(a.http, Some(None));
                assert!(a.stateless);
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["mailmux", "serve", "--stateless"]).is_err());
    }

    #[test]
    fn only_serve_with_http_counts_as_http() {
        let http = |args: &[&str]| Cli::try_parse_from(args).unwrap().serves_http();
        assert!(http(&["mailmux", "serve", "--http", "127.0.0.1:0"]));
        assert!(!http(&["mailmux"]));
        assert!(!http(&["mailmux", "serve"]));
        assert!(!http(&["mailmux", "check"]));
    }

    #[test]
    fn only_stdio_serving_counts_as_stdio() {
        let stdio = |args: &[&str]| Cli::try_parse_from(args).unwrap().serves_stdio();
        assert!(stdio(&["mailmux"]));
        assert!(stdio(&["mailmux", "serve"]));
        assert!(!stdio(&["mailmux", "serve", "--http"]));
        assert!(!stdio(&["mailmux", "check"]));
        assert!(!stdio(&["mailmux", "send", "--to", "a@example.org"]));
    }

    #[test]
    fn header_flags_are_split_at_the_first_colon() {
        let args = |extra: &[&str]| {
            let mut all = vec!["mailmux", "send", "--to", "a@example.org"];
            all.extend_from_slice(extra);
            Cli::try_parse_from(all).map(|cli| match cli.command {
                Some(Command::Send(args)) => args,
                _ => panic!("not send"),
            })
        };
        let a = args(&[
            "--header",
            "X-Ticket: T:1",
            "--header",
            "Auto-Submitted:auto-generated",
        ])
        .unwrap();
        let draft = draft_from_args(&a, &Default::default()).unwrap();
        assert_eq!(draft.headers["X-Ticket"], "T:1");
        assert_eq!(draft.headers["Auto-Submitted"], "auto-generated");
        // No name, no colon: a usage error from the parser.
        for bad in [": v", "X-Ticket"] {
            let e = args(&["--header", bad]).map(|_| ()).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{bad}");
        }
        let twice = args(&["--header", "X-A: 1", "--header", "X-A: 2"]).unwrap();
        let e = draft_from_args(&twice, &Default::default()).unwrap_err();
        assert!(e.contains("given twice"), "{e}");
    }

    #[test]
    fn send_flags_build_a_draft_with_inline_attachments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        std::fs::write(&path, b"hello").unwrap();
        let cli = Cli::try_parse_from([
            "mailmux",
            "--config",
            "x.toml",
            "send",
            "--to",
            "a@example.org",
            "--to",
            "b@example.org",
            "--subject",
            "Hi",
            "--body",
            "text",
            "--attach",
            path.to_str().unwrap(),
            "--inline",
            &format!("logo@example.org={}", path.display()),
        ])
        .unwrap();
        assert_eq!(cli.config, Some(PathBuf::from("x.toml")));
        let Some(Command::Send(args)) = cli.command else {
            panic!("not send")
        };
        let draft = draft_from_args(&args, &Default::default()).unwrap();
        assert_eq!(
            draft.to,
            Recipients::List(vec!["a@example.org".into(), "b@example.org".into()])
        );
        assert_eq!(draft.attachments.len(), 2);
        for (a, id) in draft
            .attachments
            .iter()
            .zip([None, Some("logo@example.org")])
        {
            match a {
                AttachmentInput::Inline {
                    filename,
                    content_base64,
                    content_id,
                    ..
                } => {
                    assert_eq!(filename, "a.txt");
                    assert_eq!(content_base64, "aGVsbG8=");
                    assert_eq!(content_id.as_deref(), id);
                }
                other => panic!("{other:?}"),
            }
        }
        for bad in ["logo", "=a.png", "logo="] {
            let e = Cli::try_parse_from(["mailmux", "send", "--to", "a@x.org", "--inline", bad])
                .expect_err("refused");
            assert!(e.to_string().contains("ID=PATH"), "{bad}: {e}");
        }
    }
}
