//! The state machine with several backends, on the paused clock: where the
//! host starts a request when the policy names no backend, what a policy
//! sees of the backends, health, and fail-over after a backend failed.

use std::sync::Arc;

use tokio::time::Instant;

use super::tests::{arm, granted, not_granted, script, weighted};
use super::*;
use crate::config::Limits;
use crate::fleet::{BackendSpec, PsModel};
use crate::policy::{Action, View};

/// A policy that starts the oldest waiting requests, as many as there are
/// free slots, naming backend `b`; and the views it was shown.
fn starts_on(
    b: u32,
) -> (
    Box<dyn super::decider::Decider>,
    Arc<std::sync::Mutex<Vec<View>>>,
) {
    script(move |v: &View| {
        Ok(v.waiting
            .iter()
            .take(v.free_slots as usize)
            .map(|w| Action::Start {
                id: w.id,
                backend: Some(b),
            })
            .collect())
    })
}

/// Three backends, `a`, `b` and `c`, of `slots` each.
fn fleet_of(slots: u32, arms: Vec<ArmSpec>) -> (SchedulerHandle, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let sched = spawn(
        Setup {
            arms,
            ab: weighted(),
            backends: ["a", "b", "c"]
                .iter()
                .map(|n| BackendSpec::single(n, slots))
                .collect(),
            max_failovers: 2,
            limits: Limits::default(),
            trace: None,
        },
        metrics.clone(),
    );
    (sched, metrics)
}

fn for_model(model: &str) -> RequestMeta {
    RequestMeta {
        model: model.into(),
        ..super::tests::meta(None, "k")
    }
}

async fn submit(s: &SchedulerHandle, model: &str) -> Ticket {
    s.submit(for_model(model)).await.expect("queued")
}

/// Lets the scheduler handle what was sent to it (messages without replies).
async fn settle(s: &SchedulerHandle) {
    s.status().await.expect("scheduler alive");
}

