//! Any admin request (method, target, `Host`, `Origin`, `Authorization`,
//! body) on a listener with or without a token: the admin routes never
//! panic, refuse with a 4xx and a message, accept only what is consistent,
//! and refuse every request whose `Host` names another site (DNS rebinding)
//! unless it carries the token.
#![no_main]

#[allow(dead_code, missing_docs)]
#[path = "../../src/admin/guard.rs"]
mod guard;
#[allow(dead_code, missing_docs)]
#[path = "../../src/admin/route.rs"]
mod route;

use std::net::SocketAddr;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const TOKEN: &str = "t0ken";

/// One of `known`, then an arbitrary tail; or an arbitrary string.
fn text(u: &mut Unstructured<'_>, known: &[&str]) -> Result<String> {
    if u.ratio(1, 8)? {
        return u.arbitrary();
    }
    let mut s = u.choose(known)?.to_string();
    if u.ratio(1, 3)? {
        s.push_str(u.arbitrary::<&str>()?);
    }
    Ok(s)
}

struct Input {
    method: String,
    target: String,
    hosts: Vec<String>,
    origin: Option<String>,
    authorization: Option<String>,
    token: Option<&'static str>,
    local: Option<SocketAddr>,
    body: Vec<u8>,
}

fn input(u: &mut Unstructured<'_>) -> Result<Input> {
    let method = text(
        u,
        &["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS"],
    )?;
    let target = text(
        u,
        &[
            "/",
            "/metrics",
            "/status",
            "/ab",
            "/ab?window=",
            "/ab?x=1&window=",
            "/reload",
            "/policies/",
            "/policies/main/weight",
            "/policies/weight",
            "/policies//weight",
            "http://127.0.0.1/ab?window=",
            "http://evil.example/status",
        ],
    )?;
    let host_names = [
        "127.0.0.1:11436",
        "localhost",
        "a.localhost.",
        "[::1]:1",
        "10.0.0.5",
        "evil.example",
        "127.0.0.1.evil.example",
        "",
    ];
    let mut hosts = Vec::new();
    for _ in 0..u.int_in_range(0..=2)? {
        hosts.push(text(u, &host_names)?);
    }
    let origin = if u.arbitrary()? {
        Some(text(
            u,
            &[
                "http://127.0.0.1:11436",
                "http://localhost",
                "https://evil.example",
                "null",
            ],
        )?)
    } else {
        None
    };
    let authorization = if u.arbitrary()? {
        Some(text(u, &["Bearer t0ken", "Bearer t0ke", "Bearer "])?)
    } else {
        None
    };
    let token = if u.arbitrary()? { Some(TOKEN) } else { None };
    let local = *u.choose(&[
        Some("127.0.0.1:11436".parse().unwrap()),
        Some("10.0.0.5:11436".parse().unwrap()),
        Some("[::1]:11436".parse().unwrap()),
        None,
    ])?;
    Ok(Input {
        method,
        target,
        hosts,
        origin,
        authorization,
        token,
        local,
        body: u.bytes(u.len())?.to_vec(),
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(i) = input(&mut Unstructured::new(data)) else {
        return;
    };
    let mut b = http::Request::builder()
        .method(i.method.as_str())
        .uri(i.target.as_str());
    for h in &i.hosts {
        b = b.header(http::header::HOST, h.as_str());
    }
    if let Some(o) = &i.origin {
        b = b.header(http::header::ORIGIN, o.as_str());
    }
    if let Some(a) = &i.authorization {
        b = b.header(http::header::AUTHORIZATION, a.as_str());
    }
    // What hyper would not parse never reaches the routes.
    let Ok(req) = b.body(()) else {
        return;
    };
    let (parts, ()) = req.into_parts();
    let access = guard::Access {
        token: i.token,
        local: i.local,
    };
    let authorized = guard::authorized(&parts.headers, i.token);

    match route::plan(&parts, &access) {
        Ok(plan) => {
            assert!(
                guard::check(&parts, &access).is_ok(),
                "{plan:?} past the guard"
            );
            match &plan {
                route::Plan::Report { window } => {
                    assert!(!window.is_zero(), "{plan:?}");
                    assert!(
                        window.as_secs_f64() <= route::MAX_WINDOW_SECONDS,
                        "{plan:?}"
                    );
                }
                route::Plan::SetWeight { arm } => {
                    assert!(authorized && parts.method == http::Method::PUT, "{plan:?}");
                    assert!(!arm.is_empty(), "{plan:?}");
                    assert_eq!(parts.uri.path(), format!("/policies/{arm}/weight"));
                }
                route::Plan::Reload => {
                    assert!(authorized && parts.method == http::Method::POST, "{plan:?}");
                }
                route::Plan::Index | route::Plan::Metrics | route::Plan::Status => {
                    assert_eq!(parts.method, http::Method::GET, "{plan:?}");
                }
            }
        }
        Err(r) => {
            assert!([400, 401, 403, 404].contains(&r.status.as_u16()), "{r}");
            assert!(!r.message.is_empty());
        }
    }

    // The same request from a rebinding page (its own name as Host, no
    // token) is refused, whatever else it holds.
    let mut rebound = parts.clone();
    rebound.headers.remove(http::header::AUTHORIZATION);
    rebound.headers.insert(
        http::header::HOST,
        http::HeaderValue::from_static("evil.example"),
    );
    let r = route::plan(&rebound, &access).expect_err("a rebinding page got through");
    assert_eq!(r.status, 403, "{r}");

    match route::weight_from_body(&i.body) {
        Ok(w) => {
            assert!(w <= route::MAX_WEIGHT);
            assert!(serde_json::from_slice::<serde_json::Value>(&i.body).is_ok());
        }
        Err(r) => assert_eq!(r.status, 400, "{r}"),
    }
});
