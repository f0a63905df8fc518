//! `PUT /_matrix/federation/v1/send/{txnId}` (SPEC §2.1–§2.6): one federation
//! transaction from an authenticated origin, applied exactly once.
//!
//! Flow: authenticate ([`SignedRequest`]), admit the origin under its rate
//! limit ([`admit`]: a short wait or 429) and tell the sender the peer is up
//! (its backoff resets: it just proved it is reachable), parse and validate the body
//! straight from its bytes ([`parse_transaction_json`]), take the per-(origin, txnId) lock (a
//! concurrent duplicate waits here), replay the stored response if the pair
//! was already applied, otherwise hand the device-list EDUs to
//! `E2ee::receive_device_list_edus` (before the store write: a crash before
//! the `200` makes the peer retry, and the replayed updates are then not
//! newer; it never fails the transaction), apply every accepted to-device
//! EDU and the response in one store transaction
//! ([`Store::apply_inbound_txn`], which also does the (origin, message_id)
//! dedupe), and answer `200 {"pdus": {...}}` only after that write is
//! durable. Then wake the affected `/sync` long-polls.
//!
//! Metrics: `courier_federation_transactions_total{outcome}`,
//! `courier_federation_edus_total{edu_type}` (`m.direct_to_device`,
//! `m.device_list_update`, `m.signing_key_update` (its unstable name
//! included), `other`, `invalid`), `courier_federation_spoofed_senders_total`,
//! `courier_federation_dedupe_hits_total{kind}` (`txn`, `message_id`).
//!
//! [`Store::apply_inbound_txn`]: crate::store::Store::apply_inbound_txn

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::MatrixError;
use crate::state::AppState;
use crate::store::{InboundOutcome, InboundTxn};

use super::auth::SignedRequest;
use super::rate_limit::admit;
use super::transaction::{ParsedTxn, parse_transaction_json};

fn count_transaction(outcome: &'static str) {
    metrics::counter!("courier_federation_transactions_total", "outcome" => outcome).increment(1);
}

fn json_response(body: String) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn count_edus(parsed: &ParsedTxn) {
    let report = &parsed.report;
    for (edu_type, count) in [
        ("m.direct_to_device", report.direct_to_device),
        ("m.device_list_update", report.device_list_update),
        ("m.signing_key_update", report.signing_key_update),
        ("other", report.other),
        ("invalid", report.invalid),
        ("spoofed", report.spoofed),
    ] {
        if count > 0 {
            metrics::counter!("courier_federation_edus_total", "edu_type" => edu_type)
                .increment(u64::from(count));
        }
    }
    if report.spoofed > 0 {
        metrics::counter!("courier_federation_spoofed_senders_total")
            .increment(u64::from(report.spoofed));
    }
}

/// `PUT /_matrix/federation/v1/send/{txnId}[/]`.
pub async fn put_transaction_route(
    State(state): State<AppState>,
    txn_id: Result<Path<String>, PathRejection>,
    signed: SignedRequest,
) -> Result<Response, MatrixError> {
    let origin = signed.origin;
    let inbound = &state.inbound;
    admit(
        &inbound.rate_limiter,
        &origin.server_name().normalized(),
        state.config.federation.inbound_rate_per_origin,
        state.config.federation.inbound_rate_shape,
    )
    .await?;
    state.sender.peer_is_up(origin.as_str());
    let Ok(Path(txn_id)) = txn_id else {
        count_transaction("rejected");
        return Err(MatrixError::invalid_param(
            "The transaction id is not valid UTF-8",
        ));
    };
    let Some(body) = signed.body else {
        count_transaction("rejected");
        return Err(MatrixError::not_json("A transaction needs a body"));
    };
    let parsed = parse_transaction_json(origin.server_name(), &state.config.server_name, &body)
        .inspect_err(|error| {
            tracing::info!(origin = %origin, txn_id, %error, "rejecting a federation transaction");
            count_transaction("rejected");
        })?;
    drop(body);

    // A second transaction from one origin while another is in progress
    // means that origin has more than one in flight: processed all the
    // same (dedupe keeps it safe), but counted and logged.
    let (_origin_busy, overlapping) = inbound.in_progress.enter(origin.as_str());
    if overlapping {
        tracing::warn!(origin = %origin, txn_id, "origin has overlapping transactions in flight");
        metrics::counter!("courier_federation_overlapping_transactions_total").increment(1);
    }
    let _in_progress = inbound.txn_locks.lock(origin.as_str(), &txn_id).await;
    let stored = state
        .store
        .inbound_txn_response(origin.as_str(), &txn_id)
        .await
        .map_err(|error| {
            count_transaction("error");
            MatrixError::internal("looking up an inbound transaction", &error)
        })?;
    if let Some(response_json) = stored {
        tracing::debug!(origin = %origin, txn_id, "replaying the response to a retransmitted transaction");
        metrics::counter!("courier_federation_dedupe_hits_total", "kind" => "txn").increment(1);
        count_transaction("duplicate");
        return Ok(json_response(response_json));
    }

    count_edus(&parsed);
    let edu_count = parsed.edus.len();
    // One line per transaction with every message_id it carries (whether
    // each was applied or deduped: the store logs dedupes at debug, and
    // `courier trace` shows both).
    let message_ids: Vec<String> = if tracing::enabled!(tracing::Level::INFO) {
        parsed.edus.iter().map(|e| e.message_id.clone()).collect()
    } else {
        Vec::new()
    };
    if !parsed.device_lists.is_empty() {
        let report = state
            .e2ee
            .receive_device_list_edus(origin.server_name(), parsed.device_lists)
            .await;
        tracing::debug!(origin = %origin, txn_id, ?report, "device-list EDUs received");
    }
    let outcome = state
        .store
        .apply_inbound_txn(InboundTxn {
            origin: origin.as_str().to_owned(),
            txn_id: txn_id.clone(),
            response_json: parsed.response_json.clone(),
            edus: parsed.edus,
            now_ms: crate::clock::now_ms(),
        })
        .await
        .map_err(|error| {
            count_transaction("error");
            MatrixError::internal("applying an inbound transaction", &error)
        })?;
    match outcome {
        InboundOutcome::Duplicate { response_json } => {
            metrics::counter!("courier_federation_dedupe_hits_total", "kind" => "txn").increment(1);
            count_transaction("duplicate");
            Ok(json_response(response_json))
        }
        InboundOutcome::Accepted {
            woken_devices,
            duplicate_message_ids,
        } => {
            if duplicate_message_ids > 0 {
                metrics::counter!("courier_federation_dedupe_hits_total", "kind" => "message_id")
                    .increment(u64::from(duplicate_message_ids));
            }
            state.notifier.wake(&woken_devices);
            tracing::info!(
                origin = %origin,
                txn_id,
                edus = edu_count,
                duplicate_message_ids,
                devices = woken_devices.len(),
                message_ids = %message_ids.join(","),
                "applied a federation transaction"
            );
            count_transaction("accepted");
            Ok(json_response(parsed.response_json))
        }
    }
}
