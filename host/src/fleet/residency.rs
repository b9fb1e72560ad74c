//! Which models a backend has loaded, as the host knows it: from the
//! backend's own `/api/ps` (polled) and from maitre's traffic (a request that
//! just completed there means its model is loaded there), with each model's
//! size and expiry when `/api/ps` gave them.
//!
//! The view is a belief, corrected by every poll: between two polls, a model
//! that appears by traffic may push out the least recently used one when the
//! backend is at its `max_loaded_models`, the way Ollama evicts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Ollama's name for a model: `llama3` is `llama3:latest`; the tag is what
/// follows the last `:` after the last `/` (a registry port is not a tag).
pub fn model_key(model: &str) -> Arc<str> {
    let base = model.rsplit('/').next().unwrap_or(model);
    if base.contains(':') || model.is_empty() {
        Arc::from(model)
    } else {
        Arc::from(format!("{model}:latest"))
    }
}

/// One model loaded on a backend, as `/api/ps` reports it (`size` and
/// `size_vram` in bytes, `expires_at` as RFC 3339), or as traffic showed it
/// (then without size or expiry until the next poll).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PsModel {
    /// The model's name (`name`, else `model`, in `/api/ps`).
    #[serde(default)]
    pub name: String,
    /// Resident bytes (weights plus KV cache).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Of which on the GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_vram: Option<u64>,
    /// When Ollama will unload it if it stays idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// Reads an `/api/ps` answer: `{"models":[{name, model, size, size_vram,
/// expires_at, ...}]}`. Unknown fields are ignored.
pub fn parse_ps(body: &[u8]) -> Result<Vec<PsModel>, serde_json::Error> {
    #[derive(Deserialize)]
    struct Entry {
        #[serde(default)]
        name: String,
        #[serde(default)]
        model: String,
        size: Option<u64>,
        size_vram: Option<u64>,
        expires_at: Option<String>,
    }
    #[derive(Deserialize)]
    struct Ps {
        #[serde(default)]
        models: Vec<Entry>,
    }
    let ps: Ps = serde_json::from_slice(body)?;
    Ok(ps
        .models
        .into_iter()
        .map(|e| PsModel {
            name: if e.name.is_empty() { e.model } else { e.name },
            size: e.size,
            size_vram: e.size_vram,
            expires_at: e.expires_at,
        })
        .filter(|m| !m.name.is_empty())
        .collect())
}

/// The host's knowledge of one loaded model.
#[derive(Debug, Clone)]
struct Resident {
    ps: PsModel,
    /// When Ollama will unload it, parsed from `expires_at`.
    expires: Option<SystemTime>,
    /// Last time the host saw it in use (a completion, or a poll).
    last_used: Instant,
    /// Learned from traffic after the last poll was sent (a poll answer
    /// older than that does not erase it).
    noted_at: Option<Instant>,
}

/// The models one backend has loaded.
#[derive(Debug, Default)]
pub struct Residency {
    models: BTreeMap<Arc<str>, Resident>,
    /// A poll has been applied once (models seen in the first poll were
    /// loaded before maitre looked: not counted as loads).
    polled: bool,
}

impl Residency {
    /// Whether `model` (a [`model_key`]) is loaded, and not past its expiry.
    pub fn has(&self, model: &str) -> bool {
        self.models.get(model).is_some_and(|r| {
            r.expires
                .is_none_or(|t| t > SystemTime::now() || r.noted_at.is_some())
        })
    }

    /// The loaded models' names.
    pub fn names(&self) -> impl Iterator<Item = &Arc<str>> {
        self.models.keys()
    }

    /// How many models are loaded.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// Every loaded model not past its expiry: name, size in bytes (0 when
    /// unknown) and the time left before it expires (None when unknown).
    pub fn loaded(&self) -> Vec<(Arc<str>, u64, Option<std::time::Duration>)> {
        let now = SystemTime::now();
        self.models
            .iter()
            .filter(|(k, _)| self.has(k))
            .map(|(k, r)| {
                let left = r.expires.map(|t| t.duration_since(now).unwrap_or_default());
                (k.clone(), r.ps.size.unwrap_or(0), left)
            })
            .collect()
    }

    /// Every loaded model, as `/status` shows it.
    pub fn snapshot(&self) -> Vec<PsModel> {
        self.models.values().map(|r| r.ps.clone()).collect()
    }

    /// A request for `model` completed on this backend: it is loaded here.
    /// Returns true when that is news (a load the host had not seen). At
    /// `max_loaded`, the least recently used model not in `busy` is taken
    /// out, as Ollama would have evicted it.
    pub fn note_used(
        &mut self,
        model: &Arc<str>,
        max_loaded: usize,
        busy: &dyn Fn(&str) -> bool,
    ) -> bool {
        let now = Instant::now();
        if let Some(r) = self.models.get_mut(model) {
            r.last_used = now;
            r.noted_at = Some(now);
            return false;
        }
        self.models.insert(
            model.clone(),
            Resident {
                ps: PsModel {
                    name: model.to_string(),
                    size: None,
                    size_vram: None,
                    expires_at: None,
                },
                expires: None,
                last_used: now,
                noted_at: Some(now),
            },
        );
        while self.models.len() > max_loaded.max(1) {
            let victim = self
                .models
                .iter()
                .filter(|(k, _)| *k != model && !busy(k))
                .min_by_key(|(_, r)| r.last_used)
                .map(|(k, _)| k.clone());
            match victim {
                Some(k) => {
                    self.models.remove(&k);
                }
                None => break,
            }
        }
        true
    }

