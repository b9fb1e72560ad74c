//! The file watcher behind hot reload: it watches the folders of the policy
//! file and its plugin files and reloads once a change has settled.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};

use super::{DEBOUNCE, load_config};
use crate::Host;
use crate::config::{Config, PluginSource};

/// Files a config depends on: the policy file and every plugin file.
fn watched_files(cfg: &Config) -> BTreeSet<PathBuf> {
    let mut files = BTreeSet::new();
    files.insert(absolute(&cfg.path));
    for a in &cfg.arms {
        if let PluginSource::File(p) = &a.plugin {
            files.insert(absolute(p));
        }
    }
    files
}

/// The files of the running config plus those the file names now, even if
/// it failed to load: a plugin that is missing now must trigger a reload
/// when it appears.
fn files_to_watch(host: &Host) -> BTreeSet<PathBuf> {
    let running = host.config.load();
    let mut files = watched_files(&running);
    if let Ok(now) = Config::load(&running.path) {
        files.extend(watched_files(&now));
    }
    files
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
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

/// Watches the policy file and its plugin files; a change triggers a reload
/// once the changed files have been quiet for [`DEBOUNCE`], so an editor's
/// save or a file copy is one reload and a half-written file is not read.
pub fn watch(host: Arc<Host>) -> anyhow::Result<WatchGuard> {
    // Remember the file as it is now, so later reloads warn only about
    // restart-only settings the user actually changed.
    if let Ok(file) = load_config(&host.config.load().path) {
        *host.reloader.file_seen.lock().expect("not poisoned") = Some(file);
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<PathBuf>>();
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(event) if is_change(&event.kind) => {
                let _ = tx.send(event.paths);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(
                error = %e,
                "file watcher error; hot reload may miss a change (POST /reload works)"
            ),
        })?;
    // Watch folders, not files: editors save by writing a new file and
    // renaming it over the old one, which a watch on the old inode misses.
    let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
    let mut sync_dirs = move |watcher: &mut notify::RecommendedWatcher,
                              files: &BTreeSet<PathBuf>| {
        for f in files {
            if let Some(d) = f.parent()
                && d.exists()
                && dirs.insert(d.to_path_buf())
                && let Err(e) = watcher.watch(d, RecursiveMode::NonRecursive)
            {
                tracing::warn!(dir = %d.display(), error = %e, "cannot watch folder for hot reload");
                dirs.remove(d);
            }
        }
    };
    let mut files = files_to_watch(&host);
    sync_dirs(&mut watcher, &files);
    let task = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut changed: BTreeSet<PathBuf> = first.iter().map(|p| absolute(p)).collect();
            // Debounce: wait until no change came for DEBOUNCE.
            loop {
                match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                    Ok(Some(more)) => changed.extend(more.iter().map(|p| absolute(p))),
                    Ok(None) => return,
                    Err(_quiet) => break,
                }
            }
            let relevant: Vec<&PathBuf> = changed.iter().filter(|p| files.contains(*p)).collect();
            if relevant.is_empty() {
                continue;
            }
            tracing::info!(changed = ?relevant, "policy or plugin file changed; reloading");
            let _ = host.reloader.reload(&host, "file").await;
            files = files_to_watch(&host);
            sync_dirs(&mut watcher, &files);
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
