//! Shared server state: the FIFO slot queue, the event log, counters and the
//! per-request [`Tracker`] whose `Drop` turns a vanished client into a
//! `Cancelled` event.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};

use crate::ModelConfig;
use crate::event_log::EventLog;
use crate::residency::Residency;
use crate::slots::SlotQueue;

/// What happened to a request, as recorded in the model's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    /// The request (head and body) was read and parsed.
    Received,
    /// The request asked for a slot (only slot-taking endpoints). Logged
    /// even when a slot is free at once (then `Started` follows directly).
    Queued,
    /// The request got a generation slot (only slot-taking endpoints).
    Started,
    /// The first token was produced (streamed or not).
    FirstToken,
    /// The request completed normally (the final chunk was produced).
    Finished,
    /// The fake answered with an error: `X-Fake-Status`, `X-Fake-Fail-After`,
    /// a bad body, an unknown model, ...
    Failed,
    /// The client went away (connection closed or response dropped) before
    /// the request completed. Logged at the moment of the drop.
    Cancelled,
    /// The client went away, but the generation goes on to its end and
    /// keeps its slot meanwhile (a non-streaming request with
    /// [`ModelConfig::ignore_disconnect_non_streaming`], like llama-server):
    /// a zombie. `Finished` (or `Failed`) follows when it ends; `tokens` is 0
    /// here (the generation's count is not known to the handler that left).
    Orphaned,
}

/// One entry of the model's event log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEvent {
    /// Global, gap-free sequence number: the order in which events happened.
    /// It counts every event, also those the bounded log no longer keeps.
    pub seq: u64,
    /// Time since the fake started (monotonic, non-decreasing with `seq`).
    pub at: Duration,
    /// What happened.
    pub kind: EventKind,
    /// Fake-internal request number (one per HTTP request, starting at 1).
    pub req: u64,
    /// Request path, e.g. `/api/generate`.
    pub path: String,
    /// `model` from the request body ("" when there is none).
    pub model: String,
    /// Value of the `X-Test-Tag` request header.
    pub tag: Option<String>,
    /// Value of the `X-Priority` request header, as received.
    pub priority: Option<String>,
    /// The integer `priority` member of a `/v1` generation's body (vLLM's
    /// per-request priority), as received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_priority: Option<i64>,
    /// Whether the request asked for a streamed answer (with the
    /// endpoint's default applied); false for endpoints that never stream.
    #[serde(default)]
    pub stream: bool,
    /// Tokens produced so far (pull: progress lines sent so far).
    pub tokens: u64,
}

/// Live counters, also served at `GET /_fake/stats`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Highest number of requests that held a slot at the same time.
    pub max_concurrent: usize,
    /// Requests holding a slot now.
    pub active: usize,
    /// Requests waiting for a slot now.
    pub waiting: usize,
    /// Configured number of slots.
    pub slots: usize,
    /// Generations in flight now: holding a slot or queued for one, zombies
    /// (see [`EventKind::Orphaned`]) included.
    #[serde(default)]
    pub in_flight: usize,
    /// The highest `in_flight` since the start or the last reset: a proxy
    /// that never overruns the upstream keeps it at or under `slots`.
    #[serde(default)]
    pub max_in_flight: usize,
    /// Generations going on now whose client has left (zombies).
    #[serde(default)]
    pub orphans: usize,
}

/// Who a request is, as copied into each of its log events.
struct ReqInfo {
    req: u64,
    path: String,
    model: String,
    tag: Option<String>,
    priority: Option<String>,
    body_priority: Option<i64>,
    stream: bool,
    /// [`LIFE_ATTENDED`], [`LIFE_ORPHANED`] or [`LIFE_ENDED`]; changed only
    /// under the state's lock, so the log and the orphan count agree.
    life: AtomicU8,
}

/// A request whose client is still there.
const LIFE_ATTENDED: u8 = 0;
/// A request whose client left while its generation goes on.
const LIFE_ORPHANED: u8 = 1;
/// A request that ended.
const LIFE_ENDED: u8 = 2;

/// A request waiting for a slot; the slot is handed over through `tx`.
struct Waiter {
    info: Arc<ReqInfo>,
    tx: oneshot::Sender<()>,
}

/// The log and the slots, under one lock: a slot changes hands and both
/// events (`Finished`/`Cancelled` of the old holder, `Started` of the next)
/// are logged in one critical section, so the log order *is* the grant
/// order, whatever the threads do afterwards.
struct Inner {
    log: EventLog,
    slots: SlotQueue<Waiter>,
    /// Generations going on whose client left.
    orphans: usize,
}

impl Inner {
    fn push(&mut self, start: Instant, kind: EventKind, info: &ReqInfo, tokens: u64) {
        self.log.push(|seq| LogEvent {
            seq,
            // Taken under the lock so that `at` never decreases along `seq`.
            at: start.elapsed(),
            kind,
            req: info.req,
            path: info.path.clone(),
            model: info.model.clone(),
            tag: info.tag.clone(),
            priority: info.priority.clone(),
            body_priority: info.body_priority,
            stream: info.stream,
            tokens,
        });
    }

