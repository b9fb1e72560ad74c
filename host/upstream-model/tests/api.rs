//! Generation endpoint shapes: stream defaults, SSE, the Host check, errors,
//! token counts, how bodies are read, connection faults. Model management
//! and control routes are in `models.rs`.

mod common;

use common::*;
use serde_json::{Value, json};
use upstream_model::{EventKind, LogEvent, ModelConfig};

#[tokio::test]
async fn stream_defaults_true_on_api_and_false_on_v1() {
    let f = fake(cfg(2, 1, 3)).await;
    let r = post(
        f.addr(),
        "/api/generate",
        &[],
        r#"{"model":"fake","prompt":"a b c"}"#,
    )
    .await;
    assert_eq!(header(&r, "content-type"), "application/x-ndjson");
    assert_eq!(ndjson(&text(r).await).len(), 4);

    let r = post(
        f.addr(),
        "/api/chat",
        &[],
        r#"{"model":"fake","messages":[{"role":"user","content":"x"}],"stream":null}"#,
    )
    .await;
    assert_eq!(header(&r, "content-type"), "application/x-ndjson");

    let r = post(
        f.addr(),
        "/v1/chat/completions",
        &[],
        r#"{"model":"fake","messages":[{"role":"user","content":"hi you"}]}"#,
    )
    .await;
    assert_eq!(r.status(), 200);
    // Ollama's /v1 writers set their own, without a charset.
    assert_eq!(header(&r, "content-type"), "application/json");
    let v = json(r).await;
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(v["created"].is_u64());
    assert_eq!(v["model"], "fake");
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(
        v["choices"][0]["message"],
        json!({"role":"assistant","content":"tok0 tok1 tok2 "})
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens":2,"completion_tokens":3,"total_tokens":5})
    );

    let r = post(
        f.addr(),
        "/v1/completions",
        &[],
        r#"{"model":"fake","prompt":"x","max_tokens":2}"#,
    )
    .await;
    let v = json(r).await;
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "tok0 tok1 ");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn v1_sse_ends_with_done() {
    let f = fake(cfg(2, 1, 3)).await;
    let r = post(
        f.addr(),
        "/v1/chat/completions",
        &[],
        r#"{"model":"fake","messages":[{"role":"user","content":"x"}],"stream":true}"#,
    )
    .await;
    assert_eq!(header(&r, "content-type"), "text/event-stream");
    let events = sse(&text(r).await);
    assert_eq!(events.len(), 5, "{events:?}");
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..4]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["content"], "tok0 ");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["choices"][0]["finish_reason"], Value::Null);
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));

    // include_usage adds a usage chunk (no choices) before [DONE].
    let r = post(
        f.addr(),
        "/v1/completions",
        &[],
        r#"{"model":"fake","prompt":"x y","stream":true,"max_tokens":2,"stream_options":{"include_usage":true}}"#,
    )
    .await;
    let events = sse(&text(r).await);
    assert_eq!(events.len(), 5, "{events:?}");
    let finish: Value = serde_json::from_str(&events[2]).unwrap();
    assert_eq!(finish["object"], "text_completion");
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let usage: Value = serde_json::from_str(&events[3]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens":2,"completion_tokens":2,"total_tokens":4})
    );
    assert_eq!(events[4], "[DONE]");
}

