//! The timing model of one generation, as pure arithmetic.
//!
//! Once a request holds a slot, Ollama spends a prompt (prefill) time and
//! then a fixed time per token, the first one included: token `i` (0-based)
//! is ready at `prompt + (i + 1) * per_token` after the slot was granted, so
//! time to first token is `prompt + per_token`. A [`Plan`] adds how many
//! tokens the answer has and where, if anywhere, it fails.
//!
//! Everything here is an offset from the slot grant, with no clock: the
//! server sleeps until those offsets on the real clock, and a simulator can
//! add them to a virtual one and get the same answers.

use std::time::Duration;

use crate::ModelConfig;

/// How long a generation takes once it holds a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Prefill: from getting the slot to starting on the first token.
    pub prompt: Duration,
    /// Time to produce each token, the first one included.
    pub per_token: Duration,
}

impl Timing {
    /// The configured timing.
    pub fn of(cfg: &ModelConfig) -> Timing {
        Timing {
            prompt: cfg.prompt_delay,
            per_token: cfg.token_delay,
        }
    }

    /// This timing with a request's overrides (`X-Fake-Prompt-Ms`,
    /// `X-Fake-Token-Ms`) applied.
    pub fn overridden(self, prompt: Option<Duration>, per_token: Option<Duration>) -> Timing {
        Timing {
            prompt: prompt.unwrap_or(self.prompt),
            per_token: per_token.unwrap_or(self.per_token),
        }
    }

    /// When token `i` (0-based) is ready, after the slot grant. Saturates
    /// instead of overflowing.
    pub fn token_ready(&self, i: u64) -> Duration {
        self.prompt
            .saturating_add(times(self.per_token, i.saturating_add(1)))
    }
}

/// `d * n`, saturating at [`Duration::MAX`].
fn times(d: Duration, n: u64) -> Duration {
    let nanos = d.as_nanos().saturating_mul(u128::from(n));
    u64::try_from(nanos / 1_000_000_000)
        .map(|secs| Duration::new(secs, (nanos % 1_000_000_000) as u32))
        .unwrap_or(Duration::MAX)
}

/// How many tokens an answer has: the `X-Fake-Tokens` override, else the
/// request's own limit (`num_predict`, `max_tokens`), else the model's
/// default. The bool says whether the request's limit is what stopped it
/// (`done_reason: "length"`).
pub fn token_count(forced: Option<u64>, limit: Option<u64>, default: u64) -> (u64, bool) {
    match (forced, limit) {
        (Some(n), _) => (n, false),
        (None, Some(n)) => (n, true),
        (None, None) => (default, false),
    }
}

/// One generation as planned: its timing, its length and its failure point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Prompt and per-token time.
    pub timing: Timing,
    /// Tokens the answer has if nothing fails.
    pub tokens: u64,
    /// `X-Fake-Fail-After: N`: fail after `N` tokens instead of producing
    /// token `N`. No effect when `N >= tokens`.
    pub fail_after: Option<u64>,
}

/// What a generation does after the tokens it has produced so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Produce another token, ready at this offset from the slot grant.
    Token(Duration),
    /// Fail now, without another token.
    Fail,
    /// End normally now: every token has been produced.
    Done,
}

/// How a planned generation ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// All tokens produced; the final frame follows the last one at once.
    Finished,
    /// Failed after [`Plan::produced`] tokens.
    Failed,
}

impl Plan {
    /// The step after `produced` tokens.
    pub fn next(&self, produced: u64) -> Next {
        if produced < self.tokens && self.fail_after == Some(produced) {
            Next::Fail
        } else if produced >= self.tokens {
            Next::Done
        } else {
            Next::Token(self.timing.token_ready(produced))
        }
    }

    /// Tokens produced before the end.
    pub fn produced(&self) -> u64 {
        match self.fail_after {
            Some(f) if f < self.tokens => f,
            _ => self.tokens,
        }
    }

    /// Whether it finishes or fails.
    pub fn ending(&self) -> Ending {
        if self.produced() < self.tokens {
            Ending::Failed
        } else {
            Ending::Finished
        }
    }

