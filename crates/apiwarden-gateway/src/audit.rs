//! The audit-sink interface and its first implementations.
//!
//! The pipeline's record stage hands every finished event to an [`AuditSink`] without blocking.
//! The ledger (`ledger.rs`) is the sink of the binary; [`MemorySink`] keeps events in memory
//! for tests.

use apiwarden_core::event::AuditEvent;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Receives every audit event.
pub trait AuditSink: Send + Sync + 'static {
    /// Accepts an event. Must not block: it is called on the request path.
    fn record(&self, event: Box<AuditEvent>);
    /// Resolves when every event recorded before the call is written.
    fn flush(&self) -> oneshot::Receiver<()>;
    /// Records `event` and resolves with its sequence number once it is durable, or with an
    /// error when the sink cannot write it now (the `strict` ledger's gate before forwarding).
    /// The event is borrowed: the request goes on with it, and records its outcome later.
    fn record_durable(&self, event: &AuditEvent) -> oneshot::Receiver<Result<u64, ()>> {
        self.record(Box::new(event.clone()));
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Ok(0));
        rx
    }
    /// True while the sink can accept events (what `/readyz` reports).
    fn healthy(&self) -> bool {
        true
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

    fn record_durable(&self, event: &AuditEvent) -> oneshot::Receiver<Result<u64, ()>> {
        let mut event = event.clone();
        let mut events = self.events.lock().expect("memory sink poisoned");
        event.seq = events.len() as u64 + 1;
        let seq = event.seq;
        events.push(event);
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Ok(seq));
        rx
    }

    fn flush(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(());
        rx
    }
}
