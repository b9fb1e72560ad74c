//! Live policy control through the real binary, one topic per module:
//! [`reload`] hot reload of the policy file and its plugin files (under load,
//! and when the change is broken); [`ab`] the A/B split, its weights and
//! `maitre ab`; [`admin`] the admin API (metrics parsed by the real Prometheus
//! parsers, the bearer token); [`watch`] the reload watcher against busy
//! neighbours, ConfigMap symlink swaps and remade plugin folders. This file
//! holds what they share.

mod ab;
mod admin;
mod reload;
mod watch;

use std::time::{Duration, Instant};

use crate::common::*;
use maitre::builtins::built_plugin_path;
use serde_json::Value;
use sha2::Digest;

const T: Duration = Duration::from_secs(30);
const TOKEN: &str = "live-test-token";

/// A policy file with `admin_token = TOKEN` on `slots` slots; add the arms.
fn live_policy(upstream: &str, slots: u32) -> PolicyFile {
    PolicyFile::new(upstream, slots).admin_token(TOKEN)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

fn plugin_bytes(name: &str) -> Vec<u8> {
    std::fs::read(built_plugin_path(name)).expect("built plugin")
}

async fn status(m: &Maitre) -> Value {
    m.status().await
}

/// Polls `/status` until `pred` holds; panics with the last status otherwise.
async fn wait_status(m: &Maitre, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + T;
    loop {
        let s = status(m).await;
        if pred(&s) {
            return s;
        }
        if Instant::now() > end {
            panic!(
                "timed out waiting for {what}; /status:\n{s:#}\nlog:\n{}",
                m.logs().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn arm<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["arms"]
        .as_array()
        .expect("arms")
        .iter()
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| panic!("no arm {name} in {status:#}"))
}

async fn post_reload(m: &Maitre, token: Option<&str>) -> (u16, Value) {
    let mut r = client().post(format!("{}/reload", m.admin));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.expect("POST /reload");
    (r.status().as_u16(), r.json().await.expect("JSON"))
}

async fn put_weight(m: &Maitre, arm: &str, body: Value, token: Option<&str>) -> (u16, Value) {
    let mut r = client()
        .put(format!("{}/policies/{arm}/weight", m.admin))
        .json(&body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.expect("PUT weight");
    (r.status().as_u16(), r.json().await.expect("JSON"))
}
