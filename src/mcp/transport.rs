//! The stdio transport: MCP over stdin and stdout, with non-blocking pipes
//! when the client launched us with pipes or sockets.
//!
//! Under stdio, stdout carries only MCP messages: nothing else in the daemon
//! may write to it (logs go to stderr). A request is one line of at most
//! `http.body_limit` bytes, the bound of an HTTP request's body. The end of
//! stdin reaches rmcp only once every request read before it is answered
//! (`Answering`), within `shutdown_grace`.

use std::collections::HashSet;
use std::fs::File;
use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rmcp::ServiceExt;
use rmcp::model::{ClientNotification, JsonRpcMessage, RequestId};
use rmcp::service::{RoleServer, RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;
use tokio_util::sync::CancellationToken;

use super::lines::Lines;
use super::{MailmuxServer, RunError, drain};

/// A boxed reading half of a transport.
pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
/// A boxed writing half of a transport.
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// How stdin and stdout are driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdioMode {
    /// Both are pipes (FIFOs): tokio's non-blocking pipe driver on the reactor.
    Pipe,
    /// Both are Unix sockets (some clients use socket pairs): tokio's UnixStream.
    Socket,
    /// Anything else (files, terminals): tokio's stdin/stdout, which go
    /// through blocking threads and are several times slower.
    Blocking,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FdKind {
    Fifo,
    Socket,
    Other,
}

fn fd_kind(fd: impl AsFd) -> FdKind {
    let Ok(owned) = fd.as_fd().try_clone_to_owned() else {
        return FdKind::Other;
    };
    match File::from(owned).metadata() {
        Ok(m) if m.file_type().is_fifo() => FdKind::Fifo,
        Ok(m) if m.file_type().is_socket() => FdKind::Socket,
        _ => FdKind::Other,
    }
}

/// Opens the pipe behind `fd` again through `/proc/self/fd`, non-blocking.
/// A new open file description keeps `O_NONBLOCK` private to us: the parent
/// and any child sharing the original descriptor keep their blocking mode.
/// Falls back to a plain duplicate where `/proc` is unavailable.
fn reopen_pipe(fd: impl AsFd, write: bool) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let path = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
    let reopened = std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
    match reopened {
        Ok(f) => Ok(f.into()),
        Err(_) => fd.as_fd().try_clone_to_owned(),
    }
}

fn pipe_streams() -> std::io::Result<(Reader, Writer)> {
    let rx =
        tokio::net::unix::pipe::Receiver::from_owned_fd(reopen_pipe(std::io::stdin(), false)?)?;
    let tx = tokio::net::unix::pipe::Sender::from_owned_fd(reopen_pipe(std::io::stdout(), true)?)?;
    Ok((Box::new(rx), Box::new(tx)))
}

fn socket_streams() -> std::io::Result<(Reader, Writer)> {
    let open = |fd: OwnedFd| -> std::io::Result<tokio::net::UnixStream> {
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true)?;
        tokio::net::UnixStream::from_std(std)
    };
    let rx = open(std::io::stdin().as_fd().try_clone_to_owned()?)?;
    let tx = open(std::io::stdout().as_fd().try_clone_to_owned()?)?;
    Ok((Box::new(rx), Box::new(tx)))
}

/// The fastest streams for this process's stdin and stdout. Must be called
/// inside a tokio runtime.
pub fn stdio_streams() -> (Reader, Writer, StdioMode) {
    let kinds = (fd_kind(std::io::stdin()), fd_kind(std::io::stdout()));
    let fast = match kinds {
        (FdKind::Fifo, FdKind::Fifo) => pipe_streams().map(|(r, w)| (r, w, StdioMode::Pipe)),
        (FdKind::Socket, FdKind::Socket) => {
            socket_streams().map(|(r, w)| (r, w, StdioMode::Socket))
        }
        _ => Err(std::io::Error::other("not pipes")),
    };
    match fast {
        Ok(streams) => streams,
        Err(e) => {
            if kinds.0 != FdKind::Other && kinds.1 != FdKind::Other {
                tracing::debug!(error = %e, "non-blocking stdio unavailable");
            }
            let (r, w) = rmcp::transport::stdio();
            (Box::new(r), Box::new(w), StdioMode::Blocking)
        }
    }
}

/// Serves MCP on stdin and stdout until stdin ends or `shutdown` resolves.
pub async fn serve_stdio(
    server: MailmuxServer,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let (reader, writer, mode) = stdio_streams();
    tracing::info!(mode = ?mode, "serving MCP on stdio");
    crate::service::ready("serving MCP on stdio".into());
    serve_io(server, reader, writer, shutdown).await
}

