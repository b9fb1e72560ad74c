//! A request's side of the scheduler: what the proxy submits
//! ([`RequestMeta`]), the place it holds while waiting and running
//! ([`Ticket`]), the go-ahead it receives ([`Grant`]) and the state of one
//! dispatch shared with the scheduler ([`Run`] and its phases).

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::letgo::{self, LetGo};
use super::{Msg, Requeued};
use crate::policy::Rejection;

/// What the proxy knows about a request when it asks for a slot.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    /// HTTP path.
    pub path: String,
    /// `model` from the body ("" when it could not be read).
    pub model: Arc<str>,
    /// Whether the response streams (with Ollama's defaults applied).
    pub stream: bool,
    /// Raw `X-Priority`.
    pub priority_header: Option<String>,
    /// Tenant, if a tenant header is configured and present.
    pub tenant: Option<Arc<str>>,
    /// `options.num_predict` / `max_tokens`.
    pub num_predict: Option<i64>,
    /// Body size in bytes.
    pub body_bytes: u64,
    /// Sticky A/B key (header value or client address).
    pub client_key: String,
    /// When the request arrived (tokio's clock, so tests can pause it).
    pub arrival: Instant,
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
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
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
    pub(super) upstream_first_byte: OnceLock<Instant>,
    pub(super) client_first_byte: OnceLock<Instant>,
    tokens: AtomicU64,
    /// [`PHASE_DISPATCHED`], [`PHASE_STREAMING`] or [`PHASE_REQUEUED`]: one
    /// atomic, so a transparent pre-emption and the response starting towards
    /// the client cannot both win.
    phase: AtomicU8,
    cut: AtomicBool,
    /// Cancelled when a policy pre-empts this dispatch.
    pub preempt: CancellationToken,
    /// Closes the upstream connection of a stream, registered by its relay.
    closer: Closer,
}

/// Closes a stream's upstream connection and says when it is let go (`None`:
/// closed already, or nothing to wait for).
pub type Close = Box<dyn FnOnce() -> Option<LetGo> + Send>;

/// Closes a stream's upstream connection from the scheduler's side: a cut
/// must not wait until the client reads again (a stalled client would keep
/// the slot, and the request started in its place, waiting).
#[derive(Default)]
struct Closer(Mutex<Option<Close>>);

impl std::fmt::Debug for Closer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Closer")
    }
}

