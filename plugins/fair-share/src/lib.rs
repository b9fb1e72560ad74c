//! `fair-share`: each tenant gets a fair share of the tokens served.
//!
//! Start-time fair queueing on token costs, with the virtual-token-counter
//! correction of "Fairness in Serving Large Language Models" (Sheng et al.,
//! OSDI 2024):
//!
//! - At admission a request is charged its expected cost (prompt tokens ×
//!   `input_weight` + expected output tokens × `output_weight`) and gets a
//!   virtual start tag: the later of the tenant's last finish tag and the
//!   current virtual time. Its admission priority is minus that tag, so the
//!   host's candidate window (which holds the highest priorities of each
//!   class) holds the next requests in fair order.
//! - Requests start in tag order (lowest first); the virtual time follows
//!   the tags of started requests, so a tenant back from idle starts at the
//!   current virtual time and banks no credit.
//! - When a request ends, its tenant's tag is corrected by the tokens it
//!   really produced minus those it was charged for.
//! - Real-time requests go before batch (`realtime_first`), and any request
//!   that has waited `max_wait_seconds` goes first: nothing starves.
//! - Each start names a backend with the request's model loaded, else one
//!   with room to load it, else the one whose load evicts the cheapest
//!   model ([`Plan`]).
//! - Under memory pressure a batch request whose start would evict a model
//!   is passed over for requests that need no eviction, for at most
//!   `group_max_wait_ms` since its arrival ([`Plan::hold`]): backends don't
//!   thrash between models, at the price of a bounded delay.
//!
//! The guarantee and the parameters are in this crate's README.md.

use std::cell::RefCell;
use std::collections::HashMap;

use maitre_policy_sdk::{
    Action, Admission, Class, Config, GROUP_MAX_WAIT_DEFAULT_MS, GROUP_MAX_WAIT_KEY, Hold,
    Placement, Plan, Policy, Request, View, class_from_hint, export_policy,
};

/// Config key: cost estimate of a request without `num_predict`.
pub const OUTPUT_TOKENS_DEFAULT: &str = "output_tokens_default";
/// Config key: weight of a prompt token.
pub const INPUT_WEIGHT: &str = "input_weight";
/// Config key: weight of a generated token.
pub const OUTPUT_WEIGHT: &str = "output_weight";
/// Config key: prompt tokens are estimated as body bytes / this.
pub const BYTES_PER_TOKEN: &str = "bytes_per_token";
/// Config key: a request that waited this long goes first.
pub const MAX_WAIT_SECONDS: &str = "max_wait_seconds";
/// Config key: real-time requests before batch ones.
pub const REALTIME_FIRST: &str = "realtime_first";
/// Config key: class of requests without a recognised `X-Priority` header.
pub const DEFAULT_CLASS: &str = "default_class";
/// Every config key this policy knows (besides the host's `maitre.*`).
pub const KEYS: [&str; 8] = [
    OUTPUT_TOKENS_DEFAULT,
    INPUT_WEIGHT,
    OUTPUT_WEIGHT,
    BYTES_PER_TOKEN,
    MAX_WAIT_SECONDS,
    REALTIME_FIRST,
    DEFAULT_CLASS,
    GROUP_MAX_WAIT_KEY,
];

/// Admissions remembered for the end-of-request correction, at most.
const MAX_TRACKED: usize = 100_000;

/// Fair share of tokens between tenants.
#[derive(Debug, Clone, PartialEq)]
pub struct FairShare {
    /// Expected output tokens of a request without `num_predict` (default 256).
    pub output_tokens_default: u32,
    /// Cost of a prompt token (default 1).
    pub input_weight: f64,
    /// Cost of a generated token (default 2, as in the VTC paper).
    pub output_weight: f64,
    /// Body bytes per prompt token, for the prompt estimate (default 4).
    pub bytes_per_token: f64,
    /// A request that waited this long is served first (default 120).
    pub max_wait_seconds: f64,
    /// Real-time requests before batch ones (default true).
    pub realtime_first: bool,
    /// Class of requests without a recognised `X-Priority` header.
    pub default_class: Class,
    /// Longest a batch request is passed over, since its arrival, because
    /// its start would evict a model (default 5,000; 0 = never).
    pub group_max_wait_ms: u64,
    /// The fair-queueing state.
    pub state: RefCell<State>,
}

/// Virtual time and tags.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct State {
    /// Virtual time: the start tag of the latest started request.
    pub now: f64,
    /// Finish tag of each tenant's latest admitted request ("" = no tenant).
    pub finish: HashMap<String, f64>,
    /// Per admitted request: tenant, output tokens charged, admission ms.
    pub charged: HashMap<u64, (String, f64, u64)>,
    /// Tokens last seen per running request.
    pub seen: HashMap<u64, u64>,
}

