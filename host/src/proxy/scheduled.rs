//! The scheduled path, in phases: read the body → submit it to the scheduler →
//! wait for a slot → dispatch it upstream → relay the answer.
//!
//! Each phase that can fail returns a [`Refusal`]; [`Proxy::scheduled`] turns
//! it into the one HTTP answer. Pre-emption and upstream-busy answers loop back
//! to waiting for a slot, as long as nothing has reached the client.
//!
//! The upstream always streams: a client that asked for no stream has its
//! body rewritten to ask for one (`rewrite`), and its answer is read whole
//! while the request is still pre-emptible and folded into the non-streamed
//! answer (`whole`).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::request::Parts;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;

use std::sync::Arc;

use super::body::{Framing, TrackedBody};
use super::headers::{set_header, strip_hop_by_hop};
use super::link::Link;
use super::refusal::Refusal;
use super::rewrite::ask_for_stream;
use super::whole::{self, Whole};
use super::{
    BodyMeta, Grant, Outcome, Proxy, ProxyBody, RequestMeta, Run, SubmitError, Ticket, extract_meta,
};
use crate::escape::Escaped;

/// Upstream 503 answers retried through maitre's queue before passing one on.
const MAX_BUSY_RETRIES: u32 = 3;

/// Upstream connections that failed before anything reached the client (a
/// kept-alive connection the upstream had closed, a stream lost while being
/// folded), retried through maitre's queue before the request fails.
const MAX_LOST_RETRIES: u32 = 2;

/// What became of one dispatch upstream.
enum Sent {
    /// The upstream answered (its head, at least), on this connection.
    Answered(Response<Incoming>, Arc<Link>),
    /// The policy pre-empted the request before the upstream answered; the
    /// upstream request was dropped, closing its connection.
    Preempted,
    /// The connection failed after it was made, before an answer (e.g.
    /// "connection closed before message completed" on a kept-alive one).
    Lost(hyper_util::client::legacy::Error),
}

impl Proxy {
    /// Serves a scheduled request; every refusal becomes an error answer.
    pub(super) async fn scheduled(
        &self,
        req: Request<Incoming>,
        remote: SocketAddr,
        arrival: Instant,
        path: String,
    ) -> Response<ProxyBody> {
        match self.phases(req, remote, arrival, &path).await {
            Ok(r) => r,
            Err(refusal) => refusal.into_response(&path, self.limits.retry_after_seconds),
        }
    }

    /// The phases in order, with the loop back to waiting after a pre-emption
    /// or an upstream-busy answer.
    async fn phases(
        &self,
        req: Request<Incoming>,
        remote: SocketAddr,
        arrival: Instant,
        path: &str,
    ) -> Result<Response<ProxyBody>, Refusal> {
        let (parts, body) = req.into_parts();
        let bytes = self.read_body(body).await?;
        // Scheduled whatever the body: one maitre cannot read (bad JSON, no
        // model) gets an empty model, and Ollama answers it with its own
        // error when its turn comes. Passing it on without a slot would let
        // a body Ollama reads differently skip the scheduler.
        let meta = extract_meta(path, &bytes);
        // The upstream streams, whatever the client asked for.
        let (upstream_body, fold) = match ask_for_stream(path, &bytes, meta.stream) {
            Some(s) => (s.body, Some(s.api)),
            None => (bytes.clone(), None),
        };
        let mut ticket = self
            .submit(&parts, path, meta, bytes.len(), remote, arrival)
            .await?;
        let mut busy_retries = 0u32;
        let mut lost_retries = 0u32;
        loop {
            let grant = wait_for_slot(&mut ticket).await?;
            let sent = self
                .dispatch(&parts, &upstream_body, &grant.run, &mut ticket)
                .await;
            let (resp, link) = match sent {
                Ok(Sent::Answered(resp, link)) => (resp, link),
                Ok(Sent::Preempted) => {
                    ticket.requeue_after_preempt();
                    continue;
                }
                Ok(Sent::Lost(e)) if lost_retries < MAX_LOST_RETRIES => {
                    lost_retries += 1;
                    self.retry_lost(&mut ticket, &super::error_chain(&e), lost_retries);
                    continue;
                }
                Ok(Sent::Lost(e)) => {
                    ticket.finish(Outcome::UpstreamError);
                    return Err(self.unreachable(&e));
                }
                Err(refusal) => {
                    ticket.finish(Outcome::UpstreamError);
                    return Err(refusal);
                }
            };
            if resp.status() == StatusCode::SERVICE_UNAVAILABLE && busy_retries < MAX_BUSY_RETRIES {
                // Ollama's own queue is full: wait in ours instead of failing.
                busy_retries += 1;
                drop(resp);
                tokio::time::sleep(Duration::from_millis(50 * busy_retries as u64)).await;
                ticket.requeue_after_busy();
                continue;
            }
            if let Some(api) = fold.filter(|api| whole::folds(&resp, *api)) {
                let (parts, folded) = match whole::read(resp, api, &grant.run).await {
                    Whole::Folded(parts, folded) => (parts, folded),
                    Whole::Preempted => {
                        // The stream was dropped, closing its connection.
                        ticket.requeue_after_preempt();
                        continue;
                    }
                    Whole::Lost(detail) if lost_retries < MAX_LOST_RETRIES => {
                        lost_retries += 1;
                        self.retry_lost(&mut ticket, &detail, lost_retries);
                        continue;
                    }
                    Whole::Lost(detail) => return Err(whole::broke_off(ticket, detail)),
                };
                if !grant.run.mark_streaming() {
                    // Pre-empted as the stream ended: requeue, as before.
                    ticket.requeue_after_preempt();
                    continue;
                }
                return whole::respond(parts, folded, api, &grant, ticket);
            }
            if !grant.run.mark_streaming() {
                // Pre-empted between the upstream's answer and now: nothing
                // reached the client, so requeue as if it came earlier.
                drop(resp);
                ticket.requeue_after_preempt();
                continue;
            }
            return Ok(relay(resp, &grant, ticket, link));
        }
    }

