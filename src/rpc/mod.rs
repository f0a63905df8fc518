//! The homeserver's internal API and `/metrics` on the `[rpc]` listener
//! (docs/rpc.md documents every route). Every route, `/metrics` included,
//! requires `Authorization: Bearer <rpc.secret>`, compared in constant
//! time by one middleware layer (an unknown path is a 404 without it). Handlers parse their input into domain
//! calls on the store, `todevice`, `e2ee` and the sender handle; this module holds
//! no state and no SQL, and never serves clients (no access tokens here).

mod device_lists;
mod quarantine;

use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::client_api::extract::{self, bearer_token};
use crate::client_api::parse_since_param;
use crate::e2ee::devices::{Via, check_display_name};
use crate::error::MatrixError;
use crate::identifiers::{ServerName, UserId};
use crate::state::AppState;
use crate::store::DeviceKey;
use crate::todevice::{MAX_EVENTS_PER_SYNC, MAX_IDENTIFIER_BYTES, SendRequest, SyncToken};

/// One row of `GET /_courier/v1/destinations` (the wire type; `courier
/// status` reads it back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationRow {
    pub destination: String,
    /// Queued, not quarantined EDUs.
    pub pending_edus: u64,
    /// Device messages inside those EDUs.
    pub pending_messages: u64,
    /// Age of the oldest queued EDU, if any.
    pub oldest_pending_age_ms: Option<i64>,
    /// Consecutive failures since the last success.
    pub failures: u32,
    /// Unix ms before which the destination is not retried (0: no wait).
    pub next_retry_ms: i64,
    pub last_success_ms: Option<i64>,
    pub last_error: Option<String>,
    /// EDUs set aside after repeated refusals.
    pub quarantined: u64,
    /// Unix ms since which the destination refuses every EDU (F6): it is
    /// backed off and nothing more of it is quarantined. Absent: it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusing_since_ms: Option<i64>,
}

/// How many undelivered messages were expired for one reason, over the
/// store's life (`store::retention`; persisted, so it survives restarts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpiredRow {
    /// `inbox` or `outbox` (the `kind` label of `courier_expired_messages_total`).
    pub kind: String,
    /// `ttl`, `inbox_cap` or `dead_destination`.
    pub reason: String,
    /// Rows expired: inbox messages, or outbox EDUs (one `message_id` each).
    pub count: u64,
}

/// The body of `GET /_courier/v1/destinations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationsResponse {
    pub destinations: Vec<DestinationRow>,
    /// Every expiry reason with its persisted total (0 when none yet).
    #[serde(default)]
    pub expired: Vec<ExpiredRow>,
}

pub fn router(state: AppState) -> Router {
    let body_limit = state.config.client.max_request_bytes;
    Router::new()
        .route(
            "/_courier/v1/devices/{user_id}/{device_id}",
            put(put_device_route).delete(delete_device_route),
        )
        .route("/_courier/v1/devices/{user_id}", get(get_devices_route))
        .route(
            "/_courier/v1/users/{user_id}/devices",
            get(get_device_states_route),
        )
        .route(
            "/_courier/v1/send_to_device",
            post(post_send_to_device_route),
        )
        .route(
            "/_courier/v1/inbox/{user_id}/{device_id}",
            get(get_inbox_route),
        )
        .route("/_courier/v1/destinations", get(get_destinations_route))
        .route(
            "/_courier/v1/destinations/{destination}/wake",
            post(post_destination_wake_route),
        )
        .route(
            "/_courier/v1/quarantine",
            get(quarantine::get_quarantine_route),
        )
        .route(
            "/_courier/v1/quarantine/{destination}/{seq}",
            axum::routing::delete(quarantine::delete_quarantined_route),
        )
        .route(
            "/_courier/v1/quarantine/{destination}/{seq}/retry",
            post(quarantine::post_quarantined_retry_route),
        )
        .route(
            "/_courier/v1/quarantine/{destination}/requeue_all",
            post(quarantine::post_quarantine_requeue_all_route),
        )
        .route("/_courier/v1/trace", get(get_trace_route))
        .route("/metrics", get(get_metrics_route))
        .merge(device_lists::routes())
        // Every route needs the secret; an unknown path is a plain 404.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_secret,
        ))
        .fallback(crate::error::unrecognized_route)
        .method_not_allowed_fallback(crate::error::method_not_allowed_route)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// The query of `GET /_courier/v1/trace`: `id` (a message_id or txn_id)
