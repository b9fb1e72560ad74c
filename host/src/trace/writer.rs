//! Writing a trace off the request path: the scheduler hands each ended
//! request to a bounded channel without waiting ([`TraceSink::record`]); a
//! thread of its own serialises and writes the lines, flushing whenever the
//! channel is empty, and rotates the file by size. When the channel is full
//! (the disk cannot keep up) a record is dropped and counted in
//! `maitre_trace_dropped_total`, never waited for.

use std::collections::hash_map::RandomState;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::hash::BuildHasher;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use super::TraceRecord;
use crate::config::TraceConfig;

/// Records that may wait for the writer; beyond, they are dropped.
pub const CHANNEL_CAPACITY: usize = 8192;

/// The scheduler's end of a trace: cheap to call, never blocks.
pub struct TraceSink {
    tx: mpsc::Sender<TraceRecord>,
    dropped: Counter,
    /// Keys the client-id hash; random per process, so an id cannot be
    /// turned back into an address.
    keys: RandomState,
}

impl TraceSink {
    /// Opens (appends to) the trace file and starts the writer thread.
    /// Fails when the file cannot be opened, so `maitre serve` says so at
    /// start instead of tracing nothing.
    pub fn start(cfg: &TraceConfig, dropped: Counter) -> io::Result<TraceSink> {
        let mut file = Rotating::open(cfg)?;
        let (sink, mut rx) = TraceSink::channel(CHANNEL_CAPACITY, dropped.clone());
        std::thread::Builder::new()
            .name("maitre-trace".into())
            .spawn(move || {
                let mut failing = false;
                loop {
                    let r = match rx.try_recv() {
                        Ok(r) => r,
                        Err(mpsc::error::TryRecvError::Empty) => {
                            // Idle: make what was written visible, then wait.
                            let _ = file.flush();
                            match rx.blocking_recv() {
                                Some(r) => r,
                                None => break,
                            }
                        }
                        Err(mpsc::error::TryRecvError::Disconnected) => break,
                    };
                    match file.write_record(&r) {
                        Ok(()) if failing => {
                            failing = false;
                            tracing::info!(file = %file.path.display(), "trace file writable again");
                        }
                        Ok(()) => {}
                        Err(e) => {
                            dropped.inc();
                            if !failing {
                                failing = true;
                                tracing::error!(file = %file.path.display(), error = %e, "cannot write the trace file; records are dropped (maitre_trace_dropped_total) until it works again");
                            }
                        }
                    }
                    if let Err(e) = file.maybe_rotate() {
                        tracing::error!(file = %file.path.display(), error = %e, "cannot rotate the trace file; writing on to it and trying again after another rotate_bytes");
                    }
                }
                let _ = file.flush();
            })?;
        Ok(sink)
    }

    /// A sink whose records go to the returned receiver (the writer thread,
    /// or a test).
    fn channel(capacity: usize, dropped: Counter) -> (TraceSink, mpsc::Receiver<TraceRecord>) {
        let (tx, rx) = mpsc::channel(capacity);
        let sink = TraceSink {
            tx,
            dropped,
            keys: RandomState::new(),
        };
        (sink, rx)
    }

    /// Hands one record to the writer, or counts it as dropped when the
    /// writer is behind.
    pub fn record(&self, r: TraceRecord) {
        if self.tx.try_send(r).is_err() {
            self.dropped.inc();
        }
    }

    /// The pseudonymous id of an A/B client key.
    pub fn client_id(&self, key: &str) -> String {
        format!("{:016x}", self.keys.hash_one(key))
    }
}

/// The trace file, rotated by size.
struct Rotating {
    path: PathBuf,
    rotate_bytes: u64,
    keep: u32,
    out: BufWriter<File>,
    size: u64,
    line: Vec<u8>,
}

impl Rotating {
    fn open(cfg: &TraceConfig) -> io::Result<Rotating> {
        let (out, size) = open_append(&cfg.path)?;
        Ok(Rotating {
            path: cfg.path.clone(),
            rotate_bytes: cfg.rotate_bytes,
            keep: cfg.keep.max(1),
            out,
            size,
            line: Vec::with_capacity(512),
        })
    }

    fn write_record(&mut self, r: &TraceRecord) -> io::Result<()> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, r)?;
        self.line.push(b'\n');
        self.out.write_all(&self.line)?;
        self.size += self.line.len() as u64;
        Ok(())
    }

    /// Rotates once the file has passed its size. When that fails (the
    /// folder became read-only, say), the file goes on growing and the next
    /// try comes after another `rotate_bytes`: a record is never lost to it.
    fn maybe_rotate(&mut self) -> io::Result<()> {
        if self.size < self.rotate_bytes {
            return Ok(());
        }
        let r = self.rotate();
        if r.is_err() {
            self.size = 0;
        }
        r
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// `PATH` becomes `PATH.1`, `PATH.1` becomes `PATH.2`, ... up to
    /// `PATH.keep` (the oldest is replaced), and a new `PATH` starts.
    fn rotate(&mut self) -> io::Result<()> {
        self.out.flush()?;
        for i in (1..self.keep).rev() {
            let from = numbered(&self.path, i);
            if from.exists() {
                std::fs::rename(&from, numbered(&self.path, i + 1))?;
            }
        }
        std::fs::rename(&self.path, numbered(&self.path, 1))?;
        let (out, size) = open_append(&self.path)?;
        self.out = out;
        self.size = size;
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<(BufWriter<File>, u64)> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot open the trace file {} ([trace] path): {e}",
                    path.display()
                ),
            )
        })?;
    let size = f.metadata()?.len();
    Ok((BufWriter::with_capacity(64 << 10, f), size))
}

