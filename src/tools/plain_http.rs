//! A small JSON-over-plain-HTTP client for Courier's own tools (`demo`,
//! `bench`, `send`, `status`): they talk to client and RPC listeners, which
//! are plain HTTP on loopback or behind a proxy. Federation traffic never
//! goes through here (see `federation::outbound::client`).

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("bad request for {url}: {reason}")]
    Build { url: String, reason: String },
    #[error("{method} {url}: {reason}")]
    Transport {
        method: String,
        url: String,
        reason: String,
    },
    #[error("{method} {url}: no answer within {secs} s")]
    Timeout {
        method: String,
        url: String,
        secs: u64,
    },
}

/// A JSON answer: status and body (`Value::Null` when it is not JSON).
#[derive(Debug, Clone)]
pub struct JsonResponse {
    pub status: u16,
    pub body: Value,
}

/// An answer as bytes: status and body, unparsed.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

/// A pooled client; cheap to clone.
#[derive(Clone)]
pub struct JsonClient {
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl JsonClient {
    /// A client whose every request is bounded by `timeout`.
    pub fn new(timeout: Duration) -> JsonClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(256)
            .build(connector);
        JsonClient { client, timeout }
    }

    pub async fn request(
        &self,
        method: &str,
        url: &str,
        bearer: Option<&str>,
        body: Option<&Value>,
    ) -> Result<JsonResponse, HttpError> {
        let bytes = match body {
            Some(value) => Some(Bytes::from(serde_json::to_vec(value).map_err(|e| {
                HttpError::Build {
                    url: url.to_owned(),
                    reason: e.to_string(),
                }
            })?)),
            None => None,
        };
        let raw = self.request_raw(method, url, bearer, bytes).await?;
        Ok(JsonResponse {
            status: raw.status,
            body: serde_json::from_slice(&raw.body).unwrap_or(Value::Null),
        })
    }

    /// Like `request`, but with an already-encoded JSON body and the answer
    /// left as bytes, for callers (the load generator) that encode and parse
    /// their own wire types.
    pub async fn request_raw(
        &self,
        method: &str,
        url: &str,
        bearer: Option<&str>,
        json_body: Option<Bytes>,
    ) -> Result<RawResponse, HttpError> {
        let build_err = |reason: String| HttpError::Build {
            url: url.to_owned(),
            reason,
        };
        let method_value =
            hyper::Method::from_bytes(method.as_bytes()).map_err(|e| build_err(e.to_string()))?;
        let mut builder = hyper::Request::builder().method(method_value).uri(url);
        if let Some(token) = bearer {
            builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let bytes = match json_body {
            Some(bytes) => {
                builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
                bytes
            }
            None => Bytes::new(),
        };
        let request = builder
            .body(Full::new(bytes))
            .map_err(|e| build_err(e.to_string()))?;
        let transport = |reason: String| HttpError::Transport {
            method: method.to_owned(),
            url: url.to_owned(),
            reason,
        };
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| transport(e.to_string()))?;
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| transport(e.to_string()))?
                .to_bytes();
            Ok(RawResponse {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| HttpError::Timeout {
                method: method.to_owned(),
                url: url.to_owned(),
                secs: self.timeout.as_secs(),
            })?
    }
}

/// Percent-encodes one path segment.
pub fn encode_segment(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC).to_string()
}
