//! The scheduled path, in phases: check the queue has room → read the body →
//! submit it to the scheduler → wait for a slot → dispatch it upstream →
//! relay the answer.
//!
//! Each phase that can fail returns a [`Refusal`]; [`Proxy::scheduled`] turns
//! it into the one HTTP answer. Pre-emption and upstream-busy answers loop back
//! to waiting for a slot, as long as nothing has reached the client.
//!
//! The upstream always streams: a client that asked for no stream has its
//! body rewritten to ask for one (`rewrite`), and its answer is read whole
//! while the request is still pre-emptible and folded into the non-streamed
//! answer (`whole`).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::aggregate::{Api, Partial};
use super::body::{Framing, TrackedBody};
use super::budget::Held;
use super::head::{Head, PackedHead};
use super::headers::{set_header, strip_hop_by_hop};
use super::link::Link;
use super::normalise::normalise;
use super::read::{discard, read_body};
use super::refusal::Refusal;
use super::resume;
use super::rewrite::{ask_for_stream, takes_priority, with_priority};
use super::whole::{self, Whole};
use super::{
    BodyMeta, Grant, Handling, Outcome, Proxy, ProxyBody, RequestMeta, Run, SubmitError, Target,
    Ticket, extract_meta,
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

/// The retries a request has used, over all its go-aheads.
#[derive(Default)]
struct Retries {
    /// Upstream 503 answers waited out in maitre's queue.
    busy: u32,
    /// Upstream connections lost before anything reached the client.
    lost: u32,
}

/// What one go-ahead came to.
#[allow(
    clippy::large_enum_variant,
    reason = "returned once per go-ahead; boxing the request would cost an allocation per requeue"
)]
enum Attempt {
    /// The answer, or the refusal, the client gets.
    Done(Result<Response<ProxyBody>, Refusal>),
    /// Back in the queue (pre-empted, the upstream busy, or its connection
    /// lost before anything reached the client), to wait again.
    Requeued(Queued),
}

/// Phases 3–5 of a queued request, boxed: while it waits, this future and
/// its [`Queued`] state are all the memory a request has of its own.
type Waiting = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Refusal>> + Send>>;

