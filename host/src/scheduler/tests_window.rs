//! The candidate window a 0.2.0 decider sees, under a paused clock: bounded,
//! holding each class's oldest and highest-priority requests, with the rest
//! summarised; a 0.1.0 decider still sees every waiting request.

use std::sync::{Arc, Mutex};

use super::tests::{arm, granted, start, weighted};
use super::view::BUSY_WINDOW;
use super::*;
use crate::config::Limits;
use crate::policy::{Action, Admission, Class, Request, View};

/// FIFO that records its views; `windowed` says which interface it plays.
struct Watcher {
    windowed: bool,
    views: Arc<Mutex<Vec<View>>>,
    admit_views: Arc<Mutex<Vec<View>>>,
}

impl Decider for Watcher {
    fn admit<'a>(&'a mut self, req: &'a Request, v: &'a View) -> decider::Decision<'a, Admission> {
        self.admit_views.lock().unwrap().push(v.clone());
        let a = Fifo::admission(req);
        Box::pin(async move { Ok(a) })
    }
    fn schedule<'a>(&'a mut self, view: &'a View) -> decider::Decision<'a, Vec<Action>> {
        self.views.lock().unwrap().push(view.clone());
        let a = Fifo::actions(view);
        Box::pin(async move { Ok(a) })
    }
    fn windowed(&self) -> bool {
        self.windowed
    }
}

/// One slot held by request 1, then 100 batch and 5 real-time requests
/// waiting (the window is `candidate_window`). Returns the last view the
/// decider got with the slot held, the last `admit` got, and the view of the
/// decision after request 1 finished and freed the slot.
async fn last_views(windowed: bool, candidate_window: usize) -> (View, View, View) {
    let views = Arc::new(Mutex::new(Vec::new()));
    let admit_views = Arc::new(Mutex::new(Vec::new()));
    let w = Watcher {
        windowed,
        views: views.clone(),
        admit_views: admit_views.clone(),
    };
    let limits = Limits {
        candidate_window,
        ..Limits::default()
    };
    let h = start(1, vec![arm("a", 100, Box::new(w))], weighted(), limits);
    let mut first = h.submit(None).await;
    granted(&mut first).await;
    let mut tickets = Vec::new();
    for _ in 0..100 {
        tickets.push(h.submit(Some("batch")).await);
    }
    for _ in 0..5 {
        tickets.push(h.submit(Some("realtime")).await);
    }
    // A tick makes the arm decide again with everything queued.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let busy = views.lock().unwrap().last().cloned().unwrap();
    let a = admit_views.lock().unwrap().last().cloned().unwrap();
    first.finish(Outcome::Ok);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let freed = views.lock().unwrap().last().cloned().unwrap();
    drop(tickets);
    (busy, a, freed)
}

#[tokio::test(start_paused = true)]
async fn a_windowed_decider_sees_a_bounded_window_and_a_summary_of_the_rest() {
    let (busy, admitted, v) = last_views(true, 16).await;
    assert_eq!(busy.free_slots, 0);
    assert_eq!(busy.waiting.len(), 16);
    // `admit` sees the queue only as counts (the last arrival found 104
    // waiting: 100 batch and 4 real-time).
    assert!(admitted.waiting.is_empty());
    let counts: Vec<(Class, u32)> = admitted.beyond.iter().map(|b| (b.class, b.count)).collect();
    assert_eq!(counts, vec![(Class::Realtime, 4), (Class::Batch, 100)]);
    assert_eq!(v.free_slots, 1);
    assert_eq!(v.waiting.len(), 16);
    let rt = v
        .waiting
        .iter()
        .filter(|w| w.class == Class::Realtime)
        .count();
    assert_eq!(rt, 5, "every real-time request fits in its share");
    // Batch: the 11 oldest (all priority 0, so oldest is highest too).
    let batch: Vec<u64> = v
        .waiting
        .iter()
        .filter(|w| w.class == Class::Batch)
        .map(|w| w.id)
        .collect();
    assert_eq!(batch, (2..=12).collect::<Vec<u64>>());
    assert_eq!(v.beyond.len(), 1);
    let b = &v.beyond[0];
    assert_eq!((b.class, b.count), (Class::Batch, 89));
    assert_eq!(b.highest_priority, Some(0.0));
    assert!(b.oldest_arrival_ms.is_some());
}

#[tokio::test(start_paused = true)]
async fn a_0_1_0_decider_still_sees_the_whole_queue() {
    let (v, admitted, _) = last_views(false, 16).await;
    assert_eq!(v.waiting.len(), 105);
    assert!(v.beyond.is_empty());
    assert_eq!(admitted.waiting.len(), 104);
}

#[tokio::test(start_paused = true)]
async fn with_no_slot_free_the_window_shrinks_to_what_preemption_needs() {
    let (busy, _, freed) = last_views(true, 64).await;
    // Every slot busy: only pre-emption or rejection can act, for the
    // oldest and the highest of each class; all 5 real-time requests are
    // among the 16.
    assert_eq!(busy.free_slots, 0);
    assert_eq!(busy.waiting.len(), BUSY_WINDOW);
    let rt = busy
        .waiting
        .iter()
        .filter(|w| w.class == Class::Realtime)
        .count();
    assert_eq!(rt, 5);
    let beyond: u32 = busy.beyond.iter().map(|b| b.count).sum();
    assert_eq!(beyond as usize, 105 - BUSY_WINDOW);
    // A slot frees: the next call offers the whole window to start from.
    assert_eq!(freed.free_slots, 1);
    assert_eq!(freed.waiting.len(), 64);
}
