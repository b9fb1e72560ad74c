//! The response body of a scheduled request, which ties the life of the
//! upstream stream to the request's place in the scheduler.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::{BoxError, Outcome, Run, Ticket};
use crate::escape::Escaped;

/// The response body of a scheduled request: forwards upstream chunks as they
/// come, times the first one, counts them, ends the request in the scheduler
/// exactly once, and closes the upstream connection when dropped early.
pub(super) struct TrackedBody {
    // Declared first so it is dropped (closing the upstream connection) before
    // the ticket tells the scheduler the slot is free. `None` once cut.
    inner: Option<Incoming>,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    run: Arc<Run>,
    ticket: Option<Ticket>,
    failed: bool,
    ndjson: bool,
    done: bool,
}

impl TrackedBody {
    /// Relays `inner` for the dispatch `run`; `ticket` ends when the body does.
    /// `failed` marks an upstream answer that is already an error; `ndjson`
    /// says errors mid-stream can be told to the client as a last line.
    pub(super) fn new(
        inner: Incoming,
        run: Arc<Run>,
        ticket: Ticket,
        failed: bool,
        ndjson: bool,
    ) -> TrackedBody {
        TrackedBody {
            inner: Some(inner),
            cut: Box::pin(run.preempt.clone().cancelled_owned()),
            run,
            ticket: Some(ticket),
            failed,
            ndjson,
            done: false,
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        self.done = true;
        if let Some(t) = self.ticket.take() {
            t.finish(outcome);
        }
    }
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
            // A policy opted in to ending this stream: close the upstream
            // connection, free the slot, and say so in Ollama's way.
            this.inner = None;
            this.finish(Outcome::Cancelled);
            let line = if this.ndjson {
                Bytes::from_static(b"{\"error\":\"maitre: this stream was pre-empted by the scheduling policy to serve a real-time request\"}\n")
            } else {
                Bytes::new()
            };
            return Poll::Ready(if line.is_empty() {
                None
            } else {
                Some(Ok(Frame::data(line)))
            });
        }
        let Some(inner) = this.inner.as_mut() else {
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
                    if this.ndjson && d.starts_with(b"{\"error\"") {
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
                if this.ndjson {
                    let line = format!(
                        "{}\n",
                        serde_json::json!({"error": format!("maitre: upstream connection lost mid-stream: {e}")})
                    );
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from(line)))))
                } else {
                    Poll::Ready(Some(Err(Box::new(e))))
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(inner) if !self.done => inner.size_hint(),
            _ => SizeHint::with_exact(0),
        }
    }
}
