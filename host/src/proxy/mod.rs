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
//! Ollama/OpenAI error shape; `headers` the header hygiene; `live` the
//! settings hot reload swaps.

mod aggregate;
mod body;
mod budget;
mod error_shape;
mod head;
mod headers;
mod link;
mod live;
mod read;
mod refusal;
mod rewrite;
mod room;
mod scheduled;
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
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use self::budget::BodyBudget;
use self::head::Head;
use self::read::BodyLimits;
use self::room::QueueRoom;
use crate::config::{Config, Limits};
use crate::escape::Escaped;
use crate::metrics::Metrics;
// The proxy's only door into the scheduler: the submodules use these items
// through `super::`.
use crate::scheduler::{Grant, Outcome, RequestMeta, Run, SchedulerHandle, SubmitError, Ticket};

pub use self::error_shape::error_response;
pub use self::headers::strip_hop_by_hop;
pub use self::live::LiveSettings;
pub use self::refusal::Refusal;
pub use crate::request::{BodyMeta, SCHEDULED_PATHS, extract_meta, scheduled_path};

/// Boxed error for bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every response maitre sends.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// An error with its causes, `a: b: c` (the first one alone rarely says why).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s = format!("{s}: {c}");
        src = c.source();
    }
    s
}

/// The future serving one request. Boxed: hyper keeps room for one per
/// connection from the moment it opens, so an idle connection costs a
/// pointer, and a request's future only its own size.
pub type Handling = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

/// The proxy's shared state.
pub struct Proxy {
    sched: SchedulerHandle,
    client: Client<link::Connector, ProxyBody>,
    base: String,
    host: HeaderValue,
    limits: Limits,
    body_limits: BodyLimits,
    budget: Arc<BodyBudget>,
    room: QueueRoom,
    first_byte_timeout: Duration,
    metrics: Arc<Metrics>,
    /// Settings hot reload swaps.
    pub live: ArcSwap<LiveSettings>,
}

impl Proxy {
    /// Builds the proxy for a validated config.
    pub fn new(cfg: &Config, sched: SchedulerHandle, metrics: Arc<Metrics>) -> Proxy {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(Duration::from_millis(cfg.upstream.connect_timeout_ms)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(link::Connector(conn));
        let url = &cfg.upstream.url;
        let authority = url
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        let prefix = url.path().trim_end_matches('/');
        Proxy {
            sched,
            client,
            base: format!("http://{authority}{prefix}"),
            host: HeaderValue::from_str(&authority)
                .unwrap_or(HeaderValue::from_static("localhost")),
            limits: cfg.limits.clone(),
            body_limits: BodyLimits {
                max_bytes: cfg.limits.max_body_bytes,
                timeout: Duration::from_secs(cfg.limits.body_read_timeout_seconds),
            },
            budget: BodyBudget::new(cfg.limits.max_total_body_bytes, metrics.clone()),
            room: QueueRoom::default(),
            first_byte_timeout: Duration::from_secs(cfg.upstream.first_byte_timeout_seconds),
            metrics,
            live: ArcSwap::from_pointee(LiveSettings::from_config(cfg)),
        }
    }

    /// Serves one request; never fails (errors become Ollama-style answers).
    pub fn handle(self: Arc<Self>, req: Request<Incoming>, remote: SocketAddr) -> Handling {
        let arrival = Instant::now();
        // The path as Ollama's router will see it (percent-decoded): every
        // POST to a scheduled path takes a slot, however it is spelled.
        if let Some(path) = scheduled_path(req.method(), req.uri().path()) {
            let path = path.to_string();
            self.scheduled(req, remote, arrival, path)
        } else {
            self.metrics.passthrough.inc();
            let path = req.uri().path().to_string();
            Box::pin(async move { Ok(self.passthrough(req, &path).await) })
        }
    }

    /// The upstream twin of a client request: same method, path and query,
    /// headers minus hop-by-hop ones, and the upstream's `Host`.
    fn upstream_request(&self, head: &Head, body: ProxyBody) -> Request<ProxyBody> {
        let pq = head.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let uri: Uri = format!("{}{}", self.base, pq)
            .parse()
            .unwrap_or_else(|_| Uri::from_static("/"));
        let mut r = Request::new(body);
        *r.method_mut() = head.method.clone();
        *r.uri_mut() = uri;
        *r.headers_mut() = strip_hop_by_hop(&head.headers);
        // Ollama bound to loopback answers 403 to a foreign Host.
        r.headers_mut().insert(header::HOST, self.host.clone());
        r
    }

    /// Sends a request upstream as it is and streams the answer back.
    async fn passthrough(&self, req: Request<Incoming>, path: &str) -> Response<ProxyBody> {
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
        let up = self.upstream_request(head, body);
        match self.client.request(up).await {
            Ok(resp) => {
                let (mut p, b) = resp.into_parts();
                p.headers = strip_hop_by_hop(&p.headers);
                Ok(Response::from_parts(
                    p,
                    b.map_err(|e| Box::new(e) as BoxError).boxed(),
                ))
            }
            Err(e) => Err(self.unreachable(&e)),
        }
    }

    /// The refusal for an upstream that cannot be reached, logged with the
    /// whole chain of causes (the first one alone rarely says why).
    fn unreachable(&self, e: &hyper_util::client::legacy::Error) -> Refusal {
        let detail = error_chain(e);
        tracing::warn!(upstream = %self.base, error = %Escaped(&detail), "upstream unreachable");
        Refusal::UpstreamUnreachable {
            upstream: self.base.clone(),
            detail,
        }
    }
}
