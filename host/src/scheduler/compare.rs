//! Whether a difference between A/B arms is real.
//!
//! The percentiles in the `/ab` table move with every request; a gap between
//! two arms says nothing until it is larger than that noise. For each class
//! and each arm against the first (the baseline), this module gives the
//! difference in TTFT p50, TTFT p95 and throughput with a 95 % **percentile
//! bootstrap** confidence interval, and a verdict in words.
//!
//! What is resampled depends on how the arms split the traffic:
//! - **weighted**: the arms serve at the same time, each request is a sample.
//!   TTFT resamples requests of each arm independently. Throughput is
//!   compared per slot (each arm owns its own share of slots) over
//!   [`BUCKETS`] equal time buckets, resampling the buckets as pairs, since
//!   both arms see the same moments of load.
//! - **switchback**: requests within one window share that window's load, so
//!   they are not independent; the unit is the window (one arm's turn). TTFT
//!   resamples whole windows and pools their requests (a cluster bootstrap);
//!   throughput is each window's completions per minute. The window still
//!   running and the first one, cut by the report's window, are left out.
//!
//! Resampling uses a fixed seed, so the same samples give the same answer.
//! It runs off the scheduler task ([`super::SchedulerHandle::report`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Bootstrap resamples per interval.
const RESAMPLES: usize = 1000;
/// Only the most recent samples per arm and class are resampled (cost bound).
pub(super) const MAX_POINTS: usize = 10_000;
/// Fewer TTFT samples than this per arm (weighted): not enough data.
const MIN_REQUESTS: usize = 20;
/// Fewer complete windows than this per arm (switchback): not enough data.
const MIN_WINDOWS: usize = 3;
/// Fewer completions than this in both arms together: not enough data.
const MIN_COMPLETIONS: usize = 20;
/// Time buckets of the weighted throughput comparison.
const BUCKETS: usize = 20;
/// Seed of the resampling.
const SEED: u64 = 0x6d61_6974_7265;

/// One ended request, as the comparison sees it.
#[derive(Debug, Clone, Copy)]
pub struct Point {
    /// Switchback window (cycle number) the request arrived in.
    pub turn: u64,
    /// Seconds from the start of the report's span to its end.
    pub at_s: f64,
    /// Arrival to first byte to the client, if it got one.
    pub ttft_ms: Option<f64>,
    /// Answered.
    pub ok: bool,
}

/// One arm's samples of one class.
#[derive(Debug, Clone)]
pub struct Series {
    /// Arm name.
    pub arm: String,
    /// Slots the arm owns now (weighted throughput is per slot).
    pub slots: u32,
    /// Length of the arm's switchback turn, seconds.
    pub turn_s: f64,
    /// Its samples, oldest first.
    pub points: Vec<Point>,
}

/// Everything [`compare`] needs, copied out of the scheduler.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// Switchback (else weighted).
    pub switchback: bool,
    /// Length of the span the samples cover, seconds.
    pub span_s: f64,
    /// Complete switchback windows are those with `first_turn <= turn < current_turn`.
    pub first_turn: u64,
    /// The switchback cycle running now.
    pub current_turn: u64,
    /// Per class name, one series per arm (baseline first).
    pub classes: Vec<(String, Vec<Series>)>,
}

/// One arm against the baseline on one metric.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Comparison {
    /// `realtime` or `batch`.
    pub class: String,
    /// `ttft_p50_ms`, `ttft_p95_ms` or `completions_per_min` (per slot
    /// in weighted mode).
    pub metric: String,
    /// The first arm.
    pub baseline: String,
    /// The arm compared with it.
    pub arm: String,
    /// The metric for the baseline.
    pub baseline_value: Option<f64>,
    /// The metric for the arm.
    pub arm_value: Option<f64>,
    /// `arm_value - baseline_value`.
    pub difference: Option<f64>,
    /// 95 % confidence interval of the difference.
    pub ci95: Option<[f64; 2]>,
    /// What a sample is: `requests`, `windows`, or `seconds` of the span
    /// (weighted throughput: both arms share it).
    pub unit: String,
    /// Samples of the baseline, in `unit`.
    pub baseline_n: usize,
    /// Samples of the arm, in `unit`.
    pub arm_n: usize,
    /// How the interval was computed.
    pub method: String,
    /// The answer in words.
    pub verdict: String,
}

