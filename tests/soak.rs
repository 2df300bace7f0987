//! The soak: the `mailmux` binary under steady MCP load to Postfix's
//! smtp-sink, sampled every 5 s for RSS, open file descriptors and live tokio
//! tasks, then reconciled with the sink by Message-ID. It is `#[ignore]`d so
//! that the normal test run skips it; CI runs the short mode on its own.
//!
//! ```text
//! cargo test --test soak -- --ignored --nocapture                     # short: 60 s
//! MAILMUX_SOAK=long cargo test --release --test soak -- --ignored --nocapture  # 200 000 messages
//! ```
//!
//! Knobs (environment): `MAILMUX_SOAK` (`short` | `long`),
//! `MAILMUX_SOAK_MESSAGES`, `MAILMUX_SOAK_SECONDS`, `MAILMUX_SOAK_CONCURRENCY`,
//! `MAILMUX_SOAK_TRANSPORT` (`stdio` | `http`), `MAILMUX_SOAK_RETAIN` (the
//! store's `retain`, 10 s unless set: finished messages are purged while
//! the soak runs, and the store's size must level off). Output:
//! `target/soak/soak.csv` and `target/soak/soak.png`.

mod load;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use load::{Daemon, DaemonOptions, ProcSample, Sink, Transport};

/// Samples are this far apart.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Samples up to this point set the baseline: pools fill, allocator arenas
/// and buffers reach their working size.
const WARM_UP: Duration = Duration::from_secs(15);
/// After warm-up, RSS may reach at most the warm-up peak × RSS_FACTOR + RSS_SLACK_KB.
const RSS_FACTOR: f64 = 1.5;
const RSS_SLACK_KB: u64 = 10 * 1024;
/// After warm-up, open file descriptors may exceed the warm-up peak by at most this.
const FD_SLACK: u64 = 8;
/// Once the load has stopped and the pool is idle, live tasks may exceed
/// their count before the load by at most this.
const TASK_SLACK: u64 = 4;
/// Once `retain` has purged for a while (warm-up, then `retain` and two
/// purges later), the store on disk may reach at most its size then ×
/// STORE_FACTOR + STORE_SLACK_KB: it holds about `retain` worth of mail.
const STORE_FACTOR: f64 = 1.5;
const STORE_SLACK_KB: u64 = 4 * 1024;
/// The soak's default `retain`.
const RETAIN: &str = "10s";

#[derive(Debug, Clone)]
struct Plan {
    mode: &'static str,
    messages: u64,
    duration: Option<Duration>,
    concurrency: usize,
    transport: Transport,
    retain: Duration,
}

fn env_num(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.replace('_', "").parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={v:?} is not a number"),
    }
}

fn plan() -> Plan {
    let long = match std::env::var("MAILMUX_SOAK").as_deref() {
        Ok("long") => true,
        Ok("short") | Err(_) => false,
        Ok(other) => panic!("MAILMUX_SOAK={other:?}: use short or long"),
    };
    let (mode, messages, duration) = if long {
        ("long", 200_000, None)
    } else {
        ("short", u64::MAX, Some(Duration::from_secs(60)))
    };
    let transport = match std::env::var("MAILMUX_SOAK_TRANSPORT").as_deref() {
        Ok("http") => Transport::Http,
        Ok("stdio") | Err(_) => Transport::Stdio,
        Ok(other) => panic!("MAILMUX_SOAK_TRANSPORT={other:?}: use stdio or http"),
    };
    Plan {
        mode,
        messages: env_num("MAILMUX_SOAK_MESSAGES").unwrap_or(messages),
        duration: env_num("MAILMUX_SOAK_SECONDS")
            .map(Duration::from_secs)
            .or(duration),
        concurrency: env_num("MAILMUX_SOAK_CONCURRENCY").unwrap_or(16) as usize,
        transport,
        retain: {
            let v = std::env::var("MAILMUX_SOAK_RETAIN").unwrap_or_else(|_| RETAIN.into());
            match humantime::parse_duration(&v) {
                Ok(d) if d >= Duration::from_secs(1) => d,
                _ => panic!("MAILMUX_SOAK_RETAIN={v:?}: use a duration of 1s or more"),
            }
        },
    }
}

#[derive(Debug, Clone, Copy)]
struct Row {
    t: f64,
    sent: u64,
    rate: f64,
    proc: ProcSample,
    alive_tasks: u64,
    workers: u64,
    store_kb: u64,
}

