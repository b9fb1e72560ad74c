//! `maitre serve` as a child process. It is started with `--ready-file`, and
//! [`Serve::start`] returns once maitre has written that file: its plugins
//! are loaded and both listeners are bound, and the file says on which ports.
//! The log (stderr) is captured for assertions and failure messages.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::PolicyFile;

/// How long [`Serve::start`] waits for the ready file by default.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The ready file's content, as the README documents it.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Ready {
    /// The bound client listener.
    pub listen: SocketAddr,
    /// The bound admin listener, if there is one.
    pub admin: Option<SocketAddr>,
}

/// How to start `maitre serve`: the binary, the policy, extra arguments and
/// environment. The environment is the test's, minus `MAITRE_ADMIN_TOKEN`
/// (so a developer's shell cannot change a test), plus `MAITRE_LOG=info`.
#[must_use]
pub struct Serve {
    bin: PathBuf,
    dir: Option<tempfile::TempDir>,
    policy: Option<PathBuf>,
    args: Vec<OsString>,
    env: Vec<(OsString, Option<OsString>)>,
    timeout: Duration,
}

/// `maitre serve` exited before it was ready.
#[derive(Debug)]
pub struct Exited {
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it logged.
    pub log: String,
}

/// A running `maitre serve`; killed on drop.
pub struct Maitre {
    child: Child,
    /// What the ready file said.
    pub ready: Ready,
    /// `http://127.0.0.1:PORT` of the client listener.
    pub url: String,
    /// `http://127.0.0.1:PORT` of the admin listener (empty without one).
    pub admin: String,
    /// Folder holding the policy file (and anything the test puts there).
    pub dir: tempfile::TempDir,
    /// The policy file.
    pub policy: PathBuf,
    /// The ready file maitre wrote (in a folder of `dir` that maitre does not watch).
    pub ready_file: PathBuf,
    logs: Arc<Mutex<Vec<String>>>,
}

/// `http://ADDR`, with an unspecified address (`0.0.0.0`) reached on loopback.
fn url_of(addr: SocketAddr) -> String {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{addr}")
}

impl Serve {
    /// `maitre serve` with the binary at `bin` (pass
    /// `env!("CARGO_BIN_EXE_maitre")`).
    pub fn new(bin: impl Into<PathBuf>) -> Serve {
        Serve {
            bin: bin.into(),
            dir: None,
            policy: None,
            args: Vec::new(),
            env: vec![
                ("MAITRE_LOG".into(), Some("info".into())),
                ("MAITRE_ADMIN_TOKEN".into(), None),
            ],
            timeout: START_TIMEOUT,
        }
    }

    /// Serve `policy`, written to `policy.toml` in a fresh temp folder.
    pub fn policy(self, policy: &PolicyFile) -> Serve {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("policy.toml");
        policy.write(&path);
        self.policy_in(dir, path)
    }

    /// Serve the policy file `path`, which the test wrote into `dir` (the
    /// folder the returned [`Maitre`] keeps alive).
    pub fn policy_in(mut self, dir: tempfile::TempDir, path: PathBuf) -> Serve {
        self.dir = Some(dir);
        self.policy = Some(path);
        self
    }

    /// Adds command-line arguments after `serve --policy FILE`.
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Serve {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for maitre.
    pub fn env(mut self, key: &str, value: impl Into<OsString>) -> Serve {
        self.env.push((key.into(), Some(value.into())));
        self
    }

    /// How long to wait for the ready file.
    pub fn timeout(mut self, timeout: Duration) -> Serve {
        self.timeout = timeout;
        self
    }

    /// Starts maitre and waits until it is ready; panics with its log if it
    /// exits first or is not ready in time.
    pub fn start(self) -> Maitre {
        self.try_start().unwrap_or_else(|e| {
            panic!(
                "maitre exited ({}) before it was ready; its log:\n{}",
                e.status, e.log
            )
        })
    }

    /// Starts maitre and waits until it is ready, or returns how it exited
    /// (for tests of refusals). Panics if it neither exits nor gets ready in
    /// time.
    pub fn try_start(self) -> Result<Maitre, Exited> {
        let dir = self.dir.expect("Serve::policy or Serve::policy_in first");
        let policy = self.policy.expect("a policy file");
        // Not in the policy's folder: maitre watches that one for changes.
        let ready_dir = dir.path().join("run");
        std::fs::create_dir_all(&ready_dir).expect("create the ready file's folder");
        let ready_file = ready_dir.join("ready.json");
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve")
            .arg("--policy")
            .arg(&policy)
            .arg("--ready-file")
            .arg(&ready_file)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        let logs = Arc::new(Mutex::new(Vec::new()));
        let drain = {
            let logs = logs.clone();
            let stderr = child.stderr.take().expect("stderr");
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if std::env::var_os("MAITRE_TEST_ECHO").is_some() {
                        eprintln!("[maitre] {line}");
                    }
                    logs.lock().unwrap().push(line);
                }
            })
        };
        let end = Instant::now() + self.timeout;
        let ready = loop {
            if let Some(ready) = read_ready(&ready_file) {
                break ready;
            }
            if let Some(status) = child.try_wait().expect("wait for maitre") {
                let _ = drain.join();
                let log = logs.lock().unwrap().join("\n");
                return Err(Exited { status, log });
            }
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                let _ = drain.join();
                panic!(
                    "maitre wrote no ready file within {:?}; its log:\n{}",
                    self.timeout,
                    logs.lock().unwrap().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Ok(Maitre {
            child,
            url: url_of(ready.listen),
            admin: ready.admin.map(url_of).unwrap_or_default(),
            ready,
            dir,
            policy,
            ready_file,
            logs,
        })
    }
}

/// The ready file, once it exists. maitre renames a complete file into
/// place, so a file that exists but does not parse is a bug, not a race.
pub fn read_ready(path: &Path) -> Option<Ready> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("ready file {}: {e}: {text:?}", path.display())),
    )
}

impl Maitre {
    /// `GET /status` on the admin listener, as JSON (panics on a non-2xx
    /// answer, naming the status).
    pub async fn status(&self) -> serde_json::Value {
        crate::http::get_json(&crate::http::client(), &format!("{}/status", self.admin)).await
    }

    /// `GET /ab?window=60` on the admin listener, as JSON (panics on a
    /// non-2xx answer, naming the status).
    pub async fn ab(&self) -> serde_json::Value {
        crate::http::get_json(
            &crate::http::client(),
            &format!("{}/ab?window=60", self.admin),
        )
        .await
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
    pub fn terminate(&mut self) -> ExitStatus {
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

/// Resident memory of process `pid`, in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
}
