//! A socket to a server that mailmux talks to (an SMTP relay, an IMAP
//! server for the Sent copy) whose reads are bounded between two writes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream that fails a read once the server has sent more than `limit`
/// bytes since mailmux last wrote to it. A client protocol's replies answer
/// its commands, so a server that goes on sending without a command to
/// answer is broken or hostile; the libraries that read its replies buffer
/// a line whole before they look at it, so this is where it is stopped.
/// Put it below TLS, so that every byte counts.
#[derive(Debug)]
pub struct Unanswered<S> {
    inner: S,
    read: usize,
    limit: usize,
}

impl<S> Unanswered<S> {
    pub fn new(inner: S, limit: usize) -> Self {
        Unanswered {
            inner,
            read: 0,
            limit,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Unanswered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read > self.limit {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the server sent more than {} bytes without a command to answer",
                    self.limit
                ),
            )));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += buf.filled().len() - before;
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Unanswered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.read = 0;
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.read = 0;
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_past_the_limit_fail_until_the_next_write() {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let mut s = Unanswered::new(ours, 10);
        theirs.write_all(&[b'x'; 30]).await.unwrap();
        let mut buf = [0u8; 8];
        let mut got = 0;
        let err = loop {
            match s.read(&mut buf).await {
                Ok(n) => got += n,
                Err(e) => break e,
            }
        };
        assert!(got > 10 && got <= 18, "{got}");
        assert!(err.to_string().contains("more than 10 bytes"), "{err}");
        // A command of ours: the server may answer again.
        s.write_all(b"NOOP\r\n").await.unwrap();
        assert!(s.read(&mut buf).await.is_ok());
    }
}
