//! Interface versions side by side: the built-ins speak
//! `maitre:policy@0.2.0`, a plugin built against 0.1.0 keeps loading and
//! serving, alone or in an A/B test beside a 0.2.0 one.

use futures_util::StreamExt;

use crate::common::hostile_plugins::hostile_plugin;
use crate::common::*;

/// A policy folder with a private copy of the 0.1.0 FIFO plugin.
fn with_compat(arms: impl FnOnce(String) -> PolicyFile) -> Maitre {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("fifo-0.1.0.wasm");
    std::fs::copy(hostile_plugin("compat-fifo-v0-1-0"), &plugin).unwrap();
    let file = dir.path().join("policy.toml");
    arms(plugin.display().to_string()).write(&file);
    Serve::new(BIN).policy_in(dir, file).start()
}

async fn send(m: &Maitre, n: usize) -> Vec<(u16, String)> {
    let c = client();
    futures_util::stream::iter(0..n)
        .map(|i| {
            let r = generate(&c, &m.url, &format!("r{i}"), None, 2)
                .header("x-maitre-key", format!("k{i}"));
            async move {
                let r = r.send().await.expect("request");
                let arm = r.headers()["x-maitre-arm"].to_str().unwrap().to_string();
                (r.status().as_u16(), arm)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_built_for_0_1_0_keeps_loading_beside_a_0_2_0_one() {
    let fake = fake(2, 1).await;
    let m = with_compat(|plugin| {
        PolicyFile::new(fake.url(), 2)
            .arm(Arm::new("old", plugin).weight(50))
            .arm(Arm::builtin("new", "fifo").weight(50))
    });
    let status = m.status().await;
    let interface = |name: &str| {
        status["arms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .unwrap()["interface"]
            .clone()
    };
    assert_eq!(interface("old"), "maitre:policy@0.1.0");
    assert_eq!(interface("new"), "maitre:policy@0.2.0");
    let answers = send(&m, 40).await;
    assert!(answers.iter().all(|(s, _)| *s == 200), "{answers:?}");
    for arm in ["old", "new"] {
        assert!(
            answers.iter().any(|(_, a)| a == arm),
            "{arm} served nothing"
        );
    }
    let status = m.status().await;
    for a in status["arms"].as_array().unwrap() {
        assert_eq!(a["fallback"], false, "{a}");
    }
}

#[test]
fn check_names_each_arms_interface() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("fifo-0.1.0.wasm");
    std::fs::copy(hostile_plugin("compat-fifo-v0-1-0"), &plugin).unwrap();
    let file = dir.path().join("policy.toml");
    PolicyFile::new("http://127.0.0.1:9", 2)
        .arm(Arm::new("old", plugin.display().to_string()).weight(50))
        .arm(Arm::builtin("new", "preemptive").weight(50))
        .write(&file);
    let out = std::process::Command::new(BIN)
        .args(["check", file.to_str().unwrap()])
        .env_remove("MAITRE_ADMIN_TOKEN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |arm: &str| {
        stdout
            .lines()
            .find(|l| l.contains(&format!("arm {arm} ")))
            .unwrap_or_else(|| panic!("{stdout}"))
            .to_string()
    };
    assert!(
        line("old").contains("(maitre:policy@0.1.0, sha256 "),
        "{stdout}"
    );
    assert!(
        line("new").contains("(maitre:policy@0.2.0, sha256 "),
        "{stdout}"
    );
}
