//! A tiny JSON-over-HTTP client for tests (plain HTTP to the client and RPC
//! listeners on loopback), built on hyper-util's pooled client.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// A response: status, the body parsed as JSON (`Value::Null` if it is not
/// JSON), the raw body, and headers.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub json: Value,
    pub text: String,
    pub headers: hyper::HeaderMap,
}

pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    pub fn new() -> HttpClient {
        HttpClient {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Sends a request; `bearer` sets `Authorization: Bearer`. Every request
    /// is bounded to 60 s so a broken server fails the test instead of
    /// hanging it.
    pub async fn request(
        &self,
        method: &str,
        url: &str,
        bearer: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Response {
        let mut builder = hyper::Request::builder().method(method).uri(url);
        if let Some(token) = bearer {
            builder = builder.header("Authorization", format!("Bearer {token}"));
        }
        if body.is_some() {
            builder = builder.header("Content-Type", "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("a well-formed test request");
        let response = tokio::time::timeout(Duration::from_secs(60), self.client.request(request))
            .await
            .expect("request finished within 60 s")
            .expect("request sent");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body read")
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Response {
            status,
            json,
            text,
            headers,
        }
    }

    pub async fn get(&self, url: &str, bearer: Option<&str>) -> Response {
        self.request("GET", url, bearer, None).await
    }

    pub async fn put_json(&self, url: &str, bearer: Option<&str>, body: &Value) -> Response {
        self.request("PUT", url, bearer, Some(body.to_string().into_bytes()))
            .await
    }

    pub async fn post_json(&self, url: &str, bearer: Option<&str>, body: &Value) -> Response {
        self.request("POST", url, bearer, Some(body.to_string().into_bytes()))
            .await
    }
}
