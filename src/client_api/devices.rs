//! The client API's device management (SPEC-E2EE §2.6), under `v3` and
//! `r0`: `GET /devices`, `GET`/`PUT`/`DELETE /devices/{deviceId}` and
//! `POST /delete_devices`, always on the caller's own devices (another
//! user's device is as unknown as a missing one). Deleting goes through
//! the one-stage dummy UIA (`uia::require`). The work is in
//! `e2ee::devices`; these handlers parse and answer. Devices carry
//! `device_id` and `display_name` only: Courier does not record
//! `last_seen_ip` / `last_seen_ts`, so they are omitted.

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use serde_json::{Map, Value, json};

use crate::client_api::extract::{self, AuthedDevice, refused};
use crate::client_api::uia;
use crate::e2ee::devices::{Device, DeviceRejected, MAX_DEVICES_PER_DELETE, Via};
use crate::error::MatrixError;
use crate::state::AppState;

/// The device routes, mounted by the client API's router.
pub fn routes() -> Router<AppState> {
    let mut router = Router::new();
    for version in ["v3", "r0"] {
        router = router
            .route(
                &format!("/_matrix/client/{version}/devices"),
                get(get_devices_route),
            )
            .route(
                &format!("/_matrix/client/{version}/devices/{{device_id}}"),
                get(get_device_route)
                    .put(put_device_route)
                    .delete(delete_device_route),
            )
            .route(
                &format!("/_matrix/client/{version}/delete_devices"),
                post(post_delete_devices_route),
            );
    }
    router
}

/// A device object of the client API.
fn device_json(device: &Device) -> Value {
    let mut object = Map::new();
    object.insert("device_id".to_owned(), json!(device.device_id));
    if let Some(name) = &device.display_name {
        object.insert("display_name".to_owned(), json!(name));
    }
    Value::Object(object)
}

async fn get_devices_route(
    State(state): State<AppState>,
    AuthedDevice(caller): AuthedDevice,
) -> Result<Response, MatrixError> {
    let devices = state
        .e2ee
        .devices(&caller.user_id)
        .await
        .map_err(|error| MatrixError::internal("device listing", &error))?;
    let devices: Vec<Value> = devices.iter().map(device_json).collect();
    Ok(extract::json_text(
        json!({ "devices": devices }).to_string(),
    ))
}

async fn get_device_route(
    State(state): State<AppState>,
    AuthedDevice(caller): AuthedDevice,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, MatrixError> {
    let user_id = caller.user_id.as_str();
    let device_id = extract::path(path).map_err(|e| refused(e, user_id))?;
    let device = state
        .e2ee
        .device(user_id, &device_id)
        .await
        .map_err(|error| MatrixError::internal("device read", &error))?;
    match device {
        Some(device) => Ok(extract::json_text(device_json(&device).to_string())),
        None => Err(refused(
            MatrixError::not_found_resource("No device found"),
            user_id,
        )),
    }
}

async fn put_device_route(
    State(state): State<AppState>,
    AuthedDevice(caller): AuthedDevice,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, MatrixError> {
    let user_id = caller.user_id.as_str();
    let device_id = extract::path(path).map_err(|e| refused(e, user_id))?;
    let body = extract::json_object(body, true).map_err(|e| refused(e, user_id))?;
    match body.get("display_name") {
        // Absent: nothing changes, but the device must be the caller's.
        None => {
            let device = state
                .e2ee
                .device(user_id, &device_id)
                .await
                .map_err(|error| MatrixError::internal("device read", &error))?;
            if device.is_none() {
                return Err(refused(
                    MatrixError::not_found_resource("No device found"),
                    user_id,
                ));
            }
        }
        Some(Value::Null) => rename(&state, user_id, &device_id, None).await?,
        Some(Value::String(name)) => rename(&state, user_id, &device_id, Some(name)).await?,
        Some(_) => {
            return Err(refused(
                MatrixError::bad_json("display_name must be a string"),
                user_id,
            ));
        }
    }
    Ok(extract::empty_object())
}

async fn rename(
    state: &AppState,
    user_id: &str,
    device_id: &str,
    display_name: Option<&str>,
) -> Result<(), MatrixError> {
    state
        .e2ee
        .rename_device(user_id, device_id, display_name, Via::Client)
        .await
        .map_err(|error| refused(error.into(), user_id))
}

async fn delete_device_route(
    State(state): State<AppState>,
    AuthedDevice(caller): AuthedDevice,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, MatrixError> {
    let user_id = caller.user_id.as_str();
    let device_id = extract::path(path).map_err(|e| refused(e, user_id))?;
    // The body is optional. As Synapse does for older clients, a body that
    // is not JSON counts as `{}`: it gets the UIA challenge.
    let body = match extract::json_object(body, true) {
        Ok(body) => body,
        Err(error) if error.errcode == "M_NOT_JSON" => Map::new(),
        Err(error) => return Err(refused(error, user_id)),
    };
    if let Err(challenge) = uia::require(&body) {
        return Ok(challenge);
    }
    // An unknown device (or another user's) is deleted already: 200.
    state
        .e2ee
        .delete_devices(user_id, &[device_id], Via::Client)
        .await
        .map_err(|error| refused(error.into(), user_id))?;
    Ok(extract::empty_object())
}

async fn post_delete_devices_route(
    State(state): State<AppState>,
    AuthedDevice(caller): AuthedDevice,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, MatrixError> {
    let user_id = caller.user_id.as_str();
    let body = extract::json_object(body, false).map_err(|e| refused(e, user_id))?;
    // The body is checked before the challenge: a client that completes
    // the UIA stage learns of a bad list first, not after.
    let device_ids = device_id_list(&body).map_err(|e| refused(e, user_id))?;
    if let Err(challenge) = uia::require(&body) {
        return Ok(challenge);
    }
    state
        .e2ee
        .delete_devices(user_id, &device_ids, Via::Client)
        .await
        .map_err(|error| refused(error.into(), user_id))?;
    Ok(extract::empty_object())
}

/// The required `devices` list of `POST /delete_devices`: strings, at most
/// `MAX_DEVICES_PER_DELETE` of them (counted before anything else is done).
fn device_id_list(body: &Map<String, Value>) -> Result<Vec<String>, MatrixError> {
    let devices = match body.get("devices") {
        None => {
            return Err(MatrixError::missing_param(
                "Missing required field: devices",
            ));
        }
        Some(Value::Array(devices)) => devices,
        Some(_) => return Err(MatrixError::bad_json("devices must be an array")),
    };
    if devices.len() > MAX_DEVICES_PER_DELETE {
        return Err(DeviceRejected::TooManyDevices {
            count: devices.len(),
            limit: MAX_DEVICES_PER_DELETE,
        }
        .into());
    }
    devices
        .iter()
        .map(|device| match device {
            Value::String(device_id) => Ok(device_id.clone()),
            _ => Err(MatrixError::bad_json("devices must be an array of strings")),
        })
        .collect()
}
