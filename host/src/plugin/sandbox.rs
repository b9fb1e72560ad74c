//! A plugin's sandbox state: WASI with nothing granted, a memory limiter
//! that records refusals, the per-call tick budget, and a bounded tail of
//! the guest's stderr.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, StoreLimits};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// The data of a plugin's store.
pub(crate) struct State {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limits: Limiter,
    /// Epoch ticks left in the current call.
    pub(crate) ticks_left: u64,
    pub(crate) stderr: StderrTail,
}

/// [`StoreLimits`] that also records whether it refused a memory growth, so an
/// out-of-memory trap is recognised by what happened during the call.
pub(crate) struct Limiter {
    pub(crate) inner: StoreLimits,
    pub(crate) memory_refused: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let r = self.inner.memory_growing(current, desired, maximum);
        if !matches!(r, Ok(true)) {
            self.memory_refused = true;
        }
        r
    }
    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.memory_refused = true;
        self.inner.memory_grow_failed(error)
    }
    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }
    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.table_grow_failed(error)
    }
    fn instances(&self) -> usize {
        self.inner.instances()
    }
    fn tables(&self) -> usize {
        self.inner.tables()
    }
    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

/// Bytes of the guest's stderr kept per call.
pub(crate) const STDERR_TAIL_BYTES: usize = 1024;

/// The guest's stderr: keeps the last [`STDERR_TAIL_BYTES`] written during the
/// current call, so a trap can be reported with the panic message that
/// preceded it. Bounded whatever the guest writes, and never blocks or fails,
/// so writing to stderr cannot itself break the host (the async WASI bindings
/// do the write on the calling task; no nested runtime).
#[derive(Clone, Default)]
pub(crate) struct StderrTail(Arc<Mutex<VecDeque<u8>>>);

impl StderrTail {
    pub(crate) fn push(&self, bytes: &[u8]) {
        let mut buf = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = &bytes[bytes.len().saturating_sub(STDERR_TAIL_BYTES)..];
        let excess = (buf.len() + bytes.len()).saturating_sub(STDERR_TAIL_BYTES);
        buf.drain(..excess);
        buf.extend(bytes);
    }

    pub(crate) fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// What the guest wrote during this call, on one line with control
    /// characters replaced (it ends up in logs and `/status`), if anything.
    pub(crate) fn text(&self) -> Option<String> {
        let buf = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let bytes: Vec<u8> = buf.iter().copied().collect();
        let raw = String::from_utf8_lossy(&bytes);
        let text = raw
            .lines()
            .map(|l| l.trim())
            // Rust's panic hint is noise here: the guest has no backtraces.
            .filter(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
            .collect::<Vec<_>>()
            .join(" | ")
            .replace(|c: char| c.is_control(), " ");
        (!text.is_empty()).then_some(text)
    }
}

impl IsTerminal for StderrTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for StderrTail {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for StderrTail {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for StderrTail {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for StderrTail {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_tail_keeps_the_last_bytes_on_one_clean_line() {
        let t = StderrTail::default();
        assert_eq!(t.text(), None);
        t.push(b"thread '<unnamed>' panicked at src/lib.rs:1:1:\nboom\x1b[31m\n");
        t.push(b"note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n");
        assert_eq!(
            t.text().as_deref(),
            Some("thread '<unnamed>' panicked at src/lib.rs:1:1: | boom [31m")
        );
        t.push(&vec![b'x'; 3 * STDERR_TAIL_BYTES]);
        t.push(b"\nlast words");
        let text = t.text().unwrap();
        assert!(text.ends_with("| last words"), "{text}");
        assert!(text.len() <= STDERR_TAIL_BYTES + 3, "{}", text.len());
        t.clear();
        assert_eq!(t.text(), None);
    }
}
