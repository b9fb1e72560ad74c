//! Untrusted plugins: each hostile plugin of `plugins/hostile/` is loaded by
//! the real binary under a load of mixed requests. Whatever the plugin does,
//! every request gets a defined answer, the upstream never sees more requests
//! than slots, and the fault is ejected, logged and counted with its exact
//! kind (the way Spin's tests assert the exact trap of each hostile guest).
//!
//! Set `MAITRE_HOSTILE_REPORT=1` to print one line per plugin: requests sent,
//! answered and lost, and how long the faulty call ran.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::hostile_plugins::hostile_plugin;
use crate::common::*;
use serde_json::Value;

pub(crate) const T: Duration = Duration::from_secs(30);
/// Requests per load.
pub(crate) const N: usize = 30;
pub(crate) const SLOTS: u32 = 2;
/// Short limits keep every case quick: a 20 ms CPU budget per call, a
/// starvation watchdog at 300 ms checked every 50 ms.
pub(crate) fn limits() -> Limits {
    Limits {
        plugin_call_ms: Some(20),
        starvation_ms: Some(300),
        tick_ms: Some(50),
        ..Limits::default()
    }
}

/// Copies a hostile plugin (built on first use) into `dir` and returns the
/// copy's absolute path. Each maitre gets a private copy: maitre
/// watches its plugin's folder, and must not see other tests open the shared
/// build output.
pub(crate) fn wasm(crate_name: &str, dir: &Path) -> String {
    let built = hostile_plugin(crate_name);
    let copy = dir.join(format!("{crate_name}.wasm"));
    std::fs::copy(&built, &copy).unwrap();
    copy.display().to_string()
}

/// Starts maitre on a policy file and a private copy of `plugin` in a temp folder.
pub(crate) fn start_plugin(
    upstream: &str,
    plugin: &str,
    config: toml::Table,
    limits: Limits,
) -> Maitre {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("policy.toml");
    policy_with(upstream, &wasm(plugin, dir.path()), config, limits).write(&file);
    serve().policy_in(dir, file).start()
}

/// A one-arm policy file on [`SLOTS`] slots running the plugin file `plugin`.
pub(crate) fn policy_with(
    upstream: &str,
    plugin: &str,
    config: toml::Table,
    limits: Limits,
) -> PolicyFile {
    PolicyFile::new(upstream, SLOTS)
        .limits(limits)
        .arm(Arm::new("main", plugin).configs(config))
}

/// One request of the mixed load: generate or chat, streamed or not,
/// realtime, batch or no priority.
fn mixed(c: &reqwest::Client, base: &str, i: usize) -> reqwest::RequestBuilder {
    let stream = i.is_multiple_of(2);
    let (path, body) = if i.is_multiple_of(3) {
        (
            "/api/chat",
            serde_json::json!({"model": "fake", "stream": stream,
                "messages": [{"role": "user", "content": "hi"}],
                "options": {"num_predict": 3}}),
        )
    } else {
        (
            "/api/generate",
            serde_json::json!({"model": "fake", "prompt": "hi", "stream": stream,
                "options": {"num_predict": 3}}),
        )
    };
    let mut r = c
        .post(format!("{base}{path}"))
        .header("x-test-tag", format!("r{i}"))
        .json(&body);
    match i % 5 {
        0 => r = r.header("x-priority", "realtime"),
        1 | 2 => r = r.header("x-priority", "batch"),
        _ => {}
    }
    r
}

/// How one request ended, as its client saw it.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    /// A 200 whose last JSON object (the last NDJSON line of a stream) has `"done": true`.
    pub(crate) done: bool,
    pub(crate) body: String,
}

