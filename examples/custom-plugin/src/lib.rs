//! Example maitre policy: real-time first, then shortest job first.
//!
//! A request's size is its `num_predict` (`options.num_predict`, or
//! `max_tokens` on `/v1`); requests that do not give one count as
//! `default_num_predict`. Requests asking for more than `max_num_predict`
//! tokens are rejected at once with HTTP 400. Never pre-empts.
//!
//! Build: `cargo build --release --target wasm32-wasip2` in this directory.

use maitre_policy_sdk::{
    Action, Admission, Class, Config, Placement, Policy, Rejection, Request, View, class_from_hint,
    export_policy, start,
};

/// Shortest-job-first within each class, real-time before batch.
#[derive(Debug)]
pub struct ShortestFirst {
    /// Size assumed for requests without `num_predict`.
    default_num_predict: i64,
    /// Larger requests are rejected; 0 means no limit.
    max_num_predict: i64,
}

impl Policy for ShortestFirst {
    /// Reads `[policy.config]`. Say what is wrong and how to fix it: the user
    /// sees this message when the policy file is refused.
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown(&["default_num_predict", "max_num_predict"])?;
        Ok(ShortestFirst {
            default_num_predict: config.get_u32("default_num_predict", 512)?.into(),
            max_num_predict: config.get_u32("max_num_predict", 0)?.into(),
        })
    }

    /// Classify an arriving request. The priority is ours to define: here,
    /// fewer predicted tokens = higher priority.
    fn admit(&self, req: &Request, _view: &View) -> Admission {
        let size = req.num_predict.unwrap_or(self.default_num_predict).max(0);
        if self.max_num_predict > 0 && size > self.max_num_predict {
            return Admission::Reject(Rejection {
                status: 400,
                message: format!(
                    "num_predict {size} is above this server's limit of {}",
                    self.max_num_predict
                ),
            });
        }
        Admission::Queue(Placement {
            class: class_from_hint(req, Class::Batch),
            priority: -(size as f64),
        })
    }

    /// Start the best waiting requests while slots are free.
    fn schedule(&self, view: &View) -> Vec<Action> {
        let mut order: Vec<usize> = (0..view.waiting.len()).collect();
        order.sort_unstable_by(|&a, &b| {
            let (a, b) = (&view.waiting[a], &view.waiting[b]);
            let realtime = |c: Class| c == Class::Realtime;
            realtime(b.class)
                .cmp(&realtime(a.class))
                .then(b.priority.total_cmp(&a.priority))
                .then(a.arrival_ms.cmp(&b.arrival_ms))
                .then(a.id.cmp(&b.id))
        });
        order
            .into_iter()
            .take(view.free_slots as usize)
            .map(|i| start(view.waiting[i].id))
            .collect()
    }
}

export_policy!(ShortestFirst);

#[cfg(test)]
mod tests {
    use super::*;
    use maitre_policy_sdk::testing::{request, started, view, waiting};

    #[test]
    fn realtime_first_then_shortest_first() {
        let p = ShortestFirst::init(&Config::default()).unwrap();
        let v = view(
            1_000,
            3,
            vec![],
            vec![
                waiting(1, Class::Batch, -2_000.0, 10),
                waiting(2, Class::Batch, -100.0, 20),
                waiting(3, Class::Realtime, -4_000.0, 30),
                waiting(4, Class::Batch, -50.0, 40),
            ],
        );
        assert_eq!(started(&p.schedule(&v)), [3, 4, 2]);
    }

    #[test]
    fn rejects_jobs_above_the_limit() {
        let p = ShortestFirst::init(&Config::from([("max_num_predict", "1000")])).unwrap();
        let mut req = request(1, 0, None);
        req.num_predict = Some(5_000);
        let v = view(0, 2, vec![], vec![]);
        assert!(matches!(p.admit(&req, &v), Admission::Reject(r) if r.status == 400));
        req.num_predict = None; // counts as default_num_predict = 512
        assert!(matches!(p.admit(&req, &v), Admission::Queue(pl) if pl.priority == -512.0));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = ShortestFirst::init(&Config::from([("max_tokens", "1")])).unwrap_err();
        assert!(e.contains("\"max_tokens\""), "{e}");
    }
}
