//! `maitre serve --ready-file PATH`: the file appears only once the plugins
//! are loaded and both listeners answer, names the bound addresses, and is
//! never left over from an earlier run or a failed start.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// `maitre serve` on `policy` with `--ready-file ready`, its log discarded.
fn spawn(policy: &Path, ready: &Path) -> Child {
    Command::new(BIN)
        .arg("serve")
        .arg("--policy")
        .arg(policy)
        .arg("--ready-file")
        .arg(ready)
        .env_remove("MAITRE_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start maitre")
}

/// Polls every millisecond until `child` exits; returns its status and
/// whether `ready` existed at any poll.
fn watch_until_exit(child: &mut Child, ready: &Path) -> (std::process::ExitStatus, bool) {
    let end = Instant::now() + Duration::from_secs(30);
    let mut seen = false;
    loop {
        seen |= ready.exists();
        if let Some(status) = child.try_wait().unwrap() {
            return (status, seen || ready.exists());
        }
        assert!(Instant::now() < end, "maitre neither served nor exited");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[tokio::test]
async fn ready_file_names_listeners_that_answer_at_once() {
    let fake = fake(2, 1).await;
    let mut m = start(
        &PolicyFile::new(fake.url(), 2)
            .arm(Arm::builtin("main", "reserved-aging").config("rt_reserved_slots", 1)),
    );
    // No retry: the first request to each listener is answered.
    let c = client();
    let status: serde_json::Value = c
        .get(format!("{}/status", m.admin))
        .send()
        .await
        .expect("the admin listener answers as soon as the ready file exists")
        .json()
        .await
        .unwrap();
    assert!(
        status["arms"][0]["plugin_sha256"].is_string(),
        "the plugin is loaded: {status:#}"
    );
    let r = generate(&c, &m.url, "first", None, 1)
        .send()
        .await
        .expect("the client listener answers as soon as the ready file exists");
    assert_eq!(r.status(), 200);
    // The file names what the log names.
    let serving = m
        .logs()
        .into_iter()
        .find(|l| l.contains("maitre serving"))
        .expect("a serving line");
    assert!(
        serving.contains(&format!("listen={}", m.ready.listen)),
        "{serving} vs {:?}",
        m.ready
    );
    let text = std::fs::read_to_string(&m.ready_file).unwrap();
    assert_eq!(
        text,
        format!(
            "{{\"listen\":\"{}\",\"admin\":\"{}\"}}\n",
            m.ready.listen,
            m.ready.admin.unwrap()
        )
    );
    // A graceful stop removes it.
    assert!(m.terminate().success());
    assert!(!m.ready_file.exists(), "the ready file outlived maitre");
}

/// A plugin whose `init` burns its 300 ms CPU budget and fails: maitre must
/// exit without ever writing the file. Written before the plugins load, it
/// would exist for those 300 ms.
#[test]
fn no_ready_file_while_plugins_load_or_when_they_fail() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("loop.wasm");
    std::fs::copy(
        crate::common::hostile_plugins::hostile_plugin("hostile-loop"),
        &plugin,
    )
    .unwrap();
    let policy = dir.path().join("policy.toml");
    PolicyFile::new("http://127.0.0.1:9", 1)
        .limits(Limits {
            plugin_call_ms: Some(300),
            ..Limits::default()
        })
        .arm(Arm::new("main", "loop.wasm").config("call", "init"))
        .write(&policy);
    let ready = dir.path().join("ready.json");
    let t = Instant::now();
    let (status, seen) = watch_until_exit(&mut spawn(&policy, &ready), &ready);
    assert!(!status.success());
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "init ran its budget"
    );
    assert!(!seen, "the ready file appeared before the plugins loaded");
}

/// A file left by an earlier run is removed before anything else, so a
/// supervisor never reads it as this run's.
#[test]
fn a_stale_ready_file_is_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    // A plugin file that does not exist: the start fails after the removal.
    PolicyFile::new("http://127.0.0.1:9", 1)
        .arm(Arm::new("main", "missing.wasm"))
        .write(&policy);
    let ready = dir.path().join("ready.json");
    std::fs::write(&ready, "{\"listen\":\"127.0.0.1:1\",\"admin\":null}\n").unwrap();
    let (status, _) = watch_until_exit(&mut spawn(&policy, &ready), &ready);
    assert!(!status.success());
    assert!(!ready.exists(), "the stale ready file was left in place");
}