    /// Frees a slot: hands it to the first waiter (logging its `Started`),
    /// or makes it free. A waiter whose task is being dropped right now
    /// still gets it; its tracker then finds itself out of the queue and
    /// releases the slot.
    fn release(&mut self, start: Instant) {
        if let Some(w) = self.slots.release() {
            let _ = w.tx.send(());
            self.push(start, EventKind::Started, &w.info, 0);
        }
    }
}

/// State shared by every connection of one server.
pub(crate) struct State {
    pub cfg: ModelConfig,
    pub start: Instant,
    inner: Mutex<Inner>,
    notify: Notify,
    next_req: AtomicU64,
    /// Models loaded, and loading (for `/api/ps`; [`crate::residency`]).
    residency: Mutex<Residency>,
    /// `X-Fake-Status-Times` counters by tag.
    status_counts: Mutex<BTreeMap<String, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    pub fn new(cfg: ModelConfig) -> Self {
        State {
            inner: Mutex::new(Inner {
                log: EventLog::new(cfg.log_capacity),
                slots: SlotQueue::new(cfg.slots),
                orphans: 0,
            }),
            start: Instant::now(),
            notify: Notify::new(),
            next_req: AtomicU64::new(1),
            residency: Mutex::new(Residency::new(&cfg)),
            status_counts: Mutex::new(BTreeMap::new()),
            cfg,
        }
    }

    /// Runs `f` on the locked state, then wakes `wait_until` callers.
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let r = f(&mut lock(&self.inner));
        self.notify.notify_waiters();
        r
    }

    pub fn log_snapshot(&self) -> Vec<LogEvent> {
        lock(&self.inner).log.events().to_vec()
    }

    /// Waits until `pred` holds for the log or `timeout` passes.
    pub async fn wait_until(&self, timeout: Duration, pred: impl Fn(&[LogEvent]) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if pred(lock(&self.inner).log.events()) {
                return true;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => return pred(lock(&self.inner).log.events()),
            }
        }
    }

    pub fn stats(&self) -> Stats {
        let g = lock(&self.inner);
        Stats {
            max_concurrent: g.slots.max_active(),
            active: g.slots.active(),
            waiting: g.slots.waiting(),
            slots: g.slots.slots(),
            in_flight: g.slots.in_flight(),
            max_in_flight: g.slots.max_in_flight(),
            orphans: g.orphans,
        }
    }

    pub fn reset(&self) {
        let mut g = lock(&self.inner);
        g.log.clear();
        g.slots.reset_max();
    }

    /// How many requests with this tag got the `X-Fake-Status` answer so
    /// far; counts this one.
    pub fn count_status(&self, tag: Option<&str>) -> u64 {
        let mut m = lock(&self.status_counts);
        let n = m.entry(tag.unwrap_or("").to_string()).or_insert(0);
        *n += 1;
        *n - 1
    }

    /// A request uses `model`: waits until it is loaded (its load time if
    /// it was not), and keeps it loaded until its `keep_alive` runs out.
    /// Waits until `model` is loaded with `num_ctx` (the default context
    /// when `None`): loading it, or reloading it for another context.
    pub async fn load(
        &self,
        model: &str,
        keep_alive: Option<&serde_json::Value>,
        num_ctx: Option<u64>,
    ) {
        let ready = lock(&self.residency).use_model(&self.cfg, model, keep_alive, num_ctx);
        tokio::time::sleep_until(ready).await;
    }

    pub fn set_unloaded(&self, model: &str) {
        lock(&self.residency).unload(model);
    }

    pub fn loaded(&self) -> Vec<(String, SystemTime)> {
        lock(&self.residency).loaded()
    }

    /// Models loaded since the start.
    pub fn loads(&self) -> u64 {
        lock(&self.residency).loads()
    }
}

/// `fake` -> `fake:latest`, like Ollama's name normalisation.
pub(crate) fn full_name(model: &str) -> String {
    if model.contains(':') {
        model.to_string()
    } else {
        format!("{model}:latest")
    }
}

/// Where a request stands with respect to the slots.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    None,
    Queued,
    Held,
}

/// Follows one request through the fake and writes its log events. Dropping
/// it before [`Tracker::finish`]/[`Tracker::fail`] logs `Cancelled` (with the
/// drop's timestamp) and releases the slot or leaves the queue: this is how
/// a client disconnect, which makes hyper drop the handler future or the
/// response body, is seen.
pub(crate) struct Tracker {
    state: Arc<State>,
    info: Arc<ReqInfo>,
    /// Tokens produced so far.
    pub tokens: u64,
    received: bool,
    done: bool,
    slot: Slot,
    /// When the handler started (for `total_duration`).
    pub t0: Instant,
}

