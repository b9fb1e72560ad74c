//! `maitre:policy@0.2.0` (`wit/v0.2.0/policy.wit`): its generated bindings,
//! and the conversions between its types and the host's ([`crate::policy`]).
//!
//! What differs from 0.1.0 at this boundary: model and tenant names cross
//! once per call (`view.names`, indices in the records), the queue arrives
//! as a candidate window with a per-class summary of the rest, and backends
//! carry health, loaded models and measured speeds.

use std::sync::Arc;

use rustc_hash::FxHashMap;
use wasmtime::Store;
use wasmtime::component::{HasSelf, InstancePre, Linker, TypedFunc};

use super::sandbox::State;
use crate::policy;

#[allow(missing_docs)]
mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit/v0.2.0",
        world: "policy",
        exports: { default: async },
    });
}

mod lower;

use bindings::Policy;
pub(super) use bindings::PolicyPre;
use bindings::maitre::policy::types as wit;

/// The package this module speaks.
pub(super) const PACKAGE: &str = "maitre:policy@0.2.0";

impl wit::Host for State {}

/// Adds this version's imports (its `types` interface) to the linker.
pub(super) fn add_to_linker(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    Policy::add_to_linker::<_, HasSelf<_>>(linker, |s| s)
}

/// A live instance: the generated bindings for `init`, and `admit` and
/// `schedule` as typed functions taking the view with its bulk-lowered
/// window ([`lower`]).
pub(super) struct Bound {
    policy: Policy,
    admit: TypedFunc<(wit::Request, lower::View), (wit::Admission,)>,
    schedule: TypedFunc<(lower::View,), (Vec<wit::Action>,)>,
}

/// Instantiates `pre` in `store`. Looking `admit` and `schedule` up as
/// typed functions checks [`lower::View`] against the plugin's own types.
pub(super) async fn instantiate(
    pre: &PolicyPre<State>,
    store: &mut Store<State>,
) -> wasmtime::Result<Bound> {
    let instance_pre: &InstancePre<State> = pre.instance_pre();
    let instance = instance_pre.instantiate_async(&mut *store).await?;
    Ok(Bound {
        policy: Policy::new(&mut *store, &instance)?,
        admit: instance.get_typed_func(&mut *store, "admit")?,
        schedule: instance.get_typed_func(&mut *store, "schedule")?,
    })
}

/// Calls `init`.
pub(super) async fn init(
    b: &Bound,
    store: &mut Store<State>,
    config: &[(String, String)],
) -> wasmtime::Result<Result<(), String>> {
    b.policy.call_init(store, config).await
}

/// Calls `admit`, converting both ways.
pub(super) async fn admit(
    b: &Bound,
    store: &mut Store<State>,
    req: &policy::Request,
    view: &policy::View,
) -> wasmtime::Result<policy::Admission> {
    let (a,) = b
        .admit
        .call_async(store, (request(req), to_view(view)))
        .await?;
    Ok(admission(a))
}

