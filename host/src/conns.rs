//! The cap on open client connections (`limits.max_connections`).
//!
//! Each open connection costs maitre a socket, hyper's buffers and a task,
//! whether or not it ever sends a request. At the cap the accept loop stops
//! accepting until a connection closes: new clients wait in the kernel's
//! listen queue, which costs maitre nothing, and are served in turn. The
//! other choice, accepting and answering 503 at once, would still pay for a
//! socket, buffers and a task per excess connection and read its headers,
//! which is exactly the memory a flood of connections is after.
//!
//! The cap is also kept under the process's open-file limit (raised first
//! towards its hard limit when the cap needs more), so that maitre keeps the
//! descriptors its upstream connections, listeners and plugins need.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

/// Descriptors kept aside from the cap: listeners, the file watcher, the
/// plugin runtime, logs, and idle upstream connections (the upstream's
/// slots are added on top).
pub const RESERVED_FDS: u64 = 128;

/// Open client connections, at most the cap.
pub struct ConnectionCap {
    open: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

/// One open client connection; its place is free again when dropped.
pub struct Open {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl ConnectionCap {
    /// A cap of `max` connections, counted in `maitre_client_connections`.
    pub fn new(max: usize, metrics: Arc<Metrics>) -> ConnectionCap {
        ConnectionCap {
            open: Arc::new(Semaphore::new(max.max(1))),
            metrics,
        }
    }

    /// Waits until a connection may be accepted (one closes, at the cap).
    pub async fn admit(&self) -> Open {
        let permit = self
            .open
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        self.metrics.client_connections.inc();
        Open {
            _permit: permit,
            metrics: self.metrics.clone(),
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.metrics.client_connections.dec();
    }
}

/// The cap in force for `configured` connections in front of `slots`
/// upstream slots: at most the open-file limit less what maitre keeps for
/// itself. Raises the soft open-file limit towards the hard one when the
/// cap needs it. Returns the cap and, when it had to be lowered, the limit
/// that lowered it.
pub fn fit_to_fd_limit(configured: usize, slots: u32) -> (usize, Option<u64>) {
    let reserve = RESERVED_FDS + u64::from(slots);
    let Some(soft) = raise_fd_limit(configured as u64 + reserve) else {
        return (configured, None);
    };
    let room = soft.saturating_sub(reserve).max(1);
    if (configured as u64) <= room {
        (configured, None)
    } else {
        (room as usize, Some(soft))
    }
}

/// Raises the soft open-file limit to `wanted` (at most the hard limit) and
/// returns the soft limit then in force; `None` when it is unlimited or
/// unknown.
#[cfg(unix)]
fn raise_fd_limit(wanted: u64) -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let soft = lim.current?;
    if soft >= wanted {
        return Some(soft);
    }
    let target = lim.maximum.map_or(wanted, |hard| hard.min(wanted));
    let raised = Rlimit {
        current: Some(target),
        maximum: lim.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => Some(target),
        Err(_) => Some(soft),
    }
}

#[cfg(not(unix))]
fn raise_fd_limit(_wanted: u64) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn at_the_cap_admission_waits_for_a_close() {
        let m = Arc::new(Metrics::new());
        let cap = ConnectionCap::new(2, m.clone());
        let a = cap.admit().await;
        let _b = cap.admit().await;
        assert_eq!(m.client_connections.get(), 2);
        let third = tokio::time::timeout(Duration::from_millis(50), cap.admit()).await;
        assert!(third.is_err(), "a third connection is not admitted");
        drop(a);
        assert_eq!(m.client_connections.get(), 1);
        let _c = tokio::time::timeout(Duration::from_secs(1), cap.admit())
            .await
            .expect("admitted once one closed");
        assert_eq!(m.client_connections.get(), 2);
    }

    #[test]
    fn the_cap_stays_under_the_open_file_limit() {
        let (cap, lowered) = fit_to_fd_limit(10, 4);
        assert_eq!((cap, lowered), (10, None), "a small cap fits any limit");
        let (cap, lowered) = fit_to_fd_limit(usize::MAX / 4, 4);
        if let Some(soft) = lowered {
            assert_eq!(cap as u64, soft - RESERVED_FDS - 4);
        }
    }
}
