//! The device-list domain (issue 16) over a real SQLite store and a
//! counting fake `RemoteKeys`: inbound EDU chains, what bad EDUs get, gap
//! resyncs (single flight, backoff, the storm bound, a restart resuming),
//! re-verification of resync answers, and key queries answered from the
//! cache for tracked users and live for the others.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use courier::config::E2eeConfig;
use courier::e2ee::device_lists::InboundDeviceListEdu;
use courier::e2ee::query::{Asker, KeyQuery};
use courier::e2ee::remote::RemoteUserDevices;
use courier::e2ee::{E2ee, ResyncHandle, ResyncScheduler};
use courier::identifiers::{ServerName, UserId};
use courier::notify::Notifier;
use courier::store::Store;
use courier::store::device_lists::{RemoteDeviceList, TrackSource, TrackTarget};
use courier::store::sqlite::SqliteStore;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::support::counting_remote::{CountingRemote, RecordingWaker};
use crate::support::e2ee::{key, public_key, sign};

const ALICE: &str = "@alice:remote.example";
const TRACKER: &str = "@bob:us.example";

struct Env {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    remote: Arc<CountingRemote>,
    e2ee: E2ee,
    notifier: Arc<Notifier>,
    config: E2eeConfig,
    shutdown: CancellationToken,
    woken: Arc<RecordingWaker>,
}

fn config() -> E2eeConfig {
    E2eeConfig {
        resync_retry: Duration::from_millis(50),
        resync_retry_max: Duration::from_millis(200),
        // A resynced list answers by itself for a minute even when its
        // server never pushes (the tests that need it live set 0).
        remote_cache_ttl: Duration::from_secs(60),
        ..E2eeConfig::DEFAULTS
    }
}

