//! The A/B table as people read it: one row per arm (or policy) and class,
//! printed by `maitre ab` for a running maitre and by `maitre simulate` for
//! each simulated policy, side by side; then each arm's differences from the
//! first with their confidence intervals and a verdict, and the shadow arms.

use crate::scheduler::compare::Comparison;
use crate::scheduler::shadow::ShadowReport;
use crate::scheduler::{AbReport, AbRow};

/// `maitre ab`'s table: the `/ab` report of a running maitre.
pub fn format_ab(r: &AbReport) -> String {
    let rows: Vec<(String, &AbRow)> = r.rows.iter().map(|row| (row.arm.clone(), row)).collect();
    format!(
        "A/B comparison over the last {:.0} s\n{}{}{}",
        r.window_seconds,
        format_rows("arm", &rows),
        format_comparisons(&r.mode, &r.comparisons),
        format_shadows(&r.shadows)
    )
}

/// The table of `rows`, each named by its label (first column, headed
/// `label`). Columns: requests that ended, answered, rejected, cancelled by
/// the client, upstream errors, TTFT samples and percentiles, queue wait
/// percentiles, answered requests per minute, pre-emptions and the tokens
/// they threw away.
pub fn format_rows(label: &str, rows: &[(String, &AbRow)]) -> String {
    let f = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
    let w = rows
        .iter()
        .map(|(l, _)| l.len())
        .chain([label.len()])
        .max()
        .unwrap_or(0);
    let mut out = format!(
        "{:<w$} {:<9} {:>6} {:>6} {:>5} {:>5} {:>5} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9}\n",
        label,
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
        "done/min",
        "preempt",
        "lost_tok"
    );
    for (l, row) in rows {
        out.push_str(&format!(
            "{:<w$} {:<9} {:>6} {:>6} {:>5} {:>5} {:>5} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9.1} {:>7} {:>9}\n",
            l,
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
            row.completions_per_min,
            row.preemptions,
            row.preempted_tokens
        ));
    }
    out.push_str("times in ms (ttft = arrival to first byte sent to the client; queue = time waiting in maitre); preempt = pre-emptions of the requests in the row, lost_tok = tokens they threw away; a difference smaller than the spread between p50 and p95 needs more samples to mean anything\n");
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

/// One line per shadow arm: how often it agreed with the serving arm, its
/// faults, and its latest differences.
pub fn format_shadows(shadows: &[ShadowReport]) -> String {
    let mut out = String::new();
    for s in shadows {
        let pct = |a: u64, d: u64| {
            if a + d == 0 {
                "-".to_string()
            } else {
                format!("{:.1} %", 100.0 * a as f64 / (a + d) as f64)
            }
        };
        out.push_str(&format!(
            "\nshadow {} ({}) watching {}: schedule agrees {} ({} of {}), admit agrees {} ({} of {}), skipped {}, faults {}{}\n",
            s.arm,
            s.plugin,
            s.watches,
            pct(s.schedule_agree, s.schedule_differ),
            s.schedule_agree,
            s.schedule_agree + s.schedule_differ,
            pct(s.admit_agree, s.admit_differ),
            s.admit_agree,
            s.admit_agree + s.admit_differ,
            s.skipped,
            s.faults,
            if s.ejected { " (ejected)" } else { "" },
        ));
        if let Some(e) = &s.last_error {
            out.push_str(&format!("  last error: {}\n", crate::escape::Escaped(e)));
        }
        for e in &s.examples {
            out.push_str(&format!("  {e}\n"));
        }
    }
    out
}
