//! The scheduler: the host's single source of truth about requests and slots.
//!
//! One task owns every waiting and running request, the upstream slots and the
//! policy arms; everything else talks to it through messages, so there are no
//! locks around the queue and every decision sees a consistent state. Each
//! request is represented outside the scheduler by a [`Ticket`]: the proxy
//! holds it while the request waits and streams, and dropping it (the client
//! went away) tells the scheduler at once, which frees the slot and asks the
//! policy for the next start in the same turn.
//!
//! Each arm's decisions come from its plugin; a plugin that traps, overruns its
//! budget, or lets every slot idle while requests wait is ejected and the arm is
//! served by the built-in FIFO ([`Fallback`]) until a good plugin is loaded.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{AbConfig, AbMode, Limits, PluginSource};
use crate::metrics::{ArmClass, ArmKind, ArmLabel, Metrics, OutcomeLabels};
use crate::plugin::types::{
    Action, Admission, Backend, Class, Placement, Preemption, RejectWaiting, Rejection, Request,
    Running, Start, View, Waiting,
};
use crate::plugin::{Instance, PluginError};

/// What the proxy knows about a request when it asks for a slot.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    /// HTTP path.
    pub path: String,
    /// `model` from the body.
    pub model: String,
    /// Whether the response streams (with Ollama's defaults applied).
    pub stream: bool,
    /// Raw `X-Priority`.
    pub priority_header: Option<String>,
    /// Tenant, if a tenant header is configured and present.
    pub tenant: Option<String>,
    /// `options.num_predict` / `max_tokens`.
    pub num_predict: Option<i64>,
    /// Body size in bytes.
    pub body_bytes: u64,
    /// Sticky A/B key (header value or client address).
    pub client_key: String,
    /// When the request arrived.
    pub arrival: Instant,
}

/// Reads `X-Priority` the way the design fixes it: `realtime|rt|high` and
/// `batch|be|low`, case-insensitive; anything else is no hint.
pub fn class_hint(header: Option<&str>) -> Option<Class> {
    let v = header?.trim();
    if ["realtime", "rt", "high"]
        .iter()
        .any(|k| v.eq_ignore_ascii_case(k))
    {
        Some(Class::Realtime)
    } else if ["batch", "be", "low"]
        .iter()
        .any(|k| v.eq_ignore_ascii_case(k))
    {
        Some(Class::Batch)
    } else {
        None
    }
}

/// Lower-case name of a class, for logs, labels and JSON.
pub fn class_name(c: Class) -> &'static str {
    match c {
        Class::Realtime => "realtime",
        Class::Batch => "batch",
    }
}

/// How a scheduled request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Answered by the upstream.
    Ok,
    /// The client went away (or a stream was cut by pre-emption).
    Cancelled,
    /// Refused by the policy, a limit or shutdown.
    Rejected,
    /// The upstream failed or was unreachable.
    UpstreamError,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Cancelled => "cancelled",
            Outcome::Rejected => "rejected",
            Outcome::UpstreamError => "upstream_error",
        }
    }
}

/// State shared between the scheduler and the handler of one dispatch.
#[derive(Debug)]
pub struct Run {
    /// When the request was dispatched upstream.
    pub started: Instant,
    upstream_first_byte: OnceLock<Instant>,
    client_first_byte: OnceLock<Instant>,
    tokens: AtomicU64,
    streaming: AtomicBool,
    cut: AtomicBool,
    /// Cancelled when a policy pre-empts this dispatch.
    pub preempt: CancellationToken,
}

impl Run {
    fn new() -> Run {
        Run {
            started: Instant::now(),
            upstream_first_byte: OnceLock::new(),
            client_first_byte: OnceLock::new(),
            tokens: AtomicU64::new(0),
            streaming: AtomicBool::new(false),
            cut: AtomicBool::new(false),
            preempt: CancellationToken::new(),
        }
    }
    /// Marks the upstream's first byte (response headers arrived).
    pub fn mark_upstream_first_byte(&self) {
        let _ = self.upstream_first_byte.set(Instant::now());
    }
    /// Marks the response as started towards the client: from now on a
    /// pre-emption is no longer transparent.
    pub fn mark_streaming(&self) {
        self.streaming.store(true, Ordering::Release);
    }
    /// Marks the first body byte sent to the client.
    pub fn mark_client_first_byte(&self) {
        let _ = self.client_first_byte.set(Instant::now());
    }
    /// Counts one response chunk (≈ one token).
    pub fn add_token(&self) {
        self.tokens.fetch_add(1, Ordering::Relaxed);
    }
    /// Response chunks so far.
    pub fn tokens(&self) -> u64 {
        self.tokens.load(Ordering::Relaxed)
    }
    /// Whether the response has started towards the client.
    pub fn is_streaming(&self) -> bool {
        self.streaming.load(Ordering::Acquire)
    }
    /// True when the policy pre-empted a stream that already reached the
    /// client, which must then end with an error line.
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }
}

/// The go-ahead for a waiting request.
#[derive(Debug, Clone)]
pub struct Grant {
    /// Shared state of this dispatch.
    pub run: Arc<Run>,
    /// Total time spent waiting in maitre so far.
    pub queue_wait: Duration,
    /// How often the request was pre-empted before this dispatch.
    pub preemptions: u32,
}

enum Signal {
    Start(Grant),
    Reject(Rejection),
}

/// Why a request was not queued.
#[derive(Debug, Clone)]
pub enum SubmitError {
    /// The policy (or a plugin fallback) refused it.
    Rejected {
        /// Arm that decided.
        arm: Arc<str>,
        /// Status and message.
        rejection: Rejection,
    },
    /// Too many requests wait already.
    QueueFull,
    /// The host is shutting down.
    ShuttingDown,
}

