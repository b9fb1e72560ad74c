//! What a policy sees and answers, in the host's own types.
//!
//! The scheduler and the proxy speak these types only. The plugin runtime
//! converts them to and from the generated types of each interface version
//! (`wit/vX.Y.Z/`) at the plugin boundary ([`crate::plugin`]), so a new
//! interface version changes the plugin runtime, not the scheduler.
//!
//! Strings that repeat across requests (model, tenant, backend names) are
//! `Arc<str>`: building a view clones a pointer, not the text, and a version
//! that interns strings can tell equal ones apart by pointer.

use std::sync::Arc;

pub use crate::config::BackendKind;

/// Service class of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// A person is waiting for the first token.
    Realtime,
    /// Best-effort work.
    Batch,
}

impl Class {
    /// Lower-case name, for logs, labels and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Class::Realtime => "realtime",
            Class::Batch => "batch",
        }
    }

    /// Reads `X-Priority` the way the design fixes it: `realtime|rt|high`
    /// and `batch|be|low`, case-insensitive; anything else is no hint.
    pub fn from_priority_header(header: Option<&str>) -> Option<Class> {
        let v = header?.trim();
        let is = |keys: &[&str]| keys.iter().any(|k| v.eq_ignore_ascii_case(k));
        if is(&["realtime", "rt", "high"]) {
            Some(Class::Realtime)
        } else if is(&["batch", "be", "low"]) {
            Some(Class::Batch)
        } else {
            None
        }
    }
}

/// A request as it arrives, before the policy has classified it.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Host-assigned id, unique for the life of the process.
    pub id: u64,
    /// HTTP path.
    pub path: String,
    /// `model` from the body ("" when it could not be read).
    pub model: Arc<str>,
    /// Whether the response streams (Ollama's defaults applied).
    pub stream: bool,
    /// Raw `X-Priority`.
    pub priority_header: Option<String>,
    /// The host's reading of `X-Priority`.
    pub class_hint: Option<Class>,
    /// Tenant, if a tenant header is configured and present.
    pub tenant: Option<Arc<str>>,
    /// `options.num_predict` / `max_tokens`.
    pub num_predict: Option<i64>,
    /// Body size in bytes.
    pub body_bytes: u64,
    /// Arrival, in ms on the host's clock.
    pub arrival_ms: u64,
}

/// A request holding an upstream slot.
#[derive(Debug, Clone, PartialEq)]
pub struct Running {
    /// Id.
    pub id: u64,
    /// Class given at admission.
    pub class: Class,
    /// Priority given at admission.
    pub priority: f64,
    /// Model.
    pub model: Arc<str>,
    /// Tenant.
    pub tenant: Option<Arc<str>>,
    /// Index into [`View::backends`].
    pub backend: u32,
    /// `num_predict` / `max_tokens`, if the client gave it.
    pub num_predict: Option<i64>,
    /// When the client sent it.
    pub arrival_ms: u64,
    /// When it was dispatched upstream.
    pub started_ms: u64,
    /// When the upstream's first byte came, if it has.
    pub first_token_ms: Option<u64>,
    /// Response chunks (≈ tokens) so far.
    pub tokens: u64,
    /// A pre-emption would be transparent (nothing reached the client).
    pub preemptible: bool,
    /// The response has started towards the client.
    pub streaming: bool,
    /// Pre-emptions so far.
    pub preemptions: u32,
}

/// A request waiting in the host's queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    /// Id.
    pub id: u64,
    /// Class given at admission.
    pub class: Class,
    /// Priority given at admission (higher goes first).
    pub priority: f64,
    /// Model.
    pub model: Arc<str>,
    /// Tenant.
    pub tenant: Option<Arc<str>>,
    /// Whether the response streams.
    pub stream: bool,
    /// `num_predict` / `max_tokens`.
    pub num_predict: Option<i64>,
    /// When the client sent it.
    pub arrival_ms: u64,
    /// When it (last) entered the queue.
    pub enqueued_ms: u64,
    /// Pre-emptions so far.
    pub preemptions: u32,
}

