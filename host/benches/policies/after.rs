//! What the upstream did after maitre pre-empted a request: the tokens it
//! generated after the pre-emption, and whether it ever held more
//! generations than it has slots.
//!
//! maitre says how many tokens it had seen of each victim in its
//! `maitre::preempt` log event ("pre-empted", `tokens_thrown_away`, per arm);
//! the bench captures those in-process with a tracing layer. The upstream
//! model's event log says how many tokens each stopped batch generation had
//! made when it stopped: `Cancelled` (it stopped when maitre closed the
//! connection) or `Orphaned` then `Finished` (it ran on to its end, as
//! llama-server does for a non-streaming request). Within one replica (one
//! maitre arm, one upstream) each stop is paired with the latest
//! pre-emption not yet paired that came at most [`PAIR_WINDOW`] before it
//! and saw no more tokens than the stop has; tokens after = the upstream's count −
//! maitre's count. A pre-emption without such a stop is counted apart: the
//! generation had just ended at the upstream, or had not reached it yet.
//!
//! That count difference also holds tokens the upstream made *before* the
//! pre-emption that maitre had not read yet (a starved process reads late).
//! The time from the pre-emption to the stop bounds the tokens made after
//! it: at most one per token time.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use maitre_testkit::{EventKind, LogEvent};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// How long after a pre-emption the upstream's stop may come to be paired
/// with it; how early, for clock error ([`PAIR_SLACK`]).
pub const PAIR_WINDOW: Duration = Duration::from_millis(250);
/// See [`PAIR_WINDOW`].
pub const PAIR_SLACK: Duration = Duration::from_millis(20);

/// When, and with how many tokens seen, every pre-emption happened, per arm,
/// in order.
#[derive(Clone, Default)]
pub struct Preempts(Arc<Mutex<HashMap<String, Vec<Preempted>>>>);

/// When a pre-emption happened, and the tokens maitre had seen of its victim.
pub type Preempted = (Instant, u64);

impl Preempts {
    /// Captures maitre's pre-emption events from now on (this process's
    /// global tracing subscriber; nothing else is logged).
    pub fn install() -> Preempts {
        let p = Preempts::default();
        let sub = tracing_subscriber::registry().with(
            p.clone()
                .with_filter(Targets::new().with_target("maitre::preempt", Level::INFO)),
        );
        tracing::subscriber::set_global_default(sub).expect("no other tracing subscriber");
        p
    }

    /// Forgets every pre-emption captured so far (a new run starts).
    pub fn clear(&self) {
        self.0.lock().unwrap().clear();
    }

    /// maitre's pre-emptions by arm `arm` (when, tokens seen), in order.
    pub fn of(&self, arm: &str) -> Vec<Preempted> {
        self.0.lock().unwrap().get(arm).cloned().unwrap_or_default()
    }
}

#[derive(Default)]
struct Fields {
    arm: Option<String>,
    tokens: Option<u64>,
}

impl Visit for Fields {
    fn record_u64(&mut self, f: &Field, v: u64) {
        if f.name() == "tokens_thrown_away" {
            self.tokens = Some(v);
        }
    }
    fn record_str(&mut self, f: &Field, v: &str) {
        if f.name() == "arm" {
            self.arm = Some(v.to_string());
        }
    }
    fn record_debug(&mut self, f: &Field, v: &dyn Debug) {
        if f.name() == "arm" {
            self.arm = Some(format!("{v:?}"));
        }
    }
}

impl<S: Subscriber> Layer<S> for Preempts {
    fn on_event(&self, e: &Event<'_>, _: Context<'_, S>) {
        let mut f = Fields::default();
        e.record(&mut f);
        if let (Some(arm), Some(tokens)) = (f.arm, f.tokens) {
            let now = Instant::now();
            self.0
                .lock()
                .unwrap()
                .entry(arm)
                .or_default()
                .push((now, tokens));
        }
    }
}

/// Tokens after pre-emptions and the upstream's concurrency, for a group of
/// replicas (one table row).
#[derive(Default)]
pub struct After {
    /// Batch generations the upstream stopped early or orphaned.
    pub stops: usize,
    /// Of those, generations that ran on after their client left (zombies).
    pub orphaned: usize,
    /// Pre-emptions paired with a stop.
    pub paired: usize,
    /// Pre-emptions without a stop at the upstream (not counted in
    /// `max`/`total`).
    pub unpaired: usize,
    /// The most tokens the upstream generated after one pre-emption.
    pub max: u64,
    /// Tokens the upstream generated after all paired pre-emptions.
    pub total: u64,
    /// The most generations any one upstream held at once (slots, queue and
    /// zombies), over the measured run.
    pub max_in_flight: usize,
    /// Pre-emption → the upstream's stop, of every paired pre-emption. The
    /// upstream makes at most one token per token time, so a stop `d` after
    /// the pre-emption means at most ⌈d / token time⌉ tokens made after it,
    /// whatever maitre had read by then.
    pub delays: Vec<Duration>,
    /// The pairs with the most tokens after: (tokens after, ms from the
    /// pre-emption to the upstream's stop, tokens maitre had seen), most first.
    pub worst: Vec<(u64, f64, u64)>,
    /// Times an upstream's log shows more generations than slots.
    pub overruns: usize,
    /// The longest such overrun, until the log shows a generation end.
    pub overrun_longest: Duration,
}

