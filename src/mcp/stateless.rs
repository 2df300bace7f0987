//! A stateless HTTP request that calls `send_email`, served without rmcp's
//! service for it.
//!
//! For each stateless request rmcp builds a service, a transport, a
//! channel and a task, and reads the body through its untagged message
//! types: about a third of the daemon's work for a `send_email` call over
//! HTTP. [`serve`] answers the usual such request itself, as rmcp would:
//! the body read as the stdio framing reads a call ([`Call`]), the tool
//! called with the request's head in its extensions (the caller, the
//! session), and the result or error as one JSON body.
//!
//! It takes only requests whose answer from rmcp is known to be that: a
//! POST to `/mcp` that accepts both JSON and SSE (a plain `Accept` list, no
//! parameters), whose content type is JSON, and whose body is a
//! `tools/call` of `send_email`, of one of two kinds:
//! - protocol 2026-07-28 or later, in either mode (rmcp serves that version
//!   without sessions): `MCP-Protocol-Version` names it, the standard
//!   headers `Mcp-Method: tools/call` and `Mcp-Name: send_email` are there
//!   once each with no `Mcp-Param-*`, and `_meta` holds the same version,
//!   the client's capabilities and at most its identity and a progress
//!   token. The result keeps its `resultType`, and an error answered with
//!   a status of its own in rmcp (a bad version or header: 400) gets it;
//! - an earlier protocol, in a daemon without sessions: `MCP-Protocol-
//!   Version` absent or a known version before 2026-07-28, nothing in
//!   `_meta` but a progress token. The result is in the shape of those
//!   versions (no `resultType`), every answer 200.
//!
//! Everything else (another tool or method, a session's request, anything
//! more in `_meta` or the headers) goes to rmcp unchanged.
//!
//! The call runs in a task of its own, as rmcp runs a handler: a client
//! that hangs up does not stop a send it started. At shutdown a call still
//! waiting is answered 503, as rmcp ends its requests then.

use axum::body::Bytes;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rmcp::RoleServer;
use rmcp::model::{
    ClientCapabilities, ErrorCode, Extensions, JsonRpcMessage, ProtocolVersion, RequestMetaObject,
    ServerResult,
};
use rmcp::service::TxJsonRpcMessage;
use tokio_util::sync::CancellationToken;

use super::MailmuxServer;
use super::lines::Call;

/// A `send_email` call [`serve`] may answer.
#[derive(Debug)]
pub struct Taken {
    pub call: Call,
    /// Protocol 2026-07-28 or later.
    pub modern: bool,
    /// The client declared the tasks extension in the request's `_meta`.
    pub tasks: bool,
    /// The client declared form elicitation in the request's `_meta`: a
    /// held message's approval form goes in the result.
    pub forms: bool,
}

/// The `send_email` call in `body`, when [`serve`] may answer it. A daemon
/// with sessions (`stateful`) leaves requests of earlier protocols to rmcp.
pub fn call(headers: &HeaderMap, body: &[u8], stateful: bool) -> Option<Taken> {
    if !plain(headers) {
        return None;
    }
    let mut versions = headers.get_all("mcp-protocol-version").iter();
    let version = match (versions.next(), versions.next()) {
        (None, _) => None,
        (Some(v), None) => Some(known(v)?),
        (Some(_), Some(_)) => return None,
    };
    let mut call = Call::read(body)?;
    if call.name != "send_email" {
        return None;
    }
    match version {
        Some(v) if v >= ProtocolVersion::STANDARD_HEADERS.as_str() => {
            let capabilities = modern(headers, &mut call, v)?;
            Some(Taken {
                call,
                modern: true,
                tasks: capabilities.supports_tasks(),
                forms: super::approval::elicits_forms(&capabilities),
            })
        }
        _ => {
            let meta_plain = call
                .meta
                .as_ref()
                .is_none_or(|m| m.keys().all(|k| k == PROGRESS_TOKEN));
            (!stateful && meta_plain).then_some(Taken {
                call,
                modern: false,
                tasks: false,
                forms: false,
            })
        }
    }
}

const PROGRESS_TOKEN: &str = "progressToken";
const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
const META_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
const META_CLIENT: &str = "io.modelcontextprotocol/clientInfo";

