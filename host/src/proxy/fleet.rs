//! The unscheduled Ollama endpoints when there are several backends: a
//! client sees one Ollama that has every backend's models.
//!
//! | Request | Goes to | Answer |
//! |---|---|---|
//! | any, with `X-Maitre-Backend: NAME` | that backend | its own |
//! | `GET /api/tags`, `GET /v1/models` | every live backend | the union of their models |
//! | `GET /api/ps` | every live backend | every loaded model, each with `"backend"` |
//! | `GET /api/version` | every live backend | the lowest version |
//! | `POST /api/show`, `GET /v1/models/{m}` | live backends in order | the first that has the model |
//! | `POST /api/pull`, `/api/push`, `/api/create`, `/api/copy`, `DELETE /api/delete`, `/api/blobs/…` | every backend ([`super::fanout`]) | merged, naming the backends that failed |
//! | anything else | the first live backend | its own |
//!
//! An `/api/*` request goes only to Ollama backends (`kind = "ollama"`):
//! merges ask only those, and with none (or when `X-Maitre-Backend` names an
//! OpenAI-compatible one) maitre answers 404 naming the backend's kind.
//! `/v1/*` requests go to every kind: `/v1/models` merges them all.
//!
//! "Live" is what the scheduler knows of health (every backend when none
//! answers). With one backend none of this applies: requests pass through
//! exactly as before there were fleets.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use percent_encoding::percent_decode_str;
use serde_json::{Value, json};

use super::error_shape::error_response;
use super::headers::strip_hop_by_hop;
use super::{BoxError, Fetched, Proxy, ProxyBody, Refusal};

/// The header that sends an unscheduled request to one backend by name.
pub const BACKEND_HEADER: &str = "x-maitre-backend";

/// Longest wait for one backend's answer to a metadata call (tags, ps,
/// version, show): a hung backend must not hang the fleet's answer.
const METADATA_TIMEOUT: Duration = Duration::from_secs(30);

/// What a passthrough request is, for the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Tags,
    Ps,
    OaModels,
    Version,
    /// Goes to the first backend that has the model.
    FirstWithModel,
    /// Goes to every backend.
    FanOut,
    Other,
}

fn route(method: &Method, path: &str) -> Route {
    match (method.as_str(), path) {
        ("GET", "/api/tags") => Route::Tags,
        ("GET", "/api/ps") => Route::Ps,
        ("GET", "/v1/models") => Route::OaModels,
        ("GET", "/api/version") => Route::Version,
        ("POST", "/api/show") => Route::FirstWithModel,
        ("GET", p) if p.starts_with("/v1/models/") => Route::FirstWithModel,
        ("POST", "/api/pull" | "/api/push" | "/api/create" | "/api/copy")
        | ("DELETE", "/api/delete") => Route::FanOut,
        ("HEAD" | "POST", p) if p.starts_with("/api/blobs/") => Route::FanOut,
        _ => Route::Other,
    }
}

impl Proxy {
    /// A passthrough request when there are several backends.
    pub(super) async fn fleet_passthrough(
        &self,
        req: http::Request<Incoming>,
        raw_path: &str,
    ) -> Result<Response<ProxyBody>, Refusal> {
        let (mut parts, body) = req.into_parts();
        let named = parts.headers.remove(BACKEND_HEADER);
        let boxed = |b: Incoming| b.map_err(|e| Box::new(e) as BoxError).boxed();
        if let Some(name) = named {
            let name = String::from_utf8_lossy(name.as_bytes()).into_owned();
            let Some(b) = self.backends.iter().position(|t| *t.name == *name) else {
                return Ok(unknown_backend(raw_path, &name, self.backend_names()));
            };
            let path = percent_decode_str(raw_path).decode_utf8_lossy();
            if !self.backends[b].kind.serves(&path) {
                super::read::discard(body);
                return Err(super::kind::not_ollama(&self.backends[b].name, &path));
            }
            return self.forward_to(b, &parts, boxed(body)).await;
        }
        let path = percent_decode_str(raw_path)
            .decode_utf8_lossy()
            .into_owned();
        if let Some(refusal) = self.unserved(&path) {
            super::read::discard(body);
            return Err(refusal);
        }
        // The live backends that speak the request's API; when none of those
        // is live, all of those (the first to answer wins).
        let live = match self.serving(&self.sched.health().live(), &path) {
            live if live.is_empty() => {
                self.serving(&(0..self.backends.len()).collect::<Vec<_>>(), &path)
            }
            live => live,
        };
        match route(&parts.method, &path) {
            Route::Tags => Ok(self.merge(&parts, &live, merge_tags).await),
            Route::Ps => Ok(self.merge(&parts, &live, merge_ps).await),
            Route::OaModels => Ok(self.merge(&parts, &live, merge_oa_models).await),
            Route::Version => Ok(self.merge(&parts, &live, lowest_version).await),
            Route::FirstWithModel => {
                let (bytes, _held) = self.read_body(body).await?;
                Ok(self.first_with_model(&parts, bytes, &live).await)
            }
            Route::FanOut => self.fan_out(parts, body).await,
            Route::Other => self.forward_to(live[0], &parts, boxed(body)).await,
        }
    }

