//! The state machine under a paused clock, with test-double deciders: no
//! wasmtime, no sockets. Each test plays the proxy's part (submit, wait for
//! the grant, finish, requeue) through the public handle.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{Instant, timeout};

use super::*;
use crate::config::{AbConfig, AbMode, Limits, PluginSource};
use crate::plugin::PluginError;
use crate::policy::{Action, Admission, Class, Placement, Rejection, Request, View};

type ScheduleFn = Box<dyn FnMut(&View) -> Result<Vec<Action>, PluginError> + Send>;

/// A decider whose `schedule` is a closure; admits by the class hint with
/// priority 1 for real-time, and records every view it was shown.
struct Script {
    schedule: ScheduleFn,
    views: Arc<Mutex<Vec<View>>>,
}

impl Decider for Script {
    fn admit<'a>(&'a mut self, req: &'a Request, _: &'a View) -> decider::Decision<'a, Admission> {
        let class = req.class_hint.unwrap_or(Class::Batch);
        let priority = if class == Class::Realtime { 1.0 } else { 0.0 };
        Box::pin(async move { Ok(Admission::Queue(Placement { class, priority })) })
    }
    fn schedule<'a>(&'a mut self, view: &'a View) -> decider::Decision<'a, Vec<Action>> {
        self.views.lock().unwrap().push(view.clone());
        let r = (self.schedule)(view);
        Box::pin(async move { r })
    }
}

pub(super) fn script(
    f: impl FnMut(&View) -> Result<Vec<Action>, PluginError> + Send + 'static,
) -> (Box<dyn Decider>, Arc<Mutex<Vec<View>>>) {
    let views = Arc::new(Mutex::new(Vec::new()));
    let d = Script {
        schedule: Box::new(f),
        views: views.clone(),
    };
    (Box::new(d), views)
}

/// The preemptive rule in a few lines: start the best waiting requests on
/// free slots; when a real-time request waits and no slot is free, pre-empt
/// a pre-emptible batch request and start it in the same answer.
pub(super) fn preempt_for_realtime(v: &View) -> Result<Vec<Action>, PluginError> {
    let mut waiting = v.waiting.clone();
    waiting.sort_by(|a, b| b.priority.total_cmp(&a.priority));
    let mut out: Vec<Action> = waiting
        .iter()
        .take(v.free_slots as usize)
        .map(|w| Action::Start {
            id: w.id,
            backend: None,
        })
        .collect();
    if v.free_slots == 0
        && let Some(rt) = waiting.iter().find(|w| w.class == Class::Realtime)
        && let Some(victim) = v
            .running
            .iter()
            .find(|r| r.class == Class::Batch && (r.preemptible || r.streaming))
    {
        out.push(Action::Preempt {
            id: victim.id,
            cut_streaming: true,
        });
        out.push(Action::Start {
            id: rt.id,
            backend: None,
        });
    }
    Ok(out)
}

pub(super) fn arm(name: &str, weight: u32, decider: Box<dyn Decider>) -> ArmSpec {
    ArmSpec {
        name: name.into(),
        weight,
        decider,
        source: PluginSource::Builtin("test".into()),
        sha256: "0".repeat(64),
        shadow: false,
        interface: "test",
    }
}

pub(super) fn weighted() -> AbConfig {
    AbConfig {
        mode: AbMode::Weighted,
        key_header: "x-maitre-key".into(),
        window_seconds: 60.0,
    }
}

pub(super) struct Harness {
    pub(super) sched: SchedulerHandle,
    pub(super) metrics: Arc<Metrics>,
}

pub(super) fn start(slots: u32, arms: Vec<ArmSpec>, ab: AbConfig, limits: Limits) -> Harness {
    let metrics = Arc::new(Metrics::new());
    let sched = spawn(
        Setup {
            arms,
            ab,
            backends: vec![crate::fleet::BackendSpec::single("default", slots)],
            max_failovers: 2,
            limits,
            trace: None,
        },
        metrics.clone(),
    );
    Harness { sched, metrics }
}

