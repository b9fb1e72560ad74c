//! The answer check: what in a policy's answer is nonsense, by typed kind.
//!
//! The scheduler refuses a nonsense `schedule` answer as a whole and ejects
//! the plugin on the first one (the way Linux's sched_ext ejects a BPF
//! scheduler on its first error): a plugin that lost track of the view
//! cannot be trusted with the next decision either. Other oddities (a
//! pre-emption the host declines, a rejection status outside 400–599, an
//! over-long message) are refused or fixed and counted, and the plugin stays.

use std::collections::{HashMap, HashSet};

use crate::policy::{Action, Rejection, Running, View};

/// Longest rejection message (bytes) passed on from a plugin to a client.
pub const MAX_REJECTION_MESSAGE: usize = 1024;

/// Most actions one `schedule` answer may hold beyond one per waiting and
/// running request.
pub const ACTION_SLACK: usize = 16;

/// A kind of invalid or refused plugin output, as counted in
/// `maitre_plugin_invalid_actions{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Invalid {
    /// More actions than one per waiting and running request plus [`ACTION_SLACK`].
    TooManyActions,
    /// A start or reject of an id not waiting in the view (or already
    /// started or rejected in this answer), a pre-emption of one not running.
    UnknownId,
    /// The same id started twice, or a running one started.
    DuplicateStart,
    /// The same id pre-empted twice.
    DuplicatePreempt,
    /// More starts than free slots plus the slots being freed.
    NoFreeSlot,
    /// A start on a backend index the view does not list.
    UnknownBackend,
    /// `admit` answered a NaN priority.
    BadPriority,
    /// A rejection status outside 400–599 (answered as 503; not nonsense).
    BadStatus,
    /// A rejection message over [`MAX_REJECTION_MESSAGE`] bytes (cut; not nonsense).
    LongMessage,
    /// A pre-emption of a streaming request without `cut_streaming` (declined).
    PreemptStreaming,
    /// A pre-emption past `limits.max_preemptions` (declined).
    PreemptBound,
    /// A pre-emption of a request already being pre-empted (declined).
    NotPreemptible,
}

impl Invalid {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Invalid::TooManyActions => "too_many_actions",
            Invalid::UnknownId => "unknown_id",
            Invalid::DuplicateStart => "duplicate_start",
            Invalid::DuplicatePreempt => "duplicate_preempt",
            Invalid::NoFreeSlot => "no_free_slot",
            Invalid::UnknownBackend => "unknown_backend",
            Invalid::BadPriority => "bad_priority",
            Invalid::BadStatus => "bad_status",
            Invalid::LongMessage => "long_message",
            Invalid::PreemptStreaming => "preempt_streaming",
            Invalid::PreemptBound => "preempt_bound",
            Invalid::NotPreemptible => "not_preemptible",
        }
    }
}

/// Finds the nonsense in a plugin's `schedule` answer for the `view` it was
/// shown; `inflight` counts slots still being freed by earlier pre-emptions
/// and not yet promised to a handoff. Empty means the answer may be applied.
pub fn check_answer(view: &View, actions: &[Action], inflight: i64) -> Vec<(Invalid, String)> {
    let cap = view.waiting.len() + view.running.len() + ACTION_SLACK;
    if actions.len() > cap {
        return vec![(
            Invalid::TooManyActions,
            format!(
                "{} actions for {} waiting and {} running requests (at most {cap})",
                actions.len(),
                view.waiting.len(),
                view.running.len()
            ),
        )];
    }
    let waiting: HashSet<u64> = view.waiting.iter().map(|w| w.id).collect();
    let running: HashMap<u64, &Running> = view.running.iter().map(|r| (r.id, r)).collect();
    let mut started = HashSet::new();
    let mut rejected = HashSet::new();
    let mut preempted = HashSet::new();
    let mut slots = view.free_slots as i64 + inflight.max(0);
    let mut bad = Vec::new();
    for action in actions {
        match action {
            Action::Start { id, backend } => {
                if started.contains(id) || running.contains_key(id) {
                    bad.push((
                        Invalid::DuplicateStart,
                        format!("start of request {id}, which was already started"),
                    ));
                } else if !waiting.contains(id) || rejected.contains(id) {
                    bad.push((
                        Invalid::UnknownId,
                        format!("start of request {id}, which is not waiting in this arm"),
                    ));
                } else if let Some(b) = backend.filter(|&b| b as usize >= view.backends.len()) {
                    bad.push((
                        Invalid::UnknownBackend,
                        format!(
                            "start of request {id} on backend {b} of {}",
                            view.backends.len()
                        ),
                    ));
                } else if slots <= 0 {
                    started.insert(*id);
                    bad.push((
                        Invalid::NoFreeSlot,
                        format!(
                            "start of request {id} beyond the {} free slot(s)",
                            view.free_slots
                        ),
                    ));
                } else {
                    started.insert(*id);
                    slots -= 1;
                }
            }
            Action::Preempt { id, cut_streaming } => match running.get(id) {
                None => bad.push((
                    Invalid::UnknownId,
                    format!("pre-emption of request {id}, which is not running in this arm"),
                )),
                Some(_) if !preempted.insert(*id) => bad.push((
                    Invalid::DuplicatePreempt,
                    format!("pre-emption of request {id} twice"),
                )),
                Some(r) => {
                    if r.preemptible || (r.streaming && *cut_streaming) {
                        slots += 1;
                    }
                }
            },
            Action::Reject { id, .. } => {
                if !waiting.contains(id) || started.contains(id) || !rejected.insert(*id) {
                    bad.push((
                        Invalid::UnknownId,
                        format!("reject of request {id}, which is not waiting in this arm"),
                    ));
                }
            }
        }
    }
    bad
}

