//! The plugin runtime under a paused (virtual) clock, as `maitre simulate`
//! runs it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::policy::{Backend, Class, View, Waiting};

/// A view with `n` waiting requests: large enough that copying it into the
/// sandbox takes several epoch ticks (milliseconds).
fn big_view(n: u64) -> View {
    let model: Arc<str> = "fake".into();
    View {
        now_ms: 1_000,
        total_slots: 2,
        free_slots: 2,
        backends: vec![Backend::new("http://upstream".into(), 2, 2)],
        running: Vec::new(),
        waiting: (1..=n)
            .map(|id| Waiting {
                id,
                class: Class::Batch,
                priority: 0.0,
                model: model.clone(),
                tenant: None,
                stream: false,
                num_predict: Some(100),
                arrival_ms: id,
                enqueued_ms: id,
                preemptions: 0,
            })
            .collect(),
        beyond: Vec::new(),
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn under_virtual_time_a_long_call_lets_nothing_else_run_and_is_not_cut() {
    let bytes = crate::builtins::bytes("fifo").expect("fifo is built in");
    let compiled = Runtime::global()
        .compile_bytes(bytes, "builtin:fifo".into())
        .expect("compiles");
    let limits = PluginLimits {
        call_budget: 2_000,
        virtual_time: true,
        ..PluginLimits::default()
    };
    let mut inst = Runtime::global()
        .instantiate(&compiled, limits, &[])
        .await
        .expect("init");
    // Another task of the same thread, and a far timer: if the call yielded,
    // the task would run meanwhile (so the order of events would depend on
    // how fast this machine is).
    let spins = Arc::new(AtomicU64::new(0));
    let s = spins.clone();
    tokio::spawn(async move {
        loop {
            s.fetch_add(1, Ordering::Relaxed);
            tokio::task::yield_now().await;
        }
    });
    tokio::spawn(tokio::time::sleep(std::time::Duration::from_secs(3_600)));
    tokio::task::yield_now().await;
    let view = big_view(60_000);
    let (t0, wall) = (tokio::time::Instant::now(), std::time::Instant::now());
    let before = spins.load(Ordering::Relaxed);
    let actions = inst
        .schedule(&view)
        .await
        .expect("a healthy call is not cut");
    assert_eq!(actions.len(), 2);
    assert!(
        wall.elapsed() > std::time::Duration::from_millis(3),
        "the call must span several epoch ticks to mean anything: {:?}",
        wall.elapsed()
    );
    assert_eq!(
        spins.load(Ordering::Relaxed),
        before,
        "no other task ran during the call"
    );
    assert_eq!(tokio::time::Instant::now(), t0, "virtual time did not move");
}
