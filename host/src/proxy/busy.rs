//! `busy_check = "llama-server"` or `"metrics"`: the engine's own count of
//! busy slots, read before a request is sent to it.
//!
//! maitre counts a slot free once the upstream has let go of the connection
//! of a request it gave up on (`link`). An engine may close that connection
//! a little before it frees the slot (llama-server cancels the task, then
//! releases the slot on its next loop turn); a request sent in between
//! queues inside the engine, behind nothing maitre can see. With the check,
//! maitre reads `GET /slots` (llama-server's list of slots, each with
//! `is_processing`), or with `"metrics"` `GET /metrics` (Prometheus text:
//! llama-server's `llamacpp:requests_processing` with `--metrics`, vLLM's
//! `vllm:num_requests_running`, summed over its series), and waits until
//! fewer than the backend's slots are busy, polling every few ms, for at
//! most [`LET_GO_TIMEOUT`]. An engine whose count cannot be read (`/slots`
//! disabled with `--no-slots`, no such gauge, an error) is not waited for;
//! the dispatch goes ahead and the failure is logged.

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::time::Instant;

use super::Fetched;
use super::target::Target;
use crate::config::BusyCheck;
use crate::escape::Escaped;
use crate::scheduler::LET_GO_TIMEOUT;

/// Time between two reads of `/slots` while the engine is full.
const POLL: Duration = Duration::from_millis(2);
/// Longest wait for one `/slots` answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);

/// Busy slots in a `/slots` answer: entries with `is_processing` true (or,
/// from llama-server versions before that field, a `state` other than 0).
fn busy_slots(body: &[u8]) -> Option<u32> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let slots = v.as_array()?;
    Some(
        slots
            .iter()
            .filter(|s| {
                s.get("is_processing")
                    .and_then(Value::as_bool)
                    .or_else(|| s.get("state").and_then(Value::as_u64).map(|st| st != 0))
                    .unwrap_or(false)
            })
            .count() as u32,
    )
}

/// Reads the busy slots out of an engine's answer.
type Count = fn(&[u8]) -> Option<u32>;

/// The gauges of requests an engine is generating for, in its `/metrics`:
/// llama-server's, vLLM's.
const RUNNING: [&str; 2] = ["llamacpp:requests_processing", "vllm:num_requests_running"];

/// Busy slots in a Prometheus text answer: the sum of the [`RUNNING`]
/// samples (vLLM has one per model). `None` when there is none, or one
/// cannot be read.
fn busy_in_metrics(body: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(body).ok()?;
    let mut busy: Option<f64> = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(|c: char| c == '{' || c.is_ascii_whitespace())
            .unwrap_or(line.len());
        if !RUNNING.contains(&&line[..name_end]) {
            continue;
        }
        let rest = &line[name_end..];
        let rest = if rest.starts_with('{') {
            after_labels(rest)?
        } else {
            rest
        };
        let v: f64 = rest.split_ascii_whitespace().next()?.parse().ok()?;
        busy = Some(busy.unwrap_or(0.0) + v);
    }
    busy.filter(|v| v.is_finite())
        .map(|v| v.max(0.0).round() as u32)
}

/// What follows a sample's `{labels}` (`s` starts with its `{`); label
/// values are quoted and may hold `}` and escaped quotes.
fn after_labels(s: &str) -> Option<&str> {
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in s.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(&s[i + 1..]),
            _ => {}
        }
    }
    None
}

impl Target {
    /// Waits until the engine says one of its slots is free (see the
    /// module doc); returns at once without `busy_check`.
    pub(super) async fn engine_room(&self) {
        let Some(check) = self.busy_check else {
            return;
        };
        let (path, count): (&str, Count) = match check {
            BusyCheck::Slots => ("/slots", busy_slots),
            BusyCheck::Metrics => ("/metrics", busy_in_metrics),
        };
        let deadline = Instant::now() + LET_GO_TIMEOUT;
        loop {
            let busy = match self
                .fetch(http::Method::GET, path, Bytes::new(), ANSWER_WITHIN)
                .await
            {
                Fetched::Answer(s, _, body) if s.is_success() => count(&body),
                Fetched::Answer(s, _, _) => {
                    tracing::warn!(backend = %self.name, path, status = s.as_u16(), "busy_check: the engine's busy count could not be read; dispatching without the check");
                    return;
                }
                Fetched::Failed(e) => {
                    tracing::warn!(backend = %self.name, path, error = %Escaped(&e), "busy_check: the engine's busy count could not be read; dispatching without the check");
                    return;
                }
            };
            match busy {
                Some(n) if n < self.slots => return,
                Some(_) if Instant::now() < deadline => tokio::time::sleep(POLL).await,
                Some(n) => {
                    tracing::warn!(backend = %self.name, busy = n, slots = self.slots, "busy_check: the engine still reports every slot busy; dispatching anyway");
                    return;
                }
                None => {
                    tracing::warn!(backend = %self.name, path, "busy_check: no busy count in the engine's answer; dispatching without the check");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_slots_read_both_llama_server_shapes() {
        let now = br#"[{"id":0,"is_processing":true},{"id":1,"is_processing":false}]"#;
        assert_eq!(busy_slots(now), Some(1));
        let older = br#"[{"id":0,"state":1},{"id":1,"state":0},{"id":2,"state":1}]"#;
        assert_eq!(busy_slots(older), Some(2));
        assert_eq!(busy_slots(b"{\"error\":1}"), None);
        assert_eq!(busy_slots(b"[]"), Some(0));
    }

    #[test]
    fn busy_in_metrics_reads_llama_server_and_vllm() {
        let llama = b"# HELP llamacpp:requests_processing Number of requests processing.\n# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 2\nllamacpp:requests_deferred 5\n";
        assert_eq!(busy_in_metrics(llama), Some(2));
        // vLLM: one series per model, labels that may hold braces.
        let vllm = br#"vllm:num_requests_running{engine="0",model_name="a}b \"x\""} 3.0
vllm:num_requests_waiting{model_name="a"} 9.0
vllm:num_requests_running{model_name="c"} 1.0 1700000000000
"#;
        assert_eq!(busy_in_metrics(vllm), Some(4));
        assert_eq!(busy_in_metrics(b"other_gauge 1\n"), None);
        assert_eq!(
            busy_in_metrics(b"vllm:num_requests_running{x=\"1\" 2\n"),
            None
        );
        assert_eq!(busy_in_metrics(b"llamacpp:requests_processing NaN\n"), None);
    }
}
