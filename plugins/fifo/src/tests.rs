use super::*;
use maitre_policy_sdk::testing::{describe, request, running, view, waiting};

fn fifo() -> Fifo {
    Fifo::init(&Config::default()).unwrap()
}

#[test]
fn admits_with_hint_or_default_class_and_priority_zero() {
    let v = view(0, 2, vec![], vec![]);
    let q = |p: &Fifo, hint| match p.admit(&request(1, 0, hint), &v) {
        Admission::Queue(pl) => (pl.class, pl.priority),
        Admission::Reject(r) => panic!("rejected: {}", r.message),
    };
    assert_eq!(q(&fifo(), None), (Class::Batch, 0.0));
    assert_eq!(q(&fifo(), Some(Class::Realtime)), (Class::Realtime, 0.0));
    let rt = Fifo::init(&Config::from([("default_class", "realtime")])).unwrap();
    assert_eq!(q(&rt, None), (Class::Realtime, 0.0));
    assert_eq!(q(&rt, Some(Class::Batch)), (Class::Batch, 0.0));
}

#[test]
fn starts_in_arrival_order_then_id_while_slots_are_free() {
    // Listed out of order on purpose: the policy must not rely on it.
    let v = view(
        100,
        3,
        vec![running(9, Class::Batch, 0.0, 0)],
        vec![
            waiting(4, Class::Realtime, 0.0, 30),
            waiting(3, Class::Batch, 0.0, 20),
            waiting(2, Class::Batch, 0.0, 20),
            waiting(1, Class::Batch, 0.0, 10),
        ],
    );
    assert_eq!(describe(&fifo().schedule(&v)), ["start 1", "start 2"]);
}

#[test]
fn class_does_not_matter_and_nothing_starts_without_free_slots() {
    let w = vec![
        waiting(1, Class::Batch, 0.0, 10),
        waiting(2, Class::Realtime, 0.0, 20),
    ];
    let v = view(100, 1, vec![], w.clone());
    assert_eq!(describe(&fifo().schedule(&v)), ["start 1"]);
    let full = view(100, 1, vec![running(9, Class::Batch, 0.0, 0)], w);
    assert!(fifo().schedule(&full).is_empty());
}

#[test]
fn never_preempts() {
    let v = view(
        100_000,
        1,
        vec![running(9, Class::Batch, 0.0, 0)],
        vec![waiting(1, Class::Realtime, 1.0, 10)],
    );
    assert!(fifo().schedule(&v).is_empty());
}

#[test]
fn config_errors_name_the_key() {
    let e = Fifo::init(&Config::from([("default_class", "vip")])).unwrap_err();
    assert!(e.starts_with("default_class: "), "{e}");
    let e = Fifo::init(&Config::from([("rt_reserved_slots", "1")])).unwrap_err();
    assert!(
        e.contains("\"rt_reserved_slots\"") && e.contains("default_class"),
        "{e}"
    );
    // The host's own keys are always accepted.
    Fifo::init(&Config::from([("maitre.slots", "2"), ("maitre.arm", "a")])).unwrap();
}

#[test]
fn starts_name_the_backend_with_the_model_loaded() {
    use maitre_policy_sdk::testing::{backend, fleet, of_model, placed};
    // b0 has m0, b1 has m1, b2 has room; every backend one free slot.
    let v = fleet(
        1_000,
        vec![
            backend(2, 1, 1, &[0]),
            backend(2, 1, 1, &[1]),
            backend(2, 1, 2, &[2]),
        ],
        vec![],
        vec![
            of_model(waiting(1, Class::Batch, 0.0, 10), 1),
            of_model(waiting(2, Class::Batch, 0.0, 20), 0),
            of_model(waiting(3, Class::Batch, 0.0, 30), 0),
        ],
    );
    // 3 goes where there is room (b2) since b0's slot went to 2.
    assert_eq!(
        placed(&fifo().schedule(&v)),
        [(1, Some(1)), (2, Some(0)), (3, Some(2))]
    );
}
