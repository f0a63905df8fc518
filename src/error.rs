//! The one place where failures become Matrix errors on the wire
//! (`{"errcode", "error"}` plus an HTTP status, DESIGN §6). Handlers in
//! `client_api`, `rpc` and `federation::inbound` return `MatrixError`; the
//! internal cause of a 500 is logged here and never sent to the peer.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::e2ee::devices::DeviceRejected;
use crate::e2ee::error::KeysRejected;
use crate::todevice::SendRejected;

/// A Matrix error response: status, errcode and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatrixError {
    pub status: StatusCode,
    pub errcode: &'static str,
    pub message: String,
    /// For `M_LIMIT_EXCEEDED`: seconds the caller should wait.
    pub retry_after_secs: Option<u64>,
}

impl MatrixError {
    pub fn new(status: StatusCode, errcode: &'static str, message: impl Into<String>) -> Self {
        MatrixError {
            status,
            errcode,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    pub fn not_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_NOT_JSON", message)
    }

    pub fn bad_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", message)
    }

    pub fn missing_param(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_MISSING_PARAM", message)
    }

    pub fn invalid_param(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", message)
    }

    pub fn missing_token() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "M_MISSING_TOKEN",
            "Missing access token",
        )
    }

    pub fn unknown_token() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "M_UNKNOWN_TOKEN",
            "Unrecognised access token",
        )
    }

    pub fn limit_exceeded(retry_after_secs: u64) -> Self {
        MatrixError {
            retry_after_secs: Some(retry_after_secs),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "M_LIMIT_EXCEEDED",
                "Too many requests",
            )
        }
    }

    pub fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "M_UNRECOGNIZED",
            "Unrecognized request",
        )
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "M_UNRECOGNIZED",
            "Method not allowed",
        )
    }

    pub fn not_found_resource(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", message)
    }

    /// A server-side failure. The cause is logged with `context`; the peer
    /// sees only a generic message.
    pub fn internal(context: &str, cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(context, error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "M_UNKNOWN",
            "Internal server error",
        )
    }
}

impl std::fmt::Display for MatrixError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.errcode,
            self.message
        )
    }
}

impl std::error::Error for MatrixError {}

impl IntoResponse for MatrixError {
    fn into_response(self) -> Response {
        let mut body = json!({ "errcode": self.errcode, "error": self.message });
        if let Some(secs) = self.retry_after_secs {
            body["retry_after_ms"] = json!(secs.saturating_mul(1000));
        }
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs
            && let Ok(value) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

/// Fallback handler for unknown paths on every listener.
pub async fn unrecognized_route() -> MatrixError {
    MatrixError::not_found()
}

/// Fallback for a known path with a method it does not serve.
pub async fn method_not_allowed_route() -> MatrixError {
    MatrixError::method_not_allowed()
}

/// A refused to-device send, as the client API and the RPC answer it: the
/// caller's faults are 4xx, a store failure is a logged 500.
impl From<SendRejected> for MatrixError {
    fn from(error: SendRejected) -> Self {
        match error {
            SendRejected::BadEventType
            | SendRejected::BadTxnId
            | SendRejected::ForeignSender(_) => MatrixError::invalid_param(error.to_string()),
            SendRejected::BadShape(_) | SendRejected::NotCanonical { .. } => {
                MatrixError::bad_json(error.to_string())
            }
            SendRejected::TooLarge { .. }
            | SendRejected::TooManyRecipients { .. }
            | SendRejected::TooManyDestinations { .. } => MatrixError::too_large(error.to_string()),
            SendRejected::Store(cause) => MatrixError::internal("to-device send", &cause),
        }
    }
}

/// A refused E2EE request (keys, cross-signing, signatures), for the
/// client API and inbound federation alike. `AuthRequired` never reaches
/// here on the client API, which answers it with the UIA challenge.
impl From<KeysRejected> for MatrixError {
    fn from(error: KeysRejected) -> Self {
        let message = error.to_string();
        match error {
            KeysRejected::BadJson(_) => MatrixError::bad_json(message),
            KeysRejected::MissingParam(_) => MatrixError::missing_param(message),
            KeysRejected::InvalidParam(_) | KeysRejected::NotLocal(_) => {
                MatrixError::invalid_param(message)
            }
            KeysRejected::InvalidSignature(_) => {
                MatrixError::new(StatusCode::BAD_REQUEST, "M_INVALID_SIGNATURE", message)
            }
            KeysRejected::TooLarge(_) => MatrixError::too_large(message),
            KeysRejected::KeyIdInUse(_) => MatrixError::forbidden(message),
            KeysRejected::UnknownKey(_) => MatrixError::not_found_resource(message),
            KeysRejected::UnknownDevice => MatrixError::unknown_token(),
            KeysRejected::AuthRequired => MatrixError::unauthorized(message),
            KeysRejected::Store(cause) => MatrixError::internal("e2ee keys", &cause),
        }
    }
}

/// A refused device operation (`e2ee::devices`), as the client API and the
/// RPC answer it. A long display name is a 400 `M_TOO_LARGE`, as Synapse
/// answers it; too many devices in one request is the 413 of every other
/// oversized request.
impl From<DeviceRejected> for MatrixError {
    fn from(error: DeviceRejected) -> Self {
        match error {
            DeviceRejected::DisplayNameTooLong { .. } => {
                MatrixError::new(StatusCode::BAD_REQUEST, "M_TOO_LARGE", error.to_string())
            }
            DeviceRejected::UnknownDevice { .. } => {
                MatrixError::not_found_resource(error.to_string())
            }
            DeviceRejected::TooManyDevices { .. } => MatrixError::too_large(error.to_string()),
            DeviceRejected::Store(cause) => MatrixError::internal("device operation", &cause),
        }
    }
}
