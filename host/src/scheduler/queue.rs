//! An arm's waiting requests, indexed so a bounded candidate window costs
//! the window's size, not the queue's.
//!
//! Interface 0.2.0 shows a plugin a window of the queue: per class the
//! oldest and the highest-priority waiting requests. With 10,000 waiting,
//! copying them all into the sandbox on every call (0.1.0) limits a host to
//! a few hundred decisions a second; the window keeps a call's cost flat.
//! Admission priority never changes while a request waits, so both orders
//! are kept as sorted sets and updated on insert and remove.

use std::cmp::{Ordering, Reverse};
use std::collections::BTreeSet;

use rustc_hash::{FxHashMap, FxHashSet};

use crate::policy::Class;

/// A priority ordered by `total_cmp` (admission priorities are finite).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Priority(f64);

impl Eq for Priority {}
impl PartialOrd for Priority {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Priority {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

fn slot(c: Class) -> usize {
    match c {
        Class::Realtime => 0,
        Class::Batch => 1,
    }
}

/// The waiting requests of one arm (public for the `plugin_decision` bench,
/// which builds views exactly as the scheduler does).
#[derive(Debug, Default)]
pub struct Queue {
    /// Class and priority of every waiting request.
    meta: FxHashMap<u64, (Class, f64)>,
    /// Every id, in arrival order (ids are given in arrival order).
    all: BTreeSet<u64>,
    /// Per class, ids in arrival order.
    by_arrival: [BTreeSet<u64>; 2],
    /// Per class, highest priority first, then oldest.
    by_priority: [BTreeSet<(Reverse<Priority>, u64)>; 2],
}

impl Queue {
    /// Adds a waiting request (or moves it, if it was here already).
    pub fn insert(&mut self, id: u64, class: Class, priority: f64) {
        if let Some((c, p)) = self.meta.insert(id, (class, priority)) {
            self.unindex(id, c, p);
        }
        self.all.insert(id);
        self.by_arrival[slot(class)].insert(id);
        self.by_priority[slot(class)].insert((Reverse(Priority(priority)), id));
    }

    /// Removes `id`; false when it was not waiting here.
    pub fn remove(&mut self, id: &u64) -> bool {
        match self.meta.remove(id) {
            Some((c, p)) => {
                self.unindex(*id, c, p);
                true
            }
            None => false,
        }
    }

    fn unindex(&mut self, id: u64, c: Class, p: f64) {
        self.all.remove(&id);
        self.by_arrival[slot(c)].remove(&id);
        self.by_priority[slot(c)].remove(&(Reverse(Priority(p)), id));
    }

    /// Moves every request of `other` here.
    pub fn append(&mut self, other: &mut Queue) {
        for (id, (c, p)) in std::mem::take(&mut other.meta) {
            self.insert(id, c, p);
        }
        *other = Queue::default();
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.all.len()
    }

    /// No request waits.
    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// Every id, oldest arrival first.
    pub fn iter(&self) -> impl Iterator<Item = &u64> {
        self.all.iter()
    }

    /// Waiting requests of `class`.
    pub fn count(&self, class: Class) -> usize {
        self.by_arrival[slot(class)].len()
    }

    /// The candidate window of at most `size` ids, in arrival order: each
    /// class gets half (a class with fewer requests leaves the rest to the
    /// other), split between its oldest and its highest-priority requests.
    pub fn window(&self, size: usize) -> Vec<u64> {
        if self.len() <= size {
            return self.all.iter().copied().collect();
        }
        if size == 0 {
            return Vec::new();
        }
        let (rt, be) = (self.count(Class::Realtime), self.count(Class::Batch));
        // Real-time gets the larger half of an odd size.
        let rt_share = rt.min(size.div_ceil(2).max(size.saturating_sub(be)));
        let be_share = be.min(size - rt_share);
        // Membership in a hash set, the order (ids are given in arrival
        // order) by one sort at the end: cheaper than a tree of the ids.
        let mut seen = FxHashSet::with_capacity_and_hasher(size, Default::default());
        let mut picked = Vec::with_capacity(size);
        for (class, share) in [(Class::Realtime, rt_share), (Class::Batch, be_share)] {
            let s = slot(class);
            let before = picked.len();
            let oldest = share.div_ceil(2);
            // The oldest, then the highest priorities until the class's
            // share is full; requests both oldest and highest leave room:
            // fill it by age.
            let candidates = (self.by_arrival[s].iter().take(oldest))
                .chain(self.by_priority[s].iter().map(|(_, id)| id))
                .chain(self.by_arrival[s].iter().skip(oldest));
            for &id in candidates {
                if picked.len() - before >= share {
                    break;
                }
                if seen.insert(id) {
                    picked.push(id);
                }
            }
        }
        picked.sort_unstable();
        picked
    }

