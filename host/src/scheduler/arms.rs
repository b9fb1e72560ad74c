//! Policy arms: installing them, sharing the slots between them (weighted
//! or switchback), weight changes, and which arm a new request joins.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::time::Instant;

use super::core::Core;
use super::decider::Decider;
use super::queue::Queue;
use super::report::Sample;
use super::shadow::Shadow;
use crate::config::{AbMode, PluginSource};

/// A ready-to-serve arm, built (compiled, instantiated, initialised) off the
/// request path and handed to the scheduler to swap in.
pub struct ArmSpec {
    /// Arm name.
    pub name: String,
    /// Traffic weight.
    pub weight: u32,
    /// What decides for it: the plugin instance, after a successful `init`.
    pub decider: Box<dyn Decider>,
    /// Where the plugin came from.
    pub source: PluginSource,
    /// Its sha256.
    pub sha256: String,
    /// Watches the first serving arm instead of serving ([`super::shadow`]).
    pub shadow: bool,
    /// The interface version its plugin speaks, e.g. `maitre:policy@0.2.0`.
    pub interface: &'static str,
}

/// One arm as the scheduler keeps it.
pub(super) struct Arm {
    pub(super) name: Arc<str>,
    pub(super) weight: u32,
    /// Slots it owns now (its share).
    pub(super) slots: u32,
    /// Of which held by its running (or pre-empting) requests.
    pub(super) busy: u32,
    pub(super) decider: Box<dyn Decider>,
    /// True once its plugin was ejected and [`super::Fifo`] decides.
    pub(super) fallback: bool,
    pub(super) source: PluginSource,
    pub(super) sha256: String,
    pub(super) interface: &'static str,
    pub(super) loaded_at: SystemTime,
    pub(super) last_error: Option<String>,
    pub(super) waiting: Queue,
    pub(super) running: BTreeSet<u64>,
    /// Started by the policy, waiting for a pre-empted slot to be let go.
    pub(super) handoff: VecDeque<u64>,
    /// Its requests being pre-empted (slots about to free).
    pub(super) preempting: u32,
    /// Its state changed since the policy last decided.
    pub(super) dirty: bool,
    /// Since when every slot has idled while requests wait (watchdog).
    pub(super) idle_since: Option<Instant>,
    pub(super) samples: VecDeque<Sample>,
    /// The `maitre_waiting_requests` value last published for it.
    pub(super) published_waiting: Option<usize>,
}

impl Arm {
    fn new(s: ArmSpec) -> Arm {
        Arm {
            name: s.name.into(),
            weight: s.weight,
            slots: 0,
            busy: 0,
            decider: s.decider,
            fallback: false,
            source: s.source,
            sha256: s.sha256,
            interface: s.interface,
            loaded_at: SystemTime::now(),
            last_error: None,
            waiting: Queue::default(),
            running: BTreeSet::new(),
            handoff: VecDeque::new(),
            preempting: 0,
            dirty: true,
            idle_since: None,
            samples: VecDeque::new(),
            published_waiting: None,
        }
    }

    /// Requests waiting, including those promised a pre-empted slot.
    pub(super) fn queued(&self) -> usize {
        self.waiting.len() + self.handoff.len()
    }
}

impl Core {
    /// Replaces the arms; requests of vanished arms move to the heaviest arm.
    pub(super) fn install(&mut self, specs: Vec<ArmSpec>) {
        // Shadows get no traffic: they live beside the arms, not among them.
        let (shadows, specs): (Vec<ArmSpec>, Vec<ArmSpec>) =
            specs.into_iter().partition(|s| s.shadow);
        self.shadows = shadows
            .into_iter()
            .map(|s| {
                Shadow::spawn(
                    s.name.into(),
                    s.source,
                    s.sha256,
                    s.decider,
                    self.metrics.clone(),
                )
            })
            .collect();
        let old: Vec<Arm> = std::mem::take(&mut self.arms);
        self.arms = specs.into_iter().map(Arm::new).collect();
        let heaviest = (0..self.arms.len())
            .max_by_key(|&i| self.arms[i].weight)
            .unwrap_or(0);
        let mut moved = vec![usize::MAX; old.len()];
        for (i, mut o) in old.into_iter().enumerate() {
            let to = self
                .arms
                .iter()
                .position(|a| a.name == o.name)
                .unwrap_or(heaviest);
            moved[i] = to;
            let a = &mut self.arms[to];
            if a.name == o.name {
                a.samples = std::mem::take(&mut o.samples);
            } else {
                // The vanished arm's gauge would otherwise keep its last value.
                self.metrics.set_waiting(&o.name, 0);
            }
            a.busy += o.busy;
            a.preempting += o.preempting;
            a.waiting.append(&mut o.waiting);
            a.running.append(&mut o.running);
            a.handoff.extend(o.handoff);
        }
        for e in self.entries.values_mut() {
            e.arm = moved[e.arm];
        }
        self.share_slots();
    }

