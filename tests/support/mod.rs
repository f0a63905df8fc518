//! Shared helpers for the integration tests: real relays on loopback over
//! real TLS (`TestRelay`), and a small plain-HTTP JSON client for the client
//! and RPC listeners (`http`). Each test binary includes this with
//! `mod support;` and uses what it needs.

#![allow(dead_code, unused_imports)]

pub mod http;
pub mod relay;
pub mod tls_client;

pub use relay::{TestRelay, TestRelayOptions};
