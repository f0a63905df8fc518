//! The outbound federation HTTPS client: every request to another server
//! goes through here. It resolves the destination (discovery), connects
//! through the denylist-checking TLS connector, pools connections, applies
//! the request timeout, signs every request with X-Matrix (`destination` =
//! the server name, never a delegated host) and maps the answer to JSON or
//! to a `ClientError` whose variant tells the sender what happened.
//!
//! Pooling: the URI authority of each request is the `Host` value discovery
//! chose, so HTTP/1.1 `Host` and HTTP/2 `:authority` agree with the TLS
//! name; the connector looks the endpoint up by that authority. Destinations
//! delegating to the same host therefore share connections, which is
//! exactly as safe as connecting twice.
//!
//! Bounds: discovery runs under `federation.discovery_timeout_ms` and the
//! exchange under `request_timeout_ms`, so a whole request is bounded by
//! their sum; the sender resolves first ([`FederationClient::resolve`],
//! outside its send permits) and then sends to that endpoint
//! ([`FederationClient::send_transaction_to`]). A caller that must answer
//! its own client in time (the E2EE key queries and claims) passes a bound
//! for the whole call ([`FederationClient::post_json`],
//! [`FederationClient::get_json_within`]): discovery and the exchange then
//! both end by it, and running out is a `Timeout` that gives up only that
//! request (its HTTP/1.1 connection or HTTP/2 stream), not the authority's
//! other connections. Every answer body is read up to `MAX_RESPONSE_BYTES`
//! (4 MiB), past which it is a `BadResponse`. The per-authority endpoint
//! map is bounded in entries. A request that fails in transport (connect,
//! timeout, unreadable answer) closes every connection to its authority at
//! once, idle ones included, so a failing host holds no pooled sockets;
//! `.well-known` connections are never pooled and unsigned requests (key
//! fetches) use their own pool with a short idle timeout.
//!
//! It does not retry: retry policy belongs to the sender.

use std::error::Error as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::Value;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::config::Config;
use crate::federation::outbound::client_error::{ClientError, describe_hyper_error};
use crate::federation::outbound::connector::{
    Closers, Dialer, DirectConnector, Endpoint, EndpointMap, FederationConnector,
};
use crate::federation::outbound::denylist::Denylist;
use crate::federation::outbound::discovery::Discovery;
use crate::federation::outbound::dns::{DnsResolver, HickoryResolver};
use crate::federation::outbound::lru::LruMap;
use crate::identifiers::ServerName;
use crate::keys::ServerSigningKey;
use crate::xmatrix::{RequestToSign, sign_request, sign_signed_bytes};

/// Largest response body read from a peer.
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;
/// How much of an error body is kept in `ClientError::Status`.
const ERROR_BODY_KEPT: usize = 1024;
/// Endpoints (and connection closers) remembered for the connector, least
/// recently used evicted first.
pub(crate) const ENDPOINTS_KEPT: usize = 10_000;
/// Sent with every request.
const USER_AGENT: &str = concat!("Courier/", env!("CARGO_PKG_VERSION"));
/// How long an idle pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long an idle connection of an unsigned request (a key fetch, a
/// notary query) is kept: those are rare per host, and a forged origin must
/// not leave a socket open for long.
const UNSIGNED_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a request is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sign {
    Unsigned,
    /// Over the parsed body's canonical form (or no body).
    ParsedBody,
    /// The body bytes are already canonical JSON: signed as they are.
    CanonicalBody,
}

/// What a 2xx answer must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// A JSON object, else `BadResponse`.
    JsonObject,
    /// Anything: the 2xx is what counts (`/send`: the peer applied the
    /// transaction whatever its body says); a body that is not a JSON
    /// object, or cannot be read to its end, is logged, counted in
    /// `courier_federation_send_bad_body_total` and read as `{}`.
    Accepted,
}

pub struct FederationClient {
    origin: ServerName,
    signing_key: Arc<ServerSigningKey>,
    /// Signed requests (transactions).
    http: Client<FederationConnector, Full<Bytes>>,
    /// Unsigned requests (key fetches, notaries): short-lived idle sockets.
    unsigned_http: Client<FederationConnector, Full<Bytes>>,
    discovery: Arc<Discovery>,
    endpoints: EndpointMap,
    closers: Arc<Closers>,
    request_timeout: Duration,
}

impl FederationClient {
    /// The id of the key our requests are signed with (`ed25519:<version>`).
    pub fn key_id(&self) -> &str {
        self.signing_key.key_id()
    }

