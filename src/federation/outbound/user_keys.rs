//! `RemoteKeys` for the outbound federation client: the three E2EE calls to
//! another server (SPEC-E2EE §3.1–3.3) — `POST
//! /_matrix/federation/v1/user/keys/query`, `POST …/user/keys/claim` and
//! `GET …/user/devices/{userId}` — through the client's discovery, X-Matrix
//! signing and denylist, each bounded as a whole (discovery included) by the
//! caller's `timeout`, and each answer checked (`key_answers.rs`,
//! `device_list_answer.rs`) before anything of it is returned.
//!
//! Only users of the server asked are sent to it (a peer refuses a request
//! naming any other server's user); a request left with nobody to ask is
//! answered empty without a request. Answer bodies are read up to the
//! client's response cap (4 MiB, `client::MAX_RESPONSE_BYTES`), past which
//! the answer is a `BadResponse`.
//!
//! Metrics: `courier_remote_key_requests_total{endpoint, outcome}` per call
//! that reached the network layer, and
//! `courier_remote_key_answer_drops_total{endpoint, reason}` per item a
//! check dropped, logged once per answer. It caches nothing and does not
//! retry: the E2EE core decides what to do with a failure.

use std::time::Duration;

use serde_json::{Value, json};

use crate::e2ee::remote::{
    RemoteClaim, RemoteClaimAnswer, RemoteError, RemoteFuture, RemoteKeys, RemoteQuery,
    RemoteQueryAnswer, RemoteUserDevices,
};
use crate::federation::outbound::client::FederationClient;
use crate::federation::outbound::client_error::ClientError;
use crate::federation::outbound::device_list_answer::check_user_devices;
use crate::federation::outbound::key_answers::{
    Dropped, belongs_to, check_claim_answer, check_query_answer,
};
use crate::identifiers::{ServerName, UserId};

pub const QUERY_PATH: &str = "/_matrix/federation/v1/user/keys/query";
pub const CLAIM_PATH: &str = "/_matrix/federation/v1/user/keys/claim";
/// The user ID follows as one percent-encoded path segment.
pub const DEVICES_PATH: &str = "/_matrix/federation/v1/user/devices";

/// Everything but RFC 3986 unreserved characters is encoded in a segment.
const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The longest `errcode` of a refusal that is passed on.
const MAX_ERRCODE_LEN: usize = 128;

/// The `endpoint` label of the metrics.
#[derive(Debug, Clone, Copy)]
enum Endpoint {
    Query,
    Claim,
    Devices,
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Endpoint::Query => "query",
            Endpoint::Claim => "claim",
            Endpoint::Devices => "devices",
        }
    }
}

impl RemoteKeys for FederationClient {
    fn query_keys<'a>(
        &'a self,
        server: &'a ServerName,
        query: RemoteQuery,
        timeout: Duration,
    ) -> RemoteFuture<'a, RemoteQueryAnswer> {
        Box::pin(async move {
            let mut query = query;
            query
                .device_keys
                .retain(|user_id, _| belongs_to(user_id, server));
            if query.device_keys.is_empty() {
                return Ok(RemoteQueryAnswer::default());
            }
            let body = json!({ "device_keys": query.device_keys });
            let answer = self.post_json(server, QUERY_PATH, &body, timeout).await;
            finish(Endpoint::Query, server, answer, |body| {
                check_query_answer(server, &query, body)
            })
        })
    }

    fn claim_keys<'a>(
        &'a self,
        server: &'a ServerName,
        claim: RemoteClaim,
        timeout: Duration,
    ) -> RemoteFuture<'a, RemoteClaimAnswer> {
        Box::pin(async move {
            let mut claim = claim;
            claim
                .one_time_keys
                .retain(|user_id, devices| belongs_to(user_id, server) && !devices.is_empty());
            if claim.one_time_keys.is_empty() {
                return Ok(RemoteClaimAnswer::default());
            }
            let body = json!({ "one_time_keys": claim.one_time_keys });
            let answer = self.post_json(server, CLAIM_PATH, &body, timeout).await;
            finish(Endpoint::Claim, server, answer, |body| {
                check_claim_answer(server, &claim, body)
            })
        })
    }

    fn user_devices<'a>(
        &'a self,
        server: &'a ServerName,
        user: &'a UserId,
        timeout: Duration,
    ) -> RemoteFuture<'a, RemoteUserDevices> {
        Box::pin(async move {
            if user.server_name() != server.as_str() {
                return Err(RemoteError::Unreachable(format!(
                    "{user} is not a user of {server}; nothing was asked"
                )));
            }
            let path = format!(
                "{DEVICES_PATH}/{}",
                percent_encoding::utf8_percent_encode(user.as_str(), PATH_SEGMENT)
            );
            let answer = self.get_json_within(server, &path, true, timeout).await;
            finish(Endpoint::Devices, server, answer, |body| {
                check_user_devices(user, body)
            })
        })
    }
}

