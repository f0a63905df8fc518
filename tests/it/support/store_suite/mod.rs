//! The backend-generic conformance suite of `courier::store::Store`: one
//! async function per case, each taking a [`Harness`] with a fresh, empty
//! store (and a way to open it again), in one case file per area of the
//! trait: devices and tokens (`devices.rs`), inbox reads and fan-out
//! (`inbox.rs`), client sends (`send.rs`), inbound transactions
//! (`inbound.rs`), the outbox and its transactions (`outbox.rs`), retry
//! state and destination statuses (`retry.rs`), the server key cache
//! (`server_keys.rs`), pruning (`prune.rs`), worker names and reopening
//! (`lifecycle.rs`), retention: TTLs, inbox caps, dead destinations
//! and the expiry totals (`retention.rs`), and the trace journal
//! (`trace.rs`). This file holds the harness, the helpers the cases
//! share and the macro that instantiates the suite.
//!
//! It knows no backend; a backend's test module supplies a constructor and
//! expands `store_conformance_tests!` to get one `#[tokio::test]` per case,
//! named as the case:
//!
//! ```ignore
//! use crate::support::store_suite;
//! async fn make() -> store_suite::Harness { /* fresh store + its temp dir */ }
//! store_conformance_tests!(make);
//! ```
//!
//! Adding a case file is one line in `suite_cases!` below:
//! `area: [case_a, case_b],` declares `store_suite/area.rs` as a module and
//! runs each listed case on every backend. The file holds one
//! `pub async fn case_a(harness: &Harness)` per case and takes the shared
//! helpers from here (`use super::{…}`). A new case in an existing file is
//! one more name on that file's line.

use std::any::Any;
use std::sync::Arc;

use courier::store::{
    ClientTxnKey, DeviceKey, DeviceTarget, InFlightTxn, InboundEdu, InboundTxn, NewInboxMessage,
    NewOutboxEdu, SendBatch, SendOutcome, Store,
};
use serde_json::json;

/// A fresh store and whatever must outlive it (a temp dir, a database).
pub struct Harness {
    pub store: Arc<dyn Store>,
    /// Kept alive (never read) until the case ends.
    pub _guard: Box<dyn Any + Send + Sync>,
    /// Opens the same backing store again (after `close`).
    pub reopen: Reopen,
}

/// Opens a backend's store again on the same file or database.
pub type Reopen = Box<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Arc<dyn Store>> + Send>>
        + Send
        + Sync,
>;

/// Every case of the suite, by case file (`area: [case, …]` for
/// `store_suite/area.rs`): the one list that both declares the case files
/// (`declare_case_files!`, below) and instantiates their cases for a
/// backend (`store_conformance_tests!`). Expands to `$callback! { $args
/// list }`.
macro_rules! suite_cases {
    ($callback:ident! { $($args:tt)* }) => {
        $callback! { $($args)*
            devices: [devices_and_tokens, delete_device_removes_tokens_and_inbox],
            inbox: [inbox_order_and_next_batch, inbox_limit_pages_150_as_100_then_50, repeated_since_redelivers_same_rows, star_expands_at_write_time, unknown_devices_are_dropped, mixed_targets_keep_order_in_large_sends],
            send: [client_txn_dedupe_writes_nothing, outbox_rows_and_destinations_in_order, concurrent_writers_each_row_once, seventy_recipients_in_one_call_each_get_their_row_once_in_order],
            inbound: [inbound_txn_dedupe_replays_response, inbound_message_id_dedupe_inside_new_txn, seventy_edus_in_one_inbound_txn_dedupe_and_keep_order],
            outbox: [peek_outbox_respects_limits, begin_ack_txn, refuse_txn_counts_refusals, quarantine_and_release, advance_acks_and_records_the_next_in_one_step, a_recorded_transaction_reads_back_byte_for_byte],
            refusals: [refusal_state_round_trips_beside_the_retry_state, restore_quarantined_returns_an_edu_to_its_place, requeue_quarantined_puts_all_back_in_order_at_the_end],
            retry: [retry_state_round_trip, destination_statuses_report_queues],
            server_keys: [server_keys_round_trip],
            prune: [prune_expires_dedupe_records, prune_is_bounded_by_batch, prune_pass_clears_a_backlog_while_writes_proceed, idle_destinations_are_retired],
            lifecycle: [worker_name_claims_by_one_instance, reopen_keeps_data_and_stream_ids_never_repeat],
            retention: [inbox_ttl_per_pattern_keeps_unmatched_types, inbox_cap_drops_the_oldest_beyond_it, dead_destinations_lose_queued_in_flight_and_quarantined_rows, dead_destination_expiry_is_bounded_by_batch, expiry_totals_survive_reopen],
            trace: [trace_follows_a_remote_message_through_attempts_and_ack, trace_follows_an_inbound_message_to_the_sync_that_acked_it, trace_shows_local_sends_and_quarantined_edus, trace_journal_off_writes_nothing_and_prune_ages_it_out],
        }
    };
}
pub(crate) use suite_cases;

/// `pub mod area;` for every case file `suite_cases!` lists.
macro_rules! declare_case_files {
    ($($file:ident: [$($case:ident),* $(,)?]),* $(,)?) => {
        $(pub mod $file;)*
    };
}
suite_cases!(declare_case_files! {});

