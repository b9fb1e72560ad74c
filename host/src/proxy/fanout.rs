//! Model management across the fleet: `/api/pull`, `/api/push`,
//! `/api/create`, `/api/copy`, `DELETE /api/delete` and `/api/blobs/…` go
//! to every backend (`X-Maitre-Backend` picks one instead, see
//! [`super::fleet`]), so that every backend can serve every model.
//!
//! - A streamed pull, push or create answers one NDJSON stream: each
//!   backend's progress lines with `"backend"` added, then one last line,
//!   `{"status":"success"}` when every backend succeeded, or an `{"error"}`
//!   naming the backends that failed and why (Ollama's clients raise it).
//! - Unstreamed (`"stream": false`), copy and delete answer once every
//!   backend has: success when each succeeded (for copy and delete, a
//!   backend that does not have the model, 404, is no failure as long as one
//!   had it), else the error naming the backends that failed.
//! - `HEAD /api/blobs/D` says 200 only if every backend has the blob, and
//!   `POST /api/blobs/D` sends the upload to every backend as it streams in.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use percent_encoding::percent_decode_str;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::error_shape::error_response;
use super::fleet::full;
use super::target::causes;
use super::{BoxError, Fetched, Proxy, ProxyBody, Refusal, extract_meta};

/// Lines (or body chunks) buffered between the backends and the client.
const CHANNEL: usize = 64;

/// What one backend made of a fanned-out request.
struct Leg {
    name: String,
    result: Result<Fetched, String>,
}

impl Proxy {
    /// Sends a model-management request to every backend.
    pub(super) async fn fan_out(
        &self,
        parts: Parts,
        body: Incoming,
    ) -> Result<Response<ProxyBody>, Refusal> {
        let path = percent_decode_str(parts.uri.path())
            .decode_utf8_lossy()
            .into_owned();
        if path.starts_with("/api/blobs/") {
            return Ok(if parts.method == Method::HEAD {
                self.blob_head(&parts).await
            } else {
                self.blob_upload(&parts, body).await
            });
        }
        let (bytes, _held) = self.read_body(body).await?;
        let progress = matches!(path.as_str(), "/api/pull" | "/api/push" | "/api/create");
        if progress && extract_meta(&path, &bytes).stream {
            return Ok(self.fan_out_stream(&parts, bytes, &path));
        }
        // Unstreamed pulls can run for hours: only a backend's first byte
        // is bounded, by its own timeout, for copy and delete.
        let calls = self.ollama_backends().map(|t| {
            let timeout = if progress {
                Duration::MAX
            } else {
                t.first_byte_timeout
            };
            let (parts, bytes) = (&parts, bytes.clone());
            async move {
                Leg {
                    name: t.name.to_string(),
                    result: Ok(t.send(parts, bytes, timeout).await),
                }
            }
        });
        let legs = futures_util::future::join_all(calls).await;
        Ok(summarise(&path, legs, !progress))
    }

