//! The WebAssembly plugin runtime: compiling, sandboxing and calling policy plugins.
//!
//! A plugin is untrusted code. Each instance runs with no filesystem, no network,
//! no environment, a memory cap ([`PluginLimits::memory_bytes`]) and a CPU budget
//! per call enforced with wasmtime epochs: one ticker thread advances the epoch
//! every millisecond and a store may run [`PluginLimits::call_budget`] ticks per
//! call before it traps. A trapped store is poisoned, so the instance is marked
//! dead and the caller (the scheduler) falls back to FIFO for that arm.
//!
//! Faults are classified from what happened, not from error wording: a call
//! stopped by the epoch budget is a [`PluginError::Timeout`], a call during
//! which the memory cap refused to grow is [`PluginError::OutOfMemory`], any
//! other trap is [`PluginError::Trap`] and carries the last bytes the guest
//! wrote to stderr during that call (a Rust panic message lands there).
//!
//! The generated bindings live here and nowhere else; the policy data types are
//! re-exported from [`types`] so the scheduler builds the plugin's view directly,
//! with no second copy per call.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder, Trap, UpdateDeadline,
};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::config::PluginSource;

#[allow(missing_docs)]
mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "policy",
        exports: { default: async },
    });
}

/// The policy interface's data types (generated from `wit/policy.wit`).
pub mod types {
    pub use super::bindings::maitre::policy::types::{
        Action, Admission, Backend, Class, Placement, Preemption, RejectWaiting, Rejection,
        Request, Running, Start, View, Waiting,
    };
}

use bindings::{Policy, PolicyPre};
use types::{Action, Admission, Request, View};

/// Sandbox limits of one plugin instance.
#[derive(Debug, Clone, Copy)]
pub struct PluginLimits {
    /// Epoch ticks (≈ milliseconds) one call may run before it traps.
    pub call_budget: u64,
    /// Largest linear memory, in bytes.
    pub memory_bytes: usize,
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits {
            call_budget: 50,
            memory_bytes: 64 << 20,
        }
    }
}

/// Why a plugin could not be loaded or called.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The `.wasm` file could not be read.
    #[error("cannot read plugin {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// Not a valid WebAssembly component.
    #[error(
        "{source_name} is not a valid WebAssembly component (build it with `cargo build --release --target wasm32-wasip2`): {reason}"
    )]
    Compile {
        /// Plugin source.
        source_name: String,
        /// Compiler message.
        reason: String,
    },
    /// The component does not implement the `maitre:policy/policy` world, or
    /// imports something the sandbox does not provide.
    #[error(
        "{source_name} does not match maitre's policy interface (wit/policy.wit, maitre:policy@0.1.0): {reason}"
    )]
    Interface {
        /// Plugin source.
        source_name: String,
        /// Linker message.
        reason: String,
    },
    /// The plugin's `init` refused its configuration.
    #[error("{source_name} refused its [policy.config]: {reason}")]
    Init {
        /// Plugin source.
        source_name: String,
        /// The plugin's own message.
        reason: String,
    },
    /// The call ran past its CPU budget.
    #[error("plugin call ran past its {budget_ms} ms CPU budget and was stopped after {ran_ms} ms")]
    Timeout {
        /// The budget.
        budget_ms: u64,
        /// Wall-clock time from the call to its end (≥ the budget; more on a busy CPU).
        ran_ms: u64,
    },
    /// The plugin tried to grow its memory past the cap.
    #[error("plugin exceeded its {limit_mib} MiB memory cap")]
    OutOfMemory {
        /// The cap.
        limit_mib: usize,
    },
    /// The plugin trapped (panic, unreachable, bad memory access, ...).
    #[error("plugin trapped: {0}")]
    Trap(String),
    /// An earlier trap poisoned this instance.
    #[error("plugin instance is dead after an earlier fault")]
    Dead,
    /// Requests waited while every slot of the arm stayed idle (the scheduler's
    /// starvation watchdog, `[limits] starvation_ms`).
    #[error("starvation: {waiting} request(s) waited {idle_ms} ms with every slot of the arm idle")]
    Starvation {
        /// Requests waiting when the watchdog fired.
        waiting: usize,
        /// How long every slot had been idle.
        idle_ms: u64,
    },
    /// The plugin answered with something no correct plugin returns for the
    /// view it was shown (unknown ids, duplicate starts, starts beyond the
    /// free slots, a flood of actions, a NaN priority). The scheduler refuses
    /// the whole answer.
    #[error("invalid answer from {call}: {summary}")]
    Invalid {
        /// `admit` or `schedule`.
        call: &'static str,
        /// What was wrong, e.g. `2 of 5 actions invalid: unknown_id ×2 (first: ...)`.
        summary: String,
    },
}