/// Whether the request's head is one rmcp takes with no check that could
/// refuse it: it accepts JSON and SSE, and sends JSON.
fn plain(headers: &HeaderMap) -> bool {
    let (mut json, mut sse) = (false, false);
    for value in headers.get_all(header::ACCEPT) {
        let Ok(value) = value.to_str() else {
            return false;
        };
        for entry in value.split(',') {
            let entry = entry.trim();
            if entry.contains([';', '"']) {
                return false;
            }
            json |= entry.eq_ignore_ascii_case("application/json");
            sse |= entry.eq_ignore_ascii_case("text/event-stream");
        }
    }
    json && sse && super::http::is_json(headers)
}

/// The version `value` names, when rmcp knows it.
fn known(value: &HeaderValue) -> Option<&str> {
    let v = value.to_str().ok()?;
    ProtocolVersion::KNOWN_VERSIONS
        .iter()
        .any(|k| k.as_str() == v)
        .then_some(v)
}

/// For a request of `version` (2026-07-28 or later): whether rmcp would
/// call the tool with no check refusing it, and then the capabilities the
/// client declared. rmcp asks that the standard headers match the body and
/// that `_meta` name the same version and the client's capabilities. A
/// request that carries a session id is left to rmcp, as `http::limit`
/// counts it against that session.
fn modern(headers: &HeaderMap, call: &mut Call, version: &str) -> Option<ClientCapabilities> {
    let one = |name: &str, value: &str| {
        let mut all = headers.get_all(name).iter();
        all.next().is_some_and(|v| v == value) && all.next().is_none()
    };
    let other_headers = headers.contains_key("mcp-session-id")
        || headers.keys().any(|k| k.as_str().starts_with("mcp-param-"));
    if !one("mcp-method", "tools/call") || !one("mcp-name", "send_email") || other_headers {
        return None;
    }
    let meta = RequestMetaObject::from(call.meta.take()?);
    let keys_plain = meta.keys().all(|k| {
        [PROGRESS_TOKEN, META_VERSION, META_CAPABILITIES, META_CLIENT].contains(&k.as_str())
    });
    let client_plain = !meta.contains_key(META_CLIENT) || meta.client_info().is_some();
    let same_version = meta
        .protocol_version()
        .is_some_and(|v| v.as_str() == version);
    let capabilities = meta.client_capabilities()?;
    call.meta = Some(meta.0.0);
    (keys_plain && client_plain && same_version).then_some(capabilities)
}

/// Calls `send_email` and answers as rmcp answers a stateless request with
/// JSON responses.
pub async fn serve(
    server: &MailmuxServer,
    parts: Parts,
    taken: Taken,
    closing: &CancellationToken,
) -> Response {
    let Taken {
        call: Call { id, arguments, .. },
        modern,
        tasks,
        forms,
    } = taken;
    tracing::debug!(%id, modern, "a stateless send_email call, answered without rmcp's service");
    let mut extensions = Extensions::new();
    extensions.insert(parts);
    let task = {
        let server = server.clone();
        let id = id.clone();
        // Boxed: the call's future is several kilobytes, which the task
        // would otherwise copy as it is spawned, finished and read.
        tokio::spawn(Box::pin(async move {
            server
                .send_email_stateless(arguments, extensions, id, forms, tasks)
                .await
        }))
    };
    let result = tokio::select! {
        joined = task => joined,
        () = closing.cancelled() => {
            return super::http::refuse(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
        }
    };
    let (status, message): (StatusCode, TxJsonRpcMessage<RoleServer>) = match result {
        Ok(Ok(response)) => {
            let mut result = ServerResult::from(response);
            if modern {
                result.fill_missing_cache_hints();
            } else {
                // As rmcp answers a peer of a version before 2026-07-28.
                result.strip_result_type_for_legacy_peer();
                result.strip_non_object_output_for_legacy_peer();
            }
            (StatusCode::OK, JsonRpcMessage::response(result, id))
        }
        Ok(Err(mut error)) => {
            tracing::warn!(%id, error = %error.message, "response error");
            let status = if modern {
                // rmcp's handler and its HTTP service, at these versions.
                if error.code == ErrorCode::RESOURCE_NOT_FOUND {
                    error.code = ErrorCode::INVALID_PARAMS;
                }
                modern_status(error.code)
            } else {
                StatusCode::OK
            };
            (status, JsonRpcMessage::error(error, Some(id)))
        }
        Err(e) => {
            tracing::error!(error = %e, "a send_email call ended without an answer");
            return super::http::reject(StatusCode::INTERNAL_SERVER_ERROR, "the call failed");
        }
    };
    match serde_json::to_vec(&message) {
        Ok(body) => (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            Bytes::from(body),
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "a send_email answer could not be written");
            super::http::reject(StatusCode::INTERNAL_SERVER_ERROR, "the call failed")
        }
    }
}

