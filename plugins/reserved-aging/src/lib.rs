//! `reserved-aging`: maitre's default policy — reserved real-time slots plus
//! aging of batch work, the fix from the field made faithful.
//!
//! - Real-time requests go before batch, first-come-first-served within a class.
//! - `rt_reserved_slots` slots of each backend are real-time only: batch
//!   starts on a backend only if it keeps them free (real-time may use any
//!   free slot).
//! - Waiting batch requests gain `aging_boost` priority per full
//!   `aging_threshold_seconds` waited, so they overtake fresh batch work and
//!   eventually compete with real-time requests for the shared slots: batch
//!   never starves.
//! - Never pre-empts.
//! - Each start names a backend with the request's model loaded, else one
//!   with room to load it. Under memory pressure (a new model means an
//!   eviction), batch requests for loaded models go before older ones for
//!   models that are not, for at most `group_max_wait_ms`; a real-time
//!   request whose model is loaded on a busy backend waits for it rather
//!   than load it elsewhere, for at most `rt_group_max_wait_ms`.
//!
//! The exact rule is in this crate's README.md.

use std::cell::RefCell;

use maitre_policy_sdk::{
    Action, Admission, Aging, Class, Config, GROUP_MAX_WAIT_DEFAULT_MS, GROUP_MAX_WAIT_KEY, Hold,
    Placement, Plan, Policy, RT_GROUP_MAX_WAIT_DEFAULT_MS, RT_GROUP_MAX_WAIT_KEY, Request, View,
    Waiting, class_from_hint, export_policy, model_key, order_waiting, start_on,
};

/// Config key: slots only real-time requests may use.
pub const RT_RESERVED_SLOTS: &str = "rt_reserved_slots";
/// Config key: class of requests without a recognised `X-Priority` header.
pub const DEFAULT_CLASS: &str = "default_class";
/// Every config key this policy knows (besides the host's `maitre.*`).
pub const KEYS: [&str; 6] = [
    RT_RESERVED_SLOTS,
    Aging::THRESHOLD_KEY,
    Aging::BOOST_KEY,
    DEFAULT_CLASS,
    GROUP_MAX_WAIT_KEY,
    RT_GROUP_MAX_WAIT_KEY,
];

/// How long a model stays protected from eviction after a real-time request
/// for it arrived (ms): real-time traffic comes back, and a real-time request
/// that finds its model evicted waits seconds for a load.
pub const RT_MODEL_MEMORY_MS: u64 = 120_000;
/// Real-time models remembered, at most (the least recent is forgotten).
const RT_MODELS_MAX: usize = 16;

/// Priority given to real-time requests at admission.
pub const REALTIME_PRIORITY: f64 = 1.0;
/// Priority given to batch requests at admission (before aging).
pub const BATCH_PRIORITY: f64 = 0.0;

