//! Small helpers: response builders, error bodies, request parsing, clocks.

use std::convert::Infallible;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use serde_json::{Value, json};

use crate::go_json;
use crate::timing::Timing;

/// The response body type of every handler.
/// Response body; an error aborts the connection mid-response (`X-Fake-Drop-After`).
pub(crate) type Body = UnsyncBoxBody<Bytes, std::io::Error>;

pub(crate) const JSON: &str = "application/json; charset=utf-8";
/// What Ollama's `/v1` writers set on a JSON answer (no charset).
pub(crate) const OA_JSON: &str = "application/json";
pub(crate) const NDJSON: &str = "application/x-ndjson";
pub(crate) const SSE: &str = "text/event-stream";
pub(crate) const TEXT: &str = "text/plain; charset=utf-8";

pub(crate) const BUSY: &str = "server busy, please try again.  maximum pending requests exceeded";
pub(crate) const FAKE_FAILURE: &str = "fake failure";
pub(crate) const DIGEST: &str =
    "sha256:fa4e0000c0ffee0000000000000000000000000000000000000000000000fa4e";
pub(crate) const MODEL_SIZE: u64 = 2_019_393_189;
pub(crate) const CONTEXT_LENGTH: u64 = 4096;

pub(crate) fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

pub(crate) fn response(
    status: StatusCode,
    ctype: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

pub(crate) fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = status;
    r
}

pub(crate) fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    response(status, JSON, serde_json::to_vec(v).unwrap_or_default())
}

/// A JSON answer on `/v1`, as Ollama's OpenAI middleware writes it: its own
/// `Content-Type` and `json.Encoder`'s trailing newline.
pub(crate) fn oa_json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    response(status, OA_JSON, b)
}

/// Ollama's native error: a status and `{"error": msg}`.
pub(crate) fn ollama_error(status: StatusCode, msg: &str) -> Response<Body> {
    if status == StatusCode::FORBIDDEN {
        return empty(status);
    }
    json_response(status, &json!({ "error": msg }))
}

/// The OpenAI error envelope Ollama's `/v1` middleware uses.
pub(crate) fn openai_error(status: StatusCode, msg: &str) -> Response<Body> {
    if status == StatusCode::FORBIDDEN {
        return empty(status);
    }
    let kind = match status.as_u16() {
        400 => "invalid_request_error",
        404 => "not_found_error",
        _ => "api_error",
    };
    oa_json_response(
        status,
        &json!({ "error": { "message": msg, "type": kind, "param": null, "code": null } }),
    )
}

pub(crate) fn not_found_msg(model: &str) -> String {
    format!("model \"{model}\" not found, try pulling it first")
}

/// The message `X-Fake-Status: N` answers with.
pub(crate) fn status_msg(status: StatusCode, model: &str) -> String {
    match status.as_u16() {
        400 => "fake bad request".into(),
        404 => not_found_msg(model),
        499 => "request canceled".into(),
        500 => FAKE_FAILURE.into(),
        503 => BUSY.into(),
        n => format!("fake status {n}"),
    }
}

/// Whether `model` is one the fake "has": any name starting with "fake".
pub(crate) fn known_model(model: &str) -> bool {
    model.starts_with("fake")
}

/// Parses a JSON request body the way Ollama reads it ([`go_json`]: keys
/// without case, last repeated key wins, trailing data ignored) and reports
/// problems with it the way Ollama does.
pub(crate) fn parse_body(body: &[u8]) -> Result<serde_json::Map<String, Value>, String> {
    let first = body.iter().copied().find(|b| !b.is_ascii_whitespace());
    let Some(first) = first else {
        return Err("missing request body".into());
    };
    match go_json::first_value(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(format!(
            "json: cannot unmarshal {} into Go value of type api.Request",
            match other {
                Value::Array(_) => "array",
                Value::String(_) => "string",
                Value::Number(_) => "number",
                Value::Bool(_) => "bool",
                _ => "null",
            }
        )),
        Err(_) if !b"{[\"-0123456789tfn".contains(&first) => Err(format!(
            "invalid character '{}' looking for beginning of value",
            first as char
        )),
        Err(e) => Err(format!("invalid character in request body: {e}")),
    }
}

