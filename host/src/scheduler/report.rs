//! What the scheduler reports: each ended request (log line, metrics, A/B
//! sample, trace line), `/status`, and the A/B comparison of arms over a
//! window.

use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::time::Instant;

use super::compare::{self, Comparison, Inputs, Point, Series};
use super::core::Core;
use super::shadow::ShadowReport;
use super::ticket::{Outcome, RequestMeta};
use crate::config::AbMode;
use crate::escape::Escaped;
use crate::fleet::BackendStatus;
use crate::metrics::{ArmClass, OutcomeLabels};
use crate::policy::Class;

/// One ended request, as kept for the A/B report.
#[derive(Clone, Copy)]
pub(super) struct Sample {
    ended: Instant,
    class: Class,
    outcome: Outcome,
    queue_ms: f64,
    ttft_ms: Option<f64>,
    /// Switchback cycle it arrived in (see [`compare`]).
    turn: u64,
    preemptions: u32,
    thrown_tokens: u64,
}

/// Samples kept per arm (the oldest go first).
const MAX_SAMPLES: usize = 100_000;

/// How a request ended, for [`Core::record_end`].
pub(super) struct Ended<'a> {
    pub(super) arm: usize,
    /// The backend of its last dispatch, if it was dispatched.
    pub(super) backend: Option<usize>,
    pub(super) class: Class,
    pub(super) meta: &'a RequestMeta,
    pub(super) queued: Duration,
    pub(super) upstream_ttfb: Option<Duration>,
    pub(super) client_ttfb: Option<Duration>,
    pub(super) outcome: Outcome,
    pub(super) preemptions: u32,
    /// Tokens its pre-emptions threw away.
    pub(super) thrown_tokens: u64,
    /// Response chunks relayed by its last dispatch.
    pub(super) tokens: u64,
    /// Its stream was cut by a pre-emption.
    pub(super) cut: bool,
}

impl Core {
    /// A request the policy refused at admission.
    pub(super) fn record_rejected_at_admission(
        &mut self,
        arm: usize,
        class: Class,
        meta: &RequestMeta,
    ) {
        self.record_end(Ended {
            arm,
            backend: None,
            class,
            meta,
            queued: Duration::ZERO,
            upstream_ttfb: None,
            client_ttfb: None,
            outcome: Outcome::Rejected,
            preemptions: 0,
            thrown_tokens: 0,
            tokens: 0,
            cut: false,
        });
    }