impl PluginError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::Read { .. } => "read",
            PluginError::Compile { .. } => "compile",
            PluginError::Interface { .. } => "interface",
            PluginError::Init { .. } => "init",
            PluginError::Timeout { .. } => "timeout",
            PluginError::OutOfMemory { .. } => "memory",
            PluginError::Trap(_) => "trap",
            PluginError::Dead => "dead",
            PluginError::Starvation { .. } => "starvation",
            PluginError::Invalid { .. } => "invalid",
        }
    }
}

struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: Limiter,
    ticks_left: u64,
    stderr: StderrTail,
}

/// [`StoreLimits`] that also records whether it refused a memory growth, so an
/// out-of-memory trap is recognised by what happened during the call.
struct Limiter {
    inner: StoreLimits,
    memory_refused: bool,
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
const STDERR_TAIL_BYTES: usize = 1024;

/// The guest's stderr: keeps the last [`STDERR_TAIL_BYTES`] written during the
/// current call, so a trap can be reported with the panic message that
/// preceded it. Bounded whatever the guest writes, and never blocks or fails,
/// so writing to stderr cannot itself break the host (the async WASI bindings
/// do the write on the calling task; no nested runtime).
#[derive(Clone, Default)]
struct StderrTail(Arc<Mutex<VecDeque<u8>>>);

impl StderrTail {
    fn push(&self, bytes: &[u8]) {
        let mut buf = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = &bytes[bytes.len().saturating_sub(STDERR_TAIL_BYTES)..];
        let excess = (buf.len() + bytes.len()).saturating_sub(STDERR_TAIL_BYTES);
        buf.drain(..excess);
        buf.extend(bytes);
    }

    fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// What the guest wrote during this call, on one line with control
    /// characters replaced (it ends up in logs and `/status`), if anything.
    fn text(&self) -> Option<String> {
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

impl bindings::maitre::policy::types::Host for State {}

/// The shared wasmtime engine, linker and epoch ticker.
pub struct Runtime {
    engine: Engine,
    linker: Linker<State>,
}

impl Runtime {
    /// The process-wide runtime (one engine, one ticker thread).
    pub fn global() -> &'static Arc<Runtime> {
        static RT: OnceLock<Arc<Runtime>> = OnceLock::new();
        RT.get_or_init(|| Arc::new(Runtime::new().expect("wasmtime engine configuration is valid")))
    }

    fn new() -> wasmtime::Result<Runtime> {
        let mut cfg = Config::new();
        cfg.epoch_interruption(true);
        cfg.wasm_component_model(true);
        let engine = Engine::new(&cfg)?;
        let mut linker = Linker::<State>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        Policy::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("maitre-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
            .expect("spawn epoch ticker thread");
        Ok(Runtime { engine, linker })
    }

    /// Reads and compiles a plugin. CPU-heavy (≈100 ms): call it off the async
    /// executor, e.g. in `spawn_blocking`.
    pub fn compile(&self, source: &PluginSource) -> Result<Compiled, PluginError> {
        let (bytes, name): (std::borrow::Cow<'static, [u8]>, String) = match source {
            PluginSource::Builtin(b) => (
                crate::builtins::bytes(b)
                    .ok_or_else(|| PluginError::Compile {
                        source_name: source.to_string(),
                        reason: "no such built-in plugin".into(),
                    })?
                    .into(),
                source.to_string(),
            ),
            PluginSource::File(p) => (
                std::fs::read(p)
                    .map_err(|e| PluginError::Read {
                        path: p.clone(),
                        error: e,
                    })?
                    .into(),
                p.display().to_string(),
            ),
        };
        self.compile_bytes(&bytes, source.clone(), name)
    }

    /// Compiles component bytes (see [`Runtime::compile`]).
    pub fn compile_bytes(
        &self,
        bytes: &[u8],
        source: PluginSource,
        name: String,
    ) -> Result<Compiled, PluginError> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let component = Component::new(&self.engine, bytes).map_err(|e| PluginError::Compile {
            source_name: name.clone(),
            reason: format!("{e:#}"),
        })?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .and_then(PolicyPre::new)
            .map_err(|e| PluginError::Interface {
                source_name: name.clone(),
                reason: format!("{e:#}"),
            })?;
        Ok(Compiled {
            inner: Arc::new(CompiledInner {
                pre,
                sha256,
                source,
                name,
            }),
        })
    }

    /// Instantiates a compiled plugin in a fresh sandbox and calls its `init`.
    pub async fn instantiate(
        &self,
        compiled: &Compiled,
        limits: PluginLimits,
        config: &[(String, String)],
    ) -> Result<Instance, PluginError> {
        let stderr = StderrTail::default();
        let state = State {
            // No preopens, env, args or network; stdin and stdout empty.
            wasi: WasiCtx::builder().stderr(stderr.clone()).build(),
            table: ResourceTable::new(),
            limits: Limiter {
                inner: StoreLimitsBuilder::new()
                    .memory_size(limits.memory_bytes)
                    .instances(4)
                    .tables(16)
                    .memories(4)
                    .trap_on_grow_failure(true)
                    .build(),
                memory_refused: false,
            },
            ticks_left: limits.call_budget,
            stderr,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        // What the host copies out of the guest per call (lists, strings) is
        // bounded by the plugin's memory cap: strings in a returned list may
        // all point at the same guest bytes, so without a bound a plugin could
        // make the host allocate far more than the plugin itself holds.
        store.set_hostcall_fuel(limits.memory_bytes);
        store.epoch_deadline_callback(|mut cx| {
            let s = cx.data_mut();
            if s.ticks_left > 0 {
                s.ticks_left -= 1;
                Ok(UpdateDeadline::Yield(1))
            } else {
                Err(Trap::Interrupt.into())
            }
        });
        let mut inst = Instance {
            store,
            policy: None,
            limits,
            name: compiled.inner.name.clone(),
        };
        let t = inst.arm_deadline();
        let policy = compiled
            .inner
            .pre
            .instantiate_async(&mut inst.store)
            .await
            .map_err(|e| inst.classify(e, t))?;
        inst.policy = Some(policy);
        let t = inst.arm_deadline();
        let call = {
            let policy = inst.policy.as_ref().expect("just set");
            policy.call_init(&mut inst.store, config).await
        };
        match call {
            Ok(Ok(())) => Ok(inst),
            Ok(Err(reason)) => Err(PluginError::Init {
                source_name: compiled.inner.name.clone(),
                reason,
            }),
            Err(e) => Err(inst.classify(e, t)),
        }
    }
}

/// A compiled plugin, ready to instantiate any number of times (cheap to clone).
#[derive(Clone)]
pub struct Compiled {
    inner: Arc<CompiledInner>,
}

struct CompiledInner {
    pre: PolicyPre<State>,
    sha256: String,
    source: PluginSource,
    name: String,
}

impl Compiled {
    /// Hex sha256 of the component bytes.
    pub fn sha256(&self) -> &str {
        &self.inner.sha256
    }
    /// Where it came from.
    pub fn source(&self) -> &PluginSource {
        &self.inner.source
    }
    /// Human-readable name (the path or `builtin:NAME`).
    pub fn name(&self) -> &str {
        &self.inner.name
    }
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("name", &self.inner.name)
            .field("sha256", &self.inner.sha256)
            .finish()
    }
}

/// One live plugin instance in its own store. Not shared: the scheduler owns it.
pub struct Instance {
    store: Store<State>,
    policy: Option<Policy>,
    limits: PluginLimits,
    name: String,
}

impl Instance {
    /// Resets the per-call budget and fault records; returns the call's start.
    fn arm_deadline(&mut self) -> Instant {
        let s = self.store.data_mut();
        s.ticks_left = self.limits.call_budget;
        s.limits.memory_refused = false;
        s.stderr.clear();
        self.store.set_epoch_deadline(1);
        Instant::now()
    }

