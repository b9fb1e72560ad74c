use super::*;
use crate::testing::{backend, fleet, of_model, waiting};

const BE: Class = Class::Batch;
const RT: Class = Class::Realtime;

#[test]
fn best_backend_prefers_loaded_then_room_then_the_host() {
    // b0: m1 loaded, full. b1: m0 loaded, at its limit of 1. b2: room.
    let v = fleet(
        0,
        vec![
            backend(2, 0, 2, &[1]),
            backend(2, 1, 1, &[0]),
            backend(2, 2, 2, &[2]),
        ],
        vec![],
        vec![],
    );
    assert_eq!(v.best_backend(0), Some(1), "loaded with a free slot");
    assert_eq!(v.best_backend(2), Some(2));
    assert_eq!(v.best_backend(1), Some(2), "m1's backend is full: room");
    assert_eq!(v.best_backend(3), Some(2));
    // Without room anywhere, the host chooses.
    let v = fleet(
        0,
        vec![backend(2, 1, 1, &[0]), backend(2, 2, 1, &[1])],
        vec![],
        vec![],
    );
    assert_eq!(v.best_backend(2), None);
    assert_eq!(v.best_backend(1), Some(1));
    // Unknown limit (0): room.
    let v = fleet(0, vec![backend(1, 1, 0, &[0, 1, 2])], vec![], vec![]);
    assert_eq!(v.best_backend(5), Some(0));
}

#[test]
fn unhealthy_backends_are_never_named() {
    let mut down = backend(2, 2, 2, &[0]);
    down.healthy = false;
    let v = fleet(0, vec![down.clone(), backend(2, 2, 2, &[])], vec![], vec![]);
    assert_eq!(v.best_backend(0), Some(1), "room on the healthy one");
    // Every backend down: the host decides (it dispatches anyway).
    let v = fleet(0, vec![down.clone(), down], vec![], vec![]);
    assert_eq!(v.best_backend(0), None);
    let plan = Plan::new(&v);
    assert!(plan.blind());
    assert_eq!(plan.pick(0, |_| true).and_then(|p| p.named()), None);
}

#[test]
fn least_busy_then_first_listed_within_a_tier() {
    let v = fleet(
        0,
        vec![
            backend(4, 1, 3, &[0]),
            backend(2, 2, 3, &[0]),
            backend(2, 2, 3, &[0]),
        ],
        vec![],
        vec![],
    );
    assert_eq!(v.best_backend(0), Some(1));
}

#[test]
fn a_plan_books_slots_and_loads() {
    // b0 has m0 and one free slot; b1 has room for one more model.
    let v = fleet(
        0,
        vec![backend(2, 1, 1, &[0]), backend(2, 2, 2, &[1])],
        vec![],
        vec![],
    );
    let mut plan = Plan::new(&v);
    let starts: Vec<Action> = [(1, 0), (2, 0), (3, 2), (4, 3)]
        .into_iter()
        .map(|(id, m)| plan.start(id, m))
        .collect();
    assert_eq!(
        crate::testing::placed(&starts),
        [
            (1, Some(0)),
            // b0 is full now; b1 has room for m0, which this decision loads.
            (2, Some(1)),
            // b1 is at its limit (m1 and m0) and b0 full: the host chooses.
            (3, None),
            (4, None),
        ]
    );
    assert_eq!((plan.free(0), plan.free(1)), (0, 0));
    assert!(plan.has(1, 0));
}

#[test]
fn under_pressure_batch_for_a_loaded_model_goes_first_bounded_by_waiting() {
    // b0 runs m0 (busy), b1 has m1 and a free slot, every backend at its limit.
    let v = fleet(
        10_000,
        vec![backend(1, 0, 1, &[0]), backend(2, 1, 1, &[1])],
        vec![],
        vec![],
    );
    let plan = Plan::new(&v);
    let max = 5_000;
    let young = |id, class, m| of_model(waiting(id, class, 0.0, 9_000), m);
    // m0 is loaded on the busy b0: waiting for it beats evicting m1.
    assert_eq!(plan.hold(&young(1, BE, 0), max, |_| true), Hold::Wait);
    // m2 is loaded nowhere: it costs a load anyway, after the others.
    assert_eq!(plan.hold(&young(2, BE, 2), max, |_| true), Hold::Later);
    assert_eq!(plan.hold(&young(3, BE, 1), max, |_| true), Hold::Go);
    // Real-time always goes; so does a request that waited long enough.
    assert_eq!(plan.hold(&young(4, RT, 0), max, |_| true), Hold::Go);
    let old = of_model(waiting(5, BE, 0.0, 5_000), 0);
    assert_eq!(plan.hold(&old, max, |_| true), Hold::Go);
    // No pressure (room on a backend with a free slot): everything goes.
    let v = fleet(
        10_000,
        vec![backend(1, 0, 1, &[0]), backend(2, 1, 2, &[1])],
        vec![],
        vec![],
    );
    assert_eq!(
        Plan::new(&v).hold(&young(1, BE, 0), max, |_| true),
        Hold::Go
    );
}

#[test]
fn a_request_for_m_matches_m_latest_loaded() {
    assert_eq!(model_key("llama3"), "llama3:latest");
    assert_eq!(model_key("llama3:8b"), "llama3:8b");
    assert_eq!(model_key("host:5000/ns/m"), "host:5000/ns/m:latest");
    assert_eq!(model_key(""), "");
    // Names: 0 "alpha:latest" (as /api/ps says), 1 "alpha" (as a request says).
    let mut v = fleet(
        0,
        vec![backend(2, 2, 1, &[2]), backend(2, 2, 1, &[0])],
        vec![],
        vec![],
    );
    v.names = vec!["alpha:latest".into(), "alpha".into(), "beta:latest".into()];
    assert_eq!(v.best_backend(1), Some(1));
    let mut plan = Plan::new(&v);
    assert!(plan.has(1, 1));
    // Booked as "alpha", it counts as "alpha:latest" loaded.
    let p = plan.pick(1, |b| b == 0).unwrap();
    assert_eq!(p.fit, Fit::Evict);
    plan.book(p, 1);
    assert!(plan.has(0, 0));
}