    /// Logs, counts and samples one ended request.
    pub(super) fn record_end(&mut self, end: Ended<'_>) {
        let Ended {
            arm: a,
            backend,
            class,
            meta,
            queued,
            upstream_ttfb,
            client_ttfb,
            outcome,
            preemptions,
            thrown_tokens,
            tokens,
            cut,
        } = end;
        let arm = &mut self.arms[a];
        let total = meta.arrival.elapsed();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let backend = backend.map(|b| self.fleet.name(b).clone());
        tracing::info!(
            target: "maitre::request",
            arm = %arm.name,
            backend = backend.as_deref(),
            class = class.name(),
            path = %Escaped(&meta.path),
            model = %Escaped(&meta.model),
            queue_ms = ms(queued),
            upstream_ttfb_ms = upstream_ttfb.map(ms),
            client_ttfb_ms = client_ttfb.map(ms),
            total_ms = ms(total),
            preemptions,
            outcome = outcome.as_str(),
            "request ended"
        );
        let ac = ArmClass {
            arm: arm.name.to_string(),
            class: class.name().into(),
        };
        self.metrics
            .requests
            .get_or_create(&OutcomeLabels {
                arm: ac.arm.clone(),
                class: ac.class.clone(),
                outcome: outcome.as_str().into(),
            })
            .inc();
        if outcome != Outcome::Rejected {
            self.metrics
                .queue_wait
                .get_or_create(&ac)
                .observe(queued.as_secs_f64());
        }
        if let Some(d) = upstream_ttfb {
            self.metrics
                .upstream_ttfb
                .get_or_create(&ac)
                .observe(d.as_secs_f64());
        }
        if let Some(d) = client_ttfb {
            self.metrics
                .client_ttfb
                .get_or_create(&ac)
                .observe(d.as_secs_f64());
        }
        self.metrics
            .total_time
            .get_or_create(&ac)
            .observe(total.as_secs_f64());
        let turn = self.ms_of(meta.arrival) / self.switchback_cycle_ms();
        let arm = &mut self.arms[a];
        if arm.samples.len() >= MAX_SAMPLES {
            arm.samples.pop_front();
        }
        arm.samples.push_back(Sample {
            ended: Instant::now(),
            class,
            outcome,
            queue_ms: ms(queued),
            ttft_ms: client_ttfb.map(ms),
            turn,
            preemptions,
            thrown_tokens,
        });
        if let Some(sink) = &self.trace {
            use crate::trace::{TraceOutcome, TraceRecord, round_ms};
            let arm = &self.arms[a];
            let ago = meta.arrival.elapsed();
            let arrival_unix_ms = SystemTime::now()
                .checked_sub(ago)
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            sink.record(TraceRecord {
                arrival_unix_ms,
                arrival_ms: round_ms(ms(meta.arrival.saturating_duration_since(self.origin))),
                class_hint: Class::from_priority_header(meta.priority_header.as_deref()),
                class,
                tenant: meta.tenant.as_deref().map(str::to_string),
                model: meta.model.to_string(),
                path: meta.path.clone(),
                stream: meta.stream,
                num_predict: meta.num_predict,
                body_bytes: meta.body_bytes,
                client: Some(sink.client_id(&meta.client_key)),
                backend: backend.as_deref().unwrap_or_default().to_string(),
                arm: arm.name.to_string(),
                queue_ms: round_ms(ms(queued)),
                upstream_ttft_ms: upstream_ttfb.map(|d| round_ms(ms(d))),
                ttft_ms: client_ttfb.map(|d| round_ms(ms(d))),
                tokens,
                duration_ms: round_ms(ms(total)),
                preemptions,
                outcome: match outcome {
                    Outcome::Ok => TraceOutcome::Ok,
                    Outcome::Cancelled if cut => TraceOutcome::Cut,
                    Outcome::Cancelled => TraceOutcome::Cancelled,
                    Outcome::Rejected => TraceOutcome::Rejected,
                    Outcome::UpstreamError => TraceOutcome::UpstreamError,
                },
            });
        }
    }

