//! When an upstream connection has been let go: a flag the proxy's
//! connection sets once a connection it gave up on (a pre-empted, cut or
//! abandoned request) is closed at both ends, which the scheduler waits for
//! before it counts the request's slot as free.
//!
//! Closing our end is not enough: an engine may take a while to notice (and
//! keeps generating, holding its slot, meanwhile), and a request started in
//! the freed slot at once would find the engine still full. The upstream's
//! own close of the connection says it has let go.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// How long a slot waits at most for its upstream connection to be let go;
/// after that the connection is closed at our end alone and the slot is
/// free, logged.
pub const LET_GO_TIMEOUT: Duration = Duration::from_secs(5);

/// Set once an upstream connection is closed at both ends (or given up on
/// after [`LET_GO_TIMEOUT`]). Clones share the flag.
#[derive(Clone, Debug, Default)]
pub struct LetGo(Arc<Flag>);

#[derive(Debug, Default)]
struct Flag {
    set: AtomicBool,
    notify: Notify,
}

impl LetGo {
    /// Not let go yet.
    pub fn new() -> LetGo {
        LetGo::default()
    }

    /// The connection is let go: wakes every waiter.
    pub fn set(&self) {
        self.0.set.store(true, Ordering::Release);
        self.0.notify.notify_waiters();
    }

    /// Whether the connection is let go.
    pub fn is_set(&self) -> bool {
        self.0.set.load(Ordering::Acquire)
    }

    /// Waits until the connection is let go, at most a little longer than
    /// [`LET_GO_TIMEOUT`] (the closer gives up by then itself).
    pub async fn wait(&self) {
        let bound = LET_GO_TIMEOUT + Duration::from_secs(1);
        let _ = tokio::time::timeout(bound, async {
            loop {
                let notified = self.0.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.is_set() {
                    return;
                }
                notified.await;
            }
        })
        .await;
    }
}

/// Runs `then` once `let_go` is set (at once when there is none or it is
/// set already); outside a tokio runtime, at once.
pub(super) fn after(let_go: Option<LetGo>, then: impl FnOnce() + Send + 'static) {
    match let_go.filter(|l| !l.is_set()) {
        Some(l) if tokio::runtime::Handle::try_current().is_ok() => {
            tokio::spawn(async move {
                l.wait().await;
                then();
            });
        }
        _ => then(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waiters_wake_when_it_is_set_and_give_up_in_the_end() {
        let l = LetGo::new();
        let w = tokio::spawn({
            let l = l.clone();
            async move { l.wait().await }
        });
        tokio::task::yield_now().await;
        assert!(!w.is_finished());
        l.set();
        w.await.unwrap();
        assert!(l.is_set());
        // Never set: the wait ends after the bound.
        let start = tokio::time::Instant::now();
        LetGo::new().wait().await;
        assert!(start.elapsed() > LET_GO_TIMEOUT);
    }
}
