//! Memory against speed as the queue grows.
//!
//! Every open connection holds hyper's read and write buffers. The allocator
//! (jemalloc, set by the `maitre` binary) keeps freed pages for reuse a
//! while: fast, since a page handed out again costs nothing, but a waiting
//! request's fresh buffers then land on pages that earlier requests touched,
//! so each waiting request keeps a few KiB resident that it never uses.
//! Returning freed pages at once avoids that, but every return costs a
//! system call and a TLB flush on the other cores, and every reuse a page
//! fault: about a third of maitre's request rate when requests flow fast.
//!
//! The two matter at different times. While few requests wait, maitre's own
//! speed can be what limits throughput, and memory is small anyway. Once
//! hundreds wait, the upstream is what they wait for, and memory per waiting
//! request is what grows. So maitre switches: when [`CROWDED_AT`] requests
//! wait, the allocator returns freed pages at once; when the queue is back
//! to [`RELAXED_AT`], it keeps them again. The gap between the two keeps a
//! queue that hovers near one mark from switching back and forth.
//!
//! This module only decides when; what a switch does is the binary's
//! ([`on_crowding`]), so the library works under any allocator.

use std::sync::OnceLock;

/// Waiting requests (all arms) from which freed memory is returned at once.
pub const CROWDED_AT: usize = 512;
/// Waiting requests at or below which freed memory is kept for reuse again.
pub const RELAXED_AT: usize = 128;

static HOOK: OnceLock<fn(bool)> = OnceLock::new();

/// Sets what to do when the queue becomes crowded (`true`) or relaxed again
/// (`false`); the first call wins. Without one, crossings change nothing.
pub fn on_crowding(f: fn(bool)) {
    let _ = HOOK.set(f);
}

/// Follows the waiting count and calls the hook on each crossing.
#[derive(Debug)]
pub(crate) struct Crowding {
    crowded: bool,
    hook: Option<fn(bool)>,
}

impl Default for Crowding {
    fn default() -> Self {
        Crowding::with_hook(HOOK.get().copied())
    }
}

impl Crowding {
    pub(crate) fn with_hook(hook: Option<fn(bool)>) -> Self {
        Crowding {
            crowded: false,
            hook,
        }
    }

    /// Takes the current number of waiting requests.
    pub(crate) fn update(&mut self, waiting: usize) {
        let crowded = if self.crowded {
            waiting > RELAXED_AT
        } else {
            waiting >= CROWDED_AT
        };
        if crowded == self.crowded {
            return;
        }
        self.crowded = crowded;
        tracing::debug!(
            waiting,
            crowded,
            "queue crowding changed: freed memory is {}",
            if crowded {
                "returned at once"
            } else {
                "kept for reuse"
            }
        );
        if let Some(f) = self.hook {
            f(crowded);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    static CALLS: Mutex<Vec<bool>> = Mutex::new(Vec::new());

    fn record(crowded: bool) {
        CALLS.lock().unwrap().push(crowded);
    }

    #[test]
    fn switches_once_per_crossing_with_a_gap_between_the_marks() {
        let mut c = Crowding::with_hook(Some(record));
        for n in [0, 100, CROWDED_AT - 1, CROWDED_AT, CROWDED_AT + 500, 300] {
            c.update(n);
        }
        // Hovering between the marks changes nothing.
        for n in [RELAXED_AT + 1, CROWDED_AT - 1, RELAXED_AT + 1] {
            c.update(n);
        }
        c.update(RELAXED_AT);
        c.update(0);
        c.update(CROWDED_AT - 1);
        c.update(10_000);
        assert_eq!(*CALLS.lock().unwrap(), [true, false, true]);
    }
}
