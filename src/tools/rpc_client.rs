//! A small HTTP client for Courier's internal RPC (docs/rpc.md), used by the
//! `courier send` and `courier status` commands and by tests. Plain HTTP
//! through `plain_http::JsonClient`; JSON in, JSON out; a non-2xx answer
//! becomes `RpcClientError::Matrix` with the errcode the relay sent. It does
//! not speak TLS: the RPC listener is meant for loopback or a private
//! network.

use std::time::Duration;

use serde_json::{Value, json};

use crate::rpc::{DestinationRow, DestinationsResponse, ExpiredRow};
use crate::tools::plain_http::{HttpError, JsonClient, encode_segment as segment};

/// How long one RPC call may take.
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum RpcClientError {
    #[error("invalid RPC URL {0:?} (want http://host:port)")]
    BadUrl(String),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("the relay answered {status}: {errcode}: {error}")]
    Matrix {
        status: u16,
        errcode: String,
        error: String,
    },
    #[error("unexpected response ({status}): {detail}")]
    BadResponse { status: u16, detail: String },
}

/// A client for one relay's RPC listener.
#[derive(Clone)]
pub struct RpcClient {
    base: String,
    secret: String,
    http: JsonClient,
}

impl RpcClient {
    /// `base_url` like `http://127.0.0.1:8009` (no path).
    pub fn new(base_url: &str, secret: &str) -> Result<Self, RpcClientError> {
        let base = base_url.trim_end_matches('/').to_owned();
        let uri: hyper::Uri = base
            .parse()
            .map_err(|_| RpcClientError::BadUrl(base_url.to_owned()))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(RpcClientError::BadUrl(base_url.to_owned()));
        }
        Ok(RpcClient {
            base,
            secret: secret.to_owned(),
            http: JsonClient::new(TIMEOUT),
        })
    }

    /// One authenticated call; a non-2xx answer becomes an error.
    pub async fn request(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> Result<Value, RpcClientError> {
        let url = format!("{}{}", self.base, path_and_query);
        let response = self
            .http
            .request(method, &url, Some(&self.secret), body)
            .await?;
        if (200..300).contains(&response.status) {
            return match response.body {
                Value::Null => Err(RpcClientError::BadResponse {
                    status: response.status,
                    detail: "the body is not JSON".to_owned(),
                }),
                body => Ok(body),
            };
        }
        match response.body.get("errcode").and_then(Value::as_str) {
            Some(errcode) => Err(RpcClientError::Matrix {
                status: response.status,
                errcode: errcode.to_owned(),
                error: response
                    .body
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            }),
            None => Err(RpcClientError::BadResponse {
                status: response.status,
                detail: response.body.to_string(),
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
        self.request("POST", "/_courier/v1/send_to_device", Some(&body))
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
        self.request("PUT", &path, Some(&body)).await.map(drop)
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
        self.request("DELETE", &path, None).await.map(drop)
    }

    /// `GET /_courier/v1/devices/{userId}`.
    pub async fn list_devices(&self, user_id: &str) -> Result<Vec<String>, RpcClientError> {
        let path = format!("/_courier/v1/devices/{}", segment(user_id));
        let value = self.request("GET", &path, None).await?;
        serde_json::from_value::<DevicesBody>(value)
            .map(|body| body.devices)
            .map_err(|error| RpcClientError::BadResponse {
                status: 200,
                detail: error.to_string(),
            })
    }

    /// `GET /_courier/v1/destinations`.
    pub async fn destinations(&self) -> Result<Vec<DestinationRow>, RpcClientError> {
        Ok(self.status().await?.destinations)
    }

    /// `GET /_courier/v1/destinations`, whole: the destinations and the
    /// expiry totals.
    pub async fn status(&self) -> Result<DestinationsResponse, RpcClientError> {
        let value = self
            .request("GET", "/_courier/v1/destinations", None)
            .await?;
        serde_json::from_value::<DestinationsResponse>(value).map_err(|error| {
            RpcClientError::BadResponse {
                status: 200,
                detail: error.to_string(),
            }
        })
    }

    /// `GET /_courier/v1/trace?id=…` or `?user=…&device=…`: `Ok(None)`
    /// when the relay has no record of it.
    pub async fn trace(
        &self,
        target: &str,
        device: Option<&str>,
    ) -> Result<Option<crate::trace::TraceReport>, RpcClientError> {
        let mut path = if target.starts_with('@') {
            format!("/_courier/v1/trace?user={}", segment(target))
        } else {
            format!("/_courier/v1/trace?id={}", segment(target))
        };
        if let Some(device) = device {
            path.push_str(&format!("&device={}", segment(device)));
        }
        match self.request("GET", &path, None).await {
            Ok(value) => serde_json::from_value(value).map(Some).map_err(|error| {
                RpcClientError::BadResponse {
                    status: 200,
                    detail: error.to_string(),
                }
            }),
            Err(RpcClientError::Matrix {
                status: 404,
                errcode,
                ..
            }) if errcode == "M_NOT_FOUND" => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST /_courier/v1/destinations/{destination}/wake`.
    pub async fn wake_destination(&self, destination: &str) -> Result<(), RpcClientError> {
        let path = format!("/_courier/v1/destinations/{}/wake", segment(destination));
        self.request("POST", &path, Some(&json!({})))
            .await
            .map(drop)
    }

    /// `POST /_courier/v1/quarantine/{destination}/requeue_all`: how many
    /// quarantined EDUs went back to the queue.
    pub async fn requeue_quarantined(&self, destination: &str) -> Result<u64, RpcClientError> {
        let path = format!(
            "/_courier/v1/quarantine/{}/requeue_all",
            segment(destination)
        );
        let value = self.request("POST", &path, Some(&json!({}))).await?;
        value
            .get("requeued")
            .and_then(Value::as_u64)
            .ok_or_else(|| RpcClientError::BadResponse {
                status: 200,
                detail: format!("no \"requeued\" count in {value}"),
            })
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
        "{:<32} {:>7} {:>9} {:>10} {:>8} {:>10} {:>11} {:>9}  LAST_ERROR",
        "DESTINATION",
        "EDUS",
        "MESSAGES",
        "OLDEST",
        "FAILURES",
        "RETRY_IN",
        "QUARANTINED",
        "REFUSING"
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
        // How long the destination has refused every EDU, if it does.
        let refusing = row
            .refusing_since_ms
            .map(|since| format!("{:.0}s", (now_ms - since).max(0) as f64 / 1000.0))
            .unwrap_or_else(|| "-".to_owned());
        let _ = writeln!(
            out,
            "{:<32} {:>7} {:>9} {:>10} {:>8} {:>10} {:>11} {:>9}  {}",
            row.destination,
            row.pending_edus,
            row.pending_messages,
            oldest,
            row.failures,
            retry_in,
            row.quarantined,
            refusing,
            row.last_error.as_deref().unwrap_or("-"),
        );
    }
    if rows.is_empty() {
        out.push_str("(no destinations)\n");
    }
    out
}

/// The expiry totals `courier status` prints under the destinations.
pub fn expired_table(rows: &[ExpiredRow]) -> String {
    use std::fmt::Write;
    let mut out = String::from("\nEXPIRED (undelivered, since the store was created)\n");
    let _ = writeln!(out, "{:<8} {:<18} {:>10}", "KIND", "REASON", "COUNT");
    for row in rows {
        let _ = writeln!(out, "{:<8} {:<18} {:>10}", row.kind, row.reason, row.count);
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
            refusing_since_ms: None,
        }];
        let table = status_table(&rows, 10_000);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[1].starts_with("remote.example"));
        assert!(lines[1].contains("1.5s") && lines[1].contains("connection refused"));
        let refusing = DestinationRow {
            refusing_since_ms: Some(4_000),
            ..rows[0].clone()
        };
        let table = status_table(&[refusing], 10_000);
        assert!(
            table.contains("REFUSING") && table.contains(" 6s "),
            "{table}"
        );
    }

    #[test]
    fn only_plain_http_base_urls_are_accepted() {
        assert!(RpcClient::new("http://127.0.0.1:8009/", "s").is_ok());
        assert!(RpcClient::new("https://127.0.0.1:8009", "s").is_err());
        assert!(RpcClient::new("not a url", "s").is_err());
    }
}