/// A request's place in the scheduler, held by its HTTP handler. Dropping it
/// before [`Ticket::finish`] means the client went away.
pub struct Ticket {
    id: u64,
    arm: Arc<str>,
    class: Class,
    rx: mpsc::UnboundedReceiver<Signal>,
    tx: mpsc::UnboundedSender<Msg>,
    ended: bool,
}

impl Ticket {
    /// The request id.
    pub fn id(&self) -> u64 {
        self.id
    }
    /// The arm that schedules it.
    pub fn arm(&self) -> &Arc<str> {
        &self.arm
    }
    /// Its class.
    pub fn class(&self) -> Class {
        self.class
    }

    /// Waits until the policy starts the request (or rejects it while waiting).
    pub async fn wait_start(&mut self) -> Result<Grant, Rejection> {
        match self.rx.recv().await {
            Some(Signal::Start(g)) => Ok(g),
            Some(Signal::Reject(r)) => {
                self.ended = true;
                Err(r)
            }
            None => {
                self.ended = true;
                Err(Rejection {
                    status: 503,
                    message: "maitre is shutting down; retry shortly".into(),
                })
            }
        }
    }

    /// The upstream request of a pre-empted dispatch has been aborted: put the
    /// request back in the queue.
    pub fn requeue_after_preempt(&mut self) {
        let _ = self.tx.send(Msg::Requeue {
            id: self.id,
            busy: false,
        });
    }

    /// The upstream answered 503 busy before any byte reached the client: put
    /// the request back in the queue.
    pub fn requeue_after_busy(&mut self) {
        let _ = self.tx.send(Msg::Requeue {
            id: self.id,
            busy: true,
        });
    }

    /// The request ended; `outcome` is logged and counted.
    pub fn finish(mut self, outcome: Outcome) {
        self.ended = true;
        let _ = self.tx.send(Msg::Finished {
            id: self.id,
            outcome,
        });
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.tx.send(Msg::Gone { id: self.id });
        }
    }
}

/// A ready-to-serve arm, built (compiled, instantiated, initialised) off the
/// request path and handed to the scheduler to swap in.
pub struct ArmSpec {
    /// Arm name.
    pub name: String,
    /// Traffic weight.
    pub weight: u32,
    /// The plugin instance, after a successful `init`.
    pub instance: Instance,
    /// Where the plugin came from.
    pub source: PluginSource,
    /// Its sha256.
    pub sha256: String,
}

/// A message to the scheduler task.
enum Msg {
    Submit {
        meta: RequestMeta,
        reply: oneshot::Sender<Result<Ticket, SubmitError>>,
    },
    Gone {
        id: u64,
    },
    Finished {
        id: u64,
        outcome: Outcome,
    },
    Requeue {
        id: u64,
        busy: bool,
    },
    Status {
        reply: oneshot::Sender<Status>,
    },
    Install {
        arms: Vec<ArmSpec>,
        ab: AbConfig,
        reply: oneshot::Sender<()>,
    },
    ReloadFailed {
        error: String,
    },
    SetWeight {
        arm: String,
        weight: u32,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Report {
        window: Duration,
        reply: oneshot::Sender<AbReport>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// Cheap, cloneable handle to the scheduler task.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Msg>,
}

impl SchedulerHandle {
    /// Asks for a place in the queue.
    pub async fn submit(&self, meta: RequestMeta) -> Result<Ticket, SubmitError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Submit { meta, reply })
            .map_err(|_| SubmitError::ShuttingDown)?;
        rx.await.unwrap_or(Err(SubmitError::ShuttingDown))
    }

    /// A snapshot for `/status`.
    pub async fn status(&self) -> Option<Status> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Status { reply }).ok()?;
        rx.await.ok()
    }

    /// Swaps in a new set of arms between two decisions. Waiting and running
    /// requests stay; those of an arm that no longer exists move to the
    /// heaviest remaining arm.
    pub async fn install(&self, arms: Vec<ArmSpec>, ab: AbConfig) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Install { arms, ab, reply }).is_ok() {
            let _ = rx.await;
        }
    }

    /// Records a failed reload (shown in `/status`).
    pub fn reload_failed(&self, error: String) {
        let _ = self.tx.send(Msg::ReloadFailed { error });
    }

    /// Changes an arm's weight live.
    pub async fn set_weight(&self, arm: &str, weight: u32) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::SetWeight {
                arm: arm.to_string(),
                weight,
                reply,
            })
            .map_err(|_| "scheduler stopped".to_string())?;
        rx.await.unwrap_or_else(|_| Err("scheduler stopped".into()))
    }

    /// Per-arm comparison over the last `window`.
    pub async fn report(&self, window: Duration) -> Option<AbReport> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Report { window, reply }).ok()?;
        rx.await.ok()
    }

    /// Stops admitting: waiting requests and new arrivals get 503 + Retry-After;
    /// running ones continue.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Shutdown { reply }).is_ok() {
            let _ = rx.await;
        }
    }
}

/// The built-in FIFO that serves an arm whose plugin was ejected.
pub struct Fallback;

impl Fallback {
    fn admit(req: &Request) -> Admission {
        Admission::Queue(Placement {
            class: req.class_hint.unwrap_or(Class::Batch),
            priority: 0.0,
        })
    }
    fn schedule(view: &View) -> Vec<Action> {
        view.waiting
            .iter()
            .take(view.free_slots as usize)
            .map(|w| {
                Action::Start(Start {
                    id: w.id,
                    backend: None,
                })
            })
            .collect()
    }
}

enum Decider {
    Plugin(Box<Instance>),
    Fallback,
}

struct Arm {
    name: Arc<str>,
    weight: u32,
    slots: u32,
    busy: u32,
    decider: Decider,
    source: PluginSource,
    sha256: String,
    loaded_at: SystemTime,
    last_error: Option<String>,
    waiting: BTreeSet<u64>,
    running: BTreeSet<u64>,
    handoff: VecDeque<u64>,
    preempting: u32,
    dirty: bool,
    idle_since: Option<Instant>,
    samples: VecDeque<Sample>,
}

