//! The X-Matrix authentication extractor (SPEC §4.3): turns a federation
//! request into a [`SignedRequest`], i.e. a verified [`Origin`] plus the
//! parsed body, or a Matrix error. Handlers that take a `SignedRequest` can
//! rely on the origin having signed exactly this method, raw request target,
//! destination (us) and body.
//!
//! Checks, in order:
//! 1. the `Authorization` headers with scheme `X-Matrix`; none → 401
//!    `M_UNAUTHORIZED`;
//! 2. parse them; a malformed X-Matrix header (missing `origin`/`key`/`sig`,
//!    bad syntax, an origin that is not a server name, headers naming
//!    different origins) → **400** `M_UNAUTHORIZED`, as Synapse answers
//!    (SPEC §4.3 step 2; the spec leaves the status open);
//! 3. a `destination` that is present and not our server name → 401;
//! 4. `origin_allow` (when non-empty) and `origin_deny` → 403 `M_FORBIDDEN`;
//! 5. the body: over the configured limit → 413 `M_TOO_LARGE`; invalid JSON
//!    → 400 `M_NOT_JSON`; a PUT or POST always has a body (an empty one is
//!    not JSON), another method only when it sent bytes; a body that has no
//!    canonical JSON form (floats, integers beyond ±(2^53−1)) cannot have been
//!    signed → 400 `M_BAD_JSON`;
//! 6. the origin's key for every header's key id, through the key ring; not
//!    obtainable → 401;
//! 7. every header's signature over `{method, uri, origin, destination: us,
//!    content?}`, with `uri` the raw request target as received (path and
//!    query, never percent-decoded) → any failure is 401.
//!
//! After that the origin is authenticated: the per-origin rate limit applies
//! (a request slightly over it is held up to half a second, one further over
//! gets 429 `M_LIMIT_EXCEEDED` with Retry-After) and the sender is told the
//! peer is up (its backoff resets). Every refusal is logged with the origin when
//! one is known and counted in `courier_federation_auth_failures_total`.
//! The rate limiter lives in the [`InboundState`] extension that
//! `inbound::routes` attaches; a route outside that router gets no rate
//! limit.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, OriginalUri, Request};
use axum::http::{Method, StatusCode, header};
use serde_json::Value;

use crate::error::MatrixError;
use crate::identifiers::ServerName;
use crate::state::AppState;
use crate::xmatrix::{RequestToSign, XMatrix, XMatrixError, parse_authorization_headers};

use super::InboundState;
use super::rate_limit::{Admission, MAX_SHAPING_DELAY};

/// A server whose X-Matrix signature on the current request verified.
/// Only the extractor constructs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin(ServerName);

