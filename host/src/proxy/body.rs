//! The response body of a scheduled request, which ties the life of the
//! upstream stream to the request's place in the scheduler.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::link::Link;
use super::{BoxError, Outcome, Run, Ticket};
use crate::escape::Escaped;

/// How a streamed answer is framed, which decides how an error mid-stream is
/// told to the client: a cut or a lost upstream must never look like a
/// complete answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// Ollama's NDJSON: a last `{"error": "..."}` line, as Ollama writes one.
    Ndjson,
    /// OpenAI-style server-sent events: a last `data: {"error": {...}}`
    /// event, which the official clients raise as an API error.
    Sse,
    /// Anything else: the body just ends (or fails).
    Other,
}

impl Framing {
    /// The framing of an answer with this `Content-Type`.
    pub(super) fn of(content_type: Option<&str>) -> Framing {
        match content_type {
            Some(v) if v.starts_with("application/x-ndjson") => Framing::Ndjson,
            Some(v) if v.starts_with("text/event-stream") => Framing::Sse,
            _ => Framing::Other,
        }
    }

    /// The last chunk that tells the client about an error, if this framing
    /// has a way to say it; `code` names the cause for OpenAI clients.
    fn error_chunk(self, message: &str, code: &str) -> Option<Bytes> {
        match self {
            Framing::Ndjson => Some(Bytes::from(format!(
                "{}\n",
                serde_json::json!({ "error": message })
            ))),
            Framing::Sse => Some(Bytes::from(format!(
                "data: {}\n\n",
                serde_json::json!({"error": {
                    "message": message,
                    "type": "server_error",
                    "param": null,
                    "code": code,
                }})
            ))),
            Framing::Other => None,
        }
    }

    /// Whether an upstream chunk is itself an error report.
    fn is_error(self, chunk: &[u8]) -> bool {
        match self {
            Framing::Ndjson => chunk.starts_with(b"{\"error\""),
            Framing::Sse => chunk.starts_with(b"data: {\"error\""),
            Framing::Other => false,
        }
    }
}

/// What a client whose stream a policy cut is told.
const CUT_MESSAGE: &str =
    "maitre: this stream was pre-empted by the scheduling policy to serve a real-time request";

/// The response body of a scheduled request: forwards upstream chunks as they
/// come, times the first one, counts them, ends the request in the scheduler
/// exactly once, and closes the upstream connection when dropped early, or
/// as soon as a policy cuts the stream (from the scheduler's side: the client
/// may not be reading).
pub(super) struct TrackedBody {
    // Declared first so it is dropped (closing the upstream connection) before
    // the ticket tells the scheduler the slot is free. `None` once cut. Shared
    // (weakly) with the cut's closer that the scheduler runs.
    inner: Arc<Mutex<Option<Incoming>>>,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    run: Arc<Run>,
    ticket: Option<Ticket>,
    failed: bool,
    framing: Framing,
    done: bool,
}

impl TrackedBody {
    /// Relays `inner` for the dispatch `run`; `ticket` ends when the body does.
    /// `failed` marks an upstream answer that is already an error; `framing`
    /// says how an error mid-stream is told to the client.
    pub(super) fn new(
        inner: Incoming,
        run: Arc<Run>,
        ticket: Ticket,
        failed: bool,
        framing: Framing,
        link: Arc<Link>,
    ) -> TrackedBody {
        let inner = Arc::new(Mutex::new(Some(inner)));
        let upstream = Arc::downgrade(&inner);
        let close = move || {
            if let Some(u) = upstream.upgrade() {
                drop(lock(&u).take());
            }
            link.abandon()
        };
        if !run.on_cut(Box::new(close)) {
            // Cut before the relay began: the scheduler left the closing to
            // this body, which ends at its first poll.
            drop(lock(&inner).take());
        }
        TrackedBody {
            inner,
            cut: Box::pin(run.preempt.clone().cancelled_owned()),
            run,
            ticket: Some(ticket),
            failed,
            framing,
            done: false,
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        self.done = true;
        if let Some(t) = self.ticket.take() {
            t.finish(outcome);
        }
    }

    /// A policy opted in to ending this stream: close the upstream connection
    /// (unless the scheduler did), end the request, and say so in the
    /// stream's framing.
    fn end_cut(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        drop(lock(&self.inner).take());
        self.finish(Outcome::Cancelled);
        let chunk = self.framing.error_chunk(CUT_MESSAGE, "preempted");
        Poll::Ready(chunk.map(|c| Ok(Frame::data(c))))
    }
}

/// The upstream body, whatever a panic elsewhere left behind.
fn lock(m: &Mutex<Option<Incoming>>) -> MutexGuard<'_, Option<Incoming>> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        // Polled every time so that a cut wakes this body at once, not when
        // the upstream's next chunk happens to arrive.
        if this.cut.as_mut().poll(cx).is_ready() && this.run.is_cut() {
            return this.end_cut();
        }
        let cell = this.inner.clone();
        let mut guard = lock(&cell);
        let Some(inner) = guard.as_mut() else {
            drop(guard);
            // Closed by the scheduler's cut since the check above.
            if this.run.is_cut() {
                return this.end_cut();
            }
            return Poll::Ready(None);
        };
        match Pin::new(&mut *inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref()
                    && !d.is_empty()
                {
                    this.run.mark_client_first_byte();
                    this.run.add_token();
                    if this.framing.is_error(d) {
                        this.failed = true;
                    }
                }
                // A body with a known length is complete after its last
                // frame; hyper may not poll again.
                if inner.is_end_stream() {
                    let outcome = if this.failed {
                        Outcome::UpstreamError
                    } else {
                        Outcome::Ok
                    };
                    this.finish(outcome);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                let outcome = if this.failed {
                    Outcome::UpstreamError
                } else {
                    Outcome::Ok
                };
                this.finish(outcome);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::warn!(error = %Escaped(&e), "upstream connection lost mid-response");
                this.finish(Outcome::UpstreamError);
                let message = format!("maitre: upstream connection lost mid-stream: {e}");
                match this.framing.error_chunk(&message, "upstream_lost") {
                    Some(c) => Poll::Ready(Some(Ok(Frame::data(c)))),
                    None => Poll::Ready(Some(Err(Box::new(e)))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match &*lock(&self.inner) {
            Some(inner) if !self.done => inner.size_hint(),
            _ => SizeHint::with_exact(0),
        }
    }
}
