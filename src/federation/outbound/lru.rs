//! A bounded map that evicts the least recently used entry first, for every
//! per-name map of the outbound side (the `.well-known` cache in discovery,
//! the endpoint map and the connection closers of the connector). It owns
//! only the bound and the use order; what is stored and for how long is its
//! users' business.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// A map holding at most `capacity` entries, evicting the least recently
/// used (inserted or read) one first. Used for every per-name map in
/// discovery and the client, so a stream of new names costs memory only up
/// to the bound.
#[derive(Debug)]
pub(crate) struct LruMap<K, V> {
    capacity: usize,
    entries: HashMap<K, (V, u64)>,
    /// Use tick → key; the first entry is the least recently used.
    order: BTreeMap<u64, K>,
    tick: u64,
}

impl<K: Hash + Eq + Clone, V> LruMap<K, V> {
    /// A map of at most `capacity` entries (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        LruMap {
            capacity: capacity.max(1),
            entries: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
        }
    }

    fn next_tick(&mut self) -> u64 {
        self.tick = self.tick.wrapping_add(1);
        self.tick
    }

    /// The value for `key`, marking it as recently used.
    pub(crate) fn get(&mut self, key: &K) -> Option<&V> {
        let tick = self.next_tick();
        let (_, used) = self.entries.get_mut(key)?;
        let old = std::mem::replace(used, tick);
        if let Some(k) = self.order.remove(&old) {
            self.order.insert(tick, k);
        }
        self.entries.get(key).map(|(v, _)| v)
    }

    /// Inserts or replaces `key`, evicting the least recently used entries
    /// while the map would exceed its capacity.
    pub(crate) fn insert(&mut self, key: K, value: V) {
        let tick = self.next_tick();
        if let Some((_, old)) = self.entries.remove(&key) {
            self.order.remove(&old);
        }
        while self.entries.len() >= self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
        }
        self.order.insert(tick, key.clone());
        self.entries.insert(key, (value, tick));
    }

    /// Removes `key`, returning its value.
    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        let (value, tick) = self.entries.remove(key)?;
        self.order.remove(&tick);
        Some(value)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Entries in the use order (always `len()`; tests check it).
    #[cfg(test)]
    pub(crate) fn order_len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lru_map_never_exceeds_its_bound_and_evicts_the_least_recently_used() {
        let mut map = LruMap::new(3);
        map.insert("a", 1);
        map.insert("b", 2);
        map.insert("c", 3);
        // Reading `a` makes `b` the least recently used.
        assert_eq!(map.get(&"a"), Some(&1));
        map.insert("d", 4);
        assert_eq!(map.len(), 3);
        assert_eq!(map.get(&"b"), None);
        assert_eq!(map.get(&"a"), Some(&1));
        // Replacing a key does not grow the map or evict another.
        map.insert("d", 40);
        assert_eq!(map.len(), 3);
        assert_eq!(map.get(&"c"), Some(&3));
        assert_eq!(map.remove(&"d"), Some(40));
        assert_eq!(map.len(), 2);
        assert_eq!(map.order_len(), 2);
    }
}