/// Compares every arm with the first, per class.
pub fn compare(inp: &Inputs) -> Vec<Comparison> {
    let mut out = Vec::new();
    let mut rng = fastrand::Rng::with_seed(SEED);
    for (class, series) in &inp.classes {
        let Some((base, rest)) = series.split_first() else {
            continue;
        };
        for arm in rest {
            for (q, metric) in [(0.50, "ttft_p50_ms"), (0.95, "ttft_p95_ms")] {
                let mut c = if inp.switchback {
                    ttft_by_window(inp, base, arm, q, &mut rng)
                } else {
                    ttft_by_request(base, arm, q, &mut rng)
                };
                c.metric = metric.into();
                out.push(finish(c, class, base, arm));
            }
            let c = if inp.switchback {
                throughput_by_window(inp, base, arm, &mut rng)
            } else {
                throughput_by_bucket(inp, base, arm, &mut rng)
            };
            out.push(finish(c, class, base, arm));
        }
    }
    out
}

fn finish(mut c: Comparison, class: &str, base: &Series, arm: &Series) -> Comparison {
    c.class = class.into();
    c.baseline = base.arm.clone();
    c.arm = arm.arm.clone();
    c.verdict = verdict(&c);
    c
}

fn blank(unit: &str, method: &str, metric: &str) -> Comparison {
    Comparison {
        class: String::new(),
        metric: metric.into(),
        baseline: String::new(),
        arm: String::new(),
        baseline_value: None,
        arm_value: None,
        difference: None,
        ci95: None,
        unit: unit.into(),
        baseline_n: 0,
        arm_n: 0,
        method: method.into(),
        verdict: String::new(),
    }
}

fn ttfts(s: &Series) -> Vec<f64> {
    s.points.iter().filter_map(|p| p.ttft_ms).collect()
}

/// Weighted mode: requests are the samples.
fn ttft_by_request(base: &Series, arm: &Series, q: f64, rng: &mut fastrand::Rng) -> Comparison {
    let (b, a) = (ttfts(base), ttfts(arm));
    let mut c = blank(
        "requests",
        "percentile bootstrap over requests, 1000 resamples",
        "",
    );
    c.baseline_n = b.len();
    c.arm_n = a.len();
    c.baseline_value = pct(&mut b.clone(), q);
    c.arm_value = pct(&mut a.clone(), q);
    if b.len() < MIN_REQUESTS || a.len() < MIN_REQUESTS {
        return c;
    }
    c.difference = Some(c.arm_value.unwrap_or(0.0) - c.baseline_value.unwrap_or(0.0));
    let (mut rb, mut ra) = (vec![0.0; b.len()], vec![0.0; a.len()]);
    let diffs = (0..RESAMPLES).filter_map(|_| {
        resample(&b, &mut rb, rng);
        resample(&a, &mut ra, rng);
        Some(pct(&mut ra, q)? - pct(&mut rb, q)?)
    });
    c.ci95 = interval(diffs.collect());
    c
}

/// Complete switchback windows of one series, each as its points.
fn windows<'a>(inp: &Inputs, s: &'a Series) -> Vec<Vec<&'a Point>> {
    let mut by: BTreeMap<u64, Vec<&Point>> = BTreeMap::new();
    for p in &s.points {
        if p.turn >= inp.first_turn && p.turn < inp.current_turn {
            by.entry(p.turn).or_default().push(p);
        }
    }
    by.into_values().collect()
}

