//! The apiwarden gateway: listeners, the request pipeline, the proxy, the admin listener and
//! the audit sinks.
//!
//! Architecture invariant: this is the only crate that knows HTTP. The request path is in
//! `pipeline.rs`, from the first byte of a request to its audit event.
#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_api;
pub mod audit;
pub mod blocklist;
pub mod body;
pub mod echo;
mod h2watch;
pub mod http_client;
pub mod ids;
pub mod introspect;
pub mod jwt;
pub mod keystore;
pub mod ledger;
pub mod ledger_crypt;
pub mod ledger_index;
pub mod ledger_verify;
pub mod limit;
pub mod metrics;
pub mod pipeline;
pub mod respond;
pub mod server;
pub mod tag;
pub mod tls;
pub mod upstream;
pub mod wakeups;

pub use server::{Gateway, Options, ReloadError, StartError};

/// Unix time in milliseconds: the time stored with keys and block list entries.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
