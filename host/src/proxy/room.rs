//! Room in the queue, checked before a body is read.
//!
//! The scheduler's own check (`limits.max_waiting`) comes at submit, after
//! the body is in memory: a full queue would still read every body it then
//! refuses. This check comes first, counting the requests still being read
//! as if they waited already (they will, once read), against the waiting
//! count the scheduler last published. It is conservative and global (the
//! arm a request goes to may depend on its body, and `max_waiting` counts
//! all arms); the exact check stays at submit.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Requests past the room check whose body is being read.
#[derive(Default)]
pub(super) struct QueueRoom {
    reading: AtomicUsize,
}

/// A place taken by a request whose body is being read; freed when dropped
/// (once the request is submitted, or refused).
pub(super) struct Reading<'a> {
    room: &'a QueueRoom,
}

impl QueueRoom {
    /// Takes a place if `waiting` plus the requests being read leave room
    /// under `max_waiting`; `None` means the queue is full.
    pub(super) fn enter(&self, waiting: usize, max_waiting: usize) -> Option<Reading<'_>> {
        self.reading
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |reading| {
                (waiting.saturating_add(reading) < max_waiting).then_some(reading + 1)
            })
            .ok()
            .map(|_| Reading { room: self })
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.room.reading.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_being_read_count_as_waiting() {
        let room = QueueRoom::default();
        assert!(room.enter(0, 0).is_none(), "max_waiting = 0 admits none");
        assert!(room.enter(3, 3).is_none(), "full");
        let a = room.enter(1, 3).expect("room for two more");
        let b = room.enter(1, 3).expect("room for one more");
        assert!(room.enter(1, 3).is_none(), "two being read fill it");
        drop(a);
        let c = room.enter(1, 3).expect("a read ended");
        drop((b, c));
        assert_eq!(room.reading.load(Ordering::Acquire), 0);
    }
}
