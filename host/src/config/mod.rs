//! The policy file: parsing, defaults and validation.
//!
//! Every error a user can see names the file, the line, the key and what to do,
//! because a policy file is edited by hand while traffic flows (hot reload keeps
//! the old policy when the new file is wrong, and shows this message).
//!
//! This module holds the types the rest of maitre uses; `parse.rs` reads the
//! TOML into them.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

mod models;
mod parse;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_fleet;
mod upstream;

pub use models::{ModelRule, ModelRules};
pub use parse::{DEFAULT_TRACE_KEEP, DEFAULT_TRACE_ROTATE_BYTES, parse_upstream_url};
pub use upstream::DEFAULT_BACKEND_NAME;

/// Default client listener: Ollama's port + 1, so clients set `OLLAMA_HOST=127.0.0.1:11435`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:11435";
/// Default upstream: a local Ollama.
pub const DEFAULT_UPSTREAM: &str = "http://127.0.0.1:11434";

/// Where a plugin's WebAssembly comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginSource {
    /// One of the plugins built into the `maitre` binary (`builtin:NAME`).
    Builtin(String),
    /// A `.wasm` component on disk (resolved against the policy file's folder).
    File(PathBuf),
}

impl std::fmt::Display for PluginSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginSource::Builtin(name) => write!(f, "builtin:{name}"),
            PluginSource::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// One `[[policy]]` arm.
#[derive(Debug, Clone, PartialEq)]
pub struct ArmConfig {
    /// Unique name, shown in `X-Maitre-Arm`, logs and metrics.
    pub name: String,
    /// The plugin that decides for this arm.
    pub plugin: PluginSource,
    /// Share of traffic in an A/B test (0 drains the arm).
    pub weight: u32,
    /// The `[policy.config]` table, flattened to key/value strings for `init`.
    pub config: Vec<(String, String)>,
    /// A shadow arm takes no traffic: its plugin is shown the first serving
    /// arm's view at every decision and its answers are compared, never acted on.
    pub shadow: bool,
    /// 1-based line of the `[[policy]]` entry, to point errors at it.
    pub line: usize,
}

/// How traffic is split between arms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AbMode {
    /// Each request is assigned an arm by weight (sticky per client key); each
    /// arm schedules its own share of the slots, proportional to its weight.
    #[default]
    Weighted,
    /// All traffic goes to one arm at a time, switching every `window_seconds`
    /// in proportion to the weights; the active arm owns every slot.
    Switchback,
}

/// The `[ab]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct AbConfig {
    /// Weighted split or switchback.
    pub mode: AbMode,
    /// Header whose value keeps one client in one arm (else the client address).
    pub key_header: String,
    /// Length of one switchback window.
    pub window_seconds: f64,
}

/// Limits that protect the host; each has a unit and a reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Requests that may wait at once, over all arms; beyond it: 503 + Retry-After.
    pub max_waiting: usize,
    /// Largest request body accepted (bytes); beyond it: 413. Ollama bodies with
    /// images can be tens of MB.
    pub max_body_bytes: usize,
    /// Period of the scheduling tick (ms) that lets policies age waiting requests.
    pub tick_ms: u64,
    /// CPU budget of one plugin call (ms), enforced with wasmtime epochs;
    /// every call (`init` included) also has a wall-clock deadline of
    /// 1.25 × this + 25 ms, so time blocked in WASI counts too.
    pub plugin_call_ms: u64,
    /// Memory cap of one plugin instance (MiB).
    pub plugin_memory_mib: usize,
    /// Most times one request may be pre-empted, so nothing livelocks.
    pub max_preemptions: u32,
    /// A plugin that leaves slots free while requests wait for this long (ms)
    /// is ejected for its arm.
    pub starvation_ms: u64,
    /// Seconds the `Retry-After` header suggests on every 503 and 429 maitre
    /// answers itself.
    pub retry_after_seconds: u64,
    /// A client must send its request headers within this many seconds, so a
    /// slow client cannot hold a socket forever.
    pub header_read_timeout_seconds: u64,
    /// A scheduled request's body must arrive within this many seconds (408).
    pub body_read_timeout_seconds: u64,
    /// Waiting requests a 0.2.0 plugin sees per call (per class the oldest
    /// and the highest-priority); the rest are summarised, so a call costs
    /// the same at 100 or 10,000 waiting. 64 by default: most decisions
    /// follow a completion and get the whole window, and at 128 copying it
    /// into the sandbox cost a tenth of the throughput at 256 connections.
    pub candidate_window: usize,
    /// Request bodies maitre may hold at once (bytes), over every request
    /// being read or waiting; beyond it: 503 + Retry-After. Without it, many
    /// clients each sending a body under `max_body_bytes` exhaust memory.
    /// At least `max_body_bytes`, so any body that fits one request can fit.
    pub max_total_body_bytes: usize,
    /// Client connections open at once; beyond it maitre stops accepting
    /// until one closes (new clients wait in the kernel's listen queue,
    /// costing maitre nothing). Lowered at start to what the open-file limit
    /// allows.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_waiting: 10_000,
            max_body_bytes: 64 * 1024 * 1024,
            tick_ms: 250,
            plugin_call_ms: 50,
            plugin_memory_mib: 64,
            max_preemptions: 2,
            starvation_ms: 2_000,
            retry_after_seconds: 1,
            header_read_timeout_seconds: 30,
            body_read_timeout_seconds: 60,
            candidate_window: 64,
            max_total_body_bytes: 256 * 1024 * 1024,
            max_connections: 4096,
        }
    }
}