pub(super) fn meta(priority: Option<&str>, key: &str) -> RequestMeta {
    RequestMeta {
        path: "/api/generate".into(),
        model: "m".into(),
        stream: true,
        priority_header: priority.map(str::to_string),
        tenant: None,
        num_predict: None,
        body_bytes: 10,
        client_key: key.into(),
        arrival: Instant::now(),
    }
}

impl Harness {
    pub(super) async fn submit(&self, priority: Option<&str>) -> Ticket {
        self.submit_as(priority, "k").await
    }
    pub(super) async fn submit_as(&self, priority: Option<&str>, key: &str) -> Ticket {
        self.sched
            .submit(meta(priority, key))
            .await
            .unwrap_or_else(|e| panic!("submit refused: {e:?}"))
    }
    pub(super) async fn status(&self) -> Status {
        self.sched.status().await.expect("scheduler alive")
    }
    /// `(state, arm)` of request `id` in `/status`, if it is still known.
    pub(super) async fn state_of(&self, id: u64) -> Option<(String, String)> {
        let s = self.status().await;
        s.requests
            .iter()
            .find(|r| r.id == id)
            .map(|r| (r.state.to_string(), r.arm.clone()))
    }
    pub(super) fn metric(&self, needle: &str) -> bool {
        self.metrics.encode().lines().any(|l| l.contains(needle))
    }
}

/// The grant, if the request is started within `ms` (virtual) milliseconds.
pub(super) async fn granted_within(t: &mut Ticket, ms: u64) -> Option<Grant> {
    timeout(Duration::from_millis(ms), t.wait_start())
        .await
        .ok()
        .map(|r| r.expect("started, not rejected"))
}

pub(super) async fn granted(t: &mut Ticket) -> Grant {
    granted_within(t, 50)
        .await
        .expect("request was not started")
}

pub(super) async fn not_granted(t: &mut Ticket) {
    assert!(
        granted_within(t, 50).await.is_none(),
        "request {} started but should wait",
        t.id()
    );
}

