//! Server-server federation: the outbound HTTPS client and discovery, the
//! per-destination sender, inbound `/send` with X-Matrix authentication,
//! remote key fetching, and the key/version endpoints we serve.

pub mod backoff;
pub mod client;
pub mod client_error;
pub mod connector;
pub mod denylist;
pub mod destination;
pub mod discovery;
pub mod dns;
pub mod inbound;
pub mod key_server;
pub mod keyring;
pub mod lru;
pub mod sender;
pub mod transaction;
pub mod well_known;

use axum::Router;

use crate::state::AppState;

/// Everything served on the federation (TLS) listener.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(key_server::routes())
        .merge(inbound::routes())
        .fallback(crate::error::unrecognized_route)
        .with_state(state)
}
