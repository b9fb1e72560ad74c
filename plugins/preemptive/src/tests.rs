use super::*;
use maitre_policy_sdk::Waiting;
use maitre_policy_sdk::testing::{describe, request, running, started, view, waiting};

const RT: Class = Class::Realtime;
const BE: Class = Class::Batch;

fn policy(config: &[(&str, &str)]) -> Preemptive {
    let mut entries: Vec<(String, String)> = vec![("maitre.slots".into(), "2".into())];
    entries.extend(config.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Preemptive::init(&Config::from(entries)).unwrap()
}

fn rt(id: u64, arrival_ms: u64) -> Waiting {
    waiting(id, RT, REALTIME_PRIORITY, arrival_ms)
}

fn be(id: u64, arrival_ms: u64) -> Waiting {
    waiting(id, BE, BATCH_PRIORITY, arrival_ms)
}

/// A running batch request with `tokens` done, started at `started_ms`.
fn job(id: u64, tokens: u64, started_ms: u64) -> Running {
    Running {
        tokens,
        ..running(id, BE, BATCH_PRIORITY, started_ms)
    }
}

#[test]
fn defaults() {
    let p = policy(&[]);
    assert_eq!(p.aging.threshold_seconds, 60.0);
    assert_eq!(p.aging.boost, 0.5);
    assert_eq!(p.default_class, BE);
    assert!(!p.preempt_streaming);
    assert_eq!(p.max_preemptions, 2);
    assert_eq!(p.max_wait_ms, 30);
}

#[test]
fn admits_realtime_at_one_and_batch_at_zero() {
    let v = view(0, 2, vec![], vec![]);
    let q = |p: &Preemptive, hint| match p.admit(&request(1, 0, hint), &v) {
        Admission::Queue(pl) => (pl.class, pl.priority),
        Admission::Reject(r) => panic!("rejected: {}", r.message),
    };
    assert_eq!(q(&policy(&[]), None), (BE, 0.0));
    assert_eq!(q(&policy(&[]), Some(RT)), (RT, 1.0));
    assert_eq!(q(&policy(&[("default_class", "rt")]), None), (RT, 1.0));
}

#[test]
fn batch_uses_every_slot_when_no_realtime_waits() {
    let v = view(
        1_000,
        3,
        vec![],
        vec![be(1, 10), be(2, 20), be(3, 30), be(4, 40)],
    );
    assert_eq!(
        describe(&policy(&[]).schedule(&v)),
        ["start 1", "start 2", "start 3"]
    );
    // All slots busy with batch, only batch waiting: nothing to do.
    let v = view(1_000, 2, vec![job(8, 5, 0), job(9, 5, 0)], vec![be(1, 10)]);
    assert!(policy(&[]).schedule(&v).is_empty());
}

#[test]
fn realtime_takes_free_slots_first_without_preempting() {
    let v = view(1_000, 3, vec![job(9, 0, 0)], vec![be(1, 10), rt(2, 20)]);
    assert_eq!(describe(&policy(&[]).schedule(&v)), ["start 2", "start 1"]);
}

#[test]
fn preempts_the_least_work_victim_and_starts_realtime_in_its_slot() {
    let v = view(
        10_000,
        3,
        vec![job(7, 40, 1_000), job(8, 3, 2_000), job(9, 3, 5_000)],
        vec![rt(1, 9_000)],
    );
    // 8 and 9 tie on tokens; 9 started later, so it has done less.
    assert_eq!(
        describe(&policy(&[]).schedule(&v)),
        ["preempt 9", "start 1"]
    );
}

#[test]
fn each_victim_once_and_one_per_realtime_request() {
    let v = view(
        10_000,
        3,
        vec![job(7, 40, 1_000), job(8, 3, 2_000), job(9, 10, 5_000)],
        vec![rt(1, 9_000), rt(2, 9_500), be(3, 100)],
    );
    assert_eq!(
        describe(&policy(&[]).schedule(&v)),
        ["preempt 8", "start 1", "preempt 9", "start 2"]
    );
    // More real-time requests than victims: the rest wait.
    let v = view(
        10_000,
        2,
        vec![job(8, 3, 2_000), running(9, RT, REALTIME_PRIORITY, 3_000)],
        vec![rt(1, 9_000), rt(2, 9_500)],
    );
    assert_eq!(
        describe(&policy(&[]).schedule(&v)),
        ["preempt 8", "start 1"]
    );
}

#[test]
fn free_slots_are_used_before_preempting() {
    let v = view(
        10_000,
        3,
        vec![job(8, 3, 2_000), job(9, 10, 5_000)],
        vec![rt(1, 9_000), rt(2, 9_500)],
    );
    assert_eq!(
        describe(&policy(&[]).schedule(&v)),
        ["start 1", "preempt 8", "start 2"]
    );
}

#[test]
fn never_preempts_realtime_non_preemptible_or_over_bound_requests() {
    let streaming = Running {
        preemptible: false,
        streaming: true,
        ..job(5, 0, 9_000)
    };
    let not_preemptible = Running {
        preemptible: false,
        ..job(6, 0, 9_000)
    };
    let over_bound = Running {
        preemptions: 2,
        ..job(7, 0, 9_000)
    };
    let realtime = running(8, RT, REALTIME_PRIORITY, 9_000);
    let v = view(
        10_000,
        4,
        vec![streaming, not_preemptible, over_bound, realtime],
        vec![rt(1, 9_500)],
    );
    assert!(policy(&[]).schedule(&v).is_empty());
    // A higher bound makes the over-bound one eligible.
    assert_eq!(
        describe(&policy(&[("max_preemptions", "3")]).schedule(&v)),
        ["preempt 7", "start 1"]
    );
    // Bound 0: never pre-empt.
    let v = view(10_000, 1, vec![job(9, 0, 0)], vec![rt(1, 9_500)]);
    assert!(policy(&[("max_preemptions", "0")]).schedule(&v).is_empty());
}

#[test]
fn preempt_streaming_cuts_streams_and_says_so() {
    let streaming = Running {
        preemptible: false,
        streaming: true,
        ..job(5, 0, 9_000)
    };
    let v = view(
        10_000,
        2,
        vec![streaming, job(6, 50, 1_000)],
        vec![rt(1, 9_500)],
    );
    // Default: only the pre-emptible one.
    assert_eq!(
        describe(&policy(&[]).schedule(&v)),
        ["preempt 6", "start 1"]
    );
    // Allowed: the stream has done less work, so it is cut.
    assert_eq!(
        describe(&policy(&[("preempt_streaming", "true")]).schedule(&v)),
        ["preempt! 5", "start 1"]
    );
}

#[test]
fn aged_batch_is_served_first_and_not_overtaken() {
    // One slot, held by batch. Batch 1 waited 3 minutes (1.5 > RT's 1.0).
    let p = policy(&[]);
    let v = view(
        180_000,
        1,
        vec![job(9, 0, 179_000)],
        vec![be(1, 0), rt(2, 179_500)],
    );
    assert!(p.schedule(&v).is_empty());
    // When the slot frees, the aged batch request gets it.
    let v = view(180_000, 1, vec![], vec![be(1, 0), rt(2, 179_500)]);
    assert_eq!(started(&p.schedule(&v)), [1]);
    // Tie at exactly 2 thresholds (1.0): batch arrived first and wins too.
    let v = view(
        120_000,
        1,
        vec![job(9, 0, 119_000)],
        vec![be(1, 0), rt(2, 119_500)],
    );
    assert!(p.schedule(&v).is_empty());
    // Just before, it is below RT: RT pre-empts.
    let v = view(
        119_999,
        1,
        vec![job(9, 0, 119_000)],
        vec![be(1, 0), rt(2, 119_500)],
    );
    assert_eq!(describe(&p.schedule(&v)), ["preempt 9", "start 2"]);
}

#[test]
fn victims_must_have_lower_priority_than_the_realtime_request() {
    // A running batch request at the real-time priority is not a victim.
    let v = view(
        10_000,
        1,
        vec![running(9, BE, REALTIME_PRIORITY, 0)],
        vec![rt(1, 9_000)],
    );
    assert!(policy(&[]).schedule(&v).is_empty());
}

fn init_err(config: &[(&str, &str)]) -> String {
    Preemptive::init(&Config::from(
        config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>(),
    ))
    .unwrap_err()
}

#[test]
fn each_bad_key_is_named() {
    assert!(
        init_err(&[("aging_threshold_seconds", "-5")]).starts_with("aging_threshold_seconds: ")
    );
    assert!(init_err(&[("aging_boost", "-1")]).starts_with("aging_boost: "));
    assert!(init_err(&[("default_class", "gold")]).starts_with("default_class: "));
    assert_eq!(
        init_err(&[("preempt_streaming", "yes")]),
        "preempt_streaming: expected true or false, got \"yes\""
    );
    assert_eq!(
        init_err(&[("max_preemptions", "many")]),
        "max_preemptions: expected a whole number, got \"many\""
    );
    let e = init_err(&[("rt_reserved_slots", "1")]);
    assert!(e.contains("\"rt_reserved_slots\""), "{e}");
    for k in KEYS {
        assert!(e.contains(k), "{e} should list {k}");
    }
}

/// Running batch jobs `(id, num_predict, tokens)`, each producing 1 token
/// per 20 ms since its first token; the policy has seen them running once
/// (to measure the speed).
fn learned_jobs(p: &Preemptive, jobs: &[(u64, i64, u64)], now: u64) -> Vec<Running> {
    let running: Vec<Running> = jobs
        .iter()
        .map(|&(id, n, tokens)| Running {
            tokens,
            num_predict: Some(n),
            first_token_ms: Some(now - (tokens - 1) * 20),
            ..running(id, BE, BATCH_PRIORITY, 0)
        })
        .collect();
    let _ = p.schedule(&view(now, 2, running.clone(), vec![]));
    running
}

#[test]
fn waits_for_a_batch_job_about_to_finish_instead_of_preempting() {
    let p = policy(&[("max_wait_ms", "50")]);
    let now = 10_000;
    // Job 1 has 2 tokens to go (40 ms at the measured speed); job 2 has 300.
    let jobs = learned_jobs(&p, &[(1, 100, 98), (2, 400, 100)], now);
    assert_eq!(p.remaining_ms(&jobs[0]).map(f64::round), Some(40.0));
    let v = view(now, 2, jobs.clone(), vec![rt(9, now)]);
    assert!(
        p.schedule(&v).is_empty(),
        "the real-time request waits for job 1's slot: {:?}",
        describe(&p.schedule(&v))
    );
    // Once it has waited max_wait_ms, the estimate is not trusted any more.
    let later = view(now + 50, 2, jobs, vec![rt(9, now)]);
    assert_eq!(started(&p.schedule(&later)), vec![9]);
}

#[test]
fn preempts_the_least_work_when_no_job_ends_within_max_wait() {
    let p = policy(&[("max_wait_ms", "50")]);
    let now = 10_000;
    // 10 tokens to go (200 ms) and 300 to go: neither ends within 50 ms.
    let jobs = learned_jobs(&p, &[(1, 100, 90), (2, 400, 100)], now);
    let v = view(now, 2, jobs, vec![rt(9, now)]);
    assert_eq!(
        describe(&p.schedule(&v)),
        vec!["preempt 1".to_string(), "start 9".to_string()],
        "job 1 has fewer tokens done"
    );
}

#[test]
fn max_wait_zero_or_an_unknown_speed_always_preempts() {
    let now = 10_000;
    let p = policy(&[("max_wait_ms", "0")]);
    let jobs = learned_jobs(&p, &[(1, 100, 99)], now);
    let v = view(now, 1, jobs, vec![rt(9, now)]);
    assert_eq!(started(&p.schedule(&v)), vec![9]);
    // No speed measured (no running request has produced tokens yet).
    let p = policy(&[]);
    let v = view(now, 1, vec![job(1, 0, 0)], vec![rt(9, now)]);
    assert_eq!(started(&p.schedule(&v)), vec![9]);
}

#[test]
fn free_slots_go_to_loaded_models_and_pressure_groups_batch() {
    use maitre_policy_sdk::testing::{backend, fleet, of_model, placed};
    let p = policy(&[("group_max_wait_ms", "5000")]);
    assert_eq!(p.group_max_wait_ms, 5_000);
    // b0 (m0) is full, b1 (m1) has a free slot; both at their one-model limit.
    let bs = || vec![backend(1, 0, 1, &[0]), backend(1, 1, 1, &[1])];
    let q = vec![of_model(be(1, 9_000), 0), of_model(be(2, 9_500), 1)];
    let v = fleet(10_000, bs(), vec![], q.clone());
    // m0 waits for b0 rather than evict m1; m1 takes b1.
    assert_eq!(placed(&p.schedule(&v)), [(2, Some(1))]);
    // After group_max_wait_ms the older request goes, evicting m1 from b1
    // (the only backend with a free slot), named.
    let v = fleet(14_000, bs(), vec![], q);
    assert_eq!(placed(&p.schedule(&v)), [(1, Some(1))]);
    // Real-time is never held.
    let v = fleet(10_000, bs(), vec![], vec![of_model(rt(3, 9_900), 0)]);
    assert_eq!(placed(&p.schedule(&v)), [(3, Some(1))]);
}
