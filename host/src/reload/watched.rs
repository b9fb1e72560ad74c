//! The files a reload depends on, and which folders to watch for them.
//!
//! An event names a path, but a path is not always how a watched file
//! changes: a Kubernetes ConfigMap updates `dir/policy.toml ->
//! ..data/policy.toml` by swapping the `..data` symlink, so no event names
//! `policy.toml`. So each watched file is also looked at (where its path
//! leads and that file's identity, size and time), and a change of that is a
//! change of the file. Folders come and go too: a deleted folder's watch dies
//! with it, so a missing folder is covered by its nearest existing ancestor,
//! and every wanted folder is watched again whenever one on a watched path is
//! created, removed or renamed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use notify::event::ModifyKind;
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use crate::config::{Config, PluginSource};

/// What a watched file is now, as far as a cheap look can tell: where its
/// path leads once symlinks are resolved, and that file's identity, size and
/// modification time. An edit, a rename over it or a symlink swap anywhere
/// along its path changes it. `None` in [`Watched::seen`] means missing.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Look {
    target: PathBuf,
    inode: (u64, u64),
    len: u64,
    modified: Option<SystemTime>,
}

fn look(path: &Path) -> Option<Look> {
    use std::os::unix::fs::MetadataExt;
    let target = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&target).ok()?;
    Some(Look {
        inode: (meta.dev(), meta.ino()),
        len: meta.len(),
        modified: meta.modified().ok(),
        target,
    })
}

/// The watched files, how they last looked, and the folders watched for them.
pub(super) struct Watched {
    watcher: RecommendedWatcher,
    /// Absolute paths (symlinks kept) of the policy file and its plugin files.
    files: BTreeSet<PathBuf>,
    /// How each file looked when last checked.
    seen: BTreeMap<PathBuf, Option<Look>>,
    /// Where each file's path led when last checked, back to the file: events
    /// from the target's folder name the target.
    targets: BTreeMap<PathBuf, PathBuf>,
    /// Folders watched now.
    dirs: BTreeSet<PathBuf>,
}

impl Watched {
    /// Nothing watched yet; [`Watched::set_files`] says what to watch.
    pub(super) fn new(watcher: RecommendedWatcher) -> Watched {
        Watched {
            watcher,
            files: BTreeSet::new(),
            seen: BTreeMap::new(),
            targets: BTreeMap::new(),
            dirs: BTreeSet::new(),
        }
    }

    /// Watches `files` from now on; returns those of them already watched
    /// that look different than when last checked (a change made while a
    /// reload was reading them, say), which still need a reload.
    pub(super) fn set_files(&mut self, files: BTreeSet<PathBuf>) -> BTreeSet<PathBuf> {
        self.files = files;
        self.sync_dirs();
        self.recheck()
    }

    /// Which watched files a batch of events changed. An event naming a
    /// watched file (or where it leads) counts; any other event that creates,
    /// removes or renames something may be a symlink swap or a folder coming
    /// back, so the files are looked at again; anything else (a log file
    /// written next to the policy file) is ignored, cheaply.
    pub(super) fn changed_by(&mut self, events: &[Event]) -> BTreeSet<PathBuf> {
        let mut changed = BTreeSet::new();
        let mut recheck = false;
        let mut resync = false;
        for event in events {
            let structural = event.need_rescan()
                || matches!(
                    event.kind,
                    EventKind::Create(_)
                        | EventKind::Remove(_)
                        | EventKind::Modify(ModifyKind::Name(_))
                );
            recheck |= structural;
            resync |= event.need_rescan();
            for p in &event.paths {
                let p = absolute(p);
                if self.files.contains(&p) {
                    changed.insert(p.clone());
                    recheck = true;
                } else if let Some(file) = self.targets.get(&p) {
                    changed.insert(file.clone());
                    recheck = true;
                }
                resync |= structural && self.on_a_watched_path(&p);
            }
        }
        // Watch first, then look: a file that appeared in a new folder before
        // its watch was set is found by the look.
        if resync {
            self.sync_dirs();
        }
        if recheck {
            changed.extend(self.recheck());
        }
        changed
    }

    /// Looks at every watched file again; returns those that look different
    /// than last time. A file new to the set is not a change.
    pub(super) fn recheck(&mut self) -> BTreeSet<PathBuf> {
        let now: BTreeMap<PathBuf, Option<Look>> =
            self.files.iter().map(|f| (f.clone(), look(f))).collect();
        let changed = now
            .iter()
            .filter(|(f, l)| self.seen.get(*f).is_some_and(|before| before != *l))
            .map(|(f, _)| f.clone())
            .collect();
        self.targets = now
            .iter()
            .filter_map(|(f, l)| Some((l.as_ref()?.target.clone(), f.clone())))
            .collect();
        self.seen = now;
        changed
    }

    /// Whether `p` is a folder on the way to a watched file or to where one
    /// leads: creating, removing or renaming it changes what must be watched.
    fn on_a_watched_path(&self, p: &Path) -> bool {
        self.files
            .iter()
            .chain(self.targets.keys())
            .any(|f| f != p && f.starts_with(p))
    }

