//! A connection that notices its client has gone only after a while
//! ([`crate::ModelConfig::disconnect_notice`]), like an engine that checks
//! its sockets between batches (llama-server notices within tens of ms):
//! for that long after the client's end of file (or a reset), reads wait
//! and writes succeed without going anywhere, so the generation goes on and
//! keeps its slot; then the end is reported and the server lets go.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// A TCP connection whose client's departure is noticed `delay` late.
pub(crate) struct LateNotice {
    inner: TcpStream,
    delay: Duration,
    /// Started when the departure happened; the departure is noticed when
    /// it fires.
    noticed: Option<Pin<Box<Sleep>>>,
}

impl LateNotice {
    pub(crate) fn new(inner: TcpStream, delay: Duration) -> LateNotice {
        LateNotice {
            inner,
            delay,
            noticed: None,
        }
    }

    /// The client is gone: start the clock, if not started.
    fn gone(&mut self) {
        if self.noticed.is_none() {
            self.noticed = Some(Box::pin(tokio::time::sleep(self.delay)));
        }
    }

    /// Whether the departure has been noticed (or has not happened).
    fn poll_noticed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.noticed {
            Some(s) => s.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }

    fn hiding(&self) -> bool {
        self.noticed.as_ref().is_some_and(|s| !s.is_elapsed())
    }
}

impl AsyncRead for LateNotice {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.noticed.is_some() {
            ready!(this.poll_noticed(cx));
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                this.gone();
                ready!(this.poll_noticed(cx));
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                this.gone();
                ready!(this.poll_noticed(cx));
                Poll::Ready(Err(e))
            }
            other => other,
        }
    }
}

impl AsyncWrite for LateNotice {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.hiding() {
            return Poll::Ready(Ok(data.len()));
        }
        match Pin::new(&mut this.inner).poll_write(cx, data) {
            Poll::Ready(Err(_)) if this.noticed.is_none() => {
                this.gone();
                Poll::Ready(Ok(data.len()))
            }
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.hiding() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.hiding() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}