/// The outcome of one call: the client's error mapped, or the checked
/// answer; counted and, for drops, logged once.
fn finish<T>(
    endpoint: Endpoint,
    server: &ServerName,
    answer: Result<Value, ClientError>,
    check: impl FnOnce(Value) -> Result<(T, Dropped), String>,
) -> Result<T, RemoteError> {
    let result = answer
        .map_err(remote_error)
        .and_then(|body| check(body).map_err(RemoteError::BadResponse));
    let outcome = match &result {
        Ok(_) => "ok",
        Err(RemoteError::Unreachable(_)) => "unreachable",
        Err(RemoteError::Timeout) => "timeout",
        Err(RemoteError::Refused { .. }) => "refused",
        Err(RemoteError::BadResponse(_)) => "bad_response",
    };
    metrics::counter!(
        "courier_remote_key_requests_total",
        "endpoint" => endpoint.label(),
        "outcome" => outcome
    )
    .increment(1);
    match result {
        Ok((answer, dropped)) => {
            report_dropped(endpoint, server, &dropped);
            Ok(answer)
        }
        Err(error) => {
            tracing::warn!(
                destination = server.as_str(),
                endpoint = endpoint.label(),
                %error,
                "remote key request failed"
            );
            Err(error)
        }
    }
}

fn report_dropped(endpoint: Endpoint, server: &ServerName, dropped: &Dropped) {
    if dropped.is_empty() {
        return;
    }
    for (reason, n) in dropped.iter() {
        metrics::counter!(
            "courier_remote_key_answer_drops_total",
            "endpoint" => endpoint.label(),
            "reason" => reason
        )
        .increment(n);
    }
    tracing::warn!(
        destination = server.as_str(),
        endpoint = endpoint.label(),
        dropped = dropped.total(),
        reasons = %dropped,
        "dropped what a remote key answer held beyond the question"
    );
}

/// The remote error a client error is, for the caller's `failures`.
fn remote_error(error: ClientError) -> RemoteError {
    match error {
        ClientError::Timeout { .. } => RemoteError::Timeout,
        ClientError::Status { status, body, .. } => RemoteError::Refused {
            status,
            errcode: errcode_of(&body),
        },
        ClientError::BadResponse { reason, .. } => RemoteError::BadResponse(reason),
        error @ (ClientError::Discovery { .. }
        | ClientError::Denied { .. }
        | ClientError::Connect { .. }
        | ClientError::Request(_)) => RemoteError::Unreachable(error.to_string()),
    }
}

/// The `errcode` of a refusal's body, if it is a plausible one.
fn errcode_of(body: &str) -> Option<String> {
    let value = serde_json::from_str::<Value>(body).ok()?;
    let errcode = value.get("errcode")?.as_str()?;
    let plausible = !errcode.is_empty()
        && errcode.len() <= MAX_ERRCODE_LEN
        && errcode
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
    plausible.then(|| errcode.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_map_to_remote_errors() {
        let d = || "remote.test".to_owned();
        assert_eq!(
            remote_error(ClientError::Timeout { destination: d() }),
            RemoteError::Timeout
        );
        assert_eq!(
            remote_error(ClientError::Status {
                destination: d(),
                status: 400,
                body: r#"{"errcode":"M_UNKNOWN","error":"User is not hosted"}"#.to_owned(),
                retry_after_ms: None,
            }),
            RemoteError::Refused {
                status: 400,
                errcode: Some("M_UNKNOWN".to_owned())
            }
        );
        assert!(matches!(
            remote_error(ClientError::Denied { destination: d() }),
            RemoteError::Unreachable(_)
        ));
        assert!(matches!(
            remote_error(ClientError::BadResponse {
                destination: d(),
                reason: "body is not JSON".to_owned()
            }),
            RemoteError::BadResponse(_)
        ));
    }

    #[test]
    fn only_plausible_errcodes_are_passed_on() {
        assert_eq!(
            errcode_of(r#"{"errcode":"M_FORBIDDEN"}"#).as_deref(),
            Some("M_FORBIDDEN")
        );
        assert_eq!(errcode_of("<html>"), None);
        assert_eq!(errcode_of(r#"{"errcode":5}"#), None);
        assert_eq!(errcode_of(r#"{"errcode":"M_<script>"}"#), None);
        let long = format!(r#"{{"errcode":"{}"}}"#, "M".repeat(MAX_ERRCODE_LEN + 1));
        assert_eq!(errcode_of(&long), None);
    }

    #[test]
    fn the_user_id_is_one_encoded_path_segment() {
        let encoded =
            percent_encoding::utf8_percent_encode("@al/ice:remote.test", PATH_SEGMENT).to_string();
        assert_eq!(encoded, "%40al%2Fice%3Aremote.test");
    }
}
