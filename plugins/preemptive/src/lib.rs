//! `preemptive`: work-conserving scheduling with pre-emption.
//!
//! - No slot is reserved: batch work may use every slot while no real-time
//!   request waits.
//! - A waiting real-time request that finds no free slot pre-empts the batch
//!   request that has done the least work (fewest tokens, then latest start)
//!   and takes its slot in the same decision (`preempt` then `start`).
//! - Only eligible victims: batch, lower effective priority than the
//!   real-time request, pre-emptible (or already streaming, when
//!   `preempt_streaming` allows cutting it), and pre-empted fewer than
//!   `max_preemptions` times. Each victim at most once per decision.
//! - Waiting batch requests age as in `reserved-aging`; one aged above a
//!   waiting real-time request is served first and never overtaken.
//! - Cost-aware: no pre-emption when a running request is expected to finish
//!   within `max_wait_ms` (from its `num_predict` and the measured tokens per
//!   second); the real-time request takes that slot when it frees.
//! - Each start on a free slot names a backend with the request's model
//!   loaded, else one with room to load it, else the one whose load evicts
//!   the cheapest model. Under memory pressure (a new model means an eviction), batch
//!   requests for loaded models go before older ones for models that are
//!   not, for at most `group_max_wait_ms`.
//!
//! Parameters are documented in this crate's README.md.

use std::cell::RefCell;

use maitre_policy_sdk::{
    Action, Admission, Aging, Class, Config, GROUP_MAX_WAIT_DEFAULT_MS, GROUP_MAX_WAIT_KEY, Hold,
    Placement, Plan, Policy, Request, Running, View, class_from_hint, export_policy, order_waiting,
    preempt, start,
};

/// Config key: also cut requests already streaming to their client.
pub const PREEMPT_STREAMING: &str = "preempt_streaming";
/// Config key: never pre-empt a request pre-empted this many times already.
pub const MAX_PREEMPTIONS: &str = "max_preemptions";
/// Config key: class of requests without a recognised `X-Priority` header.
pub const DEFAULT_CLASS: &str = "default_class";
/// Config key: don't pre-empt when a running request is expected to free its
/// slot within this many milliseconds.
pub const MAX_WAIT_MS: &str = "max_wait_ms";
/// Every config key this policy knows (besides the host's `maitre.*`).
pub const KEYS: [&str; 7] = [
    Aging::THRESHOLD_KEY,
    Aging::BOOST_KEY,
    DEFAULT_CLASS,
    PREEMPT_STREAMING,
    MAX_PREEMPTIONS,
    MAX_WAIT_MS,
    GROUP_MAX_WAIT_KEY,
];

/// Weight of the newest measurement in the tokens-per-ms moving average.
const RATE_WEIGHT: f64 = 0.2;

/// Priority given to real-time requests at admission.
pub const REALTIME_PRIORITY: f64 = 1.0;
/// Priority given to batch requests at admission (before aging).
pub const BATCH_PRIORITY: f64 = 0.0;

/// Work-conserving with pre-emption of batch work for real-time requests.
#[derive(Debug, Clone, PartialEq)]
pub struct Preemptive {
    /// How waiting batch requests gain priority (default 60 s, +0.5).
    pub aging: Aging,
    /// Class of requests without a recognised `X-Priority` header (default batch).
    pub default_class: Class,
    /// Also cut requests already streaming to their client (default false).
    pub preempt_streaming: bool,
    /// Never pre-empt a request whose `preemptions` reached this (default 2).
    pub max_preemptions: u32,
    /// Wait instead of pre-empting when a running request should finish
    /// within this many ms (default 30; 0 = always pre-empt).
    pub max_wait_ms: u64,
    /// Under memory pressure, a batch request is passed over for requests
    /// of loaded models for at most this long since its arrival (default 5000).
    pub group_max_wait_ms: u64,
    /// What the policy learned from earlier views.
    pub memory: RefCell<Memory>,
}

/// What `preemptive` measures across calls: the generation speed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Memory {
    /// Measured generation speed, tokens per ms (moving average), if any.
    pub tokens_per_ms: Option<f64>,
}