/// One line for logs and `/status`: how many actions were nonsense, of which
/// kinds, and the first one in words.
pub fn summarize_invalid(bad: &[(Invalid, String)], total: usize) -> String {
    let mut kinds: Vec<(Invalid, usize)> = Vec::new();
    for (k, _) in bad {
        match kinds.iter_mut().find(|(n, _)| n == k) {
            Some((_, c)) => *c += 1,
            None => kinds.push((*k, 1)),
        }
    }
    let first = bad.first().map(|(_, d)| d.as_str()).unwrap_or("");
    if let [(Invalid::TooManyActions, _)] = bad {
        return format!("too_many_actions: {first}");
    }
    let kinds: Vec<String> = kinds
        .iter()
        .map(|(k, c)| format!("{} ×{c}", k.as_str()))
        .collect();
    format!(
        "{} of {total} actions invalid: {} (first: {first})",
        bad.len(),
        kinds.join(", ")
    )
}

/// Makes a plugin's rejection fit to send: a status outside 400–599 becomes
/// 503 (the WIT's rule) and a message longer than [`MAX_REJECTION_MESSAGE`]
/// bytes is cut, so a plugin cannot make the host hold megabytes per refused
/// request. Returns what was fixed, for counting.
pub fn tidy_rejection(r: &mut Rejection) -> Vec<Invalid> {
    let mut fixed = Vec::new();
    if !(400..=599).contains(&r.status) {
        fixed.push(Invalid::BadStatus);
        r.status = 503;
    }
    if r.message.len() > MAX_REJECTION_MESSAGE {
        fixed.push(Invalid::LongMessage);
        let mut end = MAX_REJECTION_MESSAGE;
        while !r.message.is_char_boundary(end) {
            end -= 1;
        }
        r.message.truncate(end);
        r.message.shrink_to_fit();
    }
    fixed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Backend, Class, Waiting};

    /// A view with `free` free slots, waiting ids `waiting` and running
    /// `(id, preemptible, streaming)`.
    fn answer_view(free: u32, waiting: &[u64], running: &[(u64, bool, bool)]) -> View {
        View {
            now_ms: 0,
            total_slots: 2,
            free_slots: free,
            backends: vec![Backend::new("up".into(), 2, free)],
            running: running
                .iter()
                .map(|&(id, preemptible, streaming)| Running {
                    id,
                    class: Class::Batch,
                    priority: 0.0,
                    model: "".into(),
                    tenant: None,
                    backend: 0,
                    num_predict: None,
                    arrival_ms: 0,
                    started_ms: 0,
                    first_token_ms: None,
                    tokens: 0,
                    preemptible,
                    streaming,
                    preemptions: 0,
                })
                .collect(),
            waiting: waiting
                .iter()
                .map(|&id| Waiting {
                    id,
                    class: Class::Batch,
                    priority: 0.0,
                    model: "".into(),
                    tenant: None,
                    stream: false,
                    num_predict: None,
                    arrival_ms: 0,
                    enqueued_ms: 0,
                    preemptions: 0,
                })
                .collect(),
            beyond: Vec::new(),
        }
    }

    fn start(id: u64) -> Action {
        Action::Start { id, backend: None }
    }

    fn preempt(id: u64, cut_streaming: bool) -> Action {
        Action::Preempt { id, cut_streaming }
    }

    fn reject(id: u64, status: u16) -> Action {
        Action::Reject {
            id,
            rejection: Rejection {
                status,
                message: String::new(),
            },
        }
    }

    fn kinds(view: &View, actions: &[Action], inflight: i64) -> Vec<Invalid> {
        check_answer(view, actions, inflight)
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    #[test]
    fn sane_answers_pass_the_check() {
        let v = answer_view(1, &[3, 4, 5], &[(1, true, false), (2, false, true)]);
        assert!(kinds(&v, &[], 0).is_empty());
        assert!(kinds(&v, &[start(3)], 0).is_empty());
        // A pre-emption frees a slot for a start in the same answer...
        assert!(kinds(&v, &[start(3), preempt(1, false), start(4)], 0).is_empty());
        // ...so does cutting a stream when asked to.
        assert!(kinds(&v, &[start(3), preempt(2, true), start(4)], 0).is_empty());
        // A slot still being handed on by an earlier pre-emption counts too.
        assert!(kinds(&v, &[start(3), start(4)], 1).is_empty());
        // Rejections of waiting requests, whatever the status (the WIT maps it).
        assert!(kinds(&v, &[reject(4, 429), reject(5, 0), start(3)], 0).is_empty());
        // A pre-emption the host will decline is refused later, not nonsense.
        assert!(kinds(&v, &[preempt(2, false)], 0).is_empty());
    }

    #[test]
    fn nonsense_is_found_by_kind() {
        use Invalid::*;
        let v = answer_view(1, &[3, 4], &[(1, true, false)]);
        assert_eq!(kinds(&v, &[start(99)], 0), [UnknownId]);
        assert_eq!(kinds(&v, &[preempt(3, false)], 0), [UnknownId]);
        assert_eq!(kinds(&v, &[reject(1, 503)], 0), [UnknownId]);
        assert_eq!(kinds(&v, &[reject(3, 503), start(3)], 0), [UnknownId]);
        assert_eq!(kinds(&v, &[start(3), reject(3, 503)], 0), [UnknownId]);
        assert_eq!(kinds(&v, &[start(1)], 0), [DuplicateStart]);
        assert_eq!(kinds(&v, &[start(3), start(3)], 0), [DuplicateStart]);
        assert_eq!(kinds(&v, &[start(3), start(4)], 0), [NoFreeSlot]);
        // A pre-emption the host declines frees no slot.
        let streaming = answer_view(0, &[3], &[(1, false, true)]);
        assert_eq!(
            kinds(&streaming, &[preempt(1, false), start(3)], 0),
            [NoFreeSlot]
        );
        assert_eq!(
            kinds(&v, &[preempt(1, false), preempt(1, false)], 0),
            [DuplicatePreempt]
        );
        let on_backend_7 = Action::Start {
            id: 3,
            backend: Some(7),
        };
        assert_eq!(kinds(&v, &[on_backend_7], 0), [UnknownBackend]);
        let flood = vec![start(3); 2 + 1 + ACTION_SLACK + 1];
        assert_eq!(kinds(&v, &flood, 0), [TooManyActions]);
    }

    #[test]
    fn invalid_summary_names_kinds_and_the_first_one() {
        let bad = vec![
            (Invalid::UnknownId, "start of request 9".to_string()),
            (
                Invalid::DuplicateStart,
                "start of request 3 twice".to_string(),
            ),
            (Invalid::UnknownId, "start of request 8".to_string()),
        ];
        assert_eq!(
            summarize_invalid(&bad, 5),
            "3 of 5 actions invalid: unknown_id ×2, duplicate_start ×1 (first: start of request 9)"
        );
    }

    #[test]
    fn rejections_are_tidied_and_the_fixes_named() {
        let mut r = Rejection {
            status: 200,
            message: "é".repeat(MAX_REJECTION_MESSAGE),
        };
        assert_eq!(
            tidy_rejection(&mut r),
            [Invalid::BadStatus, Invalid::LongMessage]
        );
        assert_eq!(r.status, 503);
        assert!(r.message.len() <= MAX_REJECTION_MESSAGE);
        let mut ok = Rejection {
            status: 429,
            message: "later".into(),
        };
        assert!(tidy_rejection(&mut ok).is_empty());
        assert_eq!(ok.status, 429);
    }
}
