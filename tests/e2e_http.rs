//! Streamable HTTP end to end: rmcp's HTTP client against the daemon (the
//! binary, and in process), plus raw requests for the Host, Origin, token and
//! body-size checks and `/health`.

mod common;
#[path = "reliability/random_input.rs"]
mod random_input;
#[path = "../actors/tests/support/mod.rs"]
mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Aiosmtpd, config, free_port, relay};
use mailmux::config::Sources;
use mailmux::mcp::MailmuxServer;
use mailmux_actors::Secret;
use reqwest::header::HeaderMap;
use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

const TOKEN: &str = "test-token-8d1f";

async fn wait_health(base: &str) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client.get(format!("{base}/health")).send().await
            && r.status().as_u16() != 0
        {
            return;
        }
        assert!(Instant::now() < deadline, "{base} never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn mcp_call(url: &str, token: Option<&str>, tool: &str, args: Value) -> (bool, Value) {
    let mut cfg = StreamableHttpClientTransportConfig::with_uri(url.to_string());
    if let Some(t) = token {
        cfg = cfg.auth_header(t.to_string());
    }
    let transport = StreamableHttpClientTransport::from_config(cfg);
    let client = ().serve(transport).await.expect("client initializes over HTTP");
    let mut params = CallToolRequestParams::new(tool.to_string());
    if let Value::Object(map) = args {
        params = params.with_arguments(map);
    }
    let result = tokio::time::timeout(Duration::from_secs(60), client.call_tool(params))
        .await
        .expect("answer within 60 s")
        .expect("no protocol error");
    let _ = client.cancel().await;
    (
        result.is_error.unwrap_or(false),
        result.structured_content.expect("structured content"),
    )
}

/// The daemon in process on a free port, with a token and a small body limit.
async fn in_process(
    smtp: &Aiosmtpd,
    stateful: bool,
) -> (String, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let mut cfg = config(vec![relay("primary", smtp.port, 100)]);
    cfg.daemon.http.token = Some(Secret::new(TOKEN));
    cfg.daemon.http.body_limit = 64 * 1024;
    cfg.daemon.http.allowed_origins = vec!["https://app.example.org".into()];
    in_process_with(cfg, stateful).await
}

async fn in_process_with(
    cfg: mailmux::config::Config,
    stateful: bool,
) -> (String, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let queue = mailmux::mcp::start_queue(&cfg).await.unwrap();
    let server = MailmuxServer::new(queue, cfg, Sources::default()).await;
    let port = free_port();
    let addr = ([127, 0, 0, 1], port).into();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        mailmux::mcp::http::serve(server, addr, stateful, async {
            let _ = stopped.await;
        })
        .await
        .expect("serves");
    });
    let base = format!("http://127.0.0.1:{port}");
    wait_health(&base).await;
    (base, stop, task)
}

/// Stops a daemon [`in_process`] started, and waits for it.
async fn stop_in_process(stop: oneshot::Sender<()>, task: tokio::task::JoinHandle<()>) {
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("stops")
        .unwrap();
}

fn init_body() -> Value {
    json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{
        "protocolVersion":"2025-06-18","capabilities":{},
        "clientInfo":{"name":"raw","version":"1"}}})
}

/// A configuration whose one relay accepts connections and never greets
/// (so no relay ever commits a message), with the bearer token; the task
/// that holds those connections.
async fn silent_relay() -> (mailmux::config::Config, tokio::task::JoinHandle<()>) {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            open.push(conn);
        }
    });
    let mut cfg = config(vec![relay("silent", port, 100)]);
    cfg.daemon.http.token = Some(Secret::new(TOKEN));
    (cfg, held)
}

/// A session opened with raw requests (`initialize`, then
/// `notifications/initialized`); its id.
async fn open_session(http: &reqwest::Client, url: &str) -> String {
    let r = post(http, url)
        .bearer_auth(TOKEN)
        .body(init_body().to_string())
        .send()
        .await
        .unwrap();
    let id = r.headers()["mcp-session-id"].to_str().unwrap().to_owned();
    r.text().await.unwrap();
    let r = post(http, url)
        .bearer_auth(TOKEN)
        .header("Mcp-Session-Id", &id)
        .body(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    id
}

fn post(client: &reqwest::Client, url: &str) -> reqwest::RequestBuilder {
    client
        .post(url)
        .header("Accept", "application/json, text/event-stream")
        .header("Content-Type", "application/json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guards_token_host_origin_and_body_limit() {
    let smtp = Aiosmtpd::start();
    let (base, stop, task) = in_process(&smtp, true).await;
    let url = format!("{base}/mcp");
    let http = reqwest::Client::new();
    let body = init_body().to_string();

    let r = post(&http, &url).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 401, "no token");
    assert!(r.headers().get("www-authenticate").is_some());
    let r = post(&http, &url)
        .bearer_auth("wrong")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "wrong token");
    let r = post(&http, &url)
        .bearer_auth(TOKEN)
        .header("Origin", "https://evil.example.com")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "foreign origin");
    let r = post(&http, &url)
        .bearer_auth(TOKEN)
        .header("Host", "evil.example.com")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "foreign host");
    // Refused from the headers alone, before any of the body is read.
    let port = base.rsplit(':').next().unwrap();
    let mut raw = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let head = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n\
         Content-Length: {}\r\n\r\n",
        65 * 1024
    );
    raw.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 64];
    let n = raw.read(&mut answer).await.unwrap();
    let status_line = String::from_utf8_lossy(&answer[..n]);
    assert!(status_line.starts_with("HTTP/1.1 413"), "{status_line}");
    // A chunked body, which announces no length, is refused once it passes
    // the limit.
    let mut raw = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let size = 65 * 1024;
    let head = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n\
         Transfer-Encoding: chunked\r\n\r\n{size:x}\r\n{}\r\n0\r\n\r\n",
        " ".repeat(size)
    );
    raw.write_all(head.as_bytes()).await.unwrap();
    let n = raw.read(&mut answer).await.unwrap();
    let status_line = String::from_utf8_lossy(&answer[..n]);
    assert!(status_line.starts_with("HTTP/1.1 413"), "{status_line}");

    // Allowed: a listed origin, a loopback origin, the right token.
    for origin in ["https://app.example.org", "http://localhost:5173"] {
        let r = post(&http, &url)
            .bearer_auth(TOKEN)
            .header("Origin", origin)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{origin}");
    }

    // /health needs no token but still checks Host.
    let r = http.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let health: Value = r.json().await.unwrap();
    assert_eq!(health["ok"], true);
    assert_eq!(
        health["relays"],
        json!([{"name": "primary", "state": "healthy"}])
    );
    let r = http
        .get(format!("{base}/health"))
        .header("Host", "evil.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // The MCP client with the token works.
    let (is_error, out) = mcp_call(&url, Some(TOKEN), "get_smtp_status", json!({})).await;
    assert!(!is_error);
    assert_eq!(out["relays"][0]["name"], "primary");

    stop_in_process(stop, task).await;
}

/// A refusal that leaves the request's body unread (over the body limit,
/// a wrong token) says `Connection: close` and closes the connection, so a
/// client that keeps connections opens a new one rather than send its next
/// request into a closed one; an answered request keeps its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_with_its_body_unread_closes_the_connection_and_says_so() {
    let smtp = Aiosmtpd::start();
    let mut cfg = config(vec![relay("primary", smtp.port, 100)]);
    cfg.daemon.http.token = Some(Secret::new(TOKEN));
    cfg.daemon.http.body_limit = 64 * 1024;
    // Twenty-one wrong tokens from one address: past the default count of
    // failed authentications, which would answer 429 instead.
    cfg.daemon.http.auth_failures = None;
    let (base, stop, task) = in_process_with(cfg, false).await;
    let port = base.rsplit(':').next().unwrap().to_string();
    let ping = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let request = |token: &str, body: &str| {
        format!(
            "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let large = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"x":"{}"}}}}"#,
        "y".repeat(30_000)
    );
    let over = " ".repeat(65 * 1024);
    for (what, raw, status) in [
        ("over the limit", request(TOKEN, &over), "413"),
        (
            "a wrong token",
            request("wrong-token-0123456789", &large),
            "401",
        ),
    ] {
        let mut conn = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
            .await
            .unwrap();
        // The server may answer and close before the whole body is written.
        let _ = conn.write_all(raw.as_bytes()).await;
        let mut answer = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer)).await;
        let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
        assert!(
            text.starts_with(&format!("http/1.1 {status}")),
            "{what}: {text}"
        );
        assert!(text.contains("connection: close"), "{what}: {text}");
        assert!(read.is_ok(), "{what}: the connection stayed open");
    }
    // Answered: the connection serves the next request.
    let mut conn = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    for _ in 0..2 {
        conn.write_all(request(TOKEN, ping).as_bytes())
            .await
            .unwrap();
        let mut answer = vec![0u8; 4096];
        let n = conn.read(&mut answer).await.unwrap();
        let text = String::from_utf8_lossy(&answer[..n]).to_ascii_lowercase();
        assert!(text.starts_with("http/1.1 200"), "{text}");
        assert!(!text.contains("connection: close"), "{text}");
    }
    // A client that keeps one connection: refusals and calls in turn.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let url = format!("{base}/mcp");
    for i in 0..20 {
        let r = post(&http, &url)
            .bearer_auth("wrong-token-0123456789")
            .body(large.clone())
            .send()
            .await;
        assert_eq!(
            r.map(|r| r.status().as_u16()).unwrap_or(0),
            401,
            "refusal {i}"
        );
        let r = post(&http, &url).bearer_auth(TOKEN).body(ping).send().await;
        assert_eq!(
            r.map(|r| r.status().as_u16()).unwrap_or(0),
            200,
            "call {i} after a refusal"
        );
    }
    stop_in_process(stop, task).await;
}

