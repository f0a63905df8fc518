//! One-shot HTTPS requests for tests: TLS to a relay's federation listener
//! on loopback, verifying the certificate against the repository's
//! development CA with the given server name (SNI), over HTTP/1.1; the
//! answer as status and JSON, or as a whole `Reply` (headers and raw text
//! too).

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde_json::Value;

/// GETs `path` from `addr` over TLS, expecting a certificate valid for
/// `tls_name`; returns status and JSON body.
pub async fn https_get_json(
    addr: std::net::SocketAddr,
    tls_name: &str,
    host: &str,
    path: &str,
) -> (u16, Value) {
    https_request(addr, tls_name, host, "GET", path, &[], None).await
}

/// One request over TLS (HTTP/1.1) to `addr`, verifying the certificate
/// against the development CA for `tls_name`, with extra `headers` (repeat
/// a name to send it several times) and an optional body; returns status
/// and JSON body (`Null` when the body is not JSON).
pub async fn https_request(
    addr: std::net::SocketAddr,
    tls_name: &str,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Option<Bytes>,
) -> (u16, Value) {
    let reply = https_exchange(addr, tls_name, host, method, path, headers, body).await;
    (reply.status, reply.json)
}

/// The whole answer to one request: status, headers, the body as text
/// (lossy UTF-8, for failure messages and byte-for-byte comparisons) and as
/// JSON (`Null` when it is not JSON).
pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub text: String,
    pub json: Value,
}

/// [`https_request`] returning the whole [`Reply`]. `path` is sent as the
/// request target exactly as given (no re-encoding), so tests can send
/// percent-encoded or otherwise unusual targets.
pub async fn https_exchange(
    addr: std::net::SocketAddr,
    tls_name: &str,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Option<Bytes>,
) -> Reply {
    courier::tls::install_crypto_provider();
    let ca = super::relay::repo_root().join("certs/dev-ca.crt");
    let mut config = (*courier::tls::client_config(&[ca]).expect("client TLS config")).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .expect("tcp connect");
        let name = ServerName::try_from(tls_name.to_owned()).expect("server name");
        let tls = connector.connect(name, tcp).await.expect("tls handshake");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("http handshake");
        tokio::spawn(conn);
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("Host", host);
        for (name, value) in headers {
            request = request.header(*name, value.as_str());
        }
        let request = request
            .body(Full::new(body.unwrap_or_default()))
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        Reply {
            status,
            headers,
            text: String::from_utf8_lossy(&body).into_owned(),
            json: serde_json::from_slice(&body).unwrap_or(Value::Null),
        }
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .expect("https request within 30 s")
}
