//! The kill -9 crash test of local device changes and their outbound
//! `m.device_list_update` EDUs, shared by every store backend (DESIGN §1,
//! §7): a change and its outbox rows commit together, and coalescing keeps
//! one queued row per (destination, device) besides the in-flight
//! transaction, holding the newest state.
//!
//! A child renames each of three devices of one user from its own task,
//! with a counter in the name (`R0 #17`), and uploads new device keys for
//! a fourth (the counter in a field of the signed object), printing
//! `ack <device> <n>` (flushed) only after `set_display_name` /
//! `upload_keys` resolved; the parent kills it
//! at random moments (`crash::kill_round`). Two destinations are
//! interested in the user for good. Between rounds the parent reopens the
//! store and checks every destination's queue against the stored devices
//! (`Ledger::check_round`), then plays the sender for the first
//! destination: it peeks, records a transaction of a prefix of the queue
//! and acknowledges it at once, or leaves it in flight over the next kill
//! and acknowledges it after. The second destination is never sent to, so
//! its queue only coalesces.
//!
//! One task per device changes it, so each device's counters are written
//! in order and at most one change of it (the counter after its last
//! acknowledged one) was under way at the kill: the stored counter is the
//! last acknowledged one or the next. Every change is one counter step and
//! logs one change, so the user's `stream_id` is the sum of the stored
//! counters.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::e2ee;

use courier::store::device_lists::{DEVICE_LIST_UPDATE, NewInterest};
use courier::store::keys::{DeviceQuery, KeysUpload, UploadOutcome, UploadedDeviceKeys};
use courier::store::{InFlightTxn, OutboxEdu, Store};

pub const USER: &str = "@renames:local.test";
/// The first three are renamed; the last gets new device keys instead
/// (the same identity keys, with the counter in a field of the signed
/// object), each upload one logged change like a rename.
pub const DEVICES: [&str; 4] = ["R0", "R1", "R2", KEYED];
const KEYED: &str = "K0";
/// The first is sent to by the parent between rounds, the second never.
pub const DESTINATIONS: [&str; 2] = ["sent.remote.test", "away.remote.test"];

fn name(device: &str, n: u64) -> String {
    format!("{device} #{n}")
}

/// The signed device keys of `KEYED` carrying counter `n`.
fn device_keys(n: u64) -> UploadedDeviceKeys {
    let signing = e2ee::key(41);
    let key_id = format!("ed25519:{KEYED}");
    let keys = serde_json::json!({
        format!("curve25519:{KEYED}"): "Y3Jhc2gtdGVzdC1jdXJ2ZS1rZXktb2YtSzAtMDAwMDA",
        key_id.clone(): e2ee::public_key(&signing),
    });
    let mut object = serde_json::json!({
        "user_id": USER,
        "device_id": KEYED,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": keys,
        "crash_counter": n,
    });
    e2ee::sign(&mut object, USER, &key_id, &signing);
    UploadedDeviceKeys {
        json: object.to_string(),
        identity: keys.to_string(),
    }
}

/// The counter in a device keys object of `KEYED` (0: no keys yet).
fn keys_counter(keys: Option<&serde_json::Value>) -> u64 {
    let Some(keys) = keys else { return 0 };
    keys["crash_counter"]
        .as_u64()
        .unwrap_or_else(|| panic!("{KEYED} has keys this test never uploaded: {keys}"))
}

/// The counter in a name this test wrote (0: no name yet).
fn counter(device: &str, name: Option<&str>) -> u64 {
    let Some(name) = name else { return 0 };
    let n = name
        .strip_prefix(device)
        .and_then(|rest| rest.strip_prefix(" #"))
        .unwrap_or_else(|| panic!("device {device} has a name this test never wrote: {name:?}"));
    n.parse()
        .unwrap_or_else(|_| panic!("device {device}: bad counter in {name:?}"))
}