/// A JSON body that is not one JSON-RPC message is answered 400 with
/// JSON-RPC's error and no id: -32700 when it is not JSON, -32600 for a
/// batch or another shape. A body of another media type is still 415.
/// Nothing is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_json_rpc_gets_a_json_rpc_error() {
    let smtp = Aiosmtpd::start();
    let (base, stop, task) = in_process(&smtp, true).await;
    let url = format!("{base}/mcp");
    let http = reqwest::Client::new();
    let send = json!({"jsonrpc":"2.0","id":2,"method":"tools/call","params":{
        "name":"send_email","arguments":{"to":"a@example.org","subject":"s","body":"b"}}});
    let cases = [
        (
            init_body().to_string()[..60].to_owned(),
            -32700,
            "parse error: the body is not JSON: EOF while parsing",
        ),
        (
            "hello".to_owned(),
            -32700,
            "expected value at line 1 column 1",
        ),
        (
            json!([send]).to_string(),
            -32600,
            "a batch (an array) of JSON-RPC messages is not taken",
        ),
        (
            json!({"to": "a@example.org"}).to_string(),
            -32600,
            "not a JSON-RPC request",
        ),
    ];
    for (body, code, text) in cases {
        let r = post(&http, &url)
            .bearer_auth(TOKEN)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let answer: Value = r.json().await.unwrap();
        assert_eq!(answer["jsonrpc"], "2.0", "{answer}");
        assert_eq!(answer["id"], Value::Null, "{answer}");
        assert_eq!(answer["error"]["code"], code, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(text), "{body}: {message}");
        assert!(!message.contains("a@example.org"), "{message}");
    }
    let r = http
        .post(&url)
        .header("Accept", "application/json, text/event-stream")
        .header("Content-Type", "text/plain")
        .bearer_auth(TOKEN)
        .body(init_body().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415, "a wrong media type");
    // The server still serves.
    let (is_error, out) = mcp_call(&url, Some(TOKEN), "get_smtp_status", json!({})).await;
    assert!(!is_error, "{out}");
    assert!(smtp.messages().is_empty(), "nothing is sent");

    stop_in_process(stop, task).await;
}

/// Random bodies (`tests/reliability/random_input.rs`: bytes, JSON-RPC cut
/// short, arrays, random methods, ids and tool arguments), 1,500 to the
/// stateless endpoint and 1,000 to the stateful one (most of them in one
/// initialized session), eight at a time: each
/// gets an answer within 20 s with a status a client can act on (2xx or
/// 4xx, never 5xx), a JSON answer is JSON, nothing panics, and the daemon
/// serves calls afterwards. The seed is printed; `MAILMUX_RANDOM_SEED`
/// replays a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_request_bodies_get_a_client_error_at_worst() {
    use rand::{Rng, SeedableRng};
    let panics = random_input::count_panics();
    let seed = random_input::seed();
    eprintln!("random bodies: MAILMUX_RANDOM_SEED={seed} replays this run");
    let smtp = Aiosmtpd::start();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut problems = Vec::new();
    let mut statuses = std::collections::BTreeMap::new();
    for (stateful, n) in [(false, 1500), (true, 1000)] {
        let (base, stop, task) = in_process(&smtp, stateful).await;
        let url = format!("{base}/mcp");
        let http = reqwest::Client::new();
        // In stateful mode most requests go to one initialized session.
        let session = match stateful {
            false => None,
            true => Some(open_session(&http, &url).await),
        };
        let bodies: Vec<Vec<u8>> = (0..n).map(|i| random_input::request(&mut rng, i)).collect();
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
        let mut running = tokio::task::JoinSet::new();
        for (i, body) in bodies.iter().cloned().enumerate() {
            let permit = gate.clone().acquire_owned().await.unwrap();
            let mut request = post(&http, &url).bearer_auth(TOKEN).body(body);
            if let Some(id) = &session
                && rng.random_bool(0.8)
            {
                request = request.header("Mcp-Session-Id", id);
            }
            let headers = rng.random_range(0..10);
            let request = match headers {
                0 => request.header("Content-Type", "text/plain"),
                1 => request.header("Accept", "text/html"),
                _ => request,
            };
            running.spawn(async move {
                let answer = tokio::time::timeout(Duration::from_secs(20), async {
                    let r = request.send().await?;
                    let status = r.status().as_u16();
                    let json = r
                        .headers()
                        .get("content-type")
                        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
                    let text = r.text().await?;
                    Ok::<_, reqwest::Error>((status, json, text))
                })
                .await;
                drop(permit);
                (i, headers, answer)
            });
        }
        while let Some(done) = running.join_next().await {
            let (i, headers, answer) = done.unwrap();
            let body = String::from_utf8_lossy(&bodies[i]);
            let shown: String = body.chars().take(300).collect();
            let shown = format!("stateful {stateful}, headers {headers}: {shown}");
            match answer {
                Err(_) => problems.push(format!("no answer in 20 s: {shown}")),
                Ok(Err(e)) => problems.push(format!("{e:?}: {shown}")),
                Ok(Ok((status, json, text))) => {
                    *statuses.entry(status).or_insert(0) += 1;
                    if !(200..500).contains(&status) {
                        problems.push(format!("{status} {text}: {shown}"));
                    } else if json && serde_json::from_str::<Value>(&text).is_err() {
                        problems.push(format!("{status}, not JSON: {text}: {shown}"));
                    }
                }
            }
        }
        let (is_error, out) = mcp_call(&url, Some(TOKEN), "get_smtp_status", json!({})).await;
        assert!(!is_error, "{out}");
        stop_in_process(stop, task).await;
    }
    eprintln!("random bodies: statuses {statuses:?}");
    assert_eq!(
        panics.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a thread panicked (seed {seed})"
    );
    assert!(problems.is_empty(), "seed {seed}:\n{}", problems.join("\n"));
}