    /// A client resolving through hickory: `federation.nameservers` if set,
    /// else the system resolver.
    pub fn new(
        config: Arc<Config>,
        signing_key: Arc<ServerSigningKey>,
    ) -> Result<Self, ClientError> {
        let resolver = HickoryResolver::new(&config.federation.nameservers)
            .map_err(|e| ClientError::Request(e.to_string()))?;
        Self::with_resolver(config, signing_key, Arc::new(resolver))
    }

    /// A client resolving names through `resolver` (tests inject answers).
    pub fn with_resolver(
        config: Arc<Config>,
        signing_key: Arc<ServerSigningKey>,
        resolver: Arc<dyn DnsResolver>,
    ) -> Result<Self, ClientError> {
        let federation = &config.federation;
        let tls = crate::tls::client_config(&federation.extra_ca)
            .map_err(|e| ClientError::Request(format!("outbound TLS: {e}")))?;
        let dialer = Arc::new(Dialer {
            denylist: Denylist::new(&federation.ip_allow),
            tls: TlsConnector::from(tls),
            connect_timeout: federation.connect_timeout,
        });
        // A `.well-known` answer is cached for at least a minute, so its
        // connection would only sit idle: none is kept.
        let well_known_client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_max_idle_per_host(0)
            .build(DirectConnector {
                resolver: resolver.clone(),
                dialer: dialer.clone(),
            });
        let discovery = Arc::new(Discovery::new(
            resolver,
            well_known_client,
            federation.well_known_port,
            federation.request_timeout,
            federation.discovery_timeout,
        ));
        let endpoints: EndpointMap = Arc::new(Mutex::new(LruMap::new(ENDPOINTS_KEPT)));
        let closers = Arc::new(Closers::new(ENDPOINTS_KEPT));
        let connector = FederationConnector {
            endpoints: endpoints.clone(),
            closers: closers.clone(),
            dialer,
        };
        let http = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(federation.pool_idle_per_host)
            .build(connector.clone());
        let unsigned_http = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(UNSIGNED_POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(1)
            .build(connector);
        Ok(FederationClient {
            origin: config.server_name.clone(),
            signing_key,
            http,
            unsigned_http,
            discovery,
            endpoints,
            closers,
            request_timeout: federation.request_timeout,
        })
    }

    /// Where `destination` is reached (SPEC §6), within the discovery
    /// deadline. The sender calls this before taking a send permit.
    pub async fn resolve(&self, destination: &ServerName) -> Result<Endpoint, ClientError> {
        self.discovery.resolve(destination).await
    }

    /// `GET https://<destination><path_and_query>`, X-Matrix signed when
    /// `signed`; a 2xx JSON object body, else an error.
    pub async fn get_json(
        &self,
        destination: &ServerName,
        path_and_query: &str,
        signed: bool,
    ) -> Result<Value, ClientError> {
        self.get_json_inner(destination, path_and_query, signed, None)
            .await
    }

    /// As [`get_json`](Self::get_json), with the whole call (discovery
    /// included) bounded by `within`: past it, `ClientError::Timeout`.
    pub async fn get_json_within(
        &self,
        destination: &ServerName,
        path_and_query: &str,
        signed: bool,
        within: Duration,
    ) -> Result<Value, ClientError> {
        let deadline = Instant::now() + within;
        self.get_json_inner(destination, path_and_query, signed, Some(deadline))
            .await
    }

    async fn get_json_inner(
        &self,
        destination: &ServerName,
        path_and_query: &str,
        signed: bool,
        deadline: Option<Instant>,
    ) -> Result<Value, ClientError> {
        let sign = if signed {
            Sign::ParsedBody
        } else {
            Sign::Unsigned
        };
        let target = Target {
            destination,
            endpoint: None,
        };
        let out = Outgoing {
            method: Method::GET,
            path_and_query,
            body: None,
            sign,
            answer: Answer::JsonObject,
            deadline,
        };
        self.request(target, out).await
    }

    /// `POST https://<destination><path>` with `body` sent as canonical
    /// JSON, X-Matrix signed over exactly those bytes; a 2xx JSON object
    /// body, else an error. The whole call (discovery included) is bounded
    /// by `within`: past it, `ClientError::Timeout`.
    pub async fn post_json(
        &self,
        destination: &ServerName,
        path: &str,
        body: &Value,
        within: Duration,
    ) -> Result<Value, ClientError> {
        let deadline = Instant::now() + within;
        let bytes = crate::canonical_json::to_canonical_bytes(body)
            .map_err(|e| ClientError::Request(format!("request body: {e}")))?;
        let target = Target {
            destination,
            endpoint: None,
        };
        let out = Outgoing {
            method: Method::POST,
            path_and_query: path,
            body: Some(&bytes),
            sign: Sign::CanonicalBody,
            answer: Answer::JsonObject,
            deadline: Some(deadline),
        };
        self.request(target, out).await
    }

    /// `PUT /_matrix/federation/v1/send/{txn_id}` with `body` sent byte for
    /// byte (the signature covers its parsed form), resolving `destination`
    /// first. `txn_id` must already be URL-safe (`[A-Za-z0-9._~-]`). Any
    /// 2xx counts as delivered, whatever its body.
    pub async fn send_transaction(
        &self,
        destination: &ServerName,
        txn_id: &str,
        body: &[u8],
    ) -> Result<Value, ClientError> {
        let endpoint = self.resolve(destination).await?;
        self.send_transaction_to(destination, &endpoint, txn_id, body)
            .await
    }

    /// As [`send_transaction`](Self::send_transaction), to an endpoint
    /// already resolved for `destination`; no discovery happens here.
    pub async fn send_transaction_to(
        &self,
        destination: &ServerName,
        endpoint: &Endpoint,
        txn_id: &str,
        body: &[u8],
    ) -> Result<Value, ClientError> {
        if txn_id.is_empty()
            || !txn_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
        {
            return Err(ClientError::Request(format!(
                "txn id {txn_id:?} is not URL-safe"
            )));
        }
        let path = format!("/_matrix/federation/v1/send/{txn_id}");
        // A body in `build_body`'s canonical layout is signed as it is; an
        // older stored body is parsed and canonicalized first.
        let sign = if crate::federation::sender::transaction::is_canonical_layout(body) {
            Sign::CanonicalBody
        } else {
            Sign::ParsedBody
        };
        let target = Target {
            destination,
            endpoint: Some(endpoint),
        };
        let out = Outgoing {
            method: Method::PUT,
            path_and_query: &path,
            body: Some(body),
            sign,
            answer: Answer::Accepted,
            deadline: None,
        };
        self.request(target, out).await
    }

    /// One request; on a transport failure every connection to the
    /// authority is closed. Discovery (when the target is not resolved yet)
    /// and the exchange both end at the request's deadline, if it has one.
    async fn request(&self, target: Target<'_>, out: Outgoing<'_>) -> Result<Value, ClientError> {
        let endpoint = match (target.endpoint, out.deadline) {
            (Some(endpoint), _) => endpoint.clone(),
            (None, None) => self.discovery.resolve(target.destination).await?,
            (None, Some(deadline)) => {
                match tokio::time::timeout_at(deadline, self.discovery.resolve(target.destination))
                    .await
                {
                    Ok(resolved) => resolved?,
                    Err(_) => {
                        return Err(ClientError::Timeout {
                            destination: target.destination.as_str().to_owned(),
                        });
                    }
                }
            }
        };
        let authority = endpoint.host_header.clone();
        let deadline = out.deadline;
        let result = self.exchange(target.destination, endpoint, out).await;
        if let Err(error) = &result
            && error.is_transport()
        {
            // A caller's bound running out says nothing about the host: the
            // request's own connection or stream is dropped with it, but the
            // others (a transaction in flight) stay, so a client asking with
            // a tiny timeout cannot tear down the sender's connections.
            let cut_by_caller = matches!(error, ClientError::Timeout { .. })
                && deadline.is_some_and(|deadline| Instant::now() >= deadline);
            if !cut_by_caller {
                self.closers.close_all(&authority);
            }
        }
        result
    }

    async fn exchange(
        &self,
        destination: &ServerName,
        endpoint: Endpoint,
        out: Outgoing<'_>,
    ) -> Result<Value, ClientError> {
        let Outgoing {
            method,
            path_and_query,
            body,
            sign,
            answer,
            deadline,
        } = out;
        let dest = destination.as_str();
        let authority = endpoint.host_header.clone();
        crate::sync::lock(&self.endpoints).insert(authority.clone(), endpoint);
        let uri = format!("https://{authority}{path_and_query}");
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(&uri)
            .header(http::header::HOST, &authority)
            .header(http::header::USER_AGENT, USER_AGENT);
        let header = match (sign, body) {
            (Sign::Unsigned, _) => None,
            (Sign::CanonicalBody, Some(bytes)) => {
                let signed = RequestToSign {
                    method: method.as_str(),
                    uri: path_and_query,
                    origin: self.origin.as_str(),
                    destination: dest,
                    content: None,
                }
                .raw_content_bytes(Some(bytes));
                Some(sign_signed_bytes(
                    &self.signing_key,
                    self.origin.as_str(),
                    dest,
                    &signed,
                ))
            }
            (Sign::ParsedBody | Sign::CanonicalBody, body) => {
                let content = match body {
                    Some(bytes) => Some(serde_json::from_slice::<Value>(bytes).map_err(|e| {
                        ClientError::Request(format!("request body is not JSON: {e}"))
                    })?),
                    None => None,
                };
                Some(
                    sign_request(
                        &self.signing_key,
                        &RequestToSign {
                            method: method.as_str(),
                            uri: path_and_query,
                            origin: self.origin.as_str(),
                            destination: dest,
                            content: content.as_ref(),
                        },
                    )
                    .map_err(|e| ClientError::Request(format!("signing: {e}")))?,
                )
            }
        };
        if let Some(header) = header {
            builder = builder.header(http::header::AUTHORIZATION, header.to_header_value());
        }
        let request = match body {
            Some(bytes) => builder
                .header(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )
                .body(Full::new(Bytes::copy_from_slice(bytes))),
            None => builder.body(Full::new(Bytes::new())),
        }
        .map_err(|e| ClientError::Request(e.to_string()))?;

        let http = if sign == Sign::Unsigned {
            &self.unsigned_http
        } else {
            &self.http
        };
        let exchange = async {
            let response = http
                .request(request)
                .await
                .map_err(|e| map_hyper_error(dest, &e))?;
            let status = response.status();
            let retry_after_header = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|seconds| seconds.saturating_mul(1000));
            let bytes = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map(|body| body.to_bytes())
                .map_err(|e| format!("reading the body: {e}"));
            Ok::<_, ClientError>((status, retry_after_header, bytes))
        };
        let mut until = Instant::now() + self.request_timeout;
        if let Some(deadline) = deadline {
            until = until.min(deadline);
        }
        let (status, retry_after_header, bytes) =
            match tokio::time::timeout_at(until, exchange).await {
                Ok(result) => result?,
                Err(_) => {
                    return Err(ClientError::Timeout {
                        destination: dest.to_owned(),
                    });
                }
            };
        let value = match bytes {
            Err(reason) if status.is_success() && answer == Answer::Accepted => reason,
            Err(reason) => {
                return Err(ClientError::BadResponse {
                    destination: dest.to_owned(),
                    reason,
                });
            }
            Ok(bytes) => {
                if !status.is_success() {
                    return Err(status_error(dest, status, retry_after_header, &bytes));
                }
                match serde_json::from_slice::<Value>(&bytes) {
                    Ok(value) if value.is_object() => return Ok(value),
                    Ok(_) => "body is not a JSON object".to_owned(),
                    Err(error) => format!("body is not JSON: {error}"),
                }
            }
        };
        match answer {
            Answer::JsonObject => Err(ClientError::BadResponse {
                destination: dest.to_owned(),
                reason: value,
            }),
            Answer::Accepted => {
                // The rule for `/send` (SECURITY-REVIEW F16): the 2xx means
                // the peer applied the transaction; the body is only a
                // report, so a bad one is logged and counted, not retried.
                metrics::counter!("courier_federation_send_bad_body_total").increment(1);
                tracing::warn!(
                    destination = dest,
                    status = status.as_u16(),
                    reason = %value,
                    "peer accepted the request with an invalid body; counted as delivered"
                );
                Ok(Value::Object(serde_json::Map::new()))
            }
        }
    }
}