/// or `user` (with an optional `device`).
#[derive(Debug, Deserialize)]
struct TraceParams {
    id: Option<String>,
    user: Option<String>,
    device: Option<String>,
}

/// What the trace journal knows about a message, a transaction or a user's
/// recent messages (`crate::trace::TraceReport`); 404 `M_NOT_FOUND` "no
/// record of …" when nothing.
async fn get_trace_route(
    State(state): State<AppState>,
    query: Result<Query<TraceParams>, QueryRejection>,
) -> Result<Response, MatrixError> {
    let params = extract::query(query)?;
    let (target, device) = match (&params.id, &params.user) {
        (Some(id), None) => (id.as_str(), params.device.as_deref()),
        (None, Some(user)) => (user.as_str(), params.device.as_deref()),
        _ => {
            return Err(MatrixError::invalid_param(
                "give exactly one of id and user",
            ));
        }
    };
    if params.user.is_some() && !target.starts_with('@') {
        return Err(MatrixError::invalid_param(format!(
            "{target:?} is not a user ID"
        )));
    }
    let trace_query = crate::trace::parse_query(target, device)
        .map_err(|e| MatrixError::invalid_param(e.to_string()))?;
    let records = state
        .store
        .trace_journal(&trace_query)
        .await
        .map_err(|error| MatrixError::internal("trace", &error))?;
    let described = match &trace_query {
        crate::store::trace::TraceQuery::User {
            user_id,
            device_id: Some(device_id),
        } => format!("{user_id} {device_id}"),
        _ => target.to_owned(),
    };
    let txn_query = !matches!(trace_query, crate::store::trace::TraceQuery::User { .. });
    let report = crate::trace::assemble(&described, &records, txn_query);
    if !report.found {
        return Err(MatrixError::not_found_resource(format!(
            "no record of {described}"
        )));
    }
    let body =
        serde_json::to_string(&report).map_err(|error| MatrixError::internal("trace", &error))?;
    Ok(extract::json_text(body))
}

/// Refuses any request without the shared secret.
async fn require_secret(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(token) = bearer_token(request.headers()) else {
        metrics::counter!("courier_rpc_rejections_total", "errcode" => "M_MISSING_TOKEN")
            .increment(1);
        return MatrixError::missing_token().into_response();
    };
    let matches: bool = token
        .as_bytes()
        .ct_eq(state.config.rpc.secret.as_bytes())
        .into();
    if !matches {
        tracing::warn!(path = %request.uri().path(), "rpc request with a wrong secret");
        metrics::counter!("courier_rpc_rejections_total", "errcode" => "M_UNAUTHORIZED")
            .increment(1);
        return MatrixError::unauthorized("Wrong RPC secret").into_response();
    }
    next.run(request).await
}

/// A user ID that parses and belongs to this server.
fn local_user(state: &AppState, raw: &str) -> Result<UserId, MatrixError> {
    let user = UserId::parse(raw)
        .map_err(|_| MatrixError::invalid_param(format!("{raw:?} is not a user ID")))?;
    if user.server_name() != state.config.server_name.as_str() {
        return Err(MatrixError::invalid_param(format!(
            "{raw} is not a user of {}",
            state.config.server_name
        )));
    }
    Ok(user)
}

fn check_device_id(device_id: &str) -> Result<(), MatrixError> {
    if device_id.is_empty() || device_id == "*" || device_id.len() > MAX_IDENTIFIER_BYTES {
        return Err(MatrixError::invalid_param(
            "device ID must be 1 to 255 bytes and not *",
        ));
    }
    Ok(())
}

