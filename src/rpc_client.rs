//! A small HTTP client for Courier's internal RPC (docs/rpc.md), used by the
//! `courier send` and `courier status` commands and by tests. Plain HTTP
//! over hyper-util's pooled client; JSON in, JSON out; a non-2xx answer
//! becomes `RpcClientError::Matrix` with the errcode the relay sent. It does
//! not speak TLS: the RPC listener is meant for loopback or a private
//! network.

use std::time::Duration;

use axum::body::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Value, json};

use crate::rpc::{DestinationRow, DestinationsResponse};

/// Characters left as they are in a path segment: unreserved, `@` and `:`
/// (so user IDs stay readable). Everything else is percent-encoded.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'@')
    .remove(b':');

/// How long one RPC call may take unless the caller says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum RpcClientError {
    #[error("invalid URL {0:?}")]
    BadUrl(String),
    #[error("request failed: {0}")]
    Http(#[from] hyper_util::client::legacy::Error),
    #[error("reading the response failed: {0}")]
    Body(#[from] hyper::Error),
    #[error("the request timed out")]
    Timeout,
    #[error("the relay answered {status}: {errcode}: {error}")]
    Matrix {
        status: StatusCode,
        errcode: String,
        error: String,
    },
    #[error("unexpected response ({status}): {detail}")]
    BadResponse { status: StatusCode, detail: String },
}

/// A status and raw body, for callers that check errors themselves.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: StatusCode,
    pub content_type: Option<String>,
    pub body: Bytes,
}