    /// Changes an arm's weight; refuses to stop serving altogether.
    pub(super) fn set_weight(&mut self, arm: &str, weight: u32) -> Result<(), String> {
        let Some(i) = self.arms.iter().position(|a| *a.name == *arm) else {
            return Err(format!("no arm named {arm:?}"));
        };
        let others_idle = self
            .arms
            .iter()
            .enumerate()
            .all(|(j, a)| j == i || a.weight == 0);
        if weight == 0 && others_idle {
            return Err(format!(
                "every arm would have weight 0; at least one arm must serve (arm {arm:?} keeps weight {})",
                self.arms[i].weight
            ));
        }
        self.arms[i].weight = weight;
        self.share_slots();
        Ok(())
    }

    /// Gives each arm its share of the slots (see [`slot_shares`]). An arm
    /// left with no slot (weight 0: draining; or not its switchback turn)
    /// hands its waiting requests to the arm with the most slots, so none
    /// waits for a slot that will not come; its running requests finish
    /// where they are.
    pub(super) fn share_slots(&mut self) {
        if self.arms.is_empty() {
            return;
        }
        let weights: Vec<u32> = self.arms.iter().map(|a| a.weight).collect();
        let active = (self.ab.mode == AbMode::Switchback).then(|| self.active_switchback_arm());
        let shares = slot_shares(self.total_slots, &weights, active);
        for (a, s) in self.arms.iter_mut().zip(shares) {
            if a.slots != s {
                a.slots = s;
                a.dirty = true;
            }
        }
        let Some(to) =
            (0..self.arms.len()).max_by_key(|&i| (self.arms[i].slots, self.arms[i].weight))
        else {
            return;
        };
        for a in 0..self.arms.len() {
            if a == to || self.arms[a].slots > 0 || self.arms[a].waiting.is_empty() {
                continue;
            }
            let mut ids = std::mem::take(&mut self.arms[a].waiting);
            for id in ids.iter() {
                if let Some(e) = self.entries.get_mut(id) {
                    e.arm = to;
                }
            }
            self.arms[to].waiting.append(&mut ids);
            self.arms[to].dirty = true;
        }
    }

    /// The arm that owns the upstream in the current switchback window.
    /// Live arms (weight > 0) take turns; a cycle lasts `window_seconds` per
    /// live arm and each arm's turn is proportional to its weight, so with
    /// 50/50 and 60 s windows A serves 0–60 s, B 60–120 s, and so on.
    pub(super) fn active_switchback_arm(&self) -> usize {
        let total: u64 = self.arms.iter().map(|a| a.weight as u64).sum();
        let cycle_ms = self.switchback_cycle_ms();
        if total == 0 {
            return 0;
        }
        let pos = (self.now_ms() % cycle_ms) as u128 * total as u128 / cycle_ms as u128;
        let mut acc = 0u128;
        for (i, a) in self.arms.iter().enumerate() {
            acc += a.weight as u128;
            if pos < acc {
                return i;
            }
        }
        0
    }

    /// One switchback cycle (every live arm's turn once), at least 1 ms.
    pub(super) fn switchback_cycle_ms(&self) -> u64 {
        let live = self.arms.iter().filter(|a| a.weight > 0).count() as u64;
        ((self.ab.window_seconds * 1000.0) as u64).max(1) * live.max(1)
    }

    /// The length of arm `i`'s switchback turn, seconds.
    pub(super) fn switchback_turn_s(&self, i: usize) -> f64 {
        let total: u64 = self.arms.iter().map(|a| a.weight as u64).sum();
        let w = self.arms.get(i).map_or(0, |a| a.weight) as f64;
        self.switchback_cycle_ms() as f64 / 1000.0 * w / (total.max(1) as f64)
    }

    /// At a switchback window change the new arm takes every slot, and the
    /// requests still waiting in other arms move to it (running ones finish
    /// where they are; see [`Core::share_slots`]), so no request waits for
    /// its arm's next turn.
    pub(super) fn switchback_turn(&mut self) {
        if self.ab.mode != AbMode::Switchback || self.arms.len() < 2 {
            return;
        }
        let active = self.active_switchback_arm();
        if self.arms[active].slots == self.total_slots {
            return;
        }
        self.share_slots();
    }

