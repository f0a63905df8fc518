//! The access-token cache of a single-process store: which device a token
//! belongs to, kept in memory so that an authenticated request does not
//! cost a database read (and, on SQLite, a blocking-pool hop).
//!
//! Only tokens the database confirmed are cached; an unknown token always
//! goes to the database, so garbage cannot fill the cache and a token
//! issued a moment ago works at once. Entries are keyed by the token's
//! SHA-256 digest, never the token itself.
//!
//! Invalidation is by generation. A lookup that misses reads the
//! generation before it asks the database and caches the answer only if
//! the generation is unchanged when it comes back; every write that
//! removes or moves a token calls `invalidate` once it has committed,
//! which bumps the generation and empties the cache. So an answer read
//! before such a write can never be cached after it, and once the write
//! has returned no request is served from the old state. That holds only
//! when every such write goes through this process: the SQLite store uses
//! it; PostgreSQL, where several workers write one database, does not.

use std::collections::HashMap;
use std::sync::RwLock;

use sha2::{Digest, Sha256};

/// Entries beyond which the cache is emptied before the next insert (a
/// crude bound; a deployment with more live devices than this rereads
/// the database for some of them).
const CAPACITY: usize = 65_536;

/// A token's cache key.
type Key = [u8; 32];

/// The cache, of what a token names (`V`: the store's `DeviceKey`; generic
/// so that this file needs nothing from the store).
#[derive(Debug)]
pub struct TokenCache<V> {
    state: RwLock<State<V>>,
}

#[derive(Debug)]
struct State<V> {
    generation: u64,
    devices: HashMap<Key, V>,
}

/// What a lookup found in the cache.
pub enum Cached<V> {
    Hit(V),
    /// Not cached: ask the database, then `insert` under this ticket.
    Miss(Ticket),
}

/// The key and generation of a missed lookup.
pub struct Ticket {
    key: Key,
    generation: u64,
}

impl<V: Clone> Default for TokenCache<V> {
    fn default() -> Self {
        TokenCache {
            state: RwLock::new(State {
                generation: 0,
                devices: HashMap::new(),
            }),
        }
    }
}

impl<V: Clone> TokenCache<V> {
    pub fn new() -> TokenCache<V> {
        TokenCache::default()
    }

    pub fn get(&self, access_token: &str) -> Cached<V> {
        let key: Key = Sha256::digest(access_token.as_bytes()).into();
        // A poisoned lock only means a panic elsewhere while it was held;
        // the map is still consistent (every write is one whole step).
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        match state.devices.get(&key) {
            Some(device) => Cached::Hit(device.clone()),
            None => Cached::Miss(Ticket {
                key,
                generation: state.generation,
            }),
        }
    }

    /// Caches what the database said for a missed lookup, unless a token
    /// write happened since the ticket was taken.
    pub fn insert(&self, ticket: Ticket, device: &V) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        if state.generation != ticket.generation {
            return;
        }
        if state.devices.len() >= CAPACITY {
            state.devices.clear();
        }
        state.devices.insert(ticket.key, device.clone());
    }

    /// After a committed write that removed or reassigned tokens.
    pub fn invalidate(&self) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        state.generation += 1;
        state.devices.clear();
    }

    /// Entries cached now.
    pub fn len(&self) -> usize {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .devices
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device, as the value a token names.
    type DeviceKey = (String, String);

    fn device(d: &str) -> DeviceKey {
        ("@u:a.test".to_owned(), d.to_owned())
    }

    fn miss(cache: &TokenCache<DeviceKey>, token: &str) -> Ticket {
        match cache.get(token) {
            Cached::Miss(ticket) => ticket,
            Cached::Hit(d) => panic!("{token} is cached as {d:?}"),
        }
    }

    #[test]
    fn a_confirmed_token_is_served_from_memory() {
        let cache = TokenCache::<DeviceKey>::new();
        let ticket = miss(&cache, "tok");
        cache.insert(ticket, &device("D1"));
        assert!(matches!(cache.get("tok"), Cached::Hit(d) if d == device("D1")));
        miss(&cache, "other");
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn an_answer_read_before_a_token_write_is_never_cached() {
        let cache = TokenCache::<DeviceKey>::new();
        cache.insert(miss(&cache, "a"), &device("A"));
        // A lookup misses, the database answers from the old state, then a
        // write deletes the device and invalidates before the answer lands.
        let late = miss(&cache, "b");
        cache.invalidate();
        cache.insert(late, &device("B"));
        assert!(cache.is_empty());
        miss(&cache, "a");
        miss(&cache, "b");
        // A ticket taken after the write caches normally.
        cache.insert(miss(&cache, "b"), &device("B2"));
        assert!(matches!(cache.get("b"), Cached::Hit(d) if d == device("B2")));
    }

    #[test]
    fn the_cache_stays_bounded() {
        let cache = TokenCache::<DeviceKey>::new();
        for n in 0..CAPACITY + 10 {
            let token = format!("t{n}");
            cache.insert(miss(&cache, &token), &device("D"));
        }
        assert!(cache.len() <= CAPACITY);
        assert!(!cache.is_empty());
    }
}