    pub(super) fn status(&self) -> Status {
        let now = Instant::now();
        let mut requests: Vec<RequestStatus> = self
            .entries
            .iter()
            .map(|(id, e)| RequestStatus {
                id: *id,
                arm: self.arms[e.arm].name.to_string(),
                class: e.class.name(),
                state: e.state.name(),
                path: e.meta.path.clone(),
                model: e.meta.model.to_string(),
                age_ms: now.duration_since(e.meta.arrival).as_millis() as u64,
                preemptions: e.preemptions,
                tokens: e.run.as_ref().map(|r| r.tokens()).unwrap_or(0),
                backend: e.backend.map(|b| self.fleet.name(b).to_string()),
            })
            .collect();
        requests.sort_by_key(|r| r.id);
        Status {
            slots: self.total_slots,
            slots_busy: self.busy,
            waiting: self.waiting_count(),
            draining: self.draining,
            ab_mode: match self.ab.mode {
                AbMode::Weighted => "weighted",
                AbMode::Switchback => "switchback",
            },
            last_reload_error: self.reload_error.clone(),
            arms: self
                .arms
                .iter()
                .map(|a| ArmStatus {
                    name: a.name.to_string(),
                    weight: a.weight,
                    slots: a.slots,
                    busy: a.busy,
                    waiting: a.queued(),
                    plugin: a.source.to_string(),
                    plugin_sha256: a.sha256.clone(),
                    interface: a.interface,
                    loaded_at_unix: a
                        .loaded_at
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs_f64())
                        .unwrap_or(0.0),
                    fallback: a.fallback,
                    last_error: a.last_error.clone(),
                })
                .collect(),
            shadows: self.shadow_reports(),
            backends: self.fleet.status(),
            requests,
        }
    }

    /// The A/B table over the last `window`, and what [`compare::compare`]
    /// needs to add the comparisons (done off this task: it resamples).
    pub(super) fn report(&self, window: Duration) -> (AbReport, Inputs) {
        let now = Instant::now();
        let since_origin = now.duration_since(self.origin).as_secs_f64();
        let span_s = window.as_secs_f64().min(since_origin).max(1e-9);
        let switchback = self.ab.mode == AbMode::Switchback;
        let cycle_ms = self.switchback_cycle_ms();
        let start_ms = ((since_origin - span_s).max(0.0) * 1000.0) as u64;
        let mut inputs = Inputs {
            switchback,
            span_s,
            // The cycle the span starts in is cut; the one running is unfinished.
            first_turn: start_ms / cycle_ms + u64::from(!start_ms.is_multiple_of(cycle_ms)),
            current_turn: self.now_ms() / cycle_ms,
            classes: Vec::new(),
        };
        let mut rows = Vec::new();
        for class in [Class::Realtime, Class::Batch] {
            let mut series = Vec::new();
            for (i, a) in self.arms.iter().enumerate() {
                let s: Vec<&Sample> = a
                    .samples
                    .iter()
                    .filter(|s| s.class == class && now.duration_since(s.ended) <= window)
                    .collect();
                rows.push(row(a.name.to_string(), class, &s, span_s / 60.0));
                let recent = &s[s.len().saturating_sub(compare::MAX_POINTS)..];
                series.push(Series {
                    arm: a.name.to_string(),
                    slots: a.slots,
                    turn_s: self.switchback_turn_s(i),
                    points: recent
                        .iter()
                        .map(|s| Point {
                            turn: s.turn,
                            at_s: span_s - now.duration_since(s.ended).as_secs_f64(),
                            ttft_ms: s.ttft_ms,
                            ok: s.outcome == Outcome::Ok,
                        })
                        .collect(),
                });
            }
            inputs.classes.push((class.name().to_string(), series));
        }
        // Rows arm by arm, as the table has always listed them.
        let n = self.arms.len();
        let rows = (0..n)
            .flat_map(|i| [rows[i].clone(), rows[n + i].clone()])
            .collect();
        let report = AbReport {
            window_seconds: window.as_secs_f64(),
            mode: if switchback { "switchback" } else { "weighted" }.into(),
            rows,
            comparisons: Vec::new(),
            shadows: self.shadow_reports(),
        };
        (report, inputs)
    }
}

impl Core {
    /// Every shadow arm's counts (since it was loaded).
    pub(super) fn shadow_reports(&self) -> Vec<ShadowReport> {
        let watches = if self.ab.mode == AbMode::Switchback {
            "the arm whose switchback turn it is".to_string()
        } else {
            self.arms
                .first()
                .map(|a| a.name.to_string())
                .unwrap_or_default()
        };
        self.shadows.iter().map(|s| s.report(&watches)).collect()
    }
}