/// `stream` as Ollama reads it: absent or null means `default`.
pub(crate) fn stream_flag(m: &serde_json::Map<String, Value>, default: bool) -> bool {
    m.get("stream").and_then(Value::as_bool).unwrap_or(default)
}

pub(crate) fn str_field<'a>(m: &'a serde_json::Map<String, Value>, k: &str) -> &'a str {
    m.get(k).and_then(Value::as_str).unwrap_or("")
}

/// A positive integer field (JSON integer or float).
pub(crate) fn pos_int(v: Option<&Value>) -> Option<u64> {
    let v = v?;
    let n = v.as_i64().or_else(|| v.as_f64().map(|f| f as i64))?;
    (n > 0).then_some(n as u64)
}

/// Whether `keep_alive` is zero (an unload request).
pub(crate) fn keep_alive_zero(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Number(n)) => n.as_f64() == Some(0.0),
        Some(Value::String(s)) => parse_go_duration(s).is_some_and(|d| d == 0.0),
        _ => false,
    }
}

/// Seconds in a Go duration string ("5m", "1h30m", "10s", "250ms", "0").
fn parse_go_duration(s: &str) -> Option<f64> {
    let s = s.trim();
    if let Ok(n) = s.parse::<f64>() {
        return Some(n);
    }
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let mut total = 0.0;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += n * mult;
        rest = &rest[unit_end..];
    }
    Some(if neg { -total } else { total })
}

/// When a model used with this `keep_alive` would be unloaded.
pub(crate) fn expiry(keep_alive: Option<&Value>) -> SystemTime {
    let secs = match keep_alive {
        Some(Value::Number(n)) => n.as_f64().unwrap_or(300.0),
        Some(Value::String(s)) => parse_go_duration(s).unwrap_or(300.0),
        _ => 300.0,
    };
    let secs = if secs < 0.0 {
        300.0 * 365.0 * 86400.0
    } else {
        secs
    };
    SystemTime::now() + Duration::from_secs_f64(secs)
}

/// Whitespace-separated words: the fake's notion of prompt tokens.
pub(crate) fn count_words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// Header value as an owned string.
pub(crate) fn header_string(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn header_u64(h: &HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// Per-request behaviour, from the config and the `X-Fake-*` headers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    /// The configured timing with `X-Fake-Prompt-Ms` / `X-Fake-Token-Ms`.
    pub timing: Timing,
    /// `X-Fake-Tokens`: overrides everything else.
    pub tokens: Option<u64>,
    pub fail_after: Option<u64>,
    /// `X-Fake-Drop-After: N`: after N tokens, abort the connection without
    /// ending the response (an upstream that dies mid-stream).
    pub drop_after: Option<u64>,
    pub status: Option<StatusCode>,
    /// `X-Fake-Status-Times: N`: answer `status` only to the first N requests
    /// carrying the same `X-Test-Tag` (a busy upstream that recovers).
    pub status_times: Option<u64>,
}

impl Shape {
    pub fn from_headers(cfg: &crate::ModelConfig, h: &HeaderMap) -> Self {
        Shape {
            timing: Timing::of(cfg).overridden(
                header_u64(h, "x-fake-prompt-ms").map(Duration::from_millis),
                header_u64(h, "x-fake-token-ms").map(Duration::from_millis),
            ),
            tokens: header_u64(h, "x-fake-tokens"),
            fail_after: header_u64(h, "x-fake-fail-after"),
            drop_after: header_u64(h, "x-fake-drop-after"),
            status_times: header_u64(h, "x-fake-status-times"),
            status: header_u64(h, "x-fake-status")
                .and_then(|n| u16::try_from(n).ok())
                .and_then(|n| StatusCode::from_u16(n).ok()),
        }
    }
}

/// Sleeps unless `d` is zero (a zero sleep still costs a timer round trip).
pub(crate) async fn pause(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

/// Sleeps on the real clock to the offsets of a [`crate::timing::Plan`],
/// counted from the slot grant. Offsets are absolute, so timer lateness does
/// not add up over the tokens of an answer.
pub(crate) struct Pacer {
    granted: Instant,
    reached: Duration,
}

impl Pacer {
    /// Offsets count from now: call it when the slot is granted.
    pub fn start() -> Self {
        Pacer {
            granted: Instant::now(),
            reached: Duration::ZERO,
        }
    }

    /// Sleeps until `at` after the grant. An offset already reached costs
    /// no timer round trip (zero-delay benches send many tokens).
    pub async fn until(&mut self, at: Duration) {
        if at > self.reached {
            self.reached = at;
            match self.granted.checked_add(at) {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        }
    }
}

pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

pub(crate) fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// RFC 3339 UTC timestamp with microseconds, as Go's JSON encoding of
/// `time.Time` would give (Go uses the local offset; UTC is valid too).
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

pub(crate) fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A deterministic unit vector for `text` (FNV-1a seeded xorshift).
pub(crate) fn embedding(text: &str, dims: usize) -> Vec<f32> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    let mut x = h | 1;
    let mut v: Vec<f32> = (0..dims)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let norm = v.iter().map(|f| f * f).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|f| *f /= norm);
    }
    v
}