/// Calls `schedule`, converting both ways.
pub(super) async fn schedule(
    b: &Bound,
    store: &mut Store<State>,
    view: &policy::View,
) -> wasmtime::Result<Vec<policy::Action>> {
    let (actions,) = b.schedule.call_async(store, (to_view(view),)).await?;
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

/// Names interned for one call: each distinct string crosses once.
#[derive(Default)]
struct Names {
    index: FxHashMap<Arc<str>, u32>,
    list: Vec<String>,
    /// The name asked for last, by the address of its text and its index:
    /// neighbours in a queue mostly share a model, and the scheduler gives
    /// the requests of one model one `Arc`, so the address usually matches
    /// (a compare of the text otherwise); either costs less than hashing the
    /// name again, and no `Arc` is cloned to remember it. The view being
    /// converted holds every name, so an address cannot be reused meanwhile.
    last: Option<(usize, u32)>,
}

impl Names {
    fn id(&mut self, s: &Arc<str>) -> u32 {
        let at = s.as_ptr() as usize;
        if let Some((last, i)) = self.last
            && (last == at || self.list[i as usize] == **s)
        {
            self.last = Some((at, i));
            return i;
        }
        let i = match self.index.get(s) {
            Some(i) => *i,
            None => {
                let i = self.list.len() as u32;
                self.list.push(s.to_string());
                self.index.insert(s.clone(), i);
                i
            }
        };
        self.last = Some((at, i));
        i
    }
}

fn to_view(v: &policy::View) -> lower::View {
    let mut names = Names::default();
    let backends = v
        .backends
        .iter()
        .map(|b| wit::Backend {
            name: b.name.to_string(),
            kind: match b.kind {
                policy::BackendKind::Ollama => wit::BackendKind::Ollama,
                policy::BackendKind::OpenAi => wit::BackendKind::Openai,
            },
            total_slots: b.total_slots,
            free_slots: b.free_slots,
            healthy: b.healthy,
            max_loaded_models: b.max_loaded_models,
            loaded: b
                .loaded
                .iter()
                .map(|m| wit::LoadedModel {
                    model: names.id(&m.model),
                    size_bytes: m.size_bytes,
                    expires_ms: m.expires_ms,
                })
                .collect(),
            speeds: b
                .speeds
                .iter()
                .map(|m| wit::ModelSpeed {
                    model: names.id(&m.model),
                    ttft_ms: m.ttft_ms,
                    tokens_per_s: m.tokens_per_s,
                })
                .collect(),
        })
        .collect();
    let running = v
        .running
        .iter()
        .map(|r| wit::Running {
            id: r.id,
            class: class(r.class),
            priority: r.priority,
            model: names.id(&r.model),
            tenant: r.tenant.as_ref().map(|t| names.id(t)),
            num_predict: r.num_predict,
            backend: r.backend,
            arrival_ms: r.arrival_ms,
            started_ms: r.started_ms,
            first_token_ms: r.first_token_ms,
            tokens: r.tokens,
            preemptible: r.preemptible,
            streaming: r.streaming,
            preemptions: r.preemptions,
        })
        .collect();
    let waiting = v
        .waiting
        .iter()
        .map(|w| lower::Waiting {
            id: w.id,
            class: class(w.class),
            priority: w.priority,
            model: names.id(&w.model),
            tenant: w.tenant.as_ref().map(|t| names.id(t)),
            stream: w.stream,
            num_predict: w.num_predict,
            arrival_ms: w.arrival_ms,
            enqueued_ms: w.enqueued_ms,
            preemptions: w.preemptions,
        })
        .collect();
    lower::View {
        now_ms: v.now_ms,
        total_slots: v.total_slots,
        free_slots: v.free_slots,
        names: names.list,
        backends,
        running,
        waiting,
        beyond: v
            .beyond
            .iter()
            .map(|b| wit::Beyond {
                class: class(b.class),
                count: b.count,
                oldest_arrival_ms: b.oldest_arrival_ms,
                highest_priority: b.highest_priority,
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
    use super::*;

    #[test]
    fn names_cross_once_and_records_point_at_them() {
        let model: Arc<str> = "llama3".into();
        let other: Arc<str> = "qwen".into();
        let waiting = |id, model: &Arc<str>| policy::Waiting {
            id,
            class: policy::Class::Realtime,
            priority: 1.0,
            model: model.clone(),
            tenant: Some("t".into()),
            stream: true,
            num_predict: Some(9),
            arrival_ms: 5,
            enqueued_ms: 6,
            preemptions: 0,
        };
        let mut backend = policy::Backend::new("up".into(), 2, 1);
        backend.kind = policy::BackendKind::OpenAi;
        backend.max_loaded_models = 3;
        backend.loaded.push(policy::LoadedModel {
            model: other.clone(),
            size_bytes: 7,
            expires_ms: Some(8),
        });
        let v = policy::View {
            now_ms: 7,
            total_slots: 2,
            free_slots: 1,
            backends: vec![backend],
            running: vec![policy::Running {
                id: 1,
                class: policy::Class::Batch,
                priority: 0.5,
                model: model.clone(),
                tenant: None,
                backend: 0,
                num_predict: Some(40),
                arrival_ms: 1,
                started_ms: 2,
                first_token_ms: Some(3),
                tokens: 4,
                preemptible: true,
                streaming: false,
                preemptions: 1,
            }],
            waiting: vec![waiting(2, &model), waiting(3, &model), waiting(4, &other)],
            beyond: vec![policy::Beyond {
                class: policy::Class::Batch,
                count: 500,
                oldest_arrival_ms: Some(1),
                highest_priority: Some(0.5),
            }],
        };
        let w = to_view(&v);
        assert_eq!(w.names, vec!["qwen", "llama3", "t"]);
        let name = |i: u32| w.names[i as usize].as_str();
        assert_eq!(name(w.backends[0].loaded[0].model), "qwen");
        assert!(w.backends[0].healthy);
        assert!(matches!(w.backends[0].kind, wit::BackendKind::Openai));
        assert_eq!(w.backends[0].max_loaded_models, 3);
        assert_eq!(name(w.running[0].model), "llama3");
        assert_eq!(w.running[0].num_predict, Some(40));
        let models: Vec<&str> = w.waiting.iter().map(|q| name(q.model)).collect();
        assert_eq!(models, vec!["llama3", "llama3", "qwen"]);
        assert_eq!(w.waiting[0].tenant.map(name), Some("t"));
        assert_eq!(w.beyond[0].count, 500);
        assert!(matches!(w.beyond[0].class, wit::Class::Batch));
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
