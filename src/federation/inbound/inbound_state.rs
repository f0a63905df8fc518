//! The in-memory state of inbound federation, one per relay inside
//! `AppState`: the per-origin rate-limit buckets, one async lock per
//! (origin, txnId) being processed (a concurrent duplicate waits for the
//! first copy), and the count of `/send` requests in progress per origin.
//! It knows nothing of HTTP or the store; it imports nothing from the rest
//! of `inbound` but the rate limiter, so `state.rs` can hold it without an
//! import circle.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

use super::rate_limit;

/// In-memory state of the inbound federation routes.
#[derive(Default)]
pub struct InboundState {
    pub rate_limiter: rate_limit::OriginRateLimiter,
    pub txn_locks: TxnLocks,
    /// Transactions being processed per origin, to notice a peer that
    /// breaks the one-transaction-in-flight rule (SPEC §2.2).
    pub in_progress: OriginsInProgress,
}

/// Counts the `/send` requests being processed per origin.
#[derive(Default)]
pub struct OriginsInProgress {
    counts: Mutex<HashMap<String, u32>>,
}

/// Held while one `/send` is processed; decrements on drop.
pub struct InProgressGuard<'a> {
    owner: &'a OriginsInProgress,
    origin: String,
}

impl OriginsInProgress {
    /// Registers a `/send` from `origin`; returns the guard and whether
    /// another one from the same origin was already in progress.
    pub fn enter(&self, origin: &str) -> (InProgressGuard<'_>, bool) {
        let mut counts = crate::sync::lock(&self.counts);
        let count = counts.entry(origin.to_owned()).or_default();
        *count += 1;
        let overlapping = *count > 1;
        (
            InProgressGuard {
                owner: self,
                origin: origin.to_owned(),
            },
            overlapping,
        )
    }
}

impl Drop for InProgressGuard<'_> {
    fn drop(&mut self) {
        let mut counts = crate::sync::lock(&self.owner.counts);
        if let Some(count) = counts.get_mut(&self.origin) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.origin);
            }
        }
    }
}

type TxnKey = (String, String);

/// One async lock per (origin, txnId) being processed, so that a concurrent
/// duplicate waits for the first copy and then sees its stored response.
/// Entries exist only while someone holds or waits for them: each entry
/// counts its users (holder and waiters), and a user that leaves, by
/// finishing or by being cancelled while it waits, removes the entry when
/// it was the last.
#[derive(Default)]
pub struct TxnLocks {
    locks: Arc<Mutex<HashMap<TxnKey, LockEntry>>>,
}

struct LockEntry {
    mutex: Arc<tokio::sync::Mutex<()>>,
    users: usize,
}

/// Held while one copy of a transaction is processed (or waited for).
pub struct TxnGuard {
    key: TxnKey,
    locks: Arc<Mutex<HashMap<TxnKey, LockEntry>>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl TxnLocks {
    pub async fn lock(&self, origin: &str, txn_id: &str) -> TxnGuard {
        let key = (origin.to_owned(), txn_id.to_owned());
        let mutex = {
            let mut locks = crate::sync::lock(&self.locks);
            let entry = locks.entry(key.clone()).or_insert_with(|| LockEntry {
                mutex: Arc::new(tokio::sync::Mutex::new(())),
                users: 0,
            });
            entry.users += 1;
            entry.mutex.clone()
        };
        // Counted from here on: if this future is dropped while it waits,
        // the guard's drop gives the count back.
        let mut held = TxnGuard {
            key,
            locks: self.locks.clone(),
            guard: None,
        };
        held.guard = Some(mutex.lock_owned().await);
        held
    }

    /// How many (origin, txnId) pairs are in progress.
    pub fn in_progress(&self) -> usize {
        crate::sync::lock(&self.locks).len()
    }
}

impl Drop for TxnGuard {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = crate::sync::lock(&self.locks);
        if let Some(entry) = locks.get_mut(&self.key) {
            entry.users = entry.users.saturating_sub(1);
            if entry.users == 0 {
                locks.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_duplicate_waits_and_entries_are_removed() {
        let locks = Arc::new(TxnLocks::default());
        let first = locks.lock("o", "t1").await;
        assert_eq!(locks.in_progress(), 1);
        // Another transaction id is independent.
        let other = locks.lock("o", "t2").await;
        drop(other);
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _second = locks.lock("o", "t1").await;
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished(), "the duplicate must wait");
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("the duplicate proceeds")
            .expect("no panic");
        assert_eq!(locks.in_progress(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_cancelled_at_any_point_leaves_no_entry() {
        let locks = Arc::new(TxnLocks::default());
        // Cancelled while the holder still holds the lock.
        let first = locks.lock("o", "t").await;
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _second = locks.lock("o", "t").await;
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        waiter.abort();
        let _ = waiter.await;
        drop(first);
        assert_eq!(locks.in_progress(), 0, "the cancelled waiter left nothing");

        // Cancelled after the holder released but before its first poll:
        // the case the old strong-count check leaked.
        let first = locks.lock("o", "t").await;
        let pending = locks.lock("o", "t");
        let mut pending = Box::pin(pending);
        assert!(
            futures_poll_once(pending.as_mut()).await.is_none(),
            "the duplicate waits"
        );
        drop(first);
        drop(pending);
        assert_eq!(locks.in_progress(), 0);
    }

    /// Polls a future once, returning its output if it was ready.
    async fn futures_poll_once<F: std::future::Future + Unpin>(mut future: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut future).poll(cx) {
                std::task::Poll::Ready(output) => Some(output),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}

#[cfg(test)]
mod overlap_tests {
    use super::OriginsInProgress;

    #[test]
    fn a_second_transaction_from_one_origin_is_an_overlap() {
        let counts = OriginsInProgress::default();
        let (first, overlapping) = counts.enter("a.example");
        assert!(!overlapping);
        let (_other_origin, overlapping) = counts.enter("b.example");
        assert!(!overlapping, "other origins are independent");
        let (second, overlapping) = counts.enter("a.example");
        assert!(overlapping);
        drop(second);
        drop(first);
        let (_again, overlapping) = counts.enter("a.example");
        assert!(!overlapping, "finished transactions no longer count");
    }
}