/// The HTTP status rmcp gives a JSON-RPC error from a handler at protocol
/// 2026-07-28 and later (the request's `_meta` being well formed).
fn modern_status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::UNSUPPORTED_PROTOCOL_VERSION
        | ErrorCode::MISSING_REQUIRED_CLIENT_CAPABILITY
        | ErrorCode::HEADER_MISMATCH => StatusCode::BAD_REQUEST,
        ErrorCode::METHOD_NOT_FOUND => StatusCode::NOT_FOUND,
        _ => StatusCode::OK,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(
                header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        h
    }

    const ACCEPT: (&str, &str) = ("accept", "application/json, text/event-stream");
    const JSON: (&str, &str) = ("content-type", "application/json");
    const CALL: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"_meta":{"progressToken":1},"name":"send_email","arguments":{"to":"a@b.c"}}}"#;

    #[test]
    fn the_usual_call_is_taken() {
        for h in [
            headers(&[ACCEPT, JSON]),
            headers(&[ACCEPT, JSON, ("mcp-protocol-version", "2025-06-18")]),
            headers(&[ACCEPT, JSON, ("mcp-protocol-version", "2025-11-25")]),
            headers(&[
                ("accept", "text/event-stream"),
                ("accept", "APPLICATION/JSON"),
                ("content-type", "application/json; charset=utf-8"),
            ]),
            // Below the standard headers rmcp reads no Mcp-Method.
            headers(&[ACCEPT, JSON, ("mcp-method", "tools/list")]),
        ] {
            let taken = call(&h, CALL.as_bytes(), false).expect("taken");
            assert!(!taken.modern && !taken.tasks);
            // With sessions, rmcp keeps calls of these versions.
            assert!(call(&h, CALL.as_bytes(), true).is_none(), "{h:?}");
        }
        let bare =
            r#"{"jsonrpc":"2.0","id":"x","method":"tools/call","params":{"name":"send_email"}}"#;
        let c = call(&headers(&[ACCEPT, JSON]), bare.as_bytes(), false).unwrap();
        assert!(c.call.arguments.is_none() && c.call.meta.is_none());
    }

    #[test]
    fn anything_else_is_left_to_rmcp() {
        for h in [
            headers(&[JSON]),
            headers(&[("accept", "application/json"), JSON]),
            headers(&[("accept", "application/json;q=0, text/event-stream"), JSON]),
            headers(&[("accept", "*/*"), JSON]),
            headers(&[ACCEPT]),
            headers(&[ACCEPT, ("content-type", "text/plain")]),
            // 2026-07-28 without its standard headers.
            headers(&[ACCEPT, JSON, ("mcp-protocol-version", "2026-07-28")]),
            headers(&[ACCEPT, JSON, ("mcp-protocol-version", "1999-01-01")]),
            headers(&[
                ACCEPT,
                JSON,
                ("mcp-protocol-version", "2025-06-18"),
                ("mcp-protocol-version", "2025-06-18"),
            ]),
        ] {
            assert!(call(&h, CALL.as_bytes(), false).is_none(), "{h:?}");
        }
        let h = headers(&[ACCEPT, JSON]);
        for body in [
            CALL.replace("send_email", "send_batch"),
            CALL.replace("tools/call", "tools/list"),
            CALL.replace(
                r#""progressToken":1"#,
                r#""progressToken":1,"io.modelcontextprotocol/protocolVersion":"2026-07-28""#,
            ),
            CALL.replace(r#""progressToken":1"#, r#""example.org/x":1"#),
            CALL.replace(r#""name""#, r#""task":{},"name""#),
            CALL.replace(r#""id":1,"#, r#""id":1,"id":2,"#),
            format!("[{CALL}]"),
        ] {
            assert!(call(&h, body.as_bytes(), false).is_none(), "{body}");
        }
    }

    const MODERN: [(&str, &str); 5] = [
        ACCEPT,
        JSON,
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tools/call"),
        ("mcp-name", "send_email"),
    ];
    const MODERN_META: &str = r#""io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}"#;

    fn modern_call(meta: &str) -> String {
        CALL.replace(r#""progressToken":1"#, meta)
    }

    #[test]
    fn a_call_of_2026_07_28_is_taken_in_either_mode() {
        let h = headers(&MODERN);
        for meta in [
            MODERN_META.to_owned(),
            format!(r#""progressToken":"p",{MODERN_META}"#),
            format!(
                r#"{MODERN_META},"io.modelcontextprotocol/clientInfo":{{"name":"c","version":"1"}}"#
            ),
            // Elicitation is declared, but at this version rmcp lets no
            // handler ask the client: nobody is asked either way.
            MODERN_META.replace("{}", r#"{"elicitation":{}}"#),
        ] {
            let body = modern_call(&meta);
            for stateful in [false, true] {
                let taken = call(&h, body.as_bytes(), stateful).expect(&body);
                assert!(taken.modern && !taken.tasks, "{body}");
            }
        }
        let tasks = MODERN_META.replace(
            "{}",
            r#"{"extensions":{"io.modelcontextprotocol/tasks":{}}}"#,
        );
        let taken = call(&h, modern_call(&tasks).as_bytes(), true).unwrap();
        assert!(taken.modern && taken.tasks);
    }

    #[test]
    fn a_call_of_2026_07_28_rmcp_might_refuse_is_left_to_it() {
        let body = modern_call(MODERN_META);
        let without = |name: &str| {
            let mut h = headers(&MODERN);
            h.remove(name);
            h
        };
        let with = |pair: (&str, &str)| {
            let mut h = headers(&MODERN);
            h.append(
                header::HeaderName::from_bytes(pair.0.as_bytes()).unwrap(),
                HeaderValue::from_str(pair.1).unwrap(),
            );
            h
        };
        for h in [
            without("mcp-method"),
            without("mcp-name"),
            with(("mcp-method", "tools/call")),
            with(("mcp-name", "send_email")),
            with(("mcp-param-to", "a@b.c")),
            with(("mcp-session-id", "s")),
            headers(&[
                ACCEPT,
                JSON,
                ("mcp-protocol-version", "2026-07-28"),
                ("mcp-method", "tools/list"),
                ("mcp-name", "send_email"),
            ]),
            headers(&[
                ACCEPT,
                JSON,
                ("mcp-protocol-version", "2026-07-28"),
                ("mcp-method", "tools/call"),
                // The Base64 form of the name is left to rmcp to read.
                ("mcp-name", "=?base64?c2VuZF9lbWFpbA==?="),
            ]),
        ] {
            assert!(call(&h, body.as_bytes(), false).is_none(), "{h:?}");
        }
        let h = headers(&MODERN);
        for meta in [
            r#""progressToken":1"#.to_owned(),
            MODERN_META.replace(r#","io.modelcontextprotocol/clientCapabilities":{}"#, ""),
            MODERN_META.replace(r#""2026-07-28""#, r#""2025-11-25""#),
            MODERN_META.replace(r#""2026-07-28""#, "20260728"),
            MODERN_META.replace("{}", "[]"),
            format!(r#"{MODERN_META},"io.modelcontextprotocol/clientInfo":"c""#),
            format!(r#"{MODERN_META},"io.modelcontextprotocol/logLevel":"debug""#),
            format!(r#"{MODERN_META},"example.org/x":1"#),
        ] {
            let body = modern_call(&meta);
            assert!(call(&h, body.as_bytes(), false).is_none(), "{body}");
        }
        let other_tool = body.replace(r#""name":"send_email""#, r#""name":"send_batch""#);
        assert!(call(&h, other_tool.as_bytes(), false).is_none());
    }
}
