//! A plugin's sandbox state: WASI with nothing granted (no sockets at all),
//! a resource table and store limits sized for one policy component, a
//! memory limiter that records refusals, the per-call tick budget, and a
//! bounded tail of the guest's stderr.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// WASI resources (streams, pollables, ...) a plugin may hold at once. Each
/// lives in host memory outside the plugin's memory cap, and the table keeps
/// them across calls, so without a cap a plugin that never drops them grows
/// the host without bound (wasmtime's default is a million). A policy needs
/// a handful: its stdio streams and a pollable while it sleeps.
pub(crate) const RESOURCES: usize = 1024;
/// Elements of one wasm table. A Rust plugin's function table holds a few
/// hundred; wasmtime's default is unbounded, and each element is host memory.
pub(crate) const TABLE_ELEMENTS: usize = 20_000;
/// Core instances, tables and memories of one store: what a Rust
/// `wasm32-wasip2` policy component needs (its module plus the small
/// adapter modules `wasm-component-ld` adds), one linear memory.
pub(crate) const INSTANCES: usize = 8;
pub(crate) const TABLES: usize = 8;
pub(crate) const MEMORIES: usize = 1;

/// The data of a plugin's store.
pub(crate) struct State {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limits: Limiter,
    /// Epoch ticks left in the current call.
    pub(crate) ticks_left: u64,
    pub(crate) stderr: StderrTail,
}

impl State {
    /// A fresh sandbox for one instance under `limits`.
    pub(crate) fn new(limits: &super::PluginLimits) -> State {
        let stderr = StderrTail::default();
        // No preopens, env or args; stdin and stdout empty. Sockets are
        // refused at creation, before any host descriptor exists: no TCP,
        // no UDP, no name lookup, and no address passes the check.
        let wasi = WasiCtx::builder()
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }))
            .build();
        let mut table = ResourceTable::new();
        table.set_max_capacity(RESOURCES);
        State {
            wasi,
            table,
            limits: Limiter {
                inner: store_limits(limits.memory_bytes),
                memory_refused: false,
            },
            ticks_left: limits.call_budget,
            stderr,
        }
    }
}

/// The store limits of one plugin instance.
pub(crate) fn store_limits(memory_bytes: usize) -> StoreLimits {
    StoreLimitsBuilder::new()
        .memory_size(memory_bytes)
        .table_elements(TABLE_ELEMENTS)
        .instances(INSTANCES)
        .tables(TABLES)
        .memories(MEMORIES)
        .trap_on_grow_failure(true)
        .build()
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
    use crate::plugin::PluginLimits;
    use wasmtime::{Engine, Instance, Module, Store};

    /// A store with a plugin's sandbox and limiter, for raw core modules.
    fn store(engine: &Engine) -> Store<State> {
        let mut store = Store::new(engine, State::new(&PluginLimits::default()));
        store.limiter(|s| &mut s.limits);
        store
    }

    /// `(module (table 1 funcref) (func (export "grow") (param i32) (result i32)
    /// (table.grow 0 (ref.null func) (local.get 0))))`, hand-encoded (no `wat`
    /// feature in this build).
    const TABLE_GROW: &[u8] = &[
        0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
        0x01, 0x06, 0x01, 0x60, 0x01, 0x7f, 0x01, 0x7f, // type: (i32) -> i32
        0x03, 0x02, 0x01, 0x00, // func 0: type 0
        0x04, 0x04, 0x01, 0x70, 0x00, 0x01, // table: funcref, min 1, no max
        0x07, 0x08, 0x01, 0x04, b'g', b'r', b'o', b'w', 0x00, 0x00, // export "grow"
        0x0a, 0x0b, 0x01, 0x09, 0x00, 0xd0, 0x70, 0x20, 0x00, 0xfc, 0x0f, 0x00, 0x0b, // body
    ];

    /// `(module (memory 1) (memory 1))`: two memories (multi-memory).
    const TWO_MEMORIES: &[u8] = &[
        0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
        0x05, 0x05, 0x02, 0x00, 0x01, 0x00, 0x01, // memory: two of 1 page
    ];

    #[test]
    fn a_table_cannot_grow_past_its_element_cap() {
        let engine = Engine::default();
        let module = Module::new(&engine, TABLE_GROW).unwrap();
        let mut store = store(&engine);
        let inst = Instance::new(&mut store, &module, &[]).unwrap();
        let grow = inst.get_typed_func::<i32, i32>(&mut store, "grow").unwrap();
        // Small growth is fine: the old size comes back.
        assert_eq!(grow.call(&mut store, 10).unwrap(), 1);
        // Past the cap the limiter refuses, and refusing traps.
        let n = i32::try_from(TABLE_ELEMENTS).unwrap();
        let err = grow.call(&mut store, n).unwrap_err();
        assert!(format!("{err:?}").contains("table"), "{err:?}");
    }

    #[test]
    fn a_second_memory_is_refused() {
        let engine = Engine::default();
        let module = Module::new(&engine, TWO_MEMORIES).unwrap();
        let mut store = store(&engine);
        let err = Instance::new(&mut store, &module, &[]).unwrap_err();
        assert!(format!("{err:?}").contains("memor"), "{err:?}");
    }

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
