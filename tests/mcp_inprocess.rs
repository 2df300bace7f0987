//! The MCP tools end to end in one process: rmcp's client over an in-memory
//! duplex, the real dispatcher, and aiosmtpd receiving over loopback.

mod common;
#[path = "../actors/tests/support/mod.rs"]
mod support;

use std::time::Duration;

use common::{Aiosmtpd, InProcess, config, free_port, relay};
use mailmux::config::Sources;
use mailmux_actors::{Credentials, RelayKind, Secret};
use rmcp::model::CallToolRequestParams;
use serde_json::{Value, json};

/// Two relays: "primary" at aiosmtpd, "backup" at a closed port, with a
/// password that must never show.
async fn harness(smtp: &Aiosmtpd) -> InProcess {
    let mut backup = relay("backup", free_port(), 10);
    if let RelayKind::Smtp(s) = &mut backup.kind {
        s.auth = Some(Credentials::password(
            "user",
            Secret::new("hunter2-very-secret"),
        ));
    }
    InProcess::start(
        config(vec![relay("primary", smtp.port, 100), backup]),
        Sources::default(),
    )
    .await
}

async fn call(h: &InProcess, tool: &str, args: Value) -> (bool, Value, String) {
    let mut params = CallToolRequestParams::new(tool.to_string());
    if let Value::Object(map) = args {
        params = params.with_arguments(map);
    }
    let result = tokio::time::timeout(Duration::from_secs(60), h.client.call_tool(params))
        .await
        .unwrap_or_else(|_| panic!("{tool} did not answer within 60 s"))
        .expect("no protocol error");
    let text = result
        .content
        .first()
        .and_then(|c| c.as_text())
        .map(|t| t.text.clone())
        .unwrap_or_default();
    let structured = result.structured_content.expect("structured content");
    // The sentence, then the structured result as JSON text, as the MCP
    // specification asks of a tool that returns structured content.
    assert_eq!(result.content.len(), 2, "{tool}: {:?}", result.content);
    let json = result.content[1].as_text().expect("a text block");
    assert_eq!(
        serde_json::from_str::<Value>(&json.text).expect("JSON text"),
        structured,
        "{tool}"
    );
    (result.is_error.unwrap_or(false), structured, text)
}

fn header<'a>(message: &'a str, name: &str) -> Option<&'a str> {
    let head = message.split("\n\n").next().unwrap_or("");
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test]
async fn lists_every_tool_with_input_and_output_schemas() {
    let smtp = Aiosmtpd::start();
    let h = harness(&smtp).await;
    let tools = h.client.list_all_tools().await.unwrap();
    let mut names: Vec<_> = tools.iter().map(|t| t.name.to_string()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "cancel_message",
            "get_message_status",
            "get_smtp_status",
            "list_messages",
            "reconnect_smtp_servers",
            "reload_smtp_configuration",
            "send_batch",
            "send_email",
            "switch_smtp_server",
            "test_smtp_connection"
        ]
    );
    for t in &tools {
        assert_eq!(
            t.input_schema.get("type"),
            Some(&json!("object")),
            "{}",
            t.name
        );
        let out = t
            .output_schema
            .as_ref()
            .unwrap_or_else(|| panic!("{} has no output schema", t.name));
        assert!(out.get("properties").is_some(), "{}", t.name);
        assert!(t.description.is_some());
        // Only formats JSON Schema defines, so that validating clients
        // (ajv in the TypeScript SDK) accept every schema without warning.
        for schema in [&*t.input_schema, &**out] {
            let mut formats = Vec::new();
            collect_formats(&Value::Object(schema.clone()), &mut formats);
            for f in formats {
                assert!(
                    mailmux::mcp::schema::STANDARD_FORMATS.contains(&f.as_str()),
                    "{}: non-standard format {f:?}",
                    t.name
                );
            }
        }
    }
    // An unsigned number keeps its lower bound.
    let status = tools
        .iter()
        .find(|t| t.name == "get_message_status")
        .unwrap();
    let text = serde_json::to_string(status.output_schema.as_ref().unwrap()).unwrap();
    assert!(text.contains("\"minimum\":0"), "{text}");
    let send = tools.iter().find(|t| t.name == "send_email").unwrap();
    let props = send.input_schema.get("properties").unwrap();
    for p in [
        "to",
        "cc",
        "bcc",
        "subject",
        "body",
        "attachments",
        "relay",
        "dry_run",
    ] {
        assert!(props.get(p).is_some(), "send_email lacks {p}");
    }
}

