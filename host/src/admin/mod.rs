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
//! Requests from web pages on other sites (DNS rebinding, cross-site POSTs)
//! are refused by [`guard`]. [`route`] decides what a request asks for
//! without I/O (and is fuzzed); this module reads requests and carries out
//! the plan.

pub mod guard;
pub mod route;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::guard::Access;
use self::route::{Plan, Refused};
use crate::escape::Escaped;
use crate::reload::WeightError;
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
        // The address the client reached: the guard accepts it as a Host.
        let local = stream.local_addr().ok();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let host = host.clone();
                async move { Ok::<_, Infallible>(handle(req, &host, local).await) }
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

/// The answer to a refused request; a 401 says which scheme to use.
fn refused(r: Refused) -> Response<AdminBody> {
    let mut resp = error(r.status, &r.message);
    if r.status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"maitre admin\""),
        );
    }
    resp
}

/// Answers one admin request that arrived on `local`.
async fn handle(
    req: Request<Incoming>,
    host: &Host,
    local: Option<SocketAddr>,
) -> Response<AdminBody> {
    let (parts, body) = req.into_parts();
    let plan = {
        let cfg = host.config.load();
        let access = Access {
            token: cfg.admin_token.as_deref(),
            local,
        };
        route::plan(&parts, &access)
    };
    let plan = match plan {
        Ok(p) => p,
        Err(r) => return refused(r),
    };
    match plan {
        Plan::Index => json(
            StatusCode::OK,
            &serde_json::json!({"endpoints": ["GET /metrics", "GET /status", "GET /ab?window=SECONDS", "POST /reload", "PUT /policies/{name}/weight"]}),
        ),
        Plan::Metrics => {
            let openmetrics = parts
                .headers
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
        Plan::Status => match host.sched.status().await {
            Some(status) => json(
                StatusCode::OK,
                &StatusWithReload {
                    status,
                    last_reload: host.reloader.last(),
                },
            ),
            None => error(StatusCode::SERVICE_UNAVAILABLE, "scheduler stopped"),
        },
        Plan::Report { window } => match host.sched.report(window).await {
            Some(r) => json(StatusCode::OK, &r),
            None => error(StatusCode::SERVICE_UNAVAILABLE, "scheduler stopped"),
        },
        Plan::Reload => match host.reloader.reload(host, "admin").await {
            Ok(report) => json(StatusCode::OK, &report),
            Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, &e),
        },
        Plan::SetWeight { arm } => {
            let body = match Limited::new(body, route::MAX_WEIGHT_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        &format!(
                            "body too large: send {{\"weight\": N}}, at most {} bytes",
                            route::MAX_WEIGHT_BODY
                        ),
                    );
                }
            };
            let weight = match route::weight_from_body(&body) {
                Ok(w) => w,
                Err(r) => return refused(r),
            };
            match host.reloader.set_weight(host, &arm, weight).await {
                Ok(()) => {
                    tracing::info!(arm = %Escaped(&arm), weight, "arm weight changed");
                    json(
                        StatusCode::OK,
                        &serde_json::json!({"arm": arm, "weight": weight}),
                    )
                }
                Err(e @ WeightError::NoArm(_)) => error(StatusCode::NOT_FOUND, &e.to_string()),
                Err(e @ WeightError::Refused(_)) => error(StatusCode::CONFLICT, &e.to_string()),
            }
        }
    }
}
