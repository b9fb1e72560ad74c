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

use rustc_hash::FxHashMap;

use crate::policy::{Beyond, Class};

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
    /// With it, per class, what lies outside it.
    ///
    /// One walk does both. A class's oldest requests are a prefix of its
    /// arrival order, so an id at or below the prefix's last is in it (no
    /// set of ids to build); the priority order resumes where the window
    /// stopped for the highest priority outside, and the arrival order after
    /// the prefix, merged with the priority picks, for the oldest outside.
    pub fn window(&self, size: usize) -> Window {
        if self.len() <= size {
            return Window {
                ids: self.all.iter().copied().collect(),
                outside: Default::default(),
            };
        }
        let (rt, be) = (self.count(Class::Realtime), self.count(Class::Batch));
        // Real-time gets the larger half of an odd size.
        let rt_share = rt.min(size.div_ceil(2).max(size.saturating_sub(be)));
        let be_share = be.min(size - rt_share);
        let mut ids = Vec::with_capacity(size);
        let mut outside = [Outside::default(); 2];
        for (class, share) in [(Class::Realtime, rt_share), (Class::Batch, be_share)] {
            let s = slot(class);
            let mut by_arrival = self.by_arrival[s].iter().copied();
            let before = ids.len();
            ids.extend(by_arrival.by_ref().take(share.div_ceil(2)));
            let prefix_end = ids[before..].last().copied();
            let in_prefix = |id: u64| prefix_end.is_some_and(|end| id <= end);
            let mut by_priority = self.by_priority[s]
                .iter()
                .filter(|(_, id)| !in_prefix(*id))
                .map(|(Reverse(p), id)| (p.0, *id));
            let mut high: Vec<u64> = (by_priority.by_ref())
                .take(share - (ids.len() - before))
                .map(|(_, id)| id)
                .collect();
            ids.extend_from_slice(&high);
            high.sort_unstable();
            let mut shown = high.iter().copied().peekable();
            outside[s] = Outside {
                count: self.count(class) - share,
                oldest: by_arrival.find(|&id| {
                    while shown.next_if(|&h| h < id).is_some() {}
                    shown.peek() != Some(&id)
                }),
                highest_priority: by_priority.next().map(|(p, _)| p),
            };
        }
        ids.sort_unstable();
        Window { ids, outside }
    }
}

/// A candidate window ([`Queue::window`]).
#[derive(Debug, Default, PartialEq)]
pub struct Window {
    /// Its ids, in arrival order.
    pub ids: Vec<u64>,
    /// Per class (real-time, batch), the requests outside it.
    pub outside: [Outside; 2],
}

impl Window {
    /// What lies outside the window of `class`.
    pub fn outside(&self, class: Class) -> Outside {
        self.outside[slot(class)]
    }

    /// `view.beyond`: each class with requests outside the window, their
    /// count, the arrival of the oldest (`arrival_ms` of its id) and their
    /// highest priority.
    pub fn beyond(&self, arrival_ms: impl Fn(u64) -> Option<u64>) -> Vec<Beyond> {
        [Class::Realtime, Class::Batch]
            .into_iter()
            .map(|class| (class, self.outside(class)))
            .filter(|(_, o)| o.count > 0)
            .map(|(class, o)| Beyond {
                class,
                count: o.count as u32,
                oldest_arrival_ms: o.oldest.and_then(&arrival_ms),
                highest_priority: o.highest_priority,
            })
            .collect()
    }
}

