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
//! hygiene; `live` the settings hot reload swaps.

mod body;
mod error_shape;
mod headers;
mod live;
mod refusal;
mod scheduled;

use std::convert::Infallible;
use std::net::SocketAddr;
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

/// The proxy's shared state.
pub struct Proxy {
    sched: SchedulerHandle,
    client: Client<HttpConnector, ProxyBody>,
    base: String,
    host: HeaderValue,
    limits: Limits,
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
        let up = &cfg.upstreams[0];
        conn.set_connect_timeout(Some(Duration::from_millis(up.connect_timeout_ms)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(conn);
        let url = &up.url;
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
            first_byte_timeout: Duration::from_secs(up.first_byte_timeout_seconds),
            metrics,
            live: ArcSwap::from_pointee(LiveSettings::from_config(cfg)),
        }
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

    /// The upstream twin of a client request: same method, path and query,
    /// headers minus hop-by-hop ones, and the upstream's `Host`.
    fn upstream_request(
        &self,
        parts: &http::request::Parts,
        body: ProxyBody,
    ) -> Request<ProxyBody> {
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let uri: Uri = format!("{}{}", self.base, pq)
            .parse()
            .unwrap_or_else(|_| Uri::from_static("/"));
        let mut r = Request::new(body);
        *r.method_mut() = parts.method.clone();
        *r.uri_mut() = uri;
        *r.headers_mut() = strip_hop_by_hop(&parts.headers);
        // Ollama bound to loopback answers 403 to a foreign Host.
        r.headers_mut().insert(header::HOST, self.host.clone());
        r
    }

    /// Sends a request upstream as it is and streams the answer back.
    async fn passthrough(&self, req: Request<Incoming>, path: &str) -> Response<ProxyBody> {
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
        let up = self.upstream_request(parts, body);
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
        let mut detail = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            detail = format!("{detail}: {s}");
            src = s.source();
        }
        tracing::warn!(upstream = %self.base, error = %Escaped(&detail), "upstream unreachable");
        Refusal::UpstreamUnreachable {
            upstream: self.base.clone(),
            detail,
        }
    }
}
