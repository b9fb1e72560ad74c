//! The host's backend choice, the slots new starts may take, and what the
//! fleet shows a policy and `/status`.

use std::sync::Arc;

use super::*;

fn spec(name: &str, slots: u32, max_loaded: u32) -> BackendSpec {
    BackendSpec {
        max_loaded_models: max_loaded,
        ..BackendSpec::single(name, slots)
    }
}

fn fleet(specs: Vec<BackendSpec>) -> Fleet {
    Fleet::new(specs, Arc::new(Metrics::new()))
}

fn m(name: &str) -> Arc<str> {
    Arc::from(name)
}

/// Runs one request for `model` to completion on `b`: its model is then
/// loaded there.
fn served(f: &mut Fleet, b: usize, model: &str) {
    f.acquire(b, &m(model));
    f.release(b, &m(model), true);
}

#[tokio::test(start_paused = true)]
async fn a_backend_with_the_model_loaded_wins_over_a_less_busy_one() {
    let mut f = fleet(vec![spec("a", 2, 3), spec("b", 2, 3), spec("c", 2, 3)]);
    served(&mut f, 2, "llama3");
    f.acquire(2, &m("other"));
    // c is the busiest, but has llama3 loaded ("llama3" is "llama3:latest").
    assert_eq!(f.choose("llama3:latest", "/api/generate"), Some(2));
    // A model loaded nowhere: the least busy backend with room.
    assert_eq!(f.choose("mistral", "/api/generate"), Some(0));
    // A model in use (loading or loaded) counts as loaded there.
    f.acquire(1, &m("qwen"));
    assert_eq!(f.choose("qwen", "/api/generate"), Some(1));
    // Full: the loaded model's backend is no choice any more.
    f.acquire(2, &m("other"));
    assert_eq!(f.free(2), 0);
    assert_eq!(f.choose("llama3", "/api/generate"), Some(0));
}

#[tokio::test(start_paused = true)]
async fn room_to_load_comes_before_being_least_busy() {
    // a holds one model, its limit; b is busier but has room.
    let mut f = fleet(vec![spec("a", 4, 1), spec("b", 4, 2)]);
    served(&mut f, 0, "x");
    f.acquire(1, &m("y"));
    f.acquire(1, &m("y"));
    assert_eq!(
        f.choose("z", "/api/generate"),
        Some(1),
        "b can load z without evicting"
    );
    // Both full of models: the least busy by share of its slots.
    f.acquire(1, &m("w"));
    assert_eq!(f.choose("z", "/api/generate"), Some(0));
}

#[tokio::test(start_paused = true)]
async fn a_down_backend_takes_no_start_unless_every_backend_is_down() {
    let mut f = fleet(vec![spec("a", 1, 3), spec("b", 2, 3)]);
    assert_eq!(f.free_total(), 3);
    assert!(f.set_health(1, false, None));
    assert!(!f.set_health(1, false, None), "no change");
    assert_eq!((f.free(0), f.free(1), f.free_total()), (1, 0, 1));
    assert_eq!(f.choose("m", "/api/generate"), Some(0));
    assert!(f.other_healthy(1) && !f.other_healthy(0));
    // Every backend down: none is sheltered, requests fail fast instead of
    // waiting for a backend that may never come back.
    f.set_health(0, false, None);
    assert_eq!(f.free_total(), 3);
    assert!(!f.other_healthy(1));
    f.set_health(1, true, Some("0.33.0".into()));
    assert_eq!((f.free(0), f.free(1)), (0, 2));
    let st = f.status();
    assert_eq!(st[1].version.as_deref(), Some("0.33.0"));
    assert!(!st[0].healthy && st[1].healthy);
}

#[tokio::test(start_paused = true)]
async fn policies_and_status_see_every_backend() {
    let mut f = fleet(vec![spec("a", 2, 3), spec("b", 1, 1)]);
    f.acquire(0, &m("x"));
    let v = f.policy_view(0);
    assert_eq!(v.len(), 2);
    assert_eq!((v[0].max_loaded_models, v[1].max_loaded_models), (3, 1));
    assert_eq!(
        (&*v[0].name, v[0].total_slots, v[0].free_slots),
        ("a", 2, 1)
    );
    assert_eq!(
        (&*v[1].name, v[1].total_slots, v[1].free_slots),
        ("b", 1, 1)
    );
    let st = f.status();
    assert_eq!(
        (st[0].busy, st[0].running_models.clone()),
        (1, vec!["x:latest".to_string()])
    );
    f.release(0, &m("x"), true);
    let st = f.status();
    assert_eq!(st[0].busy, 0);
    assert_eq!(st[0].loaded[0].name, "x:latest");
    assert!(st[0].running_models.is_empty());
    // What a policy may be shown: loaded models, and those in use.
    f.acquire(1, &m("y"));
    assert!(f.is_healthy(1));
    assert_eq!(f.loaded(0), vec![(m("x:latest"), 0, None)]);
    assert_eq!(f.loaded(1), vec![(m("y:latest"), 0, None)]);
}

#[tokio::test(start_paused = true)]
async fn loads_are_counted_once_per_model_newly_loaded() {
    let metrics = Arc::new(Metrics::new());
    let mut f = Fleet::new(vec![spec("a", 2, 3)], metrics.clone());
    served(&mut f, 0, "x");
    served(&mut f, 0, "x");
    served(&mut f, 0, "y");
    // A failed request says nothing about residency.
    f.acquire(0, &m("z"));
    f.release(0, &m("z"), false);
    let text = metrics.encode();
    assert!(
        text.contains("maitre_backend_model_loads_total{backend=\"a\"} 2\n"),
        "{text}"
    );
    assert!(text.contains("maitre_backend_requests_total{backend=\"a\"} 4\n"));
    assert!(text.contains("maitre_backend_up{backend=\"a\"} 1\n"));
}

#[tokio::test(start_paused = true)]
async fn api_requests_go_only_to_ollama_and_listed_models_count_as_loaded() {
    let oa = |name: &str| BackendSpec {
        kind: BackendKind::OpenAi,
        ..spec(name, 2, 3)
    };
    let mut f = fleet(vec![spec("ollama", 1, 3), oa("llama"), oa("vllm")]);
    f.apply_models(2, vec!["qwen".into()]);
    // /v1 may go anywhere: to the server that lists the model first.
    assert_eq!(f.choose("qwen", "/v1/chat/completions"), Some(2));
    assert_eq!(f.choose("other", "/v1/chat/completions"), Some(0));
    // /api only to Ollama, even when it is the only one busy.
    assert_eq!(f.choose("qwen", "/api/generate"), Some(0));
    f.acquire(0, &m("qwen"));
    assert_eq!(f.choose("qwen", "/api/chat"), None);
    assert_eq!(f.free_for(1, "/api/chat"), 0);
    assert_eq!(f.free_for(1, "/v1/completions"), 2);
    assert_eq!(f.first_serving("/api/chat"), Some(0));
    // The Ollama server down: an /api request fails fast there rather than
    // going to a server that cannot answer it.
    f.release(0, &m("qwen"), true);
    f.set_health(0, false, None);
    assert_eq!(f.choose("qwen", "/api/chat"), Some(0));
    assert_eq!(f.choose("qwen", "/v1/chat/completions"), Some(2));
    // What a policy and /status see.
    let v = f.policy_view(0);
    assert_eq!(v[0].kind, BackendKind::Ollama);
    assert_eq!(v[1].kind, BackendKind::OpenAi);
    let st = f.status();
    assert_eq!(st[2].available, ["qwen"]);
    assert_eq!(serde_json::to_value(&st[1]).unwrap()["kind"], "openai");
}