impl RawResponse {
    /// The body as JSON (`Value::Null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// A pooled plain-HTTP client that speaks JSON with an optional bearer token.
#[derive(Clone)]
pub struct HttpJsonClient {
    http: Client<HttpConnector, Full<Bytes>>,
}

impl Default for HttpJsonClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpJsonClient {
    pub fn new() -> Self {
        HttpJsonClient {
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Sends one request and returns whatever came back, within `timeout`.
    pub async fn call(
        &self,
        method: Method,
        url: &str,
        bearer: Option<&str>,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<RawResponse, RpcClientError> {
        let mut request = Request::builder().method(method).uri(url);
        if let Some(token) = bearer {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|_| RpcClientError::BadUrl(url.to_owned()))?;
        let exchange = async {
            let response = self.http.request(request).await?;
            let status = response.status();
            let content_type = response
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, RpcClientError>(RawResponse {
                status,
                content_type,
                body,
            })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| RpcClientError::Timeout)?
    }
}

/// Percent-encodes one path segment.
pub fn segment(raw: &str) -> String {
    utf8_percent_encode(raw, SEGMENT).to_string()
}

/// A client for one relay's RPC listener.
#[derive(Clone)]
pub struct RpcClient {
    base: String,
    secret: String,
    http: HttpJsonClient,
}

impl RpcClient {
    /// `base_url` like `http://127.0.0.1:8009` (no path).
    pub fn new(base_url: &str, secret: &str) -> Result<Self, RpcClientError> {
        let base = base_url.trim_end_matches('/').to_owned();
        let uri: http::Uri = base
            .parse()
            .map_err(|_| RpcClientError::BadUrl(base_url.to_owned()))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(RpcClientError::BadUrl(base_url.to_owned()));
        }
        Ok(RpcClient {
            base,
            secret: secret.to_owned(),
            http: HttpJsonClient::new(),
        })
    }

    /// One authenticated call; a non-2xx answer becomes an error.
    pub async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Value, RpcClientError> {
        let url = format!("{}{}", self.base, path_and_query);
        let body = body.map(|b| b.to_string().into_bytes());
        let response = self
            .http
            .call(method, &url, Some(&self.secret), body, timeout)
            .await?;
        let value: Option<Value> = serde_json::from_slice(&response.body).ok();
        if response.status.is_success() {
            return value.ok_or_else(|| RpcClientError::BadResponse {
                status: response.status,
                detail: "the body is not JSON".to_owned(),
            });
        }
        match value {
            Some(Value::Object(error)) if error.get("errcode").is_some() => {
                Err(RpcClientError::Matrix {
                    status: response.status,
                    errcode: error["errcode"].as_str().unwrap_or_default().to_owned(),
                    error: error
                        .get("error")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                })
            }
            _ => Err(RpcClientError::BadResponse {
                status: response.status,
                detail: String::from_utf8_lossy(&response.body).into_owned(),
            }),
        }
    }

    /// `POST /_courier/v1/send_to_device`.
    pub async fn send_to_device(
        &self,
        sender: &str,
        event_type: &str,
        txn_id: &str,
        messages: &Value,
    ) -> Result<(), RpcClientError> {
        let body = json!({
            "sender": sender,
            "type": event_type,
            "txn_id": txn_id,
            "messages": messages,
        });
        self.request(
            Method::POST,
            "/_courier/v1/send_to_device",
            Some(&body),
            DEFAULT_TIMEOUT,
        )
        .await
        .map(drop)
    }

    /// `PUT /_courier/v1/devices/{userId}/{deviceId}`.
    pub async fn register_device(
        &self,
        user_id: &str,
        device_id: &str,
        access_token: Option<&str>,
    ) -> Result<(), RpcClientError> {
        let path = format!(
            "/_courier/v1/devices/{}/{}",
            segment(user_id),
            segment(device_id)
        );
        let body = match access_token {
            Some(token) => json!({ "access_token": token }),
            None => json!({}),
        };
        self.request(Method::PUT, &path, Some(&body), DEFAULT_TIMEOUT)
            .await
            .map(drop)
    }

    /// `DELETE /_courier/v1/devices/{userId}/{deviceId}`.
    pub async fn delete_device(
        &self,
        user_id: &str,
        device_id: &str,
    ) -> Result<(), RpcClientError> {
        let path = format!(
            "/_courier/v1/devices/{}/{}",
            segment(user_id),
            segment(device_id)
        );
        self.request(Method::DELETE, &path, None, DEFAULT_TIMEOUT)
            .await
            .map(drop)
    }

    /// `GET /_courier/v1/devices/{userId}`.
    pub async fn list_devices(&self, user_id: &str) -> Result<Vec<String>, RpcClientError> {
        let path = format!("/_courier/v1/devices/{}", segment(user_id));
        let value = self
            .request(Method::GET, &path, None, DEFAULT_TIMEOUT)
            .await?;
        serde_json::from_value::<DevicesBody>(value)
            .map(|body| body.devices)
            .map_err(|error| RpcClientError::BadResponse {
                status: StatusCode::OK,
                detail: error.to_string(),
            })
    }

    /// `GET /_courier/v1/destinations`.
    pub async fn destinations(&self) -> Result<Vec<DestinationRow>, RpcClientError> {
        let value = self
            .request(
                Method::GET,
                "/_courier/v1/destinations",
                None,
                DEFAULT_TIMEOUT,
            )
            .await?;
        serde_json::from_value::<DestinationsResponse>(value)
            .map(|body| body.destinations)
            .map_err(|error| RpcClientError::BadResponse {
                status: StatusCode::OK,
                detail: error.to_string(),
            })
    }

    /// `POST /_courier/v1/destinations/{destination}/wake`.
    pub async fn wake_destination(&self, destination: &str) -> Result<(), RpcClientError> {
        let path = format!("/_courier/v1/destinations/{}/wake", segment(destination));
        self.request(Method::POST, &path, Some(&json!({})), DEFAULT_TIMEOUT)
            .await
            .map(drop)
    }
}

/// Why `courier send` arguments were refused.
#[derive(Debug, thiserror::Error)]
pub enum SendArgsError {
    #[error("--to {0:?} is not of the form @user:server/DEVICE")]
    BadRecipient(String),
    #[error("--content is not a JSON object: {0}")]
    BadContent(String),
}

/// Builds the `messages` object of a send from `@user:server/DEVICE`
/// recipients (split at the last `/`: server names never contain one) and
/// one JSON content object for all of them.
pub fn messages_for(recipients: &[String], content: &str) -> Result<Value, SendArgsError> {
    let content: Value =
        serde_json::from_str(content).map_err(|e| SendArgsError::BadContent(e.to_string()))?;
    if !content.is_object() {
        return Err(SendArgsError::BadContent("not an object".to_owned()));
    }
    let mut messages = serde_json::Map::new();
    for recipient in recipients {
        let (user, device) = recipient
            .rsplit_once('/')
            .filter(|(user, device)| user.starts_with('@') && !device.is_empty())
            .ok_or_else(|| SendArgsError::BadRecipient(recipient.clone()))?;
        let devices = messages
            .entry(user.to_owned())
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
        if let Value::Object(devices) = devices {
            devices.insert(device.to_owned(), content.clone());
        }
    }
    Ok(Value::Object(messages))
}

/// The destinations table `courier status` prints.
pub fn status_table(rows: &[DestinationRow], now_ms: i64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<32} {:>7} {:>9} {:>10} {:>8} {:>10} {:>11}  LAST_ERROR",
        "DESTINATION", "EDUS", "MESSAGES", "OLDEST", "FAILURES", "RETRY_IN", "QUARANTINED"
    );
    for row in rows {
        let oldest = row
            .oldest_pending_age_ms
            .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
            .unwrap_or_else(|| "-".to_owned());
        let retry_in = if row.next_retry_ms > now_ms {
            format!("{:.1}s", (row.next_retry_ms - now_ms) as f64 / 1000.0)
        } else {
            "-".to_owned()
        };
        let _ = writeln!(
            out,
            "{:<32} {:>7} {:>9} {:>10} {:>8} {:>10} {:>11}  {}",
            row.destination,
            row.pending_edus,
            row.pending_messages,
            oldest,
            row.failures,
            retry_in,
            row.quarantined,
            row.last_error.as_deref().unwrap_or("-"),
        );
    }
    if rows.is_empty() {
        out.push_str("(no destinations)\n");
    }
    out
}

#[derive(serde::Deserialize)]
struct DevicesBody {
    devices: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_keep_user_ids_readable_and_escape_the_rest() {
        assert_eq!(segment("@alice:example.org"), "@alice:example.org");
        assert_eq!(segment("A/B C?#%"), "A%2FB%20C%3F%23%25");
        assert_eq!(
            segment("[::1]:8448"),
            "%5B%3A%3A1%5D%3A8448".replace("%3A", ":")
        );
    }

