//! HTTP in and out: the Ollama-transparent proxy.
//!
//! Generation and embedding requests are scheduled: their body is read (up to
//! `limits.max_body_bytes`), a few fields are extracted, and the request waits
//! for the scheduler's go-ahead before it is sent upstream. Everything else is
//! passed straight through, streamed both ways. Responses are never buffered:
//! each upstream chunk is forwarded as it arrives.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::config::{Config, Limits};
use crate::metrics::Metrics;
use crate::scheduler::{Outcome, RequestMeta, Run, SchedulerHandle, SubmitError, Ticket};

/// Boxed error for bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every response maitre sends.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

pub use crate::request::{BodyMeta, SCHEDULED_PATHS, extract_meta, is_scheduled};

/// Settings that hot reload may change.
#[derive(Debug, Clone)]
pub struct LiveSettings {
    /// Header carrying the sticky A/B key.
    pub key_header: HeaderName,
    /// Header carrying the tenant.
    pub tenant_header: Option<HeaderName>,
}

impl LiveSettings {
    /// From a validated config.
    pub fn from_config(c: &Config) -> LiveSettings {
        LiveSettings {
            key_header: HeaderName::from_bytes(c.ab.key_header.as_bytes())
                .unwrap_or(HeaderName::from_static("x-maitre-key")),
            tenant_header: c
                .tenant_header
                .as_ref()
                .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
        }
    }
}

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
        conn.set_connect_timeout(Some(Duration::from_millis(cfg.upstream.connect_timeout_ms)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(conn);
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
            first_byte_timeout: Duration::from_secs(cfg.upstream.first_byte_timeout_seconds),
            metrics,
            live: ArcSwap::from_pointee(LiveSettings::from_config(cfg)),
        }
    }

    /// The host limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Serves one request; never fails (errors become Ollama-style answers).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        remote: SocketAddr,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let arrival = Instant::now();
        let path = req.uri().path().to_string();
        if is_scheduled(req.method(), &path) {
            Ok(self.scheduled(req, remote, arrival, path).await)
        } else {
            self.metrics.passthrough.inc();
            Ok(self.passthrough(req, &path).await)
        }
    }

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

    async fn passthrough(&self, req: Request<Incoming>, path: &str) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let up = self.upstream_request(&parts, body.map_err(|e| Box::new(e) as BoxError).boxed());
        match self.client.request(up).await {
            Ok(resp) => {
                let (mut p, b) = resp.into_parts();
                p.headers = strip_hop_by_hop(&p.headers);
                Response::from_parts(p, b.map_err(|e| Box::new(e) as BoxError).boxed())
            }
            Err(e) => self.unreachable(path, &e),
        }
    }

    fn unreachable(
        &self,
        path: &str,
        e: &hyper_util::client::legacy::Error,
    ) -> Response<ProxyBody> {
        let mut detail = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            detail = format!("{detail}: {s}");
            src = s.source();
        }
        tracing::warn!(upstream = %self.base, error = %detail, "upstream unreachable");
        error_response(
            StatusCode::BAD_GATEWAY,
            path,
            &format!(
                "maitre: upstream {} is unreachable ({detail}); is Ollama running?",
                self.base
            ),
            None,
        )
    }

    async fn scheduled(
        &self,
        req: Request<Incoming>,
        remote: SocketAddr,
        arrival: Instant,
        path: String,
    ) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let read = Limited::new(body, self.limits.max_body_bytes).collect();
        let body_timeout = Duration::from_secs(self.limits.body_read_timeout_seconds);
        let bytes = match tokio::time::timeout(body_timeout, read).await {
            Ok(Ok(c)) => c.to_bytes(),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return error_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &path,
                    &format!(
                        "maitre: request body is larger than {} bytes (limits.max_body_bytes)",
                        self.limits.max_body_bytes
                    ),
                    None,
                );
            }
            Ok(Err(e)) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    &path,
                    &format!("maitre: could not read the request body: {e}"),
                    None,
                );
            }
            Err(_) => {
                return error_response(
                    StatusCode::REQUEST_TIMEOUT,
                    &path,
                    &format!(
                        "maitre: the request body did not arrive within {} s (limits.body_read_timeout_seconds)",
                        self.limits.body_read_timeout_seconds
                    ),
                    None,
                );
            }
        };
        let Some(meta) = extract_meta(&path, &bytes) else {
            // Not something we can schedule (bad JSON, no model): Ollama
            // answers it with its own error at once, without a slot.
            self.metrics.passthrough.inc();
            return self.send_unscheduled(&parts, bytes, &path).await;
        };
        let live = self.live.load();
        let header_str = |h: &HeaderName| {
            parts
                .headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let rmeta = RequestMeta {
            path: path.clone(),
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
            body_bytes: bytes.len() as u64,
            client_key: header_str(&live.key_header).unwrap_or_else(|| remote.ip().to_string()),
            arrival,
        };
        drop(live);
        let mut ticket = match self.sched.submit(rmeta).await {
            Ok(t) => t,
            Err(SubmitError::QueueFull) => {
                return error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &path,
                    &format!(
                        "server busy, please try again.  maitre: {} requests are already waiting (limits.max_waiting)",
                        self.limits.max_waiting
                    ),
                    Some(self.limits.retry_after_seconds),
                );
            }
            Err(SubmitError::ShuttingDown) => {
                return error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &path,
                    "maitre is shutting down; retry shortly",
                    Some(self.limits.retry_after_seconds),
                );
            }
            Err(SubmitError::Rejected { arm, rejection }) => {
                let status = StatusCode::from_u16(rejection.status)
                    .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                let retry = (status == StatusCode::SERVICE_UNAVAILABLE
                    || status == StatusCode::TOO_MANY_REQUESTS)
                    .then_some(self.limits.retry_after_seconds);
                let mut r = error_response(status, &path, &rejection.message, retry);
                set_header(r.headers_mut(), "x-maitre-arm", &arm);
                return r;
            }
        };

        let mut busy_retries = 0u32;
        loop {
            let grant = match ticket.wait_start().await {
                Ok(g) => g,
                Err(rejection) => {
                    let status = StatusCode::from_u16(rejection.status)
                        .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                    let retry = (status == StatusCode::SERVICE_UNAVAILABLE)
                        .then_some(self.limits.retry_after_seconds);
                    let mut r = error_response(status, &path, &rejection.message, retry);
                    set_header(r.headers_mut(), "x-maitre-arm", ticket.arm());
                    return r;
                }
            };
            let run = grant.run.clone();
            let up = self.upstream_request(
                &parts,
                Full::new(bytes.clone()).map_err(|e| match e {}).boxed(),
            );
            let sent = tokio::select! {
                biased;
                _ = run.preempt.cancelled() => None,
                r = tokio::time::timeout(self.first_byte_timeout, self.client.request(up)) => Some(r),
            };
            let resp = match sent {
                // Pre-empted before the first byte: the upstream request was
                // dropped (its connection closed) when the select ended.
                None => {
                    ticket.requeue_after_preempt();
                    continue;
                }
                Some(Err(_elapsed)) => {
                    let r = error_response(
                        StatusCode::GATEWAY_TIMEOUT,
                        &path,
                        &format!(
                            "maitre: the upstream sent no response within {} s (upstream.first_byte_timeout_seconds)",
                            self.first_byte_timeout.as_secs()
                        ),
                        None,
                    );
                    ticket.finish(Outcome::UpstreamError);
                    return r;
                }
                Some(Ok(Err(e))) => {
                    let r = self.unreachable(&path, &e);
                    ticket.finish(Outcome::UpstreamError);
                    return r;
                }
                Some(Ok(Ok(resp))) => resp,
            };
            run.mark_upstream_first_byte();
            if resp.status() == StatusCode::SERVICE_UNAVAILABLE && busy_retries < MAX_BUSY_RETRIES {
                // Ollama's own queue is full: wait in ours instead of failing.
                busy_retries += 1;
                drop(resp);
                tokio::time::sleep(Duration::from_millis(50 * busy_retries as u64)).await;
                ticket.requeue_after_busy();
                continue;
            }
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
            let ndjson = p
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/x-ndjson"));
            if !run.mark_streaming() {
                // Pre-empted between the upstream's answer and now: nothing
                // reached the client, so requeue as if it came earlier.
                drop(body);
                ticket.requeue_after_preempt();
                continue;
            }
            let body = TrackedBody {
                inner: Some(body),
                cut: Box::pin(run.preempt.clone().cancelled_owned()),
                run,
                ticket: Some(ticket),
                failed,
                ndjson,
                done: false,
            };
            return Response::from_parts(p, body.boxed());
        }
    }

    async fn send_unscheduled(
        &self,
        parts: &http::request::Parts,
        bytes: Bytes,
        path: &str,
    ) -> Response<ProxyBody> {
        let up = self.upstream_request(parts, Full::new(bytes).map_err(|e| match e {}).boxed());
        match self.client.request(up).await {
            Ok(resp) => {
                let (mut p, b) = resp.into_parts();
                p.headers = strip_hop_by_hop(&p.headers);
                Response::from_parts(p, b.map_err(|e| Box::new(e) as BoxError).boxed())
            }
            Err(e) => self.unreachable(path, &e),
        }
    }
}

