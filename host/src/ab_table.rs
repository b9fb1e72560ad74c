//! The A/B table as people read it: one row per arm (or policy) and class,
//! printed by `maitre ab` for a running maitre and by `maitre simulate` for
//! each simulated policy, side by side.

use crate::scheduler::{AbReport, AbRow};

/// `maitre ab`'s table: the `/ab` report of a running maitre.
pub fn format_ab(r: &AbReport) -> String {
    let rows: Vec<(String, &AbRow)> = r.rows.iter().map(|row| (row.arm.clone(), row)).collect();
    format!(
        "A/B comparison over the last {:.0} s\n{}",
        r.window_seconds,
        format_rows("arm", &rows)
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
