//! Outbound federation requests: discovery of a destination (SPEC §6:
//! `.well-known`, SRV, address lookups under one deadline, `discovery.rs`
//! with `well_known.rs` and `dns.rs`), the connector that dials only
//! addresses outside the denylist with the discovered TLS name
//! (`connector.rs`, `denylist.rs`), and the signed HTTPS client that the
//! sender and the key ring use (`client.rs`, its errors in
//! `client_error.rs`), plus the bounded LRU map their caches share
//! (`lru.rs`), and the E2EE key calls to other servers (`user_keys.rs`,
//! `RemoteKeys` for the client) with the checks their answers pass before
//! anything of them is returned (`key_answers.rs`,
//! `device_list_answer.rs`). It decides nothing about retries or what to
//! send (the sender does) and verifies no signature it receives beyond
//! TLS.

pub mod client;
pub mod client_error;
pub mod connector;
pub mod denylist;
pub mod device_list_answer;
pub mod discovery;
pub mod dns;
pub mod key_answers;
pub mod lru;
pub mod user_keys;
pub mod well_known;