impl Policy for Preemptive {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown(&KEYS)?;
        Ok(Preemptive {
            aging: Aging::from_config(config, 60.0, 0.5)?,
            default_class: config.get_class(DEFAULT_CLASS, Class::Batch)?,
            preempt_streaming: config.get_bool(PREEMPT_STREAMING, false)?,
            max_preemptions: config.get_u32(MAX_PREEMPTIONS, 2)?,
            max_wait_ms: config.get_u32(MAX_WAIT_MS, 30)?.into(),
            group_max_wait_ms: config
                .get_u32(GROUP_MAX_WAIT_KEY, GROUP_MAX_WAIT_DEFAULT_MS)?
                .into(),
            memory: RefCell::new(Memory::default()),
        })
    }

    fn admit(&self, req: &Request, _view: &View) -> Admission {
        let class = class_from_hint(req, self.default_class);
        let priority = match class {
            Class::Realtime => REALTIME_PRIORITY,
            Class::Batch => BATCH_PRIORITY,
        };
        Admission::Queue(Placement { class, priority })
    }

    fn schedule(&self, view: &View) -> Vec<Action> {
        self.learn(view);
        if view.waiting.is_empty() {
            return Vec::new();
        }
        let mut free = view.free_slots;
        let rt_waiting = view.waiting.iter().any(|w| w.class == Class::Realtime);
        if free == 0 && !rt_waiting {
            return Vec::new();
        }
        let mut actions = Vec::new();
        // Victim candidates, least work first; built only when needed.
        let mut victims: Option<Vec<(usize, bool)>> = None;
        // Running requests (indices) whose imminent end a real-time request
        // already waits for in this decision.
        let mut awaited: Vec<usize> = Vec::new();
        let mut plan = Plan::new(view);
        // Batch requests passed over under memory pressure, in order.
        let mut later = Vec::new();
        for i in order_waiting(view, |w| self.aging.priority(w, view.now_ms)) {
            let w = &view.waiting[i];
            if free > 0 {
                match plan.hold(w, self.group_max_wait_ms, |_| true) {
                    Hold::Go => {
                        actions.push(plan.start(w.id, w.model));
                        free -= 1;
                    }
                    Hold::Later => later.push(i),
                    Hold::Wait => {}
                }
                continue;
            }
            if w.class == Class::Batch {
                // Batch never pre-empts, and nothing behind it in priority
                // order may overtake it.
                break;
            }
            let effective = self.aging.priority(w, view.now_ms);
            // A slot about to free costs less than thrown-away work; but a
            // request that already waited max_wait_ms (the estimate was wrong)
            // waits no longer.
            let waited = view.now_ms.saturating_sub(w.enqueued_ms);
            if waited < self.max_wait_ms
                && let Some(r) = self.ending_soon(view, &awaited, victims.as_deref())
            {
                awaited.push(r);
                continue;
            }
            let candidates = victims.get_or_insert_with(|| self.victims(view));
            let Some(slot) = candidates.iter_mut().find(|(r, used)| {
                !*used
                    && !awaited.contains(r)
                    && self.aging.running_priority(&view.running[*r], view.now_ms) < effective
            }) else {
                // Later requests have no higher priority: no victim for them either.
                break;
            };
            slot.1 = true;
            let victim = &view.running[slot.0];
            actions.push(preempt(
                victim.id,
                self.preempt_streaming && victim.streaming,
            ));
            actions.push(start(w.id));
        }
        for i in later.into_iter().take(free as usize) {
            let w = &view.waiting[i];
            actions.push(plan.start(w.id, w.model));
        }
        actions
    }
}

impl Preemptive {
    /// Measures the generation speed of running requests that have
    /// produced tokens.
    fn learn(&self, view: &View) {
        let mut m = self.memory.borrow_mut();
        let speeds: Vec<f64> = view
            .running
            .iter()
            .filter_map(|r| {
                let first = r.first_token_ms?;
                let since = view.now_ms.checked_sub(first).filter(|d| *d > 0)?;
                (r.tokens >= 2).then(|| (r.tokens - 1) as f64 / since as f64)
            })
            .collect();
        if !speeds.is_empty() {
            let now = speeds.iter().sum::<f64>() / speeds.len() as f64;
            m.tokens_per_ms = Some(match m.tokens_per_ms {
                Some(old) => old + RATE_WEIGHT * (now - old),
                None => now,
            });
        }
    }

    /// Expected ms until running request `r` ends: its tokens still to come
    /// at the measured speed. None when its `num_predict` or the speed is unknown.
    pub fn remaining_ms(&self, r: &Running) -> Option<f64> {
        let total = r.num_predict.filter(|n| *n > 0)? as u64;
        let rate = self.memory.borrow().tokens_per_ms.filter(|x| *x > 0.0)?;
        Some(total.saturating_sub(r.tokens) as f64 / rate)
    }

    /// A running request (index) expected to free its slot within
    /// `max_wait_ms`, not yet awaited nor chosen as a victim; the soonest.
    fn ending_soon(
        &self,
        view: &View,
        awaited: &[usize],
        victims: Option<&[(usize, bool)]>,
    ) -> Option<usize> {
        if self.max_wait_ms == 0 {
            return None;
        }
        let used = |i: usize| victims.is_some_and(|v| v.iter().any(|&(r, u)| u && r == i));
        (0..view.running.len())
            .filter(|&i| !awaited.contains(&i) && !used(i))
            .filter_map(|i| Some((i, self.remaining_ms(&view.running[i])?)))
            .filter(|&(_, ms)| ms <= self.max_wait_ms as f64)
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(i, _)| i)
    }

    /// Whether a running request may be pre-empted at all.
    pub fn eligible(&self, r: &Running) -> bool {
        r.class == Class::Batch
            && r.preemptions < self.max_preemptions
            && (r.preemptible || (self.preempt_streaming && r.streaming))
    }

    /// Indices into `view.running` of the eligible victims, least work first
    /// (fewest tokens, then latest start, then highest id), each not yet used.
    fn victims(&self, view: &View) -> Vec<(usize, bool)> {
        let mut v: Vec<(usize, bool)> = (0..view.running.len())
            .filter(|&i| self.eligible(&view.running[i]))
            .map(|i| (i, false))
            .collect();
        v.sort_unstable_by_key(|&(i, _)| {
            let r = &view.running[i];
            (
                r.tokens,
                std::cmp::Reverse(r.started_ms),
                std::cmp::Reverse(r.id),
            )
        });
        v
    }
}

export_policy!(Preemptive);

#[cfg(test)]
mod tests;
