//! The to-device part of the client-server API on the `[client]` listener.
//! (Contract only; the to-device work fills it in.)

use axum::Router;

use crate::state::AppState;

pub fn router(state: AppState) -> Router {
    Router::new()
        .fallback(crate::error::unrecognized_route)
        .with_state(state)
}
