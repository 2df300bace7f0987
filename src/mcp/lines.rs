//! The stdio transport's framing: one JSON-RPC message a line, each way.
//!
//! It reads as rmcp's `AsyncRwTransport` does: a line of at most `max`
//! bytes (a longer one is dropped unread, with an error in the log), a
//! line that is not JSON ignored, one that is JSON but no message of the
//! protocol answered with an "Invalid request" error, non-standard
//! notifications skipped (rmcp's own decoder, [`JsonRpcMessageCodec`],
//! decides all of these). What it adds is [`tools_call`]: a `tools/call`
//! request of the usual shape is read straight into rmcp's types, without
//! the buffered, untagged pass of rmcp's parser, which costs about four
//! times as much and was a tenth of a `send_email` call's instructions.
//! Anything else goes to rmcp's decoder. Answers are written by
//! [`Encode`], as rmcp's codec writes them but at half its cost.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;

use bytes::BytesMut;
use futures::SinkExt;
use rmcp::RoleServer;
use rmcp::model::{
    CallToolRequestParams, ClientRequest, ErrorData, JsonObject, JsonRpcMessage, JsonRpcRequest,
    JsonRpcVersion2_0, Request, RequestId, RequestMetaObject,
};
use rmcp::service::{RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport;
use rmcp::transport::async_rw::{JsonRpcMessageCodec, JsonRpcMessageCodecError};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, BufReader};
use tokio::sync::Mutex;
use tokio_util::codec::{Decoder, Encoder, FramedWrite};

type Writer<W> = FramedWrite<W, Encode>;

/// Writes each message as one line. serde_json writes into a `Vec` at
/// about half the cost of writing into the frame's `BytesMut` through its
/// `io::Write` adapter, as rmcp's codec does, so the line is made in a
/// `Vec` and copied.
#[derive(Debug, Default)]
struct Encode;

impl Encoder<TxJsonRpcMessage<RoleServer>> for Encode {
    type Error = std::io::Error;

    fn encode(
        &mut self,
        item: TxJsonRpcMessage<RoleServer>,
        buf: &mut BytesMut,
    ) -> Result<(), Self::Error> {
        let mut line = serde_json::to_vec(&item)?;
        line.push(b'\n');
        buf.extend_from_slice(&line);
        Ok(())
    }
}

/// A server transport over a reader and a writer of JSON-RPC lines.
pub struct Lines<R, W> {
    read: BufReader<R>,
    /// The line read so far: a read cancelled mid-line (`receive` is polled
    /// in a `select!`) resumes it.
    line: Vec<u8>,
    max: usize,
    /// Dropping the rest of a line longer than `max`.
    discarding: bool,
    write: Arc<Mutex<Option<Writer<W>>>>,
    /// An "Invalid request" error owed to the client.
    owed: Option<Owed>,
}

impl<R, W> std::fmt::Debug for Lines<R, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lines")
            .field("max", &self.max)
            .field("discarding", &self.discarding)
            .field("owed", &self.owed)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy)]
enum Owed {
    Write,
    Flush,
}

/// What one line holds.
#[allow(clippy::large_enum_variant)] // returned once a line, never stored
enum Parsed {
    Message(RxJsonRpcMessage<RoleServer>),
    /// Nothing to answer: empty, not JSON, or a notification rmcp skips.
    Skip,
    /// JSON, but no message of the protocol: answered "Invalid request".
    Invalid,
}

enum Read {
    Line,
    Oversized,
    Eof,
    Failed(std::io::Error),
}

impl<R, W> Lines<R, W>
where
    R: AsyncRead + Send + Unpin,
    W: AsyncWrite + Send + Unpin + 'static,
{
    pub fn new(read: R, write: W, max: usize) -> Self {
        Lines {
            read: BufReader::new(read),
            line: Vec::new(),
            max,
            discarding: false,
            write: Arc::new(Mutex::new(Some(FramedWrite::new(write, Encode)))),
            owed: None,
        }
    }

    /// Reads one line into `self.line`, never past `self.max`. Nothing is
    /// consumed across an await, so a cancelled read loses no bytes.
    async fn read_line(&mut self) -> Read {
        loop {
            let (taken, done) = {
                let available = match self.read.fill_buf().await {
                    Ok(a) => a,
                    Err(e) => return Read::Failed(e),
                };
                if available.is_empty() {
                    return Read::Eof;
                }
                let newline = memchr::memchr(b'\n', available);
                let take = newline.map_or(available.len(), |i| i + 1);
                if self.discarding {
                    if newline.is_some() {
                        self.discarding = false;
                    }
                    (take, None)
                } else if self.line.len().saturating_add(take) > self.max {
                    self.line.clear();
                    self.discarding = newline.is_none();
                    (take, Some(Read::Oversized))
                } else {
                    self.line.extend_from_slice(&available[..take]);
                    (take, newline.map(|_| Read::Line))
                }
            };
            self.read.consume(taken);
            if let Some(read) = done {
                return read;
            }
        }
    }

    /// Writes the "Invalid request" error owed, in two steps so that a
    /// cancelled `receive` neither loses nor repeats it.
    async fn pay(&mut self) -> Option<()> {
        while let Some(owed) = self.owed {
            let mut write = self.write.lock().await;
            let framed = write.as_mut()?;
            match owed {
                Owed::Write => {
                    let error = TxJsonRpcMessage::<RoleServer>::error(
                        ErrorData::invalid_request("Invalid request", None),
                        None,
                    );
                    framed.feed(error).await.ok()?;
                    self.owed = Some(Owed::Flush);
                }
                Owed::Flush => {
                    framed.flush().await.ok()?;
                    self.owed = None;
                }
            }
        }
        Some(())
    }
}

