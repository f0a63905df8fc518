//! Outbound federation requests: discovery of a destination (SPEC §6:
//! `.well-known`, SRV, address lookups under one deadline, `discovery.rs`
//! with `well_known.rs` and `dns.rs`), the connector that dials only
//! addresses outside the denylist with the discovered TLS name
//! (`connector.rs`, `denylist.rs`), and the signed HTTPS client that the
//! sender and the key ring use (`client.rs`, its errors in
//! `client_error.rs`), plus the bounded LRU map their caches share
//! (`lru.rs`). It decides nothing about retries or what to send (the
//! sender does) and verifies nothing it receives beyond TLS.

pub mod client;
pub mod client_error;
pub mod connector;
pub mod denylist;
pub mod discovery;
pub mod dns;
pub mod lru;
pub mod user_keys;
pub mod well_known;
