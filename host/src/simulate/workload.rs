//! From a trace to the work the simulator replays: each request's arrival,
//! what the scheduler is told about it, and how long the upstream takes for
//! it (prompt time, per-token time, tokens).
//!
//! The upstream's timing is measured from the trace, per model: a streamed
//! answer that was neither pre-empted nor cut shows its own prompt time and
//! per-token time (upstream TTFT = prompt + one token; the remaining tokens
//! arrive one per-token time apart). Such a request is replayed with its own
//! timing; any other request draws one (seeded) from its model's measured
//! ones. A request's length is its own when the trace shows it (the chunks
//! of a stream; for an answer sent whole, its upstream time divided out by
//! its model's median timing), else its `num_predict`, else a draw from its
//! model's lengths. An answer sent whole is replayed at the per-token time
//! its length was derived with, the rest of its upstream time as its prompt
//! time, so it takes as long as it did. `--prompt-ms` and `--token-ms` replace the timing, never
//! the lengths: they model another machine running the same work.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::rng::Rng;
use crate::policy::Class;
use crate::scheduler::percentile;
use crate::trace::{TraceOutcome, TraceRecord};
use upstream_model::timing::Timing;

/// Per-token time when a trace measures none and no flag gives one: the
/// upstream model's (and `maitre serve --demo`'s).
pub const DEFAULT_TOKEN_MS: f64 = 20.0;
/// Prompt time when a trace measures none and no flag gives one.
pub const DEFAULT_PROMPT_MS: f64 = 0.0;
/// Length of a request whose length nothing tells.
pub const DEFAULT_TOKENS: u64 = 100;

/// The upstream timing to use instead of the trace's measurements.
#[derive(Debug, Clone, Copy, Default)]
pub struct TimingFlags {
    /// Prompt (prefill) time, ms.
    pub prompt_ms: Option<f64>,
    /// Time per token, ms.
    pub token_ms: Option<f64>,
}

/// One request to replay.
#[derive(Debug, Clone)]
pub struct Job {
    /// Arrival, ms after the first one.
    pub at_ms: f64,
    /// HTTP path.
    pub path: String,
    /// Model.
    pub model: String,
    /// Whether the answer streams.
    pub stream: bool,
    /// `X-Priority` as the trace's class hint spells it.
    pub priority_header: Option<String>,
    /// Tenant.
    pub tenant: Option<String>,
    /// `num_predict`.
    pub num_predict: Option<i64>,
    /// Body size.
    pub body_bytes: u64,
    /// A/B key.
    pub client_key: String,
    /// The upstream's timing for it.
    pub timing: Timing,
    /// Tokens it generates.
    pub tokens: u64,
    /// The client gave up this long after arrival (the trace says it went
    /// away then); replayed, it leaves at the same point unless served.
    pub leave_after: Option<Duration>,
}

/// What the trace measured of one model, as the summary shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelTiming {
    /// Model.
    pub model: String,
    /// Requests of this model.
    pub requests: usize,
    /// Requests whose own timing was measured.
    pub measured: usize,
    /// Median prompt time used (ms).
    pub prompt_ms_p50: f64,
    /// Median per-token time used (ms).
    pub token_ms_p50: f64,
    /// Median length (tokens).
    pub tokens_p50: f64,
}

/// What the jobs of one model use: prompt times, per-token times, lengths.
type Used = (Vec<f64>, Vec<f64>, Vec<f64>);

/// A request's own timing and length, when its line shows them.
struct Measured {
    prompt_ms: f64,
    token_ms: f64,
}

/// An answer that streamed from the upstream and was not pre-empted: upstream
/// TTFT = prompt + one token; chunks = tokens + Ollama's final frame; the
/// time from the first token to the end holds the other tokens. maitre asks
/// every upstream for a stream, so this holds for a client that asked for a
/// whole answer too; a trace from before that (one chunk per whole answer)
/// goes by the whole-answer estimate below.
fn measured(r: &TraceRecord) -> Option<Measured> {
    if r.outcome != TraceOutcome::Ok || r.preemptions > 0 || r.tokens < 3 {
        return None;
    }
    let ttft = r.upstream_ttft_ms?;
    let service = r.duration_ms - r.queue_ms;
    let token_ms = (service - ttft) / (r.tokens - 2) as f64;
    if !(token_ms.is_finite() && token_ms > 0.0) {
        return None;
    }
    Some(Measured {
        prompt_ms: (ttft - token_ms).max(0.0),
        token_ms,
    })
}