#[tokio::test(start_paused = true)]
async fn fifo_starts_in_arrival_order_and_reuses_a_freed_slot() {
    let h = start(
        1,
        vec![arm("a", 100, Box::new(Fifo))],
        weighted(),
        Limits::default(),
    );
    let mut t1 = h.submit(None).await;
    let mut t2 = h.submit(None).await;
    let mut t3 = h.submit(None).await;
    granted(&mut t1).await;
    not_granted(&mut t2).await;
    t1.finish(Outcome::Ok);
    granted(&mut t2).await;
    not_granted(&mut t3).await;
    drop(t2); // the client went away mid-stream: the slot is freed too
    granted(&mut t3).await;
    let s = h.status().await;
    assert_eq!((s.slots_busy, s.waiting), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn a_preempted_slot_is_handed_to_the_started_request_the_moment_it_is_let_go() {
    let (d, _) = script(preempt_for_realtime);
    let h = start(1, vec![arm("a", 100, d)], weighted(), Limits::default());
    let mut batch = h.submit(Some("batch")).await;
    let g = granted(&mut batch).await;
    let mut rt = h.submit(Some("realtime")).await;
    // The policy pre-empted the batch request and started the real-time one,
    // which waits for the slot as a handoff: the upstream never holds two.
    assert!(
        g.run.preempt.is_cancelled(),
        "the batch dispatch is aborted"
    );
    not_granted(&mut rt).await;
    assert_eq!(h.state_of(rt.id()).await.unwrap().0, "handoff");
    assert_eq!(h.state_of(batch.id()).await.unwrap().0, "preempting");
    assert_eq!(h.status().await.slots_busy, 1);
    // The gauge counts the handoff as waiting, once.
    assert!(h.metric("maitre_waiting_requests{arm=\"a\"} 1"));
    // The proxy closed the batch's upstream request and requeues it.
    batch.requeue_after_preempt();
    let g_rt = granted(&mut rt).await;
    assert_eq!(g_rt.preemptions, 0);
    assert_eq!(h.state_of(batch.id()).await.unwrap().0, "waiting");
    assert!(h.metric("maitre_preemptions_total{arm=\"a\"} 1"));
    // The batch request runs again once the real-time one is done.
    rt.finish(Outcome::Ok);
    let again = granted(&mut batch).await;
    assert_eq!(again.preemptions, 1);
    assert!(h.metric("maitre_waiting_requests{arm=\"a\"} 0"));
}

#[tokio::test(start_paused = true)]
async fn an_upstream_503_requeues_the_request_at_its_place() {
    let h = start(
        1,
        vec![arm("a", 100, Box::new(Fifo))],
        weighted(),
        Limits::default(),
    );
    let mut first = h.submit(None).await;
    let mut second = h.submit(None).await;
    granted(&mut first).await;
    first.requeue_after_busy();
    // The requeued request keeps its place (oldest first) and is not counted
    // as pre-empted.
    let g = granted(&mut first).await;
    assert_eq!(g.preemptions, 0);
    not_granted(&mut second).await;
    assert!(h.metric("maitre_upstream_busy_retries_total 1"));
    first.finish(Outcome::Ok);
    granted(&mut second).await;
}

#[tokio::test(start_paused = true)]
async fn preemption_stops_at_the_bound_and_spares_streams_unless_cut() {
    let limits = Limits {
        max_preemptions: 1,
        ..Limits::default()
    };
    // Pre-empts the first running request whenever anything waits, without
    // asking to cut streams.
    let (d, views) = script(|v: &View| {
        let mut out = Vec::new();
        if let Some(r) = v.running.first()
            && !v.waiting.is_empty()
        {
            out.push(Action::Preempt {
                id: r.id,
                cut_streaming: false,
            });
        }
        out.extend(Fifo::actions(v));
        Ok(out)
    });
    let h = start(1, vec![arm("a", 100, d)], weighted(), limits);
    let mut victim = h.submit(None).await;
    let g = granted(&mut victim).await;
    // The first pre-emption is within the bound: the dispatch is aborted and
    // the request, requeued by its handler, is the oldest and runs again.
    let mut other = h.submit(None).await;
    assert!(g.run.preempt.is_cancelled());
    victim.requeue_after_preempt();
    let g = granted(&mut victim).await;
    assert_eq!(g.preemptions, 1);
    // Now it is at its bound: shown as not pre-emptible, and a pre-emption
    // is declined and counted, not applied.
    // (The next decision comes with the tick that ages waiting requests.)
    tokio::time::sleep(Duration::from_millis(Limits::default().tick_ms + 10)).await;
    not_granted(&mut other).await;
    assert!(!g.run.preempt.is_cancelled());
    assert!(h.metric("kind=\"preempt_bound\""));
    let last = views.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.running[0].id, victim.id());
    assert!(!last.running[0].preemptible);
    // A stream that reached its client is only cut on request.
    assert!(g.run.mark_streaming());
    let mut third = h.submit(None).await;
    not_granted(&mut third).await;
    assert!(h.metric("kind=\"preempt_streaming\""));
    assert!(!g.run.preempt.is_cancelled());
    // The plugin stays in charge: these are refusals, not nonsense.
    assert!(!h.status().await.arms[0].fallback);
}

#[tokio::test(start_paused = true)]
async fn a_weight_change_mid_flight_moves_waiting_requests_and_keeps_running_ones() {
    let h = start(
        2,
        vec![arm("a", 50, Box::new(Fifo)), arm("b", 50, Box::new(Fifo))],
        weighted(),
        Limits::default(),
    );
    // Keys that land in each arm (the split is a fixed hash of the key).
    let key_in = |arm: usize| {
        (0..)
            .map(|i| format!("client-{i}"))
            .find(|k| (((ab_key_hash(k) as u128) * 100) >> 64) as usize / 50 == arm)
            .unwrap()
    };
    let (ka, kb) = (key_in(0), key_in(1));
    let mut a1 = h.submit_as(None, &ka).await;
    let mut b1 = h.submit_as(None, &kb).await;
    let mut b2 = h.submit_as(None, &kb).await;
    granted(&mut a1).await;
    granted(&mut b1).await;
    not_granted(&mut b2).await;
    assert_eq!(h.state_of(b2.id()).await.unwrap().1, "b");
    // Draining b: its waiting request moves to a, its running one stays.
    h.sched.set_weight("b", 0).await.unwrap();
    let s = h.status().await;
    assert_eq!(s.arms.iter().map(|a| a.slots).collect::<Vec<_>>(), [2, 0]);
    assert_eq!(h.state_of(b2.id()).await.unwrap().1, "a");
    assert_eq!(
        h.state_of(b1.id()).await.unwrap(),
        ("running".into(), "b".into())
    );
    // b's running request still holds an upstream slot: nothing starts yet.
    not_granted(&mut b2).await;
    b1.finish(Outcome::Ok);
    let g = granted(&mut b2).await;
    assert_eq!(&*g.arm, "a");
    // At least one arm must serve.
    let err = h.sched.set_weight("a", 0).await.unwrap_err();
    assert!(err.contains("at least one arm must serve"), "{err}");
    assert!(h.sched.set_weight("nope", 1).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn a_request_requeued_into_a_drained_arm_moves_to_a_serving_one() {
    let h = start(
        2,
        vec![arm("a", 50, Box::new(Fifo)), arm("b", 50, Box::new(Fifo))],
        weighted(),
        Limits::default(),
    );
    let kb = (0..)
        .map(|i| format!("c{i}"))
        .find(|k| (((ab_key_hash(k) as u128) * 100) >> 64) >= 50)
        .unwrap();
    let mut b1 = h.submit_as(None, &kb).await;
    granted(&mut b1).await;
    h.sched.set_weight("b", 0).await.unwrap();
    // The upstream answered 503: back to the queue of an arm with 0 slots...
    b1.requeue_after_busy();
    // ...which must not strand it.
    let g = granted(&mut b1).await;
    assert_eq!(&*g.arm, "a");
}

#[tokio::test(start_paused = true)]
async fn switchback_hands_the_upstream_and_the_queue_to_the_next_arm_at_each_turn() {
    let ab = AbConfig {
        mode: AbMode::Switchback,
        key_header: "x-maitre-key".into(),
        window_seconds: 10.0,
    };
    let h = start(
        1,
        vec![arm("a", 50, Box::new(Fifo)), arm("b", 50, Box::new(Fifo))],
        ab,
        Limits::default(),
    );
    let mut first = h.submit(None).await;
    let g = granted(&mut first).await;
    assert_eq!(&*g.arm, "a");
    let mut waiting = h.submit(None).await;
    assert_eq!(h.state_of(waiting.id()).await.unwrap().1, "a");
    not_granted(&mut waiting).await;
    // The window turns: b owns the upstream, a's waiting request moves to b
    // and a's running one finishes where it is.
    tokio::time::advance(Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(1)).await; // the tick runs
    let s = h.status().await;
    assert_eq!(s.arms.iter().map(|a| a.slots).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(h.state_of(waiting.id()).await.unwrap().1, "b");
    let newcomer = h.submit(None).await;
    assert_eq!(&**newcomer.arm(), "b");
    first.finish(Outcome::Ok);
    let g = granted(&mut waiting).await;
    assert_eq!(&*g.arm, "b");
    // And back to a after the next window.
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(&**h.submit(None).await.arm(), "a");
}

#[tokio::test(start_paused = true)]
async fn a_nonsense_answer_is_refused_whole_and_fifo_serves_the_arm() {
    // Starts the waiting request plus one that does not exist.
    let (d, _) = script(|v: &View| {
        let mut out: Vec<Action> = v
            .waiting
            .iter()
            .map(|w| Action::Start {
                id: w.id,
                backend: None,
            })
            .collect();
        out.push(Action::Start {
            id: 999,
            backend: None,
        });
        Ok(out)
    });
    let h = start(1, vec![arm("a", 100, d)], weighted(), Limits::default());
    let mut t = h.submit(None).await;
    // Not lost: the FIFO starts it in the same turn.
    granted(&mut t).await;
    let a = &h.status().await.arms[0];
    assert!(a.fallback);
    let err = a.last_error.as_deref().unwrap();
    assert!(err.contains("unknown_id ×1"), "{err}");
    assert!(h.metric("maitre_plugin_faults_total{arm=\"a\",kind=\"invalid\"} 1"));
}

#[tokio::test(start_paused = true)]
async fn a_trapping_plugin_is_ejected_and_its_request_still_served() {
    let (d, _) = script(|_: &View| Err(PluginError::Trap("boom".into())));
    let h = start(1, vec![arm("a", 100, d)], weighted(), Limits::default());
    let mut t = h.submit(None).await;
    granted(&mut t).await;
    assert!(h.metric("maitre_plugin_faults_total{arm=\"a\",kind=\"trap\"} 1"));
}

#[tokio::test(start_paused = true)]
async fn the_watchdog_ejects_a_plugin_that_idles_every_slot_while_requests_wait() {
    let (d, _) = script(|_: &View| Ok(Vec::new()));
    let limits = Limits::default();
    let starvation = Duration::from_millis(limits.starvation_ms);
    let h = start(1, vec![arm("a", 100, d)], weighted(), limits);
    let mut t = h.submit(None).await;
    not_granted(&mut t).await;
    assert!(!h.status().await.arms[0].fallback);
    let g = granted_within(&mut t, 2 * starvation.as_millis() as u64).await;
    assert!(g.is_some(), "the FIFO took over after the watchdog fired");
    assert!(h.metric("kind=\"starvation\""));
}

#[tokio::test(start_paused = true)]
async fn a_rejection_by_the_policy_is_tidied_and_answered() {
    let (d, _) = script(|v: &View| {
        Ok(v.waiting
            .iter()
            .map(|w| Action::Reject {
                id: w.id,
                rejection: Rejection {
                    status: 200,
                    message: "x".repeat(5000),
                },
            })
            .collect())
    });
    let h = start(1, vec![arm("a", 100, d)], weighted(), Limits::default());
    let mut t = h.submit(None).await;
    let r = timeout(Duration::from_millis(50), t.wait_start())
        .await
        .expect("answered")
        .expect_err("rejected");
    assert_eq!(r.status, 503);
    assert_eq!(r.message.len(), check::MAX_REJECTION_MESSAGE);
    assert!(h.metric("kind=\"bad_status\""));
    assert!(h.metric("kind=\"long_message\""));
    assert!(!h.status().await.arms[0].fallback);
}

#[tokio::test(start_paused = true)]
async fn shutdown_answers_waiting_requests_and_refuses_new_ones() {
    let h = start(
        1,
        vec![arm("a", 100, Box::new(Fifo))],
        weighted(),
        Limits::default(),
    );
    let mut running = h.submit(None).await;
    granted(&mut running).await;
    let mut waiting = h.submit(None).await;
    h.sched.shutdown().await;
    let r = waiting.wait_start().await.expect_err("rejected");
    assert_eq!(r.status, 503);
    assert!(matches!(
        h.sched.submit(meta(None, "k")).await,
        Err(SubmitError::ShuttingDown)
    ));
    // The running request still finishes normally.
    running.finish(Outcome::Ok);
    assert_eq!(h.status().await.slots_busy, 0);
}

#[tokio::test(start_paused = true)]
async fn the_queue_limit_is_enforced() {
    let limits = Limits {
        max_waiting: 1,
        ..Limits::default()
    };
    let h = start(1, vec![arm("a", 100, Box::new(Fifo))], weighted(), limits);
    let mut running = h.submit(None).await;
    granted(&mut running).await;
    let _waiting = h.submit(None).await;
    assert!(matches!(
        h.sched.submit(meta(None, "k")).await,
        Err(SubmitError::QueueFull)
    ));
}

#[tokio::test(start_paused = true)]
async fn running_requests_are_shown_oldest_start_first() {
    let (d, views) = script(preempt_for_realtime);
    let h = start(2, vec![arm("a", 100, d)], weighted(), Limits::default());
    let mut first = h.submit(None).await;
    let mut second = h.submit(None).await;
    granted(&mut first).await;
    granted(&mut second).await;
    // Later, the first is requeued and restarts after the second.
    tokio::time::advance(Duration::from_millis(5)).await;
    first.requeue_after_preempt();
    granted(&mut first).await;
    let _third = h.submit(None).await;
    let v = views.lock().unwrap().last().cloned().unwrap();
    let ids: Vec<u64> = v.running.iter().map(|r| r.id).collect();
    assert_eq!(ids, [second.id(), first.id()]);
    assert!(v.running[0].started_ms <= v.running[1].started_ms);
}