/// Over HTTP, `notifications/cancelled` cancels a call of its own session
/// only: another session's notification naming the same request id does
/// nothing, and the call's own cancels its message (the relay accepts and
/// never greets, so no relay ever commits it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cancels_its_own_calls_only() {
    use rmcp::model::{CallToolRequest, CancelledNotificationParam, ClientRequest};
    use rmcp::service::PeerRequestOptions;

    let (cfg, held) = silent_relay().await;
    let (base, stop, task) = in_process_with(cfg, true).await;
    let url = format!("{base}/mcp");
    let client = || async {
        let cfg = StreamableHttpClientTransportConfig::with_uri(url.clone()).auth_header(TOKEN);
        ().serve(StreamableHttpClientTransport::from_config(cfg))
            .await
            .expect("client initializes over HTTP")
    };
    let (a, b) = (client().await, client().await);
    let params = CallToolRequestParams::new("send_email").with_arguments(
        json!({"to": "rcpt@example.org", "subject": "cancel me", "body": "b"})
            .as_object()
            .unwrap()
            .clone(),
    );
    let request = ClientRequest::CallToolRequest(CallToolRequest::new(params));
    let mut handle = a
        .peer()
        .send_cancellable_request(request, PeerRequestOptions::no_options())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.peer()
        .notify_cancelled(CancelledNotificationParam::new(
            Some(handle.id.clone()),
            Some("not mine".into()),
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(handle.rx.try_recv().is_err(), "the call still runs");
    handle.cancel(Some("gave up".into())).await.unwrap();
    let start = Instant::now();
    loop {
        let listed = a
            .call_tool(CallToolRequestParams::new("list_messages"))
            .await
            .unwrap();
        let out = listed.structured_content.unwrap();
        if out["messages"][0]["status"] == "cancelled" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never cancelled: {out}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = a.cancel().await;
    let _ = b.cancel().await;
    stop_in_process(stop, task).await;
    held.abort();
}

/// A session's second request with the id of one still being answered is
/// refused with a JSON-RPC error, and the first still gets its answer (rmcp
/// routes a session's answers by id, so one of the two went unanswered).
/// Another session may use the id, and so may this one once the first was
/// answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_in_use_in_its_session_is_refused_and_the_first_answered() {
    let (mut cfg, held) = silent_relay().await;
    cfg.daemon.send_deadline = Duration::from_secs(2);
    let (base, stop, task) = in_process_with(cfg, true).await;
    let url = format!("{base}/mcp");
    let http = reqwest::Client::new();
    let (one, two) = (
        open_session(&http, &url).await,
        open_session(&http, &url).await,
    );
    let call = |session: &str, id: u64, tool: &str, args: Value| {
        post(&http, &url)
            .bearer_auth(TOKEN)
            .header("Mcp-Session-Id", session)
            .body(
                json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                       "params": {"name": tool, "arguments": args}})
                .to_string(),
            )
            .send()
    };
    // A send to a relay that never greets waits until send_deadline (2 s).
    let first = call(
        &one,
        7,
        "send_email",
        json!({"to": "rcpt@example.org", "subject": "slow", "body": "b"}),
    );
    let first = tokio::spawn(async move { first.await.unwrap().text().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let again = call(&one, 7, "get_smtp_status", json!({})).await.unwrap();
    assert_eq!(again.status(), 400);
    let body: Value = again.json().await.unwrap();
    assert_eq!(body["id"], 7, "{body}");
    assert_eq!(body["error"]["code"], -32600, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("still being answered"),
        "{body}"
    );
    // Another session's id 7, and another id of this session, are served.
    for (session, id) in [(&two, 7), (&one, 8)] {
        let r = call(session, id, "get_smtp_status", json!({}))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        assert!(text.contains(&format!("\"id\":{id},\"result\"")), "{text}");
    }
    // The first gets its own answer.
    let answer = tokio::time::timeout(Duration::from_secs(20), first)
        .await
        .expect("the first request is answered")
        .unwrap();
    assert!(answer.contains("\"id\":7,\"result\""), "{answer}");
    // Its id is free again once it was answered.
    let r = call(&one, 7, "get_smtp_status", json!({})).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("\"id\":7,\"result\""));
    stop_in_process(stop, task).await;
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_mode_sends() {
    let smtp = Aiosmtpd::start();
    let (base, stop, task) = in_process(&smtp, false).await;
    let url = format!("{base}/mcp");
    let (is_error, out) = mcp_call(
        &url,
        Some(TOKEN),
        "send_email",
        json!({"to": "rcpt@example.org", "subject": "stateless", "body": "hi"}),
    )
    .await;
    assert!(!is_error, "{out}");
    assert_eq!(out["status"], "sent");
    let id = out["message_id"].as_str().unwrap();
    let m = smtp.wait_messages(1);
    assert_eq!(m.len(), 1);
    assert!(m[0].contains(&format!("<{id}>")));
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
}

/// A stateless `send_email` call of the usual shape is answered by mailmux
/// itself (`mailmux::mcp::stateless`), one with anything more in its
/// `_meta` by rmcp: calls of protocol 2025-06-18 to a daemon without
/// sessions, and calls of 2026-07-28 (which rmcp serves without sessions)
/// to a daemon either way. For each kind of call the two answers are the
/// same: status, content type, and body but for the message's id and the
/// digits of its times. Each call that sends is at the sink once; a
/// repeated idempotency key is a replay or a conflict either way; a
/// message held for approval (nobody to ask either way) is answered
/// `held`; a client of 2026-07-28 that declares tasks gets a task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateless_send_email_is_answered_as_rmcp_answers_it() {
    let smtp = Aiosmtpd::start();
    let send = json!({"to": "rcpt@example.org", "subject": "stateless", "body": "hi"});
    let with = |extra: Value| {
        let mut args = send.clone();
        args.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        args
    };
    let cases = [
        ("sent", send.clone()),
        ("not waiting", with(json!({"wait": false}))),
        ("a dry run", with(json!({"dry_run": true}))),
        ("an unknown field", with(json!({"subjekt": "x"}))),
        ("a mistyped field", with(json!({"to": 5}))),
        ("a bad address", with(json!({"to": "not an address"}))),
        (
            "a bad idempotency key",
            with(json!({"idempotency_key": ""})),
        ),
        ("no arguments", Value::Null),
    ];
    let ways = [
        Way::default(),
        Way {
            modern: true,
            ..Way::default()
        },
        Way {
            modern: true,
            stateful: true,
            ..Way::default()
        },
    ];
    let mut sent = 0;
    for (round, way) in ways.into_iter().enumerate() {
        let (base, stop, task) = in_process(&smtp, way.stateful).await;
        for (i, (case, args)) in cases.iter().enumerate() {
            let answer = both_ways_alike(&base, way, i, case, args).await;
            assert!(answer.contains(r#""isError":"#), "{case}: {answer}");
        }
        // A key used once: both ways a replay of that message, or a conflict.
        let key = format!("k-{round}");
        let keyed = with(json!({"idempotency_key": key}));
        let (is_error, out) = mcp_call(
            &format!("{base}/mcp"),
            Some(TOKEN),
            "send_email",
            keyed.clone(),
        )
        .await;
        assert!(!is_error && out["status"] == "sent", "{out}");
        let replay = both_ways_alike(&base, way, 91, "a replay", &keyed).await;
        assert!(replay.contains(r#""idempotent_replay":true"#), "{replay}");
        let conflict = with(json!({"idempotency_key": key, "subject": "other"}));
        let conflict = both_ways_alike(&base, way, 92, "a conflict", &conflict).await;
        assert!(conflict.contains("idempotency_conflict"), "{conflict}");
        // "sent" and "not waiting", each twice, and the keyed message once.
        sent += 5;
        if way.modern {
            // Scheduled, so that the task's state when it is answered does
            // not depend on how far delivery got.
            let tasks = Way { tasks: true, ..way };
            let later = with(json!({"send_at": "1h"}));
            let answer = both_ways_alike(&base, tasks, 93, "a task", &later).await;
            assert!(answer.contains(r#""resultType":"task""#), "{answer}");
            assert!(answer.contains(r#""status":"working""#), "{answer}");
        }
        let m = smtp.wait_messages(sent);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(smtp.messages().len(), sent, "{way:?}: {m:?}");
        stop_in_process(stop, task).await;

        // A caller whose every message is held: no client to ask either way.
        let mut cfg = config(vec![relay("primary", smtp.port, 100)]);
        cfg.daemon.http.token = Some(Secret::new(TOKEN));
        cfg.safety.policy.approval = mailmux::policy::Approval::Always;
        let (base, stop, task) = in_process_with(cfg, way.stateful).await;
        let answer = both_ways_alike(&base, way, 0, "held", &send).await;
        assert!(answer.contains(r#""status":"held""#), "{answer}");
        stop_in_process(stop, task).await;
        assert_eq!(smtp.messages().len(), sent, "nothing held is sent");
    }
}

/// How [`both_ways_alike`] posts its calls: to a daemon with sessions or
/// without, at protocol 2026-07-28 or 2025-06-18, declaring tasks or not.
#[derive(Clone, Copy, Debug, Default)]
struct Way {
    stateful: bool,
    modern: bool,
    tasks: bool,
}

/// Posts the stateless `send_email` call `args` (none when null) to the
/// daemon at `base` twice: as mailmux answers it itself, and with a member
/// more in `_meta`, as rmcp answers it. Asserts that both answers have
/// status 200, one content type and one body but for the message's id and
/// its numbers; that body.
async fn both_ways_alike(base: &str, way: Way, id: usize, case: &str, args: &Value) -> String {
    let http = reqwest::Client::new();
    let mut heads = HeaderMap::new();
    let mut headers = vec![
        ("accept", "application/json, text/event-stream"),
        ("content-type", "application/json"),
    ];
    let mut meta = json!({"progressToken": id});
    if way.modern {
        headers.extend([
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call"),
            ("mcp-name", "send_email"),
        ]);
        let capabilities = match way.tasks {
            true => json!({"extensions": {"io.modelcontextprotocol/tasks": {}}}),
            false => json!({}),
        };
        meta["io.modelcontextprotocol/protocolVersion"] = json!("2026-07-28");
        meta["io.modelcontextprotocol/clientCapabilities"] = capabilities;
        meta["io.modelcontextprotocol/clientInfo"] = json!({"name": "t", "version": "1"});
    } else {
        headers.push(("mcp-protocol-version", "2025-06-18"));
    }
    for (name, value) in headers {
        heads.insert(name, value.parse().unwrap());
    }
    let mut answers = Vec::new();
    for direct in [true, false] {
        let mut meta = meta.clone();
        if !direct {
            meta["example.org/trace"] = json!("t");
        }
        let mut params = json!({"name": "send_email", "_meta": meta});
        if !args.is_null() {
            params["arguments"] = args.clone();
        }
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params})
            .to_string();
        let taken = mailmux::mcp::stateless::call(&heads, body.as_bytes(), way.stateful);
        assert_eq!(taken.is_some(), direct, "{case}");
        let r = http
            .post(format!("{base}/mcp"))
            .headers(heads.clone())
            .bearer_auth(TOKEN)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        assert!(
            r.headers().get("mcp-session-id").is_none(),
            "{case}: no session"
        );
        let content_type = r.headers()["content-type"].to_str().unwrap().to_owned();
        let text = r.text().await.unwrap();
        let answer: Value = serde_json::from_str(&text).unwrap();
        let mut text = text;
        let id = answer["result"]["structuredContent"]["message_id"]
            .as_str()
            .or(answer["result"]["taskId"].as_str());
        if let Some(id) = id {
            text = text.replace(id, "ID");
        }
        // Each number (a time, a duration) as one digit: a send that took
        // 12 ms is alike one that took 8.
        let mut digits = String::with_capacity(text.len());
        for c in text.chars() {
            match c.is_ascii_digit() {
                true if digits.ends_with('0') => {}
                true => digits.push('0'),
                false => digits.push(c),
            }
        }
        answers.push((status, content_type, digits));
    }
    assert_eq!(answers[0], answers[1], "{case} {way:?}");
    assert_eq!(answers[0].0, 200, "{case}");
    answers.swap_remove(0).2
}

/// In a daemon with sessions, calls of protocol 2026-07-28 (which has none)
/// neither count against the caller's sessions nor close one: a caller at
/// its bound keeps its session while it sends such calls, whether mailmux
/// or rmcp answers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_of_2026_07_28_leave_the_callers_session_open() {
    let smtp = Aiosmtpd::start();
    let mut cfg = config(vec![relay("primary", smtp.port, 100)]);
    cfg.daemon.http.token = Some(Secret::new(TOKEN));
    cfg.daemon.http.max_sessions = 1;
    cfg.daemon.http.max_sessions_per_caller = 1;
    let (base, stop, task) = in_process_with(cfg, true).await;
    let url = format!("{base}/mcp");
    let http = reqwest::Client::new();
    let session = open_session(&http, &url).await;
    let way = Way {
        stateful: true,
        modern: true,
        tasks: false,
    };
    let send = json!({"to": "rcpt@example.org", "subject": "beside", "body": "b"});
    for id in 0..3 {
        let answer = both_ways_alike(&base, way, id, "sent", &send).await;
        assert!(answer.contains(r#""status":"sent""#), "{answer}");
    }
    let r = post(&http, &url)
        .bearer_auth(TOKEN)
        .header("Mcp-Session-Id", &session)
        .body(r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the session is still open");
    assert!(r.text().await.unwrap().contains("send_email"));
    assert_eq!(smtp.wait_messages(6).len(), 6);
    stop_in_process(stop, task).await;
}

/// A stateless `send_email` call still waiting when the daemon stops (its
/// relay never answers) is answered 503 "shutting down" once the grace is
/// over, never `sent` or `queued`, and the daemon stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateless_call_waiting_at_shutdown_is_told_the_daemon_stops() {
    let (mut cfg, held) = silent_relay().await;
    cfg.daemon.shutdown_grace = Duration::from_secs(1);
    let (base, stop, task) = in_process_with(cfg, false).await;
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "send_email",
        "arguments": {"to": "rcpt@example.org", "subject": "late", "body": "b"}}})
    .to_string();
    let http = reqwest::Client::new();
    let call = tokio::spawn(
        post(&http, &format!("{base}/mcp"))
            .bearer_auth(TOKEN)
            .body(body)
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!call.is_finished(), "the call waits for the silent relay");
    stop_in_process(stop, task).await;
    let r = call.await.unwrap().unwrap();
    assert_eq!(r.status(), 503);
    let text = r.text().await.unwrap();
    assert!(text.contains("shutting down"), "{text}");
    held.abort();
}

struct Daemon(Child);

/// The binary serving HTTP on `port` with the seed's SMTP_* variables (one
/// relay: `smtp`), the bearer token, `args` after `serve --http ADDR`, its
/// log in `log` at `rust_log`.
fn seed_daemon(
    smtp: &Aiosmtpd,
    port: u16,
    args: &[&str],
    log: &std::path::Path,
    rust_log: &str,
) -> Daemon {
    let child = Command::new(env!("CARGO_BIN_EXE_mailmux"))
        .args(["serve", "--http", &format!("127.0.0.1:{port}")])
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", rust_log)
        .env("MAILMUX_QUEUE__PATH", common::queue_db())
        .env("SMTP_HOST", "127.0.0.1")
        .env("SMTP_PORT", smtp.port.to_string())
        .env("SMTP_USE_TLS", "false")
        .env("SMTP_FROM_EMAIL", "sender@example.org")
        .env("MAILMUX_HTTP_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    Daemon(child)
}

/// `tests/e2e_client.py http` against `url`: the official Python SDK sends
/// the full message (text and HTML parts, attachment, Bcc, UTF-8 template
/// subject) and checks it as `smtp` stored it. Its stderr.
async fn python_sdk_over_http(smtp: &Aiosmtpd, url: &str) -> String {
    let maildir = smtp.dir.path().join("mail");
    let py = tokio::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e_client.py"))
        .args(["http", url, TOKEN])
        .arg(&maildir)
        .output()
        .await
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&py.stdout);
    let stderr = String::from_utf8_lossy(&py.stderr).into_owned();
    assert!(
        py.status.success() && stdout.contains(" passed, 0 failed"),
        "e2e_client.py http failed\n{stdout}\n{stderr}"
    );
    stderr
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A SIGHUP while the daemon starts (`systemctl reload` during a long
/// recovery of its store) does not kill it: it is kept, and acted on once
/// the daemon serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_while_the_daemon_starts_is_kept_for_later() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = dir.path().join("daemon.log");
    let child = Command::new(env!("CARGO_BIN_EXE_mailmux"))
        .args(["serve", "--http", &format!("127.0.0.1:{port}")])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        // Warned of right after the configuration is read: the mark that
        // the daemon has begun to start, before its store and actors.
        .env("MAILMUX_STARTING_MARK", "1")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut daemon = Daemon(child);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !read().contains("MAILMUX_STARTING_MARK names no configuration key") {
        assert!(Instant::now() < deadline, "never started: {}", read());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    common::signal(daemon.0.id(), "HUP");
    wait_health(&format!("http://127.0.0.1:{port}")).await;
    while !read().contains("SIGHUP received: reloading the configuration") {
        assert!(Instant::now() < deadline, "the SIGHUP was lost: {}", read());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "the daemon exited: {}",
        read()
    );
}

/// Beyond loopback, the Host check does not keep anyone out (a client names
/// `localhost` itself), so the daemon serves there only with a bearer
/// token: without one it refuses to start, before anything runs, and a
/// reload that would drop the last token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_loopback_the_daemon_serves_only_with_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let bind = format!("0.0.0.0:{port}");
    let config = dir.path().join("mailmux.toml");
    let daemon = |log: &str| {
        Command::new(env!("CARGO_BIN_EXE_mailmux"))
            .args([
                "--config",
                config.to_str().unwrap(),
                "serve",
                "--http",
                &bind,
            ])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join(log)).unwrap())
            .spawn()
            .unwrap()
    };

    std::fs::write(&config, "from_email = \"agent@example.org\"\n").unwrap();
    let mut refused = Daemon(daemon("refused.log"));
    let status = tokio::task::spawn_blocking(move || refused.0.wait())
        .await
        .unwrap()
        .unwrap();
    let log = std::fs::read_to_string(dir.path().join("refused.log")).unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "refusing to serve MCP on {bind} without a bearer token"
        )),
        "{log}"
    );
    assert!(
        !dir.path().join("mailmux-queue.db").exists(),
        "nothing started: {log}"
    );

    std::fs::write(
        &config,
        format!("from_email = \"agent@example.org\"\n[http]\ntoken = \"{TOKEN}\"\n"),
    )
    .unwrap();
    let _serving = Daemon(daemon("serving.log"));
    let base = format!("http://127.0.0.1:{port}");
    wait_health(&base).await;
    let url = format!("{base}/mcp");
    let http = reqwest::Client::new();
    let r = post(&http, &url)
        .header("Host", "localhost")
        .body(init_body().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // A reload that would drop the token is refused; the token still holds.
    std::fs::write(&config, "from_email = \"agent@example.org\"\n").unwrap();
    let (is_error, out) = mcp_call(&url, Some(TOKEN), "reload_smtp_configuration", json!({})).await;
    assert!(is_error, "{out}");
    assert_eq!(out["error"]["code"], "invalid_config", "{out}");
    let message = out["error"]["message"].as_str().unwrap();
    assert!(message.contains("no bearer token"), "{message}");
    assert!(message.contains(&bind), "{message}");
    let r = post(&http, &url)
        .body(init_body().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (is_error, out) = mcp_call(
        &url,
        Some(TOKEN),
        "send_email",
        json!({"to": "a@example.org", "subject": "s", "body": "b"}),
    )
    .await;
    assert!(!is_error, "{out}");
    assert_eq!(out["status"], "sent", "{out}");
}

/// The official Python SDK against the binary serving without sessions
/// (`--stateless`): its `send_email` calls are answered by mailmux
/// directly (the debug log says so), and the full message (text and HTML
/// parts, attachment, Bcc, UTF-8 template subject) is checked as aiosmtpd
/// stored it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_sends_through_a_stateless_daemon() {
    let smtp = Aiosmtpd::start();
    let port = free_port();
    let logs = tempfile::NamedTempFile::new().unwrap();
    let _daemon = seed_daemon(&smtp, port, &["--stateless"], logs.path(), "mailmux=debug");
    let base = format!("http://127.0.0.1:{port}");
    wait_health(&base).await;
    python_sdk_over_http(&smtp, &format!("{base}/mcp")).await;
    let log = std::fs::read_to_string(logs.path()).unwrap();
    assert!(
        log.contains("answered without rmcp's service"),
        "the SDK's send_email went through rmcp"
    );
}

/// rmcp's client of protocol 2026-07-28 against the binary in its default
/// mode (with sessions, which that version does without): its `send_email`
/// calls, one that sends and one refused, are answered by mailmux directly
/// (the debug log says so twice), and the message is at the sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_2026_07_28_sends_through_a_daemon_with_sessions() {
    use rmcp::model::ProtocolVersion;
    use rmcp::service::{ClientLifecycleMode, ClientServiceExt};

    let smtp = Aiosmtpd::start();
    let port = free_port();
    let logs = tempfile::NamedTempFile::new().unwrap();
    let _daemon = seed_daemon(&smtp, port, &[], logs.path(), "mailmux=debug");
    let base = format!("http://127.0.0.1:{port}");
    wait_health(&base).await;
    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(format!("{base}/mcp"))
            .auth_header(TOKEN.to_string()),
    );
    let modern = ClientLifecycleMode::Discover {
        preferred_versions: vec![ProtocolVersion::V_2026_07_28],
    };
    let client = ().serve_with_lifecycle(transport, modern).await.unwrap();
    let call = |args: Value| {
        CallToolRequestParams::new("send_email").with_arguments(args.as_object().unwrap().clone())
    };
    let out = client
        .call_tool(call(
            json!({"to": "rcpt@example.org", "subject": "modern", "body": "hello"}),
        ))
        .await
        .unwrap();
    assert_ne!(out.is_error, Some(true), "{out:?}");
    let out = out.structured_content.unwrap();
    assert_eq!(out["status"], "sent", "{out}");
    let refused = client
        .call_tool(call(json!({"to": "not an address", "body": "b"})))
        .await
        .unwrap();
    assert_eq!(refused.is_error, Some(true), "{refused:?}");
    let m = smtp.wait_messages(1);
    assert!(m[0].contains(&format!("<{}>", out["message_id"].as_str().unwrap())));
    assert!(m[0].contains("Subject: modern"), "{}", m[0]);
    let _ = client.cancel().await;
    let log = std::fs::read_to_string(logs.path()).unwrap();
    assert_eq!(
        log.matches("answered without rmcp's service").count(),
        2,
        "each send_email was answered by mailmux"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_http_with_a_token() {
    let smtp = Aiosmtpd::start();
    let port = free_port();
    let logs = tempfile::NamedTempFile::new().unwrap();
    let mut daemon = seed_daemon(&smtp, port, &[], logs.path(), "info");
    let base = format!("http://127.0.0.1:{port}");
    wait_health(&base).await;
    let url = format!("{base}/mcp");

    let http = reqwest::Client::new();
    let r = post(&http, &url)
        .body(init_body().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // The official Python SDK over streamable HTTP: the full message (text
    // and HTML parts, attachment, Bcc, UTF-8 template subject) checked as
    // aiosmtpd stored it.
    let stderr = python_sdk_over_http(&smtp, &url).await;
    // The SDK ends its session with a DELETE and warns unless it gets 200
    // or 204.
    assert!(!stderr.contains("Session termination failed"), "{stderr}");

    let (is_error, out) = mcp_call(
        &url,
        Some(TOKEN),
        "send_email",
        json!({"to": ["rcpt@example.org"], "subject": "over http", "body": "hello"}),
    )
    .await;
    assert!(!is_error, "{out}");
    assert_eq!(out["status"], "sent");
    let id = out["message_id"].as_str().unwrap();
    let m = smtp.wait_messages(2);
    assert_eq!(m.len(), 2);
    let ours = m
        .iter()
        .find(|msg| msg.contains(&format!("<{id}>")))
        .expect("the message with the returned Message-ID");
    assert!(ours.contains("Subject: over http"));

    // SIGTERM: drains and exits 0.
    common::signal(daemon.0.id(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = daemon.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let logs = std::fs::read_to_string(logs.path()).unwrap();
    assert!(status.success(), "{status:?}\n{logs}");
    assert!(logs.contains("SIGTERM received"), "{logs}");
    assert!(logs.contains("all deliveries finished"), "{logs}");
    // At the default level, rmcp writes nothing: not each client's
    // `initialize` request, not its notifications.
    let rmcp: Vec<&str> = logs.lines().filter(|l| l.contains(" rmcp::")).collect();
    assert!(rmcp.is_empty(), "{rmcp:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_requests_past_the_bound_wait_unread() {
    use support::fault_smtp::{Action, FaultSmtp, Phase, Script, Share};
    // The first message hangs after its final "." until the data timeout.
    let smtp =
        FaultSmtp::start(Script::ok().on_share(Phase::AfterDot, Action::Hang, Share::FirstN(1)))
            .await;
    let mut primary = relay("primary", smtp.port(), 100);
    primary.timeouts.data = Duration::from_millis(1500);
    // The lost connection backs the primary off; the second call may then
    // go to the backup.
    let backup_smtp = FaultSmtp::start(Script::ok()).await;
    let backup = relay("backup", backup_smtp.port(), 1);
    let mut cfg = config(vec![primary, backup]);
    cfg.daemon.max_concurrent_calls = 1;
    let (base, stop, task) = in_process_with(cfg, true).await;
    let url = format!("{base}/mcp");
    let send = |subject: &'static str| {
        let url = url.clone();
        tokio::spawn(async move {
            mcp_call(
                &url,
                None,
                "send_email",
                json!({"to": "rcpt@example.org", "subject": subject, "body": "x"}),
            )
            .await
        })
    };

    let first = send("first");
    assert!(
        support::wait_until(
            || smtp.commands(Phase::AfterDot) == 1,
            Duration::from_secs(10)
        )
        .await,
        "the first call reached the end of its data"
    );
    let second = send("second");
    // While the first call holds the only slot, the second is not handled:
    // the server sees no second transaction.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(smtp.commands(Phase::Mail), 1, "the second call waited");
    assert_eq!(
        backup_smtp.commands(Phase::Mail),
        0,
        "the second call waited"
    );

    let (_, one) = first.await.unwrap();
    assert_eq!(one["status"], "unknown", "{one}");
    let (is_error, two) = second.await.unwrap();
    assert!(!is_error, "{two}");
    assert_eq!(two["status"], "sent");
    assert_eq!(smtp.delivered().len() + backup_smtp.delivered().len(), 1);
    let _ = stop.send(());
    let _ = task.await;
}

/// A client of protocol 2026-07-28 (bearer `token`, if any), and the URI of
/// a message it scheduled an hour ahead, to listen to.
async fn modern_client_with_a_message(
    url: &str,
    token: Option<&str>,
    subject: &str,
) -> (rmcp::service::RunningService<rmcp::RoleClient, ()>, String) {
    use rmcp::model::ProtocolVersion;
    use rmcp::service::{ClientLifecycleMode, ClientServiceExt};

    let mut cfg = StreamableHttpClientTransportConfig::with_uri(url.to_string());
    if let Some(t) = token {
        cfg = cfg.auth_header(t.to_string());
    }
    let transport = StreamableHttpClientTransport::from_config(cfg);
    let modern = ClientLifecycleMode::Discover {
        preferred_versions: vec![ProtocolVersion::V_2026_07_28],
    };
    let client = ().serve_with_lifecycle(transport, modern).await.unwrap();
    let params = CallToolRequestParams::new("send_email").with_arguments(
        json!({"to": "rcpt@example.org", "subject": subject, "body": "x", "send_at": "1h"})
            .as_object()
            .unwrap()
            .clone(),
    );
    let out = client.call_tool(params).await.unwrap();
    let out = out.structured_content.unwrap();
    assert_eq!(out["status"], "scheduled", "{out}");
    let uri = format!("mailmux://messages/{}", out["message_id"].as_str().unwrap());
    (client, uri)
}

/// `subscriptions/listen` streams (protocol 2026-07-28) stay open for as long
/// as the client listens, and hold none of the slots of
/// `max_concurrent_calls`: with one slot and three streams open, a call
/// still goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_streams_do_not_hold_call_slots() {
    use rmcp::model::SubscriptionFilter;

    let smtp = Aiosmtpd::start();
    let mut cfg = config(vec![relay("primary", smtp.port, 100)]);
    cfg.daemon.max_concurrent_calls = 1;
    let (base, stop, task) = in_process_with(cfg, true).await;
    let url = format!("{base}/mcp");
    let (client, uri) = modern_client_with_a_message(&url, None, "later").await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let filter = SubscriptionFilter::builder()
            .resource_subscriptions(vec![uri.clone()])
            .build();
        let stream = tokio::time::timeout(Duration::from_secs(10), client.listen(filter))
            .await
            .expect("a listen is acknowledged within 10 s")
            .unwrap();
        assert_eq!(
            stream.acknowledged().resource_subscriptions,
            Some(vec![uri.clone()])
        );
        streams.push(stream);
    }
    let call = mcp_call(
        &url,
        None,
        "send_email",
        json!({"to": "rcpt@example.org", "subject": "now", "body": "x"}),
    );
    let (is_error, out) = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("a call is not held up by open listen streams");
    assert!(!is_error, "{out}");
    assert_eq!(out["status"], "sent", "{out}");
    // The header is trusted only because rmcp refuses a request whose body
    // says otherwise: a call dressed as a listen is refused, and nothing is
    // sent.
    let dressed = post(&reqwest::Client::new(), &url)
        .header("MCP-Protocol-Version", "2026-07-28")
        .header("Mcp-Method", "subscriptions/listen")
        .json(&json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                                 "io.modelcontextprotocol/clientCapabilities": {}},
                       "name": "send_email",
                       "arguments": {"to": "rcpt@example.org", "subject": "dressed", "body": "x"}}}))
        .send()
        .await
        .unwrap();
    let status = dressed.status();
    let text = dressed.text().await.unwrap();
    assert_eq!(status.as_u16(), 400, "{text}");
    assert!(text.contains("does not match"), "{text}");
    // A call of that protocol is served without a session even here, and
    // its result comes as one JSON body, not an SSE stream.
    let plain = post(&reqwest::Client::new(), &url)
        .header("MCP-Protocol-Version", "2026-07-28")
        .header("Mcp-Method", "tools/call")
        .header("Mcp-Name", "get_smtp_status")
        .json(&json!({"jsonrpc": "2.0", "id": 8, "method": "tools/call",
            "params": {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                                 "io.modelcontextprotocol/clientCapabilities": {}},
                       "name": "get_smtp_status", "arguments": {}}}))
        .send()
        .await
        .unwrap();
    let status = plain.status();
    let kind = plain.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_string();
    let text = plain.text().await.unwrap();
    assert_eq!(status.as_u16(), 200, "{text}");
    assert!(kind.starts_with("application/json"), "{kind}: {text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert!(
        answer["result"]["structuredContent"]["relays"].is_array(),
        "{text}"
    );
    for mut s in streams {
        s.cancel().await.unwrap();
    }
    let _ = client.cancel().await;
    let delivered = smtp.wait_messages(1);
    assert_eq!(delivered.len(), 1, "only the call that was asked for");
    assert!(!delivered[0].contains("dressed"));
    let _ = stop.send(());
    let _ = task.await;
}

