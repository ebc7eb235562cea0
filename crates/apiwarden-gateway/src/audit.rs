//! The audit-sink interface and its first implementations.
//!
//! The pipeline's record stage hands every finished event to an [`AuditSink`] without blocking.
//! [`NdjsonSink`] writes them as one JSON object per line into the data directory; the ledger
//! replaces it behind the same trait. [`MemorySink`] keeps them in memory for tests.

use apiwarden_core::event::AuditEvent;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// Receives every audit event.
pub trait AuditSink: Send + Sync + 'static {
    /// Accepts an event. Must not block: it is called on the request path.
    fn record(&self, event: Box<AuditEvent>);
    /// Resolves when every event recorded before the call is written.
    fn flush(&self) -> oneshot::Receiver<()>;
    /// True while the sink can accept events (what `/readyz` reports).
    fn healthy(&self) -> bool {
        true
    }
}

/// Errors opening a sink.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot open the audit file {path}: {error}")]
    Open {
        path: PathBuf,
        error: std::io::Error,
    },
}

enum Msg {
    Event(Box<AuditEvent>),
    Flush(oneshot::Sender<()>),
}

/// Writes events as NDJSON to `<data_dir>/audit.ndjson` from a dedicated thread, in batches:
/// what arrived is written every 2 ms. Sequence numbers continue from
/// the last line already in the file.
pub struct NdjsonSink {
    tx: mpsc::UnboundedSender<Msg>,
    healthy: Arc<std::sync::atomic::AtomicBool>,
    path: PathBuf,
}

impl NdjsonSink {
    /// Opens (or creates) `<data_dir>/audit.ndjson` and starts the writer thread.
    pub fn open(data_dir: &Path) -> Result<Self, SinkError> {
        let path = data_dir.join("audit.ndjson");
        let err = |error| SinkError::Open {
            path: path.clone(),
            error,
        };
        std::fs::create_dir_all(data_dir).map_err(err)?;
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(err)?;
        let next_seq = last_seq(&mut file).map_err(err)?.map_or(1, |s| s + 1);
        let (tx, rx) = mpsc::unbounded_channel();
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let h = healthy.clone();
        std::thread::Builder::new()
            .name("audit-ndjson".into())
            .spawn(move || writer(file, rx, next_seq, h))
            .map_err(err)?;
        Ok(NdjsonSink { tx, healthy, path })
    }

    /// Where the events go.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn last_seq(file: &mut File) -> std::io::Result<Option<u64>> {
    // An event is at most a few times gateway.max_header_size; 4 MiB holds the last one.
    const WINDOW: u64 = 4 << 20;
    let len = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(len.saturating_sub(WINDOW)))?;
    let mut tail = Vec::new();
    file.take(WINDOW).read_to_end(&mut tail)?;
    let last = tail
        .split(|&b| b == b'\n')
        .rev()
        .find_map(|l| serde_json::from_slice::<serde_json::Value>(l).ok());
    Ok(last.and_then(|v| v["seq"].as_u64()))
}

/// How long the writer sleeps when its queue is empty. Polling instead of blocking on the
/// channel means `record` never has to wake a sleeping thread (a system call per event): the
/// writer takes what arrived in batches, and writes each batch with one `write`.
const WRITER_TICK: std::time::Duration = std::time::Duration::from_millis(2);

fn writer(
    mut file: File,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    mut seq: u64,
    healthy: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    // Events are encoded straight into the batch, which is written with one `write`.
    let mut batch: Vec<u8> = Vec::with_capacity(256 * 1024);
    loop {
        let mut disconnected = false;
        loop {
            match rx.try_recv() {
                Ok(Msg::Event(mut e)) => {
                    e.seq = seq;
                    seq += 1;
                    e.write_json(&mut batch);
                    batch.push(b'\n');
                    if batch.len() >= 256 * 1024 {
                        write_batch(&mut file, &mut batch, &healthy);
                    }
                }
                Ok(Msg::Flush(done)) => waiting.push(done),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    disconnected = true;
                    break;
                }
            }
        }
        write_batch(&mut file, &mut batch, &healthy);
        for w in waiting.drain(..) {
            let _ = w.send(());
        }
        if disconnected {
            return;
        }
        std::thread::sleep(WRITER_TICK);
    }
}

/// Writes the batch. On failure the batch is kept and tried again on the next tick (nothing
/// accepted is dropped), and the sink reports itself unhealthy until a write succeeds.
fn write_batch(file: &mut File, batch: &mut Vec<u8>, healthy: &std::sync::atomic::AtomicBool) {
    if batch.is_empty() {
        return;
    }
    match file.write_all(batch) {
        Ok(()) => {
            batch.clear();
            healthy.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Err(e) => {
            if healthy.swap(false, std::sync::atomic::Ordering::Relaxed) {
                tracing::error!(error = %e, bytes = batch.len(), "cannot write audit events; keeping them and retrying");
            }
        }
    }
}

impl AuditSink for NdjsonSink {
    fn record(&self, event: Box<AuditEvent>) {
        if self.tx.send(Msg::Event(event)).is_err() {
            tracing::error!("audit writer has stopped; an event could not be recorded");
            self.healthy
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn flush(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let _ = self.tx.send(Msg::Flush(tx));
        rx
    }

    fn healthy(&self) -> bool {
        self.healthy.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Keeps events in memory, numbered from 1. For tests and tools.
#[derive(Default, Clone)]
pub struct MemorySink {
    events: Arc<Mutex<Vec<AuditEvent>>>,
}

impl MemorySink {
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of every event so far.
    pub fn events(&self) -> Vec<AuditEvent> {
        self.events.lock().expect("memory sink poisoned").clone()
    }
}

impl AuditSink for MemorySink {
    fn record(&self, event: Box<AuditEvent>) {
        let mut event = *event;
        let mut events = self.events.lock().expect("memory sink poisoned");
        event.seq = events.len() as u64 + 1;
        events.push(event);
    }

    fn flush(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(());
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apiwarden_core::event::EventKind;

    #[tokio::test]
    async fn ndjson_sink_numbers_events_and_continues_after_restart() {
        let dir = std::env::temp_dir().join(format!("aw-ndjson-{}", crate::ids::new_id()));
        for _ in 0..2 {
            let sink = NdjsonSink::open(&dir).unwrap();
            for _ in 0..3 {
                sink.record(Box::new(AuditEvent::new(
                    EventKind::System,
                    crate::ids::new_id(),
                    Arc::from("t"),
                )));
            }
            sink.flush().await.unwrap();
        }
        let text = std::fs::read_to_string(dir.join("audit.ndjson")).unwrap();
        let seqs: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