impl Origin {
    pub fn server_name(&self) -> &ServerName {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// An authenticated federation request: who sent it and its parsed body
/// (`None` when the request had none).
#[derive(Debug)]
pub struct SignedRequest {
    pub origin: Origin,
    pub body: Option<Value>,
}

fn refuse(reason: &'static str, error: MatrixError) -> MatrixError {
    metrics::counter!("courier_federation_auth_failures_total", "reason" => reason).increment(1);
    error
}

fn malformed() -> MatrixError {
    refuse(
        "malformed",
        MatrixError::new(
            StatusCode::BAD_REQUEST,
            "M_UNAUTHORIZED",
            "Malformed X-Matrix authorization header",
        ),
    )
}

/// Steps 1–4: the headers alone, before the body is read. Returns the
/// claimed (not yet verified) origin and every X-Matrix header (at least
/// one, all naming that origin).
pub fn check_headers<'a>(
    authorization: impl IntoIterator<Item = &'a [u8]>,
    our_server_name: &ServerName,
    origin_allow: &[String],
    origin_deny: &[String],
) -> Result<(ServerName, Vec<XMatrix>), MatrixError> {
    let mut values = Vec::new();
    for raw in authorization {
        match std::str::from_utf8(raw) {
            Ok(value) => values.push(value),
            // A non-UTF-8 value cannot be a valid X-Matrix header; if it
            // claims the scheme, it is malformed, otherwise not ours.
            Err(_)
                if raw
                    .get(..8)
                    .is_some_and(|s| s.eq_ignore_ascii_case(b"X-Matrix")) =>
            {
                return Err(malformed());
            }
            Err(_) => {}
        }
    }
    let headers = match parse_authorization_headers(values) {
        Ok(headers) => headers,
        Err(XMatrixError::NotXMatrix) => {
            tracing::info!("federation request without X-Matrix authorization");
            return Err(refuse(
                "missing",
                MatrixError::unauthorized("Missing X-Matrix authorization header"),
            ));
        }
        Err(error) => {
            tracing::info!(%error, "malformed X-Matrix authorization header");
            return Err(malformed());
        }
    };
    // The parser guarantees at least one header and a valid server name;
    // both are re-checked here rather than trusted.
    let origin_name = headers
        .first()
        .and_then(|first| ServerName::parse(&first.origin).ok())
        .ok_or_else(malformed)?;
    let origin = origin_name.as_str();
    for header in &headers {
        if let Some(destination) = &header.destination
            && destination != our_server_name.as_str()
        {
            tracing::info!(
                origin,
                destination,
                "X-Matrix request for another destination"
            );
            return Err(refuse(
                "destination",
                MatrixError::unauthorized("The request is for another destination"),
            ));
        }
    }
    let allowed = origin_allow.is_empty() || origin_allow.iter().any(|o| o == origin);
    if !allowed || origin_deny.iter().any(|o| o == origin) {
        tracing::info!(origin, "refusing a request from a denied origin");
        return Err(refuse(
            "forbidden",
            MatrixError::forbidden("This server does not accept requests from your server"),
        ));
    }
    Ok((origin_name, headers))
}

/// Step 5: the body as JSON, present only when the request has one.
pub fn parse_body(method: &Method, bytes: &[u8]) -> Result<Option<Value>, MatrixError> {
    let must_have_body = method == Method::PUT || method == Method::POST;
    if bytes.is_empty() && !must_have_body {
        return Ok(None);
    }
    serde_json::from_slice(bytes)
        .map(Some)
        .map_err(|_| MatrixError::not_json("The request body is not valid JSON"))
}

impl FromRequest<AppState> for SignedRequest {
    type Rejection = MatrixError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let config = &state.config;
        let our_name = &config.server_name;
        let (origin, headers) = check_headers(
            request
                .headers()
                .get_all(header::AUTHORIZATION)
                .iter()
                .map(|value| value.as_bytes()),
            our_name,
            &config.federation.origin_allow,
            &config.federation.origin_deny,
        )?;

        let method = request.method().clone();
        // The raw request target as received: `OriginalUri` survives router
        // nesting; `path_and_query` keeps the bytes exactly as sent.
        let uri = request
            .extensions()
            .get::<OriginalUri>()
            .map(|original| original.0.clone())
            .unwrap_or_else(|| request.uri().clone());
        let target = uri
            .path_and_query()
            .map(|pq| pq.as_str().to_owned())
            .unwrap_or_else(|| uri.path().to_owned());
        let inbound = request.extensions().get::<Arc<InboundState>>().cloned();

        let bytes = match Bytes::from_request(request, state).await {
            Ok(bytes) => bytes,
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                tracing::info!(origin = %origin, "federation request body over the limit");
                return Err(MatrixError::too_large("The request body is too large"));
            }
            Err(rejection) => {
                tracing::info!(origin = %origin, error = %rejection, "reading a federation request body failed");
                return Err(MatrixError::not_json("The request body could not be read"));
            }
        };
        let body = parse_body(&method, &bytes)?;
        drop(bytes);

