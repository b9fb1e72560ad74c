//! Builders of hand-made requests and views, for unit-testing a policy's
//! decisions natively (`cargo test`) without a host. Every model name is
//! `view.names[0]` ("m").

use crate::{Action, Class, Request, Running, View, Waiting};

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
            loaded: Vec::new(),
            speeds: Vec::new(),
        }],
        running,
        waiting,
        beyond: Vec::new(),
    }
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
