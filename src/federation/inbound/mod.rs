//! Inbound federation: the X-Matrix auth extractor ([`auth`]), request
//! bodies kept as checked JSON bytes ([`json`]), the `/send` body parser
//! ([`transaction`]), the per-origin rate limit ([`rate_limit`]),
//! `PUT /_matrix/federation/v1/send/{txnId}` ([`send`]) and the E2EE key
//! endpoints `/user/keys/query`, `/user/keys/claim`, `/user/devices`
//! ([`user_keys`]).
//!
//! It owns what a remote server may make us store: nothing reaches the store
//! from here unless the request's X-Matrix signature verified, the body
//! passed the transaction limits, and the EDU's sender belongs to the
//! authenticated origin. It does not fetch keys itself (the key ring does)
//! and does not process room events.
//!
//! The in-memory state of this module (rate-limit buckets, in-progress
//! transaction locks) lives in an [`InboundState`] ([`inbound_state`]), a
//! required part of `AppState` built by `server::run`, so the limits cannot
//! silently vanish from a route and two relays in one process never share
//! them.

pub mod auth;
pub mod inbound_state;
pub mod json;
pub mod rate_limit;
pub mod send;
pub mod transaction;
pub mod user_keys;

use axum::Router;
use axum::routing::{get, post, put};

use crate::state::AppState;

pub use auth::{Origin, SignedRequest};
pub use inbound_state::{InProgressGuard, InboundState, OriginsInProgress, TxnGuard, TxnLocks};
pub use json::JsonBody;
pub use transaction::{ParsedTxn, parse_transaction, parse_transaction_json};

/// The inbound federation routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/_matrix/federation/v1/send/{txn_id}",
            put(send::put_transaction_route).fallback(crate::error::method_not_allowed_route),
        )
        .route(
            "/_matrix/federation/v1/send/{txn_id}/",
            put(send::put_transaction_route).fallback(crate::error::method_not_allowed_route),
        )
        .route(
            "/_matrix/federation/v1/user/keys/query",
            post(user_keys::post_user_keys_query_route)
                .fallback(crate::error::method_not_allowed_route),
        )
        .route(
            "/_matrix/federation/v1/user/keys/claim",
            post(user_keys::post_user_keys_claim_route)
                .fallback(crate::error::method_not_allowed_route),
        )
        .route(
            "/_matrix/federation/v1/user/devices/{user_id}",
            get(user_keys::get_user_devices_route).fallback(crate::error::method_not_allowed_route),
        )
}
