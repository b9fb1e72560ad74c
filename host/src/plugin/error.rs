//! Why a plugin could not be loaded or called, classified by what happened.

use std::path::PathBuf;

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
        "{source_name} does not implement a policy interface this maitre supports ({}; see wit/): {reason}", super::SUPPORTED.join(", ")
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
    /// The call ran past its time budget: its CPU ticks, or its wall-clock
    /// deadline (time blocked in host calls, e.g. a sleep, counts too).
    #[error(
        "plugin {call} ran past its {budget_ms} ms CPU budget (or its wall-clock deadline) and was stopped after {ran_ms} ms; raise [limits] plugin_call_ms or make the plugin return sooner"
    )]
    Timeout {
        /// The call: `instantiate`, `init`, `admit` or `schedule`.
        call: &'static str,
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
    /// The plugin held more WASI resources (streams, pollables, ...) at once
    /// than the sandbox allows.
    #[error("plugin exceeded its cap of {limit} WASI resources held at once")]
    Resources {
        /// The cap.
        limit: usize,
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
            PluginError::Resources { .. } => "resources",
            PluginError::Trap(_) => "trap",
            PluginError::Dead => "dead",
            PluginError::Starvation { .. } => "starvation",
            PluginError::Invalid { .. } => "invalid",
        }
    }
}
