//! apiwarden's domain types: the configuration model, path normalisation, routing and the audit
//! event.
//!
//! Architecture invariant: this crate does no I/O and knows nothing of HTTP libraries or tokio;
//! everything here is a pure function of its inputs, so it can be tested and fuzzed alone.
#![forbid(unsafe_code)]

pub mod config;
pub mod event;
pub mod net;
pub mod path;
pub mod router;
pub mod units;