impl Tracker {
    pub fn new(
        state: Arc<State>,
        path: &str,
        tag: Option<String>,
        priority: Option<String>,
    ) -> Self {
        let req = state.next_req.fetch_add(1, Ordering::Relaxed);
        Tracker {
            state,
            info: Arc::new(ReqInfo {
                req,
                path: path.to_string(),
                model: String::new(),
                tag,
                priority,
                body_priority: None,
                stream: false,
                life: AtomicU8::new(LIFE_ATTENDED),
            }),
            tokens: 0,
            received: false,
            done: false,
            slot: Slot::None,
            t0: Instant::now(),
        }
    }

    pub fn req(&self) -> u64 {
        self.info.req
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    fn event(&self, kind: EventKind) {
        let start = self.state.start;
        self.state
            .with(|g| g.push(start, kind, &self.info, self.tokens));
    }

    /// Logs `Received` (once), now that the model and whether the request
    /// asked for a stream are known.
    pub fn received(&mut self, model: &str, stream: bool) {
        self.received_with(model, stream, None);
    }

    /// [`Tracker::received`], with the body's `priority` member.
    pub fn received_with(&mut self, model: &str, stream: bool, body_priority: Option<i64>) {
        if !self.received {
            self.received = true;
            if let Some(info) = Arc::get_mut(&mut self.info) {
                info.model = model.to_string();
                info.stream = stream;
                info.body_priority = body_priority;
            }
            self.event(EventKind::Received);
        }
    }

    /// Logs `Queued`, waits (FIFO) for a generation slot; `Started` is
    /// logged when the slot is granted.
    pub async fn acquire(&mut self) {
        let start = self.state.start;
        let rx = self.state.with(|g| {
            g.push(start, EventKind::Queued, &self.info, 0);
            let (tx, rx) = oneshot::channel();
            let info = self.info.clone();
            if g.slots.request(Waiter { info, tx }) {
                g.push(start, EventKind::Started, &self.info, 0);
                None
            } else {
                Some(rx)
            }
        });
        match rx {
            None => self.slot = Slot::Held,
            Some(rx) => {
                self.slot = Slot::Queued;
                // The sender is only dropped unsent with the whole state.
                if rx.await.is_err() {
                    std::future::pending::<()>().await;
                }
                self.slot = Slot::Held;
            }
        }
    }

    pub fn first_token(&self) {
        self.event(EventKind::FirstToken);
    }

    /// Logs the end of the request, and in the same critical section gives
    /// up its slot or its place in the queue.
    fn end(&mut self, kind: EventKind) {
        if self.done {
            return;
        }
        self.done = true;
        if !self.received {
            self.received = true;
            self.event(EventKind::Received);
        }
        let start = self.state.start;
        let (info, tokens, mut slot) = (&self.info, self.tokens, self.slot);
        let lag = self.state.cfg.release_lag;
        if kind == EventKind::Cancelled
            && slot == Slot::Held
            && !lag.is_zero()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            // The engine frees the slot a little after the connection.
            let state = self.state.clone();
            rt.spawn(async move {
                tokio::time::sleep(lag).await;
                state.with(|g| g.release(start));
            });
            slot = Slot::None;
        }
        self.state.with(|g| {
            if info.life.swap(LIFE_ENDED, Ordering::Relaxed) == LIFE_ORPHANED {
                g.orphans = g.orphans.saturating_sub(1);
            }
            g.push(start, kind, info, tokens);
            match slot {
                Slot::Held => g.release(start),
                Slot::Queued => {
                    if !g.slots.leave(|w| w.info.req == info.req) {
                        // Granted just now, before this task saw it.
                        g.release(start);
                    }
                }
                Slot::None => {}
            }
        });
        self.slot = Slot::None;
    }

    pub fn finish(&mut self) {
        self.end(EventKind::Finished);
    }

    /// A guard for the handler of a generation that goes on without its
    /// client: dropped before [`Orphaning::attended`], it logs `Orphaned`
    /// and counts the request as a zombie until it ends.
    pub fn orphaning(&self) -> Orphaning {
        Orphaning {
            state: self.state.clone(),
            info: self.info.clone(),
            attended: false,
        }
    }

    pub fn fail(&mut self) {
        self.end(EventKind::Failed);
    }
}

/// See [`Tracker::orphaning`].
pub(crate) struct Orphaning {
    state: Arc<State>,
    info: Arc<ReqInfo>,
    attended: bool,
}

impl Orphaning {
    /// The client got its answer: nothing to log.
    pub fn attended(mut self) {
        self.attended = true;
    }
}

impl Drop for Orphaning {
    fn drop(&mut self) {
        if self.attended {
            return;
        }
        let (start, info) = (self.state.start, &self.info);
        self.state.with(|g| {
            let orphaned = info
                .life
                .compare_exchange(
                    LIFE_ATTENDED,
                    LIFE_ORPHANED,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
            if orphaned {
                g.orphans += 1;
                g.push(start, EventKind::Orphaned, info, 0);
            }
        });
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        // A request that never got as far as `Received` (e.g. the client
        // left during the body upload) leaves no trace.
        if self.received {
            self.end(EventKind::Cancelled);
        }
    }
}
