//! `bench-round-robin`: the residency-blind baseline of the fleet bench
//! (`cargo bench -p maitre --bench fleet`).
//!
//! It is what a gateway that knows nothing of model residency does: requests
//! start in arrival order (FIFO, whatever their class), and each start names
//! the next backend in rotation that is healthy and has a free slot,
//! ignoring which models the backends have loaded. The bench compares it
//! with the host's residency-aware choice to count the model loads that
//! blindness costs. Not for production; never embedded in maitre.
//!
//! Config: `default_class` = `"batch"` (default) or `"realtime"`.

use std::sync::atomic::{AtomicUsize, Ordering};

use maitre_policy_sdk::{
    Action, Admission, Class, Config, Placement, Policy, Request, Start, View, class_from_hint,
    export_policy,
};

/// FIFO with backends named in rotation.
#[derive(Debug)]
pub struct RoundRobin {
    /// Class of requests without a recognised `X-Priority` header.
    pub default_class: Class,
    /// Index of the backend the next start tries first. The rotation must
    /// survive between calls, so it is the one piece of state kept here.
    next: AtomicUsize,
}

/// Config key of [`RoundRobin::default_class`].
pub const DEFAULT_CLASS: &str = "default_class";

impl Policy for RoundRobin {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown(&[DEFAULT_CLASS])?;
        Ok(RoundRobin {
            default_class: config.get_class(DEFAULT_CLASS, Class::Batch)?,
            next: AtomicUsize::new(0),
        })
    }

    fn admit(&self, req: &Request, _view: &View) -> Admission {
        Admission::Queue(Placement {
            class: class_from_hint(req, self.default_class),
            priority: 0.0,
        })
    }

    fn schedule(&self, view: &View) -> Vec<Action> {
        let n = view.backends.len();
        if view.free_slots == 0 || view.waiting.is_empty() || n == 0 {
            return Vec::new();
        }
        // Free slots per backend, counted down as this answer uses them.
        let mut free: Vec<u32> = view
            .backends
            .iter()
            .map(|b| if b.healthy { b.free_slots } else { 0 })
            .collect();
        let mut order: Vec<usize> = (0..view.waiting.len()).collect();
        order.sort_by_key(|&i| (view.waiting[i].arrival_ms, view.waiting[i].id));
        let mut cursor = self.next.load(Ordering::Relaxed) % n;
        let mut actions = Vec::new();
        for i in order.into_iter().take(view.free_slots as usize) {
            let Some(b) = (0..n).map(|k| (cursor + k) % n).find(|&b| free[b] > 0) else {
                break;
            };
            free[b] -= 1;
            cursor = (b + 1) % n;
            actions.push(Action::Start(Start {
                id: view.waiting[i].id,
                backend: Some(b as u32),
            }));
        }
        self.next.store(cursor, Ordering::Relaxed);
        actions
    }
}

export_policy!(RoundRobin);

#[cfg(test)]
mod tests {
    use super::*;
    use maitre_policy_sdk::testing::{view, waiting};

    fn policy() -> RoundRobin {
        RoundRobin::init(&Config::from(Vec::new())).unwrap()
    }

    /// A view of `backends` backends with the given free slots each.
    fn fleet(free: &[u32], waiting_ids: &[u64]) -> View {
        let w = waiting_ids
            .iter()
            .map(|&id| waiting(id, Class::Batch, 0.0, id))
            .collect();
        let mut v = view(0, 2 * free.len() as u32, Vec::new(), w);
        let template = v.backends[0].clone();
        v.backends = free
            .iter()
            .enumerate()
            .map(|(i, &f)| maitre_policy_sdk::Backend {
                name: format!("b{i}"),
                total_slots: 2,
                free_slots: f,
                ..template.clone()
            })
            .collect();
        v.free_slots = free.iter().sum();
        v
    }

    fn named(actions: &[Action]) -> Vec<(u64, Option<u32>)> {
        actions
            .iter()
            .map(|a| match a {
                Action::Start(s) => (s.id, s.backend),
                other => panic!("only starts expected, got {other:?}"),
            })
            .collect()
    }

    #[test]
    fn starts_in_arrival_order_on_backends_in_rotation() {
        let p = policy();
        let got = named(&p.schedule(&fleet(&[1, 1, 1], &[3, 1, 2])));
        assert_eq!(got, vec![(1, Some(0)), (2, Some(1)), (3, Some(2))]);
        // The rotation carries over to the next call.
        let got = named(&p.schedule(&fleet(&[1, 1, 1], &[4, 5])));
        assert_eq!(got, vec![(4, Some(0)), (5, Some(1))]);
        let got = named(&p.schedule(&fleet(&[1, 1, 1], &[6])));
        assert_eq!(got, vec![(6, Some(2))]);
    }

    #[test]
    fn skips_full_backends_and_never_overfills_one() {
        let p = policy();
        let got = named(&p.schedule(&fleet(&[0, 2, 0], &[1, 2, 3])));
        assert_eq!(got, vec![(1, Some(1)), (2, Some(1))]);
    }
}
