//! The quarantine routes of the RPC: list quarantined EDUs, requeue one or
//! all of a destination's (back at the end of its queue, in their original
//! order), or drop one for good. Behind the RPC secret like every route.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::client_api::extract;
use crate::error::MatrixError;
use crate::state::AppState;

/// `?destination=` narrows `GET /_courier/v1/quarantine`.
#[derive(Debug, Deserialize)]
pub(super) struct QuarantineQuery {
    destination: Option<String>,
}

/// One quarantined EDU as listed by the RPC.
#[derive(Debug, Serialize)]
struct QuarantinedRow {
    destination: String,
    seq: i64,
    reason: String,
    quarantined_ts: i64,
    /// The EDU as it would have been sent.
    edu: Value,
}

pub(super) async fn get_quarantine_route(
    State(state): State<AppState>,
    query: Result<Query<QuarantineQuery>, QueryRejection>,
) -> Result<Response, MatrixError> {
    let query = extract::query(query)?;
    let rows = state
        .store
        .list_quarantined(query.destination.as_deref())
        .await
        .map_err(|error| MatrixError::internal("quarantine listing", &error))?;
    let quarantined: Vec<QuarantinedRow> = rows
        .into_iter()
        .map(|row| QuarantinedRow {
            edu: serde_json::from_str(&row.edu_json).unwrap_or(Value::String(row.edu_json)),
            destination: row.destination,
            seq: row.seq,
            reason: row.reason,
            quarantined_ts: row.quarantined_ts,
        })
        .collect();
    let body = serde_json::to_string(&json!({ "quarantined": quarantined }))
        .map_err(|error| MatrixError::internal("quarantine listing", &error))?;
    Ok(extract::json_text(body))
}

/// Puts a quarantined EDU back at the end of its destination's queue and
/// wakes the destination.
pub(super) async fn post_quarantined_retry_route(
    State(state): State<AppState>,
    path: Result<Path<(String, i64)>, PathRejection>,
) -> Result<Response, MatrixError> {
    let (destination, seq) = extract::path(path)?;
    release_quarantined(&state, &destination, seq, true).await?;
    state.sender.peer_is_up(&destination);
    tracing::info!(destination, seq, "quarantined EDU requeued by operator");
    Ok(extract::empty_object())
}

/// Puts every quarantined EDU of a destination back at the end of its
/// queue, in their original order, and wakes the destination. Answers
/// `{"requeued": n}` (0 when nothing was quarantined).
pub(super) async fn post_quarantine_requeue_all_route(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, MatrixError> {
    let destination = extract::path(path)?;
    let requeued = state
        .store
        .requeue_quarantined(&destination)
        .await
        .map_err(|error| MatrixError::internal("quarantine requeue", &error))?;
    if requeued > 0 {
        state.sender.peer_is_up(&destination);
    }
    tracing::info!(
        destination,
        requeued,
        "quarantined EDUs requeued by operator"
    );
    let body = serde_json::to_string(&json!({ "requeued": requeued }))
        .map_err(|error| MatrixError::internal("quarantine requeue", &error))?;
    Ok(extract::json_text(body))
}

/// Deletes a quarantined EDU for good.
pub(super) async fn delete_quarantined_route(
    State(state): State<AppState>,
    path: Result<Path<(String, i64)>, PathRejection>,
) -> Result<Response, MatrixError> {
    let (destination, seq) = extract::path(path)?;
    release_quarantined(&state, &destination, seq, false).await?;
    tracing::info!(destination, seq, "quarantined EDU dropped by operator");
    Ok(extract::empty_object())
}

async fn release_quarantined(
    state: &AppState,
    destination: &str,
    seq: i64,
    requeue: bool,
) -> Result<(), MatrixError> {
    let existed = state
        .store
        .release_quarantined(destination, seq, requeue)
        .await
        .map_err(|error| MatrixError::internal("quarantine release", &error))?;
    if existed {
        Ok(())
    } else {
        Err(MatrixError::not_found_resource(format!(
            "no quarantined EDU {seq} for {destination}"
        )))
    }
}
