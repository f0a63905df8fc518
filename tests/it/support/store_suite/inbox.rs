//! Inbox reads and fan-out at write time: order and `next_batch`, page
//! limits, a repeated `since` redelivering, `*` expanded when written,
//! unknown devices dropped, and order kept in large mixed sends.

use std::collections::BTreeMap;

use courier::store::DeviceTarget;

use super::{Harness, ALICE, BOB, SENDER, msg, one, batch, key, n_of, devices, accepted, inbox_ns};

pub async fn inbox_order_and_next_batch(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    devices(s, ALICE, &["A"]).await;
    let empty = s.fetch_inbox(ALICE, "A", 0, 100).await.expect("fetch");
    assert!(empty.messages.is_empty());
    assert_eq!(empty.next_batch, 0);
    assert!(!empty.more);
    for i in 0..3u64 {
        let local = (0..4).map(|j| msg(ALICE, one("A"), i * 4 + j)).collect();
        let (woken, dests) = accepted(s, batch(&format!("t{i}"), local, vec![])).await;
        assert_eq!(woken, vec![key(ALICE, "A")]);
        assert!(dests.is_empty());
    }
    let page = s.fetch_inbox(ALICE, "A", 0, 100).await.expect("fetch");
    let ns: Vec<u64> = page
        .messages
        .iter()
        .map(|m| n_of(&m.content_json))
        .collect();
    assert_eq!(ns, (0..12).collect::<Vec<_>>());
    assert!(
        page.messages
            .windows(2)
            .all(|w| w[0].stream_id < w[1].stream_id)
    );
    assert_eq!(page.next_batch, page.messages[11].stream_id);
    assert!(!page.more);
    assert!(
        page.messages
            .iter()
            .all(|m| m.sender == SENDER && m.event_type == "m.test")
    );
    // Each row keeps the message_id it was written with.
    assert!(
        page.messages
            .iter()
            .all(|m| m.message_id == format!("msg{}", n_of(&m.content_json)))
    );
    // Acknowledge everything: the next fetch is empty and keeps `since`.
    let after = s
        .fetch_inbox(ALICE, "A", page.next_batch, 100)
        .await
        .expect("fetch");
    assert!(after.messages.is_empty());
    assert_eq!(after.next_batch, page.next_batch);
    assert!(!after.more);
    // New messages get higher stream ids than any acknowledged one.
    accepted(s, batch("t9", vec![msg(ALICE, one("A"), 99)], vec![])).await;
    let next = s
        .fetch_inbox(ALICE, "A", page.next_batch, 100)
        .await
        .expect("fetch");
    assert_eq!(next.messages.len(), 1);
    assert!(next.messages[0].stream_id > page.next_batch);
    // Other devices' inboxes are separate.
    assert!(
        s.fetch_inbox(ALICE, "other", 0, 100)
            .await
            .expect("fetch")
            .messages
            .is_empty()
    );
}

pub async fn inbox_limit_pages_150_as_100_then_50(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    devices(s, ALICE, &["A"]).await;
    let local = (0..150).map(|n| msg(ALICE, one("A"), n)).collect();
    accepted(s, batch("t", local, vec![])).await;
    let first = s.fetch_inbox(ALICE, "A", 0, 100).await.expect("fetch");
    assert_eq!(first.messages.len(), 100);
    assert!(first.more);
    let ns: Vec<u64> = first
        .messages
        .iter()
        .map(|m| n_of(&m.content_json))
        .collect();
    assert_eq!(ns, (0..100).collect::<Vec<_>>());
    let second = s
        .fetch_inbox(ALICE, "A", first.next_batch, 100)
        .await
        .expect("fetch");
    assert_eq!(second.messages.len(), 50);
    assert!(!second.more);
    let ns: Vec<u64> = second
        .messages
        .iter()
        .map(|m| n_of(&m.content_json))
        .collect();
    assert_eq!(ns, (100..150).collect::<Vec<_>>());
    let third = s
        .fetch_inbox(ALICE, "A", second.next_batch, 100)
        .await
        .expect("fetch");
    assert!(third.messages.is_empty());
    assert!(!third.more);
    assert_eq!(third.next_batch, second.next_batch);
    // Exactly 100 pending: a full page with nothing more.
    let local = (0..100).map(|n| msg(ALICE, one("A"), n)).collect();
    accepted(s, batch("t2", local, vec![])).await;
    let full = s
        .fetch_inbox(ALICE, "A", third.next_batch, 100)
        .await
        .expect("fetch");
    assert_eq!(full.messages.len(), 100);
    assert!(!full.more);
}

