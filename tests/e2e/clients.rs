//! The official Python clients (`ollama`, `openai`) work through maitre.
//!
//! `.ci/run` installs them into `target/pyenv`; set MAITRE_PYTHON to use
//! another interpreter that has them (see tests/python/requirements.txt).

use crate::common::*;

#[tokio::test]
async fn official_python_clients_work_through_maitre() {
    let fake = fake(2, 5).await;
    let m = start(
        &PolicyFile::new(fake.url(), 2)
            .arm(Arm::builtin("main", "reserved-aging").config("rt_reserved_slots", 1)),
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/python/clients.py");
    let out = tokio::process::Command::new(python())
        .arg(script)
        .env("MAITRE_URL", &m.url)
        .env("NO_PROXY", "127.0.0.1")
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python clients failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("python clients ok"), "{stdout}");
    // They really went through maitre's scheduler.
    let scheduled = fake
        .log()
        .iter()
        .filter(|e| e.kind == EventKind::Started)
        .count();
    assert!(
        scheduled >= 6,
        "only {scheduled} scheduled requests reached the fake"
    );
    assert!(
        m.logs()
            .iter()
            .filter(|l| l.contains("request ended"))
            .count()
            >= 6
    );
}
