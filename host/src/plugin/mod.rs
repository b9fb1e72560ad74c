//! The WebAssembly plugin runtime: compiling, sandboxing and calling policy plugins.
//!
//! A plugin is untrusted code. Each instance runs with no filesystem, no network
//! (socket creation is refused before any host descriptor exists), no
//! environment, a memory cap ([`PluginLimits::memory_bytes`]), one memory, a
//! bounded table and resource table ([`sandbox::RESOURCES`]), and a time budget
//! per call, `init` included, enforced twice:
//!
//! - CPU: one ticker thread advances the wasmtime epoch every millisecond and a
//!   store may run [`PluginLimits::call_budget`] ticks per call before it traps.
//!   Ticks only count while guest code runs: time the guest spends blocked in
//!   a host (WASI) call, e.g. `std::thread::sleep` or a `poll` on a clock, is
//!   charged one tick when it returns, however long it took.
//! - Wall clock: every call, `init` included, is abandoned once it has run
//!   [`PluginLimits::wall_limit`] (the budget plus a small margin). The async
//!   WASI bindings yield to tokio while the guest is blocked, so this deadline
//!   fires there too.
//!
//! Under a paused (virtual) tokio clock, as `maitre simulate` runs, the
//! wall-clock deadline is measured on that clock, and it still cannot cut a
//! plugin that computes: virtual time moves only while every task waits, and
//! a computing plugin's call never waits (with [`PluginLimits::virtual_time`]
//! it does not even yield at epoch ticks). A plugin that waits (sleeps) is
//! stopped after the same virtual deadline as `serve` would stop it after on
//! the real clock, and the CPU budget stays real.
//!
//! A trapped or abandoned store is poisoned, so the instance is marked dead
//! and the caller (the scheduler) falls back to FIFO for that arm.
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
mod v0_2_0;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker, ResourceTableError};
use wasmtime::{Config, Engine, Store, Trap, UpdateDeadline};

pub use error::PluginError;
use sandbox::State;

use crate::policy::{Action, Admission, Request, View};

/// The interface versions this host loads, newest first.
pub const SUPPORTED: &[&str] = &[v0_2_0::PACKAGE, v0_1_0::PACKAGE];

/// Sandbox limits of one plugin instance.
#[derive(Debug, Clone, Copy)]
pub struct PluginLimits {
    /// Time budget of one call, in milliseconds: epoch ticks (≈ ms of guest
    /// CPU) before it traps, and the base of its wall-clock deadline
    /// ([`PluginLimits::wall_limit`]).
    pub call_budget: u64,
    /// Largest linear memory, in bytes.
    pub memory_bytes: usize,
    /// The host runs on a paused, virtual tokio clock (`maitre simulate`):
    /// a call does not yield to the runtime at each epoch tick, so how fast
    /// this machine runs a plugin never changes the order in which other
    /// tasks see events, and the same inputs give the same decisions.
    /// `serve` yields, so a long call does not hold up the other tasks of
    /// its thread.
    pub virtual_time: bool,
}

impl PluginLimits {
    /// The limits a policy file's `[limits]` sets, on the real clock.
    pub fn of(limits: &crate::config::Limits) -> PluginLimits {
        PluginLimits {
            call_budget: limits.plugin_call_ms,
            memory_bytes: limits.plugin_memory_mib << 20,
            virtual_time: false,
        }
    }

    /// Wall-clock deadline of one call (`init` included): the budget plus
    /// a quarter of it and 25 ms of slack for a busy host, so a plugin that
    /// computes within its budget is never cut by scheduling jitter, while one
    /// that waits (sleeps, polls a clock) is stopped soon after the budget.
    pub fn wall_limit(&self) -> Duration {
        Duration::from_millis(self.call_budget + self.call_budget / 4 + 25)
    }
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits {
            call_budget: 50,
            memory_bytes: 64 << 20,
            virtual_time: false,
        }
    }
}

/// A compiled component, matched to the interface version it implements.
enum Pre {
    V0_1_0(v0_1_0::PolicyPre<State>),
    V0_2_0(v0_2_0::PolicyPre<State>),
}