pub async fn repeated_since_redelivers_same_rows(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    devices(s, ALICE, &["A"]).await;
    let local = (0..10).map(|n| msg(ALICE, one("A"), n)).collect();
    accepted(s, batch("t", local, vec![])).await;
    let a = s.fetch_inbox(ALICE, "A", 0, 4).await.expect("fetch");
    let b = s.fetch_inbox(ALICE, "A", 0, 4).await.expect("fetch again");
    assert_eq!(a, b);
    assert!(a.more);
    let c = s
        .fetch_inbox(ALICE, "A", a.next_batch, 4)
        .await
        .expect("fetch next");
    let d = s
        .fetch_inbox(ALICE, "A", a.next_batch, 4)
        .await
        .expect("fetch next again");
    assert_eq!(c, d);
    assert_eq!(c.messages[0].stream_id, a.messages[3].stream_id + 1);
    // The acknowledged rows are gone: an old `since` no longer sees them.
    let old = s.fetch_inbox(ALICE, "A", 0, 100).await.expect("fetch old");
    assert_eq!(old.messages.len(), 6);
    assert_eq!(old.messages[0], c.messages[0]);
}

pub async fn star_expands_at_write_time(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    devices(s, ALICE, &["A", "B"]).await;
    devices(s, BOB, &["X"]).await;
    let (mut woken, _) = accepted(
        s,
        batch(
            "t",
            vec![
                msg(ALICE, DeviceTarget::All, 1),
                msg(ALICE, DeviceTarget::All, 2),
                msg(BOB, DeviceTarget::All, 3),
            ],
            vec![],
        ),
    )
    .await;
    woken.sort();
    assert_eq!(woken, vec![key(ALICE, "A"), key(ALICE, "B"), key(BOB, "X")]);
    devices(s, ALICE, &["C"]).await;
    assert_eq!(inbox_ns(s, ALICE, "A").await, vec![1, 2]);
    assert_eq!(inbox_ns(s, ALICE, "B").await, vec![1, 2]);
    assert_eq!(inbox_ns(s, BOB, "X").await, vec![3]);
    assert_eq!(inbox_ns(s, ALICE, "C").await, Vec::<u64>::new());
    // A user with no devices: `*` writes nothing and wakes nobody.
    let (woken, _) = accepted(
        s,
        batch(
            "t2",
            vec![msg("@nobody:local.test", DeviceTarget::All, 4)],
            vec![],
        ),
    )
    .await;
    assert!(woken.is_empty());
}

pub async fn unknown_devices_are_dropped(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    devices(s, ALICE, &["A"]).await;
    let (woken, _) = accepted(
        s,
        batch(
            "t",
            vec![
                msg(ALICE, one("GHOST"), 1),
                msg(ALICE, one("A"), 2),
                msg(BOB, one("A"), 3),
            ],
            vec![],
        ),
    )
    .await;
    assert_eq!(woken, vec![key(ALICE, "A")]);
    assert_eq!(inbox_ns(s, ALICE, "A").await, vec![2]);
    assert_eq!(inbox_ns(s, ALICE, "GHOST").await, Vec::<u64>::new());
    assert_eq!(inbox_ns(s, BOB, "A").await, Vec::<u64>::new());
    // Registering the device later does not deliver the dropped message.
    devices(s, ALICE, &["GHOST"]).await;
    assert_eq!(inbox_ns(s, ALICE, "GHOST").await, Vec::<u64>::new());
}

pub async fn mixed_targets_keep_order_in_large_sends(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    let ids = ["A", "B", "C"];
    devices(s, ALICE, &ids).await;
    devices(s, BOB, &["X"]).await;
    // 211 messages mixing `*`, known, unknown devices and two users, so
    // that any internal batching of rows is crossed at odd places.
    let mut local = Vec::new();
    let mut expected: BTreeMap<(&str, &str), Vec<u64>> = BTreeMap::new();
    for n in 0..211u64 {
        let (user, target) = match n % 7 {
            0 | 3 => (ALICE, DeviceTarget::All),
            1 => (ALICE, one(ids[(n % 3) as usize])),
            2 => (ALICE, one("GHOST")),
            4 => (BOB, DeviceTarget::All),
            5 => (BOB, one("X")),
            _ => (ALICE, one("C")),
        };
        let targets: Vec<&str> = match (&target, user) {
            (DeviceTarget::All, u) if u == ALICE => ids.to_vec(),
            (DeviceTarget::All, _) => vec!["X"],
            (DeviceTarget::One(d), u) if u == ALICE && ids.contains(&d.as_str()) => {
                vec![ids[ids.iter().position(|i| i == d).expect("known")]]
            }
            (DeviceTarget::One(d), _) if d == "X" => vec!["X"],
            _ => vec![],
        };
        for t in targets {
            expected.entry((user, t)).or_default().push(n);
        }
        local.push(msg(user, target, n));
    }
    let (woken, _) = accepted(s, batch("big", local, vec![])).await;
    assert_eq!(woken.len(), 4);
    for ((user, device), ns) in expected {
        assert_eq!(inbox_ns(s, user, device).await, ns, "{user} {device}");
    }
}