#[tokio::test]
async fn send_email_delivers_and_reports() {
    let smtp = Aiosmtpd::start();
    let h = harness(&smtp).await;
    let (is_error, out, text) = call(
        &h,
        "send_email",
        json!({"to": ["rcpt@example.org"], "bcc": "hidden@example.org", "subject": "Hello", "body": "Hi there"}),
    )
    .await;
    assert!(!is_error, "{out}");
    assert_eq!(out["status"], "sent");
    assert_eq!(out["relay"], "primary");
    assert!(text.starts_with("sent "), "{text}");
    let id = out["message_id"].as_str().unwrap().to_string();
    let accepted = out["accepted"].as_array().unwrap();
    assert_eq!(accepted.len(), 2);
    assert_eq!(out["attempts"][0]["class"], "delivered");
    let messages = smtp.wait_messages(1);
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(header(m, "Message-ID"), Some(format!("<{id}>").as_str()));
    assert_eq!(header(m, "Subject"), Some("Hello"));
    assert!(header(m, "Bcc").is_none());
    assert!(
        header(m, "X-RcptTo")
            .unwrap()
            .contains("hidden@example.org")
    );
}

#[tokio::test]
async fn dry_run_renders_and_sends_nothing() {
    let smtp = Aiosmtpd::start();
    let h = harness(&smtp).await;
    let (is_error, out, _) = call(
        &h,
        "send_email",
        json!({"to": "rcpt@example.org", "subject": "Preview", "body": "text", "dry_run": true}),
    )
    .await;
    assert!(!is_error, "{out}");
    assert_eq!(out["status"], "dry_run");
    assert_eq!(out["relay"], "primary");
    assert_eq!(out["envelope"]["recipients"], json!(["rcpt@example.org"]));
    assert_eq!(out["envelope"]["from"], "sender@example.org");
    assert!(out["preview"]["total_bytes"].as_u64().unwrap() > 0);
    assert_eq!(out["preview"]["text"], "text");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(smtp.messages().is_empty());
}

#[tokio::test]
async fn invalid_input_is_a_tool_error_naming_the_field() {
    let smtp = Aiosmtpd::start();
    let h = harness(&smtp).await;
    let (is_error, out, text) = call(
        &h,
        "send_email",
        json!({"to": ["ok@example.org", "not an address"], "subject": "x", "body": "y"}),
    )
    .await;
    assert!(is_error);
    assert_eq!(out["status"], "failed");
    assert_eq!(out["error"]["code"], "invalid_input");
    assert!(
        out["error"]["field"].as_str().unwrap().starts_with("to"),
        "{out}"
    );
    assert!(out["error"]["rule"].is_string());
    assert!(!text.is_empty());

    // Header injection in the subject.
    let (is_error, out, _) = call(
        &h,
        "send_email",
        json!({"to": "a@example.org", "subject": "x\r\nBcc: victim@example.org", "body": "y"}),
    )
    .await;
    assert!(is_error);
    assert_eq!(out["error"]["code"], "invalid_input");
    assert_eq!(out["error"]["field"], "subject");

    // Arguments of the wrong shape are a tool error too, not a protocol fault.
    let (is_error, out, _) = call(&h, "send_email", json!({"to": 5})).await;
    assert!(is_error);
    assert_eq!(out["error"]["code"], "invalid_input");
    assert_eq!(out["error"]["field"], "to");

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(smtp.messages().is_empty());
}

#[tokio::test]
async fn unknown_relay_lists_the_valid_ones() {
    let smtp = Aiosmtpd::start();
    let h = harness(&smtp).await;
    let (is_error, out, text) = call(
        &h,
        "send_email",
        json!({"to": "a@example.org", "subject": "x", "body": "y", "relay": "nope"}),
    )
    .await;
    assert!(is_error);
    assert_eq!(out["error"]["code"], "unknown_relay");
    assert_eq!(out["error"]["valid"], json!(["primary", "backup"]));
    assert!(text.contains("primary") && text.contains("backup"));
    assert!(smtp.messages().is_empty());
}

#[tokio::test]
async fn a_dead_preferred_relay_fails_over() {
    let smtp = Aiosmtpd::start();
    let h = harness(&smtp).await;
    // Only the dead relay: pin it and let the router try it alone.
    let (_, out, _) = call(
        &h,
        "send_email",
        json!({"to": "a@example.org", "subject": "x", "body": "y", "relay": "backup"}),
    )
    .await;
    // "backup" is down, so the router fails over to "primary".
    assert_eq!(out["status"], "sent", "{out}");
    assert_eq!(out["relay"], "primary");
    let attempts = out["attempts"].as_array().unwrap();
    assert_eq!(attempts[0]["relay"], "backup");
    assert_eq!(attempts[0]["class"], "relay_fault");
    assert!(!out.to_string().contains("hunter2"));
}