/// `PATH.n`.
fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut s: OsString = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Class;
    use crate::trace::TraceOutcome;

    fn record(i: u64) -> TraceRecord {
        TraceRecord {
            arrival_unix_ms: 1_700_000_000_000 + i,
            arrival_ms: i as f64,
            class_hint: None,
            class: Class::Batch,
            tenant: None,
            model: "fake".into(),
            path: "/api/generate".into(),
            stream: false,
            num_predict: Some(5),
            body_bytes: 40,
            client: None,
            backend: "http://127.0.0.1:11434".into(),
            arm: "main".into(),
            queue_ms: 0.0,
            upstream_ttft_ms: Some(100.0),
            ttft_ms: Some(100.5),
            tokens: 1,
            duration_ms: 101.0,
            preemptions: 0,
            outcome: TraceOutcome::Ok,
        }
    }

    fn lines(path: &Path) -> Vec<TraceRecord> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a trace line parses"))
            .collect()
    }

    #[test]
    fn rotates_by_size_and_keeps_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let cfg = TraceConfig {
            path: path.clone(),
            rotate_bytes: 2_000,
            keep: 2,
        };
        let mut f = Rotating::open(&cfg).unwrap();
        for i in 0..100 {
            f.write_record(&record(i)).unwrap();
            f.maybe_rotate().unwrap();
        }
        f.flush().unwrap();
        assert!(numbered(&path, 1).exists() && numbered(&path, 2).exists());
        assert!(!numbered(&path, 3).exists(), "only `keep` rotated files");
        for p in [&path, &numbered(&path, 1), &numbered(&path, 2)] {
            let len = std::fs::metadata(p).unwrap().len();
            assert!(len < 2_000 + 600, "{} is {len} bytes", p.display());
        }
        // The newest lines are in PATH, the ones before in PATH.1, then PATH.2.
        let (new, one, two) = (
            lines(&path),
            lines(&numbered(&path, 1)),
            lines(&numbered(&path, 2)),
        );
        assert_eq!(new.last().unwrap().arrival_ms, 99.0);
        assert_eq!(one.last().unwrap().arrival_ms + 1.0, new[0].arrival_ms);
        assert_eq!(two.last().unwrap().arrival_ms + 1.0, one[0].arrival_ms);
    }

    #[test]
    fn a_rotation_that_fails_loses_no_record_and_is_tried_again_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        // A non-empty folder where PATH.1 goes: the rename fails.
        let blocker = numbered(&path, 1);
        std::fs::create_dir(&blocker).unwrap();
        std::fs::write(blocker.join("x"), "x").unwrap();
        let cfg = TraceConfig {
            path: path.clone(),
            rotate_bytes: 2_000,
            keep: 1,
        };
        let mut f = Rotating::open(&cfg).unwrap();
        let mut failed = 0;
        for i in 0..30 {
            f.write_record(&record(i)).unwrap();
            failed += f.maybe_rotate().is_err() as usize;
        }
        f.flush().unwrap();
        assert!(failed >= 2, "tried again after another rotate_bytes");
        assert_eq!(lines(&path).len(), 30, "every record is in PATH");
        std::fs::remove_dir_all(&blocker).unwrap();
        for i in 30..60 {
            f.write_record(&record(i)).unwrap();
            f.maybe_rotate().unwrap();
        }
        assert!(blocker.is_file(), "rotates again once it can");
    }

    #[test]
    fn reopening_appends_and_counts_the_existing_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let cfg = TraceConfig {
            path: path.clone(),
            rotate_bytes: 1 << 20,
            keep: 3,
        };
        for i in 0..2 {
            let mut f = Rotating::open(&cfg).unwrap();
            if i == 1 {
                assert!(f.size > 0, "the size of what is there counts");
            }
            f.write_record(&record(i)).unwrap();
            f.flush().unwrap();
        }
        assert_eq!(lines(&path).len(), 2);
    }

    #[test]
    fn a_full_channel_drops_and_counts_instead_of_waiting() {
        let dropped = Counter::default();
        let (sink, mut rx) = TraceSink::channel(2, dropped.clone());
        for i in 0..5 {
            sink.record(record(i));
        }
        assert_eq!(dropped.get(), 3);
        assert_eq!(rx.try_recv().unwrap().arrival_ms, 0.0);
    }

    #[test]
    fn client_ids_are_stable_within_a_sink_and_hide_the_key() {
        let (sink, _rx) = TraceSink::channel(1, Counter::default());
        let id = sink.client_id("10.1.2.3");
        assert_eq!(id, sink.client_id("10.1.2.3"));
        assert_ne!(id, sink.client_id("10.1.2.4"));
        assert!(!id.contains("10.1.2.3") && id.len() == 16);
    }

    #[test]
    fn the_writer_thread_writes_every_record_and_flushes_when_idle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub-less.jsonl");
        let cfg = TraceConfig {
            path: path.clone(),
            rotate_bytes: 1 << 20,
            keep: 3,
        };
        let dropped = Counter::default();
        let sink = TraceSink::start(&cfg, dropped.clone()).unwrap();
        for i in 0..50 {
            sink.record(record(i));
        }
        // Bounded wait for the writer to go idle (it flushes then).
        let t = std::time::Instant::now();
        while lines(&path).len() < 50 && t.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(lines(&path).len(), 50);
        assert_eq!(dropped.get(), 0);
    }

    #[test]
    fn an_unopenable_file_is_refused_at_start_with_the_key_named() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = TraceConfig {
            path: dir.path().join("no/such/dir/t.jsonl"),
            rotate_bytes: 1 << 20,
            keep: 3,
        };
        let e = TraceSink::start(&cfg, Counter::default())
            .err()
            .expect("refused");
        assert!(e.to_string().contains("[trace] path"), "{e}");
    }
}
