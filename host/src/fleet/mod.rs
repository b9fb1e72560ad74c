//! The fleet: the Ollama servers (backends) maitre schedules for, as the
//! scheduler keeps them.
//!
//! The scheduler task owns one [`Fleet`]: per backend its slots and how many
//! are busy, whether it is healthy, and which models it has loaded
//! ([`residency`]). A policy decides which request starts; when it names no
//! backend, the host chooses one ([`Fleet::choose`]): a backend with a free
//! slot where the request's model is already loaded, else one with a free
//! slot and room to load it, else the least busy one with a free slot.
//!
//! A backend that is down gets no new starts. When every backend is down the
//! fleet stops sheltering anyone: requests are dispatched anyway and fail
//! fast (502), as they would against a single unreachable upstream, rather
//! than wait for a backend that may never come back.
//!
//! Health and residency are kept fresh by probes and `/api/ps` polls
//! ([`watch`]), and by the traffic itself.

pub mod residency;
pub mod speed;
pub mod watch;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::config::{BackendKind, UpstreamConfig};
use crate::metrics::{BackendLabel, Metrics};
use crate::policy;

pub use residency::{PsModel, Residency, model_key};

/// What the scheduler needs to know of one backend.
#[derive(Debug, Clone)]
pub struct BackendSpec {
    /// Unique name (metrics, `/status`, `X-Maitre-Backend`).
    pub name: Arc<str>,
    /// Base URL, for `/status`.
    pub url: String,
    /// Parallel slots.
    pub slots: u32,
    /// Models it keeps loaded at once.
    pub max_loaded_models: u32,
    /// What it speaks.
    pub kind: BackendKind,
}

impl BackendSpec {
    /// From a config entry.
    pub fn from_config(u: &UpstreamConfig) -> BackendSpec {
        BackendSpec {
            name: u.name.as_str().into(),
            url: u.url.to_string(),
            slots: u.slots,
            max_loaded_models: u.max_loaded_models,
            kind: u.kind,
        }
    }

    /// One backend of `slots` slots (tests, benches, simulations).
    pub fn single(name: &str, slots: u32) -> BackendSpec {
        BackendSpec {
            name: name.into(),
            url: String::new(),
            slots,
            max_loaded_models: 3,
            kind: BackendKind::Ollama,
        }
    }
}

/// One backend's state.
#[derive(Debug)]
struct Backend {
    spec: BackendSpec,
    busy: u32,
    healthy: bool,
    /// `/api/version` from its last good probe.
    version: Option<String>,
    resident: Residency,
    /// Measured TTFT and tokens/s per model.
    speeds: speed::Speeds,
    /// Models of the requests running on it, with their counts: loaded (or
    /// loading) there now, whatever the last poll said.
    running: HashMap<Arc<str>, u32>,
    /// The models an OpenAI-compatible server lists in `/v1/models` (keyed
    /// like [`model_key`]): it serves them without a load, so they count as
    /// loaded when choosing a backend. Empty for Ollama.
    available: Vec<Arc<str>>,
    /// The same, as the server names them (for `/status`).
    available_names: Vec<String>,
    label: BackendLabel,
}

impl Backend {
    /// Whether `model` is loaded here, or being used (so loaded or loading),
    /// or listed by an OpenAI-compatible server.
    fn has(&self, model: &str) -> bool {
        self.running.contains_key(model)
            || self.resident.has(model)
            || self.available.iter().any(|m| &**m == model)
    }

    /// Distinct models loaded or in use.
    fn models_in_memory(&self) -> usize {
        let extra = self
            .running
            .keys()
            .filter(|m| !self.resident.has(m))
            .count();
        self.resident.len() + extra
    }
}