/// Per model: measured timings and lengths.
#[derive(Default)]
struct Model {
    requests: usize,
    timings: Vec<(f64, f64)>,
    lengths: Vec<u64>,
}

impl Model {
    fn median_timing(&self) -> Option<(f64, f64)> {
        let med = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            percentile(&v, 0.5)
        };
        Some((
            med(self.timings.iter().map(|t| t.0).collect())?,
            med(self.timings.iter().map(|t| t.1).collect())?,
        ))
    }
}

/// The jobs of a trace (in arrival order, with offsets), and the summary
/// of what was measured per model.
pub fn jobs(
    records: &[(f64, TraceRecord)],
    flags: TimingFlags,
    seed: u64,
) -> (Vec<Job>, Vec<ModelTiming>) {
    let mut models: BTreeMap<&str, Model> = BTreeMap::new();
    let own: Vec<Option<Measured>> = records.iter().map(|(_, r)| measured(r)).collect();
    for ((_, r), m) in records.iter().zip(&own) {
        let model = models.entry(r.model.as_str()).or_default();
        model.requests += 1;
        if let Some(m) = m {
            model.timings.push((m.prompt_ms, m.token_ms));
            model.lengths.push(r.tokens - 1);
        }
    }
    // A model without a measured stream uses the flags, else the defaults,
    // to turn an answer sent whole into a length.
    let fallback = (
        flags.prompt_ms.unwrap_or(DEFAULT_PROMPT_MS),
        flags.token_ms.unwrap_or(DEFAULT_TOKEN_MS),
    );
    let basis: BTreeMap<&str, (f64, f64)> = models
        .iter()
        .map(|(k, m)| (*k, m.median_timing().unwrap_or(fallback)))
        .collect();
    // Lengths of answers sent whole, now that each model has a basis; such
    // an answer is replayed at its model's per-token time, with what is left
    // of its upstream time as its prompt time, so it takes as long as it did.
    let mut whole_len = vec![None; records.len()];
    let mut whole_timing = vec![None; records.len()];
    for (i, (_, r)) in records.iter().enumerate() {
        if own[i].is_none()
            && !r.stream
            && r.outcome == TraceOutcome::Ok
            && let Some(ttft) = r.upstream_ttft_ms
        {
            let (prompt, token) = basis[r.model.as_str()];
            let n = ((ttft - prompt) / token).round().max(1.0) as u64;
            whole_len[i] = Some(n);
            whole_timing[i] = Some(((ttft - n as f64 * token).max(0.0), token));
            if let Some(m) = models.get_mut(r.model.as_str()) {
                m.lengths.push(n);
            }
        }
    }
    let all_lengths: Vec<u64> = models.values().flat_map(|m| m.lengths.clone()).collect();
    let all_timings: Vec<(f64, f64)> = models.values().flat_map(|m| m.timings.clone()).collect();
    let mut rng = Rng::new(seed, 0x70b5);
    let mut used: BTreeMap<&str, Used> = BTreeMap::new();
    let mut out = Vec::with_capacity(records.len());
    for (i, (at, r)) in records.iter().enumerate() {
        let m = &models[r.model.as_str()];
        let pick_timing = |rng: &mut Rng, v: &[(f64, f64)]| v[rng.below(v.len())];
        let (prompt_ms, token_ms) = match &own[i] {
            Some(m) => (m.prompt_ms, m.token_ms),
            None if let Some(t) = whole_timing[i] => t,
            None if !m.timings.is_empty() => pick_timing(&mut rng, &m.timings),
            None if !all_timings.is_empty() => pick_timing(&mut rng, &all_timings),
            None => fallback,
        };
        let (prompt_ms, token_ms) = (
            flags.prompt_ms.unwrap_or(prompt_ms),
            flags.token_ms.unwrap_or(token_ms),
        );
        let tokens = if own[i].is_some() || (r.stream && r.outcome == TraceOutcome::Ok) {
            r.tokens.saturating_sub(1)
        } else if let Some(n) = whole_len[i] {
            n
        } else if let Some(n) = r.num_predict.filter(|n| *n > 0) {
            n as u64
        } else if !m.lengths.is_empty() {
            m.lengths[rng.below(m.lengths.len())]
        } else if !all_lengths.is_empty() {
            all_lengths[rng.below(all_lengths.len())]
        } else {
            DEFAULT_TOKENS
        };
        let u = used.entry(r.model.as_str()).or_default();
        u.0.push(prompt_ms);
        u.1.push(token_ms);
        u.2.push(tokens as f64);
        out.push(Job {
            at_ms: *at,
            path: r.path.clone(),
            model: r.model.clone(),
            stream: r.stream,
            priority_header: r.class_hint.map(|c| Class::name(c).to_string()),
            tenant: r.tenant.clone(),
            num_predict: r.num_predict,
            body_bytes: r.body_bytes,
            client_key: r.client.clone().unwrap_or_else(|| format!("request-{i}")),
            timing: Timing {
                prompt: ms(prompt_ms),
                per_token: ms(token_ms),
            },
            tokens,
            leave_after: (r.outcome == TraceOutcome::Cancelled).then(|| ms(r.duration_ms)),
        });
    }
    let summary = used
        .into_iter()
        .map(|(model, (mut p, mut t, mut n))| {
            for v in [&mut p, &mut t, &mut n] {
                v.sort_by(f64::total_cmp);
            }
            ModelTiming {
                model: model.to_string(),
                requests: models[model].requests,
                measured: models[model].timings.len(),
                prompt_ms_p50: percentile(&p, 0.5).unwrap_or(0.0),
                token_ms_p50: percentile(&t, 0.5).unwrap_or(0.0),
                tokens_p50: percentile(&n, 0.5).unwrap_or(0.0),
            }
        })
        .collect();
    (out, summary)
}

