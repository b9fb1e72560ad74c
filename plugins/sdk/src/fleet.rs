//! Backend choice for fleet-aware policies, shared by maitre's plugins.
//!
//! Loading a model costs an Ollama backend seconds, and loading one into a
//! backend already at its `max-loaded-models` evicts another. So a start
//! names a backend that is healthy, has a free slot and has the request's
//! model loaded; else one with room to load it (fewer loaded models than its
//! limit); else the one whose predicted victim (the least recently used
//! model, as Ollama evicts) costs least: a model nobody waits for or one
//! loaded elsewhere too before the only copy of a model in demand.
//!
//! [`View::best_backend`] answers that for one request. A policy that starts
//! several requests in one decision uses a [`Plan`], which books each start
//! (a slot taken, a model loaded) so the next choice sees it. Under memory
//! pressure, [`Plan::hold`] tells a policy which batch requests to pass
//! over so that backends don't thrash between models.

use std::collections::HashMap;

use crate::{Action, Class, Start, View, Waiting};

/// Config key of the grouping bound: a batch request passed over under
/// memory pressure for longer than this (since its arrival) is taken anyway.
pub const GROUP_MAX_WAIT_KEY: &str = "group_max_wait_ms";
/// Default of [`GROUP_MAX_WAIT_KEY`]: a few seconds, about one model load.
pub const GROUP_MAX_WAIT_DEFAULT_MS: u32 = 5_000;
/// Config key of the real-time grouping bound ([`Plan::hold_realtime`]): a
/// real-time request waits at most this long (since its arrival) for a
/// backend with its model loaded before it loads the model elsewhere.
pub const RT_GROUP_MAX_WAIT_KEY: &str = "rt_group_max_wait_ms";
/// Default of [`RT_GROUP_MAX_WAIT_KEY`]: below a typical model load, above a
/// typical short real-time answer.
pub const RT_GROUP_MAX_WAIT_DEFAULT_MS: u32 = 1_000;

/// How well a backend with a free slot suits a request for a model; the
/// lower the better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fit {
    /// The model is loaded there (or a request for it runs there).
    Loaded,
    /// It has room to load the model without evicting one.
    Room,
    /// Loading the model there evicts another.
    Evict,
}

/// Where a start goes, as a [`Plan`] chose it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    /// Index into `view.backends`; None when no backend is healthy (the
    /// host's own rule applies then).
    pub backend: Option<u32>,
    /// How well it suits the model.
    pub fit: Fit,
}

impl Pick {
    /// The backend to name in the start: the chosen one, also when it
    /// evicts (the plan chose it for its cheapest predicted victim, which
    /// the host's least-busy rule does not look at); none when no backend
    /// is healthy (the host chooses).
    pub fn named(&self) -> Option<u32> {
        self.backend
    }
}

/// What to do with a waiting request under memory pressure ([`Plan::hold`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Start it now (if the policy's own rules allow).
    Go,
    /// Pass over it for now; start it only after the requests that need no
    /// eviction, if slots are left: its model is loaded nowhere, so it costs
    /// a load whenever it starts.
    Later,
    /// Leave it waiting: its model is loaded on a backend that is busy, so
    /// waiting for that backend costs less than evicting another model.
    Wait,
}

/// Ollama's name of a model: `llama3` is `llama3:latest` (a tag after the
/// last `/` counts; a registry port does not). A request may say either,
/// while `/api/ps` (and so `loaded`) says the full name.
pub fn model_key(name: &str) -> std::borrow::Cow<'_, str> {
    let base = name.rsplit('/').next().unwrap_or(name);
    if base.contains(':') || name.is_empty() {
        name.into()
    } else {
        format!("{name}:latest").into()
    }
}

impl View {
    /// The backend a start of a request for `model` should name: healthy,
    /// with a free slot and the model loaded; else healthy, with a free slot
    /// and room to load it; else the one whose predicted victim costs least
    /// ([`Plan::victim_cost`]); none when no backend is healthy (the host
    /// chooses). Within a tier the least busy (by share of its slots), then
    /// the first listed.
    pub fn best_backend(&self, model: u32) -> Option<u32> {
        Plan::new(self).pick(model, |_| true)?.named()
    }
}

