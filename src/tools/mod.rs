//! Courier's own developer tools, apart from the relay: `courier demo`
//! (`demo.rs`; its Olm-encrypted scenario, feature `demo-olm`, in
//! `demo_olm.rs`; its device-list row in `demo_device_lists.rs`) and the in-process pair of dev relays it and the bench start
//! (`dev_pair.rs`), development certificates (`devcerts.rs`), the RPC client
//! behind `courier send` / `courier status` (`rpc_client.rs`), plain-HTTP
//! JSON for these tools (`plain_http.rs`) and the `courier bench` load
//! generator (`bench/`). Architecture Invariant: nothing in the relay
//! imports from here; the tools talk to relays only through the client API
//! and the RPC.

pub mod bench;
pub mod demo;
pub mod demo_device_lists;
#[cfg(feature = "demo-olm")]
pub mod demo_olm;
pub mod dev_pair;
pub mod devcerts;
pub mod plain_http;
pub mod rpc_client;
