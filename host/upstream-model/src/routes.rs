//! Request routing: the Host check, the route table (404/405 like gin), the
//! `/_fake/*` control endpoints (when switched on) and the model-less
//! pass-through endpoints.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HOST, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use percent_encoding::percent_decode_str;
use serde_json::{Value, json};

use crate::state::{State, Tracker};
use crate::util::{self, Body, Shape};
use crate::{native, openai, residency};

/// Every Ollama route the model knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    Root,
    Version,
    Tags,
    Ps,
    Show,
    Pull,
    Generate,
    Chat,
    Embed,
    Embeddings,
    OaChat,
    OaCompletions,
    OaEmbeddings,
    OaModels,
    OaModel,
    /// llama-server's and vLLM's `GET /health` (OpenAI-only mode).
    Health,
    /// llama-server's `GET /slots`: each slot with `is_processing`
    /// (OpenAI-only mode).
    Slots,
    /// llama-server's `GET /metrics` (with `--metrics`): Prometheus text,
    /// `llamacpp:requests_processing` the slots busy (OpenAI-only mode).
    Metrics,
}

impl Route {
    /// The route of `path`; an OpenAI-compatible server (`openai_only`)
    /// knows `/v1/*` and `/health` only, Ollama everything but `/health`.
    fn find(path: &str, openai_only: bool) -> Option<Route> {
        if openai_only {
            return match path {
                "/health" => Some(Route::Health),
                "/slots" => Some(Route::Slots),
                "/metrics" => Some(Route::Metrics),
                p if p.starts_with("/v1/") => Self::find(p, false),
                _ => None,
            };
        }
        Some(match path {
            "/" => Route::Root,
            "/api/version" => Route::Version,
            "/api/tags" => Route::Tags,
            "/api/ps" => Route::Ps,
            "/api/show" => Route::Show,
            "/api/pull" => Route::Pull,
            "/api/generate" => Route::Generate,
            "/api/chat" => Route::Chat,
            "/api/embed" => Route::Embed,
            "/api/embeddings" => Route::Embeddings,
            "/v1/chat/completions" => Route::OaChat,
            "/v1/completions" => Route::OaCompletions,
            "/v1/embeddings" => Route::OaEmbeddings,
            "/v1/models" => Route::OaModels,
            p if p.len() > "/v1/models/".len() && p.starts_with("/v1/models/") => Route::OaModel,
            _ => return None,
        })
    }

    fn allows(self, m: &Method) -> bool {
        match self {
            Route::Root
            | Route::Version
            | Route::Tags
            | Route::Health
            | Route::Slots
            | Route::Metrics => m == Method::GET || m == Method::HEAD,
            Route::Ps | Route::OaModels | Route::OaModel => m == Method::GET,
            _ => m == Method::POST,
        }
    }

    pub fn openai(self) -> bool {
        matches!(
            self,
            Route::OaChat
                | Route::OaCompletions
                | Route::OaEmbeddings
                | Route::OaModels
                | Route::OaModel
                | Route::Health
                | Route::Slots
                | Route::Metrics
        )
    }
}

/// The model hung up on a request without answering (`X-Fake-Hang-Up-Reused`).
#[derive(Debug)]
pub(crate) struct HangUp;

impl std::fmt::Display for HangUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("hung up on a request on a kept-alive connection")
    }
}

impl std::error::Error for HangUp {}

/// The service function of one connection; `reused` says whether the
/// request is not the connection's first. `X-Fake-Hang-Up-Reused` on a
/// request that reuses a kept-alive connection closes the connection
/// without an answer: the race in which a server times out an idle
/// connection just as its client sends a request on it (the client sees
/// "connection closed before message completed"). The request is logged as
/// `Received` then `Failed`.
pub(crate) async fn serve(
    st: Arc<State>,
    req: Request<Incoming>,
    reused: bool,
) -> Result<Response<Body>, HangUp> {
    if reused && req.headers().contains_key("x-fake-hang-up-reused") {
        let h = req.headers();
        let path = percent_decode_str(req.uri().path()).decode_utf8_lossy();
        let mut t = Tracker::new(
            st.clone(),
            &path,
            util::header_string(h, "x-test-tag"),
            util::header_string(h, "x-priority"),
        );
        t.received("", false);
        t.fail();
        return Err(HangUp);
    }
    Ok(handle(st, req).await)
}

/// Every response carries `X-Fake-Upstream: 1`.
pub(crate) async fn handle(st: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let mut resp = dispatch(st, req).await;
    resp.headers_mut().insert(
        HeaderName::from_static("x-fake-upstream"),
        HeaderValue::from_static("1"),
    );
    resp
}

