//! The A/B report as text: the table `maitre ab` prints (and `maitre
//! simulate` beside it), then each arm's differences from the first with
//! their confidence intervals and a verdict.

use crate::scheduler::AbReport;
use crate::scheduler::compare::Comparison;

/// The `/ab` report as a table: one row per arm and class. Columns: requests
/// that ended in the window, answered, rejected, cancelled by the client,
/// upstream errors, TTFT samples and percentiles, queue wait percentiles,
/// answered requests per minute.
pub fn format_report(r: &AbReport) -> String {
    let f = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
    let w = r
        .rows
        .iter()
        .map(|row| row.arm.len())
        .max()
        .unwrap_or(0)
        .max(3);
    let mut out = format!("A/B comparison over the last {:.0} s\n", r.window_seconds);
    out.push_str(&format!(
        "{:<w$} {:<9} {:>6} {:>6} {:>5} {:>5} {:>5} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        "arm",
        "class",
        "reqs",
        "ok",
        "rej",
        "cxl",
        "err",
        "ttft_n",
        "ttft_p50",
        "ttft_p95",
        "ttft_p99",
        "queue_p50",
        "queue_p95",
        "done/min"
    ));
    for row in &r.rows {
        out.push_str(&format!(
            "{:<w$} {:<9} {:>6} {:>6} {:>5} {:>5} {:>5} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9.1}\n",
            row.arm,
            row.class,
            row.requests,
            row.ok,
            row.rejected,
            row.cancelled,
            row.upstream_errors,
            row.ttft_samples,
            f(row.ttft_p50_ms),
            f(row.ttft_p95_ms),
            f(row.ttft_p99_ms),
            f(row.queue_p50_ms),
            f(row.queue_p95_ms),
            row.completions_per_min
        ));
    }
    out.push_str("times in ms (ttft = arrival to first byte sent to the client; queue = time waiting in maitre); a difference smaller than the spread between p50 and p95 needs more samples to mean anything\n");
    out.push_str(&format_comparisons(&r.mode, &r.comparisons));
    out
}

/// The differences table: one line per class, arm and metric, then the
/// verdict in words under it. Empty when there is one arm.
pub fn format_comparisons(mode: &str, cs: &[Comparison]) -> String {
    let Some(first) = cs.first() else {
        return String::new();
    };
    let f = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
    let w = cs.iter().map(|c| c.arm.len()).max().unwrap_or(0).max(3);
    let unit = if mode == "switchback" {
        "switchback: the samples are windows, not requests"
    } else {
        "weighted: the samples are requests; throughput is per slot"
    };
    let mut out = format!(
        "\ndifferences from {} (arm minus baseline, 95 % bootstrap interval; {unit})\n",
        first.baseline
    );
    out.push_str(&format!(
        "{:<9} {:<w$} {:<19} {:>9} {:>9} {:>9} {:>21} {:>11}\n",
        "class", "arm", "metric", "baseline", "arm", "diff", "95% CI", "n base/arm"
    ));
    for c in cs {
        let ci = c
            .ci95
            .map(|[lo, hi]| format!("{lo:+.1} to {hi:+.1}"))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<9} {:<w$} {:<19} {:>9} {:>9} {:>9} {:>21} {:>11}\n",
            c.class,
            c.arm,
            c.metric,
            f(c.baseline_value),
            f(c.arm_value),
            c.difference
                .map(|d| format!("{d:+.1}"))
                .unwrap_or_else(|| "-".into()),
            ci,
            format!("{}/{}", c.baseline_n, c.arm_n),
        ));
        out.push_str(&format!("  {}\n", c.verdict));
    }
    out
}