impl Run {
    pub(super) fn new() -> Run {
        Run {
            started: Instant::now(),
            upstream_first_byte: OnceLock::new(),
            client_first_byte: OnceLock::new(),
            tokens: AtomicU64::new(0),
            phase: AtomicU8::new(PHASE_DISPATCHED),
            cut: AtomicBool::new(false),
            preempt: CancellationToken::new(),
            closer: Closer::default(),
        }
    }
    /// Registers how to close this stream's upstream connection at once when
    /// a policy cuts it. False when it was cut already: the caller closes it.
    #[must_use]
    pub fn on_cut(&self, close: Close) -> bool {
        let mut c = self.closer.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Checked under the lock that `close_upstream` takes after marking
        // the cut: one of the two sides closes, never none.
        if self.is_cut() {
            return false;
        }
        *c = Some(close);
        true
    }
    /// Closes the upstream connection of a cut stream, if its relay said how:
    /// `None` when it did not (the relay closes it and ends the request),
    /// else when the connection is let go (`Some(None)`: now).
    pub(super) fn close_upstream(&self) -> Option<Option<LetGo>> {
        debug_assert!(self.is_cut());
        let close = self
            .closer
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        close.map(|close| close())
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
    pub(super) fn claim_requeue(&self) -> bool {
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
    /// Marks this dispatch as cut mid-stream (before it is cancelled).
    pub(super) fn mark_cut(&self) {
        self.cut.store(true, Ordering::Release);
    }
    /// Time from dispatch to the upstream's first byte, if it came.
    pub(super) fn upstream_ttfb(&self) -> Option<Duration> {
        self.upstream_first_byte
            .get()
            .map(|t| t.duration_since(self.started))
    }
}

/// The go-ahead for a waiting request.
#[derive(Debug, Clone)]
pub struct Grant {
    /// Shared state of this dispatch.
    pub run: Arc<Run>,
    /// The class the policy gave it (an engine that takes a per-request
    /// priority may be told).
    pub class: crate::policy::Class,
    /// Total time spent waiting in maitre so far.
    pub queue_wait: Duration,
    /// How often the request was pre-empted before this dispatch.
    pub preemptions: u32,
    /// The arm that started it (it may have moved from the arm that admitted
    /// it when an arm drained or a switchback window turned).
    pub arm: Arc<str>,
    /// The backend to send it to (index in the config's upstream order).
    pub backend: usize,
    /// That backend's name.
    pub backend_name: Arc<str>,
}

/// What the scheduler tells a waiting [`Ticket`].
pub(crate) enum Signal {
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

/// The answer to a waiting request when the host shuts down.
pub(super) fn shutting_down() -> Rejection {
    Rejection {
        status: 503,
        message: "maitre is shutting down; retry shortly".into(),
    }
}

/// Gives up the upstream connection of the current dispatch (it will not be
/// reused) and says when it is let go; `None` when there is none.
pub type Abandon = Box<dyn FnOnce() -> Option<LetGo> + Send + Sync>;

/// A request's place in the scheduler, held by its HTTP handler. Dropping it
/// before [`Ticket::finish`] means the client went away.
///
/// A request whose upstream connection is given up on (pre-empted, cut,
/// failed, or its client gone) keeps its slot until that connection is let
/// go ([`LetGo`]): the message that frees the slot is sent only then.
pub struct Ticket {
    pub(super) id: u64,
    pub(super) arm: Arc<str>,
    /// The go-ahead of the current wait; a requeue opens a new one.
    pub(super) rx: Option<oneshot::Receiver<Signal>>,
    pub(super) tx: mpsc::UnboundedSender<Msg>,
    pub(super) ended: bool,
    /// How to give up the current dispatch's upstream connection.
    pub(super) abandon: Option<Abandon>,
}

impl Ticket {
    /// The request id.
    pub fn id(&self) -> u64 {
        self.id
    }
    /// The arm that admitted it.
    pub fn arm(&self) -> &Arc<str> {
        &self.arm
    }

    /// Waits until the policy starts the request (or rejects it while waiting).
    /// Each wait after the first follows a requeue. Cancel-safe.
    pub async fn wait_start(&mut self) -> Result<Grant, Rejection> {
        debug_assert!(self.rx.is_some(), "a second wait without a requeue");
        // Awaited in place, so a wait that is given up (a timeout) keeps
        // the channel; it is closed once it has answered.
        let signal = match self.rx.as_mut() {
            Some(rx) => rx.await.ok(),
            None => None,
        };
        self.rx = None;
        match signal {
            Some(Signal::Start(g)) => Ok(g),
            Some(Signal::Reject(r)) => {
                self.ended = true;
                Err(r)
            }
            None => {
                self.ended = true;
                Err(shutting_down())
            }
        }
    }

    /// The current dispatch was sent upstream: `abandon` gives up its
    /// connection if the request does not complete normally.
    pub fn dispatched(&mut self, abandon: Abandon) {
        self.abandon = Some(abandon);
    }

    /// Sends `msg` once the current dispatch's upstream connection, given
    /// up on now, is let go.
    fn after_let_go(&mut self, msg: Msg) {
        let let_go = self.abandon.take().and_then(|abandon| abandon());
        let tx = self.tx.clone();
        letgo::after(let_go, move || {
            let _ = tx.send(msg);
        });
    }

    /// Puts the request back in the queue once its upstream connection is
    /// let go, with a new channel for its next go-ahead.
    fn requeue(&mut self, why: Requeued, lost_tokens: u64, kept_tokens: u64) {
        let (signal, rx) = oneshot::channel();
        self.rx = Some(rx);
        let id = self.id;
        self.after_let_go(Msg::Requeue {
            id,
            why,
            signal,
            lost_tokens,
            kept_tokens,
        });
    }

    /// The upstream request of a pre-empted dispatch has been aborted: put the
    /// request back in the queue (once its connection is let go).
    pub fn requeue_after_preempt(&mut self) {
        self.requeue_after_preempt_losing(0);
    }

    /// [`Ticket::requeue_after_preempt`], saying how many tokens the
    /// upstream had generated and were thrown away (the simulator knows;
    /// they are counted with the chunks maitre saw).
    pub fn requeue_after_preempt_losing(&mut self, tokens: u64) {
        self.requeue(Requeued::Preempted, tokens, 0);
    }

    /// [`Ticket::requeue_after_preempt`] for a request that resumes its
    /// answer so far: `kept` of the tokens it had made are not thrown away.
    pub fn requeue_after_preempt_keeping(&mut self, kept: u64) {
        self.requeue(Requeued::Preempted, 0, kept);
    }

    /// The upstream answered 503 busy before any byte reached the client: put
    /// the request back in the queue (once its connection is let go).
    pub fn requeue_after_busy(&mut self) {
        self.requeue(Requeued::Busy, 0, 0);
    }

    /// The upstream connection failed before any byte reached the client (a
    /// kept-alive connection the upstream had closed, a stream lost while
    /// maitre was folding it): put the request back in the queue.
    pub fn requeue_after_lost(&mut self) {
        self.requeue(Requeued::Lost, 0, 0);
    }

    /// The upstream request failed on `backend` before anything reached the
    /// client (connection refused or dropped). True: the request is back in
    /// the queue for another backend (wait for the next grant). False: no
    /// fail-over is left, or no other backend is healthy; answer the failure.
    pub async fn failover(&mut self, backend: usize) -> bool {
        // The connection failed: it is not reused, and there is nothing
        // left to wait for on it.
        if let Some(abandon) = self.abandon.take() {
            drop(abandon());
        }
        let (reply, rx) = oneshot::channel();
        let (signal, next) = oneshot::channel();
        let sent = self.tx.send(Msg::Failover {
            id: self.id,
            backend,
            reply,
            signal,
        });
        let moved = sent.is_ok() && rx.await.unwrap_or(false);
        if moved {
            self.rx = Some(next);
        }
        moved
    }

    /// The request ended; `outcome` is logged and counted. Unless it ended
    /// well, its upstream connection is given up on and its slot freed once
    /// that connection is let go.
    pub fn finish(mut self, outcome: Outcome) {
        self.ended = true;
        let msg = Msg::Finished {
            id: self.id,
            outcome,
        };
        if outcome == Outcome::Ok {
            self.abandon = None;
            let _ = self.tx.send(msg);
        } else {
            self.after_let_go(msg);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.ended {
            let id = self.id;
            self.after_let_go(Msg::Gone { id });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