/// Every backend, owned by the scheduler task.
pub struct Fleet {
    backends: Vec<Backend>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Which backends are up, readable without a message to the scheduler (the
/// passthrough picks a live backend with it); only the scheduler writes it.
#[derive(Debug)]
pub struct Health(Vec<AtomicBool>);

impl Health {
    /// Whether backend `b` answers.
    pub fn is_up(&self, b: usize) -> bool {
        self.0.get(b).is_some_and(|x| x.load(Ordering::Relaxed))
    }

    /// The backends that answer, in config order; every backend when none
    /// does (then none is sheltered: the first to answer wins).
    pub fn live(&self) -> Vec<usize> {
        let up: Vec<usize> = (0..self.0.len()).filter(|&b| self.is_up(b)).collect();
        if up.is_empty() {
            (0..self.0.len()).collect()
        } else {
            up
        }
    }

    fn set(&self, b: usize, up: bool) {
        if let Some(x) = self.0.get(b) {
            x.store(up, Ordering::Relaxed);
        }
    }
}

/// One backend in `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct BackendStatus {
    /// Name.
    pub name: String,
    /// What it speaks (`ollama` or `openai`).
    pub kind: BackendKind,
    /// Base URL.
    pub url: String,
    /// Slots.
    pub slots: u32,
    /// Of which in use.
    pub busy: u32,
    /// Answering its probes (and connections).
    pub healthy: bool,
    /// Its `/api/version`, once a probe has answered.
    pub version: Option<String>,
    /// Models loaded there, as the host knows it.
    pub loaded: Vec<PsModel>,
    /// Models of the requests running there.
    pub running_models: Vec<String>,
    /// Models an OpenAI-compatible server lists in `/v1/models` (empty for
    /// Ollama, whose models are in `loaded`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub available: Vec<String>,
}

impl Fleet {
    /// The backends, all healthy until a probe or a connection says otherwise.
    pub fn new(specs: Vec<BackendSpec>, metrics: Arc<Metrics>) -> Fleet {
        let backends: Vec<Backend> = specs
            .into_iter()
            .map(|spec| Backend {
                label: BackendLabel {
                    backend: spec.name.to_string(),
                },
                spec,
                busy: 0,
                healthy: true,
                version: None,
                resident: Residency::default(),
                speeds: speed::Speeds::default(),
                running: HashMap::new(),
                available: Vec::new(),
                available_names: Vec::new(),
            })
            .collect();
        for b in &backends {
            metrics
                .backend_slots
                .get_or_create(&b.label)
                .set(b.spec.slots as i64);
            metrics.backend_busy.get_or_create(&b.label).set(0);
            metrics.backend_up.get_or_create(&b.label).set(1);
            let _ = metrics.backend_requests.get_or_create(&b.label);
            let _ = metrics.backend_model_loads.get_or_create(&b.label);
            let _ = metrics.backend_failovers.get_or_create(&b.label);
        }
        let health = Arc::new(Health(
            backends.iter().map(|_| AtomicBool::new(true)).collect(),
        ));
        Fleet {
            backends,
            metrics,
            health,
        }
    }

    /// The backends' health, shared with the proxy.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// How many backends there are.
    pub fn len(&self) -> usize {
        self.backends.len()
    }

    /// Whether there are none (never, in a running host).
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// Slots over every backend.
    pub fn total_slots(&self) -> u32 {
        self.backends.iter().map(|b| b.spec.slots).sum()
    }

    /// A backend's name.
    pub fn name(&self, b: usize) -> &Arc<str> {
        &self.backends[b].spec.name
    }

    /// Whether backend `b` may take new starts: it is healthy, or no
    /// backend is (then none is sheltered, see the module doc).
    fn usable(&self, b: usize) -> bool {
        self.backends[b].healthy || self.backends.iter().all(|b| !b.healthy)
    }

    /// Free slots of backend `b` that new starts may take.
    pub fn free(&self, b: usize) -> u32 {
        if !self.usable(b) {
            return 0;
        }
        let x = &self.backends[b];
        x.spec.slots.saturating_sub(x.busy)
    }

    /// What backend `b` speaks.
    pub fn kind(&self, b: usize) -> BackendKind {
        self.backends[b].spec.kind
    }

    /// Free slots of backend `b` for a request to `path`: none when it
    /// does not speak that API (an `/api/*` request on an OpenAI-compatible
    /// server). Among the backends that do, the unhealthy ones are
    /// sheltered unless none of them is healthy (then the request fails
    /// fast, as against a lone unreachable backend).
    pub fn free_for(&self, b: usize, path: &str) -> u32 {
        let x = &self.backends[b];
        if !x.spec.kind.serves(path) {
            return 0;
        }
        let usable = x.healthy
            || !self
                .backends
                .iter()
                .any(|o| o.healthy && o.spec.kind.serves(path));
        if !usable {
            return 0;
        }
        x.spec.slots.saturating_sub(x.busy)
    }