/// One caller may hold 32 `subscriptions/listen` streams: the next is refused
/// at once with 429, another caller still gets its own, and closing one
/// frees its place.
#[tokio::test(flavor = "multi_thread")]
async fn one_caller_cannot_take_every_listen_stream() {
    use mailmux::policy::{CallerSettings, hash_token};
    use rmcp::model::SubscriptionFilter;

    let smtp = Aiosmtpd::start();
    let mut cfg = config(vec![relay("primary", smtp.port, 100)]);
    for name in ["alpha", "beta"] {
        cfg.safety.callers.push(CallerSettings {
            name: name.into(),
            token: Some(hash_token(&format!("{name}-token"))),
            policy: cfg.safety.policy.clone(),
        });
    }
    let (base, stop, task) = in_process_with(cfg, true).await;
    let url = format!("{base}/mcp");
    let connect = |who: &'static str| {
        let (url, token) = (url.clone(), format!("{who}-token"));
        async move { modern_client_with_a_message(&url, Some(&token), who).await }
    };
    let filter = |uri: &str| {
        SubscriptionFilter::builder()
            .resource_subscriptions(vec![uri.to_string()])
            .build()
    };
    let (alpha, alpha_uri) = connect("alpha").await;
    let mut streams = Vec::new();
    for i in 0..32 {
        let stream =
            tokio::time::timeout(Duration::from_secs(10), alpha.listen(filter(&alpha_uri)))
                .await
                .expect("a listen is answered within 10 s")
                .unwrap_or_else(|e| panic!("listen {i} of 32: {e}"));
        streams.push(stream);
    }
    let refused = tokio::time::timeout(Duration::from_secs(10), alpha.listen(filter(&alpha_uri)))
        .await
        .expect("the 33rd listen is answered at once, not kept waiting");
    let Err(e) = refused else {
        panic!("the 33rd listen of one caller is refused");
    };
    assert!(e.to_string().contains("429"), "{e}");
    let (beta, beta_uri) = connect("beta").await;
    let mut other = tokio::time::timeout(Duration::from_secs(10), beta.listen(filter(&beta_uri)))
        .await
        .expect("another caller's listen is answered")
        .expect("another caller still gets a stream");
    assert_eq!(
        other.acknowledged().resource_subscriptions,
        Some(vec![beta_uri.clone()])
    );
    // Closing one of alpha's streams frees its place.
    streams.pop().unwrap().cancel().await.unwrap();
    let again = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match alpha.listen(filter(&alpha_uri)).await {
                Ok(s) => return s,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("a closed stream's place is freed");
    streams.push(again);
    for mut s in streams {
        s.cancel().await.unwrap();
    }
    other.cancel().await.unwrap();
    let _ = alpha.cancel().await;
    let _ = beta.cancel().await;
    let _ = stop.send(());
    let _ = task.await;
}

