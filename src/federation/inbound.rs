//! Inbound federation: the X-Matrix auth extractor and
//! `PUT /_matrix/federation/v1/send/{txnId}`. (Contract only; the inbound
//! federation work fills it in.)

use axum::Router;

use crate::state::AppState;

/// The inbound federation routes.
pub fn routes() -> Router<AppState> {
    Router::new()
}
