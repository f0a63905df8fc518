//! The homeserver's internal API and `/metrics` on the `[rpc]` listener.
//! (Contract only; the to-device work fills it in.)

use axum::Router;

use crate::state::AppState;

pub fn router(state: AppState) -> Router {
    Router::new()
        .fallback(crate::error::unrecognized_route)
        .with_state(state)
}
