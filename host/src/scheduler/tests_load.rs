//! The state machine under bursts and stalls, with the paused clock and the
//! test doubles of [`super::tests`]: a burst of arrivals must not hold back
//! dispatch, and a pre-emption whose victim is slow to let go must not keep
//! a started request from a slot that frees elsewhere in its arm.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::tests::{
    arm, granted, meta, not_granted, preempt_for_realtime, script, start, weighted,
};
use super::*;
use crate::config::Limits;
use crate::policy::{Action, Admission, Class, Placement, Request, View};

/// FIFO that counts `admit` calls and notes, at each start it orders, how
/// many admits it had seen by then.
struct Counting {
    admits: Arc<AtomicUsize>,
    admits_at_starts: Arc<Mutex<Vec<usize>>>,
}

impl Decider for Counting {
    fn admit<'a>(&'a mut self, req: &'a Request, _: &'a View) -> decider::Decision<'a, Admission> {
        self.admits.fetch_add(1, Ordering::Relaxed);
        let class = req.class_hint.unwrap_or(Class::Batch);
        Box::pin(async move {
            Ok(Admission::Queue(Placement {
                class,
                priority: 0.0,
            }))
        })
    }
    fn schedule<'a>(&'a mut self, view: &'a View) -> decider::Decision<'a, Vec<Action>> {
        let actions = Fifo::actions(view);
        let seen = self.admits.load(Ordering::Relaxed);
        self.admits_at_starts
            .lock()
            .unwrap()
            .extend(actions.iter().map(|_| seen));
        Box::pin(async move { Ok(actions) })
    }
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_arrivals_does_not_hold_back_the_first_start() {
    const BURST: usize = 2_000;
    let admits_at_starts = Arc::new(Mutex::new(Vec::new()));
    let d = Counting {
        admits: Arc::new(AtomicUsize::new(0)),
        admits_at_starts: admits_at_starts.clone(),
    };
    let limits = Limits {
        max_waiting: 2 * BURST,
        ..Limits::default()
    };
    let h = start(1, vec![arm("a", 100, Box::new(d))], weighted(), limits);
    // The whole burst is queued before the scheduler task runs once.
    let replies: Vec<_> = (0..BURST)
        .map(|_| {
            let (reply, rx) = oneshot::channel();
            h.sched
                .tx
                .send(Msg::Submit {
                    meta: meta(None, "k"),
                    reply,
                })
                .unwrap_or_else(|_| panic!("scheduler gone"));
            rx
        })
        .collect();
    let mut tickets = Vec::with_capacity(BURST);
    for r in replies {
        tickets.push(r.await.unwrap().expect("admitted"));
    }
    granted(&mut tickets[0]).await;
    let starts = admits_at_starts.lock().unwrap().clone();
    let first = *starts.first().expect("something was started");
    assert!(
        first < BURST,
        "the first start waited for all {BURST} admits of the burst"
    );
    assert!(first <= core::MAX_MESSAGES_PER_TURN, "{first}");
    not_granted(&mut tickets[1]).await;
}

#[tokio::test(start_paused = true)]
async fn a_handoff_takes_any_slot_of_its_arm_that_frees() {
    let (d, _) = script(preempt_for_realtime);
    let h = start(2, vec![arm("a", 100, d)], weighted(), Limits::default());
    let mut b1 = h.submit(Some("batch")).await;
    let mut b2 = h.submit(Some("batch")).await;
    let g1 = granted(&mut b1).await;
    granted(&mut b2).await;
    let mut rt = h.submit(Some("realtime")).await;
    // b1 is pre-empted for rt, but its handler is slow to let the upstream go.
    assert!(g1.run.preempt.is_cancelled());
    assert_eq!(h.state_of(rt.id()).await.unwrap().0, "handoff");
    not_granted(&mut rt).await;
    // Another slot of the arm frees first: rt takes it rather than wait.
    b2.finish(Outcome::Ok);
    granted(&mut rt).await;
    assert_eq!(h.status().await.slots_busy, 2, "b1 still holds its slot");
    // When b1 lets go at last, its slot is simply free again.
    b1.requeue_after_preempt();
    let again = granted(&mut b1).await;
    assert_eq!(again.preemptions, 1);
    let s = h.status().await;
    assert_eq!((s.slots_busy, s.waiting), (2, 0));
}