/// The backends during one decision: each start a policy makes is booked,
/// so the next choice sees the slot taken and the model loaded.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    view: &'a View,
    free: Vec<u32>,
    /// Models this decision loads, per backend (canonical ids).
    added: Vec<Vec<u32>>,
    /// Models this decision evicts, per backend (canonical ids).
    evicted: Vec<Vec<u32>>,
    /// Per canonical model id (an index into `view.names`), the waiting (in
    /// the window) and running requests for it: what an eviction of it
    /// would cost.
    need: Vec<u32>,
    /// Per name id, the first id of the same model ([`model_key`]).
    canon: Vec<u32>,
    /// Models (canonical ids) a policy wants kept loaded ([`Plan::protect`]).
    protected: Vec<u32>,
    /// No backend is healthy: the host decides everything.
    blind: bool,
}

impl<'a> Plan<'a> {
    /// The backends of `view`, nothing booked yet.
    pub fn new(view: &'a View) -> Self {
        let mut first: HashMap<std::borrow::Cow<'_, str>, u32> = HashMap::new();
        let canon = view
            .names
            .iter()
            .enumerate()
            .map(|(i, n)| *first.entry(model_key(n)).or_insert(i as u32))
            .collect();
        let canon: Vec<u32> = canon;
        let c = |m: u32| canon.get(m as usize).copied().unwrap_or(m);
        let mut need = vec![0u32; view.names.len()];
        for m in view
            .waiting
            .iter()
            .map(|w| w.model)
            .chain(view.running.iter().map(|r| r.model))
        {
            if let Some(n) = need.get_mut(c(m) as usize) {
                *n += 1;
            }
        }
        Plan {
            canon,
            protected: Vec::new(),
            view,
            free: view.backends.iter().map(|b| b.free_slots).collect(),
            added: vec![Vec::new(); view.backends.len()],
            evicted: vec![Vec::new(); view.backends.len()],
            need,
            blind: !view.backends.iter().any(|b| b.healthy),
        }
    }

