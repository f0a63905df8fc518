//! A small JSON-over-plain-HTTP client for Courier's own tools (`demo`,
//! `bench`, `send`, `status`): they talk to client and RPC listeners, which
//! are plain HTTP on loopback or behind a proxy. Federation traffic never
//! goes through here (see `federation::outbound::client`).
//!
//! Two shapes of client: a pool (`JsonClient::new`) that opens connections
//! as concurrent requests need them, and a single HTTP/1.1 keep-alive
//! connection (`JsonClient::one_connection`) on which requests take turns,
//! as one client device's `/sync` loop has (the load generator's receivers).

use std::time::Duration;

use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
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

/// A client; cheap to clone (clones share its pool or its connection).
#[derive(Clone)]
pub struct JsonClient {
    transport: Transport,
    timeout: Duration,
}

#[derive(Clone)]
enum Transport {
    Pool(Box<Client<HttpConnector, Full<Bytes>>>),
    One(Arc<OneConnection>),
}

/// One HTTP/1.1 keep-alive connection to whatever origin the requests
/// name, opened on first use and reopened after the server or a failure
/// closed it. Requests take turns: the lock is held from sending to the end
/// of the body, so there is never a second connection.
struct OneConnection {
    /// The connection between requests and its origin (`host:port`);
    /// `None` before the first request, after a failed or abandoned one
    /// (dropping a request mid-flight closes its connection), and while a
    /// request is on it.
    idle: tokio::sync::Mutex<Option<(String, http1::SendRequest<Full<Bytes>>)>>,
}

impl JsonClient {
    /// A pooled client whose every request is bounded by `timeout`.
    pub fn new(timeout: Duration) -> JsonClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(256)
            .build(connector);
        JsonClient {
            transport: Transport::Pool(Box::new(client)),
            timeout,
        }
    }

    /// A client on one HTTP/1.1 keep-alive connection (plain `http://`
    /// only); concurrent requests of its clones wait for each other. Every
    /// request is bounded by `timeout`, the wait for the connection
    /// included.
    pub fn one_connection(timeout: Duration) -> JsonClient {
        JsonClient {
            transport: Transport::One(Arc::new(OneConnection {
                idle: tokio::sync::Mutex::new(None),
            })),
            timeout,
        }
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
            match &self.transport {
                Transport::Pool(client) => match client.request(request).await {
                    Ok(response) => collect(response).await,
                    Err(e) => Err(e.to_string()),
                },
                Transport::One(connection) => connection.exchange(request).await,
            }
            .map_err(transport)
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

/// Reads a whole answer.
async fn collect(response: hyper::Response<Incoming>) -> Result<RawResponse, String> {
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(RawResponse {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}

impl OneConnection {
    /// Sends `request` (absolute URI) on the connection and reads the whole
    /// answer. A kept connection the server closed before the request went
    /// out is replaced once; a request that did go out is never resent.
    async fn exchange(
        &self,
        mut request: hyper::Request<Full<Bytes>>,
    ) -> Result<RawResponse, String> {
        let uri = request.uri();
        if uri.scheme_str() != Some("http") {
            return Err("only http:// URLs have one-connection clients".into());
        }
        let authority = uri
            .authority()
            .ok_or_else(|| "the URL names no host".to_owned())?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = authority.port_u16().unwrap_or(80);
        let origin = format!("{host}:{port}");
        let host_header =
            hyper::header::HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?;
        let path: hyper::Uri = uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| e.to_string())?;
        *request.uri_mut() = path;
        request
            .headers_mut()
            .insert(hyper::header::HOST, host_header);

        let mut idle = self.idle.lock().await;
        let kept = idle.take().filter(|(o, s)| *o == origin && !s.is_closed());
        let (mut sender, mut reused) = match kept {
            Some((_, sender)) => (sender, true),
            None => (connect(&host, port).await?, false),
        };
        let response = loop {
            if sender.ready().await.is_err() && reused {
                sender = connect(&host, port).await?;
                reused = false;
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => break response,
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) if reused => {
                        request = unsent;
                        sender = connect(&host, port).await?;
                        reused = false;
                    }
                    _ => return Err(failed.into_error().to_string()),
                },
            }
        };
        let raw = collect(response).await?;
        *idle = Some((origin, sender));
        Ok(raw)
    }
}

/// Opens a connection to `host:port` and starts its task, which ends when
/// the connection closes.
async fn connect(host: &str, port: u16) -> Result<http1::SendRequest<Full<Bytes>>, String> {
    let failed = |e: &dyn std::fmt::Display| format!("connecting to {host}:{port}: {e}");
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| failed(&e))?;
    stream.set_nodelay(true).map_err(|e| failed(&e))?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed(&e))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "plain HTTP connection ended");
        }
    });
    Ok(sender)
}

/// Percent-encodes one path segment.
pub fn encode_segment(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A plain HTTP/1.1 server on loopback answering `{}` to everything,
    /// with `Connection: close` on each connection's `close_at`-th answer;
    /// returns its URL and the count of connections it accepted.
    async fn counting_server(close_at: Option<usize>) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("loopback binds");
        let url = format!("http://{}", listener.local_addr().expect("bound address"));
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let answered = Arc::new(AtomicUsize::new(0));
                let service = hyper::service::service_fn(move |_request| {
                    let n = answered.fetch_add(1, Ordering::SeqCst) + 1;
                    async move {
                        let mut response =
                            hyper::Response::new(Full::new(Bytes::from_static(b"{}")));
                        if close_at == Some(n) {
                            response.headers_mut().insert(
                                hyper::header::CONNECTION,
                                hyper::header::HeaderValue::from_static("close"),
                            );
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (url, accepted)
    }

    #[tokio::test]
    async fn a_one_connection_client_and_its_clones_keep_one_connection() {
        let (url, accepted) = counting_server(None).await;
        let client = JsonClient::one_connection(Duration::from_secs(10));
        for i in 0..5 {
            let r = client
                .request("GET", &format!("{url}/sync?since={i}"), Some("t"), None)
                .await
                .expect("answered");
            assert_eq!((r.status, r.body.clone()), (200, serde_json::json!({})));
        }
        let mut turns = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let (client, url) = (client.clone(), url.clone());
            turns.spawn(async move {
                let body = serde_json::json!({ "messages": {} });
                client.request("PUT", &url, None, Some(&body)).await
            });
        }
        while let Some(turn) = turns.join_next().await {
            assert_eq!(turn.expect("joins").expect("answered").status, 200);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_one_connection_client_reopens_a_connection_the_server_closed() {
        let (url, accepted) = counting_server(Some(2)).await;
        let client = JsonClient::one_connection(Duration::from_secs(10));
        for _ in 0..4 {
            let r = client.request("GET", &url, None, None).await;
            assert_eq!(r.expect("answered").status, 200);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        let refused = JsonClient::one_connection(Duration::from_secs(10))
            .request("GET", "https://127.0.0.1:1/", None, None)
            .await;
        assert!(matches!(refused, Err(HttpError::Transport { .. })));
    }
}
