//! Measured speed per model on one backend: moving averages of the
//! upstream's time to first token and of tokens per second while
//! generating, from the requests that completed there. A policy reads them
//! (`backend.speeds`) to guess how long a request will take where.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::policy::ModelSpeed;

/// Weight of the newest sample in each moving average.
const ALPHA: f64 = 0.2;
/// Models remembered per backend; past it the one measured least recently
/// is forgotten (a client naming endless models cannot grow it).
const MAX_MODELS: usize = 64;

/// One model's averages.
#[derive(Debug, Clone, Copy)]
struct Speed {
    ttft_ms: Option<f64>,
    tokens_per_s: Option<f64>,
    updated: Instant,
}

/// The speeds of every model measured on one backend.
#[derive(Debug, Default)]
pub struct Speeds(HashMap<Arc<str>, Speed>);

fn ewma(old: Option<f64>, sample: Option<f64>) -> Option<f64> {
    match (old, sample) {
        (Some(o), Some(s)) => Some(o + ALPHA * (s - o)),
        (o, s) => s.or(o),
    }
}

impl Speeds {
    /// A request for `model` completed: its first token came `ttft` after
    /// it was sent, then `tokens` more chunks over `generating`.
    pub fn observe(
        &mut self,
        model: &Arc<str>,
        ttft: Option<Duration>,
        tokens: u64,
        generating: Option<Duration>,
    ) {
        let ttft_ms = ttft.map(|d| d.as_secs_f64() * 1000.0);
        let tokens_per_s = generating
            .filter(|g| tokens >= 2 && !g.is_zero())
            .map(|g| (tokens - 1) as f64 / g.as_secs_f64());
        if ttft_ms.is_none() && tokens_per_s.is_none() {
            return;
        }
        if !self.0.contains_key(model) && self.0.len() >= MAX_MODELS {
            let oldest = self
                .0
                .iter()
                .min_by_key(|(_, s)| s.updated)
                .map(|(m, _)| m.clone());
            if let Some(m) = oldest {
                self.0.remove(&m);
            }
        }
        let now = Instant::now();
        let s = self.0.entry(model.clone()).or_insert(Speed {
            ttft_ms: None,
            tokens_per_s: None,
            updated: now,
        });
        s.ttft_ms = ewma(s.ttft_ms, ttft_ms);
        s.tokens_per_s = ewma(s.tokens_per_s, tokens_per_s);
        s.updated = now;
    }

    /// As a policy sees them, by model name.
    pub fn view(&self) -> Vec<ModelSpeed> {
        let mut v: Vec<ModelSpeed> = self
            .0
            .iter()
            .map(|(m, s)| ModelSpeed {
                model: m.clone(),
                ttft_ms: s.ttft_ms,
                tokens_per_s: s.tokens_per_s,
            })
            .collect();
        v.sort_by(|a, b| a.model.cmp(&b.model));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_move_towards_new_samples() {
        let mut s = Speeds::default();
        let m: Arc<str> = "m:latest".into();
        s.observe(
            &m,
            Some(Duration::from_millis(100)),
            11,
            Some(Duration::from_secs(1)),
        );
        let v = s.view();
        assert_eq!(v[0].ttft_ms, Some(100.0));
        assert_eq!(v[0].tokens_per_s, Some(10.0));
        s.observe(
            &m,
            Some(Duration::from_millis(200)),
            21,
            Some(Duration::from_secs(1)),
        );
        let v = s.view();
        assert!((v[0].ttft_ms.unwrap() - 120.0).abs() < 1e-9);
        assert!((v[0].tokens_per_s.unwrap() - 12.0).abs() < 1e-9);
        // A one-chunk answer says nothing about the generation speed.
        s.observe(&m, None, 1, Some(Duration::from_secs(1)));
        assert!((s.view()[0].tokens_per_s.unwrap() - 12.0).abs() < 1e-9);
    }

    #[test]
    fn the_models_remembered_are_bounded() {
        let mut s = Speeds::default();
        for i in 0..(MAX_MODELS + 10) {
            let m: Arc<str> = format!("m{i}").into();
            s.observe(&m, Some(Duration::from_millis(5)), 0, None);
        }
        assert_eq!(s.view().len(), MAX_MODELS);
    }
}