/// One backend: the `[upstream]` table, or one `[[upstream]]` entry of a fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Unique name, shown in `/status`, metrics (`backend` label) and
    /// `X-Maitre-Backend`; `default` for a single unnamed `[upstream]`.
    pub name: String,
    /// Base URL, e.g. `http://127.0.0.1:11434`.
    pub url: http::Uri,
    /// Parallel slots (= `OLLAMA_NUM_PARALLEL`).
    pub slots: u32,
    /// Models the server keeps loaded at once (= `OLLAMA_MAX_LOADED_MODELS`):
    /// the host's choice counts a backend below it as having room to load one
    /// more without evicting.
    pub max_loaded_models: u32,
    /// TCP connect timeout (ms): an unreachable upstream answers 502 quickly.
    pub connect_timeout_ms: u64,
    /// Longest wait for the upstream's response headers (s). Ollama sends them
    /// only with the first token, after any model load, so this must be long.
    pub first_byte_timeout_seconds: u64,
    /// What the server speaks: Ollama, or only the OpenAI-compatible `/v1`
    /// API (llama-server, vLLM, LM Studio).
    pub kind: BackendKind,
    /// Whether (and in which engine's convention) maitre adds a per-request
    /// priority, mapped from the request's class, to the `/v1` bodies it
    /// sends this backend; off by default.
    pub pass_priority: Option<PassPriority>,
    /// `busy_check`: before a request is sent, maitre reads the engine's own
    /// count of busy slots and waits until one is free, so an engine that
    /// frees a slot after it closed the connection of a cancelled
    /// generation is never sent more than it has slots. `None`: no check.
    pub busy_check: Option<BusyCheck>,
}

/// Where an engine tells its busy slots (`busy_check` of an upstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusyCheck {
    /// `"llama-server"`: `GET /slots`, the slots with `is_processing`.
    Slots,
    /// `"metrics"`: `GET /metrics` (Prometheus text), the gauge of running
    /// requests: llama-server's `llamacpp:requests_processing` (with
    /// `--metrics`) or vLLM's `vllm:num_requests_running`.
    Metrics,
}

/// What an upstream server speaks (`kind` of an `[upstream]`). It decides
/// how maitre watches it (probe, model list) and which requests may go to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// An Ollama server: `/api/*` and `/v1/*`, health from `/api/version`,
    /// loaded models from `/api/ps`.
    #[default]
    Ollama,
    /// An OpenAI-compatible server (llama.cpp's `llama-server`, vLLM, LM
    /// Studio): `/v1/*` only, health from `/health`, models from
    /// `/v1/models`; `/api/*` requests are answered 404 by maitre.
    #[serde(rename = "openai")]
    OpenAi,
}

impl BackendKind {
    /// Every kind, as written in a policy file.
    pub const NAMES: [&'static str; 2] = ["ollama", "openai"];

    /// The name written in a policy file and shown in `/status`.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Ollama => "ollama",
            BackendKind::OpenAi => "openai",
        }
    }

    /// From its name in a policy file.
    pub fn from_name(s: &str) -> Option<BackendKind> {
        match s {
            "ollama" => Some(BackendKind::Ollama),
            "openai" => Some(BackendKind::OpenAi),
            _ => None,
        }
    }

    /// Whether a request to `path` may go to a server of this kind: an
    /// OpenAI-compatible server has no Ollama `/api/*` routes.
    pub fn serves(self, path: &str) -> bool {
        self == BackendKind::Ollama || !path.starts_with("/api/")
    }
}