    /// A streamed pull, push or create on every backend, merged.
    fn fan_out_stream(&self, parts: &Parts, body: Bytes, path: &str) -> Response<ProxyBody> {
        let (tx, rx) = mpsc::channel::<Bytes>(CHANNEL);
        let mut legs = Vec::new();
        for t in self.ollama_backends() {
            let req = t.request(parts, full(body.clone()));
            let fut = t.client.request(req);
            let (tx, name) = (tx.clone(), t.name.to_string());
            legs.push(tokio::spawn(async move {
                let result = stream_leg(fut, &name, &tx).await;
                Leg {
                    name,
                    result: result.map(|()| Fetched::Answer(StatusCode::OK, None, Bytes::new())),
                }
            }));
        }
        let what = path.trim_start_matches("/api/").to_string();
        tokio::spawn(async move {
            let mut done = Vec::new();
            for l in legs {
                if let Ok(leg) = l.await {
                    done.push(leg);
                }
            }
            let failed: Vec<String> = done
                .iter()
                .filter_map(|l| l.result.as_ref().err().map(|e| format!("{} ({e})", l.name)))
                .collect();
            let last = if failed.is_empty() {
                json!({ "status": "success" })
            } else {
                json!({ "error": format!("maitre: {what} failed on backend(s) {}", failed.join("; ")) })
            };
            let _ = tx.send(line(&last)).await;
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, BoxError>(Frame::data(b)), rx))
        });
        let mut r = Response::new(StreamBody::new(stream).boxed());
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-ndjson"),
        );
        r
    }

    /// `HEAD /api/blobs/D`: 200 when every backend has the blob, else 404
    /// (the client then uploads it, to every backend).
    async fn blob_head(&self, parts: &Parts) -> Response<ProxyBody> {
        let calls = self.ollama_backends().map(|t| {
            let timeout = t.first_byte_timeout;
            async move { t.send(parts, Bytes::new(), timeout).await }
        });
        let all = futures_util::future::join_all(calls).await;
        let everywhere = all
            .iter()
            .all(|f| matches!(f, Fetched::Answer(s, _, _) if s.is_success()));
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = if everywhere {
            StatusCode::OK
        } else {
            StatusCode::NOT_FOUND
        };
        r
    }

    /// `POST /api/blobs/D`: the upload goes to every backend as it arrives
    /// (the slowest backend sets the pace; nothing is held in memory).
    async fn blob_upload(&self, parts: &Parts, mut body: Incoming) -> Response<ProxyBody> {
        let mut senders = Vec::new();
        let mut legs = Vec::new();
        for t in self.ollama_backends() {
            let (tx, rx) = mpsc::channel::<Bytes>(8);
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv()
                    .await
                    .map(|b| (Ok::<_, BoxError>(Frame::data(b)), rx))
            });
            let req: Request<ProxyBody> = t.request(parts, StreamBody::new(stream).boxed());
            let timeout = t.first_byte_timeout;
            senders.push(tx);
            legs.push(async move {
                Leg {
                    name: t.name.to_string(),
                    result: Ok(t.call(req, timeout).await),
                }
            });
        }
        let pump = async move {
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame.map(|f| f.into_data()) else {
                    // The client's upload broke: the backends see it end short.
                    break;
                };
                let Ok(data) = data else { continue };
                for tx in &senders {
                    // A backend that failed early has dropped its receiver.
                    let _ = tx.send(data.clone()).await;
                }
            }
        };
        let (_, legs) = tokio::join!(pump, futures_util::future::join_all(legs));
        summarise(parts.uri.path(), legs, false)
    }
}

/// Relays one backend's progress stream into `tx`, each line with
/// `"backend"` added; its own `success` line is kept back (the merged stream
/// says success once, when every backend has). An `{"error"}` line, an
/// error status or a broken stream is this backend's failure.
async fn stream_leg(
    fut: impl std::future::Future<
        Output = Result<Response<Incoming>, hyper_util::client::legacy::Error>,
    >,
    name: &str,
    tx: &mpsc::Sender<Bytes>,
) -> Result<(), String> {
    let resp = fut.await.map_err(|e| causes(&e))?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let bytes = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        return Err(error_text(status, &bytes));
    }
    let mut buf = BytesMut::new();
    let mut failure = None;
    let mut succeeded = false;
    loop {
        let chunk = match body.frame().await {
            None => break,
            Some(Err(e)) => return Err(causes(&e)),
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
        };
        buf.extend_from_slice(&chunk);
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let raw = buf.split_to(i + 1);
            let Ok(mut v) = serde_json::from_slice::<Value>(&raw) else {
                continue;
            };
            if let Some(e) = v.get("error") {
                failure = Some(e.as_str().map_or_else(|| e.to_string(), str::to_string));
                continue;
            }
            if v.get("status").and_then(Value::as_str) == Some("success") {
                succeeded = true;
                continue;
            }
            if let Some(o) = v.as_object_mut() {
                o.insert("backend".into(), name.into());
            }
            if tx.send(line(&v)).await.is_err() {
                // The client went away: dropping the stream closes the
                // upstream connection, and Ollama stops when no one waits.
                return Err("the client went away".into());
            }
        }
    }
    match (failure, succeeded) {
        (Some(e), _) => Err(e),
        (None, true) => Ok(()),
        (None, false) => Err("its stream ended without success".into()),
    }
}

