//! The X-Matrix authentication extractor (SPEC §4.3): turns a federation
//! request into a [`SignedRequest`], i.e. a verified [`Origin`] plus the
//! body as received, proven to be JSON ([`JsonBody`]), or a Matrix error.
//! Handlers that take a `SignedRequest` can rely on the origin having signed
//! exactly this method, raw request target, destination (us) and body.
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
//!    not JSON), another method only when it sent bytes. The body is
//!    checked without building a `Value` tree and kept as bytes;
//! 6. the origin's key for every header's key id, through the key ring; not
//!    obtainable → 401;
//! 7. every header's signature over `{method, uri, origin, destination: us,
//!    content?}`, with `uri` the raw request target as received (path and
//!    query, never percent-decoded) → any failure is 401. Verified first over
//!    the body's bytes as received spliced in as `content`
//!    ([`RequestToSign::raw_content_bytes`]): a sender that sends canonical
//!    JSON (Courier does) signed exactly those bytes, and no re-encoding is
//!    needed. Only when that fails is the body parsed and re-encoded as
//!    canonical JSON (the spec form, then the Python forms Synapse signs for
//!    floats), as before; a body that then has no canonical JSON form
//!    (floats, integers beyond ±(2^53−1)) cannot have been signed → 400
//!    `M_BAD_JSON`. A body with floats that verifies over its raw bytes is
//!    accepted: only the key holder can have signed those exact bytes, and
//!    they are what Synapse signs when it sends its Python canonical form.
//!    Which path verified is counted in
//!    `courier_federation_auth_verified_total{by="raw"|"canonical"}`.
//!
//! At most [`MAX_XMATRIX_HEADERS`] headers are taken (more → 400): each is
//! verified over the whole body. `origin_allow`/`origin_deny` entries match
//! the origin in normalized form (`ServerName::matches_pattern`: case,
//! trailing dot, default port). Before step 6 may cause outbound work (a
//! key not in memory), the *claimed* origin pays a token from a separate
//! key-lookup bucket, so forged requests cost bounded lookups per name and
//! never spend the real server's request budget.
//!
//! That is all it does: it yields the verified origin and the body. What an
//! authenticated request then costs (the per-origin rate limit) and what it
//! tells the sender (the peer is up) are explicit steps of the handler
//! (`send.rs`). Every refusal is logged with the origin when one is known
//! and counted in `courier_federation_auth_failures_total`.

use axum::body::Bytes;
use axum::extract::{FromRequest, OriginalUri, Request};
use axum::http::{Method, StatusCode, header};
use ed25519_dalek::VerifyingKey;
use serde_json::Value;

use crate::error::MatrixError;
use crate::identifiers::ServerName;
use crate::state::AppState;
use crate::xmatrix::{RequestToSign, XMatrix, XMatrixError, parse_authorization_headers};

pub use super::json::JsonBody;
use super::rate_limit::admit;

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

/// An authenticated federation request: who sent it and its body as
/// received, proven to be one JSON value (`None` when the request had none).
#[derive(Debug)]
pub struct SignedRequest {
    pub origin: Origin,
    pub body: Option<JsonBody>,
}

/// Most X-Matrix headers one request may carry: each is verified over the
/// whole body before the rate limit applies, and a sender needs one per key
/// it signs with (one, during a key rotation two).
pub const MAX_XMATRIX_HEADERS: usize = 4;

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
    if headers.len() > MAX_XMATRIX_HEADERS {
        tracing::info!(
            headers = headers.len(),
            "federation request with too many X-Matrix headers"
        );
        return Err(malformed());
    }
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
    // Matched in normalized form: `EVIL.example`, `evil.example.` and
    // `evil.example:8448` are one host with one certificate.
    let allowed =
        origin_allow.is_empty() || origin_allow.iter().any(|o| origin_name.matches_pattern(o));
    if !allowed || origin_deny.iter().any(|o| origin_name.matches_pattern(o)) {
        tracing::info!(origin, "refusing a request from a denied origin");
        return Err(refuse(
            "forbidden",
            MatrixError::forbidden("This server does not accept requests from your server"),
        ));
    }
    Ok((origin_name, headers))
}

/// Step 5: the body, proven to be JSON, present only when the request has
/// one.
pub fn parse_body(method: &Method, bytes: Bytes) -> Result<Option<JsonBody>, MatrixError> {
    let must_have_body = method == Method::PUT || method == Method::POST;
    if bytes.is_empty() && !must_have_body {
        return Ok(None);
    }
    JsonBody::parse(bytes)
        .map(Some)
        .map_err(|_| MatrixError::not_json("The request body is not valid JSON"))
}

/// Which bytes a request signature verified over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifiedBy {
    /// The body's bytes as received, spliced in as `content`.
    RawBody,
    /// The parsed body re-encoded as canonical JSON (spec or Python form).
    Canonical,
}

