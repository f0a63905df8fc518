//! Shared helpers for the integration tests, one module per concern: real
//! relays on loopback over real TLS (`relay`, `tls_client`), a plain-HTTP
//! JSON client for the client and RPC listeners (`http`), fake remote
//! homeservers and the outbound/sender harnesses (`fake_remote`,
//! `outbound_env`, `sender_env`, `dns_server`), the soak's TCP fault proxy
//! (`fault_proxy`), store wrappers and the shared
//! store suites (`counting_store`, `inhibiting_store`, `store_suite`,
//! `store_suite_keys`, `store_suite_device_lists`), the throwaway PostgreSQL cluster (`pg`), the kill-9
//! crash harnesses (`crash`, `crash_keys`, `crash_device_lists`, `crash_outbox`), running one test in a child
//! process of this binary (`child`), E2EE test identities with a signed
//! federation client (`e2ee`), a counting fake `RemoteKeys` for the
//! device-list domain (`counting_remote`), and a matrix-rust-sdk `OlmMachine` driven
//! over a relay's client API (`olm_peer`). Every
//! test module of the `it` binary imports what it needs as
//! `crate::support::…`.

pub mod child;
pub mod counting_remote;
pub mod counting_store;
pub mod crash;
pub mod crash_device_lists;
pub mod crash_keys;
pub mod crash_outbox;
pub mod dns_server;
pub mod e2ee;
pub mod fake_remote;
pub mod fault_proxy;
pub mod http;
pub mod inhibiting_store;
pub mod key_store_delegate;
pub mod olm_peer;
pub mod outbound_env;
pub mod pg;
pub mod relay;
pub mod sender_env;
#[macro_use]
pub mod store_suite;
#[macro_use]
pub mod store_suite_keys;
#[macro_use]
pub mod store_suite_device_lists;
pub mod tls_client;

pub use relay::{TestRelay, TestRelayOptions};

/// The version numbers of the migration files of a backend
/// (`migrations/<backend>/NNNN_*.sql`), sorted: what a fresh store must
/// have applied.
pub fn migration_files(backend: &str) -> Vec<u32> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(backend);
    let mut versions: Vec<u32> = std::fs::read_dir(&dir)
        .expect("the migrations directory")
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            let (number, _) = name.strip_suffix(".sql")?.split_once('_')?;
            number.parse().ok()
        })
        .collect();
    versions.sort_unstable();
    versions
}

/// The fence of a lease on `destination` for the test worker `"tests"`,
/// taken (or extended) for an hour: what a destination task holds when it
/// makes its outbox writes. Any store; with SQLite it is always epoch 0.
pub async fn lease_fence(
    store: &dyn courier::store::Store,
    destination: &str,
) -> courier::store::Fence {
    store
        .acquire_lease("tests", destination, courier::clock::now_ms(), 3_600_000)
        .await
        .expect("acquire lease")
        .expect("the test worker holds the lease")
}