async fn put_device_route(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, MatrixError> {
    let (user_id, device_id) = extract::path(path)?;
    let user = local_user(&state, &user_id)?;
    check_device_id(&device_id)?;
    let body = extract::json_object(body, true)?;
    let token = match body.get("access_token") {
        None | Some(Value::Null) => None,
        Some(Value::String(token)) if !token.is_empty() && !token.contains(char::is_whitespace) => {
            Some(token.as_str())
        }
        Some(_) => {
            return Err(MatrixError::bad_json(
                "access_token must be a non-empty string without spaces",
            ));
        }
    };
    // Absent: the name stays as it is; null clears it.
    let display_name = match body.get("display_name") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(name)) => {
            check_display_name(name)?;
            Some(Some(name.as_str()))
        }
        Some(_) => {
            return Err(MatrixError::bad_json(
                "display_name must be a string or null",
            ));
        }
    };
    state
        .store
        .upsert_device(user.as_str(), &device_id, token)
        .await
        .map_err(|error| MatrixError::internal("device registration", &error))?;
    // A second store call: a failure here leaves the device registered with
    // its old name, and the homeserver's retry (the call is idempotent)
    // sets it.
    if let Some(display_name) = display_name {
        state
            .e2ee
            .rename_device(user.as_str(), &device_id, display_name, Via::Rpc)
            .await?;
    }
    tracing::info!(user_id = %user, device_id, with_token = token.is_some(), "device registered");
    Ok(extract::empty_object())
}

