//! The hot-reload watcher against the ways files really change: a busy log
//! file next to the policy file does not hold reloads back, a Kubernetes
//! ConfigMap update (a swap of the `..data` symlink) is a change of the files
//! it holds, and a plugin folder that is deleted and made again is watched
//! again. Each change must be applied within [`BOUND`].

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

/// How long a change may take to be applied: the 150 ms quiet time plus a
/// reload (a compile of a changed plugin on two busy cores), with room.
const BOUND: Duration = Duration::from_secs(5);

/// Polls `/status` until `pred` holds; returns how long that took, or panics
/// with the last status and the log once [`BOUND`] has passed.
async fn applied_within_bound(m: &Maitre, what: &str, pred: impl Fn(&Value) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let s = status(m).await;
        if pred(&s) {
            return start.elapsed();
        }
        if start.elapsed() > BOUND {
            panic!(
                "{what}: not applied within {BOUND:?}; /status:\n{s:#}\nlog:\n{}",
                m.logs().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn reloads(m: &Maitre, result: &str) -> f64 {
    Scrape::get(&m.admin)
        .await
        .get_exact("maitre_reloads_total", &[("result", result)])
        .unwrap_or(0.0)
}

/// A file appended to every 20 ms, as a log is, until stopped (at most 60 s);
/// the thread returns how many lines it wrote.
fn busy_file(path: &Path, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<usize> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open the busy file");
    std::thread::spawn(move || {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) && n < 3000 {
            writeln!(f, "busy line {n}").expect("write the busy file");
            n += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        n
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_file_next_to_the_policy_does_not_hold_back_reloads() {
    let fake = fake(2, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let policy_with = |b_weight: u32| {
        live_policy(&fake.url(), 2)
            .arm(Arm::builtin("a", "fifo").weight(100))
            .arm(Arm::builtin("b", "fifo").weight(b_weight))
    };
    let policy = dir.path().join("policy.toml");
    policy_with(100).write(&policy);
    let m = serve().policy_in(dir, policy.clone()).start();
    // `maitre serve -p policy.toml 2>>maitre.log`: the log is in the
    // policy's folder, and written more often than the 150 ms quiet time.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = busy_file(&m.dir.path().join("maitre.log"), stop.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut took = Vec::new();
    for b in [50, 10, 25, 100] {
        policy_with(b).write(&policy);
        took.push(
            applied_within_bound(&m, &format!("weight {b} for arm b"), |s| {
                arm(s, "b")["weight"] == b
            })
            .await,
        );
    }
    stop.store(true, Ordering::Relaxed);
    let lines = writer.join().unwrap();
    assert!(lines >= 10, "the busy file got only {lines} lines");
    // One reload per rewrite: the busy file causes none of its own.
    tokio::time::sleep(maitre::reload::DEBOUNCE * 3).await;
    assert_eq!(reloads(&m, "ok").await, 4.0);
    assert_eq!(reloads(&m, "failed").await, 0.0);
    eprintln!("with a file written every 20 ms next to it, 4 policy rewrites applied in {took:?}");
}

/// Writes `files` into the ConfigMap volume at `dir` as the kubelet does: a
/// new timestamped folder, then a `..data_tmp` symlink to it renamed over
/// `..data`, then the user-visible symlinks `NAME -> ..data/NAME` (made once),
/// then the old folder deleted.
fn configmap_update(dir: &Path, version: u32, files: &[(&str, Vec<u8>)]) {
    use std::os::unix::fs::symlink;
    let name = format!("..2024_01_01_00_00_{version:02}.{version}00000000");
    let ts = dir.join(&name);
    std::fs::create_dir(&ts).unwrap();
    for (file, bytes) in files {
        std::fs::write(ts.join(file), bytes).unwrap();
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    symlink(&name, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    for (file, _) in files {
        let link = dir.join(file);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(Path::new("..data").join(file), link).unwrap();
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

#[tokio::test]
async fn a_configmap_update_by_symlink_swap_is_reloaded() {
    let fake = fake(2, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let policy_for = |plugin: &str, weight: u32| {
        live_policy(&fake.url(), 2)
            .arm(
                Arm::new("main", plugin)
                    .weight(weight)
                    .config("default_class", "batch"),
            )
            .to_toml()
            .into_bytes()
    };
    configmap_update(
        dir.path(),
        1,
        &[
            ("policy.toml", policy_for("p.wasm", 100)),
            ("p.wasm", plugin_bytes("fifo")),
        ],
    );
    let policy = dir.path().join("policy.toml");
    assert!(std::fs::symlink_metadata(&policy).unwrap().is_symlink());
    let m = serve().policy_in(dir, policy).start();
    let cm = m.dir.path().to_path_buf();
    assert_eq!(
        arm(&status(&m).await, "main")["plugin_sha256"],
        sha256_hex(&plugin_bytes("fifo"))
    );

    // Update 1: only the plugin's bytes change.
    configmap_update(
        &cm,
        2,
        &[
            ("policy.toml", policy_for("p.wasm", 100)),
            ("p.wasm", plugin_bytes("reserved-aging")),
        ],
    );
    let ra = sha256_hex(&plugin_bytes("reserved-aging"));
    let t1 = applied_within_bound(&m, "the plugin of ConfigMap version 2", |s| {
        arm(s, "main")["plugin_sha256"] == ra
    })
    .await;

    // Update 2: only the policy changes (the weight); the watch follows
    // the swap, so a second swap is seen too.
    configmap_update(
        &cm,
        3,
        &[
            ("policy.toml", policy_for("p.wasm", 60)),
            ("p.wasm", plugin_bytes("reserved-aging")),
        ],
    );
    let t2 = applied_within_bound(&m, "the weight of ConfigMap version 3", |s| {
        arm(s, "main")["weight"] == 60
    })
    .await;
    let s = status(&m).await;
    assert!(s["last_reload_error"].is_null(), "{s:#}");
    assert_eq!(arm(&s, "main")["plugin_sha256"], ra);
    assert_eq!(reloads(&m, "failed").await, 0.0);
    eprintln!("ConfigMap symlink swaps applied in {t1:?} (plugin) and {t2:?} (policy)");
}

#[tokio::test]
async fn a_plugin_folder_deleted_and_made_again_is_watched_again() {
    let fake = fake(2, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::copy(built_plugin_path("fifo"), plugins.join("p.wasm")).unwrap();
    let policy = dir.path().join("policy.toml");
    live_policy(&fake.url(), 2)
        .arm(
            Arm::new("main", "plugins/p.wasm")
                .weight(100)
                .config("default_class", "batch"),
        )
        .write(&policy);
    let m = serve().policy_in(dir, policy).start();
    let sha = |name: &str| sha256_hex(&plugin_bytes(name));
    let serving = |name: &'static str| {
        let want = sha(name);
        move |s: &Value| arm(s, "main")["plugin_sha256"] == want && s["last_reload_error"].is_null()
    };

    // The folder goes away: the reload fails and the old plugin serves on.
    std::fs::remove_dir_all(&plugins).unwrap();
    applied_within_bound(&m, "the missing plugin folder", |s| {
        s["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("p.wasm"))
    })
    .await;
    // It comes back with another plugin: that one loads.
    std::fs::create_dir(&plugins).unwrap();
    std::fs::copy(built_plugin_path("reserved-aging"), plugins.join("p.wasm")).unwrap();
    let t1 = applied_within_bound(
        &m,
        "reserved-aging in the new folder",
        serving("reserved-aging"),
    )
    .await;

    // Gone and back at once (within the quiet time), with a third plugin.
    std::fs::remove_dir_all(&plugins).unwrap();
    std::fs::create_dir(&plugins).unwrap();
    std::fs::copy(built_plugin_path("preemptive"), plugins.join("p.wasm")).unwrap();
    let t2 =
        applied_within_bound(&m, "preemptive in the remade folder", serving("preemptive")).await;

    // The folder made last is watched: an edit in it is seen.
    std::fs::copy(built_plugin_path("fifo"), plugins.join("p.wasm")).unwrap();
    let t3 = applied_within_bound(&m, "fifo written into the remade folder", serving("fifo")).await;
    eprintln!("plugin folder remade: applied in {t1:?}, {t2:?} (at once), then an edit in {t3:?}");
}
