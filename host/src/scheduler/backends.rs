//! The scheduler's side of the fleet: where a start goes, backend health,
//! and fail-over after a backend failed.

use tokio::sync::oneshot;

use super::core::{Core, State};
use super::ticket::Signal;

impl Core {
    /// The backend a start goes to: the one the policy named, if it has a
    /// free slot that takes new starts and speaks the request's API (an
    /// OpenAI-compatible server never gets an `/api/*` request); else the
    /// host's choice.
    pub(super) fn place(&self, id: u64, named: Option<u32>) -> Option<usize> {
        let e = self.entries.get(&id)?;
        if let Some(b) = named.map(|b| b as usize)
            && b < self.fleet.len()
            && self.fleet.free_for(b, &e.meta.path) > 0
        {
            return Some(b);
        }
        self.fleet.choose(&e.meta.model, &e.meta.path)
    }

    /// A probe's verdict on a backend. A backend coming back gives waiting
    /// requests slots again, so every arm with waiting requests decides.
    pub(super) fn set_health(&mut self, b: usize, up: bool, version: Option<String>) {
        if b < self.fleet.len() && self.fleet.set_health(b, up, version) {
            for arm in &mut self.arms {
                if !arm.waiting.is_empty() {
                    arm.dirty = true;
                }
            }
        }
    }

    /// Request `id` failed on backend `b` before anything reached its
    /// client (the connection was refused or dropped). The backend is marked
    /// down; the request goes back to its queue for another backend, if it
    /// has fail-overs left and another backend is healthy. False: the
    /// handler answers the failure (and ends the ticket).
    pub(super) fn failover(&mut self, id: u64, b: usize, signal: oneshot::Sender<Signal>) -> bool {
        if let Some(e) = self.entries.get_mut(&id) {
            e.tx = Some(signal);
        }
        if b < self.fleet.len() {
            self.set_health(b, false, None);
        }
        let max = self.max_failovers;
        let Some(e) = self.entries.get(&id) else {
            return false;
        };
        if !matches!(e.state, State::Running) || e.failovers >= max || !self.fleet.other_healthy(b)
        {
            return false;
        }
        if !self.back_in_line(id, State::Running) {
            return false;
        }
        let Some(e) = self.entries.get_mut(&id) else {
            return false;
        };
        e.failovers += 1;
        self.fleet.count_failover(b);
        tracing::info!(
            target: "maitre::failover",
            id,
            backend = %self.fleet.name(b),
            failovers = e.failovers,
            "backend failed before the answer started: the request waits for another backend"
        );
        true
    }
}