    fn timeout(&self, started: Instant) -> PluginError {
        PluginError::Timeout {
            budget_ms: self.limits.call_budget,
            ran_ms: started.elapsed().as_millis() as u64,
        }
    }

    /// Turns a failed call into a [`PluginError`] and marks the instance dead.
    fn classify(&mut self, e: wasmtime::Error, started: Instant) -> PluginError {
        self.policy = None; // a trap poisons the store: never call it again
        if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            return self.timeout(started);
        }
        if self.store.data().limits.memory_refused {
            return PluginError::OutOfMemory {
                limit_mib: self.limits.memory_bytes >> 20,
            };
        }
        // The trap itself ("wasm `unreachable` instruction executed"), not
        // the multi-line backtrace context around it.
        let mut text = match e.downcast_ref::<Trap>() {
            Some(trap) => trap.to_string(),
            None => format!("{:#}", e.root_cause()),
        };
        if let Some(stderr) = self.store.data().stderr.text() {
            text.push_str("; plugin stderr: ");
            text.push_str(&stderr);
        }
        tracing::debug!(plugin = %self.name, error = ?e, "plugin trapped");
        PluginError::Trap(text)
    }

    /// The plugin's name, for logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Asks the plugin to classify an arriving request.
    pub async fn admit(&mut self, req: &Request, view: &View) -> Result<Admission, PluginError> {
        let t = self.arm_deadline();
        let policy = self.policy.as_ref().ok_or(PluginError::Dead)?;
        // Backstop for a budget that cannot fire (the call never yields).
        let outer = Duration::from_millis(self.limits.call_budget * 4 + 100);
        match tokio::time::timeout(outer, policy.call_admit(&mut self.store, req, view)).await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => Err(self.classify(e, t)),
            Err(_) => {
                self.policy = None;
                Err(self.timeout(t))
            }
        }
    }

    /// Asks the plugin what to do now.
    pub async fn schedule(&mut self, view: &View) -> Result<Vec<Action>, PluginError> {
        let t = self.arm_deadline();
        let policy = self.policy.as_ref().ok_or(PluginError::Dead)?;
        // Backstop for a budget that cannot fire (the call never yields).
        let outer = Duration::from_millis(self.limits.call_budget * 4 + 100);
        match tokio::time::timeout(outer, policy.call_schedule(&mut self.store, view)).await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => Err(self.classify(e, t)),
            Err(_) => {
                self.policy = None;
                Err(self.timeout(t))
            }
        }
    }
}

/// Compiles and initialises a plugin once, as `maitre check` and hot reload do.
pub async fn load(
    source: &PluginSource,
    limits: PluginLimits,
    config: &[(String, String)],
) -> Result<(Compiled, Instance), PluginError> {
    let rt = Runtime::global().clone();
    let src = source.clone();
    let compiled = tokio::task::spawn_blocking(move || rt.compile(&src))
        .await
        .expect("compile task does not panic")?;
    let inst = Runtime::global()
        .instantiate(&compiled, limits, config)
        .await?;
    Ok((compiled, inst))
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
