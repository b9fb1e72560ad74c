//! The custom-plugin template (`examples/custom-plugin`), built from source
//! against `maitre:policy@0.1.0` with the guest SDK, loads through the
//! versioned plugin runtime unchanged and decides as its README says:
//! shortest `num_predict` first, requests above `max_num_predict` refused
//! with 400.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::hostile_plugins::plugin_cargo;
use crate::common::*;

const T: Duration = Duration::from_secs(20);

/// Builds the template for wasm32-wasip2 into its own target dir (beside
/// the plugins workspace's; never the outer one, whose lock `cargo test`
/// holds) and returns the component.
fn build_template() -> PathBuf {
    let manifest =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/custom-plugin/Cargo.toml");
    let target_dir = Path::new(maitre::builtins::PLUGIN_TARGET_DIR).with_file_name("custom-plugin");
    let status = plugin_cargo::build_plugins(&manifest, &target_dir, &[])
        .status()
        .expect("run cargo to build the custom-plugin template");
    assert!(status.success(), "building {} failed", manifest.display());
    let wasm = plugin_cargo::output_dir(&target_dir).join("shortest_first.wasm");
    assert!(wasm.exists(), "{} was not built", wasm.display());
    wasm
}

#[tokio::test]
async fn the_custom_plugin_template_loads_and_decides() {
    let built = build_template();
    let fake = fake(1, 20).await;
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("shortest_first.wasm");
    std::fs::copy(&built, &plugin).unwrap();
    let file = dir.path().join("policy.toml");
    PolicyFile::new(fake.url(), 1)
        .arm(
            Arm::new("shortest-first", plugin.display().to_string())
                .config("default_num_predict", 512)
                .config("max_num_predict", 4096),
        )
        .write(&file);
    let m = serve().policy_in(dir, file).start();
    let c = client();

    // Too long: refused at admission by the plugin, never sent upstream.
    let r = generate(&c, &m.url, "huge", None, 10_000)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["x-maitre-arm"], "shortest-first");
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("4096"), "{body}");

    // One slot: a long request holds it; then a long and a short one wait,
    // and the short one goes first although it came later.
    let first = tokio::spawn(generate(&c, &m.url, "first", None, 20).send());
    fake.wait_for("first", EventKind::Started, T).await.unwrap();
    let long = tokio::spawn(generate(&c, &m.url, "long", None, 300).send());
    tokio::time::sleep(Duration::from_millis(30)).await;
    let short = tokio::spawn(generate(&c, &m.url, "short", None, 3).send());
    for t in [first, short, long] {
        assert_eq!(t.await.unwrap().unwrap().status(), 200);
    }
    let order = start_order(&fake.log());
    assert_eq!(order, ["first", "short", "long"], "start order");
    assert!(fake.log().iter().all(|e| e.tag.as_deref() != Some("huge")));
    let s = m.status().await;
    assert_eq!(s["arms"][0]["fallback"], false, "{s}");
}
