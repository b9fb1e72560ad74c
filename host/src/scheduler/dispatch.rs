//! The request state machine: start, pre-empt, hand a pre-empted slot on,
//! requeue (after a pre-emption or an upstream 503), finish, cancel, reject.
//!
//! ```text
//!   Waiting --start, free slot--> Running --finish/gone--> (ended)
//!   Waiting --start, slot being pre-empted--> Handoff
//!   Running --preempt--> Preempting --upstream let go--> (slot to the Handoff head)
//!   Handoff --any slot of its arm frees--> Running
//!   Running --preempt, cut stream, upstream closed--> Preempting --upstream let go--> Cut (slot free) --client done--> (ended)
//!   Running/Preempting --requeue--> Waiting
//! ```

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::check::Invalid;
use super::core::{Core, State};
use super::ticket::{Grant, Outcome, Run, Signal};
use crate::escape::Escaped;
use crate::metrics::ArmLabel;
use crate::policy::Rejection;

impl Core {
    /// A checked `start`: dispatch now, or wait for a slot that a
    /// pre-emption is freeing (a handoff).
    pub(super) fn act_start(&mut self, a: usize, id: u64, backend: Option<u32>) {
        match self.entries.get(&id) {
            Some(e) if e.arm == a && e.state == State::Waiting => {}
            Some(e) if e.arm == a => return self.count_invalid(a, Invalid::DuplicateStart),
            _ => return self.count_invalid(a, Invalid::UnknownId),
        }
        if self.free_slots(a) > 0 && self.place(id, backend).is_none() {
            // Free slots, but none on a backend that speaks this request's
            // API (an `/api/*` request while only OpenAI-compatible servers
            // are free): it waits for one, without blame on the policy.
        } else if self.free_slots(a) > 0 {
            self.dispatch(id, backend);
        } else if self.arms[a].preempting as usize > self.arms[a].handoff.len() {
            // The slot of a pre-empted request goes to this one the moment
            // its upstream connection is closed.
            let arm = &mut self.arms[a];
            arm.waiting.remove(&id);
            arm.handoff.push_back(id);
            if let Some(e) = self.entries.get_mut(&id) {
                e.state = State::Handoff;
            }
        } else {
            self.count_invalid(a, Invalid::NoFreeSlot);
        }
    }

    /// A checked `preempt`: abort the upstream request; a request that has
    /// not reached its client yet is requeued by its handler, a streaming one
    /// is cut only when the policy asked for that.
    pub(super) fn act_preempt(&mut self, a: usize, id: u64, cut: bool) {
        let max = self.limits.max_preemptions;
        let Some(e) = self.entries.get_mut(&id) else {
            return self.count_invalid(a, Invalid::UnknownId);
        };
        if e.arm != a || !matches!(e.state, State::Running | State::Preempting) {
            return self.count_invalid(a, Invalid::UnknownId);
        }
        if e.state == State::Preempting {
            return self.count_invalid(a, Invalid::NotPreemptible);
        }
        let run = e.run.clone().expect("running entries have a run");
        let streaming = run.is_streaming();
        if streaming && !cut {
            return self.count_invalid(a, Invalid::PreemptStreaming);
        }
        if !streaming && e.preemptions >= max {
            return self.count_invalid(a, Invalid::PreemptBound);
        }
        // The response may start towards the client right now: whoever moves
        // the run's phase first wins.
        let streaming = streaming || !run.claim_requeue();
        if streaming && !cut {
            return self.count_invalid(a, Invalid::PreemptStreaming);
        }
        e.state = State::Preempting;
        let tokens = run.tokens();
        e.thrown_tokens += tokens;
        let (class, model) = (e.class, e.meta.model.clone());
        if streaming {
            run.mark_cut();
        }
        run.preempt.cancel();
        let arm = &mut self.arms[a];
        arm.preempting += 1;
        let label = ArmLabel {
            arm: arm.name.to_string(),
        };
        self.metrics.preemptions.get_or_create(&label).inc();
        self.metrics
            .preempted_tokens
            .get_or_create(&label)
            .inc_by(tokens);
        tracing::info!(
            target: "maitre::preempt",
            id,
            arm = %arm.name,
            class = class.name(),
            model = %Escaped(&model),
            tokens_thrown_away = tokens,
            cut_stream = streaming,
            "pre-empted"
        );
        if streaming && let Some(let_go) = run.close_upstream() {
            // The upstream connection is closing now, whether or not the
            // client reads again: the slot is free for the next request once
            // the upstream lets go of it.
            match let_go.filter(|l| !l.is_set()) {
                None => self.let_go(id),
                Some(l) => {
                    let tx = self.self_tx.clone();
                    super::letgo::after(Some(l), move || {
                        let _ = tx.send(super::Msg::LetGo { id });
                    });
                }
            }
        }
    }

