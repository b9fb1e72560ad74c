//! Model residency, so tests and benches can see swaps: which models are
//! loaded, loading one that is not (it takes [`ModelConfig::load_time`], and
//! loads run one at a time, as in Ollama), a limit on loaded models
//! ([`ModelConfig::max_loaded`]) with the least recently used one evicted,
//! and `/api/ps`, `/api/tags` and `/v1/models` in Ollama's shape.
//!
//! A request that needs a model waits for it here before it asks for a
//! slot: Ollama's scheduler loads the runner first, then the request waits
//! on the runner's slots. Concurrent requests for a model being loaded wait
//! for that one load.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::ModelConfig;
use crate::state::full_name;
use crate::util;

/// One loaded (or loading) model.
#[derive(Clone, Copy, Debug)]
struct Resident {
    /// When it is unloaded if unused (`keep_alive`).
    expires: SystemTime,
    /// Last time a request used it (for LRU eviction).
    last_used: Instant,
    /// When its load is done (in the past once loaded).
    ready_at: Instant,
    /// The context it was loaded with: a request asking for another one
    /// reloads it, as Ollama does (ollama#7773).
    num_ctx: u64,
}

/// The models loaded on this server.
#[derive(Debug)]
pub(crate) struct Residency {
    models: BTreeMap<String, Resident>,
    /// When the load in progress (if any) ends: loads run one at a time.
    loads_free_at: Instant,
    /// Loads since the start (preloaded models not counted).
    loads: u64,
}

impl Residency {
    /// The models of [`ModelConfig::preloaded`], loaded already.
    pub fn new(cfg: &ModelConfig) -> Residency {
        let now = Instant::now();
        let expires = util::expiry(None);
        let models = cfg
            .preloaded
            .iter()
            .map(|m| {
                let r = Resident {
                    expires,
                    last_used: now,
                    ready_at: now,
                    num_ctx: util::CONTEXT_LENGTH,
                };
                (full_name(m), r)
            })
            .collect();
        Residency {
            models,
            loads_free_at: now,
            loads: 0,
        }
    }

    /// A request uses `model` with `keep_alive` and `num_ctx` (the default
    /// context when `None`): returns when it is ready (now if it is loaded
    /// with that context). A model not loaded starts loading after the load
    /// in progress, evicting the least recently used model when `max_loaded`
    /// are loaded already; one loaded with another context is reloaded.
    pub fn use_model(
        &mut self,
        cfg: &ModelConfig,
        model: &str,
        keep_alive: Option<&Value>,
        num_ctx: Option<u64>,
    ) -> Instant {
        let num_ctx = num_ctx.unwrap_or(util::CONTEXT_LENGTH);
        let now = Instant::now();
        let wall = SystemTime::now();
        self.models
            .retain(|_, r| r.expires > wall || r.ready_at > now);
        let name = full_name(model);
        let expires = util::expiry(keep_alive);
        if let Some(r) = self.models.get_mut(&name) {
            r.last_used = now;
            r.expires = expires;
            if r.num_ctx == num_ctx {
                return r.ready_at;
            }
            // Another context: Ollama restarts the runner.
            r.num_ctx = num_ctx;
            r.ready_at = self.loads_free_at.max(now) + cfg.load_time;
            self.loads_free_at = r.ready_at;
            self.loads += 1;
            return r.ready_at;
        }
        while self.models.len() >= cfg.max_loaded.max(1) {
            let lru = self
                .models
                .iter()
                .min_by_key(|(_, r)| r.last_used)
                .map(|(k, _)| k.clone());
            match lru {
                Some(k) => self.models.remove(&k),
                None => break,
            };
        }
        let ready_at = self.loads_free_at.max(now) + cfg.load_time;
        self.loads_free_at = ready_at;
        self.loads += 1;
        self.models.insert(
            name,
            Resident {
                expires,
                last_used: now,
                ready_at,
                num_ctx,
            },
        );
        ready_at
    }

    /// `keep_alive: 0`: unload it.
    pub fn unload(&mut self, model: &str) {
        self.models.remove(&full_name(model));
    }

    /// Loaded models (loading ones too, as Ollama lists them) with their
    /// expiry, the one to expire last first.
    pub fn loaded(&self) -> Vec<(String, SystemTime)> {
        let wall = SystemTime::now();
        let now = Instant::now();
        let mut v: Vec<_> = self
            .models
            .iter()
            .filter(|(_, r)| r.expires > wall || r.ready_at > now)
            .map(|(k, r)| (k.clone(), r.expires))
            .collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        v
    }

    /// Loads since the start.
    pub fn loads(&self) -> u64 {
        self.loads
    }
}

/// `GET /api/ps`.
pub(crate) fn ps(loaded: &[(String, SystemTime)]) -> Value {
    let models: Vec<Value> = loaded
        .iter()
        .map(|(name, expires)| {
            json!({
                "name": name,
                "model": name,
                "size": util::MODEL_SIZE + 200_000_000,
                "size_vram": util::MODEL_SIZE + 200_000_000,
                "digest": util::DIGEST.trim_start_matches("sha256:"),
                "details": crate::routes::details(),
                "expires_at": util::rfc3339(*expires),
                "context_length": util::CONTEXT_LENGTH,
            })
        })
        .collect();
    json!({ "models": models })
}

/// `GET /api/tags`: the models on disk ([`ModelConfig::models`]).
pub(crate) fn tags(cfg: &ModelConfig) -> Value {
    let models: Vec<Value> = cfg
        .models
        .iter()
        .map(|m| {
            let name = full_name(m);
            json!({
                "name": name,
                "model": name,
                "modified_at": "2026-01-01T00:00:00.000000Z",
                "size": util::MODEL_SIZE,
                "digest": util::DIGEST.trim_start_matches("sha256:"),
                "details": crate::routes::details(),
            })
        })
        .collect();
    json!({ "models": models })
}

/// Whether `model` is on disk ([`ModelConfig::models`]): `/api/show` knows
/// only those, as Ollama's does.
pub(crate) fn on_disk(cfg: &ModelConfig, model: &str) -> bool {
    let name = full_name(model);
    cfg.models.iter().any(|m| full_name(m) == name)
}

/// `GET /v1/models`.
pub(crate) fn oa_models(cfg: &ModelConfig) -> Value {
    let data: Vec<Value> = cfg.models.iter().map(|m| oa_model(m)).collect();
    json!({ "object": "list", "data": data })
}

/// One `/v1/models` entry.
pub(crate) fn oa_model(name: &str) -> Value {
    json!({
        "id": full_name(name),
        "object": "model",
        "created": 1_767_225_600u64,
        "owned_by": "library",
    })
}
