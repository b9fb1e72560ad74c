//! `fifo`: plain first-come-first-served, the baseline policy.
//!
//! Every request is queued with priority 0, in the class its `X-Priority`
//! header names (or `default_class`). Waiting requests start in arrival order
//! (then id) while free slots remain, whatever their class. Never pre-empts.
//! Each start names a backend with the request's model loaded, else one
//! with room to load it, else the one whose load evicts the cheapest model
//! ([`Plan`]).
//!
//! Config: `default_class` = `"batch"` (default) or `"realtime"`.

use maitre_policy_sdk::{
    Action, Admission, Class, Config, Placement, Plan, Policy, Request, View, class_from_hint,
    export_policy,
};

/// First-come-first-served.
#[derive(Debug, Clone, PartialEq)]
pub struct Fifo {
    /// Class of requests without a recognised `X-Priority` header.
    pub default_class: Class,
}

/// Config key of [`Fifo::default_class`].
pub const DEFAULT_CLASS: &str = "default_class";

impl Policy for Fifo {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown(&[DEFAULT_CLASS])?;
        Ok(Fifo {
            default_class: config.get_class(DEFAULT_CLASS, Class::Batch)?,
        })
    }

    fn admit(&self, req: &Request, _view: &View) -> Admission {
        Admission::Queue(Placement {
            class: class_from_hint(req, self.default_class),
            priority: 0.0,
        })
    }

    fn schedule(&self, view: &View) -> Vec<Action> {
        let free = view.free_slots as usize;
        if free == 0 || view.waiting.is_empty() {
            return Vec::new();
        }
        let key = |i: usize| (view.waiting[i].arrival_ms, view.waiting[i].id);
        // The host lists waiting requests oldest arrival first; only sort when
        // that does not hold.
        let mut order: Vec<usize> = (0..view.waiting.len()).collect();
        if !order.is_sorted_by_key(|&i| key(i)) {
            order.sort_unstable_by_key(|&i| key(i));
        }
        let mut plan = Plan::new(view);
        order
            .into_iter()
            .take(free)
            .map(|i| plan.start(view.waiting[i].id, view.waiting[i].model))
            .collect()
    }
}

export_policy!(Fifo);

#[cfg(test)]
mod tests;