#[derive(Clone, Copy)]
struct Sample {
    ended: Instant,
    class: Class,
    outcome: Outcome,
    queue_ms: f64,
    ttft_ms: Option<f64>,
}

const MAX_SAMPLES: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Handoff,
    Running,
    Preempting,
}

struct Entry {
    arm: usize,
    meta: RequestMeta,
    class: Class,
    priority: f64,
    arrival_ms: u64,
    enqueued_at: Instant,
    queued_total: Duration,
    preemptions: u32,
    busy_retries: u32,
    state: State,
    run: Option<Arc<Run>>,
    first_upstream_ttfb: Option<Duration>,
    tx: mpsc::UnboundedSender<Signal>,
}

struct Core {
    origin: Instant,
    arms: Vec<Arm>,
    ab: AbConfig,
    entries: HashMap<u64, Entry>,
    total_slots: u32,
    busy: u32,
    next_id: u64,
    limits: Limits,
    metrics: Arc<Metrics>,
    self_tx: mpsc::UnboundedSender<Msg>,
    draining: bool,
    reload_error: Option<String>,
    upstream_name: String,
}

/// Starts the scheduler task.
pub fn spawn(
    arms: Vec<ArmSpec>,
    ab: AbConfig,
    total_slots: u32,
    limits: Limits,
    upstream_name: String,
    metrics: Arc<Metrics>,
) -> SchedulerHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut core = Core {
        origin: Instant::now(),
        arms: Vec::new(),
        ab,
        entries: HashMap::new(),
        total_slots,
        busy: 0,
        next_id: 1,
        limits,
        metrics,
        self_tx: tx.clone(),
        draining: false,
        reload_error: None,
        upstream_name,
    };
    core.metrics.slots_total.set(total_slots as i64);
    core.install(arms);
    tokio::spawn(core.run(rx));
    SchedulerHandle { tx }
}