/// Standard base64 (for OpenAI's `encoding_format: "base64"`).
pub(crate) fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        out.push(A[(n >> 18) as usize & 63] as char);
        out.push(A[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            A[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            A[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// Whether a Host header value is one Ollama bound to loopback accepts in
/// the fake's (deliberately narrow) model of it.
pub(crate) fn host_allowed(host: &str) -> bool {
    let h = host.trim().to_ascii_lowercase();
    if h.is_empty() {
        return true;
    }
    let port_ok = |p: &str| p.is_empty() || p.parse::<u16>().is_ok();
    let name = if let Some(rest) = h.strip_prefix('[') {
        let Some((inner, after)) = rest.split_once(']') else {
            return false;
        };
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(port_ok)) {
            return false;
        }
        inner
    } else {
        match h.split_once(':') {
            Some((n, p)) if port_ok(p) => n,
            Some(_) => return false,
            None => h.as_str(),
        }
    };
    matches!(name, "127.0.0.1" | "localhost" | "::1") || name.ends_with(".localhost")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        for ok in [
            "127.0.0.1",
            "127.0.0.1:11434",
            "localhost",
            "LOCALHOST:1",
            "[::1]",
            "[::1]:8080",
            "app.localhost",
            "app.localhost:99",
            "",
        ] {
            assert!(host_allowed(ok), "{ok}");
        }
        for bad in [
            "example.com",
            "example.com:11434",
            "10.0.0.1",
            "localhost.example.com",
            "127.0.0.1:x",
            "[::2]",
            "::1",
        ] {
            assert!(!host_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let t = UNIX_EPOCH + Duration::from_micros(1_709_251_199_123_456);
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59.123456Z");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_go_duration("5m"), Some(300.0));
        assert_eq!(parse_go_duration("1h30m"), Some(5400.0));
        assert_eq!(parse_go_duration("0"), Some(0.0));
        assert_eq!(parse_go_duration("0s"), Some(0.0));
        assert_eq!(parse_go_duration("-1"), Some(-1.0));
        assert_eq!(parse_go_duration("abc"), None);
        assert!(keep_alive_zero(Some(&json!(0))));
        assert!(keep_alive_zero(Some(&json!("0s"))));
        assert!(!keep_alive_zero(Some(&json!("5m"))));
        assert!(!keep_alive_zero(None));
    }

    #[test]
    fn b64() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn embeddings_are_unit_and_deterministic() {
        let a = embedding("hello", 8);
        assert_eq!(a, embedding("hello", 8));
        assert_ne!(a, embedding("world", 8));
        let n: f32 = a.iter().map(|f| f * f).sum();
        assert!((n - 1.0).abs() < 1e-4);
    }

    #[test]
    fn bodies() {
        assert_eq!(parse_body(b"").unwrap_err(), "missing request body");
        assert!(
            parse_body(b"xyz")
                .unwrap_err()
                .starts_with("invalid character 'x'")
        );
        assert!(parse_body(b"{\"model\":").is_err());
        assert!(parse_body(b"[]").is_err());
        assert!(parse_body(b"{}").is_ok());
    }
}
