//! Ollama's generation slots as a pure data structure: a fixed number of
//! slots (`OLLAMA_NUM_PARALLEL`) and a FIFO queue of waiters in front of
//! them. A freed slot goes straight to the head of the queue, so no later
//! arrival can overtake a waiter.
//!
//! It holds no clock and no channel: the server keeps it under its lock with
//! a wake-up sender per waiter, and a simulator can drive it with request
//! ids in virtual time.

use std::collections::VecDeque;

/// Slots plus the FIFO queue of requests waiting for one.
#[derive(Debug)]
pub struct SlotQueue<W> {
    slots: usize,
    active: usize,
    max_active: usize,
    max_in_flight: usize,
    queue: VecDeque<W>,
}

impl<W> SlotQueue<W> {
    /// `slots` free slots and nobody waiting.
    pub fn new(slots: usize) -> Self {
        SlotQueue {
            slots,
            active: 0,
            max_active: 0,
            max_in_flight: 0,
            queue: VecDeque::new(),
        }
    }

    /// A request asks for a slot. Returns `true` when it holds one now (a
    /// slot was free and nobody was waiting; `w` is dropped); otherwise `w`
    /// joins the back of the queue and is handed a slot by a later
    /// [`SlotQueue::release`].
    pub fn request(&mut self, w: W) -> bool {
        let granted = if self.active < self.slots && self.queue.is_empty() {
            self.grant();
            true
        } else {
            self.queue.push_back(w);
            false
        };
        self.max_in_flight = self.max_in_flight.max(self.in_flight());
        granted
    }

    /// A holder gives its slot back. Returns the waiter that holds it now,
    /// if anyone was waiting.
    pub fn release(&mut self) -> Option<W> {
        debug_assert!(self.active > 0, "release without a held slot");
        self.active = self.active.saturating_sub(1);
        let next = self.queue.pop_front()?;
        self.grant();
        Some(next)
    }

    /// A waiter gives up its place. Returns `false` when no queued waiter
    /// matches: it was granted a slot meanwhile and must
    /// [`release`](SlotQueue::release) it instead.
    pub fn leave(&mut self, is_it: impl FnMut(&W) -> bool) -> bool {
        match self.queue.iter().position(is_it) {
            Some(i) => {
                self.queue.remove(i);
                true
            }
            None => false,
        }
    }

    fn grant(&mut self) {
        self.active += 1;
        self.max_active = self.max_active.max(self.active);
    }

    /// Configured number of slots.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Slots held now.
    pub fn active(&self) -> usize {
        self.active
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.queue.len()
    }

    /// The most slots held at once since the start or the last
    /// [`SlotQueue::reset_max`].
    pub fn max_active(&self) -> usize {
        self.max_active
    }

    /// Generations in flight: holding a slot or queued for one. A proxy
    /// that never sends more than `slots` at once keeps this at or under
    /// `slots`; a generation its client left but that goes on (see
    /// `ModelConfig::ignore_disconnect_non_streaming`) still counts.
    pub fn in_flight(&self) -> usize {
        self.active + self.queue.len()
    }

    /// The highest [`SlotQueue::in_flight`] since the start or the last
    /// [`SlotQueue::reset_max`].
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// Starts `max_active` and `max_in_flight` again from what is held and
    /// queued now.
    pub fn reset_max(&mut self) {
        self.max_active = self.active;
        self.max_in_flight = self.in_flight();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_at_once_while_slots_are_free_then_queues() {
        let mut q = SlotQueue::new(2);
        assert!(q.request(1));
        assert!(q.request(2));
        assert!(!q.request(3));
        assert!(!q.request(4));
        assert_eq!((q.active(), q.waiting(), q.max_active()), (2, 2, 2));
        assert_eq!((q.in_flight(), q.max_in_flight()), (4, 4));
    }

    #[test]
    fn a_freed_slot_goes_to_the_head_of_the_queue() {
        let mut q = SlotQueue::new(1);
        assert!(q.request(1));
        assert!(!q.request(2));
        assert!(!q.request(3));
        assert_eq!(q.release(), Some(2));
        assert_eq!(q.active(), 1);
        assert_eq!(q.release(), Some(3));
        assert_eq!(q.release(), None);
        assert_eq!((q.active(), q.waiting()), (0, 0));
        assert!(q.request(4));
    }

    #[test]
    fn nobody_overtakes_a_waiter() {
        let mut q = SlotQueue::new(1);
        assert!(q.request(1));
        assert!(!q.request(2));
        // A slot is never free while someone waits: 3 must queue behind 2.
        assert!(!q.request(3));
        assert_eq!(q.release(), Some(2));
    }

    #[test]
    fn leaving_the_queue_keeps_the_others_in_order() {
        let mut q = SlotQueue::new(1);
        assert!(q.request(1));
        for w in 2..=4 {
            assert!(!q.request(w));
        }
        assert!(q.leave(|w| *w == 3));
        assert!(!q.leave(|w| *w == 3));
        assert_eq!(q.release(), Some(2));
        assert_eq!(q.release(), Some(4));
        // 4 holds the slot now, so it is no longer in the queue to leave.
        assert!(!q.leave(|w| *w == 4));
    }

    #[test]
    fn max_active_resets_to_the_current_holders() {
        let mut q = SlotQueue::new(3);
        for w in 0..3 {
            assert!(q.request(w));
        }
        assert_eq!(q.release(), None);
        assert_eq!(q.release(), None);
        assert_eq!(q.max_active(), 3);
        assert_eq!(q.max_in_flight(), 3);
        q.reset_max();
        assert_eq!(q.max_active(), 1);
        assert_eq!(q.max_in_flight(), 1);
        assert_eq!(q.slots(), 3);
    }

    #[test]
    fn zero_slots_queue_everyone() {
        let mut q = SlotQueue::new(0);
        assert!(!q.request(1));
        assert_eq!(q.waiting(), 1);
    }
}