impl Core {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.limits.tick_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                m = rx.recv() => {
                    let Some(m) = m else { break };
                    self.handle(m).await;
                    // Take everything already queued before deciding once.
                    while let Ok(m) = rx.try_recv() {
                        self.handle(m).await;
                    }
                }
                _ = tick.tick() => self.on_tick(),
            }
            self.decide().await;
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    fn ms_of(&self, t: Instant) -> u64 {
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
            Msg::Requeue { id, busy } => self.requeue(id, busy),
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
                let r = match self.arms.iter_mut().find(|a| *a.name == *arm) {
                    None => Err(format!("no arm named {arm:?}")),
                    Some(a) => {
                        a.weight = weight;
                        Ok(())
                    }
                };
                if r.is_ok() {
                    if self.arms.iter().all(|a| a.weight == 0) {
                        // Refuse to stop serving altogether: undo.
                        if let Some(a) = self.arms.iter_mut().find(|a| *a.name == *arm) {
                            a.weight = 1;
                        }
                        let _ = reply.send(Err(
                            "every arm would have weight 0; at least one arm must serve".into(),
                        ));
                        return;
                    }
                    self.share_slots();
                }
                let _ = reply.send(r);
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
                    self.reject_waiting(
                        id,
                        Rejection {
                            status: 503,
                            message: "maitre is shutting down; retry shortly".into(),
                        },
                    );
                }
                let _ = reply.send(());
            }
        }
    }

    /// Replaces the arms; requests of vanished arms move to the heaviest arm.
    fn install(&mut self, specs: Vec<ArmSpec>) {
        let old: Vec<Arm> = std::mem::take(&mut self.arms);
        for s in specs {
            self.arms.push(Arm {
                name: s.name.into(),
                weight: s.weight,
                slots: 0,
                busy: 0,
                decider: Decider::Plugin(Box::new(s.instance)),
                source: s.source,
                sha256: s.sha256,
                loaded_at: SystemTime::now(),
                last_error: None,
                waiting: BTreeSet::new(),
                running: BTreeSet::new(),
                handoff: VecDeque::new(),
                preempting: 0,
                dirty: true,
                idle_since: None,
                samples: VecDeque::new(),
            });
        }
        let heaviest = (0..self.arms.len())
            .max_by_key(|&i| self.arms[i].weight)
            .unwrap_or(0);
        let mut moved = vec![usize::MAX; old.len()];
        for (i, mut o) in old.into_iter().enumerate() {
            let to = self
                .arms
                .iter()
                .position(|a| a.name == o.name)
                .unwrap_or(heaviest);
            moved[i] = to;
            let a = &mut self.arms[to];
            if a.name == o.name {
                a.samples = std::mem::take(&mut o.samples);
            }
            a.busy += o.busy;
            a.preempting += o.preempting;
            a.waiting.extend(o.waiting.iter().copied());
            a.running.extend(o.running.iter().copied());
            a.handoff.extend(o.handoff.iter().copied());
        }
        for e in self.entries.values_mut() {
            e.arm = moved[e.arm];
        }
        self.share_slots();
    }

    /// Gives each arm its share of the slots (see [`slot_shares`]).
    fn share_slots(&mut self) {
        if self.arms.is_empty() {
            return;
        }
        let weights: Vec<u32> = self.arms.iter().map(|a| a.weight).collect();
        let active = (self.ab.mode == AbMode::Switchback).then(|| self.active_switchback_arm());
        let shares = slot_shares(self.total_slots, &weights, active);
        for (a, s) in self.arms.iter_mut().zip(shares) {
            if a.slots != s {
                a.slots = s;
                a.dirty = true;
            }
        }
    }

    /// The arm that owns the upstream in the current switchback window.
    /// Live arms (weight > 0) take turns; a cycle lasts `window_seconds` per
    /// live arm and each arm's turn is proportional to its weight, so with
    /// 50/50 and 60 s windows A serves 0–60 s, B 60–120 s, and so on.
    fn active_switchback_arm(&self) -> usize {
        let live = self.arms.iter().filter(|a| a.weight > 0).count() as u64;
        let total: u64 = self.arms.iter().map(|a| a.weight as u64).sum();
        if live == 0 || total == 0 {
            return 0;
        }
        let cycle_ms = ((self.ab.window_seconds * 1000.0) as u64).max(1) * live;
        let pos = (self.now_ms() % cycle_ms) as u128 * total as u128 / cycle_ms as u128;
        let mut acc = 0u128;
        for (i, a) in self.arms.iter().enumerate() {
            acc += a.weight as u128;
            if pos < acc {
                return i;
            }
        }
        0
    }

    /// At a switchback window change the new arm takes every slot, and the
    /// requests still waiting in other arms move to it (running ones finish
    /// where they are), so no request waits for its arm's next turn.
    fn switchback_turn(&mut self) {
        let active = self.active_switchback_arm();
        if self.arms[active].slots == self.total_slots {
            return;
        }
        self.share_slots();
        for a in 0..self.arms.len() {
            if a == active || self.arms[a].waiting.is_empty() {
                continue;
            }
            let ids = std::mem::take(&mut self.arms[a].waiting);
            let from = ArmLabel {
                arm: self.arms[a].name.to_string(),
            };
            let to = ArmLabel {
                arm: self.arms[active].name.to_string(),
            };
            self.metrics
                .waiting
                .get_or_create(&from)
                .dec_by(ids.len() as i64);
            self.metrics
                .waiting
                .get_or_create(&to)
                .inc_by(ids.len() as i64);
            for id in &ids {
                if let Some(e) = self.entries.get_mut(id) {
                    e.arm = active;
                }
            }
            self.arms[active].waiting.extend(ids);
            self.arms[active].dirty = true;
        }
    }

    fn pick_arm(&self, key: &str) -> usize {
        if self.arms.len() == 1 {
            return 0;
        }
        if self.ab.mode == AbMode::Switchback {
            return self.active_switchback_arm();
        }
        let total: u64 = self.arms.iter().map(|a| a.weight as u64).sum();
        let mut h = std::hash::DefaultHasher::new();
        key.hash(&mut h);
        let point = h.finish() % total.max(1);
        let mut acc = 0;
        for (i, a) in self.arms.iter().enumerate() {
            acc += a.weight as u64;
            if point < acc {
                return i;
            }
        }
        0
    }

    fn waiting_count(&self) -> usize {
        self.arms
            .iter()
            .map(|a| a.waiting.len() + a.handoff.len())
            .sum()
    }

    async fn submit(&mut self, meta: RequestMeta) -> Result<Ticket, SubmitError> {
        if self.draining {
            return Err(SubmitError::ShuttingDown);
        }
        if self.waiting_count() >= self.limits.max_waiting {
            return Err(SubmitError::QueueFull);
        }
        let id = self.next_id;
        self.next_id += 1;
        let a = self.pick_arm(&meta.client_key);
        let arrival_ms = self.ms_of(meta.arrival);
        let req = Request {
            id,
            path: meta.path.clone(),
            model: meta.model.clone(),
            stream: meta.stream,
            priority_header: meta.priority_header.clone(),
            class_hint: class_hint(meta.priority_header.as_deref()),
            tenant: meta.tenant.clone(),
            num_predict: meta.num_predict,
            body_bytes: meta.body_bytes,
            arrival_ms,
        };
        let admission = self.admit(a, &req).await;
        let name = self.arms[a].name.clone();
        let placement = match admission {
            Admission::Queue(p) => p,
            Admission::Reject(mut r) => {
                if !(400..=599).contains(&r.status) {
                    r.status = 503;
                }
                let class = req.class_hint.unwrap_or(Class::Batch);
                self.record_end(
                    a,
                    class,
                    &meta,
                    Duration::ZERO,
                    None,
                    None,
                    Outcome::Rejected,
                    0,
                );
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
        let (stx, srx) = mpsc::unbounded_channel();
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
                state: State::Waiting,
                run: None,
                first_upstream_ttfb: None,
                tx: stx,
                meta,
            },
        );
        let arm = &mut self.arms[a];
        arm.waiting.insert(id);
        arm.dirty = true;
        self.metrics
            .waiting
            .get_or_create(&ArmLabel {
                arm: name.to_string(),
            })
            .inc();
        Ok(Ticket {
            id,
            arm: name,
            class: placement.class,
            rx: srx,
            tx: self.self_tx.clone(),
            ended: false,
        })
    }

    async fn admit(&mut self, a: usize, req: &Request) -> Admission {
        if let Decider::Plugin(_) = self.arms[a].decider {
            let view = self.view(a);
            let t = Instant::now();
            let Decider::Plugin(inst) = &mut self.arms[a].decider else {
                unreachable!()
            };
            let r = inst.admit(req, &view).await;
            self.observe_call(a, "admit", t);
            match r {
                Ok(Admission::Queue(p)) if !p.priority.is_finite() => {
                    self.count_invalid(a, "bad_priority");
                    return Admission::Queue(Placement {
                        class: p.class,
                        priority: 0.0,
                    });
                }
                Ok(adm) => return adm,
                Err(e) => self.eject(a, &e),
            }
        }
        Fallback::admit(req)
    }

    fn observe_call(&self, a: usize, call: &str, t: Instant) {
        self.metrics
            .plugin_call
            .get_or_create(&ArmKind {
                arm: self.arms[a].name.to_string(),
                kind: call.into(),
            })
            .observe(t.elapsed().as_secs_f64());
    }

    fn count_invalid(&self, a: usize, kind: &str) {
        self.metrics
            .invalid_actions
            .get_or_create(&ArmKind {
                arm: self.arms[a].name.to_string(),
                kind: kind.into(),
            })
            .inc();
    }

    /// Ejects an arm's plugin: log, count, and serve the arm with FIFO.
    fn eject(&mut self, a: usize, e: &PluginError) {
        let arm = &mut self.arms[a];
        tracing::error!(
            arm = %arm.name,
            plugin = %arm.source,
            sha256 = %arm.sha256,
            fault = e.kind(),
            error = %e,
            "policy plugin ejected; this arm is served by the built-in FIFO until a good plugin is loaded"
        );
        arm.last_error = Some(format!("ejected: {e}"));
        arm.decider = Decider::Fallback;
        arm.dirty = true;
        self.metrics
            .plugin_faults
            .get_or_create(&ArmKind {
                arm: arm.name.to_string(),
                kind: e.kind().into(),
            })
            .inc();
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        if self.ab.mode == AbMode::Switchback && self.arms.len() > 1 {
            self.switchback_turn();
        }
        let starvation = Duration::from_millis(self.limits.starvation_ms);
        for a in 0..self.arms.len() {
            let arm = &mut self.arms[a];
            if !arm.waiting.is_empty() {
                arm.dirty = true;
            }
            // Starvation watchdog: every slot of the arm idle while requests wait.
            let starving = !arm.waiting.is_empty()
                && arm.busy == 0
                && arm.slots > 0
                && self.busy < self.total_slots;
            match (starving, arm.idle_since) {
                (false, _) => arm.idle_since = None,
                (true, None) => arm.idle_since = Some(now),
                (true, Some(t)) if now.duration_since(t) >= starvation => {
                    arm.idle_since = None;
                    if matches!(arm.decider, Decider::Plugin(_)) {
                        let e = PluginError::Trap(format!(
                            "starvation: {} request(s) waited {} ms with every slot of the arm idle",
                            arm.waiting.len(),
                            starvation.as_millis()
                        ));
                        self.eject(a, &e);
                        self.metrics
                            .plugin_faults
                            .get_or_create(&ArmKind {
                                arm: self.arms[a].name.to_string(),
                                kind: "starvation".into(),
                            })
                            .inc();
                    }
                }
                _ => {}
            }
        }
    }

    fn free_slots(&self, a: usize) -> u32 {
        let arm = &self.arms[a];
        arm.slots
            .saturating_sub(arm.busy)
            .min(self.total_slots.saturating_sub(self.busy))
    }

    /// Builds the plugin's snapshot of one arm.
    fn view(&self, a: usize) -> View {
        let arm = &self.arms[a];
        let now_ms = self.now_ms();
        let free = self.free_slots(a);
        let waiting = arm
            .waiting
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
        let running = arm
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
                    backend: 0,
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
        View {
            now_ms,
            total_slots: arm.slots,
            free_slots: free,
            backends: vec![Backend {
                name: self.upstream_name.clone(),
                total_slots: arm.slots,
                free_slots: free,
            }],
            running,
            waiting,
        }
    }

    /// Asks every arm whose state changed what to do, and does it.
    async fn decide(&mut self) {
        for a in 0..self.arms.len() {
            if !self.arms[a].dirty {
                continue;
            }
            self.arms[a].dirty = false;
            if self.arms[a].waiting.is_empty() {
                continue;
            }
            let view = self.view(a);
            let actions = match &mut self.arms[a].decider {
                Decider::Fallback => Fallback::schedule(&view),
                Decider::Plugin(inst) => {
                    let t = Instant::now();
                    let r = inst.schedule(&view).await;
                    self.observe_call(a, "schedule", t);
                    match r {
                        Ok(actions) => actions,
                        Err(e) => {
                            self.eject(a, &e);
                            Fallback::schedule(&view)
                        }
                    }
                }
            };
            self.apply(a, actions, view.waiting.len());
        }
    }

    fn apply(&mut self, a: usize, actions: Vec<Action>, waiting_len: usize) {
        // A plugin cannot usefully return more actions than there are requests.
        let cap = waiting_len + self.arms[a].running.len() + 16;
        if actions.len() > cap {
            self.count_invalid(a, "too_many_actions");
        }
        for action in actions.into_iter().take(cap) {
            match action {
                Action::Start(Start { id, .. }) => self.act_start(a, id),
                Action::Preempt(Preemption { id, cut_streaming }) => {
                    self.act_preempt(a, id, cut_streaming)
                }
                Action::Reject(RejectWaiting { id, mut rejection }) => {
                    match self.entries.get(&id) {
                        Some(e) if e.arm == a && e.state == State::Waiting => {
                            if !(400..=599).contains(&rejection.status) {
                                rejection.status = 503;
                            }
                            self.reject_waiting(id, rejection);
                        }
                        _ => self.count_invalid(a, "unknown_id"),
                    }
                }
            }
        }
    }

    fn act_start(&mut self, a: usize, id: u64) {
        match self.entries.get(&id) {
            Some(e) if e.arm == a && e.state == State::Waiting => {}
            Some(e)
                if e.arm == a
                    && matches!(e.state, State::Running | State::Handoff | State::Preempting) =>
            {
                return self.count_invalid(a, "duplicate_start");
            }
            _ => return self.count_invalid(a, "unknown_id"),
        }
        if self.free_slots(a) > 0 {
            self.dispatch(id);
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
            self.count_invalid(a, "no_free_slot");
        }
    }

    fn act_preempt(&mut self, a: usize, id: u64, cut: bool) {
        let max = self.limits.max_preemptions;
        let Some(e) = self.entries.get_mut(&id) else {
            return self.count_invalid(a, "unknown_id");
        };
        if e.arm != a || e.state != State::Running {
            return self.count_invalid(a, "unknown_id");
        }
        let run = e.run.clone().expect("running entries have a run");
        let streaming = run.is_streaming();
        if streaming && !cut {
            return self.count_invalid(a, "preempt_streaming");
        }
        if !streaming && e.preemptions >= max {
            return self.count_invalid(a, "preempt_bound");
        }
        e.state = State::Preempting;
        let tokens = run.tokens();
        let (arm_name, class, model) = (self.arms[a].name.clone(), e.class, e.meta.model.clone());
        if streaming {
            run.cut.store(true, Ordering::Release);
        }
        run.preempt.cancel();
        self.arms[a].preempting += 1;
        self.metrics
            .preemptions
            .get_or_create(&ArmLabel {
                arm: arm_name.to_string(),
            })
            .inc();
        self.metrics
            .preempted_tokens
            .get_or_create(&ArmLabel {
                arm: arm_name.to_string(),
            })
            .inc_by(tokens);
        tracing::info!(
            target: "maitre::preempt",
            id,
            arm = %arm_name,
            class = class_name(class),
            model = %model,
            tokens_thrown_away = tokens,
            cut_stream = streaming,
            "pre-empted"
        );
    }

    fn dispatch(&mut self, id: u64) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        let a = e.arm;
        let run = Arc::new(Run::new());
        e.queued_total += e.enqueued_at.elapsed();
        e.state = State::Running;
        e.run = Some(run.clone());
        let grant = Grant {
            run,
            queue_wait: e.queued_total,
            preemptions: e.preemptions,
        };
        let _ = e.tx.send(Signal::Start(grant));
        let arm = &mut self.arms[a];
        arm.waiting.remove(&id);
        arm.running.insert(id);
        arm.busy += 1;
        arm.idle_since = None;
        self.busy += 1;
        self.metrics.slots_busy.set(self.busy as i64);
        self.metrics
            .waiting
            .get_or_create(&ArmLabel {
                arm: arm.name.to_string(),
            })
            .dec();
    }

    /// Releases the slot of a running (or pre-empting) request and hands it on
    /// to a request waiting for a pre-empted slot, at once.
    fn release_slot(&mut self, id: u64, was: State) {
        let Some(e) = self.entries.get(&id) else {
            return;
        };
        let a = e.arm;
        let arm = &mut self.arms[a];
        arm.running.remove(&id);
        arm.busy = arm.busy.saturating_sub(1);
        self.busy = self.busy.saturating_sub(1);
        arm.dirty = true;
        if was == State::Preempting {
            arm.preempting = arm.preempting.saturating_sub(1);
            if let Some(next) = arm.handoff.pop_front() {
                if let Some(n) = self.entries.get_mut(&next) {
                    n.state = State::Waiting;
                    self.dispatch_handoff(next);
                }
            }
        }
        self.metrics.slots_busy.set(self.busy as i64);
    }

    fn dispatch_handoff(&mut self, id: u64) {
        // `dispatch` expects the id in `waiting`; a handoff entry is not there.
        if let Some(e) = self.entries.get(&id) {
            let a = e.arm;
            self.arms[a].waiting.insert(id);
            self.metrics
                .waiting
                .get_or_create(&ArmLabel {
                    arm: self.arms[a].name.to_string(),
                })
                .inc();
            self.dispatch(id);
        }
    }

    fn gone(&mut self, id: u64) {
        let Some(e) = self.entries.get(&id) else {
            return;
        };
        let state = e.state;
        match state {
            State::Waiting | State::Handoff => self.remove_waiting(id),
            State::Running | State::Preempting => self.release_slot(id, state),
        }
        self.end(id, Outcome::Cancelled);
    }

    fn remove_waiting(&mut self, id: u64) {
        let Some(e) = self.entries.get(&id) else {
            return;
        };
        let a = e.arm;
        let arm = &mut self.arms[a];
        let was_waiting = arm.waiting.remove(&id);
        if let Some(pos) = arm.handoff.iter().position(|x| *x == id) {
            arm.handoff.remove(pos);
        }
        arm.dirty = true;
        let _ = was_waiting;
        self.metrics
            .waiting
            .get_or_create(&ArmLabel {
                arm: arm.name.to_string(),
            })
            .dec();
    }

    fn finished(&mut self, id: u64, outcome: Outcome) {
        let Some(e) = self.entries.get(&id) else {
            return;
        };
        let state = e.state;
        match state {
            State::Running | State::Preempting => self.release_slot(id, state),
            State::Waiting | State::Handoff => self.remove_waiting(id),
        }
        self.end(id, outcome);
    }

    fn requeue(&mut self, id: u64, busy: bool) {
        let Some(e) = self.entries.get(&id) else {
            return;
        };
        let state = e.state;
        if !matches!(state, State::Running | State::Preempting) {
            return;
        }
        self.release_slot(id, state);
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        if let Some(run) = e.run.take() {
            if e.first_upstream_ttfb.is_none() {
                e.first_upstream_ttfb = run
                    .upstream_first_byte
                    .get()
                    .map(|t| t.duration_since(run.started));
            }
        }
        if busy {
            e.busy_retries += 1;
            self.metrics.upstream_busy_retries.inc();
        } else {
            e.preemptions += 1;
        }
        e.state = State::Waiting;
        e.enqueued_at = Instant::now();
        let a = e.arm;
        let arm = &mut self.arms[a];
        arm.waiting.insert(id);
        arm.dirty = true;
        self.metrics
            .waiting
            .get_or_create(&ArmLabel {
                arm: arm.name.to_string(),
            })
            .inc();
    }

    fn reject_waiting(&mut self, id: u64, rejection: Rejection) {
        self.remove_waiting(id);
        if let Some(e) = self.entries.get(&id) {
            let _ = e.tx.send(Signal::Reject(rejection));
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
        let (upstream_ttfb, client_ttfb) = match &e.run {
            Some(r) => (
                r.upstream_first_byte
                    .get()
                    .map(|t| t.duration_since(r.started))
                    .or(e.first_upstream_ttfb),
                r.client_first_byte
                    .get()
                    .map(|t| t.duration_since(e.meta.arrival)),
            ),
            None => (e.first_upstream_ttfb, None),
        };
        self.record_end(
            e.arm,
            e.class,
            &e.meta,
            queued,
            upstream_ttfb,
            client_ttfb,
            outcome,
            e.preemptions,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn record_end(
        &mut self,
        a: usize,
        class: Class,
        meta: &RequestMeta,
        queued: Duration,
        upstream_ttfb: Option<Duration>,
        client_ttfb: Option<Duration>,
        outcome: Outcome,
        preemptions: u32,
    ) {
        let arm = &mut self.arms[a];
        let total = meta.arrival.elapsed();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        tracing::info!(
            target: "maitre::request",
            arm = %arm.name,
            class = class_name(class),
            path = %meta.path,
            model = %meta.model,
            queue_ms = ms(queued),
            upstream_ttfb_ms = upstream_ttfb.map(ms),
            client_ttfb_ms = client_ttfb.map(ms),
            total_ms = ms(total),
            preemptions,
            outcome = outcome.as_str(),
            "request ended"
        );
        let ac = ArmClass {
            arm: arm.name.to_string(),
            class: class_name(class).into(),
        };
        self.metrics
            .requests
            .get_or_create(&OutcomeLabels {
                arm: ac.arm.clone(),
                class: ac.class.clone(),
                outcome: outcome.as_str().into(),
            })
            .inc();
        if outcome != Outcome::Rejected {
            self.metrics
                .queue_wait
                .get_or_create(&ac)
                .observe(queued.as_secs_f64());
        }
        if let Some(d) = upstream_ttfb {
            self.metrics
                .upstream_ttfb
                .get_or_create(&ac)
                .observe(d.as_secs_f64());
        }
        if let Some(d) = client_ttfb {
            self.metrics
                .client_ttfb
                .get_or_create(&ac)
                .observe(d.as_secs_f64());
        }
        self.metrics
            .total_time
            .get_or_create(&ac)
            .observe(total.as_secs_f64());
        if arm.samples.len() >= MAX_SAMPLES {
            arm.samples.pop_front();
        }
        arm.samples.push_back(Sample {
            ended: Instant::now(),
            class,
            outcome,
            queue_ms: ms(queued),
            ttft_ms: client_ttfb.map(ms),
        });
    }

    fn status(&self) -> Status {
        let now = Instant::now();
        let mut requests: Vec<RequestStatus> = self
            .entries
            .iter()
            .map(|(id, e)| RequestStatus {
                id: *id,
                arm: self.arms[e.arm].name.to_string(),
                class: class_name(e.class),
                state: match e.state {
                    State::Waiting => "waiting",
                    State::Handoff => "handoff",
                    State::Running => "running",
                    State::Preempting => "preempting",
                },
                path: e.meta.path.clone(),
                model: e.meta.model.clone(),
                age_ms: now.duration_since(e.meta.arrival).as_millis() as u64,
                preemptions: e.preemptions,
                tokens: e.run.as_ref().map(|r| r.tokens()).unwrap_or(0),
            })
            .collect();
        requests.sort_by_key(|r| r.id);
        Status {
            slots: self.total_slots,
            slots_busy: self.busy,
            waiting: self.waiting_count(),
            draining: self.draining,
            ab_mode: match self.ab.mode {
                AbMode::Weighted => "weighted",
                AbMode::Switchback => "switchback",
            },
            last_reload_error: self.reload_error.clone(),
            arms: self
                .arms
                .iter()
                .map(|a| ArmStatus {
                    name: a.name.to_string(),
                    weight: a.weight,
                    slots: a.slots,
                    busy: a.busy,
                    waiting: a.waiting.len() + a.handoff.len(),
                    plugin: a.source.to_string(),
                    plugin_sha256: a.sha256.clone(),
                    loaded_at_unix: a
                        .loaded_at
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs_f64())
                        .unwrap_or(0.0),
                    fallback: matches!(a.decider, Decider::Fallback),
                    last_error: a.last_error.clone(),
                })
                .collect(),
            requests,
        }
    }

    fn report(&self, window: Duration) -> AbReport {
        let now = Instant::now();
        let mut arms = Vec::new();
        for a in &self.arms {
            for class in [Class::Realtime, Class::Batch] {
                let s: Vec<&Sample> = a
                    .samples
                    .iter()
                    .filter(|s| s.class == class && now.duration_since(s.ended) <= window)
                    .collect();
                let mut ttft: Vec<f64> = s.iter().filter_map(|s| s.ttft_ms).collect();
                ttft.sort_by(|x, y| x.total_cmp(y));
                let mut queue: Vec<f64> = s
                    .iter()
                    .filter(|s| s.outcome != Outcome::Rejected)
                    .map(|s| s.queue_ms)
                    .collect();
                queue.sort_by(|x, y| x.total_cmp(y));
                let ok = s.iter().filter(|s| s.outcome == Outcome::Ok).count();
                let span_min = window
                    .as_secs_f64()
                    .min(self.origin.elapsed().as_secs_f64())
                    .max(1e-9)
                    / 60.0;
                arms.push(AbRow {
                    arm: a.name.to_string(),
                    class: class_name(class).to_string(),
                    requests: s.len(),
                    ok,
                    rejected: s.iter().filter(|s| s.outcome == Outcome::Rejected).count(),
                    cancelled: s.iter().filter(|s| s.outcome == Outcome::Cancelled).count(),
                    upstream_errors: s
                        .iter()
                        .filter(|s| s.outcome == Outcome::UpstreamError)
                        .count(),
                    ttft_samples: ttft.len(),
                    ttft_p50_ms: percentile(&ttft, 0.50),
                    ttft_p95_ms: percentile(&ttft, 0.95),
                    ttft_p99_ms: percentile(&ttft, 0.99),
                    queue_p50_ms: percentile(&queue, 0.50),
                    queue_p95_ms: percentile(&queue, 0.95),
                    completions_per_min: ok as f64 / span_min,
                });
            }
        }
        AbReport {
            window_seconds: window.as_secs_f64(),
            rows: arms,
        }
    }
}

/// Splits `total` slots between arms of the given weights.
///
/// Weighted mode (`active` = None): each arm with a weight gets one slot, then
/// the rest go in proportion to weight (largest remainder, ties to the earlier
/// arm), so each arm schedules its own share and neither can crowd the other
/// out: the comparison measures the policies, not who grabbed the slots first.
/// Switchback (`active` = Some(i)): arm i owns every slot.
pub fn slot_shares(total: u32, weights: &[u32], active: Option<usize>) -> Vec<u32> {
    let n = weights.len();
    let mut shares = vec![0u32; n];
    if let Some(i) = active {
        if i < n {
            shares[i] = total;
        }
        return shares;
    }
    let live: Vec<usize> = (0..n).filter(|&i| weights[i] > 0).collect();
    let total_w: u64 = live.iter().map(|&i| weights[i] as u64).sum::<u64>().max(1);
    let mut left = total;
    for &i in &live {
        if left > 0 {
            shares[i] = 1;
            left -= 1;
        }
    }
    let extra = left as u64;
    let mut rems: Vec<(u64, usize)> = Vec::new();
    for &i in &live {
        let exact = extra * weights[i] as u64;
        let whole = (exact / total_w) as u32;
        shares[i] += whole;
        left -= whole;
        rems.push((exact % total_w, i));
    }
    rems.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, i) in rems {
        if left == 0 {
            break;
        }
        shares[i] += 1;
        left -= 1;
    }
    shares
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// `/status` JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Upstream slots.
    pub slots: u32,
    /// Slots in use.
    pub slots_busy: u32,
    /// Requests waiting, all arms.
    pub waiting: usize,
    /// Shutting down.
    pub draining: bool,
    /// `weighted` or `switchback`.
    pub ab_mode: &'static str,
    /// The last reload's error, until a reload succeeds.
    pub last_reload_error: Option<String>,
    /// Arms.
    pub arms: Vec<ArmStatus>,
    /// Waiting and running requests.
    pub requests: Vec<RequestStatus>,
}

