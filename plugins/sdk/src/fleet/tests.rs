use super::*;
use crate::testing::{backend, fleet, of_model, on, waiting};

const BE: Class = Class::Batch;
const RT: Class = Class::Realtime;

#[test]
fn best_backend_prefers_loaded_then_room_then_the_cheapest_eviction() {
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
    // Without room anywhere, an eviction is named: victims equally cheap
    // (nobody needs m0 or m1), so the least busy.
    let v = fleet(
        0,
        vec![backend(2, 1, 1, &[0]), backend(2, 2, 1, &[1])],
        vec![],
        vec![],
    );
    assert_eq!(v.best_backend(2), Some(1));
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
fn has_room_answers_whether_pick_finds_a_place() {
    let mut down = backend(2, 2, 2, &[]);
    down.healthy = false;
    // b0 down with free slots, b1 full, b2 one free slot.
    let v = fleet(
        0,
        vec![down.clone(), backend(2, 0, 2, &[0]), backend(2, 1, 2, &[])],
        vec![],
        vec![],
    );
    let mut plan = Plan::new(&v);
    assert!(plan.has_room(|_| true));
    assert!(!plan.has_room(|b| b != 2), "b2 is the only open one");
    let pick = plan.pick(0, |_| true).expect("b2");
    plan.book(pick, 0);
    assert!(!plan.has_room(|_| true), "booked full");
    assert_eq!(plan.pick(0, |_| true), None);
    // Every backend down: the host decides, so there is always room.
    let v = fleet(0, vec![down], vec![], vec![]);
    assert!(Plan::new(&v).has_room(|_| false));
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
            // b1 is at its limit (m1 and m0) and b0 full: b1 evicts m1 (its
            // least recently used; m0 is this decision's).
            (3, Some(1)),
            // No free slot left: the host's rule (nothing to start on).
            (4, None),
        ]
    );
    assert_eq!((plan.free(0), plan.free(1)), (0, 0));
    assert!(plan.has(1, 0));
    assert!(plan.has(1, 2) && !plan.has(1, 1), "m1 evicted for m2");
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

/// A backend at its limit with `loaded` models (id, expires_ms).
fn full(total: u32, free: u32, loaded: &[(u32, Option<u64>)]) -> crate::Backend {
    let mut b = backend(total, free, loaded.len() as u32, &[]);
    b.loaded = loaded
        .iter()
        .map(|&(model, expires_ms)| crate::LoadedModel {
            model,
            size_bytes: 0,
            expires_ms,
        })
        .collect();
    b
}

#[test]
fn the_victim_is_the_least_recently_used_not_running_model() {
    // m0 expires first, m1 later, m2 has no expiry (traffic since the poll).
    let v = fleet(
        0,
        vec![full(2, 2, &[(1, Some(900)), (0, Some(500)), (2, None)])],
        vec![],
        vec![],
    );
    let plan = Plan::new(&v);
    assert_eq!(plan.victim(0), Some(0), "smallest expires_ms");
    // A request running m0 there: m0 is in use, m1 goes.
    let v = fleet(
        0,
        vec![full(2, 1, &[(1, Some(900)), (0, Some(500)), (2, None)])],
        vec![on(crate::testing::running(1, BE, 0.0, 0), 0, 0)],
        vec![],
    );
    assert_eq!(Plan::new(&v).victim(0), Some(1));
    // Booking an eviction removes the victim: the next load evicts the next.
    let v = fleet(0, vec![full(2, 2, &[(0, Some(1)), (1, Some(2))])], vec![], vec![]);
    let mut plan = Plan::new(&v);
    let p = plan.pick(5, |_| true).unwrap();
    assert_eq!((p.backend, p.fit), (Some(0), Fit::Evict));
    plan.book(p, 5);
    assert!(!plan.has(0, 0) && plan.has(0, 1) && plan.has(0, 5));
    assert_eq!(plan.victim(0), Some(1), "the new m5 is the newest");
    assert_eq!(plan.fit(0, 6), Fit::Evict, "still at its limit");
}

