//! Prometheus metrics: what operators graph and alert on.
//!
//! One [`Metrics`] value per host, shared by the proxy, the scheduler, the
//! plugin runtime and hot reload. `/metrics` on the admin listener encodes it
//! in the format the scraper asks for: OpenMetrics 1.0 text ([`Metrics::encode`],
//! what Prometheus asks for first) or the classic Prometheus text format 0.0.4
//! ([`Metrics::encode_prometheus_text`], for `curl` and older scrapers).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of a finished scheduled request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// Policy arm.
    pub arm: String,
    /// `realtime` or `batch`.
    pub class: String,
    /// `ok`, `cancelled`, `rejected`, `upstream_error`.
    pub outcome: String,
}

/// Arm + class labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ArmClass {
    /// Policy arm.
    pub arm: String,
    /// `realtime` or `batch`.
    pub class: String,
}

/// Arm label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ArmLabel {
    /// Policy arm.
    pub arm: String,
}

/// Arm + kind labels (fault kinds, invalid action kinds, plugin calls).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ArmKind {
    /// Policy arm.
    pub arm: String,
    /// What happened.
    pub kind: String,
}

/// Backend label: one Ollama server of the fleet.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    /// Backend name (`[[upstream]] name`, `default` for a single `[upstream]`).
    pub backend: String,
}

/// A shadow arm's comparison results.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShadowLabels {
    /// The shadow arm.
    pub arm: String,
    /// `schedule_agree`, `schedule_differ`, `admit_agree`, `admit_differ`
    /// or `skipped` (the shadow was still busy).
    pub result: String,
}

/// Result label of a reload.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` or `failed`.
    pub result: ReloadResult,
}

/// Whether a reload took effect.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ReloadResult {
    /// The new policy serves.
    Ok,
    /// The old policy stays.
    Failed,
}

impl ReloadResult {
    /// The label value: `ok` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Ok => "ok",
            ReloadResult::Failed => "failed",
        }
    }
}

impl EncodeLabelValue for ReloadResult {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(self.as_str())
    }
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    // 0.5 ms .. ~1000 s: from proxy overhead to a long queue behind batch jobs.
    prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.5, 17)
}

fn plugin_buckets() -> impl Iterator<Item = f64> {
    // 1 µs .. ~0.5 s.
    prometheus_client::metrics::histogram::exponential_buckets(0.000_001, 3.0, 13)
}

