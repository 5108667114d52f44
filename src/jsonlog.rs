//! JSON-lines log files (the SMS request log, the carousel play-out log):
//! one JSON object per line, rotated by size, written by a thread of their
//! own so that writing never blocks a request or the play-out.
//!
//! Lines go through a bounded channel. When it is full (the disk is slower
//! than the producers) the line is dropped and counted ([`JsonLog::dropped`]),
//! and a warning is logged once per power-of-two of drops. The callers choose
//! what goes in a line and never put secrets there.
//!
//! Rotation: when the file would grow past `rotate_bytes`, `f` is renamed to
//! `f.1`, `f.1` to `f.2`, … and `f.{keep}` is deleted; a new `f` is started.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

/// Rotate at this size unless told otherwise (same as the play-out log).
pub const DEFAULT_ROTATE_BYTES: u64 = 64 * 1024 * 1024;
/// Rotated files kept unless told otherwise.
pub const DEFAULT_KEEP: u32 = 10;
/// Lines that may wait for the writer before new ones are dropped.
pub const CHANNEL_CAPACITY: usize = 8192;

enum Msg {
    Line(String),
    Flush(oneshot::Sender<()>),
}

/// A cheap-to-clone handle on the writer thread.
#[derive(Clone)]
pub struct JsonLog {
    tx: mpsc::Sender<Msg>,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for JsonLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonLog")
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl JsonLog {
    /// Starts the writer thread for `path`. The file (and its directory) is
    /// created on first write; an error opening it is logged and the lines
    /// are counted as dropped until it can be opened. The thread ends when
    /// every handle is dropped.
    pub fn open(path: impl Into<PathBuf>, rotate_bytes: u64, keep: u32) -> JsonLog {
        Self::with_capacity(path, rotate_bytes, keep, CHANNEL_CAPACITY)
    }

    /// [`JsonLog::open`] with a queue of `capacity` lines.
    pub fn with_capacity(
        path: impl Into<PathBuf>,
        rotate_bytes: u64,
        keep: u32,
        capacity: usize,
    ) -> JsonLog {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            path: path.into(),
            rotate_bytes: rotate_bytes.max(1024),
            keep,
            file: None,
            size: 0,
            dropped: dropped.clone(),
            open_failed: false,
        };
        let spawned = std::thread::Builder::new()
            .name("casd-jsonlog".into())
            .spawn(move || writer.run(rx));
        if let Err(e) = spawned {
            tracing::error!("json log: cannot start writer thread: {e}");
        }
        JsonLog { tx, dropped }
    }

    /// Queues one line; never waits. A full queue drops the line.
    pub fn write<T: Serialize>(&self, line: &T) {
        let text = match serde_json::to_string(line) {
            Ok(t) => t,
            Err(_) => return,
        };
        match self.tx.try_send(Msg::Line(text)) {
            Ok(()) => {}
            Err(_) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed);
                if n.is_power_of_two() || n == 0 {
                    tracing::warn!(dropped = n + 1, "json log: writer behind, line dropped");
                }
            }
        }
    }

    /// Lines dropped so far (queue full or file unwritable).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits until every line queued before this call is written and
    /// flushed to the file (tests, orderly shutdown).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// How long the writer lets lines gather after writing a batch.
const BATCH_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