    /// The first backend that speaks `path`'s API, free or not: where a
    /// request goes when nothing better is free.
    pub fn first_serving(&self, path: &str) -> Option<usize> {
        self.backends.iter().position(|b| b.spec.kind.serves(path))
    }

    /// Free slots over the backends that may take new starts.
    pub fn free_total(&self) -> u32 {
        (0..self.backends.len()).map(|b| self.free(b)).sum()
    }

    /// Whether a backend other than `b` is healthy: a request that failed on
    /// `b` has somewhere else to go.
    pub fn other_healthy(&self, b: usize) -> bool {
        self.backends
            .iter()
            .enumerate()
            .any(|(i, x)| i != b && x.healthy)
    }

    /// The host's choice for a request to `path` for `model`: among
    /// backends that speak its API with a free slot, one where the model is
    /// loaded (or in use, or listed by an OpenAI-compatible server), else
    /// one with room to load it (below its `max_loaded_models`), else any;
    /// the least busy (by share of its slots) within each tier, the first
    /// listed on a tie. None when no such backend has a free slot.
    pub fn choose(&self, model: &str, path: &str) -> Option<usize> {
        let key = model_key(model);
        (0..self.backends.len())
            .filter(|&b| self.free_for(b, path) > 0)
            .min_by(|&x, &y| {
                let rank = |b: usize| {
                    let be = &self.backends[b];
                    let tier = if !key.is_empty() && be.has(&key) {
                        0
                    } else if be.models_in_memory() < be.spec.max_loaded_models as usize {
                        1
                    } else {
                        2
                    };
                    (tier, be.busy as f64 / be.spec.slots.max(1) as f64)
                };
                let (tx, bx) = rank(x);
                let (ty, by) = rank(y);
                tx.cmp(&ty).then(bx.total_cmp(&by)).then(x.cmp(&y))
            })
    }

    /// A request for `model` starts on backend `b`.
    pub fn acquire(&mut self, b: usize, model: &Arc<str>) {
        let x = &mut self.backends[b];
        x.busy += 1;
        if !model.is_empty() {
            *x.running.entry(model_key(model)).or_insert(0) += 1;
        }
        self.metrics
            .backend_busy
            .get_or_create(&x.label)
            .set(x.busy as i64);
        self.metrics.backend_requests.get_or_create(&x.label).inc();
    }

