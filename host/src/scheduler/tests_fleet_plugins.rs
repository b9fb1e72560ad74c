//! maitre's own plugins (the built-in WebAssembly components) deciding for
//! a fleet of three backends, on the paused clock: reserved-aging keeps a
//! real-time slot free on each backend (then only where real-time requests'
//! models are loaded), and starts requests where their model is loaded
//! rather than evict another model.

use std::sync::Arc;

use tokio::time::Instant;

use super::tests::{arm, granted, granted_within, not_granted, weighted};
use super::*;
use crate::config::Limits;
use crate::fleet::{BackendSpec, PsModel};
use crate::plugin::{PluginLimits, Runtime};

/// The built-in plugin `name` with `config` (plus the host's `maitre.slots`).
async fn builtin(name: &str, slots: u32, config: &[(&str, &str)]) -> Box<dyn Decider> {
    let bytes = crate::builtins::bytes(name).expect("a built-in plugin");
    let compiled = Runtime::global()
        .compile_bytes(bytes, format!("builtin:{name}"))
        .expect("compiles");
    let mut kv: Vec<(String, String)> = vec![("maitre.slots".into(), slots.to_string())];
    kv.extend(config.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let limits = PluginLimits {
        virtual_time: true,
        ..PluginLimits::default()
    };
    Box::new(
        Runtime::global()
            .instantiate(&compiled, limits, &kv)
            .await
            .expect("init"),
    )
}

/// Backends `a`, `b`, `c` of 2 slots each, each keeping at most
/// `max_loaded` models, and `alpha`, `beta`, `gamma` loaded on them.
async fn fleet3(max_loaded: u32, decider: Box<dyn Decider>) -> SchedulerHandle {
    let s = spawn(
        Setup {
            arms: vec![arm("main", 100, decider)],
            ab: weighted(),
            backends: ["a", "b", "c"]
                .iter()
                .map(|n| BackendSpec {
                    max_loaded_models: max_loaded,
                    ..BackendSpec::single(n, 2)
                })
                .collect(),
            max_failovers: 2,
            limits: Limits::default(),
            trace: None,
        },
        Arc::new(Metrics::new()),
    );
    for (b, model) in ["alpha", "beta", "gamma"].iter().enumerate() {
        s.backend_residency(b, Instant::now(), ps(model));
    }
    s.status().await.expect("scheduler alive");
    s
}

fn ps(name: &str) -> Vec<PsModel> {
    vec![PsModel {
        name: format!("{name}:latest"),
        size: Some(1 << 30),
        size_vram: Some(1 << 30),
        expires_at: None,
    }]
}

async fn submit(s: &SchedulerHandle, model: &str, class: &str) -> Ticket {
    s.submit(RequestMeta {
        model: model.into(),
        ..super::tests::meta(Some(class), "k")
    })
    .await
    .expect("queued")
}

#[tokio::test(start_paused = true)]
async fn reserved_aging_keeps_a_realtime_slot_free_on_each_backend() {
    let s = fleet3(3, builtin("reserved-aging", 6, &[]).await).await;
    let mut batch = Vec::new();
    for model in ["alpha", "beta", "gamma", "alpha", "beta", "gamma"] {
        batch.push(submit(&s, model, "batch").await);
    }
    // One batch request per backend, each where its model is loaded; the
    // second slot of every backend stays free (the arm-wide cap alone would
    // let 5 batch requests run).
    for (i, t) in batch.iter_mut().enumerate() {
        if i < 3 {
            assert_eq!(granted(t).await.backend, i);
        } else {
            not_granted(t).await;
        }
    }
    // A real-time request finds a free slot on its model's backend at once.
    let mut rt = submit(&s, "beta", "realtime").await;
    assert_eq!(granted(&mut rt).await.backend, 1);
    // From now on real-time requests are known to use beta, loaded on b
    // only: a and c keep no real-time slot. Their second slots go to batch:
    // alpha where it is loaded, beta to c (room to load it; b is full).
    assert_eq!(granted(&mut batch[3]).await.backend, 0);
    assert_eq!(granted(&mut batch[4]).await.backend, 2);
    not_granted(&mut batch[5]).await;
    // When b's batch request ends, its real-time request holds b's
    // reserved slot, so the other is batch's: gamma takes it (room to load).
    batch.remove(1).finish(Outcome::Ok);
    // (batch[1] is gone: the gamma request is batch[4] now.)
    assert_eq!(granted(&mut batch[4]).await.backend, 1);
}

#[tokio::test(start_paused = true)]
async fn reserved_aging_waits_for_the_backend_with_the_model_rather_than_evict() {
    // Every backend keeps one model: loading alpha on b or c would evict.
    let s = fleet3(
        1,
        builtin("reserved-aging", 6, &[("group_max_wait_ms", "5000")]).await,
    )
    .await;
    let mut t1 = submit(&s, "alpha", "batch").await;
    let mut t2 = submit(&s, "alpha", "batch").await;
    let mut t3 = submit(&s, "alpha", "batch").await;
    assert_eq!(granted(&mut t1).await.backend, 0);
    // a's other slot is reserved for real-time; b and c have free slots but
    // other models: alpha waits for a.
    not_granted(&mut t2).await;
    not_granted(&mut t3).await;
    t1.finish(Outcome::Ok);
    assert_eq!(granted(&mut t2).await.backend, 0);
    not_granted(&mut t3).await;
    // Grouping is bounded: after group_max_wait_ms t3 is taken anyway, on
    // another backend (the host loads alpha there).
    let g = granted_within(&mut t3, 6_000)
        .await
        .expect("taken after the bound");
    assert_ne!(g.backend, 0);
    let waited = s.status().await.expect("alive");
    assert!(waited.backends[g.backend].busy == 1);
}
