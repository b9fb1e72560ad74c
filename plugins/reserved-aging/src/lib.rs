//! `reserved-aging`: maitre's default policy — reserved real-time slots plus
//! aging of batch work, the fix from the field made faithful.
//!
//! - Real-time requests go before batch, first-come-first-served within a class.
//! - `rt_reserved_slots` slots are real-time only: batch runs on the others.
//! - Waiting batch requests gain `aging_boost` priority per full
//!   `aging_threshold_seconds` waited, so they overtake fresh batch work and
//!   eventually compete with real-time requests for the shared slots: batch
//!   never starves.
//! - Never pre-empts.
//!
//! The exact rule is in this crate's README.md.

use maitre_policy_sdk::{
    Action, Admission, Aging, Class, Config, Placement, Policy, Request, View, class_from_hint,
    export_policy, order_waiting, start,
};

/// Config key: slots only real-time requests may use.
pub const RT_RESERVED_SLOTS: &str = "rt_reserved_slots";
/// Config key: class of requests without a recognised `X-Priority` header.
pub const DEFAULT_CLASS: &str = "default_class";
/// Every config key this policy knows (besides the host's `maitre.*`).
pub const KEYS: [&str; 4] = [
    RT_RESERVED_SLOTS,
    Aging::THRESHOLD_KEY,
    Aging::BOOST_KEY,
    DEFAULT_CLASS,
];

/// Priority given to real-time requests at admission.
pub const REALTIME_PRIORITY: f64 = 1.0;
/// Priority given to batch requests at admission (before aging).
pub const BATCH_PRIORITY: f64 = 0.0;

/// Reserved real-time slots plus batch aging.
#[derive(Debug, Clone, PartialEq)]
pub struct ReservedAging {
    /// Slots only real-time requests may use (default 1).
    pub rt_reserved_slots: u32,
    /// How waiting batch requests gain priority (default 60 s, +0.5).
    pub aging: Aging,
    /// Class of requests without a recognised `X-Priority` header (default batch).
    pub default_class: Class,
}

impl Policy for ReservedAging {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown(&KEYS)?;
        let rt_reserved_slots = config.get_u32(RT_RESERVED_SLOTS, 1)?;
        let aging = Aging::from_config(config, 60.0, 0.5)?;
        let default_class = config.get_class(DEFAULT_CLASS, Class::Batch)?;
        if let Some(slots) = config.slots()?
            && rt_reserved_slots >= slots
        {
            return Err(format!(
                "{RT_RESERVED_SLOTS} = {rt_reserved_slots} reserves all {slots} upstream slots \
                 for real-time requests, so batch requests could never run; set \
                 {RT_RESERVED_SLOTS} below [upstream] slots (Ollama's OLLAMA_NUM_PARALLEL \
                 defaults to 1)"
            ));
        }
        Ok(ReservedAging {
            rt_reserved_slots,
            aging,
            default_class,
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
        let mut free = view.free_slots;
        if free == 0 || view.waiting.is_empty() {
            return Vec::new();
        }
        let batch_cap = view.total_slots.saturating_sub(self.rt_reserved_slots);
        let mut batch_running = view
            .running
            .iter()
            .filter(|r| r.class == Class::Batch)
            .count() as u32;
        let mut actions = Vec::with_capacity(free.min(view.waiting.len() as u32) as usize);
        for i in order_waiting(view, |w| self.aging.priority(w, view.now_ms)) {
            let w = &view.waiting[i];
            if w.class == Class::Batch {
                if batch_running >= batch_cap {
                    // Only reserved slots are free for batch: skip it, so a
                    // real-time request further back can still take one.
                    continue;
                }
                batch_running += 1;
            }
            actions.push(start(w.id));
            free -= 1;
            if free == 0 {
                break;
            }
        }
        actions
    }
}

export_policy!(ReservedAging);

#[cfg(test)]
mod tests;