/// Expands to one `#[tokio::test]` per conformance case (every case that
/// `suite_cases!` lists), each calling `$make().await` for a fresh
/// `Harness`; `optional $make` takes a constructor returning
/// `Option<Harness>`, whose `None` skips the case (a backend whose server is
/// not installed; the constructor says so on stderr).
#[allow(unused_macros)]
macro_rules! store_conformance_tests {
    (@cases [plain $make:path] $($file:ident: [$($case:ident),* $(,)?]),* $(,)?) => {
        $($(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let harness = $make().await;
                $crate::support::store_suite::$file::$case(&harness).await;
                drop(harness);
            }
        )*)*
    };
    (@cases [optional $make:path] $($file:ident: [$($case:ident),* $(,)?]),* $(,)?) => {
        $($(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(harness) = $make().await else { return };
                $crate::support::store_suite::$file::$case(&harness).await;
                drop(harness);
            }
        )*)*
    };
    (optional $make:path) => {
        $crate::support::store_suite::suite_cases!(store_conformance_tests! { @cases [optional $make] });
    };
    ($make:path) => {
        $crate::support::store_suite::suite_cases!(store_conformance_tests! { @cases [plain $make] });
    };
}

const NOW: i64 = 1_700_000_000_000;
const ALICE: &str = "@alice:local.test";
const BOB: &str = "@bob:local.test";
const SENDER: &str = "@sender:local.test";

fn msg(user: &str, device: DeviceTarget, n: u64) -> NewInboxMessage {
    NewInboxMessage {
        user_id: user.to_owned(),
        device,
        message_id: format!("msg{n}"),
        sender: SENDER.to_owned(),
        event_type: "m.test".to_owned(),
        content_json: json!({ "n": n }).to_string(),
    }
}

/// A client send of one message `{"n": n}` from `user` to its own
/// `device`: the backend-specific tests' building block.
pub fn send(txn_id: &str, user: &str, device: &str, n: u32) -> SendBatch {
    SendBatch {
        txn: ClientTxnKey {
            user_id: user.to_owned(),
            device_id: "D".to_owned(),
            event_type: "m.test".to_owned(),
            txn_id: txn_id.to_owned(),
        },
        local: vec![NewInboxMessage {
            user_id: user.to_owned(),
            device: DeviceTarget::One(device.to_owned()),
            message_id: txn_id.to_owned(),
            sender: user.to_owned(),
            event_type: "m.test".to_owned(),
            content_json: format!("{{\"n\":{n}}}"),
        }],
        remote: vec![],
        now_ms: 0,
    }
}

fn one(device: &str) -> DeviceTarget {
    DeviceTarget::One(device.to_owned())
}

fn edu(destination: &str, n: u64, messages: u32) -> NewOutboxEdu {
    NewOutboxEdu {
        destination: destination.to_owned(),
        edu_json: json!({ "edu_type": "m.direct_to_device", "content": { "n": n } }).to_string(),
        message_count: messages,
    }
}

fn batch(txn_id: &str, local: Vec<NewInboxMessage>, remote: Vec<NewOutboxEdu>) -> SendBatch {
    SendBatch {
        txn: ClientTxnKey {
            user_id: SENDER.to_owned(),
            device_id: "SENDERDEV".to_owned(),
            event_type: "m.test".to_owned(),
            txn_id: txn_id.to_owned(),
        },
        local,
        remote,
        now_ms: NOW,
    }
}

fn key(user: &str, device: &str) -> DeviceKey {
    DeviceKey {
        user_id: user.to_owned(),
        device_id: device.to_owned(),
    }
}

fn n_of(content_json: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(content_json).expect("stored content is JSON");
    v["n"].as_u64().expect("content has n")
}

async fn devices(store: &dyn Store, user: &str, ids: &[&str]) {
    for id in ids {
        store
            .upsert_device(user, id, None)
            .await
            .expect("upsert device");
    }
}

async fn accepted(store: &dyn Store, b: SendBatch) -> (Vec<DeviceKey>, Vec<String>) {
    match store.enqueue_send(b).await.expect("enqueue") {
        SendOutcome::Accepted {
            woken_devices,
            destinations,
        } => (woken_devices, destinations),
        SendOutcome::Duplicate => panic!("unexpected duplicate"),
    }
}

/// Every message of a device (without acknowledging), as content `n`s.
async fn inbox_ns(store: &dyn Store, user: &str, device: &str) -> Vec<u64> {
    let page = store
        .fetch_inbox(user, device, 0, 100_000)
        .await
        .expect("fetch");
    page.messages
        .iter()
        .map(|m| n_of(&m.content_json))
        .collect()
}

async fn queued_ns(store: &dyn Store, destination: &str) -> Vec<u64> {
    store
        .peek_outbox(destination, 100_000, u64::MAX)
        .await
        .expect("peek")
        .iter()
        .map(|e| {
            let v: serde_json::Value = serde_json::from_str(&e.edu_json).expect("edu json");
            v["content"]["n"].as_u64().expect("edu has n")
        })
        .collect()
}

fn inbound(origin: &str, txn_id: &str, edus: Vec<InboundEdu>) -> InboundTxn {
    InboundTxn {
        origin: origin.to_owned(),
        txn_id: txn_id.to_owned(),
        response_json: json!({ "pdus": {}, "txn": txn_id }).to_string(),
        edus,
        now_ms: NOW,
    }
}

fn inbound_edu(message_id: &str, messages: Vec<NewInboxMessage>) -> InboundEdu {
    InboundEdu {
        message_id: message_id.to_owned(),
        messages,
    }
}

fn in_flight_for(destination: &str, txn_id: &str, seqs: Vec<i64>) -> InFlightTxn {
    InFlightTxn {
        destination: destination.to_owned(),
        txn_id: txn_id.to_owned(),
        body: json!({ "txn": txn_id, "seqs": &seqs }).to_string(),
        seqs,
    }
}