/// Clients that stall cannot hold the daemon: with `max_concurrent_calls =
/// 2`, two requests whose bodies never come take both call permits until
/// `http.read_timeout` (1 s here) answers them 408, and a real call waiting
/// behind them then goes through. A connection that never finishes its
/// header is closed after the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_clients_are_timed_out_and_give_their_call_permits_back() {
    let smtp = Aiosmtpd::start();
    let mut cfg = config(vec![relay("primary", smtp.port, 100)]);
    cfg.daemon.max_concurrent_calls = 2;
    cfg.daemon.http.read_timeout = Duration::from_secs(1);
    let (base, stop, task) = in_process_with(cfg, false).await;
    let addr = base.trim_start_matches("http://").to_string();

    // Two POSTs that announce a body and never send it.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(
            format!(
                "POST /mcp HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
                 Accept: application/json, text/event-stream\r\nContent-Length: 300\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        stalled.push(s);
    }
    // A header that never ends.
    let mut half = tokio::net::TcpStream::connect(&addr).await.unwrap();
    half.write_all(format!("POST /mcp HTTP/1.1\r\nHost: {addr}\r\n").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let body = json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{
        "name":"send_email",
        "arguments":{"to":"rcpt@example.org","subject":"behind stalled clients","body":"x"}}});
    let answer = post(&reqwest::Client::new(), &format!("{base}/mcp"))
        .json(&body)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("the call is answered once the stalled requests time out");
    let waited = started.elapsed();
    assert_eq!(answer.status(), 200);
    let v: Value = answer.json().await.unwrap();
    assert_eq!(v["result"]["structuredContent"]["status"], "sent", "{v}");
    assert!(
        waited >= Duration::from_millis(500),
        "the call did not wait for the permits: {waited:?}"
    );

    for mut s in stalled {
        let mut reply = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut reply))
            .await
            .expect("the stalled request is answered")
            .unwrap();
        assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    }
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), half.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the half-sent header was never closed");
    assert_eq!(smtp.wait_messages(1).len(), 1);
    let _ = stop.send(());
    let _ = task.await;
}