/// Every backend full and at its limit: b0's victim is m2, b1's is m0
/// (loaded on b2 too), b2's is m3.
fn three_full() -> Vec<crate::Backend> {
    vec![
        full(2, 2, &[(2, Some(1)), (1, Some(9))]),
        full(2, 1, &[(0, Some(1)), (4, Some(9))]),
        full(2, 1, &[(3, Some(1)), (0, Some(9))]),
    ]
}

/// Batch request `id` for model `m`, waiting since 0.
fn wait(id: u64, m: u32) -> Waiting {
    of_model(waiting(id, BE, 0.0, 0), m)
}

#[test]
fn a_load_evicts_a_spare_copy_or_an_idle_model_before_the_only_copy_in_demand() {
    // b0's victim m2 is the only copy and two requests wait for it; b1's
    // victim m0 is loaded on b2 too; b2's victim m3 is the only copy, no
    // one needs it.
    let v = fleet(0, three_full(), vec![], vec![wait(1, 2), wait(2, 2), wait(3, 5), wait(4, 0)]);
    let plan = Plan::new(&v);
    assert_eq!(plan.victim_cost(0), (2, 2));
    assert_eq!(plan.victim_cost(1), (1, 1), "m0 is on b2 too");
    assert_eq!(plan.victim_cost(2), (1, 0), "nobody needs m3");
    // Though b0 is the least busy, its victim is the only copy of m2.
    assert_eq!(v.best_backend(5), Some(2));
    // Once m3's requests wait too, the spare copy of m0 is the cheapest.
    let ws = [(1, 2), (2, 2), (3, 5), (4, 0), (5, 3), (6, 3)];
    let v = fleet(0, three_full(), vec![], ws.iter().map(|&(i, m)| wait(i, m)).collect());
    assert_eq!(v.best_backend(5), Some(1));
    // Evicting m0 from b1 leaves b2's m0 as the only copy: the next load
    // in the same decision does not take it.
    let mut plan = Plan::new(&v);
    let start = plan.start(3, 5);
    assert_eq!(crate::testing::placed(&[start]), [(3, Some(1))]);
    assert_eq!(plan.victim_cost(2), (2, 2), "m3, the only copy, two wait");
    assert_eq!(plan.copies(0), 1);
}

#[test]
fn a_protected_model_is_evicted_last_even_as_a_spare_copy() {
    // As above with m3's requests waiting: the spare copy of m0 on b1 is
    // the cheapest victim, until the policy protects m0 (real-time uses it).
    let ws = [(1, 2), (2, 2), (3, 5), (4, 0), (5, 3), (6, 3)];
    let v = fleet(0, three_full(), vec![], ws.iter().map(|&(i, m)| wait(i, m)).collect());
    let mut plan = Plan::new(&v);
    assert_eq!(plan.pick(5, |_| true).and_then(|p| p.named()), Some(1));
    plan.protect(0);
    assert_eq!(plan.victim_cost(1), (3, 1));
    // Then the only copies: m2 on b0 and m3 on b2, two wait for each, so
    // (2, 2) both: the least busy, b0.
    assert_eq!(plan.pick(5, |_| true).and_then(|p| p.named()), Some(0));
}

#[test]
fn realtime_waits_for_its_models_busy_backend_bounded() {
    // b0 runs m0 (full), b1 has a free slot and m1, at its limit.
    let v = fleet(
        10_000,
        vec![backend(1, 0, 1, &[0]), backend(1, 1, 1, &[1])],
        vec![],
        vec![],
    );
    let plan = Plan::new(&v);
    let rt = |id, m, at| of_model(waiting(id, RT, 0.0, at), m);
    assert_eq!(plan.hold_realtime(&rt(1, 0, 9_500), 1_000), Hold::Wait);
    assert_eq!(plan.hold_realtime(&rt(1, 0, 9_000), 1_000), Hold::Go, "bound");
    assert_eq!(plan.hold_realtime(&rt(2, 1, 9_900), 1_000), Hold::Go, "loaded");
    assert_eq!(plan.hold_realtime(&rt(3, 2, 9_900), 1_000), Hold::Go, "nowhere");
    assert_eq!(plan.hold_realtime(&rt(1, 0, 9_999), 0), Hold::Go, "0: never");
}