/// Switchback: windows are the samples; their requests are pooled.
fn ttft_by_window(
    inp: &Inputs,
    base: &Series,
    arm: &Series,
    q: f64,
    rng: &mut fastrand::Rng,
) -> Comparison {
    let per = |s: &Series| -> Vec<Vec<f64>> {
        windows(inp, s)
            .into_iter()
            .map(|w| w.iter().filter_map(|p| p.ttft_ms).collect::<Vec<f64>>())
            .filter(|w| !w.is_empty())
            .collect()
    };
    let (b, a) = (per(base), per(arm));
    let mut c = blank(
        "windows",
        "cluster bootstrap over switchback windows, 1000 resamples",
        "",
    );
    c.baseline_n = b.len();
    c.arm_n = a.len();
    let pooled = |w: &[Vec<f64>]| pct(&mut w.concat(), q);
    c.baseline_value = pooled(&b);
    c.arm_value = pooled(&a);
    if b.len() < MIN_WINDOWS || a.len() < MIN_WINDOWS {
        return c;
    }
    c.difference = Some(c.arm_value.unwrap_or(0.0) - c.baseline_value.unwrap_or(0.0));
    let mut pool = Vec::new();
    let mut draw = |w: &[Vec<f64>], rng: &mut fastrand::Rng| {
        pool.clear();
        for _ in 0..w.len() {
            pool.extend_from_slice(&w[rng.usize(..w.len())]);
        }
        pct(&mut pool, q)
    };
    let diffs = (0..RESAMPLES).filter_map(|_| {
        let x = draw(&a, rng)?;
        Some(x - draw(&b, rng)?)
    });
    c.ci95 = interval(diffs.collect());
    c
}

/// Weighted: completions per minute per slot, in paired time buckets.
fn throughput_by_bucket(
    inp: &Inputs,
    base: &Series,
    arm: &Series,
    rng: &mut fastrand::Rng,
) -> Comparison {
    let mut c = blank(
        "seconds",
        "paired bootstrap over 20 time buckets, 1000 resamples",
        "completions_per_min",
    );
    let span_min = inp.span_s / 60.0;
    if base.slots == 0 || arm.slots == 0 || span_min <= 0.0 {
        return c;
    }
    let rates = |s: &Series| {
        let mut n = [0usize; BUCKETS];
        for p in s.points.iter().filter(|p| p.ok) {
            let k = ((p.at_s / inp.span_s) * BUCKETS as f64) as usize;
            n[k.min(BUCKETS - 1)] += 1;
        }
        let per = span_min / BUCKETS as f64 * s.slots as f64;
        (n.iter().sum::<usize>(), n.map(|k| k as f64 / per))
    };
    let ((nb, rb), (na, ra)) = (rates(base), rates(arm));
    c.baseline_n = inp.span_s.round() as usize;
    c.arm_n = c.baseline_n;
    c.baseline_value = Some(nb as f64 / (span_min * base.slots as f64));
    c.arm_value = Some(na as f64 / (span_min * arm.slots as f64));
    if nb + na < MIN_COMPLETIONS {
        return c;
    }
    let d: Vec<f64> = (0..BUCKETS).map(|k| ra[k] - rb[k]).collect();
    c.difference = Some(mean(&d));
    let mut r = vec![0.0; BUCKETS];
    let means = (0..RESAMPLES).map(|_| {
        resample(&d, &mut r, rng);
        mean(&r)
    });
    c.ci95 = interval(means.collect());
    c
}

/// Switchback: each complete window's completions per minute.
fn throughput_by_window(
    inp: &Inputs,
    base: &Series,
    arm: &Series,
    rng: &mut fastrand::Rng,
) -> Comparison {
    let mut c = blank(
        "windows",
        "bootstrap over switchback windows, 1000 resamples",
        "completions_per_min",
    );
    let per = |s: &Series| -> Vec<f64> {
        let min = (s.turn_s / 60.0).max(1e-9);
        windows(inp, s)
            .into_iter()
            .map(|w| w.iter().filter(|p| p.ok).count() as f64 / min)
            .collect()
    };
    let (b, a) = (per(base), per(arm));
    c.baseline_n = b.len();
    c.arm_n = a.len();
    c.baseline_value = (!b.is_empty()).then(|| mean(&b));
    c.arm_value = (!a.is_empty()).then(|| mean(&a));
    if b.len() < MIN_WINDOWS || a.len() < MIN_WINDOWS {
        return c;
    }
    c.difference = Some(mean(&a) - mean(&b));
    let (mut rb, mut ra) = (vec![0.0; b.len()], vec![0.0; a.len()]);
    let diffs = (0..RESAMPLES).map(|_| {
        resample(&b, &mut rb, rng);
        resample(&a, &mut ra, rng);
        mean(&ra) - mean(&rb)
    });
    c.ci95 = interval(diffs.collect());
    c
}