impl<R, W> Transport<RoleServer> for Lines<R, W>
where
    R: AsyncRead + Send + Unpin,
    W: AsyncWrite + Send + Unpin + 'static,
{
    type Error = std::io::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleServer>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        let write = self.write.clone();
        async move {
            match write.lock().await.as_mut() {
                Some(framed) => framed.send(item).await,
                None => Err(std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "the transport is closed",
                )),
            }
        }
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleServer>> {
        loop {
            self.pay().await?;
            match self.read_line().await {
                Read::Line => {}
                Read::Oversized => {
                    tracing::error!(
                        max_line_length = self.max,
                        "a request line is longer than http.body_limit; dropped unread"
                    );
                    continue;
                }
                Read::Eof => return None,
                Read::Failed(e) => {
                    tracing::error!(error = %e, "reading the input failed");
                    return None;
                }
            }
            let text = self.line.strip_suffix(b"\n").unwrap_or(&self.line);
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            let parsed = parse(text);
            // The buffer's room is kept for the next line.
            self.line.clear();
            match parsed {
                Parsed::Message(message) => return Some(message),
                Parsed::Invalid => self.owed = Some(Owed::Write),
                Parsed::Skip => {}
            }
        }
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        drop(self.write.lock().await.take());
        Ok(())
    }
}

/// The message on one line (without its line end).
fn parse(line: &[u8]) -> Parsed {
    if line.is_empty() {
        return Parsed::Skip;
    }
    if let Some(call) = tools_call(line) {
        return Parsed::Message(call);
    }
    let mut buf = BytesMut::with_capacity(line.len() + 1);
    buf.extend_from_slice(line);
    buf.extend_from_slice(b"\n");
    match JsonRpcMessageCodec::<RxJsonRpcMessage<RoleServer>>::default().decode(&mut buf) {
        Ok(Some(message)) => Parsed::Message(message),
        Ok(None) => Parsed::Skip,
        Err(JsonRpcMessageCodecError::Serde(e)) => {
            use serde_json::error::Category;
            if matches!(e.classify(), Category::Data | Category::Io) {
                tracing::debug!(error = %e, "a request is no message of the protocol");
                Parsed::Invalid
            } else {
                tracing::debug!(error = %e, "ignoring a line that is not JSON");
                Parsed::Skip
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "ignoring an unreadable line");
            Parsed::Skip
        }
    }
}

/// A `tools/call` request with nothing but its id, name and arguments.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolsCall<'a> {
    jsonrpc: JsonRpcVersion2_0,
    id: RequestId,
    #[serde(borrow)]
    method: Cow<'a, str>,
    params: ToolsCallParams,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolsCallParams {
    /// rmcp's clients send a progress token on every call.
    #[serde(rename = "_meta", default)]
    meta: Option<JsonObject>,
    name: String,
    #[serde(default)]
    arguments: Option<JsonObject>,
}

/// The `tools/call` request on `line`, read directly, when it has exactly
/// the members `jsonrpc`, `id`, `method` and `params`, and its params only
/// `_meta`, `name` and `arguments`. Anything else (a task, a member more,
/// a member twice, a byte-order mark) is `None`, for rmcp's parser, so
/// that a request this reads is one rmcp reads the same: its `_meta` in
/// the request's extensions, as rmcp puts it.
pub fn tools_call(line: &[u8]) -> Option<RxJsonRpcMessage<RoleServer>> {
    let call = Call::read(line)?;
    let mut params = CallToolRequestParams::new(call.name);
    params.arguments = call.arguments;
    let mut request = Request::new(params);
    if let Some(meta) = call.meta {
        request.extensions.insert(RequestMetaObject::from(meta));
    }
    Some(JsonRpcMessage::Request(JsonRpcRequest::new(
        call.id,
        ClientRequest::CallToolRequest(request),
    )))
}

/// The parts of a `tools/call` request of the usual shape ([`tools_call`]).
#[derive(Debug)]
pub struct Call {
    pub id: RequestId,
    pub meta: Option<JsonObject>,
    pub name: String,
    pub arguments: Option<JsonObject>,
}

