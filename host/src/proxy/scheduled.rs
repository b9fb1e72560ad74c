//! The scheduled path, in phases: check the queue has room → read the body →
//! submit it to the scheduler → wait for a slot → dispatch it upstream →
//! relay the answer.
//!
//! Each phase that can fail returns a [`Refusal`]; [`Proxy::scheduled`] turns
//! it into the one HTTP answer. Pre-emption and upstream-busy answers loop back
//! to waiting for a slot, as long as nothing has reached the client.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::body::{Framing, TrackedBody};
use super::budget::Held;
use super::head::Head;
use super::headers::{set_header, strip_hop_by_hop};
use super::read::{discard, read_body};
use super::refusal::Refusal;
use super::{
    BodyMeta, Grant, Handling, Outcome, Proxy, ProxyBody, RequestMeta, Run, SubmitError, Ticket,
    extract_meta,
};

/// Upstream 503 answers retried through maitre's queue before passing one on.
const MAX_BUSY_RETRIES: u32 = 3;

/// What became of one dispatch upstream.
enum Sent {
    /// The upstream answered (its head, at least).
    Answered(Response<Incoming>),
    /// The policy pre-empted the request before the upstream answered; the
    /// upstream request was dropped, closing its connection.
    Preempted,
}

/// Phases 3–5 of a queued request, boxed: while it waits, this future and
/// its [`Queued`] state are all the memory a request has of its own.
type Waiting = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Refusal>> + Send>>;

/// A request that is read and queued: all it keeps while it waits.
struct Queued {
    head: Head,
    bytes: Bytes,
    /// The body's bytes in the budget, given back when the request ends.
    _held: Held,
    ticket: Ticket,
}

impl Proxy {
    /// Serves a scheduled request; every refusal becomes an error answer.
    ///
    /// Phases 0–2 (room, body, submit) run in a future of their own, freed
    /// once the request is queued, so a waiting request's future holds only
    /// its [`Queued`] state, not the request as hyper handed it over nor the
    /// body read.
    pub(super) fn scheduled(
        self: Arc<Self>,
        req: Request<Incoming>,
        remote: SocketAddr,
        arrival: Instant,
        path: String,
    ) -> Handling {
        let admit = Box::pin(self.clone().admit(req, remote, arrival, path.clone()));
        Box::pin(async move {
            let answer = match admit.await {
                Ok(waiting) => waiting.await,
                Err(refusal) => Err(refusal),
            };
            Ok(answer.unwrap_or_else(|refusal| {
                refusal.into_response(&path, self.limits.retry_after_seconds)
            }))
        })
    }

    /// Phases 0–2: room in the queue, the body, the place in the queue; then
    /// the rest of the request's life, as a future of its own.
    async fn admit(
        self: Arc<Self>,
        req: Request<Incoming>,
        remote: SocketAddr,
        arrival: Instant,
        path: String,
    ) -> Result<Waiting, Refusal> {
        let (parts, mut body) = req.into_parts();
        // Phase 0: a full queue refuses before a byte of the body is read.
        let Some(reading) = self
            .room
            .enter(self.sched.waiting(), self.limits.max_waiting)
        else {
            discard(body);
            return Err(Refusal::QueueFull {
                max_waiting: self.limits.max_waiting,
            });
        };
        let head = Head::own(parts);
        // Phase 1: the body, within its limit and the byte budget.
        let (bytes, held) = match read_body(&mut body, &self.body_limits, &self.budget).await {
            Ok(read) => read,
            Err(refusal) => {
                if matches!(
                    refusal,
                    Refusal::BodyTooLarge { .. } | Refusal::BodyBudgetSpent { .. }
                ) {
                    discard(body);
                }
                return Err(refusal);
            }
        };
        // Scheduled whatever the body: one maitre cannot read (bad JSON, no
        // model) gets an empty model, and Ollama answers it with its own
        // error when its turn comes. Passing it on without a slot would let
        // a body Ollama reads differently skip the scheduler.
        let meta = extract_meta(&path, &bytes);
        let submitted = self
            .submit(&head, &path, meta, bytes.len(), remote, arrival)
            .await;
        // Submitted: it counts among the waiting now (or was refused).
        drop(reading);
        let queued = Queued {
            head,
            bytes,
            _held: held,
            ticket: submitted?,
        };
        Ok(Box::pin(self.run(queued)))
    }