/// Serves MCP over any byte streams (stdio, or a duplex in tests) until the
/// reader ends or `shutdown` resolves, then drains the dispatcher.
pub async fn serve_io<R, W>(
    server: MailmuxServer,
    reader: R,
    writer: W,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError>
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    tokio::pin!(shutdown);
    let reader = Gated {
        inner: reader,
        gate: server.call_gate(),
        wait: None,
    };
    // A request is one line, bounded as an HTTP request's body is. A
    // longer line is dropped unread, with an error in the log: there is no
    // answer without the request's id.
    let transport = Lines::new(reader, writer, server.config().daemon.http.body_limit);
    let open = Arc::new(Open::default());
    let transport = Answering {
        inner: transport,
        open: open.clone(),
    };
    let serving = server.clone().serve(transport);
    tokio::pin!(serving);
    let running = loop {
        tokio::select! {
            r = &mut serving => break r,
            // The input ended before the session began: no call to answer.
            () = open.ended.cancelled(), if !open.release.is_cancelled() => open.release.cancel(),
            () = &mut shutdown => {
                tracing::info!("shutdown requested before the client initialized");
                drain(&server).await;
                return Ok(());
            }
        }
    };
    let running = match running {
        Ok(r) => r,
        Err(e) => {
            // A client that leaves before initializing is not a daemon fault.
            tracing::info!(error = %e, "the MCP session ended during initialization");
            drain(&server).await;
            return Ok(());
        }
    };
    let cancel = running.cancellation_token();
    let waiting = running.waiting();
    tokio::pin!(waiting);
    tokio::select! {
        () = open.ended.cancelled() => {
            // Each request read before the end is answered first: rmcp,
            // seeing the end, would write answers for only 5 s more.
            let grace = server.config().daemon.shutdown_grace;
            tracing::info!(requests = open.len(), grace = ?grace, "stdin closed; answering the requests read before it");
            tokio::select! {
                r = tokio::time::timeout(grace, open.answered()) => if r.is_err() {
                    tracing::warn!(requests = open.len(), "shutdown grace ran out with requests unanswered");
                },
                () = &mut shutdown => tracing::info!("shutdown signal received"),
            }
            open.release.cancel();
            let _ = waiting.await;
            drain(&server).await;
        }
        r = &mut waiting => {
            tracing::info!(reason = ?r.as_ref().map(|q| format!("{q:?}")), "the MCP session ended");
            drain(&server).await;
        }
        () = &mut shutdown => {
            tracing::info!("shutdown signal received");
            // Deliveries in flight finish first, while the transport can still
            // carry their results; only then does the session close.
            drain(&server).await;
            cancel.cancel();
            let _ = waiting.await;
        }
    }
    Ok(())
}

/// The requests a transport has read and not answered yet, and the end of
/// its input: the transport that meets the end cancels `ended`, and reports
/// it to rmcp only once `release` is cancelled.
#[derive(Debug, Default)]
struct Open {
    ids: Mutex<HashSet<RequestId>>,
    changed: Notify,
    ended: CancellationToken,
    release: CancellationToken,
}

impl Open {
    fn insert(&self, id: RequestId) {
        self.ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id);
    }

    fn remove(&self, id: &RequestId) {
        self.ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        self.changed.notify_waiters();
    }

    fn len(&self) -> usize {
        self.ids.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Once every request read is answered (or cancelled by its client,
    /// when rmcp sends no answer).
    async fn answered(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.len() == 0 {
                return;
            }
            changed.await;
        }
    }
}

/// A server transport that counts the requests it reads until their
/// answers are written ([`Open`]), and holds back the end of its input
/// until they all are.
struct Answering<T> {
    inner: T,
    open: Arc<Open>,
}

impl<T: Transport<RoleServer>> Transport<RoleServer> for Answering<T> {
    type Error = T::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleServer>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        let id = match &item {
            JsonRpcMessage::Response(r) => Some(r.id.clone()),
            JsonRpcMessage::Error(e) => e.id.clone(),
            _ => None,
        };
        let open = self.open.clone();
        let sending = self.inner.send(item);
        async move {
            let sent = sending.await;
            if let Some(id) = id {
                open.remove(&id);
            }
            sent
        }
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleServer>> {
        let Some(m) = self.inner.receive().await else {
            self.open.ended.cancel();
            self.open.release.cancelled().await;
            return None;
        };
        match &m {
            JsonRpcMessage::Request(r) => self.open.insert(r.id.clone()),
            JsonRpcMessage::Notification(n) => {
                if let ClientNotification::CancelledNotification(c) = &n.notification
                    && let Some(id) = &c.params.request_id
                {
                    self.open.remove(id);
                }
            }
            _ => {}
        }
        Some(m)
    }

    fn close(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.inner.close()
    }
}

/// Counts the `send_email` calls in progress (`max_concurrent_calls`), so that
/// the stream transport stops reading requests while they are all taken: a
/// burst of large calls then waits in the pipe, not in memory.
#[derive(Debug)]
pub struct CallGate {
    active: AtomicUsize,
    max: usize,
    freed: Arc<Notify>,
}

impl CallGate {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(CallGate {
            active: AtomicUsize::new(0),
            max: max.max(1),
            freed: Arc::new(Notify::new()),
        })
    }

    /// Counts a call in progress until the slot is dropped.
    pub fn enter(self: &Arc<Self>) -> CallSlot {
        self.active.fetch_add(1, Ordering::AcqRel);
        CallSlot(self.clone())
    }

    fn is_full(&self) -> bool {
        self.active.load(Ordering::Acquire) >= self.max
    }
}

/// One call in progress.
#[derive(Debug)]
pub struct CallSlot(Arc<CallGate>);

impl Drop for CallSlot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_waiters();
    }
}

/// A reader that reads only while the gate has room.
struct Gated<R> {
    inner: R,
    gate: Arc<CallGate>,
    wait: Option<Pin<Box<OwnedNotified>>>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Gated<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.gate.is_full() {
                this.wait = None;
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let freed = this.gate.freed.clone();
            let wait = this
                .wait
                .get_or_insert_with(|| Box::pin(freed.notified_owned()));
            // Registered before the second look, so a slot freed in between
            // still wakes us.
            wait.as_mut().enable();
            if !this.gate.is_full() {
                continue;
            }
            match wait.as_mut().poll(cx) {
                Poll::Ready(()) => this.wait = None,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
