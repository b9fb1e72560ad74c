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
//!
//! Parameters are documented in this crate's README.md.

use maitre_policy_sdk::{
    Action, Admission, Aging, Class, Config, Placement, Policy, Request, Running, View,
    class_from_hint, export_policy, order_waiting, preempt, start,
};

/// Config key: also cut requests already streaming to their client.
pub const PREEMPT_STREAMING: &str = "preempt_streaming";
/// Config key: never pre-empt a request pre-empted this many times already.
pub const MAX_PREEMPTIONS: &str = "max_preemptions";
/// Config key: class of requests without a recognised `X-Priority` header.
pub const DEFAULT_CLASS: &str = "default_class";
/// Every config key this policy knows (besides the host's `maitre.*`).
pub const KEYS: [&str; 5] = [
    Aging::THRESHOLD_KEY,
    Aging::BOOST_KEY,
    DEFAULT_CLASS,
    PREEMPT_STREAMING,
    MAX_PREEMPTIONS,
];

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
}

impl Policy for Preemptive {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown(&KEYS)?;
        Ok(Preemptive {
            aging: Aging::from_config(config, 60.0, 0.5)?,
            default_class: config.get_class(DEFAULT_CLASS, Class::Batch)?,
            preempt_streaming: config.get_bool(PREEMPT_STREAMING, false)?,
            max_preemptions: config.get_u32(MAX_PREEMPTIONS, 2)?,
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
        for i in order_waiting(view, |w| self.aging.priority(w, view.now_ms)) {
            let w = &view.waiting[i];
            if free > 0 {
                actions.push(start(w.id));
                free -= 1;
                continue;
            }
            if w.class == Class::Batch {
                // Batch never pre-empts, and nothing behind it in priority
                // order may overtake it.
                break;
            }
            let effective = self.aging.priority(w, view.now_ms);
            let candidates = victims.get_or_insert_with(|| self.victims(view));
            let Some(slot) = candidates
                .iter_mut()
                .find(|(r, used)| {
                    !*used && self.aging.running_priority(&view.running[*r], view.now_ms) < effective
                })
            else {
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
        actions
    }
}

impl Preemptive {
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
