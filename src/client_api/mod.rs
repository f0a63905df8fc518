//! The to-device part of the client-server API on the `[client]` listener
//! (SPEC §1): `PUT /sendToDevice/{eventType}/{txnId}`, the to-device subset
//! of `GET /sync` (long-poll, at most 100 events, acknowledged by the next
//! `since`) with its E2EE fields (one-time and fallback key counts and
//! `device_lists`, SPEC-E2EE §2.5), `GET /versions` and `GET
//! /account/whoami`; device management is in `devices`. Authentication
//! happens once, in the `AuthedDevice` extractor; the domain work is in
//! `todevice` and `e2ee`. This module does not register devices or tokens
//! (the RPC does) and does not serve rooms, presence or anything else of
//! `/sync`.

pub mod devices;
pub mod extract;
pub mod keys;
pub mod uia;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::response::Response;
use axum::routing::{get, put};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::e2ee::devices::sync_counts;
use crate::error::MatrixError;
use crate::federation::inbound::rate_limit::{OriginRateLimiter, admit};
use crate::identifiers::UserId;
use crate::state::AppState;
use crate::todevice::{MAX_EVENTS_PER_SYNC, SendRequest, SyncToken};
use extract::{AuthedDevice, refused};

/// The spec versions we claim. The to-device endpoints we serve have had
/// this shape since v1.1.
const SUPPORTED_VERSIONS: &[&str] = &[
    "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10", "v1.11",
    "v1.12",
];

/// Per-user send buckets (`[client] sends_per_user_per_sec`), shared by
/// the send routes through an extension.
#[derive(Clone)]
struct SendRateLimit {
    limiter: Arc<OriginRateLimiter>,
    rate: u32,
    shape: crate::config::RateShape,
}

pub fn router(state: AppState) -> Router {
    let send_rate = SendRateLimit {
        limiter: Arc::new(OriginRateLimiter::new()),
        rate: state.config.client.sends_per_user_per_sec,
        shape: state.config.client.send_rate_shape,
    };
    Router::new()
        .route("/_matrix/client/versions", get(get_versions_route))
        .route(
            "/_matrix/client/v3/sendToDevice/{event_type}/{txn_id}",
            put(put_send_to_device_route),
        )
        .route(
            "/_matrix/client/r0/sendToDevice/{event_type}/{txn_id}",
            put(put_send_to_device_route),
        )
        .route("/_matrix/client/v3/sync", get(get_sync_route))
        .route("/_matrix/client/r0/sync", get(get_sync_route))
        .route("/_matrix/client/v3/account/whoami", get(get_whoami_route))
        .route("/_matrix/client/r0/account/whoami", get(get_whoami_route))
        .merge(devices::routes())
        .merge(keys::routes())
        .fallback(crate::error::unrecognized_route)
        .method_not_allowed_fallback(crate::error::method_not_allowed_route)
        .layer(Extension(send_rate))
        .with_state(state)
}

async fn get_versions_route() -> Response {
    extract::json_text(
        json!({ "versions": SUPPORTED_VERSIONS, "unstable_features": {} }).to_string(),
    )
}

async fn get_whoami_route(AuthedDevice(device): AuthedDevice) -> Response {
    extract::json_text(
        json!({ "user_id": device.user_id, "device_id": device.device_id }).to_string(),
    )
}

