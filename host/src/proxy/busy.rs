//! `busy_check = "llama-server"`: the engine's own count of busy slots,
//! read before a request is sent to it.
//!
//! maitre counts a slot free once the upstream has let go of the connection
//! of a request it gave up on (`link`). An engine may close that connection
//! a little before it frees the slot (llama-server cancels the task, then
//! releases the slot on its next loop turn); a request sent in between
//! queues inside the engine, behind nothing maitre can see. With the check,
//! maitre reads `GET /slots` (llama-server's list of slots, each with
//! `is_processing`) and waits until fewer than the backend's slots are busy,
//! polling every few ms, for at most [`LET_GO_TIMEOUT`]. An engine whose
//! `/slots` cannot be read (disabled with `--no-slots`, an error) is not
//! waited for; the dispatch goes ahead and the failure is logged.

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::time::Instant;

use super::Fetched;
use super::target::Target;
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

impl Target {
    /// Waits until the engine says one of its slots is free (see the
    /// module doc); returns at once without `busy_check`.
    pub(super) async fn engine_room(&self) {
        if !self.busy_check {
            return;
        }
        let deadline = Instant::now() + LET_GO_TIMEOUT;
        loop {
            let busy = match self
                .fetch(http::Method::GET, "/slots", Bytes::new(), ANSWER_WITHIN)
                .await
            {
                Fetched::Answer(s, _, body) if s.is_success() => busy_slots(&body),
                Fetched::Answer(s, _, _) => {
                    tracing::warn!(backend = %self.name, status = s.as_u16(), "busy_check: GET /slots failed; dispatching without the check");
                    return;
                }
                Fetched::Failed(e) => {
                    tracing::warn!(backend = %self.name, error = %Escaped(&e), "busy_check: GET /slots failed; dispatching without the check");
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
                    tracing::warn!(backend = %self.name, "busy_check: /slots is not a list of slots; dispatching without the check");
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
}