/// With `http.max_connections = 2`, two connections that send nothing hold
/// both: a third client waits in the kernel's backlog, unanswered, until
/// `http.read_timeout` (1 s) closes them, and is then served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_bound_wait_to_be_accepted() {
    let smtp = Aiosmtpd::start();
    let mut cfg = config(vec![relay("primary", smtp.port, 100)]);
    cfg.daemon.http.max_connections = 2;
    cfg.daemon.http.read_timeout = Duration::from_secs(1);
    let (base, stop, task) = in_process_with(cfg, false).await;
    let addr = base.trim_start_matches("http://").to_string();
    // wait_health's connection may still be open: let it time out first.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let idle = [
        tokio::net::TcpStream::connect(&addr).await.unwrap(),
        tokio::net::TcpStream::connect(&addr).await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let health = reqwest::Client::new()
        .get(format!("{base}/health"))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("answered once an idle connection is closed");
    let waited = started.elapsed();
    assert_eq!(health.status(), 200);
    assert!(
        waited >= Duration::from_millis(500),
        "answered while both connections were taken: {waited:?}"
    );
    drop(idle);
    let _ = stop.send(());
    let _ = task.await;
}

/// The daemon raises its soft limit of open files to the hard limit at
/// start (here from 256), so that HTTP clients, relays and the store do not
/// share a thousand descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_raises_its_open_files_limit() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new("sh")
        .args(["-c", "ulimit -Sn 256 && exec \"$0\" serve --http \"$1\""])
        .arg(env!("CARGO_BIN_EXE_mailmux"))
        .arg(format!("127.0.0.1:{port}"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let _daemon = Daemon(child);
    wait_health(&format!("http://127.0.0.1:{port}")).await;
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (soft, hard) = (fields[3], fields[4]);
    assert_ne!(soft, "256", "{line}");
    assert_eq!(soft, hard, "{line}");
}

/// One caller may hold 64 MCP sessions at once (stateful mode): its 65th
/// `initialize` closes the session it named least recently, which then
/// answers 404, while the sessions it used since stay open; a session
/// closed by its client's DELETE makes room without closing any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_past_its_sessions_loses_its_least_recently_used_one() {
    // The recorder, before anything is counted (the daemon installs it at
    // start; this server runs in the test's process).
    mailmux::telemetry::install();
    let smtp = Aiosmtpd::start();
    let (base, stop, task) = in_process(&smtp, true).await;
    let url = format!("{base}/mcp");
    let http = reqwest::Client::new();
    let initialize = || {
        post(&http, &url)
            .bearer_auth(TOKEN)
            .body(init_body().to_string())
            .send()
    };
    // The notification every client sends after `initialize`: 202 while
    // the session is open.
    let initialized = |id: &str| {
        post(&http, &url)
            .bearer_auth(TOKEN)
            .header("mcp-session-id", id)
            .header("mcp-protocol-version", "2025-06-18")
            .body(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string())
            .send()
    };
    let mut ids = Vec::new();
    for i in 0..64 {
        let r = initialize().await.unwrap();
        assert_eq!(r.status(), 200, "session {i}");
        let id = r.headers()["mcp-session-id"].to_str().unwrap().to_string();
        ids.push(id);
    }
    // Session 0 is used after all the others were opened: session 1 is now
    // the one named least recently.
    assert_eq!(initialized(&ids[0]).await.unwrap().status(), 202);

    let newer = initialize().await.unwrap();
    assert_eq!(newer.status(), 200);
    let newer = newer.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(initialized(&ids[1]).await.unwrap().status(), 404);
    for id in [&ids[0], &ids[2], &ids[63], &newer] {
        assert_eq!(initialized(id).await.unwrap().status(), 202, "{id}");
    }

    // A DELETE makes room: the next `initialize` closes no other session.
    let closed = http
        .delete(&url)
        .bearer_auth(TOKEN)
        .header("mcp-session-id", &ids[2])
        .send()
        .await
        .unwrap();
    // 204, not rmcp's 202: the Python SDK logs a warning for anything but
    // 200 or 204.
    assert_eq!(closed.status(), 204);
    assert_eq!(initialize().await.unwrap().status(), 200);
    for id in ids[3..].iter().chain([&ids[0], &newer]) {
        assert_eq!(initialized(id).await.unwrap().status(), 202, "{id}");
    }

    // /metrics counts the sessions open and the one closed for the bound
    // (no other test here closes one for it).
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sample = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .map(|v| v.trim().parse::<f64>().unwrap())
    };
    assert_eq!(sample("mailmux_mcp_sessions"), Some(64.0), "{text}");
    assert_eq!(
        sample("mailmux_mcp_sessions_evicted_total"),
        Some(1.0),
        "{text}"
    );
    let _ = stop.send(());
    let _ = task.await;
}

