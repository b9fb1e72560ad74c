//! HTTP in and out: the Ollama-transparent proxy.
//!
//! Generation and embedding requests are scheduled: their body is read (up to
//! `limits.max_body_bytes`), a few fields are extracted the way Ollama reads
//! them, and the request waits for the scheduler's go-ahead before it is sent
//! upstream, whatever its body. Everything else is
//! passed straight through, streamed both ways. Responses are never buffered:
//! each upstream chunk is forwarded as it arrives.
//!
//! One job per file: this one holds [`Proxy`], the entry point and the
//! passthrough; `scheduled` the scheduled path in phases; `body` the relayed
//! response body; `refusal` every answer maitre gives itself and its mapping
//! to HTTP; `error_shape` the Ollama/OpenAI error shape; `headers` the header
//! hygiene; `live` the settings hot reload swaps; `target` one backend's
//! address and client; [`fleet`] and `fanout` the passthrough across
//! several backends.

mod body;
mod error_shape;
mod fanout;
mod fleet;
mod headers;
mod live;
mod refusal;
mod scheduled;
mod target;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;

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

/// The proxy's shared state.
pub struct Proxy {
    sched: SchedulerHandle,
    /// The backends, in config order (a grant names one by index).
    backends: Vec<Target>,
    limits: Limits,
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
            metrics,
            live: ArcSwap::from_pointee(LiveSettings::from_config(cfg)),
        }
    }

    /// The backends, in config order.
    pub fn backends(&self) -> &[Target] {
        &self.backends
    }

    /// Serves one request; never fails (errors become Ollama-style answers).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        remote: SocketAddr,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let arrival = Instant::now();
        // The path as Ollama's router will see it (percent-decoded): every
        // POST to a scheduled path takes a slot, however it is spelled.
        if let Some(path) = scheduled_path(req.method(), req.uri().path()) {
            Ok(self.scheduled(req, remote, arrival, path.to_string()).await)
        } else {
            self.metrics.passthrough.inc();
            let path = req.uri().path().to_string();
            Ok(self.passthrough(req, &path).await)
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
        let (parts, body) = req.into_parts();
        let body = body.map_err(|e| Box::new(e) as BoxError).boxed();
        match self.forward(&parts, body).await {
            Ok(r) => r,
            Err(refusal) => refusal.into_response(path, self.limits.retry_after_seconds),
        }
    }

    /// Sends a request upstream without a slot and streams the answer back,
    /// hop-by-hop headers stripped both ways.
    async fn forward(
        &self,
        parts: &http::request::Parts,
        body: ProxyBody,
    ) -> Result<Response<ProxyBody>, Refusal> {
        let target = &self.backends[0];
        let up = target.request(parts, body);
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