/// Sends `n` mixed requests at once and collects every answer.
pub(crate) async fn load(m: &Maitre, n: usize) -> Vec<Answer> {
    let c = client();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let req = mixed(&c, &m.url, i);
            tokio::spawn(async move {
                let r = req.send().await.expect("maitre answers");
                let status = r.status().as_u16();
                let body = r.text().await.unwrap_or_default();
                let last = body.lines().rev().find(|l| !l.trim().is_empty());
                let done = status == 200
                    && last
                        .and_then(|l| serde_json::from_str::<Value>(l).ok())
                        .is_some_and(|v| v["done"] == true);
                Answer { status, done, body }
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(
            tokio::time::timeout(T, t)
                .await
                .expect("answered in time")
                .unwrap(),
        );
    }
    out
}

/// The arm `main` in `/status`.
pub(crate) async fn arm_status(m: &Maitre) -> Value {
    m.status().await["arms"][0].clone()
}

/// What a case produced.
pub(crate) struct Run {
    pub(crate) m: Maitre,
    pub(crate) fake: UpstreamModel,
    pub(crate) answers: Vec<Answer>,
    pub(crate) metrics: Scrape,
    pub(crate) arm: Value,
}

/// Starts maitre with `plugin` (a crate of the plugins workspace) and
/// `config`, sends the load and collects what maitre and the fake saw.
pub(crate) async fn run(plugin: &str, config: toml::Table, limits: Limits) -> Run {
    let fake = fake(SLOTS as usize, 5).await;
    let m = start_plugin(&fake.url(), plugin, config, limits);
    let answers = load(&m, N).await;
    let metrics = Scrape::get(&m.admin).await;
    let arm = arm_status(&m).await;
    Run {
        m,
        fake,
        answers,
        metrics,
        arm,
    }
}

impl Run {
    /// Every request got a 200 with a final `done` object, reached the
    /// upstream exactly once, and the upstream never ran more than its slots.
    pub(crate) fn assert_all_served(&self) {
        for (i, a) in self.answers.iter().enumerate() {
            assert!(
                a.done,
                "request r{i} got {} {:?}; maitre's log:\n{}",
                a.status,
                a.body,
                self.m.logs().join("\n")
            );
        }
        self.assert_slot_bound();
        let log = self.fake.log();
        for i in 0..N {
            let tag = format!("r{i}");
            let started = log
                .iter()
                .filter(|e| e.kind == EventKind::Started && e.tag.as_deref() == Some(&tag))
                .count();
            assert_eq!(started, 1, "{tag} started upstream {started} times");
        }
    }

    fn assert_slot_bound(&self) {
        assert!(
            self.fake.max_concurrent() <= SLOTS as usize,
            "the upstream ran {} requests at once with {SLOTS} slots",
            self.fake.max_concurrent()
        );
    }

    /// The plugin was ejected exactly once, for `kind`: counted, shown in
    /// `/status` with a `last_error` containing every one of `needles`, logged.
    pub(crate) async fn assert_ejected(&self, kind: &str, needles: &[&str]) {
        let faults = |k: &str| {
            self.metrics.sum(
                "maitre_plugin_faults_total",
                &[("arm", "main"), ("kind", k)],
            )
        };
        assert_eq!(
            faults(kind),
            1.0,
            "plugin_faults{{kind={kind}}}:\n{}",
            self.metrics
        );
        let all = self
            .metrics
            .sum("maitre_plugin_faults_total", &[("arm", "main")]);
        assert_eq!(all, 1.0, "one fault, one kind:\n{}", self.metrics);
        assert_eq!(self.arm["fallback"], true, "{}", self.arm);
        let last = self.arm["last_error"].as_str().unwrap_or_default();
        assert!(last.starts_with("ejected: "), "{last}");
        for n in needles {
            assert!(last.contains(n), "last_error {last:?} lacks {n:?}");
        }
        // Nothing reinstated the plugin behind the test's back.
        assert!(
            !self.m.logs().iter().any(|l| l.contains("policy reloaded")),
            "unexpected reload:\n{}",
            self.m.logs().join("\n")
        );
        let line = format!("fault=\"{kind}\"");
        assert!(
            self.m
                .wait_log(T, |l| l.contains("policy plugin ejected")
                    && l.contains(&line))
                .await,
            "no ejection log line with {line}; log:\n{}",
            self.m.logs().join("\n")
        );
    }

    /// The plugin is still serving: no fault, not in fallback.
    pub(crate) fn assert_not_ejected(&self) {
        let all = self
            .metrics
            .sum("maitre_plugin_faults_total", &[("arm", "main")]);
        assert_eq!(all, 0.0, "{}", self.metrics);
        assert_eq!(self.arm["fallback"], false, "{}", self.arm);
        assert!(
            !self
                .m
                .logs()
                .iter()
                .any(|l| l.contains("policy plugin ejected"))
        );
    }

    fn invalid(&self, kind: &str) -> f64 {
        self.metrics.sum(
            "maitre_plugin_invalid_actions_total",
            &[("arm", "main"), ("kind", kind)],
        )
    }

    /// Seconds spent in the plugin's `call` calls (sum, count) from the histogram.
    fn call_seconds(&self, call: &str) -> (f64, f64) {
        let l = [("arm", "main"), ("kind", call)];
        (
            self.metrics.sum("maitre_plugin_call_seconds_sum", &l),
            self.metrics.sum("maitre_plugin_call_seconds_count", &l),
        )
    }

    /// One report line (printed with `MAITRE_HOSTILE_REPORT=1`).
    pub(crate) fn report(&self, name: &str) {
        if std::env::var_os("MAITRE_HOSTILE_REPORT").is_none() {
            return;
        }
        let answered = self.answers.iter().filter(|a| a.status > 0).count();
        let done = self.answers.iter().filter(|a| a.done).count();
        let (admit_s, admit_n) = self.call_seconds("admit");
        let (sched_s, sched_n) = self.call_seconds("schedule");
        eprintln!(
            "HOSTILE {name}: sent={N} answered={answered} done={done} lost={} max_upstream_concurrency={} \
             admit_calls={admit_n} admit_ms={:.1} schedule_calls={sched_n} schedule_ms={:.1} last_error={}",
            N - answered,
            self.fake.max_concurrent(),
            admit_s * 1000.0,
            sched_s * 1000.0,
            self.arm["last_error"]
        );
    }
}

/// "stopped after N ms" in a timeout's `last_error`.
pub(crate) fn stopped_after_ms(last_error: &str) -> u64 {
    let tail = last_error
        .split("stopped after ")
        .nth(1)
        .unwrap_or_else(|| panic!("no 'stopped after' in {last_error:?}"));
    tail.split(' ').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn loop_in_schedule_is_stopped_by_the_cpu_budget() {
    // Three good decisions first, so requests are running when it hangs.
    let r = run("hostile-loop", toml::toml! { after_calls = 3 }, limits()).await;
    r.report("loop(schedule)");
    r.assert_all_served();
    r.assert_ejected("timeout", &["20 ms CPU budget", "stopped after"])
        .await;
    // 20 ticks of a 1 ms ticker that sleeps at least 1 ms between ticks.
    let ran = stopped_after_ms(r.arm["last_error"].as_str().unwrap());
    assert!(ran >= 20, "stopped before its budget: {ran} ms");
    let (_, calls) = r.call_seconds("schedule");
    assert!(calls >= 4.0, "3 good calls and the loop: {calls}");
}

#[tokio::test]
async fn loop_in_admit_is_stopped_and_the_request_still_admitted() {
    let r = run(
        "hostile-loop",
        toml::toml! { call = "admit" after_calls = 2 },
        limits(),
    )
    .await;
    r.report("loop(admit)");
    r.assert_all_served();
    r.assert_ejected("timeout", &["20 ms CPU budget"]).await;
    let ejection =
        r.m.logs()
            .into_iter()
            .find(|l| l.contains("policy plugin ejected"))
            .unwrap();
    assert!(ejection.contains("during=\"admit\""), "{ejection}");
    // The request whose admit hung was admitted by the fallback: all N were
    // queued and answered (assert_all_served), none rejected.
    assert_eq!(
        r.metrics
            .sum("maitre_requests_total", &[("outcome", "rejected")]),
        0.0
    );
}

#[tokio::test]
async fn memory_bomb_is_stopped_at_the_memory_cap() {
    let r = run(
        "hostile-memory-bomb",
        toml::toml! { after_calls = 2 },
        Limits {
            plugin_memory_mib: Some(16),
            ..limits()
        },
    )
    .await;
    r.report("memory-bomb(schedule)");
    r.assert_all_served();
    r.assert_ejected("memory", &["16 MiB memory cap"]).await;
}

#[tokio::test]
async fn memory_bomb_in_admit_is_stopped_and_the_request_still_admitted() {
    let r = run(
        "hostile-memory-bomb",
        toml::toml! { call = "admit" },
        Limits {
            plugin_memory_mib: Some(16),
            ..limits()
        },
    )
    .await;
    r.report("memory-bomb(admit)");
    r.assert_all_served();
    r.assert_ejected("memory", &["memory cap"]).await;
}

#[tokio::test]
async fn trap_is_ejected_as_a_trap() {
    let r = run("hostile-trap", toml::toml! { after_calls = 2 }, limits()).await;
    r.report("trap(schedule)");
    r.assert_all_served();
    r.assert_ejected("trap", &["unreachable"]).await;
}

#[tokio::test]
async fn panic_is_a_trap_whose_message_reaches_last_error() {
    let r = run("hostile-panic", toml::toml! { after_calls = 1 }, limits()).await;
    r.report("panic(schedule)");
    // The panic message went to the guest's stderr (a WASI write under
    // tokio) without taking the host down: everything was served.
    r.assert_all_served();
    r.assert_ejected(
        "trap",
        &[
            "unreachable",
            "plugin stderr:",
            "hostile-panic: deliberate panic in schedule",
        ],
    )
    .await;
}

#[tokio::test]
async fn panic_in_admit_is_ejected_and_the_request_still_admitted() {
    let r = run("hostile-panic", toml::toml! { call = "admit" }, limits()).await;
    r.report("panic(admit)");
    r.assert_all_served();
    r.assert_ejected("trap", &["hostile-panic: deliberate panic in admit"])
        .await;
}

#[tokio::test]
async fn garbage_is_refused_whole_and_ejected() {
    let r = run("hostile-garbage", toml::Table::new(), limits()).await;
    r.report("garbage(all)");
    r.assert_all_served();
    r.assert_ejected("invalid", &["invalid answer from schedule", "unknown_id"])
        .await;
    // Its first answer: a start, a pre-emption and a reject of unknown ids,
    // and the oldest request started twice.
    assert_eq!(r.invalid("unknown_id"), 3.0, "{}", r.metrics);
    assert_eq!(r.invalid("duplicate_start"), 1.0, "{}", r.metrics);
    // Its reject with status 0 was never applied: nobody got a 503.
    assert_eq!(r.invalid("bad_status"), 0.0, "{}", r.metrics);
}

#[tokio::test]
async fn garbage_unknown_id_is_ejected() {
    let r = run(
        "hostile-garbage",
        toml::toml! { mode = "unknown_id" },
        limits(),
    )
    .await;
    r.report("garbage(unknown_id)");
    r.assert_all_served();
    r.assert_ejected("invalid", &["unknown_id", "not waiting"])
        .await;
    assert_eq!(r.invalid("unknown_id"), 1.0, "{}", r.metrics);
}

#[tokio::test]
async fn garbage_duplicate_start_is_ejected() {
    let r = run(
        "hostile-garbage",
        toml::toml! { mode = "duplicate_start" },
        limits(),
    )
    .await;
    r.report("garbage(duplicate_start)");
    r.assert_all_served();
    r.assert_ejected("invalid", &["duplicate_start"]).await;
    assert!(r.invalid("duplicate_start") >= 1.0, "{}", r.metrics);
}

#[tokio::test]
async fn garbage_reject_of_running_requests_is_ejected() {
    let r = run(
        "hostile-garbage",
        toml::toml! { mode = "reject_running" },
        limits(),
    )
    .await;
    r.report("garbage(reject_running)");
    // The running requests it tried to reject were not touched.
    r.assert_all_served();
    r.assert_ejected("invalid", &["reject of request", "not waiting"])
        .await;
    assert!(r.invalid("unknown_id") >= 1.0, "{}", r.metrics);
}

#[tokio::test]
async fn garbage_nan_priority_is_ejected_in_admit() {
    let r = run(
        "hostile-garbage",
        toml::toml! { mode = "nan_priority" },
        limits(),
    )
    .await;
    r.report("garbage(nan_priority)");
    r.assert_all_served();
    r.assert_ejected("invalid", &["invalid answer from admit", "NaN"])
        .await;
    assert_eq!(r.invalid("bad_priority"), 1.0, "{}", r.metrics);
}

/// A rejection status outside 400–599 is the one piece of garbage the WIT
/// tolerates: the client gets 503 with the plugin's message, the host counts
/// it, and the plugin keeps serving.
#[tokio::test]
async fn garbage_bad_status_is_answered_503_and_counted() {
    let r = run(
        "hostile-garbage",
        toml::toml! { mode = "bad_status" },
        limits(),
    )
    .await;
    r.report("garbage(bad_status)");
    for a in &r.answers {
        assert_eq!(a.status, 503, "{:?}", a.body);
        let v: Value = serde_json::from_str(&a.body).expect("Ollama error shape");
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("hostile-garbage refuses request")),
            "{v}"
        );
    }
    assert!(r.fake.log().is_empty(), "nothing reached the upstream");
    assert_eq!(r.invalid("bad_status"), N as f64, "{}", r.metrics);
    r.assert_not_ejected();
}