/// Under `queue.min_free` the daemon refuses new mail, and `/health` says
/// so with 503, so that a load balancer sends mail elsewhere. No file
/// system has a reserve this large free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_while_new_mail_is_refused_under_the_free_space_reserve() {
    let smtp = Aiosmtpd::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(vec![relay("primary", smtp.port, 100)]);
    cfg.queue.store = mailmux_actors::queue::StoreKind::Sqlite {
        path: dir.path().join("queue.db"),
    };
    cfg.queue.min_free = 1 << 60;
    let (base, stop, task) = in_process_with(cfg, false).await;
    let r = reqwest::get(format!("{base}/health")).await.unwrap();
    assert_eq!(r.status(), 503);
    let health: Value = r.json().await.unwrap();
    assert_eq!(health["ok"], false, "{health}");
    assert_eq!(health["queue"]["available"], true, "{health}");
    assert_eq!(health["queue"]["min_free"], 1u64 << 60, "{health}");
    assert!(health["queue"]["free_bytes"].as_u64().unwrap() < 1 << 60);
    assert_eq!(
        health["relays"],
        json!([{"name": "primary", "state": "healthy"}])
    );
    let (is_error, out) = mcp_call(
        &format!("{base}/mcp"),
        None,
        "send_email",
        json!({"to": ["a@example.org"], "subject": "refused", "body": "b"}),
    )
    .await;
    assert!(is_error, "{out}");
    assert_eq!(out["error"]["code"], "queue_full", "{out}");
    stop_in_process(stop, task).await;
    assert!(smtp.messages().is_empty());
}

