//! `maitre:policy@0.1.0` (`wit/v0.1.0/policy.wit`): its generated bindings,
//! and the conversions between its types and the host's ([`crate::policy`]).
//!
//! The generated types live in this module and nowhere else. A later version
//! gets a module of its own beside this one; plugins built against 0.1.0
//! keep loading through this one unchanged.

use wasmtime::Store;
use wasmtime::component::{HasSelf, Linker};

use super::sandbox::State;
use crate::policy;

#[allow(missing_docs)]
mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1.0",
        world: "policy",
        exports: { default: async },
    });
}

use bindings::maitre::policy::types as wit;
pub(super) use bindings::{Policy, PolicyPre};

/// The package this module speaks.
pub(super) const PACKAGE: &str = "maitre:policy@0.1.0";

impl wit::Host for State {}

/// Adds this version's imports (its `types` interface) to the linker.
pub(super) fn add_to_linker(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    Policy::add_to_linker::<_, HasSelf<_>>(linker, |s| s)
}

/// Calls `init`.
pub(super) async fn init(
    p: &Policy,
    store: &mut Store<State>,
    config: &[(String, String)],
) -> wasmtime::Result<Result<(), String>> {
    p.call_init(store, config).await
}

/// Calls `admit`, converting both ways.
pub(super) async fn admit(
    p: &Policy,
    store: &mut Store<State>,
    req: &policy::Request,
    view: &policy::View,
) -> wasmtime::Result<policy::Admission> {
    let a = p.call_admit(store, &request(req), &to_view(view)).await?;
    Ok(admission(a))
}

/// Calls `schedule`, converting both ways.
pub(super) async fn schedule(
    p: &Policy,
    store: &mut Store<State>,
    view: &policy::View,
) -> wasmtime::Result<Vec<policy::Action>> {
    let actions = p.call_schedule(store, &to_view(view)).await?;
    Ok(actions.into_iter().map(action).collect())
}

fn class(c: policy::Class) -> wit::Class {
    match c {
        policy::Class::Realtime => wit::Class::Realtime,
        policy::Class::Batch => wit::Class::Batch,
    }
}

fn host_class(c: wit::Class) -> policy::Class {
    match c {
        wit::Class::Realtime => policy::Class::Realtime,
        wit::Class::Batch => policy::Class::Batch,
    }
}

fn request(r: &policy::Request) -> wit::Request {
    wit::Request {
        id: r.id,
        path: r.path.clone(),
        model: r.model.to_string(),
        stream: r.stream,
        priority_header: r.priority_header.clone(),
        class_hint: r.class_hint.map(class),
        tenant: r.tenant.as_deref().map(str::to_string),
        num_predict: r.num_predict,
        body_bytes: r.body_bytes,
        arrival_ms: r.arrival_ms,
    }
}

fn to_view(v: &policy::View) -> wit::View {
    wit::View {
        now_ms: v.now_ms,
        total_slots: v.total_slots,
        free_slots: v.free_slots,
        backends: v
            .backends
            .iter()
            .map(|b| wit::Backend {
                name: b.name.to_string(),
                total_slots: b.total_slots,
                free_slots: b.free_slots,
            })
            .collect(),
        running: v
            .running
            .iter()
            .map(|r| wit::Running {
                id: r.id,
                class: class(r.class),
                priority: r.priority,
                model: r.model.to_string(),
                tenant: r.tenant.as_deref().map(str::to_string),
                backend: r.backend,
                arrival_ms: r.arrival_ms,
                started_ms: r.started_ms,
                first_token_ms: r.first_token_ms,
                tokens: r.tokens,
                preemptible: r.preemptible,
                streaming: r.streaming,
                preemptions: r.preemptions,
            })
            .collect(),
        waiting: v
            .waiting
            .iter()
            .map(|w| wit::Waiting {
                id: w.id,
                class: class(w.class),
                priority: w.priority,
                model: w.model.to_string(),
                tenant: w.tenant.as_deref().map(str::to_string),
                stream: w.stream,
                num_predict: w.num_predict,
                arrival_ms: w.arrival_ms,
                enqueued_ms: w.enqueued_ms,
                preemptions: w.preemptions,
            })
            .collect(),
    }
}