#[tokio::test(start_paused = true)]
async fn a_cut_stream_frees_its_slot_at_once_when_its_relay_can_close_the_upstream() {
    let (d, _) = script(preempt_for_realtime);
    let h = start(1, vec![arm("a", 100, d)], weighted(), Limits::default());
    let mut batch = h.submit(Some("batch")).await;
    let id = batch.id();
    let g = granted(&mut batch).await;
    assert!(g.run.mark_streaming());
    let closed = Arc::new(AtomicUsize::new(0));
    let c = closed.clone();
    assert!(g.run.on_cut(Box::new(move || {
        c.fetch_add(1, Ordering::Relaxed);
        None
    })));
    // The batch client is not reading: its handler does nothing more.
    let mut rt = h.submit(Some("realtime")).await;
    granted(&mut rt).await;
    assert_eq!(closed.load(Ordering::Relaxed), 1, "upstream closed first");
    assert_eq!(h.state_of(batch.id()).await.unwrap().0, "cut");
    let s = h.status().await;
    assert_eq!((s.slots_busy, s.waiting), (1, 0));
    // When its client reads the end at last, the request just ends.
    batch.finish(Outcome::Cancelled);
    assert!(h.state_of(id).await.is_none());
    rt.finish(Outcome::Ok);
    assert_eq!(h.status().await.slots_busy, 0);
}

#[tokio::test(start_paused = true)]
async fn a_cut_stream_frees_its_slot_only_once_the_upstream_lets_go() {
    let (d, _) = script(preempt_for_realtime);
    let h = start(1, vec![arm("a", 100, d)], weighted(), Limits::default());
    let mut batch = h.submit(Some("batch")).await;
    let g = granted(&mut batch).await;
    assert!(g.run.mark_streaming());
    let let_go = LetGo::new();
    let l = let_go.clone();
    assert!(g.run.on_cut(Box::new(move || Some(l))));
    let mut rt = h.submit(Some("realtime")).await;
    // The upstream has not let go yet: the slot is still the batch's.
    not_granted(&mut rt).await;
    assert_eq!(h.state_of(batch.id()).await.unwrap().0, "preempting");
    let_go.set();
    granted(&mut rt).await;
    assert_eq!(h.state_of(batch.id()).await.unwrap().0, "cut");
    batch.finish(Outcome::Cancelled);
    rt.finish(Outcome::Ok);
    assert_eq!(h.status().await.slots_busy, 0);
}

#[tokio::test(start_paused = true)]
async fn a_requeue_after_a_preemption_waits_for_the_upstream_to_let_go() {
    let (d, _) = script(preempt_for_realtime);
    let h = start(1, vec![arm("a", 100, d)], weighted(), Limits::default());
    let mut batch = h.submit(Some("batch")).await;
    granted(&mut batch).await;
    let let_go = LetGo::new();
    let l = let_go.clone();
    batch.dispatched(Box::new(move || Some(l)));
    let mut rt = h.submit(Some("realtime")).await;
    // The policy pre-empted the batch request; its handler gives up the
    // upstream connection and requeues it, but the slot waits for the upstream.
    assert_eq!(h.state_of(batch.id()).await.unwrap().0, "preempting");
    batch.requeue_after_preempt();
    not_granted(&mut rt).await;
    assert_eq!(h.status().await.slots_busy, 1);
    let_go.set();
    granted(&mut rt).await;
    assert_eq!(h.state_of(batch.id()).await.unwrap().0, "waiting");
    rt.finish(Outcome::Ok);
    granted(&mut batch).await;
}