    /// The backends' names, for messages.
    pub(super) fn backend_names(&self) -> String {
        self.backends
            .iter()
            .map(|t| &*t.name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Asks each of `backends` and merges the JSON answers with `merge`
    /// (given each answering backend's name and answer). Backends that fail
    /// are left out and named in `X-Maitre-Backends-Failed`; 502 when none
    /// answers.
    async fn merge(
        &self,
        parts: &http::request::Parts,
        backends: &[usize],
        merge: fn(Vec<(&str, Value)>) -> Value,
    ) -> Response<ProxyBody> {
        let calls = backends.iter().map(|&b| {
            let t = &self.backends[b];
            let timeout = t.first_byte_timeout.min(METADATA_TIMEOUT);
            async move { (b, t.send(parts, Bytes::new(), timeout).await) }
        });
        let answers = futures_util::future::join_all(calls).await;
        let mut ok = Vec::new();
        let mut failed = Vec::new();
        for (b, f) in answers {
            let name = &*self.backends[b].name;
            match f {
                Fetched::Answer(s, _, body) if s.is_success() => {
                    match serde_json::from_slice::<Value>(&body) {
                        Ok(v) => ok.push((name, v)),
                        Err(e) => failed.push(format!("{name} (unreadable answer: {e})")),
                    }
                }
                Fetched::Answer(s, _, _) => failed.push(format!("{name} ({s})")),
                Fetched::Failed(e) => failed.push(format!("{name} ({e})")),
            }
        }
        if ok.is_empty() {
            let msg = format!(
                "maitre: no backend answered {}: {}",
                parts.uri.path(),
                failed.join("; ")
            );
            return error_response(StatusCode::BAD_GATEWAY, parts.uri.path(), &msg, None);
        }
        let mut r = json_response(StatusCode::OK, &merge(ok));
        if !failed.is_empty() {
            let names: Vec<&str> = failed
                .iter()
                .map(|f| f.split(' ').next().unwrap_or(""))
                .collect();
            if let Ok(v) = HeaderValue::from_str(&names.join(",")) {
                r.headers_mut()
                    .insert(HeaderName::from_static("x-maitre-backends-failed"), v);
            }
        }
        r
    }

    /// `/api/show` and `/v1/models/{m}`: the first of `backends` that does
    /// not answer 404 (not found) answers; the last 404 when none has it.
    async fn first_with_model(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
        backends: &[usize],
    ) -> Response<ProxyBody> {
        let mut last = None;
        for &b in backends {
            let t = &self.backends[b];
            let timeout = t.first_byte_timeout.min(METADATA_TIMEOUT);
            match t.send(parts, body.clone(), timeout).await {
                Fetched::Answer(s, ctype, bytes) => {
                    let found = s != StatusCode::NOT_FOUND;
                    let mut r = Response::new(full(bytes));
                    *r.status_mut() = s;
                    if let Some(c) = ctype {
                        r.headers_mut().insert(header::CONTENT_TYPE, c);
                    }
                    super::headers::set_header(r.headers_mut(), BACKEND_HEADER, &t.name);
                    if found {
                        return r;
                    }
                    last = Some(r);
                }
                Fetched::Failed(e) => {
                    tracing::debug!(backend = %t.name, error = %e, "backend failed; asking the next one")
                }
            }
        }
        last.unwrap_or_else(|| {
            let msg = format!("maitre: no backend answered {}", parts.uri.path());
            error_response(StatusCode::BAD_GATEWAY, parts.uri.path(), &msg, None)
        })
    }

    /// Sends a request to backend `b` as it is and streams the answer back.
    pub(super) async fn forward_to(
        &self,
        b: usize,
        parts: &http::request::Parts,
        body: ProxyBody,
    ) -> Result<Response<ProxyBody>, Refusal> {
        let target = &self.backends[b];
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

/// 400 for an `X-Maitre-Backend` that names no backend.
fn unknown_backend(path: &str, name: &str, names: String) -> Response<ProxyBody> {
    let msg =
        format!("maitre: {BACKEND_HEADER}: no backend named {name:?}; the backends are {names}");
    error_response(StatusCode::BAD_REQUEST, path, &msg, None)
}

/// A body already in memory.
pub(super) fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|e| match e {}).boxed()
}

/// A JSON answer.
fn json_response(status: StatusCode, v: &Value) -> Response<ProxyBody> {
    let mut r = Response::new(full(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

/// The items of `list` in each answer, each key (`key` field) once, in
/// backend order; `tag` adds the backend's name to each item.
fn union(answers: Vec<(&str, Value)>, list: &str, key: &str, tag: bool) -> Vec<Value> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (backend, mut v) in answers {
        let Some(items) = v.get_mut(list).and_then(Value::as_array_mut) else {
            continue;
        };
        for mut item in std::mem::take(items) {
            let k = item.get(key).map(Value::to_string).unwrap_or_default();
            if tag {
                if let Some(o) = item.as_object_mut() {
                    o.insert("backend".into(), backend.into());
                }
                out.push(item);
            } else if seen.insert(k) {
                out.push(item);
            }
        }
    }
    out
}

/// `/api/tags`: every model on any backend, once.
fn merge_tags(answers: Vec<(&str, Value)>) -> Value {
    json!({ "models": union(answers, "models", "name", false) })
}

/// `/api/ps`: every loaded model, each naming its backend.
fn merge_ps(answers: Vec<(&str, Value)>) -> Value {
    json!({ "models": union(answers, "models", "name", true) })
}

/// `/v1/models`: every model on any backend, once.
fn merge_oa_models(answers: Vec<(&str, Value)>) -> Value {
    json!({ "object": "list", "data": union(answers, "data", "id", false) })
}

/// `/api/version`: the lowest version in the fleet (a client checking for a
/// feature must not be told a backend has it when one lacks it). Versions
/// that are not semantic versions sort below those that are.
fn lowest_version(answers: Vec<(&str, Value)>) -> Value {
    let lowest = answers
        .iter()
        .filter_map(|(_, v)| v.get("version").and_then(Value::as_str))
        .min_by(|a, b| {
            let key = |s: &str| semver::Version::parse(s.trim_start_matches('v')).ok();
            key(a).cmp(&key(b)).then(a.cmp(b))
        })
        .unwrap_or("");
    json!({ "version": lowest })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passthrough_routes() {
        let r = |m: &str, p: &str| route(&m.parse().unwrap(), p);
        assert_eq!(r("GET", "/api/tags"), Route::Tags);
        assert_eq!(r("HEAD", "/api/tags"), Route::Other);
        assert_eq!(r("POST", "/api/show"), Route::FirstWithModel);
        assert_eq!(r("GET", "/v1/models/fake"), Route::FirstWithModel);
        assert_eq!(r("DELETE", "/api/delete"), Route::FanOut);
        assert_eq!(r("HEAD", "/api/blobs/sha256:00"), Route::FanOut);
        assert_eq!(r("GET", "/"), Route::Other);
    }

    #[test]
    fn merges_keep_ollamas_shape() {
        let tags = merge_tags(vec![
            (
                "a",
                json!({"models": [{"name": "x:latest"}, {"name": "y:latest"}]}),
            ),
            (
                "b",
                json!({"models": [{"name": "y:latest"}, {"name": "z:1"}]}),
            ),
        ]);
        let names: Vec<&str> = tags["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["x:latest", "y:latest", "z:1"]);
        let ps = merge_ps(vec![
            ("a", json!({"models": [{"name": "x:latest"}]})),
            ("b", json!({"models": [{"name": "x:latest"}]})),
        ]);
        assert_eq!(ps["models"][0]["backend"], "a");
        assert_eq!(ps["models"][1]["backend"], "b");
        let oa = merge_oa_models(vec![
            ("a", json!({"object": "list", "data": [{"id": "x"}]})),
            (
                "b",
                json!({"object": "list", "data": [{"id": "x"}, {"id": "w"}]}),
            ),
        ]);
        assert_eq!(oa["data"].as_array().unwrap().len(), 2);
        let v = lowest_version(vec![
            ("a", json!({"version": "0.12.3"})),
            ("b", json!({"version": "0.9.10"})),
            ("c", json!({"version": "0.12.3-rc1"})),
        ]);
        assert_eq!(v["version"], "0.9.10");
        let v = lowest_version(vec![
            ("a", json!({"version": "0.12.3"})),
            ("b", json!({"version": "0.12.3-rc1"})),
        ]);
        assert_eq!(v["version"], "0.12.3-rc1");
    }
}
