//! Shared helpers of the end-to-end tests: start the real `maitre` binary
//! against the fake Ollama, on loopback ports the OS picks, and talk HTTP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use fake_ollama::{EventKind, FakeConfig, FakeOllama, LogEvent};

pub mod hostile_plugins;

/// A running `maitre serve` process; killed on drop.
pub struct Maitre {
    child: Child,
    /// `http://127.0.0.1:PORT` of the client listener.
    pub url: String,
    /// `http://127.0.0.1:PORT` of the admin listener.
    pub admin: String,
    /// Folder holding the policy file (and anything the test puts there).
    pub dir: tempfile::TempDir,
    /// The policy file.
    pub policy: PathBuf,
    logs: Arc<Mutex<Vec<String>>>,
}

/// A policy file with one arm.
pub fn policy(upstream: &str, slots: u32, plugin: &str, config: &str) -> String {
    format!(
        r#"listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[upstream]
url = "{upstream}"
slots = {slots}

[[policy]]
name = "main"
plugin = "{plugin}"
[policy.config]
{config}
"#
    )
}

/// The default plugin with the field configuration.
pub fn reserved_aging(upstream: &str, slots: u32, config: &str) -> String {
    policy(upstream, slots, "builtin:reserved-aging", config)
}

fn field_after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let i = line.find(key)?;
    line[i + key.len()..].split_whitespace().next()
}

impl Maitre {
    /// Writes `policy_text` to a temp folder and starts `maitre serve` on it.
    pub fn start(policy_text: &str) -> Maitre {
        Self::start_with(policy_text, &[])
    }

    /// Same, with extra command-line arguments.
    pub fn start_with(policy_text: &str, args: &[&str]) -> Maitre {
        let dir = tempfile::tempdir().expect("temp dir");
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, policy_text).expect("write policy");
        Self::spawn(dir, policy, args)
    }

    /// Starts `maitre serve` on a policy file already in `dir`.
    pub fn spawn(dir: tempfile::TempDir, policy: PathBuf, args: &[&str]) -> Maitre {
        let mut child = Command::new(env!("CARGO_BIN_EXE_maitre"))
            .arg("serve")
            .arg("--policy")
            .arg(&policy)
            .args(args)
            .env("MAITRE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start maitre");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                let mut listen = None;
                let mut admin = None;
                let mut sent = false;
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if std::env::var_os("MAITRE_TEST_ECHO").is_some() {
                        eprintln!("[maitre] {line}");
                    }
                    if line.contains("maitre serving") {
                        listen = field_after(&line, "listen=").map(str::to_string);
                    }
                    if line.contains("admin API serving") {
                        admin = field_after(&line, "admin=").map(str::to_string);
                    }
                    if !sent && listen.is_some() && admin.is_some() {
                        let _ = tx.send((listen.clone().unwrap(), admin.clone().unwrap()));
                        sent = true;
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let (listen, admin) = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(x) => x,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "maitre did not start; its log:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        Maitre {
            child,
            url: format!("http://{listen}"),
            admin: format!("http://{admin}"),
            dir,
            policy,
            logs,
        }
    }

    /// Everything maitre logged so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Waits until a log line satisfies `pred`.
    pub async fn wait_log(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.logs().iter().any(|l| pred(l)) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Sends SIGTERM (graceful shutdown) and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let end = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!("maitre did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Maitre {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP client that never goes through a proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

/// Starts a fake Ollama with `slots` slots and `token_ms` per token.
pub async fn fake(slots: usize, token_ms: u64) -> FakeOllama {
    FakeOllama::start(FakeConfig {
        slots,
        token_delay: Duration::from_millis(token_ms),
        ..FakeConfig::default()
    })
    .await
    .expect("start fake ollama")
}

/// A non-streaming `/api/generate` with a tag, priority and token count.
pub fn generate(
    c: &reqwest::Client,
    base: &str,
    tag: &str,
    priority: Option<&str>,
    tokens: u64,
) -> reqwest::RequestBuilder {
    let mut r = c
        .post(format!("{base}/api/generate"))
        .header("x-test-tag", tag)
        .json(&serde_json::json!({"model": "fake", "prompt": "hi", "stream": false, "options": {"num_predict": tokens}}));
    if let Some(p) = priority {
        r = r.header("x-priority", p);
    }
    r
}

/// The `seq` of the first `kind` event of the request tagged `tag`.
pub fn seq_of(log: &[LogEvent], tag: &str, kind: EventKind) -> Option<u64> {
    log.iter()
        .find(|e| e.kind == kind && e.tag.as_deref() == Some(tag))
        .map(|e| e.seq)
}

/// Tags in the order their requests started upstream.
pub fn start_order(log: &[LogEvent]) -> Vec<String> {
    log.iter()
        .filter(|e| e.kind == EventKind::Started)
        .filter_map(|e| e.tag.clone())
        .collect()
}

/// The Python that has the official clients and prometheus_client:
/// MAITRE_PYTHON, else the venv `.ci/run` creates in target/pyenv.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("MAITRE_PYTHON") {
        return p.into();
    }
    let venv = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/pyenv/bin/python"
    ));
    assert!(
        venv.exists(),
        "no Python with the test packages: run .ci/run (it creates target/pyenv), or set MAITRE_PYTHON to a python with `pip install -r tests/python/requirements.txt`"
    );
    venv
}