    /// Puts a request whose upstream connection failed before anything
    /// reached its client back in the queue, logged; the client does not
    /// notice.
    fn retry_lost(&self, ticket: &mut Ticket, detail: &str, retry: u32) {
        tracing::warn!(
            upstream = %self.base,
            error = %Escaped(detail),
            retry,
            max_retries = MAX_LOST_RETRIES,
            "upstream connection failed before anything reached the client; request requeued"
        );
        ticket.requeue_after_lost();
    }

    /// Phase 1: the whole body, within `limits.max_body_bytes` and
    /// `limits.body_read_timeout_seconds`.
    async fn read_body(&self, body: Incoming) -> Result<Bytes, Refusal> {
        let read = Limited::new(body, self.limits.max_body_bytes).collect();
        let body_timeout = Duration::from_secs(self.limits.body_read_timeout_seconds);
        match tokio::time::timeout(body_timeout, read).await {
            Ok(Ok(c)) => Ok(c.to_bytes()),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
                Err(Refusal::BodyTooLarge {
                    limit: self.limits.max_body_bytes,
                })
            }
            Ok(Err(e)) => Err(Refusal::BodyUnreadable {
                detail: e.to_string(),
            }),
            Err(_) => Err(Refusal::BodyTimeout {
                seconds: self.limits.body_read_timeout_seconds,
            }),
        }
    }

    /// Phase 2: hands the request to the scheduler, which queues it or
    /// refuses it at once.
    async fn submit(
        &self,
        parts: &Parts,
        path: &str,
        meta: BodyMeta,
        body_bytes: usize,
        remote: SocketAddr,
        arrival: Instant,
    ) -> Result<Ticket, Refusal> {
        let live = self.live.load();
        let header_str = |h: &HeaderName| {
            parts
                .headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let rmeta = RequestMeta {
            path: path.to_string(),
            model: meta.model.into(),
            stream: meta.stream,
            priority_header: parts
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
    /// unless the policy pre-empts it first. From now on, unless the request
    /// completes, `ticket` frees its slot only once the upstream has let go
    /// of its connection.
    async fn dispatch(
        &self,
        parts: &Parts,
        bytes: &Bytes,
        run: &Run,
        ticket: &mut Ticket,
    ) -> Result<Sent, Refusal> {
        let mut up = self.upstream_request(parts, full(bytes.clone()));
        // The body may have been rewritten: hyper sets the length of the one
        // sent.
        up.headers_mut().remove(header::CONTENT_LENGTH);
        let link = Link::capture(&mut up);
        let abandon = link.clone();
        ticket.dispatched(Box::new(move || abandon.abandon()));
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
            // Connected, then lost: worth another try on another connection.
            Some(Ok(Err(e))) if !e.is_connect() => Ok(Sent::Lost(e)),
            Some(Ok(Err(e))) => Err(self.unreachable(&e)),
            Some(Ok(Ok(resp))) => {
                run.mark_upstream_first_byte();
                link.answered(&resp);
                Ok(Sent::Answered(resp, link))
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
fn relay(
    resp: Response<Incoming>,
    grant: &Grant,
    ticket: Ticket,
    link: Arc<Link>,
) -> Response<ProxyBody> {
    let (mut p, body) = resp.into_parts();
    p.headers = strip_hop_by_hop(&p.headers);
    maitre_headers(&mut p.headers, grant);
    let failed = !p.status.is_success();
    let framing = Framing::of(
        p.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    );
    let body = TrackedBody::new(body, grant.run.clone(), ticket, failed, framing, link);
    Response::from_parts(p, body.boxed())
}

/// maitre's headers on an answer: the arm, the time queued, and how often
/// the request was pre-empted (when it was).
pub(super) fn maitre_headers(h: &mut HeaderMap, grant: &Grant) {
    set_header(h, "x-maitre-arm", &grant.arm);
    set_header(
        h,
        "x-maitre-queue-ms",
        &format!("{:.3}", grant.queue_wait.as_secs_f64() * 1000.0),
    );
    if grant.preemptions > 0 {
        set_header(h, "x-maitre-preempted", &grant.preemptions.to_string());
    }
}

/// A body already in memory, as a [`ProxyBody`].
fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|e| match e {}).boxed()
}
