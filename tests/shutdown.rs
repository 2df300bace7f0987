//! Shutdown as an input: once it begins, new calls are refused, deliveries in
//! flight get the grace period, and the transport closes after them.

mod common;
#[path = "../actors/tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use common::{config, relay};
use mailmux::config::Sources;
use mailmux::mcp::MailmuxServer;
use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use serde_json::json;
use support::fault_smtp::{Action, FaultSmtp, Phase, Script};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_refuses_new_calls_and_bounds_in_flight_deliveries() {
    // The relay never answers MAIL FROM: the delivery stays in flight.
    let smtp = FaultSmtp::start(Script::ok().on(Phase::Mail, Action::Hang)).await;
    let mut slow = relay("slow", smtp.port(), 1);
    slow.timeouts = mailmux_actors::Timeouts::uniform(Duration::from_secs(25));
    let mut cfg = config(vec![slow]);
    cfg.daemon.shutdown_grace = Duration::from_secs(1);
    cfg.daemon.send_deadline = Duration::from_secs(30);
    let queue = mailmux::mcp::start_queue(&cfg).await.unwrap();
    let server = MailmuxServer::new(queue, cfg, Sources::default()).await;

    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let (r, w) = tokio::io::split(server_io);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(mailmux::mcp::transport::serve_io(
        server.clone(),
        r,
        w,
        async {
            let _ = stopped.await;
        },
    ));
    let client = ().serve(client_io).await.unwrap();
    let peer = client.peer().clone();
    let in_flight = tokio::spawn(async move {
        let args = json!({"to": "a@example.org", "subject": "slow", "body": "x"});
        let params = CallToolRequestParams::new("send_email")
            .with_arguments(args.as_object().unwrap().clone());
        peer.call_tool(params).await
    });
    assert!(
        support::wait_until(|| smtp.commands(Phase::Mail) >= 1, Duration::from_secs(10)).await,
        "the delivery never reached MAIL FROM"
    );

    let started = Instant::now();
    stop.send(()).unwrap();
    // Calls made once shutdown began are refused.
    assert!(
        support::wait_until(|| server.is_closing(), Duration::from_secs(5)).await,
        "shutdown never began"
    );
    let refused = client
        .call_tool(CallToolRequestParams::new("get_smtp_status"))
        .await;
    if let Ok(result) = refused {
        assert_eq!(result.is_error, Some(true));
        assert_eq!(
            result.structured_content.unwrap()["error"]["code"],
            "unavailable"
        );
    }
    // The transport closes once the grace has run out, not at the 30 s deadline.
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("serve_io returns after the grace")
        .unwrap()
        .unwrap();
    // Well before the relay's 25 s timeout could have ended the delivery.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), in_flight).await;
    assert!(smtp.delivered().is_empty());
}
