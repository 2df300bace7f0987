//! What systemd hears from the real binary: `READY=1` once MCP is served
//! (the HTTP port answers by then), `WATCHDOG=1` pings, a status that
//! follows a pause of delivery, `RELOADING=1` and `READY=1` around a
//! SIGHUP, `STOPPING=1` at SIGTERM or at the end of stdin. The test stands
//! in for systemd: it binds the datagram socket named by `NOTIFY_SOCKET`,
//! as systemd does for a `Type=notify` unit. With the `fault-hooks`
//! feature, the watchdog's check fails while the router actor is wedged.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The service manager's end of `NOTIFY_SOCKET`: each datagram, in order.
struct Manager {
    got: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Manager {
    fn bind(path: &Path) -> Manager {
        let socket = UnixDatagram::bind(path).expect("bind the notify socket");
        let (tx, got) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                if tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        });
        Manager {
            got,
            seen: Vec::new(),
        }
    }

    /// Waits for a datagram with the line `line` (or one starting with it,
    /// for `STATUS=…`), and answers it; the ones before it are in `seen`.
    fn until(&mut self, line: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(m) = self.got.recv_timeout(left) else {
                panic!("no {line:?} within {within:?}; heard {:#?}", self.seen);
            };
            self.seen.push(m.clone());
            if m.lines().any(|l| l.starts_with(line)) {
                return m;
            }
        }
    }

    /// The datagrams that arrive within `d`.
    fn during(&mut self, d: Duration) -> Vec<String> {
        let deadline = Instant::now() + d;
        let mut out = Vec::new();
        while let Ok(m) = self
            .got
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(m.clone());
            out.push(m);
        }
        out
    }
}

fn pings(heard: &[String]) -> usize {
    heard
        .iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count()
}

fn daemon(dir: &Path, args: &[&str], watchdog_pid: Option<u32>) -> Command {
    std::fs::write(
        dir.join("mailmux.toml"),
        format!(
            "from_email = \"agent@example.org\"\nshutdown_grace = \"1s\"\n\n[queue]\npath = \"{}\"\n",
            dir.join("queue.db").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mailmux"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MAILMUX_OUTBOX_DIR", dir.join("outbox"))
        .env("NOTIFY_SOCKET", dir.join("notify.sock"))
        // A ping every 200 ms.
        .env("WATCHDOG_USEC", "400000")
        .arg("--config")
        .arg(dir.join("mailmux.toml"))
        .arg("serve")
        .args(args)
        .current_dir(dir)
        .stderr(std::fs::File::create(dir.join("daemon.log")).unwrap());
    if let Some(pid) = watchdog_pid {
        cmd.env("WATCHDOG_PID", pid.to_string());
    }
    cmd
}

#[test]
fn systemd_hears_ready_pings_the_pause_a_reload_and_the_stop() {
    let dir = tempfile::tempdir().unwrap();
    let mut manager = Manager::bind(&dir.path().join("notify.sock"));
    let port = common::free_port();
    let bind = format!("127.0.0.1:{port}");
    let mut child = daemon(dir.path(), &["--http", &bind], None)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();

    let ready = manager.until("READY=1", Duration::from_secs(30));
    // Ready means served: the port answers as soon as systemd hears it.
    let addr: SocketAddr = bind.parse().unwrap();
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok(),
        "READY=1 came before the port was bound"
    );
    assert!(
        ready
            .lines()
            .any(|l| l == format!("STATUS=serving MCP on http://{bind}/mcp")),
        "{ready}"
    );
    // Before it, the status said the daemon was starting (a watchdog ping
    // may come first).
    assert!(
        manager
            .seen
            .iter()
            .take_while(|m| !m.contains("READY=1"))
            .any(|m| m.contains("STATUS=starting")),
        "{:#?}",
        manager.seen
    );

    // WATCHDOG_USEC=400000: a ping every 200 ms; at least a few in 2 s.
    let heard = manager.during(Duration::from_secs(2));
    assert!(pings(&heard) >= 3, "{heard:#?}");

    // A pause of delivery shows in the status.
    let (code, out, err) = common::queue_cmd(dir.path(), &["pause", "--reason", "maintenance"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let status = manager.until("STATUS=serving MCP", Duration::from_secs(10));
    assert!(
        status.contains("delivery paused since")
            && status.contains("by queue command: maintenance"),
        "{status}"
    );

    // SIGHUP: RELOADING=1 with the monotonic clock, then READY=1.
    common::signal(child.id(), "HUP");
    let reloading = manager.until("RELOADING=1", Duration::from_secs(10));
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    manager.until("READY=1", Duration::from_secs(10));

    // SIGTERM: STOPPING=1, and a clean exit.
    common::signal(child.id(), "TERM");
    let stopping = manager.until("STOPPING=1", Duration::from_secs(10));
    assert!(stopping.contains("STATUS=stopping"), "{stopping}");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn over_stdio_ready_then_stopping_at_the_end_of_input_and_no_pings_for_another_pid() {
    let dir = tempfile::tempdir().unwrap();
    let mut manager = Manager::bind(&dir.path().join("notify.sock"));
    // WATCHDOG_PID names another process: the watchdog is not this one's.
    let mut child = daemon(dir.path(), &[], Some(1))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let ready = manager.until("READY=1", Duration::from_secs(30));
    assert!(ready.contains("STATUS=serving MCP on stdio"), "{ready}");
    let heard = manager.during(Duration::from_secs(1));
    assert_eq!(pings(&manager.seen), 0, "{heard:#?}");

    drop(child.stdin.take());
    manager.until("STOPPING=1", Duration::from_secs(10));
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// The watchdog's check: the router actor answers, then does not while it
/// is wedged, then does again; a SQLite store whose writer ended fails it
/// for good.
#[cfg(feature = "fault-hooks")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_check_fails_while_the_router_is_wedged_or_the_writer_is_gone() {
    use mailmux::config::Sources;
    use mailmux::mcp::MailmuxServer;
    use mailmux::service::trouble;

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(vec![common::relay("main", common::free_port(), 1)]);
    cfg.queue.store = mailmux_actors::queue::StoreKind::Sqlite {
        path: dir.path().join("queue.db"),
    };
    let queue = mailmux::mcp::start_queue(&cfg).await.unwrap();
    let server = MailmuxServer::new(queue, cfg, Sources::default()).await;
    let within = Duration::from_millis(300);
    assert_eq!(trouble(&server, within).await, None);

    server
        .queue()
        .dispatcher()
        .stall_router(Duration::from_secs(2))
        .unwrap();
    let started = Instant::now();
    assert_eq!(
        trouble(&server, within).await,
        Some("the relays' router does not answer")
    );
    assert!(started.elapsed() >= within, "{:?}", started.elapsed());

    // Once the stall ends, the router answers the next check.
    let deadline = Instant::now() + Duration::from_secs(10);
    while trouble(&server, within).await.is_some() {
        assert!(Instant::now() < deadline, "the router never answered again");
    }
    assert!(started.elapsed() >= Duration::from_millis(1500));

    // The writer thread panics: the store can write nothing more.
    server.queue().stop_store_writer();
    let deadline = Instant::now() + Duration::from_secs(10);
    while trouble(&server, within).await.is_none() {
        assert!(Instant::now() < deadline, "the writer's end was never seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        trouble(&server, within).await,
        Some("the queue store's writer has stopped")
    );
}
