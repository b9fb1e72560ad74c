//! Shadow arms under a paused clock: they are shown every decision of the
//! serving arm, their answers are compared and counted, and nothing they do
//! (disagree, fail, hang) changes what the serving arm does.

use std::future::pending;

use super::tests::{Harness, arm, granted, not_granted, script, start, weighted};
use super::*;
use crate::config::Limits;
use crate::plugin::PluginError;
use crate::policy::{Action, Admission, Request, View};

fn shadow(name: &str, decider: Box<dyn Decider>) -> ArmSpec {
    ArmSpec {
        shadow: true,
        ..arm(name, 0, decider)
    }
}

/// Starts the newest waiting request first (FIFO starts the oldest).
fn newest_first(v: &View) -> Result<Vec<Action>, PluginError> {
    Ok(v.waiting
        .iter()
        .rev()
        .take(v.free_slots as usize)
        .map(|w| Action::Start {
            id: w.id,
            backend: None,
        })
        .collect())
}

/// Lets the shadow's task catch up (it runs on the same paused runtime).
async fn settle(h: &Harness) -> report::AbReport {
    tokio::time::sleep(Duration::from_millis(20)).await;
    h.sched.report(Duration::from_secs(60)).await.unwrap()
}

/// One slot, three requests, each finished in turn: three decisions.
async fn three_in_turn(h: &Harness) -> Vec<u64> {
    let mut ts = vec![
        h.submit(None).await,
        h.submit(None).await,
        h.submit(None).await,
    ];
    let mut order = Vec::new();
    for _ in 0..3 {
        let mut started = None;
        for (i, t) in ts.iter_mut().enumerate() {
            if super::tests::granted_within(t, 20).await.is_some() {
                started = Some(i);
                break;
            }
        }
        let t = ts.remove(started.expect("one request starts per free slot"));
        order.push(t.id());
        t.finish(Outcome::Ok);
    }
    order
}

#[tokio::test(start_paused = true)]
async fn a_shadow_that_agrees_is_counted_as_agreeing() {
    let h = start(
        1,
        vec![
            arm("live", 100, Box::new(Fifo)),
            shadow("cand", Box::new(Fifo)),
        ],
        weighted(),
        Limits::default(),
    );
    assert_eq!(three_in_turn(&h).await, vec![1, 2, 3]);
    let r = settle(&h).await;
    let s = &r.shadows[0];
    assert_eq!((s.arm.as_str(), s.watches.as_str()), ("cand", "live"));
    // Every decision of the serving arm (one per turn with requests waiting,
    // whether or not a slot is free) was shown to the shadow.
    assert!(s.schedule_agree >= 3 && s.schedule_differ == 0, "{s:?}");
    assert_eq!((s.admit_agree, s.admit_differ), (3, 0));
    assert!(s.examples.is_empty());
    // A shadow is not an arm: it has no slots and no requests.
    assert_eq!(h.status().await.arms.len(), 1);
    assert!(h.metric(&format!(
        "maitre_shadow_decisions_total{{arm=\"cand\",result=\"schedule_agree\"}} {}",
        s.schedule_agree
    )));
}

#[tokio::test(start_paused = true)]
async fn a_shadow_that_disagrees_is_counted_and_never_acts() {
    let (newest, _) = script(newest_first);
    let h = start(
        1,
        vec![arm("live", 100, Box::new(Fifo)), shadow("cand", newest)],
        weighted(),
        Limits::default(),
    );
    let mut t1 = h.submit(None).await;
    granted(&mut t1).await;
    let mut t2 = h.submit(None).await;
    let mut t3 = h.submit(None).await;
    // When the slot frees with 2 and 3 waiting, FIFO (serving) starts 2; the
    // shadow would start 3. Only the serving arm's answer is applied.
    t1.finish(Outcome::Ok);
    granted(&mut t2).await;
    not_granted(&mut t3).await;
    let r = settle(&h).await;
    let s = &r.shadows[0];
    assert_eq!(s.schedule_differ, 1, "{s:?}");
    assert!(
        s.examples
            .iter()
            .any(|e| e.contains("would start {3}, the serving arm chose to start {2}")),
        "{:?}",
        s.examples
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_shadow_is_ejected_and_serving_goes_on() {
    let (broken, _) = script(|_| Err(PluginError::Trap("wasm trap: unreachable".into())));
    let h = start(
        1,
        vec![arm("live", 100, Box::new(Fifo)), shadow("cand", broken)],
        weighted(),
        Limits::default(),
    );
    assert_eq!(three_in_turn(&h).await, vec![1, 2, 3]);
    let r = settle(&h).await;
    let s = &r.shadows[0];
    assert!(s.ejected && s.faults == 1, "{s:?}");
    assert!(s.last_error.as_deref().unwrap().contains("unreachable"));
    // Counted under the shadow's name, as a live arm's fault would be; the
    // serving arm has none.
    assert!(h.metric("maitre_plugin_faults_total{arm=\"cand\",kind=\"trap\"} 1"));
    assert!(!h.metric("arm=\"live\",kind=\"trap\""));
    assert!(!h.status().await.arms[0].fallback);
}

/// A shadow whose every call hangs.
struct Hung;

impl Decider for Hung {
    fn admit<'a>(&'a mut self, _: &'a Request, _: &'a View) -> decider::Decision<'a, Admission> {
        Box::pin(pending())
    }
    fn schedule<'a>(&'a mut self, _: &'a View) -> decider::Decision<'a, Vec<Action>> {
        Box::pin(pending())
    }
}

#[tokio::test(start_paused = true)]
async fn a_hung_shadow_delays_no_decision() {
    let h = start(
        1,
        vec![
            arm("live", 100, Box::new(Fifo)),
            shadow("cand", Box::new(Hung)),
        ],
        weighted(),
        Limits::default(),
    );
    // More decisions than the shadow's queue holds: each is still made at
    // once, and the ones the shadow could not take are counted as skipped.
    let n = 300;
    for i in 0..n {
        let mut t = h.submit(None).await;
        assert!(
            super::tests::granted_within(&mut t, 5).await.is_some(),
            "request {i} waited for the shadow"
        );
        t.finish(Outcome::Ok);
    }
    let r = settle(&h).await;
    let s = &r.shadows[0];
    assert_eq!(s.schedule_agree + s.schedule_differ, 0);
    assert!(s.skipped > 0, "{s:?}");
}