impl Policy for FairShare {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown(&KEYS)?;
        let positive = |key: &str, default: f64| -> Result<f64, String> {
            let v = config.get_f64(key, default)?;
            if v > 0.0 && v.is_finite() {
                Ok(v)
            } else {
                Err(format!("{key}: must be a number above 0, got {v}"))
            }
        };
        let input_weight = config.get_f64(INPUT_WEIGHT, 1.0)?;
        if !(input_weight >= 0.0 && input_weight.is_finite()) {
            return Err(format!(
                "{INPUT_WEIGHT}: must be 0 or more, got {input_weight}"
            ));
        }
        Ok(FairShare {
            output_tokens_default: config.get_u32(OUTPUT_TOKENS_DEFAULT, 256)?,
            input_weight,
            output_weight: positive(OUTPUT_WEIGHT, 2.0)?,
            bytes_per_token: positive(BYTES_PER_TOKEN, 4.0)?,
            max_wait_seconds: positive(MAX_WAIT_SECONDS, 120.0)?,
            realtime_first: config.get_bool(REALTIME_FIRST, true)?,
            default_class: config.get_class(DEFAULT_CLASS, Class::Batch)?,
            group_max_wait_ms: config
                .get_u32(GROUP_MAX_WAIT_KEY, GROUP_MAX_WAIT_DEFAULT_MS)?
                .into(),
            state: RefCell::new(State::default()),
        })
    }

    fn admit(&self, req: &Request, _view: &View) -> Admission {
        let class = class_from_hint(req, self.default_class);
        let tenant = req.tenant.clone().unwrap_or_default();
        let prompt = req.body_bytes as f64 / self.bytes_per_token;
        let output = match req.num_predict {
            Some(n) if n > 0 => n as f64,
            _ => self.output_tokens_default as f64,
        };
        let cost = self.input_weight * prompt + self.output_weight * output;
        let mut s = self.state.borrow_mut();
        let last = s.finish.get(&tenant).copied().unwrap_or(f64::MIN);
        let tag = s.now.max(last);
        s.finish.insert(tenant.clone(), tag + cost);
        if s.charged.len() >= MAX_TRACKED {
            // Forget the oldest half; their corrections are lost, no more.
            let mut ages: Vec<u64> = s.charged.values().map(|c| c.2).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            s.charged.retain(|_, c| c.2 > cut);
        }
        s.charged.insert(req.id, (tenant, output, req.arrival_ms));
        Admission::Queue(Placement {
            class,
            priority: -tag,
        })
    }

    fn schedule(&self, view: &View) -> Vec<Action> {
        self.correct(view);
        let max_wait_ms = self.max_wait_seconds * 1000.0;
        let mut order: Vec<(bool, bool, f64, u64, u64, usize)> = view
            .waiting
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let overdue = view.now_ms.saturating_sub(w.arrival_ms) as f64 >= max_wait_ms;
                let later_class = self.realtime_first && w.class == Class::Batch;
                (
                    !overdue,
                    later_class,
                    -w.priority,
                    w.arrival_ms,
                    w.id,
                    i,
                )
            })
            .collect();
        order.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0)
                .then(a.1.cmp(&b.1))
                .then(a.2.total_cmp(&b.2))
                .then(a.3.cmp(&b.3))
                .then(a.4.cmp(&b.4))
        });
        let mut s = self.state.borrow_mut();
        let mut plan = Plan::new(view);
        let mut actions = Vec::new();
        let mut start = |actions: &mut Vec<Action>, plan: &mut Plan, tag: f64, i: usize| {
            s.now = s.now.max(tag);
            let w = &view.waiting[i];
            actions.push(plan.start(w.id, w.model));
        };
        let free = view.free_slots as usize;
        // Batch requests whose start would evict a model, passed over for
        // now; they take what is left, in fair order.
        let mut later = Vec::new();
        for &(_, _, tag, _, _, i) in &order {
            if actions.len() >= free {
                break;
            }
            let w = &view.waiting[i];
            if w.class == Class::Batch {
                match plan.hold(w, self.group_max_wait_ms, |_| true) {
                    Hold::Go => {}
                    Hold::Later => {
                        later.push((tag, i));
                        continue;
                    }
                    Hold::Wait => continue,
                }
            }
            start(&mut actions, &mut plan, tag, i);
        }
        for (tag, i) in later {
            if actions.len() >= free {
                break;
            }
            start(&mut actions, &mut plan, tag, i);
        }
        actions
    }
}

impl FairShare {
    /// Charges each ended request's tenant for the tokens it really produced
    /// instead of the estimate, and forgets idle tenants.
    fn correct(&self, view: &View) {
        let mut s = self.state.borrow_mut();
        let running: HashMap<u64, u64> = view.running.iter().map(|r| (r.id, r.tokens)).collect();
        let ended: Vec<(u64, u64)> = s
            .seen
            .iter()
            .filter(|(id, _)| {
                !running.contains_key(id) && !view.waiting.iter().any(|w| w.id == **id)
            })
            .map(|(id, t)| (*id, *t))
            .collect();
        for (id, tokens) in ended {
            s.seen.remove(&id);
            if let Some((tenant, charged, _)) = s.charged.remove(&id) {
                let delta = self.output_weight * (tokens as f64 - charged);
                if let Some(f) = s.finish.get_mut(&tenant) {
                    *f += delta;
                }
            }
        }
        for (id, tokens) in running {
            s.seen.insert(id, tokens);
        }
        // A tenant whose last finish tag is behind the virtual time starts
        // from the virtual time anyway: its entry carries nothing.
        let now = s.now;
        if s.finish.len() > 64 {
            s.finish.retain(|_, f| *f > now);
        }
    }
}

export_policy!(FairShare);

#[cfg(test)]
mod tests;