    /// The view this plan was made from.
    pub fn view(&self) -> &'a View {
        self.view
    }

    /// Whether no backend is healthy (or none is listed): picks name none
    /// and the host applies its own rule.
    pub fn blind(&self) -> bool {
        self.blind
    }

    /// Free slots of backend `b` left in this decision.
    pub fn free(&self, b: u32) -> u32 {
        self.free.get(b as usize).copied().unwrap_or(0)
    }

    /// The canonical id of name id `model`: equal for `m` and `m:latest`.
    fn canon(&self, model: u32) -> u32 {
        self.canon.get(model as usize).copied().unwrap_or(model)
    }

    /// Whether `model` (an index into `view.names`) is loaded on backend
    /// `b`, or this decision loads it there. `m` and `m:latest` are one model.
    pub fn has(&self, b: u32, model: u32) -> bool {
        let i = b as usize;
        let m = self.canon(model);
        (self
            .view
            .backends
            .get(i)
            .is_some_and(|x| x.loaded.iter().any(|l| self.canon(l.model) == m))
            && !self.evicted.get(i).is_some_and(|e| e.contains(&m)))
            || self.added.get(i).is_some_and(|a| a.contains(&m))
    }

    /// The model (canonical id) a load on backend `b` would evict, as
    /// Ollama (and the upstream model) choose it: the least recently used,
    /// i.e. the loaded model with the smallest `expires_ms` (one with no
    /// expiry is one the host saw traffic for since its last poll: recent).
    /// Models with a request running there are used now, so they go last;
    /// models this decision loads there are the newest. None when nothing
    /// this plan knows of is loaded there.
    pub fn victim(&self, b: u32) -> Option<u32> {
        let x = self.view.backends.get(b as usize)?;
        let running = |m: u32| {
            self.view
                .running
                .iter()
                .any(|r| r.backend == b && self.canon(r.model) == m)
        };
        x.loaded
            .iter()
            .map(|l| (self.canon(l.model), l.expires_ms))
            .filter(|&(m, _)| self.has(b, m) && !self.added[b as usize].contains(&m))
            .min_by_key(|&(m, e)| (running(m), e.unwrap_or(u64::MAX)))
            .map(|(m, _)| m)
    }

    /// Waiting (in the window) and running requests for `model`.
    pub fn need(&self, model: u32) -> u32 {
        self.need
            .get(self.canon(model) as usize)
            .copied()
            .unwrap_or(0)
    }

    /// Healthy backends that have `model` loaded (or get it in this decision).
    pub fn copies(&self, model: u32) -> usize {
        (0..self.view.backends.len() as u32)
            .filter(|&b| self.view.backends[b as usize].healthy && self.has(b, model))
            .count()
    }

    /// Marks `model` (an index into `view.names`) as one to keep loaded:
    /// evicting it costs more than evicting any other model
    /// ([`Plan::victim_cost`]). For models whose next request must not wait
    /// for a load, such as those real-time requests use.
    pub fn protect(&mut self, model: u32) {
        let m = self.canon(model);
        if !self.protected.contains(&m) {
            self.protected.push(m);
        }
    }

    /// Whether backend `b` holds a protected model ([`Plan::protect`]), or
    /// gets one loaded in this decision.
    pub fn holds_protected(&self, b: u32) -> bool {
        self.protected.iter().any(|&m| self.has(b, m))
    }

    /// What evicting the predicted victim of backend `b` costs, the lower
    /// the better: `(0, 0)` when nothing would be evicted (or nothing known
    /// is loaded); `(1, n)` for a victim no waiting or running request needs
    /// (n = 0) or one loaded on another healthy backend too (n = the
    /// requests that need it); `(2, n)` for the only copy of a model n
    /// requests need: its next request pays a load; `(3, n)` for a model
    /// the policy protects ([`Plan::protect`]), however many copies.
    pub fn victim_cost(&self, b: u32) -> (u8, u32) {
        let Some(v) = self.victim(b) else {
            return (0, 0);
        };
        let n = self.need(v);
        if self.protected.contains(&v) {
            (3, n)
        } else if n == 0 || self.copies(v) > 1 {
            (1, n)
        } else {
            (2, n)
        }
    }

    /// How well backend `b` suits `model` (whatever its free slots).
    pub fn fit(&self, b: u32, model: u32) -> Fit {
        let Some(x) = self.view.backends.get(b as usize) else {
            return Fit::Evict;
        };
        if self.has(b, model) {
            return Fit::Loaded;
        }
        let loaded = (x.loaded.len() + self.added[b as usize].len())
            .saturating_sub(self.evicted[b as usize].len());
        if x.max_loaded_models == 0 || loaded < x.max_loaded_models as usize {
            Fit::Room
        } else {
            Fit::Evict
        }
    }

    /// The best backend for `model` among the healthy ones with a free slot
    /// that `allow` accepts: by [`Fit`], among those that evict by
    /// [`Plan::victim_cost`], then the least busy (share of its slots
    /// taken), then the first listed. None when there is none. When no
    /// backend is healthy, a pick that names none (the host decides).
    pub fn pick(&self, model: u32, allow: impl Fn(u32) -> bool) -> Option<Pick> {
        if self.blind {
            return Some(Pick {
                backend: None,
                fit: Fit::Evict,
            });
        }
        self.open(allow)
            .map(|b| {
                let x = &self.view.backends[b as usize];
                let busy = 1.0 - self.free(b) as f64 / x.total_slots.max(1) as f64;
                let fit = self.fit(b, model);
                let cost = if fit == Fit::Evict {
                    self.victim_cost(b)
                } else {
                    (0, 0)
                };
                (fit, cost, busy, b)
            })
            .min_by(|x, y| {
                (x.0.cmp(&y.0))
                    .then(x.1.cmp(&y.1))
                    .then(x.2.total_cmp(&y.2))
                    .then(x.3.cmp(&y.3))
            })
            .map(|(fit, _, _, b)| Pick {
                backend: Some(b),
                fit,
            })
    }

    /// Whether [`Plan::pick`] with `allow` finds a place, for any model:
    /// a policy can skip a whole class of requests when it is false.
    pub fn has_room(&self, allow: impl Fn(u32) -> bool) -> bool {
        self.blind || self.open(allow).next().is_some()
    }

    /// The healthy backends with a free slot that `allow` accepts.
    fn open(&self, allow: impl Fn(u32) -> bool) -> impl Iterator<Item = u32> {
        (0..self.view.backends.len() as u32).filter(move |&b| {
            self.view.backends[b as usize].healthy && self.free(b) > 0 && allow(b)
        })
    }

    /// Books a start of a request for `model` where `pick` says.
    pub fn book(&mut self, pick: Pick, model: u32) {
        let Some(b) = pick.backend.map(|b| b as usize) else {
            return;
        };
        if let Some(f) = self.free.get_mut(b) {
            *f = f.saturating_sub(1);
        }
        let m = self.canon(model);
        if pick.fit == Fit::Evict
            && let Some(v) = self.victim(b as u32)
        {
            self.evicted[b].push(v);
        }
        if pick.fit != Fit::Loaded
            && let Some(a) = self.added.get_mut(b)
        {
            a.push(m);
        }
    }

    /// Picks a backend for a request for `model` (any healthy backend with
    /// a free slot), books it and returns the start on it ([`Plan::pick`]);
    /// the host chooses only when no backend is healthy.
    pub fn start(&mut self, id: u64, model: u32) -> Action {
        let pick = self.pick(model, |_| true);
        if let Some(p) = pick {
            self.book(p, model);
        }
        start_on(id, pick.and_then(|p| p.named()))
    }

    /// Whether `model` is loaded on a healthy backend (busy or not).
    pub fn loaded_somewhere(&self, model: u32) -> bool {
        (0..self.view.backends.len() as u32)
            .any(|b| self.view.backends[b as usize].healthy && self.has(b, model))
    }

    /// Grouping under memory pressure. A batch request whose best backend
    /// (among those `allow` accepts) would have to evict a model is passed
    /// over, so that requests for models already loaded go first, unless it
    /// has waited `max_wait_ms` since its arrival (then it goes: nothing
    /// starves). Real-time requests always go, and so does everything when
    /// no backend is healthy or none has a free slot.
    pub fn hold(&self, w: &Waiting, max_wait_ms: u64, allow: impl Fn(u32) -> bool) -> Hold {
        if w.class == Class::Realtime
            || self.blind
            || self.view.now_ms.saturating_sub(w.arrival_ms) >= max_wait_ms
        {
            return Hold::Go;
        }
        match self.pick(w.model, allow) {
            Some(p) if p.fit == Fit::Evict => {
                if self.loaded_somewhere(w.model) {
                    Hold::Wait
                } else {
                    Hold::Later
                }
            }
            _ => Hold::Go,
        }
    }
}

impl Plan<'_> {
    /// Grouping for a real-time request: when its model is loaded on a
    /// healthy backend whose slots are all taken and every free slot is on
    /// a backend that would have to evict a model, it **waits** for its
    /// model's backend (a running request ends sooner than a model loads:
    /// seconds, and the eviction costs whoever needs the victim next) until
    /// it has waited `max_wait_ms` since its arrival; then it goes. A model
    /// loaded nowhere, a free slot with the model or room, or no healthy
    /// backend: it goes at once.
    pub fn hold_realtime(&self, w: &Waiting, max_wait_ms: u64) -> Hold {
        if self.blind || self.view.now_ms.saturating_sub(w.arrival_ms) >= max_wait_ms {
            return Hold::Go;
        }
        match self.pick(w.model, |_| true) {
            Some(p) if p.fit == Fit::Evict && self.loaded_somewhere(w.model) => Hold::Wait,
            _ => Hold::Go,
        }
    }
}

/// `Action::Start` for a waiting request on `backend` (an index into
/// `view.backends`), or where the host chooses when none.
pub fn start_on(id: u64, backend: Option<u32>) -> Action {
    Action::Start(Start { id, backend })
}

#[cfg(test)]
mod tests;