fn rejection(r: wit::Rejection) -> policy::Rejection {
    policy::Rejection {
        status: r.status,
        message: r.message,
    }
}

fn admission(a: wit::Admission) -> policy::Admission {
    match a {
        wit::Admission::Queue(p) => policy::Admission::Queue(policy::Placement {
            class: host_class(p.class),
            priority: p.priority,
        }),
        wit::Admission::Reject(r) => policy::Admission::Reject(rejection(r)),
    }
}

fn action(a: wit::Action) -> policy::Action {
    match a {
        wit::Action::Start(s) => policy::Action::Start {
            id: s.id,
            backend: s.backend,
        },
        wit::Action::Preempt(p) => policy::Action::Preempt {
            id: p.id,
            cut_streaming: p.cut_streaming,
        },
        wit::Action::Reject(r) => policy::Action::Reject {
            id: r.id,
            rejection: rejection(r.rejection),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_view_crosses_the_boundary_field_by_field() {
        let model: Arc<str> = "llama3".into();
        let v = policy::View {
            now_ms: 7,
            total_slots: 2,
            free_slots: 1,
            backends: vec![policy::Backend::new("up".into(), 2, 1)],
            running: vec![policy::Running {
                id: 1,
                class: policy::Class::Batch,
                priority: 0.5,
                model: model.clone(),
                tenant: Some("t".into()),
                backend: 0,
                num_predict: None,
                arrival_ms: 1,
                started_ms: 2,
                first_token_ms: Some(3),
                tokens: 4,
                preemptible: true,
                streaming: false,
                preemptions: 1,
            }],
            waiting: vec![policy::Waiting {
                id: 2,
                class: policy::Class::Realtime,
                priority: 1.0,
                model,
                tenant: None,
                stream: true,
                num_predict: Some(9),
                arrival_ms: 5,
                enqueued_ms: 6,
                preemptions: 0,
            }],
            beyond: Vec::new(),
        };
        let w = to_view(&v);
        assert_eq!((w.now_ms, w.total_slots, w.free_slots), (7, 2, 1));
        assert_eq!(w.backends[0].name, "up");
        let r = &w.running[0];
        assert_eq!(
            (
                r.id,
                r.model.as_str(),
                r.tenant.as_deref(),
                r.first_token_ms
            ),
            (1, "llama3", Some("t"), Some(3))
        );
        assert!(r.preemptible && !r.streaming);
        let q = &w.waiting[0];
        assert_eq!((q.id, q.num_predict, q.enqueued_ms), (2, Some(9), 6));
        assert!(matches!(q.class, wit::Class::Realtime));
    }

    #[test]
    fn actions_come_back_as_host_actions() {
        let got: Vec<policy::Action> = vec![
            wit::Action::Start(wit::Start {
                id: 1,
                backend: Some(0),
            }),
            wit::Action::Preempt(wit::Preemption {
                id: 2,
                cut_streaming: true,
            }),
            wit::Action::Reject(wit::RejectWaiting {
                id: 3,
                rejection: wit::Rejection {
                    status: 429,
                    message: "slow down".into(),
                },
            }),
        ]
        .into_iter()
        .map(action)
        .collect();
        assert_eq!(
            got,
            vec![
                policy::Action::Start {
                    id: 1,
                    backend: Some(0)
                },
                policy::Action::Preempt {
                    id: 2,
                    cut_streaming: true
                },
                policy::Action::Reject {
                    id: 3,
                    rejection: policy::Rejection {
                        status: 429,
                        message: "slow down".into()
                    }
                },
            ]
        );
    }
}
