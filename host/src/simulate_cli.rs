//! `maitre simulate`'s command line (part of the binary, not the library):
//! reads the trace or generates one, runs [`maitre::simulate::simulate`],
//! prints the table or the JSON, and says on stderr how long it took.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use maitre::simulate::synthetic::{Synthetic, parse_mix, parse_tokens};
use maitre::simulate::workload::{DEFAULT_PROMPT_MS, DEFAULT_TOKEN_MS, TimingFlags};
use maitre::simulate::{Options, simulate};
use maitre::trace::{TraceRecord, read_traces};

/// `maitre simulate`'s options.
#[derive(clap::Args)]
pub struct SimulateArgs {
    /// Trace file written by `[trace]`; repeat it for rotated files
    /// (`t.jsonl.1 t.jsonl`) or several runs.
    #[arg(long, value_name = "FILE")]
    trace: Vec<PathBuf>,
    /// Policy file to replay the arrivals through; repeat it to compare.
    #[arg(long, short, value_name = "FILE")]
    policy: Vec<PathBuf>,
    /// Print the result as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Upstream slots, instead of each policy file's `[upstream] slots`.
    #[arg(long)]
    slots: Option<u32>,
    /// Upstream prompt time (ms) for every request, instead of the trace's
    /// measurements (with --synthetic: the generated upstream's; default 0).
    #[arg(long, value_name = "MS")]
    prompt_ms: Option<f64>,
    /// Upstream time per token (ms) for every request, instead of the
    /// trace's measurements (with --synthetic: the generated upstream's;
    /// default 20).
    #[arg(long, value_name = "MS")]
    token_ms: Option<f64>,
    /// Seed of every random draw: the same seed gives the same output.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Generate the trace instead of reading one: Poisson arrivals at
    /// --rate for --duration, classes by --mix, lengths by --tokens.
    #[arg(long, conflicts_with = "trace")]
    synthetic: bool,
    /// With --synthetic: arrivals per second [default: 1.4].
    #[arg(long)]
    rate: Option<f64>,
    /// With --synthetic: seconds of traffic [default: 3600].
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// With --synthetic: share of each class [default: realtime=20,batch=80].
    #[arg(long, value_name = "CLASS=W,...")]
    mix: Option<String>,
    /// With --synthetic: a class's answer lengths, N, A..B, exp:MEAN or
    /// lognormal:MEDIAN:SIGMA [default: realtime=lognormal:40:0.5,
    /// batch=lognormal:30:0.6]; repeat it per class.
    #[arg(long, value_name = "CLASS=DIST")]
    tokens: Vec<String>,
    /// With --synthetic: the model's name [default: fake].
    #[arg(long)]
    model: Option<String>,
    /// With --synthetic: also write the generated trace to FILE (then
    /// --policy may be left out).
    #[arg(long, value_name = "FILE")]
    write_trace: Option<PathBuf>,
}

impl SimulateArgs {
    /// The generated trace's options, or an error naming what to fix.
    fn synthetic(&self) -> anyhow::Result<Synthetic> {
        let rate = self.rate.unwrap_or(1.4);
        let duration = self.duration.unwrap_or(3_600.0);
        if !(rate.is_finite() && rate > 0.0) {
            bail!("--rate must be a number of arrivals per second above 0");
        }
        if !(duration.is_finite() && duration > 0.0 && duration <= 30.0 * 86_400.0) {
            bail!("--duration must be a number of seconds above 0 (at most 30 days)");
        }
        let mix = parse_mix(self.mix.as_deref().unwrap_or("realtime=20,batch=80"))
            .map_err(|e| anyhow::anyhow!("--mix: {e}"))?;
        let mut spec = Synthetic {
            rate_per_s: rate,
            duration_s: duration,
            mix,
            realtime_tokens: "lognormal:40:0.5".parse().expect("valid default"),
            batch_tokens: "lognormal:30:0.6".parse().expect("valid default"),
            model: self.model.clone().unwrap_or_else(|| "fake".into()),
            prompt_ms: self.prompt_ms.unwrap_or(DEFAULT_PROMPT_MS),
            token_ms: self.token_ms.unwrap_or(DEFAULT_TOKEN_MS),
            seed: self.seed,
        };
        for t in &self.tokens {
            match parse_tokens(t).map_err(|e| anyhow::anyhow!("--tokens: {e}"))? {
                (maitre::policy::Class::Realtime, d) => spec.realtime_tokens = d,
                (maitre::policy::Class::Batch, d) => spec.batch_tokens = d,
            }
        }
        Ok(spec)
    }

    fn check(&self) -> anyhow::Result<()> {
        let synthetic_only = self.rate.is_some()
            || self.duration.is_some()
            || self.mix.is_some()
            || !self.tokens.is_empty()
            || self.model.is_some()
            || self.write_trace.is_some();
        if !self.synthetic && synthetic_only {
            bail!(
                "--rate, --duration, --mix, --tokens, --model and --write-trace shape a generated trace: add --synthetic"
            );
        }
        if !self.synthetic && self.trace.is_empty() {
            bail!("give a trace (--trace FILE, written by [trace]) or --synthetic to generate one");
        }
        if self.policy.is_empty() && self.write_trace.is_none() {
            bail!("give at least one --policy FILE to replay the trace through");
        }
        for (flag, v) in [
            ("--prompt-ms", self.prompt_ms),
            ("--token-ms", self.token_ms),
        ] {
            if v.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
                bail!("{flag} must be a number of milliseconds of at least 0");
            }
        }
        Ok(())
    }
}

/// Runs `maitre simulate`. Not inside a tokio runtime: each policy runs in
/// a runtime of its own, on a virtual clock.
pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    args.check()?;
    let records: Vec<TraceRecord> = if args.synthetic {
        let recs = args.synthetic()?.generate();
        if recs.is_empty() {
            bail!("--rate × --duration gave no request: raise one of them");
        }
        if let Some(path) = &args.write_trace {
            write_trace(path, &recs)?;
            eprintln!(
                "maitre simulate: wrote {} generated requests to {}",
                recs.len(),
                path.display()
            );
        }
        recs
    } else {
        read_traces(&args.trace)?
    };
    if args.policy.is_empty() {
        return Ok(());
    }
    let opts = Options {
        slots: args.slots,
        timing: TimingFlags {
            prompt_ms: args.prompt_ms,
            token_ms: args.token_ms,
        },
        seed: args.seed,
    };
    let t = Instant::now();
    let sim = simulate(records, &args.policy, &opts)?;
    let took = t.elapsed().as_secs_f64();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&sim)?);
    } else {
        print!("{}", sim.to_text());
    }
    // On stderr, so that the output itself depends on nothing but the inputs.
    eprintln!(
        "maitre simulate: {} requests × {} policies in {took:.2} s ({:.0} requests/s)",
        sim.requests,
        sim.policies.len(),
        (sim.requests * sim.policies.len()) as f64 / took.max(1e-9)
    );
    Ok(())
}

fn write_trace(path: &std::path::Path, recs: &[TraceRecord]) -> anyhow::Result<()> {
    let mut text = String::new();
    for r in recs {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}
