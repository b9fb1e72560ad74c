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
//! Interface versions sit side by side, one module each (`v0_1_0` for
//! `wit/v0.1.0/`). A component is matched against every supported version
//! when it is compiled; the scheduler only ever sees the host's own types
//! ([`crate::policy`]), converted at this boundary.

mod error;
mod sandbox;
mod v0_1_0;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimitsBuilder, Trap, UpdateDeadline};
use wasmtime_wasi::WasiCtx;

pub use error::PluginError;
use sandbox::{Limiter, State, StderrTail};

use crate::policy::{Action, Admission, Request, View};

/// The interface versions this host loads, newest first.
pub const SUPPORTED: &[&str] = &[v0_1_0::PACKAGE];

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

/// A compiled component, matched to the interface version it implements.
enum Pre {
    V0_1_0(v0_1_0::PolicyPre<State>),
}

/// A live component instance of one interface version.
enum Bound {
    V0_1_0(v0_1_0::Policy),
}

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
        v0_1_0::add_to_linker(&mut linker)?;
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

    /// Compiles component bytes and matches them to a supported interface
    /// version. CPU-heavy (≈100 ms): call it off the async executor, e.g. in
    /// `spawn_blocking`.
    pub fn compile_bytes(&self, bytes: &[u8], name: String) -> Result<Compiled, PluginError> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let component = Component::new(&self.engine, bytes).map_err(|e| PluginError::Compile {
            source_name: name.clone(),
            reason: format!("{e:#}"),
        })?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .and_then(v0_1_0::PolicyPre::new)
            .map(Pre::V0_1_0)
            .map_err(|e| PluginError::Interface {
                source_name: name.clone(),
                reason: format!("{e:#}"),
            })?;
        Ok(Compiled {
            inner: Arc::new(CompiledInner { pre, sha256, name }),
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
            bound: None,
            limits,
            name: compiled.inner.name.clone(),
        };
        let t = inst.arm_deadline();
        let bound = match &compiled.inner.pre {
            Pre::V0_1_0(pre) => pre
                .instantiate_async(&mut inst.store)
                .await
                .map(Bound::V0_1_0),
        }
        .map_err(|e| inst.classify(e, t))?;
        let t = inst.arm_deadline();
        let call = match &bound {
            Bound::V0_1_0(p) => v0_1_0::init(p, &mut inst.store, config).await,
        };
        inst.bound = Some(bound);
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
    pre: Pre,
    sha256: String,
    name: String,
}

impl Compiled {
    /// Hex sha256 of the component bytes.
    pub fn sha256(&self) -> &str {
        &self.inner.sha256
    }
    /// The interface version it implements, e.g. `maitre:policy@0.1.0`.
    pub fn interface(&self) -> &'static str {
        match self.inner.pre {
            Pre::V0_1_0(_) => v0_1_0::PACKAGE,
        }
    }
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("name", &self.inner.name)
            .field("sha256", &self.inner.sha256)
            .field("interface", &self.interface())
            .finish()
    }
}

/// One live plugin instance in its own store. Not shared: the scheduler owns it.
pub struct Instance {
    store: Store<State>,
    /// None once a fault poisoned the store.
    bound: Option<Bound>,
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
        self.bound = None; // a trap poisons the store: never call it again
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

    /// Runs one call under the tick budget, with an outer wall-clock backstop
    /// for a budget that cannot fire (the call never yields).
    async fn call<T>(
        &mut self,
        f: impl AsyncFnOnce(&Bound, &mut Store<State>) -> wasmtime::Result<T>,
    ) -> Result<T, PluginError> {
        let t = self.arm_deadline();
        let bound = self.bound.as_ref().ok_or(PluginError::Dead)?;
        let outer = Duration::from_millis(self.limits.call_budget * 4 + 100);
        match tokio::time::timeout(outer, f(bound, &mut self.store)).await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => Err(self.classify(e, t)),
            Err(_) => {
                self.bound = None;
                Err(self.timeout(t))
            }
        }
    }

    /// Asks the plugin to classify an arriving request.
    pub async fn admit(&mut self, req: &Request, view: &View) -> Result<Admission, PluginError> {
        self.call(async |b, store| match b {
            Bound::V0_1_0(p) => v0_1_0::admit(p, store, req, view).await,
        })
        .await
    }

    /// Asks the plugin what to do now.
    pub async fn schedule(&mut self, view: &View) -> Result<Vec<Action>, PluginError> {
        self.call(async |b, store| match b {
            Bound::V0_1_0(p) => v0_1_0::schedule(p, store, view).await,
        })
        .await
    }
}