    /// Watches the folder of each file (folders, not files: editors save by
    /// renaming a new file over the old one, which a watch on the old inode
    /// misses), or its nearest existing ancestor when the folder is gone, and
    /// the folder of where the file leads through symlinks; stops
    /// watching the others. Every wanted folder is watched again, not only
    /// new ones: a folder deleted and made again has the same path but not
    /// the same watch. Watching a folder twice is one watch (inotify adds to
    /// the watch of the same inode).
    fn sync_dirs(&mut self) {
        let mut wanted = BTreeSet::new();
        for f in &self.files {
            if let Some(d) = f.ancestors().skip(1).find(|d| d.is_dir()) {
                wanted.insert(d.to_path_buf());
            }
            if let Some(d) = std::fs::canonicalize(f)
                .ok()
                .and_then(|t| t.parent().map(Path::to_path_buf))
            {
                wanted.insert(d);
            }
        }
        for gone in self.dirs.difference(&wanted) {
            // A deleted folder's watch is already gone; nothing to undo.
            let _ = self.watcher.unwatch(gone);
        }
        self.dirs.clear();
        for d in wanted {
            match self.watcher.watch(&d, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.dirs.insert(d);
                }
                Err(e) => {
                    tracing::warn!(dir = %d.display(), error = %e, "cannot watch folder for hot reload")
                }
            }
        }
    }
}

/// Files a config depends on: the policy file and every plugin file.
pub(super) fn files_of(cfg: &Config) -> BTreeSet<PathBuf> {
    let mut files = BTreeSet::new();
    files.insert(absolute(&cfg.path));
    for a in &cfg.arms {
        if let PluginSource::File(p) = &a.plugin {
            files.insert(absolute(p));
        }
    }
    files
}

/// `p` made absolute without resolving symlinks: the form both the watched
/// files and the paths in events have.
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, RenameMode};
    use std::os::unix::fs::symlink;

    fn watched(files: &[&Path]) -> Watched {
        let watcher = notify::recommended_watcher(|_| {}).unwrap();
        let mut w = Watched::new(watcher);
        w.set_files(files.iter().map(|f| absolute(f)).collect());
        w
    }

    fn event(kind: EventKind, path: &Path) -> Event {
        Event::new(kind).add_path(path.to_path_buf())
    }

    #[test]
    fn writes_to_a_neighbour_are_not_changes_and_cost_no_look() {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, "a").unwrap();
        let mut w = watched(&[&policy]);
        let log = dir.path().join("maitre.log");
        std::fs::write(&log, "line").unwrap();
        let data = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert!(w.changed_by(&[event(data, &log)]).is_empty());
        // Even when the policy changed meanwhile: only an event naming it
        // (or a structural one) makes the watcher look.
        std::fs::write(&policy, "bb").unwrap();
        assert!(w.changed_by(&[event(data, &log)]).is_empty());
        assert_eq!(
            w.changed_by(&[event(data, &policy)]),
            BTreeSet::from([absolute(&policy)])
        );
        // Looked at once, a file is not changed again by the next event.
        let create = EventKind::Create(CreateKind::File);
        assert!(w.changed_by(&[event(create, &log)]).is_empty());
    }

    #[test]
    fn a_symlink_swap_along_the_path_is_a_change_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for v in ["..v1", "..v2"] {
            std::fs::create_dir(d.join(v)).unwrap();
            std::fs::write(d.join(v).join("policy.toml"), v).unwrap();
        }
        symlink("..v1", d.join("..data")).unwrap();
        symlink("..data/policy.toml", d.join("policy.toml")).unwrap();
        let policy = d.join("policy.toml");
        let mut w = watched(&[&policy]);
        symlink("..v2", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        let renamed = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert_eq!(
            w.changed_by(&[event(renamed, &d.join("..data"))]),
            BTreeSet::from([absolute(&policy)])
        );
        // An event from the target's folder names the target: it is the file.
        let target = std::fs::canonicalize(&policy).unwrap();
        let data = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert_eq!(
            w.changed_by(&[event(data, &target)]),
            BTreeSet::from([absolute(&policy)])
        );
    }

    #[test]
    fn a_missing_folder_is_covered_by_its_nearest_existing_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/p.wasm");
        let w = watched(&[&deep]);
        assert_eq!(w.dirs, BTreeSet::from([absolute(dir.path())]));
        let mut w = w;
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(&deep, "wasm").unwrap();
        // The folder's creation is seen in the ancestor: the new folder is
        // watched, and the file already in it is found.
        let create = EventKind::Create(CreateKind::Folder);
        assert_eq!(
            w.changed_by(&[event(create, &dir.path().join("a"))]),
            BTreeSet::from([absolute(&deep)])
        );
        assert_eq!(w.dirs, BTreeSet::from([absolute(&dir.path().join("a/b"))]));
    }
}
