//! The client API's end-to-end keys endpoints (SPEC-E2EE §2.1–§2.3, §2.7),
//! under `v3` and `r0`: `POST /keys/upload`, `/keys/query`, `/keys/claim`,
//! `/keys/device_signing/upload`, `/keys/signatures/upload` and `GET
//! /keys/changes?from&to` (SPEC-E2EE §2.6: the users whose device lists
//! changed between two `/sync` tokens, and those no longer tracked). Thin
//! handlers: authenticate (`AuthedDevice`), parse the body as a JSON object,
//! call the `e2ee` core, write its answer. Replacing cross-signing keys
//! answers the UIA challenge of `uia` until the body completes it. Device
//! management and `/sync` are elsewhere.

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::response::Response;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::client_api::extract::{self, AuthedDevice};
use crate::client_api::uia;
use crate::e2ee::error::KeysRejected;
use crate::e2ee::query::{Asker, request_timeout};
use crate::error::MatrixError;
use crate::state::AppState;
use crate::todevice::SyncToken;

/// The `/keys/*` routes, for `client_api::router` to merge.
pub fn routes() -> Router<AppState> {
    let mut router = Router::new();
    for version in ["v3", "r0"] {
        let path = |tail: &str| format!("/_matrix/client/{version}/keys/{tail}");
        router = router
            .route(&path("upload"), post(post_keys_upload_route))
            .route(&path("query"), post(post_keys_query_route))
            .route(&path("claim"), post(post_keys_claim_route))
            .route(
                &path("device_signing/upload"),
                post(post_device_signing_upload_route),
            )
            .route(
                &path("signatures/upload"),
                post(post_signatures_upload_route),
            )
            .route(&path("changes"), get(get_key_changes_route));
    }
    router
}

/// Counts and logs a refused keys request, then passes the error on (as
/// `client_api`'s own routes do, under the same metric).
fn refused(error: MatrixError, user_id: &str) -> MatrixError {
    tracing::info!(user_id, errcode = error.errcode, error = %error.message, "client keys request refused");
    metrics::counter!("courier_client_rejections_total", "errcode" => error.errcode).increment(1);
    error
}

fn json_response(value: &Value) -> Response {
    extract::json_text(value.to_string())
}

/// `?timeout=` as Synapse reads it (the body's `timeout` wins).
#[derive(Debug, Deserialize)]
struct TimeoutParam {
    timeout: Option<String>,
}

fn body_object(
    body: Result<Bytes, BytesRejection>,
    user_id: &str,
) -> Result<Map<String, Value>, MatrixError> {
    extract::json_object(body, false).map_err(|e| refused(e, user_id))
}

fn timeout_of(
    state: &AppState,
    body: &Map<String, Value>,
    query: Result<Query<TimeoutParam>, QueryRejection>,
    user_id: &str,
) -> Result<std::time::Duration, MatrixError> {
    let params = extract::query(query).map_err(|e| refused(e, user_id))?;
    let param = extract::int_param("timeout", params.timeout.as_deref())
        .map_err(|e| refused(e, user_id))?;
    request_timeout(body, param, state.config.e2ee.remote_timeout)
        .map_err(|e| refused(e.into(), user_id))
}

