//! The event log, bounded: it keeps the last `capacity` events and forgets
//! older ones, so a long run (a load test, `maitre serve --demo`) does not
//! grow without end. Capacity 0 switches it off: nothing is built or kept.
//! Sequence numbers count every event, kept or not, so `seq` stays gap-free
//! over the whole run and a reader can tell that events were forgotten.

use crate::state::LogEvent;

/// Events kept in the log by default: plenty for a test or a bench run,
/// some 25 MB at most (measured under wrk).
pub const DEFAULT_LOG_CAPACITY: usize = 65_536;

/// The last `capacity` events, in `seq` order.
///
/// Stored in a `Vec` that may run up to a quarter over capacity before its
/// oldest events are dropped in one go, so that pushing is amortised O(1)
/// and [`EventLog::events`] is always one contiguous slice of exactly the
/// last `capacity` events.
pub(crate) struct EventLog {
    buf: Vec<LogEvent>,
    capacity: usize,
    next_seq: u64,
}

impl EventLog {
    pub fn new(capacity: usize) -> Self {
        EventLog {
            buf: Vec::with_capacity(capacity.min(1024)),
            capacity,
            next_seq: 1,
        }
    }

    /// Records one event: `make` gets its `seq` and is only called when
    /// the log is on.
    pub fn push(&mut self, make: impl FnOnce(u64) -> LogEvent) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.capacity == 0 {
            return;
        }
        if self.buf.len() >= self.capacity + self.capacity / 4 + 16 {
            let excess = self.buf.len() - self.capacity;
            self.buf.drain(..excess);
        }
        self.buf.push(make(seq));
    }

    /// The last `capacity` events (fewer when fewer happened).
    pub fn events(&self) -> &[LogEvent] {
        &self.buf[self.buf.len().saturating_sub(self.capacity)..]
    }

    /// Forgets every event; `seq` keeps counting.
    pub fn clear(&mut self) {
        self.buf.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::EventKind;

    fn event(seq: u64) -> LogEvent {
        LogEvent {
            seq,
            at: Duration::ZERO,
            kind: EventKind::Received,
            req: seq,
            path: "/api/generate".into(),
            model: "fake".into(),
            tag: None,
            priority: None,
            body_priority: None,
            stream: false,
            tokens: 0,
        }
    }

    fn seqs(log: &EventLog) -> Vec<u64> {
        log.events().iter().map(|e| e.seq).collect()
    }

    #[test]
    fn keeps_the_last_capacity_events_with_seq_counting_on() {
        let mut log = EventLog::new(10);
        for _ in 0..1000 {
            log.push(event);
            assert!(log.events().len() <= 10);
            assert!(log.buf.len() <= 10 + 10 / 4 + 16);
        }
        assert_eq!(seqs(&log), (991..=1000).collect::<Vec<_>>());
    }

    #[test]
    fn under_capacity_keeps_everything() {
        let mut log = EventLog::new(100);
        for _ in 0..5 {
            log.push(event);
        }
        assert_eq!(seqs(&log), [1, 2, 3, 4, 5]);
    }

    #[test]
    fn capacity_zero_builds_and_keeps_nothing() {
        let mut log = EventLog::new(0);
        for _ in 0..100 {
            log.push(|_| unreachable!("the log is off"));
        }
        assert!(log.events().is_empty());
        assert_eq!(log.next_seq, 101);
    }

    #[test]
    fn clear_keeps_counting() {
        let mut log = EventLog::new(4);
        log.push(event);
        log.push(event);
        log.clear();
        log.push(event);
        assert_eq!(seqs(&log), [3]);
    }
}
