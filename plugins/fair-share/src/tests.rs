use super::*;
use maitre_policy_sdk::testing::{request, running, started, view, waiting};
use maitre_policy_sdk::{Running, Waiting};

fn policy(config: &[(&str, &str)]) -> FairShare {
    let mut entries: Vec<(String, String)> = vec![("maitre.slots".into(), "1".into())];
    entries.extend(config.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    FairShare::init(&Config::from(entries)).unwrap()
}

/// Admits request `id` of `tenant` (100 output tokens, empty body) at
/// `arrival_ms` and returns it as the host would list it waiting.
fn arrive(p: &FairShare, id: u64, tenant: &str, class: Option<Class>, arrival_ms: u64) -> Waiting {
    let req = Request {
        tenant: Some(tenant.into()),
        num_predict: Some(100),
        body_bytes: 0,
        ..request(id, arrival_ms, class)
    };
    let v = view(arrival_ms, 1, vec![], vec![]);
    match p.admit(&req, &v) {
        Admission::Queue(pl) => waiting(id, pl.class, pl.priority, arrival_ms),
        Admission::Reject(r) => panic!("rejected: {}", r.message),
    }
}

/// Serves the queue one request at a time on one slot, each producing
/// `tokens`; returns the order of starts.
fn serve_all(p: &FairShare, mut queue: Vec<Waiting>, now: u64, tokens: u64) -> Vec<u64> {
    let mut order = Vec::new();
    while !queue.is_empty() {
        let ids = started(&p.schedule(&view(now, 1, vec![], queue.clone())));
        assert_eq!(ids.len(), 1);
        order.push(ids[0]);
        queue.retain(|w| w.id != ids[0]);
        // It runs (the policy sees its tokens), then ends.
        let r = Running {
            tokens,
            ..running(ids[0], Class::Batch, 0.0, now)
        };
        let _ = p.schedule(&view(now, 1, vec![r], queue.clone()));
    }
    // The last one ends too.
    let _ = p.schedule(&view(now, 1, vec![], vec![]));
    order
}

#[test]
fn defaults_and_bad_values() {
    let p = policy(&[]);
    assert_eq!(p.output_tokens_default, 256);
    assert_eq!((p.input_weight, p.output_weight), (1.0, 2.0));
    assert!(p.realtime_first);
    let bad = |k: &str, v: &str| {
        let entries = vec![(k.to_string(), v.to_string())];
        FairShare::init(&Config::from(entries)).unwrap_err()
    };
    assert!(bad(OUTPUT_WEIGHT, "0").contains("above 0"));
    assert!(bad("tenant_weights", "1").contains("tenant_weights"));
}

#[test]
fn a_late_tenant_is_not_stuck_behind_a_flood() {
    let p = policy(&[]);
    // Tenant a floods 10 requests, then b sends 2.
    let mut q: Vec<Waiting> = (1..=10).map(|i| arrive(&p, i, "a", None, i)).collect();
    q.push(arrive(&p, 11, "b", None, 20));
    q.push(arrive(&p, 12, "b", None, 21));
    let order = serve_all(&p, q, 100, 100);
    // b's requests are interleaved near the front, not served last.
    assert_eq!(&order[..4], &[1, 11, 2, 12], "{order:?}");
}

#[test]
fn backlogged_tenants_alternate() {
    let p = policy(&[]);
    let mut q = Vec::new();
    for i in 0..4 {
        q.push(arrive(&p, 1 + i, "a", None, i));
        q.push(arrive(&p, 11 + i, "b", None, i));
    }
    let order = serve_all(&p, q, 100, 100);
    assert_eq!(order, vec![1, 11, 2, 12, 3, 13, 4, 14]);
}

#[test]
fn a_tenant_back_from_idle_banks_no_credit() {
    let p = policy(&[]);
    // b was served long ago; a has been busy since.
    let q = vec![arrive(&p, 1, "b", None, 0)];
    serve_all(&p, q, 10, 100);
    let q: Vec<Waiting> = (2..=6).map(|i| arrive(&p, i, "a", None, i)).collect();
    serve_all(&p, q, 20, 100);
    // Now both queue 3 requests: b starts at the current virtual time (one
    // request ahead of a, whose last one just ran), then they alternate; b
    // gets no catch-up burst for the time it was idle.
    let mut q: Vec<Waiting> = (7..=9).map(|i| arrive(&p, i, "a", None, i)).collect();
    q.extend((10..=12).map(|i| arrive(&p, i, "b", None, i)));
    let order = serve_all(&p, q, 30, 100);
    assert_eq!(order, vec![10, 7, 11, 8, 12, 9], "{order:?}");
}

#[test]
fn a_request_that_produced_less_than_charged_is_refunded() {
    let p = policy(&[]);
    let q = vec![arrive(&p, 1, "a", None, 0)];
    let before = p.state.borrow().finish["a"];
    // Charged 100 output tokens, produced 10: the tag moves back 90 × 2.
    serve_all(&p, q, 10, 10);
    let after = p.state.borrow().finish["a"];
    assert_eq!(before - after, 180.0);
}

#[test]
fn realtime_first_then_the_overdue() {
    let p = policy(&[("max_wait_seconds", "1")]);
    let be = arrive(&p, 1, "a", None, 0);
    let rt = arrive(&p, 2, "b", Some(Class::Realtime), 500);
    let q = vec![be, rt];
    assert_eq!(
        started(&p.schedule(&view(600, 1, vec![], q.clone()))),
        vec![2]
    );
    // The batch request has waited past max_wait_seconds: it goes first.
    assert_eq!(started(&p.schedule(&view(1_000, 1, vec![], q))), vec![1]);
}

#[test]
fn fair_order_first_then_the_backend_with_the_model_loaded() {
    use maitre_policy_sdk::testing::{backend, fleet, of_model, placed};
    let p = policy(&[]);
    // Tenant x's request (m1) comes first in fair order, then y's (m0).
    let x = of_model(arrive(&p, 1, "x", None, 0), 1);
    let y = of_model(arrive(&p, 2, "y", None, 0), 0);
    let v = fleet(
        10,
        vec![backend(1, 1, 1, &[0]), backend(1, 1, 1, &[1])],
        vec![],
        vec![y, x],
    );
    assert_eq!(placed(&p.schedule(&v)), [(1, Some(1)), (2, Some(0))]);
}

#[test]
fn under_memory_pressure_a_start_that_evicts_waits_its_bound() {
    use maitre_policy_sdk::testing::{backend, fleet, of_model, placed};
    let p = policy(&[("maitre.slots", "2"), ("group_max_wait_ms", "5000")]);
    // Tenant a is first in fair order, for m2 (loaded nowhere); tenant b
    // asks for m1. One model fits per backend: b0 (m0) is busy, b1 (m1) free.
    let a = of_model(arrive(&p, 1, "a", None, 1_000), 2);
    let b = of_model(arrive(&p, 2, "b", None, 1_001), 1);
    let bs = || vec![backend(1, 0, 1, &[0]), backend(1, 1, 1, &[1])];
    // m1 goes where it is loaded; a's start would evict m1 there, so it waits.
    let v = fleet(2_000, bs(), vec![], vec![a, b]);
    assert_eq!(placed(&p.schedule(&v)), [(2, Some(1))]);
    // Without b, a takes the slot at once (passed over only for others).
    let v = fleet(2_000, bs(), vec![], vec![a]);
    assert_eq!(placed(&p.schedule(&v)), [(1, Some(1))]);
    // Once a has waited group_max_wait_ms, fair order holds again.
    let v = fleet(6_000, bs(), vec![], vec![a, b]);
    assert_eq!(placed(&p.schedule(&v)), [(1, Some(1))]);
    // group_max_wait_ms = 0: never passed over.
    let p0 = policy(&[("maitre.slots", "2"), ("group_max_wait_ms", "0")]);
    let a = of_model(arrive(&p0, 1, "a", None, 1_000), 2);
    let b = of_model(arrive(&p0, 2, "b", None, 1_001), 1);
    let v = fleet(2_000, bs(), vec![], vec![a, b]);
    assert_eq!(placed(&p0.schedule(&v)), [(1, Some(1))]);
}