/// The stored counter of every device and the user's `stream_id`.
async fn stored(store: &dyn Store) -> (BTreeMap<&'static str, u64>, i64) {
    let mut answer = store
        .user_devices(vec![DeviceQuery {
            user_id: USER.to_owned(),
            device_ids: vec![],
        }])
        .await
        .expect("user_devices");
    assert_eq!(answer.len(), 1, "one answer for the one user asked");
    let user = answer.remove(0);
    let mut counters = BTreeMap::new();
    for device in DEVICES {
        let record = user
            .devices
            .iter()
            .find(|d| d.device_id == device)
            .unwrap_or_else(|| panic!("device {device} missing from user_devices"));
        let n = if device == KEYED {
            let keys = record
                .keys_json
                .as_deref()
                .map(|json| serde_json::from_str(json).expect("stored keys JSON"));
            keys_counter(keys.as_ref())
        } else {
            counter(device, record.display_name.as_deref())
        };
        counters.insert(device, n);
    }
    (counters, user.stream_id)
}

/// One peeked row of this test, read back from its EDU JSON.
#[derive(Debug, Clone)]
struct Row {
    seq: i64,
    device: &'static str,
    counter: u64,
    stream: i64,
    prev_id: Option<i64>,
}

fn parse_row(destination: &str, edu: &OutboxEdu) -> Row {
    let v: serde_json::Value = serde_json::from_str(&edu.edu_json).expect("stored EDU JSON");
    assert_eq!(
        v["edu_type"], DEVICE_LIST_UPDATE,
        "{destination}: {}",
        edu.edu_json
    );
    let content = &v["content"];
    assert_eq!(content["user_id"], USER, "{}", edu.edu_json);
    assert!(
        content.get("prev_id").is_none(),
        "the stored EDU has no prev_id: {}",
        edu.edu_json
    );
    assert!(content.get("deleted").is_none(), "{}", edu.edu_json);
    let device_id = content["device_id"].as_str().expect("device_id");
    let device = DEVICES
        .into_iter()
        .find(|d| *d == device_id)
        .unwrap_or_else(|| panic!("{destination}: update for unknown device {device_id}"));
    let stream = content["stream_id"].as_i64().expect("integer stream_id");
    let meta = edu
        .device_list
        .as_ref()
        .unwrap_or_else(|| panic!("{destination}: device-list row without its meta"));
    assert_eq!(meta.user_id, USER);
    assert_eq!(
        meta.stream_id,
        Some(stream),
        "{destination}: meta stream_id differs from the EDU's"
    );
    Row {
        seq: edu.seq,
        device,
        counter: if device == KEYED {
            keys_counter(content.get("keys"))
        } else {
            counter(device, content["device_display_name"].as_str())
        },
        stream,
        prev_id: meta.prev_id,
    }
}

/// What the parent's sender got acknowledged by one destination.
#[derive(Default)]
struct Sent {
    /// The highest `stream_id` acknowledged (what the next `prev_id`
    /// chain starts from), `None` before the first acknowledgement.
    acked_stream: Option<i64>,
    /// Per device, the newest acknowledged (counter, stream).
    devices: BTreeMap<&'static str, (u64, i64)>,
    /// The transaction left in flight over the next kill.
    in_flight: Option<(InFlightTxn, Vec<Row>)>,
    acked_rows: usize,
}

/// The parent's record of the run.
#[derive(Default)]
pub struct Ledger {
    /// Per device, the counter stored after the last check (the child
    /// continues from it).
    current: BTreeMap<&'static str, u64>,
    /// The last acknowledged counter, per device.
    acks: BTreeMap<&'static str, u64>,
    acked_changes: usize,
    sent: BTreeMap<&'static str, Sent>,
    /// Rows seen queued besides an in-flight row of the same device.
    beside_in_flight: usize,
    txns: usize,
}