impl After {
    /// Adds one replica: maitre's pre-emptions (when, tokens seen), the
    /// upstream's log, when the upstream started (its log's clock, to a
    /// few ms), its slots and its highest in-flight count.
    pub fn add(
        &mut self,
        seen: &[Preempted],
        log: &[LogEvent],
        upstream_start: Instant,
        slots: usize,
        max_in_flight: usize,
    ) {
        self.max_in_flight = self.max_in_flight.max(max_in_flight);
        let (overruns, longest) = overruns(log, slots);
        self.overruns += overruns;
        self.overrun_longest = self.overrun_longest.max(longest);
        let stops = stops(log);
        self.stops += stops.len();
        self.orphaned += stops.iter().filter(|s| s.orphaned).count();
        // Each stop (in the order they came) goes to the latest pre-emption
        // before it not yet paired: a stop follows its own pre-emption
        // within ms, and a pre-emption whose generation never reached the
        // upstream has no stop to take from the next one.
        let mut taken = vec![false; seen.len()];
        for s in &stops {
            let t = upstream_start + s.at;
            let pair = (0..seen.len()).rev().find(|&j| {
                let (at, n) = seen[j];
                !taken[j] && at <= t + PAIR_SLACK && t <= at + PAIR_WINDOW && s.tokens >= n
            });
            let Some(j) = pair else { continue };
            taken[j] = true;
            let (at, read) = seen[j];
            let after = s.tokens - read;
            let delay = t.saturating_duration_since(at);
            self.delays.push(delay);
            self.worst.push((after, delay.as_secs_f64() * 1000.0, read));
            self.worst
                .sort_by(|a, b| b.0.cmp(&a.0).then(b.1.total_cmp(&a.1)));
            self.worst.truncate(3);
            self.paired += 1;
            self.total += after;
            self.max = self.max.max(after);
        }
        self.unpaired += taken.iter().filter(|t| !**t).count();
    }
}

/// How often the log shows more generations in flight (queued for a slot,
/// holding one, or orphaned) than `slots`, and the longest such stretch.
fn overruns(log: &[LogEvent], slots: usize) -> (usize, Duration) {
    let mut live: HashMap<u64, ()> = HashMap::new();
    let (mut n, mut longest, mut since) = (0, Duration::ZERO, None::<Duration>);
    for e in log {
        match e.kind {
            EventKind::Queued => {
                live.insert(e.req, ());
            }
            EventKind::Finished | EventKind::Cancelled | EventKind::Failed => {
                live.remove(&e.req);
            }
            _ => continue,
        }
        match (live.len() > slots, since) {
            (true, None) => {
                n += 1;
                since = Some(e.at);
            }
            (false, Some(s)) => {
                longest = longest.max(e.at - s);
                since = None;
            }
            _ => {}
        }
    }
    (n, longest)
}

/// One batch generation the upstream did not finish for its client.
struct Stop {
    /// When it stopped (was orphaned), on the upstream's clock.
    at: Duration,
    /// Tokens it had made when it stopped (for a zombie: when it ended).
    tokens: u64,
    orphaned: bool,
}

/// The batch generations that stopped early or were orphaned, in the order
/// they stopped (were orphaned).
fn stops(log: &[LogEvent]) -> Vec<Stop> {
    let batch = |e: &LogEvent| e.priority.as_deref() == Some("batch");
    // Request number → (seq of the stop, stop).
    let mut by_req: BTreeMap<u64, (u64, Stop)> = BTreeMap::new();
    let mut ended: HashMap<u64, u64> = HashMap::new();
    for e in log.iter().filter(|e| batch(e)) {
        match e.kind {
            EventKind::Cancelled => {
                by_req.insert(
                    e.req,
                    (
                        e.seq,
                        Stop {
                            at: e.at,
                            tokens: e.tokens,
                            orphaned: false,
                        },
                    ),
                );
            }
            EventKind::Orphaned => {
                by_req.insert(
                    e.req,
                    (
                        e.seq,
                        Stop {
                            at: e.at,
                            tokens: 0,
                            orphaned: true,
                        },
                    ),
                );
            }
            EventKind::Finished | EventKind::Failed => {
                ended.insert(e.req, e.tokens);
            }
            _ => {}
        }
    }
    let mut v: Vec<(u64, Stop)> = by_req
        .into_iter()
        .map(|(req, (seq, mut s))| {
            if s.orphaned {
                // A zombie's tokens are known once it ends.
                s.tokens = ended.get(&req).copied().unwrap_or(0);
            }
            (seq, s)
        })
        .collect();
    v.sort_by_key(|(seq, _)| *seq);
    v.into_iter().map(|(_, s)| s).collect()
}
