//! The key endpoints other servers call (SPEC-E2EE §3.1–§3.3):
//! `POST /_matrix/federation/v1/user/keys/query`,
//! `POST /_matrix/federation/v1/user/keys/claim` and
//! `GET /_matrix/federation/v1/user/devices/{userId}`. Like `/send`: the
//! X-Matrix signature is verified by [`SignedRequest`], the origin is
//! admitted under its rate limit, and the `e2ee` core answers, for local
//! users only (a request naming another server's user is refused whole).
//! Display names are shared only with `[e2ee] device_names_over_federation`;
//! user-signing keys never leave the server.
//!
//! A server that asked for a user's keys or devices is interested in that
//! user's device list: after a query or `/user/devices` is answered, the
//! origin is recorded (`E2ee::record_remote_interest`) and gets the users'
//! `m.device_list_update` EDUs for `[e2ee] interest_window` days. A claim
//! records nothing (a claimer has queried first).

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::response::Response;
use serde_json::{Map, Value, json};

use crate::client_api::extract::json_text;
use crate::e2ee::query::{Asker, DEFAULT_TIMEOUT};
use crate::error::MatrixError;
use crate::identifiers::UserId;
use crate::state::AppState;
use crate::store::keys::{CrossSigningKind, DeviceQuery};

use super::auth::{Origin, SignedRequest};
use super::rate_limit::admit;

/// Counts and logs a refused key request from another server.
fn refused(error: MatrixError, origin: &Origin, endpoint: &'static str) -> MatrixError {
    tracing::info!(origin = %origin, endpoint, errcode = error.errcode, error = %error.message, "federation key request refused");
    metrics::counter!("courier_federation_key_requests_total", "endpoint" => endpoint, "outcome" => "refused")
        .increment(1);
    error
}

fn answered(endpoint: &'static str) {
    metrics::counter!("courier_federation_key_requests_total", "endpoint" => endpoint, "outcome" => "answered")
        .increment(1);
}

async fn admitted(state: &AppState, origin: &Origin) -> Result<(), MatrixError> {
    admit(
        &state.inbound.rate_limiter,
        &origin.server_name().normalized(),
        state.config.federation.inbound_rate_per_origin,
        state.config.federation.inbound_rate_shape,
    )
    .await
}

/// The request body as a JSON object.
fn body_object(signed: &SignedRequest) -> Result<Map<String, Value>, MatrixError> {
    let Some(body) = &signed.body else {
        return Err(MatrixError::not_json("This request needs a body"));
    };
    match body.to_value() {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(MatrixError::bad_json("The body must be a JSON object")),
        Err(_) => Err(MatrixError::not_json("The body is not valid JSON")),
    }
}

/// `POST /_matrix/federation/v1/user/keys/query`.
pub async fn post_user_keys_query_route(
    State(state): State<AppState>,
    signed: SignedRequest,
) -> Result<Response, MatrixError> {
    const ENDPOINT: &str = "query";
    let origin = signed.origin.clone();
    admitted(&state, &origin).await?;
    let body = body_object(&signed).map_err(|e| refused(e, &origin, ENDPOINT))?;
    let query = state
        .e2ee
        .parse_key_query(&body, DEFAULT_TIMEOUT)
        .map_err(|e| refused(e.into(), &origin, ENDPOINT))?;
    let ours = state.config.server_name.as_str();
    let asked: Vec<String> = query
        .users
        .keys()
        .filter(|user| user.server_name() == ours)
        .map(|user| user.as_str().to_owned())
        .collect();
    let answer = state
        .e2ee
        .query_keys(Asker::Server, query)
        .await
        .map_err(|e| refused(e.into(), &origin, ENDPOINT))?;
    state
        .e2ee
        .record_remote_interest(origin.server_name(), &asked)
        .await;
    answered(ENDPOINT);
    Ok(json_text(answer.into_federation_json().to_string()))
}

