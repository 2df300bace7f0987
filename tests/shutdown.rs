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

/// The end of the input is a shutdown too: a client that writes its calls
/// and closes its side (`mailmux < calls.jsonl`) still gets every answer,
/// however long past the end its delivery takes. rmcp alone writes answers
/// for only 5 s after its input ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_of_the_input_waits_for_the_answers_of_calls_in_flight() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

    // The relay takes 6 s to answer the final ".".
    let smtp =
        FaultSmtp::start(Script::ok().on(Phase::AfterDot, Action::Pause(Duration::from_secs(6))))
            .await;
    let mut slow = relay("slow", smtp.port(), 1);
    slow.timeouts = mailmux_actors::Timeouts::uniform(Duration::from_secs(20));
    let cfg = config(vec![slow]);
    let queue = mailmux::mcp::start_queue(&cfg).await.unwrap();
    let server = MailmuxServer::new(queue, cfg, Sources::default()).await;
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let (r, w) = tokio::io::split(server_io);
    let serving = tokio::spawn(mailmux::mcp::transport::serve_io(
        server,
        r,
        w,
        std::future::pending(),
    ));

    let (client_r, mut client_w) = tokio::io::split(client_io);
    let lines = [
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "batch-file", "version": "1"}}}),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "send_email",
            "arguments": {"to": "a@example.org", "subject": "slow", "body": "x"}}}),
    ];
    for l in lines {
        client_w
            .write_all(format!("{l}\n").as_bytes())
            .await
            .unwrap();
    }
    client_w.shutdown().await.unwrap();

    let mut out = tokio::io::BufReader::new(client_r).lines();
    let mut answer = None;
    while let Some(line) = tokio::time::timeout(Duration::from_secs(30), out.next_line())
        .await
        .expect("the transport closes")
        .unwrap()
    {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["id"] == 2 {
            answer = Some(v);
        }
    }
    let answer = answer.expect("the call made before the end of the input is answered");
    assert_eq!(
        answer["result"]["structuredContent"]["status"], "sent",
        "{answer}"
    );
    assert_eq!(smtp.delivered().len(), 1);
    serving.await.unwrap().unwrap();
}