fn csv(rows: &[Row]) -> String {
    let mut out = String::from(
        "elapsed_s,messages_answered,msgs_per_s,rss_kb,hwm_kb,fds,threads,alive_tasks,workers,store_kb\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:.1},{},{:.1},{},{},{},{},{},{},{}",
            r.t,
            r.sent,
            r.rate,
            r.proc.rss_kb,
            r.proc.hwm_kb,
            r.proc.fds,
            r.proc.threads,
            r.alive_tasks,
            r.workers,
            r.store_kb
        );
    }
    out
}

/// A font for the plot's text: plotters draws text with ab_glyph, which
/// needs a font file (Debian's fonts-dejavu-core; `.ci/run` installs it).
const FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn plot(rows: &[Row], title: &str, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let font = FONTS
        .iter()
        .find_map(|f| std::fs::read(f).ok())
        .ok_or_else(|| anyhow::anyhow!("no font file among {FONTS:?}"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into()))
        .map_err(|_| anyhow::anyhow!("the font file does not parse"))?;
    let (w, h) = (1000u32, 900u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 20))?;
        let panels = root.split_evenly((3, 1));
        let t_max = rows.last().map_or(1.0, |r| r.t).max(1.0);
        type Series<'a> = (&'a str, RGBColor, Box<dyn Fn(&Row) -> f64>);
        let charts: [(&str, Vec<Series>); 3] = [
            (
                "throughput (msgs/s)",
                vec![("msgs/s", BLUE, Box::new(|r: &Row| r.rate))],
            ),
            (
                "memory (MB)",
                vec![
                    (
                        "RSS",
                        RED,
                        Box::new(|r: &Row| r.proc.rss_kb as f64 / 1024.0),
                    ),
                    (
                        "peak RSS",
                        MAGENTA,
                        Box::new(|r: &Row| r.proc.hwm_kb as f64 / 1024.0),
                    ),
                    (
                        "store on disk",
                        BLUE,
                        Box::new(|r: &Row| r.store_kb as f64 / 1024.0),
                    ),
                ],
            ),
            (
                "open FDs, live tasks, threads",
                vec![
                    ("FDs", BLACK, Box::new(|r: &Row| r.proc.fds as f64)),
                    (
                        "tokio tasks",
                        GREEN,
                        Box::new(|r: &Row| r.alive_tasks as f64),
                    ),
                    ("threads", CYAN, Box::new(|r: &Row| r.proc.threads as f64)),
                ],
            ),
        ];
        for (area, (name, series)) in panels.iter().zip(charts.iter()) {
            let y_max = series
                .iter()
                .flat_map(|(_, _, f)| rows.iter().map(f))
                .fold(1.0f64, f64::max)
                * 1.15;
            let mut chart = ChartBuilder::on(area)
                .caption(*name, ("sans-serif", 16))
                .margin(8)
                .x_label_area_size(30)
                .y_label_area_size(60)
                .build_cartesian_2d(0.0..t_max, 0.0..y_max)?;
            chart
                .configure_mesh()
                .x_desc("seconds")
                .label_style(("sans-serif", 12))
                .draw()?;
            for (label, color, f) in series {
                let color = *color;
                chart
                    .draw_series(LineSeries::new(rows.iter().map(|r| (r.t, f(r))), color))?
                    .label(*label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 12))
                .position(SeriesLabelPosition::LowerRight)
                .draw()?;
        }
        root.present()?;
    }
    let file = std::fs::File::create(path)?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header()?.write_image_data(&buf)?;
    Ok(())
}