impl Call {
    /// The request in `text`, when it is a `tools/call` that [`tools_call`]
    /// reads.
    pub fn read(text: &[u8]) -> Option<Call> {
        let call: ToolsCall<'_> = serde_json::from_slice(text).ok()?;
        if call.method != "tools/call" {
            return None;
        }
        let JsonRpcVersion2_0 = call.jsonrpc;
        Some(Call {
            id: call.id,
            meta: call.params.meta,
            name: call.params.name,
            arguments: call.params.arguments,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rmcp(line: &str) -> Option<serde_json::Value> {
        let m: RxJsonRpcMessage<RoleServer> = serde_json::from_str(line).ok()?;
        Some(serde_json::to_value(m).unwrap())
    }

    fn ours(line: &str) -> Option<serde_json::Value> {
        tools_call(line.as_bytes()).map(|m| serde_json::to_value(m).unwrap())
    }

    #[test]
    fn a_usual_call_is_read_as_rmcp_reads_it() {
        let body = serde_json::to_string(&"é\"\\\n".repeat(300)).unwrap();
        for line in [
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"send_email","arguments":{"to":"a@b.c","n":[1,2.5,-3,null,true]}}}"#.to_owned(),
            r#"{"params":{"arguments":{"x":{"y":{}}},"name":"get_smtp_status"},"method":"tools\/call","id":"abc","jsonrpc":"2.0"}"#.to_owned(),
            r#"{"jsonrpc":"2.0","id":0,"method":"tools/call","params":{"name":"get_smtp_status"}}"#.to_owned(),
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":null}}"#.to_owned(),
            r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"_meta":{"progressToken":0},"arguments":{"to":"a@b.c"},"name":"send_email"}}"#.to_owned(),
            r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"x","_meta":{"progressToken":"t","io.modelcontextprotocol/logLevel":"debug"}}}"#.to_owned(),
            r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"x","_meta":null}}"#.to_owned(),
            format!(r#"{{"jsonrpc":"2.0","id":9223372036854775807,"method":"tools/call","params":{{"name":"send_email","arguments":{{"body":{body}}}}}}}"#),
        ] {
            let ours = ours(&line).unwrap_or_else(|| panic!("not read: {line}"));
            assert_eq!(Some(ours), rmcp(&line), "{line}");
        }
    }

    #[test]
    fn anything_unusual_is_left_to_rmcp() {
        for line in [
            // Another method, or none.
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"name":"x"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"params":{"name":"x"}}"#,
            // A notification, a response.
            r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"x"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","result":{},"params":{"name":"x"}}"#,
            // Members it does not read: a task, one more, one twice.
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","_meta":[1]}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","task":{"ttl":1000}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"},"extra":1}"#,
            r#"{"jsonrpc":"2.0","id":1,"id":2,"method":"tools/call","params":{"name":"x"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","name":"y"}}"#,
            // Wrong values.
            r#"{"jsonrpc":"1.0","id":1,"method":"tools/call","params":{"name":"x"}}"#,
            r#"{"jsonrpc":"2.0","id":null,"method":"tools/call","params":{"name":"x"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":[1]}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":7}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#,
            "\u{feff}{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"x\"}}",
            "not json",
            "",
        ] {
            assert_eq!(ours(line), None, "{line}");
        }
    }

    /// Random lines near the usual shape: whatever this reads, rmcp reads
    /// the same.
    #[test]
    fn what_it_reads_rmcp_reads_the_same() {
        use rand::seq::SliceRandom;
        use rand::{Rng, SeedableRng};
        let seed: u64 = rand::random();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // For each member, its usual value first, then others; "" leaves
        // it out.
        let members: [&[&str]; 6] = [
            &[r#""jsonrpc":"2.0""#, r#""jsonrpc":"2""#, ""],
            &[
                r#""id":1"#,
                r#""id":"x""#,
                r#""id":-1"#,
                r#""id":1.5"#,
                r#""id":{}"#,
                "",
            ],
            &[r#""method":"tools/call""#, r#""method":"tools/list""#, ""],
            &[
                r#""params":{"name":"send_email","arguments":{"to":"a@b","n":[1,{"k":null}]}}"#,
                r#""params":{"arguments":{},"name":"x"}"#,
                r#""params":{"arguments":{}}"#,
                r#""params":{"name":"x","_meta":{"progressToken":3}}"#,
                r#""params":{"name":"x","_meta":7}"#,
                r#""params":{"name":"x","arguments":"y"}"#,
                r#""params":null"#,
                "",
            ],
            &["", r#""result":{}"#],
            &["", r#""error":{"code":1,"message":"m"}"#],
        ];
        let mut read = 0;
        for _ in 0..20_000 {
            let mut chosen: Vec<&str> = members
                .iter()
                .map(|values| {
                    if rng.random_bool(0.7) {
                        values[0]
                    } else {
                        values[rng.random_range(0..values.len())]
                    }
                })
                .filter(|v| !v.is_empty())
                .collect();
            chosen.shuffle(&mut rng);
            let line = format!("{{{}}}", chosen.join(","));
            if let Some(ours) = ours(&line) {
                read += 1;
                assert_eq!(Some(ours), rmcp(&line), "seed {seed}: {line}");
            }
        }
        assert!(read > 1_000, "seed {seed}: only {read} lines read");
    }
}