    /// Of `class`, the oldest id and the highest priority not in `window`
    /// (ids in ascending order, as [`Queue::window`] gives them). Walks past
    /// at most the window's members.
    pub fn beyond(&self, class: Class, window: &[u64]) -> (Option<u64>, Option<f64>) {
        debug_assert!(window.is_sorted(), "a window lists its ids in order");
        let shown = |id: &u64| window.binary_search(id).is_ok();
        let s = slot(class);
        let oldest = self.by_arrival[s].iter().find(|id| !shown(id));
        let highest = self.by_priority[s]
            .iter()
            .find(|(_, id)| !shown(id))
            .map(|(Reverse(p), _)| p.0);
        (oldest.copied(), highest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(items: &[(u64, Class, f64)]) -> Queue {
        let mut q = Queue::default();
        for &(id, c, p) in items {
            q.insert(id, c, p);
        }
        q
    }

    #[test]
    fn a_small_queue_is_its_own_window() {
        let q = queue(&[(1, Class::Batch, 0.0), (2, Class::Realtime, 1.0)]);
        assert_eq!(q.window(8), vec![1, 2]);
    }

    #[test]
    fn the_window_holds_the_oldest_and_the_highest_of_each_class() {
        // 100 batch requests; 90..=99 were given a high priority. 10
        // real-time ones arrive last.
        let mut items: Vec<(u64, Class, f64)> = (1..=100)
            .map(|id| (id, Class::Batch, if id >= 90 { 5.0 } else { 0.0 }))
            .collect();
        items.extend((101..=110).map(|id| (id, Class::Realtime, 1.0)));
        let q = queue(&items);
        let w = q.window(16);
        assert_eq!(w.len(), 16);
        // Real-time: its half (8) split between the oldest 4 and the
        // highest 4 (all priority 1.0: then the oldest).
        let rt: Vec<u64> = w.iter().copied().filter(|id| *id > 100).collect();
        assert_eq!(rt, (101..=108).collect::<Vec<_>>());
        // Batch: the 4 oldest and the 4 highest (90..=93).
        let be: Vec<u64> = w.iter().copied().filter(|id| *id <= 100).collect();
        assert_eq!(be, vec![1, 2, 3, 4, 90, 91, 92, 93]);
        assert_eq!(q.beyond(Class::Batch, &w), (Some(5), Some(5.0)));
        assert_eq!(q.beyond(Class::Realtime, &w), (Some(109), Some(1.0)));
    }

    #[test]
    fn a_class_with_few_requests_leaves_its_share_to_the_other() {
        let mut items: Vec<(u64, Class, f64)> =
            (1..=50).map(|id| (id, Class::Batch, 0.0)).collect();
        items.push((51, Class::Realtime, 1.0));
        let w = queue(&items).window(10);
        assert_eq!(w, vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 51]);
    }

    #[test]
    fn remove_and_append_keep_every_index_in_step() {
        let mut a = queue(&[(1, Class::Batch, 0.0), (2, Class::Realtime, 1.0)]);
        let mut b = queue(&[(3, Class::Batch, 2.0)]);
        assert!(a.remove(&1) && !a.remove(&1));
        a.append(&mut b);
        assert!(b.is_empty());
        assert_eq!(a.iter().copied().collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!((a.count(Class::Batch), a.count(Class::Realtime)), (1, 1));
        assert_eq!(a.window(1), vec![2]);
    }
}