/// The per-request priority convention maitre writes into `/v1` bodies
/// (`pass_priority` of an `[upstream]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassPriority {
    /// vLLM's integer `priority` body field (with `--scheduling-policy
    /// priority`): LOWER values are scheduled first, 0 is the default.
    /// Real-time requests get [`PassPriority::VLLM_REALTIME`], batch ones
    /// [`PassPriority::VLLM_BATCH`].
    Vllm,
}

impl PassPriority {
    /// vLLM `priority` of a real-time request: vLLM's default, so it ties
    /// with clients that reach vLLM directly and send none.
    pub const VLLM_REALTIME: i64 = 0;
    /// vLLM `priority` of a batch request: after every real-time one.
    pub const VLLM_BATCH: i64 = 1;

    /// The value written for a request of `class`.
    pub fn value(self, class: crate::policy::Class) -> i64 {
        match (self, class) {
            (PassPriority::Vllm, crate::policy::Class::Realtime) => Self::VLLM_REALTIME,
            (PassPriority::Vllm, crate::policy::Class::Batch) => Self::VLLM_BATCH,
        }
    }
}

/// The `[trace]` table: where maitre records one JSON line per scheduled
/// request (no prompt, no body), for `maitre simulate` and for people.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceConfig {
    /// The trace file (relative paths are resolved against the policy file's
    /// folder); lines are appended.
    pub path: PathBuf,
    /// Once the file passes this size (bytes) it is renamed to `PATH.1`
    /// (older ones to `.2`, ...) and a new file is started.
    pub rotate_bytes: u64,
    /// Rotated files kept (`PATH.1` .. `PATH.keep`); older ones are deleted.
    pub keep: u32,
}

/// The `[fleet]` table: how maitre watches its backends.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    /// Period of the health probe (`GET /api/version`) of each backend (ms;
    /// 0 = off, the default for a single backend). A backend that fails it
    /// (or refuses a connection) gets no new requests until it answers again.
    pub probe_interval_ms: u64,
    /// Period of the `/api/ps` poll that tells which models each backend
    /// has loaded (ms; 0 = off, the default for a single backend).
    pub ps_interval_ms: u64,
    /// Most times one request is moved to another backend after its backend
    /// failed before anything reached the client.
    pub max_failovers: u32,
}

impl Default for FleetConfig {
    /// A fleet's defaults: probes every 2 s, polls every 5 s.
    fn default() -> Self {
        FleetConfig {
            probe_interval_ms: 2_000,
            ps_interval_ms: 5_000,
            max_failovers: 2,
        }
    }
}

/// A validated policy file.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it came from (for messages and hot reload).
    pub path: PathBuf,
    /// Client listener.
    pub listen: SocketAddr,
    /// Admin listener (metrics, status, control).
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token required by mutating admin endpoints.
    pub admin_token: Option<String>,
    /// Header carrying a tenant name, passed to plugins.
    pub tenant_header: Option<String>,
    /// The model servers (backends), at least one, in file order.
    pub upstreams: Vec<UpstreamConfig>,
    /// How the backends are watched.
    pub fleet: FleetConfig,
    /// Host limits.
    pub limits: Limits,
    /// A/B settings.
    pub ab: AbConfig,
    /// The policy arms, at least one.
    pub arms: Vec<ArmConfig>,
    /// Request tracing, when the file has a `[trace]` table.
    pub trace: Option<TraceConfig>,
    /// `[models."NAME"]`: settings written into every request for a model.
    pub models: ModelRules,
}

impl Config {
    /// Slots over every backend: what the A/B arms share.
    pub fn total_slots(&self) -> u32 {
        self.upstreams.iter().map(|u| u.slots).sum()
    }

    /// Points a single-backend config at another URL (`--upstream`, `--demo`).
    /// A fleet has no one upstream to replace: that is refused, saying so.
    pub fn override_upstream(&mut self, url: http::Uri) -> Result<(), String> {
        match self.upstreams.as_mut_slice() {
            [one] => {
                one.url = url;
                Ok(())
            }
            many => Err(format!(
                "{} lists {} backends ({}); --upstream replaces the URL of a single [upstream] only: edit the [[upstream]] entries instead",
                self.path.display(),
                many.len(),
                many.iter()
                    .map(|u| u.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

/// What is wrong with a policy file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read policy file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A key is missing, misspelt or has a bad value.
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The key (with its table), e.g. `upstream.slots`.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}