/// Reserved real-time slots plus batch aging.
#[derive(Debug, Clone, PartialEq)]
pub struct ReservedAging {
    /// Models real-time requests asked for ([`model_key`] form), with the
    /// arrival of the latest: kept loaded ([`Plan::protect`]) for
    /// [`RT_MODEL_MEMORY_MS`] after it.
    pub rt_models: RefCell<Vec<(String, u64)>>,
    /// Slots only real-time requests may use (default 1).
    pub rt_reserved_slots: u32,
    /// How waiting batch requests gain priority (default 60 s, +0.5).
    pub aging: Aging,
    /// Class of requests without a recognised `X-Priority` header (default batch).
    pub default_class: Class,
    /// Under memory pressure, a batch request is passed over for requests
    /// of loaded models for at most this long since its arrival (default 5000).
    pub group_max_wait_ms: u64,
    /// A real-time request whose model is loaded on a busy backend waits
    /// for it rather than load the model elsewhere, for at most this long
    /// since its arrival (default 1000).
    pub rt_group_max_wait_ms: u64,
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
            rt_models: RefCell::new(Vec::new()),
            rt_reserved_slots,
            aging,
            default_class,
            group_max_wait_ms: config
                .get_u32(GROUP_MAX_WAIT_KEY, GROUP_MAX_WAIT_DEFAULT_MS)?
                .into(),
            rt_group_max_wait_ms: config
                .get_u32(RT_GROUP_MAX_WAIT_KEY, RT_GROUP_MAX_WAIT_DEFAULT_MS)?
                .into(),
        })
    }

    fn admit(&self, req: &Request, _view: &View) -> Admission {
        let class = class_from_hint(req, self.default_class);
        let priority = match class {
            Class::Realtime => REALTIME_PRIORITY,
            Class::Batch => BATCH_PRIORITY,
        };
        if class == Class::Realtime {
            self.remember_rt_model(&req.model, req.arrival_ms);
        }
        Admission::Queue(Placement { class, priority })
    }

    fn schedule(&self, view: &View) -> Vec<Action> {
        if view.free_slots == 0 || view.waiting.is_empty() {
            return Vec::new();
        }
        let mut d = Decision::new(self, view);
        self.protect_rt_models(&mut d.plan, view);
        d.find_rt_homes();
        // Real-time requests not yet reached in the order below.
        let mut rt_left = view
            .waiting
            .iter()
            .filter(|w| w.class == Class::Realtime)
            .count();
        // While the free slots are the ones kept for real-time (the common
        // case under a batch flood), no batch request can start: with no
        // real-time request waiting either, there is nothing to order. The
        // same holds in the loop once the starts so far use up the batch
        // room: the rest of the order is not popped one by one.
        if !d.batch_room() && rt_left == 0 {
            return Vec::new();
        }
        let mut later = Vec::new();
        for i in order_waiting(view, |w| self.aging.priority(w, view.now_ms)) {
            let w = &view.waiting[i];
            if w.class == Class::Batch {
                if !d.batch_room() {
                    if rt_left == 0 {
                        break;
                    }
                    continue;
                }
                let hold = d.plan.hold(w, self.group_max_wait_ms, |b| d.batch_fits(b));
                match hold {
                    Hold::Go => {}
                    Hold::Later => {
                        later.push(i);
                        continue;
                    }
                    Hold::Wait => continue,
                }
            } else {
                rt_left -= 1;
                if d.plan.hold_realtime(w, self.rt_group_max_wait_ms) == Hold::Wait {
                    continue;
                }
            }
            // A batch request that finds no slot is skipped, so a real-time
            // request further back can still take a reserved one.
            d.try_start(w);
            if d.free == 0 {
                return d.actions;
            }
        }
        for i in later {
            d.try_start(&view.waiting[i]);
            if d.free == 0 {
                break;
            }
        }
        d.actions
    }
}

impl ReservedAging {
    fn remember_rt_model(&self, model: &str, at_ms: u64) {
        let key = model_key(model);
        let mut m = self.rt_models.borrow_mut();
        match m.iter_mut().find(|(k, _)| *k == key) {
            Some(e) => e.1 = e.1.max(at_ms),
            None => {
                if m.len() >= RT_MODELS_MAX
                    && let Some(oldest) = (0..m.len()).min_by_key(|&i| m[i].1)
                {
                    m.swap_remove(oldest);
                }
                m.push((key.into_owned(), at_ms));
            }
        }
    }

    /// Protects from eviction the models real-time requests used recently.
    fn protect_rt_models(&self, plan: &mut Plan, view: &View) {
        let m = self.rt_models.borrow();
        if m.is_empty() {
            return;
        }
        for (i, name) in view.names.iter().enumerate() {
            let key = model_key(name);
            if m.iter().any(|(k, at)| {
                *k == key && view.now_ms.saturating_sub(*at) < RT_MODEL_MEMORY_MS
            }) {
                plan.protect(i as u32);
            }
        }
    }
}