struct Writer {
    path: PathBuf,
    rotate_bytes: u64,
    keep: u32,
    file: Option<BufWriter<File>>,
    size: u64,
    dropped: Arc<AtomicU64>,
    open_failed: bool,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        while let Some(msg) = rx.blocking_recv() {
            self.handle(msg);
            // Drain what is already queued, then flush once.
            while let Ok(msg) = rx.try_recv() {
                self.handle(msg);
            }
            self.flush();
            // Then let lines gather: a writer waiting in `recv` is woken
            // by every line (a futex wake on the request's thread and a
            // write(2) per line under load); paused, it writes them in
            // one go. The queue holds far more than arrives meanwhile.
            std::thread::sleep(BATCH_PAUSE);
        }
        self.flush();
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Line(line) => self.write_line(&line),
            Msg::Flush(done) => {
                self.flush();
                let _ = done.send(());
            }
        }
    }

    fn flush(&mut self) {
        if let Some(f) = self.file.as_mut() {
            if let Err(e) = f.flush() {
                tracing::warn!("json log: flush failed: {e}");
                self.file = None;
            }
        }
    }

    fn write_line(&mut self, line: &str) {
        let len = line.len() as u64 + 1;
        if self.file.is_some() && self.size > 0 && self.size + len > self.rotate_bytes {
            self.flush();
            self.file = None;
            rotate(&self.path, self.keep);
        }
        if self.file.is_none() {
            match open_append(&self.path) {
                Ok((f, size)) => {
                    self.file = Some(BufWriter::with_capacity(64 * 1024, f));
                    self.size = size;
                    self.open_failed = false;
                }
                Err(e) => {
                    if !self.open_failed {
                        tracing::error!(
                            path = %self.path.display(),
                            "json log: cannot open: {e}; lines are dropped until it can be"
                        );
                        self.open_failed = true;
                    }
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        let Some(f) = self.file.as_mut() else { return };
        let res = f
            .write_all(line.as_bytes())
            .and_then(|_| f.write_all(b"\n"));
        match res {
            Ok(()) => self.size += len,
            Err(e) => {
                tracing::warn!("json log: write failed: {e}");
                self.dropped.fetch_add(1, Ordering::Relaxed);
                self.file = None;
            }
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<(File, u64)> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    let f = OpenOptions::new().create(true).append(true).open(path)?;
    let size = f.metadata()?.len();
    Ok((f, size))
}

fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// `f.{keep-1}` → `f.{keep}`, …, `f` → `f.1`; with keep = 0 the file is
/// simply truncated (removed).
fn rotate(path: &Path, keep: u32) {
    if keep == 0 {
        let _ = std::fs::remove_file(path);
        return;
    }
    let _ = std::fs::remove_file(numbered(path, keep));
    for n in (1..keep).rev() {
        let _ = std::fs::rename(numbered(path, n), numbered(path, n + 1));
    }
    if let Err(e) = std::fs::rename(path, numbered(path, 1)) {
        tracing::warn!("json log: rotation failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(i: usize) -> serde_json::Value {
        serde_json::json!({"id": i, "path": "/adddevice", "body": "x".repeat(100)})
    }

    #[tokio::test]
    async fn writes_lines_and_rotates_by_size() {
        let dir = std::env::temp_dir().join(format!("casd-jsonlog-{:08x}", rand::random::<u32>()));
        let path = dir.join("sub/req.jsonl");
        let log = JsonLog::open(&path, 2048, 2);
        for i in 0..100 {
            log.write(&line(i));
        }
        log.flush().await;
        assert_eq!(log.dropped(), 0);
        let cur = std::fs::read_to_string(&path).unwrap();
        let one = std::fs::read_to_string(numbered(&path, 1)).unwrap();
        assert!(std::fs::metadata(numbered(&path, 2)).is_ok());
        assert!(std::fs::metadata(numbered(&path, 3)).is_err(), "keep = 2");
        for text in [&cur, &one] {
            assert!(text.len() <= 2048);
            for l in text.lines() {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                assert_eq!(v["path"], "/adddevice");
            }
        }
        // The newest line is the last one of the current file.
        let last: serde_json::Value = serde_json::from_str(cur.lines().last().unwrap()).unwrap();
        assert_eq!(last["id"], 99);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn unwritable_path_counts_drops_and_never_blocks() {
        let log = JsonLog::open("/proc/nonexistent-casd/req.jsonl", 4096, 1);
        for i in 0..10 {
            log.write(&line(i));
        }
        log.flush().await;
        assert_eq!(log.dropped(), 10);
    }
}