/// A megabyte of rejection message is cut to 1 KiB before it is held for,
/// and sent to, the client; counted, not ejected.
#[tokio::test]
async fn garbage_long_message_is_cut_and_counted() {
    let r = run(
        "hostile-garbage",
        toml::toml! { mode = "long_message" },
        limits(),
    )
    .await;
    r.report("garbage(long_message)");
    for a in &r.answers {
        assert_eq!(a.status, 429);
        let v: Value = serde_json::from_str(&a.body).expect("Ollama error shape");
        let e = v["error"].as_str().unwrap();
        assert!(e.starts_with("hostile-garbage: xxx"), "{e}");
        assert!(e.len() <= 1024, "{} bytes", e.len());
    }
    assert_eq!(r.invalid("long_message"), N as f64, "{}", r.metrics);
    r.assert_not_ejected();
}

#[tokio::test]
async fn start_everything_is_refused_and_ejected() {
    let r = run("hostile-start-everything", toml::Table::new(), limits()).await;
    r.report("start-everything");
    r.assert_all_served();
    r.assert_ejected("invalid", &["no_free_slot", "free slot"])
        .await;
    assert!(r.invalid("no_free_slot") >= 1.0, "{}", r.metrics);
}

#[tokio::test]
async fn starvation_is_ejected_by_the_watchdog() {
    let r = run("hostile-starve", toml::Table::new(), limits()).await;
    r.report("starve");
    r.assert_all_served();
    r.assert_ejected("starvation", &["starvation:", "every slot of the arm idle"])
        .await;
}