/// One arm × class row from its samples in the window.
fn row(arm: String, class: Class, s: &[&Sample], span_min: f64) -> AbRow {
    let mut ttft: Vec<f64> = s.iter().filter_map(|s| s.ttft_ms).collect();
    ttft.sort_by(|x, y| x.total_cmp(y));
    let mut queue: Vec<f64> = s
        .iter()
        .filter(|s| s.outcome != Outcome::Rejected)
        .map(|s| s.queue_ms)
        .collect();
    queue.sort_by(|x, y| x.total_cmp(y));
    let count = |o: Outcome| s.iter().filter(|s| s.outcome == o).count();
    let ok = count(Outcome::Ok);
    AbRow {
        arm,
        class: class.name().to_string(),
        requests: s.len(),
        ok,
        rejected: count(Outcome::Rejected),
        cancelled: count(Outcome::Cancelled),
        upstream_errors: count(Outcome::UpstreamError),
        ttft_samples: ttft.len(),
        ttft_p50_ms: percentile(&ttft, 0.50),
        ttft_p95_ms: percentile(&ttft, 0.95),
        ttft_p99_ms: percentile(&ttft, 0.99),
        queue_p50_ms: percentile(&queue, 0.50),
        queue_p95_ms: percentile(&queue, 0.95),
        completions_per_min: ok as f64 / span_min.max(1e-9),
        preemptions: s.iter().map(|s| s.preemptions as u64).sum(),
        preempted_tokens: s.iter().map(|s| s.thrown_tokens).sum(),
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// `/status` JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Upstream slots.
    pub slots: u32,
    /// Slots in use.
    pub slots_busy: u32,
    /// Requests waiting, all arms.
    pub waiting: usize,
    /// Shutting down.
    pub draining: bool,
    /// `weighted` or `switchback`.
    pub ab_mode: &'static str,
    /// The last reload's error, until a reload succeeds.
    pub last_reload_error: Option<String>,
    /// Arms.
    pub arms: Vec<ArmStatus>,
    /// Shadow arms (no traffic; see [`super::shadow`]).
    pub shadows: Vec<ShadowReport>,
    /// The backends: slots, busy, health, loaded models.
    pub backends: Vec<BackendStatus>,
    /// Waiting and running requests.
    pub requests: Vec<RequestStatus>,
}

/// One arm in `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct ArmStatus {
    /// Name.
    pub name: String,
    /// Weight.
    pub weight: u32,
    /// Slots it owns now.
    pub slots: u32,
    /// Of which in use.
    pub busy: u32,
    /// Requests waiting.
    pub waiting: usize,
    /// Plugin path or `builtin:NAME`.
    pub plugin: String,
    /// sha256 of the plugin.
    pub plugin_sha256: String,
    /// The interface version the plugin speaks, e.g. `maitre:policy@0.2.0`.
    pub interface: &'static str,
    /// Unix time it was loaded.
    pub loaded_at_unix: f64,
    /// True when the plugin was ejected and FIFO serves.
    pub fallback: bool,
    /// Last fault.
    pub last_error: Option<String>,
}

/// One request in `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct RequestStatus {
    /// Id.
    pub id: u64,
    /// Arm.
    pub arm: String,
    /// Class.
    pub class: &'static str,
    /// `waiting`, `running`, `preempting`, `handoff`.
    pub state: &'static str,
    /// Path.
    pub path: String,
    /// Model.
    pub model: String,
    /// Time since arrival.
    pub age_ms: u64,
    /// Pre-emptions so far.
    pub preemptions: u32,
    /// Chunks received so far.
    pub tokens: u64,
    /// The backend it runs on, while it holds a slot.
    pub backend: Option<String>,
}

/// A/B comparison over a window.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AbReport {
    /// Window length.
    pub window_seconds: f64,
    /// `weighted` or `switchback`: what the comparisons resample.
    #[serde(default)]
    pub mode: String,
    /// One row per arm and class.
    pub rows: Vec<AbRow>,
    /// Each arm against the first, per class, with confidence intervals.
    #[serde(default)]
    pub comparisons: Vec<Comparison>,
    /// Shadow arms: where they agree with the serving arm (since loaded).
    #[serde(default)]
    pub shadows: Vec<ShadowReport>,
}

/// One arm × class row of an [`AbReport`].
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AbRow {
    /// Arm.
    pub arm: String,
    /// Class.
    pub class: String,
    /// Requests that ended in the window.
    pub requests: usize,
    /// Of which answered.
    pub ok: usize,
    /// Rejected.
    pub rejected: usize,
    /// Cancelled by the client.
    pub cancelled: usize,
    /// Upstream errors.
    pub upstream_errors: usize,
    /// Requests with a TTFT sample.
    pub ttft_samples: usize,
    /// TTFT percentiles (ms).
    pub ttft_p50_ms: Option<f64>,
    /// p95.
    pub ttft_p95_ms: Option<f64>,
    /// p99.
    pub ttft_p99_ms: Option<f64>,
    /// Queue wait p50 (ms).
    pub queue_p50_ms: Option<f64>,
    /// Queue wait p95 (ms).
    pub queue_p95_ms: Option<f64>,
    /// Completed requests per minute.
    pub completions_per_min: f64,
    /// Pre-emptions suffered by the requests that ended in the window.
    #[serde(default)]
    pub preemptions: u64,
    /// Tokens those pre-emptions threw away: response chunks already
    /// relayed (live, a non-streamed answer's lost work is not visible);
    /// in `maitre simulate`, every token the modelled upstream had made.
    #[serde(default)]
    pub preempted_tokens: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(|x| x as f64).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