    /// The upstream connection of a cut stream is let go: its slot is free,
    /// and the request waits only for its client to read the end.
    pub(super) fn let_go(&mut self, id: u64) {
        let cut = self.entries.get(&id).is_some_and(|e| {
            e.state == State::Preempting && e.run.as_ref().is_some_and(|r| r.is_cut())
        });
        if cut {
            self.release_slot(id, State::Preempting, false);
            if let Some(e) = self.entries.get_mut(&id) {
                e.state = State::Cut;
            }
        }
    }

    /// Gives a waiting (or handed-off) request its slot, on the backend the
    /// policy named if it can take it, else on the host's choice, and tells
    /// its handler.
    fn dispatch(&mut self, id: u64, named: Option<u32>) {
        // Callers checked there is a free slot; on the first backend
        // otherwise, so the request still ends (a 502 at worst).
        let Some(path) = self.entries.get(&id).map(|e| e.meta.path.clone()) else {
            return;
        };
        let b = self
            .place(id, named)
            .or_else(|| self.fleet.first_serving(&path))
            .unwrap_or(0);
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        let a = e.arm;
        let run = Arc::new(Run::new());
        e.queued_total += e.enqueued_at.elapsed();
        e.state = State::Running;
        e.run = Some(run.clone());
        e.backend = Some(b);
        e.served_by = Some(b);
        self.fleet.acquire(b, &e.meta.model);
        let grant = Grant {
            run,
            class: e.class,
            queue_wait: e.queued_total,
            preemptions: e.preemptions,
            arm: self.arms[a].name.clone(),
            backend: b,
            backend_name: self.fleet.name(b).clone(),
        };
        if let Some(tx) = e.tx.take() {
            let _ = tx.send(Signal::Start(grant));
        }
        let arm = &mut self.arms[a];
        arm.waiting.remove(&id);
        arm.running.insert(id);
        arm.busy += 1;
        arm.idle_since = None;
        self.busy += 1;
        self.metrics.slots_busy.set(self.busy as i64);
    }

