use super::*;
use maitre_policy_sdk::testing::{describe, request, running, started, view, waiting};
use maitre_policy_sdk::{Running, Waiting};

const RT: Class = Class::Realtime;
const BE: Class = Class::Batch;

fn policy(config: &[(&str, &str)]) -> ReservedAging {
    let mut entries: Vec<(String, String)> = vec![("maitre.slots".into(), "2".into())];
    entries.extend(config.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    ReservedAging::init(&Config::from(entries)).unwrap()
}

fn rt(id: u64, arrival_ms: u64) -> Waiting {
    waiting(id, RT, REALTIME_PRIORITY, arrival_ms)
}

fn be(id: u64, arrival_ms: u64) -> Waiting {
    waiting(id, BE, BATCH_PRIORITY, arrival_ms)
}

fn run(id: u64, class: Class) -> Running {
    running(id, class, 0.0, 0)
}

#[test]
fn defaults() {
    let p = policy(&[]);
    assert_eq!(p.rt_reserved_slots, 1);
    assert_eq!(p.aging.threshold_seconds, 60.0);
    assert_eq!(p.aging.boost, 0.5);
    assert_eq!(p.default_class, BE);
    assert_eq!(p.group_max_wait_ms, 5_000);
    assert_eq!(p.rt_group_max_wait_ms, 1_000);
}

#[test]
fn admits_realtime_at_one_and_batch_at_zero() {
    let v = view(0, 2, vec![], vec![]);
    let q = |p: &ReservedAging, hint| match p.admit(&request(1, 0, hint), &v) {
        Admission::Queue(pl) => (pl.class, pl.priority),
        Admission::Reject(r) => panic!("rejected: {}", r.message),
    };
    assert_eq!(q(&policy(&[]), None), (BE, 0.0));
    assert_eq!(q(&policy(&[]), Some(RT)), (RT, 1.0));
    let rt_default = policy(&[("default_class", "realtime")]);
    assert_eq!(q(&rt_default, None), (RT, 1.0));
    assert_eq!(q(&rt_default, Some(BE)), (BE, 0.0));
}

#[test]
fn realtime_before_batch_and_fifo_within_class() {
    let v = view(
        1_000,
        4,
        vec![],
        vec![be(1, 10), be(2, 20), rt(3, 30), rt(4, 40), be(5, 50)],
    );
    let p = policy(&[("maitre.slots", "4"), ("rt_reserved_slots", "1")]);
    // Slots 4, 1 reserved: batch may hold 3; only 4 start in all.
    assert_eq!(started(&p.schedule(&v)), [3, 4, 1, 2]);
    // Same arrival: lower id first.
    let v = view(1_000, 1, vec![], vec![rt(8, 30), rt(7, 30)]);
    assert_eq!(started(&policy(&[]).schedule(&v)), [7]);
}

#[test]
fn batch_never_takes_a_reserved_slot() {
    let p = policy(&[]);
    // 2 slots, 1 reserved: one batch starts, the other waits with a slot free.
    let v = view(1_000, 2, vec![], vec![be(1, 10), be(2, 20)]);
    assert_eq!(describe(&p.schedule(&v)), ["start 1"]);
    let v = view(1_000, 2, vec![run(9, BE)], vec![be(1, 10), be(2, 20)]);
    assert!(p.schedule(&v).is_empty());
    // Even when aged far above real-time priority.
    let v = view(3_600_000, 2, vec![run(9, BE)], vec![be(1, 0)]);
    assert!(p.schedule(&v).is_empty());
    // No reservation: batch uses every slot.
    let p0 = policy(&[("rt_reserved_slots", "0")]);
    let v = view(1_000, 2, vec![], vec![be(1, 10), be(2, 20)]);
    assert_eq!(started(&p0.schedule(&v)), [1, 2]);
}

#[test]
fn realtime_further_back_still_gets_the_reserved_slot() {
    // 3 slots, 1 reserved, two batch running: the only free slot is reserved.
    // The aged batch request is first in priority order but must be skipped.
    let p = policy(&[("maitre.slots", "3")]);
    let v = view(
        600_000,
        3,
        vec![run(8, BE), run(9, BE)],
        vec![be(1, 0), rt(2, 599_000)],
    );
    assert_eq!(describe(&p.schedule(&v)), ["start 2"]);
}

#[test]
fn realtime_running_in_a_shared_slot_does_not_block_batch() {
    // 2 slots, 1 reserved; two RT running would leave nothing for anyone, but
    // with one RT running the other slot is shared and batch may take it.
    let p = policy(&[]);
    let v = view(1_000, 2, vec![run(9, RT)], vec![be(1, 10)]);
    assert_eq!(started(&p.schedule(&v)), [1]);
}

#[test]
fn aging_boost_arithmetic_is_exact() {
    // threshold 10 s, boost 0.25: +0.25 per full 10 s waited, from arrival.
    let p = policy(&[
        ("aging_threshold_seconds", "10"),
        ("aging_boost", "0.25"),
        ("rt_reserved_slots", "0"),
    ]);
    let now = 100_000;
    let w = be(1, now - 39_999); // 3 full steps: 0.75
    assert_eq!(p.aging.priority(&w, now), 0.75);
    let w = be(1, now - 40_000); // 4 full steps: 1.0
    assert_eq!(p.aging.priority(&w, now), 1.0);
    // Enqueue time after a pre-emption does not reset aging: arrival counts.
    let mut w = be(1, now - 40_000);
    w.enqueued_ms = now - 1;
    assert_eq!(p.aging.priority(&w, now), 1.0);

    // One free slot. Batch 1 waited 39.999 s (0.75) vs RT (1.0): RT wins.
    let v = view(now, 1, vec![], vec![be(1, now - 39_999), rt(2, now - 5)]);
    assert_eq!(started(&p.schedule(&v)), [2]);
    // Batch 1 waited 40 s (1.0) ties RT and arrived first: batch wins.
    let v = view(now, 1, vec![], vec![be(1, now - 40_000), rt(2, now - 5)]);
    assert_eq!(started(&p.schedule(&v)), [1]);
    // Aged batch overtakes fresher batch regardless of listing order.
    let v = view(
        now,
        1,
        vec![],
        vec![be(3, now - 9_000), be(4, now - 25_000), be(5, now - 19_999)],
    );
    assert_eq!(started(&p.schedule(&v)), [4]);
}

#[test]
fn with_defaults_batch_ties_realtime_after_two_minutes() {
    let p = policy(&[]);
    // 2 slots, 1 reserved, one RT running: one shared slot free.
    let at = |now| view(now, 2, vec![run(9, RT)], vec![be(1, 0), rt(2, 100_000)]);
    assert_eq!(started(&p.schedule(&at(119_999))), [2]);
    assert_eq!(started(&p.schedule(&at(120_000))), [1]);
}

/// Drives the policy like the host would: 1 s ticks, each request holding its
/// slot for `service_ms`. Returns when batch request 0 started, if it did.
fn batch_start_under_rt_flood(p: &ReservedAging, horizon_ms: u64) -> Option<u64> {
    let service_ms = 10_000;
    let slots = 2;
    let mut running: Vec<(Running, u64)> = Vec::new();
    let mut queue: Vec<Waiting> = vec![be(0, 0)];
    let mut next_id = 1;
    for now in (0..horizon_ms).step_by(1_000) {
        running.retain(|(_, end)| *end > now);
        // Two RT requests every 9 s: more than 2 slots can serve, so RT
        // requests are always waiting.
        if now % 9_000 == 0 {
            for _ in 0..2 {
                queue.push(rt(next_id, now));
                next_id += 1;
            }
        }
        let v = view(
            now,
            slots,
            running.iter().map(|(r, _)| *r).collect(),
            queue.clone(),
        );
        let actions = p.schedule(&v);
        assert!(actions.len() <= v.free_slots as usize, "too many starts");
        for id in started(&actions) {
            let pos = queue.iter().position(|w| w.id == id).expect("known id");
            let w = queue.remove(pos);
            if id == 0 {
                return Some(now);
            }
            running.push((run(w.id, w.class), now + service_ms));
        }
    }
    None
}

#[test]
fn batch_never_starves_under_a_steady_realtime_stream() {
    // Defaults: the batch request reaches RT priority after 120 s and, having
    // arrived first, takes the next shared slot.
    let t = batch_start_under_rt_flood(&policy(&[]), 600_000).expect("batch starved");
    assert!((120_000..=130_000).contains(&t), "started at {t}");
    // Without aging it would starve: the test can fail.
    let no_aging = policy(&[("aging_boost", "0")]);
    assert_eq!(batch_start_under_rt_flood(&no_aging, 600_000), None);
}

#[test]
fn nothing_to_do_without_free_slots() {
    let p = policy(&[]);
    let v = view(1_000, 2, vec![run(8, BE), run(9, RT)], vec![rt(1, 10)]);
    assert!(p.schedule(&v).is_empty());
}

#[test]
fn never_preempts() {
    let p = policy(&[]);
    let v = view(999_000, 2, vec![run(8, BE), run(9, BE)], vec![rt(1, 10)]);
    assert!(p.schedule(&v).is_empty());
}

fn init_err(config: &[(&str, &str)]) -> String {
    let mut entries: Vec<(String, String)> = vec![("maitre.slots".into(), "2".into())];
    entries.extend(config.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    ReservedAging::init(&Config::from(entries)).unwrap_err()
}

#[test]
fn each_bad_key_is_named() {
    assert_eq!(
        init_err(&[("rt_reserved_slots", "abc")]),
        "rt_reserved_slots: expected a whole number, got \"abc\""
    );
    assert!(init_err(&[("rt_reserved_slots", "-1")]).starts_with("rt_reserved_slots: "));
    assert!(init_err(&[("rt_reserved_slots", "0.5")]).starts_with("rt_reserved_slots: "));
    assert!(init_err(&[("aging_threshold_seconds", "0")]).starts_with("aging_threshold_seconds: "));
    assert!(
        init_err(&[("aging_threshold_seconds", "soon")]).starts_with("aging_threshold_seconds: ")
    );
    assert!(init_err(&[("aging_boost", "-0.1")]).starts_with("aging_boost: "));
    assert!(init_err(&[("aging_boost", "x")]).starts_with("aging_boost: "));
    assert!(init_err(&[("default_class", "vip")]).starts_with("default_class: "));
    assert!(init_err(&[("group_max_wait_ms", "-5")]).starts_with("group_max_wait_ms: "));
    let e = init_err(&[("aging_treshold_seconds", "60")]);
    assert!(e.contains("\"aging_treshold_seconds\""), "{e}");
    for k in KEYS {
        assert!(e.contains(k), "{e} should list {k}");
    }
}

#[test]
fn refuses_to_reserve_every_slot() {
    assert_eq!(
        init_err(&[("rt_reserved_slots", "2")]),
        "rt_reserved_slots = 2 reserves all 2 upstream slots for real-time requests, so \
         batch requests could never run; set rt_reserved_slots below [upstream] slots \
         (Ollama's OLLAMA_NUM_PARALLEL defaults to 1)"
    );
    assert!(
        init_err(&[("rt_reserved_slots", "5")]).starts_with("rt_reserved_slots = 5 reserves all 2")
    );
    // The default reservation (1) does not fit a single slot either.
    let one = ReservedAging::init(&Config::from([("maitre.slots", "1")])).unwrap_err();
    assert!(
        one.starts_with("rt_reserved_slots = 1 reserves all 1 upstream slots"),
        "{one}"
    );
    // A single slot works without a reservation.
    ReservedAging::init(&Config::from([
        ("maitre.slots", "1"),
        ("rt_reserved_slots", "0"),
    ]))
    .unwrap();
}

mod fleet {
    use super::*;
    use maitre_policy_sdk::testing::{backend, fleet, of_model, on, placed};

    fn p6() -> ReservedAging {
        policy(&[("maitre.slots", "6")])
    }

    #[test]
    fn each_backend_keeps_its_reserved_slot_for_realtime() {
        // Three backends of 2 slots, each with its own model loaded.
        let three = || {
            vec![
                backend(2, 2, 2, &[0]),
                backend(2, 2, 2, &[1]),
                backend(2, 2, 2, &[2]),
            ]
        };
        let batch: Vec<Waiting> = (0..6).map(|i| of_model(be(i, i), (i % 3) as u32)).collect();
        let v = fleet(1_000, three(), vec![], batch.clone());
        // One batch per backend (the arm-wide cap alone would allow 5),
        // each where its model is loaded.
        assert_eq!(
            placed(&p6().schedule(&v)),
            [(0, Some(0)), (1, Some(1)), (2, Some(2))]
        );
        // With one batch running on each, a real-time request may take any
        // free slot; batch still waits.
        let mut bs = three();
        for b in &mut bs {
            b.free_slots = 1;
        }
        let running: Vec<Running> = (0..3)
            .map(|b| on(run(10 + b, BE), b as u32, b as u32))
            .collect();
        let mut waiting = batch.clone();
        waiting.push(of_model(rt(7, 500), 1));
        let v = fleet(1_000, bs, running, waiting);
        assert_eq!(placed(&p6().schedule(&v)), [(7, Some(1))]);
    }

    #[test]
    fn realtime_running_counts_toward_its_backends_reservation() {
        // b0 runs a real-time request: its other slot is shared, batch may
        // take it. b1 is idle: one batch, one slot kept. The least busy
        // backend first.
        let v = fleet(
            1_000,
            vec![backend(2, 1, 2, &[0]), backend(2, 2, 2, &[0])],
            vec![on(run(9, RT), 0, 0)],
            vec![be(1, 10), be(2, 20), be(3, 30)],
        );
        let p = policy(&[("maitre.slots", "4")]);
        assert_eq!(placed(&p.schedule(&v)), [(1, Some(1)), (2, Some(0))]);
    }

    #[test]
    fn one_slot_backends_still_run_batch_under_the_arm_wide_cap() {
        let v = fleet(
            1_000,
            vec![
                backend(1, 1, 2, &[0]),
                backend(1, 1, 2, &[0]),
                backend(1, 1, 2, &[0]),
            ],
            vec![],
            vec![be(1, 10), be(2, 20), be(3, 30)],
        );
        let p = policy(&[("maitre.slots", "3")]);
        // 3 slots, 1 reserved arm-wide: two batch run, one slot stays free.
        assert_eq!(started(&p.schedule(&v)), [1, 2]);
    }

    #[test]
    fn a_model_realtime_used_recently_is_evicted_last() {
        // Both backends full. b0's victim is m0, which b1 holds too (a spare
        // copy, nobody waits for it); b1's victim is m1, the only copy, and
        // one request waits for it. A batch request for m5 must evict one.
        let bs = || vec![backend(2, 2, 2, &[0, 4]), backend(2, 2, 2, &[1, 0])];
        let waiting = vec![of_model(be(1, 100), 5), of_model(be(2, 200), 1)];
        let cfg = [("maitre.slots", "4"), ("group_max_wait_ms", "0")];
        let p = policy(&cfg);
        let v = fleet(1_000, bs(), vec![], waiting.clone());
        assert_eq!(placed(&p.schedule(&v))[0], (1, Some(0)), "the spare m0");
        // Once a real-time request asked for m0, m0 stays: m1 goes instead.
        let p = policy(&cfg);
        let req = Request {
            model: "m0".into(),
            ..request(7, 500, Some(Class::Realtime))
        };
        let _ = p.admit(&req, &view(500, 4, vec![], vec![]));
        let v = fleet(1_000, bs(), vec![], waiting.clone());
        assert_eq!(placed(&p.schedule(&v))[0], (1, Some(1)));
        // ... for RT_MODEL_MEMORY_MS after that request.
        let v = fleet(500 + RT_MODEL_MEMORY_MS, bs(), vec![], waiting);
        assert_eq!(placed(&p.schedule(&v))[0], (1, Some(0)));
    }

    #[test]
    fn real_time_slots_are_kept_where_a_real_time_model_is_loaded() {
        // b0 holds m0, b1 holds m2; two batch requests for m2.
        let bs = || vec![backend(2, 2, 2, &[0]), backend(2, 2, 2, &[2])];
        let waiting = vec![of_model(be(1, 100), 2), of_model(be(2, 200), 2)];
        let cfg = [("maitre.slots", "4")];
        // No real-time traffic seen yet: every backend keeps a slot, so the
        // second request loads m2 on b0.
        let p = policy(&cfg);
        let v = fleet(1_000, bs(), vec![], waiting.clone());
        assert_eq!(placed(&p.schedule(&v)), [(1, Some(1)), (2, Some(0))]);
        // Real-time requests use m0: b0 keeps its slot, b1 keeps none, and
        // both run where m2 is loaded.
        let req = Request {
            model: "m0".into(),
            ..request(7, 500, Some(Class::Realtime))
        };
        let _ = p.admit(&req, &view(500, 4, vec![], vec![]));
        let v = fleet(1_000, bs(), vec![], waiting.clone());
        assert_eq!(placed(&p.schedule(&v)), [(1, Some(1)), (2, Some(1))]);
        // b0 still keeps its real-time slot: of two more batch requests for
        // m0, one takes b0's other slot and one waits.
        let mut w = waiting;
        w.push(of_model(be(3, 300), 0));
        w.push(of_model(be(4, 400), 0));
        let v = fleet(1_000, bs(), vec![], w);
        assert_eq!(placed(&p.schedule(&v)), [(1, Some(1)), (2, Some(1)), (3, Some(0))]);
    }

    #[test]
    fn under_memory_pressure_loaded_models_go_first_until_the_bound() {
        // Every backend holds one model, its limit. b0 (m0) is busy with
        // batch, b1 (m1) has one free batch slot, b2 (m2) too.
        let bs = || {
            vec![
                backend(2, 1, 1, &[0]),
                backend(2, 2, 1, &[1]),
                backend(2, 2, 1, &[2]),
            ]
        };
        let running = vec![on(run(9, BE), 0, 0)];
        let p = policy(&[("maitre.slots", "6"), ("group_max_wait_ms", "5000")]);
        // The oldest asks for m0 (loaded on busy b0) and m3 (loaded
        // nowhere); a younger one for m1.
        let waiting = vec![
            of_model(be(1, 9_000), 0),
            of_model(be(2, 9_100), 3),
            of_model(be(3, 9_200), 1),
        ];
        let v = fleet(10_000, bs(), running.clone(), waiting.clone());
        // m1 goes to b1; m3 must load somewhere anyway (b2, the only batch
        // slot left); m0 waits for b0 rather than evict.
        assert_eq!(placed(&p.schedule(&v)), [(3, Some(1)), (2, Some(2))]);
        // Once request 1 waited group_max_wait_ms it is taken anyway, first
        // (oldest), evicting a model: m2 on b2, which nobody needs, not m1,
        // the only copy of what request 3 waits for; m1 then goes to b1
        // and m3 (loaded nowhere) finds no batch slot left.
        let v = fleet(14_000, bs(), running.clone(), waiting.clone());
        assert_eq!(placed(&p.schedule(&v)), [(1, Some(2)), (3, Some(1))]);
        // Real-time still goes first, wherever a slot is.
        let mut w = waiting;
        w.push(of_model(rt(4, 9_900), 0));
        let v = fleet(10_000, bs(), running, w);
        assert_eq!(placed(&p.schedule(&v))[0], (4, Some(0)));
    }

    #[test]
    fn realtime_waits_for_its_models_busy_backend_rather_than_evict() {
        // b0 (m0) is full; b1 (m1, m2) has a free slot, at its limit.
        let bs = || vec![backend(1, 0, 2, &[0]), backend(2, 1, 2, &[1, 2])];
        let running = vec![on(run(9, RT), 0, 0), on(run(8, BE), 1, 1)];
        let p = policy(&[("maitre.slots", "3")]);
        let w = vec![of_model(rt(1, 9_500), 0)];
        let v = fleet(10_000, bs(), running.clone(), w.clone());
        assert_eq!(placed(&p.schedule(&v)), [], "waits for b0, where m0 is");
        // After rt_group_max_wait_ms it loads m0 on b1.
        let v = fleet(10_500, bs(), running.clone(), w);
        assert_eq!(placed(&p.schedule(&v)), [(1, Some(1))]);
        // A model loaded nowhere: no reason to wait.
        let v = fleet(10_000, bs(), running, vec![of_model(rt(2, 9_900), 3)]);
        assert_eq!(placed(&p.schedule(&v)), [(2, Some(1))]);
    }
}
