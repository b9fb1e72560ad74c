//! The global budget of request body bytes (`limits.max_total_body_bytes`).
//!
//! Every scheduled request keeps its body from the moment it is read until
//! it is sent upstream, which may be minutes later. `max_body_bytes` bounds
//! one body; this bounds them all: 200 clients with 64 MiB bodies cannot
//! make maitre hold 12.8 GB. Bytes are reserved before they are read (a
//! declared `Content-Length` at once, a chunked body as its chunks arrive)
//! and given back when the [`Held`] that reserved them is dropped (the
//! request finished, failed or was refused). `maitre_held_body_bytes`
//! follows the same count.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::metrics::Metrics;

/// The bytes all held bodies may take together.
pub(super) struct BodyBudget {
    held: AtomicUsize,
    limit: usize,
    metrics: Arc<Metrics>,
}

/// The budget is spent: this many more bytes do not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Spent {
    /// The budget in force.
    pub(super) limit: usize,
}

impl BodyBudget {
    /// A budget of `limit` bytes, published in `metrics`.
    pub(super) fn new(limit: usize, metrics: Arc<Metrics>) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            held: AtomicUsize::new(0),
            limit,
            metrics,
        })
    }

    /// A reservation of nothing yet, to grow as the body is read.
    pub(super) fn start(self: &Arc<Self>) -> Held {
        Held {
            budget: self.clone(),
            bytes: 0,
        }
    }

    /// Bytes held now.
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    fn take(&self, n: usize) -> Result<(), Spent> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n).filter(|total| *total <= self.limit)
            })
            .map_err(|_| Spent { limit: self.limit })?;
        self.metrics.held_body_bytes.inc_by(n as i64);
        Ok(())
    }

    fn give_back(&self, n: usize) {
        if n > 0 {
            self.held.fetch_sub(n, Ordering::AcqRel);
            self.metrics.held_body_bytes.dec_by(n as i64);
        }
    }
}

/// Bytes reserved for one request's body; given back when dropped.
pub(super) struct Held {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl Held {
    /// Reserves `n` more bytes, or refuses when they do not fit (what was
    /// reserved before stays held until this is dropped).
    pub(super) fn grow(&mut self, n: usize) -> Result<(), Spent> {
        self.budget.take(n)?;
        self.bytes += n;
        Ok(())
    }

    /// Makes the reservation exactly `n` bytes, giving back any excess (a
    /// body shorter than reserved for).
    pub(super) fn fit(&mut self, n: usize) {
        if n < self.bytes {
            self.budget.give_back(self.bytes - n);
            self.bytes = n;
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge(m: &Metrics) -> i64 {
        m.held_body_bytes.get()
    }

    #[test]
    fn reservations_fit_the_limit_and_are_given_back_on_drop() {
        let m = Arc::new(Metrics::new());
        let b = BodyBudget::new(100, m.clone());
        let mut one = b.start();
        one.grow(60).unwrap();
        let mut two = b.start();
        assert_eq!(two.grow(41), Err(Spent { limit: 100 }));
        two.grow(40).unwrap();
        assert_eq!((b.held(), gauge(&m)), (100, 100));
        assert!(two.grow(1).is_err(), "the budget is spent");
        drop(one);
        assert_eq!((b.held(), gauge(&m)), (40, 40));
        two.grow(50).unwrap();
        two.fit(10);
        assert_eq!((b.held(), gauge(&m)), (10, 10));
        drop(two);
        assert_eq!((b.held(), gauge(&m)), (0, 0));
    }

    #[test]
    fn an_overflowing_request_is_refused_not_wrapped() {
        let b = BodyBudget::new(usize::MAX, Arc::new(Metrics::new()));
        let mut h = b.start();
        h.grow(usize::MAX - 1).unwrap();
        assert!(h.grow(2).is_err());
    }
}