/// One answer for every backend's: the first success when every backend
/// succeeded (`absent_ok`: or answered 404 while another succeeded), else
/// the error naming the backends that failed, with the status of the first.
fn summarise(path: &str, legs: Vec<Leg>, absent_ok: bool) -> Response<ProxyBody> {
    let mut first_ok = None;
    let mut failures = Vec::new();
    let mut absent = Vec::new();
    for leg in legs {
        match leg.result {
            Ok(Fetched::Answer(s, ctype, body)) if s.is_success() => {
                if first_ok.is_none() {
                    first_ok = Some((s, ctype, body));
                }
            }
            Ok(Fetched::Answer(s, _, body)) if s == StatusCode::NOT_FOUND && absent_ok => {
                absent.push((leg.name, error_text(s, &body)));
            }
            Ok(Fetched::Answer(s, _, body)) => {
                failures.push((Some(s), format!("{} ({})", leg.name, error_text(s, &body))))
            }
            Ok(Fetched::Failed(e)) | Err(e) => failures.push((None, format!("{} ({e})", leg.name))),
        }
    }
    match (first_ok, failures.is_empty()) {
        (Some((s, ctype, body)), true) => {
            let mut r = Response::new(full(body));
            *r.status_mut() = s;
            if let Some(c) = ctype {
                r.headers_mut().insert(http::header::CONTENT_TYPE, c);
            }
            r
        }
        (None, true) => {
            // Every backend answered 404: none has it.
            let (name, why) = absent.into_iter().next().unwrap_or_default();
            let msg = format!("{why} (on every backend, {name} included)");
            error_response(StatusCode::NOT_FOUND, path, &msg, None)
        }
        (_, false) => {
            let status = failures
                .iter()
                .find_map(|(s, _)| *s)
                .unwrap_or(StatusCode::BAD_GATEWAY);
            let list: Vec<String> = failures.into_iter().map(|(_, f)| f).collect();
            let msg = format!(
                "maitre: {} failed on backend(s) {}",
                path.trim_start_matches("/api/"),
                list.join("; ")
            );
            error_response(status, path, &msg, None)
        }
    }
}

/// A backend's error, from its `{"error": ...}` body when it has one.
fn error_text(status: StatusCode, body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| status.to_string())
}

/// One NDJSON line.
fn line(v: &Value) -> Bytes {
    let mut b = v.to_string().into_bytes();
    b.push(b'\n');
    Bytes::from(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leg(name: &str, status: u16, body: &str) -> Leg {
        Leg {
            name: name.into(),
            result: Ok(Fetched::Answer(
                StatusCode::from_u16(status).unwrap(),
                None,
                Bytes::from(body.to_string()),
            )),
        }
    }

    async fn body(r: Response<ProxyBody>) -> (u16, String) {
        let s = r.status().as_u16();
        let b = r.into_body().collect().await.unwrap().to_bytes();
        (s, String::from_utf8_lossy(&b).into_owned())
    }

    #[tokio::test]
    async fn a_fleet_answer_names_the_backends_that_failed() {
        let ok = summarise(
            "/api/copy",
            vec![leg("a", 200, ""), leg("b", 200, "")],
            true,
        );
        assert_eq!(body(ok).await, (200, String::new()));
        // Absent on one backend: deleted where it was.
        let partly = summarise(
            "/api/delete",
            vec![
                leg("a", 404, r#"{"error":"model 'x' not found"}"#),
                leg("b", 200, ""),
            ],
            true,
        );
        assert_eq!(body(partly).await.0, 200);
        let nowhere = summarise(
            "/api/delete",
            vec![leg("a", 404, r#"{"error":"model 'x' not found"}"#)],
            true,
        );
        let (s, b) = body(nowhere).await;
        assert_eq!(s, 404);
        assert!(b.contains("model 'x' not found"), "{b}");
        let broken = summarise(
            "/api/pull",
            vec![
                leg("a", 200, r#"{"status":"success"}"#),
                leg("b", 500, r#"{"error":"disk full"}"#),
                Leg {
                    name: "c".into(),
                    result: Ok(Fetched::Failed("connection refused".into())),
                },
            ],
            false,
        );
        let (s, b) = body(broken).await;
        assert_eq!(s, 500);
        assert!(
            b.contains("pull failed on backend(s) b (disk full); c (connection refused)"),
            "{b}"
        );
    }
}