/// With `http.tls_cert` and `http.tls_key` the daemon serves HTTPS only: a
/// real MCP client sends through it, plain HTTP gets no answer, a client
/// that never starts its handshake is closed after `http.read_timeout`, the
/// console's cookie is `Secure`, and a SIGHUP serves a renewed certificate
/// (a broken one is refused and the served one kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_with_a_certificate_serves_https_and_a_reload_renews_it() {
    use std::os::unix::fs::PermissionsExt;
    use support::tls::TestCa;

    let smtp = Aiosmtpd::start();
    let dir = tempfile::tempdir().unwrap();
    let (first, renewed) = (TestCa::generate(), TestCa::generate());
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let install = |ca: &TestCa| {
        std::fs::write(&cert, &ca.cert_pem).unwrap();
        std::fs::write(&key, &ca.key_pem).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    install(&first);
    let config = dir.path().join("mailmux.toml");
    std::fs::write(
        &config,
        format!(
            "from_email = \"agent@example.org\"\n\
             [http]\ntoken = \"{TOKEN}\"\nread_timeout = \"1s\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
             [[operators]]\nname = \"ops\"\ntoken_env = \"MM_OPS_TOKEN\"\n\
             [[relays]]\nname = \"sink\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n",
            cert.display(),
            key.display(),
            smtp.port
        ),
    )
    .unwrap();
    let port = free_port();
    let log = dir.path().join("daemon.log");
    let child = Command::new(env!("CARGO_BIN_EXE_mailmux"))
        .args(["--config", config.to_str().unwrap()])
        .args(["serve", "--http", &format!("127.0.0.1:{port}")])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MAILMUX_QUEUE__PATH", common::queue_db())
        .env("MM_OPS_TOKEN", "ops-token-6b0e")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let daemon = Daemon(child);
    let trusting = |ca: &TestCa| {
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca.ca_pem.as_bytes()).unwrap())
            .build()
            .unwrap()
    };
    let base = format!("https://localhost:{port}");
    let health = |client: reqwest::Client| {
        let url = format!("{base}/health");
        async move { client.get(url).send().await.map(|r| r.status().as_u16()) }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while health(trusting(&first)).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "no HTTPS answer: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains(&format!("serving MCP on https://127.0.0.1:{port}/mcp")),
        "{logged}"
    );

    // Plain HTTP is not served.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");

    // A real MCP client (rmcp's, on reqwest) sends a message through it.
    let client = reqwest_013::Client::builder()
        .tls_certs_only([reqwest_013::Certificate::from_pem(first.ca_pem.as_bytes()).unwrap()])
        .build()
        .unwrap();
    let cfg = StreamableHttpClientTransportConfig::with_uri(format!("{base}/mcp"))
        .auth_header(TOKEN.to_string());
    let mcp =
        ().serve(StreamableHttpClientTransport::with_client(client, cfg))
            .await
            .expect("initializes over HTTPS");
    let args = json!({"to": ["rcpt@example.org"], "subject": "over https", "body": "hello"});
    let Value::Object(args) = args else {
        unreachable!()
    };
    let result = mcp
        .call_tool(CallToolRequestParams::new("send_email").with_arguments(args))
        .await
        .unwrap();
    let out = result.structured_content.unwrap();
    assert_eq!(out["status"], "sent", "{out}");
    let _ = mcp.cancel().await;
    assert_eq!(smtp.wait_messages(1).len(), 1);

    // A connection that never starts its handshake is closed past
    // read_timeout (1 s).
    let mut idle = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "still open: {read:?}"
    );

    // The console's session cookie is kept off plain HTTP.
    let no_redirect = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(first.ca_pem.as_bytes()).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let signed_in = no_redirect
        .post(format!("{base}/console/login"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("token=ops-token-6b0e")
        .send()
        .await
        .unwrap();
    let cookie = signed_in.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(cookie.ends_with("; Secure"), "{cookie}");

    // The certificate is renewed in place and the daemon told by SIGHUP:
    // new connections get the new one.
    install(&renewed);
    common::signal(daemon.0.id(), "HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    while health(trusting(&renewed)).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "renewed certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        health(trusting(&first)).await.is_err(),
        "the old certificate is still served"
    );

    // A broken file at the next reload is refused, naming its key, and the
    // served certificate stays.
    std::fs::write(&cert, "not a certificate\n").unwrap();
    common::signal(daemon.0.id(), "HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let logged = std::fs::read_to_string(&log).unwrap();
        if logged.contains("configuration not reloaded") {
            assert!(logged.contains("http.tls_cert"), "{logged}");
            break;
        }
        assert!(Instant::now() < deadline, "{logged}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(health(trusting(&renewed)).await.unwrap(), 200);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(!logged.contains("PRIVATE KEY"), "{logged}");
}

/// An address that fails authentication past `http.auth_failures` is
/// refused (429, `Retry-After`) on every path but `/health`, even with the
/// right token, and logged once; a failure refills and the right token
/// works again. Wrong console sign-ins count the same as wrong bearer
/// tokens, and no token reaches the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_refuses_an_address_that_fails_authentication_too_often() {
    const OPS: &str = "ops-token-5be0c2";
    let smtp = Aiosmtpd::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("mailmux.toml");
    std::fs::write(
        &config,
        "[[operators]]\nname = \"ops\"\ntoken_env = \"OPS_TOKEN\"\n",
    )
    .unwrap();
    let log = dir.path().join("daemon.log");
    let child = Command::new(env!("CARGO_BIN_EXE_mailmux"))
        .args(["serve", "--http", &format!("127.0.0.1:{port}")])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MAILMUX_CONFIG", &config)
        .env("MAILMUX_QUEUE__PATH", dir.path().join("queue.db"))
        .env("SMTP_HOST", "127.0.0.1")
        .env("SMTP_PORT", smtp.port.to_string())
        .env("SMTP_USE_TLS", "false")
        .env("SMTP_FROM_EMAIL", "sender@example.org")
        .env("MAILMUX_HTTP_TOKEN", TOKEN)
        .env("OPS_TOKEN", OPS)
        // Three failures, one refilled every five seconds.
        .env("MAILMUX_HTTP__AUTH_FAILURES", "3/15s")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _daemon = Daemon(child);
    let base = format!("http://127.0.0.1:{port}");
    wait_health(&base).await;
    let url = format!("{base}/mcp");
    let http = reqwest::Client::new();
    let body = init_body().to_string();
    let initialize = |token: &'static str| {
        post(&http, &url)
            .bearer_auth(token)
            .body(body.clone())
            .send()
    };

    // Two wrong bearer tokens and one wrong console sign-in use up the
    // three failures; the fourth failure is answered, and refuses.
    assert_eq!(initialize("wrong-1").await.unwrap().status(), 401);
    assert_eq!(initialize("wrong-2").await.unwrap().status(), 401);
    let r = http
        .post(format!("{base}/console/login"))
        .form(&[("token", "wrong-3")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(initialize("wrong-4").await.unwrap().status(), 401);

    // Refused now, the right tokens too, whatever the path.
    let r = initialize(TOKEN).await.unwrap();
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=5).contains(&wait), "Retry-After {wait}");
    let refusal: Value = r.json().await.unwrap();
    assert!(
        refusal["error"]
            .as_str()
            .unwrap()
            .contains("too many failed authentications"),
        "{refusal}"
    );
    for _ in 0..5 {
        assert_eq!(initialize("wrong-5").await.unwrap().status(), 429);
    }
    let r = http
        .post(format!("{base}/console/login"))
        .form(&[("token", OPS)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429, "console sign-in with the right token");
    let r = http.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let r = http.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(r.status(), 200, "/health needs no token and stays open");
    // Another address is not refused: it calls with the right token, and
    // reads the refused addresses in the metrics.
    let other = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let r = post(&other, &url)
        .bearer_auth(TOKEN)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "another address");
    let metrics_url = format!("{base}/metrics");
    let scrape = |client: &reqwest::Client| client.get(&metrics_url).send();
    let scraped = scrape(&other).await.unwrap().text().await.unwrap();
    assert!(
        scraped
            .lines()
            .any(|l| l == "mailmux_http_refused_addresses 1"),
        "one address refused:\n{scraped}"
    );

    // A failure refills within Retry-After: the right token works again,
    // and a call goes through to the sink.
    tokio::time::sleep(Duration::from_millis(wait * 1000 + 100)).await;
    assert_eq!(initialize(TOKEN).await.unwrap().status(), 200);
    let (is_error, out) = mcp_call(
        &url,
        Some(TOKEN),
        "send_email",
        json!({"to": "a@example.org", "subject": "after the refusal", "body": "b"}),
    )
    .await;
    assert!(!is_error, "{out}");
    assert_eq!(out["status"], "sent", "{out}");
    let mail = smtp.wait_messages(1);
    assert!(mail[0].contains("after the refusal"), "{}", mail[0]);
    let r = scrape(&http).await.unwrap().text().await.unwrap();
    assert!(
        r.lines()
            .any(|l| l.starts_with("mailmux_http_refused_total{status=\"429\"} ")),
        "the refusals are counted:\n{r}"
    );
    assert!(
        r.lines()
            .any(|l| l == "mailmux_http_refused_total{status=\"401\"} 4"),
        "the four failures, the console's sign-in too:\n{r}"
    );
    assert!(
        r.lines().any(|l| l == "mailmux_http_refused_addresses 0"),
        "none refused now:\n{r}"
    );

    let text = std::fs::read_to_string(&log).unwrap();
    let logged = text
        .lines()
        .filter(|l| l.contains("authentication failed too often"))
        .count();
    assert_eq!(logged, 1, "one line for the spell:\n{text}");
    assert!(text.contains("127.0.0.1"), "{text}");
    for secret in [TOKEN, OPS, "wrong-1", "wrong-3", "wrong-5"] {
        assert!(!text.contains(secret), "{secret} reached the log:\n{text}");
    }
}
