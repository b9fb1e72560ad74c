use super::*;

/// A deterministic spread of values around `centre` (±`spread`).
fn spread(n: usize, centre: f64, spread: f64, seed: u64) -> Vec<f64> {
    let mut r = fastrand::Rng::with_seed(seed);
    (0..n)
        .map(|_| centre + (r.f64() * 2.0 - 1.0) * spread)
        .collect()
}

fn series(arm: &str, ttft: &[f64]) -> Series {
    Series {
        arm: arm.into(),
        slots: 1,
        turn_s: 60.0,
        points: ttft
            .iter()
            .enumerate()
            .map(|(i, &t)| Point {
                turn: 0,
                at_s: i as f64 * 60.0 / ttft.len() as f64,
                ttft_ms: Some(t),
                ok: true,
            })
            .collect(),
    }
}

fn weighted(base: Series, arm: Series) -> Inputs {
    Inputs {
        switchback: false,
        span_s: 60.0,
        first_turn: 0,
        current_turn: 0,
        classes: vec![("realtime".into(), vec![base, arm])],
    }
}

fn metric<'a>(cs: &'a [Comparison], m: &str) -> &'a Comparison {
    cs.iter().find(|c| c.metric == m).unwrap()
}

#[test]
fn a_real_shift_is_called_with_its_direction() {
    let a = series("A", &spread(400, 100.0, 40.0, 1));
    let b = series("B", &spread(400, 160.0, 40.0, 2));
    let cs = compare(&weighted(a, b));
    let p50 = metric(&cs, "ttft_p50_ms");
    let [lo, hi] = p50.ci95.unwrap();
    assert!(lo > 30.0 && hi < 90.0, "{lo}..{hi}");
    assert!(
        p50.verdict.starts_with("B is slower than A at TTFT p50"),
        "{}",
        p50.verdict
    );
    let cs = compare(&weighted(
        series("A", &spread(400, 160.0, 40.0, 3)),
        series("B", &spread(400, 100.0, 40.0, 4)),
    ));
    let p95 = metric(&cs, "ttft_p95_ms");
    assert!(
        p95.verdict.starts_with("B is faster than A at TTFT p95"),
        "{}",
        p95.verdict
    );
}

#[test]
fn the_same_distribution_is_not_called_a_difference() {
    let a = series("A", &spread(300, 100.0, 40.0, 5));
    let b = series("B", &spread(300, 100.0, 40.0, 6));
    let cs = compare(&weighted(a, b));
    for m in ["ttft_p50_ms", "ttft_p95_ms"] {
        let c = metric(&cs, m);
        let [lo, hi] = c.ci95.unwrap();
        assert!(lo < 0.0 && hi > 0.0, "{m}: {lo}..{hi}");
        assert!(
            c.verdict.starts_with("not enough data yet: about")
                || c.verdict.starts_with("no difference seen"),
            "{}",
            c.verdict
        );
    }
}

#[test]
fn too_few_samples_say_how_many_more() {
    let cs = compare(&weighted(
        series("A", &spread(12, 100.0, 5.0, 7)),
        series("B", &spread(30, 300.0, 5.0, 8)),
    ));
    let c = metric(&cs, "ttft_p50_ms");
    assert_eq!(c.ci95, None);
    assert_eq!(
        c.verdict,
        "not enough data yet: about 8 more requests per arm needed"
    );
    assert_eq!((c.baseline_n, c.arm_n), (12, 30));
}

#[test]
fn an_unresolved_difference_estimates_the_requests_needed() {
    // A small shift in a wide spread with few samples: the interval spans 0
    // and the estimate asks for more requests than were seen.
    let cs = compare(&weighted(
        series("A", &spread(40, 100.0, 80.0, 9)),
        series("B", &spread(40, 110.0, 80.0, 10)),
    ));
    let c = metric(&cs, "ttft_p50_ms");
    let [lo, hi] = c.ci95.unwrap();
    assert!(lo < 0.0 && hi > 0.0, "{lo}..{hi}");
    let more: usize = c
        .verdict
        .strip_prefix("not enough data yet: about ")
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}", c.verdict));
    assert!(more > 80, "{}", c.verdict);
}

