//! The scheduled path, in phases: read the body → submit it to the scheduler →
//! wait for a slot → dispatch it upstream → relay the answer.
//!
//! Each phase that can fail returns a [`Refusal`]; [`Proxy::scheduled`] turns
//! it into the one HTTP answer. Pre-emption and upstream-busy answers loop back
//! to waiting for a slot, as long as nothing has reached the client.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::request::Parts;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;

use super::body::{Framing, TrackedBody};
use super::headers::{set_header, strip_hop_by_hop};
use super::refusal::Refusal;
use super::{
    BodyMeta, Grant, Outcome, Proxy, ProxyBody, RequestMeta, Run, SubmitError, Ticket, extract_meta,
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
        let mut ticket = self
            .submit(&parts, path, meta, bytes.len(), remote, arrival)
            .await?;
        let mut busy_retries = 0u32;
        loop {
            let grant = wait_for_slot(&mut ticket).await?;
            let resp = match self.dispatch(&parts, &bytes, &grant).await {
                Ok(Sent::Answered(resp)) => resp,
                Ok(Sent::Preempted) => {
                    ticket.requeue_after_preempt();
                    continue;
                }
                // The backend failed before anything reached the client:
                // another backend may answer instead.
                Err(refusal @ Refusal::UpstreamUnreachable { .. })
                    if ticket.failover(grant.backend).await =>
                {
                    tracing::debug!(error = %refusal, "failing over to another backend");
                    continue;
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
            if !grant.run.mark_streaming() {
                // Pre-empted between the upstream's answer and now: nothing
                // reached the client, so requeue as if it came earlier.
                drop(resp);
                ticket.requeue_after_preempt();
                continue;
            }
            return Ok(relay(resp, &grant, ticket));
        }
    }

    /// Phase 1: the whole body, within `limits.max_body_bytes` and
    /// `limits.body_read_timeout_seconds`.
    pub(super) async fn read_body(&self, body: Incoming) -> Result<Bytes, Refusal> {
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

    /// Phase 4: sends the request to the granted backend and waits for the
    /// answer's head, unless the policy pre-empts it first.
    async fn dispatch(&self, parts: &Parts, bytes: &Bytes, grant: &Grant) -> Result<Sent, Refusal> {
        let run: &Run = &grant.run;
        let target = &self.backends[grant.backend];
        let up = target.request(parts, full(bytes.clone()));
        let sent = tokio::select! {
            biased;
            _ = run.preempt.cancelled() => None,
            r = tokio::time::timeout(target.first_byte_timeout, target.client.request(up)) => Some(r),
        };
        match sent {
            // The upstream request was dropped (its connection closed) when
            // the select ended.
            None => Ok(Sent::Preempted),
            Some(Err(_elapsed)) => Err(Refusal::UpstreamTimeout {
                seconds: target.first_byte_timeout.as_secs(),
            }),
            Some(Ok(Err(e))) => Err(target.unreachable(&e)),
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
    set_header(&mut p.headers, "x-maitre-backend", &grant.backend_name);
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