async fn delete_device_route(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, MatrixError> {
    let (user_id, device_id) = extract::path(path)?;
    // With its tokens, inbox and keys, logged as a device-list change.
    let deleted = state
        .e2ee
        .delete_devices(&user_id, &[device_id], Via::Rpc)
        .await?;
    if deleted.is_empty() {
        return Err(MatrixError::not_found_resource("No such device"));
    }
    Ok(extract::empty_object())
}

/// `GET /_courier/v1/users/{userId}/devices`: every device of a local user
/// with its display name and key state.
async fn get_device_states_route(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, MatrixError> {
    let user_id = extract::path(path)?;
    let user = local_user(&state, &user_id)?;
    let states = state
        .e2ee
        .device_states(user.as_str())
        .await
        .map_err(|error| MatrixError::internal("device state listing", &error))?;
    let devices: Vec<Value> = states
        .devices
        .into_iter()
        .map(|device| {
            json!({
                "device_id": device.device_id,
                "display_name": device.display_name,
                "has_device_keys": device.has_device_keys,
                "one_time_key_counts": device.one_time_keys,
                "unused_fallback_key_types": device.unused_fallback_key_types,
            })
        })
        .collect();
    Ok(extract::json_text(
        json!({ "user_id": user.as_str(), "stream_id": states.stream_id, "devices": devices })
            .to_string(),
    ))
}

async fn get_devices_route(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, MatrixError> {
    let user_id = extract::path(path)?;
    let devices = state
        .store
        .list_devices(&user_id)
        .await
        .map_err(|error| MatrixError::internal("device listing", &error))?;
    Ok(extract::json_text(
        json!({ "devices": devices }).to_string(),
    ))
}

/// A required string field of an RPC body.
fn string_field(
    body: &mut serde_json::Map<String, Value>,
    name: &str,
) -> Result<String, MatrixError> {
    match body.remove(name) {
        None => Err(MatrixError::missing_param(format!(
            "Missing required field: {name}"
        ))),
        Some(Value::String(value)) => Ok(value),
        Some(_) => Err(MatrixError::bad_json(format!("{name} must be a string"))),
    }
}

async fn post_send_to_device_route(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, MatrixError> {
    let mut body = extract::json_object(body, false)?;
    let sender = string_field(&mut body, "sender")?;
    let event_type = string_field(&mut body, "type")?;
    let txn_id = string_field(&mut body, "txn_id")?;
    let messages = match body.remove("messages") {
        None => {
            return Err(MatrixError::missing_param(
                "Missing required field: messages",
            ));
        }
        Some(Value::Object(messages)) => messages,
        Some(_) => return Err(MatrixError::bad_json("messages must be an object")),
    };
    let sender = local_user(&state, &sender)?;
    let request = SendRequest {
        sender,
        sender_device: String::new(),
        event_type,
        txn_id,
        messages,
    };
    state.todevice.send(request).await.map_err(|error| {
        let error = MatrixError::from(error);
        tracing::info!(errcode = error.errcode, error = %error.message, "rpc send refused");
        error
    })?;
    Ok(extract::empty_object())
}

#[derive(Debug, Deserialize)]
struct InboxParams {
    since: Option<String>,
    limit: Option<String>,
    timeout: Option<String>,
}

async fn get_inbox_route(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<InboxParams>, QueryRejection>,
) -> Result<Response, MatrixError> {
    metrics::counter!("courier_sync_requests_total", "api" => "rpc").increment(1);
    let (user_id, device_id) = extract::path(path)?;
    let params = extract::query(query)?;
    let since = parse_since_param(params.since.as_deref())?;
    let limit = extract::int_param("limit", params.limit.as_deref())?
        .unwrap_or(u64::from(MAX_EVENTS_PER_SYNC));
    if limit == 0 || limit > u64::from(MAX_EVENTS_PER_SYNC) {
        return Err(MatrixError::invalid_param("limit must be 1 to 100"));
    }
    let timeout_ms = extract::int_param("timeout", params.timeout.as_deref())?.unwrap_or(0);
    // As for /sync: without since, answer at once.
    let timeout = if params.since.is_none() {
        Duration::ZERO
    } else {
        Duration::from_millis(timeout_ms).min(state.config.client.max_sync_timeout)
    };
    let device = DeviceKey { user_id, device_id };
    let page = state
        .todevice
        .wait_for_inbox(&device, since.inbox, limit as u32, timeout)
        .await
        .map_err(|error| MatrixError::internal("rpc inbox read", &error))?;
    let mut out = String::with_capacity(64 + page.messages.len() * 256);
    out.push_str("{\"events\":");
    extract::write_events(&mut out, &page.messages);
    out.push_str(",\"next_batch\":");
    // The inbox reads no device lists: the token's device-list position
    // passes through unchanged.
    let next_batch = SyncToken {
        inbox: page.next_batch,
        device_list: since.device_list,
    };
    extract::push_json_string(&mut out, &next_batch.format());
    out.push('}');
    Ok(extract::json_text(out))
}

async fn get_destinations_route(State(state): State<AppState>) -> Result<Response, MatrixError> {
    let statuses = state
        .store
        .destination_statuses()
        .await
        .map_err(|error| MatrixError::internal("destination listing", &error))?;
    let now = crate::clock::now_ms();
    let destinations = statuses
        .into_iter()
        .map(|status| DestinationRow {
            oldest_pending_age_ms: status.oldest_queued_ts.map(|ts| (now - ts).max(0)),
            destination: status.destination,
            pending_edus: status.pending_edus,
            pending_messages: status.pending_messages,
            failures: status.retry.failures,
            next_retry_ms: status.retry.retry_after_ms,
            last_success_ms: status.retry.last_success_ms,
            last_error: status.retry.last_error,
            quarantined: status.quarantined,
            refusing_since_ms: status.refusing_since_ms,
        })
        .collect();
    let totals = state
        .store
        .expiry_totals()
        .await
        .map_err(|error| MatrixError::internal("expiry totals", &error))?;
    let expired = crate::store::ExpiryReason::ALL
        .into_iter()
        .map(|reason| ExpiredRow {
            kind: reason.kind().as_str().to_owned(),
            reason: reason.as_str().to_owned(),
            count: totals
                .iter()
                .filter(|t| t.reason == reason)
                .map(|t| t.count)
                .sum(),
        })
        .collect();
    let body = serde_json::to_string(&DestinationsResponse {
        destinations,
        expired,
    })
    .map_err(|error| MatrixError::internal("destination listing", &error))?;
    Ok(extract::json_text(body))
}

async fn post_destination_wake_route(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, MatrixError> {
    let destination = extract::path(path)?;
    let destination = ServerName::parse(&destination)
        .map_err(|_| MatrixError::invalid_param(format!("{destination:?} is not a server name")))?;
    state.sender.peer_is_up(destination.as_str());
    tracing::info!(destination = %destination, "destination woken by operator");
    Ok(extract::empty_object())
}

async fn get_metrics_route(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
