//! The integration tests, as one test binary (`it`) so the relay and the
//! test dependencies are linked once instead of once per file: `support`
//! holds the shared helpers (`tests/it/support/`), and every other module is
//! one former test file (`tests/it/<name>.rs`), named as before, so a test is
//! selected as `cargo test --test it <module>::<test>`. `tests/tidy.rs`, which
//! reads only the source tree, stays its own small binary.

#[macro_use]
mod support;

mod bench;
mod client_api;
mod crypto;
mod crypto_ruma;
mod device_list_domain;
mod device_lists_e2e;
mod device_lists_edges;
mod discovery;
mod e2ee_devices;
mod e2ee_federation;
mod e2ee_keys;
mod edge_parsers;
mod federation_inbound;
mod federation_refusals;
mod federation_sender;
mod federation_sender_timing;
mod forged_origins;
mod key_rotation;
mod listener_limits;
mod olm;
mod outbound_client;
mod relay_lifecycle;
mod remote_keys;
mod retention;
mod rpc;
mod scenarios;
mod sender_metrics;
mod soak;
mod store_conformance;
mod store_crash;
mod store_crash_postgres;
mod store_postgres;
mod store_postgres_fence;
mod trace;
mod workers;