/// Step 7 for one header: its signature over `request` (whose `content` is
/// ignored) with `body` as content, first over the raw bytes, then over the
/// canonical re-encoding. `parsed` caches the parsed body between the headers
/// of one request; it is filled only when the fallback runs.
pub fn verify_signature(
    header: &XMatrix,
    request: &RequestToSign<'_>,
    body: Option<&JsonBody>,
    parsed: &mut Option<Value>,
    key: &VerifyingKey,
) -> Result<VerifiedBy, MatrixError> {
    let origin = request.origin;
    if crate::xmatrix::verify_request_raw(header, request, body.map(JsonBody::as_bytes), key)
        .is_ok()
    {
        metrics::counter!("courier_federation_auth_verified_total", "by" => "raw").increment(1);
        return Ok(VerifiedBy::RawBody);
    }
    let content = match body {
        None => None,
        Some(body) => {
            if parsed.is_none() {
                *parsed =
                    Some(body.to_value().map_err(|_| {
                        MatrixError::not_json("The request body is not valid JSON")
                    })?);
            }
            parsed.as_ref()
        }
    };
    let signed = RequestToSign {
        content,
        ..*request
    };
    // The spec form first; Python-compatible forms only for bodies with
    // floats, which Synapse accepts from clients and signs so.
    let verified = crate::xmatrix::verify_request(header, &signed, key);
    if let Err(XMatrixError::Signing(crate::signing::SigningError::Canonical(error))) = &verified {
        tracing::info!(origin, %error, "federation request body has no canonical JSON form");
        return Err(MatrixError::bad_json(
            "The request body has no canonical JSON form",
        ));
    }
    verified.map_err(|error| {
        tracing::info!(origin, key_id = %header.key, %error, uri = request.uri, "federation request signature does not verify");
        refuse(
            "signature",
            MatrixError::unauthorized("Invalid X-Matrix signature"),
        )
    })?;
    metrics::counter!("courier_federation_auth_verified_total", "by" => "canonical").increment(1);
    Ok(VerifiedBy::Canonical)
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
        let body = parse_body(&method, bytes)?;

        let signed = RequestToSign {
            method: method.as_str(),
            uri: &target,
            origin: origin.as_str(),
            destination: our_name.as_str(),
            content: None,
        };
        // A key that is not in memory may mean outbound work (store read,
        // key fetch, discovery): before any of it the claimed origin pays a
        // token from a bucket of its own for such lookups, so a flood under
        // one name costs at most its rate in lookups. It is not the bucket
        // of authenticated requests, so a forger cannot spend a real
        // server's request budget by sending garbage in its name.
        let mut parsed = None;
        let mut lookup_paid = false;
        for header in &headers {
            let key = match state.keyring.key_in_memory(origin.as_str(), &header.key) {
                Some(key) => key,
                None => {
                    if !lookup_paid {
                        let lookup_key = format!("key-lookup {}", origin.normalized());
                        admit(
                            &state.inbound.rate_limiter,
                            &lookup_key,
                            config.federation.inbound_rate_per_origin,
                            config.federation.inbound_rate_shape,
                        )
                        .await?;
                        lookup_paid = true;
                    }
                    state
                        .keyring
                        .verify_key(origin.as_str(), &header.key)
                        .await
                        .map_err(|error| {
                            tracing::info!(origin = %origin, key_id = %header.key, %error, "no key to verify a federation request");
                            refuse(
                                "key",
                                MatrixError::unauthorized("Unable to obtain the origin's signing key"),
                            )
                        })?
                }
            };
            verify_signature(header, &signed, body.as_ref(), &mut parsed, &key)?;
        }
        drop(parsed);
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
        let parse =
            |method: Method, body: &'static [u8]| parse_body(&method, Bytes::from_static(body));
        assert_eq!(parse(Method::GET, b"").expect("ok"), None);
        assert!(parse(Method::GET, b"{}").expect("ok").is_some());
        assert_eq!(
            parse(Method::PUT, b"").expect_err("no body").errcode,
            "M_NOT_JSON"
        );
        assert_eq!(
            parse(Method::POST, b"{").expect_err("bad").errcode,
            "M_NOT_JSON"
        );
        assert_eq!(
            parse(Method::PUT, b"{\"a\":\"\\ud800\"}")
                .expect_err("lone surrogate")
                .errcode,
            "M_NOT_JSON"
        );
    }

    const URI: &str = "/_matrix/federation/v1/send/t1";

    fn request<'a>(uri: &'a str, destination: &'a str) -> RequestToSign<'a> {
        RequestToSign {
            method: "PUT",
            uri,
            origin: "o.example",
            destination,
            content: None,
        }
    }

    /// Signs `request` with `content` as the sender's bytes would be: over
    /// the raw text given, spliced in (what a sender of canonical JSON signs).
    fn sign_raw(
        key: &crate::keys::ServerSigningKey,
        request: &RequestToSign<'_>,
        raw: &str,
    ) -> XMatrix {
        XMatrix {
            origin: request.origin.to_owned(),
            destination: Some(request.destination.to_owned()),
            key: key.key_id().to_owned(),
            sig: key.sign_bytes(&request.raw_content_bytes(Some(raw.as_bytes()))),
        }
    }

    fn verify(header: &XMatrix, uri: &str, raw: &'static str) -> Result<VerifiedBy, MatrixError> {
        let key = crate::keys::ServerSigningKey::from_seed("1", [9; 32]);
        let body = parse_body(&Method::PUT, Bytes::from_static(raw.as_bytes()))
            .expect("JSON")
            .expect("a body");
        let mut parsed = None;
        verify_signature(
            header,
            &request(uri, "us.example"),
            Some(&body),
            &mut parsed,
            &key.verifying_key(),
        )
    }

    #[test]
    fn a_canonical_body_verifies_over_its_raw_bytes() {
        let key = crate::keys::ServerSigningKey::from_seed("1", [9; 32]);
        let body =
            r#"{"edus":[{"content":{"a":"é\n"},"edu_type":"x"}],"origin":"o.example","pdus":[]}"#;
        let value: Value = serde_json::from_str(body).expect("JSON");
        // Courier's sender signs the canonical form, which is these bytes.
        let spec = RequestToSign {
            content: Some(&value),
            ..request(URI, "us.example")
        };
        assert_eq!(
            spec.canonical_bytes().expect("canonical"),
            spec.raw_content_bytes(Some(body.as_bytes()))
        );
        let header = crate::xmatrix::sign_request(&key, &spec).expect("signs");
        assert_eq!(
            verify(&header, URI, body).expect("verifies"),
            VerifiedBy::RawBody
        );
        // Raw bytes with floats that the origin signed as they are.
        let floats = r#"{"a":1.50,"b":1e2}"#;
        let header = sign_raw(&key, &request(URI, "us.example"), floats);
        assert_eq!(
            verify(&header, URI, floats).expect("verifies"),
            VerifiedBy::RawBody
        );
    }

    #[test]
    fn a_body_that_is_not_canonical_verifies_through_the_fallback() {
        let key = crate::keys::ServerSigningKey::from_seed("1", [9; 32]);
        let body =
            "{ \"pdus\": [],\n  \"origin\": \"o.example\", \"edus\": [{\"edu_type\": \"x\"}] }";
        let value: Value = serde_json::from_str(body).expect("JSON");
        let header = crate::xmatrix::sign_request(
            &key,
            &RequestToSign {
                content: Some(&value),
                ..request(URI, "us.example")
            },
        )
        .expect("signs");
        assert_eq!(
            verify(&header, URI, body).expect("verifies"),
            VerifiedBy::Canonical
        );
        // Synapse signs floats in its Python canonical form; sent pretty.
        let python = "{ \"a\": 2.5 }";
        let value: Value = serde_json::from_str(python).expect("JSON");
        let python_bytes = RequestToSign {
            content: Some(&value),
            ..request(URI, "us.example")
        }
        .canonical_bytes_with(crate::canonical_json::NumberStyle::Python)
        .expect("python form");
        let header = XMatrix {
            sig: key.sign_bytes(&python_bytes),
            ..header
        };
        assert_eq!(
            verify(&header, URI, python).expect("verifies"),
            VerifiedBy::Canonical
        );
    }

    #[test]
    fn tampered_bodies_and_other_requests_are_refused() {
        let key = crate::keys::ServerSigningKey::from_seed("1", [9; 32]);
        let body = r#"{"origin":"o.example","pdus":[]}"#;
        let header = sign_raw(&key, &request(URI, "us.example"), body);
        assert!(verify(&header, URI, body).is_ok());
        // Bytes changed after signing without changing the meaning: the
        // raw path fails, the canonical form is still what was signed.
        let respaced = r#"{ "pdus":[], "origin":"o.example"}"#;
        assert_eq!(
            verify(&header, URI, respaced).expect("same JSON"),
            VerifiedBy::Canonical
        );
        // Bytes changed after signing: neither path verifies.
        for tampered in [
            r#"{"origin":"o.example","pdus":[{}]}"#,
            r#"{"origin":"p.example","pdus":[]}"#,
            r#"{"origin":"o.example","pdus":[],"x":1}"#,
        ] {
            let error = verify(&header, URI, tampered).expect_err("tampered");
            assert_eq!(error.status.as_u16(), 401, "{tampered}");
            assert_eq!(error.errcode, "M_UNAUTHORIZED");
        }
        // The same body signed for another uri or another destination.
        for header in [
            sign_raw(
                &key,
                &request("/_matrix/federation/v1/send/t2", "us.example"),
                body,
            ),
            sign_raw(&key, &request(URI, "elsewhere.example"), body),
        ] {
            let error = verify(&header, URI, body).expect_err("other request");
            assert_eq!(error.status.as_u16(), 401);
        }
        // A body with no canonical form whose raw signature fails is
        // refused as before: 400 M_BAD_JSON.
        let floats = r#"{"a":1.5}"#;
        let header = sign_raw(&key, &request(URI, "us.example"), r#"{"a":1.25}"#);
        let error = verify(&header, URI, floats).expect_err("not signed");
        assert_eq!((error.status.as_u16(), error.errcode), (400, "M_BAD_JSON"));
    }
}
