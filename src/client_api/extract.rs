//! Request edges shared by the client API and the RPC: the access-token
//! extractor that turns a request into an authenticated device, bearer-token
//! parsing, and JSON body/query parsing that never lets one of axum's
//! plain-text rejections reach the wire (every failure is a `MatrixError`).
//! It does not know any route.

use axum::body::Bytes;
use axum::extract::FromRequestParts;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::error::MatrixError;
use crate::state::AppState;
use crate::store::DeviceKey;

/// The device an access token belongs to. Handlers that take this argument
/// run only for a registered token (`Authorization: Bearer`; the query
/// parameter `access_token` is not accepted, SPEC §0.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthedDevice(pub DeviceKey);

impl FromRequestParts<AppState> for AuthedDevice {
    type Rejection = MatrixError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Some(token) = bearer_token(&parts.headers) else {
            metrics::counter!("courier_client_rejections_total", "errcode" => "M_MISSING_TOKEN")
                .increment(1);
            return Err(MatrixError::missing_token());
        };
        match state.store.lookup_token(token).await {
            Ok(Some(device)) => Ok(AuthedDevice(device)),
            Ok(None) => {
                tracing::info!(path = %parts.uri.path(), "unknown access token");
                metrics::counter!("courier_client_rejections_total", "errcode" => "M_UNKNOWN_TOKEN")
                    .increment(1);
                Err(MatrixError::unknown_token())
            }
            Err(error) => Err(MatrixError::internal("access token lookup", &error)),
        }
    }
}

/// Counts and logs a refused client request, then passes the error on.
pub fn refused(error: MatrixError, user_id: &str) -> MatrixError {
    tracing::info!(user_id, errcode = error.errcode, error = %error.message, "client request refused");
    metrics::counter!("courier_client_rejections_total", "errcode" => error.errcode).increment(1);
    error
}

/// The token of an `Authorization: Bearer <token>` header, if there is one.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The body bytes, or `M_TOO_LARGE` when the configured limit was hit.
pub fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, MatrixError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            MatrixError::too_large("Request body is too large")
        } else {
            MatrixError::not_json("Could not read the request body")
        }
    })
}

/// Parses a request body that must be a JSON object. An empty body counts
/// as `{}` only when `empty_is_object` is set.
pub fn json_object(
    body: Result<Bytes, BytesRejection>,
    empty_is_object: bool,
) -> Result<serde_json::Map<String, Value>, MatrixError> {
    let bytes = body_bytes(body)?;
    if empty_is_object && bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(MatrixError::bad_json("The body must be a JSON object")),
        Err(_) => Err(MatrixError::not_json("The body is not valid JSON")),
    }
}

/// Path parameters, or `M_INVALID_PARAM` (e.g. a segment that is not UTF-8).
pub fn path<T>(path: Result<axum::extract::Path<T>, PathRejection>) -> Result<T, MatrixError> {
    path.map(|axum::extract::Path(value)| value)
        .map_err(|_| MatrixError::invalid_param("Malformed path parameter"))
}

/// Query parameters, or `M_INVALID_PARAM`.
pub fn query<T>(query: Result<axum::extract::Query<T>, QueryRejection>) -> Result<T, MatrixError> {
    query
        .map(|axum::extract::Query(value)| value)
        .map_err(|_| MatrixError::invalid_param("Malformed query string"))
}

/// A JSON text as a `200` response with the right content type.
pub fn json_text(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `200 {}`.
pub fn empty_object() -> Response {
    json_text("{}".to_owned())
}

/// An optional integer query parameter, or `M_INVALID_PARAM` naming it.
pub fn int_param(name: &str, raw: Option<&str>) -> Result<Option<u64>, MatrixError> {
    raw.map(|raw| {
        raw.trim().parse::<u64>().map_err(|_| {
            MatrixError::invalid_param(format!("{name} must be a non-negative integer"))
        })
    })
    .transpose()
}

/// Appends `[{"sender","type","content"},...]` to `out`, embedding each
/// stored content as it is: the store holds it as the JSON text written at
/// acceptance, so it is not parsed and printed again.
pub fn write_events(out: &mut String, messages: &[crate::store::InboxMessage]) {
    out.push('[');
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"sender\":");
        push_json_string(out, &message.sender);
        out.push_str(",\"type\":");
        push_json_string(out, &message.event_type);
        out.push_str(",\"content\":");
        out.push_str(&message.content_json);
        out.push('}');
    }
    out.push(']');
}

/// Appends `s` as a JSON string literal.
pub fn push_json_string(out: &mut String, s: &str) {
    out.push_str(&serde_json::to_string(s).expect("serializing a str cannot fail"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn bearer_tokens_are_read_from_the_header_only() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer_token(&headers), Some("abc"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  xyz "),
        );
        assert_eq!(bearer_token(&headers), Some("xyz"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer_token(&headers), None);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer_token(&headers), None);
    }

    /// A body over the configured limit becomes `413 M_TOO_LARGE`, and bad
    /// JSON `M_NOT_JSON`, never axum's plain-text rejection.
    #[tokio::test]
    async fn body_rejections_become_matrix_errors() {
        use axum::extract::DefaultBodyLimit;
        use tower::ServiceExt;

        async fn echo(body: Result<Bytes, BytesRejection>) -> Result<String, MatrixError> {
            json_object(body, false).map(|object| Value::Object(object).to_string())
        }
        let app = axum::Router::new()
            .route("/", axum::routing::put(echo))
            .layer(DefaultBodyLimit::max(64));
        let call = |body: String| {
            let app = app.clone();
            async move {
                let response = app
                    .oneshot(
                        axum::http::Request::put("/")
                            .body(axum::body::Body::from(body))
                            .expect("request"),
                    )
                    .await
                    .expect("infallible");
                let status = response.status();
                let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
                    .await
                    .expect("body");
                (
                    status,
                    serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null),
                )
            }
        };
        let (status, body) = call(r#"{"a":1}"#.to_owned()).await;
        assert_eq!(
            (status, body),
            (StatusCode::OK, serde_json::json!({"a": 1}))
        );
        let long = format!("{{\"a\":\"{}\"}}", "x".repeat(100));
        let (status, body) = call(long).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body["errcode"], "M_TOO_LARGE");
        let (status, body) = call("{oops".to_owned()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["errcode"], "M_NOT_JSON");
    }

    #[test]
    fn events_embed_stored_content() {
        let mut out = String::new();
        write_events(
            &mut out,
            &[crate::store::InboxMessage {
                stream_id: 1,
                message_id: "abc".into(),
                sender: "@a:x".into(),
                event_type: "m.\"t\"".into(),
                content_json: "{\"k\":[1,2]}".into(),
            }],
        );
        let value: Value = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(
            value,
            serde_json::json!([{"sender": "@a:x", "type": "m.\"t\"", "content": {"k": [1, 2]}}])
        );
    }
}