#[tokio::test]
async fn a_million_actions_are_refused_unread_and_ejected() {
    // Room for the million actions in the plugin's memory, so the answer
    // (not the memory cap) is what gets it ejected.
    let r = run(
        "hostile-huge",
        toml::Table::new(),
        Limits {
            plugin_memory_mib: Some(256),
            plugin_call_ms: Some(500),
            ..limits()
        },
    )
    .await;
    r.report("huge");
    r.assert_all_served();
    r.assert_ejected("invalid", &["too_many_actions", "1000000 actions"])
        .await;
    assert_eq!(r.invalid("too_many_actions"), 1.0, "{}", r.metrics);
}

/// A plugin that faults in `init` is refused before it serves: `maitre check`
/// exits non-zero and says why.
#[test]
fn faults_in_init_refuse_the_load() {
    for (plugin, needle) in [
        ("hostile-loop", "CPU budget"),
        ("hostile-memory-bomb", "memory cap"),
        ("hostile-panic", "hostile-panic: deliberate panic in init"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.toml");
        std::fs::write(
            &file,
            policy_with(
                "http://127.0.0.1:9",
                &wasm(plugin, dir.path()),
                toml::toml! { call = "init" },
                Limits {
                    plugin_memory_mib: Some(16),
                    ..limits()
                },
            )
            .to_toml(),
        )
        .unwrap();
        let out = std::process::Command::new(BIN)
            .arg("check")
            .arg(&file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{plugin}: {err}");
        assert!(err.contains(needle), "{plugin}: {err}");
    }
}

/// Replaces `to` with `from` atomically (write a temp file, rename), as an
/// editor or a deploy would.
fn replace_file(from: &Path, to: &Path) {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

#[tokio::test]
async fn a_reload_restores_a_good_plugin_after_an_ejection() {
    let fake = fake(SLOTS as usize, 5).await;
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("policy.wasm");
    std::fs::copy(hostile_plugin("hostile-trap"), &plugin).unwrap();
    let file = dir.path().join("policy.toml");
    policy_with(
        &fake.url(),
        &plugin.display().to_string(),
        toml::Table::new(),
        limits(),
    )
    .write(&file);
    let m = serve().policy_in(dir, file).start();

    let first = load(&m, 10).await;
    assert!(first.iter().all(|a| a.done), "{first:?}");
    let arm = arm_status(&m).await;
    assert_eq!(arm["fallback"], true, "{arm}");
    assert!(arm["last_error"].as_str().unwrap().contains("unreachable"));

    // A good plugin replaces the file; the watcher may reload on its own,
    // POST /reload makes it certain.
    replace_file(&maitre::builtins::built_plugin_path("fifo"), &plugin);
    let reload = client()
        .post(format!("{}/reload", m.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 200, "{}", reload.text().await.unwrap());
    let arm = arm_status(&m).await;
    assert_eq!(arm["fallback"], false, "{arm}");
    assert_eq!(arm["last_error"], Value::Null, "{arm}");

    let before = Scrape::get(&m.admin).await;
    let calls = |t: &Scrape| {
        t.sum(
            "maitre_plugin_call_seconds_count",
            &[("arm", "main"), ("kind", "schedule")],
        )
    };
    let second = load(&m, 10).await;
    assert!(second.iter().all(|a| a.done), "{second:?}");
    let after = Scrape::get(&m.admin).await;
    assert!(
        calls(&after) > calls(&before),
        "the reloaded plugin decides again"
    );
    // Still the one fault from before the reload.
    assert_eq!(
        after.sum("maitre_plugin_faults_total", &[("arm", "main")]),
        1.0
    );
    assert_eq!(arm_status(&m).await["fallback"], false);
    assert!(fake.max_concurrent() <= SLOTS as usize);
    let t = Instant::now();
    assert!(
        m.wait_log(T, |l| l.contains("policy reloaded")).await,
        "reload logged within {:?}",
        t.elapsed()
    );
}
