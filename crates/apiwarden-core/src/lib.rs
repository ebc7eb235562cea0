//! apiwarden's domain types: the configuration model, path normalisation, routing, the audit
//! event, the audit ledger's cryptography (`ledger`) and the SIEM formats of its events (`siem`).
//!
//! Architecture invariant: this crate does no I/O and knows nothing of HTTP libraries or tokio;
//! everything here is a pure function of its inputs, so it can be tested and fuzzed alone.
#![forbid(unsafe_code)]

pub mod apikey;
pub mod block;
pub mod config;
pub mod event;
pub mod ledger;
pub mod limit;
pub mod net;
pub mod path;
pub mod router;
pub mod siem;
pub mod units;

/// A small deterministic generator for the randomised tests (no dependency, same cases on
/// every run).
#[cfg(test)]
pub(crate) struct XorShift(pub u64);

#[cfg(test)]
impl XorShift {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// An index below `len`.
    pub(crate) fn below(&mut self, len: usize) -> usize {
        (self.next() % len as u64) as usize
    }
}