    /// When the first token is ready, after the slot grant; `None` when it
    /// ends before producing one.
    pub fn first_token(&self) -> Option<Duration> {
        (self.produced() > 0).then(|| self.timing.token_ready(0))
    }

    /// When it ends (final frame or error), after the slot grant: the slot
    /// is free again at that offset.
    pub fn end(&self) -> Duration {
        match self.produced() {
            0 => self.timing.prompt,
            n => self.timing.token_ready(n - 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn plan(prompt: u64, per_token: u64, tokens: u64, fail_after: Option<u64>) -> Plan {
        Plan {
            timing: Timing {
                prompt: Duration::from_millis(prompt),
                per_token: Duration::from_millis(per_token),
            },
            tokens,
            fail_after,
        }
    }

    #[test]
    fn first_token_is_prompt_plus_one_token_and_end_is_prompt_plus_all() {
        let p = plan(100, 20, 5, None);
        assert_eq!(p.first_token(), Some(120 * MS));
        assert_eq!(p.end(), 200 * MS);
        assert_eq!(p.ending(), Ending::Finished);
        assert_eq!(p.produced(), 5);
    }

    #[test]
    fn steps_follow_the_token_clock_then_end() {
        let p = plan(10, 5, 3, None);
        let steps: Vec<Next> = (0..=3).map(|i| p.next(i)).collect();
        assert_eq!(
            steps,
            [
                Next::Token(15 * MS),
                Next::Token(20 * MS),
                Next::Token(25 * MS),
                Next::Done
            ]
        );
    }

    #[test]
    fn failure_point_cuts_the_answer_short() {
        let p = plan(0, 10, 5, Some(2));
        assert_eq!(p.next(1), Next::Token(20 * MS));
        assert_eq!(p.next(2), Next::Fail);
        assert_eq!(p.produced(), 2);
        assert_eq!(p.ending(), Ending::Failed);
        assert_eq!(p.end(), 20 * MS);
        assert_eq!(p.first_token(), Some(10 * MS));
    }

    #[test]
    fn failing_before_the_first_token_ends_after_the_prompt() {
        let p = plan(30, 10, 5, Some(0));
        assert_eq!(p.next(0), Next::Fail);
        assert_eq!(p.first_token(), None);
        assert_eq!(p.end(), 30 * MS);
    }

    #[test]
    fn a_failure_point_past_the_end_never_fires() {
        let p = plan(0, 10, 3, Some(3));
        assert_eq!(p.next(3), Next::Done);
        assert_eq!(p.ending(), Ending::Finished);
    }

    #[test]
    fn zero_tokens_end_after_the_prompt() {
        let p = plan(7, 10, 0, None);
        assert_eq!(p.next(0), Next::Done);
        assert_eq!(p.first_token(), None);
        assert_eq!(p.end(), 7 * MS);
    }

    #[test]
    fn huge_values_saturate() {
        let p = plan(1, u64::MAX / 2, u64::MAX, None);
        assert_eq!(p.end(), Duration::MAX);
        assert_eq!(times(Duration::from_secs(3), 4), Duration::from_secs(12));
        assert_eq!(
            times(Duration::from_nanos(1_500_000_001), 2).as_nanos(),
            3_000_000_002
        );
    }

    #[test]
    fn overrides_replace_only_what_they_set() {
        let t = Timing {
            prompt: 5 * MS,
            per_token: 20 * MS,
        };
        assert_eq!(t.overridden(None, None), t);
        assert_eq!(t.overridden(Some(MS), None).per_token, 20 * MS);
        assert_eq!(t.overridden(None, Some(MS)).prompt, 5 * MS);
        let cfg = ModelConfig::default();
        assert_eq!(Timing::of(&cfg).per_token, cfg.token_delay);
    }

    #[test]
    fn token_count_prefers_the_override_then_the_limit() {
        assert_eq!(token_count(Some(9), Some(3), 5), (9, false));
        assert_eq!(token_count(None, Some(3), 5), (3, true));
        assert_eq!(token_count(None, None, 5), (5, false));
    }
}