#[tokio::test]
async fn a_send_no_relay_takes_is_queued_for_a_retry_with_its_attempts() {
    let dead = free_port();
    let h = InProcess::start(config(vec![relay("only", dead, 1)]), Sources::default()).await;
    let (is_error, out, text) = call(
        &h,
        "send_email",
        json!({"to": "a@example.org", "subject": "x", "body": "y"}),
    )
    .await;
    // Every relay failed transiently: not a failure, a deferral.
    assert!(!is_error, "{out}");
    assert_eq!(out["status"], "queued", "{out}");
    assert!(out["next_attempt_at"].is_string(), "{out}");
    assert_eq!(out["attempts"][0]["class"], "relay_fault");
    assert_eq!(out["attempts"][0]["relay"], "only");
    assert!(out["message_id"].is_string());
    assert!(text.starts_with("queued "), "{text}");
}

#[tokio::test]
async fn switch_pins_unpins_and_rejects_unknown_names() {
    let smtp = Aiosmtpd::start();
    let h = harness(&smtp).await;
    let (is_error, out, _) = call(&h, "switch_smtp_server", json!({})).await;
    assert!(!is_error);
    assert!(out.get("pinned").is_none());
    assert_eq!(out["next"], "primary");
    assert_eq!(out["strategy"], "priority");
    assert_eq!(out["relays"], json!(["primary", "backup"]));

    let (is_error, out, _) = call(&h, "switch_smtp_server", json!({"server_name": "backup"})).await;
    assert!(!is_error, "{out}");
    assert_eq!(out["pinned"], "backup");

    let (_, status, _) = call(&h, "get_smtp_status", json!({})).await;
    assert_eq!(status["pinned"], "backup");

    let (is_error, out, _) = call(&h, "switch_smtp_server", json!({"server_name": "auto"})).await;
    assert!(!is_error);
    assert!(out.get("pinned").is_none());

    let (is_error, out, text) =
        call(&h, "switch_smtp_server", json!({"server_name": "nope"})).await;
    assert!(is_error);
    assert_eq!(out["error"]["code"], "unknown_relay");
    assert_eq!(out["error"]["valid"], json!(["primary", "backup"]));
    assert!(text.contains("primary"));
}