impl Ledger {
    /// Registers the devices and the destinations' lasting interest (the
    /// parent, before the first round).
    pub async fn setup(&mut self, store: &dyn Store) {
        for device in DEVICES {
            store
                .upsert_device(USER, device, None)
                .await
                .expect("device");
            self.current.insert(device, 0);
        }
        let interests = DESTINATIONS
            .iter()
            .map(|d| NewInterest {
                user_id: USER.to_owned(),
                destination: (*d).to_owned(),
                expires_ts: None,
            })
            .collect();
        store
            .add_device_list_interest(interests, courier::clock::now_ms())
            .await
            .expect("interest");
        for d in DESTINATIONS {
            self.sent.insert(d, Sent::default());
        }
    }

    /// Checks the store after one kill (`round_acks`: the child's `ack`
    /// lines), then plays the sender for the first destination.
    pub async fn check_round(&mut self, store: &dyn Store, round: usize, round_acks: &[String]) {
        let mut round_max: BTreeMap<&'static str, u64> = BTreeMap::new();
        for line in round_acks {
            let (device_id, n) = line.split_once(' ').expect("ack <device> <n>");
            let device = DEVICES
                .into_iter()
                .find(|d| *d == device_id)
                .expect("acked device");
            let n: u64 = n.parse().expect("acked counter");
            let last = round_max
                .get(device)
                .copied()
                .unwrap_or(self.current[device]);
            assert_eq!(n, last + 1, "{device}: acks go up one step at a time");
            round_max.insert(device, n);
            self.acked_changes += 1;
        }
        let (counters, user_stream) = stored(store).await;
        for device in DEVICES {
            let last = round_max
                .get(device)
                .copied()
                .unwrap_or(self.current[device]);
            let now = counters[device];
            assert!(
                now >= last,
                "{device}: acknowledged name #{last} lost (stored #{now})"
            );
            assert!(
                now <= last + 1,
                "{device}: stored #{now} was never written (last acknowledged #{last})"
            );
            self.acks.insert(device, last);
        }
        let changes: u64 = counters.values().sum();
        assert_eq!(
            user_stream,
            i64::try_from(changes).expect("small"),
            "one logged change per committed change"
        );
        let mut newest_by_destination = Vec::new();
        for destination in DESTINATIONS {
            newest_by_destination.push(
                self.check_queue(store, destination, &counters, user_stream)
                    .await,
            );
        }
        assert_eq!(
            newest_by_destination[0], newest_by_destination[1],
            "both destinations hold the same newest state"
        );
        self.current = counters;
        self.play_sender(store, round).await;
    }

