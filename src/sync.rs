//! One habit for `std::sync::Mutex` across the crate: `lock(&mutex)` takes
//! the guard and, if a thread panicked while holding it, takes it anyway.
//!
//! Every such lock in Courier guards a collection or counters (caches,
//! rate-limit buckets, waiter lists, per-host closers, connection caps, the
//! SQLite reader pool) and is held for a few statements without awaiting. A panic there is a
//! bug that has already been reported by its task; the standard
//! collections stay valid after a panic at any point, so carrying on is
//! safe, while refusing the lock (`expect` on a poisoned one) would turn
//! that one panic into a panic of every later request on the same path,
//! input from the network included. Async locks (`tokio::sync`) do not
//! poison and do not need this.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// The guard of `mutex`, recovered if the lock is poisoned.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_is_taken_with_its_data() {
        let mutex = std::sync::Arc::new(Mutex::new(vec![1]));
        let holder = mutex.clone();
        let panicked = std::thread::spawn(move || {
            let mut guard = holder.lock().expect("first lock");
            guard.push(2);
            panic!("a bug while holding the lock");
        })
        .join();
        assert!(panicked.is_err());
        assert!(mutex.is_poisoned());
        let mut guard = lock(&mutex);
        assert_eq!(*guard, vec![1, 2]);
        guard.push(3);
        drop(guard);
        assert_eq!(*lock(&mutex), vec![1, 2, 3]);
    }
}
