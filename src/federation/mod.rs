//! Server-server federation: the outbound HTTPS client and discovery, the
//! per-destination sender, inbound `/send` with X-Matrix authentication,
//! remote key fetching, and the key/version endpoints we serve.

pub mod inbound;
pub mod key_server;
pub mod keyring;
pub mod outbound;
pub mod sender;

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