    /// The arm of a new request. Weighted mode: the client key is hashed to
    /// a point in [0, 1) and each arm owns a stretch of that line as long as
    /// its share of the total weight, so one key always lands in one arm while
    /// the weights stay, and a weight change moves only the keys whose point
    /// changes owner (scaling every weight alike moves none). Switchback: the
    /// arm whose window it is.
    pub(super) fn pick_arm(&self, key: &str) -> usize {
        if self.arms.len() == 1 {
            return 0;
        }
        if self.ab.mode == AbMode::Switchback {
            return self.active_switchback_arm();
        }
        let total: u64 = self.arms.iter().map(|a| a.weight as u64).sum();
        let point = ((ab_key_hash(key) as u128 * total as u128) >> 64) as u64;
        let mut acc = 0;
        for (i, a) in self.arms.iter().enumerate() {
            acc += a.weight as u64;
            if point < acc {
                return i;
            }
        }
        0
    }
}

/// Splits `total` slots between arms of the given weights.
///
/// Weighted mode (`active` = None): each arm with a weight gets one slot, then
/// the rest go in proportion to weight (largest remainder, ties to the earlier
/// arm), so each arm schedules its own share and neither can crowd the other
/// out: the comparison measures the policies, not who grabbed the slots first.
/// Switchback (`active` = Some(i)): arm i owns every slot.
pub fn slot_shares(total: u32, weights: &[u32], active: Option<usize>) -> Vec<u32> {
    let n = weights.len();
    let mut shares = vec![0u32; n];
    if let Some(i) = active {
        if i < n {
            shares[i] = total;
        }
        return shares;
    }
    let live: Vec<usize> = (0..n).filter(|&i| weights[i] > 0).collect();
    let total_w: u64 = live.iter().map(|&i| weights[i] as u64).sum::<u64>().max(1);
    // Proportional shares, largest remainder first (ties to the earlier arm)...
    let mut left = total;
    let mut rems: Vec<(u64, usize)> = Vec::new();
    for &i in &live {
        let exact = total as u64 * weights[i] as u64;
        let whole = (exact / total_w) as u32;
        shares[i] = whole;
        left -= whole;
        rems.push((exact % total_w, i));
    }
    rems.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, i) in rems {
        if left == 0 {
            break;
        }
        shares[i] += 1;
        left -= 1;
    }
    // ...then every live arm gets at least one slot, taken from the largest.
    for &i in &live {
        if shares[i] == 0
            && let Some(j) = (0..n)
                .filter(|&j| shares[j] > 1)
                .max_by_key(|&j| (shares[j], usize::MAX - j))
        {
            shares[j] -= 1;
            shares[i] = 1;
        }
    }
    shares
}

/// A stable 64-bit hash of an A/B client key (FNV-1a, then the SplitMix64
/// finaliser to spread short keys over the whole range). Unlike std's
/// `DefaultHasher` it is fixed, so a key lands in the same arm across maitre
/// versions and restarts.
pub fn ab_key_hash(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_shares_are_fair_and_complete() {
        assert_eq!(slot_shares(2, &[100], None), vec![2]);
        assert_eq!(slot_shares(2, &[50, 50], None), vec![1, 1]);
        assert_eq!(slot_shares(4, &[50, 50], None), vec![2, 2]);
        assert_eq!(slot_shares(5, &[75, 25], None), vec![4, 1]);
        assert_eq!(slot_shares(3, &[100, 0], None), vec![3, 0]);
        assert_eq!(slot_shares(4, &[50, 50], Some(1)), vec![0, 4]);
        assert_eq!(slot_shares(4, &[98, 1, 1], None), vec![2, 1, 1]);
        for total in 1..10 {
            let s = slot_shares(total, &[30, 50, 20], None);
            assert_eq!(s.iter().sum::<u32>(), total);
            if total >= 3 {
                assert!(s.iter().all(|&x| x >= 1), "{total}: {s:?}");
            }
        }
    }

    #[test]
    fn ab_key_hash_is_stable_and_spreads_keys() {
        // Deterministic: a key always lands on the same point.
        assert_eq!(ab_key_hash(""), ab_key_hash(""));
        assert_ne!(ab_key_hash("client-1"), ab_key_hash("client-2"));
        // 10 000 sequential keys split 30/70 land within 2% of the split.
        let low = (0..10_000)
            .filter(|i| {
                let h = ab_key_hash(&format!("client-{i}"));
                ((h as u128 * 100) >> 64) < 30
            })
            .count();
        assert!((2_800..=3_200).contains(&low), "{low}");
    }
}