impl Env {
    /// A store, a fake remote and the domain core; the scheduler runs
    /// when `run_scheduler`.
    async fn new(config: E2eeConfig, run_scheduler: bool) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(&dir.path().join("relay.db"))
                .await
                .expect("sqlite store"),
        );
        let remote = Arc::new(CountingRemote::default());
        let notifier = Arc::new(Notifier::new());
        let woken = Arc::new(RecordingWaker::default());
        let e2ee = E2ee::new(
            ServerName::parse("us.example").expect("server name"),
            store.clone(),
            notifier.clone(),
            remote.clone(),
            config.clone(),
            woken.clone(),
        );
        let shutdown = CancellationToken::new();
        let scheduler = e2ee.take_resync_scheduler().expect("a scheduler");
        if run_scheduler {
            tokio::spawn(scheduler.run(shutdown.child_token()));
        }
        Env {
            _dir: dir,
            store,
            remote,
            e2ee,
            notifier,
            config,
            shutdown,
            woken,
        }
    }

    fn handle(&self) -> &ResyncHandle {
        self.e2ee.resync_handle()
    }

    async fn list(&self, user: &str) -> Option<RemoteDeviceList> {
        let lists = self
            .store
            .remote_device_lists(vec![user.to_owned()])
            .await
            .expect("remote lists");
        lists.into_iter().find(|l| l.user_id == user)
    }

    /// Waits (bounded) until the scheduler is idle.
    async fn settle(&self) {
        wait_for("the scheduler to be idle", || async {
            self.handle().is_idle()
        })
        .await;
    }

    /// `TRACKER` tracks `user` (over the RPC); waits for its first resync.
    async fn track(&self, user: &str) {
        self.e2ee
            .set_tracking(&uid(TRACKER), vec![uid(user)], Vec::new())
            .await
            .expect("track");
        self.settle().await;
        let list = self.list(user).await.expect("a cached list");
        assert!(!list.stale, "fresh after the first resync: {list:?}");
    }

    async fn receive(&self, edus: Vec<Value>) -> courier::e2ee::device_lists::DeviceListEduReport {
        let edus = edus
            .into_iter()
            .map(InboundDeviceListEdu::DeviceListUpdate)
            .collect();
        self.e2ee.receive_device_list_edus(&origin(), edus).await
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn uid(user: &str) -> UserId {
    UserId::parse(user).expect("user id")
}

fn origin() -> ServerName {
    ServerName::parse("remote.example").expect("server name")
}

async fn wait_for<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A remote device's self-signed keys (`signer_seed` other than `seed`
/// makes a signature that does not verify).
fn device_keys(user: &str, device: &str, seed: u8, signer_seed: u8) -> Value {
    let mut keys = json!({
        "user_id": user,
        "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
        "keys": {
            format!("curve25519:{device}"): public_key(&key(seed.wrapping_add(100))),
            format!("ed25519:{device}"): public_key(&key(seed)),
        },
    });
    sign(
        &mut keys,
        user,
        &format!("ed25519:{device}"),
        &key(signer_seed),
    );
    keys
}

fn snapshot(user: &str, stream_id: i64, devices: Vec<Value>) -> RemoteUserDevices {
    RemoteUserDevices {
        user_id: user.to_owned(),
        stream_id,
        devices,
        master_key: None,
        self_signing_key: None,
    }
}

fn update(stream_id: Value, prev: Value, device: &str, seed: u8) -> Value {
    json!({
        "user_id": ALICE, "device_id": device, "stream_id": stream_id, "prev_id": prev,
        "keys": device_keys(ALICE, device, seed, seed), "device_display_name": "Laptop",
        "org.matrix.opentracing_context": "{}",
    })
}

fn device_ids(list: &RemoteDeviceList) -> Vec<&str> {
    list.devices.iter().map(|d| d.device_id.as_str()).collect()
}

#[tokio::test]
async fn an_inbound_chain_applies_in_stream_order_and_the_tracker_sees_it() {
    let env = Env::new(config(), true).await;
    env.remote.answer(snapshot(
        ALICE,
        10,
        vec![json!({"device_id": "D1", "keys": device_keys(ALICE, "D1", 1, 1)})],
    ));
    env.store
        .upsert_device(TRACKER, "PHONE", Some("tok"))
        .await
        .expect("device");
    env.track(ALICE).await;
    let before = env.store.device_list_position().await.expect("position");
    let mut waiter = env.notifier.subscribe(courier::store::DeviceKey {
        user_id: TRACKER.to_owned(),
        device_id: "PHONE".to_owned(),
    });
    // Out of order in one transaction: sorted by stream_id before applying.
    let report = env
        .receive(vec![
            update(json!(12), json!([11]), "D3", 3),
            update(json!("11"), json!([10]), "D2", 2),
        ])
        .await;
    assert_eq!((report.applied, report.dropped, report.gaps), (2, 0, 0));
    tokio::time::timeout(Duration::from_secs(30), waiter.wait())
        .await
        .expect("the tracker's long-poll is woken");
    let list = env.list(ALICE).await.expect("list");
    assert_eq!(list.stream_id, Some(12));
    assert_eq!(device_ids(&list), vec!["D1", "D2", "D3"]);
    assert_eq!(list.devices[1].display_name.as_deref(), Some("Laptop"));
    let news = env
        .e2ee
        .device_list_news(TRACKER, Some(before))
        .await
        .expect("news");
    assert_eq!(news.changed, vec![ALICE.to_owned()]);
    let changes = env
        .e2ee
        .key_changes(TRACKER, before, i64::MAX)
        .await
        .expect("changes");
    assert_eq!(changes.changed, vec![ALICE.to_owned()]);
    assert_eq!(changes.position, news.position);
    assert_eq!(env.remote.calls(), 1, "no resync for a chain without gaps");
}

#[tokio::test]
async fn bad_edus_are_dropped_and_their_neighbour_applies() {
    let env = Env::new(config(), true).await;
    env.remote.answer(snapshot(ALICE, 10, Vec::new()));
    env.track(ALICE).await;
    let spoofed = json!({"user_id": "@mallory:evil.example", "device_id": "M", "stream_id": 11,
                         "prev_id": [10]});
    let malformed = json!({"user_id": ALICE, "device_id": "M", "stream_id": "eleven"});
    let not_a_list = json!({"user_id": ALICE, "device_id": "M", "stream_id": 11, "prev_id": 10});
    let mut bad_signature = update(json!(11), json!([10]), "M", 7);
    bad_signature["keys"] = device_keys(ALICE, "M", 7, 8);
    let backwards = update(json!(4), json!([3]), "OLD", 4);
    let good = update(json!(11), json!([10]), "D2", 2);
    let report = env
        .receive(vec![
            spoofed,
            malformed,
            not_a_list,
            bad_signature,
            backwards,
            good,
        ])
        .await;
    assert_eq!(report.dropped, 4, "{report:?}");
    assert_eq!(report.not_newer, 1, "{report:?}");
    assert_eq!(report.applied, 1, "{report:?}");
    assert_eq!(report.gaps, 0, "{report:?}");
    let list = env.list(ALICE).await.expect("list");
    assert_eq!(device_ids(&list), vec!["D2"]);
    assert_eq!(list.stream_id, Some(11));
    assert!(env.list("@mallory:evil.example").await.is_none());
    // An update about a user nobody tracks is ignored.
    let untracked = env
        .receive(vec![
            json!({"user_id": "@zed:remote.example", "device_id": "Z",
                             "stream_id": 1}),
        ])
        .await;
    assert_eq!(untracked.untracked, 1);
    assert!(env.list("@zed:remote.example").await.is_none());
}

#[tokio::test]
async fn a_gap_triggers_exactly_one_resync_even_with_more_gaps_in_flight() {
    let env = Env::new(config(), true).await;
    env.remote.answer(snapshot(ALICE, 10, Vec::new()));
    env.track(ALICE).await;
    assert_eq!(env.remote.calls(), 1);
    // Hold the next resync in flight.
    let gate = Arc::new(Semaphore::new(0));
    *env.remote.gate.lock().expect("gate") = Some(gate.clone());
    env.remote.answer(snapshot(
        ALICE,
        30,
        vec![json!({"device_id": "D9", "keys": device_keys(ALICE, "D9", 9, 9)})],
    ));
    let report = env
        .receive(vec![update(json!(20), json!([15]), "D9", 9)])
        .await;
    assert_eq!((report.applied, report.gaps), (0, 1));
    wait_for("the resync to start", || async { env.remote.calls() == 2 }).await;
    for stream in 21..25 {
        let report = env
            .receive(vec![update(json!(stream), json!([stream - 1]), "D9", 9)])
            .await;
        assert_eq!(report.applied, 0, "a stale list applies nothing");
    }
    gate.add_permits(100);
    env.settle().await;
    assert_eq!(env.remote.calls(), 2, "exactly one resync for the gap");
    let list = env.list(ALICE).await.expect("list");
    assert!(!list.stale);
    assert_eq!(list.stream_id, Some(30));
    assert_eq!(device_ids(&list), vec!["D9"]);
}

#[tokio::test]
async fn a_failed_resync_backs_the_server_off_and_is_retried() {
    let env = Env::new(config(), true).await;
    env.remote
        .fail_next
        .lock()
        .expect("fail")
        .insert("remote.example".to_owned(), 2);
    env.e2ee
        .set_tracking(&uid(TRACKER), vec![uid(ALICE)], Vec::new())
        .await
        .expect("track");
    wait_for("the list to be fresh", || async {
        env.list(ALICE).await.is_some_and(|l| !l.stale)
    })
    .await;
    env.settle().await;
    assert_eq!(env.remote.calls(), 3, "two failures, then the answer");
    assert_eq!(env.remote.max_per_server.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_storm_of_stale_users_stays_within_its_bounds_and_finishes() {
    let config = E2eeConfig {
        resync_concurrency: 6,
        resync_per_server: 4,
        ..config()
    };
    let env = Env::new(config, true).await;
    *env.remote.delay.lock().expect("delay") = Duration::from_millis(1);
    let mut targets: Vec<TrackTarget> = (0..10_000)
        .map(|i| TrackTarget {
            user_id: format!("@u{i}:storm.example"),
            remote: true,
        })
        .collect();
    for server in ["other.example", "third.example"] {
        targets.extend((0..100).map(|i| TrackTarget {
            user_id: format!("@u{i}:{server}"),
            remote: true,
        }));
    }
    let stale = env
        .store
        .track_users(TRACKER, targets, TrackSource::Homeserver, 1)
        .await
        .expect("track");
    assert_eq!(stale.len(), 10_200);
    env.handle().schedule(stale);
    env.settle().await;
    assert_eq!(env.remote.calls(), 10_200);
    assert!(env.remote.max_overall.load(Ordering::SeqCst) <= 6);
    assert!(env.remote.max_per_server.load(Ordering::SeqCst) <= 4);
    assert!(
        env.store
            .stale_remote_users(10)
            .await
            .expect("stale")
            .is_empty()
    );
}

#[tokio::test]
async fn a_new_scheduler_on_the_same_store_resumes_stale_users() {
    // No scheduler runs: the tracking leaves the lists stale.
    let env = Env::new(config(), false).await;
    let users: Vec<UserId> = (0..20)
        .map(|i| uid(&format!("@u{i}:remote.example")))
        .collect();
    env.e2ee
        .set_tracking(&uid(TRACKER), users, Vec::new())
        .await
        .expect("track");
    assert_eq!(
        env.store
            .stale_remote_users(100)
            .await
            .expect("stale")
            .len(),
        20
    );
    assert_eq!(env.remote.calls(), 0);
    let (handle, scheduler) = ResyncScheduler::new(
        env.store.clone(),
        env.remote.clone(),
        env.config.clone(),
        env.notifier.clone(),
    );
    tokio::spawn(scheduler.run(env.shutdown.child_token()));
    wait_for("the stale lists to be resynced", || async {
        env.store
            .stale_remote_users(100)
            .await
            .is_ok_and(|s| s.is_empty())
    })
    .await;
    wait_for("the new scheduler to be idle", || async {
        handle.is_idle()
    })
    .await;
    assert_eq!(env.remote.calls(), 20);
}

#[tokio::test]
async fn a_resynced_device_whose_keys_do_not_verify_is_left_out() {
    let env = Env::new(config(), true).await;
    env.remote.answer(snapshot(
        ALICE,
        5,
        vec![
            json!({"device_id": "GOOD", "keys": device_keys(ALICE, "GOOD", 1, 1),
                   "device_display_name": "Phone"}),
            json!({"device_id": "FORGED", "keys": device_keys(ALICE, "FORGED", 2, 3)}),
            json!({"device_id": "OTHER", "keys": device_keys("@eve:remote.example", "OTHER", 4, 4)}),
        ],
    ));
    env.track(ALICE).await;
    let list = env.list(ALICE).await.expect("list");
    assert_eq!(device_ids(&list), vec!["GOOD"]);
}

fn query(users: &[&str]) -> KeyQuery {
    KeyQuery {
        users: users
            .iter()
            .map(|u| (uid(u), Vec::new()))
            .collect::<BTreeMap<_, _>>(),
        timeout: Duration::from_secs(5),
    }
}

#[tokio::test]
async fn a_tracked_fresh_user_is_answered_from_the_cache_and_others_live() {
    let env = Env::new(config(), true).await;
    env.remote.answer(snapshot(
        ALICE,
        5,
        vec![
            json!({"device_id": "GOOD", "keys": device_keys(ALICE, "GOOD", 1, 1),
                    "device_display_name": "Phone"}),
        ],
    ));
    env.track(ALICE).await;
    let answer = env
        .e2ee
        .query_keys(Asker::User(TRACKER), query(&[ALICE]))
        .await
        .expect("query");
    assert_eq!(env.remote.query_calls.load(Ordering::SeqCst), 0);
    let device = &answer.device_keys[ALICE]["GOOD"];
    assert_eq!(device["unsigned"]["device_display_name"], "Phone");
    assert_eq!(device["keys"]["ed25519:GOOD"], public_key(&key(1)));

    // Another local user does not track Alice: asked live, then tracks her.
    let carol = "@carol:us.example";
    env.e2ee
        .query_keys(Asker::User(carol), query(&[ALICE]))
        .await
        .expect("query");
    assert_eq!(env.remote.query_calls.load(Ordering::SeqCst), 1);
    let tracked = env.store.tracked_users(carol).await.expect("tracked");
    assert_eq!(tracked, vec![ALICE.to_owned()]);
    // Now answered from the cache for her too.
    env.e2ee
        .query_keys(Asker::User(carol), query(&[ALICE]))
        .await
        .expect("query");
    assert_eq!(env.remote.query_calls.load(Ordering::SeqCst), 1);
}

/// A server that never pushes (Synapse without a shared room): once the
/// resync is older than `remote_cache_ttl` its user is asked live; a live
/// answer that differs from the cache resyncs it, and the tracker sees the
/// user as changed; once the server pushes an update, the cache answers.
#[tokio::test]
async fn an_unpushed_cache_is_asked_live_and_a_divergent_answer_resyncs_it() {
    let config = E2eeConfig {
        remote_cache_ttl: Duration::ZERO,
        ..config()
    };
    let env = Env::new(config, true).await;
    let good = json!({"device_id": "GOOD", "keys": device_keys(ALICE, "GOOD", 1, 1)});
    let new = json!({"device_id": "NEW", "keys": device_keys(ALICE, "NEW", 2, 2)});
    env.remote.answer(snapshot(ALICE, 5, vec![good.clone()]));
    env.track(ALICE).await;
    let after_track = env
        .e2ee
        .key_changes(TRACKER, 0, i64::MAX)
        .await
        .expect("changes");
    let position = after_track.position;

    // Alice's server added a device and told nobody.
    {
        let mut live = env.remote.query_answer.lock().expect("query answer");
        live.device_keys.insert(
            ALICE.to_owned(),
            [
                ("GOOD".to_owned(), good["keys"].clone()),
                ("NEW".to_owned(), new["keys"].clone()),
            ]
            .into_iter()
            .collect(),
        );
    }
    env.remote
        .answer(snapshot(ALICE, 6, vec![good.clone(), new.clone()]));
    let resyncs_before = env.remote.calls();
    let answer = env
        .e2ee
        .query_keys(Asker::User(TRACKER), query(&[ALICE]))
        .await
        .expect("query");
    assert_eq!(
        env.remote.query_calls.load(Ordering::SeqCst),
        1,
        "asked live"
    );
    assert!(answer.device_keys[ALICE].get("NEW").is_some());
    env.settle().await;
    assert_eq!(env.remote.calls(), resyncs_before + 1, "one resync");
    let list = env.list(ALICE).await.expect("cached");
    assert_eq!(device_ids(&list), vec!["GOOD", "NEW"]);
    let news = env
        .e2ee
        .key_changes(TRACKER, position, i64::MAX)
        .await
        .expect("changes");
    assert_eq!(news.changed, vec![ALICE.to_owned()]);

    // The same live answer again changes nothing more.
    env.e2ee
        .query_keys(Asker::User(TRACKER), query(&[ALICE]))
        .await
        .expect("query");
    env.settle().await;
    assert_eq!(env.remote.calls(), resyncs_before + 1, "no second resync");

    // Once the server pushes an update, the cache answers by itself.
    let report = env
        .receive(vec![update(json!(7), json!([6]), "NEW", 2)])
        .await;
    assert_eq!(report.applied, 1);
    let queries = env.remote.query_calls.load(Ordering::SeqCst);
    env.e2ee
        .query_keys(Asker::User(TRACKER), query(&[ALICE]))
        .await
        .expect("query");
    assert_eq!(env.remote.query_calls.load(Ordering::SeqCst), queries);
}

fn cross_signing_key(usage: &str, seed: u8, signer: Option<(u8, u8)>) -> Value {
    let public = public_key(&key(seed));
    let mut object = json!({
        "user_id": ALICE, "usage": [usage],
        "keys": {format!("ed25519:{public}"): public},
    });
    if let Some((master_seed, signing_seed)) = signer {
        let master = public_key(&key(master_seed));
        sign(
            &mut object,
            ALICE,
            &format!("ed25519:{master}"),
            &key(signing_seed),
        );
    }
    object
}

#[tokio::test]
async fn signing_key_updates_need_the_master_keys_signature() {
    let env = Env::new(config(), true).await;
    env.remote.answer(snapshot(ALICE, 5, Vec::new()));
    env.track(ALICE).await;
    let master = cross_signing_key("master", 40, None);
    let self_signing = cross_signing_key("self_signing", 41, Some((40, 40)));
    let report = env
        .e2ee
        .receive_device_list_edus(
            &origin(),
            vec![InboundDeviceListEdu::SigningKeyUpdate(
                json!({"user_id": ALICE, "master_key": master, "self_signing_key": self_signing}),
            )],
        )
        .await;
    assert_eq!((report.applied, report.dropped), (1, 0), "{report:?}");
    let list = env.list(ALICE).await.expect("list");
    let stored_ssk = list
        .self_signing_key_json
        .clone()
        .expect("self-signing key");
    assert!(list.master_key_json.is_some());
    // A self-signing key the cached master key did not sign, and one of a
    // user of another server: both dropped, the cache unchanged.
    let forged = cross_signing_key("self_signing", 42, Some((40, 43)));
    let report = env
        .e2ee
        .receive_device_list_edus(
            &origin(),
            vec![
                InboundDeviceListEdu::SigningKeyUpdate(
                    json!({"user_id": ALICE, "self_signing_key": forged}),
                ),
                InboundDeviceListEdu::SigningKeyUpdate(
                    json!({"user_id": "@alice:evil.example", "master_key": {}}),
                ),
            ],
        )
        .await;
    assert_eq!((report.applied, report.dropped), (0, 2), "{report:?}");
    let list = env.list(ALICE).await.expect("list");
    assert_eq!(list.self_signing_key_json, Some(stored_ssk));
    // Signed by the cached master key: accepted without a master key.
    let next = cross_signing_key("self_signing", 44, Some((40, 40)));
    let report = env
        .e2ee
        .receive_device_list_edus(
            &origin(),
            vec![InboundDeviceListEdu::SigningKeyUpdate(
                json!({"user_id": ALICE, "self_signing_key": next}),
            )],
        )
        .await;
    assert_eq!(report.applied, 1, "{report:?}");
}

#[tokio::test]
async fn a_resync_answer_about_another_user_is_discarded_and_retried() {
    let env = Env::new(config(), true).await;
    // Scripted for Alice, but about Eve.
    let answer = snapshot("@eve:remote.example", 9, vec![json!({"device_id": "E"})]);
    env.remote
        .answers
        .lock()
        .expect("answers")
        .insert(ALICE.to_owned(), answer);
    env.e2ee
        .set_tracking(&uid(TRACKER), vec![uid(ALICE)], Vec::new())
        .await
        .expect("track");
    wait_for("a retry after backoff", || async {
        env.remote.calls() >= 2
    })
    .await;
    let list = env.list(ALICE).await.expect("list");
    assert!(list.stale);
    assert!(list.devices.is_empty());
    assert!(env.list("@eve:remote.example").await.is_none());
}

#[tokio::test]
async fn interest_and_local_changes_wake_the_interested_servers() {
    let env = Env::new(config(), true).await;
    let dana = "@dana:us.example";
    env.store
        .upsert_device(dana, "DD", Some("tok-dana"))
        .await
        .expect("device");
    // A federation query records interest for local users only.
    env.e2ee
        .record_remote_interest(
            &ServerName::parse("asker.example").expect("name"),
            &[dana.to_owned(), ALICE.to_owned()],
        )
        .await;
    let interests = env
        .e2ee
        .set_device_list_servers(
            &uid(dana),
            vec![ServerName::parse("named.example").expect("name")],
            Vec::new(),
        )
        .await
        .expect("servers");
    let named: Vec<(&str, bool)> = interests
        .iter()
        .map(|i| (i.destination.as_str(), i.expires_ts.is_none()))
        .collect();
    assert_eq!(
        named,
        vec![("asker.example", false), ("named.example", true)]
    );
    assert!(
        env.store
            .device_list_interest(ALICE)
            .await
            .expect("interest")
            .is_empty()
    );
    env.e2ee
        .rename_device(
            dana,
            "DD",
            Some("Desk"),
            courier::e2ee::devices::Via::Client,
        )
        .await
        .expect("rename");
    let woken = env.woken.0.lock().expect("woken").clone();
    assert_eq!(
        woken,
        vec!["asker.example".to_owned(), "named.example".to_owned()]
    );
    // Withdrawn: no longer woken.
    env.e2ee
        .set_device_list_servers(
            &uid(dana),
            Vec::new(),
            vec![ServerName::parse("named.example").expect("name")],
        )
        .await
        .expect("servers");
    env.woken.0.lock().expect("woken").clear();
    env.e2ee
        .rename_device(
            dana,
            "DD",
            Some("Desk 2"),
            courier::e2ee::devices::Via::Client,
        )
        .await
        .expect("rename");
    let woken = env.woken.0.lock().expect("woken").clone();
    assert_eq!(woken, vec!["asker.example".to_owned()]);
}

#[tokio::test]
async fn untracking_lists_the_user_as_left() {
    let env = Env::new(config(), true).await;
    env.remote.answer(snapshot(ALICE, 3, Vec::new()));
    env.track(ALICE).await;
    let before = env.store.device_list_position().await.expect("position");
    let tracked = env
        .e2ee
        .set_tracking(&uid(TRACKER), Vec::new(), vec![uid(ALICE)])
        .await
        .expect("untrack");
    assert!(tracked.is_empty());
    let news = env
        .e2ee
        .device_list_news(TRACKER, Some(before))
        .await
        .expect("news");
    assert_eq!(news.left, vec![ALICE.to_owned()]);
    assert!(news.changed.is_empty());
    // Nobody tracks Alice now: her updates are ignored.
    let report = env
        .receive(vec![update(json!(4), json!([3]), "D4", 4)])
        .await;
    assert_eq!(report.untracked, 1);
}