#[tokio::test]
async fn host_check() {
    let f = fake(ModelConfig::default()).await;
    let r = send(f.addr(), "GET", "/api/tags", &[("host", "example.com")], "").await;
    assert_eq!(r.status(), 403);
    assert_eq!(header(&r, "x-fake-upstream"), "1");
    assert_eq!(text(r).await, "");
    let r = send(
        f.addr(),
        "POST",
        "/api/generate",
        &[("host", "example.com:11434")],
        r#"{"model":"fake","prompt":"x"}"#,
    )
    .await;
    assert_eq!(r.status(), 403);
    for ok in [
        "localhost:11434",
        "127.0.0.1",
        "[::1]:1",
        "maitre.localhost",
    ] {
        let r = send(f.addr(), "GET", "/", &[("host", ok)], "").await;
        assert_eq!(r.status(), 200, "{ok}");
    }
    // The echo endpoint shows what arrived, whatever the Host.
    let r = send(
        f.addr(),
        "GET",
        "/_fake/echo?a=1",
        &[("host", "example.com"), ("x-custom", "v")],
        "",
    )
    .await;
    let v = json(r).await;
    assert_eq!(v["headers"]["host"], "example.com");
    assert_eq!(v["headers"]["x-custom"], "v");
    assert_eq!(v["query"], "a=1");
    assert_eq!(v["method"], "GET");

    let open = fake(ModelConfig {
        check_host: false,
        ..ModelConfig::default()
    })
    .await;
    let r = send(open.addr(), "GET", "/", &[("host", "example.com")], "").await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn errors_look_like_ollama() {
    let f = fake(cfg(1, 1, 2)).await;
    let a = f.addr();
    let check =
        |status: u16, body: Value| move |r: (u16, Value)| assert_eq!(r, (status, body.clone()));
    async fn call(
        a: std::net::SocketAddr,
        path: &str,
        h: &[(&str, &str)],
        body: &str,
    ) -> (u16, Value) {
        let r = post(a, path, h, body).await;
        let s = r.status().as_u16();
        (s, json(r).await)
    }
    check(400, json!({"error":"model is required"}))(
        call(a, "/api/generate", &[], r#"{"prompt":"x"}"#).await,
    );
    check(400, json!({"error":"model is required"}))(
        call(a, "/api/chat", &[], r#"{"messages":[]}"#).await,
    );
    check(
        404,
        json!({"error":"model \"llama3\" not found, try pulling it first"}),
    )(
        call(
            a,
            "/api/generate",
            &[],
            r#"{"model":"llama3","prompt":"x"}"#,
        )
        .await,
    );
    let (s, v) = call(a, "/api/generate", &[], "{not json").await;
    assert_eq!(s, 400);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid character"),
        "{v}"
    );
    check(
        503,
        json!({"error":"server busy, please try again.  maximum pending requests exceeded"}),
    )(
        call(
            a,
            "/api/chat",
            &[("x-fake-status", "503")],
            r#"{"model":"fake","messages":[]}"#,
        )
        .await,
    );
    // /v1 uses the OpenAI envelope.
    check(
        404,
        json!({"error":{"message":"model \"gpt-4\" not found, try pulling it first","type":"not_found_error","param":null,"code":null}}),
    )(
        call(
            a,
            "/v1/chat/completions",
            &[],
            r#"{"model":"gpt-4","messages":[]}"#,
        )
        .await,
    );
    check(
        503,
        json!({"error":{"message":"server busy, please try again.  maximum pending requests exceeded","type":"api_error","param":null,"code":null}}),
    )(
        call(
            a,
            "/v1/completions",
            &[("x-fake-status", "503")],
            r#"{"model":"fake","prompt":"x"}"#,
        )
        .await,
    );
    let (s, v) = call(a, "/v1/chat/completions", &[], "nope").await;
    assert_eq!(
        (s, v["error"]["type"].as_str()),
        (400, Some("invalid_request_error"))
    );

    let r = get(a, "/api/nothing").await;
    assert_eq!(r.status(), 404);
    assert_eq!(header(&r, "x-fake-upstream"), "1");
    assert_eq!(text(r).await, "404 page not found");
    let r = get(a, "/api/generate").await;
    assert_eq!(r.status(), 405);
    let r = post(a, "/api/tags", &[], "").await;
    assert_eq!(r.status(), 405);

    let log = f.log();
    let failed = log.iter().filter(|e| e.kind == EventKind::Failed).count();
    assert_eq!(failed, 8, "{log:#?}");
    assert_eq!(f.stats().max_concurrent, 0, "errors never take a slot");
}

#[tokio::test]
async fn token_count_sources() {
    let f = fake(cfg(1, 0, 5)).await;
    let a = f.addr();
    let v = json(
        post(
            a,
            "/api/generate",
            &[],
            r#"{"model":"fake","prompt":"x","stream":false,"options":{"num_predict":3}}"#,
        )
        .await,
    )
    .await;
    assert_eq!(
        (v["eval_count"].clone(), v["done_reason"].clone()),
        (json!(3), json!("length"))
    );
    let v = json(
        post(
            a,
            "/api/generate",
            &[],
            r#"{"model":"fake","prompt":"x","stream":false,"options":{"num_predict":-1}}"#,
        )
        .await,
    )
    .await;
    assert_eq!(
        (v["eval_count"].clone(), v["done_reason"].clone()),
        (json!(5), json!("stop"))
    );
    let v = json(
        post(
            a,
            "/api/chat",
            &[("x-fake-tokens", "7")],
            r#"{"model":"fake","messages":[{"role":"user","content":"x"}],"stream":false}"#,
        )
        .await,
    )
    .await;
    assert_eq!(v["eval_count"], 7);
    assert_eq!(
        v["message"]["content"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .count(),
        7
    );
}

#[tokio::test]
async fn requests_are_read_like_ollamas_go_server() {
    let f = fake(cfg(2, 1, 2)).await;
    // Keys without case, the last repeated key winning, trailing data
    // ignored, and a percent-encoded path: all served like the plain request.
    let cases = [
        (
            "/api/generate",
            r#"{"Model":"fake","prompt":"x","STREAM":false}"#,
        ),
        (
            "/api/generate",
            r#"{"model":"nope","model":"fake","prompt":"x","stream":false}"#,
        ),
        (
            "/api/generate",
            r#"{"model":"fake","prompt":"x","stream":false} trailing {garbage"#,
        ),
        (
            "/api/%67enerate",
            r#"{"model":"fake","prompt":"x","stream":false}"#,
        ),
    ];
    for (path, body) in cases {
        let r = post(f.addr(), path, &[], body).await;
        assert_eq!(r.status(), 200, "{path} {body}");
        assert_eq!(json(r).await["done"], true, "{path} {body}");
    }
    let log = f.log();
    let started: Vec<&LogEvent> = log
        .iter()
        .filter(|e| e.kind == EventKind::Started)
        .collect();
    assert_eq!(started.len(), cases.len());
    assert!(
        started
            .iter()
            .all(|e| e.model == "fake" && e.path == "/api/generate"),
        "{started:?}"
    );
}

#[tokio::test]
async fn hang_up_reused_closes_a_kept_alive_connection_without_an_answer() {
    use http_body_util::Full;
    use hyper_util::rt::TokioIo;

    let f = fake(cfg(1, 1, 2)).await;
    let stream = tokio::net::TcpStream::connect(f.addr()).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = || {
        http::Request::post("/api/generate")
            .header("host", f.addr().to_string())
            .header("x-fake-hang-up-reused", "1")
            .header("x-test-tag", "t")
            .body(Full::new(bytes::Bytes::from_static(
                br#"{"model":"fake","prompt":"x","stream":false}"#,
            )))
            .unwrap()
    };
    // The first request on a connection is answered.
    let r = tx.send_request(req()).await.unwrap();
    assert_eq!(json(r).await["eval_count"], 2);
    // The next one on the same connection is hung up on.
    tx.ready().await.unwrap();
    let e = tx.send_request(req()).await.unwrap_err();
    assert!(e.is_incomplete_message(), "{e:?}");
    let kinds: Vec<EventKind> = f.log().iter().map(|e| e.kind).collect();
    assert_eq!(kinds.last(), Some(&EventKind::Failed), "{kinds:?}");
}