fn ps(names: &[&str]) -> Vec<PsModel> {
    names
        .iter()
        .map(|n| PsModel {
            name: n.to_string(),
            size: Some(1 << 30),
            size_vram: Some(1 << 30),
            expires_at: None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_host_starts_a_request_where_its_model_is_loaded() {
    let (s, _) = fleet_of(2, vec![arm("main", 100, Box::new(Fifo))]);
    s.backend_residency(0, Instant::now(), ps(&["alpha:latest"]));
    s.backend_residency(1, Instant::now(), ps(&["beta:latest"]));
    s.backend_residency(2, Instant::now(), ps(&["gamma:latest", "beta:latest"]));
    settle(&s).await;
    let mut t = submit(&s, "gamma").await;
    assert_eq!(granted(&mut t).await.backend, 2);
    let mut t2 = submit(&s, "alpha:latest").await;
    let g = granted(&mut t2).await;
    assert_eq!((g.backend, &*g.backend_name), (0, "a"));
    // beta is on b and c; c has one request running, b none: b.
    let mut t3 = submit(&s, "beta").await;
    assert_eq!(granted(&mut t3).await.backend, 1);
    // A model loaded nowhere goes to the least busy backend.
    t.finish(Outcome::Ok);
    t2.finish(Outcome::Ok);
    settle(&s).await;
    let mut t4 = submit(&s, "delta").await;
    assert_eq!(granted(&mut t4).await.backend, 0);
    // Its completion teaches the host that delta is loaded on a.
    t4.finish(Outcome::Ok);
    t3.finish(Outcome::Ok);
    settle(&s).await;
    let st = s.status().await.unwrap();
    assert!(
        st.backends[0]
            .loaded
            .iter()
            .any(|m| m.name == "delta:latest")
    );
    // a is busier than b now, but has delta loaded.
    let mut holder = submit(&s, "alpha").await;
    assert_eq!(granted(&mut holder).await.backend, 0);
    let mut t5 = submit(&s, "delta").await;
    assert_eq!(granted(&mut t5).await.backend, 0);
}

#[tokio::test(start_paused = true)]
async fn a_policy_sees_every_backend_and_its_named_backend_is_honoured() {
    // Starts the oldest waiting request on backend 2 when it has a free slot.
    let (d, views) = starts_on(2);
    let (s, _) = fleet_of(1, vec![arm("main", 100, d)]);
    let mut t1 = submit(&s, "m").await;
    assert_eq!(granted(&mut t1).await.backend, 2);
    // Backend 2 is full now: the host places the next start itself.
    let mut t2 = submit(&s, "m").await;
    let g = granted(&mut t2).await;
    assert_ne!(g.backend, 2);
    let v = views.lock().unwrap().last().cloned().unwrap();
    assert_eq!(v.total_slots, 3, "an arm's share is over every backend");
    let names: Vec<&str> = v.backends.iter().map(|b| &*b.name).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(v.backends[2].free_slots, 0);
    assert_eq!(
        v.running[0].backend, 2,
        "a running request names its backend"
    );
}

#[tokio::test(start_paused = true)]
async fn a_down_backend_gets_no_start_until_it_answers_again() {
    let (s, metrics) = fleet_of(1, vec![arm("main", 100, Box::new(Fifo))]);
    s.backend_health(0, false, None);
    s.backend_health(1, false, None);
    settle(&s).await;
    let mut t1 = submit(&s, "m").await;
    assert_eq!(granted(&mut t1).await.backend, 2);
    // The only healthy backend is full: the next one waits, although the
    // arm's share (3 slots) has room.
    let mut t2 = submit(&s, "m").await;
    not_granted(&mut t2).await;
    s.backend_health(1, true, Some("0.33.0".into()));
    assert_eq!(granted(&mut t2).await.backend, 1);
    let text = metrics.encode();
    assert!(
        text.contains("maitre_backend_up{backend=\"a\"} 0\n"),
        "{text}"
    );
    assert!(
        text.contains("maitre_backend_up{backend=\"b\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("maitre_backend_slots_busy{backend=\"c\"} 1\n"),
        "{text}"
    );
    let st = s.status().await.unwrap();
    assert_eq!(st.backends[1].version.as_deref(), Some("0.33.0"));
    assert!(!st.backends[0].healthy);
}

#[tokio::test(start_paused = true)]
async fn a_request_whose_backend_failed_moves_to_another_bounded() {
    let (s, metrics) = fleet_of(1, vec![arm("main", 100, Box::new(Fifo))]);
    let mut t = submit(&s, "m").await;
    let g = granted(&mut t).await;
    assert_eq!(g.backend, 0);
    assert!(t.failover(g.backend).await, "b and c are healthy");
    let g = granted(&mut t).await;
    assert_eq!(g.backend, 1, "not the failed backend");
    assert!(t.failover(g.backend).await);
    assert_eq!(granted(&mut t).await.backend, 2);
    // Two fail-overs are the bound: the third failure is answered.
    assert!(!t.failover(2).await);
    t.finish(Outcome::UpstreamError);
    let text = metrics.encode();
    assert!(
        text.contains("maitre_backend_failovers_total{backend=\"a\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("maitre_backend_failovers_total{backend=\"b\"} 1\n"),
        "{text}"
    );
    let st = s.status().await.unwrap();
    assert!(st.backends.iter().all(|b| !b.healthy && b.busy == 0));
    // Every backend is down: requests are not held, they go and fail fast.
    let mut t2 = submit(&s, "m").await;
    granted(&mut t2).await;
}

#[tokio::test(start_paused = true)]
async fn one_backend_has_nowhere_to_fail_over_to() {
    let h = super::tests::start(
        1,
        vec![arm("main", 100, Box::new(Fifo))],
        weighted(),
        Limits::default(),
    );
    let mut t = h.submit(None).await;
    let g = granted(&mut t).await;
    assert!(!t.failover(g.backend).await);
    t.finish(Outcome::UpstreamError);
    assert!(!h.status().await.backends[0].healthy);
    // Down, but the only one: the next request is dispatched (and fails
    // fast) rather than held, as before there were fleets.
    let mut t2 = h.submit(None).await;
    granted(&mut t2).await;
    // An answer says it is up again (a single backend has no probe).
    t2.finish(Outcome::Ok);
    assert!(h.status().await.backends[0].healthy);
}

#[tokio::test(start_paused = true)]
async fn weighted_arms_share_the_slots_of_every_backend() {
    let (s, _) = fleet_of(
        2,
        vec![arm("a", 50, Box::new(Fifo)), arm("b", 50, Box::new(Fifo))],
    );
    let st = s.status().await.unwrap();
    let slots: Vec<u32> = st.arms.iter().map(|a| a.slots).collect();
    assert_eq!(slots, [3, 3]);
    assert_eq!(st.slots, 6);
}

#[tokio::test(start_paused = true)]
async fn a_policy_sees_the_measured_speed_of_each_model_on_each_backend() {
    let (d, views) = starts_on(1);
    let (s, _) = fleet_of(1, vec![arm("main", 100, d)]);
    let mut t = submit(&s, "m").await;
    let g = granted(&mut t).await;
    tokio::time::advance(Duration::from_millis(100)).await;
    g.run.mark_upstream_first_byte();
    for _ in 0..11 {
        g.run.add_token();
        tokio::time::advance(Duration::from_millis(50)).await;
    }
    t.finish(crate::scheduler::Outcome::Ok);
    // The next decision's view carries what the first request measured.
    let mut t2 = submit(&s, "other").await;
    granted(&mut t2).await;
    let v = views.lock().unwrap().last().cloned().unwrap();
    assert!(v.backends[0].speeds.is_empty() && v.backends[2].speeds.is_empty());
    let sp = &v.backends[1].speeds;
    assert_eq!(sp.len(), 1, "{sp:?}");
    assert_eq!(&*sp[0].model, "m:latest");
    let ttft = sp[0].ttft_ms.unwrap();
    assert!((99.0..=101.0).contains(&ttft), "{ttft}");
    // 10 tokens after the first, over 550 ms.
    let tps = sp[0].tokens_per_s.unwrap();
    assert!((18.0..=18.4).contains(&tps), "{tps}");
}