/// One arm in `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct ArmStatus {
    /// Name.
    pub name: String,
    /// Weight.
    pub weight: u32,
    /// Slots it owns now.
    pub slots: u32,
    /// Of which in use.
    pub busy: u32,
    /// Requests waiting.
    pub waiting: usize,
    /// Plugin path or `builtin:NAME`.
    pub plugin: String,
    /// sha256 of the plugin.
    pub plugin_sha256: String,
    /// Unix time it was loaded.
    pub loaded_at_unix: f64,
    /// True when the plugin was ejected and FIFO serves.
    pub fallback: bool,
    /// Last fault.
    pub last_error: Option<String>,
}

/// One request in `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct RequestStatus {
    /// Id.
    pub id: u64,
    /// Arm.
    pub arm: String,
    /// Class.
    pub class: &'static str,
    /// `waiting`, `running`, `preempting`, `handoff`.
    pub state: &'static str,
    /// Path.
    pub path: String,
    /// Model.
    pub model: String,
    /// Time since arrival.
    pub age_ms: u64,
    /// Pre-emptions so far.
    pub preemptions: u32,
    /// Chunks received so far.
    pub tokens: u64,
}

/// A/B comparison over a window.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AbReport {
    /// Window length.
    pub window_seconds: f64,
    /// One row per arm and class.
    pub rows: Vec<AbRow>,
}