    /// Releases the slot of a running (or pre-empting) request and hands it on
    /// to a request waiting for a pre-empted slot, at once. Any slot of the
    /// arm will do: a pre-empted request slow to let go of its slot must not
    /// keep the request started in its place from one that frees meanwhile.
    /// `completed`: it was answered, so its model is loaded on its backend.
    pub(super) fn release_slot(&mut self, id: u64, was: State, completed: bool) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        let a = e.arm;
        if let Some(b) = e.backend.take() {
            self.fleet.release(b, &e.meta.model, completed);
        }
        let arm = &mut self.arms[a];
        arm.running.remove(&id);
        arm.busy = arm.busy.saturating_sub(1);
        self.busy = self.busy.saturating_sub(1);
        arm.dirty = true;
        if was == State::Preempting {
            arm.preempting = arm.preempting.saturating_sub(1);
            // This slot was promised to the head of the handoff line.
            self.dispatch_handoff(a);
        }
        self.metrics.slots_busy.set(self.busy as i64);
        for i in 0..self.arms.len() {
            while !self.arms[i].handoff.is_empty() && self.free_slots(i) > 0 {
                self.dispatch_handoff(i);
            }
        }
        // Arms share the upstream: a slot let go by one may be the one
        // another arm's waiting requests lacked (its share was free but the
        // upstream was full, e.g. after a weight change or a switchback turn).
        for i in 0..self.arms.len() {
            if !self.arms[i].waiting.is_empty() && self.free_slots(i) > 0 {
                self.arms[i].dirty = true;
            }
        }
    }

    /// Dispatches the head of an arm's handoff line, if any.
    fn dispatch_handoff(&mut self, a: usize) {
        if let Some(next) = self.arms[a].handoff.pop_front()
            && let Some(n) = self.entries.get_mut(&next)
        {
            n.state = State::Waiting;
            self.dispatch(next, None);
        }
    }

    /// The client went away (its ticket was dropped).
    pub(super) fn gone(&mut self, id: u64) {
        self.finished(id, Outcome::Cancelled);
    }

    /// Takes a request out of its arm's queue (waiting or handoff).
    fn remove_waiting(&mut self, id: u64) {
        let Some(e) = self.entries.get(&id) else {
            return;
        };
        let arm = &mut self.arms[e.arm];
        arm.waiting.remove(&id);
        if let Some(pos) = arm.handoff.iter().position(|x| *x == id) {
            arm.handoff.remove(pos);
        }
        arm.dirty = true;
    }

    /// The request ended, wherever it was.
    pub(super) fn finished(&mut self, id: u64, outcome: Outcome) {
        let Some(e) = self.entries.get(&id) else {
            return;
        };
        match e.state {
            state @ (State::Running | State::Preempting) => {
                self.release_slot(id, state, outcome == Outcome::Ok)
            }
            State::Waiting | State::Handoff => self.remove_waiting(id),
            State::Cut => {}
        }
        self.end(id, outcome);
    }

    /// Puts a dispatched request back in its queue: after a transparent
    /// pre-emption, an upstream 503 or a lost upstream connection. A request
    /// whose arm lost its slots goes to a serving arm, so it is never
    /// stranded.
    pub(super) fn requeue(
        &mut self,
        id: u64,
        why: super::Requeued,
        signal: oneshot::Sender<Signal>,
        lost_tokens: u64,
        kept_tokens: u64,
    ) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        e.tx = Some(signal);
        let state = e.state;
        if !matches!(state, State::Running | State::Preempting) {
            return;
        }
        if !self.back_in_line(id, state) {
            return;
        }
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        match why {
            super::Requeued::Preempted => {
                e.preemptions += 1;
                e.thrown_tokens = (e.thrown_tokens + lost_tokens).saturating_sub(kept_tokens);
            }
            super::Requeued::Busy => {
                e.busy_retries += 1;
                self.metrics.upstream_busy_retries.inc();
            }
            super::Requeued::Lost => {
                self.metrics.upstream_lost_retries.inc();
            }
        }
    }

    /// Frees the slot of request `id` (dispatched, in state `was`) and puts
    /// it back in its arm's queue, keeping the upstream TTFB of the dispatch
    /// it gives up (for the log). False: it is gone.
    pub(super) fn back_in_line(&mut self, id: u64, was: State) -> bool {
        self.release_slot(id, was, false);
        let Some(e) = self.entries.get_mut(&id) else {
            return false;
        };
        if let Some(run) = e.run.take()
            && e.first_upstream_ttfb.is_none()
        {
            e.first_upstream_ttfb = run.upstream_ttfb();
        }
        e.state = State::Waiting;
        e.enqueued_at = Instant::now();
        let arm = &mut self.arms[e.arm];
        arm.waiting.insert(id, e.class, e.priority);
        arm.dirty = true;
        if arm.slots == 0 {
            self.share_slots();
        }
        true
    }

    /// Answers a waiting request with a rejection.
    pub(super) fn reject_waiting(&mut self, id: u64, rejection: Rejection) {
        self.remove_waiting(id);
        if let Some(tx) = self.entries.get_mut(&id).and_then(|e| e.tx.take()) {
            let _ = tx.send(Signal::Reject(rejection));
        }
        self.end(id, Outcome::Rejected);
    }

    /// Forgets a request and records how it ended.
    fn end(&mut self, id: u64, outcome: Outcome) {
        let Some(e) = self.entries.remove(&id) else {
            return;
        };
        let mut queued = e.queued_total;
        if matches!(e.state, State::Waiting | State::Handoff) {
            queued += e.enqueued_at.elapsed();
        }
        let (upstream_ttfb, client_ttfb): (Option<Duration>, Option<Duration>) = match &e.run {
            Some(r) => (
                r.upstream_ttfb().or(e.first_upstream_ttfb),
                r.client_first_byte
                    .get()
                    .map(|t| t.duration_since(e.meta.arrival)),
            ),
            None => (e.first_upstream_ttfb, None),
        };
        let cut = e.run.as_ref().is_some_and(|r| r.is_cut());
        if outcome == Outcome::Ok
            && let (Some(b), Some(r)) = (e.served_by, &e.run)
        {
            let generating = r.upstream_first_byte.get().map(|t| t.elapsed());
            self.fleet
                .observe_speed(b, &e.meta.model, r.upstream_ttfb(), r.tokens(), generating);
        }
        self.record_end(super::report::Ended {
            arm: e.arm,
            backend: e.served_by,
            class: e.class,
            meta: &e.meta,
            queued,
            upstream_ttfb,
            client_ttfb,
            outcome,
            // A cut is a pre-emption too (a transparent one was counted
            // when its request was requeued).
            preemptions: e.preemptions + u32::from(cut),
            thrown_tokens: e.thrown_tokens,
            tokens: e.run.as_ref().map(|r| r.tokens()).unwrap_or(0),
            cut,
        });
    }
}
