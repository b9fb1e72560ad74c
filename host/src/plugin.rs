//! The WebAssembly plugin runtime: compiling, sandboxing and calling policy plugins.
//!
//! A plugin is untrusted code. Each instance runs with no filesystem, no network,
//! no environment, a memory cap ([`PluginLimits::memory_bytes`]) and a CPU budget
//! per call enforced with wasmtime epochs: one ticker thread advances the epoch
//! every millisecond and a store may run [`PluginLimits::call_budget`] ticks per
//! call before it traps. A trapped store is poisoned, so the instance is marked
//! dead and the caller (the scheduler) falls back to FIFO for that arm.
//!
//! The generated bindings live here and nowhere else; the policy data types are
//! re-exported from [`types`] so the scheduler builds the plugin's view directly,
//! with no second copy per call.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder, Trap, UpdateDeadline};
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

/// The plugins compiled into the `maitre` binary, by name (`builtin:NAME`).
const BUILTINS: &[(&str, &[u8])] = &[
    (
        "reserved-aging",
        include_bytes!(concat!(env!("MAITRE_PLUGIN_DIR"), "/reserved_aging.wasm")),
    ),
    (
        "fifo",
        include_bytes!(concat!(env!("MAITRE_PLUGIN_DIR"), "/fifo.wasm")),
    ),
    (
        "preemptive",
        include_bytes!(concat!(env!("MAITRE_PLUGIN_DIR"), "/preemptive.wasm")),
    ),
];

/// Names accepted after `builtin:` in a policy file.
pub fn builtin_names() -> Vec<&'static str> {
    BUILTINS.iter().map(|(n, _)| *n).collect()
}

/// The bytes of a built-in plugin.
pub fn builtin_bytes(name: &str) -> Option<&'static [u8]> {
    BUILTINS.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

/// Where the build put the plugin components (used by tests and benchmarks that
/// need plugin files on disk, e.g. to exercise hot reload).
pub const BUILT_PLUGIN_DIR: &str = env!("MAITRE_PLUGIN_DIR");

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
    #[error("plugin call ran past its {budget_ms} ms budget")]
    Timeout {
        /// The budget.
        budget_ms: u64,
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
        }
    }
}

struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    ticks_left: u64,
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
                builtin_bytes(b)
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
        let state = State {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(limits.memory_bytes)
                .instances(4)
                .tables(16)
                .memories(4)
                .trap_on_grow_failure(true)
                .build(),
            ticks_left: limits.call_budget,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
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
        inst.arm_deadline();
        let policy = compiled
            .inner
            .pre
            .instantiate_async(&mut inst.store)
            .await
            .map_err(|e| inst.classify(e))?;
        inst.policy = Some(policy);
        inst.arm_deadline();
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
            Err(e) => Err(inst.classify(e)),
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
    fn arm_deadline(&mut self) {
        self.store.data_mut().ticks_left = self.limits.call_budget;
        self.store.set_epoch_deadline(1);
    }

    fn classify(&mut self, e: wasmtime::Error) -> PluginError {
        self.policy = None; // a trap poisons the store: never call it again
        if let Some(trap) = e.downcast_ref::<Trap>() {
            if *trap == Trap::Interrupt {
                return PluginError::Timeout {
                    budget_ms: self.limits.call_budget,
                };
            }
        }
        let text = format!("{e:#}");
        if text.contains("forcing trap when growing memory")
            || text.contains("memory") && text.contains("limit")
        {
            return PluginError::OutOfMemory {
                limit_mib: self.limits.memory_bytes >> 20,
            };
        }
        PluginError::Trap(text)
    }

    /// The plugin's name, for logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Asks the plugin to classify an arriving request.
    pub async fn admit(&mut self, req: &Request, view: &View) -> Result<Admission, PluginError> {
        self.arm_deadline();
        let policy = self.policy.as_ref().ok_or(PluginError::Dead)?;
        let outer = Duration::from_millis(self.limits.call_budget * 4 + 100);
        match tokio::time::timeout(outer, policy.call_admit(&mut self.store, req, view)).await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => Err(self.classify(e)),
            Err(_) => {
                self.policy = None;
                Err(PluginError::Timeout {
                    budget_ms: self.limits.call_budget,
                })
            }
        }
    }

    /// Asks the plugin what to do now.
    pub async fn schedule(&mut self, view: &View) -> Result<Vec<Action>, PluginError> {
        self.arm_deadline();
        let policy = self.policy.as_ref().ok_or(PluginError::Dead)?;
        let outer = Duration::from_millis(self.limits.call_budget * 4 + 100);
        match tokio::time::timeout(outer, policy.call_schedule(&mut self.store, view)).await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => Err(self.classify(e)),
            Err(_) => {
                self.policy = None;
                Err(PluginError::Timeout {
                    budget_ms: self.limits.call_budget,
                })
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

/// Path of a built plugin component on disk, e.g. `built_plugin_path("fifo")`.
pub fn built_plugin_path(crate_name: &str) -> PathBuf {
    Path::new(BUILT_PLUGIN_DIR).join(format!("{}.wasm", crate_name.replace('-', "_")))
}
