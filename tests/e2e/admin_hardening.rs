//! The admin API and the log under hostile input: malformed admin requests
//! are answered 400 (never a dropped connection), a foreign `Host` or
//! `Origin` is refused 403 (DNS rebinding, cross-site requests), and neither
//! a client's model name nor a plugin's error text can forge a log line.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

const T: Duration = Duration::from_secs(30);
const TOKEN: &str = "hardening-token";

/// One request over a fresh connection, written byte for byte (so `Host`
/// and `Origin` are exactly what the test says); returns the status code
/// and the body. Panics if the connection closes without an answer.
async fn raw(
    admin: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", admin.port()))
        .await
        .expect("connect to the admin listener");
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: 0\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out))
        .await
        .expect("the admin API answers in time")
        .expect("read the answer");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path} {headers:?}: no HTTP answer, got {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn error_of(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {body}"))
        .to_string()
}

/// The admin API still answers a good request.
async fn still_serving(m: &Maitre) {
    let r = client()
        .get(format!("{}/status", m.admin))
        .send()
        .await
        .expect("maitre still serves");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn ab_window_out_of_range_is_a_400_not_a_dropped_connection() {
    let fake = fake(1, 1).await;
    let m = start(&PolicyFile::new(fake.url(), 1).arm(Arm::builtin("main", "fifo")));
    let c = client();
    for w in ["1e300", "1e20", "inf", "NaN", "-1", "0", "abc", ""] {
        let r = c
            .get(format!("{}/ab?window={w}", m.admin))
            .send()
            .await
            .unwrap_or_else(|e| panic!("window={w}: the connection was dropped: {e}"));
        assert_eq!(r.status(), 400, "window={w}");
        let msg = error_of(&r.text().await.unwrap());
        assert!(
            msg.contains("window") && msg.contains("seconds"),
            "window={w}: {msg}"
        );
        still_serving(&m).await;
    }
    for (q, seconds) in [("", 600.0), ("?window=60", 60.0), ("?window=0.5", 0.5)] {
        let r = c.get(format!("{}/ab{q}", m.admin)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{q}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["window_seconds"], seconds, "{q}");
    }
}

#[tokio::test]
async fn put_weight_without_an_arm_name_is_a_400_not_a_dropped_connection() {
    let fake = fake(2, 1).await;
    let m = start(
        &PolicyFile::new(fake.url(), 2)
            .arm(Arm::builtin("alpha", "fifo").weight(50))
            .arm(Arm::builtin("beta", "fifo").weight(50)),
    );
    let c = client();
    for path in ["/policies/weight", "/policies//weight"] {
        let r = c
            .put(format!("{}{path}", m.admin))
            .json(&serde_json::json!({"weight": 1}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT {path}: the connection was dropped: {e}"));
        assert_eq!(r.status(), 400, "PUT {path}");
        let msg = error_of(&r.text().await.unwrap());
        assert!(msg.contains("arm name"), "PUT {path}: {msg}");
        still_serving(&m).await;
    }
    let r = c
        .put(format!("{}/policies/alpha/weight", m.admin))
        .json(&serde_json::json!({"weight": 10}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn foreign_host_and_origin_are_refused() {
    let fake = fake(1, 1).await;
    let m = start(&PolicyFile::new(fake.url(), 1).arm(Arm::builtin("main", "fifo")));
    let admin = m.ready.admin.unwrap();
    let port = admin.port();
    // DNS rebinding: a page on evil.example whose name now resolves to
    // 127.0.0.1 sends its own name as Host.
    for host in [
        "evil.example".to_string(),
        format!("evil.example:{port}"),
        format!("127.0.0.1.evil.example:{port}"),
        format!("localhost.evil.example:{port}"),
        "10.1.2.3".to_string(),
    ] {
        for path in ["/status", "/metrics", "/ab", "/"] {
            let (code, body) = raw(admin, "GET", path, &[&format!("Host: {host}")]).await;
            assert_eq!(code, 403, "GET {path} Host: {host}: {body}");
            assert!(error_of(&body).contains("Host"), "{body}");
        }
        let (code, _) = raw(admin, "POST", "/reload", &[&format!("Host: {host}")]).await;
        assert_eq!(code, 403, "POST /reload Host: {host}");
    }
    // Loopback names and addresses, with any port, are this API.
    for host in [
        format!("127.0.0.1:{port}"),
        "127.0.0.1".to_string(),
        format!("localhost:{port}"),
        "LocalHost".to_string(),
        format!("[::1]:{port}"),
        "127.0.0.2:80".to_string(),
    ] {
        let (code, body) = raw(admin, "GET", "/status", &[&format!("Host: {host}")]).await;
        assert_eq!(code, 200, "Host: {host}: {body}");
    }
    // A cross-site POST (a form or fetch from a page on another site).
    let loopback_host = format!("Host: 127.0.0.1:{port}");
    for origin in [
        "http://evil.example",
        "https://evil.example:443",
        "null",
        "http://127.0.0.1.evil.example",
    ] {
        let (code, body) = raw(
            admin,
            "POST",
            "/reload",
            &[&loopback_host, &format!("Origin: {origin}")],
        )
        .await;
        assert_eq!(code, 403, "Origin: {origin}: {body}");
        assert!(error_of(&body).contains("Origin"), "{body}");
    }
    let (code, _) = raw(
        admin,
        "PUT",
        "/policies/main/weight",
        &[&loopback_host, "Origin: http://evil.example"],
    )
    .await;
    assert_eq!(code, 403);
    let s = m.status().await;
    assert!(s["last_reload"].is_null(), "a refused POST reloaded: {s:#}");
    // No Origin (curl, scripts) or a loopback page's Origin may change maitre.
    for headers in [
        vec![loopback_host.clone()],
        vec![
            loopback_host.clone(),
            format!("Origin: http://127.0.0.1:{port}"),
        ],
        vec![
            loopback_host.clone(),
            "Origin: http://localhost:3000".to_string(),
        ],
    ] {
        let h: Vec<&str> = headers.iter().map(String::as_str).collect();
        let (code, body) = raw(admin, "POST", "/reload", &h).await;
        assert_eq!(code, 200, "{headers:?}: {body}");
    }
}

#[tokio::test]
async fn the_admin_token_still_works_under_any_host() {
    let fake = fake(1, 1).await;
    let m = start(
        &PolicyFile::new(fake.url(), 1)
            .admin_token(TOKEN)
            .arm(Arm::builtin("main", "fifo")),
    );
    let admin = m.ready.admin.unwrap();
    let auth = format!("Authorization: Bearer {TOKEN}");
    // A foreign name without the token: refused before anything else.
    let (code, _) = raw(admin, "GET", "/status", &["Host: maitre.internal:11436"]).await;
    assert_eq!(code, 403);
    let (code, _) = raw(admin, "POST", "/reload", &["Host: maitre.internal:11436"]).await;
    assert_eq!(code, 403);
    // With the token (which a rebinding page cannot know), any name and Origin.
    let (code, body) = raw(
        admin,
        "GET",
        "/status",
        &["Host: maitre.internal:11436", &auth],
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = raw(
        admin,
        "POST",
        "/reload",
        &[
            "Host: maitre.internal:11436",
            "Origin: https://ops.example",
            &auth,
        ],
    )
    .await;
    assert_eq!(code, 200, "{body}");
    // A loopback Host without the token: reads yes, control no (as before).
    let (code, _) = raw(admin, "GET", "/status", &["Host: localhost"]).await;
    assert_eq!(code, 200);
    let (code, body) = raw(admin, "POST", "/reload", &["Host: localhost"]).await;
    assert_eq!(code, 401, "{body}");
}

/// A fake log line, as the text format writes one.
const FORGED: &str = "2030-01-01T00:00:00.000000Z  INFO maitre::request: FORGED-LINE request ended";

#[tokio::test]
async fn a_model_name_cannot_forge_a_log_line() {
    let fake = fake(1, 1).await;
    let m = start(&PolicyFile::new(fake.url(), 1).arm(Arm::builtin("main", "fifo")));
    let model = format!("fake\n{FORGED}\r\u{1b}[2Kmore");
    let r = client()
        .post(format!("{}/api/generate", m.url))
        .json(&serde_json::json!({"model": model, "prompt": "hi", "stream": false}))
        .send()
        .await
        .expect("maitre answers");
    let _ = r.text().await;
    assert!(
        m.wait_log(T, |l| l.contains("FORGED-LINE")).await,
        "the request was not logged:\n{}",
        m.logs().join("\n")
    );
    // Give a forged continuation line time to arrive too.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = m.logs();
    let hits: Vec<&String> = logs.iter().filter(|l| l.contains("FORGED-LINE")).collect();
    assert_eq!(hits.len(), 1, "{hits:#?}");
    let line = hits[0];
    assert!(
        line.contains("request ended")
            && line.contains(r#"model="fake\n2030-01-01"#)
            && line.contains(r"\r\u{1b}[2Kmore"),
        "the model must stay, escaped, on the real line: {line}"
    );
    assert!(
        !logs.iter().any(|l| l.starts_with("2030-01-01")),
        "a forged line: {logs:#?}"
    );
    assert!(
        !logs.iter().any(|l| l.contains('\u{1b}')),
        "a raw escape sequence: {logs:#?}"
    );
}

#[tokio::test]
async fn a_plugin_error_cannot_forge_a_log_line() {
    let fake = fake(1, 1).await;
    let policy = |arm: Arm| PolicyFile::new(fake.url(), 1).arm(arm);
    let m = start(&policy(Arm::builtin("main", "fifo")));
    // The fifo plugin's `init` refuses an unknown config key and names it in
    // its own words; that text reaches the "reload failed" log line.
    let key = format!("typo\n{FORGED}");
    policy(Arm::builtin("main", "fifo").config(&key, 1)).write(&m.policy);
    let r = client()
        .post(format!("{}/reload", m.admin))
        .send()
        .await
        .expect("POST /reload");
    assert_eq!(r.status(), 422);
    assert!(
        m.wait_log(T, |l| l.contains("reload failed")).await,
        "no failed reload:\n{}",
        m.logs().join("\n")
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = m.logs();
    let hits: Vec<&String> = logs.iter().filter(|l| l.contains("FORGED-LINE")).collect();
    assert!(!hits.is_empty(), "{logs:#?}");
    for l in hits {
        assert!(
            l.contains("reload failed") && l.contains(r"typo\n2030-01-01"),
            "plugin text on a line of its own: {l}\nlog: {logs:#?}"
        );
    }
    assert!(
        !logs.iter().any(|l| l.starts_with("2030-01-01")),
        "{logs:#?}"
    );
}
