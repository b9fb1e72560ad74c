//! One backend as the proxy reaches it: its base URL, the `Host` it wants,
//! its HTTP client (its own connect timeout and connection pool) and its
//! first-byte timeout.

use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{HeaderMap, Method};
use http::{Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::head::Head;
use super::headers::strip_hop_by_hop;
use super::link;
use super::{ProxyBody, Refusal};
use crate::config::UpstreamConfig;
use crate::escape::Escaped;

/// One backend, ready to send requests to.
pub struct Target {
    /// Its name (`[[upstream]] name`).
    pub name: std::sync::Arc<str>,
    /// `http://authority/prefix`, no trailing slash.
    pub base: String,
    host: HeaderValue,
    /// Client with this backend's connect timeout; its connections say
    /// when the upstream has let go of them ([`link`]).
    pub(crate) client: Client<link::Connector, ProxyBody>,
    /// Longest wait for its response head.
    pub first_byte_timeout: Duration,
    /// What it speaks.
    pub kind: crate::config::BackendKind,
    /// The per-request priority it is told, if any.
    pub pass_priority: Option<crate::config::PassPriority>,
    /// Its slots.
    pub slots: u32,
    /// Whether the engine's own busy count is read before each dispatch
    /// (`busy_check`, see `busy`).
    pub busy_check: Option<crate::config::BusyCheck>,
}

impl Target {
    /// From a config entry.
    pub fn new(up: &UpstreamConfig) -> Target {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(Duration::from_millis(up.connect_timeout_ms)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(link::Connector(conn));
        let authority = up
            .url
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        let prefix = up.url.path().trim_end_matches('/');
        Target {
            name: up.name.as_str().into(),
            base: format!("http://{authority}{prefix}"),
            host: HeaderValue::from_str(&authority)
                .unwrap_or(HeaderValue::from_static("localhost")),
            client,
            first_byte_timeout: Duration::from_secs(up.first_byte_timeout_seconds),
            kind: up.kind,
            pass_priority: up.pass_priority,
            slots: up.slots,
            busy_check: up.busy_check,
        }
    }

    /// The upstream twin of a client request: same method, path and query,
    /// headers minus hop-by-hop ones, and this backend's `Host`.
    pub fn request(&self, parts: &http::request::Parts, body: ProxyBody) -> Request<ProxyBody> {
        self.build(&parts.method, &parts.uri, &parts.headers, body)
    }

    /// [`Target::request`] for a head maitre kept (a scheduled request).
    pub(super) fn upstream(&self, head: &Head, body: ProxyBody) -> Request<ProxyBody> {
        self.build(&head.method, &head.uri, &head.headers, body)
    }

    fn build(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: ProxyBody,
    ) -> Request<ProxyBody> {
        let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let uri: Uri = format!("{}{}", self.base, pq)
            .parse()
            .unwrap_or_else(|_| Uri::from_static("/"));
        let mut r = Request::new(body);
        *r.method_mut() = method.clone();
        *r.uri_mut() = uri;
        *r.headers_mut() = strip_hop_by_hop(headers);
        // Ollama bound to loopback answers 403 to a foreign Host.
        r.headers_mut().insert(header::HOST, self.host.clone());
        r
    }

    /// The refusal for this backend when it cannot be reached, logged with
    /// the whole chain of causes (the first one alone rarely says why).
    pub fn unreachable(&self, e: &hyper_util::client::legacy::Error) -> Refusal {
        let detail = causes(e);
        tracing::warn!(backend = %self.name, upstream = %self.base, error = %Escaped(&detail), "upstream unreachable");
        Refusal::UpstreamUnreachable {
            upstream: self.base.clone(),
            detail,
        }
    }
}

/// What became of a request maitre sent on its own (a probe, a poll, one
/// leg of a fleet-wide call).
#[derive(Debug)]
pub enum Fetched {
    /// The backend answered: status, content type and the whole body.
    Answer(http::StatusCode, Option<HeaderValue>, bytes::Bytes),
    /// It could not be reached, or did not answer in time.
    Failed(String),
}

impl Target {
    /// Sends `method path` with `body` (maitre's own call: a probe, a poll)
    /// and reads the whole answer, within `timeout`.
    pub async fn fetch(
        &self,
        method: http::Method,
        path: &str,
        body: bytes::Bytes,
        timeout: Duration,
    ) -> Fetched {
        let uri: Uri = match format!("{}{}", self.base, path).parse() {
            Ok(u) => u,
            Err(e) => return Fetched::Failed(e.to_string()),
        };
        let mut r = Request::new(full(body));
        *r.method_mut() = method;
        *r.uri_mut() = uri;
        r.headers_mut().insert(header::HOST, self.host.clone());
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        self.call(r, timeout).await
    }

    /// Sends a client's request (`parts`, with `body`) and reads the whole
    /// answer, within `timeout`.
    pub async fn send(
        &self,
        parts: &http::request::Parts,
        body: bytes::Bytes,
        timeout: Duration,
    ) -> Fetched {
        self.call(self.request(parts, full(body)), timeout).await
    }

    /// Sends `r` and reads the whole answer, within `timeout`.
    pub async fn call(&self, r: Request<ProxyBody>, timeout: Duration) -> Fetched {
        use http_body_util::BodyExt;
        let call = async {
            let resp = self.client.request(r).await.map_err(|e| causes(&e))?;
            let status = resp.status();
            let ctype = resp.headers().get(header::CONTENT_TYPE).cloned();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>(Fetched::Answer(status, ctype, body))
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => Fetched::Failed(e),
            Err(_) => Fetched::Failed(format!("no answer within {} ms", timeout.as_millis())),
        }
    }
}

/// An error with its chain of causes (the first one alone rarely says why).
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut detail = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        detail = format!("{detail}: {s}");
        src = s.source();
    }
    detail
}

/// A body already in memory.
fn full(bytes: bytes::Bytes) -> ProxyBody {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes)
        .map_err(|e| match e {})
        .boxed()
}
