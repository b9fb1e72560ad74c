//! A trace for users without one (`maitre simulate --synthetic`): Poisson
//! arrivals at a rate, a class mix, and a token-length distribution per
//! class, written as the trace lines a maitre in front of an idle upstream
//! would have recorded (no queue, the given prompt and per-token time), so
//! the simulator reads them like any trace and `--write-trace` saves them.
//!
//! Real-time requests stream (`/api/chat`, like a chat UI) and set no
//! `num_predict`; batch requests are answered whole (`/api/generate`, like
//! a pipeline) and set `num_predict` to their length. Requests come from 32
//! client keys, so a weighted A/B split sees sticky clients.

use std::fmt;

use super::rng::Rng;
use crate::policy::Class;
use crate::trace::{TraceOutcome, TraceRecord, round_ms};

/// The Unix time (ms) a synthetic trace starts at: fixed, so the same
/// options write the same file.
pub const START_UNIX_MS: u64 = 1_700_000_000_000;
/// Distinct A/B client keys in a synthetic trace.
const CLIENTS: usize = 32;

/// How many tokens an answer has.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TokenDist {
    /// Always `N`: written `N`.
    Fixed(u64),
    /// Uniform in `A..=B`: written `A..B`.
    Uniform(u64, u64),
    /// Exponential with this mean: written `exp:MEAN`.
    Exp(f64),
    /// Log-normal with this median and shape (sigma of the log): written
    /// `lognormal:MEDIAN:SIGMA`; long answers are rare but long, as in the
    /// field.
    LogNormal(f64, f64),
}

impl TokenDist {
    /// One length, at least 1.
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        let v = match *self {
            TokenDist::Fixed(n) => n as f64,
            TokenDist::Uniform(a, b) => (a + rng.below((b - a + 1) as usize) as u64) as f64,
            TokenDist::Exp(mean) => rng.exp(mean).round(),
            TokenDist::LogNormal(median, sigma) => (median * (sigma * rng.normal()).exp()).round(),
        };
        (v as u64).max(1)
    }
}

impl std::str::FromStr for TokenDist {
    type Err = String;

    fn from_str(s: &str) -> Result<TokenDist, String> {
        let num = |v: &str| -> Result<f64, String> {
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| format!("{v:?} is not a number above 0"))
        };
        let int = |v: &str| -> Result<u64, String> {
            v.trim()
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{v:?} is not a whole number above 0"))
        };
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            ["exp", mean] => Ok(TokenDist::Exp(num(mean)?)),
            ["lognormal", median, sigma] => Ok(TokenDist::LogNormal(num(median)?, num(sigma)?)),
            [range] if range.contains("..") => {
                let (a, b) = range.split_once("..").expect("checked");
                let (a, b) = (int(a)?, int(b)?);
                if a > b {
                    return Err(format!(
                        "{range:?}: the low end must not exceed the high end"
                    ));
                }
                Ok(TokenDist::Uniform(a, b))
            }
            [n] => Ok(TokenDist::Fixed(int(n)?)),
            _ => Err(format!(
                "{s:?} is not a token-length distribution: write N, A..B, exp:MEAN or lognormal:MEDIAN:SIGMA"
            )),
        }
    }
}

impl fmt::Display for TokenDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenDist::Fixed(n) => write!(f, "{n}"),
            TokenDist::Uniform(a, b) => write!(f, "{a}..{b}"),
            TokenDist::Exp(m) => write!(f, "exp:{m}"),
            TokenDist::LogNormal(m, s) => write!(f, "lognormal:{m}:{s}"),
        }
    }
}

/// Reads a class name as `X-Priority` does (`realtime`, `rt`, `batch`, ...).
pub fn parse_class(s: &str) -> Result<Class, String> {
    Class::from_priority_header(Some(s))
        .ok_or_else(|| format!("{s:?} is not a class: write realtime or batch"))
}

/// `realtime=20,batch=80`: each class's share of the arrivals (weights).
pub fn parse_mix(s: &str) -> Result<Vec<(Class, f64)>, String> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (c, w) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: write CLASS=WEIGHT, e.g. realtime=20,batch=80"))?;
        let w: f64 = w
            .trim()
            .parse()
            .ok()
            .filter(|w: &f64| w.is_finite() && *w >= 0.0)
            .ok_or_else(|| format!("{part:?}: the weight must be a number of at least 0"))?;
        out.push((parse_class(c.trim())?, w));
    }
    if out.iter().map(|x| x.1).sum::<f64>() <= 0.0 {
        return Err(format!("{s:?}: give at least one class a weight above 0"));
    }
    Ok(out)
}