#[tokio::test]
async fn status_shows_every_relay_and_no_secret() {
    let smtp = Aiosmtpd::start();
    let h = harness(&smtp).await;
    let (is_error, out, _) = call(&h, "get_smtp_status", json!({})).await;
    assert!(!is_error);
    assert_eq!(out["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(out["strategy"], "priority");
    assert_eq!(out["default_relay"], false);
    assert!(out.get("warning").is_none());
    assert_eq!(out["config_sources"], json!(["test"]));
    assert!(out["uptime_secs"].is_u64());
    // The current-thread test runtime: one live task at least (the session's).
    assert_eq!(out["runtime"]["workers"], 1, "{out}");
    assert!(
        out["runtime"]["alive_tasks"].as_u64().unwrap() >= 1,
        "{out}"
    );
    let relays = out["relays"].as_array().unwrap();
    assert_eq!(relays.len(), 2);
    let primary = relays.iter().find(|r| r["name"] == "primary").unwrap();
    for field in [
        "kind",
        "host",
        "port",
        "tls",
        "priority",
        "weight",
        "state",
        "consecutive_failures",
        "relapses",
        "in_flight",
        "connections",
        "counters",
        "latency",
        "restarts",
    ] {
        assert!(
            primary.get(field).is_some(),
            "status lacks {field}: {primary}"
        );
    }
    assert_eq!(primary["kind"], "smtp");
    assert_eq!(primary["port"], smtp.port);
    assert_eq!(primary["tls"], "none");
    assert!(primary["latency"]["p99_ms"].is_u64());
    assert!(!out.to_string().contains("hunter2"));
}

#[tokio::test]
async fn test_connection_probes_all_or_one() {
    let smtp = Aiosmtpd::start();
    let h = harness(&smtp).await;
    let (is_error, out, _) = call(&h, "test_smtp_connection", json!({})).await;
    assert!(!is_error);
    assert_eq!(out["ok"], false);
    let relays = out["relays"].as_array().unwrap();
    let primary = relays.iter().find(|r| r["relay"] == "primary").unwrap();
    assert_eq!(primary["reachable"], true);
    assert!(primary.get("error_class").is_none());
    // `python3 -m aiosmtpd` without `-s` announces neither SIZE nor
    // PIPELINING.
    assert!(primary.get("size_limit").is_none(), "{primary}");
    assert_eq!(primary["pipelining"], false, "{primary}");
    let backup = relays.iter().find(|r| r["relay"] == "backup").unwrap();
    assert_eq!(backup["reachable"], false);
    assert_eq!(backup["error_class"], "relay_fault");
    assert!(!out.to_string().contains("hunter2"));

    let (is_error, out, _) = call(
        &h,
        "test_smtp_connection",
        json!({"server_name": "primary"}),
    )
    .await;
    assert!(!is_error);
    assert_eq!(out["ok"], true);
    assert_eq!(out["relays"].as_array().unwrap().len(), 1);

    let (is_error, out, _) = call(&h, "test_smtp_connection", json!({"server_name": "nope"})).await;
    assert!(is_error);
    assert_eq!(out["error"]["code"], "unknown_relay");
}

#[tokio::test]
async fn reconnect_reports_each_relay_state() {
    let smtp = Aiosmtpd::start();
    let h = harness(&smtp).await;
    let (is_error, out, _) = call(&h, "reconnect_smtp_servers", json!({})).await;
    assert!(!is_error, "{out}");
    let relays = out["relays"].as_array().unwrap();
    assert_eq!(relays.len(), 2);
    let primary = relays.iter().find(|r| r["name"] == "primary").unwrap();
    assert_eq!(primary["state"], "healthy");
    let backup = relays.iter().find(|r| r["name"] == "backup").unwrap();
    assert_ne!(backup["state"], "healthy");
}

#[tokio::test]
async fn reload_with_an_invalid_file_keeps_the_running_configuration() {
    let smtp = Aiosmtpd::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mailmux.toml");
    std::fs::write(&file, "this is = = not valid [toml\n").unwrap();
    let cfg = config(vec![relay("primary", smtp.port, 100)]);
    let h = InProcess::start(cfg, Sources { file: Some(file) }).await;
    let (is_error, out, text) = call(&h, "reload_smtp_configuration", json!({})).await;
    assert!(is_error, "{out}");
    assert_eq!(out["error"]["code"], "invalid_config");
    assert_eq!(out["reloaded"], false);
    assert!(text.contains("unchanged"), "{text}");
    let (_, status, _) = call(&h, "get_smtp_status", json!({})).await;
    assert_eq!(status["relays"][0]["name"], "primary");
    assert_eq!(status["config_sources"], json!(["test"]));
    // And sending still works on the running configuration.
    let (is_error, out, _) = call(
        &h,
        "send_email",
        json!({"to": "a@example.org", "subject": "x", "body": "y"}),
    )
    .await;
    assert!(!is_error, "{out}");
    assert_eq!(smtp.wait_messages(1).len(), 1);
}

#[tokio::test]
async fn reload_applies_the_new_configuration_as_a_diff() {
    let smtp = Aiosmtpd::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mailmux.toml");
    // An empty file is valid and configures no relay: the embedded file relay
    // replaces ours.
    std::fs::write(&file, "").unwrap();
    let cfg = config(vec![relay("primary", smtp.port, 100)]);
    let h = InProcess::start(cfg, Sources { file: Some(file) }).await;
    let (is_error, out, _) = call(&h, "reload_smtp_configuration", json!({})).await;
    assert!(!is_error, "{out}");
    assert_eq!(out["reloaded"], true);
    assert_eq!(out["removed"], json!(["primary"]));
    assert_eq!(out["added"].as_array().unwrap().len(), 1);
    let (_, status, _) = call(&h, "get_smtp_status", json!({})).await;
    assert_eq!(status["default_relay"], true);
    assert!(
        status["warning"]
            .as_str()
            .unwrap()
            .contains("nothing is delivered")
    );
    assert_eq!(status["relays"][0]["kind"], "file");
}

/// What a reload cannot apply (read once at start: here the queue's retry
/// schedule) is named in its answer, at every reload until a restart, and
/// the rest is applied.
#[tokio::test]
async fn a_reload_names_what_only_a_restart_applies() {
    let smtp = Aiosmtpd::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mailmux.toml");
    let cfg = config(vec![relay("primary", smtp.port, 100)]);
    // The harness's configuration, as a file, but for the keys each case adds.
    let write = |top: &str, queue: &str| {
        std::fs::write(
            &file,
            format!(
                "send_deadline = \"15s\"\n{top}\n[queue]\nstore = \"memory\"\n{queue}\n\
                 [http]\nbind = \"127.0.0.1:0\"\n\
                 body_limit = 4194304\n[[relays]]\nname = \"primary\"\nhost = \"127.0.0.1\"\n\
                 port = {}\ntls = \"none\"\n",
                smtp.port
            ),
        )
        .unwrap()
    };
    let h = InProcess::start(
        cfg,
        Sources {
            file: Some(file.clone()),
        },
    )
    .await;
    write("", "");
    let (is_error, out, text) = call(&h, "reload_smtp_configuration", json!({})).await;
    assert!(!is_error, "{out}");
    assert!(out.get("restart_needed").is_none(), "{out}");
    assert!(!text.contains("restart"), "{text}");

    write("max_batch = 10", "retry_base = \"7s\"");
    for _ in 0..2 {
        let (is_error, out, text) = call(&h, "reload_smtp_configuration", json!({})).await;
        assert!(!is_error, "{out}");
        assert_eq!(out["reloaded"], true, "{out}");
        assert_eq!(out["restart_needed"], json!(["queue.retry_base"]), "{out}");
        assert!(
            text.contains("not applied until the next restart: queue.retry_base"),
            "{text}"
        );
    }
    // The rest is in force: a batch over the new max_batch is refused.
    let messages: Vec<Value> = (0..11)
        .map(|i| json!({"to": format!("r{i}@example.org")}))
        .collect();
    let (is_error, out, _) = call(
        &h,
        "send_batch",
        json!({"defaults": {"subject": "s", "body": "b"}, "messages": messages, "dry_run": true}),
    )
    .await;
    assert!(is_error, "{out}");
    assert_eq!(out["error"]["field"], "messages", "{out}");
}

#[tokio::test]
async fn calls_after_shutdown_began_are_refused() {
    let smtp = Aiosmtpd::start();
    let h = harness(&smtp).await;
    h.server.begin_shutdown();
    for tool in [
        "send_email",
        "get_smtp_status",
        "switch_smtp_server",
        "reconnect_smtp_servers",
    ] {
        let args = if tool == "send_email" {
            json!({"to": "a@example.org", "subject": "x", "body": "y"})
        } else {
            json!({})
        };
        let (is_error, out, _) = call(&h, tool, args).await;
        assert!(is_error, "{tool}");
        assert_eq!(out["error"]["code"], "unavailable", "{tool}");
    }
    assert!(smtp.messages().is_empty());
}

/// With `max_concurrent_calls` taken, the stream transport reads no further
/// request: the next call waits in the pipe and reaches no server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_past_the_bound_wait_unread() {
    use std::sync::Arc;
    use support::fault_smtp::{Action, FaultSmtp, Phase, Script, Share};
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
    let h = Arc::new(InProcess::start(cfg, Sources::default()).await);
    let send = |subject: &'static str| {
        let h = h.clone();
        tokio::spawn(async move {
            call(
                &h,
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
        .await
    );
    let second = send("second");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(smtp.commands(Phase::Mail), 1, "the second call waited");
    assert_eq!(
        backup_smtp.commands(Phase::Mail),
        0,
        "the second call waited"
    );
    let (_, one, _) = first.await.unwrap();
    assert_eq!(one["status"], "unknown", "{one}");
    let (is_error, two, _) = second.await.unwrap();
    assert!(!is_error, "{two}");
    assert_eq!(two["status"], "sent");
    assert_eq!(smtp.delivered().len() + backup_smtp.delivered().len(), 1);
}

/// A daemon over one relay at `smtp`, served over an in-memory pipe; the
/// client's end of the pipe.
async fn serve_in_memory(smtp: &Aiosmtpd) -> tokio::io::DuplexStream {
    serve_on(server_for(smtp).await)
}

async fn server_for(smtp: &Aiosmtpd) -> mailmux::mcp::MailmuxServer {
    let cfg = config(vec![relay("primary", smtp.port, 1)]);
    let queue = mailmux::mcp::start_queue(&cfg).await.unwrap();
    mailmux::mcp::MailmuxServer::new(queue, cfg, Sources::default()).await
}

/// One client's connection to `server`, as a stdio client has its own.
fn serve_on(server: mailmux::mcp::MailmuxServer) -> tokio::io::DuplexStream {
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let (r, w) = tokio::io::split(server_io);
    tokio::spawn(mailmux::mcp::transport::serve_io(
        server,
        r,
        w,
        std::future::pending(),
    ));
    client_io
}

/// A message's resource as read: its text and that text as JSON.
async fn read_message(peer: &rmcp::service::Peer<rmcp::RoleClient>, uri: &str) -> (String, Value) {
    use rmcp::model::{ReadResourceRequestParams, ResourceContents};
    let read = peer
        .read_resource(ReadResourceRequestParams::new(uri.to_owned()))
        .await
        .unwrap();
    let ResourceContents::TextResourceContents { text, .. } = &read.contents[0] else {
        panic!("not text: {read:?}");
    };
    (text.clone(), serde_json::from_str(text).unwrap())
}

/// Each message is the resource `mailmux://messages/{id}`: a template, a
/// listing, a read that matches `get_message_status` without the body, and
/// `notifications/resources/updated` on each state change for a subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_resources_with_updates_for_subscribers() {
    use rmcp::ServiceExt;
    use rmcp::model::{ReadResourceRequestParams, SubscribeRequestParams};

    let smtp = Aiosmtpd::start();
    let client_io = serve_in_memory(&smtp).await;
    let recorder = common::Updates::default();
    let client = recorder.clone().serve(client_io).await.unwrap();
    let caps = client.peer_info().unwrap().capabilities.resources.clone();
    assert!(caps.is_some_and(|r| r.subscribe == Some(true)));

    let templates = client.list_all_resource_templates().await.unwrap();
    assert_eq!(templates[0].uri_template, "mailmux://messages/{message_id}");

    // A message due in 1 s: subscribe while it is scheduled.
    let mut params = CallToolRequestParams::new("send_email");
    params = params.with_arguments(
        json!({"to": "a@example.org", "subject": "watched", "body": "SECRET-BODY-TEXT",
               "send_at": "1s"})
        .as_object()
        .unwrap()
        .clone(),
    );
    let sent = client.call_tool(params).await.unwrap();
    let out = sent.structured_content.unwrap();
    assert_eq!(out["status"], "scheduled", "{out}");
    let id = out["message_id"].as_str().unwrap().to_string();
    let uri = format!("mailmux://messages/{id}");
    // resources/subscribe, as clients that negotiate 2025-06-18 send it.
    #[allow(deprecated)]
    client
        .subscribe(SubscribeRequestParams::new(uri.clone()))
        .await
        .unwrap();
    let listed = client.list_all_resources().await.unwrap();
    assert!(listed.iter().any(|r| r.uri == uri), "{listed:?}");

    // Sending, then sent: at least two updates, each naming the message.
    let notified = support::wait_until(
        || recorder.0.lock().unwrap().len() >= 2,
        Duration::from_secs(10),
    )
    .await;
    assert!(notified, "updates: {:?}", recorder.0.lock().unwrap());
    assert!(recorder.0.lock().unwrap().iter().all(|u| *u == uri));
    let (text, v) = read_message(&client, &uri).await;
    assert_eq!(v["status"], "sent", "{v}");
    assert_eq!(v["message_id"], id.as_str());
    assert!(
        !text.contains("SECRET-BODY-TEXT"),
        "the body leaked: {text}"
    );
    assert_eq!(smtp.wait_messages(1).len(), 1);

    let missing = client
        .read_resource(ReadResourceRequestParams::new("mailmux://messages/nope"))
        .await;
    assert!(missing.is_err());
}

/// A server relaying to its own aiosmtpd, and a client of it that records
/// the resource updates it is sent.
async fn subscriber() -> (
    Aiosmtpd,
    mailmux::mcp::MailmuxServer,
    common::Updates,
    rmcp::service::RunningService<rmcp::RoleClient, common::Updates>,
) {
    use rmcp::ServiceExt;
    let smtp = Aiosmtpd::start();
    let server = server_for(&smtp).await;
    let recorder = common::Updates::default();
    let client = recorder
        .clone()
        .serve(serve_on(server.clone()))
        .await
        .unwrap();
    (smtp, server, recorder, client)
}

/// The structured answer of one tool call.
async fn answer(
    client: &rmcp::service::Peer<rmcp::RoleClient>,
    tool: &'static str,
    args: Value,
) -> Value {
    let params = CallToolRequestParams::new(tool).with_arguments(args.as_object().unwrap().clone());
    client
        .call_tool(params)
        .await
        .unwrap()
        .structured_content
        .unwrap()
}

/// The ids of `n` messages scheduled an hour ahead, sent by `client` in
/// batches of at most 1,000.
async fn scheduled(client: &rmcp::service::Peer<rmcp::RoleClient>, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    while ids.len() < n {
        let messages: Vec<Value> = (0..(n - ids.len()).min(1000))
            .map(|i| json!({"to": [format!("r{i}@example.org")]}))
            .collect();
        let args = json!({"defaults": {"subject": "later", "body": "x"}, "messages": messages,
                          "send_at": "1h", "wait": false});
        let out = answer(client, "send_batch", args).await;
        for r in out["results"].as_array().unwrap() {
            assert_eq!(r["status"], "scheduled", "{r}");
            ids.push(r["message_id"].as_str().unwrap().to_owned());
        }
    }
    ids
}

/// A caller watches at most `MAX_WATCHED` messages at once: past that,
/// `resources/subscribe` is refused with the reason. A subscription ends
/// when its message reaches a final state, and a closed connection's
/// subscriptions give their places up when the caller needs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(deprecated)] // resources/subscribe, as clients of 2025-06-18 send it
async fn subscriptions_are_bounded_and_end_with_their_message() {
    use mailmux::mcp::resources::MAX_WATCHED;
    use rmcp::ServiceExt;
    use rmcp::model::SubscribeRequestParams;

    let (smtp, server, recorder, client) = subscriber().await;
    let ids = scheduled(&client, MAX_WATCHED + 2).await;
    let uri = |id: &str| format!("mailmux://messages/{id}");
    let subscribe = |id: &str| client.subscribe(SubscribeRequestParams::new(uri(id)));
    for id in &ids[..MAX_WATCHED] {
        subscribe(id).await.unwrap();
    }
    // Again for one already watched: no new place taken.
    subscribe(&ids[0]).await.unwrap();
    let refused = subscribe(&ids[MAX_WATCHED]).await.unwrap_err();
    assert!(
        refused
            .to_string()
            .contains(&format!("{MAX_WATCHED} messages")),
        "{refused}"
    );

    // A cancelled message is final: its update is the last, and its place
    // is free again.
    let params = CallToolRequestParams::new("cancel_message")
        .with_arguments(json!({"message_id": ids[0]}).as_object().unwrap().clone());
    let cancelled = client.call_tool(params).await.unwrap();
    assert_ne!(cancelled.is_error, Some(true), "{cancelled:?}");
    let told = support::wait_until(
        || recorder.0.lock().unwrap().contains(&uri(&ids[0])),
        Duration::from_secs(10),
    )
    .await;
    assert!(told, "no update for the cancelled message");
    subscribe(&ids[MAX_WATCHED]).await.unwrap();
    assert!(subscribe(&ids[1]).await.is_ok(), "one already watched");
    // The bound is full again, but a final message takes no place.
    assert!(subscribe(&ids[0]).await.is_ok(), "a final message");

    // The client goes; once the daemon has seen its connection close, the
    // next one's subscription takes a place of its.
    client.cancel().await.unwrap();
    let next = ().serve(serve_on(server)).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Err(e) = next
        .subscribe(SubscribeRequestParams::new(uri(&ids[MAX_WATCHED + 1])))
        .await
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the closed connection kept its places: {e}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(smtp.messages().is_empty());
}

/// A `resources/subscribe` subscription to a message a relay took goes on
/// after `sent`: a bounce report noted on it is one more update. At the
/// bound such subscriptions give their places up, oldest first, before a
/// new one is refused; one given up hears no more reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(deprecated)] // resources/subscribe, as clients of 2025-06-18 send it
async fn a_subscription_hears_reports_after_sent_and_gives_its_place_up_first() {
    use mailmux::mcp::resources::MAX_WATCHED;
    use mailmux_actors::queue::ReportRecord;
    use rmcp::model::SubscribeRequestParams;

    let (smtp, server, recorder, client) = subscriber().await;
    let uri = |id: &str| format!("mailmux://messages/{id}");
    let updates = |id: &str| {
        let uri = uri(id);
        recorder
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|u| **u == uri)
            .count()
    };
    let subscribe = |id: &str| client.subscribe(SubscribeRequestParams::new(uri(id)));
    let queue = server.queue();
    let report = |reason: &str, address: &str| ReportRecord {
        at: mailmux_actors::queue::now_millis(),
        reason: reason.into(),
        address: address.into(),
        detail: "5.1.1 no such user".into(),
    };

    // Two messages sent (the call waits), each subscribed to after.
    let mut sent = Vec::new();
    for to in ["a@example.org", "b@example.org"] {
        let args = json!({"to": to, "subject": "s", "body": "x"});
        let out = answer(&client, "send_email", args).await;
        assert_eq!(out["status"], "sent", "{out}");
        let id = out["message_id"].as_str().unwrap().to_owned();
        subscribe(&id).await.unwrap();
        sent.push(id);
    }
    let (a, b) = (&sent[0], &sent[1]);
    let record_a = queue.status(a).await.unwrap().unwrap();
    let record_b = queue.status(b).await.unwrap().unwrap();
    queue
        .note_reports(&record_a, vec![report("bounced", "a@example.org")])
        .await
        .unwrap();
    let told = support::wait_until(|| updates(a) == 1, Duration::from_secs(10)).await;
    assert!(told, "no update for the report on a sent message");

    // The bound filled with messages that wait: the subscription to `a`,
    // the oldest to a sent message, gives its place up first, then `b`'s;
    // then one more is refused.
    let waiting = scheduled(&client, MAX_WATCHED + 1).await;
    for id in &waiting[..MAX_WATCHED - 2] {
        subscribe(id).await.unwrap();
    }
    subscribe(&waiting[MAX_WATCHED - 2]).await.unwrap();
    queue
        .note_reports(&record_a, vec![report("complained", "a@example.org")])
        .await
        .unwrap();
    queue
        .note_reports(&record_b, vec![report("bounced", "b@example.org")])
        .await
        .unwrap();
    let told = support::wait_until(|| updates(b) == 1, Duration::from_secs(10)).await;
    assert!(told, "no update for the report on the one still subscribed");
    assert_eq!(
        updates(a),
        1,
        "a subscription given up still heard a report"
    );
    subscribe(&waiting[MAX_WATCHED - 1]).await.unwrap();
    let refused = subscribe(&waiting[MAX_WATCHED]).await.unwrap_err();
    assert!(
        refused
            .to_string()
            .contains(&format!("{MAX_WATCHED} messages")),
        "{refused}"
    );
    assert_eq!(smtp.messages().len(), 2);
}

/// `subscriptions/listen` (protocol 2026-07-28): the stream carries a
/// resource update for each state change of the message it names, and for
/// a report (a bounce) noted on it once it was sent; none for a URI that
/// is not a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_stream_carries_the_updates_of_its_messages() {
    use mailmux_actors::queue::ReportRecord;
    use rmcp::model::{ProtocolVersion, ServerNotification, SubscriptionFilter};
    use rmcp::service::{ClientLifecycleMode, ClientServiceExt};

    let smtp = Aiosmtpd::start();
    let server = server_for(&smtp).await;
    let client_io = serve_on(server.clone());
    // A client of protocol 2026-07-28: `server/discover`, no `initialize`.
    let modern = ClientLifecycleMode::Discover {
        preferred_versions: vec![ProtocolVersion::V_2026_07_28],
    };
    let client = ().serve_with_lifecycle(client_io, modern).await.unwrap();

    let send = |subject: &str| {
        let mut params = CallToolRequestParams::new("send_email");
        params = params.with_arguments(
            json!({"to": "a@example.org", "subject": subject, "body": "x", "send_at": "1s"})
                .as_object()
                .unwrap()
                .clone(),
        );
        client.call_tool(params)
    };
    let watched = send("watched").await.unwrap().structured_content.unwrap();
    assert_eq!(watched["status"], "scheduled", "{watched}");
    let other = send("other").await.unwrap().structured_content.unwrap();
    let uri = format!(
        "mailmux://messages/{}",
        watched["message_id"].as_str().unwrap()
    );
    let other_uri = format!(
        "mailmux://messages/{}",
        other["message_id"].as_str().unwrap()
    );

    let mut sub = client
        .listen(
            SubscriptionFilter::builder()
                .resource_subscriptions(vec![uri.clone(), "file:///etc/passwd".into()])
                .build(),
        )
        .await
        .unwrap();
    assert_eq!(
        sub.acknowledged().resource_subscriptions,
        Some(vec![uri.clone()]),
        "only message resources are accepted"
    );
    // Sending, then sent: two updates, each for the watched message only.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let next = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("an update within 10 s")
            .unwrap();
        match next {
            Some(ServerNotification::ResourceUpdatedNotification(n)) => seen.push(n.params.uri),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(seen.iter().all(|u| *u == uri), "{seen:?}");
    assert!(!seen.contains(&other_uri));
    assert_eq!(smtp.wait_messages(2).len(), 2);

    // A bounce comes back for the sent message, as the reader of
    // [relays.bounces] notes one: one more update, and the resource has it.
    let id = watched["message_id"].as_str().unwrap();
    let queue = server.queue();
    let record = queue.status(id).await.unwrap().unwrap();
    let report = ReportRecord {
        at: mailmux_actors::queue::now_millis(),
        reason: "bounced".into(),
        address: "a@example.org".into(),
        detail: "5.1.1 no such user".into(),
    };
    queue.note_reports(&record, vec![report]).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("the report's update within 10 s")
        .unwrap();
    match next {
        Some(ServerNotification::ResourceUpdatedNotification(n)) => assert_eq!(n.params.uri, uri),
        other => panic!("unexpected {other:?}"),
    }
    let (text, v) = read_message(&client, &uri).await;
    assert_eq!(v["status"], "sent", "{v}");
    assert!(text.contains("bounced"), "{v}");
    sub.cancel().await.unwrap();

    // A stream watches as many messages as a caller may, no more: the
    // acknowledgment names those it took.
    let max = mailmux::mcp::resources::MAX_WATCHED;
    let many: Vec<String> = (0..=max)
        .map(|i| format!("mailmux://messages/m{i}@mailmux.localhost"))
        .collect();
    let mut sub = client
        .listen(
            SubscriptionFilter::builder()
                .resource_subscriptions(many.clone())
                .build(),
        )
        .await
        .unwrap();
    assert_eq!(
        sub.acknowledged().resource_subscriptions.as_deref(),
        Some(&many[..max])
    );
    sub.cancel().await.unwrap();
}

/// Every `format` value anywhere in a schema.
fn collect_formats(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            if let Some(Value::String(f)) = o.get("format") {
                out.push(f.clone());
            }
            o.values().for_each(|x| collect_formats(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| collect_formats(x, out)),
        _ => {}
    }
}