async fn post_keys_upload_route(
    State(state): State<AppState>,
    AuthedDevice(device): AuthedDevice,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, MatrixError> {
    let user_id = device.user_id.as_str();
    let body = body_object(body, user_id)?;
    let counts = state
        .e2ee
        .upload_keys(&device, &body)
        .await
        .map_err(|e| refused(e.into(), user_id))?;
    Ok(json_response(&json!({ "one_time_key_counts": counts })))
}

async fn post_keys_query_route(
    State(state): State<AppState>,
    AuthedDevice(device): AuthedDevice,
    query: Result<Query<TimeoutParam>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, MatrixError> {
    let user_id = device.user_id.as_str();
    let body = body_object(body, user_id)?;
    let timeout = timeout_of(&state, &body, query, user_id)?;
    let query = state
        .e2ee
        .parse_key_query(&body, timeout)
        .map_err(|e| refused(e.into(), user_id))?;
    let answer = state
        .e2ee
        .query_keys(Asker::User(user_id), query)
        .await
        .map_err(|e| refused(e.into(), user_id))?;
    Ok(json_response(&answer.into_client_json()))
}

async fn post_keys_claim_route(
    State(state): State<AppState>,
    AuthedDevice(device): AuthedDevice,
    query: Result<Query<TimeoutParam>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, MatrixError> {
    let user_id = device.user_id.as_str();
    let body = body_object(body, user_id)?;
    let timeout = timeout_of(&state, &body, query, user_id)?;
    let claim = state
        .e2ee
        .parse_key_claim(&body, timeout)
        .map_err(|e| refused(e.into(), user_id))?;
    let answer = state
        .e2ee
        .claim_keys(Asker::User(user_id), claim)
        .await
        .map_err(|e| refused(e.into(), user_id))?;
    Ok(json_response(&answer.into_client_json()))
}

async fn post_device_signing_upload_route(
    State(state): State<AppState>,
    AuthedDevice(device): AuthedDevice,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, MatrixError> {
    let user_id = device.user_id.as_str();
    let body = body_object(body, user_id)?;
    let challenge = uia::require(&body).err();
    let auth_done = challenge.is_none();
    match state
        .e2ee
        .upload_cross_signing_keys(user_id, &body, auth_done)
        .await
    {
        Ok(()) => Ok(extract::empty_object()),
        Err(KeysRejected::AuthRequired) => match challenge {
            Some(challenge) => Ok(challenge),
            None => Err(MatrixError::internal(
                "cross-signing upload",
                &"authentication asked for although the body completed it",
            )),
        },
        Err(error) => Err(refused(error.into(), user_id)),
    }
}

async fn post_signatures_upload_route(
    State(state): State<AppState>,
    AuthedDevice(device): AuthedDevice,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, MatrixError> {
    let user_id = device.user_id.as_str();
    let body = body_object(body, user_id)?;
    let failures = state
        .e2ee
        .upload_signatures(user_id, &body)
        .await
        .map_err(|e| refused(e.into(), user_id))?;
    let mut out = Map::new();
    for (target_user, key_id, rejection) in failures {
        let error = MatrixError::from(rejection);
        let by_user = out
            .entry(target_user)
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(by_user) = by_user {
            by_user.insert(
                key_id,
                json!({ "errcode": error.errcode, "error": error.message }),
            );
        }
    }
    Ok(json_response(&json!({ "failures": out })))
}

/// The query parameters of `/keys/changes`; others are ignored.
#[derive(Debug, Deserialize)]
struct ChangesParams {
    from: Option<String>,
    to: Option<String>,
}

/// One `/keys/changes` token: required (`M_MISSING_PARAM`), a `/sync`
/// token of this server (`M_INVALID_PARAM`); its device-list position.
fn changes_token(name: &str, raw: Option<&str>) -> Result<i64, MatrixError> {
    let raw =
        raw.ok_or_else(|| MatrixError::missing_param(format!("Missing parameter: {name}")))?;
    SyncToken::parse(raw)
        .map(|token| token.device_list)
        .ok_or_else(|| {
            MatrixError::invalid_param(format!("{name} is not a token this server issued"))
        })
}

/// `GET /keys/changes?from=&to=`: `{"changed": [...], "left": [...]}` for
/// the device-list changes in `(from, to]` (an empty answer when `to` is
/// not after `from`).
async fn get_key_changes_route(
    State(state): State<AppState>,
    AuthedDevice(device): AuthedDevice,
    query: Result<Query<ChangesParams>, QueryRejection>,
) -> Result<Response, MatrixError> {
    let user_id = device.user_id.as_str();
    let params = extract::query(query).map_err(|e| refused(e, user_id))?;
    let from = changes_token("from", params.from.as_deref()).map_err(|e| refused(e, user_id))?;
    let to = changes_token("to", params.to.as_deref()).map_err(|e| refused(e, user_id))?;
    let news = state
        .e2ee
        .key_changes(user_id, from, to)
        .await
        .map_err(|error| MatrixError::internal("reading device-list changes", &error))?;
    Ok(json_response(
        &json!({ "changed": news.changed, "left": news.left }),
    ))
}