/// maitre's own time from a slot freeing to the start of the request that
/// waited for it: the decide turn, with its plugin calls. The virtual clock
/// does not see it (a decision takes no virtual time), so the simulator adds
/// it to every start, or a queue that never empties would run ahead of the
/// live one by this much per request. The trace shows it: a request that
/// waited started this long after the last end before its start (median,
/// in ms); without such requests, after its arrival.
pub fn dispatch_ms(records: &[(f64, TraceRecord)]) -> f64 {
    let mut ends: Vec<f64> = records.iter().map(|(at, r)| at + r.duration_ms).collect();
    ends.sort_by(f64::total_cmp);
    let (mut handoffs, mut arrivals) = (Vec::new(), Vec::new());
    for (at, r) in records {
        if r.upstream_ttft_ms.is_none() || r.preemptions > 0 {
            continue;
        }
        let start = at + r.queue_ms;
        match ends.partition_point(|e| *e <= start) {
            i if i > 0 && ends[i - 1] > *at => handoffs.push(start - ends[i - 1]),
            _ => arrivals.push(start - at),
        }
    }
    let gaps = if handoffs.is_empty() {
        &mut arrivals
    } else {
        &mut handoffs
    };
    gaps.sort_by(f64::total_cmp);
    percentile(gaps, 0.5).unwrap_or(0.0).clamp(0.0, 100.0)
}