    /// Checks one destination's queue; returns each device's newest
    /// (counter, stream), queued or acknowledged.
    async fn check_queue(
        &mut self,
        store: &dyn Store,
        destination: &'static str,
        counters: &BTreeMap<&'static str, u64>,
        user_stream: i64,
    ) -> BTreeMap<&'static str, (u64, i64)> {
        let rows = peek(store, destination).await;
        let sent = self.sent.get_mut(destination).expect("destination");
        let in_flight_store = store.in_flight(destination).await.expect("in_flight");
        assert_eq!(
            in_flight_store,
            sent.in_flight.as_ref().map(|(txn, _)| txn.clone()),
            "{destination}: the recorded transaction survives the kill unchanged"
        );
        let in_flight_seqs: Vec<i64> = in_flight_store.map(|t| t.seqs).unwrap_or_default();
        // The in-flight rows are still queued, first, unchanged.
        if let Some((_, flying)) = &sent.in_flight {
            assert!(rows.len() >= flying.len());
            for (row, was) in rows.iter().zip(flying) {
                assert_eq!(
                    (row.seq, row.device, row.counter, row.stream),
                    (was.seq, was.device, was.counter, was.stream),
                    "{destination}: an in-flight row changed"
                );
            }
        }
        // The prev_id chain: the last acknowledged stream, then each row's
        // predecessor in the peek; streams go up along the queue.
        let mut prev = sent.acked_stream;
        for row in &rows {
            assert_eq!(
                row.prev_id, prev,
                "{destination}: prev_id of the row of stream {}",
                row.stream
            );
            assert!(
                prev.is_none_or(|p| p < row.stream),
                "{destination}: streams go up"
            );
            assert!(
                row.stream <= user_stream,
                "{destination}: stream from the future"
            );
            prev = Some(row.stream);
        }
        let mut newest = BTreeMap::new();
        for device in DEVICES {
            let mine: Vec<&Row> = rows.iter().filter(|r| r.device == device).collect();
            let queued = mine
                .iter()
                .filter(|r| !in_flight_seqs.contains(&r.seq))
                .count();
            assert!(
                queued <= 1,
                "{destination}: {queued} rows for {device} outside the in-flight txn"
            );
            if queued == 1 && mine.len() > 1 {
                self.beside_in_flight += 1;
            }
            for pair in mine.windows(2) {
                assert!(pair[0].counter < pair[1].counter);
            }
            let state = match mine.last() {
                Some(row) => (row.counter, row.stream),
                None => match sent.devices.get(device) {
                    Some(acked) => *acked,
                    None => (0, 0),
                },
            };
            assert_eq!(
                state.0, counters[device],
                "{destination}: the newest update of {device} is not its stored name"
            );
            assert_eq!(
                state.1 == 0,
                state.0 == 0,
                "{destination}: {device} changed without a queued update"
            );
            newest.insert(device, state);
        }
        let streams: Vec<i64> = newest.values().map(|s| s.1).collect();
        assert_eq!(
            streams.iter().copied().max().unwrap_or(0),
            user_stream,
            "{destination}: the user's last change has its update"
        );
        for (i, s) in streams.iter().enumerate() {
            assert!(
                *s == 0 || !streams[i + 1..].contains(s),
                "{destination}: two devices share stream {s}"
            );
        }
        newest
    }

    /// The sender for the first destination: acknowledges the transaction
    /// left in flight, or records a new one of a prefix of the queue and
    /// acknowledges it now, or leaves it in flight over the next kill.
    async fn play_sender(&mut self, store: &dyn Store, round: usize) {
        let destination = DESTINATIONS[0];
        let sent = self.sent.get_mut(destination).expect("destination");
        if let Some((txn, rows)) = sent.in_flight.take() {
            ack(store, sent, &txn, &rows).await;
            self.txns += 1;
            return;
        }
        let rows = peek(store, destination).await;
        let choice = rand::random_range(0..3);
        if rows.is_empty() || choice == 0 {
            return;
        }
        let take = rand::random_range(1..=rows.len());
        let rows: Vec<Row> = rows.into_iter().take(take).collect();
        let txn = InFlightTxn {
            destination: destination.to_owned(),
            txn_id: format!("crash-{round}"),
            seqs: rows.iter().map(|r| r.seq).collect(),
            body: format!("{{\"round\":{round}}}"),
        };
        store
            .begin_txn(
                &crate::support::lease_fence(store, &txn.destination).await,
                txn.clone(),
            )
            .await
            .expect("begin_txn");
        if choice == 1 {
            ack(store, sent, &txn, &rows).await;
            self.txns += 1;
        } else {
            sent.in_flight = Some((txn, rows));
        }
    }

    /// Ends the run: the child acknowledged changes, the sender sent
    /// transactions, and rows were queued beside in-flight ones.
    pub fn summary(&self) -> String {
        assert!(self.acked_changes > 0, "the children acknowledged changes");
        let sent = &self.sent[DESTINATIONS[0]];
        format!(
            "{} changes acknowledged (last {:?}), {} txns acknowledged carrying {} rows, \
             {} times a row queued beside an in-flight one",
            self.acked_changes, self.acks, self.txns, sent.acked_rows, self.beside_in_flight
        )
    }
}

async fn peek(store: &dyn Store, destination: &str) -> Vec<Row> {
    store
        .peek_outbox(destination, 100, u64::MAX)
        .await
        .expect("peek")
        .iter()
        .map(|edu| parse_row(destination, edu))
        .collect()
}

