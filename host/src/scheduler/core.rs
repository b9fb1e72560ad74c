//! The scheduler task: its state, its message loop, admission, the decide
//! turn (ask each changed arm's decider, check the answer, apply it), plugin
//! ejection and the starvation watchdog.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::arms::Arm;
use super::check::{Invalid, check_answer, summarize_invalid, tidy_rejection};
use super::decider::Fifo;
use super::shadow::Shadow;
use super::ticket::{RequestMeta, Run, Signal, SubmitError, Ticket, shutting_down};
use super::{Msg, Setup};
use crate::config::{AbConfig, AbMode, Limits};
use crate::escape::Escaped;
use crate::fleet::Fleet;
use crate::metrics::{ArmKind, Metrics};
use crate::plugin::PluginError;
use crate::policy::{Action, Admission, Class, Request, View};

/// Messages handled between two decisions at most.
pub(super) const MAX_MESSAGES_PER_TURN: usize = 64;

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// In its arm's queue.
    Waiting,
    /// Started by the policy; takes a pre-empted slot the moment it is let go.
    Handoff,
    /// Holding a slot.
    Running,
    /// Holding a slot that a pre-emption is taking back.
    Preempting,
    /// Cut mid-stream, its upstream closed and its slot free; its client has
    /// not read the end of its stream yet.
    Cut,
}

impl State {
    /// Name in `/status`.
    pub(super) fn name(self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::Handoff => "handoff",
            State::Running => "running",
            State::Preempting => "preempting",
            State::Cut => "cut",
        }
    }
}

/// One request the scheduler knows.
pub(super) struct Entry {
    pub(super) arm: usize,
    pub(super) meta: RequestMeta,
    pub(super) class: Class,
    pub(super) priority: f64,
    pub(super) arrival_ms: u64,
    pub(super) enqueued_at: Instant,
    pub(super) queued_total: Duration,
    pub(super) preemptions: u32,
    pub(super) busy_retries: u32,
    /// Tokens its pre-emptions threw away: chunks already relayed, plus
    /// what the caller reported the upstream had generated.
    pub(super) thrown_tokens: u64,
    /// Times it moved to another backend after its backend failed.
    pub(super) failovers: u32,
    /// The backend its slot is on, while it holds one.
    pub(super) backend: Option<usize>,
    /// The backend of its last dispatch (kept for the log).
    pub(super) served_by: Option<usize>,
    pub(super) state: State,
    pub(super) run: Option<Arc<Run>>,
    /// Upstream TTFB of a dispatch that was requeued (kept for the log).
    pub(super) first_upstream_ttfb: Option<Duration>,
    /// Where the next go-ahead (or rejection) goes: one channel per wait, so
    /// a waiting request costs a small oneshot, not a channel block.
    pub(super) tx: Option<oneshot::Sender<Signal>>,
}

/// The scheduler's state, owned by its task.
pub(super) struct Core {
    pub(super) origin: Instant,
    pub(super) arms: Vec<Arm>,
    /// Shadow arms: shown the serving arm's decisions, never acting.
    pub(super) shadows: Vec<Shadow>,
    pub(super) ab: AbConfig,
    pub(super) entries: FxHashMap<u64, Entry>,
    pub(super) total_slots: u32,
    pub(super) busy: u32,
    /// The backends: slots, health, residency; the host's choice.
    pub(super) fleet: Fleet,
    /// Most fail-overs of one request.
    pub(super) max_failovers: u32,
    next_id: u64,
    /// One `Arc` per model and tenant name of the requests held.
    names: super::names::Interner,
    pub(super) limits: Limits,
    pub(super) metrics: Arc<Metrics>,
    pub(super) self_tx: mpsc::UnboundedSender<Msg>,
    pub(super) draining: bool,
    pub(super) reload_error: Option<String>,
    /// Requests waiting over all arms, for [`super::SchedulerHandle::waiting`].
    waiting_now: Arc<AtomicUsize>,
    /// Whether so many wait that memory matters more than allocator speed.
    crowding: crate::memory_mode::Crowding,
    pub(super) trace: Option<crate::trace::TraceSink>,
}

impl Core {
    pub(super) fn new(
        setup: Setup,
        metrics: Arc<Metrics>,
        self_tx: mpsc::UnboundedSender<Msg>,
        waiting_now: Arc<AtomicUsize>,
    ) -> Core {
        let fleet = Fleet::new(setup.backends, metrics.clone());
        let mut core = Core {
            origin: Instant::now(),
            arms: Vec::new(),
            shadows: Vec::new(),
            ab: setup.ab,
            entries: FxHashMap::default(),
            total_slots: fleet.total_slots(),
            busy: 0,
            fleet,
            max_failovers: setup.max_failovers,
            next_id: 1,
            names: Default::default(),
            limits: setup.limits,
            metrics,
            self_tx,
            draining: false,
            reload_error: None,
            waiting_now,
            crowding: Default::default(),
            trace: setup.trace,
        };
        core.metrics.slots_total.set(core.total_slots as i64);
        core.install(setup.arms);
        core
    }