    /// Phases 3–5, with the loop back to waiting after a pre-emption or an
    /// upstream-busy answer.
    ///
    /// `q`'s fields are used in place, not moved into locals: a copy would
    /// double the state every waiting request keeps.
    async fn run(self: Arc<Self>, mut q: Queued) -> Result<Response<ProxyBody>, Refusal> {
        let mut busy_retries = 0u32;
        loop {
            let grant = wait_for_slot(&mut q.ticket).await?;
            // Boxed, like the sleep below: these futures live only while
            // they run, not in every waiting request's.
            let sent = Box::pin(self.dispatch(&q.head, &q.bytes, &grant.run)).await;
            let resp = match sent {
                Ok(Sent::Answered(resp)) => resp,
                Ok(Sent::Preempted) => {
                    q.ticket.requeue_after_preempt();
                    continue;
                }
                Err(refusal) => {
                    q.ticket.finish(Outcome::UpstreamError);
                    return Err(refusal);
                }
            };
            if resp.status() == StatusCode::SERVICE_UNAVAILABLE && busy_retries < MAX_BUSY_RETRIES {
                // Ollama's own queue is full: wait in ours instead of failing.
                busy_retries += 1;
                drop(resp);
                Box::pin(tokio::time::sleep(Duration::from_millis(
                    50 * busy_retries as u64,
                )))
                .await;
                q.ticket.requeue_after_busy();
                continue;
            }
            if !grant.run.mark_streaming() {
                // Pre-empted between the upstream's answer and now: nothing
                // reached the client, so requeue as if it came earlier.
                drop(resp);
                q.ticket.requeue_after_preempt();
                continue;
            }
            return Ok(relay(resp, &grant, q.ticket));
        }
    }

    /// Phase 2: hands the request to the scheduler, which queues it or
    /// refuses it at once.
    async fn submit(
        &self,
        head: &Head,
        path: &str,
        meta: BodyMeta,
        body_bytes: usize,
        remote: SocketAddr,
        arrival: Instant,
    ) -> Result<Ticket, Refusal> {
        let live = self.live.load();
        let header_str = |h: &HeaderName| {
            head.headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let rmeta = RequestMeta {
            path: path.to_string(),
            model: meta.model.into(),
            stream: meta.stream,
            priority_header: head
                .headers
                .get("x-priority")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            tenant: live
                .tenant_header
                .as_ref()
                .and_then(header_str)
                .map(Into::into),
            num_predict: meta.num_predict,
            body_bytes: body_bytes as u64,
            client_key: header_str(&live.key_header).unwrap_or_else(|| remote.ip().to_string()),
            arrival,
        };
        drop(live);
        self.sched.submit(rmeta).await.map_err(|e| match e {
            SubmitError::QueueFull => Refusal::QueueFull {
                max_waiting: self.limits.max_waiting,
            },
            SubmitError::ShuttingDown => Refusal::ShuttingDown,
            SubmitError::Rejected { arm, rejection } => Refusal::RejectedByPolicy {
                arm,
                status: rejection.status,
                message: rejection.message,
            },
        })
    }

    /// Phase 4: sends the request upstream and waits for the answer's head,
    /// unless the policy pre-empts it first.
    async fn dispatch(&self, head: &Head, bytes: &Bytes, run: &Run) -> Result<Sent, Refusal> {
        let up = self.upstream_request(head, full(bytes.clone()));
        let sent = tokio::select! {
            biased;
            _ = run.preempt.cancelled() => None,
            r = tokio::time::timeout(self.first_byte_timeout, self.client.request(up)) => Some(r),
        };
        match sent {
            // The upstream request was dropped (its connection closed) when
            // the select ended.
            None => Ok(Sent::Preempted),
            Some(Err(_elapsed)) => Err(Refusal::UpstreamTimeout {
                seconds: self.first_byte_timeout.as_secs(),
            }),
            Some(Ok(Err(e))) => Err(self.unreachable(&e)),
            Some(Ok(Ok(resp))) => {
                run.mark_upstream_first_byte();
                Ok(Sent::Answered(resp))
            }
        }
    }
}

/// Phase 3: waits until the policy starts the request, or refuses it.
async fn wait_for_slot(ticket: &mut Ticket) -> Result<Grant, Refusal> {
    ticket
        .wait_start()
        .await
        .map_err(|rejection| Refusal::RejectedWhileWaiting {
            arm: ticket.arm().clone(),
            status: rejection.status,
            message: rejection.message,
        })
}

/// Phase 5: the upstream's answer with maitre's headers, its body relayed
/// chunk by chunk; `ticket` ends when the body does.
fn relay(resp: Response<Incoming>, grant: &Grant, ticket: Ticket) -> Response<ProxyBody> {
    let (mut p, body) = resp.into_parts();
    p.headers = strip_hop_by_hop(&p.headers);
    set_header(&mut p.headers, "x-maitre-arm", &grant.arm);
    set_header(
        &mut p.headers,
        "x-maitre-queue-ms",
        &format!("{:.3}", grant.queue_wait.as_secs_f64() * 1000.0),
    );
    if grant.preemptions > 0 {
        set_header(
            &mut p.headers,
            "x-maitre-preempted",
            &grant.preemptions.to_string(),
        );
    }
    let failed = !p.status.is_success();
    let framing = Framing::of(
        p.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    );
    let body = TrackedBody::new(body, grant.run.clone(), ticket, failed, framing);
    Response::from_parts(p, body.boxed())
}

/// A body already in memory, as a [`ProxyBody`].
fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|e| match e {}).boxed()
}