async fn put_send_to_device_route(
    State(state): State<AppState>,
    Extension(send_rate): Extension<SendRateLimit>,
    AuthedDevice(device): AuthedDevice,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, MatrixError> {
    let user_id = device.user_id.as_str();
    // Before the body is parsed: a user over the rate costs a bucket check.
    admit(&send_rate.limiter, user_id, send_rate.rate, send_rate.shape)
        .await
        .map_err(|e| refused(e, user_id))?;
    let (event_type, txn_id) = extract::path(path).map_err(|e| refused(e, user_id))?;
    let mut body = extract::json_object(body, false).map_err(|e| refused(e, user_id))?;
    let messages = match body.remove("messages") {
        None => {
            return Err(refused(
                MatrixError::missing_param("Missing required field: messages"),
                user_id,
            ));
        }
        Some(Value::Object(messages)) => messages,
        Some(_) => {
            return Err(refused(
                MatrixError::bad_json("messages must be an object"),
                user_id,
            ));
        }
    };
    let sender = UserId::parse(user_id)
        .map_err(|error| MatrixError::internal("registered user ID no longer parses", &error))?;
    let request = SendRequest {
        sender,
        sender_device: device.device_id.clone(),
        event_type,
        txn_id,
        messages,
    };
    state
        .todevice
        .send(request)
        .await
        .map_err(|error| refused(error.into(), user_id))?;
    Ok(extract::empty_object())
}

/// The query parameters `/sync` reads; every other one is ignored.
#[derive(Debug, Deserialize)]
struct SyncParams {
    since: Option<String>,
    timeout: Option<String>,
    full_state: Option<String>,
}

async fn get_sync_route(
    State(state): State<AppState>,
    AuthedDevice(device): AuthedDevice,
    query: Result<Query<SyncParams>, QueryRejection>,
) -> Result<Response, MatrixError> {
    metrics::counter!("courier_sync_requests_total", "api" => "client").increment(1);
    let user_id = device.user_id.as_str();
    let params = extract::query(query).map_err(|e| refused(e, user_id))?;
    let since = parse_since_param(params.since.as_deref()).map_err(|e| refused(e, user_id))?;
    let timeout_ms = extract::int_param("timeout", params.timeout.as_deref())
        .map_err(|e| refused(e, user_id))?
        .unwrap_or(0);
    // An initial sync (no since) and full_state answer at once (SPEC §1.3).
    let initial = params.since.as_deref().is_none_or(str::is_empty);
    let full_state = params.full_state.as_deref() == Some("true");
    let timeout = if full_state || initial {
        Duration::ZERO
    } else {
        Duration::from_millis(timeout_ms).min(state.config.client.max_sync_timeout)
    };
    // An initial sync reports no device-list changes (only incremental
    // syncs do, SPEC-E2EE §2.5); its token starts at the log's position.
    let device_list_after = (!initial).then_some(since.device_list);
    let (store, e2ee, device) = (&*state.store, &*state.e2ee, &device);
    // Both the inbox and the device-list log are read on every pass, so a
    // long-poll woken by a device change (`E2ee::device_list_changed`)
    // answers with it, and one woken by a message does too.
    // One store hop per pass reads the inbox, the log's position and the
    // key counts (`Store::sync_read`).
    let (page, lists, counts) = state
        .todevice
        .long_poll(device, timeout, move || async move {
            let read = store
                .sync_read(
                    &device.user_id,
                    &device.device_id,
                    since.inbox,
                    MAX_EVENTS_PER_SYNC,
                )
                .await?;
            let lists = e2ee
                .device_list_news_at(
                    &device.user_id,
                    device_list_after,
                    read.device_list_position,
                )
                .await?;
            let page = read.page;
            let ready =
                !page.messages.is_empty() || !lists.changed.is_empty() || !lists.left.is_empty();
            Ok(((page, lists, sync_counts(read.key_counts)), ready))
        })
        .await
        .map_err(|error| MatrixError::internal("sync read", &error))?;
    let next_batch = SyncToken {
        inbox: page.next_batch,
        device_list: lists.position,
    };
    if !page.messages.is_empty() && tracing::enabled!(tracing::Level::DEBUG) {
        // The messages this answer hands out; the next `since` (this
        // `next_batch`) acknowledges them, which the trace journal records.
        let message_ids: Vec<&str> = page
            .messages
            .iter()
            .map(|m| m.message_id.as_str())
            .collect();
        tracing::debug!(
            user_id = %device.user_id,
            device_id = %device.device_id,
            since = since.inbox,
            next_batch = page.next_batch,
            message_ids = %message_ids.join(","),
            "sync hands out to-device messages"
        );
    }
    let mut out = String::with_capacity(256 + page.messages.len() * 256);
    out.push_str("{\"next_batch\":");
    extract::push_json_string(&mut out, &next_batch.format());
    out.push_str(",\"to_device\":{\"events\":");
    extract::write_events(&mut out, &page.messages);
    out.push_str("},\"device_lists\":");
    out.push_str(&json!({ "changed": lists.changed, "left": lists.left }).to_string());
    out.push_str(",\"device_one_time_keys_count\":");
    out.push_str(&json!(counts.one_time).to_string());
    out.push_str(",\"device_unused_fallback_key_types\":");
    out.push_str(&json!(counts.unused_fallback).to_string());
    out.push('}');
    Ok(extract::json_text(out))
}

/// A `since` token: absent (or empty) → position 0 of both streams;
/// malformed → `M_INVALID_PARAM`.
pub fn parse_since_param(raw: Option<&str>) -> Result<SyncToken, MatrixError> {
    match raw {
        None | Some("") => Ok(SyncToken::default()),
        Some(token) => SyncToken::parse(token)
            .ok_or_else(|| MatrixError::invalid_param("since is not a token this server issued")),
    }
}