fn ms(v: f64) -> Duration {
    Duration::from_secs_f64(v.max(0.0) / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::arrival_offsets;

    fn rec(stream: bool, ttft: f64, tokens: u64, duration: f64) -> TraceRecord {
        TraceRecord {
            arrival_unix_ms: 1_000,
            arrival_ms: 0.0,
            class_hint: Some(Class::Batch),
            class: Class::Batch,
            tenant: None,
            model: "m".into(),
            path: "/api/generate".into(),
            stream,
            num_predict: None,
            body_bytes: 10,
            client: Some("c".into()),
            backend: "b".into(),
            arm: "a".into(),
            queue_ms: 5.0,
            upstream_ttft_ms: Some(ttft),
            ttft_ms: Some(ttft + 5.0),
            tokens,
            duration_ms: duration,
            preemptions: 0,
            outcome: TraceOutcome::Ok,
        }
    }

    #[test]
    fn a_stream_shows_its_own_timing_and_a_whole_answer_its_length() {
        // Stream: prompt 100, 20 ms a token, 10 tokens (+ final frame);
        // queued 5 ms. Whole: 30 tokens on the same model.
        let recs = vec![
            rec(true, 120.0, 11, 5.0 + 100.0 + 10.0 * 20.0),
            rec(false, 100.0 + 30.0 * 20.0, 1, 5.0 + 700.0),
        ];
        let (jobs, summary) = jobs(&arrival_offsets(recs), TimingFlags::default(), 1);
        assert_eq!(jobs[0].tokens, 10);
        assert_eq!(jobs[0].timing.prompt, Duration::from_millis(100));
        assert_eq!(jobs[0].timing.per_token, Duration::from_millis(20));
        assert_eq!(jobs[1].tokens, 30);
        assert_eq!(jobs[1].timing, jobs[0].timing, "its model's median");
        // A few ms of overhead go to the prompt time, not lost.
        let recs = vec![
            rec(true, 120.0, 11, 5.0 + 100.0 + 10.0 * 20.0),
            rec(false, 100.0 + 30.0 * 20.0 + 3.0, 1, 5.0 + 703.0),
        ];
        let (whole, _) = super::jobs(&arrival_offsets(recs), TimingFlags::default(), 1);
        assert_eq!(whole[1].tokens, 30);
        assert_eq!(whole[1].timing.prompt, Duration::from_millis(103));
        assert_eq!(summary[0].measured, 1);
        assert_eq!(summary[0].token_ms_p50, 20.0);
    }

    #[test]
    fn answers_sent_whole_take_as_long_as_they_did() {
        // Streams measured at 10, 20 and 40 ms a token (no prompt time);
        // ten answers sent whole of 5..14 tokens on the 20 ms median.
        let mut recs: Vec<TraceRecord> = [10.0, 20.0, 40.0]
            .iter()
            .map(|pt| rec(true, *pt, 11, 5.0 + 10.0 * pt))
            .collect();
        for n in 5..15 {
            recs.push(rec(false, n as f64 * 20.0, 1, 5.0 + n as f64 * 20.0));
        }
        let (jobs, _) = jobs(&arrival_offsets(recs), TimingFlags::default(), 3);
        for (j, n) in jobs.iter().filter(|j| !j.stream).zip(5u64..) {
            let plan = upstream_model::timing::Plan {
                timing: j.timing,
                tokens: j.tokens,
                fail_after: None,
            };
            assert_eq!(j.tokens, n);
            assert_eq!(plan.end(), Duration::from_millis(n * 20), "{j:?}");
        }
    }

    #[test]
    fn dispatch_time_is_the_gap_between_a_slot_freeing_and_the_next_start() {
        // One slot, back to back: each request starts 0.3 ms after the one
        // before it ends; the first, arriving at an idle slot, 0.2 ms after
        // its arrival (not a handoff).
        let mut recs = Vec::new();
        let mut end = 0.0;
        for i in 0..5u64 {
            let mut r = rec(false, 100.0, 1, 0.0);
            let gap = if i == 0 { 0.2 } else { 0.3 };
            r.arrival_ms = 0.0;
            r.queue_ms = end + gap;
            r.duration_ms = end + gap + 100.0;
            end = r.duration_ms;
            recs.push(r);
        }
        let d = dispatch_ms(&arrival_offsets(recs));
        assert!((d - 0.3).abs() < 1e-9, "{d}");
    }

    #[test]
    fn flags_replace_the_timing_not_the_lengths() {
        let recs = vec![rec(true, 120.0, 11, 305.0)];
        let flags = TimingFlags {
            prompt_ms: Some(0.0),
            token_ms: Some(5.0),
        };
        let (jobs, _) = jobs(&arrival_offsets(recs), flags, 1);
        assert_eq!(jobs[0].tokens, 10);
        assert_eq!(jobs[0].timing.per_token, Duration::from_millis(5));
        assert_eq!(jobs[0].timing.prompt, Duration::ZERO);
    }

    #[test]
    fn unserved_requests_take_num_predict_or_a_measured_length() {
        let mut rejected = rec(false, 0.0, 0, 1.0);
        rejected.outcome = TraceOutcome::Rejected;
        rejected.upstream_ttft_ms = None;
        let mut limited = rejected.clone();
        limited.num_predict = Some(7);
        let mut gone = rejected.clone();
        gone.outcome = TraceOutcome::Cancelled;
        gone.duration_ms = 2_500.0;
        let recs = vec![rec(true, 120.0, 11, 305.0), rejected, limited, gone];
        let (jobs, _) = jobs(&arrival_offsets(recs), TimingFlags::default(), 1);
        assert_eq!(jobs[1].tokens, 10, "the model's only measured length");
        assert_eq!(jobs[2].tokens, 7);
        assert_eq!(jobs[3].leave_after, Some(Duration::from_millis(2_500)));
        assert_eq!(jobs[0].leave_after, None);
    }
}