    #[test]
    fn recipients_split_at_the_last_slash() {
        let messages = messages_for(
            &[
                "@a/b:x.org/DEV".to_owned(),
                "@a/b:x.org/*".to_owned(),
                "@c:y/D".to_owned(),
            ],
            r#"{"k":1}"#,
        )
        .expect("valid");
        assert_eq!(
            messages,
            json!({"@a/b:x.org": {"DEV": {"k": 1}, "*": {"k": 1}}, "@c:y": {"D": {"k": 1}}})
        );
        assert!(messages_for(&["@a:x".to_owned()], "{}").is_err());
        assert!(messages_for(&["@a:x/D".to_owned()], "[1]").is_err());
    }

    #[test]
    fn the_status_table_has_a_row_per_destination() {
        let rows = vec![DestinationRow {
            destination: "remote.example".into(),
            pending_edus: 3,
            pending_messages: 7,
            oldest_pending_age_ms: Some(1500),
            failures: 2,
            next_retry_ms: 11_000,
            last_success_ms: None,
            last_error: Some("connection refused".into()),
            quarantined: 0,
        }];
        let table = status_table(&rows, 10_000);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[1].starts_with("remote.example"));
        assert!(lines[1].contains("1.5s") && lines[1].contains("connection refused"));
    }

    #[test]
    fn only_plain_http_base_urls_are_accepted() {
        assert!(RpcClient::new("http://127.0.0.1:8009/", "s").is_ok());
        assert!(RpcClient::new("https://127.0.0.1:8009", "s").is_err());
        assert!(RpcClient::new("not a url", "s").is_err());
    }
}