/// Every metric maitre exports.
pub struct Metrics {
    registry: Registry,
    /// Scheduled requests by arm, class and outcome.
    pub requests: Family<OutcomeLabels, Counter>,
    /// Requests passed straight through (not scheduled).
    pub passthrough: Counter,
    /// Time spent waiting in maitre's queue (s).
    pub queue_wait: Family<ArmClass, Histogram, fn() -> Histogram>,
    /// Dispatch → first byte from the upstream (s).
    pub upstream_ttfb: Family<ArmClass, Histogram, fn() -> Histogram>,
    /// Arrival → first byte to the client (s): the TTFT a person feels.
    pub client_ttfb: Family<ArmClass, Histogram, fn() -> Histogram>,
    /// Arrival → end (s).
    pub total_time: Family<ArmClass, Histogram, fn() -> Histogram>,
    /// Upstream slots in use.
    pub slots_busy: Gauge,
    /// Upstream slots configured.
    pub slots_total: Gauge,
    /// Requests waiting, by arm.
    pub waiting: Family<ArmLabel, Gauge>,
    /// Plugin call duration (s), by arm and call (admit, schedule).
    pub plugin_call: Family<ArmKind, Histogram, fn() -> Histogram>,
    /// Plugin faults by arm and kind (trap, timeout, memory, invalid, starvation).
    pub plugin_faults: Family<ArmKind, Counter>,
    /// Plugin actions the host refused, by arm and reason.
    pub invalid_actions: Family<ArmKind, Counter>,
    /// Policy reloads by result.
    pub reloads: Family<ReloadLabels, Counter>,
    /// Pre-emptions by arm.
    pub preemptions: Family<ArmLabel, Counter>,
    /// Tokens thrown away by pre-emption, as seen by maitre: response chunks
    /// already received (the upstream always streams, so non-streaming
    /// requests count too).
    pub preempted_tokens: Family<ArmLabel, Counter>,
    /// Of those, the tokens kept: a pre-empted chat of a model with
    /// `resume_preempted` continues its answer so far.
    pub resumed_tokens: Family<ArmLabel, Counter>,
    /// Upstream answers of 503 (busy) that maitre requeued.
    pub upstream_busy_retries: Counter,
    /// Requests whose upstream connection failed before anything reached
    /// the client, requeued.
    pub upstream_lost_retries: Counter,
    /// Requests whose body `[models."NAME"]` rewrote (`num_ctx`,
    /// `keep_alive`).
    pub normalised_requests: Counter,
    /// Shadow arms: where they agree with the serving arm, where not.
    pub shadow_decisions: Family<ShadowLabels, Counter>,
    /// Client connections open now (at most `limits.max_connections`).
    pub client_connections: Gauge,
    /// Request body bytes maitre holds now, being read or waiting (at most
    /// `limits.max_total_body_bytes`).
    pub held_body_bytes: Gauge,
    /// Trace records not written: the writer was behind (its queue full)
    /// or the file could not be written.
    pub trace_dropped: Counter,
    /// Slots of each backend.
    pub backend_slots: Family<BackendLabel, Gauge>,
    /// Slots in use on each backend.
    pub backend_busy: Family<BackendLabel, Gauge>,
    /// 1 while a backend answers its probes, 0 while it is down.
    pub backend_up: Family<BackendLabel, Gauge>,
    /// Requests dispatched to each backend (each attempt).
    pub backend_requests: Family<BackendLabel, Counter>,
    /// Model loads seen on each backend (a model newly in its `/api/ps`, or
    /// newly answered from).
    pub backend_model_loads: Family<BackendLabel, Counter>,
    /// Requests moved to another backend after this one failed before
    /// anything reached the client.
    pub backend_failovers: Family<BackendLabel, Counter>,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("maitre");
        let h: fn() -> Histogram = || Histogram::new(latency_buckets());
        let p: fn() -> Histogram = || Histogram::new(plugin_buckets());
        let m = Metrics {
            requests: Family::default(),
            passthrough: Counter::default(),
            queue_wait: Family::new_with_constructor(h),
            upstream_ttfb: Family::new_with_constructor(h),
            client_ttfb: Family::new_with_constructor(h),
            total_time: Family::new_with_constructor(h),
            slots_busy: Gauge::default(),
            slots_total: Gauge::default(),
            waiting: Family::default(),
            plugin_call: Family::new_with_constructor(p),
            plugin_faults: Family::default(),
            invalid_actions: Family::default(),
            reloads: Family::default(),
            preemptions: Family::default(),
            preempted_tokens: Family::default(),
            resumed_tokens: Family::default(),
            upstream_busy_retries: Counter::default(),
            upstream_lost_retries: Counter::default(),
            normalised_requests: Counter::default(),
            shadow_decisions: Family::default(),
            client_connections: Gauge::default(),
            held_body_bytes: Gauge::default(),
            trace_dropped: Counter::default(),
            backend_slots: Family::default(),
            backend_busy: Family::default(),
            backend_up: Family::default(),
            backend_requests: Family::default(),
            backend_model_loads: Family::default(),
            backend_failovers: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Scheduled requests by arm, class and outcome",
            m.requests.clone(),
        );
        registry.register(
            "passthrough_requests",
            "Requests passed through unscheduled",
            m.passthrough.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time spent waiting in maitre's queue",
            m.queue_wait.clone(),
        );
        registry.register(
            "upstream_ttfb_seconds",
            "Dispatch to first byte from the upstream",
            m.upstream_ttfb.clone(),
        );
        registry.register(
            "client_ttfb_seconds",
            "Arrival to first byte sent to the client (time to first token)",
            m.client_ttfb.clone(),
        );
        registry.register(
            "total_seconds",
            "Arrival to end of the request",
            m.total_time.clone(),
        );
        registry.register("slots_busy", "Upstream slots in use", m.slots_busy.clone());
        registry.register("slots", "Upstream slots configured", m.slots_total.clone());
        registry.register(
            "waiting_requests",
            "Requests waiting in maitre's queue",
            m.waiting.clone(),
        );
        registry.register(
            "plugin_call_seconds",
            "Duration of plugin calls",
            m.plugin_call.clone(),
        );
        registry.register(
            "plugin_faults",
            "Plugin faults that ejected a plugin",
            m.plugin_faults.clone(),
        );
        registry.register(
            "plugin_invalid_actions",
            "Plugin actions the host refused",
            m.invalid_actions.clone(),
        );
        registry.register("reloads", "Policy reloads", m.reloads.clone());
        registry.register("preemptions", "Requests pre-empted", m.preemptions.clone());
        registry.register(
            "preempted_tokens",
            "Response chunks (tokens) of pre-empted requests thrown away (the upstream always streams, so non-streaming requests count too)",
            m.preempted_tokens.clone(),
        );
        registry.register(
            "resumed_tokens",
            "Of the pre-empted tokens, those kept: a chat of a model with resume_preempted continued its answer so far instead of restarting",
            m.resumed_tokens.clone(),
        );
        registry.register(
            "trace_dropped",
            "Trace records not written (writer behind or file not writable)",
            m.trace_dropped.clone(),
        );
        registry.register(
            "upstream_busy_retries",
            "Upstream 503 answers that were requeued",
            m.upstream_busy_retries.clone(),
        );
        registry.register(
            "upstream_lost_retries",
            "Requests whose upstream connection failed before anything reached the client, requeued",
            m.upstream_lost_retries.clone(),
        );
        registry.register(
            "normalised_requests",
            "Requests whose body [models.\"NAME\"] rewrote (num_ctx, keep_alive)",
            m.normalised_requests.clone(),
        );
        registry.register(
            "shadow_decisions",
            "Shadow-arm answers compared with the serving arm's, by result",
            m.shadow_decisions.clone(),
        );
        registry.register(
            "client_connections",
            "Client connections open (at most limits.max_connections)",
            m.client_connections.clone(),
        );
        registry.register(
            "held_body_bytes",
            "Request body bytes held, being read or waiting (at most limits.max_total_body_bytes)",
            m.held_body_bytes.clone(),
        );
        registry.register(
            "backend_slots",
            "Slots of each backend",
            m.backend_slots.clone(),
        );
        registry.register(
            "backend_slots_busy",
            "Slots in use on each backend",
            m.backend_busy.clone(),
        );
        registry.register(
            "backend_up",
            "1 while a backend answers, 0 while it is down",
            m.backend_up.clone(),
        );
        registry.register(
            "backend_requests",
            "Requests dispatched to each backend",
            m.backend_requests.clone(),
        );
        registry.register(
            "backend_model_loads",
            "Model loads seen on each backend",
            m.backend_model_loads.clone(),
        );
        registry.register(
            "backend_failovers",
            "Requests moved to another backend after this one failed before anything reached the client",
            m.backend_failovers.clone(),
        );
        // Both reload results exist from the start, so a dashboard sees 0
        // failures rather than no series at all.
        for result in [ReloadResult::Ok, ReloadResult::Failed] {
            let _ = m.reloads.get_or_create(&ReloadLabels { result });
        }
        Metrics { registry, ..m }
    }

    /// Sets an arm's waiting-requests gauge (derived from its queue, never
    /// adjusted by hand, so it cannot drift).
    pub fn set_waiting(&self, arm: &str, n: usize) {
        self.waiting
            .get_or_create(&ArmLabel {
                arm: arm.to_string(),
            })
            .set(n as i64);
    }

    /// Encodes every metric in the OpenMetrics 1.0 text format (ends in `# EOF`;
    /// content type [`OPENMETRICS_CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    /// Encodes every metric in the Prometheus text format 0.0.4 (content type
    /// [`PROMETHEUS_TEXT_CONTENT_TYPE`]), for scrapers that do not ask for
    /// OpenMetrics.
    pub fn encode_prometheus_text(&self) -> String {
        openmetrics_to_prometheus_text(&self.encode())
    }
}