/// `POST /_matrix/federation/v1/user/keys/claim`.
pub async fn post_user_keys_claim_route(
    State(state): State<AppState>,
    signed: SignedRequest,
) -> Result<Response, MatrixError> {
    const ENDPOINT: &str = "claim";
    let origin = signed.origin.clone();
    admitted(&state, &origin).await?;
    let body = body_object(&signed).map_err(|e| refused(e, &origin, ENDPOINT))?;
    let claim = state
        .e2ee
        .parse_key_claim(&body, DEFAULT_TIMEOUT)
        .map_err(|e| refused(e.into(), &origin, ENDPOINT))?;
    let answer = state
        .e2ee
        .claim_keys(Asker::Server, claim)
        .await
        .map_err(|e| refused(e.into(), &origin, ENDPOINT))?;
    answered(ENDPOINT);
    Ok(json_text(answer.into_federation_json().to_string()))
}

/// `GET /_matrix/federation/v1/user/devices/{userId}`: a local user's
/// devices with keys, their device-list `stream_id`, and the master and
/// self-signing keys. A local user without devices gets an empty list.
pub async fn get_user_devices_route(
    State(state): State<AppState>,
    user_id: Result<Path<String>, PathRejection>,
    signed: SignedRequest,
) -> Result<Response, MatrixError> {
    const ENDPOINT: &str = "devices";
    let origin = signed.origin.clone();
    admitted(&state, &origin).await?;
    let Ok(Path(user_id)) = user_id else {
        return Err(refused(
            MatrixError::invalid_param("Malformed user ID"),
            &origin,
            ENDPOINT,
        ));
    };
    let user = UserId::parse(&user_id).map_err(|_| {
        refused(
            MatrixError::invalid_param(format!("{user_id} is not a user ID")),
            &origin,
            ENDPOINT,
        )
    })?;
    if user.server_name() != state.config.server_name.as_str() {
        return Err(refused(
            MatrixError::invalid_param(format!("User {user_id} is not hosted on this server")),
            &origin,
            ENDPOINT,
        ));
    }
    let users = state
        .store
        .user_devices(vec![DeviceQuery {
            user_id: user_id.clone(),
            device_ids: Vec::new(),
        }])
        .await
        .map_err(|error| MatrixError::internal("reading a user's devices", &error))?;
    let names = state.config.e2ee.device_names_over_federation;
    let mut out = Map::new();
    out.insert("user_id".to_owned(), json!(user_id));
    let mut devices = Vec::new();
    let mut stream_id = 0;
    for record in users.into_iter().filter(|u| u.user_id == user_id) {
        stream_id = record.stream_id;
        for device in record.devices {
            let Some(mut keys) = device
                .keys_json
                .as_deref()
                .and_then(crate::e2ee::objects::stored_object)
            else {
                continue;
            };
            crate::e2ee::objects::merge_signatures(
                &mut keys,
                device
                    .signatures
                    .iter()
                    .filter(|s| s.signer_user_id == user_id),
            );
            let mut entry = Map::new();
            entry.insert("device_id".to_owned(), json!(device.device_id));
            entry.insert("keys".to_owned(), Value::Object(keys));
            if let (true, Some(name)) = (names, device.display_name) {
                entry.insert("device_display_name".to_owned(), json!(name));
            }
            devices.push(Value::Object(entry));
        }
        for key in record.cross_signing {
            let field = match key.kind {
                CrossSigningKind::Master => "master_key",
                CrossSigningKind::SelfSigning => "self_signing_key",
                CrossSigningKind::UserSigning => continue,
            };
            if let Some(mut object) = crate::e2ee::objects::stored_object(&key.key_json) {
                crate::e2ee::objects::merge_signatures(
                    &mut object,
                    key.signatures
                        .iter()
                        .filter(|s| s.signer_user_id == user_id),
                );
                out.insert(field.to_owned(), Value::Object(object));
            }
        }
    }
    out.insert("stream_id".to_owned(), json!(stream_id));
    out.insert("devices".to_owned(), Value::Array(devices));
    state
        .e2ee
        .record_remote_interest(origin.server_name(), &[user_id])
        .await;
    answered(ENDPOINT);
    Ok(json_text(Value::Object(out).to_string()))
}