/// The waiting requests of one class outside a window.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Outside {
    /// How many.
    pub count: usize,
    /// The oldest of them (ids are given in arrival order).
    pub oldest: Option<u64>,
    /// Their highest admission priority.
    pub highest_priority: Option<f64>,
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
        let w = q.window(8);
        assert_eq!(w.ids, vec![1, 2]);
        assert_eq!(w.outside, [Outside::default(); 2]);
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
        assert_eq!(w.ids.len(), 16);
        // Real-time: its half (8) split between the oldest 4 and the
        // highest 4 (all priority 1.0: then the oldest).
        let rt: Vec<u64> = w.ids.iter().copied().filter(|id| *id > 100).collect();
        assert_eq!(rt, (101..=108).collect::<Vec<_>>());
        // Batch: the 4 oldest and the 4 highest (90..=93).
        let be: Vec<u64> = w.ids.iter().copied().filter(|id| *id <= 100).collect();
        assert_eq!(be, vec![1, 2, 3, 4, 90, 91, 92, 93]);
        let outside = |count, oldest, highest| Outside {
            count,
            oldest: Some(oldest),
            highest_priority: Some(highest),
        };
        assert_eq!(w.outside(Class::Batch), outside(92, 5, 5.0));
        assert_eq!(w.outside(Class::Realtime), outside(2, 109, 1.0));
    }

    #[test]
    fn a_class_with_few_requests_leaves_its_share_to_the_other() {
        let mut items: Vec<(u64, Class, f64)> =
            (1..=50).map(|id| (id, Class::Batch, 0.0)).collect();
        items.push((51, Class::Realtime, 1.0));
        let w = queue(&items).window(10);
        assert_eq!(w.ids, vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 51]);
        assert_eq!(w.outside(Class::Realtime), Outside::default());
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
        assert_eq!(a.window(1).ids, vec![2]);
    }

    /// The window as first written: a set of the ids picked, the oldest,
    /// then the priority order, then by age; what lies outside by walking
    /// each order past the window's members.
    fn reference(q: &Queue, size: usize) -> Window {
        let mut items: Vec<(u64, Class, f64)> =
            q.meta.iter().map(|(id, (c, p))| (*id, *c, *p)).collect();
        items.sort_by_key(|i| i.0);
        let of = |class: Class| -> Vec<(u64, f64)> {
            items
                .iter()
                .filter(|i| i.1 == class)
                .map(|i| (i.0, i.2))
                .collect()
        };
        let by_priority = |class: Class| {
            let mut v = of(class);
            v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            v
        };
        if items.len() <= size {
            return Window {
                ids: items.iter().map(|i| i.0).collect(),
                outside: Default::default(),
            };
        }
        let (rt, be) = (of(Class::Realtime).len(), of(Class::Batch).len());
        let rt_share = rt.min(size.div_ceil(2).max(size.saturating_sub(be)));
        let be_share = be.min(size - rt_share);
        let mut ids = Vec::new();
        for (class, share) in [(Class::Realtime, rt_share), (Class::Batch, be_share)] {
            let oldest = share.div_ceil(2);
            let arrival: Vec<u64> = of(class).iter().map(|i| i.0).collect();
            let priority = by_priority(class);
            let candidates = arrival[..oldest]
                .iter()
                .copied()
                .chain(priority.iter().map(|i| i.0))
                .chain(arrival[oldest..].iter().copied());
            let mut picked: Vec<u64> = Vec::new();
            for id in candidates {
                if picked.len() >= share {
                    break;
                }
                if !picked.contains(&id) {
                    picked.push(id);
                }
            }
            ids.extend(picked);
        }
        ids.sort_unstable();
        let mut outside = [Outside::default(); 2];
        for class in [Class::Realtime, Class::Batch] {
            let out: Vec<(u64, f64)> = of(class)
                .into_iter()
                .filter(|i| !ids.contains(&i.0))
                .collect();
            outside[slot(class)] = Outside {
                count: out.len(),
                oldest: out.first().map(|i| i.0),
                highest_priority: out.iter().map(|i| i.1).max_by(|a, b| a.total_cmp(b)),
            };
        }
        Window { ids, outside }
    }

    #[test]
    fn the_one_walk_window_matches_the_reference_on_random_queues() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for round in 0..400 {
            let mut q = Queue::default();
            let n = next(60);
            for id in 0..n {
                // Few distinct priorities: ties are the common case.
                let class = if next(4) == 0 {
                    Class::Realtime
                } else {
                    Class::Batch
                };
                q.insert(id, class, next(4) as f64 - 1.0);
            }
            // Some leave (dispatched, cancelled): holes in the ids.
            for _ in 0..next(10) {
                q.remove(&next(60));
            }
            for size in [0, 1, 2, 3, 7, 16, 33, 64] {
                assert_eq!(
                    q.window(size),
                    reference(&q, size),
                    "round {round}, size {size}"
                );
            }
        }
    }
}
