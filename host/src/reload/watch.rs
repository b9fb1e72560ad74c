//! The file watcher behind hot reload: it reloads once the files a policy
//! depends on (the policy file and the plugin files it names) have changed
//! and then been quiet for [`DEBOUNCE`].
//!
//! Hand-written on `notify` rather than notify-debouncer-mini, which reported
//! opens and reads as changes, so a reload's own reading of the files caused
//! the next reload, forever. Only changes to the watched files start or
//! restart the quiet time: a log file written next to the policy file every
//! few milliseconds must not hold a reload back for ever. [`super::watched`]
//! decides which events are such changes.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

use super::watched::{Watched, files_of};
use super::{DEBOUNCE, load_config};
use crate::Host;
use crate::config::Config;

/// At most this many queued events are taken as one batch, so a flood of
/// events from a busy neighbour still lets the quiet time run out.
const BATCH: usize = 1024;

/// The files of the running config plus those the file names now, even if
/// it failed to load: a plugin that is missing now must trigger a reload
/// when it appears.
fn files_to_watch(host: &Host) -> BTreeSet<PathBuf> {
    let running = host.config.load();
    let mut files = files_of(&running);
    if let Ok(now) = Config::load(&running.path) {
        files.extend(files_of(&now));
    }
    files
}

/// A running file watcher; dropping it stops watching.
pub struct WatchGuard {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether a file event means the file's content or name may have changed.
/// Opening and reading a file are events too (inotify reports them), and a
/// reload reads every watched file: counting those would reload forever.
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Any | EventKind::Other => false,
    }
}

/// `first` and the events queued behind it (up to [`BATCH`]), so a burst
/// costs one look at the files, not one per event.
fn batch(first: Event, rx: &mut UnboundedReceiver<Event>) -> Vec<Event> {
    let mut events = vec![first];
    while events.len() < BATCH {
        match rx.try_recv() {
            Ok(e) => events.push(e),
            Err(_) => break,
        }
    }
    events
}

/// Watches the policy file and its plugin files; a change triggers a reload
/// once the changed files have been quiet for [`DEBOUNCE`], so an editor's
/// save or a file copy is one reload and a half-written file is not read.
pub fn watch(host: Arc<Host>) -> anyhow::Result<WatchGuard> {
    // Remember the file as it is now, so later reloads warn only about
    // restart-only settings the user actually changed.
    if let Ok(file) = load_config(&host.config.load().path) {
        *host.reloader.file_seen.lock().expect("not poisoned") = Some(file);
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            // A rescan means events were lost: look at everything again.
            Ok(event) if is_change(&event.kind) || event.need_rescan() => {
                let _ = tx.send(event);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(
                error = %e,
                "file watcher error; hot reload may miss a change (POST /reload works)"
            ),
        })?;
    let mut watched = Watched::new(watcher);
    watched.set_files(files_to_watch(&host));
    let task = tokio::spawn(async move {
        // Files changed since the last reload started reading them.
        let mut changed: BTreeSet<PathBuf> = BTreeSet::new();
        loop {
            if changed.is_empty() {
                let Some(first) = rx.recv().await else { return };
                changed = watched.changed_by(&batch(first, &mut rx));
                if changed.is_empty() {
                    continue;
                }
            }
            // Debounce: wait until the watched files have been quiet for
            // DEBOUNCE; other events neither count nor restart the wait.
            let mut quiet_until = Instant::now() + DEBOUNCE;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(quiet_until) => break,
                    more = rx.recv() => {
                        let Some(first) = more else { return };
                        let more = watched.changed_by(&batch(first, &mut rx));
                        if !more.is_empty() {
                            changed.extend(more);
                            quiet_until = Instant::now() + DEBOUNCE;
                        }
                    }
                }
            }
            // Look once more before the reload reads the files, so a change
            // made while it runs is told apart from what it read.
            watched.recheck();
            tracing::info!(changed = ?changed, "policy or plugin file changed; reloading");
            let _ = host.reloader.reload(&host, "file").await;
            changed = watched.set_files(files_to_watch(&host));
        }
    });
    Ok(WatchGuard { task })
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, ModifyKind, RemoveKind, RenameMode};

    #[test]
    fn reading_a_file_is_not_a_change() {
        assert!(!is_change(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(!is_change(&EventKind::Access(AccessKind::Read)));
        assert!(is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(is_change(&EventKind::Modify(ModifyKind::Data(
            DataChange::Any
        ))));
        assert!(is_change(&EventKind::Modify(ModifyKind::Name(
            RenameMode::To
        ))));
        assert!(is_change(&EventKind::Create(CreateKind::File)));
        assert!(is_change(&EventKind::Remove(RemoveKind::File)));
    }
}
