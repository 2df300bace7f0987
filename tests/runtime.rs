//! The daemon's async runtime per transport: one worker thread over stdio (one
//! client per process), one per core but one over HTTP (at least one), the
//! core left to the queue's writer thread. Read back through
//! `get_smtp_status`'s `runtime.workers` from the built binary.

mod load;

use load::{Daemon, DaemonOptions, Sink, Transport};

async fn workers(transport: Transport) -> anyhow::Result<u64> {
    let sink = Sink::start(1, false)?;
    let daemon = Daemon::start(
        env!("CARGO_BIN_EXE_mailmux").as_ref(),
        &DaemonOptions {
            transport,
            sink_port: sink.port,
            max_connections: 1,
            messages_per_connection: 0,
            log: "warn".into(),
            store: "sqlite",
            policy: false,
            queue_extra: String::new(),
            max_message_bytes: None,
            http_pool: false,
            http_modern: false,
            http_requests: 1,
            dkim_key: None,
        },
    )
    .await?;
    let (_, workers) = load::runtime_tasks(&daemon.peer()).await?;
    let sent = load::send_email(&daemon.peer(), "runtime", "hello\n").await;
    assert_eq!(sent.status, "sent", "{sent:?}");
    daemon.stop().await?;
    Ok(workers)
}

#[tokio::test]
async fn stdio_runs_one_worker_and_http_one_per_core_but_one() -> anyhow::Result<()> {
    assert_eq!(workers(Transport::Stdio).await?, 1);
    let cores = std::thread::available_parallelism()?.get() as u64;
    assert_eq!(
        workers(Transport::Http).await?,
        cores.saturating_sub(1).max(1)
    );
    Ok(())
}
