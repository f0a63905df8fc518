//! What we serve about ourselves without authentication:
//! `GET /_matrix/key/v2/server` (our signed key document) and
//! `GET /_matrix/federation/v1/version`.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::keys::server_key_document;
use crate::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/_matrix/key/v2/server",
            get(get_server_key_route).fallback(crate::error::method_not_allowed_route),
        )
        .route(
            "/_matrix/key/v2/server/",
            get(get_server_key_route).fallback(crate::error::method_not_allowed_route),
        )
        .route(
            "/_matrix/federation/v1/version",
            get(get_version_route).fallback(crate::error::method_not_allowed_route),
        )
}

async fn get_server_key_route(State(state): State<AppState>) -> Json<Value> {
    let valid_until = crate::clock::now_ms() + state.config.key_validity.as_millis() as i64;
    Json(server_key_document(
        state.config.server_name.as_str(),
        &state.signing_key,
        &state.config.old_verify_keys,
        valid_until,
    ))
}

async fn get_version_route() -> Json<Value> {
    Json(json!({ "server": { "name": "Courier", "version": env!("CARGO_PKG_VERSION") } }))
}