/// Switchback windows with their own load level: requests in one window move
/// together. Per arm, `windows` windows of `per` requests each.
fn switchback_series(arm: &str, offset: f64, windows: u64, per: usize, seed: u64) -> Series {
    let mut r = fastrand::Rng::with_seed(seed);
    let mut points = Vec::new();
    for w in 0..windows {
        let level = 100.0 + r.f64() * 200.0 + offset;
        for _ in 0..per {
            points.push(Point {
                turn: w + 1,
                at_s: 0.0,
                ttft_ms: Some(level + r.f64() * 5.0),
                ok: true,
            });
        }
    }
    Series {
        arm: arm.into(),
        slots: 2,
        turn_s: 60.0,
        points,
    }
}

#[test]
fn switchback_compares_windows_not_requests() {
    let a = switchback_series("A", 0.0, 4, 200, 11);
    let b = switchback_series("B", 20.0, 4, 200, 12);
    let sb = Inputs {
        switchback: true,
        span_s: 600.0,
        first_turn: 1,
        current_turn: 5,
        classes: vec![("batch".into(), vec![a.clone(), b.clone()])],
    };
    let by_window = metric(&compare(&sb), "ttft_p95_ms").clone();
    assert_eq!(by_window.unit, "windows");
    assert_eq!((by_window.baseline_n, by_window.arm_n), (4, 4));
    let [lo, hi] = by_window.ci95.unwrap();
    assert!(
        lo < 0.0 && hi > 0.0,
        "4 windows of very different load cannot show a 20 ms shift: {lo}..{hi}"
    );
    // The same samples taken as independent requests look falsely certain:
    // that is the mistake comparing windows avoids.
    let by_request = metric(&compare(&weighted(a, b)), "ttft_p95_ms").clone();
    let [lo, hi] = by_request.ci95.unwrap();
    assert!(lo > 0.0 || hi < 0.0, "{lo}..{hi}");
}

#[test]
fn switchback_leaves_out_the_running_and_the_cut_window() {
    let a = switchback_series("A", 0.0, 6, 10, 13);
    let b = switchback_series("B", 0.0, 6, 10, 14);
    let sb = Inputs {
        switchback: true,
        span_s: 600.0,
        first_turn: 2,
        current_turn: 6,
        classes: vec![("batch".into(), vec![a, b])],
    };
    // Turns 1..=6 exist; 1 is cut by the span and 6 is still running.
    let c = metric(&compare(&sb), "completions_per_min").clone();
    assert_eq!((c.baseline_n, c.arm_n), (4, 4));
    assert_eq!(c.baseline_value, Some(10.0));
}

#[test]
fn weighted_throughput_is_per_slot() {
    // A has 2 slots and completes 120 in a minute; B has 1 slot and 90.
    let mk = |arm: &str, slots: u32, n: usize| Series {
        arm: arm.into(),
        slots,
        turn_s: 0.0,
        points: (0..n)
            .map(|i| Point {
                turn: 0,
                at_s: i as f64 * 60.0 / n as f64,
                ttft_ms: None,
                ok: true,
            })
            .collect(),
    };
    let cs = compare(&weighted(mk("A", 2, 120), mk("B", 1, 90)));
    let c = metric(&cs, "completions_per_min");
    assert_eq!(c.baseline_value, Some(60.0));
    assert_eq!(c.arm_value, Some(90.0));
    assert!(
        c.verdict
            .starts_with("B is higher than A at throughput: +30.0/min"),
        "{}",
        c.verdict
    );
}

#[test]
fn the_same_samples_give_the_same_answer() {
    let inp = weighted(
        series("A", &spread(500, 100.0, 40.0, 15)),
        series("B", &spread(500, 104.0, 40.0, 16)),
    );
    assert_eq!(compare(&inp), compare(&inp));
}

#[test]
fn every_arm_is_compared_with_the_first_per_class() {
    let mut inp = weighted(
        series("A", &spread(50, 100.0, 1.0, 17)),
        series("B", &spread(50, 100.0, 1.0, 18)),
    );
    inp.classes[0]
        .1
        .push(series("C", &spread(50, 100.0, 1.0, 19)));
    inp.classes.push(("batch".into(), inp.classes[0].1.clone()));
    let cs = compare(&inp);
    assert_eq!(cs.len(), 2 * 2 * 3);
    assert!(cs.iter().all(|c| c.baseline == "A" && c.arm != "A"));
}
