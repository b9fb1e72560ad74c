//! The snapshot of one arm a policy decides on.
//!
//! A decider that speaks interface 0.2.0 (and the built-in FIFO) gets a
//! bounded candidate window of the queue ([`super::queue::Queue::window`])
//! with a summary of what lies beyond it; a 0.1.0 plugin gets every waiting
//! request, as that interface promises.

use super::core::{Core, State};
use crate::policy::{Running, View, Waiting};

/// The candidate window of a windowed decider's call when no slot is free.
pub(super) const BUSY_WINDOW: usize = 16;

impl Core {
    /// Arm `a`'s view for its decider: windowed when the decider asks for it.
    ///
    /// With no slot free nothing can start, so a call can only pre-empt or
    /// reject: the window shrinks to [`BUSY_WINDOW`], which still holds each
    /// class's oldest and highest-priority requests, the ones pre-emption
    /// and rejection act for. While hundreds wait and every slot is busy,
    /// most decisions are such calls (each arrival makes one); copying the
    /// whole window into the sandbox for them cost throughput as the queue
    /// grew.
    pub(super) fn view(&self, a: usize) -> View {
        let window = self.arms[a].decider.windowed().then(|| {
            if self.free_slots(a) == 0 {
                self.limits.candidate_window.min(BUSY_WINDOW)
            } else {
                self.limits.candidate_window
            }
        });
        self.view_of(a, window)
    }

    /// The view `admit` gets: for a windowed decider (0.2.0) the queue only
    /// as counts in `beyond`, since an arrival needs no candidates.
    pub(super) fn admit_view(&self, a: usize) -> View {
        let window = self.arms[a].decider.windowed().then_some(0);
        self.view_of(a, window)
    }

    /// Waiting requests oldest arrival first (ids are given in arrival
    /// order), all of them or the window of at most `window`; running ones
    /// oldest start first.
    pub(super) fn view_of(&self, a: usize, window: Option<usize>) -> View {
        let arm = &self.arms[a];
        let free = self.free_slots(a);
        let (ids, beyond) = match window {
            Some(n) => {
                let w = arm.waiting.window(n);
                let beyond = w.beyond(|id| self.entries.get(&id).map(|e| e.arrival_ms));
                (w.ids, beyond)
            }
            None => (arm.waiting.iter().copied().collect(), Vec::new()),
        };
        let waiting: Vec<Waiting> = ids
            .iter()
            .filter_map(|id| self.entries.get(id).map(|e| (id, e)))
            .map(|(id, e)| Waiting {
                id: *id,
                class: e.class,
                priority: e.priority,
                model: e.meta.model.clone(),
                tenant: e.meta.tenant.clone(),
                stream: e.meta.stream,
                num_predict: e.meta.num_predict,
                arrival_ms: e.arrival_ms,
                enqueued_ms: self.ms_of(e.enqueued_at),
                preemptions: e.preemptions,
            })
            .collect();
        let mut running: Vec<Running> = arm
            .running
            .iter()
            .filter_map(|id| self.entries.get(id).map(|e| (id, e)))
            .filter_map(|(id, e)| e.run.as_ref().map(|r| (id, e, r)))
            .map(|(id, e, r)| {
                let streaming = r.is_streaming();
                Running {
                    id: *id,
                    class: e.class,
                    priority: e.priority,
                    model: e.meta.model.clone(),
                    tenant: e.meta.tenant.clone(),
                    backend: e.backend.unwrap_or(0) as u32,
                    num_predict: e.meta.num_predict,
                    arrival_ms: e.arrival_ms,
                    started_ms: self.ms_of(r.started),
                    first_token_ms: r.upstream_first_byte.get().map(|t| self.ms_of(*t)),
                    tokens: r.tokens(),
                    preemptible: e.state == State::Running
                        && !streaming
                        && e.preemptions < self.limits.max_preemptions,
                    streaming,
                    preemptions: e.preemptions,
                }
            })
            .collect();
        // A requeued request keeps its (older) id but starts later.
        running.sort_by_key(|r| (r.started_ms, r.id));
        View {
            now_ms: self.now_ms(),
            total_slots: arm.slots,
            free_slots: free,
            backends: self.fleet.policy_view(self.now_ms()),
            running,
            waiting,
            beyond,
        }
    }
}