    /// Applies an `/api/ps` answer to a poll sent at `sent_at`: it replaces
    /// the view, except for models traffic showed after the poll was sent.
    /// Returns how many models are new since the last poll (loads seen; none
    /// on the first poll).
    pub fn apply_poll(&mut self, sent_at: Instant, models: Vec<PsModel>) -> usize {
        let now = Instant::now();
        let mut next: BTreeMap<Arc<str>, Resident> = BTreeMap::new();
        let mut loads = 0;
        for ps in models {
            let key = model_key(&ps.name);
            let old = self.models.get(&key);
            if old.is_none() && self.polled {
                loads += 1;
            }
            next.insert(
                key,
                Resident {
                    expires: ps.expires_at.as_deref().and_then(parse_time),
                    last_used: old.map_or(now, |o| o.last_used),
                    noted_at: None,
                    ps,
                },
            );
        }
        for (k, r) in std::mem::take(&mut self.models) {
            if r.noted_at.is_some_and(|t| t > sent_at) && !next.contains_key(&k) {
                next.insert(k, r);
            }
        }
        self.models = next;
        self.polled = true;
        loads
    }
}

/// An RFC 3339 time as Ollama writes it (`2026-08-01T12:00:00.123456-07:00`).
fn parse_time(s: &str) -> Option<SystemTime> {
    let ts: jiff::Timestamp = s.parse().ok()?;
    Some(SystemTime::from(ts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_keys_follow_ollama_names() {
        assert_eq!(&*model_key("llama3"), "llama3:latest");
        assert_eq!(&*model_key("llama3:8b"), "llama3:8b");
        assert_eq!(&*model_key("host:5000/ns/m"), "host:5000/ns/m:latest");
        assert_eq!(&*model_key(""), "");
    }

    #[test]
    fn ps_answers_are_read_with_size_and_expiry() {
        let body = br#"{"models":[{"name":"a:latest","model":"a:latest","size":5,"size_vram":4,
            "digest":"x","details":{},"expires_at":"2099-01-01T00:00:00.5-07:00","context_length":4096},
            {"model":"b:1"}]}"#;
        let v = parse_ps(body).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].size, v[0].size_vram), (Some(5), Some(4)));
        assert_eq!(v[1].name, "b:1");
        let mut r = Residency::default();
        assert_eq!(
            r.apply_poll(Instant::now(), v),
            0,
            "the first poll counts no load"
        );
        assert!(r.has("a:latest") && r.has("b:1"));
        assert!(parse_time("2099-01-01T00:00:00.5-07:00").is_some());
        // An expired model is not counted as loaded.
        let old = PsModel {
            name: "c".into(),
            size: None,
            size_vram: None,
            expires_at: Some("2001-01-01T00:00:00Z".into()),
        };
        assert_eq!(r.apply_poll(Instant::now(), vec![old]), 1);
        assert!(!r.has("c:latest") && !r.has("a:latest"));
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_adds_models_and_evicts_the_least_recently_used() {
        let mut r = Residency::default();
        let idle = |_: &str| false;
        assert!(r.note_used(&model_key("a"), 2, &idle));
        tokio::time::advance(std::time::Duration::from_millis(1)).await;
        assert!(r.note_used(&model_key("b"), 2, &idle));
        tokio::time::advance(std::time::Duration::from_millis(1)).await;
        assert!(!r.note_used(&model_key("a"), 2, &idle), "a is known");
        tokio::time::advance(std::time::Duration::from_millis(1)).await;
        assert!(r.note_used(&model_key("c"), 2, &idle));
        let names: Vec<&str> = r.names().map(|n| &**n).collect();
        assert_eq!(names, ["a:latest", "c:latest"], "b was used least recently");
        // A model in use is never the one pushed out.
        let a_busy = |m: &str| m == "a:latest";
        r.note_used(&model_key("d"), 2, &a_busy);
        let names: Vec<&str> = r.names().map(|n| &**n).collect();
        assert_eq!(names, ["a:latest", "d:latest"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_poll_sent_before_a_completion_does_not_erase_it() {
        let mut r = Residency::default();
        let sent = Instant::now();
        tokio::time::advance(std::time::Duration::from_millis(5)).await;
        r.note_used(&model_key("late"), 3, &|_| false);
        r.apply_poll(sent, vec![]);
        assert!(r.has("late:latest"));
        r.apply_poll(Instant::now(), vec![]);
        assert!(!r.has("late:latest"), "a later poll is the truth");
    }
}