/// One upstream model server (a backend of the fleet) as a policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    /// Name (`[[upstream]] name`; `default` for a single `[upstream]`).
    pub name: Arc<str>,
    /// What it speaks: a plugin may keep `/api/*` requests off OpenAI-only
    /// servers (the host does anyway).
    pub kind: BackendKind,
    /// Its slots.
    pub total_slots: u32,
    /// Of which free for new starts (0 while it is down). The arm's own
    /// [`View::free_slots`] bounds how many it may start in all.
    pub free_slots: u32,
    /// Answers its probe and accepts connections.
    pub healthy: bool,
    /// How many models it keeps loaded at once (its `max_loaded_models`;
    /// 0 = unknown): a policy can tell when a new model means an eviction.
    pub max_loaded_models: u32,
    /// Models it has loaded.
    pub loaded: Vec<LoadedModel>,
    /// Measured speed per model.
    pub speeds: Vec<ModelSpeed>,
}

impl Backend {
    /// A healthy Ollama backend with `free` of `total` slots and nothing
    /// known about its models yet.
    pub fn new(name: Arc<str>, total_slots: u32, free_slots: u32) -> Backend {
        Backend {
            name,
            kind: BackendKind::Ollama,
            total_slots,
            free_slots,
            healthy: true,
            max_loaded_models: 0,
            loaded: Vec::new(),
            speeds: Vec::new(),
        }
    }
}

/// A model loaded on a backend.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedModel {
    /// Model name.
    pub model: Arc<str>,
    /// Memory it takes, bytes (0 when unknown).
    pub size_bytes: u64,
    /// When the backend will unload it, ms on the host's clock.
    pub expires_ms: Option<u64>,
}

/// What the host measured for one model on one backend.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpeed {
    /// Model name.
    pub model: Arc<str>,
    /// Upstream time to first token, ms (moving average).
    pub ttft_ms: Option<f64>,
    /// Tokens per second while generating (moving average).
    pub tokens_per_s: Option<f64>,
}

/// Waiting requests of one class outside a view's candidate window.
#[derive(Debug, Clone, PartialEq)]
pub struct Beyond {
    /// Their class.
    pub class: Class,
    /// How many.
    pub count: u32,
    /// Arrival of the oldest.
    pub oldest_arrival_ms: Option<u64>,
    /// Highest admission priority among them.
    pub highest_priority: Option<f64>,
}

/// A snapshot of one arm's state, built for each call.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    /// Now, in ms on the host's clock.
    pub now_ms: u64,
    /// Slots the arm may use.
    pub total_slots: u32,
    /// Of those, free now.
    pub free_slots: u32,
    /// The backends, in config order ([`Running::backend`] and
    /// [`Action::Start`] index into it).
    pub backends: Vec<Backend>,
    /// Running requests, oldest start first.
    pub running: Vec<Running>,
    /// Waiting requests, oldest arrival first: all of them, or for a
    /// windowed view (interface 0.2.0) the candidate window.
    pub waiting: Vec<Waiting>,
    /// Per class, the waiting requests outside the window (empty when the
    /// view holds them all).
    pub beyond: Vec<Beyond>,
}

/// Where an admitted request goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    /// Class.
    pub class: Class,
    /// Higher is served first.
    pub priority: f64,
}

/// A refusal, answered to the client as `status` + an error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// HTTP status.
    pub status: u16,
    /// Shown to the client.
    pub message: String,
}

/// Verdict on an arriving request.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// Queue it.
    Queue(Placement),
    /// Answer it at once with an error.
    Reject(Rejection),
}

/// One scheduling action.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start a waiting request, on a backend (index) or where the host chooses.
    Start {
        /// Request id.
        id: u64,
        /// Index into [`View::backends`]; none lets the host choose.
        backend: Option<u32>,
    },
    /// Take a slot back from a running request.
    Preempt {
        /// Request id.
        id: u64,
        /// Also cut a response already streaming to its client.
        cut_streaming: bool,
    },
    /// Reject a waiting request.
    Reject {
        /// Request id.
        id: u64,
        /// Status and message.
        rejection: Rejection,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_header_mapping() {
        for v in ["realtime", "RT", "High", " rt "] {
            assert_eq!(
                Class::from_priority_header(Some(v)),
                Some(Class::Realtime),
                "{v}"
            );
        }
        for v in ["batch", "BE", "low"] {
            assert_eq!(
                Class::from_priority_header(Some(v)),
                Some(Class::Batch),
                "{v}"
            );
        }
        assert_eq!(Class::from_priority_header(Some("urgent")), None);
        assert_eq!(Class::from_priority_header(None), None);
    }
}