async fn dispatch(st: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    // Go's net/http hands gin the percent-decoded path (`URL.Path`), so
    // `/api/%67enerate` is `/api/generate` to Ollama.
    let decoded = percent_decode_str(parts.uri.path()).decode_utf8_lossy();
    let path: &str = &decoded;
    if st.cfg.control_routes
        && let Some(what) = path.strip_prefix("/_fake/")
    {
        let what = what.to_string();
        return control(&st, &what, parts, body).await;
    }
    if st.cfg.check_host {
        let host = parts
            .headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| parts.uri.authority().map(|a| a.as_str()))
            .unwrap_or("");
        if !util::host_allowed(host) {
            return util::empty(StatusCode::FORBIDDEN);
        }
    }
    let Some(route) = Route::find(path, st.cfg.openai_only) else {
        if st.cfg.openai_only {
            // llama-server's answer to a route it does not have.
            return util::openai_error(StatusCode::NOT_FOUND, "File Not Found");
        }
        return util::response(StatusCode::NOT_FOUND, util::TEXT, "404 page not found");
    };
    if !route.allows(&parts.method) {
        return util::response(
            StatusCode::METHOD_NOT_ALLOWED,
            util::TEXT,
            "405 method not allowed",
        );
    }
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return util::empty(StatusCode::BAD_REQUEST),
    };
    let shape = Shape::from_headers(&st.cfg, &parts.headers);
    let tag = util::header_string(&parts.headers, "x-test-tag");
    let tracker = Tracker::new(
        st.clone(),
        path,
        util::header_string(&parts.headers, "x-test-tag"),
        util::header_string(&parts.headers, "x-priority"),
    );
    let call = Call {
        route,
        tracker,
        shape,
        tag,
        model_path: path.strip_prefix("/v1/models/").map(str::to_string),
    };
    call.run(&body).await
}

/// One API request on its way through the model.
pub(crate) struct Call {
    pub route: Route,
    pub tracker: Tracker,
    pub shape: Shape,
    tag: Option<String>,
    model_path: Option<String>,
}

impl Call {
    /// Ends the request with an error in the route's dialect.
    pub fn error(mut self, status: StatusCode, msg: &str) -> Response<Body> {
        self.tracker.fail();
        if self.route.openai() {
            util::openai_error(status, msg)
        } else {
            util::ollama_error(status, msg)
        }
    }

    /// Ends a request that needs no slot with a JSON answer.
    pub fn ok(mut self, v: &Value) -> Response<Body> {
        self.tracker.finish();
        if self.route.openai() {
            util::oa_json_response(StatusCode::OK, v)
        } else {
            util::json_response(StatusCode::OK, v)
        }
    }

