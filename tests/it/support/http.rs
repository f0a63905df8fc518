//! The tests' view of Courier's own plain-HTTP client
//! (`courier::tools::plain_http::JsonClient`): every request bounded to 60 s and
//! expected to get an answer, and the answer kept whole (status, headers,
//! text, and the body parsed as JSON when it is JSON).

use std::time::Duration;

use courier::tools::plain_http::JsonClient;
use hyper::body::Bytes;
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
    client: JsonClient,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    pub fn new() -> HttpClient {
        HttpClient {
            client: JsonClient::new(Duration::from_secs(60)),
        }
    }

    /// Sends a request; `bearer` sets `Authorization: Bearer`; a body is sent
    /// as `application/json` whatever its bytes (bad-input tests send
    /// non-JSON on purpose).
    pub async fn request(
        &self,
        method: &str,
        url: &str,
        bearer: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Response {
        let raw = self
            .client
            .request_raw(method, url, bearer, body.map(Bytes::from))
            .await
            .unwrap_or_else(|error| panic!("{method} {url}: {error}"));
        Response {
            status: raw.status,
            json: serde_json::from_slice(&raw.body).unwrap_or(Value::Null),
            text: String::from_utf8_lossy(&raw.body).into_owned(),
            headers: raw.headers,
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