/// Upstream 503 answers retried through maitre's queue before passing one on.
const MAX_BUSY_RETRIES: u32 = 3;

/// The response body of a scheduled request: forwards upstream chunks as they
/// come, times the first one, counts them, ends the request in the scheduler
/// exactly once, and closes the upstream connection when dropped early.
struct TrackedBody {
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
                tracing::warn!(error = %e, "upstream connection lost mid-response");
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

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Copies headers minus hop-by-hop ones (and those named in `Connection`).
pub fn strip_hop_by_hop(h: &HeaderMap) -> HeaderMap {
    let mut named: Vec<String> = Vec::new();
    for v in h.get_all(header::CONNECTION) {
        if let Ok(s) = v.to_str() {
            named.extend(
                s.split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .filter(|t| !t.is_empty()),
            );
        }
    }
    let mut out = HeaderMap::with_capacity(h.len());
    for (k, v) in h {
        let n = k.as_str();
        if HOP_BY_HOP.contains(&n) || named.iter().any(|x| x == n) {
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    out
}

fn set_header(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(HeaderName::from_static(name), v);
    }
}

/// An error in Ollama's shape (`{"error": "..."}`), or OpenAI's envelope on
/// `/v1`, with `Retry-After` when given.
pub fn error_response(
    status: StatusCode,
    path: &str,
    message: &str,
    retry_after: Option<u64>,
) -> Response<ProxyBody> {
    let body = if path.starts_with("/v1/") {
        let kind = match status.as_u16() {
            400 | 413 => "invalid_request_error",
            404 => "not_found_error",
            _ => "api_error",
        };
        serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
    } else {
        serde_json::json!({ "error": message })
    };
    let mut r = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    if let Some(s) = retry_after {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-priority", HeaderValue::from_static("rt"));
        let out = strip_hop_by_hop(&h);
        assert_eq!(out.len(), 1);
        assert_eq!(out.get("x-priority").unwrap(), "rt");
    }

    #[test]
    fn openai_paths_get_openai_errors() {
        let r = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "/v1/chat/completions",
            "busy",
            Some(2),
        );
        assert_eq!(r.headers().get("retry-after").unwrap(), "2");
        let r = error_response(StatusCode::BAD_GATEWAY, "/api/chat", "down", None);
        assert!(r.headers().get("retry-after").is_none());
    }
}
