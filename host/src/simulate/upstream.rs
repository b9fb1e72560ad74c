//! The simulated upstream: the upstream model's slots ([`SlotQueue`]: a
//! fixed number of generation slots with a FIFO queue in front) and its
//! timing ([`Plan`]), in-process and on the virtual clock, with no HTTP in
//! between. A [`Lease`] is one request holding a slot; dropping it (the
//! request finished, was pre-empted, cut, or its client left) frees the
//! slot for the head of the queue at once.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use upstream_model::slots::SlotQueue;
use upstream_model::timing::Plan;

/// A waiter: its number and how to tell it that it holds a slot now.
type Waiter = (u64, oneshot::Sender<()>);

/// The upstream's slots.
pub struct Upstream {
    inner: Mutex<Inner>,
}

struct Inner {
    slots: SlotQueue<Waiter>,
    next: u64,
}

impl Upstream {
    /// An upstream with `slots` generation slots.
    pub fn new(slots: usize) -> Arc<Upstream> {
        Arc::new(Upstream {
            inner: Mutex::new(Inner {
                slots: SlotQueue::new(slots),
                next: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits (FIFO) for a slot; returns it with the time it was granted.
    pub async fn acquire(self: &Arc<Self>) -> Lease {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut g = self.lock();
            g.next += 1;
            let id = g.next;
            if g.slots.request((id, tx)) {
                return self.lease();
            }
            id
        };
        let mut waiting = Waiting {
            up: self.clone(),
            id,
            done: false,
        };
        // The sender is only dropped after a grant was sent or the waiter
        // left, so an error cannot happen while this future lives.
        let _ = rx.await;
        waiting.done = true;
        self.lease()
    }

    fn lease(self: &Arc<Self>) -> Lease {
        Lease {
            up: self.clone(),
            granted: Instant::now(),
        }
    }

    /// A holder let go: the head of the queue holds the slot now. A waiter
    /// that left without being told is passed over.
    fn release(&self) {
        let mut g = self.lock();
        while let Some((_, tx)) = g.slots.release() {
            if tx.send(()).is_ok() {
                return;
            }
        }
    }

    /// Slots held now.
    #[cfg(test)]
    pub fn active(&self) -> usize {
        self.lock().slots.active()
    }

    /// The most slots held at once.
    pub fn max_active(&self) -> usize {
        self.lock().slots.max_active()
    }
}

/// A place in the queue: leaving it (the future was dropped) gives it up,
/// or passes on the slot if one was granted meanwhile.
struct Waiting {
    up: Arc<Upstream>,
    id: u64,
    done: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let left = self.up.lock().slots.leave(|w| w.0 == self.id);
        if !left {
            self.up.release();
        }
    }
}

/// One generation slot held; dropping it frees the slot.
pub struct Lease {
    up: Arc<Upstream>,
    /// When the slot was granted: the plan's offsets count from here.
    pub granted: Instant,
}

impl Lease {
    /// Tokens a generation on this plan has made by `now`.
    pub fn made_by(&self, plan: &Plan, now: Instant) -> u64 {
        tokens_by(plan, now.saturating_duration_since(self.granted))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.up.release();
    }
}

/// Tokens ready `elapsed` after the slot grant.
pub fn tokens_by(plan: &Plan, elapsed: Duration) -> u64 {
    let t = plan.timing;
    let Some(generating) = elapsed.checked_sub(t.prompt) else {
        return 0;
    };
    if t.per_token.is_zero() {
        return plan.produced();
    }
    ((generating.as_nanos() / t.per_token.as_nanos()) as u64).min(plan.produced())
}

#[cfg(test)]
mod tests {
    use super::*;
    use upstream_model::timing::Timing;

    fn plan(prompt: u64, per_token: u64, tokens: u64) -> Plan {
        Plan {
            timing: Timing {
                prompt: Duration::from_millis(prompt),
                per_token: Duration::from_millis(per_token),
            },
            tokens,
            fail_after: None,
        }
    }

    #[test]
    fn tokens_made_follow_the_token_clock() {
        let p = plan(100, 20, 5);
        let at = |ms| tokens_by(&p, Duration::from_millis(ms));
        assert_eq!([at(0), at(119), at(120), at(159), at(160)], [0, 0, 1, 2, 3]);
        assert_eq!(at(10_000), 5);
        for i in 0..5 {
            assert_eq!(at(p.timing.token_ready(i).as_millis() as u64), i + 1);
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn slots_are_granted_fifo_and_freed_by_dropping_the_lease() {
        let up = Upstream::new(1);
        let a = up.acquire().await;
        let up2 = up.clone();
        let b = tokio::spawn(async move { up2.acquire().await.granted });
        // A third waiter that leaves: it must not take the slot with it.
        let up3 = up.clone();
        let c = tokio::spawn(async move { up3.acquire().await });
        tokio::task::yield_now().await;
        c.abort();
        let _ = c.await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(a);
        let granted = b.await.unwrap();
        assert_eq!(up.active(), 0, "b's lease was dropped with its task");
        assert!(granted >= Instant::now() - Duration::from_millis(1));
        let _d = up.acquire().await;
        assert_eq!((up.active(), up.max_active()), (1, 1));
    }
}
