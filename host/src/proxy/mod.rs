//! HTTP in and out: the Ollama-transparent proxy.
//!
//! Generation and embedding requests are scheduled: once the queue is known
//! to have room, their body is read (up to `limits.max_body_bytes`, within
//! the global `limits.max_total_body_bytes`), a few fields are extracted the way Ollama reads
//! them, and the request waits for the scheduler's go-ahead before it is sent
//! upstream, whatever its body. Everything else is
//! passed straight through, streamed both ways. Streamed responses are never
//! buffered: each upstream chunk is forwarded as it arrives. Generations are
//! always streamed from the upstream; for a client that asked for no stream,
//! maitre reads the stream whole and answers with the non-streamed answer
//! the upstream would have given.
//!
//! One job per file: this one holds [`Proxy`], the entry point and the
//! passthrough; `scheduled` the scheduled path in phases; `room` the queue
//! check made before a body is read; `read` the body read and `budget` the
//! bytes all bodies may hold; `head` a request head that owns its bytes;
//! `body` the relayed response body; `rewrite` the body that asks the
//! upstream for a stream; `whole` and `aggregate` the non-streamed answer
//! folded from the stream; `link` the upstream connections, which maitre can
//! give up on and knows when the upstream has let go of; `refusal` every
//! answer maitre gives itself and its mapping to HTTP; `error_shape` the
//! Ollama/OpenAI error shape; `headers` the header hygiene; `kind` which
//! backends speak a request's API (`/api/*` never goes to an
//! OpenAI-compatible server); `live` the
//! settings hot reload swaps; `target` one backend's address and client;
//! [`fleet`] and `fanout` the passthrough across several backends.

mod aggregate;
mod body;
mod budget;
mod busy;
mod error_shape;
mod fanout;
mod fleet;
mod head;
mod headers;
mod kind;
mod link;
mod live;
mod normalise;
mod read;
mod refusal;
pub(crate) mod resume;
mod rewrite;
mod room;
mod scheduled;
mod target;
mod whole;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;

use self::budget::BodyBudget;
use self::head::Head;
use self::read::BodyLimits;
use self::room::QueueRoom;
use crate::config::{Config, Limits};
use crate::metrics::Metrics;
// The proxy's only door into the scheduler: the submodules use these items
// through `super::`.
use crate::scheduler::{Grant, Outcome, RequestMeta, Run, SchedulerHandle, SubmitError, Ticket};

pub use self::error_shape::error_response;
pub use self::fleet::BACKEND_HEADER;
pub use self::headers::strip_hop_by_hop;
pub use self::live::LiveSettings;
pub use self::refusal::Refusal;
pub use self::target::{Fetched, Target};
pub use crate::request::{BodyMeta, SCHEDULED_PATHS, extract_meta, scheduled_path};

/// Boxed error for bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every response maitre sends.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// The future serving one request. Boxed: hyper keeps room for one per
/// connection from the moment it opens, so an idle connection costs a
/// pointer, and a request's future only its own size.
pub type Handling = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

/// The proxy's shared state.
pub struct Proxy {
    sched: SchedulerHandle,
    /// The backends, in config order (a grant names one by index).
    backends: Vec<Target>,
    limits: Limits,
    body_limits: BodyLimits,
    budget: Arc<BodyBudget>,
    room: QueueRoom,
    metrics: Arc<Metrics>,
    /// Settings hot reload swaps.
    pub live: ArcSwap<LiveSettings>,
}

impl Proxy {
    /// Builds the proxy for a validated config.
    pub fn new(cfg: &Config, sched: SchedulerHandle, metrics: Arc<Metrics>) -> Proxy {
        Proxy {
            sched,
            backends: cfg.upstreams.iter().map(Target::new).collect(),
            limits: cfg.limits.clone(),
            body_limits: BodyLimits {
                max_bytes: cfg.limits.max_body_bytes,
                timeout: Duration::from_secs(cfg.limits.body_read_timeout_seconds),
            },
            budget: BodyBudget::new(cfg.limits.max_total_body_bytes, metrics.clone()),
            room: QueueRoom::default(),
            metrics,
            live: ArcSwap::from_pointee(LiveSettings::from_config(cfg)),
        }
    }

    /// The backends, in config order.
    pub fn backends(&self) -> &[Target] {
        &self.backends
    }

    /// The whole body of a passthrough request maitre reads itself (a
    /// fan-out to every backend, a model lookup), within the same limits
    /// as a scheduled one; the bytes count against the budget while held.
    async fn read_body(&self, mut body: Incoming) -> Result<(Bytes, budget::Held), Refusal> {
        read::read_body(&mut body, &self.body_limits, &self.budget).await
    }

    /// Serves one request; never fails (errors become Ollama-style answers).
    pub fn handle(self: Arc<Self>, req: Request<Incoming>, remote: SocketAddr) -> Handling {
        let arrival = Instant::now();
        // The path as Ollama's router will see it (percent-decoded): every
        // POST to a scheduled path takes a slot, however it is spelled.
        if let Some(path) = scheduled_path(req.method(), req.uri().path()) {
            let path = path.to_string();
            if let Some(refusal) = self.unserved(&path) {
                // Nothing to schedule it on: answered at once, body unread.
                read::discard(req.into_body());
                let retry = self.limits.retry_after_seconds;
                return Box::pin(async move { Ok(refusal.into_response(&path, retry)) });
            }
            self.scheduled(req, remote, arrival, path)
        } else {
            self.metrics.passthrough.inc();
            let path = req.uri().path().to_string();
            Box::pin(async move { Ok(self.passthrough(req, &path).await) })
        }
    }

    /// Sends a request upstream as it is and streams the answer back; with
    /// several backends, answers for the whole fleet ([`fleet`]).
    async fn passthrough(&self, req: Request<Incoming>, path: &str) -> Response<ProxyBody> {
        if self.backends.len() > 1 {
            return match self.fleet_passthrough(req, path).await {
                Ok(r) => r,
                Err(refusal) => refusal.into_response(path, self.limits.retry_after_seconds),
            };
        }
        if let Some(refusal) = self.unserved(path) {
            read::discard(req.into_body());
            return refusal.into_response(path, self.limits.retry_after_seconds);
        }
        let (parts, body) = req.into_parts();
        let body = body.map_err(|e| Box::new(e) as BoxError).boxed();
        match self.forward(&Head::own(parts), body).await {
            Ok(r) => r,
            Err(refusal) => refusal.into_response(path, self.limits.retry_after_seconds),
        }
    }

    /// Sends a request upstream without a slot and streams the answer back,
    /// hop-by-hop headers stripped both ways.
    async fn forward(&self, head: &Head, body: ProxyBody) -> Result<Response<ProxyBody>, Refusal> {
        let target = &self.backends[0];
        let up = target.upstream(head, body);
        match target.client.request(up).await {
            Ok(resp) => {
                let (mut p, b) = resp.into_parts();
                p.headers = strip_hop_by_hop(&p.headers);
                Ok(Response::from_parts(
                    p,
                    b.map_err(|e| Box::new(e) as BoxError).boxed(),
                ))
            }
            Err(e) => Err(target.unreachable(&e)),
        }
    }
}
