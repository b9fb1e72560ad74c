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
    run_python("clients.py", &m.url, &[], "python clients ok").await;
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
