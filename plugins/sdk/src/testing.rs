//! Builders of hand-made requests and views, for unit-testing a policy's
//! decisions natively (`cargo test`) without a host. [`view`] has one
//! backend and one model name, `view.names[0]` ("m"); [`fleet`] has several
//! backends and the models `m0`, `m1`, ... (index = name id).

use crate::{Action, Backend, Class, LoadedModel, Request, Running, View, Waiting};

/// A request with the given id, arrival time and class hint; everything else empty.
pub fn request(id: u64, arrival_ms: u64, class_hint: Option<Class>) -> Request {
    Request {
        id,
        path: "/api/generate".into(),
        model: "m".into(),
        stream: true,
        priority_header: None,
        class_hint,
        tenant: None,
        num_predict: None,
        body_bytes: 0,
        arrival_ms,
    }
}

/// A waiting request that arrived (and was enqueued) at `arrival_ms`.
pub fn waiting(id: u64, class: Class, priority: f64, arrival_ms: u64) -> Waiting {
    Waiting {
        id,
        class,
        priority,
        model: 0,
        tenant: None,
        stream: true,
        num_predict: None,
        arrival_ms,
        enqueued_ms: arrival_ms,
        preemptions: 0,
    }
}

/// A running request started at `started_ms` that is still pre-emptible
/// (nothing sent to its client yet) and has received no tokens.
pub fn running(id: u64, class: Class, priority: f64, started_ms: u64) -> Running {
    Running {
        id,
        class,
        priority,
        model: 0,
        tenant: None,
        num_predict: None,
        backend: 0,
        arrival_ms: started_ms,
        started_ms,
        first_token_ms: None,
        tokens: 0,
        preemptible: true,
        streaming: false,
        preemptions: 0,
    }
}

/// A view at `now_ms` of one backend with `total_slots`, whose free slots are
/// those not taken by `running`.
pub fn view(now_ms: u64, total_slots: u32, running: Vec<Running>, waiting: Vec<Waiting>) -> View {
    let free_slots = total_slots.saturating_sub(running.len() as u32);
    View {
        now_ms,
        total_slots,
        free_slots,
        names: vec!["m".into()],
        backends: vec![crate::Backend {
            name: "ollama".into(),
            kind: crate::BackendKind::Ollama,
            total_slots,
            free_slots,
            healthy: true,
            max_loaded_models: 0,
            loaded: Vec::new(),
            speeds: Vec::new(),
        }],
        running,
        waiting,
        beyond: Vec::new(),
    }
}

/// A healthy backend with `free` of `total` slots, a limit of `max_loaded`
/// models (0 = unknown) and the models `loaded` (name ids) loaded.
pub fn backend(total: u32, free: u32, max_loaded: u32, loaded: &[u32]) -> Backend {
    Backend {
        name: "b".into(),
        kind: crate::BackendKind::Ollama,
        total_slots: total,
        free_slots: free,
        healthy: true,
        max_loaded_models: max_loaded,
        loaded: loaded
            .iter()
            .map(|&model| LoadedModel {
                model,
                size_bytes: 0,
                expires_ms: None,
            })
            .collect(),
        speeds: Vec::new(),
    }
}

/// A view at `now_ms` of several `backends` (named `b0`, `b1`, ...; the
/// arm's slots are theirs in all), with model names `m0`..`m9`.
pub fn fleet(
    now_ms: u64,
    backends: Vec<Backend>,
    running: Vec<Running>,
    waiting: Vec<Waiting>,
) -> View {
    let backends: Vec<Backend> = backends
        .into_iter()
        .enumerate()
        .map(|(i, b)| Backend {
            name: format!("b{i}"),
            ..b
        })
        .collect();
    View {
        now_ms,
        total_slots: backends.iter().map(|b| b.total_slots).sum(),
        free_slots: backends.iter().map(|b| b.free_slots).sum(),
        names: (0..10).map(|i| format!("m{i}")).collect(),
        backends,
        running,
        waiting,
        beyond: Vec::new(),
    }
}

/// `w` for model `model` (a name id).
pub fn of_model(mut w: Waiting, model: u32) -> Waiting {
    w.model = model;
    w
}

/// `r` running on backend `backend` for model `model`.
pub fn on(mut r: Running, backend: u32, model: u32) -> Running {
    r.backend = backend;
    r.model = model;
    r
}

/// The `(id, backend)` of the `Start` actions, in order.
pub fn placed(actions: &[Action]) -> Vec<(u64, Option<u32>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Start(s) => Some((s.id, s.backend)),
            _ => None,
        })
        .collect()
}

/// The ids of the `Start` actions, in order.
pub fn started(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Start(s) => Some(s.id),
            _ => None,
        })
        .collect()
}

/// A compact, comparable rendering of actions: `start 3`, `preempt 7`,
/// `preempt! 7` (cut streaming), `reject 4 429`.
pub fn describe(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .map(|a| match a {
            Action::Start(s) => format!("start {}", s.id),
            Action::Preempt(p) if p.cut_streaming => format!("preempt! {}", p.id),
            Action::Preempt(p) => format!("preempt {}", p.id),
            Action::Reject(r) => format!("reject {} {}", r.id, r.rejection.status),
        })
        .collect()
}