/// One `schedule` call: the slots and backends left, and the starts so far.
struct Decision<'a> {
    policy: &'a ReservedAging,
    plan: Plan<'a>,
    free: u32,
    /// Batch requests of this arm may hold at most this many slots in all.
    batch_cap: u32,
    batch_running: u32,
    /// Real-time requests running (or started now) per backend.
    rt_on: Vec<u32>,
    /// Backends that keep real-time slots: those with a real-time model
    /// loaded, or all while no healthy backend has one.
    rt_home: Vec<bool>,
    actions: Vec<Action>,
}

impl<'a> Decision<'a> {
    fn new(policy: &'a ReservedAging, view: &'a View) -> Self {
        let mut rt_on = vec![0; view.backends.len()];
        let mut batch_running = 0;
        for r in &view.running {
            match r.class {
                Class::Batch => batch_running += 1,
                Class::Realtime => {
                    if let Some(n) = rt_on.get_mut(r.backend as usize) {
                        *n += 1;
                    }
                }
            }
        }
        Decision {
            policy,
            plan: Plan::new(view),
            free: view.free_slots,
            batch_cap: view.total_slots.saturating_sub(policy.rt_reserved_slots),
            batch_running,
            rt_on,
            rt_home: vec![true; view.backends.len()],
            actions: Vec::new(),
        }
    }

    /// Reserves real-time slots only where real-time requests can be served
    /// without a load: on the healthy backends that hold a real-time model
    /// ([`Plan::holds_protected`]). A reserved slot elsewhere would idle: a
    /// real-time request sent there waits seconds for its model anyway.
    fn find_rt_homes(&mut self) {
        let view = self.plan.view();
        let homes: Vec<bool> = (0..view.backends.len() as u32)
            .map(|b| view.backends[b as usize].healthy && self.plan.holds_protected(b))
            .collect();
        if homes.iter().any(|&h| h) {
            self.rt_home = homes;
        }
    }

    /// Slots of backend `b` kept for real-time: `rt_reserved_slots`, but
    /// never all of its slots (the arm-wide cap keeps a slot for real-time
    /// then), less the real-time requests already running there.
    fn reserved(&self, b: u32) -> u32 {
        if !self.rt_home[b as usize] {
            return 0;
        }
        let total = self.plan.view().backends[b as usize].total_slots;
        let reserve = self.policy.rt_reserved_slots.min(total.saturating_sub(1));
        reserve.saturating_sub(self.rt_on[b as usize])
    }

    /// Whether a batch request may start on backend `b`: it keeps its
    /// reserved real-time slots free.
    fn batch_fits(&self, b: u32) -> bool {
        self.plan.free(b) > self.reserved(b)
    }

    /// Whether a batch request could still start in this call: the arm's
    /// batch cap leaves room and some backend keeps its reserved slots free
    /// after one more. It only turns false as the call starts requests.
    fn batch_room(&self) -> bool {
        self.batch_running < self.batch_cap && self.plan.has_room(|b| self.batch_fits(b))
    }

    /// Starts `w` if a slot allows it.
    fn try_start(&mut self, w: &Waiting) {
        let batch = w.class == Class::Batch;
        if batch && self.batch_running >= self.batch_cap {
            return;
        }
        let pick = if batch {
            self.plan.pick(w.model, |b| self.batch_fits(b))
        } else {
            self.plan.pick(w.model, |_| true)
        };
        let Some(pick) = pick else {
            return;
        };
        self.plan.book(pick, w.model);
        // Named even when it evicts: the plan chose the cheapest victim, and
        // for batch the host's choice could take a reserved slot.
        let named = pick.named();
        if batch {
            self.batch_running += 1;
        } else if let Some(b) = pick.backend {
            self.rt_on[b as usize] += 1;
        }
        self.actions.push(start_on(w.id, named));
        self.free -= 1;
    }
}

export_policy!(ReservedAging);

#[cfg(test)]
mod tests;