/// The verdict in words; see the module docs for what the numbers mean.
fn verdict(c: &Comparison) -> String {
    let lower_is_better = c.metric.starts_with("ttft");
    let what = match c.metric.as_str() {
        "ttft_p50_ms" => "TTFT p50",
        "ttft_p95_ms" => "TTFT p95",
        _ => "throughput",
    };
    let unit = if lower_is_better { " ms" } else { "/min" };
    let (Some(d), Some([lo, hi])) = (c.difference, c.ci95) else {
        let (min, have) = match c.unit.as_str() {
            "windows" => (MIN_WINDOWS, c.baseline_n.min(c.arm_n)),
            "requests" => (MIN_REQUESTS, c.baseline_n.min(c.arm_n)),
            _ => {
                return format!(
                    "not enough data yet: {what} needs at least {MIN_COMPLETIONS} completions in the window"
                );
            }
        };
        let more = min.saturating_sub(have).max(1);
        return format!(
            "not enough data yet: about {more} more {} per arm needed",
            c.unit
        );
    };
    let ci = format!("95 % CI {lo:+.1} to {hi:+.1}{unit}");
    if lo > 0.0 || hi < 0.0 {
        let better = (d < 0.0) == lower_is_better;
        let word = match (lower_is_better, better) {
            (true, true) => "faster",
            (true, false) => "slower",
            (false, true) => "higher",
            (false, false) => "lower",
        };
        return format!(
            "{} is {word} than {} at {what}: {d:+.1}{unit} ({ci})",
            c.arm, c.baseline
        );
    }
    let half = (hi - lo) / 2.0;
    if d.abs() < 1e-9 || half <= 0.0 {
        return format!("no difference seen at {what} ({ci})");
    }
    // An interval narrows as 1/sqrt(n): it excludes 0 once its half-width
    // falls below the difference seen so far, if that difference holds.
    let seconds = c.unit == "seconds";
    let n = if seconds {
        c.baseline_n
    } else {
        c.baseline_n + c.arm_n
    } as f64;
    let more = (n * ((half / d.abs()).powi(2) - 1.0)).ceil().max(1.0);
    let more = match (more > 1e6, seconds) {
        (true, _) => format!("over a million more {}", c.unit),
        (false, true) if more >= 120.0 => format!("{:.0} more minutes", (more / 60.0).ceil()),
        (false, _) => format!("{more:.0} more {}", c.unit),
    };
    format!(
        "not enough data yet: about {more} needed to tell at {what} (difference so far {d:+.1}{unit}, {ci})"
    )
}

/// Nearest-rank percentile, as [`super::percentile`], without sorting it all.
fn pct(v: &mut [f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    let (_, x, _) = v.select_nth_unstable_by(rank - 1, |a, b| a.total_cmp(b));
    Some(*x)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn resample(from: &[f64], into: &mut [f64], rng: &mut fastrand::Rng) {
    for x in into.iter_mut() {
        *x = from[rng.usize(..from.len())];
    }
}

/// The 2.5th and 97.5th percentiles of the resampled statistic.
fn interval(mut v: Vec<f64>) -> Option<[f64; 2]> {
    if v.len() < RESAMPLES / 2 {
        return None;
    }
    Some([pct(&mut v, 0.025)?, pct(&mut v, 0.975)?])
}

#[cfg(test)]
#[path = "compare_tests.rs"]
mod tests;
