//! The admin API on `admin_listen`: metrics, status, A/B report and live control.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/metrics` | OpenMetrics text when `Accept` asks for it (Prometheus does), else Prometheus text 0.0.4 |
//! | GET | `/status` | arms, slots, waiting and running requests, last reload (JSON) |
//! | GET | `/ab?window=SECONDS` | per-arm, per-class comparison (JSON) |
//! | POST | `/reload` | reload the policy file now (token) |
//! | PUT | `/policies/{name}/weight` | body `{"weight": N}` or `N` (token) |
//!
//! Mutating endpoints need `Authorization: Bearer <admin_token>` when a token
//! is configured; maitre refuses to bind a non-loopback admin address without one.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{Host, metrics};

type AdminBody = Full<Bytes>;

/// Serves the admin API until `stop` is cancelled.
pub async fn serve(listener: TcpListener, host: Arc<Host>, stop: CancellationToken) {
    if let Ok(a) = listener.local_addr() {
        tracing::info!(admin = %a, "admin API serving /metrics /status /ab /reload /policies/NAME/weight");
    }
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue; }
            },
            _ = stop.cancelled() => return,
        };
        let host = host.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let host = host.clone();
                async move { Ok::<_, Infallible>(route(req, &host).await) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// `/status`: the scheduler's view plus the last reload attempt.
#[derive(serde::Serialize)]
struct StatusWithReload {
    #[serde(flatten)]
    status: crate::scheduler::Status,
    last_reload: Option<crate::reload::ReloadRecord>,
}

fn json(status: StatusCode, v: &impl serde::Serialize) -> Response<AdminBody> {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec_pretty(v).unwrap_or_default(),
    )));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, msg: &str) -> Response<AdminBody> {
    json(status, &serde_json::json!({ "error": msg }))
}

fn unauthorized() -> Response<AdminBody> {
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "missing or wrong bearer token: send `Authorization: Bearer <admin_token>` (admin_token in the policy file or MAITRE_ADMIN_TOKEN)",
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"maitre admin\""),
    );
    r
}

fn authorized(req: &Request<Incoming>, host: &Host) -> bool {
    let cfg = host.config.load();
    let Some(token) = cfg.admin_token.as_deref() else {
        return true;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Constant-time comparison: the token guards live control.
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn route(req: Request<Incoming>, host: &Host) -> Response<AdminBody> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/") => json(
            StatusCode::OK,
            &serde_json::json!({"endpoints": ["GET /metrics", "GET /status", "GET /ab?window=SECONDS", "POST /reload", "PUT /policies/{name}/weight"]}),
        ),
        (&Method::GET, "/metrics") => {
            let openmetrics = req
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(metrics::accepts_openmetrics);
            let (text, content_type) = if openmetrics {
                (host.metrics.encode(), metrics::OPENMETRICS_CONTENT_TYPE)
            } else {
                (
                    host.metrics.encode_prometheus_text(),
                    metrics::PROMETHEUS_TEXT_CONTENT_TYPE,
                )
            };
            let mut r = Response::new(Full::new(Bytes::from(text)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(content_type),
            );
            r
        }
        (&Method::GET, "/status") => match host.sched.status().await {
            Some(status) => json(
                StatusCode::OK,
                &StatusWithReload {
                    status,
                    last_reload: host.reloader.last(),
                },
            ),
            None => error(StatusCode::SERVICE_UNAVAILABLE, "scheduler stopped"),
        },
        (&Method::GET, "/ab") => {
            let window = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("window=")))
                .and_then(|w| w.parse::<f64>().ok())
                .filter(|w| w.is_finite() && *w > 0.0)
                .unwrap_or(600.0);
            match host.sched.report(Duration::from_secs_f64(window)).await {
                Some(r) => json(StatusCode::OK, &r),
                None => error(StatusCode::SERVICE_UNAVAILABLE, "scheduler stopped"),
            }
        }
        (&Method::POST, "/reload") => {
            if !authorized(&req, host) {
                return unauthorized();
            }
            match host.reloader.reload(host, "admin").await {
                Ok(report) => json(StatusCode::OK, &report),
                Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, &e),
            }
        }
        (&Method::PUT, p) if p.starts_with("/policies/") && p.ends_with("/weight") => {
            if !authorized(&req, host) {
                return unauthorized();
            }
            let name = p["/policies/".len()..p.len() - "/weight".len()].to_string();
            let body = match Limited::new(req.into_body(), 4096).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return error(StatusCode::BAD_REQUEST, "body too large"),
            };
            let weight = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| {
                    v.get("weight")
                        .and_then(|w| w.as_u64())
                        .or_else(|| v.as_u64())
                });
            let Some(weight) = weight.filter(|w| *w <= 1_000_000) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "body must be {\"weight\": N} with N a whole number from 0 to 1000000",
                );
            };
            match host.sched.set_weight(&name, weight as u32).await {
                Ok(()) => {
                    tracing::info!(arm = %name, weight, "arm weight changed");
                    json(
                        StatusCode::OK,
                        &serde_json::json!({"arm": name, "weight": weight}),
                    )
                }
                Err(e) if e.starts_with("no arm") => error(StatusCode::NOT_FOUND, &e),
                Err(e) => error(StatusCode::CONFLICT, &e),
            }
        }
        _ => error(
            StatusCode::NOT_FOUND,
            &format!("no admin endpoint {method} {path}; see GET /"),
        ),
    }
}
