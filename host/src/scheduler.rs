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
//! budget or memory, answers with nonsense (see `check_answer`; nothing of
//! such an answer is applied), or lets every slot idle while requests wait is
//! ejected on that first fault: logged, counted in `maitre_plugin_faults`, and
//! the arm is served by the built-in FIFO ([`Fallback`]) until a plugin is
//! loaded again (a reload). A request whose `admit` faulted is admitted by the
//! FIFO, so a fault never costs a request.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
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

/// [`Run`] phase: sent upstream, nothing sent to the client yet.
const PHASE_DISPATCHED: u8 = 0;
/// [`Run`] phase: the response has started towards the client.
const PHASE_STREAMING: u8 = 1;
/// [`Run`] phase: pre-empted before anything reached the client; requeued.
const PHASE_REQUEUED: u8 = 2;

/// State shared between the scheduler and the handler of one dispatch.
#[derive(Debug)]
pub struct Run {
    /// When the request was dispatched upstream.
    pub started: Instant,
    upstream_first_byte: OnceLock<Instant>,
    client_first_byte: OnceLock<Instant>,
    tokens: AtomicU64,
    /// [`PHASE_DISPATCHED`], [`PHASE_STREAMING`] or [`PHASE_REQUEUED`]: one
    /// atomic, so a transparent pre-emption and the response starting towards
    /// the client cannot both win.
    phase: AtomicU8,
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
            phase: AtomicU8::new(PHASE_DISPATCHED),
            cut: AtomicBool::new(false),
            preempt: CancellationToken::new(),
        }
    }
    /// Marks the upstream's first byte (response headers arrived).
    pub fn mark_upstream_first_byte(&self) {
        let _ = self.upstream_first_byte.set(Instant::now());
    }
    /// Marks the response as started towards the client: from now on a
    /// pre-emption is no longer transparent. False when a transparent
    /// pre-emption got there first: the response must then be dropped and
    /// the request requeued.
    #[must_use]
    pub fn mark_streaming(&self) -> bool {
        match self.phase.compare_exchange(
            PHASE_DISPATCHED,
            PHASE_STREAMING,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => true,
            Err(phase) => phase == PHASE_STREAMING,
        }
    }
    /// Claims a transparent pre-emption (requeue); false when the response
    /// has already started towards the client.
    fn claim_requeue(&self) -> bool {
        match self.phase.compare_exchange(
            PHASE_DISPATCHED,
            PHASE_REQUEUED,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => true,
            Err(phase) => phase == PHASE_REQUEUED,
        }
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
        self.phase.load(Ordering::Acquire) == PHASE_STREAMING
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
    /// The arm that started it (it may have moved from the arm that admitted
    /// it when an arm drained or a switchback window turned).
    pub arm: Arc<str>,
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
                let r = match self.arms.iter().position(|a| *a.name == *arm) {
                    None => Err(format!("no arm named {arm:?}")),
                    // Refuse to stop serving altogether; the weight stays.
                    Some(i)
                        if weight == 0
                            && self
                                .arms
                                .iter()
                                .enumerate()
                                .all(|(j, a)| j == i || a.weight == 0) =>
                    {
                        Err(format!(
                            "every arm would have weight 0; at least one arm must serve (arm {arm:?} keeps weight {})",
                            self.arms[i].weight
                        ))
                    }
                    Some(i) => {
                        self.arms[i].weight = weight;
                        self.share_slots();
                        Ok(())
                    }
                };
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
            } else {
                let n = (o.waiting.len() + o.handoff.len()) as i64;
                let gauge = |arm: &str| ArmLabel {
                    arm: arm.to_string(),
                };
                self.metrics
                    .waiting
                    .get_or_create(&gauge(&o.name))
                    .dec_by(n);
                self.metrics
                    .waiting
                    .get_or_create(&gauge(&a.name))
                    .inc_by(n);
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

    /// Gives each arm its share of the slots (see [`slot_shares`]). An arm
    /// left with no slot (weight 0: draining; or not its switchback turn)
    /// hands its waiting requests to the arm with the most slots, so none
    /// waits for a slot that will not come; its running requests finish
    /// where they are.
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
        let Some(to) =
            (0..self.arms.len()).max_by_key(|&i| (self.arms[i].slots, self.arms[i].weight))
        else {
            return;
        };
        for a in 0..self.arms.len() {
            if a == to || self.arms[a].slots > 0 || self.arms[a].waiting.is_empty() {
                continue;
            }
            let ids = std::mem::take(&mut self.arms[a].waiting);
            let from = ArmLabel {
                arm: self.arms[a].name.to_string(),
            };
            let into = ArmLabel {
                arm: self.arms[to].name.to_string(),
            };
            self.metrics
                .waiting
                .get_or_create(&from)
                .dec_by(ids.len() as i64);
            self.metrics
                .waiting
                .get_or_create(&into)
                .inc_by(ids.len() as i64);
            for id in &ids {
                if let Some(e) = self.entries.get_mut(id) {
                    e.arm = to;
                }
            }
            self.arms[to].waiting.extend(ids);
            self.arms[to].dirty = true;
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
    /// where they are; see [`Core::share_slots`]), so no request waits for
    /// its arm's next turn.
    fn switchback_turn(&mut self) {
        let active = self.active_switchback_arm();
        if self.arms[active].slots == self.total_slots {
            return;
        }
        self.share_slots();
    }

    /// The arm of a new request. Weighted mode: the client key is hashed to
    /// a point in [0, 1) and each arm owns a stretch of that line as long as
    /// its share of the total weight, so one key always lands in one arm while
    /// the weights stay, and a weight change moves only the keys whose point
    /// changes owner (scaling every weight alike moves none). Switchback: the
    /// arm whose window it is.
    fn pick_arm(&self, key: &str) -> usize {
        if self.arms.len() == 1 {
            return 0;
        }
        if self.ab.mode == AbMode::Switchback {
            return self.active_switchback_arm();
        }
        let total: u64 = self.arms.iter().map(|a| a.weight as u64).sum();
        let point = ((ab_key_hash(key) as u128 * total as u128) >> 64) as u64;
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
        if self.ab.mode == AbMode::Switchback && self.arms.len() > 1 {
            // A window may have ended since the last tick.
            self.switchback_turn();
        }
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
                self.tidy_rejection(a, &mut r);
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
                // NaN has no place in any order: nonsense, like an invalid action.
                Ok(Admission::Queue(p)) if p.priority.is_nan() => {
                    self.count_invalid(a, "bad_priority");
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

    /// Makes a plugin's rejection fit to send: a status outside 400–599
    /// becomes 503 (the WIT's rule) and a message longer than
    /// [`MAX_REJECTION_MESSAGE`] bytes is cut, so a plugin cannot make the host
    /// hold megabytes per refused request. Both are counted
    /// (`bad_status`, `long_message`), neither ejects the plugin.
    fn tidy_rejection(&self, a: usize, r: &mut Rejection) {
        if !(400..=599).contains(&r.status) {
            self.count_invalid(a, "bad_status");
            r.status = 503;
        }
        if r.message.len() > MAX_REJECTION_MESSAGE {
            self.count_invalid(a, "long_message");
            let mut end = MAX_REJECTION_MESSAGE;
            while !r.message.is_char_boundary(end) {
                end -= 1;
            }
            r.message.truncate(end);
            r.message.shrink_to_fit();
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
                        Ok(actions) => {
                            let arm = &self.arms[a];
                            let inflight = arm.preempting as i64 - arm.handoff.len() as i64;
                            let bad = check_answer(&view, &actions, inflight);
                            if bad.is_empty() {
                                actions
                            } else {
                                // Nothing of a nonsense answer is applied.
                                for (kind, _) in &bad {
                                    self.count_invalid(a, kind);
                                }
                                let e = PluginError::Invalid {
                                    call: "schedule",
                                    summary: summarize_invalid(&bad, actions.len()),
                                };
                                self.eject(a, "schedule", &e);
                                Fallback::schedule(&view)
                            }
                        }
                        Err(e) => {
                            self.eject(a, "schedule", &e);
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
                            self.tidy_rejection(a, &mut rejection);
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
        if e.arm != a || !matches!(e.state, State::Running | State::Preempting) {
            return self.count_invalid(a, "unknown_id");
        }
        if e.state == State::Preempting {
            return self.count_invalid(a, "not_preemptible");
        }
        let run = e.run.clone().expect("running entries have a run");
        let streaming = run.is_streaming();
        if streaming && !cut {
            return self.count_invalid(a, "preempt_streaming");
        }
        if !streaming && e.preemptions >= max {
            return self.count_invalid(a, "preempt_bound");
        }
        // The response may start towards the client right now: whoever moves
        // the run's phase first wins.
        let streaming = streaming || !run.claim_requeue();
        if streaming && !cut {
            return self.count_invalid(a, "preempt_streaming");
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
            arm: self.arms[a].name.clone(),
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
            if let Some(next) = arm.handoff.pop_front()
                && let Some(n) = self.entries.get_mut(&next)
            {
                n.state = State::Waiting;
                self.dispatch_handoff(next);
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
        arm.waiting.remove(&id);
        if let Some(pos) = arm.handoff.iter().position(|x| *x == id) {
            arm.handoff.remove(pos);
        }
        arm.dirty = true;
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
        if let Some(run) = e.run.take()
            && e.first_upstream_ttfb.is_none()
        {
            e.first_upstream_ttfb = run
                .upstream_first_byte
                .get()
                .map(|t| t.duration_since(run.started));
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

/// Longest rejection message (bytes) passed on from a plugin to a client.
const MAX_REJECTION_MESSAGE: usize = 1024;

/// Most actions one `schedule` answer may hold beyond one per waiting and
/// running request.
const ACTION_SLACK: usize = 16;

/// Finds the nonsense in a plugin's `schedule` answer: actions no correct
/// plugin returns for the `view` it was shown. The scheduler refuses such an
/// answer as a whole and ejects the plugin on the first one (the way Linux's
/// sched_ext ejects a BPF scheduler on its first error): a plugin that lost
/// track of the view cannot be trusted with the next decision either.
///
/// Nonsense, by kind (as counted in `maitre_plugin_invalid_actions`):
/// - `too_many_actions`: more than one action per waiting and running
///   request plus [`ACTION_SLACK`] (checked first, so a flood costs nothing more);
/// - `unknown_id`: a start or reject of an id that is not waiting in the view
///   (or was already started or rejected in this answer), a pre-emption of
///   an id that is not running in the view;
/// - `duplicate_start`: the same id started twice, or a running one started;
/// - `duplicate_preempt`: the same id pre-empted twice;
/// - `no_free_slot`: more starts than the view's free slots plus the slots
///   of pre-emptions in this answer and of those still in flight (`inflight`);
/// - `unknown_backend`: a start on a backend index the view does not list.
///
/// Not nonsense (refused or fixed, and counted, by [`Core::apply`]; the plugin
/// stays): a pre-emption the host declines (the request began streaming while
/// the plugin decided, the pre-emption bound, a pre-emption already under
/// way), a rejection status outside 400–599 (answered as 503, as the WIT
/// says) and an over-long rejection message (cut).
fn check_answer(view: &View, actions: &[Action], inflight: i64) -> Vec<(&'static str, String)> {
    let cap = view.waiting.len() + view.running.len() + ACTION_SLACK;
    if actions.len() > cap {
        return vec![(
            "too_many_actions",
            format!(
                "{} actions for {} waiting and {} running requests (at most {cap})",
                actions.len(),
                view.waiting.len(),
                view.running.len()
            ),
        )];
    }
    let waiting: std::collections::HashSet<u64> = view.waiting.iter().map(|w| w.id).collect();
    let running: HashMap<u64, &Running> = view.running.iter().map(|r| (r.id, r)).collect();
    let mut started = std::collections::HashSet::new();
    let mut rejected = std::collections::HashSet::new();
    let mut preempted = std::collections::HashSet::new();
    let mut slots = view.free_slots as i64 + inflight.max(0);
    let mut bad = Vec::new();
    for action in actions {
        match action {
            Action::Start(Start { id, backend }) => {
                if started.contains(id) || running.contains_key(id) {
                    bad.push((
                        "duplicate_start",
                        format!("start of request {id}, which was already started"),
                    ));
                } else if !waiting.contains(id) || rejected.contains(id) {
                    bad.push((
                        "unknown_id",
                        format!("start of request {id}, which is not waiting in this arm"),
                    ));
                } else if backend.is_some_and(|b| b as usize >= view.backends.len()) {
                    bad.push((
                        "unknown_backend",
                        format!(
                            "start of request {id} on backend {} of {}",
                            backend.unwrap_or(0),
                            view.backends.len()
                        ),
                    ));
                } else if slots <= 0 {
                    started.insert(*id);
                    bad.push((
                        "no_free_slot",
                        format!(
                            "start of request {id} beyond the {} free slot(s)",
                            view.free_slots
                        ),
                    ));
                } else {
                    started.insert(*id);
                    slots -= 1;
                }
            }
            Action::Preempt(Preemption { id, cut_streaming }) => match running.get(id) {
                None => bad.push((
                    "unknown_id",
                    format!("pre-emption of request {id}, which is not running in this arm"),
                )),
                Some(_) if !preempted.insert(*id) => bad.push((
                    "duplicate_preempt",
                    format!("pre-emption of request {id} twice"),
                )),
                Some(r) => {
                    if r.preemptible || (r.streaming && *cut_streaming) {
                        slots += 1;
                    }
                }
            },
            Action::Reject(RejectWaiting { id, .. }) => {
                if !waiting.contains(id) || started.contains(id) || !rejected.insert(*id) {
                    bad.push((
                        "unknown_id",
                        format!("reject of request {id}, which is not waiting in this arm"),
                    ));
                }
            }
        }
    }
    bad
}

/// One line for logs and `/status`: how many actions were nonsense, of which
/// kinds, and the first one in words.
fn summarize_invalid(bad: &[(&'static str, String)], total: usize) -> String {
    let mut kinds: Vec<(&str, usize)> = Vec::new();
    for (k, _) in bad {
        match kinds.iter_mut().find(|(n, _)| n == k) {
            Some((_, c)) => *c += 1,
            None => kinds.push((k, 1)),
        }
    }
    let kinds: Vec<String> = kinds.iter().map(|(k, c)| format!("{k} ×{c}")).collect();
    let first = bad.first().map(|(_, d)| d.as_str()).unwrap_or("");
    if bad.len() == 1 && bad[0].0 == "too_many_actions" {
        return format!("too_many_actions: {first}");
    }
    format!(
        "{} of {total} actions invalid: {} (first: {first})",
        bad.len(),
        kinds.join(", ")
    )
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
    // Proportional shares, largest remainder first (ties to the earlier arm)...
    let mut left = total;
    let mut rems: Vec<(u64, usize)> = Vec::new();
    for &i in &live {
        let exact = total as u64 * weights[i] as u64;
        let whole = (exact / total_w) as u32;
        shares[i] = whole;
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
    // ...then every live arm gets at least one slot, taken from the largest.
    for &i in &live {
        if shares[i] == 0
            && let Some(j) = (0..n)
                .filter(|&j| shares[j] > 1)
                .max_by_key(|&j| (shares[j], usize::MAX - j))
        {
            shares[j] -= 1;
            shares[i] = 1;
        }
    }
    shares
}

/// A stable 64-bit hash of an A/B client key (FNV-1a, then the SplitMix64
/// finaliser to spread short keys over the whole range). Unlike std's
/// `DefaultHasher` it is fixed, so a key lands in the same arm across maitre
/// versions and restarts.
pub fn ab_key_hash(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
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
        assert_eq!(slot_shares(4, &[98, 1, 1], None), vec![2, 1, 1]);
        for total in 1..10 {
            let s = slot_shares(total, &[30, 50, 20], None);
            assert_eq!(s.iter().sum::<u32>(), total);
            if total >= 3 {
                assert!(s.iter().all(|&x| x >= 1), "{total}: {s:?}");
            }
        }
    }

    #[test]
    fn ab_key_hash_is_stable_and_spreads_keys() {
        // Deterministic: a key always lands on the same point.
        assert_eq!(ab_key_hash(""), ab_key_hash(""));
        assert_ne!(ab_key_hash("client-1"), ab_key_hash("client-2"));
        // 10 000 sequential keys split 30/70 land within 2% of the split.
        let low = (0..10_000)
            .filter(|i| {
                let h = ab_key_hash(&format!("client-{i}"));
                ((h as u128 * 100) >> 64) < 30
            })
            .count();
        assert!((2_800..=3_200).contains(&low), "{low}");
    }

    #[test]
    fn a_transparent_preemption_and_streaming_cannot_both_win() {
        let r = Run::new();
        assert!(r.claim_requeue());
        assert!(
            !r.mark_streaming(),
            "the response must be dropped and requeued"
        );
        assert!(!r.is_streaming());
        let r = Run::new();
        assert!(r.mark_streaming());
        assert!(r.mark_streaming());
        assert!(!r.claim_requeue(), "only a cut can end it now");
        assert!(r.is_streaming());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(|x| x as f64).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    /// A view with `free` free slots, waiting ids `waiting` and running
    /// `(id, preemptible, streaming)`.
    fn answer_view(free: u32, waiting: &[u64], running: &[(u64, bool, bool)]) -> View {
        View {
            now_ms: 0,
            total_slots: 2,
            free_slots: free,
            backends: vec![Backend {
                name: "up".into(),
                total_slots: 2,
                free_slots: free,
            }],
            running: running
                .iter()
                .map(|&(id, preemptible, streaming)| Running {
                    id,
                    class: Class::Batch,
                    priority: 0.0,
                    model: String::new(),
                    tenant: None,
                    backend: 0,
                    arrival_ms: 0,
                    started_ms: 0,
                    first_token_ms: None,
                    tokens: 0,
                    preemptible,
                    streaming,
                    preemptions: 0,
                })
                .collect(),
            waiting: waiting
                .iter()
                .map(|&id| Waiting {
                    id,
                    class: Class::Batch,
                    priority: 0.0,
                    model: String::new(),
                    tenant: None,
                    stream: false,
                    num_predict: None,
                    arrival_ms: 0,
                    enqueued_ms: 0,
                    preemptions: 0,
                })
                .collect(),
        }
    }

    fn start(id: u64) -> Action {
        Action::Start(Start { id, backend: None })
    }

    fn preempt(id: u64, cut_streaming: bool) -> Action {
        Action::Preempt(Preemption { id, cut_streaming })
    }

    fn reject(id: u64, status: u16) -> Action {
        Action::Reject(RejectWaiting {
            id,
            rejection: Rejection {
                status,
                message: String::new(),
            },
        })
    }

    fn kinds(view: &View, actions: &[Action], inflight: i64) -> Vec<&'static str> {
        check_answer(view, actions, inflight)
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    #[test]
    fn sane_answers_pass_the_check() {
        let v = answer_view(1, &[3, 4, 5], &[(1, true, false), (2, false, true)]);
        assert!(kinds(&v, &[], 0).is_empty());
        assert!(kinds(&v, &[start(3)], 0).is_empty());
        // A pre-emption frees a slot for a start in the same answer...
        assert!(kinds(&v, &[start(3), preempt(1, false), start(4)], 0).is_empty());
        // ...so does cutting a stream when asked to.
        assert!(kinds(&v, &[start(3), preempt(2, true), start(4)], 0).is_empty());
        // A slot still being handed on by an earlier pre-emption counts too.
        assert!(kinds(&v, &[start(3), start(4)], 1).is_empty());
        // Rejections of waiting requests, whatever the status (the WIT maps it).
        assert!(kinds(&v, &[reject(4, 429), reject(5, 0), start(3)], 0).is_empty());
        // A pre-emption the host will decline is refused later, not nonsense.
        assert!(kinds(&v, &[preempt(2, false)], 0).is_empty());
    }

    #[test]
    fn nonsense_is_found_by_kind() {
        let v = answer_view(1, &[3, 4], &[(1, true, false)]);
        assert_eq!(kinds(&v, &[start(99)], 0), ["unknown_id"]);
        assert_eq!(kinds(&v, &[preempt(3, false)], 0), ["unknown_id"]);
        assert_eq!(kinds(&v, &[reject(1, 503)], 0), ["unknown_id"]);
        assert_eq!(kinds(&v, &[reject(3, 503), start(3)], 0), ["unknown_id"]);
        assert_eq!(kinds(&v, &[start(3), reject(3, 503)], 0), ["unknown_id"]);
        assert_eq!(kinds(&v, &[start(1)], 0), ["duplicate_start"]);
        assert_eq!(kinds(&v, &[start(3), start(3)], 0), ["duplicate_start"]);
        assert_eq!(kinds(&v, &[start(3), start(4)], 0), ["no_free_slot"]);
        // A pre-emption the host declines frees no slot.
        let streaming = answer_view(0, &[3], &[(1, false, true)]);
        assert_eq!(
            kinds(&streaming, &[preempt(1, false), start(3)], 0),
            ["no_free_slot"]
        );
        assert_eq!(
            kinds(&v, &[preempt(1, false), preempt(1, false)], 0),
            ["duplicate_preempt"]
        );
        let on_backend_7 = Action::Start(Start {
            id: 3,
            backend: Some(7),
        });
        assert_eq!(kinds(&v, &[on_backend_7], 0), ["unknown_backend"]);
        let flood = vec![start(3); 2 + 1 + ACTION_SLACK + 1];
        assert_eq!(kinds(&v, &flood, 0), ["too_many_actions"]);
    }

    #[test]
    fn invalid_summary_names_kinds_and_the_first_one() {
        let bad = vec![
            ("unknown_id", "start of request 9".to_string()),
            ("duplicate_start", "start of request 3 twice".to_string()),
            ("unknown_id", "start of request 8".to_string()),
        ];
        assert_eq!(
            summarize_invalid(&bad, 5),
            "3 of 5 actions invalid: unknown_id ×2, duplicate_start ×1 (first: start of request 9)"
        );
    }
}
