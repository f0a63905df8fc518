//! Courier: a Matrix federation relay for send-to-device messages.
//!
//! The library holds everything; `main.rs` is a thin command-line edge over
//! it. See ARCHITECTURE.md for the codemap and the invariants.

pub mod canonical_json;
pub mod cli;
pub mod client_api;
pub mod cluster;
pub mod config;
pub mod e2ee;
pub mod error;
pub mod federation;
pub mod identifiers;
pub mod keys;
pub mod listener;
pub mod metrics;
pub mod notify;
pub mod rpc;
pub mod server;
pub mod signing;
pub mod state;
pub mod store;
pub mod tls;
pub mod todevice;
pub mod tools;
pub mod xmatrix;

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