/// `batch=lognormal:300:0.8`: one class's token-length distribution.
pub fn parse_tokens(s: &str) -> Result<(Class, TokenDist), String> {
    let (c, d) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: write CLASS=DISTRIBUTION, e.g. batch=lognormal:300:0.8"))?;
    Ok((parse_class(c.trim())?, d.trim().parse()?))
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct Synthetic {
    /// Arrivals per second (Poisson).
    pub rate_per_s: f64,
    /// Seconds of traffic.
    pub duration_s: f64,
    /// Share of each class.
    pub mix: Vec<(Class, f64)>,
    /// Real-time answer lengths.
    pub realtime_tokens: TokenDist,
    /// Batch answer lengths.
    pub batch_tokens: TokenDist,
    /// Model name.
    pub model: String,
    /// Prompt time of the upstream (ms).
    pub prompt_ms: f64,
    /// Time per token of the upstream (ms).
    pub token_ms: f64,
    /// Seed of every draw.
    pub seed: u64,
}

impl Synthetic {
    /// The trace lines, in arrival order.
    pub fn generate(&self) -> Vec<TraceRecord> {
        let mut arrivals = Rng::new(self.seed, 1);
        let mut draws = Rng::new(self.seed, 2);
        let total: f64 = self.mix.iter().map(|x| x.1).sum();
        let mut out = Vec::new();
        let mut t_ms = 0.0;
        loop {
            t_ms += arrivals.exp(1000.0 / self.rate_per_s);
            if t_ms >= self.duration_s * 1000.0 {
                return out;
            }
            let mut pick = draws.unit() * total;
            let class = self
                .mix
                .iter()
                .find(|(_, w)| {
                    pick -= w;
                    pick < 0.0
                })
                .or(self.mix.last())
                .map(|x| x.0)
                .unwrap_or(Class::Batch);
            let realtime = class == Class::Realtime;
            let dist = if realtime {
                self.realtime_tokens
            } else {
                self.batch_tokens
            };
            let n = dist.sample(&mut draws);
            let client = format!("synthetic-{}", draws.below(CLIENTS));
            let whole = self.prompt_ms + n as f64 * self.token_ms;
            let head = if realtime {
                self.prompt_ms + self.token_ms
            } else {
                whole
            };
            out.push(TraceRecord {
                arrival_unix_ms: START_UNIX_MS + t_ms as u64,
                arrival_ms: round_ms(t_ms),
                class_hint: Some(class),
                class,
                tenant: None,
                model: self.model.clone(),
                path: if realtime {
                    "/api/chat"
                } else {
                    "/api/generate"
                }
                .into(),
                stream: realtime,
                num_predict: (!realtime).then_some(n as i64),
                body_bytes: if realtime { 600 } else { 2_000 },
                client: Some(client),
                backend: "synthetic".into(),
                arm: "synthetic".into(),
                queue_ms: 0.0,
                upstream_ttft_ms: Some(round_ms(head)),
                ttft_ms: Some(round_ms(head)),
                tokens: if realtime { n + 1 } else { 1 },
                duration_ms: round_ms(whole),
                preemptions: 0,
                outcome: TraceOutcome::Ok,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributions_parse_and_print_back() {
        for s in ["7", "5..9", "exp:40", "lognormal:300:0.8"] {
            let d: TokenDist = s.parse().unwrap();
            assert_eq!(d.to_string(), s);
        }
        for bad in ["0", "9..5", "exp:-1", "lognormal:3", "gauss:3"] {
            assert!(bad.parse::<TokenDist>().is_err(), "{bad}");
        }
        assert_eq!(
            parse_mix("realtime=20, batch=80").unwrap(),
            vec![(Class::Realtime, 20.0), (Class::Batch, 80.0)]
        );
        assert!(parse_mix("urgent=1").unwrap_err().contains("not a class"));
        assert!(parse_mix("batch=0").is_err());
        assert_eq!(
            parse_tokens("rt=5..9").unwrap(),
            (Class::Realtime, TokenDist::Uniform(5, 9))
        );
    }

    #[test]
    fn a_synthetic_trace_follows_its_rate_mix_and_lengths_and_repeats() {
        let spec = Synthetic {
            rate_per_s: 2.0,
            duration_s: 1_000.0,
            mix: vec![(Class::Realtime, 25.0), (Class::Batch, 75.0)],
            realtime_tokens: TokenDist::Uniform(10, 20),
            batch_tokens: TokenDist::Fixed(50),
            model: "fake".into(),
            prompt_ms: 30.0,
            token_ms: 10.0,
            seed: 9,
        };
        let t = spec.generate();
        assert_eq!(t, spec.generate(), "same seed, same trace");
        assert!((1_850..2_150).contains(&t.len()), "{}", t.len());
        let rt = t.iter().filter(|r| r.class == Class::Realtime).count();
        let share = rt as f64 / t.len() as f64;
        assert!((0.21..0.29).contains(&share), "{share}");
        for r in &t {
            if r.stream {
                assert!((11..=21).contains(&r.tokens));
                assert_eq!(r.upstream_ttft_ms, Some(40.0));
            } else {
                assert_eq!(r.duration_ms, 30.0 + 500.0);
            }
        }
        assert!(t.windows(2).all(|w| w[0].arrival_ms <= w[1].arrival_ms));
    }
}
