//! Reading traces back: the lines of one or more files (a file and its
//! rotated predecessors, or several runs), put in arrival order.
//!
//! A file is written as requests end, not as they arrive, so its lines are
//! sorted here. Arrivals of one maitre process are placed by its monotonic
//! clock (exact spacing); processes are told apart by where their monotonic
//! clock started on the Unix clock, and placed by that.

use std::path::{Path, PathBuf};

use super::TraceRecord;

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be read.
    #[error("cannot read trace file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A line is not a trace record.
    #[error(
        "{path}:{line}: not a maitre trace record ({error}); a trace has one JSON object per line, as `[trace]` writes them"
    )]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        error: serde_json::Error,
    },
    /// No record in any file.
    #[error("no request in {0}: a trace needs at least one line")]
    Empty(String),
}

/// Every record of `paths`, in file order (blank lines skipped).
pub fn read_traces(paths: &[PathBuf]) -> Result<Vec<TraceRecord>, TraceError> {
    let mut out = Vec::new();
    for p in paths {
        read_one(p, &mut out)?;
    }
    if out.is_empty() {
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(TraceError::Empty(names.join(", ")));
    }
    Ok(out)
}

fn read_one(path: &Path, out: &mut Vec<TraceRecord>) -> Result<(), TraceError> {
    let text = std::fs::read_to_string(path).map_err(|error| TraceError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r = serde_json::from_str(line).map_err(|error| TraceError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            error,
        })?;
        out.push(r);
    }
    Ok(())
}

/// Processes whose monotonic clocks started less than this apart on the
/// Unix clock are taken for one (the Unix time of a line is rounded to the
/// millisecond, so one process's start wobbles by a millisecond or so).
const SAME_PROCESS_MS: f64 = 1_000.0;

/// Sorts records by arrival and gives each its arrival in ms after the
/// first one.
pub fn arrival_offsets(records: Vec<TraceRecord>) -> Vec<(f64, TraceRecord)> {
    // Where each line's process started its monotonic clock, Unix ms.
    let mut v: Vec<(f64, TraceRecord)> = records
        .into_iter()
        .map(|r| (r.arrival_unix_ms as f64 - r.arrival_ms, r))
        .collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    // One start per process: the first of each cluster.
    let mut cluster_start = f64::NEG_INFINITY;
    for (start, r) in v.iter_mut() {
        if *start - cluster_start >= SAME_PROCESS_MS {
            cluster_start = *start;
        }
        *start = cluster_start + r.arrival_ms;
    }
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let first = v.first().map(|x| x.0).unwrap_or(0.0);
    for (t, _) in v.iter_mut() {
        *t -= first;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Class;
    use crate::trace::TraceOutcome;

    fn at(unix: u64, mono: f64) -> TraceRecord {
        TraceRecord {
            arrival_unix_ms: unix,
            arrival_ms: mono,
            class_hint: Some(Class::Realtime),
            class: Class::Realtime,
            tenant: None,
            model: "m".into(),
            path: "/api/chat".into(),
            stream: true,
            num_predict: None,
            body_bytes: 1,
            client: None,
            backend: "b".into(),
            arm: "a".into(),
            queue_ms: 0.0,
            upstream_ttft_ms: None,
            ttft_ms: None,
            tokens: 0,
            duration_ms: 0.0,
            preemptions: 0,
            outcome: TraceOutcome::Rejected,
        }
    }

    #[test]
    fn one_process_is_ordered_by_its_monotonic_clock() {
        // Written in end order; the Unix ms are rounded, the monotonic exact.
        let recs = vec![at(10_005, 5.4), at(10_001, 1.2), at(10_003, 2.9)];
        let offs: Vec<f64> = arrival_offsets(recs).iter().map(|x| x.0).collect();
        let want = [0.0, 1.7, 4.2];
        for (o, w) in offs.iter().zip(want) {
            assert!((o - w).abs() < 1e-9, "{offs:?}");
        }
    }

    #[test]
    fn two_processes_are_placed_by_the_unix_clock() {
        // A restart: the second process's monotonic clock starts again at 0,
        // a minute later.
        let recs = vec![at(70_000, 10.0), at(10_500, 500.0), at(10_001, 1.0)];
        let offs: Vec<f64> = arrival_offsets(recs).iter().map(|x| x.0).collect();
        assert_eq!(offs, vec![0.0, 499.0, 59_999.0]);
    }

    #[test]
    fn bad_lines_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl");
        let good = serde_json::to_string(&at(1, 1.0)).unwrap();
        std::fs::write(&p, format!("{good}\n\n{{\"arrival_ms\": 1}}\n")).unwrap();
        let e = read_traces(std::slice::from_ref(&p))
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.jsonl:3: not a maitre trace record"), "{e}");
        std::fs::write(&p, "\n").unwrap();
        let e = read_traces(&[p]).unwrap_err().to_string();
        assert!(e.contains("no request in"), "{e}");
    }
}