/// One request as the caller describes it.
struct Outgoing<'a> {
    method: Method,
    path_and_query: &'a str,
    body: Option<&'a [u8]>,
    sign: Sign,
    answer: Answer,
    /// When the whole call must have ended (discovery included), if the
    /// caller set a bound tighter than the client's own timeouts.
    deadline: Option<Instant>,
}

/// Whom a request goes to, and where if already resolved.
#[derive(Clone, Copy)]
struct Target<'a> {
    destination: &'a ServerName,
    endpoint: Option<&'a Endpoint>,
}

fn status_error(
    destination: &str,
    status: StatusCode,
    retry_after_header: Option<u64>,
    bytes: &[u8],
) -> ClientError {
    let retry_after_body = serde_json::from_slice::<Value>(bytes)
        .ok()
        .and_then(|v| v.get("retry_after_ms").and_then(Value::as_u64));
    let mut body = String::from_utf8_lossy(bytes).into_owned();
    if body.len() > ERROR_BODY_KEPT {
        let mut cut = ERROR_BODY_KEPT;
        while !body.is_char_boundary(cut) {
            cut -= 1;
        }
        body.truncate(cut);
    }
    ClientError::Status {
        destination: destination.to_owned(),
        status: status.as_u16(),
        body,
        retry_after_ms: retry_after_header.or(retry_after_body),
    }
}

/// Recovers our own connector error from hyper's wrapper, else describes it.
fn map_hyper_error(destination: &str, error: &hyper_util::client::legacy::Error) -> ClientError {
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(ours) = cause.downcast_ref::<ClientError>() {
            return ours.clone().for_destination(destination);
        }
        source = cause.source();
    }
    ClientError::Connect {
        destination: destination.to_owned(),
        reason: describe_hyper_error(error),
    }
}
