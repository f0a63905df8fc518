//! User-interactive authentication, reduced to what Courier can check.
//! Courier holds no passwords: the homeserver registers each device and its
//! access token over the RPC, and that token is the credential Courier has.
//! So the operations the spec guards with UIA (deleting devices, replacing
//! cross-signing keys) ask for one `m.login.dummy` stage: a client that
//! speaks UIA (matrix-rust-sdk, matrix-nio) completes it with the same
//! token, and an unaware request gets the spec's 401 challenge instead of
//! silently destroying keys. The session ID is random and not stored: the
//! dummy stage proves nothing a session would remember.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rand::RngExt;
use rand::distr::Alphanumeric;
use serde_json::{Map, Value, json};

/// The one stage Courier offers.
pub const DUMMY_STAGE: &str = "m.login.dummy";

/// Passes when the request body's `auth` completes the dummy stage;
/// otherwise the 401 UIA challenge to send back (with `M_UNRECOGNIZED` when
/// `auth` names another stage, or is not an object).
// The error is the finished response, returned at once by the handler;
// boxing it would only add an allocation to that path.
#[allow(clippy::result_large_err)]
pub fn require(body: &Map<String, Value>) -> Result<(), Response> {
    let stage = match body.get("auth") {
        None | Some(Value::Null) => return Err(challenge(None)),
        Some(Value::Object(auth)) => auth.get("type").and_then(Value::as_str),
        Some(_) => None,
    };
    match stage {
        Some(DUMMY_STAGE) => Ok(()),
        _ => Err(challenge(Some(
            "Only the m.login.dummy stage is offered by this server",
        ))),
    }
}

/// The 401 challenge body: one flow of one dummy stage, a fresh session.
fn challenge(error: Option<&str>) -> Response {
    let session: String = rand::rng()
        .sample_iter(Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    let mut body = json!({
        "flows": [{ "stages": [DUMMY_STAGE] }],
        "params": {},
        "session": session,
    });
    if let (Some(message), Some(object)) = (error, body.as_object_mut()) {
        object.insert("errcode".to_owned(), json!("M_UNRECOGNIZED"));
        object.insert("error".to_owned(), json!(message));
    }
    (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response()
}
