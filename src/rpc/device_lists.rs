//! The device-list routes of the internal RPC (docs/rpc.md, DESIGN §7):
//! the homeserver, which knows who shares rooms with whom, names the
//! servers that get a local user's device-list updates
//! (`PUT`/`GET /_courier/v1/users/{userId}/device_list/servers`) and the
//! users a local user tracks (`PUT`/`GET
//! /_courier/v1/users/{userId}/device_list/tracking`). The handlers only
//! validate (a local user in the path; server names and user IDs that
//! parse; at most [`MAX_ENTRIES`] entries; nothing both added and removed)
//! and call `e2ee`; the same body twice is the same result.

use std::collections::BTreeSet;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::get;
use serde_json::{Map, Value, json};

use crate::client_api::extract;
use crate::error::MatrixError;
use crate::identifiers::{ServerName, UserId};
use crate::state::AppState;
use crate::store::device_lists::Interest;

/// The most entries one body may carry (both lists together).
pub const MAX_ENTRIES: usize = 1000;

/// The routes, for `rpc::router` to merge (behind its secret layer).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/_courier/v1/users/{user_id}/device_list/servers",
            get(get_servers_route).put(put_servers_route),
        )
        .route(
            "/_courier/v1/users/{user_id}/device_list/tracking",
            get(get_tracking_route).put(put_tracking_route),
        )
}

/// The path's user: a user ID of this server.
fn path_user(
    state: &AppState,
    path: Result<Path<String>, PathRejection>,
) -> Result<UserId, MatrixError> {
    let raw = extract::path(path)?;
    let user = UserId::parse(&raw)
        .map_err(|_| MatrixError::invalid_param(format!("{raw:?} is not a user ID")))?;
    if user.server_name() != state.config.server_name.as_str() {
        return Err(MatrixError::invalid_param(format!(
            "{raw} is not a user of {}",
            state.config.server_name
        )));
    }
    Ok(user)
}

/// An optional array of strings in the body (absent or null: empty).
fn string_list(body: &Map<String, Value>, name: &str) -> Result<Vec<String>, MatrixError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => Ok(text.clone()),
                _ => Err(MatrixError::bad_json(format!(
                    "{name} must be an array of strings"
                ))),
            })
            .collect(),
        Some(_) => Err(MatrixError::bad_json(format!(
            "{name} must be an array of strings"
        ))),
    }
}

/// The two lists of a body, bounded, each entry parsed, none in both.
fn two_lists<T: Ord + Clone>(
    body: &Map<String, Value>,
    names: [&str; 2],
    parse: impl Fn(&str) -> Result<T, MatrixError>,
) -> Result<(Vec<T>, Vec<T>), MatrixError> {
    let first = string_list(body, names[0])?;
    let second = string_list(body, names[1])?;
    if first.len() + second.len() > MAX_ENTRIES {
        return Err(MatrixError::invalid_param(format!(
            "{} and {} hold at most {MAX_ENTRIES} entries together",
            names[0], names[1]
        )));
    }
    let first: BTreeSet<T> = first
        .iter()
        .map(|raw| parse(raw))
        .collect::<Result<_, _>>()?;
    let second: BTreeSet<T> = second
        .iter()
        .map(|raw| parse(raw))
        .collect::<Result<_, _>>()?;
    if first.intersection(&second).next().is_some() {
        return Err(MatrixError::invalid_param(format!(
            "an entry is in both {} and {}",
            names[0], names[1]
        )));
    }
    Ok((first.into_iter().collect(), second.into_iter().collect()))
}

fn servers_json(interests: Vec<Interest>) -> Response {
    let servers: Vec<Value> = interests
        .into_iter()
        .map(|interest| {
            json!({ "server_name": interest.destination, "expires_ts": interest.expires_ts })
        })
        .collect();
    extract::json_text(json!({ "servers": servers }).to_string())
}

/// `PUT .../device_list/servers` `{"add": [...], "remove": [...]}`: the
/// servers that share rooms with the user (no expiry) and those that no
/// longer do. Answers the user's interests after the change.
async fn put_servers_route(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, MatrixError> {
    let user = path_user(&state, path)?;
    let body = extract::json_object(body, false)?;
    let ours = state.config.server_name.clone();
    let (add, remove) = two_lists(&body, ["add", "remove"], |raw| {
        let server = ServerName::parse(raw)
            .map_err(|_| MatrixError::invalid_param(format!("{raw:?} is not a server name")))?;
        if server == ours {
            return Err(MatrixError::invalid_param(format!(
                "{raw} is this server: it needs no device-list updates"
            )));
        }
        Ok(server)
    })?;
    let interests = state
        .e2ee
        .set_device_list_servers(&user, add, remove)
        .await
        .map_err(|error| MatrixError::internal("setting device-list servers", &error))?;
    Ok(servers_json(interests))
}

/// `GET .../device_list/servers`: the user's interests, expired ones
/// included, sorted by server name.
async fn get_servers_route(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, MatrixError> {
    let user = path_user(&state, path)?;
    let interests = state
        .store
        .device_list_interest(user.as_str())
        .await
        .map_err(|error| MatrixError::internal("reading device-list servers", &error))?;
    Ok(servers_json(interests))
}

fn tracked_json(tracked: Vec<String>) -> Response {
    extract::json_text(json!({ "tracked": tracked }).to_string())
}

/// `PUT .../device_list/tracking` `{"track": [...], "untrack": [...]}`:
/// the users whose device lists the local user follows. Answers the
/// tracked users after the change.
async fn put_tracking_route(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, MatrixError> {
    let user = path_user(&state, path)?;
    let body = extract::json_object(body, false)?;
    let (track, untrack) = two_lists(&body, ["track", "untrack"], |raw| {
        UserId::parse(raw)
            .map_err(|_| MatrixError::invalid_param(format!("{raw:?} is not a user ID")))
    })?;
    let tracked = state
        .e2ee
        .set_tracking(&user, track, untrack)
        .await
        .map_err(|error| MatrixError::internal("setting device-list tracking", &error))?;
    Ok(tracked_json(tracked))
}

/// `GET .../device_list/tracking`: the users the local user tracks, sorted.
async fn get_tracking_route(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, MatrixError> {
    let user = path_user(&state, path)?;
    let tracked = state
        .store
        .tracked_users(user.as_str())
        .await
        .map_err(|error| MatrixError::internal("reading device-list tracking", &error))?;
    Ok(tracked_json(tracked))
}