    /// A request for `model` let go of its slot on backend `b`; `completed`
    /// says it was answered, so its model is loaded there.
    pub fn release(&mut self, b: usize, model: &Arc<str>, completed: bool) {
        let x = &mut self.backends[b];
        x.busy = x.busy.saturating_sub(1);
        self.metrics
            .backend_busy
            .get_or_create(&x.label)
            .set(x.busy as i64);
        if model.is_empty() {
            return;
        }
        let key = model_key(model);
        if let Some(n) = x.running.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                x.running.remove(&key);
            }
        }
        if completed {
            // It answered: it is up (a single backend has no probe to say so).
            if !x.healthy {
                x.healthy = true;
                self.health.set(b, true);
                self.metrics.backend_up.get_or_create(&x.label).set(1);
                tracing::info!(backend = %x.spec.name, "backend answered again: it takes new requests");
            }
            let running = &x.running;
            let max = x.spec.max_loaded_models as usize;
            if x.resident
                .note_used(&key, max, &|m| running.contains_key(m))
            {
                self.metrics
                    .backend_model_loads
                    .get_or_create(&x.label)
                    .inc();
            }
        }
    }

    /// A probe (or a refused connection) says whether backend `b` answers.
    /// Returns true when that changed.
    pub fn set_health(&mut self, b: usize, up: bool, version: Option<String>) -> bool {
        let x = &mut self.backends[b];
        if version.is_some() {
            x.version = version;
        }
        let changed = x.healthy != up;
        x.healthy = up;
        self.health.set(b, up);
        self.metrics
            .backend_up
            .get_or_create(&x.label)
            .set(up as i64);
        if changed {
            if up {
                tracing::info!(backend = %x.spec.name, url = %x.spec.url, "backend is up again: it takes new requests");
            } else {
                tracing::warn!(backend = %x.spec.name, url = %x.spec.url, "backend is down: no new requests go to it until it answers again");
            }
        }
        changed
    }

    /// One request moved away from backend `b` after it failed there.
    pub fn count_failover(&self, b: usize) {
        let x = &self.backends[b];
        self.metrics.backend_failovers.get_or_create(&x.label).inc();
    }

    /// An `/api/ps` answer for backend `b`, to a poll sent at `sent_at`.
    pub fn apply_poll(&mut self, b: usize, sent_at: tokio::time::Instant, models: Vec<PsModel>) {
        let x = &mut self.backends[b];
        let loads = x.resident.apply_poll(sent_at, models);
        if loads > 0 {
            self.metrics
                .backend_model_loads
                .get_or_create(&x.label)
                .inc_by(loads as u64);
        }
    }

    /// A `/v1/models` answer for OpenAI-compatible backend `b`: the models
    /// it serves. Its residency is known from traffic only (such a server
    /// has no `/api/ps`).
    pub fn apply_models(&mut self, b: usize, models: Vec<String>) {
        if let Some(x) = self.backends.get_mut(b) {
            x.available = models.iter().map(|m| model_key(m)).collect();
            x.available_names = models;
        }
    }

    /// The backends as a policy sees them: every backend's slots, and its
    /// free slots new starts may take.
    pub fn policy_view(&self, now_ms: u64) -> Vec<policy::Backend> {
        self.backends
            .iter()
            .enumerate()
            .map(|(i, b)| policy::Backend {
                name: b.spec.name.clone(),
                kind: b.spec.kind,
                total_slots: b.spec.slots,
                free_slots: self.free(i),
                healthy: b.healthy,
                max_loaded_models: b.spec.max_loaded_models,
                loaded: self
                    .loaded(i)
                    .into_iter()
                    .map(|(model, size_bytes, left)| policy::LoadedModel {
                        model,
                        size_bytes,
                        expires_ms: left.map(|l| now_ms.saturating_add(l.as_millis() as u64)),
                    })
                    .collect(),
                speeds: b.speeds.view(),
            })
            .collect()
    }

    /// A request for `model` completed on backend `b` (see
    /// [`speed::Speeds::observe`]).
    pub fn observe_speed(
        &mut self,
        b: usize,
        model: &str,
        ttft: Option<Duration>,
        tokens: u64,
        generating: Option<Duration>,
    ) {
        if let Some(x) = self.backends.get_mut(b) {
            x.speeds
                .observe(&model_key(model), ttft, tokens, generating);
        }
    }

    /// Whether backend `b` answers (its probe, its connections).
    pub fn is_healthy(&self, b: usize) -> bool {
        self.backends[b].healthy
    }

    /// The models loaded on backend `b` as a policy may see them: name,
    /// size in bytes (0 when unknown) and time left before it expires (None
    /// when unknown); models of running requests, and the models an OpenAI-compatible
    /// server lists, count as loaded.
    pub fn loaded(&self, b: usize) -> Vec<(Arc<str>, u64, Option<std::time::Duration>)> {
        let x = &self.backends[b];
        let mut out = x.resident.loaded();
        // Models of running requests, and those an OpenAI-compatible server
        // lists (it serves them without a load), count as loaded too.
        for m in x.running.keys().chain(&x.available) {
            if !out.iter().any(|(n, _, _)| n == m) {
                out.push((m.clone(), 0, None));
            }
        }
        out
    }

    /// Every backend, for `/status`.
    pub fn status(&self) -> Vec<BackendStatus> {
        self.backends
            .iter()
            .map(|b| {
                let mut running_models: Vec<String> =
                    b.running.keys().map(|m| m.to_string()).collect();
                running_models.sort();
                BackendStatus {
                    name: b.spec.name.to_string(),
                    kind: b.spec.kind,
                    url: b.spec.url.clone(),
                    slots: b.spec.slots,
                    busy: b.busy,
                    healthy: b.healthy,
                    version: b.version.clone(),
                    loaded: b.resident.snapshot(),
                    running_models,
                    available: b.available_names.clone(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