/// Content type of [`Metrics::encode`].
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Content type of [`Metrics::encode_prometheus_text`].
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header value asks for OpenMetrics (Prometheus sends
/// `application/openmetrics-text;version=1.0.0,...;q=0.75,text/plain;version=0.0.4;q=0.5,...`).
/// A media range with `q=0` is a refusal, not a request.
pub fn accepts_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("");
        let refused = parts.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f64>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
    })
}

/// Rewrites prometheus-client's OpenMetrics text as Prometheus text 0.0.4: a
/// counter family is named with its `_total` suffix, and the OpenMetrics-only
/// lines (`# UNIT`, `# EOF`, `_created` samples) go. Everything else
/// (gauges, histograms, label escaping, `+Inf`) is the same in both formats.
fn openmetrics_to_prometheus_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        if let Some((p, rest)) = descriptor {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(name) {
                out.push_str(&format!("{p}{name}_total {tail}\n"));
                continue;
            }
        } else if !line.starts_with('#') {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            if name
                .strip_suffix("_created")
                .is_some_and(|base| counters.contains(base))
            {
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reload_results_are_lower_case_and_present_from_the_start() {
        let m = Metrics::new();
        let text = m.encode();
        assert!(
            text.contains("maitre_reloads_total{result=\"ok\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("maitre_reloads_total{result=\"failed\"} 0\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn prometheus_text_names_counters_with_total_and_has_no_eof() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&OutcomeLabels {
                arm: "a".into(),
                class: "batch".into(),
                outcome: "ok".into(),
            })
            .inc();
        m.queue_wait
            .get_or_create(&ArmClass {
                arm: "a".into(),
                class: "batch".into(),
            })
            .observe(0.01);
        let text = m.encode_prometheus_text();
        assert!(!text.contains("# EOF"), "{text}");
        assert!(
            text.contains("# TYPE maitre_requests_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# HELP maitre_requests_total "), "{text}");
        assert!(
            text.contains("maitre_requests_total{arm=\"a\",class=\"batch\",outcome=\"ok\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE maitre_queue_wait_seconds histogram\n"),
            "{text}"
        );
        assert!(text.contains("maitre_queue_wait_seconds_count{arm=\"a\",class=\"batch\"} 1\n"));
        assert!(text.contains("# TYPE maitre_slots_busy gauge\n"));
    }

    #[test]
    fn accept_header_negotiation() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(accepts_openmetrics(prometheus));
        assert!(accepts_openmetrics("Application/OpenMetrics-Text"));
        assert!(!accepts_openmetrics("text/plain"));
        assert!(!accepts_openmetrics("*/*"));
        assert!(!accepts_openmetrics(""));
        assert!(!accepts_openmetrics(
            "application/openmetrics-text;q=0, text/plain"
        ));
    }
}
