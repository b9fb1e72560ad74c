//! Keeps the scheduler's picture of the fleet fresh: per backend, a health
//! probe (`GET /api/version` every `[fleet] probe_interval_ms`) and a
//! residency poll (`GET /api/ps` every `[fleet] ps_interval_ms`), each a
//! small task that tells the scheduler what it saw.
//!
//! An OpenAI-compatible backend (`kind = "openai"`) is probed with
//! `GET /health` (llama-server, vLLM) and polled with `GET /v1/models`: the
//! models it lists are available there without a load. It has no residency
//! poll; what it runs is known from traffic only.
//!
//! A probe that fails (refused, timed out, or not a 2xx) marks the backend
//! down; the next one that answers marks it up again. A failed poll changes
//! nothing (the probe speaks for health). Both run from the start, so the
//! first `/status` already shows which models are loaded where. Traffic
//! speaks too: a refused connection marks a backend down at once, and an
//! answered request marks it up.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use tokio_util::sync::CancellationToken;

use super::residency::parse_ps;
use crate::config::{BackendKind, FleetConfig};
use crate::escape::Escaped;
use crate::proxy::{Fetched, Proxy, Target};
use crate::scheduler::SchedulerHandle;

/// Longest a probe or a poll may take (it is also bounded by its period).
const MAX_CALL: Duration = Duration::from_secs(5);

/// Starts the probes and polls of every backend (those whose period is not
/// 0); they stop with `stop`.
pub fn spawn(
    proxy: Arc<Proxy>,
    sched: SchedulerHandle,
    cfg: &FleetConfig,
    stop: CancellationToken,
) {
    let probe = Duration::from_millis(cfg.probe_interval_ms);
    let poll = Duration::from_millis(cfg.ps_interval_ms);
    for b in 0..proxy.backends().len() {
        if !probe.is_zero() {
            tokio::spawn(every(probe, stop.clone(), {
                let (proxy, sched) = (proxy.clone(), sched.clone());
                move || {
                    let (proxy, sched) = (proxy.clone(), sched.clone());
                    async move { probe_once(&proxy, &sched, b, probe).await }
                }
            }));
        }
        if !poll.is_zero() {
            tokio::spawn(every(poll, stop.clone(), {
                let (proxy, sched) = (proxy.clone(), sched.clone());
                move || {
                    let (proxy, sched) = (proxy.clone(), sched.clone());
                    async move { poll_once(&proxy, &sched, b, poll).await }
                }
            }));
        }
    }
}

/// Runs `f` now and then every `period` (never two at once), until `stop`.
async fn every<F, Fut>(period: Duration, stop: CancellationToken, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = f() => {}
        }
    }
}

/// One health probe of backend `b`.
async fn probe_once(proxy: &Proxy, sched: &SchedulerHandle, b: usize, period: Duration) {
    let target = &proxy.backends()[b];
    let path = match target.kind {
        BackendKind::Ollama => "/api/version",
        BackendKind::OpenAi => "/health",
    };
    let answer = target
        .fetch(Method::GET, path, Default::default(), period.min(MAX_CALL))
        .await;
    match answer {
        Fetched::Answer(status, _, body) if status.is_success() => {
            let version = (target.kind == BackendKind::Ollama)
                .then(|| serde_json::from_slice::<serde_json::Value>(&body).ok())
                .flatten()
                .and_then(|v| v["version"].as_str().map(str::to_string));
            sched.backend_health(b, true, version);
        }
        Fetched::Answer(status, _, _) => {
            tracing::debug!(backend = %target.name, %status, "health probe answered with an error");
            sched.backend_health(b, false, None);
        }
        Fetched::Failed(e) => {
            tracing::debug!(backend = %target.name, error = %Escaped(&e), "health probe failed");
            sched.backend_health(b, false, None);
        }
    }
}

/// One `/api/ps` poll of backend `b` (`/v1/models` for an
/// OpenAI-compatible one).
async fn poll_once(proxy: &Proxy, sched: &SchedulerHandle, b: usize, period: Duration) {
    let target = &proxy.backends()[b];
    if target.kind == BackendKind::OpenAi {
        return poll_models(target, sched, b, period).await;
    }
    let sent_at = tokio::time::Instant::now();
    let answer = target
        .fetch(
            Method::GET,
            "/api/ps",
            Default::default(),
            period.min(MAX_CALL),
        )
        .await;
    if let Fetched::Answer(status, _, body) = answer
        && status.is_success()
    {
        match parse_ps(&body) {
            Ok(models) => sched.backend_residency(b, sent_at, models),
            Err(e) => {
                tracing::debug!(backend = %target.name, error = %e, "unreadable /api/ps answer")
            }
        }
    }
}

/// One `/v1/models` poll of OpenAI-compatible backend `b`.
async fn poll_models(target: &Target, sched: &SchedulerHandle, b: usize, period: Duration) {
    let answer = target
        .fetch(
            Method::GET,
            "/v1/models",
            Default::default(),
            period.min(MAX_CALL),
        )
        .await;
    if let Fetched::Answer(status, _, body) = answer
        && status.is_success()
    {
        match parse_models(&body) {
            Some(models) => sched.backend_models(b, models),
            None => {
                tracing::debug!(backend = %target.name, "unreadable /v1/models answer")
            }
        }
    }
}

/// The model ids of a `/v1/models` answer (`{"object":"list","data":[{"id":..}]}`).
fn parse_models(body: &[u8]) -> Option<Vec<String>> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some(
        v.get("data")?
            .as_array()?
            .iter()
            .filter_map(|m| m.get("id").and_then(|i| i.as_str()).map(str::to_string))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn model_lists_are_read_by_id() {
        let body =
            br#"{"object":"list","data":[{"id":"qwen","object":"model"},{"id":"b"},{"x":1}]}"#;
        assert_eq!(super::parse_models(body).unwrap(), ["qwen", "b"]);
        assert!(super::parse_models(b"{}").is_none());
    }
}
