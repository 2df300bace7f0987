//! A stateless HTTP request that calls `send_email`, served without rmcp's
//! service for it.
//!
//! For each stateless request rmcp builds a service, a transport, a
//! channel and a task, and reads the body through its untagged message
//! types: about a third of the daemon's work for a `send_email` call over
//! HTTP. [`serve`] answers the usual such request itself, as rmcp would:
//! the body read as the stdio framing reads a call ([`Call`]), the tool
//! called with the request's head in its extensions (the caller, the
//! session), and the result (in the shape of protocol versions before
//! 2026-07-28) or error as one JSON body with status 200.
//!
//! It takes only requests whose answer from rmcp is known to be that: a
//! POST to `/mcp` of a daemon without sessions, that accepts both JSON and
//! SSE (a plain `Accept` list, no parameters), whose content type is JSON,
//! whose `MCP-Protocol-Version` is absent or a known version before the
//! standard headers (2026-07-28), and whose body is a `tools/call` of
//! `send_email` with nothing in `_meta` but a progress token. Everything
//! else (another tool or method, per-request protocol metadata, client
//! capabilities, an unusual header) goes to rmcp unchanged.
//!
//! The call runs in a task of its own, as rmcp runs a handler: a client
//! that hangs up does not stop a send it started. At shutdown a call still
//! waiting is answered 503, as rmcp ends its requests then.

use axum::body::Bytes;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rmcp::RoleServer;
use rmcp::model::{Extensions, JsonRpcMessage, ProtocolVersion, ServerResult};
use rmcp::service::TxJsonRpcMessage;
use tokio_util::sync::CancellationToken;

use super::MailmuxServer;
use super::lines::Call;

/// The `send_email` call in `body`, when [`serve`] may answer it.
pub fn call(headers: &HeaderMap, body: &[u8]) -> Option<Call> {
    if !plain(headers) {
        return None;
    }
    let call = Call::read(body)?;
    let meta_plain = call
        .meta
        .as_ref()
        .is_none_or(|m| m.keys().all(|k| k == "progressToken"));
    (call.name == "send_email" && meta_plain).then_some(call)
}

/// Whether the request's head is one rmcp serves statelessly with no check
/// that could refuse it: it accepts JSON and SSE, sends JSON, and names no
/// protocol version, or a known one that asks for no standard headers.
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
    let content_json = super::http::is_json(headers);
    let mut versions = headers.get_all("mcp-protocol-version").iter();
    let version_plain = match (versions.next(), versions.next()) {
        (None, _) => true,
        (Some(v), None) => known_before_standard_headers(v),
        (Some(_), Some(_)) => false,
    };
    json && sse && content_json && version_plain
}

fn known_before_standard_headers(value: &HeaderValue) -> bool {
    let Ok(v) = value.to_str() else {
        return false;
    };
    v < ProtocolVersion::STANDARD_HEADERS.as_str()
        && ProtocolVersion::KNOWN_VERSIONS
            .iter()
            .any(|k| k.as_str() == v)
}

/// Calls `send_email` and answers as rmcp answers a stateless request with
/// JSON responses.
pub async fn serve(
    server: &MailmuxServer,
    parts: Parts,
    call: Call,
    closing: &CancellationToken,
) -> Response {
    let Call { id, arguments, .. } = call;
    tracing::debug!(%id, "a stateless send_email call, answered without rmcp's service");
    let mut extensions = Extensions::new();
    extensions.insert(parts);
    let task = {
        let server = server.clone();
        let id = id.clone();
        // Boxed: the call's future is several kilobytes, which the task
        // would otherwise copy as it is spawned, finished and read.
        tokio::spawn(Box::pin(async move {
            server.send_email_stateless(arguments, extensions, id).await
        }))
    };
    let result = tokio::select! {
        joined = task => joined,
        () = closing.cancelled() => {
            return super::http::refuse(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
        }
    };
    let message: TxJsonRpcMessage<RoleServer> = match result {
        Ok(Ok(response)) => {
            // As rmcp answers a peer of a version before 2026-07-28.
            let mut result = ServerResult::from(response);
            result.strip_result_type_for_legacy_peer();
            result.strip_non_object_output_for_legacy_peer();
            JsonRpcMessage::response(result, id)
        }
        Ok(Err(error)) => {
            tracing::warn!(%id, error = %error.message, "response error");
            JsonRpcMessage::error(error, Some(id))
        }
        Err(e) => {
            tracing::error!(error = %e, "a send_email call ended without an answer");
            return super::http::reject(StatusCode::INTERNAL_SERVER_ERROR, "the call failed");
        }
    };
    match serde_json::to_vec(&message) {
        Ok(body) => (
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
            assert!(call(&h, CALL.as_bytes()).is_some(), "{h:?}");
        }
        let bare =
            r#"{"jsonrpc":"2.0","id":"x","method":"tools/call","params":{"name":"send_email"}}"#;
        let c = call(&headers(&[ACCEPT, JSON]), bare.as_bytes()).unwrap();
        assert!(c.arguments.is_none() && c.meta.is_none());
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
            headers(&[ACCEPT, JSON, ("mcp-protocol-version", "2026-07-28")]),
            headers(&[ACCEPT, JSON, ("mcp-protocol-version", "1999-01-01")]),
            headers(&[
                ACCEPT,
                JSON,
                ("mcp-protocol-version", "2025-06-18"),
                ("mcp-protocol-version", "2025-06-18"),
            ]),
        ] {
            assert!(call(&h, CALL.as_bytes()).is_none(), "{h:?}");
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
            assert!(call(&h, body.as_bytes()).is_none(), "{body}");
        }
    }
}