/// One arm × class row of an [`AbReport`].
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AbRow {
    /// Arm.
    pub arm: String,
    /// Class.
    pub class: String,
    /// Requests that ended in the window.
    pub requests: usize,
    /// Of which answered.
    pub ok: usize,
    /// Rejected.
    pub rejected: usize,
    /// Cancelled by the client.
    pub cancelled: usize,
    /// Upstream errors.
    pub upstream_errors: usize,
    /// Requests with a TTFT sample.
    pub ttft_samples: usize,
    /// TTFT percentiles (ms).
    pub ttft_p50_ms: Option<f64>,
    /// p95.
    pub ttft_p95_ms: Option<f64>,
    /// p99.
    pub ttft_p99_ms: Option<f64>,
    /// Queue wait p50 (ms).
    pub queue_p50_ms: Option<f64>,
    /// Queue wait p95 (ms).
    pub queue_p95_ms: Option<f64>,
    /// Completed requests per minute.
    pub completions_per_min: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_header_mapping() {
        for v in ["realtime", "RT", "High", " rt "] {
            assert_eq!(class_hint(Some(v)), Some(Class::Realtime), "{v}");
        }
        for v in ["batch", "BE", "low"] {
            assert_eq!(class_hint(Some(v)), Some(Class::Batch), "{v}");
        }
        assert_eq!(class_hint(Some("urgent")), None);
        assert_eq!(class_hint(None), None);
    }

    #[test]
    fn slot_shares_are_fair_and_complete() {
        assert_eq!(slot_shares(2, &[100], None), vec![2]);
        assert_eq!(slot_shares(2, &[50, 50], None), vec![1, 1]);
        assert_eq!(slot_shares(4, &[50, 50], None), vec![2, 2]);
        assert_eq!(slot_shares(5, &[75, 25], None), vec![4, 1]);
        assert_eq!(slot_shares(3, &[100, 0], None), vec![3, 0]);
        assert_eq!(slot_shares(4, &[50, 50], Some(1)), vec![0, 4]);
        for total in 1..10 {
            let s = slot_shares(total, &[30, 50, 20], None);
            assert_eq!(s.iter().sum::<u32>(), total.max(0));
        }
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(|x| x as f64).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