        let signed = RequestToSign {
            method: method.as_str(),
            uri: &target,
            origin: origin.as_str(),
            destination: our_name.as_str(),
            content: body.as_ref(),
        };
        for header in &headers {
            let key = state
                .keyring
                .verify_key(origin.as_str(), &header.key)
                .await
                .map_err(|error| {
                    tracing::info!(origin = %origin, key_id = %header.key, %error, "no key to verify a federation request");
                    refuse(
                        "key",
                        MatrixError::unauthorized("Unable to obtain the origin's signing key"),
                    )
                })?;
            // The spec form first; Python-compatible forms only for bodies
            // with floats, which Synapse accepts from clients and signs so.
            let verified = crate::xmatrix::verify_request(header, &signed, &key);
            if let Err(crate::xmatrix::XMatrixError::Signing(
                crate::signing::SigningError::Canonical(error),
            )) = &verified
            {
                tracing::info!(origin = %origin, %error, "federation request body has no canonical JSON form");
                return Err(MatrixError::bad_json(
                    "The request body has no canonical JSON form",
                ));
            }
            verified.map_err(|error| {
                tracing::info!(origin = %origin, key_id = %header.key, %error, uri = %target, "federation request signature does not verify");
                refuse(
                    "signature",
                    MatrixError::unauthorized("Invalid X-Matrix signature"),
                )
            })?;
        }

        if let Some(inbound) = &inbound {
            match inbound.rate_limiter.admit(
                origin.as_str(),
                config.federation.inbound_rate_per_origin,
                MAX_SHAPING_DELAY,
            ) {
                Admission::Now => {}
                Admission::After(delay) => {
                    metrics::counter!("courier_federation_rate_delayed_total").increment(1);
                    tokio::time::sleep(delay).await;
                }
                Admission::Refused(wait) => {
                    tracing::info!(origin = %origin, "rate limiting a federation origin");
                    metrics::counter!("courier_federation_rate_limited_total").increment(1);
                    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                    return Err(MatrixError::limit_exceeded(secs.max(1)));
                }
            }
        }
        state.sender.peer_is_up(origin.as_str());
        Ok(SignedRequest {
            origin: Origin(origin),
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us() -> ServerName {
        ServerName::parse("us.example").expect("valid")
    }

    fn check(values: &[&[u8]], allow: &[&str], deny: &[&str]) -> Result<String, MatrixError> {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        let deny: Vec<String> = deny.iter().map(|s| s.to_string()).collect();
        check_headers(values.iter().copied(), &us(), &allow, &deny)
            .map(|(origin, headers)| format!("{origin} {}", headers.len()))
    }

    const GOOD: &[u8] =
        b"X-Matrix origin=\"o.example\",destination=\"us.example\",key=\"ed25519:1\",sig=\"abc\"";

    #[test]
    fn header_checks_in_order() {
        assert_eq!(check(&[GOOD], &[], &[]).expect("ok"), "o.example 1");
        assert_eq!(
            check(&[b"Bearer x", GOOD, GOOD], &[], &[]).expect("ok"),
            "o.example 2"
        );
        let status = |r: Result<String, MatrixError>| r.expect_err("refused").status.as_u16();
        assert_eq!(status(check(&[], &[], &[])), 401);
        assert_eq!(status(check(&[b"Bearer x"], &[], &[])), 401);
        assert_eq!(status(check(&[b"X-Matrix nonsense"], &[], &[])), 400);
        assert_eq!(status(check(&[b"X-Matrix origin=\xff\xfe"], &[], &[])), 400);
        let other_origin: &[u8] = b"X-Matrix origin=\"p.example\",key=\"ed25519:1\",sig=\"abc\"";
        assert_eq!(status(check(&[GOOD, other_origin], &[], &[])), 400);
        let elsewhere: &[u8] =
            b"X-Matrix origin=\"o.example\",destination=\"x.example\",key=\"ed25519:1\",sig=\"a\"";
        assert_eq!(status(check(&[elsewhere], &[], &[])), 401);
        assert_eq!(status(check(&[GOOD], &[], &["o.example"])), 403);
        assert_eq!(status(check(&[GOOD], &["p.example"], &[])), 403);
        assert!(check(&[GOOD], &["o.example"], &[]).is_ok());
    }

    #[test]
    fn bodies_are_present_only_when_sent() {
        assert_eq!(parse_body(&Method::GET, b"").expect("ok"), None);
        assert!(parse_body(&Method::GET, b"{}").expect("ok").is_some());
        assert_eq!(
            parse_body(&Method::PUT, b"").expect_err("no body").errcode,
            "M_NOT_JSON"
        );
        assert_eq!(
            parse_body(&Method::POST, b"{").expect_err("bad").errcode,
            "M_NOT_JSON"
        );
    }
}
