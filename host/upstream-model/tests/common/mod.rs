//! A tiny HTTP client for the tests: plain hyper over a fresh TCP
//! connection per request, plus a raw-socket variant for disconnect tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use upstream_model::{ModelConfig, UpstreamModel};

pub const SECOND: Duration = Duration::from_secs(1);

pub async fn fake(cfg: ModelConfig) -> UpstreamModel {
    UpstreamModel::start(cfg).await.expect("start the fake")
}

pub fn cfg(slots: usize, token_ms: u64, tokens: u64) -> ModelConfig {
    ModelConfig {
        slots,
        token_delay: Duration::from_millis(token_ms),
        default_tokens: tokens,
        ..ModelConfig::default()
    }
}

/// Sends one request on its own connection. `Host` is the fake's address
/// unless `headers` sets one.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Response<Incoming> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = Request::builder().method(method).uri(path);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req = req.header("host", addr.to_string());
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if !body.is_empty() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    tx.send_request(req).await.expect("send")
}

pub async fn post(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Response<Incoming> {
    send(addr, "POST", path, headers, body).await
}

pub async fn get(addr: SocketAddr, path: &str) -> Response<Incoming> {
    send(addr, "GET", path, &[], "").await
}

pub fn header<'a>(r: &'a Response<Incoming>, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or("")
}

/// Body frames with their arrival time relative to `t0`.
pub async fn frames(r: Response<Incoming>, t0: Instant) -> Vec<(Duration, Bytes)> {
    let mut body = r.into_body();
    let mut out = vec![];
    while let Some(f) = body.frame().await {
        if let Ok(data) = f.expect("body frame").into_data() {
            out.push((t0.elapsed(), data));
        }
    }
    out
}

pub async fn text(r: Response<Incoming>) -> String {
    let b = r.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(b.to_vec()).expect("utf-8 body")
}

pub async fn json(r: Response<Incoming>) -> Value {
    let t = text(r).await;
    serde_json::from_str(&t).unwrap_or_else(|e| panic!("not JSON ({e}): {t}"))
}

/// The non-empty lines of an NDJSON body.
pub fn ndjson(body: &str) -> Vec<Value> {
    body.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line ({e}): {l}")))
        .collect()
}

/// The `data:` payloads of an SSE body.
pub fn sse(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data event: {e:?}"))
                .to_string()
        })
        .collect()
}

/// Writes a raw HTTP/1.1 POST and returns the open socket.
pub async fn raw_post(addr: SocketAddr, path: &str, extra_headers: &str, body: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra_headers}\r\n{body}",
        addr.port(),
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    s
}

/// Reads from `s` until `needle` has been seen (or panics after 5 s).
pub async fn read_until(s: &mut TcpStream, needle: &str) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + 5 * SECOND;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, s.read(&mut chunk))
            .await
            .expect("timed out reading")
            .expect("read");
        assert!(
            n > 0,
            "EOF before {needle:?}: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if text.contains(needle) {
            return text.into_owned();
        }
    }
}