async fn ack(store: &dyn Store, sent: &mut Sent, txn: &InFlightTxn, rows: &[Row]) {
    store
        .ack_txn(
            &crate::support::lease_fence(store, &txn.destination).await,
            &txn.destination,
            &txn.txn_id,
            courier::clock::now_ms(),
        )
        .await
        .expect("ack_txn");
    for row in rows {
        sent.acked_stream = Some(sent.acked_stream.map_or(row.stream, |s| s.max(row.stream)));
        let newest = sent.devices.entry(row.device).or_insert((0, 0));
        if row.stream > newest.1 {
            *newest = (row.counter, row.stream);
        }
        sent.acked_rows += 1;
    }
    let after = peek(store, &txn.destination).await;
    assert!(
        after.iter().all(|r| !txn.seqs.contains(&r.seq)),
        "acknowledged rows are gone"
    );
    if let Some(first) = after.first() {
        assert_eq!(
            first.prev_id, sent.acked_stream,
            "after an ack the chain starts from the acknowledged stream"
        );
    }
}

/// One change of `device` to counter `n`: a rename, or for `KEYED` an
/// upload of its device keys. `Ok(false)`: the device is not registered.
async fn change(
    store: &dyn Store,
    device: &str,
    n: u64,
) -> Result<bool, courier::store::StoreError> {
    let now_ms = courier::clock::now_ms();
    if device != KEYED {
        return store
            .set_display_name(USER, device, Some(&name(device, n)), now_ms)
            .await;
    }
    let outcome = store
        .upload_keys(KeysUpload {
            user_id: USER.to_owned(),
            device_id: KEYED.to_owned(),
            device_keys: Some(device_keys(n)),
            one_time_keys: vec![],
            fallback_keys: vec![],
            now_ms,
        })
        .await?;
    match outcome {
        UploadOutcome::Stored {
            device_list_changed,
            ..
        } => {
            assert!(device_list_changed, "new device keys are a change");
            Ok(true)
        }
        UploadOutcome::UnknownDevice => Ok(false),
        other => panic!("device keys upload refused: {other:?}"),
    }
}

/// The child's work: one task per device changes it to the next counter
/// for `run_for` (`change`), printing `ack <device> <n>` after each change
/// resolved. It continues from the stored counters. With
/// `tolerate_failures` a failed change ends that task quietly.
pub async fn change_until_killed(
    store: Arc<dyn Store>,
    run_for: Duration,
    tolerate_failures: bool,
) {
    let (counters, _) = stored(store.as_ref()).await;
    // libtest printed `test <name> ... ` without a newline: end that line,
    // or the first ack would be glued to it and not count.
    {
        let mut out = std::io::stdout().lock();
        if writeln!(out).and_then(|()| out.flush()).is_err() {
            std::process::exit(0);
        }
    }
    let deadline = Instant::now() + run_for;
    let mut tasks = Vec::new();
    for device in DEVICES {
        let store = store.clone();
        let mut n = counters[device];
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                n += 1;
                match change(store.as_ref(), device, n).await {
                    Ok(true) => {
                        let mut out = std::io::stdout().lock();
                        if writeln!(out, "ack {device} {n}")
                            .and_then(|()| out.flush())
                            .is_err()
                        {
                            // The parent is gone.
                            std::process::exit(0);
                        }
                    }
                    Ok(false) => panic!("device {device} is not registered"),
                    Err(_) if tolerate_failures => return,
                    Err(e) => panic!("child change failed: {e}"),
                }
            }
        }));
    }
    for t in tasks {
        let joined = t.await;
        assert!(tolerate_failures || joined.is_ok(), "child task failed");
    }
    // Wait for the kill, as a process that would retry later would.
    tokio::time::sleep_until((deadline + Duration::from_secs(30)).into()).await;
}