/// What the senders brought back.
#[derive(Default)]
struct Tally {
    sent_ids: Vec<String>,
    /// status or error → count, for everything that was not `sent`.
    other: std::collections::BTreeMap<String, u64>,
    first_other: Option<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak of a minute or more; run with --ignored (CI runs it on its own)"]
async fn soak() -> anyhow::Result<()> {
    let plan = plan();
    let c = plan.concurrency.max(1);
    // A relative MAILMUX_SOAK_BIN is the caller's, not the daemon's working
    // folder's (the daemon runs in a folder of its own).
    let bin = match std::env::var_os("MAILMUX_SOAK_BIN") {
        Some(b) => std::path::absolute(&b)
            .map_err(|e| anyhow::anyhow!("MAILMUX_SOAK_BIN {}: {e}", b.display()))?,
        None => env!("CARGO_BIN_EXE_mailmux").into(),
    };
    eprintln!("soak: {plan:?}, binary {}", bin.display());

    let sink = Sink::start(c, true)?;
    let daemon = Daemon::start(
        &bin,
        &DaemonOptions {
            transport: plan.transport,
            sink_port: sink.port,
            max_connections: c,
            // Connections are replaced every 100 messages (the default), so
            // that a leak on open or close shows up in the FD count.
            messages_per_connection: 100,
            log: "warn".into(),
            store: "sqlite",
            policy: false,
            queue_extra: format!("retain = \"{}\"", humantime::format_duration(plan.retain)),
            max_message_bytes: None,
            http_pool: false,
            http_modern: false,
            http_requests: c * 2,
            dkim_key: None,
        },
    )
    .await?;
    let pid = daemon.pid;
    let peer = daemon.peer();
    let (tasks_before, _) = load::runtime_tasks(&peer).await?;
    let body = Arc::new(load::body(1024));

    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..c {
        let (peer, body, next, answered, plan) = (
            peer.clone(),
            body.clone(),
            next.clone(),
            answered.clone(),
            plan.clone(),
        );
        senders.spawn(async move {
            let mut tally = Tally::default();
            loop {
                if plan.duration.is_some_and(|d| started.elapsed() >= d) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= plan.messages {
                    break;
                }
                let r = load::send_email(&peer, &format!("soak {i}"), &body).await;
                answered.fetch_add(1, Ordering::Relaxed);
                match (r.status.as_str(), r.message_id) {
                    ("sent", Some(id)) => tally.sent_ids.push(id),
                    (status, _) => {
                        *tally.other.entry(status.to_string()).or_default() += 1;
                        tally
                            .first_other
                            .get_or_insert_with(|| format!("{status}: {:?}", r.detail));
                    }
                }
            }
            tally
        });
    }

    let sample = |answered: u64,
                  last: Option<&Row>,
                  tasks: (u64, u64),
                  store_kb: u64|
     -> anyhow::Result<Row> {
        let t = started.elapsed().as_secs_f64();
        let rate = match last {
            Some(l) if t > l.t => (answered - l.sent) as f64 / (t - l.t),
            _ => 0.0,
        };
        Ok(Row {
            t,
            sent: answered,
            rate,
            proc: load::proc_sample(pid)?,
            alive_tasks: tasks.0,
            workers: tasks.1,
            store_kb,
        })
    };
    let mut rows = vec![sample(
        0,
        None,
        load::runtime_tasks(&peer).await?,
        daemon.store_kb(),
    )?];
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + SAMPLE_EVERY, SAMPLE_EVERY);
    let mut results = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let tasks = load::runtime_tasks(&peer).await?;
                let row = sample(answered.load(Ordering::Relaxed), rows.last(), tasks, daemon.store_kb())?;
                eprintln!(
                    "soak: {:>6.1} s  {:>8} answered  {:>7.0} msgs/s  RSS {:>6} kB  FDs {:>4}  tasks {:>5}  threads {:>3}  store {:>7} kB",
                    row.t, row.sent, row.rate, row.proc.rss_kb, row.proc.fds, row.alive_tasks, row.proc.threads, row.store_kb
                );
                rows.push(row);
            }
            done = senders.join_next() => match done {
                Some(tally) => results.push(tally?),
                None => break,
            }
        }
    }
    let elapsed = started.elapsed();
    let total = answered.load(Ordering::Relaxed);
    rows.push(sample(
        total,
        rows.last(),
        load::runtime_tasks(&peer).await?,
        daemon.store_kb(),
    )?);

    // Idle again: deliveries done, nothing should be left running but the
    // actors and the session. Idle connections are kept, so wait only for
    // in-flight work to end.
    let mut tasks_after = u64::MAX;
    for _ in 0..50 {
        tasks_after = load::runtime_tasks(&peer).await?.0;
        if tasks_after <= tasks_before + TASK_SLACK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log_tail = daemon.log();
    daemon.stop().await?;

    let mut tally = Tally::default();
    for r in results {
        tally.sent_ids.extend(r.sent_ids);
        for (k, v) in r.other {
            *tally.other.entry(k).or_default() += v;
        }
        if tally.first_other.is_none() {
            tally.first_other = r.first_other;
        }
    }
    let sent = tally.sent_ids.len() as u64;
    sink.wait_count(sent, Duration::from_secs(10));
    let at_sink = sink.message_ids()?;
    let sent_set: HashSet<&str> = tally.sent_ids.iter().map(String::as_str).collect();
    let reused_ids = tally.sent_ids.len() - sent_set.len();
    let lost: Vec<&str> = sent_set
        .iter()
        .filter(|id| !at_sink.contains_key(**id))
        .copied()
        .collect();
    let duplicated: Vec<(&String, &u32)> = at_sink.iter().filter(|(_, n)| **n > 1).collect();
    let unexpected: Vec<&String> = at_sink
        .keys()
        .filter(|id| !sent_set.contains(id.as_str()))
        .collect();

    let dir = load::output_dir("soak")?;
    let csv_path = dir.join("soak.csv");
    let png_path = dir.join("soak.png");
    std::fs::write(&csv_path, csv(&rows))?;
    let title = format!(
        "mailmux soak ({}, {}, C={c}): {total} messages in {:.0} s",
        plan.mode,
        plan.transport.name(),
        elapsed.as_secs_f64()
    );
    match plot(&rows, &title, &png_path) {
        Ok(()) => eprintln!(
            "soak: wrote {} and {}",
            csv_path.display(),
            png_path.display()
        ),
        Err(e) => eprintln!("soak: wrote {}; no plot: {e}", csv_path.display()),
    }

    let warm: Vec<&Row> = rows
        .iter()
        .filter(|r| r.t <= WARM_UP.as_secs_f64() + 0.5)
        .collect();
    let after: Vec<&Row> = rows
        .iter()
        .filter(|r| r.t > WARM_UP.as_secs_f64() + 0.5)
        .collect();
    let warm_rss = warm.iter().map(|r| r.proc.rss_kb).max().unwrap_or(0);
    let warm_fds = warm.iter().map(|r| r.proc.fds).max().unwrap_or(0);
    let max_rss = after
        .iter()
        .map(|r| r.proc.rss_kb)
        .max()
        .unwrap_or(warm_rss);
    let max_fds = after.iter().map(|r| r.proc.fds).max().unwrap_or(warm_fds);
    let rss_limit = (warm_rss as f64 * RSS_FACTOR) as u64 + RSS_SLACK_KB;
    // The store's size once purging has run for a while, and its largest
    // size after that (only while the load ran: the last row is after it).
    let settled_at = WARM_UP + plan.retain + 2 * (plan.retain / 4).max(Duration::from_secs(1));
    let settled = rows
        .iter()
        .filter(|r| r.t <= settled_at.as_secs_f64() + 0.5)
        .map(|r| r.store_kb)
        .max()
        .unwrap_or(0);
    let later_store: Vec<u64> = rows
        .iter()
        .filter(|r| r.t > settled_at.as_secs_f64() + 0.5)
        .map(|r| r.store_kb)
        .collect();
    let max_store = later_store.iter().copied().max();
    let store_limit = (settled as f64 * STORE_FACTOR) as u64 + STORE_SLACK_KB;
    let fd_limit = warm_fds + FD_SLACK;
    let summary = format!(
        "{} mode over {}, C={c}: {total} calls in {:.1} s ({:.0} msgs/s); sent {sent}, other {:?}; \
         at the sink {} distinct, lost {}, duplicated {}, unexpected {}; \
         RSS warm-up {warm_rss} kB, later max {max_rss} kB (limit {rss_limit}); \
         FDs warm-up {warm_fds}, later max {max_fds} (limit {fd_limit}); \
         store (retain {}) {settled} kB at {:.0} s, later max {} (limit {store_limit}); \
         tasks idle before {tasks_before}, after {tasks_after}",
        plan.mode,
        plan.transport.name(),
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        tally.other,
        at_sink.len(),
        lost.len(),
        duplicated.len(),
        unexpected.len(),
        humantime::format_duration(plan.retain),
        settled_at.as_secs_f64(),
        max_store.map_or("n/a (the soak ended before)".into(), |k| format!("{k} kB")),
    );
    eprintln!("soak: {summary}");
    std::fs::write(dir.join("summary.txt"), format!("{summary}\n"))?;

    assert!(sent > 0, "nothing was sent: {summary}\n{log_tail}");
    assert!(
        tally.other.is_empty(),
        "calls not sent against a healthy sink (first: {:?}): {summary}\n{log_tail}",
        tally.first_other
    );
    assert_eq!(reused_ids, 0, "Message-IDs answered twice: {summary}");
    assert!(
        lost.is_empty(),
        "lost {:?}: {summary}",
        &lost[..lost.len().min(5)]
    );
    assert!(
        duplicated.is_empty(),
        "duplicated {:?}: {summary}",
        &duplicated[..duplicated.len().min(5)]
    );
    assert!(unexpected.is_empty(), "unexpected at the sink: {summary}");
    assert!(max_rss <= rss_limit, "RSS grew after warm-up: {summary}");
    assert!(
        max_fds <= fd_limit,
        "open FDs grew after warm-up: {summary}"
    );
    assert!(
        max_store.is_none_or(|m| m <= store_limit),
        "the store kept growing although retain purges it: {summary}"
    );
    assert!(
        tasks_after <= tasks_before + TASK_SLACK,
        "tasks left behind: {summary}"
    );
    Ok(())
}