/// A live component instance of one interface version.
enum Bound {
    V0_1_0(v0_1_0::Policy),
    V0_2_0(v0_2_0::Bound),
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
        v0_2_0::add_to_linker(&mut linker)?;
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
        let interface = |e: wasmtime::Error| PluginError::Interface {
            source_name: name.clone(),
            reason: format!("{e:#}"),
        };
        let instance_pre = self.linker.instantiate_pre(&component).map_err(interface)?;
        // Newest first; a component exports exactly one version's functions.
        let pre = match v0_2_0::PolicyPre::new(instance_pre.clone()) {
            Ok(p) => Pre::V0_2_0(p),
            Err(_) => v0_1_0::PolicyPre::new(instance_pre)
                .map(Pre::V0_1_0)
                .map_err(interface)?,
        };
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
        let state = State::new(&limits);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        // Handles the guest holds (WASI resources it was given, resources it
        // creates itself), store-wide; the resource table caps the host side.
        store.set_max_component_handles(sandbox::RESOURCES);
        // What the host copies out of the guest per call (lists, strings) is
        // bounded by the plugin's memory cap: strings in a returned list may
        // all point at the same guest bytes, so without a bound a plugin could
        // make the host allocate far more than the plugin itself holds.
        store.set_hostcall_fuel(limits.memory_bytes);
        let virtual_time = limits.virtual_time;
        store.epoch_deadline_callback(move |mut cx| {
            let s = cx.data_mut();
            if s.ticks_left > 0 {
                s.ticks_left -= 1;
                Ok(if virtual_time {
                    UpdateDeadline::Continue(1)
                } else {
                    UpdateDeadline::Yield(1)
                })
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
        // Instantiation runs the component's start code: same deadline as a call.
        let t = inst.arm_deadline();
        let wall = limits.wall_limit();
        let bound = match &compiled.inner.pre {
            Pre::V0_1_0(pre) => tokio::time::timeout(wall, pre.instantiate_async(&mut inst.store))
                .await
                .map(|r| r.map(Bound::V0_1_0)),
            Pre::V0_2_0(pre) => {
                tokio::time::timeout(wall, v0_2_0::instantiate(pre, &mut inst.store))
                    .await
                    .map(|r| r.map(Bound::V0_2_0))
            }
        };
        let bound = match bound {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return Err(inst.classify(e, t, "instantiate")),
            Err(_) => return Err(inst.abandon(t, "instantiate")),
        };
        inst.bound = Some(bound);
        let reason = inst
            .call("init", async |b, store| match b {
                Bound::V0_1_0(p) => v0_1_0::init(p, store, config).await,
                Bound::V0_2_0(p) => v0_2_0::init(p, store, config).await,
            })
            .await?;
        match reason {
            Ok(()) => Ok(inst),
            Err(reason) => Err(PluginError::Init {
                source_name: compiled.inner.name.clone(),
                reason,
            }),
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
            Pre::V0_2_0(_) => v0_2_0::PACKAGE,
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

    fn timeout(&self, started: Instant, call: &'static str) -> PluginError {
        PluginError::Timeout {
            call,
            budget_ms: self.limits.call_budget,
            ran_ms: started.elapsed().as_millis() as u64,
        }
    }

    /// A call that ran into its wall-clock deadline: the future was dropped
    /// mid-call, so the store is unusable; mark the instance dead.
    fn abandon(&mut self, started: Instant, call: &'static str) -> PluginError {
        self.bound = None;
        self.timeout(started, call)
    }

    /// Turns a failed call into a [`PluginError`] and marks the instance dead.
    fn classify(
        &mut self,
        e: wasmtime::Error,
        started: Instant,
        call: &'static str,
    ) -> PluginError {
        self.bound = None; // a trap poisons the store: never call it again
        if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            return self.timeout(started, call);
        }
        if self.store.data().limits.memory_refused {
            return PluginError::OutOfMemory {
                limit_mib: self.limits.memory_bytes >> 20,
            };
        }
        if let Some(ResourceTableError::Full) = e.root_cause().downcast_ref::<ResourceTableError>()
        {
            return PluginError::Resources {
                limit: sandbox::RESOURCES,
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

    /// Runs one call under the tick budget and the wall-clock deadline
    /// ([`PluginLimits::wall_limit`]); the deadline stops what the ticks do
    /// not see: time blocked in host calls (sleeps, clock waits).
    async fn call<T>(
        &mut self,
        name: &'static str,
        f: impl AsyncFnOnce(&Bound, &mut Store<State>) -> wasmtime::Result<T>,
    ) -> Result<T, PluginError> {
        let t = self.arm_deadline();
        let bound = self.bound.as_ref().ok_or(PluginError::Dead)?;
        let wall = self.limits.wall_limit();
        match tokio::time::timeout(wall, f(bound, &mut self.store)).await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => Err(self.classify(e, t, name)),
            Err(_) => Err(self.abandon(t, name)),
        }
    }

    /// Whether it speaks an interface that takes a candidate window of the
    /// queue (0.2.0 and later) rather than the whole queue.
    pub fn windowed(&self) -> bool {
        !matches!(self.bound, Some(Bound::V0_1_0(_)))
    }

    /// Asks the plugin to classify an arriving request.
    pub async fn admit(&mut self, req: &Request, view: &View) -> Result<Admission, PluginError> {
        self.call("admit", async |b, store| match b {
            Bound::V0_1_0(p) => v0_1_0::admit(p, store, req, view).await,
            Bound::V0_2_0(p) => v0_2_0::admit(p, store, req, view).await,
        })
        .await
    }

    /// Asks the plugin what to do now.
    pub async fn schedule(&mut self, view: &View) -> Result<Vec<Action>, PluginError> {
        self.call("schedule", async |b, store| match b {
            Bound::V0_1_0(p) => v0_1_0::schedule(p, store, view).await,
            Bound::V0_2_0(p) => v0_2_0::schedule(p, store, view).await,
        })
        .await
    }
}

#[cfg(test)]
mod tests;