    /// The task: handle the queued messages, at most [`MAX_MESSAGES_PER_TURN`]
    /// of them, then decide once; tick for aging, switchback windows and the
    /// watchdog. The bound keeps dispatch going through a burst of arrivals:
    /// each `admit` copies the arm's view, so admitting thousands before the
    /// first decision would leave free slots idle meanwhile.
    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.limits.tick_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Biased, so that under a paused clock (tests, the simulator)
            // the same inputs give the same turns; the tick goes first, as
            // it fires at most once a period and cannot starve messages.
            tokio::select! {
                biased;
                _ = tick.tick() => self.on_tick(),
                m = rx.recv() => {
                    let Some(m) = m else { break };
                    self.handle(m).await;
                    // Take what is already queued, up to the bound, before
                    // deciding once; the rest waits for the next turn.
                    for _ in 1..MAX_MESSAGES_PER_TURN {
                        let Ok(m) = rx.try_recv() else { break };
                        self.handle(m).await;
                    }
                }
            }
            self.decide().await;
            self.publish_waiting();
        }
    }

    pub(super) fn now_ms(&self) -> u64 {
        self.ms_of(Instant::now())
    }

    pub(super) fn ms_of(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.origin).as_millis() as u64
    }

    async fn handle(&mut self, m: Msg) {
        match m {
            Msg::Submit { meta, reply } => {
                let r = self.submit(meta).await;
                let _ = reply.send(r);
            }
            Msg::Gone { id } => self.gone(id),
            Msg::Finished { id, outcome } => self.finished(id, outcome),
            Msg::Requeue {
                id,
                why,
                signal,
                lost_tokens,
                kept_tokens,
            } => self.requeue(id, why, signal, lost_tokens, kept_tokens),
            Msg::LetGo { id } => self.let_go(id),
            Msg::Failover {
                id,
                backend,
                reply,
                signal,
            } => {
                let _ = reply.send(self.failover(id, backend, signal));
            }
            Msg::Health {
                backend,
                up,
                version,
            } => self.set_health(backend, up, version),
            Msg::Residency {
                backend,
                sent_at,
                models,
            } => self.fleet.apply_poll(backend, sent_at, models),
            Msg::Models { backend, models } => self.fleet.apply_models(backend, models),
            Msg::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Msg::Install { arms, ab, reply } => {
                self.ab = ab;
                self.install(arms);
                self.reload_error = None;
                let _ = reply.send(());
            }
            Msg::ReloadFailed { error } => self.reload_error = Some(error),
            Msg::SetWeight { arm, weight, reply } => {
                let _ = reply.send(self.set_weight(&arm, weight));
            }
            Msg::Report { window, reply } => {
                let _ = reply.send(self.report(window));
            }
            Msg::Shutdown { reply } => {
                self.draining = true;
                let ids: Vec<u64> = self
                    .entries
                    .iter()
                    .filter(|(_, e)| matches!(e.state, State::Waiting | State::Handoff))
                    .map(|(id, _)| *id)
                    .collect();
                for id in ids {
                    self.reject_waiting(id, shutting_down());
                }
                let _ = reply.send(());
            }
        }
    }

    /// Publishes each arm's waiting count where it changed, and the total.
    fn publish_waiting(&mut self) {
        let waiting = self.waiting_count();
        self.waiting_now.store(waiting, Ordering::Release);
        self.crowding.update(waiting);
        for a in &mut self.arms {
            let n = a.queued();
            if a.published_waiting != Some(n) {
                self.metrics.set_waiting(&a.name, n);
                a.published_waiting = Some(n);
            }
        }
    }

    pub(super) fn waiting_count(&self) -> usize {
        self.arms.iter().map(Arm::queued).sum()
    }

    async fn submit(&mut self, mut meta: RequestMeta) -> Result<Ticket, SubmitError> {
        if self.draining {
            return Err(SubmitError::ShuttingDown);
        }
        if self.waiting_count() >= self.limits.max_waiting {
            return Err(SubmitError::QueueFull);
        }
        meta.model = self.names.intern(meta.model);
        meta.tenant = meta.tenant.map(|t| self.names.intern(t));
        let id = self.next_id;
        self.next_id += 1;
        // A switchback window may have ended since the last tick.
        self.switchback_turn();
        let a = self.pick_arm(&meta.client_key);
        let arrival_ms = self.ms_of(meta.arrival);
        let req = Request {
            id,
            path: meta.path.clone(),
            model: meta.model.clone(),
            stream: meta.stream,
            priority_header: meta.priority_header.clone(),
            class_hint: Class::from_priority_header(meta.priority_header.as_deref()),
            tenant: meta.tenant.clone(),
            num_predict: meta.num_predict,
            body_bytes: meta.body_bytes,
            arrival_ms,
        };
        let name = self.arms[a].name.clone();
        let placement = match self.admit(a, &req).await {
            Admission::Queue(p) => p,
            Admission::Reject(mut r) => {
                self.tidy(a, &mut r);
                let class = req.class_hint.unwrap_or(Class::Batch);
                self.record_rejected_at_admission(a, class, &meta);
                return Err(SubmitError::Rejected {
                    arm: name,
                    rejection: r,
                });
            }
        };
        let priority = if placement.priority.is_finite() {
            placement.priority
        } else {
            0.0
        };
        let (stx, srx) = oneshot::channel();
        self.entries.insert(
            id,
            Entry {
                arm: a,
                class: placement.class,
                priority,
                arrival_ms,
                enqueued_at: meta.arrival,
                queued_total: Duration::ZERO,
                preemptions: 0,
                busy_retries: 0,
                thrown_tokens: 0,
                failovers: 0,
                backend: None,
                served_by: None,
                state: State::Waiting,
                run: None,
                first_upstream_ttfb: None,
                tx: Some(stx),
                meta,
            },
        );
        let arm = &mut self.arms[a];
        arm.waiting.insert(id, placement.class, priority);
        arm.dirty = true;
        self.waiting_now.fetch_add(1, Ordering::AcqRel);
        Ok(Ticket {
            id,
            arm: name,
            rx: Some(srx),
            tx: self.self_tx.clone(),
            ended: false,
            abandon: None,
        })
    }

    /// The serving arm's admission; shadows watching it see it too.
    async fn admit(&mut self, a: usize, req: &Request) -> Admission {
        let watched = self.watched_by_shadows(a);
        let view = (watched || !self.arms[a].fallback).then(|| self.admit_view(a));
        let adm = self.admit_live(a, req, view.as_ref()).await;
        if let (true, Some(view)) = (watched, &view) {
            for s in self.shadows.iter().filter(|s| s.active()) {
                s.admit(req, view, &adm);
            }
        }
        adm
    }

    /// Whether arm `a` is the one shadows watch now, and one is listening:
    /// the first arm, or in switchback the arm whose turn it is.
    pub(super) fn watched_by_shadows(&self, a: usize) -> bool {
        !self.shadows.is_empty()
            && a == self.watched_arm()
            && self.shadows.iter().any(Shadow::active)
    }

    /// The serving arm shadows are shown.
    pub(super) fn watched_arm(&self) -> usize {
        if self.ab.mode == AbMode::Switchback {
            self.active_switchback_arm()
        } else {
            0
        }
    }

    async fn admit_live(&mut self, a: usize, req: &Request, view: Option<&View>) -> Admission {
        if let (false, Some(view)) = (self.arms[a].fallback, view) {
            let t = std::time::Instant::now();
            let r = self.arms[a].decider.admit(req, view).await;
            self.observe_call(a, "admit", t);
            match r {
                // NaN has no place in any order: nonsense, like an invalid action.
                Ok(Admission::Queue(p)) if p.priority.is_nan() => {
                    self.count_invalid(a, Invalid::BadPriority);
                    let e = PluginError::Invalid {
                        call: "admit",
                        summary: format!("priority NaN for request {}", req.id),
                    };
                    self.eject(a, "admit", &e);
                }
                Ok(adm) => return adm,
                Err(e) => self.eject(a, "admit", &e),
            }
        }
        // No plugin, or it was just ejected: the request is still admitted.
        Fifo::admission(req)
    }

    fn observe_call(&self, a: usize, call: &str, t: std::time::Instant) {
        self.metrics
            .plugin_call
            .get_or_create(&ArmKind {
                arm: self.arms[a].name.to_string(),
                kind: call.into(),
            })
            .observe(t.elapsed().as_secs_f64());
    }

    pub(super) fn count_invalid(&self, a: usize, kind: Invalid) {
        self.metrics
            .invalid_actions
            .get_or_create(&ArmKind {
                arm: self.arms[a].name.to_string(),
                kind: kind.as_str().into(),
            })
            .inc();
    }

    /// Makes a plugin's rejection fit to send, counting what was fixed.
    pub(super) fn tidy(&self, a: usize, r: &mut crate::policy::Rejection) {
        for kind in tidy_rejection(r) {
            self.count_invalid(a, kind);
        }
    }

    /// Ejects an arm's plugin: log, count, and serve the arm with FIFO.
    /// `during` names the call (`admit`, `schedule`) or `watchdog`.
    fn eject(&mut self, a: usize, during: &'static str, e: &PluginError) {
        let arm = &mut self.arms[a];
        tracing::error!(
            arm = %arm.name,
            plugin = %arm.source,
            sha256 = %arm.sha256,
            fault = e.kind(),
            during,
            error = %Escaped(e),
            "policy plugin ejected; this arm is served by the built-in FIFO until a good plugin is loaded"
        );
        arm.last_error = Some(format!("ejected: {e}"));
        arm.decider = Box::new(Fifo);
        arm.fallback = true;
        arm.dirty = true;
        self.metrics
            .plugin_faults
            .get_or_create(&ArmKind {
                arm: arm.name.to_string(),
                kind: e.kind().into(),
            })
            .inc();
    }

    pub(super) fn on_tick(&mut self) {
        let now = Instant::now();
        self.switchback_turn();
        let starvation = Duration::from_millis(self.limits.starvation_ms);
        for a in 0..self.arms.len() {
            let arm = &mut self.arms[a];
            if !arm.waiting.is_empty() {
                arm.dirty = true;
            }
            // Starvation watchdog: every slot of the arm idle while requests
            // wait, and a backend could take them.
            let starving = !arm.waiting.is_empty()
                && arm.busy == 0
                && arm.slots > 0
                && self.fleet.free_total() > 0;
            match (starving, arm.idle_since) {
                (false, _) => arm.idle_since = None,
                (true, None) => arm.idle_since = Some(now),
                (true, Some(t)) if now.duration_since(t) >= starvation => {
                    arm.idle_since = None;
                    if !arm.fallback {
                        let e = PluginError::Starvation {
                            waiting: arm.waiting.len(),
                            idle_ms: now.duration_since(t).as_millis() as u64,
                        };
                        self.eject(a, "watchdog", &e);
                    }
                }
                _ => {}
            }
        }
    }

    pub(super) fn free_slots(&self, a: usize) -> u32 {
        let arm = &self.arms[a];
        // Its own free share, within what the backends that take new
        // starts have free.
        arm.slots
            .saturating_sub(arm.busy)
            .min(self.fleet.free_total())
    }

    /// Asks every arm whose state changed what to do, and does it.
    pub(super) async fn decide(&mut self) {
        for a in 0..self.arms.len() {
            if !self.arms[a].dirty {
                continue;
            }
            self.arms[a].dirty = false;
            if self.arms[a].waiting.is_empty() {
                continue;
            }
            let view = self.view(a);
            let t = std::time::Instant::now();
            let answer = self.arms[a].decider.schedule(&view).await;
            if !self.arms[a].fallback {
                self.observe_call(a, "schedule", t);
            }
            let actions = match answer {
                // The built-in FIFO cannot answer nonsense.
                Ok(actions) if self.arms[a].fallback => actions,
                Ok(actions) => {
                    let arm = &self.arms[a];
                    let inflight = arm.preempting as i64 - arm.handoff.len() as i64;
                    let bad = check_answer(&view, &actions, inflight);
                    if bad.is_empty() {
                        actions
                    } else {
                        // Nothing of a nonsense answer is applied.
                        for (kind, _) in &bad {
                            self.count_invalid(a, *kind);
                        }
                        let e = PluginError::Invalid {
                            call: "schedule",
                            summary: summarize_invalid(&bad, actions.len()),
                        };
                        self.eject(a, "schedule", &e);
                        Fifo::actions(&view)
                    }
                }
                Err(e) => {
                    self.eject(a, "schedule", &e);
                    Fifo::actions(&view)
                }
            };
            if self.watched_by_shadows(a) {
                let arm = &self.arms[a];
                let inflight = arm.preempting as i64 - arm.handoff.len() as i64;
                for s in self.shadows.iter().filter(|s| s.active()) {
                    s.schedule(&view, &actions, inflight);
                }
            }
            self.apply(a, actions);
        }
    }

    /// Applies a checked answer, action by action.
    fn apply(&mut self, a: usize, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Start { id, backend } => self.act_start(a, id, backend),
                Action::Preempt { id, cut_streaming } => self.act_preempt(a, id, cut_streaming),
                Action::Reject { id, mut rejection } => match self.entries.get(&id) {
                    Some(e) if e.arm == a && e.state == State::Waiting => {
                        self.tidy(a, &mut rejection);
                        self.reject_waiting(id, rejection);
                    }
                    _ => self.count_invalid(a, Invalid::UnknownId),
                },
            }
        }
    }
}