/// A request that is read and queued: all it keeps while it waits.
struct Queued {
    /// What is sent upstream of the request's head.
    head: PackedHead,
    /// The body sent upstream (rewritten to ask for a stream when the
    /// client asked for none).
    bytes: Bytes,
    /// Set when the answer is folded back into a non-streamed one.
    fold: Option<Api>,
    /// A chat (its answer folded) whose pre-empted generation resumes
    /// (`resume_preempted`).
    resumes: bool,
    /// The answer so far of the pre-empted generation the next dispatch
    /// continues; boxed, as most requests never have one.
    partial: Option<Box<Partial>>,
    /// A `/v1` generation: a backend with `pass_priority` is told the
    /// request's class in its body.
    takes_priority: bool,
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
        // `[models."NAME"]`: the model's settings, whatever the client asked.
        let rule = self.live.load().models.get(&meta.model).cloned();
        let resumes = resume::resumes(rule.as_ref(), &path, meta.stream);
        let bytes = match rule.and_then(|r| normalise(&path, &bytes, &r)) {
            Some(normalised) => {
                self.metrics.normalised_requests.inc();
                normalised
            }
            None => bytes,
        };
        // The upstream streams, whatever the client asked for.
        let (upstream_body, fold) = match ask_for_stream(&path, &bytes, meta.stream) {
            Some(s) => (s.body, Some(s.api)),
            None => (bytes.clone(), None),
        };
        let submitted = self
            .submit(&head, &path, meta, bytes.len(), remote, arrival)
            .await;
        // Submitted: it counts among the waiting now (or was refused).
        drop(reading);
        drop(bytes);
        let queued = Queued {
            head: PackedHead::pack(&head),
            bytes: upstream_body,
            // Only an answer maitre folds has an answer so far to keep.
            resumes: resumes && fold.is_some(),
            partial: None,
            fold,
            takes_priority: takes_priority(&path),
            _held: held,
            ticket: submitted?,
        };
        Ok(Box::pin(self.run(queued)))
    }

    /// Phases 3–5, with the loop back to waiting after a pre-emption or an
    /// upstream-busy answer.
    ///
    /// While it waits, this future holds `q` and little else: what one
    /// go-ahead needs (the grant, the upstream's answer, its folding) lives
    /// in [`Proxy::attempt`]'s future, boxed, which exists only while it
    /// runs. Inline, that state made every waiting request's future 1,096
    /// bytes; apart, it is 416, most of them `q`'s 336.
    ///
    /// An `async` block rather than an `async fn`: an `async fn` keeps its
    /// arguments apart from its locals, which held `q` twice.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn would hold its argument twice"
    )]
    fn run(
        self: Arc<Self>,
        mut q: Queued,
    ) -> impl Future<Output = Result<Response<ProxyBody>, Refusal>> + Send {
        async move {
            let mut retries = Retries::default();
            loop {
                let grant = wait_for_slot(&mut q.ticket).await?;
                match Box::pin(self.attempt(q, grant, &mut retries)).await {
                    Attempt::Done(answer) => return answer,
                    Attempt::Requeued(back) => q = back,
                }
            }
        }
    }

    /// Phases 4–5 for one go-ahead: dispatch upstream, then relay the
    /// answer (or fold it), unless the request goes back to the queue.
    async fn attempt(&self, mut q: Queued, grant: Grant, retries: &mut Retries) -> Attempt {
        // Boxed, like the sleep below: these futures live only while they
        // run, not in this one for its whole life.
        let head = q.head.unpack();
        let target = &self.backends[grant.backend];
        let (body, seed) = self.body_for(&q, &grant);
        let sent = Box::pin(self.dispatch(&head, &body, &grant, &mut q.ticket)).await;
        drop(body);
        let (resp, link) = match sent {
            Ok(Sent::Answered(resp, link)) => (resp, link),
            Ok(Sent::Preempted) => {
                q.ticket.requeue_after_preempt();
                return Attempt::Requeued(q);
            }
            Ok(Sent::Lost(e)) if retries.lost < MAX_LOST_RETRIES => {
                retries.lost += 1;
                let detail = super::target::causes(&e);
                retry_lost(target, &mut q.ticket, &detail, retries.lost);
                return Attempt::Requeued(q);
            }
            // Lost again and again: the backend itself may be gone, and
            // another backend may answer instead.
            Ok(Sent::Lost(e)) => {
                let refusal = target.unreachable(&e);
                if q.ticket.failover(grant.backend).await {
                    tracing::debug!(error = %refusal, "failing over to another backend");
                    return Attempt::Requeued(q);
                }
                q.ticket.finish(Outcome::UpstreamError);
                return Attempt::Done(Err(refusal));
            }
            // The backend failed before anything reached the client:
            // another backend may answer instead.
            Err(refusal @ Refusal::UpstreamUnreachable { .. })
                if q.ticket.failover(grant.backend).await =>
            {
                tracing::debug!(error = %refusal, "failing over to another backend");
                return Attempt::Requeued(q);
            }
            Err(refusal) => {
                q.ticket.finish(Outcome::UpstreamError);
                return Attempt::Done(Err(refusal));
            }
        };
        if resp.status() == StatusCode::SERVICE_UNAVAILABLE && retries.busy < MAX_BUSY_RETRIES {
            // Ollama's own queue is full: wait in ours instead of failing.
            retries.busy += 1;
            drop(resp);
            Box::pin(tokio::time::sleep(Duration::from_millis(
                50 * retries.busy as u64,
            )))
            .await;
            q.ticket.requeue_after_busy();
            return Attempt::Requeued(q);
        }
        if let Some(api) = q.fold.filter(|api| whole::folds(&resp, *api)) {
            let read = Box::pin(whole::read(resp, api, &grant.run, seed.as_ref())).await;
            let (parts, folded) = match read {
                Whole::Folded(parts, folded) => (parts, folded),
                Whole::Preempted(partial) => {
                    // The stream was dropped, closing its connection.
                    let kept = if q.resumes {
                        self.keep(&mut q, partial, seed.as_ref(), &grant)
                    } else {
                        0
                    };
                    q.ticket.requeue_after_preempt_keeping(kept);
                    return Attempt::Requeued(q);
                }
                Whole::Lost(detail) if retries.lost < MAX_LOST_RETRIES => {
                    retries.lost += 1;
                    retry_lost(target, &mut q.ticket, &detail, retries.lost);
                    return Attempt::Requeued(q);
                }
                Whole::Lost(detail) => {
                    return Attempt::Done(Err(whole::broke_off(q.ticket, detail)));
                }
            };
            if !grant.run.mark_streaming() {
                // Pre-empted as the stream ended: requeue, as before.
                q.ticket.requeue_after_preempt();
                return Attempt::Requeued(q);
            }
            return Attempt::Done(whole::respond(parts, folded, api, &grant, q.ticket));
        }
        if !grant.run.mark_streaming() {
            // Pre-empted between the upstream's answer and now: nothing
            // reached the client, so requeue as if it came earlier.
            drop(resp);
            q.ticket.requeue_after_preempt();
            return Attempt::Requeued(q);
        }
        Attempt::Done(Ok(relay(resp, &grant, q.ticket, link)))
    }

    /// The body for the granted backend, and the answer so far it
    /// continues: the request's body, or the one that resumes its
    /// pre-empted generation (`resume`); with the request's priority in it
    /// when that backend takes one (`pass_priority`).
    fn body_for(&self, q: &Queued, grant: &Grant) -> (Bytes, Option<Partial>) {
        let resumed = q.partial.as_deref().and_then(|p| {
            let path = q.fold?.chat_path()?;
            resume::continued(path, &q.bytes, p).map(|b| (b, p.clone()))
        });
        let (bytes, seed) = match resumed {
            Some((b, p)) => (b, Some(p)),
            None => (q.bytes.clone(), None),
        };
        let body = match self.backends[grant.backend].pass_priority {
            Some(p) if q.takes_priority => {
                with_priority(&bytes, p.value(grant.class)).unwrap_or(bytes)
            }
            _ => bytes,
        };
        (body, seed)
    }

    /// After a pre-emption: keeps the answer so far of a resumable chat for
    /// the next dispatch to continue, and returns the tokens of this
    /// dispatch kept (counted). `seed`: the answer so far this dispatch had
    /// continued.
    fn keep(
        &self,
        q: &mut Queued,
        partial: Option<Partial>,
        seed: Option<&Partial>,
        grant: &Grant,
    ) -> u64 {
        let before = seed.map_or(0, |s| s.tokens);
        let kept = partial
            .as_ref()
            .map_or(0, |p| p.tokens.saturating_sub(before));
        if kept > 0 {
            let label = crate::metrics::ArmLabel {
                arm: grant.arm.to_string(),
            };
            self.metrics
                .resumed_tokens
                .get_or_create(&label)
                .inc_by(kept);
        }
        // Nothing new to continue from (pre-empted before a token): what
        // this dispatch continued still stands.
        q.partial = partial.or_else(|| seed.cloned()).map(Box::new);
        kept
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

    /// Phase 4: sends the request to the granted backend and waits for the
    /// answer's head, unless the policy pre-empts it first. From now on,
    /// unless the request completes, `ticket` frees its slot only once the
    /// upstream has let go of its connection.
    async fn dispatch(
        &self,
        head: &Head,
        bytes: &Bytes,
        grant: &Grant,
        ticket: &mut Ticket,
    ) -> Result<Sent, Refusal> {
        let run: &Run = &grant.run;
        let target = &self.backends[grant.backend];
        let mut up = target.upstream(head, full(bytes.clone()));
        // The body may have been rewritten: hyper sets the length of the one
        // sent.
        up.headers_mut().remove(header::CONTENT_LENGTH);
        let link = Link::capture(&mut up);
        let abandon = link.clone();
        ticket.dispatched(Box::new(move || abandon.abandon()));
        let send = async {
            // The engine's own count of busy slots, where it is read.
            target.engine_room().await;
            tokio::time::timeout(target.first_byte_timeout, target.client.request(up)).await
        };
        let sent = tokio::select! {
            biased;
            _ = run.preempt.cancelled() => None,
            r = send => Some(r),
        };
        match sent {
            // The upstream request was dropped (its connection closed) when
            // the select ended.
            None => Ok(Sent::Preempted),
            Some(Err(_elapsed)) => Err(Refusal::UpstreamTimeout {
                seconds: target.first_byte_timeout.as_secs(),
            }),
            // Connected, then lost: worth another try on another connection.
            Some(Ok(Err(e))) if !e.is_connect() => Ok(Sent::Lost(e)),
            Some(Ok(Err(e))) => Err(target.unreachable(&e)),
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
    set_header(h, "x-maitre-backend", &grant.backend_name);
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

/// Puts a request whose upstream connection failed before anything
/// reached its client back in the queue, logged; the client does not
/// notice.
fn retry_lost(target: &Target, ticket: &mut Ticket, detail: &str, retry: u32) {
    tracing::warn!(
        backend = %target.name,
        upstream = %target.base,
        error = %Escaped(detail),
        retry,
        max_retries = MAX_LOST_RETRIES,
        "upstream connection failed before anything reached the client; request requeued"
    );
    ticket.requeue_after_lost();
}