    async fn run(mut self, body: &Bytes) -> Response<Body> {
        let needs_body = !matches!(
            self.route,
            Route::Root
                | Route::Version
                | Route::Tags
                | Route::Ps
                | Route::OaModels
                | Route::OaModel
                | Route::Health
                | Route::Slots
                | Route::Metrics
        );
        let parsed = if needs_body {
            util::parse_body(body)
        } else {
            Ok(serde_json::Map::new())
        };
        let model = match (&parsed, self.route) {
            (_, Route::OaModel) => self.model_path.clone().unwrap_or_default(),
            (Ok(m), Route::Show | Route::Pull) => {
                let model = util::str_field(m, "model");
                if model.is_empty() {
                    util::str_field(m, "name")
                } else {
                    model
                }
                .to_string()
            }
            (Ok(m), _) => util::str_field(m, "model").to_string(),
            (Err(_), _) => String::new(),
        };
        // Whether it asks for a stream, with the endpoint's default (only
        // recorded in the log: each handler reads `stream` itself).
        let stream = match (&parsed, self.route) {
            (Ok(m), Route::Generate | Route::Chat | Route::Pull) => util::stream_flag(m, true),
            (Ok(m), Route::OaChat | Route::OaCompletions) => util::stream_flag(m, false),
            _ => false,
        };
        // vLLM's per-request priority, recorded so tests see what arrived.
        let body_priority = match (&parsed, self.route) {
            (Ok(m), Route::OaChat | Route::OaCompletions) => {
                m.get("priority").and_then(Value::as_i64)
            }
            _ => None,
        };
        self.tracker.received_with(&model, stream, body_priority);
        if let Some(status) = self.shape.status {
            let due = match self.shape.status_times {
                None => true,
                Some(n) => self.tracker.state().count_status(self.tag.as_deref()) < n,
            };
            if due {
                let msg = util::status_msg(status, &model);
                return self.error(status, &msg);
            }
        }
        let m = match parsed {
            Ok(m) => m,
            Err(e) => return self.error(StatusCode::BAD_REQUEST, &e),
        };
        let st = self.tracker.state().clone();
        match self.route {
            Route::Root => {
                self.tracker.finish();
                util::response(StatusCode::OK, util::TEXT, "Ollama is running")
            }
            Route::Version => self.ok(&json!({ "version": crate::VERSION })),
            Route::Health => self.ok(&json!({ "status": "ok" })),
            Route::Slots => {
                // Slots held count as processing, those a cancelled
                // generation has not freed yet (`release_lag`) included.
                let busy = st.stats().active;
                let slots: Vec<Value> = (0..st.cfg.slots)
                    .map(|id| json!({ "id": id, "is_processing": id < busy }))
                    .collect();
                self.ok(&Value::Array(slots))
            }
            Route::Metrics => {
                // As llama-server words them: busy slots (a cancelled
                // generation's not freed yet included) and queued requests.
                let s = st.stats();
                let text = format!(
                    "# HELP llamacpp:requests_processing Number of requests processing.\n# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing {}\n# HELP llamacpp:requests_deferred Number of requests deferred.\n# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred {}\n",
                    s.active, s.waiting
                );
                self.tracker.finish();
                util::response(StatusCode::OK, "text/plain; version=0.0.4", text)
            }
            Route::Tags => self.ok(&residency::tags(&st.cfg)),
            Route::Ps => self.ok(&residency::ps(&st.loaded())),
            Route::OaModels => self.ok(&residency::oa_models(&st.cfg)),
            Route::OaModel => {
                if util::known_model(&model) {
                    self.ok(&residency::oa_model(&model))
                } else {
                    let msg = util::not_found_msg(&model);
                    self.error(StatusCode::NOT_FOUND, &msg)
                }
            }
            Route::Show => native::show(self, &model, &m),
            Route::Pull => native::pull(self, &model, &m).await,
            Route::Generate => native::generate(self, &model, &m, false).await,
            Route::Chat => native::generate(self, &model, &m, true).await,
            Route::Embed | Route::Embeddings => native::embed(self, &model, &m).await,
            Route::OaChat | Route::OaCompletions => openai::completion(self, &model, &m).await,
            Route::OaEmbeddings => openai::embeddings(self, &model, &m).await,
        }
    }
}

/// `/_fake/log`, `/_fake/stats`, `/_fake/reset`, `/_fake/echo`. Exempt from
/// the Host check so that `echo` can show a Host that Ollama would refuse.
async fn control(
    st: &State,
    what: &str,
    parts: http::request::Parts,
    body: Incoming,
) -> Response<Body> {
    let m = &parts.method;
    match what {
        "log" if m == Method::GET => json_of(&st.log_snapshot()),
        "stats" if m == Method::GET => json_of(&st.stats()),
        "reset" if m == Method::POST => {
            st.reset();
            util::json_response(StatusCode::OK, &json!({}))
        }
        "echo" => {
            let len = body
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            let mut headers = serde_json::Map::new();
            for (k, v) in &parts.headers {
                let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                match headers.get_mut(k.as_str()) {
                    Some(Value::String(prev)) => {
                        prev.push_str(", ");
                        prev.push_str(&v);
                    }
                    _ => {
                        headers.insert(k.as_str().to_string(), v.into());
                    }
                }
            }
            util::json_response(
                StatusCode::OK,
                &json!({
                    "method": m.as_str(),
                    "path": parts.uri.path(),
                    "query": parts.uri.query(),
                    "version": format!("{:?}", parts.version),
                    "headers": headers,
                    "body_len": len,
                }),
            )
        }
        "log" | "stats" | "reset" => util::response(
            StatusCode::METHOD_NOT_ALLOWED,
            util::TEXT,
            "405 method not allowed",
        ),
        _ => util::response(StatusCode::NOT_FOUND, util::TEXT, "404 page not found"),
    }
}

fn json_of<T: serde::Serialize>(v: &T) -> Response<Body> {
    util::response(
        StatusCode::OK,
        util::JSON,
        serde_json::to_vec(v).unwrap_or_default(),
    )
}

pub(crate) fn details() -> Value {
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": "fake",
        "families": ["fake"],
        "parameter_size": "1.2B",
        "quantization_level": "Q4_K_M",
    })
}
